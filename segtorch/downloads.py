"""Checkpoint downloads: a verified on-disk cache, resumable HTTP fetches, a Hugging Face mirror, offline mode.

Cache layout (``home()/"checkpoints"``)::

    <name>          the verified file, only ever put in place with ``os.replace``
    <name>.sha256   its hash ("<hex>  <name>"), written before the file is moved in
    <name>.part     an unfinished download (resumed with an HTTP Range request)
    <name>.lock     a FileLock serialising processes that fetch the same name

Every cached file is re-hashed before it is handed out, so a truncated or edited file is found, removed and
fetched again instead of being loaded. Without an expected sha256 the first download is trusted and its hash is
recorded (trust on first use).

Heavy or optional packages (requests, tqdm, filelock, huggingface_hub) are imported inside the functions that
need them so ``import segtorch`` stays light and offline cache hits never import an HTTP stack.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit, urlunsplit
from .errors import OfflineError, DownloadError, ChecksumError  # noqa: F401 - re-exported

__all__ = [
    "home",
    "is_offline",
    "OfflineError",
    "DownloadError",
    "ChecksumError",
    "download",
    "hf_download",
    "sha256_file",
    "fetch_weights",
]

log = logging.getLogger(__name__)

_TRUTHY = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("SEGTORCH_OFFLINE", "HF_HUB_OFFLINE")
_CHUNK = 1 << 20
# Backoff between retries: base * 2**(failure - 1) seconds (with jitter), capped; module level so tests can shrink it.
_BACKOFF_BASE = 0.5
_BACKOFF_MAX = 8.0
_RETRY_AFTER_MAX = 30.0
# Attempts that made progress (a cut mid-file) do not use up `retries`; this bounds the loop regardless.
_MAX_ATTEMPTS = 64
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_SUFFIXES = (".part", ".lock", ".sha256", ".tmp")


# ----------------------------------------------------------------------------------------------------------------
# Environment


def home() -> Path:
    """The cache root: ``$SEGTORCH_HOME``, else ``$XDG_CACHE_HOME/segtorch`` (default ``~/.cache/segtorch``)."""
    root = os.environ.get("SEGTORCH_HOME")
    if root:
        path = Path(root).expanduser()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "segtorch"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _offline_var() -> str | None:
    """The name of the environment variable that turns offline mode on, or None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return var
    return None


def is_offline() -> bool:
    """True when ``SEGTORCH_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return _offline_var() is not None


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _check_name(name: str | None, url: str) -> str:
    """Refuse cache names that could escape the cache folder or collide with our bookkeeping files."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise ValueError(f"cannot derive a cache file name from {_display_url(url)!r}: got {name!r}; pass filename=")
    bad = [sep for sep in ("/", "\\", os.sep, os.altsep, "\x00") if sep and sep in name]
    if bad or ".." in name or any(ord(c) < 32 for c in name) or ":" in name:
        raise ValueError(f"refusing unsafe cache file name {name!r} (from {_display_url(url)}): "
                         "it must be a plain file name without path separators or '..'")
    if name.startswith(".") or name.endswith(_SUFFIXES) or len(name) > 200:
        raise ValueError(f"refusing cache file name {name!r} (from {_display_url(url)}): "
                         f"it must not start with '.', end in {'/'.join(_SUFFIXES)} or exceed 200 characters")
    return name


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return value


