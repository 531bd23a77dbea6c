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
from .registry import ModelCard, list_models, model_card  # noqa: E402  (no torch import)

_LAZY = {
    "create_model": "api", "load": "api", "convert": "api",
    "Segmenter": "segmenter",
    "download": "hub",
}

__all__ = ["__version__", "ModelCard", "list_models", "model_card", "SegtorchError", "UnknownModelError",
           "CardError", "CheckpointError", "DownloadError", "ChecksumError", "OfflineError", "ImageReadError", "DatasetError",
           "UsageError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'segtorch' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
