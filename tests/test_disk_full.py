"""A real full disk (a tmpfs filled up: ``small_disk`` in tests/conftest.py) under fine-tuning,
embedding and preprocessing: one line that names the file and what to do, no traceback, and
nothing written halfway under its final name; a disk too full for what a run will write is said
at its start. A full disk during a checkpoint's save: tests/test_checkpoint_faults.py."""

import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from preprocessing import driver

from pipeline import checkpoint, embed, finetune, pretrain
from pipeline.checkpoint import CheckpointWriteError
from pipeline.export import estimated_bytes, export_checkpoint, write_train_config
from pipeline.finetuning.trainer import Finetuner, warn_if_short_of_space
from pipeline.trainer import Trainer

from .conftest import REPO, WIKI_SAMPLE, set_one_process_world
from .test_checkpoint_faults import STEP4, cli_args, config, fill_once, one_error_line
from .test_finetune import write_reviews

BUNDLE = os.path.join(REPO, "tests", "data", "pretrained_reviews")  # a pretraining export (make_bundle.py)


def test_a_full_disk_at_the_end_of_fine_tuning_leaves_no_model_cut_short(small_disk, tmp_path, monkeypatch, capsys):
    set_one_process_world(monkeypatch)
    out = os.path.join(small_disk.path, "ft")
    fill_once(monkeypatch, Finetuner, "save_model", small_disk)
    args = ["--model", BUNDLE, "--data", write_reviews(tmp_path / "reviews.csv"), "--label-column", "category",
            "--drop-label", "plot", "--epochs", "1", "--max-seq-length", "32", "--global-batch-size", "32",
            "--output-dir", out, "--no-mlflow"]
    assert finetune.main(args) == 1
    assert one_error_line(capsys) == (f"error: cannot write the fine-tuned model {out}/model: no space left on device; "
                                      "free space there, then fine-tune again (fine-tuning keeps no checkpoint)")
    # No model folder, whole or not, hidden or not, and no report that would vouch for one.
    assert [f for f in small_disk.files() if f != "ft/.lock"] == ["ft", "ft/metrics.jsonl"]


def test_an_output_disk_too_full_for_the_model_is_warned_about_at_the_start(small_disk, caplog):
    model = torch.nn.Linear(1024, 1024)  # 4 MiB in fp32
    with caplog.at_level(logging.WARNING, logger="pipeline.finetuning.trainer"):
        warn_if_short_of_space(small_disk.path, model, BUNDLE)
        assert not caplog.records  # 64 MiB free
        small_disk.fill()
        warn_if_short_of_space(small_disk.path, model, BUNDLE)
    assert f"--output-dir {small_disk.path} has 0 MiB free; the fine-tuned model needs about 5 MiB" in caplog.text


