"""The evaluation loop (any ``predict_fn(image) -> labels``) and its report: console table, JSON, Markdown."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..files import atomic_write
from .metrics import ConfusionMatrix, Metrics

PredictFn = Callable[[np.ndarray], np.ndarray]


def _identity(item):
    return item


class _Inputs(torch.utils.data.Dataset):
    """The dataset's items as the loop needs them, made in the reading processes: the label, the image's
    (h, w), and the model's input (``prepare(image)``, or the image itself)."""

    def __init__(self, dataset, indices: Sequence[int], prepare: Callable | None):
        self.dataset, self.indices, self.prepare = dataset, indices, prepare

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[self.indices[i]]
        image = item["image"]
        return {"id": item["id"], "label": item["label"], "size": tuple(image.shape[:2]),
                "input": image if self.prepare is None else self.prepare(image)}


def evaluate(predict_fn: PredictFn, dataset, num_classes: int | None = None, *, limit: int | None = None,
             progress: bool | None = None, num_workers: int = 0, desc: str = "eval", distributed: bool = False,
             prepare: Callable | None = None, batch_size: int = 1) -> tuple[Metrics, int]:
    """Run ``predict_fn`` (HxWx3 uint8 RGB -> HxW class indices) over ``dataset`` (items with "image",
    "label", "id") and return (metrics, number of images). Streams: a few images in memory at a time.

    ``limit``: the first N images only. ``progress``: a tqdm bar (None: only on a terminal).
    ``num_workers``: processes reading images ahead. ``distributed``: each torch.distributed process takes
    every world_size-th image and the counts are summed (every process gets the totals).
    ``prepare``: a picklable function the reading processes apply to every image (e.g. the card's test-time
    resize and normalisation, giving 1 x 3 x h x w); then ``predict_fn(batch, (h, w))`` gets up to
    ``batch_size`` consecutive prepared inputs of one shape, from images of one size, concatenated along
    the first dimension, and returns one label map per image.
    """
    num_classes = num_classes if num_classes is not None else dataset.num_classes
    if batch_size < 1 or (prepare is None and batch_size != 1):
        raise ValueError(f"batch_size must be at least 1, and 1 without prepare; got {batch_size}")
    indices = list(range(len(dataset)))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        indices = indices[:limit]
    total = len(indices)
    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        indices = indices[rank::world]  # no padding: every image is counted once
    loader = torch.utils.data.DataLoader(_Inputs(dataset, indices, prepare), batch_size=None, shuffle=False,
                                         num_workers=num_workers, collate_fn=_identity)
    confusion = ConfusionMatrix(num_classes)
    from tqdm import tqdm

    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(indices), desc=desc, disable=not show or rank != 0, unit="img", dynamic_ncols=True)
    batch: list[dict] = []

    def run_batch() -> None:
        if prepare is None:
            preds = [predict_fn(batch[0]["input"])]
        else:
            preds = list(predict_fn(torch.cat([item["input"] for item in batch]), batch[0]["size"]))
        for item, pred in zip(batch, preds, strict=True):
            pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            if pred.shape != item["label"].shape:
                raise ValueError(f"image {item['id']}: prediction is {pred.shape} but the annotation is "
                                 f"{item['label'].shape}")
            confusion.update(pred, item["label"])
        before = bar.n
        bar.update(len(batch))
        if show and bar.n // 10 > before // 10:
            bar.set_postfix(mIoU=f"{confusion.compute().miou:.2f}")
        batch.clear()

    for item in loader:
        if batch and (len(batch) >= batch_size or item["size"] != batch[0]["size"]
                      or item["input"].shape != batch[0]["input"].shape):
            run_batch()
        batch.append(item)
    if batch:
        run_batch()
    bar.close()
    if world > 1:
        confusion.all_reduce()
    return confusion.compute(), total


