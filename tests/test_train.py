"""The trainer: the cards' schedule and losses, loss goes down, exact resume (after a crash or Ctrl-C), safe work
dirs, reproducible seeds, accumulation, DDP (gloo, 2 CPUs), and `segtorch train` end to end on the demo model."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from segtorch.cli import main
from segtorch.data import DatasetError, ImageFolderDataset, TrainingSet, build_transforms
from segtorch.errors import CheckpointError, UsageError
from segtorch.train import PolySchedule, TrainConfig, Trainer, build_optimizer, param_groups, segmentation_loss
from segtorch.train.workdir import default_workers, work_dir_lock

ROOT = Path(__file__).resolve().parents[1]
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])
NORMALIZE = {"type": "Normalize", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
PIPELINE = [{"type": "Resize", "output_size": [64, 32], "keep_ratio": True, "scale_range": [0.75, 1.5]},
            {"type": "RandomCrop", "crop_size": [32, 32], "one_category_max_ratio": 0.75},
            {"type": "RandomFlip", "prob": 0.5}, {"type": "PhotoMetricDistortion"}, NORMALIZE,
            {"type": "ToTensor"}, {"type": "Padding", "output_size": [32, 32], "data_type": "tensor"}]
LOSSES = {"loss_cls": {"type": "CrossEntropyLoss", "scale_factor": 1.0, "ignore_index": -100},
          "loss_aux": {"type": "CrossEntropyLoss", "scale_factor": 0.4, "ignore_index": -100}}
SGD = {"type": "SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def make_toy(root: Path, n: int = 8, size: int = 48) -> tuple[Path, Path]:
    """Images whose colour says the class (three regions split at random places), masks beside them."""
    for i in range(n):
        r = np.random.default_rng(i)
        label = np.zeros((size, size), np.uint8)
        label[:, r.integers(size // 4, 3 * size // 4):] = 1
        label[r.integers(size // 4, 3 * size // 4):, :] = 2
        image = np.clip(COLOURS[label] + r.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(label).save(root / "masks" / f"{i}.png")
    return root / "images", root / "masks"


TINY_MODEL = '''
def tiny_pspnet(num_classes=3, seed=0):
    """segtorch's own PSPNet on a narrow ResNet-50 (4 base channels), with an auxiliary head."""
    import torch
    from segtorch.models.backbones.resnet import ResNet
    from segtorch.models.segmentors.pspnet import PSPNet
    from segtorch.models.segmentors.base import auxiliary_decoder
    torch.manual_seed(seed)
    backbone = ResNet(depth=50, output_stride=8, base_channels=4, stem_channels=8)
    model = PSPNet(backbone, num_classes, in_channels=128, feats_channels=16, pool_scales=(1, 2),
                   selected_indices=(2, 3))
    model.set_auxiliary(auxiliary_decoder(64, 16, num_classes))
    return model