def test_a_tracking_store_that_fills_up_is_warned_about_and_the_run_still_exports(
        data_dir, small_disk, tmp_path, monkeypatch, caplog):
    """MLflow's sqlite database on a disk that fills up once training has begun: the run goes on,
    exports, exits 0, and says what MLflow lost (before: the first failed call's traceback, and
    no export)."""
    set_one_process_world(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{small_disk.path}/mlflow.db")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns) beside, not on the full disk
    fill_once(monkeypatch, Trainer, "train", small_disk)
    run_dir = tmp_path / "run"
    args = [a for a in cli_args(data_dir, run_dir) if a != "--no-mlflow"] + ["--log-every", "1"]
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        assert pretrain.main(args) == 0
    assert os.path.isfile(run_dir / "hf" / STEP4 / "model.safetensors")
    assert len(open(run_dir / "metrics.jsonl").readlines()) == 4  # the run's own record is whole
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.tracking"]
    assert warnings and warnings[0].startswith("MLflow could not record"), warnings
    assert "(sqlite3.OperationalError) database or disk is full" in warnings[0], warnings
    assert "is missing what" in warnings[-1] and "the stage's own files are complete" in warnings[-1], warnings
    # MLflow's own logger repeats the error for every step's metrics: once is enough.
    repeated = [r.name for r in caplog.records if r.name.startswith("mlflow.") and r.levelno >= logging.ERROR]
    assert repeated and all(repeated.count(name) == 1 for name in repeated), repeated


def test_a_full_disk_under_the_embeddings_leaves_no_file(small_disk, tmp_path, monkeypatch, capsys):
    set_one_process_world(monkeypatch)
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nThe film is a delight.\nA dull and overlong mess.\n")
    out = os.path.join(small_disk.path, "emb.parquet")
    small_disk.fill()
    assert embed.main(["--model", BUNDLE, "--input", str(texts), "--out", out, "--no-mlflow"]) == 1
    assert one_error_line(capsys) == (f"error: cannot write the embeddings {out}: no space left on device; "
                                      "free space there, then rerun")
    assert small_disk.files() == []  # not even an empty temporary file


def run_beam_on(out: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), "--input", WIKI_SAMPLE,
                           "--output", out, "--vocab-size", "500", "--num-shards", "1", "--no-mlflow", *flags],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def test_an_output_disk_full_from_the_start_is_refused_before_the_input_is_read(small_disk):
    out = os.path.join(small_disk.path, "data")
    small_disk.fill(leave=1 << 20)
    proc = run_beam_on(out, "--dupe-factor", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --output {out}: the file system of {small_disk.path} is full (1.0 MiB free): free space there, "
        "or name an --output on another disk")
    assert "vocabulary" not in proc.stderr and small_disk.files() == []  # nothing read, trained or made


def test_a_rerun_that_fills_the_disk_puts_the_previous_data_dir_back_whole(small_disk, data_dir):
    out = os.path.join(small_disk.path, "data")
    shutil.copytree(data_dir, out)
    before = {os.path.relpath(os.path.join(root, f), out): open(os.path.join(root, f), "rb").read()
              for root, _, files in os.walk(out) for f in files if f != ".lock"}  # the lock its run held
    small_disk.fill(leave=5 << 20)
    proc = run_beam_on(out, "--dupe-factor", "5")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(
        f": no space left on device; {out} holds the previous data dir again, whole (this run's files are deleted): "
        "free space there (the previous data dir stays until a run finishes: delete it to give the run its room), "
        "then rerun into the same --output"), proc.stderr[-3000:]
    after = {os.path.relpath(os.path.join(root, f), out): open(os.path.join(root, f), "rb").read()
             for root, _, files in os.walk(out) for f in files if f != ".lock"}
    assert after == before


def test_a_disk_that_fills_up_under_preprocessing_is_one_line_and_no_manifest(small_disk):
    out = os.path.join(small_disk.path, "data")
    small_disk.fill(leave=5 << 20)  # room to start (a nearly full disk is warned of), not for the shards
    proc = run_beam_on(out, "--dupe-factor", "5")
    assert f"--output {out}: the file system of {small_disk.path} has 5 MiB free" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ": no space left on device; the data dir " in errors[0], proc.stderr[-3000:]
    assert errors[0].endswith("free space there, then rerun into the same --output"), errors
    assert "manifest.json" not in os.listdir(out) if os.path.isdir(out) else True
    # The rerun it advises is not refused as full: it deletes what the failed run left first, whose
    # space counts as free (its part files filled the disk)
    assert shutil.disk_usage(small_disk.path).free < 1 << 20
    driver.check_writable(out)


def test_a_run_dir_refused_on_a_full_disk_is_not_left_behind(data_dir, small_disk, monkeypatch, capsys):
    set_one_process_world(monkeypatch)
    small_disk.fill()
    run_dir = os.path.join(small_disk.path, "runs", "new")
    assert pretrain.main(cli_args(data_dir, run_dir)) == 2
    assert one_error_line(capsys) == (f"error: --run-dir {run_dir}: cannot write {run_dir}/.lock: "
                                      "No space left on device")
    assert small_disk.files() == []  # neither the folders it made nor an empty lock file


