"""The weights policy (segtorch.weights) against a loopback server: first use under concurrency, mirrors, no
network, files that are not checkpoints, and what `info` says. Nothing here leaves 127.0.0.1."""
from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from httpserver import FileServer  # noqa: E402
from parity import seeded_state_dict  # noqa: E402

import segtorch  # noqa: E402
from segtorch import downloads, weights  # noqa: E402
from segtorch.errors import DownloadError, OfflineError, UsageError  # noqa: E402
from segtorch.files import sha256_file  # noqa: E402
from segtorch.registry import HF_ORG_ENV  # noqa: E402

DEMO = "demo_pspnet_shapes"  # 2M parameters: a real architecture that converts in well under a second
RELEASE = "/releases/ssseg_demo/demo_release.pth"


@pytest.fixture(scope="module")
def release_bytes() -> bytes:
    """A toolbox-style release file for the demo architecture (auxiliary head and BN counters included)."""
    state = seeded_state_dict(segtorch.create_model(DEMO, auxiliary=True).state_dict())
    buf = io.BytesIO()
    torch.save({"cur_epoch": 1, "model": state, "optimizer": {}}, buf)
    return buf.getvalue()


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    """A private, online SEGTORCH_HOME with fast retries and no proxy between us and 127.0.0.1."""
    monkeypatch.setenv("SEGTORCH_HOME", str(tmp_path / "home"))
    for var in ("SEGTORCH_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN",
                "SEGTORCH_RELEASE_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(downloads.fetch, "_BACKOFF_BASE", 0.01)
    return tmp_path / "home"


@pytest.fixture
def server(release_bytes):
    with FileServer({RELEASE: release_bytes}) as srv:
        yield srv


def closed_url(path: str = "") -> str:
    """A loopback URL nobody listens on (connection refused)."""
    with FileServer() as srv:
        return srv.url(path)


def release_card(url: str, name: str = "demo_release", hub: dict | None = None) -> segtorch.ModelCard:
    """The demo architecture as if it were a zoo model published at ``url`` (no shipped weights)."""
    return dataclasses.replace(segtorch.model_card(DEMO), name=name, url=url, sha256=None, hub=hub, weights=None,
                               demo=False)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------- first use


def _load_in_child(card, home: str, log: str, barrier, results) -> None:
    os.environ["SEGTORCH_HOME"] = home
    try:
        from segtorch import weights as child_weights

        real = child_weights.convert_checkpoint

        def counted(*args, **kwargs):  # one line per conversion, from any process
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
            return real(*args, **kwargs)

        child_weights.convert_checkpoint = counted
        barrier.wait(timeout=60)
        path = child_weights.fetch_weights(card)
        results.put((str(path), sha256_file(path)))
    except BaseException as exc:  # report instead of leaving the parent waiting
        results.put(("error", repr(exc)))
        raise


@pytest.mark.slow  # four fresh interpreters import torch: ~25 s on two cores
def test_four_processes_load_one_uncached_model(env, server, tmp_path):
    card = release_card(server.url(RELEASE + "?slow=0.005"))  # ~0.3 s of transfer: the four overlap
    ctx = multiprocessing.get_context("spawn")
    barrier, results, log = ctx.Barrier(4), ctx.Queue(), tmp_path / "conversions.log"
    procs = [ctx.Process(target=_load_in_child, args=(card, str(env), str(log), barrier, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert all(proc.exitcode == 0 for proc in procs), got
    path = env / "converted" / "demo_release.safetensors"
    assert got == [(str(path), sha256_file(path))] * 4
    assert len(server.gets(RELEASE, full=True)) == 1, "downloaded more than once"
    assert len(log.read_text().split()) == 1, "converted more than once"
    # one integrity scheme (sha256 sidecars), no lock files or temporaries left behind
    pth = downloads.cache_name(card.url)
    assert all_files(env) == ["checkpoints/" + pth, f"checkpoints/{pth}.sha256",
                              "converted/demo_release.safetensors", "converted/demo_release.safetensors.sha256"]
    seg = segtorch.load(DEMO, checkpoint=path)  # the converted file is the demo architecture's
    assert seg.card.name == DEMO


def test_damaged_converted_file_is_made_again_from_the_cache(env, server):
    card = release_card(server.url(RELEASE))
    from safetensors.torch import load_file

    path = weights.fetch_weights(card)
    good = {k: v.clone() for k, v in load_file(path).items()}  # not mapped: the file is cut below
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    again = load_file(weights.fetch_weights(card))
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    assert len(server.gets(RELEASE)) == 1  # converted again from the cached release file


# ------------------------------------------------------------------------------------------------- bad files


def test_a_web_page_is_never_kept(env, server, release_bytes):
    server.files[RELEASE] = b"<!DOCTYPE html><html><body>Sign in</body></html>\n"
    card = release_card(server.url(RELEASE))
    with pytest.raises(DownloadError) as info:
        weights.fetch_weights(card)
    message = str(info.value)
    assert "not a checkpoint" in message and "discarded" in message and "\n" not in message
    assert not (env / "checkpoints").exists() or all_files(env / "checkpoints") == []
    server.files[RELEASE] = release_bytes  # the next run fetches again
    assert weights.fetch_weights(card).is_file()
    assert len(server.gets(RELEASE)) == 2


def test_a_checkpoint_of_another_model_is_not_kept(env, server, release_bytes):
    other = io.BytesIO()
    torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, other)
    server.files[RELEASE] = other.getvalue()
    card = release_card(server.url(RELEASE))
    with pytest.raises(DownloadError, match="does not match the architecture.*discarded"):
        weights.fetch_weights(card)
    assert all_files(env / "checkpoints") == []
    server.files[RELEASE] = release_bytes
    assert weights.fetch_weights(card).is_file() and len(server.gets(RELEASE)) == 2


def test_checkpoint_url_web_page_is_not_pinned(env, server, release_bytes):
    # `--checkpoint URL` / load(checkpoint=URL): a page served once is not cached (and so not pinned forever).
    url = server.url(RELEASE)
    server.files[RELEASE] = b"<html>moved</html>"
    with pytest.raises(DownloadError, match="not a checkpoint.*discarded"):
        segtorch.load(DEMO, checkpoint=url)
    server.files[RELEASE] = release_bytes
    assert segtorch.load(DEMO, checkpoint=url).card.name == DEMO
    assert len(server.gets(RELEASE)) == 2


def test_checkpoint_urls_with_one_file_name_are_kept_apart(env, release_bytes):
    # the same file name under two URLs: the second must not be answered with the first one's cached weights
    state = seeded_state_dict(segtorch.create_model(DEMO).state_dict())
    buf = io.BytesIO()
    torch.save({"model": {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}}, buf)
    with FileServer({"/a/model.pth": release_bytes, "/b/model.pth": buf.getvalue()}) as srv:
        a = segtorch.load(DEMO, checkpoint=srv.url("/a/model.pth"), fuse_bn=False).model.state_dict()
        b = segtorch.load(DEMO, checkpoint=srv.url("/b/model.pth"), fuse_bn=False).model.state_dict()
        assert len(srv.gets("/b/model.pth")) == 1
    assert all(torch.equal(b[k], a[k] + 1) for k in b if b[k].is_floating_point() and k in state)


# ------------------------------------------------------------------------------------------------- mirrors


def test_release_mirror_replaces_the_github_prefix(env, server, monkeypatch):
    card = release_card(weights.RELEASE_PREFIX + "ssseg_demo/demo_release.pth")
    monkeypatch.setenv("SEGTORCH_RELEASE_MIRROR", server.url("/releases"))
    assert weights.release_url(card) == server.url(RELEASE)
    assert weights.fetch_weights(card).is_file()
    assert len(server.gets(RELEASE)) == 1
    monkeypatch.setenv("SEGTORCH_RELEASE_MIRROR", "ftp.example/x")
    with pytest.raises(UsageError, match="SEGTORCH_RELEASE_MIRROR"):
        weights.release_url(card)


def test_every_zoo_url_is_under_the_release_prefix():
    # otherwise SEGTORCH_RELEASE_MIRROR would silently leave some models on GitHub
    cards = [segtorch.model_card(n) for n in segtorch.list_models()]
    assert all(c.url.startswith(weights.RELEASE_PREFIX) for c in cards if not c.demo)


class ConnectionCounter:
    """A loopback listener standing in for the internet: set as the HTTP(S) proxy, every connection that would
    leave the machine (a Hugging Face request, or the reachability probe before it) arrives here, is counted and
    refused."""

    def __init__(self) -> None:
        import socket
        import threading

        self.count = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.count += 1
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.fixture
def internet(monkeypatch):
    """Whatever is not 127.0.0.1 goes through a counting proxy that refuses it."""
    counter = ConnectionCounter()
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, counter.url)
    monkeypatch.delenv(HF_ORG_ENV, raising=False)
    yield counter
    counter.sock.close()


UNPINNED_HUB = {"repo": "segtorch/demo_release", "file": "model.safetensors"}


def test_an_unpinned_mirror_is_never_asked(env, server, internet):
    """The card names a Hugging Face repo but pins no sha256, and the user configured no mirror: whoever
    registers that repo must not be able to serve weights, so the first load goes straight to the release."""
    card = release_card(server.url(RELEASE), hub=UNPINNED_HUB)
    assert weights.fetch_weights(card).is_file()
    assert internet.count == 0, "a request went to the default Hugging Face endpoint"
    assert len(server.gets(RELEASE, full=True)) == 1
    assert "not asked" in weights.describe(card)["hf mirror"]


@pytest.mark.parametrize("trust", ["pinned", "org"])
def test_a_pinned_or_chosen_mirror_is_asked(env, server, internet, monkeypatch, trust):
    hub = {**UNPINNED_HUB, "sha256": "0" * 64} if trust == "pinned" else UNPINNED_HUB
    if trust == "org":
        monkeypatch.setenv(HF_ORG_ENV, "my-org")
    card = release_card(server.url(RELEASE), hub=hub)
    assert weights.fetch_weights(card).is_file()  # the mirror refuses (the proxy): the release serves
    assert internet.count > 0
    assert "asked first" in weights.describe(card)["hf mirror"]


def test_a_mirror_set_by_hf_endpoint_is_asked_for_unpinned_files(env, server, release_bytes, monkeypatch):
    """HF_ENDPOINT is the user's own mirror: its file is taken (and the release never asked)."""
    from segtorch.checkpoint import convert_checkpoint

    pth, converted = env.parent / "release.pth", env.parent / "model.safetensors"
    pth.write_bytes(release_bytes)
    convert_checkpoint(pth, converted, release_card(server.url(RELEASE)))
    server.files["/segtorch/demo_release/resolve/main/model.safetensors"] = converted.read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    card = release_card(server.url(RELEASE), hub=UNPINNED_HUB)
    assert weights.fetch_weights(card).read_bytes() == converted.read_bytes()
    assert server.gets(RELEASE) == []


# ------------------------------------------------------------------------------------------------- no network


def test_no_network_fails_fast_naming_what_was_tried(env, monkeypatch, caplog, capfd):
    monkeypatch.setenv("HF_ENDPOINT", closed_url())
    card = release_card(closed_url(RELEASE), hub={"repo": "segtorch/demo_release", "file": "model.safetensors"})
    start = time.perf_counter()
    with pytest.raises(DownloadError) as info:
        weights.fetch_weights(card)
    took = time.perf_counter() - start
    message = str(info.value)
    assert took < 5, f"took {took:.1f}s"
    assert "\n" not in message and "Hugging Face mirror" in message and "release file" in message
    assert card.url in message and "segtorch/demo_release" in message
    assert "SEGTORCH_OFFLINE" in message and "SEGTORCH_RELEASE_MIRROR" in message and "HF_ENDPOINT" in message
    assert "Retrying" not in caplog.text + "".join(capfd.readouterr())


def test_cli_download_without_network_is_one_line_and_fast(tmp_path):
    env = {**os.environ, "SEGTORCH_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": closed_url(), "SEGTORCH_RELEASE_MIRROR": closed_url("/"), "NO_PROXY": "127.0.0.1",
           "no_proxy": "127.0.0.1"}
    for var in ("SEGTORCH_OFFLINE", "HF_HUB_OFFLINE"):
        env.pop(var, None)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "segtorch.cli", "download", "pspnet_resnet50os8_voc"], env=env,
                         capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - start
    assert run.returncode == 1 and took < 15, (took, run.stderr)
    assert run.stderr.count("\n") == 1, run.stderr
    assert "refused" in run.stderr and "Hugging Face mirror" in run.stderr
    assert all_files(tmp_path / "home") == []  # no lock file left either


def test_offline_names_the_variable(env, monkeypatch):
    monkeypatch.setenv("SEGTORCH_OFFLINE", "1")
    card = release_card(closed_url(RELEASE), hub={"repo": "segtorch/demo_release", "file": "model.safetensors"})
    with pytest.raises(OfflineError, match="offline mode is on \\(SEGTORCH_OFFLINE\\)"):
        weights.fetch_weights(card)


def test_segtorch_home_naming_a_file(tmp_path, monkeypatch):
    home = tmp_path / "notafolder"
    home.write_text("x")
    monkeypatch.setenv("SEGTORCH_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", closed_url())
    start = time.perf_counter()
    with pytest.raises(UsageError) as info:
        weights.fetch_weights(segtorch.model_card("pspnet_resnet50os8_voc"))
    assert time.perf_counter() - start < 2
    message = str(info.value)
    assert message.startswith("SEGTORCH_HOME") and str(home) in message and "\n" not in message


# ------------------------------------------------------------------------------------------------- info


def test_info_of_shipped_weights():
    card = segtorch.model_card(DEMO)
    described = weights.describe(card)
    shipped = weights.fetch_weights(card)
    assert str(shipped) in described["weights"] and sha256_file(shipped) in described["sha256"]
    run = subprocess.run([sys.executable, "-m", "segtorch.cli", "info", DEMO], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines())
    assert str(shipped) in lines["weights"] and sha256_file(shipped) in lines["sha256"]
    assert "trusted on first use" not in run.stdout


def test_checkpoint_url_that_fails_loading_is_not_kept(env, server, release_bytes):
    # issue 14.2: a URL that served a whole, well-formed file that is not this model's checkpoint (here another
    # architecture's weights) is refused, and the cached copy is removed, so that the next run fetches again
    other = io.BytesIO()
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, other)
    path = "/files/model.pth"
    server.files[path] = other.getvalue()
    url = server.url(path)
    with pytest.raises(segtorch.CheckpointError, match="removed from the cache"):
        segtorch.load(DEMO, checkpoint=url)
    assert list((env / "checkpoints").glob("model*.pth")) == []
    server.files[path] = release_bytes  # the server now has the right file: it is fetched, not served stale
    seg = segtorch.load(DEMO, checkpoint=url)
    assert seg.card.name == DEMO and len(server.gets(path, full=True)) == 2


# ------------------------------------------------------------------------------------------------- checkpoint=


@pytest.mark.parametrize("url,hint", [("ftp://example.org/m.pth", "download the file yourself"),
                                      ("s3://bucket/m.pth", "download the file yourself"),
                                      ("file:///data/m.pth", "pass the file's path (/data/m.pth)")])
def test_checkpoint_urls_of_other_kinds_are_named(url, hint):
    with pytest.raises(UsageError) as info:
        segtorch.load(DEMO, checkpoint=url)
    message = str(info.value)
    assert url in message and "only http:// and https://" in message and hint in message and "\n" not in message


def test_checkpoint_folder_is_named_with_the_files_in_it(tmp_path):
    with pytest.raises(UsageError, match=f"{tmp_path} is a folder.*no .safetensors, .pth or .onnx file"):
        segtorch.load(DEMO, checkpoint=tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="is a folder, not a weights file.*it holds model.safetensors$"):
        segtorch.load(DEMO, checkpoint=str(tmp_path))
