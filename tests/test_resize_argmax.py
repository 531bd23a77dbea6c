"""``resize_argmax``: label maps of upsampled scores without the full-size scores, against the full resize.

The shortcut must give exactly the labels of its own full computation (``height_pass(width_pass(...))``,
every pixel interpolated), and those may differ from ``argmax(F.interpolate(...))`` only where two classes
are tied to float32 rounding. Inputs: smooth fields with class regions (most band columns skipped), noise
(few skipped), integer scores full of exact ties, classes one float32 step apart (where the rounding of the
interpolation ties them: the shortcut's margin must refuse those; with no margin 250 k labels differ), NaN
and infinite scores, float64, both ``align_corners``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segtorch.inference.predictor import class_argmax, infer_labels, infer_logits
from segtorch.inference.resize_argmax import applies, height_pass, resized_argmax, source_rows, width_pass


def _full_labels(scores, size, align_corners):
    return class_argmax(height_pass(width_pass(scores, size[1], align_corners), size[0], align_corners))


def _regions(n, c, h, w, seed, dtype=torch.float32):
    """Scores like a segmentor's: a few smooth class regions (bilinear blobs) plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, c, max(2, h // 4), max(2, w // 4), generator=g, dtype=torch.float64) * 4
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return (smooth + 0.05 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).to(dtype)


def _assert_ties_only(ours, scores_full):
    """``ours`` equals the argmax of ``scores_full`` except where its two best classes are within rounding."""
    ref = class_argmax(scores_full)
    differ = ours != ref
    if differ.any():
        top2 = scores_full.topk(2, dim=1).values
        gap = (top2[:, 0] - top2[:, 1])[differ]
        assert gap.max() <= 4e-6 * float(scores_full.abs().max()), f"{int(differ.sum())} labels differ"


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(24, 640), (18, 480), (64, 683), (7, 13), (3, 1000), (5, 5), (1, 9)])
def test_source_rows_are_the_kernels(n_in, n_out, align_corners):
    """Weights as ATen's kernel uses them: read back from it by resizing one-hot rows (within one rounding on
    torch 2.9 and later: the kernel's source coordinate is one fused multiply-add where the CPU has one; torch
    2.8's kernel rounds its coordinate in another order, up to 2^-20 apart)."""
    probe = F.interpolate(torch.eye(n_in).reshape(1, n_in, n_in, 1), size=(n_out, 1), mode="bilinear",
                          align_corners=align_corners)[0, :, :, 0]  # n_in x n_out: weight of row k for row i
    i0, i1, w0, w1 = source_rows(n_in, n_out, align_corners, torch.float32)
    ours = torch.zeros(n_in, n_out)
    ours[i0, torch.arange(n_out)] += w0
    ours[i1, torch.arange(n_out)] += w1
    assert (ours - probe).abs().max() <= (2 ** -23 if torch.__version__ >= "2.9" else 2 ** -20)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", ["regions", "noise", "ties", "one_step", "two_classes", "many_classes",
                                  "float64", "one_direction", "non_finite"])
def test_labels_equal_the_full_resize(case, align_corners):
    n, c, h, w, size = 3, 6, 18, 24, (480, 640)
    if case == "regions":
        scores = _regions(n, c, h, w, seed=0)
    elif case == "noise":
        scores = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))
    elif case == "ties":  # small integers: exact ties everywhere, resolved to the first class
        scores = torch.randint(0, 3, (n, c, h, w), generator=torch.Generator().manual_seed(2)).float()
    elif case == "one_step":  # class 1 leads class 0 by one float32 step everywhere
        base = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(10)) * 10 + 1
        scores = torch.cat([base, torch.nextafter(base, torch.full_like(base, float("inf")))], 1)
    elif case == "two_classes":
        scores, size = _regions(n, 2, 11, 7, seed=3), (101, 70)
    elif case == "many_classes":
        scores, size = _regions(1, 150, 64, 86, seed=4), (512, 683)
    elif case == "float64":
        scores = _regions(n, c, h, w, seed=5, dtype=torch.float64)
    elif case == "one_direction":  # upsampled in width only: every band is one output row
        scores, size = _regions(n, c, h, w, seed=6), (h, 97)
    else:
        scores = _regions(n, c, h, w, seed=7)
        scores[0, 2, 3, 4] = float("nan")
        scores[1, :, 5, 6] = float("inf")
        scores[2, 1, 7, 8] = -float("inf")
    assert applies(scores, size)
    ours = resized_argmax(scores, size, align_corners)
    assert ours.dtype == torch.int32 and ours.shape == (scores.shape[0], *size)
    assert torch.equal(ours, _full_labels(scores, size, align_corners))
    if case != "non_finite":  # (ATen's NaN/inf arithmetic is its own)
        _assert_ties_only(ours, F.interpolate(scores, size=size, mode="bilinear", align_corners=align_corners))


def test_channels_last_scores():
    scores = _regions(2, 6, 18, 24, seed=8)
    cl = scores.contiguous(memory_format=torch.channels_last)
    assert torch.equal(resized_argmax(cl, (480, 640), False), resized_argmax(scores, (480, 640), False))


def test_applies_only_to_cpu_float_upsampling():
    s = torch.zeros(1, 4, 8, 8)
    assert applies(s, (16, 16)) and applies(s, (8, 9))
    assert not applies(s, (8, 8))  # same size: no resize
    assert not applies(s, (4, 16))  # downsampling in height
    assert not applies(s.to(torch.bfloat16), (16, 16))  # resized in bf16, with bf16's ties
    assert not applies(torch.zeros(1, 1, 8, 8), (16, 16))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 7, 5, stride=4, padding=2)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("settings", [dict(), dict(flip=True), dict(scales=(0.5, 1.0), flip=True),
                                      dict(mode="slide", crop_size=(24, 24), stride=(16, 16)),
                                      dict(softmax_before_resize=True, flip=True)],
                         ids=["whole", "flip", "multi_scale", "slide", "probabilities"])
def test_infer_labels_is_the_argmax_of_infer_logits(settings):
    x = torch.randn(2, 3, 45, 61, generator=torch.Generator().manual_seed(9))
    kw = dict(num_classes=7, align_corners=False, output_size=(97, 130), **settings)
    labels = infer_labels(_Net().eval(), x, **kw)
    assert labels.dtype == torch.int32 and labels.shape == (2, 97, 130)
    _assert_ties_only(labels, infer_logits(_Net().eval(), x, **kw))
