"""What the pre-training data check (``segtorch.data.check_dataset``) costs, on generated samples of ADE20K's
typical size: your own folders (every mask decoded, its values checked) and a card dataset's layout (headers only).

    python benchmarks/data_check.py [--samples 300] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_samples(root: Path, count: int) -> None:
    """JPEG images and 8-class PNG masks of 512x683, the masks in rectangles as annotations are; linked into the
    ADE20K layout as well."""
    ade = root / "ADEChallengeData2016"
    for folder in ("images", "masks", *(f"{ade.name}/{k}/{s}" for k in ("images", "annotations")
                                        for s in ("training", "validation"))):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 256, (512, 683, 3), dtype=np.uint8)
        mask = np.zeros((512, 683), np.uint8)
        for _ in range(12):
            y, x = rng.integers(0, 512), rng.integers(0, 683)
            mask[y:y + rng.integers(20, 200), x:x + rng.integers(20, 200)] = rng.integers(0, 8)
        Image.fromarray(image).save(root / "images" / f"{i}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        os.link(root / "images" / f"{i}.jpg", ade / "images" / "training" / f"ADE_train_{i:08d}.jpg")
        os.link(root / "masks" / f"{i}.png", ade / "annotations" / "training" / f"ADE_train_{i:08d}.png")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2, help="threads of the check (segtorch train: its --workers + 1)")
    args = ap.parse_args()
    from segtorch.data import ADE20K, ImageFolderDataset, check_dataset

    print(f"cpu: {cpu_name()}, {len(os.sched_getaffinity(0))} usable cores, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_samples(root, args.samples)
        cases = (("your folders (masks decoded)", ImageFolderDataset(root / "images", root / "masks", num_classes=8)),
                 ("ADE20K layout (headers)", ADE20K(root, "train")))
        for name, dataset in cases:
            for workers in (0, args.workers):
                start = time.perf_counter()
                check_dataset(dataset, workers=workers)
                seconds = time.perf_counter() - start
                print(f"{name}, {workers} threads: {len(dataset)} samples in {seconds:.2f} s "
                      f"({1000 * seconds / len(dataset):.2f} ms per sample)")


if __name__ == "__main__":
    main()
