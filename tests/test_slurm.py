"""slurm/*.sh on a real two-node SLURM (tests/slurm_cluster.py): preprocessing on one node,
pretraining on 2 nodes x 1 rank (gloo), preemption and requeue, and settings that fail fast.

The uninterrupted job runs in the background beside the preempted one (it is that test's
reference), so the module takes about as long as the preempted job's four starts.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import checkpoint

from .conftest import REPO, WIKI_SAMPLE
from .slurm_cluster import slurm_cluster  # noqa: F401 - the fixture

STEPS = 150  # ~60 ms each here: long enough to stop a run midway, three times
CPU_2x1 = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def job_env(**values):
    """What a user's shell passes on to sbatch: the project's Python first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return {**env, "REPO": REPO, **values}


def submit(cluster, folder, script, *sbatch_args, script_args=(), env):
    """sbatch from ``folder``, where the header's slurm-%j.out lands; the job id."""
    os.makedirs(folder, exist_ok=True)
    proc = cluster.run("sbatch", "--parsable", *sbatch_args, os.path.join(REPO, "slurm", script), *script_args,
                       check=False, cwd=folder, env=env)
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch failed: {proc.stdout}{proc.stderr}\n{cluster.diagnostics()}"
    return job_id


def output_of(folder, job_id):
    path = os.path.join(folder, f"slurm-{job_id}.out")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path).read().splitlines() if line.strip()]


