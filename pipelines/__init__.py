"""hfgen pipelines: one module per family, all on `GenerativePipeline`."""

from .auto import AutoPipeline
from .autoencoder import AutoencoderPipeline
from .conditional import ConditionalPipeline
from .ddpm import DDPMPipeline
from .gan import GANPipeline
from .latent_diffusion import LatentDiffusionPipeline
from .pipeline_utils import GenerativePipeline
from .text_to_image import LatentTextToImagePipeline, TextToImagePipeline
from .vae import VAEPipeline

PIPELINES = {pipeline.__name__: pipeline for pipeline in (
    VAEPipeline, GANPipeline, ConditionalPipeline, DDPMPipeline, LatentDiffusionPipeline, TextToImagePipeline,
    LatentTextToImagePipeline, AutoencoderPipeline)}

__all__ = ["AutoencoderPipeline", "AutoPipeline", "ConditionalPipeline", "DDPMPipeline", "GANPipeline", "GenerativePipeline", "LatentDiffusionPipeline",
           "LatentTextToImagePipeline", "TextToImagePipeline", "VAEPipeline", "PIPELINES"]
