"""Readers for plain text, JSON lines and Parquet corpora.

Each reader streams its input and yields ``RawDocument``s, or a ``Problem`` for input
it had to skip (counted by the pipeline, logged with file and place).

Reading a part of a file. Text and JSON-lines readers take a byte range
``[start, end)`` and read exactly the documents that *begin* in it (Hadoop's rule): a
range that starts mid-file first skips to the first document boundary at or after
``start``, and a range reads on past ``end`` to finish the document it began before
``end``. Every document is therefore read once whatever the cut points, and the ranges
of a file read, in start order, exactly what one reader of the whole file reads. The
boundaries are line starts for JSON lines and, for text, line starts that follow a
blank line (or the file start), and in a long run without blank lines, the cuts of
``_is_forced_boundary``. Parquet files are read by runs of row groups.

Ids and places do not depend on how a file was cut: a text or JSON-lines document is
``name@offset``, the byte offset of its first byte in the file (in the decompressed
stream for a .gz/.bz2 file), and a Parquet row is ``name#row``, its index in the whole
file (``name``: see ``inputs.document_names``). A problem is placed by file and byte
offset, plus the line number when reading began at byte 0 (only there is the line
number known without reading from the start):
``path: line 12 (byte 3456): ...`` or ``path: byte 3456: ...``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.documents import Problem, RawDocument
from preprocessing.language import UNSPACED_SCRIPT

_READ_CHUNK = 1 << 20
# A small range reads in smaller pieces, so that a 64 KiB range does not read 1 MiB.
_MIN_READ_CHUNK = 1 << 16
# Step of the backward search for the start of the line before a range.
_BACKWARD_STEP = 1 << 16
# A text document with no blank line is cut into pieces of at most twice this size:
# far beyond any real paragraph or article, so only a file that lacks document
# separators is cut, and a bucket of such documents stays a few MiB. A byte size, not
# a line count: a reader starting mid-file finds byte offsets without reading from the
# document's start (see _is_forced_boundary).
MAX_DOCUMENT_BYTES = 1 << 20


class InputError(ValueError):
    """Input that cannot be read at all (e.g. a Parquet file without the text column)."""


def iter_lines(f: BinaryIO, max_line_bytes: int, offset: int = 0, chunk_bytes: int = _READ_CHUNK
               ) -> Iterator[tuple[int, int, bytes | None]]:
    """Yields ``(line_number, offset, line)`` without the newline, reading ``f`` from
    its current position, which is byte ``offset`` of the file.

    Line numbers count from 1 at that position: they are the file's only when reading
    began at byte 0. ``offset`` is the byte offset of the line's first byte.

    A line longer than ``max_line_bytes`` is yielded as ``None`` and never held in
    memory whole: a 50 MB line of garbage costs 1 MiB of buffer, not 50 MB. A UTF-8
    byte-order mark at the file's first byte (Notepad, Excel) is not part of the first line:
    it made a jsonl file's first row invalid JSON, and a text's first word "\ufeffThe".
    """
    for line_no, at, line in _iter_lines(f, max_line_bytes, offset, chunk_bytes):
        if at == 0 and line is not None and line.startswith(_BOM):
            line = line[len(_BOM):]
        yield line_no, at, line


_BOM = b"\xef\xbb\xbf"


def _iter_lines(f: BinaryIO, max_line_bytes: int, offset: int, chunk_bytes: int
                ) -> Iterator[tuple[int, int, bytes | None]]:
    line_no = 0
    line_at = chunk_at = offset
    pending = b""
    oversized = False
    # read1: returns what one decompression step gives, so a truncated .gz/.bz2
    # loses only its last piece, not the whole buffered megabyte.
    read = getattr(f, "read1", f.read)
    while chunk := read(chunk_bytes):
        start = 0
        while (newline := chunk.find(b"\n", start)) >= 0:
            line_no += 1
            if oversized or len(pending) + newline - start > max_line_bytes:
                yield line_no, line_at, None
            else:
                yield line_no, line_at, pending + chunk[start:newline]
            pending, oversized, start = b"", False, newline + 1
            line_at = chunk_at + start
        if not oversized:
            pending += chunk[start:]
            if len(pending) > max_line_bytes:
                pending, oversized = b"", True
        chunk_at += len(chunk)
    if pending or oversized:
        yield line_no + 1, line_at, None if oversized else pending


def _chunk_bytes(start: int, end: float) -> int:
    return int(min(_READ_CHUNK, max(_MIN_READ_CHUNK, end - start)))


def _range_end(end: int | None) -> float:
    """``end`` of a range, with None or a negative value meaning the end of the file."""
    return math.inf if end is None or end < 0 else end


class _Places:
    """Writes where a problem is: file, line number when known, byte offset."""

    def __init__(self, path: str, line_numbers_known: bool):
        self.path, self.line_numbers_known = path, line_numbers_known

    def __call__(self, line_no: int, offset: int) -> str:
        if self.line_numbers_known:
            return f"{self.path}: line {line_no} (byte {offset})"
        return f"{self.path}: byte {offset}"


def _decode(line: bytes, place: _Places, line_no: int, offset: int) -> tuple[str, Problem | None]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return line.decode("utf-8", errors="replace"), Problem(
            "invalid-utf8-lines",
            f"{place(line_no, offset + err.start)}: invalid UTF-8; bad bytes replaced with U+FFFD")


def _oversized(place: _Places, line_no: int, offset: int, max_line_bytes: int) -> Problem:
    return Problem("oversized-lines",
                   f"{place(line_no, offset)}: line longer than --max-line-bytes={max_line_bytes:,}; skipped")


def _start_of_line_before(f: BinaryIO, start: int, max_line_bytes: int) -> int:
    """Where a text reader of the range at ``start`` begins, so that it classifies the
    line holding byte ``start - 1`` (blank or not: whether a document can begin at the
    next line) exactly as a reader of the whole file does.

    That is the line's first byte; for a line longer than ``max_line_bytes``, a byte in
    it more than ``max_line_bytes`` before its end, so that it is still read as an
    oversized line (never blank) while the search back stays bounded.
    """
    if start == 0:
        return 0
    floor = max(0, start - 1 - max_line_bytes - 1)
    found = _line_start(f, start - 1, floor)
    return floor if found is None else found


def _line_start(f: BinaryIO, last: int, lowest: int) -> int | None:
    """The first byte of the line holding byte ``last``, searched back to byte ``lowest``:
    0 at the file's start, None when that line began before ``lowest``."""
    high = last
    while high > lowest:
        low = max(lowest, high - _BACKWARD_STEP)
        f.seek(low)
        newline = f.read(high - low).rfind(b"\n")
        if newline >= 0:
            return low + newline + 1
        high = low
    return 0 if lowest == 0 else None


