"""The domain feature space (issue 29, item 2): "classifier", a small CNN trained once on a labelled dataset's
training split and cached by its fingerprint, image shape and recipe, whose penultimate features serve FD and the
sample metrics. On small data made here (coloured shapes, 16 px RGB) and the bundled 8x8 digits:

- trained once, cached atomically and reused; the same seed gives the same weights;
- FD(train vs test) << FD(blurred test) << FD(noise);
- FD falls as a model (a VAE) trains: its checkpoints ranked in training order, as pixel-space KID ranks them;
- image sets degraded by growing amounts ranked as pixel-space KID ranks them.
"""

import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import hfgen.features
from hfgen import ConditionalPipeline, VAEModel
from hfgen.data import ImageDataset, load_image_dataset, open_image_source
from hfgen.evaluation import evaluate_pipeline
from hfgen.features import (
    ClassifierFeatures,
    _labelled_images,
    describe_feature_space,
    domain_block_channels,
    domain_classifier_dir,
    load_feature_extractor,
    resolve_feature_extractor,
    train_domain_classifier,
)
from hfgen.frechet import frechet_distance
from hfgen.models.classifier import DigitClassifier, DomainClassifier
from hfgen.sample_metrics import kernel_distance

SHAPES = {"0": "disc", "1": "square", "2": "cross"}


