"""Masked BERT MLM + NSP training instances from tokenized documents: Google's algorithm, fast
(``--objective mlm``'s packed rows: ``pack_full_sentences``).

This is ``create_instances_from_document`` + ``create_masked_lm_predictions`` from
google-research/bert ``create_pretraining_data.py`` (commit eedf571), as pure seeded
functions of one *bucket* of documents. No Beam here: the pipeline groups documents into
buckets and calls :func:`create_instances` once per bucket and duplicate pass.

Segments follow Google's control flow exactly, with one ``random.Random`` per document
seeded from a stable hash of (seed, document key, dupe index), making the draws Google's
function would make with that generator (its masking draws aside, and the random
document fixed as below), in the same order: the short-target draw (once per document per
pass), chunk accumulation, ``a_end``, the 50% random-next coin, the random document and
start sentence, the "put back" of unused segments, and ``truncate_seq_pair``'s coin
per removed token (from the longer segment; B on a tie, as in Google's code). A test
checks this against a literal port of Google's function.

How it is fast (``python benchmarks/example_creation.py``, one core, Austen, dupe 5,
seq 128: ~3.3M input tokens/s, ~21M output tokens/s; whole-word ~2.6M; a port of
Google's per-token Python on the same ids: 0.38M):

* segments are planned with Python ints only (cumulative sentence lengths, ``bisect``),
  never touching a token; an instance is four offsets into the bucket's tokens;
* truncation counts removals instead of making them: which segment loses each token
  follows from the lengths, so only the number of front coins per segment matters, and
  all coins come from one ``getrandbits`` call (bit-identical to Google's ``random()``
  calls on CPython, see ``_truncate``); ``randint`` is called through ``getrandbits``
  directly (``_below``), with the same draws;
* the tokens of every instance of the bucket are gathered with one numpy fancy-index,
  and masking is vectorized over all instances of the bucket at once.

Deviations from Google, each on purpose:

* The random document is always a *different* document of the bucket (Google tries
  10 draws and, if they all hit the current document, labels a true continuation as
  random). With one document in the bucket there is no other: a chunk of two or more
  segments then uses its true continuation (label 0, no coin is drawn) and a
  one-segment chunk is skipped and counted in ``stats.skipped_single_document``.
* Random next sentences come from the same bucket, not the whole corpus, so memory
  is bounded by a bucket.
* Masking randomness is a counter-based hash (splitmix64) of (instance key, position),
  not the document's ``random.Random``: the same distribution (a uniformly random
  subset of ``num_to_predict`` candidates; 80% [MASK] / 10% kept / 10% random, drawn
  per piece), computed for all instances at once.
* A random replacement is drawn uniformly from the *non-special* ids (Google draws
  any vocabulary id, [CLS]/[SEP]/[MASK]/[PAD] included). It may equal the original.
* Whole-word masking groups pieces by ``VocabInfo.word_start`` (ALBERT's
  SentencePiece rule made multilingual, ``vocab.word_start_table``), or by the documents' own per-token word
  starts when a segmenter gave them (Chinese words from jieba, as BERT-wwm); a group never spans a [SEP] (Google appends
  a continuation piece after [SEP] to the last word before it). Groups are taken in
  random order with Google's greedy rule: a group that would overflow
  ``num_to_predict`` is skipped and later ones are still tried.

Masking candidates are positions, not ids: every position but [CLS] and the two [SEP]s
(documents hold no control pieces; ``special_ids`` only bounds the random replacement).

Determinism: the same documents (in the same bucket order), seed, dupe index, config
and vocabulary give byte-identical arrays in any process, on any platform, on CPython
>= 3.10 (Python's Mersenne Twister with integer seeds, xxh3 of little-endian integers,
wrapping uint64 numpy arithmetic; no float sums, no threads), whatever the batching:
creating the instances of ``documents[targets]`` for disjoint ``targets`` and
concatenating gives exactly the whole bucket's output, because every random choice is
keyed by its document or instance, never by its neighbours in a batch. (Which
documents share a bucket does matter: random B sentences come from the bucket.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import struct
from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate

import numpy as np
import pyarrow as pa
import xxhash

# Google's TFRecord feature names; the shard contract (docs/DESIGN.md) fixes these columns.
SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("segment_ids", pa.list_(pa.int8())),
    ("masked_lm_positions", pa.list_(pa.int32())),
    ("masked_lm_ids", pa.list_(pa.int32())),
    ("next_sentence_labels", pa.int8()),
])
# With dynamic masking and word starts the vocabulary cannot give (jieba's Chinese words, the
# sentence starts of a vocabulary without SentencePiece's dummy prefix), the rows also carry
# them, so that the trainer's loader groups whole words as static masking does.
WORD_STARTS = "word_starts"
SCHEMA_WITH_WORD_STARTS = SCHEMA.append(pa.field(WORD_STARTS, pa.list_(pa.bool_())))

OBJECTIVES = ("mlm-nsp", "mlm")
MASKINGS = ("static", "dynamic")
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)
_MAX_KEY = np.uint64(_U64)
# One salt per independent hash stream drawn from an instance key.
_SALT_ORDER = np.uint64(0x6A09_E667_F3BC_C908)    # which candidates are masked
_SALT_ACTION = np.uint64(0xBB67_AE85_84CA_A73B)   # [MASK] / keep / random, per piece
_SALT_RANDOM = np.uint64(0x3C6E_F372_FE94_F82B)   # the random replacement id
# Thresholds on a 53-bit uniform u: [MASK] if u / 2**53 < 0.8, kept if < 0.9, else random
# (Google: random() < 0.8, else random() < 0.5 keeps).
_MASK_BELOW = math.ceil(0.8 * (1 << 53))
_KEEP_BELOW = math.ceil(0.9 * (1 << 53))


class ConfigError(ValueError):
    """A bad flag value; the message names the flag."""


def _flag_check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
    """How instances are cut and masked; the defaults are Google's BERT settings.

    ``run_beam.py``'s flags of the same names set these (``PreprocessConfig.examples``).
    """

    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    masked_lm_prob: float = 0.15
    # None: ceil(max_seq_length * masked_lm_prob), Google's 20 at 128 and 15%, scaled with both.
    max_predictions_per_seq: int | None = None
    whole_word_mask: bool = False
    # static: masks drawn here, dupe_factor times; dynamic: rows stored unmasked, the
    # trainer's loader draws new masks per epoch (RoBERTa).
    masking: str = "static"
    # mlm-nsp: Google's [CLS] A [SEP] B [SEP] pairs with the NSP label; mlm: RoBERTa's
    # FULL-SENTENCES rows, packed (see ``pack_full_sentences``), no NSP.
    objective: str = "mlm-nsp"

    def __post_init__(self):
        if self.max_predictions_per_seq is None and 0 < self.masked_lm_prob < 1:
            object.__setattr__(self, "max_predictions_per_seq",
                               min(math.ceil(self.max_seq_length * self.masked_lm_prob - 1e-9),
                                   self.max_seq_length - 3))
        _flag_check(self.objective in OBJECTIVES,
                    f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        _flag_check(self.masking in MASKINGS,
                    f"--masking must be {' or '.join(MASKINGS)}, got {self.masking!r}")
        _flag_check(self.max_seq_length >= 8,
                    f"--max-seq-length must be at least 8, got {self.max_seq_length}")
        _flag_check(0 <= self.short_seq_prob <= 1,
                    f"--short-seq-prob must be in [0, 1], got {self.short_seq_prob}")
        _flag_check(0 < self.masked_lm_prob < 1,
                    f"--masked-lm-prob must be in (0, 1), got {self.masked_lm_prob}")
        _flag_check(1 <= self.max_predictions_per_seq <= self.max_seq_length - 3,
                    f"--max-predictions-per-seq must be in [1, max-seq-length - 3], "
                    f"got {self.max_predictions_per_seq}")

    @property
    def max_num_tokens(self) -> int:
        """Tokens of A and B together: [CLS], [SEP], [SEP] take the other three."""
        return self.max_seq_length - 3


@dataclasses.dataclass(frozen=True, eq=False)
class VocabInfo:
    """What masking needs to know about the vocabulary."""

    vocab_size: int
    cls_id: int
    sep_id: int
    mask_id: int
    # Never drawn as a random replacement ([PAD], [UNK], [CLS], [SEP], [MASK]); cls, sep
    # and mask ids are added if missing.
    special_ids: tuple[int, ...]
    # bool[vocab_size]: the piece starts a word (whole-word masking only).
    word_start: np.ndarray | None = None

    def __post_init__(self):
        special = tuple(sorted({int(i) for i in (*self.special_ids, self.cls_id, self.sep_id,
                                                 self.mask_id)}))
        if not all(0 <= i < self.vocab_size for i in special):
            raise ValueError(f"special ids {special} must lie in [0, {self.vocab_size})")
        if self.word_start is not None:
            ws = np.asarray(self.word_start, dtype=bool)
            if ws.shape != (self.vocab_size,):
                raise ValueError(f"word_start must have shape ({self.vocab_size},), got {ws.shape}")
            object.__setattr__(self, "word_start", ws)
        object.__setattr__(self, "special_ids", special)
        regular = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int32),
                               np.asarray(special, dtype=np.int32))
        if regular.size == 0:
            raise ValueError("the vocabulary has no non-special ids to draw replacements from")
        object.__setattr__(self, "_regular_ids", regular)

    @property
    def regular_ids(self) -> np.ndarray:
        """The ids a random replacement is drawn from: all but the special ones."""
        return self._regular_ids


@dataclasses.dataclass
class Document:
    key: int                     # stable 64-bit key from a hash of the document id: seeds it
    sentences: list[np.ndarray]  # token ids per sentence (int32); empty ones are ignored
    # bool per token, parallel to ``sentences``: the token starts a word. Given when words
    # come from a segmenter (jieba for Chinese) rather than from the pieces themselves;
    # whole-word masking then groups by these instead of ``VocabInfo.word_start``.
    word_starts: list[np.ndarray] | None = None


@dataclasses.dataclass
class ExampleStats:
    """Counts from one or more create_instances calls; they add up under concat."""

    documents: int = 0                # documents with at least one token, per pass
    empty_documents: int = 0          # documents with no tokens: no instances, never a random B
    short_target_documents: int = 0   # documents whose target length was drawn short
    instances: int = 0
    multi_segment_instances: int = 0  # instances whose chunk had >= 2 segments ...
    multi_segment_random_next: int = 0  # ... and of those, how many got a random B
    skipped_single_document: int = 0  # one-segment chunks in a one-document bucket
    truncated_tokens: int = 0         # removed by truncate_seq_pair to fit max_num_tokens

    def __add__(self, other: ExampleStats) -> ExampleStats:
        return ExampleStats(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                    dataclasses.astuple(other))))


@dataclasses.dataclass(eq=False)
class InstanceBatch:
    """Instances in columnar form: ragged columns as flat values + row offsets.

    Compact and picklable (numpy arrays only); ``to_arrow`` gives the shard table.
    ``keys`` are stable per-instance keys (a hash of seed, document key, dupe index and
    the instance's index in its document) for deterministic shuffles and sorts.
    """

    input_ids: np.ndarray             # int32, flat, after masking
    offsets: np.ndarray               # int64 [n + 1], rows of input_ids and segment_ids
    segment_ids: np.ndarray           # int8, flat
    masked_lm_positions: np.ndarray   # int32, flat, ascending within a row
    masked_lm_ids: np.ndarray         # int32, flat: the original ids at those positions
    masked_offsets: np.ndarray        # int64 [n + 1]
    next_sentence_labels: np.ndarray  # int8 [n], 1 = B is random
    keys: np.ndarray                  # uint64 [n]
    stats: ExampleStats = dataclasses.field(default_factory=ExampleStats)
    # bool, flat, parallel to input_ids: which tokens start a word ([CLS]/[SEP] do). Only
    # unmasked (dynamic) rows whose word starts the vocabulary's table cannot give carry it.
    word_starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.next_sentence_labels)

    @property
    def skipped(self) -> int:
        return self.stats.skipped_single_document

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_masked(self) -> int:
        return int(self.masked_offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def empty() -> InstanceBatch:
        return InstanceBatch(
            input_ids=np.zeros(0, np.int32), offsets=np.zeros(1, np.int64),
            segment_ids=np.zeros(0, np.int8), masked_lm_positions=np.zeros(0, np.int32),
            masked_lm_ids=np.zeros(0, np.int32), masked_offsets=np.zeros(1, np.int64),
            next_sentence_labels=np.zeros(0, np.int8), keys=np.zeros(0, np.uint64))

    def take(self, indices) -> InstanceBatch:
        """The rows ``indices``, in that order (``stats`` describe creation: not carried)."""
        indices = np.asarray(indices, dtype=np.int64)
        offsets, gather = _ragged_take(self.offsets, indices)
        masked_offsets, masked_gather = _ragged_take(self.masked_offsets, indices)
        return InstanceBatch(
            input_ids=self.input_ids[gather], offsets=offsets, segment_ids=self.segment_ids[gather],
            masked_lm_positions=self.masked_lm_positions[masked_gather],
            masked_lm_ids=self.masked_lm_ids[masked_gather], masked_offsets=masked_offsets,
            next_sentence_labels=self.next_sentence_labels[indices], keys=self.keys[indices],
            word_starts=None if self.word_starts is None else self.word_starts[gather])

    @staticmethod
    def concat(batches: Sequence[InstanceBatch]) -> InstanceBatch:
        batches = list(batches)
        if not batches:
            return InstanceBatch.empty()
        stats = ExampleStats()
        for b in batches:
            stats = stats + b.stats
        word_starts = None
        carried = [b.word_starts is not None for b in batches if len(b)]
        if any(carried):
            if not all(carried):
                raise ValueError("concatenating instance batches with and without word_starts")
            word_starts = np.concatenate([b.word_starts for b in batches if len(b)])
        return InstanceBatch(
            input_ids=np.concatenate([b.input_ids for b in batches]),
            offsets=_concat_offsets([b.offsets for b in batches]),
            segment_ids=np.concatenate([b.segment_ids for b in batches]),
            masked_lm_positions=np.concatenate([b.masked_lm_positions for b in batches]),
            masked_lm_ids=np.concatenate([b.masked_lm_ids for b in batches]),
            masked_offsets=_concat_offsets([b.masked_offsets for b in batches]),
            next_sentence_labels=np.concatenate([b.next_sentence_labels for b in batches]),
            keys=np.concatenate([b.keys for b in batches]),
            stats=stats, word_starts=word_starts)

    def to_arrow(self) -> pa.Table:
        """The shard table (``SCHEMA``, or ``SCHEMA_WITH_WORD_STARTS`` for rows that carry
        word starts); keys and stats are not stored."""
        columns = [
            _list_array(self.offsets, self.input_ids),
            _list_array(self.offsets, self.segment_ids),
            _list_array(self.masked_offsets, self.masked_lm_positions),
            _list_array(self.masked_offsets, self.masked_lm_ids),
            pa.array(self.next_sentence_labels, type=pa.int8()),
        ]
        if self.word_starts is None:
            return pa.Table.from_arrays(columns, schema=SCHEMA)
        columns.append(_list_array(self.offsets, self.word_starts))
        return pa.Table.from_arrays(columns, schema=SCHEMA_WITH_WORD_STARTS)

    @staticmethod
    def from_arrow(table: pa.Table) -> InstanceBatch:
        """Reads a shard table back (keys are zero: the table does not store them)."""
        offsets, input_ids = _list_columns(table, "input_ids", np.int32)
        seg_offsets, segment_ids = _list_columns(table, "segment_ids", np.int8)
        moffsets, positions = _list_columns(table, "masked_lm_positions", np.int32)
        mid_offsets, masked_ids = _list_columns(table, "masked_lm_ids", np.int32)
        if not (np.array_equal(offsets, seg_offsets) and np.array_equal(moffsets, mid_offsets)):
            raise ValueError("segment_ids must match input_ids, and masked_lm_ids masked_lm_positions, "
                             "in length on every row")
        labels = table.column("next_sentence_labels").to_numpy().astype(np.int8)
        word_starts = None
        if WORD_STARTS in table.column_names:
            word_offsets, word_starts = _list_columns(table, WORD_STARTS, bool)
            if not np.array_equal(offsets, word_offsets):
                raise ValueError("word_starts must match input_ids in length on every row")
        return InstanceBatch(
            input_ids=input_ids, offsets=offsets, segment_ids=segment_ids, masked_lm_positions=positions,
            masked_lm_ids=masked_ids, masked_offsets=moffsets, next_sentence_labels=labels,
            keys=np.zeros(len(labels), np.uint64), word_starts=word_starts)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{offsets[-1]:,} values do not fit one list<...> column (int32 offsets): "
                         "write fewer rows per table")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _list_columns(table: pa.Table, name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    column = table.column(name)
    if column.null_count:
        raise ValueError(f"column {name} has {column.null_count} null rows")
    if column.num_chunks == 0:
        return np.zeros(1, np.int64), np.zeros(0, dtype)
    array = column.combine_chunks() if column.num_chunks > 1 else column.chunk(0)
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(dtype)
    return offsets - offsets[0], values


def _concat_offsets(parts: list[np.ndarray]) -> np.ndarray:
    shifts = np.cumsum([0] + [int(p[-1]) for p in parts[:-1]])
    return np.concatenate([np.zeros(1, np.int64)] + [p[1:] + s for p, s in zip(parts, shifts)])


def _ragged_take(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New offsets, and the flat indices that gather ``rows`` of a ragged column."""
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    return new_offsets, _multi_arange(offsets[rows], lengths, new_offsets)


def _multi_arange(starts: np.ndarray, lengths: np.ndarray, out_offsets: np.ndarray) -> np.ndarray:
    """concatenate([arange(s, s + n) for s, n in zip(starts, lengths)]) without a loop."""
    total = int(out_offsets[-1])
    return np.arange(total, dtype=np.int64) - np.repeat(out_offsets[:-1] - starts, lengths)


# ---------------------------------------------------------------------------- keyed hashing
def document_seed(seed: int, document_key: int, dupe_index: int) -> int:
    """The 64-bit seed of one document's ``random.Random`` in one duplicate pass."""
    packed = struct.pack("<QQQ", seed & _U64, document_key & _U64, dupe_index & _U64)
    return xxhash.xxh3_64_intdigest(b"bert-mlm-nsp/v1" + packed)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a fresh uint64 array, in place (wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58_476D_1CE4_E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D0_49BB_1331_11EB)
    z ^= z >> np.uint64(31)
    return z


def _stream(keys: np.ndarray, salt: np.uint64) -> np.ndarray:
    return _mix64(keys ^ salt)


# ---------------------------------------------------------------------------- segments
@dataclasses.dataclass
class SegmentPlan:
    """Where each instance's A and B come from: half-open ranges into the bucket's
    concatenated tokens (``tokens``), plus what the statistics need."""

    tokens: np.ndarray       # int32: every sentence of the bucket, in order
    a_start: np.ndarray      # int64 [n]
    a_end: np.ndarray
    b_start: np.ndarray
    b_end: np.ndarray
    is_random_next: np.ndarray  # int8 [n]
    num_segments: np.ndarray    # int32 [n]: segments in the chunk the instance came from
    document: np.ndarray        # int64 [n]: index of A's document in ``documents``
    b_document: np.ndarray      # int64 [n]: index of B's document
    keys: np.ndarray            # uint64 [n]
    stats: ExampleStats
    word_starts: np.ndarray | None = None  # bool, parallel to ``tokens`` (see Document)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows) -> SegmentPlan:
        """The instances ``rows``, in that order, over the same tokens (``stats`` describe
        the whole plan: not carried)."""
        rows = np.asarray(rows, dtype=np.int64)
        return SegmentPlan(
            tokens=self.tokens, a_start=self.a_start[rows], a_end=self.a_end[rows],
            b_start=self.b_start[rows], b_end=self.b_end[rows], is_random_next=self.is_random_next[rows],
            num_segments=self.num_segments[rows], document=self.document[rows],
            b_document=self.b_document[rows], keys=self.keys[rows], stats=ExampleStats(),
            word_starts=self.word_starts)

    @staticmethod
    def concat(plans: Sequence[SegmentPlan]) -> SegmentPlan:
        """The plans of one bucket (its duplicate passes) as one: they share ``tokens``."""
        plans = list(plans)
        if any(len(p.tokens) != len(plans[0].tokens) for p in plans):
            raise ValueError("SegmentPlan.concat: the plans index different buckets' tokens")
        stats = ExampleStats()
        for plan in plans:
            stats = stats + plan.stats
        return SegmentPlan(tokens=plans[0].tokens, stats=stats, word_starts=plans[0].word_starts, **{
            name: np.concatenate([getattr(p, name) for p in plans])
            for name in ("a_start", "a_end", "b_start", "b_end", "is_random_next", "num_segments",
                         "document", "b_document", "keys")})

    @property
    def num_tokens(self) -> int:
        """Tokens of the instances, [CLS] and both [SEP] included."""
        return int((self.a_end - self.a_start).sum() + (self.b_end - self.b_start).sum()) + 3 * len(self)


class Bucket:
    """The documents of one bucket, prepared once for all duplicate passes: every
    sentence's tokens concatenated, and per document its cumulative sentence lengths.
    Empty sentences are dropped; a document without tokens makes no instances and is
    never a random B."""

    def __init__(self, documents: Sequence[Document]):
        sentences: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        segmented = [doc.word_starts is not None for doc in documents]
        if any(segmented) and not all(segmented):
            raise ValueError("a bucket mixes documents with and without segmenter word starts")
        self.keys = [doc.key for doc in documents]
        self.cums: list[list[int] | None] = []  # cumulative sentence lengths, from 0
        self.offsets: list[int] = []           # each document's first token in ``tokens``
        self.live: list[int] = []              # documents with tokens: the random-B pool
        self.live_rank: list[int] = []         # each document's index in ``live``
        total = 0
        for index, doc in enumerate(documents):
            kept = [s for s in doc.sentences if len(s)]
            if doc.word_starts is not None:
                if [len(w) for w in doc.word_starts] != [len(s) for s in doc.sentences]:
                    raise ValueError("Document.word_starts must match its sentences' lengths")
                starts.extend(w for w in doc.word_starts if len(w))
            self.offsets.append(total)
            self.live_rank.append(len(self.live))
            if kept:
                cum = list(accumulate((len(s) for s in kept), initial=0))
                self.cums.append(cum)
                self.live.append(index)
                sentences.extend(kept)
                total += cum[-1]
            else:
                self.cums.append(None)
        self.tokens = (np.concatenate(sentences).astype(np.int32, copy=False) if sentences
                       else np.zeros(0, np.int32))
        self.word_starts = None
        if documents and all(segmented):
            self.word_starts = (np.concatenate(starts).astype(bool, copy=False) if starts
                                else np.zeros(0, bool))
        self.id_range = (int(self.tokens.min()), int(self.tokens.max())) if total else (0, 0)

    def __len__(self) -> int:
        return len(self.keys)


def plan_segments(documents: Sequence[Document] | Bucket, dupe_index: int, seed: int,
                  config: ExampleConfig, targets: slice = slice(None)) -> SegmentPlan:
    """Google's ``create_instances_from_document`` for ``documents[targets]``, on sentence
    lengths only; random B sentences may come from any document of ``documents``."""
    bucket = documents if isinstance(documents, Bucket) else Bucket(documents)
    cums, doc_offsets, live, live_rank = bucket.cums, bucket.offsets, bucket.live, bucket.live_rank
    max_num = config.max_num_tokens
    short_prob = config.short_seq_prob
    n_live = len(live)
    stats = ExampleStats()
    a_start, a_end, b_start, b_end, label, nsegs, a_doc, b_doc = [], [], [], [], [], [], [], []
    doc_seeds = [0] * len(bucket)

    for d in range(len(bucket))[targets]:
        cum = cums[d]
        if cum is None:
            stats.empty_documents += 1
            continue
        stats.documents += 1
        doc_seed = doc_seeds[d] = document_seed(seed, bucket.keys[d], dupe_index)
        rng = random.Random(doc_seed)
        rand, bits = rng.random, rng.getrandbits
        nsent = len(cum) - 1
        base = doc_offsets[d]
        rank = live_rank[d]
        target = max_num
        if rand() < short_prob:
            target = 2 + _below(bits, max_num - 1)  # randint(2, max_num)
            stats.short_target_documents += 1
        first = 0  # first sentence of the current chunk
        while first < nsent:
            # Google appends sentences until the chunk reaches the target or the document
            # ends: the first ``last`` with cum[last + 1] - cum[first] >= target.
            last = bisect_left(cum, cum[first] + target, first + 1) - 1
            if last >= nsent:
                last = nsent - 1
            nseg = last - first + 1
            split = first + (1 + _below(bits, nseg - 1) if nseg >= 2 else 1)  # a_end, as a sentence index
            a0, a1 = base + cum[first], base + cum[split]
            if n_live == 1:
                random_next = False
                if nseg == 1:  # a random B needs another document; there is none
                    stats.skipped_single_document += 1
                    first = last + 1
                    continue
            else:
                random_next = nseg == 1 or rand() < 0.5
            if random_next:
                target_b = target - (a1 - a0)
                r = _below(bits, n_live - 1)  # Google's bug fixed: any document but this one
                if r >= rank:
                    r += 1
                r = live[r]
                rcum = cums[r]
                rn = len(rcum) - 1
                start = _below(bits, rn)
                stop = bisect_left(rcum, rcum[start] + target_b, start + 1)
                if stop > rn:
                    stop = rn
                b0, b1 = doc_offsets[r] + rcum[start], doc_offsets[r] + rcum[stop]
                last = split - 1  # "put back" the unused segments
            else:
                r = d
                b0, b1 = a1, base + cum[last + 1]
            excess = (a1 - a0) + (b1 - b0) - max_num
            if excess > 0:
                a0, a1, b0, b1 = _truncate(a0, a1, b0, b1, excess, bits)
                stats.truncated_tokens += excess
            a_start.append(a0)
            a_end.append(a1)
            b_start.append(b0)
            b_end.append(b1)
            label.append(random_next)
            nsegs.append(nseg)
            a_doc.append(d)
            b_doc.append(r)
            first = last + 1

    is_random_next = np.array(label, np.int8)
    num_segments = np.array(nsegs, np.int32)
    multi = num_segments >= 2
    stats.instances = len(label)
    stats.multi_segment_instances = int(multi.sum())
    stats.multi_segment_random_next = int(is_random_next[multi].sum())
    # Instance key: splitmix64 of (document seed, index of the instance in its document).
    a_doc_arr = np.array(a_doc, np.int64)
    first_of_doc = np.searchsorted(a_doc_arr, a_doc_arr)  # documents come in ascending order
    within = (np.arange(len(a_doc_arr)) - first_of_doc).astype(np.uint64)
    seeds = np.array(doc_seeds, np.uint64)[a_doc_arr]
    return SegmentPlan(
        tokens=bucket.tokens,
        a_start=np.array(a_start, np.int64), a_end=np.array(a_end, np.int64),
        b_start=np.array(b_start, np.int64), b_end=np.array(b_end, np.int64),
        is_random_next=is_random_next, num_segments=num_segments,
        document=a_doc_arr, b_document=np.array(b_doc, np.int64),
        keys=_mix64(seeds + (within + np.uint64(1)) * _GOLDEN),
        stats=stats, word_starts=bucket.word_starts)


def _below(getrandbits, n: int) -> int:
    """``rng.randint(0, n - 1)``, the same draws: CPython's ``randrange`` takes
    ``n.bit_length()`` bits and retries while the value is >= n (three Python calls
    fewer per draw; the segment test checks equality with ``randint``)."""
    k = n.bit_length()
    r = getrandbits(k)
    while r >= n:
        r = getrandbits(k)
    return r


def _truncate(a0: int, a1: int, b0: int, b1: int, excess: int, getrandbits
              ) -> tuple[int, int, int, int]:
    """Google's truncate_seq_pair on ranges: ``excess`` removals, each from the longer
    segment (B on a tie), from its front if ``rng.random() < 0.5`` else its back.

    Which segment loses each token depends on the lengths only: the longer one, X, loses
    ``k`` tokens until it is no longer longer, then B and A alternate, starting with the
    other one, Y. So coin j goes to X for j < k, then to Y, X, Y, ... and only the number
    of front coins per segment matters.

    The coins are read in one call: ``random()`` uses two 32-bit Mersenne Twister words
    and is < 0.5 exactly when bit 31 of the first is 0, and ``getrandbits(64 * excess)``
    returns the same words, the first in the lowest bits. So coin j is bit 64 j + 31,
    1 meaning "back", and the backs of a set of coins are a popcount under a mask.
    """
    la, lb = a1 - a0, b1 - b0
    coins = getrandbits(64 * excess)
    k = min(la - lb if la > lb else lb - la + 1, excess)
    rest = excess - k
    x_back = (coins & _every_word(k)).bit_count()
    coins >>= 64 * k
    y_back = (coins & _every_other_word(rest)).bit_count()
    x_back += ((coins >> 64) & _every_other_word(rest - 1)).bit_count()
    x_count, y_count = k + rest // 2, (rest + 1) // 2
    if la > lb:  # X is A
        return a0 + x_count - x_back, a1 - x_back, b0 + y_count - y_back, b1 - y_back
    return a0 + y_count - y_back, a1 - y_back, b0 + x_count - x_back, b1 - x_back


def _every_word(words: int) -> int:
    """Bit 31 of each of ``words`` 64-bit words."""
    return _bit31_mask(words, 1) if words < 512 else _bit31_mask.__wrapped__(words, 1)


def _every_other_word(words: int) -> int:
    """Bit 31 of words 0, 2, 4, ... below ``words`` (none if words <= 0)."""
    return _bit31_mask(words, 2) if words < 512 else _bit31_mask.__wrapped__(words, 2)


@functools.lru_cache(maxsize=1024)
def _bit31_mask(words: int, stride: int) -> int:
    # Built from bytes: linear in the size, also for a sentence of 10^5 tokens.
    pattern = b"\0\0\0\x80" + b"\0" * (8 * stride - 4)
    return int.from_bytes((pattern * ((max(words, 0) + stride - 1) // stride))[:8 * max(words, 0)], "little")


# ---------------------------------------------------------------------------- instances
def create_instances(documents: Sequence[Document] | Bucket, dupe_index: int, seed: int,
                     config: ExampleConfig, vocab: VocabInfo, targets: slice = slice(None)) -> InstanceBatch:
    """All masked instances of one bucket for one duplicate pass.

    For each document of ``documents[targets]`` in order, Google's
    create_instances_from_document; random next sentences come from any other document
    of ``documents``. ``targets`` lets a caller cut a big bucket into pieces: the pieces'
    outputs concatenate to the whole bucket's output. Passing a :class:`Bucket` instead
    of the list saves preparing it again for every duplicate pass (~13% of the time).
    """
    bucket = documents if isinstance(documents, Bucket) else Bucket(documents)
    check_vocabulary(bucket, config, vocab)
    return mask_instances(plan_segments(bucket, dupe_index, seed, config, targets), config, vocab)


def check_vocabulary(bucket: Bucket, config: ExampleConfig, vocab: VocabInfo) -> None:
    """Refuses documents tokenized with another model, and whole-word masking without
    word starts (the vocabulary's table, or the documents' own), before any instance is made."""
    if config.whole_word_mask and vocab.word_start is None and bucket.word_starts is None:
        raise ValueError("--whole-word-mask needs VocabInfo.word_start (the word-start table)")
    low, high = bucket.id_range
    if low < 0 or high >= vocab.vocab_size:
        raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary (size "
                         f"{vocab.vocab_size}): the documents were tokenized with another model")


def mask_instances(plan: SegmentPlan, config: ExampleConfig, vocab: VocabInfo) -> InstanceBatch:
    """The planned instances, assembled as [CLS] A [SEP] B [SEP] and masked. Every random
    draw is keyed by the instance's key, so a subset of a plan masks exactly as it does
    within the whole plan."""
    n = len(plan.keys)
    if n == 0:
        batch = InstanceBatch.empty()
        batch.stats = plan.stats
        return batch

    # [CLS] A [SEP] B [SEP]: five ranges per instance into tokens + [CLS, SEP].
    source = np.concatenate([plan.tokens, np.array([vocab.cls_id, vocab.sep_id], np.int32)])
    cls_at, sep_at = len(plan.tokens), len(plan.tokens) + 1
    len_a = plan.a_end - plan.a_start
    len_b = plan.b_end - plan.b_start
    starts = np.empty((n, 5), np.int64)
    starts[:, 0], starts[:, 1], starts[:, 2], starts[:, 3], starts[:, 4] = \
        cls_at, plan.a_start, sep_at, plan.b_start, sep_at
    pieces = np.ones((n, 5), np.int64)
    pieces[:, 1], pieces[:, 3] = len_a, len_b
    pieces = pieces.ravel()
    piece_offsets = np.zeros(5 * n + 1, np.int64)
    np.cumsum(pieces, out=piece_offsets[1:])
    gather = _multi_arange(starts.ravel(), pieces, piece_offsets)
    original = source[gather]
    token_word_start = None
    if config.whole_word_mask and plan.word_starts is not None:
        # [CLS] and [SEP] count as starts, as in the vocabulary's table.
        token_word_start = np.concatenate([plan.word_starts, np.ones(2, bool)])[gather]

    lengths = len_a + len_b + 3
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    segment_lengths = np.stack([len_a + 2, len_b + 1], axis=1).ravel()
    segment_ids = np.repeat(np.tile(np.array([0, 1], np.int8), n), segment_lengths)

    if config.masking == "dynamic":  # unmasked: the trainer's loader masks per epoch
        input_ids, rows, cols, masked_ids = original, np.zeros(0, np.int64), np.zeros(0, np.int64), original[:0]
        stored_starts = token_word_start
    else:
        stored_starts = None
        input_ids, rows, cols, masked_ids = mask_tokens(plan.keys, original, offsets, len_a, config, vocab,
                                                        token_word_start)

    masked_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=masked_offsets[1:])
    return InstanceBatch(
        input_ids=input_ids, offsets=offsets, segment_ids=segment_ids,
        masked_lm_positions=cols.astype(np.int32), masked_lm_ids=masked_ids,
        masked_offsets=masked_offsets, next_sentence_labels=plan.is_random_next,
        keys=plan.keys, stats=plan.stats, word_starts=stored_starts)


def mask_tokens(keys: np.ndarray, original: np.ndarray, offsets: np.ndarray, len_a: np.ndarray,
                config: ExampleConfig, vocab: VocabInfo, token_word_start: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Google's masking of rows ``[CLS] A [SEP] B [SEP]`` held flat in ``original`` (row i
    at ``offsets[i]:offsets[i + 1]``, A of ``len_a[i]`` tokens), every draw keyed by the
    row's ``keys[i]``. Returns (input_ids after masking, row and position of each masked
    token, their original ids). Shared by static masking here and by the trainer's loader
    for dynamic masking, so both follow the same rules."""
    lengths = np.diff(offsets)
    rows, cols = _choose_masked(keys, lengths, len_a, original, config, vocab, token_word_start)
    flat = offsets[rows] + cols
    masked_ids = original[flat]
    input_ids = original.copy()
    action = _mix64(_stream(keys, _SALT_ACTION)[rows] + (cols + 1).astype(np.uint64) * _GOLDEN)
    action >>= np.uint64(11)  # 53 uniform bits
    input_ids[flat[action < _MASK_BELOW]] = vocab.mask_id
    replace = action >= _KEEP_BELOW
    if replace.any():
        r_rows, r_cols = rows[replace], cols[replace]
        draw = _mix64(_stream(keys, _SALT_RANDOM)[r_rows] + (r_cols + 1).astype(np.uint64) * _GOLDEN)
        regular = vocab.regular_ids
        input_ids[flat[replace]] = regular[draw % np.uint64(len(regular))]
    return input_ids, rows, cols, masked_ids


# ---------------------------------------------------------------------------- packed rows (MLM only)
def pack_full_sentences(bucket: Bucket, dupe_index: int, seed: int, config: ExampleConfig,
                        vocab: VocabInfo) -> InstanceBatch:
    """Packed MLM rows from one bucket, as RoBERTa's FULL-SENTENCES: ``[CLS]``, then the
    bucket's sentences in order across its documents with a ``[SEP]`` where a document
    ends, up to ``max_seq_length`` tokens, then ``[SEP]``. Unlike RoBERTa, which starts a
    new row when the next sentence does not fit, the row is filled and the sentence goes
    on in the next one (Hugging Face's run_mlm ``group_texts`` does the same): at 128
    tokens, whole sentences only would leave 18% of each row to padding on Wikipedia
    (measured), filled rows leave none. Rows end at the bucket's end, so only a bucket's
    last row can be short: the pad share is near zero. Every token of
    the bucket is in exactly one row, in order. Masked like the pairs (static), or left
    for the loader (dynamic); segment ids and NSP labels are all 0. Deterministic: row
    keys come from (seed, the bucket's first document, dupe index, row index).
    """
    capacity = config.max_seq_length - 2  # [CLS] ... [SEP]
    spans: list[list[tuple[int, int]]] = [[]]  # per row: (start, end) ranges of tokens; (-1, -1) = a [SEP]
    used = 0

    def close_row():
        nonlocal used
        if spans[-1] and spans[-1][-1] == (-1, -1):
            spans[-1].pop()  # a document boundary at a row's end: the closing [SEP] marks it
        if spans[-1]:
            spans.append([])
        used = 0

    for doc_index, cum in enumerate(bucket.cums):
        if cum is None:
            continue
        base = bucket.offsets[doc_index]
        for s in range(len(cum) - 1):
            start, end = base + cum[s], base + cum[s + 1]
            while start < end:
                take = min(end - start, capacity - used)
                spans[-1].append((start, start + take))
                used += take
                start += take
                if used == capacity:
                    close_row()
        if used:
            spans[-1].append((-1, -1))
            used += 1
            if used == capacity:
                close_row()
    close_row()
    spans.pop()  # the empty row close_row leaves open
    n = len(spans)
    if n == 0:
        return InstanceBatch.empty()
    source = np.concatenate([bucket.tokens, np.array([vocab.cls_id, vocab.sep_id], np.int32)])
    cls_at, sep_at = len(bucket.tokens), len(bucket.tokens) + 1
    starts, sizes = [], []
    for row in spans:
        starts.append(cls_at)
        sizes.append(1)
        for start, end in row:
            starts.append(sep_at if start < 0 else start)
            sizes.append(1 if start < 0 else end - start)
        starts.append(sep_at)
        sizes.append(1)
    sizes_arr = np.array(sizes, np.int64)
    piece_offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes_arr, out=piece_offsets[1:])
    gather = _multi_arange(np.array(starts, np.int64), sizes_arr, piece_offsets)
    original = source[gather]
    token_word_start = None
    if config.whole_word_mask and bucket.word_starts is not None:
        # jieba's words, as the pairs get them (mask_instances); before, packed rows fell back to
        # the vocabulary's table, where every Han piece starts a word. [CLS]/[SEP] count as starts.
        token_word_start = np.concatenate([bucket.word_starts, np.ones(2, bool)])[gather]
    lengths = np.array([2 + sum(1 if a < 0 else b - a for a, b in row) for row in spans], np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    first_key = bucket.keys[bucket.live[0]] if bucket.live else 0
    keys = _mix64(np.uint64(document_seed(seed, first_key, dupe_index) & _U64)
                  + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    stored_starts = None
    if config.masking == "dynamic":
        input_ids, rows, cols, masked_ids = original, np.zeros(0, np.int64), np.zeros(0, np.int64), original[:0]
        stored_starts = token_word_start
    else:
        # len_a = length - 2 puts the pairs' middle [SEP] on the closing one: no extra exclusion.
        input_ids, rows, cols, masked_ids = mask_tokens(keys, original, offsets, lengths - 2, config, vocab,
                                                        token_word_start)
    masked_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=masked_offsets[1:])
    stats = ExampleStats(documents=len(bucket.live), empty_documents=len(bucket) - len(bucket.live),
                         instances=n)
    return InstanceBatch(
        input_ids=input_ids, offsets=offsets, segment_ids=np.zeros(len(original), np.int8),
        masked_lm_positions=cols.astype(np.int32), masked_lm_ids=masked_ids, masked_offsets=masked_offsets,
        next_sentence_labels=np.zeros(n, np.int8), keys=keys, stats=stats, word_starts=stored_starts)


def num_to_predict(lengths: np.ndarray, config: ExampleConfig) -> np.ndarray:
    """Google's min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob))),
    ``len`` counting [CLS] and both [SEP]; np.rint rounds half to even like Python's round."""
    wanted = np.rint(lengths * config.masked_lm_prob).astype(np.int64)
    return np.minimum(config.max_predictions_per_seq, np.maximum(1, wanted))


def _choose_masked(keys: np.ndarray, lengths: np.ndarray, len_a: np.ndarray, original: np.ndarray,
                   config: ExampleConfig, vocab: VocabInfo, token_word_start: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(row, position) of every masked piece, rows ascending, positions ascending within a row.

    Works on an [n, longest] matrix: each position gets a random 64-bit key whose low
    bits are the position (so keys are unique in a row); non-candidates ([CLS], [SEP],
    padding) get the largest key. The masked pieces are the ``num`` smallest keys of a
    row, that is a uniformly random subset of ``num`` candidates.
    """
    n = len(lengths)
    width = int(lengths.max())
    pos = np.arange(width, dtype=np.int64)[None, :]
    candidate = (pos > 0) & (pos < (lengths - 1)[:, None]) & (pos != (len_a + 1)[:, None])
    inside = pos < lengths[:, None]
    if config.objective == "mlm":  # the [SEP] between packed documents is no candidate either
        candidate[inside] &= original != vocab.sep_id
    bits = np.uint64(width.bit_length())  # pos < 2**bits - 1: a candidate's key is < _MAX_KEY
    order = _stream(keys, _SALT_ORDER)
    rand = _mix64(order[:, None] + ((pos + 1).astype(np.uint64) * _GOLDEN))
    rand = ((rand >> bits) << bits) | pos.astype(np.uint64)
    rand[~candidate] = _MAX_KEY
    # Never more than the candidates: a large masked_lm_prob, or a short row (a packed MLM row
    # [CLS] x [SEP] has one candidate, 1 fewer specials than a pair; [SEP]s inside count too).
    num = np.minimum(num_to_predict(lengths, config), candidate.sum(axis=1))

    if not config.whole_word_mask:
        k = int(num.max())
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        smallest = np.sort(np.partition(rand, k - 1, axis=1)[:, :k] if k < width else rand, axis=1)
        # A row without candidates masks nothing: a threshold under every candidate's key (> 0).
        threshold = np.where(num > 0, smallest[np.arange(n), np.maximum(num - 1, 0)], np.uint64(0))
        return np.nonzero(rand <= threshold[:, None])

    # Whole words: a group is a word start and the pieces that continue it, never
    # spanning [CLS]/[SEP], so a group is a contiguous run of candidates. Groups are
    # ranked by the key of their first piece and taken greedily, skipping a group that
    # would overflow ``num`` (Google's rule), one vectorized step per rank.
    starts_word = np.zeros((n, width), bool)
    starts_word[inside] = (vocab.word_start[original] if token_word_start is None
                                           else token_word_start)
    group_start = candidate & starts_word
    group_start[:, 1:] |= candidate[:, 1:] & ~candidate[:, :-1]
    # A group runs from its start to the next start or non-candidate ([SEP], padding).
    boundary = np.where(group_start | ~candidate, pos.astype(np.int32), np.int32(width))
    next_boundary = np.full((n, width), width, np.int32)
    next_boundary[:, :-1] = np.minimum.accumulate(boundary[:, :0:-1], axis=1)[:, ::-1]
    group_size = (next_boundary - pos.astype(np.int32)).ravel()
    groups_per_row = group_start.sum(axis=1)
    most = int(groups_per_row.max())
    # Each row's group-start keys, smallest first; their low bits are the start position.
    ranked = np.sort(np.where(group_start, rand, _MAX_KEY), axis=1)[:, :most].ravel()
    low_bits = (np.uint64(1) << bits) - np.uint64(1)
    chosen_start = np.zeros(n * width, bool)
    count = np.zeros(n, np.int64)
    active = np.arange(n)
    for rank in range(most):
        key = ranked[active * most + rank]
        at = active * width + (key & low_bits).astype(np.int64)
        size = np.where(key != _MAX_KEY, group_size[np.minimum(at, n * width - 1)], 0)
        total = count[active] + size
        take = (size > 0) & (total <= num[active])
        chosen_start[at[take]] = True
        count[active[take]] = total[take]
        active = active[(count[active] < num[active]) & (groups_per_row[active] > rank + 1)]
        if not len(active):
            break
    starts = np.flatnonzero(chosen_start)  # row-major: rows ascending, positions ascending
    sizes = group_size[starts].astype(np.int64)
    out_offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=out_offsets[1:])
    rows = np.repeat(starts // width, sizes)
    return rows, _multi_arange(starts % width, sizes, out_offsets)
