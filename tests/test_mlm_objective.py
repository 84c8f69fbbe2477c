"""The MLM-only objective: RoBERTa's FULL-SENTENCES rows packed across documents, no NSP;
the trainer trains the MLM head alone and the export is a fill-mask model."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from preprocessing import examples as ex

from .conftest import set_one_process_world

CLS, SEP, MASK = 2, 3, 4
VOCAB = ex.VocabInfo(vocab_size=500, cls_id=CLS, sep_id=SEP, mask_id=MASK, special_ids=(0, 1, 2, 3, 4),
                     word_start=np.ones(500, bool))


def bucket_of(seed=0, docs=12):
    rng = np.random.default_rng(seed)
    return ex.Bucket([ex.Document(key=100 + d, sentences=[
        rng.integers(10, 500, int(rng.integers(1, 70))).astype(np.int32) for _ in range(int(rng.integers(1, 9)))])
        for d in range(docs)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_hold_every_token_once_in_order_with_a_sep_between_documents(seed):
    bucket = bucket_of(seed)
    config = ex.ExampleConfig(max_seq_length=64, objective="mlm", masking="dynamic")
    batch = ex.pack_full_sentences(bucket, 0, 7, config, VOCAB)
    rows = [batch.input_ids[a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:])]
    assert all(r[0] == CLS and r[-1] == SEP and len(r) <= 64 for r in rows)
    content = np.concatenate([r[1:-1] for r in rows])
    assert (content[content != SEP] == bucket.tokens).all()  # nothing lost, nothing repeated, in order
    # A [SEP] inside a row sits exactly where a document ends.
    doc_ends = {bucket.offsets[i] + bucket.cums[i][-1] for i in bucket.live}
    at, inner, row_ends = 0, 0, set()
    for r in rows:
        for token in r[1:-1]:
            if token == SEP:
                assert at in doc_ends
                inner += 1
            else:
                at += 1
        row_ends.add(at)
    # ... and every document end inside a row has one (one that ends a row has the row's own).
    assert inner == len(doc_ends - row_ends)
    # Full rows: only the bucket's last one may be short.
    assert all(len(r) == 64 for r in rows[:-1])
    assert (batch.segment_ids == 0).all() and (batch.next_sentence_labels == 0).all()


def test_static_masks_never_touch_a_special_token_and_follow_the_count():
    bucket = bucket_of(3, docs=40)
    config = ex.ExampleConfig(max_seq_length=64, objective="mlm", masked_lm_prob=0.3, max_predictions_per_seq=20)
    batch = ex.pack_full_sentences(bucket, 0, 7, config, VOCAB)
    lengths = np.diff(batch.offsets)
    assert (np.diff(batch.masked_offsets) == ex.num_to_predict(lengths, config)).all()
    unmasked = ex.pack_full_sentences(bucket, 0, 7, ex.ExampleConfig(max_seq_length=64, objective="mlm",
                                                                     masking="dynamic"), VOCAB)
    flat = np.repeat(batch.offsets[:-1], np.diff(batch.masked_offsets)) + batch.masked_lm_positions
    assert not np.isin(unmasked.input_ids[flat], [CLS, SEP]).any()
    assert (unmasked.input_ids[flat] == batch.masked_lm_ids).all()
    # Another duplicate pass: same rows, other masks.
    again = ex.pack_full_sentences(bucket, 1, 7, config, VOCAB)
    assert (again.offsets == batch.offsets).all() and not np.array_equal(again.masked_lm_positions,
                                                                         batch.masked_lm_positions)


@pytest.mark.parametrize("whole_word", [False, True])
def test_a_packed_row_with_one_token_masks_that_token(whole_word):
    # A bucket's last packed row can be [CLS] x [SEP] (about 1 bucket in 126 at 128 tokens): one
    # candidate, where a pair has three specials. Before: a count of 0 read the threshold of
    # position -1, masked past the row and failed with an IndexError, ending the whole run.
    config = ex.ExampleConfig(max_seq_length=64, objective="mlm", whole_word_mask=whole_word)
    rows = [[CLS, *range(10, 40), SEP, *range(50, 60), SEP], [CLS, 17, SEP], [CLS, SEP, 21, SEP]]
    original = np.concatenate(rows).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    keys = np.array([11, 12, 13], np.uint64)
    input_ids, masked_rows, cols, masked_ids = ex.mask_tokens(keys, original, offsets, np.diff(offsets) - 2,
                                                              config, VOCAB)
    per_row = np.bincount(masked_rows, minlength=3)
    assert per_row.tolist() == [ex.num_to_predict(np.array([43]), config)[0], 1, 1]
    assert cols[masked_rows == 1].tolist() == [1] and cols[masked_rows == 2].tolist() == [2]
    assert masked_ids[masked_rows > 0].tolist() == [17, 21]
    assert not np.isin(masked_ids, [CLS, SEP]).any()
    assert len(input_ids) == len(original)


def test_packed_rows_mask_the_segmenters_whole_words():
    # Two-token words (jieba's, say) over pieces the vocabulary calls word starts each: before,
    # packed rows ignored the segmenter and split 66 of 94 masked tokens' words.
    rng = np.random.default_rng(5)
    docs = []
    for d in range(12):
        sentences = [rng.integers(10, 500, 2 * int(rng.integers(2, 20))).astype(np.int32) for _ in range(5)]
        starts = [np.tile([True, False], len(s) // 2) for s in sentences]
        docs.append(ex.Document(key=300 + d, sentences=sentences, word_starts=starts))
    config = ex.ExampleConfig(max_seq_length=64, objective="mlm", whole_word_mask=True, masked_lm_prob=0.2)
    batch = ex.pack_full_sentences(ex.Bucket(docs), 0, 7, config, VOCAB)
    unmasked = ex.pack_full_sentences(ex.Bucket(docs), 0, 7, ex.ExampleConfig(
        max_seq_length=64, objective="mlm", masking="dynamic"), VOCAB)
    assert batch.num_masked > 100 and _words_whole(batch, unmasked, docs) == 1.0


def _words_whole(batch, unmasked, docs) -> float:
    """Share of masked tokens whose two-token word is masked whole (a word cut by a row's end
    counts as the part in the row)."""
    starts = np.concatenate([np.concatenate(d.word_starts) for d in docs])
    flat_starts, at = [], 0
    for i in range(len(unmasked.offsets) - 1):
        row = unmasked.input_ids[unmasked.offsets[i]:unmasked.offsets[i + 1]]
        flags = [True]  # [CLS]
        for token in row[1:-1]:
            if token == SEP:
                flags.append(True)
            else:
                flags.append(bool(starts[at]))
                at += 1
        flat_starts.append(flags + [True])
    whole = total = 0
    for i, flags in enumerate(flat_starts):
        masked = set(batch.masked_lm_positions[batch.masked_offsets[i]:batch.masked_offsets[i + 1]].tolist())
        for p in masked:
            total += 1
            # the word of p: from its start to the next start (or a [SEP])
            begin = p
            while not flags[begin]:
                begin -= 1
            end = p + 1
            while end < len(flags) - 1 and not flags[end]:
                end += 1
            whole += all(q in masked for q in range(max(begin, 1), end))
    return whole / total


@pytest.fixture(scope="module")
def mlm_data(preprocessed_sample) -> str:
    return preprocessed_sample("--vocab-size", "4000", "--objective", "mlm", "--masking", "dynamic",
                               "--num-shards", "2")


def test_packed_rows_have_almost_no_padding(mlm_data):
    with open(os.path.join(mlm_data, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["objective"] == "mlm" and manifest["masking"]["mode"] == "dynamic"
    lengths = np.array([len(r) for r in pq.read_table(os.path.join(mlm_data, "shards"),
                                                      columns=["input_ids"]).column(0).to_pylist()])
    # Only a bucket's last row is short (Google's pairs on the same text fill about 0.8).
    assert lengths.mean() / 128 > 0.97 and lengths.max() == 128


def test_mlm_only_training_and_a_fill_mask_export(mlm_data, tmp_path, monkeypatch):
    from transformers import AutoModelForMaskedLM, pipeline

    from pipeline.export import export_checkpoint, write_train_config
    from pipeline.train_config import TrainConfig
    from pipeline.trainer import Trainer

    set_one_process_world(monkeypatch)
    trainer = Trainer(TrainConfig.from_flat(data=mlm_data, run_dir=str(tmp_path / "run"), steps=30,
                                            global_batch_size=16, micro_batch_size=16, learning_rate=2e-3,
                                            warmup_steps=3, log_every=100, mlflow=False))
    assert trainer.nsp_weight == 0.0
    write_train_config(trainer.config)  # what pretrain.py writes: the export rebuilds the model from it
    seen = []
    assert trainer.train(on_step=lambda t, m: seen.append(m)) == 0
    assert all(m.loss == pytest.approx(m.mlm_loss, rel=1e-6) for m in seen)  # no NSP term
    # and no NSP figures logged, which would mean nothing (all labels are 0)
    logged = [json.loads(line) for name in ("metrics.jsonl", "eval.jsonl") for line in open(tmp_path / "run" / name)]
    assert logged and not [k for row in logged for k in row if "nsp" in k], logged[-1]
    assert np.mean([m.mlm_loss for m in seen[-5:]]) < np.mean([m.mlm_loss for m in seen[:5]]) - 0.5
    out = export_checkpoint(str(tmp_path / "run"), out_dir=str(tmp_path / "hf"))
    # Saved as BertForMaskedLM: the NSP head and pooler never learned, and AutoModelForPreTraining
    # would otherwise load them as trained.
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as saved:
        names = set(saved.keys())
    assert not [n for n in names if "pooler" in n or "seq_relationship" in n] and "cls.predictions.bias" in names
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["BertForMaskedLM"]
    assert json.load(open(os.path.join(out, "training_info.json")))["objective"] == "mlm"
    assert "AutoModelForMaskedLM.from_pretrained" in open(os.path.join(out, "README.md")).read()
    model = AutoModelForMaskedLM.from_pretrained(out)
    fill = pipeline("fill-mask", model=model, tokenizer=out)
    predictions = fill("The river flows into the [MASK].")
    assert len(predictions) == 5 and all(p["token_str"] for p in predictions)
