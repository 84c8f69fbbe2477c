"""A failure on one rank ends every rank within bounded time (2 ranks on gloo under torchrun,
faults injected by tests/pretrain_with_faults.py)."""

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from pipeline import checkpoint
from pipeline.engine import free_port

from .conftest import REPO


def _launch(data_dir, run_dir, fault, *args, marker=None):
    """torchrun with 2 ranks: (exit code, output, seconds from the first line holding ``marker`` until
    the launcher exited)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(BERT_PIPELINE_FAULT=fault, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(REPO, "tests", "pretrain_with_faults.py"), "--data", data_dir, "--run-dir", str(run_dir),
           "--steps", "8", "--global-batch-size", "16", "--micro-batch-size", "8", "--log-every", "1",
           "--no-mlflow", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []  # (arrival time, line), read beside the wait so that a hang cannot block the test
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stdout))
    reader.start()
    try:
        code = proc.wait(timeout=240)  # start-up included
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(proc.pid)
        for p in [*launcher.children(recursive=True), launcher]:  # torchrun starts each rank in its own session
            p.kill()
        code = None
    ended = time.monotonic()
    reader.join(timeout=30)
    output = "".join(line for _, line in lines)
    assert code is not None, f"still running after 240 s:\n{output[-4000:]}"
    seen = [t for t, line in lines if marker and marker in line]
    return code, output, ended - seen[0] if seen else None


@pytest.mark.e2e
def test_a_rank_that_raises_ends_the_job_within_60_s(data_dir, tmp_path):
    code, output, seconds = _launch(data_dir, tmp_path, "raise-on-rank:1:3", marker="injected failure")
    assert code != 0, output[-4000:]
    assert "[rank1]: RuntimeError: rank 1: injected failure at step 3" in output, output[-4000:]
    assert seconds is not None and seconds < 60, (seconds, output[-4000:])
    assert "step 3/8" not in output  # rank 0 did not finish the step without rank 1
    assert "SIGKILL" not in output  # rank 0 ended by itself, not by the launcher's kill after 30 s


@pytest.mark.e2e
def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_a_checkpoint(data_dir, tmp_path):
    """ZeRO 0 in fp32 applies rank 1's NaN gradients everywhere: both ranks must stop at that step,
    with the same decision, although rank 0's own loss is finite."""
    ds_config = tmp_path / "zero0.json"
    ds_config.write_text('{"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", '
                         '"params": {"torch_adam": true}}}')
    code, output, _ = _launch(data_dir, tmp_path / "run", "nan-loss-on-rank:1:4",
                                    "--ds-config", str(ds_config), "--checkpoint-every", "2")
    assert code != 0, output[-4000:]
    where = "at step 4 and the update was applied (on rank 1 of 2): stopping every rank"
    assert f"error: rank 1: loss is nan {where}" in output, output[-4000:]
    assert f"error: rank 0: loss is non-finite {where}" in output, output[-4000:]
    assert "]: Traceback" not in output  # an agreed stop on both ranks, no crash (torchrun prints its own)
    assert checkpoint.complete_tags(str(tmp_path / "run" / "checkpoints")) == ["step00000002"]
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "step00000004")


@pytest.mark.e2e
def test_ranks_that_would_resume_from_different_checkpoints_stop_before_loading(data_dir, tmp_path, monkeypatch):
    """Each rank picks its checkpoint from what its node sees of the run dir: a node shown a stale
    state of a network file system (here rank 1, shown none) would start afresh beside rank 0's
    resume, and the two would train apart."""
    from pipeline import pretrain

    from .conftest import set_one_process_world

    zero0 = os.path.join(REPO, "ds_configs", "cpu_fp32_zero0_torch-adamw.json")  # its files load on 2 ranks as is
    with monkeypatch.context() as m:
        set_one_process_world(m)
        assert pretrain.main(["--data", data_dir, "--run-dir", str(tmp_path), "--steps", "2", "--global-batch-size",
                              "16", "--micro-batch-size", "8", "--ds-config", zero0, "--no-mlflow"]) == 0
    code, output, _ = _launch(data_dir, tmp_path, "no-checkpoints-on-rank:1", "--ds-config", zero0)
    assert code != 0, output[-3000:]
    message = "the ranks chose different checkpoints to resume from: rank(s) 1 of 2 did not choose rank 0's"
    assert f"{message} (rank 0: step00000002 here)" in output and f"{message} (rank 1: no checkpoint here)" in output
    assert "]: Traceback" not in output  # one line on each rank, no crash (torchrun prints its own)
    assert checkpoint.complete_tags(str(tmp_path / "checkpoints")) == ["step00000002"]  # nothing trained or saved


def test_the_process_group_timeout_is_a_positive_number_of_minutes_in_both_stages(capsys):
    from pipeline.engine import EngineConfigError
    from pipeline.finetuning.config import parse_args as finetune_args
    from pipeline.train_config import TrainConfig, parse_args

    assert parse_args(["--data", "d", "--dist-timeout-minutes", "0.5"]).engine.dist_timeout_minutes == 0.5
    assert parse_args(["--data", "d"]).engine.dist_timeout_minutes == 10  # DeepSpeed's default
    assert finetune_args(["--model", "m", "--data", "d.csv", "--dist-timeout-minutes", "30"]
                         ).engine.dist_timeout_minutes == 30
    with pytest.raises(EngineConfigError, match="--dist-timeout-minutes must be a finite number > 0, got 0"):
        TrainConfig.from_flat(data="d", dist_timeout_minutes=0)
    with pytest.raises(SystemExit):
        finetune_args(["--model", "m", "--data", "d.csv", "--dist-timeout-minutes", "-1"])
    assert "--dist-timeout-minutes must be a finite number > 0, got -1" in capsys.readouterr().err