'''
exec(TINY_MODEL)  # defines tiny_pspnet here; the DDP test's worker script gets the same source


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores, shared: no oversubscription
    yield
    torch.set_num_threads(threads)


def toy_training_set(tmp_path, seed=0):
    images, masks = make_toy(tmp_path / "toy")
    dataset = ImageFolderDataset(images, masks, num_classes=3)
    return dataset, TrainingSet(dataset, build_transforms(PIPELINE), seed=seed)


# ---- optimisation facts -----------------------------------------------------------------------------------
class _Swinish(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone_net = nn.Module()
        self.backbone_net.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.backbone_net.patch = nn.Conv2d(3, 4, 1)
        self.backbone_net.norm0 = nn.LayerNorm(4)
        self.backbone_net.blocks = nn.ModuleList([nn.Module()])
        self.backbone_net.blocks[0].relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.decoder = nn.Conv2d(4, 2, 1)
        self.bn = nn.BatchNorm2d(2)


def _groups_by_param(groups):
    return {id(p): g for g in groups for p in g["params"]}


def test_param_groups_follow_the_rules():
    model = _Swinish()
    swin = {"type": "AdamW", "lr": 6e-5, "betas": [0.9, 0.999], "weight_decay": 0.01,
            "params_rules": {"absolute_pos_embed": {"wd_multiplier": 0.0}, "norm": {"wd_multiplier": 0.0},
                             "relative_position_bias_table": {"wd_multiplier": 0.0}}}
    by_param = _groups_by_param(param_groups(model, swin))
    b = model.backbone_net
    for p in (b.absolute_pos_embed, b.norm0.weight, b.norm0.bias, b.blocks[0].relative_position_bias_table):
        assert by_param[id(p)]["weight_decay"] == 0.0
    for p in (b.patch.weight, b.patch.bias, model.decoder.weight, model.bn.weight):  # "bn" does not contain "norm"
        assert by_param[id(p)]["weight_decay"] == 0.01 and by_param[id(p)]["lr"] == 6e-5
    optimizer = build_optimizer(model, swin)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    vit = {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0,
           "params_rules": {"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 1.0},
                            "backbone_net.norm": {"lr_multiplier": 0.5}}}  # the longest matching rule wins
    optimizer = build_optimizer(model, vit)
    by_param = _groups_by_param(optimizer.param_groups)
    assert by_param[id(b.patch.weight)]["lr"] == pytest.approx(0.001)
    assert by_param[id(b.norm0.weight)]["lr"] == pytest.approx(0.005)
    assert by_param[id(model.decoder.weight)]["lr"] == 0.01
    PolySchedule(lr=0.01, max_iters=10).apply(optimizer, 5)
    scheduled = PolySchedule(lr=0.01, max_iters=10).lr_at(5)
    assert by_param[id(b.patch.weight)]["lr"] == pytest.approx(0.1 * scheduled)
    assert len(param_groups(model, {"lr": 0.01, "weight_decay": 5e-4})) == 1  # no rules: one group


def _toolbox_poly():
    toolbox = pytest.importorskip("ssseg.modules.models.schedulers.polyscheduler",
                                  reason="the toolbox (ssseg) is not importable")
    return toolbox.PolyScheduler


@pytest.mark.reference
@pytest.mark.parametrize("cfg", [
    {"type": "PolyScheduler", "power": 0.9},
    {"type": "PolyScheduler", "power": 0.9, "min_lr": 1e-4},
    {"type": "PolyScheduler", "power": 1.0, "min_lr": 0.0, "warmup_cfg": {"iters": 15, "ratio": 1e-6, "type": "linear"}},
])
def test_poly_schedule_matches_the_toolbox(cfg):
    PolyScheduler = _toolbox_poly()
    param = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([param], lr=0.01)
    ref = PolyScheduler(optimizer=ref_opt, lr=0.01, max_epochs=5, iters_per_epoch=10,
                        **{k: v for k, v in cfg.items() if k != "type"})
    ours = PolySchedule.from_config(cfg, lr=0.01, max_iters=50)
    for iteration in range(50):
        assert ours.lr_at(iteration) == pytest.approx(ref.updatelr(), rel=1e-12, abs=0)
        ref.cur_iter += 1


def test_losses_resize_weight_and_ignore():
    torch.manual_seed(0)
    preds = {"loss_cls": torch.randn(2, 3, 4, 4, requires_grad=True), "loss_aux": torch.randn(2, 3, 4, 4)}
    labels = torch.randint(0, 3, (2, 16, 16))
    labels[:, :3] = -100
    total, parts = segmentation_loss(preds, labels, LOSSES)
    up = {k: F.interpolate(v, size=(16, 16), mode="bilinear", align_corners=False) for k, v in preds.items()}
    expected = F.cross_entropy(up["loss_cls"], labels) + 0.4 * F.cross_entropy(up["loss_aux"], labels)
    assert torch.allclose(total, expected) and set(parts) == {"loss_cls", "loss_aux"}
    ignored, _ = segmentation_loss({"loss_cls": preds["loss_cls"]}, torch.full((2, 16, 16), -100), LOSSES)
    assert ignored.item() == 0.0 and ignored.requires_grad
    with pytest.raises(KeyError, match="outputs \\['loss_x'\\]"):
        segmentation_loss({"loss_x": preds["loss_aux"]}, labels, LOSSES)


# ---- training runs ----------------------------------------------------------------------------------------
def test_training_lowers_the_loss_evaluates_and_exports(tmp_path):
    dataset, train = toy_training_set(tmp_path)
    config = TrainConfig(work_dir=str(tmp_path / "run"), max_iters=24, batch_size=2, num_workers=0, log_interval=4,
                         optimizer=SGD, losses=LOSSES, export_name="tiny")
    logs = []
    result = Trainer(tiny_pspnet(), train, config, val_set=dataset, log=logs.append).fit()
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    assert result["eval"]["num_images"] == 8 and 0 <= result["eval"]["miou"] <= 100
    assert any("lr" in line and "s/iter" in line and "img/s" in line for line in logs)
    run = tmp_path / "run"
    assert (run / "train.log").read_text().count("\n") == len(logs) and (run / "eval.jsonl").is_file()
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["name"] == "tiny" and f.metadata()["trained_iterations"] == "24"
    assert keys and not any(k.startswith("auxiliary_decoder.") for k in keys) and "ppm_net.bottleneck.0.weight" in keys
    ckpt = torch.load(run / "last.pth", map_location="cpu", weights_only=True)  # no pickled code needed
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "iteration"} <= set(ckpt) and ckpt["iteration"] == 24


def test_training_and_its_evaluation_run_under_the_toolbox_cuda_numerics(tmp_path, monkeypatch):
    """On a GPU the toolbox trains with TF32 off and cuDNN's autotuning on: every forward pass of training and of
    its evaluation runs inside those settings, and they are put back after. The settings are switched as for a
    GPU (that needs none) while the model computes on the CPU."""
    from segtorch.inference import precision as precision_mod

    real, asked = precision_mod.toolbox_cuda_numerics, []

    def as_on_a_gpu(device, cudnn_benchmark=None):
        asked.append((torch.device(device).type, cudnn_benchmark))
        return real("cuda", cudnn_benchmark)

    def switches():
        return tuple(getattr(o, n) for o, n, _ in precision_mod._tf32_switches()) + (torch.backends.cudnn.benchmark,)

    monkeypatch.setattr(precision_mod, "toolbox_cuda_numerics", as_on_a_gpu)
    off = tuple(v for _, _, v in precision_mod._tf32_switches()) + (True,)
    before = switches()
    dataset, train = toy_training_set(tmp_path)
    model, seen = tiny_pspnet(), []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # training calls the parts
    first_conv.register_forward_hook(lambda module, args, out: seen.append((module.training, switches())))
    config = TrainConfig(work_dir=str(tmp_path / "run"), max_iters=2, batch_size=2, num_workers=0, optimizer=SGD,
                         losses=LOSSES)
    Trainer(model, train, config, val_set=dataset).fit()
    assert {training for training, _ in seen} == {True, False}  # training steps and the evaluation
    assert {state for _, state in seen} == {off}
    assert set(asked) == {("cpu", True)} and switches() == before


def test_a_training_device_this_machine_lacks_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without a GPU
    _, train = toy_training_set(tmp_path)
    config = TrainConfig(work_dir=str(tmp_path / "run"), max_iters=1, batch_size=2, num_workers=0, optimizer=SGD,
                         losses=LOSSES, device="cuda")
    with pytest.raises(UsageError, match="device 'cuda': torch sees no CUDA device on this machine .*; use cpu"):
        Trainer(tiny_pspnet(), train, config)
    assert not (tmp_path / "run").exists()


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path):
    _, train = toy_training_set(tmp_path, seed=5)

    def config(name):  # 4 iterations per epoch; checkpoints every 3 iterations and at epoch ends
        return TrainConfig(work_dir=str(tmp_path / name), max_iters=10, batch_size=2, num_workers=0, log_interval=5,
                           save_interval=3, optimizer=SGD, losses=LOSSES, seed=5)

    straight = Trainer(tiny_pspnet(), train, config("straight"), log=lambda _: None)
    straight.fit()

    def interrupt(trainer):
        if trainer.iteration == 7:  # mid-epoch; the last checkpoint is from iteration 6
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(tiny_pspnet(), train, config("resumed"), callbacks=[interrupt], log=lambda _: None).fit()
    assert torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["iteration"] == 6
    with pytest.raises(UsageError, match=r"resumed holds the checkpoint of an earlier run; continue it with --resume"):
        Trainer(tiny_pspnet(), train, config("resumed"), log=lambda _: None).fit()  # never implicitly
    logs = []
    resumed = Trainer(tiny_pspnet(seed=1), train, dataclasses.replace(config("resumed"), resume=True),
                      log=logs.append)  # another init: overwritten
    resumed.fit()
    assert "resumed from" in logs[0] and "at iteration 6" in logs[0]
    _assert_same_training_state(straight, resumed)


def _assert_same_training_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # bit for bit
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"]) for i in oa)


def test_ctrl_c_writes_a_checkpoint_at_the_iteration_reached_and_resumes_exactly(tmp_path):
    """The first Ctrl-C lets the iteration finish, writes last.pth there (not at the last save), says where and
    stops; resuming then gives the weights of an uninterrupted run. A second Ctrl-C stops at once."""
    _, train = toy_training_set(tmp_path, seed=3)

    def config(name, **kw):  # 4 iterations per epoch, no checkpoint between epoch ends
        return TrainConfig(work_dir=str(tmp_path / name), max_iters=6, batch_size=2, num_workers=0, optimizer=SGD,
                           losses=LOSSES, seed=3, **kw)

    straight = Trainer(tiny_pspnet(), train, config("straight"), log=lambda _: None)
    straight.fit()

    def ctrl_c(trainer):
        if trainer.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    logs = []
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_pspnet(), train, config("stopped"), callbacks=[ctrl_c], log=logs.append).fit()
    assert torch.load(tmp_path / "stopped" / "last.pth", weights_only=True)["iteration"] == 2
    assert logs[-1] == (f"interrupted at iteration 2/6: resumable checkpoint {tmp_path / 'stopped' / 'last.pth'} "
                        f"(continue with --resume --work-dir {tmp_path / 'stopped'})")
    assert (tmp_path / "stopped" / "train.log").read_text().splitlines()[-1] == logs[-1]
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    resumed = Trainer(tiny_pspnet(seed=1), train, config("stopped", resume=True), log=lambda _: None)
    resumed.fit()
    _assert_same_training_state(straight, resumed)

    def ctrl_c_twice(trainer):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_pspnet(), train, config("aborted"), callbacks=[ctrl_c_twice], log=lambda _: None).fit()
    assert not (tmp_path / "aborted" / "last.pth").exists()  # stopped at once, no checkpoint written


def test_resuming_with_other_settings_is_refused_in_one_line(tmp_path):
    _, train = toy_training_set(tmp_path)
    config = TrainConfig(work_dir=str(tmp_path / "run"), max_iters=2, batch_size=2, num_workers=0, optimizer=SGD,
                         losses=LOSSES, log_interval=1)
    Trainer(tiny_pspnet(), train, config, log=lambda _: None).fit()
    before = (tmp_path / "run" / "last.pth").read_bytes()
    other = dataclasses.replace(config, resume=True, optimizer={**SGD, "lr": 0.1}, max_iters=4)
    with pytest.raises(UsageError, match=r"run/last\.pth was written with other settings \(max_iters 2 -> 4; "
                                         r"optimizer\.lr 0\.05 -> 0\.1\): resume with the same settings"):
        Trainer(tiny_pspnet(), train, other, log=lambda _: None).fit()
    # where it runs and how it reports may change
    same = dataclasses.replace(config, resume=True, log_interval=5, device="cpu", num_workers=1)
    assert Trainer(tiny_pspnet(), train, same, log=lambda _: None).fit()["iteration"] == 2
    with pytest.raises(UsageError, match=r"nothing to resume: .*fresh/last\.pth does not exist"):
        Trainer(tiny_pspnet(), train, dataclasses.replace(config, resume=True, work_dir=str(tmp_path / "fresh"))).fit()
    (tmp_path / "run" / "last.pth").write_bytes(before[:100])
    with pytest.raises(CheckpointError, match="cannot resume from this checkpoint"):
        Trainer(tiny_pspnet(), train, dataclasses.replace(config, resume=True), log=lambda _: None).fit()


def test_a_work_dir_in_use_is_refused(tmp_path):
    """A second training run on a work dir in use (here: held by another process) is refused at once."""
    _, train = toy_training_set(tmp_path)
    work = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                               "from segtorch.train.workdir import work_dir_lock\n"
                               f"with work_dir_lock({str(work)!r}):\n print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = TrainConfig(work_dir=str(work), max_iters=1, batch_size=2, num_workers=0, optimizer=SGD,
                             losses=LOSSES)
        with pytest.raises(UsageError, match=rf"run is in use by another training run \(pid {holder.pid}\); wait"):
            Trainer(tiny_pspnet(), train, config, log=lambda _: None).fit()
        assert not (work / "last.pth").exists()
    finally:
        holder.communicate("", timeout=30)
    with work_dir_lock(work), work_dir_lock(work):  # free again; re-entrant within a process
        pass


def test_default_workers_fit_the_machine(monkeypatch):
    for cpus, processes, expected in ((1, 1, 0), (2, 1, 1), (16, 1, 4), (16, 8, 1), (8, 8, 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert default_workers() == expected, (cpus, processes)


class _PlainNet(nn.Module):
    """No BatchNorm, no dropout: a batch of 4 and two accumulated batches of 2 are the same step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        return self.body(x)


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    images, masks = make_toy(tmp_path / "toy", size=16)
    train = TrainingSet(ImageFolderDataset(images, masks, num_classes=3), build_transforms([NORMALIZE, {"type": "ToTensor"}]))
    models = []
    for batch, accumulate in ((4, 1), (2, 2)):
        config = TrainConfig(work_dir=str(tmp_path / f"b{batch}"), max_iters=4, batch_size=batch, accumulate=accumulate,
                             num_workers=0, optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9}, losses=LOSSES)
        trainer = Trainer(_PlainNet(), train, config, log=lambda _: None)
        assert trainer.iters_per_epoch == 2
        trainer.fit()
        models.append(trainer.model.state_dict())
    assert all(torch.allclose(models[0][k], models[1][k], atol=1e-6) for k in models[0])


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    images, masks = make_toy(tmp_path / "toy", size=16)
    train = TrainingSet(ImageFolderDataset(images, masks, num_classes=3), build_transforms([NORMALIZE, {"type": "ToTensor"}]))
    work = tmp_path / "run"
    trainer = Trainer(_PlainNet(), train, TrainConfig(work_dir=str(work), max_iters=2, batch_size=4, num_workers=0,
                                                      losses=LOSSES), log=lambda _: None)
    trainer.fit()
    before = (work / "last.pth").read_bytes()

    def disk_full(obj, f):  # torch.save takes a path or a file object
        with contextlib.nullcontext(f) if hasattr(f, "write") else open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    trainer.iteration = 3
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint()
    assert (work / "last.pth").read_bytes() == before and not list(work.glob(".*tmp"))  # old one intact, no debris


DDP_WORKER = '''
import os, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from segtorch.data import ImageFolderDataset, TrainingSet, build_transforms
from segtorch.train import TrainConfig, Trainer
{model}
pipeline, losses, sgd = {pipeline!r}, {losses!r}, {sgd!r}
dataset = ImageFolderDataset({images!r}, {masks!r}, num_classes=3)
config = TrainConfig(work_dir={work!r}, max_iters=4, batch_size=2, num_workers=0, log_interval=2, optimizer=sgd,
                     losses=losses)
