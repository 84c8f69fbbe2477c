"""Fine-tuning with the real DeepSpeed engine on real reviews: from a DeepSpeed checkpoint or a
Hugging Face export, best epoch kept, the report consistent with the saved model, 1 and 2
ranks agreeing, the MLflow run and registered model on a real server, bad input refused."""

import csv
import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import export
from pipeline.finetuning.config import FinetuneConfig
from pipeline.finetuning.data import read_table, stratified_split
from pipeline.finetuning.model import ModelSourceError, load_tokenizer, model_lineage, tokenizer_fingerprint
from pipeline.engine import free_port
from pipeline.output_path import current_umask
from pipeline.train_config import TrainConfig
from pipeline.trainer import Trainer

from .conftest import REPO, set_one_process_world
from .fp16_support import needs_fp16

ROTTEN_TOMATOES = os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2")
SCRIPT = os.path.join(REPO, "pipeline", "finetune.py")
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")



@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, preprocessed_sample):
    """A pretrain run dir: 4 ZeRO-2 steps of the tiny preset on the dump sample (no export yet)."""
    root = tmp_path_factory.mktemp("finetune")
    data = preprocessed_sample("--vocab-size", "4000", "--dupe-factor", "1", "--max-seq-length", "64")
    mp = pytest.MonkeyPatch()
    set_one_process_world(mp)
    config = TrainConfig.from_flat(data=data, run_dir=str(root / "run"), steps=4, global_batch_size=8,
                                   micro_batch_size=8, learning_rate=2e-3, warmup_steps=1, log_every=100, mlflow=False)
    trainer = Trainer(config)
    export.write_train_config(config, "pretrain-run-123")  # what pretrain.py writes on rank 0
    assert trainer.train() == 0
    mp.undo()
    return str(root / "run")


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("reviews") / "reviews.csv")


def write_reviews(path) -> str:
    """600 real reviews (stratified sample) + 40 plot summaries, in the bundled file's columns."""
    table = read_table(ROTTEN_TOMATOES)
    keys = table.columns["category"]
    review_rows, plot_rows = stratified_split(keys, [600 / 12808], seed=1)[0], [i for i, k in enumerate(keys) if k == "plot"][:40]
    rows = sorted([i for i in review_rows if keys[i] != "plot"] + plot_rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "text", "movie_name"])
        for i in rows:
            w.writerow([keys[i], table.columns["text"][i], table.columns["movie_name"][i]])
    return str(path)


def finetune_config(model, output_dir, data, **overrides):
    values = dict(model=model, data=data, label_column="category", drop_labels=("plot",), output_dir=str(output_dir),
                  epochs=2, global_batch_size=16, micro_batch_size=16, learning_rate=1e-3, mlflow=False, seed=3)
    return FinetuneConfig.from_flat(**{**values, **overrides})


def saved_model_outputs(model_dir, finetuner, split="test"):
    """The saved model's outputs on a split, computed apart from the finetuner."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.finetuning.trainer import collate

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    data = finetuner.splits[split]
    batch = collate(data, np.arange(len(data)), finetuner.tokenizer.pad_token_id, finetuner.task)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits.numpy(), model


def test_finetunes_a_deepspeed_checkpoint_and_reports_what_the_saved_model_predicts(pretrained, reviews, tmp_path, capsys,
                                                                                     caplog):
    from pipeline.finetuning.report import write_report
    from pipeline.finetuning.trainer import Finetuner

    with caplog.at_level(logging.INFO, logger="pipeline.finetuning.trainer"):
        finetuner = Finetuner(finetune_config(pretrained, tmp_path, reviews))
    # a line per split: its rows, where they came from, what was dropped and cut
    said = [m for m in caplog.messages if " rows from " in m]
    cut = {name: f"; {s.truncated} cut at 64 tokens (--max-seq-length)" if s.truncated else ""
           for name, s in finetuner.splits.items()}
    assert said == [f"train: 480 rows from {reviews}; 40 dropped by --drop-label{cut['train']}",
                    f"validation: 60 rows from {reviews} (--validation-fraction 0.1 of it, seed 3){cut['validation']}",
                    f"test: 60 rows from {reviews} (--test-fraction 0.1 of it, seed 3){cut['test']}"]
    assert finetuner.splits["train"].truncated > 0  # reviews longer than 64 tokens
    # the checkpoint (ZeRO-2 partitions) was exported on the fly, lineage included
    assert finetuner.hf_dir == str(tmp_path / "pretrained" / "step00000004")
    assert finetuner.lineage["pretrain_run_id"] == "pretrain-run-123"
    assert finetuner.max_length == 64  # the pretraining sequence length, from the tokenizer
    best = finetuner.train()
    report = finetuner.test_report()
    model_dir = finetuner.save_model(str(tmp_path / "model"))
    paths = write_report(report, str(tmp_path))

    assert report["rows_dropped"] == {"train": 40, "validation": 0, "test": 0}
    assert report["rows"] == {"train": 480, "validation": 60, "test": 60}
    assert report["labels"] == ["fresh", "rotten"] and report["epochs_run"] == 2
    # each epoch's learning_rate is the rate its last update used (before: the next one's, 0 at the end)
    from pipeline.engine import linear_warmup_decay

    factor = linear_warmup_decay(finetuner.total_steps, int(finetuner.config.warmup_fraction * finetuner.total_steps))
    logged = [json.loads(line)["learning_rate"] for line in open(tmp_path / "metrics.jsonl")]
    assert logged == pytest.approx([1e-3 * factor(e * finetuner.steps_per_epoch - 1) for e in (1, 2)])
    assert logged[-1] > 0
    assert best.epoch == report["best_epoch"] and report["history"][1]["train_loss"] < report["history"][0]["train_loss"]
    cm = np.array(report["confusion_matrix"])
    assert cm.sum() == 60 and cm.sum(axis=1).tolist() == np.bincount(finetuner.splits["test"].labels).tolist()
    # the saved model is the best epoch's and gives the reported test metrics
    logits, model = saved_model_outputs(model_dir, finetuner)
    predictions = logits.argmax(-1)
    # evaluation batches rows by length; its outputs still come back in row order
    np.testing.assert_allclose(finetuner.predict("test"), logits, atol=1e-4)
    assert np.mean(predictions == finetuner.splits["test"].labels) == pytest.approx(report["test"]["accuracy"])
    assert np.diag(cm).sum() == (predictions == finetuner.splits["test"].labels).sum()
    # a model that predicts one label for every row (this 4-step one may) is warned of, no other
    assert ("warnings" in report) == (len(set(predictions)) == 1)
    assert model.config.id2label == {0: "fresh", 1: "rotten"} and model.config.label2id == {"fresh": 0, "rotten": 1}
    assert os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
    # What it is, for a later fine-tuning, embed.py and the Hub: training_info.json, the SentencePiece
    # model, a tokenizer config transformers 4 loads too, a model card; every file readable by all
    # (transformers 5 writes model.safetensors 0600).
    info = json.load(open(os.path.join(model_dir, "training_info.json")))
    assert info["kind"] == "finetuned" and info["labels"] == ["fresh", "rotten"] and info["max_seq_length"] == 64
    assert info["pretrain_run_id"] == "pretrain-run-123" and info["model"] == finetuner.hf_dir
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(model_dir) == tokenizer_fingerprint(finetuner.hf_dir)
    tokenizer_config = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "is_local" not in tokenizer_config
    card = open(os.path.join(model_dir, "README.md")).read()
    assert "pipeline_tag: text-classification" in card and "`fresh`, `rotten`" in card and "max_length=64" in card
    assert {stat.S_IMODE(os.stat(os.path.join(model_dir, n)).st_mode) for n in os.listdir(model_dir)} == {
        0o666 & ~current_umask()}
    assert info["init"] == "pretrained" and "Fine-tuned from" in card and "fine-tuning not tracked" in card
    assert model_lineage(model_dir) == {"model_kind": "finetuned", "pretrain_run_id": "pretrain-run-123"}
    assert [os.path.basename(p) for p in paths] == ["report.json", "confusion_matrix.png"]
    assert open(paths[1], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(paths[0]))["test"] == report["test"]
    # per-class precision/recall/F1/support for both splits, in report.json and printed as a table
    per_class = json.load(open(paths[0]))["per_class"]
    assert set(per_class) == {"validation", "test"} and report["finetune_run_id"] is None  # no MLflow run here
    test_classes = per_class["test"]["classes"]
    assert list(test_classes) == ["fresh", "rotten"]
    assert [test_classes[k]["support"] for k in ("fresh", "rotten")] == cm.sum(axis=1).tolist()
    assert [test_classes[k]["recall"] for k in ("fresh", "rotten")] == pytest.approx(np.diag(cm) / cm.sum(axis=1))
    assert per_class["test"]["macro_avg"]["f1"] == pytest.approx(report["test"]["f1_macro"])
    assert test_classes["rotten"]["f1"] == pytest.approx(report["test"]["f1_binary"])
    # recomputed with the best weights, the validation split gives the best epoch's figures
    assert per_class["validation"]["macro_avg"]["f1"] == pytest.approx(report["validation"]["f1_macro"])
    assert per_class["validation"]["weighted_avg"]["support"] == report["rows"]["validation"]
    printed = capsys.readouterr().out
    assert "precision" in printed and "weighted avg" in printed and "rotten" in printed


def test_a_classifier_that_gives_every_test_row_one_label_is_warned_of(pretrained, reviews, tmp_path, caplog):
    """Trained on 95% 'fresh' at BERT-base's rate for one epoch, the tiny model predicts 'fresh' for
    every row: its test accuracy, the label's share, would read like learning."""
    from pipeline.finetuning.trainer import Finetuner

    rows = list(csv.reader(open(reviews)))
    fresh = [r for r in rows[1:] if r[0] == "fresh"]
    skewed = tmp_path / "skewed.csv"
    with open(skewed, "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *fresh, *[r for r in rows[1:] if r[0] == "rotten"][:len(fresh) // 19]])
    finetuner = Finetuner(finetune_config(pretrained, tmp_path / "out", str(skewed), epochs=1, learning_rate=5e-5,
                                           drop_labels=()))
    finetuner.train()
    with caplog.at_level(logging.WARNING, logger="pipeline.finetuning.trainer"):
        report = finetuner.test_report()
    cm = np.array(report["confusion_matrix"])
    assert cm[:, 1].sum() == 0 and cm[1].sum() > 0, cm  # 'rotten' rows there, none predicted
    assert report["test"]["accuracy"] == pytest.approx(cm[0, 0] / cm.sum()) and report["test"]["accuracy"] > 0.9
    (warning,) = report["warnings"]
    assert warning.startswith(f"the model predicts 'fresh' for every test row ({cm.sum()} rows, "), warning
    assert caplog.messages == [warning]


def test_early_stopping_keeps_the_best_epochs_weights(pretrained, reviews, tmp_path, monkeypatch):
    from pipeline.finetuning.trainer import Finetuner

    finetuner = Finetuner(finetune_config(pretrained, tmp_path, reviews, epochs=6, patience=2, metric="mcc"))
    scripted = iter([0.10, 0.30, 0.25, 0.20, 0.90, 0.95])  # best at epoch 2, then two worse: stop after 4
    snapshots = []
    real_evaluate = finetuner.evaluate

    def evaluate(split):
        metrics, outputs = real_evaluate(split)
        if split == "validation":
            metrics["mcc"] = next(scripted)
            snapshots.append({k: v.clone() for k, v in finetuner.engine.module.state_dict().items()})
        return metrics, outputs

    monkeypatch.setattr(finetuner, "evaluate", evaluate)
    best = finetuner.train()
    assert best.epoch == 2 and len(finetuner.history) == 4 and best.validation["mcc"] == 0.30
    final = finetuner.engine.module.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(snapshots[3][k], snapshots[1][k]) for k in final)  # it did train on


