"""Model cards: read ``model_cards/*.toml``, resolve names and aliases, suggest close names.

A card is data only: everything segtorch knows about one published checkpoint (where its weights are, what
it reported, the architecture's structural hyper-parameters, its test pipeline and inference settings, its
training schedule). Cards are cached and shared, so they are read-only all the way down (frozen dataclasses,
read-only mappings, tuples): no caller can change what the next lookup returns. ``card.to_dict()`` gives an
editable copy. Names are validated before use and never reach the file system.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import functools
import numbers
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping
from .errors import UnknownModelError, UsageError  # noqa: F401 - UnknownModelError re-exported

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
HF_ORG_ENV = "SEGTORCH_HF_ORG"


class ReadOnlyMapping(Mapping):
    """A mapping that cannot be changed and, unlike ``types.MappingProxyType``, can be pickled: a card goes to
    DataLoader workers and to the processes of a distributed run."""

    __slots__ = ("_data",)

    def __init__(self, data=()):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce__(self):
        return (type(self), (self._data,))

    def __repr__(self) -> str:  # prints as the dict it stands for: card.reported, card.architecture, ...
        return repr(self._data)

    def __eq__(self, other) -> bool:
        return dict(self._data) == dict(other) if isinstance(other, Mapping) else NotImplemented

    __hash__ = None


def freeze(value):
    """A read-only copy: mappings -> ``ReadOnlyMapping``, lists -> tuples, all the way down."""
    if isinstance(value, Mapping):
        return ReadOnlyMapping({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value):
    """Plain dicts and lists again (for JSON and for callers that want to edit a copy)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: thaw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def _pair(value) -> tuple[int, int] | None:
    return None if value is None else tuple(value)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The test pipeline before the network: resize (the toolbox's test-time ``Resize``), then normalise
    the RGB image with ``mean``/``std`` (0-255 scale)."""
    output_size: tuple[int, int]
    keep_ratio: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_table(cls, table: Mapping) -> "Preprocess":
        return cls(output_size=_pair(table["output_size"]), keep_ratio=table["keep_ratio"],
                   mean=tuple(table["mean"]), std=tuple(table["std"]))

    @property
    def resize(self) -> dict:
        return {"output_size": self.output_size, "keep_ratio": self.keep_ratio}


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """One way to run the network over an image: ``whole`` or ``slide`` (``crop_size``/``stride``, h x w),
    at ``scales`` with or without ``flip`` (swapping the ``flip_pairs`` classes of flipped predictions),
    averaging probabilities or scores (``softmax_before_resize``)."""
    mode: str
    scales: tuple[float, ...]
    flip: bool
    softmax_before_resize: bool
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    flip_pairs: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_table(cls, table: Mapping) -> "InferenceSettings":
        return cls(mode=table["mode"], scales=tuple(float(s) for s in table["scales"]), flip=table["flip"],
                   softmax_before_resize=table["softmax_before_resize"], crop_size=_pair(table.get("crop_size")),
                   stride=_pair(table.get("stride")), flip_pairs=tuple(map(tuple, table.get("flip_pairs", ()))))


@dataclasses.dataclass(frozen=True)
class Inference:
    """The checkpoint's single-scale test settings (``default``), its multi-scale + flip ones (``tta``, with
    ``tta_source`` saying where they come from) and every other setting the toolbox's config names."""
    default: InferenceSettings
    tta: InferenceSettings
    tta_source: str
    alternatives: Mapping[str, InferenceSettings] = dataclasses.field(
        default_factory=ReadOnlyMapping)

    @classmethod
    def from_table(cls, table: Mapping) -> "Inference":
        alternatives = {k: InferenceSettings.from_table(v) for k, v in table.get("alternatives", {}).items()}
        return cls(default=InferenceSettings.from_table(table["default"]),
                   tta=InferenceSettings.from_table(table["tta"]), tta_source=table["tta_source"],
                   alternatives=ReadOnlyMapping(alternatives))


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """Everything known about one checkpoint; read-only all the way down."""
    name: str
    family: str
    dataset: str
    backbone: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    url: str | None
    hub: Mapping | None
    sha256: str | None
    reported: Mapping
    architecture: Mapping  # the arguments of segtorch.models.builder.build_segmentation_model
    preprocess: Preprocess
    inference: Inference
    training: Mapping
    aliases: tuple[str, ...] = ()
    segmentor: str | None = None
    dataset_title: str | None = None
    reported_split: str | None = None
    upstream_config: str | None = None  # provenance: the toolbox config the card was translated from
    citation: str | None = None
    license: str | None = None
    demo: bool = False
    weights: str | None = None  # weights shipped inside the package (demo models), relative to the cards folder

    def to_dict(self) -> dict[str, Any]:
        return thaw(self)

    def with_classes(self, num_classes: int | None = None, class_names=None, palette=None) -> "ModelCard":
        """This card for a model trained on other classes: its architecture with ``num_classes`` outputs, the
        classes' names (``class_<i>`` unless given) and colours (the card's first ones, then generated). The
        reported scores and the flip pairs describe the card's own classes, so they go when the classes differ.
        Nothing given, or the card's own classes: this card."""
        if class_names is not None:
            class_names = tuple(str(n) for n in class_names)
            if num_classes is not None and num_classes != len(class_names):
                raise UsageError(f"{len(class_names)} class names for num_classes={num_classes}")
            num_classes = len(class_names)
        num_classes = self.num_classes if num_classes is None else num_classes
        if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1:
            raise UsageError(f"num_classes must be a positive integer, not {num_classes!r}")
        num_classes = int(num_classes)
        if class_names is None:
            class_names = self.class_names if num_classes == self.num_classes else tuple(
                f"class_{i}" for i in range(num_classes))
        if palette is None:
            palette = (self.palette + generated_palette(num_classes)[len(self.palette):])[:num_classes]
        palette = tuple(tuple(int(v) for v in colour) for colour in palette)
        if len(palette) != num_classes or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
            raise UsageError(f"a palette of {num_classes} (r, g, b) colours in 0-255 is needed, "
                             f"not {len(palette)} entries")
        if (num_classes, class_names, palette) == (self.num_classes, self.class_names, self.palette):
            return self
        if (num_classes, class_names) == (self.num_classes, self.class_names):
            return dataclasses.replace(self, palette=palette)
        no_pairs = {f: dataclasses.replace(getattr(self.inference, f), flip_pairs=()) for f in ("default", "tta")}
        alternatives = {k: dataclasses.replace(v, flip_pairs=()) for k, v in self.inference.alternatives.items()}
        return dataclasses.replace(
            self, num_classes=num_classes, class_names=class_names, palette=palette,
            architecture=freeze({**thaw(self.architecture), "num_classes": num_classes}),
            reported=freeze({k: None for k in self.reported}),
            inference=dataclasses.replace(self.inference, **no_pairs, alternatives=ReadOnlyMapping(alternatives)))


