"""The inference engine against the toolbox's test-time procedure, image reading, rendering and helpers.

Parity has two sources of truth, as in test_parity.py:
- recorded: the toolbox's outputs for the cases of tests/fixtures/record_inference.py (seeded
  ``pspnet_resnet50os8_ade20k``; whole, slide with images larger/smaller than the crop, multi-scale + flip,
  a 20-class LIP head with left/right class swaps, and image files through the whole test pipeline);
- live: the toolbox itself where ``ssseg`` is importable (full tensors compared, plus a tiny stand-in
  network under the toolbox's own ``auginference`` for many more settings); skipped otherwise.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import segtorch
from parity import relative_error, seeded_state_dict
from segtorch.inference import (ImageReadError, autocast_context, colorize, fold_batchnorm, infer_logits, legend,
                                overlay, predict_labels, preprocess, read_image, resized_size, slide_windows)
from segtorch.inference import precision as precision_mod
from segtorch.inference.fuse import conv_bn_pairs


def _load_recorder():
    path = Path(__file__).resolve().parent / "fixtures" / "record_inference.py"
    spec = importlib.util.spec_from_file_location("record_inference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("record_inference", module)
    spec.loader.exec_module(module)
    return module


rec = _load_recorder()
CASES = list(rec.CASES)
TOLERANCE = 1e-4


def _toolbox_importable() -> bool:
    try:
        import ssseg  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TOOLBOX = _toolbox_importable()
needs_toolbox = [pytest.mark.reference,
                 pytest.mark.skipif(not HAS_TOOLBOX, reason="the SSSegmentation toolbox (ssseg) is not importable")]


def toolbox_only(test):
    for mark in needs_toolbox:
        test = mark(test)
    return test


# ---- segtorch's side of the parity cases (computed once per session) -----------------------------------------
@functools.lru_cache(maxsize=2)
def our_model(head: str) -> nn.Module:
    if head == "lip":  # the same network with a 20-class classifier
        model = copy.deepcopy(our_model("ade"))
        model.load_state_dict(rec.use_lip_head(model, model.state_dict()), strict=True)
        return model.eval()
    from segtorch.api import create_model

    model = create_model(rec.CONFIG)  # the card's architecture, eval mode
    model.load_state_dict(seeded_state_dict(model.state_dict()), strict=True)
    return model


def infer_kwargs(case: str) -> dict:
    c = rec.CASES[case]
    lip = c["head"] == "lip"
    return dict(num_classes=20 if lip else 150, align_corners=False, mode=c["mode"], crop_size=c.get("crop"),
                stride=c.get("stride"), scales=c["scales"], flip=c["flip"], flip_pairs=rec.LIP_PAIRS if lip else (),
                softmax_before_resize=c["softmax"])


@pytest.fixture(scope="session")
def case_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference_cases")


@functools.lru_cache(maxsize=None)
def our_outputs(case: str, folder: Path) -> dict:
    c = rec.CASES[case]
    model = our_model(c["head"])
    out = {}
    if "image" in c:
        path = rec.write_case_image(case, folder)
        image = read_image(path)
        x = preprocess(image, c["resize"], rec.MEAN, rec.STD)
        out["input"] = x
        out["scores"] = infer_logits(model, x, output_size=image.shape[:2], **infer_kwargs(case))
        if c["mode"] == "whole" and c["scales"] == [1]:  # one cheap forward: the public entry point itself
            out["labels"] = predict_labels(model, path, resize=c["resize"], mean=rec.MEAN, std=rec.STD,
                                           **infer_kwargs(case))[None]
        else:  # what predict_labels does after preprocessing, without running the TTA twice
            out["labels"] = out["scores"].argmax(dim=1).numpy()
    else:
        out["scores"] = infer_logits(model, rec.seeded_images(case), **infer_kwargs(case))
        out["labels"] = out["scores"].argmax(dim=1).numpy()
    return out


def assert_labels_match(ours: np.ndarray, ref: np.ndarray, scores: torch.Tensor) -> None:
    """Equal everywhere but at near-ties of the two best classes (where float rounding may pick either)."""
    assert ours.shape == ref.shape, f"label map {ours.shape} != {ref.shape}"
    differ = ours != ref
    if differ.any():
        top2 = scores.topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1]).numpy().reshape(ours.shape)
        assert margin[differ].max() < 1e-4 * max(1.0, float(scores.abs().max())), \
            f"{int(differ.sum())} labels differ away from ties"


# ---- recorded reference -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def recorded() -> dict:
    if not rec.FIXTURE.exists():
        pytest.fail(f"no recorded toolbox outputs: run tests/fixtures/record_inference.py (-> {rec.FIXTURE})")
    with np.load(rec.FIXTURE) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    return {"meta": meta, "arrays": arrays}


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


class TinyNet(nn.Module):
    """A fast stand-in segmentor: scores at 1/4 resolution (exercises the resizes like a real head)."""

    def __init__(self, num_classes: int = 20):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, num_classes, 3, stride=2, padding=1))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x):
        return self.body(x)


def toolbox_tiny(net: nn.Module, num_classes: int, align_corners: bool, inference_cfg: dict):
    """The toolbox's BaseSegmentor (its own ``inference``/``auginference``) around ``net``."""
    from ssseg.modules.models.segmentors.base import BaseSegmentor
    from ssseg.modules.utils import SSSegOutputStructure

    class Wrapped(BaseSegmentor):
        def __init__(self):
            nn.Module.__init__(self)
            self.cfg = {"num_classes": num_classes, "inference": inference_cfg}
            self.mode, self.align_corners, self.net = "TEST", align_corners, net

        def forward(self, data_meta):
            return SSSegOutputStructure(mode=self.mode, seg_logits=self.net(data_meta.images))

    return Wrapped().eval()