def _num(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


@dataclasses.dataclass
class EvalResult:
    """One model on one dataset split. Metrics in percent."""
    name: str | None
    dataset: str
    split: str
    num_images: int
    tta: bool
    metrics: Metrics
    class_names: Sequence[str]
    reported: float | None = None
    seconds: float | None = None
    dataset_size: int | None = None  # images in the split; more than num_images when --limit took a subset
    world_size: int = 1  # processes that shared the images (torchrun)

    @property
    def subset(self) -> bool:
        """True when only part of the split was evaluated: the figure is not comparable with the reported one."""
        return self.dataset_size is not None and self.num_images < self.dataset_size

    @property
    def miou(self) -> float:
        return self.metrics.miou

    def to_dict(self) -> dict:
        """The JSON record (DESIGN.md): NaN (a class absent from prediction and ground truth) as null."""
        m = self.metrics
        return {"name": self.name, "dataset": self.dataset, "split": self.split, "num_images": self.num_images,
                "tta": self.tta, "miou": _num(m.miou), "aacc": _num(m.aacc), "macc": _num(m.macc),
                "iou": {c: _num(v) for c, v in zip(self.class_names, m.iou)}, "reported": self.reported,
                "subset": self.subset, "world_size": self.world_size}

    def delta(self) -> float | None:
        """mIoU minus the reported figure; None where there is nothing comparable (no figure, or a subset)."""
        if self.reported is None or self.subset or math.isnan(self.miou):
            return None
        return self.miou - self.reported

    def _images(self) -> str:
        if self.subset:
            return f"first {self.num_images} of {self.dataset_size} images: a subset, not comparable with the reported figure"
        return f"{self.num_images} images"

    def summary(self) -> str:
        mode = "ms+flip" if self.tta else "single-scale"
        if self.subset:
            versus = ""
        else:
            delta = self.delta()
            versus = (f" vs reported {self.reported:.2f}" if self.reported is not None else " vs reported -") + \
                (f" ({delta:+.2f})" if delta is not None else "")
        return (f"{self.name or 'model'} on {self.dataset} {self.split} ({self._images()}, {mode}): "
                f"mIoU {self.miou:.2f}{versus}; aAcc {self.metrics.aacc:.2f}, mAcc {self.metrics.macc:.2f}")

    def table(self) -> str:
        """Per-class IoU and accuracy for the console, then the summary line."""
        width = max(12, *(len(_short(c)) for c in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
        for c, iou, acc in zip(self.class_names, self.metrics.iou, self.metrics.acc):
            lines.append(f"{_short(c):<{width}}  {_fmt(iou):>6}  {_fmt(acc):>6}")
        lines.append(self.summary())
        return "\n".join(lines)

    def markdown(self) -> str:
        reported = f"{self.reported:.2f}" if self.reported is not None else "-"
        mode = "ms+flip" if self.tta else "single-scale"
        lines = [f"## {self.name or 'model'}", "",
                 f"{self.dataset} `{self.split}`, {self._images()}, {mode}", "",
                 "| mIoU | reported | aAcc | mAcc |", "|---:|---:|---:|---:|",
                 f"| {self.miou:.2f} | {reported} | {self.metrics.aacc:.2f} | {self.metrics.macc:.2f} |", "",
                 "| class | IoU | Acc |", "|---|---:|---:|"]
        for c, iou, acc in zip(self.class_names, self.metrics.iou, self.metrics.acc):
            lines.append(f"| {c.replace('|', '/')} | {_fmt(iou)} | {_fmt(acc)} |")
        return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _short(name: str) -> str:
    return name.split(",")[0]  # ADE20K names list synonyms: "wall", "building, edifice", ...


def write_results(results: Sequence[EvalResult], json_path: str | os.PathLike,
                  markdown_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """JSON (one object for one result, else a list) and a Markdown report (default: beside, ``.md``)."""
    json_path = Path(json_path).expanduser()
    records = [r.to_dict() for r in results]
    atomic_write(json_path, json.dumps(records[0] if len(records) == 1 else records, indent=2) + "\n")
    md_path = Path(markdown_path).expanduser() if markdown_path else json_path.with_suffix(".md")
    atomic_write(md_path, "\n".join(r.markdown() for r in results))
    return json_path, md_path


def timed_evaluate(predict_fn: PredictFn, dataset, *, name: str | None, dataset_key: str, tta: bool,
                   class_names: Sequence[str], reported: float | None, **kwargs) -> EvalResult:
    start = time.perf_counter()
    metrics, n = evaluate(predict_fn, dataset, len(class_names), **kwargs)
    dist = torch.distributed
    world = dist.get_world_size() if kwargs.get("distributed") and dist.is_available() and dist.is_initialized() \
        else 1
    return EvalResult(name=name, dataset=dataset_key, split=getattr(dataset, "split", "?"), num_images=n, tta=tta,
                      metrics=metrics, class_names=tuple(class_names), reported=reported,
                      seconds=time.perf_counter() - start, dataset_size=len(dataset), world_size=world)
