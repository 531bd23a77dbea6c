"""UPerNet: PPM on the last stage plus an FPN over the earlier stages, fused and classified."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, ConvNormAct, NormLayer, not_inplace
from ..segmentor import SegmentationModel
from .psp import PyramidPoolingModule


def fpn_layers(in_channels_list: Sequence[int], feats_channels: int, out_channels: int, norm_layer: NormLayer,
               act_layer: ActLayer) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The FPN's 1x1 lateral convs and 3x3 output convs for every level but the top one."""
    lateral_act = not_inplace(act_layer)  # lateral outputs are summed into afterwards
    lateral = nn.ModuleList(ConvNormAct(c, feats_channels, 1, norm_layer=norm_layer, act_layer=lateral_act)
                            for c in in_channels_list[:-1])
    output = nn.ModuleList(ConvNormAct(feats_channels, out_channels, 3, norm_layer=norm_layer, act_layer=lateral_act)
                           for _ in in_channels_list[:-1])
    return lateral, output


def fpn_fuse(feats: Sequence[torch.Tensor], ppm_net: nn.Module, lateral_convs: nn.ModuleList,
             fpn_convs: nn.ModuleList, align_corners: bool) -> torch.Tensor:
    """Top-down FPN over ``feats`` with the PPM output on top; returns all levels concatenated at level 0."""
    laterals = [conv(f) for conv, f in zip(lateral_convs, feats[:-1])]
    laterals.append(ppm_net(feats[-1]))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                          mode="bilinear", align_corners=align_corners)
    outs = [conv(lat) for conv, lat in zip(fpn_convs, laterals[:-1])] + [laterals[-1]]
    size = outs[0].shape[2:]
    outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=align_corners) for o in outs[1:]]
    return torch.cat(outs, dim=1)


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
