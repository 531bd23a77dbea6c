"""``segtorch train``: fine-tune a card's model with the card's schedule.

    segtorch train pspnet_resnet50os8_voc --data-root ~/data/VOCdevkit/VOC2012 --iters 2000
    segtorch train upernet_swinlarge_ade20k --images my/images --masks my/masks --num-classes 5 \\
                   --val-images my/val_images --val-masks my/val_masks
    torchrun --nproc-per-node 8 -m segtorch.cli train ...        # several GPUs (or --nnodes for machines)

Each run gets its own work dir (``work_dirs/<name>/run<N>``) unless ``--work-dir`` names one; ``--resume``
continues the latest run (or ``--work-dir``) with the settings that started it. The data is checked before
the model is built; everything the run says, errors included, goes to ``train.log`` too.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from ..argtypes import nonnegative_int, positive_float, positive_int
from ..errors import SegtorchError, UsageError


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("train", help="fine-tune a model on a dataset or a folder of images and masks",
                              description="Fine-tune a card's model with the card's schedule (optimizer, poly "
                                          "lr, losses). One process per GPU: start with torchrun for several.")
    s.add_argument("name", help="the model (card) to train")
    data = s.add_argument_group("data (a card dataset, or your own folders)")
    data.add_argument("--data-root", help="the card's dataset as downloaded (e.g. .../ADEChallengeData2016)")
    data.add_argument("--split", help="training split (default: the card's, e.g. train or trainaug)")
    data.add_argument("--val-split", help="evaluation split (default: the card's)")
    data.add_argument("--images", help="folder of training images (your own data)")
    data.add_argument("--masks", help="folder of masks with the images' names, .png, class indices")
    data.add_argument("--val-images", help="folder of validation images")
    data.add_argument("--val-masks", help="folder of validation masks")
    data.add_argument("--num-classes", type=positive_int, help="classes in your masks (default: the card's)")
    data.add_argument("--class-names", help="comma-separated class names for your masks")
    data.add_argument("--ignore-index", type=int, default=255, help="mask value for unlabelled pixels (255)")
    data.add_argument("--reduce-zero-label", action="store_true", help="mask value 0 is unlabelled, k is class k-1")
    data.add_argument("--crop-size", type=positive_int, nargs=2, metavar=("H", "W"), help="training crop (default: card's)")
    run = s.add_argument_group("schedule (defaults: the card's)")
    run.add_argument("--init", default="pretrained",
                     help="'pretrained' (the card's weights), 'scratch', or a checkpoint file (default pretrained)")
    run.add_argument("--work-dir", help="checkpoints, logs, model.safetensors (default: a new "
                                        "work_dirs/NAME/runN per run)")
    run.add_argument("--iters", type=positive_int, help="optimizer steps (default: the card's epochs)")
    run.add_argument("--epochs", type=positive_int)
    run.add_argument("--batch-size", type=positive_int, help="images per process per step (default: card's per-GPU)")
    run.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--lr", type=positive_float, help="base learning rate")
    run.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none", help="mixed precision (CUDA)")
    run.add_argument("--workers", type=nonnegative_int,
                     help="data loading processes per training process (default: this machine's CPUs per training "
                          "process less one, at most 4)")
    run.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and augmentation (0)")
    run.add_argument("--log-interval", type=positive_int, default=50)
    run.add_argument("--save-interval", type=nonnegative_int, default=0, help="iterations between checkpoints (0: per epoch)")
    run.add_argument("--eval-interval", type=nonnegative_int, default=0, help="iterations between evaluations (0: at the end)")
    run.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N validation images only")
    run.add_argument("--no-eval", action="store_true", help="no evaluation")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    run.add_argument("--find-unused-parameters", action="store_true", help="for DDP when a head leaves some unused")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --work-dir (default: NAME's latest) from its last.pth; the other "
                          "options must be those it was started with")
    run.add_argument("--device", help="default: this process's GPU (LOCAL_RANK) or the CPU")
    s.set_defaults(func=cmd_train)
    return s


def _check_data_options(args) -> None:
    if args.data_root and args.images:
        raise UsageError("give --data-root (a card dataset) or --images/--masks (your folders), not both")
    if not args.data_root and not (args.images and args.masks):
        raise UsageError("give --data-root DIR, or --images DIR and --masks DIR")
    if bool(args.val_images) != bool(args.val_masks):
        raise UsageError("give both --val-images and --val-masks")


def _datasets(args, card, class_names):
    from ..data import ImageFolderDataset, dataset_class

    if args.data_root:
        cls = dataset_class(card.dataset)
        train = cls(args.data_root, args.split or card.training.get("train_split", "train"), class_names=class_names)
        val = None if args.no_eval else cls(args.data_root, args.val_split or card.training.get("eval_split", "val"),
                                            class_names=class_names)
        return train, val
    folder = dict(class_names=class_names, ignore_index=args.ignore_index, reduce_zero_label=args.reduce_zero_label)
    train = ImageFolderDataset(args.images, args.masks, **folder)
    val = None
    if args.val_images and not args.no_eval:
        val = ImageFolderDataset(args.val_images, args.val_masks, **folder)
    return train, val


def _classes(args, card) -> tuple[str, ...]:
    if args.class_names:
        class_names = tuple(n.strip() for n in args.class_names.split(","))
        if args.num_classes and len(class_names) != args.num_classes:
            raise UsageError(f"--class-names lists {len(class_names)} names for --num-classes {args.num_classes}")
        return class_names
    return card.with_classes(args.num_classes).class_names


def _work_dir(args, name: str, rank: int, world: int) -> Path:
    """--work-dir, the latest run with --resume, else a new run's folder (the first process chooses)."""
    from ..train.workdir import latest_run_dir, new_run_dir

    if args.work_dir:
        return Path(args.work_dir).expanduser()
    chosen = [None]
    if rank == 0:
        chosen = [str(latest_run_dir(name) if args.resume else new_run_dir(name))]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def cmd_train(args) -> int:
    from ..registry import model_card
    from ..train.trainer import init_distributed

    card = model_card(args.name)
    train_card = card.with_classes(class_names=_classes(args, card))
    _check_data_options(args)
    rank, world, _ = init_distributed()
    work_dir = _work_dir(args, card.name, rank, world)

    def log(message: str, console: bool = True) -> None:  # the first process speaks, to train.log too
        if rank == 0:
            if console:
                print(message, flush=True)
            with open(work_dir / "train.log", "a") as f:
                f.write(message + "\n")

    from ..train.workdir import work_dir_lock

    with work_dir_lock(work_dir) if rank == 0 else contextlib.nullcontext():
        try:
            return _train(args, card, train_card, work_dir, log)
        except SegtorchError as e:
            log(f"error: {e}", console=False)  # the console gets it from the command's error line
            raise


