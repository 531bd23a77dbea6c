"""The top-level functions: build a model by name, load weights into it, convert legacy checkpoints."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import (CheckpointError, ConversionReport, card_for_checkpoint, convert_checkpoint, load_for_model,
                         local_checkpoint, meta_model, optional_keys)
from .errors import UsageError
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
        return local_checkpoint(checkpoint)
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
         precision: str = "fp32", compile: bool = False, exact: bool = False, fuse_bn: bool | None = None,
         channels_last: bool | None = None, auxiliary: bool = False, num_classes: int | None = None,
         class_names=None, runtime: str | None = None) -> "Segmenter":
    """A ready ``Segmenter`` for checkpoint ``name``: weights loaded (in float32, whatever the file stores),
    eval mode, on ``device``. ``seg.model`` is the network as ``create_model(name)`` builds it, with these
    weights (built on first use from the memory-mapped file); ``predict``/``logits`` run the Segmenter's own
    inference rewrite of it.

    ``checkpoint``: a local ``.pth``/``.safetensors`` file, an ``.onnx`` file from ``segtorch export`` (run by
    onnxruntime by default, ``runtime="openvino"``), or a URL; by default the card's weights are fetched (a
    Hugging Face mirror where the card pins its sha256 or the user configured one, else the GitHub release) and
    cached.

    What the outputs are (``Segmenter`` gives the measured figures):
    - default, fp32: the fast path (BatchNorm folded, pyramid pooling bottleneck split, NHWC, batched crops and
      flips): scores within about twice the toolbox's own float32 error of the float64 answer; label maps as
      the toolbox's but where two classes nearly tie;
    - ``exact=True``: the toolbox's own computation step for step (fp32 only): its scores to 2e-6 relative and
      its label maps;
    - ``precision="bf16"/"fp16"`` (autocast over float32 weights) and ``compile=True``: opt-in speed, refused
      where the hardware lacks them.
    ``fuse_bn`` (fold BatchNorm, split the pyramid pooling bottleneck) and ``channels_last`` (NHWC) choose the
    fast path's rewrites; None = the backbone's measured default (``segtorch.inference.fast_path``), off with
    ``exact`` or ``auxiliary`` (fine-tuning).
    ``num_classes``/``class_names``: the classes of a checkpoint trained for other classes than the card's (a
    file written by ``segtorch train`` names its own).
    """
    from .inference.precision import check_device, check_precision
    from .segmenter import Segmenter

    card = model_card(name)
    device = check_device(device)
    check_precision(device, precision)
    path = _resolve_checkpoint(card, checkpoint)
    if path.suffix.lower() == ".onnx" or runtime is not None:  # written by `segtorch export`: a runtime runs it
        from .inference.onnx_runtime import load_onnx_segmenter

        if exact:
            raise UsageError(f"{path}: exact=True runs the toolbox's computation in torch; load the "
                             ".safetensors/.pth weights instead of an ONNX export")
        return load_onnx_segmenter(card, path, device, precision, compile, runtime)
    card = card_for_checkpoint(card, path, num_classes, class_names)
    model, _ = model_with_weights(card, checkpoint, auxiliary=auxiliary, path=path)
    if auxiliary:
        fuse_bn = False if fuse_bn is None else fuse_bn
        channels_last = False if channels_last is None else channels_last
    return Segmenter(model.to(device), card, device=device, precision=precision, compile=compile, exact=exact,
                     fuse_bn=fuse_bn, channels_last=channels_last,
                     _rebuild=functools.partial(_rebuild_model, card, path, auxiliary, _file_identity(path)))


def _file_identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _rebuild_model(card: ModelCard, path: Path, auxiliary: bool, identity: tuple[int, int, int]) -> torch.nn.Module:
    """``Segmenter.model`` for ``load``: the network read again from the weights file it was loaded from, which
    must be that very file still."""
    try:
        if _file_identity(path) != identity:
            raise CheckpointError(f"{path}: replaced or changed since the model was loaded")
        return model_with_weights(card, path=path, auxiliary=auxiliary)[0]
    except (CheckpointError, OSError) as e:
        raise CheckpointError(f"seg.model is read from the weights file on first use, and that failed ({e}); "
                              "load the model again") from None


def convert(src: str | os.PathLike, dst: str | os.PathLike, name: str, *, auxiliary: bool = False
            ) -> ConversionReport:
    """Convert a legacy ``.pth`` (or re-check a ``.safetensors``) for model ``name`` into safetensors.

    The file is checked against the architecture (missing, unexpected or mis-shaped keys are refused by
    name) before anything is written; the output is written atomically with metadata (name, source sha256,
    segtorch version, what the conversion renamed and dropped).
    """
    return convert_checkpoint(src, dst, model_card(name), auxiliary=auxiliary)
