"""Parity on a device against the float64 answer: one checkpoint per decode-head family and per backbone.

    python benchmarks/cuda_check.py [--device cuda] [--names NAME ...] [--size 97x75]

For each checkpoint (weights drawn as the toolbox initialises them, loaded from a file as users load them,
segtorch.testing.device_fidelity): the relative error from the float64 answer of the CPU's float32 (the
toolbox's arithmetic: the yardstick), of ``--device`` in float32 without and with the fast path (TF32 off on a
GPU, as the toolbox runs), and of each reduced precision the device offers (CUDA: fp16, and bf16 where the GPU
has it; the CPU: bf16 with AVX512-BF16/AMX), with the % of pixels whose best class is float64's. float32 passes
at <= 2x the yardstick (or 1e-5), the rule tests/test_parity.py holds the CPU's fast path to. Exit status 1 if
any float32 row fails. Runs on the CPU too (--device cpu), e.g. to see the table's CPU side alone.
"""
from __future__ import annotations

import argparse
import sys

import torch

from segtorch.argtypes import int_pair, model_name
from segtorch.errors import UsageError
from segtorch.inference.precision import check_device, describe_cpu, reduced_precisions
from segtorch.testing import FAMILY_CHECKPOINTS, device_fidelity

FACTOR, FLOOR = 2.0, 1e-5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--names", nargs="*", type=model_name, default=list(FAMILY_CHECKPOINTS))
    ap.add_argument("--size", type=int_pair, default="97x75",
                    help="H x W of the input (odd sizes exercise the padding)")
    args = ap.parse_args()
    try:
        device = check_device(args.device, what="--device")
    except UsageError as e:
        sys.exit(f"cuda_check: {e}")
    h, w = args.size
    reduced = reduced_precisions(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    print(f"torch {torch.__version__}; {device}: {where}; input {h}x{w}; reduced precisions: "
          f"{', '.join(reduced) or 'none on this device'}")
    print(f"{'checkpoint':<40} {'cpu fp32':>9} {'fp32':>9} {'default':>9}  "
          + "  ".join(f"{p:>9} {'agree%':>7}" for p in reduced) + "  float32")
    failed = 0
    for name in args.names:
        e = device_fidelity(name, device, shape=(1, 3, h, w), precisions=reduced)
        bound = max(FACTOR * e["cpu_fp32"], FLOOR)
        ok = e["fp32"] <= bound and e["fp32_default"] <= bound
        failed += not ok
        print(f"{name:<40} {e['cpu_fp32']:9.1e} {e['fp32']:9.1e} {e['fp32_default']:9.1e}  "
              + "  ".join(f"{e[p]:9.1e} {e[p + '_agreement']:7.2f}" for p in reduced)
              + f"  {'ok' if ok else f'FAIL (> {bound:.1e})'}")
    print(f"{len(args.names) - failed} of {len(args.names)} within {FACTOR:g}x the CPU float32 error (or {FLOOR:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