trainer = Trainer(tiny_pspnet(seed=int(os.environ["RANK"])), TrainingSet(dataset, build_transforms(pipeline)), config,
                  val_set=dataset)
result = trainer.fit()
params = {{k: v.detach() for k, v in trainer.model.named_parameters()}}
torch.save({{"params": params, "seen": [i for i, _ in trainer.sampler], "miou": result["eval"]["miou"]}},
           os.path.join({work!r}, f"rank{{trainer.rank}}.pt"))


def ctrl_c_on_rank_1(trainer):  # the other process must stop at the same iteration
    if trainer.rank == 1 and trainer.iteration == 1:
        import signal
        os.kill(os.getpid(), signal.SIGINT)


config = TrainConfig(max_iters=4, batch_size=2, num_workers=0, optimizer=sgd, losses=losses, export_name="tiny")
stopped = Trainer(tiny_pspnet(), TrainingSet(dataset, build_transforms(pipeline)), config, callbacks=[ctrl_c_on_rank_1])
try:
    stopped.fit()
except KeyboardInterrupt:
    torch.save({{"iteration": stopped.iteration, "work_dir": str(stopped.work_dir)}},
               os.path.join({work!r}, f"stopped{{stopped.rank}}.pt"))
'''


def test_ddp_two_cpu_processes_with_gloo(tmp_path):
    images, masks = make_toy(tmp_path / "toy")
    work = tmp_path / "ddp"
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(root=str(ROOT), model=textwrap.dedent(TINY_MODEL), pipeline=PIPELINE,
                                        losses=LOSSES, sgd=SGD, images=str(images), masks=str(masks), work=str(work)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes per iteration" in out.stdout and "iter 4/4" in out.stdout
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # DDP starts from rank 0's weights (the ranks built different ones) and keeps the parameters in step
    # (BatchNorm running statistics stay per process, as in the toolbox: rank 0's are saved)
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"])
    assert ranks[0]["miou"] == ranks[1]["miou"]  # evaluation counts summed over both processes
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # each process its own share of the data
    ckpt = torch.load(work / "last.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and (work / "model.safetensors").is_file()
    # a Ctrl-C that reaches one process stops both at one iteration, in the one work dir the first chose
    stopped = [torch.load(work / f"stopped{r}.pt", weights_only=True) for r in (0, 1)]
    run = tmp_path / "work_dirs" / "tiny" / "run1"
    assert [s["iteration"] for s in stopped] == [1, 1] and {s["work_dir"] for s in stopped} == {"work_dirs/tiny/run1"}
    assert torch.load(run / "last.pth", weights_only=True)["iteration"] == 1
    assert "interrupted at iteration 1/4" in (run / "train.log").read_text()


# ---- configuration and command-line errors ----------------------------------------------------------------
def test_config_from_card_and_refusals(tmp_path):
    import segtorch

    card = segtorch.model_card("idrnet_upernet_swinlarge_ade20k")
    config = TrainConfig.from_card(card, work_dir=str(tmp_path), max_iters=5)
    assert config.optimizer["type"] == "AdamW" and config.scheduler["warmup_cfg"]["iters"] == 1500
    assert config.losses["loss_cls_stage2"]["scale_factor"] == 1.0 and config.batch_size == 2 and config.max_iters == 5
    _, train = toy_training_set(tmp_path)
    with pytest.raises(UsageError, match="amp='fp16' is offered on CUDA only"):
        Trainer(_PlainNet(), train, TrainConfig(work_dir=str(tmp_path), max_iters=1, amp="fp16", device="cpu"))
    with pytest.raises(ValueError, match="8 training images give no full iteration of 16 images"):
        Trainer(_PlainNet(), train, TrainConfig(work_dir=str(tmp_path), max_iters=1, batch_size=16))


def test_train_command_bad_input(tmp_path, monkeypatch):
    from segtorch.cli.train import add_parser as add_train_parser

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="segtorch")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "pspnet_resnet50os8_voc", "--work-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="give --data-root DIR, or --images DIR and --masks DIR"):
        args.func(args)
    args = parser.parse_args(["train", "pspnet_resnet50os8_voc", "--images", str(tmp_path / "no"), "--masks",
                              str(tmp_path), "--num-classes", "3"])
    with pytest.raises(DatasetError, match=r"/no: no such directory \(images\)"):
        args.func(args)
    args = parser.parse_args(["train", "pspnet_resnet50os8_voc", "--data-root", str(tmp_path)])
    with pytest.raises(DatasetError, match=r"does not hold PASCAL VOC 2012 \(expected JPEGImages/"):
        args.func(args)
    logs = sorted((tmp_path / "work_dirs" / "pspnet_resnet50os8_voc").glob("run*/train.log"))
    assert [p.read_text().split(":")[0] for p in logs] == ["error", "error"]  # data errors: in the run's log too


# ---- fine-tuning MCIBI / IDRNet with other classes ------------------------------------------------------
@pytest.mark.parametrize("name", ["mcibi_deeplabv3_resnet50os8_ade20k", "idrnet_fcn_resnet50os8_ade20k"])
def test_fine_tuning_with_other_classes_starts_the_training_state_afresh(name, tmp_path):
    """A published model's memory / class relations / representations are per class: with another number of
    classes they start as in a fresh toolbox model (and the log says so); the rest is loaded."""
    import segtorch
    from segtorch.models.builder import build_segmentation_model
    from segtorch.train.finetune import build_model

    card = segtorch.model_card(name)
    torch.manual_seed(0)
    source = build_segmentation_model(card.architecture, auxiliary=True)
    state = source.state_dict()
    for key in ("memory_module.memory", "class_relations_mean", "class_relations_var", "dl_cls_representations"):
        if key in state:
            state[key] = torch.randn(state[key].shape)  # trained statistics
    path = tmp_path / "published.pth"
    torch.save({"model": state}, path)
    del source
    lines: list[str] = []
    model = build_model(card, 5, str(path), log=lines.append)
    mine = {**model.state_dict(), **dict(model.named_buffers())}
    fresh = {"memory_module.memory": torch.zeros, "class_relations_mean": lambda *shape: torch.eye(5),
             "class_relations_var": lambda *shape: torch.eye(5), "dl_cls_representations": torch.zeros}
    checked = [k for k in fresh if k in mine]
    assert checked
    for key in checked:
        assert mine[key].shape[0] == 5 and torch.equal(mine[key], fresh[key](*mine[key].shape)), key
    assert torch.equal(mine["bottleneck.0.weight"], state["bottleneck.0.weight"])  # the rest is the checkpoint's
    note = next(line for line in lines if "re-initialised as the toolbox initialises a fresh model" in line)
    assert all(k in note for k in checked)
    if "idrnet" in name:
        assert torch.equal(model.selected_classes_counter, torch.full((5,), 1e-6)) and "selected_classes_counter" in note


# ---- `segtorch train` end to end on the demo model ------------------------------------------------------------
DEMO = "demo_pspnet_shapes"  # six classes, 2M parameters: trained here for eight


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _train_args(shapes: Path, *extra) -> list:
    return ["train", DEMO, "--images", shapes / "train" / "images", "--masks", shapes / "train" / "masks",
            "--num-classes", 8, "--crop-size", 48, 48, "--iters", 2, "--batch-size", 2, "--log-interval", 1, *extra]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Three runs of one command from a fresh folder: two with seed 0 (their own default work dirs, one with a
    data-loading process), one with seed 1."""
    from segtorch.data.synthetic import write_split

    root = tmp_path_factory.mktemp("demo_runs")
    for split, count in (("train", 4), ("val", 2)):
        write_split(root / "shapes", split, count, size=64)
    here = os.getcwd()
    os.chdir(root)
    try:
        torch.set_num_threads(1)
        val = ["--val-images", root / "shapes" / "val" / "images", "--val-masks", root / "shapes" / "val" / "masks"]
        results = [run_cli(*_train_args(root / "shapes", "--workers", 1, *val)),
                   run_cli(*_train_args(root / "shapes", "--workers", 0)),
                   run_cli(*_train_args(root / "shapes", "--workers", 0, "--seed", 1, "--work-dir", root / "seed1"))]
    finally:
        os.chdir(here)
    for code, out, err in results:
        assert code == 0, err
    return root, results


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_model_fine_tuned_with_its_own_classes_loads_predicts_and_evaluates(demo_runs, tmp_path):
    import segtorch

    root, _ = demo_runs
    weights = root / "work_dirs" / DEMO / "run1" / "model.safetensors"
    seg = segtorch.load(DEMO, checkpoint=weights)
    names = tuple(f"class_{i}" for i in range(8))
    assert seg.card.num_classes == 8 and seg.card.class_names == names and len(seg.card.palette) == 8
    image = sorted((root / "shapes" / "val" / "images").iterdir())[0]
    assert seg.predict(image).shape == (64, 64) and seg.predict(image).max() < 8
    code, out, err = run_cli("predict", image, "--model", DEMO, "--checkpoint", weights, "--out", tmp_path / "out",
                             "--legend")
    assert code == 0, err
    assert (tmp_path / "out" / f"{image.stem}_labels.png").is_file()
    assert (tmp_path / "out" / f"{image.stem}_legend.png").is_file()
    code, out, err = run_cli("eval", DEMO, "--data-root", root / "shapes", "--checkpoint", weights, "--workers", 0,
                             "--no-progress")
    assert code == 0, err
    assert "class_7" in out and "2 images in" in out


def test_one_seed_gives_bit_identical_weights_in_a_new_work_dir_per_run(demo_runs):
    root, results = demo_runs
    runs = root / "work_dirs" / DEMO
    assert sorted(p.name for p in runs.iterdir()) == ["run1", "run2"]  # one per run, by default
    assert f"work dir work_dirs/{DEMO}/run1" in results[0][1] and "1 loading processes" in results[0][1]
    first, second, other = (_tensors(p / "model.safetensors") for p in (runs / "run1", runs / "run2", root / "seed1"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["decoder.1.weight"], other["decoder.1.weight"])  # the seed decides

    def losses(out):  # the loss lines, less the timings
        return [line.split("]")[0] for line in out.splitlines() if line.startswith("iter ")]

    assert losses(results[0][1]) == losses(results[1][1]) != losses(results[2][1])
    assert len(losses(results[0][1])) == 2


def test_a_work_dir_is_resumed_only_when_asked_and_with_its_settings(demo_runs, monkeypatch):
    root, _ = demo_runs
    monkeypatch.chdir(root)
    shapes, run2 = root / "shapes", root / "work_dirs" / DEMO / "run2"
    before = (run2 / "last.pth").read_bytes()
    code, out, err = run_cli(*_train_args(shapes, "--work-dir", run2))
    assert code == 1 and err == (f"segtorch: error: {run2} holds the checkpoint of an earlier run; continue it with "
                                 f"--resume, or leave out --work-dir for a new run's folder\n")
    code, out, err = run_cli(*_train_args(shapes, "--resume", "--lr", 0.02))  # the latest run: run2
    assert code == 1 and err.count("\n") == 1 and "optimizer.lr 0.01 -> 0.02" in err and out == ""
    code, out, err = run_cli(*_train_args(shapes, "--resume", "--num-classes", 7))
    assert code == 1 and "run2/last.pth was written with other settings (class_names: 8 -> 7 entries" in err
    assert (run2 / "last.pth").read_bytes() == before
    assert (run2 / "train.log").read_text().count("\nerror: ") == 3  # each refusal in the run's log too
    code, out, err = run_cli(*_train_args(shapes, "--resume", "--workers", 0))
    assert code == 0, err
    assert f"resumed from work_dirs/{DEMO}/run2/last.pth at iteration 2" in out
    assert sorted(p.name for p in (root / "work_dirs" / DEMO).iterdir()) == ["run1", "run2"]


def test_dataset_problems_are_found_before_the_model_is_built_and_logged(tmp_path, monkeypatch):
    from segtorch.train import finetune

    monkeypatch.chdir(tmp_path)
    images, masks = make_toy(tmp_path / "toy", n=4)
    Image.fromarray(np.full((48, 48), 9, np.uint8)).save(masks / "2.png")  # class 9 of eight
    monkeypatch.setattr(finetune, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    code, out, err = run_cli("train", DEMO, "--images", images, "--masks", masks, "--num-classes", 8, "--iters", 1)
    assert code == 1 and err == (f"segtorch: error: 1 of 4 samples cannot be used: {masks / '2.png'}: label value 9 "
                                 f"is not a class (0..7) nor the ignore value 255\n")
    log = (tmp_path / "work_dirs" / DEMO / "run1" / "train.log").read_text()
    assert log == "error: " + err.split("error: ", 1)[1]
