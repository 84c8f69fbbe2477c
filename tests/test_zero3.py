"""ZeRO-3 end to end on CPU: 2 ranks on gloo train with partitioned weights, a resumed run
continues with the uninterrupted run's losses, and the Hugging Face export holds the weights
the engine trained (its evaluation reproduces the engine's)."""

import json
import os
import shutil

import pytest
import torch

from pipeline import checkpoint

from .conftest import REPO
from .test_export import assert_same_weights_and_ties
from .test_pretrain import _run_pretrain

ZERO3 = os.path.join(REPO, "ds_configs", "cpu_fp32_zero3_torch-adamw.json")


def exported_eval(out: str, data: str, micro_batch_size: int, eval_rows_at_most: int, world_size: int) -> float:
    """The trainer's eval_loss, recomputed on one process with the exported weights: the same
    held-out micro-batches of every rank, summed the way Trainer.evaluate sums them."""
    from pipeline.data import PretrainingDataset
    from pipeline.data_dir import read_manifest
    from pipeline.sampler import eval_batches as eval_rows, training_rows
    from pipeline.model import sparse_mlm_class
    from pipeline.engine import EngineConfig
    from pipeline.trainer import pretraining_losses

    model = sparse_mlm_class().from_pretrained(out).eval()  # a BertForPreTraining
    manifest = read_manifest(data)
    dataset = PretrainingDataset(data, manifest)
    start = training_rows(manifest, eval_shards=1)
    mlm_sum = nsp_sum = masked = seqs = 0.0
    with torch.no_grad():
        for rank in range(world_size):
            for rows in eval_rows(dataset.lengths, start, micro_batch_size, rank, world_size, eval_rows_at_most,
                                  EngineConfig.seed):
                mlm, nsp, (_, count, _, _) = pretraining_losses(model, dataset.batch(rows))
                mlm_sum += mlm.double().item() * count.item()
                nsp_sum += nsp.double().item() * len(rows)
                masked, seqs = masked + count.item(), seqs + len(rows)
    return mlm_sum / masked + nsp_sum / seqs


@pytest.mark.e2e
def test_zero3_trains_resumes_exactly_and_exports_the_trained_weights(data_dir, tmp_path):
    from transformers import AutoModelForPreTraining

    common = ["--data", data_dir, "--ds-config", ZERO3, "--steps", "6", "--global-batch-size", "16",
              "--micro-batch-size", "4", "--checkpoint-every", "3", "--eval-batches", "4", "--log-every", "1",
              "--no-mlflow"]
    whole_dir, split_dir = tmp_path / "whole", tmp_path / "split"
    whole = _run_pretrain([*common, "--run-dir", str(whole_dir)], 2, tmp_path)
    assert [m["step"] for m in whole] == list(range(1, 7))
    out = str(whole_dir / "hf" / "step00000006")  # pretrain.py's last act: the export
    model = AutoModelForPreTraining.from_pretrained(out)

    # The weights and Adam state really are partitioned: each rank holds half (+ padding).
    n_params = sum(p.numel() for p in model.parameters())  # the tied ones once
    tag_dir = whole_dir / "checkpoints" / "step00000006"
    for rank in range(2):
        state = torch.load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)["optimizer_state_dict"]
        held = sum(t.numel() for t in state["fp32_flat_groups"])
        assert state["zero_stage"] == 3 and n_params / 2 <= held < n_params / 2 + 100, (held, n_params)

    # The export is what the engine trained: its evaluation of the held-out rows is the engine's own
    # (the step-3 weights would be 2e-3 off).
    logged = [json.loads(line) for line in open(whole_dir / "eval.jsonl")][-1]
    assert logged["step"] == 6
    assert exported_eval(out, data_dir, 4, 4 * 16, 2) == pytest.approx(logged["eval_loss"], rel=1e-6)

    # A run stopped after its step-3 checkpoint, resumed (--resume auto) with the same command:
    # the uninterrupted run's losses exactly, and the same exported weights, ties kept.
    shutil.copytree(whole_dir / "checkpoints" / "step00000003", split_dir / "checkpoints" / "step00000003")
    rest = _run_pretrain([*common, "--run-dir", str(split_dir)], 2, tmp_path)
    assert [m["step"] for m in rest] == [4, 5, 6]
    assert [m["loss"] for m in rest] == [m["loss"] for m in whole[3:]]
    assert checkpoint.find_latest(str(split_dir / "checkpoints")) == "step00000006"
    assert_same_weights_and_ties(str(split_dir / "hf" / "step00000006"), model.state_dict())
