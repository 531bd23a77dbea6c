"""Inference speed and memory: segtorch vs the SSSegmentation toolbox, same weights and input, side by side.

    python benchmarks/speed.py [--repeats 3] [--threads 2] [--skip-memory] [--device cpu|cuda] [--onnx]
                               [--cases tta,memory,gpu,exact] [--scale 1.0]

Cases (weights are random, seeded; both sides load the same state dict):
  tta       PSPNet R-50-D8 ADE20K, 300x420 image, slide 256x256 stride 171, scales 0.75/1/1.25 + flip
            (24 crops): toolbox auginference + its inference script's averaging vs ``Segmenter.logits``;
            also segtorch's own model-forward time over those crops (overhead target: <= 10%),
            bf16 (only where the CPU has AVX512-BF16/AMX; said clearly when skipped) and torch.compile.
  memory    peak resident memory of a 2048x1024 slide inference (crop 512x1024, stride 341x683, 19 classes,
            PSPNet R-50-D8 Cityscapes), each side in a fresh process.
  gpu       the device cases (default with --device cuda; --cases gpu elsewhere), both sides on --device, the
            toolbox with its test script's settings (TF32 off): Cityscapes 1024x2048 slide (PSPNet R-50-D8, crop
            512x1024, stride 341x683), ADE20K 512x683 whole and slide 512/341 + its six scales + flip (PSPNet
            R-50-D8 ADE20K). segtorch fp32, then each reduced precision the device offers (CUDA: fp16, bf16)
            with cuDNN's autotuning off and on: time, ratio to the toolbox's fp32 (target >= 5x with AMP on a
            GPU), label agreement with fp32, peak GPU memory of each side. --scale shrinks every size (a quick
            run of the code on the CPU: tests/test_benchmarks.py).
  exact     ``segtorch.load``'s default fast path against ``exact=True`` (the toolbox's computation step for
            step) on the gpu cases' ADE20K 512x683 slide 512/341 + six scales + flip (PSPNet R-50-D8, the card's
            test size), interleaved, on --device: times, ratio (target >= 1.1x), their distance. --scale shrinks it.
  onnx      with --onnx: the tta case's model exported by ``segtorch export`` and run by onnxruntime (CPU,
            same threads) through the same ``Segmenter.logits``, beside eager fp32: times, ratio, agreement.
The tta case's timings are interleaved (toolbox, segtorch, toolbox, ...); the device cases time each side's
--repeats in turn after a warm-up call. Medians are reported with the ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

import segtorch  # noqa: E402
from segtorch.errors import UsageError  # noqa: E402
from segtorch.inference.precision import (check_device, check_precision, describe_cpu, reduced_precisions,  # noqa: E402
                                         toolbox_cuda_numerics)
from segtorch.testing import UPSTREAM_DIR, relative_error, seeded_input, seeded_state_dict  # noqa: E402

TTA_NAME = "pspnet_resnet50os8_ade20k"
TTA = {"mode": "slide", "crop_size": (256, 256), "stride": (171, 171), "scales": (0.75, 1.0, 1.25), "flip": True}
MEM_NAME = "pspnet_resnet50os8_cityscapes"


def toolbox_model(name: str, state: dict, inference: dict):
    from ssseg.modules import BuildSegmentor

    cfg = copy.deepcopy(json.loads((UPSTREAM_DIR / "upstream_configs.json").read_text())["configs"][name]["segmentor_cfg"])
    cfg["backbone"]["pretrained"] = False
    cfg["norm_cfg"] = {"type": "BatchNorm2d"}
    window = {k: list(inference[k]) if inference.get(k) else None for k in ("crop_size", "stride")}
    cfg["inference"]["forward"] = {"mode": inference["mode"], "cropsize": window["crop_size"],
                                   "stride": window["stride"]}
    cfg["inference"]["tta"] = {"multiscale": list(inference["scales"]), "flip": inference["flip"],
                               "use_probs_before_resize": False}
    model = BuildSegmentor(cfg, mode="TEST")
    model.load_state_dict(state)
    return model.eval()


def toolbox_scores(model, x: torch.Tensor) -> torch.Tensor:
    """The toolbox's inference script: auginference, each result resized to the image, averaged."""
    with torch.no_grad():
        outs = model.auginference(x)
        outs = [F.interpolate(o, size=x.shape[2:], mode="bilinear", align_corners=model.align_corners) for o in outs]
        return sum(outs) / len(outs)


