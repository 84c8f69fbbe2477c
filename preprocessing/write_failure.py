"""A write the file system refused (a full disk, a quota, a read-only mount, an I/O error), told in
one line that names the path and what is safe; any other error keeps its traceback (that is a bug).

The libraries that write the stages' outputs each report such a failure their own way: Python's
``open`` an ``OSError`` with an errno; safetensors and tokenizers (Rust) an exception whose text
ends "(os error 28)"; ``torch.save`` a ``RuntimeError`` of its zip writer with no errno at all.
``refused_write`` turns each into an ``OSError`` with the errno, so that one ``except`` tells the
user what to free or fix instead of printing a traceback from deep inside a library.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator

# What the environment refused, not what the code got wrong: a missing file or a bad argument
# stays a traceback.
REFUSED = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
}
# Errnos only a write gets (a read of an unreadable input gets EACCES too, and is no write).
WRITE_ONLY = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG))
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


class WriteFailure(RuntimeError):
    """An output that could not be written; the message names it, why, and what to do."""

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


def refused_write(err: BaseException, path: str) -> OSError | None:
    """``err`` as an ``OSError`` with its errno and a file name (``path`` where it has none), when
    the file system refused a write; None for any other error."""
    if isinstance(err, OSError):
        if err.errno in REFUSED:
            return OSError(err.errno, REFUSED[err.errno], err.filename or path)
        return None
    text = str(err)
    found = _RUST_OS_ERROR.search(text)
    if found:
        code = int(found.group(1) or found.group(2))
        return OSError(code, REFUSED[code], path) if code in REFUSED else None
    if isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        # torch.save's zip writer gives no errno: a (nearly) full file system is the usual cause.
        code = errno.ENOSPC if nearly_full(path) else errno.EIO
        return OSError(code, REFUSED[code], path)
    return None


def nearest_existing(path: str) -> str:
    """``path``, or its nearest parent that exists: where a path yet to be made will be written."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


def disk_usage(path: str):
    """``shutil.disk_usage`` where ``path`` is, or its nearest existing parent; None if unknown."""
    try:
        return shutil.disk_usage(nearest_existing(path))
    except OSError:
        return None


def same_file_system(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` (or their nearest existing parents) are on one file system."""
    try:
        return os.stat(nearest_existing(a)).st_dev == os.stat(nearest_existing(b)).st_dev
    except OSError:
        return False


def nearly_full(path: str) -> bool:
    """Under 64 MiB (or 1%) free where ``path`` is, or its nearest existing parent."""
    usage = disk_usage(path)
    return usage is not None and usage.free < min(64 << 20, usage.total // 100)


def _beside(filename: str | None, path: str) -> bool:
    """Whether ``filename`` is ``path``, in it, or beside it (its temporary names); an error that
    names no file is taken as the write's."""
    if not filename:
        return True
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.abspath(filename).startswith(folder + os.sep) or os.path.abspath(filename) == folder


@contextlib.contextmanager
def writing(what: str, path: str, then: str = "rerun") -> Iterator[None]:
    """Raises ``WriteFailure`` "cannot write WHAT PATH: WHY (FILE); free space there (or: fix the
    cause), then THEN" for a refused write inside the block; other errors pass through unchanged."""
    try:
        yield
    except WriteFailure:
        raise
    except Exception as err:  # noqa: BLE001 - only refused writes are caught, the rest is re-raised
        refused = refused_write(err, path)
        if refused is None or not _beside(refused.filename, path):  # a read that failed (an input's EIO)
            raise
        where = f" ({refused.filename})" if refused.filename and refused.filename != path else ""
        advice = "free space there" if refused.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause"
        raise WriteFailure(f"cannot write {what} {path}: {refused.strerror}{where}; {advice}, then {then}",
                           refused.errno) from None
