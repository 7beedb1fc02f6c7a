"""Argument types shared by the subcommands: argparse turns their errors into exit code 2."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer of at least 1 (thread counts, steps, batch sizes)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0, where 0 means "everything" or "skip" (the option says which)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 for everything")
    return value


def integer(text: str) -> int:
    """Any integer; for options whose range is checked where they are used, with a message
    that gives the real range (the self-generated text's size, checked by the request)."""
    return _integer(text)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
