from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def segtorch(*args):
    return subprocess.run([sys.executable, "-m", "segtorch.cli", *args], capture_output=True, text=True)


def test_list_table_and_filters():
    out = segtorch("list", "--family", "isnet", "--dataset", "lip")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["name", "dataset", "backbone"]
    assert "isnet_resnet101os8_lip" in out.stdout and "54.96" in out.stdout and "55.41" in out.stdout
    assert lines[-1] == "3 models"


def test_list_json():
    out = segtorch("list", "pspnet_*", "--json")
    rows = json.loads(out.stdout)
    assert len(rows) == 12 and rows[0]["reported"]["miou"] is not None


def test_list_nothing_matches_exits_nonzero():
    out = segtorch("list", "zzz*")
    assert out.returncode == 1 and "no model matches" in out.stderr


def test_info():
    out = segtorch("info", "upernet_swinlarge_ade20k")
    assert out.returncode == 0
    assert "idrnet_upernet_swinlarge_ade20k" in out.stdout and "slide, crop [640, 640]" in out.stdout
    card = json.loads(segtorch("info", "isnet_resnet50os8_lip", "--json").stdout)
    assert card["inference"]["tta"]["flip_pairs"] == [[15, 14], [17, 16], [19, 18]]


def test_bad_name_is_one_line_and_nonzero():
    out = segtorch("info", "isnet_resnet50_lip")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("segtorch: error: unknown model")
    assert "isnet_resnet50os8_lip" in out.stderr
    out = segtorch("info", "../../etc/passwd")
    assert out.returncode == 1 and "is not a model name" in out.stderr


# ---- issue 14: nonsense refused before any work; list/info details; `python -m segtorch` -----------------------

import pytest  # noqa: E402


@pytest.mark.parametrize("args, argument", [
    (["--iters", "-5"], "--iters"), (["--iters", "0"], "--iters"), (["--epochs", "-1"], "--epochs"),
    (["--num-classes", "0"], "--num-classes"), (["--crop-size", "0", "0"], "--crop-size"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "-1"], "--lr"), (["--workers", "-1"], "--workers"),
])
def test_train_refuses_nonsense_before_any_work(tmp_path, args, argument):
    out = subprocess.run([sys.executable, "-m", "segtorch", "train", "demo_pspnet_shapes", "--images", str(tmp_path),
                          "--masks", str(tmp_path), "--work-dir", str(tmp_path / "w"), *args],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert argument in last and ("positive" in last or "0 or a positive" in last), last
    assert not (tmp_path / "w").exists()  # nothing written


def test_eval_limit_must_be_positive():
    out = segtorch("eval", "demo_pspnet_shapes", "--limit", "0")
    assert out.returncode == 2 and "--limit" in out.stderr


def test_python_dash_m_segtorch():
    out = subprocess.run([sys.executable, "-m", "segtorch", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("segtorch ")


def test_list_one_model_is_aligned_and_singular():
    out = segtorch("list", "demo*")
    assert out.returncode == 0, out.stderr
    header, row, count = out.stdout.strip().splitlines()
    # every column of the row starts where its header starts
    for column in ("dataset", "backbone", "mIoU"):
        assert header.index(column) <= len(row)
    assert row[header.index("dataset"):].startswith("shapes")
    assert row[header.index("backbone"):].startswith("R-50-D8 (quarter width)")
    assert count == "1 model"


def test_list_no_match_names_valid_values_and_json_exits_nonzero():
    out = segtorch("list", "--dataset", "ade")
    assert out.returncode == 1 and "ade20k" in out.stderr and "cityscapes" in out.stderr
    out = segtorch("list", "isnet")
    assert out.returncode == 1 and "isnet*" in out.stderr
    out = segtorch("list", "zzz*", "--json")
    assert out.returncode == 1 and json.loads(out.stdout) == []


def test_info_wrong_case_suggests_the_name():
    out = segtorch("info", "isnet_resnet101os8_ade20K")
    assert out.returncode == 1 and "isnet_resnet101os8_ade20k" in out.stderr
    assert out.stderr.count("\n") == 1


def test_info_demo_says_where_its_weights_are():
    out = segtorch("info", "demo_pspnet_shapes")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "None" not in text and "trusted on first use" not in text
    assert "shipped with segtorch" in text and "demo_pspnet_shapes.safetensors" in text
    assert "segtorch train demo_pspnet_shapes" in text  # how it was trained


def test_cli_bug_keeps_its_traceback(monkeypatch, capsys):
    # a bug in segtorch (not a SegtorchError/OSError) is not turned into a one-line message
    from segtorch import cli

    def broken(args):
        raise KeyError("resize")

    parser = cli.build_parser()
    args = parser.parse_args(["list"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args, broken))
    with pytest.raises(KeyError):
        cli.main(["list"])


class _Fixed:
    def __init__(self, parser, args, func):
        self.parser, self.args, self.func = parser, args, func

    def parse_args(self, argv=None):
        self.args.func = self.func
        return self.args


def test_cli_user_error_is_one_line(tmp_path):
    out = segtorch("convert", str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors"), "--name",
                   "demo_pspnet_shapes")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "missing.pth" in out.stderr


def test_precision_the_hardware_lacks_is_one_line(tmp_path):
    # fp16 autocast is offered on CUDA only: a user's mistake, so one line and exit 1, not a traceback
    out = subprocess.run([sys.executable, "-m", "segtorch", "predict", "model_cards/demo/example.png", "--precision",
                          "fp16", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and "fp16" in out.stderr and "CUDA" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()