def _display_url(url: str) -> str:
    """The URL without a password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _read_sidecar(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").split()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    try:
        return _check_sha256(text[0]) if text else None
    except ValueError:
        return None


def _write_sidecar(path: Path, digest: str, name: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{digest}  {name}\n", encoding="ascii")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# The cache


class _Entry:
    """The paths that belong to one cached name."""

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self.file = folder / name
        self.part = folder / f"{name}.part"
        self.sidecar = folder / f"{name}.sha256"
        self.lock = folder / f"{name}.lock"

    def verified(self, expected: str | None) -> bool:
        """True when the cached file exists and hashes to the expected (or recorded) sha256."""
        want = expected or _read_sidecar(self.sidecar)
        if want is None or not self.file.is_file():
            return False
        return sha256_file(self.file) == want

    def check_locked(self, expected: str | None, validate: Callable[[Path], None] | None) -> bool:
        """Under the lock: return True if the cached file is good, else remove whatever is there."""
        if not self.file.exists():
            return False
        want = expected or _read_sidecar(self.sidecar)
        digest = sha256_file(self.file)
        if want is None:
            # A file without a record (placed by hand, or its sidecar was deleted): adopt it if it passes the
            # format check, as the first use of this cache entry.
            try:
                if validate is not None:
                    validate(self.file)
            except Exception as exc:  # noqa: BLE001 - any validation failure means "not usable"
                log.warning("segtorch: cached %s fails validation (%s); removing it", self.file, _one_line(exc))
                _remove(self.file, self.sidecar)
                return False
            _write_sidecar(self.sidecar, digest, self.name)
            return True
        if digest == want:
            if _read_sidecar(self.sidecar) != digest:
                _write_sidecar(self.sidecar, digest, self.name)
            return True
        log.warning("segtorch: cached %s is damaged (sha256 %s, expected %s); removing it", self.file, digest, want)
        _remove(self.file, self.sidecar)
        return False


def _file_lock(path: Path):
    from filelock import FileLock

    return FileLock(str(path))


def download(
    url: str,
    sha256: str | None = None,
    *,
    filename: str | None = None,
    progress: bool | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    validate: Callable[[Path], None] | None = None,
) -> Path:
    """Fetch ``url`` into ``home()/"checkpoints"`` (once) and return the verified local path.

    ``sha256`` pins the content; without it the first download's hash is recorded and later checked.
    ``validate(path)`` may raise to reject the content (e.g. not a zip/pickle/safetensors file). ``progress``
    defaults to "stderr is a terminal". Transient failures (connection errors, timeouts, HTTP 5xx/429) are retried
    up to ``retries`` times with exponential backoff; a cut mid-file resumes with a Range request.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"cannot download {_display_url(url)}: only http:// and https:// URLs are supported")
    name = _check_name(filename if filename is not None else unquote(urlsplit(url).path.rsplit("/", 1)[-1]), url)
    expected = _check_sha256(sha256)
    folder = home() / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    entry = _Entry(folder, name)

    # Fast path without the lock: files only appear by os.replace, so an existing one is complete; trust it only
    # when its hash matches. Anything else is settled under the lock.
    if entry.verified(expected):
        return entry.file

    offline = _offline_var()
    try:
        lock = _file_lock(entry.lock)
        lock.acquire()
    except OSError as exc:
        if offline:
            raise OfflineError(f"offline mode is on ({offline} is set) and {name} is not usable from the cache "
                               f"{folder} (cannot lock it: {_one_line(exc)}); needed from {_display_url(url)}"
                               ) from None
        raise DownloadError(f"cannot download {_display_url(url)}: cannot lock {entry.lock}: {_one_line(exc)}") from exc
    try:
        # Another process may have finished it while we waited; a damaged file is removed here.
        if entry.check_locked(expected, validate):
            return entry.file
        if offline:
            raise OfflineError(f"offline mode is on ({offline} is set) and {name} is not in the cache {folder}; "
                               f"unset {offline} to download it from {_display_url(url)}, or put the file there")
        _fetch_verified(url, entry, expected, progress, retries, timeout, validate)
        return entry.file
    finally:
        lock.release()


