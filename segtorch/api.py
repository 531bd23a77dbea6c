"""The top-level functions: build a model by name, load weights into it, convert legacy checkpoints."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import (CheckpointError, ConversionReport, convert_checkpoint, load_for_model, meta_model,
                         optional_keys)
from .registry import ModelCard, model_card

if TYPE_CHECKING:
    from .segmenter import Segmenter


def create_model(name: str, *, auxiliary: bool = False, device: str | torch.device | None = None) -> torch.nn.Module:
    """The architecture of checkpoint ``name`` with random weights (no download), in eval mode.

    ``auxiliary=True`` also builds the training-only auxiliary head(s), for fine-tuning.
    """
    from .models.builder import build_segmentation_model

    card = model_card(name)
    with torch.device(device or "cpu"):
        model = build_segmentation_model(card.architecture, auxiliary=auxiliary)
    return model.eval()


def _materialise(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    for key in optional_keys(model):  # BatchNorm step counters carry no learned value
        state.setdefault(key, torch.zeros((), dtype=torch.long))
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (index tables) are not in any file: let their modules compute them
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "reset_buffers"):
                raise RuntimeError(f"{type(module).__name__} has uninitialised buffers and no reset_buffers()")
            module.reset_buffers()
    return model


def _is_url(checkpoint) -> bool:
    return str(checkpoint).startswith(("http://", "https://"))


def _resolve_checkpoint(card: ModelCard, checkpoint: str | os.PathLike | None) -> Path:
    if checkpoint is not None:
        if _is_url(checkpoint):
            from .checkpoint import check_format
            from .downloads import download

            return download(str(checkpoint), validate=check_format)  # a web page or a cut file is not cached
        return Path(checkpoint).expanduser()
    from .weights import fetch_weights

    return fetch_weights(card)


def model_with_weights(card: ModelCard, checkpoint: str | os.PathLike | None = None, *, auxiliary: bool = False,
                       path: Path | None = None) -> tuple[torch.nn.Module, Path]:
    """``(model, weights file)``: the card's architecture with the checkpoint's weights (the card's own by
    default), float32 whatever the file stores, eval mode, unfused and NCHW: the toolbox's layout. ``path``: the
    already resolved file of ``checkpoint``."""
    path = path or _resolve_checkpoint(card, checkpoint)
    model = meta_model(card, auxiliary)
    try:
        state, _ = load_for_model(path, model, keep=("auxiliary_decoder.",) if auxiliary else ())
    except CheckpointError as e:
        if checkpoint is not None and _is_url(checkpoint):
            # downloaded whole but unusable (a page that looked like a checkpoint, another model's file): never
            # keep it, so that the next run fetches it again
            from .downloads import forget

            forget(str(checkpoint))
            raise CheckpointError(f"{e}; the download was removed from the cache") from None
        raise
    # a file stored in fp16/bf16 must not make the model run in that dtype: reduced precision is autocast's job
    return _materialise(model, state).float().eval(), path


def load(name: str, checkpoint: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
         precision: str = "fp32", compile: bool = False, fuse_bn: bool | None = None,
         channels_last: bool | None = None, auxiliary: bool = False, runtime: str | None = None) -> "Segmenter":
    """A ready ``Segmenter`` for checkpoint ``name``: weights loaded (in float32, whatever the file stores),
    eval mode, on ``device``.

    ``checkpoint``: a local ``.pth``/``.safetensors`` file, an ``.onnx`` file from ``segtorch export`` (run by
    ``runtime``: onnxruntime by default, or "openvino"), or a URL; by default the card's weights are fetched
    (Hugging Face mirror first, then the GitHub release) and cached. ``precision="bf16"/"fp16"`` (autocast
    over float32 weights) and ``compile=True`` are opt-in speed; fp32 reproduces the toolbox's outputs.
    ``fuse_bn`` folds BatchNorm into the convolution before it, and splits the pyramid pooling bottleneck's
    convolution by its inputs (``seg.model``'s state dict then differs from the toolbox's layout);
    ``channels_last`` runs ``predict``/``logits`` in NHWC layout. These change only
    float32 rounding; None = the backbone's measured default (``segtorch.inference.fast_path``), and off
    with ``auxiliary`` (fine-tuning).
    """
    from .inference.fast_path import fast_path_defaults
    from .inference.precision import check_device, check_precision
    from .segmenter import Segmenter

    card = model_card(name)
    device = check_device(device)
    check_precision(device, precision)
    path = _resolve_checkpoint(card, checkpoint)
    if path.suffix.lower() == ".onnx" or runtime is not None:  # written by `segtorch export`: a runtime runs it
        from .inference.onnx_runtime import load_onnx_segmenter

        return load_onnx_segmenter(card, path, device, precision, compile, runtime)
    model, _ = model_with_weights(card, checkpoint, auxiliary=auxiliary, path=path)
    fuse_default, channels_last_default = fast_path_defaults(card.architecture["backbone"]["name"], precision)
    if fuse_bn is None:
        fuse_bn = not auxiliary and fuse_default
    if channels_last is None:
        channels_last = not auxiliary and channels_last_default
    if fuse_bn:
        from .inference.fuse import fold_batchnorm
        from .models.heads.psp import split_pyramid_bottlenecks

        # folded straight into the layout the model runs in: one pass over the weights, not two
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        fold_batchnorm(model, memory_format=memory_format)
        split_pyramid_bottlenecks(model, memory_format)
    return Segmenter(model.to(device), card, device=device, precision=precision, compile=compile,
                     channels_last=channels_last)


def convert(src: str | os.PathLike, dst: str | os.PathLike, name: str, *, auxiliary: bool = False
            ) -> ConversionReport:
    """Convert a legacy ``.pth`` (or re-check a ``.safetensors``) for model ``name`` into safetensors.

    The file is checked against the architecture (missing, unexpected or mis-shaped keys are refused by
    name) before anything is written; the output is written atomically with metadata (name, source sha256,
    segtorch version, what the conversion renamed and dropped).
    """
    return convert_checkpoint(src, dst, model_card(name), auxiliary=auxiliary)
