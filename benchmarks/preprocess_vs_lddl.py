"""Preprocessing against NVIDIA's LDDL, end to end on the same Wikipedia dump and vocabulary.

LDDL (Language Datasets and Data Loaders, ``pip install lddl``) is what NVIDIA's
DeepLearningExamples BERT preprocesses Wikipedia with. Both sides start from the same
``.xml.bz2`` dump (``--copies`` copies of the bundled real sample, as in
``preprocess_throughput.py``) and end with shards their trainer's loader reads,
static-masked MLM + NSP examples of at most 128 tokens, dupe factor 5, with the same
WordPiece ``vocab.txt``:

- LDDL, as its README and NVIDIA's BERT scripts run it, each step a fresh process:
  ``download_wikipedia --no-download`` (WikiExtractor, then LDDL's text shards),
  ``preprocess_bert_pretrain --masking --num-blocks B --sample-ratio 1``, then
  ``mpirun balance_dask_output --num-shards B``. Dask's local scheduler with one worker
  process per core (``--schedule local``): ``--schedule mpi`` spends two of the ranks on
  Dask's scheduler and client, which a 2-core machine cannot spare. jemalloc is preloaded
  when installed, as NVIDIA's scripts do.
- ours: ``preprocessing/run_beam.py --tokenizer VOCAB_DIR`` with as many workers.

Each run is held to as many cores as it has workers (its CPU affinity), so that threads
inside a worker (Hugging Face tokenizers' pool, pyarrow's) do not make "1 worker" two cores.

Untimed set-up, once: LDDL's extraction of the dump trains the two things neither side
ships here: the WordPiece vocabulary (``tokenizers``, 32,000 pieces at most) and, since
NLTK's punkt model cannot be downloaded on a machine without the internet, a Punkt model
for LDDL's ``nltk.sent_tokenize`` (NLTK's own unsupervised trainer on the same text: the
same algorithm and cost per sentence as the published English model, other parameters).

LDDL's pinned stack (dask 2021.7, transformers 4.16) needs Python 3.8; give its
interpreter with ``--lddl-python``:

    python3.8 -m venv lddl-venv && lddl-venv/bin/pip install lddl nltk tokenizers==0.12.1 \\
        pandas==1.3.5 pyarrow==5.0.0 numpy==1.21.6          # and apt install openmpi-bin libopenmpi-dev
    python benchmarks/preprocess_vs_lddl.py --lddl-python lddl-venv/bin/python [--copies 16] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.preprocess_throughput import build_dump, command  # noqa: E402

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"

# Run with LDDL's interpreter: a Punkt model trained on LDDL's own text shards, written
# where nltk.sent_tokenize("english") looks for it (NLTK_DATA/tokenizers/punkt_tab/english).
TRAIN_PUNKT = r"""
import glob, os, sys
from nltk.tokenize.punkt import PunktTrainer
source, nltk_data = sys.argv[1:3]
trainer = PunktTrainer()
for path in sorted(glob.glob(os.path.join(source, "*.txt"))):
    with open(path, encoding="utf-8") as f:
        trainer.train(f.read(), finalize=False)
trainer.finalize_training()
params = trainer.get_params()
out = os.path.join(nltk_data, "tokenizers", "punkt_tab", "english")
os.makedirs(out, exist_ok=True)
tables = {
    "collocations.tab": ["\t".join(pair) for pair in sorted(params.collocations)],
    "sent_starters.txt": sorted(params.sent_starters),
    "abbrev_types.txt": sorted(params.abbrev_types),
    "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(params.ortho_context.items())],
}
for name, lines in tables.items():
    with open(os.path.join(out, name), "w", encoding="utf-8", newline="") as f:
        f.write("\n".join(lines))
