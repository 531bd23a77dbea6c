"""Build the nn.Module a card's ``architecture`` describes: plain constructors called with the card's
arguments (the card generator translated the toolbox's vocabulary once). ``CLASSES`` is the only place a name
becomes a class."""
from __future__ import annotations

import importlib
import inspect
from typing import Mapping

import torch.nn as nn

from ..errors import CardError
from .layers import ActLayer, activation_by_name, norm_by_name
from .segmentors.base import SegmentationModel, auxiliary_decoder

# (part of the card's architecture, name there) -> (module under segtorch.models, class). Only the module of the
# class asked for is imported: a load pays for the one architecture it builds.
CLASSES = {
    ("model", "pspnet"): ("segmentors.pspnet", "PSPNet"),
    ("model", "upernet"): ("segmentors.upernet", "UPerNet"),
    ("model", "isnet"): ("segmentors.isnet", "ISNet"),
    ("model", "mcibi"): ("segmentors.mcibi", "MCIBI"),
    ("model", "idrnet"): ("segmentors.idrnet", "IDRNet"),
    ("backbone", "resnet"): ("backbones.resnet", "ResNet"),
    ("backbone", "resnest"): ("backbones.resnest", "ResNeSt"),
    ("backbone", "hrnet"): ("backbones.hrnet", "HRNet"),
    ("backbone", "vit"): ("backbones.vit", "VisionTransformer"),
    ("backbone", "swin"): ("backbones.swin", "SwinTransformer"),
}
MODELS = tuple(name for part, name in CLASSES if part == "model")
BACKBONES = tuple(name for part, name in CLASSES if part == "backbone")


def architecture_class(part: str, name: str) -> type:
    """The class a card's ``architecture.model`` (``part="model"``) or ``architecture.backbone.name``
    (``part="backbone"``) names."""
    try:
        module, cls = CLASSES[part, name]
    except KeyError:
        known = ", ".join(n for p, n in CLASSES if p == part)
        raise CardError(f"unknown {part} {name!r} in the card's architecture; known: {known}") from None
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def model_class(name: str) -> type[SegmentationModel]:
    return architecture_class("model", name)


def backbone_class(name: str) -> type[nn.Module]:
    return architecture_class("backbone", name)


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
