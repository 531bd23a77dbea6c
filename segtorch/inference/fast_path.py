"""The Segmenter's private inference module (``fast_module``), and which speed-ups it has by default, per
backbone, and why.

Both are exact in real arithmetic and differ from the toolbox only in float32 rounding; each is on only where
``benchmarks/fast_path.py`` measured it faster and no further from the float64 answer than twice the toolbox's
own float32 error, or 1e-5 (a few float32 roundings) where the toolbox's is smaller than that; the parity tests
hold every checkpoint to that:
- ``fuse_bn``: BatchNorm folded into the convolution before it (one op and one pass over memory fewer);
  measured at 1.25-2.05x the toolbox's error (1e-7 to 3e-7 on the parity inputs), on for every backbone.
  With it, the pyramid pooling module's bottleneck is split (``models.decoders.pyramid_pooling.SplitBottleneckConv``: the
  pooled branches' share of its 3x3 convolution computed at their own scale): 21-23% less time per crop on
  PSPNet R-50-D8, AVX-512 and AVX2 kernels alike, no further from float64;
- ``channels_last``: convolutions in NHWC layout (oneDNN's faster kernels on the CPU, cuDNN's on GPUs; ~18%
  less convolution time on ResNet-50-D8): 2.0-2.3x the toolbox's error on ResNet (5e-7, far under 1e-5), on;
  off for HRNet, whose dozen sums of four upsampled branches put it at 2.3x here (issue 17 measured 5.6e-4,
  15x the toolbox, on other random weights); off for the transformers (their trunks have no convolutions).
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn

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


class ChannelsLast(nn.Module):
    """Runs ``model`` on NHWC inputs: oneDNN's and cuDNN's faster convolution layout (same results to
    rounding). The model's weights are converted once, here (a no-op for those already folded into
    channels-last tensors)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def private_copy(model: nn.Module) -> nn.Module:
    """``model``'s module tree anew over the same tensors: new Parameter objects (``requires_grad=False``) that
    share their storage, the same buffers. Rewriting the copy (folding, layout, dtype) replaces its tensors and
    leaves ``model`` as it is, and only the rewritten tensors take new memory."""
    memo: dict[int, object] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        memo[id(t)] = nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, nn.Parameter) else t
    return copy.deepcopy(model, memo)


def store_convolutions_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its convolution weights (and biases) stored in ``dtype``, changed in place: autocast would
    cast them to it on every call (same values, so the same outputs); everything else (norms, softmax, the
    scores) stays float32 as autocast keeps it."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return model


def fast_module(model: nn.Module, *, fuse_bn: bool, channels_last: bool, dtype: torch.dtype | None = None,
                in_place: bool = False) -> nn.Module:
    """The module ``predict``/``logits`` run for the network ``model`` (eval mode): BatchNorm folded and pyramid
    pooling bottlenecks split (``fuse_bn``), NHWC (``channels_last``), convolution weights stored in ``dtype``
    (bf16/fp16 autocast). ``in_place``: ``model`` itself may be rewritten (``load`` owns its model: no second
    set of module objects); else ``model`` is left unchanged and the result shares every tensor it does not
    rewrite (``private_copy``, in eval mode). Nothing to rewrite (also a module without tensors, such as
    onnxruntime's, which may hold what cannot be copied): ``model`` itself."""
    has_tensors = any(True for _ in itertools.chain(model.parameters(), model.buffers()))
    if not has_tensors or not (fuse_bn or channels_last or dtype is not None):
        return model
    fast = model if in_place else private_copy(model).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if fuse_bn:
        from ..models.decoders.pyramid_pooling import split_pyramid_bottlenecks
        from .fuse import fold_batchnorm

        # folded straight into the layout the model runs in: one pass over the weights, not two
        fold_batchnorm(fast, memory_format=memory_format)
        split_pyramid_bottlenecks(fast, memory_format)
    if dtype is not None:
        store_convolutions_in(fast, dtype)
    return ChannelsLast(fast) if channels_last else fast
