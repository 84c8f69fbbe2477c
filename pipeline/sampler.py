"""Which rows each process trains and evaluates on, in which order: a pure function of
(seed, epoch, rank) that holds a few MB whatever the corpus.

An epoch's order is a keyed pseudo-random bijection of the row indices (``RowPermutation``, a
Feistel network), cut into blocks of ~65k rows; only the block in use is materialized
(length grouping and the batch shuffle happen inside it). ``BatchSampler`` gives each rank
equal-size, length-grouped batches; a resume computes its position's block from the state
(epoch, batch) instead of replaying batches.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from pipeline.data_dir import DataDirError
from pipeline.engine import PAD_MULTIPLE
from pipeline.length_batches import WINDOW_BATCHES, length_grouped

log = logging.getLogger(__name__)

ORDER = "feistel-blocks-1"  # the order's design, in the sampler state: a resume needs the same
BLOCK_ROWS = 1 << 16  # rows of an epoch materialized at a time (a few MB of work arrays)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's multipliers


class RowPermutation:
    """A keyed pseudo-random bijection of [0, n), evaluated for any positions in O(their count).

    A 4-round Feistel network over the smallest even number of bits covering n (a domain
    of at most 4n), with cycle walking: a value that lands outside [0, n) is permuted
    again until it lands inside, which keeps the map a bijection of [0, n). The round
    function is splitmix64's output mix of (half + round key). Replaces
    ``rng.permutation(n)``, whose n int64 (1.4 GB for 170M rows) every rank held.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.shift = np.uint64(64 - self.half)
        # [.., 1]: a stream apart from the block shuffles' [seed, epoch, block, 2]
        self.keys = np.random.default_rng([seed, epoch, 1]).integers(0, 2**63, self.ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        z = right + key
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
        return z >> self.shift  # the top bits

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(out >= self.n)
        while outside.size:  # ~1 extra pass on average (the domain is < 4n)
            out[outside] = self._feistel(out[outside])
            outside = outside[out[outside] >= self.n]
        return out.astype(np.int64)


class BatchSampler:
    """Row indices of rank ``rank``'s micro-batches, epoch after epoch, from (seed, epoch).

    Each epoch is one global list of micro-batches, the same whatever the number of
    processes. Position p of the epoch holds row ``RowPermutation(rows, seed, epoch)(p)``;
    the positions are cut into blocks of ``block_batches`` batches (~65k rows). Within a
    block, windows of ``length_window`` batches are sorted by length (stable: equal
    lengths keep their random order) and cut into batches of similar length, then the
    block's batches are shuffled by ``default_rng([seed, epoch, block, 2])``. Global
    batch g is batch ``g % block_batches`` of block ``g // block_batches``; rank r takes
    global batches r, r + world, r + 2·world, … So an optimizer step of ``world ×
    accumulation`` micro-batches covers the same rows for 1 process accumulating 2 and
    for 2 processes accumulating 1: the same global batch gives the same loss. An epoch
    is cut to a multiple of ``world_size × accumulation_steps`` batches, so every rank
    runs the same number of steps (a rank that ran out early would hang the others'
    collectives).

    Memory: one block's arrays (a few MB), whatever the number of rows; ``lengths`` is
    only indexed (pass the dataset's memory map). The state is (epoch, batch): the next
    batch to produce. Iterating is endless (epoch after epoch) and advances the state;
    ``load_state_dict`` jumps anywhere, computing one block.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, length_window: int = WINDOW_BATCHES, accumulation_steps: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or length_window < 1:
            raise ValueError(f"batch_size ({batch_size}) and length_window ({length_window}) must be >= 1")
        self.lengths = lengths if isinstance(lengths, np.ndarray) else np.asarray(lengths)
        self.rows = len(self.lengths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.length_window = seed, length_window
        per_step = world_size * accumulation_steps
        self.global_batches = self.rows // batch_size // per_step * per_step
        self.batches_per_epoch = self.global_batches // world_size
        if self.batches_per_epoch == 0:
            raise DataDirError(f"the {self.rows} training rows are fewer than one global batch ({world_size} "
                               f"process(es) × micro-batch {batch_size} × accumulation {accumulation_steps} = "
                               f"{per_step * batch_size}): lower --global-batch-size, or preprocess more data")
        # whole windows per block, so that no length window straddles two blocks
        self.block_batches = length_window * max(1, BLOCK_ROWS // (length_window * batch_size))
        self.epoch, self.batch = 0, 0
        self._block: tuple[int, int, np.ndarray] | None = None  # (epoch, block, its batches)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def block(self, epoch: int, block: int) -> np.ndarray:
        """(batches, batch_size) row indices of the global batches in ``block`` of ``epoch``."""
        first = block * self.block_batches
        count = min(self.block_batches, self.global_batches - first)
        b = self.batch_size
        rows = RowPermutation(self.rows, self.seed, epoch)(np.arange(first * b, (first + count) * b,
                                                                     dtype=np.uint64))
        if self.length_window == 1:
            return rows.reshape(count, b)  # already a random order: nothing to shuffle
        return length_grouped(rows, self.lengths, b, np.random.default_rng([self.seed, epoch, block, 2]),
                              self.length_window)

    def global_batch(self, epoch: int, index: int) -> np.ndarray:
        """Row indices of global batch ``index`` of ``epoch``; computes its block once."""
        block = index // self.block_batches
        cached = self._block  # one read: the prefetch thread may replace it meanwhile
        if cached is None or cached[:2] != (epoch, block):
            cached = (epoch, block, self.block(epoch, block))
            self._block = cached
        return cached[2][index % self.block_batches]

    def rows_of(self, epoch: int, batch: int) -> np.ndarray:
        """Row indices of this rank's ``batch``-th micro-batch of ``epoch``."""
        return self.global_batch(epoch, self.rank + batch * self.world_size)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size) row indices of this rank's batches in ``epoch``.

        A whole epoch at once, for tests and measurements; training iterates ``positions``.
        """
        blocks = -(-self.global_batches // self.block_batches)
        batches = np.concatenate([self.block(epoch, k) for k in range(blocks)])
        return batches[self.rank::self.world_size]

    def positions(self, epoch: int, batch: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch, rows) from the given position on, endlessly; leaves the state alone."""
        while True:
            for b in range(batch, self.batches_per_epoch):
                yield epoch, b, self.rows_of(epoch, b)
            epoch, batch = epoch + 1, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for epoch, b, rows in self.positions(self.epoch, self.batch):
            self.epoch, self.batch = (epoch, b + 1) if b + 1 < self.batches_per_epoch else (epoch + 1, 0)
            yield rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "rows": self.rows, "order": ORDER}

    def load_state_dict(self, state: dict) -> None:
        for field, have in (("seed", self.seed), ("world_size", self.world_size),
                            ("batch_size", self.batch_size), ("rows", self.rows), ("order", ORDER)):
            if field in state and state[field] != have:
                raise ValueError(f"data loader state: {field} was {state[field]} when saved but is {have} now; "
                                 "an exact resume needs the same data, seed, world size, micro-batch size "
                                 "and sampler version")
        if "order" not in state:
            log.warning("data loader state saved by an older sampler: the rest of epoch %s follows this "
                        "sampler's order, so some of its rows may repeat or be skipped", state["epoch"])
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
                 max_rows: int = 0, seed: int = 0) -> list[np.ndarray]:
    """This rank's evaluation micro-batches over rows ``start:``, the same at every evaluation.

    The rows are a seeded sample of ``max_rows`` of them (all when 0) — random, so that a
    partial evaluation is not biased towards any length — and do not depend on the number of
    processes or the micro-batch: the eval loss of a run resumed on another number of
    processes is the same measure as before it. Sorted by length so batches pad little, they
    are cut into a multiple of ``world_size`` batches of at most ``batch_size`` rows (every
    rank runs the same number of forward passes: ZeRO-3 gathers parameters collectively).
    A sample of whole global batches (the default) makes batches of exactly ``batch_size``;
    all held-out rows (``max_rows`` 0) may give two sizes, one graph more each under
    ``--compile``. With ``batch_size`` 1 and rows not a multiple of ``world_size``, the
    remainder is left out: the one case where the rows depend on the number of processes.
    Memory: O(the held-out rows), whatever the rows before ``start``.
    """
    rows = np.arange(start, len(lengths))
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    if max_rows:
        rows = rows[:max_rows]
    count = -(-len(rows) // batch_size // world_size) * world_size if len(rows) else 0
    if count > len(rows):  # fewer rows than processes × batches of one row: a batch each, the rest unused
        count = len(rows) // world_size * world_size
        rows = rows[:count]
    rows = rows[np.argsort(lengths[rows], kind="stable")]
    return np.array_split(rows, count)[rank::world_size] if count else []


def padding_share(lengths: np.ndarray, batches: np.ndarray, max_seq_length: int,
                  multiple: int = PAD_MULTIPLE) -> float:
    """Share of pad tokens in ``batches`` (rows of row indices) padded as ``PretrainingDataset`` pads."""
    batch_lengths = lengths[batches].astype(np.int64)  # the dataset's int16 would overflow below
    width = np.minimum(-(-batch_lengths.max(axis=1) // multiple) * multiple, max_seq_length)
    total = (width * batches.shape[1]).sum()
    return float(1.0 - batch_lengths.sum() / total)
