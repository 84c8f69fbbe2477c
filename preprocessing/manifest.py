"""``manifest.json``: the contract between the data dir and its readers.

It records everything a reader must check before use (see docs/DESIGN.md) and is written
last, atomically (temp file + rename), so a data dir without one is incomplete.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing import examples, subwords, vocab
from preprocessing.options import PreprocessConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FINGERPRINT_BYTES = 1 << 20


def input_fingerprint(paths: Sequence[str]) -> str:
    """sha256 over each input's name, size, and first and last MiB.

    Hashing all of a 20 GB dump would take minutes; name + size + both ends tells
    dumps apart (they differ in their header's date and in their tail) in milliseconds.
    """
    h = hashlib.sha256()
    for path in sorted(paths):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            # The size from the open file: matching the path again would read "novel[1].txt" as
            # a glob, which does not match the file's own name.
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            h.update(f"{path.rsplit('/', 1)[-1]}\0{size}\0".encode())
            h.update(f.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                f.seek(size - _FINGERPRINT_BYTES)
                h.update(f.read(_FINGERPRINT_BYTES))
    return h.hexdigest()


def build_manifest(config: PreprocessConfig, input_paths: Sequence[str], tokenizer: subwords.TokenizerModel,
                   shards: Sequence[tuple[str, int]], counters: dict[str, int],
                   data_run_id: str | None, skipped_inputs: dict[str, list[str]] | None = None) -> dict:
    given = config.tokenizer is not None
    if tokenizer.kind == subwords.SENTENCEPIECE and given:  # its own type, not --model-type's default
        model_type = vocab.read_model(tokenizer.data).model_type
    else:
        model_type = config.model_type
    fields = {**subwords.manifest_fields(tokenizer, model_type), "given": given}
    if tokenizer.kind == subwords.SENTENCEPIECE and not given:
        fields["character_coverage"] = config.character_coverage
    segmenter = config.word_segmenter
    ex = config.examples
    columns = {
        "input_ids": f"list<int32>, {'masked' if ex.masking == 'static' else 'unmasked'}, "
                     "[CLS] A [SEP] B [SEP], no padding",
        "segment_ids": "list<int8>, 0 for [CLS] A [SEP], 1 for B [SEP]",
        "masked_lm_positions": "list<int32>, sorted",
        "masked_lm_ids": "list<int32>, original ids at masked_lm_positions",
        "next_sentence_labels": "int8, 1 = B is a random span, 0 = true continuation",
    }
    if stores_word_starts(config, tokenizer):
        columns[examples.WORD_STARTS] = "list<bool>, parallel to input_ids: the token starts a word"
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data_run_id": data_run_id,
        "tokenizer": {"path": "tokenizer", **fields},
        # What the text was read with: sentence rules and dump tables by language, script conversion.
        "language": config.language or "en",
        "convert": config.convert,
        "max_seq_length": ex.max_seq_length,
        # mlm-nsp: [CLS] A [SEP] B [SEP] pairs; mlm: packed FULL-SENTENCES rows, NSP labels all 0.
        "objective": ex.objective,
        "masking": {
            # static: input_ids hold the masked tokens; dynamic: unmasked, the loader masks per epoch.
            "mode": ex.masking,
            "masked_lm_prob": ex.masked_lm_prob,
            "max_predictions_per_seq": ex.max_predictions_per_seq,
            "whole_word_mask": segmenter != "none",
            # pieces: the vocabulary's word starts; jieba: Chinese words from the segmenter.
            "word_segmenter": None if segmenter == "none" else segmenter,
        },
        "dupe_factor": config.dupe_factor,
        "short_seq_prob": ex.short_seq_prob,
        "docs_per_bucket": config.docs_per_bucket,
        "split_bytes": config.split_bytes,
        "seed": config.seed,
        "input": {"paths": sorted(map(recorded_path, input_paths)), "fingerprint": input_fingerprint(input_paths),
                  # files matched but not read, by reason (a folder's README, an empty file, ...): a
                  # count and the first of them, so the manifest says what the corpus left out
                  **({"skipped": {reason: {"count": len(paths), "paths": sorted(map(recorded_path, paths))[:100]}
                                  for reason, paths in sorted(skipped_inputs.items()) if paths}}
                     if skipped_inputs and any(skipped_inputs.values()) else {})},
        "columns": columns,
        "num_examples": sum(rows for _, rows in shards),
        "shards": [{"path": path, "rows": rows} for path, rows in shards],
        "counters": dict(sorted(counters.items())),
    }


def recorded_path(path: str) -> str:
    """An input's path as the manifest records it: absolute for a local file, so the lineage still
    names it from another directory (a relative --input was recorded as typed); a URL as it is."""
    return path if "://" in path else os.path.abspath(path)


def stores_word_starts(config: PreprocessConfig, tokenizer: subwords.TokenizerModel) -> bool:
    """Whether the shards carry a word_starts column: unmasked rows grouped by word starts that
    the vocabulary's table alone cannot give (``transforms.tokenize`` makes them)."""
    if config.examples.masking != "dynamic" or config.word_segmenter == "none":
        return False
    return config.word_segmenter == "jieba" or tokenizer.prefixless


def write_manifest(output: str, manifest: dict) -> str:
    path = FileSystems.join(output, MANIFEST)
    temp = FileSystems.join(output, f".{MANIFEST}.inprogress")
    with FileSystems.create(temp) as f:
        f.write(json.dumps(manifest, indent=2).encode("utf-8"))
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temp], [path])
    return path


