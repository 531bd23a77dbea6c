"""Folding eval-mode BatchNorm into the convolution before it (one op and one pass over memory fewer).

A pair is folded only where the convolution's output goes nowhere but into the BatchNorm:
- consecutive children ``conv, bn`` of a plain ``nn.Sequential`` (``ConvNormAct``, downsample branches);
- the ``(conv, bn)`` attribute names a module class declares in ``fold_pairs`` (its author's promise that
  its forward only ever computes ``bn(conv(x))``): nothing is read from source files, so folding works the
  same from a wheel, a zip or compiled files.
The folded model's state dict differs (BatchNorm keys gone, convolutions gain a bias): fold after loading.
Pass ``example`` to check the outputs: if they move by more than ``rtol`` the model is restored unchanged.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and isinstance(bn, _BatchNorm) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels and isinstance(conv.weight, nn.Parameter))


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Every foldable (parent module, conv child name, bn child name) in ``model``."""
    pairs = []
    for parent in model.modules():
        children = parent._modules
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            names = list(children)
            candidates = zip(names, names[1:])
        else:
            candidates = getattr(type(parent), "fold_pairs", ())
        for a, b in candidates:
            if a in children and b in children and _foldable(children[a], children[b]):
                pairs.append((parent, a, b))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: _BatchNorm, memory_format: torch.memory_format) -> None:
    # y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    shift = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = conv.weight
    # the per-channel factors in float64, the (large) weight tensor scaled in its own dtype: one rounding.
    # Into a fresh tensor, never in place: weights read from a safetensors file are a private memory map, where
    # writing pays a copy-on-write fault per 4 KiB page (7x the time of filling fresh memory); and in the
    # layout the model will run in, so that a channels-last model needs no second copy of its weights
    factor = scale.to(w.dtype).view(-1, 1, 1, 1)
    folded = torch.empty_like(w, memory_format=memory_format, requires_grad=False)
    conv.weight = nn.Parameter(torch.mul(w.detach(), factor, out=folded), requires_grad=False)
    conv.bias = nn.Parameter(shift.to(w.dtype), requires_grad=False)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor | None = None, rtol: float = 1e-4,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   memory_format: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into it; returns ``model``, changed in
    place (each folded convolution gets new weight and bias tensors; the loaded ones are not written).

    ``memory_format``: the folded weights' layout (``torch.channels_last`` for a model that will run NHWC).

    With ``example`` (an input batch), the outputs before and after are compared; if their relative error
    exceeds ``rtol`` every change is undone and a warning says so. ``forward`` defaults to ``model``.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first)")
    run = forward or model
    reference = run(example).float() if example is not None else None
    undo = []
    for parent, conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = parent._modules[conv_name], parent._modules[bn_name]
        undo.append((parent, conv, conv.weight, conv.bias, bn_name, bn))
        _fold(conv, bn, memory_format)
        parent._modules[bn_name] = nn.Identity()
    if reference is not None and undo:
        err = _relative_error(run(example).float(), reference)
        if not err <= rtol:
            for parent, conv, weight, bias, bn_name, bn in reversed(undo):
                conv.weight, conv.bias = weight, bias
                parent._modules[bn_name] = bn
            warnings.warn(f"fold_batchnorm: outputs moved by {err:.2e} (> {rtol:.0e}); model left unfolded",
                          stacklevel=2)
    return model
