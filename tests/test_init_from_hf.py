"""--init-from a Hugging Face BERT directory (continued pretraining): the saved weights are the
trainer's exactly, heads the directory lacks start fresh with a warning, a directory that does not fit
the data or --model is refused in one line naming the field, and our own export continues its run."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline import export, hf_init
from pipeline.model import PRESETS
from pipeline.train_config import TrainConfig
from pipeline.trainer import Trainer

from .conftest import REPO, set_one_process_world


@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    set_one_process_world(monkeypatch)


def config(data_dir, run_dir, **overrides):
    # model=None: the command line's default, i.e. the --init-from directory's architecture
    values = dict(data=data_dir, run_dir=str(run_dir), model=None, steps=1, global_batch_size=8,
                  micro_batch_size=8, learning_rate=1e-4, warmup_steps=0, log_every=1, eval_shards=0,
                  mlflow=False)
    return TrainConfig.from_flat(**{**values, **overrides})


@pytest.fixture(scope="module")
def manifest(data_dir):
    with open(os.path.join(data_dir, "manifest.json")) as f:
        return json.load(f)


def bert_config(manifest, **overrides):
    from transformers import BertConfig

    tokenizer = manifest["tokenizer"]
    # Dropout off: the trainer's first loss (train mode) is then the saved model's in eval mode.
    return BertConfig(**{**dict(vocab_size=tokenizer["vocab_size"], pad_token_id=tokenizer["special_ids"]["pad"],
                                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), **overrides})


def copy_tokenizer(data_dir, folder):
    source = os.path.join(data_dir, "tokenizer")
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), folder)


def save(model, folder, data_dir=None, **kwargs):
    torch.manual_seed(0)
    model.save_pretrained(folder, **kwargs)
    if data_dir:
        copy_tokenizer(data_dir, folder)
    return str(folder)


@pytest.fixture(scope="module")
def pretraining_dir(data_dir, manifest, tmp_path_factory):
    """A tiny BertForPreTraining, safetensors, with the data's tokenizer files."""
    from transformers import BertForPreTraining

    torch.manual_seed(1)
    return save(BertForPreTraining(bert_config(manifest)), tmp_path_factory.mktemp("hf") / "pretraining", data_dir)


def saved_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def first_batch_loss(trainer, folder):
    """MLM + NSP loss of ``folder``'s model (Hugging Face's own class, eval mode) on the trainer's
    first micro-batch, with every vocabulary logit computed (the trainer's head computes the masked ones)."""
    from transformers import BertForPreTraining

    batch = trainer.dataset.batch(trainer.sampler.rows_of(0, 0))
    model = BertForPreTraining.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
    mlm = F.cross_entropy(out.prediction_logits.flatten(0, 1)[batch["mlm_positions"]], batch["mlm_labels"])
    return float(mlm + F.cross_entropy(out.seq_relationship_logits, batch["next_sentence_label"]))


def train_losses(trainer):
    losses = []
    assert trainer.train(on_step=lambda t, metrics: losses.append(metrics.loss)) == 0
    return losses


def test_weights_load_exactly_and_the_first_loss_is_the_saved_models(data_dir, pretraining_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, init_from=pretraining_dir))
    assert trainer.config.model == os.path.join(pretraining_dir, "config.json")  # its architecture
    assert (trainer.model_config.hidden_size, trainer.model_config.num_hidden_layers) == (32, 2)
    state = trainer.engine.module.state_dict()
    saved = saved_weights(pretraining_dir)
    assert {k for k in state if not k.startswith("cls.predictions.decoder.")} == set(saved)
    for name, value in saved.items():
        assert torch.equal(state[name], value), name
    assert torch.equal(state["cls.predictions.decoder.weight"], saved["bert.embeddings.word_embeddings.weight"])
    assert trainer.init_info == {"init_from": pretraining_dir, "init_from_run_id": None}
    expected = first_batch_loss(trainer, pretraining_dir)
    assert train_losses(trainer)[0] == pytest.approx(expected, rel=1e-5)
    # resumed without --init-from: --model's default is the preset, not this architecture; the error
    # says what is (before: only that --model differed, though none was given)
    from pipeline.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"a resume keeps it \(the run began from --init-from "
                                              rf"{pretraining_dir}: pass it again"):
        Trainer(config(data_dir, tmp_path, steps=2))
    resumed = Trainer(config(data_dir, tmp_path, steps=2, init_from=pretraining_dir))
    assert resumed.step == 1 and len(train_losses(resumed)) == 1


