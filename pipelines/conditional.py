"""Class-conditional sampling from any conditional latent-variable model (docs/maths.md §5)."""

from hfgen.models import ModelMixin

from .pipeline_utils import GenerativePipeline


class ConditionalPipeline(GenerativePipeline):
    r"""Generates the classes it is asked for with a conditional VAE (or conditional GAN generator).

    Example:
        ```py
        >>> from hfgen import ConditionalPipeline
        >>> pipe = ConditionalPipeline.from_pretrained("path/to/cvae")
        >>> images = pipe(class_labels=[0, 1, 2, 3], generator=torch.manual_seed(0)).images
        ```

    Args:
        model: a model with `num_classes > 0` that decodes (latents, class_labels) to images: a CVAE
            (`VAEModel`) or a conditional GAN `Generator`.
        discriminator: optional; a conditional GAN's discriminator, saved so adversarial training can resume.
    """

    _optional_components = ["discriminator"]

    def __init__(self, model: ModelMixin, discriminator: ModelMixin | None = None):
        super().__init__()
        if model.config.num_classes < 1:
            raise ValueError("`model` must be conditional (num_classes > 0); use the family's unconditional pipeline")
        self.register_modules(model=model, discriminator=discriminator)

    @property
    def generative_model(self):
        return self.model

    @property
    def family(self) -> str:
        from hfgen.models import VAEModel

        return "vae" if isinstance(self.model, VAEModel) else "gan"

    def __call__(self, batch_size: int | None = None, *, class_labels=None, **kwargs):
        if class_labels is None:
            raise ValueError(f"`class_labels` are required: the model generates {self.model.config.num_classes} classes")
        return super().__call__(batch_size, class_labels=class_labels, **kwargs)
