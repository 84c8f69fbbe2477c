"""Pretraining objectives side by side, at equal CPU time: which gives the better model?

    python benchmarks/objectives.py                       # 4 objectives x 3 min, ~23 min on 2 idle cores
    python benchmarks/objectives.py --minutes 10 --seeds 1 2 3 4 5

The same corpus (the bundled Wikipedia sample, Austen's novels and the unlabelled text of the
Rotten Tomatoes train split, as ``pipeline/run_all.py`` builds it), the same tokenizer (the first
variant's, passed to the others with ``--tokenizer``), the same model and batch size, and the
same wall-clock budget of pretraining per variant (steps = budget / the variant's measured step
time, so the learning-rate schedule runs to its end in each):

* static MLM+NSP, dupe factor 5 (Google's recipe, the default);
* dynamic MLM+NSP (new masks every epoch);
* dynamic MLM only (packed rows, no NSP: RoBERTa's FULL-SENTENCES);
* dynamic MLM only with 30% masking (MosaicBERT).

Each pretrained model is then scored on one common held-out set (the static variant's last
shard: Google-format pairs with fixed masks, so every model predicts the same tokens) and
fine-tuned on 300 labelled reviews with ``--seeds`` seeds (20 epochs at 1e-3, no early stopping,
best epoch on validation: the protocol of tests/test_finetune_pretraining_helps.py), against the
same fine-tuning from random init. Rows are printed as they finish and appended to benchmarks/results/objectives.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.run_all import AUSTEN, WIKI, run_stage, write_review_task  # noqa: E402

VARIANTS = {
    "static MLM+NSP (dupe 5)": ["--masking", "static", "--dupe-factor", "5"],
    "dynamic MLM+NSP": ["--masking", "dynamic"],
    "dynamic MLM only": ["--masking", "dynamic", "--objective", "mlm"],
    "dynamic MLM only, 30%": ["--masking", "dynamic", "--objective", "mlm", "--masked-lm-prob", "0.3"],
}


def slug_of(name: str) -> str:
    return name.split(" (")[0].replace(" ", "-").replace(",", "").replace("%", "").replace("+", "")


def held_out_mlm(export_dir: str, eval_data: str, batches: int = 40) -> dict:
    """MLM loss and accuracy of an export on ``eval_data``'s last shard (fixed masks)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForMaskedLM

    from pipeline.data import PretrainingDataset
    from pipeline.data_dir import read_manifest

    manifest = read_manifest(eval_data)
    dataset = PretrainingDataset(eval_data, manifest)
    start = sum(s["rows"] for s in manifest["shards"][:-1])
    rows = np.arange(start, len(dataset))
    model = AutoModelForMaskedLM.from_pretrained(export_dir).eval()
    loss_sum = hits = count = 0.0
    with torch.inference_mode():
        for chunk in np.array_split(rows, batches):
            batch = dataset.batch(chunk)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
            at = logits.flatten(0, 1)[batch["mlm_positions"]]
            loss_sum += float(F.cross_entropy(at, batch["mlm_labels"], reduction="sum"))
            hits += float((at.argmax(-1) == batch["mlm_labels"]).sum())
            count += len(batch["mlm_labels"])
    return {"eval_mlm_loss": loss_sum / count, "eval_mlm_accuracy": hits / count, "eval_predictions": int(count)}


