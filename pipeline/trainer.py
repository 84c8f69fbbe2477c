"""The pretraining loop around a DeepSpeed engine.

Reads top to bottom: data → model → engine → for each optimizer step, the
micro-batches DeepSpeed accumulates, then metrics, checkpoints and the stop check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from tqdm import tqdm

from pipeline import checkpoint, hf_init, run_lock
from pipeline.data import PretrainingDataset, PretrainingLoader
from pipeline.data_dir import RECIPE_FIELDS, DataDirError, data_recipe, read_manifest
from pipeline.ds_config import DsConfigError, precision
from pipeline.engine import (LossScaleFloor, MAX_SKIPPED_UPDATES, PAD_MULTIPLE, ScaledBackward, StopFlag, agree,
                             ensure_distributed_env, gradient_norm, init_distributed, initialize, keeps_no_grad_norm,
                             loss_scale, optimizer_step, unscaled_grad_norm, waiting_longer)
from pipeline.export import estimated_bytes
from pipeline.metrics import json_line, keep_steps_up_to
from pipeline.model import FlopCounter, build_model, forward_attention_mask, model_config
from pipeline.param_groups import group_settings
from pipeline.read_ahead import one_batch_ahead
from pipeline.sampler import BatchSampler, eval_batches, training_rows
from pipeline.train_config import TrainConfig
from preprocessing.examples import OBJECTIVES
from preprocessing.write_failure import disk_usage, same_file_system, writing

log = logging.getLogger(__name__)
EXIT_STOPPED = 3  # a stop signal was honoured: checkpoint written, the job can requeue
MAX_NONFINITE_STEPS = 10  # skipped non-finite steps in a row before the run is declared broken


@dataclasses.dataclass
class StepMetrics:
    loss: float
    mlm_loss: float
    nsp_loss: float
    mlm_accuracy: float
    nsp_accuracy: float
    real_tokens: int
    sequences: int
    predictions: int = 0  # masked tokens the MLM head ran on
    squared_tokens: int = 0  # the sum over sequences of their real length squared (attention's FLOPs)
    padded_tokens: int = 0  # the tokens the batches held, padding included
    learning_rate: float = float("nan")  # the rate this step's update used
    grad_norm: float = float("nan")
    loss_scale: float = float("nan")
    applied: bool = True  # False when DeepSpeed skipped the update (fp16 overflow, or bf16 with its check on)
    grad_norm_reported: bool = False  # the engine computed a gradient norm (not every optimizer does)

    @property
    def finite(self) -> bool:
        """The loss is finite, and an applied update had a finite gradient norm where one was
        reported: bf16 configs that skip DeepSpeed's per-tensor overflow check (ds_configs/README.md)
        would otherwise apply NaN gradients under a finite loss."""
        return bool(np.isfinite(self.loss)) and not (self.applied and self.grad_norm_reported
                                                     and not np.isfinite(self.grad_norm))


def pretraining_losses(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mlm loss, nsp loss, detached counts [mlm hits, masked tokens, nsp hits, real tokens])
    of one micro-batch, on the engine's device. ``batch`` as PretrainingDataset.batch gives it."""
    device, host_mask = engine.device, batch["attention_mask"]
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
    mlm_labels, nsp = batch.pop("mlm_labels"), batch.pop("next_sentence_label")
    real_tokens = batch["attention_mask"].sum()
    batch["attention_mask"] = forward_attention_mask(host_mask, batch["attention_mask"])
    mlm_logits, nsp_logits = engine(**batch)  # the sparse head: masked positions only
    mlm = F.cross_entropy(mlm_logits.float(), mlm_labels)
    nsp_loss = F.cross_entropy(nsp_logits.float(), nsp)
    with torch.no_grad():
        # new_full, not new_tensor: a tensor made from a host value is a copy the host waits for.
        counts = torch.stack([(mlm_logits.argmax(-1) == mlm_labels).sum(), mlm_labels.new_full((), len(mlm_labels)),
                              (nsp_logits.argmax(-1) == nsp).sum(), real_tokens])
    return mlm, nsp_loss, counts


def append_history(run_dir: str, name: str, values: dict) -> None:
    """One line of RUN_DIR/metrics.jsonl or eval.jsonl; a full disk is one line naming the file."""
    path = os.path.join(run_dir, name)
    with writing("the run's history", path, "rerun: it resumes from the newest complete checkpoint"), \
            open(path, "a") as f:
        f.write(json_line(values))


# How long the other ranks wait for rank 0's conversion to a universal checkpoint at a resume on
# another number of processes (Trainer._universal_tag), when --dist-timeout-minutes is shorter.
UNIVERSAL_CONVERSION_MINUTES = 60.0


