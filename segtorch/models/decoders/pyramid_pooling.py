"""The Pyramid Pooling Module (PSPNet, UPerNet, the "ppm" context heads), its size-dependent pooling (exportable),
and the split bottleneck that the inference fast path and the ONNX export run."""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ActLayer, ConvNormAct, NormLayer, exporting_to_onnx


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
        conv = self.bottleneck[0]
        if isinstance(conv, SplitBottleneckConv):
            y = conv(x, [branch(x) for branch in self.branches], self.align_corners)
            for layer in list(self.bottleneck)[1:]:  # norm (Identity once folded), activation
                y = layer(y)
            return y
        size = x.shape[2:]
        levels = [x] + [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=self.align_corners)
                        for branch in self.branches]
        return self.bottleneck(torch.cat(levels, dim=1))

    @torch.no_grad()
    def split_bottleneck(self, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        """Inference only: replace the bottleneck's convolution by ``SplitBottleneckConv`` (same function; the
        state dict's layout changes, as with folded BatchNorm)."""
        conv = self.bottleneck[0]
        if isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and conv.groups == 1:
            self.bottleneck[0] = SplitBottleneckConv(conv, len(self.branches), memory_format)


def split_pyramid_bottlenecks(model: nn.Module, memory_format: torch.memory_format = torch.contiguous_format
                              ) -> nn.Module:
    """``split_bottleneck`` on every pyramid pooling module of ``model`` (PSPNet, UPerNet, and the heads that
    choose the "ppm" context); returns ``model``, changed in place."""
    for module in model.modules():
        if isinstance(module, PyramidPoolingModule):
            module.split_bottleneck(memory_format)
    return model


@contextlib.contextmanager
def pyramid_bottlenecks_split(model: nn.Module):
    """``split_pyramid_bottlenecks`` for the length of a block, then the original convolutions back (the
    export traces the split form and checks it against the model as it was)."""
    modules = [m for m in model.modules() if isinstance(m, PyramidPoolingModule)]
    originals = [m.bottleneck[0] for m in modules]
    try:
        split_pyramid_bottlenecks(model)
        yield model
    finally:
        for module, conv in zip(modules, originals):
            module.bottleneck[0] = conv


def tap_interpolation(out_size: int | torch.SymInt, in_size: int, kernel: int, padding: int, dilation: int,
                      align_corners: bool) -> torch.Tensor:
    """``(out_size, kernel * in_size)`` float64: for each tap ``t`` of a convolution along one axis, the
    bilinear upsampling ``in_size -> out_size`` (``F.interpolate``'s source positions) shifted to that tap,
    zero where the tap falls in the padding. Row ``o``, column ``t * in_size + i``: the weight of input ``i`` in
    the upsampled value that tap ``t`` reads at output ``o``. Tensor operations only, with ``out_size`` taken
    from tensors, so that an exported graph builds the matrix from each input's size (like
    ``adaptive_pool_matrix``)."""
    f64 = torch.float64
    rows = torch.arange(out_size)
    dst = rows.to(f64)
    # out_size - 1, as a tensor of one element: a maximum, not rows[-1:], whose length torch.export derives
    # as out_size - max(0, out_size - 1) and cannot reconcile with Swin's padded sizes
    end = rows.amax(0, keepdim=True)
    last = end.to(f64)
    # tensor / tensor: a Python number divided by a tensor is computed as a reciprocal times it (1 ulp off)
    if align_corners:
        src = dst * (torch.full_like(last, in_size - 1.0) / last.clamp_min(1.0))
    else:
        src = ((dst + 0.5) * (torch.full_like(last, float(in_size)) / (last + 1.0)) - 0.5).clamp_min(0.0)
    low = src.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    frac = src - low
    cols = torch.arange(in_size)
    upsample = ((cols == low[:, None]).to(f64) * (1.0 - frac)[:, None]
                + (cols == high[:, None]).to(f64) * frac[:, None])  # (out_size, in_size)
    taps = []
    for t in range(kernel):  # the tap reads the upsampled map at o + offset; zero outside it
        q = rows + (t * dilation - padding)
        inside = ((q >= 0) & (q <= end)).to(f64)
        taps.append(upsample.index_select(0, torch.minimum(q.clamp_min(0), end)) * inside[:, None])
    return torch.stack(taps, dim=1).flatten(1)


@functools.lru_cache(maxsize=256)
def _cached_tap_interpolation(out_size: int, in_size: int, kernel: int, padding: int, dilation: int,
                              align_corners: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tap_interpolation`` in ``dtype`` on ``device``, for eager forward passes (cached: a GPU's crops copy
    nothing from the host; an ordinary tensor even when first asked for under ``inference_mode``, so that a
    later forward pass with autograd can use it)."""
    with torch.inference_mode(False):
        return tap_interpolation(out_size, in_size, kernel, padding, dilation, align_corners).to(dtype=dtype,
                                                                                                 device=device)


class SplitBottleneckConv(nn.Module):
    """The pyramid pooling bottleneck's convolution, split by its input's parts: the backbone features, as
    before, plus each pooled branch's share computed at the branch's own tiny scale.

    conv(upsample(p)) = sum over the kernel's taps of shift(upsample(W_tap p)): both are linear, so each tap's
    1x1 product runs on the s x s pooled map, and upsampling and shifting become two small matrix products
    (``tap_interpolation``). Exact in real arithmetic; in float32 as close to the float64 answer as the
    concatenated convolution (tests/test_parity.py holds every PPM checkpoint to it). It skips half of the
    bottleneck's input channels (PSPNet's 3x3 convolution over 4096 channels was 37% of its time), the
    upsampled branches and their concatenation. Exported graphs run it too (``segtorch.export``)."""

    def __init__(self, conv: nn.Conv2d, num_branches: int, memory_format: torch.memory_format):
        super().__init__()
        weight = conv.weight.detach()
        out_channels, total_in, kh, kw = weight.shape
        self.in_channels = total_in - num_branches * out_channels
        self.kernel_size, self.padding, self.dilation = conv.kernel_size, conv.padding, conv.dilation
        self.weight = nn.Parameter(weight[:, :self.in_channels].contiguous(memory_format=memory_format),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        # per branch, (out, kh, kw) x branch channels: one 1x1 convolution gives every tap's product at once;
        # the branches stacked along the first axis (4-D, as Module.to(memory_format=...) needs)
        self.num_branches = num_branches
        taps = weight[:, self.in_channels:].reshape(out_channels, num_branches, out_channels, kh, kw)
        self.branch_taps = nn.Parameter(taps.permute(1, 0, 3, 4, 2).reshape(
            num_branches * out_channels * kh * kw, out_channels, 1, 1).contiguous(), requires_grad=False)

    def merged_weight(self) -> torch.Tensor:
        """The original convolution's weight (``(out, in + branches * out, kh, kw)``)."""
        nb, cb = self.num_branches, self.branch_taps.shape[1]
        out, (kh, kw) = self.weight.shape[0], self.kernel_size
        taps = self.branch_taps.reshape(nb, out, kh, kw, cb).permute(1, 0, 4, 2, 3).reshape(out, nb * cb, kh, kw)
        return torch.cat([self.weight, taps.to(self.weight.dtype)], dim=1)

    def forward(self, x: torch.Tensor, pooled: list[torch.Tensor], align_corners: bool = False) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation)
        n, out, h, w = y.shape
        # eager passes cache the matrices per size; an exported graph builds them from each input's size
        interpolation = _cached_tap_interpolation.__wrapped__ if exporting_to_onnx() else _cached_tap_interpolation
        (kh, kw), (ph, pw), (dh, dw) = self.kernel_size, self.padding, self.dilation
        rows, shares = [], []
        for p, taps in zip(pooled, self.branch_taps.chunk(self.num_branches)):
            s, t = p.shape[2:]
            prods = F.conv2d(p, taps).reshape(n, out, kh, kw, s, t)  # each tap's product at the pooled scale
            cols = interpolation(w, t, kw, pw, dw, align_corners, prods.dtype, prods.device)
            # along the width: (n, out, kh * s, kw * t) @ (kw * t, w): rows still at the pooled scale
            shares.append(torch.matmul(prods.permute(0, 1, 2, 4, 3, 5).reshape(n, out, kh * s, kw * t), cols.t()))
            rows.append(interpolation(h, s, kh, ph, dh, align_corners, prods.dtype, prods.device))
        share = torch.cat(shares, dim=2)  # (n, out, K, w), K = kh * (sum of the scales)
        rows_all = torch.cat(rows, dim=1)  # (h, K)
        if y.is_contiguous(memory_format=torch.channels_last):  # the sum in y's own (NHWC) layout
            k = share.shape[2]
            nhwc = torch.matmul(rows_all, share.permute(0, 2, 3, 1).reshape(n, k, w * out))
            return y.add_(nhwc.view(n, h, w, out).permute(0, 3, 1, 2))
        return y.add_(torch.matmul(rows_all, share))
