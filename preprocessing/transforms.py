"""The pipeline's steps as composite PTransforms, each named for what it produces.

    ReadTasks ─┬─► TrainTokenizer (a bounded sample of the tasks) ─► model (side input)
               └─► WriteExampleParts ─► AssembleShards ─► OUTPUT/shards/*.parquet
                          └─► CombineCounts ─► OUTPUT/parts/counters.json

No step gathers the corpus. A read task (a byte range of one file, defined by the input
alone) streams its documents in buckets of ``--docs-per-bucket`` consecutive documents;
each bucket is cleaned, split into sentences, tokenized, cut into Google's segments and
masked, and its examples go to the task's part file before the next bucket is read. Random
next segments come from the same bucket. What crosses a shuffle is small: read tasks, the
parts' row counts, shard numbers, per-task count records and the vocabulary sample, whose
size is fixed by flags. Equal-size shards are then assembled from the parts (see
``parts.py``). Memory per worker is bounded by a bucket or a shard, never by the corpus.

Counts travel in the data: every task emits one record of its counts (every skipped page,
line and document under its reason, and the totals), the records are summed at the end
and written to ``OUTPUT/parts/counters.json``, which the driver reads. A runner that
retries a bundle discards the failed attempt's outputs, so nothing is counted twice, and
every runner reports them (Beam metrics are not available on every runner).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import heapq
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np

from preprocessing import examples, inputs, language, parts, subwords, vocab, wiki_dump, word_starts
from preprocessing.documents import Problem, RawDocument, SentenceDocument, stable_hash
from preprocessing.options import PreprocessConfig
from preprocessing.sentences import split_sentences
from preprocessing.wikitext import clean_wikitext

log = logging.getLogger(__name__)
_MAX_WARNINGS_PER_REASON = 20


class _ProblemLog:
    """Counts every problem; logs the first few of each reason, then every 1000th."""

    def __init__(self, counts: collections.Counter, quiet: bool = False):
        self.counts, self.quiet = counts, quiet
        self.first: dict[str, str] = {}

    def report(self, problem: Problem) -> None:
        n = self.counts[problem.reason] = self.counts[problem.reason] + 1
        self.first.setdefault(problem.reason, problem.message)
        if not self.quiet and (n <= _MAX_WARNINGS_PER_REASON or n % 1000 == 0):
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


def merge_counts(records: Iterable[dict[str, int]]) -> dict[str, int]:
    """Sums count records (CombineGlobally calls it on records and on its own sums)."""
    total: collections.Counter = collections.Counter()
    for record in records:
        total.update(record)
    return dict(sorted(total.items()))


# ---------------------------------------------------------------------------- documents
def task_documents(task: inputs.ReadTask, text_field: str, max_line_bytes: int,
                   problems: _ProblemLog) -> Iterator[RawDocument]:
    """The documents one read task reads, with non-article pages filtered; every page,
    skip and problem counted in ``problems.counts``."""
    counts = problems.counts
    name = task.doc_name
    for item in inputs.read_task(task, text_field, max_line_bytes):
        if isinstance(item, Problem):
            problems.report(item)
        elif isinstance(item, wiki_dump.Page):
            counts["pages-read"] += 1
            if item.repaired:
                counts["invalid-utf8-pages"] += 1
            if item.namespace != 0:
                counts["skipped-non-article-namespace"] += 1
            elif item.is_redirect:
                counts["skipped-redirects"] += 1
            elif item.is_disambiguation:
                counts["skipped-disambiguation"] += 1
            else:
                counts["documents-read"] += 1
                yield RawDocument(f"{name}#{item.page_id}", item.text, "wikitext", item.title,
                                  getattr(item, "site", None))
        else:
            counts["documents-read"] += 1
            yield item


def to_sentences(doc: RawDocument, counts: collections.Counter, config: PreprocessConfig
                 ) -> SentenceDocument | None:
    """Markup cleaned to prose, the script converted (``--convert``), and split into
    sentences by the language's rules; None (counted) when nothing is left."""
    text = clean_wikitext(doc.text, _site_for(doc.site, config.language)) if doc.markup == "wikitext" \
        else doc.text
    if config.convert:
        text = language.Converter(config.convert)(text)
    sentences = tuple(split_sentences(text, config.language or "en"))
    if not sentences:
        counts["skipped-empty-documents"] += 1
        return None
    counts["sentences"] += len(sentences)
    counts["characters"] += sum(map(len, sentences))
    return SentenceDocument(doc.doc_id, sentences)