"""

# Run with LDDL's interpreter: what its shards hold, to set beside our manifest's counters.
LDDL_STATS = r"""
import glob, json, sys
import numpy as np
import pyarrow.parquet as pq
rows = tokens = random_next = masked = 0
paths = sorted(glob.glob(sys.argv[1] + "/shard-*.parquet"))
for path in paths:
    table = pq.read_table(path, columns=["num_tokens", "is_random_next", "masked_lm_labels"])
    rows += table.num_rows
    tokens += int(np.asarray(table.column("num_tokens").to_pandas()).sum())
    random_next += int(table.column("is_random_next").to_pandas().sum())
    masked += int(sum(len(labels.split()) for labels in table.column("masked_lm_labels").to_pandas()))
print(json.dumps({"shards": len(paths), "examples": rows, "tokens": tokens,
                  "random_next": random_next, "masked": masked}))
"""


def lddl_env(lddl_python: str, nltk_data: str) -> dict:
    env = dict(os.environ)
    # download_wikipedia runs "python -m wikiextractor...": LDDL's interpreter must come first.
    env["PATH"] = os.path.dirname(lddl_python) + os.pathsep + env["PATH"]
    env["NLTK_DATA"] = nltk_data
    env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


class Failed(Exception):
    pass


class TimedOut(Failed):
    pass


# A step that runs longer is killed and its round left out: LDDL's load balancer once looped
# forever here (2 ranks, 16 shards: "-2 shards" remaining, 4 GB of log in 20 minutes). Its
# longest step took 245 s at --copies 48.
STEP_TIMEOUT = 900


def timed(cmd: list[str], env: dict | None = None, log: str | None = None, cores: set[int] | None = None,
          cwd: str | None = None) -> float:
    """Seconds ``cmd`` took, on ``cores`` alone (its children inherit the affinity)."""
    started = time.monotonic()
    with open(log or os.devnull, "a") as out:
        # Its own process group, so that a timeout kills mpirun's ranks and Dask's workers too.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        try:
            proc.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimedOut(f"{os.path.basename(cmd[0])} ran over {STEP_TIMEOUT} s and was killed")
    if proc.returncode:
        raise Failed(f"failed ({proc.returncode}): {' '.join(cmd)}" + (f"; see {log}" if log else ""))
    return time.monotonic() - started


def extract(lddl_python: str, env: dict, workdir: str, workers: int, log: str,
            cores: set[int] | None = None) -> float:
    """LDDL's first two steps: WikiExtractor on the dump, then its one-article-a-line text shards."""
    return timed([os.path.join(os.path.dirname(lddl_python), "download_wikipedia"), "--outdir", workdir,
                  "--no-download", "--langs", "en", "--num-processes", str(workers)], env, log, cores)


def run_lddl(lddl_python: str, env: dict, workdir: str, vocab: str, workers: int, blocks: int,
             log: str, cores: set[int] | None) -> tuple[dict, dict]:
    bindir = os.path.dirname(lddl_python)
    sink = os.path.join(workdir, "parquet")
    seconds = {"extract": extract(lddl_python, env, workdir, workers, log, cores)}
    run_env, export = dict(env), ["-x", "PATH"]
    if os.path.exists(JEMALLOC):
        run_env["LD_PRELOAD"] = JEMALLOC
        export += ["-x", "LD_PRELOAD"]
    seconds["examples"] = timed([
        os.path.join(bindir, "preprocess_bert_pretrain"), "--schedule", "local",
        "--local-n-workers", str(workers), "--wikipedia", os.path.join(workdir, "source"),
        "--sink", sink, "--vocab-file", vocab, "--masking", "--target-seq-length", "128",
        "--duplicate-factor", "5", "--sample-ratio", "1.0", "--num-blocks", str(blocks),
        "--seed", "12345"], run_env, log, cores, cwd=workdir)
    seconds["balance"] = timed([
        # --bind-to none: Open MPI would otherwise bind each rank to a core of its choosing.
        "mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(workers), *export,
        os.path.join(bindir, "balance_dask_output"), "--indir", sink, "--num-shards", str(blocks)],
        run_env, log, cores, cwd=workdir)
    counted = subprocess.run([lddl_python, "-c", LDDL_STATS, sink], env=env, capture_output=True, text=True)
    if counted.returncode:
        raise Failed(f"counting LDDL's shards in {sink} failed:\n{counted.stderr}")
    return seconds, json.loads(counted.stdout)