def test_masked_lm_bin_with_old_layer_norm_names_loads_and_warns(data_dir, manifest, tmp_path, caplog):
    from transformers import BertForMaskedLM

    torch.manual_seed(2)
    model = BertForMaskedLM(bert_config(manifest))
    folder = str(tmp_path / "mlm")
    model.config.save_pretrained(folder)
    copy_tokenizer(data_dir, folder)
    state = model.state_dict()  # with the tied decoder weight and bias, as the published .bin files have them
    # The names of the original Google releases: LayerNorm gamma/beta, and the position_ids buffer.
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    old["bert.embeddings.position_ids"] = torch.arange(512)[None]
    assert "bert.encoder.layer.0.output.LayerNorm.gamma" in old
    torch.save(old, os.path.join(folder, "pytorch_model.bin"))

    with caplog.at_level(logging.WARNING, logger="pipeline.hf_init"):
        trainer = Trainer(config(data_dir, tmp_path / "run", init_from=folder))
    loaded = trainer.engine.module.state_dict()
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "no weights for the pooler (bert.pooler.*), the NSP head (cls.seq_relationship.*)" in warning
    assert "MLM head" not in warning


def test_base_model_dir_without_tokenizer_warns_about_fresh_heads_and_unchecked_ids(data_dir, manifest, tmp_path,
                                                                                     caplog):
    from transformers import BertModel

    torch.manual_seed(3)
    folder = save(BertModel(bert_config(manifest)), tmp_path / "base")
    with caplog.at_level(logging.WARNING, logger="pipeline.hf_init"):
        trainer = Trainer(config(data_dir, tmp_path / "run", init_from=folder))
    loaded = trainer.engine.module.state_dict()
    for name, value in saved_weights(folder).items():
        assert torch.equal(loaded[f"bert.{name}"], value), name
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "no weights for the MLM head (cls.predictions.*), the NSP head (cls.seq_relationship.*)" in warning
    assert "no tokenizer files" in warning and "could not be checked" in warning and "beyond vocab_size" in warning


def data_vocab(data_dir):
    ids, _, whole = hf_init.token_ids(os.path.join(data_dir, "tokenizer"))
    assert whole
    return [token for token, _ in sorted(ids.items(), key=lambda kv: kv[1])]


def mismatched_dir(kind, data_dir, manifest, pretraining_dir, folder):
    """A copy of ``pretraining_dir`` that disagrees with the data in one way."""
    shutil.copytree(pretraining_dir, folder)
    if kind in ("vocab_size", "pad_token_id"):
        values = json.load(open(os.path.join(folder, "config.json")))
        values[kind] += 1
        json.dump(values, open(os.path.join(folder, "config.json"), "w"))
        return "config.json " + kind, None
    tokens = data_vocab(data_dir)
    mask = manifest["tokenizer"]["special_ids"]["mask"]
    i, j = (mask, len(tokens) - 1) if kind == "special" else (len(tokens) - 2, len(tokens) - 1)
    tokens[i], tokens[j] = tokens[j], tokens[i]
    os.remove(os.path.join(folder, "tokenizer.json"))  # vocab.txt speaks for it, as in a BERT download
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in tokens)
    if kind == "special":
        return f"\\[MASK\\] is id {len(tokens) - 1} in .*vocab.txt but {mask} .*tokenizer.special_ids.mask", None
    return f"token {tokens[i]!r} is id {i} there but {j} in the data", tokens[i]


@pytest.mark.parametrize("kind", ["vocab_size", "pad_token_id", "special", "vocabulary"])
def test_a_directory_that_does_not_fit_the_data_is_refused_naming_the_field(kind, data_dir, manifest,
                                                                             pretraining_dir, tmp_path):
    folder = str(tmp_path / "hf")
    message, _ = mismatched_dir(kind, data_dir, manifest, pretraining_dir, folder)
    with pytest.raises(hf_init.HfInitError, match=f"--init-from {folder}: .*{message}") as err:
        Trainer(config(data_dir, tmp_path / "run", init_from=folder))
    assert "\n" not in str(err.value) and "run_beam.py --tokenizer" in str(err.value)


