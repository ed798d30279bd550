"""Sampling and latent-space tools for VAEs (docs/maths.md §2.5)."""

import torch

from hfgen import latent_tools
from hfgen.image_processing import preprocess
from hfgen.models import VAEModel

from .pipeline_utils import GenerativePipeline


class VAEPipeline(GenerativePipeline):
    r"""Samples z ~ N(0, I) and decodes it with a VAE; also encodes, reconstructs, interpolates and traverses.

    Example:
        ```py
        >>> import torch
        >>> from hfgen import VAEPipeline
        >>> pipe = VAEPipeline.from_pretrained("hfgen-vae-mnist")
        >>> images = pipe(16, generator=torch.manual_seed(0)).images  # 16 PIL images
        ```

    Args:
        vae: the `VAEModel` (a CVAE also works: pass `class_labels` to every call).
    """

    family = "vae"

    def __init__(self, vae: VAEModel):
        super().__init__()
        self.register_modules(vae=vae)

    @property
    def generative_model(self):
        return self.vae

    def _images(self, images, name: str = "images") -> torch.Tensor:
        channels, size = self.vae.config.in_channels, self.vae.config.sample_size
        return preprocess(images, channels, size, self.vae.data_range, name).to(self.device, self.vae.dtype)

    @torch.no_grad()
    def encode(self, images, class_labels=None) -> torch.Tensor:
        """Images (PIL, numpy or tensor in [0, 1]) -> posterior means, (B, *latent_shape)."""
        return self._encode(self._images(images), class_labels)

    def _encode(self, images: torch.Tensor, class_labels) -> torch.Tensor:
        labels, _ = self.prepare_class_labels(class_labels, images.shape[0])
        return self.vae.encode(images, labels).latent_dist.mean

    def _encode_one(self, image, name: str, class_labels) -> torch.Tensor:
        images = self._images(image, name)
        if images.shape[0] != 1:
            raise ValueError(f"`{name}` must be one image, got a batch of {images.shape[0]}")
        return self._encode(images, class_labels)

    @torch.no_grad()
    def reconstruct(self, images, class_labels=None, output_type: str = "pil", return_dict: bool = True):
        """Decodes the posterior mean of each image."""
        latents = self.encode(images, class_labels)
        labels, _ = self.prepare_class_labels(class_labels, latents.shape[0])
        return self.output(self.vae.decode(latents, labels).sample, output_type, return_dict)

    @torch.no_grad()
    def interpolate(
        self,
        image_a,
        image_b,
        num_steps: int = 8,
        method: str = "linear",
        class_labels=None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Decodes `num_steps` points on the path between the codes of two images ("linear" or "spherical")."""
        start, end = self._encode_one(image_a, "image_a", class_labels), self._encode_one(image_b, "image_b", class_labels)
        latents = latent_tools.interpolate(start, end, num_steps, method).view(num_steps, *self.latent_shape)
        labels, _ = self.prepare_class_labels(class_labels, num_steps)
        return self.output(self.vae.decode(latents, labels).sample, output_type, return_dict)

    @torch.no_grad()
    def traverse(
        self,
        dim: int,
        values=(-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0),
        image=None,
        class_labels=None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Decodes the code of `image` (or z = 0) with latent coordinate `dim` (of the flattened latent) swept
        over `values`."""
        if image is None:
            start = torch.zeros(1, *self.latent_shape, device=self.device, dtype=self.vae.dtype)
        else:
            start = self._encode_one(image, "image", class_labels)
        latents = latent_tools.traverse(start, dim, values)
        latents = latents.view(len(latents), *self.latent_shape)
        labels, _ = self.prepare_class_labels(class_labels, latents.shape[0])
        return self.output(self.vae.decode(latents, labels).sample, output_type, return_dict)
