"""Outputs that appear under their name only once whole, and what killed writers leave beside them."""

import os
import shutil
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


def _data_dir_files(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(folder) for f in files}


def _fake_data_dir(folder, tag: str) -> None:
    for name in ("shards/part-00000-of-00001.parquet", "tokenizer/spm.model", "flat/input_ids.npy", "manifest.json"):
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(f"{tag} {name}")


def test_a_rerun_keeps_the_previous_data_dir_until_it_finishes_and_a_failure_puts_it_back(tmp_path):
    from preprocessing import manifest

    out = str(tmp_path / "data")
    _fake_data_dir(out, "old")
    before = _data_dir_files(out)
    assert manifest.set_aside_previous(out)
    # renamed, not copied: OUTPUT no longer looks complete, and the old files are whole beside it
    assert sorted(os.listdir(out)) == [".previous"] and _data_dir_files(os.path.join(out, ".previous")) == before
    _fake_data_dir(out, "new")  # the failed run wrote all but its manifest
    os.remove(os.path.join(out, "manifest.json"))
    os.makedirs(os.path.join(out, "parts"))
    manifest.restore_previous(out)
    assert _data_dir_files(out) == before and sorted(os.listdir(out)) == ["flat", "manifest.json", "shards", "tokenizer"]
    # a run that finishes drops it
    assert manifest.set_aside_previous(out)
    _fake_data_dir(out, "new")
    manifest.drop_previous(out)
    assert _data_dir_files(out) == {name: f"new {name}".encode() for name in before}


def test_what_a_rerun_killed_outright_left_is_sorted_out_by_the_next_run(tmp_path):
    from preprocessing import manifest

    out = str(tmp_path / "data")
    # killed while it ran: .previous is the last complete data dir; the killed run's shards go
    _fake_data_dir(out, "old")
    manifest.set_aside_previous(out)
    _fake_data_dir(out, "killed")
    os.remove(os.path.join(out, "manifest.json"))
    kept = _data_dir_files(os.path.join(out, ".previous"))
    assert manifest.set_aside_previous(out)
    assert _data_dir_files(os.path.join(out, ".previous")) == kept
    assert not any(content.startswith(b"killed") for content in _data_dir_files(out).values())
    manifest.restore_previous(out)
    assert _data_dir_files(out) == kept
    # killed between its manifest and dropping .previous: OUTPUT is the newer, complete one
    manifest.set_aside_previous(out)
    _fake_data_dir(out, "newer")
    assert manifest.set_aside_previous(out)
    assert _data_dir_files(os.path.join(out, ".previous")) == {name: f"newer {name}".encode() for name in kept}
    # killed before its first rename: an empty .previous is no data dir
    fresh = str(tmp_path / "fresh")
    os.makedirs(os.path.join(fresh, ".previous"))
    assert not manifest.set_aside_previous(fresh) and os.listdir(fresh) == []


def test_a_set_aside_or_restore_cut_short_keeps_the_previous_data_dir_whole(tmp_path):
    """Killed between its renames: the next run completes the set-aside from what OUTPUT still
    holds, and a restore put back what it has (before, the next run deleted the old shards left
    in OUTPUT, and a failure after that restored a manifest without shards: complete-looking)."""
    from preprocessing import manifest

    out = str(tmp_path / "data")
    _fake_data_dir(out, "old")
    before = _data_dir_files(out)
    previous = os.path.join(out, ".previous")
    os.makedirs(previous)
    for name in ("manifest.json", "shards"):  # a set-aside killed after its second rename
        os.rename(os.path.join(out, name), os.path.join(previous, name))
    assert manifest.set_aside_previous(out)
    assert _data_dir_files(previous) == before and os.listdir(out) == [".previous"]
    # a failed run's files, then a restore killed after putting back flat/ and tokenizer/
    _fake_data_dir(out, "failed")
    os.remove(os.path.join(out, "manifest.json"))
    failed = os.path.join(out, ".failed")
    os.makedirs(failed)
    for name in ("shards", "tokenizer", "flat"):
        os.rename(os.path.join(out, name), os.path.join(failed, name))
    for name in ("flat", "tokenizer"):
        os.rename(os.path.join(previous, name), os.path.join(out, name))
    assert manifest.set_aside_previous(out)
    assert _data_dir_files(previous) == before and os.listdir(out) == [".previous"]
    manifest.restore_previous(out)
    assert _data_dir_files(out) == before


def test_a_data_dir_with_linked_shards_is_deleted_through_the_link_as_before(tmp_path, caplog):
    """A rename would move the link, not the shards: the run would write its shards on OUTPUT's own
    disk, and the old ones, on the other, would never be deleted."""
    import logging

    from preprocessing import manifest

    out, elsewhere = tmp_path / "data", tmp_path / "big_disk"
    _fake_data_dir(str(out), "old")
    shutil.move(str(out / "shards"), str(elsewhere))
    os.symlink(elsewhere, out / "shards")
    with caplog.at_level(logging.WARNING, logger="preprocessing.manifest"):
        assert not manifest.set_aside_previous(str(out))
    assert f"--output {out}: shards is a link: the previous data dir is deleted now" in caplog.text
    assert (out / "shards").is_symlink() and os.listdir(elsewhere) == [] and not (out / "manifest.json").exists()
