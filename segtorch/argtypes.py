"""argparse value types shared by the subcommands: nonsense is refused while parsing, before any work, with
argparse's one-line "argument --x: ..." message and exit status 2."""
from __future__ import annotations

import argparse

# the precisions segtorch runs at (fp32 is within 2x the toolbox's float32 error; see segtorch.inference.precision)
PRECISIONS = ("fp32", "bf16", "fp16")


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def model_name(text: str) -> str:
    """A model name or alias segtorch knows; its canonical name."""
    from .errors import UnknownModelError
    from .registry import resolve_name

    try:
        return resolve_name(text)
    except UnknownModelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_pair(text: str) -> tuple[int, int]:
    """Two positive integers written "AxB" (an image size, in the order the option's help gives)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdecimal() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must be two positive integers written AxB, e.g. 97x75, not {text!r}")
    return int(parts[0]), int(parts[1])


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
