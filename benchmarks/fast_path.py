"""How far each inference layout is from the float64 answer, and how fast it is, per backbone.

    python benchmarks/fast_path.py [--size 97x75] [--threads 2] [--names NAME ...]

For one checkpoint per backbone (random weights drawn as the toolbox initialises them, segtorch.testing),
four fp32 variants of the same model: plain NCHW (the toolbox's own arithmetic), BatchNorm folded,
channels-last, and both. Each is compared with the model run in float64; the ratio to the plain model's
error is what ``load``'s per-backbone defaults (segtorch/inference/fast_path.py) are held to (<= 2x, or 1e-5).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import segtorch  # noqa: E402
from segtorch.argtypes import int_pair, model_name, nonnegative_int, positive_int  # noqa: E402
from segtorch.inference.fuse import fold_batchnorm  # noqa: E402
from segtorch.inference.fast_path import ChannelsLast  # noqa: E402
from segtorch.testing import relative_error, seeded_input, seeded_state_dict  # noqa: E402

NAMES = ["pspnet_resnet50os8_ade20k", "pspnet_resnet101os8_ade20k", "isnet_resnest101os8_ade20k",
         "mcibi_deeplabv3_hrnetv2w48_ade20k", "mcibi_deeplabv3_vitlarge_ade20k", "upernet_swinlarge_ade20k"]


def timed(fn, x, repeats):
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def measure(name: str, shape, repeats: int) -> None:
    model = segtorch.create_model(name)
    model.load_state_dict(seeded_state_dict(model.state_dict()))
    x = seeded_input(shape)
    exact = copy.deepcopy(model).double()(x.double())
    variants = {}
    for fold in (False, True):
        for cl in (False, True):
            m = copy.deepcopy(model)
            if fold:
                fold_batchnorm(m)
            variants[(fold, cl)] = ChannelsLast(m) if cl else m
    base = relative_error(variants[(False, False)](x), exact)
    print(f"{name} {shape[2]}x{shape[3]}: plain NCHW error {base:.1e}")
    for (fold, cl), fn in variants.items():
        err = relative_error(fn(x), exact)
        t = timed(fn, x, repeats) if repeats else float("nan")
        print(f"  fuse_bn={fold!s:<5} channels_last={cl!s:<5} error {err:.1e} ({err / base:5.2f}x plain)  "
              f"{t * 1000:8.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int_pair, default="97x75", help="H x W of the input")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--repeats", type=nonnegative_int, default=2, help="timed runs per variant (0: accuracy only)")
    ap.add_argument("--names", nargs="*", type=model_name, default=NAMES)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = args.size
    for name in args.names:
        measure(name, (1, 3, h, w), args.repeats)


if __name__ == "__main__":
    main()