def test_weights_with_no_place_in_the_model_are_named(data_dir, pretraining_dir, tmp_path):
    from safetensors.torch import save_file

    folder = str(tmp_path / "classifier")
    shutil.copytree(pretraining_dir, folder)
    weights = saved_weights(folder)
    save_file({**weights, "classifier.weight": torch.zeros(2, 32), "classifier.bias": torch.zeros(2)},
              os.path.join(folder, "model.safetensors"))
    with pytest.raises(hf_init.HfInitError, match=f"--init-from {folder}: weights BertForPreTraining has no place "
                                                  "for: classifier.bias, classifier.weight"):
        Trainer(config(data_dir, tmp_path / "run", init_from=folder))


def test_an_explicit_model_of_another_architecture_is_a_one_line_error(data_dir, pretraining_dir, tmp_path):
    with pytest.raises(hf_init.HfInitError, match=r"--model tiny conflicts with --init-from .*: hidden_size is "
                                                  r"64 in --model but 32 in its config.json"):
        Trainer(config(data_dir, tmp_path / "run", model="tiny", init_from=pretraining_dir))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "pretrain.py"), "--data", data_dir,
                           "--run-dir", str(tmp_path / "cli"), "--init-from", pretraining_dir, "--model", "base",
                           "--no-mlflow"], cwd=REPO, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "--model base conflicts with --init-from" in errors[0] and "hidden_size is 768" in errors[0]
    assert "Traceback" not in proc.stderr


def test_an_init_from_that_is_missing_or_holds_no_checkpoint_is_named_as_the_flag(data_dir, tmp_path):
    # before: the default preset taken in silence (a resume then blamed --model), and export's
    # advice "pass the --run-dir of pipeline/pretrain.py", read as this run's --run-dir
    from pipeline.export import ExportError
    from pipeline.train_config import TrainConfigError

    missing = str(tmp_path / "moved-away")
    with pytest.raises(TrainConfigError, match=rf"--init-from {missing}: no such file or directory: name a "):
        config(data_dir, tmp_path / "run", init_from=missing)
    unfinished = tmp_path / "phase1"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match=rf"^--init-from {unfinished}: {unfinished}/checkpoints has no complete "
                                          "checkpoint") as err:
        Trainer(config(data_dir, tmp_path / "run", init_from=str(unfinished)))
    assert "--run-dir" not in str(err.value)


