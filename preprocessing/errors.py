"""Turns known failures into one line a user can act on, instead of a traceback."""

from __future__ import annotations

import re

from preprocessing.inputs import InputError
from preprocessing.mlflow_experiment import TrackingServerError
from preprocessing.options import ConfigError
from preprocessing.vocab import VocabError

_KNOWN = (InputError, ConfigError, VocabError, TrackingServerError)
# Errors raised in a Beam worker process reach the driver as text in a RuntimeError.
_WORKER_ERROR = re.compile(r"(?:InputError|ConfigError|VocabError): (.+)")
_BEAM_SUFFIX = re.compile(r"\s*\[while running '[^']*'\]\s*$")


def explain(err: BaseException) -> str | None:
    """The user-facing message for ``err``, or None for an unexpected error."""
    if isinstance(err, ValueError) and str(err).startswith("Unexpected pipeline runner"):
        return f"--runner: {err}"  # a typo in the runner's name (Beam lists the valid ones)
    seen = err
    while seen is not None:
        if isinstance(seen, _KNOWN):
            return _BEAM_SUFFIX.sub("", str(seen))
        seen = seen.__cause__ or seen.__context__
    found = _WORKER_ERROR.findall(str(err))
    return _BEAM_SUFFIX.sub("", found[-1]).strip() if found else None
