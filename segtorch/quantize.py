"""Static int8 quantization of an exported file (``segtorch export --quantize int8 --calibration DIR``).

onnxruntime's ``quantize_static`` writes QDQ (QuantizeLinear/DequantizeLinear pairs around every convolution
and matrix product): weights int8 per output channel, activations uint8 with ranges calibrated (min/max) on
images from the calibration folder. The images go through the card's own test preprocessing (resize,
normalisation); a sliding-window model is calibrated on the crops it runs, at its crop size and stride.
The int8 file is then judged against the float32 PyTorch model on the same inputs (label agreement and the
scores' relative error) and kept only when the labels agree on at least ``min_agreement`` of the pixels.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DatasetError, ExportError, ImageReadError
from .imageops import IMAGE_SUFFIXES
from .inference.onnx_runtime import INPUT_NAME, OUTPUT_NAME, onnx_session
from .registry import ModelCard
from .testing import relative_error

# the share of pixels whose int8 label must equal the float32 one (on the calibration inputs): the demo
# model's evaluation set loses 0.1-0.3 mIoU points at ~0.99 agreement
DEFAULT_MIN_AGREEMENT = 0.97


@dataclasses.dataclass
class Int8Check:
    inputs: int             # calibration inputs (images, or crops of a sliding-window model) compared
    agreement: float        # share of pixels where the int8 file's label equals the float32 PyTorch model's
    relative_error: float   # relative L2 error of the int8 scores against the float32 PyTorch model's
    min_agreement: float

    @property
    def ok(self) -> bool:
        return self.agreement >= self.min_agreement


def calibration_files(folder: str | os.PathLike, count: int | None = None) -> list[Path]:
    """The first ``count`` images (all by default) of ``folder``, sorted by name; an empty folder, one without
    images, or fewer images than asked is refused in one line."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: the calibration folder does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        what = f"only {len(files)} other files (e.g. {files[0].name})" if files else "nothing"
        raise DatasetError(f"{folder}: no calibration images ({', '.join(IMAGE_SUFFIXES)}) there, {what}; "
                           f"give a folder of images like those the model will segment")
    if count is not None and len(images) < count:
        raise DatasetError(f"{folder}: {len(images)} images, --calibration-images asks for {count}; "
                           f"add images or ask for at most {len(images)}")
    return images[:count]


def calibration_inputs(card: ModelCard, files: Sequence[Path]) -> list[np.ndarray]:
    """Each image through the card's test preprocessing (1x3xhxw float32); for a sliding-window model, the
    crops of each, as the predictor cuts them."""
    from .inference.predictor import slide_windows
    from .segmenter import prepare_image

    setting = card.inference.default
    inputs = []
    for path in files:
        try:
            _, x = prepare_image(card, path)
        except ImageReadError as e:
            raise DatasetError(f"calibration image {e}") from None
        if setting.mode == "slide":
            for y1, y2, x1, x2 in slide_windows(x.shape[2], x.shape[3], setting.crop_size, setting.stride):
                inputs.append(x[:, :, y1:y2, x1:x2].contiguous().numpy())
        else:
            inputs.append(x.contiguous().numpy())
    return inputs


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of inputs, in the strided form (``set_range``)
    that lets the calibrator reduce each input's tensors to their ranges before it runs the next."""

    def __init__(self, inputs: Sequence[np.ndarray]):
        self.inputs = list(inputs)
        self.set_range(0, len(self.inputs))

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.items = iter(self.inputs[start_index:end_index])

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {INPUT_NAME: x}


def quantize_file(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, inputs: Sequence[np.ndarray]
                  ) -> None:
    """Write the static QDQ int8 version of ``fp32_path``, activations calibrated (min/max) on ``inputs``."""
    import logging

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run its pre-processing: shape inference that this graph has
    try:
        quantize_static(str(fp32_path), str(int8_path), _Reader(inputs), quant_format=QuantFormat.QDQ,
                        # uint8 activations: onnxruntime's x86 kernels fuse only u8s8 QDQ convolutions
                        # (QLinearConv, VNNI); with symmetric int8 ones it ran most convolutions in float32
                        # between DequantizeLinear nodes (1.07x float32's speed, against 2.87x)
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        # one input at a time: its intermediate tensors (GBs at 512x512) reduced to ranges
                        # before the next runs
                        extra_options={"CalibStridedMinMax": 1})
    finally:
        root.setLevel(level)


def check_int8(model: torch.nn.Module, int8_path: str | os.PathLike, inputs: Sequence[np.ndarray],
               min_agreement: float = DEFAULT_MIN_AGREEMENT) -> Int8Check:
    """The int8 file against the float32 PyTorch ``model`` on ``inputs``."""
    session = onnx_session(int8_path)
    same = total = 0
    errors = []
    for x in inputs:
        with torch.inference_mode():
            ref = model(torch.from_numpy(x))
        out = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
        same += (out.argmax(1) == ref.argmax(1)).sum().item()
        total += ref[:, 0].numel()
        errors.append(relative_error(out, ref))
    return Int8Check(len(inputs), same / total, float(np.mean(errors)), min_agreement)


def int8_metadata(files: Sequence[Path], inputs: Sequence[np.ndarray], check: Int8Check) -> dict:
    return {
        "precision": "int8",
        "quantization": {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8",
                         "method": "static, min/max ranges (onnxruntime.quantization.quantize_static)"},
        "calibration": {"folder": str(files[0].parent.resolve()), "images": len(files),
                        "inputs": len(inputs), "files": [p.name for p in files]},
        "int8_error": dataclasses.asdict(check),
    }


def refuse_inaccurate(out: Path, check: Int8Check) -> None:
    if not check.ok:
        raise ExportError(
            f"{out}: not written, the int8 labels agree with float32 on {check.agreement:.2%} of the pixels of "
            f"the {check.inputs} calibration inputs, {check.min_agreement - check.agreement:.2%} short of the "
            f"{check.min_agreement:.0%} asked (scores' relative error {check.relative_error:.2e}); calibrate on "
            f"more images like those the model will segment, or keep the float32 file")
