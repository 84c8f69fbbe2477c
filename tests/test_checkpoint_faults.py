"""Faults and bad input around checkpoints and training data: a damaged COMPLETE marker, a full
disk during a save, an export over someone's directory, a pickle payload in a checkpoint,
manifest paths that leave the data dir, corrupt shards."""

import errno
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import checkpoint, export, pretrain
from pipeline import trainer as trainer_module
from pipeline.data_dir import DataDirError, read_manifest
from pipeline.train_config import TrainConfig
from pipeline.trainer import Trainer

from . import faults
from .conftest import REPO, set_one_process_world

STEP2, STEP4 = checkpoint.tag_for(2), checkpoint.tag_for(4)


@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


def config(data_dir, run_dir, **overrides):
    values = dict(data=data_dir, run_dir=str(run_dir), steps=4, global_batch_size=8, micro_batch_size=8,
                  learning_rate=2e-3, warmup_steps=1, log_every=100, checkpoint_every=2, mlflow=False)
    return TrainConfig.from_flat(**{**values, **overrides})


def cli_args(data_dir, run_dir):
    return ["--data", data_dir, "--run-dir", str(run_dir), "--steps", "4", "--global-batch-size", "8",
            "--micro-batch-size", "8", "--checkpoint-every", "2", "--log-every", "100", "--no-mlflow"]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4; tests damage copies of it."""
    mp = pytest.MonkeyPatch()
    set_one_process_world(mp)
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    settings = config(data_dir, run_dir)
    trainer = Trainer(settings)
    export.write_train_config(settings)
    assert trainer.train() == 0
    mp.undo()
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir, str(run_dir / "checkpoints")


def test_the_marker_lists_the_files_it_vouches_for(run_copy):
    run_dir, directory = run_copy
    meta = checkpoint.read_meta(directory, STEP4)
    folder = os.path.join(directory, STEP4)
    on_disk = {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names if name != checkpoint.COMPLETE}
    assert meta["files"] == on_disk and any(name.endswith("_optim_states.pt") for name in on_disk)
    assert meta["step"] == 4 and meta["world_size"] == 1
    assert not [n for n in os.listdir(directory) + os.listdir(folder) if n.endswith(".tmp")]
    # A marker of an older version, without the file list, is still trusted.
    del meta["files"]
    (run_dir / "checkpoints" / STEP4 / checkpoint.COMPLETE).write_text(json.dumps(meta))
    assert checkpoint.find_latest(directory) == STEP4


def _damage(folder, how):
    marker = os.path.join(folder, checkpoint.COMPLETE)
    listed = json.load(open(marker))["files"]
    biggest = max(listed, key=listed.get)
    if how == "empty marker":
        open(marker, "w").close()
    elif how == "marker cut short":
        text = open(marker).read()
        open(marker, "w").write(text[:len(text) // 2])
    elif how == "file missing":
        os.remove(os.path.join(folder, biggest))
    elif how == "file shorter":
        os.truncate(os.path.join(folder, biggest), listed[biggest] - 1)
    return biggest


@pytest.mark.parametrize("how, reason", [
    ("empty marker", "marker is unreadable"),
    ("marker cut short", "marker is unreadable"),
    ("file missing", "is listed in its COMPLETE marker but missing"),
    ("file shorter", "bytes, its COMPLETE marker records"),
])
def test_a_damaged_tag_is_skipped_with_a_warning(run_copy, caplog, how, reason):
    run_dir, directory = run_copy
    _damage(os.path.join(directory, STEP4), how)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert checkpoint.find_latest(directory) == STEP2  # although `latest` points at step 4
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert os.path.join(directory, STEP4) in warning and reason in warning
    assert export.resolve(str(run_dir)) == (str(run_dir), directory, STEP2)
    for explicit in ({"path": str(run_dir), "tag": STEP4}, {"path": os.path.join(directory, STEP4)}):
        with pytest.raises(export.ExportError, match=reason) as err:
            export.resolve(**explicit)
        assert os.path.join(directory, STEP4) in str(err.value)


def test_a_run_resumes_from_the_newest_good_tag(data_dir, run_copy):
    run_dir, directory = run_copy
    _damage(os.path.join(directory, STEP4), "empty marker")
    trainer = Trainer(config(data_dir, run_dir, steps=6))
    assert trainer.step == 2
    with pytest.raises(checkpoint.CheckpointError, match=f"{STEP4}: its COMPLETE marker is unreadable"):
        Trainer(config(data_dir, run_dir, resume=STEP4))


def test_a_full_disk_during_a_save_stops_with_one_line_and_the_previous_tag_resumes(
        data_dir, tmp_path, monkeypatch, capsys):
    faults.inject(monkeypatch, "enospc-during-save:4")
    assert pretrain.main(cli_args(data_dir, tmp_path)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    directory = str(tmp_path / "checkpoints")
    assert len(errors) == 1 and "no space left on device" in errors[0], errors
    assert f"cannot save checkpoint {os.path.join(directory, STEP4)}" in errors[0]
    assert f"a resume starts from {os.path.join(directory, STEP2)}" in errors[0]
    assert os.path.isdir(os.path.join(directory, STEP4))  # the partial save, left without a marker
    assert not os.path.exists(os.path.join(directory, STEP4, checkpoint.COMPLETE))
    assert checkpoint.find_latest(directory) == STEP2

    monkeypatch.delenv("BERT_PIPELINE_FAULT")
    trainer = Trainer(config(data_dir, tmp_path))
    assert trainer.step == 2
    assert trainer.train() == 0
    assert checkpoint.find_latest(directory) == STEP4 and checkpoint.read_meta(directory, STEP4)["step"] == 4


def test_a_disk_that_fills_outside_a_save_stops_with_one_line_and_nothing_half_written(
        data_dir, small_disk, monkeypatch, capsys):
    """A real full disk (a tmpfs filled up) under the run's history, then under its export: each a
    line that names the file and what to do, no traceback; no export folder cut short; a fresh
    start does not append to a history that an earlier, failed start left."""
    run_dir = os.path.join(small_disk.path, "run")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:  # a failed start's, torn at the end
        f.write('{"step": 7, "loss": 9.0}\n{"step": 8, "lo')
    fill_once(monkeypatch, trainer_module, "append_history", small_disk)
    args = [*cli_args(data_dir, run_dir), "--log-every", "1"]
    assert pretrain.main(args) == 1
    error = one_error_line(capsys)
    history = os.path.join(run_dir, "metrics.jsonl")
    assert error.startswith(f"error: rank 0: cannot write the run's history {history}: no space left on device; "
                            "free space there, then rerun: it resumes from the newest complete checkpoint"), error

    small_disk.free()
    monkeypatch.undo()
    set_one_process_world(monkeypatch)
    fill_once(monkeypatch, pretrain, "export_checkpoint", small_disk)
    assert pretrain.main(args) == 1
    error = one_error_line(capsys)
    tag_dir = os.path.join(run_dir, "checkpoints", STEP4)
    assert error.startswith(f"error: rank 0: cannot write the Hugging Face export {os.path.join(run_dir, 'hf', STEP4)}"
                            ": no space left on device"), error
    assert error.endswith(f"free space there, then export it again: python pipeline/export.py {tag_dir}"), error
    assert checkpoint.find_latest(os.path.join(run_dir, "checkpoints")) == STEP4
    assert os.listdir(os.path.join(run_dir, "hf")) == []  # not even the hidden temporary folder
    # Only this run's steps: the failed start's lines (and its torn one) went at the fresh start.
    assert [json.loads(line)["step"] for line in open(history)] == [1, 2, 3, 4]

    small_disk.free()
    assert export.main([tag_dir]) == 0
    assert os.path.isfile(os.path.join(run_dir, "hf", STEP4, "model.safetensors"))


def fill_once(monkeypatch, owner, name: str, disk) -> None:
    """``owner.name`` fills the disk up just before its first call does its work."""
    real, calls = getattr(owner, name), []

    def filled_first(*args, **kwargs):
        if not calls:
            calls.append(1)
            disk.fill()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, filled_first)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def test_a_failed_save_over_a_complete_tag_leaves_it_unmarked(data_dir, run_copy, monkeypatch):
    # Resumed from step 2, the run saves step 4 again: the old marker must not vouch for what the
    # failed save left in the tag.
    run_dir, directory = run_copy
    faults.inject(monkeypatch, "enospc-during-save:4")
    trainer = Trainer(config(data_dir, run_dir, resume=STEP2))
    assert trainer.step == 2
    with pytest.raises(checkpoint.CheckpointWriteError, match="no space left on device"):
        trainer.train()
    assert not os.path.exists(os.path.join(directory, STEP4, checkpoint.COMPLETE))
    assert checkpoint.find_latest(directory) == STEP2


def test_export_refuses_a_directory_it_did_not_make(run_copy, tmp_path, capsys):
    run_dir, _ = run_copy
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    sibling = tmp_path / "mine.partial"  # the name the export used for its temporary dir
    sibling.mkdir()
    (sibling / "keep.txt").write_text("someone's")

    assert export.main([str(run_dir), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"--out {mine} is a non-empty directory" in err and "--overwrite" in err
    assert (mine / "notes.txt").exists()

    assert export.main([str(run_dir), "--out", str(mine), "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "model.safetensors").exists()
    assert (sibling / "keep.txt").exists() and sorted(os.listdir(tmp_path)) == ["mine", "mine.partial", "run"]
    # Its own export, and the default RUN_DIR/hf/<tag>, are replaced without --overwrite.
    assert export.main([str(run_dir), "--out", str(mine)]) == 0
    assert export.export_checkpoint(str(run_dir)) == export.export_checkpoint(str(run_dir))


def test_a_full_disk_during_an_export_names_the_command_that_exports_it_again(
        data_dir, run_copy, tmp_path, monkeypatch, capsys):
    # The data dir given by --data and an --out that needed --overwrite: the printed command must
    # carry both, or it fails where the first one did not.
    run_dir, _ = run_copy
    moved = tmp_path / "data moved"
    shutil.copytree(data_dir, moved)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    real = export._write_export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_write_export", full)
    assert export.main([str(run_dir), "--out", str(mine), "--data", str(moved), "--overwrite"]) == 1
    again = capsys.readouterr().err.strip().split("export it again: ")[1]
    assert again.startswith("python pipeline/export.py ") and "'" in again  # the space is quoted

    monkeypatch.setattr(export, "_write_export", real)
    args = shlex.split(again)[2:]
    assert args[args.index("--data") + 1] == str(moved) and "--overwrite" in args
    assert export.main(args) == 0
    assert (mine / "model.safetensors").exists() and not (mine / "notes.txt").exists()


class _Payload:
    """What a hostile checkpoint carries: unpickling it runs code (here: it writes a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.path))


