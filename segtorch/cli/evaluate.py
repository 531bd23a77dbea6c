"""``segtorch eval`` and ``benchmarks/reproduce.py``: reproduce the cards' mIoU.

    reproduce NAME|PATTERN|--all --data-root DIR [--checkpoint PATH] [--tta] [--limit N] [--device D]
              [--json OUT] [--markdown OUT] [--split S] [--workers N] [--batch-size N]

``--data-root`` is the dataset's top folder as downloaded (``.../ADEChallengeData2016``), or, for a pattern
or ``--all``, a folder holding several (``~/data`` with ``ADEChallengeData2016/``, ``cityscapes/``,
``VOCdevkit/VOC2012`` ...); models whose dataset is not there are skipped. Each model is evaluated with its
card's own test pipeline (``--tta``: the card's multi-scale + flip settings) and its per-class IoU and
mIoU are printed beside the card's reported figure. Errors are one line; the exit status is non-zero.

Under torchrun (``torchrun --nproc-per-node N -m segtorch.cli eval ...``) each process evaluates every
N-th image, the per-class counts are summed over the processes (no prediction maps travel), and the first
process alone prints and writes the report, whose JSON records ``"world_size"``.
"""
from __future__ import annotations

import argparse
import sys

from ..argtypes import PRECISIONS, nonnegative_int, positive_int
from ..errors import UsageError

# torch, numpy and the datasets are imported when a command runs, not when the CLI builds its parser


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("models", nargs="*", metavar="NAME|PATTERN", help="model names or fnmatch patterns ('isnet_*')")
    p.add_argument("--all", action="store_true", help="every model whose dataset is under --data-root")
    p.add_argument("--data-root", help="the dataset's top folder (or a folder holding datasets); optional for the "
                                       "demo model, whose evaluation set is generated")
    p.add_argument("--checkpoint", help="weights to evaluate instead of the card's (one model only)")
    p.add_argument("--runtime", choices=("onnxruntime", "openvino"),
                   help="what runs an exported .onnx --checkpoint (default onnxruntime)")
    p.add_argument("--tta", action="store_true", help="the card's multi-scale + flip settings")
    p.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    p.add_argument("--split", help="dataset split (default: the split the card reports on)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default): within 2x the toolbox's float32 error (--exact: its computation); "
                        "bf16/fp16 are faster (the fp32 run is repeated to print their accuracy cost)")
    p.add_argument("--exact", action="store_true",
                   help="the toolbox's own computation step for step (its label maps; slower): no fast path")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON (and Markdown beside it, .md)")
    p.add_argument("--markdown", metavar="OUT", help="where to write the Markdown table (default: beside --json)")
    p.add_argument("--workers", type=nonnegative_int, default=2,
                   help="processes reading and preprocessing images ahead (default 2)")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="whole mode: consecutive images of one size per forward pass (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def select_models(patterns: list[str], everything: bool) -> list[str]:
    from ..registry import list_models, resolve_name

    if everything:
        if patterns:
            raise UsageError("give model names/patterns or --all, not both")
        return list_models()
    if not patterns:
        raise UsageError("name a model (or a pattern such as 'isnet_*', or --all)")
    names: list[str] = []
    for item in patterns:
        if any(ch in item for ch in "*?["):
            found = list_models(item)
            if not found:
                raise UsageError(f"no model matches {item!r}")
        else:
            found = [resolve_name(item)]  # unknown names raise with suggestions
        names += [n for n in found if n not in names]
    return names


def run(args: argparse.Namespace, out=None, err=None) -> int:
    from ..inference.precision import check_device
    from . import sharding

    out, err = out or sys.stdout, err or sys.stderr
    names = select_models(args.models, args.all)
    if args.device is not None:  # before any dataset is scanned or generated
        check_device(args.device, what="--device")
    shard = sharding.join(args.device)
    try:
        return _run(args, names, shard, out, err)
    finally:
        sharding.leave(shard)


