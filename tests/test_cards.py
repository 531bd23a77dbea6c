"""Every model card against the seeds: the toolbox's evaluated configs (``conversion/upstream/upstream_configs.json``)
translated by the card generator's own translation, compared field by field, plus the facts a card must share
with the raw config whatever the translation does (classes, pipelines, inference, schedule), and
checkpoints.tsv (URLs, reported numbers). A card edited out of step with the seeds fails here."""
from __future__ import annotations

import copy
import csv
import dataclasses
import filecmp
import importlib.util
import subprocess
import sys
import pickle
from pathlib import Path

import pytest

import segtorch
from parity import UPSTREAM_DIR, upstream_configs
from segtorch.registry import Inference, Preprocess, ReadOnlyMapping, thaw

ROOT = Path(__file__).resolve().parents[1]
with open(UPSTREAM_DIR / "checkpoints.tsv", newline="") as _f:
    ROWS = {r["name"]: r for r in csv.DictReader(_f, delimiter="\t")}
NAMES = sorted(ROWS)


def _generator():
    spec = importlib.util.spec_from_file_location("make_cards", ROOT / "conversion" / "make_cards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_cards = _generator()


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
def test_card_is_the_translated_config(name):
    """The card holds exactly what the generator's translation makes of the toolbox's config."""
    row = ROWS[name]
    made = make_cards.make_card(row, upstream_configs()[name], make_cards.citation(UPSTREAM_DIR, row["family"]))
    made["preprocess"] = thaw(Preprocess.from_table(made["preprocess"]))
    made["inference"] = thaw(Inference.from_table(made["inference"]))
    card = segtorch.model_card(name).to_dict()
    card["reported"] = {k: v for k, v in card["reported"].items() if v is not None}
    for key, value in made.items():
        assert card[key] == value, f"{name}: {key}"
    # nothing in the card that the translation did not make, besides what the registry adds
    added = {"name", "class_names", "palette", "dataset_title", "sha256", "demo", "weights"}
    assert {k for k, v in card.items() if v not in (None, [], {}, False)} <= set(made) | added


@pytest.mark.parametrize("name", NAMES)
def test_card_matches_seeds(name):
    """Facts checked against the raw config and checkpoints.tsv, independently of the translation."""
    card, row = segtorch.model_card(name), ROWS[name]
    cfg = strip_none(upstream_configs()[name]["segmentor_cfg"])
    assert card.name == name and card.family == row["family"]
    assert card.upstream_config == upstream_configs()[name]["config_file"]
    assert card.url == row["url"]
    assert dict(card.hub) == {"repo": f"segtorch/{name}", "file": "model.safetensors"}
    assert card.sha256 is None
    assert card.num_classes == cfg["num_classes"] == len(card.class_names) == len(card.palette)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in card.palette)
    # reported numbers, written back in the seed's own format
    values = [v for v in (card.reported["miou"], card.reported["miou_flip"], card.reported["miou_ms_flip"]) if v]
    assert "/".join(f"{v:.2f}%" for v in values) == row["reported"].strip()
    # architecture: the facts every translation must keep
    arch = card.architecture
    assert arch["model"] == cfg["type"].lower() and arch["num_classes"] == cfg["num_classes"]
    assert arch["align_corners"] == cfg["align_corners"]
    assert arch["norm"] == cfg["norm_cfg"]["type"].lower()
    assert arch["activation"]["name"] == cfg["act_cfg"]["type"].lower()
    assert arch["activation"].get("negative_slope") == cfg["act_cfg"].get("negative_slope")
    assert list(arch["backbone_outputs"]) == cfg["backbone"]["selected_indices"]
    assert arch["backbone"].get("output_stride") == cfg["backbone"].get("outstride")
    assert arch["backbone"].get("depth") == cfg["backbone"].get("depth")
    head = cfg["head"]
    for key in ("in_channels", "in_channels_list", "feats_channels", "transform_channels", "out_channels", "dropout"):
        assert thaw(arch["head"].get(key)) == head.get(key), f"{name}: head.{key}"
    aux = cfg.get("auxiliary")
    aux = [] if aux is None else [aux] if isinstance(aux, dict) else aux
    assert [(a["in_channels"], a["out_channels"]) for a in arch.get("auxiliary", ())] == [
        (a["in_channels"], a["out_channels"]) for a in aux]
    # test pipeline
    steps = {s[0]: s[1] for s in cfg["dataset"]["test"]["data_pipelines"]}
    assert list(card.preprocess.output_size) == steps["Resize"]["output_size"]
    assert card.preprocess.keep_ratio == steps["Resize"]["keep_ratio"]
    assert list(card.preprocess.mean) == steps["Normalize"]["mean"]
    assert list(card.preprocess.std) == steps["Normalize"]["std"]

    # inference, single-scale and the alternatives the configs give in comments
    def same(settings, toolbox):
        assert settings.mode == toolbox["forward"]["mode"]
        assert thaw(settings.crop_size) == toolbox["forward"].get("cropsize")
        assert thaw(settings.stride) == toolbox["forward"].get("stride")
        assert list(settings.scales) == toolbox["tta"]["multiscale"]
        assert settings.flip == toolbox["tta"]["flip"]
        assert settings.softmax_before_resize == toolbox["tta"]["use_probs_before_resize"]

    same(card.inference.default, cfg["inference"])
    alternatives = upstream_configs()[name]["inference_alternatives"]
    assert set(card.inference.alternatives) == set(alternatives)
    for label, alt in alternatives.items():
        same(card.inference.alternatives[label], strip_none(alt))
    if alternatives:
        label = next((n for n in alternatives if "multi-scale" in n), next(iter(alternatives)))
        same(card.inference.tta, strip_none(alternatives[label]))
    flip = [s[1] for s in cfg["dataset"]["train"]["data_pipelines"] if s[0] == "RandomFlip"]
    pairs = flip[0].get("fixed_seg_target_pairs", []) if flip else []
    assert thaw(card.inference.default.flip_pairs) == pairs
    assert thaw(card.inference.tta.flip_pairs) == pairs
    # training facts
    t, sched = thaw(card.training), cfg["scheduler"]
    assert t["optimizer"] == sched["optimizer"] and t["epochs"] == sched["max_epochs"]
    assert t["scheduler"] == {k: v for k, v in sched.items() if k not in ("optimizer", "max_epochs")}
    assert t["losses"] == cfg["losses"]
    assert t["batch_size"] == cfg["dataloader"]["expected_total_train_bs_for_assert"]
    assert t["schedule"] == row["schedule"]
    assert t["train_pipeline"] == [{"type": n, **a} for n, a in cfg["dataset"]["train"]["data_pipelines"]]
    if cfg["type"] == "MCIBI":
        update = head["update_cfg"]
        assert t["memory_update"] == {"strategy": update["strategy"], "ignore_index": update["ignore_index"],
                                      **update["momentum_cfg"]}
        assert t.get("memory_loss") == (head["loss_cfg"] if head["use_loss"] else None)


