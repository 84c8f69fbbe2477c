"""pipeline/data.py with its data dir checks, flat cache and sampler (data_dir.py, flat_cache.py,
sampler.py) on a real data dir written by preprocessing/run_beam.py from the dump sample."""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data import PretrainingDataset, PretrainingLoader
from pipeline.data_dir import DataDirError, read_manifest
from pipeline.flat_cache import PER_ROW_ARRAYS
from pipeline.sampler import BatchSampler, RowPermutation, padding_share

from .conftest import REPO

BATCH = 16


@pytest.fixture(scope="module")
def data_dir(preprocessed_sample):
    """Four shards (the tests below name them); shared, so the tests that break it copy it first."""
    return preprocessed_sample("--vocab-size", "8000", "--dupe-factor", "2", "--num-shards", "4")


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


def assert_batch_matches_rows(dataset, rows, picked):
    """``dataset.batch(picked)`` holds exactly the Python rows ``rows[picked]``, padded."""
    pad = dataset.manifest["tokenizer"]["special_ids"]["pad"]
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


def test_batch_contents_match_the_shards(dataset, rows):
    picked = np.random.default_rng(0).choice(len(dataset), 64, replace=False)
    picked[0] = int(np.argmin(dataset.lengths))  # the shortest row: lots of padding
    picked[1] = len(dataset) - 1  # the last row of the last shard: the offsets run to the end
    assert_batch_matches_rows(dataset, rows, picked)


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


def test_the_loader_counts_each_batchs_real_lengths_squared(dataset):
    # attention's FLOPs grow with each sequence's length squared (FlopCounter), not the mean's
    squared, lengths, sampler = 0, [], BatchSampler(dataset.lengths, 32, seed=2)
    with PretrainingLoader(dataset, sampler, prefetch=2) as loader:
        for batch in itertools.islice(loader, len(sampler)):  # an epoch, one at a time: last_ is this batch's
            batch_lengths = batch["attention_mask"].sum(-1).tolist()
            assert loader.last_squared_tokens == sum(t * t for t in batch_lengths)
            squared, lengths = squared + loader.last_squared_tokens, lengths + batch_lengths
    # the dump sample's lengths: the square of the mean length would undercount attention by 1.9%
    assert squared > 1.015 * sum(lengths) ** 2 / len(lengths)


def pages(array, starts, stops):
    """The page numbers (in this process's address space) holding each span of a mapped array."""
    size = os.sysconf("SC_PAGE_SIZE")
    first = (array.ctypes.data + np.asarray(starts) * array.itemsize) // size
    last = (array.ctypes.data + np.asarray(stops) * array.itemsize - 1) // size
    return set(itertools.chain.from_iterable(range(a, b + 1) for a, b in zip(first.tolist(), last.tolist())))


def in_memory(page_numbers):
    """Which of these pages of file maps are in the page cache (mincore; the files are ours)."""
    import ctypes

    libc, size = ctypes.CDLL(None, use_errno=True), os.sysconf("SC_PAGE_SIZE")
    vec = ctypes.c_ubyte()
    out = {}
    for page in page_numbers:
        assert libc.mincore(ctypes.c_void_p(page * size), ctypes.c_size_t(size), ctypes.byref(vec)) == 0
        out[page] = bool(vec.value & 1)
    return out