def run_ours(dump: str, output: str, vocab_dir: str, workers: int, log: str,
             cores: set[int] | None) -> tuple[float, dict]:
    seconds = timed(command(dump, output, workers, vocab_dir, []), log=log, cores=cores)
    with open(os.path.join(output, "manifest.json")) as f:
        counters = json.load(f)["counters"]
    return seconds, {"shards": len(os.listdir(os.path.join(output, "shards"))),
                     "examples": counters["instances"], "tokens": counters["instance-tokens"],
                     "random_next": counters["random-next"], "masked": counters["masked-tokens"]}


def lddl_workdir(path: str, dump: str) -> str:
    """A fresh dir holding the dump where LDDL's extractor reads it (OUTDIR/wikicorpus-en.xml.bz2)."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.link(dump, os.path.join(path, "wikicorpus-en.xml.bz2"))
    return path


def set_up(lddl_python: str, env: dict, workdir: str, vocab_size: int, log: str) -> str:
    """Untimed: the vocabulary and the Punkt model, both trained on LDDL's extracted text."""
    extract(lddl_python, env, workdir, os.cpu_count() or 1, log)
    source = os.path.join(workdir, "source", "en")
    subprocess.run([lddl_python, "-c", TRAIN_PUNKT, source, env["NLTK_DATA"]], check=True)
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train(sorted(os.path.join(source, name) for name in os.listdir(source)),
                    vocab_size=vocab_size, min_frequency=2, show_progress=False)
    vocab_dir = os.path.join(os.path.dirname(workdir), "vocab")
    os.makedirs(vocab_dir, exist_ok=True)
    tokenizer.save_model(vocab_dir)
    shutil.rmtree(workdir)
    return vocab_dir


