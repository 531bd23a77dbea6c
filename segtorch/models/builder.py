"""Build the nn.Module a card's ``architecture`` describes: plain constructors called with the card's
arguments (the card generator translated the toolbox's vocabulary once). The two tables below are the only
place a name becomes a class."""
from __future__ import annotations

import inspect
from typing import Mapping

import torch.nn as nn

from ..errors import CardError
from .layers import ActLayer, activation_by_name, norm_by_name
from .segmentor import SegmentationModel, auxiliary_decoder


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
