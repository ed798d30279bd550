"""Latent diffusion (docs/maths.md §7): diffusion or flow matching (§6.9) in the latent space of an autoencoder,
then decoding."""

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, SchedulerMixin, UNet2DModel, VQModel

from hfgen import autoencoders
from hfgen.autoencoders import LatentNormalization
from hfgen.image_processing import UNIT, preprocess
from hfgen.models import VAEModel, ViTDenoiser

from .ddpm import DDPMPipeline

FirstStage = VAEModel | AutoencoderKL | AutoencoderTiny | VQModel


class LatentDiffusionPipeline(DDPMPipeline):
    r"""Samples z_T ~ N(0, I) in the normalized latent space of `vae`, denoises it with `unet` and `scheduler` as
    `DDPMPipeline` does (class labels, classifier-free guidance, any diffusers scheduler), and decodes
    x = vae.decode(z_0 / scaling_factor + shift_factor).

    `vae` is hfgen's `VAEModel` or diffusers' `AutoencoderKL`, `AutoencoderTiny` or `VQModel` (`hfgen.autoencoders`),
    saved as an ordinary component in `vae/`. It serves latent flow-matching models too (`objective="flow_matching"`,
    a flow scheduler such as `FlowMatchEulerDiscreteScheduler`), exactly as `DDPMPipeline` does.

    The denoiser is trained on z = (z ~ q(z|x) - shift_factor) * scaling_factor: the autoencoder's own
    normalization, or one measured on the training latents (`hfgen.autoencoders.choose_normalization`). Each is one
    number or one per latent channel, and part of the pipeline's config (model_index.json): a folder without
    scaling_factor does not load.

    Example:
        ```py
        >>> import torch
        >>> from hfgen import LatentDiffusionPipeline
        >>> pipe = LatentDiffusionPipeline.from_pretrained("hfgen-ldm-mnist")
        >>> images = pipe(16, num_inference_steps=50, generator=torch.manual_seed(0)).images
        ```
    """

    pipeline_kind = "latents"

    denoises_pixels = False
    data_range = UNIT  # `hfgen.autoencoders.decode` gives [0, 1] whatever the autoencoder's own range

    def __init__(self, vae: FirstStage, unet: UNet2DModel | ViTDenoiser, scheduler: SchedulerMixin,
                 scaling_factor: float | list[float] | None = None, label_dropout: float | None = None,
                 objective: str | None = None, shift_factor: float | list[float] = 0.0,
                 sampling_steps: int | None = None):
        super().__init__(unet, scheduler, label_dropout, objective, sampling_steps)
        if scaling_factor is None:
            raise ValueError("`scaling_factor` is missing: the latents' scale the denoiser was trained on; measure it (and "
                             "shift_factor) as .scale and .shift of hfgen.latent_tools.latent_normalization("
                             "hfgen.latent_tools.encode_images(vae, images))")
        autoencoders.check_spatial(vae)
        channels = self.latent_shape[0]
        scaling_factor = autoencoders.check_normalization("scaling_factor", scaling_factor, channels, positive=True)
        shift_factor = autoencoders.check_normalization("shift_factor", shift_factor, channels)
        size = self.latent_shape[1] * autoencoders.downsampling_factor(vae)
        expected = autoencoders.latent_shape(vae, (autoencoders.image_channels(vae), size, size))
        if expected != self.latent_shape:
            raise ValueError(f"the first stage's latents have shape {expected} but the denoiser takes "
                             f"{self.latent_shape} (in_channels, sample_size, sample_size): they must match")
        self.register_modules(vae=vae)
        self.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)

    @property
    def latent_normalization(self) -> LatentNormalization:
        return LatentNormalization(self.config.scaling_factor, self.config.get("shift_factor", 0.0))

    @property
    def sample_size(self) -> int:
        return self.latent_shape[1] * autoencoders.downsampling_factor(self.vae)

    def to_images(self, sample: torch.Tensor) -> torch.Tensor:
        """Normalized latents z_0 (B, *latent_shape) -> the decoded images (B, C, H, W) in [0, 1]."""
        return autoencoders.decode(self.vae, self.latent_normalization.denormalize(sample.float()))

    @property
    def image_channels(self) -> int:
        return autoencoders.image_channels(self.vae)

    def from_images(self, images, name: str = "image") -> torch.Tensor:
        """Images (PIL, numpy or tensor in [0, 1]) -> the normalized latents z_0 of their posterior means (the
        encoding `to_images` inverts up to the autoencoder's reconstruction error)."""
        pixels = preprocess(images, self.image_channels, self.sample_size, UNIT, name)
        latents = autoencoders.encode(self.vae, pixels).mean
        return self.latent_normalization.normalize(latents.float()).to(self.device, self.unet.dtype)