def coloured_shapes(num_images: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) images in [0, 1] of a disc, a square or a cross (label i % 3) of a random colour, size and
    place on a random light background, and their labels (N,)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % 3
    grid = torch.arange(size) + 0.5
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    centre = (0.3 + 0.4 * torch.rand(num_images, 2, generator=generator)) * size
    radius = ((0.2 + 0.12 * torch.rand(num_images, generator=generator)) * size)[:, None, None]
    dx, dy = (xs - centre[:, 0, None, None]).abs(), (ys - centre[:, 1, None, None]).abs()
    disc = dx ** 2 + dy ** 2 < radius ** 2
    square = torch.maximum(dx, dy) < 0.85 * radius
    cross = ((dx < 0.3 * radius) & (dy < radius)) | ((dy < 0.3 * radius) & (dx < radius))
    mask = torch.stack([disc, square, cross], 1)[torch.arange(num_images), labels]
    colour = torch.rand(num_images, 3, 1, 1, generator=generator)
    background = 0.75 + 0.25 * torch.rand(num_images, 3, 1, 1, generator=generator)
    return torch.where(mask[:, None], colour, background), labels


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of `sigma` pixels (separable, edges replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    kernel, channels = taps / taps.sum(), images.shape[1]
    images = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    images = F.conv2d(images, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    images = F.pad(images, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(images, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def pixel_kid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """KID with the flattened pixels as features (hfgen's KID: torchmetrics' polynomial-kernel MMD)."""
    return kernel_distance(real.flatten(1), fake.flatten(1), num_subsets=20, seed=0)[0]


def ranks(values) -> list[int]:
    return np.argsort(np.argsort(values)).tolist()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("domain-cache"))


@pytest.fixture(scope="module")
def shapes():
    """1,500 training shapes (a labelled ImageDataset) and 500 test images."""
    images, labels = coloured_shapes(1500, seed=0)
    return ImageDataset(images, labels, SHAPES), coloured_shapes(500, seed=1)[0]


@pytest.fixture(scope="module")
def shape_features(shapes, cache_dir):
    return load_feature_extractor("classifier", dataset=shapes[0], dataset_name="shapes", cache_dir=cache_dir)


# ----- training, caching, determinism ---------------------------------------------------------------------------


def test_the_classifier_is_trained_once_cached_atomically_and_reused(shapes, shape_features, cache_dir, monkeypatch):
    train, test = shapes
    features = shape_features
    assert isinstance(features, ClassifierFeatures) and isinstance(features.classifier, DomainClassifier)
    assert features.num_features == 128 and features.in_channels == 3 and not features.training
    assert features.cache_id.startswith("domain-classifier-")
    assert features(test[:5]).shape == (5, 128)
    folder = domain_classifier_dir(train, cache_dir)
    assert os.path.dirname(folder) == os.path.join(cache_dir, "domain-classifiers")
    assert {"config.json", "README.md"} <= set(os.listdir(folder))
    assert not [name for name in os.listdir(os.path.dirname(folder)) if name.startswith(".")]  # no staging left
    record = features.classifier.config.trained_on
    assert record["fingerprint"] == train.fingerprint and record["num_images"] == 1500
    assert record["image_shape"] == [3, 16, 16] and record["recipe"]["block_out_channels"] == [16, 32]
    assert record["num_epochs"] == 17  # 8 epochs would be 192 steps of 64 images: as many as make 400 steps

    # reused: loading again trains nothing, and gives the same features
    monkeypatch.setattr(hfgen.features, "_fit_classifier", lambda *args, **kwargs: pytest.fail("trained again"))
    again = load_feature_extractor("classifier", dataset=train, dataset_name="shapes", cache_dir=cache_dir)
    assert again.cache_id == features.cache_id
    torch.testing.assert_close(again(test[:20]), features(test[:20]), rtol=0, atol=0)
    # the cached folder is a feature extractor by itself, with the same space
    by_folder = load_feature_extractor(folder)
    assert by_folder.cache_id == features.cache_id and by_folder.feature_space == features.feature_space
    # another recipe, another dataset: another folder
    assert domain_classifier_dir(train, cache_dir, seed=1) != folder
    assert domain_classifier_dir(ImageDataset(train.images[:100], train.labels[:100], SHAPES), cache_dir) != folder


def test_training_is_deterministic_and_leaves_the_global_rng_alone(shapes, shape_features, tmp_path):
    train, _ = shapes
    state = torch.random.get_rng_state()
    fresh = train_domain_classifier(train, dataset_name="shapes", cache_dir=str(tmp_path / "a"))
    assert torch.equal(torch.random.get_rng_state(), state)
    expected = shape_features.classifier.state_dict()
    assert all(torch.equal(fresh.state_dict()[name], expected[name]) for name in expected)
    assert ClassifierFeatures(fresh).cache_id == shape_features.cache_id
    few = ImageDataset(train.images[:200], train.labels[:200], SHAPES)
    seeds = [train_domain_classifier(few, num_epochs=1, min_steps=4, cache_dir=str(tmp_path / "b"), seed=seed)
             for seed in (0, 1)]
    assert not torch.equal(seeds[0].state_dict()["head.weight"], seeds[1].state_dict()["head.weight"])


def test_the_feature_space_is_named_for_the_card(shape_features, tmp_path):
    space = describe_feature_space(shape_features)
    assert space.startswith("the 128-d penultimate features of a classifier trained by hfgen on `shapes`'s train split "
                            "labels (3 classes: disc, square, cross; 1,500 images of 3x16x16; 17 epochs, seed 0;")
    assert space.endswith(f"cache_id {shape_features.cache_id}")

    class Pixels(torch.nn.Module):
        num_features, cache_id = 768, "pixels-v1"

    assert describe_feature_space(Pixels()) == "the 768-d features of a Pixels, cache_id pixels-v1"


def test_digit_classifier_cache_ids_are_unchanged(tmp_path):
    torch.manual_seed(0)
    classifier = DigitClassifier(sample_size=8, num_classes=3, feature_dim=4, block_out_channels=(2,))
    assert ClassifierFeatures(classifier).cache_id == "digit-classifier-3b91fbcb8bfb6714"  # as before issue 29
    classifier.save_pretrained(tmp_path)
    loaded = load_feature_extractor(str(tmp_path))
    assert loaded.cache_id == "digit-classifier-3b91fbcb8bfb6714" and type(loaded.classifier) is DigitClassifier
    described = describe_feature_space(loaded)
    assert described.startswith(f"the 4-d penultimate features of the DigitClassifier saved in {tmp_path}")


def test_block_channels_follow_the_image_size():
    assert [domain_block_channels(size) for size in (4, 8, 16, 28, 32, 64, 256)] == [
        (16,), (16,), (16, 32), (16, 32), (16, 32, 64), (16, 32, 64, 128), (16, 32, 64, 128)]


# ----- the three behaviour checks --------------------------------------------------------------------------------


def test_fd_of_the_test_split_is_far_below_blurred_images_far_below_noise(shapes, shape_features):
    train, test = shapes
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(2))
    real = frechet_distance(train.images, test, shape_features)
    blurred = frechet_distance(train.images, blur(test, 1.0), shape_features)
    noisy = frechet_distance(train.images, noise, shape_features)
    assert 20 * real < blurred and 3 * blurred < noisy, (real, blurred, noisy)


def test_degraded_sets_rank_as_pixel_kid_ranks_them(shapes, shape_features):
    train, test = shapes
    generator = torch.Generator().manual_seed(3)
    degraded = [test] + [(blur(test, sigma) + amount * torch.randn(test.shape, generator=generator)).clamp(0, 1)
                         for sigma, amount in ((0.5, 0.05), (0.8, 0.1), (1.2, 0.2), (2.0, 0.35))]
    fds = [frechet_distance(train.images, images, shape_features) for images in degraded]
    kids = [pixel_kid(train.images, images) for images in degraded]
    assert ranks(fds) == ranks(kids) == list(range(len(degraded))), (fds, kids)


def test_fd_falls_as_a_vae_trains_on_the_bundled_digits_as_pixel_kid_does(cache_dir):
    train = load_image_dataset("hfgen:digits", "train", resolution=8)
    test = load_image_dataset("hfgen:digits", "test", resolution=8)
    features = load_feature_extractor("classifier", dataset=train, dataset_name="hfgen:digits", cache_dir=cache_dir)
    assert features.num_features == 128 and features.in_channels == 1
    torch.manual_seed(0)
    vae = VAEModel(sample_size=8, in_channels=1, latent_dim=8, hidden_dims=(128,))
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(test), 8, generator=torch.Generator().manual_seed(5))
    fds, kids, step = [], [], 0
    for checkpoint in (3, 30, 100, 400):  # steps
        while step < checkpoint:
            batch = train.images[torch.randint(len(train), (64,), generator=generator)]
            loss = -vae(batch, generator=generator).elbo.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        with torch.no_grad():
            samples = vae.decode(latents).sample
        fds.append(frechet_distance(test.images, samples, features))
        kids.append(pixel_kid(test.images, samples))
    assert fds == sorted(fds, reverse=True) and ranks(fds) == ranks(kids), (fds, kids)
    assert fds[-1] < 0.5 * fds[0]


# ----- datasets and the rest of hfgen ----------------------------------------------------------------------------


def test_an_image_folder_is_read_as_stored_with_its_class_folder_labels(tmp_path):
    images, labels = coloured_shapes(36, seed=4)
    for split in ("train", "test"):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = tmp_path / "shapes" / split / SHAPES[str(int(label))]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
            PIL.Image.fromarray(pixels).save(folder / f"{i}.png")
    source = open_image_source(None, train_data_dir=str(tmp_path / "shapes"))
    augmented = source.dataset("train", 16, augment=True, random_flip=True)
    stored = source.dataset("train", 16, random_flip=True)
    read, read_labels, num_classes = _labelled_images(augmented)
    expected, expected_labels = stored.__getitems__(list(range(len(stored))))
    torch.testing.assert_close(read, expected, rtol=0, atol=0)  # not augmented
    assert torch.equal(read_labels, expected_labels) and num_classes == 3 and augmented.augment
    assert sorted(source.id2label.values()) == sorted(SHAPES.values())
    classifier = train_domain_classifier(augmented, dataset_name="shapes/", num_epochs=1, min_steps=5,
                                         cache_dir=str(tmp_path / "cache"))
    assert classifier.config.trained_on["num_images"] == 36 and classifier.config.id2label == source.id2label
    assert train_domain_classifier(stored, dataset_name="shapes/", num_epochs=1, min_steps=5,
                                   cache_dir=str(tmp_path / "cache")).config.trained_on == classifier.config.trained_on
    features = ClassifierFeatures(classifier)
    test = source.dataset("test", 16)
    assert features(test.__getitems__([0, 1, 2, 3])[0]).shape == (4, 128)


def test_sample_metrics_and_class_accuracy_work_in_the_domain_features(shapes, shape_features, monkeypatch, tmp_path):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path))  # FD statistics
    train, test = shapes
    torch.manual_seed(0)
    model = VAEModel(sample_size=16, in_channels=3, hidden_dims=[16], latent_dim=2, num_classes=3, id2label=SHAPES)
    dataset = ImageDataset(test, torch.arange(len(test)) % 3, SHAPES)
    metrics = evaluate_pipeline(ConditionalPipeline(model.eval()), dataset, 100, shape_features, batch_size=50,
                                likelihood=False, sample_metrics=True)
    assert {"fd", "kid", "precision", "recall", "density", "coverage", "class_accuracy"} <= set(metrics)
    assert metrics["fd"] > 0 and 0 <= metrics["class_accuracy"] <= 1


