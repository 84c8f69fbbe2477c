"""benchmarks/host_ops.py on CPU: it counts a step's aten operations by phase, and sees what
DeepSpeed's per-tensor overflow check costs the host (the reason the GPU bf16 files drop it)."""

import os
import re
import subprocess
import sys

from .conftest import REPO


def test_the_overflow_check_costs_operations_per_gradient_tensor(tmp_path):
    check_on = tmp_path / "check_on.json"
    check_on.write_text(open(os.path.join(REPO, "benchmarks", "results", "h200_2026-12-04",
                                          "gpu_base_bf16_zero1_fused-adam_check-on.json")).read())
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "host_ops.py"), "--model", "tiny",
                           "--steps", "2", "--ds-config", str(check_on),
                           "--ds-config", os.path.join(REPO, "ds_configs", "gpu_base_bf16_zero1_fused-adam.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(.+?)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)x$", line)
        if m:
            rows[m[1].strip()] = [int(v.replace(",", "")) for v in m.groups()[1:5]] + [float(m[6])]
    assert list(rows) == ["plain PyTorch loop", "check_on.json", "gpu_base_bf16_zero1_fused-adam.json"], proc.stdout
    plain, on, off = rows.values()
    assert plain[4] == 1.0 and on[0] == off[0]  # forward: the same model, the same ops
    # tiny BERT has 46 parameter tensors; the check runs about ten ops (some 40 aten calls) on each
    assert on[2] - off[2] > 20 * 46 and on[3] > off[3] > plain[3]
