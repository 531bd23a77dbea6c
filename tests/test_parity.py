"""Architecture fidelity: a state dict saved by the toolbox loads into segtorch with no missing, unexpected or
mis-shaped key and gives the toolbox's outputs.

Two sources of truth, same procedure (save in the toolbox's checkpoint format -> segtorch.convert ->
segtorch.load -> compare main-head outputs on odd-sized inputs):
- recorded: outputs recorded once from the toolbox at commit eb1878c1 (tests/fixtures/record_parity.py); the
  weights are regenerated here from the seeded generator, so the files hold only outputs and key layouts;
- live: the toolbox installed in this environment (sssegmentation 1.7.0 from PyPI in CI), where it can build
  the config (tests/toolbox.py says when a live case may skip instead of failing).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import segtorch
from parity import (FIXTURES_DIR, input_shapes, reference_logits, reference_segmentor, relative_error,
                    seeded_input, seeded_state_dict, seeded_tensor, upstream_configs)
from toolbox import build_reference

NAMES = sorted(upstream_configs())
# ~1 s or more per build: the slow tier still runs in CI
SLOW_BACKBONES = {"ResNeSt", "HRNet", "VisionTransformer", "SwinTransformer"}
TOLERANCE = 1e-5
# the default fast path (BatchNorm folded, channels-last, as chosen per backbone) may round differently from the
# toolbox but must stay as close to the float64 answer as the toolbox's own float32 arithmetic, within this factor
# (or within FAST_PATH_FLOOR: a few float32 roundings, where the toolbox itself is within one or two)
FAST_PATH_FACTOR = 2.0
FAST_PATH_FLOOR = 1e-5


def _param(name: str):
    kind = upstream_configs()[name]["segmentor_cfg"]["backbone"]["type"]
    marks = [pytest.mark.slow] if kind in SLOW_BACKBONES else []
    return pytest.param(name, marks=marks, id=name)


def _toolbox_file(tmp_path, state: dict[str, torch.Tensor]):
    """Save as the toolbox does (mid-2022+ layout), with an optimizer entry that must be ignored."""
    path = tmp_path / "toolbox_checkpoint.pth"
    first = next(iter(state.values()))
    torch.save({"cur_epoch": 3, "cur_iter": 1200, "model": state,
                "optimizer": {"state": {0: {"momentum_buffer": torch.zeros_like(first)}}, "param_groups": []}}, path)
    return path


def _segtorch_outputs(name: str, tmp_path, state: dict[str, torch.Tensor], shapes,
                      toolbox_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of the converted checkpoint as loaded in the toolbox's layout (no fast path), checking on the
    way that ``load``'s default fast path is no further from the float64 answer than FAST_PATH_FACTOR times
    the toolbox's own float32 output is."""
    src = _toolbox_file(tmp_path, state)
    dst = tmp_path / f"{name}.safetensors"
    report = segtorch.convert(src, dst, name=name)
    assert report.num_tensors > 0
    seg = segtorch.load(name, checkpoint=dst, fuse_bn=False, channels_last=False)
    x = [seeded_input(s) for s in shapes]
    with torch.no_grad():
        outputs = [seg.model(t) for t in x]
        exact_model = copy.deepcopy(seg.model).double()
        exact = [exact_model(t.double()) for t in x]
        del exact_model, seg
        fast = segtorch.load(name, checkpoint=dst)  # the defaults users get
        for t, e, ref in zip(x, exact, toolbox_outputs):
            toolbox_err = relative_error(ref, e)
            fast_err = relative_error(fast._forward(t), e)
            assert fast_err <= max(FAST_PATH_FACTOR * toolbox_err, FAST_PATH_FLOOR), (
                f"{name}: the default fast path is {fast_err:.2e} from float64, the toolbox {toolbox_err:.2e}")
    return outputs


def _state_from_layout(layout: dict[str, list]) -> dict[str, torch.Tensor]:
    """The toolbox's state dict rebuilt from a recorded layout: seeded floats, zero integer buffers."""
    state = {}
    for key, (shape, dtype) in layout.items():
        dtype = getattr(torch, dtype)
        state[key] = seeded_tensor(key, shape, dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    return state


@pytest.mark.parametrize("name", [_param(n) for n in NAMES])
def test_parity_recorded(name, tmp_path):
    from safetensors import safe_open

    fixture = FIXTURES_DIR / f"{name}.safetensors"
    if not fixture.exists():
        pytest.fail(f"no recorded reference outputs for {name}: run tests/fixtures/record_parity.py {name}")
    with safe_open(str(fixture), framework="pt") as f:
        meta = f.metadata()
        expected = [f.get_tensor(f"output_{i}") for i in range(len(json.loads(meta["inputs"])))]
    shapes = json.loads(meta["inputs"])
    assert shapes == input_shapes(name)
    outputs = _segtorch_outputs(name, tmp_path, _state_from_layout(json.loads(meta["state_dict"])), shapes,
                                expected)
    for shape, out, ref in zip(shapes, outputs, expected):
        assert out.shape == ref.shape, f"{name} {shape}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        err = relative_error(out, ref)
        assert err < TOLERANCE, f"{name} {shape}: relative error {err:.2e}"


@pytest.mark.reference
@pytest.mark.parametrize("name", [_param(n) for n in NAMES])
def test_parity_live(name, tmp_path):
    ref = build_reference(name, reference_segmentor, name)
    state = seeded_state_dict(ref.state_dict())
    ref.load_state_dict(state)
    shapes = input_shapes(name)
    expected = [reference_logits(ref, seeded_input(s)) for s in shapes]
    del ref
    outputs = _segtorch_outputs(name, tmp_path, state, shapes, expected)
    for shape, out, ref_out in zip(shapes, outputs, expected):
        err = relative_error(out, ref_out)
        assert err < TOLERANCE, f"{name} {shape}: relative error {err:.2e}"
