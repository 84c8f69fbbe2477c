"""Peak memory against corpus size, the whole path: dump → shards → pretraining ranks.

For each size, builds a multistream dump of ``--copies`` copies of the bundled real
Wikipedia sample (as ``preprocess_throughput.py`` does: distinct page ids per copy),
runs ``preprocessing/run_beam.py`` with one worker as a user would, then a few
pretraining steps of a tiny BERT on 2 processes (``torchrun``, gloo) on the data dir it
wrote, and prints the peak resident memory of each: the preprocessing process, and the
largest training rank. Memory that grows with the corpus shows up as a rising column.

    python benchmarks/memory_scaling.py [--copies 8 32 128] [--steps 20] [--keep DIR]

Preprocessing's peak is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper process
that runs the command (with one worker, its only process). The ranks' memory is sampled
from ``/proc`` every 0.2 s: their peak anonymous memory (RssAnon, the process's own) and
peak RSS (VmHWM, which also counts the pages of the memory-mapped training arrays that
the rank has touched: shared with the other ranks and reclaimable page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from preprocess_throughput import build_dump

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def peak_rss_mb(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(peak RSS of the largest process of ``cmd`` in MB, wall seconds)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1024, time.monotonic() - started


def _status(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {k: int(fields[k].split()[0]) // 1024 for k in ("RssAnon", "VmHWM") if k in fields}


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        found += children
        todo += children
    return found


def rank_peaks_mb(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(largest rank's peak RssAnon, largest peak VmHWM, wall seconds) of ``cmd``, whose
    python descendants are the ranks (torchrun's agent is excluded by its command line)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, cwd=REPO)
    anon = hwm = 0
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"pretrain.py" not in f.read():
                        continue
            except OSError:
                continue
            status = _status(pid)
            anon, hwm = max(anon, status.get("RssAnon", 0)), max(hwm, status.get("VmHWM", 0))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")
    return anon, hwm, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[8, 32, 128],
                        help="corpus sizes, in copies of the 106-article sample (1 copy: 0.56M tokens)")
    parser.add_argument("--steps", type=int, default=20, help="pretraining steps per size")
    parser.add_argument("--tokenizer", help="reuse this spm.model (skips vocabulary training)")
    parser.add_argument("--keep", help="keep the dumps and data dirs under this folder")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: measure only training where a data dir is already there")
    args = parser.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="memory-scaling-")
    os.makedirs(root, exist_ok=True)
    try:
        measure(args, root)
    finally:
        if not args.keep:  # its dumps and data dirs: about 10 GB for the default sizes
            shutil.rmtree(root, ignore_errors=True)


def measure(args, root: str) -> None:
    print(f"{os.cpu_count()} CPUs; dupe_factor 5, max_seq_length 128, 1 preprocessing worker; "
          f"tiny BERT, {args.steps} steps on 2 processes; work dir {root}")
    print(f"{'copies':>6} {'input tokens':>13} {'examples':>10} {'preprocess peak':>16} {'time':>7} "
          f"{'rank anon peak':>15} {'rank RSS peak':>14} {'time':>7}")
    for copies in args.copies:
        dump = os.path.join(root, f"enwiki-{copies}x-multistream.xml.bz2")
        if not os.path.exists(dump):
            build_dump(dump, copies)
        data = os.path.join(root, f"data-{copies}x")
        cmd = [sys.executable, "preprocessing/run_beam.py", "--input", dump, "--output", data,
               "--dupe-factor", "5", "--max-seq-length", "128", "--no-mlflow", "--split-bytes", str(1 << 20)]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        if args.reuse and os.path.exists(os.path.join(data, "manifest.json")):
            pre_peak = pre_wall = float("nan")
        else:
            pre_peak, pre_wall = peak_rss_mb(cmd)
        with open(os.path.join(data, "manifest.json")) as f:
            manifest = json.load(f)
        run_dir = os.path.join(root, f"run-{copies}x")
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
        train_anon, train_peak, train_wall = rank_peaks_mb(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "pipeline/pretrain.py",
             "--data", data, "--run-dir", run_dir, "--model", "tiny", "--steps", str(args.steps),
             "--micro-batch-size", "32", "--global-batch-size", "64", "--eval-every", "0",
             "--checkpoint-every", "0", "--no-mlflow"],
            env={"OMP_NUM_THREADS": "1"})
        print(f"{copies:>6} {manifest['counters']['tokens']:>13,} {manifest['num_examples']:>10,} "
              f"{pre_peak:>13,.0f} MB {pre_wall:>6.0f}s {train_anon:>12,.0f} MB {train_peak:>11,.0f} MB "
              f"{train_wall:>6.0f}s", flush=True)


if __name__ == "__main__":
    main()
