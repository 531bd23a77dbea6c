"""Rendering label maps: colour maps, overlays and legends as the toolbox draws them."""
from __future__ import annotations

import numpy as np
import pytest

from segtorch.inference import colorize, legend, overlay


RNG = np.random.default_rng(5)


PALETTE = [(120, 120, 120), (180, 120, 120), (6, 230, 230)]


def test_colorize_and_overlay_match_the_toolbox_picture():
    labels = np.array([[0, 1, 2], [2, 1, 0], [-1, 3, 255]])
    colors = colorize(labels, PALETTE)
    assert colors.dtype == np.uint8 and colors.shape == (3, 3, 3)
    assert tuple(colors[0, 2]) == PALETTE[2] and tuple(colors[2, 0]) == tuple(colors[2, 2]) == (255, 255, 255)
    image = RNG.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    # inference.py: BGR image * 0.5 + mask (palette reversed to BGR) * 0.5, truncated to uint8
    mask_bgr = np.full_like(image, 255)  # ids outside the classes: white (no class of PALETTE is)
    for cls, color in enumerate(PALETTE):
        mask_bgr[labels == cls] = np.array(color)[::-1]
    toolbox = (image[..., ::-1] * 0.5 + mask_bgr * 0.5).astype(np.uint8)
    assert np.array_equal(overlay(image, labels, PALETTE), toolbox[..., ::-1])
    assert np.array_equal(overlay(image, labels, PALETTE, alpha=0.0), image)
    with pytest.raises(ValueError, match="labels"):
        overlay(image, labels[:2], PALETTE)
    inside = np.array([[0, 1], [2, 0]], np.int32)  # every id in the palette: the lookup without the clamp
    assert np.array_equal(colorize(inside, PALETTE), np.array(PALETTE, np.uint8)[inside])


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_blend_is_the_float_formula_for_every_byte_pair(alpha):
    from segtorch.inference.render import blend

    a, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    image, mask = np.stack([a, b, a], axis=-1), np.stack([b, a, b], axis=-1)
    expected = (image * (1.0 - alpha) + mask * alpha).astype(np.uint8)  # the toolbox's picture, truncated
    out = blend(image, mask, alpha)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert np.array_equal(image[..., 0], a)  # the inputs are left as they were


@pytest.mark.parametrize("case", ["uint8_ids", "past_palette", "negative", "big_palette", "wide_ids", "empty"])
def test_colorize_lookups(case):
    """Both lookups (OpenCV's for ids 0-255 with at most 256 colours, numpy's otherwise) give the palette's
    colour for every id in it and the outside colour (white: no class has it here) for every other."""
    rng = np.random.default_rng(11)
    palette = [tuple(int(v) for v in c) for c in rng.integers(0, 256, (300 if case == "big_palette" else 20, 3))]
    shape = (0, 5) if case == "empty" else (37, 53)
    high = {"uint8_ids": 20, "past_palette": 256, "negative": 20, "big_palette": 400, "wide_ids": 70000,
            "empty": 20}[case]
    labels = rng.integers(-5 if case == "negative" else 0, high, shape)
    labels = labels.astype({"uint8_ids": np.uint8, "wide_ids": np.uint32}.get(case, np.int32))
    table = np.array(palette, np.uint8)
    inside = (labels >= 0) & (labels < len(palette))
    expected = np.where(inside[..., None], table[np.clip(labels, 0, len(palette) - 1).astype(np.int64)], 255)
    assert np.array_equal(colorize(labels, palette), expected)


def test_legend_image():
    names = ["wall", "building", "sky"]
    full = legend(names, PALETTE)
    assert full.ndim == 3 and full.shape[2] == 3 and full.dtype == np.uint8
    some = legend(names, PALETTE, present=np.array([[2, 2], [0, 2]]))
    assert some.shape[0] < full.shape[0]
    assert legend(names, PALETTE, present=[]).shape[0] > 0
    many = legend([f"class{i}" for i in range(100)], [(i, i, i) for i in range(100)])
    assert many.shape[1] > many.shape[0] / 4  # laid out in columns, not one tall strip


