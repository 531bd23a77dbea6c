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
# used when the toolbox publishes no ms+flip setting for a checkpoint (mmsegmentation's usual ratios)
DEFAULT_TTA_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]

# ---- the toolbox's vocabulary -> segtorch's (the only place that reads the toolbox's config keys) ----------
MODELS = {"PSPNet": "pspnet", "UPerNet": "upernet", "ISNet": "isnet", "MCIBI": "mcibi", "IDRNet": "idrnet"}
BACKBONES = {"ResNet": "resnet", "ResNeSt": "resnest", "HRNet": "hrnet", "VisionTransformer": "vit",
             "SwinTransformer": "swin"}
NORMS = {"BatchNorm2d": "batchnorm", "SyncBatchNorm": "syncbatchnorm", "LayerNorm": "layernorm"}
ACTIVATIONS = {"ReLU": "relu", "LeakyReLU": "leakyrelu", "GELU": "gelu"}
# backbone config keys that are the segtorch constructor's own argument names, per backbone
BACKBONE_ARGS = {
    "resnet": {"depth", "stem_channels", "base_channels"},
    "resnest": {"depth", "stem_channels", "base_channels"},
    "hrnet": {"arch"},
    "vit": {"img_size", "patch_size", "in_channels", "embed_dims", "num_layers", "num_heads", "mlp_ratio",
            "out_indices", "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "with_cls_token",
            "output_cls_token", "patch_norm", "final_norm", "num_fcs"},
    "swin": {"pretrain_img_size", "in_channels", "embed_dims", "patch_size", "window_size", "mlp_ratio", "depths",
             "num_heads", "qkv_bias", "qk_scale", "patch_norm", "drop_rate", "attn_drop_rate", "drop_path_rate",
             "use_abs_pos_embed"},
}
# keys that name or fetch the ImageNet weights a training run starts from and say nothing about the structure
PRETRAINED_KEYS = ("structure_type", "pretrained", "pretrained_model_path", "use_checkpoint")


class Consumed(dict):
    """A config table read key by key: ``done()`` refuses keys nobody took (a toolbox setting the
    translation does not know would otherwise be dropped silently)."""

    def __init__(self, where: str, table: dict):
        super().__init__(drop_none(table))
        self.where = where

    def take(self, key, default=KeyError):
        if key in self:
            return self.pop(key)
        if default is KeyError:
            raise KeyError(f"{self.where}: missing {key!r}")
        return default

    def done(self) -> None:
        if self:
            raise ValueError(f"{self.where}: toolbox keys with no segtorch translation: {sorted(self)}")


def norm_spec(cfg: dict, where: str) -> dict:
    """``{"type": "LayerNorm", "eps": 1e-6}`` -> ``{"norm": "layernorm", "norm_eps": 1e-6}``."""
    cfg = Consumed(where, cfg)
    out = {"norm": NORMS[cfg.take("type")]}
    if "eps" in cfg:
        out["norm_eps"] = cfg.take("eps")
    cfg.done()
    return out


def activation_spec(cfg: dict, where: str) -> dict:
    """``{"type": "LeakyReLU", "negative_slope": 0.01, "inplace": True}`` -> ``{"name": "leakyrelu",
    "negative_slope": 0.01}`` (segtorch's activations are in place wherever the toolbox's are)."""
    cfg = Consumed(where, cfg)
    out = {"name": ACTIVATIONS[cfg.take("type")]}
    if cfg.take("inplace", True) is not True:
        raise ValueError(f"{where}: only in-place activations are supported")
    if "negative_slope" in cfg:
        out["negative_slope"] = cfg.take("negative_slope")
    cfg.done()
    return out


