"""Fréchet distance: the maths against the closed form, streamed statistics and their cache, its behaviour on real
digits, the default feature extractor (trained once per session into a temporary $HFGEN_CACHE), evaluate_pipeline
on in-memory, lazily decoded and streamed datasets, and `hfgen evaluate`."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torchmetrics.utilities.imports
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import ModelCard
from PIL import Image
from scipy import linalg
from torch import nn

from helpers import Identity, save_dinov2
from hfgen import ConditionalPipeline, DDPMPipeline, DigitClassifier, VAEModel, VAEPipeline
from hfgen import features as hfgen_features
from hfgen import frechet as hfgen_frechet
from hfgen.cli import main
from hfgen.data import ImageDataset
from hfgen.evaluation import evaluate_pipeline
from hfgen.features import classifier_accuracy, default_classifier_dir, load_feature_extractor, train_digit_classifier
from hfgen.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    load_cached_statistics,
    save_cached_statistics,
)
from hfgen.hub_utils import update_model_card_metrics, write_model_card
from hfgen.likelihood import diffusion_bits_per_dim
from hfgen.models.classifier import ClassifierOutput


@pytest.fixture(scope="session")
def cache_dir():
    """The session's temporary $HFGEN_CACHE (set in conftest.py): tests never write to the real cache."""
    return os.environ["HFGEN_CACHE"]


@pytest.fixture(scope="session")
def extractor(cache_dir):
    """The default feature extractor, trained on first use into `cache_dir` (~15 s on one core)."""
    return load_feature_extractor()


@pytest.fixture()
def fast_training(monkeypatch):
    """Replaces the classifier's training with an untrained model, for tests of caching and the CLI's messages."""
    def untrained(train_dataset, test_dataset, **kwargs):
        torch.manual_seed(0)
        return DigitClassifier().eval(), 0.1

    monkeypatch.setattr(hfgen_features, "train_digit_classifier", untrained)


