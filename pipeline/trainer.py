"""The pretraining loop around a DeepSpeed engine.

Reads top to bottom: data → model → engine → for each optimizer step, the
micro-batches DeepSpeed accumulates, then metrics, checkpoints and the stop check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import checkpoint
from pipeline.data import BatchSampler, PretrainingDataset, PretrainingLoader, read_manifest
from pipeline.ds_config import inject, load_ds_config, plan_batches
from pipeline.model import FlopCounter, build_model, model_config
from pipeline.train_config import TrainConfig

log = logging.getLogger(__name__)
EXIT_STOPPED = 3  # a stop signal was honoured: checkpoint written, the job can requeue


def ensure_distributed_env() -> tuple[int, int, int]:
    """(rank, local rank, world size); a plain ``python`` run becomes a 1-process world.

    DeepSpeed otherwise tries MPI discovery and fails without mpi4py.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def linear_warmup_decay(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return factor


@dataclasses.dataclass
class StepMetrics:
    loss: float
    mlm_loss: float
    nsp_loss: float
    mlm_accuracy: float
    nsp_accuracy: float
    real_tokens: int
    sequences: int


class StopFlag:
    """Set by SIGTERM/SIGUSR1 on any rank; all ranks agree through an all-reduce."""

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the end of this step", signum)
        self.requested = True

    def agreed(self, world_size: int) -> bool:
        if world_size == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    def __init__(self, config: TrainConfig):
        import deepspeed

        self.config = config
        self.rank, self.local_rank, self.world_size = ensure_distributed_env()
        os.makedirs(config.run_dir, exist_ok=True)
        self.manifest = read_manifest(config.data)
        self.dataset = PretrainingDataset(config.data, self.manifest)
        self.batches = plan_batches(config.global_batch_size, config.micro_batch_size, self.world_size)
        torch.manual_seed(config.seed)
        self.model_config = model_config(config.model, self.manifest)
        model = build_model(self.model_config)
        self.ds_config = inject(load_ds_config(config.ds_config), self.batches, config.learning_rate,
                                config.weight_decay, config.grad_clip)
        schedule = linear_warmup_decay(config.steps, config.warmup_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.sampler = BatchSampler(self.dataset.lengths, config.micro_batch_size, rank=self.rank,
                                    world_size=self.world_size, seed=config.seed,
                                    accumulation_steps=self.batches.accumulation_steps)
        self.step = 0
        self.stop = StopFlag()
        self.flops = FlopCounter.for_config(self.model_config)
        self._resume()
        self.loader = PretrainingLoader(self.dataset, self.sampler)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def _resume(self) -> None:
        if self.config.resume == "none":
            return
        tag = (checkpoint.find_latest(self.config.checkpoint_dir) if self.config.resume == "auto"
               else self.config.resume)
        if tag is None:
            return
        meta = checkpoint.read_meta(self.config.checkpoint_dir, tag)
        fingerprint = self.manifest["tokenizer"]["fingerprint"]
        if meta.get("tokenizer_fingerprint", fingerprint) != fingerprint:
            raise ValueError(f"{self.config.checkpoint_dir}/{tag} was trained with tokenizer "
                             f"{meta['tokenizer_fingerprint'][:12]}… but --data {self.config.data} has "
                             f"{fingerprint[:12]}… (manifest field tokenizer.fingerprint): use the same "
                             "data, or a new --run-dir")
        state = checkpoint.load(self.engine, self.config.checkpoint_dir, tag)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"][self.rank])
        log.info("resumed from %s at step %d", tag, self.step)

    def save(self) -> str:
        # Every rank's RNG state, gathered so that any rank can restore its own.
        states = [None] * self.world_size
        if self.world_size > 1:
            torch.distributed.all_gather_object(states, checkpoint.rng_state())
        else:
            states = [checkpoint.rng_state()]
        client = {"step": self.step, "sampler": self.loader.state_dict(), "rng": states}
        meta = {"tokenizer_fingerprint": self.manifest["tokenizer"]["fingerprint"],
                "data_run_id": self.manifest.get("data_run_id")}
        return checkpoint.save(self.engine, self.config.checkpoint_dir, self.step, client,
                               self.config.keep_checkpoints, self.is_rank0, meta)

    def train_step(self) -> StepMetrics:
        """One optimizer step: DeepSpeed's accumulation over the micro-batches."""
        totals = np.zeros(7)
        for _ in range(self.batches.accumulation_steps):
            batch = next(self.loader)
            labels, nsp = batch.pop("labels"), batch.pop("next_sentence_label")
            out = self.engine(**batch)
            logits = out.prediction_logits.float()
            mlm = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
            nsp_loss = F.cross_entropy(out.seq_relationship_logits.float(), nsp)
            loss = mlm + nsp_loss
            self.engine.backward(loss)
            self.engine.step()
            with torch.no_grad():
                masked = labels != -100
                hits = (logits.argmax(-1) == labels)[masked].sum().item()
                nsp_hits = (out.seq_relationship_logits.argmax(-1) == nsp).sum().item()
            totals += [loss.item(), mlm.item(), nsp_loss.item(), hits, nsp_hits, masked.sum().item(),
                       batch["attention_mask"].sum().item()]
        self.step += 1
        n = self.batches.accumulation_steps
        seqs = n * self.config.micro_batch_size
        return StepMetrics(totals[0] / n, totals[1] / n, totals[2] / n, totals[3] / max(totals[5], 1),
                           totals[4] / seqs, int(totals[6]), seqs)

    def train(self, tracker=None, on_step=None) -> int:
        """Runs to ``--steps``; returns 0, or EXIT_STOPPED after a stop signal's checkpoint."""
        self.stop.install()
        started, window = time.monotonic(), []
        try:
            while self.step < self.config.steps:
                metrics = self.train_step()
                window.append(metrics)
                if not np.isfinite(metrics.loss) and not self._fp16_skipped():
                    raise FloatingPointError(f"loss is {metrics.loss} at step {self.step}: stopping "
                                             "without writing a checkpoint over a good one")
                if on_step:
                    on_step(self, metrics)
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    self._log(window, time.monotonic() - started, tracker)
                    started, window = time.monotonic(), []
                if self.stop.agreed(self.world_size):
                    self.save()
                    return EXIT_STOPPED
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save()
            if not self.config.checkpoint_every or self.step % self.config.checkpoint_every:
                self.save()
            return 0
        finally:
            self.loader.close()

    def _fp16_skipped(self) -> bool:
        # With dynamic loss scaling an overflow skips the step; that is the scaler's job.
        return bool(getattr(self.optimizer, "overflow", False))

    def _log(self, window: list[StepMetrics], seconds: float, tracker) -> None:
        seqs = sum(m.sequences for m in window) * self.world_size
        tokens = sum(m.real_tokens for m in window) * self.world_size
        values = {
            "loss": float(np.mean([m.loss for m in window])),
            "mlm_loss": float(np.mean([m.mlm_loss for m in window])),
            "nsp_loss": float(np.mean([m.nsp_loss for m in window])),
            "mlm_accuracy": float(np.mean([m.mlm_accuracy for m in window])),
            "nsp_accuracy": float(np.mean([m.nsp_accuracy for m in window])),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "sequences_per_second": seqs / max(seconds, 1e-9),
            "real_tokens_per_second": tokens / max(seconds, 1e-9),
            "real_token_share": self.loader.real_token_share,
        }
        if self.world_size > 1:
            # Every rank saw different micro-batches: report the global means.
            names = ["loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "real_token_share"]
            local = torch.tensor([values[n] for n in names], dtype=torch.float64)
            torch.distributed.all_reduce(local)
            values.update({n: float(v) / self.world_size for n, v in zip(names, local)})
        if self.config.peak_tflops:
            mean_length = tokens / max(seqs, 1)
            values["mfu"] = values["sequences_per_second"] * self.flops.per_sequence(mean_length) / (
                self.config.peak_tflops * 1e12 * self.world_size)
        if self.is_rank0:
            with open(os.path.join(self.config.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step, **values}) + "\n")
            log.info("step %d/%d  %s", self.step, self.config.steps,
                     "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
            if tracker:
                tracker.log_metrics(values, self.step)
