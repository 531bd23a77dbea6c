"""The inference parity cases shared by test_procedure.py and test_exact.py: the recorder's cases
(tests/fixtures/record_inference.py), segtorch's outputs for them, the recorded toolbox outputs, and a tiny
stand-in network under the toolbox's own ``inference``/``auginference``."""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from parity import seeded_state_dict
from segtorch.inference import infer_logits, predict_labels, preprocess, read_image


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


# ---- the recorded toolbox outputs ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def recorded() -> dict:
    if not rec.FIXTURE.exists():
        pytest.fail(f"no recorded toolbox outputs: run tests/fixtures/record_inference.py (-> {rec.FIXTURE})")
    with np.load(rec.FIXTURE) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    return {"meta": meta, "arrays": arrays}


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


