"""Where the reference toolbox's source files are: the installed ``ssseg`` package (eb1878c1 where a developer
installed it, sssegmentation 1.7.0 in CI), found without importing it (importing ssseg builds its models)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def toolbox_root() -> Path | None:
    """The folder of the installed ``ssseg`` package, or None."""
    try:
        spec = importlib.util.find_spec("ssseg")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def toolbox_file(relative: str) -> Path | None:
    """``ssseg/<relative>`` of the installed toolbox, or None where it (or that file) is absent."""
    root = toolbox_root()
    path = root / relative if root is not None else None
    return path if path is not None and path.is_file() else None


def require_toolbox_file(relative: str) -> Path:
    path = toolbox_file(relative)
    if path is None:
        pytest.skip(f"the reference toolbox's ssseg/{relative} is not installed")
    return path
