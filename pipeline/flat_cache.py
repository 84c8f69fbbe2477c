"""The shards of a data dir as flat arrays that every process memory-maps (``flat_cache``).

On first use the shards (in manifest order) are converted, one row group at a time and
checked on the way, into flat uncompressed ``.npy`` files in ``DATA_DIR/flat/`` (or
``cache_dir``): per list column its concatenated values (the Parquet dtype), one int64
offsets array (N + 1) per pair of columns that must agree row by row
(input_ids/segment_ids, masked_lm_positions/masked_lm_ids), the row lengths (int16),
next_sentence_labels (int8), and word_starts (bool) where the shards carry them. The cache
is written to a temporary sibling and renamed into place when complete; ``flat.json`` in it
records what it was built from (a hash of the manifest, each shard's path, rows and size), so
a rewritten data dir is converted again. Ranks starting together take an ``fcntl.flock``:
one converts, the others wait and then map its files. Without a working lock each node's
local rank 0 converts and that node's other ranks wait for it (``BUILD_GRACE_S``);
concurrent conversions would each write into a temporary dir of their own and the renames
settle it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.data_dir import COLUMN_DTYPES, LIST_COLUMNS, DataDirError, open_shard
from pipeline.output_path import current_umask, last_write, owner_tag, remove_dead_leftovers
from pipeline.read_ahead import ReadAhead
from preprocessing.examples import WORD_STARTS

log = logging.getLogger(__name__)

# The flat arrays, file name → dtype (lengths: int16 up to 32,767 tokens, see _lengths_dtype).
# input_ids/segment_ids and masked_lm_positions/masked_lm_ids must agree row by row, so
# each pair shares one offsets array: 16 bytes a row less on disk and in the page cache.
FLAT_ARRAYS = ("input_ids", "segment_ids", "token_offsets", "masked_lm_positions", "masked_lm_ids",
               "mask_offsets", "lengths", "next_sentence_labels")
# Indexed by row (the others by token or by masked position): read whole on opening (read_ahead.py).
PER_ROW_ARRAYS = ("token_offsets", "mask_offsets", "lengths", "next_sentence_labels")
CACHE_DIR = "flat"
CACHE_MARKER = "flat.json"  # written last into the temporary dir: a cache without it is never used
CACHE_FORMAT = 1  # bump when the files change
NPY_HEADER_BYTES = 128  # room kept at the start of each .npy for its header, written last


def carries_word_starts(manifest: dict) -> bool:
    """Whether the shards hold the optional word_starts column (unmasked rows whose whole words
    the vocabulary alone cannot give: jieba's, or a prefixless vocabulary's sentence starts)."""
    return WORD_STARTS in (manifest.get("columns") or {})


def flat_array_names(manifest: dict) -> tuple[str, ...]:
    return FLAT_ARRAYS + ((WORD_STARTS,) if carries_word_starts(manifest) else ())


def _lengths_dtype(max_seq_length: int) -> type:
    # Signed: an unsigned length wraps under arithmetic like -(-n // 8).
    return np.int16 if max_seq_length <= np.iinfo(np.int16).max else np.int32


def cache_source(data_dir: str, manifest: dict) -> dict:
    """What a flat cache is built from; a cache recording anything else is stale.

    The manifest's hash changes with every preprocessing run (it records its creation
    time); each shard's size catches a shard rewritten under an unchanged manifest.
    """
    shards = [{"path": s["path"], "rows": int(s["rows"]),
               "bytes": os.path.getsize(os.path.join(data_dir, s["path"]))} for s in manifest["shards"]]
    return {"cache_format": CACHE_FORMAT,
            "manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "tokenizer_fingerprint": manifest["tokenizer"].get("fingerprint"),
            "shards": shards,
            # Only with the optional column: a cache of a data dir without it stays current.
            **({"arrays": list(flat_array_names(manifest))} if carries_word_starts(manifest) else {})}


def _cache_is_current(directory: str, source: dict) -> bool:
    """The directory holds complete flat arrays built from ``source``."""
    try:
        with open(os.path.join(directory, CACHE_MARKER)) as f:
            marker = json.load(f)
        return marker["source"] == source and all(
            _file_size(os.path.join(directory, name + ".npy")) == marker["arrays"][name]["file_bytes"]
            for name in source.get("arrays", FLAT_ARRAYS))
    except (OSError, ValueError, KeyError, TypeError):  # no marker, or not one this code wrote
        return False


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


class _NpyAppender:
    """A 1-D ``.npy`` file written by appending, for when its final length is not known up
    front (a list column's value count is only known once its shards are read): the
    data goes after room kept for the header, which ``close`` writes once the length is known."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self._file = open(path, "wb")
        self._file.write(b"\0" * NPY_HEADER_BYTES)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(memoryview(values).cast("B"))
        self.length += len(values)

    def finish(self) -> dict:
        """Writes the header, flushes the file to disk and closes it; its description for the marker.

        On disk before the marker that vouches for it: after a power loss, a filesystem with
        delayed allocation can keep a file's size but not its data, and the marker checks sizes."""
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, self.length))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"dtype": self.dtype.name, "length": self.length,
                "file_bytes": NPY_HEADER_BYTES + self.length * self.dtype.itemsize}

    def __enter__(self) -> _NpyAppender:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()  # after finish() a no-op; after an error the temporary dir goes anyway


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """A .npy version 1.0 header of exactly NPY_HEADER_BYTES bytes (data stays 64-byte aligned)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)})
    text = text.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"  # 10: magic, version, header length
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _check_schema(shard_path: str, schema: pa.Schema, columns: dict, num_rows: int) -> None:
    for name, dtype in columns.items():
        if name not in schema.names:
            if name == WORD_STARTS and num_rows == 0:
                continue  # an empty shard written without the optional column holds no row to miss it
            raise DataDirError(f"{shard_path}: column {name!r} is missing")
        kind, want = schema.field(name).type, pa.from_numpy_dtype(dtype)
        if name in LIST_COLUMNS or name == WORD_STARTS:
            ok = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and kind.value_type == want
            expected = f"list<{want}>"
        else:
            ok, expected = kind == want, str(want)
        if not ok:
            raise DataDirError(f"{shard_path}: column {name!r} has type {kind}, expected {expected} "
                               "(contract 2 of docs/DESIGN.md; rerun preprocessing/run_beam.py)")


def _list_column(chunked) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets starting at 0) of a Parquet list column, without Python rows."""
    array = chunked.combine_chunks()
    if array.null_count:
        raise ValueError(f"{array.null_count} null rows")
    offsets = array.offsets.to_numpy().astype(np.int64)
    # the values between offsets[0] and offsets[-1] (a bool column is bit-packed: copied to bytes)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def _checked_columns(where: str, table: pa.Table, max_seq_length: int, first_row: int,
                     vocab_size: int) -> dict[str, np.ndarray]:
    """One row group's columns as numpy (offsets local to it), after the checks a batch relies on.
    Errors name the row by its index in the shard (the group starts at ``first_row``)."""
    out: dict[str, np.ndarray] = {}
    offsets: dict[str, np.ndarray] = {}
    for name in LIST_COLUMNS:
        try:
            out[name], offsets[name] = _list_column(table.column(name))
        except ValueError as e:
            raise DataDirError(f"{where}: column {name}: {e}") from None
    labels = table.column("next_sentence_labels")
    if labels.null_count:
        raise DataDirError(f"{where}: column next_sentence_labels: {labels.null_count} null rows")
    out["next_sentence_labels"] = labels.to_numpy()

    def first_bad(mask) -> int:
        return first_row + int(np.flatnonzero(mask)[0])

    if not np.array_equal(offsets["input_ids"], offsets["segment_ids"]):
        row = first_bad(offsets["input_ids"][1:] != offsets["segment_ids"][1:])
        raise DataDirError(f"{where}: segment_ids and input_ids differ in length in row {row}")
    if not np.array_equal(offsets["masked_lm_positions"], offsets["masked_lm_ids"]):
        row = first_bad(offsets["masked_lm_positions"][1:] != offsets["masked_lm_ids"][1:])
        raise DataDirError(f"{where}: masked_lm_positions and masked_lm_ids differ in length in row {row}")
    lengths = np.diff(offsets["input_ids"])
    if len(lengths) and lengths.max() > max_seq_length:
        raise DataDirError(f"{where}: row {first_bad(lengths > max_seq_length)} has {lengths.max()} tokens, "
                           f"more than the manifest's max_seq_length {max_seq_length}")
    positions = out["masked_lm_positions"]
    row_of_mask = np.repeat(np.arange(len(lengths)), np.diff(offsets["masked_lm_positions"]))
    outside = (positions >= lengths[row_of_mask]) | (positions < 0)
    if outside.any():
        raise DataDirError(f"{where}: a masked_lm_positions value lies outside its row "
                           f"(row {first_row + row_of_mask[np.flatnonzero(outside)[0]]})")
    # Values the model indexes with: out of range, they failed mid-training (an IndexError on the
    # CPU, a device-side assert on a GPU) at whatever step first drew the row.
    row_of_token = np.repeat(np.arange(len(lengths)), lengths)
    for name, values, rows, high in (("input_ids", out["input_ids"], row_of_token, vocab_size),
                                     ("masked_lm_ids", out["masked_lm_ids"], row_of_mask, vocab_size),
                                     ("segment_ids", out["segment_ids"], row_of_token, 2),
                                     ("next_sentence_labels", out["next_sentence_labels"], None, 2)):
        bad = (values < 0) | (values >= high)
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            row = first_row + int(rows[at] if rows is not None else at)
            raise DataDirError(f"{where}: row {row}: {name} holds {int(values[at])}, outside [0, {high})"
                               + (" (the manifest's tokenizer.vocab_size)" if high == vocab_size else ""))
    if WORD_STARTS in table.column_names:
        try:
            out[WORD_STARTS], starts_offsets = _list_column(table.column(WORD_STARTS))
        except ValueError as e:
            raise DataDirError(f"{where}: column {WORD_STARTS}: {e}") from None
        if not np.array_equal(offsets["input_ids"], starts_offsets):
            row = first_bad(offsets["input_ids"][1:] != starts_offsets[1:])
            raise DataDirError(f"{where}: {WORD_STARTS} and input_ids differ in length in row {row}")
    out["token_offsets"], out["mask_offsets"], out["lengths"] = (offsets["input_ids"],
                                                                 offsets["masked_lm_positions"], lengths)
    return out


