"""onnxruntime as the forward pass of segtorch's own test procedure.

``OnnxModel`` is called like ``model(x)``, so ``infer_logits``/``predict_labels`` (resize, whole or slide,
scales, flips, resize back, argmax) run unchanged with onnxruntime computing the scores.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ExportError, MissingExtraError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# the file format `segtorch export` writes: one input, one output, and segtorch.* metadata
INPUT_NAME, OUTPUT_NAME = "images", "scores"
META_PREFIX = "segtorch."


def require_onnx(*, exporting: bool = False) -> None:
    """One line naming the missing package and the extra that brings it."""
    needed = ("onnx", "onnxruntime", "onnxscript") if exporting else ("onnxruntime",)
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError(f"{module} is not installed: pip install 'segtorch[export]' "
                                    f"(onnx, onnxruntime, onnxscript)") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``segtorch.*`` metadata of an exported file, JSON values decoded; a file without it is refused."""
    require_onnx(exporting=True)
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    meta = {}
    for prop in proto.metadata_props:
        if prop.key.startswith(META_PREFIX):
            try:
                meta[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                meta[prop.key[len(META_PREFIX):]] = prop.value
    if "model" not in meta:
        raise ExportError(f"{path}: an ONNX file without segtorch metadata; export it with `segtorch export`")
    return meta


def onnx_session(path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None):
    """An onnxruntime session on ``device``'s execution provider; ``threads``: intra-op threads (default: all)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about the initialisers the graph optimiser folds
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers_for(device))


# onnxruntime's CUDA provider runs float32 convolutions and matmuls in TF32 on Ampere and newer GPUs unless told
# not to (its option since 1.18): off, as the toolbox and segtorch's own CUDA forward passes have it
CUDA_OPTIONS = {"use_tf32": "0"}


def providers_for(device: str | torch.device, available: Sequence[str] | None = None) -> list:
    """Execution providers for ``device``: CUDA on that GPU (``cuda:1``: the second) in float32 without TF32,
    then the CPU, when the device is a GPU and onnxruntime-gpu offers CUDA; else the CPU."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if torch.device(device).type == "cuda" and CUDA in available:
        return [(CUDA, {"device_id": str(torch.device(device).index or 0), **CUDA_OPTIONS}), CPU]
    return [CPU]


class OnnxModel(torch.nn.Module):
    """An exported segtorch model run by onnxruntime: ``model(x)`` takes and returns torch tensors (the
    scores come back on ``x``'s device, float32). It has no parameters: callers see no dtype to cast to."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None):
        super().__init__()
        require_onnx()
        self.path = str(path)
        self.session = onnx_session(path, device, threads)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        scores = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(scores).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path!r}, providers={self.providers}"


def load_onnx_segmenter(card, path: str | os.PathLike, device: torch.device, precision: str, compile: bool):
    """A ``Segmenter`` for ``card`` whose forward passes run in onnxruntime; the file must be an export of
    this very model."""
    from ..errors import CheckpointError
    from ..segmenter import Segmenter

    if precision != "fp32" or compile:
        raise CheckpointError(f"{path}: an ONNX file runs in float32 without torch.compile; "
                              f"drop precision={precision!r}/compile")
    meta = read_metadata(path)
    if meta["model"] != card.name:
        raise CheckpointError(f"{path}: exported from {meta['model']}, not {card.name}; "
                              f"load it as segtorch.load({meta['model']!r}, checkpoint=...)")
    return Segmenter(OnnxModel(path, device), card, device=device)