def mlflow_runs(mlflow_server, job_id):
    """The MLflow runs of a job: the script names them JOBNAME-JOBID, the same for every restart."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("bert-pipeline")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"attributes.run_name = 'bert-pretrain-{job_id}'")


@pytest.fixture(scope="module")
def data_dir(slurm_cluster, tmp_path_factory):  # noqa: F811
    """A data dir made by ``sbatch slurm/preprocess.sh`` on one node of the cluster."""
    folder = str(tmp_path_factory.mktemp("preprocess"))
    data = os.path.join(folder, "data")
    job_id = submit(slurm_cluster, folder, "preprocess.sh", "--cpus-per-task=2", "--time=10",
                    script_args=["--input", WIKI_SAMPLE, "--vocab-size", "4000", "--dupe-factor", "2",
                                 "--num-shards", "2", "--no-mlflow"],
                    env=job_env(DATA_DIR=data))
    job = slurm_cluster.wait_job(job_id)
    output = os.path.join(folder, f"slurm-{job_id}.out")
    assert job["JobState"] == "COMPLETED", f"preprocess.sh: {job}\n{slurm_cluster.diagnostics(output)}"
    return data, output_of(folder, job_id), job


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    """The tiny preset without dropout (as in tests/test_pretrain.py)."""
    from pipeline.model import PRESETS

    path = tmp_path_factory.mktemp("model") / "tiny-no-dropout.json"
    path.write_text(json.dumps({**PRESETS["tiny"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    return str(path)


def pretrain_env(data_dir, run_dir, model_config, **values):
    return job_env(DATA_DIR=data_dir, RUN_DIR=run_dir, MODEL=model_config, STEPS=str(STEPS),
                   TRAIN_ARGS="--global-batch-size 8 --micro-batch-size 4 --log-every 1", **values)


class BackgroundJob:
    """``sbatch --wait slurm/pretrain.sh`` running in the background; ``result()`` waits for it."""

    def __init__(self, cluster, folder, env):
        self.cluster, self.folder, self.run_dir = cluster, folder, env["RUN_DIR"]
        os.makedirs(folder, exist_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(["sbatch", "--parsable", "--wait", *CPU_2x1,
                                      os.path.join(REPO, "slurm", "pretrain.sh")],
                                     cwd=folder, env={**cluster.env, **env}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._result = None

    def job_id(self) -> str:
        """The job's id, from the queue by the folder it was submitted from: ``sbatch --wait``'s
        own line comes through its pipe only when it returns."""
        out = self.cluster.run("squeue", "-h", "-t", "all", "-o", "%i %Z").stdout
        ids = [line.split()[0] for line in out.splitlines() if line.split()[1:] == [self.folder]]
        assert len(ids) == 1, f"squeue: {out}\n{self.cluster.diagnostics()}"
        return ids[0]

    def result(self):
        """(job id, sbatch's exit code, which is the job's; seconds until sbatch returned)."""
        if self._result is None:
            out, err = self.proc.communicate(timeout=600)
            assert out.strip().isdigit(), f"sbatch: {out}{err}\n{self.cluster.diagnostics()}"
            self._result = out.strip(), self.proc.returncode, time.monotonic() - self.started
        return self._result


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, data_dir, model_config, mlflow_server, tmp_path_factory):  # noqa: F811
    import mlflow

    # This job and the preempted one start side by side. On a server without the experiment
    # both would create it, and MLflow 3's set_experiment answers the loser of that race
    # without making the experiment active: its run lands in experiment 0 (seen here).
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    if client.get_experiment_by_name("bert-pipeline") is None:
        client.create_experiment("bert-pipeline")
    folder = str(tmp_path_factory.mktemp("uninterrupted"))
    job = BackgroundJob(slurm_cluster, folder, pretrain_env(data_dir[0], os.path.join(folder, "run"), model_config,
                                                             MLFLOW_TRACKING_URI=mlflow_server))
    yield job
    if job.proc.poll() is None:
        job.proc.kill()
        job.proc.wait()


def _wait_for(what, predicate, timeout, diagnose):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{diagnose()}"
        time.sleep(0.2)


@pytest.mark.e2e
def test_preprocess_runs_beam_locally_on_one_node(data_dir):
    data, out, job = data_dir
    assert "Beam local runner on" in out and "2 worker processes" in out, out[-3000:]
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    assert f"Wrote {manifest['num_examples']:,} examples to {data}" in out
    assert len(manifest["shards"]) == 2 and manifest["tokenizer"]["vocab_size"] == 4000
    assert job["NumNodes"] == "1" and job["NumCPUs"] == "4"  # --exclusive: the whole node


@pytest.mark.e2e
def test_preemption_checkpoints_requeues_and_resumes(uninterrupted, slurm_cluster, data_dir,  # noqa: F811
                                                      model_config, mlflow_server, tmp_path):
    """Three stops of one job, one by each way a job is stopped to go on later, then the end:
    the uninterrupted job's steps and losses.

    1. ``scancel --batch --signal=USR1``: how SLURM delivers ``--signal=B:USR1@N`` before the
       time limit, to the batch shell only; the script passes it on through srun.
    2. Preemption: a job of a higher-priority partition needs the nodes. SLURM sends SIGTERM to
       the ranks alone, and would SIGKILL them after GraceTime and cancel the job (PreemptMode
       CANCEL); the ranks checkpoint within it, exit 3, and the script requeues the job.
    3. ``scancel --signal=USR1``: SLURM signals the job steps, i.e. the ranks, and not the
       batch shell; the ranks exit 3 and the script requeues all the same.
    """
    from .slurm_cluster import GRACE_TIME_S

    folder, run_dir = str(tmp_path), str(tmp_path / "run")
    job_id = submit(slurm_cluster, folder, "pretrain.sh", *CPU_2x1,
                    env=pretrain_env(data_dir[0], run_dir, model_config, MLFLOW_TRACKING_URI=mlflow_server))

    def diagnose():
        return f"job {job_id}: {slurm_cluster.job(job_id)}\n" + slurm_cluster.diagnostics(
            os.path.join(folder, f"slurm-{job_id}.out"))

    stops, urgent = [], None
    for restart, scancel in enumerate([["--batch", "--signal=USR1"], None, ["--signal=USR1"]]):
        if not scancel:  # the urgent job below takes every CPU of both nodes: once the uninterrupted job
            # is done (it started a start earlier), this job alone is in its way (with both running,
            # SLURM would choose which to preempt). Polled, not sbatch --wait's coarse return.
            assert slurm_cluster.wait_job(uninterrupted.job_id())["JobState"] == "COMPLETED", diagnose()
        done = len(read_metrics(run_dir))
        _wait_for(f"start {restart + 1} to train 15 steps", lambda: len(read_metrics(run_dir)) >= done + 15,
                  240, diagnose)
        if scancel:
            slurm_cluster.run("scancel", *scancel, job_id)
        else:
            assert read_metrics(run_dir)[-1]["step"] < STEPS - 30, f"too late to preempt it\n{diagnose()}"
            preempted_at = time.monotonic()
            urgent = slurm_cluster.run("sbatch", "--parsable", "--partition=urgent", "--nodes=2",
                                       "--ntasks-per-node=4", "--time=5", f"--output={folder}/urgent.out",
                                       "--wrap", "sleep 1", cwd=folder).stdout.strip()
        _wait_for(f"requeue {restart + 1}", lambda: slurm_cluster.job(job_id)["Restarts"] == str(restart + 1),
                  120, diagnose)
        if not scancel:  # within the grace time: the ranks' checkpoint, not SLURM's SIGKILL, ended the start
            assert time.monotonic() - preempted_at < GRACE_TIME_S, diagnose()
        stops.append(read_metrics(run_dir)[-1]["step"])
        assert checkpoint.find_latest(os.path.join(run_dir, "checkpoints")) == checkpoint.tag_for(stops[-1])
    job = slurm_cluster.wait_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "3", diagnose()
    assert 15 <= stops[0] < stops[1] < stops[2] < STEPS, stops
    assert slurm_cluster.wait_job(urgent)["JobState"] == "COMPLETED", diagnose()

    # One output file for the four starts (--open-mode=append): what happened, in order.
    out = output_of(folder, job_id)
    starts = [line for line in out.splitlines() if "pretrain.sh[job" in line and "world size 2" in line]
    assert len(starts) == 4 and all(f"restart {n}]" in starts[n] for n in (1, 2, 3)), diagnose()
    # only the batch-path stop reaches the shell: the preemption's SIGTERM goes to the ranks alone
    assert out.count("received SIGUSR1") == 1 and "received SIGTERM" not in out, diagnose()
    assert out.count("requeueing") == 3 and out.rstrip().endswith("finished"), diagnose()
    for rank in (0, 1):
        resumed = [line.split("resumed from ")[1] for line in out.splitlines()
                   if line.startswith(f"{rank}: ") and "resumed from " in line]
        assert resumed == [f"{checkpoint.tag_for(s)} at step {s}" for s in stops], diagnose()

    # Every step exactly once, and the uninterrupted job's losses, exactly.
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), diagnose()
    assert uninterrupted.result()[1] == 0, "the uninterrupted job failed: see test_pretrain_on_two_nodes"
    assert [m["loss"] for m in metrics] == [m["loss"] for m in read_metrics(uninterrupted.run_dir)]
    tag = checkpoint.tag_for(STEPS)
    assert checkpoint.find_latest(os.path.join(run_dir, "checkpoints")) == tag
    assert os.path.exists(os.path.join(run_dir, "hf", tag, "model.safetensors"))
    assert sorted(r.info.status for r in mlflow_runs(mlflow_server, job_id)) == ["FINISHED", *["KILLED"] * 3]


@pytest.mark.e2e
def test_pretrain_on_two_nodes(uninterrupted, slurm_cluster, mlflow_server):  # noqa: F811
    job_id, code, seconds = uninterrupted.result()
    folder, run_dir = uninterrupted.folder, uninterrupted.run_dir
    out = output_of(folder, job_id)
    why = f"job {job_id} exited {code}\n{slurm_cluster.diagnostics(os.path.join(folder, f'slurm-{job_id}.out'))}"
    assert code == 0, why
    job = slurm_cluster.job(job_id)
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == "n[1-2]" and job["Restarts"] == "0", job
    assert "world size 2, master 127.0.0.1:" in out, out[:2000]  # n1's NodeAddr: n1 does not resolve
    assert "\n0: " in out and "\n1: " in out  # both ranks' lines, labelled by srun
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    tag = checkpoint.tag_for(STEPS)
    assert checkpoint.find_latest(os.path.join(run_dir, "checkpoints")) == tag
    assert os.path.exists(os.path.join(run_dir, "hf", tag, "model.safetensors"))
    assert os.path.exists(os.path.join(run_dir, "hf", tag, "config.json"))
    runs = mlflow_runs(mlflow_server, job_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", why
    assert runs[0].data.params["world_size"] == "2" and runs[0].data.tags["stage"] == "pretrain"
    print(f"\nsbatch --wait slurm/pretrain.sh, 2 x 1 ranks, {STEPS} steps: returned after {seconds:.0f} s, "
          f"job run time {job['RunTime']}")


@pytest.mark.e2e
def test_finetune_on_two_nodes_from_the_pretrained_run(uninterrupted, slurm_cluster, mlflow_server,  # noqa: F811
                                                       tmp_path):
    """``sbatch slurm/finetune.sh`` on 2 nodes x 1 rank from the two-node pretraining run dir
    (its newest checkpoint exported on the fly): the report, and an MLflow run linked to the
    pretraining run."""
    import bz2
    import csv
    import io

    import mlflow

    pretrain_job, code, _ = uninterrupted.result()
    assert code == 0, "the pretraining job failed: see test_pretrain_on_two_nodes"
    reviews = os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2")
    with io.TextIOWrapper(bz2.open(reviews), encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] != "plot"][:400]
    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "category"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    folder, out = str(tmp_path), str(tmp_path / "finetuned")
    env = job_env(MODEL=uninterrupted.run_dir, OUTPUT_DIR=out, MLFLOW_TRACKING_URI=mlflow_server,
                  FINETUNE_ARGS="--label-column category --epochs 1 --global-batch-size 16 --micro-batch-size 8 "
                                "--max-seq-length 64 --no-log-model")
    job = slurm_cluster.wait_job(submit(slurm_cluster, folder, "finetune.sh", *CPU_2x1, script_args=["--data", str(data)],
                                        env=env), timeout=300)
    output = os.path.join(folder, f"slurm-{job['JobId']}.out")
    assert job["JobState"] == "COMPLETED", f"{job}\n{slurm_cluster.diagnostics(output)}"
    assert f"finished: {out}/report.json" in output_of(folder, job["JobId"])
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["labels"] == ["fresh", "rotten"] and report["world_size"] == 2
    # Every test row was scored once across the two nodes' ranks, and the accuracy is theirs.
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == report["rows"]["test"] > 0
    assert report["test"]["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert all(np.isfinite(h["train_loss"]) for h in report["history"])

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("bert-pipeline").experiment_id
    (finetuned,) = client.search_runs([experiment], filter_string=f"attributes.run_name = 'bert-finetune-{job['JobId']}'")
    (pretrained,) = mlflow_runs(mlflow_server, pretrain_job)
    assert finetuned.info.status == "FINISHED" and finetuned.data.tags["stage"] == "finetune"
    assert finetuned.data.params["world_size"] == "2"
    assert finetuned.data.tags["pretrain_run_id"] == pretrained.info.run_id


@pytest.mark.e2e
def test_scancel_ends_the_job_with_a_checkpoint_and_no_requeue(slurm_cluster, data_dir, model_config,  # noqa: F811
                                                               tmp_path):
    """Plain ``scancel`` sends SIGTERM to every process of the job: the ranks checkpoint, and the
    script must not requeue a job its user cancelled."""
    from .slurm_cluster import CRED_EXPIRE_S

    folder, run_dir = str(tmp_path), str(tmp_path / "run")
    env = pretrain_env(data_dir[0], run_dir, model_config)
    env["TRAIN_ARGS"] += " --no-mlflow"
    job_id = submit(slurm_cluster, folder, "pretrain.sh", *CPU_2x1, env=env)

    def diagnose():
        return f"job {job_id}: {slurm_cluster.job(job_id)}\n" + slurm_cluster.diagnostics(
            os.path.join(folder, f"slurm-{job_id}.out"))

    _wait_for("5 steps", lambda: len(read_metrics(run_dir)) >= 5, 240, diagnose)
    slurm_cluster.run("scancel", job_id)
    _wait_for("the script's last word", lambda: "not requeued" in output_of(folder, job_id), 60, diagnose)
    time.sleep(CRED_EXPIRE_S + 3)  # when a requeued job could start again
    job = slurm_cluster.job(job_id)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", diagnose()
    out = output_of(folder, job_id)
    assert "received SIGTERM" in out and "stopped by SIGTERM with a checkpoint (exit 3): not requeued" in out
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert 5 <= stopped_at < STEPS
    assert checkpoint.find_latest(os.path.join(run_dir, "checkpoints")) == checkpoint.tag_for(stopped_at)


@pytest.mark.e2e
@pytest.mark.parametrize("bad, message", [
    ({"DATA_DIR": None}, "pretrain.sh[job {job}]: error: set DATA_DIR to the data dir written by preprocessing"),
    ({"DATA_DIR": "/nonexistent/data"}, "DATA_DIR=/nonexistent/data does not exist: run preprocessing first"),
    ({"RUN_DIR": None}, "pretrain.sh[job {job}]: error: set RUN_DIR to the folder for checkpoints"),
    ({"DS_CONFIG": "ds_configs/missing.json"}, "DS_CONFIG=ds_configs/missing.json does not exist"),
    # A flag after the script: before, every rank printed it and srun's kill of the slower one made
    # the job's exit code 143.
    ({"args": ["--steps", "abc"]}, "python pipeline/pretrain.py: error: argument --steps: invalid int value: 'abc'"),
    # The defaults are for one process; on a cluster the global batch must divide among the ranks.
    ({"args": ["--global-batch-size", "3"]}, "python pipeline/pretrain.py: error: --global-batch-size 3 is not "
                                              "divisible by --micro-batch-size"),
])
def test_a_bad_setting_fails_fast_with_a_readable_message(bad, message, slurm_cluster, data_dir,  # noqa: F811
                                                         model_config, tmp_path):
    folder, run_dir = str(tmp_path), str(tmp_path / "run")
    env = pretrain_env(data_dir[0], run_dir, model_config)
    bad = dict(bad)
    script_args = bad.pop("args", ())
    for key, value in bad.items():
        if value is None:
            del env[key]
        else:
            env[key] = value
    started = time.monotonic()
    job = slurm_cluster.wait_job(submit(slurm_cluster, folder, "pretrain.sh", *CPU_2x1, script_args=script_args,
                                        env=env), timeout=60)
    out = output_of(folder, job["JobId"])
    assert out.count(" error: ") == 1, out  # once, not once per rank
    message = message.format(job=job["JobId"])  # an unset variable: before, bash's line naming the spool copy
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0" and message in out, f"{job}\noutput:\n{out}"
    assert "pipeline.trainer" not in out and not os.path.exists(run_dir)  # no rank was started
    assert time.monotonic() - started < 30


@pytest.mark.e2e
def test_a_job_into_a_busy_run_dir_fails_before_any_rank_starts(slurm_cluster, data_dir, model_config,  # noqa: F811
                                                               tmp_path):
    """A job submitted twice: the second is refused by the first's lock, with one line naming it.
    The ranks' own check refused rank 0 only, and its peers waited in the rendezvous until srun
    killed them: the job ended 137 after KillWait."""
    from pipeline import run_lock

    folder, run_dir = str(tmp_path), str(tmp_path / "run")
    held = run_lock.acquire(run_dir)  # the first job's rank 0
    try:
        started = time.monotonic()
        job = slurm_cluster.wait_job(submit(slurm_cluster, folder, "pretrain.sh", *CPU_2x1,
                                            env=pretrain_env(data_dir[0], run_dir, model_config)), timeout=60)
        out = output_of(folder, job["JobId"])
        assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", f"{job}\noutput:\n{out}"
        assert out.count(" error: ") == 1 and f"--run-dir {run_dir} is in use by another run (pid {os.getpid()} " in out
        assert "pipeline.trainer" not in out and not os.path.exists(os.path.join(run_dir, "checkpoints"))
        assert time.monotonic() - started < 30
        # The same busy pretraining run dir as a fine-tuning's OUTPUT_DIR: refused for what it is.
        with open(os.path.join(run_dir, "train_config.json"), "w") as f:
            f.write("{}")
        os.makedirs(tmp_path / "model")
        job = slurm_cluster.wait_job(submit(slurm_cluster, folder, "finetune.sh", *CPU_2x1,
                                            script_args=["--data", "reviews.csv", "--micro-batch-size", "16"],
                                            env=job_env(MODEL=str(tmp_path / "model"), OUTPUT_DIR=run_dir)), timeout=60)
        out = output_of(folder, job["JobId"])
        assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", f"{job}\noutput:\n{out}"
        assert out.count(" error: ") == 1 and (f"--output-dir {run_dir} is a pretraining run dir (it holds "
                                               "train_config.json)") in out, out
    finally:
        held.release()


@pytest.mark.e2e
def test_a_bare_srun_of_the_trainer_is_refused_on_every_task(slurm_cluster, data_dir, tmp_path):  # noqa: F811
    """srun without slurm/pretrain.sh sets no WORLD_SIZE: each task would train alone as rank 0 into
    the same run dir. SLURM gives each task the step's task count, which the trainer refuses."""
    script = tmp_path / "bare.sh"
    script.write_text(f"#!/bin/bash\nsrun {sys.executable} {REPO}/pipeline/pretrain.py --data {data_dir[0]} "
                      f"--run-dir {tmp_path / 'run'} --no-mlflow\n")
    proc = slurm_cluster.run("sbatch", "--parsable", *CPU_2x1, f"--output={tmp_path}/out.txt", str(script),
                             check=False, cwd=str(tmp_path), env=job_env())
    job = slurm_cluster.wait_job(proc.stdout.strip().split(";")[0], timeout=90)
    out = (tmp_path / "out.txt").read_text()
    assert job["JobState"] == "FAILED", f"{job}\n{out}"
    assert out.count("error: one of 2 processes (SLURM_STEP_NUM_TASKS=2) without WORLD_SIZE") == 2, out
    assert "Traceback" not in out and not os.path.exists(tmp_path / "run")


