"""pipeline/data.py on a real data dir written by preprocessing/run_beam.py from the dump sample."""

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data import (BatchSampler, DataDirError, PretrainingDataset, PretrainingLoader, padding_share,
                           read_manifest)

from .conftest import REPO, WIKI_SAMPLE

BATCH = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("loader") / "data")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", WIKI_SAMPLE,
         "--output", output, "--vocab-size", "8000", "--dupe-factor", "2", "--num-shards", "4", "--no-mlflow"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def dataset(data_dir):
    return PretrainingDataset(data_dir)


@pytest.fixture(scope="module")
def rows(data_dir):
    """The shards as Python rows, in manifest order: the reference the loader must match."""
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    tables = [pq.read_table(os.path.join(data_dir, s["path"])) for s in manifest["shards"]]
    return pa.concat_tables(tables).to_pylist()


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def take(loader, n):
    return list(itertools.islice(loader, n))


# ---------------------------------------------------------------------------- batches
def test_batch_shapes_dtypes_and_padding(dataset):
    manifest = dataset.manifest
    assert len(dataset) == manifest["num_examples"]
    sampler = BatchSampler(dataset.lengths, BATCH, seed=3)
    widths = set()
    for rows_ in sampler.epoch_batches(0)[:200]:
        batch = dataset.batch(rows_)
        n, width = batch["input_ids"].shape
        widths.add(width)
        assert n == BATCH and width % 8 == 0 and width <= manifest["max_seq_length"]
        assert width - 8 < dataset.lengths[rows_].max() <= width  # only to the longest, rounded up
        for key in ("input_ids", "token_type_ids", "attention_mask", "labels"):
            assert batch[key].shape == (n, width) and batch[key].dtype == torch.long
        assert batch["next_sentence_label"].shape == (n,) and batch["next_sentence_label"].dtype == torch.long
    assert len(widths) > 1  # length grouping gives short batches too


def test_batch_contents_match_the_shards(dataset, rows):
    pad = dataset.manifest["tokenizer"]["special_ids"]["pad"]
    picked = np.random.default_rng(0).choice(len(dataset), 64, replace=False)
    picked[0] = int(np.argmin(dataset.lengths))  # the shortest row: lots of padding
    batch = dataset.batch(picked)
    for i, r in enumerate(picked):
        row, n = rows[r], len(rows[r]["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, n:] == pad).all()
        assert batch["token_type_ids"][i, :n].tolist() == row["segment_ids"]
        assert (batch["token_type_ids"][i, n:] == 0).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][i]
        positions = row["masked_lm_positions"]
        assert positions and labels[positions].tolist() == row["masked_lm_ids"]
        others = torch.ones_like(labels, dtype=torch.bool)
        others[positions] = False
        assert (labels[others] == -100).all()
        assert batch["next_sentence_label"][i].item() == row["next_sentence_labels"]
    # the flat form of the same masks: row-major positions, their original ids
    width = batch["input_ids"].shape[1]
    expected = [(i * width + p, m) for i, r in enumerate(picked)
                for p, m in zip(rows[r]["masked_lm_positions"], rows[r]["masked_lm_ids"])]
    assert list(zip(batch["mlm_positions"].tolist(), batch["mlm_labels"].tolist())) == expected
    assert torch.equal(batch["labels"].flatten()[batch["mlm_positions"]], batch["mlm_labels"])


# ---------------------------------------------------------------------------- sampling
def test_ranks_are_disjoint_equal_and_cover_all_but_a_remainder(dataset):
    world = 4
    for epoch in (0, 1):
        parts = [BatchSampler(dataset.lengths, BATCH, rank=r, world_size=world, seed=7).epoch_batches(epoch)
                 for r in range(world)]
        assert len({p.shape for p in parts}) == 1  # same number of equal-size batches
        seen = np.concatenate([p.ravel() for p in parts])
        assert len(np.unique(seen)) == len(seen)  # disjoint, and no row twice within a rank
        assert 0 <= len(dataset) - len(seen) < world * BATCH


def test_order_is_a_function_of_seed_and_epoch(dataset):
    def order(seed, epoch, window=64):
        return BatchSampler(dataset.lengths, BATCH, seed=seed, length_window=window).epoch_batches(epoch)

    assert np.array_equal(order(1, 0), order(1, 0))
    assert not np.array_equal(order(1, 0), order(1, 1))
    assert not np.array_equal(order(1, 0), order(2, 0))
    assert not np.array_equal(order(1, 0, window=1), order(1, 1, window=1))


def test_length_grouping_lowers_padding(dataset):
    grouped = BatchSampler(dataset.lengths, 64, seed=1).epoch_batches(0)
    plain = BatchSampler(dataset.lengths, 64, seed=1, length_window=1).epoch_batches(0)
    assert sorted(grouped.ravel()) == sorted(plain.ravel())  # same rows, other batches
    assert padding_share(dataset.lengths, grouped, 128) < padding_share(dataset.lengths, plain, 128)


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("k", [5, 190])  # 190: the resumed run crosses the epoch boundary at 203
def test_resume_gives_exactly_the_remaining_batches(dataset, prefetch, k):
    def loader():
        sampler = BatchSampler(dataset.lengths, 64, rank=0, world_size=1, seed=11)
        return PretrainingLoader(dataset, sampler, prefetch=prefetch)

    total = len(dataset) // 64 + 20
    with loader() as uninterrupted:
        reference = take(uninterrupted, total)
    with loader() as first:
        take(first, k)
        state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (0, k)
    with loader() as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))  # it survives a JSON checkpoint
        same_batches(take(resumed, total - k), reference[k:])


