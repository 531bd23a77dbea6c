"""The Hugging Face Hub wrapper: ``hf_download`` through ``huggingface_hub`` (imported on use), with the
cache's offline mode, a reachability probe first (``fetch.unreachable``) and one-line errors."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import ChecksumError, DownloadError, OfflineError
from ..files import sha256_file
from .cache import check_sha256, log, offline_var, one_line
from .fetch import unreachable

__all__ = ["hf_download"]


def _hf_cache_dir() -> str | None:
    """HF cache folder from the environment at call time (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def _hf_cause(exc: BaseException) -> str:
    """'HTTP 404 Not Found' for an HTTP error (huggingface_hub's own text spans lines and links), else its text."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status:
        reason = getattr(response, "reason_phrase", None) or getattr(response, "reason", None) or ""
        return one_line(f"HTTP {status} {reason}")
    return one_line(exc)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The connection errors of the HTTP stack huggingface_hub runs on (httpx2 or httpx from version 1, requests
    before), which it lets through unwrapped: a proxy that refuses, a cut connection."""
    found = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        error = getattr(sys.modules.get(module), name, None)  # only a stack that is loaded can have raised
        if isinstance(error, type):
            found.append(error)
    return tuple(found)


def hf_download(repo_id: str, filename: str, revision: str | None = None, sha256: str | None = None) -> Path:
    """Fetch ``filename`` from the Hugging Face model repo ``repo_id`` into the Hugging Face cache.

    Honours ``HF_ENDPOINT`` (a mirror), ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_TOKEN``; in offline mode only the
    cache is consulted. ``sha256`` is checked on the result (one forced re-download on a mismatch when online).
    """
    expected = check_sha256(sha256)
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    offline = offline_var()
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise DownloadError(f"cannot download {where} from the Hugging Face Hub: huggingface_hub is not installed "
                            "(pip install huggingface_hub)") from None

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    source = endpoint or "https://huggingface.co"
    # huggingface_hub retries an unreachable host for ~30 s, printing each try: look first, then use the cache only.
    cut_off = None if offline else unreachable(source)
    local_only = offline is not None or cut_off is not None

    def fetch(force: bool) -> Path:
        try:
            return Path(huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision, endpoint=endpoint, cache_dir=_hf_cache_dir(),
                local_files_only=local_only, force_download=force))
        except hf_errors.OfflineModeIsEnabled:
            raise OfflineError(f"offline mode is on (HF_HUB_OFFLINE) and {where} is not in the Hugging Face cache"
                               ) from None
        except hf_errors.LocalEntryNotFoundError as exc:
            if offline:
                cache_dir = _hf_cache_dir() or huggingface_hub.constants.HF_HUB_CACHE
                raise OfflineError(f"offline mode is on ({offline} is set) and {where} is not in the Hugging Face "
                                   f"cache {cache_dir}; unset {offline} to download it") from None
            if cut_off:
                raise DownloadError(f"cannot download {where} from {source}: {cut_off}") from None
            # Raised when the metadata request failed for a reason huggingface_hub does not classify.
            cause = exc.__cause__ or exc.__context__
            detail = _hf_cause(cause) if cause is not None else "the Hub could not be reached"
            raise DownloadError(f"cannot download {where} from {source}: {detail}") from exc
        except hf_errors.GatedRepoError as exc:
            raise DownloadError(f"cannot download {where} from {source}: the repository is gated "
                                "(accept its terms and set HF_TOKEN)") from exc
        except hf_errors.RepositoryNotFoundError as exc:
            raise DownloadError(f"cannot download {where} from {source}: repository {repo_id} not found "
                                "(or private: set HF_TOKEN)") from exc
        except hf_errors.RevisionNotFoundError as exc:
            raise DownloadError(f"cannot download {where} from {source}: revision {revision} not found") from exc
        except hf_errors.EntryNotFoundError as exc:
            raise DownloadError(f"cannot download {where} from {source}: file {filename} not found in {repo_id}"
                                ) from exc
        except hf_errors.HfHubHTTPError as exc:
            raise DownloadError(f"cannot download {where} from {source}: {_hf_cause(exc)}") from exc
        except (hf_errors.HFValidationError, ValueError) as exc:
            raise DownloadError(f"cannot download {where}: {one_line(exc)}") from exc
        except OSError as exc:  # network failures surfacing past huggingface_hub, disk full, ...
            raise DownloadError(f"cannot download {where} from {source}: {one_line(exc)}") from exc
        except _transport_errors() as exc:
            raise DownloadError(f"cannot download {where} from {source}: {type(exc).__name__}: {one_line(exc)}"
                                ) from exc

    path = fetch(force=False)
    if expected is None:
        return path
    digest = sha256_file(path)
    if digest != expected and not local_only:
        log.warning("segtorch: cached %s has the wrong sha256; downloading it again", where)
        path = fetch(force=True)
        digest = sha256_file(path)
    if digest != expected:
        raise ChecksumError(f"checksum mismatch for {where} from {source}: expected sha256 {expected}, got {digest}")
    return path
