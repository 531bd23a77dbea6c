"""Time to a ready model in a fresh process: segtorch vs the SSSegmentation toolbox, side by side.

    python benchmarks/time_to_ready.py [--name pspnet_resnet101os8_ade20k] [--repeats 3]

Three fresh-process timings, interleaved, median of --repeats:
  torch     python -c "import torch"                                  (the floor)
  segtorch  import segtorch + segtorch.load(name): the weights from the cache (SEGTORCH_HOME, offline), as a
            one-image `segtorch predict` starts
  toolbox   import ssseg + BuildSegmentor + torch.load(.pth) + load_state_dict
Each process also times itself: how long its `import torch` took and how long the rest took until the model
was ready. "adds" is the median of that rest: what the library costs on top of `import torch`, free of the
run-to-run spread of `import torch` itself (0.6 s on some machines), which the whole-process times carry.
Weights are random (seeded), written once to a temporary folder in both formats, the safetensors file as the
cache's converted copy of the card's weights (with its sha256 record). Goals: "adds" at most 0.2 s; the
whole segtorch process at most 0.3 s longer than the torch one. Needs the toolbox
(`ssseg`) importable for the third column; without it that column is skipped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segtorch.argtypes import model_name, positive_int

ROOT = Path(__file__).resolve().parents[1]

SEGTORCH = """
import segtorch
seg = segtorch.load({name!r})
"""
TOOLBOX = """
import copy, json, torch
from ssseg.modules import BuildSegmentor
cfg = copy.deepcopy(json.load(open({configs!r}))["configs"][{name!r}]["segmentor_cfg"])
cfg["backbone"]["pretrained"] = False
cfg["norm_cfg"] = {{"type": "BatchNorm2d"}}
model = BuildSegmentor(cfg, mode="TEST")
model.load_state_dict(torch.load({path!r}, map_location="cpu", weights_only=True)["model"])
model.eval()
"""


TIMED = """
import time
_t0 = time.perf_counter()
import torch
_t1 = time.perf_counter()
{code}
print("after-torch", time.perf_counter() - _t1)
"""


def run(code: str, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(the whole process's wall time, the time it spent after `import torch` until its last line ran).
    Bytecode is written (and then read), as an installed package has it: PYTHONDONTWRITEBYTECODE in the
    environment would have every run compile the modules' sources again."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, **(env or {})}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", TIMED.format(code=code)], check=True, capture_output=True, text=True,
                         env=env)
    wall = time.perf_counter() - t0
    return wall, float(res.stdout.split("after-torch")[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", type=model_name, default="pspnet_resnet101os8_ade20k")
    ap.add_argument("--repeats", type=positive_int, default=3)
    args = ap.parse_args()
    import torch

    from segtorch.downloads import CachedFile
    from segtorch.files import sha256_file
    from segtorch.testing import UPSTREAM_DIR, seeded_state_dict

    import segtorch

    try:
        import ssseg  # noqa: F401
        have_toolbox = True
    except ImportError:
        have_toolbox = False
        print("toolbox (ssseg) not importable: its column is skipped")
    with tempfile.TemporaryDirectory() as tmp:
        pth, st = Path(tmp) / "model.pth", Path(tmp) / "model.safetensors"
        state = seeded_state_dict(segtorch.create_model(args.name, auxiliary=True).state_dict())
        torch.save({"cur_epoch": 1, "model": state}, pth)
        segtorch.convert(pth, st, name=args.name)
        home = Path(tmp) / "home"  # the cache, holding the card's converted weights as a first run leaves them
        cached = CachedFile(home / "converted" / f"{args.name}.safetensors")
        cached.file.parent.mkdir(parents=True)
        shutil.copyfile(st, cached.file)
        cached.record(sha256_file(cached.file))
        env = {"SEGTORCH_HOME": str(home), "SEGTORCH_OFFLINE": "1"}
        cases = {"torch": "",
                 "segtorch": SEGTORCH.format(name=args.name)}
        if have_toolbox:
            cases["toolbox"] = TOOLBOX.format(name=args.name, path=str(pth),
                                              configs=str(UPSTREAM_DIR / "upstream_configs.json"))
        times = {k: [] for k in cases}
        adds = {k: [] for k in cases}
        for code in cases.values():  # not counted: writes the bytecode and warms the file cache
            run(code, env)
        for _ in range(args.repeats):
            for key, code in cases.items():  # interleaved, so drifts hit every column alike
                wall, after_torch = run(code, env)
                times[key].append(wall)
                adds[key].append(after_torch)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_adds = {k: statistics.median(v) for k, v in adds.items()}
    from segtorch.inference.precision import describe_cpu

    print(f"CPU: {describe_cpu()}")
    print(f"model: {args.name}; fresh process, median of {args.repeats}")
    for key, value in med.items():
        print(f"  {key:<9} {value:6.2f} s whole process (runs: {', '.join(f'{t:.2f}' for t in times[key])}); "
              f"after import torch {med_adds[key]:.3f} s (runs: {', '.join(f'{t:.3f}' for t in adds[key])})")
    print(f"segtorch adds {med_adds['segtorch']:.2f} s to `import torch`, measured in the process (goal: at most "
          f"0.2 s); whole processes: {med['segtorch'] - med['torch']:+.2f} s (goal: at most +0.3 s)")
    if "toolbox" in med:
        print(f"ratio toolbox / segtorch: {med['toolbox'] / med['segtorch']:.2f}x whole processes (goal: at least "
              f"2.5x); {med_adds['toolbox'] / med_adds['segtorch']:.1f}x after import torch")


if __name__ == "__main__":
    main()
