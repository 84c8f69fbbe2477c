"""Each composite PTransform and the functions behind it, on real sample data:
TestPipeline + assert_that where a step is a Beam transform."""

import collections
import json
import os
import subprocess
import sys
import textwrap

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from preprocessing import examples, inputs, parts, subwords, transforms, vocab
from preprocessing.documents import RawDocument, SentenceDocument
from preprocessing.options import PreprocessConfig

from .conftest import AUSTEN, REPO, WIKI_SAMPLE


def pipeline():
    # FnApiRunner: the DirectRunner's batch engine, named so Beam does not try Prism.
    return test_pipeline.TestPipeline(runner="FnApiRunner")


def austen_documents(limit=400):
    docs = []
    for task in inputs.plan_read_tasks([AUSTEN], 1 << 30):
        for item in inputs.read_task(task, "text", 1 << 20):
            if isinstance(item, RawDocument) and len(item.text) > 200:
                docs.append(item)
            if len(docs) == limit:
                return docs
    return docs


@pytest.fixture(scope="module")
def spm_proto():
    sentences = [s for d in austen_documents(3000) for s in d.text.split(". ")]
    return vocab.train_sentencepiece(sentences, 4000, "unigram")


def test_task_documents_filter_and_count_every_page():
    [task] = inputs.plan_read_tasks([WIKI_SAMPLE], 1 << 30)
    counts = collections.Counter()
    docs = list(transforms.task_documents(task, "text", 1 << 20, transforms._ProblemLog(counts)))
    assert {(d.doc_id.split("#")[0], d.markup) for d in docs} == {
        ("enwiki-sample-pages-articles.xml.bz2", "wikitext")}
    assert len(docs) == 98
    assert counts["pages-read"] == 206
    assert counts["skipped-redirects"] == 99
    assert counts["skipped-disambiguation"] == 8  # Alien, Ada, Aa River, 5 "(disambiguation)"
    assert counts["skipped-non-article-namespace"] == 1
    assert counts["documents-read"] == 98


def test_to_sentences_cleans_markup_and_counts_empty_documents():
    counts = collections.Counter()
    raw = [
        RawDocument("w#1", "'''Anarchism''' is a [[political philosophy|philosophy]].{{cite}} "
                           "It has many forms.", "wikitext", "Anarchism"),
        RawDocument("w#2", "{{only a template}}", "wikitext", "Empty"),
        RawDocument("t:1", "Mr. Darcy walked in. Elizabeth looked up."),
    ]
    out = [transforms.to_sentences(d, counts, PreprocessConfig()) for d in raw]
    assert out == [SentenceDocument("w#1", ("Anarchism is a philosophy.", "It has many forms.")), None,
                   SentenceDocument("t:1", ("Mr. Darcy walked in.", "Elizabeth looked up."))]
    assert counts["skipped-empty-documents"] == 1 and counts["sentences"] == 4


@pytest.mark.parametrize("n,size", [(0, 4), (3, 4), (4, 4), (7, 4), (8, 4), (11, 4), (1000, 128)])
def test_buckets_are_consecutive_and_the_last_is_never_small(n, size):
    buckets = list(transforms.consecutive_buckets(range(n), size))
    assert [x for b in buckets for x in b] == list(range(n))
    assert all(len(b) == size for b in buckets[:-1])
    if n >= size:
        assert size <= len(buckets[-1]) < 2 * size
    elif n:
        assert len(buckets) == 1


def test_vocabulary_tasks_are_a_hash_ordered_prefix_covering_the_budget(multistream_dump):
    tasks = inputs.plan_read_tasks([multistream_dump], 65536)
    assert len(tasks) > 20
    chosen = transforms.vocabulary_tasks(tasks, 200_000)
    assert 200_000 <= sum(t.stored_bytes for t in chosen) < 200_000 + 65536
    assert transforms.vocabulary_tasks(list(reversed(tasks)), 200_000) == chosen  # order-free
    starts = sorted(t.start for t in chosen)
    assert starts != [t.start for t in tasks[:len(chosen)]]  # a spread, not the file's head
    assert set(transforms.vocabulary_tasks(tasks, 1 << 40)) == set(tasks)  # a small corpus: all


def sample_of(task, k):
    out = transforms._SampleSentencesFn(PreprocessConfig(vocab_sample_sentences=max(k, 1000))).process(task)
    return next(iter(out))


