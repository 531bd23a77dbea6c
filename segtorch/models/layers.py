"""Small building blocks shared by every backbone and head.

Modules take ``norm_layer`` (a callable ``channels -> nn.Module``) and ``act_layer`` (a callable
``() -> nn.Module``), as timm does. ``ConvNormAct`` is an ``nn.Sequential`` so its parameters are named
``0.weight``, ``1.weight``, ... exactly like the toolbox's ``nn.Sequential(conv, norm, act)`` blocks, which
keeps published state dicts loadable without renaming.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping

import torch.nn as nn

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]

_NORMS = {
    "BatchNorm2d": nn.BatchNorm2d,
    # SyncBatchNorm only differs while training on several GPUs; inference uses plain BatchNorm
    # (the trainer converts with nn.SyncBatchNorm.convert_sync_batchnorm when asked).
    "SyncBatchNorm": nn.BatchNorm2d,
    "LayerNorm": nn.LayerNorm,
}
_ACTS = {"ReLU": nn.ReLU, "LeakyReLU": nn.LeakyReLU, "GELU": nn.GELU}


def norm_layer_from_cfg(cfg: Mapping | None) -> NormLayer:
    """``{"type": "SyncBatchNorm"}`` / ``{"type": "LayerNorm", "eps": 1e-6}`` -> ``channels -> module``."""
    if cfg is None:
        return lambda channels: nn.Identity()
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind not in _NORMS:
        raise ValueError(f"unsupported normalisation layer {kind!r}; known: {sorted(_NORMS)}")
    return functools.partial(_NORMS[kind], **cfg)


def act_layer_from_cfg(cfg: Mapping | None) -> ActLayer:
    """``{"type": "ReLU", "inplace": True}`` -> ``() -> module``."""
    if cfg is None:
        return nn.Identity
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind not in _ACTS:
        raise ValueError(f"unsupported activation {kind!r}; known: {sorted(_ACTS)}")
    return functools.partial(_ACTS[kind], **cfg)


def not_inplace(act_layer: ActLayer) -> ActLayer:
    """The same activation without ``inplace`` (for outputs that are reused afterwards)."""
    if isinstance(act_layer, functools.partial) and act_layer.keywords.get("inplace"):
        return functools.partial(act_layer.func, *act_layer.args, **{**act_layer.keywords, "inplace": False})
    return act_layer


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> norm -> act; state-dict keys ``0.*`` (conv), ``1.*`` (norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer | None = nn.ReLU):
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=False),
            norm_layer(out_channels),
        ]
        if act_layer is not None:
            layers.append(act_layer())
        super().__init__(*layers)


def classifier(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout2d -> 1x1 conv with bias: the toolbox's last two layers of every decoder."""
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(in_channels, num_classes, kernel_size=1))
