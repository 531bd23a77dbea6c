"""Which inference speed-ups ``load`` turns on by default, per backbone, and why.

Both are exact in real arithmetic and differ from the toolbox only in float32 rounding; each is on only where
``benchmarks/fast_path.py`` measured it faster and no further from the float64 answer than twice the toolbox's
own float32 error, or 1e-5 (a few float32 roundings) where the toolbox's is smaller than that; the parity tests
hold every checkpoint to that:
- ``fuse_bn``: BatchNorm folded into the convolution before it (one op and one pass over memory fewer);
  measured at 1.25-2.05x the toolbox's error (1e-7 to 3e-7 on the parity inputs), on for every backbone.
  With it, the pyramid pooling module's bottleneck is split (``models.heads.psp.SplitBottleneckConv``: the
  pooled branches' share of its 3x3 convolution computed at their own scale): 21-23% less time per crop on
  PSPNet R-50-D8, AVX-512 and AVX2 kernels alike, no further from float64;
- ``channels_last``: convolutions in NHWC layout (oneDNN's faster kernels on the CPU, cuDNN's on GPUs; ~18%
  less convolution time on ResNet-50-D8): 2.0-2.3x the toolbox's error on ResNet (5e-7, far under 1e-5), on;
  off for HRNet, whose dozen sums of four upsampled branches put it at 2.3x here (issue 17 measured 5.6e-4,
  15x the toolbox, on other random weights); off for the transformers (their trunks have no convolutions).
"""
from __future__ import annotations

# a card's architecture.backbone.name -> (fuse_bn, channels_last); measured with benchmarks/fast_path.py
# (see README, Benchmarks)
DEFAULTS: dict[str, tuple[bool, bool]] = {
    "resnet": (True, True),
    "resnest": (True, True),
    "hrnet": (True, False),
    "vit": (True, False),  # folds the heads' ConvNormAct only
    "swin": (True, False),
}


def fast_path_defaults(backbone: str, precision: str = "fp32") -> tuple[bool, bool]:
    """(fuse_bn, channels_last) for a card's backbone name (``architecture.backbone.name``). At bf16/fp16 the
    convolutions' own rounding (~1e-3) dwarfs the layout's, and oneDNN's reduced-precision kernels are
    ~20% faster in channels-last: HRNet runs channels-last there too."""
    fuse, channels_last = DEFAULTS[backbone]  # a backbone without measured defaults is a bug: add it above
    if precision != "fp32" and backbone == "hrnet":
        channels_last = True
    return fuse, channels_last
