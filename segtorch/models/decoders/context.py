"""The image-level context module a head chooses by name: ASPP (dilated branches) or the pyramid pooling
module (pooled branches). MCIBI's within-image context and IDRNet's coarse context are both one of these."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ..layers import ActLayer, NormLayer
from .aspp import ASPP
from .pyramid_pooling import PyramidPoolingModule

CONTEXT_MODULES = ("aspp", "ppm")


def context_module(kind: str | None, in_channels: int, out_channels: int, *, dilations: Sequence[int],
                   pool_scales: Sequence[int], align_corners: bool, norm_layer: NormLayer,
                   act_layer: ActLayer) -> nn.Module | None:
    """``"aspp"`` (with ``dilations``), ``"ppm"`` (with ``pool_scales``) or None (no context module)."""
    if kind == "aspp":
        return ASPP(in_channels, out_channels, dilations, align_corners, norm_layer, act_layer)
    if kind == "ppm":
        return PyramidPoolingModule(in_channels, out_channels, pool_scales, align_corners, norm_layer, act_layer)
    if kind is not None:
        raise ValueError(f"unknown context module {kind!r}; known: {', '.join(CONTEXT_MODULES)}")
    return None
