"""Generate ``model_cards/<family>.toml`` from the seeds: ``checkpoints.tsv`` (URLs, reported numbers, schedule
strings) and ``upstream_configs.json`` (the toolbox's evaluated configs).

Usage: python conversion/make_cards.py [--seeds conversion/upstream] [--out model_cards]

Facts that every checkpoint of a family shares are written once under ``[defaults]`` and deep-merged by the
registry; each ``[models.NAME]`` table holds the rest. TOML has no null: a missing key means "unknown/none".
Needs ``tomli-w`` (a development dependency; the package only reads TOML).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

DATASETS = {"ADE20k": "ade20k", "CityScapes": "cityscapes", "PASCAL VOC": "voc", "COCOStuff-10k": "cocostuff10k",
            "LIP": "lip", "PASCAL-Context-59": "pascalcontext59"}
METRICS = {"miou": "miou", "miou(flip)": "miou_flip", "miou(ms+flip)": "miou_ms_flip"}
ALIASES = {"idrnet_upernet_swinlarge_ade20k": ["upernet_swinlarge_ade20k"]}
ARCH_KEYS = ("type", "num_classes", "align_corners", "norm_cfg", "act_cfg", "backbone", "head", "auxiliary")
NON_STRUCTURAL = ("pretrained", "pretrained_model_path")
# used when the toolbox publishes no ms+flip setting for a checkpoint (mmsegmentation's usual ratios)
DEFAULT_TTA_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def drop_none(obj):
    if isinstance(obj, dict):
        return {k: drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [drop_none(v) for v in obj]
    return obj


def pipeline(steps) -> list[dict]:
    """[["Resize", {...}], ...] -> [{"type": "Resize", ...}, ...]"""
    return [{"type": name, **args} for name, args in steps]


def parse_reported(metric: str, reported: str) -> dict:
    if not reported.strip():
        return {}
    names = [METRICS[re.sub(r"\s+", "", m).lower()] for m in metric.split("/")]
    values = [float(v.strip().rstrip("%")) for v in reported.split("/")]
    if len(names) != len(values):
        raise ValueError(f"metric {metric!r} does not match values {reported!r}")
    return dict(zip(names, values))


def inference_settings(cfg: dict) -> dict:
    fwd, tta = cfg["forward"], cfg["tta"]
    out = {"mode": fwd["mode"], "crop_size": fwd["cropsize"], "stride": fwd["stride"],
           "scales": [float(s) for s in tta["multiscale"]], "flip": tta["flip"],
           "softmax_before_resize": tta["use_probs_before_resize"]}
    if tta.get("fixed_seg_target_pairs"):
        out["flip_pairs"] = tta["fixed_seg_target_pairs"]
    return out


def citation(seeds: Path, family: str) -> str | None:
    """The BibTeX entry of a family's zoo page (None where the page gives an empty one)."""
    page = (seeds / f"{family}.md").read_text()
    m = re.search(r"```latex\n(.*?)```", page, re.S)
    text = m.group(1).strip() if m else ""
    return text or None


