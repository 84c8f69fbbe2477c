"""The command-line parser every entry script uses: argparse with one-line errors and a
``--help`` that shows a default only where it says something.

argparse prints the whole usage block (20 to 30 lines for the stages) before its error
line, which buries the one line that matters; a flag's "(default: None)" or "(default:
False)" says nothing, and on a required flag it misleads.
"""

from __future__ import annotations

import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line: ``PROG: error: MESSAGE``. Run as an
    installed console script (``bert-pretrain``), it names itself so, not by its checkout path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        invoked = os.path.basename(sys.argv[0] if sys.argv else "")
        if invoked.startswith("bert-"):
            self.prog = invoked

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the flag is required, takes no value
    (a switch: its "default" is the destination's, e.g. True for --no-mlflow), its default
    is None, or its help already speaks of its default (or hides it with the
    ``%(default).0s`` idiom)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.nargs == 0 or action.default is None
                or action.default is argparse.SUPPRESS or "%(default)" in text or "default" in text.lower()):
            return text
        return super()._get_help_string(action)
