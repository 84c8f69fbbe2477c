"""Packaging: what a Beam worker installs (preprocessing alone: no torch, deepspeed or mlflow),
and an installed wheel that runs the stages from any directory, with no checkout."""

import ast
import bz2
import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib

import pytest

from .conftest import AUSTEN, REPO

TRAINING_STACK = ("torch", "deepspeed", "mlflow")
WORKER_REQUIREMENTS = os.path.join(REPO, "preprocessing", "requirements-worker.txt")


def _requirements(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _small_text(path, paragraphs: int = 1500) -> str:
    """The first paragraphs of Jane Austen's novels, as a plain-text input."""
    with bz2.open(AUSTEN, "rt", encoding="utf-8") as f:
        text = f.read(2_000_000)
    path.write_text("\n\n".join(text.split("\n\n")[:paragraphs]) + "\n", encoding="utf-8")
    return str(path)


def test_worker_requirements_leave_out_the_training_stack_and_match_pyproject():
    worker = _requirements(WORKER_REQUIREMENTS)
    assert not {_name(r) for r in worker} & set(TRAINING_STACK)
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    # Same bounds as the full install: one is never looser or stricter than the other.
    assert set(worker) <= set(dependencies), set(worker) - set(dependencies)


def test_worker_requirements_cover_what_preprocessing_imports():
    """Every third-party import in preprocessing/, at the top or inside a function, is in the
    worker's requirements; the one exception is mlflow in tracking.py, which only the launcher
    runs (and only with MLflow on)."""
    covered = {_name(r) for r in _requirements(WORKER_REQUIREMENTS)}
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for path in sorted(glob.glob(os.path.join(REPO, "preprocessing", "*.py"))):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                name = os.path.basename(path)
                if top in sys.stdlib_module_names or top == "preprocessing" or (name, top) in (
                        ("tracking.py", "mlflow"), ("setup.py", "setuptools")):
                    continue
                if not {_name(d) for d in distributions.get(top, [top])} & covered:
                    missing.append(f"{name}: {module}")
    assert not missing, missing


# Runs in a fresh interpreter where torch, deepspeed and mlflow cannot be imported (None in
# sys.modules: import raises ImportError and importlib.util.find_spec says "not installed", as
# on a worker without them), imports every preprocessing module, then runs the pipeline.
_WITHOUT_TRAINING_STACK = """
import importlib, pkgutil, sys
BLOCKED = {blocked!r}
for name in BLOCKED:
    sys.modules[name] = None
import preprocessing
for module in pkgutil.iter_modules(preprocessing.__path__):
    if module.name != "setup":
        importlib.import_module("preprocessing." + module.name)
from preprocessing import run_beam
code = run_beam.main({argv!r})
assert all(sys.modules.get(name) is None for name in BLOCKED), "a blocked module was imported"
sys.exit(code)
"""


@pytest.mark.e2e
def test_preprocessing_runs_without_torch_deepspeed_and_mlflow(tmp_path):
    corpus = _small_text(tmp_path / "austen.txt")
    out = tmp_path / "data"
    argv = ["--input", corpus, "--output", str(out), "--vocab-size", "400", "--max-seq-length", "64",
            "--dupe-factor", "1", "--num-shards", "1", "--no-mlflow"]
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRAINING_STACK.format(blocked=TRAINING_STACK, argv=argv)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["num_examples"] > 0
    # The tokenizer files (transformers' save_pretrained, run on a worker) were written too.
    assert {"spm.model", "tokenizer.json"} <= set(os.listdir(out / "tokenizer"))


def test_dataflow_gets_the_preprocessing_only_setup_file():
    from preprocessing import worker_package

    assert worker_package.with_setup_file(["--runner=FnApiRunner"]) == ["--runner=FnApiRunner"]
    given = ["--runner", "DataflowRunner", "--setup_file=/somewhere/setup.py"]
    assert worker_package.with_setup_file(given) == given
    args = worker_package.with_setup_file(["--runner=DataflowRunner", "--project=p"])
    assert args[:2] == ["--runner=DataflowRunner", "--project=p"] and args[2].startswith("--setup_file=")
    staged = os.path.dirname(args[2].split("=", 1)[1])
    assert {"setup.py", "requirements-worker.txt", "__init__.py", "transforms.py"} <= set(os.listdir(staged))


def test_worker_sdist_holds_preprocessing_and_the_worker_requirements_only(tmp_path):
    """What Beam stages for --setup_file: the sdist of setup.py's folder (run_beam stages a copy)."""
    from preprocessing import worker_package

    staged = worker_package.stage_setup_dir()
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=staged,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = glob.glob(str(tmp_path / "*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
        pkg_info = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        metadata = tar.extractfile(pkg_info).read().decode()
    assert {"transforms.py", "vocab.py", "requirements-worker.txt"} <= names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == _requirements(WORKER_REQUIREMENTS)