def _fetch_verified(url: str, entry: _Entry, expected: str | None, progress: bool | None, retries: int,
                    timeout: float, validate: Callable[[Path], None] | None) -> None:
    """Download into the .part file, verify it, record its hash and move it into place (caller holds the lock)."""
    # A .part left by an earlier run can only be resumed safely when the final hash is known in advance; with
    # trust-on-first-use a stale prefix from an older version of the file would be recorded as the truth.
    leftover = expected is not None and entry.part.is_file() and entry.part.stat().st_size > 0
    if not leftover:
        _remove(entry.part)
    for last_try in (not leftover, True):
        try:
            _fetch(url, entry, progress, retries, timeout)
        except BaseException as exc:
            # Keep a partial file only where a later call can resume it safely (see above).
            if expected is None or isinstance(exc, OSError):
                _remove(entry.part)
            if isinstance(exc, OSError):  # writing failed (disk full, permissions)
                raise DownloadError(f"cannot download {_display_url(url)}: cannot write {entry.part}: "
                                    f"{_one_line(exc)}") from exc
            raise
        digest = sha256_file(entry.part)
        if expected is None or digest == expected:
            break
        _remove(entry.part)
        if last_try:
            raise ChecksumError(f"checksum mismatch for {_display_url(url)}: expected sha256 {expected}, "
                                f"got {digest}; the download was discarded")
        log.warning("segtorch: resumed download of %s has the wrong sha256; downloading it again", entry.name)
    if validate is not None:
        try:
            validate(entry.part)
        except Exception as exc:  # noqa: BLE001 - the hook decides what is invalid
            _remove(entry.part)
            raise DownloadError(f"downloaded {_display_url(url)} but it is not a valid file: "
                                f"{_one_line(exc)}; the download was discarded") from exc
    _write_sidecar(entry.sidecar, digest, entry.name)
    os.replace(entry.part, entry.file)


class _Transient(Exception):
    """A failure worth retrying; ``progressed`` tells whether the attempt added bytes to the .part file."""

    def __init__(self, cause: str, progressed: bool = False, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.progressed = progressed
        self.retry_after = retry_after


def _fetch(url: str, entry: _Entry, progress: bool | None, retries: int, timeout: float) -> None:
    """Make ``entry.part`` hold the complete body of ``url``, resuming and retrying as needed."""
    import requests

    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    session = requests.Session()
    session.headers.update({"User-Agent": "segtorch-hub", "Accept-Encoding": "identity"})
    state: dict = {}  # validators (ETag/Last-Modified) of the first response, for If-Range on resume
    failures = 0
    try:
        for _attempt in range(_MAX_ATTEMPTS):
            try:
                _fetch_once(session, url, entry, progress, timeout, state)
                return
            except _Transient as exc:
                failures = 1 if exc.progressed else failures + 1
                if failures > retries:
                    raise DownloadError(f"cannot download {_display_url(url)}: {exc.cause} "
                                        f"(gave up after {retries} retries)") from None
                delay = 0.0 if exc.progressed else min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** (failures - 1))
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, _RETRY_AFTER_MAX))
                delay *= 1 + 0.25 * random.random()
                log.info("segtorch: %s: %s; retrying in %.1fs", _display_url(url), exc.cause, delay)
                time.sleep(delay)
        raise DownloadError(f"cannot download {_display_url(url)}: too many interrupted attempts")
    finally:
        session.close()


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _fetch_once(session, url: str, entry: _Entry, progress: bool, timeout: float, state: dict) -> None:
    """One HTTP request: resume from the .part size, append or restart, and raise _Transient on a cut."""
    import requests
    import urllib3
    from tqdm.auto import tqdm

    offset = entry.part.stat().st_size if entry.part.exists() else 0
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("validator"):
            headers["If-Range"] = state["validator"]
    try:
        response = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.exceptions.Timeout:
        raise _Transient(f"timed out after {timeout:g}s") from None
    except requests.exceptions.ConnectionError as exc:
        raise _Transient(_connection_cause(exc)) from None
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"cannot download {_display_url(url)}: {_one_line(exc)}") from None

    written = 0
    with response:
        status = response.status_code
        if status == 416 and offset:
            # The .part is already as long as (or longer than) the file: start over.
            _remove(entry.part)
            raise _Transient("the partial download does not fit the file on the server", progressed=True)
        if status in _TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status} {response.reason}",
                             retry_after=_retry_after(response.headers.get("Retry-After")))
        if status not in (200, 206):
            raise DownloadError(f"cannot download {_display_url(url)}: HTTP {status} {response.reason}")

        total = _int(response.headers.get("Content-Length"))
        if response.headers.get("Content-Encoding", "identity").lower() != "identity":
            total = None  # the length is that of the encoded body
        if status == 206:
            start, full = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                _remove(entry.part)
                raise _Transient(f"the server resumed at byte {start} instead of {offset}", progressed=True)
            mode, initial = "ab", offset
            total = full if full is not None else (offset + total if total is not None else None)
        else:
            mode, initial = "wb", 0  # 200: the server ignored Range (or this is the first request)
            validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
            if validator and not validator.startswith("W/"):
                state["validator"] = validator

        bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=entry.name, disable=not progress, leave=False)
        try:
            with open(entry.part, mode) as f:
                chunks = _body_chunks(response.raw)
                while True:
                    # Only the network read is guarded: a failing write (disk full) is not worth retrying.
                    try:
                        chunk = next(chunks, None)
                    except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError) as exc:
                        stalled = isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError))
                        cause = f"stalled for {timeout:g}s" if stalled else "connection cut"
                        raise _Transient(f"{cause} at byte {initial + written}", progressed=written > 0) from None
                    if chunk is None:
                        break
                    f.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()

    size = initial + written
    if total is not None and size != total:
        if size > total:
            _remove(entry.part)
        raise _Transient(f"received {size} bytes but the server announced {total}", progressed=written > 0)


