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
    assert "1 of 3 inputs segmented" in res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scene_color.png", "scene_labels.png", "scene_legend.png", "scene_overlay.png"]
    labels = np.array(Image.open(out / "scene_labels.png"))
    assert labels.shape == (37, 53) and labels.max() < 21
    seg = segtorch.load(NAME, checkpoint=checkpoint)
    assert (labels == seg.predict(good)).all()
    color = np.array(Image.open(out / "scene_color.png"))
    assert (color == np.array(seg.card.palette, dtype=np.uint8)[labels]).all()


def test_no_result_leaves_no_output_folder(tmp_path, checkpoint):
    """Every input unusable: exit 1, one line each, and the output folders this run would have made (a new
    nested ``--out``) are not left behind, empty; a folder that was there stays."""
    (tmp_path / "notes.jpg").write_text("not an image")
    out = tmp_path / "new" / "results"
    res = run(tmp_path / "notes.jpg", "--model", NAME, "--checkpoint", checkpoint, "--out", out)
    assert res.returncode == 1 and "notes.jpg: not an image file" in res.stderr
    assert "0 of 1 inputs segmented" in res.stderr
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    res = run(tmp_path / "notes.jpg", "--model", NAME, "--checkpoint", checkpoint, "--out", kept)
    assert res.returncode == 1 and kept.is_dir()


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


# ---- issue 14 / 17: naming, checking before loading, throughput options ---------------------------------------
DEMO = "demo_pspnet_shapes"


def _image(path, shape=(40, 56), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def main(*args):
    from segtorch.cli import main as cli_main

    return cli_main(["predict", *map(str, args)])


def test_inputs_with_one_name_keep_their_own_results(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    inputs = [_image(a / "x.png", seed=1), _image(b / "x.png", seed=2), _image(a / "cat.jpg", seed=3),
              _image(a / "cat.png", seed=4), _image(b / "dog.png", seed=5)]
    out = tmp_path / "out"
    assert main(a, b, "--model", DEMO, "--out", out, "--outputs", "labels") == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_labels.png"))
    assert len(written) == len(inputs), written
    assert "5 of 5 inputs segmented" in capsys.readouterr().err
    import segtorch

    seg = segtorch.load(DEMO)
    for src in inputs:  # each result is its own input's
        match = [w for w in written if (out / w).exists() and
                 (np.array(Image.open(out / w)) == seg.predict(src)).all()]
        assert match, src


def test_every_input_is_checked_before_a_model_loads(tmp_path, monkeypatch, capsys):
    import segtorch

    def no_load(*a, **k):
        raise AssertionError("a model was loaded (or downloaded) for inputs that do not exist")

    monkeypatch.setattr(segtorch, "load", no_load)
    assert main(tmp_path / "nope.jpg", "--model", NAME, "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert err.strip() == f"segtorch: error: {tmp_path / 'nope.jpg'}: no such file or folder"


def test_an_existing_path_with_glob_characters_is_a_path(tmp_path, capsys):
    src = _image(tmp_path / "img[1].png")
    _image(tmp_path / "img1.png", seed=9)  # what the pattern would match instead
    out = tmp_path / "out"
    assert main(src, "--model", DEMO, "--out", out, "--outputs", "labels") == 0
    assert sorted(p.name for p in out.iterdir()) == ["img[1]_labels.png"]


@pytest.mark.parametrize("option", ["out", "device", "absent GPU"])
def test_bad_out_or_device_is_one_line(tmp_path, capsys, monkeypatch, option):
    src = _image(tmp_path / "a.png")
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without a GPU
    args = {"out": ["--out", tmp_path / "file"], "device": ["--device", "gpu", "--out", tmp_path / "o"],
            "absent GPU": ["--device", "cuda:0", "--out", tmp_path / "o"]}[option]
    assert main(src, "--model", DEMO, *args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("segtorch: error: --")
    assert {"out": "existing file", "device": "--device 'gpu' is not a device; use cpu, cuda",
            "absent GPU": "--device 'cuda:0': torch sees no CUDA device"}[option] in err
    assert not (tmp_path / "o").exists()


def test_results_under_out_are_not_inputs(tmp_path, capsys):
    folder = tmp_path / "same"
    _image(folder / "a.png")
    for _ in range(2):
        assert main(folder, "--model", DEMO, "--out", folder) == 0
        assert "1 of 1 inputs segmented" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_color.png", "a_labels.png", "a_overlay.png"]


def test_truncated_jpeg_prints_only_our_line(tmp_path, capfd):
    good = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:-400])
    assert main(cut, "--model", DEMO, "--out", tmp_path / "o") == 1
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    ours = ("segtorch: error:", f"{DEMO}: loaded", "0 of 1 inputs")
    assert [line for line in lines if not line.startswith(ours)] == [], lines  # nothing from libjpeg
    assert any(line.startswith("segtorch: error:") and "cut.jpg" in line for line in lines)


def test_scores_and_output_choice_and_batches(tmp_path, capsys):
    import segtorch

    inputs = [_image(tmp_path / "in" / f"{i}.png", seed=i) for i in range(3)]
    out = tmp_path / "out"
    assert main(tmp_path / "in", "--model", DEMO, "--out", out, "--outputs", "labels", "--scores",
                "--batch-size", "3", "--workers", "1") == 0
    assert "images/s" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}_{k}.png" for i in range(3)
                                                           for k in ("labels", "scores"))
    seg = segtorch.load(DEMO)
    for i, src in enumerate(inputs):
        labels, confidence = seg.predict(src, return_scores=True)
        assert (np.array(Image.open(out / f"{i}_labels.png")) == labels).all()
        stored = np.array(Image.open(out / f"{i}_scores.png")).astype(int)
        assert np.abs(stored - np.rint(confidence * 255)).max() <= 1


def test_an_interrupt_keeps_and_counts_the_results_written(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the third forward pass: the two batches before it are written in full (no temporary
    left), the command says in one line how many inputs were segmented and where, and exits 130."""
    from segtorch.segmenter import Segmenter

    calls = []
    real = Segmenter.predict_prepared

    def interrupted_at_the_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Segmenter, "predict_prepared", interrupted_at_the_third)
    for i in range(6):
        _image(tmp_path / "in" / f"{i}.png", seed=i)
    out = tmp_path / "out"
    assert main(tmp_path / "in", "--model", DEMO, "--out", out, "--batch-size", "2", "--outputs", "labels") == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"segtorch: interrupted: 4 of 6 inputs segmented; their results are in {out}/"
    assert not any("images/s" in line for line in err)
    assert sorted(p.name for p in out.iterdir()) == [f"{i}_labels.png" for i in range(4)]


@pytest.mark.parametrize("dtype,shape", [(np.uint8, (20, 30)), (np.uint16, (20, 30)), (np.uint8, (20, 30, 3))])
def test_results_read_back_as_written(tmp_path, dtype, shape):
    """Label maps (16-bit past 256 classes) and RGB pictures: what Pillow reads back is the array written."""
    from segtorch.cli.predict import write_png

    array = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    write_png(array, tmp_path / "x.png")
    back = np.array(Image.open(tmp_path / "x.png"))
    assert back.dtype == dtype and (back == array).all()
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary left
