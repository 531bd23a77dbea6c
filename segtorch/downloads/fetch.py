"""Resumable, verified HTTP(S) downloads into the cache (``cache``): one process fetches a file while the
others wait on its lock; a cut transfer resumes with a Range request; a file that fails its sha256 or its
``validate`` check is never kept.

Heavy packages (requests, tqdm) are imported inside the functions that need them, so that ``import segtorch``
stays light and cache hits never import an HTTP stack.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from ..errors import ChecksumError, DownloadError, OfflineError
from ..files import sha256_file
from .cache import (CachedFile, cache_folder, cache_lock, cache_name, check_sha256, display_url, log, offline_var,
                    one_line, remove_files)

__all__ = ["download", "forget", "unreachable"]

_CHUNK = 1 << 20
# Backoff between retries: base * 2**(failure - 1) seconds (with jitter), capped; module level so tests can shrink it.
_BACKOFF_BASE = 0.5
_BACKOFF_MAX = 8.0
_RETRY_AFTER_MAX = 30.0
# Opening a connection fails fast or not at all: a host that does not answer within this is reported unreachable
# (two hosts, the mirror and the release, then fail within 15 s on a network that drops packets).
_CONNECT_TIMEOUT = 6.0
# Attempts that made progress (a cut mid-file) do not use up `retries`; this bounds the loop regardless.
_MAX_ATTEMPTS = 64
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _entry(url: str, filename: str | None) -> CachedFile:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"cannot download {display_url(url)}: only http:// and https:// URLs are supported")
    name = cache_name(url, filename)
    return CachedFile(cache_folder("checkpoints") / name)


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

    The cache is keyed by the URL (see ``cache_name``); ``filename`` replaces the readable part of the name.
    ``sha256`` pins the content; without it the first download's hash is recorded and later checked.
    ``validate(path)`` may raise to reject the content (e.g. not a checkpoint): a rejected file is discarded, on
    arrival or when found in the cache, and fetched again next time. ``progress`` defaults to "stderr is a
    terminal". Transient failures (a cut connection, timeouts, HTTP 5xx/429) are retried up to ``retries`` times
    with exponential backoff, a cut mid-file resumes with a Range request; an unreachable host (name resolution
    failure, connection refused) is reported at once.
    """
    expected = check_sha256(sha256)
    entry = _entry(url, filename)

    # Fast path without the lock: files only appear by os.replace, so an existing one is complete; trust it only
    # when its hash matches (and it still validates). Anything else is settled under the lock.
    if entry.verified(expected) and _valid(entry.file, validate):
        return entry.file

    offline = offline_var()
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(cache_lock(entry.lock))
        except OSError as exc:
            if offline:
                raise OfflineError(f"offline mode is on ({offline} is set) and {entry.name} is not usable from the "
                                   f"cache {entry.file.parent} (cannot lock it: {one_line(exc)}); needed from "
                                   f"{display_url(url)}") from None
            raise DownloadError(f"cannot download {display_url(url)}: cannot lock {entry.lock}: {one_line(exc)}; "
                                "point SEGTORCH_HOME at a folder segtorch may write") from exc
        # Another process may have finished it while we waited; a damaged file is removed here.
        if entry.check_locked(expected, validate):
            return entry.file
        if offline:
            raise OfflineError(f"offline mode is on ({offline} is set) and {entry.name} is not in the cache "
                               f"{entry.file.parent}; unset {offline} to download it from {display_url(url)}, "
                               "or put the file there")
        _fetch_verified(url, entry, expected, progress, retries, timeout, validate)
        return entry.file


def forget(url: str, filename: str | None = None) -> None:
    """Remove the cached copy of ``url`` (e.g. a file that downloaded fine but turned out unusable)."""
    entry = _entry(url, filename)
    with cache_lock(entry.lock):
        entry.discard()


def _valid(path: Path, validate: Callable[[Path], None] | None) -> bool:
    if validate is None:
        return True
    try:
        validate(path)
    except Exception:  # noqa: BLE001 - settled (and logged) under the lock
        return False
    return True


def _fetch_verified(url: str, entry: CachedFile, expected: str | None, progress: bool | None, retries: int,
                    timeout: float, validate: Callable[[Path], None] | None) -> None:
    """Download into the .part file, verify it, record its hash and move it into place (caller holds the lock)."""
    # A .part left by an earlier run can only be resumed safely when the final hash is known in advance; with
    # trust-on-first-use a stale prefix from an older version of the file would be recorded as the truth.
    leftover = expected is not None and entry.part.is_file() and entry.part.stat().st_size > 0
    if not leftover:
        remove_files(entry.part)
    for last_try in (not leftover, True):
        try:
            _fetch(url, entry, progress, retries, timeout)
        except BaseException as exc:
            # Keep a partial file only where a later call can resume it safely (see above).
            if expected is None or isinstance(exc, OSError):
                remove_files(entry.part)
            if isinstance(exc, OSError):  # writing failed (disk full, permissions)
                raise DownloadError(f"cannot download {display_url(url)}: cannot write {entry.part}: "
                                    f"{one_line(exc)}") from exc
            raise
        digest = sha256_file(entry.part)
        if expected is None or digest == expected:
            break
        remove_files(entry.part)
        if last_try:
            raise ChecksumError(f"checksum mismatch for {display_url(url)}: expected sha256 {expected}, "
                                f"got {digest}; the download was discarded")
        log.warning("segtorch: resumed download of %s has the wrong sha256; downloading it again", entry.name)
    if validate is not None:
        try:
            validate(entry.part)
        except Exception as exc:  # noqa: BLE001 - the hook decides what is invalid
            remove_files(entry.part)
            raise DownloadError(f"downloaded {display_url(url)} but it is not usable: {one_line(exc)}; "
                                "the download was discarded (check that the URL serves the file itself, "
                                "not a web page)") from exc
    os.replace(entry.part, entry.file)
    entry.record(digest)


