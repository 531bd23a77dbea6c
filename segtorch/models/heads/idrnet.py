"""IDRNet: intervention-driven relation network (Jin et al., NeurIPS 2023).

A 3x3 ``bottleneck`` reduces the last backbone stage to ``feats_channels``. An optional coarse-context module
(ASPP or PPM, optionally refined by self-attention and/or extended by an FPN over the earlier stages) feeds
``decoder_stage1``, whose per-pixel argmax assigns every pixel a class. From that assignment IDRNet builds

* ``feats_withdl``: the features with the dataset-level representation of the pixel's class appended
  (``dl_cls_representations``, a momentum average of features per class collected while training);
* two intervention-driven contexts: per present class, a softmax(logit)-weighted average of ``feats_withdl``
  over its pixels; these class contexts are mixed with weights softmax(class relation) over the classes
  present in the image (``class_relations_mean`` with non-positive relations switched off,
  ``class_relations_var`` as is) and written back to each pixel of the class.

A self-attention block (``idcontext_refiner``) fuses the three, and ``decoder_stage2`` classifies
[features, refined context, coarse context]. Its output is the segmentation.

The four "coarse-context decoders" of the published models are: none (FCN: the bottleneck alone), PPM, ASPP,
and "UPerNet" (PPM or ASPP on top of an FPN). The momentum statistics are updated by the toolbox's training
loop from ground truth; here they are plain buffers loaded from the checkpoint (``selected_classes_counter``,
the training-only sampling statistic, is not kept).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..layers import ActLayer, ConvNormAct, NormLayer
from ..segmentor import SegmentationModel
from .aspp import ASPP
from .psp import PyramidPoolingModule
from .selfattention import SelfAttentionBlock
from .upernet import fpn_fuse, fpn_layers

# the toolbox switches off non-positive mean relations with this logit before the softmax
NEGATIVE_RELATION_LOGIT = -1e16


def refiner(in_channels: int, transform_channels: int, out_channels: int, norm_layer: NormLayer,
            act_layer: ActLayer) -> SelfAttentionBlock:
    """The self-attention block IDRNet uses everywhere: separate 2-conv key/query projections, 1-conv value
    and output projections, all with norm+act, scaled dot product."""
    return SelfAttentionBlock(
        key_in_channels=in_channels, query_in_channels=in_channels, transform_channels=transform_channels,
        out_channels=out_channels, share_key_query=False, query_downsample=None, key_downsample=None,
        key_query_num_convs=2, value_out_num_convs=1, key_query_norm=True, value_out_norm=True, matmul_norm=True,
        with_out_project=True, norm_layer=norm_layer, act_layer=act_layer)


def decoder(in_channels: int, feats_channels: int, num_classes: int, dropout: float, norm_layer: NormLayer,
            act_layer: ActLayer) -> nn.Sequential:
    """1x1 conv-norm-act, dropout, 1x1 classifier (keys ``0.*``, ``1.*``, ``4.*``)."""
    return nn.Sequential(*ConvNormAct(in_channels, feats_channels, 1, norm_layer=norm_layer, act_layer=act_layer),
                         nn.Dropout2d(dropout), nn.Conv2d(feats_channels, num_classes, 1))


class IDRNet(SegmentationModel):
    def __init__(self, backbone: nn.Module, num_classes: int, in_channels: int = 2048, feats_channels: int = 512,
                 coarse_context: str | None = None, dilations: Sequence[int] = (1, 12, 24, 36),
                 pool_scales: Sequence[int] = (1, 2, 3, 6), fpn_in_channels_list: Sequence[int] | None = None,
                 fpn_feats_channels: int = 512, fpn_out_channels: int = 512, use_fpn_before: bool = False,
                 use_fpn_after: bool = True, use_sa_on_coarsecontext_before: bool = False,
                 use_sa_on_coarsecontext_after: bool = False, refine_coarsecontext_channels: int = 256,
                 refine_idcontext_channels: int = 256, force_stage1_use_oripr: bool = False, dropout: float = 0.1,
                 clsrelation_momentum: float = 0.1, dlclsreps_momentum: float = 0.1,
                 selected_indices: Sequence[int] | None = None, align_corners: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.ReLU):
        super().__init__(backbone, num_classes, selected_indices, align_corners)
        self.check_channels("in_channels", in_channels, -1)
        use_fpn = fpn_in_channels_list is not None
        if use_fpn and coarse_context is None:
            raise ValueError("IDRNet's FPN sits on the coarse context: it needs coarse_context='aspp' or 'ppm'")
        if use_fpn:  # the FPN's levels are the backbone features (the coarse context replaces the top one)
            self.check_channels("fpn_in_channels_list", fpn_in_channels_list, range(len(fpn_in_channels_list)))
        if use_fpn and use_fpn_before == use_fpn_after:
            raise ValueError("IDRNet's FPN runs either before stage 1 or after it: set exactly one of "
                             "use_fpn_before / use_fpn_after")
        self.force_stage1_use_oripr = force_stage1_use_oripr
        self.use_fpn_before = use_fpn and use_fpn_before
        self.use_fpn_after = use_fpn and use_fpn_after
        # training-time momenta of the statistics below (kept for a training loop; unused at inference)
        self.clsrelation_momentum, self.dlclsreps_momentum = clsrelation_momentum, dlclsreps_momentum

        self.bottleneck = ConvNormAct(in_channels, feats_channels, 3, norm_layer=norm_layer, act_layer=act_layer)

        # coarse context (its width is the FPN's when an FPN is stacked on it)
        context_channels = fpn_feats_channels if use_fpn else feats_channels
        self.coarse_context_module: nn.Module | None = None
        if coarse_context == "aspp":
            self.coarse_context_module = ASPP(feats_channels, context_channels, dilations, align_corners,
                                              norm_layer, act_layer)
        elif coarse_context == "ppm":
            self.coarse_context_module = PyramidPoolingModule(feats_channels, context_channels, pool_scales,
                                                              align_corners, norm_layer, act_layer)
        elif coarse_context is not None:
            raise ValueError(f"unknown IDRNet coarse context {coarse_context!r}; known: 'aspp', 'ppm'")
        if self.coarse_context_module is not None:
            # "before" wins when both are set, as in the toolbox
            if use_sa_on_coarsecontext_before:
                self.coarsecontext_refiner_before = refiner(context_channels, refine_coarsecontext_channels,
                                                            context_channels, norm_layer, act_layer)
            elif use_sa_on_coarsecontext_after:
                self.coarsecontext_refiner_after = refiner(context_channels, refine_coarsecontext_channels,
                                                           context_channels, norm_layer, act_layer)

        # FPN over the earlier backbone stages with the coarse context on top
        fpn_channels = 0
        if use_fpn:
            self.lateral_convs, self.fpn_convs = fpn_layers(fpn_in_channels_list, fpn_feats_channels,
                                                            fpn_out_channels, norm_layer, act_layer)
            fpn_channels = fpn_out_channels * len(self.fpn_convs)

        # statistics collected while training (state-dict entries of the published checkpoints)
        self.register_buffer("class_relations_mean", torch.eye(num_classes))
        self.register_buffer("class_relations_var", torch.eye(num_classes))
        self.register_buffer("dl_cls_representations", torch.zeros(num_classes, feats_channels))

        # input: features with dl representations appended, mean context, var context (2C wide each) -> C
        self.idcontext_refiner = refiner(feats_channels * 6, refine_idcontext_channels, feats_channels,
                                         norm_layer, act_layer)

        if force_stage1_use_oripr or self.coarse_context_module is None:
            stage1_channels = feats_channels
        else:
            stage1_channels = context_channels + (fpn_channels if self.use_fpn_before else 0)
        stage2_channels = feats_channels * 2
        if self.coarse_context_module is not None:
            stage2_channels += context_channels + fpn_channels
        self.decoder_stage1 = decoder(stage1_channels, feats_channels, num_classes, dropout, norm_layer, act_layer)
        self.decoder_stage2 = decoder(stage2_channels, feats_channels, num_classes, dropout, norm_layer, act_layer)

    # ---- inference ----------------------------------------------------------------------------------------
    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self._decode(feats)[1]

    def decode_train(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both stages' scores. The toolbox's training step also updates the class relations (by re-running
        stage 2 with one class's context removed and comparing per-class losses against the ground truth) and
        the dataset-level representations; those need the targets and are not done here."""
        stage1, stage2 = self._decode(feats)
        return {"loss_cls_stage1": stage1, "loss_cls_stage2": stage2}

    def _decode(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bottleneck(feats[-1])
        context = None
        if self.coarse_context_module is not None:
            context = self.coarse_context_module(x)
            if hasattr(self, "coarsecontext_refiner_before"):
                context = self.coarsecontext_refiner_before(context, context)
        if self.use_fpn_before:
            context = self._fpn(feats, context)
        stage1 = self.decoder_stage1(x if self.force_stage1_use_oripr or context is None else context)
        if stage1.shape[2:] != x.shape[2:]:
            stage1 = self.resize(stage1, x.shape[2:])
        if hasattr(self, "coarsecontext_refiner_after"):
            context = self.coarsecontext_refiner_after(context, context)

        id_context = self.intervention_context(x, stage1)

        if self.use_fpn_after:
            context = self._fpn(feats, context)
        if context is None:
            stage2 = self.decoder_stage2(torch.cat([x, id_context], dim=1))
        else:
            if context.shape[2:] != x.shape[2:]:
                x, id_context = self.resize(x, context.shape[2:]), self.resize(id_context, context.shape[2:])
            stage2 = self.decoder_stage2(torch.cat([x, id_context, context], dim=1))
        return stage1, stage2

    def _fpn(self, feats: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        # the coarse context takes the place of the top level; fpn_fuse runs its top module on it (identity)
        return fpn_fuse([*feats[:-1], context], nn.Identity(), self.lateral_convs, self.fpn_convs,
                        self.align_corners)

    def intervention_context(self, x: torch.Tensor, stage1: torch.Tensor) -> torch.Tensor:
        """Refined intervention-driven context of features ``x`` (B, C, H, W) given stage-1 scores ``stage1``
        (B, num_classes, H, W): the toolbox's per-image, per-class loops done for all classes at once."""
        b, _, h, w = x.shape
        num_classes = self.num_classes
        labels = stage1.argmax(dim=1).flatten(1)  # (B, P): every pixel belongs to exactly one class

        # features with the dataset-level representation of their stage-1 class appended: (B, 2C, P)
        dl = self.dl_cls_representations.to(x.dtype)
        feats_withdl = torch.cat([x.flatten(2), dl[labels].transpose(1, 2)], dim=1)

        # per class: softmax over its own pixels of its score, then the weighted sum of feats_withdl
        classes = torch.arange(num_classes, device=labels.device)
        member = labels.unsqueeze(1) == classes[:, None]  # (B, N, P)
        present = member.any(dim=2)  # (B, N)
        weights = stage1.flatten(2).masked_fill(~member, float("-inf")).softmax(dim=2)
        weights = weights.masked_fill(~present.unsqueeze(2), 0.0)  # classes without pixels: NaN -> 0
        class_contexts = torch.bmm(weights, feats_withdl.transpose(1, 2))  # (B, N, 2C)

        mean_context = self._mix(class_contexts, self.class_relations_mean, present, labels, True)
        var_context = self._mix(class_contexts, self.class_relations_var, present, labels, False)
        fused = torch.cat([feats_withdl, mean_context, var_context], dim=1).unflatten(2, (h, w))
        return self.idcontext_refiner(fused, fused)

    @staticmethod
    def _mix(class_contexts: torch.Tensor, relations: torch.Tensor, present: torch.Tensor, labels: torch.Tensor,
             drop_nonpositive: bool) -> torch.Tensor:
        """Each present class i gets sum_j softmax_j(relations[i, j]) class_contexts[j] over present classes j;
        each pixel then takes its class's mixture. Returns (B, 2C, P)."""
        relations = relations.to(class_contexts.dtype)
        if drop_nonpositive:
            fill = max(NEGATIVE_RELATION_LOGIT, torch.finfo(relations.dtype).min)  # -1e16 overflows fp16
            relations = relations.masked_fill(relations <= 0, fill)
        logits = relations.unsqueeze(0).masked_fill(~present.unsqueeze(1), float("-inf"))  # (B, N, N)
        mixed = torch.bmm(logits.softmax(dim=2), class_contexts)  # (B, N, 2C); absent classes have weight 0
        index = labels.unsqueeze(2).expand(-1, -1, mixed.shape[2])
        return mixed.gather(1, index).transpose(1, 2)
