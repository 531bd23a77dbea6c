from __future__ import annotations

import json
import subprocess
import sys


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
