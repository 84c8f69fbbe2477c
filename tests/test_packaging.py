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
    worker's requirements; the exceptions run only on the launcher: mlflow in tracking.py and
    mlflow_experiment.py (and only with MLflow on), packaging in worker_package.py (which pins the
    workers' requirements), grpc in local_runner.py (the local runner's driver; apache-beam's own
    dependency), pipeline in driver.py (the launcher's lock on --output, pipeline/run_lock.py)."""
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
                        ("tracking.py", "mlflow"), ("mlflow_experiment.py", "mlflow"), ("setup.py", "setuptools"),
                        ("worker_package.py", "packaging"), ("local_runner.py", "grpc"), ("driver.py", "pipeline")):
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
    # Flink and Spark run the workers in Docker containers unless told LOOPBACK: they got no code.
    for runner in (["--runner=FlinkRunner", "--flink_master=host:8081"],
                   ["--runner", "SparkRunner", "--spark_master_url", "spark://host:7077"],
                   ["--runner=PortableRunner", "--job_endpoint=host:8099", "--environment_type=DOCKER"]):
        assert worker_package.with_setup_file(runner)[-1].startswith("--setup_file="), runner
    # In this process: LOOPBACK given, or Beam's choice for a local master (no sdist to build then).
    for loopback in (["--runner=FlinkRunner", "--environment_type=LOOPBACK"], ["--runner=FlinkRunner"],
                     ["--runner=SparkRunner"], ["--runner=DataflowRunner", "--runner=FnApiRunner"]):
        assert worker_package.with_setup_file(loopback) == loopback
    given = ["--runner", "DataflowRunner", "--setup_file=/somewhere/setup.py"]
    assert worker_package.with_setup_file(given) == given
    args = worker_package.with_setup_file(["--runner=DataflowRunner", "--project=p"])
    assert args[:2] == ["--runner=DataflowRunner", "--project=p"] and args[2].startswith("--setup_file=")
    staged = os.path.dirname(args[2].split("=", 1)[1])
    assert {"setup.py", "requirements-worker.txt", "__init__.py", "transforms.py"} <= set(os.listdir(staged))


def test_a_stop_cancels_a_job_that_runs_elsewhere_not_a_local_one(caplog):
    """Dataflow's or a job server's job goes on without the launcher, which writes the manifest
    once it ends: a stop while waiting cancels it. No such service is reachable from the tests, so
    the job's result is stood in for by its PipelineResult interface."""
    from preprocessing import driver

    class RemoteJob:
        cancelled = False

        def wait_until_finish(self):
            raise KeyboardInterrupt  # what run_beam.py raises for Ctrl-C and SIGTERM

        def cancel(self):
            self.cancelled = True

        def job_id(self):
            return "2026-12-07_01_00_00-1"

    for args, cancels in ((["--runner=DataflowRunner"], True), (["--runner", "FlinkRunner"], True),
                          (["--runner=PortableRunner"], True), (["--runner=FnApiRunner"], False)):
        job = RemoteJob()
        with pytest.raises(KeyboardInterrupt):  # the stop goes on as before
            driver.wait_or_cancel(job, args)
        assert job.cancelled == cancels, args
    assert "cancelled the DataflowRunner job 2026-12-07_01_00_00-1" in caplog.text


def test_worker_requirements_are_pinned_to_what_an_index_has():
    """Extras and markers kept; a local build or a package not installed here keeps its range."""
    from preprocessing.worker_package import pinned

    beam = importlib.metadata.version("apache-beam")
    assert pinned("apache-beam[gcp]>=2.60") == f"apache-beam[gcp]=={beam}"
    jieba = importlib.metadata.version("jieba")
    assert pinned("jieba>=0.42; python_version < '3.13'") == f'jieba=={jieba}; python_version < "3.13"'
    assert pinned("torch>=2.4") == "torch>=2.4"  # 2.13.0+cpu: no index has it under that name
    assert pinned("no-such-package>=1") == "no-such-package>=1" and pinned("# a comment") == "# a comment"


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
    # Pinned to this machine's versions: workers an autoscaler adds later install the same ones.
    wanted = [re.split(r"[<>=!~]", r, maxsplit=1)[0] for r in _requirements(WORKER_REQUIREMENTS)]
    assert requires == [f"{name}=={importlib.metadata.version(name)}" for name in wanted]


