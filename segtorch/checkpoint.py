"""Checkpoint files: read legacy ``.pth`` safely, adapt their keys to segtorch's modules, check them against the
architecture and write safetensors (``convert_checkpoint``).

This layer sits below the weights policy (``segtorch.weights``), which converts release files on arrival, and
below ``segtorch.api``; it imports the model builders, never the layers above it.

Reading never unpickles code: ``torch.load(weights_only=True)`` only. Published files are dicts with the
weights under ``model`` (files from elsewhere: ``state_dict`` or bare, sometimes ``module.``-prefixed); see
``conversion/upstream/legacy-keys.md`` for what the toolbox wrote over the years.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch

from .errors import CheckpointError, UsageError
from .files import atomic_path, sha256_file

if TYPE_CHECKING:
    from .registry import ModelCard


# (old prefix, new prefix, why). Applied only when the file has the old keys and the model expects the new.
LEGACY_KEY_RULES: tuple[tuple[str, str, str], ...] = (
    # PSPNet/UPerNet files trained before 2020-12-14 (toolbox commit a21d066a renamed the PPM's fuse_layer);
    # the ADE20K PSPNet R-50-D16, R-101-D8 and R-101-D16 files probably predate it.
    ("ppm_net.fuse_layer.", "ppm_net.bottleneck.", "PPM fuse_layer renamed to bottleneck on 2020-12-14"),
    # DeepLabV3 files of the same era (same commit; no seed family, the same rule for any such file).
    ("aspp_net.fuse_layer.", "aspp_net.bottleneck.", "ASPP fuse_layer renamed to bottleneck on 2020-12-14"),
)

# Keys a file may carry that the inference model does not need: (regex, why, drop even if the model has it).
# Dropped, and counted in the report.
DROPPABLE_KEYS: tuple[tuple[str, str, bool], ...] = (
    (r"^auxiliary_decoder\.", "training-only auxiliary head", False),
    (r"(^|\.)num_batches_tracked$", "BatchNorm step counter", True),
    (r"(^|\.)relative_position_index$", "Swin index table, rebuilt from the window size", False),
)


@dataclasses.dataclass
class ConversionReport:
    source: str
    source_sha256: str | None
    era: str
    renamed: dict[str, int]
    dropped: dict[str, int]
    num_tensors: int
    destination: str | None = None

    def summary(self) -> str:
        lines = [f"source: {self.source}", f"sha256: {self.source_sha256}", f"era: {self.era}",
                 f"tensors kept: {self.num_tensors}"]
        lines += [f"renamed {n} keys: {rule}" for rule, n in self.renamed.items()]
        lines += [f"dropped {n} keys: {rule}" for rule, n in self.dropped.items()]
        if self.destination:
            lines.append(f"wrote: {self.destination}")
        return "\n".join(lines)


def _is_safetensors(path: Path) -> bool:
    # 8-byte little-endian header length followed by a JSON object
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def check_format(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path`` is, by its structure, a whole checkpoint file: a PyTorch zip with its
    directory, a legacy pickle, or safetensors whose header fits the file. Cheap (reads the head and the zip
    directory, not the tensors); the ``validate`` hook of downloads."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        import zipfile

        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path.name}: damaged or truncated checkpoint (incomplete zip archive)")
        return
    if head[:1] == b"\x80":
        return
    if _is_safetensors(path):
        length = int.from_bytes(head[:8], "little")
        try:
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise CheckpointError(f"{path.name}: damaged safetensors file (unreadable header)") from None
        if 8 + length + end != size:
            raise CheckpointError(f"{path.name}: damaged or truncated safetensors file ({size} bytes, the header "
                                  f"describes {8 + length + end})")
        return
    raise CheckpointError(f"{path.name}: not a checkpoint (first bytes {head[:8]!r}: neither a PyTorch file nor "
                          "safetensors)")


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".onnx")


def local_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """The file a user's ``checkpoint=`` (not an http(s) URL) names, ``~`` expanded; a one-line error for a URL of
    another kind (ftp://, s3://, file://, ...) or a folder, saying what to pass instead."""
    text = os.fspath(checkpoint)
    match = _URL_SCHEME.match(text) if isinstance(text, str) else None
    if match:
        scheme = match.group(0)[:-3].lower()
        if scheme in ("http", "https"):
            raise UsageError(f"checkpoint {text!r}: write the URL's scheme in lowercase ({scheme}://)")
        how = (f"pass the file's path ({text[len(match.group(0)):] or '/'!s}) instead" if scheme == "file" else
               "download the file yourself and pass its path")
        raise UsageError(f"checkpoint {text!r}: {scheme}:// URLs are not supported (only http:// and https:// "
                         f"are downloaded); {how}")
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
        hint = f" it holds {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}" if found else \
            " it holds no .safetensors, .pth or .onnx file"
        raise UsageError(f"checkpoint {path} is a folder, not a weights file: pass the file itself;{hint}")
    return path


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, dict]:
    """Return (flat tensor dict, era, safetensors metadata) from a ``.pth`` or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if _is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: damaged safetensors file ({e})") from None
        return tensors, "safetensors", meta
    obj = _torch_load(path)
    state, era = unwrap(obj, path)
    return state, era, {}


def _torch_load(path: Path):
    import pickle
    import zipfile

    with open(path, "rb") as f:
        magic = f.read(4)
    is_zip = zipfile.is_zipfile(path)
    if magic == b"PK\x03\x04" and not is_zip:  # a PyTorch zip whose end (the zip directory) is missing
        raise CheckpointError(f"{path}: damaged or truncated checkpoint (incomplete zip archive)")
    if not (is_zip or magic[:1] == b"\x80"):  # PyTorch zip, or a pickle (files saved before the zip format)
        raise CheckpointError(f"{path}: not a checkpoint (neither a PyTorch file nor safetensors)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        # PyTorch's own text advises weights_only=False, i.e. running the file's code: never repeat that.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it refers to {found.group(1)}" if found else "it holds objects other than tensors"
        raise CheckpointError(f"{path}: refused to load: {what}, and segtorch never runs code from a checkpoint; "
                              "use a file that holds only tensors (a state dict or .safetensors) from a source "
                              "you trust") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({first})") from None


def unwrap(obj, source: Path | str = "<checkpoint>") -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights in a loaded checkpoint object and name its era from the top-level keys."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: not a checkpoint (top level is {type(obj).__name__}, not a dict)")
    if "cur_epoch" in obj or "cur_iter" in obj:
        era = "toolbox, mid 2022 or later (cur_epoch/cur_iter)"
    elif "epoch" in obj and "model" in obj:
        era = "toolbox, 2020 to mid 2022 (epoch/model/optimizer)"
    else:
        era = "other"
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{source}: not a checkpoint (no tensors under 'model', 'state_dict' or the top level)")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel/DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, era


def adapt_state_dict(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor] | Iterable[str],
                     keep: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, int]]:
    """Apply the legacy key rules and drop what inference does not need.

    ``expected``: the model's state-dict keys (and tensors, for shapes). Keys in ``keep`` prefixes are never
    dropped (e.g. ``auxiliary_decoder.`` when fine-tuning with the auxiliary head).
    Returns (state, renamed counts per rule, dropped counts per rule).
    """
    expected_keys = set(expected)
    keep = tuple(keep)
    renamed: dict[str, int] = {}
    for old, new, why in LEGACY_KEY_RULES:
        olds = [k for k in state if k.startswith(old)]
        if olds and not any(k.startswith(old) for k in expected_keys) and any(k.startswith(new) for k in expected_keys):
            for k in olds:
                state[new + k[len(old):]] = state.pop(k)
            renamed[f"{old}* -> {new}* ({why})"] = len(olds)
    dropped: dict[str, int] = {}
    for pattern, why, always in DROPPABLE_KEYS:
        rx = re.compile(pattern)
        gone = [k for k in state if rx.search(k) and (always or k not in expected_keys)
                and not (keep and k.startswith(keep))]
        for k in gone:
            del state[k]
        if gone:
            dropped[f"{pattern} ({why})"] = len(gone)
    return state, renamed, dropped


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
                     optional: Iterable[str] = ()) -> None:
    """Refuse, naming the keys, when the file does not fit the architecture. ``optional`` keys may be absent."""
    optional = set(optional)
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    misshaped = sorted(f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                       for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            parts.append(f"{len(keys)} {label} keys: {shown}")
    raise CheckpointError(f"{source}: does not match the architecture: " + "; ".join(parts) + _classes_hint(
        [(tuple(state[k].shape), tuple(expected[k].shape)) for k in state
         if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]))


def _classes_hint(shapes: list[tuple[tuple, tuple]]) -> str:
    """When every mis-shaped tensor differs in one size only, K in the file for M in the model (classifiers,
    per-class memories and relations), the file is that model trained for K classes: say how to load it."""
    pairs = {(a, b) for file, model in shapes if len(file) == len(model) for a, b in zip(file, model) if a != b}
    if len(pairs) != 1 or any(len(file) != len(model) for file, model in shapes):
        return ""
    k = next(iter(pairs))[0]
    return f" (a model trained for {k} classes? load it with num_classes={k} or {k} class_names)"


def optional_keys(model: torch.nn.Module) -> set[str]:
    """Model keys a converted file may leave out because they carry no learned value."""
    return {k for k in model.state_dict() if k.endswith("num_batches_tracked")}


# Training statistics outside the model's state dict that it still takes from a file holding them (the module
# loads them itself): IDRNet's selection counts, which the toolbox saves with the weights.
CARRIED_STATISTICS = ("selected_classes_counter",)


def carried_statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.named_buffers() if k.rsplit(".", 1)[-1] in CARRIED_STATISTICS}


def write_safetensors(state: Mapping[str, torch.Tensor], dst: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Write atomically (``files.atomic_path``)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return Path(dst)


def load_for_model(path: str | os.PathLike, model: torch.nn.Module, keep: Iterable[str] = ()
                   ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Read ``path`` and return a state dict that fits ``model`` exactly (or raise CheckpointError)."""
    path = Path(path)
    state, era, meta = read_file(path)
    carried = carried_statistics(model)
    expected = {**model.state_dict(), **carried}
    state, renamed, dropped = adapt_state_dict(state, expected, keep)
    check_state_dict(state, expected, str(path), optional=optional_keys(model) | set(carried))
    report = ConversionReport(source=str(path), source_sha256=meta.get("source_sha256"), era=era, renamed=renamed,
                              dropped=dropped, num_tensors=len(state))
    return state, report


