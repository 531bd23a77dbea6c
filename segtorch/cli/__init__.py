"""The ``segtorch`` command: list | info | convert | export | download | predict | eval | train.

Every subcommand lives in this package and runs through one error wrapper (``guard.run_guarded``): what a user can
cause (a ``SegtorchError``: a bad name, a missing or damaged file, no network; or an ``OSError``) prints one
line, ``segtorch: error: ...``, and exits 1; anything else is a bug in segtorch and keeps its traceback.
Subcommand modules import their heavy dependencies when they run, so building the parser stays light.
"""
from __future__ import annotations

import argparse

from .. import __version__
from .guard import run_guarded


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate, export, models, predict, train

    p = argparse.ArgumentParser(prog="segtorch", description="SSSegmentation checkpoints, ready to use.")
    p.add_argument("--version", action="version", version=f"segtorch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    models.add_parsers(sub)
    export.add_parser(sub)
    predict.add_parser(sub)
    evaluate.add_parser(sub)
    train.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args.func, args)
