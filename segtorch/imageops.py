"""Image arithmetic shared by the test pipeline (``inference/image.py``) and the training transforms
(``data/transforms.py``): the toolbox's resize sizes, its OpenCV interpolation names and its Normalize rounding.
Pure functions on numpy arrays; no I/O. OpenCV and numpy are imported on use: the CLI's parser reads
``IMAGE_SUFFIXES`` from here and must stay light."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

# the file suffixes segtorch reads as images (folders of inputs, datasets of the user's own images)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# the toolbox's interpolation names -> OpenCV's flags
INTERPOLATIONS = {"nearest": "INTER_NEAREST", "bilinear": "INTER_LINEAR", "bicubic": "INTER_CUBIC",
                  "area": "INTER_AREA", "lanczos": "INTER_LANCZOS4"}


def as_pair(value) -> tuple[int, int]:
    """``512`` -> (512, 512); ``[512, 1024]`` -> (512, 1024)."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    a, b = value
    return int(a), int(b)


def interpolation(name: str) -> int:
    """OpenCV's flag for one of the toolbox's interpolation names."""
    import cv2

    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; known: {sorted(INTERPOLATIONS)}")
    return getattr(cv2, INTERPOLATIONS[name])


def resize_size(height: int, width: int, size, keep_ratio: bool = True, min_size: int | None = None
                ) -> tuple[int, int]:
    """(h, w) the toolbox's ``Resize`` gives a ``height x width`` image for a target ``size`` (long, short).

    ``keep_ratio``: the largest scale that fits the long side in ``max(size)`` and the short side in
    ``min(size)``, sizes rounded half up, then ``min_size`` enforced on the short side. Otherwise the image
    becomes ``size`` laid out like the image (portrait images get the long side as height).
    """
    size = as_pair(size)
    if keep_ratio:
        scale = min(max(size) / max(height, width), min(size) / min(height, width))
        new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
        if min_size is not None and min(new_w, new_h) < min_size:
            scale = min_size / min(height, width)
            new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
        return new_h, new_w
    if height > width:
        return max(size), min(size)
    return min(size), max(size)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(image - mean) / std as float32 HxWx3, computed as the toolbox's Normalize computes it: OpenCV's
    ``subtract`` of the float64 mean and ``multiply`` by the float64 inverse std, in place on a float32 copy.
    The rounding of that product is OpenCV's own (4.x rounds the double product, 5.x multiplies by the
    inverse rounded to float32): calling the same functions gives the toolbox's bits under either.
    ``mean``/``std`` in the image's channel order."""
    import cv2
    import numpy as np

    out = image.astype(np.float32)  # a copy: the caller's image is left alone
    cv2.subtract(out, np.asarray(mean, dtype=np.float64).reshape(1, -1), out)
    cv2.multiply(out, 1.0 / np.asarray(std, dtype=np.float64).reshape(1, -1), out)
    return out
