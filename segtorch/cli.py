"""The ``segtorch`` command: list | info | convert | download | predict | eval | train.

Errors print one line (``segtorch: error: ...``) and exit non-zero.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def cmd_list(args) -> int:
    from .registry import list_models, model_card

    names = list_models(args.pattern, dataset=args.dataset, family=args.family, backbone=args.backbone)
    cards = [model_card(n) for n in names]
    if args.json:
        print(json.dumps([{"name": c.name, "family": c.family, "dataset": c.dataset, "backbone": c.backbone,
                           "reported": c.reported, "aliases": list(c.aliases), "demo": c.demo} for c in cards],
                         indent=2))
        return 0
    if not cards:
        print("no model matches", file=sys.stderr)
        return 1
    if args.markdown:
        print(markdown_table(cards))
        return 0
    width = max(len(c.name) for c in cards)
    print(f"{'name':<{width}}  {'dataset':<15} {'backbone':<13} {'mIoU':>6} {'flip':>6} {'ms+flip':>7}")
    for c in cards:
        r = c.reported
        tag = "  (demo)" if c.demo else ""
        print(f"{c.name:<{width}}  {c.dataset:<15} {c.backbone:<13} {_fmt(r['miou']):>6} {_fmt(r['miou_flip']):>6} "
              f"{_fmt(r['miou_ms_flip']):>7}{tag}")
    print(f"{len(cards)} models")
    return 0


def markdown_table(cards) -> str:
    """The model table of the README (``segtorch list --markdown``)."""
    lines = ["| name | dataset | backbone | mIoU | flip | ms+flip |", "|---|---|---|---:|---:|---:|"]
    for c in cards:
        r = c.reported
        name = f"`{c.name}`" + (" (demo)" if c.demo else "")
        lines.append(f"| {name} | {c.dataset} | {c.backbone} | {_fmt(r['miou'])} | {_fmt(r['miou_flip'])} | "
                     f"{_fmt(r['miou_ms_flip'])} |")
    return "\n".join(lines)


def cmd_info(args) -> int:
    from .registry import model_card

    if args.name.lower().endswith(".onnx"):
        return _info_onnx(args)
    card = model_card(args.name)
    if args.json:
        print(json.dumps(card.to_dict(), indent=2))
        return 0
    inf = card.inference
    print(f"name:          {card.name}" + (f"  (aliases: {', '.join(card.aliases)})" if card.aliases else ""))
    print(f"family:        {card.family} ({card.segmentor})")
    print(f"backbone:      {card.backbone}")
    print(f"dataset:       {card.dataset_title} [{card.dataset}], {card.num_classes} classes")
    reported = ", ".join(f"{k} {v:.2f}" for k, v in card.reported.items() if v is not None) or "none published"
    print(f"reported:      {reported} ({card.reported_split} split)")
    print(f"weights:       {card.url}")
    if card.hub:
        print(f"hf mirror:     {card.hub['repo']} / {card.hub['file']}")
    print(f"sha256:        {card.sha256 or 'unknown (trusted on first use)'}")
    resize = card.preprocess["resize"]
    print(f"test resize:   {resize.get('output_size')} keep_ratio={resize.get('keep_ratio')}; "
          f"mean {card.preprocess['mean']} std {card.preprocess['std']} ({card.preprocess['channel_order']})")
    crop = f", crop {inf['crop_size']} stride {inf['stride']}" if inf.get("mode") == "slide" else ""
    print(f"inference:     {inf['mode']}{crop}, scales {inf['scales']}, flip {inf['flip']}")
    tta = inf.get("tta", {})
    if tta:
        crop = f", crop {tta.get('crop_size')} stride {tta.get('stride')}" if tta.get("mode") == "slide" else ""
        print(f"tta:           {tta.get('mode')}{crop}, scales {tta.get('scales')}, flip {tta.get('flip')} "
              f"[{tta.get('source')}]")
    t = card.training
    print(f"training:      {t.get('schedule')}, crop {t.get('crop_size')}, {t.get('optimizer', {}).get('type')}")
    return 0


def _info_onnx(args) -> int:
    """The metadata ``segtorch export`` wrote into an ONNX file."""
    from .export import read_metadata

    meta = read_metadata(args.name)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    names = meta.get("class_names", [])
    print(f"file:          {args.name}")
    print(f"model:         {meta['model']} (exported by segtorch {meta.get('version')}, opset {meta.get('opset')})")
    print(f"source sha256: {meta.get('source_sha256')}")
    print(f"classes:       {meta.get('num_classes')}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    print(f"palette:       {len(meta.get('palette', []))} colours, first {meta.get('palette', [None])[0]}")
    print(f"input:         {meta.get('input')}")
    print(f"output:        {meta.get('output')}")
    print(f"preprocess:    {json.dumps(meta.get('preprocess'))}")
    print(f"inference:     {json.dumps(meta.get('inference'))}")
    for check in meta.get("error", []):
        print(f"error:         {check['shape']}: onnxruntime {check['onnx_error']:.2e} vs float64 (float32 PyTorch "
              f"{check['torch_error']:.2e}, bound {check['bound']:.2e})")
    return 0


def cmd_export(args) -> int:
    from .export import export

    report = export(args.name, args.out, checkpoint=args.checkpoint, opset=args.opset)
    print(report.summary())
    return 0


def cmd_convert(args) -> int:
    from .api import convert

    report = convert(args.src, args.dst, name=args.name, auxiliary=args.keep_auxiliary)
    print(report.summary())
    return 0


def cmd_download(args) -> int:
    from .hub import fetch_weights
    from .registry import model_card

    for name in args.names:
        path = fetch_weights(model_card(name))
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segtorch", description="SSSegmentation checkpoints, ready to use.")
    p.add_argument("--version", action="version", version=f"segtorch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list models (with reported mIoU)")
    s.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'isnet_*'")
    s.add_argument("--dataset", help="ade20k, cityscapes, voc, cocostuff10k, lip, pascalcontext59")
    s.add_argument("--family", help="pspnet, upernet, isnet, mcibi, idrnet")
    s.add_argument("--backbone", help="substring of the backbone, e.g. R-101 or swin")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("info", help="show a model card (or an exported .onnx file's metadata)")
    s.add_argument("name", help="a model name, or FILE.onnx written by `segtorch export`")
    s.add_argument("--json", action="store_true", help="the whole card as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="convert a legacy .pth checkpoint to safetensors")
    s.add_argument("src", help="the .pth (or .safetensors) file")
    s.add_argument("dst", help="the .safetensors file to write")
    s.add_argument("--name", required=True, help="the model the checkpoint belongs to")
    s.add_argument("--keep-auxiliary", action="store_true", help="keep the auxiliary head (for fine-tuning)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="export a model to ONNX (dynamic batch and size, checked against PyTorch)")
    s.add_argument("name", help="the model")
    s.add_argument("--checkpoint", help="a local .pth/.safetensors or a URL (default: the card's weights)")
    s.add_argument("--out", required=True, help="the .onnx file to write")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("download", help="fetch and cache model weights")
    s.add_argument("names", nargs="+")
    s.set_defaults(func=cmd_download)

    from .predict_cli import add_predict_parser
    from .train.commands import add_eval_parser, add_train_parser

    add_predict_parser(sub)
    add_eval_parser(sub)
    add_train_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("segtorch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `segtorch list | head`
        sys.stderr.close()
        return 0
    except (KeyError, ValueError, RuntimeError, OSError) as e:  # our errors are one line and say what is wrong
        print(f"segtorch: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
