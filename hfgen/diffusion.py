"""DDPM maths (docs/maths.md §6) on a diffusers scheduler's noise schedule, and flow matching (§6.9). The objectives
that train and sample with them (and EDM's preconditioning) are classes in hfgen/objectives.py.

Shapes: images x (B, C, H, W); timesteps t (B,) integers in [0, T); a schedule tensor of length T is
gathered at t and broadcast over the image dims by `extract`. hfgen's t = 0 is t = 1 of docs/maths.md §6.1.

Flow matching (§6.9): the time is the noise level sigma in [0, 1] (0: data, 1: noise; diffusers' name), sigmas (B,)
floats; the denoiser is called at the timestep sigma * T, as diffusers' flow schedulers call it.
"""

import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from .utils import check_positive_int

# diffusers' names for what the denoiser predicts: noise eps, the clean image x0, or v.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# How flow matching draws its training noise levels (before the shift).
WEIGHTING_SCHEMES = ("uniform", "logit_normal")

# ----- classifier-free guidance: hfgen's null class ------------------------------------------------------------
# A class-conditional denoiser of K classes has K + 1 class embeddings: ids 0..K-1 are the classes and id K is the
# null class ("no label"), which label dropout trains and guidance contrasts with.


def class_embeddings_for(num_classes: int) -> int | None:
    """The denoiser's `num_class_embeds` for K classes: K + 1 (the null class last), None when unconditional."""
    return num_classes + 1 if num_classes else None


def classes_of(num_class_embeds: int | None) -> int:
    """The number of real classes K of a denoiser with `num_class_embeds` embeddings (0: unconditional)."""
    return num_class_embeds - 1 if num_class_embeds else 0


