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
