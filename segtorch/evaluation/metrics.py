"""Confusion-matrix mIoU with the toolbox's definition.

Per image, pixels whose ground truth is not a class (the ignore index, or any value outside
``0..num_classes-1``, which the toolbox also maps to "ignore") are dropped; the rest are counted in an
int64 matrix ``[ground truth, prediction]``. A prediction outside the classes lands in an extra column: it
counts for the ground-truth class's area but for no predicted class, as the toolbox's ``histc`` counts do.

From the totals: IoU_c = TP / (pred_c + gt_c - TP); a class absent from both prediction and ground truth
has no IoU (NaN) and is left out of the mean; a class predicted but absent from the ground truth has IoU 0.
aAcc = sum TP / sum gt; mAcc = mean over classes present in the ground truth of TP / gt_c.
Memory is one (C x C+1) matrix whatever the dataset size.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch


@dataclasses.dataclass
class Metrics:
    """Percentages (0..100). ``iou``/``acc``: per class, NaN where undefined."""
    miou: float
    aacc: float
    macc: float
    iou: np.ndarray
    acc: np.ndarray


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


class ConfusionMatrix:
    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        # column num_classes: predictions that are not a class
        self.matrix = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    def update(self, pred, gt) -> None:
        """Add one image (or a batch): ``pred`` and ``gt`` integer arrays/tensors of the same shape."""
        pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
        gt = torch.as_tensor(np.asarray(gt) if not isinstance(gt, torch.Tensor) else gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
        device = self.matrix.device
        pred, gt = pred.to(device=device, dtype=torch.int64).reshape(-1), gt.to(device=device, dtype=torch.int64).reshape(-1)
        c = self.num_classes
        valid = (gt >= 0) & (gt < c)
        pred, gt = pred[valid], gt[valid]
        pred = torch.where((pred >= 0) & (pred < c), pred, torch.full_like(pred, c))
        self.matrix += torch.bincount(gt * (c + 1) + pred, minlength=c * (c + 1)).reshape(c, c + 1)

    def all_reduce(self) -> None:
        """Sum over the processes of a torch.distributed group (no-op when not distributed)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_backend() == "nccl" and self.matrix.device.type != "cuda":  # NCCL reduces GPU tensors only
            counts = self.matrix.cuda()
            dist.all_reduce(counts)
            self.matrix.copy_(counts.cpu())
        else:
            dist.all_reduce(self.matrix)

    def compute(self) -> Metrics:
        m = self.matrix.cpu().numpy()
        tp = np.diag(m[:, : self.num_classes]).astype(np.float64)
        gt_area = m.sum(axis=1).astype(np.float64)
        pred_area = m[:, : self.num_classes].sum(axis=0).astype(np.float64)
        union = pred_area + gt_area - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan) * 100
            acc = np.where(gt_area > 0, tp / gt_area, np.nan) * 100
            aacc = tp.sum() / gt_area.sum() * 100 if gt_area.sum() > 0 else math.nan
        return Metrics(miou=_nanmean(iou), aacc=float(aacc), macc=_nanmean(acc), iou=iou, acc=acc)
