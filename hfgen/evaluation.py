"""`evaluate_pipeline`: the Fréchet distance between an hfgen pipeline's samples and real images, and the
family's likelihood bound where it has one, for any dataset of (image, label) items, in memory or not."""

import logging

import torch
from torch import nn
from torch.utils.data import IterableDataset

from .data import image_batches
from .features import AUTO, DEFAULT_FEATURE_EXTRACTOR, load_feature_extractor, resolve_feature_extractor
from .frechet import (
    FeatureStatistics,
    feature_statistics,
    frechet_distance_from_statistics,
    load_cached_statistics,
    save_cached_statistics,
)
from .likelihood import LIKELIHOOD_BATCH_SIZE, diffusion_bits_per_dim, evaluate_vae
from .models import VAEModel
from .utils import check_positive_int

logger = logging.getLogger(__name__)


def _image_batches(dataset, num_images: int, seed: int, batch_size: int, num_workers: int = 0,
                   argument: str = "num_samples"):
    """`hfgen.data.image_batches`, with a clear error when a streamed dataset holds fewer than `num_images`."""
    seen = 0
    for images, labels in image_batches(dataset, num_images, seed, batch_size, num_workers):
        seen += len(images)
        yield images, labels
    if seen < num_images:
        raise ValueError(f"`{argument}` ({num_images}) exceeds the {seen} images of `dataset`")


def _real_statistics(dataset, num_images: int, feature_extractor: nn.Module, batch_size: int, seed: int,
                     cache: bool, num_workers: int) -> tuple[FeatureStatistics, torch.Tensor]:
    """The FD statistics and the labels (N,) of the real images, from the cache when they were computed before
    for the same dataset (its `fingerprint`), the same images and the same features (the extractor's `cache_id`)."""
    fingerprint, features_id = getattr(dataset, "fingerprint", None), getattr(feature_extractor, "cache_id", None)
    key = None
    if cache and fingerprint and features_id:
        chosen = (f"first {num_images}" if isinstance(dataset, IterableDataset)
                  else f"randperm({len(dataset)}, seed={seed})[:{num_images}]")
        key = {"dataset": str(fingerprint), "images": chosen, "features": str(features_id)}
        cached = load_cached_statistics(key)
        if cached is not None:
            return cached
    labels = []

    def images():
        for batch, batch_labels in _image_batches(dataset, num_images, seed, batch_size, num_workers):
            labels.append(batch_labels)
            yield batch

    statistics = feature_statistics(images(), feature_extractor, "the images of `dataset`")
    labels = torch.cat(labels)
    if key is not None:
        try:
            save_cached_statistics(key, statistics, labels)
        except OSError as error:  # e.g. a read-only cache: the FD is still right, only the next one is slower
            logger.warning("could not cache the FD statistics of the real images: %s", error)
    return statistics, labels


