"""Pictures of label maps: colour masks, blends over the image (as the toolbox's ``inference.py`` draws them)
and a legend of the classes."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

Palette = Sequence[Sequence[int]]


def _palette_table(palette: Palette) -> np.ndarray:
    table = np.asarray(palette, dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) == 0:
        raise ValueError(f"palette must be a non-empty list of (r, g, b) colours, got shape {table.shape}")
    if table.min() < 0 or table.max() > 255:
        raise ValueError("palette colours must be in 0-255")
    return table.astype(np.uint8)


# the colour of ids outside the classes (an ignore label 255, -1, an id >= the class count): the first of these
# that no class of the palette has, so that such pixels never look like a class (VOC's class 0 is black)
OUTSIDE_COLOURS = ((255, 255, 255), (255, 0, 255), (0, 255, 255), (255, 255, 0))


def outside_colour(palette: Palette) -> tuple[int, int, int]:
    """The colour ``colorize`` gives ids outside ``palette``: white, or else a colour no class has."""
    used = {tuple(int(v) for v in colour) for colour in _palette_table(palette)}
    spare = (c for c in OUTSIDE_COLOURS + tuple((255, 255, b) for b in range(256)) if c not in used)
    return next(spare, (255, 255, 255))  # a palette holding all 260 of these keeps white


def colorize(labels: np.ndarray, palette: Palette) -> np.ndarray:
    """H x W class ids -> H x W x 3 uint8 RGB; ids outside the palette (an ignore label such as 255, -1, an id
    past the classes) get ``outside_colour(palette)``, a colour no class has."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be an H x W array, got shape {labels.shape}")
    table = _palette_table(palette)
    # one extra row takes every out-of-range id, so the lookup is a single gather
    table = np.concatenate([table, np.asarray([outside_colour(palette)], np.uint8)])
    outside = len(table) - 1
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int64)
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if labels.size and low >= 0 and high < 256 and outside <= 256:  # outside: also the palette's length
        # OpenCV's 256-colour map on uint8 ids in one pass: 0.18 ms of one core on a 640x480 map, against
        # 1.3 ms expanding the ids to three channels and then looking each up (cv2.LUT) and 0.5 ms for np.take
        lut = np.empty((256, 1, 3), np.uint8)
        lut[:, 0] = table[outside]
        lut[:outside, 0] = table[:outside]
        return cv2.applyColorMap(labels.astype(np.uint8), lut)
    if labels.size and not (low >= 0 and high < outside):  # only then the clamp's full pass
        labels = np.where((labels >= 0) & (labels < outside), labels, outside)
    return np.take(table, labels, axis=0)  # 7x faster than table[labels] on a 640x480 map


def overlay(image_rgb: np.ndarray, labels: np.ndarray, palette: Palette, alpha: float = 0.5) -> np.ndarray:
    """The colour mask blended over the image: ``image * (1 - alpha) + mask * alpha``, truncated to uint8.
    With ``alpha=0.5`` this is the toolbox's ``inference.py`` picture, in RGB."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 RGB, got shape {image.shape}")
    if image.shape[:2] != np.shape(labels):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but labels are "
                         f"{np.shape(labels)[1]}x{np.shape(labels)[0]} (width x height)")
    return blend(image, colorize(labels, palette), alpha)


def blend(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image * (1 - alpha) + mask * alpha`` truncated to uint8, for two H x W x 3 uint8 arrays (``overlay``
    with its colour mask already made)."""
    if alpha == 0.5:  # (a + b) / 2 truncated, exactly what the float formula gives: the bits both have plus
        # half of those only one has, in uint8 without widening (640x480: 0.1 ms; through uint16 0.5-1.5 ms)
        half = np.bitwise_xor(image, mask)
        np.right_shift(half, 1, out=half)
        half += image & mask
        return half
    blended = image.astype(np.float64) * (1.0 - alpha) + mask.astype(np.float64) * alpha
    return blended.astype(np.uint8)


def legend(class_names: Sequence[str], palette: Palette, present: Iterable[int] | np.ndarray | None = None,
           rows_per_column: int = 30) -> np.ndarray:
    """An RGB image listing classes with their colour swatches. ``present``: the class ids to list (or a
    label map, whose classes are listed); default all classes."""
    table = _palette_table(palette)
    if present is None:
        ids = list(range(len(class_names)))
    else:
        arr = np.asarray(present if not isinstance(present, (set, frozenset)) else sorted(present))
        ids = sorted({int(i) for i in np.unique(arr)} if arr.ndim >= 2 else {int(i) for i in arr.ravel()})
    ids = [i for i in ids if 0 <= i < min(len(class_names), len(table))]

    font = ImageFont.load_default()
    line, swatch, pad = 18, 14, 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str) -> int:
        left, _, right, _ = probe.textbbox((0, 0), text, font=font)
        return int(math.ceil(right - left))

    labels = [f"{i}: {class_names[i]}" for i in ids] or ["(no classes)"]
    rows = max(1, min(rows_per_column, len(labels)))
    columns = [labels[c:c + rows] for c in range(0, len(labels), rows)]
    col_widths = [pad + swatch + pad + max(text_width(t) for t in col) + 2 * pad for col in columns]
    canvas = Image.new("RGB", (sum(col_widths), pad + rows * line + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x0, k = 0, 0
    for col, col_width in zip(columns, col_widths):
        for r, text in enumerate(col):
            y = pad + r * line
            if ids:
                color = tuple(int(v) for v in table[ids[k]])
                draw.rectangle([x0 + pad, y + 2, x0 + pad + swatch - 1, y + 1 + swatch], fill=color,
                               outline=(0, 0, 0))
                k += 1
            draw.text((x0 + pad + swatch + pad, y + 2), text, fill=(0, 0, 0), font=font)
        x0 += col_width
    return np.asarray(canvas, dtype=np.uint8).copy()
