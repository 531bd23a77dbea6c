"""Model cards: read ``model_cards/*.toml``, resolve names and aliases, suggest close names.

A card is data only: everything segtorch knows about one published checkpoint (where its weights are, what
it reported, the architecture's structural hyper-parameters, its test pipeline and inference settings, its
training schedule). Names are validated before use and never reach the file system.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any
from .errors import UnknownModelError  # noqa: F401 - re-exported

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
HF_ORG_ENV = "SEGTORCH_HF_ORG"


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    family: str
    dataset: str
    backbone: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    url: str | None
    hub: dict | None
    sha256: str | None
    reported: dict
    architecture: dict
    preprocess: dict
    inference: dict
    training: dict
    aliases: tuple[str, ...] = ()
    segmentor: str | None = None
    dataset_title: str | None = None
    reported_split: str | None = None
    upstream_config: str | None = None
    citation: str | None = None
    license: str | None = None
    demo: bool = False
    weights: str | None = None  # weights shipped inside the package (demo models), relative to the cards folder

    @property
    def miou(self) -> float | None:
        return self.reported.get("miou")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))


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
        cards[name] = ModelCard(
            name=name, class_names=tuple(ds["class_names"]), palette=tuple(map(tuple, ds["palette"])),
            dataset_title=ds.get("title"), aliases=tuple(entry.pop("aliases", ())),
            url=entry.pop("url", None), hub=entry.pop("hub", None), sha256=entry.pop("sha256", None),
            reported={k: reported.get(k) for k in ("miou", "miou_flip", "miou_ms_flip")}, **entry)
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
    return dataclasses.replace(card, hub={**card.hub, "repo": repo})


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
    """Sorted canonical names; ``pattern`` uses fnmatch wildcards and also matches aliases."""
    cards, aliases = _registry()
    names = set(cards)
    if pattern:
        names = {n for n in cards if fnmatch.fnmatchcase(n, pattern)}
        names |= {target for alias, target in aliases.items() if fnmatch.fnmatchcase(alias, pattern)}
    out = []
    for n in names:
        c = cards[n]
        if dataset and c.dataset != dataset:
            continue
        if family and c.family != family:
            continue
        if backbone and backbone.lower() not in c.backbone.lower() and backbone.lower() not in n:
            continue
        out.append(n)
    return sorted(out)
