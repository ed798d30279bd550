"""Sample metrics beyond FD (hfgen.sample_metrics): precision, recall, density and coverage on known cases and
against their full-matrix definitions, KID's unbiasedness (where FD is biased) against its closed form, the
memorisation check on copies and fresh samples, class accuracy, and evaluate_pipeline's new keys (with "fd"
unchanged), the cache of the real features, `hfgen evaluate --sample_metrics` and the card. Tiny stand-in
extractors and 8 x 8 images keep it fast; nothing here trains the default digit classifier."""

import json
import math

import pytest
import torch
from huggingface_hub import ModelCard

from helpers import Identity
from hfgen import ConditionalPipeline, DigitClassifier, VAEModel, VAEPipeline
from hfgen import sample_metrics as hfgen_sample_metrics
from hfgen.cli import main
from hfgen.data import ImageDataset
from hfgen.evaluation import evaluate_pipeline
from hfgen.features import ClassifierFeatures
from hfgen.frechet import (
    FeatureStatistics,
    frechet_distance,
    frechet_distance_from_statistics,
    load_cached_features,
    statistics_cache_path,
)
from hfgen.hub_utils import update_model_card_metrics
from hfgen.metrics import (
    class_accuracy,
    kernel_distance,
    memorisation_share,
    nearest_distances,
    nearest_neighbour_radii,
    precision_recall_density_coverage,
    sample_quality_metrics,
)
from hfgen.models.classifier import ClassifierOutput

SAMPLE_KEYS = {"kid", "kid_std", "precision", "recall", "density", "coverage"}


