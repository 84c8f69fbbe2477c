"""fp16 for DeepSpeed's accelerator in the tests, on any CPU. DeepSpeed's CPU accelerator takes
fp16 only where oneDNN computes it (AVX512-FP16 or AMX), yet torch's own CPU kernels compute fp16
everywhere (on a CPU without those, at bf16's speed: both ~10x slower than fp32 in a matmul).
DeepSpeed's fp16 path (loss scaler, fp16 optimizers, checkpoints) is the same Python on a GPU and
a CPU, so the tests let the accelerator take fp16 on every CPU (``take_fp16_on_any_cpu``, done on
import here and by tests/pretrain_with_faults.py in a launched process): tests/test_fp16.py and the
other fp16 tests run on every machine, not only where the CPU has fp16 units. The patch holds
for the whole test process once a test module imports this one: no test expects DeepSpeed to
refuse fp16 on a CPU (one that did would have to undo it). A module of its
own, not in conftest.py: asking imports DeepSpeed, whose start-up line would reach the output of
every subprocess that imports a test module."""

import pytest
import torch
from deepspeed.accelerator import get_accelerator


def take_fp16_on_any_cpu() -> None:
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        type(accelerator).is_fp16_supported = lambda self: True


def fp16_supported() -> bool:
    return torch.float16 in get_accelerator().supported_dtypes()


take_fp16_on_any_cpu()
# Skips only on an accelerator other than the CPU that has no fp16.
needs_fp16 = pytest.mark.skipif(not fp16_supported(), reason="DeepSpeed's accelerator here has no fp16")
