import json

import numpy as np
import PIL.Image
import pytest
import torch

from hfgen.data import load_image_dataset


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


def write_image_folder(root, classes=("cat", "dog"), per_class=3, size=12, mode="RGB"):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            PIL.Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


def test_image_folder_with_class_folders(tmp_path):
    write_image_folder(tmp_path, per_class=5)
    train = load_image_dataset(None, "train", resolution=8, train_data_dir=str(tmp_path))
    test = load_image_dataset(None, "test", resolution=8, train_data_dir=str(tmp_path))
    assert train.image_shape == (3, 8, 8) and len(train) + len(test) == 10 and len(test) == 2
    assert train.id2label == {"0": "cat", "1": "dog"}
    assert set(train.labels.tolist()) <= {0, 1}


def test_image_folder_with_metadata_labels(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        PIL.Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "label": i % 3})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    data = load_image_dataset(None, "train", resolution=8, train_data_dir=str(tmp_path))
    assert data.image_shape == (1, 8, 8)
    assert set(data.labels.tolist()) <= {0, 1, 2} and data.num_classes == 3


def test_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in `dataset_name` 'hfgen:cifar'.*hfgen:mnist"):
        load_image_dataset("hfgen:cifar")
    with pytest.raises(ValueError, match="could not load dataset_name='no-such-user/no-such-dataset'"):
        load_image_dataset("no-such-user/no-such-dataset")
    with pytest.raises(ValueError, match="`train_data_dir`.*is not a folder"):
        load_image_dataset(None, train_data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="`split`"):
        load_image_dataset("hfgen:mnist", "validation")
    with pytest.raises(ValueError, match="`resolution`"):
        load_image_dataset("hfgen:mnist", resolution=0)