@pytest.mark.e2e
def test_a_taken_rendezvous_port_moves_to_the_next_free_one(slurm_cluster, tmp_path):  # noqa: F811
    """slurm/common.sh's set_master in a real batch job whose default port a server already holds
    on the first node (another job sharing it): the ranks would fail to meet there."""
    script = tmp_path / "port.sh"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
source {REPO}/slurm/common.sh
PYTHON=python
port=$((15000 + SLURM_JOB_ID % 15000))
python -c "import socket, time; s = socket.socket(); s.bind(('', $port)); s.listen(); print('held', flush=True); \\
time.sleep(60)" > {tmp_path}/held.txt &
until grep -q held {tmp_path}/held.txt; do sleep 0.1; done
set_master
echo "default $port chosen $MASTER_PORT"
(MASTER_PORT=$port; set_master; echo "inherited $port chosen $MASTER_PORT")
(MASTER_PORT=$((port + 7)); set_master; echo "inherited $((port + 7)) kept $MASTER_PORT")
kill %1
""")
    proc = slurm_cluster.run("sbatch", "--parsable", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--time=5",
                             f"--output={tmp_path}/out.txt", str(script), check=False, cwd=str(tmp_path), env=job_env())
    job = slurm_cluster.wait_job(proc.stdout.strip().split(";")[0], timeout=90)
    out = (tmp_path / "out.txt").read_text()
    assert job["JobState"] == "COMPLETED", f"{job}\n{out}"
    default = 15000 + int(job["JobId"]) % 15000
    chosen = int(re.search(rf"default {default} chosen (\d+)", out)[1])
    # The next free one (the one after, unless that too is taken on this shared machine).
    assert chosen != default and 15000 <= chosen <= 29999, out
    assert f"port {default} is in use on " in out
    # A MASTER_PORT passed on from the submitting shell (torchrun's 29500) is kept only while free.
    assert f"warning: MASTER_PORT={default} from the environment is in use on " in out
    assert f"inherited {default} chosen {chosen}" in out
    assert f"inherited {default + 7} kept {default + 7}" in out


def test_a_cancelled_job_stays_cancelled_through_a_later_usr1_and_a_usr1_after_srun_is_ignored(tmp_path):
    """slurm/common.sh's signal forwarding in plain bash (no cluster needed): a job cancelled by
    SIGTERM whose time-limit warning (USR1) comes before its ranks exit must not requeue itself,
    and a USR1 after srun ended must not kill the shell before it requeues a checkpointed job."""
    script = tmp_path / "signals.sh"
    script.write_text(f"""set -uo pipefail
