"""``Segmenter``: a loaded model with its card, and the card's own test pipeline."""
from __future__ import annotations

import dataclasses
import threading

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


def compiled(module: torch.nn.Module, device: torch.device):
    """``torch.compile(module)``; on the CPU with inductor's ``freezing`` (pre-packed convolution weights), given as
    this compile's option rather than set in inductor's process-wide configuration. The one-off compile happens
    on the first call per input shape."""
    return torch.compile(module, options={"freezing": True} if device.type == "cpu" else None)


class Segmenter:
    """A model ready for inference.

    ``model``: the checkpoint's network as ``create_model`` builds it (BatchNorm present, trainable, NCHW,
    float32, eval mode); ``model(x)`` gives the main head's scores at its output stride, the toolbox's forward.
    ``logits`` and ``predict`` run the card's inference settings (whole/slide, scales, flips) at the chosen
    precision, through the Segmenter's own inference module (``inference_module``), made from ``model`` when
    the Segmenter is made: later changes to ``model`` (training, pruning) do not reach it, except where nothing
    is rewritten (``exact`` mode; fp32 with ``fuse_bn`` and ``channels_last`` off), which runs ``model`` itself.
    ``Segmenter(model, card)`` leaves ``model`` unchanged (the rewrite shares every tensor it does not change).

    Two modes:
    - default (the fast path): BatchNorm folded into the convolutions and pyramid pooling bottlenecks split
      (``fuse_bn``), NHWC convolutions (``channels_last``), crops and flips batched, a scale's flipped scores
      summed before its one resize, single-scale label maps from ``resize_argmax``. Each is exact in real
      arithmetic; the scores stay within about twice the toolbox's own float32 error of the float64 answer
      (1e-7 to 5e-7 relative on the parity checkpoints; tests/test_parity.py), and label maps differ from the
      toolbox's only where two classes' scores nearly tie.
    - ``exact=True``: the toolbox's computation, step for step, on ``model`` itself: every crop one forward pass,
      each scale and flip resized to the output on its own, summed in the toolbox's order, then argmax.
      Scores within 2e-6 relative of the toolbox's (measured against the toolbox in the same process on
      PSPNet R-50-D8: bit-equal on slide + multi-scale + flip, 1.7e-7 on a whole image; 5e-8 to 2.4e-7
      against the recorded outputs), label maps of image files identical to its inference script's
      (tests/test_exact.py). Slower: crops and flips one forward pass each. fp32 only, not compiled.

    ``fuse_bn`` / ``channels_last``: None = the backbone's measured default for that precision
    (``segtorch.inference.fast_path``); off in ``exact`` mode.
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: torch.device | str = "cpu",
                 precision: str = "fp32", compile: bool = False, channels_last: bool | None = None,
                 fuse_bn: bool | None = None, exact: bool = False, *, _rebuild=None):
        from .inference.fast_path import fast_module, fast_path_defaults
        from .inference.precision import check_device, check_precision, reduced_dtype

        if exact and (precision != "fp32" or compile or fuse_bn or channels_last):
            raise UsageError("exact=True runs the toolbox's own float32 computation: drop "
                             + ", ".join(k for k, v in (("precision", precision != "fp32"), ("compile", compile),
                                                        ("fuse_bn", fuse_bn), ("channels_last", channels_last))
                                         if v))
        self.device = check_device(device)
        check_precision(self.device, precision)
        self.card = card
        self.precision = precision
        self.exact = exact
        fuse_default, channels_last_default = fast_path_defaults(card.architecture["backbone"]["name"], precision)
        self.fuse_bn = not exact and (fuse_default if fuse_bn is None else fuse_bn)
        self.channels_last = not exact and (channels_last_default if channels_last is None else channels_last)
        # _rebuild (load's): ``model`` belongs to this Segmenter and becomes its inference module in place; the
        # network itself is built again from the weights file when ``model`` is first asked for, so that the
        # two are held at once only by whoever uses both
        self._rebuild = _rebuild if (_rebuild is not None and (self.fuse_bn or self.channels_last
                                                               or precision != "fp32")) else None
        self._model = None if self._rebuild is not None else model
        self._model_lock = threading.Lock()
        self._forward = fast_module(model, fuse_bn=self.fuse_bn, channels_last=self.channels_last,
                                    dtype=None if precision == "fp32" else reduced_dtype(precision),
                                    in_place=self._rebuild is not None)
        if compile:
            self._forward = compiled(self._forward, self.device)

    def __getstate__(self) -> dict:  # picklable (to worker processes) but for the lock, which is made anew
        state = dict(self.__dict__)
        del state["_model_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._model_lock = threading.Lock()

    @property
    def model(self) -> torch.nn.Module:
        """The checkpoint's network as ``create_model(card.name)`` builds it, with the weights loaded:
        BatchNorm present, parameters trainable, NCHW, float32, eval mode (``load`` builds it on first use,
        from the weights file, memory-mapped: the inference module holds the rewritten copy)."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = self._rebuild().to(self.device)
        return self._model

    @property
    def inference_module(self) -> torch.nn.Module:
        """The module ``logits``/``predict`` run (the fast path's rewrite of ``model``: folded, split,
        channels-last, reduced-precision weights; ``model`` itself in exact mode): for timing and inspection.
        Its state dict is not the checkpoint's layout; use ``model`` for anything else."""
        return self._forward

    def __repr__(self) -> str:
        exact = ", exact=True" if self.exact else ""
        return f"Segmenter({self.card.name!r}, device={str(self.device)!r}, precision={self.precision!r}{exact})"

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
        settings = self.inference_settings(tta, mode=mode, crop_size=crop_size, stride=stride, scales=scales,
                                           flip=flip)
        x, size = self._as_batch(images)
        with torch.inference_mode(), self._autocast():
            scores = self._scores(x.to(self.device), num_classes=self.card.num_classes,
                                  align_corners=self.card.architecture["align_corners"],
                                  output_size=output_size or size, **settings)
        return scores.float()

    def _scores(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        from .inference.predictor import infer_logits, toolbox_logits

        return (toolbox_logits if self.exact else infer_logits)(self._forward, x, **kwargs)

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
        from .inference.predictor import class_argmax, infer_labels, labels_and_confidence

        settings = self.inference_settings(tta, mode=mode, crop_size=crop_size, stride=stride)
        kwargs = dict(num_classes=self.card.num_classes, align_corners=self.card.architecture["align_corners"],
                      output_size=tuple(size), **settings)
        with torch.inference_mode(), self._autocast():
            if not return_scores:
                if self.exact:  # as the toolbox's inference script: one image at a time, argmax of the full scores
                    labels = torch.cat([class_argmax(self._scores(image[None].to(self.device), **kwargs))
                                        for image in batch])
                else:
                    labels = infer_labels(self._forward, batch.to(self.device), **kwargs)
                return list(labels.cpu().numpy())
            if self.exact:
                scores = torch.cat([self._scores(image[None].to(self.device), **kwargs) for image in batch])
            else:
                scores = self._scores(batch.to(self.device), **kwargs)
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
