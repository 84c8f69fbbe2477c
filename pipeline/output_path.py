"""Output paths: checks made before the work that ends in writing them, and folders that appear
under their name only once they are whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


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


@contextlib.contextmanager
def built_beside(path: str) -> Iterator[str]:
    """A new folder of this process's own beside ``path`` (hidden), to write into; when the block
    ends without an error it replaces whatever is at ``path``, else it is removed. A crash or a
    full disk leaves no half-written folder under the final name (a killed process may leave the
    hidden one)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        os.chmod(temp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the folder from the other users
        yield temp
        remove(path)
        os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # gone already after the rename


@contextlib.contextmanager
def file_beside(path: str) -> Iterator[str]:
    """A temporary name beside ``path`` to write the file to; renamed to ``path`` when the block
    ends without an error, else removed: a full disk leaves no file cut short under its name."""
    temp = f"{path}.tmp-{os.getpid()}"
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
