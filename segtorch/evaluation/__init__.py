"""mIoU as the toolbox defines it (streaming confusion matrix), the evaluation loop and its reports.

Names are imported on first use, so that building the CLI's parser does not import torch.
"""
from __future__ import annotations

from ..lazy import lazy_attributes

_LAZY = {"ConfusionMatrix": "metrics", "Metrics": "metrics", "EvalResult": "evaluator", "evaluate": "evaluator",
         "timed_evaluate": "evaluator", "write_results": "evaluator"}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
