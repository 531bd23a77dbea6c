"""HRNetV2: parallel branches at strides 4, 8, 16 and 32, repeatedly fused across resolutions.

Parameter names follow the toolbox's HRNet (``conv1/bn1/conv2/bn2`` stem, ``layer1``, ``transition1..3``,
``stage2..4.<module>.branches/fuse_layers``), so published state dicts load unchanged. ``forward`` returns
a 1-tuple: the four branch outputs upsampled to the stride-4 size and concatenated along channels (the
"V2" representation); segmentors pick it with ``selected_indices`` (0, 0, 0, 0).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, ConvNormAct, NormLayer
from .resnet import Bottleneck


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34 block)."""

    expansion = 1
    fold_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # (conv, its BatchNorm) for fuse_bn

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu = act_layer()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _stages(width: int, blocks: int, modules: tuple[int, int, int]) -> dict:
    """Stage settings of an HRNetV2 whose branch widths are width * (1, 2, 4, 8)."""
    return {
        "stage1": dict(num_modules=1, block="BOTTLENECK", num_blocks=(blocks,), num_channels=(64,)),
        **{f"stage{s}": dict(num_modules=modules[s - 2], block="BASIC", num_blocks=(blocks,) * s,
                             num_channels=tuple(width * 2 ** b for b in range(s))) for s in (2, 3, 4)},
    }


ARCH_SETTINGS = {
    "hrnetv2_w18_small": _stages(18, 2, (1, 3, 2)),
    "hrnetv2_w18": _stages(18, 4, (1, 4, 3)),
    "hrnetv2_w32": _stages(32, 4, (1, 4, 3)),
    "hrnetv2_w40": _stages(40, 4, (1, 4, 3)),
    "hrnetv2_w48": _stages(48, 4, (1, 4, 3)),
}


