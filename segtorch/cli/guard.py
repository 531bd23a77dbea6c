"""The one error wrapper every subcommand runs through (``segtorch ...`` and ``benchmarks/reproduce.py``)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import SegtorchError, UnknownModelError


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
        text = one_line(e)
        if isinstance(e, UnknownModelError):  # the registry's hint names the Python API
            text = text.replace("segtorch.list_models()", "`segtorch list`")
            if "`segtorch list`" not in text:
                text += " (`segtorch list` shows every model)"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 1
