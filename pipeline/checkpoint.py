"""Checkpoints that a crash can never leave half-valid.

DeepSpeed writes the engine state (model, optimizer, ZeRO partitions) of a tag; we add
the trainer state (step, data position, RNG states) as DeepSpeed's client state. A tag
counts as complete only once every rank has finished writing it and rank 0 has put a
``COMPLETE`` marker in it; only then does ``latest`` move to it, by an atomic rename.
A process killed mid-save leaves a tag without a marker, which resume ignores.

A tag resumes on another number of processes too (``plan_resume``): ZeRO-0 files hold whole
tensors and load as they are; ZeRO-1/2/3 partitions are regrouped through DeepSpeed's universal
checkpoint, converted once into a sibling folder ``<tag>.universal``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import json
import os
import random
import shutil

import numpy as np
import torch

from pipeline.ds_config import DsConfigError

LATEST = "latest"
COMPLETE = "COMPLETE"
UNIVERSAL = ".universal"  # suffix of a tag's universal copy; "step…" without a marker, so prune removes it


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    """This process's generators. On a GPU, dropout draws from the device's generator, so
    its state is saved too (the rank's current device), or a resumed run's masks differ."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save(engine, directory: str, step: int, client_state: dict, keep: int, is_rank0: bool,
         meta: dict | None = None) -> str:
    """Saves tag ``step…`` on every rank, then marks it complete and points ``latest`` at it.

    ``meta`` (small, JSON) goes into the marker, readable without loading the checkpoint.
    """
    tag = tag_for(step)
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
    if os.environ.get("BERT_PIPELINE_FAULT") == f"kill-during-save:{step}":
        # Fault injection for the crash test: die like `kill -9` with the files written
        # but the tag not yet marked complete.
        os.kill(os.getpid(), 9)
    _barrier()  # every rank's shards are on disk before the tag is declared complete
    if is_rank0:
        with open(os.path.join(directory, tag, COMPLETE), "w") as f:
            json.dump({"tag": tag, "step": step, **(meta or {})}, f)
        temp = os.path.join(directory, f".{LATEST}.tmp")
        with open(temp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, os.path.join(directory, LATEST))
        prune(directory, keep)
    _barrier()
    return tag


