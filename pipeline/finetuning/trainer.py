"""The fine-tuning loop around a DeepSpeed engine.

Reads top to bottom: data → tokenizer → model → engine; then per epoch the optimizer
steps (DeepSpeed accumulates the micro-batches), a validation pass, the best weights
kept, early stopping; then the test pass with the best weights.

Batches do not depend on the number of processes: every epoch's order is one seeded
permutation, cut into global batches, each cut into micro-batches dealt in turn to the
ranks (1 rank x 2 accumulation steps and 2 ranks x 1 see the same global batch). The
last global batch of an epoch is filled from the epoch's start, so no row is skipped.
Evaluation: every rank predicts a disjoint strided part, the predictions are
all-gathered, and every rank computes the same metrics, so early stopping agrees
without another collective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch

from pipeline.ds_config import DsConfigError
from pipeline.engine import (LossScaleFloor, MAX_SKIPPED_UPDATES, PAD_MULTIPLE, ScaledBackward, StopFlag, agree,
                             ensure_distributed_env, gradient_norm, init_distributed, initialize, keeps_no_grad_norm,
                             loss_scale, optimizer_step, zero0_masters)
from pipeline.finetuning.config import FinetuneConfig, FinetuneConfigError, check_output_dir
from pipeline.finetuning.data import Examples, load_prediction_inputs, load_task_data
from pipeline import model_card
from pipeline.export import TRAINING_INFO, estimated_bytes
from pipeline.finetuning.model import (build_classifier, default_max_length, load_tokenizer, model_lineage,
                                       read_training_info, resolve_model_dir, tokenizer_fingerprint)
from pipeline.length_batches import WINDOW_BATCHES, length_grouped
from pipeline.metrics import (CLASSIFICATION_METRICS, LOWER_IS_BETTER, REGRESSION_METRICS, confusion_matrix,
                              constant_prediction_warning, json_line, one_class_warning, per_class_report,
                              task_metrics)
from pipeline.model import forward_attention_mask
from pipeline.output_path import built_beside, file_beside
from pipeline.tokenized import Ragged, tokenize
from pipeline.tracking import config_params
from preprocessing.vocab import SPM_MODEL_FILE, make_tokenizer_config_portable
from preprocessing.write_failure import writing

log = logging.getLogger(__name__)
PREDICTIONS = "predictions"  # OUTPUT_DIR/predictions/NAME.tsv, one per --predict input


@dataclasses.dataclass
class Encoded:
    """A tokenized split: unpadded ids and segment ids (pipeline/tokenized.py), labels, and how
    many rows were cut."""

    input_ids: Ragged
    token_type_ids: Ragged
    labels: np.ndarray
    truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, examples: Examples, max_length: int) -> Encoded:
    ids, types, truncated = tokenize(tokenizer, examples.texts, examples.pairs, max_length)
    return Encoded(ids, types, examples.labels, truncated)


def collate(split: Encoded, rows: np.ndarray, pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Padded to the longest row rounded up to PAD_MULTIPLE."""
    longest = max(len(split.input_ids[i]) for i in rows)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, i in enumerate(rows):
        n = len(split.input_ids[i])
        ids[k, :n], types[k, :n], mask[k, :n] = split.input_ids[i], split.token_type_ids[i], 1
    labels = torch.from_numpy(split.labels[rows])
    return {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(mask),
            "labels": labels.long() if task == "classification" else labels.float()}


def on_device(batch: dict[str, torch.Tensor], device, model_type: str) -> dict[str, torch.Tensor]:
    """A collated batch as the model's forward takes it on ``device``. A BERT gets its mask from
    forward_attention_mask (no host wait); other encoders, which fine-tuning also takes, keep the
    2-D mask some of them need (ModernBERT's mean pooling, LayoutLM)."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if model_type == "bert":
        moved["attention_mask"] = forward_attention_mask(batch["attention_mask"], moved["attention_mask"])
    return moved


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The loss Hugging Face's sequence classifiers compute (cross-entropy; mean squared error for
    regression), in fp32: theirs is in the logits' dtype, and the gradient of an fp16 loss at
    fp16's loss scale of 2^16 is inf in fp16, an update skipped at the start and each time the
    scale grows back."""
    logits = logits.float()
    if task == "classification":
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    return torch.nn.functional.mse_loss(logits.squeeze(-1), labels)


