"""How a remote runner's workers get the code: preprocessing/setup.py, which installs
``preprocessing`` and requirements-worker.txt only (no torch, deepspeed or mlflow)."""

from __future__ import annotations

import atexit
import glob
import importlib.metadata
import os
import re
import shutil
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = "requirements-worker.txt"
# Flags by which the command line already says what the workers install or run.
_OWN_PACKAGING = ("--setup_file", "--extra_package", "--extra_packages", "--sdk_container_image",
                  "--worker_harness_container_image")


def flag_value(beam_args: list[str], flag: str) -> str:
    for i, arg in enumerate(beam_args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(beam_args):
            return beam_args[i + 1]
    return ""


def remote_workers(beam_args: list[str]) -> bool:
    """Whether the runner's workers are other machines or containers, which must be given the code:
    Dataflow; Flink, Spark and the PortableRunner, whose workers run in Docker containers by default
    (LOOPBACK: in this process)."""
    runner = flag_value(beam_args, "--runner").lower()
    if "dataflow" in runner:
        return True
    return (any(name in runner for name in ("flink", "spark", "portable"))
            and flag_value(beam_args, "--environment_type").upper() != "LOOPBACK")


def with_setup_file(beam_args: list[str]) -> list[str]:
    """``beam_args`` plus ``--setup_file`` for runners with remote workers, unless given a way already
    (Flink and Spark workers got nothing before, and failed on their first import)."""
    if not remote_workers(beam_args):
        return beam_args
    if any(a == flag or a.startswith(flag + "=") for a in beam_args for flag in _OWN_PACKAGING):
        return beam_args
    return [*beam_args, f"--setup_file={stage_setup_dir()}/setup.py"]


def stage_setup_dir() -> str:
    """A temporary copy of the package's modules, setup.py and requirements-worker.txt:
    Beam builds its sdist where setup.py lies, which may be a read-only site-packages. The
    requirements are pinned to this machine's versions, so that every worker, including those an
    autoscaler adds later, makes the same output as this machine would."""
    staged = tempfile.mkdtemp(prefix="bert-preprocessing-worker-")
    atexit.register(shutil.rmtree, staged, ignore_errors=True)
    for path in glob.glob(os.path.join(HERE, "*.py")):
        shutil.copy(path, staged)
    with open(os.path.join(HERE, REQUIREMENTS), encoding="utf-8") as f:
        lines = [pinned(line) for line in f.read().splitlines()]
    with open(os.path.join(staged, REQUIREMENTS), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return staged


def pinned(line: str) -> str:
    """A requirement line with ``==`` the installed version; unchanged if none is installed here or
    the installed one is a local build ("+cpu"), which a package index would not have."""
    requirement = line.split("#", 1)[0].strip()
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    if not name:
        return line
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return line
    return line if "+" in version else f"{name}=={version}"
