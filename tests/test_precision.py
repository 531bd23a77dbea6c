"""Precision and devices: autocast, devices a machine lacks, CUDA numerics switches, CPU kinds and bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import segtorch
from segtorch.inference import autocast_context, fold_batchnorm
from segtorch.inference import precision as precision_mod


def test_autocast_context(monkeypatch):
    with autocast_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast_context("cpu", "int8")
    with pytest.raises(segtorch.UsageError, match="only offered on CUDA"):  # one line in the CLI
        autocast_context("cpu", "fp16")
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: False)  # an x86 CPU without AVX512-BF16/AMX
    with pytest.raises(segtorch.UsageError, match="AVX512-BF16 or AMX on x86, the BF16 extension on Arm"):
        autocast_context("cpu", "bf16")
    assert precision_mod.reduced_precisions("cpu") == ()
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: True)
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
    assert precision_mod.reduced_precisions("cpu") == ("bf16",)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    assert precision_mod.reduced_precisions("cuda:0") == ("fp16",)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_mod.reduced_precisions("cuda") == ("fp16", "bf16")


def _cuda_switches() -> tuple:
    """What ``toolbox_cuda_numerics`` sets, read back (the switches are Python-side: no GPU needed)."""
    return tuple(getattr(owner, name) for owner, name, _ in precision_mod._tf32_switches()) + \
        (torch.backends.cudnn.benchmark,)


@pytest.fixture
def restore_cuda_switches():
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in precision_mod._tf32_switches()]
    benchmark = torch.backends.cudnn.benchmark
    yield
    for owner, name, value in saved:
        setattr(owner, name, value)
    torch.backends.cudnn.benchmark = benchmark


@pytest.mark.parametrize("device, gpus, message", [
    ("gpu", 0, "device 'gpu' is not a device; use cpu, cuda, cuda:N or mps"),
    ("cuda", 0, "device 'cuda': torch sees no CUDA device on this machine .*; use cpu"),
    ("cuda:1", 1, "device 'cuda:1': this machine has 1 CUDA GPU, cuda:0$"),
    ("cuda:2", 2, "device 'cuda:2': this machine has 2 CUDA GPUs, cuda:0 to cuda:1$"),
])
def test_a_device_this_machine_lacks_is_refused_with_what_it_has(monkeypatch, device, gpus, message):
    """A user's choice of device, not a bug: one line naming it and what there is, from ``check_device`` and
    from ``load`` and ``Segmenter``, before any weight moves. The GPU count is
    set as a machine with that many would report it."""
    from segtorch.segmenter import Segmenter

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(segtorch.UsageError, match=message) as refused:
        precision_mod.check_device(device)
    assert "\n" not in str(refused.value)
    with pytest.raises(segtorch.UsageError, match=message):
        segtorch.load("demo_pspnet_shapes", device=device)
    with pytest.raises(segtorch.UsageError, match=message):
        Segmenter(nn.Identity(), segtorch.model_card("demo_pspnet_shapes"), device=device)
    assert precision_mod.check_device("cpu") == torch.device("cpu")
    if gpus:  # what the machine has is accepted, and nothing is initialised on it
        assert precision_mod.check_device(f"cuda:{gpus - 1}") == torch.device(f"cuda:{gpus - 1}")
        assert precision_mod.check_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(segtorch.UsageError, match="device 'mps': Apple's Metal .MPS. is not available here; use cpu"):
        precision_mod.check_device("mps")


def test_toolbox_cuda_numerics_turn_tf32_off_on_gpus_only(restore_cuda_switches):
    """The toolbox's scripts all turn TF32 off ("open full fp32"); segtorch does so around its own CUDA work and
    puts the user's settings back after, also after an error. Nothing changes on the CPU."""
    off = tuple(value for _, _, value in precision_mod._tf32_switches())
    before = _cuda_switches()
    assert before[:2] != off  # PyTorch's default lets cuDNN's convolutions use TF32
    with precision_mod.toolbox_cuda_numerics("cpu", cudnn_benchmark=True):
        assert _cuda_switches() == before
    with precision_mod.toolbox_cuda_numerics("cuda:1"):
        assert _cuda_switches() == off + (before[2],)  # autotuning left alone unless asked
    with precision_mod.toolbox_cuda_numerics(torch.device("cuda"), cudnn_benchmark=True):
        assert _cuda_switches() == off + (True,)
    assert _cuda_switches() == before
    with pytest.raises(KeyError):
        with precision_mod.toolbox_cuda_numerics("cuda", cudnn_benchmark=True):
            raise KeyError("inside")
    assert _cuda_switches() == before
    # every precision's forward passes on a GPU run under them (the checks before the block need no GPU)
    with autocast_context("cuda", "fp32"):
        assert _cuda_switches()[:2] == off
    assert _cuda_switches() == before


