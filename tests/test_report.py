"""pipeline/report.py: a run's metric histories from a real MLflow server, drawn to PNG."""

import os
import subprocess
import sys

import pytest

from pipeline.report import ReportError, group, histories, report

from .conftest import REPO


def test_metrics_are_grouped_by_what_they_measure():
    names = ["loss", "eval_loss", "mlm_accuracy", "validation/f1", "sequences_per_second", "mfu_model",
             "real_tokens_per_second", "learning_rate", "grad_norm", "loss_scale", "epoch_seconds",
             "real_token_share"]
    # One scale per panel: the fp16 loss scale (65,536) drew the losses (and a gradient norm) flat
    # when beside them, and tokens/s (1e5) the MFU (< 1).
    assert group(names) == [("loss", ["loss", "eval_loss"]),
                            ("accuracy and scores", ["mlm_accuracy", "validation/f1"]),
                            ("sequences per second", ["sequences_per_second"]),
                            ("tokens per second", ["real_tokens_per_second"]),
                            ("model FLOPs utilization", ["mfu_model"]),
                            ("learning rate", ["learning_rate"]),
                            ("gradients", ["grad_norm"]),
                            ("shares", ["real_token_share"]),
                            ("fp16 loss scale", ["loss_scale"]),
                            ("other", ["epoch_seconds"])]


@pytest.mark.e2e
def test_report_draws_the_run_from_a_real_server(mlflow_server, tmp_path):
    import matplotlib.image
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment(f"report-{os.getpid()}-{tmp_path.name}")
    run = client.create_run(experiment, tags={"stage": "pretrain"}, run_name="curves")
    run_id = run.info.run_id
    for step in range(1, 11):
        client.log_batch(run_id, metrics=[
            mlflow.entities.Metric("loss", 10.0 / step, 0, step),
            mlflow.entities.Metric("mlm_accuracy", 0.05 * step, 0, step),
            mlflow.entities.Metric("sequences_per_second", 100.0 + step, 0, step),
            mlflow.entities.Metric("learning_rate", 1e-4 * min(step, 5), 0, step)])
    client.log_metric(run_id, "eval_loss", 3.0, step=5)
    client.log_metric(run_id, "eval_loss", 2.0, step=10)
    client.log_metric(run_id, "final_only", 1.0, step=10)  # one point, alone in its panel: nothing to draw
    client.log_metric(run_id, "eval_mlm_accuracy", 0.45, step=10)  # one point beside a line of its kind: drawn

    curves = histories(client, run_id)
    assert set(curves) == {"loss", "mlm_accuracy", "sequences_per_second", "learning_rate", "eval_loss",
                           "eval_mlm_accuracy"}
    assert curves["eval_loss"] == [(5, 3.0), (10, 2.0)] and curves["eval_mlm_accuracy"] == [(10, 0.45)]

    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "report.py"), run_id, "--out", str(out),
                           "--log-artifact"], env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out)
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 600 and image.shape[1] > 1200  # 2 x 2 panels
    assert "curves.png" in {a.path for a in client.list_artifacts(run_id)}

    # A run resumed twice (a requeue after a checkpoint at step 8 of the run above, whose steps 9 and
    # 10 it trained again; then another at step 14): drawn from step 1, each step once, the later
    # run's where two logged it (before: only the last run's own steps)
    second = client.create_run(experiment, tags={"stage": "pretrain", "resumed_from_run_id": run_id,
                                                 "resumed_at_step": "8"}).info.run_id
    third = client.create_run(experiment, tags={"stage": "pretrain", "resumed_from_run_id": second,
                                                "resumed_at_step": "14"}).info.run_id
    for step in range(9, 16):
        client.log_metric(second, "loss", -float(step), step=step)
    for step in range(15, 19):
        client.log_metric(third, "loss", 100.0 + step, step=step)
    curves = histories(client, third)
    assert curves["loss"] == ([(s, 10.0 / s) for s in range(1, 9)] + [(s, -float(s)) for s in range(9, 15)]
                              + [(s, 100.0 + s) for s in range(15, 19)])
    # the first run's evaluation at step 10, which the second trained again but did not evaluate, is left out
    assert curves["eval_loss"] == [(5, 3.0)] and curves["mlm_accuracy"] == [(s, 0.05 * s) for s in range(1, 9)]
    assert report(third, str(tmp_path / "resumed.png"), mlflow_server) == str(tmp_path / "resumed.png")
    # a run that did not finish says so (its curve stops early); a finished one does not
    from pipeline.report import title_of

    assert title_of(client.get_run(third), 2).endswith(f"run {third[:12]} · with the 2 runs it resumed · RUNNING")
    client.set_terminated(third, "FINISHED")
    assert title_of(client.get_run(third), 2).endswith("it resumed")

    empty = client.create_run(experiment).info.run_id
    with pytest.raises(ReportError, match="no metric with two or more points"):
        report(empty, str(tmp_path / "empty.png"), mlflow_server)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "report.py"), "0" * 32],
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: run 000000")
    # The beginning of an id, as run_all.py's summary prints it, names the run it begins; one that
    # begins none is said so
    assert report(run_id[:12], str(tmp_path / "short.png"), mlflow_server) == str(tmp_path / "short.png")
    assert report(run_id[:8].upper(), str(tmp_path / "upper.png"), mlflow_server) == str(tmp_path / "upper.png")
    other = "0123456789" if not run_id.startswith("0123456789") else "abcdefabcd"
    with pytest.raises(ReportError, match=f"no run id in the tracking store {mlflow_server} begins {other}"):
        report(other, str(tmp_path / "none.png"), mlflow_server)
    # A local store that is not there (the default sqlite:///mlflow.db, from another folder): said,
    # and no empty store made (before: "not found", and an empty mlflow.db left behind)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "report.py"), run_id],
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and f"sqlite:///{tmp_path}/mlflow.db does not exist" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()
    # A path that cannot be written, found before the run is read (before: a traceback after it, or
    # exit 0 naming a file matplotlib never wrote)
    (tmp_path / "a_file").write_text("x")
    for out, message in ((tmp_path, "a folder; --out names the file to write"),
                         (tmp_path / "curves", "name a .png or .pdf or .svg file"),
                         (tmp_path / "a_file" / "c.png", "a_file is a file, not a folder")):
        with pytest.raises(ReportError, match=message):
            report(run_id, str(out), mlflow_server)
    with pytest.raises(ReportError, match=r"MLflow tracking server http://127\.0\.0\.1:9 does not answer"):
        report(run_id, str(tmp_path / "x.png"), "http://127.0.0.1:9")
