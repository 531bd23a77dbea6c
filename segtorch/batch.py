"""``BatchPredictor``: segtorch as the callable class of Ray Data's ``map_batches`` (or any batch engine).

    import ray, segtorch
    ds = ray.data.read_images("s3://bucket/images/", include_paths=True)
    ds = ds.map_batches(segtorch.BatchPredictor, fn_constructor_kwargs={"name": "pspnet_resnet50os8_ade20k"},
                        batch_size=8, num_gpus=1, concurrency=4)
    ds.write_parquet("s3://bucket/labels/")

Ray builds one instance per actor (the model loads once there) and calls it with batches of rows. The class
needs only the ``segtorch[ray]`` extra on the workers; segtorch itself never imports Ray.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

OUTPUTS = ("labels", "confidence")


class BatchPredictor:
    """Segments a batch ``{"image": images, ...}`` and returns it with ``"labels"`` (and ``"confidence"``,
    the per-pixel max class probability, where ``outputs`` asks for it) added; other columns pass through.

    ``images``: an N x H x W x 3 uint8 array, or a list or object array of H x W x 3 arrays of different
    sizes (what ``ray.data.read_images`` gives), paths, encoded bytes or PIL images. The labels come back as an
    N x H x W int32 array where all images have one size, else as an object array of H x W arrays. Images of
    one size share forward passes (``Segmenter.predict`` on a list). ``device``: None = ``cuda`` where torch
    sees a GPU (Ray gives an actor with ``num_gpus=1`` its own), else ``cpu``.

    An instance pickles as its constructor's arguments: unpickled, it loads its model again.
    """

    def __init__(self, name: str, checkpoint: str | None = None, device: str | None = None,
                 precision: str = "fp32", tta: bool = False, outputs: Sequence[str] = ("labels",),
                 batch_size: int = 8):
        from .api import load
        from .errors import UsageError

        outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        unknown = [o for o in outputs if o not in OUTPUTS]
        if unknown or "labels" not in outputs:
            raise UsageError(f"outputs {list(outputs)!r}: give 'labels', and 'confidence' if wanted")
        self._arguments = dict(name=name, checkpoint=checkpoint, device=device, precision=precision, tta=tta,
                               outputs=outputs, batch_size=batch_size)
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.seg = load(name, checkpoint=checkpoint, device=device, precision=precision)
        self.tta, self.outputs, self.batch_size = tta, outputs, batch_size

    def __reduce__(self):
        return _rebuild, (self._arguments,)

    def __repr__(self) -> str:
        return f"BatchPredictor({self.seg!r}, tta={self.tta}, outputs={self.outputs})"

    def __call__(self, batch: dict) -> dict:
        from .errors import UsageError

        if "image" not in batch:
            raise UsageError(f"BatchPredictor takes batches with an 'image' column; got {sorted(batch)}")
        images = batch["image"]
        images = list(images) if isinstance(images, (np.ndarray, list, tuple)) else [images]
        want_confidence = "confidence" in self.outputs
        results = self.seg.predict(images, tta=self.tta, return_scores=want_confidence, batch_size=self.batch_size)
        out = dict(batch)
        if want_confidence:
            out["labels"] = _column([labels for labels, _ in results])
            out["confidence"] = _column([confidence for _, confidence in results])
        else:
            out["labels"] = _column(results)
        return out


def _rebuild(arguments: dict) -> BatchPredictor:
    return BatchPredictor(**arguments)


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """One array per row: stacked where they share a shape, else an object array (a ragged tensor column)."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column
