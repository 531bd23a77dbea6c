"""``Segmenter``: a loaded model with its card, and the card's own test pipeline."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .registry import ModelCard
from .errors import UsageError


def card_preprocessor(card: ModelCard):
    """``card``'s test-time resize and normalisation as a picklable function (HxWx3 uint8 RGB -> 1x3xhxw
    float32) that reading threads and processes can run without the model."""
    import functools

    from .inference.image import preprocess

    pre = card.preprocess
    return functools.partial(preprocess, resize=pre.resize, mean=pre.mean, std=pre.std)


def prepare_image(card: ModelCard, image) -> tuple[np.ndarray, torch.Tensor]:
    """(HxWx3 uint8 RGB image, 1x3xhxw normalised tensor): ``image`` (a path, bytes, PIL image or array) read,
    then ``card``'s test-time resize and normalisation. Needs only the card: ``segtorch predict`` reads ahead
    while the model loads."""
    from .inference.image import read_image

    image = read_image(image)
    return image, card_preprocessor(card)(image)


class ChannelsLast(torch.nn.Module):
    """Runs ``model`` on NHWC inputs: oneDNN's and cuDNN's faster convolution layout (same results to
    rounding). The model's weights are converted once, here (a no-op for those ``load`` already folded into
    channels-last tensors)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def reduced_precision_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` whose convolution weights are stored in ``dtype``: autocast would cast them to it
    on every call (same values, so the same outputs); everything else (norms, softmax, the scores) stays
    float32 as autocast keeps it."""
    import copy

    fast = copy.deepcopy(model)
    for module in fast.modules():
        if type(module) is torch.nn.Conv2d:
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return fast


class Segmenter:
    """A model ready for inference.

    ``model``: the nn.Module (float32); ``model(x)`` gives the main head's scores at its output stride.
    ``logits`` and ``predict`` run the card's inference settings (whole/slide, scales, flips) at the chosen
    precision. ``channels_last``: None = the backbone's measured default for that precision
    (``segtorch.inference.fast_path``).
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: torch.device | str = "cpu",
                 precision: str = "fp32", compile: bool = False, channels_last: bool | None = None):
        from .inference.fast_path import fast_path_defaults
        from .inference.precision import check_device, check_precision, reduced_dtype

        self.device = check_device(device)
        check_precision(self.device, precision)
        self.model = model
        self.card = card
        self.precision = precision
        if channels_last is None:
            channels_last = fast_path_defaults(card.architecture["backbone"]["name"], precision)[1]
        self.channels_last = channels_last
        forward = model if precision == "fp32" else reduced_precision_copy(model, reduced_dtype(precision))
        self._forward = ChannelsLast(forward) if channels_last else forward
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

    def logits(self, images, mode: str | None = None, crop_size=None, stride=None, scales=None,
               flip: bool | None = None, tta: bool = False, output_size=None) -> torch.Tensor:
        """Class scores N,C,H,W averaged over scales and flips as the toolbox's inference script averages them;
        None = the card's value (``tta``: its ms+flip ones).

        ``images`` is either
        - an image (a path, a PIL image, an HxWx3 uint8 RGB array): the card's own preprocessing (test-time
          resize, normalisation) runs first and the scores come back at the image's size, so
          ``logits(image).argmax(1)[0]`` is ``predict(image)``;
        - normalised images N,3,H,W (or 3,H,W) as a float tensor or array, the card's ``preprocess`` mean/std
          already applied: scores at the input size, or at ``output_size`` (h, w). No test-time resize is
          done here: to match ``predict``, resize as ``segtorch.inference.preprocess`` does (or pass the image).
        """
        from .inference.predictor import infer_logits

        settings = self.inference_settings(tta, mode=mode, crop_size=crop_size, stride=stride, scales=scales,
                                           flip=flip)
        x, size = self._as_batch(images)
        with torch.inference_mode(), self._autocast():
            scores = infer_logits(self._forward, x.to(self.device), num_classes=self.card.num_classes,
                                  align_corners=self.card.architecture["align_corners"],
                                  output_size=output_size or size, **settings)
        return scores.float()

    def _as_batch(self, images) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """(normalised N,3,h,w float tensor, the size scores go back to or None for the input's own)."""
        import warnings

        from .inference.image import read_image

        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):  # an image: the card's own test pipeline
            image = read_image(images)
            return self.preprocessor()(image), image.shape[:2]
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise UsageError(f"logits takes an image (path, PIL, HxWx3 uint8) or normalised float images "
                             f"N x 3 x H x W; got a {images.dtype} tensor of shape {tuple(images.shape)}")
        if images.numel() and float(images.amax()) > 20:
            warnings.warn(f"logits: input values reach {float(images.amax()):.0f}; it expects images normalised "
                          f"with the card's mean/std (pass the uint8 image itself to have that done)",
                          stacklevel=3)
        return images, None

    def predict(self, image, tta: bool = False, mode: str | None = None, crop_size=None, stride=None,
                return_scores: bool = False, batch_size: int = 4):
        """Label map (H x W numpy int32) for a path, PIL image or HxWx3 uint8 RGB array, through the card's
        own test pipeline (read, resize, normalise, whole/slide, resize back, argmax); ``tta=True`` uses the
        card's ms+flip settings; ``mode``/``crop_size``/``stride`` override the card's. ``return_scores``:
        also the confidence, (labels, H x W float32 max class probability).

        A list (or tuple) of images gives a list of results, in order: images of one size share forward passes,
        up to ``batch_size`` at a time, wherever they are in the list (``inference.pipeline.predict_list``)."""
        def infer(batch, size):
            return self.predict_prepared(batch, size, tta=tta, mode=mode, crop_size=crop_size, stride=stride,
                                         return_scores=return_scores)

        if isinstance(image, (list, tuple)):
            from .inference.image import read_image
            from .inference.pipeline import predict_list

            return predict_list(image, read_image, self.preprocessor(), infer, batch_size)
        image, x = self.prepare(image)
        (result,) = infer(x, image.shape[:2])
        return result

    def prepare(self, image) -> tuple[np.ndarray, torch.Tensor]:
        """``prepare_image`` with this model's card: the part of ``predict`` that worker threads can run ahead
        of the model."""
        return prepare_image(self.card, image)

    def preprocessor(self):
        """``card_preprocessor`` of this model's card."""
        return card_preprocessor(self.card)

    def predict_prepared(self, batch: torch.Tensor, size, tta: bool = False, mode: str | None = None,
                         crop_size=None, stride=None, return_scores: bool = False) -> list:
        """``predict`` for N prepared images of one original ``size`` (h, w), stacked N x 3 x h x w: one
        label map (or (labels, confidence)) per image."""
        from .inference.predictor import infer_labels, infer_logits, labels_and_confidence

        settings = self.inference_settings(tta, mode=mode, crop_size=crop_size, stride=stride)
        kwargs = dict(num_classes=self.card.num_classes, align_corners=self.card.architecture["align_corners"],
                      output_size=tuple(size), **settings)
        with torch.inference_mode(), self._autocast():
            if not return_scores:
                return list(infer_labels(self._forward, batch.to(self.device), **kwargs).cpu().numpy())
            scores = infer_logits(self._forward, batch.to(self.device), **kwargs)
            labels, confidence = labels_and_confidence(scores, bool(settings["softmax_before_resize"]))
        return list(zip(labels.cpu().numpy(), confidence.cpu().numpy()))

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