def _train(args, card, train_card, work_dir: Path, log) -> int:
    import time

    from ..data import TrainingSet, build_transforms, check_dataset, with_crop_size
    from ..registry import thaw
    from ..segmenter import Segmenter
    from ..train.finetune import build_model
    from ..train.trainer import TrainConfig, Trainer, check_resumable, seed_everything
    from ..train.workdir import default_workers

    train_data, val_data = _datasets(args, card, train_card.class_names)
    if val_data is not None and args.eval_limit:
        val_data.samples = val_data.samples[: args.eval_limit]
    pipeline = card.training["train_pipeline"]
    if args.crop_size:
        pipeline = with_crop_size(pipeline, args.crop_size)
    optimizer = dict(card.training["optimizer"])
    if args.lr is not None:
        optimizer["lr"] = args.lr
    folders = {k: str(Path(v).expanduser().resolve()) if v else None
               for k, v in (("data_root", args.data_root), ("images", args.images), ("masks", args.masks))}
    data = {**folders, "split": args.split, "ignore_index": args.ignore_index,
            "reduce_zero_label": args.reduce_zero_label, "pipeline": thaw(pipeline)}
    config = TrainConfig.from_card(
        card, work_dir=str(work_dir), max_iters=args.iters, epochs=args.epochs, batch_size=args.batch_size,
        accumulate=args.accumulate, optimizer=optimizer, amp=args.amp, num_workers=args.workers, seed=args.seed,
        log_interval=args.log_interval, save_interval=args.save_interval, eval_interval=args.eval_interval,
        sync_bn=args.sync_bn, find_unused_parameters=args.find_unused_parameters, resume=args.resume,
        device=args.device, class_names=train_card.class_names, palette=train_card.palette, data=data)
    checkpoint = work_dir / "last.pth"
    if args.resume:  # before anything costly: the settings must be those of the run continued
        if not checkpoint.is_file():
            raise UsageError(f"nothing to resume: {checkpoint} does not exist")
        check_resumable(checkpoint, config)
    elif checkpoint.is_file():
        raise UsageError(f"{work_dir} holds the checkpoint of an earlier run; continue it with --resume, or leave "
                         f"out --work-dir for a new run's folder")
    started = time.perf_counter()
    threads = (default_workers() if args.workers is None else args.workers) + 1  # reading: the loaders' share
    for dataset in (train_data, val_data):
        if dataset is not None:
            check_dataset(dataset, workers=threads)
    checked = len(train_data) + (len(val_data) if val_data is not None else 0)
    log(f"data: {checked} images and masks checked in {time.perf_counter() - started:.1f} s")
    seed_everything(args.seed)  # before the model's random initialisation
    if args.resume:  # the weights come from the checkpoint: no initial weights to read or download
        model = build_model(card, train_card.num_classes, "scratch", log=lambda _: None)
    else:
        model = build_model(card, train_card.num_classes, args.init, log=log)

    def predict(model, image):  # the card's own test pipeline (resize, whole/slide, resize back)
        # on the model being trained as it is: no folded or channels-last copy made for every validation image
        device = next(model.parameters()).device
        return Segmenter(model, train_card, device=device, fuse_bn=False, channels_last=False).predict(image)

    trainer = Trainer(model, TrainingSet(train_data, build_transforms(pipeline), seed=args.seed), config,
                      val_set=val_data, predict=predict, log=lambda message: print(message, flush=True))
    trainer.fit()
    return 0
