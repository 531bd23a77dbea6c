"""Build the nn.Module a card's ``architecture`` describes: plain constructors called with the card's
arguments (the card generator translated the toolbox's vocabulary once). The two functions below are the only
place a name becomes a class."""
from __future__ import annotations

import inspect
from typing import Mapping

import torch.nn as nn

from ..errors import CardError
from .layers import ActLayer, activation_by_name, norm_by_name
from .segmentor import SegmentationModel, auxiliary_decoder

# the names a card's architecture may use (the two functions below turn them into classes)
MODELS = ("pspnet", "upernet", "isnet", "mcibi", "idrnet")
BACKBONES = ("resnet", "resnest", "hrnet", "vit", "swin")


def model_class(name: str) -> type[SegmentationModel]:
    """A card's ``architecture.model`` -> its class; only that class's module is imported (a load pays for
    the one architecture it builds)."""
    if name == "pspnet":
        from .heads.psp import PSPNet as cls
    elif name == "upernet":
        from .heads.upernet import UPerNet as cls
    elif name == "isnet":
        from .heads.isnet import ISNet as cls
    elif name == "mcibi":
        from .heads.mcibi import MCIBI as cls
    elif name == "idrnet":
        from .heads.idrnet import IDRNet as cls
    else:
        raise CardError(f"unknown model {name!r} in the card's architecture; known: {', '.join(MODELS)}")
    return cls


def backbone_class(name: str) -> type[nn.Module]:
    """A card's ``architecture.backbone.name`` -> its class; only that class's module is imported."""
    if name == "resnet":
        from .backbones.resnet import ResNet as cls
    elif name == "resnest":
        from .backbones.resnest import ResNeSt as cls
    elif name == "hrnet":
        from .backbones.hrnet import HRNet as cls
    elif name == "vit":
        from .backbones.vit import VisionTransformer as cls
    elif name == "swin":
        from .backbones.swin import SwinTransformer as cls
    else:
        raise CardError(f"unknown backbone {name!r} in the card's architecture; known: {', '.join(BACKBONES)}")
    return cls


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
