"""--compile: the Inductor-compiled encoder trains as the eager one does, and its checkpoints,
resume and export are the eager ones'."""

import json

import pytest
import torch

from pipeline.ds_config import DsConfigError
from pipeline.export import export_checkpoint, write_train_config
from pipeline.model import PRESETS
from pipeline.train_config import TrainConfig
from pipeline.trainer import Trainer
from tests.conftest import set_one_process_world


@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


def run(data_dir, run_dir, model, compile, stop_at=None, steps=4):
    """Per-step losses of a run; a stop request after step ``stop_at`` checkpoints it there."""
    config = TrainConfig.from_flat(data=data_dir, run_dir=str(run_dir), model=model, steps=steps, global_batch_size=16,
                                   micro_batch_size=8, learning_rate=2e-3, warmup_steps=1, eval_shards=0, log_every=100,
                                   mlflow=False, compile=compile)
    trainer = Trainer(config)
    write_train_config(config)  # as pretrain.py does: what the export rebuilds the model from
    losses = []

    def record(t, metrics):
        losses.append(metrics.loss)
        if t.step == stop_at:
            t.stop.requested = True

    trainer.train(on_step=record)
    return losses


def test_compiled_encoder_matches_eager_through_a_resume_and_the_export(data_dir, tmp_path):
    # Dropout off: Inductor draws its own random numbers, so masks (not the arithmetic) would differ.
    model = tmp_path / "tiny-no-dropout.json"
    model.write_text(json.dumps({**PRESETS["tiny"], "hidden_dropout_prob": 0.0,
                                 "attention_probs_dropout_prob": 0.0}))
    eager = run(data_dir, tmp_path / "eager", str(model), compile=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run(data_dir, tmp_path / "compiled", str(model), compile=True, stop_at=2)
    compiled += run(data_dir, tmp_path / "compiled", str(model), compile=True)  # resumes at step 2
    assert len(compiled) == 4
    # The compiled graphs did run: one per process start (padded to one length, no recompiles).
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] >= 1 and stats["calls_captured"] > 0, dict(stats)
    assert not torch._dynamo.utils.counters["recompiles"], dict(torch._dynamo.utils.counters["recompiles"])
    # fp32 on both sides: Inductor fuses and reorders, so the sums differ in the last bits only.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-4)
    exported = [export_state(tmp_path / name) for name in ("eager", "compiled")]
    assert exported[0].keys() == exported[1].keys()
    for key in exported[0]:
        torch.testing.assert_close(exported[1][key], exported[0][key], rtol=1e-3, atol=1e-4, msg=key)


def export_state(run_dir):
    """The Hugging Face export's weights, loaded as a user loads them."""
    from transformers import BertForPreTraining

    return BertForPreTraining.from_pretrained(export_checkpoint(str(run_dir))).state_dict()


def test_compile_with_zero3_is_refused_before_the_engine_starts(data_dir, tmp_path):
    """ZeRO-3's parameter hooks flip the grad mode around every layer: torch._dynamo recompiles
    each up to its limit and runs it eager (2 CPU ranks: the eager losses, recompile warnings)."""
    config = TrainConfig.from_flat(data=data_dir, run_dir=str(tmp_path / "run"), model="tiny", steps=2,
                                   global_batch_size=16, micro_batch_size=8, learning_rate=2e-3, mlflow=False,
                                   compile=True, ds_config="ds_configs/cpu_fp32_zero3_torch-adamw.json")
    with pytest.raises(DsConfigError, match=r"--compile with ZeRO stage 3 \(--ds-config ds_configs/cpu_fp32_zero3"):
        Trainer(config)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
