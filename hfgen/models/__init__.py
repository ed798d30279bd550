"""hfgen's model classes.

Saved pipelines record each component as [module, class] in model_index.json. hfgen records the public
module `hfgen.models` for every model class, whatever file defines it, so folders saved today keep loading
after the code is reorganised. diffusers looks `ModelMixin` up on the recorded module, so it is exported here.
"""

from diffusers.models.modeling_utils import ModelMixin

from .classifier import ClassifierOutput, DigitClassifier
from .gan import Discriminator, DiscriminatorOutput, Generator, GeneratorOutput, PatchDiscriminator
from .latent_sampler import GaussianMixtureSampler
from .vae import VAEDecoderOutput, VAEEncoderOutput, VAEModel, VAEOutput
from .vit import ViTDenoiser

RECORDED_MODULE = __name__  # "hfgen.models"

for _model_class in (VAEModel, DigitClassifier, Generator, Discriminator, PatchDiscriminator, ViTDenoiser,
                     GaussianMixtureSampler):
    _model_class.__module__ = RECORDED_MODULE

__all__ = ["ModelMixin", "ClassifierOutput", "DigitClassifier", "Discriminator", "DiscriminatorOutput", "GaussianMixtureSampler", "Generator", "GeneratorOutput", "PatchDiscriminator", "VAEModel", "VAEOutput", "VAEEncoderOutput", "VAEDecoderOutput", "ViTDenoiser"]
