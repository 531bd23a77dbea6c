"""Tests for segtorch.downloads against a loopback HTTP server (nothing here leaves 127.0.0.1)."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from httpserver import FileServer  # noqa: E402

from segtorch import downloads  # noqa: E402
from segtorch.files import sha256_file  # noqa: E402
from segtorch.errors import ChecksumError, DownloadError, OfflineError, UsageError  # noqa: E402

DATA = random.Random(0).randbytes(300 * 1024)
DATA_SHA = hashlib.sha256(DATA).hexdigest()
OTHER = random.Random(1).randbytes(50 * 1024)


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail any attempt to open a network connection beyond the loopback interface."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise AssertionError(f"test tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private SEGTORCH_HOME, online, with fast retries and no proxy between us and 127.0.0.1."""
    monkeypatch.setenv("SEGTORCH_HOME", str(tmp_path / "home"))
    for var in ("SEGTORCH_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(downloads.fetch, "_BACKOFF_BASE", 0.01)
    return tmp_path / "home" / "checkpoints"


@pytest.fixture
def server():
    with FileServer({"/w.pth": DATA, "/other.bin": OTHER}) as srv:
        yield srv


def leftovers(folder: Path) -> list[str]:
    """Every file in the cache folder (lock files exist only while held, so none is expected here)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def kept(url: str, filename: str | None = None) -> list[str]:
    """The cached file of ``url`` and its sidecar, as ``leftovers`` lists them."""
    name = downloads.cache_name(url, filename)
    return [name, name + ".sha256"]


# ------------------------------------------------------------------------------------------------- basics


def test_home_and_offline_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTORCH_HOME", str(tmp_path / "h"))
    assert downloads.home() == tmp_path / "h" and (tmp_path / "h").is_dir()
    monkeypatch.delenv("SEGTORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert downloads.home() == tmp_path / "xdg" / "segtorch"
    for var in ("SEGTORCH_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv("SEGTORCH_OFFLINE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        assert not downloads.is_offline()
        for value in ("1", "true", "YES", "on"):
            monkeypatch.setenv(var, value)
            assert downloads.is_offline()
        for value in ("0", "false", "", "off"):
            monkeypatch.setenv(var, value)
            assert not downloads.is_offline()


def test_home_that_is_a_file_is_named(tmp_path, monkeypatch, server):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SEGTORCH_HOME", str(tmp_path / "file"))
    with pytest.raises(UsageError) as info:
        downloads.download(server.url("/w.pth"), progress=False)
    message = str(info.value)
    assert "SEGTORCH_HOME" in message and str(tmp_path / "file") in message and "\n" not in message
    assert server.requests == []


def test_import_is_light():
    # Importing the download layer (and segtorch itself) in a fresh process pulls in none of the heavy packages.
    code = ("import sys, segtorch.downloads; "
            "heavy = {'requests', 'urllib3', 'tqdm', 'filelock', 'huggingface_hub', 'torch'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_download_then_cache_hit_without_network(cache, server):
    path = downloads.download(server.url("/w.pth"), progress=True)
    assert path == cache / kept(server.url("/w.pth"))[0] and path.read_bytes() == DATA
    assert path.name.startswith("w.") and path.suffix == ".pth"  # readable, and keyed by the URL
    assert path.with_name(path.name + ".sha256").read_text().split()[:2] == [DATA_SHA, path.name]
    assert leftovers(cache) == kept(server.url("/w.pth"))
    assert len(server.gets("/w.pth")) == 1

    # Same with the expected hash given, then with the server gone: both answered from the cache.
    assert downloads.download(server.url("/w.pth"), DATA_SHA) == path
    url = server.url("/w.pth")
    server.stop()
    assert downloads.download(url, progress=False) == path
    assert len(server.gets("/w.pth")) == 1


def test_filename_overrides_url_basename(cache, server):
    path = downloads.download(server.url("/w.pth?x=1"), filename="renamed.pth", progress=False)
    assert path == cache / kept(server.url("/w.pth?x=1"), "renamed.pth")[0] and path.read_bytes() == DATA
    assert path.name.startswith("renamed.")


# ------------------------------------------------------------------------------------------------- faults


def test_resume_after_cut(cache, server):
    path = downloads.download(server.url("/w.pth?cut=100000"), DATA_SHA, progress=False)
    assert path.read_bytes() == DATA
    gets = server.gets("/w.pth")
    assert len(gets) == 2
    assert gets[0]["range"] is None and gets[1]["range"] == "bytes=100000-"
    assert leftovers(cache) == kept(server.url("/w.pth?cut=100000"))


def test_restart_when_server_ignores_range(cache, server):
    # The server answers the Range request with 200 and the whole file: the .part must be rewritten, not appended.
    path = downloads.download(server.url("/w.pth?cut=100000&norange=1"), progress=False)
    assert path.read_bytes() == DATA
    gets = server.gets("/w.pth")
    assert len(gets) == 2 and gets[1]["range"] == "bytes=100000-"
    assert (cache / kept(server.url("/w.pth?cut=100000&norange=1"))[1]).read_text().split()[0] == DATA_SHA


def test_partial_kept_only_when_resumable(cache, server):
    # With a pinned hash the .part survives a failed call and the next call resumes it.
    with pytest.raises(DownloadError, match="connection cut"):
        downloads.download(server.url("/w.pth?cut=100000"), DATA_SHA, retries=0, progress=False)
    assert (cache / (kept(server.url("/w.pth?cut=100000"))[0] + ".part")).stat().st_size == 100000
    assert downloads.download(server.url("/w.pth?cut=100000"), DATA_SHA, progress=False).read_bytes() == DATA
    assert [g["range"] for g in server.gets("/w.pth")] == [None, "bytes=100000-"]
    # Without one, a stale prefix could be trusted later, so it is dropped.
    with pytest.raises(DownloadError):
        downloads.download(server.url("/other.bin?cut=1000"), retries=0, progress=False)
    assert leftovers(cache) == kept(server.url("/w.pth?cut=100000"))


def test_stale_partial_is_discarded(cache, server):
    cache.mkdir(parents=True)
    url = server.url("/w.pth")
    (cache / (kept(url)[0] + ".part")).write_bytes(b"x" * 5000)  # left by some older run, wrong bytes
    assert downloads.download(server.url("/w.pth"), DATA_SHA, progress=False).read_bytes() == DATA
    assert [g["range"] for g in server.gets("/w.pth")] == ["bytes=5000-", None]
    # longer than the file: the server answers 416
    (cache / (kept(url, "big.pth")[0] + ".part")).write_bytes(DATA + b"tail")
    path = downloads.download(server.url("/w.pth"), DATA_SHA, filename="big.pth", progress=False)
    assert path.read_bytes() == DATA
    assert [g["range"] for g in server.gets("/w.pth")][2:] == [f"bytes={len(DATA) + 4}-", None]
    assert leftovers(cache) == sorted(kept(url, "big.pth") + kept(url))


def test_checksum_mismatch_leaves_nothing(cache, server):
    url = server.url("/w.pth?corrupt=1")
    with pytest.raises(ChecksumError) as info:
        downloads.download(url, DATA_SHA, progress=False)
    message = str(info.value)
    assert "\n" not in message and url in message and DATA_SHA in message
    assert leftovers(cache) == []


def test_trust_on_first_use_detects_edited_file(cache, server):
    path = downloads.download(server.url("/w.pth"), progress=False)
    # Edit one byte in place, keeping the size: the mtime moves, so the file is hashed again and found out.
    # (A cached file whose size and mtime match its sidecar is not re-hashed: that is what keeps a cached
    # gigabyte model from being read twice per load.)
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(1234)
        f.write(bytes([DATA[1234] ^ 1]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))

    again = downloads.download(server.url("/w.pth"), progress=False)
    assert again == path and again.read_bytes() == DATA
    assert len(server.gets("/w.pth", full=True)) == 2


def test_truncated_cached_file_is_fetched_again(cache, server):
    path = downloads.download(server.url("/w.pth"), DATA_SHA, progress=False)
    path.write_bytes(DATA[:1000])
    assert downloads.download(server.url("/w.pth"), DATA_SHA, progress=False).read_bytes() == DATA
    # Also without an expected hash (the sidecar catches it).
    path.write_bytes(DATA[:1000])
    assert downloads.download(server.url("/w.pth"), progress=False).read_bytes() == DATA
    assert len(server.gets("/w.pth", full=True)) == 3


def test_cached_file_with_other_hash_is_replaced(cache, server):
    # A file already cached under the name but with content that does not match the pinned hash.
    downloads.download(server.url("/other.bin"), filename="w.pth", progress=False)
    path = downloads.download(server.url("/w.pth"), DATA_SHA, progress=False)
    assert path.read_bytes() == DATA


def test_validate_hook_rejects(cache, server):
    def not_a_zip(path: Path) -> None:
        if path.read_bytes()[:2] != b"PK":
            raise ValueError("not a zip archive")

    url = server.url("/w.pth")
    with pytest.raises(DownloadError, match="not a zip archive") as info:
        downloads.download(url, progress=False, validate=not_a_zip)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert leftovers(cache) == []


def test_404_is_one_line_and_not_retried(cache, server):
    url = server.url("/missing.pth")
    with pytest.raises(DownloadError) as info:
        downloads.download(url, progress=False)
    message = str(info.value)
    assert "\n" not in message and url in message and "404" in message
    assert len(server.gets("/missing.pth")) == 1
    assert leftovers(cache) == []


@pytest.mark.parametrize("code", [500, 429])
def test_retry_on_transient_status(cache, server, code):
    path = downloads.download(server.url(f"/w.pth?error={code}"), DATA_SHA, progress=False)
    assert path.read_bytes() == DATA
    assert len(server.gets("/w.pth")) == 2


def test_connection_refused_gives_up_with_one_line(cache):
    with FileServer() as srv:
        url = srv.url("/w.pth")  # the port is closed once the server stops
    with pytest.raises(DownloadError) as info:
        downloads.download(url, retries=1, progress=False)
    message = str(info.value)
    assert "\n" not in message and url in message and "refused" in message.lower()


def test_unreachable_host_is_not_retried(cache, monkeypatch):
    # Name resolution failing or a refused connection will not get better in a few seconds: no backoff.
    monkeypatch.setattr(downloads.fetch, "_BACKOFF_BASE", 5.0)
    real = socket.getaddrinfo

    def no_dns(host, *args, **kwargs):
        if host == "models.example.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with FileServer() as srv:
        refused = srv.url("/w.pth")
    for url in ("http://models.example.invalid/w.pth", refused):
        start = time.perf_counter()
        with pytest.raises(DownloadError) as info:
            downloads.download(url, retries=3, progress=False)
        assert time.perf_counter() - start < 2, url
        assert url in str(info.value) and "\n" not in str(info.value)
        assert downloads.unreachable(url) is not None
    assert downloads.unreachable(refused.replace("w.pth", "")) is not None


def test_same_file_name_under_two_urls(cache, server):
    server.files["/a/model.pth"], server.files["/b/model.pth"] = DATA, OTHER
    a = downloads.download(server.url("/a/model.pth"), progress=False)
    b = downloads.download(server.url("/b/model.pth"), progress=False)
    assert a != b and a.read_bytes() == DATA and b.read_bytes() == OTHER
    assert a.name.startswith("model.") and b.name.startswith("model.")


def test_cached_file_that_fails_validation_is_fetched_again(cache, server):
    # A file cached (and its hash recorded) without the check, e.g. by an older segtorch: not trusted any more.
    def starts_with_data(path: Path) -> None:
        if path.read_bytes()[:16] != DATA[:16]:
            raise ValueError("not the file")

    url = server.url("/w.pth")
    server.files["/w.pth"] = b"<html>a login page</html>"
    downloads.download(url, progress=False)
    server.files["/w.pth"] = DATA
    assert downloads.download(url, progress=False, validate=starts_with_data).read_bytes() == DATA
    assert len(server.gets("/w.pth")) == 2


def test_lock_serialises_and_leaves_nothing(tmp_path):
    lock = tmp_path / "x.lock"
    order = []

    def worker(tag):
        with downloads.cache_lock(lock):
            order.append((tag, "in"))
            time.sleep(0.05)
            order.append((tag, "out"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [step for _, step in order] == ["in", "out"] * 4  # never two inside at once
    assert list(tmp_path.iterdir()) == []


def test_slow_server_within_timeout(cache, server):
    path = downloads.download(server.url("/other.bin?slow=0.01"), progress=False, timeout=5)
    assert path.read_bytes() == OTHER


# ------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../evil.pth", "a/b.pth", "a\\b.pth", "..", ".", "", "x\x00y", "w.pth.part",
                                  ".hidden"])
def test_unsafe_filenames_refused(cache, server, name):
    with pytest.raises(ValueError):
        downloads.download(server.url("/w.pth"), filename=name, progress=False)
    assert server.requests == []
    assert leftovers(cache.parent.parent) == []  # nothing written next to the cache root either


@pytest.mark.parametrize("path", ["/dir/", "/%2e%2e", "/a%2Fb.pth", "/a%5Cb.pth"])
def test_unsafe_url_basenames_refused(cache, server, path):
    with pytest.raises(ValueError):
        downloads.download(server.url(path), progress=False)
    assert server.requests == []


def test_non_http_url_refused(cache):
    with pytest.raises(DownloadError, match="http"):
        downloads.download("file:///etc/passwd", progress=False)


# ------------------------------------------------------------------------------------------------- offline


def test_offline_serves_cache_and_refuses_the_rest(cache, server, monkeypatch):
    downloads.download(server.url("/w.pth"), progress=False)
    before = len(server.requests)

    monkeypatch.setenv("SEGTORCH_OFFLINE", "1")
    assert downloads.download(server.url("/w.pth"), progress=False).read_bytes() == DATA
    assert downloads.download(server.url("/w.pth"), DATA_SHA, progress=False).read_bytes() == DATA
    with pytest.raises(OfflineError) as info:
        downloads.download(server.url("/other.bin"), progress=False)
    message = str(info.value)
    assert "offline" in message and "SEGTORCH_OFFLINE" in message and "other.bin" in message
    assert "\n" not in message

    monkeypatch.delenv("SEGTORCH_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE"):
        downloads.download(server.url("/other.bin"), progress=False)
    assert len(server.requests) == before


def test_offline_damaged_cache_is_not_returned(cache, server, monkeypatch):
    path = downloads.download(server.url("/w.pth"), progress=False)
    path.write_bytes(DATA[:10])
    monkeypatch.setenv("SEGTORCH_OFFLINE", "yes")
    with pytest.raises(OfflineError):
        downloads.download(server.url("/w.pth"), progress=False)
    assert not path.exists()


# ------------------------------------------------------------------------------------------------- processes


def _fetch_in_child(url: str, barrier, results) -> None:
    from segtorch import downloads as child
    from segtorch.files import sha256_file

    try:
        barrier.wait(timeout=30)
        path = child.download(url, progress=False)
        results.put((str(path), sha256_file(path)))
    except BaseException as exc:  # report instead of leaving the parent waiting
        results.put(("error", repr(exc)))
        raise


def test_three_processes_download_once(cache, server):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    url = server.url("/w.pth?slow=0.02")  # ~0.4 s of transfer, so the three overlap
    procs = [ctx.Process(target=_fetch_in_child, args=(url, barrier, results)) for _ in range(3)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert got == [(str(cache / kept(url)[0]), DATA_SHA)] * 3
    assert (cache / kept(url)[0]).read_bytes() == DATA
    assert len(server.gets("/w.pth", full=True)) == 1
    assert leftovers(cache) == kept(url)  # and no lock file


# ------------------------------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_mirror(cache, server, monkeypatch):
    """The loopback server as an HF_ENDPOINT mirror serving org/repo."""
    pytest.importorskip("huggingface_hub")
    server.files["/org/repo/resolve/main/w.safetensors"] = DATA
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return server


def test_hf_download_through_mirror_then_offline(hf_mirror, monkeypatch, tmp_path):
    path = downloads.hf_download("org/repo", "w.safetensors", sha256=DATA_SHA)
    assert path.read_bytes() == DATA and str(path).startswith(str(tmp_path / "hf"))
    assert hf_mirror.gets("/org/repo/resolve/main/w.safetensors")

    before = len(hf_mirror.requests)
    monkeypatch.setenv("SEGTORCH_OFFLINE", "1")
    assert downloads.hf_download("org/repo", "w.safetensors", revision="main").read_bytes() == DATA
    with pytest.raises(OfflineError, match="SEGTORCH_OFFLINE"):
        downloads.hf_download("org/repo", "absent.safetensors")
    assert len(hf_mirror.requests) == before


def test_hf_unreachable_mirror_fails_fast_and_quietly(cache, monkeypatch, caplog, capfd):
    pytest.importorskip("huggingface_hub")
    with FileServer() as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url(""))  # closed once the block ends
    start = time.perf_counter()
    with pytest.raises(DownloadError) as info:
        downloads.hf_download("org/repo", "w.safetensors")
    assert time.perf_counter() - start < 3
    assert "org/repo/w.safetensors" in str(info.value) and "\n" not in str(info.value)
    assert "Retrying" not in caplog.text + "".join(capfd.readouterr())


def test_hf_download_errors(hf_mirror):
    with pytest.raises(DownloadError) as info:
        downloads.hf_download("org/repo", "absent.safetensors")
    assert "org/repo/absent.safetensors" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ChecksumError):
        downloads.hf_download("org/repo", "w.safetensors", sha256="0" * 64)


@pytest.mark.parametrize("low, high", [("segtorch.downloads.cache", "segtorch.downloads.fetch"),
                                       ("segtorch.downloads.fetch", "segtorch.downloads.huggingface"),
                                       ("segtorch.downloads.cache", "segtorch.downloads")])
def test_download_layers_depend_one_way(low, high):
    """The cache knows nothing of HTTP, the HTTP fetch nothing of the Hub wrapper (imports in functions count)."""
    from test_layers import import_graph

    graph = import_graph()
    seen, todo = set(), [low]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert high not in seen, f"{low} reaches {high}"
