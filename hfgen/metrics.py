"""hfgen's evaluation API under one name, for `from hfgen.metrics import ...`; each part lives in its own module:

- `hfgen.likelihood`: likelihood bounds in nats and bits per dimension (VAE ELBO and IWAE, diffusion bound);
- `hfgen.features`: the feature extractors of the Fréchet distance (digit classifier, Inception, DINOv2, CLIP);
- `hfgen.frechet`: the Fréchet distance, streamed feature statistics and their cache;
- `hfgen.sample_metrics`: KID, precision and recall, density and coverage, class accuracy and a memorisation
  check, in the same features as the Fréchet distance;
- `hfgen.evaluation`: `evaluate_pipeline`, all of it for one pipeline.
"""

from .evaluation import evaluate_pipeline
from .features import (
    DEFAULT_FEATURE_EXTRACTOR,
    INCEPTION,
    ClassifierFeatures,
    InceptionFeatures,
    TransformersFeatures,
    classifier_accuracy,
    default_classifier_dir,
    load_feature_extractor,
    load_transformers_features,
    resolve_feature_extractor,
    train_digit_classifier,
)
from .frechet import (
    FeatureStatistics,
    batch_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
)
from .likelihood import LIKELIHOOD_BATCH_SIZE, bits_per_dim, diffusion_bits_per_dim, evaluate_vae, iwae_log_likelihood
from .sample_metrics import (
    class_accuracy,
    kernel_distance,
    memorisation_share,
    nearest_distances,
    nearest_neighbour_radii,
    precision_recall_density_coverage,
    sample_quality_metrics,
)
from .utils import CACHE_ENV, hfgen_cache_dir

__all__ = [
    "CACHE_ENV", "DEFAULT_FEATURE_EXTRACTOR", "INCEPTION", "LIKELIHOOD_BATCH_SIZE", "ClassifierFeatures",
    "FeatureStatistics", "InceptionFeatures", "TransformersFeatures", "batch_features", "bits_per_dim",
    "class_accuracy", "classifier_accuracy", "default_classifier_dir", "diffusion_bits_per_dim", "evaluate_pipeline",
    "evaluate_vae", "feature_statistics", "frechet_distance", "frechet_distance_from_statistics", "hfgen_cache_dir",
    "iwae_log_likelihood", "kernel_distance", "load_feature_extractor", "load_transformers_features",
    "memorisation_share", "nearest_distances", "nearest_neighbour_radii", "precision_recall_density_coverage",
    "resolve_feature_extractor", "sample_quality_metrics", "train_digit_classifier",
]
