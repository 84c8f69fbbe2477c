"""The pipeline's steps as composite PTransforms, each named for what it produces.

    ReadTasks ─► ReadDocuments ─► ExtractSentences ─┬─► TrainTokenizer ─► model (side input)
                                                     └─► TokenizeDocuments ─► CreateMlmNspExamples ─► WriteShards

Every element that is dropped is counted in a ``Metrics.counter`` of the namespace
``preprocess`` named for the reason; the driver logs the counters and puts them in the
manifest. Heavy objects (SentencePiece processors) are built once per worker and
cached, never pickled with the DoFn.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from preprocessing import examples, inputs, vocab, wiki_dump
from preprocessing.documents import Problem, RawDocument, SentenceDocument, document_key, stable_hash
from preprocessing.options import PreprocessConfig
from preprocessing.sentences import split_sentences
from preprocessing.wikitext import clean_wikitext

log = logging.getLogger(__name__)
NAMESPACE = "preprocess"
_MAX_WARNINGS_PER_REASON = 20


def counter(name: str):
    return Metrics.counter(NAMESPACE, name)


class _ProblemLog:
    """Counts every problem; logs the first few of each reason, then every 1000th."""

    def __init__(self):
        self.seen: dict[str, int] = {}

    def report(self, problem: Problem) -> None:
        counter(problem.reason).inc()
        n = self.seen[problem.reason] = self.seen.get(problem.reason, 0) + 1
        if n <= _MAX_WARNINGS_PER_REASON or n % 1000 == 0:
            log.warning("%s [%s #%d]", problem.message, problem.reason, n)


class _Throttled:
    """Logs a running total at most every ``every`` seconds: progress a user can see."""

    def __init__(self, label: str, every: float = 15.0):
        self.label, self.every, self.total = label, every, 0
        self.last = time.monotonic()

    def add(self, n: int, what: str) -> None:
        self.total += n
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            log.info("%s: %s %s", self.label, f"{self.total:,}", what)


# ---------------------------------------------------------------------------- reading
class _ReadTaskFn(beam.DoFn):
    def __init__(self, text_field: str, max_line_bytes: int):
        self.text_field, self.max_line_bytes = text_field, max_line_bytes

    def setup(self):
        self.problems = _ProblemLog()
        self.progress = _Throttled("read")

    def process(self, task: inputs.ReadTask) -> Iterator[RawDocument]:
        name = os.path.basename(task.path)
        for item in inputs.read_task(task, self.text_field, self.max_line_bytes):
            if isinstance(item, Problem):
                self.problems.report(item)
            elif isinstance(item, wiki_dump.Page):
                counter("pages-read").inc()
                if item.repaired:
                    counter("invalid-utf8-pages").inc()
                if item.namespace != 0:
                    counter("skipped-non-article-namespace").inc()
                elif item.is_redirect:
                    counter("skipped-redirects").inc()
                elif item.is_disambiguation:
                    counter("skipped-disambiguation").inc()
                else:
                    counter("documents-read").inc()
                    self.progress.add(1, "documents read in this worker")
                    yield RawDocument(f"{name}#{item.page_id}", item.text, "wikitext", item.title)
            else:
                counter("documents-read").inc()
                self.progress.add(1, "documents read in this worker")
                yield item


class ReadDocuments(beam.PTransform):
    """Read tasks → RawDocument, with pages filtered and every skip counted."""

    def __init__(self, text_field: str, max_line_bytes: int, rebalance: bool = True):
        super().__init__()
        self.text_field, self.max_line_bytes = text_field, max_line_bytes
        self.rebalance = rebalance

    def expand(self, tasks):
        docs = (tasks
                # One task per worker at a time: without this, Create's bundles decide.
                | "DistributeReadTasks" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(_ReadTaskFn(self.text_field, self.max_line_bytes)))
        if self.rebalance:
            # Breaks fusion: a single-stream dump is read by one worker, but its pages
            # are cleaned by all of them.
            docs = docs | "SpreadDocuments" >> beam.Reshuffle()
        return docs


# ---------------------------------------------------------------------------- cleaning
def _to_sentences(doc: RawDocument) -> Iterator[SentenceDocument]:
    text = clean_wikitext(doc.text) if doc.markup == "wikitext" else doc.text
    sentences = tuple(split_sentences(text))
    if not sentences:
        counter("skipped-empty-documents").inc()
        return
    counter("sentences").inc(len(sentences))
    counter("characters").inc(sum(map(len, sentences)))
    yield SentenceDocument(doc.doc_id, sentences)


class ExtractSentences(beam.PTransform):
    """RawDocument → SentenceDocument: markup cleaned to prose, split into sentences."""

    def expand(self, docs):
        return docs | "CleanAndSplit" >> beam.FlatMap(_to_sentences)


# ---------------------------------------------------------------------------- vocabulary
def _sampled_sentences(doc: SentenceDocument, total: int, wanted: int) -> Iterator[tuple[int, str]]:
    # Keyed sampling: a sentence is in the sample iff its hash falls under a threshold,
    # so the sample is the same for any number of workers and any processing order.
    threshold = (1 << 64) if total <= wanted else int(wanted / total * (1 << 64))
    key = doc.key
    for i, sentence in enumerate(doc.sentences):
        h = stable_hash(key, i)
        if h < threshold:
            yield h, sentence


def _train_and_write(sample: list[tuple[int, str]], config: PreprocessConfig) -> bytes:
    sample.sort()
    log.info("training a %s SentencePiece vocabulary of %d on %d sentences",
             config.model_type, config.vocab_size, len(sample))
    proto = vocab.train_sentencepiece((s for _, s in sample), config.vocab_size, config.model_type)
    write_tokenizer_files(proto, config.output, config.max_seq_length)
    return proto


def write_tokenizer_files(proto: bytes, output: str, max_seq_length: int) -> bytes:
    """Writes OUTPUT/tokenizer/ (spm.model + Hugging Face files) on any Beam filesystem."""
    import tempfile

    with tempfile.TemporaryDirectory() as local:
        vocab.write_tokenizer(proto, local, max_seq_length)
        target = FileSystems.join(output, "tokenizer")
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as src, \
                    FileSystems.create(FileSystems.join(target, name)) as dst:
                dst.write(src.read())
    return proto


class TrainTokenizer(beam.PTransform):
    """SentenceDocument → one serialized SentencePiece model, also written to OUTPUT/tokenizer."""

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self.config = config

    def expand(self, docs):
        total = (docs
                 | "SentencesPerDocument" >> beam.Map(lambda d: len(d.sentences))
                 | "TotalSentences" >> beam.CombineGlobally(sum))
        return (
            docs
            | "SampleSentences" >> beam.FlatMap(_sampled_sentences, beam.pvalue.AsSingleton(total),
                                                self.config.vocab_sample_sentences)
            | "CollectSample" >> beam.combiners.ToList()
            | "Train" >> beam.Map(_train_and_write, self.config)
        )


# ---------------------------------------------------------------------------- tokenizing
_processors: dict[int, tuple[object, examples.VocabInfo]] = {}


def load_model(proto: bytes):
    """A SentencePiece processor and VocabInfo for ``proto``, cached per worker process."""
    key = hash(proto)
    if key not in _processors:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        ids = {t: sp.piece_to_id(t) for t in vocab.SPECIAL_TOKENS}
        _processors[key] = (sp, examples.VocabInfo(
            vocab_size=sp.get_piece_size(), cls_id=ids["[CLS]"], sep_id=ids["[SEP]"],
            mask_id=ids["[MASK]"], special_ids=tuple(sorted(ids.values())),
            word_start=vocab.word_start_table(proto)))
    return _processors[key]


@dataclasses.dataclass(frozen=True)
class TokenizedDocument:
    """Sentences as one flat id array + lengths: pickles as two arrays, not one small
    array per sentence (which made unpickling 7% of the run time)."""

    key: int
    tokens: np.ndarray   # int32, every sentence's ids concatenated
    lengths: np.ndarray  # int32, tokens per sentence

    def to_document(self) -> examples.Document:
        return examples.Document(key=self.key, sentences=np.split(self.tokens, np.cumsum(self.lengths)[:-1]))


def _tokenize(doc: SentenceDocument, proto: bytes) -> Iterator[TokenizedDocument]:
    sp, _ = load_model(proto)
    # One call per document: SentencePiece's batch encode is ~20% faster than a loop.
    pieces = [p for p in sp.encode(list(doc.sentences), num_threads=1) if p]
    if not pieces:
        counter("skipped-empty-after-tokenizing").inc()
        return
    lengths = np.fromiter(map(len, pieces), dtype=np.int32, count=len(pieces))
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
    counter("tokens").inc(len(tokens))
    yield TokenizedDocument(doc.key, tokens, lengths)


class TokenizeDocuments(beam.PTransform):
    """SentenceDocument → TokenizedDocument (sentences as int32 ids)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def expand(self, docs):
        return docs | "Encode" >> beam.FlatMap(_tokenize, beam.pvalue.AsSingleton(self.model))


