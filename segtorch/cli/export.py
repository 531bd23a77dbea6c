"""``segtorch export``: a model as one ONNX file (float32, or static int8 with ``--quantize int8``), checked
against PyTorch before it is written."""
from __future__ import annotations

from ..argtypes import positive_int


def cmd_export(args) -> int:
    from ..export import export

    report = export(args.name, args.out, checkpoint=args.checkpoint, opset=args.opset, quantize=args.quantize,
                    calibration=args.calibration, calibration_images=args.calibration_images,
                    min_agreement=args.min_agreement)
    print(report.summary())
    return 0


def _share(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1 (e.g. 0.97)")
    return value


# segtorch.export's DEFAULT_OPSET, MIN_OPSET and MAX_OPSET, written out: importing it (torch) while the parser is
# built would come before the process tuning that must precede torch (tests/test_deploy.py checks they agree)
DEFAULT_OPSET, OPSETS = 18, "18 to 25"


def add_parser(sub) -> None:
    s = sub.add_parser("export", help="export a model to ONNX (dynamic batch and size, checked against PyTorch)",
                       description=__doc__.splitlines()[0])
    s.add_argument("name", help="the model")
    s.add_argument("--checkpoint", help="a local .pth/.safetensors or a URL (default: the card's weights)")
    s.add_argument("--out", required=True, help="the .onnx file to write")
    s.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {OPSETS} (default {DEFAULT_OPSET})")
    s.add_argument("--quantize", choices=("int8",),
                   help="static int8 (QDQ, per-channel weights, activations calibrated on --calibration)")
    s.add_argument("--calibration", metavar="DIR", help="with --quantize: a folder of images like those the "
                                                        "model will segment (read through the card's preprocessing)")
    s.add_argument("--calibration-images", type=positive_int, metavar="N",
                   help="calibrate on the first N images of DIR, by name (default: all)")
    s.add_argument("--min-agreement", type=_share, metavar="SHARE",
                   help="with --quantize: the share of pixels whose int8 label must equal float32's on the "
                        "calibration inputs, else nothing is written (default 0.97)")
    s.set_defaults(func=cmd_export)