class NonFiniteLoss(FloatingPointError):
    """Raised on every rank at the same step: the decision is agreed (``Trainer._check_finite``)."""


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.rank, self.local_rank, self.world_size = ensure_distributed_env("slurm/pretrain.sh")
        # From the start: a stop signal during start-up (loading, engine, resume) is honoured
        # after the first step instead of killing the rank (but in the rendezvous, StopFlag.killable).
        self.stop = StopFlag("checkpointing at the end of this step")
        self.stop.install()
        os.makedirs(config.run_dir, exist_ok=True)
        checkpoint.check_writable(config.checkpoint_dir)
        self.manifest = read_manifest(config.data)
        # A compiled encoder recompiles for every new batch shape: a padded length per length bucket
        # would pass torch._dynamo's recompile limit. Padded to max_seq_length, one graph serves all.
        pad_to = self.manifest["max_seq_length"] if config.compile else PAD_MULTIPLE
        self.dataset = PretrainingDataset(config.data, self.manifest, pad_to_multiple_of=pad_to,
                                          cache_dir=config.data_cache, seed=config.engine.seed)
        shards = len(self.manifest["shards"])
        self.eval_shards = config.eval_shards if config.eval_shards is not None else int(shards >= 2)
        self.train_rows = training_rows(self.manifest, self.eval_shards)
        # An MLM-only data dir (packed rows, NSP labels all 0) trains the MLM head alone. The NSP
        # head stays in the model with a zero loss weight: its parameters get zero gradients
        # rather than none, which every ZeRO stage handles alike.
        objective = self.manifest.get("objective", "mlm-nsp")
        if objective not in OBJECTIVES:
            raise DataDirError(f"{config.data}/manifest.json: objective {objective!r} is not one this trainer "
                               f"knows ({', '.join(OBJECTIVES)}); rerun preprocessing with --objective "
                               f"{' or '.join(OBJECTIVES)}")
        self.nsp_weight = 0.0 if objective == "mlm" else 1.0
        settings = config.engine  # EngineConfig (self.engine: the DeepSpeed engine it builds)
        self.batches = settings.batches(self.world_size)
        self.ds_config = settings.deepspeed_config(self.batches)
        if config.compile and checkpoint.zero_stage(self.ds_config) == 3:
            # Measured on CPU (2 ranks): ZeRO-3's parameter hooks change the grad mode around every
            # layer, torch._dynamo recompiles each until its limit and then runs them eager.
            raise DsConfigError(f"--compile with ZeRO stage 3 (--ds-config {settings.ds_config}): DeepSpeed's "
                                "parameter gathering keeps torch.compile from compiling the layers; use a stage "
                                "0-2 config, or leave out --compile")
        torch.manual_seed(settings.seed)
        if hf_init.is_hf_dir(config.init_from):  # before a model of the wrong size or vocabulary is built
            hf_init.check(config.init_from, config.model, self.manifest, config.data)
        self.model_config = model_config(config.model, self.manifest)
        model = build_model(self.model_config, sparse_mlm=True)
        self.parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        if config.compile:
            # The encoder alone: its shapes are static; the sparse MLM head's input (the masked
            # tokens) changes size every batch. Module.compile keeps the state-dict names, so
            # checkpoints and exports do not change.
            model.bert.encoder.compile(dynamic=False)
        self.resume_tag = self._resume_tag()
        self.init_info = self._init_weights(model) if config.init_from and self.resume_tag is None else {}
        # The MLflow run this start logs to (set by pretrain.py), recorded in every checkpoint it saves;
        # a resume reads the lineage its checkpoint recorded (the run that wrote it, the weights phase 2
        # started from), which train_config.json, rewritten at every start, cannot tell.
        self.run_id: str | None = None
        self.resumed_from_run_id: str | None = None
        if self.resume_tag is not None:
            saved = checkpoint.read_meta(config.checkpoint_dir, self.resume_tag)
            self.resumed_from_run_id = saved.get("pretrain_run_id")
            if not self.init_info:
                self.init_info = {k: saved[k] for k in ("init_from", "init_from_run_id") if saved.get(k)}
        if self.resume_tag:  # the tokenizer first: another one changes the vocabulary size too
            self._check_tokenizer(config.checkpoint_dir, self.resume_tag, f"{config.checkpoint_dir}/{self.resume_tag}",
                                  "use the same data, or a new --run-dir")
            checkpoint.check_invariants(config.checkpoint_dir, self.resume_tag, self._invariants(),
                                        given_init_from=bool(config.init_from))
            self._warn_if_data_changed(saved)
        # Decided before the engine exists: loading another world size's ZeRO partitions is an engine setting.
        self.resume_plan = self.resume_tag and checkpoint.plan_resume(
            config.checkpoint_dir, self.resume_tag, self.world_size, self.ds_config, settings.ds_config,
            self.batches.global_batch_size)
        if self.resume_plan and self.resume_plan.universal:
            self.ds_config = checkpoint.universal_load_config(self.ds_config)
        with self.stop.killable():
            init_distributed(settings.dist_timeout_minutes)
        self.engine, self.optimizer, self.scheduler = initialize(model, settings, self.ds_config, config.steps,
                                                                 config.warmup_steps)
        self.backward = ScaledBackward(self.engine)
        # Before a checkpoint is loaded or anything written: a node that sees another run dir would
        # resume alone.
        run_lock.check_shared(config.run_dir, self.rank, self.world_size, self.engine.device)
        checkpoint.check_same_resume(config.checkpoint_dir, self.resume_tag, self.rank, self.world_size,
                                     self.engine.device)
        self._lock_token = run_lock.held_token(config.run_dir) if self.is_rank0 else None
        self.sampler = BatchSampler(self.dataset.lengths[:self.train_rows], settings.micro_batch_size,
                                    rank=self.rank, world_size=self.world_size, seed=settings.seed,
                                    accumulation_steps=self.batches.accumulation_steps)
        self.eval_rows = eval_batches(self.dataset.lengths, self.train_rows, settings.micro_batch_size, self.rank,
                                      self.world_size, config.eval_batches * settings.global_batch_size, settings.seed)
        if self.eval_shards and len(self.eval_rows) == 0:
            held_out = len(self.dataset.lengths) - self.train_rows
            raise DataDirError(f"--eval-shards {self.eval_shards}: the held-out rows ({held_out}, in the last "
                               f"{self.eval_shards} of {shards} shards) are fewer than the processes "
                               f"({self.world_size}): hold out more shards, pass --eval-shards 0, or preprocess with "
                               "fewer --num-shards")
        if config.eval_every and not self.eval_shards and self.is_rank0:
            why = "--eval-shards 0" if config.eval_shards == 0 else f"the data dir has {shards} shard"
            log.warning("--eval-every %d: nothing is held out (%s), so no evaluation runs; hold out a shard with "
                        "--eval-shards 1 (a small corpus: preprocess with --num-shards 2 or more)", config.eval_every,
                        why)
        self.step = 0
        self.flops = FlopCounter.for_config(self.model_config)
        self.final_eval: dict[str, float] = {}
        self._nonfinite = self._skipped = 0
        # One pass over the gradients a step, so that ZeRO-0's norm is logged and checked too.
        self._own_grad_norm = keeps_no_grad_norm(self.engine)
        self._saved_at, self._saved_step = time.monotonic(), None
        self._resume()
        if self.is_rank0:  # said while there is time to free space, not at the first save
            need = (checkpoint.saved_bytes(config.checkpoint_dir, self.resume_tag) if self.resume_tag
                    else checkpoint.estimated_bytes(self.engine))
            if not self._warn_if_short_of_space(need, f"{'the next' if self.resume_tag else 'the first'} checkpoint",
                                                kept=bool(self.resume_tag)):
                self._warn_if_export_short_of_space(need)
        # Pinned only for a GPU engine: pinning opens a CUDA context, which CPU ranks on a GPU
        # node (DS_ACCELERATOR=cpu) would each open on GPU 0.
        self.loader = PretrainingLoader(self.dataset, self.sampler,
                                        pin_memory=getattr(self.engine.device, "type", None) == "cuda")

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def finished_export(self) -> str | None:
        """The export of the resumed checkpoint when that checkpoint is the newest, already reached
        --steps, and an earlier start exported this very save of it: a rerun of a finished run (a
        repeated command, a requeued job) has nothing left to do, and pretrain.py ends it without a
        second MLflow run of eval metrics alone. An export cut short, or one of another branch's save
        of the same tag, is not one: the run evaluates and exports again. Rank 0's view, agreed by
        every rank; the loader is closed when it is done."""
        from pipeline.export import is_export_of

        checkpoints, tag = self.config.checkpoint_dir, self.resume_tag
        out = os.path.join(self.config.run_dir, "hf", tag) if tag else ""
        done = (self.is_rank0 and tag is not None and self.step >= self.config.steps
                and tag == checkpoint.find_latest(checkpoints) and is_export_of(out, checkpoints, tag))
        if not agree([float(done)], self.world_size, self.engine.device)[0]:
            return None
        self.loader.close()
        self.stop.uninstall_interrupt()
        return out

    def _resume_tag(self) -> str | None:
        if self.config.resume == "none":
            existing = checkpoint.complete_tags(self.config.checkpoint_dir)
            if existing:  # a fresh run would interleave its checkpoints with these, and prune them
                raise checkpoint.CheckpointError(
                    f"--resume none: {self.config.checkpoint_dir} holds checkpoints of an earlier run ({existing[0]} "
                    f"… {existing[-1]}): start a fresh run in a new --run-dir (or remove them), or continue "
                    "this one with --resume auto")
            return None
        if self.config.resume == "auto":
            return checkpoint.find_latest(self.config.checkpoint_dir)
        if self.config.resume.isdigit():  # --resume 3000: the step's tag
            return checkpoint.tag_for(int(self.config.resume))
        return self.config.resume

    def _check_tokenizer(self, checkpoints: str, tag: str, what: str, advice: str) -> None:
        """A checkpoint trained on another tokenizer's ids is refused before it is loaded."""
        meta = checkpoint.read_meta(checkpoints, tag)
        fingerprint = self.manifest["tokenizer"]["fingerprint"]
        if meta.get("tokenizer_fingerprint", fingerprint) != fingerprint:
            raise DataDirError(f"{what} was trained with tokenizer {meta['tokenizer_fingerprint'][:12]}… but --data "
                             f"{self.config.data} has {fingerprint[:12]}… (manifest field tokenizer.fingerprint): "
                             f"{advice}")

    def _warn_if_data_changed(self, saved: dict) -> None:
        """A resume on a data dir rebuilt since the checkpoint (preprocessing rerun into the same
        --output with another corpus or setting, the same tokenizer and row count) goes on, since
        continuing on new data can be meant, but says so: its next examples are not the ones the
        run would have seen, and its loss curve may jump there."""
        if not self.is_rank0 or "data_recipe" not in saved:  # tags saved before the recipe was recorded
            return
        now = json.loads(json.dumps(data_recipe(self.manifest)))  # the marker's JSON types
        changed = [field for field in RECIPE_FIELDS if saved["data_recipe"].get(field) != now.get(field)]
        if changed:
            log.warning("--data %s was rebuilt since checkpoint %s was saved (manifest.json differs in %s): "
                        "training goes on from step %s on the new examples, not the ones this run began "
                        "with. For those, rerun preprocessing as it was into another --output and resume "
                        "with that as --data", self.config.data, self.resume_tag, ", ".join(changed),
                        saved.get("step"))

    def _init_weights(self, model) -> dict:
        """Phase 2: the weights of another run's checkpoint, or continued pretraining of a Hugging
        Face BERT directory; optimizer and schedule start fresh."""
        from pipeline.export import TRAIN_CONFIG, load_weights, read_train_config, resolve

        if hf_init.is_hf_dir(self.config.init_from):
            return hf_init.load_weights(model, self.config.init_from)

        run_dir, checkpoints, tag = resolve(self.config.init_from, given_as="--init-from")
        self._check_tokenizer(checkpoints, tag, f"--init-from {checkpoints}/{tag}",
                              "preprocess the phase-2 corpus with --tokenizer <phase-1 data dir>/tokenizer/spm.model")
        previous = read_train_config(run_dir) if os.path.isfile(os.path.join(run_dir, TRAIN_CONFIG)) else {}
        load_weights(model, checkpoints, tag, f"--model {self.config.model} (the checkpoint was trained with "
                                              f"--model {previous.get('model', '?')})")
        log.info("initialized the weights from %s/%s (fresh optimizer and schedule)", checkpoints, tag)
        # The run that wrote that tag (its marker's), else the run dir's latest start (older checkpoints).
        wrote = checkpoint.read_meta(checkpoints, tag).get("pretrain_run_id") or previous.get("pretrain_run_id")
        return {"init_from": os.path.join(checkpoints, tag), "init_from_run_id": wrote}

    def _trim_history(self) -> None:
        """The history goes on from the step this run starts at, not after the abandoned steps (a
        crash past the checkpoint; a run that failed before its first checkpoint, started afresh)."""
        if not self.is_rank0:
            return
        dropped = sum(keep_steps_up_to(os.path.join(self.config.run_dir, name), self.step)
                      for name in ("metrics.jsonl", "eval.jsonl"))
        if dropped:
            log.info("removed %d line(s) past step %d from metrics.jsonl/eval.jsonl (steps this run redoes)",
                     dropped, self.step)

    def _resume(self) -> None:
        tag = self.resume_tag
        if tag is None:
            self._trim_history()
            return
        plan = self.resume_plan
        load_tag = self._universal_tag(tag) if plan.universal else tag
        state = checkpoint.load(self.engine, self.config.checkpoint_dir, load_tag)
        self.step = self._saved_step = state["step"]
        self._trim_history()
        self._apply_schedule_flags()
        self.sampler.load_state_dict(checkpoint.regroup_sampler_state(state["sampler"], self.world_size))
        if len(state["rng"]) == self.world_size:
            checkpoint.set_rng_state(state["rng"][self.rank])  # the same dropout masks as an uninterrupted run
            log.info("resumed from %s at step %d", tag, self.step)
        else:
            # No saved generator belongs to this rank: new ones, still reproducible.
            checkpoint.reseed(self.config.engine.seed, self.rank, self.step)
            if self.is_rank0:
                log.info("resumed from %s at step %d on %s (saved by %d): the same data order and optimizer "
                         "state; dropout generators reseeded from (--seed, rank, step)", tag, self.step,
                         checkpoint.processes(self.world_size), len(state["rng"]))

    def _apply_schedule_flags(self) -> None:
        """This run's --learning-rate and --weight-decay, over the ones the checkpoint restored.

        DeepSpeed restores the scheduler's peak rates and the optimizer's groups as saved, so a
        resume with another --learning-rate (lowered after a loss spike, say) kept the old one
        while train_config.json and MLflow recorded the new. --steps and --warmup-steps already
        take effect: the schedule's function is this run's, not saved."""
        settings, scheduler = self.config.engine, self.scheduler
        saved_lr = scheduler.base_lrs[0]
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        scheduler.base_lrs = [settings.learning_rate] * len(scheduler.base_lrs)
        scheduler._last_lr = [settings.learning_rate * factor] * len(scheduler.base_lrs)
        saved_decay = self.optimizer.param_groups[0].get("weight_decay")
        # A checkpoint's groups carry their run's settings: a LAMB one saved before the exempt group's
        # trust ratio was pinned would bring back the 0.01-10 clamp.
        for group, values in zip(self.optimizer.param_groups, group_settings(settings.weight_decay, self.ds_config)):
            group["lr"] = settings.learning_rate * factor  # the next update's, before the scheduler steps
            group.update(values)
        if self.is_rank0 and (saved_lr != settings.learning_rate or saved_decay != settings.weight_decay):
            log.info("resumed with --learning-rate %g and --weight-decay %g (the checkpoint's run had %g and %g)",
                     settings.learning_rate, settings.weight_decay, saved_lr, saved_decay)

    def _universal_tag(self, tag: str) -> str:
        """Rank 0 converts ``tag`` to a universal checkpoint (once); every rank then loads that."""
        failed = None
        # The conversion writes files per weight and moment, serially: on a busy shared file system
        # it may outlast --dist-timeout-minutes, after which the waiting ranks would give up, and every
        # resubmission would start it over. They wait for it up to UNIVERSAL_CONVERSION_MINUTES.
        timeout = self.config.engine.dist_timeout_minutes
        with waiting_longer(max(timeout, UNIVERSAL_CONVERSION_MINUTES), timeout):
            if self.is_rank0:
                log.info("%s/%s was saved by %s: regrouping its ZeRO partitions for %d (a universal checkpoint, "
                         "once)", self.config.checkpoint_dir, tag,
                         checkpoint.processes(self.resume_plan.saved_world_size), self.world_size)
                try:
                    checkpoint.to_universal(self.config.checkpoint_dir, tag)
                except Exception as err:  # the other ranks must not wait for a conversion that never ends
                    failed = err
            failed_anywhere = agree([failed is not None], self.world_size, self.engine.device)[0]
        if failed_anywhere:
            raise failed or RuntimeError(f"rank 0 failed to convert {self.config.checkpoint_dir}/{tag} to a "
                                         "universal checkpoint (see its log)")
        return tag + checkpoint.UNIVERSAL

    def _invariants(self) -> dict:
        """This run's values of what a resume must keep (checkpoint.RESUME_INVARIANTS), as saved."""
        architecture = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                        "vocab_size", "max_position_embeddings", "type_vocab_size")
        return {"model_config": {k: getattr(self.model_config, k) for k in architecture},
                "micro_batch_size": self.config.engine.micro_batch_size, "seed": self.config.engine.seed,
                "train_rows": self.train_rows,
                "zero_class": checkpoint.zero_class(checkpoint.zero_stage(self.ds_config)),
                "precision": precision(self.ds_config)}

    def save(self) -> str:
        began = time.monotonic()
        # Every rank's RNG state, gathered so that any rank can restore its own.
        states = [None] * self.world_size
        if self.world_size > 1:
            torch.distributed.all_gather_object(states, checkpoint.rng_state())
        else:
            states = [checkpoint.rng_state()]
        client = {"step": self.step, "sampler": self.loader.state_dict(), "rng": states}
        # What a resume on another number of processes checks before loading anything.
        meta = {"tokenizer_fingerprint": self.manifest["tokenizer"]["fingerprint"],
                "data_run_id": self.manifest.get("data_run_id"), "data_recipe": data_recipe(self.manifest),
                "world_size": self.world_size,
                "global_batch_size": self.batches.global_batch_size, **self._invariants(),
                # lineage: the run that wrote this tag, and the weights the run's first phase began from
                "pretrain_run_id": self.run_id, **self.init_info}
        tag = checkpoint.save(self.engine, self.config.checkpoint_dir, self.step, client,
                              self.config.keep_checkpoints, self.is_rank0, meta,
                              lambda tag: run_lock.check_still_held(self.config.run_dir, self._lock_token, tag),
                              exports=os.path.join(self.config.run_dir, "hf"))
        if self.is_rank0:
            log.info("saved checkpoint %s (%.2f s)", os.path.join(self.config.checkpoint_dir, tag),
                     time.monotonic() - began)
        self._saved_at, self._saved_step = time.monotonic(), self.step
        if self.is_rank0 and self.step < self.config.steps:
            # The older tags are pruned only once the next one is written: it needs room of its own.
            self._warn_if_short_of_space(checkpoint.saved_bytes(self.config.checkpoint_dir, tag),
                                         f"the next checkpoint (as large as {tag})")
        return tag

    def _warn_if_short_of_space(self, need: int, what: str, kept: bool = True) -> bool:
        warning = checkpoint.space_warning(self.config.checkpoint_dir, need, what, kept)
        if warning:
            log.warning("%s", warning)
        return warning is not None

    def _warn_if_export_short_of_space(self, checkpoint_bytes: int) -> None:
        """The Hugging Face export comes last, beside the last checkpoint when both share a file
        system: a disk with room for the checkpoints alone fails it after the whole run."""
        hf = os.path.join(self.config.run_dir, "hf")
        export = estimated_bytes(self.parameters,
                                 os.path.join(self.config.data, self.manifest["tokenizer"].get("path", "tokenizer")))
        beside = checkpoint_bytes if same_file_system(hf, self.config.checkpoint_dir) else 0
        usage = disk_usage(hf)
        if usage is not None and usage.free < export + beside:
            log.warning("%s has %s MiB free, and the Hugging Face export at the end of the run takes about %s MiB%s: "
                        "free space there before then, or the export fails (the last checkpoint stays: export it "
                        "with python pipeline/export.py %s)", hf, f"{usage.free / 2**20:,.0f}",
                        f"{export / 2**20:,.0f}", f" beside a checkpoint of {beside / 2**20:,.0f} MiB" if beside else "",
                        self.config.run_dir)

    def train_step(self) -> StepMetrics:
        """One optimizer step: DeepSpeed's accumulation over the micro-batches.

        Sums stay on the device; one transfer per step (not per micro-batch) keeps a GPU busy.
        """
        totals = torch.zeros(3, device=self.engine.device)
        counts = torch.zeros(4, dtype=torch.long, device=self.engine.device)
        squared = 0  # counted by the loader, on the host: no operation more for the device
        padded_before = self.loader.total_tokens
        rate = self.scheduler.get_last_lr()[0]  # before the boundary step moves the schedule on
        step_scale = loss_scale(self.engine)  # the one the step's gradients carry; the step may change it
        own_norm = None
        for micro in range(self.batches.accumulation_steps):
            mlm, nsp_loss, batch_counts = pretraining_losses(self.engine, next(self.loader))
            squared += self.loader.last_squared_tokens
            loss = mlm + nsp_loss * self.nsp_weight
            self.backward(loss)
            if self._own_grad_norm and micro == self.batches.accumulation_steps - 1:
                # The reduced gradients, before the boundary step clips, applies and zeroes them.
                own_norm = gradient_norm(self.engine.module.parameters())
            try:
                optimizer_step(self.engine)
            except LossScaleFloor as err:
                raise NonFiniteLoss(f"{err} at step {self.step + 1}: stopping every rank; the last checkpoint holds "
                                    "the weights from before (lower --learning-rate; or bf16, in a new --run-dir "
                                    "with --init-from this one)") from err
            totals += torch.stack([loss.detach(), mlm.detach(), nsp_loss.detach()])
            counts += batch_counts
        self.step += 1
        n = self.batches.accumulation_steps
        seqs = n * self.config.engine.micro_batch_size
        # Each transfer to the host waits for the GPU to finish all it was given, and the GPU then
        # idles until the host sends more: the sums, counts and gradient norm come back in one.
        # a device tensor, a float or None
        grad_norm = own_norm if self._own_grad_norm else unscaled_grad_norm(
            self.engine, self.engine.get_global_grad_norm(), step_scale)
        on_device = [totals.double(), counts.double()]
        if torch.is_tensor(grad_norm):
            on_device.append(grad_norm.detach().reshape(1).to(totals.device, torch.float64))
        host = torch.cat(on_device).tolist()
        loss, mlm, nsp_loss = host[:3]
        hits, masked, nsp_hits, real = (int(v) for v in host[3:7])
        if torch.is_tensor(grad_norm):
            grad_norm = host[7]
        scale = loss_scale(self.engine)
        return StepMetrics(loss / n, mlm / n, nsp_loss / n, hits / max(masked, 1), nsp_hits / seqs, real, seqs,
                           masked, squared, self.loader.total_tokens - padded_before, rate,
                           float("nan") if grad_norm is None else float(grad_norm),
                           float("nan") if scale is None else float(scale), self.engine.was_step_applied(),
                           grad_norm is not None)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracies on the held-out shards, summed over all processes."""
        self.engine.eval()
        sums = torch.zeros(6, dtype=torch.float64, device=self.engine.device)
        try:
            for rows in one_batch_ahead(self.dataset.read_ahead, self.eval_rows):
                batch = self.dataset.batch(rows)
                mlm, nsp_loss, (hits, masked, nsp_hits, _) = pretraining_losses(self.engine, batch)
                sums += torch.stack([mlm.double() * masked, nsp_loss.double() * len(rows), hits.double(),
                                     masked.double(), nsp_hits.double(), sums.new_full((), float(len(rows)))])
        finally:
            self.engine.train()
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
        mlm_sum, nsp_sum, hits, masked, nsp_hits, seqs = sums.tolist()
        values = {"eval_mlm_loss": mlm_sum / masked, "eval_nsp_loss": nsp_sum / seqs,
                  "eval_loss": mlm_sum / masked + self.nsp_weight * nsp_sum / seqs, "eval_mlm_accuracy": hits / masked,
                  "eval_nsp_accuracy": nsp_hits / seqs, "eval_sequences": seqs}
        if not self.nsp_weight:  # MLM-only data (as in _log)
            del values["eval_nsp_loss"], values["eval_nsp_accuracy"]
        return values

    def train(self, tracker=None, on_step=None) -> int:
        """Runs to ``--steps``; returns 0, or EXIT_STOPPED after a stop signal's checkpoint."""
        # The log window's training time: evaluations and saves inside it are taken out.
        started, window, paused = time.monotonic(), [], 0.0
        if self.step == self.config.steps and self.is_rank0:  # stopped after its last step (a time limit, say)
            log.info("resumed at step %d, the last (--steps %d): the checkpoint is evaluated and exported",
                     self.step, self.config.steps)
        elif self.step > self.config.steps and self.is_rank0:
            log.warning("resumed at step %d, which --steps %d does not pass: nothing to train (raise --steps to "
                        "continue); the checkpoint is evaluated and exported as it is", self.step, self.config.steps)
        # On a terminal, a bar; in a batch log (SLURM), the metric lines every --log-every are the progress.
        bar = tqdm(total=self.config.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.is_rank0 and sys.stderr.isatty()))
        try:
            while self.step < self.config.steps:
                metrics = self.train_step()
                window.append(metrics)
                bar.update(1)
                if on_step:
                    on_step(self, metrics)
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    values = self._log(window, time.monotonic() - started - paused, tracker)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", mlm_acc=f"{values['mlm_accuracy']:.3f}")
                    window = []
                if not window:
                    started, paused = time.monotonic(), 0.0
                if self.eval_shards and self.config.eval_every and self.step % self.config.eval_every == 0 \
                        and self.step < self.config.steps:
                    began = time.monotonic()
                    self._log_eval(self.evaluate(), tracker)
                    paused += time.monotonic() - began
                # One all-reduce a step settles what every rank must do alike: a stop (a signal may
                # reach some ranks only), a time-based save (clocks differ), and a non-finite loss (one
                # rank's batch can poison its loss alone; had that rank raised by itself, the others
                # would wait for it in their next collective until a timeout).
                # A bad loss is sent as 2 x world size - rank, a bad gradient norm under a finite loss as
                # world size - rank: the maximum names the lowest rank with a bad loss, the cause (its
                # gradients, reduced into every rank's, make every norm bad), else the lowest bad norm.
                minutes = self.config.checkpoint_minutes
                n = self.world_size
                stop, timely, bad, applied = agree(
                    [self.stop.requested, minutes > 0 and time.monotonic() - self._saved_at >= 60 * minutes,
                     0 if metrics.finite else (2 * n if not np.isfinite(metrics.loss) else n) - self.rank,
                     metrics.applied], n, self.engine.device)
                bad = int(bad)
                self._check_finite(metrics, (2 * n - bad if bad > n else n - bad) if bad else None, bool(applied),
                                   bad_loss=bad > n)
                if stop:
                    if window:  # the steps since the last log line: metrics.jsonl skipped them (every rank agreed)
                        self._log(window, time.monotonic() - started - paused, tracker)
                    return self._stopped(self.save())
                if timely or (self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0):
                    began = time.monotonic()
                    tag = self.save()
                    paused += time.monotonic() - began
                    # A signal that came during the save stops the run now: otherwise one more step
                    # and a second save, which the time between SLURM's warning and its kill
                    # (slurm/pretrain.sh) is not sized for.
                    if agree([self.stop.requested], n, self.engine.device)[0]:
                        if window:
                            self._log(window, time.monotonic() - started - paused, tracker)
                        return self._stopped(tag)
            # Saved before the final evaluation: a failure in it (out of memory, a full disk under
            # eval.jsonl, a second Ctrl-C) keeps the trained steps
            tag = self.save() if self._saved_step != self.step else checkpoint.tag_for(self.step)
            # A stop signal that came since the last step (the time limit's warning): the final
            # evaluation and export may outlast the warning, and a job killed in them is not
            # requeued. The requeued job resumes at the last step, then evaluates and exports.
            if agree([self.stop.requested], self.world_size, self.engine.device)[0]:
                return self._stopped(tag)
            # From here no step is left to stop at: a signal now is said as what it leads to.
            self.stop.action = (f"the last step is saved ({tag}); the final evaluation and export finish, "
                                "then the run ends")
            if self.eval_shards:
                self.final_eval = {"step": self.step, **self.evaluate()}
                if self.is_rank0:  # a rerun of a finished run evaluates its last step again: once in the file
                    keep_steps_up_to(os.path.join(self.config.run_dir, "eval.jsonl"), self.step - 1)
                self._log_eval(self.final_eval, tracker)
            return 0
        finally:
            bar.close()
            self.loader.close()
            self.stop.uninstall_interrupt()

    def _stopped(self, tag: str) -> int:
        """EXIT_STOPPED, logged: a stop signal was honoured with checkpoint ``tag`` saved."""
        if self.is_rank0:
            log.warning("stopped at step %d with checkpoint %s saved; the same command resumes from it "
                        "(exit %d: slurm/pretrain.sh requeues)", self.step,
                        os.path.join(self.config.checkpoint_dir, tag), EXIT_STOPPED)
        return EXIT_STOPPED

    def _check_finite(self, metrics: StepMetrics, bad_rank: int | None, applied: bool,
                      bad_loss: bool = True) -> None:
        """A non-finite loss whose update was applied stops the run at once, before any checkpoint
        could save the poisoned weights; so does an applied update whose gradient norm is not
        finite under a finite loss (bf16 with DeepSpeed's overflow check off). A step whose update
        DeepSpeed skipped (the fp16 loss scaler's overflow; ZeRO's overflow check, on by default,
        in fp32 and bf16 too) left the weights intact: the run goes on, unless it never recovers.

        Decided from what every rank agreed on, so all ranks raise NonFiniteLoss at the same step:
        ``bad_rank`` is the lowest rank whose loss is not finite (``bad_loss``), else the lowest
        whose gradient norm is not (``StepMetrics.finite``; None: every step is finite), and
        ``applied`` whether any rank applied its update."""
        self._skipped = 0 if applied else self._skipped + 1
        if self._skipped >= MAX_SKIPPED_UPDATES:
            raise NonFiniteLoss(f"{self._skipped} updates in a row skipped up to step {self.step} (gradients not "
                                "finite; fp16: even at the minimum loss scale): stopping every rank; the last "
                                "checkpoint holds the weights from before (lower --learning-rate; or bf16, in a new --run-dir with "
                                "--init-from this one)")
        if bad_rank is None:
            self._nonfinite = 0
            return
        self._nonfinite += 1
        where = f"on rank {bad_rank} of {self.world_size}" if self.world_size > 1 else ""
        if not bad_loss:
            # The norm is global, the same on every rank: no rank to name. DeepSpeed reports NaN as inf.
            what, where = f"the gradient norm is {metrics.grad_norm} (loss {metrics.loss:.4g})", ""
        else:  # this rank's own loss, if it is the bad one
            what = f"loss is {metrics.loss if not np.isfinite(metrics.loss) else 'non-finite'}"
        if applied:
            raise NonFiniteLoss(f"{what} at step {self.step} and the update was applied"
                                f"{f' ({where})' if where else ''}: stopping every rank without writing a "
                                "checkpoint (lower --learning-rate, or check the data)")
        if self._nonfinite >= MAX_NONFINITE_STEPS:
            raise NonFiniteLoss(f"loss non-finite for {self._nonfinite} steps in a row up to step {self.step} "
                                f"({f'{where}, ' if where else ''}each update skipped): stopping every rank")

    def _log_eval(self, values: dict, tracker) -> None:
        values = {k: v for k, v in values.items() if k != "step"}
        if self.is_rank0:
            append_history(self.config.run_dir, "eval.jsonl", {"step": self.step, **values})
            log.info("eval at step %d  %s", self.step, "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
            if tracker:
                tracker.log_metrics(values, self.step)

    def executed_flops_per_sequence(self, real_tokens: float, predictions: float, squared_tokens: float) -> float:
        """FLOPs run per sequence (FlopCounter.executed_per_sequence), given the mean real length,
        masked count and real length squared: with --compile every batch is padded to
        max_seq_length, which is then what runs. The padding of a length-grouped batch (at most 7
        tokens) is not counted."""
        if self.config.compile:
            real_tokens = self.manifest["max_seq_length"]
            squared_tokens = real_tokens * real_tokens
        return self.flops.executed_per_sequence(real_tokens, predictions, squared_tokens)

    def _log(self, window: list[StepMetrics], seconds: float, tracker) -> None:
        counts = [float(sum(m.sequences for m in window)), float(sum(m.real_tokens for m in window)),
                  float(sum(m.predictions for m in window)), float(sum(m.squared_tokens for m in window)),
                  float(sum(m.padded_tokens for m in window))]
        values = {
            "loss": float(np.mean([m.loss for m in window])),
            "mlm_loss": float(np.mean([m.mlm_loss for m in window])),
            "nsp_loss": float(np.mean([m.nsp_loss for m in window])),
            "mlm_accuracy": float(np.mean([m.mlm_accuracy for m in window])),
            "nsp_accuracy": float(np.mean([m.nsp_accuracy for m in window])),
            "learning_rate": window[-1].learning_rate,
            # once summed over the ranks
            "sequences_per_second": None, "real_tokens_per_second": None, "real_token_share": None,
            # over the applied updates: a skipped one reports inf (fp16 overflow), which would blank it
            "grad_norm": float(np.mean(finite_norms)) if (finite_norms := [
                m.grad_norm for m in window if np.isfinite(m.grad_norm)]) else float("nan"),
        }
        if self.engine.fp16_enabled():
            values["loss_scale"] = window[-1].loss_scale
            values["skipped_steps"] = float(self.engine.skipped_steps)
        if self.world_size > 1:
            # Every rank saw different micro-batches: report the global means, and the sums of what
            # every rank ran (ranks' batches differ in length).
            names = ["loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy"]
            local = torch.tensor([values[n] for n in names] + counts, dtype=torch.float64, device=self.engine.device)
            torch.distributed.all_reduce(local)
            summed = local.tolist()  # one host read
            values.update({n: v / self.world_size for n, v in zip(names, summed)})
            counts = summed[len(names):]
        seqs, tokens, predictions, squared, padded = counts
        values["sequences_per_second"] = seqs / max(seconds, 1e-9)
        values["real_tokens_per_second"] = tokens / max(seconds, 1e-9)
        values["real_token_share"] = tokens / padded if padded else float("nan")
        if not self.nsp_weight:  # MLM-only data: the NSP head sees all-zero labels, its figures mean nothing
            del values["nsp_loss"], values["nsp_accuracy"]
        if self.config.peak_tflops:
            # Two MFUs (FlopCounter): mfu_model counts the dense model on full-length sequences, as
            # published figures do; mfu_executed what ran, at the window's mean real length, masked
            # count and length squared (executed_flops_per_sequence).
            peak = self.config.peak_tflops * 1e12 * self.world_size
            model_flops = self.flops.model_per_sequence(self.manifest["max_seq_length"])
            values["mfu_model"] = values["sequences_per_second"] * model_flops / peak
            values["mfu_executed"] = (values["sequences_per_second"] * self.executed_flops_per_sequence(
                tokens / max(seqs, 1), predictions / max(seqs, 1), squared / max(seqs, 1)) / peak)
        if self.is_rank0:
            # a value the window has none of (the norm when every update was skipped) is null
            append_history(self.config.run_dir, "metrics.jsonl", {"step": self.step, **values})
            log.info("step %d/%d  %s", self.step, self.config.steps,
                     "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
            if tracker:
                tracker.log_metrics({k: v for k, v in values.items() if np.isfinite(v)}, self.step)
        return values