def null_class_labels(class_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels of the same shape, all the null class K."""
    return torch.full_like(class_labels, num_classes)


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (docs/maths.md §6.7): f(x, null) + w (f(x, y) - f(x, null)). Linear in the prediction,
    so right for every kind (eps, x0, v, a flow's velocity, EDM's F); w = 1 is the conditional model alone."""
    return unconditional + guidance_scale * (conditional - unconditional)



def extract(schedule: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """schedule (T,) gathered at timesteps (B,) -> (B, 1, ..., 1) with `ndim` dims in all."""
    values = schedule.to(timesteps.device)[timesteps].float()
    return values.reshape(-1, *([1] * (ndim - 1)))


def q_sample(x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor):
    """x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps, a sample of q(x_t | x0) in closed form."""
    alphabar = extract(alphas_cumprod, timesteps, x0.dim())
    return alphabar.sqrt() * x0 + (1 - alphabar).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    """v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x0 (Salimans & Ho, 2022)."""
    alphabar = extract(alphas_cumprod, timesteps, x0.dim())
    return alphabar.sqrt() * noise - (1 - alphabar).sqrt() * x0


def training_target(x0, noise, timesteps, prediction_type: str, alphas_cumprod) -> torch.Tensor:
    """What the denoiser regresses onto: eps, x0 or v."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return velocity(x0, noise, timesteps, alphas_cumprod)
    raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predict_x0(x_t, timesteps, model_output, prediction_type: str, alphas_cumprod) -> torch.Tensor:
    """x0 from the model's prediction: x0 = (x_t - sqrt(1 - alphabar) eps) / sqrt(alphabar) for eps."""
    alphabar = extract(alphas_cumprod, timesteps, x_t.dim())
    if prediction_type == "epsilon":
        return (x_t - (1 - alphabar).sqrt() * model_output) / alphabar.sqrt()
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alphabar.sqrt() * x_t - (1 - alphabar).sqrt() * model_output
    raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predict_epsilon(x_t, timesteps, model_output, prediction_type: str, alphas_cumprod) -> torch.Tensor:
    """eps from the model's prediction: eps = (x_t - sqrt(alphabar) x0) / sqrt(1 - alphabar) for x0."""
    alphabar = extract(alphas_cumprod, timesteps, x_t.dim())
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (x_t - alphabar.sqrt() * model_output) / (1 - alphabar).sqrt()
    if prediction_type == "v_prediction":
        return (1 - alphabar).sqrt() * x_t + alphabar.sqrt() * model_output
    raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def posterior_mean_variance(x0, x_t, timesteps, betas, alphas_cumprod) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_{t-1} | x_t, x0) = N(mu~_t, beta~_t I) with
    mu~_t = sqrt(alphabar_{t-1}) beta_t / (1 - alphabar_t) x0 + sqrt(alpha_t) (1 - alphabar_{t-1}) / (1 - alphabar_t) x_t,
    beta~_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t   (alphabar_{-1} = 1: at t = 0 the mean is x0)."""
    alphabar_prev_schedule = torch.cat([torch.ones(1, dtype=alphas_cumprod.dtype), alphas_cumprod[:-1]])
    beta = extract(betas, timesteps, x_t.dim())
    alphabar = extract(alphas_cumprod, timesteps, x_t.dim())
    alphabar_prev = extract(alphabar_prev_schedule, timesteps, x_t.dim())
    mean = (alphabar_prev.sqrt() * beta / (1 - alphabar)) * x0 + ((1 - beta).sqrt() * (1 - alphabar_prev) / (1 - alphabar)) * x_t
    variance = (1 - alphabar_prev) / (1 - alphabar) * beta
    return mean, variance


def reverse_mean_from_epsilon(x_t, timesteps, epsilon, betas, alphas_cumprod) -> torch.Tensor:
    """mu_theta = 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphabar_t) eps_theta(x_t, t))."""
    beta = extract(betas, timesteps, x_t.dim())
    alphabar = extract(alphas_cumprod, timesteps, x_t.dim())
    return (x_t - beta / (1 - alphabar).sqrt() * epsilon) / (1 - beta).sqrt()


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for 8-bit data scaled to [-1, 1]: the Gaussian's mass on x's bin of width 2/255,
    with the outer bins extended to -inf and +inf (Ho et al., 2020, the decoder of L_0)."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_minus = _standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_bin = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


@torch.no_grad()
def variational_bound(
    denoiser,
    x0: torch.Tensor,
    scheduler,
    class_labels: torch.Tensor | None = None,
    num_timesteps: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""The variational bound L = L_T + sum_{t>1} L_{t-1} + L_0 of §6.5 in bits per dimension: (B,).

    L_T = KL(q(x_T|x0) || N(0, I)); L_{t-1} = KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t)) with the reverse mean
    mu~_t(x_t, x0_theta) and variance beta~_t (the scheduler's "fixed_small"); L_0 = -log p(x0|x_1) under the
    discretised Gaussian decoder (variance clipped to beta~ of the next step, as Ho et al. do).

    Args:
        denoiser: (x_t, timesteps (B,), class_labels) -> the model's prediction, of the scheduler's prediction_type.
        x0: (B, C, H, W) 8-bit images scaled to [-1, 1].
        scheduler: a diffusers DDPMScheduler (betas, alphas_cumprod, config.prediction_type).
        num_timesteps: None sums all T - 1 KL terms; an integer draws that many of them uniformly and rescales
            their sum (an unbiased estimate at a fraction of the cost).
    """
    from .objectives import objective_of  # the objectives are built on this module's maths

    objective = objective_of(scheduler)
    if not objective.has_likelihood_bound:
        raise ValueError(f"`scheduler` is a {type(scheduler).__name__}: the variational bound is the DDPM one (§6.5) "
                         f"and does not apply to {objective.a_title} "
                         "(docs/maths.md §6.9, §6.10)")
    betas, alphas_cumprod = scheduler.betas.to(x0.device), scheduler.alphas_cumprod.to(x0.device)
    prediction_type = scheduler.config.prediction_type
    num_train_timesteps, batch = len(betas), x0.shape[0]

    def per_example(values):
        return values.flatten(1).sum(1)

    def model_x0(x_t, timesteps):
        return predict_x0(x_t, timesteps, denoiser(x_t, timesteps, class_labels), prediction_type, alphas_cumprod)

    def noisy(timesteps):
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else "cpu")
        return q_sample(x0, timesteps, noise.to(x0.device), alphas_cumprod)

    alphabar_last = alphas_cumprod[-1]
    prior = per_example(normal_kl(alphabar_last.sqrt() * x0, torch.log(1 - alphabar_last), torch.tensor(0.0),
                                  torch.tensor(0.0)))
    if num_timesteps is None:
        steps = list(range(1, num_train_timesteps))
    else:
        check_positive_int("num_timesteps", num_timesteps)
        steps = torch.randint(1, num_train_timesteps, (num_timesteps,), generator=generator).tolist()
    kl_terms = torch.zeros(batch, device=x0.device)
    for step in steps:
        timesteps = torch.full((batch,), step, device=x0.device, dtype=torch.long)
        x_t = noisy(timesteps)
        true_mean, variance = posterior_mean_variance(x0, x_t, timesteps, betas, alphas_cumprod)
        model_mean, _ = posterior_mean_variance(model_x0(x_t, timesteps), x_t, timesteps, betas, alphas_cumprod)
        kl_terms += per_example(normal_kl(true_mean, variance.log(), model_mean, variance.log()))
    kl_terms *= (num_train_timesteps - 1) / len(steps)
    zeros = torch.zeros(batch, device=x0.device, dtype=torch.long)
    x_1 = noisy(zeros)
    _, next_variance = posterior_mean_variance(x0, x_1, zeros + 1, betas, alphas_cumprod)  # beta~ at t = 1
    decoder_nll = -per_example(discretized_gaussian_log_likelihood(x0, model_x0(x_1, zeros), 0.5 * next_variance.log()))
    return (prior + kl_terms + decoder_nll) / (x0[0].numel() * math.log(2))


