"""Settings of a fresh ``segtorch predict``/``segtorch eval`` process that keep idle threads off the cores
that the model and its reading and writing threads need, and buffers out of the kernel's page-fault path. They
change the process, not results, and apply only where the command owns the process: torch not yet imported
(``segtorch predict ...``, not ``cli.main`` called from a Python program that already uses torch), and never
over what the user set.

Measured on 2 Zen 5 cores (2026-11-24), 10 interleaved runs each: ``benchmarks/predict_throughput.py``'s 48
JPEGs, medians 0.705 s with neither, 0.63 s with the short OpenMP spin, 0.59 s with that and the kept heap;
``segtorch eval demo_pspnet_shapes`` (50 images, 6 runs each), 0.80 s against 0.685 s. The short OpenBLAS
spin (same JPEGs, 10 runs each): 0.54 s against 0.505 s. OpenCV's calls on their callers' threads (same JPEGs,
10 interleaved runs each, 2026-11-24): 0.460 s against 0.441 s (an earlier 10: 0.455 against 0.430); ``eval``
(8 runs each): 0.622 s against 0.596 s.
"""
from __future__ import annotations

import ctypes
import os
import sys

# libgomp's threads spin 300000 times (several ms) after a parallel region before they sleep: after each
# forward pass that takes a core from the threads that read and write between passes. 20000 spins still
# bridge the gaps inside a forward pass (0.281 s against 0.283 s for the demo's 48 images).
OPENMP_SPINS = 20000

# OpenBLAS (OpenCV's wheel bundles one, numpy's another; nothing the commands run calls BLAS) starts a thread per
# core when it loads, which then spins on sched_yield for 2^28 cycles (~0.1 s) before it sleeps. OpenCV loads
# just before the first images are read, so that thread took a core from the first reads and the first forward
# pass (1500 preemptions in that pass). 2^4 cycles: it sleeps at once, and wakes for any BLAS call.
OPENBLAS_SPIN_LOG2 = 4

# glibc gives blocks over 128 KB back to the kernel when they are freed (its threshold then grows with the
# blocks freed, but trims follow), so each batch's images, outputs, PNGs and activations are page-faulted in
# again: the whole 48-image run took 142 K page faults, 105 K with these settings, and the first forward pass
# 115 -> 54 ms. Blocks up to 32 MB (glibc's largest) come from the heap instead, and up to 512 MB of freed heap
# stays with the process for reuse after a peak instead of going back to the system.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def owns_process() -> bool:
    """Whether these settings can still take effect and disturb nobody: torch (and its OpenMP) not loaded."""
    return "torch" not in sys.modules


def short_openmp_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for libgomp, which reads it when torch loads it; not where the user chose a
    spin count or a wait policy. Whether it was set."""
    if not owns_process() or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPINS)
    return True


def short_blas_spin() -> bool:
    """Set ``OPENBLAS_THREAD_TIMEOUT`` for the OpenBLAS libraries that load after this; not where the user
    chose OpenBLAS's threads or spin. Whether it was set."""
    if not owns_process() or any(k in os.environ for k in
                                 ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS")):
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(OPENBLAS_SPIN_LOG2)
    return True


def keep_freed_memory() -> bool:
    """glibc's ``mallopt``: freed blocks up to ``MMAP_THRESHOLD`` stay in the heap for reuse. Not where the
    user tuned malloc (``MALLOC_*`` variables, glibc tunables) or where the C library is not glibc. Whether
    it was set."""
    if not owns_process() or not sys.platform.startswith("linux") or \
            any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them (find_library runs
        libc.gnu_get_libc_version  # ldconfig); glibc's only (musl's mallopt is a no-op, and it has no such call)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def sequential_opencv() -> bool:
    """``cv2.setNumThreads(0)``: each OpenCV call runs on the thread that makes it. The commands' reading and
    writing threads already work on one image each, side by side; OpenCV splitting each conversion, resize and
    colour lookup across the cores as well only added hand-offs between its pool and theirs. Loads OpenCV (its
    OpenBLAS after ``short_blas_spin``). Not where the user chose OpenCV's threads (``OPENCV_FOR_THREADS_NUM``)
    or a program loaded OpenCV itself. Whether it was set."""
    if not owns_process() or "cv2" in sys.modules or "OPENCV_FOR_THREADS_NUM" in os.environ:
        return False
    import cv2

    cv2.setNumThreads(0)
    return True


def tune_own_process() -> tuple[bool, bool, bool, bool]:
    """The settings, where this process is the command's own: (OpenMP spin set, OpenBLAS spin set, freed
    blocks kept, OpenCV sequential). The heap's settings come before OpenCV's libraries allocate."""
    return short_openmp_spin(), short_blas_spin(), keep_freed_memory(), sequential_opencv()
