"""Where code reads a tensor's value on the host, found on the CPU.

On a GPU, ``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()`` or ``.cpu()`` of a device tensor
makes the host wait until every kernel queued before it has run, so the GPU idles while the next
kernels launch. CUDA's sync debug mode finds these only on a GPU (tests/test_gpu.py); a torch
function mode sees the same calls on the CPU, with the file and line that made them.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode

# ``.numpy()`` is not here: on a device tensor it raises rather than waits, so code may use it to
# read a tensor it knows is on the host.
HOST_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu}


class HostReads(TorchFunctionMode):
    """``with HostReads(root) as reads:`` … ``reads.sites``: "path:line" of each read, the path
    relative to ``root`` (site-packages paths keep the package's own folder first)."""

    def __init__(self, root: str):
        super().__init__()
        self.root, self.sites = root, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(os.path.dirname(torch.__file__)):
                frame = frame.f_back  # past torch's own wrappers, to the code that asked
            if frame is not None:
                self.sites.append(f"{self._where(frame.f_code.co_filename)}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))

    def _where(self, path: str) -> str:
        if "site-packages" + os.sep in path:
            return path.split("site-packages" + os.sep, 1)[1]
        return os.path.relpath(path, self.root)