TINY_SETTINGS = {
    "whole_ms_flip_pairs": dict(mode="whole", scales=[0.5, 1, 1.5], flip=True, softmax=False, align=False),
    "whole_probs_align": dict(mode="whole", scales=[0.75, 1.25], flip=True, softmax=True, align=True),
    "slide_ms_flip": dict(mode="slide", crop=[24, 20], stride=[16, 13], scales=[0.5, 1.0, 1.75], flip=True,
                          softmax=True, align=False),
    "slide_logits_align": dict(mode="slide", crop=[31, 80], stride=[9, 21], scales=[1.0, 1.25], flip=False,
                               softmax=False, align=True),
    "slide_crop_bigger": dict(mode="slide", crop=[64, 64], stride=[32, 32], scales=[1.0], flip=True,
                              softmax=True, align=False),
}


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


# ---- reading images -----------------------------------------------------------------------------------------
RNG = np.random.default_rng(5)
RGB = RNG.integers(0, 256, (29, 41, 3), dtype=np.uint8)


def _toolbox_read(path: Path) -> np.ndarray:
    """What the toolbox's dataset reader sees, in RGB."""
    return cv2.imread(str(path))[..., ::-1]


def test_read_formats_like_the_toolbox(tmp_path):
    cases = {}
    Image.fromarray(RGB).save(tmp_path / "rgb.png"); cases["rgb.png"] = RGB
    Image.fromarray(RGB[..., 0]).save(tmp_path / "gray.png"); cases["gray.png"] = np.repeat(RGB[..., :1], 3, 2)
    rgba = np.dstack([RGB, RNG.integers(0, 256, RGB.shape[:2], dtype=np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png"); cases["rgba.png"] = RGB  # alpha dropped
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "palette.png"); cases["palette.png"] = np.asarray(pal.convert("RGB"))
    g16 = RNG.integers(0, 65536, RGB.shape[:2], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "gray16.png"), g16); cases["gray16.png"] = np.repeat((g16 >> 8)[..., None], 3, 2)
    c16 = RNG.integers(0, 65536, RGB.shape, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), c16[..., ::-1]); cases["rgb16.png"] = (c16 >> 8).astype(np.uint8)
    Image.fromarray(RGB).save(tmp_path / "image.jpg", quality=90); cases["image.jpg"] = None
    for name, expected in cases.items():
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (*RGB.shape[:2], 3) and got.flags.c_contiguous, name
        assert np.array_equal(got, _toolbox_read(tmp_path / name)), name
        if expected is not None:
            assert np.array_equal(got, expected), name
        assert np.array_equal(read_image(str(tmp_path / name)), got)
        assert np.array_equal(read_image((tmp_path / name).read_bytes()), got), name


