"""Parity-test helpers: the odd-sized inputs and where the recorded outputs live. The seeded weights and the
toolbox's reference segmentor are ``segtorch.testing``'s (re-exported here for the tests)."""
from __future__ import annotations

from pathlib import Path

from segtorch.testing import (UPSTREAM_DIR, reference_logits, reference_segmentor, relative_error,  # noqa: F401
                              seeded_input, seeded_state_dict, seeded_tensor, upstream_configs)

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "parity"


# odd sizes everywhere; transformers get a second size that forces position-embedding resizing and window padding
CNN_INPUTS = [(1, 3, 97, 75)]
TRANSFORMER_INPUTS = [(1, 3, 97, 75), (1, 3, 131, 99)]


def input_shapes(name: str) -> list[list[int]]:
    kind = upstream_configs()[name]["segmentor_cfg"]["backbone"]["type"]
    shapes = TRANSFORMER_INPUTS if kind in ("VisionTransformer", "SwinTransformer") else CNN_INPUTS
    return [list(s) for s in shapes]