def test_vocabulary_sample_is_the_smallest_hashes_for_any_grouping(multistream_dump):
    tasks = inputs.plan_read_tasks([multistream_dump], 65536)
    lists = [sample_of(t, 3000) for t in tasks]
    combine = transforms._SmallestSentences(3000)
    one = combine.merge_accumulators(lists)
    # Any grouping and order of the partial results gives the same sample ...
    halves = [combine.merge_accumulators(lists[1::2]), combine.merge_accumulators(lists[0::2][::-1])]
    assert combine.merge_accumulators(halves) == one
    assert combine.merge_accumulators([combine.add_input([], lst) for lst in lists]) == one
    # ... the sentences of smallest hash in the whole corpus.
    everything = sorted(pair for t in tasks for pair in sample_of(t, 10 ** 9))
    assert len(everything) > 10_000 and one == everything[:3000]


def test_train_tokenizer_writes_the_model_and_hf_files(tmp_path):
    tasks = inputs.plan_read_tasks([AUSTEN], 1 << 30)
    config = PreprocessConfig(output=str(tmp_path), vocab_size=3000, vocab_sample_sentences=5000)
    p = pipeline()
    model = p | beam.Create(tasks) | transforms.TrainTokenizer(config)

    def check(models):
        assert len(models) == 1 and models[0].kind == subwords.SENTENCEPIECE
        sp = sentencepiece.SentencePieceProcessor(model_proto=models[0].data)
        assert [sp.id_to_piece(i) for i in range(5)] == list(vocab.SPECIAL_TOKENS)
        assert 2000 < sp.get_piece_size() <= 3000

    assert_that(model, check)
    p.run().wait_until_finish()
    files = set(os.listdir(tmp_path / "tokenizer"))
    assert {"spm.model", "tokenizer.json", "tokenizer_config.json"} <= files


def test_no_text_to_train_on_names_what_was_skipped(tmp_path):
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text('{"body": "the text is under another field"}\n' * 5)
    tasks = inputs.plan_read_tasks([str(corpus)], 1 << 30)
    p = pipeline()
    _ = p | beam.Create(tasks) | transforms.TrainTokenizer(PreprocessConfig(output=str(tmp_path / "o")))
    with pytest.raises(Exception, match="no sentences to train the vocabulary on.*jsonl-missing-text-field: 5"):
        p.run().wait_until_finish()


def run_examples_and_shards(tasks, config, proto):
    """The example parts, shards and summed counts of ``tasks``, as the pipeline makes them."""
    p = pipeline()
    model = p | "Model" >> beam.Create([subwords.TokenizerModel(subwords.SENTENCEPIECE, proto)])
    written = (p | beam.Create(list(enumerate(tasks)))
               | transforms.WriteExampleParts(config, model))
    _ = (written.counts | beam.CombineGlobally(transforms.merge_counts)
         | beam.Map(transforms._write_counters, config.output))
    shards = written.parts | transforms.AssembleShards(config)
    assert_that(shards | beam.Map(lambda s: s[0]), equal_to([parts.shard_name(i, config.num_shards)
                                                             for i in range(config.num_shards)]))
    p.run().wait_until_finish()
    with open(os.path.join(config.output, parts.PARTS_DIR, parts.COUNTERS_FILE)) as f:
        records = json.load(f)
    records["part_rows"] = sorted(pq.ParquetFile(os.path.join(config.output, parts.PARTS_DIR, n)).metadata.num_rows
                                  for n in os.listdir(os.path.join(config.output, parts.PARTS_DIR))
                                  if n.endswith(".parquet"))
    records["shards"] = [(n, pq.ParquetFile(os.path.join(config.output, "shards", n)).metadata.num_rows)
                         for n in sorted(os.listdir(os.path.join(config.output, "shards")))]
    return records


@pytest.fixture(scope="module")
def made(multistream_dump, spm_proto, tmp_path_factory):
    out = tmp_path_factory.mktemp("made")
    tasks = inputs.plan_read_tasks([multistream_dump], 65536)
    config = PreprocessConfig(output=str(out), num_shards=5, dupe_factor=2, docs_per_bucket=3)
    return tasks, config, run_examples_and_shards(tasks, config, spm_proto)


