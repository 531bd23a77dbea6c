"""Deployment: the export's options, OpenVINO and every onnxruntime optimisation level, int8 with calibration.

Exactness is judged as the export judges itself (relative L2 against the float64 PyTorch model, within
max(4 x the float32 PyTorch model's own error, 2e-5)), at sizes the tracer never saw. The demo model's shipped
weights; calibration images from the demo's own synthetic dataset generator.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segtorch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from segtorch import export as export_mod  # noqa: E402
from segtorch import quantize  # noqa: E402
from segtorch.cli import main  # noqa: E402
from segtorch.data.synthetic import make_scene  # noqa: E402
from segtorch.inference.onnx_runtime import OnnxModel, OpenVinoModel  # noqa: E402
from runtimes import HAVE_OPENVINO, ORT_LEVELS, runtime_errors  # noqa: E402

DEMO = "demo_pspnet_shapes"
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="pip install 'segtorch[openvino]'")


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def write_images(folder: Path, count: int, size: int = 160) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(make_scene("train", i, size)[0]).save(folder / f"{i:04d}.png")
    return folder


# ---- the float32 file -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    """The demo exported through the command at a later opset than the default."""
    out = tmp_path_factory.mktemp("fp32") / "demo.onnx"
    code, stdout, stderr = run_cli("export", DEMO, "--out", out, "--opset", 21)
    assert code == 0, stderr
    assert stderr == ""  # no exporter chatter: progress lines, torchvision's skipped operators, Dynamo's
    return out


def test_file_declares_the_opset_asked_and_info_says_so(fp32_onnx):
    import onnx

    proto = onnx.load(str(fp32_onnx))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [21]
    meta = export_mod.read_metadata(fp32_onnx)
    assert meta["opset"] == 21 and meta["precision"] == "fp32"
    code, stdout, _ = run_cli("info", fp32_onnx)
    assert code == 0 and "opset 21" in stdout


def test_input_axes_are_named_batch_height_width(fp32_onnx):
    import onnx

    graph = onnx.load(str(fp32_onnx)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    out = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert out[0] == "batch" and "height" in out[2] and "width" in out[3]


def test_info_lists_class_names_unambiguously(fp32_onnx):
    code, stdout, _ = run_cli("info", fp32_onnx)
    line = next(x for x in stdout.splitlines() if x.startswith("classes:"))
    count, names = line.split(":", 1)[1].split(":", 1)
    assert int(count) == 6 and json.loads(names) == list(segtorch.model_card(DEMO).class_names)


def test_fp32_file_runs_unchanged_in_openvino_and_every_onnxruntime_level(fp32_onnx):
    from segtorch.api import model_with_weights

    rows = runtime_errors(model_with_weights(segtorch.model_card(DEMO))[0], fp32_onnx)
    assert {r[0] for r in rows} == set(ORT_LEVELS) | ({"openvino"} if HAVE_OPENVINO else set())
    for name, shape, error, torch_error in rows:
        assert error <= max(4 * torch_error, 2e-5), (name, shape, error, torch_error)


@needs_openvino
def test_openvino_runs_the_cards_test_procedure(fp32_onnx, tmp_path):
    image = np.asarray(make_scene("val", 0, 200)[0])
    torch_seg = segtorch.load(DEMO)
    seg = segtorch.load(DEMO, checkpoint=fp32_onnx, runtime="openvino")
    assert isinstance(seg.model, OpenVinoModel)
    assert (seg.predict(image) == torch_seg.predict(image)).mean() >= 0.999
    x = torch.randn(1, 3, 131, 177)  # multi-scale + flip through the same averaging
    a = seg.logits(x, scales=(0.75, 1.25), flip=True).argmax(1)
    b = torch_seg.logits(x, scales=(0.75, 1.25), flip=True).argmax(1)
    assert (a == b).float().mean().item() >= 0.999
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "scene.png")
    code, _, stderr = run_cli("predict", tmp_path / "scene.png", "--model", DEMO, "--checkpoint", fp32_onnx,
                              "--runtime", "openvino", "--out", tmp_path / "out")
    assert code == 0, stderr
    labels = np.array(Image.open(tmp_path / "out" / "scene_labels.png"))
    assert (labels == torch_seg.predict(image)).mean() >= 0.999


def test_runtime_not_installed_unknown_or_misapplied_is_one_line(fp32_onnx, monkeypatch):
    with pytest.raises(segtorch.SegtorchError, match="runtime"):
        segtorch.load(DEMO, checkpoint=fp32_onnx, runtime="tensorrt")
    with pytest.raises(segtorch.SegtorchError, match="not .onnx"):
        segtorch.load(DEMO, runtime="openvino")  # the shipped .safetensors: nothing for a runtime to run
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(segtorch.errors.MissingExtraError) as info:
        segtorch.load(DEMO, checkpoint=fp32_onnx, runtime="openvino")
    assert "segtorch[openvino]" in str(info.value) and "\n" not in str(info.value)
    code, _, stderr = run_cli("predict", Path(__file__).resolve().parents[1] / "model_cards" / "demo" /
                              "example.png", "--model", DEMO, "--checkpoint", fp32_onnx, "--runtime", "openvino",
                              "--out", fp32_onnx.parent / "never")
    assert code == 1 and "segtorch[openvino]" in stderr and len(stderr.strip().splitlines()) == 1


# ---- options refused before any work ------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 12, 16, 17, 26, 30])
def test_opsets_the_export_cannot_write_are_refused(opset, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, stderr = run_cli("export", DEMO, "--out", out, "--opset", opset)
    assert code == 1 and stdout == ""
    assert f"opset {opset}" in stderr and "18 to 25" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_commands_opset_help_is_the_exports():
    from segtorch.cli import export as export_cli

    assert export_cli.DEFAULT_OPSET == export_mod.DEFAULT_OPSET
    assert export_cli.OPSETS == f"{export_mod.MIN_OPSET} to {export_mod.MAX_OPSET}"


@pytest.mark.parametrize("name", ["x.pt", "x.pth", "x"])
def test_an_output_that_is_not_onnx_is_refused(name, tmp_path):
    code, _, stderr = run_cli("export", DEMO, "--out", tmp_path / name)
    assert code == 1 and ".onnx" in stderr and list(tmp_path.iterdir()) == []


def test_an_export_failing_inside_torch_keeps_its_cause(tmp_path, monkeypatch):
    from segtorch.models.decoders.pyramid_pooling import AdaptiveAvgPool

    def broken(self, x):
        raise ValueError("pooling broke here")

    monkeypatch.setattr(AdaptiveAvgPool, "forward", broken)
    code, _, stderr = run_cli("export", DEMO, "--out", tmp_path / "m.onnx")
    assert code == 1 and "pooling broke here" in stderr and "ValueError" in stderr
    assert len(stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_check_agreement_at_fp32_says_there_is_nothing_to_compare(tmp_path):
    example = Path(__file__).resolve().parents[1] / "model_cards" / "demo" / "example.png"
    code, _, stderr = run_cli("predict", example, "--check-agreement", "--out", tmp_path / "out")
    assert code == 1 and "nothing to compare" in stderr and not (tmp_path / "out").exists()


def test_info_shows_a_safetensors_files_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)}, str(path),
              metadata={"name": "some_model", "class_names": json.dumps(["x, y", "z"])})
    code, stdout, _ = run_cli("info", path)
    assert code == 0
    assert "some_model" in stdout and '["x, y", "z"]' in stdout and "2 tensors" not in stdout
    assert "tensors:       2, 10 values" in stdout
    code, stdout, _ = run_cli("info", path, "--json")
    data = json.loads(stdout)
    assert data["metadata"]["class_names"] == ["x, y", "z"] and data["parameters"] == 10
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-4])
    code, _, stderr = run_cli("info", tmp_path / "cut.safetensors")
    assert code == 1 and "cut.safetensors" in stderr


# ---- int8 --------------------------------------------------------------------------------------------------
def test_calibration_folders_that_cannot_calibrate_are_refused_before_any_work(tmp_path):
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "text"
    text.mkdir()
    (text / "notes.txt").write_text("no image")
    few = write_images(tmp_path / "few", 2, size=64)
    broken = write_images(tmp_path / "broken", 1, size=64)
    (broken / "0001.png").write_bytes(b"not a png")
    cases = [(empty, [], "no calibration images"), (text, [], "notes.txt"),
             (few, ["--calibration-images", 5], "2 images"), (broken, [], "0001.png"),
             (tmp_path / "missing", [], "does not exist")]
    for folder, extra, text_expected in cases:
        code, _, stderr = run_cli("export", DEMO, "--out", out, "--quantize", "int8", "--calibration", folder,
                                  *extra)
        assert code == 1 and text_expected in stderr and str(folder) in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
    code, _, stderr = run_cli("export", DEMO, "--out", out, "--quantize", "int8")
    assert code == 1 and "--calibration" in stderr
    assert list(out.parent.iterdir()) == []


def test_a_sliding_window_model_is_calibrated_on_its_crops(tmp_path):
    from segtorch.inference.predictor import slide_windows

    card = segtorch.model_card("mcibi_deeplabv3_hrnetv2w48_cityscapes")
    setting = card.inference.default
    assert setting.mode == "slide"
    files = [write_images(tmp_path, 1, size=300) / "0000.png"]
    inputs = quantize.calibration_inputs(card, files)
    _, x = segtorch.segmenter.prepare_image(card, files[0])  # the card's resize: 300x300 -> 1024x1024
    boxes = slide_windows(x.shape[2], x.shape[3], setting.crop_size, setting.stride)
    assert len(inputs) == len(boxes) > 1
    for (y1, y2, x1, x2), crop in zip(boxes, inputs):
        assert np.array_equal(crop, x[:, :, y1:y2, x1:x2].numpy())


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    images = write_images(root / "calibration", 10)
    out = root / "demo_int8.onnx"
    code, stdout, stderr = run_cli("export", DEMO, "--out", out, "--quantize", "int8", "--calibration", images,
                                   "--calibration-images", 8)
    assert code == 0, stderr
    assert "int8" in stdout and "agree" in stdout
    return out


def test_int8_file_is_static_qdq_with_per_channel_weights_and_says_so(int8_onnx):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(int8_onnx)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    weights = {t.name: t for t in graph.initializer}
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
                   and weights[n.input[0]].data_type == onnx.TensorProto.INT8
                   and numpy_helper.to_array(weights[n.input[1]]).size > 1]
    assert len(per_channel) >= 10  # the convolutions' weights: one scale per output channel
    meta = export_mod.read_metadata(int8_onnx)
    assert meta["precision"] == "int8" and meta["quantization"]["format"] == "QDQ"
    assert meta["calibration"]["images"] == 8 and meta["calibration"]["files"][0] == "0000.png"
    assert meta["int8_error"]["agreement"] >= meta["int8_error"]["min_agreement"]
    code, stdout, _ = run_cli("info", int8_onnx)
    assert code == 0 and "int8" in stdout and "calibration:   8 images" in stdout


def test_int8_file_runs_in_load_predict_and_eval(int8_onnx, tmp_path):
    image = np.asarray(make_scene("val", 1, 200)[0])
    torch_labels = segtorch.load(DEMO).predict(image)
    runtimes = ["onnxruntime"] + (["openvino"] if HAVE_OPENVINO else [])
    for runtime in runtimes:
        seg = segtorch.load(DEMO, checkpoint=int8_onnx, runtime=runtime)
        assert isinstance(seg.model, OnnxModel if runtime == "onnxruntime" else OpenVinoModel)
        assert (seg.predict(image) == torch_labels).mean() >= 0.95, runtime
    code, stdout, stderr = run_cli("eval", DEMO, "--checkpoint", int8_onnx, "--limit", 4, "--no-progress",
                                   "--workers", 0)
    assert code == 0, stderr
    assert "mIoU" in stdout


def test_int8_error_too_large_is_refused_with_the_figures(tmp_path):
    images = write_images(tmp_path / "calibration", 2)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    # float32 and int8 labels agree on ~99.7% of the pixels: all of them is more than int8 gives
    code, _, stderr = run_cli("export", DEMO, "--out", out, "--quantize", "int8", "--calibration", images,
                              "--min-agreement", 1)
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert "not written" in stderr and "short of the 100%" in stderr and "2 calibration inputs" in stderr
    assert list(out.parent.iterdir()) == []
