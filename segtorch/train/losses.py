"""One training step's losses, as the toolbox's TRAIN forward forms them.

``training_losses`` runs the family's training forward (``SegmentationModel.train_forward``: MCIBI updates its memory,
IDRNet its class relations, representations and selection counts, in place and in the toolbox's order, Python's
``random`` draws included) and scores it: each head's scores are resized to the labels (bilinear) and scored
with cross-entropy (pixels labelled -100 left out), weighted by the loss's ``scale_factor``; the total is their
sum in the card's order, plus any family loss (MCIBI's ``loss_memory`` from the second epoch on).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_LOSSES = {"loss_cls": {"type": "CrossEntropyLoss", "scale_factor": 1.0, "ignore_index": -100}}


def training_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, card: Any,
                    learning_rate: float, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, parts)`` of one training step of ``model`` (in train mode) on ``images`` (N, 3, H, W) and
    ``labels`` (N, H, W int64, -100 unlabelled). ``card``: anything with the card's ``architecture`` (its
    ``align_corners``) and ``training`` (its ``losses``, MCIBI's ``memory_update``/``memory_loss``); ``learning_rate``: this step's scheduled rate (before
    the groups' multipliers); ``epoch``: counted from 1, as the toolbox does. ``parts`` are detached."""
    architecture = getattr(card, "architecture", None) or {}
    losses_cfg = (getattr(card, "training", None) or {}).get("losses") or DEFAULT_LOSSES
    if hasattr(model, "train_forward"):
        preds, extra = model.train_forward(images, labels, training=getattr(card, "training", None) or {},
                                           learning_rate=learning_rate, epoch=epoch)
    else:  # any module: its output is the main head's scores (or a dict of them)
        out = model(images)
        preds, extra = (dict(out) if isinstance(out, Mapping) else {"loss_cls": out}), {}
    total, parts = segmentation_loss(preds, labels, losses_cfg, architecture.get("align_corners", False))
    for name, (scores, targets, cfg) in extra.items():
        loss = configured_loss(scores, targets, cfg)
        parts[name] = loss.detach()
        total = total + loss
    return total, parts


def segmentation_loss(preds: Mapping[str, torch.Tensor], labels: torch.Tensor, losses_cfg: Mapping[str, Any],
                      align_corners: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum (in the order of ``losses_cfg``) of each output's loss against ``labels`` (N,H,W int64),
    and the parts. Outputs are resized to the labels first."""
    missing = [k for k in preds if k not in losses_cfg]
    if missing:
        raise KeyError(f"the model outputs {missing} but the losses configure only {sorted(losses_cfg)}")
    total, parts = None, {}
    for key, cfg in losses_cfg.items():
        if key not in preds:
            continue
        logits = _at_least_fp32(preds[key])
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
        loss = configured_loss(logits, labels, cfg)
        parts[key] = loss.detach()
        total = loss if total is None else total + loss
    return total, parts


def configured_loss(scores: torch.Tensor, targets: torch.Tensor, cfg: Mapping | list) -> torch.Tensor:
    """A loss config of the toolbox (one, or a list summed) on scores (N, K[, H, W]) and class targets."""
    if isinstance(cfg, (list, tuple)):
        return sum((configured_loss(scores, targets, c) for c in cfg), scores.new_zeros(()))
    if cfg.get("type", "CrossEntropyLoss") != "CrossEntropyLoss" or cfg.get("use_sigmoid"):
        raise NotImplementedError(f"loss {cfg.get('type')!r} is not supported by the trainer (CrossEntropyLoss is)")
    scores = _at_least_fp32(scores)
    ignore = cfg.get("ignore_index", -100)
    weight = cfg.get("class_weight")
    weight = scores.new_tensor(weight) if weight is not None else None
    if bool((targets != ignore).any()):
        loss = F.cross_entropy(scores, targets, weight=weight, ignore_index=ignore,
                               reduction=cfg.get("reduction", "mean"),
                               label_smoothing=cfg.get("label_smoothing") or 0.0)
    else:  # a batch of ignored pixels only: no signal, but keep the graph (DDP expects every gradient)
        loss = scores.sum() * 0.0
    return loss.mean() * cfg.get("scale_factor", 1.0)


def _at_least_fp32(scores: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 under autocast (fp16/bf16 scores); float64 stays float64."""
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
