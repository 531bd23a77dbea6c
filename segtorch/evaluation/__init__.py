"""mIoU as the toolbox defines it (streaming confusion matrix), the evaluation loop and its reports.

Names are imported on first use, so that building the CLI's parser does not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {"ConfusionMatrix": "metrics", "Metrics": "metrics", "EvalResult": "evaluator", "evaluate": "evaluator",
         "timed_evaluate": "evaluator", "write_results": "evaluator"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
