"""ResNeSt: a ResNet-D (deep stem, average-pool shortcut) whose 3x3 convs are split-attention convs.

Parameter names follow the toolbox's ResNeSt (``stem``, ``layer1..4``, ``conv2.conv/bn0/fc1/bn1/fc2``,
``downsample.1/2``), so published state dicts load unchanged. Only the block differs from ``ResNet``:
the stem, the stage layout, dilation for output stride 8/16 and ``forward`` are inherited.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, NormLayer
from .resnet import RELU, ResNet, make_res_layer


class SplitAttentionConv2d(nn.Module):
    """A grouped conv producing ``radix`` candidate maps per channel, mixed by a softmax over the radix
    whose weights come from the globally pooled sum of the candidates (one SE-like gate per split)."""

    fold_pairs = (("conv", "bn0"), ("fc1", "bn1"))  # (conv, its BatchNorm) for fuse_bn

    def __init__(self, in_channels: int, channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, radix: int = 2, reduction_factor: int = 4,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = RELU):
        super().__init__()
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix = radix
        self.groups = groups
        self.conv = nn.Conv2d(in_channels, channels * radix, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups * radix, bias=False)
        self.bn0 = norm_layer(channels * radix)
        # one activation module, applied to the candidates and to the gate's hidden layer
        self.relu = act_layer()
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=groups)
        self.bn1 = norm_layer(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=groups)

    def radix_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, radix*C, 1, 1) gate logits laid out as (group, radix, c) -> weights laid out as (radix, group, c)."""
        batch = logits.shape[0]
        if self.radix == 1:
            return torch.sigmoid(logits).reshape(batch, -1)
        logits = logits.reshape(batch, self.groups, self.radix, -1).transpose(1, 2)
        return F.softmax(logits, dim=1).reshape(batch, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv(x)))
        batch = x.shape[0]
        if self.radix > 1:
            splits = x.unflatten(1, (self.radix, -1))  # (B, radix, C, H, W)
            gap = splits.sum(dim=1)
        else:
            gap = x
        gap = F.adaptive_avg_pool2d(gap, 1)
        gap = self.relu(self.bn1(self.fc1(gap)))
        atten = self.radix_softmax(self.fc2(gap))
        if self.radix > 1:
            return (atten.reshape(batch, self.radix, -1, 1, 1) * splits).sum(dim=1)
        return atten.reshape(batch, -1, 1, 1) * x


class SplitAttentionBottleneck(nn.Module):
    """ResNeSt bottleneck: 1x1 -> split-attention 3x3 -> (3x3 average pool when strided) -> 1x1.

    With ``avg_after_conv2`` (the toolbox default) a strided block runs its split-attention conv at stride 1
    and downsamples afterwards with a 3x3 average pool. There is no ``bn2``: the split-attention conv
    normalises and activates internally, and its output goes to ``conv3`` without a further activation.
    """

    fold_pairs = (("conv1", "bn1"), ("conv3", "bn3"))  # (conv, its BatchNorm) for fuse_bn

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = RELU, radix: int = 2, groups: int = 1, base_width: int = 4,
                 base_channels: int = 64, reduction_factor: int = 4, avg_after_conv2: bool = True):
        super().__init__()
        width = planes if groups == 1 else math.floor(planes * (base_width / base_channels)) * groups
        self.avg_after_conv2 = avg_after_conv2 and stride > 1
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = SplitAttentionConv2d(width, width, 3, stride=1 if self.avg_after_conv2 else stride,
                                          padding=dilation, dilation=dilation, groups=groups, radix=radix,
                                          reduction_factor=reduction_factor, norm_layer=norm_layer,
                                          act_layer=act_layer)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = act_layer()
        self.downsample = downsample
        if self.avg_after_conv2:
            self.avg_layer = nn.AvgPool2d(3, stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.avg_after_conv2:
            out = self.avg_layer(out)
        out = self.bn3(self.conv3(out))
        out += identity  # in place: out is this block's own fresh tensor
        return self.relu(out)


class ResNeSt(ResNet):
    """The toolbox's ``resnest{50,101}``: 128-channel deep stem, split attention with radix 2, average-pool
    shortcuts; ``forward`` returns the four stage outputs like ``ResNet``."""

    block = SplitAttentionBottleneck

    def __init__(self, depth: int = 101, output_stride: int = 8, in_channels: int = 3, stem_channels: int = 128,
                 base_channels: int = 64, radix: int = 2, groups: int = 1, base_width: int = 4,
                 reduction_factor: int = 4, use_avg_after_block_conv2: bool = True,
                 use_avg_for_downsample: bool = True, deep_stem: bool = True, contract_dilation: bool = True,
                 out_indices: Sequence[int] = (0, 1, 2, 3), style: str = "pytorch",
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = RELU):
        if style != "pytorch":
            raise ValueError(f"only the 'pytorch' block style is supported, got {style!r}")
        # read by make_layer, which ResNet.__init__ calls, so they must exist before it runs (plain values may
        # be set on an nn.Module before Module.__init__)
        self.avg_down = use_avg_for_downsample
        self.block_kwargs = dict(radix=radix, groups=groups, base_width=base_width, base_channels=base_channels,
                                 reduction_factor=reduction_factor, avg_after_conv2=use_avg_after_block_conv2)
        super().__init__(depth=depth, output_stride=output_stride, in_channels=in_channels,
                         stem_channels=stem_channels, base_channels=base_channels, deep_stem=deep_stem,
                         contract_dilation=contract_dilation, out_indices=out_indices, norm_layer=norm_layer,
                         act_layer=act_layer)

    def make_layer(self, inplanes, planes, num_blocks, stride, dilation, norm_layer, act_layer, contract_dilation):
        return make_res_layer(self.block, inplanes, planes, num_blocks, stride, dilation, norm_layer, act_layer,
                              contract_dilation, avg_down=self.avg_down, **self.block_kwargs)
