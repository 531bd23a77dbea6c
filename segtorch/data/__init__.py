"""Datasets in the layouts users download them in, and the toolbox's training transforms."""
from __future__ import annotations

from .datasets import (ADE20K, COCOStuff10k, DATASETS, IGNORE_INDEX, LIP, VOC, Cityscapes, DatasetError,
                       ImageFolderDataset, PascalContext59, SegmentationDataset, build_dataset, dataset_class,
                       read_mask)
from .checks import check_dataset
from .transforms import TrainingSet, build_transforms, with_crop_size

__all__ = ["ADE20K", "COCOStuff10k", "Cityscapes", "DATASETS", "DatasetError", "IGNORE_INDEX", "ImageFolderDataset",
           "LIP", "PascalContext59", "SegmentationDataset", "TrainingSet", "VOC", "build_dataset", "build_transforms",
           "check_dataset", "dataset_class", "read_mask", "with_crop_size"]