def clear_previous_outputs(output_dir: str) -> list[str]:
    """Removes what a previous run left in ``output_dir`` (its report, confusion matrix, model and
    predictions):
    beside this run's metrics.jsonl they made a killed run look complete, and a regression run
    kept a classification run's confusion matrix. Returns the names removed."""
    from pipeline.finetuning.report import CONFUSION_PNG, REPORT
    from pipeline.output_path import remove

    removed = []
    for name in (REPORT, CONFUSION_PNG, "model", PREDICTIONS):
        path = os.path.join(output_dir, name)
        if os.path.lexists(path):
            remove(path)
            removed.append(name)
    if removed:
        log.warning("--output-dir %s held a previous run's %s: removed", output_dir, ", ".join(removed))
    return removed


def warn_if_short_of_space(output_dir: str, model, model_dir: str) -> None:
    """The model is written at the end, and fine-tuning keeps no checkpoint: an output disk too full
    for it would lose the whole run. Said at the start, while there is time to free space."""
    need = estimated_bytes(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()), model_dir)
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        return
    if free < need * 1.1:
        log.warning("--output-dir %s has %.0f MiB free; the fine-tuned model needs about %.0f MiB at the end of "
                    "the run (no checkpoint is kept before it): free space there before then", output_dir,
                    free / 2**20, need / 2**20)


@dataclasses.dataclass
class EpochResult:
    epoch: int
    train_loss: float
    validation: dict[str, float]
    seconds: float
    sequences: int


def finetune_run_id() -> str | None:
    """The active MLflow run's id (rank 0 of a tracked run), so that what uses the saved model
    (embed.py, a later fine-tuning) can name its lineage."""
    mlflow = sys.modules.get("mlflow")  # imported only where a run is tracked
    active = mlflow.active_run() if mlflow is not None else None
    return active.info.run_id if active is not None else None


def untrained_positions_warning(max_length: int, tokenizer, init: str) -> str | None:
    """Says so when fine-tuning reaches positions pretraining never saw.

    The tokenizer written by preprocessing keeps the pretraining sequence length as its
    ``model_max_length``: position embeddings beyond it are still as initialised, so an
    example that long meets the encoder half untrained.
    """
    pretrained = getattr(tokenizer, "model_max_length", None)
    if init != "pretrained" or not pretrained or pretrained >= 1e9 or max_length <= pretrained:
        return None
    return (f"--max-seq-length {max_length} is longer than the {pretrained} tokens the model was pretrained on: "
            f"position embeddings {pretrained}..{max_length - 1} were never trained. Pretrain at "
            f"--max-seq-length {max_length} (or phase 2 with --init-from), or fine-tune at {pretrained}")


class Diverged(FloatingPointError):
    """Training went non-finite; raised by every rank at the same point (a mean loss or gradient
    norm reduced over the ranks, DeepSpeed's agreed overflow), so the command can end with one
    line per rank after a barrier."""