def test_dataflow_refuses_paths_on_this_machine_before_anything_runs(tmp_path):
    """Its workers are other machines: a local --input failed on each after the job's retries, and a
    local --output let the job succeed into the workers' disks."""
    script = os.path.join(REPO, "preprocessing", "run_beam.py")
    for args, flag in [([], "--input"), (["--input", "gs://bucket/corpus/", "--output", "data"], "--output")]:
        proc = subprocess.run([sys.executable, script, *args, "--runner=DataflowRunner", "--project=p",
                               "--no-mlflow"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"error: {flag} " in proc.stderr and "which Dataflow's workers cannot see; use gs:// paths" in proc.stderr
        assert not os.path.exists(tmp_path / "data")


def _source_tree(dest) -> str:
    """The working tree's files that git tracks or would (not .venv, build/, runs/ ...), copied:
    a wheel built in place could pick up stale modules from an old build/ folder."""
    import shutil

    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return str(dest)


def _small_task(path, per_label: int = 120) -> str:
    """A balanced fresh/rotten csv (text,label) from the packaged Rotten Tomatoes reviews."""
    import csv

    rows = {"fresh": [], "rotten": []}
    with bz2.open(os.path.join(REPO, "pipeline", "sample_data", "rotten_tomatoes.csv.bz2"), "rt",
                  encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in rows and len(rows[row["category"]]) < per_label:
                rows[row["category"]].append(row["text"])
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((text, label) for label, texts in rows.items() for text in texts)
    return str(path)


@pytest.mark.e2e
def test_an_installed_wheel_runs_the_stages_from_any_directory(tmp_path):
    """pip install . (not editable) into a fresh venv: the console scripts preprocess, pretrain
    (with the bundled default DeepSpeed config, tracked in MLflow), export, fine-tune, embed and
    draw the pretraining run's report from a directory that is not this checkout, with the
    package imported from the venv, never from this checkout."""
    import sysconfig

    src = _source_tree(tmp_path / "src")
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(wheels), src], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = glob.glob(str(wheels / "*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, bin_dir = str(venv / "bin" / "python"), venv / "bin"
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The dependencies (torch, deepspeed, beam, ...) from this environment, after the venv's own
    # site-packages: a plain path line, so that folder's .pth files (this checkout's editable
    # install among them) are not run and `pipeline` can only come from the wheel.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "zz_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}

    def run(*cmd, timeout=600):
        proc = subprocess.run([str(c) for c in cmd], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    where = json.loads(run(python, "-c", "import json, pipeline, preprocessing; from pipeline import ds_config; "
                                         "print(json.dumps([pipeline.__file__, preprocessing.__file__, "
                                         "ds_config.DEFAULT_DS_CONFIG]))"))
    assert all(path.startswith(site) for path in where), where
    assert os.path.isfile(where[2])

    corpus = _small_text(work / "austen.txt")
    run(bin_dir / "bert-preprocess", "--input", corpus, "--output", "data", "--vocab-size", "400",
        "--max-seq-length", "64", "--dupe-factor", "1", "--num-shards", "1", "--no-mlflow")
    assert json.load(open(work / "data" / "manifest.json"))["num_examples"] > 0
    tiny = ["--data", "data", "--steps", "4", "--global-batch-size", "8", "--micro-batch-size", "8",
            "--eval-every", "4", "--eval-batches", "1", "--log-every", "1"]
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    run(bin_dir / "bert-pretrain", *tiny, "--run-dir", "run")
    run_id = json.load(open(work / "run" / "train_config.json"))["pretrain_run_id"]
    run(bin_dir / "bert-report", run_id, "--out", "curves.png")
    assert open(work / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    run(bin_dir / "bert-export", "run", "--out", "hf")
    assert (work / "hf" / "model.safetensors").is_file()
    # The docs' --ds-config ds_configs/NAME.json, from a directory that has no ds_configs/.
    assert not (work / "ds_configs").exists()
    run(python, "-c", "from pipeline.ds_config import load_ds_config; "
                      "load_ds_config('ds_configs/gpu_base_bf16_zero1_fused-adam.json')")
    run(bin_dir / "bert-finetune", "--model", "run", "--data", _small_task(work / "reviews.csv"), "--epochs", "1",
        "--max-seq-length", "64", "--output-dir", "finetuned", "--no-mlflow")
    assert "accuracy" in json.load(open(work / "finetuned" / "report.json"))["test"]
    run(bin_dir / "bert-embed", "--model", "finetuned/model", "--input", work / "reviews.csv", "--out",
        "embeddings.parquet", "--no-mlflow")
    assert (work / "embeddings.parquet").is_file()


def test_a_bundled_ds_config_is_found_by_its_documented_path_from_any_directory(tmp_path, monkeypatch):
    from pipeline import ds_config

    monkeypatch.chdir(tmp_path)
    name = "gpu_base_bf16_zero1_fused-adam.json"
    for given in (f"ds_configs/{name}", name):
        assert ds_config.resolve(given) == os.path.join(ds_config.DS_CONFIG_DIR, name)
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / name).write_text("{}")
    assert ds_config.resolve(f"ds_configs/{name}") == f"ds_configs/{name}"  # the user's own file first
    for other in ("elsewhere/" + name, "ds_configs/missing.json"):
        assert ds_config.resolve(other) == other  # and the error names what was given
    assert os.path.isfile(ds_config.DEFAULT_DS_CONFIG)


BENCHMARKS = sorted(f for f in os.listdir(os.path.join(REPO, "benchmarks"))
                    if f.endswith(".py") and "__main__" in open(os.path.join(REPO, "benchmarks", f)).read())


@pytest.mark.parametrize("script", BENCHMARKS)  # the scripts; the others are modules they import
def test_every_benchmark_runs_as_the_readme_runs_it(script):
    # `python benchmarks/X.py` from the repo root puts benchmarks/, not the root, first on sys.path
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
