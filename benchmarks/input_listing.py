"""Listing a corpus of many small files: ``run_beam.py --input FOLDER``'s planning step against
Apache Beam's own listing of the same folder.

Some corpora come as a file per document (a crawl's pages, Gutenberg's books, a team's
tickets): hundreds of thousands of files before a byte is read. The planning step lists the
folder with its subfolders, and checks what Beam's listing does not (hidden files, links to
missing files, a file named twice, files under --output, empty ones); this prints its files/s
beside ``FileSystems.match(["FOLDER/**"])``, which lists and stats them and checks nothing.
The files are made in a temporary folder (10 subfolders, one short line each) and removed.

    python benchmarks/input_listing.py [--files 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

from apache_beam.io.filesystems import FileSystems

from preprocessing import inputs


def make_corpus(root: str, files: int) -> str:
    corpus = os.path.join(root, "corpus")
    for i in range(files):
        folder = os.path.join(corpus, f"part{i % 10}")
        if i < 10:
            os.makedirs(folder)
        with open(os.path.join(folder, f"doc{i:07d}.txt"), "w") as f:
            f.write("One short document. It has two sentences.\n")
    return corpus


def timed(fn) -> tuple[float, int]:
    started = time.perf_counter()
    count = fn()
    return time.perf_counter() - started, count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--files", type=int, default=100_000, help="files in the corpus")
    p.add_argument("--repeats", type=int, default=3, help="rounds, each side once a round; the median is shown")
    args = p.parse_args(argv)
    if args.files < 10 or args.repeats < 1:
        p.error("--files must be at least 10 and --repeats at least 1")
    root = tempfile.mkdtemp(prefix="input-listing-")
    try:
        corpus = make_corpus(root, args.files)
        output = os.path.join(root, "data")
        ours, beams = [], []
        for _ in range(args.repeats):
            seconds, count = timed(lambda: len(inputs.plan_read_tasks([corpus], 1 << 26, output=output)))
            assert count == args.files, count
            ours.append(seconds)
            seconds, count = timed(lambda: len(FileSystems.match([corpus + "/**"])[0].metadata_list))
            assert count == args.files, count
            beams.append(seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ours_s, beam_s = statistics.median(ours), statistics.median(beams)
    print(f"{args.files:,} files in 10 folders, median of {args.repeats} round(s), {platform.processor() or 'cpu'}:")
    print(f"  run_beam.py's listing and checks: {ours_s:6.2f} s  {args.files / ours_s:10,.0f} files/s")
    print(f"  Beam's FileSystems.match (no checks): {beam_s:6.2f} s  {args.files / beam_s:10,.0f} files/s")
    print(f"  ours / Beam's time: {ours_s / beam_s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
