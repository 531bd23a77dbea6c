"""The runtimes an exported file must run in, and each one's error against the float64 PyTorch model."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from segtorch.inference.onnx_runtime import INPUT_NAME, OpenVinoModel, onnx_session
from segtorch.testing import relative_error

# sizes never traced (the export traces at 128x160): odd, neither a multiple of the output stride nor a window
UNTRACED = ((1, 3, 97, 129), (2, 3, 150, 203), (1, 3, 75, 111))
ORT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None


def runtime_errors(model: torch.nn.Module, path: Path, shapes=UNTRACED) -> list[tuple[str, tuple, float, float]]:
    """(runtime, shape, its error against float64, the float32 PyTorch model's) for OpenVINO (where installed)
    and every onnxruntime graph-optimisation level."""
    runners = {level: onnx_session(path, optimization=level) for level in ORT_LEVELS}
    if HAVE_OPENVINO:
        runners["openvino"] = OpenVinoModel(path)
    model64 = copy.deepcopy(model).double()
    rows = []
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            ref, fp32 = model64(x.double()), model(x)
        torch_error = relative_error(fp32, ref)
        for name, runner in runners.items():
            if name == "openvino":
                out = runner(x)
            else:
                out = torch.from_numpy(runner.run(None, {INPUT_NAME: x.numpy()})[0])
            rows.append((name, shape, relative_error(out, ref), torch_error))
    return rows
