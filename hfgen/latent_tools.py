"""Working in a VAE's latent space: walks (docs/maths.md §2.5: interpolation, traversal of one dimension), and
encoding a dataset with the latent scaling factor of latent diffusion (§7.1)."""

import math

import torch

from .autoencoders import LatentNormalization, encode
from .data import image_batches
from .distributions import DiagonalGaussian

INTERPOLATIONS = ("linear", "spherical")


def interpolate(start: torch.Tensor, end: torch.Tensor, num_steps: int, method: str = "linear") -> torch.Tensor:
    """Points from `start` to `end` (both (D,) or (1, D)), endpoints included: (num_steps, D).

    "spherical" (slerp) keeps the norm typical of Gaussian samples, which linear paths shrink mid-way.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"`method` must be one of {INTERPOLATIONS}, got {method!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"`num_steps` must be an integer >= 2, got {num_steps!r}")
    start, end = start.reshape(1, -1), end.reshape(1, -1)
    if start.shape != end.shape:
        raise ValueError(f"`start` and `end` must have the same size, got {start.shape[1]} and {end.shape[1]}")
    t = torch.linspace(0, 1, num_steps, device=start.device, dtype=start.dtype).unsqueeze(1)
    if method == "linear":
        return (1 - t) * start + t * end
    cos_angle = torch.nn.functional.cosine_similarity(start, end).clamp(-1, 1)
    angle = torch.acos(cos_angle)
    if angle.abs() < 1e-4:  # (nearly) parallel: slerp reduces to lerp
        return (1 - t) * start + t * end
    return (torch.sin((1 - t) * angle) * start + torch.sin(t * angle) * end) / torch.sin(angle)


def traverse(latent: torch.Tensor, dim: int, values: torch.Tensor) -> torch.Tensor:
    """Copies of `latent` ((D,) or (1, D)) with coordinate `dim` set to each of `values`: (len(values), D)."""
    latent = latent.reshape(1, -1)
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < latent.shape[1]:
        raise ValueError(f"`dim` must be an integer in [0, {latent.shape[1] - 1}], got {dim!r}")
    values = torch.as_tensor(values, dtype=latent.dtype, device=latent.device).reshape(-1)
    points = latent.repeat(len(values), 1)
    points[:, dim] = values
    return points


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 500) -> DiagonalGaussian:
    """The posteriors q(z|x) of images (N, C, H, W) in [0, 1] under a first stage (an unconditional `VAEModel` or a
    diffusers autoencoder, `hfgen.autoencoders`): mean and logvar of shape (N, *latent_shape), on its device."""
    posteriors = [encode(vae, images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    return DiagonalGaussian(torch.cat([q.mean for q in posteriors]), torch.cat([q.logvar for q in posteriors]))


class PooledLatentVariance:
    """The mean and Var z of z ~ q(z|x) over a dataset's posteriors, all latent dims pooled, accumulated batch by
    batch: by the law of total variance Var z = Var(mean) + E[sigma^2], computed exactly instead of from samples (in
    float64)."""

    def __init__(self):
        self.count, self.total, self.total_squares, self.total_variance = 0, 0.0, 0.0, 0.0

    def update(self, mean: torch.Tensor, variance: torch.Tensor) -> None:
        """A batch's posterior means and variances, (B, *latent_shape) each."""
        mean = mean.double()
        self.count += mean.numel()
        self.total += mean.sum().item()
        self.total_squares += (mean ** 2).sum().item()
        self.total_variance += variance.double().sum().item()

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def std(self) -> float:
        return math.sqrt(self.total_squares / self.count - self.mean ** 2 + self.total_variance / self.count)

    @property
    def scaling_factor(self) -> float:
        """1 / std of z: the scaled latents z * factor have unit variance."""
        return float(1 / self.std)


def latent_scaling_factor(posterior: DiagonalGaussian) -> float:
    """1 / std of z ~ q(z|x) over a dataset's posteriors (N, *latent_shape) (see `PooledLatentVariance`)."""
    return latent_normalization(posterior).scale


def latent_normalization(posterior: DiagonalGaussian) -> LatentNormalization:
    """The normalization measured on a dataset's posteriors (N, *latent_shape): z_scaled = (z - mean) / std of
    z ~ q(z|x), all latent coordinates pooled (see `PooledLatentVariance`)."""
    pooled = PooledLatentVariance()
    pooled.update(posterior.mean, posterior.var)
    return LatentNormalization(pooled.scaling_factor, pooled.mean, "data")


@torch.no_grad()
def measure_normalization(vae, dataset, num_images: int | None = None, batch_size: int = 500) -> LatentNormalization:
    """`latent_normalization` of the first `num_images` images of `dataset` (None: all), as stored, read
    `batch_size` at a time."""
    pooled = PooledLatentVariance()
    for images, _ in image_batches(dataset, num_images, batch_size=batch_size, shuffle=False):
        posterior = encode(vae, images)
        pooled.update(posterior.mean, posterior.var)
    return LatentNormalization(pooled.scaling_factor, pooled.mean, "data")
