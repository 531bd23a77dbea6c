"""Helpers to compare segtorch with the reference toolbox, shared by the tests and the benchmarks (as
``torch.testing`` is): deterministic random weights and inputs, the relative error, and (where the toolbox is
importable and this is a source checkout) the toolbox's own segmentor for a card.

Weights are never stored: ``seeded_tensor(name, shape)`` regenerates them anywhere from a generator seeded by
the name and shape, so the segtorch side can rebuild the exact state dict the reference used.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from pathlib import Path

import torch

# the toolbox's evaluated configs, copied into the repository (a source checkout; not in the wheel)
UPSTREAM_DIR = Path(__file__).resolve().parents[1] / "conversion" / "upstream"


def _generator(*parts) -> torch.Generator:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def seeded_tensor(name: str, shape, dtype=torch.float32) -> torch.Tensor:
    """A reproducible random value for parameter/buffer ``name`` of ``shape``, drawn as the toolbox's own
    initialisation draws it (it keeps PyTorch's defaults): convolution and linear weights uniform in
    +-1/sqrt(fan_in). Where that initialisation is a constant (norm scales 1, shifts 0, BatchNorm statistics
    0 and 1; zero position tables, tokens and memories) a seeded spread around it is drawn instead, so that a
    key loaded into the wrong place changes the output. Nothing is damped: deep sums (HRNet's fuse layers)
    grow as they do in the toolbox, and the tests hold the fast path to the float64 answer on them."""
    shape = tuple(shape)
    g = _generator(name, shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        t = torch.rand(shape, generator=g) + 0.5
    elif leaf == "running_mean":
        t = torch.randn(shape, generator=g) * 0.1
    elif len(shape) == 1 and leaf == "weight":  # norm scales
        t = torch.rand(shape, generator=g) + 0.5
    elif leaf == "bias":
        t = torch.randn(shape, generator=g) * 0.1
    elif len(shape) >= 2 and leaf.endswith("weight"):  # conv / linear (also attention's in_proj_weight)
        bound = 1.0 / math.sqrt(math.prod(shape[1:]))
        t = (torch.rand(shape, generator=g) * 2 - 1) * bound
    else:  # embeddings, tokens, memories, relative position tables, attention scales ...
        t = torch.randn(shape, generator=g) * 0.5
    return t.to(dtype)


def seeded_state_dict(template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every floating tensor of ``template`` replaced by its seeded value; integer buffers (indices,
    counters) kept as they are, since they are structural or unused at test time."""
    return {k: seeded_tensor(k, v.shape, v.dtype) if v.is_floating_point() else v.clone()
            for k, v in template.items()}


def seeded_input(shape, purpose: str = "input") -> torch.Tensor:
    return torch.randn(tuple(shape), generator=_generator(purpose, tuple(shape)))


@functools.lru_cache(maxsize=None)
def upstream_configs() -> dict:
    """The toolbox's config of every zoo checkpoint (``conversion/upstream/upstream_configs.json``)."""
    path = UPSTREAM_DIR / "upstream_configs.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the toolbox's configs come with a source checkout of segtorch")
    return json.loads(path.read_text())["configs"]


def reference_segmentor(name: str):
    """The toolbox's segmentor for ``name`` in test mode (BatchNorm2d in place of SyncBatchNorm, which
    has the same parameters but cannot run on one CPU process; no ImageNet download)."""
    from ssseg.modules import BuildSegmentor

    cfg = copy.deepcopy(upstream_configs()[name]["segmentor_cfg"])  # the toolbox edits configs in place
    cfg["backbone"]["pretrained"] = False
    if cfg.get("norm_cfg", {}).get("type") == "SyncBatchNorm":
        cfg["norm_cfg"] = {**cfg["norm_cfg"], "type": "BatchNorm2d"}
    model = BuildSegmentor(cfg, mode="TEST")
    return model.eval()


def reference_logits(model, x: torch.Tensor) -> torch.Tensor:
    from ssseg.modules.utils import SSSegInputStructure

    with torch.no_grad():
        return model(SSSegInputStructure(images=x, mode="TEST")).seg_logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# one checkpoint per decode-head family (on ResNet-50) and one per other backbone: what a device's parity check
# runs (tests/test_cuda.py, benchmarks/cuda_check.py)
FAMILY_CHECKPOINTS = ("pspnet_resnet50os8_ade20k", "upernet_resnet50os8_ade20k", "isnet_resnet50os8_ade20k",
                      "mcibi_deeplabv3_resnet50os8_ade20k", "idrnet_upernet_resnet50os8_ade20k",
                      "isnet_resnest101os8_ade20k", "mcibi_deeplabv3_hrnetv2w48_ade20k",
                      "mcibi_deeplabv3_vitlarge_ade20k", "idrnet_upernet_swinlarge_ade20k")


def device_fidelity(name: str, device: str | torch.device, shape=(1, 3, 97, 75),
                    precisions: tuple[str, ...] = ()) -> dict[str, float]:
    """How far ``name``'s scores on ``device`` are from the float64 answer, for weights drawn as the toolbox
    initialises them (``seeded_state_dict``) and a seeded input of ``shape``; the float64 answer and the
    yardstick are computed on the CPU. Relative errors, keyed:

    - ``cpu_fp32``: the CPU in float32, computed as the toolbox computes (no folding, NCHW): the yardstick;
    - ``fp32``: ``device`` in float32 without the fast path (``fuse_bn=False, channels_last=False``);
    - ``fp32_default``: ``device`` as ``load`` gives it by default (the per-backbone fast path);
    - for each of ``precisions`` (bf16, fp16): its error, and ``<precision>_agreement``, the % of pixels whose
      best class is the float64 answer's.

    The weights go through the user's path: a safetensors file, ``segtorch.load(name, checkpoint=...)``."""
    import tempfile

    from safetensors.torch import save_file

    from . import api

    device = torch.device(device)
    model = api.create_model(name)
    state = seeded_state_dict(model.state_dict())
    x = seeded_input(shape)
    with torch.inference_mode():
        model.load_state_dict(state)
        model.eval()
        exact = copy.deepcopy(model).double()(x.double())
        errors = {"cpu_fp32": relative_error(model(x), exact)}
    del model
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        runs = {"fp32": dict(fuse_bn=False, channels_last=False), "fp32_default": {}}
        runs.update({p: dict(precision=p) for p in precisions})
        for key, options in runs.items():
            seg = api.load(name, checkpoint=path, device=device, **options)
            with torch.inference_mode(), seg._autocast():
                out = seg._forward(x.to(device)).float().cpu()
            errors[key] = relative_error(out, exact)
            if key in precisions:
                errors[f"{key}_agreement"] = 100.0 * (out.argmax(1) == exact.argmax(1)).double().mean().item()
            del seg
    return errors
