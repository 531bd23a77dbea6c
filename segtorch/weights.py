"""The weights policy: which file holds a model card's weights, and getting it ready on first use.

Order: the weights shipped inside segtorch (demo models); a safetensors file converted earlier, in
``home()/"converted"/<name>.safetensors``; the Hugging Face mirror's safetensors file, only where the card pins
its sha256 or the user chose the mirror (``SEGTORCH_HF_ORG``, ``HF_ENDPOINT``): whoever holds an unpinned repo
name could otherwise serve any weights to every user (``mirror_trusted``); the card's GitHub release ``.pth``
(``SEGTORCH_RELEASE_MIRROR`` replaces the GitHub prefix), verified and converted on arrival. Offline, only what
is cached is used.

First use is safe under concurrency (torchrun ranks loading one uncached model): the download and the conversion
happen under one lock per model, so the release file is fetched once and converted once, and every process gets
the same file. Converted files are kept like downloads (``downloads.CachedFile``: one sha256 sidecar scheme).

Layers: this module uses ``downloads`` (bytes) and ``checkpoint`` (conversion) below it; ``api`` is above it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from .checkpoint import check_format, convert_checkpoint
from .downloads import CachedFile, cache_lock, download, forget, hf_download, home, offline_var
from .errors import CheckpointError, DownloadError, OfflineError, UsageError
from .files import sha256_file
from .registry import HF_ORG_ENV, ModelCard, cards_dir

__all__ = ["RELEASE_PREFIX", "release_url", "hf_url", "mirror_trusted", "fetch_weights", "describe"]

log = logging.getLogger(__name__)

RELEASE_PREFIX = "https://github.com/SegmentationBLWX/modelstore/releases/download/"
HOW_TO_GET_THROUGH = ("to work offline, copy a SEGTORCH_HOME filled by `segtorch download NAME` elsewhere and set "
                      "SEGTORCH_OFFLINE=1, or pass a local file as checkpoint=/--checkpoint; on a closed network "
                      "set HF_ENDPOINT or SEGTORCH_RELEASE_MIRROR to a mirror")


def release_url(card: ModelCard) -> str | None:
    """The card's release URL, with ``SEGTORCH_RELEASE_MIRROR`` in place of the GitHub release prefix."""
    url = card.url
    mirror = os.environ.get("SEGTORCH_RELEASE_MIRROR", "").strip()
    if url and mirror:
        if not mirror.startswith(("http://", "https://")):
            raise UsageError(f"SEGTORCH_RELEASE_MIRROR={mirror!r} is not an http(s):// URL; set it to the base URL "
                             "that holds the release files (e.g. https://mirror.example/modelstore/)")
        if url.startswith(RELEASE_PREFIX):
            url = mirror.rstrip("/") + "/" + url[len(RELEASE_PREFIX):]
    return url


def hf_url(card: ModelCard) -> str | None:
    """Where the Hugging Face mirror's file is (for messages)."""
    if not card.hub:
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"
    return f"{endpoint}/{card.hub['repo']}/resolve/main/{card.hub['file']}"


def mirror_trusted(card: ModelCard) -> str | None:
    """Why the card's Hugging Face mirror may be asked (its file's sha256 is pinned, or the user set
    ``SEGTORCH_HF_ORG`` / ``HF_ENDPOINT``), or None: then no request goes to a Hugging Face endpoint."""
    if not card.hub:
        return None
    if card.hub.get("sha256"):
        return "sha256 pinned by the card"
    for var in (HF_ORG_ENV, "HF_ENDPOINT"):
        if os.environ.get(var, "").strip():
            return f"{var} is set"
    return None


def _shipped(card: ModelCard) -> Path | None:
    if not getattr(card, "weights", None):
        return None
    path = cards_dir() / card.weights
    if not path.is_file():
        raise CheckpointError(f"{card.name}: the shipped weights {path} are missing from this installation; "
                              "reinstall segtorch")
    return path


def _converted(card: ModelCard) -> CachedFile:
    folder = home() / "converted"
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        pass  # a read-only cache still serves what it holds; making a new file fails at the lock, saying why
    return CachedFile(folder / f"{card.name}.safetensors")


def fetch_weights(card: ModelCard) -> Path:
    """The local safetensors weights of ``card``, fetched (and converted) on first use."""
    shipped = _shipped(card)
    if shipped is not None:
        return shipped
    converted = _converted(card)  # also checks SEGTORCH_HOME before any network is tried
    if converted.verified():
        return converted.file
    tried = []
    if mirror_trusted(card):
        try:
            return hf_download(card.hub["repo"], card.hub["file"], sha256=card.hub.get("sha256"))
        except (OfflineError, DownloadError) as exc:
            tried.append(f"Hugging Face mirror: {exc}")
            log.info("segtorch: %s; falling back to the release file", exc)
    url = release_url(card)
    if not url:
        raise DownloadError(f"{card.name}: no weights available: " + "; ".join(tried))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(cache_lock(converted.lock))
        except OSError as exc:  # a read-only or missing cache folder
            offline = offline_var()
            if offline:
                raise OfflineError(f"{card.name}: not in the cache {converted.file.parent} and offline mode is on "
                                   f"({offline})") from None
            raise UsageError(f"{card.name}: cannot write the cache folder {converted.file.parent} "
                             f"({exc.strerror or exc}); point SEGTORCH_HOME at a folder segtorch may write") from None
        try:
            return _download_and_convert(card, url, converted)
        except OfflineError as exc:
            raise OfflineError(f"{card.name}: not in the cache and offline mode is on ({offline_var()}): "
                               + "; ".join(tried + [f"release file: {exc}"])) from None
        except DownloadError as exc:  # (ChecksumError stays a ChecksumError)
            raise type(exc)(f"{card.name}: cannot get the weights: " + "; ".join(tried + [f"release file: {exc}"])
                            + f"; {HOW_TO_GET_THROUGH}") from None


def _download_and_convert(card: ModelCard, url: str, converted: CachedFile) -> Path:
    """Under the model's lock: the release file, downloaded and converted once for all processes."""
    if converted.check_locked(None, check_format):  # another process made it while we waited for the lock
        return converted.file
    # segtorch 0.1 kept a .json record beside converted files; the sidecar replaces it
    converted.file.with_name(converted.name + ".json").unlink(missing_ok=True)
    pth = download(url, sha256=card.sha256, validate=check_format)
    try:
        convert_checkpoint(pth, converted.file, card)
    except CheckpointError as exc:
        # The file downloaded fine but is not this model's checkpoint: never keep (or trust) it.
        forget(url)
        raise DownloadError(f"{url}: {exc}; the download was discarded") from None
    converted.record(sha256_file(converted.file))
    return converted.file


def describe(card: ModelCard) -> dict[str, str | None]:
    """What ``segtorch info`` says about the weights: where they come from and how they are checked."""
    shipped = _shipped(card)
    if shipped is not None:
        return {"weights": f"shipped with segtorch: {shipped}", "sha256": f"{sha256_file(shipped)} (shipped file)",
                "hf mirror": None}
    trusted = mirror_trusted(card)
    if trusted:
        mirror = f"{card.hub['repo']} / {card.hub['file']} (asked first: {trusted})"
    elif card.hub:
        mirror = (f"{card.hub['repo']} / {card.hub['file']} not asked: its sha256 is not pinned "
                  f"(set {HF_ORG_ENV} or HF_ENDPOINT to use a mirror you trust)")
    else:
        mirror = None
    return {"weights": release_url(card), "sha256": card.sha256 or "unknown (trusted on first use)",
            "hf mirror": mirror}
