"""MCIBI: "Mining Contextual Information Beyond Image for Semantic Segmentation" (Jin et al., ICCV 2021).

A dataset-level memory holds one (or a few) feature vectors per class, updated by moving averages during
training. At test time a first classifier (stage 1) turns the bottlenecked features into class probabilities,
each pixel reads the probability-weighted mix of the class memories, attends to it, and is fused with its own
feature and with the within-image context (DeepLabV3's ASPP) before the stage-2 classifier gives ``seg_logits``.

Backbone specifics the toolbox handles inside the segmentor: the ViT-Large configs LayerNorm every selected
backbone output over channels (``norm_layers``); the HRNet configs may downsample the (already concatenated)
HRNet output with a strided conv (``downsample_backbone``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..decoders.context import context_module
from ..decoders.selfattention import context_attention
from ..layers import ActLayer, ConvNormAct, NormLayer, norm_by_name, stage_decoder
from .base import SegmentationModel


class FeaturesMemory(nn.Module):
    def __init__(self, num_classes: int, feats_channels: int, transform_channels: int, out_channels: int,
                 use_context_within_image: bool = True, num_feats_per_cls: int = 1, use_hard_aggregate: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        if num_feats_per_cls < 1:
            raise ValueError("num_feats_per_cls should be at least 1")
        self.num_classes = num_classes
        self.feats_channels = feats_channels
        self.num_feats_per_cls = num_feats_per_cls
        self.use_context_within_image = use_context_within_image
        self.use_hard_aggregate = use_hard_aggregate
        # a parameter (not a buffer) so the checkpoints' key loads; only the moving-average update changes it
        self.memory = nn.Parameter(torch.zeros(num_classes, num_feats_per_cls, feats_channels), requires_grad=False)
        if num_feats_per_cls > 1:
            self.self_attentions = nn.ModuleList(
                context_attention(feats_channels, feats_channels, transform_channels, feats_channels, norm_layer,
                                  act_layer)
                for _ in range(num_feats_per_cls))
            self.fuse_memory_conv = ConvNormAct(feats_channels * num_feats_per_cls, feats_channels, 1,
                                                norm_layer=norm_layer, act_layer=act_layer)
        else:
            self.self_attention = context_attention(feats_channels, feats_channels, transform_channels,
                                                    feats_channels, norm_layer, act_layer)
        self.bottleneck = ConvNormAct(feats_channels * 2, out_channels, 3, norm_layer=norm_layer, act_layer=act_layer)
        if use_context_within_image:
            self.self_attention_ms = context_attention(feats_channels, feats_channels, transform_channels,
                                                       feats_channels, norm_layer, act_layer)
            self.bottleneck_ms = ConvNormAct(feats_channels * 2, out_channels, 3, norm_layer=norm_layer,
                                             act_layer=act_layer)

    def forward(self, feats: torch.Tensor, preds: torch.Tensor,
                feats_ms: torch.Tensor | None = None) -> torch.Tensor:
        batch_size, channels, h, w = feats.shape
        # (B, K, H, W) -> (B*H*W, K) class weights: soft probabilities, or one-hot argmax
        weight_cls = F.softmax(preds.permute(0, 2, 3, 1).reshape(-1, self.num_classes), dim=-1)
        if self.use_hard_aggregate:
            weight_cls = torch.zeros_like(weight_cls).scatter_(1, weight_cls.argmax(-1, keepdim=True), 1)
        memory = self.memory.detach()
        # each pixel reads the class-weighted mix of the memory vectors: (B*H*W, K) @ (K, C) -> (B, C, H, W)
        read = [torch.matmul(weight_cls, memory[:, i]).reshape(batch_size, h, w, channels).permute(0, 3, 1, 2)
                for i in range(self.num_feats_per_cls)]
        if self.num_feats_per_cls > 1:
            selected_memory = self.fuse_memory_conv(
                torch.cat([attn(feats, m) for attn, m in zip(self.self_attentions, read)], dim=1))
        else:
            selected_memory = self.self_attention(feats, read[0])
        memory_output = self.bottleneck(torch.cat([feats, selected_memory], dim=1))
        if self.use_context_within_image:
            feats_ms = self.self_attention_ms(feats, feats_ms)
            memory_output = self.bottleneck_ms(torch.cat([feats_ms, memory_output], dim=1))
        return memory_output

    @torch.no_grad()
    def update(self, features: torch.Tensor, segmentation: torch.Tensor, *, ignore_index: int = -100,
               strategy: str = "cosine_similarity", base_momentum: float, adjust_by_learning_rate: bool = False,
               base_lr: float | None = None, learning_rate: float | None = None) -> torch.Tensor:
        """Training only: moving-average update of each present class's memory from ``features`` (B, C, H, W,
        already resized to the label size) and ``segmentation`` (B, H, W), following the toolbox. Returns this
        process's updated memory (before the average over processes)."""
        if strategy not in ("mean", "cosine_similarity"):
            raise ValueError(f"unknown memory update strategy {strategy!r}")
        momentum = base_momentum
        if adjust_by_learning_rate:  # the momentum follows the schedule: base_momentum at base_lr
            momentum = base_momentum / base_lr * learning_rate
        segmentation = segmentation.long().reshape(-1)
        features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        memory = self.memory.data
        for clsid in segmentation.unique().tolist():
            if clsid == ignore_index:
                continue
            feats_cls = features[segmentation == clsid]
            # an all-zero slot is still uninitialised: fill the first one with the class mean and stop there
            empty = [i for i in range(self.num_feats_per_cls) if bool((memory[clsid, i] == 0).all())]
            if empty:
                memory[clsid, empty[0]] = feats_cls.mean(0)
                continue
            if self.num_feats_per_cls == 1:
                if strategy == "mean":
                    feats_cls = feats_cls.mean(0)
                else:
                    similarity = F.cosine_similarity(feats_cls, memory[clsid].expand_as(feats_cls))
                    weight = (1 - similarity) / (1 - similarity).sum()
                    feats_cls = (feats_cls * weight.unsqueeze(-1)).sum(0)
                memory[clsid] = (1 - momentum) * memory[clsid] + momentum * feats_cls.unsqueeze(0)
            else:
                if strategy != "cosine_similarity":
                    raise ValueError("several features per class need strategy='cosine_similarity'")
                relation = torch.matmul(F.normalize(feats_cls, p=2, dim=1), F.normalize(memory[clsid].t(), p=2, dim=0))
                nearest = relation.argmax(dim=1)
                for i in range(self.num_feats_per_cls):
                    feats_iter = feats_cls[nearest == i]
                    similarity = F.cosine_similarity(feats_iter, memory[clsid, i].unsqueeze(0).expand_as(feats_iter))
                    weight = (1 - similarity) / (1 - similarity).sum()
                    feats_iter = (feats_iter * weight.unsqueeze(-1)).sum(0)
                    memory[clsid, i] = memory[clsid, i] * (1 - momentum) + feats_iter * momentum
        if dist.is_available() and dist.is_initialized():
            # the module takes the processes' average in new storage; the updated local tensor (which this
            # step's graph and memory loss read, as in the toolbox) is returned unchanged
            averaged = memory.clone()
            dist.all_reduce(averaged.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
            self.memory.data = averaged
        return memory


class MCIBI(SegmentationModel):
    def __init__(self, backbone: nn.Module, num_classes: int, in_channels: int = 2048, feats_channels: int = 512,
                 transform_channels: int = 256, out_channels: int = 512, num_feats_per_cls: int = 1,
                 use_hard_aggregate: bool = False, dropout: float = 0.1, context: str | None = None,
                 context_dilations: Sequence[int] = (1, 12, 24, 36), context_pool_scales: Sequence[int] = (1, 2, 3, 6),
                 downsample_stride: int = 1, feature_norm: str | None = None, feature_norm_eps: float | None = None,
                 selected_indices: Sequence[int] | None = None, align_corners: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        """``context``: "aspp" (with ``context_dilations``) / "ppm" (with ``context_pool_scales``) / None, the
        within-image context. ``downsample_stride`` > 1: a strided 3x3 conv-norm-act applied to every selected
        backbone output first (HRNet). ``feature_norm`` (e.g. "layernorm", ``feature_norm_eps``): a
        channel-wise norm of every selected backbone output (ViT)."""
        super().__init__(backbone, num_classes, selected_indices, align_corners)
        self.check_channels("in_channels", in_channels, -1)
        if feature_norm is not None:
            make_norm = norm_by_name(feature_norm, eps=feature_norm_eps)
            self.norm_layers = nn.ModuleList(make_norm(c) for c in self.feature_channels)
        if downsample_stride > 1:
            self.downsample_backbone = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride=downsample_stride, padding=1, bias=False),
                norm_layer(in_channels), act_layer())
        within_image = context_module(context, in_channels, feats_channels, dilations=context_dilations,
                                      pool_scales=context_pool_scales, align_corners=align_corners,
                                      norm_layer=norm_layer, act_layer=act_layer)
        if within_image is not None:  # absent, not None, without one: the state dict has no such keys
            self.context_within_image_module = within_image
        self.bottleneck = ConvNormAct(in_channels, feats_channels, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.memory_module = FeaturesMemory(
            num_classes, feats_channels, transform_channels, out_channels,
            use_context_within_image=context is not None, num_feats_per_cls=num_feats_per_cls,
            use_hard_aggregate=use_hard_aggregate, norm_layer=norm_layer, act_layer=act_layer)
        self.decoder_stage1 = stage_decoder(feats_channels, feats_channels, num_classes, dropout, norm_layer, act_layer)
        self.decoder_stage2 = stage_decoder(out_channels, out_channels, num_classes, dropout, norm_layer, act_layer)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = super().features(x)
        if hasattr(self, "norm_layers"):
            if len(feats) != len(self.norm_layers):
                raise ValueError(f"{len(feats)} backbone outputs but {len(self.norm_layers)} norm layers")
            # channel-wise norm over (B, C, H, W): move channels last and back
            feats = [norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for f, norm in zip(feats, self.norm_layers)]
        if hasattr(self, "downsample_backbone"):
            if self.training:
                # the toolbox downsamples every selected output (HRNet selects one four times): in training
                # each call moves the BatchNorm statistics, so do as many calls
                return [self.downsample_backbone(f) for f in feats]
            # HRNet configs select the same output several times: downsample each distinct tensor once
            done: dict[int, torch.Tensor] = {}
            for f in feats:
                if id(f) not in done:
                    done[id(f)] = self.downsample_backbone(f)
            feats = [done[id(f)] for f in feats]
        return feats

    def _stages(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = feats[-1]
        feats_ms = self.context_within_image_module(x) if hasattr(self, "context_within_image_module") else None
        memory_input = self.bottleneck(x)
        preds_stage1 = self.decoder_stage1(memory_input)
        memory_output = self.memory_module(memory_input, preds_stage1, feats_ms)
        return memory_input, preds_stage1, self.decoder_stage2(memory_output)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        # seg_logits in test mode is the stage-2 prediction
        return self._stages(feats)[2]

    def decode_train(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage-1/2 scores, without the memory update and memory loss (``train_forward`` does those)."""
        _, preds_stage1, preds_stage2 = self._stages(feats)
        return {"loss_cls_stage1": preds_stage1, "loss_cls_stage2": preds_stage2}

    def memory_logits(self, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Stage-2 scores of the stored memory vectors (default: the module's), (K * num_feats_per_cls, K): the
        toolbox's memory loss uses them with targets ``arange(K).repeat_interleave(num_feats_per_cls)``."""
        memory = (self.memory_module.memory if memory is None else memory).detach()
        return self.decoder_stage2(memory.reshape(-1, memory.shape[-1], 1, 1)).flatten(1)

    def train_forward(self, x: torch.Tensor, labels: torch.Tensor, *, training: Mapping, learning_rate: float,
                      epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """The toolbox's TRAIN forward: both stages and the auxiliary head; then the memory update from the
        bottleneck features resized to the labels (momentum scaled by ``learning_rate`` when the card says so);
        from the second epoch on (where the card has ``memory_loss``) the memory loss: stage 2 classifies each
        memory vector as its class. The memory read by this step's graph and loss is the updated one, as in the toolbox."""
        feats = self.features(x)
        memory_input, preds_stage1, preds_stage2 = self._stages(feats)
        preds = {"loss_cls_stage1": preds_stage1, "loss_cls_stage2": preds_stage2, **self.auxiliary_preds(feats)}
        with torch.no_grad():
            features = self.resize(memory_input, labels.shape[-2:])
            stored = self.memory_module.update(features, labels, learning_rate=learning_rate,
                                               **training["memory_update"])
        extra = {}
        memory_loss = training.get("memory_loss")
        if epoch > 1 and memory_loss:
            logits = self.memory_logits(stored)
            targets = torch.arange(self.num_classes, device=logits.device).repeat_interleave(
                self.memory_module.num_feats_per_cls)
            extra["loss_memory"] = (logits, targets, memory_loss)
        return preds, extra
