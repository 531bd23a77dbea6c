"""``Segmenter``: a loaded model with its card, and the card's own test pipeline."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .registry import ModelCard


class ChannelsLast(torch.nn.Module):
    """Runs ``model`` on NHWC inputs: oneDNN's and cuDNN's faster convolution layout (same results to
    rounding). The model's weights are converted once, here."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


class Segmenter:
    """A model ready for inference.

    ``model``: the nn.Module; ``model(x)`` gives the main head's scores at its output stride. ``logits`` and
    ``predict`` run the card's inference settings (whole/slide, scales, flips) at the chosen precision.
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: torch.device | str = "cpu",
                 precision: str = "fp32", compile: bool = False, channels_last: bool = False):
        from .inference.precision import check_precision

        self.device = torch.device(device)
        check_precision(self.device, precision)
        self.model = model
        self.card = card
        self.precision = precision
        self.compiled = compile
        self._forward = ChannelsLast(model) if channels_last else model
        if compile:
            # freezing lets the CPU backend pre-pack convolution weights; the one-off compile happens on the
            # first call per input shape
            if self.device.type == "cpu":
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
            self._forward = torch.compile(self._forward)

    def __repr__(self) -> str:
        return f"Segmenter({self.card.name!r}, device={str(self.device)!r}, precision={self.precision!r})"

    def _autocast(self):
        from .inference.precision import autocast_context

        return autocast_context(self.device, self.precision)

    def inference_settings(self, tta: bool = False, **overrides) -> dict:
        """The card's single-scale (or, with ``tta``, ms+flip) settings, with ``overrides`` that are not None."""
        settings = dataclasses.asdict(self.card.inference.tta if tta else self.card.inference.default)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        if settings["mode"] == "slide" and not settings["crop_size"]:
            # sliding asked of a whole-image card: the training crop, two thirds of it as the stride
            crop = list(self.card.training.get("crop_size") or (512, 512))
            settings["crop_size"] = crop
            settings["stride"] = settings["stride"] or [max(1, (2 * c) // 3) for c in crop]
        return settings

    def logits(self, images: torch.Tensor, mode: str | None = None, crop_size=None, stride=None, scales=None,
               flip: bool | None = None, tta: bool = False) -> torch.Tensor:
        """Scores N,C,H,W at the input size for normalised images N,3,H,W, averaged over scales and flips as
        the toolbox's inference script averages them; None = the card's value (``tta``: its ms+flip ones)."""
        from .inference.predictor import infer_logits

        settings = self.inference_settings(tta, mode=mode, crop_size=crop_size, stride=stride, scales=scales,
                                           flip=flip)
        with torch.inference_mode(), self._autocast():
            scores = infer_logits(self._forward, images.to(self.device), num_classes=self.card.num_classes,
                                  align_corners=self.card.architecture["align_corners"], **settings)
        return scores.float()

    def predict(self, image, tta: bool = False, mode: str | None = None, crop_size=None,
                stride=None) -> np.ndarray:
        """Label map (H x W numpy int32) for a path, PIL image or HxWx3 uint8 RGB array, through the card's
        own test pipeline (read, resize, normalise, whole/slide, resize back, argmax); ``tta=True`` uses the
        card's ms+flip settings; ``mode``/``crop_size``/``stride`` override the card's."""
        from .inference.image import read_image
        from .inference.predictor import predict_labels

        pre = self.card.preprocess
        with torch.inference_mode(), self._autocast():
            return predict_labels(self._forward, read_image(image), resize=pre.resize, mean=pre.mean,
                                  std=pre.std, device=self.device, num_classes=self.card.num_classes,
                                  align_corners=self.card.architecture["align_corners"],
                                  **self.inference_settings(tta, mode=mode, crop_size=crop_size,
                                                            stride=stride))

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        from .inference.render import colorize

        return colorize(labels, self.card.palette)

    def overlay(self, image, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        from .inference.image import read_image
        from .inference.render import overlay

        return overlay(read_image(image), labels, self.card.palette, alpha)

    def legend(self, labels: np.ndarray | None = None) -> np.ndarray:
        from .inference.render import legend

        present = None if labels is None else np.unique(labels)
        return legend(self.card.class_names, self.card.palette, present)
