"""Checkpoints that a crash can never leave half-valid.

DeepSpeed writes the engine state (model, optimizer, ZeRO partitions) of a tag; we add
the trainer state (step, data position, RNG states) as DeepSpeed's client state. A tag
counts as complete only once every rank has finished writing it and rank 0 has put a
``COMPLETE`` marker in it; only then does ``latest`` move to it, by an atomic rename.
A process killed mid-save leaves a tag without a marker, which resume ignores.

The marker is written to a temporary file, flushed to disk and renamed, after the tag's files
are flushed; it lists every file of the tag with its size. A tag whose marker cannot be read
(a node crash, a full disk) or whose files are missing or shorter than listed is skipped with a
warning, and resume takes the newest good one. Markers of older versions, without a file list,
are trusted as they are.

A tag resumes on another number of processes too (``plan_resume``): ZeRO-0 files hold whole
tensors and load as they are; ZeRO-1/2/3 partitions are regrouped through DeepSpeed's universal
checkpoint, converted once into a sibling folder ``<tag>.universal``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import glob
import io
import json
import logging
import os
import random
import shutil
import uuid

import numpy as np
import torch

from pipeline.ds_config import DsConfigError
from preprocessing.write_failure import REFUSED, disk_usage, refused_write

log = logging.getLogger(__name__)
LATEST = "latest"
COMPLETE = "COMPLETE"
UNIVERSAL = ".universal"  # suffix of a tag's universal copy; "step…" without a marker, so prune removes it


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (no marker, or a damaged one); the message names it and why."""


class CheckpointWriteError(RuntimeError):
    """A save that could not be finished (e.g. a full disk); one line naming the checkpoint dir.
    The tag is left without a marker, so resume uses the previous one."""


def check_writable(directory: str) -> None:
    """A checkpoints folder this process cannot write is refused at the start, not found at the
    first save: DeepSpeed logs the cause there, then raises "Parent directory … does not exist"."""
    existing = directory if os.path.isdir(directory) else os.path.dirname(directory)
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{existing}: cannot write there (permission denied), so no checkpoint could be "
                              "saved: fix its permissions, or train into another --run-dir")


def estimated_bytes(engine) -> int:
    """About what one checkpoint of ``engine`` takes on disk, before one is saved, over all ranks.

    Per weight: the optimizer's two fp32 moments (Adam, AdamW and LAMB keep two); an fp32 master
    copy, which ZeRO's optimizers keep at every precision and ZeRO-0 under bf16 or fp16; and the
    module's own copy in its dtype, which ZeRO-3 does not save (its partitions are the master's).
    Within a few percent of what the shipped CPU configs save (tested)."""
    stage = engine.zero_optimization_stage()
    master = 4 if stage > 0 or engine.bfloat16_enabled() or engine.fp16_enabled() else 0
    total = 0
    for p in engine.module.parameters():
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves each rank a partition of the tensor
        total += numel * (8 + master + (0 if stage == 3 else p.element_size()))
    return total


def saved_bytes(directory: str, tag: str) -> int:
    """What ``tag`` takes on disk (every file but the marker)."""
    return sum(tag_files(os.path.join(directory, tag)).values())


def space_warning(directory: str, need: int, what: str, kept: bool = True) -> str | None:
    """A warning when ``directory``'s file system has less than ``need`` bytes free for ``what``
    (a failed save loses the steps since the last one); None when it has room or cannot tell.
    ``kept``: checkpoints are kept there already, which a lower --keep-checkpoints would thin."""
    usage = disk_usage(directory)
    if usage is None or usage.free >= need:
        return None
    return (f"{directory} has {usage.free / 2**20:,.0f} MiB free, and {what} takes about {need / 2**20:,.0f} MiB: "
            f"free space there{' (or lower --keep-checkpoints)' if kept else ''} before it is saved, or the save "
            "fails and a resume goes back to the checkpoint before")


