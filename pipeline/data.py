"""The trainer's data loader: a preprocessing data dir → padded batches of torch tensors.

Reads contracts 1 and 2 of docs/DESIGN.md (manifest.json + Parquet shards). A training
process's own (anonymous) memory does not grow with the corpus: the rows live in
memory-mapped files whose pages the kernel shares between the ranks of a node, and
the batch order is computed a block at a time. Four parts:

- ``read_manifest``: refuses an unfinished or inconsistent data dir, naming file and field.
- ``flat_cache``: on first use, the shards (in manifest order) are converted, one row group
  at a time and checked on the way, into flat uncompressed ``.npy`` files in
  ``DATA_DIR/flat/`` (or ``cache_dir``): per list column its concatenated values (the
  Parquet dtype), one int64 offsets array (N + 1) per pair of columns that must agree
  row by row (input_ids/segment_ids, masked_lm_positions/masked_lm_ids), the row lengths
  (int16), next_sentence_labels (int8), and word_starts (bool) where the shards carry
  them. The cache is written to a temporary sibling
  and renamed into place when complete; ``flat.json`` in it records what it was built from
  (a hash of the manifest, each shard's path, rows and size), so a rewritten data dir is
  converted again. Ranks starting together take an ``fcntl.flock``: one converts, the
  others wait and then map its files. Without a working lock each node's local rank 0
  converts and that node's other ranks wait for it (``BUILD_GRACE_S``); concurrent
  conversions would each write into a temporary dir of their own and the renames settle it.
- ``PretrainingDataset``: the flat arrays opened with ``np.load(mmap_mode="r")``, and
  ``batch(rows)``, which gathers a padded batch in vectorized numpy in the
  ``BertForPreTraining`` convention.
- ``BatchSampler`` + ``PretrainingLoader``: per-rank, equal-size, length-grouped batches
  whose order is a pure function of (seed, epoch, rank). An epoch's order is a keyed
  pseudo-random bijection of the row indices (a Feistel network), cut into blocks of
  ~65k rows; only the block in use is materialized (length grouping and the batch
  shuffle happen inside it). A resume computes its position's block from the state
  (epoch, batch) instead of replaying batches; a daemon thread prepares the next
  batches ahead of the training loop.

No DeepSpeed here: the trainer passes its rank and world size in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import struct
import tempfile
import threading
import time
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.engine import PAD_MULTIPLE
from pipeline.length_batches import WINDOW_BATCHES, length_grouped
from pipeline.read_ahead import ReadAhead, one_batch_ahead
from preprocessing.examples import MASKINGS, WORD_STARTS

log = logging.getLogger(__name__)

SUPPORTED_FORMAT_VERSIONS = (1,)
IGNORE_INDEX = -100  # transformers' CrossEntropyLoss ignore_index for MLM labels
LIST_COLUMNS = ("input_ids", "segment_ids", "masked_lm_positions", "masked_lm_ids")
SCALAR_COLUMNS = ("next_sentence_labels",)
# Contract 2's value types; the flat arrays keep them.
COLUMN_DTYPES = {"input_ids": np.int32, "segment_ids": np.int8, "masked_lm_positions": np.int32,
                 "masked_lm_ids": np.int32, "next_sentence_labels": np.int8}


class DataDirError(ValueError):
    """A data dir the trainer cannot use; the message names the file and field."""


# ---------------------------------------------------------------------------- manifest
def read_manifest(data_dir: str) -> dict:
    """The data dir's manifest.json, after checking it against the files beside it.

    Checks: the dir and manifest exist, the format version is one this reader knows, the
    shard and tokenizer paths stay inside the data dir, every listed shard exists, pyarrow
    can read its footer, and it has the number of rows the manifest records.
    """
    if not os.path.isdir(data_dir):
        raise DataDirError(f"data dir {data_dir} does not exist (pass the --output of preprocessing/run_beam.py)")
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        if os.path.exists(os.path.join(data_dir, "train_config.json")) or os.path.isdir(
                os.path.join(data_dir, "checkpoints")):
            raise DataDirError(f"{data_dir} is a pretraining run dir, not a data dir: pass the --output of "
                               "preprocessing/run_beam.py (the run's train_config.json names the data it used)")
        raise DataDirError(f"{data_dir} has no manifest.json: the preprocessing run did not finish "
                           "(rerun preprocessing/run_beam.py with this --output)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataDirError(f"{path}: not valid JSON ({e})") from None
    for field in ("format_version", "max_seq_length", "tokenizer", "masking", "shards", "num_examples"):
        if field not in manifest:
            raise DataDirError(f"{path}: field {field!r} is missing")
    _check_manifest_types(path, manifest)
    version = manifest["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise DataDirError(f"{path}: format_version {version!r} is not supported by this trainer "
                           f"(supported: {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
                           "rerun preprocessing with the matching version of this repository")
    for i, shard in enumerate(manifest["shards"]):
        _check_inside(path, f"shards[{i}].path", shard.get("path") if isinstance(shard, dict) else None)
    if isinstance(manifest["tokenizer"], dict) and "path" in manifest["tokenizer"]:
        _check_inside(path, "tokenizer.path", manifest["tokenizer"]["path"])
    total = 0
    for i, shard in enumerate(manifest["shards"]):
        shard_path = os.path.join(data_dir, shard["path"])
        if not os.path.isfile(shard_path):
            raise DataDirError(f"{path}: shards[{i}] {shard['path']!r} is listed but {shard_path} is missing")
        rows = _open_shard(shard_path).metadata.num_rows
        if rows != shard["rows"]:
            raise DataDirError(f"{path}: shards[{i}].rows is {shard['rows']} but {shard_path} has {rows} rows "
                               "(the shard was rewritten or truncated after the manifest)")
        total += rows
    if total != manifest["num_examples"]:
        raise DataDirError(f"{path}: num_examples is {manifest['num_examples']} but the shards hold {total} rows")
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_manifest_types(path: str, manifest: dict) -> None:
    """The fields the trainer reads, of the types it reads them as: an edited manifest gave a
    KeyError or AttributeError traceback from wherever the field was first used."""
    def bad(field: str, value, want: str) -> DataDirError:
        return DataDirError(f"{path}: field {field} is {value!r}, expected {want} (rerun preprocessing/run_beam.py "
                            "rather than editing the manifest)")

    if not _is_count(manifest["max_seq_length"]) or manifest["max_seq_length"] < 4:
        raise bad("max_seq_length", manifest["max_seq_length"], "a whole number of tokens, at least 4")
    if not _is_count(manifest["num_examples"]):
        raise bad("num_examples", manifest["num_examples"], "a whole number")
    if not isinstance(manifest["masking"], dict):
        raise bad("masking", manifest["masking"], "an object (mode, masked_lm_prob, …)")
    tokenizer = manifest["tokenizer"]
    if not isinstance(tokenizer, dict):
        raise bad("tokenizer", tokenizer, "an object")
    if not _is_count(tokenizer.get("vocab_size")) or not tokenizer["vocab_size"]:
        raise bad("tokenizer.vocab_size", tokenizer.get("vocab_size"), "a positive whole number")
    special = tokenizer.get("special_ids")
    if not isinstance(special, dict):
        raise bad("tokenizer.special_ids", special, "an object of ids (pad, cls, sep, mask)")
    for name in ("pad", "cls", "sep", "mask"):
        if not _is_count(special.get(name)) or special[name] >= tokenizer["vocab_size"]:
            raise bad(f"tokenizer.special_ids.{name}", special.get(name),
                      f"an id below tokenizer.vocab_size {tokenizer['vocab_size']}")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise bad("shards", shards, "a non-empty list of {path, rows}")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not _is_count(shard.get("rows")):
            raise bad(f"shards[{i}]", shard, "an object with a path and a whole number of rows")


def _check_inside(manifest_path: str, field: str, value) -> None:
    """A path the manifest gives relative to its data dir must stay inside it: an absolute path or
    a '..' would have the trainer read, and the export copy, files from anywhere."""
    if not isinstance(value, str) or not value:
        raise DataDirError(f"{manifest_path}: field {field} is {value!r}, expected a path relative to the data dir")
    if os.path.isabs(value) or ".." in value.replace("\\", "/").split("/"):
        raise DataDirError(f"{manifest_path}: field {field} is {value!r}: it must be a path inside the data dir "
                           "(no absolute path, no '..')")


def _open_shard(shard_path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(shard_path)
    except (pa.ArrowException, OSError) as e:
        raise DataDirError(f"{shard_path}: pyarrow cannot read this shard ({e}); it is truncated or corrupt "
                           "(rerun preprocessing/run_beam.py)") from None


# ---------------------------------------------------------------------------- shards → flat arrays
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
    parquet = _open_shard(shard_path)
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
        temp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.building-", dir=parent)
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a shared data dir's cache from others
    except OSError as e:
        raise DataDirError(f"cannot write the flat cache {target} ({e}): pass a writable cache dir "
                           "(--data-cache) for a read-only data dir") from None
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


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


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


def _last_write(directory: str) -> float:
    """The newest modification time of ``directory`` and the files in it (0 if it is gone)."""
    with contextlib.suppress(OSError):
        return max([os.stat(directory).st_mtime] + [f.stat().st_mtime for f in os.scandir(directory)])
    return 0.0


def _remove_abandoned_builds(target: str) -> None:
    """Temporary dirs of conversions killed mid-way (SIGKILL, out of memory, a lost node): each a
    partial copy of the corpus that nothing else removes."""
    for build in _builds(target):
        if time.time() - _last_write(build) > ABANDONED_BUILD_S:
            shutil.rmtree(build, ignore_errors=True)
            if os.path.exists(build):  # another user's, say: said once a start, not claimed removed
                log.warning("%s: a conversion abandoned over %d minutes ago, which this process cannot remove",
                            build, ABANDONED_BUILD_S // 60)
            else:
                log.warning("removed %s, a conversion abandoned over %d minutes ago", build, ABANDONED_BUILD_S // 60)


def _converting_lately(target: str, within_s: float) -> bool:
    """Whether a conversion into ``target``'s temporary dirs wrote anything in the last ``within_s``."""
    return any(time.time() - _last_write(build) < within_s for build in _builds(target))


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


