"""Dynamic masking (RoBERTa): unmasked shards, masks drawn by the loader per (seed, epoch, row)
with the static recipe's rules; exact resume and the same batches for any number of processes."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data import IGNORE_INDEX, PretrainingDataset
from pipeline.train_config import TrainConfig
from pipeline.trainer import EXIT_STOPPED, Trainer
from preprocessing import examples

from .conftest import set_one_process_world


@pytest.fixture(scope="module")
def dynamic_data(preprocessed_sample) -> str:
    return preprocessed_sample("--vocab-size", "4000", "--masking", "dynamic", "--num-shards", "2")


@pytest.fixture(scope="module")
def manifest(dynamic_data):
    with open(os.path.join(dynamic_data, "manifest.json")) as f:
        return json.load(f)


def test_shards_are_unmasked_and_one_pass(dynamic_data, manifest, data_dir):
    assert manifest["masking"]["mode"] == "dynamic" and manifest["dupe_factor"] == 1
    assert manifest["masking"]["max_predictions_per_seq"] == 20  # ceil(128 x 0.15), Google's value
    table = pq.read_table(os.path.join(dynamic_data, "shards")).to_pydict()
    mask_id = manifest["tokenizer"]["special_ids"]["mask"]
    assert not any(table["masked_lm_positions"]) and not any(table["masked_lm_ids"])
    assert not any(mask_id in ids for ids in table["input_ids"])
    # The session's static data dir is the same corpus with --dupe-factor 2.
    with open(os.path.join(data_dir, "manifest.json")) as f:
        static = json.load(f)
    assert manifest["num_examples"] == pytest.approx(static["num_examples"] / 2, rel=0.1)


def test_the_loader_masks_by_the_recipe(dynamic_data, manifest):
    dataset = PretrainingDataset(dynamic_data, manifest, seed=7)
    rows = np.arange(len(dataset))
    config = dataset.masker.config
    masked = kept = replaced = 0
    for start in range(0, len(rows), 256):
        part = rows[start:start + 256]
        batch = dataset.batch(part, epoch=0)
        labels = batch["labels"].numpy()
        ids = batch["input_ids"].numpy()
        lengths = dataset.lengths[part]
        # Exactly Google's number of predictions per row, never [CLS] or a [SEP].
        counts = (labels != IGNORE_INDEX).sum(axis=1)
        assert (counts == examples.num_to_predict(lengths.astype(np.int64), config)).all()
        cls_id, sep_id = manifest["tokenizer"]["special_ids"]["cls"], manifest["tokenizer"]["special_ids"]["sep"]
        at = labels != IGNORE_INDEX
        assert not np.isin(labels[at], [cls_id, sep_id]).any()
        mask_id = manifest["tokenizer"]["special_ids"]["mask"]
        masked += int((ids[at] == mask_id).sum())
        kept += int((ids[at] == labels[at]).sum())
        replaced += int(((ids[at] != mask_id) & (ids[at] != labels[at])).sum())
        # The flat form the sparse head uses agrees with the labels.
        flat = labels.ravel()[batch["mlm_positions"].numpy()]
        assert (flat == batch["mlm_labels"].numpy()).all()
    total = masked + kept + replaced
    assert total > 20_000
    assert abs(masked / total - 0.8) < 0.01 and abs(kept / total - 0.1) < 0.01 and abs(replaced / total - 0.1) < 0.01


def test_a_rows_masks_depend_on_seed_epoch_and_row_only(dynamic_data, manifest):
    dataset = PretrainingDataset(dynamic_data, manifest, seed=7)

    def masks(rows, epoch, seed_dataset=dataset):
        labels = seed_dataset.batch(np.asarray(rows), epoch)["labels"].numpy()
        return {row: tuple(np.flatnonzero(labels[i] != IGNORE_INDEX)) for i, row in enumerate(rows)}

    alone = masks([5, 900, 33], 0)
    assert masks([33, 5, 1200, 900, 7], 0)[5] == alone[5]  # any batch, any order, any padding
    assert masks([900], 0)[900] == alone[900]
    next_epoch = masks([5, 900, 33], 1)
    assert sum(next_epoch[r] != alone[r] for r in alone) == 3  # a new epoch, new masks
    other_seed = PretrainingDataset(dynamic_data, manifest, seed=8)
    assert masks([5, 900, 33], 0, other_seed) != alone


def test_training_on_dynamic_masks_resumes_exactly(dynamic_data, tmp_path, monkeypatch):
    set_one_process_world(monkeypatch)

    def run(run_dir, stop_at=None):
        losses = []

        def record(t, metrics):
            losses.append(metrics.loss)
            if stop_at is not None and t.step == stop_at:
                t.stop.requested = True

        trainer = Trainer(TrainConfig.from_flat(data=dynamic_data, run_dir=str(run_dir), steps=8, global_batch_size=16,
                                                micro_batch_size=8, learning_rate=2e-3, warmup_steps=2, log_every=100,
                                                mlflow=False))
        return losses, trainer.train(on_step=record)

    whole, code = run(tmp_path / "whole")
    assert code == 0 and len(whole) == 8
    first, code = run(tmp_path / "split", stop_at=3)
    assert code == EXIT_STOPPED
    rest, code = run(tmp_path / "split")
    assert code == 0 and first + rest == whole


def test_jieba_words_under_dynamic_masking_need_the_word_starts_column(dynamic_data, manifest):
    from pipeline.data_dir import DataDirError
    from preprocessing.options import PreprocessConfig

    assert "word_starts" not in manifest["columns"]  # English, pieces: the vocabulary's table is enough
    assert PreprocessConfig(examples=examples.ExampleConfig(masking="dynamic"), whole_word_mask="jieba")
    older = {**manifest, "masking": {**manifest["masking"], "whole_word_mask": True, "word_segmenter": "jieba"}}
    with pytest.raises(DataDirError, match="manifest.json: jieba's whole words with dynamic masking, but the "
                                           "shards hold no word_starts column"):
        PretrainingDataset(dynamic_data, older)
    # The cap's rule lives in the example config that PreprocessConfig embeds.
    assert examples.ExampleConfig(masked_lm_prob=0.3).max_predictions_per_seq == 39  # MosaicBERT's 30%, cap scaled
    assert examples.ExampleConfig(max_seq_length=512).max_predictions_per_seq == 77
    assert PreprocessConfig().examples.max_predictions_per_seq == 20


def test_the_loader_draws_new_masks_in_its_second_epoch(dynamic_data, manifest):
    """Through the prefetching loader across an epoch boundary: each batch has its own epoch's masks."""
    from pipeline.data import PretrainingLoader
    from pipeline.sampler import BatchSampler

    dataset = PretrainingDataset(dynamic_data, manifest, seed=7)
    sampler = BatchSampler(dataset.lengths, 512, seed=7)
    per_epoch = len(sampler)
    expected = [sampler.epoch_batches(epoch) for epoch in (0, 1)]
    with PretrainingLoader(dataset, sampler, prefetch=4, pin_memory=False) as loader:
        got = [next(loader) for _ in range(2 * per_epoch)]
    changed = 0
    for i, batch in enumerate(got):
        epoch, rows = divmod(i, per_epoch)[0], expected[i // per_epoch][i % per_epoch]
        assert (batch["labels"] == dataset.batch(rows, epoch)["labels"]).all()
        if epoch == 1:
            first = dataset.batch(rows, 0)["labels"]
            changed += int(((first != IGNORE_INDEX) != (batch["labels"] != IGNORE_INDEX)).any(dim=1).sum())
    assert changed == per_epoch * 512  # every row of the second epoch has other masked positions
