"""One run at a time in a run dir, and the same run dir seen by every rank.

Faults that corrupt a run without an error of their own:

- two jobs writing one run dir (a job resubmitted while the first still runs, two users on
  one path): their saves interleave in ``checkpoints/``, and ``latest`` names whichever came
  last. Rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for its whole life; the
  kernel drops it when the process ends, however it ends, so a crash leaves no stale lock.
  NFS (v3 lockd, v4) and Lustre mounted with ``flock`` honour it across nodes; a file system
  without locks gets a warning and the run goes on unchecked.
- a run dir on node-local disk (``/tmp``, ``/scratch`` on some sites) under several nodes:
  each node resumes from its own ``checkpoints/`` (rank 0 from step N, the others from
  nothing) and a save leaves each node's ZeRO shards on its own disk. Rank 0 writes a random
  token into the lock file before it starts; once the ranks have met, every rank reads it
  back, and a rank that reads another token, or none, ends the run on every rank before a
  checkpoint is loaded or anything is written.
- two preprocessing runs into one local ``--output``: the second deletes the first's parts and
  shards, and the first then writes its manifest, with its own settings, over the second's
  shards. ``preprocessing/driver.py`` holds ``OUTPUT/.lock`` the same way.
- two fine-tunings into one ``--output-dir``: the second clears the first's report and model
  at its start, and their saves interleave. Fine-tuning's rank 0 holds ``OUTPUT_DIR/.lock``
  the same way (its other ranks write nothing there, so there is no token to compare).
- a file system that locks per node only (Lustre with ``localflock``, NFS mounted ``nolock`` or
  with ``local_lock``) grants the lock to a second job on another node too. The second job
  writes its own token into the lock file; the first, which re-reads it before declaring each
  checkpoint complete (``check_still_held``), stops there, so only one of them goes on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pathlib
import secrets
import socket
import time
from typing import Sequence

LOCK_FILE = ".lock"
# What a file system without locks answers (Lustre without -o flock, some FUSE mounts).
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

log = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The run dir is in use by another run, or is not the same folder on every rank."""


class RunLock:
    """Rank 0's hold on a run dir (see ``acquire``); ``release`` ends it, as the process's end does."""

    def __init__(self, path: str, fd: int, token: int, created: Sequence[str] = ()):
        # created: the folders acquire made for the run dir (parents first), as real paths
        self.path, self.fd, self.token, self.created = path, fd, token, created

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1

    def abandon(self) -> None:
        """Releases, and removes the folders ``acquire`` created (the run dir and any parents it
        made) if the lock is all they hold: a run refused on a bad flag or bad data leaves no
        folder behind."""
        self.release()
        if self.created:
            try:
                os.remove(self.path)
            except OSError:
                return
            _remove_folders(self.created)


def _remove_folders(created: Sequence[str]) -> None:
    """The folders made for a run dir (parents first), last first, while they are empty."""
    try:
        for folder in reversed(created):  # os.removedirs would go on past the folders made here
            os.rmdir(folder)
    except OSError:  # something else was written there meanwhile: it stays
        pass


# What a second run into the folder would do, by the flag that names it.
HARM = {"--run-dir": "two runs writing one run dir corrupt each other's checkpoints",
        "--output-dir": "a second fine-tuning into it clears this one's report and model",
        "--output": "a second preprocessing run into it deletes this one's shards, and one run's manifest "
                    "would describe the other's"}


