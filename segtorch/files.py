"""The lowest layer: files on disk. One atomic write and one hash for all of segtorch.

Nothing here imports another segtorch module.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
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


@contextlib.contextmanager
def _renamed_onto(tmp: Path, dst: Path) -> Iterator[None]:
    """When the block ends without error ``tmp`` is renamed onto ``dst``, else removed."""
    try:
        yield
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


def atomic_write(dst: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``dst`` atomically (see ``atomic_path``), through the temporary's own descriptor."""
    dst = _checked_destination(dst)
    fd, tmp = _new_file_beside(dst)
    with _renamed_onto(tmp, dst):
        text = isinstance(data, str)
        with open(fd, "w" if text else "wb", encoding=encoding if text else None) as f:
            f.write(data)
    return dst
