"""ISNet: "Integrating Image-level and Semantic-level Context" (Jin et al., ICCV 2021).

A 3x3 bottleneck reduces the last backbone stage; a first classifier (stage 1) gives coarse class scores. The
image-level context attends from every pixel to [global pooled feature, pixel feature]; the semantic-level
context replaces every pixel by the softmax-weighted mean feature of the pixels predicted as the same class and
attends to those class centres. The stage-2 classifier (optionally fed with a stride-4 shortcut, as in the LIP
configs) gives ``seg_logits``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decoders.selfattention import context_attention
from ..layers import ActLayer, ConvNormAct, NormLayer, classifier, stage_decoder
from .base import SegmentationModel


class ImageLevelContext(nn.Module):
    def __init__(self, feats_channels: int, transform_channels: int, concat_input: bool = False,
                 align_corners: bool = False, norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.align_corners = align_corners
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.correlate_net = context_attention(feats_channels * 2, feats_channels, transform_channels, feats_channels,
                                               norm_layer, act_layer)
        if concat_input:
            self.bottleneck = ConvNormAct(feats_channels * 2, feats_channels, 3, norm_layer=norm_layer,
                                          act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_global = F.interpolate(self.global_avgpool(x), size=x.shape[2:], mode="bilinear",
                                 align_corners=self.align_corners)
        feats_il = self.correlate_net(x, torch.cat([x_global, x], dim=1))
        if hasattr(self, "bottleneck"):
            feats_il = self.bottleneck(torch.cat([x, feats_il], dim=1))
        return feats_il


def class_centres(x: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """Every pixel gets the centre of its predicted class: the mean of the features of all pixels (of the same
    image) whose argmax is that class, weighted by a softmax over those pixels of their score for the class.

    Vectorised form of the toolbox's per-image, per-class loop: the per-class maxima come from a scatter-reduce
    over the argmax index, the weighted sums from a matmul with the (B, N, K) one-hot map of the softmax
    numerators (deterministic, unlike atomic scatter-adds on CUDA).
    """
    batch_size, channels, h, w = x.shape
    num_classes = preds.shape[1]
    feats = x.reshape(batch_size, channels, h * w).transpose(1, 2)        # (B, N, C)
    scores = preds.reshape(batch_size, num_classes, h * w)                 # (B, K, N)
    labels = scores.argmax(dim=1)                                          # (B, N)
    top = scores.gather(1, labels.unsqueeze(1)).squeeze(1)                 # (B, N): score of the own class
    # softmax over the pixels of each class, stabilised by the per-class maximum as softmax does
    class_max = top.new_full((batch_size, num_classes), float("-inf")).scatter_reduce(
        1, labels, top, reduce="amax", include_self=True)
    exp = torch.exp(top - class_max.gather(1, labels))                    # (B, N)
    exp_onehot = exp.new_zeros((batch_size, h * w, num_classes)).scatter_(2, labels.unsqueeze(-1), exp.unsqueeze(-1))
    class_sum = exp_onehot.sum(dim=1)                                      # (B, K); 0 for absent classes
    centres = torch.matmul(exp_onehot.transpose(1, 2), feats)              # (B, K, C), not yet normalised
    # pick each pixel's class (always a present one) before dividing, so absent classes never divide by 0
    per_pixel = centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, channels))
    per_pixel = per_pixel / class_sum.gather(1, labels).unsqueeze(-1)      # (B, N, C)
    return per_pixel.transpose(1, 2).reshape(batch_size, channels, h, w)


class SemanticLevelContext(nn.Module):
    def __init__(self, feats_channels: int, transform_channels: int, concat_input: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.correlate_net = context_attention(feats_channels, feats_channels, transform_channels, feats_channels,
                                               norm_layer, act_layer)
        if concat_input:
            self.bottleneck = ConvNormAct(feats_channels * 2, feats_channels, 3, norm_layer=norm_layer,
                                          act_layer=act_layer)

    def forward(self, x: torch.Tensor, preds: torch.Tensor, feats_il: torch.Tensor) -> torch.Tensor:
        feats_sl = self.correlate_net(x, class_centres(x, preds))
        if hasattr(self, "bottleneck"):
            feats_sl = self.bottleneck(torch.cat([feats_il, feats_sl], dim=1))
        return feats_sl


class ISNet(SegmentationModel):
    def __init__(self, backbone: nn.Module, num_classes: int, in_channels: int = 2048, feats_channels: int = 512,
                 transform_channels: int = 256, concat_input: bool = True, dropout: float = 0.1,
                 shortcut_in_channels: int | None = None, shortcut_channels: int = 48,
                 selected_indices: Sequence[int] | None = None, align_corners: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        """``shortcut_in_channels``: channels of the first selected backbone stage to fuse before the stage-2
        classifier (the toolbox's ``shortcut.is_on``); None to classify the context features directly."""
        super().__init__(backbone, num_classes, selected_indices, align_corners)
        self.check_channels("in_channels", in_channels, -1)
        if shortcut_in_channels is not None:
            self.check_channels("shortcut_in_channels", shortcut_in_channels, 0)
        self.bottleneck = ConvNormAct(in_channels, feats_channels, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.ilc_net = ImageLevelContext(feats_channels, transform_channels, concat_input, align_corners,
                                         norm_layer, act_layer)
        self.slc_net = SemanticLevelContext(feats_channels, transform_channels, concat_input, norm_layer, act_layer)
        self.decoder_stage1 = stage_decoder(feats_channels, feats_channels, num_classes, dropout, norm_layer, act_layer)
        if shortcut_in_channels is not None:
            # the shortcut conv has a bias in the toolbox (unlike every other conv before a norm)
            self.shortcut = nn.Sequential(nn.Conv2d(shortcut_in_channels, shortcut_channels, 1),
                                          norm_layer(shortcut_channels), act_layer())
            self.decoder_stage2 = stage_decoder(feats_channels + shortcut_channels, feats_channels, num_classes,
                                                dropout, norm_layer, act_layer)
        else:
            self.decoder_stage2 = classifier(feats_channels, num_classes, dropout)

    def _stages(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bottleneck(feats[-1])
        feats_il = self.ilc_net(x)
        preds_stage1 = self.decoder_stage1(x)
        preds = preds_stage1
        if preds.shape[2:] != x.shape[2:]:
            preds = self.resize(preds, x.shape[2:])
        feats_sl = self.slc_net(x, preds, feats_il)
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(feats[0])
            feats_sl = torch.cat([self.resize(feats_sl, shortcut.shape[2:]), shortcut], dim=1)
        return preds_stage1, self.decoder_stage2(feats_sl)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        # seg_logits in test mode is the stage-2 prediction
        return self._stages(feats)[1]

    def decode_train(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        preds_stage1, preds_stage2 = self._stages(feats)
        return {"loss_cls_stage1": preds_stage1, "loss_cls_stage2": preds_stage2}