def gaussian(num: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ----- precision, recall, density, coverage ---------------------------------------------------------------


def test_a_set_against_itself_has_precision_recall_coverage_and_density_one():
    features = gaussian(300, 8, seed=0)
    assert precision_recall_density_coverage(features, features) == {
        "precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    # density counts, per sample, the real balls holding it: with strict balls exactly k of them for a copy
    assert precision_recall_density_coverage(features, features, nearest_k=5)["density"] == 1.0


def test_far_apart_sets_have_all_four_zero():
    real, fake = gaussian(200, 8, seed=0), gaussian(200, 8, seed=1, shift=50.0)
    assert precision_recall_density_coverage(real, fake) == {
        "precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_half_the_samples_off_the_real_manifold_halves_precision_not_recall():
    real = gaussian(400, 4, seed=0)
    fake = torch.cat([gaussian(200, 4, seed=1, shift=50.0), real[:200]])  # 200 far away, 200 copies of real ones
    metrics = precision_recall_density_coverage(real, fake)
    assert metrics["precision"] == 0.5
    assert abs(metrics["density"] - 0.5) < 0.1  # a copy lies in about k real balls: k / (k * 2) on average
    assert 0.5 <= metrics["coverage"] < 1 and metrics["recall"] > 0.5  # the copies cover their reals, at least


def test_blocked_computation_equals_the_full_matrix_definitions(monkeypatch):
    real, fake, k = gaussian(120, 5, seed=0), gaussian(90, 5, seed=1, shift=0.3), 4
    # the definitions on the whole distance matrices (Naeem et al.'s prdc, strict balls)
    real_radii = torch.cdist(real, real).sort(1).values[:, k]
    fake_radii = torch.cdist(fake, fake).sort(1).values[:, k]
    distances = torch.cdist(real, fake)  # (N, M)
    expected = {
        "precision": (distances < real_radii[:, None]).any(0).double().mean().item(),
        "recall": (distances < fake_radii[None]).any(1).double().mean().item(),
        "density": (distances < real_radii[:, None]).sum().item() / (k * len(fake)),
        "coverage": (distances.min(1).values < real_radii).double().mean().item(),
    }
    monkeypatch.setattr(hfgen_sample_metrics, "DISTANCE_BLOCK_ELEMENTS", 7 * 90)  # blocks of 7 rows, and 1 row
    assert precision_recall_density_coverage(real, fake, nearest_k=k) == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(nearest_neighbour_radii(real, k), real_radii)
    assert 0 < expected["precision"] < 1 and 0 < expected["coverage"] < 1  # a case that tests something


def test_nearest_neighbour_metrics_refuse_bad_input():
    features = gaussian(10, 3, seed=0)
    with pytest.raises(ValueError, match="`nearest_k` \\(10\\) must be below the number of `real_features`"):
        precision_recall_density_coverage(features, gaussian(20, 3, seed=1), nearest_k=10)
    with pytest.raises(ValueError, match="one width"):
        precision_recall_density_coverage(features, gaussian(10, 4, seed=1))
    with pytest.raises(TypeError, match="`fake_features` must be a float tensor"):
        precision_recall_density_coverage(features, torch.zeros(10, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall_density_coverage(features, torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match="`nearest_k` must be a positive integer"):
        nearest_neighbour_radii(features, 0)


# ----- KID ------------------------------------------------------------------------------------------------


def unbiased_mmd2_cubic(x: torch.Tensor, y: torch.Tensor) -> float:
    """The closed form, written out: unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    m, d = len(x), x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return ((k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1)) - 2 * k_xy.mean()).item()


def test_kid_with_one_subset_of_all_images_is_the_closed_form_and_the_seed_fixes_the_subsets():
    x, y = gaussian(50, 6, seed=0), gaussian(50, 6, seed=1, shift=0.2)
    kid, kid_std = kernel_distance(x, y, subset_size=50, num_subsets=1)
    assert kid == pytest.approx(unbiased_mmd2_cubic(x, y), rel=1e-10) and kid_std == 0
    assert kernel_distance(x, y, num_subsets=10, seed=3) == kernel_distance(x, y, num_subsets=10, seed=3)
    assert kernel_distance(x, y, num_subsets=10, seed=3) != kernel_distance(x, y, num_subsets=10, seed=4)


def test_kid_is_unbiased_for_two_samples_of_one_distribution_where_fd_is_biased_upwards():
    kids, fds = [], []
    for draw in range(16):
        real, fake = gaussian(200, 16, seed=2 * draw), gaussian(200, 16, seed=2 * draw + 1)
        kids.append(kernel_distance(real, fake, num_subsets=10, seed=draw)[0])
        statistics = [FeatureStatistics.empty(16), FeatureStatistics.empty(16)]
        statistics[0].update(real)
        statistics[1].update(fake)
        fds.append(frechet_distance_from_statistics(*statistics))
    kids, fds = torch.tensor(kids), torch.tensor(fds)
    kid_error, fd_error = kids.std() / math.sqrt(len(kids)), fds.std() / math.sqrt(len(fds))
    assert abs(kids.mean()) < 3 * kid_error, (kids.mean(), kid_error)  # about 0
    assert fds.mean() > 10 * fd_error, (fds.mean(), fd_error)  # clearly > 0 for the same distribution
    # and clearly > 0 for a shifted one: many subset standard deviations away
    kid, kid_std = kernel_distance(gaussian(200, 16, seed=100), gaussian(200, 16, seed=101, shift=0.5))
    assert kid > 0.5 and kid > 5 * kid_std, (kid, kid_std)


def test_kid_default_subsets_are_half_the_smaller_set_up_to_1000(monkeypatch):
    import torchmetrics.image.kid

    sizes, poly_mmd = [], torchmetrics.image.kid.poly_mmd
    monkeypatch.setattr(torchmetrics.image.kid, "poly_mmd",
                        lambda x, y, **kwargs: sizes.append(len(x)) or poly_mmd(x, y, **kwargs))
    x = gaussian(30, 3, seed=0)
    _, kid_std = kernel_distance(x, gaussian(20, 3, seed=1), num_subsets=4)
    assert sizes == [10] * 4 and kid_std > 0  # subsets of 10 of 20 differ (subsets of all 20 would be one set)
    kernel_distance(gaussian(2500, 2, seed=0), gaussian(2100, 2, seed=1), num_subsets=1)
    assert sizes[-1] == 1000
    with pytest.raises(ValueError, match="`subset_size` must be in \\[2, 20\\]"):
        kernel_distance(x, gaussian(20, 3, seed=1), subset_size=21)
    with pytest.raises(ValueError, match="`num_subsets` must be a positive integer"):
        kernel_distance(x, x, num_subsets=0)


# ----- memorisation ---------------------------------------------------------------------------------------


def test_copies_of_training_images_give_a_memorisation_share_near_one_fresh_samples_near_the_quantile():
    train, test = gaussian(2000, 8, seed=0), gaussian(1000, 8, seed=1)
    assert memorisation_share(train[:500], test, train) == 1.0
    fresh = memorisation_share(gaussian(1000, 8, seed=2), test, train)
    assert abs(fresh - 0.05) < 0.03, fresh  # the quantile, within ~4 standard errors
    half = memorisation_share(torch.cat([train[:500], gaussian(500, 8, seed=3)]), test, train, quantile=0.1)
    assert 0.5 < half < 0.6, half  # 500 copies and 500 fresh samples: 0.5 + 0.5 * 0.1
    # the training features may come block by block, read once
    assert memorisation_share(gaussian(1000, 8, seed=2), test, train.split(300)) == fresh


def test_nearest_distances_are_the_minimum_over_all_references():
    queries, references = gaussian(40, 3, seed=0), gaussian(70, 3, seed=1)
    expected = torch.cdist(queries, references).min(1).values
    torch.testing.assert_close(nearest_distances(queries, iter(references.split(16))), expected)
    with pytest.raises(ValueError, match="holds no feature vectors"):
        nearest_distances(queries, [])


def test_memorisation_refuses_test_images_that_are_training_images():
    train = gaussian(100, 3, seed=0)
    with pytest.raises(ValueError, match="quantile of the test images' distances .* is 0"):
        memorisation_share(gaussian(10, 3, seed=1), train[:50], train)
    with pytest.raises(ValueError, match="`quantile` must be a fraction in \\(0, 1\\)"):
        memorisation_share(train, train, train, quantile=1.5)


# ----- class accuracy -------------------------------------------------------------------------------------


def test_class_accuracy_is_the_share_of_argmax_equal_to_the_requested_class():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 2])) == 0.5
    with pytest.raises(ValueError, match="one class id per row"):
        class_accuracy(logits, torch.tensor([0, 1]))


# ----- evaluate_pipeline ----------------------------------------------------------------------------------


class ConstantClassifier(DigitClassifier):
    """A stand-in digit classifier that always says class 3 (its features are a DigitClassifier's)."""

    def forward(self, sample, return_dict=True):
        output = super().forward(sample)
        logits = torch.zeros_like(output.logits)
        logits[:, 3] = 1
        return ClassifierOutput(logits=logits, features=output.features)


def tiny_classifier(cls=DigitClassifier, num_classes: int = 10, names: str = "{}") -> ClassifierFeatures:
    torch.manual_seed(0)
    id2label = {str(i): names.format(i) for i in range(num_classes)}
    return ClassifierFeatures(cls(sample_size=8, feature_dim=16, block_out_channels=(4,), num_classes=num_classes,
                                  id2label=id2label))


def tiny_vae(num_classes: int = 0):
    torch.manual_seed(0)
    id2label = {str(i): str(i) for i in range(num_classes)} if num_classes else None
    model = VAEModel(sample_size=8, hidden_dims=[16], latent_dim=2, num_classes=num_classes, id2label=id2label).eval()
    return ConditionalPipeline(model) if num_classes else VAEPipeline(model)


def digits(num: int, seed: int) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num, 1, 8, 8, generator=generator) ** 2
    labels = torch.randint(10, (num,), generator=generator)
    return ImageDataset(images, labels, {str(i): str(i) for i in range(10)}, name=f"random-digits-{num}-{seed}")


def samples_of(pipeline, dataset, num_samples: int, batch_size: int, seed: int = 0):
    """The real images, their labels and the samples that evaluate_pipeline compares (its documented draw),
    drawn `batch_size` at a time as it draws them."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:num_samples]
    seeds = torch.randint(2**62, (num_samples,), generator=generator).tolist()
    real, labels = dataset[order]
    samples = []
    for start in range(0, num_samples, batch_size):
        chunk = seeds[start:start + batch_size]
        class_labels = labels[start:start + batch_size] if pipeline.num_classes else None
        samples.append(pipeline(len(chunk), class_labels=class_labels, output_type="pt",
                                generator=[torch.Generator().manual_seed(s) for s in chunk]).images)
    return real, labels, torch.cat(samples)


def batched(extractor, images, batch_size: int):
    return torch.cat([extractor(batch) for batch in images.split(batch_size)])


def test_evaluate_pipeline_adds_the_sample_metrics_and_keeps_fd(monkeypatch, tmp_path):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path))
    pipeline, dataset, train = tiny_vae(), digits(300, seed=0), digits(400, seed=1)
    extractor = tiny_classifier()
    kwargs = dict(num_samples=200, feature_extractor=extractor, batch_size=64, likelihood=False)
    plain = evaluate_pipeline(pipeline, dataset, **kwargs)
    metrics = evaluate_pipeline(pipeline, dataset, sample_metrics=True, train_dataset=train, **kwargs)
    assert set(plain) == {"fd"} and set(metrics) == {"fd", "memorisation", *SAMPLE_KEYS}  # unconditional: no accuracy
    assert metrics["fd"] == plain["fd"]

    real, _, samples = samples_of(pipeline, dataset, 200, batch_size=64)
    assert metrics["fd"] == pytest.approx(frechet_distance(real, samples, extractor, batch_size=64), rel=1e-12)
    real_features, fake_features = batched(extractor, real, 64), batched(extractor, samples, 64)
    expected = sample_quality_metrics(real_features, fake_features, seed=0)
    expected["memorisation"] = memorisation_share(fake_features, real_features, batched(extractor, train.images, 64))
    assert {name: metrics[name] for name in expected} == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_real_features_are_cached_with_the_statistics_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path))
    pipeline, dataset, extractor = tiny_vae(), digits(300, seed=0), tiny_classifier()
    kwargs = dict(num_samples=100, feature_extractor=extractor, likelihood=False, sample_metrics=True)
    key = {"dataset": dataset.fingerprint, "images": "randperm(300, seed=0)[:100]", "features": extractor.cache_id}
    plain = evaluate_pipeline(pipeline, dataset, **{**kwargs, "sample_metrics": False})
    assert load_cached_features(key) is None  # FD alone caches the statistics only
    first = evaluate_pipeline(pipeline, dataset, **kwargs)  # which lack the features: computed again, then cached
    assert load_cached_features(key).shape == (100, 16) and first["fd"] == plain["fd"]
    read = []
    original = ImageDataset.__getitem__
    monkeypatch.setattr(ImageDataset, "__getitem__", lambda self, index: read.append(1) or original(self, index))
    assert evaluate_pipeline(pipeline, dataset, **kwargs) == first and not read  # no real image read again
    assert statistics_cache_path(key).startswith(str(tmp_path))


def test_class_accuracy_of_a_conditional_pipeline_under_a_stand_in_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path))
    pipeline, dataset = tiny_vae(num_classes=10), digits(150, seed=0)
    kwargs = dict(num_samples=150, batch_size=64, likelihood=False, sample_metrics=True)
    metrics = evaluate_pipeline(pipeline, dataset, feature_extractor=tiny_classifier(ConstantClassifier), **kwargs)
    # all 150 images are the real set, so the requested classes are the dataset's labels; "3" is right for those of 3
    assert metrics["class_accuracy"] == pytest.approx((dataset.labels == 3).double().mean().item())
    assert 0 < metrics["class_accuracy"] < 1
    # a real digit classifier: the accuracy of its argmax on the samples, against the labels they were asked for
    extractor = tiny_classifier()
    metrics = evaluate_pipeline(pipeline, dataset, feature_extractor=extractor, **kwargs)
    _, labels, samples = samples_of(pipeline, dataset, 150, batch_size=64)
    logits = batched(lambda images: extractor.classifier(images).logits, samples, 64)
    assert metrics["class_accuracy"] == class_accuracy(logits, labels)
    # no classifier behind the features, or one with other classes: no class accuracy
    for other in (Identity(64), tiny_classifier(num_classes=5), tiny_classifier(names="class {}")):
        assert "class_accuracy" not in evaluate_pipeline(pipeline, dataset, feature_extractor=other, **kwargs)


def test_evaluate_pipeline_refuses_bad_sample_metric_arguments():
    pipeline, dataset, extractor = tiny_vae(), digits(50, seed=0), Identity(64)
    kwargs = dict(num_samples=20, feature_extractor=extractor, likelihood=False)
    with pytest.raises(ValueError, match="`train_dataset` is for the memorisation check"):
        evaluate_pipeline(pipeline, dataset, train_dataset=digits(50, seed=1), **kwargs)
    with pytest.raises(ValueError, match="`train_dataset` holds the same images as `dataset`"):
        evaluate_pipeline(pipeline, dataset, sample_metrics=True, train_dataset=dataset, **kwargs)
    with pytest.raises(ValueError, match="`train_dataset` holds images of shape \\(1, 4, 4\\)"):
        small = ImageDataset(torch.rand(5, 1, 4, 4), torch.zeros(5, dtype=torch.long))
        evaluate_pipeline(pipeline, dataset, sample_metrics=True, train_dataset=small, **kwargs)
    with pytest.raises(ValueError, match="`num_samples` \\(20\\) must exceed `nearest_k` \\(20\\)"):
        evaluate_pipeline(pipeline, dataset, sample_metrics=True, nearest_k=20, **kwargs)
    with pytest.raises(ValueError, match="`kid_subset_size` must be in \\[2, num_samples=20\\]"):
        evaluate_pipeline(pipeline, dataset, sample_metrics=True, kid_subset_size=21, **kwargs)
    with pytest.raises(ValueError, match="needs `fd`=True"):
        evaluate_pipeline(pipeline, dataset, sample_metrics=True, fd=False, num_samples=20)


# ----- the command line and the card ----------------------------------------------------------------------


def test_cli_prints_the_sample_metrics_and_the_card_renders_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path / "cache"))
    folder, classifier = tmp_path / "cvae", tmp_path / "classifier"
    tiny_vae(num_classes=10).save_pretrained(folder)
    tiny_classifier().classifier.save_pretrained(classifier)
    main(["evaluate", str(folder), "--dataset_name", "hfgen:digits", "--num_samples", "100", "--sample_metrics",
          "--memorisation", "--feature_extractor", str(classifier), "--num_importance_samples", "1", "--write_card"])
    printed = json.loads(capsys.readouterr().out)
    assert {"fd", "class_accuracy", "memorisation", *SAMPLE_KEYS} <= set(printed)
    card = ModelCard.load(folder / "README.md")
    results = {result.metric_type: result for result in card.data.eval_results}
    for name in ("kid", "precision", "memorisation", "class_accuracy"):
        assert f"| {name} | {printed[name]:.4f} |" in card.text
        assert results[name].metric_value == pytest.approx(printed[name], abs=1e-4)
    assert results["precision"].metric_args["nearest_k"] == 3
    assert results["memorisation"].metric_args["quantile"] == 0.05
    assert json.loads((folder / "metrics.json").read_text()) == pytest.approx(printed)

    for flags, message in ((["--memorisation"], "needs --sample_metrics and --split test"),
                           (["--sample_metrics", "--memorisation", "--split", "train"], "--split train"),
                           (["--sample_metrics", "--feature_extractor", "none"], "needs a --feature_extractor")):
        with pytest.raises(SystemExit):
            main(["evaluate", str(folder), *flags])
        assert message in capsys.readouterr().err


def test_a_card_written_by_training_renders_the_new_metrics(tmp_path):
    metrics = {"fd": 12.5, "kid": 0.01234, "kid_std": 0.002, "precision": 0.8, "recall": 0.7, "density": 1.1,
               "coverage": 0.9, "class_accuracy": 0.95, "memorisation": 0.05}
    update_model_card_metrics(str(tmp_path), metrics, dataset_name="hfgen:mnist")
    card = ModelCard.load(tmp_path / "README.md")
    assert {result.metric_type for result in card.data.eval_results} == set(metrics)
    assert "| kid | 0.0123 |" in card.text and "| memorisation | 0.0500 |" in card.text