def complete_tags(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(t for t in os.listdir(directory)
                  if t.startswith("step") and os.path.exists(os.path.join(directory, t, COMPLETE)))


def find_latest(directory: str) -> str | None:
    """The newest complete tag: ``latest`` if its tag is complete, else the newest marked one."""
    tags = complete_tags(directory)
    pointer = os.path.join(directory, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            tag = f.read().strip()
        if tag in tags:
            return tag
    return tags[-1] if tags else None


def prune(directory: str, keep: int) -> None:
    """Keeps the newest ``keep`` complete tags; removes older ones and abandoned partial saves."""
    tags = complete_tags(directory)
    newest = tags[-1] if tags else None
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not name.startswith("step") or not os.path.isdir(path) or name == newest:
            continue
        stale_partial = name not in tags and newest is not None and name < newest
        if name in tags[:-keep] or stale_partial:
            shutil.rmtree(path, ignore_errors=True)


def read_meta(directory: str, tag: str) -> dict:
    with open(os.path.join(directory, tag, COMPLETE)) as f:
        return json.load(f)


def load(engine, directory: str, tag: str) -> dict:
    _, client_state = engine.load_checkpoint(directory, tag=tag)
    if client_state is None:
        raise RuntimeError(f"{directory}/{tag}: DeepSpeed could not load this checkpoint")
    if tag.endswith(UNIVERSAL) and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine, os.path.join(directory, tag))
    return client_state


def _repair_zero3_universal_load(engine, folder: str) -> None:
    """Undoes two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3), each measured on the loss of the steps
    after a resume:

    - every parameter group gets the first group's hyper-parameters, so the biases and LayerNorms
      would take the matrices' weight decay: each group's own come back from the checkpoint;
    - every group's Adam state gets the same ``step`` tensor, which each group's update then
      increments, so the bias correction runs ahead (a 2e-3 loss drift within 3 steps): each
      group gets its own copy.
    """
    saved = torch.load(os.path.join(folder, "zero", "optimizer_state.pt"), map_location="cpu",
                       weights_only=False, mmap=True)["param_groups"]
    optimizer = engine.optimizer.optimizer
    if len(saved) != len(optimizer.param_groups):
        raise RuntimeError(f"{folder}: {len(saved)} optimizer parameter groups saved, "
                           f"{len(optimizer.param_groups)} now")
    for group, values in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in values.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# -- resuming on another number of processes


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    tag: str
    saved_world_size: int | None  # None: not recorded and not needed (no ZeRO partitions)
    world_size: int
    universal: bool  # ZeRO partitions regrouped through a universal checkpoint

    @property
    def same_world(self) -> bool:
        return self.saved_world_size in (None, self.world_size)


def processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _partition_files(directory: str, tag: str) -> list[str]:
    # ZeRO-1/2/3 optimizer partitions, one per data-parallel rank (bf16_… under the BF16 optimizer)
    return glob.glob(os.path.join(directory, tag, "*zero_pp_rank_*_mp_rank_*_optim_states.pt"))


def _zero_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def plan_resume(directory: str, tag: str, world_size: int, ds_config: dict, ds_config_path: str,
                global_batch_size: int) -> ResumePlan:
    """How ``tag`` loads on ``world_size`` processes with ``ds_config`` (read from ``ds_config_path``),
    decided from its files before any engine exists (the universal load is an engine setting).
    DsConfigError, naming the checkpoint and both world sizes, where it cannot."""
    meta = read_meta(directory, tag)
    partitions = _partition_files(directory, tag)
    saved = meta.get("world_size") or len(partitions) or None  # older tags: one partition per rank
    plan = ResumePlan(tag, saved, world_size, universal=bool(partitions) and saved != world_size)
    if plan.same_world:
        return plan
    where = f"{directory}/{tag} was saved by {processes(saved)}, this run has {world_size}"
    saved_batch = meta.get("global_batch_size", global_batch_size)
    if saved_batch != global_batch_size:
        # The data position carries over as a count of global batches; only the same global batch
        # continues the same order (the accumulation steps are what changes).
        raise DsConfigError(f"{where}: keep --global-batch-size {saved_batch} when changing the number of "
                            "processes")
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    if offload == "nvme":
        # DeepSpeed keeps NVMe-offloaded optimizer state in one folder per rank and restores it only as is.
        raise DsConfigError(f"{where}: with --ds-config {ds_config_path} (ZeRO's NVMe optimizer offload) it "
                            f"resumes only on {processes(saved)}")
    if plan.universal and _zero_stage(ds_config) == 0:
        # A universal checkpoint restores weights through the ZeRO optimizer; without ZeRO nothing would load.
        raise DsConfigError(f"{where}: its ZeRO partitions regroup only into a ZeRO-1/2/3 run, but "
                            f"--ds-config {ds_config_path} is ZeRO-0; resume with the config it was saved with")
    return plan


def universal_load_config(ds_config: dict) -> dict:
    """``ds_config`` that makes engine.load_checkpoint read a universal checkpoint."""
    return {**ds_config, "checkpoint": {**(ds_config.get("checkpoint") or {}), "load_universal": True}}


def to_universal(directory: str, tag: str) -> str:
    """Converts ``tag`` into DeepSpeed's universal layout (every parameter's fp32 weights and Adam
    moments whole, in ``<tag>.universal/zero/``) once; returns the converted tag. Rank 0 only.

    Written under a temporary name and renamed, so a crash mid-way leaves nothing that looks done.
    """
    from deepspeed.checkpoint import ds_to_universal

    target = tag + UNIVERSAL
    if os.path.isdir(os.path.join(directory, target)):
        return target  # converted by an earlier attempt
    work = os.path.join(directory, f"{target}.tmp")  # "step…": an abandoned one is pruned like a partial save
    shutil.rmtree(work, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=os.path.join(directory, tag), output_folder=os.path.join(work, target),
        # serial: worker processes forked from a rank that holds a process group are not safe
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        # DeepSpeed records the universal info only for tensor-parallel models; ours needs none
        inject_missing_state=True)
    output = io.StringIO()
    try:  # the converter reports every step and parameter: kept for an error only
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal.main(args)
    except Exception as err:
        raise RuntimeError(f"{directory}/{tag}: converting to a universal checkpoint failed ({err}); "
                           f"the converter's output:\n{output.getvalue()[-3000:]}") from err
    os.replace(os.path.join(work, target), os.path.join(directory, target))
    shutil.rmtree(work, ignore_errors=True)  # with DeepSpeed's latest_universal pointer, which we never use
    return target


def regroup_sampler_state(state: dict, world_size: int) -> dict:
    """The data position of ``state`` (BatchSampler's) for ``world_size`` processes.

    Rank r of W reads global batches r, r + W, …: b batches per rank are b·W global batches. A step
    ends on a multiple of W × accumulation = global batch / micro batch, whatever W, so the count
    divides evenly for the new world and every rank resumes at the next global batch in order.
    """
    saved = state.get("world_size", world_size)
    if saved == world_size:
        return state
    consumed = state["batch"] * saved
    if consumed % world_size:
        raise ValueError(f"data loader state: {consumed} global batches into epoch {state['epoch']} is not a "
                         f"whole number of batches for each of {world_size} processes")
    return {**state, "batch": consumed // world_size, "world_size": world_size}


def reseed(seed: int, rank: int, step: int) -> None:
    """Every generator of this process from (seed, rank, step): a resume on another number of
    processes has no saved state for each rank, but its dropout masks stay reproducible."""
    value = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also every CUDA device's generator
