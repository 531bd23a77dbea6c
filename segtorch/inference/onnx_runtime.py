"""onnxruntime or OpenVINO as the forward pass of segtorch's own test procedure.

``OnnxModel`` (onnxruntime) and ``OpenVinoModel`` are called like ``model(x)``, so ``infer_logits``/
``predict_labels`` (resize, whole or slide, scales, flips, resize back, argmax) run unchanged with the runtime
computing the scores, from the float32 export or its int8 version alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import CheckpointError, ExportError, MissingExtraError, UsageError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# the file format `segtorch export` writes: one input, one output, and segtorch.* metadata
INPUT_NAME, OUTPUT_NAME = "images", "scores"
META_PREFIX = "segtorch."
RUNTIMES = ("onnxruntime", "openvino")


def require_onnx(*, exporting: bool = False) -> None:
    """One line naming the missing package and the extra that brings it."""
    needed = ("onnx", "onnxruntime", "onnxscript") if exporting else ("onnxruntime",)
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError(f"{module} is not installed: pip install 'segtorch[export]' "
                                    f"(onnx, onnxruntime, onnxscript)") from None


def require_runtime(runtime: str) -> None:
    """A known runtime that is installed, or one line saying how to get it."""
    if runtime not in RUNTIMES:
        raise UsageError(f"runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise MissingExtraError("openvino is not installed: pip install 'segtorch[openvino]' (or "
                                    "pip install openvino), or run the file with runtime='onnxruntime'") from None
    else:
        require_onnx()


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``segtorch.*`` metadata of an exported file, JSON values decoded; a file without it is refused."""
    try:  # onnx alone: OpenVINO's users need no onnxruntime
        import onnx
    except ImportError:
        raise MissingExtraError("onnx is not installed: pip install 'segtorch[export]' (or "
                                "'segtorch[openvino]')") from None

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


def onnx_session(path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None,
                 optimization: str | None = None):
    """An onnxruntime session on ``device``'s execution provider; ``threads``: intra-op threads (default: all);
    ``optimization``: a ``GraphOptimizationLevel`` name (``ORT_DISABLE_ALL`` ... ``ORT_ENABLE_ALL``, the
    default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about the initialisers the graph optimiser folds
    if threads:
        options.intra_op_num_threads = threads
    if optimization:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
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


class OpenVinoModel(torch.nn.Module):
    """An exported segtorch model run by OpenVINO on the CPU, called like ``OnnxModel``. Floating-point layers
    run in float32: OpenVINO's CPU default on CPUs with bf16 instructions is bf16 (1e-2 off the export)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None):
        super().__init__()
        require_runtime("openvino")
        import openvino as ov

        if torch.device(device).type != "cpu":
            raise UsageError(f"runtime 'openvino' runs on the CPU here, not {device}; use device='cpu', or "
                             f"runtime='onnxruntime' (onnxruntime-gpu) for a GPU")
        self.path = str(path)
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(self.path, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        scores = self.request.infer({0: array})[self.compiled.output(0)]
        return torch.from_numpy(scores.copy()).to(x.device)  # the request reuses its output buffer

    def extra_repr(self) -> str:
        return f"{self.path!r}, OpenVINO CPU"


def load_onnx_segmenter(card, path: str | os.PathLike, device: torch.device, precision: str, compile: bool,
                        runtime: str | None = None):
    """A ``Segmenter`` for ``card`` whose forward passes run in ``runtime`` (default onnxruntime); the file
    must be an export of this very model."""
    from ..segmenter import Segmenter

    runtime = runtime or "onnxruntime"
    if Path(path).suffix.lower() != ".onnx":  # before asking for the runtime: none would run this file
        raise UsageError(f"runtime={runtime!r} runs files written by `segtorch export`; {path} is not .onnx")
    require_runtime(runtime)
    if precision != "fp32" or compile:
        raise CheckpointError(f"{path}: an ONNX file runs as exported (float32 or int8), without autocast or "
                              f"torch.compile; drop precision={precision!r}/compile")
    meta = read_metadata(path)
    if meta["model"] != card.name:
        raise CheckpointError(f"{path}: exported from {meta['model']}, not {card.name}; "
                              f"load it as segtorch.load({meta['model']!r}, checkpoint=...)")
    model = OpenVinoModel(path, device) if runtime == "openvino" else OnnxModel(path, device)
    return Segmenter(model, card, device=device)
