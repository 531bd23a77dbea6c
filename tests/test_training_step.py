"""One training step equals the toolbox's TRAIN step (issue 15).

For one checkpoint of every family and backbone kind: the toolbox's segmentor (eb1878c1) and segtorch's model
(``segtorch.load(name, checkpoint=..., auxiliary=True, fuse_bn=False).model``) get the same seeded weights and
training state (MCIBI's memory with some slots still empty, IDRNet's relations, representations and
selection counts), the same batch and the same Python/torch seeds; BatchNorm in training mode, dropout off.
One step: every loss part and the total, every parameter's gradient and every buffer afterwards must agree.

Both sides run in float64. In float32 the step is ill-conditioned with these random weights (train-mode
BatchNorm over few pixels, IDRNet's attention over class contexts): the toolbox's own gradients move by up to
2% between one and two CPU threads, so a float32 comparison would test the machine's rounding, not the logic.

Two sources of truth:
- live (marked ``reference``): the toolbox in this environment, when its training code is eb1878c1's (the
  sources' sha256 recorded with the fixtures says so); full tensors are compared;
- recorded (tests/fixtures/training/, written by record_training.py): the toolbox's losses and buffers of the
  families' own state (memory, relations, representations, counts) in full; for each gradient and each other
  buffer its norm and NUM_PROJECTIONS random projections regenerated from seeds (``projections``). Storing
  every gradient of ResNet-50 models would take hundreds of MB; a projection check is weaker than a full
  comparison: an error of relative size e moves a projection by about e * |g| * z / sqrt(n) (z of unit
  variance), and the check allows PROJECTION_SIGMAS * 1e-3 * |g| / sqrt(n). One parameter's gradient wrong by
  1e-2 (relative) escapes all four projections with probability ~8%, by 4e-2 with ~0.2%; smaller errors are
  left to the live test, which compares full tensors.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import segtorch
from parity import seeded_input, seeded_state_dict, seeded_tensor, upstream_configs

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "training"
# (case id, checkpoint, epoch given to the step, slow)
CASES = [
    ("pspnet_resnet50os8_ade20k", 1, False),
    ("upernet_resnet50os8_ade20k", 1, False),
    ("isnet_resnet50os8_ade20k", 1, False),
    ("isnet_resnest101os8_ade20k", 1, True),
    ("mcibi_deeplabv3_resnet50os8_ade20k", 1, False),
    ("mcibi_deeplabv3_resnet50os8_ade20k", 2, False),
    ("mcibi_deeplabv3_hrnetv2w48_cityscapes", 2, True),  # HRNet with the MCIBI stem and a strided downsample
    ("idrnet_fcn_resnet50os8_ade20k", 1, False),
    ("idrnet_ppm_resnet50os8_ade20k", 1, False),
    ("idrnet_aspp_resnet50os8_ade20k", 1, False),
    ("idrnet_upernet_resnet50os8_ade20k", 1, False),
]
BATCH, SIZE = 2, 64
DTYPE = torch.float64
LEARNING_RATE = 0.007
SEED = 20240615
NUM_PROJECTIONS = 4
PROJECTION_SIGMAS = 4.0
LOSS_TOLERANCE, GRAD_TOLERANCE, BUFFER_TOLERANCE = 1e-4, 1e-3, 1e-4
# gradients are compared relative to max(|g|, GRAD_FLOOR * |all gradients|): some are zero in exact arithmetic
# (a bias before train-mode BatchNorm, e.g. ResNeSt's split-attention fc1) and hold only round-off, 1e-21 of the
# whole; the smallest real ones are ~1e-6 of it
GRAD_FLOOR = 1e-9
# the families' own training state: compared in full, also against the fixtures
FAMILY_STATE = ("memory_module.memory", "class_relations_mean", "class_relations_var", "dl_cls_representations",
                "selected_classes_counter")
# the toolbox files whose TRAIN behaviour is recorded (their sha256 decides whether the live test can run)
TOOLBOX_SOURCES = ("modules/models/segmentors/base/base.py", "modules/models/segmentors/mcibi/mcibi.py",
                   "modules/models/segmentors/mcibi/memory.py", "modules/models/segmentors/idrnet/idrnet.py",
                   "modules/models/segmentors/isnet/isnet.py", "modules/models/losses/crossentropyloss.py",
                   "modules/models/losses/functions.py")


def case_id(name: str, epoch: int) -> str:
    return f"{name}@epoch{epoch}"


def _params():
    return [pytest.param(n, e, id=case_id(n, e), marks=[pytest.mark.slow] if slow else []) for n, e, slow in CASES]


# ---- the shared inputs --------------------------------------------------------------------------------------
def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images and labels: blocks of a few classes, an unlabelled block (-100) and one single-pixel
    class (IDRNet's variance update needs two pixels or more)."""
    num_classes = upstream_configs()[name]["segmentor_cfg"]["num_classes"]
    images = seeded_input((BATCH, 3, SIZE, SIZE), "training images")
    g = torch.Generator().manual_seed(SEED)
    classes = torch.randperm(num_classes, generator=g)[:6]
    blocks = classes[torch.randint(0, 5, (BATCH, SIZE // 16, SIZE // 16), generator=g)]
    labels = blocks.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2).clone()
    labels[0, :16, :16] = -100
    labels[1, 40, 40] = classes[5]
    return images, labels


def training_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Seeded weights, with training state that exercises every branch: MCIBI memory slots of even classes
    empty (first use), positive IDRNet selection counts."""
    state = seeded_state_dict(state)
    for key in state:
        if key.endswith("memory_module.memory"):
            state[key][0::2] = 0
        if key.endswith("selected_classes_counter"):
            state[key] = seeded_tensor(key + "|positive", state[key].shape).abs() * 4 + 1e-6
    return state


def _no_dropout(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


# ---- the two sides ---------------------------------------------------------------------------------------
def reference_step(name: str, epoch: int, make_batch=batch, make_state=training_state) -> dict:
    """The toolbox's step: {"parts": {name: float}, "total": float, "grads": {..}, "buffers": {..},
    "initial": the state before the step (toolbox layout)}."""
    from ssseg.modules import BuildSegmentor
    from ssseg.modules.utils import SSSegInputStructure

    cfg = copy.deepcopy(upstream_configs()[name]["segmentor_cfg"])
    cfg["backbone"]["pretrained"] = False
    if cfg.get("norm_cfg", {}).get("type") == "SyncBatchNorm":
        cfg["norm_cfg"] = {**cfg["norm_cfg"], "type": "BatchNorm2d"}
    torch.manual_seed(0)
    model = BuildSegmentor(cfg, mode="TRAIN")
    initial = make_state(model.state_dict())
    model.load_state_dict(initial)
    _no_dropout(model.to(DTYPE))
    images, labels = make_batch(name)
    images = images.to(DTYPE)
    kwargs = {"learning_rate": LEARNING_RATE, "epoch": epoch} if cfg["type"] in ("MCIBI", "MCIBIPlusPlus") else {}
    random.seed(SEED)
    torch.manual_seed(SEED)
    out = model(SSSegInputStructure(mode="TRAIN", images=images, seg_targets=labels), **kwargs)
    loss, log = out.loss, dict(out.losses_log_dict)
    loss.backward()
    total = log.pop("loss_total")
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    buffers = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in grads}
    return {"parts": log, "total": total, "loss": loss.item(), "grads": grads, "buffers": buffers,
            "initial": initial}


def segtorch_step(name: str, epoch: int, initial: dict[str, torch.Tensor], tmp_path, make_batch=batch) -> dict:
    """segtorch's step from the toolbox's initial state (converted as a user would)."""
    from segtorch.registry import model_card
    from segtorch.train import training_losses

    src = tmp_path / "toolbox.pth"
    torch.save({"model": initial}, src)
    dst = tmp_path / f"{name}.safetensors"
    segtorch.convert(src, dst, name=name, auxiliary=True)
    # all training state, IDRNet's selection counts included, travels through the file as a user's would
    model = segtorch.load(name, checkpoint=dst, auxiliary=True, fuse_bn=False).model
    _no_dropout(model.to(DTYPE))
    images, labels = make_batch(name)
    images = images.to(DTYPE)
    random.seed(SEED)
    torch.manual_seed(SEED)
    total, parts = training_losses(model, images, labels, card=model_card(name), learning_rate=LEARNING_RATE,
                                   epoch=epoch)
    total.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({k: v.detach().clone() for k, v in model.named_buffers()})
    return {"parts": {k: v.item() for k, v in parts.items()}, "total": total.item(), "grads": grads,
            "buffers": {k: v for k, v in state.items() if k not in grads}}


# ---- compact records -------------------------------------------------------------------------------------
def projections(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """[norm, p_1, ..., p_k]: ``p_i = u_i^T T v_i / sqrt(n)`` with the tensor laid out (zero-padded) as an
    a x b matrix T and Gaussian u_i, v_i regenerated from ``name``. Like a projection on a random unit vector
    (an error E moves it by about |E| / sqrt(n)), at the cost of a + b random numbers instead of n."""
    flat = tensor.detach().double().flatten()
    n = flat.numel()
    a = math.isqrt(max(n - 1, 0)) + 1
    b = -(-n // a)
    matrix = torch.cat([flat, flat.new_zeros(a * b - n)]).reshape(a, b)
    out = [flat.norm()]
    for i in range(NUM_PROJECTIONS):
        u = seeded_input((a,), f"projection|{name}|{i}|rows").double()
        v = seeded_input((b,), f"projection|{name}|{i}|columns").double()
        out.append(u @ matrix @ v / math.sqrt(n))
    return torch.stack(out)


def is_family_state(key: str) -> bool:
    return key.endswith(FAMILY_STATE)


def toolbox_sources_sha256() -> str | None:
    try:
        import ssseg
    except ImportError:
        return None
    root = Path(ssseg.__file__).parent
    h = hashlib.sha256()
    for rel in TOOLBOX_SOURCES:
        path = root / rel
        if not path.is_file():
            return None
        h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.norm() > 0 else a.norm().item()


def _check_losses(ours: dict, parts: dict[str, float], total: float) -> None:
    assert sorted(ours["parts"]) == sorted(parts)
    for key, value in parts.items():
        assert abs(ours["parts"][key] - value) <= LOSS_TOLERANCE * abs(value), (key, ours["parts"][key], value)
    assert abs(ours["total"] - total) <= LOSS_TOLERANCE * abs(total), (ours["total"], total)


# ---- recorded ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,epoch", _params())
def test_training_step_recorded(name, epoch, tmp_path):
    from safetensors import safe_open

    fixture = FIXTURES / f"{case_id(name, epoch)}.safetensors"
    if not fixture.exists():
        pytest.fail(f"no recorded toolbox step for {case_id(name, epoch)}: run tests/fixtures/training/"
                    f"record_training.py")
    with safe_open(str(fixture), framework="pt") as f:
        meta = f.metadata()
        recorded = {k: f.get_tensor(k) for k in f.keys()}
    layout = json.loads(meta["initial_state"])
    initial = training_state({k: torch.zeros(s, dtype=getattr(torch, d)) for k, (s, d) in layout.items()})
    ours = segtorch_step(name, epoch, initial, tmp_path)
    _check_losses(ours, json.loads(meta["parts"]), float(meta["total"]))

    grads = {k[len("grad/"):]: v for k, v in recorded.items() if k.startswith("grad/")}
    assert sorted(ours["grads"]) == sorted(grads), "parameters with a gradient differ from the toolbox's"
    floor = GRAD_FLOOR * math.sqrt(sum(ref[0].item() ** 2 for ref in grads.values()))
    for key, ref in grads.items():
        _check_projection(key, projections(key, ours["grads"][key]), ref, ours["grads"][key].numel(), GRAD_TOLERANCE,
                          floor)
    for key, ref in recorded.items():
        if key.startswith("buffer/"):
            key = key[len("buffer/"):]
            assert _relative(ours["buffers"][key], ref) <= BUFFER_TOLERANCE, key
        elif key.startswith("bufproj/"):
            key = key[len("bufproj/"):]
            t = ours["buffers"][key]
            _check_projection(key, projections(key, t), ref, t.numel(), BUFFER_TOLERANCE)


def _check_projection(key: str, ours: torch.Tensor, ref: torch.Tensor, n: int, tolerance: float,
                      floor: float = 0.0) -> None:
    norm = max(ref[0].item(), floor)
    assert abs(ours[0].item() - ref[0].item()) <= tolerance * norm + 1e-30, f"{key}: norm {ours[0].item()} vs {ref[0]}"
    spread = PROJECTION_SIGMAS * tolerance * norm / math.sqrt(n)
    assert (ours[1:] - ref[1:]).abs().max().item() <= spread + 1e-30, f"{key}: projections {ours[1:]} vs {ref[1:]}"


# ---- live --------------------------------------------------------------------------------------------------
def _recorded_sources() -> str | None:
    path = FIXTURES / "toolbox_sources.sha256"
    return path.read_text().strip() if path.exists() else None


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("name,epoch", _params())
def test_training_step_live(name, epoch, tmp_path):
    current = toolbox_sources_sha256()
    if current is None or current != _recorded_sources():
        pytest.skip("the importable toolbox's training code is not eb1878c1's (or it is not installed)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ref = reference_step(name, epoch)
    ours = segtorch_step(name, epoch, ref["initial"], tmp_path)
    _check_losses(ours, ref["parts"], ref["total"])
    assert abs(ref["loss"] - ref["total"]) <= LOSS_TOLERANCE * abs(ref["total"])
    assert sorted(ours["grads"]) == sorted(ref["grads"]), "parameters with a gradient differ from the toolbox's"
    floor = GRAD_FLOOR * math.sqrt(sum(g.double().norm().item() ** 2 for g in ref["grads"].values()))
    for key, g in ref["grads"].items():
        error = (ours["grads"][key].double() - g.double()).norm().item()
        assert error <= GRAD_TOLERANCE * max(g.double().norm().item(), floor), (key, error, g.norm().item())
    for key, b in ref["buffers"].items():
        assert key in ours["buffers"], key
        assert _relative(ours["buffers"][key], b) <= BUFFER_TOLERANCE, (key, _relative(ours["buffers"][key], b))


# ---- IDRNet's class relations, every dataset ----------------------------------------------------------------
# One config per dataset and coarse-context kind: self-attention refiner after (ASPP, Cityscapes) or before
# (COCO-Stuff-10k) the coarse context, stage 1 on the bottleneck (PPM, Cityscapes), FPNs (UPerNet), none (FCN, LIP's
# PPM). PASCAL-Context-59's only IDRNet is Swin-L (a float64 step of it does not fit this test's budget).
IDRNET_CASES = ["idrnet_aspp_resnet50os8_cityscapes", "idrnet_ppm_resnet50os8_cityscapes",
                "idrnet_aspp_resnet50os8_cocostuff10k", "idrnet_upernet_resnet50os8_cocostuff10k",
                "idrnet_ppm_resnet50os8_lip", "idrnet_upernet_resnet50os8_lip", "idrnet_fcn_resnet50os8_ade20k"]
ODD_SIZE = (97, 129)


def odd_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 97x129 images (feature maps of 13x17): blocks of five classes cut by the border, an unlabelled band
    across both images and a single-pixel class."""
    num_classes = upstream_configs()[name]["segmentor_cfg"]["num_classes"]
    h, w = ODD_SIZE
    images = seeded_input((BATCH, 3, h, w), "training images")
    g = torch.Generator().manual_seed(SEED + 1)
    classes = torch.randperm(num_classes, generator=g)[:6]
    blocks = classes[torch.randint(0, 5, (BATCH, h // 16 + 1, w // 16 + 1), generator=g)]
    labels = blocks.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)[:, :h, :w].clone()
    labels[:, 40:51] = -100
    labels[1, 70, 70] = classes[5]
    return images, labels


def randomised_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Seeded weights, relations and representations (relations of both signs), selection counts in [1, 5]."""
    state = training_state(state)
    for key in state:
        if key.endswith("selected_classes_counter"):
            state[key] = 1 + 4 * seeded_tensor(key + "|1-5", state[key].shape).abs().clamp(max=1)
    return state


def test_idrnet_selection_counts_travel_with_the_file(tmp_path):
    """The toolbox saves the selection counts with the weights; a converted or loaded file that holds them gives
    them to the model (the next intervention draws depend on them), one without them gives a fresh model's."""
    name = "idrnet_fcn_resnet50os8_cityscapes"
    state = seeded_state_dict(segtorch.create_model(name, auxiliary=True).state_dict())
    counts = 1 + 4 * torch.rand(19, generator=torch.Generator().manual_seed(SEED))
    torch.save({"model": {**state, "selected_classes_counter": counts}}, tmp_path / "with.pth")
    segtorch.convert(tmp_path / "with.pth", tmp_path / "with.safetensors", name=name, auxiliary=True)
    for path in ("with.pth", "with.safetensors"):
        model = segtorch.load(name, checkpoint=tmp_path / path, auxiliary=True, fuse_bn=False).model
        assert torch.equal(model.selected_classes_counter, counts), path
    torch.save({"model": state}, tmp_path / "without.pth")
    model = segtorch.load(name, checkpoint=tmp_path / "without.pth").model
    assert torch.equal(model.selected_classes_counter, torch.full((19,), 1e-6))
    torch.save({"model": {**state, "selected_classes_counter": counts[:5]}}, tmp_path / "other.pth")
    with pytest.raises(segtorch.CheckpointError, match="mis-shaped keys: selected_classes_counter"):
        segtorch.load(name, checkpoint=tmp_path / "other.pth")


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("name", IDRNET_CASES)
def test_idrnet_relations_live(name, tmp_path):
    """Every dataset's IDRNet, from randomised training state: the intervention pass and the relation,
    representation and count updates equal the toolbox's, not only the losses and gradients."""
    current = toolbox_sources_sha256()
    if current is None or current != _recorded_sources():
        pytest.skip("the importable toolbox's training code is not eb1878c1's (or it is not installed)")
    ref = reference_step(name, 1, odd_batch, randomised_state)
    counts = ref["initial"]["selected_classes_counter"]
    assert 1 <= counts.min() and counts.max() <= 5 and (counts - counts.round()).abs().max() > 0
    ours = segtorch_step(name, 1, ref["initial"], tmp_path, odd_batch)
    _check_losses(ours, ref["parts"], ref["total"])
    floor = GRAD_FLOOR * math.sqrt(sum(g.norm().item() ** 2 for g in ref["grads"].values()))
    for key, g in ref["grads"].items():
        assert (ours["grads"][key] - g).norm().item() <= GRAD_TOLERANCE * max(g.norm().item(), floor), key
    family = [key for key in ref["buffers"] if is_family_state(key)]
    assert len(family) == 4, family  # relations (mean, var), representations, selection counts
    for key in family:
        moved = _relative(ref["buffers"][key], ref["initial"][key].to(DTYPE))
        assert moved > 1e-6, f"{key}: the step changed nothing, so the comparison would prove nothing"
        assert _relative(ours["buffers"][key], ref["buffers"][key]) <= 1e-10, key


# ---- several processes ---------------------------------------------------------------------------------------
DDP_CASES = [("mcibi_deeplabv3_resnet50os8_ade20k", 2), ("idrnet_upernet_resnet50os8_ade20k", 1)]


def _family_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items()}
    state.update(dict(model.named_buffers()))
    return {k: v.detach().clone() for k, v in state.items() if is_family_state(k)}


def _half_step(name: str, epoch: int, checkpoint: Path, counter, rank: int) -> tuple[dict, dict]:
    """Process ``rank``'s batch through ``training_losses`` (the batch, mirrored for rank 1), seeded per process
    as the trainer seeds."""
    from segtorch.registry import model_card
    from segtorch.train import training_losses

    model = segtorch.load(name, checkpoint=checkpoint, auxiliary=True, fuse_bn=False).model
    if counter is not None:
        with torch.no_grad():
            model.selected_classes_counter.copy_(counter)
    _no_dropout(model.to(DTYPE))
    images, labels = batch(name)
    if rank == 1:
        images, labels = images.flip(-1), labels.flip(-1)
    random.seed(SEED + rank)
    torch.manual_seed(SEED + rank)
    total, parts = training_losses(model, images.to(DTYPE), labels,
                                   card=model_card(name), learning_rate=LEARNING_RATE, epoch=epoch)
    total.backward()
    return _family_state(model), {k: v.item() for k, v in parts.items()}


def _ddp_worker(rank: int, world: int, init_file: str, name: str, epoch: int, checkpoint: str, counter, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state, parts = _half_step(name, epoch, Path(checkpoint), counter, rank)
        torch.save({"state": state, "parts": parts}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name,epoch", [pytest.param(n, e, id=case_id(n, e)) for n, e in DDP_CASES])
def test_distributed_state_is_the_average_of_the_processes_updates(name, epoch, tmp_path):
    """Two processes (gloo), each its own batch: afterwards both hold the average of what each process's update
    alone gives (the toolbox divides by the world size and sums over processes), while each process's losses
    (MCIBI's memory loss included) are those of its own, not yet averaged, update."""
    import torch.multiprocessing as mp

    initial = training_state(_toolbox_layout(name))
    src, checkpoint = tmp_path / "toolbox.pth", tmp_path / f"{name}.safetensors"
    torch.save({"model": initial}, src)
    segtorch.convert(src, checkpoint, name=name, auxiliary=True)
    counter = initial.get("selected_classes_counter")
    alone = [_half_step(name, epoch, checkpoint, counter, rank) for rank in range(2)]
    out = tmp_path / "state"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), name, epoch, str(checkpoint), counter, str(out)),
             nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    expected = {k: (alone[0][0][k] / 2 + alone[1][0][k] / 2) for k in alone[0][0]}
    assert expected, "no family state found"
    for rank, result in enumerate(results):
        for key, value in expected.items():
            assert _relative(result["state"][key], value) <= 1e-12, (rank, key)
            assert _relative(alone[rank][0][key], value) > 1e-6, f"{key}: the processes' updates do not differ"
        assert result["parts"].keys() == alone[rank][1].keys()
        for key, value in alone[rank][1].items():
            assert abs(result["parts"][key] - value) <= 1e-12 * abs(value), (rank, key)


def _toolbox_layout(name: str) -> dict[str, torch.Tensor]:
    """The toolbox's state-dict layout of ``name`` (zeros), from the recorded fixture."""
    from safetensors import safe_open

    cases = [f for f in FIXTURES.glob(f"{name}@*.safetensors")]
    if not cases:
        pytest.fail(f"no recorded toolbox step for {name}: run tests/fixtures/training/record_training.py")
    with safe_open(str(cases[0]), framework="pt") as f:
        layout = json.loads(f.metadata()["initial_state"])
    return {k: torch.zeros(s, dtype=getattr(torch, d)) for k, (s, d) in layout.items()}


# ---- schedule ----------------------------------------------------------------------------------------------
# plain SGD; SGD with min_lr; a backbone lr multiplier (ViT-L); AdamW with no-decay rules and warm-up (Swin-L)
SCHEDULE_CASES = ["pspnet_resnet50os8_ade20k", "isnet_resnest101os8_ade20k", "mcibi_deeplabv3_vitlarge_ade20k",
                  "idrnet_upernet_swinlarge_ade20k"]
SCHEDULE_EPOCHS, SCHEDULE_ITERS_PER_EPOCH = 200, 100  # 20000 iterations
SCHEDULE_AT = [0, 1, 2, 5, 100, 1499, 1500, 1501, 10000, 19999]
SCHEDULES_FIXTURE = FIXTURES / "schedules.json"


def reference_schedule(name: str) -> dict:
    """The toolbox's optimizer and scheduler builders for ``name``: the scheduled rate at SCHEDULE_AT, and each
    trainable parameter's (lr / scheduled rate, weight decay) at the first iteration."""
    from ssseg.modules import BuildOptimizer, BuildScheduler, BuildSegmentor

    cfg = copy.deepcopy(upstream_configs()[name]["segmentor_cfg"])
    cfg["backbone"]["pretrained"] = False
    if cfg.get("norm_cfg", {}).get("type") == "SyncBatchNorm":
        cfg["norm_cfg"] = {**cfg["norm_cfg"], "type": "BatchNorm2d"}
    model = BuildSegmentor(cfg, mode="TRAIN")
    optimizer = BuildOptimizer(model, cfg["scheduler"]["optimizer"])
    scheduler_cfg = copy.deepcopy(cfg["scheduler"])
    scheduler_cfg.update(lr=cfg["scheduler"]["optimizer"]["lr"], iters_per_epoch=SCHEDULE_ITERS_PER_EPOCH,
                         params_rules=cfg["scheduler"]["optimizer"]["params_rules"], max_epochs=SCHEDULE_EPOCHS)
    scheduler = BuildScheduler(optimizer=optimizer, scheduler_cfg=scheduler_cfg)
    lrs = {}
    for it in SCHEDULE_AT:
        scheduler.cur_iter = it
        lrs[str(it)] = scheduler.updatelr()
    scheduler.cur_iter = 0
    first = scheduler.updatelr()
    names = {id(p): k for k, p in model.named_parameters()}
    default_wd = optimizer.defaults.get("weight_decay", 0.0)
    groups = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                groups[names[id(p)]] = [group["lr"] / first, group.get("weight_decay", default_wd)]
    return {"lrs": lrs, "groups": groups}


def segtorch_schedule(name: str) -> dict:
    from segtorch.models.builder import build_segmentation_model
    from segtorch.registry import model_card
    from segtorch.train import TrainConfig, build_optimizer
    from segtorch.train.optim import PolySchedule

    card = model_card(name)
    config = TrainConfig.from_card(card)
    with torch.device("meta"):
        model = build_segmentation_model(card.architecture, auxiliary=True)
    optimizer = build_optimizer(model, config.optimizer)
    schedule = PolySchedule.from_config(config.scheduler, config.optimizer["lr"],
                                        SCHEDULE_EPOCHS * SCHEDULE_ITERS_PER_EPOCH)
    lrs = {str(it): schedule.lr_at(it) for it in SCHEDULE_AT}
    first = schedule.apply(optimizer, 0)
    names = {id(p): k for k, p in model.named_parameters()}
    default_wd = optimizer.defaults.get("weight_decay", 0.0)
    groups = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            groups[names[id(p)]] = [group["lr"] / first, group.get("weight_decay", default_wd)]
    return {"lrs": lrs, "groups": groups, "clip": config.clip_grad}


def _check_schedule(ours: dict, ref: dict) -> None:
    for it, lr in ref["lrs"].items():
        assert ours["lrs"][it] == pytest.approx(lr, rel=1e-12, abs=1e-20), f"iteration {it}"
    assert sorted(ours["groups"]) == sorted(ref["groups"]), "the trainable parameters differ"
    for key, (lr_mult, wd) in ref["groups"].items():
        assert ours["groups"][key] == pytest.approx([lr_mult, wd], rel=1e-12, abs=1e-20), key


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if "large" in n else []) for n in
                                  SCHEDULE_CASES])
