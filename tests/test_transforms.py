"""Each composite PTransform on its own: TestPipeline + assert_that, real sample data."""

import dataclasses
import os
import pickle

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to, is_not_empty

from preprocessing import examples, inputs, transforms, vocab
from preprocessing.documents import RawDocument, SentenceDocument
from preprocessing.options import PreprocessConfig

from .conftest import AUSTEN, WIKI_SAMPLE


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


def test_read_documents_filters_and_counts_every_page():
    tasks = inputs.plan_read_tasks([WIKI_SAMPLE], 1 << 30)
    p = pipeline()
    docs = p | beam.Create(tasks) | transforms.ReadDocuments("text", 1 << 20)
    assert_that(docs | "Ids" >> beam.Map(lambda d: (d.doc_id.split("#")[0], d.markup)),
                equal_to([("enwiki-sample-pages-articles.xml.bz2", "wikitext")] * 98))
    result = p.run()
    result.wait_until_finish()
    from preprocessing.driver import query_counters

    counters = query_counters(result)
    assert counters["pages-read"] == 206
    assert counters["skipped-redirects"] == 99
    assert counters["skipped-disambiguation"] == 8  # Alien, Ada, Aa River, 5 "(disambiguation)"
    assert counters["skipped-non-article-namespace"] == 1
    assert counters["documents-read"] == 98


def test_extract_sentences_cleans_markup_and_drops_empty_documents():
    raw = [
        RawDocument("w#1", "'''Anarchism''' is a [[political philosophy|philosophy]].{{cite}} "
                           "It has many forms.", "wikitext", "Anarchism"),
        RawDocument("w#2", "{{only a template}}", "wikitext", "Empty"),
        RawDocument("t:1", "Mr. Darcy walked in. Elizabeth looked up."),
    ]
    p = pipeline()
    out = p | beam.Create(raw) | transforms.ExtractSentences()
    assert_that(out, equal_to([
        SentenceDocument("w#1", ("Anarchism is a philosophy.", "It has many forms.")),
        SentenceDocument("t:1", ("Mr. Darcy walked in.", "Elizabeth looked up.")),
    ]))
    p.run().wait_until_finish()


def test_train_tokenizer_writes_the_model_and_hf_files(tmp_path):
    docs = [SentenceDocument(d.doc_id, tuple(d.text.split(". "))) for d in austen_documents(2000)]
    config = PreprocessConfig(output=str(tmp_path), vocab_size=3000, vocab_sample_sentences=5000)
    p = pipeline()
    model = p | beam.Create(docs) | transforms.TrainTokenizer(config)

    def check(protos):
        assert len(protos) == 1
        sp = sentencepiece.SentencePieceProcessor(model_proto=protos[0])
        assert [sp.id_to_piece(i) for i in range(5)] == list(vocab.SPECIAL_TOKENS)
        assert 2000 < sp.get_piece_size() <= 3000

    assert_that(model, check)
    p.run().wait_until_finish()
    files = set(os.listdir(tmp_path / "tokenizer"))
    assert {"spm.model", "tokenizer.json", "tokenizer_config.json"} <= files


def test_vocabulary_sample_is_the_same_for_any_order():
    docs = [SentenceDocument(d.doc_id, tuple(d.text.split(". "))) for d in austen_documents(300)]
    total = sum(len(d.sentences) for d in docs)
    sample = [s for d in docs for s in transforms._sampled_sentences(d, total, total // 4)]
    again = [s for d in reversed(docs) for s in transforms._sampled_sentences(d, total, total // 4)]
    assert sorted(sample) == sorted(again)
    assert abs(len(sample) - total / 4) < 0.1 * total / 4


def test_tokenize_documents_matches_sentencepiece(spm_proto):
    docs = [SentenceDocument(d.doc_id, tuple(d.text.split(". "))) for d in austen_documents(50)]
    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_proto)
    expected = [(d.key, [i for s in d.sentences for i in sp.encode(s)]) for d in docs]
    p = pipeline()
    model = p | "Model" >> beam.Create([spm_proto])
    out = p | beam.Create(docs) | transforms.TokenizeDocuments(model)
    assert_that(out | beam.Map(lambda t: (t.key, t.tokens.tolist())), equal_to(expected))
    p.run().wait_until_finish()


@pytest.mark.parametrize("total,num_shards", [(1, 1), (10, 3), (65_536, 7), (1_433_311, 22), (5, 8)])
def test_shards_are_contiguous_runs_of_equal_size(total, num_shards):
    shards = transforms.shard_of(np.arange(total, dtype=np.int64), total, num_shards)
    assert np.all(np.diff(shards) >= 0)  # contiguous: a bucket spans one shard or two neighbours
    sizes = np.bincount(shards, minlength=num_shards)
    assert len(sizes) == num_shards and sizes.sum() == total
    assert sizes.max() - sizes.min() <= 1


def test_shard_layout_orders_buckets_by_key():
    config = PreprocessConfig(output="unused", num_shards=0, rows_per_shard=100)
    offsets, total, num_shards = transforms.shard_layout({7: 30, 2: 50, 5: 150}, config)
    assert offsets == {2: 0, 5: 50, 7: 200} and total == 230 and num_shards == 3


def test_examples_and_equal_shards(tmp_path, spm_proto):
    docs = [SentenceDocument(d.doc_id, tuple(d.text.split(". "))) for d in austen_documents(400)]
    config = PreprocessConfig(output=str(tmp_path), num_shards=4, dupe_factor=2, docs_per_bucket=50)
    p = pipeline()
    model = p | "Model" >> beam.Create([spm_proto])
    tokenized = p | beam.Create(docs) | transforms.TokenizeDocuments(model)
    shards = tokenized | transforms.CreateMlmNspExamples(config, model)
    assert_that(shards | "Shards" >> beam.Map(lambda s: (s.index, s.num_shards)),
                equal_to([(i, 4) for i in range(4)]), label="FourShards")
    written = shards | transforms.WriteShards(config)
    assert_that(written, is_not_empty(), label="Written")
    p.run().wait_until_finish()
    rows = [pq.ParquetFile(tmp_path / "shards" / transforms.shard_name(i, 4)).metadata.num_rows
            for i in range(4)]
    assert max(rows) - min(rows) <= 1
    table = pq.read_table(tmp_path / "shards")
    assert table.num_rows == sum(rows) > 1000
    batch = examples.InstanceBatch.from_arrow(table)
    assert set(np.unique(batch.input_ids[batch.offsets[:-1]])) == {2}  # every row starts with [CLS]
    assert len(set(map(tuple, np.split(batch.input_ids, batch.offsets[1:-1])))) == table.num_rows


def test_instance_batch_pickles_compactly_and_exactly(spm_proto):
    sp, info = transforms.load_model(spm_proto)
    raws = austen_documents(60)
    docs = [examples.Document(SentenceDocument(r.doc_id, ()).key,
                              [np.asarray(sp.encode(s), np.int32) for s in r.text.split(". ")]) for r in raws]
    batch = examples.create_instances(docs, 0, 1, examples.ExampleConfig(), info)
    restored = pickle.loads(pickle.dumps(batch))
    for field in dataclasses.fields(examples.InstanceBatch):
        a, b = getattr(batch, field.name), getattr(restored, field.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), field.name
    plain = pickle.dumps({f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)})
    assert len(pickle.dumps(batch)) < len(plain) / 2