# ----- flow matching (docs/maths.md §6.9) ------------------------------------------------------------------------
# The straight path x_sigma = (1 - sigma) x0 + sigma eps from the data (sigma = 0) to the noise (sigma = 1), and its
# velocity v = d x_sigma / d sigma = eps - x0 (Lipman et al., 2023; Liu et al., 2023). Given x_sigma, each of v, x0
# and eps determines the others. `sigmas` are (B,), broadcast over the image dims.


def broadcast_per_example(sigmas: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigmas.float().reshape(-1, *([1] * (ndim - 1)))


def flow_sample(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps: what diffusers' `scale_noise` computes."""
    sigma = broadcast_per_example(sigmas, x0.dim())
    return (1 - sigma) * x0 + sigma * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target v = eps - x0 (the same at every sigma)."""
    return noise - x0


def flow_predict_x0(x_t: torch.Tensor, sigmas: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x0 = x_sigma - sigma v."""
    return x_t - broadcast_per_example(sigmas, x_t.dim()) * velocity


def flow_predict_epsilon(x_t: torch.Tensor, sigmas: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """eps = x_sigma + (1 - sigma) v."""
    return x_t + (1 - broadcast_per_example(sigmas, x_t.dim())) * velocity


def flow_velocity_from_x0(x_t: torch.Tensor, sigmas: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """v = (x_sigma - x0) / sigma (sigma > 0)."""
    return (x_t - x0) / broadcast_per_example(sigmas, x_t.dim())


def flow_velocity_from_epsilon(x_t: torch.Tensor, sigmas: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """v = (eps - x_sigma) / (1 - sigma) (sigma < 1)."""
    return (epsilon - x_t) / (1 - broadcast_per_example(sigmas, x_t.dim()))


def sample_flow_sigmas(train_sigmas: torch.Tensor, batch_size: int, weighting_scheme: str = "uniform",
                       logit_mean: float = 0.0, logit_std: float = 1.0, device=None) -> torch.Tensor:
    """Training noise levels (B,) on the flow scheduler's grid of T levels.

    `train_sigmas` (T,) is a FlowMatchEulerDiscreteScheduler's `sigmas` before `set_timesteps`: shift(k / T) for
    k = T..1, shift(s) = shift s / (1 + (shift - 1) s), so that training sees the levels sampling visits. u in (0, 1)
    is the unshifted level: uniform, or logit-normal (sigmoid of N(logit_mean, logit_std^2), Esser et al., 2024;
    logit_mean > 0 favours noisier levels); it picks the grid level k = ceil(u T).
    """
    if weighting_scheme not in WEIGHTING_SCHEMES:
        # diffusers' compute_density_for_timestep_sampling silently draws uniformly for a name it does not know
        raise ValueError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
    if weighting_scheme == "logit_normal" and not logit_std > 0:
        raise ValueError(f"`logit_std` must be a positive number, got {logit_std!r}")
    num_levels = len(train_sigmas)
    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean, logit_std, device=device)
    levels = torch.ceil(u * num_levels).long().clamp(1, num_levels)  # k in 1..T (u = 0 or 1 in float32 too)
    return train_sigmas.to(u.device)[num_levels - levels]  # the grid is descending: k sits at index T - k


def forward_process(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0) at one sampling timestep of `scheduler`, as the scheduler's own forward process gives it
    (docs/maths.md §6.11): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for the DDPM family, (1 - sigma) x0 + sigma eps
    for flow matching, x0 + sigma eps for the k-diffusion and EDM samplers (whose samples are not rescaled).
    Shapes: x0 and noise (B, ...); `timestep` one value of `scheduler.timesteps`."""
    timesteps = timestep.reshape(1).to(x0.device).expand(x0.shape[0])
    if hasattr(scheduler, "scale_noise"):  # diffusers' flow schedulers
        return scheduler.scale_noise(x0, timesteps, noise)
    return scheduler.add_noise(x0, noise, timesteps)


def resampling_levels(num_steps: int, jump_length: int = 1, resamples: int = 1, first: int = 0) -> list[int]:
    """RePaint's path over noise levels (Lugmayr et al., 2022; docs/maths.md §6.12): level n is the sample after n of
    `num_steps` steps (`first` the level sampling starts at, `num_steps` the data). Down one level at a time; at every
    `jump_length`-th level before the last, back up `jump_length` levels (renoising) and down again, `resamples` - 1
    times. With resamples 1 it is first, first + 1, ..., num_steps."""
    jumps = {level: resamples - 1 for level in range(first + jump_length, num_steps, jump_length)}
    levels, level = [first], first
    while level < num_steps:
        level += 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            level -= jump_length
            levels.append(level)
    return levels


def renoise(sample: torch.Tensor, abar_from: float, abar_to: float, noise: torch.Tensor) -> torch.Tensor:
    """x_s -> x_t of the DDPM forward process, from a level of cumulative alpha `abar_from` up to a noisier one
    `abar_to`: sqrt(abar_to / abar_from) x_s + sqrt(1 - abar_to / abar_from) eps (§6.12)."""
    ratio = abar_to / abar_from
    return ratio ** 0.5 * sample + (1 - ratio) ** 0.5 * noise