def test_schedule_recorded(name):
    recorded = json.loads(SCHEDULES_FIXTURE.read_text())
    ours = segtorch_schedule(name)
    _check_schedule(ours, recorded[name])
    assert ours["clip"] == recorded[name]["clip"]


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULE_CASES)
def test_schedule_live(name):
    if toolbox_sources_sha256() is None:
        pytest.skip("the toolbox is not importable")
    try:
        reference = reference_schedule(name)
    except Exception as e:  # noqa: BLE001 - an installed release older than eb1878c1 may not build this config
        pytest.skip(f"the installed toolbox cannot build {name}: {type(e).__name__}: {e}")
    _check_schedule(segtorch_schedule(name), reference)


def test_clipping_follows_the_toolbox_groups():
    """The toolbox clips each of its parameter groups: everything together without params_rules, every
    parameter on its own with them (one group per parameter)."""
    from segtorch.train import clip_gradients

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 10
             for i, p in enumerate(model.parameters())]
    for rules in ({}, {"0": {"lr_multiplier": 0.1}}):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        clip_gradients(model, {"params_rules": rules}, {"max_norm": 1.0, "norm_type": 2})
        clipped = [p.grad for p in model.parameters()]
        if rules:
            for c, g in zip(clipped, grads):
                assert c.norm().item() == pytest.approx(min(1.0, g.norm().item()), rel=1e-5)
        else:
            total = torch.cat([g.flatten() for g in grads]).norm()
            for c, g in zip(clipped, grads):
                torch.testing.assert_close(c, g / total, rtol=1e-5, atol=0)
