"""The datasets that training and evaluation read: every item is (image (C, H, W) float in [0, 1], label long).

- `ImageDataset`: images held in memory (the bundled digits, tests); batches are whole-tensor indexing.
- `ImageFileDataset`: rows of an Arrow-backed `datasets.Dataset` (memory-mapped for Hub and saved datasets),
  each image decoded and transformed only when a batch asks for it, in the DataLoader's workers.
- `StreamingImageDataset`: the same over a streamed `datasets.IterableDataset`, this process's shard only.

All three have `image_shape`, `num_classes`, `id2label`, `fingerprint` (identifies the images and their
evaluation transform, for caches) and `set_epoch(epoch)` (the epoch's random augmentation). The two map-style ones
also have `captions` (a list of strings, or None without a caption column) and `with_labels(conditions)`: the same
images, each item's second element replaced by row i of `conditions` (text conditioning: the captions' token ids).
"""

import copy
import hashlib
import itertools
import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .transforms import CorruptImageError, ImageTransform, decode_image, image_name, pixels_to_tensor, sample_generator

logger = logging.getLogger(__name__)


class _Augmented:
    """What the training datasets share: the augmentation seed and epoch, and the class names."""

    seed: int = 0
    epoch: int = 0
    augment: bool = False
    id2label: dict[str, str] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_classes(self) -> int:
        return len(self.id2label) if self.id2label else 0

    def with_labels(self, conditions: torch.Tensor):
        """A shallow copy whose item i is (image i, conditions[i]); conditions: (N, ...)."""
        if len(conditions) != len(self):
            raise ValueError(f"`conditions` must hold one row per image ({len(self)}), got {len(conditions)}")
        dataset = copy.copy(self)
        dataset.conditions = conditions
        return dataset


class ImageDataset(_Augmented, Dataset):
    """Images in memory. images: (N, C, H, W) float in [0, 1]; labels: (N,) long; id2label: {"0": name, ...} or None.

    `random_flip` with `augment`: the training loader flips each image with probability 1/2, drawn from
    (seed, epoch, index). Indexing (`dataset[i]`, `dataset[indices]`) never augments.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, id2label: dict[str, str] | None = None,
                 random_flip: bool = False, augment: bool = False, seed: int = 0, name: str | None = None,
                 captions: list[str] | None = None):
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with one label each, got {tuple(images.shape)} and {len(labels)} labels")
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"`captions` must hold one caption per image ({len(images)}), got {len(captions)}")
        self.images, self.labels, self.id2label, self.captions = images, labels, id2label, captions
        self.conditions = labels
        self.random_flip, self.augment, self.seed = random_flip, augment, seed
        self._fingerprint = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.conditions[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # a hash of the pixels and labels
            digest = hashlib.sha1(self.images.contiguous().numpy().tobytes())
            digest.update(self.labels.numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


class _ImageRows(_Augmented):
    """Decoding of `datasets` rows: {image_column: {"bytes", "path"}, label_column: int, ...} -> (image, label)."""

    def __init__(self, rows, image_column: str, label_column: str | None, id2label: dict[str, str] | None,
                 transform: ImageTransform, seed: int = 0, augment: bool = False, skip_corrupt_images: bool = False,
                 caption_column: str | None = None, fingerprint: str = ""):
        self.rows, self.image_column, self.label_column = rows, image_column, label_column
        self.caption_column = caption_column  # kept with the rows for text conditioning
        self.id2label, self.transform, self.seed, self.augment = id2label, transform, seed, augment
        self.skip_corrupt_images = skip_corrupt_images
        self.conditions = None  # see `with_labels`
        self.fingerprint = hashlib.sha1(f"{fingerprint}|{transform}".encode()).hexdigest()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.transform.num_channels, self.transform.resolution, self.transform.resolution

    def decode(self, row: dict, index: int, generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One row -> (image, label); None for a corrupt image under `skip_corrupt_images`."""
        cell = row[self.image_column]
        name = image_name(cell, f"row {index} of column {self.image_column!r}")
        try:
            image = self.transform(decode_image(cell, name), generator, name)
        except CorruptImageError as error:
            if not self.skip_corrupt_images:
                raise CorruptImageError(f"{error} (pass --skip_corrupt_images to skip such files)") from error
            logger.warning("skipped a corrupt image: %s", error)
            return None
        if self.conditions is not None:
            return image, self.conditions[index]
        label = row[self.label_column] if self.label_column else 0
        return image, torch.tensor(label, dtype=torch.long)


