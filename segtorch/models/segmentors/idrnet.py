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
and "UPerNet" (PPM or ASPP on top of an FPN). The momentum statistics are buffers loaded from the checkpoint
and updated from the labels by ``train_forward`` as the toolbox's TRAIN forward does. The training-only
sampling statistic ``selected_classes_counter`` is a non-persistent buffer here (inference does not need it;
the trainer keeps it in its own checkpoints), initialised as the toolbox initialises it; a file that holds it
(the toolbox saves it with the weights) loads it, so that a toolbox training state continues with the same
intervention draws.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..decoders.context import context_module
from ..decoders.fpn import fpn_fuse, fpn_layers
from ..decoders.selfattention import context_attention
from ..layers import ActLayer, ConvNormAct, NormLayer, stage_decoder
from .base import SegmentationModel

# the toolbox switches off non-positive mean relations with this logit before the softmax
NEGATIVE_RELATION_LOGIT = -1e16
# the toolbox's initial selection count of every class (a fresh model)
COUNTER_INIT = 1e-6


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
        self.coarse_context_module: nn.Module | None = context_module(
            coarse_context, feats_channels, context_channels, dilations=dilations, pool_scales=pool_scales,
            align_corners=align_corners, norm_layer=norm_layer, act_layer=act_layer)
        if self.coarse_context_module is not None:
            # "before" wins when both are set, as in the toolbox
            if use_sa_on_coarsecontext_before:
                self.coarsecontext_refiner_before = context_attention(
                    context_channels, context_channels, refine_coarsecontext_channels, context_channels, norm_layer,
                    act_layer)
            elif use_sa_on_coarsecontext_after:
                self.coarsecontext_refiner_after = context_attention(
                    context_channels, context_channels, refine_coarsecontext_channels, context_channels, norm_layer,
                    act_layer)

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
        # how often each class was the intervention class while training (loaded where a file holds it)
        self.register_buffer("selected_classes_counter", torch.full((num_classes,), COUNTER_INIT), persistent=False)

        # input: features with dl representations appended, mean context, var context (2C wide each) -> C
        self.idcontext_refiner = context_attention(feats_channels * 6, feats_channels * 6, refine_idcontext_channels,
                                                   feats_channels, norm_layer, act_layer)

        if force_stage1_use_oripr or self.coarse_context_module is None:
            stage1_channels = feats_channels
        else:
            stage1_channels = context_channels + (fpn_channels if self.use_fpn_before else 0)
        stage2_channels = feats_channels * 2
        if self.coarse_context_module is not None:
            stage2_channels += context_channels + fpn_channels
        self.decoder_stage1 = stage_decoder(stage1_channels, feats_channels, num_classes, dropout, norm_layer,
                                            act_layer)
        self.decoder_stage2 = stage_decoder(stage2_channels, feats_channels, num_classes, dropout, norm_layer,
                                            act_layer)

    # ---- inference ----------------------------------------------------------------------------------------
    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self._decode(feats)[1]

    def decode_train(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both stages' scores, without the label-driven updates (``train_forward`` does those)."""
        stage1, stage2 = self._decode(feats)
        return {"loss_cls_stage1": stage1, "loss_cls_stage2": stage2}

    def _decode(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, stage1, stage2 = self._decode_parts(feats)
        return stage1, stage2

    def _decode_parts(self, feats: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(bottleneck features, coarse context as stage 2 sees it, stage-1 scores, stage-2 scores)."""
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
        return x, context, stage1, self._stage2(x, id_context, context)

    def _stage2(self, x: torch.Tensor, id_context: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            return self.decoder_stage2(torch.cat([x, id_context], dim=1))
        if context.shape[2:] != x.shape[2:]:
            x, id_context = self.resize(x, context.shape[2:]), self.resize(id_context, context.shape[2:])
        return self.decoder_stage2(torch.cat([x, id_context, context], dim=1))

    def _fpn(self, feats: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        # the coarse context takes the place of the top level; fpn_fuse runs its top module on it (identity)
        return fpn_fuse([*feats[:-1], context], nn.Identity(), self.lateral_convs, self.fpn_convs,
                        self.align_corners)

    def intervention_context(self, x: torch.Tensor, stage1: torch.Tensor,
                             removed: torch.Tensor | None = None) -> torch.Tensor:
        """Refined intervention-driven context of features ``x`` (B, C, H, W) given stage-1 scores ``stage1``
        (B, num_classes, H, W): the toolbox's per-image, per-class loops done for all classes at once.
        ``removed`` (B,): training's intervention, one class per image left out of the mixtures (its pixels
        get no context)."""
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
        if removed is not None:
            present = present.clone()
            present[torch.arange(b, device=present.device), removed] = False
        weights = stage1.flatten(2).masked_fill(~member, float("-inf")).softmax(dim=2)
        weights = weights.masked_fill(~present.unsqueeze(2), 0.0)  # classes without pixels: NaN -> 0
        class_contexts = torch.bmm(weights, feats_withdl.transpose(1, 2))  # (B, N, 2C)

        mean_context = self._mix(class_contexts, self.class_relations_mean, present, labels, True)
        var_context = self._mix(class_contexts, self.class_relations_var, present, labels, False)
        if removed is not None:  # the removed class's pixels (and an image with no class left) read zeros
            kept = (labels != removed[:, None]).unsqueeze(1)
            mean_context = torch.where(kept, mean_context, 0.0)
            var_context = torch.where(kept, var_context, 0.0)
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

    # ---- training -----------------------------------------------------------------------------------------
    def reset_buffers(self) -> None:
        """The selection counts a fresh model starts from (for a file without them)."""
        self.selected_classes_counter = torch.full((self.num_classes,), COUNTER_INIT,
                                                   device=self.class_relations_mean.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the selection counts are not in this module's state dict, yet a file that holds them gives them: without
        # them a toolbox training state would draw its intervention classes from fresh counts
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "selected_classes_counter"
        if key not in state_dict:
            return
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        value, current = state_dict[key], self.selected_classes_counter
        if value.shape != current.shape:
            error_msgs.append(f"size mismatch for {key}: the file has {tuple(value.shape)}, the model "
                              f"{tuple(current.shape)}")
        elif local_metadata.get("assign_to_params_buffers", False) or current.is_meta:
            self.selected_classes_counter = value.to(current.dtype)
        else:
            with torch.no_grad():
                current.copy_(value)

    def train_forward(self, x: torch.Tensor, labels: torch.Tensor, *, training: Mapping, learning_rate: float,
                      epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """The toolbox's TRAIN forward, in its order (Python's ``random`` draws included):

        1. a seed from ``random`` (the toolbox reseeds CUDA with it before both stage-2 passes, so that their
           dropout masks agree on a GPU);
        2. both stages as at inference;
        3. per image, an intervention class drawn from the classes of its stage-1 map with weights 1 / how
           often each was drawn (``random.choices``), whose count then goes up by one;
        4. stage 2 again with that class removed from the contexts; per labelled class of the image, the
           change of its pixels' cross-entropy (mean, and variance where it has two pixels or more) moves
           ``class_relations_mean`` / ``_var`` [intervention class, class] by ``clsrelation_momentum``;
        5. ``dl_cls_representations`` of each labelled class move towards the mean of its pixels' bottleneck
           features (resized to the labels) by ``dlclsreps_momentum``;
        each statistic is then averaged over the processes.
        """
        seed = random.randrange(1, 10**16)  # what the toolbox's random.randint(1, 1e16) draws
        feats = self.features(x)
        on_cuda = x.device.type == "cuda"
        if on_cuda:
            torch.cuda.manual_seed(seed)
        x_feats, context, stage1, stage2 = self._decode_parts(feats)
        # the card generator checked that the head's ignore index is the losses' one
        ignore_index = next(iter((training.get("losses") or {}).values()), {}).get("ignore_index", -100)
        with torch.no_grad():
            removed = self._draw_interventions(stage1)
            id_context = self.intervention_context(x_feats, stage1, removed=removed)
            if on_cuda:
                torch.cuda.manual_seed(seed)
            intervened = self._stage2(x_feats, id_context, context)
            self._update_relations(self.resize(intervened, labels.shape[-2:]), self.resize(stage2, labels.shape[-2:]),
                                   labels, removed.tolist(), self.clsrelation_momentum, ignore_index)
            _average_over_processes(self.class_relations_mean, self.class_relations_var,
                                    self.selected_classes_counter)
            self._update_representations(self.resize(x_feats, labels.shape[-2:]), labels,
                                         self.dlclsreps_momentum, ignore_index)
            _average_over_processes(self.dl_cls_representations)
        preds = {"loss_cls_stage1": stage1, "loss_cls_stage2": stage2, **self.auxiliary_preds(feats)}
        return preds, {}

    def _draw_interventions(self, stage1: torch.Tensor) -> torch.Tensor:
        """One class per image from its stage-1 classes (ascending), weighted by 1 / selection count, counted."""
        present = stage1.argmax(dim=1).flatten(1)
        counter = self.selected_classes_counter
        chosen = []
        for labels in present:
            classes = labels.unique().tolist()
            weights = [1.0 / float(counter[c].item()) for c in classes]
            weights = np.array(weights) / sum(weights)  # normalised in float64 as the toolbox does
            clsid = random.choices(classes, weights=weights, k=1)[0]
            chosen.append(clsid)
            counter[clsid] = counter[clsid] + 1.0
        return torch.tensor(chosen, device=stage1.device)

    def _update_relations(self, intervened: torch.Tensor, anchor: torch.Tensor, labels: torch.Tensor,
                          removed: list[int], momentum: float, ignore_index: int) -> None:
        """Scores (B, K, H, W) at the labels' size; per image and labelled class, in ascending class order."""
        safe = labels.clamp_min(0).masked_fill(labels == ignore_index, 0)
        loss_intervened = F.cross_entropy(intervened, safe, reduction="none")
        loss_anchor = F.cross_entropy(anchor, safe, reduction="none")
        mean, var = self.class_relations_mean, self.class_relations_var
        for b, row in enumerate(removed):
            for clsid in labels[b].unique().tolist():
                if clsid == ignore_index:
                    continue
                mask = labels[b] == clsid
                li, la = loss_intervened[b][mask], loss_anchor[b][mask]
                mean[row, clsid] = (li.mean() - la.mean()) * momentum + mean[row, clsid] * (1 - momentum)
                if la.numel() > 1:
                    change = li.var(unbiased=False) - la.var(unbiased=False)
                    var[row, clsid] = change * momentum + var[row, clsid] * (1 - momentum)

    def _update_representations(self, features: torch.Tensor, labels: torch.Tensor, momentum: float,
                                ignore_index: int) -> None:
        """``features`` (B, C, H, W) at the labels' size; each labelled class of the batch, ascending."""
        features = features.permute(0, 2, 3, 1)
        reps = self.dl_cls_representations
        for clsid in labels.unique().tolist():
            if clsid == ignore_index:
                continue
            reps[clsid] = features[labels == clsid].mean(0) * momentum + reps[clsid] * (1 - momentum)


def _average_over_processes(*tensors: torch.Tensor) -> None:
    """In place: each tensor becomes the mean of the processes' tensors (nothing when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t.div_(world), op=dist.ReduceOp.SUM)
