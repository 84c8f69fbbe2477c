"""Data-loader throughput and padding: pipeline/data.py on a real data dir.

Times ``PretrainingLoader`` (background prefetch of 4 batches, micro-batch 64, rank 0 of
1) over >= 20k sequences in this one process, so the figure is per training process,
and prints the pad-token share of one epoch's batches with and without length-aware
batching (windows of 64 batches). Without --data, writes the dump-sample data dir
(seq 128, vocab 8000, dupe factor 2, 4 shards) to a temporary folder first (~10 s).

    python benchmarks/data_loader.py [--data DIR] [--sequences 50000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.data import BatchSampler, PretrainingDataset, PretrainingLoader, padding_share  # noqa: E402

SAMPLE = os.path.join(REPO, "preprocessing", "sample_data", "enwiki-sample-pages-articles.xml.bz2")


def make_data_dir(output: str) -> None:
    print(f"writing the sample data dir to {output} ...", flush=True)
    subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", SAMPLE,
                    "--output", output, "--vocab-size", "8000", "--dupe-factor", "2", "--num-shards", "4",
                    "--no-mlflow"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a data dir from preprocessing/run_beam.py (default: write the sample)")
    parser.add_argument("--sequences", type=int, default=50_000, help="sequences to time (>= 20k)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=4)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or os.path.join(tmp, "data")
        if not args.data:
            make_data_dir(data)
        start = time.perf_counter()
        dataset = PretrainingDataset(data)
        load_s = time.perf_counter() - start
        seq = dataset.max_seq_length
        print(f"data dir        {data}: {len(dataset):,} rows, max_seq_length {seq}, "
              f"loaded in {load_s:.2f} s")

        for window, name in ((64, "length-aware (window 64)"), (1, "random batches")):
            batches = BatchSampler(dataset.lengths, args.batch_size, seed=0, length_window=window).epoch_batches(0)
            print(f"padding share   {name:<26} {padding_share(dataset.lengths, batches, seq):6.2%}")

        sampler = BatchSampler(dataset.lengths, args.batch_size, seed=0)
        steps = -(-args.sequences // args.batch_size)
        with PretrainingLoader(dataset, sampler, prefetch=args.prefetch) as loader:
            next(loader)  # thread start and first epoch's permutation, not timed
            start = time.perf_counter()
            for _ in range(steps):
                next(loader)
            elapsed = time.perf_counter() - start
            share = loader.real_token_share
        print(f"throughput      {steps * args.batch_size / elapsed:,.0f} sequences/s "
              f"({steps * args.batch_size:,} sequences, batch {args.batch_size}, prefetch {args.prefetch}, "
              f"{elapsed / steps * 1e3:.3f} ms/batch, pinned={loader.pin_memory})")
        print(f"real tokens     {share:.2%} of the delivered tokens are not [PAD]")


if __name__ == "__main__":
    main()
