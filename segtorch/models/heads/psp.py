"""PSPNet: the Pyramid Pooling Module on the last backbone stage, then a 1x1 classifier."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, ConvNormAct, NormLayer, classifier, exporting_to_onnx
from ..segmentor import SegmentationModel


def adaptive_pool_matrix(size: int | torch.Tensor, bins: int, device: torch.device, dtype: torch.dtype
                         ) -> torch.Tensor:
    """``(bins, size)`` averaging weights of ``adaptive_avg_pool`` along one axis: bin ``i`` covers
    ``[floor(i * size / bins), ceil((i + 1) * size / bins))``. Written with integer comparisons only
    (``(h + 1) * bins > i * size`` and ``h * bins < (i + 1) * size``), so that an exported graph computes the
    bins from the input size at run time instead of freezing the traced size's bins."""
    pos = torch.arange(size, device=device).unsqueeze(0)
    i = torch.arange(bins, device=device).unsqueeze(1)
    inside = ((pos + 1) * bins > i * size) & (pos * bins < (i + 1) * size)
    weights = inside.to(dtype)
    return weights / weights.sum(dim=1, keepdim=True)


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(bins)`` whose exported graph stays right at every input size.

    Eager runs use ``F.adaptive_avg_pool2d`` (the toolbox's kernel, bit for bit); while exporting to ONNX the
    same averages are two matrix products with weights built from the input size (``adaptive_pool_matrix``):
    the exporters otherwise bake the traced size's bins into the graph."""

    def __init__(self, bins: int):
        super().__init__()
        self.bins = int(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not exporting_to_onnx():
            return F.adaptive_avg_pool2d(x, self.bins)
        return size_dependent_avg_pool(x, self.bins)

    def extra_repr(self) -> str:
        return f"bins={self.bins}"


def size_dependent_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` as ``P_h @ x @ P_w^T`` (equal up to rounding at every size)."""
    rows = adaptive_pool_matrix(x.shape[2], bins, x.device, x.dtype)
    cols = adaptive_pool_matrix(x.shape[3], bins, x.device, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class PyramidPoolingModule(nn.Module):
    """Average-pool to each scale, 1x1 conv, upsample back, concatenate with the input, 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 align_corners: bool = False, norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            nn.Sequential(AdaptiveAvgPool(scale),
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
