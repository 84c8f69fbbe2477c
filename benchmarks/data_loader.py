"""Data-loader throughput, padding and memory: pipeline/data.py and sampler.py on a real data dir.

Times ``PretrainingLoader`` (background prefetch of 4 batches, micro-batch 64, rank 0 of
1) over >= 20k sequences in this one process, so the figure is per training process,
and prints the pad-token share of one epoch's batches with and without length-aware
batching (windows of 64 batches). Without --data, writes the dump-sample data dir
(seq 128, vocab 8000, dupe factor 2, 4 shards) to a temporary folder first (~10 s).

Memory, to compare corpus sizes: ``--replicate K`` trains on a data dir whose manifest
lists the shards K times (symlinks; K × the rows). The data dir is first opened in a
child process, which converts the shards into the flat cache on first use (its time and
peak RSS are printed); this process then opens it and iterates, and prints its memory
from /proc/self/status after the imports, after opening the dataset and after
iterating: RSS, its anonymous (private) part, its file-backed part (shared libraries
and the mapped flat arrays, pages the ranks of a node share through the page cache)
and the peak RSS (VmHWM). The figures are taken before the padding share, which builds
whole epochs of batches. ``--busy-us N`` spends N µs of pure Python between batches, as a
training step's host work does, so the loader's thread competes with it for the GIL: the
throughput then shows what the loader takes from the training loop.

A cold page cache, to compare the loader's read-ahead (pipeline/read_ahead.py) with the
plain memory-mapped gather a loader otherwise does: ``--cold`` times ``--rounds`` pairs of
runs, each in a fresh process that first drops the flat cache's pages from the page cache
(``posix_fadvise(DONTNEED)``, no root needed), read-ahead off then on, and prints their
sequences/s and the ratio of the medians. Use a data dir larger than a few batches' pages
(``--replicate 100``: 1.3M rows, 1 GB of flat arrays) so that rows rarely share a page.

    python benchmarks/data_loader.py [--data DIR] [--replicate K] [--sequences 50000] [--batch-size 64]
                                     [--no-read-ahead] [--busy-us 40000]
    python benchmarks/data_loader.py --replicate 100 --cold --batch-size 256 --sequences 20000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.data import PretrainingDataset, PretrainingLoader  # noqa: E402
from pipeline.sampler import BatchSampler, padding_share  # noqa: E402

SAMPLE = os.path.join(REPO, "preprocessing", "sample_data", "enwiki-sample-pages-articles.xml.bz2")
MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def make_data_dir(output: str) -> None:
    print(f"writing the sample data dir to {output} ...", flush=True)
    subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", SAMPLE,
                    "--output", output, "--vocab-size", "8000", "--dupe-factor", "2", "--num-shards", "4",
                    "--no-mlflow"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def replicate(data: str, copies: int, output: str) -> str:
    """A data dir listing ``data``'s shards ``copies`` times (symlinks, so no extra disk)."""
    with open(os.path.join(data, "manifest.json")) as f:
        manifest = json.load(f)
    os.makedirs(os.path.join(output, "shards"))
    os.symlink(os.path.abspath(os.path.join(data, "tokenizer")), os.path.join(output, "tokenizer"))
    shards = []
    for copy in range(copies):
        for shard in manifest["shards"]:
            path = f"shards/copy{copy:04d}-{os.path.basename(shard['path'])}"
            os.symlink(os.path.abspath(os.path.join(data, shard["path"])), os.path.join(output, path))
            shards.append({"path": path, "rows": shard["rows"]})
    manifest.update(shards=shards, num_examples=manifest["num_examples"] * copies)
    with open(os.path.join(output, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return output


def memory_kb() -> dict[str, int]:
    """This process's memory (kB) from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in MEMORY_FIELDS:
                values[key] = int(value.split()[0])
    return values


def print_memory(when: str, kb: dict[str, int]) -> None:
    mb = {k: v / 1024 for k, v in kb.items()}
    print(f"memory          {when:<22} RSS {mb['VmRSS']:7.1f} MB = anonymous {mb['RssAnon']:7.1f} + "
          f"file {mb['RssFile']:7.1f}; peak RSS {mb['VmHWM']:7.1f} MB", flush=True)


def open_in_child(data: str) -> None:
    """Opens the data dir in a fresh process (the first open converts the shards)."""
    code = ("import sys, time; t = time.perf_counter(); "
            "from pipeline.data import PretrainingDataset; d = PretrainingDataset(sys.argv[1]); "
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print(f'{time.perf_counter() - t:.2f} {int(hwm) / 1024:.1f} {getattr(d, \"built_cache\", False)}')")
    out = subprocess.run([sys.executable, "-c", code, data], check=True, capture_output=True, text=True)
    seconds, peak, built = out.stdout.split()
    print(f"first open      in a child process: {seconds} s (imports included), peak RSS {peak} MB"
          f"{', converted the shards into the flat cache' if built == 'True' else ''}", flush=True)


def busy(microseconds: float) -> None:
    """Holds the GIL for ``microseconds``, as the training loop's Python does."""
    end = time.perf_counter() + microseconds * 1e-6
    while time.perf_counter() < end:
        pass


def evict(directory: str) -> None:
    """Drops the files' pages from the page cache (written back first: dirty pages stay)."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def cold_run(data: str, read_ahead: bool, sequences: int, batch_size: int, seed: int) -> float:
    """Sequences/s of a loader over a data dir whose flat cache was just evicted (in this process,
    which maps nothing of it yet), timed from its first batch."""
    dataset = PretrainingDataset(data, read_ahead=False)  # opened once to find the cache, then closed
    cache = dataset.cache_dir
    del dataset
    evict(cache)
    start = time.perf_counter()
    dataset = PretrainingDataset(data, read_ahead=read_ahead)
    steps = -(-sequences // batch_size)
    with PretrainingLoader(dataset, BatchSampler(dataset.lengths, batch_size, seed=seed), prefetch=4) as loader:
        for _ in range(steps):
            next(loader)
    return steps * batch_size / (time.perf_counter() - start)


def compare_cold(data: str, args) -> None:
    print(f"cold page cache: {args.rounds} rounds, each run in a fresh process after dropping the flat "
          f"cache's pages; batch {args.batch_size}, {args.sequences:,} sequences, prefetch 4")
    rates = {False: [], True: []}
    for r in range(args.rounds):
        for read_ahead in (False, True):
            code = (f"import sys; sys.path.insert(0, {REPO!r}); from benchmarks.data_loader import cold_run; "
                    f"print(cold_run({data!r}, {read_ahead}, {args.sequences}, {args.batch_size}, {r}))")
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
            rates[read_ahead].append(float(out.stdout.split()[-1]))
            print(f"  round {r + 1}, read-ahead {'on ' if read_ahead else 'off'}: "
                  f"{rates[read_ahead][-1]:9,.0f} sequences/s", flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"cold throughput  read-ahead off {off:,.0f}, on {on:,.0f} sequences/s (medians): {on / off:.1f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a data dir from preprocessing/run_beam.py (default: write the sample)")
    parser.add_argument("--replicate", type=int, default=1, help="list the data dir's shards K times")
    parser.add_argument("--sequences", type=int, default=50_000, help="sequences to time (>= 20k)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--cold", action="store_true",
                        help="time a cold page cache, read-ahead off against on, instead of the rest")
    parser.add_argument("--rounds", type=int, default=3, help="--cold: pairs of runs")
    parser.add_argument("--busy-us", type=float, default=0.0,
                        help="µs of pure Python between batches, as a training step's host work: the loader's "
                             "thread then competes with it for the GIL")
    parser.add_argument("--no-read-ahead", dest="read_ahead", action="store_false",
                        help="the timed loader gathers without asking the kernel for its rows first")
    args = parser.parse_args(argv)
    imported = memory_kb()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or os.path.join(tmp, "data")
        if not args.data:
            make_data_dir(data)
        if args.replicate > 1:
            data = replicate(data, args.replicate, os.path.join(tmp, f"replicated-{args.replicate}"))
        open_in_child(data)
        if args.cold:
            compare_cold(data, args)
            return
        start = time.perf_counter()
        dataset = PretrainingDataset(data, read_ahead=args.read_ahead)
        load_s = time.perf_counter() - start
        opened = memory_kb()
        seq = dataset.max_seq_length
        print(f"data dir        {data}: {len(dataset):,} rows, max_seq_length {seq}, "
              f"opened in {load_s:.2f} s")

        sampler = BatchSampler(dataset.lengths, args.batch_size, seed=0)
        steps = -(-args.sequences // args.batch_size)
        with PretrainingLoader(dataset, sampler, prefetch=args.prefetch) as loader:
            next(loader)  # thread start and the first block of the order, not timed
            start = time.perf_counter()
            for _ in range(steps):
                busy(args.busy_us)
                next(loader)
            elapsed = time.perf_counter() - start
            share = loader.real_token_share
        iterated = memory_kb()
        print(f"throughput      {steps * args.batch_size / elapsed:,.0f} sequences/s "
              f"({steps * args.batch_size:,} sequences, batch {args.batch_size}, prefetch {args.prefetch}, "
              f"{elapsed / steps * 1e3:.3f} ms/batch, pinned={loader.pin_memory}, "
              f"read-ahead {'on' if args.read_ahead else 'off'}"
              f"{f', {args.busy_us:,.0f} µs of Python a batch' if args.busy_us else ''})")
        print(f"real tokens     {share:.2%} of the delivered tokens are not [PAD]")
        for when, kb in (("after the imports", imported), ("after opening", opened),
                         (f"after {steps:,} batches", iterated)):
            print_memory(when, kb)

        for window, name in ((64, "length-aware (window 64)"), (1, "random batches")):
            batches = BatchSampler(dataset.lengths, args.batch_size, seed=0, length_window=window).epoch_batches(0)
            print(f"padding share   {name:<26} {padding_share(dataset.lengths, batches, seq):6.2%}")


if __name__ == "__main__":
    main()
