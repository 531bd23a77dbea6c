"""UPerNet: PPM on the last stage plus an FPN over the earlier stages, fused and classified."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..decoders.fpn import fpn_fuse, fpn_layers
from ..decoders.pyramid_pooling import PyramidPoolingModule
from ..layers import ActLayer, ConvNormAct, NormLayer
from .base import SegmentationModel


class UPerNet(SegmentationModel):
    def __init__(self, backbone: nn.Module, num_classes: int, in_channels_list: Sequence[int] = (256, 512, 1024, 2048),
                 feats_channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 selected_indices: Sequence[int] | None = None, align_corners: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__(backbone, num_classes, selected_indices, align_corners)
        self.check_channels("in_channels_list", in_channels_list, range(len(self.feature_channels)))
        # PPM on the last stage, FPN over the earlier ones; the toolbox keeps these at the segmentor's top level
        self.ppm_net = PyramidPoolingModule(in_channels_list[-1], feats_channels, pool_scales, align_corners,
                                            norm_layer, act_layer)
        self.lateral_convs, self.fpn_convs = fpn_layers(in_channels_list, feats_channels, feats_channels,
                                                        norm_layer, act_layer)
        self.decoder = nn.Sequential(
            *ConvNormAct(feats_channels * len(in_channels_list), feats_channels, 3, norm_layer=norm_layer,
                         act_layer=act_layer),
            nn.Dropout2d(dropout), nn.Conv2d(feats_channels, num_classes, 1))

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        fused = fpn_fuse(feats, self.ppm_net, self.lateral_convs, self.fpn_convs, self.align_corners)
        return self.decoder(fused)