def check_same_resume(directory: str, tag: str | None, rank: int, world_size: int, device="cpu") -> None:
    """Every rank must resume from the same tag (or none): each chose it alone from what its node
    sees of ``directory``, and a node shown a stale state of a network file system would load
    another step, or start afresh, beside the others. CheckpointError on every rank otherwise
    (one all-reduce, which every rank must call)."""
    if world_size == 1:
        return
    import hashlib

    from pipeline.engine import named_ranks, unlike_rank0

    _, others = unlike_rank0(int(hashlib.sha256(tag.encode()).hexdigest()[:15], 16) + 1 if tag else 0, rank,
                             world_size, device)
    if others:
        mine = f"{tag} here" if tag else "no checkpoint here"
        raise CheckpointError(f"{directory}: the ranks chose different checkpoints to resume from: rank(s) "
                              f"{named_ranks(others)} of {world_size} did not choose rank 0's (rank {rank}: "
                              f"{mine}), as where a node sees a stale state of a network file system; rerun, or "
                              "name the checkpoint with --resume STEP")


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
         meta: dict | None = None, before_marking=None, exports: str | None = None) -> str:
    """Saves tag ``step…`` on every rank, then marks it complete and points ``latest`` at it.

    ``meta`` (small, JSON) goes into the marker, readable without loading the checkpoint.
    ``before_marking(tag)``: rank 0's last check before it vouches for the tag (it may raise).
    ``exports``: the run's ``hf/`` folder, whose exports of an abandoned branch go aside with it.
    CheckpointWriteError when a file cannot be written (the tag stays unmarked).
    """
    tag = tag_for(step)
    try:
        if is_rank0:
            # A tag saved again (a resume from an earlier one): its old marker must not vouch for the
            # mix of old and new files a crash mid-save would leave, nor its universal copy stand for
            # the new one. DeepSpeed's save starts with a barrier, so no rank writes before they are gone.
            _remove_marker(os.path.join(directory, tag))
            shutil.rmtree(os.path.join(directory, tag + UNIVERSAL), ignore_errors=True)
        engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
        _barrier()  # every rank's shards are on disk before the tag is declared complete
        if is_rank0:
            if before_marking:
                before_marking(tag)
            # save_id tells this save of the tag from an earlier one of the same name (another branch),
            # for what was derived from it (an export beside the run).
            _write_marker(directory, tag, {"tag": tag, "step": step, "save_id": uuid.uuid4().hex, **(meta or {})})
            _write_durably(os.path.join(directory, LATEST), tag.encode())
    except OSError as err:
        raise _write_error(directory, tag, err) from None
    except RuntimeError as err:
        failure = refused_write(err, directory)  # torch.save's zip writer: a RuntimeError, no errno
        if failure is None:
            raise
        raise _write_error(directory, tag, failure) from None
    if is_rank0:
        prune(directory, keep, tag, exports)
    _barrier()
    return tag


def _write_error(directory: str, tag: str, err: OSError) -> CheckpointWriteError:
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    why = REFUSED.get(err.errno, "a write failed")
    previous = find_latest(directory)  # the tag itself if only `latest` failed to move
    resume_from = os.path.join(directory, previous) if previous else "scratch (no complete checkpoint yet)"
    advice = f"free space in {directory} and rerun" if full else "fix the cause and rerun"
    return CheckpointWriteError(f"cannot save checkpoint {os.path.join(directory, tag)}: {why} "
                                f"({err.filename or err.strerror or err}); a resume starts from "
                                f"{resume_from}: {advice}")


def _write_marker(directory: str, tag: str, values: dict) -> None:
    """The tag's files flushed to disk, then the marker that vouches for them (with their sizes).

    On one node rank 0's fsync flushes every local rank's files; what a network filesystem did
    not flush, the sizes in the marker catch at resume."""
    folder = os.path.join(directory, tag)
    files = tag_files(folder)
    for name in files:
        _fsync_path(os.path.join(folder, name))
    _write_durably(os.path.join(folder, COMPLETE), json.dumps({**values, "files": files}).encode())


def _remove_marker(folder: str) -> None:
    try:
        os.remove(os.path.join(folder, COMPLETE))
    except FileNotFoundError:
        return
    _fsync_path(folder)


def tag_files(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (relative path → size), but the marker and temporary files."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != COMPLETE and not name.startswith("."):
                files[relative] = os.path.getsize(path)
    return dict(sorted(files.items()))


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, data: bytes) -> None:
    """``path`` replaced whole by ``data``: a temporary file, flushed, renamed, and the directory
    flushed so that the rename itself survives a crash. A failure leaves the old file (or none)."""
    temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    _fsync_path(os.path.dirname(path))


