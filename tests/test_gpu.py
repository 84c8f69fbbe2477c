"""What only a CUDA GPU exercises: DeepSpeed's fused optimizers (fp16 loss scaling around them; the
scaler itself runs on the CPU in tests/test_fp16.py), bf16 ZeRO-1 without the overflow check,
the CUDA generator in checkpoints, and the export and fine-tuning of a GPU run. Skipped without CUDA; on a GPU machine:

    DS_ACCELERATOR=cuda python -m pytest -m gpu tests/test_gpu.py

The tiny preset on the dump sample, with the shipped GPU configs (their bucket sizes are for
BERT-base and large, and do not matter to a model this small). The first test that takes a
fused optimizer builds DeepSpeed's CUDA extensions (about 80 s for FusedAdam and FusedLAMB
together, once per machine: ~/.cache/torch_extensions).
"""

import json
import os

import numpy as np
import pytest
import torch

from pipeline import checkpoint, export
from pipeline.trainer import EXIT_STOPPED, Trainer

from . import faults
from .conftest import REPO, set_one_process_world
from .test_finetune import write_reviews
from .test_pretrain import config  # the CPU tests' run: 8 steps of 16 sequences, tiny preset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIGS = os.path.join(REPO, "ds_configs")
BF16_ADAM = os.path.join(CONFIGS, "gpu_base_bf16_zero1_fused-adam.json")
FP16_ADAM = os.path.join(CONFIGS, "gpu_base_fp16_zero1_fused-adam.json")
FP16_LAMB = os.path.join(CONFIGS, "gpu_base_fp16_zero0_fused-lamb.json")
BF16_ZERO3 = os.path.join(CONFIGS, "gpu_large_bf16_zero3_fused-adam.json")


@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


def run(trainer, stop_at=None):
    """(per-step metrics, exit code); a stop request after step ``stop_at`` checkpoints there."""
    seen = []

    def record(t, metrics):
        seen.append(metrics)
        if t.step == stop_at:
            t.stop.requested = True

    return seen, trainer.train(on_step=record)


def mean_mlm(metrics):
    return sum(m.mlm_loss for m in metrics) / len(metrics)


@pytest.mark.parametrize("ds_config", [BF16_ADAM, FP16_ADAM, FP16_LAMB, BF16_ZERO3],
                         ids=["bf16-adam", "fp16-adam", "fp16-lamb", "bf16-zero3-adam"])
def test_each_shipped_gpu_config_learns_on_the_gpu(data_dir, tmp_path, ds_config):
    # LAMB scales each weight matrix's step by its weight norm over its update norm (clamped to
    # [0.01, 10]): on BERT's 0.02-scale initial weights that factor is near 0.01, hence its larger
    # rate. Biases and LayerNorm take a ratio of 1 (pipeline/param_groups.py), so full steps of this
    # rate: checked on the CPU with FusedLamb's update transcribed to torch (fp32, 3 seeds), the MLM
    # loss falls 1.31-1.52 nats at 1e-1 with every weight finite, 0.9 at 3e-2, 0.35 at 1e-2.
    rate = 1e-1 if ds_config == FP16_LAMB else 2e-3
    trainer = Trainer(config(data_dir, tmp_path, steps=40, warmup_steps=4, ds_config=ds_config, learning_rate=rate))
    assert trainer.engine.device.type == "cuda"
    optimizer = type(trainer.engine.optimizer.optimizer
                     if hasattr(trainer.engine.optimizer, "optimizer") else trainer.engine.optimizer).__name__
    assert optimizer == ("FusedLamb" if ds_config == FP16_LAMB else "FusedAdam")
    if ds_config == FP16_LAMB:  # the trust ratio on the weight matrices only (pipeline/param_groups.py)
        groups = trainer.optimizer.param_groups
        assert (groups[0]["max_coeff"], groups[1]["max_coeff"], groups[1]["min_coeff"]) == (10.0, 1.0, 1.0)
    metrics, code = run(trainer)
    assert code == 0 and len(metrics) == 40
    # fp16 starts at scale 2^16 and may skip a few steps while the scaler finds its level: no more
    assert sum(not m.applied for m in metrics) <= 4
    assert mean_mlm(metrics[-5:]) < mean_mlm(metrics[:5]) - 0.5
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())


