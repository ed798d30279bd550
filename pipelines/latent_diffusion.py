"""Latent diffusion (docs/maths.md §7): diffusion or flow matching (§6.9) in the latent space of a VAE, then
decoding."""

import torch
from diffusers import SchedulerMixin, UNet2DModel

from hfgen.models import VAEModel, ViTDenoiser
from hfgen.utils import check_positive_number

from .ddpm import DDPMPipeline


class LatentDiffusionPipeline(DDPMPipeline):
    r"""Samples z_T ~ N(0, I) in the latent space of `vae`, denoises it with `unet` and `scheduler` as
    `DDPMPipeline` does (class labels, classifier-free guidance, any diffusers scheduler), and decodes
    x = vae.decode(z_0 / scaling_factor).

    It serves latent flow-matching models too (`objective="flow_matching"`, a flow scheduler such as
    `FlowMatchEulerDiscreteScheduler`), exactly as `DDPMPipeline` does: the flow then runs on the latents.

    The denoiser is trained on z = scaling_factor * (z ~ q(z|x)), with the factor computed from the training data
    so that the scaled latents have unit variance (`hfgen.latent_tools.latent_scaling_factor`); it is part of
    the pipeline's config (model_index.json), so a folder without it does not load.

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

    def __init__(self, vae: VAEModel, unet: UNet2DModel | ViTDenoiser, scheduler: SchedulerMixin,
                 scaling_factor: float | None = None, label_dropout: float | None = None, objective: str | None = None):
        super().__init__(unet, scheduler, label_dropout, objective)
        if scaling_factor is None:
            raise ValueError("`scaling_factor` is missing: the latents' scale the denoiser was trained on; compute it "
                             "with hfgen.latent_tools.latent_scaling_factor(hfgen.latent_tools.encode_images(vae, images))")
        check_positive_number("scaling_factor", scaling_factor)
        if vae.config.num_classes:
            raise ValueError("`vae` must be an unconditional VAE (num_classes=0): class labels condition the denoiser")
        if tuple(vae.latent_shape) != self.latent_shape:
            raise ValueError(f"the VAE's latents have shape {tuple(vae.latent_shape)} but the denoiser takes "
                             f"{self.latent_shape} (in_channels, sample_size, sample_size): they must match")
        self.register_modules(vae=vae)
        self.register_to_config(scaling_factor=float(scaling_factor))

    @property
    def data_range(self) -> str:
        return self.vae.data_range

    @property
    def sample_size(self) -> int:
        return self.vae.config.sample_size

    def to_images(self, sample: torch.Tensor) -> torch.Tensor:
        """Scaled latents z_0 (B, *latent_shape) -> the VAE decoder's mean images (B, C, H, W)."""
        return self.vae.decode(sample.to(self.vae.dtype) / self.config.scaling_factor).sample
