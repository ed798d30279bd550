import math

import pytest
import torch

from hfgen.distributions import (
    DiagonalGaussian,
    bernoulli_log_likelihood,
    gaussian_log_likelihood,
    standard_normal_log_prob,
)


def random_gaussian(batch=4, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g) * 0.5)


def test_log_prob_matches_torch_distributions():
    q = random_gaussian()
    z = q.sample(torch.Generator().manual_seed(1), num_samples=3)
    reference = torch.distributions.Normal(q.mean, q.std).log_prob(z).sum(-1)
    torch.testing.assert_close(q.log_prob(z), reference)
    torch.testing.assert_close(standard_normal_log_prob(z, 2), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_analytic_kl_matches_closed_form_of_torch():
    q = random_gaussian()
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)
    ).sum(-1)
    torch.testing.assert_close(q.kl_standard_normal(), reference)


def test_monte_carlo_kl_agrees_with_analytic_within_standard_error():
    q = random_gaussian(batch=3, dim=5, seed=2)
    z = q.sample(torch.Generator().manual_seed(3), num_samples=20000)
    estimates = q.log_prob(z) - standard_normal_log_prob(z, 2)  # (K, B)
    mean, standard_error = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert torch.all((mean - q.kl_standard_normal()).abs() < 4 * standard_error)


def test_reparameterized_sample_is_deterministic_and_differentiable():
    mean = torch.zeros(2, 3, requires_grad=True)
    q = DiagonalGaussian(mean, torch.zeros(2, 3))
    a = q.sample(torch.Generator().manual_seed(0))
    b = q.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    a.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones(2, 3))


def test_decoder_likelihoods_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 4, 4, generator=g)
    logits = torch.randn(2, 1, 4, 4, generator=g)
    # the Bernoulli formula sum x log p + (1 - x) log(1 - p), for grey values too
    p = torch.sigmoid(logits)
    torch.testing.assert_close(bernoulli_log_likelihood(x, logits), (x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2, 3)))
    logvar = torch.full((1, 4, 4), -1.0)
    reference = torch.distributions.Normal(logits, torch.exp(0.5 * logvar)).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(gaussian_log_likelihood(x, logits, logvar), reference)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 4))
