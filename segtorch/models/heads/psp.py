"""PSPNet: the Pyramid Pooling Module on the last backbone stage, then a 1x1 classifier."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, ConvNormAct, NormLayer, classifier
from ..segmentor import SegmentationModel


class PyramidPoolingModule(nn.Module):
    """Average-pool to each scale, 1x1 conv, upsample back, concatenate with the input, 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 align_corners: bool = False, norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale),
                          *ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer))
            for scale in pool_scales)
        # named "fuse_layer" before 2020-12-14: see checkpoint.LEGACY_KEY_RULES
        self.bottleneck = ConvNormAct(in_channels + out_channels * len(pool_scales), out_channels, 3,
                                      norm_layer=norm_layer, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        levels = [x] + [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=self.align_corners)
                        for branch in self.branches]
        return self.bottleneck(torch.cat(levels, dim=1))


class PSPNet(SegmentationModel):
    def __init__(self, backbone: nn.Module, num_classes: int, in_channels: int = 2048, feats_channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 selected_indices: Sequence[int] | None = None, align_corners: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__(backbone, num_classes, selected_indices, align_corners)
        self.check_channels("in_channels", in_channels, -1)
        self.ppm_net = PyramidPoolingModule(in_channels, feats_channels, pool_scales, align_corners,
                                            norm_layer, act_layer)
        self.decoder = classifier(feats_channels, num_classes, dropout)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.ppm_net(feats[-1]))
