"""Output paths: checks made before the work that ends in writing them, and folders that appear
under their name only once they are whole."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the flag."""


def check_output_file(flag: str, path: str, example: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuses an empty path, a folder, a name without one of ``suffixes`` (when given), and a path
    whose folder cannot be made or written: each found before the work, not after it."""
    if not path.strip() or os.path.isdir(path) or path.endswith(os.sep):
        shown = os.path.join(path, example) if path.strip() else example
        raise OutputPathError(f"{flag} {path if path.strip() else repr(path)}: {'a folder' if path.strip() else 'empty'}"
                              f"; {flag} names the file to write (e.g. {shown})")
    if suffixes and not path.lower().endswith(suffixes):
        raise OutputPathError(f"{flag} {path}: name a {' or '.join(suffixes)} file")
    check_writable_parent(flag, path)


def check_writable_parent(flag: str, path: str) -> None:
    """Refuses a path whose folder cannot be made or written in (a file on the way, no permission)."""
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):  # the folders to be made: the nearest one there must take them
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputPathError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: cannot write in {existing} (permission denied)")


def remove(path: str) -> None:
    """Whatever is at ``path``: a folder with its files, a file or a link (not its target)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def owner_tag() -> str:
    """This process, in a temporary name: host and pid, so that a later run can tell a killed
    writer's leftover from a live writer's file."""
    return f"{socket.gethostname()}-{os.getpid()}"


# Untouched this long before a dead owner's leftover is removed: a live writer in another pid
# namespace under the same host name (containers sharing the host's name) looks dead from here.
LEFTOVER_IDLE_S = 300


def remove_dead_leftovers(parent: str, prefix: str) -> None:
    """Removes what killed processes of this host left in ``parent`` under ``prefix`` + their
    ``owner_tag()`` (a process killed mid-write runs no clean-up: an export left 352 MB behind),
    once untouched for LEFTOVER_IDLE_S. A live process's, another host's (a shared file system)
    and other names stay."""
    # host-pid, then mkdtemp's 8 characters for a folder: "n1-9-4242" is host n1-9's, not n1's pid 9.
    owned = re.compile(re.escape(f"{prefix}{socket.gethostname()}-") + r"(\d+)(?:-[a-z0-9_]{8})?")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        found = owned.fullmatch(entry.name)
        if not found or _alive(int(found.group(1))) or time.time() - last_write(entry.path) < LEFTOVER_IDLE_S:
            continue
        log.info("removing %s, left by a killed process", entry.path)
        with contextlib.suppress(OSError):
            remove(entry.path)


def last_write(path: str) -> float:
    """The newest modification time of ``path`` and, for a folder, of what it holds (0 if gone)."""
    with contextlib.suppress(OSError):
        if not os.path.isdir(path):
            return os.stat(path).st_mtime
        return max([os.stat(path).st_mtime] + [f.stat().st_mtime for f in os.scandir(path)])
    return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def built_beside(path: str) -> Iterator[str]:
    """A new folder of this process's own beside ``path`` (hidden), to write into; when the block
    ends without an error it replaces whatever is at ``path``, else it is removed. A crash or a
    full disk leaves no half-written folder under the final name; what a killed process left
    beside it is removed by the next one."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(path)}.partial-"
    remove_dead_leftovers(parent, prefix)
    temp = tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=parent)
    try:
        os.chmod(temp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the folder from the other users
        yield temp
        for name in os.listdir(temp):  # transformers 5 writes model.safetensors 0600: the others could not load it
            if os.path.isfile(file := os.path.join(temp, name)):
                os.chmod(file, 0o666 & ~current_umask())
        remove(path)
        os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # gone already after the rename


def temp_beside(path: str) -> str:
    """This process's temporary name for a file beside ``path``, once what killed writers of this
    host left under such names is removed."""
    remove_dead_leftovers(os.path.dirname(os.path.abspath(path)), f"{os.path.basename(path)}.tmp-")
    return f"{path}.tmp-{owner_tag()}"


@contextlib.contextmanager
def file_beside(path: str) -> Iterator[str]:
    """A temporary name beside ``path`` to write the file to; renamed to ``path`` when the block
    ends without an error, else removed: a full disk leaves no file cut short under its name."""
    temp = temp_beside(path)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
