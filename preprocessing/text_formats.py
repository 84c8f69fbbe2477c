"""Readers for plain text, JSON lines and Parquet corpora.

Each reader streams its file and yields ``RawDocument``s, or a ``Problem`` for input
it had to skip (counted by the pipeline, logged with file and line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import BinaryIO

import pyarrow.parquet as pq

from preprocessing.documents import Problem, RawDocument

_READ_CHUNK = 1 << 20


class InputError(ValueError):
    """Input that cannot be read at all (e.g. a Parquet file without the text column)."""


def iter_lines(f: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yields ``(line_number, line)`` from 1, without the newline.

    A line longer than ``max_line_bytes`` is yielded as ``None`` and never held in
    memory whole: a 50 MB line of garbage costs 1 MiB of buffer, not 50 MB.
    """
    line_no = 0
    pending = b""
    oversized = False
    # read1: returns what one decompression step gives, so a truncated .gz/.bz2
    # loses only its last piece, not the whole buffered megabyte.
    read = getattr(f, "read1", f.read)
    while chunk := read(_READ_CHUNK):
        start = 0
        while (newline := chunk.find(b"\n", start)) >= 0:
            line_no += 1
            if oversized or len(pending) + newline - start > max_line_bytes:
                yield line_no, None
            else:
                yield line_no, pending + chunk[start:newline]
            pending, oversized, start = b"", False, newline + 1
        if not oversized:
            pending += chunk[start:]
            if len(pending) > max_line_bytes:
                pending, oversized = b"", True
    if pending or oversized:
        yield line_no + 1, None if oversized else pending


def _decode(line: bytes, path: str, line_no: int) -> tuple[str, Problem | None]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return line.decode("utf-8", errors="replace"), Problem(
            "invalid-utf8-lines",
            f"{path}:{line_no}: invalid UTF-8 at byte {err.start}; bad bytes replaced with U+FFFD")


def _oversized(path: str, line_no: int, max_line_bytes: int) -> Problem:
    return Problem("oversized-lines",
                   f"{path}:{line_no}: line longer than --max-line-bytes={max_line_bytes:,}; skipped")


def read_text(f: BinaryIO, path: str, max_line_bytes: int) -> Iterator[RawDocument | Problem]:
    """Google's corpus format: documents separated by blank lines.

    Lines of a document are joined with spaces (Google's files have one sentence per
    line; wrapped prose like Project Gutenberg books has one paragraph per block):
    the sentence splitter then finds the sentences either way.
    """
    name = os.path.basename(path)
    lines: list[str] = []
    first_line = 0
    for line_no, raw in iter_lines(f, max_line_bytes):
        if raw is None:
            yield _oversized(path, line_no, max_line_bytes)
            continue
        text, problem = _decode(raw, path, line_no)
        if problem:
            yield problem
        text = text.strip()
        if text:
            if not lines:
                first_line = line_no
            lines.append(text)
        elif lines:
            yield RawDocument(f"{name}:{first_line}", " ".join(lines))
            lines = []
    if lines:
        yield RawDocument(f"{name}:{first_line}", " ".join(lines))


def read_jsonl(f: BinaryIO, path: str, text_field: str, max_line_bytes: int
               ) -> Iterator[RawDocument | Problem]:
    """One JSON object per line; the document is its ``text_field`` string."""
    name = os.path.basename(path)
    for line_no, raw in iter_lines(f, max_line_bytes):
        if raw is None:
            yield _oversized(path, line_no, max_line_bytes)
            continue
        if not raw.strip():
            continue
        text, problem = _decode(raw, path, line_no)
        if problem:
            yield problem
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield Problem("jsonl-parse-errors", f"{path}:{line_no}: not valid JSON ({err}); skipped")
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            what = "has no" if not isinstance(record, dict) or text_field not in record else "has a non-string"
            yield Problem("jsonl-missing-text-field",
                          f"{path}:{line_no}: row {what} {text_field!r} field (see --text-field); skipped")
            continue
        yield RawDocument(f"{name}:{line_no}", value)


def check_parquet_column(f: BinaryIO, path: str, text_field: str) -> None:
    """Fails early, naming the file and its columns, when the text column is missing."""
    columns = pq.ParquetFile(f).schema_arrow.names
    if text_field not in columns:
        raise InputError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); "
                         "pass the right one with --text-field")


def read_parquet(f: BinaryIO, path: str, text_field: str) -> Iterator[RawDocument | Problem]:
    """Rows of a Parquet file; the document is the ``text_field`` column."""
    check_parquet_column(f, path, text_field)
    name = os.path.basename(path)
    row = 0
    for batch in pq.ParquetFile(f).iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield RawDocument(f"{name}:{row}", value)
            else:
                yield Problem("parquet-null-text", f"{path}: row {row} has no {text_field!r} text; skipped")
            row += 1
