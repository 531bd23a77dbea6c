"""ResNet-50/101 with the deep 3x3 stem (ResNet-V1c) and dilated last stages for output stride 8 or 16.

Parameter names follow the toolbox's ResNet (``stem``, ``layer1..4``, ``conv1/bn1/...``, ``downsample``), so
published state dicts load unchanged. ``ResNet.forward`` returns the outputs of the four stages.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..layers import ActLayer, ConvNormAct, NormLayer, activation_by_name

# ReLU in place, as the toolbox builds it: on the CPU an out-of-place activation costs a fresh tensor (page
# faults included) per layer; every input it overwrites is a fresh convolution/norm output no one else reads
RELU = activation_by_name("relu")

# (number of Bottleneck blocks per stage) for each depth
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# output stride -> (strides of the four stages, dilations of the four stages)
OUTSTRIDES = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


class Bottleneck(nn.Module):
    expansion = 4
    fold_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # (conv, its BatchNorm) for fuse_bn

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = RELU):
        super().__init__()
        # "pytorch" style: the stride sits on the 3x3 conv
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = act_layer()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place: out is this block's own fresh tensor
        return self.relu(out)


def make_res_layer(block: type[nn.Module], inplanes: int, planes: int, num_blocks: int, stride: int, dilation: int,
                   norm_layer: NormLayer, act_layer: ActLayer, contract_dilation: bool = True,
                   avg_down: bool = False, **block_kwargs) -> nn.Sequential:
    """One ResNet stage. With ``contract_dilation`` the first block of a dilated stage uses half the dilation.

    ``avg_down`` (ResNeSt, ResNet-D) downsamples the shortcut with an average pool before the 1x1 conv.
    """
    outplanes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        if avg_down:
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(inplanes, outplanes, 1, bias=False), norm_layer(outplanes))
        else:
            downsample = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False),
                                       norm_layer(outplanes))
    dilations = [dilation] * num_blocks
    if contract_dilation and dilation > 1:
        dilations[0] = dilation // 2
    blocks = [block(inplanes, planes, stride=stride, dilation=dilations[0], downsample=downsample,
                    norm_layer=norm_layer, act_layer=act_layer, **block_kwargs)]
    blocks += [block(outplanes, planes, stride=1, dilation=d, norm_layer=norm_layer, act_layer=act_layer,
                     **block_kwargs) for d in dilations[1:]]
    return nn.Sequential(*blocks)


def conv3x3_stem(in_channels: int, stem_channels: int, norm_layer: NormLayer, act_layer: ActLayer) -> nn.Sequential:
    """Three 3x3 convs (stride 2, 1, 1) instead of one 7x7; keys ``stem.0`` ... ``stem.7``."""
    half = stem_channels // 2
    return nn.Sequential(
        *ConvNormAct(in_channels, half, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer),
        *ConvNormAct(half, half, 3, norm_layer=norm_layer, act_layer=act_layer),
        *ConvNormAct(half, stem_channels, 3, norm_layer=norm_layer, act_layer=act_layer),
    )


class ResNet(nn.Module):
    """ResNet-V1c (deep stem) with dilation; the toolbox's ``resnet{50,101}conv3x3stem``."""

    block = Bottleneck
    fold_pairs = (("conv1", "bn1"),)  # (conv, its BatchNorm) for fuse_bn

    def __init__(self, depth: int = 101, output_stride: int = 8, in_channels: int = 3, stem_channels: int = 64,
                 base_channels: int = 64, deep_stem: bool = True, contract_dilation: bool = True,
                 out_indices: Sequence[int] = (0, 1, 2, 3), norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = RELU):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth}; known: {sorted(DEPTHS)}")
        if output_stride not in OUTSTRIDES:
            raise ValueError(f"unsupported output stride {output_stride}; known: {sorted(OUTSTRIDES)}")
        self.out_indices = tuple(out_indices)
        self.deep_stem = deep_stem
        if deep_stem:
            self.stem = conv3x3_stem(in_channels, stem_channels, norm_layer, act_layer)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(stem_channels)
            self.relu = act_layer()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        strides, dilations = OUTSTRIDES[output_stride]
        inplanes = stem_channels
        for i, num_blocks in enumerate(DEPTHS[depth]):
            planes = base_channels * 2 ** i
            layer = self.make_layer(inplanes, planes, num_blocks, strides[i], dilations[i], norm_layer, act_layer,
                                    contract_dilation)
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * self.block.expansion
        # channels of each output (the stages in out_indices)
        self.out_channels = tuple(base_channels * 2 ** i * self.block.expansion for i in self.out_indices)

    def make_layer(self, inplanes, planes, num_blocks, stride, dilation, norm_layer, act_layer, contract_dilation):
        return make_res_layer(self.block, inplanes, planes, num_blocks, stride, dilation, norm_layer, act_layer,
                              contract_dilation)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        return self.maxpool(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.forward_stem(x)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
