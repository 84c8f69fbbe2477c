"""Whether DeepSpeed's accelerator here computes fp16: a GPU, or a CPU where oneDNN does
(AVX512-FP16 or AMX). DeepSpeed's fp16 path (loss scaler, fp16 optimizers, checkpoints) is the
same Python on both, so tests/test_fp16.py runs it on such a CPU. A module of its own, not in
conftest.py: asking imports DeepSpeed, whose start-up line would reach the output of every
subprocess that imports a test module."""

import pytest
import torch
from deepspeed.accelerator import get_accelerator


def fp16_supported() -> bool:
    return torch.float16 in get_accelerator().supported_dtypes()


needs_fp16 = pytest.mark.skipif(not fp16_supported(), reason="DeepSpeed's accelerator here has no fp16")
