"""Datasets in their official layouts (small generated trees), label mappings, training transforms."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtorch.data import (ADE20K, COCOStuff10k, IGNORE_INDEX, LIP, VOC, Cityscapes, DatasetError, ImageFolderDataset,
                           PascalContext59, TrainingSet, build_dataset, build_transforms, check_dataset,
                           with_crop_size)
from segtorch.data.transforms import Padding, RandomCrop, RandomFlip, Resize
from toolbox import toolbox_file

IGN = IGNORE_INDEX


# ---- fixture writers (shared with test_evaluation / test_train) ---------------------------------------------
def write_image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def write_png(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        im = Image.fromarray(values.astype(np.uint8), "P")
        im.putpalette([(i * 37) % 256 for i in range(768)])
    else:
        im = Image.fromarray(values.astype(np.uint8), "L")
    im.save(path)


def random_labels(h: int, w: int, values: np.ndarray | list, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.asarray(values), size=(h, w)).astype(np.int64)


def make_ade20k(root: Path, n_train: int = 2, n_val: int = 3, h: int = 24, w: int = 32) -> Path:
    """``root/ADEChallengeData2016`` with raw annotations 0..150 (0 = unlabelled)."""
    top = root / "ADEChallengeData2016"
    for split, folder, n in (("train", "training", n_train), ("val", "validation", n_val)):
        for i in range(n):
            stem = f"ADE_{split}_{i + 1:08d}"
            write_image(top / "images" / folder / f"{stem}.jpg", h, w, seed=i)
            write_png(top / "annotations" / folder / f"{stem}.png", random_labels(h, w, [0, 1, 2, 5, 150], seed=i))
    return top


def make_cityscapes(root: Path, h: int = 16, w: int = 32) -> Path:
    top = root / "cityscapes"
    for split, cities in (("train", ["aachen"]), ("val", ["frankfurt", "lindau"])):
        for city in cities:
            for i in range(2):
                stem = f"{city}_000000_{i:06d}"
                write_image(top / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", h, w, seed=i)
                write_png(top / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                          np.arange(h * w).reshape(h, w) % 35)
    return top


def _savemat(path: Path, data: dict) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), data)


def make_voc(root: Path, h: int = 20, w: int = 24, sbd: bool = True) -> Path:
    """VOCdevkit/VOC2012 (palette PNGs) and, beside it, SBD's benchmark_RELEASE/dataset (.mat)."""
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    voc_train, voc_val = ["2007_000032", "2007_000039"], ["2007_000033"]
    sbd_train, sbd_val = ["2008_000002", "2007_000033"], ["2008_000003", "2007_000039"]
    (sets / "train.txt").write_text("\n".join(voc_train) + "\n")
    (sets / "val.txt").write_text("\n".join(voc_val) + "\n")
    (sets / "trainval.txt").write_text("\n".join(voc_train + voc_val) + "\n")
    for k, i in enumerate(voc_train + voc_val):
        write_image(voc / "JPEGImages" / f"{i}.jpg", h, w, seed=k)
        write_png(voc / "SegmentationClass" / f"{i}.png", random_labels(h, w, [0, 1, 15, 20, 255], seed=k),
                  palette=True)
    if sbd:
        ds = root / "benchmark_RELEASE" / "dataset"
        ds.mkdir(parents=True)
        (ds / "train.txt").write_text("\n".join(sbd_train) + "\n")
        (ds / "val.txt").write_text("\n".join(sbd_val) + "\n")
        for k, i in enumerate(sorted(set(sbd_train + sbd_val))):
            write_image(ds / "img" / f"{i}.jpg", h, w, seed=10 + k)
            seg = np.full((h, w), 7, dtype=np.uint8)
            _savemat(ds / "cls" / f"{i}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.array([7])}})
    return voc


def make_cocostuff10k(root: Path, h: int = 16, w: int = 20) -> Path:
    top = root / "cocostuff-10k-v1.1"
    ids = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
           "test": ["COCO_train2014_000000000080"]}
    (top / "imageLists").mkdir(parents=True)
    for split, names in ids.items():
        (top / "imageLists" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for k, i in enumerate(names):
            write_image(top / "images" / f"{i}.jpg", h, w, seed=k)
            s = random_labels(h, w, [0, 1, 92, 182], seed=k).astype(np.uint16)
            _savemat(top / "annotations" / f"{i}.mat", {"S": s, "names": np.array(["person"], dtype=object)})
    return top


def make_lip(root: Path, h: int = 18, w: int = 12) -> Path:
    """As the official zips unpack: TrainVal_images/TrainVal_images/val_images, ..._parsing_annotations/..."""
    top = root / "LIP"
    for split in ("train", "val"):
        for i in range(2):
            stem = f"{100 + i}_{split}"
            write_image(top / "TrainVal_images" / "TrainVal_images" / f"{split}_images" / f"{stem}.jpg", h, w, seed=i)
            write_png(top / "TrainVal_parsing_annotations" / "TrainVal_parsing_annotations"
                      / f"{split}_segmentations" / f"{stem}.png", random_labels(h, w, [0, 5, 14, 19, 255], seed=i))
    return top


def make_pascalcontext(root: Path, h: int = 14, w: int = 16) -> Path:
    top = root / "VOCdevkit" / "VOC2010"
    sets = top / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    ids = {"train": ["2008_000002"], "val": ["2008_000008", "2008_000015"]}
    for split, names in ids.items():
        (sets / f"{split}.txt").write_text("\n".join(names) + "\n")
        for k, i in enumerate(names):
            write_image(top / "JPEGImages" / f"{i}.jpg", h, w, seed=k)
            write_png(top / "SegmentationClassContext" / f"{i}.png", random_labels(h, w, [0, 1, 30, 59, 255], seed=k))
    return top


def raw_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def _ref_mapping(file: str, cls: str) -> dict | None:
    """The toolbox's ``clsid2label`` literal (read, not imported: importing ssseg pulls in its models)."""
    path = toolbox_file(f"modules/datasets/{file}")
    if path is None:
        return None
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "clsid2label":
                    return ast.literal_eval(stmt.value)
    return None


# ---- layouts and label mappings ---------------------------------------------------------------------------
def test_ade20k_layout_and_zero_shift(tmp_path):
    top = make_ade20k(tmp_path)
    val = ADE20K(top, "val")
    assert len(val) == 3 and val.num_classes == 150 and val.class_names[0] == "wall"
    assert val.palette[0] == (120, 120, 120) and len(val.palette) == 150  # the cards' palette
    assert ADE20K(tmp_path, "train").root == top  # the folder holding ADEChallengeData2016 works too
    item = val[0]
    raw = raw_png(top / "annotations" / "validation" / "ADE_val_00000001.png")
    assert item["image"].shape == (24, 32, 3) and item["image"].dtype == np.uint8 and item["id"] == "ADE_val_00000001"
    assert np.array_equal(item["label"], np.where(raw == 0, IGN, raw - 1))
    assert set(np.unique(item["label"])) <= {IGN, 0, 1, 4, 149}


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    top = make_cityscapes(tmp_path)
    val = Cityscapes(tmp_path, "val")
    assert val.root == top and len(val) == 4 and [s.id for s in val.samples][0] == "frankfurt_000000_000000"
    item = val[0]
    raw = raw_png(top / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000000_gtFine_labelIds.png")
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id in range(35):
        got = np.unique(item["label"][raw == label_id])
        assert got.tolist() == [expected.get(label_id, IGN)], label_id
    ref = _ref_mapping("cityscapes.py", "CityScapesDataset")
    if ref is not None:  # the same table as the toolbox's
        assert {k: v for k, v in ref.items() if v != -100} == Cityscapes.id_to_class


def test_voc_palette_pngs_and_trainaug_with_sbd(tmp_path):
    voc = make_voc(tmp_path)
    val = VOC(tmp_path / "VOCdevkit", "val")
    raw = raw_png(voc / "SegmentationClass" / "2007_000033.png")
    assert Image.open(voc / "SegmentationClass" / "2007_000033.png").mode == "P"
    assert np.array_equal(val[0]["label"], np.where(raw == 255, IGN, raw))  # palette indices, not colours
    aug = VOC(voc, "trainaug")
    # VOC train + SBD train + SBD val, minus VOC val
    assert [s.id for s in aug.samples] == ["2007_000032", "2007_000039", "2008_000002", "2008_000003"]
    by_id = {s.id: s for s in aug.samples}
    assert by_id["2007_000039"].label.suffix == ".png"  # VOC's own annotation preferred
    assert by_id["2008_000002"].label.suffix == ".mat" and by_id["2008_000002"].image.parent.name == "img"
    assert np.unique(aug[2]["label"]).tolist() == [7]


def test_voc_trainaug_without_sbd_is_a_clear_error(tmp_path):
    voc = make_voc(tmp_path, sbd=False)
    with pytest.raises(DatasetError, match="trainaug split needs SBD"):
        VOC(voc, "trainaug")


def test_cocostuff10k_mat_and_182_classes(tmp_path):
    top = make_cocostuff10k(tmp_path)
    test = COCOStuff10k(tmp_path, "test")
    assert test.root == top and len(test) == 1 and test.num_classes == 182
    from scipy.io import loadmat

    raw = loadmat(str(top / "annotations" / "COCO_train2014_000000000080.mat"))["S"].astype(np.int64)
    assert np.array_equal(test[0]["label"], np.where(raw == 0, IGN, raw - 1))
    assert set(np.unique(test[0]["label"])) == {IGN, 0, 91, 181}
    assert test.class_names[91] == "banner" and test.class_names[181] == "wood"


def test_lip_official_nesting(tmp_path):
    top = make_lip(tmp_path)
    val = LIP(tmp_path, "val")
    assert val.root == top and len(val) == 2
    raw = raw_png(top / "TrainVal_parsing_annotations" / "TrainVal_parsing_annotations" / "val_segmentations"
                  / "100_val.png")
    assert np.array_equal(val[0]["label"], np.where(raw == 255, IGN, raw))


def test_pascal_context59_shift(tmp_path):
    top = make_pascalcontext(tmp_path)
    val = PascalContext59(tmp_path / "VOCdevkit", "val")
    assert val.root == top and len(val) == 2 and val.num_classes == 59
    raw = raw_png(top / "SegmentationClassContext" / "2008_000008.png")
    assert np.array_equal(val[0]["label"], np.where((raw == 0) | (raw == 255), IGN, raw - 1))
    ref = _ref_mapping("voc.py", "PascalContext59Dataset")
    if ref is not None:  # the toolbox: {0: -100, 255: -100} then a loop adding k -> k - 1
        assert ref == {0: -100, 255: -100} and "clsid2label[i] = i - 1" in toolbox_file("modules/datasets/voc.py").read_text()


def test_build_dataset_by_card_key(tmp_path):
    make_ade20k(tmp_path)
    ds = build_dataset("ade20k", tmp_path, "val")
    assert isinstance(ds, ADE20K) and len(ds) == 3


# ---- the user's own folders -------------------------------------------------------------------------------
def _folders(tmp_path, n=2, h=10, w=12, values=(0, 1, 2, 255)):
    for i in range(n):
        write_image(tmp_path / "images" / f"img{i}.jpg", h, w, seed=i)
        write_png(tmp_path / "masks" / f"img{i}.png", random_labels(h, w, list(values), seed=i))
    return tmp_path / "images", tmp_path / "masks"


def test_image_folder_dataset(tmp_path):
    images, masks = _folders(tmp_path)
    ds = ImageFolderDataset(images, masks, num_classes=3)
    assert len(ds) == 2 and ds.class_names == ("class_0", "class_1", "class_2")
    raw = raw_png(masks / "img0.png")
    assert np.array_equal(ds[0]["label"], np.where(raw == 255, IGN, raw))
    shifted = ImageFolderDataset(images, masks, num_classes=2, reduce_zero_label=True)
    assert np.array_equal(shifted[0]["label"], np.where((raw == 0) | (raw == 255), IGN, raw - 1))


def test_image_folder_errors_name_the_path(tmp_path):
    images, masks = _folders(tmp_path, values=(0, 1, 7))
    with pytest.raises(DatasetError, match=r"img\d\.png: label value 7 is not a class"):
        ds = ImageFolderDataset(images, masks, num_classes=3)
        ds[0], ds[1]
    write_png(masks / "img1.png", np.zeros((5, 5)))
    with pytest.raises(DatasetError, match=r"img1\.png: annotation is 5x5 but image .*img1\.jpg is 12x10"):
        ImageFolderDataset(images, masks, num_classes=8)[1]
    (masks / "img1.png").unlink()
    with pytest.raises(DatasetError, match=r"img1\.png: missing annotation for image"):
        ImageFolderDataset(images, masks, num_classes=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no images"):
        ImageFolderDataset(tmp_path / "empty", masks, num_classes=8)
    with pytest.raises(DatasetError, match=r"nowhere: no such directory"):
        ImageFolderDataset(tmp_path / "nowhere", masks, num_classes=8)


def test_dataset_check_finds_every_unusable_sample_before_any_is_read(tmp_path):
    """Another size, a label above the class count, a colour mask, an unreadable image: all found at once, in
    one line, naming the files; the good samples pass, and a clean set passes whole."""
    images, masks = _folders(tmp_path / "ok", n=3, values=(0, 1, 255))
    check_dataset(ImageFolderDataset(images, masks, num_classes=3), workers=2)
    images, masks = _folders(tmp_path / "bad", n=6, values=(0, 1))
    write_png(masks / "img1.png", np.zeros((5, 5)))  # another size
    write_png(masks / "img2.png", np.full((10, 12), 3))  # class 3 of three classes
    colour = np.zeros((10, 12, 3), np.uint8)
    colour[:, 6:] = (200, 30, 30)
    Image.fromarray(colour).save(masks / "img3.png")
    (images / "img4.jpg").write_bytes(b"not an image")
    dataset = ImageFolderDataset(images, masks, num_classes=3)
    with pytest.raises(DatasetError) as caught:
        check_dataset(dataset, workers=2)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("4 of 6 samples cannot be used: ")
    assert "img1.png: annotation is 5x5 but image" in message and "img2.png: label value 3 is not a class" in message
    assert "img3.png: colour mask" in message and "... (4 in all)" in message
    for i in (1, 2, 3):
        write_png(masks / f"img{i}.png", np.zeros((10, 12)))
    with pytest.raises(DatasetError, match=r"^1 of 6 samples cannot be used: .*img4\.jpg: cannot read image"):
        check_dataset(dataset)


def test_dataset_check_sizes_follow_exif_orientation_and_card_datasets_read_headers(tmp_path):
    images, masks = _folders(tmp_path, n=1, values=(0, 1))  # 12 wide, 10 high
    im = Image.open(images / "img0.jpg")
    exif = im.getexif()
    exif[0x0112] = 6  # stored 12x10, shown turned: 10x12, as the reader returns it
    im.save(images / "img0.jpg", exif=exif)
    with pytest.raises(DatasetError, match=r"img0\.png: annotation is 12x10 but image .*img0\.jpg is 10x12"):
        check_dataset(ImageFolderDataset(images, masks, num_classes=3))
    write_png(masks / "img0.png", np.zeros((12, 10)))
    check_dataset(ImageFolderDataset(images, masks, num_classes=3))
    top = make_ade20k(tmp_path / "ade")
    check_dataset(ADE20K(top, "val"))  # values outside the classes are the toolbox's "ignore", not errors
    first = sorted((top / "annotations" / "validation").iterdir())[0]
    write_png(first, np.zeros((3, 3)))
    with pytest.raises(DatasetError, match=r"1 of 3 samples cannot be used: .*annotation is 3x3 but image"):
        check_dataset(ADE20K(top, "val"))


def test_bad_roots_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"missing: no such directory"):
        ADE20K(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match=r"other: does not hold ADE20K \(expected images/ and annotations/"):
        ADE20K(tmp_path / "other")
    top = make_ade20k(tmp_path / "a")
    for p in (top / "annotations" / "validation").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"ADE_val_00000001\.png: missing annotation for image"):
        ADE20K(top, "val")
    with pytest.raises(DatasetError, match=r"unknown ADE20K split 'test'"):
        ADE20K(top, "test")
    (top / "annotations" / "validation").rmdir()
    with pytest.raises(DatasetError, match=r"annotations/validation: missing folder"):
        ADE20K(top, "val")
    for e in (DatasetError("x"),):
        assert "\n" not in str(e)


# ---- transforms -------------------------------------------------------------------------------------------
def test_resize_keep_ratio_as_the_toolbox():
    sample = {"image": np.zeros((30, 40, 3), np.uint8), "label": np.zeros((30, 40), np.float32)}
    out = Resize((2048, 512), keep_ratio=True, scale_range=None)(dict(sample), np.random.default_rng(0))
    # scale = min(2048/40, 512/30) = 17.07 -> (683, 512): int(40 * s + 0.5), int(30 * s + 0.5)
    assert out["image"].shape[:2] == (512, 683) and out["label"].shape == (512, 683)
    out = Resize((520, 520), keep_ratio=False, scale_range=None)(dict(sample), np.random.default_rng(0))
    assert out["image"].shape[:2] == (520, 520)


def test_random_crop_max_category_ratio_and_flip_pairs():
    label = np.zeros((40, 40), np.float32)
    label[:, 30:] = 1  # class 1 only in the right quarter: most windows would be all class 0
    sample = {"image": np.zeros((40, 40, 3), np.uint8), "label": label}
    crop = RandomCrop((10, 20), one_category_max_ratio=0.75)
    for seed in range(10):
        out = crop(dict(sample), np.random.default_rng(seed))
        values, counts = np.unique(out["label"], return_counts=True)
        assert out["label"].shape == (10, 20)
        assert len(values) == 2 and counts.max() / counts.sum() < 0.75  # ten tries find a mixed window
    flip = RandomFlip(prob=1.0, fixed_seg_target_pairs=[(14, 15)])
    lab = np.array([[14, 15, 3]], np.float32)
    out = flip({"image": np.zeros((1, 3, 3), np.uint8), "label": lab}, np.random.default_rng(0))
    assert out["label"].tolist() == [[3, 14, 15]]  # flipped, then left/right classes swapped


def test_padding_centres_and_fills_ignore():
    sample = {"image": torch.ones(3, 4, 6), "label": torch.zeros(4, 6, dtype=torch.long)}
    out = Padding((8, 8))(sample, np.random.default_rng(0))
    assert out["image"].shape == (3, 8, 8) and out["label"].shape == (8, 8)
    assert out["label"][0, 0] == IGN and out["label"][2, 1] == 0 and out["image"][0, 0, 0] == 0


def test_card_pipeline_is_deterministic_per_seed_epoch_index(tmp_path):
    import segtorch

    make_ade20k(tmp_path, h=40, w=56)
    card = segtorch.model_card("pspnet_resnet50os8_ade20k")
    pipeline = with_crop_size(card.training["train_pipeline"], (32, 32))
    assert [s["type"] for s in pipeline][:3] == ["Resize", "RandomCrop", "RandomFlip"]
    assert pipeline[0]["output_size"] == [128, 32]  # (2048, 512) scaled with the crop (512 -> 32)
    train = TrainingSet(ADE20K(tmp_path, "train"), build_transforms(pipeline), seed=3)
    image, label = train[(1, 0)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label.shape == (32, 32)
    assert label.dtype == torch.int64 and set(label.unique().tolist()) <= {IGN, 0, 1, 4, 149}
    again, _ = train[(1, 0)]
    other, _ = train[(1, 1)]
    assert torch.equal(image, again) and not torch.equal(image, other)


def test_lip_pipeline_with_rotation_and_edge_step():
    import segtorch

    card = segtorch.model_card("isnet_resnet101os8_lip")
    pipeline = with_crop_size(card.training["train_pipeline"], (24, 24))
    transforms = build_transforms(pipeline)
    sample = {"image": np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8),
              "label": np.random.default_rng(1).integers(0, 20, (30, 20)).astype(np.float32)}
    out = transforms(sample, np.random.default_rng(5))
    assert out["image"].shape[1:] in ((24, 24),) and out["label"].dtype == torch.int64
    assert set(out["label"].unique().tolist()) <= set(range(20)) | {IGN}
