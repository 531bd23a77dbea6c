"""``segtorch predict``: label maps, colour maps and overlays for files, folders and globs.

Each image gets ``<stem>_labels.png`` (class indices; 16-bit when there are more than 256 classes),
``<stem>_color.png`` (the dataset's palette), ``<stem>_overlay.png`` and, with ``--legend``,
``<stem>_legend.png``. A missing, unreadable or non-image file gets a one-line error; the others are still
processed, and the exit status is 1 if any failed. Files are written atomically.
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def add_predict_parser(subparsers):
    s = subparsers.add_parser("predict", help="segment images (label map, colour map, overlay)",
                              description=__doc__.splitlines()[0])
    s.add_argument("inputs", nargs="+", help="image files, folders (their images) or glob patterns")
    s.add_argument("--model", help="model name (default: the shipped demo model)")
    s.add_argument("--checkpoint", help="local .pth/.safetensors or URL (default: the card's weights)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    s.add_argument("--tta", action="store_true", help="the card's multi-scale + flip settings")
    s.add_argument("--mode", choices=("whole", "slide"), help="override the card's inference mode")
    s.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 reproduces the toolbox; bf16 (CPU with AVX512-BF16/AMX, or CUDA) and fp16 (CUDA) "
                        "are faster")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (pays off over many images)")
    s.add_argument("--check-agreement", action="store_true",
                   help="also run fp32 and print the label agreement of the chosen precision/compile")
    s.add_argument("--out", default="segtorch_out", help="output folder (default ./segtorch_out)")
    s.add_argument("--legend", action="store_true", help="also write a legend of the classes present")
    s.set_defaults(func=cmd_predict)
    return s


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(files to process, errors for inputs that name nothing)."""
    files, errors = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                errors.append(f"{item}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                errors.append(f"{item}: no file matches")
            files += found
        else:
            files.append(path)  # a missing file is reported when it is read, in order
    return files, errors


def write_png(array, path: Path) -> None:
    from PIL import Image

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default_model() -> str:
    from .registry import list_models, model_card

    demos = [n for n in list_models() if model_card(n).demo]
    if not demos:
        raise ValueError("no --model given and no demo model is installed; pick one from `segtorch list`")
    return demos[0]


def cmd_predict(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from . import load
    from .segmenter import Segmenter

    files, errors = expand_inputs(args.inputs)
    for e in errors:
        print(f"segtorch: error: {e}", file=sys.stderr)
    if not files:
        return 1
    name = args.model or _default_model()
    t0 = time.perf_counter()
    seg = load(name, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
               compile=args.compile)
    reference = None
    if args.check_agreement and (args.precision != "fp32" or args.compile):
        reference = Segmenter(seg.model, seg.card, device=seg.device)  # same weights, fp32, not compiled
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{seg.card.name}: loaded in {time.perf_counter() - t0:.1f}s; writing to {out}/", file=sys.stderr)
    failed, agree, total = 0, 0, 0
    bar = tqdm(files, unit="img", disable=not sys.stderr.isatty() or len(files) < 2)
    for path in bar:
        try:
            from .inference.image import read_image

            image = read_image(path)
            labels = seg.predict(image, tta=args.tta, mode=args.mode)
            if reference is not None:
                ref = reference.predict(image, tta=args.tta, mode=args.mode)
                agree += int((ref == labels).sum())
                total += labels.size
            stem = out / path.stem
            dtype = np.uint8 if seg.card.num_classes <= 256 else np.uint16
            write_png(labels.astype(dtype), stem.with_name(f"{path.stem}_labels.png"))
            write_png(seg.colorize(labels), stem.with_name(f"{path.stem}_color.png"))
            write_png(seg.overlay(image, labels), stem.with_name(f"{path.stem}_overlay.png"))
            if args.legend:
                write_png(seg.legend(labels), stem.with_name(f"{path.stem}_legend.png"))
        except (OSError, ValueError, RuntimeError) as e:
            failed += 1
            message = str(e) if str(path) in str(e) else f"{path}: {e}"
            tqdm.write(f"segtorch: error: {message}", file=sys.stderr)
    done = len(files) - failed
    print(f"{done} of {len(files)} images segmented in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if reference is not None and total:
        print(f"label agreement with fp32: {100.0 * agree / total:.3f}% of {total} pixels", file=sys.stderr)
    return 1 if failed or errors else 0
