"""Turns known failures into one line a user can act on, instead of a traceback."""

from __future__ import annotations

import re

from preprocessing.inputs import InputError
from preprocessing.options import ConfigError

# Errors raised inside Beam workers reach the driver as text in a RuntimeError.
_WORKER_ERROR = re.compile(r"(?:InputError|ConfigError|VocabError): (.+)")


def explain(err: BaseException) -> str | None:
    """The user-facing message for ``err``, or None for an unexpected error."""
    if isinstance(err, (InputError, ConfigError)):
        return str(err)
    found = _WORKER_ERROR.findall(str(err))
    return found[-1].strip() if found else None
