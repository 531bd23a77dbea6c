"""Backbone + decode head (+ auxiliary heads), and the builder that makes one from a card's architecture.

Every model keeps the toolbox's top-level attribute names (``backbone_net``, ``ppm_net``, ``decoder``,
``auxiliary_decoder``, ...) so its state dict loads with ``strict=True``. ``model(x)`` returns the main
head's class scores at the head's output stride: the tensor the toolbox returns as ``seg_logits`` in test mode.
"""
from __future__ import annotations

import inspect
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CardError
from .layers import ActLayer, NormLayer, activation_by_name, norm_by_name


class SegmentationModel(nn.Module):
    """Base class: runs the backbone, picks the feature maps the head uses, calls ``decode``.

    Subclasses build their head in ``__init__`` under the toolbox's attribute names (checking the channels
    they expect with ``check_channels``) and implement ``decode``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, selected_indices: Sequence[int] | None = None,
                 align_corners: bool = False):
        super().__init__()
        self.backbone_net = backbone
        self.num_classes = num_classes
        self.selected_indices = tuple(selected_indices) if selected_indices is not None else None
        self.align_corners = align_corners
        outputs = tuple(backbone.out_channels)
        try:
            # channels of each feature map the head receives, in order
            self.feature_channels = outputs if selected_indices is None else tuple(outputs[i] for i in selected_indices)
        except IndexError:
            raise CardError(f"{type(self).__name__}: backbone outputs {list(selected_indices)} selected, but "
                            f"{type(backbone).__name__} has {len(outputs)} outputs") from None

    def check_channels(self, what: str, expected: Sequence[int] | int, features: Sequence[int] | int) -> None:
        """Refuse a head whose ``what`` (``expected`` channels) does not fit the backbone features at
        ``features`` (indices into the selected feature maps)."""
        many = not isinstance(features, int)
        got = tuple(self.feature_channels[i] for i in features) if many else self.feature_channels[features]
        expected = tuple(expected) if many else expected
        if got != expected:
            raise CardError(f"{type(self).__name__}: {what} is {expected}, but the backbone "
                            f"({type(self.backbone_net).__name__}, outputs {self.feature_channels}) gives {got}; "
                            f"fix the card's head or backbone")

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
        aux = getattr(self, "auxiliary_decoder", None)
        if aux is not None:
            inputs = feats[:-1]
            if isinstance(aux, nn.ModuleList):
                for i, (f, dec) in enumerate(zip(inputs[-len(aux):], aux)):
                    preds[f"loss_aux{i + 1}"] = dec(f)
            else:
                preds["loss_aux"] = aux(inputs[-1])
        return preds

    def decode_train(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss_cls": self.decode(feats)}

    def resize(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


def auxiliary_decoder(in_channels: int, out_channels: int, num_classes: int, dropout: float = 0.1,
                      num_convs: int = 1, upsample_scale: float | None = None,
                      norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU) -> nn.Sequential:
    """The toolbox's DefaultAuxiliaryDecoder: ``num_convs`` x (3x3 conv, norm, act[, upsample]), dropout,
    1x1 classifier. The parameter-free layers stay in the Sequential so the indices in the keys match."""
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False), norm_layer(out_channels), act_layer()]
        if upsample_scale is not None:
            layers.append(nn.Upsample(scale_factor=upsample_scale))
        channels = out_channels
    layers += [nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)]
    return nn.Sequential(*layers)


def model_class(name: str) -> type[SegmentationModel]:
    """A card's ``architecture.model`` -> its class (imported here, on first build)."""
    from .heads.idrnet import IDRNet
    from .heads.isnet import ISNet
    from .heads.mcibi import MCIBI
    from .heads.psp import PSPNet
    from .heads.upernet import UPerNet

    models = {"pspnet": PSPNet, "upernet": UPerNet, "isnet": ISNet, "mcibi": MCIBI, "idrnet": IDRNet}
    if name not in models:
        raise CardError(f"unknown model {name!r} in the card's architecture; known: {', '.join(models)}")
    return models[name]


def backbone_class(name: str) -> type[nn.Module]:
    """A card's ``architecture.backbone.name`` -> its class (imported here, on first build)."""
    from .backbones.hrnet import HRNet
    from .backbones.resnest import ResNeSt
    from .backbones.resnet import ResNet
    from .backbones.swin import SwinTransformer
    from .backbones.vit import VisionTransformer

    backbones = {"resnet": ResNet, "resnest": ResNeSt, "hrnet": HRNet, "vit": VisionTransformer,
                 "swin": SwinTransformer}
    if name not in backbones:
        raise CardError(f"unknown backbone {name!r} in the card's architecture; known: {', '.join(backbones)}")
    return backbones[name]


def _construct(cls: type, where: str, *args, **kwargs):
    """``cls(*args, **kwargs)``, refusing arguments the constructor does not take with the card's key named."""
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as e:
        raise CardError(f"the card's architecture.{where} does not fit {cls.__name__}: {e}") from None
    return cls(*args, **kwargs)


def _activation(spec: Mapping) -> ActLayer:
    return activation_by_name(spec["name"], negative_slope=spec.get("negative_slope"))


def build_backbone(spec: Mapping) -> nn.Module:
    """``spec``: a card's ``architecture.backbone``: ``name``, ``norm`` (+ ``norm_eps``), optionally
    ``activation``, and the rest the backbone class's own constructor arguments."""
    kwargs = dict(spec)
    cls = backbone_class(kwargs.pop("name"))
    kwargs["norm_layer"] = norm_by_name(kwargs.pop("norm"), eps=kwargs.pop("norm_eps", None))
    if "activation" in kwargs:  # else the backbone's own default (the heads' activation is not the backbone's)
        kwargs["act_layer"] = _activation(kwargs.pop("activation"))
    return _construct(cls, "backbone", **kwargs)


def build_segmentation_model(architecture: Mapping, auxiliary: bool = False,
                             num_classes: int | None = None) -> SegmentationModel:
    """Build the nn.Module a card's ``architecture`` describes (random init): ``model`` names the class,
    ``backbone`` and ``head`` are constructor arguments, ``num_classes`` (overridable here, for fine-tuning),
    ``align_corners``, ``norm`` and ``activation`` (of the heads), ``backbone_outputs`` (the backbone outputs the
    head reads) and ``auxiliary`` (training-only heads, built with ``auxiliary=True``)."""
    num_classes = architecture["num_classes"] if num_classes is None else num_classes
    norm, act = norm_by_name(architecture["norm"]), _activation(architecture["activation"])
    model = _construct(model_class(architecture["model"]), "head", build_backbone(architecture["backbone"]),
                       num_classes, selected_indices=architecture["backbone_outputs"],
                       align_corners=architecture["align_corners"], norm_layer=norm, act_layer=act,
                       **architecture["head"])
    if auxiliary and architecture.get("auxiliary"):
        specs = architecture["auxiliary"]
        # the auxiliary heads read the feature maps just before the last one, in order
        last = len(model.feature_channels) - 1
        model.check_channels("the auxiliary heads' in_channels", [s["in_channels"] for s in specs],
                             range(last - len(specs), last))
        decoders = [auxiliary_decoder(num_classes=num_classes, norm_layer=norm, act_layer=act, **spec)
                    for spec in specs]
        model.set_auxiliary(decoders[0] if len(decoders) == 1 else nn.ModuleList(decoders))
    return model
