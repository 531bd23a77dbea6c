"""Deployment side by side: eager PyTorch, onnxruntime and OpenVINO, float32 and int8, in one run.

    python benchmarks/deploy.py [--name pspnet_resnet50os8_ade20k] [--size 512] [--repeats 5] [--threads N]
                                [--calibration-images 8] [--skip-speed] [--skip-miou]

speed  ``--name`` (random weights, seeded) at ``--size`` x ``--size``, its card's whole-image procedure
       (``Segmenter.logits``) with each runner doing the forward passes: segtorch's eager model (its default fast
       path), the float32 export in onnxruntime and in OpenVINO, the static int8 export (QDQ, per-channel
       weights, calibrated on ``--calibration-images`` synthetic scenes through the card's preprocessing) in
       both. Runs interleaved (each runner once per round), medians; the int8/fp32 ratio per runtime; the
       operators onnxruntime's int8 session ran (its profile) and the CPU's flags (VNNI: u8s8 dot products).
miou   the demo model (its shipped weights) on its evaluation set (the generated shapes val split, 50 images):
       eager, float32 and int8 files in both runtimes; the int8 cost in mIoU points (target <= 0.5), the int8
       file calibrated on 16 images of the demo's train split.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

import segtorch  # noqa: E402
from segtorch import export as export_mod  # noqa: E402
from segtorch import quantize  # noqa: E402
from segtorch.inference.onnx_runtime import OnnxModel, OpenVinoModel  # noqa: E402
from segtorch.inference.precision import describe_cpu  # noqa: E402
from segtorch.segmenter import Segmenter  # noqa: E402

DEMO = "demo_pspnet_shapes"


def have_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def scene_inputs(card, count: int, size: int) -> tuple[list[Path], list[np.ndarray]]:
    """``count`` synthetic scenes at ``size`` written to a folder, and their calibration inputs."""
    from PIL import Image

    from segtorch.data.synthetic import make_scene

    folder = Path(tempfile.mkdtemp(prefix="segtorch-calibration-"))
    for i in range(count):
        Image.fromarray(make_scene("train", i, size)[0]).save(folder / f"{i:04d}.png")
    files = quantize.calibration_files(folder, count)
    return files, quantize.calibration_inputs(card, files)


def export_both(model, card, folder: Path, calibration: int, size: int) -> tuple[Path, Path]:
    """The checked float32 export, and its int8 version as ``segtorch export --quantize int8`` makes it."""
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    t0 = time.perf_counter()
    export_mod.export_model(model, card, fp32)
    _, inputs = scene_inputs(card, calibration, size)
    t1 = time.perf_counter()
    quantize.quantize_file(fp32, int8, inputs)
    check = quantize.check_int8(model, int8, inputs)
    print(f"  exported in {t1 - t0:.0f}s, quantized in {time.perf_counter() - t1:.0f}s ({len(inputs)} "
          f"calibration inputs); int8 vs float32 PyTorch on them: {check.agreement:.2%} labels agree, "
          f"scores' relative error {check.relative_error:.2e}", flush=True)
    return fp32, int8


def int8_kernels(path: Path, x: np.ndarray, threads: int | None) -> str:
    """The operators onnxruntime ran for the int8 file, by share of their time (from its profile)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"images": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    times: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values()) or 1
    return ", ".join(f"{op} {100 * t / total:.0f}%" for op, t in times.most_common(8))


