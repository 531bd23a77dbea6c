"""``Segmenter``: a loaded model with its card, and the card's own test pipeline."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .registry import ModelCard

INFERENCE_KEYS = ("mode", "crop_size", "stride", "scales", "flip", "flip_pairs", "softmax_before_resize")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, with the reason, a precision this hardware cannot run fast (or at all)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', not {precision!r}")
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("precision='bf16' needs a GPU with bfloat16 support; use 'fp16' or 'fp32'")
        return
    if device.type == "cpu":
        if precision == "fp16":
            raise RuntimeError("precision='fp16' is only offered on CUDA; on the CPU use 'bf16' (where supported) or 'fp32'")
        if not cpu_supports_bf16():
            raise RuntimeError("precision='bf16' on the CPU needs AVX512-BF16 or AMX (not in this CPU's flags); "
                               "use 'fp32'")
        return
    raise RuntimeError(f"precision={precision!r} is not supported on device {device}")


class Segmenter:
    """A model ready for inference. ``model(x)`` gives the main head's scores at its output stride."""

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: torch.device | str = "cpu",
                 precision: str = "fp32", compile: bool = False):
        self.model = model
        self.card = card
        self.device = torch.device(device)
        self.precision = precision
        self.compiled = compile
        self._forward = model
        if compile:
            self._forward = torch.compile(model)

    def __repr__(self) -> str:
        return f"Segmenter({self.card.name!r}, device={str(self.device)!r}, precision={self.precision!r})"

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def inference_settings(self, tta: bool = False, **overrides) -> dict:
        """The card's single-scale (or, with ``tta``, ms+flip) settings, with ``overrides`` that are not None."""
        base = self.card.inference.get("tta", {}) if tta else self.card.inference
        settings = {k: base.get(k) for k in INFERENCE_KEYS}
        settings["flip_pairs"] = settings["flip_pairs"] or self.card.inference.get("flip_pairs") or ()
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return settings

    def logits(self, images: torch.Tensor, mode: str | None = None, crop_size=None, stride=None, scales=None,
               flip: bool | None = None) -> torch.Tensor:
        """Scores N,C,H,W for normalised images N,3,H,W, averaged over scales/flips as the toolbox does."""
        from .inference.predictor import infer_logits

        settings = self.inference_settings(mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip)
        with torch.inference_mode(), self._autocast():
            return infer_logits(self._forward, images.to(self.device), num_classes=self.card.num_classes,
                                align_corners=self.card.architecture.get("align_corners", False), **settings)

    def predict(self, image, tta: bool = False):
        """Label map (H x W numpy int) for a path, PIL image or HxWx3 uint8 RGB array, through the card's
        own test pipeline; ``tta=True`` uses the card's ms+flip settings."""
        from .inference.image import read_image
        from .inference.predictor import predict_labels

        pre = self.card.preprocess
        settings = self.inference_settings(tta=tta)
        with torch.inference_mode(), self._autocast():
            return predict_labels(self._forward, read_image(image), resize=pre["resize"], mean=pre["mean"],
                                  std=pre["std"], device=self.device, num_classes=self.card.num_classes,
                                  align_corners=self.card.architecture.get("align_corners", False), **settings)
