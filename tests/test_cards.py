"""Every model card against the seeds: the upstream configs (architecture, pipelines, inference, schedule) and
checkpoints.tsv (URLs, reported numbers). A card edited out of step with the seeds fails here."""
from __future__ import annotations

import csv
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

import segtorch
from parity import UPSTREAM_DIR, upstream_configs

ROOT = Path(__file__).resolve().parents[1]
with open(UPSTREAM_DIR / "checkpoints.tsv", newline="") as _f:
    ROWS = {r["name"]: r for r in csv.DictReader(_f, delimiter="\t")}
NAMES = sorted(ROWS)


def strip_none(obj):
    if isinstance(obj, dict):
        return {k: strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [strip_none(v) for v in obj]
    return obj


def test_every_seed_has_a_card():
    assert len(NAMES) == 74
    assert sorted(upstream_configs()) == NAMES
    seeded = [n for n in segtorch.list_models() if not segtorch.model_card(n).demo]
    assert seeded == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_card_matches_seeds(name):
    card, row = segtorch.model_card(name), ROWS[name]
    cfg = strip_none(upstream_configs()[name]["segmentor_cfg"])
    assert card.name == name and card.family == row["family"]
    assert card.url == row["url"]
    assert card.hub == {"repo": f"segtorch/{name}", "file": "model.safetensors"}
    assert card.sha256 is None
    assert card.num_classes == cfg["num_classes"] == len(card.class_names) == len(card.palette)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in card.palette)
    # reported numbers, written back in the seed's own format
    values = [v for v in (card.reported["miou"], card.reported["miou_flip"], card.reported["miou_ms_flip"]) if v]
    assert "/".join(f"{v:.2f}%" for v in values) == row["reported"].strip()
    # architecture: every structural key as the toolbox builds it
    arch = card.architecture
    for key in ("type", "num_classes", "align_corners", "norm_cfg", "act_cfg", "head", "auxiliary"):
        assert arch.get(key) == cfg.get(key), f"{name}: architecture.{key}"
    backbone = {k: v for k, v in cfg["backbone"].items() if k not in ("pretrained", "pretrained_model_path")}
    assert arch["backbone"] == backbone
    # test pipeline
    steps = {s[0]: s[1] for s in cfg["dataset"]["test"]["data_pipelines"]}
    assert card.preprocess["resize"] == steps["Resize"]
    assert card.preprocess["mean"] == steps["Normalize"]["mean"] and card.preprocess["std"] == steps["Normalize"]["std"]
    assert card.preprocess["channel_order"] == ("RGB" if steps["Normalize"].get("to_rgb", True) else "BGR")
    # inference, single-scale and the alternatives the configs give in comments
    def same(settings, toolbox):
        assert settings["mode"] == toolbox["forward"]["mode"]
        assert settings.get("crop_size") == toolbox["forward"].get("cropsize")
        assert settings.get("stride") == toolbox["forward"].get("stride")
        assert settings["scales"] == toolbox["tta"]["multiscale"]
        assert settings["flip"] == toolbox["tta"]["flip"]
        assert settings["softmax_before_resize"] == toolbox["tta"]["use_probs_before_resize"]

    same(card.inference, cfg["inference"])
    alternatives = upstream_configs()[name]["inference_alternatives"]
    assert set(card.inference.get("alternatives", {})) == set(alternatives)
    for label, alt in alternatives.items():
        same(card.inference["alternatives"][label], strip_none(alt))
    if alternatives:
        label = next((n for n in alternatives if "multi-scale" in n), next(iter(alternatives)))
        same(card.inference["tta"], strip_none(alternatives[label]))
    flip = [s[1] for s in cfg["dataset"]["train"]["data_pipelines"] if s[0] == "RandomFlip"]
    pairs = flip[0].get("fixed_seg_target_pairs") if flip else None
    assert card.inference.get("flip_pairs") == pairs
    # training facts
    t, sched = card.training, cfg["scheduler"]
    assert t["optimizer"] == sched["optimizer"] and t["epochs"] == sched["max_epochs"]
    assert t["scheduler"] == {k: v for k, v in sched.items() if k not in ("optimizer", "max_epochs")}
    assert t["losses"] == cfg["losses"]
    assert t["batch_size"] == cfg["dataloader"]["expected_total_train_bs_for_assert"]
    assert t["schedule"] == row["schedule"]
    assert [dict(s) for s in t["train_pipeline"]] == [{"type": n, **a} for n, a in cfg["dataset"]["train"]["data_pipelines"]]


def test_cards_are_what_the_generator_writes(tmp_path):
    pytest.importorskip("tomli_w")
    subprocess.run([sys.executable, str(ROOT / "conversion" / "make_cards.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for path in tmp_path.glob("*.toml"):
        assert filecmp.cmp(path, ROOT / "model_cards" / path.name, shallow=False), f"{path.name} is out of date"


def test_alias():
    card = segtorch.model_card("upernet_swinlarge_ade20k")
    assert card.name == "idrnet_upernet_swinlarge_ade20k"
    assert "upernet_swinlarge_ade20k" in card.aliases