def test_our_own_export_continues_its_run_with_lineage(data_dir, tmp_path, monkeypatch):
    from pipeline import pretrain

    # The source run: tiny without dropout, so that losses compare across runs batch for batch.
    model = tmp_path / "tiny-no-dropout.json"
    model.write_text(json.dumps({**PRESETS["tiny"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    source_config = config(data_dir, tmp_path / "source", model=str(model), steps=30, learning_rate=2e-3,
                           warmup_steps=3, log_every=100)
    source = Trainer(source_config)
    export.write_train_config(source_config, "run-123")  # what pretrain.py main writes on rank 0
    trained = train_losses(source)
    out = export.export_checkpoint(str(tmp_path / "source"))
    assert out == str(tmp_path / "source" / "hf" / "step00000030")

    # pretrain.py from the export: same data, seed and batch sizes, so its first batch is the source's.
    # Tracked in a real MLflow store, whose run then shows the lineage and the loss.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert pretrain.main(["--data", data_dir, "--run-dir", str(tmp_path / "continued"), "--init-from", out,
                          "--steps", "1", "--global-batch-size", "8", "--micro-batch-size", "8",
                          "--eval-shards", "0", "--learning-rate", "1e-4", "--experiment", "lineage"]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("lineage").experiment_id])
    first_loss = client.get_metric_history(run.info.run_id, "loss")[0].value
    assert first_loss == pytest.approx(first_batch_loss(source, out), rel=1e-5)  # the exported model's own loss
    # A continuation: far below the source run's first loss, from scratch on this same batch.
    assert first_loss < trained[0] - 1.0
    assert run.data.tags["init_from"] == out and run.data.tags["init_from_run_id"] == "run-123"  # the lineage
    assert run.data.tags["stage"] == "pretrain" and run.info.status == "FINISHED"
    # The continued run's own export rebuilds the directory's architecture from train_config.json.
    saved = export.read_train_config(str(tmp_path / "continued"))
    assert saved["model"] == os.path.join(out, "config.json") and saved["pretrain_run_id"] == run.info.run_id
    info = json.load(open(tmp_path / "continued" / "hf" / "step00000001" / "training_info.json"))
    assert info["pretrain_run_id"] == run.info.run_id
    card = (tmp_path / "continued" / "hf" / "step00000001" / "README.md").read_text()
    assert f"Pretraining continued from `{out}`." in card and f"pretraining `{run.info.run_id}`" in card
    # the positions past this run's length are the published model's, not "untrained"
    assert "may have trained the positions past" in card and "are untrained" not in card
    # The published model's folder deleted or moved after the run: the export still rebuilds the
    # architecture, from the config train_config.json recorded (it read the moved config.json).
    os.rename(out, out + "-moved")
    again = export.export_checkpoint(str(tmp_path / "continued"), out_dir=str(tmp_path / "again"))
    assert open(os.path.join(again, "model.safetensors"), "rb").read() == open(
        tmp_path / "continued" / "hf" / "step00000001" / "model.safetensors", "rb").read()


def test_lineage_names_the_run_that_wrote_each_checkpoint_across_resumes(data_dir, tmp_path, monkeypatch):
    """train_config.json is rewritten at every start: an export named the latest start's run for
    every tag, and a resumed phase 2 lost its init_from tags. Each checkpoint's marker now records
    its run and the weights the phase began from; a resume tags the run it continues."""
    from mlflow.tracking import MlflowClient

    from pipeline import checkpoint, pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    common = ["--data", data_dir, "--global-batch-size", "8", "--micro-batch-size", "8", "--eval-shards", "0",
              "--experiment", "resumes"]
    one, two = str(tmp_path / "phase1"), str(tmp_path / "phase2")
    assert pretrain.main([*common, "--run-dir", one, "--steps", "2", "--run-name", "p1"]) == 0
    assert pretrain.main([*common, "--run-dir", two, "--steps", "2", "--init-from", one, "--run-name", "p2a"]) == 0
    assert pretrain.main([*common, "--run-dir", two, "--steps", "4", "--init-from", one, "--run-name", "p2b"]) == 0
    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("resumes").experiment_id])}
    ids = {name: run.info.run_id for name, run in runs.items()}
    phase1_tag = os.path.join(one, "checkpoints", "step00000002")
    for name in ("p2a", "p2b"):  # the resumed start keeps the phase's origin
        assert runs[name].data.tags["init_from"] == phase1_tag and runs[name].data.tags["init_from_run_id"] == ids["p1"]
    assert runs["p2b"].data.tags["resumed_from_run_id"] == ids["p2a"] and "resumed_from_run_id" not in runs["p2a"].data.tags
    assert runs["p2b"].data.tags["resumed_at_step"] == "2"  # where report.py joins the two runs' curves
    checkpoints = os.path.join(two, "checkpoints")
    assert checkpoint.read_meta(checkpoints, "step00000002")["pretrain_run_id"] == ids["p2a"]
    assert checkpoint.read_meta(checkpoints, "step00000004")["pretrain_run_id"] == ids["p2b"]
    earlier = export.export_checkpoint(two, tag="step00000002", out_dir=str(tmp_path / "hf2"))
    assert json.load(open(os.path.join(earlier, "training_info.json")))["pretrain_run_id"] == ids["p2a"]
    latest = json.load(open(os.path.join(two, "hf", "step00000004", "training_info.json")))
    assert latest["pretrain_run_id"] == ids["p2b"]
    # --resume of an earlier tag redoes steps 3-4: the history holds them once (appending kept both).
    assert pretrain.main([*common, "--run-dir", two, "--steps", "4", "--resume", "2", "--log-every", "1",
                          "--no-mlflow"]) == 0
    with open(os.path.join(two, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 3, 4]  # logged every 2 steps, then every step
