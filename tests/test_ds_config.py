"""DeepSpeed configs: one home per value, loud batch arithmetic, and a real engine step."""

import json
import os
import re

import numpy as np
import pytest

from pipeline.ds_config import DsConfigError, inject, load_ds_config, plan_batches

from .conftest import REPO, set_one_process_world
from .fp16_support import needs_fp16

DS_DIR = os.path.join(REPO, "ds_configs")
CONFIGS = sorted(f for f in os.listdir(DS_DIR) if f.endswith(".json"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads_and_is_documented(name):
    config = load_ds_config(os.path.join(DS_DIR, name))
    assert "zero_optimization" in config and "optimizer" in config
    assert f"`{name}`" in open(os.path.join(DS_DIR, "README.md")).read()
    precision = name.split("_")[2] if name.startswith("gpu") else name.split("_")[1]
    assert config.get(precision, {}).get("enabled", precision == "fp32") is True


def test_a_value_set_in_the_file_and_by_a_flag_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_batch_size": 256, "zero_optimization": {"stage": 1}}))
    with pytest.raises(DsConfigError, match=r"sets 'train_batch_size', which comes from --global-batch-size"):
        load_ds_config(str(path))
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    with pytest.raises(DsConfigError, match=r"'optimizer.params.lr', which comes from --learning-rate"):
        load_ds_config(str(path))
    with pytest.raises(DsConfigError, match=r"--ds-config .*missing.json: no such file"):
        load_ds_config(str(tmp_path / "missing.json"))


def test_bf16_without_the_overflow_check_needs_a_deepspeed_that_reports_nan_gradients(tmp_path, monkeypatch):
    from importlib import metadata

    path = os.path.join(REPO, "ds_configs", "gpu_base_bf16_zero1_fused-adam.json")
    assert load_ds_config(path)["bf16"]["check_grad_overflow"] is False  # the installed DeepSpeed will do
    monkeypatch.setattr(metadata, "version", lambda name: "0.17.6")
    with pytest.raises(DsConfigError, match=r"sets bf16.check_grad_overflow false, which needs DeepSpeed >= "
                                            r"0\.19\.8 .*\(installed: 0\.17\.6\)"):
        load_ds_config(path)
    checked = tmp_path / "checked.json"
    checked.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    assert load_ds_config(str(checked))["bf16"] == {"enabled": True}  # the check on: any version


def test_batch_arithmetic_is_exact_or_a_clear_error():
    plan = plan_batches(256, 16, 4)
    assert plan.accumulation_steps == 4
    with pytest.raises(DsConfigError, match=r"--global-batch-size 250 is not divisible by --micro-batch-size "
                                            r"16 x 4 processes = 64; use 192 or 256 \(a multiple of the 4 "):
        plan_batches(250, 16, 4)
    # A power-of-two batch resumed on 3 nodes of 8: the batch may not change, the world size may.
    with pytest.raises(DsConfigError, match=r"use 64512 or 66048 \(a multiple of the 24 processes\), or run 65536 "
                                            r"on 16 or 32 processes \(a resume keeps its global batch\)$"):
        plan_batches(65536, 64, 24)
    # Only counts this micro-batch fits: 96 = 32 x 3 (4 or 6 processes would fail again).
    with pytest.raises(DsConfigError, match=r"or run 96 on 3 processes \(a resume keeps its global batch\)$"):
        plan_batches(96, 32, 5)
    # fine-tuning's defaults (32 = 32 x accumulation) on 8 GPUs: the micro-batch is what to change
    with pytest.raises(DsConfigError, match=r"= 256; use --micro-batch-size 4 \(1 accumulation step\), or "
                                            r"--global-batch-size 256 or 512$"):
        plan_batches(32, 32, 8)
    with pytest.raises(DsConfigError, match=r"use --micro-batch-size 6 \(2 accumulation steps\)"):
        plan_batches(12, 8, 1)
    assert plan_batches(32, 4, 8).accumulation_steps == 1 and plan_batches(12, 6, 1).accumulation_steps == 2


def test_injected_config_drives_a_real_deepspeed_engine(monkeypatch):
    """One optimizer step of a tiny BERT on the CPU config, through deepspeed.initialize."""
    import deepspeed
    import torch

    from pipeline.model import build_model, model_config

    set_one_process_world(monkeypatch)
    manifest = {"tokenizer": {"vocab_size": 500, "special_ids": {"pad": 0}}, "max_seq_length": 32}
    torch.manual_seed(0)
    model = build_model(model_config("tiny", manifest))
    config = inject(load_ds_config(os.path.join(DS_DIR, "cpu_fp32_zero2_torch-adamw.json")),
                    plan_batches(8, 4, 1), learning_rate=1e-3, weight_decay=0.01, grad_clip=1.0)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=config)
    assert engine.gradient_accumulation_steps() == 2 and engine.train_batch_size() == 8
    # Its throughput timer would synchronize the device twice per micro-batch.
    assert not engine.tput_timer.config.enabled
    assert optimizer.param_groups[0]["lr"] == 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    batch = {"input_ids": torch.randint(5, 500, (4, 32)), "labels": torch.randint(5, 500, (4, 32)),
             "next_sentence_label": torch.randint(0, 2, (4,))}
    for _ in range(2):  # two micro-batches = one optimizer step
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # The 1-process group stays up for later in-process tests: DeepSpeed caches its
    # groups, and a destroyed one breaks every engine built after it.


@pytest.mark.parametrize("sections, fp32", [
    ({}, True),                                          # the CPU files' fp32
    ({"bf16": {"enabled": True}}, False),
    ({"bf16": {"enabled": "auto"}}, True),               # DeepSpeed drops "auto": fp32
    ({"bf16": {"enabled": False}, "bfloat16": {"enabled": True}}, True),  # "bf16" wins
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, False),
])
def test_a_gpu_engine_in_fp32_is_warned_about_as_deepspeed_parsed_the_file(monkeypatch, sections, fp32):
    import deepspeed

    from pipeline.engine import full_precision_on_gpu
    from pipeline.model import build_model, model_config

    set_one_process_world(monkeypatch)
    manifest = {"tokenizer": {"vocab_size": 500, "special_ids": {"pad": 0}}, "max_seq_length": 32}
    model = build_model(model_config("tiny", manifest))
    config = inject({**load_ds_config(os.path.join(DS_DIR, "cpu_fp32_zero2_torch-adamw.json")), **sections},
                    plan_batches(4, 4, 1), learning_rate=1e-3, weight_decay=0.0, grad_clip=1.0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert full_precision_on_gpu(engine, "f.json") is None  # this engine is on the CPU
    warning = full_precision_on_gpu(engine, "f.json", device_type="cuda")
    assert (warning is not None) == fp32
    if fp32:
        assert warning.startswith("--ds-config f.json enables neither bf16 nor fp16, so this GPU computes in fp32")


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_grad_clip_reaches_the_engine_and_bounds_the_update(monkeypatch, clip):
    """--grad-clip as the trainers pass it (EngineConfig → inject), in a real ZeRO-2 engine: with
    plain SGD the update is lr x the clipped gradient, so its norm is lr x clip under a huge
    gradient, and lr x the gradient's own norm with clipping off."""
    import deepspeed
    import torch

    from pipeline.engine import EngineConfig

    set_one_process_world(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    settings = EngineConfig(ds_config=os.path.join(DS_DIR, "cpu_fp32_zero2_torch-adamw.json"), global_batch_size=4,
                            micro_batch_size=4, learning_rate=0.01, grad_clip=clip)
    config = settings.deepspeed_config(settings.batches(1))
    del config["optimizer"]  # plain SGD from the client: Adam's update would hide the gradient's size
    config["zero_allow_untested_optimizer"] = True
    lr = 0.01
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), config=config)
    assert engine.gradient_clipping() == clip
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    loss = 1e4 * engine(torch.randn(4, 16)).pow(2).sum()  # a gradient norm in the thousands
    engine.backward(loss)
    engine.step()
    update = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    if clip:
        assert update == pytest.approx(lr * clip, rel=1e-3)
    else:
        assert update > 100 * lr


