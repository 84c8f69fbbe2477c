"""The Hugging Face export of a DeepSpeed checkpoint: same weights, ties kept, loadable by
AutoModelForPreTraining, AutoTokenizer and pipeline("fill-mask")."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline import export
from pipeline.engine import DEFAULT_DS_CONFIG
from pipeline.train_config import TrainConfig
from pipeline.trainer import Trainer

from .conftest import REPO, set_one_process_world


@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


def train(data_dir, run_dir, **overrides):
    values = dict(data=data_dir, run_dir=str(run_dir), steps=4, global_batch_size=8, micro_batch_size=8,
                  learning_rate=2e-3, warmup_steps=1, log_every=100, mlflow=False)
    config = TrainConfig.from_flat(**{**values, **overrides})
    trainer = Trainer(config)
    export.write_train_config(config, "run-123")  # what pretrain.py main writes on rank 0
    assert trainer.train() == 0
    return trainer


def engine_weights(trainer):
    return {k: v.detach().float().clone() for k, v in trainer.engine.module.state_dict().items()}


def assert_same_weights_and_ties(out, weights):
    from transformers import AutoModelForPreTraining

    model = AutoModelForPreTraining.from_pretrained(out)
    loaded = model.state_dict()
    assert set(loaded) == set(weights)
    for name, value in weights.items():
        assert torch.equal(loaded[name], value), name
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    return model


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory):
    """A ZeRO-2 run of 4 steps, exported to its default place."""
    mp = pytest.MonkeyPatch()
    set_one_process_world(mp)
    run_dir = tmp_path_factory.mktemp("run")
    trainer = train(data_dir, run_dir)
    weights = engine_weights(trainer)
    out = export.export_checkpoint(str(run_dir))
    mp.undo()
    return run_dir, out, weights


def test_export_has_the_engine_weights_with_ties(exported):
    run_dir, out, weights = exported
    assert out == os.path.join(str(run_dir), "hf", "step00000004")
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert_same_weights_and_ties(out, weights)
    info = json.load(open(os.path.join(out, "training_info.json")))
    assert info["tag"] == "step00000004" and info["step"] == 4
    assert info["pretrain_run_id"] == "run-123" and "data_run_id" in info


def test_tokenizer_and_fill_mask_load_from_the_export(exported):
    from transformers import AutoTokenizer, pipeline

    _, out, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The city lies on the river.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    fill = pipeline("fill-mask", model=out)
    predictions = fill(f"The city lies on the {fill.tokenizer.mask_token}.")
    assert len(predictions) == 5 and all("token_str" in p and p["score"] >= 0 for p in predictions)


def test_cli_exports_a_given_tag_to_a_given_dir(exported, tmp_path):
    run_dir, _, weights = exported
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "export.py"), str(run_dir),
                           "--tag", "step00000004", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert_same_weights_and_ties(str(out), weights)


def test_cli_help():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "export.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--tag" in proc.stdout and "--out" in proc.stdout


def test_train_config_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    # pretraining started as `pretrain.py --data data --model model.json` in tmp_path ...
    (tmp_path / "model.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    export.write_train_config(TrainConfig(data="data", run_dir="run", model="model.json"))
    export.write_train_config(TrainConfig(data="data", run_dir="preset", model="tiny"))
    # ... is exported later from somewhere else
    monkeypatch.chdir(REPO)
    saved = export.read_train_config(str(tmp_path / "run"))
    assert saved["data"] == str(tmp_path / "data") and saved["model"] == str(tmp_path / "model.json")
    assert export.read_train_config(str(tmp_path / "preset"))["model"] == "tiny"


def test_a_run_without_a_complete_checkpoint_is_refused(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step00000003").mkdir(parents=True)  # a save that never finished
    with pytest.raises(export.ExportError, match="no complete checkpoint") as err:
        export.export_checkpoint(str(tmp_path))
    assert str(checkpoints) in str(err.value)
    with pytest.raises(export.ExportError, match="not a complete checkpoint"):
        export.export_checkpoint(str(tmp_path), tag="step00000003")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "export.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
    assert str(checkpoints) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("stage", [0, 1])
def test_other_zero_stages_export_the_same_weights(data_dir, tmp_path, stage):
    ds = json.load(open(DEFAULT_DS_CONFIG))
    ds["zero_optimization"] = {"stage": stage}
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(ds))
    trainer = train(data_dir, tmp_path / "run", steps=2, ds_config=str(path))
    tag_dir = tmp_path / "run" / "checkpoints" / "step00000002"
    # ZeRO 0 keeps the optimizer in the model states (export's fallback); ZeRO 1 partitions it.
    assert bool(list(tag_dir.glob("*_optim_states.pt"))) == (stage > 0)
    out = export.export_checkpoint(str(tag_dir), out_dir=str(tmp_path / "hf"))
    assert_same_weights_and_ties(out, engine_weights(trainer))
