"""The test-time procedure (whole, slide, multi-scale + flip, resize back) against the toolbox's.

Two sources of truth, as in test_parity.py:
- recorded: the toolbox's outputs for the cases of tests/fixtures/record_inference.py (seeded
  ``pspnet_resnet50os8_ade20k``; whole, slide with images larger/smaller than the crop, multi-scale + flip,
  a 20-class LIP head with left/right class swaps, and image files through the whole test pipeline);
- live: the toolbox itself where ``ssseg`` is importable (full tensors compared, plus a tiny stand-in
  network under the toolbox's own ``auginference`` for many more settings); skipped otherwise.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inference_cases import (CASES, TINY_SETTINGS, TOLERANCE, TinyNet, assert_labels_match, our_outputs, rec,
                             recorded, toolbox_tiny)
from parity import relative_error
from segtorch.inference import infer_logits, predict_labels, preprocess, resized_size, slide_windows
from toolbox import needs_toolbox, toolbox_only


# ---- recorded reference -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_recorded_toolbox_outputs(case, case_dir):
    ref = recorded()
    assert ref["meta"]["cases"][case] == json.loads(json.dumps(rec.CASES[case])), \
        f"{case}: the case changed since recording; re-run tests/fixtures/record_inference.py"
    a = {k.split("/", 1)[1]: v for k, v in ref["arrays"].items() if k.startswith(case + "/")}
    ours = our_outputs(case, case_dir)
    scores = ours["scores"]
    assert list(scores.shape) == a["shape"].tolist()
    flat = scores.reshape(-1)[torch.from_numpy(a["index"])]
    err = relative_error(flat, torch.from_numpy(a["values"]))
    assert err < TOLERANCE, f"{case}: sampled scores relative error {err:.2e}"
    means = scores.double().mean(dim=(0, 2, 3))
    err = relative_error(means, torch.from_numpy(a["channel_mean"]))
    assert err < TOLERANCE, f"{case}: per-class mean relative error {err:.2e}"
    assert_labels_match(ours["labels"].astype(np.int64), a["labels"].astype(np.int64), scores)
    if "input" in ours:
        x = ours["input"]
        assert list(x.shape) == a["input_shape"].tolist()
        sample = x.reshape(-1)[torch.from_numpy(a["input_index"])].numpy()
        np.testing.assert_allclose(sample, a["input_values"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(x.double().mean(dim=(0, 2, 3)).numpy(), a["input_channel_mean"], rtol=1e-7)


# ---- live toolbox -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_toolbox) for c in CASES])
def test_live_toolbox_outputs(case, case_dir, tmp_path):
    ref = rec.reference_outputs(case, tmp_path)
    ours = our_outputs(case, case_dir)
    if "input" in ref:  # read + Resize + Normalize + ToTensor: the very same numbers
        assert torch.equal(ours["input"], torch.from_numpy(ref["input"]))
    err = relative_error(ours["scores"], torch.from_numpy(ref["scores"]))
    assert err < TOLERANCE, f"{case}: relative error {err:.2e}"
    assert_labels_match(ours["labels"].astype(np.int64), ref["labels"].astype(np.int64), ours["scores"])


@pytest.mark.parametrize("setting", [pytest.param(s, marks=needs_toolbox) for s in TINY_SETTINGS])
def test_live_toolbox_tiny_network(setting):
    s = TINY_SETTINGS[setting]
    net = TinyNet().eval()
    pairs = [[15, 14], [17, 16], [19, 18], [3, 4]]
    cfg = {"forward": {"mode": s["mode"], "cropsize": s.get("crop"), "stride": s.get("stride")},
           "tta": {"multiscale": s["scales"], "flip": s["flip"], "use_probs_before_resize": s["softmax"],
                   "fixed_seg_target_pairs": pairs}}
    x = torch.randn(2, 3, 45, 59, generator=torch.Generator().manual_seed(1))
    out_size = (53, 41)
    with torch.no_grad():
        ref_list = toolbox_tiny(net, 20, s["align"], cfg).auginference(x)
        ref = sum(F.interpolate(r, size=out_size, mode="bilinear", align_corners=s["align"]) for r in ref_list)
        ref = ref / len(ref_list)
    ours = infer_logits(net, x, num_classes=20, align_corners=s["align"], mode=s["mode"], crop_size=s.get("crop"),
                        stride=s.get("stride"), scales=s["scales"], flip=s["flip"], flip_pairs=pairs,
                        softmax_before_resize=s["softmax"], batch_crops=5, output_size=out_size)
    assert relative_error(ours, ref) < 1e-5


@pytest.mark.parametrize("shape", [(71, 53), (53, 71), (480, 640), (1024, 2048), (300, 300), (9, 1000)])
@pytest.mark.parametrize("resize", [dict(output_size=[2048, 512], keep_ratio=True),
                                    dict(output_size=[96, 64], keep_ratio=True, min_size=70),
                                    dict(output_size=[473, 473], keep_ratio=False),
                                    dict(output_size=[57, 45], keep_ratio=False)],
                         ids=["ade", "min_size", "lip", "non_square"])
@toolbox_only
def test_live_toolbox_preprocess(shape, resize):
    from ssseg.modules.datasets.pipelines.transforms import Normalize, Resize, ToTensor

    rgb = np.random.default_rng(shape[0] * 7 + shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    meta = {"image": np.ascontiguousarray(rgb[..., ::-1])}  # the toolbox holds BGR from cv2.imread
    for t in (Resize(scale_range=None, **resize), Normalize(rec.MEAN, rec.STD), ToTensor()):
        meta = t(meta)
    assert resized_size(*shape, resize) == tuple(meta["image"].shape[1:])
    assert torch.equal(preprocess(rgb, resize, rec.MEAN, rec.STD)[0], meta["image"])


# ---- engine behaviour without the toolbox -------------------------------------------------------------------
def test_resized_size_rules():
    ade = dict(output_size=[2048, 512], keep_ratio=True)
    assert resized_size(512, 683, ade) == (512, 683)
    assert resized_size(375, 500, ade) == (512, 683)  # 500 * 1.3653 = 682.67 -> rounded half up
    assert resized_size(1024, 2048, dict(output_size=[2048, 1024], keep_ratio=True)) == (1024, 2048)
    assert resized_size(71, 53, dict(output_size=[96, 64], keep_ratio=True)) == (86, 64)
    assert resized_size(71, 53, dict(output_size=[96, 64], keep_ratio=True, min_size=70)) == (94, 70)
    assert resized_size(59, 83, dict(output_size=[57, 45], keep_ratio=False)) == (45, 57)  # landscape
    assert resized_size(83, 59, dict(output_size=[57, 45], keep_ratio=False)) == (57, 45)  # portrait
    with pytest.raises(ValueError, match="scale_range"):
        resized_size(10, 10, dict(output_size=[20, 20], scale_range=[0.5, 2.0]))


def test_slide_windows_grid():
    assert slide_windows(67, 93, (48, 48), (32, 32)) == [
        (0, 48, 0, 48), (0, 48, 32, 80), (0, 48, 45, 93), (19, 67, 0, 48), (19, 67, 32, 80), (19, 67, 45, 93)]
    assert slide_windows(45, 61, (48, 64), (32, 32)) == [(0, 45, 0, 61)]  # crop clipped to the image


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_batching_does_not_change_scores(mode):
    net = TinyNet().eval()
    x = torch.randn(2, 3, 45, 59, generator=torch.Generator().manual_seed(2))
    kw = dict(num_classes=20, align_corners=False, mode=mode, crop_size=(24, 20), stride=(16, 13),
              scales=(0.75, 1.0), flip=True, flip_pairs=[[15, 14]], softmax_before_resize=True)
    runs = [infer_logits(net, x, batch_crops=b, **kw) for b in (1, 2, 3, 64, None)]
    for other in runs[1:]:
        assert relative_error(other, runs[0]) < 1e-6


def test_infer_logits_defaults_and_errors():
    net = TinyNet().eval()
    x = torch.randn(1, 3, 33, 27)
    a = infer_logits(net, x, num_classes=20, align_corners=False)
    b = infer_logits(net, x, num_classes=20, align_corners=False, mode=None, scales=None, flip=None,
                     flip_pairs=None, softmax_before_resize=None)  # a card's missing keys mean the defaults
    assert a.shape == (1, 20, 33, 27) and torch.equal(a, b)
    assert torch.equal(a, F.interpolate(net(x), size=(33, 27), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="crop_size"):
        infer_logits(net, x, num_classes=20, align_corners=False, mode="slide")
    with pytest.raises(ValueError, match="mode"):
        infer_logits(net, x, num_classes=20, align_corners=False, mode="sliding")


def test_predict_labels_array_equals_path(tmp_path):
    net = TinyNet().eval()
    rgb = rec.case_image("pipeline_ade")
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    kw = dict(resize=dict(output_size=[96, 64], keep_ratio=True), mean=rec.MEAN, std=rec.STD, num_classes=20,
              align_corners=False)
    a = predict_labels(net, path, **kw)
    assert a.shape == rgb.shape[:2] and a.dtype == np.int32
    assert np.array_equal(a, predict_labels(net, rgb, **kw))
    assert np.array_equal(a, predict_labels(net, Image.fromarray(rgb), **kw))


