"""Turns known failures into one line a user can act on, instead of a traceback."""

from __future__ import annotations

import errno
import re

from preprocessing.inputs import InputError
from preprocessing.mlflow_experiment import TrackingServerError
from preprocessing.options import ConfigError
from preprocessing.vocab import VocabError
from preprocessing.write_failure import REFUSED, WRITE_ONLY

_KNOWN = (InputError, ConfigError, VocabError, TrackingServerError)
# Errors raised in a Beam worker process reach the driver as text in a RuntimeError.
_WORKER_ERROR = re.compile(r"(?:InputError|ConfigError|VocabError): (.+)")
_BEAM_SUFFIX = re.compile(r"\s*\[while running '[^']*'\]\s*$")
# An OSError raised in a worker, as Beam's text has it: "OSError: [Errno 28] No space left on device: 'path'".
_WORKER_OS_ERROR = re.compile(r"(?:OSError|IOError): \[Errno (\d+)\][^\[\n']*(?:'([^'\n]+)')?")


def explain(err: BaseException) -> str | None:
    """The user-facing message for ``err``, or None for an unexpected error."""
    if isinstance(err, ValueError) and str(err).startswith("Unexpected pipeline runner"):
        return f"--runner: {err}"  # a typo in the runner's name (Beam lists the valid ones)
    if isinstance(err, ValueError) and str(err).startswith("Pipeline has validations errors"):
        found = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        return f"Beam's options: {'; '.join(found)}"  # Dataflow without --region, say
    seen = err
    while seen is not None:
        if isinstance(seen, _KNOWN):
            return _BEAM_SUFFIX.sub("", str(seen))
        seen = seen.__cause__ or seen.__context__
    found = _WORKER_ERROR.findall(str(err))
    return _BEAM_SUFFIX.sub("", found[-1]).strip() if found else None


def refused_write(err: BaseException, output: str) -> str | None:
    """A write the file system refused (a full disk, a quota, a read-only mount), in the driver or a
    worker: one line naming the file (else ``--output``) and saying what is left; None otherwise."""
    code, path, seen = None, None, err
    while seen is not None and code is None:
        if isinstance(seen, OSError) and seen.errno in WRITE_ONLY:
            code, path = seen.errno, seen.filename
        seen = seen.__cause__ or seen.__context__
    if code is None:
        for number, name in reversed(_WORKER_OS_ERROR.findall(str(err))):
            if int(number) in WRITE_ONLY:
                code, path = int(number), name or None
                break
    if code is None:
        return None
    advice = "free space there" if code in (errno.ENOSPC, errno.EDQUOT) else "write --output elsewhere"
    if getattr(err, "restored_previous", False):  # driver.run put the data dir this run replaced back
        if code in (errno.ENOSPC, errno.EDQUOT):
            advice += " (the previous data dir stays until a run finishes: delete it to give the run its room)"
        return (f"cannot write {path or f'in --output {output}'}: {REFUSED[code]}; {output} holds the previous "
                f"data dir again, whole (this run's files are deleted): {advice}, then rerun into the same --output")
    return (f"cannot write {path or f'in --output {output}'}: {REFUSED[code]}; the data dir {output} is not "
            f"complete (a finished one has manifest.json): {advice}, then rerun into the same --output")


def interrupted(err: BaseException) -> bool:
    """Ctrl-C or a stop signal (run_beam.py raises KeyboardInterrupt for SIGTERM too), also as Beam
    passes it on from a step: "RuntimeError: KeyboardInterrupt [while running '…']"."""
    seen = err
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt) or str(seen).startswith("KeyboardInterrupt"):
            return True
        seen = seen.__cause__ or seen.__context__
    return "KeyboardInterrupt" in str(err).splitlines()[-1] if str(err) else False