def _body_chunks(raw):
    """Yield the body as it arrives. urllib3 2's ``read(amt)`` waits to fill ``amt`` and drops what it holds when
    the connection is cut, which would lose the bytes a resume should start from; ``read1`` hands them over."""
    read1 = getattr(raw, "read1", None)
    if read1 is None:  # urllib3 1.x: read(amt) returns what arrived before a cut
        yield from raw.stream(_CHUNK, decode_content=True)
        return
    while chunk := read1(_CHUNK, decode_content=True):
        yield chunk


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` into (START, TOTAL); TOTAL may be ``*``."""
    try:
        unit, spec = value.split(None, 1)
        span, full = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        return (start, None if full.strip() == "*" else int(full)) if unit.lower() == "bytes" else (None, None)
    except (AttributeError, ValueError):
        return None, None


def _connection_cause(exc: BaseException) -> str:
    """The innermost readable reason of a requests ConnectionError (e.g. '[Errno 111] Connection refused')."""
    reason = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", reason)
    text = _one_line(reason)
    if "[Errno" in text:
        text = text[text.index("[Errno"):].rstrip(")'\"")
    return f"connection failed: {text}"


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face Hub


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
        return _one_line(f"HTTP {status} {reason}")
    return _one_line(exc)


def hf_download(repo_id: str, filename: str, revision: str | None = None, sha256: str | None = None) -> Path:
    """Fetch ``filename`` from the Hugging Face model repo ``repo_id`` into the Hugging Face cache.

    Honours ``HF_ENDPOINT`` (a mirror), ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_TOKEN``; in offline mode only the
    cache is consulted. ``sha256`` is checked on the result (one forced re-download on a mismatch when online).
    """
    expected = _check_sha256(sha256)
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    offline = _offline_var()
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise DownloadError(f"cannot download {where} from the Hugging Face Hub: huggingface_hub is not installed "
                            "(pip install huggingface_hub)") from None

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    source = endpoint or "https://huggingface.co"

    def fetch(force: bool) -> Path:
        try:
            return Path(huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision, endpoint=endpoint, cache_dir=_hf_cache_dir(),
                local_files_only=offline is not None, force_download=force))
        except hf_errors.OfflineModeIsEnabled:
            raise OfflineError(f"offline mode is on (HF_HUB_OFFLINE) and {where} is not in the Hugging Face cache"
                               ) from None
        except hf_errors.LocalEntryNotFoundError as exc:
            if offline:
                cache_dir = _hf_cache_dir() or huggingface_hub.constants.HF_HUB_CACHE
                raise OfflineError(f"offline mode is on ({offline} is set) and {where} is not in the Hugging Face "
                                   f"cache {cache_dir}; unset {offline} to download it") from None
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
            raise DownloadError(f"cannot download {where}: {_one_line(exc)}") from exc
        except OSError as exc:  # network failures surfacing past huggingface_hub, disk full, ...
            raise DownloadError(f"cannot download {where} from {source}: {_one_line(exc)}") from exc

    path = fetch(force=False)
    if expected is None:
        return path
    digest = sha256_file(path)
    if digest != expected and offline is None:
        log.warning("segtorch: cached %s has the wrong sha256; downloading it again", where)
        path = fetch(force=True)
        digest = sha256_file(path)
    if digest != expected:
        raise ChecksumError(f"checksum mismatch for {where} from {source}: expected sha256 {expected}, got {digest}")
    return path


def _looks_like_checkpoint(path: Path) -> None:
    """``validate`` hook for GitHub release files: a PyTorch zip or legacy pickle, or a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(9)
    is_zip, is_pickle = head[:4] == b"PK\x03\x04", head[:1] == b"\x80"
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not (is_zip or is_pickle or is_safetensors):
        raise DownloadError(f"{path.name}: the server sent something that is not a checkpoint "
                            f"(first bytes {head[:8]!r})")


def fetch_weights(card) -> Path:
    """The cached safetensors weights of a model card, fetched on first use.

    Order: weights shipped with segtorch (demo models); the Hugging Face mirror's safetensors file; the GitHub
    release ``.pth``, verified (the card's sha256, or trust on first use) and converted on arrival into
    ``home()/"converted"/<name>.safetensors``. Offline, only what is cached is used.
    """
    if getattr(card, "weights", None):
        from .registry import cards_dir

        path = cards_dir() / card.weights
        if not path.is_file():
            raise FileNotFoundError(f"{card.name}: the shipped weights {path} are missing from this installation")
        return path
    errors = []
    if card.hub:
        try:
            return hf_download(card.hub["repo"], card.hub["file"], sha256=card.hub.get("sha256"))
        except OfflineError as exc:
            errors.append(str(exc))
        except DownloadError as exc:
            errors.append(str(exc))
            log.info("segtorch: %s; falling back to the GitHub release", exc)
    if not card.url:
        raise DownloadError(f"{card.name}: no weights available: " + "; ".join(errors))
    converted = home() / "converted" / _check_name(card.name + ".safetensors", card.url)
    if _converted_is_intact(converted):
        return converted
    try:
        pth = download(card.url, sha256=card.sha256, validate=_looks_like_checkpoint)
    except OfflineError as exc:
        raise OfflineError(f"{card.name}: not in the cache and offline mode is on ({_offline_var()}); "
                           f"{'; '.join(errors + [str(exc)])}") from None
    from .api import convert

    convert(pth, converted, name=card.name)
    _record_converted(converted)
    return converted


def _converted_record(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _record_converted(path: Path) -> None:
    import json

    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
    tmp = _converted_record(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, _converted_record(path))


def _converted_is_intact(path: Path) -> bool:
    """A converted file is re-hashed only when its size or mtime differs from the record made when it was
    written, so a cached model loads without reading it twice; a damaged one is removed and made again."""
    import json

    try:
        record = json.loads(_converted_record(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        _remove(path, _converted_record(path))
        return False
    if (st.st_size, st.st_mtime_ns) == (record.get("size"), record.get("mtime_ns")):
        return True
    if sha256_file(path) == record.get("sha256"):
        return True
    log.warning("segtorch: cached %s is damaged; converting it again", path)
    _remove(path, _converted_record(path))
    return False