def wait_in_memory(page_numbers, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not all((state := in_memory(page_numbers)).values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return state


needs_fadvise = pytest.mark.skipif(not hasattr(os, "POSIX_FADV_WILLNEED"), reason="read-ahead needs posix_fadvise")


def evicted(directory, page_numbers):
    """Drops a flat cache from the page cache; skips the test where that cannot be seen (tmpfs)."""
    from benchmarks.data_loader import evict

    evict(directory)
    if any(in_memory(page_numbers).values()):
        pytest.skip(f"{directory}: its pages stay in memory after POSIX_FADV_DONTNEED (tmpfs?)")


@needs_fadvise
def test_the_loader_has_the_next_batch_read_from_disk_while_it_hands_out_this_one(data_dir, tmp_path):
    """On a cold page cache the gather faults its rows in one read at a time; the loader asks the
    kernel for all of the next batch's pages first (pipeline/read_ahead.py)."""
    def batch_pages(dataset, sampler, b):
        rows = sampler.rows_of(0, b)
        tokens = (dataset.input_ids_offsets[rows], dataset.input_ids_offsets[rows + 1])
        masks = (dataset.masked_lm_positions_offsets[rows], dataset.masked_lm_positions_offsets[rows + 1])
        return (pages(dataset.input_ids, *tokens) | pages(dataset.segment_ids, *tokens)
                | pages(dataset.masked_lm_ids, *masks) | pages(dataset.masked_lm_positions, *masks))

    for read_ahead in (True, False):
        # a cache of its own: pages another test's map holds cannot be dropped
        dataset = PretrainingDataset(data_dir, cache_dir=str(tmp_path / str(read_ahead)), read_ahead=read_ahead)
        sampler = BatchSampler(dataset.lengths, BATCH, seed=0)
        first, second, third = (batch_pages(dataset, sampler, b) for b in range(3))
        evicted(dataset.cache_dir, first | second | third)
        loader = PretrainingLoader(dataset, sampler, prefetch=0)
        next(loader)  # gathers the first batch
        if read_ahead:
            assert all(wait_in_memory(second).values())
            assert not any(in_memory(third - first - second).values())  # asked for one batch ahead only
        else:
            time.sleep(0.5)
            assert not any(in_memory(second - first).values())  # waiting for the gather's faults
        assert all(in_memory(first).values())
        loader.close()



@needs_fadvise
def test_the_arrays_indexed_by_row_are_read_whole_on_opening(data_dir, tmp_path):
    """1.3M rows: 10 MB of offsets, more than Linux reads for one call (8 MiB on this VM)."""
    from benchmarks.data_loader import replicate

    data = replicate(data_dir, 100, str(tmp_path / "replicated"))
    converted = PretrainingDataset(data, read_ahead=False)
    cache = converted.cache_dir
    evicted(cache, pages(converted.lengths, [0], [len(converted.lengths)]))
    del converted  # its maps: pages a process maps are not dropped
    dataset = PretrainingDataset(data)
    per_row = {"token_offsets": dataset.input_ids_offsets, "mask_offsets": dataset.masked_lm_positions_offsets,
               "lengths": dataset.lengths, "next_sentence_labels": dataset.next_sentence_labels}
    assert set(per_row) == set(PER_ROW_ARRAYS) and dataset.input_ids_offsets.nbytes > 8 << 20
    for name, array in per_row.items():
        state = wait_in_memory(pages(array, [0], [len(array)]))
        assert all(state.values()), f"{name}: {sum(state.values())} of {len(state)} pages read"
    tokens = in_memory(pages(dataset.input_ids, [0], [len(dataset.input_ids)]))
    assert sum(tokens.values()) < 0.01 * len(tokens)  # the token arrays are read a batch at a time
    del dataset
    shutil.rmtree(cache)  # 1 GB


@needs_fadvise
def test_a_file_system_refusing_the_read_ahead_advice_only_turns_it_off(dataset, data_dir, monkeypatch, caplog):
    def refuse(fd, offset, length, advice):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse, raising=False)
    refused = PretrainingDataset(data_dir)
    assert not refused._read_ahead.enabled
    assert caplog.text.count("read-ahead of the flat arrays is off") == 1
    assert "posix_fadvise on token_offsets.npy failed ([Errno 22] Invalid argument)" in caplog.text
    with PretrainingLoader(refused, BatchSampler(refused.lengths, BATCH, seed=4)) as loader:
        got = take(loader, 5)
    with PretrainingLoader(dataset, BatchSampler(dataset.lengths, BATCH, seed=4)) as loader:
        same_batches(got, take(loader, 5))


# ---------------------------------------------------------------------------- the sampler at scale
def synthetic_lengths(n, seed=0):
    return np.random.default_rng(seed).integers(8, 129, n, dtype=np.int16)


def test_row_permutation_is_a_bijection_keyed_by_seed_and_epoch():
    for n in (1, 2, 3, 5, 1000, 4097, 65_537):
        order = RowPermutation(n, seed=3, epoch=1)(np.arange(n))
        assert np.array_equal(np.sort(order), np.arange(n)), n
    a, b, c = (RowPermutation(10_000, s, e)(np.arange(10_000)) for s, e in ((3, 1), (3, 2), (4, 1)))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(np.corrcoef(np.arange(10_000), a)[0, 1]) < 0.05  # no trace of the identity left


def test_sampler_memory_does_not_grow_with_the_rows():
    lengths = synthetic_lengths(50_000_000)  # 100 MB, made before tracing: the loader maps it from disk
    tracemalloc.start()
    try:
        started = time.perf_counter()
        sampler = BatchSampler(lengths, 64, rank=3, world_size=8, seed=1, accumulation_steps=2)
        first, late = sampler.rows_of(0, 0), sampler.rows_of(4, len(sampler) - 1)
        sampler.load_state_dict({**sampler.state_dict(), "epoch": 2, "batch": len(sampler) // 2})
        for rows_ in itertools.islice(sampler, 500):
            assert len(rows_) == 64
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # measured: 4.0 MiB and 0.1 s (a full permutation would take 400 MB, the old epoch array 800 MB)
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert seconds < 10
    assert len(np.unique(np.concatenate([first, late]))) == 128 and late.max() < len(lengths)


def test_resume_deep_into_an_epoch_gives_the_batches_iterating_gave():
    # ~9 blocks of 8,192 batches per epoch: the positions below cross block and epoch boundaries
    lengths = synthetic_lengths(600_011)

    def sampler():
        return BatchSampler(lengths, 8, rank=1, world_size=3, seed=9, accumulation_steps=2)

    per_epoch = len(sampler())
    reference = list(itertools.islice(sampler(), per_epoch + 100))
    for position in (1, 2730, 2731, 16_384, per_epoch - 3):
        resumed = sampler()
        resumed.load_state_dict({**resumed.state_dict(), "epoch": 0, "batch": position})
        for expected, got in zip(reference[position:position + 120], resumed):
            assert np.array_equal(expected, got), position
    assert np.array_equal(np.stack(reference[:per_epoch]), sampler().epoch_batches(0))


def test_every_row_of_an_epoch_appears_once_across_ranks():
    lengths = synthetic_lengths(200_003)
    batch, world, accumulation = 8, 3, 2
    for epoch in (0, 3):
        parts = [BatchSampler(lengths, batch, rank=r, world_size=world, seed=4,
                              accumulation_steps=accumulation).epoch_batches(epoch) for r in range(world)]
        assert len({p.shape for p in parts}) == 1
        seen = np.concatenate([p.ravel() for p in parts])
        assert len(np.unique(seen)) == len(seen)
        assert 0 <= len(lengths) - len(seen) < world * accumulation * batch  # only the cut remainder
    grouped = BatchSampler(lengths, 64, seed=4).epoch_batches(0)
    plain = BatchSampler(lengths, 64, seed=4, length_window=1).epoch_batches(0)
    assert padding_share(lengths, grouped, 128) < padding_share(lengths, plain, 128) / 4  # 6.1% vs 46.9%


def test_one_process_accumulating_two_sees_the_global_batches_of_two_processes():
    lengths = synthetic_lengths(150_001)
    alone = BatchSampler(lengths, 16, rank=0, world_size=1, seed=2, accumulation_steps=2).epoch_batches(1)
    pair = [BatchSampler(lengths, 16, rank=r, world_size=2, seed=2).epoch_batches(1) for r in (0, 1)]
    assert np.array_equal(alone[0::2], pair[0]) and np.array_equal(alone[1::2], pair[1])


# ---------------------------------------------------------------------------- the flat cache
def copy_without_cache(data_dir, path):
    shutil.copytree(data_dir, path, ignore=shutil.ignore_patterns("flat", ".flat*"))
    return str(path)


def cache_files(directory):
    """name → (inode, mtime) of the files of a flat cache."""
    stats = {name: os.stat(os.path.join(directory, name)) for name in os.listdir(directory)}
    return {name: (st.st_ino, st.st_mtime_ns) for name, st in stats.items()}


def leftovers(directory):
    """Temporary dirs a conversion left in ``directory``."""
    return [n for n in os.listdir(directory) if n.startswith(".flat.") and n != ".flat.lock"]


def test_cache_is_built_once_then_mapped(data_dir, tmp_path, rows):
    data = copy_without_cache(data_dir, tmp_path / "data")
    first = PretrainingDataset(data)
    assert first.built_cache and first.cache_dir == os.path.join(data, "flat")
    files = cache_files(first.cache_dir)
    assert {"input_ids.npy", "token_offsets.npy", "lengths.npy", "flat.json"} <= set(files)
    second = PretrainingDataset(data)
    assert not second.built_cache and cache_files(second.cache_dir) == files  # not rewritten
    assert leftovers(data) == []
    # read-only maps of the files, nothing copied into the process
    for array in (second.input_ids, second.input_ids_offsets, second.lengths, second.next_sentence_labels):
        assert not array.flags.writeable and not array.flags.owndata
    assert second.input_ids.dtype == np.int32 and second.segment_ids.dtype == np.int8
    assert second.lengths.dtype == np.int16 and second.input_ids_offsets.dtype == np.int64
    assert_batch_matches_rows(second, rows, np.arange(len(second) - 50, len(second)))


def test_cache_dir_can_be_elsewhere(data_dir, tmp_path):
    data = copy_without_cache(data_dir, tmp_path / "data")
    elsewhere = str(tmp_path / "local" / "cache")
    dataset = PretrainingDataset(data, cache_dir=elsewhere)
    assert dataset.built_cache and dataset.cache_dir == elsewhere and not os.path.exists(os.path.join(data, "flat"))
    assert not PretrainingDataset(data, cache_dir=elsewhere).built_cache


def test_a_cache_dir_holding_other_files_is_refused_not_emptied(data_dir, tmp_path):
    data = copy_without_cache(data_dir, tmp_path / "data")
    scratch = tmp_path / "scratch"
    (scratch / "notes").mkdir(parents=True)
    (scratch / "notes" / "thesis.tex").write_text("months of work")
    # before: the cache was renamed onto it, and the folder moved aside and deleted with its files
    for target in (scratch, tmp_path / "data"):
        with pytest.raises(DataDirError, match=rf"--data-cache {target}: holds files that are not a flat cache "
                                               r"\(.*\), which replacing it would delete"):
            PretrainingDataset(data, cache_dir=str(target))
    assert (scratch / "notes" / "thesis.tex").read_text() == "months of work"
    assert os.path.isfile(os.path.join(data, "manifest.json"))
    (scratch / "notes" / "thesis.tex").unlink()
    (scratch / "notes").rmdir()
    assert PretrainingDataset(data, cache_dir=str(scratch)).built_cache  # an empty folder is fine


def test_stale_cache_is_rebuilt_when_the_shards_change(data_dir, dataset, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(data_dir, data)  # with the cache the dataset fixture built
    assert not PretrainingDataset(data).built_cache  # a copy of a current cache is current
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    shard = os.path.join(data, manifest["shards"][1]["path"])
    table = pq.read_table(shard)
    kept = table.num_rows // 2
    pq.write_table(table.slice(0, kept), shard, row_group_size=300)  # several row groups, converted in turn
    manifest["shards"][1]["rows"] = kept
    manifest["num_examples"] -= table.num_rows - kept
    json.dump(manifest, open(os.path.join(data, "manifest.json"), "w"))

    rebuilt = PretrainingDataset(data)
    assert rebuilt.built_cache and len(rebuilt) == manifest["num_examples"]
    assert leftovers(data) == []
    rows_ = pa.concat_tables([pq.read_table(os.path.join(data, s["path"])) for s in manifest["shards"]]).to_pylist()
    around = manifest["shards"][0]["rows"] + kept  # the rows after the shortened shard moved up
    assert_batch_matches_rows(rebuilt, rows_, np.r_[around - 20:around + 20])


OPEN_AT = textwrap.dedent("""
    import hashlib, json, sys, time
    from pipeline.data import PretrainingDataset
    from pipeline.data_dir import read_manifest
    from pipeline.flat_cache import build_flat_cache
    data, start, how = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    if how == "no-flock":  # as on a filesystem mounted without flock (Lustre's default)
        import errno, fcntl, os

        def no_flock(fd, operation):
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

        fcntl.flock = no_flock
    time.sleep(max(0.0, start - time.time()))  # all processes begin the conversion together
    if how == "unlocked":
        build_flat_cache(data, read_manifest(data), data + "/flat")
    dataset = PretrainingDataset(data)
    digest = hashlib.sha256(dataset.input_ids.tobytes() + dataset.input_ids_offsets.tobytes()).hexdigest()
    print(json.dumps({"built": dataset.built_cache, "rows": len(dataset), "digest": digest}))
""")


def open_together(data, processes, how):
    """``processes`` Python processes opening ``data`` at the same moment (LOCAL_RANK 0, 1, …);
    their reports."""
    start = time.time() + 6  # past their imports
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, data, str(start), how], cwd=REPO, text=True,
                              env={**os.environ, "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(processes)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def test_ranks_starting_together_convert_once(data_dir, tmp_path):
    data = copy_without_cache(data_dir, tmp_path / "data")
    reports = open_together(data, 3, "locked")
    assert sum(r["built"] for r in reports) == 1  # the others waited on the lock, then mapped its files
    assert len({(r["rows"], r["digest"]) for r in reports}) == 1
    assert leftovers(data) == []


def test_without_file_locks_local_rank_0_converts_and_the_others_wait(data_dir, tmp_path):
    data = copy_without_cache(data_dir, tmp_path / "data")
    reports = open_together(data, 3, "no-flock")
    assert [r["built"] for r in reports] == [True, False, False]  # one copy a node, not one a rank
    assert len({(r["rows"], r["digest"]) for r in reports}) == 1
    assert leftovers(data) == []


def test_a_waiting_rank_converts_itself_when_no_conversion_is_under_way(data_dir, tmp_path, monkeypatch):
    """Local rank 0 failed (a full disk) or never came: after BUILD_GRACE_S without a conversion
    in progress, a waiting rank converts the cache itself instead of waiting for ever."""
    import errno
    import fcntl

    from pipeline import flat_cache

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    data = copy_without_cache(data_dir, tmp_path / "data")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(flat_cache, "BUILD_GRACE_S", 1.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    started = time.monotonic()
    dataset = PretrainingDataset(data)
    assert dataset.built_cache and 1.0 <= time.monotonic() - started < 60
    assert leftovers(data) == []


def test_a_conversion_killed_mid_way_is_cleaned_up_by_the_next_one(data_dir, tmp_path):
    # before: each kill -9 or out-of-memory left a partial copy of the corpus for ever
    data = copy_without_cache(data_dir, tmp_path / "data")
    dead, live = (os.path.join(data, f".flat.building-{name}") for name in ("dead", "live"))
    for build in (dead, live):
        os.makedirs(build)
        with open(os.path.join(build, "input_ids.npy"), "wb") as f:
            f.write(b"\0" * 1000)
    two_hours_ago = time.time() - 7200
    for path in (os.path.join(dead, "input_ids.npy"), dead):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert PretrainingDataset(data).built_cache
    assert leftovers(data) == [".flat.building-live"]  # one still being written is not touched


def test_a_conversion_killed_on_this_host_is_removed_after_minutes_not_an_hour(data_dir, tmp_path):
    """A requeued job's conversion would otherwise sit beside the new one for an hour: a second
    copy of the corpus while the first is built again."""
    import socket
    import subprocess
    import sys

    data = copy_without_cache(data_dir, tmp_path / "data")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead, live = (os.path.join(data, f".flat.building-{host}-{pid}-x1y2z3w4") for pid in (gone.stdout.strip(), os.getpid()))
    ten_minutes_ago = time.time() - 600  # untouched for 5 minutes: not a live writer in another container
    for build in (dead, live):
        os.makedirs(build)
        os.utime(build, (ten_minutes_ago, ten_minutes_ago))
    assert PretrainingDataset(data).built_cache
    assert leftovers(data) == [os.path.basename(live)]  # a live process's (this one) is not touched


def test_a_killed_conversions_copy_beside_a_current_cache_is_removed_at_the_next_start(data_dir, tmp_path):
    data = copy_without_cache(data_dir, tmp_path / "data")
    assert PretrainingDataset(data).built_cache
    dead = os.path.join(data, ".flat.building-dead")  # a second job's conversion, killed mid-way
    os.makedirs(dead)
    three_hours_ago = time.time() - 3 * 3600
    os.utime(dead, (three_hours_ago, three_hours_ago))
    assert not PretrainingDataset(data).built_cache
    assert leftovers(data) == []  # before: kept for ever, since no conversion ran again


def test_a_conversion_stops_once_another_process_installed_the_cache(data_dir, tmp_path, monkeypatch):
    """Without a cluster-wide lock every node converts; a late one kept converting the whole corpus
    after another node's cache was in place, while its peers waited for it in the rendezvous."""
    from pipeline import flat_cache

    data = copy_without_cache(data_dir, tmp_path / "data")
    assert PretrainingDataset(data).built_cache
    read = []
    real = flat_cache._shard_row_groups
    monkeypatch.setattr(flat_cache, "_shard_row_groups", lambda path, *a: read.append(path) or real(path, *a))
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    assert not flat_cache.build_flat_cache(data, manifest, os.path.join(data, "flat"))  # as a second node would
    assert read == [] and leftovers(data) == []


def test_another_users_lock_file_still_locks(data_dir, tmp_path, monkeypatch):
    """A group's data dir whose lock file another user created (0644): it could not be opened for
    writing, and every rank converted a copy of its own at once."""
    data = copy_without_cache(data_dir, tmp_path / "data")
    real_open = os.open
    lock = os.path.join(data, ".flat.lock")
    open(lock, "w").close()

    def open_as_another_user(path, flags, *mode):
        if path == lock and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *mode)

    from pipeline import flat_cache

    monkeypatch.setattr(os, "open", open_as_another_user)
    with flat_cache._exclusive(lock) as state:
        assert state == "held"


def test_conversions_without_a_lock_still_give_one_complete_cache(data_dir, tmp_path, rows):
    data = copy_without_cache(data_dir, tmp_path / "data")
    reports = open_together(data, 3, "unlocked")  # each converts into its own temporary dir
    assert not any(r["built"] for r in reports) and len({(r["rows"], r["digest"]) for r in reports}) == 1
    assert leftovers(data) == []
    assert_batch_matches_rows(PretrainingDataset(data), rows, np.arange(0, len(rows), 97))


# ---------------------------------------------------------------------------- manifest errors
@pytest.fixture
def broken(data_dir, tmp_path):
    """A copy of the data dir to break (without a flat cache: it is converted, and checked, on first use)."""
    return copy_without_cache(data_dir, tmp_path / "data")


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


def test_a_data_dir_a_rerun_is_replacing_says_where_the_previous_one_waits(broken):
    from preprocessing import manifest

    manifest.set_aside_previous(broken)  # what a preprocessing rerun into it does first
    previous = os.path.join(broken, manifest.PREVIOUS)
    with pytest.raises(DataDirError, match=re.escape(
            f"{broken} has no manifest.json: a preprocessing run into it is running or was killed; the data dir "
            f"it replaces is kept in {previous} (a run that fails puts it back;")):
        read_manifest(broken)
    manifest.restore_previous(broken)
    read_manifest(broken)


def test_a_run_dir_passed_as_the_data_dir_is_named_so(tmp_path):
    (tmp_path / "train_config.json").write_text("{}")
    with pytest.raises(DataDirError, match="is a pretraining run dir, not a data dir: pass the --output of"):
        read_manifest(str(tmp_path))


def test_unsupported_format_version(broken):
    edit_manifest(broken, format_version=99)
    with pytest.raises(DataDirError, match=r"manifest.json: format_version 99 is not supported"):
        PretrainingDataset(broken)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"][0].pop("rows"), r"field shards\[0\] is \{'path': .*\}, expected an object with a path "
                                           r"and a whole number of rows"),
    (lambda m: m["shards"][0].update(rows="7242"), r"field shards\[0\] is .*'rows': '7242'"),
    (lambda m: m["tokenizer"].pop("special_ids"), r"field tokenizer.special_ids is None, expected an object"),
    (lambda m: m["tokenizer"]["special_ids"].update(mask=10**6), r"field tokenizer.special_ids.mask is 1000000, "
                                                                 r"expected an id below tokenizer.vocab_size"),
    (lambda m: m.update(masking=None), r"field masking is None, expected an object"),
    (lambda m: m.update(shards=[]), r"field shards is \[\], expected a non-empty list"),
], ids=["rows-missing", "rows-a-string", "special-ids-missing", "mask-id-too-large", "masking-null", "no-shards"])
def test_an_edited_manifest_is_refused_naming_the_field(broken, edit, message):
    # before: KeyError / AttributeError tracebacks from wherever the field was first read
    path = os.path.join(broken, "manifest.json")
    manifest = json.load(open(path))
    edit(manifest)
    json.dump(manifest, open(path, "w"))
    with pytest.raises(DataDirError, match=rf"manifest.json: {message}"):
        PretrainingDataset(broken)


def test_missing_shard(broken):
    os.remove(os.path.join(broken, "shards", "part-00003-of-00004.parquet"))
    os.remove(os.path.join(broken, "shards", "part-00002-of-00004.parquet"))
    # the footers are read at once; the first missing one in the manifest's order is named
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


# ---------------------------------------------------------------------------- corrupt shards
SHARD = os.path.join("shards", "part-00001-of-00004.parquet")


def assert_refused(data, message):
    with pytest.raises(DataDirError, match=message):
        PretrainingDataset(data)
    assert leftovers(data) == [] and not os.path.exists(os.path.join(data, "flat"))


def rewrite_column(data, name, array):
    path = os.path.join(data, SHARD)
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index(name), name, array), path)
    return table


