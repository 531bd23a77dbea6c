"""Reading ahead, batching and writing behind a model: the scheduling of ``segtorch predict`` and of
``Segmenter.predict`` over a list of images.

``run_pipeline``: reader threads decode and preprocess the next inputs while the model runs; consecutive inputs
of one size go through the model together; writer threads render and write the results behind it. At most
``ahead`` inputs wait read and ``max_pending`` results wait to be written, so memory stays bounded whatever
the number of inputs, and a disk slower than the model holds up the model instead of filling the memory.

``predict_list``: every image of a list read, those of one size batched together wherever they are in the
list, the results back in the list's order.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable, Iterable, Sequence

from ..errors import SegtorchError

# what one input can cause (an unreadable file, a full disk): reported for that input, the others go on.
# Anything else is a bug and stops the run with its traceback.
INPUT_ERRORS = (OSError, SegtorchError)


@dataclasses.dataclass
class PipelineResult:
    written: int      # inputs whose results were all written
    failed: int       # inputs reported through ``on_error``
    interrupted: bool  # Ctrl-C stopped the reading and the model (the results computed were still written)


def run_pipeline(keys: Sequence[Hashable], read: Callable, infer: Callable, write: Callable, *,
                 on_error: Callable[[Hashable, BaseException], None], batch_size: int = 4, workers: int = 2,
                 on_progress: Callable[[int], None] | None = None) -> PipelineResult:
    """Every key through ``read(key) -> (image, x)`` (on reader threads; ``x``: the prepared 1 x 3 x h x w
    input), ``infer(x_batch, (H, W)) -> [result per input]`` (on this thread, up to ``batch_size`` consecutive
    inputs of one original size H x W) and ``write(key, image, result)`` (on writer threads).

    An ``OSError`` or ``SegtorchError`` from ``read`` or ``write`` (or from ``infer``, for the inputs of that
    batch) goes to ``on_error(key, error)`` and the run goes on. Ctrl-C stops reading and inferring; the
    results already computed are still written, and the result says it was interrupted."""
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be at least 1 and workers at least 0; got {batch_size}, {workers}")
    readers = ThreadPoolExecutor(max(1, workers), thread_name_prefix="segtorch-read")
    writers = ThreadPoolExecutor(max(1, workers), thread_name_prefix="segtorch-write")
    ahead, max_pending = max(2, 2 * workers) + batch_size, 4 * batch_size
    queue: deque = deque()
    pending: deque[tuple[Hashable, Future]] = deque()
    remaining = iter(keys)
    counts = {"written": 0, "failed": 0}

    def fail(key, error: BaseException) -> None:
        counts["failed"] += 1
        on_error(key, error)

    def collect(future_item) -> None:
        key, future = future_item
        error = future.exception()
        if error is None:
            counts["written"] += 1
        elif isinstance(error, INPUT_ERRORS):
            fail(key, error)
        else:
            raise error

    def run_batch(batch: list) -> None:
        if not batch:
            return
        try:
            results = infer(_cat([x for _, _, x in batch]), batch[0][1].shape[:2])
        except INPUT_ERRORS as e:
            for key, _, _ in batch:
                fail(key, e)
        else:
            for (key, image, _), result in zip(batch, results, strict=True):
                while len(pending) >= max_pending:  # writes finish in about the order they were submitted
                    collect(pending.popleft())
                pending.append((key, writers.submit(write, key, image, result)))
        if on_progress is not None:
            on_progress(len(batch))
        batch.clear()

    interrupted = False
    try:
        batch: list = []
        while True:
            while len(queue) < ahead and (key := next(remaining, _END)) is not _END:
                queue.append((key, readers.submit(read, key)))
            if not queue:
                break
            key, future = queue.popleft()
            try:
                image, x = future.result()
            except INPUT_ERRORS as e:
                fail(key, e)
                if on_progress is not None:
                    on_progress(1)
                continue
            if batch and (image.shape[:2] != batch[0][1].shape[:2] or len(batch) >= batch_size):
                run_batch(batch)
            batch.append((key, image, x))
        run_batch(batch)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        readers.shutdown(cancel_futures=True)
        try:
            while pending:
                collect(pending.popleft())
        finally:
            writers.shutdown()
    return PipelineResult(counts["written"], counts["failed"], interrupted)


_END = object()


def _cat(tensors: list):
    import torch

    return torch.cat(tensors)


def predict_list(images: Iterable, read: Callable, preprocess: Callable, infer: Callable,
                 batch_size: int) -> list:
    """One result per image, in order: every image read (``read(image) -> H x W x 3 uint8``), then those of
    one size ``preprocess``-ed and run through ``infer(x_batch, (H, W))`` up to ``batch_size`` at a time,
    wherever they are in the list. The decoded images are held; the prepared inputs one batch at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    decoded = [read(image) for image in images]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(decoded):
        by_size.setdefault(image.shape[:2], []).append(i)
    results: list = [None] * len(decoded)
    for size, indices in by_size.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            for i, result in zip(chunk, infer(_cat([preprocess(decoded[i]) for i in chunk]), size), strict=True):
                results[i] = result
    return results