def _exif_jpeg(path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(RGB).save(path, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_read_applies_exif_orientation(tmp_path, orientation):
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, orientation)
    got = read_image(path)
    expected_shape = RGB.shape if orientation == 3 else (RGB.shape[1], RGB.shape[0], 3)
    assert got.shape == expected_shape
    assert np.array_equal(got, _toolbox_read(path))
    from PIL import ImageOps

    pil = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    # a PIL image is taken as it is (issue 35.6: its tag may be stale); bytes get the orientation as files do
    assert np.array_equal(read_image(Image.open(path)), np.asarray(Image.open(path).convert("RGB")))
    assert np.array_equal(read_image(path.read_bytes()), got)
    assert np.abs(got.astype(int) - pil).max() <= 2  # same picture, whichever JPEG decoder


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image at all\n")
    with pytest.raises(ImageReadError, match=r"notes\.jpg: not an image file"):
        read_image(tmp_path / "notes.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)
    Image.fromarray(RGB).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: corrupt or truncated"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(data[: len(data) // 2])
    Image.fromarray(RGB).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png: corrupt or truncated"):
        read_image(tmp_path / "cut.png")
    for err in (FileNotFoundError, ImageReadError):  # one line each
        try:
            read_image(tmp_path / ("missing.png" if err is FileNotFoundError else "cut.png"))
        except err as e:
            assert "\n" not in str(e)


def test_read_accepts_jpeg_with_trailing_bytes(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.jpg", quality=90)
    (tmp_path / "b.jpg").write_bytes((tmp_path / "a.jpg").read_bytes() + b"trailing metadata")
    assert np.array_equal(read_image(tmp_path / "b.jpg"), read_image(tmp_path / "a.jpg"))


def test_read_pil_and_array_inputs():
    assert np.array_equal(read_image(Image.fromarray(RGB)), RGB)
    assert np.array_equal(read_image(Image.fromarray(RGB).convert("RGBA")), RGB)
    assert np.array_equal(read_image(Image.fromarray(RGB[..., 1])), np.repeat(RGB[..., 1:2], 3, 2))
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    assert np.array_equal(read_image(pal), np.asarray(pal.convert("RGB")))
    g16 = RNG.integers(0, 65536, (7, 9), dtype=np.uint16)
    assert np.array_equal(read_image(Image.fromarray(g16)), np.repeat((g16 >> 8)[..., None].astype(np.uint8), 3, 2))
    assert np.array_equal(read_image(RGB), RGB)
    assert np.array_equal(read_image(RGB[..., 0]), np.repeat(RGB[..., :1], 3, 2))
    assert np.array_equal(read_image(RGB[..., :1]), np.repeat(RGB[..., :1], 3, 2))
    assert np.array_equal(read_image(np.dstack([RGB, RGB[..., :1]])), RGB)
    assert np.array_equal(read_image(g16), np.repeat((g16 >> 8)[..., None], 3, 2).astype(np.uint8))
    with pytest.raises(ImageReadError, match="float"):
        read_image(RGB.astype(np.float32) / 255)
    with pytest.raises(ImageReadError, match="shape"):
        read_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="cannot read an image"):
        read_image(12)


# ---- rendering ----------------------------------------------------------------------------------------------
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


# ---- BatchNorm folding --------------------------------------------------------------------------------------
class _Block(nn.Module):
    fold_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # conv3's output is used twice: not declared

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # conv3's output is used twice

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out = self.bn2(out)
        y = self.conv3(out)
        return self.bn3(y) + y


def _randomize(model: nn.Module) -> nn.Module:
    state = seeded_state_dict(model.state_dict())
    model.load_state_dict(state)
    return model.eval()


def test_fold_batchnorm():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), _Block()))
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        before = model(x)
    names = sorted((type(p).__name__, a, b) for p, a, b in conv_bn_pairs(model))
    assert names == [("Sequential", "0", "1"), ("_Block", "conv1", "bn1"), ("_Block", "conv2", "bn2")]
    assert fold_batchnorm(model, example=x) is model
    with torch.no_grad():
        after = model(x)
    assert relative_error(after, before) < 1e-5
    assert isinstance(model[1], nn.Identity) and isinstance(model[3].bn3, nn.BatchNorm2d)