def acquire(run_dir: str, flag: str = "--run-dir") -> RunLock:
    """Takes ``RUN_DIR/.lock`` for this process, or raises RunDirError naming the run that holds it.
    ``flag`` (a key of ``HARM``) names the folder in errors."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"{flag} {run_dir}: a file, not a folder")
    # The folders of the path that makedirs will make, in order (with "new/../run", both new and
    # run: the later steps open files through the path as given); abandon() may remove them again.
    missing, prefix = [], pathlib.Path()
    for part in pathlib.Path(run_dir).parts:
        prefix /= part
        if part != ".." and not prefix.exists():
            missing.append(prefix)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"{flag} {run_dir}: cannot create it: {err.strerror}") from None
    created = [os.path.realpath(folder) for folder in missing]
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides: a group's run dirs stay shared
    except OSError as err:
        _remove_folders(created)
        raise RunDirError(f"{flag} {run_dir}: cannot write {path}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise _in_use(run_dir, flag, path) from None
        if err.errno not in NO_LOCKS:
            os.close(fd)
            raise
        log.warning("%s: this file system does not lock files (%s): nothing stops a second run from writing "
                    "this folder at the same time", path, err.strerror)
    token = secrets.randbits(62) + 1  # never 0, which stands for "no token" in check_shared
    holder = {"token": token, "host": socket.gethostname(), "pid": os.getpid(),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    data = (json.dumps(holder) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)  # read back by the other nodes' ranks once they meet this one
    except OSError as err:  # a full disk or quota: refused, and a run dir made here goes again
        RunLock(path, fd, 0, created).abandon()
        raise RunDirError(f"{flag} {run_dir}: cannot write {path}: {err.strerror}") from None
    return RunLock(path, fd, token, created)


def check_free(run_dir: str, flag: str = "--run-dir") -> None:
    """Raises RunDirError if another run holds ``run_dir``; creates and writes nothing (the batch
    script's check before any rank starts: the ranks take the lock themselves)."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file, or none this user can read: the ranks' own acquire decides
    try:
        # Shared: it conflicts with the holder's exclusive lock as well, and needs no write access.
        # On NFS, where Linux emulates flock with POSIX locks, an exclusive one on a read-only
        # descriptor fails with EBADF, which would read as "free".
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _in_use(run_dir, flag, path) from None
    finally:
        os.close(fd)


def _in_use(run_dir: str, flag: str, path: str) -> RunDirError:
    return RunDirError(f"{flag} {run_dir} is in use by another run ({_describe(_read(path))}): {HARM[flag]}; wait "
                       f"for it to end or stop it, or pass another {flag} (if that process runs no more, as after a "
                       f"node crash on NFS, which can keep a dead node's lock, delete {path})")


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process that has not written its name yet"
    where = f"pid {holder['pid']} on {holder.get('host', '?')}"
    if holder.get("slurm_job_id"):
        where += f", SLURM job {holder['slurm_job_id']}"
    return f"{where}, started {holder.get('started', '?')}"


def check_shared(run_dir: str, rank: int, world_size: int, device="cpu") -> None:
    """Every rank must read rank 0's token from ``RUN_DIR/.lock``; raises RunDirError on every
    rank otherwise (one all-reduce, which every rank must call, after rank 0's ``acquire``).
    Without a token on rank 0 (a Trainer built without the command's lock) there is nothing to
    compare."""
    if world_size == 1:
        return
    from pipeline.engine import named_ranks, unlike_rank0

    # A collective first, as a barrier: a rank may reach this before rank 0 has written its token
    # (the ranks need not have met yet: under torchrun the rendezvous is the launcher's), and would
    # read the previous run's.
    unlike_rank0(0, rank, world_size, device)
    token = _read(os.path.join(run_dir, LOCK_FILE)).get("token")
    rank0, others = unlike_rank0(token if isinstance(token, int) and 0 < token < 2 ** 62 + 1 else 0, rank, world_size,
                                 device)
    if rank0 and others:
        here = f"this is rank {rank} on {socket.gethostname()}"
        raise RunDirError(f"--run-dir {run_dir} is not the same folder on every rank: rank(s) "
                          f"{named_ranks(others)} of {world_size} do not see the {LOCK_FILE} rank 0 wrote there ({here}); "
                          "put the run dir on a file system every node mounts (not node-local disk such as /tmp), "
                          "and pass every rank the same --run-dir")


def held_token(run_dir: str) -> int | None:
    """The token in ``RUN_DIR/.lock`` now: rank 0's own, read after ``check_shared``; None without one."""
    token = _read(os.path.join(run_dir, LOCK_FILE)).get("token")
    return token if isinstance(token, int) and token > 0 else None


def check_still_held(run_dir: str, token: int | None, what: str) -> None:
    """Raises RunDirError if another run has written its token into ``RUN_DIR/.lock`` since this
    one took it: on a file system that grants locks per node (NFS mounted ``nolock`` or with
    ``local_lock``), a second job on another node takes the lock too, and the two would write one
    checkpoints folder. Checked before each checkpoint is declared complete; nothing to check
    without a token (a Trainer built without the command's lock)."""
    if token is None:
        return
    path = os.path.join(run_dir, LOCK_FILE)
    holder = _read(path)
    other = holder.get("token")
    if not isinstance(other, int) or other <= 0:
        # Unreadable for a moment (ESTALE or EIO on NFS), or being written: no proof of another run
        log.warning("%s: could not read this run's token back before marking %s complete; going on", path, what)
        return
    if other != token:
        raise RunDirError(f"--run-dir {run_dir}: another run took {path} while this one was running "
                          f"({_describe(holder)}): two runs are writing this folder, as where the file system "
                          "grants locks per node (NFS mounted nolock or with local_lock); this run stops without "
                          f"marking {what} complete. Let one run go on, and mount the folder with working locks")


