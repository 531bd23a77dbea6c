"""The thin trainer: the cards' schedules and losses, AMP, gradient accumulation, exact resume, DDP.

Names are imported on first use, so that building the CLI's parser (``commands``) does not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {"PolySchedule": "optim", "build_optimizer": "optim", "clip_gradients": "optim", "param_groups": "optim",
         "segmentation_loss": "losses", "training_losses": "losses", "configured_loss": "losses",
         "EpochSampler": "trainer", "TrainConfig": "trainer", "Trainer": "trainer", "init_distributed": "trainer",
         "whole_image_predictor": "trainer"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