def _run(args: argparse.Namespace, names: list[str], shard, out, err) -> int:
    import io

    import segtorch

    from ..data import DatasetError, dataset_class
    from ..evaluation.evaluator import write_results
    from ..evaluation.reproduce import evaluate_model

    if not shard.leader:  # the first process prints and writes the report
        out = err = io.StringIO()
    if args.checkpoint and len(names) > 1:
        raise UsageError(f"--checkpoint applies to one model; {len(names)} selected")
    explicit = len(names) == 1 and not args.all
    cards = [segtorch.model_card(n) for n in names]
    if args.data_root is None:
        if not all(c.dataset == "shapes" for c in cards):
            raise UsageError("--data-root is required (the dataset's top folder as downloaded)")
        from ..data.datasets import Shapes
        from ..downloads import home

        root = home() / "data" / "shapes"
        if shard.leader:
            Shapes.generate(root)  # deterministic: the shipped set
        if shard.world_size > 1:  # the others wait until it is written
            import torch.distributed

            torch.distributed.barrier()
        args.data_root = str(root)
    roots = {}
    for card in cards:  # where each selected dataset is (once per dataset)
        if card.dataset not in roots:
            cls = dataset_class(card.dataset)
            roots[card.dataset] = cls.find_root(args.data_root)
            if roots[card.dataset] is None and explicit:
                cls.locate(args.data_root)  # raises the one-line layout error
    if not any(roots.values()):
        if len(roots) == 1:  # one dataset: say what is wrong with the folder
            dataset_class(next(iter(roots))).locate(args.data_root)
        raise DatasetError(f"{args.data_root}: none of the selected models' datasets is there")
    for key, root in roots.items():
        if root is None:
            skipped = [c.name for c in cards if c.dataset == key]
            print(f"skipped {len(skipped)} {key} model(s): no {dataset_class(key).title} under {args.data_root}",
                  file=err)
    results = []
    progress = False if args.no_progress else None
    for card in cards:
        if roots[card.dataset] is None:
            continue
        result = evaluate_model(card.name, args.data_root, checkpoint=args.checkpoint, tta=args.tta,
                                limit=args.limit, split=args.split, device=shard.device, precision=args.precision,
                                exact=args.exact, workers=args.workers, batch_size=args.batch_size,
                                progress=progress, distributed=shard.world_size > 1, runtime=args.runtime)
        print(result.table(), file=out, flush=True)
        print(f"{result.num_images} images in {result.seconds:.2f}s "
              f"({result.num_images / max(result.seconds, 1e-9):.2f} images/s)", file=out, flush=True)
        if args.precision != "fp32":  # what the faster precision costs, measured on the same images
            exact = evaluate_model(card.name, args.data_root, checkpoint=args.checkpoint, tta=args.tta,
                                   limit=args.limit, split=args.split, device=shard.device, precision="fp32",
                                   workers=args.workers, batch_size=args.batch_size, progress=progress,
                                   distributed=shard.world_size > 1)
            print(f"accuracy cost of {args.precision}: mIoU {result.miou:.2f} vs fp32 {exact.miou:.2f} "
                  f"({result.miou - exact.miou:+.2f})", file=out, flush=True)
        print(file=out)
        results.append(result)
    if len(results) > 1:
        width = max(len(r.name) for r in results)
        print(f"{'model':<{width}}  {'mIoU':>6}  {'reported':>8}  {'delta':>6}", file=out)
        for r in results:
            rep = f"{r.reported:.2f}" if r.reported is not None else "-"
            delta = f"{r.delta():+.2f}" if r.delta() is not None else ("subset" if r.subset else "-")
            print(f"{r.name:<{width}}  {r.miou:6.2f}  {rep:>8}  {delta:>6}", file=out)
    if not shard.leader:
        return 0
    if args.json:
        json_path, md_path = write_results(results, args.json, args.markdown)
        print(f"wrote {json_path} and {md_path}", file=out)
    elif args.markdown:
        from pathlib import Path

        from ..files import atomic_write

        atomic_write(Path(args.markdown).expanduser(), "\n".join(r.markdown() for r in results))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("eval", help="evaluate a model on a dataset (mIoU vs the card)",
                              description="Evaluate models with their cards' test pipelines on a dataset as "
                                          "downloaded; prints per-class IoU and mIoU beside the reported figure.")
    add_arguments(s)
    s.set_defaults(func=run)
    return s


def main(argv=None, prog: str = "reproduce.py") -> int:
    """``benchmarks/reproduce.py``: the same as ``segtorch eval``, with the same error handling."""
    from .guard import run_guarded

    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    return run_guarded(run, args, prog)
