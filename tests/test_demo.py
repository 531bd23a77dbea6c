"""The shipped demo model: offline prediction, and its card's mIoU reproduced on the regenerated val set."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segtorch

ROOT = Path(__file__).resolve().parents[1]
NAME = "demo_pspnet_shapes"
OFFLINE = {"SEGTORCH_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


def test_demo_card_and_weights_ship_with_the_package(monkeypatch, tmp_path):
    card = segtorch.model_card(NAME)
    assert card.demo and card.reported["miou"] is not None
    assert "segtorch train" in card.training["command"] and card.training["seed"] == 0
    monkeypatch.setenv("SEGTORCH_HOME", str(tmp_path))  # an empty cache: nothing to download, nothing cached
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    seg = segtorch.load(NAME)
    labels = seg.predict(ROOT / "model_cards" / "demo" / "example.png")
    assert labels.shape == (256, 256) and set(np.unique(labels)) > {0}
    assert not (tmp_path / "checkpoints").exists()


def test_demo_miou_reproduces_the_card(tmp_path):
    from segtorch.data.datasets import Shapes
    from segtorch.evaluation.reproduce import evaluate_model

    root = Shapes.generate(tmp_path / "shapes")
    result = evaluate_model(NAME, str(root), device="cpu", workers=2, progress=False)  # batches of 4
    assert result.num_images == 50
    assert abs(result.miou - segtorch.model_card(NAME).reported["miou"]) < 0.1, result.miou
    one_by_one = evaluate_model(NAME, str(root), device="cpu", workers=0, batch_size=1, progress=False)
    assert abs(one_by_one.miou - result.miou) < 1e-6  # batching changes rounding at most, not labels


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_main_command_runs_offline(tmp_path):
    install, predict = readme_commands()[0].split(" && ")
    assert install == "pip install ."
    args = shlex.split(predict)
    assert args[:2] == ["segtorch", "predict"]
    args[args.index("--out") + 1] = str(tmp_path / "out")
    env = {**os.environ, **OFFLINE, "SEGTORCH_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-m", "segtorch.cli", *args[1:]], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    made = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert made == ["example_color.png", "example_labels.png", "example_overlay.png"]
    labels = np.array(Image.open(tmp_path / "out" / "example_labels.png"))
    assert labels.max() < 6 and len(np.unique(labels)) > 1


def test_readme_test_command_is_what_ci_runs():
    test_cmd = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    install, run = test_cmd.split(" && ")
    assert install in ci and run in ci


def test_models_page_matches_the_cards():
    """docs/models.md is `segtorch list --markdown`: regenerate it when the cards change."""
    from segtorch.cli.models import markdown_table

    table = markdown_table([segtorch.model_card(n) for n in segtorch.list_models()])
    assert table in (ROOT / "docs" / "models.md").read_text()


@pytest.mark.parametrize("flag", ["", "--markdown"])
def test_list_marks_the_demo(flag):
    out = subprocess.run([sys.executable, "-m", "segtorch.cli", "list", "demo_*", *filter(None, [flag])],
                         capture_output=True, text=True).stdout
    assert "(demo)" in out