def test_truncated_shard_is_refused_naming_it(broken):
    path = os.path.join(broken, SHARD)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert_refused(broken, rf"{SHARD}: pyarrow cannot read this shard .*truncated or corrupt")


def test_column_of_the_wrong_type_is_refused_naming_shard_and_column(broken):
    table = pq.read_table(os.path.join(broken, SHARD))
    rewrite_column(broken, "input_ids", table.column("input_ids").cast(pa.list_(pa.int64())))
    assert_refused(broken, rf"{SHARD}: column 'input_ids' has type list<.*int64>, expected list<int32>")


@pytest.mark.parametrize("row_group_size", [None, 1000])  # the bad row in the first or the third row group
def test_masked_position_outside_its_row_is_refused_naming_shard_and_row(broken, row_group_size):
    path = os.path.join(broken, SHARD)
    table = pq.read_table(path)
    positions = table.column("masked_lm_positions").to_pylist()
    positions[2345][0] = len(table.column("input_ids")[2345]) + 3
    table = table.set_column(table.schema.get_field_index("masked_lm_positions"), "masked_lm_positions",
                             pa.array(positions, pa.list_(pa.int32())))
    pq.write_table(table, path, row_group_size=row_group_size)
    assert_refused(broken, rf"{SHARD}: a masked_lm_positions value lies outside its row \(row 2345\)")


