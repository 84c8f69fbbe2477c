"""Which files to read, in which format, split into bounded units of reading work.

Paths and globs go through Beam's FileSystems, so local paths, gs://, s3:// and
hdfs:// all work. Formats are chosen by extension; an unknown one is an error that
names the file.

A file larger than ``--split-bytes`` is cut into read tasks of about that size wherever
its format allows, so that no worker reads a whole big file alone; the cut points depend
only on the file and ``--split-bytes``, never on the number of workers:

- uncompressed text and JSON lines: byte ranges; each reads the documents that begin
  in it (see ``text_formats``);
- bzip2 XML dumps: byte ranges; each reads the pages of the bzip2 streams that begin
  in it (see ``wiki_dump``);
- Parquet: runs of consecutive row groups (a row group is never cut).

Compressed text and JSON lines (.gz, .bz2) and uncompressed XML are one task per file.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing import text_formats, wiki_dump
from preprocessing.documents import Problem, RawDocument
from preprocessing.text_formats import InputError

# (extension, format, compression), longest extensions first.
_FORMATS = (
    (".xml.bz2", "wiki", "bz2"),
    (".xml", "wiki", None),
    (".txt.bz2", "text", "bz2"),
    (".txt.gz", "text", "gzip"),
    (".txt", "text", None),
    (".jsonl.bz2", "jsonl", "bz2"),
    (".jsonl.gz", "jsonl", "gzip"),
    (".jsonl", "jsonl", None),
    (".json.gz", "jsonl", "gzip"),
    (".json", "jsonl", None),
    (".parquet", "parquet", None),
)
SUPPORTED_EXTENSIONS = tuple(ext for ext, _, _ in _FORMATS)


@dataclasses.dataclass(frozen=True)
class ReadTask:
    """One unit of reading work: a whole file, a part of a file, or a run of Parquet row groups.

    ``start`` and ``end`` delimit the part: for a file that can be split (uncompressed
    text and JSON lines, bzip2 XML dumps), byte offsets ``[start, end)`` of the file;
    for Parquet, row-group indices ``[start, end)``; for any other file, 0 and -1 (the
    whole file; an ``end`` of -1 means "to the end" for any format).

    ``stored_bytes`` is how much of the file as stored (compressed or not) the task
    covers: the size of its range, file or row groups, a measure of its work comparable
    across formats (``end - start`` is not one for Parquet). Set by ``plan_read_tasks``.
    """

    path: str
    format: str
    compression: str | None
    start: int = 0
    end: int = -1
    stored_bytes: int = 0


def detect_format(path: str) -> tuple[str, str | None]:
    lower = path.lower()
    for ext, fmt, compression in _FORMATS:
        if lower.endswith(ext):
            return fmt, compression
    raise InputError(f"{path}: unknown input format; supported extensions: "
                     f"{', '.join(SUPPORTED_EXTENSIONS)}")


def plan_read_tasks(patterns: Sequence[str], split_bytes: int) -> list[ReadTask]:
    """Expands paths/globs into read tasks of about ``split_bytes`` each where the
    format allows, in a stable order: by path, then by position in the file."""
    tasks: list[ReadTask] = []
    seen: set[str] = set()
    for result in FileSystems.match(list(patterns)):
        if not result.metadata_list:
            raise InputError(f"--input {result.pattern!r}: no file matches")
        for meta in sorted(result.metadata_list, key=lambda m: m.path):
            if meta.path in seen:
                continue
            seen.add(meta.path)
            fmt, compression = detect_format(meta.path)
            if meta.size_in_bytes == 0:
                raise InputError(f"{meta.path}: the file is empty")
            tasks.extend(_file_tasks(meta.path, fmt, compression, meta.size_in_bytes, split_bytes))
    return tasks


def _file_tasks(path: str, fmt: str, compression: str | None, size: int, split_bytes: int
                ) -> list[ReadTask]:
    if fmt == "parquet":
        with _open_raw(path) as raw:
            runs = text_formats.parquet_row_group_runs(raw, split_bytes)
        return [ReadTask(path, fmt, None, first, end, stored) for first, end, stored in runs]
    if _splits_by_bytes(fmt, compression):
        return [ReadTask(path, fmt, compression, start, end, end - start)
                for start, end in byte_ranges(size, split_bytes)]
    return [ReadTask(path, fmt, compression, stored_bytes=size)]


def _splits_by_bytes(fmt: str, compression: str | None) -> bool:
    # A reader can start mid-file in an uncompressed text or JSON-lines file (at the
    # next document boundary) and in a bzip2 dump (at the next stream); a gzip or
    # single-stream bzip2 text file can only be decompressed from its first byte.
    return (fmt == "wiki" and compression == "bz2") or (fmt in ("text", "jsonl") and compression is None)


def byte_ranges(size: int, split_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``size`` bytes, as few as keep each within
    ``split_bytes``, of equal sizes (give or take a byte: no small last range)."""
    count = -(-size // split_bytes)
    return [(size * i // count, size * (i + 1) // count) for i in range(count)]


def _open_raw(path: str) -> BinaryIO:
    # UNCOMPRESSED: we decompress ourselves (Beam's AUTO would hide the stream offsets).
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _decompressed(raw: BinaryIO, compression: str | None) -> BinaryIO:
    if compression == "bz2":
        return bz2.BZ2File(raw)  # reads multistream files too
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    return raw


def read_task(task: ReadTask, text_field: str, max_line_bytes: int
              ) -> Iterator[wiki_dump.Page | RawDocument | Problem]:
    """Everything one task reads: wiki pages (filtered later), documents, or problems."""
    with _open_raw(task.path) as raw:
        if task.format == "wiki" and task.compression == "bz2":
            yield from wiki_dump.read_bz2_range(raw, task.path, task.start, task.end)
            return
        if task.format == "parquet":
            yield from text_formats.read_parquet(raw, task.path, text_field, task.start, task.end)
            return
        f = _decompressed(raw, task.compression)
        try:
            if task.format == "wiki":
                yield from wiki_dump.read_xml(f, task.path)
            elif task.format == "text":
                yield from text_formats.read_text(f, task.path, max_line_bytes, task.start, task.end)
            else:
                yield from text_formats.read_jsonl(f, task.path, text_field, max_line_bytes,
                                                   task.start, task.end)
        except (EOFError, OSError) as err:
            # gzip/bz2 raise on a truncated or corrupt file: keep what came before.
            yield Problem("truncated-files", f"{task.path}: {err} (truncated or corrupt file); "
                                             "the documents before it were kept")


def check_inputs(tasks: Sequence[ReadTask], text_field: str) -> None:
    """Cheap checks before launching the pipeline, so bad input fails in seconds."""
    for path in dict.fromkeys(task.path for task in tasks if task.format == "parquet"):
        with _open_raw(path) as raw:
            text_formats.check_parquet_column(raw, path, text_field)
