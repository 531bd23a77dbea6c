"""A model trained for other classes than its card's: its file names them (or the caller does), and
``segtorch.load`` builds the model for them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import segtorch
from segtorch.checkpoint import classes_metadata, safetensors_metadata, write_safetensors
from segtorch.errors import CheckpointError, UsageError
from segtorch.models.builder import build_segmentation_model

NAME = "demo_pspnet_shapes"  # six classes; small enough to build in a test
NAMES = ("sky", "road", "car", "tree", "sign")
PALETTE = ((1, 2, 3), (10, 20, 30), (40, 50, 60), (70, 80, 90), (100, 110, 120))


def _trained_file(path, with_classes: bool):
    """A file of the demo architecture with five classes, as ``segtorch train`` writes one (with its classes
    in the metadata) or as a user's own (without)."""
    card = segtorch.model_card(NAME)
    torch.manual_seed(0)
    state = build_segmentation_model(card.architecture, num_classes=5).state_dict()
    meta = safetensors_metadata(NAME, None)
    if with_classes:
        meta.update(classes_metadata(NAMES, PALETTE))
    write_safetensors(state, path, meta)
    return state


def test_a_trained_file_loads_with_the_classes_it_names(tmp_path):
    path = tmp_path / "model.safetensors"
    state = _trained_file(path, with_classes=True)
    seg = segtorch.load(NAME, checkpoint=path)
    assert seg.card.num_classes == 5 and seg.card.class_names == NAMES and seg.card.palette == PALETTE
    assert seg.card.architecture["num_classes"] == 5 and seg.card.reported["miou"] is None  # not the card's figure
    assert torch.equal(seg.model.state_dict()["decoder.1.weight"], state["decoder.1.weight"])
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    with torch.no_grad():
        scores = seg.model(torch.zeros(1, 3, 64, 64))
    assert scores.shape[1] == 5 and seg.predict(image).max() < 5 and seg.colorize(seg.predict(image)).shape == (40, 56, 3)
    assert segtorch.model_card(NAME).num_classes == 6  # the shared card is untouched
    renamed = segtorch.load(NAME, checkpoint=path, class_names=[n.upper() for n in NAMES])
    assert renamed.card.class_names == tuple(n.upper() for n in NAMES) and renamed.card.palette == PALETTE
    with pytest.raises(UsageError, match=r"model\.safetensors was trained for 5 classes, not num_classes=4"):
        segtorch.load(NAME, checkpoint=path, num_classes=4)
    with pytest.raises(UsageError, match=r"trained for 5 classes \(sky, road, car, tree, \.\.\.\); 3 class names given"):
        segtorch.load(NAME, checkpoint=path, class_names=["a", "b", "c"])


def test_a_users_file_of_other_classes_loads_with_num_classes_or_class_names(tmp_path):
    path = tmp_path / "mine.safetensors"
    _trained_file(path, with_classes=False)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: .*decoder\.1\.weight .*\(a model trained for 5 classes\? "
                                              r"load it with num_classes=5 or 5 class_names\)$"):
        segtorch.load(NAME, checkpoint=path)
    seg = segtorch.load(NAME, checkpoint=path, num_classes=5)
    assert seg.card.class_names == tuple(f"class_{i}" for i in range(5)) and len(set(seg.card.palette)) == 5
    assert seg.card.palette[:5] == segtorch.model_card(NAME).palette[:5]  # the card's colours first
    assert segtorch.load(NAME, checkpoint=path, class_names=NAMES).card.class_names == NAMES
    with pytest.raises(UsageError, match="3 class names for num_classes=5"):
        segtorch.load(NAME, checkpoint=path, num_classes=5, class_names=["a", "b", "c"])
    with pytest.raises(UsageError, match="num_classes must be a positive integer, not 0"):
        segtorch.load(NAME, checkpoint=path, num_classes=0)


def test_a_card_with_other_classes_drops_what_described_its_own():
    lip = segtorch.model_card("isnet_resnet50os8_lip")  # flips swap left and right classes
    assert lip.inference.tta.flip_pairs and lip.with_classes() is lip and lip.with_classes(lip.num_classes) is lip
    other = lip.with_classes(class_names=[f"part{i}" for i in range(lip.num_classes)])  # same count, other classes
    assert other.inference.tta.flip_pairs == () and other.inference.default.flip_pairs == ()
    assert other.reported == {k: None for k in lip.reported} and other.name == lip.name
    many = lip.with_classes(300)
    assert len(many.palette) == 300 and many.palette[:20] == lip.palette and len(set(many.palette)) == 300
    with pytest.raises(UsageError, match="a palette of 2 .* colours in 0-255 is needed, not 1 entries"):
        lip.with_classes(2, palette=[(0, 0, 0)])