def test_fold_batchnorm_restores_when_outputs_move():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match="unfolded"):
        fold_batchnorm(model, example=x, rtol=0.0)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is None
    with torch.no_grad():
        assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(model.train())

def test_fold_batchnorm_leaves_the_loaded_tensors_alone_and_writes_the_asked_layout(tmp_path):
    """Weights read from a file may be a private memory map (writing pays a page fault per 4 KiB) or shared
    with the caller's state dict: folding writes fresh tensors, in the layout the model will run in."""
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), _Block()))
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        before = model(x)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    fold_batchnorm(model, memory_format=torch.channels_last)
    for name, weight in originals.items():
        key = f"{name}.weight"
        assert torch.equal(weight, loaded[key]), f"{key} was written in place"
    for conv in (model[0], model[3].conv1):  # folded 3x3 kernels: NHWC, a layout NCHW is not
        assert conv.weight is not originals["0" if conv is model[0] else "3.conv1"]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert model[3].conv3.weight is originals["3.conv3"]  # not folded: untouched
    with torch.no_grad():
        assert relative_error(model(x), before) < 1e-5



@pytest.mark.parametrize("align_corners", [False, True])
def test_split_pyramid_bottleneck_is_the_same_function(align_corners):
    """The split bottleneck (the pooled branches' share computed at their own scale, upsampled and shifted by
    matrices) computes the concatenated 3x3 convolution: equal in float64 at sizes the pooled maps are
    smaller and larger than, in both layouts. (Exported graphs: tests/test_export.py.)"""
    from segtorch.models.decoders import pyramid_pooling as psp

    torch.manual_seed(0)
    ppm = psp.PyramidPoolingModule(16, 8, (1, 2, 3, 6), align_corners=align_corners).eval()
    for m in ppm.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    fold_batchnorm(ppm)
    reference = copy.deepcopy(ppm).double()
    split = copy.deepcopy(ppm)
    psp.split_pyramid_bottlenecks(split)
    assert isinstance(split.bottleneck[0], psp.SplitBottleneckConv)
    assert torch.equal(split.bottleneck[0].merged_weight(), ppm.bottleneck[0].weight)
    split64 = copy.deepcopy(split).double()
    with torch.no_grad():
        for shape in [(2, 16, 13, 9), (1, 16, 4, 5), (1, 16, 1, 1), (1, 16, 32, 7)]:
            x = torch.randn(shape, dtype=torch.float64)
            expected = reference(x)
            for layout in (torch.contiguous_format, torch.channels_last):
                got = split64.to(memory_format=layout)(x.contiguous(memory_format=layout))
                assert (got - expected).abs().max().item() < 1e-12, (shape, layout)
    # the interpolation matrices are cached; made first under inference_mode, autograd can still use them
    psp._cached_tap_interpolation.cache_clear()
    x = torch.randn(1, 16, 11, 9, dtype=torch.float64)
    with torch.inference_mode():
        first = split64(x)
    x.requires_grad_(True)
    again = split64(x)
    again.sum().backward()
    assert torch.equal(again.detach(), first) and x.grad is not None


def test_load_splits_the_pyramid_bottleneck_only_on_the_fast_path(tmp_path):
    from safetensors.torch import save_file

    from segtorch.models.decoders.pyramid_pooling import SplitBottleneckConv

    name = "upernet_resnet50os8_ade20k"
    path = tmp_path / "w.safetensors"
    save_file(seeded_state_dict(segtorch.create_model(name).state_dict()), str(path))
    def split(seg):
        return [isinstance(m, SplitBottleneckConv) for m in seg.inference_module.modules()].count(True)

    assert split(segtorch.load(name, checkpoint=path)) == 1
    assert split(segtorch.load(name, checkpoint=path, fuse_bn=False)) == 0
    assert split(segtorch.load(name, checkpoint=path, exact=True)) == 0


