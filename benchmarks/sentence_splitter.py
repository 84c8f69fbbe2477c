"""Sentence-splitter speed and agreement: preprocessing/sentences.py against pysbd and blingfire.

Splits Jane Austen's six novels (the bundled sample: paragraphs separated by blank
lines, each paragraph's wrapped lines joined with spaces) one paragraph per call, as
the pipeline's text reader hands them over, in this one process (so every figure is
per core), and prints MB/s (UTF-8 bytes in) for each splitter, its ratio to ours, and
how many sentences agree with pysbd's on the same paragraphs. Ours is also timed on
the whole corpus in one call ("\\n" between paragraphs). pysbd and blingfire are
optional (``pip install pysbd blingfire``); a missing one is skipped with a message.

    python benchmarks/sentence_splitter.py [--repeat 5] [--show-diffs 10]
"""

from __future__ import annotations

import argparse
import bz2
import collections
import os
import platform
import re
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from preprocessing.sentences import split_sentences  # noqa: E402

AUSTEN = os.path.join(REPO, "preprocessing", "sample_data", "austen-novels.txt.bz2")

Splitter = Callable[[str], list[str]]


def austen_paragraphs() -> list[str]:
    with bz2.open(AUSTEN, "rt", encoding="utf-8") as f:
        text = f.read()
    return [p for p in (" ".join(p.split()) for p in re.split(r"\n\s*\n", text)) if p]


def optional_splitters() -> dict[str, Splitter]:
    found: dict[str, Splitter] = {}
    try:
        import pysbd
        segmenter = pysbd.Segmenter(language="en", clean=False)
        found[f"pysbd {pysbd.__version__}"] = segmenter.segment
    except ImportError:
        print("pysbd not installed: skipped (pip install pysbd)")
    try:
        import blingfire
        from importlib.metadata import version
        found[f"blingfire {version('blingfire')}"] = lambda p: blingfire.text_to_sentences(p).split("\n")
    except ImportError:
        print("blingfire not installed: skipped (pip install blingfire)")
    return found


def stripped(sentences_per_paragraph: list[list[str]]) -> list[list[str]]:
    return [[s.strip() for s in out if s.strip()] for out in sentences_per_paragraph]


def seconds_per_pass(run: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def agreement(ours: list[list[str]], reference: list[list[str]]) -> tuple[int, int, int]:
    """(sentences identical in both, ours, reference), matched per paragraph."""
    same = sum(sum((collections.Counter(a) & collections.Counter(b)).values())
               for a, b in zip(ours, reference))
    return same, sum(map(len, ours)), sum(map(len, reference))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed passes per fast splitter; best is kept")
    parser.add_argument("--show-diffs", type=int, default=0, metavar="N",
                        help="print the first N paragraphs where ours and pysbd differ")
    args = parser.parse_args(argv)

    paragraphs = austen_paragraphs()
    mb = sum(len(p.encode()) for p in paragraphs) / 1e6
    whole = "\n".join(paragraphs)
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"Austen: {len(paragraphs):,} paragraphs, {mb:.2f} MB")

    ours = stripped([split_sentences(p) for p in paragraphs])
    assert [s for p in ours for s in p] == split_sentences(whole), "per-paragraph and whole-text runs differ"
    ours_s = seconds_per_pass(lambda: [split_sentences(p) for p in paragraphs], args.repeat)
    whole_s = seconds_per_pass(lambda: split_sentences(whole), args.repeat)
    # "ours faster": how many times the splitter's time ours is, per paragraph.
    print(f"{'splitter':<18}{'MB/s':>8}{'ours faster':>13}{'sentences':>11}")
    print(f"{'ours':<18}{mb / ours_s:8.2f}{1:12.2f}x{sum(map(len, ours)):11,}")
    print(f"{'ours, one call':<18}{mb / whole_s:8.2f}{whole_s / ours_s:12.2f}x")

    results = {}
    for name, split in optional_splitters().items():
        # pysbd takes ~13 s a pass: its one timed pass is the one that gives its output.
        start = time.perf_counter()
        raw = [split(p) for p in paragraphs]
        seconds = time.perf_counter() - start
        if not name.startswith("pysbd"):
            seconds = min(seconds, seconds_per_pass(lambda: [split(p) for p in paragraphs], args.repeat))
        results[name] = stripped(raw)
        print(f"{name:<18}{mb / seconds:8.2f}{seconds / ours_s:12.1f}x{sum(map(len, results[name])):11,}")

    pysbd_name = next((n for n in results if n.startswith("pysbd")), None)
    if pysbd_name is None:
        print("agreement with pysbd: skipped (pysbd not installed)")
        return
    # pysbd never splits between double quotes (its "between punctuation" rule), so in
    # Austen's dialogue it keeps whole speeches as one sentence: agreement is also given
    # on the paragraphs without a double quote.
    reference = results[pysbd_name]
    unquoted = [i for i, p in enumerate(paragraphs) if '"' not in p]
    for name, got in [("ours", ours)] + [(n, r) for n, r in results.items() if n != pysbd_name]:
        for where, keep in [("all paragraphs", range(len(paragraphs))),
                            (f"{len(unquoted):,} paragraphs without '\"'", unquoted)]:
            same, n_got, n_ref = agreement([got[i] for i in keep], [reference[i] for i in keep])
            print(f"{name} vs {pysbd_name}, {where}: {same / n_ref:.1%} of pysbd's {n_ref:,} sentences "
                  f"identical ({same / n_got:.1%} of {name}'s {n_got:,})")
    shown = 0
    for paragraph, a, b in zip(paragraphs, ours, reference):
        if shown >= args.show_diffs:
            break
        if a != b:
            shown += 1
            print(f"\n--- {paragraph[:100]!r}...\n  ours:  {a}\n  pysbd: {b}")


if __name__ == "__main__":
    main()
