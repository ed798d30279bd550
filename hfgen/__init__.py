"""hfgen: Hugging Face-style VAEs, GANs, diffusion and latent diffusion models.

Importing hfgen imports every model and pipeline class: diffusers needs them imported to load saved
pipelines. Training code (hfgen.training) is imported only when used.
"""

__version__ = "0.2.0"

from .models import DigitClassifier, Discriminator, Generator, VAEModel, ViTDenoiser  # noqa: E402
from .pipelines import (  # noqa: E402
    AutoencoderPipeline, AutoPipeline, ConditionalPipeline, DDPMPipeline, GANPipeline, GenerativePipeline, LatentDiffusionPipeline,
    LatentTextToImagePipeline, TextToImagePipeline, VAEPipeline)

__all__ = ["AutoencoderPipeline", "AutoPipeline", "ConditionalPipeline", "DDPMPipeline", "DigitClassifier", "Discriminator", "GANPipeline", "GenerativePipeline", "Generator",
           "LatentDiffusionPipeline", "LatentTextToImagePipeline", "TextToImagePipeline", "VAEModel", "VAEPipeline", "ViTDenoiser", "__version__"]