def test_translation_refuses_what_it_does_not_know():
    """A toolbox key with no segtorch translation stops the generator instead of vanishing from the card."""
    name = "isnet_resnet50os8_ade20k"
    for where in ("head", "backbone"):
        entry = copy.deepcopy(upstream_configs()[name])
        entry["segmentor_cfg"][where]["some_new_switch"] = True
        with pytest.raises(ValueError, match="some_new_switch"):
            make_cards.make_card(ROWS[name], entry)
    entry = copy.deepcopy(upstream_configs()[name])
    entry["segmentor_cfg"]["dataset"]["test"]["data_pipelines"][1][1]["to_rgb"] = False
    with pytest.raises(ValueError, match="BGR"):
        make_cards.make_card(ROWS[name], entry)


def test_cards_are_what_the_generator_writes(tmp_path):
    pytest.importorskip("tomli_w")
    subprocess.run([sys.executable, str(ROOT / "conversion" / "make_cards.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    written = sorted(tmp_path.glob("*.toml"))
    assert len(written) == 5
    for path in written:
        assert filecmp.cmp(path, ROOT / "model_cards" / path.name, shallow=False), f"{path.name} is out of date"


def test_cards_are_read_only():
    card = segtorch.model_card("isnet_resnet101os8_lip")
    with pytest.raises(TypeError):
        card.architecture["num_classes"] = 5
    with pytest.raises(TypeError):
        card.architecture["head"]["in_channels"] = 5
    with pytest.raises(TypeError):
        card.training["optimizer"]["lr"] = 1.0
    with pytest.raises(TypeError):
        card.reported["miou"] = 99.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.preprocess.keep_ratio = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.inference.tta.flip = False
    assert isinstance(card.inference.alternatives, ReadOnlyMapping)
    with pytest.raises(TypeError):
        card.inference.alternatives["x"] = card.inference.tta
    assert isinstance(card.architecture["backbone_outputs"], tuple)
    assert isinstance(card.inference.tta.flip_pairs[0], tuple)
    # to_dict is a plain, independent copy
    plain = card.to_dict()
    plain["architecture"]["num_classes"] = 5
    assert segtorch.model_card("isnet_resnet101os8_lip").architecture["num_classes"] == 20
    # cards travel to DataLoader workers and distributed processes: they pickle and come back equal
    assert pickle.loads(pickle.dumps(card)) == card and copy.deepcopy(card) == card


def test_a_head_that_does_not_fit_its_backbone_is_refused():
    from segtorch.models.builder import build_segmentation_model

    arch = segtorch.model_card("demo_pspnet_shapes").to_dict()["architecture"]
    build_segmentation_model(arch, auxiliary=True)  # the card as written fits
    wrong = copy.deepcopy(arch)
    wrong["head"]["in_channels"] = 2048
    with pytest.raises(segtorch.CardError, match=r"PSPNet: in_channels is 2048, but the backbone .* gives 512"):
        build_segmentation_model(wrong)
    wrong = copy.deepcopy(arch)
    wrong["auxiliary"][0]["in_channels"] = 1024
    with pytest.raises(segtorch.CardError, match=r"auxiliary heads' in_channels is \(1024,\).* gives \(256,\)"):
        build_segmentation_model(wrong, auxiliary=True)
    wrong = copy.deepcopy(arch)
    wrong["backbone_outputs"] = [2, 7]
    with pytest.raises(segtorch.CardError, match="has 4 outputs"):
        build_segmentation_model(wrong)
    wrong = copy.deepcopy(arch)
    wrong["head"]["pool_scale"] = [1, 2]
    with pytest.raises(segtorch.CardError, match="architecture.head does not fit PSPNet: .*'pool_scale'"):
        build_segmentation_model(wrong)
    wrong = copy.deepcopy(arch)
    wrong["backbone"]["outstride"] = 8
    with pytest.raises(segtorch.CardError, match="architecture.backbone does not fit ResNet: .*'outstride'"):
        build_segmentation_model(wrong)
    wrong = copy.deepcopy(arch)
    wrong["model"] = "deeplabv9"
    with pytest.raises(segtorch.CardError, match="unknown model 'deeplabv9'"):
        build_segmentation_model(wrong)


def test_alias():
    card = segtorch.model_card("upernet_swinlarge_ade20k")
    assert card.name == "idrnet_upernet_swinlarge_ade20k"
    assert "upernet_swinlarge_ade20k" in card.aliases


def test_listing_ignores_case():
    lower = segtorch.list_models("pspnet_*", dataset="ade20k", family="pspnet")
    assert lower and segtorch.list_models("PSPNet_*", dataset="ADE20K", family="PSPNet") == lower
    assert segtorch.list_models("UperNet_SwinLarge_ADE20K") == ["idrnet_upernet_swinlarge_ade20k"]  # an alias


def test_cli_list_ignores_case(capsys):
    from segtorch.cli import main

    assert main(["list", "IDRNet_*", "--dataset", "LIP", "--family", "IDRNet"]) == 0
    out = capsys.readouterr().out
    assert "idrnet_fcn_resnet50os8_lip" in out and "ade20k" not in out


def test_card_mappings_print_as_dicts():
    card = segtorch.model_card("pspnet_resnet50os8_ade20k")
    assert repr(card.reported) == repr(dict(card.reported)) and str(card.reported).startswith("{'miou': ")
    assert card.reported == {"miou": card.reported["miou"], "miou_flip": None, "miou_ms_flip": None}


@pytest.mark.parametrize("name,suggests", [("foo", None), ("pspnet_resnet50_ade20k", "pspnet_resnet50os8_ade20k"),
                                           ("PSPNet_resnet50os8_ade20k", "pspnet_resnet50os8_ade20k")])
def test_cli_unknown_model_points_to_segtorch_list(capsys, name, suggests):
    from segtorch.cli import main

    assert main(["info", name]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("segtorch: error: ") and repr(name) in err
    assert "`segtorch list`" in err and "list_models" not in err
    assert suggests is None or suggests in err
