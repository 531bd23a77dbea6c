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


@pytest.mark.skipif(not hasattr(__import__("os"), "getpriority"), reason="no nice values on this platform")
@pytest.mark.parametrize("below_model", [True, False])
def test_helper_threads_yield_to_a_cpu_model(monkeypatch, below_model):
    import os

    from segtorch.cli import predict

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    with predict.helper_pool(2, "read", below_model=below_model) as pool:
        niceness = pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result()
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine  # the calling (model's) thread keeps its priority
    lowered = below_model and sys.platform == "linux"
    assert niceness == (min(19, mine + predict.HELPER_NICENESS) if lowered else mine)
    monkeypatch.setattr(sys, "platform", "darwin")  # per-process there: never lowered
    with predict.helper_pool(1, "write", below_model=True) as pool:
        assert pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result() == mine


def test_writes_waiting_are_bounded(tmp_path, monkeypatch):
    """A disk slower than the model holds up ``submit`` once ``max_pending`` results wait; none is lost."""
    import threading
    from types import SimpleNamespace

    from segtorch.cli import predict

    gate, written = threading.Event(), []

    def slow_write(array, path):
        gate.wait(10)
        written.append(path.name)

    monkeypatch.setattr(predict, "write_png", slow_write)
    seg = SimpleNamespace(device=torch.device("cpu"), card=SimpleNamespace(num_classes=6))
    writer = predict._Writer(seg, tmp_path, ["labels"], workers=1, max_pending=3, below_model=False)
    labels = np.zeros((2, 2), np.int32)
    for i in range(3):  # the first is being written, two wait: no blocking yet
        writer.submit(tmp_path / f"{i}.png", f"r{i}", None, labels, None)
    fourth = threading.Thread(target=writer.submit, args=(tmp_path / "3.png", "r3", None, labels, None))
    fourth.start()
    fourth.join(0.5)
    assert fourth.is_alive()  # waits for the oldest write
    gate.set()
    fourth.join(10)
    assert not fourth.is_alive()
    assert writer.done(lambda path, e: pytest.fail(f"{path}: {e}")) == 4
    assert sorted(written) == [f"r{i}_labels.png" for i in range(4)]


@pytest.mark.parametrize("model_takes_every_core", [True, False])
def test_helpers_wait_while_a_cpu_model_takes_every_core(tmp_path, monkeypatch, capsys, model_takes_every_core):
    """Where the model's threads take every core, no image is read or written during a forward pass (a helper
    that preempts an OpenMP thread stalls them all); otherwise the helpers run beside it, below its priority."""
    import threading
    import time

    from segtorch import segmenter
    from segtorch.cli import predict
    from segtorch.segmenter import Segmenter

    busy, overlapped, lock = [0], [], threading.Lock()

    def slowed(fn):  # a helper's task, long enough that one still running at a forward pass is seen
        def task(*a, **k):
            with lock:
                busy[0] += 1
            try:
                time.sleep(0.05)
                return fn(*a, **k)
            finally:
                with lock:
                    busy[0] -= 1
        return task

    def checked(fn):
        def forward_passes(*a, **k):
            overlapped.append(busy[0])
            return fn(*a, **k)
        return forward_passes

    monkeypatch.setattr(segmenter, "prepare_image", slowed(segmenter.prepare_image))
    monkeypatch.setattr(predict, "write_png", slowed(predict.write_png))
    monkeypatch.setattr(Segmenter, "predict_prepared", checked(Segmenter.predict_prepared))
    monkeypatch.setattr(predict, "model_takes_every_core", lambda device: model_takes_every_core)
    lowered = []
    real_pool = predict.helper_pool
    monkeypatch.setattr(predict, "helper_pool", lambda workers, name, below_model: (
        lowered.append(below_model), real_pool(workers, name, below_model))[1])
    for i in range(6):
        _image(tmp_path / "in" / f"{i}.png", seed=i)
    assert main(tmp_path / "in", "--model", DEMO, "--out", tmp_path / "out", "--batch-size", "2") == 0
    assert "6 of 6 inputs segmented" in capsys.readouterr().err
    assert len(overlapped) == 3
    if model_takes_every_core:
        assert overlapped == [0, 0, 0] and lowered == [False, False]
    else:  # reads queued ahead and the writes behind are still running at the later passes
        assert max(overlapped[1:]) > 0 and lowered == [True, True]


