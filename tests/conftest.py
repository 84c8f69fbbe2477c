import bz2
import os
import re
import subprocess
import sys

import pytest

from pipeline.engine import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO, "preprocessing", "sample_data")
WIKI_SAMPLE = os.path.join(SAMPLE_DIR, "enwiki-sample-pages-articles.xml.bz2")
TABLE_SAMPLE = os.path.join(SAMPLE_DIR, "enwiki-table-markup.xml.bz2")
AUSTEN = os.path.join(SAMPLE_DIR, "austen-novels.txt.bz2")


@pytest.fixture(scope="session")
def wiki_xml() -> bytes:
    """The real dump sample, decompressed (6.1 MB)."""
    with bz2.open(WIKI_SAMPLE, "rb") as f:
        return f.read()


def split_dump(xml: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(header up to the first <page>, the <page> elements, the closing tags)."""
    first = xml.find(b"<page>")
    first = xml.rfind(b"\n", 0, first) + 1
    pages = re.findall(rb"  <page>.*?</page>\n", xml, re.S)
    return xml[:first], pages, b"</mediawiki>\n"


@pytest.fixture(scope="session")
def multistream_dump(wiki_xml, tmp_path_factory) -> str:
    """The real sample re-compressed as a multistream dump (header stream, then
    pages in streams of 7), the layout of Wikipedia's *-multistream.xml.bz2."""
    header, pages, footer = split_dump(wiki_xml)
    parts = [header] + [b"".join(pages[i:i + 7]) for i in range(0, len(pages), 7)] + [footer]
    path = tmp_path_factory.mktemp("dumps") / "enwiki-multistream.xml.bz2"
    path.write_bytes(b"".join(bz2.compress(p) for p in parts))
    return str(path)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, served artifacts);
    yields its tracking URI and stops it by PID afterwards."""
    import subprocess

    uri, proc, log = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(autouse=True)
def _process_wide_settings():
    """What a stage run in the test's process sets for the whole process, put back after each test:
    MLflow's HTTP retries, bounded and then dropped once a call fails
    (preprocessing/mlflow_experiment.py), and a one-process world's RANK, WORLD_SIZE and
    MASTER_PORT (engine.ensure_distributed_env). Left set, the latter reached the SLURM jobs of a
    later test: two jobs side by side took the same inherited port, and a bare srun was a world of 1."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def start_mlflow_server(root):
    """``mlflow server`` in ``root``, answering: (its URI, its process, its log file)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # a group: its server process with it
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return uri, proc, log


@pytest.fixture(scope="session")
def preprocessed_sample(tmp_path_factory):
    """``preprocessed_sample(*flags)``: the data dir ``run_beam.py --input WIKI_SAMPLE *flags
    --no-mlflow`` writes, made once per session for each set of flags, so that modules which
    preprocess the dump sample alike share one run. The dir is shared: a test must not write
    into it (copy it first); the trainer's own cache of the shards (DATA/flat/) is the exception."""
    made: dict[tuple[str, ...], str] = {}

    def data_dir(*flags: str) -> str:
        if flags not in made:
            out = str(tmp_path_factory.mktemp("sample") / "data")
            proc = subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"),
                                   "--input", WIKI_SAMPLE, "--output", out, *flags, "--no-mlflow"],
                                  capture_output=True, text=True, cwd=REPO, timeout=600)
            assert proc.returncode == 0, f"run_beam.py {' '.join(flags)} failed:\n{proc.stderr[-3000:]}"
            made[flags] = out
        return made[flags]

    return data_dir


@pytest.fixture(scope="session")
def data_dir(preprocessed_sample) -> str:
    """A pretraining data dir from the dump sample (vocabulary 4,000, 2 shards), shared by the
    trainer, export and fault tests; a test must not write into it.

    $BERT_PIPELINE_TEST_DATA names one made beforehand by the same command (``run_beam.py --input
    WIKI_SAMPLE --output DIR --vocab-size 4000 --dupe-factor 2 --num-shards 2 --no-mlflow``), for a
    machine without Apache Beam, such as a GPU node that runs tests/test_gpu.py."""
    if os.environ.get(PREBUILT_DATA):
        from pipeline.data_dir import read_manifest

        read_manifest(os.environ[PREBUILT_DATA])  # a wrong path fails here, naming it
        return os.environ[PREBUILT_DATA]
    return preprocessed_sample("--vocab-size", "4000", "--dupe-factor", "2", "--num-shards", "2")


PREBUILT_DATA = "BERT_PIPELINE_TEST_DATA"


@pytest.fixture(scope="session")
def no_dropout(tmp_path_factory) -> str:
    """The tiny preset without dropout, as a --model file: two runs then differ only where their
    arithmetic does (each rank's dropout masks, reseeded on another world size, differ by 1e-2
    in the loss, as much as lost optimizer state)."""
    import json

    from pipeline.model import PRESETS

    path = tmp_path_factory.mktemp("model") / "tiny-no-dropout.json"
    path.write_text(json.dumps({**PRESETS["tiny"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    return str(path)



def set_one_process_world(mp: pytest.MonkeyPatch) -> None:
    """The environment torchrun gives a one-process world, for in-process trainers, on a port free
    now: a fixed one collides with whatever else holds it (another suite on the same machine)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        mp.setenv(key, value)


class SmallDisk:
    """A file system of its own (a tmpfs) that a test fills up: every later write then fails with
    ENOSPC, as on a full disk, from whichever library makes it."""

    FILLER = ".filler"

    def __init__(self, path: str):
        self.path = path

    def fill(self, leave: int = 0) -> None:
        """Fills it up, then gives back ``leave`` bytes (whole pages)."""
        with open(os.path.join(self.path, self.FILLER), "ab", buffering=0) as f:
            for size in (1 << 20, 4096, 1):  # down to the last byte: no page left for anyone
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError as err:
                    assert err.errno == 28, err
            if leave:
                f.truncate(max(0, f.tell() - leave))

    def free(self) -> None:
        os.remove(os.path.join(self.path, self.FILLER))

    def files(self) -> list[str]:
        """Every file and folder on it but the filler, relative to it."""
        found = []
        for root, dirs, names in os.walk(self.path):
            found += [os.path.relpath(os.path.join(root, n), self.path) for n in dirs + names if n != self.FILLER]
        return sorted(found)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs at tmp_path/disk (mounting needs root, as CI runs; elsewhere the test skips)."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): a full disk needs a file system of its own")
    try:
        yield SmallDisk(str(path))
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
