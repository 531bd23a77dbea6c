"""``seg.model`` is the checkpoint's network; the fast path is the Segmenter's own; no process-wide state is left
changed (TF32 switches with threads, inductor's configuration, bf16 asked of torch)."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import segtorch
from parity import relative_error, seeded_state_dict
from segtorch.inference import precision as precision_mod

NAME = "demo_pspnet_shapes"  # a PSPNet on a ResNet: folded, split and channels-last by default


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_file(seeded_state_dict(segtorch.create_model(NAME).state_dict()), str(path))
    return path


def _batchnorms() -> int:
    return sum(issubclass(type(o), nn.BatchNorm2d) for o in gc.get_objects())


def test_seg_model_is_the_checkpoints_network(weights):
    before = _batchnorms()
    seg = segtorch.load(NAME, checkpoint=weights)
    # the network is not held beside the inference module until someone asks for it
    assert _batchnorms() == before
    assert not any(isinstance(m, nn.BatchNorm2d) for m in seg.inference_module.modules())
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    scores = seg.logits(x)
    model = seg.model
    assert model is seg.model and not model.training
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    fresh = segtorch.create_model(NAME)
    fresh.load_state_dict(model.state_dict(), strict=True)
    file = load_file(str(weights))
    assert set(file) <= set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in file.items())
    with torch.no_grad():
        assert relative_error(model(x), fresh(x)) < 1e-6
    # predict/logits keep running the fast path, unchanged by building the network
    assert torch.equal(seg.logits(x), scores)
    # a training step on seg.model works (trainable, BatchNorm in train mode)
    model.train()
    model(torch.cat([x, x.flip(3)])).sum().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_a_segmenter_leaves_the_model_it_is_given_unchanged(weights):
    model = segtorch.create_model(NAME)
    model.load_state_dict(load_file(str(weights)))
    before = {k: (v.clone(), v.data_ptr(), v.stride()) for k, v in model.state_dict().items()}
    seg = segtorch.Segmenter(model, segtorch.model_card(NAME))
    assert seg.fuse_bn and seg.channels_last and seg.model is model
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    seg.logits(x)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, (value, ptr, stride) in before.items():
        assert torch.equal(after[k], value) and after[k].data_ptr() == ptr and after[k].stride() == stride, k
    assert all(p.requires_grad for p in model.parameters())
    exact = segtorch.Segmenter(model, seg.card, exact=True)
    assert exact.inference_module is model  # exact mode runs the network itself


def test_a_segmenter_pickles_with_its_model_still_to_build(weights):
    import pickle

    seg = segtorch.load(NAME, checkpoint=weights)
    again = pickle.loads(pickle.dumps(seg))
    x = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again.logits(x), seg.logits(x))
    with torch.no_grad():
        assert torch.equal(again.model(x), seg.model(x))


def test_seg_model_refuses_a_weights_file_replaced_since_loading(tmp_path, weights):
    path = tmp_path / "w.safetensors"
    path.write_bytes(weights.read_bytes())
    seg = segtorch.load(NAME, checkpoint=path)
    state = load_file(str(path))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, str(path))
    with pytest.raises(segtorch.CheckpointError, match="replaced or changed since the model was loaded"):
        seg.model  # noqa: B018


def test_exact_mode_refuses_the_fast_path_options(weights):
    with pytest.raises(segtorch.UsageError, match="exact=True .* drop compile, channels_last"):
        segtorch.load(NAME, checkpoint=weights, exact=True, compile=True, channels_last=True)


# ---- process-wide state -------------------------------------------------------------------------------------
def _tf32() -> tuple:
    return tuple(getattr(owner, name) for owner, name, _ in precision_mod._tf32_switches())


@pytest.fixture
def user_tf32():
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in precision_mod._tf32_switches()]
    yield
    for owner, name, value in saved:
        setattr(owner, name, value)


def _set_tf32(on: bool) -> None:
    for owner, name, off in precision_mod._tf32_switches():
        setattr(owner, name, ("tf32" if on else "ieee") if isinstance(off, str) else on)


@pytest.mark.parametrize("user_setting", [True, False], ids=["user_tf32_on", "user_tf32_off"])
@pytest.mark.parametrize("order", ["first_in_first_out", "first_in_last_out"])
def test_two_threads_leave_the_users_tf32_settings(user_tf32, user_setting, order):
    """Two threads' CUDA blocks overlapping (the switches are Python-side: no GPU needed): one enters, the other
    enters, they leave in either order; inside, TF32 is off; afterwards the user's setting is back. Saving and
    restoring per block left TF32 off here when the user had it on."""
    _set_tf32(user_setting)
    users = _tf32()
    off = tuple(value for _, _, value in precision_mod._tf32_switches())
    inside, leave = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]
    seen = []

    def work(i: int) -> None:
        with precision_mod.toolbox_cuda_numerics("cuda"):
            inside[i].set()
            leave[i].wait(10)
            seen.append(_tf32())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    threads[0].start()
    assert inside[0].wait(10)
    threads[1].start()
    assert inside[1].wait(10)
    for i in ((0, 1) if order == "first_in_first_out" else (1, 0)):
        leave[i].set()
        threads[i].join(10)
    assert seen == [off, off]
    assert _tf32() == users


def test_a_setting_changed_during_a_block_is_kept(user_tf32):
    _set_tf32(False)
    with precision_mod.toolbox_cuda_numerics("cuda"):
        _set_tf32(True)  # the user's own change, while segtorch works (to a value other than segtorch's)
        users = _tf32()
    assert _tf32() == users


def test_two_threads_predicting_at_once_on_the_cpu_touch_nothing(user_tf32, weights):
    """The CPU never runs TF32: no switch is read or written, whatever other threads do."""
    seg = segtorch.load(NAME, checkpoint=weights)
    image = np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    for user_setting in (True, False):
        _set_tf32(user_setting)
        users = _tf32()
        results = [None, None]

        def work(i: int) -> None:
            results[i] = seg.predict(image)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert np.array_equal(results[0], results[1])
        assert _tf32() == users


@pytest.mark.slow  # a minute of compiling on two cores
def test_compile_leaves_inductors_configuration_as_found(weights):
    import torch._inductor.config as inductor_config

    before = inductor_config.get_config_copy()
    seg = segtorch.Segmenter(nn.Conv2d(3, 6, 3, padding=1).eval(), segtorch.model_card(NAME), compile=True,
                             fuse_bn=False, channels_last=False)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = seg.model(x)
    torch.testing.assert_close(seg.logits(x), expected, rtol=1e-5, atol=1e-5)
    assert inductor_config.get_config_copy() == before
    assert not inductor_config.freezing


@pytest.mark.parametrize("onednn, x86, native, fast", [
    (True, False, False, True),   # Arm with the BF16 extension, as torch's oneDNN reports it
    (False, False, False, False),  # Arm without it, or Apple's M1
    (True, True, False, False),  # x86 AVX-512 without AVX512-BF16/AMX: oneDNN emulates bf16
    (True, True, True, True),
    (False, True, True, False),  # a torch without oneDNN's bf16 kernels
])
def test_cpu_bf16_is_asked_of_torch(monkeypatch, onednn, x86, native, fast):
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset())  # /proc/cpuinfo plays no part
    monkeypatch.setattr(precision_mod, "_onednn_bf16", lambda: onednn)
    monkeypatch.setattr(precision_mod, "_is_x86", lambda: x86)
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: native)
    assert precision_mod.cpu_supports_bf16() is fast
    assert precision_mod.reduced_precisions("cpu") == (("bf16",) if fast else ())
    if not fast:
        with pytest.raises(segtorch.UsageError, match="needs native bfloat16 arithmetic"):
            precision_mod.check_precision("cpu", "bf16")


def test_cpu_bf16_probe_runs_on_this_torch():
    assert precision_mod.cpu_supports_bf16() in (True, False)
    assert isinstance(precision_mod._onednn_bf16(), bool)