def load_matching(path: str | os.PathLike, model: torch.nn.Module, keep: Iterable[str] = ()
                  ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """For fine-tuning: ``(state, reshaped, missing)``: the file's tensors (read and adapted as
    ``load_for_model`` does) whose key and shape fit ``model``; the keys whose shape differs (e.g. the
    classifiers of another number of classes) and those the file lacks, both left to the model's own init."""
    state, _, _ = read_file(path)
    expected = model.state_dict()
    state, _, _ = adapt_state_dict(state, expected, keep)
    reshaped = sorted(k for k, v in state.items() if k in expected and v.shape != expected[k].shape)
    state = {k: v for k, v in state.items() if k in expected and k not in reshaped}
    missing = sorted(k for k in expected if k not in state and k not in optional_keys(model))
    return state, reshaped, missing


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata, from its header alone; ``{}`` for other files."""
    path = Path(path)
    if not (path.is_file() and _is_safetensors(path)):
        return {}
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            meta = json.loads(f.read(length)).get("__metadata__")
        except (ValueError, AttributeError):
            raise CheckpointError(f"{path}: damaged safetensors file (unreadable header)") from None
    return meta if isinstance(meta, dict) else {}


def classes_metadata(class_names: Iterable[str], palette: Iterable[Iterable[int]]) -> dict[str, str]:
    """The metadata entries that say which classes a trained file predicts (read by ``card_for_checkpoint``)."""
    class_names = list(class_names)
    return {"num_classes": str(len(class_names)), "class_names": json.dumps(class_names),
            "palette": json.dumps([list(c) for c in palette])}


def card_for_checkpoint(card: "ModelCard", path: str | os.PathLike, num_classes: int | None = None,
                        class_names: Iterable[str] | None = None) -> "ModelCard":
    """``card`` for the classes of the model in ``path``: those its metadata names (a file written by
    ``segtorch train``), else ``num_classes``/``class_names`` when given, else the card's own. Arguments that
    contradict the file are refused."""
    meta = read_metadata(path)
    stored, palette = None, None
    if "class_names" in meta:
        try:
            stored = tuple(json.loads(meta["class_names"]))
            palette = json.loads(meta["palette"]) if "palette" in meta else None
        except ValueError:
            raise CheckpointError(f"{path}: unreadable class names or palette in its metadata") from None
    if stored is not None:
        if num_classes is not None and num_classes != len(stored):
            raise UsageError(f"{path} was trained for {len(stored)} classes, not num_classes={num_classes}")
        if class_names is not None:
            class_names = tuple(class_names)
            if len(class_names) != len(stored):
                raise UsageError(f"{path} was trained for {len(stored)} classes ({', '.join(stored[:4])}"
                                 f"{', ...' if len(stored) > 4 else ''}); {len(class_names)} class names given")
        return card.with_classes(class_names=class_names or stored, palette=palette)
    return card.with_classes(num_classes, class_names)


def safetensors_metadata(name: str, source_sha256: str | None, report: ConversionReport | None = None) -> dict:
    from . import __version__

    meta = {"format": "pt", "name": name, "segtorch_version": __version__}
    if source_sha256:
        meta["source_sha256"] = source_sha256
    if report is not None:
        meta["conversion"] = json.dumps({"era": report.era, "renamed": report.renamed, "dropped": report.dropped})
    return meta


def meta_model(card: "ModelCard", auxiliary: bool = False) -> torch.nn.Module:
    """The card's architecture on the meta device: no memory and no random initialisation that weights would
    overwrite; good for checking a file's keys and shapes, and for loading with ``assign=True``."""
    from .models.builder import build_segmentation_model

    with torch.device("meta"):
        return build_segmentation_model(card.architecture, auxiliary=auxiliary)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, card: "ModelCard", *,
                       auxiliary: bool = False) -> ConversionReport:
    """Convert a legacy ``.pth`` (or re-check a ``.safetensors``) for ``card``'s model into safetensors at ``dst``.

    The file is checked against the architecture (missing, unexpected or mis-shaped keys are refused by name)
    before anything is written; the output is written atomically with metadata (name, source sha256, segtorch
    version, what the conversion renamed and dropped).
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.is_dir():
        raise UsageError(f"{dst} is a folder; give the .safetensors file to write, "
                         f"e.g. {dst / (card.name + '.safetensors')}")
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: the destination is the source file; choose another path")
    state, report = load_for_model(src, meta_model(card, auxiliary), keep=("auxiliary_decoder.",) if auxiliary else ())
    report.source_sha256 = report.source_sha256 or sha256_file(src)
    write_safetensors(state, dst, safetensors_metadata(card.name, report.source_sha256, report))
    report.destination = str(dst)
    return report
