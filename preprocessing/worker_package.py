"""How a remote runner's workers get the code: preprocessing/setup.py, which installs
``preprocessing`` and requirements-worker.txt only (no torch, deepspeed or mlflow)."""

from __future__ import annotations

import atexit
import glob
import importlib.metadata
import os
import shutil
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = "requirements-worker.txt"
# Flags by which the command line already says what the workers install or run.
_OWN_PACKAGING = ("--setup_file", "--extra_package", "--extra_packages", "--sdk_container_image",
                  "--worker_harness_container_image")


def flag_value(beam_args: list[str], flag: str) -> str:
    """The flag's value as Beam reads it (the last one given), or ""."""
    value = ""
    for i, arg in enumerate(beam_args):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(beam_args):
            value = beam_args[i + 1]
    return value


# Runners whose jobs a job server runs (Dataflow's is the service itself)
JOB_SERVER_RUNNERS = ("flink", "spark", "portable", "prism")


def job_runs_elsewhere(beam_args: list[str]) -> bool:
    """Whether the job is run by a service or job server that goes on without this process
    (Dataflow, Flink, Spark, Prism, the PortableRunner), rather than in it (the local runners)."""
    runner = flag_value(beam_args, "--runner").lower()
    return "dataflow" in runner or any(name in runner for name in JOB_SERVER_RUNNERS)


def remote_workers(beam_args: list[str]) -> bool:
    """Whether the runner's workers are other machines or containers, which must be given the code:
    Dataflow; Flink, Spark, Prism and the PortableRunner unless their workers run in this process
    (LOOPBACK: given, or Beam's choice for a local Flink or Spark master)."""
    runner = flag_value(beam_args, "--runner").lower()
    if "dataflow" in runner:
        return True
    if not any(name in runner for name in JOB_SERVER_RUNNERS):
        return False
    environment = flag_value(beam_args, "--environment_type").upper()
    if environment:
        return environment != "LOOPBACK"
    if "flink" in runner:  # flink_runner.py: LOOPBACK for the [auto] and [local] masters
        return flag_value(beam_args, "--flink_master") not in ("", "[auto]", "[local]")
    if "spark" in runner:  # spark_runner.py: LOOPBACK for a local[...] master
        return not (flag_value(beam_args, "--spark_master_url") or "local").startswith("local")
    return "portable" in runner  # Prism's default environment is in this process


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
    """A requirement line with its version range replaced by ``==`` the installed version (extras
    and markers kept); unchanged for a comment, a package not installed here, or one a package
    index would not have: a local build ("+cpu"), a development version, an install from a
    folder, a URL or a VCS (editable ones too), which workers could not install."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    text = line.split("#", 1)[0].strip()
    if not text:
        return line
    requirement = Requirement(text)
    try:
        distribution = importlib.metadata.distribution(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return line
    version = Version(distribution.version)
    if requirement.url or version.local or version.is_devrelease or distribution.read_text("direct_url.json"):
        return line
    requirement.specifier = SpecifierSet(f"=={version}")
    return str(requirement)