def _is_blank(raw: bytes | None) -> bool:
    # The same test as read_text's (decoded, then stripped), so that a range and a
    # reader of the whole file agree on where documents begin.
    return raw is not None and not raw.decode("utf-8", errors="replace").strip()


def join_lines(lines: list[str]) -> str:
    """A document's lines as one text: joined with a space, as wrapped prose needs, but not
    between two characters of a script written without spaces. Chinese or Japanese wrapped
    across lines got a space inside a word or sentence (17% of the Chinese sample's
    sentences), which SentencePiece then reads as a word boundary."""
    pieces = [lines[0]]
    for before, line in zip(lines, lines[1:]):
        if not (UNSPACED_SCRIPT.match(before[-1]) and UNSPACED_SCRIPT.match(line[0])):
            pieces.append(" ")
        pieces.append(line)
    return "".join(pieces)


def read_text(f: BinaryIO, path: str, max_line_bytes: int, start: int = 0, end: int | None = None,
              max_document_bytes: int = MAX_DOCUMENT_BYTES, name: str | None = None
              ) -> Iterator[RawDocument | Problem]:
    """Google's corpus format: documents separated by blank lines.

    Lines of a document are joined with spaces, none between two Chinese or Japanese
    characters (``join_lines``; Google's files have one sentence per line; wrapped prose
    like Project Gutenberg books has one paragraph per block): the sentence splitter then
    finds the sentences where they end with punctuation. Reads the documents
    that begin in ``[start, end)`` (``f`` must be seekable when ``start > 0``). A line
    longer than ``max_line_bytes`` is skipped but does not end its document; a
    document too long is cut (see ``_is_forced_boundary``), each cut counted under
    ``split-long-documents``.
    """
    name = name or os.path.basename(path)
    end = _range_end(end)
    scan_from = _text_scan_start(f, start, max_line_bytes, max_document_bytes)
    if start > 0:
        f.seek(scan_from)
    place = _Places(path, line_numbers_known=scan_from == 0)
    lines = iter_lines(f, max_line_bytes, scan_from, _chunk_bytes(start, end))
    parts: list[str] = []
    doc_at = 0
    reading = False  # from the first document boundary at or after ``start``
    for line_no, offset, raw, boundary in _text_boundaries(lines, scan_from, max_document_bytes):
        if not reading:
            # The lines before belong to the previous range, which reports their problems.
            if not boundary or offset < start:
                continue
            reading = True
        if boundary == "forced" and parts:
            # Reported by the range that held the document cut, so once.
            yield RawDocument(f"{name}@{doc_at}", join_lines(parts))
            parts = []
            yield Problem("split-long-documents",
                          f"{place(line_no, offset)}: no blank line for {max_document_bytes:,} bytes; "
                          "the document is cut here")
        if boundary and offset >= end:
            break  # a document beginning here belongs to the next range
        if raw is None:
            yield _oversized(place, line_no, offset, max_line_bytes)
            continue
        text, problem = _decode(raw, place, line_no, offset)
        if problem:
            yield problem
        text = text.strip()
        if text:
            if not parts:
                doc_at = offset
            parts.append(text)
        elif parts:
            yield RawDocument(f"{name}@{doc_at}", join_lines(parts))
            parts = []
    if parts:
        yield RawDocument(f"{name}@{doc_at}", join_lines(parts))