def test_fold_batchnorm_on_resnet_bottleneck():
    from segtorch.models.backbones.resnet import Bottleneck

    pairs = {(a, b) for p, a, b in conv_bn_pairs(_randomize(Bottleneck(8, 2))) if isinstance(p, Bottleneck)}
    assert pairs == {("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")}


# ---- precision ----------------------------------------------------------------------------------------------
def test_autocast_context(monkeypatch):
    with autocast_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast_context("cpu", "int8")
    with pytest.raises(segtorch.UsageError, match="only offered on CUDA"):  # one line in the CLI
        autocast_context("cpu", "fp16")
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: False)  # an x86 CPU without AVX512-BF16/AMX
    with pytest.raises(segtorch.UsageError, match="AVX512-BF16 or AMX on x86, the BF16 extension on Arm"):
        autocast_context("cpu", "bf16")
    assert precision_mod.reduced_precisions("cpu") == ()
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: True)
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
    assert precision_mod.reduced_precisions("cpu") == ("bf16",)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    assert precision_mod.reduced_precisions("cuda:0") == ("fp16",)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_mod.reduced_precisions("cuda") == ("fp16", "bf16")


def _cuda_switches() -> tuple:
    """What ``toolbox_cuda_numerics`` sets, read back (the switches are Python-side: no GPU needed)."""
    return tuple(getattr(owner, name) for owner, name, _ in precision_mod._tf32_switches()) + \
        (torch.backends.cudnn.benchmark,)


@pytest.fixture
def restore_cuda_switches():
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in precision_mod._tf32_switches()]
    benchmark = torch.backends.cudnn.benchmark
    yield
    for owner, name, value in saved:
        setattr(owner, name, value)
    torch.backends.cudnn.benchmark = benchmark


@pytest.mark.parametrize("device, gpus, message", [
    ("gpu", 0, "device 'gpu' is not a device; use cpu, cuda, cuda:N or mps"),
    ("cuda", 0, "device 'cuda': torch sees no CUDA device on this machine .*; use cpu"),
    ("cuda:1", 1, "device 'cuda:1': this machine has 1 CUDA GPU, cuda:0$"),
    ("cuda:2", 2, "device 'cuda:2': this machine has 2 CUDA GPUs, cuda:0 to cuda:1$"),
])
def test_a_device_this_machine_lacks_is_refused_with_what_it_has(monkeypatch, device, gpus, message):
    """A user's choice of device, not a bug: one line naming it and what there is, from ``check_device`` and
    from ``load`` and ``Segmenter``, before any weight moves. The GPU count is
    set as a machine with that many would report it."""
    from segtorch.segmenter import Segmenter

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(segtorch.UsageError, match=message) as refused:
        precision_mod.check_device(device)
    assert "\n" not in str(refused.value)
    with pytest.raises(segtorch.UsageError, match=message):
        segtorch.load("demo_pspnet_shapes", device=device)
    with pytest.raises(segtorch.UsageError, match=message):
        Segmenter(nn.Identity(), segtorch.model_card("demo_pspnet_shapes"), device=device)
    assert precision_mod.check_device("cpu") == torch.device("cpu")
    if gpus:  # what the machine has is accepted, and nothing is initialised on it
        assert precision_mod.check_device(f"cuda:{gpus - 1}") == torch.device(f"cuda:{gpus - 1}")
        assert precision_mod.check_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(segtorch.UsageError, match="device 'mps': Apple's Metal .MPS. is not available here; use cpu"):
        precision_mod.check_device("mps")


def test_toolbox_cuda_numerics_turn_tf32_off_on_gpus_only(restore_cuda_switches):
    """The toolbox's scripts all turn TF32 off ("open full fp32"); segtorch does so around its own CUDA work and
    puts the user's settings back after, also after an error. Nothing changes on the CPU."""
    off = tuple(value for _, _, value in precision_mod._tf32_switches())
    before = _cuda_switches()
    assert before[:2] != off  # PyTorch's default lets cuDNN's convolutions use TF32
    with precision_mod.toolbox_cuda_numerics("cpu", cudnn_benchmark=True):
        assert _cuda_switches() == before
    with precision_mod.toolbox_cuda_numerics("cuda:1"):
        assert _cuda_switches() == off + (before[2],)  # autotuning left alone unless asked
    with precision_mod.toolbox_cuda_numerics(torch.device("cuda"), cudnn_benchmark=True):
        assert _cuda_switches() == off + (True,)
    assert _cuda_switches() == before
    with pytest.raises(KeyError):
        with precision_mod.toolbox_cuda_numerics("cuda", cudnn_benchmark=True):
            raise KeyError("inside")
    assert _cuda_switches() == before
    # every precision's forward passes on a GPU run under them (the checks before the block need no GPU)
    with autocast_context("cuda", "fp32"):
        assert _cuda_switches()[:2] == off
    assert _cuda_switches() == before


