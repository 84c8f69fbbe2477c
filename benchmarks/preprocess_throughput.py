"""End-to-end preprocessing throughput: .xml.bz2 dump → written, masked shards.

Builds a bigger dump from the bundled real Wikipedia sample (``--copies`` copies with
distinct page ids, written as a multistream .xml.bz2 like Wikipedia's own, so reading
splits across workers), then runs ``preprocessing/run_beam.py`` as a user would (a
fresh process each time, start-up included) with 1 and 2 DirectRunner workers, at
dupe_factor 5 and max_seq_length 128, and prints input tokens per second per worker
and the 2-worker speed-up.

    python benchmarks/preprocess_throughput.py [--copies 8] [--workers 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "preprocessing", "sample_data", "enwiki-sample-pages-articles.xml.bz2")


def build_dump(path: str, copies: int) -> None:
    with bz2.open(SAMPLE, "rb") as f:
        xml = f.read()
    first = xml.rfind(b"\n", 0, xml.find(b"<page>")) + 1
    header = xml[:first]
    pages = re.findall(rb"  <page>.*?</page>\n", xml, re.S)
    streams = [bz2.compress(header)]
    for copy in range(copies):
        # Distinct page ids (and so distinct documents and seeds) per copy.
        renamed = [re.sub(rb"<id>(\d+)</id>", lambda m: b"<id>%d</id>" % (int(m.group(1)) + copy * 10**8),
                          page, count=1) for page in pages]
        streams.extend(bz2.compress(b"".join(renamed[i:i + 100])) for i in range(0, len(renamed), 100))
    streams.append(bz2.compress(b"</mediawiki>\n"))
    with open(path, "wb") as f:
        f.write(b"".join(streams))


def command(dump: str, output: str, workers: int, tokenizer: str | None, extra: list[str]) -> list[str]:
    """``run_beam.py`` on the dump at dupe 5 and seq 128, with ``workers`` local workers."""
    cmd = [sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", dump,
           "--output", output, "--dupe-factor", "5", "--max-seq-length", "128", "--no-mlflow",
           "--split-bytes", str(1 << 20), *extra]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    if workers > 1:
        cmd += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return cmd


def run(dump: str, output: str, workers: int, tokenizer: str | None, extra: list[str]) -> tuple[float, dict]:
    cmd = command(dump, output, workers, tokenizer, extra)
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - started
    if proc.returncode:  # run_beam.py's own one-line error (a bad --vocab-size, a full disk), not a traceback here
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")] or proc.stderr.splitlines()
        raise SystemExit(f"preprocess_throughput.py: run_beam.py failed (exit {proc.returncode}): "
                         f"{errors[-1] if errors else 'no output'}")
    with open(os.path.join(output, "manifest.json")) as f:
        return wall, json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="copies of the 106-article sample")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of runs, alternating the worker counts; the speed-up is the "
                             "ratio of the median times (this VM's speed drifts by a fifth)")
    args = parser.parse_args()
    if args.copies < 1 or args.repeats < 1 or min(args.workers) < 1:
        parser.error("--copies, --repeats and --workers must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "enwiki-bench-multistream.xml.bz2")
        build_dump(dump, args.copies)
        print(f"input: {os.path.getsize(dump) / 1e6:.1f} MB multistream dump, {args.copies} copies "
              f"of the real sample; dupe_factor 5, max_seq_length 128; {os.cpu_count()} CPUs")
        # Train the vocabulary once, timed on its own: it is a fixed cost on one worker,
        # not part of the per-token work that scales with workers.
        vocab_wall, manifest = run(dump, os.path.join(tmp, "vocab"), 1, None,
                                   ["--vocab-size", str(args.vocab_size)])
        print(f"with vocabulary training: {manifest['counters']['tokens']:,} input tokens in "
              f"{vocab_wall:.1f} s = {manifest['counters']['tokens'] / vocab_wall:,.0f} tokens/s (1 worker)")
        tokenizer = os.path.join(tmp, "vocab", "tokenizer")
        walls: dict[int, list[float]] = {w: [] for w in args.workers}
        # Rounds alternate the order of the worker counts, so that a machine that drifts slower or
        # faster during the benchmark shifts both sides of the ratio alike.
        for rnd in range(args.repeats):
            for workers in (args.workers if rnd % 2 == 0 else args.workers[::-1]):
                wall, manifest = run(dump, os.path.join(tmp, f"w{workers}-{rnd}"), workers, tokenizer, [])
                walls[workers].append(wall)
                tokens = manifest["counters"]["tokens"]
                print(f"{workers} worker(s): {tokens:,} input tokens → {manifest['num_examples']:,} examples "
                      f"in {wall:.1f} s = {tokens / wall:,.0f} tokens/s = "
                      f"{tokens / wall / workers:,.0f} tokens/s per worker")
        if 1 in walls and args.repeats > 1:
            for workers, rounds in walls.items():
                if workers > 1:
                    print(f"speed-up {workers} workers vs 1 by round: "
                          + ", ".join(f"{one / many:.2f}x" for one, many in zip(walls[1], rounds)))
        median = {w: statistics.median(v) for w, v in walls.items()}
        if args.repeats > 1:
            for workers, wall in median.items():
                print(f"{workers} worker(s), median of {args.repeats}: {wall:.1f} s = "
                      f"{tokens / wall / workers:,.0f} tokens/s per worker")
        if 1 in median:
            for workers, wall in median.items():
                if workers > 1:
                    print(f"speed-up {workers} workers vs 1: {median[1] / wall:.2f}x")


if __name__ == "__main__":
    main()
