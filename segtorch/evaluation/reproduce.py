"""Evaluate one model on a dataset as downloaded, with its card's own test pipeline (``--tta``: the card's
multi-scale + flip settings), beside the figure the card reports. The commands (``segtorch eval``,
``benchmarks/reproduce.py``) are ``segtorch.cli.evaluate``.
"""
from __future__ import annotations


def reported_for(card, tta: bool) -> float | None:
    """The card's figure that the run compares with: single-scale mIoU, or with --tta the published
    figure for the card's TTA settings (flip only at one scale, else multi-scale + flip)."""
    r = card.reported
    if not tta:
        return r.get("miou")
    if list(card.inference.tta.scales) == [1.0]:
        return r.get("miou_flip") if r.get("miou_flip") is not None else r.get("miou_ms_flip")
    return r.get("miou_ms_flip") if r.get("miou_ms_flip") is not None else r.get("miou_flip")


def evaluate_model(name: str, data_root: str, *, checkpoint=None, tta: bool = False, limit: int | None = None,
                   split: str | None = None, device: str | None = None, precision: str = "fp32",
                   exact: bool = False, workers: int = 2,
                   batch_size: int = 4, progress: bool | None = None, distributed: bool = False,
                   runtime: str | None = None):
    """Evaluate one model (its card's test pipeline, or with ``tta`` its ms+flip settings); an EvalResult.
    ``exact``: ``segtorch.load``'s exact mode (the toolbox's computation step for step).

    The reading processes (``workers``) also run the card's test-time resize and normalisation; in whole
    mode up to ``batch_size`` consecutive images of one size share a forward pass (slide mode batches the
    crops of one image instead). ``distributed``: each process of the torch.distributed group evaluates every
    world_size-th image and the per-class counts are summed (the result is the whole split's in every one)."""
    import torch

    import segtorch

    from ..data import dataset_class
    from .evaluator import timed_evaluate

    card = segtorch.model_card(name)
    split = split or card.training.get("eval_split") or card.reported_split or "val"
    dataset = dataset_class(card.dataset)(data_root, split, class_names=card.class_names)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    seg = segtorch.load(card.name, checkpoint=checkpoint, device=device, precision=precision, exact=exact,
                        runtime=runtime)
    if seg.card.class_names != card.class_names:  # a checkpoint trained for other classes
        card = seg.card
        dataset = dataset_class(card.dataset)(data_root, split, class_names=card.class_names)
    whole = (card.inference.tta if tta else card.inference.default).mode == "whole"
    return timed_evaluate(lambda batch, size: seg.predict_prepared(batch, size, tta=tta), dataset,
                          name=card.name, dataset_key=card.dataset, tta=tta, class_names=card.class_names,
                          reported=reported_for(card, tta), limit=limit, num_workers=workers, progress=progress,
                          desc=card.name, prepare=seg.preprocessor(),
                          batch_size=batch_size if whole else 1, distributed=distributed)
