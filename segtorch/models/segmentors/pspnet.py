"""PSPNet: the Pyramid Pooling Module on the last backbone stage, then a 1x1 classifier."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..decoders.pyramid_pooling import PyramidPoolingModule
from ..layers import ActLayer, NormLayer, classifier
from .base import SegmentationModel


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
