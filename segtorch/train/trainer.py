"""A thin trainer: one process per device, started by ``torchrun`` for several GPUs or machines.

    trainer = Trainer(model, TrainingSet(dataset, build_transforms(card.training["train_pipeline"])),
                      TrainConfig.from_card(card, work_dir="runs/x", max_iters=2000), val_set=val)
    trainer.fit()

- the loop counts optimizer steps ("iterations"); an iteration is ``accumulate`` micro-batches of
  ``batch_size`` images on each of the ``world_size`` processes;
- the work dir (default: a new ``work_dirs/<model>/run<N>``) is locked while ``fit()`` runs;
- ``<work_dir>/last.pth`` holds model, optimizer, schedule (the iteration), grad scaler, every process's RNG
  state and the run's settings; it is written atomically (temporary file, then rename) every
  ``save_interval`` iterations, at each epoch's end and on Ctrl-C (at the iteration reached). ``fit()``
  continues from it only with ``resume=True``, and only with the settings that wrote it (else it refuses, as
  it refuses to start afresh over it): data order and augmentation depend only on (seed, epoch, index), so a
  resumed run gives the weights an uninterrupted one gives;
- ``<work_dir>/model.safetensors``: the trained weights (without the training-only auxiliary heads) and, in
  the metadata, the classes they predict: ``segtorch.load(name, checkpoint=...)`` builds the model for them;
- DDP with a sampler that gives each process its share; ``sync_bn`` converts BatchNorm to SyncBatchNorm
  (CUDA only); AMP (``amp="fp16"|"bf16"``) on CUDA; log lines with loss, lr, speed and ETA.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .losses import DEFAULT_LOSSES, training_losses
from .optim import PolySchedule, build_optimizer, clip_gradients
from ..errors import CheckpointError, UsageError
from ..files import atomic_path
from ..inference.precision import check_device
from .workdir import default_workers, new_run_dir, work_dir_lock

CHECKPOINT_FORMAT = "segtorch-train-1"


# card.training entries that a family's train_forward reads
FAMILY_TRAINING_KEYS = ("memory_update", "memory_loss")


@dataclasses.dataclass
class TrainConfig:
    work_dir: str | None = None  # None: a new work_dirs/<export_name>/run<N>
    max_iters: int | None = None  # optimizer steps; None: epochs x iterations per epoch
    epochs: int | None = None
    batch_size: int = 2  # images per process per micro-batch
    accumulate: int = 1  # micro-batches per optimizer step
    optimizer: dict = dataclasses.field(default_factory=lambda: {"type": "SGD", "lr": 0.01, "momentum": 0.9,
                                                                 "weight_decay": 5e-4})
    scheduler: dict = dataclasses.field(default_factory=lambda: {"type": "PolyScheduler", "power": 0.9})
    losses: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_LOSSES))
    align_corners: bool = False
    clip_grad: dict | None = None  # the scheduler's clipgrad_cfg, e.g. {"max_norm": 35, "norm_type": 2}
    family_settings: dict | None = None  # the card's family training settings (MCIBI's memory_update/_loss)
    amp: str = "none"  # "fp16" | "bf16" (CUDA)
    num_workers: int | None = None  # None: what this machine's CPUs allow (workdir.default_workers)
    seed: int = 0
    log_interval: int = 10
    save_interval: int = 0  # iterations between checkpoints (besides every epoch's end); 0: epoch ends only
    eval_interval: int = 0  # iterations between evaluations; 0: only at the end (when there is a val set)
    sync_bn: bool = False
    find_unused_parameters: bool = False
    resume: bool = False  # continue from <work_dir>/last.pth (written with these settings)
    device: str | None = None  # default: this process's GPU (LOCAL_RANK) or the CPU
    export_name: str | None = None  # model name written into model.safetensors' metadata
    class_names: tuple[str, ...] | None = None  # the classes trained, written into model.safetensors' metadata
    palette: tuple[tuple[int, int, int], ...] | None = None
    data: dict | None = None  # what the training data is (folders, split, pipeline): checked when resuming

    @classmethod
    def from_card(cls, card, **overrides) -> "TrainConfig":
        """The card's schedule facts: optimizer, schedule, losses (with weights), batch size, epochs."""
        t = card.training
        values = dict(optimizer=dict(t["optimizer"]), scheduler=dict(t["scheduler"]), losses=dict(t["losses"]),
                      batch_size=t.get("batch_size_per_gpu", 2), epochs=t.get("epochs"),
                      clip_grad=t["scheduler"].get("clipgrad_cfg"),
                      family_settings={k: t[k] for k in FAMILY_TRAINING_KEYS if k in t},
                      align_corners=card.architecture["align_corners"], export_name=card.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# settings that may change when a run is resumed: where it runs, how it reports, how fast it reads
RESUMABLE_CHANGES = ("work_dir", "device", "num_workers", "log_interval", "save_interval", "eval_interval", "resume")


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (every device), before anything random happens."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _settings(config: "TrainConfig") -> dict:
    """The settings a checkpoint records, as JSON values."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check_resumable(path: str | Path, config: "TrainConfig") -> None:
    """Refuse, in one line, to continue ``path`` with settings other than those that wrote it. Cheap: the
    file is memory-mapped, its tensors are not read."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be resumed from
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
    if saved is None:
        return
    # settings a checkpoint of an older segtorch does not record are not known to differ
    now = {k: v for k, v in _settings(config).items() if k not in RESUMABLE_CHANGES and k in saved}
    differ = _differences({k: saved[k] for k in now}, now)
    if differ:
        shown = "; ".join(differ[:4]) + (f"; ... ({len(differ)} in all)" if len(differ) > 4 else "")
        raise UsageError(f"{path} was written with other settings ({shown}): resume with the same settings, or "
                         f"train in another work dir")


def _differences(saved, now, prefix: str = "") -> list[str]:
    """``name saved -> now`` for each setting that differs, down to the nested key."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in _differences(saved.get(k), now.get(k), f"{prefix}{k}.")]
    if saved == now:
        return []
    if isinstance(saved, list) and isinstance(now, list):
        if len(saved) != len(now):
            return [f"{prefix[:-1]}: {len(saved)} -> {len(now)} entries"]
        if all(isinstance(v, dict) for v in saved + now):  # e.g. the steps of a pipeline
            return [d for i, (a, b) in enumerate(zip(saved, now)) for d in _differences(a, b, f"{prefix}{i}.")]
    return [f"{prefix[:-1]} {_short(saved)} -> {_short(now)}"]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _StopRequest:
    """Ctrl-C during ``fit``: the first asks the loop to stop after the current iteration (and write a
    checkpoint there); a second stops at once."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self._announce = announce  # one process of a distributed run speaks
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._announce:
            print("\nCtrl-C: stopping after this iteration to write a resumable checkpoint (Ctrl-C again: stop at "
                  "once, without one)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _ignore_sigint(worker_id: int) -> None:
    """Data-loading processes leave Ctrl-C to the training process, which stops at an iteration's end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- distributed ------------------------------------------------------------------------------------------
def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; joins the process group if needed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        return dist.get_rank(), dist.get_world_size(), local_rank
    return 0, 1, 0


class EpochSampler(torch.utils.data.Sampler):
    """Each process's share of a shuffled epoch (like DistributedSampler with drop_last), yielding
    ``(index, epoch)`` so the dataset can seed the sample's augmentation; ``start`` skips what a resumed
    run has already seen."""

    def __init__(self, length: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True):
        self.length, self.rank, self.world, self.seed, self.shuffle = length, rank, world, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        return self.length // self.world

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        mine = order[: self.per_rank * self.world][self.rank::self.world].tolist()
        return iter([(i, self.epoch) for i in mine[self.start:]])


class _TrainForward(nn.Module):
    """One step's losses (``training_losses``) as a module's forward, so that DDP (which wraps ``forward``)
    sees them."""

    def __init__(self, model: nn.Module, config: "TrainConfig"):
        super().__init__()
        self.model = model
        self.card = types.SimpleNamespace(
            architecture={"align_corners": config.align_corners},
            training={"losses": config.losses, **(config.family_settings or {})})

    def forward(self, images: torch.Tensor, labels: torch.Tensor, learning_rate: float, epoch: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return training_losses(self.model, images, labels, card=self.card, learning_rate=learning_rate,
                               epoch=epoch)


def whole_image_predictor(mean: Sequence[float] = (123.675, 116.28, 103.53),
                          std: Sequence[float] = (58.395, 57.12, 57.375), align_corners: bool = False
                          ) -> Callable[[nn.Module, np.ndarray], np.ndarray]:
    """A plain predictor for evaluation during training: normalise, whole image, resize back, argmax."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def predict(model: nn.Module, image: np.ndarray) -> np.ndarray:
        device = next(model.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None]
        x = ((x - mean_t) / std_t).to(device)
        with torch.inference_mode():
            scores = model(x)
            scores = F.interpolate(scores, size=image.shape[:2], mode="bilinear", align_corners=align_corners)
        return scores[0].argmax(0).cpu().numpy()

    return predict


def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(path, durable=True) as tmp:  # a checkpoint must survive a crash right after saving
        torch.save(obj, tmp)


class Trainer:
    def __init__(self, model: nn.Module, train_set: torch.utils.data.Dataset, config: TrainConfig, *,
                 val_set=None, predict: Callable[[nn.Module, np.ndarray], np.ndarray] | None = None,
                 callbacks: Sequence[Callable[["Trainer"], None]] = (), log: Callable[[str], None] | None = None):
        self.config = c = config
        self.rank, self.world, local_rank = init_distributed()
        if c.device:
            self.device = check_device(c.device)
        else:
            self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if c.amp not in ("none", "fp16", "bf16"):
            raise UsageError(f"amp must be 'none', 'fp16' or 'bf16', not {c.amp!r}")
        if c.amp != "none" and self.device.type != "cuda":
            raise UsageError(f"amp={c.amp!r} is offered on CUDA only; this run is on {self.device}")
        if c.accumulate < 1 or c.batch_size < 1:
            raise UsageError("batch_size and accumulate must be at least 1")
        self.work_dir = self._work_dir(c)
        self._log = log
        seed_everything(c.seed + self.rank)  # dropout etc.; restored from the checkpoint when resuming

        model = model.to(self.device)
        if c.sync_bn and self.world > 1:
            if self.device.type != "cuda":
                raise UsageError("sync_bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = build_optimizer(model, c.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.amp == "fp16")
        step = _TrainForward(model, c)
        if self.world > 1:
            step = nn.parallel.DistributedDataParallel(
                step, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=c.find_unused_parameters)
        self.step_module = step

        self.train_set = train_set
        self.sampler = EpochSampler(len(train_set), self.rank, self.world, seed=c.seed)
        self.samples_per_iter = c.batch_size * c.accumulate
        self.iters_per_epoch = self.sampler.per_rank // self.samples_per_iter
        if self.iters_per_epoch == 0:
            raise UsageError(f"{len(train_set)} training images give no full iteration of {self.samples_per_iter} "
                             f"images x {self.world} processes; lower batch_size or accumulate")
        if c.max_iters is None and c.epochs is None:
            raise UsageError("set max_iters or epochs")
        self.max_iters = c.max_iters if c.max_iters is not None else c.epochs * self.iters_per_epoch
        self.schedule = PolySchedule.from_config(c.scheduler, c.optimizer["lr"], self.max_iters)
        self.val_set, self.predict, self.callbacks = val_set, predict, list(callbacks)
        self.num_workers = default_workers() if c.num_workers is None else c.num_workers
        self.iteration = 0
        self._saved_at: int | None = None
        self.history: list[dict] = []

    def _work_dir(self, c: TrainConfig) -> Path:
        """The config's work dir, or a new one per run (chosen by the first process, the same for all)."""
        if c.work_dir is not None:
            path = Path(c.work_dir).expanduser()
            path.mkdir(parents=True, exist_ok=True)
            return path
        chosen = [str(new_run_dir(c.export_name or "custom")) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(chosen, src=0)
        return Path(chosen[0])

    # ---- logging -----------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.rank != 0:
            return
        if self._log is not None:
            self._log(message)
        else:
            print(message, flush=True)
        with open(self.work_dir / "train.log", "a") as f:
            f.write(message + "\n")

    # ---- checkpoints -------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "last.pth"

    def _rng_state(self) -> list[dict]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        if self.world == 1:
            return [state]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, state)
        return gathered

    def save_checkpoint(self) -> None:
        """Every process takes part (RNG states are gathered); the first one writes."""
        self._saved_at = self.iteration
        rng = self._rng_state()
        if self.rank == 0:
            _save_atomic({
                "format": CHECKPOINT_FORMAT, "iteration": self.iteration, "max_iters": self.max_iters,
                "iters_per_epoch": self.iters_per_epoch, "world_size": self.world,
                "model": self.model.state_dict(), "training_buffers": _training_buffers(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {"iteration": self.iteration, **dataclasses.asdict(self.schedule)},
                "scaler": self.scaler.state_dict(), "rng": rng,
                "config": json.loads(json.dumps(dataclasses.asdict(self.config), default=str)),
            }, self.checkpoint_path)
        if self.world > 1:
            dist.barrier()

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means the file cannot be resumed from
            raise CheckpointError(f"{path}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a segtorch training checkpoint")
        check_resumable(path, self.config)
        self.model.load_state_dict(ckpt["model"])
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for key, value in ckpt.get("training_buffers", {}).items():
                buffers[key].copy_(value)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = ckpt["iteration"]
        if ckpt["iters_per_epoch"] != self.iters_per_epoch or ckpt["max_iters"] != self.max_iters:
            self.log(f"note: {path} was written with {ckpt['iters_per_epoch']} iterations/epoch and "
                     f"{ckpt['max_iters']} in all; now {self.iters_per_epoch} and {self.max_iters} "
                     f"(the data order after resuming differs from an uninterrupted run)")
        rng = ckpt["rng"]
        if len(rng) == self.world:
            mine = rng[self.rank]
            torch.set_rng_state(mine["torch"])
            random.setstate(_as_tuple(mine["python"]))
            if mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        self.log(f"resumed from {path} at iteration {self.iteration}")

    def export(self, path: str | Path | None = None) -> Path:
        """The model's weights as safetensors, without training-only auxiliary heads (first process only)."""
        from ..checkpoint import safetensors_metadata, write_safetensors

        path = Path(path) if path is not None else self.work_dir / "model.safetensors"
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("auxiliary_decoder.")}
        from ..checkpoint import classes_metadata

        meta = safetensors_metadata(self.config.export_name or "custom", None)
        meta["trained_iterations"] = str(self.iteration)
        if self.config.class_names is not None:
            meta.update(classes_metadata(self.config.class_names, self.config.palette or ()))
        if self.rank == 0:
            write_safetensors(state, path, meta)
        return path

    # ---- training ----------------------------------------------------------------------------------------
    def _loader(self) -> torch.utils.data.DataLoader:
        c = self.config
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=c.batch_size, sampler=self.sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=True, worker_init_fn=_ignore_sigint,
            # its own generator: making the iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(c.seed))

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.config.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _numerics(self):
        """The toolbox's training settings on a GPU: TF32 off and cuDNN's autotuning on (every one of its 74
        configs sets ``benchmark=True``); nothing changes on the CPU."""
        from ..inference.precision import toolbox_cuda_numerics

        return toolbox_cuda_numerics(self.device, cudnn_benchmark=True)

    def train_step(self, batches: Iterator) -> tuple[float, dict[str, torch.Tensor]]:
        """One optimizer step; the toolbox's epoch (from 1) and scheduled rate go to the model's training
        forward (MCIBI's memory momentum and memory loss depend on them)."""
        c = self.config
        epoch = self.iteration // self.iters_per_epoch + 1
        lr = self.schedule.apply(self.optimizer, self.iteration)
        self.optimizer.zero_grad(set_to_none=True)
        parts: dict[str, torch.Tensor] = {}
        with self._numerics():  # the forward and backward passes and the update
            for micro in range(c.accumulate):
                images, labels = next(batches)
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                last = micro == c.accumulate - 1
                sync = self.step_module.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()
                with sync:
                    with self._autocast():  # the losses themselves are computed in fp32
                        loss, losses = self.step_module(images, labels, lr, epoch)
                    self.scaler.scale(loss / c.accumulate).backward()
                for k, v in losses.items():
                    parts[k] = parts.get(k, 0) + v / c.accumulate
            if c.clip_grad:
                self.scaler.unscale_(self.optimizer)
                clip_gradients(self.model, c.optimizer, c.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return lr, parts

    def _reduce(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        stacked = torch.stack([values[k].float() for k in keys])
        if self.world > 1:
            dist.all_reduce(stacked)
            stacked /= self.world
        return dict(zip(keys, stacked.tolist()))

    def fit(self) -> dict:
        """Train to ``max_iters``, holding the work dir's lock. Ctrl-C stops at the end of an iteration, writes
        ``last.pth`` there, says where, and raises ``KeyboardInterrupt``."""
        with work_dir_lock(self.work_dir) if self.rank == 0 else contextlib.nullcontext():
            self._start()
            with _StopRequest(announce=self.rank == 0) as stop:
                last_eval, stopped = self._train(stop)
            if stopped:
                self.log(f"interrupted at iteration {self.iteration}/{self.max_iters}: resumable checkpoint "
                         f"{self.checkpoint_path} (continue with --resume --work-dir {self.work_dir})")
                raise KeyboardInterrupt
            if self.val_set is not None and (last_eval is None or last_eval["iteration"] != self.iteration):
                last_eval = self.evaluate()
            path = self.export()
            self.log(f"done: {self.iteration} iterations; weights in {path}")
        return {"iteration": self.iteration, "history": self.history, "eval": last_eval, "weights": str(path)}

    def _start(self) -> None:
        """Resume when asked; never train over a checkpoint that was not asked for."""
        c = self.config
        if c.resume:
            if not self.checkpoint_path.is_file():
                raise UsageError(f"nothing to resume: {self.checkpoint_path} does not exist")
            self.load_checkpoint(self.checkpoint_path)
        elif self.checkpoint_path.is_file():
            raise UsageError(f"{self.work_dir} holds the checkpoint of an earlier run; continue it with --resume "
                             f"(resume=True), or train in another work dir")
        self.log(f"training {type(self.model).__name__}: {self.max_iters} iterations, {self.iters_per_epoch}/epoch, "
                 f"{c.batch_size} x {c.accumulate} images x {self.world} processes per iteration, "
                 f"on {self.device}, amp {c.amp}, {self.num_workers} loading processes, work dir {self.work_dir}")

    def _stop_agreed(self, stop: _StopRequest) -> bool:
        """Whether any process was asked to stop (all of them stop at the same iteration)."""
        if self.world == 1:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _train(self, stop: _StopRequest) -> tuple[dict | None, bool]:
        """The loop: (the last evaluation, whether a Ctrl-C stopped it; its checkpoint is written then)."""
        c = self.config
        self.model.train()
        window_start, window_iters, window_parts = time.perf_counter(), 0, {}
        last_eval = None
        while self.iteration < self.max_iters:
            epoch, step = divmod(self.iteration, self.iters_per_epoch)
            self.sampler.set_epoch(epoch, start=step * self.samples_per_iter)
            batches = iter(self._loader())
            for _ in range(step, self.iters_per_epoch):
                if self.iteration >= self.max_iters:
                    break
                lr, parts = self.train_step(batches)
                self.iteration += 1
                window_iters += 1
                for k, v in parts.items():
                    window_parts[k] = window_parts.get(k, 0) + v
                if self.iteration % max(1, c.log_interval) == 0 or self.iteration == self.max_iters:
                    losses = self._reduce({k: v / window_iters for k, v in window_parts.items()})
                    seconds = (time.perf_counter() - window_start) / window_iters
                    self._log_step(epoch, lr, losses, seconds)
                    window_start, window_iters, window_parts = time.perf_counter(), 0, {}
                epoch_end = self.iteration % self.iters_per_epoch == 0
                if epoch_end or (c.save_interval and self.iteration % c.save_interval == 0) \
                        or self.iteration == self.max_iters:
                    self.save_checkpoint()
                if self.val_set is not None and c.eval_interval and self.iteration % c.eval_interval == 0:
                    last_eval = self.evaluate()
                for callback in self.callbacks:
                    callback(self)
                if self.iteration < self.max_iters and self._stop_agreed(stop):  # else: finish (export)
                    if self._saved_at != self.iteration:
                        self.save_checkpoint()
                    return last_eval, True
        return last_eval, False

    def _log_step(self, epoch: int, lr: float, losses: dict[str, float], seconds: float) -> None:
        total = sum(losses.values())
        record = {"iteration": self.iteration, "epoch": epoch + 1, "lr": lr, "loss": total, **losses,
                  "seconds_per_iter": seconds}
        self.history.append(record)
        eta = seconds * (self.max_iters - self.iteration)
        images_per_s = self.samples_per_iter * self.world / seconds if seconds > 0 else math.inf
        memory = ""
        if self.device.type == "cuda":
            memory = f", mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
        parts = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
        self.log(f"iter {self.iteration}/{self.max_iters} (epoch {epoch + 1}) lr {lr:.3e} loss {total:.4f} "
                 f"[{parts}] {seconds:.3f} s/iter, {images_per_s:.1f} img/s, eta {_duration(eta)}{memory}")

    def evaluate(self) -> dict:
        """mIoU on the validation set (every process takes a share; the counts are summed)."""
        from ..evaluation import evaluate

        predict = self.predict or whole_image_predictor(align_corners=self.config.align_corners)
        self.model.eval()
        try:
            with self._numerics():
                metrics, n = evaluate(lambda image: predict(self.model, image), self.val_set, progress=False,
                                      distributed=self.world > 1)
        finally:
            self.model.train()
        record = {"iteration": self.iteration, "miou": metrics.miou, "aacc": metrics.aacc, "macc": metrics.macc,
                  "num_images": n}
        self.log(f"eval at iteration {self.iteration}: mIoU {metrics.miou:.2f}, aAcc {metrics.aacc:.2f}, "
                 f"mAcc {metrics.macc:.2f} ({n} images)")
        if self.rank == 0:
            with open(self.work_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                    for k, v in record.items()}) + "\n")
        return record


def _training_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that training updates but that are in no state dict (IDRNet's selection counts)."""
    persistent = model.state_dict().keys()
    return {k: v.detach().cpu() for k, v in model.named_buffers() if k not in persistent}


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"
