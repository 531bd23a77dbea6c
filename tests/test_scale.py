"""Past one image and one process: ``seg.predict`` on lists, the predict pipeline, torchrun-sharded
``segtorch eval``/``predict`` (two gloo processes on the CPU), ``segtorch.BatchPredictor`` (and Ray Data), and
the odd inputs of issue 35 (thin images, PIL images' EXIF, folders, ``~``, ids outside the classes)."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segtorch

DEMO = "demo_pspnet_shapes"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seg():
    return segtorch.load(DEMO)


def _image(path, shape=(40, 56), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def _cli(*args):
    from segtorch.cli import main

    return main([*map(str, args)])


# ---- seg.predict on a list -------------------------------------------------------------------------------------
def test_predict_list_gives_each_images_own_result_and_batches_equal_sizes(seg, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 255, (40, 56, 3), dtype=np.uint8) for _ in range(2))
    c = rng.integers(0, 255, (33, 70, 3), dtype=np.uint8)
    path = tmp_path / "d.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    images = [a, c, Image.fromarray(b), path, c]
    singles = [seg.predict(image) for image in images]
    batches = []
    real = type(seg).predict_prepared
    monkeypatch.setattr(type(seg), "predict_prepared",
                        lambda self, x, size, **k: (batches.append((len(x), tuple(size))), real(self, x, size, **k))[1])
    results = seg.predict(images)
    assert isinstance(results, list) and len(results) == len(images)
    for result, single, image in zip(results, singles, images):
        assert result.shape == single.shape and (result == single).all()
    # the three 40x56 images (apart in the list) in one pass, the two 33x70 ones in another
    assert sorted(batches) == [(2, (33, 70)), (3, (40, 56))]
    batches.clear()
    seg.predict(images, batch_size=2)
    assert sorted(batches) == [(1, (40, 56)), (2, (33, 70)), (2, (40, 56))]
    with_scores = seg.predict([a, c], return_scores=True)
    assert all(labels.shape == conf.shape for labels, conf in with_scores)
    assert seg.predict([]) == []


# ---- the pipeline under segtorch predict -------------------------------------------------------------------
def _fake_read(key):
    import torch

    if key == "bad":
        raise segtorch.ImageReadError(f"{key}: not an image")
    size = (5, 7) if key.startswith("s") else (6, 6)
    return np.zeros((*size, 3), np.uint8), torch.zeros(1, 3, *size)


def test_pipeline_batches_consecutive_equal_sizes_and_reports_bad_inputs():
    from segtorch.inference.pipeline import run_pipeline

    passes, written, errors = [], {}, []

    def infer(x, size):
        passes.append((len(x), tuple(size)))
        return [f"r{i}" for i in range(len(x))]

    keys = ["s1", "s2", "bad", "s3", "q1", "q2", "s4"]
    result = run_pipeline(keys, _fake_read, infer, lambda key, image, r: written.setdefault(key, r),
                          on_error=lambda key, e: errors.append((key, str(e))), batch_size=2, workers=2)
    assert (result.written, result.failed, result.interrupted) == (6, 1, False)
    assert sorted(written) == sorted(k for k in keys if k != "bad") and errors == [("bad", "bad: not an image")]
    assert passes == [(2, (5, 7)), (1, (5, 7)), (2, (6, 6)), (1, (5, 7))]


def test_pipeline_a_failed_write_is_reported_and_a_bug_keeps_its_traceback():
    from segtorch.inference.pipeline import run_pipeline

    def write(key, image, r):
        if key == "s2":
            raise OSError(28, "No space left on device")

    errors = []
    result = run_pipeline(["s1", "s2", "s3"], _fake_read, lambda x, size: [None] * len(x), write,
                          on_error=lambda key, e: errors.append(key), batch_size=1)
    assert (result.written, result.failed) == (2, 1) and errors == ["s2"]
    with pytest.raises(ZeroDivisionError):
        run_pipeline(["s1"], _fake_read, lambda x, size: [1 / 0], write, on_error=lambda key, e: None)


def test_pipeline_holds_up_the_model_behind_a_slow_disk():
    """Writes blocked: the model stops after a bounded number of results instead of computing (and holding)
    all of them; when the disk frees, every result is written."""
    from segtorch.inference.pipeline import run_pipeline

    gate, inferred, ahead = threading.Event(), [0], []
    written = []

    def infer(x, size):
        inferred[0] += len(x)
        ahead.append(inferred[0] - len(written))
        if inferred[0] >= 60:  # every input computed before any was written: unbounded; let it finish
            gate.set()
        return [None] * len(x)

    def write(key, image, r):
        gate.wait(30)
        written.append(key)

    timer = threading.Timer(1.0, gate.set)  # the disk frees after a second either way
    timer.start()
    result = run_pipeline([f"s{i}" for i in range(60)], _fake_read, infer, write, on_error=pytest.fail,
                          batch_size=2, workers=1)
    timer.cancel()
    assert result.written == 60 and sorted(written) == sorted(f"s{i}" for i in range(60))
    assert max(ahead) <= 16  # a few batches waiting to be written, not the whole input


def test_an_interrupt_stops_reading_and_keeps_what_was_computed():
    from segtorch.inference.pipeline import run_pipeline

    calls, written = [0], []

    def infer(x, size):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return [None] * len(x)

    result = run_pipeline([f"s{i}" for i in range(8)], _fake_read, infer,
                          lambda key, image, r: written.append(key), on_error=pytest.fail, batch_size=2)
    assert result.interrupted and result.written == 2 and sorted(written) == ["s0", "s1"]


# ---- torchrun ---------------------------------------------------------------------------------------------------
def test_shards_are_disjoint_and_cover_the_inputs():
    from segtorch.cli.sharding import Shard

    items = list(range(11))
    for world in (1, 2, 3, 16):
        shares = [Shard(rank=r, world_size=world).take(items) for r in range(world)]
        assert sorted(x for share in shares for x in share) == items


def _torchrun(*args, nproc=2, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "segtorch.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_torchrun_eval_equals_one_process(tmp_path, capsys):
    from segtorch.data.datasets import Shapes

    root = Shapes.generate(tmp_path / "shapes", count=6)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert _cli("eval", DEMO, "--data-root", root, "--json", one, "--workers", "0", "--no-progress") == 0
    single_out = capsys.readouterr().out
    res = _torchrun("eval", DEMO, "--data-root", root, "--json", two, "--workers", "0", "--no-progress")
    assert res.returncode == 0, res.stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2 and a["num_images"] == b["num_images"] == 6
    for key in ("miou", "aacc", "macc", "iou"):
        assert a[key] == b[key], key  # per-class counts summed exactly: the same figures, bit for bit
    # the first process alone prints the report (once), and the same table one process prints
    assert res.stdout.count("mIoU") == single_out.count("mIoU") and res.stdout.count("wrote ") == 1
    def report(text: str) -> list[str]:  # without timings, and without torch 2.8's gloo connection lines, which
        # its processes print to stdout at start-up, mixed with each other's
        return [line for line in text.splitlines() if line.strip() and "images in" not in line
                and "wrote" not in line and "[Gloo]" not in line and "peer ranks" not in line]

    assert report(res.stdout) == report(single_out)


def test_torchrun_predict_writes_each_input_once_and_one_summary(tmp_path):
    folder = tmp_path / "in"
    for i in range(5):
        _image(folder / f"{i}.png", seed=i, shape=(40, 56) if i % 2 else (33, 47))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # one process meets it
    out = tmp_path / "out"
    res = _torchrun("predict", folder, "--model", DEMO, "--out", out, "--outputs", "labels", timeout=300)
    assert res.returncode != 0  # a bad input: exit status 1 (torchrun reports it)
    err = res.stderr.splitlines()
    assert sum("inputs segmented" in line for line in err) == 1 and "5 of 6 inputs segmented" in res.stderr
    assert sum("broken.png" in line and line.startswith("segtorch: error:") for line in err) == 1
    assert sorted(p.name for p in out.iterdir()) == [f"{i}_labels.png" for i in range(5)]
    seg = segtorch.load(DEMO)
    for i in range(5):
        assert (np.array(Image.open(out / f"{i}_labels.png")) == seg.predict(folder / f"{i}.png")).all()


# ---- BatchPredictor ---------------------------------------------------------------------------------------------
def test_batch_predictor_takes_ray_batches(seg):
    rng = np.random.default_rng(5)
    stacked = rng.integers(0, 255, (3, 40, 56, 3), dtype=np.uint8)
    predictor = segtorch.BatchPredictor(DEMO, device="cpu", outputs=("labels", "confidence"))
    batch = predictor({"image": stacked, "path": np.array(["a", "b", "c"])})
    assert batch["labels"].shape == (3, 40, 56) and batch["confidence"].shape == (3, 40, 56)
    assert list(batch["path"]) == ["a", "b", "c"]
    for labels, image in zip(batch["labels"], stacked):
        assert (labels == seg.predict(image)).all()
    ragged = np.empty(2, dtype=object)
    ragged[:] = [stacked[0], stacked[1, :30]]
    again = pickle.loads(pickle.dumps(predictor))  # Ray ships it to its actors
    out = again({"image": ragged})
    assert out["labels"].dtype == object and [a.shape for a in out["labels"]] == [(40, 56), (30, 56)]
    assert (out["labels"][1] == seg.predict(stacked[1, :30])).all()
    with pytest.raises(segtorch.UsageError, match="'labels'"):
        segtorch.BatchPredictor(DEMO, outputs=("scores",))


def _demo_images(folder: Path, count: int = 6) -> list[Path]:
    from segtorch.data.synthetic import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, _ = make_scene("val", i, 96 if i % 3 else 80)
        paths.append(folder / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


@pytest.mark.slow
def test_ray_data_map_batches_equals_predict(tmp_path, seg):
    ray = pytest.importorskip("ray")
    paths = _demo_images(tmp_path / "images")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_images(str(tmp_path / "images"), include_paths=True, mode="RGB")
        ds = ds.map_batches(segtorch.BatchPredictor, fn_constructor_kwargs={"name": DEMO, "device": "cpu"},
                            batch_size=4, concurrency=1, num_cpus=1)
        rows = {Path(row["path"]).name: row["labels"] for row in ds.iter_rows()}
    finally:
        ray.shutdown()
    assert sorted(rows) == sorted(p.name for p in paths)
    for path in paths:
        assert (np.asarray(rows[path.name]) == seg.predict(path)).all()


# ---- issue 35: odd inputs ------------------------------------------------------------------------------------
def test_a_thin_image_is_segmented_beside_the_others(seg, tmp_path, capsys):
    thin = np.random.default_rng(0).integers(0, 255, (1, 500, 3), dtype=np.uint8)
    assert seg.predict(thin).shape == (1, 500) and seg.predict(thin.transpose(1, 0, 2)).shape == (500, 1)
    Image.fromarray(thin).save(tmp_path / "thin.png")
    _image(tmp_path / "ok.png")
    assert _cli("predict", tmp_path, "--model", DEMO, "--out", tmp_path / "out", "--outputs", "labels") == 0
    assert "2 of 2 inputs segmented" in capsys.readouterr().err
    assert np.array(Image.open(tmp_path / "out" / "thin_labels.png")).shape == (1, 500)


def test_exif_orientation_applies_to_files_and_bytes_not_to_pil_images(tmp_path):
    from segtorch.inference.image import read_image

    pixels = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", exif=exif)
    (tmp_path / "r.png").write_bytes(buffer.getvalue())
    assert read_image(tmp_path / "r.png").shape == (30, 20, 3)  # the file: turned upright
    assert read_image(buffer.getvalue()).shape == (30, 20, 3)
    opened = Image.open(tmp_path / "r.png")  # stale tag: the user's image is taken as it is
    assert (read_image(opened) == pixels).all()


def test_folders_are_searched_recursively_and_skipped_files_are_named(tmp_path, capsys):
    folder = tmp_path / "photos"
    _image(folder / "a.png")
    _image(folder / "trip" / "b.png", seed=1)
    _image(folder / ".thumbs" / "c.png", seed=2)  # hidden: left out
    (folder / "notes.txt").write_text("x")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "anim.gif")
    out = tmp_path / "out"
    assert _cli("predict", folder, "--model", DEMO, "--out", out, "--outputs", "labels") == 0
    err = capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a_labels.png", "b_labels.png"]
    note = [line for line in err.splitlines() if "skipped 2 files" in line]
    assert len(note) == 1 and ".gif" in note[0] and ".txt" in note[0] and "anim.gif" in note[0]
    assert _cli("predict", folder, "--no-recursive", "--model", DEMO, "--out", tmp_path / "flat",
                "--outputs", "labels") == 0
    assert "sub-folders skipped (--no-recursive)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["a_labels.png"]


def test_home_is_expanded_in_image_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    _image(tmp_path / "pics" / "a.png")
    assert _cli("predict", "~/pics/a.png", "~/pics/*.png", "--model", DEMO, "--out", "~/res",
                "--outputs", "labels") == 0
    assert "1 of 1 inputs segmented" in capsys.readouterr().err
    assert (tmp_path / "res" / "a_labels.png").is_file()


def test_colorize_marks_ids_outside_the_classes_apart_from_class_zero():
    from segtorch.inference.render import colorize, outside_colour

    voc_like = [(0, 0, 0), (128, 0, 0), (255, 255, 255)]  # class 0 black, white taken too
    labels = np.array([[0, 1, 2, 255, -1, 3]])
    colours = colorize(labels, voc_like)
    mark = outside_colour(voc_like)
    assert mark not in voc_like
    assert [tuple(c) for c in colours[0]] == [*voc_like, mark, mark, mark]
    wide = colorize(np.array([[299, 300, -1]]), [(1, 1, 1)] * 300)  # past 256 classes: numpy's lookup
    assert [tuple(c) for c in wide[0]] == [(1, 1, 1), (255, 255, 255), (255, 255, 255)]