def test_a_pickle_payload_in_model_states_is_refused(tmp_path):
    import torch

    folder = tmp_path / "checkpoints" / "step00000001"
    folder.mkdir(parents=True)
    (folder / checkpoint.COMPLETE).write_text(json.dumps({"step": 1}))
    ran = tmp_path / "payload-ran"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(str(ran))},
               folder / "mp_rank_00_model_states.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(export.ExportError, match="mp_rank_00_model_states.pt"):
        export.fp32_state_dict(str(tmp_path / "checkpoints"), "step00000001")
    assert not ran.exists()


def _data_copy(data_dir, target):
    shutil.copytree(data_dir, target, ignore=shutil.ignore_patterns("flat", ".flat*"))
    return str(target), json.load(open(os.path.join(data_dir, "manifest.json")))


@pytest.mark.parametrize("field", ["shards[0].path absolute", "shards[1].path ..", "tokenizer.path .."])
def test_manifest_paths_stay_inside_the_data_dir(data_dir, tmp_path, field):
    # The paths point at real files outside: without the check they would be read.
    data, manifest = _data_copy(data_dir, tmp_path / "data")
    if field.startswith("shards[0]"):
        manifest["shards"][0]["path"] = os.path.join(data_dir, manifest["shards"][0]["path"])
    elif field.startswith("shards[1]"):
        manifest["shards"][1]["path"] = os.path.relpath(os.path.join(data_dir, manifest["shards"][1]["path"]), data)
    else:
        manifest["tokenizer"]["path"] = os.path.relpath(os.path.join(data_dir, "tokenizer"), data)
    json.dump(manifest, open(os.path.join(data, "manifest.json"), "w"))
    name = field.split()[0]
    with pytest.raises(DataDirError, match=rf"manifest.json: field {re.escape(name)} .* must be a path inside "
                                           "the data dir") as err:
        read_manifest(data)
    assert str(err.value).startswith(os.path.join(data, "manifest.json"))


@pytest.mark.parametrize("damage, messages", [
    ("truncated", ["pyarrow cannot read this shard", "truncated or corrupt"]),
    ("int64 input_ids", ["column 'input_ids' has type list<", "int64>, expected list<int32>"]),
])
def test_a_corrupt_shard_stops_pretrain_with_one_line(data_dir, tmp_path, damage, messages):
    data, manifest = _data_copy(data_dir, tmp_path / "data")
    shard = os.path.join(data, manifest["shards"][1]["path"])
    if damage == "truncated":
        os.truncate(shard, os.path.getsize(shard) // 2)
    else:
        table = pq.read_table(shard)
        column = table.schema.get_field_index("input_ids")
        table = table.set_column(column, "input_ids", table.column("input_ids").cast(pa.list_(pa.int64())))
        pq.write_table(table, shard)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "pretrain.py"),
                           *cli_args(data, tmp_path / "run")], env=env, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {shard}: ") and all(m in errors[0] for m in messages), errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
