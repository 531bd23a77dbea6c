"""Lazy attributes for packages whose names live in heavier submodules: ``import segtorch`` (and building the
CLI's parser) must not import torch. One helper for every package that needs it."""
from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_attributes(package: str, table: Mapping[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``table`` maps a public name to the submodule (relative to
    ``package``) that defines it; the value is imported on first use and cached in ``namespace``."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace.get("__all__", ())) | set(table))

    return __getattr__, __dir__
