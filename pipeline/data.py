"""The trainer's data loader: a preprocessing data dir → padded batches of torch tensors.

A training process's own (anonymous) memory does not grow with the corpus: the rows live in
memory-mapped files whose pages the kernel shares between the ranks of a node
(pipeline/flat_cache.py), and the batch order is computed a block at a time
(pipeline/sampler.py). Here:

- ``PretrainingDataset``: the flat arrays opened with ``np.load(mmap_mode="r")``, and
  ``batch(rows)``, which gathers a padded batch in vectorized numpy in the
  ``BertForPreTraining`` convention.
- ``PretrainingLoader``: a ``BatchSampler``'s batches, prepared ahead of the training loop by
  a daemon thread.

The data dir itself is checked by pipeline/data_dir.py. No DeepSpeed here: the trainer passes
its rank and world size in.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from pipeline.data_dir import DataDirError, read_manifest
from pipeline.engine import PAD_MULTIPLE
from pipeline.flat_cache import PER_ROW_ARRAYS, flat_array_names, flat_cache, map_flat_arrays
from pipeline.read_ahead import one_batch_ahead
from pipeline.sampler import BatchSampler
from preprocessing.examples import MASKINGS, WORD_STARTS

IGNORE_INDEX = -100  # transformers' CrossEntropyLoss ignore_index for MLM labels


class PretrainingDataset:
    """All rows of a data dir as memory-mapped flat arrays; ``batch(rows)`` pads a batch.

    Per list column: ``values`` (all rows concatenated, the Parquet dtype) and
    ``offsets`` (int64, len rows + 1). Row ``i`` of input_ids is
    ``input_ids[input_ids_offsets[i]:input_ids_offsets[i + 1]]``. ``lengths`` (int16) is
    each row's token count. The arrays are read-only maps of the files in
    ``cache_dir`` (see ``flat_cache``); ``built_cache`` tells whether this instance
    converted the shards.
    """

    def __init__(self, data_dir: str, manifest: dict | None = None, pad_to_multiple_of: int = PAD_MULTIPLE,
                 cache_dir: str | None = None, seed: int = 0, read_ahead: bool = True):
        self.data_dir = data_dir
        self.manifest = manifest if manifest is not None else read_manifest(data_dir)
        masking = self.manifest["masking"].get("mode", "static")
        if masking not in MASKINGS:
            raise DataDirError(f"{data_dir}/manifest.json: masking.mode is {masking!r}; this loader reads "
                               f"{' or '.join(MASKINGS)} masking (rerun preprocessing)")
        self.masker = None
        if masking == "dynamic":  # rows stored unmasked: masks drawn per (seed, epoch, row)
            from pipeline.dynamic_masking import DynamicMasker

            try:
                self.masker = DynamicMasker(data_dir, self.manifest, seed)
            except (OSError, ValueError) as err:
                raise DataDirError(str(err)) from None
        self.max_seq_length = int(self.manifest["max_seq_length"])
        self.pad_id = int(self.manifest["tokenizer"]["special_ids"]["pad"])
        self.pad_to_multiple_of = pad_to_multiple_of

        self.cache_dir, self.built_cache = flat_cache(data_dir, self.manifest, cache_dir)
        arrays, self._read_ahead = map_flat_arrays(self.cache_dir, flat_array_names(self.manifest), read_ahead)
        # dynamic masking gathers no stored masks, so their offsets are not read
        self._read_ahead.whole(a for a in PER_ROW_ARRAYS if a != "mask_offsets" or self.masker is None)
        self.word_starts = arrays.get(WORD_STARTS)
        self.input_ids, self.segment_ids = arrays["input_ids"], arrays["segment_ids"]
        self.input_ids_offsets = self.segment_ids_offsets = arrays["token_offsets"]
        self.masked_lm_positions, self.masked_lm_ids = arrays["masked_lm_positions"], arrays["masked_lm_ids"]
        self.masked_lm_positions_offsets = self.masked_lm_ids_offsets = arrays["mask_offsets"]
        self.next_sentence_labels = arrays["next_sentence_labels"]
        self.lengths = arrays["lengths"]
        if len(self.lengths) != self.manifest["num_examples"]:
            raise DataDirError(f"{self.cache_dir}: holds {len(self.lengths)} rows but the manifest has "
                               f"{self.manifest['num_examples']}; delete it to convert the shards again")

    def __len__(self) -> int:
        return len(self.lengths)

    def read_ahead(self, rows) -> None:
        """Queues the disk reads of every page ``batch(rows)`` will read and returns at once
        (pipeline/read_ahead.py); does nothing with ``read_ahead=False`` or off Linux."""
        if not self._read_ahead.enabled:
            return
        rows = np.asarray(rows, dtype=np.int64)
        per_token = ("input_ids", "segment_ids") + ((WORD_STARTS,) if self.word_starts is not None else ())
        self._read_ahead.spans(per_token, self.input_ids_offsets[rows], self.input_ids_offsets[rows + 1])
        if self.masker is None:  # dynamic masking stores no masks
            self._read_ahead.spans(("masked_lm_positions", "masked_lm_ids"),
                                   self.masked_lm_positions_offsets[rows], self.masked_lm_positions_offsets[rows + 1])

    def padded_length(self, rows: np.ndarray) -> int:
        """The batch's longest row rounded up to ``pad_to_multiple_of``, never past max_seq_length."""
        longest = int(self.lengths[rows].max())
        m = self.pad_to_multiple_of
        return min(-(-longest // m) * m, self.max_seq_length)

    def batch(self, rows, epoch: int = 0) -> dict[str, torch.Tensor]:
        """Rows ``rows`` padded to ``padded_length``, as ``BertForPreTraining`` keyword args.

        input_ids (pad = manifest's [PAD]), token_type_ids, attention_mask, labels (-100
        except at masked positions, which hold the original ids), next_sentence_label;
        all int64. Also the masked positions in flat form, for a head that predicts only
        those: ``mlm_positions`` (indices into the flattened ``(n, width)`` batch, in row
        order) and ``mlm_labels`` (the original ids there). With dynamic masking, ``epoch``
        selects the masks (see ``dynamic_masking``); static data ignores it.
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
        if self.masker is not None:
            word_starts = None if self.word_starts is None else self.word_starts[source]
            return self._masked(rows, epoch, input_ids, token_type_ids, real, lengths, word_starts)

        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        starts = self.masked_lm_positions_offsets[rows]
        counts = self.masked_lm_positions_offsets[rows + 1] - starts
        batch_row = np.repeat(np.arange(n), counts)
        # index of each prediction in the flat arrays: its row's start + its rank within the row
        flat = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        positions = self.masked_lm_positions[flat].astype(np.int64)
        originals = self.masked_lm_ids[flat]
        labels[batch_row, positions] = originals
        return self._tensors(rows, input_ids, token_type_ids, real, labels, batch_row * width + positions, originals)

    __getitem__ = batch

    def _masked(self, rows, epoch, input_ids, token_type_ids, real, lengths, word_starts
                ) -> dict[str, torch.Tensor]:
        """The batch of unmasked rows with this epoch's masks drawn (whole words by the rows' own
        ``word_starts`` where the data dir stores them, else by the vocabulary's table)."""
        n, width = input_ids.shape
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        len_a = (real & (token_type_ids == 0)).sum(axis=1) - 2  # [CLS] A [SEP] are segment 0
        masked, batch_row, positions, originals = self.masker.mask(
            rows, epoch, input_ids[real], offsets, len_a, word_starts)
        input_ids[real] = masked
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        labels[batch_row, positions] = originals
        return self._tensors(rows, input_ids, token_type_ids, real, labels, batch_row * width + positions, originals)

    def _tensors(self, rows, input_ids, token_type_ids, real, labels, mlm_positions, mlm_labels
                 ) -> dict[str, torch.Tensor]:
        """The batch's arrays as the int64 tensors ``batch`` promises."""
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(self.next_sentence_labels[rows].astype(np.int64)),
            "mlm_positions": torch.from_numpy(mlm_positions),
            "mlm_labels": torch.from_numpy(mlm_labels.astype(np.int64)),
        }


def _assemble(dataset: PretrainingDataset, rows: np.ndarray, pin_memory: bool, epoch: int
              ) -> dict[str, torch.Tensor]:
    batch = dataset.batch(rows, epoch)
    if pin_memory:  # what goes to the GPU: the dense "labels" stay on the host
        batch = {k: v if k == "labels" else v.pin_memory() for k, v in batch.items()}
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
             stop: threading.Event, device: int | None = None) -> None:
    """The prefetch thread: (epoch, batch, tensors) into ``out`` until ``stop``.

    ``device``: the rank's GPU, made this thread's current one as PyTorch's DataLoader does in
    its pin-memory thread: a new thread's current device is GPU 0, where pinning could otherwise
    open a CUDA context for every rank of the node."""
    if device is not None:
        torch.cuda.set_device(device)
    try:
        for epoch, b, rows in positions:
            if not _put(out, (epoch, b, _assemble(dataset, rows, pin_memory, epoch)), stop):
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
    delivered / of the last batch; ``last_squared_tokens``: the sum of the last batch's real
    lengths squared (attention's FLOPs grow with it).
    """

    def __init__(self, dataset: PretrainingDataset, sampler: BatchSampler, prefetch: int = 4,
                 pin_memory: bool | None = None):
        self.dataset, self.sampler, self.prefetch = dataset, sampler, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.real_tokens = self.total_tokens = 0
        self.last_real_token_share = float("nan")
        self.last_squared_tokens = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._positions: Iterator | None = None

    # -- producing
    def _make(self, rows: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        return _assemble(self.dataset, rows, self.pin_memory, epoch)

    def _start(self) -> None:
        positions = one_batch_ahead(self.dataset.read_ahead, self.sampler.positions(self.sampler.epoch, self.sampler.batch),
                                    rows=lambda position: position[2])  # (epoch, batch, rows)
        if self.prefetch <= 0:
            self._positions = positions
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        # the thread holds no reference to self, so an abandoned loader is collected and
        # __del__ stops the thread
        device = torch.cuda.current_device() if self.pin_memory and torch.cuda.is_available() else None
        self._thread = threading.Thread(target=_produce, args=(self.dataset, self.pin_memory, positions,
                                                               self._queue, self._stop, device),
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
            batch = self._make(rows, epoch)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            epoch, b, batch = item
        # the sampler's state follows what the caller has received
        self.sampler.epoch, self.sampler.batch = (epoch, b + 1) if b + 1 < len(self.sampler) else (epoch + 1, 0)
        lengths = batch["attention_mask"].sum(-1)
        real, total = int(lengths.sum()), batch["attention_mask"].numel()
        self.last_squared_tokens = int(lengths.square().sum())
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
