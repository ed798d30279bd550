"""A first stage on its own (docs/maths.md §7): images -> latents -> images."""

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, VQModel

from hfgen import autoencoders
from hfgen.image_processing import UNIT, preprocess
from hfgen.models import VAEModel

from .pipeline_utils import GenerativePipeline


class AutoencoderPipeline(GenerativePipeline):
    r"""Reconstructs images through an autoencoder: x -> z = E[q(z|x)] -> decode(z) (a `VQModel` quantises z to its
    nearest codebook entries first). What `hfgen train autoencoder` saves: its `vae` is an ordinary diffusers
    component (`VQModel` or `AutoencoderKL`), the first stage that `hfgen train ldm --vae_path FOLDER` takes.

    Example:
        ```py
        >>> from hfgen import AutoencoderPipeline
        >>> pipe = AutoencoderPipeline.from_pretrained("hfgen-vq-mnist")
        >>> reconstructions = pipe(images).images  # PIL images, a numpy array or a tensor in [0, 1]
        >>> latents = pipe.encode(images)  # (B, C, S, S)
        ```
    """

    family = "autoencoder"
    data_range = UNIT

    def __init__(self, vae: VQModel | AutoencoderKL | AutoencoderTiny | VAEModel):
        super().__init__()
        autoencoders.check_spatial(vae)
        self.register_modules(vae=vae)

    @property
    def generative_model(self):
        return self.vae

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def id2label(self) -> dict | None:
        return None

    @property
    def sample_size(self) -> int:
        return self.vae.config.sample_size

    def _pixels(self, images) -> torch.Tensor:
        size = self.sample_size
        return preprocess(images, autoencoders.image_channels(self.vae), size, UNIT, "images").to(self.device)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images (PIL, numpy or tensor in [0, 1]) -> the posterior means or point latents, (B, C, S, S)."""
        return autoencoders.encode(self.vae, self._pixels(images)).mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil", return_dict: bool = True):
        """Latents (B, C, S, S) -> images."""
        return self.output(autoencoders.decode(self.vae, latents.to(self.device)), output_type, return_dict)

    @torch.no_grad()
    def __call__(self, images, *, output_type: str = "pil", return_dict: bool = True):
        """The reconstructions of `images` (PIL, numpy or tensor in [0, 1])."""
        if isinstance(images, int):
            raise ValueError(f"`images` must be images to reconstruct, got the number {images}: an autoencoder has no "
                             "prior to sample from (train latent diffusion on it: hfgen train ldm --vae_path FOLDER)")
        return self.decode(self.encode(images), output_type, return_dict)