def backbone_spec(cfg: dict, model_norm: dict) -> tuple[dict, list[int]]:
    """The backbone's constructor arguments in segtorch's names, and the outputs the head reads."""
    cfg = Consumed("backbone", cfg)
    name = BACKBONES[cfg.take("type")]
    for key in PRETRAINED_KEYS:
        cfg.take(key, None)
    selected = cfg.take("selected_indices")
    # the toolbox hands a backbone the segmentor's normalisation unless its config has its own
    out = {"name": name, **norm_spec(cfg.take("norm_cfg", model_norm), "backbone.norm_cfg")}
    if "act_cfg" in cfg:
        out["activation"] = activation_spec(cfg.take("act_cfg"), "backbone.act_cfg")
    if "outstride" in cfg:
        out["output_stride"] = cfg.take("outstride")
    if "use_conv3x3_stem" in cfg:
        out["deep_stem"] = cfg.take("use_conv3x3_stem")
    if "mcibi_version" in cfg:  # the MCIBI Cityscapes checkpoint's stem has no activation after its first conv
        out["first_stem_activation"] = not cfg.take("mcibi_version")
    out.update({k: cfg.take(k) for k in sorted(BACKBONE_ARGS[name]) if k in cfg})
    cfg.done()
    return out, selected


def head_spec(kind: str, cfg: dict, backbone: dict, selected: list[int]) -> dict:
    """The model class's constructor arguments (beyond backbone, classes, norm and activation)."""
    cfg = Consumed(f"{kind}.head", cfg)
    head = {}
    if kind in ("PSPNet", "UPerNet"):
        if "feature2pyramid" in cfg:
            raise ValueError("UPerNet with feature2pyramid is not a seed architecture and is not supported")
        keys = ("in_channels", "feats_channels", "pool_scales", "dropout")
        if kind == "UPerNet":
            keys = ("in_channels_list",) + keys[1:]
        head = {k: cfg.take(k) for k in keys}
    elif kind == "ISNet":
        head = {k: cfg.take(k) for k in ("in_channels", "feats_channels", "transform_channels", "concat_input",
                                           "dropout")}
        shortcut = Consumed("ISNet.head.shortcut", cfg.take("shortcut"))
        on, shortcut_in, shortcut_channels = shortcut.take("is_on"), shortcut.take("in_channels"), \
            shortcut.take("feats_channels")
        shortcut.done()
        if on:  # the stride-4 shortcut before the stage-2 classifier (the LIP configs)
            head.update(shortcut_in_channels=shortcut_in, shortcut_channels=shortcut_channels)
    elif kind == "MCIBI":
        head = {k: cfg.take(k) for k in ("in_channels", "feats_channels", "transform_channels", "out_channels",
                                           "num_feats_per_cls", "use_hard_aggregate", "dropout")}
        context = Consumed("MCIBI.head.context_within_image", cfg.take("context_within_image"))
        if context.take("is_on"):
            head["context"] = context.take("type")
            settings = Consumed("MCIBI.head.context_within_image.cfg", context.take("cfg"))
            if head["context"] == "aspp":
                head["context_dilations"] = settings.take("dilations")
            else:
                head["context_pool_scales"] = settings.take("pool_scales")
            settings.done()
        else:
            head["context"] = None
            context.take("type", None), context.take("cfg", None)
        context.done()
        down = Consumed("MCIBI.head.downsample_backbone", cfg.take("downsample_backbone"))
        if (down.take("kernel_size"), down.take("padding"), down.take("bias")) != (3, 1, False):
            raise ValueError("MCIBI.head.downsample_backbone: only the 3x3, padding 1, bias-free conv is supported")
        head["downsample_stride"] = down.take("stride")
        down.done()
        if "norm_cfg" in cfg:  # a channel-wise norm of every selected backbone output (the ViT configs)
            norm = dict(cfg.take("norm_cfg"))
            channels = norm.pop("in_channels_list")
            if channels != [backbone["embed_dims"]] * len(selected):
                raise ValueError(f"MCIBI.head.norm_cfg.in_channels_list {channels} is not the backbone's outputs")
            spec = norm_spec(norm, "MCIBI.head.norm_cfg")
            head["feature_norm"] = spec["norm"]
            if "norm_eps" in spec:
                head["feature_norm_eps"] = spec["norm_eps"]
        # training-only settings: see memory_training()
        for key in ("update_cfg", "use_loss", "loss_cfg"):
            cfg.take(key)
    elif kind == "IDRNet":
        head = {k: cfg.take(k) for k in ("in_channels", "feats_channels", "force_stage1_use_oripr", "dropout",
                                           "refine_idcontext_channels", "clsrelation_momentum",
                                           "dlclsreps_momentum")}
        # the class-relation updates skip the losses' ignore index; checked in relation_training()
        cfg.take("ignore_index")
        fpn_before, fpn_after = cfg.take("use_fpn_before"), cfg.take("use_fpn_after")
        sa_before, sa_after = cfg.take("use_sa_on_coarsecontext_before"), cfg.take("use_sa_on_coarsecontext_after")
        refine_channels = cfg.take("refine_coarsecontext_channels")
        if "coarse_context" in cfg:
            context = Consumed("IDRNet.head.coarse_context", cfg.take("coarse_context"))
            head["coarse_context"] = context.take("type")
            key = "dilations" if head["coarse_context"] == "aspp" else "pool_scales"
            head[key] = context.take(key)
            context.done()
            if sa_before or sa_after:  # "before" wins when both are set, as in the toolbox
                head["use_sa_on_coarsecontext_before" if sa_before else "use_sa_on_coarsecontext_after"] = True
                head["refine_coarsecontext_channels"] = refine_channels
            if "fpn" in cfg:
                fpn = Consumed("IDRNet.head.fpn", cfg.take("fpn"))
                head.update(fpn_in_channels_list=fpn.take("in_channels_list"),
                            fpn_feats_channels=fpn.take("feats_channels"), fpn_out_channels=fpn.take("out_channels"))
                fpn.done()
                head.update(use_fpn_before=fpn_before, use_fpn_after=fpn_after)
    else:
        raise ValueError(f"no translation for the toolbox's {kind!r}")
    cfg.done()
    return head


