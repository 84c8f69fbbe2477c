"""The records that flow between the reading, cleaning and tokenizing steps."""

from __future__ import annotations

import dataclasses

import xxhash


@dataclasses.dataclass(frozen=True)
class RawDocument:
    """One document as read from its file, before any cleaning.

    ``doc_id`` is stable across reruns, worker counts and ``--split-bytes`` (file name,
    relative to the inputs' common folder, plus ``#page_id`` for wiki pages,
    ``@byte_offset`` for text and JSON lines, ``#row`` for Parquet): every random choice
    made for this document is seeded from it.
    """

    doc_id: str
    text: str
    # "wikitext" for MediaWiki pages (cleaned to prose first), "plain" otherwise.
    markup: str = "plain"
    title: str = ""
    # The dump's WikiSite (namespace names, language) for wikitext; None otherwise.
    site: object = None


@dataclasses.dataclass(frozen=True)
class Problem:
    """Input that could not be used: ``reason`` names the counter it is counted in,
    ``message`` names the file (and page or line) for the log."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class SentenceDocument:
    """A cleaned document: its sentences as text, in order."""

    doc_id: str
    sentences: tuple[str, ...]

    @property
    def key(self) -> int:
        return document_key(self.doc_id)


def document_key(doc_id: str) -> int:
    """A stable 64-bit key for a document id (never Python's salted ``hash()``)."""
    return xxhash.xxh3_64_intdigest(doc_id.encode("utf-8"))


def stable_hash(*parts: int | str) -> int:
    """A stable 64-bit hash of a few ints/strings, for keyed sampling decisions."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(str(part).encode("utf-8"))
        h.update(b"\x1f")
    return h.intdigest()
