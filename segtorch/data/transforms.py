"""The toolbox's training transforms, built from a card's ``training.train_pipeline``.

A sample is a dict ``{"image": HxWx3 uint8 RGB, "label": HxW float32}`` (float labels as in the toolbox, so
OpenCV resizes and rotates them the same way); ``ToTensor`` turns it into a float image tensor 3xHxW and
an int64 label tensor HxW. Every random draw comes from the ``numpy.random.Generator`` passed in, so a
sample's augmentation is a function of (seed, epoch, index) and an interrupted run resumes exactly.

Draws follow the toolbox's order and distributions (e.g. ``Resize`` draws one uniform scale, ``RandomCrop``
tries up to ten crops until no class covers ``one_category_max_ratio`` of the labelled pixels).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..imageops import as_pair, interpolation, normalize, resize_size
from .datasets import IGNORE_INDEX

Sample = dict
Transform = Callable[[Sample, np.random.Generator], Sample]



class Resize:
    """Resize to ``output_size`` times a random scale in ``scale_range``; with ``keep_ratio`` the largest
    size whose long and short sides fit ``max(output_size)`` and ``min(output_size)``."""

    def __init__(self, output_size, keep_ratio: bool = True, scale_range: Sequence[float] | None = (0.5, 2.0),
                 min_size: int | None = None, image_interpolation: str = "bilinear",
                 seg_target_interpolation: str = "nearest"):
        self.output_size = as_pair(output_size)
        self.keep_ratio = keep_ratio
        self.scale_range = tuple(scale_range) if scale_range is not None else None
        self.min_size = min_size
        self.image_interpolation = interpolation(image_interpolation)
        self.label_interpolation = interpolation(seg_target_interpolation)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.scale_range is not None:
            low, high = self.scale_range
            scale = rng.random() * (high - low) + low
            size = int(self.output_size[0] * scale), int(self.output_size[1] * scale)
        else:
            size = self.output_size
        h, w = sample["image"].shape[:2]
        new_h, new_w = resize_size(h, w, size, self.keep_ratio, self.min_size)
        dsize = new_w, new_h
        sample["image"] = cv2.resize(sample["image"], dsize, interpolation=self.image_interpolation)
        sample["label"] = cv2.resize(sample["label"], dsize, interpolation=self.label_interpolation)
        return sample


class RandomCrop:
    """A random ``crop_size`` (h, w) window, re-drawn (up to 10 times) while one class covers at least
    ``one_category_max_ratio`` of its labelled pixels; the last draw is kept either way."""

    def __init__(self, crop_size, one_category_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        self.crop_size = as_pair(crop_size)
        self.max_ratio = one_category_max_ratio
        self.ignore_index = ignore_index

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image, label = sample["image"], sample["label"]
        h, w = image.shape[:2]
        out_h, out_w = min(self.crop_size[0], h), min(self.crop_size[1], w)
        for _ in range(10):
            top, left = rng.integers(0, h - out_h + 1), rng.integers(0, w - out_w + 1)
            crop = label[top:top + out_h, left:left + out_w]
            values, counts = np.unique(crop, return_counts=True)
            counts = counts[values != self.ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < self.max_ratio:
                break
        if len(counts) == 0:  # the toolbox keeps the uncropped sample when the last window is all ignored
            return sample
        sample["image"] = image[top:top + out_h, left:left + out_w]
        sample["label"] = crop
        return sample


class RandomFlip:
    """Horizontal flip with probability ``prob``; ``fixed_seg_target_pairs`` swaps left/right classes."""

    def __init__(self, prob: float = 0.5, fixed_seg_target_pairs: Sequence[Sequence[int]] | None = None):
        self.prob = prob
        self.pairs = [tuple(p) for p in (fixed_seg_target_pairs or ())]

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() > self.prob:
            return sample
        sample["image"] = np.ascontiguousarray(sample["image"][:, ::-1])
        label = np.ascontiguousarray(sample["label"][:, ::-1])
        for a, b in self.pairs:
            is_a, is_b = label == a, label == b
            label[is_a], label[is_b] = b, a
        sample["label"] = label
        return sample


class PhotoMetricDistortion:
    """Random brightness, contrast (before or after the colour steps), saturation and hue, each with
    probability 1/2.

    The toolbox runs this on OpenCV's BGR image but converts with ``RGB2HSV``; we hold RGB and convert with
    ``BGR2HSV``, which treats the channels exactly as it does (red and blue swapped in the HSV maths).
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample["image"]
        if rng.integers(2):
            image = self._convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.integers(2) == 1
        if contrast_first:
            image = self._contrast(image, rng)
        if rng.integers(2):
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[..., 1] = self._convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if rng.integers(2):
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-self.hue_delta, self.hue_delta)) % 180
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if not contrast_first:
            image = self._contrast(image, rng)
        sample["image"] = image
        return sample

    def _contrast(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not rng.integers(2):
            return image
        return self._convert(image, alpha=rng.uniform(*self.contrast_range))


class RandomRotation:
    """Rotate by a random whole angle in [-angle_upper, angle_upper) with probability ``prob``."""

    def __init__(self, prob: float = 0.5, angle_upper: int = 30, image_fill_value: float = 0.0,
                 seg_target_fill_value: float = IGNORE_INDEX, image_interpolation: str = "bicubic",
                 seg_target_interpolation: str = "nearest"):
        self.prob = prob
        self.angle_upper = angle_upper
        self.image_fill = image_fill_value
        self.label_fill = seg_target_fill_value
        self.image_interpolation = interpolation(image_interpolation)
        self.label_interpolation = interpolation(seg_target_interpolation)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() > self.prob:
            return sample
        h, w = sample["image"].shape[:2]
        angle = int(rng.integers(-self.angle_upper, self.angle_upper))
        matrix = cv2.getRotationMatrix2D(center=(w / 2, h / 2), angle=angle, scale=1)
        sample["image"] = cv2.warpAffine(sample["image"], matrix, (w, h), flags=self.image_interpolation,
                                         borderValue=self.image_fill)
        sample["label"] = cv2.warpAffine(sample["label"], matrix, (w, h), flags=self.label_interpolation,
                                         borderValue=self.label_fill)
        return sample


class EdgeExtractor:
    """Edge targets feed edge losses (CE2P-style heads); no model in segtorch's cards has one, so this
    step is accepted and does nothing."""

    def __init__(self, **_):
        pass

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return sample


class Normalize:
    """(image - mean) / std in float32 with the toolbox's rounding; ``mean``/``std`` in RGB order."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], to_rgb: bool = True):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["image"] = normalize(sample["image"], self.mean, self.std)
        return sample


class ToTensor:
    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["image"] = torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1), dtype=np.float32))
        sample["label"] = torch.from_numpy(np.ascontiguousarray(sample["label"]).astype(np.int64))
        return sample


class Padding:
    """Pad (or, where larger, centre-crop) to ``output_size`` (h, w), swapped to the image's orientation;
    image filled with 0, labels with the ignore index. Works on tensors (after ``ToTensor``) or arrays."""

    def __init__(self, output_size, data_type: str = "tensor", image_fill_value: float = 0,
                 seg_target_fill_value: float = IGNORE_INDEX, output_size_auto_adaptive: bool = True, **_):
        self.output_size = as_pair(output_size)
        self.image_fill = image_fill_value
        self.label_fill = seg_target_fill_value
        self.auto_adaptive = output_size_auto_adaptive

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample["image"]
        h, w = image.shape[-2:] if isinstance(image, torch.Tensor) else image.shape[:2]
        out_h, out_w = self.output_size
        if self.auto_adaptive and ((h > w and out_h < out_w) or (h < w and out_h > out_w)):
            out_h, out_w = out_w, out_h
        top, left = (out_h - h) // 2, (out_w - w) // 2
        pad = (left, out_w - w - left, top, out_h - h - top)
        sample["image"] = self._pad(image, pad, self.image_fill)
        sample["label"] = self._pad(sample["label"], pad, self.label_fill)
        return sample

    @staticmethod
    def _pad(x, pad, value):
        if isinstance(x, torch.Tensor):
            return F.pad(x, pad, value=value)  # negative amounts crop, as in the toolbox
        left, right, top, bottom = pad
        if min(pad) < 0:
            x = x[max(-top, 0):x.shape[0] - max(-bottom, 0), max(-left, 0):x.shape[1] - max(-right, 0)]
            left, right, top, bottom = (max(v, 0) for v in pad)
        widths = ((top, bottom), (left, right)) + ((0, 0),) * (x.ndim - 2)
        return np.pad(x, widths, constant_values=value)


TRANSFORMS: dict[str, type] = {cls.__name__: cls for cls in (
    Resize, RandomCrop, RandomFlip, PhotoMetricDistortion, RandomRotation, EdgeExtractor, Normalize, ToTensor,
    Padding)}


class Compose:
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


def build_transforms(pipeline: Sequence[Mapping]) -> Compose:
    """``[{"type": "Resize", ...}, ...]`` (a card's ``training.train_pipeline``) -> ``Compose``."""
    steps = []
    for step in pipeline:
        step = dict(step)
        kind = step.pop("type")
        if kind not in TRANSFORMS:
            raise ValueError(f"unsupported training transform {kind!r}; known: {', '.join(TRANSFORMS)}")
        if kind == "Padding" and step.get("data_type", "tensor") not in ("tensor", "numpy"):
            raise ValueError(f"Padding.data_type must be 'tensor' or 'numpy', not {step['data_type']!r}")
        steps.append(TRANSFORMS[kind](**step))
    return Compose(steps)


def with_crop_size(pipeline: Sequence[Mapping], crop_size) -> list[dict]:
    """The pipeline with another crop size: ``RandomCrop`` and ``Padding`` changed, ``Resize`` scaled alike."""
    crop = as_pair(crop_size)
    old = next((as_pair(s["crop_size"]) for s in pipeline if s["type"] == "RandomCrop"), None)
    factor = min(crop) / min(old) if old else 1.0
    out = []
    for step in pipeline:
        step = dict(step)
        if step["type"] == "RandomCrop":
            step["crop_size"] = list(crop)
        elif step["type"] == "Padding":
            step["output_size"] = list(crop)
        elif step["type"] == "Resize":
            step["output_size"] = [max(1, int(round(v * factor))) for v in as_pair(step["output_size"])]
        out.append(step)
    return out


class TrainingSet(torch.utils.data.Dataset):
    """A dataset's samples through the training transforms; returns (image 3xHxW float, label HxW int64).

    Indexed by ``(index, epoch)`` (what ``EpochSampler`` yields) so the augmentation of each sample depends
    only on (seed, epoch, index): the same on every worker and after resuming. A plain int means epoch 0.
    """

    def __init__(self, dataset, transforms: Callable[[Sample, np.random.Generator], Sample], seed: int = 0):
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.dataset[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        sample = self.transforms({"image": item["image"], "label": item["label"].astype(np.float32)}, rng)
        image, label = sample["image"], sample["label"]
        if not isinstance(image, torch.Tensor):  # a pipeline without ToTensor
            sample = ToTensor()(sample, rng)
            image, label = sample["image"], sample["label"]
        return image, label
