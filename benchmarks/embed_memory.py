"""Peak memory of pipeline/embed.py against input size: it should not grow with the rows.

Writes the bundled Rotten Tomatoes reviews (13,905 rows with the 1,097 plot summaries; 13,891
with a text) ``--copies`` times over into one jsonl file with an ``id`` per row, embeds it with the bundled small
pretrained BERT (``tests/data/pretrained_reviews``, hidden 128) as a user would, one process,
and prints the peak RSS of the process and its rows per second. Memory that grows with the
input shows up as a rising column.

    python benchmarks/embed_memory.py [--copies 1 4 16] [--max-length 32] [--chunk-rows 16384]

Peak RSS is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper process that runs the
command (see memory_scaling.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from memory_scaling import REPO, peak_rss_mb

sys.path.insert(0, REPO)

from pipeline.finetuning.data import read_table  # noqa: E402

REVIEWS = os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2")
MODEL = os.path.join(REPO, "tests", "data", "pretrained_reviews")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16], help="input sizes, in copies of the sample")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per text (shorter: a faster run)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="embed.py's --chunk-rows (default: its own)")
    args = parser.parse_args()
    texts = [t for t in read_table(REVIEWS).columns["text"] if t.strip()]
    print(f"{'rows':>10} {'input MB':>9} {'peak RSS MB':>12} {'rows/s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for copies in args.copies:
            source = os.path.join(tmp, f"reviews-x{copies}.jsonl")
            with open(source, "w") as f:
                for k in range(copies * len(texts)):
                    f.write(json.dumps({"id": f"r{k}", "text": texts[k % len(texts)]}) + "\n")
            rows = copies * len(texts)
            cmd = [sys.executable, "pipeline/embed.py", "--model", MODEL, "--input", source,
                   "--out", os.path.join(tmp, "out.parquet"), "--max-length", str(args.max_length), "--no-mlflow"]
            if args.chunk_rows:
                cmd += ["--chunk-rows", str(args.chunk_rows)]
            peak, seconds = peak_rss_mb(cmd)
            print(f"{rows:>10,} {os.path.getsize(source) / 1e6:>9.1f} {peak:>12,.0f} {rows / seconds:>8,.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