def gaussian_images(mean, covariance, num, seed):
    """num 2-D Gaussian samples as 'images' of shape (num, 2, 1, 1), in float64."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.multivariate_normal(mean, covariance, size=num)).view(num, 2, 1, 1)


def closed_form_fd(x: np.ndarray, y: np.ndarray) -> float:
    # ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2}), with unbiased covariances
    mu_x, mu_y, s_x, s_y = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * linalg.sqrtm(s_x @ s_y).real))


# ----- the maths ------------------------------------------------------------------------------------------


def test_fd_equals_the_closed_form_for_identity_features():
    real = gaussian_images([0.4, 0.5], [[0.004, 0.001], [0.001, 0.002]], 3000, seed=0)
    fake = gaussian_images([0.5, 0.45], [[0.002, -0.0005], [-0.0005, 0.003]], 2000, seed=1)
    assert 0 <= real.min() and real.max() <= 1 and 0 <= fake.min() and fake.max() <= 1
    fd = frechet_distance(real, fake, Identity(2))
    expected = closed_form_fd(real.flatten(1).numpy(), fake.flatten(1).numpy())
    assert fd == pytest.approx(expected, rel=1e-4)
    assert expected > 0.01  # the means and the covariances both differ: every term of the formula counts


def test_fd_of_a_pure_shift_is_the_squared_shift():
    real = gaussian_images([0.4, 0.5], [[0.004, 0.001], [0.001, 0.002]], 1000, seed=0)
    shift = torch.tensor([0.1, -0.2], dtype=torch.float64).view(1, 2, 1, 1)
    assert frechet_distance(real, real + shift, Identity(2)) == pytest.approx(0.05, rel=1e-4)  # 0.1^2 + 0.2^2


def test_fd_does_not_depend_on_batch_size():
    real = gaussian_images([0.4, 0.5], [[0.004, 0.001], [0.001, 0.002]], 500, seed=0)
    fake = gaussian_images([0.5, 0.5], [[0.002, 0.0], [0.0, 0.002]], 500, seed=1)
    values = [frechet_distance(real, fake, Identity(2), batch_size=b) for b in (7, 100, 500)]
    assert values == pytest.approx([values[0]] * 3, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 500])
def test_streamed_statistics_give_the_fd_of_all_images_at_once(batch_size):
    real = gaussian_images([0.4, 0.5], [[0.004, 0.001], [0.001, 0.002]], 500, seed=0)
    fake = gaussian_images([0.5, 0.45], [[0.002, -0.0005], [-0.0005, 0.003]], 300, seed=1)
    real_statistics = feature_statistics(real.split(batch_size), Identity(2))
    fake_statistics = feature_statistics((batch for batch in fake.split(batch_size)), Identity(2))  # any iterable
    assert real_statistics.num == 500 and real_statistics.feature_sum.dtype == torch.float64
    torch.testing.assert_close(real_statistics.mean, real.flatten(1).mean(0))
    torch.testing.assert_close(real_statistics.covariance, torch.cov(real.flatten(1).T))
    fd = frechet_distance_from_statistics(real_statistics, fake_statistics)
    assert fd == pytest.approx(frechet_distance(real, fake, Identity(2)), rel=1e-10)
    assert fd == pytest.approx(closed_form_fd(real.flatten(1).numpy(), fake.flatten(1).numpy()), rel=1e-8)


def test_statistics_refuse_bad_batches_and_too_few_images():
    with pytest.raises(ValueError, match=r"`my images` must hold values in \[0, 1\]"):
        feature_statistics([torch.rand(4, 2, 1, 1), torch.rand(4, 2, 1, 1) * 3], Identity(2), name="my images")
    with pytest.raises(TypeError, match="integer `num_features`"):
        feature_statistics([torch.rand(4, 2, 1, 1)], nn.Flatten())
    with pytest.raises(ValueError, match=r"must map \(4, 3, 1, 1\) images to \(B, num_features\)"):
        feature_statistics([torch.rand(4, 3, 1, 1)], Identity(2))
    one = feature_statistics([torch.rand(1, 2, 1, 1)], Identity(2))
    two = feature_statistics([torch.rand(2, 2, 1, 1)], Identity(2))
    with pytest.raises(ValueError, match="`real` must hold the features of at least 2 images"):
        frechet_distance_from_statistics(one, two)
    with pytest.raises(ValueError, match="features of one width"):
        frechet_distance_from_statistics(two, feature_statistics([torch.rand(4, 3, 1, 1)], Identity(3)))
    with pytest.raises(TypeError, match="`fake` must be FeatureStatistics"):
        frechet_distance_from_statistics(two, torch.rand(2, 2))


def test_cached_statistics_round_trip_and_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    statistics = feature_statistics([torch.rand(5, 2, 1, 1, dtype=torch.float64)], Identity(2))
    key, labels = {"dataset": "x", "images": "first 5", "features": "identity"}, torch.arange(5)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hfgen_frechet, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_cached_statistics(key, statistics, labels, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path / "fd-statistics") == []
    monkeypatch.undo()
    path = save_cached_statistics(key, statistics, labels, cache_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path / "fd-statistics")) == [os.path.basename(path), os.path.basename(path) + ".check.json"]
    loaded, loaded_labels = load_cached_statistics(key, cache_dir=str(tmp_path))
    assert loaded.num == 5 and torch.equal(loaded.outer_sum, statistics.outer_sum) and torch.equal(loaded_labels, labels)
    torch.testing.assert_close(loaded.feature_sum, statistics.feature_sum, rtol=0, atol=0)
    assert load_cached_statistics({**key, "images": "first 6"}, cache_dir=str(tmp_path)) is None


# ----- on real digits -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dinov2_extractor(tmp_path_factory):
    """A tiny random DINOv2 saved to a folder, loaded as a Hub checkpoint would be."""
    return load_feature_extractor("dinov2:" + save_dinov2(tmp_path_factory.mktemp("dinov2")))


@pytest.mark.parametrize("extractor_fixture, num_images, least", [("extractor", 1000, 0.5),
                                                                  ("dinov2_extractor", 200, 0.0)])
def test_fd_of_digits_with_themselves_is_zero_and_grows_with_noise(extractor_fixture, num_images, least, request,
                                                                   mnist_test):
    extractor = request.getfixturevalue(extractor_fixture)
    digits = mnist_test.images[:num_images]
    assert abs(frechet_distance(digits, digits, extractor)) < 1e-3
    generator = torch.Generator().manual_seed(0)
    distances = [
        frechet_distance(digits, (digits + sigma * torch.randn(digits.shape, generator=generator)).clamp(0, 1), extractor)
        for sigma in (0.05, 0.1, 0.2, 0.4)
    ]
    assert distances == sorted(distances) and distances[0] > least, distances


def test_fd_between_halves_of_real_digits_is_far_below_real_versus_noise(extractor, mnist_test):
    digits = mnist_test.images
    halves = frechet_distance(digits[:500], digits[500:], extractor)
    noise = frechet_distance(digits, torch.rand(digits.shape, generator=torch.Generator().manual_seed(0)), extractor)
    assert 0 < halves < 0.05 * noise, (halves, noise)


# ----- the default feature extractor ----------------------------------------------------------------------


def test_default_classifier_is_accurate_and_its_cached_folder_round_trips(extractor, cache_dir, mnist_test):
    folder = default_classifier_dir()
    assert folder == os.path.join(str(cache_dir), "digit-classifier")
    assert "digit-classifier" in os.listdir(cache_dir)
    assert not [name for name in os.listdir(cache_dir) if name.startswith(".")]  # no staging folder left behind
    accuracy = classifier_accuracy(extractor.classifier, mnist_test)
    assert accuracy > 0.97
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.eval_results[0].metric_value == pytest.approx(accuracy, abs=1e-4)
    assert f"{accuracy:.2%}" in card.text
    reloaded = DigitClassifier.from_pretrained(folder)
    digits = mnist_test.images[:64]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(digits).features, extractor(digits), rtol=0, atol=0)
    assert extractor.num_features == 128 and extractor(digits).shape == (64, 128)


def test_cached_classifier_is_reused_and_a_saved_folder_loads(extractor, cache_dir, monkeypatch, mnist_test):
    def fail(*args, **kwargs):
        raise AssertionError("the cached classifier was retrained")

    monkeypatch.setattr(hfgen_features, "train_digit_classifier", fail)
    digits = mnist_test.images[:16]
    with torch.no_grad():
        torch.testing.assert_close(load_feature_extractor()(digits), extractor(digits), rtol=0, atol=0)
        by_path = load_feature_extractor(default_classifier_dir())
        torch.testing.assert_close(by_path(digits), extractor(digits), rtol=0, atol=0)


def test_an_interrupted_cache_write_leaves_no_folder(tmp_path, monkeypatch, fast_training):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ModelCard, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        load_feature_extractor(cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setattr(hfgen_features, "train_digit_classifier", lambda *a, **k: (DigitClassifier().eval(), 0.1))
    assert load_feature_extractor(cache_dir=str(tmp_path)).num_features == 128
    assert os.listdir(tmp_path) == ["digit-classifier"]


def test_train_digit_classifier_is_deterministic_for_a_seed(mnist_train, mnist_test):
    small = ImageDataset(mnist_train.images[:256], mnist_train.labels[:256], mnist_train.id2label)
    first, accuracy = train_digit_classifier(small, mnist_test, num_epochs=1, seed=3)
    again, same_accuracy = train_digit_classifier(small, mnist_test, num_epochs=1, seed=3)
    other, _ = train_digit_classifier(small, mnist_test, num_epochs=1, seed=4)
    for name, weight in first.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], weight, rtol=0, atol=0)
    assert accuracy == same_accuracy
    assert not torch.equal(other.state_dict()["head.weight"], first.state_dict()["head.weight"])


def test_digit_classifier_outputs_and_input_checks():
    classifier = DigitClassifier(feature_dim=32)
    output = classifier(torch.rand(3, 1, 28, 28))
    assert output.logits.shape == (3, 10) and output.features.shape == (3, 32) and (output.features >= 0).all()
    assert ClassifierOutput(**dict(output)).features is output.features  # accelerate rebuilds outputs from dicts
    with pytest.raises(ValueError, match=r"`sample` must have shape \(B, 1, 32, 32\)"):
        classifier(torch.rand(3, 3, 32, 32))
    # other sizes are resized to the classifier's 28 px first, as FID resizes to Inception's 299
    resized = torch.nn.functional.interpolate(torch.rand(3, 1, 28, 28), size=32, mode="bilinear")
    small = torch.nn.functional.interpolate(resized, size=28, mode="bilinear", antialias=True)
    assert torch.equal(classifier(resized).features, classifier(small).features)
    with pytest.raises(ValueError, match="sample_size"):
        DigitClassifier(sample_size=2)


def test_inception_without_torch_fidelity_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(torchmetrics.utilities.imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ImportError, match="needs torch-fidelity"):
        load_feature_extractor("inception")


def test_unknown_feature_extractors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="`name_or_path` must be"):
        load_feature_extractor("hfgen:resnet")
    VAEModel(hidden_dims=[8], latent_dim=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not hold a saved DigitClassifier"):
        load_feature_extractor(str(tmp_path))


# ----- bad inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "real, fake, error, match",
    [
        (torch.rand(8, 3, 28, 28), torch.rand(8, 1, 28, 28), ValueError,
         r"`real_images` must have shape \(N, 1, S, S\)"),
        (torch.rand(8, 1, 32, 28), torch.rand(8, 1, 28, 28), ValueError, r"`real_images` must have shape \(N, 1, S, S\)"),
        (torch.rand(8, 1, 32, 32), torch.rand(8, 1, 28, 28), ValueError, "must have the same image shape"),
        (torch.rand(8, 28, 28), torch.rand(8, 1, 28, 28), ValueError, "`real_images` must have shape"),
        (torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28) * 255, ValueError,
         r"`fake_images` must hold values in \[0, 1\]"),
        (torch.rand(8, 1, 28, 28), torch.full((8, 1, 28, 28), float("nan")), ValueError, r"values in \[0, 1\]"),
        (torch.rand(8, 1, 28, 28), torch.rand(1, 1, 28, 28), ValueError, "`fake_images` must hold at least 2 images"),
        (torch.randint(0, 255, (8, 1, 28, 28), dtype=torch.uint8), torch.rand(8, 1, 28, 28), TypeError, "float tensor"),
    ],
)
def test_bad_images_are_refused_with_the_argument_named(extractor, real, fake, error, match):
    with pytest.raises(error, match=match):
        frechet_distance(real, fake, extractor)


def test_bad_extractors_and_mismatched_shapes_are_refused():
    images = torch.rand(4, 2, 1, 1)
    with pytest.raises(TypeError, match="integer `num_features`"):
        frechet_distance(images, images, nn.Flatten())
    with pytest.raises(ValueError, match="the same image shape"):
        frechet_distance(images, torch.rand(4, 2, 1, 2), Identity(2))
    with pytest.raises(ValueError, match="batch_size"):
        frechet_distance(images, images, Identity(2), batch_size=0)


# ----- evaluate_pipeline and the CLI ----------------------------------------------------------------------


def tiny_vae_pipeline(**config):
    torch.manual_seed(0)
    return VAEPipeline(VAEModel(hidden_dims=[16], latent_dim=2, **config).eval())


def test_evaluate_pipeline_gives_fd_and_vae_bounds_independent_of_batch_size(extractor, mnist_test):
    pipeline = tiny_vae_pipeline()
    metrics = evaluate_pipeline(pipeline, mnist_test, num_samples=200, feature_extractor=extractor, batch_size=200,
                                num_importance_samples=5)
    assert set(metrics) == {"fd", "test_negative_elbo", "test_iwae_nll", "test_iwae_bits_per_dim"}
    assert metrics["fd"] > 100  # an untrained decoder draws no digits
    again = evaluate_pipeline(pipeline, mnist_test, num_samples=200, feature_extractor=extractor, batch_size=64,
                              num_importance_samples=5)
    assert again == pytest.approx(metrics, rel=1e-5)
    other_seed = evaluate_pipeline(pipeline, mnist_test, num_samples=200, feature_extractor=extractor, seed=1,
                                   num_importance_samples=5)
    assert other_seed["fd"] != metrics["fd"]


def record_class_labels(monkeypatch) -> list:
    """The class labels of every ConditionalPipeline call, in order, in the returned list."""
    requested, call = [], ConditionalPipeline.__call__

    def recording_call(self, *args, **kwargs):
        requested.append(kwargs["class_labels"])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(ConditionalPipeline, "__call__", recording_call)
    return requested


def test_evaluate_pipeline_gives_a_conditional_pipeline_the_real_labels(extractor, mnist_test, monkeypatch):
    torch.manual_seed(0)
    pipeline = ConditionalPipeline(VAEModel(hidden_dims=[16], latent_dim=2, num_classes=10).eval())
    requested = record_class_labels(monkeypatch)
    metrics = evaluate_pipeline(pipeline, mnist_test, num_samples=1000, feature_extractor=extractor, batch_size=400,
                                num_importance_samples=2)
    assert metrics["fd"] > 0 and "test_iwae_nll" in metrics
    # all 1,000 test digits are the real set, so the samples' classes are exactly the test split's
    torch.testing.assert_close(torch.bincount(torch.cat(requested), minlength=10), torch.bincount(mnist_test.labels))
    with pytest.raises(ValueError, match="generates 10 classes"):
        evaluate_pipeline(pipeline, ImageDataset(mnist_test.images, mnist_test.labels % 2, {"0": "a", "1": "b"}),
                          num_samples=10, feature_extractor=extractor)


class LazyDigits(torch.utils.data.Dataset):
    """A map-style dataset that decodes each item on access: PNG bytes -> (image (1, 28, 28) float32, label)."""

    def __init__(self, dataset: ImageDataset, fingerprint: str | None = None):
        self.png = []
        for image in dataset.images:
            buffer = io.BytesIO()
            Image.fromarray((image[0] * 255).round().byte().numpy()).save(buffer, format="PNG")
            self.png.append(buffer.getvalue())
        self.targets = dataset.labels.tolist()
        self.id2label, self.num_classes, self.image_shape = dataset.id2label, dataset.num_classes, dataset.image_shape
        self.fingerprint = fingerprint
        self.num_decoded = 0

    def __len__(self):
        return len(self.png)

    def __getitem__(self, index: int):
        self.num_decoded += 1
        pixels = np.asarray(Image.open(io.BytesIO(self.png[index])), dtype=np.float32) / 255
        return torch.from_numpy(pixels)[None], torch.tensor(self.targets[index])


class StreamedDigits(torch.utils.data.IterableDataset):
    """The same items, streamed in order (no __len__)."""

    def __init__(self, lazy: LazyDigits):
        self.lazy = lazy
        self.id2label, self.num_classes, self.image_shape = lazy.id2label, lazy.num_classes, lazy.image_shape
        self.fingerprint = None

    def __iter__(self):
        return (self.lazy[index] for index in range(len(self.lazy)))


@pytest.fixture(scope="module")
def digits_300(mnist_test):
    return ImageDataset(mnist_test.images[:300], mnist_test.labels[:300], mnist_test.id2label)


def test_evaluate_pipeline_reads_a_lazily_decoded_dataset_as_the_same_images_in_memory(extractor, digits_300):
    lazy = LazyDigits(digits_300)
    pipeline = tiny_vae_pipeline()
    kwargs = dict(num_samples=100, feature_extractor=extractor, batch_size=32, num_importance_samples=2)
    metrics = evaluate_pipeline(pipeline, lazy, **kwargs)
    assert metrics == pytest.approx(evaluate_pipeline(pipeline, digits_300, **kwargs), rel=1e-5)
    assert lazy.num_decoded == 100 + 300  # the FD's real images, then each image once for the VAE bounds


def test_evaluate_pipeline_streams_the_first_images_of_an_iterable_dataset(extractor, digits_300):
    stream = StreamedDigits(LazyDigits(digits_300))
    pipeline = tiny_vae_pipeline()
    kwargs = dict(num_samples=100, feature_extractor=extractor, num_importance_samples=2)
    metrics = evaluate_pipeline(pipeline, stream, batch_size=32, **kwargs)
    # the real images are the stream's first 100; sample i is drawn with the i-th seed of `seed`'s generator
    seeds = torch.randint(2**62, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    samples = pipeline(100, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images
    assert metrics["fd"] == pytest.approx(frechet_distance(digits_300.images[:100], samples, extractor), rel=1e-5)
    assert evaluate_pipeline(pipeline, stream, batch_size=7, **kwargs)["fd"] == pytest.approx(metrics["fd"], rel=1e-6)
    bounds = evaluate_pipeline(pipeline, digits_300, 100, fd=False, num_importance_samples=2)  # over all 300 images
    assert {name: metrics[name] for name in bounds} == pytest.approx(bounds, rel=1e-5)
    with pytest.raises(ValueError, match=r"`num_samples` \(400\) exceeds the 300 images of `dataset`"):
        evaluate_pipeline(pipeline, stream, num_samples=400, feature_extractor=extractor, likelihood=False)


def test_diffusion_bits_per_dim_uses_the_first_real_images_of_a_stream(digits_300):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    pipeline = DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=5))
    stream = StreamedDigits(LazyDigits(digits_300))
    metrics = evaluate_pipeline(pipeline, stream, num_samples=20, fd=False, vlb_num_images=8)
    expected = diffusion_bits_per_dim(pipeline, digits_300.images[:8], digits_300.labels[:8])
    assert metrics == {"test_bits_per_dim": pytest.approx(expected, rel=1e-5)}


class Counting(nn.Module):
    """Wraps a feature extractor and counts the images it sees."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor, self.num_images = extractor, 0
        self.num_features, self.in_channels, self.cache_id = extractor.num_features, extractor.in_channels, extractor.cache_id

    def forward(self, images):
        self.num_images += len(images)
        return self.extractor(images)


