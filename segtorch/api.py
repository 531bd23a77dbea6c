"""The top-level functions: build a model by name, load weights into it, convert legacy checkpoints."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import (CheckpointError, ConversionReport, load_for_model, optional_keys, safetensors_metadata,
                         sha256_file, write_safetensors)
from .registry import ModelCard, model_card

if TYPE_CHECKING:
    from .segmenter import Segmenter

def create_model(name: str, *, auxiliary: bool = False, device: str | torch.device | None = None) -> torch.nn.Module:
    """The architecture of checkpoint ``name`` with random weights (no download), in eval mode.

    ``auxiliary=True`` also builds the training-only auxiliary head(s), for fine-tuning.
    """
    from .models.segmentor import build_segmentor

    card = model_card(name)
    with torch.device(device or "cpu"):
        model = build_segmentor(card.architecture, auxiliary=auxiliary)
    return model.eval()


def _meta_model(card: ModelCard, auxiliary: bool) -> torch.nn.Module:
    """Build on the meta device: no memory and no random initialisation that the weights would overwrite."""
    from .models.segmentor import build_segmentor

    with torch.device("meta"):
        return build_segmentor(card.architecture, auxiliary=auxiliary)


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


def _resolve_checkpoint(card: ModelCard, checkpoint: str | os.PathLike | None) -> Path:
    if checkpoint is not None:
        text = str(checkpoint)
        if text.startswith(("http://", "https://")):
            from .hub import download

            return download(text)
        return Path(checkpoint).expanduser()
    from .hub import fetch_weights

    return fetch_weights(card)


def load(name: str, checkpoint: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
         precision: str = "fp32", compile: bool = False, fuse_bn: bool | None = None,
         auxiliary: bool = False) -> "Segmenter":
    """A ready ``Segmenter`` for checkpoint ``name``: weights loaded, eval mode, on ``device``.

    ``checkpoint``: a local ``.pth``/``.safetensors``/``.onnx`` (from ``segtorch export``) file or a URL; by default the card's weights are fetched
    (Hugging Face mirror first, then the GitHub release) and cached. ``precision="bf16"/"fp16"`` and
    ``compile=True`` are opt-in speed; fp32 reproduces the toolbox's outputs. ``fuse_bn`` folds BatchNorm into
    the convolutions before it and runs ``predict``/``logits`` in channels-last layout (same outputs to ~1e-6,
    less work); by default on, except with ``auxiliary`` (fine-tuning); off keeps the module's state dict in the
    toolbox's layout.
    """
    from .inference.precision import check_precision
    from .segmenter import Segmenter

    card = model_card(name)
    device = torch.device(device)
    check_precision(device, precision)
    path = _resolve_checkpoint(card, checkpoint)
    if path.suffix.lower() == ".onnx":  # written by `segtorch export`: onnxruntime runs the forward passes
        from .inference.onnx_runtime import load_onnx_segmenter

        return load_onnx_segmenter(card, path, device, precision, compile)
    model = _meta_model(card, auxiliary)
    state, _ = load_for_model(path, model, keep=("auxiliary_decoder.",) if auxiliary else ())
    model = _materialise(model, state).eval()
    fast = fuse_bn if fuse_bn is not None else not auxiliary
    if fast:
        from .inference.fuse import fold_batchnorm

        fold_batchnorm(model)
    # the inference fast path also runs convolutions in channels-last layout (seg.model stays usable as is)
    return Segmenter(model.to(device), card, device=device, precision=precision, compile=compile,
                     channels_last=fast)


def convert(src: str | os.PathLike, dst: str | os.PathLike, name: str, *, auxiliary: bool = False
            ) -> ConversionReport:
    """Convert a legacy ``.pth`` (or re-check a ``.safetensors``) for model ``name`` into safetensors.

    The file is checked against the architecture (missing, unexpected or mis-shaped keys are refused by
    name) before anything is written; the output is written atomically with metadata (name, source sha256,
    segtorch version, what the conversion renamed and dropped).
    """
    card = model_card(name)
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: the destination is the source file; choose another path")
    model = _meta_model(card, auxiliary)
    state, report = load_for_model(src, model, keep=("auxiliary_decoder.",) if auxiliary else ())
    report.source_sha256 = report.source_sha256 or sha256_file(src)
    write_safetensors(state, dst, safetensors_metadata(card.name, report.source_sha256, report))
    report.destination = str(dst)
    return report
