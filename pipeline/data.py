"""The trainer's data loader: a preprocessing data dir → padded batches of torch tensors.

Reads contracts 1 and 2 of DESIGN.md (manifest.json + Parquet shards). Three parts:

- ``read_manifest``: refuses an unfinished or inconsistent data dir, naming file and field.
- ``PretrainingDataset``: every shard's columns as flat numpy values + offsets (no
  per-row Python objects: 13k rows of seq 128 take ~8 MB), and ``batch(rows)``, which
  assembles a padded batch in vectorized numpy in the ``BertForPreTraining`` convention.
- ``BatchSampler`` + ``PretrainingLoader``: per-rank, equal-size, length-grouped batches
  whose order is a pure function of (seed, epoch, rank), so a resume recomputes the
  order from the state (epoch, batch) instead of replaying batches; a daemon thread
  prepares the next batches ahead of the training loop.

No DeepSpeed here: the trainer passes its rank and world size in.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

SUPPORTED_FORMAT_VERSIONS = (1,)
IGNORE_INDEX = -100  # transformers' CrossEntropyLoss ignore_index for MLM labels
LIST_COLUMNS = ("input_ids", "segment_ids", "masked_lm_positions", "masked_lm_ids")
SCALAR_COLUMNS = ("next_sentence_labels",)


class DataDirError(ValueError):
    """A data dir the trainer cannot use; the message names the file and field."""


# ---------------------------------------------------------------------------- manifest
def read_manifest(data_dir: str) -> dict:
    """The data dir's manifest.json, after checking it against the files beside it.

    Checks: the dir and manifest exist, the format version is one this reader knows,
    every listed shard exists and has the number of rows the manifest records.
    """
    if not os.path.isdir(data_dir):
        raise DataDirError(f"data dir {data_dir} does not exist (pass the --output of preprocessing/run_beam.py)")
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise DataDirError(f"{data_dir} has no manifest.json: the preprocessing run did not finish "
                           "(rerun preprocessing/run_beam.py with this --output)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataDirError(f"{path}: not valid JSON ({e})") from None
    for field in ("format_version", "max_seq_length", "tokenizer", "masking", "shards", "num_examples"):
        if field not in manifest:
            raise DataDirError(f"{path}: field {field!r} is missing")
    version = manifest["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise DataDirError(f"{path}: format_version {version!r} is not supported by this trainer "
                           f"(supported: {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
                           "rerun preprocessing with the matching version of this repository")
    total = 0
    for i, shard in enumerate(manifest["shards"]):
        shard_path = os.path.join(data_dir, shard["path"])
        if not os.path.isfile(shard_path):
            raise DataDirError(f"{path}: shards[{i}] {shard['path']!r} is listed but {shard_path} is missing")
        rows = pq.ParquetFile(shard_path).metadata.num_rows
        if rows != shard["rows"]:
            raise DataDirError(f"{path}: shards[{i}].rows is {shard['rows']} but {shard_path} has {rows} rows "
                               "(the shard was rewritten or truncated after the manifest)")
        total += rows
    if total != manifest["num_examples"]:
        raise DataDirError(f"{path}: num_examples is {manifest['num_examples']} but the shards hold {total} rows")
    return manifest


# ---------------------------------------------------------------------------- dataset
def _list_column(chunked) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets starting at 0) of a Parquet list column, without Python rows."""
    array = chunked.combine_chunks()
    if array.null_count:
        raise ValueError(f"{array.null_count} null rows")
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.flatten().to_numpy()  # the values between offsets[0] and offsets[-1]
    return values, offsets - offsets[0]