def test_segment_ids_shorter_than_input_ids_are_refused_naming_shard_and_row(broken):
    table = pq.read_table(os.path.join(broken, SHARD))
    segments = table.column("segment_ids").to_pylist()
    segments[11] = segments[11][:-1]
    rewrite_column(broken, "segment_ids", pa.array(segments, pa.list_(pa.int8())))
    assert_refused(broken, rf"{SHARD}: segment_ids and input_ids differ in length in row 11")


@pytest.mark.parametrize("damage", ["none", "short row", "missing in a shard", "an empty shard without it"])
def test_the_optional_word_starts_column_is_mapped_and_checked(broken, damage):
    from pipeline.flat_cache import cache_source

    manifest = read_manifest(broken)
    # A data dir without the column keeps the cache description it had before the column existed:
    # its existing flat cache stays current (a read-only data dir's prebuilt one too).
    assert set(cache_source(broken, manifest)) == {"cache_format", "manifest_sha256", "tokenizer_fingerprint",
                                                  "shards"}
    edit_manifest(broken, columns={**manifest["columns"], "word_starts": "list<bool>"})
    for shard in manifest["shards"]:
        path = os.path.join(broken, shard["path"])
        table = pq.read_table(path)
        starts = [[i % 3 == 0 for i in range(len(ids))] for ids in table.column("input_ids").to_pylist()]
        if shard["path"] == SHARD and damage == "short row":
            starts[11] = starts[11][:-1]
        if shard["path"] == SHARD and damage == "missing in a shard":
            continue
        if shard["path"] == SHARD and damage == "an empty shard without it":  # more shards than rows
            pq.write_table(table.schema.empty_table(), path)
            shards = [{**s, "rows": 0 if s["path"] == SHARD else s["rows"]} for s in manifest["shards"]]
            edit_manifest(broken, shards=shards, num_examples=sum(s["rows"] for s in shards))
            continue
        pq.write_table(table.append_column("word_starts", pa.array(starts, pa.list_(pa.bool_()))), path)
    if damage == "short row":
        assert_refused(broken, rf"{SHARD}: word_starts and input_ids differ in length in row 11")
    elif damage == "missing in a shard":
        assert_refused(broken, rf"{SHARD}: column 'word_starts' is missing")
    else:
        dataset = PretrainingDataset(broken)
        assert dataset.word_starts.dtype == np.bool_ and len(dataset.word_starts) == len(dataset.input_ids)
        row = 1234
        at = dataset.input_ids_offsets[row]
        assert dataset.word_starts[at:at + dataset.lengths[row]].tolist() == [
            i % 3 == 0 for i in range(dataset.lengths[row])]


