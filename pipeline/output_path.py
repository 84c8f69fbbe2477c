"""Checks of an output file's path, made before the work that ends in writing it."""

from __future__ import annotations

import os


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
