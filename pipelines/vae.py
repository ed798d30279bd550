"""Sampling and latent-space tools for VAEs (docs/maths.md §2.5, §7.2)."""

import math

import torch

from hfgen import latent_tools
from hfgen.image_processing import preprocess
from hfgen.models import GaussianMixtureSampler, VAEModel
from hfgen.utils import check_choice

from .pipeline_utils import GenerativePipeline

LATENT_SAMPLERS = ("fitted", "prior")


class LatentSamplerMixin:
    """Sampling from a pipeline's optional `latent_sampler` component: a `GaussianMixtureSampler` fitted to the
    aggregated posterior of its VAE (`generative_model`), q(z), or q(z|y) for a CVAE (docs/maths.md §7.2)."""

    @staticmethod
    def check_latent_sampler(vae, latent_sampler) -> None:
        if not isinstance(latent_sampler, GaussianMixtureSampler):
            raise TypeError("`latent_sampler` must be a GaussianMixtureSampler or None, got "
                            f"{type(latent_sampler).__name__}")
        if not isinstance(vae, VAEModel):
            raise ValueError(f"`latent_sampler` samples a VAE's latents, but the model is a {type(vae).__name__}: "
                             "pass latent_sampler=None")
        num_classes, sampler_classes = vae.config.num_classes, latent_sampler.config.num_classes
        if sampler_classes != num_classes:
            raise ValueError(f"`latent_sampler` has num_classes {sampler_classes}, but the VAE has {num_classes}: a "
                             "conditional VAE needs one mixture per class, GaussianMixtureSampler(num_classes=...) "
                             "fitted with `class_labels`, and an unconditional VAE one mixture (num_classes=0)")
        latent_dim = math.prod(vae.latent_shape)
        if latent_sampler.config.latent_dim != latent_dim:
            raise ValueError(f"`latent_sampler` has latent_dim {latent_sampler.config.latent_dim}, but the VAE's "
                             f"latents {tuple(vae.latent_shape)} flatten to {latent_dim}")
        if not latent_sampler.is_fitted:
            raise ValueError("`latent_sampler` is not fitted: call its `fit(latents)` first")

    def resolve_latent_sampler(self, latent_sampler: str | None) -> str:
        """`latent_sampler` of a call -> "fitted" or "prior". None: "fitted" when the pipeline holds a sampler,
        else "prior"."""
        if latent_sampler is None:
            return "prior" if self.latent_sampler is None else "fitted"
        check_choice("latent_sampler", latent_sampler, LATENT_SAMPLERS)
        if latent_sampler == "fitted" and self.latent_sampler is None:
            raise ValueError('`latent_sampler="fitted"` needs a fitted latent sampler, but this pipeline has none '
                             '(its `latent_sampler` component is None): train with `--latent_sampler gmm`, or pass '
                             f'{type(self).__name__}(..., latent_sampler=GaussianMixtureSampler(...).fit(latents)); '
                             'or sample the prior with latent_sampler="prior"')
        return latent_sampler

    def latents_to_decode(self, batch_size, class_labels, generator, latents, latent_sampler):
        """What a call decodes: draws of the fitted sampler under "fitted" (unless `latents` are given), else
        `latents` as given (None: the skeleton draws prior noise)."""
        if self.resolve_latent_sampler(latent_sampler) == "prior":
            return latents
        if latents is not None:
            if latent_sampler == "fitted":
                raise ValueError('`latents` are decoded as they are given, and `latent_sampler="fitted"` would draw '
                                 'them: pass one of the two')
            return latents
        return self.sample_latents(batch_size, generator, class_labels)

    def sample_latents(self, batch_size: int | None = None, generator=None, class_labels=None) -> torch.Tensor:
        """Latents z ~ the fitted sampler (z_i ~ q(z|y_i) for a CVAE's `class_labels`), (B, *latent_shape) on the
        pipeline's device (B = `batch_size`, else one per label, or 1): what `__call__` decodes for "fitted" with
        the same `generator`."""
        self.check_latent_sampler(self.generative_model, self.latent_sampler)
        labels, batch_size = self.prepare_class_labels(class_labels, batch_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)} generators: it must hold one per image "
                             f"({batch_size}), or be a single generator")
        self.check_fits_in_memory(batch_size)
        flat = self.latent_sampler.sample(batch_size, generator=generator, class_labels=labels)
        return flat.view(batch_size, *self.latent_shape).to(self.device, self.generative_model.dtype)


class VAEPipeline(LatentSamplerMixin, GenerativePipeline):
    r"""Samples z ~ N(0, I), or from a latent sampler fitted to the aggregated posterior q(z), and decodes it with
    a VAE; also encodes, reconstructs, interpolates and traverses.

    Example:
        ```py
        >>> import torch
        >>> from hfgen import VAEPipeline
        >>> pipe = VAEPipeline.from_pretrained("hfgen-vae-mnist")
        >>> images = pipe(16, generator=torch.manual_seed(0)).images  # 16 PIL images
        >>> prior = pipe(16, latent_sampler="prior", generator=torch.manual_seed(0)).images  # z ~ N(0, I)
        ```

    Args:
        vae: the `VAEModel` (a CVAE also works: pass `class_labels` to every call).
        latent_sampler: optional; a fitted `GaussianMixtureSampler` over the VAE's flattened latents
            (latent_dim = prod(vae.latent_shape); per class for a CVAE). When the pipeline has one, calls sample
            from it unless they ask for `latent_sampler="prior"`.
    """

    family = "vae"

    _optional_components = ["latent_sampler"]

    def __init__(self, vae: VAEModel, latent_sampler: GaussianMixtureSampler | None = None):
        super().__init__()
        if latent_sampler is not None:
            self.check_latent_sampler(vae, latent_sampler)
        self.register_modules(vae=vae, latent_sampler=latent_sampler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        *,
        class_labels=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        latent_sampler: str | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Samples latents and decodes them.

        Args:
            latent_sampler: where z comes from: "prior" (z ~ N(0, I)) or "fitted" (z ~ the pipeline's fitted
                sampler of q(z), docs/maths.md §7.2); None: "fitted" when the pipeline holds a sampler, else "prior".
            latents: latents of shape (B, *latent_shape) to decode instead of sampling (not with "fitted").

        The other arguments are `GenerativePipeline.__call__`'s.
        """
        latents = self.latents_to_decode(batch_size, class_labels, generator, latents, latent_sampler)
        return super().__call__(batch_size, class_labels=class_labels, generator=generator, latents=latents,
                                output_type=output_type, return_dict=return_dict)

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