def test_every_task_writes_a_part_and_counts_travel_with_the_data(made):
    tasks, config, records = made
    parts_dir = os.path.join(config.output, parts.PARTS_DIR)
    names = sorted(n for n in os.listdir(parts_dir) if n != parts.COUNTERS_FILE)
    assert names == [parts.part_name(i) for i in range(len(tasks))]  # no temporary file left
    assert records["read-tasks"] == len(tasks)
    assert records["documents-read"] == 98 and records["pages-read"] == 206
    rows = [pq.ParquetFile(os.path.join(parts_dir, n)).metadata.num_rows for n in names]
    assert sorted(rows) == records["part_rows"] and sum(rows) == records["instances"] > 5000
    # Buckets of 3 consecutive documents: single-document buckets never happen, and the
    # random-next share stays in the recipe's range (docs/PREPROCESSING.md: 0.5 among multi-segment chunks).
    assert "skipped-instances-single-document-bucket" not in records
    assert 0.45 < records["random-next"] / records["instances"] < 0.65


def test_shards_are_equal_complete_and_shuffled(made):
    tasks, config, records = made
    shards = records["shards"]
    assert [name for name, _ in shards] == [parts.shard_name(i, 5) for i in range(5)]
    sizes = [rows for _, rows in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == records["instances"]
    shard_tables = [pq.read_table(os.path.join(config.output, "shards", name)) for name, _ in shards]
    part_tables = [pq.read_table(os.path.join(config.output, parts.PARTS_DIR, parts.part_name(i)))
                   for i in range(len(tasks))]
    every_part_row = pa.concat_tables(part_tables)

    def rows(table):
        return [tuple(map(tuple, (r["input_ids"], r["masked_lm_positions"]))) + (r["next_sentence_labels"],)
                for r in table.to_pylist()]

    in_parts = rows(every_part_row)
    in_shards = [rows(t) for t in shard_tables]
    # Shard s holds exactly the s-th contiguous range of the parts' rows (task order), shuffled.
    start = 0
    for shard_rows in in_shards:
        expected = in_parts[start:start + len(shard_rows)]
        assert sorted(shard_rows) == sorted(expected)
        assert shard_rows != expected
        start += len(shard_rows)


def test_shard_layout_cuts_across_parts():
    layout = parts.ShardLayout.plan([parts.PartInfo(2, "c", 5), parts.PartInfo(0, "a", 30),
                                     parts.PartInfo(1, "b", 0)], num_shards=0, rows_per_shard=10)
    assert [p.task_index for p in layout.parts] == [0, 1, 2] and layout.num_shards == 4
    assert [layout.shard_range(s) for s in range(4)] == [(0, 8), (8, 17), (17, 26), (26, 35)]
    assert [[(p.path, lo, hi) for p, lo, hi in layout.slices(s)] for s in range(4)] == [
        [("a", 0, 8)], [("a", 8, 17)], [("a", 17, 26)], [("a", 26, 30), ("c", 0, 5)]]
    assert parts.ShardLayout.plan([parts.PartInfo(0, "a", 0)], 0, 10).num_shards == 0


@pytest.mark.parametrize("total,num_shards", [(1, 1), (10, 3), (65_536, 7), (1_433_311, 22), (5, 8)])
def test_shard_sizes_differ_by_at_most_one(total, num_shards):
    layout = parts.ShardLayout((parts.PartInfo(0, "a", total),), num_shards)
    sizes = [hi - lo for lo, hi in map(layout.shard_range, range(num_shards))]
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1


def test_more_shards_than_examples_are_one_example_each_not_empty_shards():
    from preprocessing.driver import Summary, shards_warning

    parts_ = (parts.PartInfo(0, "a", 3), parts.PartInfo(1, "b", 2))
    layout = parts.ShardLayout.plan(parts_, 500, 1000)
    assert layout.num_shards == 5 and [layout.shard_range(s) for s in range(5)] == [(i, i + 1) for i in range(5)]
    assert parts.ShardLayout.plan(parts_, 4, 1000).num_shards == 4 and parts.ShardLayout.plan(parts_, 0, 2).num_shards == 3

    def summary(asked):
        return Summary("out", "out/manifest.json", {"shards": [{}] * 5}, {}, 1.0, None, None, asked)

    assert shards_warning(summary(500)) == ("warning: --num-shards 500 is more than the 5 examples made: 5 shards of "
                                            "one example each")
    assert shards_warning(summary(5)) is None and shards_warning(summary(0)) is None


def test_read_part_rows_reads_any_slice_across_row_groups(tmp_path, spm_proto):
    encoder = transforms.load_model(subwords.TokenizerModel(subwords.SENTENCEPIECE, spm_proto))
    info = encoder.info
    docs = [examples.Document(i, [np.asarray(ids, np.int32) for ids in encoder.encode(r.text.split(". "))])
            for i, r in enumerate(austen_documents(400))]
    batch = examples.create_instances(docs, 0, 1, examples.ExampleConfig(), info)
    assert len(batch) > 500
    path = str(tmp_path / "p.parquet")
    writer = parts.PartWriter(path, row_group_rows=100)
    for piece in np.array_split(np.arange(len(batch)), 7):
        writer.add(batch.take(piece))
    assert writer.close() == len(batch) and os.listdir(tmp_path) == ["p.parquet"]
    whole = pq.read_table(path)
    assert pq.ParquetFile(path).num_row_groups > 5
    for lo, hi in [(0, 1), (5, 500), (99, 101), (len(batch) - 10, len(batch)), (123, 123)]:
        assert parts.read_part_rows(path, lo, hi).equals(whole.slice(lo, hi - lo))


def test_two_attempts_of_one_task_writing_at_once_both_leave_the_part_in_place(tmp_path, spm_proto):
    """Spark's speculative execution, or a Dataflow work item that lost its lease and runs on: the
    attempts shared one temporary name, and the later one failed after deleting the earlier's part."""
    encoder = transforms.load_model(subwords.TokenizerModel(subwords.SENTENCEPIECE, spm_proto))
    docs = [examples.Document(i, [np.asarray(ids, np.int32) for ids in encoder.encode(r.text.split(". "))])
            for i, r in enumerate(austen_documents(40))]
    batch = examples.create_instances(docs, 0, 1, examples.ExampleConfig(), encoder.info)
    path = str(tmp_path / "part-000000.parquet")
    first, second = parts.PartWriter(path), parts.PartWriter(path)
    for writer in (first, second):
        writer.add(batch)
    assert first.close() == second.close() == len(batch)
    assert os.listdir(tmp_path) == ["part-000000.parquet"] and pq.read_table(path).num_rows == len(batch)


def test_a_killed_write_attempts_leftovers_are_deleted(tmp_path):
    """Each attempt writes under a name of its own: one killed before its rename leaves its file."""
    from preprocessing import manifest

    for folder in ("shards", "tokenizer", "parts"):
        (tmp_path / folder).mkdir()
    (tmp_path / "shards" / "part-00000-of-00001.parquet").write_bytes(b"a shard")
    (tmp_path / "shards" / ".part-00000-of-00001.parquet.0123456789abcdef.inprogress").write_bytes(b"half")
    (tmp_path / "tokenizer" / ".spm.model.0123456789abcdef.inprogress").write_bytes(b"half")
    (tmp_path / "parts" / "task-000000.parquet").write_bytes(b"a part")
    manifest.delete_dir(str(tmp_path), "parts")
    manifest.delete_leftover_temporaries(str(tmp_path))
    assert os.listdir(tmp_path / "shards") == ["part-00000-of-00001.parquet"]
    assert os.listdir(tmp_path / "tokenizer") == [] and not (tmp_path / "parts").exists()


def test_a_read_task_that_never_reported_stops_the_manifest():
    """A runner that loses a task loses its part and its counts together: rows and counters agree."""
    from preprocessing import driver

    data = {"num_examples": 10}
    driver._check_complete(data, {"read-tasks": 3, "instances": 10}, 3)
    with pytest.raises(RuntimeError, match="2 of the 3 read tasks reported; not writing a manifest"):
        driver._check_complete(data, {"read-tasks": 2, "instances": 10}, 3)


def test_counts_merge_is_a_sum():
    assert transforms.merge_counts([{"a": 1}, {"a": 2, "b": 3}, {}]) == {"a": 3, "b": 3}
    assert json.dumps(transforms.merge_counts([])) == "{}"


def test_unknown_tokens_are_counted_and_a_vocabulary_for_other_text_is_warned_of(spm_proto):
    """An English vocabulary (--tokenizer) on Chinese text: a third of the ids were [UNK], unsaid."""
    from preprocessing.driver import unknown_tokens_warning

    encoder = transforms.load_model(subwords.TokenizerModel(subwords.SENTENCEPIECE, spm_proto))
    counts = collections.Counter()
    english = transforms.tokenize(SentenceDocument("en", ("It is a truth universally acknowledged.",)), encoder, counts)
    assert counts["unk-tokens"] == 0 and english is not None
    assert unknown_tokens_warning(counts, tokenizer_given=True) is None
    chinese = transforms.tokenize(SentenceDocument("zh", ("春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。")), encoder,
                                  counts)
    unknown = sum(int((s == encoder.unk_id).sum()) for s in chinese.sentences)
    # SentencePiece makes a run of unknown characters one [UNK]: 4 here, between the punctuation
    assert unknown == 4 and counts["unk-tokens"] == unknown
    warning = unknown_tokens_warning(counts, tokenizer_given=True)
    assert warning.startswith(f"warning: {unknown / counts['tokens']:.1%} of the input tokens are [UNK] ({unknown:,} "
                              f"of {counts['tokens']:,}): the --tokenizer vocabulary lacks")
    assert "raise it" in unknown_tokens_warning(counts, tokenizer_given=False)


def test_a_shard_larger_than_memory_allows_is_shuffled_through_disk_completely_and_uniformly(made, tmp_path):
    tasks, config, records = made
    parts_dir = os.path.join(config.output, parts.PARTS_DIR)
    infos = [parts.PartInfo(i, os.path.join(parts_dir, parts.part_name(i)),
                            pq.ParquetFile(os.path.join(parts_dir, parts.part_name(i))).metadata.num_rows)
             for i in range(len(tasks))]
    layout = parts.ShardLayout.plan(infos, 2, 0)
    start, stop = layout.shard_range(1)

    def write(name, in_memory_rows):
        path = str(tmp_path / name)
        assert parts.write_shard(layout, 1, config.seed, path, in_memory_rows) == stop - start
        return path, pq.read_table(path)

    _, in_memory = write("memory.parquet", stop - start)
    path, through_disk = write("disk.parquet", 300)  # 18 buckets of about 150 rows
    assert through_disk.schema == in_memory.schema
    assert sorted(os.listdir(tmp_path)) == ["disk.parquet", "memory.parquet"]  # no temporary left
    assert write("again.parquet", 300)[1].equals(through_disk)  # the same bytes from the same seed
    assert pq.ParquetFile(path).metadata.row_group(0).num_rows <= parts.ROW_GROUP_ROWS

    def keys(table):
        return [tuple(ids) + tuple(positions) for ids, positions in zip(
            table.column("input_ids").to_pylist(), table.column("masked_lm_positions").to_pylist())]

    ordered = keys(pa.concat_tables([parts.read_part_rows(p.path, lo, hi) for p, lo, hi in layout.slices(1)]))
    shuffled = keys(through_disk)
    assert sorted(shuffled) == sorted(ordered) and shuffled != keys(in_memory)
    # every row lands anywhere: each tenth of the output mixes rows from every tenth of the input
    where = {key: i for i, key in enumerate(ordered)}
    tenths = np.array([where[key] * 10 // len(ordered) for key in shuffled])
    for chunk in np.array_split(tenths, 10):
        counts = np.bincount(chunk, minlength=10)
        assert counts.min() > 0.5 * len(chunk) / 10 and counts.max() < 1.5 * len(chunk) / 10, counts
    assert abs(np.corrcoef(np.arange(len(tenths)), tenths)[0, 1]) < 0.1


def test_shuffling_through_disk_holds_one_bucket_not_the_shard(made, tmp_path):
    """pyarrow's own peak allocation, in a process of its own, for one shard of ~3,000 rows."""
    tasks, config, _ = made
    script = textwrap.dedent(f"""
        import os, sys, pyarrow as pa, pyarrow.parquet as pq
        sys.path.insert(0, {REPO!r})
        from preprocessing import parts
        d = {os.path.join(config.output, parts.PARTS_DIR)!r}
        infos = [parts.PartInfo(i, os.path.join(d, parts.part_name(i)),
                                pq.ParquetFile(os.path.join(d, parts.part_name(i))).metadata.num_rows)
                 for i in range({len(tasks)})]
        layout = parts.ShardLayout.plan(infos, 2, 0)
        parts.write_shard(layout, 1, 1, {str(tmp_path / "shard.parquet")!r}, int(sys.argv[1]))
        print(pa.default_memory_pool().max_memory())
    """)

    def peak(in_memory_rows):
        proc = subprocess.run([sys.executable, "-c", script, str(in_memory_rows)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return int(proc.stdout.split()[-1])

    whole, buckets = peak(10**9), peak(300)
    assert buckets < 0.4 * whole, (buckets, whole)
