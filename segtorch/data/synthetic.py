"""A deterministic synthetic scene dataset (the demo model's data), written in the generic images + masks layout.

Scenes: a textured background (gradients, stripes, blobs, noise) with 2-7 objects of five shape classes, each
with its own texture, drawn in random order so they occlude each other, at scales from a tenth to half the
image. Image ``i`` of a split depends only on (split, i), so any subset can be regenerated exactly.

    python -m segtorch.data.synthetic OUT_DIR [--train 400] [--val 50] [--size 192]
writes OUT_DIR/{train,val}/{images,masks}/NNNN.png.
"""
from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np

CLASS_NAMES = ("background", "disc", "box", "triangle", "ring", "cross")
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48))
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


def _rng(split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_SEEDS.get(split, zlib.crc32(split.encode())), index])


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray) -> np.ndarray:
    """An h x w x 3 float texture around colour ``base``: stripes, checks or noise, with a little blur."""
    import cv2

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 3)
    if kind == 0:  # stripes at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:  # checks
        cell = rng.integers(3, 10)
        pattern = (((xx // cell) + (yy // cell)) % 2) * 2 - 1
    else:  # smoothed noise
        pattern = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), rng.uniform(1, 3))
        pattern /= max(float(np.abs(pattern).max()), 1e-6)
    amp = rng.uniform(15, 45)
    return np.clip(base[None, None, :] + amp * pattern[..., None] * rng.uniform(0.5, 1, 3), 0, 255)


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """A boolean mask of shape class ``cls`` on an H x W canvas (object placed at random)."""
    import cv2

    canvas = np.zeros((size, size), np.uint8)
    r = int(rng.uniform(0.05, 0.25) * size)
    cx, cy = (int(v) for v in rng.integers(0, size, 2))
    if cls == 1:
        cv2.circle(canvas, (cx, cy), r, 1, -1)
    elif cls == 2:
        box = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.5, 1.5)), rng.uniform(0, 90)))
        cv2.fillPoly(canvas, [box.astype(np.int32)], 1)
    elif cls == 3:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 1)
    elif cls == 4:
        cv2.circle(canvas, (cx, cy), r, 1, max(2, r // 3))
    else:
        t = max(2, r // 3)
        cv2.rectangle(canvas, (cx - r, cy - t), (cx + r, cy + t), 1, -1)
        cv2.rectangle(canvas, (cx - t, cy - r), (cx + t, cy + r), 1, -1)
    return canvas.astype(bool)


def make_scene(split: str, index: int, size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 RGB image, HxW uint8 mask of class indices) for image ``index`` of ``split``."""
    import cv2

    rng = _rng(split, index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    image = c0 + (c1 - c0) * (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = 0.6 * image + 0.4 * _texture(rng, size, size, rng.uniform(60, 200, 3))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 8))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        region = _shape_mask(rng, cls, size)
        colour = np.array(PALETTE[cls], np.float32) * rng.uniform(0.5, 1.0) + rng.uniform(0, 80, 3)
        image[region] = _texture(rng, size, size, np.clip(colour, 0, 255))[region]
        mask[region] = cls
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.7)
    image += rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_split(root: str | Path, split: str, count: int, size: int = 192) -> Path:
    """Write ``count`` scenes to ``root/split/{images,masks}``; existing identical files are kept."""
    from PIL import Image

    folder = Path(root) / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = make_scene(split, i, size)
        Image.fromarray(image).save(folder / "images" / f"{i:04d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i:04d}.png")
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--val", type=int, default=50)
    ap.add_argument("--size", type=int, default=192)
    args = ap.parse_args(argv)
    for split, count in (("train", args.train), ("val", args.val)):
        print(write_split(args.out, split, count, args.size))


if __name__ == "__main__":
    main()