# What a data dir holds at its top level (hidden temporaries aside): a run's outputs, and the
# trainer's flat copy of the shards.
DATA_DIR_ENTRIES = frozenset({MANIFEST, "shards", "tokenizer", "parts", "flat"})


def foreign_entries(output: str) -> list[str]:
    """The entries of a local OUTPUT that no data dir holds, when it has no manifest: a rerun
    deletes OUTPUT/tokenizer/* and OUTPUT/parts, so --output naming a project's own folder would
    take its tokenizer/ with it. Empty for a data dir, a new or empty folder, or an object store."""
    if "://" in output or not os.path.isdir(output) or os.path.exists(os.path.join(output, MANIFEST)):
        return []
    return sorted(name for name in os.listdir(output) if not name.startswith(".") and name not in DATA_DIR_ENTRIES)


def holds_data_dir(output: str) -> bool:
    return FileSystems.exists(FileSystems.join(output, MANIFEST))


# OUTPUT/.previous: a local data dir set aside while a rerun writes OUTPUT, until its manifest is
# written. Hidden, so that foreign_entries passes over it.
PREVIOUS = ".previous"
FAILED = ".failed"  # a failed run's files, on their way out when the previous data dir comes back
SET_ASIDE = (MANIFEST, "shards", "tokenizer", "flat")  # the manifest first: OUTPUT stops looking complete


class Replacement:
    """A run's hold on the data dir it replaces (``replacing``)."""

    def __init__(self, output: str, kept: bool):
        self.output, self.kept, self.done = output, kept, False

    def written(self) -> None:
        """This run's manifest is written: the data dir it replaces goes."""
        self.done = True
        if self.kept:
            drop_previous(self.output)


@contextlib.contextmanager
def replacing(output: str) -> Iterator[Replacement]:
    """Clears OUTPUT for the run inside; a previous local data dir is kept aside and put back if
    the run raises (Ctrl-C and SIGTERM, as KeyboardInterrupt, too) before ``written``. The
    exception then carries ``restored_previous``, for the run's last line."""
    if "://" in output and holds_data_dir(output):
        # Said before it happens: a run that then fails (no text in the inputs, say) leaves none.
        log.warning("--output %s holds a data dir: it is deleted now (its manifest first, then its shards, "
                    "tokenizer and the trainer's flat copy), and this run writes its own", output)
    replacement = Replacement(output, set_aside_previous(output))
    if replacement.kept:
        log.info("--output %s: the previous data dir is kept in %s until this run's manifest is written; a run "
                 "that fails puts it back", output, os.path.join(output, PREVIOUS))
    try:
        yield replacement
    except BaseException as err:
        if replacement.kept and not replacement.done:
            restore_previous(output)
            err.restored_previous = True
            log.warning("--output %s: this run did not finish; the previous data dir is back in place", output)
        raise