def as_toolbox(device, fn, *args):
    """``fn(*args)`` under the toolbox's test-time numerics on ``device`` (its test script turns TF32 off)."""
    with toolbox_cuda_numerics(device):
        return fn(*args)


class ForwardTimer(torch.nn.Module):
    """Wraps a model and adds up the wall time of its forward calls (the convolution work)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds, self.calls = model, 0.0, 0

    def forward(self, x):
        t0 = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def synchronize() -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it (nothing to wait for without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, *args):
    synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    synchronize()
    return out, time.perf_counter() - t0


def median_time(fn, repeats: int):
    """(last output, median seconds) over ``repeats`` calls."""
    runs = []
    for _ in range(repeats):
        out, t = timed(fn)
        runs.append(t)
    return out, statistics.median(runs)


def random_checkpoint(name: str, folder: Path) -> Path:
    """A toolbox-format file for ``name`` holding the seeded random weights (auxiliary heads included)."""
    path = folder / "w.pth"
    torch.save({"model": seeded_state_dict(segtorch.create_model(name, auxiliary=True).state_dict())}, path)
    return path


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item()


def case_tta(args, have_toolbox: bool) -> None:
    from segtorch.inference.predictor import infer_logits

    print(f"\n== tta: {TTA_NAME}, 300x420, slide 256/171, scales 0.75/1/1.25 + flip, {args.threads} threads ==")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(TTA_NAME, Path(tmp))
        state = torch.load(ckpt, weights_only=True)["model"]
        seg = segtorch.load(TTA_NAME, checkpoint=ckpt, device=args.device)
        network = seg.model  # read from the file while it exists: the bf16 and compiled Segmenters' source
    x = seeded_input((1, 3, 300, 420)).to(args.device)
    ours = lambda: seg.logits(x, **TTA)  # noqa: E731
    # both sides on --device, the toolbox with its test script's numerics (TF32 off on a GPU)
    ref = toolbox_model(TTA_NAME, state, TTA).to(args.device) if have_toolbox else None
    times = {"toolbox": [], "segtorch": []}
    ours()  # warm-up (allocator, oneDNN primitive caches) for both sides
    if ref is not None:
        as_toolbox(args.device, toolbox_scores, ref, x)
    for _ in range(args.repeats):
        if ref is not None:
            ref_out, t = timed(as_toolbox, args.device, toolbox_scores, ref, x)
            times["toolbox"].append(t)
        our_out, t = timed(ours)
        times["segtorch"].append(t)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    # the model's own forward passes over the same crops, through the same batching
    timer = ForwardTimer(seg.inference_module)
    settings = seg.inference_settings(**TTA)
    t0 = time.perf_counter()
    with torch.inference_mode():
        infer_logits(timer, x, num_classes=seg.card.num_classes, align_corners=False, **settings)
    total = time.perf_counter() - t0
    if args.profile:  # where segtorch's fp32 time goes, by operator
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        profiled = sum(e.self_cpu_time_total for e in ops)  # not `total`: that is the timed run's seconds
        print("profile (self CPU time): " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / profiled:.1f}%"
                                                       for e in ops[:8]))
    print(f"segtorch fp32: {med['segtorch']:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['segtorch'])})")
    print(f"  model forward passes: {timer.seconds:.2f} s in {timer.calls} batched calls of {total:.2f} s "
          f"-> everything else {100 * (total - timer.seconds) / total:.1f}% (target <= 10%)")
    if ref is not None:
        from segtorch.testing import reference_logits

        # the toolbox's own network over the same crops, one at a time as its slide inference runs them
        bare = ForwardTimer(lambda crops: torch.cat([reference_logits(ref, c[None]) for c in crops]))
        with torch.inference_mode(), toolbox_cuda_numerics(args.device):
            infer_logits(bare, x, num_classes=seg.card.num_classes, align_corners=False, **settings)
        print(f"toolbox bare crop forwards: {bare.seconds:.2f} s; segtorch / bare: "
              f"{med['segtorch'] / bare.seconds:.2f} (target <= 0.95)")
        print(f"toolbox fp32:  {med['toolbox']:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['toolbox'])})")
        print(f"ratio toolbox / segtorch (fp32): {med['toolbox'] / med['segtorch']:.2f}x (target >= 1.3x); "
              f"relative error {relative_error(our_out.cpu(), ref_out.cpu()):.1e}, label agreement "
              f"{agreement(our_out.cpu(), ref_out.cpu()):.3f}%")
    reduced = reduced_precisions(args.device)  # the CPU: bf16 with AVX512-BF16/AMX; CUDA: fp16 first
    if not reduced:
        try:  # the reason, as segtorch gives it (no bf16 flags, or oneDNN capped below its bf16 kernels)
            check_precision(args.device, "bf16")
        except UsageError as e:
            print(f"bf16: SKIPPED -- {e}")
    else:
        fast = segtorch.Segmenter(network, seg.card, device=args.device, precision=reduced[0])
        fast.logits(x, **TTA)
        out16, t16 = median_time(lambda: fast.logits(x, **TTA), args.repeats)
        line = (f"{fast.precision}: {t16:.2f} s; accuracy cost: label agreement with fp32 "
                f"{agreement(out16.cpu(), our_out.cpu()):.3f}%, scores' relative error {relative_error(out16.cpu(), our_out.cpu()):.1e}")
        if "toolbox" in med:
            line += f"; ratio toolbox / segtorch-{fast.precision}: {med['toolbox'] / t16:.2f}x (target >= 2.5x)"
        print(line)
    if args.compile:
        comp = segtorch.Segmenter(network, seg.card, device=args.device, compile=True)
        _, first = timed(lambda: comp.logits(x, **TTA))
        outc, tc = median_time(lambda: comp.logits(x, **TTA), args.repeats)
        line = (f"compile: first call {first:.1f} s (compile time ~{first - tc:.1f} s), steady {tc:.2f} s, "
                f"agreement with fp32 {agreement(outc.cpu(), our_out.cpu()):.3f}%")
        if "toolbox" in med:
            line += f", ratio toolbox / compiled: {med['toolbox'] / tc:.2f}x"
        print(line)


EXACT_CASE = "ade20k 512x683 slide + ms + flip"


def case_exact(args) -> None:
    """The default fast path against ``exact=True`` (the toolbox's computation step for step), same weights and
    input, interleaved: what the fast path is worth, and how far apart the two are."""
    name, size, inference = GPU_CASES[EXACT_CASE]
    size = scaled(size, args.scale)
    inference = {**inference, "crop_size": scaled(inference["crop_size"], args.scale),
                 "stride": scaled(inference["stride"], args.scale)}
    print(f"\n== exact: {EXACT_CASE} (scale {args.scale:g}: {size[0]}x{size[1]}), {name}, default vs exact=True, "
          f"{args.device}, {args.threads} threads ==")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(name, Path(tmp))
        sides = {"default": segtorch.load(name, checkpoint=ckpt, device=args.device),
                 "exact": segtorch.load(name, checkpoint=ckpt, device=args.device, exact=True)}
    x = seeded_input((1, 3, *size)).to(args.device)
    times, outs = {k: [] for k in sides}, {}
    for _ in range(args.repeats):  # interleaved
        for label, seg in sides.items():
            outs[label], t = timed(lambda: seg.logits(x, **inference))
            times[label].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for label, runs in times.items():
        print(f"  {label:<8} {med[label]:8.2f} s (runs {', '.join(f'{t:.2f}' for t in runs)})")
    print(f"ratio exact / default: {med['exact'] / med['default']:.2f}x (target >= 1.1x); relative error between "
          f"them {relative_error(outs['default'].cpu(), outs['exact'].cpu()):.1e}, label agreement "
          f"{agreement(outs['default'].cpu(), outs['exact'].cpu()):.4f}%")


def case_onnx(args) -> None:
    """onnxruntime (CPU) vs eager fp32 on the tta case: same weights, same input, same test procedure."""
    from segtorch.export import export
    from segtorch.inference.onnx_runtime import OnnxModel

    print(f"\n== onnx: {TTA_NAME} exported, onnxruntime CPU vs eager fp32, tta case, {args.threads} threads ==")
    x = seeded_input((1, 3, 300, 420))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(TTA_NAME, Path(tmp))
        eager = segtorch.load(TTA_NAME, checkpoint=ckpt)
        _, t_export = timed(export, TTA_NAME, Path(tmp) / "m.onnx", ckpt)
        ort_seg = segtorch.Segmenter(OnnxModel(Path(tmp) / "m.onnx", threads=args.threads), eager.card)
        print(f"export (trace + self-check): {t_export:.0f} s")
        runs = {"eager": [], "onnxruntime": []}
        eager.logits(x, **TTA), ort_seg.logits(x, **TTA)  # warm-up
        for _ in range(args.repeats):  # interleaved
            eager_out, t = timed(lambda: eager.logits(x, **TTA))
            runs["eager"].append(t)
            ort_out, t = timed(lambda: ort_seg.logits(x, **TTA))
            runs["onnxruntime"].append(t)
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"{k:<12} {med[k]:.2f} s (runs {', '.join(f'{t:.2f}' for t in v)})")
    print(f"ratio eager / onnxruntime: {med['eager'] / med['onnxruntime']:.2f}x; relative error "
          f"{relative_error(ort_out, eager_out):.1e}, label agreement {agreement(ort_out, eager_out):.3f}%")


# (checkpoint, H x W of the image, test procedure) of the device cases
GPU_CASES = {
    "cityscapes 1024x2048 slide": (MEM_NAME, (1024, 2048), {"mode": "slide", "crop_size": (512, 1024),
                                                            "stride": (341, 683), "scales": (1.0,), "flip": False}),
    "ade20k 512x683 whole": (TTA_NAME, (512, 683), {"mode": "whole", "crop_size": None, "stride": None,
                                                    "scales": (1.0,), "flip": False}),
    "ade20k 512x683 slide + ms + flip": (TTA_NAME, (512, 683), {"mode": "slide", "crop_size": (512, 512),
                                                                "stride": (341, 341),
                                                                "scales": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                                                                "flip": True}),
}


def scaled(size, scale: float):
    """A size (or None) times ``scale``, each side a multiple of 8 and at least 32."""
    return None if size is None else tuple(max(32, int(round(v * scale / 8)) * 8) for v in size)


def peak_memory(fn, device):
    """(fn's result, seconds, peak GPU memory in MiB that fn allocated, None off CUDA)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out, seconds = timed(fn)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    return out, seconds, peak


def case_gpu(args, have_toolbox: bool) -> None:
    """The device cases: the toolbox in fp32 against segtorch in fp32 and with AMP, both on --device."""
    device = torch.device(args.device)
    autotune = [False, True] if device.type == "cuda" else [False]  # cuDNN's autotuning: a GPU switch
    for title, (name, size, inference) in GPU_CASES.items():
        size = scaled(size, args.scale)
        inference = {**inference, "crop_size": scaled(inference["crop_size"], args.scale),
                     "stride": scaled(inference["stride"], args.scale)}
        print(f"\n== {device.type}: {title} (scale {args.scale:g}: {size[0]}x{size[1]}), {name} ==")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = random_checkpoint(name, Path(tmp))
            state = torch.load(ckpt, weights_only=True)["model"]
            seg = segtorch.load(name, checkpoint=ckpt, device=device)
            network = seg.model if reduced_precisions(device) else None  # the reduced-precision ones read it
        x = seeded_input((1, 3, *size)).to(device)
        rows = {}  # label -> (seconds, peak MiB, scores)

        def run(label, fn):
            fn()  # warm-up: cuDNN's autotuning, allocator and kernel caches
            results = [peak_memory(fn, device) for _ in range(args.repeats)]
            rows[label] = (statistics.median(r[1] for r in results), max((r[2] or 0) for r in results)
                           if device.type == "cuda" else None, results[-1][0].float().cpu())

        if have_toolbox:
            ref = toolbox_model(name, state, inference).to(device)
            run("toolbox fp32", lambda: as_toolbox(device, toolbox_scores, ref, x))
            del ref
        del state
        run("segtorch fp32", lambda: seg.logits(x, **inference))
        for precision in reduced_precisions(device):
            fast = segtorch.Segmenter(network, seg.card, device=device, precision=precision)
            for tune in autotune:
                label = f"segtorch {precision}" + ((" autotuned" if tune else " heuristic")
                                                   if device.type == "cuda" else "")
                previous = torch.backends.cudnn.benchmark
                torch.backends.cudnn.benchmark = tune
                try:
                    run(label, lambda: fast.logits(x, **inference))
                finally:
                    torch.backends.cudnn.benchmark = previous
        base = rows.get("toolbox fp32")
        fp32 = rows["segtorch fp32"][2]
        for label, (seconds, peak, scores) in rows.items():
            line = f"  {label:<28} {seconds:8.3f} s"
            if peak is not None:
                line += f"  peak {peak:8.0f} MiB"
            if base is not None and label != "toolbox fp32":
                line += f"  {base[0] / seconds:5.2f}x the toolbox"
                if peak is not None and base[1]:
                    line += f", {peak / base[1]:.2f} of its memory"
            if label.startswith("segtorch") and label != "segtorch fp32":
                line += f"; agreement with fp32 {agreement(scores, fp32):.3f}%"
            elif label == "segtorch fp32" and base is not None:
                line += f"; relative error to the toolbox {relative_error(scores, base[2]):.1e}"
            print(line)
        if not reduced_precisions(device):
            print(f"  reduced precision: SKIPPED -- {describe_cpu()}")


MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from segtorch.testing import seeded_input
side, ckpt = {side!r}, {ckpt!r}
inference = {{"mode": "slide", "crop_size": (512, 1024), "stride": (341, 683), "scales": (1.0,), "flip": False}}
x = seeded_input((1, 3, 1024, 2048))
if side == "toolbox":
    from speed import toolbox_model, toolbox_scores
    state = torch.load(ckpt, weights_only=True)["model"]
    model = toolbox_model({name!r}, state, inference); del state
    before = hwm()
    out = toolbox_scores(model, x)
else:
    import segtorch
    seg = segtorch.load({name!r}, checkpoint=ckpt)
    before = hwm()
    out = seg.logits(x, **inference)
print(json.dumps({{"peak_mib": hwm(), "before_mib": before}}))
"""
# VmHWM (peak resident memory) is per address space: unlike ru_maxrss it does not carry over from the parent
HWM = r"""
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""


def case_memory(args, have_toolbox: bool) -> None:
    print(f"\n== memory: {MEM_NAME}, 2048x1024 slide (crop 512x1024, stride 341x683), fresh processes ==")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(MEM_NAME, Path(tmp))
        result = {}
        for side in (["toolbox"] if have_toolbox else []) + ["segtorch"]:
            code = HWM + MEMORY_CHILD.format(bench=str(ROOT / "benchmarks"), side=side,
                                       ckpt=str(ckpt), name=MEM_NAME, threads=args.threads)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode:
                print(f"{side}: failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            result[side] = json.loads(out.stdout.strip().splitlines()[-1])
            r = result[side]
            print(f"{side:<9} peak RSS {r['peak_mib']:.0f} MiB (after loading {r['before_mib']:.0f} MiB; "
                  f"inference adds {r['peak_mib'] - r['before_mib']:.0f} MiB), {time.perf_counter() - t0:.0f} s")
    if len(result) == 2:
        print(f"peak ratio segtorch / toolbox: {result['segtorch']['peak_mib'] / result['toolbox']['peak_mib']:.2f} "
              f"(target <= 1.00)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compile on CPU)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print where segtorch's fp32 time goes, by operator")
    ap.add_argument("--onnx", action="store_true", help="also time onnxruntime (CPU) on the tta case")
    ap.add_argument("--cases", help="comma-separated, of tta, memory, gpu, exact (default: tta,memory on the CPU, "
                                    "gpu on a GPU)")
    ap.add_argument("--scale", type=float, default=1.0, help="the gpu and exact cases' sizes times this")
    args = ap.parse_args()
    default = "gpu" if torch.device(args.device).type == "cuda" else "tta,memory"
    cases = set((args.cases or default).split(","))
    if cases - {"tta", "memory", "gpu", "exact"}:
        ap.error(f"--cases {args.cases!r}: choose from tta, memory, gpu, exact")
    try:
        check_device(args.device, what="--device")
    except UsageError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; CPU: {describe_cpu()}; threads {args.threads}; device {args.device}")
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}")
    try:
        import ssseg  # noqa: F401
        have_toolbox = True
    except ImportError:
        have_toolbox = False
        print("the toolbox (ssseg) is not importable: its side and the ratios are skipped")
    if "tta" in cases:
        case_tta(args, have_toolbox)
    if args.onnx:
        case_onnx(args)
    if "memory" in cases and not args.skip_memory:
        if args.device == "cpu":
            case_memory(args, have_toolbox)
        else:
            print("\nmemory (peak resident memory of the CPU process): SKIPPED on a GPU; the gpu cases print "
                  "peak GPU memory")
    if "gpu" in cases:
        case_gpu(args, have_toolbox)
    if "exact" in cases:
        case_exact(args)


if __name__ == "__main__":
    main()