def test_the_readme_table_lists_exactly_the_shipped_files():
    readme = open(os.path.join(DS_DIR, "README.md")).read()
    assert sorted(re.findall(r"^\| `([^`]+\.json)` \|", readme, re.M)) == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_follows_the_readme_rules(name):
    """The rules of ds_configs/README.md: the name says the stage; fused Adam runs ZeRO-1 or 3,
    LAMB no ZeRO; GPU buckets overlap the backward pass (at most 1e8 elements, at least the
    model's word embeddings, its largest tensor); bf16 ZeRO-1 keeps DeepSpeed's ZeRO optimizer."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pipeline.model import PRESETS
    from preprocessing.options import PreprocessConfig

    config = load_ds_config(os.path.join(DS_DIR, name))
    where, *_, zero_name, optimizer = name[:-len(".json")].split("_")
    zero = config["zero_optimization"]
    DeepSpeedZeroConfig(**zero)  # DeepSpeed's own parser: a misspelt key is refused, not ignored
    stage = zero["stage"]
    assert zero_name == f"zero{stage}", f"{name}: the name says {zero_name}, the file stage {stage}"
    if optimizer == "fused-lamb":
        assert stage == 0 and config["optimizer"]["type"] == "Lamb", f"{name}: LAMB runs without ZeRO"
    if optimizer == "fused-adam":
        assert stage in (1, 3) and config["optimizer"]["type"] == "Adam", f"{name}: fused Adam runs ZeRO-1 or 3"
        assert config["optimizer"]["params"]["adam_w_mode"] is True
    if where == "gpu" and stage > 0:
        largest = PRESETS[name.split("_")[1]]["hidden_size"] * PreprocessConfig.vocab_size
        buckets = ["reduce_bucket_size", "stage3_prefetch_bucket_size" if stage == 3 else "allgather_bucket_size"]
        for key in buckets:
            assert largest <= zero[key] <= 1e8, f"{name}: {key} {zero[key]:.3g}"
        assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    if stage == 1:
        assert zero.get("allgather_bucket_size") == zero.get("reduce_bucket_size")
        # fp32 accumulation would switch bf16 to BF16_Optimizer, which ignores buckets and overlap.
        assert config.get("data_types", {}).get("grad_accum_dtype") in (None, "bf16", "fp16")
    if stage == 3:
        # Prefetch is capped by the live-parameter budget: a smaller budget would starve it.
        assert zero.get("stage3_prefetch_bucket_size", 5e7) <= zero.get("stage3_max_live_parameters", 1e9)


@pytest.mark.parametrize("kind", ["FP16_UnfusedOptimizer", "FP16_Optimizer"])
def test_the_logged_gradient_norm_is_of_the_unscaled_gradients(kind, monkeypatch):
    """DeepSpeed's unfused fp16 optimizer (the fp16 LAMB configs) reports the norm of the
    loss-scaled gradients, its fused one divides by the scale after a step that doubled it;
    unscaled_grad_norm gives the true norm for both. An engine builds FP16_Optimizer only around
    the CUDA-only FusedAdam, so the wrappers are built here directly (tests/test_fp16.py runs
    FP16_UnfusedOptimizer in a real engine)."""
    import types

    import torch
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.loss_scaler import (CONSECUTIVE_HYSTERESIS, DELAYED_SHIFT, INITIAL_LOSS_SCALE,
                                                    MIN_LOSS_SCALE, SCALE_WINDOW)
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from pipeline.engine import init_distributed, unscaled_grad_norm

    set_one_process_world(monkeypatch)
    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).half()
    wrapper = {"FP16_UnfusedOptimizer": FP16_UnfusedOptimizer, "FP16_Optimizer": FP16_Optimizer}[kind]
    optimizer = wrapper(torch.optim.SGD(model.parameters(), lr=0.0), dynamic_loss_scale=True,
                        dynamic_loss_args={INITIAL_LOSS_SCALE: 2 ** 10, SCALE_WINDOW: 1, MIN_LOSS_SCALE: 1,
                                           DELAYED_SHIFT: 1, CONSECUTIVE_HYSTERESIS: False})
    for _ in range(2):  # the second step doubles the scale (a window of 1 step without overflow)
        scale = optimizer.loss_scale_config.cur_scale
        optimizer.zero_grad()
        optimizer.backward(model(torch.randn(8, 16).half()).float().pow(2).mean())
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        true_norm = torch.linalg.vector_norm(grads) / scale
        optimizer.step()
    assert optimizer.loss_scale_config.cur_scale == 2 * scale  # the step changed the scale: the one before it counts
    reported = float(optimizer._global_grad_norm)
    engine = types.SimpleNamespace(optimizer=optimizer)
    assert float(unscaled_grad_norm(engine, reported, scale)) == pytest.approx(float(true_norm), rel=1e-3)
    # what DeepSpeed reports is off: by the scale, or by the scale's doubling
    assert reported == pytest.approx(float(true_norm) * (scale if kind == "FP16_UnfusedOptimizer" else 0.5), rel=1e-3)


class FakeFp16Engine:
    """The part of a DeepSpeed engine ScaledBackward meets: an fp16 optimizer wrapper, the
    accumulation steps, and a backward that divides the loss by them and then scales it (as a
    DeepSpeed with pull request 8393 would) or not (as 0.19.8 does without ZeRO). The real
    engine's fp16: tests/test_fp16.py."""

    def __init__(self, optimizer, accumulation: int, scales: bool):
        self.optimizer, self.accumulation, self.scales = optimizer, accumulation, scales

    def fp16_enabled(self):
        return True

    def _get_optimizer_loss_scale(self):
        return self.optimizer.loss_scale_config.cur_scale

    def gradient_accumulation_steps(self):
        return self.accumulation

    def backward(self, loss):
        loss = loss / self.accumulation
        (loss * self.optimizer.loss_scale_config.cur_scale if self.scales else loss).backward()


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("deepspeed_scales", [False, True])
def test_the_fp16_loss_is_scaled_once_whether_deepspeed_scales_it_or_not(monkeypatch, accumulation,
                                                                         deepspeed_scales):
    import torch
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from pipeline.engine import ScaledBackward, init_distributed

    set_one_process_world(monkeypatch)
    init_distributed()
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = FP16_UnfusedOptimizer(torch.optim.SGD([weight], lr=0.0), dynamic_loss_scale=True)
    backward = ScaledBackward(FakeFp16Engine(optimizer, accumulation, deepspeed_scales))

    def unscaled_gradients(scale):  # an optimizer step's gradients, divided by the scale as its step does
        optimizer.loss_scale_config.cur_scale = scale
        weight.grad = None
        for _ in range(accumulation):
            backward((weight * 2).sum())
        return weight.grad / scale

    assert backward.repair is None
    # at a scale of 1 scaled and unscaled are alike: nothing to tell, nothing decided
    assert torch.equal(unscaled_gradients(1.0), torch.full((3,), 2.0)) and backward.repair is None
    for scale in (2.0 ** 16, 2.0 ** 15):  # the first step decides, and the next goes on with it
        assert torch.equal(unscaled_gradients(scale), torch.full((3,), 2.0))
        assert backward.repair is (not deepspeed_scales)


