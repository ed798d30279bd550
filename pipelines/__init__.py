"""hfgen pipelines: one module per family, all on `GenerativePipeline`."""

from .auto import AutoPipeline
from .conditional import ConditionalPipeline
from .gan import GANPipeline
from .pipeline_utils import GenerativePipeline
from .vae import VAEPipeline

PIPELINES = {pipeline.__name__: pipeline for pipeline in (VAEPipeline, GANPipeline, ConditionalPipeline)}

__all__ = ["AutoPipeline", "ConditionalPipeline", "GANPipeline", "GenerativePipeline", "VAEPipeline", "PIPELINES"]
