"""How a remote runner's workers get the code: preprocessing/setup.py, which installs
``preprocessing`` and requirements-worker.txt only (no torch, deepspeed or mlflow)."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# Flags by which the command line already says what the workers install or run.
_OWN_PACKAGING = ("--setup_file", "--extra_package", "--extra_packages", "--sdk_container_image",
                  "--worker_harness_container_image")


def _runner(beam_args: list[str]) -> str:
    for i, arg in enumerate(beam_args):
        if arg.startswith("--runner="):
            return arg.split("=", 1)[1]
        if arg == "--runner" and i + 1 < len(beam_args):
            return beam_args[i + 1]
    return ""


def with_setup_file(beam_args: list[str]) -> list[str]:
    """``beam_args`` plus ``--setup_file`` for the DataflowRunner, unless given a way already."""
    if "dataflow" not in _runner(beam_args).lower():
        return beam_args
    if any(a == flag or a.startswith(flag + "=") for a in beam_args for flag in _OWN_PACKAGING):
        return beam_args
    return [*beam_args, f"--setup_file={stage_setup_dir()}/setup.py"]


def stage_setup_dir() -> str:
    """A temporary copy of the package's modules, setup.py and requirements-worker.txt:
    Beam builds its sdist where setup.py lies, which may be a read-only site-packages."""
    staged = tempfile.mkdtemp(prefix="bert-preprocessing-worker-")
    atexit.register(shutil.rmtree, staged, ignore_errors=True)
    for path in [*glob.glob(os.path.join(HERE, "*.py")), os.path.join(HERE, "requirements-worker.txt")]:
        shutil.copy(path, staged)
    return staged
