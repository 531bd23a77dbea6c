"""torch.hub entry points, one per model-card name (and alias).

From a clone of this repository (works offline)::

    model = torch.hub.load("path/to/segtorch", "isnet_resnet101os8_ade20k", source="local")

or, once it is published on GitHub, ``torch.hub.load("<github user>/segtorch", name)``. Each entry point returns
the checkpoint's network as ``segtorch.create_model(name)`` builds it, with its published weights: BatchNorm
present, parameters trainable, NCHW, float32, eval mode; its state dict loads with ``strict=True`` into
``create_model(name)`` (``pretrained=False``: random weights, no download). Keyword arguments go to
``segtorch.load`` (``checkpoint``, ``device``); ``segmenter=True`` returns the ``segtorch.Segmenter`` (predict,
logits, and its inference fast path or ``exact=True``) instead.
"""
dependencies = ["torch", "numpy", "PIL", "cv2", "safetensors", "huggingface_hub", "requests", "tqdm", "filelock"]

import segtorch as _segtorch  # noqa: E402


def _entry(name: str):
    def entry(pretrained: bool = True, segmenter: bool = False, **kwargs):
        if not pretrained:
            return _segtorch.create_model(name)
        if segmenter:
            return _segtorch.load(name, **kwargs)
        # no inference rewrite to make: the loaded network itself, read once
        return _segtorch.load(name, **{"fuse_bn": False, "channels_last": False, **kwargs}).model

    card = _segtorch.model_card(name)
    entry.__name__ = name
    entry.__doc__ = (f"{card.family} / {card.backbone} on {card.dataset_title}; reported mIoU "
                     f"{card.reported.get('miou')} (ms+flip {card.reported.get('miou_ms_flip')}).")
    return entry


def _register() -> None:
    for name in _segtorch.list_models():
        globals()[name] = _entry(name)
        for alias in _segtorch.model_card(name).aliases:
            globals()[alias] = _entry(alias)


_register()
