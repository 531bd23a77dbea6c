"""On a GPU: one checkpoint per decode-head family and per backbone is as close to the float64 answer in CUDA
float32 (TF32 off, as the toolbox runs) as the CPU's float32 is, with and without the fast path, and AMP's
fp16/bf16 give finite scores within the error reduced precision has on the CPU (bf16 there: 2e-3 to 2e-2 on
these inputs). Their label agreement is printed by ``benchmarks/cuda_check.py``, not bounded here: random
weights leave classes nearly tied (ResNeSt-101 agrees on 83% of the pixels in bf16 on the CPU). Skipped where
torch sees no CUDA device; the same comparison runs on the CPU in the ordinary suite
(test_device_fidelity_on_the_cpu)."""
from __future__ import annotations

import math

import pytest
import torch

from segtorch.inference.precision import reduced_precisions
from segtorch.testing import FAMILY_CHECKPOINTS, device_fidelity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
FACTOR, FLOOR = 2.0, 1e-5  # tests/test_parity.py's rule for the fast path, here for the device


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_CHECKPOINTS)
def test_cuda_is_as_close_to_float64_as_the_cpu(name):
    reduced = reduced_precisions("cuda")
    errors = device_fidelity(name, "cuda", precisions=reduced)
    bound = max(FACTOR * errors["cpu_fp32"], FLOOR)
    assert errors["fp32"] <= bound and errors["fp32_default"] <= bound, errors
    for precision in reduced:  # an overflow (fp16) or a broken cast gives inf or errors near 1
        assert math.isfinite(errors[precision]) and errors[precision] < 0.1, errors
