"""``segtorch export``: one ONNX file per model, exact at every input size, checked before it is kept.

The file takes N x 3 x H x W float32 normalised images (N, H and W dynamic) and returns the main head's scores,
what ``model(x)`` returns. Pyramid pooling bottlenecks are exported split by their inputs, as segtorch's own
fast path runs them (``models/heads/psp.SplitBottleneckConv``: the pooled branches' share of the 3x3
convolution at their own scale; the interpolation matrices built in the graph from each input's size). It is
traced once (``torch.onnx.export(dynamo=True)``; the TorchScript exporter
cannot express the size-dependent pooling) at ``TRACE_SHAPE``; then onnxruntime runs it at ``CHECK_SHAPES``,
sizes the tracer never saw, and each result is compared with the PyTorch model in float64. The file is kept
only when every error is within ``max(ERROR_FACTOR x the float32 PyTorch model's own error, ERROR_FLOOR)``.

The file describes itself (``metadata_props``, keys ``segtorch.*``): model name, segtorch version, class
names, palette, the card's test preprocessing and inference settings, the source checkpoint's sha256 and the
errors measured here. ``read_metadata`` gives them back; ``segtorch info FILE.onnx`` prints them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .errors import ExportError
from .files import atomic_path, sha256_file
from .inference.onnx_runtime import (INPUT_NAME, META_PREFIX, OUTPUT_NAME, onnx_session,  # noqa: F401 - re-exported
                                     read_metadata, require_onnx)
from .models.heads.psp import pyramid_bottlenecks_split
from .registry import ModelCard, model_card
from .testing import relative_error

# a batch of 2: the tracer would fix a batch dimension of 1 as a constant
TRACE_SHAPE = (2, 3, 128, 160)
# odd sizes, neither a multiple of the output stride, the patch size or the window: every size-dependent path
CHECK_SHAPES = ((1, 3, 97, 129), (2, 3, 150, 203))
ERROR_FACTOR = 4.0
ERROR_FLOOR = 2e-5
DEFAULT_OPSET = 18


@dataclasses.dataclass
class SizeCheck:
    shape: tuple[int, ...]
    onnx_error: float   # onnxruntime vs the float64 PyTorch model (relative L2)
    torch_error: float  # float32 PyTorch model vs the float64 one: the toolbox's own float32 error
    bound: float

    @property
    def ok(self) -> bool:
        return self.onnx_error <= self.bound


@dataclasses.dataclass
class ExportReport:
    path: str
    name: str
    opset: int
    trace_shape: tuple[int, ...]
    checks: list[SizeCheck]
    source_sha256: str | None

    def summary(self) -> str:
        lines = [f"{self.path}: {self.name}, opset {self.opset}, traced at {list(self.trace_shape)}"]
        for c in self.checks:
            lines.append(f"  {list(c.shape)}: onnxruntime error {c.onnx_error:.2e} (float32 PyTorch "
                         f"{c.torch_error:.2e}, bound {c.bound:.2e}) {'ok' if c.ok else 'FAILED'}")
        return "\n".join(lines)


def trace_to_onnx(model: torch.nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                  trace_shape: Sequence[int] = TRACE_SHAPE) -> None:
    """Write ``model`` (eval mode, float32, on the CPU) as ONNX with dynamic batch, height and width."""
    from torch.export import Dim

    x = torch.randn(tuple(trace_shape))
    # Dim.DYNAMIC, not a strict named Dim: Swin's window padding and reshapes raise guards (divisibility, "is
    # this dimension 1") that a strict range refuses, though the exported graph is right at every size; a
    # graph that did specialise is caught by the size checks that follow
    dims = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            program = torch.onnx.export(model, (x,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=(dims,), dynamo=True, opset_version=opset,
                                        verbose=False)
    except Exception as e:  # an opset the exporter cannot target, or an operator it cannot express
        raise ExportError(f"torch.onnx.export failed for opset {opset}: {str(e).splitlines()[0]}") from e
    program.save(str(path), external_data=False)


def check_sizes(model: torch.nn.Module, session, shapes: Sequence[Sequence[int]] = CHECK_SHAPES
                ) -> list[SizeCheck]:
    """onnxruntime's and the float32 model's errors against the float64 model at each shape."""
    model64 = copy.deepcopy(model).double()
    checks = []
    for shape in shapes:
        generator = torch.Generator().manual_seed(sum(shape))
        x = torch.randn(tuple(shape), generator=generator)
        with torch.inference_mode():
            ref = model64(x.double())
            fp32 = model(x)
        try:
            out = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        except Exception as e:  # e.g. an index baked in at the traced size, out of range at this one
            raise ExportError(f"onnxruntime fails at input {list(shape)}: {str(e).splitlines()[0]}") from e
        if out.shape != ref.shape:
            raise ExportError(f"the exported model gives shape {tuple(out.shape)} at input {list(shape)}, "
                              f"PyTorch {tuple(ref.shape)}")
        torch_error = relative_error(fp32, ref)
        checks.append(SizeCheck(tuple(shape), relative_error(out, ref), torch_error,
                                max(ERROR_FACTOR * torch_error, ERROR_FLOOR)))
    del model64
    return checks


def metadata(card: ModelCard, source_sha256: str | None, opset: int, checks: Sequence[SizeCheck]) -> dict[str, str]:
    """The ``metadata_props`` of an exported file: every value a string (JSON where it is structured)."""
    plain = card.to_dict()  # the card's typed, read-only records as plain JSON values
    values = {
        "model": card.name,
        "version": __version__,
        "num_classes": card.num_classes,
        "class_names": list(card.class_names),
        "palette": [list(c) for c in card.palette],
        "preprocess": plain["preprocess"],
        "inference": plain["inference"],
        "align_corners": bool(card.architecture["align_corners"]),
        "source_sha256": source_sha256 or "none (random weights)",
        "opset": opset,
        "input": f"{INPUT_NAME}: N x 3 x H x W float32, normalised (see preprocess)",
        "output": f"{OUTPUT_NAME}: N x num_classes x h x w, the main head's scores at its output stride",
        "error": [dataclasses.asdict(c) for c in checks],
    }
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _write_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def export_model(model: torch.nn.Module, card: ModelCard, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                 source_sha256: str | None = None, check_shapes: Sequence[Sequence[int]] = CHECK_SHAPES
                 ) -> ExportReport:
    """Export ``model`` (the architecture of ``card``, float32) to ``out``; checked, then written atomically."""
    require_onnx(exporting=True)
    out = Path(out).expanduser()
    model = model.float().cpu().eval()
    with atomic_path(out) as tmp:
        with pyramid_bottlenecks_split(model):  # checked below against the model as the toolbox has it
            trace_to_onnx(model, tmp, opset)
        try:
            checks = check_sizes(model, onnx_session(tmp), check_shapes)
        except ExportError as e:
            raise ExportError(f"{out}: not written, {e}") from e
        report = ExportReport(str(out), card.name, opset, TRACE_SHAPE, checks, source_sha256)
        failed = [f"at {list(c.shape)} onnxruntime error {c.onnx_error:.1e} > bound {c.bound:.1e}"
                  for c in checks if not c.ok]
        if failed:
            raise ExportError(f"{out}: not written, the exported graph is not exact at sizes other than the "
                              f"traced one ({'; '.join(failed)}); please report this model")
        _write_metadata(tmp, metadata(card, source_sha256, opset, checks))
    return report


def export(name: str, out: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *,
           opset: int = DEFAULT_OPSET) -> ExportReport:
    """Export checkpoint ``name`` (the card's weights, or ``checkpoint``) to the ONNX file ``out``."""
    require_onnx(exporting=True)
    from .api import model_with_weights

    card = model_card(name)
    if str(checkpoint or "").lower().endswith(".onnx"):
        raise ExportError(f"{checkpoint}: already an ONNX file; give the .pth or .safetensors checkpoint")
    model, path = model_with_weights(card, checkpoint)  # unfused, NCHW: the toolbox's layout
    return export_model(model, card, out, opset=opset, source_sha256=sha256_file(path))