class FingerprintedDataset(ImageDataset):
    fingerprint = None  # a plain attribute here, whatever ImageDataset defines: tests set it


def test_real_image_statistics_are_cached_and_reused(extractor, digits_300, tmp_path, monkeypatch):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path))
    dataset = FingerprintedDataset(digits_300.images, digits_300.labels, digits_300.id2label)
    dataset.fingerprint = "300 test digits"
    torch.manual_seed(0)
    pipeline = ConditionalPipeline(VAEModel(hidden_dims=[16], latent_dim=2, num_classes=10).eval())
    requested = record_class_labels(monkeypatch)
    counting = Counting(extractor)
    kwargs = dict(num_samples=100, feature_extractor=counting, batch_size=40, likelihood=False)
    uncached = evaluate_pipeline(pipeline, dataset, cache_statistics=False, **kwargs)
    assert counting.num_images == 200 and not (tmp_path / "fd-statistics").exists()
    first = evaluate_pipeline(pipeline, dataset, **kwargs)
    assert counting.num_images == 400 and len(list((tmp_path / "fd-statistics").glob("*.safetensors"))) == 1
    labels = torch.cat(requested[-3:])
    second = evaluate_pipeline(pipeline, dataset, **kwargs)
    assert counting.num_images == 500  # the 100 samples only: the real images' statistics came from the cache
    assert first == uncached and second == uncached
    torch.testing.assert_close(torch.cat(requested[-3:]), labels)  # the cached real images' labels
    # other real images, another dataset or other features: computed again, and cached apart
    evaluate_pipeline(pipeline, dataset, seed=1, **kwargs)
    dataset.fingerprint = "other digits"
    evaluate_pipeline(pipeline, dataset, **kwargs)
    counting.cache_id = "other features"
    evaluate_pipeline(pipeline, dataset, **kwargs)
    assert counting.num_images == 500 + 3 * 200 and len(list((tmp_path / "fd-statistics").glob("*.safetensors"))) == 4


