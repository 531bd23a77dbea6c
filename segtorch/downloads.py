"""Downloads and the on-disk cache: resumable verified HTTP fetches, a Hugging Face wrapper, offline mode.

This layer moves bytes and knows nothing of models: it sits above ``files`` and below the weights policy
(``segtorch.weights``), which decides what to fetch.

Cache layout (``home()/"checkpoints"``; the weights policy keeps ``home()/"converted"`` the same way)::

    <stem>.<url key><ext>          the verified file, only ever put in place with ``os.replace``; the URL key
                                   (12 hex digits of the URL's sha256) keeps two URLs with one file name apart
    <...>.sha256                   its hash ("<hex>  <name>", as sha256sum writes it) and a comment line with the
                                   file's size and mtime at the time it was verified
    <...>.part                     an unfinished download (resumed with an HTTP Range request)
    <...>.lock                     exists only while a process holds it (see ``cache_lock``)

A cached file is handed out only when its size and mtime still match its sidecar, or when it hashes to the
recorded sha256 (then the sidecar is refreshed): a truncated, replaced or edited file is found, removed and
fetched again instead of being loaded. Without an expected sha256 the first download is trusted and its hash is
recorded (trust on first use). A file that fails its ``validate`` check is never kept.

Heavy or optional packages (requests, tqdm, filelock, huggingface_hub) are imported inside the functions that
need them so ``import segtorch`` stays light and offline cache hits never import an HTTP stack.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from .errors import ChecksumError, DownloadError, OfflineError, UsageError
from .files import atomic_write, sha256_file

__all__ = ["home", "is_offline", "offline_var", "download", "forget", "hf_download", "CachedFile", "cache_lock",
           "unreachable"]

log = logging.getLogger(__name__)

_TRUTHY = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("SEGTORCH_OFFLINE", "HF_HUB_OFFLINE")
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
_SUFFIXES = (".part", ".lock", ".sha256", ".tmp")


# ----------------------------------------------------------------------------------------------------------------
# Environment


def home() -> Path:
    """The cache root: ``$SEGTORCH_HOME``, else ``$XDG_CACHE_HOME/segtorch`` (default ``~/.cache/segtorch``)."""
    root = os.environ.get("SEGTORCH_HOME")
    var = "SEGTORCH_HOME" if root else "XDG_CACHE_HOME"
    if root:
        path = Path(root).expanduser()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "segtorch"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{var}: the cache folder {path} is a file, not a folder; point {var} at a folder "
                         "segtorch may write (or unset it for ~/.cache/segtorch)") from None
    except OSError as exc:
        raise UsageError(f"{var}: cannot use {path} as the cache folder ({_one_line(exc.strerror or exc)}); "
                         f"point {var} at a folder segtorch may write") from None
    return path


def offline_var() -> str | None:
    """The name of the environment variable that turns offline mode on, or None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return var
    return None


