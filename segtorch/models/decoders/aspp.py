"""Atrous Spatial Pyramid Pooling (DeepLabV3): parallel dilated convs + image pooling, fused by a 3x3 conv."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, ConvNormAct, NormLayer


class ASPP(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = (1, 12, 24, 36),
                 align_corners: bool = False, norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.align_corners = align_corners
        self.parallel_branches = nn.ModuleList(
            ConvNormAct(in_channels, out_channels, 1 if d == 1 else 3, dilation=d, norm_layer=norm_layer,
                        act_layer=act_layer)
            for d in dilations)
        self.global_branch = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), *ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer,
                                                  act_layer=act_layer))
        # named "fuse_layer" before 2020-12-14: see checkpoint.LEGACY_KEY_RULES
        self.bottleneck = ConvNormAct(out_channels * (len(dilations) + 1), out_channels, 3, norm_layer=norm_layer,
                                      act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.parallel_branches]
        outs.append(F.interpolate(self.global_branch(x), size=x.shape[2:], mode="bilinear",
                                  align_corners=self.align_corners))
        return self.bottleneck(torch.cat(outs, dim=1))