def pretrain(data: str, run: str, steps: int, args, logs: str, name: str, log_every: int = 50) -> float:
    return run_stage(name, [
        os.path.join(REPO, "pipeline", "pretrain.py"), "--data", data, "--run-dir", run, "--model", args.model,
        "--steps", str(steps), "--global-batch-size", str(args.batch_size), "--micro-batch-size",
        str(args.batch_size), "--learning-rate", str(args.learning_rate), "--warmup-steps", str(max(1, steps // 15)),
        "--log-every", str(log_every), "--eval-shards", "1", "--seed", "42", "--no-mlflow"], logs)


def step_seconds(run: str, batch_size: int) -> float:
    """Median seconds per step over the logged windows after the first (start-up excluded)."""
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return statistics.median(batch_size / m["sequences_per_second"] for m in lines[1:])


def finetune(model_run: str, init: str, seed: int, task: dict, out: str, logs: str, args) -> float:
    run_stage(f"finetune-{os.path.basename(out)}", [
        os.path.join(REPO, "pipeline", "finetune.py"), "--model", model_run, "--init", init, "--train", task["train"],
        "--validation", task["validation"], "--test", task["test"], "--max-seq-length", str(args.max_seq_length),
        # The protocol of tests/test_finetune_pretraining_helps.py: every epoch runs (early stopping
        # stops random init on the majority class while its validation loss still falls), best
        # epoch chosen on validation, accuracy reported on test.
        "--epochs", str(args.finetune_epochs), "--patience", "0", "--reinit-pooler",
        "--learning-rate", str(args.finetune_learning_rate), "--seed", str(seed),
        "--output-dir", out, "--no-mlflow", "--no-log-model"], logs)
    return json.load(open(os.path.join(out, "report.json")))["test"]["accuracy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/objectives")
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining wall-clock budget per variant")
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--labelled", type=int, default=300)
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument("--finetune-learning-rate", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "objectives.jsonl"))
    args = p.parse_args(argv)

    work = os.path.abspath(args.workdir)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    task = write_review_task(os.path.join(work, "reviews"), args.labelled, 42)
    inputs = [WIKI, AUSTEN, task["unlabelled"]]
    tokenizer, eval_data, rows = None, None, []

    for name in args.variants:
        slug = slug_of(name)
        data, run = os.path.join(work, slug, "data"), os.path.join(work, slug, "run")
        flags = ["--tokenizer", tokenizer] if tokenizer else ["--vocab-size", str(args.vocab_size)]
        preprocess_s = run_stage(f"preprocess-{slug}", [
            os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", *inputs, "--output", data,
            "--max-seq-length", str(args.max_seq_length), "--num-shards", "4", "--seed", "42", "--no-mlflow",
            *flags, *VARIANTS[name]], logs)
        tokenizer = tokenizer or os.path.join(data, "tokenizer")
        eval_data = eval_data or data  # the static variant, when it runs first
        # Calibrate: a short run gives the step time; the budget then sets the steps.
        probe = os.path.join(work, slug, "probe")
        pretrain(data, probe, 40, args, logs, f"probe-{slug}", log_every=10)
        seconds_per_step = step_seconds(probe, args.batch_size)
        steps = max(50, int(args.minutes * 60 / seconds_per_step))
        pretrain_s = pretrain(data, run, steps, args, logs, f"pretrain-{slug}")
        export = os.path.join(run, "hf", sorted(os.listdir(os.path.join(run, "hf")))[-1])
        manifest = json.load(open(os.path.join(data, "manifest.json")))
        row = {"variant": name, "flags": VARIANTS[name], "steps": steps, "seconds_per_step": seconds_per_step,
               "pretrain_s": pretrain_s, "preprocess_s": preprocess_s, "examples": manifest["num_examples"],
               "shard_mb": sum(os.path.getsize(os.path.join(data, s["path"])) for s in manifest["shards"]) / 1e6,
               **held_out_mlm(export, eval_data)}
        row["finetune_pretrained"] = [finetune(run, "pretrained", s, task, os.path.join(work, slug, f"ft-{s}"),
                                               logs, args) for s in args.seeds]
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps({**row, "minutes": args.minutes, "model": args.model, "finetune_epochs": args.finetune_epochs,
                                "finetune_learning_rate": args.finetune_learning_rate, "finetune_patience": 0,
                                "time": time.time()}) + "\n")

    first_run = os.path.join(work, slug_of(rows[0]["variant"]), "run")
    random = [finetune(first_run, "random", s, task, os.path.join(work, f"random-ft-{s}"), logs, args)
              for s in args.seeds]
    with open(args.results, "a") as f:
        f.write(json.dumps({"variant": "random init", "finetune_random": random, "minutes": args.minutes,
                            "time": time.time()}) + "\n")
    print(f"\n{'objective':<26} {'steps':>6} {'s/step':>7} {'MLM loss':>9} {'MLM acc':>8} "
          f"{'fine-tune test acc (mean, seeds)':>34}")
    for row in rows:
        accs = row["finetune_pretrained"]
        print(f"{row['variant']:<26} {row['steps']:>6} {row['seconds_per_step']:>7.3f} {row['eval_mlm_loss']:>9.3f} "
              f"{row['eval_mlm_accuracy']:>8.3f} {statistics.mean(accs):>8.3f}  "
              + " / ".join(f"{a:.3f}" for a in accs))
    print(f"{'random init':<26} {'':>6} {'':>7} {'':>9} {'':>8} {statistics.mean(random):>8.3f}  "
          + " / ".join(f"{a:.3f}" for a in random))
    return 0


if __name__ == "__main__":
    sys.exit(main())
