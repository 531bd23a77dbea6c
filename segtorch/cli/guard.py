"""The one error wrapper every subcommand runs through (``segtorch ...`` and ``benchmarks/reproduce.py``)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import SegtorchError


def one_line(error: BaseException) -> str:
    """An error as one line; an OSError names its file."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text or type(error).__name__


def run_guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str = "segtorch") -> int:
    """Run a subcommand: user-caused errors become one line and exit 1; bugs keep their traceback."""
    try:
        return func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `segtorch list | head`
        sys.stderr.close()
        return 0
    except (SegtorchError, OSError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