class ImageFileDataset(_ImageRows, Dataset):
    """Map-style: rows of an Arrow `datasets.Dataset`, decoded and transformed on access.

    A batch (`__getitems__`, as torch's DataLoader asks) reads its uncached rows in one Arrow call. With a
    `pixel_cache` (hfgen.data.pixel_cache, set by the source), each image's prepared pixels are decoded once
    and reused; the random crops and flips are drawn after it, the same with and without it.
    """

    pixel_cache = None
    _label_values = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        """(image (C, H, W), label), or None for a skipped corrupt image."""
        images, labels = self.__getitems__([index])
        return (images[0], labels[0]) if len(images) else None

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch (images (B, C, H, W), labels (B, ...)), skipped corrupt images left out."""
        indices = [int(index) for index in indices]
        targets = self.conditions if self.conditions is not None else self.label_values
        size = self.transform.resolution
        whole = self.pixel_cache.gather(np.asarray(indices)) if self.pixel_cache is not None else None
        if whole is not None and whole.shape[1:3] == (size, size):  # cached at the resolution: no crop to take
            if self.augment and self.transform.random_flip:  # the flip `place` draws (a crop of the whole draws nothing)
                flips = np.array([sample_generator(self.seed, self.epoch, i).random() < 0.5 for i in indices])
                whole = np.where(flips[:, None, None, None], whole[:, :, ::-1], whole)
            return pixels_to_tensor(whole), targets[torch.as_tensor(indices, dtype=torch.long)]
        pixels = self.prepared(indices)
        kept = [k for k, item in enumerate(pixels) if item is not None]
        crops = np.empty((len(kept), size, size, self.transform.num_channels), dtype=np.uint8)
        for row, k in enumerate(kept):
            generator = sample_generator(self.seed, self.epoch, indices[k]) if self.augment else None
            crops[row] = self.transform.place(pixels[k], generator)
        return pixels_to_tensor(crops), targets[torch.as_tensor([indices[k] for k in kept], dtype=torch.long)]

    def prepared(self, indices: list[int]) -> list[np.ndarray | None]:
        """Each image's prepared pixels, uint8 (H, W, C): from the pixel cache, else decoded (and cached); None for
        a skipped corrupt image."""
        cache = self.pixel_cache
        pixels = [cache.get(index) if cache is not None else None for index in indices]
        missing = [k for k, item in enumerate(pixels) if item is None]
        if missing:
            cells = self.rows[[indices[k] for k in missing]][self.image_column]  # one Arrow read for the batch
            for k, cell in zip(missing, cells):
                pixels[k] = self.decode_prepared(cell, indices[k])
                if cache is not None:
                    cache.put(indices[k], pixels[k])
        return pixels

    def decode_prepared(self, cell: dict, index: int) -> np.ndarray | None:
        name = image_name(cell, f"row {index} of column {self.image_column!r}")
        try:
            return self.transform.prepare(decode_image(cell, name), name)
        except CorruptImageError as error:
            if not self.skip_corrupt_images:
                raise CorruptImageError(f"{error} (pass --skip_corrupt_images to skip such files)") from error
            logger.warning("skipped a corrupt image: %s", error)
            return None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.pixel_cache is not None:
            self.pixel_cache.seal_if_complete()  # a file filled by the passes so far serves later runs

    @property
    def label_values(self) -> torch.Tensor:
        """(N,) long, read once."""
        if self._label_values is None:
            self._label_values = self.labels
        return self._label_values

    @property
    def labels(self) -> torch.Tensor:
        """(N,) long: read from the label column alone, no image is decoded."""
        if not self.label_column:
            return torch.zeros(len(self), dtype=torch.long)
        return torch.as_tensor(self.rows.with_format("numpy")[self.label_column], dtype=torch.long)

    @property
    def captions(self) -> list[str] | None:
        """The caption column (read alone, no image is decoded), or None without one."""
        if not self.caption_column:
            return None
        captions = self.rows[self.caption_column]
        missing = next((i for i, caption in enumerate(captions) if not isinstance(caption, str)), None)
        if missing is not None:
            raise ValueError(f"row {missing} of the caption column {self.caption_column!r} holds "
                             f"{captions[missing]!r}, not a string: every training image needs a caption")
        return captions


class StreamingImageDataset(_ImageRows, IterableDataset):
    """Iterable: a streamed `datasets.IterableDataset` (already split to this process), decoded as it streams.

    `skip_batches(n, batch_size)` makes the next pass start after its first n batches without decoding them
    (resume); with DataLoader workers, batch i comes from worker i mod num_workers, as torch interleaves them.
    """

    batches_to_skip = 0
    batch_size = 1

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.rows.set_epoch(epoch)  # reshuffles the shards and the shuffle buffer

    def skip_batches(self, num_batches: int, batch_size: int) -> None:
        self.batches_to_skip, self.batch_size = num_batches, batch_size

    def __iter__(self):
        # not a generator function: the skip is read now, when the DataLoader (or its worker) starts the pass
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        skipped = max(0, self.batches_to_skip - worker_id + num_workers - 1) // num_workers  # this worker's share
        return self._decoded(skipped * self.batch_size, worker_id, num_workers)

    def _decoded(self, start: int, worker_id: int, num_workers: int):
        for position, row in enumerate(itertools.islice(self.rows, start, None), start):
            # the per-sample index: distinct across workers, the same after a resume
            index = position * num_workers + worker_id
            item = self.decode(row, index, sample_generator(self.seed, self.epoch, index) if self.augment else None)
            if item is not None:
                yield item


class _WholeBatches(Dataset):
    """An ImageDataset seen by a DataLoader as whole batches: one indexing operation per batch instead of one
    lookup per image and a stack (torch's DataLoader calls `__getitems__` with the batch's indices)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.dataset
        images, labels = data[torch.as_tensor(indices)]
        if data.augment and data.random_flip:
            flip = torch.tensor([sample_generator(data.seed, data.epoch, i).random() < 0.5 for i in indices])
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, labels