def auxiliary_spec(cfg) -> list[dict]:
    out = []
    for table in ([cfg] if isinstance(cfg, dict) else cfg):
        table = Consumed("auxiliary", table)
        spec = {k: table.take(k) for k in ("in_channels", "out_channels", "dropout")}
        if "num_convs" in table:
            spec["num_convs"] = table.take("num_convs")
        if "upsample" in table:
            upsample = Consumed("auxiliary.upsample", table.take("upsample"))
            spec["upsample_scale"] = upsample.take("scale_factor")
            upsample.done()
        table.done()
        out.append(spec)
    return out


def architecture(cfg: dict) -> dict:
    """A toolbox segmentor config -> the card's ``architecture`` (what segtorch's builder takes)."""
    kind = cfg["type"]
    backbone, selected = backbone_spec(cfg["backbone"], cfg["norm_cfg"])
    arch = {"model": MODELS[kind], "num_classes": cfg["num_classes"], "align_corners": cfg["align_corners"],
            "norm": norm_spec(cfg["norm_cfg"], "norm_cfg")["norm"],
            "activation": activation_spec(cfg["act_cfg"], "act_cfg"),
            "backbone": backbone, "backbone_outputs": selected,
            "head": head_spec(kind, cfg["head"], backbone, selected)}
    if cfg.get("auxiliary"):
        arch["auxiliary"] = auxiliary_spec(cfg["auxiliary"])
    return arch


def memory_training(head: dict) -> dict:
    """MCIBI's training-time memory settings: the moving-average update, and the memory loss (from epoch 2)."""
    update = Consumed("MCIBI.head.update_cfg", head["update_cfg"])
    momentum = Consumed("MCIBI.head.update_cfg.momentum_cfg", update.take("momentum_cfg"))
    out = {"memory_update": {"strategy": update.take("strategy"), "ignore_index": update.take("ignore_index"),
                             "base_momentum": momentum.take("base_momentum"), "base_lr": momentum.take("base_lr"),
                             "adjust_by_learning_rate": momentum.take("adjust_by_learning_rate")}}
    momentum.done(), update.done()
    if head["use_loss"]:
        out["memory_loss"] = head["loss_cfg"]
    return out


