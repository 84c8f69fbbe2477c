"""benchmarks/host_ops.py on CPU: it counts a step's aten operations by phase, sees what
DeepSpeed's per-tensor overflow check costs the host (the reason the GPU bf16 files drop it), and
what gradient accumulation spreads over the micro-batches."""

import os
import re
import subprocess
import sys

from .conftest import REPO


def test_the_overflow_check_costs_operations_per_gradient_tensor(tmp_path):
    check_on = tmp_path / "check_on.json"
    check_on.write_text(open(os.path.join(REPO, "benchmarks", "results", "h200_2026-12-04",
                                          "gpu_base_bf16_zero1_fused-adam_check-on.json")).read())
    rows = counts("--ds-config", str(check_on),
                  "--ds-config", os.path.join(REPO, "ds_configs", "gpu_base_bf16_zero1_fused-adam.json"))
    assert list(rows) == ["plain PyTorch loop", "check_on.json", "gpu_base_bf16_zero1_fused-adam.json"], rows
    plain, on, off = rows.values()
    assert plain[4] == 1.0 and on[0] == off[0]  # forward: the same model, the same ops
    # tiny BERT has 46 parameter tensors; the check runs about ten ops (some 40 aten calls) on each
    assert on[2] - off[2] > 20 * 46 and on[3] > off[3] > plain[3]


def counts(*args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "host_ops.py"), "--model", "tiny",
                           "--steps", "2", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(.+?)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)x$", line)
        if m:
            rows[m[1].strip()] = [int(v.replace(",", "")) for v in m.groups()[1:5]] + [float(m[6])]
    return rows


def test_accumulation_spreads_the_optimizer_steps_operations_over_the_micro_batches():
    shipped = os.path.join(REPO, "ds_configs", "gpu_base_bf16_zero1_fused-adam.json")
    one, four = (counts("--ds-config", shipped, "--accumulation", n)["gpu_base_bf16_zero1_fused-adam.json"]
                 for n in ("1", "4"))
    assert four[0] == one[0]  # each micro-batch's forward is the same
    # DeepSpeed's step, and the gradient bucketing in its backward hooks, run at the boundary only
    assert four[2] < one[2] / 3 and four[1] < 0.8 * one[1] and four[3] < 0.7 * one[3]
