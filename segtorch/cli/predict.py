"""``segtorch predict``: label maps, colour maps and overlays for files, folders and globs.

Each image gets ``<name>_labels.png`` (class indices; 16-bit when there are more than 256 classes),
``<name>_color.png`` (the dataset's palette), ``<name>_overlay.png``, with ``--scores`` ``<name>_scores.png``
(the per-pixel max class probability, 0-255) and with ``--legend`` ``<name>_legend.png``; ``--outputs``
picks which. ``<name>`` is the file's stem, made unique where two inputs share it (``cat_jpg``/``cat_png``
for files of one folder, input folders mirrored under ``--out`` otherwise). Folders are searched with their
sub-folders (``--no-recursive``: their own files only); files of a kind not read as images are named. Every
input is checked to exist before a model is loaded; a missing, unreadable or non-image file gets a one-line
error, the others are still processed, and the exit status is 1 if any failed (with no result at all, no new
output folder is left behind). Ctrl-C stops reading and the model; the results already computed are written,
counted in one line, and the exit status is 130.
Threads read ahead of the model and write behind it; consecutive equal-sized images share a forward pass
(``segtorch.inference.pipeline``). Files are written atomically. Under torchrun each process segments every
world_size-th input and writes its results; the first prints one summary for all (``sharding``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from ..argtypes import PRECISIONS
from ..imageops import IMAGE_SUFFIXES

OUTPUTS = ("labels", "color", "overlay", "scores", "legend")
DEFAULT_OUTPUTS = ("labels", "color", "overlay")


def add_parser(subparsers):
    s = subparsers.add_parser("predict", help="segment images (label map, colour map, overlay)",
                              description=__doc__.splitlines()[0])
    s.add_argument("inputs", nargs="+", help="image files, folders (their images, sub-folders included) or glob "
                                             "patterns")
    s.add_argument("--model", help="model name (default: the shipped demo model)")
    s.add_argument("--checkpoint", help="local .pth/.safetensors or URL (default: the card's weights)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu; under torchrun with "
                                                  "GPUs, each process's own GPU)")
    s.add_argument("--tta", action="store_true", help="the card's multi-scale + flip settings")
    s.add_argument("--mode", choices=("whole", "slide"), help="override the card's inference mode")
    s.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default): within 2x the toolbox's float32 error (--exact: its computation); bf16 "
                        "(CPUs with native bf16, or CUDA) and fp16 (CUDA) are faster")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (pays off over many images)")
    s.add_argument("--exact", action="store_true",
                   help="the toolbox's own computation step for step (its label maps; slower): no fast path")
    s.add_argument("--runtime", choices=("onnxruntime", "openvino"),
                   help="what runs an exported .onnx --checkpoint (default onnxruntime)")
    s.add_argument("--check-agreement", action="store_true",
                   help="also run fp32 and print the label agreement of the chosen precision/compile")
    s.add_argument("--out", default="segtorch_out", help="output folder (default ./segtorch_out)")
    s.add_argument("--outputs", default=",".join(DEFAULT_OUTPUTS),
                   help=f"comma-separated results to write, of {', '.join(OUTPUTS)} (default: "
                        f"{','.join(DEFAULT_OUTPUTS)})")
    s.add_argument("--scores", action="store_true", help="also write the per-pixel confidence (max probability)")
    s.add_argument("--legend", action="store_true", help="also write a legend of the classes present")
    s.add_argument("--no-recursive", dest="recursive", action="store_false",
                   help="take a folder's own images only, not those of its sub-folders")
    s.add_argument("--batch-size", type=int, default=4, help="equal-sized images per forward pass (default 4)")
    s.add_argument("--workers", type=int, default=2,
                   help="threads reading ahead of the model and threads writing behind it (default 2 each)")
    s.set_defaults(func=cmd_predict)
    return s


def _is_own_output(path: Path, out: Path) -> bool:
    """A result an earlier run wrote under ``out`` (never an input, even when ``out`` is the input folder)."""
    return path.parent.resolve().is_relative_to(out) and \
        any(path.name.endswith(f"_{kind}.png") for kind in OUTPUTS)


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _skipped_note(folder: str, others: list[Path]) -> str:
    """One line naming the files of a folder that are not read as images, by kind."""
    kinds: dict[str, int] = {}
    for p in others:
        kinds[p.suffix.lower() or "(no suffix)"] = kinds.get(p.suffix.lower() or "(no suffix)", 0) + 1
    listed = ", ".join(f"{kind} x{n}" if n > 1 else kind for kind, n in sorted(kinds.items()))
    examples = ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else "")
    return (f"{folder}: skipped {len(others)} file{'s' if len(others) > 1 else ''} not of an image kind "
            f"segtorch reads ({listed}: {examples}); name a file itself to try it anyway")


def expand_inputs(inputs: list[str], out: Path | None = None, recursive: bool = True
                  ) -> tuple[list[Path], list[str], list[str]]:
    """(existing files to process, one error per input that names nothing, notes on what a folder held that
    was skipped). ``~`` is expanded. A folder gives its images (``IMAGE_SUFFIXES``), those of its sub-folders
    too where ``recursive`` (hidden files and folders left out). An existing path is a path even when its name
    holds glob characters; results under ``out`` are skipped; a file named twice is done once."""
    out = Path(out).expanduser().resolve() if out is not None else None
    files, errors, notes, seen = [], [], [], set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen and not (out is not None and _is_own_output(path, out)):
            seen.add(key)
            files.append(path)

    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            candidates = sorted(p for p in (path.rglob("*") if recursive else path.iterdir())
                                if not _hidden(p, path) and p.is_file()
                                and not (out is not None and _is_own_output(p, out)))
            found = [p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES]
            others = [p for p in candidates if p.suffix.lower() not in IMAGE_SUFFIXES]
            if others:
                notes.append(_skipped_note(item, others))
            if not recursive and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
                notes.append(f"{item}: sub-folders skipped (--no-recursive); leave the option out to include them")
            if not found:
                errors.append(f"{item}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for p in found:
                add(p)
        elif path.exists():
            add(path)
        elif any(ch in item for ch in "*?["):
            import glob

            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file())
            if not found:
                errors.append(f"{item}: no file matches")
            for p in found:
                add(p)
        else:
            errors.append(f"{item}: no such file or folder")
    return files, errors, notes


def output_names(files: list[Path]) -> list[str]:
    """A distinct relative name (no suffix) per file: its stem; where stems collide, the name with its
    suffix (``cat_jpg``) for files of one folder and the folders below their common parent otherwise."""
    stems: dict[str, list[int]] = {}
    for i, p in enumerate(files):
        stems.setdefault(p.stem, []).append(i)
    names = [p.stem for p in files]
    for group in stems.values():
        if len(group) < 2:
            continue
        parents = [files[i].resolve().parent for i in group]
        common = Path(os.path.commonpath(parents))
        for i, parent in zip(group, parents):
            same_folder = sum(q == parent for q in parents) > 1
            leaf = files[i].name.replace(".", "_") if same_folder else files[i].stem
            names[i] = (parent.relative_to(common) / leaf).as_posix()
    return names


def write_png(array, path: Path) -> None:
    """An H x W (8/16-bit) or H x W x 3 RGB array as a PNG file, atomically."""
    import cv2

    from ..files import atomic_write

    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.dtype} array of shape {array.shape} as PNG")
    atomic_write(path, data.tobytes())


def render_and_write(seg, out: Path, outputs: list[str], name: str, image, labels, confidence) -> None:
    """Write one image's chosen results under ``out`` as ``<name>_<kind>.png``."""
    import numpy as np

    from ..inference.render import blend

    base = out / name
    base.parent.mkdir(parents=True, exist_ok=True)
    mask = seg.colorize(labels) if {"color", "overlay"} & set(outputs) else None  # made once for both
    pictures = {
        "labels": lambda: labels.astype(np.uint8 if seg.card.num_classes <= 256 else np.uint16),
        "color": lambda: mask,
        "overlay": lambda: blend(image, mask),
        "scores": lambda: np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8),
        "legend": lambda: seg.legend(labels),
    }
    for kind in outputs:
        write_png(pictures[kind](), base.with_name(f"{base.name}_{kind}.png"))


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(out: Path, created: list[Path]) -> None:
    """Where this run made ``out``: remove the empty folders under it (results' subfolders made for inputs that
    failed), then ``out`` and the parents this run made (``created``) where empty; never a file."""
    if not created:
        return
    folders = [Path(entry[0]) for entry in os.walk(out, topdown=False)] + created[1:]  # deepest first
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (or gone): kept
            folder.rmdir()


