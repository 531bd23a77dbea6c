"""Reproduce the model cards' mIoU on a dataset as downloaded.

    python benchmarks/reproduce.py isnet_resnet101os8_ade20k --data-root ~/data/ADEChallengeData2016
    python benchmarks/reproduce.py 'pspnet_*' --data-root ~/data --tta --json results.json
    python benchmarks/reproduce.py --all --data-root ~/data --limit 100

NAME|PATTERN|--all --data-root DIR [--checkpoint PATH] [--tta] [--limit N] [--device D] [--json OUT]
(see ``--help``; ``segtorch eval`` is the same command). Downloads each card's checkpoint (cached),
evaluates it with the card's own test pipeline and prints per-class IoU and mIoU beside the reported figure.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing

from segtorch.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="reproduce.py"))