def test_toolbox_cuda_numerics_on_torch_without_per_operator_precision(monkeypatch, restore_cuda_switches):
    """Before torch 2.9 the switches are the ``allow_tf32`` flags."""
    monkeypatch.setattr(torch.backends.cudnn, "conv", object(), raising=False)
    switches = precision_mod._tf32_switches()
    assert [(owner, name) for owner, name, _ in switches] == [(torch.backends.cudnn, "allow_tf32"),
                                                             (torch.backends.cuda.matmul, "allow_tf32")]
    torch.backends.cudnn.allow_tf32 = True
    with precision_mod.toolbox_cuda_numerics("cuda"):
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True


def test_device_fidelity_on_the_cpu():
    """The comparison tests/test_cuda.py makes on a GPU, run on the CPU: the model loaded from a file, with and
    without the fast path, within the parity rule of the CPU's own float32 (not bit-equal to it: weights read
    from a file sit at other alignments, and the CPU kernels' rounding follows the alignment)."""
    from segtorch.testing import device_fidelity

    errors = device_fidelity("pspnet_resnet50os8_ade20k", "cpu")
    assert set(errors) == {"cpu_fp32", "fp32", "fp32_default"} and 0 < errors["cpu_fp32"] < 1e-5
    assert max(errors["fp32"], errors["fp32_default"]) <= max(2 * errors["cpu_fp32"], 1e-5)


def test_benchmarks_name_the_cpu_kind(monkeypatch):
    """Zen 4 and Zen 5 have the same name and nearly the same flags: the family/model numbers tell them apart."""
    info = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "sse avx2 fma avx512f avx512_bf16"}
    monkeypatch.setattr(precision_mod, "_cpuinfo", lambda: info)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset(info["flags"].split()))
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: True)
    assert precision_mod.describe_cpu() == ("AMD EPYC (family 26 model 2); flags: avx2 avx512_bf16 avx512f fma; "
                                            "bf16 fast path: yes")
    monkeypatch.setattr(precision_mod, "_cpuinfo", lambda: {})
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: False)
    assert precision_mod.describe_cpu() == "unknown CPU; flags: unknown; bf16 fast path: no"


def test_kernel_caps_are_named_and_bound_bf16(monkeypatch):
    """A benchmark run with another CPU kind's kernels (ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY) says so in its
    header, and bf16 is not offered where oneDNN is capped below its bf16 kernels (it would be emulated)."""
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    info = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "avx2 fma avx512f avx512_bf16"}
    monkeypatch.setattr(precision_mod, "_cpuinfo", lambda: info)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset(info["flags"].split()))
    monkeypatch.setattr(precision_mod, "_x86_native_bf16", lambda: True)
    assert precision_mod.kernel_caps() == "" and precision_mod.cpu_supports_bf16()
    for uncapped in ("ALL", "DEFAULT", "avx512_core_amx", "AVX512_CORE_BF16", "NONSENSE"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", uncapped)
        assert precision_mod.cpu_supports_bf16(), uncapped
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert precision_mod.kernel_caps() == "oneDNN AVX2, ATen avx2"
    assert not precision_mod.cpu_supports_bf16() and precision_mod.reduced_precisions("cpu") == ()
    assert precision_mod.describe_cpu() == (
        "AMD EPYC (family 26 model 2); flags: avx2 avx512_bf16 avx512f fma; bf16 fast path: no; kernels capped to "
        "oneDNN AVX2, ATen avx2: another CPU kind's instruction set on this CPU's cores, caches and clocks")
    with pytest.raises(segtorch.UsageError, match="caps them to AVX2 .ONEDNN_MAX_CPU_ISA.; unset it or use 'fp32'"):
        autocast_context("cpu", "bf16")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # oneDNN's older name; an Intel Cascade Lake
    assert not precision_mod.cpu_supports_bf16()
    assert precision_mod.kernel_caps() == "oneDNN AVX512_CORE_VNNI, ATen avx2"


def test_fold_pairs_need_no_source_files(monkeypatch):
    """From a wheel, a zip or .pyc files there is no source to read: folding must find the same pairs."""
    import inspect

    import segtorch

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    model = segtorch.create_model("demo_pspnet_shapes")
    fold_batchnorm(model)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert left == []  # every BatchNorm of this ResNet + PSP head follows its convolution


