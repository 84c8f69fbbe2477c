"""The DeepSpeed engine that pretraining and fine-tuning share.

Its settings (``EngineConfig``: DeepSpeed config file, batch sizes, optimizer values, seed),
the launch environment, the engine with its optimizer parameter groups and linear
warmup/decay schedule, and the one all-reduce that makes the ranks agree. Each stage keeps
its own defaults for the settings whose good values differ (``TrainConfig``/``FinetuneConfig``
hold an ``EngineConfig`` built from them); the rest default here.

``pipeline/ds_config.py`` stays its own module: it reads and checks DeepSpeed JSON without
importing torch or DeepSpeed, and the checkpoint code plans resumes with it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import math
import os
import shutil
import signal
import sys

from pipeline.ds_config import DEFAULT_DS_CONFIG, BatchPlan, inject, load_ds_config, plan_batches


# Batches are padded to a multiple of this many tokens (tensor-core friendly, fewer shapes),
# in both stages' loaders.
PAD_MULTIPLE = 8


class EngineConfigError(ValueError):
    """A bad flag value; the message names the flag."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    # No default: the stages' differ (see each stage's ENGINE_DEFAULTS).
    micro_batch_size: int
    learning_rate: float
    ds_config: str = DEFAULT_DS_CONFIG
    global_batch_size: int = 32
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 42
    dist_timeout_minutes: float = 10.0

    def __post_init__(self):
        # inf passes a comparison: an infinite rate made every weight inf in one update, under a finite loss
        checks = [
            (0 < self.learning_rate < math.inf, f"--learning-rate must be a finite number > 0, got {self.learning_rate}"),
            (0 <= self.weight_decay < math.inf,
             f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}"),
            (0 < self.dist_timeout_minutes < math.inf,
             f"--dist-timeout-minutes must be a finite number > 0, got {self.dist_timeout_minutes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EngineConfigError(message)

    def batches(self, world_size: int) -> BatchPlan:
        return plan_batches(self.global_batch_size, self.micro_batch_size, world_size)

    def deepspeed_config(self, batches: BatchPlan) -> dict:
        """The complete DeepSpeed config: --ds-config's engine settings + these values."""
        return inject(load_ds_config(self.ds_config), batches, self.learning_rate, self.weight_decay,
                      self.grad_clip)


ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def nest(values: dict, stage_defaults: dict) -> dict:
    """A stage config's keyword arguments from flat ones (argparse's, or a test's): the engine's
    settings gathered into one EngineConfig, over the stage's own ``stage_defaults``."""
    engine = {k: values[k] for k in ENGINE_FIELDS if k in values}
    rest = {k: v for k, v in values.items() if k not in ENGINE_FIELDS}
    return {**rest, "engine": EngineConfig(**{**stage_defaults, **engine})}


def flat(config) -> dict:
    """A stage config as one flat dict, the engine's settings beside the stage's: the flat keys
    of train_config.json and the MLflow params."""
    values = dataclasses.asdict(config)
    engine = values.pop("engine")
    return {**values, **engine}


def add_engine_flags(group, engine: EngineConfig, seed_help: str | None = None) -> None:
    """The engine's flags, declared once for both stages, with a stage's defaults (``engine``)."""
    group.add_argument("--ds-config", default=engine.ds_config,
                       help="DeepSpeed engine settings (see ds_configs/README.md)")
    group.add_argument("--global-batch-size", type=int, default=engine.global_batch_size,
                       help="sequences per optimizer step, over all processes")
    group.add_argument("--micro-batch-size", type=int, default=engine.micro_batch_size,
                       help="sequences per process per forward pass; accumulation makes up the rest")
    group.add_argument("--learning-rate", type=float, default=engine.learning_rate, help="peak learning rate")
    group.add_argument("--weight-decay", type=float, default=engine.weight_decay,
                       help="AdamW/LAMB weight decay (never on biases and LayerNorm weights)")
    group.add_argument("--grad-clip", type=float, default=engine.grad_clip, help="gradient norm clipping (0 = off)")
    group.add_argument("--seed", type=int, default=engine.seed, help=seed_help)
    group.add_argument("--dist-timeout-minutes", type=float, default=engine.dist_timeout_minutes,
                       help="how long a rank waits in a collective (all-reduce, barrier) for the others before it "
                            "fails: the last resort when a rank hangs without exiting, or a node is lost with no "
                            "launcher to end the rest (a rank that exits is noticed in seconds). It must exceed the "
                            "longest wait a healthy run has: one rank's checkpoint write or export, a first-run op "
                            "build (10 = DeepSpeed's default). A resume's conversion to another number of "
                            "processes is waited for up to 60 minutes, or this if longer")


def add_launcher_flag(parser: argparse.ArgumentParser) -> None:
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the
    # same, and ensure_distributed_env reads that.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)


def parse_stage_flags(parser: argparse.ArgumentParser, argv, config_class):
    """``config_class.from_flat`` of the parsed flags; a bad value exits with the parser's one-line error."""
    values = vars(parser.parse_args(argv))
    values.pop("local_rank")
    try:
        return config_class.from_flat(**values)
    except EngineConfigError as err:
        parser.error(str(err))
        raise


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot give one rank per GPU; says how to launch."""


# What launchers that do not set WORLD_SIZE set instead: MPI (mpirun, the deepspeed launcher's
# openmpi/mvapich modes, srun --mpi) and a bare srun of several tasks (srun python pipeline/pretrain.py).
MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def ensure_distributed_env(slurm_script: str | None = None) -> tuple[int, int, int]:
    """(rank, local rank, world size); a plain ``python`` run becomes a 1-process world.

    DeepSpeed otherwise tries MPI discovery and fails without mpi4py. A 1-process world's
    rendezvous port is a free one, so two plain runs on one machine (or one beside a
    torchrun job on the default 29500) do not collide. Refused (LaunchError), before anything
    is read: several processes started by MPI without WORLD_SIZE, each of which would train
    alone as rank 0 into the same run dir (``slurm_script``: the stage's own, named as a way out);
    and a LOCAL_RANK with no GPU of that number.
    """
    if "WORLD_SIZE" not in os.environ:
        for name in MPI_WORLD_SIZE:
            value = os.environ.get(name, "")
            if value.isdigit() and int(value) > 1:
                launchers = "torchrun, the deepspeed launcher's default mode" + (f" or {slurm_script}"
                                                                                 if slurm_script else "")
                raise LaunchError(f"one of {value} processes ({name}={value}) without WORLD_SIZE: each would "
                                  f"run alone as rank 0 of 1, into the same output; launch with {launchers}, "
                                  "which set RANK, LOCAL_RANK and WORLD_SIZE")
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = int(os.environ["LOCAL_RANK"])
    check_gpu_for(local_rank)
    return int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"])


def check_gpu_for(local_rank: int) -> None:
    """Each rank takes the GPU numbered by its LOCAL_RANK (DeepSpeed's set_device): a rank that sees
    fewer GPUs (a scheduler that binds one GPU to each task shows it as GPU 0 to every rank) fails
    here, naming the setting, not later with CUDA's "invalid device ordinal"."""
    import torch

    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda" or not torch.cuda.is_available():
        return  # ranks on the CPU (or another accelerator) beside a GPU take none
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise LaunchError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): the ranks of a node must each see "
                          "all its GPUs, one rank per GPU (under SLURM: no --gpus-per-task or --gpu-bind that "
                          "gives each task its own)")


def _without_shm_build() -> None:
    """On the CPU, DeepSpeed compiles a shared-memory all-reduce (``deepspeed_shm_comm``) at its
    first start: a C++ compiler is needed, and 30-100 s go by. One process has nothing to reduce,
    so it is not built then; nor where there is no compiler (a slim image), which failed with a
    traceback from the build: several processes all-reduce through gloo there instead."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    compiler = os.environ.get("CXX", "c++")
    if several and shutil.which(compiler):
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if several and os.environ.get("RANK", "0") == "0":
        logging.getLogger(__name__).warning(
            "no C++ compiler (%s): DeepSpeed's shared-memory all-reduce is not built, and the CPU processes "
            "all-reduce through gloo, more slowly (install one, e.g. build-essential, for it)", compiler)


def init_distributed(timeout_minutes: float | None = None) -> None:
    """The process group, before ``initialize``, which would otherwise create it with DeepSpeed's
    default timeout; the timeout bounds how long a rank waits in a collective for a peer that
    hangs without exiting."""
    import deepspeed

    _without_shm_build()
    if timeout_minutes is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))


@contextlib.contextmanager
def waiting_longer(minutes: float, then_minutes: float):
    """The process group's collectives started inside wait up to ``minutes`` for a peer, and
    ``then_minutes`` (--dist-timeout-minutes) again after: for one rank's long, known piece of
    work that the others wait on, without slowing the detection of a hung rank for the whole run.
    torch sets it on gloo and NCCL groups only; on another backend it warns and nothing changes."""
    from torch.distributed import distributed_c10d

    distributed_c10d._set_pg_timeout(datetime.timedelta(minutes=minutes))
    try:
        yield
    finally:
        distributed_c10d._set_pg_timeout(datetime.timedelta(minutes=then_minutes))


def end_distributed() -> None:
    """This process's part in the process group ends here, after a successful run, while the
    interpreter is still whole (what torchtitan does at a clean exit). Left to the interpreter's
    teardown, gloo's worker threads can abort the process ("terminate called without an active
    exception"): a rank that finished its work exits -6, and the launcher then kills a peer still
    writing the model. Local to each rank, no collective: nobody waits for rank 0's export. Not
    after a failure, where a peer may still be inside a collective."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def zero0_masters(optimizer) -> dict:
    """{id(16-bit parameter): its fp32 master} of DeepSpeed's mixed-precision optimizers without
    ZeRO, used for fp16 and, in DeepSpeed 0.19, for bf16 without ZeRO. Empty for any other
    optimizer: ZeRO's masters are reached with deepspeed.utils.safe_get_full_fp32_param."""
    groups = getattr(optimizer, "fp16_groups", None)
    return {} if groups is None else masters_by_param(groups, vars(optimizer))


def masters_by_param(groups: list, state) -> dict:
    """{id(parameter): its fp32 master}, ``groups`` the optimizer's parameter groups (lists of
    parameters) and ``state`` what holds the masters in the same order, an fp16 optimizer wrapper's
    attributes or its saved state: ``fp32_groups`` (FP16_UnfusedOptimizer, as with LAMB or a torch
    optimizer: a tensor per parameter) or ``fp32_groups_flat`` (FP16_Optimizer: one flat tensor
    per group). Empty when ``state`` holds neither; a ValueError when the sizes disagree."""
    if "fp32_groups" in state:
        masters = [list(group) for group in state["fp32_groups"]]
    elif "fp32_groups_flat" in state:
        flats, sizes = state["fp32_groups_flat"], [sum(p.numel() for p in group) for group in groups]
        if [flat.numel() for flat in flats] != sizes:
            raise ValueError(f"its fp32 master weights hold {[flat.numel() for flat in flats]} values a "
                             f"parameter group, the model {sizes}")
        masters = [list(flat.split([p.numel() for p in group])) for flat, group in zip(flats, groups)]
    else:
        return {}
    if [len(m) for m in masters] != [len(g) for g in groups]:
        raise ValueError(f"its fp32 master weights come in groups of {[len(m) for m in masters]} tensors, the "
                         f"model's parameter groups have {[len(g) for g in groups]}")
    by_id = {}
    for group, group_masters in zip(groups, masters):
        for p, master in zip(group, group_masters):
            if master.numel() != p.numel():
                raise ValueError(f"an fp32 master weight of {master.numel()} values for a parameter of shape "
                                 f"{tuple(p.shape)}")
            by_id[id(p)] = master.view(p.shape)
    return by_id


def linear_warmup_decay(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return factor


def initialize(model, config: EngineConfig, ds_config: dict, steps: int, warmup: int):
    """(engine, optimizer, scheduler): weight decay on the matrices only (pipeline/param_groups.py),
    and the learning rate warmed up linearly over ``warmup`` steps, then decayed to 0 at ``steps``."""
    import warnings

    import deepspeed
    import torch

    from pipeline.param_groups import weight_decay_groups

    # DeepSpeed's ZeRO calls torch.distributed collectives that torch 2.13 deprecates, and torch warns
    # on every rank's first call of each: lines a user can do nothing about.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                              r"is deprecated", category=FutureWarning)
    schedule = linear_warmup_decay(steps, warmup)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=weight_decay_groups(model, config.weight_decay, ds_config), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    warning = full_precision_on_gpu(engine, config.ds_config)
    if warning and engine.global_rank == 0:
        logging.getLogger(__name__).warning(warning)
    return engine, optimizer, scheduler


def full_precision_on_gpu(engine, path: str, device_type: str | None = None) -> str | None:
    """A warning when a GPU trains in fp32: the default file is a CPU one, and forgetting
    --ds-config on a GPU node would otherwise only show as a run several times slower. Read
    from the engine, as DeepSpeed parsed the file ("enabled": "auto" is off to it, for one).
    ``device_type``: the engine's, unless given."""
    if device_type is None:
        device_type = getattr(engine.device, "type", engine.device)
    if device_type != "cuda" or engine.fp16_enabled() or engine.bfloat16_enabled() or engine.torch_autocast_enabled():
        return None
    return (f"--ds-config {path} enables neither bf16 nor fp16, so this GPU computes in fp32, several times "
            "slower than a ds_configs/gpu_*.json file (ds_configs/README.md)")


class ScaledBackward:
    """``engine.backward(loss)`` with the fp16 loss scaled, also where DeepSpeed forgets to.

    DeepSpeed 0.19.8's ``engine.backward`` multiplies an fp16 loss by the loss scale under ZeRO
    only (its ZeRO optimizers' ``scale_if_loss``). Without ZeRO (FP16_UnfusedOptimizer, the fp16
    LAMB configs' wrapper; FP16_Optimizer around FusedAdam) it calls ``loss.backward()`` unscaled, while
    the step still divides the gradients by the scale: updates 65,536 times too small, and
    fp16 gradients left to underflow (DeepSpeed pull request 8393, open in 0.19.8). Whether the
    installed DeepSpeed scales is read once, from the gradient that reaches the loss in the first
    backward with a scale above 1 (the scale over the accumulation steps if it scales, their
    inverse if not: one host read); where it does not, that backward's gradient and every later
    loss are multiplied by the scale, in fp32, as DeepSpeed's own fp16 wrappers do."""

    def __init__(self, engine):
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        self.engine = engine
        # None: not known yet; True: DeepSpeed leaves the loss unscaled, so it is scaled here;
        # False: DeepSpeed scales it (under ZeRO), or nothing is scaled (fp32, bf16)
        wrapped = isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer))  # bf16's too, in 0.19.8
        self.repair = None if wrapped and engine.fp16_enabled() else False

    def __call__(self, loss) -> None:
        scale = loss_scale(self.engine) if self.repair is not False else None
        if not scale or scale == 1:  # nothing to repair, or nothing to tell the two apart by
            self.engine.backward(loss)
        elif self.repair:
            self.engine.backward(loss.float() * scale)
        else:
            loss = loss.float()
            loss.register_hook(lambda grad: self._probe(grad, scale))
            self.engine.backward(loss)

    def _probe(self, grad, scale: float):
        # DeepSpeed divides the loss by the accumulation steps, then scales it or not.
        unscaled = 1.0 / self.engine.gradient_accumulation_steps()
        self.repair = abs(grad.item() - unscaled) < abs(grad.item() - unscaled * scale)
        if self.repair:
            logging.getLogger(__name__).info("this DeepSpeed does not scale an fp16 loss without ZeRO (its step "
                                             "divides the gradients by the loss scale all the same): scaling it here")
            return grad * scale
        return grad


# Skipped updates in a row, whatever the loss, before a run is declared broken: fp16's scaler
# halves its scale on each overflow (2^16 reaches the usual minimum of 1 within 20 skips), and an
# optimizer still overflowing at its minimum scale skips every update from then on (DeepSpeed's
# fp16 optimizers without ZeRO, of the LAMB configs, do not raise there), the loss still finite.
MAX_SKIPPED_UPDATES = 100


class LossScaleFloor(FloatingPointError):
    """fp16 gradients overflowed at the minimum loss scale, where DeepSpeed's ZeRO optimizers raise
    (a bare Exception; the wrapper without ZeRO skips updates instead). Raised on every rank at the
    same step: ZeRO agrees on the overflow across ranks."""


def optimizer_step(engine) -> None:
    """``engine.step()``, with DeepSpeed's bare Exception at the fp16 loss scale's floor made a
    LossScaleFloor, which the trainers report in one line."""
    try:
        engine.step()
    except Exception as err:
        if "loss scale already at minimum" not in str(err):  # DeepSpeed's DynamicLossScaler.update_scale
            raise
        raise LossScaleFloor(f"fp16 gradients overflow even at the minimum loss scale ({loss_scale(engine):g})") from err


def loss_scale(engine) -> float | None:
    """The fp16 loss scale (None without fp16): DeepSpeed has no public accessor for it."""
    return engine._get_optimizer_loss_scale() if engine.fp16_enabled() else None


def keeps_no_grad_norm(engine) -> bool:
    """ZeRO-0 without fp16, bf16 or autocast steps the plain optimizer, which keeps no gradient
    norm (``get_global_grad_norm`` is None): the trainers compute it then (``gradient_norm``).
    Decided from the configuration: a None for another reason (a ZeRO setting that skips the
    norm, autocast's scaled gradients) must not swap in a norm of scaled gradients."""
    return (engine.zero_optimization_stage() == 0 and not engine.fp16_enabled() and not engine.bfloat16_enabled()
            and not engine.torch_autocast_enabled())


def gradient_norm(parameters):
    """The L2 norm of the gradients (torch's clip_grad_norm_ computes it so), a device tensor: no host wait."""
    import torch

    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def unscaled_grad_norm(engine, norm, scale: float | None):
    """DeepSpeed's reported gradient norm (``get_global_grad_norm``) made the true gradients' norm.

    ``scale``: the loss scale the step's gradients carried, read before the step. ZeRO divides the
    norm by it. Without ZeRO, DeepSpeed 0.19.8's fp16 wrappers do not: FP16_UnfusedOptimizer (around a
    non-fused optimizer, as in the fp16 LAMB configs) reports the scaled gradients' norm (its
    unfused_optimizer.py: "norm is in fact norm*scale"), and FP16_Optimizer divides by the scale as
    the step left it, twice the right one at each step that raises the scale."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if norm is None or not scale or not isinstance(optimizer, (FP16_UnfusedOptimizer, FP16_Optimizer)):
        return norm
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return norm / scale
    return norm * (optimizer.loss_scale_config.cur_scale / scale)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM's time limit, scancel, preemption) or Ctrl-C on any rank; the ranks
    agree on it through ``agree`` at a step boundary and stop together. Raising from the handler
    instead would stop a rank wherever it is, while a peer blocked in a collective never runs its
    own handler, and a second signal (SLURM sends several) would interrupt the clean-up."""

    def __init__(self, action: str):
        self.action, self.requested, self.signum = action, False, 0  # signum: the first signal's
        self.terminated = False  # a SIGTERM came, whatever came first
        self.interrupts = 0  # Ctrl-Cs so far
        self._before = signal.default_int_handler

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        # Ctrl-C: the same stop at a step boundary (before: a KeyboardInterrupt wherever the rank
        # was, a traceback, no checkpoint); a second Ctrl-C stops at once.
        current = signal.getsignal(signal.SIGINT)  # Python's, or an earlier run's in this process
        if current is signal.default_int_handler or isinstance(getattr(current, "__self__", None), StopFlag):
            self._before = signal.default_int_handler
            signal.signal(signal.SIGINT, self._interrupt)

    def uninstall_interrupt(self) -> None:
        """Ctrl-C back to Python's KeyboardInterrupt once steps are over (the export, a test pass):
        with no step boundary left to stop at, the first press would only be logged."""
        if signal.getsignal(signal.SIGINT) == self._interrupt:
            signal.signal(signal.SIGINT, self._before)

    @contextlib.contextmanager
    def killable(self):
        """The rendezvous, where SIGTERM ends the rank: at once while it waits (its default action),
        and on entry if one came during start-up. A launcher sends SIGTERM to a rank's peers when
        the rank fails before they meet (refused by the run dir's lock, no tracking server);
        waiting there for it, inside C++ where a Python handler never runs, they lived on until
        the launcher's SIGKILL (torchrun's 30 s, srun's KillWait) and the job ended 137. Nothing is
        trained yet, so nothing is lost; SIGUSR1 (a time limit's warning) is still honoured at the
        first step."""
        if self.terminated or self.interrupts:
            # A Ctrl-C during start-up (to fix a flag, say) ends the run here, before a first step's
            # checkpoint would pin the flags a rerun may change.
            name = "SIGTERM" if self.terminated else "Ctrl-C"
            print(f"error: stopped by {name} before the ranks met: nothing to checkpoint", file=sys.stderr)
            exit_now(128 + (signal.SIGTERM if self.terminated else signal.SIGINT))
        interrupt = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if interrupt == self._interrupt:  # Ctrl-C too, unless it was ignored (a background job)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, interrupt)

    def _handle(self, signum, frame) -> None:
        logging.getLogger(__name__).warning("received signal %d: %s", signum, self.action)
        self.requested, self.signum = True, self.signum or signum
        self.terminated = self.terminated or signum == signal.SIGTERM

    def _interrupt(self, signum, frame) -> None:
        self.interrupts += 1
        if self.interrupts > 1:  # the second Ctrl-C
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        logging.getLogger(__name__).warning("Ctrl-C: %s (Ctrl-C again stops at once, without it)", self.action)
        self.requested, self.signum = True, self.signum or signum


def exit_now(code: int) -> None:
    """Ends the process with ``code`` without the interpreter's teardown (7-16 s measured on 2 busy
    cores, and C++ destructors may wait on peers): a failed rank's peers and launcher learn of it
    when the process ends, and after a stop every rank must exit together, since srun
    --kill-on-bad-exit=1 kills a rank still tearing down KillWait seconds after the first exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def unlike_rank0(value: int, rank: int, world_size: int, device="cpu") -> tuple[int, list[int]]:
    """Rank 0's ``value`` (an int64) and the ranks whose own differs from it: one all-reduce,
    which every rank must call (ranks that must have read the same thing compare it)."""
    import torch

    seen = torch.zeros(world_size, dtype=torch.int64, device=device)  # NCCL reduces GPU tensors only
    seen[rank] = value
    torch.distributed.all_reduce(seen)
    seen = seen.tolist()
    return seen[0], [r for r, mine in enumerate(seen) if mine != seen[0]]


def named_ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


def agree(flags: list[float], world_size: int, device="cpu") -> list[float]:
    """Each value's maximum over the ranks, so a flag is set if it is set on any rank: one
    all-reduce, which every rank must call."""
    if world_size == 1:
        return [float(f) for f in flags]
    import torch

    values = torch.tensor([float(f) for f in flags], device=device)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values.tolist()
