"""Command-line parsing for every ``real-megatron`` command: argparse with one-line errors, and count types.

A user error is one line on stderr and exit code 2 (``prog: error: <what> (see prog --help)``), never the
usage block followed by the error; counts are checked where they are parsed (a negative count would slice
the data silently).
"""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line: the flag, what is wrong, and where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(text: str) -> int:
    """A count where 0 means "all" (``--limit``, ``--max-problems``): an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: all), got {value}")
    return value


def positive(text: str) -> int:
    """A count that must be at least 1 (``--seeds``, ``--steps``)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
