"""What the analysis CLIs share: bad input is one line on stderr naming the flag or file and the value,
exit code 2, never a traceback (docs/analysis.md, "Bad input: analysis")."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

BAD_INPUT = 2
"""Exit code of every refused input (argparse's own)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `<prog>: error: argument --flag: ...`, without the usage block."""

    def error(self, message: str):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message}\n")


def checked(kind: Callable[[str], float], ok: Callable[[float], bool], want: str):
    """An argparse `type` that converts with `kind` and refuses values failing `ok` ("must be <want>")."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {want}")
        return value

    convert.__name__ = kind.__name__
    return convert


def fail(prog: str, error: Exception | str) -> int:
    """Print `error` as one line on stderr and return the bad-input exit code."""
    text = " ".join(str(error).split())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return BAD_INPUT
