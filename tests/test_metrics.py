import math

import pytest
import torch

from hfgen import VAEModel
from hfgen.likelihood import bits_per_dim, evaluate_vae, iwae_log_likelihood


@pytest.fixture(scope="module")
def vae_and_digits(mnist_test):
    torch.manual_seed(0)
    return VAEModel(hidden_dims=[64], latent_dim=8).eval(), mnist_test.images[:200]


def test_iwae_with_one_sample_is_the_elbo(vae_and_digits):
    vae, x = vae_and_digits
    iwae = iwae_log_likelihood(vae, x, num_samples=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        elbo = vae(x, kl_estimator="monte_carlo", generator=torch.Generator().manual_seed(0)).elbo
    torch.testing.assert_close(iwae, elbo)


def test_iwae_bound_does_not_decrease_with_k(vae_and_digits):
    vae, x = vae_and_digits
    with torch.no_grad():
        elbo = vae(x).elbo.mean().item()  # analytic KL: the K = 1 bound in expectation
    bounds = [
        iwae_log_likelihood(vae, x, num_samples=k, generator=torch.Generator().manual_seed(k)).mean().item()
        for k in (1, 10, 100)
    ]
    assert abs(bounds[0] - elbo) < 0.01 * abs(elbo)
    assert bounds[0] < bounds[1] < bounds[2], bounds


def test_iwae_is_chunk_size_invariant(vae_and_digits):
    vae, x = vae_and_digits
    a = iwae_log_likelihood(vae, x[:10], num_samples=30, generator=torch.Generator().manual_seed(0), chunk_size=30)
    b = iwae_log_likelihood(vae, x[:10], num_samples=30, generator=torch.Generator().manual_seed(0), chunk_size=7)
    # the chunks draw the same noise in a different order, so the values differ slightly
    torch.testing.assert_close(a, b, rtol=0.02, atol=0.5)


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert bits_per_dim(0.0, 10, dequantization_bits=8) == 8.0


def test_evaluate_vae_reports_consistent_bounds(vae_and_digits, mnist_test):
    vae, _ = vae_and_digits
    subset = torch.utils.data.Subset(mnist_test, range(100))
    metrics = evaluate_vae(vae, torch.utils.data.DataLoader(subset, batch_size=50), num_importance_samples=20)
    assert metrics["test_iwae_nll"] <= metrics["test_negative_elbo"]
    assert metrics["test_iwae_bits_per_dim"] == pytest.approx(bits_per_dim(metrics["test_iwae_nll"], 784))
    again = evaluate_vae(vae, torch.utils.data.DataLoader(subset, batch_size=25), num_importance_samples=20)
    assert again["test_negative_elbo"] == pytest.approx(metrics["test_negative_elbo"], rel=0.01)


def test_iwae_refuses_bad_arguments(vae_and_digits):
    vae, x = vae_and_digits
    with pytest.raises(ValueError, match="num_samples"):
        iwae_log_likelihood(vae, x, num_samples=0)
    with pytest.raises(ValueError, match="class_labels"):
        iwae_log_likelihood(vae, x[:2], torch.tensor([0, 1]))


def test_hfgen_metrics_re_exports_the_evaluation_api_from_its_modules():
    from hfgen import evaluation, features, frechet, likelihood, metrics

    homes = {
        evaluation: ["evaluate_pipeline"],
        features: ["DEFAULT_FEATURE_EXTRACTOR", "classifier_accuracy", "default_classifier_dir", "hfgen_cache_dir",
                   "load_feature_extractor", "resolve_feature_extractor", "train_digit_classifier"],
        frechet: ["FeatureStatistics", "feature_statistics", "frechet_distance", "frechet_distance_from_statistics"],
        likelihood: ["LIKELIHOOD_BATCH_SIZE", "bits_per_dim", "diffusion_bits_per_dim", "evaluate_vae",
                     "iwae_log_likelihood"],
    }
    for module, names in homes.items():
        for name in names:
            assert getattr(metrics, name) is getattr(module, name), name
    assert all(hasattr(metrics, name) for name in metrics.__all__)
