"""fp16 with dynamic loss scaling, on the CPU. DeepSpeed's loss scaler, its fp16 optimizers
(ZeRO's, and FP16_UnfusedOptimizer without ZeRO) and their checkpoints are the same Python on
a CPU as on a GPU; only the kernels differ. DeepSpeed's CPU accelerator takes fp16 only where
oneDNN computes it (AVX512-FP16 or AMX); tests/fp16_support.py lets it take fp16 on any CPU,
torch's own kernels computing it. tests/test_gpu.py runs the fused CUDA optimizers.

Found here: DeepSpeed 0.19.8 does not scale an fp16 loss without ZeRO, while its step divides
the gradients by the scale (pipeline.engine.ScaledBackward repairs it)."""

import json

import numpy as np
import pytest
import torch

from pipeline.trainer import Trainer

from . import faults
from .conftest import REPO, set_one_process_world
from .fp16_support import needs_fp16
from .test_pretrain import config  # 8 steps of 16 sequences (2 micro-batches of 8), tiny preset


pytestmark = needs_fp16

# The shipped fp16 settings (initial scale 2^16, window 1000, hysteresis 2), torch's AdamW in
# place of the CUDA-only fused optimizers.
SHIPPED_FP16 = json.load(open(f"{REPO}/ds_configs/gpu_base_fp16_zero1_fused-adam.json"))["fp16"]
TORCH_ADAMW = {"type": "AdamW", "params": {"torch_adam": True, "betas": [0.9, 0.999], "eps": 1e-6}}


@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


def ds_config(directory, stage: int, precision: str = "fp16", **fp16) -> str:
    """A DeepSpeed config file: ZeRO ``stage``, torch's AdamW, fp16 (the shipped settings updated
    by ``fp16``) or bf16."""
    path = directory / f"{precision}_zero{stage}.json"
    mixed = {"fp16": {**SHIPPED_FP16, **fp16}} if precision == "fp16" else {"bf16": {"enabled": True}}
    path.write_text(json.dumps({**mixed, "zero_optimization": {"stage": stage}, "optimizer": TORCH_ADAMW}))
    return str(path)


def run(trainer) -> list:
    seen = []
    assert trainer.train(on_step=lambda t, metrics: seen.append(metrics)) == 0
    return seen


def test_fp16_without_zero_trains_as_bf16_does(data_dir, no_dropout, tmp_path):
    """Without ZeRO, fp16 and bf16 both run DeepSpeed's FP16_UnfusedOptimizer around torch's AdamW;
    bf16 scales nothing, fp16 must scale the loss by 2^16 and its step divide the gradients back.
    DeepSpeed 0.19.8 does the second without the first: the updates were 65,536 times too small
    (gradient norm 1.9e-5 instead of 1.27; the loss 0.04 above bf16's after one step, 0.2 after 3)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    runs = {}
    for precision in ("bf16", "fp16"):
        trainer = Trainer(config(data_dir, tmp_path / precision, model=no_dropout, steps=6,
                                 ds_config=ds_config(tmp_path, 0, precision)))
        assert isinstance(trainer.engine.optimizer, FP16_UnfusedOptimizer)
        runs[precision] = run(trainer)
    assert trainer.backward.repair is not None  # the first backward told whether DeepSpeed scales
    fp16, bf16 = runs["fp16"], runs["bf16"]
    assert [m.loss_scale for m in fp16] == [2.0 ** 16] * 6 and all(m.applied for m in fp16)
    # measured: losses within 5e-4, gradient norms within 0.3% (fp16 and bf16 round differently)
    np.testing.assert_allclose([m.loss for m in fp16], [m.loss for m in bf16], rtol=0, atol=5e-3)
    np.testing.assert_allclose([m.grad_norm for m in fp16], [m.grad_norm for m in bf16], rtol=0.02)


def test_where_deepspeed_scales_the_loss_itself_it_is_scaled_once(data_dir, no_dropout, tmp_path):
    """Under ZeRO, DeepSpeed scales the loss: the first backward's check must see that and leave
    the run bit for bit as it is without the check."""
    losses = {}
    for check in (False, True):
        trainer = Trainer(config(data_dir, tmp_path / str(check), model=no_dropout, steps=3,
                                 ds_config=ds_config(tmp_path, 1)))
        assert trainer.backward.repair is False  # ZeRO's optimizers scale: nothing to check
        if check:
            trainer.backward.repair = None
        losses[check] = [(m.loss, m.grad_norm) for m in run(trainer)]
        assert trainer.backward.repair is False
    assert losses[True] == losses[False]


@pytest.mark.parametrize("stage, hysteresis, halved", [(1, 1, True), (1, 2, False), (0, 2, True)],
                         ids=["zero1", "zero1-shipped-hysteresis", "zero0-shipped-hysteresis"])
def test_an_overflowing_step_is_skipped_and_the_run_goes_on(data_dir, tmp_path, monkeypatch, stage, hysteresis,
                                                            halved):
    """NaN gradients under a finite loss at step 5, as an fp16 overflow in the backward pass: the
    scaler skips that update and the run goes on with finite weights. ZeRO's scaler halves the
    scale at the overflow that exhausts ``hysteresis``; the wrapper without ZeRO (the LAMB files')
    halves it at the first, whatever ``hysteresis`` says."""
    faults.inject(monkeypatch, "nan-grad:5")
    trainer = Trainer(config(data_dir, tmp_path, steps=8, ds_config=ds_config(tmp_path, stage, hysteresis=hysteresis)))
    metrics = run(trainer)
    assert [m.applied for m in metrics] == [True] * 4 + [False] + [True] * 3
    assert [m.loss_scale for m in metrics] == [2.0 ** 16] * 4 + [2.0 ** (15 if halved else 16)] * 4
    assert trainer.engine.skipped_steps == 1
    assert all(np.isfinite(m.grad_norm) for m in metrics if m.applied)
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())


@pytest.mark.parametrize("stage", [1, 0])
def test_overflows_at_the_minimum_loss_scale_stop_the_run_in_one_line(data_dir, tmp_path, monkeypatch, stage):
    """Gradients that overflow at every step: the scale halves to its floor (4 -> 2 -> 1 here). There
    ZeRO's scaler raises a bare Exception, made the trainer's one-line error; the wrapper without
    ZeRO skips every update, which the trainer stops after MAX_SKIPPED_UPDATES (5 here)."""
    from pipeline import trainer as trainer_module
    from pipeline.trainer import NonFiniteLoss

    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_UPDATES", 5)
    faults.inject(monkeypatch, "nan-grad-from:3")
    trainer = Trainer(config(data_dir, tmp_path, steps=20, ds_config=ds_config(
        tmp_path, stage, initial_scale_power=2, hysteresis=1, min_loss_scale=1)))
    message = (r"fp16 gradients overflow even at the minimum loss scale \(1\) at step 5: stopping every rank; the last "
               r"checkpoint holds the weights from before" if stage else
               r"5 updates in a row skipped up to step 7 \(gradients not finite; fp16: even at the minimum loss scale\)")
    with pytest.raises(NonFiniteLoss, match=message):
        trainer.train()
