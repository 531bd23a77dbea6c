"""mIoU (hand-computed and vs the toolbox's metric), the streaming loop, reports, the reproduction CLI."""
from __future__ import annotations

import dataclasses

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segtorch.data import ADE20K, IGNORE_INDEX
from toolbox import require_toolbox_file

from segtorch.evaluation import ConfusionMatrix, EvalResult, evaluate, write_results
from segtorch.cli.evaluate import main as reproduce_main
from test_data import make_ade20k

ROOT = Path(__file__).resolve().parents[1]
IGN = IGNORE_INDEX


def test_hand_computed_confusion_matrix():
    # 4 classes; class 3 is in neither prediction nor ground truth; class 2 is predicted but never true
    gt = np.array([[0, 0, 1, 1, IGN],
                   [0, 1, 1, 7, IGN]])  # 7: not a class -> ignored like the ignore index
    pred = np.array([[0, 1, 1, 2, 3],
                     [0, 0, 1, 0, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    # valid pixels: gt 0 at (0,0),(0,1),(1,0) -> pred 0,1,0 ; gt 1 at (0,2),(0,3),(1,1),(1,2) -> pred 1,2,0,1
    expected = np.zeros((4, 5), np.int64)
    expected[0, 0], expected[0, 1] = 2, 1
    expected[1, 1], expected[1, 2], expected[1, 0] = 2, 1, 1
    assert np.array_equal(cm.matrix.numpy(), expected)
    m = cm.compute()
    # class 0: TP 2, pred 3, gt 3 -> 2/4 ; class 1: TP 2, pred 3, gt 4 -> 2/5 ; class 2: 0/1 ; class 3: none
    assert np.allclose(m.iou[:3], [50.0, 40.0, 0.0]) and math.isnan(m.iou[3])
    assert math.isclose(m.miou, (50 + 40 + 0) / 3)
    assert math.isclose(m.aacc, 4 / 7 * 100)
    assert np.allclose(m.acc[:2], [200 / 3, 50.0]) and math.isnan(m.acc[2]) and math.isnan(m.acc[3])
    assert math.isclose(m.macc, (200 / 3 + 50) / 2)
    assert cm.matrix.dtype == torch.int64


def test_prediction_outside_the_classes_counts_for_ground_truth_only():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 5, -3, 1]), np.array([0, 0, 1, 1]))
    m = cm.compute()
    # class 0: TP 1, pred 1, gt 2 -> 1/2 ; class 1: TP 1, pred 1, gt 2 -> 1/2 (toolbox's histc drops 5 and -3)
    assert np.allclose(m.iou, [50.0, 50.0])


def test_streaming_equals_one_shot_and_shapes_must_match():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    gts = [np.where(rng.random((7, 9)) < 0.1, IGN, rng.integers(0, 5, (7, 9))) for _ in range(4)]
    streamed, once = ConfusionMatrix(5), ConfusionMatrix(5)
    for p, g in zip(preds, gts):
        streamed.update(p, g)
    once.update(np.concatenate(preds), np.concatenate(gts))
    assert torch.equal(streamed.matrix, once.matrix)
    with pytest.raises(ValueError, match=r"differ in shape"):
        streamed.update(np.zeros((2, 2)), np.zeros((2, 3)))


def _toolbox_evaluation():
    path = require_toolbox_file("modules/datasets/pipelines/evaluation.py")
    spec = importlib.util.spec_from_file_location("ssseg_evaluation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # needs torch and numpy only
    return module.Evaluation


@pytest.mark.reference
def test_matches_the_toolbox_metric():
    Evaluation = _toolbox_evaluation()
    rng = np.random.default_rng(1)
    num_classes = 6
    preds, gts = [], []
    for i in range(5):
        h, w = rng.integers(5, 30, 2)
        gt = rng.integers(0, num_classes - 1, (h, w))  # the last class never appears in the ground truth
        gt[rng.random((h, w)) < 0.2] = IGN
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, num_classes, (h, w)))
        pred = np.where(pred == IGN, 0, pred)
        preds.append(pred.astype(np.int32))
        gts.append(gt.astype(np.int32))
    preds.append(np.full((3, 3), 2, np.int32))
    gts.append(np.full((3, 3), IGN, np.int32))  # an image with nothing labelled
    ours = ConfusionMatrix(num_classes)
    for p, g in zip(preds, gts):
        ours.update(p, g)
    m = ours.compute()
    # the toolbox's test script maps every non-class ground truth value to -1, then evaluates with ignore -1
    ref_gts = [np.where((g < 0) | (g >= num_classes), -1, g) for g in gts]
    ref = Evaluation(preds, ref_gts, num_classes, ignore_index=-1).all_metric_results
    assert np.allclose(m.iou / 100, ref["iou"], equal_nan=True, rtol=0, atol=1e-12)
    assert math.isclose(m.miou / 100, float(ref["miou"]), rel_tol=0, abs_tol=1e-12)
    assert math.isclose(m.aacc / 100, float(ref["all_accuracy"]), rel_tol=0, abs_tol=1e-12)
    assert np.allclose(m.acc / 100, ref["accuracy"], equal_nan=True, rtol=0, atol=1e-12)
    assert m.iou[-1] == 0.0  # predicted but never in the ground truth: IoU 0, counted in the mean


