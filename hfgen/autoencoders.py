"""First stages of latent diffusion (docs/maths.md §7.1): hfgen's `VAEModel` and diffusers' `AutoencoderKL`,
`AutoencoderTiny` and `VQModel` behind one `encode` / `decode` on images in [0, 1], with the latent normalization
each one's config gives.

The range each autoencoder takes and returns, and whether its encoder gives a posterior or a point, come from one
table, `FIRST_STAGES`, keyed by class name: nothing here guesses from the weights.
"""

import dataclasses
import logging
import math
import os

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, VQModel

from .distributions import DiagonalGaussian
from .image_processing import SYMMETRIC, UNIT, from_unit_range
from .models import VAEModel

logger = logging.getLogger(__name__)

# A point encoder's latents are stored as a Gaussian with this log-variance: diffusers' own floor for AutoencoderKL
# (std 3e-7), so that one cache format and one sampling rule serve every first stage.
POINT_LOGVAR = -30.0


@dataclasses.dataclass(frozen=True)
class FirstStageKind:
    model_class: type
    data_range: str  # the images it takes and returns
    point_encoder: bool  # encode gives latents, not a posterior q(z|x)
    normalization_in_config: bool  # its config carries the latents' scaling_factor and shift_factor


FIRST_STAGES = {kind.model_class.__name__: kind for kind in (
    FirstStageKind(VAEModel, UNIT, False, False),
    FirstStageKind(AutoencoderKL, SYMMETRIC, False, True),
    # diffusers' wrapper maps [-1, 1] to the [0, 1] that TAESD's own nets take, and back
    FirstStageKind(AutoencoderTiny, SYMMETRIC, True, True),
    # latent diffusion runs on the encoder's output before quantisation; decode() quantises (Rombach et al., 2022).
    # Its config has no shift_factor, and its default scaling_factor is SD's, fitted to no VQModel: measured
    FirstStageKind(VQModel, SYMMETRIC, True, False),
)}
LATENT_SCALINGS = ("auto", "config", "data")


def kind_of(vae) -> FirstStageKind:
    kind = FIRST_STAGES.get(type(vae).__name__)
    if kind is None or not isinstance(vae, kind.model_class):
        raise TypeError(f"a first stage must be one of {', '.join(FIRST_STAGES)}, got {type(vae).__name__}")
    return kind


def _config_at(path, subfolder: str | None, **kwargs) -> dict | None:
    """The config.json at a folder's `subfolder` (diffusers' own lookup falls back to the folder's), or a Hub repo's;
    None where there is none."""
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder or "")
        return VAEModel.load_config(folder) if os.path.isfile(os.path.join(folder, "config.json")) else None
    try:
        return VAEModel.load_config(path, subfolder=subfolder, **kwargs)
    except EnvironmentError:
        return None


def load_first_stage(path: str, subfolder: str | None = None, **kwargs):
    """The autoencoder at a folder or Hub repo id (its `subfolder`; a pipeline's `vae` component when the path holds
    a pipeline and no subfolder is given), loaded by the class its config names."""
    for candidate in [subfolder] if subfolder is not None else [None, "vae"]:
        config = _config_at(path, candidate, **kwargs)
        if config is not None:
            break
    else:
        places = f"its subfolder {subfolder!r}" if subfolder is not None else "it or its vae subfolder"
        raise ValueError(f"`--vae_path` {str(path)!r} holds no first stage: no config.json in {places}")
    name = config.get("_class_name")
    if name not in FIRST_STAGES:
        raise ValueError(f"`--vae_path` {str(path)!r} holds a {name or 'model without a class name'}; a first stage "
                         f"must be one of {', '.join(FIRST_STAGES)}")
    return FIRST_STAGES[name].model_class.from_pretrained(path, subfolder=candidate, **kwargs)


def image_channels(vae) -> int:
    return vae.config.in_channels


def latent_channels(vae) -> int:
    if isinstance(vae, VAEModel):
        return vae.latent_shape[0]
    return vae.config.get("vq_embed_dim") or vae.config.latent_channels


def downsampling_factor(vae) -> int:
    """Image size / latent size."""
    if isinstance(vae, VAEModel):
        return vae.config.sample_size // vae.latent_shape[-1]
    return 2 ** (len(vae.config.block_out_channels) - 1)  # as diffusers' pipelines compute `vae_scale_factor`


def check_spatial(vae) -> None:
    kind_of(vae)
    if isinstance(vae, VAEModel):
        if vae.config.num_classes:
            raise ValueError("the first stage must be an unconditional VAE: with --conditional the denoiser takes "
                             "the labels")
        if len(vae.latent_shape) != 3:
            raise ValueError(f"the first stage is a VAE with a vector latent {tuple(vae.latent_shape)}; latent "
                             "diffusion needs a spatial one (a conv VAE trained with --latent_channels)")