def test_an_output_dir_fine_tuning_would_damage_is_refused_before_any_write(pretrained, reviews, tmp_path):
    """A file, the pretraining run dir (its metrics.jsonl was replaced by fine-tuning's), --model itself."""
    from pipeline.finetuning.config import FinetuneConfigError
    from pipeline.finetuning.trainer import Finetuner

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / "train_config.json").write_text("{}")
    before = open(os.path.join(pretrained, "metrics.jsonl")).read()
    for out, message in [(a_file, "a file, not a folder"), (pretrained, "is --model itself"),
                         (other_run, "is a pretraining run dir (it holds train_config.json)")]:
        with pytest.raises(FinetuneConfigError, match=re.escape(f"--output-dir {out}") + ".*" + re.escape(message)):
            Finetuner(finetune_config(pretrained, out, reviews))
    earlier = tmp_path / "mnli"  # a fine-tuned model, continued on another task into its own folder
    (earlier / "model").mkdir(parents=True)
    with pytest.raises(FinetuneConfigError, match=re.escape(f"--model {earlier / 'model'} is the model/ that")):
        Finetuner(finetune_config(str(earlier / "model"), earlier, reviews))
    assert a_file.read_text() == "mine" and open(os.path.join(pretrained, "metrics.jsonl")).read() == before
    assert os.listdir(other_run) == ["train_config.json"]


def test_an_mpi_launch_without_world_size_is_refused_on_every_copy_before_any_write(pretrained, reviews, tmp_path):
    """mpirun starts N copies; each took itself for rank 0 and raced for the output dir's lock."""
    env = _clean_env(OMPI_COMM_WORLD_SIZE="2")
    argv = [sys.executable, SCRIPT, "--model", pretrained, "--data", reviews, "--label-column", "category",
            "--drop-label", "plot", "--output-dir", str(tmp_path / "out"), "--no-mlflow"]
    copies = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    for proc in copies:
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 2 and "error: one of 2 processes (OMPI_COMM_WORLD_SIZE=2) without WORLD_SIZE" in err
        assert "in use by another run" not in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_second_finetuning_into_a_busy_output_dir_is_refused_before_it_clears_anything(
        pretrained, reviews, tmp_path, monkeypatch, capsys):
    """The second run would clear the first's report and model at its start, then interleave its saves."""
    from pipeline import finetune, run_lock

    set_one_process_world(monkeypatch)
    out = tmp_path / "ft"
    out.mkdir()
    (out / "report.json").write_text("the running job's")
    held = run_lock.acquire(str(out), "--output-dir")  # another open file: another holder, even in one process
    try:
        argv = ["--model", pretrained, "--data", reviews, "--label-column", "category", "--drop-label", "plot",
                "--epochs", "1", "--output-dir", str(out), "--no-mlflow"]
        assert finetune.main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"--output-dir {out} is in use by another run (pid {os.getpid()} on " in errors[0]
        assert "clears this one's report and model" in errors[0]
        assert (out / "report.json").read_text() == "the running job's" and not (out / "metrics.jsonl").exists()
    finally:
        held.release()


