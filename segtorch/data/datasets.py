"""Segmentation datasets read from the folders users download, plus a folder-of-images-and-masks dataset.

Every dataset yields ``{"image": HxWx3 uint8 RGB, "label": HxW int64, "id": str}``. Labels are the model's
class indices; pixels that carry no class are ``IGNORE_INDEX`` (-100, the toolbox's value, which is also
the ignore index of the cards' losses). Raw annotation values are mapped as the toolbox maps them:

- ADE20K, PASCAL-Context-59, COCO-Stuff-10k: value 0 is "unlabelled", class k is stored as k + 1;
- Cityscapes: the 34 label ids (``*_gtFine_labelIds.png``) map to the 19 train ids;
- VOC, LIP: stored values are the classes; 255 (object boundaries in VOC) is ignored;
- anything outside the classes is ignored (the toolbox's evaluation does the same).

No list files of our making are needed: splits come from the datasets' own lists or folders. A wrong or
incomplete layout raises ``DatasetError`` with one line naming the path and what is wrong.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError, UsageError  # noqa: F401 - DatasetError re-exported
from ..imageops import IMAGE_SUFFIXES

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    label: Path


@functools.lru_cache(maxsize=None)
def _card_dataset(key: str) -> dict:
    from ..registry import dataset_info  # model_cards/datasets/<key>.toml: the cards' class names and palette

    return dataset_info(key)


def dataset_classes(key: str) -> tuple[str, ...]:
    """Class names of a card dataset (``ade20k``, ``cityscapes``, ...), as the model cards give them."""
    return tuple(_card_dataset(key)["class_names"])


def dataset_palette(key: str) -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(c) for c in _card_dataset(key)["palette"])


def read_rgb(path: Path) -> np.ndarray:
    from ..inference.image import read_image  # decodes exactly like the toolbox's cv2.imread, returns RGB

    try:
        return read_image(path)
    except (OSError, ValueError) as e:
        raise DatasetError(str(e)) from None


def read_mask(path: Path) -> np.ndarray:
    """A label image as stored: the palette index for palette PNGs (VOC), the value for gray PNGs; ``.mat``
    files hold COCO-Stuff's ``S`` or SBD's ``GTcls.Segmentation``."""
    if path.suffix == ".mat":
        return _read_mat(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                a = np.asarray(im)
                if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
                    raise DatasetError(f"{path}: colour mask; expected a single-channel PNG of class indices "
                                       f"(gray or palette)")
                return np.ascontiguousarray(a[..., 0])
            return np.asarray(im)  # P, L, I;16, I
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation ({e})") from None


def _read_mat(path: Path) -> np.ndarray:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency of the data extra
        raise DatasetError(f"{path}: reading .mat annotations needs scipy (pip install scipy)") from None
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError) as e:
        raise DatasetError(f"{path}: cannot read .mat annotation ({e})") from None
    if "S" in mat:  # COCO-Stuff
        return np.asarray(mat["S"])
    if "GTcls" in mat:  # SBD
        return np.asarray(mat["GTcls"].Segmentation)
    raise DatasetError(f"{path}: .mat file has neither 'S' (COCO-Stuff) nor 'GTcls' (SBD)")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing folder ({what})")
    return path


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing split list")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: empty split list")
    return ids


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: a list of (image, annotation) files and the mapping of stored values to classes.

    Subclasses set ``key`` (the cards' dataset name), ``markers`` (paths that identify the dataset's top
    folder), ``aliases`` (the usual names of that folder, tried under a parent folder), and implement
    ``find_samples``.
    """

    key: ClassVar[str] = ""
    title: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    markers: ClassVar[tuple[str, ...]] = ()
    aliases: ClassVar[tuple[str, ...]] = ()
    layout: ClassVar[str] = ""  # one line for error messages: what the top folder holds
    reduce_zero_label: ClassVar[bool] = False  # stored 0 = unlabelled, class k stored as k + 1
    id_to_class: ClassVar[dict[int, int] | None] = None  # stored value -> class (others ignored)
    decode_masks_to_check: ClassVar[bool] = False  # checks.check_dataset reads mask headers only

    def __init__(self, root: str | Path, split: str = "val", class_names: Sequence[str] | None = None):
        self.root = self.locate(root)
        if split not in self.splits:
            raise DatasetError(f"{self.root}: unknown {self.title} split {split!r}; choose from {', '.join(self.splits)}")
        self.split = split
        self.class_names = tuple(class_names) if class_names is not None else dataset_classes(self.key)
        self.num_classes = len(self.class_names)
        self.palette = dataset_palette(self.key)
        self.samples: list[Sample] = self.find_samples()
        if not self.samples:
            raise DatasetError(f"{self.root}: no {self.title} images for split {split!r}")
        self._lut = self._lookup_table()

    # ---- layout ------------------------------------------------------------------------------------------
    @classmethod
    def matches(cls, root: Path) -> bool:
        return all((root / m).exists() for m in cls.markers)

    @classmethod
    def find_root(cls, root: str | Path) -> Path | None:
        """``root`` itself when it is the dataset's top folder, else one of the usual names under it."""
        root = Path(root).expanduser()
        for candidate in (root, *(root / a for a in cls.aliases)):
            if candidate.is_dir() and cls.matches(candidate):
                return candidate
        return None

    @classmethod
    def locate(cls, root: str | Path) -> Path:
        path = Path(root).expanduser()
        if not path.exists():
            raise DatasetError(f"{path}: no such directory")
        if not path.is_dir():
            raise DatasetError(f"{path}: not a directory")
        found = cls.find_root(path)
        if found is None:
            raise DatasetError(f"{path}: does not hold {cls.title} (expected {cls.layout})")
        return found

    def find_samples(self) -> list[Sample]:
        raise NotImplementedError

    def _with_labels(self, images: list[Path], label_for) -> list[Sample]:
        samples = []
        for image in images:
            label = label_for(image)
            if not label.is_file():
                raise DatasetError(f"{label}: missing annotation for image {image}")
            samples.append(Sample(image.stem, image, label))
        return samples

    # ---- labels ------------------------------------------------------------------------------------------
    def _lookup_table(self) -> np.ndarray | None:
        if self.id_to_class is None:
            return None
        lut = np.full(max(self.id_to_class) + 1, IGNORE_INDEX, dtype=np.int64)
        for raw, cls_index in self.id_to_class.items():
            lut[raw] = cls_index
        return lut

    def encode(self, raw: np.ndarray) -> np.ndarray:
        """Stored annotation values -> class indices (int64), everything else ``IGNORE_INDEX``."""
        raw = raw.astype(np.int64)
        if self._lut is not None:
            inside = (raw >= 0) & (raw < len(self._lut))
            return np.where(inside, self._lut[np.clip(raw, 0, len(self._lut) - 1)], IGNORE_INDEX)
        labels = raw - 1 if self.reduce_zero_label else raw
        return np.where((labels >= 0) & (labels < self.num_classes), labels, IGNORE_INDEX)

    # ---- access ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, index: int) -> np.ndarray:
        return self.encode(read_mask(self.samples[index].label))

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_rgb(sample.image)
        label = self.read_label(index)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"{sample.label}: annotation is {label.shape[1]}x{label.shape[0]} but image "
                               f"{sample.image} is {image.shape[1]}x{image.shape[0]} (width x height)")
        return {"image": image, "label": label, "id": sample.id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"


class ADE20K(SegmentationDataset):
    """``ADEChallengeData2016/{images,annotations}/{training,validation}``; 150 classes, 0 = unlabelled."""

    key, title = "ade20k", "ADE20K"
    markers = ("images", "annotations")
    aliases = ("ADEChallengeData2016", "ade/ADEChallengeData2016", "ADE20k/ADEChallengeData2016")
    layout = "images/ and annotations/ with training/ and validation/, as in ADEChallengeData2016"
    reduce_zero_label = True
    _folders = {"train": "training", "val": "validation"}

    def find_samples(self) -> list[Sample]:
        sub = self._folders[self.split]
        images = _require_dir(self.root / "images" / sub, f"{self.title} {self.split} images")
        labels = _require_dir(self.root / "annotations" / sub, f"{self.title} {self.split} annotations")
        return self._with_labels(_images_in(images), lambda p: labels / f"{p.stem}.png")


class Cityscapes(SegmentationDataset):
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with ``gtFine/{split}/{city}/*_gtFine_labelIds.png``."""

    key, title = "cityscapes", "Cityscapes"
    splits = ("train", "val", "test")
    markers = ("leftImg8bit", "gtFine")
    aliases = ("cityscapes", "Cityscapes", "CityScapes")
    layout = "leftImg8bit/ and gtFine/"
    # label id -> train id (cityscapesScripts' labels.py; unlisted ids are ignored)
    id_to_class = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                   26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

    def find_samples(self) -> list[Sample]:
        images = _require_dir(self.root / "leftImg8bit" / self.split, f"{self.title} {self.split} images")
        labels = _require_dir(self.root / "gtFine" / self.split, f"{self.title} {self.split} annotations")
        files = sorted(images.glob("*/*_leftImg8bit.png"))
        samples = []
        for image in files:
            stem = image.name[: -len("_leftImg8bit.png")]
            label = labels / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if not label.is_file():
                raise DatasetError(f"{label}: missing annotation for image {image}")
            samples.append(Sample(stem, image, label))
        return samples


class VOC(SegmentationDataset):
    """PASCAL VOC 2012 (``VOCdevkit/VOC2012``) and the SBD augmented training set.

    ``train``/``val``/``trainval`` use ``ImageSets/Segmentation``. ``trainaug`` (10,582 images) is VOC train
    plus SBD train and val, minus VOC val. Its annotations come from ``SegmentationClass`` where VOC has one,
    else from ``SegmentationClassAug`` (the widely shared PNG conversion of SBD) or SBD's own
    ``dataset/cls/*.mat``. SBD (``benchmark_RELEASE``) is looked for beside and inside the VOC folder, or
    given as ``sbd_root``.
    """

    key, title = "voc", "PASCAL VOC 2012"
    splits = ("train", "val", "trainval", "trainaug")
    markers = ("JPEGImages", "ImageSets/Segmentation")
    aliases = ("VOC2012", "VOCdevkit/VOC2012")
    layout = "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/, as in VOCdevkit/VOC2012"

    def __init__(self, root: str | Path, split: str = "val", class_names: Sequence[str] | None = None,
                 sbd_root: str | Path | None = None):
        self.sbd_root = Path(sbd_root).expanduser() if sbd_root is not None else None
        super().__init__(root, split, class_names)

    def _sbd(self) -> Path | None:
        """SBD's ``dataset`` folder (holding cls/, img/, train.txt, val.txt), if there is one."""
        places = [self.sbd_root] if self.sbd_root is not None else [
            self.root / "SBD", self.root.parent / "SBD", self.root.parent.parent / "SBD",
            self.root / "benchmark_RELEASE", self.root.parent / "benchmark_RELEASE",
            self.root.parent.parent / "benchmark_RELEASE"]
        for place in places:
            for candidate in (place, place / "dataset", place / "benchmark_RELEASE" / "dataset"):
                if (candidate / "cls").is_dir() and (candidate / "train.txt").is_file():
                    return candidate
        if self.sbd_root is not None:
            raise DatasetError(f"{self.sbd_root}: not an SBD folder (expected benchmark_RELEASE/dataset with cls/ "
                               f"and train.txt)")
        return None

    def find_samples(self) -> list[Sample]:
        sets = self.root / "ImageSets" / "Segmentation"
        images = _require_dir(self.root / "JPEGImages", "VOC images")
        voc_labels = self.root / "SegmentationClass"
        if self.split != "trainaug":
            _require_dir(voc_labels, "VOC annotations")
            ids = _read_list(sets / f"{self.split}.txt")
            return self._with_labels([images / f"{i}.jpg" for i in ids], lambda p: voc_labels / f"{p.stem}.png")
        aug_labels = self.root / "SegmentationClassAug"
        sbd = self._sbd()
        if (sets / "trainaug.txt").is_file():
            ids = _read_list(sets / "trainaug.txt")
        elif sbd is not None:
            val = set(_read_list(sets / "val.txt"))
            pool = _read_list(sets / "train.txt") + _read_list(sbd / "train.txt") + _read_list(sbd / "val.txt")
            ids = sorted(set(pool) - val)
        else:
            raise DatasetError(f"{self.root}: the trainaug split needs SBD (benchmark_RELEASE/dataset beside "
                               f"VOCdevkit, or sbd_root=...) or SegmentationClassAug/ with "
                               f"ImageSets/Segmentation/trainaug.txt")
        samples = []
        for i in ids:
            image = images / f"{i}.jpg"
            if not image.is_file() and sbd is not None:
                image = sbd / "img" / f"{i}.jpg"
            candidates = [voc_labels / f"{i}.png", aug_labels / f"{i}.png"]
            if sbd is not None:
                candidates.append(sbd / "cls" / f"{i}.mat")
            label = next((c for c in candidates if c.is_file()), None)
            if not image.is_file():
                raise DatasetError(f"{image}: missing image of trainaug id {i}")
            if label is None:
                raise DatasetError(f"{candidates[0]}: missing annotation of trainaug id {i} (also looked in "
                                   f"{', '.join(str(c.parent) for c in candidates[1:])})")
            samples.append(Sample(i, image, label))
        return samples


class COCOStuff10k(SegmentationDataset):
    """COCO-Stuff-10k v1.1: ``images/*.jpg``, ``annotations/*.mat`` (``S``: 0 unlabelled, 1..182 the classes
    of the 182-class list), ``imageLists/{train,test}.txt``."""

    key, title = "cocostuff10k", "COCO-Stuff-10k"
    splits = ("train", "test", "all")
    markers = ("images", "annotations", "imageLists")
    aliases = ("cocostuff-10k-v1.1", "cocostuff-10k", "COCOStuff10k", "cocostuff10k", "coco_stuff10k")
    layout = "images/, annotations/ (.mat) and imageLists/, as in cocostuff-10k-v1.1.zip"
    reduce_zero_label = True

    def find_samples(self) -> list[Sample]:
        ids = _read_list(self.root / "imageLists" / f"{self.split}.txt")
        images, labels = self.root / "images", self.root / "annotations"
        samples = []
        for i in ids:
            image = images / f"{i}.jpg"
            if not image.is_file():
                raise DatasetError(f"{image}: missing image listed in imageLists/{self.split}.txt")
            label = labels / f"{i}.mat"
            if not label.is_file():
                raise DatasetError(f"{label}: missing annotation for image {image}")
            samples.append(Sample(i, image, label))
        return samples


class LIP(SegmentationDataset):
    """LIP: ``{train,val}_images/*.jpg`` and ``{train,val}_segmentations/*.png`` (0 background .. 19 classes),
    either directly in the folder or as the official zips unpack them (``TrainVal_images/``,
    ``TrainVal_parsing_annotations/``)."""

    key, title = "lip", "LIP"
    aliases = ("LIP", "lip")
    layout = "train_images/ and train_segmentations/ (or val_*), or TrainVal_images/ and TrainVal_parsing_annotations/"
    _image_places = (".", "TrainVal_images", "TrainVal_images/TrainVal_images")
    _label_places = (".", "TrainVal_parsing_annotations", "TrainVal_parsing_annotations/TrainVal_parsing_annotations",
                     "TrainVal_parsing_annotations/TrainVal_parsing_annotations/TrainVal_parsing_annotations")

    @classmethod
    def _find(cls, root: Path, places: Sequence[str], name: str) -> Path | None:
        return next((root / p / name for p in places if (root / p / name).is_dir()), None)

    @classmethod
    def matches(cls, root: Path) -> bool:
        return any(cls._find(root, cls._image_places, f"{s}_images") for s in cls.splits)

    def find_samples(self) -> list[Sample]:
        images = self._find(self.root, self._image_places, f"{self.split}_images")
        labels = self._find(self.root, self._label_places, f"{self.split}_segmentations")
        if images is None:
            raise DatasetError(f"{self.root}: missing folder {self.split}_images")
        if labels is None:
            raise DatasetError(f"{self.root}: missing folder {self.split}_segmentations")
        return self._with_labels(_images_in(images), lambda p: labels / f"{p.stem}.png")


class PascalContext59(SegmentationDataset):
    """PASCAL-Context (59 classes) in ``VOCdevkit/VOC2010``: ``JPEGImages``, ``SegmentationClassContext``
    (0 background/unlabelled, 1..59 the classes), ``ImageSets/SegmentationContext/{train,val}.txt``."""

    key, title = "pascalcontext59", "PASCAL-Context-59"
    markers = ("JPEGImages", "SegmentationClassContext")
    aliases = ("VOC2010", "VOCdevkit/VOC2010")
    layout = "JPEGImages/, SegmentationClassContext/ and ImageSets/SegmentationContext/, as in VOCdevkit/VOC2010"
    reduce_zero_label = True

    def find_samples(self) -> list[Sample]:
        ids = _read_list(self.root / "ImageSets" / "SegmentationContext" / f"{self.split}.txt")
        images, labels = self.root / "JPEGImages", self.root / "SegmentationClassContext"
        return self._with_labels([images / f"{i}.jpg" for i in ids], lambda p: labels / f"{p.stem}.png")

    def _with_labels(self, images, label_for):
        for image in images:
            if not image.is_file():
                raise DatasetError(f"{image}: missing image listed in ImageSets/SegmentationContext/{self.split}.txt")
        return super()._with_labels(images, label_for)


class ImageFolderDataset(SegmentationDataset):
    """A user's own data: ``images/`` and ``masks/`` with the same file names (mask extension ``.png``).

    Masks hold class indices ``0..num_classes-1`` (gray or palette PNG); ``ignore_index`` (default 255)
    marks unlabelled pixels; ``reduce_zero_label=True`` treats 0 as unlabelled and shifts the rest down by
    one (the ADE20K convention). Any other value is an error that names the file.
    """

    title = "image/mask folder"
    splits = ("all",)
    decode_masks_to_check = True  # every value must be a class or the ignore value

    def __init__(self, images: str | Path, masks: str | Path, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, ignore_index: int = 255, reduce_zero_label: bool = False,
                 mask_suffix: str = ".png"):
        if class_names is None and num_classes is None:
            raise UsageError("ImageFolderDataset needs num_classes or class_names")
        if class_names is None:
            class_names = [f"class_{i}" for i in range(num_classes)]
        if num_classes is not None and len(class_names) != num_classes:
            raise UsageError(f"{len(class_names)} class names for {num_classes} classes")
        self.images_dir = self._folder(images, "images")
        self.masks_dir = self._folder(masks, "masks")
        self.ignore_value = ignore_index
        self.reduce_zero = reduce_zero_label
        self.mask_suffix = mask_suffix
        self.root, self.split = self.images_dir, "all"
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.palette = None
        self._lut = None
        self.samples = self.find_samples()

    @staticmethod
    def _folder(path: str | Path, what: str) -> Path:
        path = Path(path).expanduser()
        if not path.exists():
            raise DatasetError(f"{path}: no such directory ({what})")
        if not path.is_dir():
            raise DatasetError(f"{path}: not a directory ({what})")
        return path

    def find_samples(self) -> list[Sample]:
        images = _images_in(self.images_dir)
        if not images:
            raise DatasetError(f"{self.images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        return self._with_labels(images, lambda p: self.masks_dir / f"{p.stem}{self.mask_suffix}")

    def encode(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.astype(np.int64)
        ignored = raw == self.ignore_value
        labels = raw - 1 if self.reduce_zero else raw
        if self.reduce_zero:
            ignored |= raw == 0
        bad = ~ignored & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            value = int(raw[bad][0])
            raise ValueError(f"label value {value} is not a class (0..{self.num_classes - 1}"  # read_label names the file
                             f"{', shifted by reduce_zero_label' if self.reduce_zero else ''}) nor the ignore value "
                             f"{self.ignore_value}")
        return np.where(ignored, IGNORE_INDEX, labels)

    def read_label(self, index: int) -> np.ndarray:
        path = self.samples[index].label
        try:
            return self.encode(read_mask(path))
        except DatasetError:
            raise
        except ValueError as e:
            raise DatasetError(f"{path}: {e}") from None


class Shapes(SegmentationDataset):
    """segtorch's synthetic demo scenes (``segtorch.data.synthetic``): ``{train,val}/images/*.png`` and
    ``{train,val}/masks/*.png`` holding class indices 0..5."""

    key, title = "shapes", "synthetic shapes"
    aliases = ("shapes",)
    layout = "train/ and val/, each with images/ and masks/"
    id_to_class = {i: i for i in range(6)}

    @classmethod
    def matches(cls, root: Path) -> bool:
        return any((root / s / "images").is_dir() and (root / s / "masks").is_dir() for s in cls.splits)

    def find_samples(self) -> list[Sample]:
        images = _require_dir(self.root / self.split / "images", f"{self.split} images")
        masks = _require_dir(self.root / self.split / "masks", f"{self.split} masks")
        return self._with_labels(_images_in(images), lambda p: masks / f"{p.stem}.png")

    @classmethod
    def generate(cls, root: str | Path, split: str = "val", count: int = 50) -> Path:
        """Write the demo's deterministic ``split`` (the first ``count`` scenes) under ``root``."""
        from .synthetic import write_split

        write_split(root, split, count)
        return Path(root)


DATASETS: dict[str, type[SegmentationDataset]] = {
    cls.key: cls for cls in (ADE20K, Cityscapes, VOC, COCOStuff10k, LIP, PascalContext59, Shapes)}


def dataset_class(key: str) -> type[SegmentationDataset]:
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {key!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def build_dataset(key: str, root: str | Path, split: str, **kwargs) -> SegmentationDataset:
    """The dataset of a card (``card.dataset``) under ``root`` (its top folder, or a folder holding it)."""
    return dataset_class(key)(root, split, **kwargs)