# ---------------------------------------------------------------------------- examples
def _wire(value) -> bytes:
    """A shuffled value as bytes the worker pickles once. The local multi-process runner
    groups every GroupByKey in its own process, decoding and re-encoding each value while
    the workers wait: as bytes that is a copy, as objects an unpickle and a pickle."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _example_config(config: PreprocessConfig) -> examples.ExampleConfig:
    return examples.ExampleConfig(
        max_seq_length=config.max_seq_length, short_seq_prob=config.short_seq_prob,
        masked_lm_prob=config.masked_lm_prob, max_predictions_per_seq=config.max_predictions_per_seq,
        whole_word_mask=config.whole_word_mask)


class _PlanInstancesFn(beam.DoFn):
    """(bucket, documents) → (bucket, SegmentPlan of every duplicate pass): where each
    instance's A and B come from, not yet assembled or masked."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.example_config = _example_config(config)

    def process(self, bucket_docs, proto: bytes):
        bucket, wired = bucket_docs
        _, vocab_info = load_model(proto)
        docs = [pickle.loads(d) for d in wired]
        # The bucket's order must not depend on which worker grouped it.
        prepared = examples.Bucket([d.to_document() for d in sorted(docs, key=lambda d: d.key)])
        examples.check_vocabulary(prepared, self.example_config, vocab_info)
        plan = examples.SegmentPlan.concat([
            examples.plan_segments(prepared, dupe, self.config.seed, self.example_config)
            for dupe in range(self.config.dupe_factor)])
        counter("instances").inc(len(plan))
        counter("instance-tokens").inc(plan.num_tokens)
        counter("random-next").inc(int(plan.is_random_next.sum()))
        counter("short-target-document-passes").inc(plan.stats.short_target_documents)
        if plan.stats.skipped_single_document:
            counter("skipped-instances-single-document-bucket").inc(plan.stats.skipped_single_document)
        yield bucket, plan


