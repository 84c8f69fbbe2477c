"""Derive ``austen-chapters.txt.bz2``, the default run's text corpus, from ``austen-novels.txt.bz2``.

    python preprocessing/sample_data/derive_austen_chapters.py

``austen-novels.txt.bz2`` separates *paragraphs* by blank lines, and in the plain-text input
format a blank line ends a document: read as it is, each paragraph is a document of about five
sentences, too short to split into the two segments of a next-sentence pair, and two thirds of
the examples got a random next segment (the recipe aims at half). Here a document is a chapter:
its paragraphs, one per line (wrapped lines joined with a space), and a blank line between
chapters. Title pages, volume headings, "THE END", the authoress's advertisement and the note
on the text are left out; the text is otherwise unchanged. Deterministic: the same input gives
byte-identical output (bz2 level 9).
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
# A chapter starts at its heading ("CHAPTER I", "Chapter 1", "CHAPTER 1"); anything else in
# capitals alone on a line ends the chapter before it (titles, volumes, "FINIS", "THE END", the
# note on the text): the novels' own headings, found by `grep -E '^[A-Z][A-Z ,.&]+$'`.
CHAPTER = re.compile(r"^(?:CHAPTER|Chapter) (?:[IVXLC]+|\d+)\.?$")
NOT_TEXT = re.compile(r"^(?:VOLUME [IVX]+|FINIS|THE END|A NOTE ON THE TEXT|ADVERTISEMENT BY THE AUTHORESS.*"
                      r"|EMMA|MANSFIELD PARK|NORTHANGER ABBEY|PERSUASION|Persuasion|PRIDE AND PREJUDICE"
                      r"|SENSE AND SENSIBILITY)$")


def chapters(text: str) -> list[list[str]]:
    """Each chapter's paragraphs, each paragraph's wrapped lines joined."""
    found, current, paragraph = [], None, []

    def end_paragraph():
        if current is not None and paragraph:
            current.append(" ".join(paragraph))
        paragraph.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if CHAPTER.match(stripped) or NOT_TEXT.match(stripped):
            end_paragraph()
            current = [] if CHAPTER.match(stripped) else None
            if current is not None:
                found.append(current)
        elif not stripped:
            end_paragraph()
        else:
            paragraph.append(stripped)
    end_paragraph()
    return [chapter for chapter in found if chapter]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=os.path.join(HERE, "austen-novels.txt.bz2"))
    p.add_argument("--out", default=os.path.join(HERE, "austen-chapters.txt.bz2"))
    args = p.parse_args(argv)
    with bz2.open(args.source, "rt", encoding="utf-8") as f:
        found = chapters(f.read())
    data = ("\n\n".join("\n".join(chapter) for chapter in found) + "\n").encode("utf-8")
    packed = bz2.compress(data, 9)
    with open(args.out, "wb") as f:
        f.write(packed)
    paragraphs = sum(len(c) for c in found)
    print(f"{args.out}: {len(found)} chapters, {paragraphs:,} paragraphs, {len(data):,} B UTF-8, "
          f"{len(packed):,} B bz2, sha256 {hashlib.sha256(packed).hexdigest()}")


if __name__ == "__main__":
    main()
