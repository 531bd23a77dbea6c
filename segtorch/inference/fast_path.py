"""Which inference speed-ups ``load`` turns on by default, per backbone, and why.

Both are exact in real arithmetic and differ from the toolbox only in float32 rounding; each is on only where
``benchmarks/fast_path.py`` measured it both faster and no further from the float64 answer than twice the
toolbox's own float32 error (the parity tests hold every checkpoint to that):
- ``fuse_bn``: BatchNorm folded into the convolution before it (one op and one pass over memory fewer);
- ``channels_last``: convolutions in NHWC layout (oneDNN's faster kernels on the CPU, cuDNN's on GPUs).
Transformers fold only their heads' BatchNorms.
"""
from __future__ import annotations

# backbone type -> (fuse_bn, channels_last); measured with benchmarks/fast_path.py (see README, Benchmarks)
DEFAULTS: dict[str, tuple[bool, bool]] = {
    # channels-last measured at 2.0-2.3x the toolbox's error on ResNet and HRNet (oneDNN sums in another order),
    # folding at 1.25-1.35x: folding only
    "ResNet": (True, False),
    "ResNeSt": (True, False),
    "HRNet": (True, False),
    "VisionTransformer": (True, False),  # folds the heads' ConvNormAct only
    "SwinTransformer": (True, False),
}


def fast_path_defaults(backbone_type: str | None, precision: str = "fp32") -> tuple[bool, bool]:
    """(fuse_bn, channels_last) for a backbone type; an unknown backbone gets neither. At bf16/fp16 the
    convolutions' own rounding (~1e-3) dwarfs the layout's, and oneDNN's reduced-precision kernels are
    ~20% faster in channels-last: convolutional backbones run channels-last there."""
    fuse, channels_last = DEFAULTS.get(backbone_type or "", (False, False))
    if precision != "fp32" and backbone_type in ("ResNet", "ResNeSt", "HRNet"):
        channels_last = True
    return fuse, channels_last
