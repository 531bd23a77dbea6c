"""torch.hub entry points: ``torch.hub.load("<owner>/segtorch", "isnet_resnet101os8_ade20k")``.

Every model-card name (and alias) is an entry point returning the ``nn.Module`` with its published weights
(``pretrained=False``: random weights, no download). Keyword arguments go to ``segtorch.load`` (``checkpoint``,
``device``, ``precision``); ``segmenter=True`` returns the ``segtorch.Segmenter`` (predict, logits) instead.
"""
dependencies = ["torch", "numpy", "PIL", "cv2", "safetensors", "huggingface_hub", "requests", "tqdm", "filelock"]

import segtorch as _segtorch  # noqa: E402


def _entry(name: str):
    def entry(pretrained: bool = True, segmenter: bool = False, **kwargs):
        if not pretrained:
            return _segtorch.create_model(name)
        seg = _segtorch.load(name, **kwargs)
        return seg if segmenter else seg.model

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