def shard_layout(counts: dict[int, int], config: PreprocessConfig) -> tuple[dict[int, int], int, int]:
    """Each bucket's first global instance index (buckets in key order), the number of
    instances and the number of shards."""
    offsets, total = {}, 0
    for bucket in sorted(counts):
        offsets[bucket] = total
        total += counts[bucket]
    num_shards = config.num_shards or max(1, math.ceil(total / config.rows_per_shard))
    return offsets, total, num_shards


def shard_of(global_index: np.ndarray, total: int, num_shards: int) -> np.ndarray:
    """Shard s holds the global indices i with i * num_shards // total == s: contiguous
    ranges whose sizes differ by at most one, so no rank runs out before the others."""
    return global_index * num_shards // max(total, 1)


class _SplitToShardsFn(beam.DoFn):
    """A bucket's plan, cut where shard boundaries fall: a bucket goes to one shard, or
    to two where a boundary crosses it. Its tokens travel with each part, so a shard's
    instances are assembled where the shard is written, and only the plan (about a
    quarter of the masked instances' bytes) crosses the shuffle."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self._layout = None

    def process(self, bucket_plan, counts: dict[int, int]):
        if self._layout is None:  # the side input is the same for every element
            self._layout = shard_layout(counts, self.config)
        offsets, total, num_shards = self._layout
        bucket, plan = bucket_plan
        global_index = offsets[bucket] + np.arange(len(plan), dtype=np.int64)
        shards = shard_of(global_index, total, num_shards)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            yield int(shard), _wire((int(global_index[rows[0]]), plan.take(rows)))


@dataclasses.dataclass(eq=False)
class ShardBatch:
    """The instances of one output shard, in their final order."""

    index: int
    num_shards: int
    batch: examples.InstanceBatch


class _AssembleShardFn(beam.DoFn):
    """(shard, plan parts) → ShardBatch: the instances assembled and masked, then put in
    a stable order shuffled by their keys (global index breaks ties)."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.example_config = _example_config(config)

    def setup(self):
        self.progress = _Throttled("examples")

    def process(self, shard_parts, counts: dict[int, int], proto: bytes):
        shard, wired = shard_parts
        _, _, num_shards = shard_layout(counts, self.config)
        _, vocab_info = load_model(proto)
        parts = sorted((pickle.loads(p) for p in wired), key=lambda p: p[0])
        index = np.concatenate([first + np.arange(len(plan), dtype=np.int64) for first, plan in parts])
        batch = examples.InstanceBatch.concat(
            [examples.mask_instances(plan, self.example_config, vocab_info) for _, plan in parts])
        counter("masked-tokens").inc(batch.num_masked)
        self.progress.add(len(batch), "examples created in this worker")
        yield ShardBatch(shard, num_shards, batch.take(np.lexsort((index, batch.keys))))


