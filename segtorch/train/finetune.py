"""The model a fine-tuning run starts from: the card's architecture (with the run's number of classes) and its
auxiliary heads, initialised from the card's weights, a checkpoint file, or at random; the per-class training
state the new classes need starts as the toolbox starts a fresh model, and the log says what was kept.
"""
from __future__ import annotations


def build_model(card, num_classes: int, init: str, log=print):
    """The card's architecture (with ``num_classes``) and its auxiliary heads, initialised from ``init``."""
    import torch

    from ..checkpoint import load_matching
    from ..models.builder import build_segmentation_model

    model = build_segmentation_model(card.architecture, auxiliary=True, num_classes=num_classes)
    if init == "scratch":
        log("init: random weights (no pretrained backbone)")
        return model
    if init == "pretrained":
        from ..weights import fetch_weights

        path = fetch_weights(card)
    else:
        path = init
    state, reshaped, missing = load_matching(path, model, keep=("auxiliary_decoder.",))
    expected = model.state_dict()
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    log(f"init: {path} ({len(state)} tensors)"
        + (f"; new (shape differs): {', '.join(reshaped)}" if reshaped else "")
        + (f"; not in the file, left random: {len(missing)} tensors ({missing[0]} ...)" if missing else ""))
    fresh = [f"{k} ({how})" for k, how in FRESH_TRAINING_STATE.items()
             if k in expected and (k in reshaped or k not in state)]
    if hasattr(model, "selected_classes_counter"):  # in no checkpoint file
        fresh.append(f"selected_classes_counter ({FRESH_TRAINING_STATE['selected_classes_counter']})")
    if fresh:
        log("init: training state re-initialised as the toolbox initialises a fresh model: " + ", ".join(fresh))
    return model


# what the toolbox gives the training statistics of a fresh model (segtorch's constructors do the same)
FRESH_TRAINING_STATE = {"memory_module.memory": "zeros: each class's slot is filled at its first use",
                        "class_relations_mean": "identity", "class_relations_var": "identity",
                        "dl_cls_representations": "zeros", "selected_classes_counter": "1e-6 each"}
