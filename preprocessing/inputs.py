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

Compressed text and JSON lines (.gz, .bz2, .zst, .xz) and uncompressed XML are one task per file.

Document ids begin with the file's *name*: its path relative to the deepest folder
holding all the input files (``document_names``). Two inputs called ``part-0.txt`` in
different folders thus get different ids, hence different random streams, while the
ids stay the same when the whole corpus moves to another folder or bucket.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import io
import logging
import lzma
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
import zstandard

from preprocessing import text_formats, wiki_dump
from preprocessing.documents import Problem, RawDocument
from preprocessing.text_formats import InputError
from preprocessing.zstd_reader import FRAME_MAGIC, ZstdReader, starts_like_zstd

log = logging.getLogger(__name__)

# (extension, format, compression), longest extensions first.
_FORMATS = (
    (".xml.bz2", "wiki", "bz2"),
    (".xml", "wiki", None),
    (".txt.bz2", "text", "bz2"),
    (".txt.gz", "text", "gzip"),
    (".txt.zst", "text", "zstd"),
    (".txt.xz", "text", "xz"),
    (".txt", "text", None),
    (".jsonl.bz2", "jsonl", "bz2"),
    (".jsonl.gz", "jsonl", "gzip"),
    (".jsonl.zst", "jsonl", "zstd"),
    (".jsonl.xz", "jsonl", "xz"),
    (".jsonl", "jsonl", None),
    (".json.bz2", "jsonl", "bz2"),
    (".json.gz", "jsonl", "gzip"),
    (".json.zst", "jsonl", "zstd"),
    (".json.xz", "jsonl", "xz"),
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

    ``name`` begins the ids of the task's documents (see ``document_names``); empty
    means the file's base name, enough when a task is made for one file alone.
    """

    path: str
    format: str
    compression: str | None
    start: int = 0
    end: int = -1
    stored_bytes: int = 0
    name: str = ""

    @property
    def doc_name(self) -> str:
        return self.name or posixpath.basename(self.path.replace("\\", "/"))


def _format_of(path: str) -> tuple[str, str | None] | None:
    lower = path.lower()
    return next(((fmt, compression) for ext, fmt, compression in _FORMATS if lower.endswith(ext)), None)


def detect_format(path: str) -> tuple[str, str | None]:
    found = _format_of(path)
    if found is None:
        raise InputError(f"{path}: unknown input format; supported extensions: "
                         f"{', '.join(SUPPORTED_EXTENSIONS)}")
    return found


def plan_read_tasks(patterns: Sequence[str], split_bytes: int, output: str | None = None,
                    skipped: dict[str, list[str]] | None = None) -> list[ReadTask]:
    """Expands paths/globs into read tasks of about ``split_bytes`` each where the
    format allows, in a stable order: by path, then by position in the file. Files under the
    ``output`` folder (local, symlinked or remote) are left out: a previous run's shards and
    tokenizer files would be read as input (a Parquet shard refused for its columns,
    tokenizer.json taken for a jsonl). ``skipped``, if given, gets the files matched but not read,
    by reason (each warned of here), for the manifest."""
    skipped = {} if skipped is None else skipped
    files: dict[str, int] = {}
    # A local folder named without its trailing slash is matched as a file of unknown format;
    # with the slash, Beam lists its files (one level: a local folder is walked here instead, and
    # a remote one is matched as "folder/**", everything under its prefix).
    patterns = [p.rstrip("/") + "/" if "://" not in p and os.path.isdir(p) else p for p in patterns]
    # A local glob's folders, as folders of their own: lenient (an empty one or one of images is
    # skipped with a warning, not an error), and none at or under --output.
    globbed: dict[str, str] = {}  # folder pattern -> the glob it came from
    expanded = []
    for pattern in patterns:
        folders = _matched_folders(pattern, output)
        if folders is None:
            expanded.append(pattern)
            continue
        files_too = any(os.path.isfile(path) for path in glob.iglob(pattern))  # stops at the first
        expanded.extend(([pattern] if files_too else []) + folders)
        globbed.update(dict.fromkeys(folders, pattern))
    patterns = expanded
    read_by_glob: dict[str, int] = {}
    # A glob with no folder part ("*.txt") matched nothing: Beam's local listing starts in the
    # pattern's dirname, which is then empty. Named from the working directory, it matches.
    matched = [p + "**" if "://" in p and p.endswith("/") else "./" + p if "://" not in p and "/" not in p else p
               for p in patterns]
    for pattern, match in zip(patterns, matched):
        if "://" not in pattern and pattern.endswith("/"):
            # its subfolders too (a corpus is often split into folders), in one pass: Beam's listing
            # stats each file too, and was thrown away here
            listed = _walk(pattern)
        elif "://" not in pattern and re.search(r"[*?\[]", pattern) and os.path.isfile(pattern):
            # a file's own name: "book [1813].txt" is no glob
            listed = [FileMetadata(pattern, os.path.getsize(pattern))]
        else:
            listed = sorted(_match(pattern, match).metadata_list, key=lambda m: m.path)
        if "://" not in pattern and not pattern.endswith("/"):
            _refuse_dangling_links(pattern)  # a folder's are found by _walk
        elif "://" in pattern:  # an object store's "folder" markers (empty keys ending in "/") are no files
            listed = [m for m in listed if not m.path.endswith("/")]
        if "://" in pattern and pattern.endswith("/"):  # as a local folder: no hidden file or folder
            base = re.match(r"[^*?\[]*", pattern).group(0)
            base = base[:base.rfind("/") + 1]  # the folder the listing starts in, before any glob
            listed = [m for m in listed if not any(part.startswith(".") for part in m.path[len(base):].split("/"))]
        if not listed and pattern in globbed:
            log.warning("--input %s: folder %s holds no file; skipped", globbed[pattern], pattern)
            continue
        if not listed:
            raise InputError(f"--input {pattern!r}: no file matches")
        if pattern.endswith("/"):
            # A folder: the corpus files in it. Its README or licence is no input, but is said (a
            # file named by its path or a glob of unknown format stays an error); hidden files are
            # not listed at all locally.
            other = [m for m in listed if _format_of(m.path) is None]
            if other:
                log.warning("--input %s: %d file(s) of no input format skipped: %s", pattern, len(other),
                            ", ".join(posixpath.basename(m.path) for m in other[:10]) + (" …" if len(other) > 10
                                                                                         else ""))
                left_out = {m.path for m in other}
                listed = [m for m in listed if m.path not in left_out]
                skipped.setdefault("no-input-format", []).extend(m.path for m in other)
            if not listed and pattern in globbed:
                continue
            if not listed:
                raise InputError(f"--input {pattern!r}: no file of an input format in this folder; supported "
                                 f"extensions: {', '.join(SUPPORTED_EXTENSIONS)}")
        if pattern in globbed:
            read_by_glob[globbed[pattern]] = read_by_glob.get(globbed[pattern], 0) + len(listed)
        for meta in listed:
            files.setdefault(meta.path, meta.size_in_bytes)
    for glob_pattern in dict.fromkeys(globbed.values()):
        if glob_pattern not in patterns and not read_by_glob.get(glob_pattern):
            raise InputError(f"--input {glob_pattern!r}: no file of an input format matches (only folders "
                             "without one)")
    real = _RealPaths()
    files = _without_second_names(files, skipped, real)
    _refuse_undecodable_names(files)
    if output:
        inside = [path for path in files if _is_under(path, output, real)]
        if inside:
            log.warning("%d file(s) under --output %s left out of the input: %s", len(inside), output,
                        ", ".join(inside[:5]) + (" …" if len(inside) > 5 else ""))
            files = {path: size for path, size in files.items() if path not in inside}
            skipped["under-output"] = inside
            if not files:
                raise InputError(f"--input: every file matched is under --output {output}, the output of this run")
    # A pipe lists with size 0 (and would be read while still being written, or never): said as such.
    special = [path for path in files if "://" not in path and not os.path.isfile(path) and os.path.exists(path)]
    if special:
        raise InputError(f"{special[0]}: not a regular file (a pipe, socket or device): save the text to a file first")
    empty = [path for path, size in files.items() if size == 0 or _compresses_nothing(path, size)]
    if empty and len(empty) == len(files):
        raise InputError(f"{empty[0]}: the file is empty" + (f" (and the {len(empty) - 1} other input files)"
                                                              if len(empty) > 1 else ""))
    if empty:  # one failed download among many files need not stop the run, but is said
        log.warning("%d empty input file(s) skipped: %s", len(empty),
                    ", ".join(empty[:10]) + (" …" if len(empty) > 10 else ""))
        left_out = set(empty)
        files = {path: size for path, size in files.items() if path not in left_out}
        skipped["empty"] = empty
    names = document_names(list(files))
    tasks: list[ReadTask] = []
    for path, size in files.items():
        fmt, compression = detect_format(path)
        tasks.extend(dataclasses.replace(task, name=names[path])
                     for task in _file_tasks(path, fmt, compression, size, split_bytes))
    return tasks


def _matched_folders(pattern: str, output: str | None) -> list[str] | None:
    """The folders a local glob matches, each to be read with its subfolders as a named one is
    (None: no glob, or no folder). Beam's listing of a glob holds its files alone, so "corpus/*"
    left "corpus/news/" and Spark's "part.parquet/" folders out unsaid (and matching folders
    alone, was "no file matches"). Folders at or under --output are no corpus."""
    if "://" in pattern or not re.search(r"[*?\[]", pattern) or os.path.exists(pattern):
        return None
    # with a trailing "/", glob lists folders alone: no stat of each of a million files
    folders = sorted(path.rstrip("/") + "/" for path in glob.glob(pattern.rstrip("/") + "/"))
    if output and "://" not in output:
        folders = [f for f in folders
                   if not _is_under(f, output) and os.path.realpath(f) != os.path.realpath(output)]
    if not folders:
        return None
    log.warning("--input %s: %d folder(s) matched, read with their subfolders: %s", pattern, len(folders),
                ", ".join(folders[:5]) + (" …" if len(folders) > 5 else ""))
    return folders


# A compressed file this small may hold nothing: gzip's header and trailer alone are 20 bytes.
_SMALL_COMPRESSED_BYTES = 128


def _compresses_nothing(path: str, size: int) -> bool:
    """A local compressed text or jsonl file of no content (``printf '' | gzip``): empty like a
    file of 0 bytes, and skipped as one (it was read as a file of no documents, unsaid)."""
    if "://" in path or size > _SMALL_COMPRESSED_BYTES:
        return False
    found = _format_of(path)
    if found is None or found[1] is None or found[0] not in ("text", "jsonl"):
        return False
    try:
        with _open_raw(path) as raw:
            return _decompressed(raw, found[1]).read(1) == b""
    except CORRUPT:
        return False  # not valid compressed data: check_inputs names it, or its reader counts it


def _refuse_undecodable_names(paths) -> None:
    """A file name that is not UTF-8 (a Latin-1 "B\xfccher.txt" from an old zip) reaches Python
    with surrogates, which no hash, log line or manifest can encode: a traceback mid-pipeline."""
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise InputError(f"{shown}: the file name is not UTF-8 (shown with \ufffd for its bad bytes): rename "
                             "the file, e.g. convmv -f latin1 -t utf8 --notest -r FOLDER") from None


def _match(pattern: str, match: str):
    """Beam's listing of one --input, or an InputError naming it: a scheme Beam has no file
    system for (file://, hf://) or an object store it cannot reach was a traceback."""
    try:
        return FileSystems.match([match])[0]
    except Exception as err:  # ValueError (no such scheme), BeamIOError (credentials, network), ...
        message = " ".join(str(err).split())
        raise InputError(f"--input {pattern}: cannot list it ({message[:300]}); local files are named by their "
                         "path, remote ones as gs://, s3://, hdfs:// or another scheme of an installed Beam file "
                         "system") from None


def _refuse_dangling_links(pattern: str) -> None:
    """A link whose file is missing (git-annex or DVC content not fetched, a pruned cache) would be
    left out of the listing, and the corpus trained on without it (a folder's: ``_walk``)."""
    for path in glob.iglob(pattern):  # a link of no input format (an image, say) would be skipped anyway
        if _format_of(path) is not None and os.path.islink(path) and not os.path.exists(path):
            raise _dangling(pattern, path)


def _dangling(pattern: str, path: str) -> InputError:
    return InputError(f"--input {pattern}: {path} is a link to {os.readlink(path)}, which does not exist "
                      "(content not fetched, or moved?): fetch it, or remove the link")


class _RealPaths:
    """``os.path.realpath`` of many files in few folders: each folder resolved once (realpath takes
    an lstat per component of the path: 7 of 25 s of listing 100,000 files), then the file's own
    link, if it is one."""

    def __init__(self):
        self._folders: dict[str, str] = {}
        self._files: dict[str, str] = {}  # asked again: the same answer, the same run

    def __call__(self, path: str) -> str:
        real = self._files.get(path)
        if real is None:
            # not abspath first: it drops "link/.." as text, where the link leads elsewhere
            folder, name = os.path.split(path)
            real = os.path.join(self.folder(folder or "."), name)
            self._files[path] = real = os.path.realpath(real) if os.path.islink(real) else real
        return real

    def folder(self, path: str) -> str:
        real = self._folders.get(path)
        if real is None:
            real = self._folders[path] = os.path.realpath(path)
        return real


def _without_second_names(files: dict[str, int], skipped: dict[str, list[str]],
                          real: _RealPaths | None = None) -> dict[str, int]:
    """Each local file once, under the first name it was listed by: a file named twice (a
    folder and a file in it, a symlink to a folder) would be read twice, byte-identical
    examples of the same document ids."""
    real = real or _RealPaths()
    seen: dict[str, str] = {}
    again = []
    for path in files:
        if "://" in path:
            continue
        resolved = real(path)
        if resolved in seen:
            again.append(f"{path} (= {seen[resolved]})")
        else:
            seen[resolved] = path
    if again:
        log.warning("%d input file(s) listed under a second name, read once: %s", len(again),
                    ", ".join(again[:5]) + (" …" if len(again) > 5 else ""))
        firsts = set(seen.values())
        skipped["second-name"] = [path for path in files if "://" not in path and path not in firsts]
        files = {path: size for path, size in files.items() if "://" in path or path in firsts}
    return files


def _is_under(path: str, folder: str, real: _RealPaths | None = None) -> bool:
    """Whether ``path`` lies in ``folder``: local paths resolved (a symlink to it too), URLs as text."""
    if "://" in folder or "://" in path:
        return path.startswith(folder.rstrip("/") + "/")
    real = real or _RealPaths()
    return real(path).startswith(os.path.join(real.folder(folder), ""))


def _walk(folder: str) -> list[FileMetadata]:
    """Every file under a local folder, subfolders included, but hidden ones (.git, .DS_Store);
    a symlinked subfolder is not followed (a link can loop); a link of an input format to a file
    that is missing is refused (``_refuse_dangling_links``). One scandir a folder: its entries
    know their type and size without a stat each."""
    found, folders = [], [folder]
    while folders:
        current = folders.pop()
        try:
            with os.scandir(current) as listing:
                entries = [entry for entry in listing if not entry.name.startswith(".")]
        except OSError as err:
            raise InputError(f"--input {folder}: cannot list {err.filename} ({err.strerror})") from None
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
            elif entry.is_file():  # a link to a file too
                found.append(FileMetadata(entry.path, entry.stat().st_size))
            elif entry.is_symlink() and _format_of(entry.path) is not None and not os.path.exists(entry.path):
                raise _dangling(folder, entry.path)
    return sorted(found, key=lambda m: m.path)


def document_names(paths: Sequence[str]) -> dict[str, str]:
    """Each path relative to the deepest folder holding them all: what document ids
    begin with. A lone file, or files of one folder, are named by their base names.

    Relative to the inputs' common folder, not absolute: ids (and so every random
    choice and the output) stay the same when the corpus is moved or copied elsewhere,
    yet two files of the same base name in different folders never share ids."""
    split = {path: _components(path) for path in paths}
    common = min(split.values(), key=len, default=[])
    for parts in split.values():
        depth = 0
        while depth < min(len(common), len(parts) - 1) and common[depth] == parts[depth]:
            depth += 1
        common = common[:depth]
    return {path: "/".join(parts[len(common):]) for path, parts in split.items()}


def _components(path: str) -> list[str]:
    # Local paths are made absolute so that "a/x.txt" and "/data/b/x.txt" compare;
    # URLs (gs://, s3://, hdfs://) are split as they are.
    if "://" not in path:
        path = os.path.abspath(path)
    return path.replace("\\", "/").split("/")


def _file_tasks(path: str, fmt: str, compression: str | None, size: int, split_bytes: int
                ) -> list[ReadTask]:
    if fmt == "parquet":
        with _open_raw(path) as raw:
            runs = text_formats.parquet_row_group_runs(raw, path, split_bytes)
        return [ReadTask(path, fmt, None, first, end, stored) for first, end, stored in runs]
    if fmt == "wiki" and compression == "bz2" and not _bz2_multistream(path, size):
        return [ReadTask(path, fmt, compression, 0, size, size)]  # the docs' promise: one unit
    if _splits_by_bytes(fmt, compression):
        return [ReadTask(path, fmt, compression, start, end, end - start)
                for start, end in byte_ranges(size, split_bytes)]
    return [ReadTask(path, fmt, compression, stored_bytes=size)]


# How far a bzip2 file is searched for its second stream header. A multistream dump's first
# stream holds only the <siteinfo> head (kilobytes), and a parallel compressor's ~900 kB.
_SECOND_STREAM_WITHIN = 64 << 20


def _bz2_multistream(path: str, size: int) -> bool:
    """Whether a .bz2 dump holds more streams than its first, so that byte ranges find pages.

    A single-stream file (plain ``bzip2``) cut into ranges gave every range but the first
    nothing to read: such ranges could make up the whole vocabulary sample (no text to train
    on) or leave the dump out of it. A file that is no bzip2 at all is refused here, by name:
    its ranges would find no stream and read nothing, silently."""
    with _open_raw(path) as raw:
        if not re.match(rb"BZh[1-9]", raw.read(4)):
            raise InputError(f"{path}: not a bzip2 file (no bzip2 stream header at byte 0), though its name "
                             "ends in .bz2")
        return wiki_dump.find_first_stream(raw, 1, min(size, _SECOND_STREAM_WITHIN)) is not None


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


# What a decompressor raises on a truncated or corrupt file.
CORRUPT = (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError)


def _decompressed(raw: BinaryIO, compression: str | None) -> BinaryIO:
    if compression == "bz2":
        return bz2.BZ2File(raw)  # reads multistream files too
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "zstd":
        return io.BufferedReader(ZstdReader(raw), 1 << 20)
    if compression == "xz":
        return lzma.LZMAFile(raw)
    return raw


def read_task(task: ReadTask, text_field: str, max_line_bytes: int
              ) -> Iterator[wiki_dump.Page | RawDocument | Problem]:
    """Everything one task reads: wiki pages (filtered later), documents, or problems.

    A wiki task first reads its dump's head (``wiki_dump.read_site``, from byte 0, once
    per task: a range starting mid-file holds no siteinfo) and gives the site to its pages."""
    with _open_raw(task.path) as raw:
        site = wiki_dump.read_site(raw, task.path) if task.format == "wiki" else None
        if task.format == "wiki" and task.compression == "bz2":
            yield from wiki_dump.read_bz2_range(raw, task.path, task.start, task.end, site)
            return
        if task.format == "parquet":
            yield from text_formats.read_parquet(raw, task.path, text_field, task.start, task.end,
                                                  task.doc_name)
            return
        if site is not None:
            raw.seek(0)  # read_site read the head
        f = _decompressed(raw, task.compression)
        try:
            if task.format == "wiki":
                yield from wiki_dump.read_xml(f, task.path, site)
            elif task.format == "text":
                yield from text_formats.read_text(f, task.path, max_line_bytes, task.start, task.end,
                                                  name=task.doc_name)
            else:
                yield from text_formats.read_jsonl(f, task.path, text_field, max_line_bytes,
                                                   task.start, task.end, task.doc_name)
        except CORRUPT as err:
            # gzip/bz2/xz/zstd raise on a truncated or corrupt file: keep what came before.
            yield Problem("truncated-files", f"{task.path}: {err} (truncated or corrupt file); "
                                             "the documents before it were kept")


REMOTE_HEADS = 8


# What a compressed file begins with: a name that says .gz of a file that is not gzip lost the
# whole file to one "truncated-files" count, the run otherwise a success.
MAGIC = {"gzip": (b"\x1f\x8b", "gzip", ".gz"), "bz2": (b"BZh", "bzip2", ".bz2"),
         "xz": (b"\xfd7zXZ\x00", "xz", ".xz")}


def _refuse_compressed_without_suffix(path: str) -> None:
    """Compressed data in a file named as plain (a download saved as .txt) was read as text: its
    bytes, a few counted as invalid UTF-8, trained into the vocabulary as junk pieces."""
    with open(path, "rb") as f:
        head = f.read(10)
    for magic, what, suffix in MAGIC.values():
        # bzip2's "BZh" is text too: its block header follows the level digit
        if head.startswith(magic) and (what != "bzip2" or head[4:10] == b"1AY&SY"):
            break
    else:
        if not starts_like_zstd(head):
            return
        what, suffix = "zstd", ".zst"
    raise InputError(f"{path}: {what} data, though its name does not end in {suffix}: add the suffix "
                     f"({os.path.basename(path)}{suffix}) so that it is decompressed, or decompress it")


def check_inputs(tasks: Sequence[ReadTask], text_field: str) -> None:
    """Cheap checks before launching the pipeline, so bad input fails in seconds."""
    local = {task.path: task for task in tasks if "://" not in task.path}
    for path, task in local.items():
        if not os.access(path, os.R_OK):  # else a worker's PermissionError, as a Beam traceback
            raise InputError(f"--input {path}: not readable (permission denied)")
        if task.compression in MAGIC or task.compression == "zstd":
            magic, what, suffix = MAGIC.get(task.compression, (FRAME_MAGIC, "zstd", ".zst"))
            with open(path, "rb") as f:
                head = f.read(len(magic))
            if head != magic and not (task.compression == "zstd" and starts_like_zstd(head)):
                raise InputError(f"{path}: not a {what} file (no {what} header at byte 0), though its name ends in "
                                 f"{suffix}: rename it, or compress it")
        elif task.compression is None and task.format != "parquet":
            _refuse_compressed_without_suffix(path)
    for path, task in local.items():
        if task.format == "wiki" and task.compression != "gzip":
            with _open_raw(path) as raw:
                if not wiki_dump.is_dump_head(wiki_dump.dump_head(raw, path)):
                    # read as a dump, it gave no page and no count: the file left out unsaid
                    raise InputError(f"{path}: not a MediaWiki XML dump (no <mediawiki> or <page> element at its "
                                     "start); a .xml input is read as one: give plain text as .txt, one JSON object "
                                     "a line as .jsonl")
    heads = [task for task in local.values() if task.format in ("text", "jsonl")]
    heads += [task for task in {t.path: t for t in tasks if "://" in t.path and t.format in ("text", "jsonl")}
              .values()][:REMOTE_HEADS]
    for task in heads:
        with _open_raw(task.path) as raw:
            try:
                text_formats.check_encoding_head(_decompressed(raw, task.compression), task.path)
            except CORRUPT:
                pass  # a truncated or corrupt file: its reader keeps what it can, and counts the rest
    for path in dict.fromkeys(task.path for task in tasks if task.format == "parquet"):
        with _open_raw(path) as raw:
            text_formats.check_parquet_column(raw, path, text_field)
    jsonl = list({task.path: task for task in tasks if task.format == "jsonl"}.values())
    remote = [task for task in jsonl if "://" in task.path]
    # Each remote head is a request of its own: the first few stand for the rest (a wrong
    # --text-field is wrong for all of them), the others are checked as they are read.
    for task in [task for task in jsonl if "://" not in task.path] + remote[:REMOTE_HEADS]:
        with _open_raw(task.path) as raw:
            try:
                text_formats.check_jsonl_head(_decompressed(raw, task.compression), task.path, text_field)
            except CORRUPT:
                pass  # a truncated or corrupt file: its reader keeps what it can, and counts the rest


def dump_language(path: str) -> str | None:
    """The ``xml:lang`` of a MediaWiki dump's root element, read from its head; None when the
    dump does not say (read as English)."""
    from preprocessing.wiki_site import declared_language

    with _open_raw(path) as raw:
        return declared_language(wiki_dump.dump_head(raw, path))
