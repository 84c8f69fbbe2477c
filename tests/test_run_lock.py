"""One run at a time in a run dir, and the same run dir on every rank (pipeline/run_lock.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import checkpoint, pretrain, run_lock
from pipeline.engine import free_port

from .conftest import REPO, set_one_process_world


def _args(data_dir, run_dir):
    return ["--data", data_dir, "--run-dir", str(run_dir), "--steps", "2", "--global-batch-size", "16",
            "--micro-batch-size", "8", "--log-every", "100", "--no-mlflow"]


def test_the_lock_is_exclusive_and_ends_with_its_holder(tmp_path):
    held = run_lock.acquire(str(tmp_path))
    with pytest.raises(run_lock.RunDirError, match=f"--run-dir {tmp_path} is in use by another run "
                                                   rf"\(pid {os.getpid()} on "):
        run_lock.acquire(str(tmp_path))  # a second open file is a second holder, even in one process
    held.release()
    again = run_lock.acquire(str(tmp_path))
    assert again.token != held.token and run_lock._read(os.path.join(tmp_path, ".lock"))["token"] == again.token
    again.release()
    with pytest.raises(run_lock.RunDirError, match="a file, not a folder"):
        run_lock.acquire(os.path.join(tmp_path, ".lock"))


def test_a_second_run_into_a_busy_run_dir_is_refused_and_a_killed_holder_frees_it(data_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    set_one_process_world(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the holder names its job
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pipeline.run_lock import acquire; "
                               f"lock = acquire({str(tmp_path)!r}); print('held', flush=True); sys.stdin.read()"],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert pretrain.main(_args(data_dir, tmp_path)) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, errors
        assert f"--run-dir {tmp_path} is in use by another run (pid {holder.pid} on " in errors[0]
        assert "SLURM job 4242" in errors[0]
        assert not os.path.exists(tmp_path / "checkpoints")  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no release, the kernel drops the lock
        holder.wait()
    assert pretrain.main(_args(data_dir, tmp_path)) == 0
    assert checkpoint.find_latest(str(tmp_path / "checkpoints")) is not None


@pytest.mark.e2e
def test_ranks_that_see_different_run_dirs_stop_before_loading_anything(data_dir, tmp_path):
    """Rank 1 is given another folder, as a node with the run dir on its local disk would see one:
    both ranks exit 2 with one line, before either resumes or writes a checkpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    ranks = []
    for rank, run_dir in enumerate([tmp_path / "shared", tmp_path / "local"]):
        ranks.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "pipeline", "pretrain.py"), *_args(data_dir, run_dir)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    outputs = [proc.communicate(timeout=240)[1] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [2, 2], outputs
    assert time.monotonic() - started < 200  # start-up included (a first build of DeepSpeed's CPU op)
    for rank, err in enumerate(outputs):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err[-3000:]
        assert "is not the same folder on every rank: rank(s) 1 of 2 do not see the .lock rank 0 wrote" in lines[0]
        assert f"this is rank {rank} on " in lines[0]
    assert not os.path.exists(tmp_path / "shared" / "checkpoints")
    assert not os.path.exists(tmp_path / "local" / "checkpoints")


@pytest.mark.e2e
def test_a_refused_rank_0_ends_its_peers_at_once_not_after_the_launchers_kill_timeout(data_dir, tmp_path):
    """Rank 0 is refused by the held run dir and exits 2; rank 1, waiting for it in the rendezvous,
    gets the launcher's SIGTERM. It ignored it (a Python handler, never run inside the C++ wait)
    until torchrun's SIGKILL 30 s later (srun: KillWait, and the job ended 137); now it ends at once."""
    import threading

    held = run_lock.acquire(str(tmp_path))  # another job's rank 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "RANK", "LOCAL_RANK",
                                                                     "WORLD_SIZE", "MASTER_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         os.path.join(REPO, "pipeline", "pretrain.py"), *_args(data_dir, tmp_path)],
        env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, refused = [], []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "is in use by another run" in line and not refused:
                refused.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=240)
        reader.join(timeout=10)
    finally:
        proc.kill()
        held.release()
    output = "".join(lines)
    assert proc.returncode != 0 and refused, output[-3000:]
    assert time.monotonic() - refused[0] < 15, output[-3000:]  # 30 s and more before
    assert "SIGKILL" not in output, output[-3000:]
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("sig, code, entered", [("SIGTERM", 128 + signal.SIGTERM, False), ("SIGUSR1", 0, True)])
def test_a_sigterm_in_start_up_ends_the_rank_at_the_rendezvous_a_usr1_waits_for_the_first_step(sig, code, entered):
    """The peers of a rank that failed in start-up get the launcher's SIGTERM while they still load:
    kept for the first step, they then waited in the rendezvous for the failed rank until SIGKILL."""
    script = ("import os, signal; from pipeline.engine import StopFlag\n"
              "stop = StopFlag('checkpointing at the end of this step'); stop.install()\n"
              f"os.kill(os.getpid(), signal.{sig})\n"
              "with stop.killable(): print('entered the rendezvous', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert ("entered the rendezvous" in proc.stdout) == entered
    assert ("error: stopped by SIGTERM before the ranks met: nothing to checkpoint" in proc.stderr) != entered


def test_a_run_whose_lock_another_run_took_stops_before_marking_its_next_checkpoint(data_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    """Where the file system grants locks per node (NFS mounted nolock), a second job on another
    node acquires the run dir too and writes its token: the first stops at its next save, without
    vouching for a tag the two may both be writing."""
    import json

    from pipeline.train_config import parse_args
    from pipeline.trainer import Trainer

    set_one_process_world(monkeypatch)
    lock = run_lock.acquire(str(tmp_path))
    config = parse_args([*_args(data_dir, tmp_path), "--steps", "4", "--checkpoint-every", "2"])
    trainer = Trainer(config)
    other = {"token": lock.token + 1, "host": "node2", "pid": 4242, "slurm_job_id": "77", "started": "then"}
    train_step = trainer.train_step

    def another_run_takes_the_lock():
        metrics = train_step()
        if trainer.step == 3:  # step 3 computed, after this run's step-2 checkpoint
            (tmp_path / ".lock").write_text(json.dumps(other))
        return metrics

    monkeypatch.setattr(trainer, "train_step", another_run_takes_the_lock)
    assert pretrain.train(config, trainer) == 1
    lock.release()
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(  # one line, no traceback
        f"error: rank 0: --run-dir {tmp_path}: another run took {tmp_path}/.lock while this one was running (pid "
        "4242 on node2, SLURM job 77, started then): two runs are writing this folder"), err[-5:]
    assert "without marking step00000004 complete" in err[-1] and "Traceback" not in "\n".join(err)
    checkpoints = str(tmp_path / "checkpoints")
    assert checkpoint.complete_tags(checkpoints) == [checkpoint.tag_for(2)]
    assert checkpoint.find_latest(checkpoints) == checkpoint.tag_for(2)


def test_only_another_runs_token_stops_a_run_a_lock_file_read_badly_is_warned_of(tmp_path, caplog):
    lock = run_lock.acquire(str(tmp_path))
    run_lock.check_still_held(str(tmp_path), lock.token, "step00000002")  # its own token: goes on
    (tmp_path / ".lock").write_text('{"tok')  # half written, or a read failing for a moment (NFS)
    run_lock.check_still_held(str(tmp_path), lock.token, "step00000002")
    assert "could not read this run's token back before marking step00000002 complete" in caplog.text
    (tmp_path / ".lock").write_text('{"token": %d}' % (lock.token + 1))
    with pytest.raises(run_lock.RunDirError, match="another run took"):
        run_lock.check_still_held(str(tmp_path), lock.token, "step00000002")
    lock.release()


def test_abandoning_removes_the_folders_acquire_made_and_only_those(tmp_path, monkeypatch):
    kept = tmp_path / "kept"
    kept.mkdir()
    lock = run_lock.acquire(str(kept / "new" / "parent" / "run"))
    lock.abandon()  # a refused run: before, new/parent/ stayed behind
    assert os.listdir(kept) == []
    monkeypatch.chdir(kept)  # a relative run dir; the folder it is in stays, though empty
    run_lock.acquire(os.path.join("a", "b")).abandon()
    assert kept.is_dir() and os.listdir(kept) == []
    dotted = run_lock.acquire(os.path.join("new", "..", "run"))  # makedirs makes new/ and run/ both
    assert sorted(os.listdir(kept)) == ["new", "run"]
    dotted.abandon()
    assert os.listdir(kept) == []
    held = run_lock.acquire(str(kept / "c" / "d"))
    (kept / "c" / "other").write_text("written meanwhile")
    held.abandon()
    assert sorted(os.listdir(kept / "c")) == ["other"]
