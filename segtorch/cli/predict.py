"""``segtorch predict``: label maps, colour maps and overlays for files, folders and globs.

Each image gets ``<name>_labels.png`` (class indices; 16-bit when there are more than 256 classes),
``<name>_color.png`` (the dataset's palette), ``<name>_overlay.png``, with ``--scores`` ``<name>_scores.png``
(the per-pixel max class probability, 0-255) and with ``--legend`` ``<name>_legend.png``; ``--outputs``
picks which. ``<name>`` is the file's stem, made unique where two inputs share it (``cat_jpg``/``cat_png``
for files of one folder, input folders mirrored under ``--out`` otherwise). Every input is checked to exist
before a model is loaded; a missing, unreadable or non-image file gets a one-line error, the others are still
processed, and the exit status is 1 if any failed (with no result at all, no new output folder is left behind).
Ctrl-C stops reading and the model; the results already computed are written, counted in one line, and the
exit status is 130.
Worker threads read and preprocess ahead of the model (the first images while it loads) and write results
behind it: between its forward passes when the model's threads take every core (a CPU device, by default),
beside them otherwise (at a lower priority for a CPU model); equal-sized images share a forward pass. Files
are written atomically. A process of its own is tuned first (``process_tuning``).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from ..argtypes import PRECISIONS
from ..errors import SegtorchError
from ..imageops import IMAGE_SUFFIXES

OUTPUTS = ("labels", "color", "overlay", "scores", "legend")
DEFAULT_OUTPUTS = ("labels", "color", "overlay")


def add_parser(subparsers):
    s = subparsers.add_parser("predict", help="segment images (label map, colour map, overlay)",
                              description=__doc__.splitlines()[0])
    s.add_argument("inputs", nargs="+", help="image files, folders (their images) or glob patterns")
    s.add_argument("--model", help="model name (default: the shipped demo model)")
    s.add_argument("--checkpoint", help="local .pth/.safetensors or URL (default: the card's weights)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    s.add_argument("--tta", action="store_true", help="the card's multi-scale + flip settings")
    s.add_argument("--mode", choices=("whole", "slide"), help="override the card's inference mode")
    s.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 reproduces the toolbox; bf16 (CPU with AVX512-BF16/AMX, or CUDA) and fp16 (CUDA) "
                        "are faster")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (pays off over many images)")
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
    s.add_argument("--batch-size", type=int, default=4, help="equal-sized images per forward pass (default 4)")
    s.add_argument("--workers", type=int, default=2,
                   help="threads reading ahead and writing behind (default 2); where the model's threads take "
                        "every core, they run between its forward passes")
    s.set_defaults(func=cmd_predict)
    return s


def _is_own_output(path: Path, out: Path) -> bool:
    """A result an earlier run wrote under ``out`` (never an input, even when ``out`` is the input folder)."""
    return path.parent.resolve().is_relative_to(out) and \
        any(path.name.endswith(f"_{kind}.png") for kind in OUTPUTS)


def expand_inputs(inputs: list[str], out: Path | None = None) -> tuple[list[Path], list[str]]:
    """(existing files to process, one error per input that names nothing). An existing path is a path even
    when its name holds glob characters; results under ``out`` are skipped; a file named twice is done once."""
    out = Path(out).resolve() if out is not None else None
    files, errors, seen = [], [], set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen and not (out is not None and _is_own_output(path, out)):
            seen.add(key)
            files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not (out is not None and _is_own_output(p, out)))
            if not found:
                errors.append(f"{item}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for p in found:
                add(p)
        elif path.exists():
            add(path)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                errors.append(f"{item}: no file matches")
            for p in found:
                add(p)
        else:
            errors.append(f"{item}: no such file or folder")
    return files, errors


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
    """An H x W (8/16-bit) or H x W x 3 RGB array as a PNG file, atomically (``inference/png.py``); a result an
    earlier run left there is swapped out rather than renamed over (``files.atomic_write``'s ``recomputable``)."""
    from ..files import atomic_write
    from ..inference.png import encode_png

    atomic_write(path, encode_png(array), recomputable=True)


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

    check_device(args.device, what="--device")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be at least 1 and --workers at least 0")
    if args.check_agreement and args.precision == "fp32" and not args.compile:
        raise UsageError("--check-agreement has nothing to compare at fp32 without --compile: it compares "
                         "--precision bf16/fp16 or --compile with fp32")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is an existing file, not a folder; name a folder (it is created)")
    return out


# How much lower the reading and writing threads run than the model's when they run beside a CPU model that
# leaves some cores free (``model_takes_every_core`` false): a decode or encode that preempts one of its OpenMP
# threads stalls all of them at the next barrier. 48 JPEGs on 2 Zen 5 cores, helpers beside the model
# (benchmarks/predict_throughput.py's folder, 6 interleaved runs each): 1.54 s median at the same priority, 1.24 s
# at +10, 1.22 s at +19; +10 leaves them a fair share when other programs compete for the cores. Between forward
# passes the model waits for them: they keep the ordinary priority (10 runs each: 0.715 s at +0, 0.755 s at +10).
HELPER_NICENESS = 10


def _lower_this_thread() -> None:
    try:  # on Linux the nice value is per thread (who=0: the calling thread); a hint, never an error
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + HELPER_NICENESS))
    except OSError:
        pass