def _text_scan_start(f: BinaryIO, start: int, max_line_bytes: int, max_document_bytes: int) -> int:
    """Where a text reader of the range at ``start`` begins: early enough to classify
    the line holding byte ``start - 1`` (is a document boundary next?) and to see every
    blank line of the window before the first multiple of ``max_document_bytes`` that
    can force a boundary at or after ``start`` (see ``_is_forced_boundary``). That
    window costs a read of less than ``max_document_bytes`` before ``start``, or two
    windows when an oversized line holds byte ``start - 1``."""
    if start == 0:
        return 0
    floor = max(0, start - 1 - max_line_bytes - 1)
    line_before = _line_start(f, start - 1, floor)
    if line_before is None:
        # An oversized line holds byte start - 1. Whether a document is cut after it
        # depends on where it began (the multiples it straddles, and whether it or a line
        # before it began a document in the window): the first range past its beginning
        # must know, or a document is read twice or lost. That beginning matters only
        # down to the window before the multiple at or below ``floor``; a line that began
        # earlier covers the whole window, and a byte of it there is as good a start.
        lowest = max(0, floor // max_document_bytes * max_document_bytes - max_document_bytes)
        line_before = _line_start(f, floor, lowest)
        if line_before is None:
            return lowest
    if line_before == 0:
        return 0
    window = line_before // max_document_bytes * max_document_bytes
    return min(line_before, _start_of_line_before(f, window + 1, max_line_bytes))


def _text_boundaries(lines: Iterator[tuple[int, int, bytes | None]], scan_from: int,
                     max_document_bytes: int) -> Iterator[tuple[int, int, bytes | None, str | None]]:
    """Each line with whether a document may begin at its first byte: "natural" (the
    file start, or the line after a blank one), "forced" or None."""
    last_natural = 0 if scan_from == 0 else -math.inf
    previous_at, previous_blank = None, scan_from == 0
    for line_no, offset, raw in lines:
        boundary = None
        if previous_blank:
            boundary, last_natural = "natural", offset
        elif previous_at is not None and _is_forced_boundary(previous_at, offset, raw, last_natural,
                                                             max_document_bytes):
            boundary = "forced"
        yield line_no, offset, raw, boundary
        previous_at, previous_blank = offset, _is_blank(raw)


def _is_forced_boundary(previous_at: int, offset: int, raw: bytes | None, last_natural: float,
                        max_document_bytes: int) -> bool:
    """Whether a long document is cut at this line, which starts at ``offset``.

    Without a cut, a file with no blank line would be one document held whole in
    memory. The cut is at the first line start at or after a multiple ``m`` of
    ``max_document_bytes`` when no document began naturally in the window
    ``(m - max_document_bytes, m]``, unless the line is blank (the document ends
    there anyway). The rule looks at that window only, never at where the document
    began (maybe gigabytes back), so a reader starting anywhere finds the same cuts.
    A long run is cut at every multiple, into pieces of at most two windows (plus a
    line); a document shorter than a window is never cut.
    """
    m = offset // max_document_bytes * max_document_bytes
    return m > max(previous_at, 0) and last_natural <= m - max_document_bytes and not _is_blank(raw)


def read_jsonl(f: BinaryIO, path: str, text_field: str, max_line_bytes: int,
               start: int = 0, end: int | None = None, name: str | None = None
               ) -> Iterator[RawDocument | Problem]:
    """One JSON object per line; the document is its ``text_field`` string.

    Reads the lines that begin in ``[start, end)`` (``f`` must be seekable when
    ``start > 0``).
    """
    name = name or os.path.basename(path)
    end = _range_end(end)
    # From the byte before ``start``: the (partial) line read first ends there or later
    # and belongs to the previous range; the next line is the first that begins at or
    # after ``start``.
    scan_from = max(0, start - 1)
    if start > 0:
        f.seek(scan_from)
    place = _Places(path, line_numbers_known=scan_from == 0)
    lines = iter_lines(f, max_line_bytes, scan_from, _chunk_bytes(start, end))
    if start > 0:
        next(lines, None)
    for line_no, offset, raw in lines:
        if offset >= end:
            return
        if raw is None:
            yield _oversized(place, line_no, offset, max_line_bytes)
            continue
        if not raw.strip():
            continue
        if offset == 0 and raw.lstrip().startswith(b"["):  # (iter_lines drops a byte-order mark)
            # One JSON array (often pretty-printed): every line of it would be a counted parse error.
            raise _json_array(path)
        text, problem = _decode(raw, place, line_no, offset)
        if problem:
            yield problem
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield Problem("jsonl-parse-errors", f"{place(line_no, offset)}: not valid JSON ({err}); skipped")
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            if not isinstance(record, dict):  # a JSON array or a bare value: no field to read
                what = f"is a JSON {type(record).__name__ if record is not None else 'null'}, not an object with a"
            else:
                what = "has no" if text_field not in record else "has a non-string"
            yield Problem("jsonl-missing-text-field", f"{place(line_no, offset)}: row {what} "
                                                      f"{text_field!r} field (see --text-field); skipped")
            continue
        if _SURROGATE_ESCAPE.search(text):  # json.loads takes "\\ud800" alone, which no UTF-8 can hold
            fixed = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            if fixed != value:
                yield Problem("invalid-unicode-escapes", f"{place(line_no, offset)}: an unpaired surrogate escape "
                                                         f"in {text_field!r}; replaced with U+FFFD")
                value = fixed
        yield RawDocument(f"{name}@{offset}", value)


# A JSON escape of a UTF-16 surrogate: paired ones make one character, a lone one is not text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _json_array(path: str) -> InputError:
    """A .jsonl file that is one JSON array, with the command that converts it."""
    return InputError(f"{path}: a JSON array, not JSON lines (one object per line); convert it, e.g. "
                      f"{_jq_command(os.path.basename(path))}")


def _jq_command(file: str, program: str = ".[]") -> str:
    """The jq command that writes a JSON array's elements (or ``program``'s output) as JSON lines;
    jq reads no compressed file, so one is decompressed into it."""
    stem, reader = _decompressed(file)
    stem = stem.removesuffix(".jsonl").removesuffix(".json")
    out = f"{stem}.jsonl" if f"{stem}.jsonl" != file else f"{stem}.lines.jsonl"  # never > its own input
    if reader:
        return f"{reader} {file} | jq -c '{program}' > {out}"
    return f"jq -c '{program}' {file} > {out}"


# The command that writes a compressed input's bytes to stdout, by its suffix.
COMPRESSED_READERS = ((".gz", "zcat"), (".bz2", "bzcat"), (".xz", "xzcat"), (".zst", "zstdcat"))


def _decompressed(name: str) -> tuple[str, str | None]:
    """``name`` without its compression suffix, and the command that decompresses it (None if plain)."""
    for ext, tool in COMPRESSED_READERS:
        if name.lower().endswith(ext):
            return name[:-len(ext)], tool
    return name, None


def _flatten_command(file: str, field: str, example) -> str:
    """jq that makes a nested ``field`` a top-level "text": a list's strings joined by lines, an
    object's first string member (by the first row's example)."""
    path = f".{json.dumps(field)}"  # quoted: a name such as "my-field" is no jq identifier
    if isinstance(example, list):
        return _jq_command(file, f'{{text: ({path} | map(tostring) | join("\\n"))}}')
    # its "text" member, else its longest string (an id is shorter than the text beside it)
    strings = {k: v for k, v in example.items() if isinstance(v, str)}
    member = "text" if "text" in strings or not strings else max(strings, key=lambda k: len(strings[k]))
    return _jq_command(file, f"{{text: {path}.{json.dumps(member)}}}")


def _check_column(parquet: pq.ParquetFile, path: str, text_field: str) -> None:
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        # repr: a name with a byte-order mark (pandas' read_csv of a BOM'd csv) shows as what it is
        raise InputError(f"{path}: no column {text_field!r} (columns: {', '.join(map(repr, columns))}); "
                         "pass the right one with --text-field")
    kind = parquet.schema_arrow.field(text_field).type
    if not _holds_text(kind):  # else every row was skipped as missing its text
        strings = [f.name for f in parquet.schema_arrow if _holds_text(f.type)]
        raise InputError(f"{path}: column {text_field!r} holds {kind}, not text (text columns: "
                         f"{', '.join(strings) or 'none'}); pass one with --text-field")


def _holds_text(kind: pa.DataType) -> bool:
    """A string column, however Arrow stores it: plain, large, a view, or dictionary-encoded
    (pandas' Categorical written with to_parquet); or binary, read as UTF-8: strings written
    without Parquet's UTF8 annotation (Spark, Hive)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind)) or pa.types.is_binary(
        kind) or pa.types.is_large_binary(kind)


def open_parquet(f: BinaryIO, path: str) -> pq.ParquetFile:
    """The file's footer read, or an InputError naming the file: a file that is not
    Parquet or lost its end (truncated copy) would otherwise be a pyarrow traceback."""
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({_one_line(err)})") from None


HEAD_ROWS = 100  # rows of a jsonl file read before the pipeline starts
ENCODING_HEAD_BYTES = 4096


# How far a head with CRs but no LF is read for one: a line longer than this (--max-line-bytes'
# default) is dropped anyway, so CRs alone that far are line ends, not a long line's stray CRs.
CR_ONLY_BYTES = 1 << 20


def _iconv_command(path: str, encoding: str) -> str:
    """iconv that writes ``path``'s text as UTF-8 to a file of the same input format (a compressed
    one decompressed first: iconv reads its bytes as they are)."""
    reader = _decompressed(path)[1]
    out = _converted_name(path, "utf8")
    if reader:
        return f"{reader} {path} | iconv -f {encoding} -t UTF-8 > {out}"
    return f"iconv -f {encoding} -t UTF-8 {path} > {out}"


def _converted_name(path: str, mark: str) -> str:
    """The name of ``path``'s converted, uncompressed copy, in the same input format:
    notes.txt.gz -> notes.MARK.txt."""
    stem = _decompressed(os.path.basename(path))[0]
    base, dot, ext = stem.rpartition(".")
    return f"{base}.{mark}.{ext}" if dot else f"{stem}.{mark}.txt"


def check_encoding_head(f: BinaryIO, path: str) -> None:
    """Refuses, naming the file, text that is not UTF-8 in a way no line-by-line count would
    show: UTF-16 or UTF-32 (Notepad's "Unicode", PowerShell's ">") read as UTF-8 gives ASCII
    with a NUL between the letters, which has no blank line or sentence end to split at, and
    would be trained on as garbage."""
    head = f.read(ENCODING_HEAD_BYTES)
    convert = f"convert it to UTF-8 first ({_iconv_command(path, 'UTF-16')})"
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):  # before UTF-16's, which it begins with
        raise InputError(f"{path}: UTF-32 text (it begins with a UTF-32 byte-order mark), not UTF-8: convert it to "
                         f"UTF-8 first ({_iconv_command(path, 'UTF-32')})")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{path}: UTF-16 text (it begins with a UTF-16 byte-order mark), not UTF-8: {convert}")
    # Classic Mac OS line ends (CR alone): read by "\n", the whole file was one line, its paragraphs
    # and documents merged (or, past --max-line-bytes, dropped as one oversized line).
    if b"\n" not in head and head.count(b"\r") >= 2 and b"\n" not in f.read(CR_ONLY_BYTES):
        reader, out = _decompressed(path)[1], _converted_name(path, "lf")
        convert = f"{reader} {path} | tr '\\r' '\\n' > {out}" if reader else f"tr '\\r' '\\n' < {path} > {out}"
        raise InputError(f"{path}: its lines end in CR alone (classic Mac OS), not LF or CRLF: convert them "
                         f"first, e.g. {convert}")
    # UTF-16 or UTF-32 of Latin text has a NUL in every second or more of its bytes; a stray NUL or
    # two in UTF-8 text (a bad export) stopped the run, though SentencePiece's normalization drops it.
    nuls = head.count(b"\x00")
    if nuls and nuls * 8 >= len(head):
        raise InputError(f"{path}: NUL bytes in its first {len(head):,} bytes ({nuls:,} of them): UTF-16 or UTF-32 "
                         f"text without a byte-order mark, or not text at all; if it is UTF-16, {convert}")
_HEAD_LINE_BYTES = 1 << 20


def check_jsonl_head(f: BinaryIO, path: str, text_field: str) -> None:
    """Fails early, naming the file and the fields its rows have, when none of its first
    ``HEAD_ROWS`` non-blank lines is an object with the field ``text_field`` (a wrong --text-field
    left the whole file out, each row a counted skip, the run otherwise a success), or when it
    is one JSON array. Checked before the previous output is deleted."""
    fields: dict[str, None] = {}
    rows = objects = nested = 0
    example = None  # the first nested value, for the flattening command
    while rows < HEAD_ROWS:
        raw = f.readline(_HEAD_LINE_BYTES)
        if not raw:
            break
        if not raw.endswith(b"\n") and len(raw) == _HEAD_LINE_BYTES:
            return  # an oversized line: the pipeline counts it
        raw = raw.removeprefix(b"\xef\xbb\xbf") if rows == 0 else raw
        if not raw.strip():
            continue
        if rows == 0 and raw.lstrip().startswith(b"["):
            raise _json_array(path)
        rows += 1
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            objects += 1
            if text_field in record and not isinstance(record[text_field], (dict, list)):
                return  # a string, or a null or number the pipeline counts as a skip
            if text_field in record:
                nested += 1
                example = record[text_field] if example is None else example
            fields.update(dict.fromkeys(record))
    if nested:
        raise InputError(f"{path}: field {text_field!r} holds an object or a list, not text, in its first {rows} rows "
                         "(a nested field is not read): name a top-level text field with --text-field, or flatten "
                         f"it first, e.g. {_flatten_command(os.path.basename(path), text_field, example)}")
    if objects:
        shown = ", ".join(map(repr, list(fields)[:10])) + (" …" if len(fields) > 10 else "")
        raise InputError(f"{path}: none of its first {rows} rows has a {text_field!r} field (their fields: "
                         f"{shown or 'none'}); name the text's field with --text-field")
    if rows:
        raise InputError(f"{path}: none of its first {rows} lines is a JSON object; a .jsonl file holds one object "
                         "per line")


def check_parquet_column(f: BinaryIO, path: str, text_field: str) -> None:
    """Fails early, naming the file and its columns, when the text column is missing."""
    _check_column(open_parquet(f, path), path, text_field)


def parquet_row_group_runs(f: BinaryIO, path: str, split_bytes: int) -> list[tuple[int, int, int]]:
    """``(first, end, stored_bytes)`` for runs of consecutive row groups of at most
    ``split_bytes`` compressed bytes (from the footer), or of one bigger row group."""
    metadata = open_parquet(f, path).metadata
    runs: list[tuple[int, int, int]] = []
    first, size = 0, 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        group_size = sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))
        if group > first and size + group_size > split_bytes:
            runs.append((first, group, size))
            first, size = group, 0
        size += group_size
    if metadata.num_row_groups:
        runs.append((first, metadata.num_row_groups, size))
    return runs


def read_parquet(f: BinaryIO, path: str, text_field: str, first_group: int = 0,
                 end_group: int | None = None, name: str | None = None) -> Iterator[RawDocument | Problem]:
    """Rows of the row groups ``[first_group, end_group)`` of a Parquet file (to the
    last when ``end_group`` is None or negative); the document is the ``text_field``
    column.

    A row group that cannot be read is an InputError naming the file and the group,
    not a skip: Parquet is written by a program, so a damaged one is a bad copy to
    fetch again, and going on would quietly train on part of it.
    """
    parquet = open_parquet(f, path)
    _check_column(parquet, path, text_field)
    metadata = parquet.metadata
    last = metadata.num_row_groups if end_group is None or end_group < 0 else end_group
    name = name or os.path.basename(path)
    row = sum(metadata.row_group(g).num_rows for g in range(first_group))  # index in the whole file
    for group in range(first_group, last):
        for value in _row_group_texts(parquet, path, text_field, group):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield Problem("invalid-utf8-rows", f"{path}: row {row}'s {text_field!r} is not UTF-8 text "
                                                       f"(byte {err.start}); skipped")
                    row += 1
                    continue
            if isinstance(value, str):
                yield RawDocument(f"{name}#{row}", value)
            else:
                yield Problem("parquet-null-text", f"{path}: row {row} has no {text_field!r} text; skipped")
            row += 1


def _row_group_texts(parquet: pq.ParquetFile, path: str, text_field: str, group: int) -> Iterator:
    try:
        for batch in parquet.iter_batches(columns=[text_field], batch_size=4096, row_groups=[group]):
            yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: row group {group} of {parquet.metadata.num_row_groups} cannot be read "
                         f"({_one_line(err)}); the file is damaged") from None


def _one_line(err: BaseException) -> str:
    # pyarrow's messages span lines; the user gets one line naming the file.
    return " ".join(str(err).split())
