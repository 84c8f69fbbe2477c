"""Weight decay reaches the weight matrices and embeddings, never a bias or a LayerNorm."""

import pytest
import torch

from pipeline.model import build_model, model_config
from pipeline.param_groups import weight_decay_groups
from pipeline.train_config import TrainConfig
from pipeline.trainer import Trainer
from tests.conftest import set_one_process_world

MANIFEST = {"tokenizer": {"vocab_size": 500, "special_ids": {"pad": 0}}, "max_seq_length": 32}


def names_by_group(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in g["params"]} for g in groups]


def test_biases_and_layer_norms_are_exempt_and_every_parameter_is_in_one_group():
    model = build_model(model_config("tiny", MANIFEST))
    groups = weight_decay_groups(model, 0.01)
    decayed, exempt = names_by_group(model, groups)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert exempt == {n for n, _ in model.named_parameters() if n.endswith(".bias") or ".LayerNorm." in n}
    assert decayed == {n for n, _ in model.named_parameters()} - exempt
    assert "bert.embeddings.word_embeddings.weight" in decayed  # tied to the MLM output projection: once
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


@pytest.fixture
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


def test_the_trainers_engine_decays_only_the_decayed_group(data_dir, tmp_path, one_process_world):
    """One real optimizer step with all-zero gradients: AdamW's moments stay zero, so the only change
    is the decoupled decay, p ← p · (1 − lr · wd), on the decayed parameters and nothing else."""
    lr, wd = 0.1, 0.5
    trainer = Trainer(TrainConfig.from_flat(data=data_dir, run_dir=str(tmp_path), steps=4, global_batch_size=16,
                                            micro_batch_size=8, learning_rate=lr, weight_decay=wd, warmup_steps=0,
                                            log_every=100, mlflow=False))
    model = trainer.engine.module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decayed, _ = names_by_group(model, weight_decay_groups(model, wd))
    batch = next(trainer.loader)
    for _ in range(trainer.batches.accumulation_steps):
        mlm_logits, nsp_logits = trainer.engine(**{k: v for k, v in batch.items()
                                                   if k not in ("labels", "mlm_labels", "next_sentence_label")})
        trainer.engine.backward((mlm_logits.sum() + nsp_logits.sum()) * 0.0)
        trainer.engine.step()
    assert trainer.engine.global_steps == 1
    for name, param in model.named_parameters():
        expected = before[name] * (1 - lr * wd) if name in decayed else before[name]
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
    trainer.loader.close()


def test_lamb_applies_no_trust_ratio_to_the_exempt_group():
    """NVIDIA's LAMB (apex, use_nvlamb=False) scales only the decayed tensors' updates by
    ||w|| / ||update||: DeepSpeed's FusedLamb reads each group's clamp, pinned to 1 for the rest."""
    model = build_model(model_config("tiny", MANIFEST))
    decayed, exempt = weight_decay_groups(model, 0.01, {"optimizer": {"type": "Lamb"}})
    assert "max_coeff" not in decayed and (exempt["max_coeff"], exempt["min_coeff"]) == (1.0, 1.0)
    for ds_config in ({"optimizer": {"type": "AdamW"}}, {"optimizer": {"type": "Adam"}}, {}, None):
        assert all("max_coeff" not in g for g in weight_decay_groups(model, 0.01, ds_config))


def test_a_resume_puts_this_runs_group_settings_over_the_checkpoints():
    """A LAMB checkpoint saved before the exempt group's clamp was pinned restores 0.01-10 into its
    groups (DeepSpeed loads them as saved): the resume puts 1 back, with this run's rate and decay."""
    from types import SimpleNamespace

    from pipeline.engine import linear_warmup_decay
    from pipeline.trainer import Trainer

    weights, biases = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [weights], "weight_decay": 0.5, "max_coeff": 10.0, "min_coeff": 0.01},
                                 {"params": [biases], "weight_decay": 0.0, "max_coeff": 10.0, "min_coeff": 0.01}],
                                lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(100, 10))
    fake = SimpleNamespace(config=SimpleNamespace(engine=SimpleNamespace(learning_rate=0.01, weight_decay=0.02)),
                           scheduler=scheduler, optimizer=optimizer, is_rank0=False,
                           ds_config={"optimizer": {"type": "Lamb"}})
    Trainer._apply_schedule_flags(fake)
    decayed, exempt = optimizer.param_groups
    assert (decayed["weight_decay"], decayed["max_coeff"], decayed["min_coeff"]) == (0.02, 10.0, 0.01)
    assert (exempt["weight_decay"], exempt["max_coeff"], exempt["min_coeff"]) == (0.0, 1.0, 1.0)
    assert decayed["lr"] == exempt["lr"] == pytest.approx(0.01 * 1 / 10)  # step 0 of a 10-step warmup