def test_bad_inputs_name_the_argument(shapes, tmp_path):
    train, _ = shapes
    with pytest.raises(ValueError, match="pass that split as `dataset`"):
        load_feature_extractor("classifier")
    one_class = ImageDataset(train.images[:10], torch.zeros(10, dtype=torch.long), {"0": "disc"})
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_domain_classifier(one_class, cache_dir=str(tmp_path))
    with pytest.raises(TypeError, match="`dataset` must be an hfgen dataset"):
        train_domain_classifier(train.images, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`num_epochs`"):
        train_domain_classifier(train, num_epochs=0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`learning_rate`"):
        train_domain_classifier(train, learning_rate=-1.0, cache_dir=str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing cached by a refused call
    assert resolve_feature_extractor("classifier", (3, 16, 16)) == "classifier"


def test_a_training_run_evaluates_in_its_own_domain_features_and_says_so(tmp_path, monkeypatch):
    import json

    from helpers import quick_training_args, write_image_folder

    from hfgen.training import train_vae

    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "images", per_class=16, size=8)
    train_vae.main(quick_training_args(
        tmp_path / "run", "--train_data_dir", tmp_path / "images", "--resolution", "8", "--feature_extractor",
        "classifier", "--architecture", "conv", "--hidden_dims", "8", "16", "--latent_dim", "4", "--max_train_steps",
        "3", "--train_batch_size", "8", "--eval_num_samples", "16", "--num_validation_images", "4",
        "--eval_importance_samples", "2"))
    assert math.isfinite(json.loads((tmp_path / "run" / "metrics.json").read_text())["fd"])
    card = (tmp_path / "run" / "README.md").read_text()
    assert "classifier trained by hfgen on" in card and "domain-classifier-" in card
