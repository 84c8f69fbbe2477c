"""Which files to read, in which format, split into units of reading work.

Paths and globs go through Beam's FileSystems, so local paths, gs://, s3:// and
hdfs:// all work. Formats are chosen by extension; an unknown one is an error that
names the file.
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
    """One unit of reading work: a whole file, or a byte range of a splittable one."""

    path: str
    format: str
    compression: str | None
    start: int = 0
    end: int = -1  # -1: to the end of the file


def detect_format(path: str) -> tuple[str, str | None]:
    lower = path.lower()
    for ext, fmt, compression in _FORMATS:
        if lower.endswith(ext):
            return fmt, compression
    raise InputError(f"{path}: unknown input format; supported extensions: "
                     f"{', '.join(SUPPORTED_EXTENSIONS)}")


def plan_read_tasks(patterns: Sequence[str], split_bytes: int) -> list[ReadTask]:
    """Expands paths/globs into read tasks, in a stable order.

    bzip2 XML dumps are cut into ``split_bytes`` ranges so that several workers share
    one big (multistream) file; every other file is one task.
    """
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
            if fmt == "wiki" and compression == "bz2":
                for start in range(0, meta.size_in_bytes, split_bytes):
                    end = min(start + split_bytes, meta.size_in_bytes)
                    tasks.append(ReadTask(meta.path, fmt, compression, start, end))
            else:
                tasks.append(ReadTask(meta.path, fmt, compression))
    return tasks


def needs_rebalancing(tasks: Sequence[ReadTask], split_bytes: int) -> bool:
    """Whether one task may read much more than others, so that the documents it reads
    should be spread across workers before cleaning (a reshuffle costs a pass of all
    raw text through the runner, so it is skipped when reading is already balanced).

    True for fewer than 16 tasks (too few to keep many workers busy), for any
    whole-file task larger than ``split_bytes``, and for a bzip2 dump made of a single
    stream (its first range reads the whole file).
    """
    if len(tasks) < 16:
        return True
    for task in tasks:
        if task.end < 0:
            if _size(task.path) > split_bytes:
                return True
        elif task.start == 0 and task.end < _size(task.path):
            with _open_raw(task.path) as raw:
                if wiki_dump.find_first_stream(raw, 1, min(_size(task.path), 4 * split_bytes)) is None:
                    return True
    return False


def _size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


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
            yield from text_formats.read_parquet(raw, task.path, text_field)
            return
        f = _decompressed(raw, task.compression)
        try:
            if task.format == "wiki":
                yield from wiki_dump.read_xml(f, task.path)
            elif task.format == "text":
                yield from text_formats.read_text(f, task.path, max_line_bytes)
            else:
                yield from text_formats.read_jsonl(f, task.path, text_field, max_line_bytes)
        except (EOFError, OSError) as err:
            # gzip/bz2 raise on a truncated or corrupt file: keep what came before.
            yield Problem("truncated-files", f"{task.path}: {err} (truncated or corrupt file); "
                                             "the documents before it were kept")


def check_inputs(tasks: Sequence[ReadTask], text_field: str) -> None:
    """Cheap checks before launching the pipeline, so bad input fails in seconds."""
    for task in tasks:
        if task.format == "parquet":
            with _open_raw(task.path) as raw:
                text_formats.check_parquet_column(raw, task.path, text_field)
