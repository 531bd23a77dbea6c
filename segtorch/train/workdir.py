"""Work dirs of training runs: one per model and run by default, held by one process tree at a time (a lock),
and the default number of data-loading processes for this machine.

    work_dirs/<model>/run1, run2, ...     a new one per run; ``--resume`` without ``--work-dir`` takes the latest
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from ..errors import UsageError

WORK_DIRS = Path("work_dirs")
LOCK_NAME = ".lock"
_RUN_RE = re.compile(r"^run(\d+)$")
_held: set[Path] = set()  # work dirs this process holds (the CLI takes the lock, then the trainer takes it again)


def _runs(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in parent.iterdir() if (m := _RUN_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def new_run_dir(name: str, parent: Path = WORK_DIRS) -> Path:
    """A new, empty ``<parent>/<name>/run<N>`` (N one past the highest); made atomically, so two runs starting
    together get different folders."""
    base = parent / name
    base.mkdir(parents=True, exist_ok=True)
    runs = _runs(base)
    number = int(_RUN_RE.match(runs[-1].name).group(1)) + 1 if runs else 1
    while True:
        path = base / f"run{number}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


def latest_run_dir(name: str, parent: Path = WORK_DIRS) -> Path:
    """The latest ``<parent>/<name>/run<N>`` that holds a checkpoint (what ``--resume`` continues by default)."""
    runs = [p for p in _runs(parent / name) if (p / "last.pth").is_file()]
    if not runs:
        raise UsageError(f"no run of {name} to resume under {parent / name} (none holds last.pth); "
                         f"give its --work-dir")
    return runs[-1]


@contextlib.contextmanager
def work_dir_lock(work_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<work_dir>/.lock`` for the block, or refuse at once when another process holds it. Re-entrant
    within a process. The lock is released by the system when the process ends, however it ends."""
    path = Path(work_dir).resolve()
    if path in _held:
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK_NAME
    f = open(lock_file, "a+")
    try:
        if not _try_lock(f):
            f.seek(0)
            holder = f.read().strip()
            raise UsageError(f"{work_dir} is in use by another training run{f' (pid {holder})' if holder else ''}; "
                             f"wait for it to end, or give another --work-dir")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)
            f.truncate(0)
    finally:
        f.close()  # closing releases the lock


def _try_lock(f) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def default_workers(limit: int = 4) -> int:
    """Data-loading processes per training process: the CPUs this process may use, shared by the training
    processes of this machine, less one for the training process itself; at most ``limit``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(limit, per_process - 1))
