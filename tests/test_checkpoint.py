"""Conversion and loading: toolbox file layouts over the years, the legacy key rule, and every kind of bad file."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

import segtorch
from parity import relative_error, seeded_input, seeded_state_dict
from segtorch.checkpoint import CheckpointError

NAME = "pspnet_resnet50os8_voc"
X = (1, 3, 65, 49)


@pytest.fixture(scope="module")
def toolbox_state():
    """What the toolbox's state dict for NAME holds: the model with its auxiliary head and BN counters."""
    model = segtorch.create_model(NAME, auxiliary=True)
    state = seeded_state_dict(model.state_dict())
    assert any(k.startswith("auxiliary_decoder.") for k in state)
    assert any(k.endswith("num_batches_tracked") for k in state)
    return state


@pytest.fixture(scope="module")
def expected_output(toolbox_state):
    model = segtorch.create_model(NAME, auxiliary=True)
    model.load_state_dict(toolbox_state)
    with torch.no_grad():
        return model.eval()(seeded_input(X))


def outputs(seg):
    with torch.no_grad():
        return seg.model(seeded_input(X))


def save(path, obj):
    torch.save(obj, path)
    return path


def test_convert_toolbox_file(tmp_path, toolbox_state, expected_output):
    from safetensors import safe_open

    src = save(tmp_path / "m.pth", {"cur_epoch": 60, "cur_iter": 5, "model": toolbox_state,
                                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}})
    report = segtorch.convert(src, tmp_path / "m.safetensors", name=NAME)
    assert "2022" in report.era
    assert sum(n for rule, n in report.dropped.items() if "auxiliary" in rule) == 8
    assert any("num_batches_tracked" in rule for rule in report.dropped)
    assert not report.renamed
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert not any(k.startswith("auxiliary_decoder") for k in f.keys())
    assert meta["name"] == NAME and meta["segtorch_version"] == segtorch.__version__
    assert meta["source_sha256"] == segtorch.checkpoint.sha256_file(src)
    for ckpt in (src, tmp_path / "m.safetensors"):
        assert relative_error(outputs(segtorch.load(NAME, checkpoint=ckpt, fuse_bn=False)), expected_output) < 1e-6


@pytest.mark.parametrize("layout", ["epoch-era", "state_dict", "bare", "module-prefixed"])
def test_other_layouts(tmp_path, toolbox_state, expected_output, layout):
    state = dict(toolbox_state)
    obj = {"epoch-era": {"epoch": 10, "model": state, "optimizer": {}},
           "state_dict": {"state_dict": state, "meta": {"note": "from elsewhere"}},
           "bare": state,
           "module-prefixed": {"model": {f"module.{k}": v for k, v in state.items()}}}[layout]
    seg = segtorch.load(NAME, checkpoint=save(tmp_path / "m.pth", obj), fuse_bn=False)
    assert relative_error(outputs(seg), expected_output) < 1e-6


def test_legacy_fuse_layer_is_renamed(tmp_path, toolbox_state, expected_output):
    old = {k.replace("ppm_net.bottleneck.", "ppm_net.fuse_layer."): v for k, v in toolbox_state.items()}
    assert any(k.startswith("ppm_net.fuse_layer.") for k in old)
    src = save(tmp_path / "old.pth", {"epoch": 130, "model": old, "optimizer": {}})
    report = segtorch.convert(src, tmp_path / "old.safetensors", name=NAME)
    assert "2020" in report.era
    assert list(report.renamed.values()) == [6]  # conv weight + 5 BN tensors
    assert relative_error(outputs(segtorch.load(NAME, checkpoint=src, fuse_bn=False)), expected_output) < 1e-6


def test_upernet_without_fpn_convs_is_refused_by_name(tmp_path):
    model = segtorch.create_model("upernet_resnet50os8_voc")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fpn_convs.")}
    with pytest.raises(CheckpointError, match=r"missing keys: fpn_convs\.0\.0\.weight"):
        segtorch.convert(save(tmp_path / "u.pth", {"model": state}), tmp_path / "u.safetensors",
                         name="upernet_resnet50os8_voc")


def test_wrong_architecture_names_the_keys(tmp_path, toolbox_state):
    src = save(tmp_path / "voc.pth", {"model": toolbox_state})
    with pytest.raises(CheckpointError) as err:  # 21-class file into a 150-class model
        segtorch.convert(src, tmp_path / "x.safetensors", name="pspnet_resnet50os8_ade20k")
    assert "mis-shaped keys: decoder.1.bias (file (21,), model (150,))" in str(err.value)
    with pytest.raises(CheckpointError, match=r"35 missing keys: decoder\.0\.weight, .*fpn_convs\.0\.0\.weight"):
        segtorch.convert(src, tmp_path / "x.safetensors", name="upernet_resnet50os8_voc")
    assert list(tmp_path.iterdir()) == [src], "a refused conversion left files behind"


