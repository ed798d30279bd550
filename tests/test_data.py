"""The data path: bundled digits, image folders, saved and parquet datasets, streaming, transforms and errors."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

import hfgen.data.transforms as transforms_module
from hfgen.data import (
    CorruptImageError, ImageFileDataset, ImageTransform, StreamingImageDataset, collate_images, image_batches,
    load_image_dataset, open_image_source, training_dataloader)
from helpers import write_image_folder, write_mixed_folder


def test_mnist_split_is_fixed_disjoint_and_shuffled(mnist_train, mnist_test):
    assert len(mnist_train) == 4000 and len(mnist_test) == 1000
    assert mnist_train.image_shape == (1, 28, 28) and mnist_train.num_classes == 10
    assert mnist_train.images.min() >= 0 and mnist_train.images.max() <= 1
    # the raw rows are sorted by label: a fixed shuffle must spread every class over both splits
    assert mnist_test.labels.bincount(minlength=10).min() > 60
    assert len(set(mnist_train.labels[:50].tolist())) >= 8
    train_rows = {row.numpy().tobytes() for row in mnist_train.images.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in mnist_test.images.flatten(1))
    again = load_image_dataset("hfgen:mnist", "test")
    assert torch.equal(again.images, mnist_test.images)


def test_digits_resized():
    digits = load_image_dataset("hfgen:digits", "train", resolution=16)
    assert digits.image_shape == (1, 16, 16)
    assert len(digits) + len(load_image_dataset("hfgen:digits", "test", resolution=16)) == 1797


def test_a_folder_without_a_test_split_trains_on_all_its_images(tmp_path):
    write_image_folder(tmp_path, per_class=5)
    source = open_image_source(None, str(tmp_path))
    assert source.splits == ("train",) and source.test_split == "train"
    train = source.dataset("train", 8)
    assert len(train) == 10 and train.image_shape == (3, 8, 8)
    assert train.id2label == {"0": "cat", "1": "dog"} and sorted(train.labels.tolist()) == [0] * 5 + [1] * 5
    with pytest.raises(ValueError, match="has no test split: pass `validation_split`"):
        load_image_dataset(None, "test", resolution=8, train_data_dir=str(tmp_path))
    held_out = open_image_source(None, str(tmp_path), validation_split=0.2)
    assert held_out.test_split == "test"
    assert len(held_out.dataset("train", 8)) == 8 and len(held_out.dataset("test", 8)) == 2


def test_train_and_test_sub_folders_are_the_splits(tmp_path):
    write_image_folder(tmp_path / "train", per_class=4)
    write_image_folder(tmp_path / "test", per_class=2)
    source = open_image_source(None, str(tmp_path))
    assert source.splits == ("train", "test")
    assert len(source.dataset("train", 8)) == 8 and len(source.dataset("test", 8)) == 4


def test_image_folder_with_metadata_labels_and_captions(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        PIL.Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "label": i % 3, "text": f"image {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    data = open_image_source(None, str(tmp_path), caption_column="text").dataset("train", 8)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 3
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.caption_column == "text" and data.rows[4]["text"] == "image 4"


def test_odd_sizes_and_modes_become_square_images_of_one_shape(tmp_path):
    write_mixed_folder(tmp_path)
    source = open_image_source(None, str(tmp_path))
    for channels in (1, 3):
        data = source.dataset("train", 16, channels, augment=True, random_flip=True)
        images, labels = collate_images([data[i] for i in range(len(data))])
        assert images.shape == (6, channels, 16, 16) and images.dtype == torch.float32
        assert 0 <= images.min() and images.max() <= 1 and labels.tolist() == [0] * 6


def test_shorter_side_resize_then_center_crop_matches_pil():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8))  # 60 wide, 30 high
    out = ImageTransform(15, 3, center_crop=True)(image)
    expected = np.asarray(image.resize((30, 15), PIL.Image.BILINEAR).crop((8, 0, 23, 15)), dtype=np.float32) / 255
    assert torch.allclose(out, torch.from_numpy(expected).permute(2, 0, 1))


def test_random_crops_and_flips_depend_on_seed_epoch_and_sample_only(tmp_path):
    write_mixed_folder(tmp_path)
    data = open_image_source(None, str(tmp_path)).dataset("train", 8, 3, augment=True, random_flip=True, seed=3)
    first = [data[i][0] for i in range(6)]
    again = open_image_source(None, str(tmp_path)).dataset("train", 8, 3, augment=True, random_flip=True, seed=3)
    assert all(torch.equal(a, again[i][0]) for i, a in enumerate(first))
    data.set_epoch(1)
    assert any(not torch.equal(a, data[i][0]) for i, a in enumerate(first))  # another epoch, other crops and flips
    evaluation = open_image_source(None, str(tmp_path)).dataset("train", 8, 3, random_flip=True)
    evaluation.set_epoch(5)
    assert all(torch.equal(evaluation[i][0], evaluation[i][0]) for i in range(6))  # no augmentation when evaluating


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(CorruptImageError, match=r"broken\.png.*--skip_corrupt_images"):
        open_image_source(None, str(tmp_path)).dataset("train", 8)  # its header is read before any training
    skipping = open_image_source(None, str(tmp_path)).dataset("train", 8, skip_corrupt_images=True)
    broken = next(i for i in range(len(skipping)) if skipping.rows[i]["image"]["path"].endswith("broken.png"))
    assert skipping[broken] is None
    images, _ = collate_images([skipping[i] for i in range(len(skipping))])
    assert len(images) == len(skipping) - 1


def test_building_the_training_data_decodes_no_image(tmp_path, monkeypatch):
    write_image_folder(tmp_path, per_class=20)
    decoded = []
    original = transforms_module.decode_image
    monkeypatch.setattr("hfgen.data.image_datasets.decode_image",
                        lambda image, name: decoded.append(name) or original(image, name))
    data = open_image_source(None, str(tmp_path)).dataset("train", 8, augment=True)
    loader = training_dataloader(data, batch_size=4, seed=0)
    assert len(loader) == 10 and data.num_classes == 2 and decoded == []
    images, _ = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and len(decoded) == 4


def test_saved_and_parquet_datasets_load_and_stream(tmp_path):
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)) for _ in range(12)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    table = datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(12)]}, features=features)
    splits = datasets.DatasetDict({"train": table.select(range(9)), "validation": table.select(range(9, 12))})
    splits.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parquet").mkdir()
    table.to_parquet(str(tmp_path / "parquet" / "train.parquet"))

    saved = open_image_source(str(tmp_path / "saved"))
    assert saved.image_column == "img" and saved.test_split == "validation" and saved.id2label["2"] == "c"
    assert len(saved.dataset("train", 8)) == 9 and saved.dataset("validation", 8)[0][0].shape == (3, 8, 8)
    expected = torch.stack([saved.dataset("train", 8)[i][0] for i in range(9)])
    for path in (tmp_path / "saved", tmp_path / "parquet"):
        streamed = open_image_source(str(path), streaming=True)
        assert streamed.id2label["2"] == "c"
        data = streamed.dataset("train", 8)
        assert isinstance(data, StreamingImageDataset)
        batches = list(image_batches(data, 9, batch_size=4))
        assert [len(images) for images, _ in batches] == [4, 4, 1]
        assert torch.equal(torch.cat([images for images, _ in batches]), expected)
    parquet = open_image_source(str(tmp_path / "parquet"))
    assert isinstance(parquet.dataset("train", 8), ImageFileDataset) and len(parquet.dataset("train", 8)) == 12


def test_streamed_training_batches_resume_after_skipped_batches(tmp_path):
    write_image_folder(tmp_path, per_class=10)
    data = open_image_source(None, str(tmp_path), streaming=True).dataset("train", 8, augment=True, random_flip=True)
    loader = training_dataloader(data, batch_size=4, seed=0)
    data.set_epoch(1)
    full = [images for images, _ in loader]
    data.skip_batches(2, 4)
    resumed = [images for images, _ in loader]
    assert len(full) == 5 and len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(full[2:], resumed))


def test_max_train_samples_takes_a_fixed_subset(tmp_path):
    write_image_folder(tmp_path, per_class=5)
    subset = open_image_source(None, str(tmp_path), max_train_samples=4).dataset("train", 8)
    again = open_image_source(None, str(tmp_path), max_train_samples=4).dataset("train", 8)
    assert len(subset) == 4 and subset.labels.tolist() == again.labels.tolist()
    assert len(open_image_source("hfgen:mnist", max_train_samples=100).dataset("train", 28)) == 100


def test_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in `dataset_name` 'hfgen:cifar'.*hfgen:mnist"):
        load_image_dataset("hfgen:cifar")
    with pytest.raises(ValueError, match="could not load dataset_name='no-such-user/no-such-dataset'"):
        load_image_dataset("no-such-user/no-such-dataset")
    with pytest.raises(ValueError, match="`train_data_dir`.*is not a folder"):
        load_image_dataset(None, train_data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="holds no image files"):
        load_image_dataset(None, train_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`split`"):
        load_image_dataset("hfgen:mnist", "validation")
    with pytest.raises(ValueError, match="`resolution`"):
        load_image_dataset("hfgen:mnist", resolution=0)


def test_bad_columns_fractions_and_crops_are_clear_errors(tmp_path):
    write_image_folder(tmp_path, per_class=3, size=12)
    with pytest.raises(ValueError, match=r"`image_column` 'photo' is not a column.*\['image', 'label'\]"):
        open_image_source(None, str(tmp_path), image_column="photo")
    with pytest.raises(ValueError, match="`caption_column` 'text' is not a column"):
        open_image_source(None, str(tmp_path), caption_column="text")
    for fraction in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"`validation_split` must be a fraction in \(0, 1\)"):
            open_image_source(None, str(tmp_path), validation_split=fraction)
    with pytest.raises(ValueError, match=r"image .*\.png is 12x12, smaller than `resolution` 16"):
        open_image_source(None, str(tmp_path)).dataset("train", 16, resize=False)
    with pytest.raises(ValueError, match="`validation_split` needs the dataset's length"):
        open_image_source(None, str(tmp_path), streaming=True, validation_split=0.1)
    with pytest.raises(ValueError, match="`streaming` does not apply to the bundled hfgen:mnist"):
        open_image_source("hfgen:mnist", streaming=True)


def test_each_process_streams_its_own_shard(tmp_path):
    write_image_folder(tmp_path, per_class=16)
    seen = []
    for rank in (0, 1):
        source = open_image_source(None, str(tmp_path), streaming=True, process_index=rank, num_processes=2)
        data = source.dataset("train", 8, augment=True)
        seen.append([row["image"]["path"] for row in data.rows])
    assert len(seen[0]) == len(seen[1]) == 16 and not set(seen[0]) & set(seen[1])