@pytest.mark.parametrize("column, row, value, message", [
    ("input_ids", 17, "vocab", r"input_ids holds {vocab}, outside \[0, {vocab}\) \(the manifest's "
                               r"tokenizer.vocab_size\)"),
    ("masked_lm_ids", 3, -1, r"masked_lm_ids holds -1, outside \[0, {vocab}\)"),
    ("segment_ids", 5, 2, r"segment_ids holds 2, outside \[0, 2\)"),
    ("next_sentence_labels", 99, 2, r"next_sentence_labels holds 2, outside \[0, 2\)"),
])
def test_a_value_the_model_cannot_index_is_refused_naming_shard_and_row(broken, column, row, value, message):
    # before: an IndexError (a device-side assert on a GPU) at whatever step first drew the row
    vocab = read_manifest(broken)["tokenizer"]["vocab_size"]
    value, message = (vocab if value == "vocab" else value), message.format(vocab=vocab)
    table = pq.read_table(os.path.join(broken, SHARD))
    values = table.column(column).to_pylist()
    if isinstance(values[row], list):
        values[row][1] = value
    else:
        values[row] = value
    rewrite_column(broken, column, pa.array(values, table.schema.field(column).type))
    assert_refused(broken, rf"{SHARD}: row {row}: {message}")


def test_the_trainer_refuses_a_corrupt_shard_before_training(broken, tmp_path):
    table = pq.read_table(os.path.join(broken, SHARD))
    rewrite_column(broken, "next_sentence_labels", table.column("next_sentence_labels").cast(pa.string()))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "pretrain.py"), "--data", broken,
                           "--run-dir", str(run), "--steps", "2", "--no-mlflow"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{SHARD}: column 'next_sentence_labels' has type string, expected int8" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(run / "checkpoints")
