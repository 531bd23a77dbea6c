"""The base of every segmentation model: backbone + decode head (+ auxiliary heads). The builder that makes
one from a card's architecture is ``builder.py`` (it imports the heads, which import this module).

Every model keeps the toolbox's top-level attribute names (``backbone_net``, ``ppm_net``, ``decoder``,
``auxiliary_decoder``, ...) so its state dict loads with ``strict=True``. ``model(x)`` returns the main
head's class scores at the head's output stride: the tensor the toolbox returns as ``seg_logits`` in test mode.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import CardError
from ..layers import ActLayer, NormLayer


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

    def train_forward(self, x: torch.Tensor, labels: torch.Tensor, *, training: Mapping, learning_rate: float,
                      epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """One training forward as the toolbox's TRAIN mode runs it: ``(preds, extra)``. ``preds`` are the
        scores scored against ``labels`` (N, H, W; -100 unlabelled) under the card's losses; ``extra`` maps
        further loss names to ``(scores, targets, loss_cfg)``. ``training``: the card's training settings.
        Families that update statistics from the labels while training (MCIBI's memory, IDRNet's class
        relations) override this and do so in place."""
        return self.forward_train(x), {}

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