def _map_flat_arrays(directory: str, names: Sequence[str], read_ahead: bool = True
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


# ---------------------------------------------------------------------------- dataset
class PretrainingDataset:
    """All rows of a data dir as memory-mapped flat arrays; ``batch(rows)`` pads a batch.

    Per list column: ``values`` (all rows concatenated, the Parquet dtype) and
    ``offsets`` (int64, len rows + 1). Row ``i`` of input_ids is
    ``input_ids[input_ids_offsets[i]:input_ids_offsets[i + 1]]``. ``lengths`` (int16) is
    each row's token count. The arrays are read-only maps of the files in
    ``cache_dir`` (see ``flat_cache``); ``built_cache`` tells whether this instance
    converted the shards.
    """

    def __init__(self, data_dir: str, manifest: dict | None = None, pad_to_multiple_of: int = PAD_MULTIPLE,
                 cache_dir: str | None = None, seed: int = 0, read_ahead: bool = True):
        self.data_dir = data_dir
        self.manifest = manifest if manifest is not None else read_manifest(data_dir)
        masking = self.manifest["masking"].get("mode", "static")
        if masking not in MASKINGS:
            raise DataDirError(f"{data_dir}/manifest.json: masking.mode is {masking!r}; this loader reads "
                               f"{' or '.join(MASKINGS)} masking (rerun preprocessing)")
        self.masker = None
        if masking == "dynamic":  # rows stored unmasked: masks drawn per (seed, epoch, row)
            from pipeline.dynamic_masking import DynamicMasker

            try:
                self.masker = DynamicMasker(data_dir, self.manifest, seed)
            except (OSError, ValueError) as err:
                raise DataDirError(str(err)) from None
        self.max_seq_length = int(self.manifest["max_seq_length"])
        self.pad_id = int(self.manifest["tokenizer"]["special_ids"]["pad"])
        self.pad_to_multiple_of = pad_to_multiple_of

        self.cache_dir, self.built_cache = flat_cache(data_dir, self.manifest, cache_dir)
        arrays, self._read_ahead = _map_flat_arrays(self.cache_dir, flat_array_names(self.manifest), read_ahead)
        # dynamic masking gathers no stored masks, so their offsets are not read
        self._read_ahead.whole(a for a in PER_ROW_ARRAYS if a != "mask_offsets" or self.masker is None)
        self.word_starts = arrays.get(WORD_STARTS)
        self.input_ids, self.segment_ids = arrays["input_ids"], arrays["segment_ids"]
        self.input_ids_offsets = self.segment_ids_offsets = arrays["token_offsets"]
        self.masked_lm_positions, self.masked_lm_ids = arrays["masked_lm_positions"], arrays["masked_lm_ids"]
        self.masked_lm_positions_offsets = self.masked_lm_ids_offsets = arrays["mask_offsets"]
        self.next_sentence_labels = arrays["next_sentence_labels"]
        self.lengths = arrays["lengths"]
        if len(self.lengths) != self.manifest["num_examples"]:
            raise DataDirError(f"{self.cache_dir}: holds {len(self.lengths)} rows but the manifest has "
                               f"{self.manifest['num_examples']}; delete it to convert the shards again")

    def __len__(self) -> int:
        return len(self.lengths)

    def read_ahead(self, rows) -> None:
        """Queues the disk reads of every page ``batch(rows)`` will read and returns at once
        (pipeline/read_ahead.py); does nothing with ``read_ahead=False`` or off Linux."""
        if not self._read_ahead.enabled:
            return
        rows = np.asarray(rows, dtype=np.int64)
        per_token = ("input_ids", "segment_ids") + ((WORD_STARTS,) if self.word_starts is not None else ())
        self._read_ahead.spans(per_token, self.input_ids_offsets[rows], self.input_ids_offsets[rows + 1])
        if self.masker is None:  # dynamic masking stores no masks
            self._read_ahead.spans(("masked_lm_positions", "masked_lm_ids"),
                                   self.masked_lm_positions_offsets[rows], self.masked_lm_positions_offsets[rows + 1])

    def padded_length(self, rows: np.ndarray) -> int:
        """The batch's longest row rounded up to ``pad_to_multiple_of``, never past max_seq_length."""
        longest = int(self.lengths[rows].max())
        m = self.pad_to_multiple_of
        return min(-(-longest // m) * m, self.max_seq_length)

    def batch(self, rows, epoch: int = 0) -> dict[str, torch.Tensor]:
        """Rows ``rows`` padded to ``padded_length``, as ``BertForPreTraining`` keyword args.

        input_ids (pad = manifest's [PAD]), token_type_ids, attention_mask, labels (-100
        except at masked positions, which hold the original ids), next_sentence_label;
        all int64. Also the masked positions in flat form, for a head that predicts only
        those: ``mlm_positions`` (indices into the flattened ``(n, width)`` batch, in row
        order) and ``mlm_labels`` (the original ids there). With dynamic masking, ``epoch``
        selects the masks (see ``dynamic_masking``); static data ignores it.
        """
        rows = np.asarray(rows, dtype=np.int64)
        n, width = len(rows), self.padded_length(rows)
        lengths = self.lengths[rows]
        real = np.arange(width) < lengths[:, None]                     # (n, width) bool
        source = (self.input_ids_offsets[rows][:, None] + np.arange(width))[real]

        input_ids = np.full((n, width), self.pad_id, dtype=np.int64)
        input_ids[real] = self.input_ids[source]
        token_type_ids = np.zeros((n, width), dtype=np.int64)
        token_type_ids[real] = self.segment_ids[source]
        if self.masker is not None:
            word_starts = None if self.word_starts is None else self.word_starts[source]
            return self._masked(rows, epoch, input_ids, token_type_ids, real, lengths, word_starts)

        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        starts = self.masked_lm_positions_offsets[rows]
        counts = self.masked_lm_positions_offsets[rows + 1] - starts
        batch_row = np.repeat(np.arange(n), counts)
        # index of each prediction in the flat arrays: its row's start + its rank within the row
        flat = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        positions = self.masked_lm_positions[flat].astype(np.int64)
        labels[batch_row, positions] = self.masked_lm_ids[flat]

        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(self.next_sentence_labels[rows].astype(np.int64)),
            "mlm_positions": torch.from_numpy(batch_row * width + positions),
            "mlm_labels": torch.from_numpy(self.masked_lm_ids[flat].astype(np.int64)),
        }

    __getitem__ = batch

    def _masked(self, rows, epoch, input_ids, token_type_ids, real, lengths, word_starts
                ) -> dict[str, torch.Tensor]:
        """The batch of unmasked rows with this epoch's masks drawn (whole words by the rows' own
        ``word_starts`` where the data dir stores them, else by the vocabulary's table)."""
        n, width = input_ids.shape
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        len_a = (real & (token_type_ids == 0)).sum(axis=1) - 2  # [CLS] A [SEP] are segment 0
        masked, batch_row, positions, originals = self.masker.mask(
            rows, epoch, input_ids[real], offsets, len_a, word_starts)
        input_ids[real] = masked
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        labels[batch_row, positions] = originals
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(self.next_sentence_labels[rows].astype(np.int64)),
            "mlm_positions": torch.from_numpy(batch_row * width + positions),
            "mlm_labels": torch.from_numpy(originals.astype(np.int64)),
        }


# ---------------------------------------------------------------------------- sampling
ORDER = "feistel-blocks-1"  # the order's design, in the sampler state: a resume needs the same
BLOCK_ROWS = 1 << 16  # rows of an epoch materialized at a time (a few MB of work arrays)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's multipliers


class RowPermutation:
    """A keyed pseudo-random bijection of [0, n), evaluated for any positions in O(their count).

    A 4-round Feistel network over the smallest even number of bits covering n (a domain
    of at most 4n), with cycle walking: a value that lands outside [0, n) is permuted
    again until it lands inside, which keeps the map a bijection of [0, n). The round
    function is splitmix64's output mix of (half + round key). Replaces
    ``rng.permutation(n)``, whose n int64 (1.4 GB for 170M rows) every rank held.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.shift = np.uint64(64 - self.half)
        # [.., 1]: a stream apart from the block shuffles' [seed, epoch, block, 2]
        self.keys = np.random.default_rng([seed, epoch, 1]).integers(0, 2**63, self.ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        z = right + key
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
        return z >> self.shift  # the top bits

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(out >= self.n)
        while outside.size:  # ~1 extra pass on average (the domain is < 4n)
            out[outside] = self._feistel(out[outside])
            outside = outside[out[outside] >= self.n]
        return out.astype(np.int64)


class BatchSampler:
    """Row indices of rank ``rank``'s micro-batches, epoch after epoch, from (seed, epoch).

    Each epoch is one global list of micro-batches, the same whatever the number of
    processes. Position p of the epoch holds row ``RowPermutation(rows, seed, epoch)(p)``;
    the positions are cut into blocks of ``block_batches`` batches (~65k rows). Within a
    block, windows of ``length_window`` batches are sorted by length (stable: equal
    lengths keep their random order) and cut into batches of similar length, then the
    block's batches are shuffled by ``default_rng([seed, epoch, block, 2])``. Global
    batch g is batch ``g % block_batches`` of block ``g // block_batches``; rank r takes
    global batches r, r + world, r + 2·world, … So an optimizer step of ``world ×
    accumulation`` micro-batches covers the same rows for 1 process accumulating 2 and
    for 2 processes accumulating 1: the same global batch gives the same loss. An epoch
    is cut to a multiple of ``world_size × accumulation_steps`` batches, so every rank
    runs the same number of steps (a rank that ran out early would hang the others'
    collectives).

    Memory: one block's arrays (a few MB), whatever the number of rows; ``lengths`` is
    only indexed (pass the dataset's memory map). The state is (epoch, batch): the next
    batch to produce. Iterating is endless (epoch after epoch) and advances the state;
    ``load_state_dict`` jumps anywhere, computing one block.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, length_window: int = WINDOW_BATCHES, accumulation_steps: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or length_window < 1:
            raise ValueError(f"batch_size ({batch_size}) and length_window ({length_window}) must be >= 1")
        self.lengths = lengths if isinstance(lengths, np.ndarray) else np.asarray(lengths)
        self.rows = len(self.lengths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.length_window = seed, length_window
        per_step = world_size * accumulation_steps
        self.global_batches = self.rows // batch_size // per_step * per_step
        self.batches_per_epoch = self.global_batches // world_size
        if self.batches_per_epoch == 0:
            raise DataDirError(f"the {self.rows} training rows are fewer than one global batch ({world_size} "
                               f"process(es) × micro-batch {batch_size} × accumulation {accumulation_steps} = "
                               f"{per_step * batch_size}): lower --global-batch-size, or preprocess more data")
        # whole windows per block, so that no length window straddles two blocks
        self.block_batches = length_window * max(1, BLOCK_ROWS // (length_window * batch_size))
        self.epoch, self.batch = 0, 0
        self._block: tuple[int, int, np.ndarray] | None = None  # (epoch, block, its batches)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def block(self, epoch: int, block: int) -> np.ndarray:
        """(batches, batch_size) row indices of the global batches in ``block`` of ``epoch``."""
        first = block * self.block_batches
        count = min(self.block_batches, self.global_batches - first)
        b = self.batch_size
        rows = RowPermutation(self.rows, self.seed, epoch)(np.arange(first * b, (first + count) * b,
                                                                     dtype=np.uint64))
        if self.length_window == 1:
            return rows.reshape(count, b)  # already a random order: nothing to shuffle
        return length_grouped(rows, self.lengths, b, np.random.default_rng([self.seed, epoch, block, 2]),
                              self.length_window)

    def global_batch(self, epoch: int, index: int) -> np.ndarray:
        """Row indices of global batch ``index`` of ``epoch``; computes its block once."""
        block = index // self.block_batches
        cached = self._block  # one read: the prefetch thread may replace it meanwhile
        if cached is None or cached[:2] != (epoch, block):
            cached = (epoch, block, self.block(epoch, block))
            self._block = cached
        return cached[2][index % self.block_batches]

    def rows_of(self, epoch: int, batch: int) -> np.ndarray:
        """Row indices of this rank's ``batch``-th micro-batch of ``epoch``."""
        return self.global_batch(epoch, self.rank + batch * self.world_size)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size) row indices of this rank's batches in ``epoch``.

        A whole epoch at once, for tests and measurements; training iterates ``positions``.
        """
        blocks = -(-self.global_batches // self.block_batches)
        batches = np.concatenate([self.block(epoch, k) for k in range(blocks)])
        return batches[self.rank::self.world_size]

    def positions(self, epoch: int, batch: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch, rows) from the given position on, endlessly; leaves the state alone."""
        while True:
            for b in range(batch, self.batches_per_epoch):
                yield epoch, b, self.rows_of(epoch, b)
            epoch, batch = epoch + 1, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for epoch, b, rows in self.positions(self.epoch, self.batch):
            self.epoch, self.batch = (epoch, b + 1) if b + 1 < self.batches_per_epoch else (epoch + 1, 0)
            yield rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "rows": self.rows, "order": ORDER}

    def load_state_dict(self, state: dict) -> None:
        for field, have in (("seed", self.seed), ("world_size", self.world_size),
                            ("batch_size", self.batch_size), ("rows", self.rows), ("order", ORDER)):
            if field in state and state[field] != have:
                raise ValueError(f"data loader state: {field} was {state[field]} when saved but is {have} now; "
                                 "an exact resume needs the same data, seed, world size, micro-batch size "
                                 "and sampler version")
        if "order" not in state:
            log.warning("data loader state saved by an older sampler: the rest of epoch %s follows this "
                        "sampler's order, so some of its rows may repeat or be skipped", state["epoch"])
        if not (0 <= state["batch"] < self.batches_per_epoch and state["epoch"] >= 0):
            raise ValueError(f"data loader state: position epoch {state['epoch']} batch {state['batch']} is "
                             f"outside an epoch of {self.batches_per_epoch} batches")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def training_rows(manifest: dict, eval_shards: int) -> int:
    """How many rows (from the start, in manifest order) train; the last ``eval_shards``
    shards are held out for evaluation. Refuses to hold out every shard."""
    shards = manifest["shards"]
    if eval_shards >= len(shards):
        raise DataDirError(f"--eval-shards {eval_shards}: the data dir has {len(shards)} shard(s), and at least "
                           "one must be left to train on (rerun preprocessing with more --num-shards, or "
                           "pass --eval-shards 0)")
    return sum(int(s["rows"]) for s in shards[:len(shards) - eval_shards])


def eval_batches(lengths: np.ndarray, start: int, batch_size: int, rank: int, world_size: int,
                 max_rows: int = 0, seed: int = 0) -> list[np.ndarray]:
    """This rank's evaluation micro-batches over rows ``start:``, the same at every evaluation.

    The rows are a seeded sample of ``max_rows`` of them (all when 0) — random, so that a
    partial evaluation is not biased towards any length — and do not depend on the number of
    processes or the micro-batch: the eval loss of a run resumed on another number of
    processes is the same measure as before it. Sorted by length so batches pad little, they
    are cut into a multiple of ``world_size`` batches of at most ``batch_size`` rows (every
    rank runs the same number of forward passes: ZeRO-3 gathers parameters collectively).
    A sample of whole global batches (the default) makes batches of exactly ``batch_size``;
    all held-out rows (``max_rows`` 0) may give two sizes, one graph more each under
    ``--compile``. With ``batch_size`` 1 and rows not a multiple of ``world_size``, the
    remainder is left out: the one case where the rows depend on the number of processes.
    Memory: O(the held-out rows), whatever the rows before ``start``.
    """
    rows = np.arange(start, len(lengths))
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    if max_rows:
        rows = rows[:max_rows]
    count = -(-len(rows) // batch_size // world_size) * world_size if len(rows) else 0
    if count > len(rows):  # fewer rows than processes × batches of one row: a batch each, the rest unused
        count = len(rows) // world_size * world_size
        rows = rows[:count]
    rows = rows[np.argsort(lengths[rows], kind="stable")]
    return np.array_split(rows, count)[rank::world_size] if count else []


def padding_share(lengths: np.ndarray, batches: np.ndarray, max_seq_length: int,
                  multiple: int = PAD_MULTIPLE) -> float:
    """Share of pad tokens in ``batches`` (rows of row indices) padded as ``PretrainingDataset`` pads."""
    batch_lengths = lengths[batches].astype(np.int64)  # the dataset's int16 would overflow below
    width = np.minimum(-(-batch_lengths.max(axis=1) // multiple) * multiple, max_seq_length)
    total = (width * batches.shape[1]).sum()
    return float(1.0 - batch_lengths.sum() / total)


# ---------------------------------------------------------------------------- loader
def _assemble(dataset: PretrainingDataset, rows: np.ndarray, pin_memory: bool, epoch: int
              ) -> dict[str, torch.Tensor]:
    batch = dataset.batch(rows, epoch)
    if pin_memory:  # what goes to the GPU: the dense "labels" stay on the host
        batch = {k: v if k == "labels" else v.pin_memory() for k, v in batch.items()}
    return batch


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; False when stopped."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _produce(dataset: PretrainingDataset, pin_memory: bool, positions: Iterator, out: queue.Queue,
             stop: threading.Event, device: int | None = None) -> None:
    """The prefetch thread: (epoch, batch, tensors) into ``out`` until ``stop``.

    ``device``: the rank's GPU, made this thread's current one as PyTorch's DataLoader does in
    its pin-memory thread: a new thread's current device is GPU 0, where pinning could otherwise
    open a CUDA context for every rank of the node."""
    if device is not None:
        torch.cuda.set_device(device)
    try:
        for epoch, b, rows in positions:
            if not _put(out, (epoch, b, _assemble(dataset, rows, pin_memory, epoch)), stop):
                return
    except BaseException as e:  # handed to the consumer, which re-raises it
        _put(out, e, stop)


class PretrainingLoader:
    """Endless iterator of padded batches for one rank, prepared ``prefetch`` batches ahead.

    A daemon thread assembles batches (pinned when CUDA is available, unless
    ``pin_memory=False``) into a bounded queue; ``close()`` (or exiting a ``with``)
    stops it. ``prefetch=0`` assembles in the caller's thread. ``state_dict()`` is the
    position of the next batch the *caller* receives, whatever the thread has prepared.
    ``real_token_share`` / ``last_real_token_share``: non-pad share of all tokens
    delivered / of the last batch.
    """

    def __init__(self, dataset: PretrainingDataset, sampler: BatchSampler, prefetch: int = 4,
                 pin_memory: bool | None = None):
        self.dataset, self.sampler, self.prefetch = dataset, sampler, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.real_tokens = self.total_tokens = 0
        self.last_real_token_share = float("nan")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._positions: Iterator | None = None

    # -- producing
    def _make(self, rows: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        return _assemble(self.dataset, rows, self.pin_memory, epoch)

    def _start(self) -> None:
        positions = one_batch_ahead(self.dataset.read_ahead, self.sampler.positions(self.sampler.epoch, self.sampler.batch),
                                    rows=lambda position: position[2])  # (epoch, batch, rows)
        if self.prefetch <= 0:
            self._positions = positions
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        # the thread holds no reference to self, so an abandoned loader is collected and
        # __del__ stops the thread
        device = torch.cuda.current_device() if self.pin_memory and torch.cuda.is_available() else None
        self._thread = threading.Thread(target=_produce, args=(self.dataset, self.pin_memory, positions,
                                                               self._queue, self._stop, device),
                                        name="pretraining-prefetch", daemon=True)
        self._thread.start()

    # -- consuming
    def __iter__(self) -> PretrainingLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._thread is None and self._positions is None:
            self._start()
        if self._positions is not None:
            epoch, b, rows = next(self._positions)
            batch = self._make(rows, epoch)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            epoch, b, batch = item
        # the sampler's state follows what the caller has received
        self.sampler.epoch, self.sampler.batch = (epoch, b + 1) if b + 1 < len(self.sampler) else (epoch + 1, 0)
        real, total = int(batch["attention_mask"].sum()), batch["attention_mask"].numel()
        self.real_tokens += real
        self.total_tokens += total
        self.last_real_token_share = real / total
        return batch

    @property
    def real_token_share(self) -> float:
        return self.real_tokens / self.total_tokens if self.total_tokens else float("nan")

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Stop the prefetch thread (it exits within ~0.1 s); the next ``next()`` restarts it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = self._queue = self._positions = None

    def __enter__(self) -> PretrainingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()
