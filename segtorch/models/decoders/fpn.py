"""UPerNet's feature pyramid: lateral and output convolutions over the earlier stages, fused with the pyramid
pooling output (also IDRNet's UPerNet decoder)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, ConvNormAct, NormLayer, not_inplace


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