class _Transient(Exception):
    """A failure worth retrying; ``progressed`` tells whether the attempt added bytes to the .part file."""

    def __init__(self, cause: str, progressed: bool = False, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.progressed = progressed
        self.retry_after = retry_after


def _fetch(url: str, entry: CachedFile, progress: bool | None, retries: int, timeout: float) -> None:
    """Make ``entry.part`` hold the complete body of ``url``, resuming and retrying as needed."""
    import requests

    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    session = requests.Session()
    session.headers.update({"User-Agent": "segtorch", "Accept-Encoding": "identity"})
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
                    raise DownloadError(f"cannot download {display_url(url)}: {exc.cause} "
                                        f"(gave up after {retries} retries)") from None
                delay = 0.0 if exc.progressed else min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** (failures - 1))
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, _RETRY_AFTER_MAX))
                delay *= 1 + 0.25 * random.random()
                log.info("segtorch: %s: %s; retrying in %.1fs", display_url(url), exc.cause, delay)
                time.sleep(delay)
        raise DownloadError(f"cannot download {display_url(url)}: too many interrupted attempts")
    finally:
        session.close()


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _fetch_once(session, url: str, entry: CachedFile, progress: bool, timeout: float, state: dict) -> None:
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
    connect_timeout = min(timeout, _CONNECT_TIMEOUT)
    try:
        response = session.get(url, headers=headers, stream=True, timeout=(connect_timeout, timeout))
    except requests.exceptions.ConnectTimeout:
        # A host that does not answer at all is not worth retrying like a busy one (HTTP 503).
        raise DownloadError(f"cannot download {display_url(url)}: cannot reach {urlsplit(url).netloc}: no answer "
                            f"within {connect_timeout:g}s") from None
    except requests.exceptions.Timeout:
        raise _Transient(f"timed out after {timeout:g}s") from None
    except requests.exceptions.ConnectionError as exc:
        if _never_connected(exc):  # name resolution failed, connection refused: retrying will not help
            host = urlsplit(url).hostname
            what = "cannot resolve" if "NameResolution" in repr(exc) else "cannot connect to"
            raise DownloadError(f"cannot download {display_url(url)}: {what} {host} "
                                f"({_connection_cause(exc).removeprefix('connection failed: ')})") from None
        raise _Transient(_connection_cause(exc)) from None
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"cannot download {display_url(url)}: {one_line(exc)}") from None

    written = 0
    with response:
        status = response.status_code
        if status == 416 and offset:
            # The .part is already as long as (or longer than) the file: start over.
            remove_files(entry.part)
            raise _Transient("the partial download does not fit the file on the server", progressed=True)
        if status in _TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status} {response.reason}",
                             retry_after=_retry_after(response.headers.get("Retry-After")))
        if status not in (200, 206):
            raise DownloadError(f"cannot download {display_url(url)}: HTTP {status} {response.reason}")

        total = _int(response.headers.get("Content-Length"))
        if response.headers.get("Content-Encoding", "identity").lower() != "identity":
            total = None  # the length is that of the encoded body
        if status == 206:
            start, full = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                remove_files(entry.part)
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
            remove_files(entry.part)
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


def _never_connected(exc: BaseException) -> bool:
    """True when a requests ConnectionError failed before any connection was made (not through a proxy)."""
    import requests
    import urllib3

    if isinstance(exc, requests.exceptions.ProxyError):
        return False
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)  # includes NameResolutionError


def unreachable(url: str, timeout: float = _CONNECT_TIMEOUT) -> str | None:
    """Why ``url``'s host (or the proxy that serves it) cannot be reached: name resolution fails, the connection
    is refused or not answered within ``timeout``; None when a TCP connection opens. Used before calling
    libraries that retry such failures for half a minute (huggingface_hub)."""
    import urllib.request

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname, proxied.port or 8080
    if not host:
        return f"no host in {display_url(url)}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({one_line(exc.strerror or exc)})"
    except TimeoutError:
        return f"{host}:{port} did not answer within {timeout:g}s"
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({one_line(exc.strerror or exc)})"


def _connection_cause(exc: BaseException) -> str:
    """The innermost readable reason of a requests ConnectionError (e.g. '[Errno 111] Connection refused')."""
    reason = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", reason)
    text = one_line(reason)
    if "[Errno" in text:
        text = text[text.index("[Errno"):].rstrip(")'\"")
    return f"connection failed: {text}"