def _samples(pipeline, seeds: list[int], labels: torch.Tensor | None, batch_size: int, pipeline_kwargs: dict,
             image_shape):
    """The pipeline's samples (B, C, H, W) in [0, 1], `batch_size` at a time; sample i is drawn with a generator
    seeded with seeds[i] (and class labels[i]), so that the samples do not depend on `batch_size`."""
    for start in range(0, len(seeds), batch_size):
        batch_seeds = seeds[start:start + batch_size]
        generators = [torch.Generator(pipeline.device).manual_seed(seed) for seed in batch_seeds]
        class_labels = None if labels is None else labels[start:start + batch_size]
        images = pipeline(len(batch_seeds), class_labels=class_labels, generator=generators, output_type="pt",
                          **pipeline_kwargs).images
        if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
            raise ValueError(f"the pipeline generates images of shape {tuple(images.shape[1:])}, but `dataset` "
                             f"holds images of shape {tuple(image_shape)}: evaluate it on a dataset of its size")
        yield images


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    dataset,
    num_samples: int = 1000,
    feature_extractor: nn.Module | str | None = None,
    seed: int = 0,
    batch_size: int = 250,
    num_importance_samples: int = 100,
    likelihood: bool = True,
    pipeline_kwargs: dict | None = None,
    vlb_num_images: int = 100,
    vlb_num_timesteps: int | None = None,
    fd: bool = True,
    cache_statistics: bool = True,
    num_workers: int = 0,
) -> dict[str, float]:
    """Sample quality, and likelihood bounds where the family has them, of an hfgen pipeline against `dataset`.

    "fd": FD between `num_samples` samples and `num_samples` real images: for a map-style dataset the first
    `num_samples` of a permutation drawn with `seed`, for an iterable one its first `num_samples` items. Real and
    generated images are read `batch_size` at a time, so memory does not grow with `num_samples`. A conditional
    pipeline is given the labels of those real images, so its classes follow the dataset's. Sample i is drawn
    with its own generator, so the samples do not depend on `batch_size`. The real images' statistics are cached
    (hfgen.frechet) when the dataset has a `fingerprint` and the extractor a `cache_id`, unless `cache_statistics`
    is False. For a VAE (a pipeline whose generative model is a `VAEModel`): `evaluate_vae`'s bounds over the
    whole dataset, unless `likelihood` is False.

    Args:
        dataset: items (image (C, H, W) float in [0, 1], label), with `num_classes` and `image_shape`: an
            `hfgen.data` dataset, any map-style torch Dataset or an IterableDataset.
        feature_extractor: a module (see hfgen.features), or a name or folder for `load_feature_extractor`
            ("auto": chosen for the dataset's `image_shape`; None: the default digit classifier).
        pipeline_kwargs: more arguments for the pipeline's call, e.g. {"num_inference_steps": 50}.
        vlb_num_images, vlb_num_timesteps: for a diffusion pipeline, the variational bound in bits/dim
            ("test_bits_per_dim") on the first that many of the real images (0: none), with all T terms or a
            sampled estimate.
        fd: False skips sampling and the FD: likelihood bounds only.
        num_workers: DataLoader workers that read `dataset`.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    length = None if isinstance(dataset, IterableDataset) else len(dataset)
    if length is not None and num_samples > length:
        raise ValueError(f"`num_samples` ({num_samples}) exceeds the {length} images of `dataset`")
    num_classes = pipeline.num_classes
    if num_classes and dataset.num_classes != num_classes:
        raise ValueError(f"the pipeline generates {num_classes} classes but `dataset` has {dataset.num_classes}: "
                         "a conditional pipeline is evaluated on a dataset labelled with its classes")
    generator = torch.Generator().manual_seed(seed)
    if length is not None:
        torch.randperm(length, generator=generator)  # the real images' draw (hfgen.data.image_batches repeats it)
    sample_seeds = torch.randint(2**62, (num_samples,), generator=generator).tolist()
    metrics = {}
    if fd:
        if not isinstance(feature_extractor, nn.Module):
            feature_extractor = _load_for(feature_extractor, dataset)
        real, labels = _real_statistics(dataset, num_samples, feature_extractor, batch_size, seed, cache_statistics,
                                        num_workers)
        samples = _samples(pipeline, sample_seeds, labels if num_classes else None, batch_size, pipeline_kwargs or {},
                           getattr(dataset, "image_shape", None))
        fake = feature_statistics(samples, feature_extractor, "the pipeline's samples")
        metrics["fd"] = frechet_distance_from_statistics(real, fake)
    model = pipeline.generative_model
    if likelihood and isinstance(model, VAEModel):
        batches = image_batches(dataset, batch_size=LIKELIHOOD_BATCH_SIZE, num_workers=num_workers, shuffle=False)
        metrics.update(evaluate_vae(model.eval(), batches, num_importance_samples, seed))
    if likelihood and vlb_num_images and pipeline.denoises_pixels:
        batches = _image_batches(dataset, min(vlb_num_images, num_samples), seed, LIKELIHOOD_BATCH_SIZE, num_workers,
                                 argument="vlb_num_images")
        images, labels = map(torch.cat, zip(*batches))
        metrics["test_bits_per_dim"] = diffusion_bits_per_dim(pipeline, images, labels, seed, vlb_num_timesteps)
    return metrics


def _load_for(name_or_path: str | None, dataset) -> nn.Module:
    """load_feature_extractor(name_or_path), with "auto" resolved for the dataset's images."""
    name = name_or_path or DEFAULT_FEATURE_EXTRACTOR
    if name == AUTO:
        name = resolve_feature_extractor(name, tuple(dataset.image_shape))
    if name is None:
        raise ValueError(f"`feature_extractor` {AUTO!r} has no default for images of shape "
                         f"{tuple(dataset.image_shape)}: pass one, e.g. 'dinov2:facebook/dinov2-small', or fd=False")
    return load_feature_extractor(name)
