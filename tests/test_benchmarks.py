"""The benchmarks a GPU session runs, run here on the CPU at a small scale, so that their device code (both
sides on one device, synchronised timing, the cases of issue 17) does not first fail on a lent GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=600)


def _toolbox_importable() -> bool:
    try:
        import ssseg  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_speed_device_cases_run_on_the_cpu():
    out = run_benchmark("speed.py", "--device", "cpu", "--cases", "gpu", "--scale", "0.0625", "--repeats", "1")
    assert out.returncode == 0, out.stderr
    for title in ("cityscapes 1024x2048 slide", "ade20k 512x683 whole", "ade20k 512x683 slide + ms + flip"):
        assert f"== cpu: {title} (scale 0.0625" in out.stdout
    assert out.stdout.count("segtorch fp32") == 3
    if _toolbox_importable():
        assert out.stdout.count("toolbox fp32") == 3 and out.stdout.count("relative error to the toolbox") == 3
    from segtorch.inference.precision import cpu_supports_bf16

    assert out.stdout.count("agreement with fp32" if cpu_supports_bf16() else "reduced precision: SKIPPED") == 3


def test_speed_exact_case_runs_small():
    out = run_benchmark("speed.py", "--cases", "exact", "--scale", "0.0625", "--repeats", "1")
    assert out.returncode == 0, out.stderr
    assert "== exact: ade20k 512x683 slide + ms + flip (scale 0.0625: 32x40)" in out.stdout
    assert "ratio exact / default: " in out.stdout and "label agreement" in out.stdout


def test_speed_refuses_a_missing_gpu_and_unknown_cases():
    if not torch.cuda.is_available():
        out = run_benchmark("speed.py", "--device", "cuda")
        assert out.returncode == 2 and "torch sees no CUDA device" in out.stderr
    out = run_benchmark("speed.py", "--cases", "tta,fast")
    assert out.returncode == 2 and "--cases 'tta,fast'" in out.stderr


def test_cuda_check_runs_on_the_cpu():
    out = run_benchmark("cuda_check.py", "--device", "cpu", "--names", "pspnet_resnet50os8_ade20k")
    assert out.returncode == 0, out.stderr
    assert "pspnet_resnet50os8_ade20k" in out.stdout and "1 of 1 within 2x the CPU float32 error" in out.stdout
    if not torch.cuda.is_available():
        out = run_benchmark("cuda_check.py")
        assert out.returncode == 1 and "torch sees no CUDA device" in out.stderr


def test_fast_path_runs_and_its_default_names_exist():
    import runpy

    names = runpy.run_path(str(ROOT / "benchmarks" / "fast_path.py"))["NAMES"]  # not __main__: nothing runs
    from segtorch.registry import resolve_name

    for name in names:
        resolve_name(name)  # an unknown name raises
    out = run_benchmark("fast_path.py", "--repeats", "0", "--size", "33x41", "--names", "pspnet_resnet50os8_ade20k")
    assert out.returncode == 0, out.stderr
    assert "pspnet_resnet50os8_ade20k 33x41: plain NCHW error" in out.stdout
    assert out.stdout.count("x plain)") == 4


@pytest.mark.parametrize("script,args,message", [
    ("fast_path.py", ["--names", "pspnet_resnet50_ade20k"], "argument --names: unknown model 'pspnet_resnet50_ade20k'"),
    ("cuda_check.py", ["--size", "97x"], "argument --size: must be two positive integers written AxB"),
    ("time_to_ready.py", ["--name", "PSPNet"], "argument --name: 'PSPNet' is not a model name"),
    ("predict_throughput.py", ["--size", "640x0"], "argument --size: must be two positive integers written AxB"),
    ("predict_throughput.py", ["--repeat", "0"], "argument --repeat: must be a positive integer, got 0"),
])
def test_benchmarks_refuse_bad_arguments_in_one_line(script, args, message):
    out = run_benchmark(script, *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
