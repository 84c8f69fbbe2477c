"""Outputs that appear under their name only once whole, and what killed writers leave beside them."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.output_path import built_beside, file_beside, owner_tag

from .conftest import REPO


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with built_beside(str(out)) as temp:
        assert not out.exists() and os.path.basename(temp).startswith(f".model.partial-{owner_tag()}-")
        open(os.path.join(temp, "weights"), "w").write("1")
    assert os.listdir(tmp_path) == ["model"] and (out / "weights").read_text() == "1"
    with pytest.raises(OSError):
        with built_beside(str(out)) as temp:
            open(os.path.join(temp, "weights"), "w").write("2")
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == ["model"] and (out / "weights").read_text() == "1"  # the old one stands


def test_a_killed_writers_leftovers_go_at_the_next_write_and_a_live_ones_stay(tmp_path):
    """A process killed mid-write runs no clean-up (an export's 352 MB stayed beside hf/ for ever);
    the next writer of the same output removes it. A live writer's is left alone."""
    code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]);"
            "from pipeline.output_path import built_beside, file_beside;"
            "b = built_beside(sys.argv[2]); temp = b.__enter__(); open(os.path.join(temp, 'w'), 'w').write('x');"
            "f = file_beside(sys.argv[3]); open(f.__enter__(), 'w').write('x');"
            "print('ready', flush=True); time.sleep(60)")
    def writer():
        proc = subprocess.Popen([sys.executable, "-c", code, REPO, str(tmp_path / "model"),
                                 str(tmp_path / "report.json")], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        return proc

    killed, live = writer(), writer()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(os.listdir(tmp_path)) == 4  # two hidden folders, two temporary files
    ten_minutes_ago = time.time() - 600  # untouched for 5 minutes: not a live writer in another container
    for name in os.listdir(tmp_path):
        os.utime(tmp_path / name, (ten_minutes_ago, ten_minutes_ago))
        if (tmp_path / name).is_dir():
            for inner in os.listdir(tmp_path / name):
                os.utime(tmp_path / name / inner, (ten_minutes_ago, ten_minutes_ago))
    with built_beside(str(tmp_path / "model")) as temp:
        open(os.path.join(temp, "w"), "w").write("mine")
    with file_beside(str(tmp_path / "report.json")) as temp:
        open(temp, "w").write("mine")
    left = sorted(os.listdir(tmp_path))
    live.kill()
    live.wait()
    tag = f"{socket.gethostname()}-{live.pid}"
    assert len(left) == 4 and "model" in left and "report.json" in left, left
    assert any(name.startswith(f".model.partial-{tag}-") for name in left), left
    assert f"report.json.tmp-{tag}" in left, left


def test_a_fresh_leftover_or_another_hosts_is_not_taken_for_a_dead_writers(tmp_path):
    """Host n1's cleaner must not read host n1-9's live file as its own pid 9; and a leftover
    written in the last minutes may be a live writer's in another container of the same name."""
    from pipeline import output_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, host = dead.stdout.strip(), socket.gethostname()
    fresh = tmp_path / f"out.parquet.tmp-{host}-{pid}"
    other_host = tmp_path / f"out.parquet.tmp-{host}-9-{pid}"
    for path in (fresh, other_host):
        path.write_text("x")
    os.utime(other_host, (time.time() - 600, time.time() - 600))
    output_path.remove_dead_leftovers(str(tmp_path), "out.parquet.tmp-")
    assert sorted(os.listdir(tmp_path)) == sorted([fresh.name, other_host.name])
    os.utime(fresh, (time.time() - 600, time.time() - 600))
    output_path.remove_dead_leftovers(str(tmp_path), "out.parquet.tmp-")
    assert os.listdir(tmp_path) == [other_host.name]


def test_only_a_refused_write_of_the_output_becomes_one_line(tmp_path):
    """A full disk under the output is the one-line WriteFailure; a failed read of an input elsewhere
    (EIO on a network file system), or any other error, keeps its traceback."""
    import errno

    from preprocessing.write_failure import WriteFailure, writing

    out = str(tmp_path / "out" / "emb.parquet")
    with pytest.raises(WriteFailure, match=r"cannot write the embeddings .*emb\.parquet: no space left on device "
                                           r"\(.*emb\.parquet\.tmp-1\); free space there, then rerun"):
        with writing("the embeddings", out):
            raise OSError(errno.ENOSPC, "No space left on device", out + ".tmp-1")
    with pytest.raises(OSError, match="Input/output error"):
        with writing("the embeddings", out):
            raise OSError(errno.EIO, "Input/output error", str(tmp_path / "inputs" / "rows.csv"))
    with pytest.raises(WriteFailure, match=r"cannot write the export .*emb\.parquet: no space left on device; "):
        with writing("the export", out):  # safetensors' and tokenizers' way: no errno, no file named
            raise Exception("Error while serializing: No space left on device (os error 28)")
    with pytest.raises(KeyError):
        with writing("the export", out):
            raise KeyError("a bug")
