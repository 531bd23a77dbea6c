"""``segtorch export``: one ONNX file per model, exact at every input size, checked before it is kept.

The file takes N x 3 x H x W float32 normalised images (N, H and W dynamic) and returns the main head's scores,
what ``model(x)`` returns. Pyramid pooling bottlenecks are exported split by their inputs, as segtorch's own
fast path runs them (``models/decoders/pyramid_pooling.SplitBottleneckConv``: the pooled branches' share of the 3x3
convolution at their own scale; the interpolation matrices built in the graph from each input's size). It is
traced once (``torch.onnx.export(dynamo=True)``; the TorchScript exporter
cannot express the size-dependent pooling) at ``TRACE_SHAPE``; then onnxruntime runs it at ``CHECK_SHAPES``,
sizes the tracer never saw, and each result is compared with the PyTorch model in float64. The file is kept
only when every error is within ``max(ERROR_FACTOR x the float32 PyTorch model's own error, ERROR_FLOOR)``.

The file describes itself (``metadata_props``, keys ``segtorch.*``): model name, segtorch version, class
names, palette, the card's test preprocessing and inference settings, the source checkpoint's sha256, the
file's own opset, its precision and the errors measured here. ``read_metadata`` gives them back;
``segtorch info FILE.onnx`` prints them. Its input's dynamic axes are named batch, height and width.

``quantize="int8"`` quantizes the checked float32 graph (``segtorch.quantize``: static QDQ, calibrated on a
folder of images) and judges the int8 file against the float32 model before writing it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from . import __version__
from .errors import ExportError
from .files import atomic_path, sha256_file
from .inference.onnx_runtime import (INPUT_NAME, META_PREFIX, OUTPUT_NAME, onnx_session,  # noqa: F401 - re-exported
                                     read_metadata, require_onnx)
from .models.decoders.pyramid_pooling import pyramid_bottlenecks_split
from .registry import ModelCard, model_card
from .testing import relative_error

if TYPE_CHECKING:
    from .quantize import Int8Check

# a batch of 2: the tracer would fix a batch dimension of 1 as a constant
TRACE_SHAPE = (2, 3, 128, 160)
# odd sizes, neither a multiple of the output stride, the patch size or the window: every size-dependent path
CHECK_SHAPES = ((1, 3, 97, 129), (2, 3, 150, 203))
ERROR_FACTOR = 4.0
ERROR_FLOOR = 2e-5
DEFAULT_OPSET = 18
# torch's exporter writes opset 18 (its operators' own version) and upgrades to later ones; below 18 its
# down-conversion fails on this graph (Split's and Identity's adapters) and it silently keeps 18; above 25 it
# writes 18 too. 18, 21, 23 and 25 tested: exact in onnxruntime 1.32 and OpenVINO 2026.4
MIN_OPSET, MAX_OPSET = 18, 25
# the input's dynamic axes, named in the file (the exporter calls them s0, s1, s2)
INPUT_AXES = ("batch", "height", "width")


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
    int8: "Int8Check | None" = None

    def summary(self) -> str:
        lines = [f"{self.path}: {self.name}, opset {self.opset}, traced at {list(self.trace_shape)}"]
        for c in self.checks:
            lines.append(f"  {list(c.shape)}: onnxruntime error {c.onnx_error:.2e} (float32 PyTorch "
                         f"{c.torch_error:.2e}, bound {c.bound:.2e}) {'ok' if c.ok else 'FAILED'}")
        if self.int8:
            q = self.int8
            lines.append(f"  int8 (QDQ, per-channel weights): labels agree with float32 PyTorch on "
                         f"{q.agreement:.2%} of the pixels of {q.inputs} calibration inputs (at least "
                         f"{q.min_agreement:.0%} asked), scores' relative error {q.relative_error:.2e}")
        return "\n".join(lines)


@contextlib.contextmanager
def quiet_export():
    """The exporter's chatter that concerns no user: its progress lines, its note that torchvision's operators
    (nms, roi_align; none of them used here) are skipped where torchvision is not installed, and Dynamo's
    warning about ``functools.lru_cache``, whose wrapped function an export traces on purpose
    (``models/decoders/pyramid_pooling``: the cache serves eager forward passes only)."""
    import logging
    import warnings

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
            yield
    finally:
        registration.setLevel(level)


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset}: the export writes opsets {MIN_OPSET} to {MAX_OPSET} (torch's exporter "
                          f"cannot convert its graph to earlier ones); default {DEFAULT_OPSET}")
    return opset


def _cause(error: BaseException) -> str:
    """The innermost exception under the exporter's banner ("Failed to export the model with torch.export.
    This is step 1/3 ..."), as one line: what a user can act on."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def file_opset(path: str | os.PathLike) -> int:
    """The default-domain opset a file declares."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


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
        with quiet_export():
            program = torch.onnx.export(model, (x,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=(dims,), dynamo=True, opset_version=opset,
                                        verbose=False)
    except Exception as e:  # an operator the exporter cannot express, a guard it cannot keep
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {_cause(e)}") from e
    program.save(str(path), external_data=False)
    if file_opset(path) != opset:  # the exporter keeps 18 where its conversion fails, with a warning only
        raise ExportError(f"torch.onnx.export wrote opset {file_opset(path)}, not the {opset} asked")


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


def metadata(card: ModelCard, source_sha256: str | None, opset: int, checks: Sequence[SizeCheck],
             extra: dict | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported file: every value a string (JSON where it is structured)."""
    plain = card.to_dict()  # the card's typed, read-only records as plain JSON values
    values = {
        "model": card.name,
        "version": __version__,
        "precision": "fp32",
        "num_classes": card.num_classes,
        "class_names": list(card.class_names),
        "palette": [list(c) for c in card.palette],
        "preprocess": plain["preprocess"],
        "inference": plain["inference"],
        "align_corners": bool(card.architecture["align_corners"]),
        "source_sha256": source_sha256 or "none (random weights)",
        "opset": opset,
        "input": f"{INPUT_NAME}: {' x '.join(INPUT_AXES[:1] + ('3',) + INPUT_AXES[1:])} float32, normalised "
                 f"(see preprocess)",
        "output": f"{OUTPUT_NAME}: batch x num_classes x h x w, the main head's scores at its output stride",
        "error": [dataclasses.asdict(c) for c in checks],
        **(extra or {}),
    }
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _finish_file(path: Path, props: dict[str, str]) -> None:
    """Write the metadata, and name the input's dynamic axes (batch, height, width) wherever the graph uses
    the exporter's symbols for them (the output's: "((height - 1)//8) + 1")."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    # the exporter's shapes of intermediate values are hints a runtime may trust: for Swin's shifted-window masks
    # they equate sizes that differ between inputs, and onnxruntime without graph optimisations then reuses a
    # buffer of the wrong shape ({1,144,144} != {2,144,144}). Every runtime infers them from the operators.
    del proto.graph.value_info[:]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {dims[i].dim_param: name for i, name in zip((0, 2, 3), INPUT_AXES) if dims[i].dim_param}
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:  # a symbol, or an expression of them: "((s53 - 1)//8) + 1"
                dim.dim_param = re.sub(r"\w+", lambda m: names.get(m.group(0), m.group(0)), dim.dim_param)
    onnx.save(proto, str(path))


@dataclasses.dataclass
class Int8Request:
    """What ``--quantize int8`` needs, checked before the export starts."""
    files: list[Path]
    inputs: list
    min_agreement: float


def export_model(model: torch.nn.Module, card: ModelCard, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                 source_sha256: str | None = None, check_shapes: Sequence[Sequence[int]] = CHECK_SHAPES,
                 int8: Int8Request | None = None) -> ExportReport:
    """Export ``model`` (the architecture of ``card``, float32) to ``out``; checked, then written atomically.
    With ``int8``, the checked float32 graph is quantized and the int8 file judged before it is written."""
    require_onnx(exporting=True)
    check_opset(opset)
    out = Path(out).expanduser()
    model = model.float().cpu().eval()
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix="segtorch-export-") as scratch:
        fp32 = Path(scratch) / "fp32.onnx" if int8 else tmp
        with pyramid_bottlenecks_split(model):  # checked below against the model as the toolbox has it
            trace_to_onnx(model, fp32, opset)
        try:
            checks = check_sizes(model, onnx_session(fp32), check_shapes)
        except ExportError as e:
            raise ExportError(f"{out}: not written, {e}") from e
        report = ExportReport(str(out), card.name, opset, TRACE_SHAPE, checks, source_sha256)
        failed = [f"at {list(c.shape)} onnxruntime error {c.onnx_error:.1e} > bound {c.bound:.1e}"
                  for c in checks if not c.ok]
        if failed:
            raise ExportError(f"{out}: not written, the exported graph is not exact at sizes other than the "
                              f"traced one ({'; '.join(failed)}); please report this model")
        extra = None
        if int8:
            from . import quantize

            _finish_file(fp32, {})  # the axes' names carry over into the quantized graph
            quantize.quantize_file(fp32, tmp, int8.inputs)
            report.int8 = quantize.check_int8(model, tmp, int8.inputs, int8.min_agreement)
            quantize.refuse_inaccurate(out, report.int8)
            extra = quantize.int8_metadata(int8.files, int8.inputs, report.int8)
        report.opset = file_opset(tmp)
        _finish_file(tmp, metadata(card, source_sha256, report.opset, checks, extra))
    return report


def export(name: str, out: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *,
           opset: int = DEFAULT_OPSET, quantize: str | None = None, calibration: str | os.PathLike | None = None,
           calibration_images: int | None = None, min_agreement: float | None = None) -> ExportReport:
    """Export checkpoint ``name`` (the card's weights, or ``checkpoint``) to the ONNX file ``out``;
    ``quantize="int8"``: static int8, activations calibrated on ``calibration_images`` (default: all) images of
    the folder ``calibration``."""
    require_onnx(exporting=True)
    from .api import model_with_weights

    card = model_card(name)
    if Path(out).suffix.lower() != ".onnx":
        raise ExportError(f"{out}: the export writes ONNX; give --out a name ending in .onnx")
    check_opset(opset)
    if str(checkpoint or "").lower().endswith(".onnx"):
        raise ExportError(f"{checkpoint}: already an ONNX file; give the .pth or .safetensors checkpoint")
    int8 = None
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize}: the export quantizes to int8 only")
    if quantize is None and (calibration is not None or calibration_images is not None):
        raise ExportError("--calibration and --calibration-images go with --quantize int8")
    if quantize == "int8":
        from .quantize import DEFAULT_MIN_AGREEMENT, calibration_files, calibration_inputs

        if calibration is None:
            raise ExportError("--quantize int8 needs --calibration DIR: a folder of images like those the model "
                              "will segment")
        files = calibration_files(calibration, calibration_images)  # before minutes of export, not after
        int8 = Int8Request(files, calibration_inputs(card, files),
                           DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement)
    model, path = model_with_weights(card, checkpoint)  # unfused, NCHW: the toolbox's layout
    return export_model(model, card, out, opset=opset, source_sha256=sha256_file(path), int8=int8)
