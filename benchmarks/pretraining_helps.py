"""Does pretraining help? The pretrained bundle against random init, fine-tuned alike on real reviews.

The checkpoint is the bundle in tests/data/pretrained_reviews (a BERT of hidden size 128, 2 layers,
pretrained by this pipeline on the unlabelled text of the Rotten Tomatoes train split, 87
CPU-minutes). Each seed fine-tunes it and the same architecture from random weights with the same
flags: 300 labelled train reviews, learning rate 1e-3, 20 epochs, no early stopping (with
patience, random init was stopped on its first epochs' majority-class plateau while its
validation loss still fell), the best epoch chosen on validation, accuracy on the 1,281 test
reviews. ``--splits test validation`` also runs the check with the two splits' roles swapped
(best epoch chosen on test, accuracy on validation), so neither figure picked its own epoch.
Prints each split's accuracies per seed, their means and the mean gain. Two fine-tunes side by
side, one thread each: about 7 minutes a split for five seeds on 2 cores.

tests/test_finetune_pretraining_helps.py runs the test split, seeds 1-5, and asserts the gain;
docs/EXPERIMENTS.md has the table of both splits:

    python benchmarks/pretraining_helps.py [--splits test validation] [--seeds 1,2,3,4,5]
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
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from preprocessing import cli_parser  # noqa: E402
from pipeline.run_all import DIST_ENV, write_review_task  # noqa: E402

BUNDLE = os.environ.get("BERT_PIPELINE_REVIEWS_BUNDLE") or os.path.join(REPO, "tests", "data", "pretrained_reviews")
LABELLED, EPOCHS, LEARNING_RATE = 300, 20, 1e-3
INITS = ("pretrained", "random")


def review_task(folder: str) -> dict[str, str]:
    """The labelled splits and the unlabelled text, as the bundle's pretraining split them."""
    with open(os.path.join(BUNDLE, "provenance.json")) as f:
        split_seed = json.load(f)["seed"]
    return write_review_task(folder, LABELLED, split_seed)


def finetune(task: dict, init: str, seed: int, out: str, report_on: str) -> float:
    """Accuracy on REPORT_ON of one fine-tune; "validation" swaps the two splits' roles."""
    select_on = "test" if report_on == "validation" else "validation"
    # One thread each, two side by side: a model this small gains little from a second thread, so
    # a pair side by side takes about two-thirds of the time of the two in a row, with the same figures.
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(REPO, "pipeline", "finetune.py"), "--model", BUNDLE, "--init", init,
           "--train", task["train"], "--validation", task[select_on], "--test", task[report_on],
           "--epochs", str(EPOCHS), "--patience", "0", "--learning-rate", str(LEARNING_RATE), "--reinit-pooler",
           "--seed", str(seed), "--output-dir", out, "--no-mlflow", "--no-log-model"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"fine-tuning failed ({init}, seed {seed}, reported on {report_on}):\n"
                           f"{proc.stderr[-4000:]}")
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)["test"]["accuracy"]


def compare(task: dict, seeds, report_on: str, folder: str) -> dict[str, list[float]]:
    """Each init's accuracies on REPORT_ON, seed by seed."""
    runs = [(init, seed) for init in INITS for seed in seeds]
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        figures = list(pool.map(
            lambda run: finetune(task, *run, os.path.join(folder, f"{report_on}-{run[0]}-{run[1]}"), report_on), runs))
    return {init: [a for (i, _), a in zip(runs, figures) if i == init] for init in INITS}


def summary(accuracy: dict[str, list[float]], report_on: str, seeds) -> str:
    mean = {init: statistics.mean(a) for init, a in accuracy.items()}
    gains = [p - r for p, r in zip(accuracy["pretrained"], accuracy["random"])]
    lines = [f"Rotten Tomatoes {report_on} accuracy, {LABELLED} labelled reviews, seeds {','.join(map(str, seeds))}"]
    for init in INITS:
        lines.append(f"  {init:<10} " + " ".join(f"{a:.3f}" for a in accuracy[init]) + f"   mean {mean[init]:.4f}")
    lines.append(f"  gain {mean['pretrained'] - mean['random']:+.4f}, ahead on {sum(g > 0 for g in gains)} of "
                 f"{len(gains)} seeds")
    return "\n".join(lines)


def seed_list(text: str) -> list[int]:
    """--seeds: distinct integers, comma-separated (a seed twice would run two fine-tunes into one folder)."""
    seeds = [int(x) for x in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise ValueError(text)
    return seeds


def main(argv=None) -> int:
    p = cli_parser.Parser(description=__doc__.split("\n\n")[0], formatter_class=cli_parser.DefaultsFormatter)
    p.add_argument("--splits", nargs="+", choices=("test", "validation"), default=["test", "validation"],
                   help="the split each comparison reports on (validation: the roles swapped)")
    p.add_argument("--seeds", type=seed_list, default=[1, 2, 3, 4, 5],
                   help="fine-tuning seeds, comma-separated: one fine-tune per seed and init")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pretraining_helps_") as root:
        task = review_task(os.path.join(root, "task"))
        for report_on in args.splits:
            print(summary(compare(task, args.seeds, report_on, root), report_on, args.seeds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
