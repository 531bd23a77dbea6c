"""A dataset's files checked before training starts, cheaply: every image and mask readable, of one size, masks
single-channel, and (for a user's own folders) every mask value a class or the ignore value. Without this, a
bad sample stops a run when it is first read, after the model is built and possibly hours in.

Images are read to their headers only (size, EXIF orientation). Masks too, for the card datasets, whose
values outside the classes the toolbox ignores (colour masks, rare, are decoded to see whether they are
gray). A user's masks are decoded, since their values must all be classes; ``.mat`` annotations are not
opened (their size is checked when they are read).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .datasets import DatasetError, SegmentationDataset, read_mask

_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees
_SHOWN = 3


def _image_size(path) -> tuple[int, int]:
    """(width, height) as the reader returns the image: with its EXIF orientation applied."""
    with Image.open(path) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a malformed EXIF block: the reader keeps the stored orientation too
            orientation = None
    return (height, width) if orientation in _SWAPPED_ORIENTATIONS else (width, height)


def _mask_size(path) -> tuple[int, int] | None:
    if path.suffix == ".mat":
        return None
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation ({e})") from None
    if mode in ("RGB", "RGBA"):
        read_mask(path)  # refuses a colour mask; a gray one stored as RGB is fine
    return size


def _values(raw: np.ndarray) -> np.ndarray:
    """The distinct values of a mask (a count per possible value for 8-bit masks: one pass, no sort)."""
    if raw.dtype == np.uint8:
        return np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    return np.unique(raw)


def sample_problem(dataset: SegmentationDataset, index: int) -> str | None:
    """What makes sample ``index`` unusable, in one line; None when it is fine."""
    sample = dataset.samples[index]
    try:
        width, height = _image_size(sample.image)
    except (OSError, ValueError) as e:
        return f"{sample.image}: cannot read image ({' '.join(str(e).split())})"
    try:
        if dataset.decode_masks_to_check:
            raw = read_mask(sample.label)
            size = (raw.shape[1], raw.shape[0])
            dataset.encode(_values(raw)[None])  # each value present once: what reading every pixel would find
        else:
            size = _mask_size(sample.label)
    except DatasetError as e:
        return str(e)
    except ValueError as e:  # the dataset's encode names the value, not the file
        return f"{sample.label}: {e}"
    if size is not None and size != (width, height):
        return (f"{sample.label}: annotation is {size[0]}x{size[1]} but image {sample.image} is {width}x{height} "
                f"(width x height)")
    return None


def check_dataset(dataset: SegmentationDataset, workers: int = 0) -> None:
    """Raise one ``DatasetError`` naming the first unusable samples and how many there are."""
    indices = range(len(dataset))
    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:  # decoding and file reads release the GIL
            problems = [p for p in pool.map(lambda i: sample_problem(dataset, i), indices) if p]
    else:
        problems = [p for p in map(lambda i: sample_problem(dataset, i), indices) if p]
    if problems:
        shown = "; ".join(problems[:_SHOWN])
        more = f"; ... ({len(problems)} in all)" if len(problems) > _SHOWN else ""
        raise DatasetError(f"{len(problems)} of {len(dataset)} samples cannot be used: {shown}{more}")
