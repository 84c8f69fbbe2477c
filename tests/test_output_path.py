"""Outputs that appear under their name only once whole, and what killed writers leave beside them."""

import os
import signal
import socket
import subprocess
import sys

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