def test_evaluate_streams_over_a_dataset(tmp_path):
    make_ade20k(tmp_path)
    ds = ADE20K(tmp_path, "val")
    labels = {ds.samples[i].id: ds[i]["label"] for i in range(len(ds))}
    calls = []

    def perfect(image):
        calls.append(image.shape)
        key = ds.samples[len(calls) - 1].id
        return np.where(labels[key] == IGN, 0, labels[key])

    metrics, n = evaluate(perfect, ds, progress=False)
    assert n == 3 and len(calls) == 3 and all(c == (24, 32, 3) for c in calls)
    present = ~np.isnan(metrics.iou)
    assert present.sum() == 4 and np.allclose(metrics.iou[present], 100.0) and metrics.miou == 100.0
    calls.clear()
    _, n = evaluate(perfect, ds, limit=2, progress=False)
    assert n == 2 and len(calls) == 2
    with pytest.raises(ValueError, match=r"ADE_val_00000001: prediction is \(2, 2\) but the annotation is \(24, 32\)"):
        evaluate(lambda image: np.zeros((2, 2), int), ds, progress=False)


class _SizedImages:
    """Images of the given sizes whose first channel holds the label (so a prediction can be checked
    against the item it came from)."""
    num_classes = 3

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        label = np.random.default_rng(i).integers(0, 3, (h, w)).astype(np.int64)
        image = np.stack([label, np.full_like(label, i), label], -1).astype(np.uint8)
        return {"image": image, "label": label, "id": f"img{i}"}


def _first_channel(image):  # module level: the reading processes get it by pickling
    return torch.from_numpy(image[None, None, ..., 0].copy())


@pytest.mark.parametrize("workers", [0, 1])
def test_prepared_inputs_are_batched_by_size_in_order(workers):
    a, b = (6, 8), (8, 6)
    ds = _SizedImages([a, a, a, b, a, a, b])
    calls = []

    def predict(batch, size):
        calls.append((batch.shape[0], size))
        assert batch.shape[2:] == size
        return [x[0].numpy() for x in batch]  # the label each prepared input carries

    metrics, n = evaluate(predict, ds, progress=False, num_workers=workers, prepare=_first_channel, batch_size=2)
    assert n == 7 and metrics.miou == 100.0  # every prediction went back to its own image
    assert calls == [(2, a), (1, a), (1, b), (2, a), (1, b)]
    calls.clear()
    evaluate(predict, ds, progress=False, prepare=_first_channel, batch_size=1)
    assert [c[0] for c in calls] == [1] * 7
    with pytest.raises(ValueError, match="batch_size must be at least 1, and 1 without prepare; got 2"):
        evaluate(lambda image: image[..., 0], ds, progress=False, batch_size=2)


def _result(names=("wall", "building, edifice", "sky")) -> EvalResult:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    return EvalResult(name="pspnet_resnet50os8_ade20k", dataset="ade20k", split="val", num_images=1, tta=False,
                      metrics=cm.compute(), class_names=names, reported=42.14)


def test_whole_split_is_compared_subset_is_not():
    whole = dataclasses.replace(_result(), num_images=3, dataset_size=3)
    assert not whole.subset and "(3 images, single-scale): mIoU 58.33 vs reported 42.14 (+16.19)" in whole.summary()
    part = dataclasses.replace(_result(), num_images=2, dataset_size=500)
    assert part.subset and part.delta() is None and "vs reported" not in part.summary()
    assert "first 2 of 500 images" in part.summary() and "first 2 of 500 images" in part.markdown()


def test_json_and_markdown_reports(tmp_path):
    json_path, md_path = write_results([_result()], tmp_path / "out" / "r.json")
    record = json.loads(json_path.read_text())
    assert list(record) == ["name", "dataset", "split", "num_images", "tta", "miou", "aacc", "macc", "iou", "reported",
                            "subset", "world_size"]
    assert record["world_size"] == 1
    assert record["iou"] == {"wall": 50.0, "building, edifice": 2 / 3 * 100, "sky": None}  # percent; absent: null
    assert math.isclose(record["miou"], (50.0 + 200 / 3) / 2) and record["reported"] == 42.14 and record["aacc"] == 75.0
    md = md_path.read_text()
    assert md_path.suffix == ".md" and "| building, edifice | 66.67 |" in md and "| 58.33 | 42.14 |" in md
    table = _result().table()
    assert "building" in table and "mIoU 58.33 vs reported 42.14 (+16.19)" in table