def speed(args) -> None:
    from segtorch.models.builder import build_segmentation_model
    from segtorch.testing import seeded_input, seeded_state_dict

    card = segtorch.model_card(args.name)
    print(f"speed: {args.name} (random weights) at {args.size}x{args.size}, {torch.get_num_threads()} threads",
          flush=True)
    model = build_segmentation_model(card.architecture).eval()
    model.load_state_dict(seeded_state_dict(model.state_dict()))
    folder = Path(tempfile.mkdtemp(prefix="segtorch-deploy-"))
    # random weights: their labels say little about int8's accuracy (the miou part measures that)
    fp32, int8 = export_both(model, card, folder, args.calibration_images, args.size)
    weights = folder / "weights.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(weights))
    runners = {"eager PyTorch fp32": segtorch.load(args.name, checkpoint=weights),
               "onnxruntime fp32": Segmenter(OnnxModel(fp32, threads=args.threads), card),
               "onnxruntime int8": Segmenter(OnnxModel(int8, threads=args.threads), card)}
    if have_openvino():
        runners["OpenVINO fp32"] = Segmenter(OpenVinoModel(fp32, threads=args.threads), card)
        runners["OpenVINO int8"] = Segmenter(OpenVinoModel(int8, threads=args.threads), card)
    else:
        print("  OpenVINO: not installed (pip install 'segtorch[openvino]'), skipped")
    x = seeded_input((1, 3, args.size, args.size))
    times = collections.defaultdict(list)
    labels = {}
    for name, seg in runners.items():  # warm-up (first-run allocations, OpenVINO's shape compilation)
        labels[name] = seg.logits(x).argmax(1)
    for _ in range(args.repeats):
        for name, seg in runners.items():
            t0 = time.perf_counter()
            seg.logits(x)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["eager PyTorch fp32"])
    print(f"  {'runner':<20} {'median s':>9} {'vs eager':>9} {'labels = eager':>15}")
    for name, ts in times.items():
        agree = (labels[name] == labels["eager PyTorch fp32"]).float().mean().item()
        print(f"  {name:<20} {statistics.median(ts):9.3f} {base / statistics.median(ts):8.2f}x {agree:15.2%}")
    for runtime in ("onnxruntime", "OpenVINO"):
        if f"{runtime} int8" in times:
            ratio = statistics.median(times[f"{runtime} fp32"]) / statistics.median(times[f"{runtime} int8"])
            print(f"  int8 / fp32 speed in {runtime}: {ratio:.2f}x")
    print(f"  onnxruntime int8 operators by time: {int8_kernels(int8, x.numpy(), args.threads)}")


def miou(args) -> None:
    from segtorch.data.datasets import Shapes
    from segtorch.downloads import home
    from segtorch.evaluation.reproduce import evaluate_model

    card = segtorch.model_card(DEMO)
    root = str(Shapes.generate(home() / "data" / "shapes"))
    print(f"\nmIoU: {DEMO} (shipped weights) on its evaluation set ({root})", flush=True)
    from segtorch.api import model_with_weights

    model, _ = model_with_weights(card)
    folder = Path(tempfile.mkdtemp(prefix="segtorch-deploy-"))
    fp32, int8 = export_both(model, card, folder, 16, 192)
    runs = {"eager PyTorch fp32": (None, None), "onnxruntime fp32": (fp32, "onnxruntime"),
            "onnxruntime int8": (int8, "onnxruntime")}
    if have_openvino():
        runs.update({"OpenVINO fp32": (fp32, "openvino"), "OpenVINO int8": (int8, "openvino")})
    results = {}
    for name, (checkpoint, runtime) in runs.items():
        results[name] = evaluate_model(DEMO, root, checkpoint=checkpoint, runtime=runtime, device="cpu",
                                       progress=False).miou
    for name, value in results.items():
        print(f"  {name:<20} mIoU {value:6.2f}")
    for runtime in ("onnxruntime", "OpenVINO"):
        if f"{runtime} int8" in results:
            cost = results[f"{runtime} fp32"] - results[f"{runtime} int8"]
            print(f"  int8 cost in {runtime}: {cost:+.2f} mIoU points (target <= 0.5)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="pspnet_resnet50os8_ade20k")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="threads of every runner (default: all cores)")
    p.add_argument("--calibration-images", type=int, default=8)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-miou", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    if have_openvino():
        import openvino

        versions += f", OpenVINO {openvino.__version__}"
    print(f"CPU: {describe_cpu()}\n{versions}")
    if not args.skip_speed:
        speed(args)
    if not args.skip_miou:
        miou(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
