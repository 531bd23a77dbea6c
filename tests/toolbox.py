"""The reference toolbox in tests: where its sources are, whether it is the reference commit, and the one rule for
when a live test may skip.

A live test (marked ``reference``) skips only when ``ssseg`` is not importable, or when the installed release cannot
build that config. The latter is recognised narrowly: the exception was raised inside the toolbox's own code, and the
installed toolbox is not the reference commit eb1878c1 (which builds every config: a failure there is a failure).
Any other exception fails the test.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import traceback
from pathlib import Path

import pytest

# sha256 over ssseg/modules/**/*.py of the reference commit eb1878c1 (path and bytes of each file, sorted)
REFERENCE_MODULES_SHA256 = "f2d8eba3adf0050d68f4b43e71c4cbed6a93abc625b1802ee2e4fc71050f4549"


def toolbox_root() -> Path | None:
    """The folder of the installed ``ssseg`` package, or None (found without importing it: importing ssseg
    builds its registries)."""
    try:
        spec = importlib.util.find_spec("ssseg")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def toolbox_importable() -> bool:
    try:
        import ssseg  # noqa: F401
    except ImportError:
        return False
    return True


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


@functools.lru_cache(maxsize=1)
def is_reference_commit() -> bool:
    """Whether the installed toolbox's model code is eb1878c1's."""
    root = toolbox_root()
    if root is None or not (root / "modules").is_dir():
        return False
    h = hashlib.sha256()
    for path in sorted((root / "modules").rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest() == REFERENCE_MODULES_SHA256


REPOSITORY = Path(__file__).resolve().parents[1]


def _raised_inside_toolbox(error: BaseException) -> bool:
    """Whether the toolbox's code, not segtorch's or the tests', is where ``error`` arose: the innermost frame that
    is either's decides (frames in torch or numpy, called by either, do not)."""
    root = toolbox_root()
    if root is None:
        return False
    ours = (REPOSITORY / "segtorch", REPOSITORY / "tests")
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(root.resolve()):
            return True
        if any(path.is_relative_to(p) for p in ours):
            return False
    return False


def build_reference(name: str, build, *args, **kwargs):
    """``build(*args, **kwargs)`` (the toolbox's segmentor, optimiser, ... for config ``name``), or a skip that
    names the config and the toolbox's error where the installed release cannot build it (see the module's rule)."""
    if not toolbox_importable():
        pytest.skip("the SSSegmentation toolbox (ssseg) is not importable")
    try:
        return build(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - classified below; anything not the release's limit is re-raised
        if is_reference_commit() or not _raised_inside_toolbox(e):
            raise
        pytest.skip(f"the installed toolbox (not eb1878c1) cannot build {name}: {type(e).__name__}: {e}")


# marks for a test that runs the toolbox: skipped where ssseg is not importable
needs_toolbox = [pytest.mark.reference,
                 pytest.mark.skipif(not toolbox_importable(), reason="the SSSegmentation toolbox (ssseg) is not importable")]


def toolbox_only(test):
    for mark in needs_toolbox:
        test = mark(test)
    return test
