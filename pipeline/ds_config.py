"""DeepSpeed JSON configs: engine settings from a file, batch and optimizer values injected.

A file in ``ds_configs/`` says *how* the engine runs (ZeRO stage, precision, optimizer
type, offload). The trainer's own config says *what* it trains with (global batch,
micro batch, learning rate, weight decay, clipping); those values are injected here,
in one place. A value has one home: a file that also sets an injected value is refused
with a message that names the key and the flag that owns it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re

# The bundled configs: the repository's top-level ds_configs/, which an installed wheel
# ships as pipeline/ds_configs/ (pyproject's package-dir), so the defaults need no checkout.
_HERE = os.path.dirname(os.path.abspath(__file__))
_INSTALLED, _CHECKOUT = os.path.join(_HERE, "ds_configs"), os.path.join(os.path.dirname(_HERE), "ds_configs")
DS_CONFIG_DIR = _INSTALLED if os.path.isdir(_INSTALLED) else _CHECKOUT
DEFAULT_DS_CONFIG = os.path.join(DS_CONFIG_DIR, "cpu_fp32_zero2_torch-adamw.json")

# DeepSpeed key (dotted path) → the trainer flag that owns it.
INJECTED_KEYS = {
    "train_batch_size": "--global-batch-size",
    "train_micro_batch_size_per_gpu": "--micro-batch-size",
    "gradient_accumulation_steps": "--global-batch-size / --micro-batch-size",
    "gradient_clipping": "--grad-clip",
    "optimizer.params.lr": "--learning-rate",
    "optimizer.params.weight_decay": "--weight-decay",
    # The schedule is built by the trainer (linear warmup + decay), not by DeepSpeed.
    "scheduler": "--warmup-steps / --steps",
}


# The oldest DeepSpeed whose ZeRO gradient norm is inf when a gradient is not finite, tested with
# bf16's check_grad_overflow off (tests/test_pretrain.py); older combining code could turn the
# invalid-norm marker (-1) into a finite norm, and the trainer would apply NaN gradients unseen.
UNCHECKED_BF16_MIN_DEEPSPEED = (0, 19, 8)


class DsConfigError(ValueError):
    """A DeepSpeed config or batch setting that cannot work; the message says which."""


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    accumulation_steps: int


def plan_batches(global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
    """global = micro × world × accumulation, exactly, or a loud error."""
    per_step = micro_batch_size * world_size
    if global_batch_size <= 0 or micro_batch_size <= 0:
        raise DsConfigError("--global-batch-size and --micro-batch-size must be positive")
    if global_batch_size % per_step:
        lower = max(per_step, global_batch_size // per_step * per_step)
        sizes = f"{lower} or {lower + per_step}"
        if global_batch_size % world_size:
            # A resume keeps its global batch (the data position counts global batches): there the
            # number of processes is what can change, to one that divides it.
            fit = [d for d in range(1, global_batch_size // micro_batch_size + 1)
                   if global_batch_size % (micro_batch_size * d) == 0]  # with this micro-batch
            worlds = [d for d in fit if d < world_size][-1:] + [d for d in fit if d > world_size][:1]
            fix = f"use {sizes} (a multiple of the {world_size} processes)"
            if worlds:
                fix += (f", or run {global_batch_size} on {' or '.join(map(str, worlds))} processes (a resume "
                        "keeps its global batch)")
        else:  # e.g. fine-tuning's batch of 32 on 8 GPUs: a smaller micro-batch keeps the recipe's batch
            per_process = global_batch_size // world_size
            micro = max(d for d in range(1, min(micro_batch_size, per_process) + 1) if per_process % d == 0)
            fix = (f"use --micro-batch-size {micro} ({per_process // micro} accumulation step"
                   f"{'s' if per_process // micro > 1 else ''}), or --global-batch-size {sizes}")
        raise DsConfigError(f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size "
                            f"{micro_batch_size} x {world_size} processes = {per_step}; {fix}")
    return BatchPlan(global_batch_size, micro_batch_size, world_size, global_batch_size // per_step)


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resolve(path: str) -> str:
    """``path`` itself if it exists; else, for a bundled config named as the docs do
    (``ds_configs/NAME.json`` or ``NAME.json``), the bundled file, from any directory."""
    if os.path.exists(path) or os.path.dirname(os.path.normpath(path)) not in ("", "ds_configs"):
        return path
    bundled = os.path.join(DS_CONFIG_DIR, os.path.basename(path))
    return bundled if os.path.isfile(bundled) else path


def load_ds_config(path: str) -> dict:
    try:
        with open(resolve(path)) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise DsConfigError(f"--ds-config {path}: no such file (see ds_configs/README.md)") from None
    except json.JSONDecodeError as err:
        raise DsConfigError(f"--ds-config {path}: not valid JSON ({err})") from None
    for key, flag in INJECTED_KEYS.items():
        if _get(config, key) is not None:
            raise DsConfigError(f"--ds-config {path} sets {key!r}, which comes from {flag}: "
                                "remove it from the file (a value has one home)")
    _check_unchecked_bf16(config, path)
    return config


def precision(config: dict) -> str:
    """bf16, fp16 or fp32: what the file turns on, as DeepSpeed reads it ("enabled": "auto" is off)."""
    for name, section in (("bf16", config.get("bf16", config.get("bfloat16"))), ("fp16", config.get("fp16"))):
        if isinstance(section, dict) and section.get("enabled") is True:
            return name
    return "fp32"


def _check_unchecked_bf16(config: dict, path: str) -> None:
    """bf16 without DeepSpeed's overflow check relies on the gradient norm to see NaN gradients."""
    bf16 = config.get("bf16", config.get("bfloat16", {}))
    if not isinstance(bf16, dict) or bf16.get("check_grad_overflow", True):
        return
    from importlib import metadata

    try:
        version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return  # nothing can run without it; the import says so
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if numbers < UNCHECKED_BF16_MIN_DEEPSPEED:
        want = ".".join(map(str, UNCHECKED_BF16_MIN_DEEPSPEED))
        raise DsConfigError(f"--ds-config {path} sets bf16.check_grad_overflow false, which needs DeepSpeed >= "
                            f"{want} to report NaN gradients (installed: {version}); upgrade DeepSpeed or remove "
                            "the key")


def inject(config: dict, batches: BatchPlan, learning_rate: float, weight_decay: float,
           grad_clip: float) -> dict:
    """The complete DeepSpeed config: the file's engine settings + the trainer's values."""
    out = copy.deepcopy(config)
    out["train_batch_size"] = batches.global_batch_size
    out["train_micro_batch_size_per_gpu"] = batches.micro_batch_size
    out["gradient_accumulation_steps"] = batches.accumulation_steps
    out["gradient_clipping"] = grad_clip
    optimizer = out.setdefault("optimizer", {"type": "AdamW"})
    optimizer.setdefault("params", {}).update(lr=learning_rate, weight_decay=weight_decay)
    # DeepSpeed's throughput timer is on by default and, given no dataloader, brackets every
    # micro-batch with two device-wide synchronizations: the host waits for the GPU to drain
    # before each forward and after each step, so the GPU idles while the next kernels launch.
    # The trainers time themselves; a file that wants the timer sets "timers" itself.
    out.setdefault("timers", {"throughput": {"enabled": False}})
    return out
