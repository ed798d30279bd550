"""Likelihood bounds in nats and bits per dimension (docs/maths.md §3): a VAE's ELBO and importance-weighted bound,
and a diffusion model's variational bound (§6.5)."""

import math

import torch

from .diffusion import variational_bound
from .distributions import standard_normal_log_prob
from .utils import check_class_labels, check_positive_int

LIKELIHOOD_BATCH_SIZE = 100  # fixed, so that the Monte Carlo draws of the bounds do not depend on `batch_size`


@torch.no_grad()
def iwae_log_likelihood(
    vae,
    sample: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    num_samples: int = 1000,
    generator: torch.Generator | None = None,
    chunk_size: int = 100,
) -> torch.Tensor:
    r"""The importance-weighted bound log p(x) >= log 1/K sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x): (B,).

    It is the ELBO (with the Monte Carlo KL) for K = 1 and tightens as K grows. Samples are drawn
    `chunk_size` at a time to bound memory.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("chunk_size", chunk_size)
    labels = check_class_labels(class_labels, vae.config.num_classes, sample.shape[0], sample.device)
    posterior = vae.encode(sample, labels).latent_dist
    batch = sample.shape[0]
    log_weights = []
    for start in range(0, num_samples, chunk_size):
        k = min(chunk_size, num_samples - start)
        latents = posterior.sample(generator, k)  # (k, B, D)
        decoded = vae.decoder_output(latents.flatten(0, 1), None if labels is None else labels.repeat(k))
        log_px_z = vae.log_likelihood(sample, decoded.unflatten(0, (k, batch)))  # (k, B)
        log_pz = standard_normal_log_prob(latents, num_batch_dims=2)
        log_weights.append(log_px_z + log_pz - posterior.log_prob(latents))
    return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(num_samples)


def bits_per_dim(nll_nats: float, num_dims: int, dequantization_bits: float = 0.0) -> float:
    """bpd = -log p(x) / (D ln 2), plus `dequantization_bits` (8 for 8-bit data under a density on [0, 1])."""
    return nll_nats / (num_dims * math.log(2)) + dequantization_bits


@torch.no_grad()
def evaluate_vae(vae, dataloader, num_importance_samples: int = 100, seed: int = 0) -> dict[str, float]:
    """Negative ELBO and IWAE negative log-likelihood with K = `num_importance_samples` (nats per example),
    and the IWAE bound in bits/dim, over a dataloader of (images, labels)."""
    generator = torch.Generator(vae.device).manual_seed(seed)
    conditional = vae.config.num_classes > 0
    total_elbo = total_iwae = count = 0.0
    for images, labels in dataloader:
        images = images.to(vae.device, vae.dtype)
        labels = labels.to(vae.device) if conditional else None
        total_elbo += vae(images, labels, generator=generator).elbo.sum().item()
        total_iwae += iwae_log_likelihood(vae, images, labels, num_importance_samples, generator).sum().item()
        count += images.shape[0]
    num_dims = math.prod(vae.image_shape)
    # A density on [0, 1] is turned into a probability of 8-bit pixels by the dequantization term.
    dequantization = 8.0 if vae.config.likelihood == "gaussian" else 0.0
    return {
        "test_negative_elbo": -total_elbo / count,
        "test_iwae_nll": -total_iwae / count,
        "test_iwae_bits_per_dim": bits_per_dim(-total_iwae / count, num_dims, dequantization),
    }


@torch.no_grad()
def diffusion_bits_per_dim(pipeline, images: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0,
                           num_timesteps: int | None = None, batch_size: int = LIKELIHOOD_BATCH_SIZE) -> float:
    """The variational bound of a diffusion pipeline (`hfgen.diffusion.variational_bound`) on 8-bit images in
    [0, 1], (N, C, H, W), averaged: bits per dimension. `num_timesteps` None sums all T terms. A text-to-image
    pipeline's bound is the unconditional one, given the empty prompt."""
    denoiser = pipeline.generative_model.eval()
    conditional = pipeline.num_classes > 0

    # a text-to-image denoiser's bound is its unconditional one: given the empty prompt's states
    empty_prompt = pipeline.encode_prompt([""]) if hasattr(pipeline, "encode_prompt") else None

    def predict(x_t, timesteps, class_labels):
        if empty_prompt is not None:
            return denoiser(x_t, timesteps, encoder_hidden_states=empty_prompt.expand(len(x_t), -1, -1)).sample
        return denoiser(x_t, timesteps, class_labels=class_labels).sample

    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(images), batch_size):
        x0 = images[start:start + batch_size].to(pipeline.device, denoiser.dtype) * 2 - 1
        batch_labels = labels[start:start + batch_size].to(pipeline.device) if conditional else None
        total += variational_bound(predict, x0, pipeline.scheduler, batch_labels, num_timesteps, generator).sum().item()
    return total / len(images)
