"""``segtorch list | info | convert | download``: the model zoo, its cards and weight files."""
from __future__ import annotations

import json
import sys


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _no_match(args) -> str:
    """Why ``segtorch list`` found nothing, with the values that would have matched something."""
    from ..registry import list_models, model_card

    cards = [model_card(n) for n in list_models()]
    hints = []
    for flag, value, field in (("--dataset", args.dataset, "dataset"), ("--family", args.family, "family")):
        valid = sorted({getattr(c, field) for c in cards})
        if value and value.lower() not in {v.lower() for v in valid}:
            hints.append(f"{flag} must be one of {', '.join(valid)}")
    if args.pattern and not any(ch in args.pattern for ch in "*?["):
        hints.append(f"patterns match whole names: try '{args.pattern}*'")
    return "no model matches" + (f" ({'; '.join(hints)})" if hints else "")


def cmd_list(args) -> int:
    from ..registry import list_models, model_card

    names = list_models(args.pattern, dataset=args.dataset, family=args.family, backbone=args.backbone)
    cards = [model_card(n) for n in names]
    if not cards:
        if args.json:
            print("[]")
        print(f"segtorch: {_no_match(args)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"name": c.name, "family": c.family, "dataset": c.dataset, "backbone": c.backbone,
                           "reported": dict(c.reported), "aliases": list(c.aliases), "demo": c.demo} for c in cards],
                         indent=2))
        return 0
    if args.markdown:
        print(markdown_table(cards))
        return 0
    rows = [(c.name, c.dataset, c.backbone, _fmt(c.reported["miou"]), _fmt(c.reported["miou_flip"]),
             _fmt(c.reported["miou_ms_flip"]), "(demo)" if c.demo else "") for c in cards]
    header = ("name", "dataset", "backbone", "mIoU", "flip", "ms+flip", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [f"{v:<{w}}" if i < 3 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(row[:-1], widths))]
        print("  ".join(cells) + (f"  {row[-1]}" if row[-1] else ""))
    print(f"{len(cards)} model{'s' if len(cards) != 1 else ''}")
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
    from ..registry import model_card

    if args.name.lower().endswith(".onnx"):
        return _info_onnx(args)
    if args.name.lower().endswith(".safetensors"):
        return _info_safetensors(args)
    card = model_card(args.name)
    if args.json:
        print(json.dumps(card.to_dict(), indent=2))
        return 0
    inf = card.inference.default
    print(f"name:          {card.name}" + (f"  (aliases: {', '.join(card.aliases)})" if card.aliases else ""))
    print(f"family:        {card.family} ({card.segmentor})")
    print(f"backbone:      {card.backbone}")
    print(f"dataset:       {card.dataset_title} [{card.dataset}], {card.num_classes} classes")
    reported = ", ".join(f"{k} {v:.2f}" for k, v in card.reported.items() if v is not None) or "none published"
    print(f"reported:      {reported} ({card.reported_split} split)")
    from ..weights import describe

    for label, value in describe(card).items():
        if value is not None:
            print(f"{label + ':':<15}{value}")
    pre = card.preprocess
    print(f"test resize:   {list(pre.output_size)} keep_ratio={pre.keep_ratio}; "
          f"mean {list(pre.mean)} std {list(pre.std)} (RGB)")
    for label, s in (("inference:    ", inf), ("tta:          ", card.inference.tta)):
        crop = f", crop {list(s.crop_size)} stride {list(s.stride)}" if s.mode == "slide" else ""
        source = f" [{card.inference.tta_source}]" if s is card.inference.tta else ""
        print(f"{label} {s.mode}{crop}, scales {list(s.scales)}, flip {s.flip}{source}")
    t = card.training
    crop = list(t["crop_size"]) if t.get("crop_size") else None
    schedule = t.get("schedule") or (f"{t['epochs']} epochs" if t.get("epochs") else "unknown schedule")
    print(f"training:      {schedule}, crop {crop}, {t.get('optimizer', {}).get('type')}, batch "
          f"{t.get('batch_size')} ({t.get('batch_size_per_gpu')} per GPU), from {t.get('pretrain') or 'scratch'}")
    if t.get("command"):
        print(f"trained with:  {t['command']}")
    return 0


