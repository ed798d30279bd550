"""Variational autoencoder and conditional VAE (docs/maths.md §2 and §5.1)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..distributions import (
    DiagonalGaussian,
    bernoulli_log_likelihood,
    gaussian_log_likelihood,
    standard_normal_log_prob,
)
from ..image_processing import UNIT
from ..utils import (
    check_choice, check_class_labels, check_images, check_non_negative_int, check_positive_int, check_positive_number)

VAE_ARCHITECTURES = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")
KL_ESTIMATORS = ("analytic", "monte_carlo")


@dataclass
class VAEEncoderOutput(BaseOutput):
    """latent_dist: the posterior q(z|x[, y]) with mean and logvar of shape (B, *latent_shape)."""

    latent_dist: DiagonalGaussian


@dataclass
class VAEDecoderOutput(BaseOutput):
    """sample: (B, C, H, W) decoder mean (gaussian) or pixel probabilities (bernoulli), in [0, 1] for data."""

    sample: torch.Tensor


@dataclass
class VAEOutput(BaseOutput):
    """The ELBO terms of a forward pass, each per example: (B,).

    sample: (B, C, H, W) decoded mean of the first posterior sample; latents: (K, B, *latent_shape).
    elbo = log_likelihood - kl, with log_likelihood = E_q[log p(x|z)] averaged over the K samples.
    """

    sample: torch.Tensor
    # Defaults let BaseOutput be rebuilt from a dict, as accelerate does when it casts mixed-precision outputs.
    latent_dist: DiagonalGaussian = None
    latents: torch.Tensor = None
    log_likelihood: torch.Tensor = None
    kl: torch.Tensor = None
    elbo: torch.Tensor = None


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAEModel(ModelMixin, ConfigMixin):
    r"""A VAE with a diagonal Gaussian posterior and a standard normal prior; a CVAE when `num_classes > 0`.

    Data are images in [0, 1] of shape (B, in_channels, sample_size, sample_size).

    Args:
        sample_size: image height and width.
        in_channels: image channels.
        latent_dim: dimension of z (a vector latent; ignored when `latent_channels` is set).
        architecture: "mlp" (flattened pixels) or "conv" (stride-2 convolutions, one per hidden dim; the
            image size must be divisible by 2 ** len(hidden_dims)).
        latent_channels: conv only: a spatial latent z of shape (latent_channels, S, S), S = sample_size /
            2 ** len(hidden_dims), as latent diffusion's first stage uses (docs/maths.md §7.1); 0: a vector latent.
        hidden_dims: hidden widths (mlp) or channels (conv) of the encoder; the decoder mirrors them.
        likelihood: decoder p(x|z): "bernoulli" (outputs logits) or "gaussian" (outputs a mean).
        decoder_std: standard deviation of the gaussian decoder (fixed, or the initial value when learned).
        learn_decoder_std: learn one log-variance per pixel for the gaussian decoder.
        num_classes: 0 for a VAE; > 0 makes a CVAE whose encoder sees (x, y) and decoder sees (z, y),
            with y one-hot (docs/maths.md §5.1).
        id2label: optional class names, {"0": "zero", ...}, so pipelines accept names as labels.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        latent_dim: int = 20,
        architecture: str = "mlp",
        hidden_dims: tuple[int, ...] = (400,),
        likelihood: str = "bernoulli",
        decoder_std: float = 0.1,
        learn_decoder_std: bool = False,
        num_classes: int = 0,
        id2label: dict | None = None,
        latent_channels: int = 0,
    ):
        super().__init__()
        check_positive_int("sample_size", sample_size)
        check_positive_int("in_channels", in_channels)
        check_positive_int("latent_dim", latent_dim)
        check_choice("architecture", architecture, VAE_ARCHITECTURES)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        if not hidden_dims:
            raise ValueError("`hidden_dims` must list at least one width, got an empty list")
        for width in hidden_dims:
            check_positive_int("hidden_dims", width)
        check_positive_number("decoder_std", decoder_std)
        check_non_negative_int("num_classes", num_classes)
        if id2label is not None and len(id2label) != num_classes:
            raise ValueError(f"`id2label` must name all {num_classes} classes, got {len(id2label)} names")
        check_non_negative_int("latent_channels", latent_channels)
        if latent_channels and architecture != "conv":
            raise ValueError(f'`latent_channels` (a spatial latent) needs architecture="conv", got {architecture!r}')

        hidden = list(hidden_dims)
        if architecture == "mlp":
            num_pixels = in_channels * sample_size * sample_size
            self.encoder = _mlp([num_pixels + num_classes, *hidden, 2 * latent_dim])
            self.decoder = _mlp([latent_dim + num_classes, *hidden[::-1], num_pixels])
        else:
            downsample = 2 ** len(hidden)
            if sample_size % downsample:
                raise ValueError(
                    f"`sample_size` {sample_size} must be divisible by 2 ** len(hidden_dims) = {downsample} "
                    f"for the conv architecture"
                )
            self.feature_size = sample_size // downsample
            channels = [in_channels, *hidden]
            convs = []
            for c_in, c_out in zip(channels[:-1], channels[1:]):
                convs += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            self.encoder_convs = nn.Sequential(*convs)
            if latent_channels:  # 3x3 convs to and from the spatial latent; labels enter as one-hot planes
                self.encoder = nn.Conv2d(hidden[-1] + num_classes, 2 * latent_channels, 3, padding=1)
                self.decoder_input = nn.Sequential(
                    nn.Conv2d(latent_channels + num_classes, hidden[-1], 3, padding=1), nn.ReLU())
            else:
                num_features = hidden[-1] * self.feature_size**2
                self.encoder = nn.Linear(num_features + num_classes, 2 * latent_dim)
                self.decoder_input = nn.Sequential(nn.Linear(latent_dim + num_classes, num_features), nn.ReLU())
            deconvs = []
            for i, (c_in, c_out) in enumerate(zip(channels[::-1][:-1], channels[::-1][1:])):
                deconvs.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
                if i < len(hidden) - 1:
                    deconvs.append(nn.ReLU())
            self.decoder = nn.Sequential(*deconvs)
        if likelihood == "gaussian":
            logvar = torch.full((in_channels, sample_size, sample_size), 2 * torch.tensor(decoder_std).log().item())
            if learn_decoder_std:
                self.decoder_logvar = nn.Parameter(logvar)
            else:
                self.register_buffer("decoder_logvar", logvar)

    data_range = UNIT  # images in [0, 1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.sample_size, self.config.sample_size)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(latent_dim,), or (latent_channels, S, S) for a spatial latent."""
        if self.config.latent_channels:
            return (self.config.latent_channels, self.feature_size, self.feature_size)
        return (self.config.latent_dim,)

    def _with_labels(self, features: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Appends one-hot labels to (B, F) features, or as constant planes to (B, F, S, S) feature maps."""
        if class_labels is None:
            return features
        one_hot = F.one_hot(class_labels, self.config.num_classes).to(features.dtype)
        if features.dim() == 4:
            one_hot = one_hot[:, :, None, None].expand(-1, -1, *features.shape[2:])
        return torch.cat([features, one_hot], dim=1)

    def encode(self, sample: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True):
        """sample: (B, C, H, W) in [0, 1]; class_labels: (B,) for a CVAE -> q(z|x[, y])."""
        check_images("sample", sample, *self.image_shape[:2])
        class_labels = check_class_labels(class_labels, self.config.num_classes, sample.shape[0], sample.device)
        if self.config.architecture == "mlp":
            features = sample.flatten(1)
        else:
            features = self.encoder_convs(sample)
            features = features if self.config.latent_channels else features.flatten(1)
        mean, logvar = self.encoder(self._with_labels(features, class_labels)).chunk(2, dim=1)
        posterior = DiagonalGaussian(mean, logvar)
        return VAEEncoderOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decoder_output(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """latents: (B, *latent_shape) -> (B, C, H, W) logits (bernoulli) or mean (gaussian). Labels are trusted."""
        hidden = self._with_labels(latents, class_labels)
        if self.config.architecture == "mlp":
            return self.decoder(hidden).view(-1, *self.image_shape)
        size = self.feature_size
        return self.decoder(self.decoder_input(hidden).view(-1, self.config.hidden_dims[-1], size, size))

    def decode(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True):
        """latents: (B, *latent_shape) -> the decoder's mean (gaussian) or probabilities (bernoulli), (B, C, H, W)."""
        if latents.dim() != 1 + len(self.latent_shape) or tuple(latents.shape[1:]) != self.latent_shape:
            shape = ", ".join(map(str, self.latent_shape))
            raise ValueError(f"`latents` must have shape (B, {shape}), got {tuple(latents.shape)}")
        class_labels = check_class_labels(class_labels, self.config.num_classes, latents.shape[0], latents.device)
        output = self.decoder_output(latents, class_labels)
        if self.config.likelihood == "bernoulli":
            output = torch.sigmoid(output)
        return VAEDecoderOutput(sample=output) if return_dict else (output,)

    def log_likelihood(self, sample: torch.Tensor, decoder_output: torch.Tensor) -> torch.Tensor:
        """log p(x|z) from `decoder_output`'s logits or mean: (B,), or (K, B) for outputs of shape (K, B, C, H, W)."""
        if self.config.likelihood == "bernoulli":
            return bernoulli_log_likelihood(sample, decoder_output)
        return gaussian_log_likelihood(sample, decoder_output, self.decoder_logvar)

    def forward(
        self,
        sample: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        num_samples: int = 1,
        kl_estimator: str = "analytic",
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        r"""The ELBO of each example with K = `num_samples` reparameterized samples z_k ~ q(z|x).

        ELBO = 1/K sum_k log p(x|z_k) - KL(q(z|x) || p(z)); the KL is analytic, or the Monte Carlo
        estimate 1/K sum_k [log q(z_k|x) - log p(z_k)] with `kl_estimator="monte_carlo"` (docs/maths.md §2.2).

        Args:
            sample: (B, C, H, W) images in [0, 1].
            class_labels: (B,) integer labels, required for a CVAE and refused otherwise.
        """
        check_positive_int("num_samples", num_samples)
        check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        check_images("sample", sample, *self.image_shape[:2])
        labels = check_class_labels(class_labels, self.config.num_classes, sample.shape[0], sample.device)
        posterior = self.encode(sample, labels).latent_dist
        batch = sample.shape[0]
        latents = posterior.sample(generator, num_samples)  # (K, B, *latent_shape)
        flat_labels = None if labels is None else labels.repeat(num_samples)
        decoded = self.decoder_output(latents.flatten(0, 1), flat_labels).unflatten(0, (num_samples, batch))
        log_likelihood = self.log_likelihood(sample, decoded).mean(0)  # 1/K sum_k log p(x|z_k)
        if kl_estimator == "analytic":
            kl = posterior.kl_standard_normal()
        else:
            kl = (posterior.log_prob(latents) - standard_normal_log_prob(latents, num_batch_dims=2)).mean(0)
        reconstruction = decoded[0]
        if self.config.likelihood == "bernoulli":
            reconstruction = torch.sigmoid(reconstruction)
        output = (reconstruction, posterior, latents, log_likelihood, kl, log_likelihood - kl)
        return VAEOutput(*output) if return_dict else output
