"""pipeline/run_all.py: the three stages end to end, and the MLflow lineage between their runs."""

import csv
import json
import os
import subprocess
import sys

import pytest

from pipeline.run_all import write_review_task

from .conftest import REPO

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_review_task_keeps_held_out_text_out_of_pretraining(tmp_path):
    files = write_review_task(str(tmp_path), labelled=300, seed=5)
    few, validation, test = (_rows(files[k]) for k in ("train", "validation", "test"))
    assert len(few) == 300 and {r["label"] for r in few} == {"fresh", "rotten"}
    share = sum(r["label"] == "fresh" for r in few) / len(few)
    assert share == pytest.approx(7403 / (7403 + 5405), abs=0.01)  # stratified: the corpus's share
    assert len(validation) > 1000 and len(test) > 1000
    corpus = open(files["unlabelled"], encoding="utf-8").read()
    documents = [d for d in corpus.split("\n\n") if d.strip()]
    sentences = {line for d in documents for line in d.split("\n")}
    held_out = {" ".join(r["text"].split()) for r in validation + test}
    assert not sentences & held_out  # no validation or test review is pretrained on
    assert {" ".join(r["text"].split()) for r in few} <= sentences  # the train split's reviews are
    assert len(documents) > 500  # one document per film


@pytest.mark.e2e
def test_three_stages_run_end_to_end_and_their_runs_are_linked(mlflow_server, tmp_path):
    import mlflow

    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "run_all.py"), "--workdir", str(work),
                           "--pretrain-steps", "20", "--finetune-epochs", "1", "--labelled", "200",
                           "--experiment", "lineage"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for line in ("[preprocess] $ python preprocessing/run_beam.py", "[pretrain] $ python pipeline/pretrain.py",
                 "[finetune-pretrained] $ python pipeline/finetune.py", "Pretraining:   held-out MLM accuracy",
                 "Fine-tuning:   Rotten Tomatoes test accuracy", f"See them:      open {mlflow_server}"):
        assert line in out, out
    # The demo fine-tunes at the length it pretrained at: no position starts untrained.
    assert "were never trained" not in (work / "logs" / "finetune-pretrained.log").read_text()

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("lineage").experiment_id
    runs = {}
    for run in client.search_runs([experiment]):
        runs[(run.data.tags["stage"], run.info.run_name)] = run
    assert set(runs) == {("preprocess", "demo"), ("pretrain", "demo"), ("finetune", "demo-pretrained"),
                         ("finetune", "demo-random")}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # the summary names these runs, read from the stages' outputs (not the newest of each name)
    listed = ", ".join(f"{stage}/{name} {run.info.run_id[:12]}" for (stage, name), run in sorted(runs.items()))
    assert f"MLflow runs:   {listed}" in out, out
    data, pretrain = runs[("preprocess", "demo")], runs[("pretrain", "demo")]
    manifest = json.load(open(work / "data" / "manifest.json"))
    assert manifest["data_run_id"] == data.info.run_id
    assert pretrain.data.tags["data_run_id"] == data.info.run_id
    for init in ("pretrained", "random"):
        finetune = runs[("finetune", f"demo-{init}")]
        assert finetune.data.tags["pretrain_run_id"] == pretrain.info.run_id
        assert finetune.data.tags["data_run_id"] == data.info.run_id
        assert finetune.data.tags["model_kind"] == {"pretrained": "pretrained", "random": "random_init"}[init]
        artifacts = {a.path for a in client.list_artifacts(finetune.info.run_id)}
        assert {"report.json", "confusion_matrix.png"} <= artifacts, artifacts
    assert {"manifest.json", "tokenizer"} <= {a.path for a in client.list_artifacts(data.info.run_id)}
    assert {"ds_config.json", "final_eval.json"} <= {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    info = json.load(open(next((work / "pretrain" / "hf").iterdir()) / "training_info.json"))
    assert info["pretrain_run_id"] == pretrain.info.run_id and info["data_run_id"] == data.info.run_id


@pytest.mark.parametrize("labelled, message", [
    ("0", "--labelled must be >= 2 (one review of each class), got 0"),
    ("999999", "--labelled 999999: the bundled train split has "),
])
def test_a_labelled_count_the_reviews_cannot_give_is_refused_before_any_stage(tmp_path, capsys, labelled, message):
    """Before: 0 wrote an empty train file, refused by fine-tuning after the pretraining; 999999
    took every review and reported 999,999."""
    from pipeline.run_all import main

    with pytest.raises(SystemExit) as exit_:
        main(["--labelled", labelled, "--workdir", str(tmp_path / "demo"), "--no-mlflow"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo" / "data").exists()


def test_a_workdir_of_an_earlier_run_is_refused_unless_overwrite(tmp_path, capsys):
    """Before: a second run resumed the first's pretraining (with its flags' checkpoint, or "already
    finished"), and the summary mixed the two runs."""
    from pipeline.run_all import main

    work = tmp_path / "demo"
    (work / "pretrain" / "checkpoints").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    # a folder run_all.py did not make is never cleared, --overwrite or not
    with pytest.raises(SystemExit):
        main(["--workdir", str(work), "--no-mlflow", "--overwrite"])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"python pipeline/run_all.py: error: --workdir {work} holds pretrain that run_all.py did not write (no .run_all")
    assert (work / "pretrain" / "checkpoints").is_dir()
    (work / ".run_all").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["--workdir", str(work), "--no-mlflow"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python pipeline/run_all.py: error: --workdir {work} holds an earlier run (pretrain): pass --overwrite to "
        "replace it, or another --workdir (--help lists the flags)")
    # --overwrite deletes the stages' outputs only (then refused here for --labelled, before any stage)
    with pytest.raises(SystemExit):
        main(["--workdir", str(work), "--no-mlflow", "--overwrite", "--labelled", "999999"])
    assert not (work / "pretrain").exists() and (work / "notes.txt").read_text() == "mine"