def test_resume_mid_iteration_and_state_after_an_epoch(dataset):
    sampler = BatchSampler(dataset.lengths, 64, seed=5)
    per_epoch = len(sampler)
    with PretrainingLoader(dataset, sampler, prefetch=4) as loader:
        reference = take(loader, per_epoch + 3)
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch"] == 3
        loader.load_state_dict({"epoch": 0, "batch": per_epoch - 2})  # rewind a running loader
        same_batches(take(loader, 5), reference[per_epoch - 2:])


def test_resume_refuses_a_different_setup(dataset):
    state = BatchSampler(dataset.lengths, 64, seed=5).state_dict()
    with pytest.raises(ValueError, match="world_size was 1 when saved but is 2 now"):
        BatchSampler(dataset.lengths, 64, world_size=2, seed=5).load_state_dict(state)


def test_prefetch_gives_the_same_batches_and_stops(dataset):
    def batches(prefetch):
        with PretrainingLoader(dataset, BatchSampler(dataset.lengths, 32, seed=2), prefetch=prefetch) as loader:
            out = take(loader, 50)
            share = loader.real_token_share
        return out, share

    before = threading.active_count()
    (plain, share0), (fetched, share1) = batches(0), batches(4)
    same_batches(plain, fetched)
    assert share0 == share1 and 0.9 < share1 <= 1.0
    assert threading.active_count() == before  # close() ended the thread


# ---------------------------------------------------------------------------- manifest errors
@pytest.fixture
def broken(data_dir, tmp_path):
    """A copy of the data dir to break."""
    copy = str(tmp_path / "data")
    shutil.copytree(data_dir, copy)
    return copy


def edit_manifest(path, **changes):
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest.update(changes)
    json.dump(manifest, open(manifest_path, "w"))


def test_read_manifest_accepts_the_real_dir(data_dir):
    assert read_manifest(data_dir)["format_version"] == 1


def test_missing_dir(tmp_path):
    with pytest.raises(DataDirError, match="does not exist"):
        read_manifest(str(tmp_path / "nowhere"))


def test_missing_manifest(broken):
    os.remove(os.path.join(broken, "manifest.json"))
    with pytest.raises(DataDirError, match="has no manifest.json: the preprocessing run did not finish"):
        read_manifest(broken)


def test_unsupported_format_version(broken):
    edit_manifest(broken, format_version=99)
    with pytest.raises(DataDirError, match=r"manifest.json: format_version 99 is not supported"):
        PretrainingDataset(broken)


def test_missing_shard(broken):
    os.remove(os.path.join(broken, "shards", "part-00002-of-00004.parquet"))
    with pytest.raises(DataDirError, match=r"shards\[2\] 'shards/part-00002-of-00004.parquet' is listed but .* "
                                           "is missing"):
        read_manifest(broken)


def test_shard_row_count_differs(broken):
    path = os.path.join(broken, "shards", "part-00001-of-00004.parquet")
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)
    with pytest.raises(DataDirError, match=rf"shards\[1\].rows is {table.num_rows} but .*part-00001-of-00004"
                                           rf".parquet has {table.num_rows - 1} rows"):
        read_manifest(broken)
