"""MLFLOW_EXPERIMENT_NAME names the MLflow experiment when --experiment is not given, in every
stage: the flags leave it unset and tracking resolves it, in one place."""

import pytest

from preprocessing.mlflow_experiment import DEFAULT_EXPERIMENT, experiment_name


def test_the_flag_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert experiment_name(None) == DEFAULT_EXPERIMENT == "bert-pipeline"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert experiment_name(None) == "from-env"
    assert experiment_name("given") == "given"


def test_no_stage_s_flags_fix_the_experiment(monkeypatch):
    from pipeline.embed import build_parser as embed_parser
    from pipeline.finetuning.config import build_parser as finetune_parser
    from pipeline.train_config import build_parser as pretrain_parser
    from preprocessing.options import build_parser as preprocess_parser
    from preprocessing.options import parse_args as preprocess_args

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert preprocess_args([])[0].experiment is None
    assert preprocess_args(["--experiment", "given"])[0].experiment == "given"
    assert "$MLFLOW_EXPERIMENT_NAME, else bert-pipeline" in " ".join(preprocess_parser().format_help().split())
    parsers = {pretrain_parser(): ["--data", "d"], finetune_parser(): ["--model", "m", "--data", "d"],
               embed_parser(): ["--model", "m", "--input", "i", "--out", "o"]}
    for parser, required in parsers.items():
        assert parser.parse_args(required).experiment is None, parser.prog
        assert parser.parse_args([*required, "--experiment", "given"]).experiment == "given", parser.prog
        assert "$MLFLOW_EXPERIMENT_NAME, else bert-pipeline" in " ".join(parser.format_help().split()), parser.prog


@pytest.mark.e2e
def test_runs_land_in_the_environment_s_experiment_unless_one_is_given(tmp_path, monkeypatch):
    import mlflow

    from pipeline.tracking import Tracker
    from preprocessing import tracking
    from preprocessing.options import PreprocessConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    with tracking.preprocess_run(PreprocessConfig(output=str(tmp_path / "data")), []) as run:
        preprocess = run.run_id
    pretrain = Tracker("pretrain", None, None, {})
    pretrain.finish()
    given = Tracker("finetune", "given", None, {})
    given.finish()

    client = mlflow.MlflowClient(tracking_uri=uri)
    in_env = client.search_runs([client.get_experiment_by_name("from-env").experiment_id])
    assert {r.info.run_id for r in in_env} == {preprocess, pretrain.run_id}
    assert client.get_run(given.run_id).info.experiment_id == client.get_experiment_by_name("given").experiment_id
    assert client.get_experiment_by_name(DEFAULT_EXPERIMENT) is None


def test_the_browse_hint_serves_a_local_store_and_opens_a_server(monkeypatch, tmp_path):
    from preprocessing.mlflow_experiment import browse_hint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # absolute, so that the command works from wherever it is run (before: sqlite:///mlflow.db)
    assert browse_hint() == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db  (then http://127.0.0.1:5000)"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks")  # a scheme, not a folder here
    assert browse_hint().startswith("mlflow ui --backend-store-uri databricks  ")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "runs/mlruns")
    assert browse_hint().startswith(f"mlflow ui --backend-store-uri {tmp_path}/runs/mlruns  ")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x/mlflow.db")
    assert browse_hint().startswith("mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert browse_hint() == "open http://mlflow.internal:5000"


def test_a_failing_stores_repeated_error_is_logged_once_in_a_hundred_with_a_count():
    import logging

    from preprocessing.mlflow_experiment import QuietRepeats

    quiet = QuietRepeats(every=5)
    records = [logging.LogRecord("mlflow", logging.ERROR, __file__, 1, "database or disk is full %s", ("x",), None)
               for _ in range(11)]
    passed = [r.getMessage() for r in records if quiet.filter(r)]
    assert passed == ["database or disk is full x",
                      "database or disk is full x [3 more errors of this logger held back]",
                      "database or disk is full x [4 more errors of this logger held back]"]
    assert quiet.filter(logging.LogRecord("mlflow", logging.INFO, __file__, 1, "fine", (), None))


def test_the_run_id_is_announced_without_the_stores_password(caplog):
    import logging

    from preprocessing.mlflow_experiment import announce_run

    log = logging.getLogger("announce-test")
    with caplog.at_level(logging.INFO, logger="announce-test"):
        announce_run(log, "abc123", "pretrain", "exp", "https://user:secret@mlflow.example:5000/path")
        announce_run(log, "def456", "finetune", "exp", "sqlite:///mlflow.db")
    assert caplog.messages == [
        "MLflow run abc123 (stage pretrain, experiment 'exp', store https://mlflow.example:5000/path)",
        "MLflow run def456 (stage finetune, experiment 'exp', store sqlite:///mlflow.db)"]


def test_the_labelled_datas_params_name_every_file_by_its_bytes(tmp_path, monkeypatch):
    from pipeline.tracking import data_params

    saved = tmp_path / "saved"
    (saved / "train").mkdir(parents=True)
    (saved / "train" / "data.arrow").write_bytes(b"rows")
    (saved / "dataset_dict.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    first = data_params(data="saved", train=None)
    assert first["data_path"] == str(saved) and "train_path" not in first
    assert data_params(data=str(saved)) == first  # the same bytes, however the path was typed
    (saved / "train" / "data.arrow").write_bytes(b"rowz")
    assert data_params(data="saved")["data_sha256"] != first["data_sha256"]
    (tmp_path / "t.csv").write_text("text,label\n")
    split = data_params(train="t.csv", test="t.csv")
    assert split["train_path"] == split["test_path"] == str(tmp_path / "t.csv")
    assert split["data_sha256"] != data_params(train="t.csv")["data_sha256"]  # the test split counts too
