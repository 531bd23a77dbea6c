"""The zoo conversion script's dry run on locally made release files (the upload call stays thin)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import segtorch
from segtorch.files import sha256_file
from parity import seeded_state_dict

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_mirror_folders(tmp_path):
    name = "pspnet_resnet50os8_voc"
    card = segtorch.model_card(name)
    src = tmp_path / "releases"
    src.mkdir()
    state = seeded_state_dict(segtorch.create_model(name, auxiliary=True).state_dict())
    torch.save({"cur_epoch": 60, "model": state, "optimizer": {}}, src / Path(card.url).name)
    out = tmp_path / "mirror"
    run = subprocess.run([sys.executable, str(ROOT / "conversion" / "convert_zoo.py"), name, "--source-dir", str(src),
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "1 converted, 0 failed (dry run: nothing uploaded)" in run.stdout
    folder = out / name
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["name"] == name and config["reported"]["miou"] == 77.93
    readme = (folder / "README.md").read_text()
    assert "| mIoU | 77.93 |" in readme and "@inproceedings{zhao2017pyramid" in readme and "Apache-2.0" in readme
    assert sha256_file(src / Path(card.url).name) in readme
    seg = segtorch.load(name, checkpoint=folder / "model.safetensors")
    assert not any(k.startswith("auxiliary_decoder") for k in seg.model.state_dict())


def test_missing_source_fails_nonzero(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "conversion" / "convert_zoo.py"), "pspnet_resnet50os8_voc",
                          "--source-dir", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert run.returncode == 1 and "not found in --source-dir" in run.stderr