def test_toolbox_cuda_numerics_on_torch_without_per_operator_precision(monkeypatch, restore_cuda_switches):
    """Before torch 2.9 the switches are the ``allow_tf32`` flags."""
    monkeypatch.setattr(torch.backends.cudnn, "conv", object(), raising=False)
    switches = precision_mod._tf32_switches()
    assert [(owner, name) for owner, name, _ in switches] == [(torch.backends.cudnn, "allow_tf32"),
                                                             (torch.backends.cuda.matmul, "allow_tf32")]
    torch.backends.cudnn.allow_tf32 = True
    with precision_mod.toolbox_cuda_numerics("cuda"):
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True


def test_device_fidelity_on_the_cpu():
    """The comparison tests/test_cuda.py makes on a GPU, run on the CPU: the model loaded from a file, with and
    without the fast path, within the parity rule of the CPU's own float32 (not bit-equal to it: weights read
    from a file sit at other alignments, and the CPU kernels' rounding follows the alignment)."""
    from segtorch.testing import device_fidelity

    errors = device_fidelity("pspnet_resnet50os8_ade20k", "cpu")
    assert set(errors) == {"cpu_fp32", "fp32", "fp32_default"} and 0 < errors["cpu_fp32"] < 1e-5
    assert max(errors["fp32"], errors["fp32_default"]) <= max(2 * errors["cpu_fp32"], 1e-5)


def test_benchmarks_name_the_cpu_kind(monkeypatch):
    """Zen 4 and Zen 5 have the same name and nearly the same flags: the family/model numbers tell them apart."""
    info = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "sse avx2 fma avx512f avx512_bf16"}
    monkeypatch.setattr(precision_mod, "_cpuinfo", lambda: info)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset(info["flags"].split()))
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: True)
    assert precision_mod.describe_cpu() == ("AMD EPYC (family 26 model 2); flags: avx2 avx512_bf16 avx512f fma; "
                                            "bf16 fast path: yes")
    monkeypatch.setattr(precision_mod, "_cpuinfo", lambda: {})
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: False)
    assert precision_mod.describe_cpu() == "unknown CPU; flags: unknown; bf16 fast path: no"


