"""`segtorch predict` end to end on generated images with a random-weights checkpoint."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import segtorch
from parity import seeded_state_dict

NAME = "pspnet_resnet50os8_voc"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "w.pth"
    torch.save({"model": seeded_state_dict(segtorch.create_model(NAME).state_dict())}, path)
    return path


def run(*args):
    return subprocess.run([sys.executable, "-m", "segtorch.cli", "predict", *map(str, args)], capture_output=True,
                          text=True)


def test_predict_writes_outputs_and_reports_bad_files(tmp_path, checkpoint):
    good = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(good)
    (tmp_path / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"
    res = run(good, tmp_path / "missing.png", tmp_path / "notes.jpg", "--model", NAME, "--checkpoint", checkpoint,
              "--out", out, "--legend")
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("segtorch: error:")]
    assert len(errors) == 2 and "missing.png" in errors[0] and "notes.jpg" in errors[1]
    assert "1 of 3 images segmented" in res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scene_color.png", "scene_labels.png", "scene_legend.png", "scene_overlay.png"]
    labels = np.array(Image.open(out / "scene_labels.png"))
    assert labels.shape == (37, 53) and labels.max() < 21
    seg = segtorch.load(NAME, checkpoint=checkpoint)
    assert (labels == seg.predict(good)).all()
    color = np.array(Image.open(out / "scene_color.png"))
    assert (color == np.array(seg.card.palette, dtype=np.uint8)[labels]).all()


def test_predict_folder_and_glob_errors(tmp_path, checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run(empty, tmp_path / "*.nothing", "--model", NAME, "--checkpoint", checkpoint, "--out", tmp_path / "o")
    assert res.returncode == 1
    assert "folder holds no images" in res.stderr and "no file matches" in res.stderr


def test_predict_unknown_model_is_one_line(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    res = run(img, "--model", "pspnet_r50_voc")
    assert res.returncode == 1 and res.stderr.strip().startswith("segtorch: error: unknown model")


def test_bf16_refused_clearly_where_unsupported(tmp_path, checkpoint):
    from segtorch.inference.precision import cpu_supports_bf16

    if cpu_supports_bf16():
        pytest.skip("this CPU runs bf16")
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    res = run(img, "--model", NAME, "--checkpoint", checkpoint, "--precision", "bf16")
    assert res.returncode == 1 and "AVX512-BF16 or AMX" in res.stderr
