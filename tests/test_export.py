"""The Hugging Face export of a DeepSpeed checkpoint: same weights, ties kept, loadable by
AutoModelForPreTraining, AutoTokenizer and pipeline("fill-mask")."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from pipeline import checkpoint, export
from pipeline.engine import DEFAULT_DS_CONFIG
from pipeline.output_path import current_umask
from pipeline.train_config import TrainConfig
from pipeline.trainer import Trainer

from .conftest import REPO, set_one_process_world
from .fp16_support import needs_fp16


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
    # which save of the tag it came from (a branch may save a tag of the same name again)
    assert info["save_id"] == checkpoint.read_meta(os.path.join(str(run_dir), "checkpoints"), "step00000004")["save_id"]


def test_tokenizer_and_fill_mask_load_from_the_export(exported):
    from transformers import AutoTokenizer, pipeline

    _, out, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The city lies on the river.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    fill = pipeline("fill-mask", model=out)
    predictions = fill(f"The city lies on the {fill.tokenizer.mask_token}.")
    assert len(predictions) == 5 and all("token_str" in p and p["score"] >= 0 for p in predictions)


def test_the_export_says_what_it_is_and_every_user_can_read_it(exported, data_dir):
    """A model card for the Hub (what to load it with, the trained length, the data's files, the
    run ids), the objective and length in training_info.json, and files readable by all:
    transformers 5 writes model.safetensors 0600, which other users of a shared disk could not load."""
    _, out, _ = exported
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    info = json.load(open(os.path.join(out, "training_info.json")))
    assert (info["objective"], info["max_seq_length"], info["language"]) == (
        "mlm-nsp", manifest["max_seq_length"], manifest["language"])
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: fill-mask\n")
    assert f"at most **{manifest['max_seq_length']} tokens**" in card and "AutoModelForPreTraining.from_pretrained" in card
    assert f"the position embeddings past {manifest['max_seq_length']} are untrained" in card  # a run from scratch
    assert "not `BertTokenizer` or `BertTokenizerFast`" in card and "pretraining `run-123`" in card
    assert "preprocessing not tracked" in card and "`None`" not in card  # the data dir's run: --no-mlflow
    assert f"`{os.path.basename(manifest['input']['paths'][0])}`" in card and "Pretraining continued" not in card
    # the rows trained on, not the held-out shard's too
    assert info["train_rows"] < manifest["num_examples"]
    assert f"{info['train_rows']} training examples of the {manifest['num_examples']} made from" in card
    # the licence is the user's to state: asked for, not guessed
    assert "license" not in card.split("---")[1] and "add a `license:` line to the front matter" in card
    assert {stat.S_IMODE(os.stat(os.path.join(out, n)).st_mode) for n in os.listdir(out)} == {0o666 & ~current_umask()}


def test_the_card_names_the_weights_the_checkpoint_began_from_not_the_latest_flags(exported, data_dir, tmp_path):
    first, _, _ = exported
    # phase 2 from the first run, then resumed without --init-from: still continued from it
    train(data_dir, tmp_path / "phase2", steps=2, init_from=str(first))
    train(data_dir, tmp_path / "phase2", steps=3)
    card = open(os.path.join(export.export_checkpoint(str(tmp_path / "phase2")), "README.md")).read()
    assert f"Pretraining continued from `{first}/checkpoints/step00000004`." in card  # the very checkpoint
    # a run of its own, resumed with an --init-from that the resume ignores: not continued from it
    train(data_dir, tmp_path / "own", steps=2)
    train(data_dir, tmp_path / "own", steps=3, init_from=str(first))
    card = open(os.path.join(export.export_checkpoint(str(tmp_path / "own")), "README.md")).read()
    assert "Pretraining continued" not in card


def test_cli_exports_a_given_tag_to_a_given_dir(exported, tmp_path):
    run_dir, _, weights = exported
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "export.py"), str(run_dir),
                           "--tag", "4", "--out", str(out)], capture_output=True, text=True)  # step00000004
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert_same_weights_and_ties(str(out), weights)


def test_a_data_dir_with_another_tokenizer_is_refused(exported, data_dir, tmp_path):
    # before: its tokenizer files went into the export beside weights trained on other ids
    run_dir, _, _ = exported
    other = tmp_path / "data"
    shutil.copytree(data_dir, other, ignore=shutil.ignore_patterns("flat"))
    manifest = json.load(open(other / "manifest.json"))
    manifest["tokenizer"]["fingerprint"] = "0" * 64  # as a data dir preprocessed again would differ
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(export.ExportError, match=r"step00000004 was trained with tokenizer \w{12}… but .*data has "
                                                 r"000000000000… \(manifest field tokenizer.fingerprint\)"):
        export.export_checkpoint(str(run_dir), out_dir=str(tmp_path / "out"), data_dir=str(other))
    assert not (tmp_path / "out").exists()


def test_an_out_over_what_the_export_is_made_from_is_refused_even_with_overwrite(exported, data_dir, tmp_path):
    run_dir, _, _ = exported
    before = sorted(os.listdir(run_dir))
    # before: --out RUN_DIR --overwrite replaced the run (checkpoints, metrics) with its export
    for out, message in ((run_dir, f"is the run dir the export is made from \\({run_dir}\\)"),
                         (run_dir.parent, "holds the run dir"), (data_dir, "is the data dir"),
                         (run_dir / "checkpoints" / "step00000004", "lies in the checkpoint dir"),
                         (os.path.join(data_dir, "tokenizer"), "lies in the data dir"),
                         (run_dir / "train_config.json", "lies in the run dir")):
        with pytest.raises(export.ExportError, match=rf"--out {out}: {message}"):
            export.export_checkpoint(str(run_dir), out_dir=str(out), overwrite=True)
    assert sorted(os.listdir(run_dir)) == before


def test_a_checkpoint_file_damaged_in_place_is_one_line_naming_the_tag(exported, tmp_path):
    run_dir, _, _ = exported
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("hf"))
    [optim] = (copy / "checkpoints" / "step00000004").glob("*optim_states.pt")
    with open(optim, "r+b") as f:  # the size the marker checks is kept
        f.write(b"\0" * 64)
    # before: torch's "mmap can only be used with files saved with torch.save" traceback
    with pytest.raises(export.ExportError, match=r"step00000004: a checkpoint file cannot be read \(.*\); the tag "
                                                 r"is damaged: use an earlier one \(complete tags: step00000004\)"):
        export.export_checkpoint(str(copy), out_dir=str(tmp_path / "out"))


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


def test_a_damaged_train_config_or_a_file_as_run_dir_is_one_line(tmp_path):
    """Before: "Expecting value: line 1 column 1" without the file, a TypeError, a KeyError."""
    for text in ("", "[1, 2]", "{}"):
        (tmp_path / "train_config.json").write_text(text)
        with pytest.raises(export.ExportError, match=r"train_config\.json: not (readable as JSON|the JSON object "
                                                     r"pretrain\.py writes)"):
            export.read_train_config(str(tmp_path))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(export.ExportError, match="a_file is a file, not a folder"):
        export.resolve(str(tmp_path / "a_file"))
    # an --out under a file: refused before the weights load (before: after them, a traceback)
    with pytest.raises(export.ExportError, match=r"--out .*a_file/hf: .*a_file is a file, not a folder"):
        export.check_out_dir(str(tmp_path / "a_file" / "hf"), overwrite=False)


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


@pytest.mark.parametrize("kind", ["FP16_UnfusedOptimizer", "FP16_Optimizer"])
def test_fp16_without_zero_exports_the_fp32_master_weights_not_their_fp16_copies(kind, tmp_path):
    """fp16 ZeRO 0 (the LAMB configs) saves fp16 module weights and keeps the fp32 masters in the
    optimizer's state, per parameter (LAMB's FP16_UnfusedOptimizer) or flat (FP16_Optimizer).
    An engine builds FP16_Optimizer only around the CUDA-only FusedAdam, so both wrappers and their
    saved state are built here directly, as an engine builds them around the trainer's parameter
    groups (the real engine's: test_a_16_bit_run_without_zero_exports_...)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from pipeline.engine import init_distributed
    from pipeline.model import build_model, model_config
    from pipeline.param_groups import weight_decay_groups

    init_distributed()
    manifest = {"tokenizer": {"vocab_size": 1000, "special_ids": {"pad": 0}}, "max_seq_length": 64}
    torch.manual_seed(0)
    trained = build_model(model_config("tiny", manifest)).half()
    wrapper = {"FP16_UnfusedOptimizer": FP16_UnfusedOptimizer, "FP16_Optimizer": FP16_Optimizer}[kind]
    optimizer = wrapper(torch.optim.SGD(weight_decay_groups(trained, 0.01), lr=0.1), dynamic_loss_scale=True)
    # masters that an fp16 copy cannot hold exactly, as after training
    with torch.no_grad():
        for group in optimizer.fp32_groups if kind == "FP16_UnfusedOptimizer" else [optimizer.fp32_groups_flat]:
            for master in group:
                master.add_(torch.rand_like(master) * 1e-4)
    # where and how a ZeRO 0 engine saves them (engine.save_checkpoint's "module" and "optimizer")
    (tmp_path / "step00000001").mkdir()
    torch.save({"module": trained.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "step00000001" / "mp_rank_00_model_states.pt")

    fresh = build_model(model_config("tiny", manifest))  # what the export builds from the run's config
    masters = export.fp32_state_dict(str(tmp_path), "step00000001", fresh)
    by_name = dict(trained.named_parameters())
    params = [p for group in weight_decay_groups(trained, 0.0) for p in group["params"]]
    flat = (torch.cat([m.flatten() for g in optimizer.fp32_groups for m in g]) if kind == "FP16_UnfusedOptimizer"
            else torch.cat(list(optimizer.fp32_groups_flat)))
    offset, name_of = 0, {id(p): n for n, p in by_name.items()}
    for p in params:
        want = flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
        assert torch.equal(masters[name_of[id(p)]], want), name_of[id(p)]
        assert not torch.equal(want.half().float(), want), name_of[id(p)]  # not an fp16 value
    # the tied decoder gets the word embeddings' master too
    assert torch.equal(masters["cls.predictions.decoder.weight"], masters["bert.embeddings.word_embeddings.weight"])
    assert set(masters) == set(fresh.state_dict()) - {k for k, v in fresh.state_dict().items()
                                                       if not v.is_floating_point()}


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=needs_fp16)])
def test_a_16_bit_run_without_zero_exports_its_fp32_masters_and_a_mismatch_is_one_line(data_dir, tmp_path,
                                                                                       precision):
    """A real engine on the CPU: bf16 or fp16 without ZeRO is DeepSpeed's FP16_UnfusedOptimizer around
    torch's AdamW (the fp16 LAMB configs' wrapper), the module's weights 16-bit copies of masters the
    optimizer keeps."""
    from transformers import AutoModelForPreTraining

    from pipeline.engine import zero0_masters

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ds_config = tmp_path / f"{precision}_zero0.json"
    ds_config.write_text(json.dumps({precision: {"enabled": True}, "zero_optimization": {"stage": 0},
                                     "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    trainer = train(data_dir, tmp_path / "run", ds_config=str(ds_config))
    masters = zero0_masters(trainer.engine.optimizer)
    module = trainer.engine.module
    assert masters and next(module.parameters()).dtype == dtype
    loaded = AutoModelForPreTraining.from_pretrained(export.export_checkpoint(str(tmp_path / "run"))).state_dict()
    for name, param in module.named_parameters():
        assert torch.equal(loaded[name], masters[id(param)].float()), name
        assert torch.equal(loaded[name].to(dtype), param.detach()), name

    # phase 2 with another model on that checkpoint: one line naming both, before any training
    with pytest.raises(export.ExportError, match=r"step00000004 does not fit --model mini .* master weights"):
        Trainer(TrainConfig.from_flat(data=data_dir, run_dir=str(tmp_path / "phase2"), model="mini", steps=2,
                                      global_batch_size=8, micro_batch_size=8, mlflow=False,
                                      init_from=str(tmp_path / "run"), ds_config=str(ds_config)))


def test_a_preset_name_that_is_also_a_file_here_is_recorded_as_the_preset(data_dir, tmp_path, monkeypatch):
    """The trainer builds the preset when --model names one (model_config: presets win); the record
    read the file of that name in the working directory instead (notes, not a model config)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("my notes on the tiny runs\n")
    config = TrainConfig.from_flat(data=data_dir, run_dir=str(tmp_path / "run"), model="tiny", mlflow=False)
    saved = json.load(open(export.write_train_config(config)))
    assert saved["model"] == "tiny" and "model_config" not in saved