def test_bad_files(tmp_path, toolbox_state):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        segtorch.load(NAME, checkpoint=tmp_path / "missing.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        segtorch.load(NAME, checkpoint=tmp_path / "empty.pth")
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        segtorch.load(NAME, checkpoint=tmp_path / "notes.pth")
    full = save(tmp_path / "full.pth", {"model": toolbox_state}).read_bytes()
    (tmp_path / "cut.pth").write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        segtorch.load(NAME, checkpoint=tmp_path / "cut.pth")
    save(tmp_path / "list.pth", [1, 2, 3])
    with pytest.raises(CheckpointError, match="top level is list"):
        segtorch.load(NAME, checkpoint=tmp_path / "list.pth")
    save(tmp_path / "nothing.pth", {"model": {"lr": 0.1}})
    with pytest.raises(CheckpointError, match="no tensors"):
        segtorch.load(NAME, checkpoint=tmp_path / "nothing.pth")
    st = tmp_path / "cut.safetensors"
    segtorch.checkpoint.write_safetensors({"a": torch.zeros(1000)}, st, {"format": "pt"})
    st.write_bytes(st.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="damaged safetensors"):
        segtorch.load(NAME, checkpoint=st)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, src)
    with pytest.raises(CheckpointError, match="never runs code") as info:
        segtorch.convert(src, tmp_path / "evil.safetensors", name=NAME)
    assert not marker.exists()
    message = str(info.value)
    # one line naming the file and what it refers to; never PyTorch's advice to load it with weights_only=False
    assert "\n" not in message and str(src) in message and "posix.system" in message
    assert "weights_only" not in message and "Re-running" not in message and "will likely succeed" not in message
    with open(tmp_path / "raw.pth", "wb") as f:  # a bare pickle (pre-zip layout) too
        pickle.dump({"model": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError):
        segtorch.load(NAME, checkpoint=tmp_path / "raw.pth")
    assert not marker.exists()


def test_convert_refuses_to_overwrite_its_source(tmp_path, toolbox_state):
    src = save(tmp_path / "m.pth", {"model": toolbox_state})
    with pytest.raises(CheckpointError, match="destination is the source"):
        segtorch.convert(src, src, name=NAME)


def test_load_skips_random_initialisation(tmp_path, toolbox_state, monkeypatch):
    src = save(tmp_path / "m.pth", {"model": toolbox_state})
    calls = []
    original = torch.nn.Conv2d.reset_parameters

    def spy(self):
        if not self.weight.is_meta:
            calls.append(self)
        return original(self)

    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", spy)
    seg = segtorch.load(NAME, checkpoint=src)
    assert calls == [] and not any(p.is_meta for p in seg.model.parameters())


def test_load_without_weights_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("SEGTORCH_OFFLINE", "1")
    with pytest.raises(segtorch.OfflineError, match="offline mode is on"):
        segtorch.load(NAME)


def test_convert_to_a_folder_says_so(tmp_path, toolbox_state):
    src = save(tmp_path / "m.pth", {"model": toolbox_state})
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run([sys.executable, "-m", "segtorch.cli", "convert", str(src), str(out), "--name", NAME],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert str(out) in run.stderr and "is a folder" in run.stderr and ".tmp" not in run.stderr
    assert list(out.iterdir()) == []


def test_cli_convert(tmp_path, toolbox_state):
    src = save(tmp_path / "m.pth", {"cur_epoch": 1, "model": toolbox_state})
    run = lambda *a: subprocess.run([sys.executable, "-m", "segtorch.cli", *a], capture_output=True, text=True)
    ok = run("convert", str(src), str(tmp_path / "m.safetensors"), "--name", NAME)
    assert ok.returncode == 0, ok.stderr
    assert "dropped 8 keys" in ok.stdout and (tmp_path / "m.safetensors").exists()
    bad = run("convert", str(tmp_path / "nope.pth"), str(tmp_path / "o.safetensors"), "--name", NAME)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "nope.pth: no such checkpoint file" in bad.stderr
    wrong = run("convert", str(src), str(tmp_path / "o.safetensors"), "--name", "pspnet_resnet50os8_ade20k")
    assert wrong.returncode == 1 and "mis-shaped" in wrong.stderr and not (tmp_path / "o.safetensors").exists()
    unknown = run("convert", str(src), str(tmp_path / "o.safetensors"), "--name", "pspnet_resnet50_voc")
    assert unknown.returncode == 1 and "did you mean pspnet_resnet50os8_voc" in unknown.stderr