def set_aside_previous(output: str) -> bool:
    """Clears OUTPUT for a run; True if a previous data dir was kept for ``restore_previous``.

    A local data dir is moved into OUTPUT/.previous, by renames (no copy, no room), its manifest
    first: a run that fails afterwards (a submission refused, input found bad late, Ctrl-C, a full
    disk) used to take the last good data with it. Its parts/ (a killed run's intermediates) are
    deleted. An OUTPUT/.previous that a run killed outright (kill -9, a node's crash) left is the
    last complete data dir, kept, whole: its manifest moves first and back last, so what it lacks
    and OUTPUT has is its own (a set-aside or a restore cut short), and is moved in; the unfinished
    run's files are deleted. Deleted instead, manifest first, as before: the previous outputs in an
    object store (gs://, s3://), where a rename is a copy, and a data dir whose shards, tokenizer or
    flat copy is a link to another disk (a rename would move the link, not the files)."""
    previous = os.path.join(output, PREVIOUS)
    linked = [name for name in SET_ASIDE if os.path.islink(os.path.join(output, name))]
    if "://" in output or linked:
        if linked and os.path.exists(os.path.join(output, MANIFEST)):
            log.warning("--output %s: %s is a link: the previous data dir is deleted now, not kept until this run "
                        "succeeds", output, ", ".join(linked))
        remove_stale_outputs(output)
        return False
    shutil.rmtree(os.path.join(output, FAILED), ignore_errors=True)  # a restore cut short left it
    if os.path.isdir(previous) and not os.path.exists(os.path.join(previous, MANIFEST)):
        shutil.rmtree(previous)  # killed before its first rename: nothing was moved into it
    if os.path.isdir(previous) and os.path.exists(os.path.join(output, MANIFEST)):
        shutil.rmtree(previous)  # killed after its manifest was written: OUTPUT is the newer data dir
    if not os.path.isdir(previous) and not os.path.exists(os.path.join(output, MANIFEST)):
        remove_stale_outputs(output)  # no data dir: an unfinished run's files
        return False
    os.makedirs(previous, exist_ok=True)
    for name in SET_ASIDE:
        if os.path.lexists(os.path.join(output, name)) and not os.path.lexists(os.path.join(previous, name)):
            os.rename(os.path.join(output, name), os.path.join(previous, name))
    remove_stale_outputs(output)  # parts/, and what an unfinished run wrote beside a kept data dir
    return True


def restore_previous(output: str) -> None:
    """Puts the data dir ``set_aside_previous`` kept back in place of a failed run's files: those
    are renamed out of the way first (deleting them could leave some behind, an NFS ``.nfs*``
    file, and a rename onto a folder that is not empty fails), the kept manifest back last."""
    previous, failed = os.path.join(output, PREVIOUS), os.path.join(output, FAILED)
    os.makedirs(failed, exist_ok=True)
    for name in DATA_DIR_ENTRIES:
        if os.path.lexists(os.path.join(output, name)):
            os.rename(os.path.join(output, name), os.path.join(failed, name))
    for name in reversed(SET_ASIDE):  # the manifest last: complete only once whole again
        if os.path.lexists(os.path.join(previous, name)):
            os.rename(os.path.join(previous, name), os.path.join(output, name))
    os.rmdir(previous)
    shutil.rmtree(failed, ignore_errors=True)


def drop_previous(output: str) -> None:
    """Deletes the data dir ``set_aside_previous`` kept, once this run's manifest is written."""
    shutil.rmtree(os.path.join(output, PREVIOUS), ignore_errors=True)


def remove_stale_outputs(output: str) -> None:
    """Deletes a previous run's manifest first, then its shards, tokenizer, parts and the
    trainer's flat copy of the shards."""
    path = FileSystems.join(output, MANIFEST)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    for pattern in ("shards/*", "shards/.*", "tokenizer/*"):
        matched = FileSystems.match([FileSystems.join(output, pattern)])[0].metadata_list
        if matched:
            FileSystems.delete([m.path for m in matched])
    # "flat": the trainer's memory-mapped copy of the old shards (pipeline/flat_cache.py).
    for name in ("parts", "flat"):
        delete_dir(output, name)


def delete_dir(output: str, name: str) -> None:
    """Deletes OUTPUT/name and everything in it, if it is there. In an object store (gs://, s3://)
    a folder is no object, only a prefix of its files' keys: ``exists`` said no and every part file
    stayed behind. A path ending in "/" is deleted there by prefix, in batches, reading no glob."""
    path = FileSystems.join(output, name)
    if "://" in path:
        FileSystems.delete([path.rstrip("/") + "/"])
    elif FileSystems.exists(path):
        FileSystems.delete([path])


def delete_leftover_temporaries(output: str) -> None:
    """Each write attempt has a temporary name of its own (parts.py): one killed before its rename
    leaves its file, hidden, beside the finished ones."""
    for folder in ("shards", "tokenizer"):
        matched = FileSystems.match([FileSystems.join(output, folder, ".*.inprogress")])[0].metadata_list
        if matched:
            FileSystems.delete([m.path for m in matched])