def make_branch(block: type[nn.Module], inplanes: int, planes: int, num_blocks: int, norm_layer: NormLayer,
                act_layer: ActLayer) -> nn.Sequential:
    """``num_blocks`` blocks at one resolution; a 1x1 projection on the first one if the width changes."""
    outplanes = planes * block.expansion
    downsample = (ConvNormAct(inplanes, outplanes, 1, 1, norm_layer=norm_layer, act_layer=None)
                  if inplanes != outplanes else None)
    blocks = [block(inplanes, planes, downsample=downsample, norm_layer=norm_layer, act_layer=act_layer)]
    blocks += [block(outplanes, planes, norm_layer=norm_layer, act_layer=act_layer) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class HRModule(nn.Module):
    """Runs each branch, then every output branch i sums all branches brought to its resolution: lower
    resolutions by 1x1 conv + upsampling, higher ones by a chain of stride-2 3x3 convs."""

    def __init__(self, block: type[nn.Module], num_blocks: Sequence[int], in_channels: Sequence[int],
                 num_channels: Sequence[int], multiscale_output: bool, norm_layer: NormLayer, act_layer: ActLayer):
        super().__init__()
        self.num_branches = len(num_channels)
        self.branches = nn.ModuleList(
            make_branch(block, in_channels[i], num_channels[i], num_blocks[i], norm_layer, act_layer)
            for i in range(self.num_branches))
        channels = [c * block.expansion for c in num_channels]
        self.out_channels = channels
        self.fuse_layers = None
        if self.num_branches > 1:
            num_outputs = self.num_branches if multiscale_output else 1
            self.fuse_layers = nn.ModuleList(
                nn.ModuleList(self.fuse_layer(channels, i, j, norm_layer, act_layer) for j in range(self.num_branches))
                for i in range(num_outputs))
        self.relu = act_layer()

    @staticmethod
    def fuse_layer(channels: Sequence[int], i: int, j: int, norm_layer: NormLayer,
                   act_layer: ActLayer) -> nn.Module | None:
        """Path from branch j to branch i's resolution and width (None for j == i)."""
        if j == i:
            return None
        if j > i:
            # the toolbox upsamples by the nominal factor here and resizes to the exact size again in forward;
            # for odd sizes the two differ, so both resizes are kept
            return nn.Sequential(nn.Conv2d(channels[j], channels[i], 1, bias=False), norm_layer(channels[i]),
                                 nn.Upsample(scale_factor=2 ** (j - i), mode="bilinear", align_corners=False))
        steps = [ConvNormAct(channels[j], channels[j], 3, 2, norm_layer=norm_layer, act_layer=act_layer)
                 for _ in range(i - j - 1)]
        steps.append(ConvNormAct(channels[j], channels[i], 3, 2, norm_layer=norm_layer, act_layer=None))
        return nn.Sequential(*steps)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        outs = []
        for i, paths in enumerate(self.fuse_layers):
            y = None
            for j, (path, x) in enumerate(zip(paths, xs)):
                if j == i:
                    term = x
                elif j > i:
                    term = F.interpolate(path(x), size=xs[i].shape[2:], mode="bilinear", align_corners=False)
                else:
                    term = path(x)
                # accumulate in branch order, starting from a fresh tensor (the inputs must stay intact)
                y = term.clone() if y is None else y.add_(term)
            outs.append(self.relu(y))
        return outs


def make_transition(pre_channels: Sequence[int], cur_channels: Sequence[int], norm_layer: NormLayer,
                    act_layer: ActLayer) -> nn.ModuleList:
    """Adapts the previous stage's branches to the next stage: a 3x3 conv where a width changes, and new
    lower-resolution branches made from the previous lowest one by stride-2 3x3 convs."""
    layers: list[nn.Module | None] = []
    for i, channels in enumerate(cur_channels):
        if i < len(pre_channels):
            layers.append(None if channels == pre_channels[i]
                          else ConvNormAct(pre_channels[i], channels, 3, 1, norm_layer=norm_layer, act_layer=act_layer))
        else:
            num_steps = i + 1 - len(pre_channels)
            src = pre_channels[-1]
            layers.append(nn.Sequential(*(
                ConvNormAct(src, channels if k == num_steps - 1 else src, 3, 2, norm_layer=norm_layer,
                            act_layer=act_layer)
                for k in range(num_steps))))
    return nn.ModuleList(layers)


class HRNet(nn.Module):
    """The toolbox's ``hrnetv2_w{18,32,40,48}`` (and ``_w18_small``).

    ``first_stem_activation=False`` drops the activation after the first stem conv, as the MCIBI Cityscapes
    checkpoint expects (the toolbox's ``mcibi_version``).
    """

    fold_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # (conv, its BatchNorm) for fuse_bn

    def __init__(self, arch: str = "hrnetv2_w48", in_channels: int = 3, multiscale_output: bool = True,
                 first_stem_activation: bool = True, norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = nn.ReLU, stages: Mapping[str, Mapping] | None = None):
        super().__init__()
        if stages is None:
            if arch not in ARCH_SETTINGS:
                raise ValueError(f"unsupported HRNet arch {arch!r}; known: {sorted(ARCH_SETTINGS)}")
            stages = ARCH_SETTINGS[arch]
        self.first_stem_activation = first_stem_activation
        # stem: two stride-2 3x3 convs (stride 4 overall)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm_layer(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = norm_layer(64)
        self.relu = act_layer()
        # stage 1: a single bottleneck branch
        cfg = stages["stage1"]
        block = BLOCKS[cfg["block"]]
        self.layer1 = make_branch(block, 64, cfg["num_channels"][0], cfg["num_blocks"][0], norm_layer, act_layer)
        channels = [cfg["num_channels"][0] * block.expansion]
        # stages 2-4: one more branch each, the last one optionally fusing into the highest resolution only
        for s in (2, 3, 4):
            cfg = stages[f"stage{s}"]
            block = BLOCKS[cfg["block"]]
            cur = [c * block.expansion for c in cfg["num_channels"]]
            self.add_module(f"transition{s - 1}", make_transition(channels, cur, norm_layer, act_layer))
            modules = []
            for m in range(cfg["num_modules"]):
                multiscale = multiscale_output or s < 4 or m < cfg["num_modules"] - 1
                modules.append(HRModule(block, cfg["num_blocks"], cur, cfg["num_channels"], multiscale,
                                        norm_layer, act_layer))
                cur = modules[-1].out_channels
            self.add_module(f"stage{s}", nn.Sequential(*modules))
            channels = cur
        # one output: every branch upsampled and concatenated (or the highest resolution alone)
        self.out_channels = (sum(channels) if multiscale_output else channels[0],)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.bn1(self.conv1(x))
        if self.first_stem_activation:
            x = self.relu(x)
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for s in (2, 3, 4):
            transition = getattr(self, f"transition{s - 1}")
            # existing branches pass through (or get re-widened); new ones grow from the lowest resolution
            xs = [xs[i] if layer is None else layer(xs[i] if i < len(xs) else xs[-1])
                  for i, layer in enumerate(transition)]
            xs = getattr(self, f"stage{s}")(xs)
        size = xs[0].shape[2:]  # the stride-4 branch is the largest (each stride-2 conv gives ceil(n / 2))
        out = torch.cat([F.interpolate(y, size=size, mode="bilinear", align_corners=False) for y in xs], dim=1)
        return (out,)
