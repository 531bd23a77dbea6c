"""`segtorch predict` over a folder against the model's own forward passes, side by side in one run, on a zoo
architecture at its card's test size (random weights) and on the demo model.

    python benchmarks/predict_throughput.py [--models pspnet_resnet50os8_ade20k,demo_pspnet_shapes]
                                            [--images 8] [--size WxH] [--threads N] [--workers 2]
                                            [--batch-size 4] [--outputs labels,color,overlay] [--repeat 3]
                                            [--device cpu]

For each model: writes --images synthetic JPEGs (seeded shapes over noise) at the card's test size (the short
side its test-time resize keeps, square: 512x512 for ADE20K; --size to choose), saves seeded random weights,
runs the command on the folder in a fresh process (labels, colour map and overlay for each) and reads the time
it reports beyond start-up and loading. Then, in this process, times the same model's forward passes alone over
the same preprocessed images in the same batches (after one warm-up batch). Both are repeated --repeat times,
interleaved, and the medians compared. "kept" = forwards / command: the share of the forward passes' speed the
whole command keeps (goal on a zoo architecture: at least 0.9). 1 - kept bounds what any further optimisation
of reading, rendering and writing could gain. With ``--device cuda`` both sides run there, the forwards timed to
the GPU's completion.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from segtorch.argtypes import int_pair, nonnegative_int, positive_int
from segtorch.errors import SegtorchError
from segtorch.inference.precision import check_device

ROOT = Path(__file__).resolve().parents[1]
MODELS = "pspnet_resnet50os8_ade20k,demo_pspnet_shapes"


def write_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    w, h = size
    paths = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            box = [x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))]
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
        paths.append(folder / f"img{i:03d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def test_size(name: str) -> tuple[int, int]:
    """W x H of a square image the card's test-time resize leaves as it is (its short side's target)."""
    import segtorch

    side = min(segtorch.model_card(name).preprocess.output_size)
    return side, side


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_timer(seg, paths: list[Path], batch_size: int, device: torch.device):
    """A function timing the model's forward passes alone over the preprocessed images, batched as the
    command batches them and already on ``device`` (after one warm-up batch)."""
    prepared = [seg.prepare(p)[1] for p in paths]
    batches = [torch.cat(prepared[i:i + batch_size]).to(device) for i in range(0, len(prepared), batch_size)]
    with torch.inference_mode(), seg._autocast():
        seg._forward(batches[0])

    def seconds() -> float:
        with torch.inference_mode(), seg._autocast():
            synchronize(device)
            t0 = time.perf_counter()
            for b in batches:
                seg._forward(b)
            synchronize(device)
            return time.perf_counter() - t0
    return seconds


def measure(name: str, args, device: torch.device, tmp: Path) -> dict:
    import segtorch
    from segtorch.testing import seeded_state_dict

    w, h = args.size or test_size(name)
    folder = tmp / name / "images"
    folder.mkdir(parents=True)
    paths = write_images(folder, args.images, (w, h))
    checkpoint = tmp / name / "weights.pth"
    torch.save({"model": seeded_state_dict(segtorch.create_model(name).state_dict())}, checkpoint)
    seg = segtorch.load(name, checkpoint=str(checkpoint), device=device)
    forwards_once = forward_timer(seg, paths, args.batch_size, device)
    # the command as users run it (`python -m segtorch` = the `segtorch` script), its threads set by
    # OMP_NUM_THREADS
    cmd = [sys.executable, "-m", "segtorch", "predict", str(folder), "--model", name, "--checkpoint",
           str(checkpoint), "--out", str(tmp / name / "out"), "--outputs", args.outputs, "--workers",
           str(args.workers), "--batch-size", str(args.batch_size), "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    commands, forwards = [], []
    for _ in range(args.repeat):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            sys.exit(f"the command failed:\n{res.stderr}")
        # the seconds it prints (2 decimals), or where they are few, from its images per second: the more
        # significant digits of the two
        match = re.search(r"(\d+) of (\d+) inputs segmented in ([\d.]+)s \(([\d.]+) images/s\)", res.stderr)
        seconds = float(match.group(3))
        commands.append(seconds if seconds >= 10 else int(match.group(1)) / float(match.group(4)))
        forwards.append(forwards_once())
    return {"name": name, "size": (w, h), "commands": commands, "forwards": forwards}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS, help=f"comma-separated model names (default {MODELS})")
    ap.add_argument("--images", type=positive_int, default=8)
    ap.add_argument("--size", type=int_pair, help="W x H (default: each card's test size)")
    ap.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=nonnegative_int, default=2)
    ap.add_argument("--batch-size", type=positive_int, default=4)
    ap.add_argument("--outputs", default="labels,color,overlay")
    ap.add_argument("--repeat", type=positive_int, default=3, help="runs of each, interleaved; medians compared")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both sides)")
    args = ap.parse_args()
    try:
        device = check_device(args.device, what="--device")
        from segtorch.registry import resolve_name

        names = [resolve_name(n.strip()) for n in args.models.split(",") if n.strip()]
    except (ValueError, SegtorchError) as e:  # UsageError is both
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    from segtorch.inference.precision import describe_cpu

    print(f"CPU: {describe_cpu()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(f"{args.images} images per model on {device}, outputs {args.outputs}, {args.threads} threads, "
          f"{args.workers} workers, batch {args.batch_size}, {args.repeat} interleaved runs each")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = measure(name, args, device, Path(tmp))
            command, forward = statistics.median(r["commands"]), statistics.median(r["forwards"])
            print(f"{name} at {r['size'][0]}x{r['size'][1]}:")
            print(f"  command beyond start-up: {command:.3f} s median ({args.images / command:.2f} images/s; "
                  f"runs {', '.join(f'{c:.3f}' for c in r['commands'])})")
            print(f"  forward passes alone:    {forward:.3f} s median (runs "
                  f"{', '.join(f'{f:.3f}' for f in r['forwards'])})")
            print(f"  kept: forwards / command = {forward / command:.3f}", flush=True)


if __name__ == "__main__":
    main()
