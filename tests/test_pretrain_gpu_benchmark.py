"""benchmarks/pretrain_gpu.py on CPU: rows written as measured, from synthetic and real data, and a
configuration killed by its timeout or left out by the budget is a row too."""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "pretrain_gpu.py")


def bench(tmp_path, *args):
    # What the GPU box lacks: the benchmark must not import Beam or MLflow.
    shadow = tmp_path / "shadow"
    for name in ("apache_beam", "mlflow"):
        (shadow / name).mkdir(parents=True, exist_ok=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "rows.jsonl"), *args], env=env,
                          capture_output=True, text=True, timeout=1300)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    return proc, rows


def test_cpu_smoke_run_writes_a_row_per_configuration(data_dir, tmp_path):
    # data_dir: the real data dir of conftest.py (seq 128, vocabulary 4,000)
    # a loaded CPU is slow to start a worker: generous --timeout and --budget
    proc, rows = bench(tmp_path, "--only", "tiny-128-fp32", "--data", data_dir, "--micro-batches", "4",
                       "--accumulation", "2", "--steps", "3", "--warmup", "1", "--peak-tflops", "1",
                       "--profile", str(tmp_path / "prof"), "--timeout", "600", "--budget", "1200")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # --profile traces steps after the timed ones: a table per row, no device share on a CPU
    tables = sorted(os.listdir(tmp_path / "prof"))
    assert tables == [f"tiny-128-fp32-4x2-{data}-cpu_fp32_zero2_torch-adamw.txt" for data in ("real", "synthetic")]
    for name in tables:
        head = (tmp_path / "prof" / name).read_text()
        assert "5 steps traced" in head and " aten ops a step" in head and "aten::mm" in head, head[:2000]
    assert [(r["config"], r["data"], r["status"], r["precision"]) for r in rows] == [
        ("tiny-128-fp32", "synthetic", "ok", "fp32"), ("tiny-128-fp32", "real", "ok", "fp32")]
    synthetic, real = rows
    assert synthetic["vocab"] == 32000 and real["vocab"] == 4000  # the manifest's vocabulary
    assert synthetic["mean_tokens"] == 128 and 10 < real["mean_tokens"] <= 128  # 89% are full length
    for r in rows:
        assert r["timed_steps"] == 2 and r["seq_per_s"] > 0 and r["wall_s"] > r["seconds"] > 0
        assert r["accumulation"] == 2 and r["seq_per_s"] * r["seconds"] == pytest.approx(2 * 2 * 4)  # steps x 2 x 4
        assert r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * r["mean_tokens"])
        # tiny BERT: the dense head's projection of every token dominates the model count
        assert 0 < r["mfu_executed"] < r["mfu_model"] < 1 and r["gflop_executed"] < r["gflop_model"]
        assert r["mfu_model"] == pytest.approx(r["seq_per_s"] * r["gflop_model"] / 1e3)
        assert r["skipped_steps"] is None and r["peak_memory_gib"] is None and r["device"] == "cpu"
        assert r["device_busy"] is None
    table = [line.split()[:5] for line in proc.stdout.splitlines() if line.startswith("tiny-128-fp32")]
    assert table == [["tiny-128-fp32", "4", "2", "synthetic", "ok"], ["tiny-128-fp32", "4", "2", "real", "ok"]]

    # A configuration killed by its timeout is a row after the earlier ones; one the budget
    # leaves no time for is a skipped row; a missing ds config is an error row at once.
    proc, rows = bench(tmp_path, "--only", "tiny-128-fp32", "--only", "mini-128-fp32", "--timeout", "1",
                       "--budget", "2")
    assert proc.returncode == 1
    assert [(r["config"], r["status"]) for r in rows[2:]] == [("tiny-128-fp32", "timeout"),
                                                              ("mini-128-fp32", "skipped")]
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[2]["message"] == "killed after 1 s" and rows[2]["seq_per_s"] is None
    # a config DeepSpeed refuses (a worker's error): a row of its own, and the run goes on
    (tmp_path / "unknown.json").write_text('{"optimizer": {"type": "NoSuchOptimizer", "params": {}}}')
    proc, rows = bench(tmp_path, "--only", "tiny-128-fp32", "--ds-config", str(tmp_path / "unknown.json"))
    assert proc.returncode == 1 and len(rows) == 5
    assert rows[-1]["status"] == "error" and rows[-1]["message"], rows[-1]
    # one that is not there, or not JSON: refused before any row's minutes
    for name, text in (("missing.json", None), ("broken.json", '{"optimizer": ')):
        if text:
            (tmp_path / name).write_text(text)
        proc, rows = bench(tmp_path, "--only", "tiny-128-fp32", "--ds-config", str(tmp_path / name))
        assert proc.returncode == 2 and len(rows) == 5 and f"{name}: not a DeepSpeed config (" in proc.stderr


def test_a_crashed_configuration_is_an_oom_or_error_row():
    from benchmarks.pretrain_gpu import failure

    oom = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB.\n"
           "[rank0]:[W1203 torch/csrc/distributed] Warning: process group was not destroyed\n")
    assert failure(1, oom) == {"status": "oom", "message": "torch.OutOfMemoryError: CUDA out of memory. "
                                                           "Tried to allocate 3.00 GiB."}
    assert failure(1, "Traceback ...\nValueError: 10 rows are fewer than world_size 1 × batch size 64\n") == {
        "status": "error", "message": "ValueError: 10 rows are fewer than world_size 1 × batch size 64"}
    assert failure(-9, "") == {"status": "error", "message": "exit code -9"}


def test_a_mistyped_configuration_is_a_usage_error_not_an_error_row(tmp_path, capsys):
    from benchmarks import pretrain_gpu

    out = tmp_path / "rows.jsonl"
    for name in ("base-128-bf17", "bert-128-bf16", "base-bf16"):
        with pytest.raises(SystemExit) as exit_info:
            pretrain_gpu.main(["--only", name, "--out", str(out)])
        assert exit_info.value.code == 2 and f"argument --only: '{name}': MODEL-SEQ-PRECISION" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_gpu_checks_script_refuses_a_machine_without_a_gpu_before_writing_anything(tmp_path):
    out = tmp_path / "checks"
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_checks.sh"), str(out)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip() == (f"gpu_checks.sh: error: {sys.executable} sees no CUDA GPU "
                                   "(torch.cuda.is_available() is False)")
    # A Python without torch is named as such, not as a machine without a GPU.
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_checks.sh"), str(out)],
                          env={**os.environ, "PYTHON": "/bin/false"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "/bin/false cannot import torch" in proc.stderr and not out.exists()
