"""The proof that pretraining helps, on real data: the same tiny BERT fine-tuned on Rotten Tomatoes
reviews (fresh vs rotten) from our pretrained checkpoint vs from random initialisation.

Pretraining reads the bundled Wikipedia sample, Jane Austen's novels and the unlabelled text of
the reviews' train split (grouped by film, plus the plot summaries); the test split's text is
never seen before the test. Fine-tuning then uses LABELS of only a stratified sample of the train
split (the regime where pretraining matters: with all 10k labels a random-init tiny BERT learns a
bag of words as good as what a few CPU-minutes of pretraining give), with the same flags for
both runs; test accuracy is compared on the 1,281 held-out reviews (standard error ~1.3 points).
"""

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from pipeline.finetune_data import load_task_data, stratified_split

from .conftest import AUSTEN, REPO, WIKI_SAMPLE

REVIEWS = os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2")
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Pretraining sized for CI: at ~1,250 sequences/s (tiny, seq 32, vocab 2000, 2 cores, unloaded) 1,500
# steps of 64 take ~80 s and reach MLM accuracy 0.135 (past the unigram plateau at ~0.06).
VOCAB, SEQ, PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR = 2000, 32, 1500, 64, 3e-3
LABELLED, FINETUNE_EPOCHS, FINETUNE_LR, MARGIN = 2000, 6, 1e-3, 0.03

# Measured with exactly these sizes (and smaller/larger ones), the pretrained model does NOT yet beat
# random initialisation: 2,000 labels 0.663 vs 0.665. Nor does any pretraining tried up to ~2 CPU-hours
# (30,000 steps x 64 of hidden 128, held-out MLM accuracy ~0.4), nor mean pooling, other fine-tuning rates,
# all 10,246 labels, or a "same film?" review-pair task: every variant, its figures and what they rule out
# are in the README's "Does pretraining help? Not yet at CPU scale". The test stays as the harness for the
# next attempt (GPU-scale pretraining, bundled as an export), skipped until then.
NOT_YET = ("pretraining that fits CI time does not yet beat random init on this task (measured: see the "
           "comment above); kept as the harness")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    return env


def _write_csv(path, texts, labels):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return str(path)


def _run(cmd):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return time.perf_counter() - started


@pytest.mark.e2e
@pytest.mark.skip(reason=NOT_YET)
def test_pretrained_beats_random_init_on_real_reviews(tmp_path):
    data = load_task_data(data=REVIEWS, label_column="category", drop_labels=["plot"], seed=42)
    files = {name: _write_csv(tmp_path / f"{name}.csv", split.texts, [data.labels[i] for i in split.labels])
             for name, split in data.splits.items()}
    train = data.splits["train"]
    few = stratified_split(train.labels, [LABELLED / len(train)], seed=7)[0]
    files["few"] = _write_csv(tmp_path / "train_few.csv", [train.texts[i] for i in few],
                              [data.labels[train.labels[i]] for i in few])

    # unlabelled in-domain text: the train split's reviews grouped by film, and the plot summaries
    import bz2
    import io

    seen = set(train.texts)
    films: dict[str, list[str]] = {}
    with io.TextIOWrapper(bz2.open(REVIEWS), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] == "plot" or row["text"] in seen:
                films.setdefault(row["movie_name"], []).append(" ".join(row["text"].split()))
    corpus = tmp_path / "reviews_unlabelled.txt"
    corpus.write_text("".join("\n".join(texts) + "\n\n" for texts in films.values()))

    seconds = {}
    seconds["preprocess"] = _run([os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", WIKI_SAMPLE, AUSTEN,
                                  str(corpus), "--output", str(tmp_path / "data"), "--vocab-size", str(VOCAB),
                                  "--max-seq-length", str(SEQ), "--dupe-factor", "1", "--no-mlflow"])
    seconds["pretrain"] = _run([os.path.join(REPO, "pipeline", "pretrain.py"), "--data", str(tmp_path / "data"),
                                "--run-dir", str(tmp_path / "run"), "--model", "tiny", "--steps", str(PRETRAIN_STEPS),
                                "--global-batch-size", str(PRETRAIN_BATCH), "--micro-batch-size", str(PRETRAIN_BATCH),
                                "--learning-rate", str(PRETRAIN_LR), "--warmup-steps", str(PRETRAIN_STEPS // 15),
                                "--log-every", "100", "--no-mlflow"])
    accuracy = {}
    for init in ("pretrained", "random"):
        out = tmp_path / init
        seconds[init] = _run([os.path.join(REPO, "pipeline", "finetune.py"), "--model", str(tmp_path / "run"),
                              "--init", init, "--train", files["few"], "--validation", files["validation"],
                              "--test", files["test"], "--max-seq-length", "64", "--epochs", str(FINETUNE_EPOCHS),
                              "--patience", "0", "--learning-rate", str(FINETUNE_LR), "--reinit-pooler",
                              "--output-dir", str(out),
                              "--no-mlflow"])
        accuracy[init] = json.load(open(out / "report.json"))["test"]["accuracy"]
    mlm = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["mlm_accuracy"]
    print(f"\nRotten Tomatoes test accuracy ({LABELLED} labelled train reviews, tiny BERT): pretrained "
          f"{accuracy['pretrained']:.4f} vs random init {accuracy['random']:.4f} (final MLM accuracy {mlm:.3f}); "
          f"seconds: {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}")
    assert accuracy["pretrained"] > accuracy["random"] + MARGIN
