"""Checkpoints that a crash can never leave half-valid.

DeepSpeed writes the engine state (model, optimizer, ZeRO partitions) of a tag; we add
the trainer state (step, data position, RNG states) as DeepSpeed's client state. A tag
counts as complete only once every rank has finished writing it and rank 0 has put a
``COMPLETE`` marker in it; only then does ``latest`` move to it, by an atomic rename.
A process killed mid-save leaves a tag without a marker, which resume ignores.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

LATEST = "latest"
COMPLETE = "COMPLETE"


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
    return client_state