def describe(stats: dict) -> str:
    n = stats["examples"]
    return (f"{n:,} examples in {stats['shards']} shards, {stats['tokens'] / n:.1f} tokens and "
            f"{stats['masked'] / n:.1f} masked an example, {stats['random_next'] / n:.1%} random next")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lddl-python", required=True,
                        help="the python of an environment where `pip install lddl` works (Python 3.8)")
    parser.add_argument("--copies", type=int, default=16,
                        help="copies of the bundled Wikipedia sample in the dump (16: 9M input tokens)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="rounds; medians are printed")
    parser.add_argument("--blocks", type=int, default=16,
                        help="LDDL's --num-blocks and --num-shards (its scripts: 4096 for all of Wikipedia)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not limit each run to as many cores as it has workers")
    parser.add_argument("--workdir", help="keep the logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if shutil.which("mpirun") is None:
        parser.error("LDDL's load balancer runs under mpirun: install Open MPI (apt install openmpi-bin)")
    if args.pin and max(args.workers) > len(os.sched_getaffinity(0)):
        parser.error(f"--workers {max(args.workers)}: this process may use {len(os.sched_getaffinity(0))} "
                     "cores; pass fewer workers, or --no-pin")

    root = args.workdir or tempfile.mkdtemp(prefix="vs-lddl-")
    os.makedirs(root, exist_ok=True)
    try:
        compare(args, root)
    except Failed as e:
        sys.exit(str(e))
    finally:
        if not args.workdir:
            shutil.rmtree(root)


def compare(args: argparse.Namespace, root: str) -> None:
    log = os.path.join(root, "log.txt")
    env = lddl_env(os.path.abspath(args.lddl_python), os.path.join(root, "nltk_data"))
    dump_dir = os.path.join(root, "setup")
    os.makedirs(dump_dir, exist_ok=True)
    dump = os.path.join(dump_dir, "wikicorpus-en.xml.bz2")
    build_dump(dump, args.copies)
    vocab_dir = set_up(args.lddl_python, env, lddl_workdir(os.path.join(root, "setup-lddl"), dump),
                       args.vocab_size, log)
    vocab = os.path.join(vocab_dir, "vocab.txt")
    print(f"dump: {args.copies} copies of the sample, {os.path.getsize(dump) / 1e6:.1f} MB; "
          f"vocabulary: {sum(1 for _ in open(vocab))} WordPiece pieces; "
          f"jemalloc for LDDL: {'yes' if os.path.exists(JEMALLOC) else 'no'}; "
          f"{'each run on as many cores as workers' if args.pin else 'runs not pinned'}; log: {log}")

    results: dict[int, dict[str, list]] = {w: {"lddl": [], "stages": [], "ours": [], "examples": []}
                                           for w in args.workers}
    for round_ in range(args.repeats):
        for workers in args.workers:
            workdir = lddl_workdir(os.path.join(root, f"lddl-{workers}"), dump)
            # As many cores as workers: a worker's own threads (Hugging Face tokenizers' pool,
            # pyarrow's) would otherwise borrow an idle core and make "1 worker" two.
            cores = set(sorted(os.sched_getaffinity(0))[:workers]) if args.pin else None
            output = os.path.join(root, f"ours-{workers}")
            shutil.rmtree(output, ignore_errors=True)
            # Which side runs first alternates, against the machine's drift.
            try:
                if round_ % 2:
                    ours_seconds, ours_stats = run_ours(dump, output, vocab_dir, workers, log, cores)
                stages, lddl_stats = run_lddl(os.path.abspath(args.lddl_python), env, workdir, vocab,
                                              workers, args.blocks, log, cores)
                if not round_ % 2:
                    ours_seconds, ours_stats = run_ours(dump, output, vocab_dir, workers, log, cores)
            except TimedOut as e:
                print(f"round {round_ + 1}, {workers} worker(s): left out: {e}", flush=True)
                continue
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                shutil.rmtree(output, ignore_errors=True)
            lddl_seconds = sum(stages.values())
            results[workers]["lddl"].append(lddl_seconds)
            results[workers]["stages"].append(stages)
            results[workers]["ours"].append(ours_seconds)
            results[workers]["examples"].append((lddl_stats["examples"], ours_stats["examples"]))
            print(f"round {round_ + 1}, {workers} worker(s): LDDL {lddl_seconds:.1f} s ("
                  + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
                  + f"), ours {ours_seconds:.1f} s: {lddl_seconds / ours_seconds:.2f}x", flush=True)
            if round_ == 0:
                print(f"  LDDL: {describe(lddl_stats)}\n  ours: {describe(ours_stats)}", flush=True)

    # The two make a few percent different numbers of examples from the same dump (their
    # cleaners keep different pages and lines), so examples a second is printed beside the time.
    print("\nmedians of the finished rounds\n"
          "workers | LDDL s (extract + examples + balance) | ours s | ours faster by | "
          "examples/s LDDL, ours: ratio")
    for workers, r in results.items():
        if not r["lddl"]:
            print(f"{workers:7d} | no round finished")
            continue
        lddl, ours = statistics.median(r["lddl"]), statistics.median(r["ours"])
        stages = {k: statistics.median(s[k] for s in r["stages"]) for k in r["stages"][0]}
        lddl_rate = statistics.median(n / t for (n, _), t in zip(r["examples"], r["lddl"]))
        ours_rate = statistics.median(n / t for (_, n), t in zip(r["examples"], r["ours"]))
        print(f"{workers:7d} | {lddl:7.1f} ({stages['extract']:.1f} + {stages['examples']:.1f} + "
              f"{stages['balance']:.1f}) | {ours:6.1f} | {lddl / ours:.2f}x | "
              f"{lddl_rate:,.0f}, {ours_rate:,.0f}: {ours_rate / lddl_rate:.2f}x")


if __name__ == "__main__":
    main()