class CreateMlmNspExamples(beam.PTransform):
    """TokenizedDocument → ShardBatch: the masked MLM/NSP instances of each output shard.

    Documents are grouped into buckets of about ``docs_per_bucket`` by a stable hash;
    random next sentences come from the same bucket, so memory per worker is bounded
    by a bucket, not by the corpus (Google's script holds every document). Buckets are
    planned (Google's segment choices, the Python-heavy part), the plans are cut into
    shards of equal size (contiguous runs of buckets in key order), and each shard's
    instances are assembled and masked (numpy) where the shard is grouped.
    """

    def __init__(self, config: PreprocessConfig, model):
        super().__init__()
        self.config, self.model = config, model

    def expand(self, docs):
        num_docs = docs | "CountDocuments" >> beam.combiners.Count.Globally()
        per_bucket = self.config.docs_per_bucket

        def to_bucket(doc, n):
            return (stable_hash(doc.key, "bucket") % max(1, n // per_bucket), _wire(doc))

        model = beam.pvalue.AsSingleton(self.model)
        plans = (
            docs
            | "AssignBuckets" >> beam.Map(to_bucket, beam.pvalue.AsSingleton(num_docs))
                                    .with_output_types(tuple[int, bytes])
            | "GroupBuckets" >> beam.GroupByKey()
            | "PlanInstances" >> beam.ParDo(_PlanInstancesFn(self.config), model)
        )
        counts = beam.pvalue.AsDict(plans | "CountPerBucket" >> beam.Map(lambda kv: (kv[0], len(kv[1]))))
        return (
            plans
            | "SplitToShards" >> beam.ParDo(_SplitToShardsFn(self.config), counts)
                                    .with_output_types(tuple[int, bytes])
            | "GroupShards" >> beam.GroupByKey()
            | "AssembleAndMask" >> beam.ParDo(_AssembleShardFn(self.config), counts, model)
        )


# ---------------------------------------------------------------------------- writing
def shard_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}.parquet"


class _WriteShardFn(beam.DoFn):
    def __init__(self, output: str):
        self.output = output

    def process(self, shard: ShardBatch):
        table = shard.batch.to_arrow()
        name = shard_name(shard.index, shard.num_shards)
        final = FileSystems.join(self.output, "shards", name)
        temp = FileSystems.join(self.output, "shards", f".{name}.inprogress")
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", row_group_size=8192)
        with FileSystems.create(temp) as f:
            f.write(buffer.getvalue())
        if FileSystems.exists(final):
            FileSystems.delete([final])
        FileSystems.rename([temp], [final])
        counter("shards-written").inc()
        log.info("wrote %s (%d rows)", final, table.num_rows)
        yield name, table.num_rows


class WriteShards(beam.PTransform):
    """ShardBatch → one Parquet file each, written under a temporary name and renamed
    when complete; yields (name, rows)."""

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self.config = config

    def expand(self, shards):
        return shards | "WriteParquet" >> beam.ParDo(_WriteShardFn(self.config.output))


def build_pipeline(p: beam.Pipeline, tasks: list[inputs.ReadTask], config: PreprocessConfig,
                   tokenizer_proto: bytes | None):
    """Adds the whole pipeline to ``p``; returns the PCollection of written shards."""
    docs = (p
            | "ReadTasks" >> beam.Create(tasks)
            | "ReadDocuments" >> ReadDocuments(config.text_field, config.max_line_bytes,
                                               inputs.needs_rebalancing(tasks, config.split_bytes))
            | "ExtractSentences" >> ExtractSentences())
    if tokenizer_proto is None:
        model = docs | "TrainTokenizer" >> TrainTokenizer(config)
    else:
        model = (p
                 | "GivenTokenizer" >> beam.Create([tokenizer_proto])
                 | "WriteTokenizer" >> beam.Map(write_tokenizer_files, config.output, config.max_seq_length))
    return (docs
            | "TokenizeDocuments" >> TokenizeDocuments(model)
            | "CreateMlmNspExamples" >> CreateMlmNspExamples(config, model)
            | "WriteShards" >> WriteShards(config))


def read_shard_counts(output: str) -> list[tuple[str, int]]:
    """(relative path, rows) of every written shard, read from the Parquet footers."""
    pattern = FileSystems.join(output, "shards", "part-*.parquet")
    result = []
    for meta in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
        with FileSystems.open(meta.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        result.append((f"shards/{os.path.basename(meta.path)}", rows))
    return result