def _marker_problem(directory: str, tag: str) -> str | None:
    """Why ``tag``'s marker does not vouch for a usable checkpoint; None when it does."""
    folder = os.path.join(directory, tag)
    try:
        meta = _read_marker(folder)
    except CheckpointError as err:
        return str(err)
    files = meta.get("files", {})  # older markers list no files: trusted as before
    if not isinstance(files, dict):
        return f"its {COMPLETE} marker's field 'files' is not a mapping of file to size"
    for name, size in files.items():
        have = _file_size(os.path.join(folder, name))
        if have < 0:
            return f"{name} is listed in its {COMPLETE} marker but missing"
        if have < size:
            return f"{name} has {have} bytes, its {COMPLETE} marker records {size}"
    return None


def _read_marker(folder: str) -> dict:
    """The marker's JSON object; CheckpointError saying why not (the caller names the tag)."""
    try:
        with open(os.path.join(folder, COMPLETE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no {COMPLETE} marker (not a checkpoint, or its save did not finish)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"its {COMPLETE} marker is unreadable, e.g. empty or cut short by a crash "
                              f"({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"its {COMPLETE} marker is not a JSON object")
    return meta


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def complete_tags(directory: str) -> list[str]:
    """The tags whose marker vouches for them; a marked tag that fails its check is skipped with
    a warning naming it and why."""
    if not os.path.isdir(directory):
        return []
    tags = []
    for tag in sorted(os.listdir(directory)):
        if not tag.startswith("step") or not os.path.exists(os.path.join(directory, tag, COMPLETE)):
            continue
        problem = _marker_problem(directory, tag)
        if problem is None:
            tags.append(tag)
        else:
            log.warning("skipping checkpoint %s: %s", os.path.join(directory, tag), problem)
    return tags


def find_latest(directory: str) -> str | None:
    """The newest complete tag: ``latest`` if its tag is complete, else the newest marked one."""
    tags = complete_tags(directory)
    pointer = os.path.join(directory, LATEST)
    if os.path.exists(pointer):
        with open(pointer, errors="replace") as f:
            tag = f.read().strip()
        if tag in tags:
            return tag
    return tags[-1] if tags else None


ABANDONED = "abandoned-"


def prune(directory: str, keep: int, current: str | None = None, exports: str | None = None) -> None:
    """Keeps the newest ``keep`` complete tags; removes older ones, abandoned partial saves and
    damaged tags older than the newest good one.

    ``current``, the tag just saved, is the newest: tags of later steps are a branch this run
    left by resuming from an earlier tag. Kept as the newest, they made the next save prune the
    tag it had just written, and ``latest``'s fallback, ``--resume auto`` and the export pick the
    old branch's weights. They are renamed ``abandoned-<tag>`` (left for the user to delete),
    which no resume or export looks at; so are their exports in ``exports`` (``hf/<tag>``, the
    highest-numbered export there, which named a checkpoint that was no longer there)."""
    tags = complete_tags(directory)
    if current is not None and current in tags:
        for later in [t for t in tags if t > current]:
            # a universal copy goes with its tag, and so does its export
            for folder, name in ((directory, later), (directory, later + UNIVERSAL), (exports, later)):
                if folder and os.path.isdir(os.path.join(folder, name)):
                    shutil.rmtree(os.path.join(folder, ABANDONED + name), ignore_errors=True)  # an older branch's
                    os.rename(os.path.join(folder, name), os.path.join(folder, ABANDONED + name))
            aside = os.path.join(directory, ABANDONED + later)
            log.warning("%s is from a branch this run left when it resumed from an earlier step: renamed %s "
                        "(delete it when it is no longer needed)", os.path.join(directory, later), aside)
        tags = [t for t in tags if t <= current]
    newest = tags[-1] if tags else None
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not name.startswith("step") or not os.path.isdir(path) or name == newest:
            continue
        stale_partial = name not in tags and newest is not None and name < newest
        if name in tags[:-keep] or stale_partial:
            shutil.rmtree(path, ignore_errors=True)


def read_meta(directory: str, tag: str) -> dict:
    """The marker's contents; CheckpointError naming the tag when it does not vouch for it."""
    problem = _marker_problem(directory, tag)
    if problem is not None:
        good = complete_tags(directory)
        raise CheckpointError(f"checkpoint {os.path.join(directory, tag)}: {problem}; complete tags: "
                              f"{', '.join(good) or 'none'}")
    return _read_marker(os.path.join(directory, tag))


def load(engine, directory: str, tag: str) -> dict:
    # DeepSpeed unpickles the whole checkpoint (code could run): resume only from trusted run dirs.
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
    # DeepSpeed's own file, which engine.load_checkpoint unpickled whole moments ago: reading it the
    # same way trusts nothing more (hence: resume only from trusted run dirs, docs/PRETRAINING.md "Reliability").
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


# What a resume must keep, as the marker records it: (the flag that sets it, what to do instead).
RESUME_INVARIANTS = {
    "model_config": ("--model", "the weights have these shapes; a new size starts from --init-from"),
    "micro_batch_size": ("--micro-batch-size", "the data position counts micro-batches"),
    "seed": ("--seed", "the data order and masks follow from it"),
    "train_rows": ("--data and --eval-shards", "the training rows are --data's rows less the held-out "
                   "shards, and their order depends on how many there are"),
    "zero_class": ("--ds-config's zero_optimization.stage", "DeepSpeed loads the optimizer state as it was "
                   "partitioned: stages 1 and 2 load each other's, 0 and 3 only their own; change it in a new "
                   "--run-dir with --init-from"),
    "precision": ("--ds-config's bf16/fp16", "DeepSpeed saves the optimizer state in the precision's own files and "
                  "layout; change it in a new --run-dir with --init-from"),
}


def zero_class(stage: int) -> str:
    """What a ZeRO stage's checkpoint loads into: 1 and 2 share the optimizer and its partitions."""
    return {0: "0", 1: "1 or 2", 2: "1 or 2"}.get(stage, str(stage))


def check_invariants(directory: str, tag: str, now: dict, given_init_from: bool = False) -> None:
    """CheckpointError, before any engine exists, when this run differs from ``tag`` in what a
    resume cannot change (``RESUME_INVARIANTS``). Before, a changed model, micro-batch or ZeRO
    stage failed with a traceback, some only after the engine had loaded the whole checkpoint.
    Tags saved before a field was recorded are not checked for it. ``given_init_from``: this run
    was given --init-from (a changed model is then not for want of it)."""
    meta = read_meta(directory, tag)
    for field, (flag, why) in RESUME_INVARIANTS.items():
        if field in meta and field in now and meta[field] != now[field]:
            saved, have = meta[field], now[field]
            if isinstance(saved, dict) and isinstance(have, dict):  # name the differing keys only
                keys = sorted(k for k in {*saved, *have} if saved.get(k) != have.get(k))
                saved, have = ({k: d.get(k) for k in keys} for d in (saved, have))
            if field == "model_config" and meta.get("init_from") and not given_init_from:
                # --model's default is the preset, not the architecture of the weights the run began from
                why = (f"the run began from --init-from {meta['init_from']}: pass it again, which names that "
                       "architecture (a resume does not load its weights)")
            raise CheckpointError(f"{directory}/{tag} was saved with {flag} giving {saved}, this run has {have}: "
                                  f"a resume keeps it ({why})")


def zero_stage(ds_config: dict) -> int:
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
    saved_batch = meta.get("global_batch_size", global_batch_size)
    if saved_batch != global_batch_size:
        # The data position carries over as a count of global batches; only the same global batch
        # continues the same order (the accumulation steps are what changes).
        raise DsConfigError(f"{directory}/{tag} was saved with --global-batch-size {saved_batch}: a resume keeps "
                            f"it (this run has {global_batch_size}); a new batch size needs a new --run-dir "
                            "(with --init-from for the weights)")
    if plan.same_world:
        return plan
    where = f"{directory}/{tag} was saved by {processes(saved)}, this run has {world_size}"
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    if offload == "nvme":
        # DeepSpeed keeps NVMe-offloaded optimizer state in one folder per rank and restores it only as is.
        raise DsConfigError(f"{where}: with --ds-config {ds_config_path} (ZeRO's NVMe optimizer offload) it "
                            f"resumes only on {processes(saved)}")
    if plan.universal and zero_stage(ds_config) == 0:
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
