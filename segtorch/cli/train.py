"""``segtorch train``: fine-tune a card's model with the card's schedule.

    segtorch train pspnet_resnet50os8_voc --data-root ~/data/VOCdevkit/VOC2012 --iters 2000
    segtorch train upernet_swinlarge_ade20k --images my/images --masks my/masks --num-classes 5 \\
                   --val-images my/val_images --val-masks my/val_masks
    torchrun --nproc-per-node 8 -m segtorch.cli train ...        # several GPUs (or --nnodes for machines)
"""
from __future__ import annotations

import argparse
import dataclasses

from ..argtypes import nonnegative_int, positive_float, positive_int
from ..errors import UsageError


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
    run.add_argument("--work-dir", default="work_dirs/segtorch", help="checkpoints, logs, model.safetensors")
    run.add_argument("--iters", type=positive_int, help="optimizer steps (default: the card's epochs)")
    run.add_argument("--epochs", type=positive_int)
    run.add_argument("--batch-size", type=positive_int, help="images per process per step (default: card's per-GPU)")
    run.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--lr", type=positive_float, help="base learning rate")
    run.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none", help="mixed precision (CUDA)")
    run.add_argument("--workers", type=nonnegative_int, default=4, help="data loading processes per training process")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--log-interval", type=positive_int, default=50)
    run.add_argument("--save-interval", type=nonnegative_int, default=0, help="iterations between checkpoints (0: per epoch)")
    run.add_argument("--eval-interval", type=nonnegative_int, default=0, help="iterations between evaluations (0: at the end)")
    run.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N validation images only")
    run.add_argument("--no-eval", action="store_true", help="no evaluation")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    run.add_argument("--find-unused-parameters", action="store_true", help="for DDP when a head leaves some unused")
    run.add_argument("--no-resume", action="store_true", help="start afresh even if work-dir has last.pth")
    run.add_argument("--device", help="default: this process's GPU (LOCAL_RANK) or the CPU")
    s.set_defaults(func=cmd_train)
    return s


def _datasets(args, card, class_names):
    from ..data import ImageFolderDataset, dataset_class

    if args.data_root and args.images:
        raise UsageError("give --data-root (a card dataset) or --images/--masks (your folders), not both")
    if args.data_root:
        cls = dataset_class(card.dataset)
        train = cls(args.data_root, args.split or card.training.get("train_split", "train"), class_names=class_names)
        val = None if args.no_eval else cls(args.data_root, args.val_split or card.training.get("eval_split", "val"),
                                            class_names=class_names)
        return train, val
    if not (args.images and args.masks):
        raise UsageError("give --data-root DIR, or --images DIR and --masks DIR")
    folder = dict(class_names=class_names, ignore_index=args.ignore_index, reduce_zero_label=args.reduce_zero_label)
    train = ImageFolderDataset(args.images, args.masks, **folder)
    val = None
    if args.val_images or args.val_masks:
        if not (args.val_images and args.val_masks):
            raise UsageError("give both --val-images and --val-masks")
        if not args.no_eval:
            val = ImageFolderDataset(args.val_images, args.val_masks, **folder)
    return train, val


def cmd_train(args) -> int:
    from ..data import TrainingSet, build_transforms, with_crop_size
    from ..registry import model_card
    from ..segmenter import Segmenter
    from ..train.finetune import build_model
    from ..train.trainer import TrainConfig, Trainer, init_distributed

    card = model_card(args.name)
    num_classes = args.num_classes or card.num_classes
    if args.class_names:
        class_names = tuple(n.strip() for n in args.class_names.split(","))
        if args.num_classes and len(class_names) != args.num_classes:
            raise UsageError(f"--class-names lists {len(class_names)} names for --num-classes {args.num_classes}")
        num_classes = len(class_names)
    elif num_classes == card.num_classes:
        class_names = card.class_names
    else:
        class_names = tuple(f"class_{i}" for i in range(num_classes))
    train_card = dataclasses.replace(card, num_classes=num_classes, class_names=class_names,
                                     palette=card.palette[:num_classes])
    train_data, val_data = _datasets(args, card, class_names)
    if val_data is not None and args.eval_limit:
        val_data.samples = val_data.samples[: args.eval_limit]
    pipeline = card.training["train_pipeline"]
    if args.crop_size:
        pipeline = with_crop_size(pipeline, args.crop_size)
    rank = init_distributed()[0]
    model = build_model(card, num_classes, args.init, log=print if rank == 0 else (lambda *_: None))
    optimizer = dict(card.training["optimizer"])
    if args.lr is not None:
        optimizer["lr"] = args.lr
    config = TrainConfig.from_card(
        card, work_dir=args.work_dir, max_iters=args.iters, epochs=args.epochs, batch_size=args.batch_size,
        accumulate=args.accumulate, optimizer=optimizer, amp=args.amp, num_workers=args.workers, seed=args.seed,
        log_interval=args.log_interval, save_interval=args.save_interval, eval_interval=args.eval_interval,
        sync_bn=args.sync_bn, find_unused_parameters=args.find_unused_parameters, resume=not args.no_resume,
        device=args.device)

    def predict(model, image):  # the card's own test pipeline (resize, whole/slide, resize back)
        device = next(model.parameters()).device
        return Segmenter(model, train_card, device=device).predict(image)

    trainer = Trainer(model, TrainingSet(train_data, build_transforms(pipeline), seed=args.seed), config,
                      val_set=val_data, predict=predict)
    trainer.fit()
    return 0
