"""``python preprocessing/run_beam.py`` end to end on the real Wikipedia dump sample."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from .conftest import REPO, WIKI_SAMPLE

pytestmark = pytest.mark.e2e

SCRIPT = os.path.join(REPO, "preprocessing", "run_beam.py")
# Small enough to run three times in CI, large enough to exercise every step.
COMMON = ["--input", WIKI_SAMPLE, "--vocab-size", "8000", "--dupe-factor", "2", "--num-shards", "3"]
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def run_beam(args, env=None, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run_beam failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-5000:]}")
    return proc


def shard_digests(output):
    shards = sorted(os.listdir(os.path.join(output, "shards")))
    return {name: hashlib.sha256(open(os.path.join(output, "shards", name), "rb").read()).hexdigest()
            for name in shards}


@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory, mlflow_server):
    output = str(tmp_path_factory.mktemp("one") / "data")
    proc = run_beam([*COMMON, "--output", output], env={"MLFLOW_TRACKING_URI": mlflow_server})
    return output, proc


def test_output_layout_manifest_and_summary(one_worker_run):
    output, proc = one_worker_run
    manifest = json.load(open(os.path.join(output, "manifest.json")))
    assert f"Wrote {manifest['num_examples']:,} examples to {output}" in proc.stdout
    assert sorted(os.listdir(os.path.join(output, "shards"))) == [
        f"part-{i:05d}-of-00003.parquet" for i in range(3)]
    rows = [s["rows"] for s in manifest["shards"]]
    assert max(rows) - min(rows) <= 1 and sum(rows) == manifest["num_examples"]
    counters = manifest["counters"]
    assert counters["pages-read"] == 206
    # 100 redirects (one of them in another namespace), 8 disambiguation pages, 98 articles:
    # every page is either a document or counted under its skip reason.
    assert counters["skipped-redirects"] == 99
    assert counters["skipped-non-article-namespace"] == 1
    assert counters["skipped-disambiguation"] == 8
    assert counters["documents-read"] == 98
    assert counters["instances"] == manifest["num_examples"]
    assert manifest["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert manifest["max_seq_length"] == 128 and manifest["dupe_factor"] == 2
    assert len(manifest["tokenizer"]["fingerprint"]) == 64 and len(manifest["input"]["fingerprint"]) == 64
    for shard in manifest["shards"]:
        assert pq.ParquetFile(os.path.join(output, shard["path"])).metadata.num_rows == shard["rows"]


def test_two_workers_and_a_rerun_give_identical_shards(one_worker_run, tmp_path):
    output, _ = one_worker_run
    two = str(tmp_path / "two")
    proc = run_beam([*COMMON, "--output", two, "--no-mlflow", *TWO_WORKERS])
    assert shard_digests(two) == shard_digests(output)
    # The workers log as the driver does: the preprocessing's lines, not Beam's start-up and
    # shutdown (about 20 lines a worker in Python's default format, relayed to the driver too).
    workers = [line for line in proc.stderr.splitlines() if "preprocessing.transforms: wrote " in line]
    assert len(workers) == 3 and all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO ", line) for line in workers), proc.stderr
    assert not re.search(r"^(INFO|WARNING):|Worker: severity|sdk_worker|apitools", proc.stderr, re.M), proc.stderr
    # A rerun into the same directory replaces the output with identical shards.
    run_beam([*COMMON, "--output", two, "--no-mlflow"])
    assert shard_digests(two) == shard_digests(output)
    spm = [open(os.path.join(d, "tokenizer", "spm.model"), "rb").read() for d in (output, two)]
    assert spm[0] == spm[1]


def test_many_tasks_buckets_and_shards_are_identical_for_any_worker_count(multistream_dump, tmp_path):
    """~26 read tasks of 64 KiB, 98 documents in buckets of 4, 5 shards cut across tasks."""
    args = ["--input", multistream_dump, "--vocab-size", "4000", "--dupe-factor", "2", "--split-bytes",
            "65536", "--docs-per-bucket", "4", "--num-shards", "5", "--no-mlflow"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_beam([*args, "--output", one])
    run_beam([*args, "--output", two, *TWO_WORKERS])
    assert shard_digests(one) == shard_digests(two)
    manifest = json.load(open(os.path.join(one, "manifest.json")))
    counters = manifest["counters"]
    assert counters["read-tasks"] > 20 and counters["documents-read"] == 98
    assert counters == json.load(open(os.path.join(two, "manifest.json")))["counters"]
    # parts removed; .lock, which held the folder for the run, stays (removing a lock file another
    # process may have opened would let two runs hold it)
    assert sorted(os.listdir(one)) == [".lock", "manifest.json", "shards", "tokenizer"]


def test_output_loads_with_datasets_and_autotokenizer(one_worker_run):
    import datasets
    from transformers import AutoTokenizer

    output, _ = one_worker_run
    manifest = json.load(open(os.path.join(output, "manifest.json")))
    ds = datasets.load_dataset("parquet", data_files=os.path.join(output, "shards", "*.parquet"),
                               split="train")
    assert len(ds) == manifest["num_examples"]
    assert set(ds.column_names) == {"input_ids", "segment_ids", "masked_lm_positions",
                                    "masked_lm_ids", "next_sentence_labels"}
    row = ds[0]
    assert row["input_ids"][0] == 2 and row["input_ids"][-1] == 3 and len(row["input_ids"]) <= 128
    tok = AutoTokenizer.from_pretrained(os.path.join(output, "tokenizer"))
    assert tok.mask_token_id == 4 and tok.cls_token_id == 2 and tok.sep_token_id == 3
    assert len(tok) == manifest["tokenizer"]["vocab_size"]


def test_mlflow_run_records_params_counters_and_artifacts(one_worker_run, mlflow_server):
    import mlflow

    output, _ = one_worker_run
    manifest = json.load(open(os.path.join(output, "manifest.json")))
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(manifest["data_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "preprocess"
    assert run.data.params["vocab_size"] == "8000" and run.data.params["dupe_factor"] == "2"
    for name in ("documents-read", "skipped-redirects", "sentences", "tokens", "instances", "masked-tokens"):
        assert run.data.metrics[f"count/{name}"] == manifest["counters"][name]
    assert run.data.metrics["input_tokens_per_second"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "tokenizer"} <= artifacts
    tokenizer_files = {a.path for a in client.list_artifacts(run.info.run_id, "tokenizer")}
    assert "tokenizer/spm.model" in tokenizer_files and "tokenizer/tokenizer.json" in tokenizer_files


def test_a_given_tokenizer_is_used_not_retrained(data_dir, tmp_path):
    # Another vocabulary than this input with COMMON's flags would train (4,000, not 8,000): a run that
    # ignored --tokenizer and trained its own would show it in the manifest and the ids.
    again = str(tmp_path / "again")
    run_beam([*COMMON, "--output", again, "--no-mlflow", "--tokenizer", os.path.join(data_dir, "tokenizer"),
              "--model-type", "bpe"])  # ignored, and the manifest says the given model's own type
    given, got = (json.load(open(os.path.join(d, "manifest.json")))["tokenizer"] for d in (data_dir, again))
    assert got["vocab_size"] == 4000 and got["fingerprint"] == given["fingerprint"]
    assert (got["model_type"], got["given"], given["model_type"], given["given"]) == ("unigram", True, "unigram", False)
    table = pq.read_table(os.path.join(again, "shards"), columns=["input_ids"]).to_pydict()
    assert max(max(ids) for ids in table["input_ids"]) < 4000
    assert open(os.path.join(again, "tokenizer", "spm.model"), "rb").read() == \
        open(os.path.join(data_dir, "tokenizer", "spm.model"), "rb").read()


def test_a_failed_run_leaves_no_manifest_and_a_failed_rerun_the_previous_data_dir_whole(data_dir, tmp_path):
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text('{"text": " ", "body": "blank text, which only the pipeline finds"}\n' * 50)
    fresh = tmp_path / "fresh"
    proc = run_beam(["--input", str(corpus), "--output", str(fresh), "--no-mlflow"], check=False)
    assert proc.returncode == 2
    assert "error: no sentences to train the vocabulary on: the input has no text" in proc.stderr
    assert not (fresh / "manifest.json").exists()

    # A rerun found its input bad only once the pipeline ran: it used to delete the previous data
    # dir first. Now that dir waits in OUTPUT/.previous and comes back, byte for byte.
    output = tmp_path / "out"
    shutil.copytree(data_dir, output)
    before = {p.relative_to(output): hashlib.sha256(p.read_bytes()).hexdigest() for p in output.rglob("*")
              if p.is_file() and p.name != ".lock"}  # the lock its run held
    proc = run_beam(["--input", str(corpus), "--output", str(output), "--no-mlflow"], check=False)
    assert proc.returncode == 2 and "no sentences to train the vocabulary on" in proc.stderr
    assert f"--output {output}: the previous data dir is kept in {output / '.previous'}" in proc.stderr
    assert f"--output {output}: this run did not finish; the previous data dir is back in place" in proc.stderr
    after = {p.relative_to(output): hashlib.sha256(p.read_bytes()).hexdigest() for p in output.rglob("*")
             if p.is_file() and p.name != ".lock"}
    assert after == before and not (output / ".previous").exists()


def test_a_second_run_into_an_output_in_use_is_refused(tmp_path):
    """Two runs into one --output: the second deleted the first's shards, and the first then wrote
    its manifest, with its own settings, over the second's shards."""
    from pipeline import run_lock

    output = tmp_path / "out"
    held = run_lock.acquire(str(output), "--output")  # a run that is still going
    try:
        proc = run_beam([*COMMON, "--output", str(output), "--no-mlflow"], check=False)
    finally:
        held.release()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: --output {output} is in use by another run (pid {os.getpid()} on "), proc.stderr[-3000:]
    assert "a second preprocessing run into it deletes this one's shards" in proc.stderr
    assert os.listdir(output) == [".lock"]


def test_beam_options_beam_refuses_leave_the_previous_data_dir_whole(tmp_path):
    """Beam checks its options when the pipeline is made (Dataflow's --region and --temp_location):
    a run refused there deleted the previous data dir at that --output first."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "manifest.json").write_text("{}")  # a previous run's
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text('{"text": "One sentence here. And another one."}\n' * 5)
    # An option Beam refuses on this machine's runner too (Dataflow's need a Google Cloud project)
    proc = run_beam(["--input", str(corpus), "--output", str(output), "--no-mlflow", "--environment_type", "PROCESS"],
                    check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: Beam's options: Option process_command is required for environment type PROCESS.")
    assert (output / "manifest.json").read_text() == "{}" and "is deleted now" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--input", "/nonexistent/*.xml.bz2"], "no file matches"),
    (["--masked-lm-prob", "1.5"], "--masked-lm-prob must be in (0, 1)"),
    (["--vocab_size", "8000"], "--vocab_size (did you mean --vocab-size?)"),
    (["--tokenizer", "/nonexistent"], "--tokenizer /nonexistent: no tokenizer there"),
])
def test_bad_flags_fail_fast_with_a_clear_message(args, message, tmp_path):
    proc = run_beam([*args, "--output", str(tmp_path / "o"), "--no-mlflow"], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("dump,language,segmenter,kept,dropped", [
    ("zhwiki", "zh", "jieba", "长城,又称万里长城,是中国古代的军事防御工事", ("分类", "Category", "-{", "参考文献")),
    ("dewiki", "de", "pieces", "Die Stadt ist vollständig vom Land Brandenburg umgeben.",
     ("Kategorie", "Datei", "Einzelnachweise", "mini")),
])
def test_the_language_comes_from_the_dumps_xml_lang(tmp_path, dump, language, segmenter, kept, dropped):
    from transformers import AutoTokenizer

    out = str(tmp_path / "out")
    run_beam(["--input", os.path.join(REPO, "tests", "data", "wiki", f"{dump}-sample-pages-articles.xml"),
              "--output", out, "--whole-word-mask", "--vocab-size", "400", "--dupe-factor", "1", "--no-mlflow"])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["language"] == language and manifest["masking"]["word_segmenter"] == segmenter
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    table = pq.read_table(os.path.join(out, "shards")).to_pydict()
    texts = []
    for ids, positions, originals in zip(table["input_ids"], table["masked_lm_positions"], table["masked_lm_ids"]):
        for p, token in zip(positions, originals):
            ids[p] = token
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    text = " ".join(texts)
    assert kept in text
    assert not [d for d in dropped if d in text]


def wait_for_the_main_stage(proc, output: str) -> None:
    """Until the vocabulary is written, where the workers go on to make the examples."""
    import time

    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(output, "tokenizer", "spm.model")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its main stage"
        time.sleep(0.1)


def worker_pids(driver: int) -> list[int]:
    """The local runner's worker processes of ``driver`` (its children running local_worker.py)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == driver and b"local_worker.py" in command:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background-job"])
def test_a_worker_killed_for_memory_ends_the_run_instead_of_hanging_it(tmp_path, background):
    """The kernel's out-of-memory killer takes one worker: Beam's driver waited for ever on the work
    that worker held. Now its traceback shows, and the run ends with one line and exit 1; also as a
    shell's background job, which ignores SIGINT (the driver interrupts itself with one)."""
    import time

    output = str(tmp_path / "data")
    proc = subprocess.Popen([sys.executable, SCRIPT, *COMMON, "--dupe-factor", "5", "--output", output, "--no-mlflow",
                             *TWO_WORKERS], stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None)
    wait_for_the_main_stage(proc, output)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, workers
    killed = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the driver still waits {time.monotonic() - killed:.0f} s after its worker was killed")
    assert proc.returncode == 1 and time.monotonic() - killed < 60, err[-3000:]
    assert "RuntimeError: Worker subprocess exited with return code -9" in err
    # that worker's one traceback, whole: not interleaved with, nor followed by, the echoes of its end
    # (the gRPC streams it left, the other worker ended by the driver's shutdown)
    assert err.count("Exception in thread") == 1 and "RpcError" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: a worker process of the local runner ended (killed by SIGKILL, as the kernel's out-of-memory killer "
        f"does): the data dir {output} is not complete; rerun into the same --output, with fewer --direct_num_workers "
        "if memory ran out")
    assert not os.path.exists(os.path.join(output, "manifest.json"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_to_the_workers_too_ends_the_run_with_the_drivers_one_line(signum, tmp_path):
    """A terminal's Ctrl-C, or scancel's SIGTERM, reaches the multi_processing workers as well as
    the driver (one process group): the workers end at once, silently (before: 159 lines and 13
    tracebacks for two workers), and the driver's line ends the run."""
    import time

    output = str(tmp_path / "data")
    proc = subprocess.Popen([sys.executable, SCRIPT, *COMMON, "--dupe-factor", "5", "--output", output, "--no-mlflow",
                             *TWO_WORKERS], stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                            start_new_session=True,  # a process group of its own, as a terminal's job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_the_main_stage(proc, output)
    signalled = time.monotonic()
    os.killpg(proc.pid, signum)
    after = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signum and time.monotonic() - signalled < 30, after[-3000:]
    *logged, last = after.strip().splitlines()
    assert last == (f"error: stopped by {signal.Signals(signum).name}: the data dir {output} is not complete (a "
                    "finished one has manifest.json); rerun into the same --output"), after[-3000:]
    # at most a line a worker logged as the signal came (a shard written, say)
    assert all(re.match(r"[\d-]+ [\d:,]+ INFO preprocessing\.", line) for line in logged), after[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_run_with_one_line_and_marks_its_mlflow_run_killed(signum, tmp_path):
    """Ctrl-C, or scancel's SIGTERM, once the vocabulary is training: one line saying the data dir
    is not complete, exit 128 + N, no manifest, the MLflow run KILLED (before: a traceback of 150
    lines for Ctrl-C; for SIGTERM, exit 143 in silence and a run left RUNNING for ever)."""
    import time

    from mlflow import MlflowClient

    output, db = str(tmp_path / "data"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, SCRIPT, *COMMON, "--dupe-factor", "5", "--output", output,
                             "--experiment", "stopped"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": db}, cwd=str(tmp_path),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not a shell's ignored one
    before = []
    for line in proc.stderr:
        before.append(line)
        if "training a unigram SentencePiece vocabulary" in line:
            break
    time.sleep(1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    started = "".join(before)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: stopped by {signal.Signals(signum).name}: the data dir {output} is not complete (a finished one "
        "has manifest.json); rerun into the same --output"), err[-3000:]
    assert not os.path.exists(os.path.join(output, "manifest.json"))
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert f"MLflow run {runs[0].info.run_id} (stage preprocess, experiment 'stopped'" in started  # said at its start
