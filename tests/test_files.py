"""segtorch.files: the one atomic write and the one hash every other layer uses."""
import hashlib
import os
import stat

import pytest

from segtorch import files


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(dst) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary left behind
    files.atomic_write(dst, b"new")
    assert dst.read_bytes() == b"new"


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    dst = tmp_path / "out.txt"
    dst.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        files.atomic_write(dst, "caf\u00e9", encoding="ascii")  # fails while writing
    assert dst.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert files.atomic_write(dst, "line\n").read_bytes() == b"line" + os.linesep.encode()  # text mode


def test_atomic_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        path = files.atomic_write(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's 0o600


@pytest.mark.parametrize("writer", ["safetensors", "torch", "bytes"])
def test_files_written_by_path_get_ordinary_permissions(tmp_path, writer):
    """Whatever mode the library writing by path gives its file (safetensors' save_file: 0o600), the result is
    readable as the umask says: cached conversions, ``segtorch convert`` output and trained weights are shared."""
    import torch
    from safetensors.torch import save_file

    write = {"safetensors": lambda p: save_file({"w": torch.zeros(2)}, str(p)),
             "torch": lambda p: torch.save({"w": torch.zeros(2)}, p),
             "bytes": lambda p: p.write_bytes(b"x")}[writer]
    for umask, expected in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            with files.atomic_path(tmp_path / f"{umask:o}.bin") as tmp:
                write(tmp)
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / f"{umask:o}.bin").stat().st_mode) == expected, oct(umask)


def test_atomic_write_leaves_the_umask_alone(tmp_path, monkeypatch):
    """The umask is per process: reading it by setting it to 0 and back would give a file or folder made by
    another thread in between (``segtorch predict`` writes from two) 0o666/0o777 permissions."""
    def umask(mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", umask)
    with files.atomic_path(tmp_path / "a.bin", durable=True) as tmp:
        tmp.write_bytes(b"x")
    assert files.atomic_write(tmp_path / "b.txt", "y").read_text() == "y"


@pytest.mark.parametrize("durable", [False, True])
def test_durable_flushes_before_the_rename(tmp_path, monkeypatch, durable):
    dst = tmp_path / "ckpt.pth"
    flushed = []
    real_fsync = os.fsync

    def fsync(fd):
        flushed.append(dst.exists())  # what a reader would see at that moment
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with files.atomic_path(dst, durable=durable) as tmp:
        tmp.write_bytes(b"weights")
    assert dst.read_bytes() == b"weights"
    assert flushed == ([False] if durable else [])


def test_trainer_checkpoints_are_durable_atomic_writes(tmp_path, monkeypatch):
    from segtorch.train import trainer

    calls = []
    real = files.atomic_path

    def spy(dst, durable=False):
        calls.append(durable)
        return real(dst, durable=durable)

    monkeypatch.setattr(trainer, "atomic_path", spy)
    trainer._save_atomic({"step": 3}, tmp_path / "sub" / "last.pth")
    import torch

    assert torch.load(tmp_path / "sub" / "last.pth") == {"step": 3}
    assert calls == [True]


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read block, not a multiple of it
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert files.sha256_file(path) == hashlib.sha256(data).hexdigest()


def _exchange_works_here(folder) -> bool:
    """Whether this OS and file system exchange two names (asked directly, not through segtorch)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None), "renameat2", None)
    a, b = folder / "probe_a", folder / "probe_b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    swapped = renameat2 is not None and renameat2(-100, bytes(a), -100, bytes(b), 2) == 0
    a.unlink()
    b.unlink()
    return swapped


def test_recomputable_write_swaps_out_an_existing_file(tmp_path, monkeypatch):
    """``recomputable``: an existing file is exchanged with the new one and deleted, never renamed over (on ext4
    the rename would make the writer wait for the new data to be written back); the result is the same."""
    if not _exchange_works_here(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here (not Linux, or the file system lacks it)")
    dst = tmp_path / "x_overlay.png"
    dst.write_bytes(b"old")
    os.link(dst, tmp_path / "kept")  # the old file's data stays with its other name, untouched

    def no_rename(*a, **k):
        raise AssertionError("renamed over an existing file")

    monkeypatch.setattr(os, "replace", no_rename)
    old = os.umask(0o027)
    try:
        files.atomic_write(dst, b"new", recomputable=True)
    finally:
        os.umask(old)
    assert dst.read_bytes() == b"new" and (tmp_path / "kept").read_bytes() == b"old"
    assert stat.S_IMODE(dst.stat().st_mode) == 0o640 and dst.stat().st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "x_overlay.png"]  # no temporary left
    with pytest.raises(AssertionError, match="renamed over"):  # without the flag: the rename, as before
        files.atomic_write(dst, b"newer")


@pytest.mark.parametrize("case", ["missing", "symlink", "exchange_refused", "not_linux"])
def test_recomputable_write_renames_where_it_cannot_swap(tmp_path, monkeypatch, case):
    """No regular file to swap out, or no exchange to swap it with: the ordinary rename, same result."""
    dst, target = tmp_path / "out.png", tmp_path / "target.png"
    target.write_bytes(b"target")
    if case == "symlink":
        dst.symlink_to(target)
    elif case != "missing":
        dst.write_bytes(b"old")
    if case == "exchange_refused":  # e.g. a file system without RENAME_EXCHANGE (EINVAL)
        monkeypatch.setattr(files, "_renameat2", lambda: lambda *a: -1)
    elif case == "not_linux":
        monkeypatch.setattr(files, "_renameat2", lambda: None)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(b), real_replace(a, b)))
    files.atomic_write(dst, b"new", recomputable=True)
    assert renamed == [dst] and dst.read_bytes() == b"new" and not dst.is_symlink()
    assert target.read_bytes() == b"target"  # a link is replaced, as a rename replaces it, never followed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "target.png"]


def test_a_folder_that_takes_the_files_place_is_put_back(tmp_path, monkeypatch):
    """A folder made at the destination between the check and the exchange is exchanged back, untouched, and
    the write fails as a rename over a folder fails."""
    if not _exchange_works_here(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here (not Linux, or the file system lacks it)")
    dst = tmp_path / "out.png"
    dst.write_bytes(b"old")
    real, raced = files._renameat2(), []

    def racing(*args):  # the folder appears just before the first exchange
        if not raced:
            raced.append(True)
            dst.unlink()
            dst.mkdir()
            (dst / "inside.txt").write_text("mine")
        return real(*args)

    monkeypatch.setattr(files, "_renameat2", lambda: racing)
    with pytest.raises(IsADirectoryError):
        files.atomic_write(dst, b"new", recomputable=True)
    assert dst.is_dir() and (dst / "inside.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left


def test_predict_pictures_are_recomputable_writes(tmp_path, monkeypatch):
    import numpy as np

    from segtorch.cli import predict

    flags = []
    real = files.atomic_write
    monkeypatch.setattr(files, "atomic_write", lambda *a, **k: (flags.append(k.get("recomputable")), real(*a, **k))[1])
    predict.write_png(np.zeros((4, 5), np.uint8), tmp_path / "a_labels.png")
    assert flags == [True] and (tmp_path / "a_labels.png").read_bytes().startswith(b"\x89PNG")
