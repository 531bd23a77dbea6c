"""`segtorch eval` in one process against torchrun's N processes on the same machine, the threads split between
them, side by side in one run.

    python benchmarks/eval_scaling.py [--name pspnet_resnet50os8_ade20k] [--images 8] [--processes 2]
                                      [--threads N] [--repeat 3] [--device cpu]

Writes an ADE20K-layout validation set of --images seeded random 512x512 pictures and labels (the card's test
size) and seeded random weights, then runs, interleaved, --repeat times each:
  one process:  OMP_NUM_THREADS=<threads>  segtorch eval NAME ...
  torchrun:     OMP_NUM_THREADS=<threads / processes>  torchrun --nproc-per-node <processes> -m segtorch.cli eval ...
and compares the images per second each prints (time beyond start-up and loading), medians, as a ratio. Both
must print the same mIoU (checked). With ``--device cuda`` each torchrun process takes its own GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segtorch.argtypes import positive_int

ROOT = Path(__file__).resolve().parents[1]


def write_ade20k(root: Path, count: int, side: int = 512) -> Path:
    """``root/ADEChallengeData2016`` with ``count`` validation images and annotations (0 = unlabelled)."""
    top = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for i in range(count):
        stem = f"ADE_val_{i + 1:08d}"
        for folder, array, suffix in (("images", rng.integers(0, 255, (side, side, 3), dtype=np.uint8), "jpg"),
                                      ("annotations", rng.integers(0, 151, (side, side), dtype=np.uint8), "png")):
            path = top / folder / "validation" / f"{stem}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    return top


def run(cmd: list[str], threads: int) -> tuple[float, str]:
    """(seconds the command reports for its images, mIoU it prints)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    seconds = float(re.search(r"\d+ images in ([\d.]+)s", res.stdout).group(1))
    return seconds, re.search(r"mIoU ([\d.]+)", res.stdout).group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="pspnet_resnet50os8_ade20k", help="an ADE20K model")
    ap.add_argument("--images", type=positive_int, default=8)
    ap.add_argument("--processes", type=positive_int, default=2)
    ap.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, help="in all (default: cores)")
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import segtorch
    from segtorch.inference.precision import describe_cpu
    from segtorch.testing import seeded_state_dict

    if segtorch.model_card(args.name).dataset != "ade20k":
        ap.error(f"argument --name: {args.name} is not an ADE20K model")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_ade20k(Path(tmp), args.images)
        checkpoint = Path(tmp) / "weights.pth"
        torch.save({"model": seeded_state_dict(segtorch.create_model(args.name).state_dict())}, checkpoint)
        common = ["eval", args.name, "--data-root", str(root), "--checkpoint", str(checkpoint), "--device",
                  args.device, "--no-progress"]
        one = [sys.executable, "-m", "segtorch.cli", *common]
        many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(args.processes), "-m", "segtorch.cli", *common]
        split = max(1, args.threads // args.processes)
        singles, shared, mious = [], [], set()
        for _ in range(args.repeat):
            for cmd, threads, times in ((one, args.threads, singles), (many, split, shared)):
                seconds, miou = run(cmd, threads)
                times.append(seconds)
                mious.add(miou)
    print(f"CPU: {describe_cpu()}")
    print(f"{args.name}, {args.images} images 512x512 (random weights), device {args.device}, "
          f"{args.repeat} interleaved runs each")
    s, m = statistics.median(singles), statistics.median(shared)
    print(f"  1 process x {args.threads} threads:  {s:.2f} s median ({args.images / s:.3f} images/s; runs "
          f"{', '.join(f'{t:.2f}' for t in singles)})")
    print(f"  {args.processes} processes x {split} threads: {m:.2f} s median ({args.images / m:.3f} images/s; runs "
          f"{', '.join(f'{t:.2f}' for t in shared)})")
    print(f"  throughput ratio {args.processes} processes / 1: {s / m:.2f}; mIoU {'equal' if len(mious) == 1 else mious}")


if __name__ == "__main__":
    main()
