"""Sampling from a GAN generator (docs/maths.md §4)."""

import torch

from hfgen import latent_tools
from hfgen.models import Discriminator, Generator

from .pipeline_utils import GenerativePipeline


class GANPipeline(GenerativePipeline):
    r"""Samples z ~ N(0, I) and maps it through the generator: x = G(z).

    Example:
        ```py
        >>> import torch
        >>> from hfgen import GANPipeline
        >>> pipe = GANPipeline.from_pretrained("hfgen-gan-mnist")
        >>> images = pipe(16, generator=torch.manual_seed(0)).images
        ```

    Args:
        generator: an unconditional `Generator` (use `ConditionalPipeline` for a conditional one).
        discriminator: optional; saved with the pipeline so adversarial training can resume from it.
    """

    family = "gan"

    _optional_components = ["discriminator"]

    def __init__(self, generator: Generator, discriminator: Discriminator | None = None):
        super().__init__()
        if generator.config.num_classes:
            raise ValueError("`generator` is conditional (num_classes > 0): use ConditionalPipeline")
        self.register_modules(generator=generator, discriminator=discriminator)

    @property
    def generative_model(self):
        return self.generator

    @torch.no_grad()
    def interpolate(
        self,
        num_steps: int = 8,
        method: str = "spherical",
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images along the path between two prior samples (drawn, or `latents` of shape (2, latent_dim))."""
        start, end = self.prepare_latents(2, generator, latents)
        path = latent_tools.interpolate(start, end, num_steps, method)
        return self.output(self.generator.decode(path).sample, output_type, return_dict)