class PretrainingDataset:
    """All rows of a data dir as flat numpy arrays; ``batch(rows)`` pads a batch.

    Per list column: ``values`` (all rows concatenated, the Parquet dtype) and
    ``offsets`` (int64, len rows + 1). Row ``i`` of input_ids is
    ``input_ids[offsets[i]:offsets[i + 1]]``.
    """

    def __init__(self, data_dir: str, manifest: dict | None = None, pad_to_multiple_of: int = 8):
        self.data_dir = data_dir
        self.manifest = manifest if manifest is not None else read_manifest(data_dir)
        masking = self.manifest["masking"].get("mode", "static")
        if masking != "static":
            raise DataDirError(f"{data_dir}/manifest.json: masking.mode is {masking!r}; this loader reads "
                               "statically masked shards only (rerun preprocessing with static masking)")
        self.max_seq_length = int(self.manifest["max_seq_length"])
        self.pad_id = int(self.manifest["tokenizer"]["special_ids"]["pad"])
        self.pad_to_multiple_of = pad_to_multiple_of

        parts: dict[str, list] = {name: [] for name in LIST_COLUMNS + SCALAR_COLUMNS}
        for shard in self.manifest["shards"]:
            shard_path = os.path.join(data_dir, shard["path"])
            table = pq.read_table(shard_path, columns=list(LIST_COLUMNS + SCALAR_COLUMNS))
            for name in LIST_COLUMNS:
                try:
                    parts[name].append(_list_column(table.column(name)))
                except ValueError as e:
                    raise DataDirError(f"{shard_path}: column {name}: {e}") from None
            parts["next_sentence_labels"].append(table.column("next_sentence_labels").to_numpy())

        for name in LIST_COLUMNS:
            values, offsets = _concat(parts[name])
            setattr(self, name, values)
            setattr(self, name + "_offsets", offsets)
        self.next_sentence_labels = np.concatenate(parts["next_sentence_labels"])
        self.lengths = np.diff(self.input_ids_offsets)
        self._check()

    def _check(self) -> None:
        where = f"{self.data_dir}/shards"
        if not np.array_equal(self.input_ids_offsets, self.segment_ids_offsets):
            raise DataDirError(f"{where}: segment_ids and input_ids differ in length in some row")
        if not np.array_equal(self.masked_lm_positions_offsets, self.masked_lm_ids_offsets):
            raise DataDirError(f"{where}: masked_lm_positions and masked_lm_ids differ in length in some row")
        if len(self) and self.lengths.max() > self.max_seq_length:
            raise DataDirError(f"{where}: a row has {self.lengths.max()} tokens, more than the manifest's "
                               f"max_seq_length {self.max_seq_length}")
        row_of_mask = np.repeat(np.arange(len(self)), np.diff(self.masked_lm_positions_offsets))
        if np.any(self.masked_lm_positions >= self.lengths[row_of_mask]) or np.any(self.masked_lm_positions < 0):
            raise DataDirError(f"{where}: a masked_lm_positions value lies outside its row")

    def __len__(self) -> int:
        return len(self.lengths)

    def padded_length(self, rows: np.ndarray) -> int:
        """The batch's longest row rounded up to ``pad_to_multiple_of``, never past max_seq_length."""
        longest = int(self.lengths[rows].max())
        m = self.pad_to_multiple_of
        return min(-(-longest // m) * m, self.max_seq_length)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Rows ``rows`` padded to ``padded_length``, as ``BertForPreTraining`` keyword args.

        input_ids (pad = manifest's [PAD]), token_type_ids, attention_mask, labels (-100
        except at masked positions, which hold the original ids), next_sentence_label;
        all int64. Also the masked positions in flat form, for a head that predicts only
        those: ``mlm_positions`` (indices into the flattened ``(n, width)`` batch, in row
        order) and ``mlm_labels`` (the original ids there).
        """
        rows = np.asarray(rows, dtype=np.int64)
        n, width = len(rows), self.padded_length(rows)
        lengths = self.lengths[rows]
        real = np.arange(width) < lengths[:, None]                     # (n, width) bool
        source = (self.input_ids_offsets[rows][:, None] + np.arange(width))[real]

        input_ids = np.full((n, width), self.pad_id, dtype=np.int64)
        input_ids[real] = self.input_ids[source]
        token_type_ids = np.zeros((n, width), dtype=np.int64)
        token_type_ids[real] = self.segment_ids[source]

        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        starts = self.masked_lm_positions_offsets[rows]
        counts = self.masked_lm_positions_offsets[rows + 1] - starts
        batch_row = np.repeat(np.arange(n), counts)
        # index of each prediction in the flat arrays: its row's start + its rank within the row
        flat = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        positions = self.masked_lm_positions[flat].astype(np.int64)
        labels[batch_row, positions] = self.masked_lm_ids[flat]

        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(self.next_sentence_labels[rows].astype(np.int64)),
            "mlm_positions": torch.from_numpy(batch_row * width + positions),
            "mlm_labels": torch.from_numpy(self.masked_lm_ids[flat].astype(np.int64)),
        }

    __getitem__ = batch


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (values, offsets) pairs, shifting each part's offsets past the previous."""
    values = np.concatenate([v for v, _ in parts])
    shifted, base = [np.zeros(1, dtype=np.int64)], 0
    for v, o in parts:
        shifted.append(o[1:] + base)
        base += len(v)
    return values, np.concatenate(shifted)


# ---------------------------------------------------------------------------- sampling
class BatchSampler:
    """Row indices of rank ``rank``'s micro-batches, epoch after epoch, from (seed, epoch).

    Each epoch is one global list of micro-batches, the same whatever the number of
    processes: a permutation of all rows from ``default_rng([seed, epoch])``, length
    grouping (within windows of ``length_window`` batches rows are sorted by length and
    cut into batches of similar length), then the batch order shuffled. Rank r takes
    batches r, r + world, r + 2·world, … So an optimizer step of ``world × accumulation``
    micro-batches covers the same rows for 1 process accumulating 2 and for 2 processes
    accumulating 1: the same global batch gives the same loss. The list is cut to a
    multiple of ``world_size × accumulation_steps`` batches, so every rank runs the same
    number of steps (a rank that ran out early would hang the others' collectives).

    The state is (epoch, batch): the next batch to produce. Iterating is endless (epoch
    after epoch) and advances the state; ``load_state_dict`` jumps anywhere in O(1) plus
    one epoch's permutation.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, length_window: int = 64, accumulation_steps: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or length_window < 1:
            raise ValueError(f"batch_size ({batch_size}) and length_window ({length_window}) must be >= 1")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.length_window = seed, length_window
        per_step = world_size * accumulation_steps
        self.global_batches = len(self.lengths) // batch_size // per_step * per_step
        self.batches_per_epoch = self.global_batches // world_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.lengths)} rows are fewer than world_size {world_size} × batch size "
                             f"{batch_size} × accumulation {accumulation_steps}: lower the micro-batch size")
        self.epoch, self.batch = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size) row indices of this rank's batches in ``epoch``."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[:self.global_batches * self.batch_size]
        window = self.length_window * self.batch_size
        if self.length_window > 1:
            # stable sort inside each window: rows of equal length keep their random order
            order = np.concatenate([w[np.argsort(self.lengths[w], kind="stable")]
                                    for w in np.split(order, range(window, len(order), window))])
        batches = order.reshape(self.global_batches, self.batch_size)
        if self.length_window > 1:
            batches = batches[rng.permutation(len(batches))]
        mine = batches[self.rank::self.world_size]
        self._cached = (epoch, mine)
        return mine

    def positions(self, epoch: int, batch: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch, rows) from the given position on, endlessly; leaves the state alone."""
        while True:
            batches = self.epoch_batches(epoch)
            for b in range(batch, len(batches)):
                yield epoch, b, batches[b]
            epoch, batch = epoch + 1, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for epoch, b, rows in self.positions(self.epoch, self.batch):
            self.epoch, self.batch = (epoch, b + 1) if b + 1 < self.batches_per_epoch else (epoch + 1, 0)
            yield rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "rows": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        for field, have in (("seed", self.seed), ("world_size", self.world_size),
                            ("batch_size", self.batch_size), ("rows", len(self.lengths))):
            if field in state and state[field] != have:
                raise ValueError(f"data loader state: {field} was {state[field]} when saved but is {have} now; "
                                 "an exact resume needs the same data, seed, world size and micro-batch size")
        if not (0 <= state["batch"] < self.batches_per_epoch and state["epoch"] >= 0):
            raise ValueError(f"data loader state: position epoch {state['epoch']} batch {state['batch']} is "
                             f"outside an epoch of {self.batches_per_epoch} batches")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def training_rows(manifest: dict, eval_shards: int) -> int:
    """How many rows (from the start, in manifest order) train; the last ``eval_shards``
    shards are held out for evaluation. Refuses to hold out every shard."""
    shards = manifest["shards"]
    if eval_shards >= len(shards):
        raise DataDirError(f"--eval-shards {eval_shards}: the data dir has {len(shards)} shard(s), and at least "
                           "one must be left to train on (rerun preprocessing with more --num-shards, or "
                           "pass --eval-shards 0)")
    return sum(int(s["rows"]) for s in shards[:len(shards) - eval_shards])


def eval_batches(lengths: np.ndarray, start: int, batch_size: int, rank: int, world_size: int,
                 max_batches: int = 0, seed: int = 0) -> np.ndarray:
    """This rank's evaluation micro-batches over rows ``start:``, the same at every evaluation.

    A seeded sample of ``max_batches × world_size`` batches' worth of rows (all when 0) —
    random, so that a partial evaluation is not biased towards any length — sorted by
    length so batches pad little, cut to a multiple of ``world_size`` batches (every rank
    runs the same number of forward passes: ZeRO-3 gathers parameters collectively).
    """
    rows = np.arange(start, len(lengths))
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    count = len(rows) // batch_size // world_size * world_size
    if max_batches:
        count = min(count, max_batches * world_size)
    rows = rows[:count * batch_size]
    rows = rows[np.argsort(lengths[rows], kind="stable")]
    return rows.reshape(count, batch_size)[rank::world_size]


def padding_share(lengths: np.ndarray, batches: np.ndarray, max_seq_length: int, multiple: int = 8) -> float:
    """Share of pad tokens in ``batches`` (rows of row indices) padded as ``PretrainingDataset`` pads."""
    batch_lengths = lengths[batches]
    width = np.minimum(-(-batch_lengths.max(axis=1) // multiple) * multiple, max_seq_length)
    total = (width * batches.shape[1]).sum()
    return float(1.0 - batch_lengths.sum() / total)


# ---------------------------------------------------------------------------- loader
def _assemble(dataset: PretrainingDataset, rows: np.ndarray, pin_memory: bool) -> dict[str, torch.Tensor]:
    batch = dataset.batch(rows)
    if pin_memory:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; False when stopped."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _produce(dataset: PretrainingDataset, pin_memory: bool, positions: Iterator, out: queue.Queue,
             stop: threading.Event) -> None:
    """The prefetch thread: (epoch, batch, tensors) into ``out`` until ``stop``."""
    try:
        for epoch, b, rows in positions:
            if not _put(out, (epoch, b, _assemble(dataset, rows, pin_memory)), stop):
                return
    except BaseException as e:  # handed to the consumer, which re-raises it
        _put(out, e, stop)


class PretrainingLoader:
    """Endless iterator of padded batches for one rank, prepared ``prefetch`` batches ahead.

    A daemon thread assembles batches (pinned when CUDA is available, unless
    ``pin_memory=False``) into a bounded queue; ``close()`` (or exiting a ``with``)
    stops it. ``prefetch=0`` assembles in the caller's thread. ``state_dict()`` is the
    position of the next batch the *caller* receives, whatever the thread has prepared.
    ``real_token_share`` / ``last_real_token_share``: non-pad share of all tokens
    delivered / of the last batch.
    """

    def __init__(self, dataset: PretrainingDataset, sampler: BatchSampler, prefetch: int = 4,
                 pin_memory: bool | None = None):
        self.dataset, self.sampler, self.prefetch = dataset, sampler, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.real_tokens = self.total_tokens = 0
        self.last_real_token_share = float("nan")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._positions: Iterator | None = None

    # -- producing
    def _make(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return _assemble(self.dataset, rows, self.pin_memory)

    def _start(self) -> None:
        positions = self.sampler.positions(self.sampler.epoch, self.sampler.batch)
        if self.prefetch <= 0:
            self._positions = positions
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        # the thread holds no reference to self, so an abandoned loader is collected and
        # __del__ stops the thread
        self._thread = threading.Thread(target=_produce, args=(self.dataset, self.pin_memory, positions,
                                                               self._queue, self._stop),
                                        name="pretraining-prefetch", daemon=True)
        self._thread.start()

    # -- consuming
    def __iter__(self) -> PretrainingLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._thread is None and self._positions is None:
            self._start()
        if self._positions is not None:
            epoch, b, rows = next(self._positions)
            batch = self._make(rows)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            epoch, b, batch = item
        # the sampler's state follows what the caller has received
        self.sampler.epoch, self.sampler.batch = (epoch, b + 1) if b + 1 < len(self.sampler) else (epoch + 1, 0)
        real, total = int(batch["attention_mask"].sum()), batch["attention_mask"].numel()
        self.real_tokens += real
        self.total_tokens += total
        self.last_real_token_share = real / total
        return batch

    @property
    def real_token_share(self) -> float:
        return self.real_tokens / self.total_tokens if self.total_tokens else float("nan")

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Stop the prefetch thread (it exits within ~0.1 s); the next ``next()`` restarts it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = self._queue = self._positions = None

    def __enter__(self) -> PretrainingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()