GPU_CONFIGS = [name for name in CONFIGS if name.startswith("gpu_")]


@pytest.mark.parametrize("name", [pytest.param(name, marks=[needs_fp16] if "fp16" in name else [])
                                  for name in GPU_CONFIGS])
def test_every_shipped_gpu_file_trains_on_the_cpu_with_torch_adamw(name, data_dir, tmp_path, monkeypatch):
    """Everything in a GPU file but its CUDA-only fused optimizer (ZeRO stage and buckets,
    overlap_comm, ZeRO-3's prefetch and persistence, bf16 without the overflow check, fp16's
    scaler) runs in a real engine here, so a slip in a file shows before a GPU is at hand.
    tests/test_gpu.py runs the files as they are."""
    from pipeline.trainer import Trainer

    from .test_pretrain import config

    set_one_process_world(monkeypatch)
    shipped = json.load(open(os.path.join(DS_DIR, name)))
    path = tmp_path / name
    path.write_text(json.dumps({**shipped, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    trainer = Trainer(config(data_dir, tmp_path / "run", steps=16, warmup_steps=2, ds_config=str(path)))
    assert trainer.engine.zero_optimization_stage() == shipped["zero_optimization"]["stage"]
    assert trainer.engine.fp16_enabled() == ("fp16" in shipped)
    losses = []
    assert trainer.train(on_step=lambda t, m: losses.append((m.mlm_loss, m.applied))) == 0
    assert all(applied for _, applied in losses)  # at a scale of 2^16, this model's gradients do not overflow
    assert np.mean([loss for loss, _ in losses[-4:]]) < np.mean([loss for loss, _ in losses[:4]]) - 0.3
