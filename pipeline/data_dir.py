"""A preprocessing data dir as the trainer reads it: ``read_manifest`` refuses an unfinished or
inconsistent one, naming the file and field (contracts 1 and 2 of docs/DESIGN.md: manifest.json
and the Parquet shards it lists)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.footers import read_footers

# preprocessing/manifest.py's PREVIOUS (importing it would load Apache Beam into every rank): where
# a rerun keeps the data dir it replaces until its own manifest is written.
PREVIOUS = ".previous"

SUPPORTED_FORMAT_VERSIONS = (1,)
LIST_COLUMNS = ("input_ids", "segment_ids", "masked_lm_positions", "masked_lm_ids")
# Contract 2's value types; the flat arrays keep them.
COLUMN_DTYPES = {"input_ids": np.int32, "segment_ids": np.int8, "masked_lm_positions": np.int32,
                 "masked_lm_ids": np.int32, "next_sentence_labels": np.int8}


class DataDirError(ValueError):
    """A data dir the trainer cannot use; the message names the file and field."""


# What decides a data dir's examples, as its manifest records it. Left out: when and by which
# MLflow run it was written, the input paths (the input fingerprint covers the files themselves)
# and the counters (they follow from these).
RECIPE_FIELDS = ("input", "tokenizer", "language", "convert", "max_seq_length", "objective", "masking",
                 "dupe_factor", "short_seq_prob", "docs_per_bucket", "split_bytes", "seed", "num_examples",
                 "shards")


def data_recipe(manifest: dict) -> dict:
    """The manifest's fields that decide the examples: equal for a rerun of the same preprocessing,
    different once the corpus, tokenizer or any setting that shapes the examples changed."""
    recipe = {field: manifest.get(field) for field in RECIPE_FIELDS}
    if isinstance(recipe["input"], dict):
        recipe["input"] = {"fingerprint": recipe["input"].get("fingerprint")}
    return recipe


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
        previous = os.path.join(data_dir, PREVIOUS)
        if os.path.isfile(os.path.join(previous, "manifest.json")):
            raise DataDirError(f"{data_dir} has no manifest.json: a preprocessing run into it is running or was "
                               f"killed; the data dir it replaces is kept in {previous} (a run that fails puts it "
                               "back; rerun preprocessing/run_beam.py with this --output)")
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
    def footer_rows(i: int) -> int:
        shard = manifest["shards"][i]
        shard_path = os.path.join(data_dir, shard["path"])
        if not os.path.isfile(shard_path):
            raise DataDirError(f"{path}: shards[{i}] {shard['path']!r} is listed but {shard_path} is missing")
        rows = open_shard(shard_path).metadata.num_rows
        if rows != shard["rows"]:
            raise DataDirError(f"{path}: shards[{i}].rows is {shard['rows']} but {shard_path} has {rows} rows "
                               "(the shard was rewritten or truncated after the manifest)")
        return rows

    # Every rank reads every footer at start.
    total = sum(read_footers(footer_rows, range(len(manifest["shards"]))))
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


def open_shard(shard_path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(shard_path)
    except (pa.ArrowException, OSError) as e:
        raise DataDirError(f"{shard_path}: pyarrow cannot read this shard ({e}); it is truncated or corrupt "
                           "(rerun preprocessing/run_beam.py)") from None