def test_kernel_caps_are_named_and_bound_bf16(monkeypatch):
    """A benchmark run with another CPU kind's kernels (ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY) says so in its
    header, and bf16 is not offered where oneDNN is capped below its bf16 kernels (it would be emulated)."""
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    info = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "avx2 fma avx512f avx512_bf16"}
    monkeypatch.setattr(precision_mod, "_cpuinfo", lambda: info)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset(info["flags"].split()))
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: True)
    assert precision_mod.kernel_caps() == "" and precision_mod.cpu_supports_bf16()
    for uncapped in ("ALL", "DEFAULT", "avx512_core_amx", "AVX512_CORE_BF16", "NONSENSE"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", uncapped)
        assert precision_mod.cpu_supports_bf16(), uncapped
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert precision_mod.kernel_caps() == "oneDNN AVX2, ATen avx2"
    assert not precision_mod.cpu_supports_bf16() and precision_mod.reduced_precisions("cpu") == ()
    assert precision_mod.describe_cpu() == (
        "AMD EPYC (family 26 model 2); flags: avx2 avx512_bf16 avx512f fma; bf16 fast path: no; kernels capped to "
        "oneDNN AVX2, ATen avx2: another CPU kind's instruction set on this CPU's cores, caches and clocks")
    with pytest.raises(segtorch.UsageError, match="caps them to AVX2 .ONEDNN_MAX_CPU_ISA.; unset it or use 'fp32'"):
        autocast_context("cpu", "bf16")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # oneDNN's older name; an Intel Cascade Lake
    assert not precision_mod.cpu_supports_bf16()
    assert precision_mod.kernel_caps() == "oneDNN AVX512_CORE_VNNI, ATen avx2"


def test_fold_pairs_need_no_source_files(monkeypatch):
    """From a wheel, a zip or .pyc files there is no source to read: folding must find the same pairs."""
    import inspect

    import segtorch

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    model = segtorch.create_model("demo_pspnet_shapes")
    fold_batchnorm(model)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert left == []  # every BatchNorm of this ResNet + PSP head follows its convolution


# ---- Segmenter: logits on arrays and images, confidence, stored dtypes ----------------------------------------
@functools.lru_cache(maxsize=1)
def _demo():
    import segtorch

    return segtorch.load("demo_pspnet_shapes")


def test_logits_takes_arrays_images_and_warns_on_raw_pixels():
    seg = _demo()
    image = np.random.default_rng(3).integers(0, 255, (45, 61, 3), dtype=np.uint8)
    x = preprocess(image, seg.card.preprocess.resize, seg.card.preprocess.mean, seg.card.preprocess.std)
    from_tensor = seg.logits(x)
    assert torch.equal(seg.logits(x.numpy()), from_tensor)  # a float array is a normalised batch too
    assert torch.equal(seg.logits(x[0].numpy()), from_tensor)  # and 3 x H x W gets its batch dimension
    # an image goes through the card's pipeline: scores at its size, argmax = predict
    scores = seg.logits(image)
    assert scores.shape[2:] == image.shape[:2]
    assert (scores[0].argmax(0).numpy() == seg.predict(image)).all()
    assert seg.logits(x, output_size=(45, 61)).shape[2:] == (45, 61)
    with pytest.warns(UserWarning, match="normalised"):
        seg.logits(torch.from_numpy(image).permute(2, 0, 1)[None].float())


def test_predict_return_scores_is_the_max_probability():
    seg = _demo()
    image = np.random.default_rng(4).integers(0, 255, (33, 47, 3), dtype=np.uint8)
    labels, confidence = seg.predict(image, return_scores=True)
    assert (labels == seg.predict(image)).all() and confidence.dtype == np.float32
    probs = seg.logits(image).softmax(1)[0]
    assert np.allclose(confidence, probs.max(0).values.numpy(), atol=1e-5)
    assert (probs.argmax(0).numpy() == labels).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_runs_in_float32(tmp_path, dtype):
    import segtorch

    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in seeded_state_dict(segtorch.create_model("demo_pspnet_shapes").state_dict()).items()}
    path = tmp_path / "half.pth"
    torch.save({"model": state}, path)
    seg = segtorch.load("demo_pspnet_shapes", checkpoint=path)
    assert seg.precision == "fp32"
    assert {p.dtype for p in seg.model.parameters()} == {torch.float32}
    assert seg.logits(torch.zeros(1, 3, 32, 32)).dtype == torch.float32


def test_reduced_precision_copy_gives_autocasts_outputs(monkeypatch):
    """The bf16 forward stores its convolution weights in bf16 once instead of autocast casting them on every
    call: the same values, so the same outputs; seg.model itself stays float32. (Emulated where the CPU has no
    bf16 instructions; the fp16 path on CUDA is the same code with another dtype.)"""
    from segtorch import Segmenter

    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: True)
    seg = _demo()
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    fast = Segmenter(seg.model, seg.card, precision="bf16", fuse_bn=False, channels_last=False)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = seg.model(x)
        with fast._autocast():
            got = fast._forward(x)
    assert torch.equal(got, expected)
    assert {p.dtype for p in seg.model.parameters()} == {torch.float32}
    assert Segmenter(seg.model, seg.card, precision="bf16").channels_last  # a ResNet: channels-last at bf16
    image = np.random.default_rng(5).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    agree = (Segmenter(seg.model, seg.card, precision="bf16").predict(image) == seg.predict(image)).mean()
    assert agree > 0.95
