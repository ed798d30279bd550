"""Densities used by the latent-variable models (docs/maths.md §2).

Every log-density returns one value per example: shape (..., B), summed over the data or latent dims.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

LOG_2PI = math.log(2 * math.pi)


def _sum_per_example(values: torch.Tensor, num_batch_dims: int) -> torch.Tensor:
    return values.flatten(num_batch_dims).sum(-1)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) over all dims after the batch dim.

    diffusers' `DiagonalGaussianDistribution` assumes 4-D latents and clamps the log-variance; an MLP
    VAE has (B, D) latents and a likelihood bound must see the variance the encoder produced, so hfgen
    keeps this small class instead.

    Args:
        mean, logvar: (B, *latent_shape) tensors of the same shape.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
        self.mean = mean
        self.logvar = logvar

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None, num_samples: int | None = None) -> torch.Tensor:
        """Reparameterization z = mean + std * eps, eps ~ N(0, I): (B, ...) or (num_samples, B, ...)."""
        shape = self.mean.shape if num_samples is None else (num_samples, *self.mean.shape)
        eps = randn_tensor(shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) for z of shape (..., B, *latent_shape) -> (..., B)."""
        log_density = -0.5 * ((z - self.mean) ** 2 / self.var + self.logvar + LOG_2PI)
        return _sum_per_example(log_density, z.dim() - self.mean.dim() + 1)

    def kl_standard_normal(self) -> torch.Tensor:
        """Analytic KL(q || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1): (B,)."""
        return 0.5 * _sum_per_example(self.mean**2 + self.var - self.logvar - 1, 1)


def standard_normal_log_prob(z: torch.Tensor, num_batch_dims: int = 1) -> torch.Tensor:
    """log N(z; 0, I) summed over all but the first `num_batch_dims` dims."""
    return _sum_per_example(-0.5 * (z**2 + LOG_2PI), num_batch_dims)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum x log p + (1 - x) log(1 - p) with p = sigmoid(logits): (B,), or (K, B) for logits (K, B, ...).

    Written as x * logits - softplus(logits), which is exact, stable and broadcasts x over K samples.
    """
    return _sum_per_example(x * logits - F.softplus(logits), logits.dim() - x.dim() + 1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-1/2 sum [(x - m)^2 / s^2 + log(2 pi s^2)]: (B,), or (K, B) for mean (K, B, ...); logvar broadcasts."""
    log_density = -0.5 * ((x - mean) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI)
    return _sum_per_example(log_density, mean.dim() - x.dim() + 1)