def test_images_are_read_while_the_model_loads(tmp_path, monkeypatch, capsys):
    """Reading needs only the card: the first images are read while the model loads (on the core loading
    leaves idle), one batch more than the queue keeps; a load that fails leaves no reader behind."""
    import threading

    from segtorch import segmenter

    read, during_load = threading.Semaphore(0), []
    real_prepare, real_load = segmenter.prepare_image, segtorch.load

    def prepare(card, src):
        result = real_prepare(card, src)
        read.release()
        return result

    def load(*a, **k):  # waits (up to 10 s) for images read before it returns
        count = 0
        while count < 12 and read.acquire(timeout=10):
            count += 1
        during_load.append(count)
        return real_load(*a, **k)

    monkeypatch.setattr(segmenter, "prepare_image", prepare)
    monkeypatch.setattr(segtorch, "load", load)
    for i in range(14):
        _image(tmp_path / "in" / f"{i:02d}.png", seed=i)
    assert main(tmp_path / "in", "--model", DEMO, "--out", tmp_path / "out", "--outputs", "labels") == 0
    assert during_load == [12]  # queue of 8 (2 workers, batch 4) and the first batch
    assert "14 of 14 inputs segmented" in capsys.readouterr().err

    def failing_load(*a, **k):
        raise segtorch.errors.SegtorchError("cannot load")

    monkeypatch.setattr(segtorch, "load", failing_load)
    before = {t for t in threading.enumerate() if t.name.startswith("segtorch-read")}
    assert main(tmp_path / "in", "--model", DEMO, "--out", tmp_path / "out2") == 1
    assert "segtorch: error: cannot load" in capsys.readouterr().err
    left = {t for t in threading.enumerate() if t.name.startswith("segtorch-read")} - before
    assert not any(t.is_alive() for t in left)
    assert not (tmp_path / "out2").exists()


def test_model_takes_every_core(monkeypatch):
    import os

    from segtorch.cli import predict

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for threads, expected in ((cores, True), (cores + 1, True), (max(1, cores - 1), cores == 1)):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        assert predict.model_takes_every_core("cpu") is expected, threads
    assert predict.model_takes_every_core("cuda:0") is False  # the GPU computes: helpers run beside it


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_fresh_command_process_is_tuned_and_one_that_uses_torch_is_not(command):
    """``segtorch predict``/``eval`` in a process of their own set libgomp's spin count, OpenBLAS's and glibc's
    reuse of freed blocks before torch and OpenCV load, and OpenCV's calls to run on their callers' threads;
    never over the user's own settings, never in a program that already uses torch."""
    code = """
import os, sys
from segtorch.cli import process_tuning as tuning, main
calls = []
real = tuning.keep_freed_memory
tuning.keep_freed_memory = lambda: calls.append(real()) or calls[-1]
if sys.argv[1] == "torch-loaded":
    import torch
sequential = tuning.sequential_opencv
tuning.sequential_opencv = lambda: calls.append(sequential()) or calls[-1]
main(["predict", "/no/such/image.jpg"] if sys.argv[2] == "predict" else ["eval", "no_such_model"])
import cv2
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OPENBLAS_THREAD_TIMEOUT"), calls, cv2.getNumThreads())
"""
    def fresh(mode, **env):
        base = {k: v for k, v in __import__("os").environ.items()
                if not k.startswith(("MALLOC_", "GOMP_", "OMP_WAIT", "OPENBLAS_", "OPENCV_")) and k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, "-c", code, mode, command], capture_output=True, text=True,
                             env={**base, **env})
        assert ("no such file or folder" if command == "predict" else "no_such_model") in out.stderr, out.stderr
        return out.stdout.strip()

    glibc = sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver())
    # OpenCV sequential: getNumThreads() is 1; left alone, OPENCV_FOR_THREADS_NUM's or OpenCV's own default
    opencv_default = subprocess.run([sys.executable, "-c", "import cv2; print(cv2.getNumThreads())"],
                                    capture_output=True, text=True, check=True).stdout.strip()
    assert fresh("fresh") == f"20000 4 [{glibc}, True] 1"
    assert fresh("fresh", GOMP_SPINCOUNT="5", MALLOC_ARENA_MAX="2") == "5 4 [False, True] 1"  # the user's settings
    assert fresh("fresh", OMP_WAIT_POLICY="passive") == f"None 4 [{glibc}, True] 1"
    assert fresh("fresh", OPENBLAS_NUM_THREADS="1") == f"20000 None [{glibc}, True] 1"
    assert fresh("fresh", GOTO_THREAD_TIMEOUT="8") == f"20000 None [{glibc}, True] 1"
    assert fresh("fresh", OPENCV_FOR_THREADS_NUM="3") == f"20000 4 [{glibc}, False] 3"
    assert fresh("torch-loaded") == f"None None [False, False] {opencv_default}"