def is_offline() -> bool:
    """True when ``SEGTORCH_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return offline_var() is not None


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


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


def _url_key(url: str) -> str:
    """12 hex digits that tell URLs apart: scheme, host, port, path and query (not the password or fragment)."""
    parts = urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    canonical = urlunsplit((parts.scheme.lower(), host, parts.path, parts.query, ""))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def cache_name(url: str, filename: str | None = None) -> str:
    """The cache file name of ``url``: its readable name (``filename`` or the URL's last path segment) with the
    URL key before the extension, e.g. ``model.3f2a9c1b7d4e.pth``."""
    name = _check_name(filename if filename is not None else unquote(urlsplit(url).path.rsplit("/", 1)[-1]), url)
    stem, dot, ext = name.rpartition(".")
    keyed = f"{stem}.{_url_key(url)}.{ext}" if dot and stem else f"{name}.{_url_key(url)}"
    return _check_name(keyed, url)


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


# ----------------------------------------------------------------------------------------------------------------
# The cache: one integrity scheme (a sha256sum-style sidecar) for every cached file


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock named by ``path``; the file exists only while someone holds it.

    POSIX: ``flock`` on ``path``, then check that ``path`` is still the file we locked (a holder removes it just
    before releasing, so a waiter that locked a removed file tries again). Elsewhere: ``filelock.FileLock``, which
    removes its file on Windows. Raises OSError when the folder does not allow the lock file.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        from filelock import FileLock

        with FileLock(str(path)):
            yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder before us removed it: lock the new one
    try:
        yield
    finally:
        _remove(path)  # while still holding it: a waiter on this file sees it gone and starts over
        os.close(fd)


class CachedFile:
    """A file in the cache and the paths that belong to it (sidecar, partial download, lock)."""

    def __init__(self, path: Path) -> None:
        self.file = Path(path)
        self.name = self.file.name
        self.part = self.file.with_name(f"{self.name}.part")
        self.sidecar = self.file.with_name(f"{self.name}.sha256")
        self.lock = self.file.with_name(f"{self.name}.lock")

    def _record(self) -> tuple[str | None, tuple[int, int] | None]:
        """(sha256, (size, mtime_ns)) from the sidecar; either may be None."""
        try:
            lines = self.sidecar.read_text(encoding="ascii").splitlines()
        except (OSError, UnicodeDecodeError):
            return None, None
        try:
            digest = _check_sha256(lines[0].split()[0]) if lines and lines[0].split() else None
        except ValueError:
            return None, None
        stat = None
        for line in lines[1:]:
            fields = dict(f.split("=", 1) for f in line.lstrip("# ").split() if "=" in f)
            with contextlib.suppress(KeyError, ValueError):
                stat = (int(fields["size"]), int(fields["mtime_ns"]))
        return digest, stat

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.file.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def record(self, digest: str, hashed: tuple[int, int] | None = None) -> None:
        """Write the sidecar for the file as it is now (the caller has just hashed it). ``hashed``: the file's
        (size, mtime_ns) before it was hashed; when it has moved since, nothing is recorded."""
        now = self._stat()
        if now is None or (hashed is not None and hashed != now):
            return
        size, mtime_ns = now
        atomic_write(self.sidecar, f"{digest}  {self.name}\n# size={size} mtime_ns={mtime_ns}\n", encoding="ascii")

    def recorded_sha256(self) -> str | None:
        return self._record()[0]

    def verified(self, expected: str | None = None) -> bool:
        """True when the file exists and has the expected (or recorded) sha256; re-hashed only when its size or
        mtime moved since it was recorded (then the record is refreshed if the content still matches)."""
        recorded, stat = self._record()
        want = expected or recorded
        now = self._stat()
        if want is None or now is None:
            return False
        if recorded == want and stat == now:
            return True
        digest = sha256_file(self.file)
        if digest != want:
            return False
        with contextlib.suppress(OSError):  # a read-only cache still serves
            self.record(digest, hashed=now)
        return True

    def check_locked(self, expected: str | None, validate: Callable[[Path], None] | None) -> bool:
        """Under the lock: True if the cached file is good, else remove whatever is there."""
        if not self.file.exists():
            _remove(self.sidecar)
            return False
        want = expected or self.recorded_sha256()
        good = self.verified(want) if want is not None else True  # no record: adopt it if it validates
        if good and validate is not None:
            try:
                validate(self.file)
            except Exception as exc:  # noqa: BLE001 - any validation failure means "not usable"
                log.warning("segtorch: cached %s fails validation (%s); removing it", self.file, _one_line(exc))
                good = False
        if not good:
            log.warning("segtorch: cached %s is damaged or not the expected file; removing it", self.file)
            self.discard()
            return False
        if want is None:
            self.record(sha256_file(self.file))
        return True

    def discard(self) -> None:
        _remove(self.file, self.sidecar)


def _cache_folder(sub: str) -> Path:
    folder = home() / sub
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the cache folder {folder} ({_one_line(exc.strerror or exc)}); "
                         "point SEGTORCH_HOME at a folder segtorch may write") from None
    return folder


def _entry(url: str, filename: str | None) -> CachedFile:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"cannot download {_display_url(url)}: only http:// and https:// URLs are supported")
    name = cache_name(url, filename)
    return CachedFile(_cache_folder("checkpoints") / name)


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
    expected = _check_sha256(sha256)
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
                                   f"cache {entry.file.parent} (cannot lock it: {_one_line(exc)}); needed from "
                                   f"{_display_url(url)}") from None
            raise DownloadError(f"cannot download {_display_url(url)}: cannot lock {entry.lock}: {_one_line(exc)}; "
                                "point SEGTORCH_HOME at a folder segtorch may write") from exc
        # Another process may have finished it while we waited; a damaged file is removed here.
        if entry.check_locked(expected, validate):
            return entry.file
        if offline:
            raise OfflineError(f"offline mode is on ({offline} is set) and {entry.name} is not in the cache "
                               f"{entry.file.parent}; unset {offline} to download it from {_display_url(url)}, "
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
            raise DownloadError(f"downloaded {_display_url(url)} but it is not usable: {_one_line(exc)}; "
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
        raise DownloadError(f"cannot download {_display_url(url)}: cannot reach {urlsplit(url).netloc}: no answer "
                            f"within {connect_timeout:g}s") from None
    except requests.exceptions.Timeout:
        raise _Transient(f"timed out after {timeout:g}s") from None
    except requests.exceptions.ConnectionError as exc:
        if _never_connected(exc):  # name resolution failed, connection refused: retrying will not help
            host = urlsplit(url).hostname
            what = "cannot resolve" if "NameResolution" in repr(exc) else "cannot connect to"
            raise DownloadError(f"cannot download {_display_url(url)}: {what} {host} "
                                f"({_connection_cause(exc).removeprefix('connection failed: ')})") from None
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
        return f"no host in {_display_url(url)}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({_one_line(exc.strerror or exc)})"
    except TimeoutError:
        return f"{host}:{port} did not answer within {timeout:g}s"
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({_one_line(exc.strerror or exc)})"


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
            raise DownloadError(f"cannot download {where}: {_one_line(exc)}") from exc
        except OSError as exc:  # network failures surfacing past huggingface_hub, disk full, ...
            raise DownloadError(f"cannot download {where} from {source}: {_one_line(exc)}") from exc

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