def _shard_row_groups(shard_path: str, max_seq_length: int, vocab_size: int, word_starts: bool = False
                      ) -> Iterator[dict[str, np.ndarray]]:
    """A shard's row groups, checked, one at a time: memory stays bounded by a row group
    (preprocessing writes them of 8,192 rows)."""
    parquet = open_shard(shard_path)
    columns = {**COLUMN_DTYPES, **({WORD_STARTS: np.bool_} if word_starts else {})}
    _check_schema(shard_path, parquet.schema_arrow, columns, parquet.metadata.num_rows)
    if parquet.metadata.num_rows == 0:
        return
    first_row = 0
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=list(columns))
        except (pa.ArrowException, OSError) as e:
            raise DataDirError(f"{shard_path}: pyarrow cannot read row group {group} ({e}); the shard is "
                               "corrupt (rerun preprocessing/run_beam.py)") from None
        yield _checked_columns(shard_path, table, max_seq_length, first_row, vocab_size)
        first_row += table.num_rows


class _Superseded(Exception):
    """Another process installed a current cache while this one converted."""


def _write_flat_arrays(data_dir: str, manifest: dict, out: str, source: dict, superseded=lambda: False) -> None:
    """Every shard's rows appended to the flat arrays in ``out``, then the marker; raises
    _Superseded at a shard's start once ``superseded()`` says another process finished first."""
    max_seq_length = int(manifest["max_seq_length"])
    dtypes = {**COLUMN_DTYPES, "token_offsets": np.int64, "mask_offsets": np.int64,
              "lengths": _lengths_dtype(max_seq_length), WORD_STARTS: np.bool_}
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(_NpyAppender(os.path.join(out, name + ".npy"), dtypes[name]))
                 for name in source.get("arrays", FLAT_ARRAYS)}
        base = {"token_offsets": 0, "mask_offsets": 0}  # values written so far: the next offsets' start
        for name in base:
            files[name].append(np.zeros(1, dtype=np.int64))
        for shard in manifest["shards"]:
            if superseded():
                raise _Superseded
            for columns in _shard_row_groups(os.path.join(data_dir, shard["path"]), max_seq_length,
                                             int(manifest["tokenizer"]["vocab_size"]), carries_word_starts(manifest)):
                for name, values in columns.items():
                    if name in base:  # local offsets from 0: shift past the rows before, drop the leading 0
                        files[name].append(values[1:] + base[name])
                        base[name] += int(values[-1])
                    else:
                        files[name].append(values)
        arrays = {name: f.finish() for name, f in files.items()}
    with open(os.path.join(out, CACHE_MARKER), "w") as f:
        json.dump({"source": source, "rows": arrays["lengths"]["length"], "arrays": arrays,
                   "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _check_replaceable(target: str, what: str) -> None:
    """A stale cache is replaced whole: ``target`` must be missing, empty, or a flat cache. A
    --data-cache naming an existing folder (a scratch dir, the data dir itself) was deleted with
    all it held."""
    try:
        names = set(os.listdir(target))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise DataDirError(f"{what} {target}: a file, not a folder") from None
    except OSError as e:
        raise DataDirError(f"{what} {target}: cannot be read ({e})") from None
    others = {name for name in names if name != CACHE_MARKER and not name.endswith(".npy")}
    if names and (CACHE_MARKER not in names or others):  # any .npy beside a marker: an older format's too
        others = sorted(others or names)
        raise DataDirError(f"{what} {target}: holds files that are not a flat cache ({', '.join(others[:5])}"
                           f"{', …' if len(others) > 5 else ''}), which replacing it would delete: name a new "
                           f"or empty folder, e.g. {os.path.join(target, CACHE_DIR)}")


def _install(temp: str, target: str, source: dict) -> None:
    """Renames the complete ``temp`` to ``target``. A stale target is moved aside first; a
    current one (another process finished first, its lock not working) wins, and ``temp``
    is left for the caller to delete. Readers that mapped a stale cache's files keep them
    (an unlinked file lives on while mapped)."""
    parent = os.path.dirname(target)
    for _ in range(5):
        try:
            os.rename(temp, target)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _cache_is_current(target, source):
            return
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.stale-", dir=parent)
        try:
            os.rename(target, aside)  # replaces the empty dir mkdtemp made
        except FileNotFoundError:
            pass  # another process moved it first
        shutil.rmtree(aside, ignore_errors=True)
    raise DataDirError(f"{target}: could not replace the stale flat cache (other processes keep rewriting it)")


def build_flat_cache(data_dir: str, manifest: dict, target: str) -> bool:
    """Converts the shards into a temporary sibling of ``target`` and renames it into place;
    False if another process installed a current cache first and this conversion stopped.

    Safe without any lock: concurrent builders each use their own temporary dir.
    """
    source = cache_source(data_dir, manifest)
    parent = os.path.dirname(target)
    _remove_abandoned_builds(target)
    try:
        os.makedirs(parent, exist_ok=True)
        temp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.building-{owner_tag()}-", dir=parent)
        os.chmod(temp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared data dir's cache from others
    except OSError as e:
        default = os.path.abspath(parent) == os.path.abspath(data_dir)  # DATA/flat, no --data-cache given
        raise DataDirError(f"cannot write the flat cache {target} ({e}): " + (
            "pass a writable cache dir (--data-cache) for a read-only data dir" if default else
            "pass a --data-cache this user can write in")) from None
    try:
        started = time.monotonic()
        log.info("converting %d shard(s) of %s into flat arrays in %s (once per data dir)",
                 len(manifest["shards"]), data_dir, target)
        try:
            # Without a cluster-wide lock each node converts; a node that finds another's cache
            # installed stops (a late global rank 0 kept converting while the others waited for it
            # in the rendezvous, whose timeout could pass).
            _write_flat_arrays(data_dir, manifest, temp, source, lambda: _cache_is_current(target, source))
        except _Superseded:
            log.info("another process installed a current flat cache at %s: this conversion stops", target)
            return False
        except OSError as e:
            raise DataDirError(f"cannot write the flat cache {target} ({e}): free space there, or pass "
                               "another cache dir (--data-cache)") from None
        _install(temp, target, source)
        log.info("flat arrays ready in %s (%.1f s)", target, time.monotonic() - started)
        return True
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # gone already after a successful rename


# How long a rank waits, with no sign of a conversion in progress, before it converts the cache
# itself (conversions are safe unlocked): local rank 0 may have failed, or not started yet.
BUILD_GRACE_S = 300.0


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """An exclusive ``flock`` on ``lock_path``, released on exit. Yields "held", "unsupported"
    (the lock file exists but the filesystem grants no flock, as Lustre mounted without it) or
    "unavailable" (no lock file: a read-only dir); without a lock the block runs unlocked."""
    fd, state = None, "unavailable"
    with contextlib.suppress(OSError):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    if fd is None:  # another user's lock file (0644 in a group's data dir): flock needs no write access
        with contextlib.suppress(OSError):
            fd = os.open(lock_path, os.O_RDONLY)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            state = "held"
        except BlockingIOError:
            log.info("waiting for another process to finish the flat cache (lock %s)", lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                state = "held"
            except OSError:
                state = "unsupported"
        except OSError:
            state = "unsupported"
    try:
        yield state
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


ABANDONED_BUILD_S = 3600  # a conversion appends to its files all along: an hour unchanged is a dead one


def _builds(target: str) -> list[str]:
    """The temporary dirs of conversions into ``target``."""
    parent, prefix = os.path.dirname(target), f".{os.path.basename(target)}.building-"
    with contextlib.suppress(OSError):
        return [entry.path for entry in os.scandir(parent) if entry.name.startswith(prefix)]
    return []


def _remove_abandoned_builds(target: str) -> None:
    """Temporary dirs of conversions killed mid-way (SIGKILL, out of memory, a lost node): each a
    partial copy of the corpus that nothing else removes. This host's, whose process is gone, once
    untouched for 5 minutes; others (another node's, older versions') for an hour."""
    remove_dead_leftovers(os.path.dirname(target), f".{os.path.basename(target)}.building-")
    for build in _builds(target):
        if time.time() - last_write(build) > ABANDONED_BUILD_S:
            shutil.rmtree(build, ignore_errors=True)
            if os.path.exists(build):  # another user's, say: said once a start, not claimed removed
                log.warning("%s: a conversion abandoned over %d minutes ago, which this process cannot remove",
                            build, ABANDONED_BUILD_S // 60)
            else:
                log.warning("removed %s, a conversion abandoned over %d minutes ago", build, ABANDONED_BUILD_S // 60)


def _converting_lately(target: str, within_s: float) -> bool:
    """Whether a conversion into ``target``'s temporary dirs wrote anything in the last ``within_s``."""
    return any(time.time() - last_write(build) < within_s for build in _builds(target))


def _wait_for_cache(target: str, source: dict, poll_s: float = 1.0) -> bool:
    """True once another process (this node's local rank 0) has installed a current cache at
    ``target``; False after BUILD_GRACE_S with no conversion in progress."""
    log.info("no file lock for the flat cache here: waiting for local rank 0 to convert it into %s", target)
    active = time.monotonic()
    while not _cache_is_current(target, source):
        if _converting_lately(target, BUILD_GRACE_S):
            active = time.monotonic()
        elif time.monotonic() - active > BUILD_GRACE_S:
            log.warning("no conversion of %s in progress for %.0f s: converting it here", target, BUILD_GRACE_S)
            return False
        time.sleep(poll_s)
    return True


def flat_cache(data_dir: str, manifest: dict, cache_dir: str | None = None) -> tuple[str, bool]:
    """(the directory of the data dir's flat arrays, whether this call built them).

    ``cache_dir`` (default ``DATA_DIR/flat``) is this data dir's cache; it is converted
    when missing or stale. Processes starting together: one converts, the others wait on
    the lock and then find it current. Where the filesystem grants no lock, each node's
    local rank 0 converts and that node's other ranks wait for it: every rank converting
    at once would write a copy each (8 a node), which on a shared filesystem can fill a quota.
    """
    target = os.path.abspath(cache_dir or os.path.join(data_dir, CACHE_DIR))
    source = cache_source(data_dir, manifest)
    if _cache_is_current(target, source):
        # A conversion killed before (the SIGKILL after a stop signal, a lost node) left its copy,
        # which only the next conversion removed: with a current cache there was none, ever.
        if int(os.environ.get("LOCAL_RANK") or 0) == 0:
            _remove_abandoned_builds(target)
        return target, False
    _check_replaceable(target, "--data-cache" if cache_dir else "the flat cache")
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(target), exist_ok=True)
    with _exclusive(os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")) as lock:
        if _cache_is_current(target, source):  # built while this process waited
            return target, False
        if lock == "unsupported" and int(os.environ.get("LOCAL_RANK") or 0) > 0 and _wait_for_cache(target, source):
            return target, False
        built = build_flat_cache(data_dir, manifest, target)
    return target, built


def map_flat_arrays(directory: str, names: Sequence[str], read_ahead: bool = True
                     ) -> tuple[dict[str, np.ndarray], ReadAhead]:
    """The flat arrays, memory-mapped read-only, and a ``ReadAhead`` on their files. Plain
    ndarray views of the maps: indexing a ``np.memmap`` subclass costs more, and the views
    keep the maps alive."""
    arrays, ahead = {}, ReadAhead(enabled=read_ahead)
    for name in names:
        mapped = np.load(os.path.join(directory, name + ".npy"), mmap_mode="r")
        _advise_random(mapped)
        ahead.add(name, mapped)
        arrays[name] = np.asarray(mapped)
    return arrays, ahead


def _advise_random(mapped: np.memmap) -> None:
    """Batches read rows of a few hundred bytes at random: without this hint a cold page
    cache makes the kernel read ahead 128 KiB from disk around every row it faults in.
    (Mapped file pages still count in a process's RSS: page-cache folios are mapped whole,
    about 0.4 MB per random row on this machine's ext4. They are shared by the ranks and
    reclaimable; a rank's own memory is its anonymous memory, RssAnon.)"""
    import mmap

    handle = getattr(mapped, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_RANDOM"):
        handle.madvise(mmap.MADV_RANDOM)
