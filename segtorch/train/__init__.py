"""The thin trainer: the cards' schedules and losses, AMP, gradient accumulation, exact resume, DDP.

Names are imported on first use, so that building the CLI's parser (``commands``) does not import torch.
"""
from __future__ import annotations

from ..lazy import lazy_attributes

_LAZY = {"PolySchedule": "optim", "build_optimizer": "optim", "clip_gradients": "optim", "param_groups": "optim",
         "segmentation_loss": "losses", "training_losses": "losses", "configured_loss": "losses",
         "EpochSampler": "trainer", "TrainConfig": "trainer", "Trainer": "trainer", "init_distributed": "trainer",
         "whole_image_predictor": "trainer", "seed_everything": "trainer", "check_resumable": "trainer",
         "build_model": "finetune"}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
