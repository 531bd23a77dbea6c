"""Reduced-precision inference: an autocast context that refuses, with the reason, what the hardware cannot do.

fp32 is the default (``exact=True``: the toolbox's own numbers); bf16/fp16 trade a little accuracy in the
scores for speed. The CPU is asked of torch whether it computes in bf16 natively (x86 AVX512-BF16 or AMX, Arm's
BF16 extension; elsewhere bf16 is emulated, slower than fp32), and fp16 autocast is offered on CUDA only. On CUDA every precision runs with the
toolbox's numerics (``toolbox_cuda_numerics``): TF32 off.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from pathlib import Path

import torch

from ..argtypes import PRECISIONS
from ..errors import UsageError
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. macOS or Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def describe_cpu() -> str:
    """The CPU's name, family/model numbers (which tell CPU generations apart where the name does not, e.g.
    AMD family 25 is Zen 3/4, 26 is Zen 5), its vector flags and any cap on the kernels' instruction set, for
    benchmark headers."""
    info = _cpuinfo()
    vector = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    name = info.get("model name", "unknown CPU")
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    text = f"{name}; flags: {' '.join(vector) or 'unknown'}; bf16 fast path: {'yes' if cpu_supports_bf16() else 'no'}"
    caps = kernel_caps()
    if caps:
        text += (f"; kernels capped to {caps}: another CPU kind's instruction set on this CPU's cores, caches "
                 "and clocks")
    return text


# oneDNN's instruction-set levels, lowest first: ONEDNN_MAX_CPU_ISA (older name DNNL_MAX_CPU_ISA) caps its
# kernels (convolutions, matmuls, bf16) to one of them; ALL, DEFAULT or another value leave them uncapped
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16")


def onednn_isa_cap() -> str | None:
    """The instruction set the environment caps oneDNN's kernels to, or None (uncapped). oneDNN reads the
    variable once, at its first use in the process."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    value = value.strip().upper()
    return value if value in _ONEDNN_ISAS else None


def kernel_caps() -> str:
    """The caps set on the CPU kernels' instruction set, as "oneDNN AVX2, ATen avx2" ("" where none): how a
    benchmark runs another CPU kind's kernels on this machine (e.g. ``ONEDNN_MAX_CPU_ISA=AVX2
    ATEN_CPU_CAPABILITY=avx2`` for an AVX2-only CPU)."""
    caps = []
    if onednn_isa_cap():
        caps.append(f"oneDNN {onednn_isa_cap()}")
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        caps.append(f"ATen {torch.backends.cpu.get_cpu_capability().lower()}")
    return ", ".join(caps)


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _x86_native_bf16() -> bool:
    """An x86 CPU that computes in bf16 itself (AVX512-BF16 or AMX), as torch's CPU probe reports it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _bf16_kernels_capped() -> bool:
    """ONEDNN_MAX_CPU_ISA caps oneDNN below its native bf16 kernels."""
    cap = onednn_isa_cap()
    return cap is not None and _ONEDNN_ISAS.index(cap) < _ONEDNN_ISAS.index("AVX512_CORE_BF16")


def _onednn_bf16() -> bool:
    """torch's oneDNN has bfloat16 kernels for this CPU (Arm's BF16 extension, x86's AVX-512 and newer)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN's operators
        return False


def cpu_supports_bf16() -> bool:
    """Whether bf16 runs fast on this CPU, as torch reports it: oneDNN has bfloat16 kernels here, and on x86
    they compute in bf16 natively (plain AVX-512 only emulates it, slower than fp32) and no
    ONEDNN_MAX_CPU_ISA cap keeps them from it."""
    if _onednn_bf16() and _is_x86():
        return _x86_native_bf16() and not _bf16_kernels_capped()
    return _onednn_bf16()


