"""The lowest layer: files on disk. One atomic write and one hash for all of segtorch.

Nothing here imports another segtorch module.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Iterator

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _new_file_beside(dst: Path) -> tuple[int, Path]:
    """(open descriptor, path) of a new empty file ``.<name>.<random>.tmp`` in ``dst``'s folder, created with
    mode 0o666 so that the kernel takes the umask off, as ``open(dst, "w")`` would (reading the umask means
    setting it, process-wide, which races with other threads' file and folder creation)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = dst.parent / f".{dst.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another writer's temporary: draw again
            continue
    raise FileExistsError(f"{dst.parent}: no free temporary name for {dst.name} after 100 tries")


def _checked_destination(dst: str | os.PathLike) -> Path:
    dst = Path(dst)
    if dst.is_dir():
        raise IsADirectoryError(f"{dst} is a directory; give a file path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst


_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2():
    """glibc's ``renameat2`` (2.28+) where this is Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        function.restype = ctypes.c_int
    return function


def _swapped_in(tmp: Path, dst: Path) -> bool:
    """Put ``tmp`` in the place of the regular file ``dst`` by exchanging the two names in one step (Linux's
    ``renameat2(RENAME_EXCHANGE)``), then delete the old file, now under ``tmp``'s name. False, with nothing
    changed, where that cannot be done: no regular file at ``dst`` (one that becomes a folder between the check
    and the exchange is exchanged back), not Linux, or a file system without the exchange; the caller then
    renames."""
    renameat2 = _renameat2()
    try:
        if renameat2 is None or not stat.S_ISREG(os.lstat(dst).st_mode):
            return False
    except FileNotFoundError:
        return False
    names = os.fsencode(tmp), os.fsencode(dst)
    if renameat2(-100, names[0], -100, names[1], _RENAME_EXCHANGE) != 0:  # -100: AT_FDCWD
        return False
    try:
        os.unlink(tmp)
    except IsADirectoryError:  # a folder took ``dst``'s place after the check: put it back; the rename refuses
        renameat2(-100, names[0], -100, names[1], _RENAME_EXCHANGE)
        return False
    return True


@contextlib.contextmanager
def _renamed_onto(tmp: Path, dst: Path, recomputable: bool = False) -> Iterator[None]:
    """When the block ends without error ``tmp`` is renamed onto ``dst``, else removed. ``recomputable``: an
    existing ``dst`` is swapped out and deleted instead (``atomic_write`` says why)."""
    try:
        yield
        if not (recomputable and _swapped_in(tmp, dst)):
            os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; when the block ends without error it is renamed onto ``dst``
    (readers see the old file or the new one, never half of one), else removed. The new file gets the
    ordinary permissions (0o666 less the umask), as ``open(dst, "w")`` would give it. ``durable``: its data
    is flushed to the disk before the rename, so that a power cut cannot leave an empty file under ``dst``
    (training checkpoints; not worth a disk flush per file for many small outputs)."""
    dst = _checked_destination(dst)
    fd, tmp = _new_file_beside(dst)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask, as the kernel applied it
    os.close(fd)  # the caller writes by path (torch.save, safetensors)
    with _renamed_onto(tmp, dst):
        yield tmp
        # safetensors' save_file replaces the file with a 0o600 one: unreadable in a shared cache
        os.chmod(tmp, mode)
        if durable:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write(dst: str | os.PathLike, data: bytes | str, encoding: str = "utf-8", *,
                 recomputable: bool = False) -> Path:
    """Write ``data`` to ``dst`` atomically (see ``atomic_path``), through the temporary's own descriptor:
    opening it again by name costs ``segtorch predict`` ~0.1 ms per file, more with two writer threads.

    ``recomputable``: for outputs that can be made again (``segtorch predict``'s pictures), an existing ``dst``
    is exchanged with the new file and then deleted (``_swapped_in``), not renamed over. Readers still see the
    old file or the new one. Renaming over a file makes ext4 allocate and start writing the new data at once
    (``auto_da_alloc``), so that a power cut leaves the old or the new content rather than an empty file;
    a 700 KB picture then spent ~0.4 ms waiting on the disk, ~3x its CPU time (0.57 against 0.16 ms). A file
    written where none was has never had that protection."""
    dst = _checked_destination(dst)
    fd, tmp = _new_file_beside(dst)
    with _renamed_onto(tmp, dst, recomputable=recomputable):
        text = isinstance(data, str)
        with open(fd, "w" if text else "wb", encoding=encoding if text else None) as f:
            f.write(data)
    return dst
