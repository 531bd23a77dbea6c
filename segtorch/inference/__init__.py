"""Test-time pipeline: read an image, the toolbox's Resize/Normalize, scores with its sliding-window and
multi-scale/flip averaging, label maps, and pictures of them. Pure functions with explicit arguments."""
from __future__ import annotations

from .fuse import fold_batchnorm
from .image import ImageReadError, preprocess, read_image, resized_size
from .precision import autocast_context, check_precision, cpu_supports_bf16
from .predictor import infer_logits, predict_labels, slide_windows
from .render import colorize, legend, overlay

__all__ = ["ImageReadError", "autocast_context", "check_precision", "colorize", "cpu_supports_bf16",
           "fold_batchnorm", "infer_logits", "legend", "overlay", "predict_labels", "preprocess", "read_image",
           "resized_size", "slide_windows"]
