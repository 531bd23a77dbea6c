"""Backbone + decode head (+ auxiliary heads), and the builder that makes one from a card's architecture.

Every segmentor keeps the toolbox's top-level attribute names (``backbone_net``, ``ppm_net``, ``decoder``,
``auxiliary_decoder``, ...) so its state dict loads with ``strict=True``. ``model(x)`` returns the main
head's class scores at the head's output stride: the tensor the toolbox returns as ``seg_logits`` in test mode.
"""
from __future__ import annotations

import copy
import importlib
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ActLayer, NormLayer, act_layer_from_cfg, norm_layer_from_cfg

# segmentor type (as in the toolbox's configs) -> "module:class"; imported only when built
SEGMENTORS = {
    "PSPNet": "segtorch.models.heads.psp:PSPNet",
    "UPerNet": "segtorch.models.heads.upernet:UPerNet",
    "ISNet": "segtorch.models.heads.isnet:ISNet",
    "MCIBI": "segtorch.models.heads.mcibi:MCIBI",
    "IDRNet": "segtorch.models.heads.idrnet:IDRNet",
}
BACKBONES = {
    "ResNet": "segtorch.models.backbones.resnet:ResNet",
    "ResNeSt": "segtorch.models.backbones.resnest:ResNeSt",
    "HRNet": "segtorch.models.backbones.hrnet:HRNet",
    "VisionTransformer": "segtorch.models.backbones.vit:VisionTransformer",
    "SwinTransformer": "segtorch.models.backbones.swin:SwinTransformer",
}


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class Segmentor(nn.Module):
    """Base class: runs the backbone, picks the feature maps the head uses, calls ``decode``.

    Subclasses build their head in ``__init__`` under the toolbox's attribute names and implement ``decode``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, selected_indices: Sequence[int] | None = None,
                 align_corners: bool = False):
        super().__init__()
        self.backbone_net = backbone
        self.num_classes = num_classes
        self.selected_indices = tuple(selected_indices) if selected_indices is not None else None
        self.align_corners = align_corners

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.backbone_net(x)
        if self.selected_indices is None:
            return list(outs)
        return [outs[i] for i in self.selected_indices]

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.features(x))

    # ---- training ---------------------------------------------------------------------------------------
    def set_auxiliary(self, auxiliary: nn.Module | None) -> None:
        """Attach (or, with None, drop) the training-only auxiliary decoder(s)."""
        if auxiliary is None:
            if hasattr(self, "auxiliary_decoder"):
                del self.auxiliary_decoder
        else:
            self.auxiliary_decoder = auxiliary

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores of every head, keyed by the loss names of the card (``loss_cls``, ``loss_aux``, ...), at the
        head's own resolution. Families with extra supervised outputs override ``decode_train``."""
        feats = self.features(x)
        preds = self.decode_train(feats)
        preds.update(self.auxiliary_preds(feats))
        return preds

    def auxiliary_preds(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The auxiliary decoders' scores (``loss_aux`` or ``loss_aux1..n``) on the stages before the last."""
        aux = getattr(self, "auxiliary_decoder", None)
        if aux is None:
            return {}
        inputs = feats[:-1]
        if isinstance(aux, nn.ModuleList):
            return {f"loss_aux{i + 1}": dec(f) for i, (f, dec) in enumerate(zip(inputs[-len(aux):], aux))}
        return {"loss_aux": aux(inputs[-1])}

    def train_forward(self, x: torch.Tensor, labels: torch.Tensor, *, head_cfg: Mapping, learning_rate: float,
                      epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """One training forward as the toolbox's TRAIN mode runs it: ``(preds, extra)``. ``preds`` are the
        scores scored against ``labels`` (N, H, W; -100 unlabelled) under the card's losses; ``extra`` maps
        further loss names to ``(scores, targets, loss_cfg)``. Families that update statistics from the labels
        while training (MCIBI's memory, IDRNet's class relations) override this and do so in place."""
        return self.forward_train(x), {}

    def decode_train(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss_cls": self.decode(feats)}

    def resize(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


def auxiliary_decoder(in_channels: int, out_channels: int, num_classes: int, dropout: float = 0.1,
                      num_convs: int = 1, upsample: Mapping | None = None, norm_layer: NormLayer = nn.BatchNorm2d,
                      act_layer: ActLayer = nn.ReLU) -> nn.Sequential:
    """The toolbox's DefaultAuxiliaryDecoder: ``num_convs`` x (3x3 conv, norm, act[, upsample]), dropout,
    1x1 classifier. The parameter-free layers stay in the Sequential so the indices in the keys match."""
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False), norm_layer(out_channels), act_layer()]
        if upsample is not None:
            layers.append(nn.Upsample(**upsample))
        channels = out_channels
    layers += [nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)]
    return nn.Sequential(*layers)


# config keys that name or fetch pretrained weights and say nothing about the structure
NON_STRUCTURAL_BACKBONE_KEYS = ("structure_type", "pretrained", "pretrained_model_path", "use_checkpoint")


def build_backbone(cfg: Mapping, norm_layer: NormLayer) -> nn.Module:
    """``cfg``: the toolbox's backbone config. A backbone class takes those keys as constructor arguments,
    or offers ``from_config(cfg, norm_layer=..., [act_layer=...])`` where the names differ.

    The toolbox hands a backbone the segmentor's normalisation but never its activation: a backbone uses its
    own default activation unless its config has ``act_cfg`` (the LIP configs' LeakyReLU is for the heads).
    """
    cfg = {k: v for k, v in cfg.items() if k not in NON_STRUCTURAL_BACKBONE_KEYS}
    kind = cfg.pop("type")
    if kind not in BACKBONES:
        raise ValueError(f"unsupported backbone {kind!r}; known: {sorted(BACKBONES)}")
    kwargs = {"norm_layer": norm_layer}
    if "act_cfg" in cfg:
        kwargs["act_layer"] = act_layer_from_cfg(cfg.pop("act_cfg"))
    cls = _import(BACKBONES[kind])
    if hasattr(cls, "from_config"):
        return cls.from_config(cfg, **kwargs)
    return cls(**cfg, **kwargs)


def build_segmentor(architecture: Mapping, auxiliary: bool = False) -> Segmentor:
    """Build the nn.Module a card's ``architecture`` describes (random init).

    ``architecture`` uses the toolbox's config vocabulary: ``type``, ``num_classes``, ``align_corners``,
    ``norm_cfg``, ``act_cfg``, ``backbone``, ``head`` and (for training) ``auxiliary``.
    """
    arch = copy.deepcopy(dict(architecture))
    kind = arch["type"]
    if kind not in SEGMENTORS:
        raise ValueError(f"unsupported segmentor {kind!r}; known: {sorted(SEGMENTORS)}")
    norm_layer = norm_layer_from_cfg(arch.get("norm_cfg"))
    act_layer = act_layer_from_cfg(arch.get("act_cfg"))
    backbone_cfg = dict(arch["backbone"])
    backbone_norm = norm_layer_from_cfg(backbone_cfg.pop("norm_cfg")) if "norm_cfg" in backbone_cfg else norm_layer
    selected = backbone_cfg.pop("selected_indices", None)
    backbone = build_backbone(backbone_cfg, backbone_norm)
    cls = _import(SEGMENTORS[kind])
    model = cls.from_config(arch, backbone=backbone, selected_indices=selected, norm_layer=norm_layer,
                            act_layer=act_layer)
    if auxiliary and arch.get("auxiliary"):
        aux_cfgs = arch["auxiliary"]
        aux_cfgs = [aux_cfgs] if isinstance(aux_cfgs, Mapping) else list(aux_cfgs)
        decoders = [auxiliary_decoder(c["in_channels"], c["out_channels"], arch["num_classes"],
                                      dropout=c.get("dropout", 0.1), num_convs=c.get("num_convs", 1),
                                      upsample=c.get("upsample"),
                                      norm_layer=norm_layer, act_layer=act_layer) for c in aux_cfgs]
        model.set_auxiliary(decoders[0] if len(decoders) == 1 else nn.ModuleList(decoders))
    return model