def _info_onnx(args) -> int:
    """The metadata ``segtorch export`` wrote into an ONNX file."""
    from ..export import file_opset
    from ..inference.onnx_runtime import read_metadata

    meta = read_metadata(args.name)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    names = meta.get("class_names", [])
    print(f"file:          {args.name}")
    print(f"model:         {meta['model']} (exported by segtorch {meta.get('version')}, opset "
          f"{file_opset(args.name)}, {meta.get('precision', 'fp32')})")
    print(f"source sha256: {meta.get('source_sha256')}")
    # JSON: names hold commas and spaces ("windowpane, window")
    print(f"classes:       {meta.get('num_classes')}: {json.dumps(names)}")
    print(f"palette:       {len(meta.get('palette', []))} colours, first {meta.get('palette', [None])[0]}")
    print(f"input:         {meta.get('input')}")
    print(f"output:        {meta.get('output')}")
    print(f"preprocess:    {json.dumps(meta.get('preprocess'))}")
    print(f"inference:     {json.dumps(meta.get('inference'))}")
    for check in meta.get("error", []):
        print(f"error:         {check['shape']}: onnxruntime {check['onnx_error']:.2e} vs float64 (float32 PyTorch "
              f"{check['torch_error']:.2e}, bound {check['bound']:.2e})")
    if "calibration" in meta:
        c, q = meta["calibration"], meta["int8_error"]
        print(f"calibration:   {c['images']} images of {c['folder']} ({c['inputs']} inputs)")
        print(f"int8 error:    labels agree with float32 on {q['agreement']:.2%} of the pixels, scores' relative "
              f"error {q['relative_error']:.2e}")
    return 0


def _info_safetensors(args) -> int:
    """A safetensors file's metadata and what it holds (from its header: no tensor is read)."""
    from collections import Counter
    from math import prod

    from safetensors import SafetensorError, safe_open

    from ..checkpoint import check_format
    from ..errors import CheckpointError

    check_format(args.name)
    try:
        with safe_open(args.name, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes = {k: f.get_slice(k) for k in f.keys()}
            tensors = {k: (s.get_dtype(), s.get_shape()) for k, s in shapes.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{args.name}: damaged safetensors file ({e})") from None
    decoded = {}
    for key, value in meta.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    dtypes = Counter(dtype for dtype, _ in tensors.values())
    if args.json:
        print(json.dumps({"metadata": decoded, "tensors": len(tensors),
                          "parameters": sum(prod(shape) for _, shape in tensors.values()),
                          "dtypes": dict(dtypes)}, indent=2))
        return 0
    print(f"file:          {args.name}")
    print(f"tensors:       {len(tensors)}, {sum(prod(shape) for _, shape in tensors.values()):,} values "
          f"({', '.join(f'{n} {d}' for d, n in dtypes.most_common())})")
    if not decoded:
        print("metadata:      none")
    for key, value in decoded.items():
        print(f"{key + ':':<15}{value if isinstance(value, str) else json.dumps(value)}")
    return 0


def cmd_convert(args) -> int:
    from ..api import convert

    report = convert(args.src, args.dst, name=args.name, auxiliary=args.keep_auxiliary)
    print(report.summary())
    return 0


def cmd_download(args) -> int:
    from ..weights import fetch_weights
    from ..registry import model_card

    for name in args.names:
        path = fetch_weights(model_card(name))
        print(f"{name}: {path}")
    return 0


def add_parsers(sub) -> None:
    """Register list, info, convert and download on ``sub`` (argparse subparsers)."""
    s = sub.add_parser("list", help="list models (with reported mIoU)")
    s.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'isnet_*'")
    s.add_argument("--dataset", help="ade20k, cityscapes, voc, cocostuff10k, lip, pascalcontext59")
    s.add_argument("--family", help="pspnet, upernet, isnet, mcibi, idrnet")
    s.add_argument("--backbone", help="substring of the backbone, e.g. R-101 or swin")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("info", help="show a model card (or a .onnx or .safetensors file's metadata)")
    s.add_argument("name", help="a model name, FILE.onnx written by `segtorch export`, or FILE.safetensors")
    s.add_argument("--json", action="store_true", help="the whole card as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="convert a legacy .pth checkpoint to safetensors")
    s.add_argument("src", help="the .pth (or .safetensors) file")
    s.add_argument("dst", help="the .safetensors file to write")
    s.add_argument("--name", required=True, help="the model the checkpoint belongs to")
    s.add_argument("--keep-auxiliary", action="store_true", help="keep the auxiliary head (for fine-tuning)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("download", help="fetch and cache model weights")
    s.add_argument("names", nargs="+")
    s.set_defaults(func=cmd_download)
