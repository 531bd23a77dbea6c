"""segtorch: the SSSegmentation model zoo as a light inference SDK.

    import segtorch
    seg = segtorch.load("isnet_resnet101os8_ade20k")
    labels = seg.predict("image.jpg")

Importing segtorch is cheap: torch and the model code are imported on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (CardError, CheckpointError, ChecksumError, DatasetError, DownloadError,  # noqa: E402
                     ImageReadError, OfflineError, SegtorchError, UnknownModelError, UsageError)
from .lazy import lazy_attributes  # noqa: E402
from .registry import ModelCard, list_models, model_card  # noqa: E402  (no torch import)

_LAZY = {
    "create_model": "api", "load": "api", "convert": "api",
    "Segmenter": "segmenter",
    "download": "downloads",
    "BatchPredictor": "batch",
}

__all__ = ["__version__", "ModelCard", "list_models", "model_card", "SegtorchError", "UnknownModelError",
           "CardError", "CheckpointError", "DownloadError", "ChecksumError", "OfflineError", "ImageReadError", "DatasetError",
           "UsageError", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