@pytest.mark.parametrize("ds_config", ["cpu_fp32_zero2_torch-adamw", "cpu_fp32_zero0_torch-adamw",
                                       "cpu_fp32_zero3_torch-adamw", "cpu_bf16_zero2_torch-adamw"])
def test_the_checkpoint_size_estimated_at_the_start_is_what_the_engine_saves(data_dir, tmp_path, monkeypatch, ds_config):
    set_one_process_world(monkeypatch)
    trainer = Trainer(config(data_dir, tmp_path, steps=1, eval_shards=0,
                             ds_config=os.path.join(REPO, "ds_configs", f"{ds_config}.json")))
    estimate = checkpoint.estimated_bytes(trainer.engine)
    assert trainer.train() == 0
    saved = checkpoint.saved_bytes(str(tmp_path / "checkpoints"), checkpoint.tag_for(1))
    # The optimizer's moments, ZeRO's fp32 master and the module's own copy: 12-16 bytes a weight.
    assert saved == pytest.approx(estimate, rel=0.02), (saved, estimate)


def test_a_disk_with_room_for_the_checkpoint_but_not_the_export_beside_it_is_warned_of_at_the_start(
        data_dir, small_disk, monkeypatch, caplog):
    set_one_process_world(monkeypatch)
    run_dir = os.path.join(small_disk.path, "run")
    small_disk.fill(leave=7 << 20)  # the first checkpoint (6.2 MiB) fits, not with the export beside it
    settings = config(data_dir, run_dir, steps=1, eval_shards=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.trainer"):
        trainer = Trainer(settings)
    assert len(caplog.messages) == 1 and re.fullmatch(
        rf"{re.escape(run_dir)}/hf has 7 MiB free, and the Hugging Face export at the end of the run takes about "
        r"\d MiB beside a checkpoint of 6 MiB: free space there before then, or the export fails \(the last "
        rf"checkpoint stays: export it with python pipeline/export\.py {re.escape(run_dir)}\)",
        caplog.messages[0]), caplog.messages
    # the estimate is what the export takes
    small_disk.free()
    estimate = estimated_bytes(trainer.parameters, os.path.join(data_dir, "tokenizer"))
    write_train_config(settings)  # as pretrain.py does
    assert trainer.train() == 0
    out = export_checkpoint(run_dir)
    exported = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out))
    assert exported == pytest.approx(estimate, rel=0.03), (exported, estimate)


def test_a_checkpoint_disk_too_full_for_the_next_save_is_warned_of_before_it_fails(
        data_dir, small_disk, monkeypatch, caplog):
    set_one_process_world(monkeypatch)
    run_dir = os.path.join(small_disk.path, "run")
    checkpoints = os.path.join(run_dir, "checkpoints")
    with caplog.at_level(logging.WARNING, logger="pipeline.trainer"):
        small_disk.fill(leave=1 << 20)
        Trainer(config(data_dir, run_dir, steps=2, checkpoint_every=1)).loader.close()
        assert caplog.messages == [
            f"{checkpoints} has 1 MiB free, and the first checkpoint takes about 6 MiB: free space there before it is "
            "saved, or the save fails and a resume goes back to the checkpoint before"]
        caplog.clear()
        small_disk.free()
        small_disk.fill(leave=10 << 20)  # room for one checkpoint (6.2 MiB) only
        trainer = Trainer(config(data_dir, run_dir, steps=2, checkpoint_every=1))
        assert caplog.messages == []
        with pytest.raises(CheckpointWriteError, match="no space left on device"):
            trainer.train()
    assert checkpoint.complete_tags(checkpoints) == [checkpoint.tag_for(1)]
    # 10 MiB less the first checkpoint and the run's own files
    assert re.match(rf"{re.escape(checkpoints)} has [345] MiB free, and the next checkpoint \(as large as "
                    r"step00000001\) takes about 6 MiB: free space there \(or lower --keep-checkpoints\)",
                    caplog.messages[0]), caplog.messages
