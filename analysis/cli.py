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


COMMANDS = {
    "analysis.report": "a study's report: load, derive, fit, figures and report.md",
    "analysis.fit": "fit a scaling law to a CSV and print its coefficients",
    "analysis.branch_check": "cooldown branches against cosine runs of their length",
    "analysis.bench": "benchmark of the scaling-law fits",
    "analysis.synthetic": "write a synthetic study, as training writes one",
}
"""The analysis commands (each answers `python -m <name> --help`)."""


def main(argv: list[str]) -> int:
    """`python -m analysis.cli`: this module is no command itself; it says which ones there are."""
    lines = [f"  python -m {name:<22} {what}" for name, what in COMMANDS.items()]
    print("analysis.cli holds what the analysis commands share; the commands are:\n" + "\n".join(lines))
    return 0 if {"-h", "--help"} & set(argv) else BAD_INPUT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
