"""hfgen.diffusion against the closed forms of docs/maths.md §6 and against diffusers' DDPMScheduler."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from hfgen import diffusion

SCHEDULER = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", beta_start=1e-4, beta_end=0.05)
BETAS, ALPHAS_CUMPROD = SCHEDULER.betas, SCHEDULER.alphas_cumprod


def test_closed_form_marginal_matches_the_iterated_forward_process():
    """x_t from t steps of q(x_t | x_{t-1}) has mean sqrt(alphabar_t) x0 and variance 1 - alphabar_t."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.8, -0.3])
    x = x0.repeat(200000, 1)
    t = 40
    for beta in BETAS[: t + 1]:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=generator)
    alphabar = ALPHAS_CUMPROD[t]
    torch.testing.assert_close(x.mean(0), alphabar.sqrt() * x0, atol=0.01, rtol=0)
    torch.testing.assert_close(x.var(0), (1 - alphabar).repeat(2), atol=0.01, rtol=0)
    closed = diffusion.q_sample(x0.expand(200000, 2), torch.full((200000,), t), torch.randn(200000, 2, generator=generator),
                                ALPHAS_CUMPROD)
    torch.testing.assert_close(closed.mean(0), x.mean(0), atol=0.01, rtol=0)
    # and it is what diffusers' add_noise computes
    noise, timesteps, images = torch.randn(4, 1, 3, 3), torch.tensor([0, 10, 50, 99]), torch.randn(4, 1, 3, 3)
    torch.testing.assert_close(diffusion.q_sample(images, timesteps, noise, ALPHAS_CUMPROD),
                               SCHEDULER.add_noise(images, noise, timesteps))


def test_posterior_matches_the_scheduler_step():
    """DDPMScheduler's ancestral step with x0 prediction and no noise is mu~_t; its variance is beta~_t."""
    scheduler = DDPMScheduler.from_config(SCHEDULER.config, prediction_type="sample", clip_sample=False,
                                          variance_type="fixed_small")
    x0, x_t = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    for t in (99, 50, 1):
        mean, variance = diffusion.posterior_mean_variance(x0, x_t, torch.tensor([t]), BETAS, ALPHAS_CUMPROD)
        step = scheduler.step(x0, t, x_t, generator=torch.Generator().manual_seed(0))
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(step.prev_sample, mean + variance.sqrt() * noise, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(variance.flatten(), scheduler._get_variance(t).reshape(1), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
def test_prediction_conversions_invert_each_other(prediction_type):
    x0, noise, timesteps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 37, 99])
    x_t = diffusion.q_sample(x0, timesteps, noise, ALPHAS_CUMPROD)
    target = diffusion.training_target(x0, noise, timesteps, prediction_type, ALPHAS_CUMPROD)
    torch.testing.assert_close(diffusion.predict_x0(x_t, timesteps, target, prediction_type, ALPHAS_CUMPROD), x0,
                               atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.predict_epsilon(x_t, timesteps, target, prediction_type, ALPHAS_CUMPROD), noise,
                               atol=2e-3, rtol=1e-3)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, SCHEDULER.get_velocity(x0, noise, timesteps))


def test_epsilon_and_x0_parameterised_reverse_means_agree():
    """mu_theta from eps equals mu~_t(x_t, x0(eps)): the two parameterisations of §6.3 give the same mean."""
    x_t, epsilon, timesteps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([1, 50, 99])
    x0 = diffusion.predict_x0(x_t, timesteps, epsilon, "epsilon", ALPHAS_CUMPROD)
    from_x0, _ = diffusion.posterior_mean_variance(x0, x_t, timesteps, BETAS, ALPHAS_CUMPROD)
    from_epsilon = diffusion.reverse_mean_from_epsilon(x_t, timesteps, epsilon, BETAS, ALPHAS_CUMPROD)
    torch.testing.assert_close(from_epsilon, from_x0, atol=1e-4, rtol=1e-4)


def test_discretized_gaussian_sums_to_one_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, log_scale in ((0.1, -2.0), (-0.9, -4.0), (0.0, 1.0)):
        probabilities = diffusion.discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)).exp()
        torch.testing.assert_close(probabilities.sum(), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_normal_kl_closed_form():
    kl = diffusion.normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))
    torch.testing.assert_close(kl, torch.tensor(0.5))
    p = torch.distributions.Normal(0.3, 0.7)
    q = torch.distributions.Normal(-0.2, 1.3)
    torch.testing.assert_close(diffusion.normal_kl(torch.tensor(0.3), torch.tensor(0.7).log() * 2, torch.tensor(-0.2),
                                                   torch.tensor(1.3).log() * 2), torch.distributions.kl_divergence(p, q))


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="`prediction_type` must be one of"):
        diffusion.predict_x0(torch.zeros(1, 1, 2, 2), torch.tensor([0]), torch.zeros(1, 1, 2, 2), "x0", ALPHAS_CUMPROD)


def eight_bit_images(batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 1, 4, 4), generator=generator).float() / 255 * 2 - 1


def test_variational_bound_of_a_perfect_denoiser_is_the_prior_and_decoder_terms():
    scheduler = DDPMScheduler(num_train_timesteps=50, prediction_type="sample")
    x0 = eight_bit_images()
    oracle = lambda x_t, t, y: x0  # noqa: E731  (predicts the true x0: every KL term L_{t-1} is 0)
    bound = diffusion.variational_bound(oracle, x0, scheduler, generator=torch.Generator().manual_seed(0))
    alphabar_last = scheduler.alphas_cumprod[-1]
    prior = diffusion.normal_kl(alphabar_last.sqrt() * x0, torch.log(1 - alphabar_last), torch.tensor(0.0),
                                torch.tensor(0.0)).flatten(1).sum(1)
    # L_0: the decoder, centred on the true x0 with the variance beta~ of t = 1, scores the right 8-bit bin
    ones = torch.ones(4, dtype=torch.long)
    _, variance = diffusion.posterior_mean_variance(x0, x0, ones, scheduler.betas, scheduler.alphas_cumprod)
    decoder = -diffusion.discretized_gaussian_log_likelihood(x0, x0, 0.5 * variance.log()).flatten(1).sum(1)
    torch.testing.assert_close(bound, (prior + decoder) / (16 * math.log(2)), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
def test_variational_bound_is_larger_for_a_worse_denoiser(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=30, prediction_type=prediction_type)
    x0 = eight_bit_images()
    alphas_cumprod = scheduler.alphas_cumprod

    def oracle(x_t, t, y):  # the exact prediction of each type, recovered from x_t and the true x0
        noise = diffusion.predict_epsilon(x_t, t, x0, "sample", alphas_cumprod)
        return diffusion.training_target(x0, noise, t, prediction_type, alphas_cumprod)

    def noisy_oracle(x_t, t, y):
        return oracle(x_t, t, y) + 0.1

    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    good = diffusion.variational_bound(oracle, x0, scheduler, generator=generator())
    worse = diffusion.variational_bound(noisy_oracle, x0, scheduler, generator=generator())
    assert torch.all(good < worse)
    with pytest.raises(ValueError, match="`num_timesteps`"):
        diffusion.variational_bound(oracle, x0, scheduler, num_timesteps=0)