@functools.lru_cache(maxsize=16)
def _site_for(site, code: str | None):
    """The dump's site, showing the variant ``--language`` names (zh-tw, zh-hk, ...) of
    conversion markup; other languages leave the dump's default (zh-cn for zh)."""
    code = (code or "").replace("_", "-").lower()  # zh_TW as zh-tw
    parts = code.split("-")
    if len(parts) == 3 and parts[1] in ("hans", "hant"):
        code = f"{parts[0]}-{parts[2]}"  # zh-Hant-TW: the region's variant, zh-tw
    if site is None or "-" not in code or not site.converts:
        return site
    return dataclasses.replace(site, variant=code)


def consecutive_buckets(docs: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items; the last holds between ``size`` and
    ``2 * size - 1`` (or all, when there are fewer), so no task ends on a tiny bucket whose
    random next segments would have almost no documents to come from."""
    pending: list = []
    for doc in docs:
        pending.append(doc)
        if len(pending) == 2 * size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


# ---------------------------------------------------------------------------- vocabulary
def vocabulary_tasks(tasks: list[inputs.ReadTask], sample_bytes: int) -> list[inputs.ReadTask]:
    """The read tasks the vocabulary is trained on: in an order fixed by a hash of each
    task (file name and range), as many as it takes to cover ``sample_bytes`` of input.
    A spread of ranges from across the corpus, the same for any number of workers."""
    ranked = sorted(tasks, key=lambda t: stable_hash(t.doc_name, t.start, t.end))
    chosen, covered = [], 0
    for task in ranked:
        if covered >= sample_bytes:
            break
        chosen.append(task)
        covered += task.stored_bytes
    return chosen


class _SampleSentencesFn(beam.DoFn):
    """A read task → its ``k`` sentences of smallest hash, sorted: (hash, sentence) pairs.

    The sample of the whole corpus is then the ``k`` smallest of all tasks' lists, the
    same for any number of workers and any order. Also outputs, tagged ``problems``, the
    task's counts with the first message of each reason, for the error when nothing is left.
    """

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.text_field, self.max_line_bytes, self.k = \
            config.text_field, config.max_line_bytes, config.vocab_sample_sentences

    def process(self, task: inputs.ReadTask):
        counts: collections.Counter = collections.Counter()
        # Quiet: the examples step reads these tasks again and logs their problems once.
        problems = _ProblemLog(counts, quiet=True)
        heap: list[tuple[int, str]] = []  # max-heap by negated hash: the k smallest so far
        for raw in task_documents(task, self.text_field, self.max_line_bytes, problems):
            doc = to_sentences(raw, counts, self.config)
            if doc is None:
                continue
            key = doc.key
            for i, sentence in enumerate(doc.sentences):
                h = stable_hash(key, i)
                if len(heap) < self.k:
                    heapq.heappush(heap, (-h, sentence))
                elif -h > heap[0][0]:
                    heapq.heapreplace(heap, (-h, sentence))
        yield sorted((-negated, sentence) for negated, sentence in heap)
        yield beam.pvalue.TaggedOutput("problems", (dict(counts), problems.first))


class _SmallestSentences(beam.CombineFn):
    """The ``k`` smallest (hash, sentence) pairs of sorted lists; memory O(k)."""

    def __init__(self, k: int):
        self.k = k

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, sorted_pairs):
        return self.merge_accumulators([accumulator, sorted_pairs])

    def merge_accumulators(self, accumulators):
        return list(itertools.islice(heapq.merge(*accumulators), self.k))

    def extract_output(self, accumulator):
        return accumulator


def _merge_problems(records):
    """Sums the sample tasks' problem counts, keeping the first message of each reason
    (CombineGlobally calls it on records and on its own sums)."""
    counts, first = collections.Counter(), {}
    for record_counts, record_first in records:
        counts.update(record_counts)
        for reason, message in record_first.items():
            first.setdefault(reason, message)
    return dict(counts), first


def _train_and_write(sample: list[tuple[int, str]], problems, config: PreprocessConfig
                     ) -> subwords.TokenizerModel:
    if not sample:
        counts, first = problems
        skipped = "; ".join(f"{reason}: {counts[reason]:,} (first: {message})"
                            for reason, message in sorted(first.items()))
        raise vocab.VocabError("no sentences to train the vocabulary on: the input has no text"
                               + (f". Skipped while reading: {skipped}" if skipped else
                                  " (empty or blank files? check --input, and --text-field for jsonl and "
                                  "parquet)"))
    log.info("training a %s SentencePiece vocabulary of %d on %d sentences",
             config.model_type, config.vocab_size, len(sample))
    proto = vocab.train_sentencepiece((s for _, s in sample), config.vocab_size, config.model_type,
                                      character_coverage=config.character_coverage,
                                      add_dummy_prefix=not language.written_without_spaces(config.language or "en"))
    return write_tokenizer_files(subwords.TokenizerModel(subwords.SENTENCEPIECE, proto), config.output,
                                 config.examples.max_seq_length)


def write_tokenizer_files(model: subwords.TokenizerModel, output: str, max_seq_length: int
                          ) -> subwords.TokenizerModel:
    """Writes OUTPUT/tokenizer/ (the model + Hugging Face files) on any Beam filesystem."""
    with tempfile.TemporaryDirectory() as local:
        subwords.write_files(model, local, max_seq_length)
        target = f"{output.rstrip('/')}/tokenizer"
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as src:
                parts.write_atomically(f"{target}/{name}", src.read())
    return model


class TrainTokenizer(beam.PTransform):
    """Read tasks → one serialized SentencePiece model, also written to OUTPUT/tokenizer.

    Trained on the ``--vocab-sample-sentences`` sentences of smallest hash among the read
    tasks that ``vocabulary_tasks`` picks (``--vocab-sample-bytes`` of input): its memory
    and time are bounded by those two flags, whatever the corpus size.
    """

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self.config = config

    def expand(self, tasks):
        c = self.config
        sampled = (tasks
                   | "DistributeSampleTasks" >> beam.Reshuffle()
                   | "SampleSentences" >> beam.ParDo(
                       _SampleSentencesFn(c)
                   ).with_outputs("problems", main="sentences"))
        problems = sampled.problems | "CombineProblems" >> beam.CombineGlobally(_merge_problems)
        return (sampled.sentences
                | "SmallestHashes" >> beam.CombineGlobally(_SmallestSentences(c.vocab_sample_sentences))
                | "Train" >> beam.Map(_train_and_write, beam.pvalue.AsSingleton(problems), c))




# ---------------------------------------------------------------------------- examples
_encoders: dict[str, subwords.Encoder] = {}


def load_model(model: subwords.TokenizerModel) -> subwords.Encoder:
    """The model's Encoder (ids and VocabInfo), cached per worker process by the model's bytes
    (not its fingerprint, which leaves out what does not decide ids)."""
    key = hashlib.sha256(model.data).hexdigest()
    if key not in _encoders:
        _encoders[key] = subwords.Encoder(model)
    return _encoders[key]


def tokenize(doc: SentenceDocument, encoder: subwords.Encoder, counts: collections.Counter,
             segmenter: str = "none") -> examples.Document | None:
    """Token ids per sentence; with ``segmenter`` jieba, also which tokens start a word."""
    if segmenter == "jieba":
        encoded = [(np.array(ids, np.int32), word_starts.word_starts(sentence, begins, encoder.offset_unit))
                   for sentence, (ids, begins) in zip(doc.sentences, encoder.encode_with_begins(list(doc.sentences)))
                   if ids]
        pieces, starts = [e[0] for e in encoded], [e[1] for e in encoded]
    else:
        pieces = [np.array(p, np.int32) for p in encoder.encode(list(doc.sentences)) if p]
        starts = None
        if segmenter == "pieces" and encoder.prefixless:
            # Without SentencePiece's dummy prefix a sentence that begins with a Latin word or a
            # digit has no "▁" to mark its first word: it would join the previous sentence's last.
            starts = [encoder.info.word_start[p] for p in pieces]
            for s in starts:
                s[0] = True
    if not pieces:
        counts["skipped-empty-after-tokenizing"] += 1
        return None
    counts["tokens"] += sum(map(len, pieces))
    # A vocabulary made for other text (--tokenizer) turns this text's characters into [UNK]
    unknown = int(np.count_nonzero(np.concatenate(pieces) == encoder.unk_id))
    if unknown:
        counts["unk-tokens"] += unknown
    return examples.Document(key=doc.key, sentences=pieces, word_starts=starts)


def bucket_instances(docs: list[examples.Document], config: PreprocessConfig, vocab_info: examples.VocabInfo,
                     counts: collections.Counter) -> examples.InstanceBatch:
    """Every duplicate pass of one bucket: Google's segments, then masking."""
    bucket = examples.Bucket(docs)
    ex_config = config.examples
    examples.check_vocabulary(bucket, ex_config, vocab_info)
    if ex_config.objective == "mlm":
        batch = examples.InstanceBatch.concat([
            examples.pack_full_sentences(bucket, dupe, config.seed, ex_config, vocab_info)
            for dupe in range(config.dupe_factor)])
        counts["instances"] += len(batch)
        counts["instance-tokens"] += batch.num_tokens
        counts["masked-tokens"] += batch.num_masked
        return batch
    plan = examples.SegmentPlan.concat([
        examples.plan_segments(bucket, dupe, config.seed, ex_config) for dupe in range(config.dupe_factor)])
    counts["instances"] += len(plan)
    counts["instance-tokens"] += plan.num_tokens
    counts["random-next"] += int(plan.is_random_next.sum())
    counts["short-target-document-passes"] += plan.stats.short_target_documents
    counts["truncated-tokens"] += plan.stats.truncated_tokens
    if plan.stats.skipped_single_document:
        counts["skipped-instances-single-document-bucket"] += plan.stats.skipped_single_document
    batch = examples.mask_instances(plan, ex_config, vocab_info)
    counts["masked-tokens"] += batch.num_masked
    return batch


class _WriteExamplePartsFn(beam.DoFn):
    """(task index, read task) → the task's PartInfo, and tagged ``counts``, its count
    record. Reads, cleans, tokenizes and makes examples one bucket at a time."""

    def __init__(self, config: PreprocessConfig):
        self.config = config

    def setup(self):
        self.progress = _Throttled("examples")

    def process(self, indexed_task, model: subwords.TokenizerModel):
        index, task = indexed_task
        c = self.config
        encoder = load_model(model)
        vocab_info = encoder.info
        counts: collections.Counter = collections.Counter()
        problems = _ProblemLog(counts)
        sentence_docs = filter(None, (to_sentences(raw, counts, c) for raw in
                                      task_documents(task, c.text_field, c.max_line_bytes, problems)))
        writer = parts.PartWriter(f"{c.output.rstrip('/')}/{parts.PARTS_DIR}/{parts.part_name(index)}")
        for bucket in consecutive_buckets(sentence_docs, c.docs_per_bucket):
            docs = [d for d in (tokenize(doc, encoder, counts, c.word_segmenter) for doc in bucket)
                    if d is not None]
            if docs:
                batch = bucket_instances(docs, c, vocab_info, counts)
                writer.add(batch)
                self.progress.add(len(batch), "examples written by this worker")
        rows = writer.close()
        counts["read-tasks"] += 1
        yield parts.PartInfo(index, writer.path, rows)
        yield beam.pvalue.TaggedOutput("counts", dict(counts))


class WriteExampleParts(beam.PTransform):
    """(task index, read task) → PartInfo per task (main output) and count records
    (output ``counts``)."""

    def __init__(self, config: PreprocessConfig, model):
        super().__init__()
        self.config, self.model = config, model

    def expand(self, indexed_tasks):
        return (indexed_tasks
                # One task per worker at a time: without this, Create's bundles decide.
                | "DistributeReadTasks" >> beam.Reshuffle()
                | "MakeExamples" >> beam.ParDo(_WriteExamplePartsFn(self.config),
                                               beam.pvalue.AsSingleton(self.model))
                .with_outputs("counts", main="parts"))


# ---------------------------------------------------------------------------- shards
def _assemble_and_write(shard: int, layout: parts.ShardLayout, config: PreprocessConfig):
    name = parts.shard_name(shard, layout.num_shards)
    path = f"{config.output.rstrip('/')}/shards/{name}"
    rows = parts.write_shard(layout, shard, config.seed, path)
    log.info("wrote %s (%d rows)", path, rows)
    return name, rows


class AssembleShards(beam.PTransform):
    """PartInfo → (shard name, rows): equal-size shards cut from the parts in task order,
    each assembled by its own task from its slices and shuffled within itself."""

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self.config = config

    def expand(self, part_infos):
        c = self.config
        layout = (part_infos
                  | "CollectParts" >> beam.combiners.ToList()
                  | "PlanShards" >> beam.Map(parts.ShardLayout.plan, c.num_shards, c.rows_per_shard))
        return (layout
                | "ShardNumbers" >> beam.FlatMap(lambda lay: range(lay.num_shards))
                | "DistributeShards" >> beam.Reshuffle()
                | "AssembleAndWrite" >> beam.Map(_assemble_and_write, beam.pvalue.AsSingleton(layout), c))


def _write_counters(counts: dict[str, int], output: str) -> None:
    parts.write_atomically(f"{output.rstrip('/')}/{parts.PARTS_DIR}/{parts.COUNTERS_FILE}",
                           json.dumps(counts, indent=1, sort_keys=True).encode())


def build_pipeline(p: beam.Pipeline, tasks: list[inputs.ReadTask], config: PreprocessConfig,
                   given: subwords.TokenizerModel | None):
    """Adds the whole pipeline to ``p``; returns the PCollection of written (shard, rows)."""
    if given is None:
        sample = vocabulary_tasks(tasks, config.vocab_sample_bytes)
        log.info("vocabulary sample: %d of %d read tasks", len(sample), len(tasks))
        model = (p
                 | "VocabularyTasks" >> beam.Create(sample)
                 | "TrainTokenizer" >> TrainTokenizer(config))
    else:
        model = (p
                 | "GivenTokenizer" >> beam.Create([given])
                 | "WriteTokenizer" >> beam.Map(write_tokenizer_files, config.output, config.examples.max_seq_length))
    written = (p
               | "ReadTasks" >> beam.Create(list(enumerate(tasks)))
               | "WriteExampleParts" >> WriteExampleParts(config, model))
    _ = (written.counts
         | "CombineCounts" >> beam.CombineGlobally(merge_counts)
         | "WriteCounters" >> beam.Map(_write_counters, config.output))
    return written.parts | "AssembleShards" >> AssembleShards(config)