def make_card(row: dict, entry: dict, cite: str | None = None) -> dict:
    cfg = entry["segmentor_cfg"]
    arch = {k: cfg.get(k) for k in ARCH_KEYS}
    arch["backbone"] = {k: v for k, v in cfg["backbone"].items() if k not in NON_STRUCTURAL}
    test_steps = pipeline(cfg["dataset"]["test"]["data_pipelines"])
    kinds = [s["type"] for s in test_steps]
    if kinds != ["Resize", "Normalize", "ToTensor"]:
        raise ValueError(f"{row['name']}: unexpected test pipeline {kinds}")
    resize, normalize = test_steps[0], test_steps[1]
    preprocess = {
        "resize": {k: v for k, v in resize.items() if k != "type"},
        "mean": normalize["mean"], "std": normalize["std"],
        "channel_order": "RGB" if normalize.get("to_rgb", True) else "BGR",
        "reader": "cv2.imread (BGR), converted by Normalize",
    }
    train_steps = pipeline(cfg["dataset"]["train"]["data_pipelines"])
    flip_pairs = next((s.get("fixed_seg_target_pairs") for s in train_steps if s["type"] == "RandomFlip"), None)
    inference = inference_settings(cfg["inference"])
    alternatives = {name: inference_settings(alt) for name, alt in entry["inference_alternatives"].items()}
    tta_name = next((n for n in alternatives if "multi-scale" in n), next(iter(alternatives), None))
    if tta_name:
        tta = {**alternatives[tta_name], "source": f"toolbox config comment: {tta_name}"}
    else:
        tta = {**inference, "scales": DEFAULT_TTA_SCALES, "flip": True,
               "source": "segtorch default (the toolbox publishes no multi-scale setting for this checkpoint)"}
    if flip_pairs:
        inference["flip_pairs"] = flip_pairs
        tta.setdefault("flip_pairs", flip_pairs)
    inference["tta"] = tta
    if alternatives:
        inference["alternatives"] = alternatives
    sched = cfg["scheduler"]
    crop = next((s["crop_size"] for s in train_steps if s["type"] == "RandomCrop"), None)
    training = {
        "crop_size": crop,
        "batch_size": cfg["dataloader"]["expected_total_train_bs_for_assert"],
        "batch_size_per_gpu": cfg["dataloader"]["train"]["batch_size_per_gpu"],
        "epochs": sched["max_epochs"],
        "optimizer": sched["optimizer"],
        "scheduler": {k: v for k, v in sched.items() if k not in ("optimizer", "max_epochs")},
        "losses": cfg["losses"],
        "train_split": cfg["dataset"]["train"]["set"],
        "eval_split": cfg["dataset"]["test"]["set"],
        "train_pipeline": train_steps,
        "pretrain": row["pretrain"] or None,
        "schedule": row["schedule"],
        "eval_interval_epochs": cfg["eval_interval_epochs"],
    }
    card = {
        "family": row["family"],
        "aliases": ALIASES.get(row["name"], []),
        "dataset": DATASETS[row["dataset"]],
        "backbone": row["backbone"],
        "segmentor": cfg["type"],
        "num_classes": cfg["num_classes"],
        "url": row["url"],
        "hub": {"repo": f"segtorch/{row['name']}", "file": "model.safetensors"},
        "reported": parse_reported(row["metric"], row["reported"]),
        "reported_split": row["split"].split("/")[-1],
        "upstream_config": entry["config_file"],
        "citation": cite,
        "license": "Apache-2.0 (the SSSegmentation toolbox's licence)",
        "architecture": arch,
        "preprocess": preprocess,
        "inference": inference,
        "training": training,
    }
    return drop_none(card)


def flatten(d: dict, prefix=()) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def split_defaults(cards: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """Leaves equal in every card of the family go to ``defaults``; the rest stay per model."""
    flats = {n: flatten(c) for n, c in cards.items()}
    first = next(iter(flats.values()))
    common = {p: v for p, v in first.items()
              if all(p in f and f[p] == v for f in flats.values()) and p[0] not in ("url", "hub", "aliases")}
    if len(cards) == 1:
        common = {}
    rest = {n: unflatten({p: v for p, v in f.items() if p not in common}) for n, f in flats.items()}
    return unflatten(common), rest


def compact_arrays(text: str) -> str:
    """tomli-w writes one array element per line; put arrays of scalars on one line for readability."""
    pattern = re.compile(r"\[\n((?:[ ]+[^\[\]{}\n]+,\n)+)[ ]*\]")
    return pattern.sub(lambda m: "[" + ", ".join(x.strip().rstrip(",") for x in m.group(1).splitlines()) + "]", text)


def main(argv=None) -> None:
    import tomli_w

    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=Path, default=root / "conversion" / "upstream")
    ap.add_argument("--out", type=Path, default=root / "model_cards")
    args = ap.parse_args(argv)
    configs = json.loads((args.seeds / "upstream_configs.json").read_text())["configs"]
    with open(args.seeds / "checkpoints.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    families: dict[str, dict] = {}
    for row in rows:
        cite = citation(args.seeds, row["family"])
        families.setdefault(row["family"], {})[row["name"]] = make_card(row, configs[row["name"]], cite)
    for family, cards in families.items():
        defaults, models = split_defaults(dict(sorted(cards.items())))
        text = (f"# {family}: {len(models)} checkpoints of the SSSegmentation model zoo.\n"
                "# Generated by conversion/make_cards.py from conversion/upstream (checkpoints.tsv, upstream_configs.json);\n"
                "# [defaults] is deep-merged into every [models.NAME]. A missing key means unknown or none.\n\n")
        text += compact_arrays(tomli_w.dumps({"defaults": defaults, "models": models}, multiline_strings=True))
        (args.out / f"{family}.toml").write_text(text)
        print(f"wrote {args.out / f'{family}.toml'} ({len(models)} models)")


if __name__ == "__main__":
    main()