def check_device(device: torch.device | str, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; ``UsageError`` (a ValueError) where it is no device name or this machine
    has no such device, saying what it has. ``what``: how the message names the value (a command's option)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{what} {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    named = f"{what} {str(parsed)!r}"
    if parsed.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a GPU or driver; does not initialise CUDA
        if count == 0:
            raise UsageError(f"{named}: torch sees no CUDA device on this machine (torch {torch.__version__}, built "
                             f"for CUDA {torch.version.cuda or 'none'}); use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"{named}: this machine has {count} CUDA GPU{'s' if count > 1 else ''}, cuda:0"
                             f"{f' to cuda:{count - 1}' if count > 1 else ''}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{named}: Apple's Metal (MPS) is not available here; use cpu")
    return parsed


def check_precision(device: torch.device | str, precision: str) -> None:
    """Raise ``UsageError`` (a ValueError) for an unknown precision or one ``device`` lacks, with the reason
    (whether this machine has ``device`` at all is ``check_device``'s question)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UsageError("precision 'bf16' needs a GPU with bfloat16 support (Ampere or newer); "
                               "use 'fp16' or 'fp32'")
        return
    if device.type == "cpu":
        if precision == "fp16":
            raise UsageError("precision 'fp16' is only offered on CUDA; on the CPU use 'bf16' (with "
                               "AVX512-BF16 or AMX) or 'fp32'")
        if not cpu_supports_bf16():
            if _is_x86() and _x86_native_bf16() and _bf16_kernels_capped():
                raise UsageError(f"precision 'bf16' on the CPU needs oneDNN's AVX512_CORE_BF16 kernels or newer, "
                                 f"and the environment caps them to {onednn_isa_cap()} (ONEDNN_MAX_CPU_ISA); "
                                 "unset it or use 'fp32'")
            raise UsageError("precision 'bf16' on the CPU needs native bfloat16 arithmetic (AVX512-BF16 or AMX "
                             "on x86, the BF16 extension on Arm), which torch does not report here; use 'fp32'")
        return
    raise UsageError(f"precision {precision!r} is not supported on device type {device.type!r}; use 'fp32'")


def reduced_precisions(device: torch.device | str) -> tuple[str, ...]:
    """The reduced precisions ``device`` offers (``check_precision`` accepts them): CUDA fp16, and bf16 on GPUs
    that have it; the CPU bf16 with AVX512-BF16 or AMX; else none."""
    device = torch.device(device)
    if device.type == "cuda":
        return ("fp16", "bf16") if torch.cuda.is_bf16_supported() else ("fp16",)
    return ("bf16",) if device.type == "cpu" and cpu_supports_bf16() else ()


def reduced_dtype(precision: str) -> torch.dtype:
    """The torch dtype autocast computes in at ``precision`` ("bf16" or "fp16")."""
    return _DTYPES[precision]


def _tf32_switches() -> list[tuple[object, str, object]]:
    """(object, attribute, value that turns TF32 off) for cuDNN's convolutions and CUDA's matmuls: the
    per-operator ``fp32_precision`` where this torch has it (2.9+; reading the older ``allow_tf32`` flags there
    raises once someone has set the two APIs differently), else the ``allow_tf32`` flags."""
    backends = torch.backends
    if hasattr(getattr(backends.cudnn, "conv", None), "fp32_precision"):
        return [(backends.cudnn.conv, "fp32_precision", "ieee"), (backends.cuda.matmul, "fp32_precision", "ieee")]
    return [(backends.cudnn, "allow_tf32", False), (backends.cuda.matmul, "allow_tf32", False)]


class _SwitchHolder:
    """Process-wide switches held at given values while any holder is inside, shared by threads: the first to
    enter saves the values found and sets them, the last to leave puts back the saved values (a switch someone
    else changed in between, the user's own setting, is left as they set it). Saving and restoring per call
    instead lets two overlapping calls hand each other's values back: the user's setting ends up flipped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[tuple[int, str], list] = {}  # (id(owner), name) -> [owner, value set, saved, holders]

    @contextlib.contextmanager
    def hold(self, switches: list[tuple[object, str, object]]):
        keys = []
        with self._lock:
            for owner, name, value in switches:
                key = (id(owner), name)
                entry = self._held.get(key)
                if entry is None:
                    entry = self._held[key] = [owner, value, getattr(owner, name), 0]
                    setattr(owner, name, value)
                elif entry[1] != value:  # another block holds it at another value: a bug in segtorch
                    raise RuntimeError(f"{name} is held at {entry[1]!r} by a running block, not {value!r}")
                entry[3] += 1
                keys.append(key)
        try:
            yield
        finally:
            with self._lock:
                for key in keys:
                    entry = self._held[key]
                    entry[3] -= 1
                    if entry[3] == 0:
                        del self._held[key]
                        owner, name = entry[0], key[1]
                        if getattr(owner, name) == entry[1]:
                            setattr(owner, name, entry[2])


_CUDA_SWITCHES = _SwitchHolder()


@contextlib.contextmanager
def toolbox_cuda_numerics(device: torch.device | str, cudnn_benchmark: bool | None = None):
    """Within the block, on a CUDA device, the toolbox's settings: TF32 off for cuDNN's convolutions and CUDA's
    matmuls (its training, test and inference scripts all set that, "open full fp32"; PyTorch's default runs
    fp32 convolutions on Ampere and newer GPUs in TF32, a 10-bit mantissa: errors ~1e-3 where float32's are
    ~1e-6), and cuDNN's autotuning where ``cudnn_benchmark`` is given (its training sets it from the config:
    on for all 74). These switches are process-wide and torch has no per-thread form of them: blocks of
    several threads share one hold on them (``_SwitchHolder``), and the values found before the first block
    come back after the last one; CUDA work of other threads during the blocks runs under them too. On other
    devices (the CPU never uses TF32) nothing is touched."""
    if torch.device(device).type != "cuda":
        yield
        return
    switches = _tf32_switches()
    if cudnn_benchmark is not None:
        switches.append((torch.backends.cudnn, "benchmark", cudnn_benchmark))
    with _CUDA_SWITCHES.hold(switches):
        yield


def autocast_context(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """A context manager for running the model at ``precision`` on ``device`` ("fp32": no autocast), with the
    toolbox's CUDA numerics (``toolbox_cuda_numerics``: TF32 off) on a GPU. An unknown precision, or one the
    device lacks, is refused here, before the block."""
    check_precision(device, precision)
    return _numerics(torch.device(device), precision)


@contextlib.contextmanager
def _numerics(device: torch.device, precision: str):
    with toolbox_cuda_numerics(device):
        if precision == "fp32":
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
                yield
