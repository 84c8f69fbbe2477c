"""Fault injection for the tests, wrapped around the trainer and DeepSpeed from outside, so that
the training step and the checkpoint save carry no hook and no environment lookup.

``BERT_PIPELINE_FAULT`` names the fault, read when it would strike (a test may set or clear it
between runs):

- ``raise-on-rank:R:S``: rank R raises in step S, after its forward pass (like a data error or an
  out-of-memory: the other ranks wait in backward's all-reduce)
- ``nan-loss:S``, ``nan-loss-from:S``, ``nan-loss-on-rank:R:S``: a NaN loss at step S, at every
  step from S, or at every step from S on rank R only
- ``nan-grad:S``, ``nan-grad-from:S``: a finite loss whose gradients are NaN at step S (an
  overflow inside the backward pass), or at every step from S, on every rank
- ``kill-during-save:S``: ``kill -9`` once DeepSpeed wrote step S's checkpoint files, before the
  tag is marked complete
- ``enospc-during-save:S``: a disk that filled up while step S was saved (the last file cut short)
- ``slow-universal:SECONDS``: the conversion to a universal checkpoint takes SECONDS longer (a
  busy shared file system)
- ``no-checkpoints-on-rank:R``: rank R sees no checkpoint to resume from (a node shown a stale
  state of a network file system)

In a test's own process: ``inject(monkeypatch, fault)``. In a launched one (torchrun, or a plain
``python``): ``tests/pretrain_with_faults.py`` in place of ``pipeline/pretrain.py``.
"""

from __future__ import annotations

import errno
import os

ENV = "BERT_PIPELINE_FAULT"


def _step_fault(fault: str, rank: int, step: int) -> str | None:
    """"raise", "nan" or None for ``step`` (1-based, the one being computed) on ``rank``."""
    parts = fault.split(":")
    if fault == f"raise-on-rank:{rank}:{step}":
        return "raise"
    if fault == f"nan-loss:{step}" or (parts[0] == "nan-loss-from" and step >= int(parts[1])) or (
            parts[0] == "nan-loss-on-rank" and int(parts[1]) == rank and step >= int(parts[2])):
        return "nan"
    if fault == f"nan-grad:{step}" or (parts[0] == "nan-grad-from" and step >= int(parts[1])):
        return "nan-grad"
    return None


def nan_gradient(loss):
    """``loss`` unchanged forward, NaN gradients backward."""
    import torch

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    return NanGradient.apply(loss)


def _save_fault(fault: str, directory: str, tag: str) -> None:
    from pipeline import checkpoint

    kind, _, step = fault.partition(":")
    if kind not in ("kill-during-save", "enospc-during-save") or tag != checkpoint.tag_for(int(step)):
        return
    if kind == "kill-during-save":
        os.kill(os.getpid(), 9)
    files = checkpoint.tag_files(os.path.join(directory, tag))
    last = max(files, key=lambda name: os.path.getmtime(os.path.join(directory, tag, name)))
    os.truncate(os.path.join(directory, tag, last), files[last] // 2)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(directory, tag, last))


def install(setattr=setattr) -> None:
    """Wraps ``Trainer.train_step``, DeepSpeed's ``save_checkpoint`` and ``checkpoint.to_universal``
    (through ``setattr``: ``monkeypatch.setattr`` undoes it after the test). Once per process is enough."""
    import time

    from deepspeed.runtime.engine import DeepSpeedEngine

    from pipeline import checkpoint, trainer

    if getattr(trainer.Trainer.train_step, "injects_faults", False):
        return
    train_step, save_checkpoint = trainer.Trainer.train_step, DeepSpeedEngine.save_checkpoint

    def faulty_train_step(self):
        kind = _step_fault(os.environ.get(ENV, ""), self.rank, self.step + 1)
        if kind is None:
            return train_step(self)
        losses, fault, step = trainer.pretraining_losses, os.environ[ENV], self.step + 1

        def faulty_losses(engine, batch):
            mlm, nsp, counts = losses(engine, batch)
            if kind == "raise":
                raise RuntimeError(f"rank {self.rank}: injected failure at step {step} ({ENV}={fault})")
            if kind == "nan-grad":
                return nan_gradient(mlm), nsp, counts
            return mlm * float("nan"), nsp, counts

        # The module global that train_step calls, for this one step: evaluation stays untouched.
        trainer.pretraining_losses = faulty_losses
        try:
            return train_step(self)
        finally:
            trainer.pretraining_losses = losses

    def faulty_save_checkpoint(self, save_dir, tag=None, *args, **kwargs):
        result = save_checkpoint(self, save_dir, tag, *args, **kwargs)
        _save_fault(os.environ.get(ENV, ""), save_dir, tag)
        return result

    def stale_resume_tag(self):
        if os.environ.get(ENV, "") == f"no-checkpoints-on-rank:{self.rank}":
            return None
        return resume_tag(self)

    def slow_to_universal(directory, tag):
        kind, _, seconds = os.environ.get(ENV, "").partition(":")
        if kind == "slow-universal":
            time.sleep(float(seconds))
        return to_universal(directory, tag)

    to_universal, resume_tag = checkpoint.to_universal, trainer.Trainer._resume_tag
    faulty_train_step.injects_faults = True
    setattr(trainer.Trainer, "train_step", faulty_train_step)
    setattr(DeepSpeedEngine, "save_checkpoint", faulty_save_checkpoint)
    setattr(checkpoint, "to_universal", slow_to_universal)
    setattr(trainer.Trainer, "_resume_tag", stale_resume_tag)


def inject(monkeypatch, fault: str) -> None:
    """``fault`` in this test's process, until the test ends (or ``monkeypatch.delenv(ENV)``)."""
    monkeypatch.setenv(ENV, fault)
    install(monkeypatch.setattr)
