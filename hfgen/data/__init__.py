"""Image data: sources (`sources`), per-image transforms (`transforms`) and the datasets and loaders that
training and evaluation read (`image_datasets`). Every item is (image (C, H, W) float in [0, 1], label)."""

from .image_datasets import (
    ImageDataset, ImageFileDataset, StreamingImageDataset, collate_function, collate_images, dataset_length,
    default_num_workers, image_batches, training_dataloader)
from .sources import (
    BUILTIN_DATASETS, SPLIT_SEED, SPLITS, BundledSource, DatasetsSource, hub_datasets, load_image_dataset,
    open_image_source, scan_image_folder)
from .transforms import CorruptImageError, ImageTransform, check_color, decode_image, parse_color, to_pixels

__all__ = ["BUILTIN_DATASETS", "SPLITS", "SPLIT_SEED", "BundledSource", "CorruptImageError", "DatasetsSource", "hub_datasets",
           "ImageDataset", "ImageFileDataset", "ImageTransform", "StreamingImageDataset", "check_color",
           "collate_function", "collate_images", "dataset_length", "decode_image", "default_num_workers",
           "image_batches", "load_image_dataset", "open_image_source", "parse_color", "scan_image_folder",
           "to_pixels", "training_dataloader"]