def collate_images(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks (image, label) items into (B, C, H, W) and (B,); skipped corrupt images (None) are left out."""
    items = [item for item in items if item is not None]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    images, labels = zip(*items)
    return torch.stack(images), torch.stack(labels)


def _already_collated(batch):
    return batch


def collate_function(dataset):
    """How a DataLoader over `dataset` makes batches: datasets with `__getitems__` (in memory, files, cached
    latents) return whole batches themselves; others give items that `collate_images` stacks."""
    return _already_collated if hasattr(dataset, "__getitems__") else collate_images


def training_dataloader(dataset, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled full batches of (images (B, C, H, W), labels (B,)), reproducible from `seed`.

    In-memory images are indexed a whole batch at a time; file datasets are read a batch at a time in
    `num_workers` worker processes; a streamed dataset is shuffled by `datasets` (buffer) and not here.
    """
    # its own generator: starting a pass then draws the workers' base seed from it, not from torch's global RNG
    # (which the training step's noise uses, and a resumed run restores)
    common = dict(batch_size=batch_size, drop_last=True, num_workers=num_workers,
                  generator=torch.Generator().manual_seed(seed))
    if isinstance(dataset, StreamingImageDataset):
        return DataLoader(dataset, collate_fn=collate_images, **common)
    if isinstance(dataset, ImageDataset):
        dataset = _WholeBatches(dataset)
    return DataLoader(dataset, shuffle=True, collate_fn=collate_function(dataset), **common)


def image_batches(dataset, num_images: int | None = None, seed: int = 0, batch_size: int = 250, num_workers: int = 0,
                  shuffle: bool = True):
    """Batches (images (B, C, H, W), labels (B,)) of `num_images` images of `dataset` (None: all), as they are
    stored (no augmentation): for a map-style dataset the first `num_images` of a permutation drawn with `seed`
    (in order without `shuffle`), for a streamed one its first `num_images`. Skipped corrupt images are left out."""
    if isinstance(dataset, IterableDataset):
        items = itertools.islice((item for item in dataset if item is not None), num_images)
        while batch := list(itertools.islice(items, batch_size)):
            yield collate_images(batch)
        return
    num_images = len(dataset) if num_images is None else num_images
    if shuffle:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
    else:
        order = torch.arange(num_images)
    if isinstance(dataset, ImageDataset):  # in memory: plain indexing, never augmented
        for start in range(0, len(order), batch_size):
            yield dataset[order[start:start + batch_size]]
        return
    yield from DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers,
                          collate_fn=collate_function(dataset))
    if getattr(dataset, "pixel_cache", None) is not None:
        dataset.pixel_cache.seal_if_complete()


def default_num_workers(dataset, num_processes: int = 1) -> int:
    """DataLoader workers for `dataset`: none for data in memory (a batch is one indexing operation) or with
    fewer than 4 cores per process (the workers would take the training step's cores); else half the cores of
    each process, at most 8, to decode images while the step runs."""
    if not isinstance(dataset, _ImageRows):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores_per_process = cores // max(1, num_processes)
    return 0 if cores_per_process < 4 else min(8, cores_per_process // 2)


def dataset_length(dataset) -> int | None:
    """len(dataset), or None for a streamed dataset."""
    return None if isinstance(dataset, IterableDataset) else len(dataset)

