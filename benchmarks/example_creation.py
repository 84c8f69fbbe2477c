"""Example-creation throughput: preprocessing/examples.py against a port of Google's code.

Tokenizes Jane Austen's novels (the bundled sample) with a SentencePiece model trained
on them (not timed), groups 10 paragraphs into a document and the documents into
buckets of ~500 by key, then times ``examples.create_instances`` for dupe_factor 5 at
max_seq_length 128, with and without whole-word masking, in this one process (so
every figure is per core), and, on the same buckets, a straightforward port of Google's
per-token Python (``google_reference.py``: ``create_instances_from_document`` +
``create_masked_lm_predictions`` on id lists, one ``random.Random`` per bucket as in Google's
script).

Both sides are timed by the best of ``--repeat`` runs (the same rule for each).

    python benchmarks/example_creation.py [--repeat 3] [--paragraphs-per-doc 10]
"""

from __future__ import annotations

import argparse
import bz2
import io
import os
import random
import re
import time
import unicodedata

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from google_reference import Masking, create_training_instances  # noqa: E402 - this folder's port
from preprocessing import examples  # noqa: E402
from preprocessing.documents import document_key  # noqa: E402

AUSTEN = os.path.join(REPO, "preprocessing", "sample_data", "austen-novels.txt.bz2")
DUPE_FACTOR, MAX_SEQ_LENGTH, SEED = 5, 128, 12345


# ---------------------------------------------------------------------------- corpus (not timed)
def load_buckets(paragraphs_per_doc: int, docs_per_bucket: int):
    import sentencepiece as spm

    with bz2.open(AUSTEN, "rt", encoding="utf-8") as f:
        paragraphs = [p for p in (" ".join(p.split()) for p in re.split(r"\n\s*\n", f.read())) if p]

    def split(p):  # crude sentence splitter; the pipeline has a real one
        return [s for s in re.split(r"(?<=[.!?])\s+", p) if s]

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for p in paragraphs for s in split(p)]), model_writer=model,
        vocab_size=8000, model_type="unigram", pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        control_symbols=["[CLS]", "[SEP]", "[MASK]"], pad_piece="[PAD]", unk_piece="[UNK]",
        hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    docs = []
    for start in range(0, len(paragraphs), paragraphs_per_doc):
        ids = sp.encode([s for p in paragraphs[start:start + paragraphs_per_doc] for s in split(p)])
        docs.append(examples.Document(key=document_key(f"austen:{start}"),
                                      sentences=[np.asarray(s, np.int32) for s in ids if s]))
    num_buckets = max(1, round(len(docs) / docs_per_bucket))
    buckets = [sorted((d for d in docs if d.key % num_buckets == b), key=lambda d: d.key)
               for b in range(num_buckets)]
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    word_start = np.array([p.startswith(("▁", "<")) or sp.is_control(i) or sp.is_unknown(i)
                           or all(unicodedata.category(c).startswith("P") for c in p)
                           or any(ord(c) > 127 for c in p) for i, p in enumerate(pieces)])
    vocab = examples.VocabInfo(vocab_size=sp.get_piece_size(), cls_id=2, sep_id=3, mask_id=4,
                               special_ids=(0, 1, 2, 3, 4), word_start=word_start)
    return buckets, vocab


# ---------------------------------------------------------------------------- timing
def time_ours(buckets, vocab, config, repeat):
    best, instances = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        instances = 0
        for documents in buckets:
            bucket = examples.Bucket(documents)  # prepared once for the five passes, as the pipeline does
            for dupe in range(DUPE_FACTOR):
                instances += len(examples.create_instances(bucket, dupe, SEED, config, vocab))
        best = min(best, time.perf_counter() - started)
    return best, instances


def time_google(buckets, vocab, whole_word_mask, repeat):
    lists = [[[s.tolist() for s in d.sentences] for d in bucket] for bucket in buckets]
    masking = Masking(masked_lm_prob=0.15, max_predictions_per_seq=20, vocab_words=list(range(vocab.vocab_size)),
                      cls=vocab.cls_id, sep=vocab.sep_id, mask=vocab.mask_id,
                      word_start=vocab.word_start.tolist() if whole_word_mask else None)
    best, instances = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        instances = 0
        for bucket in lists:
            rng = random.Random(SEED)
            instances += len(create_training_instances(bucket, MAX_SEQ_LENGTH, DUPE_FACTOR, 0.1, masking, rng))
        best = min(best, time.perf_counter() - started)
    return best, instances


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each side; the best is reported")
    parser.add_argument("--paragraphs-per-doc", type=int, default=10)
    parser.add_argument("--docs-per-bucket", type=int, default=500)
    parser.add_argument("--skip-google", action="store_true", help="do not time the per-token port")
    args = parser.parse_args(argv)

    buckets, vocab = load_buckets(args.paragraphs_per_doc, args.docs_per_bucket)
    tokens = sum(len(s) for b in buckets for d in b for s in d.sentences)
    print(f"Austen: {tokens:,} tokens in {sum(map(len, buckets)):,} documents, "
          f"{len(buckets)} bucket(s) of ~{args.docs_per_bucket}; dupe_factor {DUPE_FACTOR}, "
          f"max_seq_length {MAX_SEQ_LENGTH}, one process (per-core figures)\n")
    print(f"{'implementation':<34}{'seconds':>9}{'input tok/s':>14}{'output tok/s':>15}{'instances/s':>13}")

    def report(name, seconds, instances, output_tokens=None):
        out = f"{output_tokens / seconds:>15,.0f}" if output_tokens else f"{'':>15}"
        print(f"{name:<34}{seconds:>9.2f}{tokens / seconds:>14,.0f}{out}{instances / seconds:>13,.0f}")

    ours = {}
    for wwm in (False, True):
        config = examples.ExampleConfig(max_seq_length=MAX_SEQ_LENGTH, whole_word_mask=wwm)
        seconds, instances = time_ours(buckets, vocab, config, args.repeat)
        output_tokens = sum(examples.create_instances(b, d, SEED, config, vocab).num_tokens
                            for b in buckets for d in range(DUPE_FACTOR))
        ours[wwm] = seconds
        report(f"examples.py{' (whole-word)' if wwm else ''}", seconds, instances, output_tokens)
    if args.skip_google:
        return
    for wwm in (False, True):
        seconds, instances = time_google(buckets, vocab, wwm, args.repeat)
        report(f"Google port{' (whole-word)' if wwm else ''}", seconds, instances)
        print(f"{'':<4}speed-up of examples.py{' (whole-word)' if wwm else ''}: {seconds / ours[wwm]:.1f}x")


if __name__ == "__main__":
    main()
