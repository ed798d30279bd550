"""Class-conditional sampling from any conditional latent-variable model (docs/maths.md §5)."""

import torch

from hfgen.models import GaussianMixtureSampler, ModelMixin

from .pipeline_utils import GenerativePipeline
from .vae import LatentSamplerMixin


class ConditionalPipeline(LatentSamplerMixin, GenerativePipeline):
    r"""Generates the classes it is asked for with a conditional VAE (or conditional GAN generator).

    Example:
        ```py
        >>> from hfgen import ConditionalPipeline
        >>> pipe = ConditionalPipeline.from_pretrained("path/to/cvae")
        >>> images = pipe(class_labels=[0, 1, 2, 3], generator=torch.manual_seed(0)).images
        >>> prior = pipe(class_labels=[0, 1], latent_sampler="prior").images  # z ~ N(0, I) for a fitted CVAE
        ```

    Args:
        model: a model with `num_classes > 0` that decodes (latents, class_labels) to images: a CVAE
            (`VAEModel`) or a conditional GAN `Generator`.
        discriminator: optional; a conditional GAN's discriminator, saved so adversarial training can resume.
        latent_sampler: optional, CVAEs only; a `GaussianMixtureSampler(num_classes=...)` fitted to each class's
            aggregated posterior q(z|y). When the pipeline has one, calls sample from it unless they ask for
            `latent_sampler="prior"`.
    """

    _optional_components = ["discriminator", "latent_sampler"]

    def __init__(self, model: ModelMixin, discriminator: ModelMixin | None = None,
                 latent_sampler: GaussianMixtureSampler | None = None):
        super().__init__()
        if model.config.num_classes < 1:
            raise ValueError("`model` must be conditional (num_classes > 0); use the family's unconditional pipeline")
        if latent_sampler is not None:
            self.check_latent_sampler(model, latent_sampler)
        self.register_modules(model=model, discriminator=discriminator, latent_sampler=latent_sampler)

    @property
    def generative_model(self):
        return self.model

    @property
    def family(self) -> str:
        from hfgen.models import VAEModel

        return "vae" if isinstance(self.model, VAEModel) else "gan"

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, *, class_labels=None, generator=None, latents=None,
                 latent_sampler: str | None = None, **kwargs):
        """`GenerativePipeline.__call__` with the class labels required, and `latent_sampler` as `VAEPipeline`'s
        ("fitted" or "prior"; None: "fitted" when the pipeline holds a sampler)."""
        if class_labels is None:
            raise ValueError(f"`class_labels` are required: the model generates {self.model.config.num_classes} classes")
        latents = self.latents_to_decode(batch_size, class_labels, generator, latents, latent_sampler)
        return super().__call__(batch_size, class_labels=class_labels, generator=generator, latents=latents, **kwargs)