@pytest.mark.parametrize("engine", [
    # As the GPU bf16 files: DeepSpeed applies NaN gradients; the gradient norm must stop the run.
    {"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 1}},
    # ZeRO-0's plain optimizer applies them too, and reports no norm: the trainer's own.
    {"zero_optimization": {"stage": 0}}], ids=["bf16-zero1-unchecked", "fp32-zero0"])
def test_nan_gradients_under_a_finite_loss_stop_fine_tuning_whose_engine_applies_them(pretrained, reviews, tmp_path,
                                                                                     monkeypatch, engine):
    from pipeline.finetuning.trainer import Finetuner

    from .faults import nan_gradient

    ds_config = tmp_path / "engine.json"
    ds_config.write_text(json.dumps({**engine, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    finetuner = Finetuner(finetune_config(pretrained, tmp_path / "out", reviews, ds_config=str(ds_config)))
    backward, calls = finetuner.engine.backward, []

    def nan_on_the_third(loss, *args, **kwargs):
        calls.append(loss.item())
        return backward(nan_gradient(loss) if len(calls) == 3 else loss, *args, **kwargs)

    monkeypatch.setattr(finetuner.engine, "backward", nan_on_the_third)
    with pytest.raises(FloatingPointError, match=r"the gradient norm is (nan|inf) in epoch 1 and the update was "
                                                 "applied"):
        finetuner.train()
    assert len(calls) == 3 and all(math.isfinite(loss) for loss in calls)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_a_skipped_update_is_counted_and_fine_tuning_goes_on(pretrained, reviews, tmp_path, monkeypatch):
    from pipeline.finetuning.trainer import Finetuner

    from .faults import nan_gradient

    # The CPU config's ZeRO overflow check skips an update with NaN gradients, as fp16's loss scaler does.
    finetuner = Finetuner(finetune_config(pretrained, tmp_path / "out", reviews, epochs=2))
    backward, calls = finetuner.engine.backward, []

    def nan_on_the_third(loss, *args, **kwargs):
        calls.append(loss.item())
        return backward(nan_gradient(loss) if len(calls) == 3 else loss, *args, **kwargs)

    monkeypatch.setattr(finetuner.engine, "backward", nan_on_the_third)
    finetuner.train()
    epochs = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [e["train/skipped_steps"] for e in epochs] == [1, 1] and "train/loss_scale" not in epochs[0]
    assert all(torch.isfinite(p).all() for p in finetuner.engine.module.parameters())


@needs_fp16
def test_fp16_fine_tuning_without_zero_learns_as_bf16_does(pretrained, reviews, tmp_path):
    """Both run DeepSpeed's FP16_UnfusedOptimizer; fp16's loss is scaled by 2^16 where DeepSpeed
    0.19.8 forgets to (pipeline.engine.ScaledBackward), its step dividing the gradients back, and
    no update is skipped.
    The trained model has too few steps to tell by its loss: the weights' travel tells."""
    from pipeline.finetuning.trainer import Finetuner

    moved = {}
    for precision in ("bf16", "fp16"):
        ds_config = tmp_path / f"{precision}.json"
        ds_config.write_text(json.dumps({precision: {"enabled": True}, "zero_optimization": {"stage": 0},
                                         "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
        finetuner = Finetuner(finetune_config(pretrained, tmp_path / precision, reviews, ds_config=str(ds_config),
                                              epochs=1))
        start = finetuner._full_precision_state()
        finetuner.train()
        end = finetuner._full_precision_state()
        # the loss is fp32 (task_loss): an fp16 one's gradient at scale 2^16 is inf, a skipped step
        assert finetuner.engine.skipped_steps == 0
        moved[precision] = float(torch.stack([(end[n] - start[n]).float().norm() for n in start
                                              if start[n].is_floating_point()]).norm())
    # how far an epoch moved the fp32 masters: measured 1.445 (fp16) against 1.447 (bf16); with
    # the loss unscaled, fp16's moved 0.176
    assert moved["fp16"] == pytest.approx(moved["bf16"], rel=0.1)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_bf16_run_saves_its_fp32_master_weights_not_their_bf16_copies(pretrained, reviews, tmp_path, stage):
    from safetensors.torch import load_file

    from pipeline.finetuning.trainer import Finetuner

    # ZeRO 1 keeps the masters in its partitions, ZeRO 0 in DeepSpeed's fp16/bf16 optimizer wrapper
    ds_config = tmp_path / "bf16.json"
    ds_config.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
                                     "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    finetuner = Finetuner(finetune_config(pretrained, tmp_path / "out", reviews, ds_config=str(ds_config), epochs=1))
    module, full_precision_state, in_bf16 = finetuner.engine.module, finetuner._full_precision_state, {}

    def keep_best():  # the bf16 weights the engine trains, as the best epoch's masters are taken
        in_bf16.update({n: p.detach().clone() for n, p in module.named_parameters()})
        return full_precision_state()

    finetuner._full_precision_state = keep_best
    finetuner.train()
    assert next(iter(in_bf16.values())).dtype == torch.bfloat16
    # The test report is computed with what is saved: the fp32 masters, not their bf16 copies.
    assert all(p.dtype == torch.float32 and torch.equal(p, finetuner._best_state[n])
               for n, p in module.named_parameters())
    saved = load_file(os.path.join(finetuner.save_model(str(tmp_path / "model")), "model.safetensors"))
    names = [n for n, p in module.named_parameters()]
    assert set(names) <= set(saved)
    # the masters: they round to the engine's bf16 weights, and most hold more than bf16 can
    for name in names:
        assert torch.equal(saved[name], finetuner._best_state[name]), name
        assert torch.equal(saved[name].to(torch.bfloat16), in_bf16[name]), name
    fine = [n for n in names if not torch.equal(saved[n].to(torch.bfloat16).float(), saved[n])]
    assert len(fine) > len(names) / 2, f"only {len(fine)} of {len(names)} tensors hold more than bf16"


def test_a_nan_training_loss_stops_fine_tuning_after_the_epoch_with_its_number(pretrained, reviews, tmp_path,
                                                                               monkeypatch):
    from pipeline.finetuning.trainer import Finetuner

    # ZeRO's overflow check skips the NaN step's update (so no gradient-norm stop); the epoch's loss,
    # summed on the device and reduced over the ranks before it is read, is what stops the run.
    finetuner = Finetuner(finetune_config(pretrained, tmp_path / "out", reviews))
    forward, calls = finetuner.engine.forward, []

    def nan_loss_on_the_fifth(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(None)
        if len(calls) == 5:
            out.logits = out.logits * float("nan")  # the loss is computed from them (task_loss)
        return out

    monkeypatch.setattr(finetuner.engine, "forward", nan_loss_on_the_fifth)
    with pytest.raises(FloatingPointError, match="train loss is nan in epoch 1: lower --learning-rate"):
        finetuner.train()
    assert len(calls) == finetuner.steps_per_epoch  # the epoch ran to its end: the NaN step was skipped
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


@needs_fp16
def test_fp16_overflowing_at_the_minimum_loss_scale_stops_fine_tuning_with_its_epoch(pretrained, reviews, tmp_path,
                                                                                    monkeypatch):
    """Under ZeRO, DeepSpeed raises a bare Exception there; fine-tuning names the epoch (and the
    command prints it in one line, as test_a_diverged_run_ends_the_command_with_one_line_per_rank shows)."""
    from pipeline.finetuning.trainer import Diverged, Finetuner

    from .faults import nan_gradient

    ds_config = tmp_path / "fp16.json"
    ds_config.write_text(json.dumps({"fp16": {"enabled": True, "initial_scale_power": 1, "hysteresis": 1},
                                     "zero_optimization": {"stage": 1},
                                     "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    finetuner = Finetuner(finetune_config(pretrained, tmp_path / "out", reviews, ds_config=str(ds_config)))
    backward = finetuner.engine.backward
    monkeypatch.setattr(finetuner.engine, "backward", lambda loss, *a, **k: backward(nan_gradient(loss), *a, **k))
    with pytest.raises(Diverged, match=r"^fp16 gradients overflow even at the minimum loss scale \(1\) in "
                                             r"epoch 1: lower --learning-rate, or use bf16$"):
        finetuner.train()
    assert finetuner.engine.skipped_steps == 1  # 2 -> 1, then the floor


@pytest.mark.parametrize("task, labels", [("classification", [2]), ("classification", [0, 2, 1]),
                                          ("regression", [0.5]), ("regression", [0.5, -1.0, 3.0])])
def test_the_training_loss_is_the_models_own(task, labels):
    """task_loss, computed in fp32 from the logits, is what the Hugging Face classifier returns."""
    from transformers import BertConfig, BertForSequenceClassification

    from pipeline.finetuning.trainer import task_loss

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3 if task == "classification" else 1,
                        problem_type="single_label_classification" if task == "classification" else "regression")
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 100, (len(labels), 7))
    labels = torch.tensor(labels, dtype=torch.long if task == "classification" else torch.float)
    out = model(input_ids=ids, labels=labels)
    assert torch.equal(task_loss(out.logits, labels, task), out.loss)


def test_updates_skipped_for_ever_under_a_finite_loss_stop_fine_tuning(pretrained, reviews, tmp_path, monkeypatch):
    """As an fp16 optimizer without ZeRO at its minimum loss scale: every update skipped, the loss
    finite. Here ZeRO's overflow check skips NaN gradients (the CPU config); the run would
    otherwise end with an untrained model and exit 0."""
    from pipeline.finetuning import trainer as finetuning_trainer
    from pipeline.finetuning.trainer import Diverged, Finetuner

    from .faults import nan_gradient

    monkeypatch.setattr(finetuning_trainer, "MAX_SKIPPED_UPDATES", 5)
    finetuner = Finetuner(finetune_config(pretrained, tmp_path / "out", reviews))
    backward = finetuner.engine.backward
    monkeypatch.setattr(finetuner.engine, "backward", lambda loss, *a, **k: backward(
        nan_gradient(loss) if finetuner.step >= 2 else loss, *a, **k))
    with pytest.raises(Diverged, match=r"^5 updates in a row skipped up to epoch 1 \(gradients not finite; fp16: "
                                       r"even at the minimum loss scale\): lower --learning-rate, or use bf16$"):
        finetuner.train()
    assert finetuner.step == 6 and finetuner.engine.skipped_steps == 5  # 2 applied, 5 skipped (the 7th step)


def test_a_diverged_run_ends_the_command_with_one_line_per_rank(pretrained, reviews, tmp_path):
    """A learning rate of 1e4 on 2 ranks: the weights blow up at the first update, every later loss
    is NaN (each update skipped); each rank says so in one line after the epoch's reduced loss,
    they leave the barrier together, exit 1, and no model is saved."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", SCRIPT, "--model", pretrained, "--data", reviews,
                           "--label-column", "category", "--drop-label", "plot", "--epochs", "1",
                           "--global-batch-size", "16", "--micro-batch-size", "8", "--learning-rate", "1e4",
                           "--no-mlflow", "--output-dir", str(out)], capture_output=True, text=True, env=_clean_env(),
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"error: rank {rank}: train loss is nan in epoch 1: lower --learning-rate" in proc.stderr
    assert f'File "{SCRIPT}' not in proc.stderr  # no traceback through this project (torchrun prints its own)
    assert not (out / "model").exists()


def finetuner_order(world, rank, micro, grouped=False, lengths=None, seed=5, global_batch=32):
    """A Finetuner with only what ``epoch_micro_batches`` reads: a train split of rows of
    ``lengths`` (100 rows of random lengths by default)."""
    from types import SimpleNamespace

    from pipeline.ds_config import plan_batches
    from pipeline.finetuning.trainer import Encoded, Finetuner
    from pipeline.tokenized import Ragged

    if lengths is None:
        lengths = np.random.default_rng(0).integers(4, 120, 100)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = Ragged(np.zeros(offsets[-1], np.int32), offsets)
    f = object.__new__(Finetuner)
    f.splits = {"train": Encoded(ids, ids, np.zeros(len(lengths), np.int64), 0)}
    f.config = SimpleNamespace(group_by_length=grouped, engine=SimpleNamespace(
        seed=seed, global_batch_size=global_batch, micro_batch_size=micro))
    f.rank, f.world_size, f.batches = rank, world, plan_batches(global_batch, micro, world)
    return f


@pytest.mark.parametrize("grouped", [False, True], ids=["random", "grouped-by-length"])
def test_global_batches_do_not_depend_on_the_number_of_ranks(grouped):
    def steps(world, rank, micro, epoch=1):
        return finetuner_order(world, rank, micro, grouped).epoch_micro_batches(epoch)

    one = steps(1, 0, 8)  # 1 rank x 4 accumulation steps
    ranks = [steps(4, r, 8) for r in range(4)]  # 4 ranks x 1
    two = [steps(2, r, 8) for r in range(2)]  # 2 ranks x 2
    assert len(one) == 4  # ceil(100 / 32): the last step filled from the epoch's start
    for k, step in enumerate(one):
        whole = sorted(np.concatenate(step).tolist())
        assert sorted(np.concatenate([rs[k][0] for rs in ranks]).tolist()) == whole
        assert sorted(np.concatenate([m for rs in two for m in rs[k]]).tolist()) == whole
    seen = np.concatenate([np.concatenate(s) for s in one])
    assert set(seen.tolist()) == set(range(100)) and len(seen) == 128
    assert not np.array_equal(np.concatenate(steps(1, 0, 8, epoch=2)[0]), np.concatenate(one[0]))  # reshuffled


def test_grouping_by_length_cuts_the_padding_and_keeps_the_epoch_random():
    from pipeline.finetuning.trainer import collate

    lengths = np.random.default_rng(1).integers(4, 120, 2000)
    padded = {}
    for grouped in (False, True):
        f = finetuner_order(1, 0, 16, grouped, lengths, global_batch=16)
        split = f.splits["train"]
        epochs = [[m for step in f.epoch_micro_batches(e) for m in step] for e in (1, 2)]
        padded[grouped] = sum(collate(split, m, 0, "classification")["input_ids"].numel() for m in epochs[0])
        assert sorted(np.concatenate(epochs[0]).tolist()) == list(range(2000))  # every row once
        assert not np.array_equal(epochs[0][0], epochs[1][0])  # another order each epoch
        if grouped:
            spread = [np.ptp(lengths[m]) for m in epochs[0]]
            assert np.median(spread) <= 0.15 * np.ptp(lengths)  # a batch's rows alike in length (random: ~0.85)
            firsts = [lengths[m].max() for m in epochs[0][:8]]
            assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # batches shuffled
    assert padded[True] < 0.6 * padded[False] and padded[True] < 1.1 * lengths.sum(), (padded, lengths.sum())


def test_grouping_by_length_gives_a_row_other_batch_mates_each_epoch():
    """40 steps: in one window of 64 batches a row would meet 62% of its batch-mates again the
    next epoch (the same length band); with at least 4 windows, 17%; random batches 2%."""
    lengths = np.random.default_rng(3).integers(4, 61, 1280)
    f = finetuner_order(1, 0, 32, True, lengths, global_batch=32)
    first, second = ([m for step in f.epoch_micro_batches(e) for m in step] for e in (1, 2))
    mates = {r: set(batch.tolist()) - {r} for batch in first for r in batch.tolist()}
    again = [len(mates[r] & set(batch.tolist())) / len(mates[r]) for batch in second for r in batch.tolist()]
    assert np.mean(again) < 0.3, np.mean(again)
    assert np.median([np.ptp(lengths[m]) for m in first]) <= 0.15 * np.ptp(lengths)  # still alike in length


def test_sentence_pairs_and_regression(pretrained, tmp_path):
    """Pairs: does this plot and this review concern the same film? Regression: a 0-1 score."""
    from pipeline.finetuning.trainer import Finetuner, collate

    table = read_table(ROTTEN_TOMATOES)
    plots = {m: t for c, t, m in zip(table.columns["category"], table.columns["text"], table.columns["movie_name"])
             if c == "plot" and t.strip()}  # 14 of the sample's plots are blank: a text fine-tuning refuses
    reviews = [(t, m) for c, t, m in zip(table.columns["category"], table.columns["text"], table.columns["movie_name"])
               if c != "plot" and m in plots][:300]
    films = sorted(plots)
    rng = np.random.default_rng(0)
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for k, (review, film) in enumerate(reviews):
            same = k % 2 == 0
            other = film if same else films[(films.index(film) + 1 + rng.integers(len(films) - 1)) % len(films)]
            # A score the review alone tells: whether it says "film" (a quarter of them), plus noise.
            f.write(json.dumps({"plot": plots[other], "review": review, "same_film": same,
                                "score": float("film" in review.lower()) * 0.8 + rng.random() * 0.2}) + "\n")
    pair = Finetuner(FinetuneConfig.from_flat(model=pretrained, data=str(path), text_column="plot",
                                              text_pair_column="review", label_column="same_film",
                                              output_dir=str(tmp_path / "pair"), epochs=1, mlflow=False,
                                              global_batch_size=16, micro_batch_size=16))
    assert pair.task == "classification" and pair.data.labels == ["false", "true"]  # JSON booleans, named
    train = pair.splits["train"]
    assert all(1 in types for types in train.token_type_ids)  # the review is segment B
    assert max(len(ids) for ids in train.input_ids) == 64 and train.truncated > 0  # long plots, counted
    pair.train()
    assert pair.test_report()["rows_truncated"]["train"] == train.truncated

    regression = Finetuner(FinetuneConfig.from_flat(
        model=pretrained, data=str(path), text_column="review", label_column="score",
        output_dir=str(tmp_path / "regression"), epochs=8, learning_rate=1e-3, mlflow=False, global_batch_size=16,
        micro_batch_size=16, patience=0, max_seq_length=48, predict=[str(path)]))
    assert regression.task == "regression" and regression.metric == "pearson"
    # A previous classification run's outputs in the same --output-dir: beside this run's metrics.jsonl
    # they made a killed run look complete, and its confusion matrix stayed beside a regression report.
    (tmp_path / "regression" / "model").mkdir(parents=True)
    for name in ("report.json", "confusion_matrix.png", "model/config.json"):
        (tmp_path / "regression" / name).write_text("{}")
    regression.train()
    assert sorted(os.listdir(tmp_path / "regression")) == ["metrics.jsonl", "pretrained"]  # (the export cache)
    report = regression.test_report()
    losses = [h["train_loss"] for h in report["history"]]
    assert losses[-1] < losses[0]  # MSE falls
    assert report["test"]["pearson"] > 0.5  # learned from the text: 0.89 measured; a model blind to it scores ~0
    assert "warnings" not in report  # its predictions spread as the labels do
    model_dir = regression.save_model(str(tmp_path / "regression" / "model"))
    scores, model = saved_model_outputs(model_dir, regression)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert report["settings"]["max_seq_length"] == 48 and report["settings"]["learning_rate"] == 1e-3
    from pipeline.metrics import regression_metrics

    expected = regression_metrics(regression.splits["test"].labels, scores[:, 0])
    # The saved model reruns the test rows padded differently from the engine's batches: scores agree to
    # float rounding, which moved the correlation by 1.2e-5 in a run.
    assert report["test"]["pearson"] == pytest.approx(expected["pearson"], abs=1e-4)
    assert report["test"]["spearman"] == pytest.approx(expected["spearman"], abs=1e-4)
    # --predict: a score per row of the file, in its order, as the saved model gives them
    written = regression.write_predictions(str(tmp_path / "regression"))
    assert written["pairs"]["file"] == "predictions/pairs.tsv" and written["pairs"]["rows"] == len(reviews)
    lines = (tmp_path / "regression" / "predictions" / "pairs.tsv").read_text().splitlines()
    rows = np.arange(len(reviews))
    batch = collate(regression.prediction_sets["pairs"], rows, regression.tokenizer.pad_token_id, "regression")
    batch.pop("labels")
    with torch.no_grad():
        saved = model(**batch).logits[:, 0].numpy()
    assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in rows]
    np.testing.assert_allclose([float(line.split("\t")[1]) for line in lines[1:]], saved, atol=1e-4)
    assert np.std(saved) > 0.05  # scores that differ by row: a shuffled file would not pass


def test_mnli_shaped_splits_and_predictions_for_unlabelled_rows(pretrained, tmp_path):
    """GLUE's MNLI layout (validated on validation_matched, tested on validation_mismatched, its
    test splits unlabelled): --predict writes the saved model's prediction for every row, in file
    order, for a split and for a file without labels. The hypothesis says the label (a review and
    "rotten."), so that a few epochs learn to tell rows apart and a shuffled file would show."""
    import datasets

    table = read_table(ROTTEN_TOMATOES)
    rng = np.random.default_rng(5)
    rows = [(t, said, said) for c, t in zip(table.columns["category"], table.columns["text"]) if c != "plot"
            for said in [("fresh", "rotten")[rng.integers(2)]]][:400]
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["fresh", "rotten"])})

    def part(chunk, unlabelled=False):
        return datasets.Dataset.from_dict({"premise": [r[0] for r in chunk], "hypothesis": [r[1] for r in chunk],
                                           "label": [-1 if unlabelled else int(r[2] == "rotten") for r in chunk]},
                                          features=features)

    datasets.DatasetDict({"train": part(rows[:280]), "validation_matched": part(rows[280:320]),
                          "validation_mismatched": part(rows[320:360]), "test_matched": part(rows[360:390], True),
                          "test_mismatched": part(rows[390:], True)}).save_to_disk(str(tmp_path / "mnli"))
    loose = tmp_path / "loose.tsv"  # no label column at all
    with open(loose, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([("premise", "hypothesis"), *((r[0], r[1]) for r in rows[:25])])
    out = tmp_path / "out"
    # A process of its own: fine-tuning's end destroys the process group, which would break every
    # DeepSpeed engine built later in this one.
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--model", pretrained, "--data", str(tmp_path / "mnli"), "--text-column", "premise",
         "--text-pair-column", "hypothesis", "--validation-split", "validation_matched", "--test-split",
         "validation_mismatched", "--predict", "test_matched", "--predict", str(loose), "--output-dir", str(out),
         "--epochs", "3", "--global-batch-size", "16", "--micro-batch-size", "16", "--learning-rate", "1e-3",
         "--no-mlflow"], capture_output=True, text=True, env=_clean_env(MASTER_PORT=str(free_port())), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.load(open(out / "report.json"))
    assert report["rows"] == {"train": 280, "validation": 40, "test": 40}
    assert report["split_from"]["test"] == str(tmp_path / "mnli")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")

    def cut(chunk):  # rows longer than the fine-tuning length
        return sum(len(tokenizer(p, h)["input_ids"]) > report["max_seq_length"] for p, h, _ in chunk)

    assert report["predictions"] == {
        "test_matched": {"file": "predictions/test_matched.tsv", "from": "test_matched", "rows": 30,
                         "rows_truncated": cut(rows[360:390])},
        "loose": {"file": "predictions/loose.tsv", "from": str(loose), "rows": 25, "rows_truncated": cut(rows[:25])}}
    assert report["predictions"]["loose"]["rows_truncated"] > 0  # long reviews: the count is not trivially 0
    for name, chunk in (("test_matched", rows[360:390]), ("loose", rows[:25])):
        with open(out / "predictions" / f"{name}.tsv", newline="") as f:
            written = list(csv.reader(f, delimiter="\t"))
        assert written[0] == ["index", "prediction"] and [r[0] for r in written[1:]] == [str(i) for i in range(len(chunk))]
        # The saved model, one row at a time: the file's order, not the length-sorted batches'.
        with torch.no_grad():
            logits = torch.cat([model(**tokenizer(p, h, truncation=True, max_length=report["max_seq_length"],
                                                  return_tensors="pt")).logits for p, h, _ in chunk])
        expected = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
        clear = (logits[:, 0] - logits[:, 1]).abs() > 1e-4  # a near tie may fall either way with other padding
        assert clear.sum() >= len(chunk) - 1
        assert [w[1] for w, c in zip(written[1:], clear) if c] == [e for e, c in zip(expected, clear) if c]
        assert 0.25 < np.mean([w[1] == "rotten" for w in written[1:]]) < 0.75  # rows told apart


def test_class_ids_are_refused_for_a_regression_task(pretrained, tmp_path):
    from pipeline.finetuning.config import FinetuneConfigError
    from pipeline.finetuning.trainer import Finetuner

    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps({"text": f"review {i}", "score": i / 7}) + "\n" for i in range(40)))
    with pytest.raises(FinetuneConfigError, match="--predict-as id: a regression task predicts scores, not classes"):
        Finetuner(FinetuneConfig.from_flat(model=pretrained, data=str(path), label_column="score", predict_as="id",
                                           output_dir=str(tmp_path / "out"), mlflow=False))
    assert not (tmp_path / "out").exists()


def test_class_ids_are_refused_where_the_models_are_not_the_class_labels(pretrained, tmp_path):
    import datasets

    from pipeline.finetuning.config import FinetuneConfigError
    from pipeline.finetuning.trainer import Finetuner

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "neutral", "pos"])})
    datasets.Dataset.from_dict({"text": [f"review {i}" for i in range(40)], "label": [0, 1, 2, 0] * 10},
                               features=features).save_to_disk(str(tmp_path / "three"))
    # without "neutral", the model's id 1 is "pos", the ClassLabel's 2
    with pytest.raises(FinetuneConfigError, match=r"--predict-as id: the model's class ids are not the ClassLabel's, "
                                                  r"which has classes train has no row of \('neutral'\)"):
        Finetuner(FinetuneConfig.from_flat(model=pretrained, data=str(tmp_path / "three"), drop_labels=["neutral"],
                                           predict=[str(tmp_path / "three")], predict_as="id",
                                           output_dir=str(tmp_path / "out"), mlflow=False))
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_is_not_the_models_is_refused(pretrained, tmp_path):
    from transformers import AutoConfig

    hf_dir = export.export_checkpoint(pretrained, out_dir=str(tmp_path / "hf"))
    config = AutoConfig.from_pretrained(hf_dir)
    load_tokenizer(hf_dir, None, config)  # its own: fine
    other = tmp_path / "other_tokenizer"
    shutil.copytree(hf_dir, other)
    spm = other / "spm.model"
    spm.write_bytes(spm.read_bytes() + b"\0")  # same vocabulary size, another SentencePiece model
    with pytest.raises(ModelSourceError, match=r"--tokenizer .*other_tokenizer: tokenizer fingerprint .* differs"):
        load_tokenizer(hf_dir, str(other), config)
    config.vocab_size = 4096
    with pytest.raises(ModelSourceError, match=r"the tokenizer has 4000 tokens but the model in .* has vocab_size 4096"):
        load_tokenizer(hf_dir, None, config)
    # a model folder copied without its tokenizer files: transformers made a tokenizer of the 5 special
    # tokens, refused as "the tokenizer has 5 tokens but the model has vocab_size 4000"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(hf_dir, name), bare / name)
    config.vocab_size = 4000
    with pytest.raises(ModelSourceError, match=re.escape(
            f"--model {bare}: no tokenizer files there (tokenizer.json, tokenizer_config.json, vocab.txt, vocab.json "
            "or a SentencePiece .model): pass --tokenizer with the folder of the one it was pretrained with")):
        load_tokenizer(str(bare), None, config)
    assert len(load_tokenizer(str(bare), hf_dir, config)) == 4000  # its tokenizer given: fine


def test_fine_tuning_past_the_pretrained_length_is_flagged(pretrained, tmp_path):
    from transformers import AutoConfig

    from pipeline.finetuning.trainer import untrained_positions_warning

    hf_dir = export.export_checkpoint(pretrained, out_dir=str(tmp_path / "hf"))
    tokenizer = load_tokenizer(hf_dir, None, AutoConfig.from_pretrained(hf_dir))
    assert tokenizer.model_max_length == 64  # the pretraining data's --max-seq-length
    warning = untrained_positions_warning(128, tokenizer, "pretrained")
    assert "--max-seq-length 128" in warning and "position embeddings 64..127 were never trained" in warning
    assert untrained_positions_warning(64, tokenizer, "pretrained") is None
    assert untrained_positions_warning(128, tokenizer, "random") is None  # nothing was trained anyway


def test_pretrained_encoder_fresh_head_and_optionally_fresh_pooler(pretrained, tmp_path):
    from transformers import AutoModelForPreTraining

    from pipeline.finetuning.model import build_classifier

    hf_dir = export.export_checkpoint(pretrained, out_dir=str(tmp_path / "hf"))
    source = AutoModelForPreTraining.from_pretrained(hf_dir).state_dict()
    for reinit in (False, True):
        torch.manual_seed(0)
        model = build_classifier(hf_dir, "classification", ["a", "b"], "pretrained", reinit_pooler=reinit)
        weights = model.state_dict()
        encoder = [k for k in weights if k.startswith("bert.") and ".pooler." not in k]
        assert encoder and all(torch.equal(weights[k], source[k]) for k in encoder)
        assert torch.equal(weights["bert.pooler.dense.weight"], source["bert.pooler.dense.weight"]) != reinit
        assert weights["classifier.weight"].shape == (2, model.config.hidden_size)
    random = build_classifier(hf_dir, "classification", ["a", "b"], "random").state_dict()
    assert not torch.equal(random["bert.embeddings.word_embeddings.weight"], source["bert.embeddings.word_embeddings.weight"])


def test_a_run_dir_whose_data_dir_moved_is_one_line_naming_the_fix(pretrained, tmp_path):
    """The export needs the data dir's tokenizer: a moved one was a DataDirError traceback."""
    import shutil

    from pipeline.finetuning.model import ModelSourceError, resolve_model_dir

    moved = tmp_path / "run"
    shutil.copytree(pretrained, moved, ignore=shutil.ignore_patterns("hf"))
    config = json.loads((moved / "train_config.json").read_text())
    config["data"] = str(tmp_path / "gone")
    (moved / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=rf"--model {re.escape(str(moved))}: data dir .*gone does not exist "
                                               rf".*if it moved, export with python pipeline/export.py "
                                               rf"{re.escape(str(moved))} --data NEW_PATH, and pass the export"):
        resolve_model_dir(str(moved), str(tmp_path / "out"), True, lambda: None)


def test_a_fine_tuned_model_gets_a_new_head_for_the_next_task(pretrained, tmp_path):
    """MNLI before RTE: 3 labels, then 2 (transformers refused the mismatched head with a traceback),
    or as many labels as before (the old task's head was kept and mapped onto the new labels)."""
    from pipeline.finetuning.model import build_classifier

    hf_dir = export.export_checkpoint(pretrained, out_dir=str(tmp_path / "hf"))
    first = build_classifier(hf_dir, "classification", ["x", "y", "z"], "pretrained")
    with torch.no_grad():
        first.classifier.weight.fill_(0.5)
        first.classifier.bias.fill_(0.5)
    first.save_pretrained(tmp_path / "fine-tuned")
    old = first.state_dict()
    for task, labels in (("classification", ["a", "b"]), ("classification", ["p", "q", "r"]), ("regression", [])):
        model = build_classifier(str(tmp_path / "fine-tuned"), task, labels, "pretrained")
        weights = model.state_dict()
        assert all(torch.equal(weights[k], old[k]) for k in old if k.startswith("bert."))  # the encoder, kept
        assert weights["classifier.weight"].shape == (len(labels) or 1, model.config.hidden_size)
        assert not (weights["classifier.weight"] == 0.5).any() and not weights["classifier.bias"].any()
        assert weights["classifier.weight"].std() < 0.1  # BERT's initialisation, std 0.02
    # The same task and labels (more data for it): its head goes on.
    same = build_classifier(str(tmp_path / "fine-tuned"), "classification", ["x", "y", "z"], "pretrained")
    assert (same.state_dict()["classifier.weight"] == 0.5).all()
    # A token classifier's head is named classifier too, and is no sequence task's.
    from transformers import BertForTokenClassification

    tokens = BertForTokenClassification.from_pretrained(str(tmp_path / "fine-tuned"), num_labels=3)
    with torch.no_grad():
        tokens.classifier.weight.fill_(0.5)
    tokens.save_pretrained(tmp_path / "token-classifier")
    for labels in (["x", "y", "z"], ["a", "b"]):
        model = build_classifier(str(tmp_path / "token-classifier"), "classification", labels, "pretrained")
        assert not (model.state_dict()["classifier.weight"] == 0.5).any()


class recording_http_server:
    """A local HTTP server that answers 404 to everything and records each request's path."""

    def __enter__(self):
        import http.server
        import threading

        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self):
                requests.append(f"{self.command} {self.path}")
                self.send_error(404)

            do_GET = do_HEAD = do_POST = _record

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(extra)
    return env


def test_bad_data_and_bad_model_fail_with_one_line(pretrained, reviews, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases = [
        (["--model", pretrained, "--data", reviews, "--label-column", "label"],
         f"{reviews}: no column 'label' (columns: category, text, movie_name)"),
        (["--model", pretrained, "--train", reviews, "--test", str(empty), "--label-column", "category"],
         f"{empty}: the file is empty"),
        (["--model", str(tmp_path), "--data", reviews, "--label-column", "category"],
         "neither a Hugging Face export (no config.json) nor a usable pretrain run"),
        # before: accepted, then a KeyError after the first epoch
        (["--model", pretrained, "--data", reviews, "--label-column", "category", "--metric", "pearson"],
         "--metric pearson is a regression metric; this is a classification task (3 labels;"),
    ]
    for k, (args, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        proc = subprocess.run([sys.executable, SCRIPT, *args, "--no-mlflow", "--output-dir", str(out)],
                              capture_output=True, text=True, env=_clean_env(MASTER_PORT=str(free_port())))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr
        if k in (0, 1, 3):  # bad data or flags: found before the process group (DeepSpeed's start-up),
            assert not out.exists()  # which the output dir now follows
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--text-pair-column" in proc.stdout and "--register-name" in proc.stdout


@pytest.mark.e2e
def test_one_and_two_ranks_give_the_same_run(pretrained, reviews, tmp_path):
    """torchrun, gloo, ZeRO-2, global batch 16: 1 rank x 2 micro-batches vs 2 ranks x 1; an HF export
    without dropout, so that the maths must agree."""
    hf_dir = export.export_checkpoint(pretrained, out_dir=str(tmp_path / "hf"))
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    json.dump(config, open(os.path.join(hf_dir, "config.json"), "w"))
    args = ["--model", hf_dir, "--data", reviews, "--label-column", "category", "--drop-label", "plot", "--epochs", "2",
            "--global-batch-size", "16", "--micro-batch-size", "8", "--learning-rate", "1e-3", "--no-mlflow",
            "--predict", reviews, "--predict-as", "id"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"ranks{n}"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                               f"--master_port={free_port()}", SCRIPT, *args, "--output-dir", str(out)],
                              capture_output=True, text=True, env=_clean_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[n] = ([json.loads(line) for line in open(out / "metrics.jsonl")], json.load(open(out / "report.json")))
    (one, one_report), (two, two_report) = runs[1], runs[2]
    assert two_report["world_size"] == 2 and [m["epoch"] for m in one] == [m["epoch"] for m in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["validation/loss"] == pytest.approx(a["validation/loss"], rel=1e-4)
        assert b["validation/accuracy"] == a["validation/accuracy"]
    assert two_report["test"]["accuracy"] == one_report["test"]["accuracy"]
    assert two_report["confusion_matrix"] == one_report["confusion_matrix"]
    # predictions gathered from 2 ranks: every row once, in file order, as 1 rank predicts them
    one_ids, two_ids = ((tmp_path / f"ranks{n}" / "predictions" / "reviews.tsv").read_text().splitlines()
                        for n in (1, 2))
    assert len(one_ids) == 641 and two_ids == one_ids and {line.split("\t")[1] for line in one_ids[1:]} <= {"0", "1"}


@pytest.mark.e2e
def test_a_stop_signal_ends_fine_tuning_with_its_mlflow_run_killed(pretrained, reviews, tmp_path, mlflow_server):
    """SLURM's time limit, scancel and preemption send SIGTERM (or the batch script's SIGUSR1):
    the run must end KILLED, not stay RUNNING, and leave no model that looks finished."""
    import signal
    import time

    import mlflow

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "from": "an earlier run"}\n')
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--model", pretrained, "--data", reviews, "--label-column", "category",
         "--drop-label", "plot", "--epochs", "500", "--output-dir", str(out), "--run-name", "ft-stopped"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env(MLFLOW_TRACKING_URI=mlflow_server))
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            if epochs and "from" not in epochs[0]:
                break  # this run's first epoch is done
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "error: stopped by SIGTERM: fine-tuning keeps no checkpoint" in stderr
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1)) and len(epochs) < 500
    assert not (out / "model").exists() and not (out / "report.json").exists()
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("bert-pipeline").experiment_id],
                             filter_string="attributes.run_name = 'ft-stopped'")[0]
    assert run.info.status == "KILLED"


@pytest.mark.e2e
def test_a_stop_signal_on_one_rank_stops_both_at_the_same_step(pretrained, reviews, tmp_path):
    """torchrun, 2 ranks on gloo; SIGTERM to rank 1 only (a signal may reach some ranks only): the
    ranks agree on it, so rank 0 does not wait in a collective for a peer that left."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", SCRIPT,
         "--model", pretrained, "--data", reviews, "--label-column", "category", "--drop-label", "plot",
         "--epochs", "500", "--global-batch-size", "16", "--micro-batch-size", "8", "--output-dir", str(out),
         "--no-mlflow"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env())
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [pid for pid in children if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")]
        assert len(rank1) == 1, children
        signalled = time.monotonic()
        os.kill(int(rank1[0]), signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert time.monotonic() - signalled < 60
    assert output.count("error: stopped by SIGTERM: fine-tuning keeps no checkpoint") == 2, output[-4000:]
    assert not (out / "model").exists()


@pytest.mark.e2e
def test_mlflow_run_artifacts_and_registered_model(pretrained, reviews, tmp_path, mlflow_server, monkeypatch):
    """deepspeed launcher, one rank; the run, its lineage tags, metrics per epoch, the report, and
    the model logged with the transformers flavour and registered, on a real MLflow server."""
    import mlflow

    pretrain_hf = export.export_checkpoint(pretrained)  # where pretrain.py puts it: RUN_DIR/hf/<tag>
    table = read_table(ROTTEN_TOMATOES)
    plots = [t for c, t in zip(table.columns["category"], table.columns["text"]) if c == "plot" and t.strip()][:12]
    (tmp_path / "plots.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in plots))  # no labels
    # The Hugging Face Hub, as far as this run knows, is a local server that records what it is asked:
    # "--output-dir out" makes "out/model", which reads as a hub repo id.
    with recording_http_server() as hub:
        proc = subprocess.run(
            ["deepspeed", "--master_port", str(free_port()), SCRIPT, "--model", pretrained, "--data", reviews,
             "--label-column", "category", "--drop-label", "plot", "--epochs", "2", "--output-dir", "out",
             "--run-name", "ft-e2e", "--register-name", "reviews-tiny", "--learning-rate", "1e-3",
             "--predict", "plots.jsonl"],
            capture_output=True, text=True, cwd=tmp_path, timeout=400,
            env=_clean_env(MLFLOW_TRACKING_URI=mlflow_server, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert hub.requests == []  # logging the model asked the hub for a model card and licence of "out/model"
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("bert-pipeline").experiment_id],
                             filter_string="tags.stage = 'finetune' and attributes.run_name = 'ft-e2e'")[0]
    info = json.load(open(os.path.join(pretrain_hf, "training_info.json")))
    assert run.info.status == "FINISHED"
    assert run.data.tags["pretrain_run_id"] == "pretrain-run-123" and run.data.tags["model_kind"] == "pretrained"
    assert f"MLflow run {run.info.run_id} (stage finetune" in proc.stderr  # the id report.py takes, in the log
    # MLflow's two warnings on every fine-tune that the Hub has no card or licence for a local model
    assert "model card could not be retrieved" not in proc.stderr and "license information" not in proc.stderr
    # an id that is not known is left out, not written as "None"
    assert run.data.tags.get("data_run_id") == (str(info["data_run_id"]) if info["data_run_id"] else None)
    params = run.data.params
    assert params["model_dir"] == pretrain_hf  # the run's own export was used, not a new one
    assert params["labels"] == "fresh,rotten" and params["rows_dropped_train"] == "40" and params["epochs"] == "2"
    # the labelled data, as the registered model's lineage needs it: where, and which bytes
    import hashlib

    assert params["data_path"] == os.path.abspath(reviews) and "train_path" not in params
    # flags left to the data and the model, under their own names as they came out
    assert (params["task"], params["metric"], params["max_seq_length"]) == ("classification", "accuracy", "64")
    assert "mlflow" not in params and "task_inferred" not in params
    with open(reviews, "rb") as f:
        assert params["data_sha256"] == hashlib.sha256(b"data\0\0" + f.read()).hexdigest()
    history = client.get_metric_history(run.info.run_id, "validation/accuracy")
    assert [m.step for m in history] == [1, 2]
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert run.data.metrics["test/accuracy"] == pytest.approx(report["test"]["accuracy"])
    assert report["finetune_run_id"] == run.info.run_id
    for split, logged_as in (("test", "test"), ("validation", "best_validation")):
        for label in ("fresh", "rotten"):
            assert run.data.metrics[f"{logged_as}/f1/{label}"] == pytest.approx(
                report["per_class"][split]["classes"][label]["f1"])
    # the kept model's validation figures, apart from the epochs' series (whose latest is the last epoch's)
    assert run.data.metrics["best_epoch"] == report["best_epoch"]
    assert run.data.metrics["best_validation/accuracy"] == pytest.approx(report["validation"]["accuracy"])
    assert run.data.metrics["test/f1_weighted"] == pytest.approx(report["per_class"]["test"]["weighted_avg"]["f1"])
    assert "weighted avg" in proc.stdout  # the per-class table at the end of the run
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "confusion_matrix.png", "ds_config.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "predictions")] == ["predictions/plots.tsv"]
    written = (tmp_path / "out" / "predictions" / "plots.tsv").read_text().splitlines()
    assert len(written) == 13 and all(line.split("\t")[1] in ("fresh", "rotten") for line in written[1:])
    assert "predictions: out/predictions/plots.tsv (12 rows of plots.jsonl)" in proc.stdout
    version = client.get_registered_model("reviews-tiny").latest_versions[0]
    assert version.run_id == run.info.run_id
    # the registry's page says what the version is without opening its run
    version = client.get_model_version("reviews-tiny", version.version)
    accuracy = report["test"]["accuracy"]
    assert version.description == (f"classification (fresh, rotten) fine-tuned from {pretrain_hf}: test accuracy "
                                   f"{accuracy:.4f} on {report['rows']['test']} rows; MLflow run {run.info.run_id}")
    assert {k: version.tags.get(k) for k in ("task", "metric", "test_accuracy", "data_sha256", "pretrain_run_id")} == {
        "task": "classification", "metric": "accuracy", "test_accuracy": f"{accuracy:.4f}",
        "data_sha256": params["data_sha256"], "pretrain_run_id": "pretrain-run-123"}
    # Through the environment, undone after the test: mlflow.set_tracking_uri would point every later
    # test of the session at this server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    classifier = mlflow.transformers.load_model(f"models:/reviews-tiny/{version.version}")
    prediction = classifier(["A dull, lifeless film.", "A triumph."])
    assert {p["label"] for p in prediction} <= {"fresh", "rotten"}
    # Served, a text longer than the position embeddings is cut to the fine-tuning length (before:
    # a size mismatch in the embeddings), and scored as the report's test texts were.
    served = mlflow.pyfunc.load_model(f"models:/reviews-tiny/{version.version}")
    long_text = "A dull, lifeless film. " * 200
    cut = classifier(long_text, truncation=True, max_length=report["max_seq_length"])[0]
    assert served.predict([long_text])["label"].tolist() == [cut["label"]]


def test_only_a_bert_gets_the_4d_mask_other_encoders_keep_the_2d_one_they_may_need():
    """ModernBERT's mean pooling reads the 2-D mask itself: a 4-D one breaks it mid-epoch, at the
    first padded batch. Fine-tuning takes any Hugging Face encoder, so only BERT gets the 4-D mask."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from pipeline.finetuning.trainer import on_device

    batch = {"input_ids": torch.randint(5, 100, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    batch["attention_mask"][1, 9:] = 0
    assert on_device(batch, "cpu", "bert")["attention_mask"].shape == (3, 1, 1, 16)
    assert on_device({**batch, "attention_mask": torch.ones(3, 16)}, "cpu", "bert")["attention_mask"] is None
    inputs = on_device(batch, "cpu", "modernbert")
    assert torch.equal(inputs["attention_mask"], batch["attention_mask"])
    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        classifier_pooling="mean", num_labels=2, pad_token_id=0)).eval()
    assert model(**inputs).logits.shape == (3, 2)  # transformers 5.25: a 4-D mask raises a shape error here


def test_a_tokenized_split_holds_a_few_hundred_bytes_a_row_and_counts_only_cut_rows():
    """Python lists of ints held about 7 KB a row of 40 tokens, on every rank for the whole run (14 GB
    a rank for a 2M-row table); a row of exactly --max-seq-length tokens was counted as cut."""
    import bz2
    import io
    import tracemalloc

    from transformers import AutoTokenizer

    from pipeline.finetuning.data import Examples
    from pipeline.finetuning.trainer import encode

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO, "tests", "data", "pretrained_reviews"))
    with io.TextIOWrapper(bz2.open(os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2")),
                          encoding="utf-8") as f:
        texts = [row["text"] for _, row in zip(range(5000), csv.DictReader(f))]
    examples = Examples(texts, texts[::-1], np.zeros(len(texts), np.int64), [""] * len(texts))
    tracemalloc.start()
    try:
        encoded = encode(tokenizer, examples, 64)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / len(texts) < 600, held / len(texts)
    for i in range(0, len(texts), 499):  # the same ids as the tokenizer's own, row by row
        expected = tokenizer(texts[i], texts[-1 - i], truncation=True, max_length=64, return_token_type_ids=True)
        assert encoded.input_ids[i].tolist() == expected["input_ids"]
        assert encoded.token_type_ids[i].tolist() == expected["token_type_ids"]
    exact = next(" ".join(["good"] * n) for n in range(40, 80)
                 if len(tokenizer(" ".join(["good"] * n))["input_ids"]) == 64)
    cut = encode(tokenizer, Examples([exact, exact + " good"], None, np.zeros(2, np.int64), ["", ""]), 64)
    assert cut.truncated == 1 and cut.input_ids.lengths().tolist() == [64, 64]
