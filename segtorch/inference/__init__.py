"""Test-time pipeline: read an image, the toolbox's Resize/Normalize, scores with its sliding-window and
multi-scale/flip averaging, label maps, and pictures of them. Pure functions with explicit arguments.

The names below are imported on first use: ``segtorch.load`` needs only the fast-path table, not OpenCV."""
from __future__ import annotations

from ..lazy import lazy_attributes

_LAZY = {
    "fold_batchnorm": "fuse",
    "ImageReadError": "image", "preprocess": "image", "read_image": "image", "resized_size": "image",
    "autocast_context": "precision", "check_precision": "precision", "cpu_supports_bf16": "precision",
    "infer_labels": "predictor", "infer_logits": "predictor", "predict_labels": "predictor",
    "slide_windows": "predictor", "toolbox_logits": "predictor",
    "colorize": "render", "legend": "render", "overlay": "render",
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