def latent_shape(vae, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latents (C, S, S) of (channels, size, size) images; a clear error where the two do not fit."""
    check_spatial(vae)
    channels, height, width = image_shape
    if isinstance(vae, VAEModel) and tuple(image_shape) != vae.image_shape:
        raise ValueError(f"the first stage takes {vae.image_shape} images but the data are {tuple(image_shape)}: "
                         "set --resolution / --num_channels to match")
    if channels != image_channels(vae):
        raise ValueError(f"the first stage takes {image_channels(vae)}-channel images but the data have {channels}: "
                         "set --num_channels to match")
    factor = downsampling_factor(vae)
    if height % factor or width % factor:
        raise ValueError(f"the first stage downsamples by {factor}: the image size {height}x{width} must be a "
                         "multiple of it (set --resolution)")
    return (latent_channels(vae), height // factor, width // factor)


def _device_dtype(vae):
    parameter = next(vae.parameters())
    return parameter.device, parameter.dtype


def encode(vae, images: torch.Tensor) -> DiagonalGaussian:
    """Images (B, C, H, W) in [0, 1] -> q(z|x) (a point encoder's latents with log-variance POINT_LOGVAR)."""
    kind = kind_of(vae)
    device, dtype = _device_dtype(vae)
    pixels = from_unit_range(images.to(device, dtype), kind.data_range)
    if isinstance(vae, VAEModel):
        return vae.encode(pixels).latent_dist
    if isinstance(vae, AutoencoderKL):
        posterior = vae.encode(pixels).latent_dist
        return DiagonalGaussian(posterior.mean, posterior.logvar)
    latents = vae.encode(pixels).latents
    return DiagonalGaussian(latents, torch.full_like(latents, POINT_LOGVAR))


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, S, S) -> images (B, C, H, W), in [0, 1] up to the decoder's overshoot (not clipped)."""
    kind = kind_of(vae)
    _, dtype = _device_dtype(vae)
    images = vae.decode(latents.to(dtype)).sample
    return (images + 1) / 2 if kind.data_range == SYMMETRIC else images


@dataclasses.dataclass(frozen=True)
class LatentNormalization:
    """z_scaled = (z - shift) * scale: what the denoiser sees, near zero mean and unit variance. Each is one number,
    or one per latent channel (from a config's latents_mean / latents_std)."""
    scale: float | list[float]
    shift: float | list[float] = 0.0
    source: str = "data"  # "config": the autoencoder's config; "data": measured on the training latents

    def _as_tensor(self, value, like: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        return value.view(1, -1, 1, 1) if value.dim() else value

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self._as_tensor(self.shift, latents)) * self._as_tensor(self.scale, latents)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self._as_tensor(self.scale, latents) + self._as_tensor(self.shift, latents)

    def describe(self) -> str:
        where = "from the autoencoder's config" if self.source == "config" else "measured on the training latents"
        return f"(z - {_numbers(self.shift)}) * {_numbers(self.scale)}, {where}"


def _numbers(value) -> str:
    return f"[{', '.join(f'{v:.4g}' for v in value)}]" if isinstance(value, list) else f"{value:.4g}"


def config_normalization(vae) -> LatentNormalization | None:
    """The normalization the autoencoder's config gives (scaling_factor, shift_factor, and per-channel
    latents_mean / latents_std where present, as diffusers' SD, SDXL, SD3 and FLUX pipelines apply them), or None
    for an autoencoder whose config has none (hfgen's VAE)."""
    if not kind_of(vae).normalization_in_config:
        return None
    config = vae.config
    scale, shift = float(config.scaling_factor), float(config.get("shift_factor") or 0.0)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:  # (z - mean) * scaling_factor / std
        return LatentNormalization([scale / s for s in std], [float(m) for m in mean], "config")
    return LatentNormalization(scale, shift, "config")


def choose_normalization(vae, latent_scaling: str, measured_mean: float, measured_std: float) -> LatentNormalization:
    """--latent_scaling: "config" takes the autoencoder's, "data" the training latents' mean and std (pooled over
    every latent coordinate), "auto" the config's where the autoencoder's class keeps one (AutoencoderKL,
    AutoencoderTiny), else the data's (hfgen's VAE, VQModel). Logs the
    choice, and warns when a config's normalization leaves the training latents far from unit variance."""
    if latent_scaling not in LATENT_SCALINGS:
        raise ValueError(f"`--latent_scaling` must be one of {LATENT_SCALINGS}, got {latent_scaling!r}")
    from_config = config_normalization(vae)
    if latent_scaling == "config" and from_config is None:
        raise ValueError(f"`--latent_scaling config`: a {type(vae).__name__}'s config holds no fitted scaling_factor "
                         "and shift_factor; use `--latent_scaling data`")
    measured = LatentNormalization(1 / measured_std, measured_mean, "data")
    chosen = measured if latent_scaling == "data" or from_config is None else from_config
    if chosen is from_config and isinstance(from_config.scale, float):
        scaled_std = measured_std * from_config.scale
        if not 0.5 <= scaled_std <= 2:
            logger.warning("the autoencoder's config scales the training latents to std %.3g, not ~1 (measured: mean "
                           "%.3g, std %.3g): pass `--latent_scaling data` if its scaling_factor was not fitted to "
                           "this autoencoder", scaled_std, measured_mean, measured_std)
    logger.info("latent normalization: %s", chosen.describe())
    return chosen


def check_normalization(name: str, value, num_channels: int, positive: bool = False) -> float | list[float]:
    """A pipeline's scaling_factor or shift_factor: a finite number, or one per latent channel."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if (isinstance(value, (list, tuple)) and len(values) != num_channels) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
            for v in values):
        what = "positive" if positive else "finite"
        raise ValueError(f"`{name}` must be a {what} number or {num_channels} of them (one per latent channel), got "
                         f"{value!r}")
    return [float(v) for v in values] if isinstance(value, (list, tuple)) else float(value)