def test_evaluate_pipeline_refuses_more_samples_than_the_dataset_has(extractor, mnist_test):
    with pytest.raises(ValueError, match="`num_samples` \\(2000\\) exceeds"):
        evaluate_pipeline(tiny_vae_pipeline(), mnist_test, num_samples=2000, feature_extractor=extractor)


def test_cli_prints_json_and_merges_the_metrics_into_the_card(extractor, tmp_path, capsys):
    folder = tmp_path / "vae"
    tiny_vae_pipeline().save_pretrained(folder)
    write_model_card(str(folder), title="tiny", description="A tiny VAE.", pipeline_class="VAEPipeline", tags=["vae"],
                     dataset_name="hfgen:mnist", metrics={"test_negative_elbo": 1.0, "kept_metric": 2.0},
                     model_config={}, training_config={})
    main(["evaluate", str(folder), "--num_samples", "100", "--num_importance_samples", "2", "--write_card"])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"fd", "test_negative_elbo", "test_iwae_nll", "test_iwae_bits_per_dim"}

    card = ModelCard.load(folder / "README.md")
    results = {result.metric_type: result for result in card.data.eval_results}
    assert set(results) == {"fd", "test_negative_elbo", "test_iwae_nll", "test_iwae_bits_per_dim", "kept_metric"}
    assert results["fd"].metric_value == pytest.approx(printed["fd"], abs=1e-4)
    assert results["fd"].metric_args == {"feature_extractor": "hfgen:digit-classifier", "num_samples": 100, "seed": 0}
    assert results["test_negative_elbo"].metric_value == pytest.approx(printed["test_negative_elbo"], abs=1e-4)
    assert results["kept_metric"].metric_value == 2.0 and card.data.model_name == "tiny"
    assert f"| fd | {printed['fd']:.4f} |" in card.text and "| kept_metric | 2.0000 |" in card.text
    assert card.text.count("## Evaluation on the test split") == 1 and "A tiny VAE." in card.text
    assert json.loads((folder / "metrics.json").read_text()) == pytest.approx(printed)


