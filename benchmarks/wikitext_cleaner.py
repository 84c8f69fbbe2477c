"""Markup cleaning: preprocessing/wikitext.py against mwparserfromhell's ``strip_code()``.

Reads the articles (namespace 0, not redirects) of both bundled Wikipedia samples,
cleans every one with each cleaner in this one process (so the figures are per core),
and prints the speed in MB/s of wikitext (UTF-8) and the markup left in the output,
per 10,000 characters of output. Each cleaner makes ``--passes`` passes and is timed by its
best one: the same rule for both (a warm pass against a cold one favoured ours by 2x).

    python benchmarks/wikitext_cleaner.py [--passes 3]
"""

from __future__ import annotations

import argparse
import bz2
import os
import re
import sys
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from preprocessing.wikitext import clean_wikitext  # noqa: E402

SAMPLES = [os.path.join(REPO, "preprocessing", "sample_data", name) for name in
           ("enwiki-sample-pages-articles.xml.bz2", "enwiki-table-markup.xml.bz2")]
NS = "{http://www.mediawiki.org/xml/export-0.10/}"

# Markup that should never reach the prose, counted in the output.
RESIDUE = {
    "{{": re.compile(r"\{\{"), "}}": re.compile(r"\}\}"),
    "[[": re.compile(r"\[\["), "]]": re.compile(r"\]\]"),
    "{|": re.compile(r"\{\|"), "|}": re.compile(r"\|\}"),
    "<ref": re.compile(r"<ref", re.I), "'''": re.compile(r"'''"),
    # a table row or template parameter: a line starting with | or !, or holding 2+ |
    "|-lines": re.compile(r"^[|!].*$|^[^\n|]*\|[^\n|]*\|.*$", re.M),
    "= headings": re.compile(r"^=+[^\n]*=[ \t]*$", re.M),
    # what is left of [[File:a.jpg|thumb|upright|caption]] and [[Category:X]]
    "thumb|/px| options": re.compile(r"\b(?:thumb|thumbnail|frameless|upright|\d+px)\|"),
    "Category:": re.compile(r"\bCategory:"),
}


def load_articles(path: str) -> list[str]:
    """The wikitext of the articles of one dump file."""
    texts = []
    with bz2.open(path, "rb") as f:
        for _, element in ET.iterparse(f):
            if element.tag != NS + "page":
                continue
            if element.findtext(NS + "ns") == "0" and element.find(NS + "redirect") is None:
                texts.append(element.findtext(f"{NS}revision/{NS}text") or "")
            element.clear()
    return texts


def time_cleaner(clean, texts: list[str], min_seconds: float, min_passes: int
                 ) -> tuple[float, list[str]]:
    """Seconds per pass over ``texts`` (best of the passes), and the outputs."""
    best, spent, passes = float("inf"), 0.0, 0
    while passes < min_passes or spent < min_seconds:
        start = time.perf_counter()
        outputs = [clean(text) for text in texts]
        elapsed = time.perf_counter() - start
        best, spent, passes = min(best, elapsed), spent + elapsed, passes + 1
    return best, outputs


def residue_per_10k(outputs: list[str]) -> dict[str, float]:
    chars = sum(map(len, outputs))
    return {name: 1e4 * sum(len(pattern.findall(o)) for o in outputs) / chars
            for name, pattern in RESIDUE.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3,
                        help="passes of each cleaner over the articles; each is timed by its best (default 3)")
    args = parser.parse_args(argv)
    if args.passes < 1:
        parser.error("--passes must be at least 1")

    import mwparserfromhell

    texts = [t for path in SAMPLES for t in load_articles(path)]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"{len(texts)} articles, {megabytes:.2f} MB of wikitext "
          f"(mwparserfromhell {mwparserfromhell.__version__}, "
          f"C tokenizer: {mwparserfromhell.parser.use_c}, Python {sys.version.split()[0]})")

    ours_s, ours = time_cleaner(clean_wikitext, texts, 0.0, args.passes)
    mwp_s, mwp = time_cleaner(lambda t: mwparserfromhell.parse(t).strip_code(), texts, 0.0, args.passes)
    print(f"{'':34s}{'ours':>12s}{'mwparserfromhell':>18s}")
    print(f"{'speed, MB/s':34s}{megabytes / ours_s:12.1f}{megabytes / mwp_s:18.2f}")
    print(f"{'output, MB':34s}{sum(len(o.encode()) for o in ours) / 1e6:12.2f}"
          f"{sum(len(o.encode()) for o in mwp) / 1e6:18.2f}")
    ours_res, mwp_res = residue_per_10k(ours), residue_per_10k(mwp)
    for name in RESIDUE:
        print(f"{name + ' per 10k chars':34s}{ours_res[name]:12.2f}{mwp_res[name]:18.2f}")
    print(f"speed ratio: ours is {mwp_s / ours_s:.1f}x faster")


if __name__ == "__main__":
    main()
