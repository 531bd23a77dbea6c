"""onnxruntime as the forward pass of segtorch's own test procedure.

``OnnxModel`` is called like ``model(x)``, so ``infer_logits``/``predict_labels`` (resize, whole or slide,
scales, flips, resize back, argmax) run unchanged with onnxruntime computing the scores.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def providers_for(device: str | torch.device, available: Sequence[str] | None = None) -> list[str]:
    """Execution providers for ``device``: CUDA (then CPU) when the device is a GPU and onnxruntime-gpu
    offers CUDA, else the CPU."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if torch.device(device).type == "cuda" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class OnnxModel(torch.nn.Module):
    """An exported segtorch model run by onnxruntime: ``model(x)`` takes and returns torch tensors (the
    scores come back on ``x``'s device, float32). It has no parameters: callers see no dtype to cast to."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None):
        super().__init__()
        from ..export import onnx_session, require_onnx

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
    from ..export import read_metadata
    from ..segmenter import Segmenter

    if precision != "fp32" or compile:
        raise CheckpointError(f"{path}: an ONNX file runs in float32 without torch.compile; "
                              f"drop precision={precision!r}/compile")
    meta = read_metadata(path)
    if meta["model"] != card.name:
        raise CheckpointError(f"{path}: exported from {meta['model']}, not {card.name}; "
                              f"load it as segtorch.load({meta['model']!r}, checkpoint=...)")
    return Segmenter(OnnxModel(path, device), card, device=device)