def generated_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """``n`` distinct colours: the PASCAL VOC colour map (bits of the index spread over r, g, b)."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def cards_dir() -> Path:
    """``segtorch/model_cards`` in an installed wheel, ``<repo>/model_cards`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards", here.parent / "model_cards"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"segtorch's model_cards folder is missing (looked in {here} and {here.parent})")


def _load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def dataset_info(key: str) -> dict:
    """A dataset's title, class names and palette (``model_cards/datasets/<key>.toml``)."""
    return copy.deepcopy(_dataset(key))


@functools.lru_cache(maxsize=None)
def _dataset(key: str) -> dict:
    path = cards_dir() / "datasets" / f"{key}.toml"
    if not _NAME_RE.match(key) or not path.is_file():
        raise ValueError(f"unknown dataset {key!r} (no {path})")
    return _load_toml(path)


_FIELDS = {f.name for f in dataclasses.fields(ModelCard)}


@functools.lru_cache(maxsize=None)
def _checksums() -> dict:
    """``model_cards/checksums.toml`` (written by conversion/convert_zoo.py): per model, the sha256 of the
    GitHub release file (``pth``) and of the mirror's safetensors file (``safetensors``). Optional."""
    path = cards_dir() / "checksums.toml"
    return _load_toml(path) if path.is_file() else {}


@functools.lru_cache(maxsize=None)
def _family(path: Path) -> dict[str, ModelCard]:
    """The cards of one ``model_cards/<family>.toml`` file, its ``[defaults]`` merged in."""
    data = _load_toml(path)
    defaults = data.get("defaults", {})
    cards = {}
    for name, entry in data.get("models", {}).items():
        if not _NAME_RE.match(name) or not name.startswith(f"{path.stem}_"):
            # single-name lookups read only the file named by the name's first word
            raise ValueError(f"{path}: model name {name!r} must be lowercase and start with '{path.stem}_'")
        entry = deep_merge(defaults, entry)
        unknown = set(entry) - _FIELDS
        if unknown:
            raise ValueError(f"{path}: model {name!r} has unknown fields {sorted(unknown)}")
        ds = _dataset(entry["dataset"])
        reported = entry.pop("reported", {})
        sums = _checksums().get(name, {})
        if sums.get("pth"):
            entry["sha256"] = sums["pth"]
        if sums.get("safetensors") and entry.get("hub"):
            entry["hub"] = {**entry["hub"], "sha256": sums["safetensors"]}
        try:
            cards[name] = ModelCard(
                name=name, class_names=tuple(ds["class_names"]), palette=tuple(map(tuple, ds["palette"])),
                dataset_title=ds.get("title"), aliases=tuple(entry.pop("aliases", ())),
                url=entry.pop("url", None), hub=freeze(entry.pop("hub", None)), sha256=entry.pop("sha256", None),
                reported=freeze({k: reported.get(k) for k in ("miou", "miou_flip", "miou_ms_flip")}),
                architecture=freeze(entry.pop("architecture")), training=freeze(entry.pop("training")),
                preprocess=Preprocess.from_table(entry.pop("preprocess")),
                inference=Inference.from_table(entry.pop("inference")), **entry)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: model {name!r}: incomplete card ({type(e).__name__}: {e})") from None
    return cards


def _family_files() -> list[Path]:
    return sorted(p for p in cards_dir().glob("*.toml") if p.name != "checksums.toml")


@functools.lru_cache(maxsize=None)
def _registry() -> tuple[dict[str, ModelCard], dict[str, str]]:
    """Every card and alias (reads every family file; single-name lookups avoid this, see ``_lookup``)."""
    cards: dict[str, ModelCard] = {}
    aliases: dict[str, str] = {}
    for path in _family_files():
        for name, card in _family(path).items():
            if name in cards:
                raise ValueError(f"{path}: duplicate model name {name!r}")
            cards[name] = card
            aliases.update({alias: name for alias in card.aliases})
    return cards, aliases


def _lookup(name: str) -> ModelCard | None:
    """A card by canonical name, reading only its family's file (names start with the family)."""
    if not _NAME_RE.match(name):
        return None
    path = cards_dir() / f"{name.split('_', 1)[0]}.toml"
    if path.is_file():
        card = _family(path).get(name)
        if card is not None:
            return card
    return None


def _hub_with_org(card: ModelCard) -> ModelCard:
    org = os.environ.get(HF_ORG_ENV)
    if not org or not card.hub:
        return card
    repo = f"{org}/{card.hub['repo'].split('/', 1)[-1]}"
    return dataclasses.replace(card, hub=freeze({**card.hub, "repo": repo}))


def resolve_name(name: str) -> str:
    """Canonical name for ``name`` (a name or an alias); a clear error with suggestions otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    if _lookup(name) is not None:
        return name
    if not _NAME_RE.match(name):
        lower = name.lower()
        if _NAME_RE.match(lower) and (_lookup(lower) is not None or lower in _registry()[1]):
            raise UnknownModelError(f"unknown model {name!r}; names are lowercase: did you mean {lower}?")
        raise UnknownModelError(f"{name!r} is not a model name: names use lowercase letters, digits and '_' "
                                f"(see segtorch.list_models())")
    cards, aliases = _registry()
    if name in aliases:
        return aliases[name]
    close = difflib.get_close_matches(name, list(cards) + list(aliases), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see segtorch.list_models()"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def model_card(name: str) -> ModelCard:
    return _hub_with_org(_lookup(resolve_name(name)))


def list_models(pattern: str | None = None, *, dataset: str | None = None, family: str | None = None,
                backbone: str | None = None) -> list[str]:
    """Sorted canonical names; ``pattern`` uses fnmatch wildcards and also matches aliases. The pattern, dataset
    and family ignore case (names are lowercase; ``PSPNet_*`` finds them)."""
    cards, aliases = _registry()
    names = set(cards)
    if pattern:
        pattern = pattern.lower()
        names = {n for n in cards if fnmatch.fnmatchcase(n, pattern)}
        names |= {target for alias, target in aliases.items() if fnmatch.fnmatchcase(alias, pattern)}
    out = []
    for n in names:
        c = cards[n]
        if dataset and c.dataset.lower() != dataset.lower():
            continue
        if family and c.family.lower() != family.lower():
            continue
        if backbone and backbone.lower() not in c.backbone.lower() and backbone.lower() not in n:
            continue
        out.append(n)
    return sorted(out)