def test_fp16_loss_scaling_skips_an_overflowing_step_and_goes_on(data_dir, tmp_path, monkeypatch):
    faults.inject(monkeypatch, "nan-grad:12")
    trainer = Trainer(config(data_dir, tmp_path, steps=16, ds_config=FP16_ADAM))
    metrics, code = run(trainer)
    assert code == 0 and len(metrics) == 16
    assert not metrics[11].applied  # the scaler saw the NaN gradients and skipped the update
    assert all(m.applied for m in metrics[12:])
    assert trainer.engine.skipped_steps >= 1
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())


def test_bf16_without_the_overflow_check_stops_on_nan_gradients(data_dir, tmp_path, monkeypatch):
    # The shipped bf16 config skips DeepSpeed's per-tensor check; the trainer's norm check holds.
    assert json.load(open(BF16_ADAM))["bf16"]["check_grad_overflow"] is False
    faults.inject(monkeypatch, "nan-grad:5")
    trainer = Trainer(config(data_dir, tmp_path, checkpoint_every=1, keep_checkpoints=10, ds_config=BF16_ADAM))
    with pytest.raises(FloatingPointError, match=r"the gradient norm is (nan|inf) .* at step 5 and the update was "
                                                 "applied"):
        trainer.train()
    assert checkpoint.complete_tags(str(tmp_path / "checkpoints")) == [f"step0000000{s}" for s in range(1, 5)]


def test_a_resume_restores_the_cuda_generator_and_continues_the_run(data_dir, tmp_path):
    """Dropout masks on a GPU come from the CUDA generator: a checkpoint that did not hold it
    would restart them. bf16 kernels and atomics make the losses close, not equal."""
    generator_at_step = {}

    def record_generator(t, metrics):
        generator_at_step[t.step] = torch.cuda.get_rng_state()

    whole = Trainer(config(data_dir, tmp_path / "whole", ds_config=BF16_ADAM))
    whole_losses = []
    assert whole.train(on_step=lambda t, m: (whole_losses.append(m.loss), record_generator(t, m))) == 0

    first, code = run(Trainer(config(data_dir, tmp_path / "split", ds_config=BF16_ADAM)), stop_at=3)
    assert code == EXIT_STOPPED
    resumed = Trainer(config(data_dir, tmp_path / "split", ds_config=BF16_ADAM))
    assert resumed.step == 3
    assert torch.equal(torch.cuda.get_rng_state(), generator_at_step[3])
    rest, code = run(resumed)
    assert code == 0 and len(rest) == 5
    np.testing.assert_allclose([m.loss for m in first + rest], whole_losses, rtol=5e-3)


def test_a_gpu_runs_export_holds_the_weights_it_trained(data_dir, tmp_path):
    from transformers import AutoModelForPreTraining

    cfg = config(data_dir, tmp_path, steps=4, ds_config=BF16_ADAM)
    trainer = Trainer(cfg)
    export.write_train_config(cfg, "gpu-run")
    assert trainer.train() == 0
    engine = {k: v.detach().cpu() for k, v in trainer.engine.module.state_dict().items()}
    model = AutoModelForPreTraining.from_pretrained(export.export_checkpoint(str(tmp_path)))
    loaded = model.state_dict()
    assert set(loaded) == set(engine)
    for name, value in engine.items():
        assert loaded[name].dtype == torch.float32, name  # the fp32 master weights, not the bf16 copy
        # the engine's bf16 weights are the master weights rounded
        assert torch.equal(loaded[name].to(value.dtype), value), name


def test_an_fp16_lamb_runs_export_holds_its_fp32_master_weights(data_dir, tmp_path):
    # fp16 without ZeRO saves fp16 module weights; the masters are in the optimizer's state.
    from transformers import AutoModelForPreTraining

    from pipeline.param_groups import weight_decay_groups

    cfg = config(data_dir, tmp_path, steps=4, ds_config=FP16_LAMB, learning_rate=1e-1)
    trainer = Trainer(cfg)
    export.write_train_config(cfg, "gpu-run")
    assert trainer.train() == 0
    groups = [group["params"] for group in weight_decay_groups(trainer.engine.module, 0.0)]
    masters = {id(p): m.detach().float().cpu().view(p.shape)
               for params, group in zip(groups, trainer.engine.optimizer.fp32_groups) for p, m in zip(params, group)}
    loaded = AutoModelForPreTraining.from_pretrained(export.export_checkpoint(str(tmp_path))).state_dict()
    for name, param in trainer.engine.module.named_parameters():
        assert param.dtype == torch.float16, name
        assert torch.equal(loaded[name], masters[id(param)]), name


