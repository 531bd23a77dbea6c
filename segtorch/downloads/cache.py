"""The on-disk cache: where it is, offline mode, cache file names, the lock and the sha256 sidecars.

The lowest layer of ``segtorch.downloads``: it uses ``files`` only. Layout (``home()/"checkpoints"``; the weights
policy keeps ``home()/"converted"`` the same way)::

    <stem>.<url key><ext>          the verified file, only ever put in place with ``os.replace``; the URL key
                                   (12 hex digits of the URL's sha256) keeps two URLs with one file name apart
    <...>.sha256                   its hash ("<hex>  <name>", as sha256sum writes it) and a comment line with the
                                   file's size and mtime at the time it was verified
    <...>.part                     an unfinished download (resumed with an HTTP Range request)
    <...>.lock                     exists only while a process holds it (see ``cache_lock``)

A cached file is handed out only when its size and mtime still match its sidecar, or when it hashes to the
recorded sha256 (then the sidecar is refreshed): a truncated, replaced or edited file is found, removed and
fetched again instead of being loaded. Without an expected sha256 the first download is trusted and its hash is
recorded (trust on first use).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import UsageError
from ..files import atomic_write, sha256_file

__all__ = ["home", "offline_var", "is_offline", "cache_name", "cache_folder", "cache_lock", "CachedFile",
           "check_sha256", "display_url", "one_line", "remove_files"]

log = logging.getLogger("segtorch.downloads")

_TRUTHY = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("SEGTORCH_OFFLINE", "HF_HUB_OFFLINE")
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
        raise UsageError(f"{var}: cannot use {path} as the cache folder ({one_line(exc.strerror or exc)}); "
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
        raise ValueError(f"cannot derive a cache file name from {display_url(url)!r}: got {name!r}; pass filename=")
    bad = [sep for sep in ("/", "\\", os.sep, os.altsep, "\x00") if sep and sep in name]
    if bad or ".." in name or any(ord(c) < 32 for c in name) or ":" in name:
        raise ValueError(f"refusing unsafe cache file name {name!r} (from {display_url(url)}): "
                         "it must be a plain file name without path separators or '..'")
    if name.startswith(".") or name.endswith(_SUFFIXES) or len(name) > 200:
        raise ValueError(f"refusing cache file name {name!r} (from {display_url(url)}): "
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


def check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return value


def display_url(url: str) -> str:
    """The URL without a password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def remove_files(*paths: Path) -> None:
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
        remove_files(path)  # while still holding it: a waiter on this file sees it gone and starts over
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
            digest = check_sha256(lines[0].split()[0]) if lines and lines[0].split() else None
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
            remove_files(self.sidecar)
            return False
        want = expected or self.recorded_sha256()
        good = self.verified(want) if want is not None else True  # no record: adopt it if it validates
        if good and validate is not None:
            try:
                validate(self.file)
            except Exception as exc:  # noqa: BLE001 - any validation failure means "not usable"
                log.warning("segtorch: cached %s fails validation (%s); removing it", self.file, one_line(exc))
                good = False
        if not good:
            log.warning("segtorch: cached %s is damaged or not the expected file; removing it", self.file)
            self.discard()
            return False
        if want is None:
            self.record(sha256_file(self.file))
        return True

    def discard(self) -> None:
        remove_files(self.file, self.sidecar)


def cache_folder(sub: str) -> Path:
    folder = home() / sub
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the cache folder {folder} ({one_line(exc.strerror or exc)}); "
                         "point SEGTORCH_HOME at a folder segtorch may write") from None
    return folder