def _default_model() -> str:
    from ..registry import list_models, model_card

    demos = [n for n in list_models() if model_card(n).demo]
    if not demos:
        raise ValueError("no --model given and no demo model is installed; pick one from `segtorch list`")
    return demos[0]


def _parse_outputs(args) -> list[str]:
    from ..errors import UsageError

    chosen = [k.strip() for k in args.outputs.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in OUTPUTS]
    if unknown or not chosen:
        raise UsageError(f"--outputs {args.outputs!r}: choose from {', '.join(OUTPUTS)} (comma-separated)")
    for flag in ("scores", "legend"):
        if getattr(args, flag) and flag not in chosen:
            chosen.append(flag)
    return chosen


def _check_options(args) -> Path:
    """Everything the user typed that can be wrong, checked before any model is loaded: the device, the counts
    and the output folder (returned)."""
    from ..errors import UsageError
    from ..inference.precision import check_device

    if args.device is not None:
        check_device(args.device, what="--device")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be at least 1 and --workers at least 0")
    if args.check_agreement and args.precision == "fp32" and not args.compile:
        raise UsageError("--check-agreement has nothing to compare at fp32 without --compile: it compares "
                         "--precision bf16/fp16 or --compile with fp32")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is an existing file, not a folder; name a folder (it is created)")
    return out