class Stopped(Exception):
    """A stop signal, agreed on by every rank at the same optimizer step (``Finetuner.stop``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Finetuner:
    def __init__(self, config: FinetuneConfig):
        from transformers import AutoConfig

        self.config = config
        settings = config.engine  # EngineConfig (self.engine: the DeepSpeed engine it builds)
        # From the start: a signal during start-up is honoured at the first optimizer step (but in
        # the rendezvous, StopFlag.killable).
        self.stop = StopFlag("stopping every rank at the end of this optimizer step (fine-tuning keeps no "
                             "checkpoint)")
        self.stop.install()
        self.rank, self.local_rank, self.world_size = ensure_distributed_env("slurm/finetune.sh")
        # The flags and the data are checked before the process group starts (DeepSpeed's start-up,
        # tens of seconds on a first run): every rank reads the same files and fails the same way.
        check_output_dir(config.output_dir, config.model)
        self.split_seed = settings.seed if config.split_seed is None else config.split_seed
        self.data = load_task_data(
            data=config.data, train=config.train, validation=config.validation, test=config.test,
            validation_split=config.validation_split, test_split=config.test_split, text_column=config.text_column, text_pair_column=config.text_pair_column,
            label_column=config.label_column, task=config.task, drop_labels=config.drop_labels,
            validation_fraction=config.validation_fraction, test_fraction=config.test_fraction,
            seed=self.split_seed)
        self.task = self.data.task
        self.to_predict = load_prediction_inputs(config.predict, data=config.data, task=self.task,
                                                 text_column=config.text_column,
                                                 text_pair_column=config.text_pair_column)
        self.metric = config.best_metric(self.task)
        if self.task == "regression" and self.metric in CLASSIFICATION_METRICS:
            raise FinetuneConfigError(f"--metric {self.metric} is a classification metric; this is a regression task")
        if self.task == "classification" and self.metric in REGRESSION_METRICS:
            raise FinetuneConfigError(f"--metric {self.metric} is a regression metric; this is a classification task "
                                      f"({len(self.data.labels)} labels; --task regression if the labels are scores)")
        if self.task == "regression" and config.predict_as == "id":
            raise FinetuneConfigError("--predict-as id: a regression task predicts scores, not classes")
        if config.predict_as == "id" and config.predict and self.data.classes_left_out:
            raise FinetuneConfigError(
                f"--predict-as id: the model's class ids are not the ClassLabel's, which has classes train has no "
                f"row of ({', '.join(map(repr, self.data.classes_left_out[:10]))}); predict as labels instead")
        if self.metric == "f1_binary" and len(self.data.labels) != 2:
            raise FinetuneConfigError(f"--metric f1_binary needs two labels; the data has {len(self.data.labels)}")
        with self.stop.killable():
            init_distributed(settings.dist_timeout_minutes)
        os.makedirs(config.output_dir, exist_ok=True)

        self.hf_dir = resolve_model_dir(config.model, config.output_dir, self.is_rank0, self.barrier)
        # run ids of what the model came from: an export's pretraining, or a fine-tuned model's runs
        self.lineage = model_lineage(self.hf_dir)
        if config.init == "random":  # only the architecture and tokenizer come from it: its ids still say which
            self.lineage["model_kind"] = "random_init"
        # The tokenizer is checked against the model's config before any weight is loaded.
        self.tokenizer = load_tokenizer(self.hf_dir, config.tokenizer, AutoConfig.from_pretrained(self.hf_dir))
        torch.manual_seed(settings.seed)  # the classifier head (and, with --init random, every weight)
        model = build_classifier(self.hf_dir, self.task, self.data.labels, config.init, config.reinit_pooler)
        if self.is_rank0:
            warn_if_short_of_space(config.output_dir, model, self.hf_dir)
        self.max_length = self._max_length(model.config)
        self.convert = read_training_info(self.hf_dir).get("convert")
        if self.convert:
            self._convert_script()
        self.splits = {name: encode(self.tokenizer, examples, self.max_length)
                       for name, examples in self.data.splits.items()}
        self.prediction_sets = {name: encode(self.tokenizer, examples, self.max_length)
                                for name, examples in self.to_predict.items()}
        if self.is_rank0:
            self._log_splits()

        self.batches = settings.batches(self.world_size)
        self.steps_per_epoch = math.ceil(len(self.splits["train"]) / settings.global_batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        warmup = int(config.warmup_fraction * self.total_steps)
        self.ds_config = settings.deepspeed_config(self.batches)
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage > 2:
            raise DsConfigError(f"--ds-config {settings.ds_config}: ZeRO stage {stage} partitions the weights, which "
                                "keeping the best epoch's weights needs whole; use a stage 0-2 config")
        self.engine, self.optimizer, self.scheduler = initialize(model, settings, self.ds_config, self.total_steps,
                                                                 warmup)
        self.backward = ScaledBackward(self.engine)
        self.step = 0
        self._own_grad_norm = keeps_no_grad_norm(self.engine)  # ZeRO-0's plain optimizer keeps none
        self._last_rate = float("nan")  # the learning rate of the last update (logged per epoch)
        self._skipped_before, self._skipped_in_a_row = 0, 0
        self.history: list[EpochResult] = []
        self.best: EpochResult | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def _convert_script(self) -> None:
        """The pretraining data's script conversion (--convert t2s: Traditional to Simplified),
        applied to every split's texts: the vocabulary holds the converted script, so text in the
        other one was mostly [UNK] (我們 → 我 [UNK])."""
        from preprocessing.language import Converter

        converter = Converter(self.convert)
        for examples in (*self.data.splits.values(), *self.to_predict.values()):
            examples.texts = [converter(t) for t in examples.texts]
            if examples.pairs:
                examples.pairs = [converter(t) for t in examples.pairs]
        if self.is_rank0:
            log.info("texts converted with OpenCC %s, as the pretraining data was (the export's training_info.json)",
                     self.convert)

    def _log_splits(self) -> None:
        """A line per split: its rows, where they came from (a seeded cut of train says how), the
        rows --drop-label took out and those cut at the length; report.json has the same."""
        config, seed = self.config, self.split_seed
        for name, encoded in self.splits.items():
            source = self.data.split_from[name]
            if source.endswith("(seeded split)"):
                fraction = config.validation_fraction if name == "validation" else config.test_fraction
                source = f"{source[:-len('(seeded split)')]}(--{name}-fraction {fraction:g} of it, seed {seed})"
            dropped = self.data.dropped.get(name, 0)
            cut = encoded.truncated
            log.info("%s: %d rows from %s%s%s", name, len(encoded), source,
                     f"; {dropped} dropped by --drop-label" if dropped else "",
                     f"; {cut} cut at {self.max_length} tokens (--max-seq-length)" if cut else "")

    def _max_length(self, model_config) -> int:
        limit = model_config.max_position_embeddings
        if self.config.max_seq_length is None:
            return default_max_length(self.tokenizer, model_config)
        if self.config.max_seq_length > limit:
            raise FinetuneConfigError(f"--max-seq-length {self.config.max_seq_length} exceeds the model's "
                                f"max_position_embeddings {limit}")
        warning = untrained_positions_warning(self.config.max_seq_length, self.tokenizer, self.config.init)
        if warning and self.is_rank0:
            log.warning(warning)
        return self.config.max_seq_length

    # ------------------------------------------------------------------ training
    def epoch_micro_batches(self, epoch: int) -> list[list[np.ndarray]]:
        """Per optimizer step, this rank's micro-batches (row indices into the train split)."""
        settings = self.config.engine
        n, g, micro = len(self.splits["train"]), settings.global_batch_size, settings.micro_batch_size
        order = np.random.default_rng([settings.seed, epoch]).permutation(n)
        order = np.concatenate([order, np.resize(order, (-n) % g)])  # fill the last step from the start
        if self.config.group_by_length:  # global batches of like length: every rank's micro-batches alike
            # At least 4 windows (as Hugging Face's sampler keeps): with the whole epoch in one window a
            # row would share its batch with much the same rows every epoch. (A refill row and its
            # original, equal in length, may share a batch: one row counted twice, as without grouping.)
            window = max(1, min(WINDOW_BATCHES, len(order) // g // 4))
            order = length_grouped(order, self.splits["train"].input_ids.lengths(), g,
                                   np.random.default_rng([settings.seed, epoch, 2]), window).reshape(-1)
        steps = []
        for start in range(0, len(order), g):
            micro_batches = order[start:start + g].reshape(-1, micro)
            steps.append([micro_batches[a * self.world_size + self.rank]
                          for a in range(self.batches.accumulation_steps)])
        return steps

    def train_epoch(self, epoch: int, progress=None) -> tuple[float, float, int]:
        """(mean train loss over all ranks, seconds, sequences over all ranks)."""
        self.engine.train()
        pad, device = self.tokenizer.pad_token_id, self.engine.device
        # Summed on the device: reading a loss on the host each micro-batch would wait for the GPU.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        micro_steps = 0
        started = time.perf_counter()
        for step, micro_batches in enumerate(self.epoch_micro_batches(epoch)):
            own_norm = None
            for micro, rows in enumerate(micro_batches):
                inputs = on_device(collate(self.splits["train"], rows, pad, self.task), device,
                                   self.engine.module.config.model_type)
                labels = inputs.pop("labels")
                loss = task_loss(self.engine(**inputs).logits, labels, self.task)
                self.backward(loss)
                if micro == len(micro_batches) - 1:
                    self._last_rate = self.scheduler.get_last_lr()[0]  # the update's, before the schedule moves on
                    if self._own_grad_norm:
                        own_norm = gradient_norm(self.engine.module.parameters())  # before the step zeroes them
                try:
                    optimizer_step(self.engine)
                except LossScaleFloor as err:
                    raise Diverged(f"{err} in epoch {epoch}: lower --learning-rate, or use bf16") from err
                loss_sum += loss.detach().double()
                micro_steps += 1
            self._check_gradient_norm(epoch, own_norm)  # the optimizer step these micro-batches made
            self._check_skipped(epoch)
            self.step += 1
            signum = agree([self.stop.signum], self.world_size, device)[0]  # a signal may reach some ranks only
            if signum:
                raise Stopped(int(signum))
            if progress is not None:
                progress.update(1)
                # The epoch's mean loss so far, read from the device at its first step and every 20th.
                if step % 20 == 0 and not getattr(progress, "disable", False):
                    progress.set_postfix(epoch=epoch, loss=f"{loss_sum.item() / micro_steps:.4f}", refresh=False)
        seconds = time.perf_counter() - started
        # On the device (NCCL reduces GPU tensors only), and reduced before it is checked, so that
        # a NaN on one rank stops every rank here rather than leaving the others in a collective.
        if self.world_size > 1:
            torch.distributed.all_reduce(loss_sum)
        loss = loss_sum.item() / (micro_steps * self.world_size)
        if not math.isfinite(loss):
            raise Diverged(f"train loss is {loss} in epoch {epoch}: lower --learning-rate")
        sequences = self.steps_per_epoch * self.config.engine.global_batch_size
        return loss, seconds, sequences

    def _check_gradient_norm(self, epoch: int, own_norm=None) -> None:
        """An update applied with a non-finite gradient norm (bf16 with DeepSpeed's overflow check
        off applies NaN gradients) stops at once, before the poisoned weights could be kept. The
        norm is global, so every rank stops at the same step."""
        norm = own_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        if norm is not None and self.engine.was_step_applied() and not math.isfinite(float(norm)):
            raise Diverged(f"the gradient norm is {float(norm)} in epoch {epoch} and the update was applied: "
                           "lower --learning-rate")

    def _check_skipped(self, epoch: int) -> None:
        """Updates DeepSpeed skipped in a row (fp16 overflows; ZeRO's overflow check on NaN
        gradients under a finite loss) stop the run after MAX_SKIPPED_UPDATES: an fp16 optimizer
        without ZeRO overflowing at its minimum loss scale skips every update to the end, and the
        run would report an untrained model. DeepSpeed's count is the same on every rank."""
        skipped = self.engine.skipped_steps
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if skipped > self._skipped_before else 0
        self._skipped_before = skipped
        if self._skipped_in_a_row >= MAX_SKIPPED_UPDATES:
            raise Diverged(f"{self._skipped_in_a_row} updates in a row skipped up to epoch {epoch} (gradients not "
                           "finite; fp16: even at the minimum loss scale): lower --learning-rate, or use bf16")

    def predict(self, split: str) -> np.ndarray:
        """Model outputs (logits, or scores for regression) for every row of a split, on every rank."""
        return self.outputs(self.splits[split])

    @torch.no_grad()
    def outputs(self, data: Encoded) -> np.ndarray:
        """Model outputs for every row of ``data``, on every rank (a collective when world_size > 1)."""
        module = self.engine.module
        module.eval()
        mine = np.arange(self.rank, len(data), self.world_size)
        width = module.config.num_labels
        local = np.zeros((len(mine), width), dtype=np.float32)
        # Batches of rows of like length, longest first: a batch pads to its longest row, so in
        # row order short reviews cost as much as long ones (1,281 reviews: 1.1 s instead of 2.0).
        lengths = data.input_ids.lengths()[mine]
        by_length = np.argsort(-lengths, kind="stable")
        for start in range(0, len(mine), self.config.eval_batch_size):
            positions = by_length[start:start + self.config.eval_batch_size]
            batch = collate(data, mine[positions], self.tokenizer.pad_token_id, self.task)
            batch.pop("labels")
            inputs = on_device(batch, self.engine.device, module.config.model_type)
            local[positions] = module(**inputs).logits.float().cpu().numpy()
        if self.world_size == 1:
            return local
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, (mine, local))
        full = np.zeros((len(data), width), dtype=np.float32)
        for rows, values in gathered:
            full[rows] = values
        return full

    def evaluate(self, split: str) -> tuple[dict[str, float], np.ndarray]:
        outputs = self.predict(split)
        labels = self.splits[split].labels
        metrics = task_metrics(self.task, labels, outputs, len(self.data.labels))
        if self.task == "classification":
            logits = torch.from_numpy(outputs)
            metrics["loss"] = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)))
        else:
            metrics["loss"] = metrics["mse"]
        return metrics, outputs

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        best = self.best.validation[self.metric]
        if not math.isfinite(value):  # a diverged epoch is never the best
            return False
        if not math.isfinite(best):  # nor does one keep a later epoch from being it
            return True
        return value < best if self.metric in LOWER_IS_BETTER else value > best

    def train(self, tracker=None) -> EpochResult:
        """Runs the epochs (early stopping after --patience epochs without a better --metric);
        leaves the best epoch's weights in the model and returns that epoch."""
        from tqdm import tqdm

        # A bar on a terminal; in a batch log (SLURM, a file) the per-epoch lines are the progress.
        progress = tqdm(total=self.total_steps, desc="fine-tuning", unit="step",
                        disable=not (self.is_rank0 and sys.stderr.isatty()), dynamic_ncols=True, mininterval=1.0)
        stale = 0
        if self.is_rank0:  # this run's epochs only, not a previous run's in the same OUTPUT_DIR
            path = os.path.join(self.config.output_dir, "metrics.jsonl")
            with writing("the epochs' metrics", path, "fine-tune again"):
                open(path, "w").close()
            clear_previous_outputs(self.config.output_dir)
        try:
            for epoch in range(1, self.config.epochs + 1):
                loss, seconds, sequences = self.train_epoch(epoch, progress)
                validation, _ = self.evaluate("validation")
                result = EpochResult(epoch, loss, validation, seconds, sequences)
                self.history.append(result)
                improved = self._improved(validation[self.metric])
                if improved:
                    self.best, stale = result, 0
                    self._best_state = self._full_precision_state()
                else:
                    stale += 1
                self._log_epoch(result, improved, tracker)
                if self.config.patience and stale >= self.config.patience and epoch < self.config.epochs:
                    log.info("early stop after epoch %d: validation %s has not improved for %d epochs (best %.4f, "
                             "epoch %d)", epoch, self.metric, stale, self.best.validation[self.metric], self.best.epoch)
                    break
        finally:
            progress.close()
            self.stop.uninstall_interrupt()
        # At full precision (under bf16/fp16 the module holds 16-bit copies): the test report then
        # measures the weights save_model writes. Training is over; nothing steps the engine again.
        self.engine.module.float().load_state_dict(self._best_state)
        return self.best

    def _full_precision_state(self) -> dict[str, torch.Tensor]:
        """The model's state on the CPU, its parameters at full precision: under bf16 or fp16 with
        ZeRO the module holds 16-bit copies and the optimizer the fp32 masters, which are what a
        saved fp32 model must hold (without ZeRO, the fp16/bf16 optimizer wrapper holds them). A
        collective under ZeRO: every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param

        without_zero = zero0_masters(self.engine.optimizer)
        state = {}
        for name, tensor in self.engine.module.state_dict(keep_vars=True).items():
            master = safe_get_full_fp32_param(tensor) if isinstance(tensor, torch.nn.Parameter) else None
            if master is None:
                master = without_zero.get(id(tensor))
            state[name] = (tensor if master is None else master).detach().to("cpu", copy=True)
        return state

    def _log_epoch(self, result: EpochResult, improved: bool, tracker) -> None:
        values = {"train/loss": result.train_loss, "train/sequences_per_second": result.sequences / result.seconds,
                  # the rate the epoch's last update used (the schedule's next one was 0 at the end)
                  "learning_rate": self._last_rate,
                  # updates skipped so far (fp16 overflow; ZeRO's overflow check): a skipped one also
                  # leaves the learning-rate schedule a step behind
                  "train/skipped_steps": float(self.engine.skipped_steps),
                  **{f"validation/{k}": v for k, v in result.validation.items()}}
        if self.engine.fp16_enabled():
            values["train/loss_scale"] = float(loss_scale(self.engine))
        if not self.is_rank0:
            return
        path = os.path.join(self.config.output_dir, "metrics.jsonl")
        with writing("the epochs' metrics", path, "fine-tune again"), open(path, "a") as f:
            f.write(json_line({"epoch": result.epoch, "step": self.step, **values}))
        log.info("epoch %d/%d  %s%s", result.epoch, self.config.epochs,
                 "  ".join(f"{k}={v:.4g}" for k, v in values.items()), "  (best so far)" if improved else "")
        if tracker:
            tracker.log_metrics(values, result.epoch)

    # ------------------------------------------------------------------ the report
    def test_report(self) -> dict:
        """Test-split metrics with the best weights, as the JSON report (every rank must call it)."""
        metrics, outputs = self.evaluate("test")
        report = {
            "task": self.task, "metric": self.metric, "best_epoch": self.best.epoch,
            "epochs_run": len(self.history), "init": self.config.init,
            "test": metrics, "validation": self.best.validation,
            "history": [dataclasses.asdict(h) for h in self.history],
            "rows": {name: len(split) for name, split in self.splits.items()},
            "rows_dropped": self.data.dropped, "rows_truncated": {n: s.truncated for n, s in self.splits.items()},
            "split_from": self.data.split_from, "max_seq_length": self.max_length,
            "model": self.hf_dir, "pretrain_run_id": self.lineage.get("pretrain_run_id"),
            "data_run_id": self.lineage.get("data_run_id"), "model_kind": self.lineage["model_kind"],
            "parent_finetune_run_id": self.lineage.get("finetune_run_id"), "world_size": self.world_size,
            "train_sequences_per_second": (sum(h.sequences for h in self.history)
                                           / max(sum(h.seconds for h in self.history), 1e-9)),
            # Every flag as resolved, so that a run without MLflow can be repeated from its report.
            "settings": config_params(self.config),
        }
        report["finetune_run_id"] = finetune_run_id()
        if self.task == "classification":
            k = len(self.data.labels)
            report["labels"] = self.data.labels
            test_matrix = confusion_matrix(self.splits["test"].labels, outputs.argmax(-1), k)
            report["confusion_matrix"] = test_matrix.tolist()
            collapsed = one_class_warning(test_matrix, self.data.labels)
            # Validation again with the best weights, now loaded at full precision, as saved.
            validation_matrix = confusion_matrix(self.splits["validation"].labels,
                                                 self.predict("validation").argmax(-1), k)
            report["per_class"] = {"validation": per_class_report(validation_matrix, self.data.labels),
                                   "test": per_class_report(test_matrix, self.data.labels)}
            if len(self.data.labels) == 2:
                report["f1_binary_positive_label"] = self.data.labels[1]
        else:
            collapsed = constant_prediction_warning(outputs, self.splits["test"].labels)
        if collapsed:
            report["warnings"] = [collapsed]
            if self.is_rank0:
                log.warning("%s", collapsed)
        return report

    def write_predictions(self, output_dir: str) -> dict[str, dict]:
        """The best model's predictions for each --predict input (every rank must call it): rank 0
        writes OUTPUT_DIR/predictions/NAME.tsv, GLUE's submission format (a header, then the row's
        index in its file and the predicted label, or the score for regression). Returns, per
        name, what report.json says of it."""
        import csv

        # Every collective first: a rank 0 that failed to write between two of them left the other
        # ranks waiting in the next one until the process group's timeout.
        outputs = {name: self.outputs(data) for name, data in self.prediction_sets.items()}
        written = {}
        for (name, data), spec in zip(self.prediction_sets.items(), self.config.predict):
            if not self.is_rank0:
                continue
            if self.task == "classification":
                classes = outputs[name].argmax(-1)
                values = classes.tolist() if self.config.predict_as == "id" else [self.data.labels[i] for i in classes]
            else:
                values = [str(np.float32(v)) for v in outputs[name][:, 0]]  # the shortest text that reads back
            path = os.path.join(output_dir, PREDICTIONS, f"{name}.tsv")
            with writing("the predictions", path, "fine-tune again (fine-tuning keeps no checkpoint)"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                # a killed run or a full disk leaves no partial file looking whole
                with file_beside(path) as temp, open(temp, "w", newline="") as f:
                    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
                    writer.writerow(["index", "prediction"])
                    writer.writerows(enumerate(values))
            written[name] = {"file": os.path.relpath(path, output_dir), "from": spec, "rows": len(data),
                             "rows_truncated": data.truncated}
            log.info("predictions for %d rows of %s: %s", len(data), spec, path)
        return written

    def save_model(self, directory: str, test_metrics: dict | None = None) -> str:
        """The best weights in Hugging Face format, fp32, with the tokenizer and the label mapping,
        ``training_info.json`` (what the model is, its lineage, the script conversion its texts
        need) and a model card; the folder appears under its name only once it is whole (a full
        disk leaves none)."""
        model = self.engine.module.float()  # after train(), already the best epoch's fp32 masters
        source = read_training_info(self.hf_dir)
        tokenizer_dir = self.config.tokenizer or self.hf_dir
        spm = os.path.join(tokenizer_dir, SPM_MODEL_FILE)  # save_pretrained leaves it out: copied below
        info = {"kind": "finetuned", "task": self.task, "labels": self.data.labels, "max_seq_length": self.max_length,
                "model": self.hf_dir, "init": self.config.init, "finetune_run_id": finetune_run_id(),
                "parent_finetune_run_id": self.lineage.get("finetune_run_id"),
                "pretrain_run_id": self.lineage.get("pretrain_run_id"), "data_run_id": self.lineage.get("data_run_id"),
                "tokenizer_fingerprint": source.get("tokenizer_fingerprint") or tokenizer_fingerprint(tokenizer_dir),
                "convert": self.convert, "language": source.get("language"),
                "tokenizer_kind": "sentencepiece" if os.path.isfile(spm) else "wordpiece"}
        with built_beside(directory) as temp:
            model.save_pretrained(temp, safe_serialization=True)
            # The tokenizer keeps the pretraining length as its model_max_length: a later fine-tuning
            # from this model reads it as such (default length, untrained positions). The length this
            # run used is training_info.json's and report.json's max_seq_length.
            self.tokenizer.save_pretrained(temp)
            make_tokenizer_config_portable(temp)
            if info["tokenizer_kind"] == "sentencepiece":
                shutil.copyfile(spm, os.path.join(temp, SPM_MODEL_FILE))
            with open(os.path.join(temp, TRAINING_INFO), "w") as f:
                json.dump(info, f, indent=2)
            model_card.write_card(temp, model_card.finetuned_card(model.config, info, test_metrics))
        return directory