def test_cli_trains_the_default_extractor_on_first_use_and_says_where(tmp_path, monkeypatch, capsys, caplog,
                                                                       fast_training):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "vae"
    tiny_vae_pipeline().save_pretrained(folder)
    main(["evaluate", str(folder), "--num_samples", "20", "--num_importance_samples", "1", "--split", "train"])
    # a warning: without any logging set up (the `hfgen` command) Python prints it on stderr; stdout is the JSON
    (said,) = [record for record in caplog.records if "training the default feature extractor" in record.message]
    assert said.levelname == "WARNING" and str(tmp_path / "cache") in said.message
    assert "fd" in json.loads(capsys.readouterr().out)
    assert os.path.isdir(tmp_path / "cache" / "digit-classifier") and not (folder / "README.md").exists()


def test_metrics_merge_into_a_folder_without_a_card(tmp_path):
    update_model_card_metrics(str(tmp_path), {"fd": 3.0}, dataset_name="hfgen:mnist", split="train")
    update_model_card_metrics(str(tmp_path), {"fd": 4.0}, dataset_name="hfgen:mnist", split="test")
    card = ModelCard.load(tmp_path / "README.md")
    values = {(result.metric_type, result.dataset_split): result.metric_value for result in card.data.eval_results}
    assert values == {("fd", "train"): 3.0, ("fd", "test"): 4.0}
    assert "## Evaluation on the train split" in card.text and "## Evaluation on the test split" in card.text
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"fd": 4.0}


def test_write_card_needs_a_local_folder(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "user/some-repo", "--write_card"])
    assert "hfgen: error: `--write_card` needs a local pipeline folder" in capsys.readouterr().err