def helper_pool(workers: int, name: str, below_model: bool) -> ThreadPoolExecutor:
    """Threads for reading or writing; ``below_model``: at a lower priority than the model's threads (Linux
    only: elsewhere the nice value is per process, and lowering it would slow the model too)."""
    lower = below_model and sys.platform == "linux"
    return ThreadPoolExecutor(max(1, workers), thread_name_prefix=f"segtorch-{name}",
                              initializer=_lower_this_thread if lower else None)


def model_takes_every_core(device) -> bool:
    """Whether the model's forward passes keep every core this process may use busy: on the CPU with as many
    threads as cores. Helpers then read and write between forward passes, not during them: one that preempts
    an OpenMP thread stalls the others at the next barrier (2 Zen 5 cores, 48 JPEGs, 8 interleaved runs each:
    0.71 s against 0.75 s beside them at +10)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return torch.device(device).type == "cpu" and torch.get_num_threads() >= cores


class _Writer:
    """Renders and writes one image's results on worker threads; ``done()`` says how many were written. At
    most ``max_pending`` images wait to be written: past that, ``submit`` waits for the oldest, so a disk
    slower than the model holds up the model instead of filling the memory with results."""

    def __init__(self, seg, out: Path, outputs: list[str], workers: int, max_pending: int, below_model: bool):
        self.seg, self.out, self.outputs, self.max_pending = seg, out, outputs, max(1, max_pending)
        self.pool = helper_pool(workers, "write", below_model=below_model)
        self.pending: list[tuple[Path, Future]] = []
        self._unfinished = 0  # pending[:_unfinished] have finished

    def drain(self) -> None:
        """Wait until every write submitted so far has finished (errors are reported by ``done()``)."""
        while self._unfinished < len(self.pending):
            self.pending[self._unfinished][1].exception()
            self._unfinished += 1

    def submit(self, path: Path, name: str, image, labels, confidence) -> None:
        if len(self.pending) >= self.max_pending:  # writes finish in about the order they were submitted
            wait([self.pending[-self.max_pending][1]])  # (its error, if any, is reported by done())
        self.pending.append((path, self.pool.submit(self._write, name, image, labels, confidence)))

    def _write(self, name: str, image, labels, confidence) -> None:
        import numpy as np

        from ..inference.render import blend

        seg, base = self.seg, self.out / name
        base.parent.mkdir(parents=True, exist_ok=True)
        mask = seg.colorize(labels) if {"color", "overlay"} & set(self.outputs) else None  # made once for both
        pictures = {
            "labels": lambda: labels.astype(np.uint8 if seg.card.num_classes <= 256 else np.uint16),
            "color": lambda: mask,
            "overlay": lambda: blend(image, mask),
            "scores": lambda: np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8),
            "legend": lambda: seg.legend(labels),
        }
        for kind in self.outputs:
            write_png(pictures[kind](), base.with_name(f"{base.name}_{kind}.png"))

    def done(self, report) -> int:
        written = 0
        for path, future in self.pending:
            try:
                future.result()
                written += 1
            except (OSError, SegtorchError) as e:
                report(path, e)
        self.pool.shutdown()
        return written


def cmd_predict(args) -> int:
    from .process_tuning import tune_own_process

    tune_own_process()  # before torch loads libgomp (the option checks import torch)
    from tqdm import tqdm

    import torch

    from .. import load
    from ..registry import model_card
    from ..segmenter import Segmenter, prepare_image

    outputs = _parse_outputs(args)
    out = _check_options(args)
    files, errors = expand_inputs(args.inputs, out)
    for e in errors:
        print(f"segtorch: error: {e}", file=sys.stderr)
    if not files:
        return 1
    names = output_names(files)
    name = args.model or _default_model()
    card = model_card(name)
    between_forwards = model_takes_every_core(args.device)
    # helpers that run beside a CPU model yield to it; between its forward passes the model waits for them
    below_model = torch.device(args.device).type == "cpu" and not between_forwards
    importlib.import_module("segtorch.inference.image")  # OpenCV: imported once here, not by each reader
    readers = helper_pool(args.workers, "read", below_model=below_model)
    ahead = max(2, 2 * args.workers) + args.batch_size
    queue: deque = deque()
    items = iter(zip(files, names))
    prepare = functools.partial(prepare_image, card)  # the card is enough: no model needed to read

    def read_ahead(limit: int = ahead) -> None:
        while len(queue) < limit:
            item = next(items, None)
            if item is None:
                break
            queue.append((item, readers.submit(prepare, item[0])))

    t0 = time.perf_counter()
    # the first batch and the queue behind it are read while the model loads, on the core loading leaves idle
    # (the demo model: ~0.2 s, 12 of its 640x480 JPEGs read in ~40 ms; the first forward pass waited ~20 ms)
    read_ahead(ahead + args.batch_size)
    try:
        seg = load(name, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
                   compile=args.compile, runtime=args.runtime)
        # start-up, not per image: the modules the pipeline uses (the PNG encoder's ISA-L among them) are
        # imported with the model, not by the first images' threads
        for module in ("png", "predictor", "render", "resize_argmax"):
            importlib.import_module(f"segtorch.inference.{module}")
    except BaseException:
        readers.shutdown(cancel_futures=True)
        raise
    reference = None
    if args.check_agreement and (args.precision != "fp32" or args.compile):
        reference = Segmenter(seg.model, seg.card, device=seg.device)  # same weights, fp32, not compiled
    created = _missing_folders(out)
    out.mkdir(parents=True, exist_ok=True)  # here, so that a folder that cannot be made fails before any work
    print(f"{seg.card.name}: loaded in {time.perf_counter() - t0:.1f}s; writing to {out}/", file=sys.stderr)
    t_start = time.perf_counter()
    failed, agree, total = 0, 0, 0
    bar = tqdm(total=len(files), unit="img", disable=not sys.stderr.isatty() or len(files) < 2)

    def report(path: Path, e: BaseException) -> None:
        nonlocal failed
        failed += 1
        message = str(e) if str(path) in str(e) else f"{path}: {e}"
        tqdm.write(f"segtorch: error: {message}", file=sys.stderr)

    want_scores = "scores" in outputs
    # results waiting to be written: 4 batches (~2 MB each at 640x480)
    writer = _Writer(seg, out, outputs, args.workers, max_pending=4 * args.batch_size, below_model=below_model)
    batch: list = []

    def run_batch() -> None:
        nonlocal agree, total
        if not batch:
            return
        import torch

        size = batch[0][2].shape[:2]
        if between_forwards:  # the reads queued so far and the writes so far, then the model alone
            wait([future for _, future in queue])
            writer.drain()
        results = seg.predict_prepared(torch.cat([b[3] for b in batch]), size, tta=args.tta, mode=args.mode,
                                       return_scores=want_scores)
        for (path, out_name, image, _), result in zip(batch, results):
            labels, confidence = result if want_scores else (result, None)
            if reference is not None:
                ref = reference.predict(image, tta=args.tta, mode=args.mode)
                agree += int((ref == labels).sum())
                total += labels.size
            writer.submit(path, out_name, image, labels, confidence)
        bar.update(len(batch))
        batch.clear()

    interrupted = False
    try:
        while True:
            read_ahead()
            if not queue:
                break
            (path, out_name), future = queue.popleft()
            try:
                image, x = future.result()
            except (OSError, SegtorchError) as e:  # this input is unusable; a bug keeps its traceback
                report(path, e)
                bar.update(1)
                continue
            if batch and (image.shape != batch[0][2].shape or len(batch) >= args.batch_size):
                run_batch()
            batch.append((path, out_name, image, x))
        run_batch()
    except KeyboardInterrupt:  # the results handed to the writers are still written, then counted
        interrupted = True
    finally:
        readers.shutdown(cancel_futures=True)
        written = writer.done(report)
        bar.close()
        if not written:  # no result: the folders this run made are not left behind, empty
            _remove_empty(out, created)
    if interrupted:
        where = f"; their results are in {out}/" if written else ""
        print(f"segtorch: interrupted: {written} of {len(files) + len(errors)} inputs segmented{where}",
              file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t_start
    print(f"{written} of {len(files) + len(errors)} inputs segmented in {seconds:.2f}s "
          f"({written / max(seconds, 1e-9):.2f} images/s)", file=sys.stderr)
    if reference is not None and total:
        print(f"label agreement with fp32: {100.0 * agree / total:.3f}% of {total} pixels", file=sys.stderr)
    return 1 if failed or errors else 0