class FakeSegmenter:
    """Stands in for segtorch.load(...): predicts class 0 (ADE20K 'wall') everywhere."""

    def __init__(self, record, card):
        self.record = record
        self.card = card

    def preprocessor(self):
        return _first_channel  # a 1 x ... tensor per image is all the loop needs

    def predict_prepared(self, batch, size, tta=False):
        self.record.append((tta, batch.shape[0]))
        return [np.zeros(size, np.int32)] * batch.shape[0]


def test_reproduce_cli_end_to_end(tmp_path, monkeypatch, capsys):
    import segtorch

    make_ade20k(tmp_path)
    calls, loads = [], []

    def fake_load(name, checkpoint=None, device="cpu", precision="fp32", exact=False, runtime=None):
        loads.append((name, checkpoint, device, runtime))
        return FakeSegmenter(calls, segtorch.model_card(name))

    monkeypatch.setattr(segtorch, "load", fake_load)
    out_json = tmp_path / "res.json"
    rc = reproduce_main(["isnet_resnet101os8_ade20k", "--data-root", str(tmp_path / "ADEChallengeData2016"),
                         "--checkpoint", "w.pth", "--limit", "2", "--device", "cpu", "--json", str(out_json),
                         "--tta", "--workers", "0", "--no-progress", "--runtime", "openvino"])
    assert rc == 0 and loads == [("isnet_resnet101os8_ade20k", "w.pth", "cpu", "openvino")]
    assert calls == [(True, 2)]  # whole mode: the two equal-sized images in one batch
    out = capsys.readouterr().out
    assert "2 images in " in out and "images/s)" in out
    card = segtorch.model_card("isnet_resnet101os8_ade20k")
    # two of the split's three images: a subset, so no comparison with the full-set figure (issue 14.13)
    assert "wall" in out and ("isnet_resnet101os8_ade20k on ade20k val (first 2 of 3 images: a subset, not "
                              "comparable with the reported figure, ms+flip): mIoU") in out
    assert "vs reported" not in out
    record = json.loads(out_json.read_text())
    assert record["num_images"] == 2 and record["subset"] is True and record["tta"] is True and record["split"] == "val"
    assert record["reported"] == card.reported["miou_ms_flip"] == 47.29 and len(record["iou"]) == 150
    assert record["iou"]["building, edifice"] == 0.0 and record["iou"]["sky"] is None  # absent: null
    assert record["iou"]["wall"] > 0 and (tmp_path / "res.md").is_file()
    # a pattern over a folder holding several datasets: models whose dataset is absent are skipped
    loads.clear()
    rc = reproduce_main(["pspnet_resnet50os8_*", "--data-root", str(tmp_path), "--limit", "1", "--workers", "0",
                         "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0 and [n for n, *_ in loads] == ["pspnet_resnet50os8_ade20k"]
    assert "skipped 1 cityscapes model(s): no Cityscapes under" in captured.err


@pytest.mark.parametrize("args, message", [
    (["pspnet_resnet50os8_ade20k", "--data-root", "{tmp}/nowhere"], "{tmp}/nowhere: no such directory"),
    (["pspnet_resnet50os8_ade20k", "--data-root", "{tmp}"], "{tmp}: does not hold ADE20K (expected images/"),
    (["pspnet_resnet50_ade20k", "--data-root", "{tmp}"], "unknown model 'pspnet_resnet50_ade20k'; did you mean"),
    (["pspnet_*", "--data-root", "{tmp}", "--checkpoint", "x.pth"], "--checkpoint applies to one model"),
    (["--all", "--data-root", "{tmp}"], "{tmp}: none of the selected models' datasets is there"),
    # the device first, before the data: no machine here has eight GPUs
    (["pspnet_resnet50os8_ade20k", "--data-root", "{tmp}/nowhere", "--device", "cuda:7"], "--device 'cuda:7': "),
])
def test_reproduce_errors_are_one_line_and_nonzero(tmp_path, capsys, args, message):
    rc = reproduce_main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("reproduce.py: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in err


def test_reproduce_script_and_eval_subcommand(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "isnet_resnet50os8_lip",
                          "--data-root", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip() == f"reproduce.py: error: {tmp_path}/missing: no such directory"
    from segtorch.cli.evaluate import add_parser as add_eval_parser

    parser = argparse.ArgumentParser(prog="segtorch")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "isnet_resnet50os8_lip", "--data-root", str(tmp_path), "--tta", "--limit", "3"])
    assert args.func.__name__ == "run" and args.tta and args.limit == 3 and args.models == ["isnet_resnet50os8_lip"]
