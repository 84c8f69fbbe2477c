"""Does fine-tuning with --group-by-length lose accuracy? The same fine-tunes with random and with
length-grouped batches, several seeds, on real labelled reviews.

From the pretrained bundle of tests/data/pretrained_reviews (a BERT of hidden size 128 pretrained on the
reviews' unlabelled train text), each seed fine-tunes on the same labelled Rotten Tomatoes
reviews twice, batches random and grouped by length, with the same flags (no early stopping),
and reports test accuracy (1,281 reviews) and its training seconds. Prints each run, then per
side the mean and the spread over seeds, and the mean paired difference. Two runs side by side,
one thread each; about 3 minutes on 2 cores with the defaults.

    python benchmarks/group_by_length_quality.py [--labelled 1000] [--epochs 5] [--seeds 1,2,3,4,5]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from preprocessing import cli_parser  # noqa: E402
from pipeline.run_all import DIST_ENV, write_review_task  # noqa: E402

BUNDLE = os.path.join(REPO, "tests", "data", "pretrained_reviews")


def finetune(task: dict, seed: int, grouped: bool, out: str, args) -> tuple[float, float]:
    """(test accuracy, training seconds over the epochs)."""
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(REPO, "pipeline", "finetune.py"), "--model", BUNDLE,
           "--train", task["train"], "--validation", task["validation"], "--test", task["test"],
           "--epochs", str(args.epochs), "--patience", "0", "--learning-rate", str(args.learning_rate),
           "--reinit-pooler", "--seed", str(seed), "--output-dir", out, "--no-mlflow", "--no-log-model",
           *(["--group-by-length"] if grouped else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"fine-tuning failed (seed {seed}, grouped {grouped}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return report["test"]["accuracy"], sum(epoch["seconds"] for epoch in report["history"])


def main(argv=None) -> int:
    p = cli_parser.Parser(description=__doc__.split("\n\n")[0], formatter_class=cli_parser.DefaultsFormatter)
    p.add_argument("--labelled", type=int, default=1000, help="labelled train reviews")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3, 4, 5])
    args = p.parse_args(argv)
    if len(set(args.seeds)) < 2:
        p.error("--seeds: at least two different seeds (the spread over seeds is the point)")
    with open(os.path.join(BUNDLE, "provenance.json")) as f:
        split_seed = json.load(f)["seed"]
    with tempfile.TemporaryDirectory(prefix="group_by_length_") as root:
        task = write_review_task(os.path.join(root, "task"), args.labelled, split_seed)
        runs = [(seed, grouped) for seed in args.seeds for grouped in (False, True)]
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda r: finetune(task, *r, os.path.join(root, f"{r[0]}-{int(r[1])}"), args),
                                    runs))
    table = dict(zip(runs, results))
    print(f"\nRotten Tomatoes, {args.labelled} labelled reviews, {args.epochs} epochs, from the pretrained bundle; "
          "test accuracy (1,281 reviews) and training seconds")
    for seed in args.seeds:
        (a0, s0), (a1, s1) = table[(seed, False)], table[(seed, True)]
        print(f"  seed {seed}: random {a0:.4f} ({s0:.1f} s)   grouped {a1:.4f} ({s1:.1f} s)")
    for grouped, name in ((False, "random "), (True, "grouped")):
        accuracy = [table[(s, grouped)][0] for s in args.seeds]
        seconds = sum(table[(s, grouped)][1] for s in args.seeds)
        print(f"{name}: mean {statistics.mean(accuracy):.4f}, spread (sd over seeds) {statistics.stdev(accuracy):.4f}, "
              f"training {seconds:.0f} s in all")
    diffs = [table[(s, True)][0] - table[(s, False)][0] for s in args.seeds]
    print(f"grouped - random: mean {statistics.mean(diffs):+.4f} (sd {statistics.stdev(diffs):.4f}, standard error "
          f"{statistics.stdev(diffs) / len(diffs) ** 0.5:.4f}), ahead on {sum(d > 0 for d in diffs)} of {len(diffs)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