def relation_training(head: dict, losses: dict) -> dict:
    """IDRNet's class-relation updates skip the same ignore index as the losses (nothing to record)."""
    if any(loss.get("ignore_index", -100) != head["ignore_index"] for loss in losses.values()):
        raise ValueError("IDRNet.head.ignore_index differs from the losses' ignore_index")
    return {}


def preprocess(cfg: dict, name: str) -> dict:
    """The test pipeline (Resize, Normalize, ToTensor) -> output size, keep_ratio, mean, std."""
    steps = cfg["dataset"]["test"]["data_pipelines"]
    kinds = [s[0] for s in steps]
    if kinds != ["Resize", "Normalize", "ToTensor"]:
        raise ValueError(f"{name}: unexpected test pipeline {kinds}")
    resize, normalize = Consumed(f"{name}: Resize", steps[0][1]), Consumed(f"{name}: Normalize", steps[1][1])
    out = {"output_size": resize.take("output_size"), "keep_ratio": resize.take("keep_ratio"),
           "mean": normalize.take("mean"), "std": normalize.take("std")}
    # segtorch reads images as RGB, the channel order every zoo checkpoint was trained with
    if normalize.take("to_rgb", True) is not True:
        raise ValueError(f"{name}: a BGR checkpoint (Normalize.to_rgb=False) is not supported")
    resize.done(), normalize.done()
    return out


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


def inference_settings(cfg: dict, flip_pairs=None) -> dict:
    """The toolbox's ``inference`` table -> mode, crop_size, stride, scales, flip, softmax_before_resize and the
    left/right class pairs to swap when flipping (its own, else those of the training flip)."""
    fwd, tta = cfg["forward"], cfg["tta"]
    out = {"mode": fwd["mode"], "crop_size": fwd["cropsize"], "stride": fwd["stride"],
           "scales": [float(s) for s in tta["multiscale"]], "flip": tta["flip"],
           "softmax_before_resize": tta["use_probs_before_resize"],
           "flip_pairs": tta.get("fixed_seg_target_pairs") or flip_pairs}
    return drop_none(out)


def inference(cfg: dict, alternatives: dict, flip_pairs) -> dict:
    """The single-scale settings, the ms+flip ones (``tta``, with where they come from) and every alternative
    the config gives in comments."""
    alternatives = {label: inference_settings(alt, flip_pairs) for label, alt in alternatives.items()}
    out = {"default": inference_settings(cfg["inference"], flip_pairs)}
    label = next((n for n in alternatives if "multi-scale" in n), next(iter(alternatives), None))
    if label:
        out["tta"], out["tta_source"] = alternatives[label], f"toolbox config comment: {label}"
    else:
        out["tta"] = {**out["default"], "scales": DEFAULT_TTA_SCALES, "flip": True}
        out["tta_source"] = "segtorch default (the toolbox publishes no multi-scale setting for this checkpoint)"
    if alternatives:
        out["alternatives"] = alternatives
    return out


def citation(seeds: Path, family: str) -> str | None:
    """The BibTeX entry of a family's zoo page (None where the page gives an empty one)."""
    page = (seeds / f"{family}.md").read_text()
    m = re.search(r"```latex\n(.*?)```", page, re.S)
    text = m.group(1).strip() if m else ""
    return text or None


def make_card(row: dict, entry: dict, cite: str | None = None) -> dict:
    cfg = entry["segmentor_cfg"]
    train_steps = pipeline(cfg["dataset"]["train"]["data_pipelines"])
    flip_pairs = next((s.get("fixed_seg_target_pairs") for s in train_steps if s["type"] == "RandomFlip"), None)
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
    }
    if cfg["type"] == "MCIBI":
        training.update(memory_training(cfg["head"]))
    if cfg["type"] == "IDRNet":
        training.update(relation_training(cfg["head"], cfg["losses"]))
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
        # provenance only: the toolbox config this card was translated from (conversion/upstream)
        "upstream_config": entry["config_file"],
        "citation": cite,
        "license": "Apache-2.0 (the SSSegmentation toolbox's licence)",
        "architecture": architecture(cfg),
        "preprocess": preprocess(cfg, row["name"]),
        "inference": inference(cfg, entry["inference_alternatives"], flip_pairs),
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