source {REPO}/slurm/common.sh
(trap '' USR1; exec sleep 3) &  # stands for srun, which passes USR1 on and lives until its tasks end
SRUN_PID=$!
(sleep 0.5; kill -TERM $$; sleep 0.5; kill -USR1 $$) &
code=0
wait_forwarding_signals || code=$?
echo "srun exited $code, stop signal $STOP_SIGNAL"
kill -USR1 $$
echo "alive after a late USR1"
""")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["srun exited 0, stop signal TERM", "alive after a late USR1"], proc.stdout
    assert proc.stderr.count("received SIGTERM") == 1 and proc.stderr.count("received SIGUSR1") == 1


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(os.path.join(folder, f) for folder in ("slurm", "benchmarks")
                     for f in os.listdir(os.path.join(REPO, folder)) if f.endswith(".sh"))
    assert "benchmarks/gpu_checks.sh" in scripts
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_a_usr1_before_the_ranks_start_requeues_the_job(slurm_cluster, data_dir, model_config,  # noqa: F811
                                                         tmp_path):
    """The time limit's B:USR1 (or scancel --batch) during a slow start (SETUP's module loads, a conda
    activation): bash died of it, and the job ended FAILED (0:10) without a word or a requeue."""
    folder, run_dir = str(tmp_path), str(tmp_path / "run")
    setup = tmp_path / "setup.sh"
    # The first start sleeps long enough to be signalled; the requeued one does not.
    setup.write_text('[[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]] || sleep 15\n')
    env = {**pretrain_env(data_dir[0], run_dir, model_config, SETUP=str(setup)), "STEPS": "4"}
    job_id = submit(slurm_cluster, folder, "pretrain.sh", *CPU_2x1, env=env)
    _wait_for("the job to start", lambda: slurm_cluster.job(job_id)["JobState"] == "RUNNING", 60,
              lambda: output_of(folder, job_id))
    time.sleep(3)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    job = slurm_cluster.wait_job(job_id, timeout=300)
    out = output_of(folder, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", f"{job}\n{out}"
    assert "received SIGUSR1 before the ranks started (nothing to checkpoint): requeueing" in out
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