def test_fine_tuning_on_the_gpu_reports_what_its_saved_model_predicts(data_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from pipeline.finetuning.config import FinetuneConfig
    from pipeline.finetuning.trainer import Finetuner, collate

    cfg = config(data_dir, tmp_path / "pretrain", steps=4, ds_config=BF16_ADAM)
    trainer = Trainer(cfg)
    export.write_train_config(cfg, "gpu-run")
    assert trainer.train() == 0
    finetuner = Finetuner(FinetuneConfig.from_flat(
        model=str(tmp_path / "pretrain"), data=write_reviews(tmp_path / "reviews.csv"), label_column="category", drop_labels=("plot",),
        output_dir=str(tmp_path / "out"), epochs=2, global_batch_size=16, micro_batch_size=16,
        learning_rate=1e-3, mlflow=False, seed=3, ds_config=BF16_ADAM))
    assert finetuner.engine.device.type == "cuda"
    finetuner.train()
    report = finetuner.test_report()
    assert report["history"][1]["train_loss"] < report["history"][0]["train_loss"]
    on_gpu = finetuner.predict("test")  # with the best epoch's fp32 masters, as the report
    model_dir = finetuner.save_model(str(tmp_path / "model"))
    data = finetuner.splits["test"]
    batch = collate(data, np.arange(len(data)), finetuner.tokenizer.pad_token_id, finetuner.task)
    batch.pop("labels")
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()(**batch).logits.numpy()
    # the same fp32 weights, on the GPU (TF32 matmuls at most) and on the CPU
    np.testing.assert_allclose(on_gpu, logits, atol=0.02)
    accuracy = float(np.mean(logits.argmax(-1) == data.labels))
    assert accuracy == pytest.approx(report["test"]["accuracy"], abs=0.05)


def test_the_compiled_encoder_matches_eager_on_the_gpu(data_dir, tmp_path):
    # Triton kernels from Inductor in place of the eager CUDA ones; dropout off (Inductor draws its
    # own masks), fp32 (no TF32: neither side enables it), so only the summation order differs.
    from pipeline.model import PRESETS

    model = tmp_path / "tiny-no-dropout.json"
    model.write_text(json.dumps({**PRESETS["tiny"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    losses = {}
    for compile in (False, True):
        trainer = Trainer(config(data_dir, tmp_path / str(compile), model=str(model), steps=6, compile=compile,
                                 eval_shards=0))
        assert trainer.engine.device.type == "cuda"
        metrics, code = run(trainer)
        assert code == 0
        losses[compile] = [m.loss for m in metrics]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3)


def test_a_micro_batch_never_waits_for_the_gpu_in_this_projects_code(data_dir, tmp_path):
    """The host must keep queuing kernels: a copy to the host (``.item()``, ``.tolist()``) or of
    a host value to the GPU waits for everything queued before it. CUDA's sync debug mode warns
    at each such wait; none may come from pipeline/ or transformers (DeepSpeed's own are listed).
    tests/test_pretrain.py checks the same on the CPU with a torch function mode."""
    import warnings

    trainer = Trainer(config(data_dir, tmp_path, steps=2, ds_config=BF16_ADAM))
    trainer.train_step()  # the first step allocates and builds what later steps reuse
    batch = next(trainer.loader)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            from pipeline.trainer import pretraining_losses

            mlm, nsp, counts = pretraining_losses(trainer.engine, batch)
            trainer.backward(mlm + nsp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [f"{os.path.relpath(w.filename, REPO)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    print("host waits in a micro-batch:", waits or "none")
    assert not [w for w in waits if w.startswith("pipeline" + os.sep) or f"{os.sep}transformers{os.sep}" in w], waits
    trainer.loader.close()