def cmd_predict(args) -> int:
    from . import sharding

    outputs = _parse_outputs(args)
    out = _check_options(args)
    all_files, errors, notes = expand_inputs(args.inputs, out, recursive=getattr(args, "recursive", True))
    created = _missing_folders(out)  # before any process of a torchrun group can make them (join waits for all)
    shard = sharding.join(args.device)
    try:
        return _predict(args, shard, outputs, out, created, all_files, errors, notes)
    finally:
        sharding.leave(shard)


def _predict(args, shard, outputs, out, created, all_files, errors, notes) -> int:
    from tqdm import tqdm

    from .. import load
    from ..inference.pipeline import run_pipeline
    from ..segmenter import Segmenter
    from .sharding import sum_over_processes

    if shard.leader:
        for e in errors:
            print(f"segtorch: error: {e}", file=sys.stderr)
        for note in notes:
            print(f"segtorch: note: {note}", file=sys.stderr)
    if not all_files:
        return 1
    names = dict(zip(all_files, output_names(all_files)))  # from every input: the same names in every process
    files = shard.take(all_files)
    t0 = time.perf_counter()
    seg = load(args.model or _default_model(), checkpoint=args.checkpoint, device=shard.device or "cpu",
               precision=args.precision, compile=args.compile, exact=args.exact,
               runtime=args.runtime)
    reference = None
    if args.check_agreement and (args.precision != "fp32" or args.compile):
        reference = Segmenter(seg.model, seg.card, device=seg.device)  # same weights, fp32, not compiled
    out.mkdir(parents=True, exist_ok=True)  # here, so that a folder that cannot be made fails before any work
    if shard.leader:
        share = f" ({shard.world_size} processes)" if shard.world_size > 1 else ""
        print(f"{seg.card.name}: loaded in {time.perf_counter() - t0:.1f}s; writing to {out}/{share}",
              file=sys.stderr)
    t_start = time.perf_counter()
    agreement = [0, 0]  # equal pixels, pixels
    bar = tqdm(total=len(files), unit="img", disable=not sys.stderr.isatty() or len(files) < 2 or not shard.leader)
    want_scores = "scores" in outputs

    def report(path: Path, e: BaseException) -> None:
        message = str(e) if str(path) in str(e) else f"{path}: {e}"
        tqdm.write(f"segtorch: error: {message}", file=sys.stderr)

    def infer(batch, size) -> list:
        results = seg.predict_prepared(batch, size, tta=args.tta, mode=args.mode, return_scores=want_scores)
        if reference is not None:
            for ref, result in zip(reference.predict_prepared(batch, size, tta=args.tta, mode=args.mode), results):
                labels = result[0] if want_scores else result
                agreement[0] += int((ref == labels).sum())
                agreement[1] += labels.size
        return results

    def write(path: Path, image, result) -> None:
        labels, confidence = result if want_scores else (result, None)
        render_and_write(seg, out, outputs, names[path], image, labels, confidence)

    try:
        result = run_pipeline(files, seg.prepare, infer, write, on_error=report, batch_size=args.batch_size,
                              workers=args.workers, on_progress=bar.update)
    finally:
        bar.close()
    written, failed, interrupted, agree, total = sum_over_processes(
        shard, [result.written, result.failed, int(result.interrupted), *agreement])
    seconds = time.perf_counter() - t_start  # until the last process finished
    if not written and shard.leader:  # no result: the folders this run made are not left behind, empty
        _remove_empty(out, created)
    inputs = len(all_files) + len(errors)
    if interrupted:
        if shard.leader:
            where = f"; their results are in {out}/" if written else ""
            print(f"segtorch: interrupted: {written} of {inputs} inputs segmented{where}", file=sys.stderr)
        return 130
    if shard.leader:
        print(f"{written} of {inputs} inputs segmented in {seconds:.2f}s "
              f"({written / max(seconds, 1e-9):.2f} images/s)", file=sys.stderr)
        if total:
            print(f"label agreement with fp32: {100.0 * agree / total:.3f}% of {total} pixels", file=sys.stderr)
    return 1 if failed or errors else 0
