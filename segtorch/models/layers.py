"""Small building blocks shared by every backbone and head.

Modules take ``norm_layer`` (a callable ``channels -> nn.Module``) and ``act_layer`` (a callable
``() -> nn.Module``), as timm does. ``ConvNormAct`` is an ``nn.Sequential`` so its parameters are named
``0.weight``, ``1.weight``, ... exactly like the toolbox's ``nn.Sequential(conv, norm, act)`` blocks, which
keeps published state dicts loadable without renaming.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

import torch.nn as nn

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]

# a card's normalisation names -> layer classes. SyncBatchNorm only differs while training on several GPUs;
# inference uses plain BatchNorm (the trainer converts with nn.SyncBatchNorm.convert_sync_batchnorm when asked).
NORMS = {"batchnorm": nn.BatchNorm2d, "syncbatchnorm": nn.BatchNorm2d, "layernorm": nn.LayerNorm}
ACTIVATIONS = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "gelu": nn.GELU}


def exporting_to_onnx() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without importing ``torch.onnx`` where nothing has: an export has
    imported it, and importing it took ~30 ms of the first forward pass of every PSPNet and ViT model."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def norm_by_name(name: str, eps: float | None = None) -> NormLayer:
    """``"batchnorm"`` / ``"syncbatchnorm"`` / ``"layernorm"`` (with an optional ``eps``) -> ``channels -> module``."""
    if name not in NORMS:
        raise ValueError(f"unknown normalisation {name!r}; known: {', '.join(NORMS)}")
    return functools.partial(NORMS[name], eps=eps) if eps is not None else NORMS[name]


def activation_by_name(name: str, negative_slope: float | None = None, inplace: bool = True) -> ActLayer:
    """``"relu"`` / ``"leakyrelu"`` (with ``negative_slope``) / ``"gelu"`` -> ``() -> module``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    if name == "gelu":
        return nn.GELU
    kwargs = {"inplace": inplace}
    if negative_slope is not None:
        if name != "leakyrelu":
            raise ValueError(f"negative_slope is a leakyrelu setting, not one of {name!r}")
        kwargs["negative_slope"] = negative_slope
    return functools.partial(ACTIVATIONS[name], **kwargs)


def not_inplace(act_layer: ActLayer) -> ActLayer:
    """The same activation without ``inplace`` (for outputs that are reused afterwards)."""
    if isinstance(act_layer, functools.partial) and act_layer.keywords.get("inplace"):
        return functools.partial(act_layer.func, *act_layer.args, **{**act_layer.keywords, "inplace": False})
    return act_layer


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> norm -> act; state-dict keys ``0.*`` (conv), ``1.*`` (norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer | None = nn.ReLU):
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=False),
            norm_layer(out_channels),
        ]
        if act_layer is not None:
            layers.append(act_layer())
        super().__init__(*layers)


def classifier(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout2d -> 1x1 conv with bias: the toolbox's last two layers of every decoder."""
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(in_channels, num_classes, kernel_size=1))


def stage_decoder(in_channels: int, feats_channels: int, num_classes: int, dropout: float,
                  norm_layer: NormLayer, act_layer: ActLayer) -> nn.Sequential:
    """The two-stage heads' decoders (ISNet, MCIBI, IDRNet): 1x1 conv-norm-act, then ``classifier``, in one
    Sequential (keys ``0.*``, ``1.*``, ``4.*``)."""
    return nn.Sequential(*ConvNormAct(in_channels, feats_channels, 1, norm_layer=norm_layer, act_layer=act_layer),
                         *classifier(feats_channels, num_classes, dropout))
