"""`evaluate_pipeline`: the Fréchet distance between an hfgen pipeline's samples and real images (and, with
`sample_metrics`, KID, precision/recall, density/coverage, class accuracy and a memorisation check in the same
features: hfgen.sample_metrics), and the family's likelihood bound where it has one (not a flow-matching model's:
the DDPM variational bound does not apply to it), for any dataset of (image, label) items, in memory or not."""

import dataclasses
import logging

import torch
from torch import nn
from torch.utils.data import IterableDataset

from . import autoencoders
from .data import image_batches
from .features import AUTO, DEFAULT_FEATURE_EXTRACTOR, ClassifierFeatures, load_feature_space
from .frechet import (
    FeatureStatistics,
    batch_features,
    frechet_distance_from_statistics,
    load_cached_features,
    load_cached_statistics,
    save_cached_statistics,
    statistics_device,
)
from .likelihood import LIKELIHOOD_BATCH_SIZE, diffusion_bits_per_dim, evaluate_vae
from .models import VAEModel
from .quantization import code_usage, flatten_latents, nearest_codes, perplexity
from .sample_metrics import MEMORISATION_QUANTILE, class_accuracy, memorisation_share, sample_quality_metrics
from .utils import check_fraction, check_positive_int

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


def _real_features(dataset, num_images: int, feature_extractor: nn.Module, batch_size: int, seed: int,
                   cache: bool, num_workers: int, keep_features: bool
                   ) -> tuple[FeatureStatistics, torch.Tensor, torch.Tensor | None]:
    """The FD statistics, the labels (N,) and, when `keep_features`, the features (N, d) of the real images, from
    the cache when they were computed before for the same dataset (its `fingerprint`), the same images and the
    same features (the extractor's `cache_id`); the features are cached with the statistics when kept."""
    fingerprint, features_id = getattr(dataset, "fingerprint", None), getattr(feature_extractor, "cache_id", None)
    key = None
    if cache and fingerprint and features_id:
        chosen = (f"first {num_images}" if isinstance(dataset, IterableDataset)
                  else f"randperm({len(dataset)}, seed={seed})[:{num_images}]")
        key = {"dataset": str(fingerprint), "images": chosen, "features": str(features_id)}
        cached = load_cached_statistics(key)
        features = load_cached_features(key) if cached is not None and keep_features else None
        if cached is not None and (features is not None or not keep_features):
            return *cached, features
    labels = []

    def images():
        for batch, batch_labels in _image_batches(dataset, num_images, seed, batch_size, num_workers):
            labels.append(batch_labels)
            yield batch

    statistics, features, _ = _features(images(), feature_extractor, "the images of `dataset`", keep_features)
    labels = torch.cat(labels)
    if key is not None:
        try:
            save_cached_statistics(key, statistics, labels, features=features)
        except OSError as error:  # e.g. a read-only cache: the FD is still right, only the next one is slower
            logger.warning("could not cache the FD statistics of the real images: %s", error)
    return statistics, labels, features


def _features(batches, feature_extractor: nn.Module, name: str, keep_features: bool, classifier: nn.Module | None = None
              ) -> tuple[FeatureStatistics, torch.Tensor | None, torch.Tensor | None]:
    """The FD statistics of the images' features (exactly as `feature_statistics` computes them), the features
    (N, d) themselves when `keep_features`, and the logits of `classifier` (a DigitClassifier) when given."""
    device = statistics_device(feature_extractor)  # checks the extractor first
    statistics = FeatureStatistics.empty(feature_extractor.num_features, device)
    kept, logits = [], []
    for images, features in batch_features(batches, feature_extractor, name):
        statistics.update(features)
        if keep_features:
            kept.append(features.detach())
        if classifier is not None:
            logits.append(classifier(images).logits.detach())
    return statistics, torch.cat(kept) if keep_features else None, torch.cat(logits) if classifier is not None else None


def _class_classifier(feature_extractor: nn.Module, pipeline) -> nn.Module | None:
    """The digit classifier behind `feature_extractor`, when its classes are the conditional pipeline's."""
    if not pipeline.num_classes or not isinstance(feature_extractor, ClassifierFeatures):
        return None
    classifier = feature_extractor.classifier
    names, pipeline_names = classifier.config.id2label, pipeline.id2label
    if classifier.config.num_classes != pipeline.num_classes or (names and pipeline_names and
                                                                 dict(names) != dict(pipeline_names)):
        logger.info("no class accuracy: the feature extractor's classifier has other classes than the pipeline")
        return None
    return classifier


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
    sample_metrics: bool = False,
    nearest_k: int = 3,
    kid_subset_size: int | None = None,
    kid_num_subsets: int = 100,
    train_dataset=None,
    memorisation_quantile: float = MEMORISATION_QUANTILE,
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

    With `sample_metrics`, in the same features and on the same real and generated images as FD (each set's
    features are extracted once; "fd" is the same number as without), hfgen.sample_metrics adds:
    "kid" and "kid_std" (`kernel_distance`: unbiased, about 0 for samples distributed as the real images; mean
    and standard deviation over `kid_num_subsets` subsets of `kid_subset_size` images), "precision", "recall",
    "density", "coverage" (`precision_recall_density_coverage`, `nearest_k` neighbours); for a conditional
    pipeline whose feature extractor is a digit classifier (`ClassifierFeatures`) with the pipeline's classes,
    "class_accuracy": the share of samples that classifier assigns to the class they were asked for; and, when
    `train_dataset` is given, "memorisation" (`memorisation_share`): the share of samples closer to their
    nearest training image than all but `memorisation_quantile` of the real images of `dataset` (held-out
    images, e.g. the test split) are to theirs; about `memorisation_quantile` for fresh samples, near 1 for
    copies of training images. The real images' features are cached with their statistics.

    Args:
        dataset: items (image (C, H, W) float in [0, 1], label), with `num_classes` and `image_shape`: an
            `hfgen.data` dataset, any map-style torch Dataset or an IterableDataset.
        feature_extractor: a module (see hfgen.features), or a name or folder for `load_feature_extractor`
            ("auto": chosen for the dataset's `image_shape`; None: the default digit classifier).
        pipeline_kwargs: more arguments for the pipeline's call, e.g. {"num_inference_steps": 50}.
        vlb_num_images, vlb_num_timesteps: for a diffusion pipeline, the variational bound in bits/dim
            ("test_bits_per_dim") on the first that many of the real images (0: none), with all T terms or a
            sampled estimate. A flow-matching pipeline has no such bound (docs/maths.md §6.9): none is reported
            (a warning says "not applicable"), and `vlb_num_timesteps` is refused.
        fd: False skips sampling and the FD (and `sample_metrics`): likelihood bounds only.
        num_workers: DataLoader workers that read `dataset` (and `train_dataset`).
        sample_metrics: True adds the metrics above to "fd".
        nearest_k: k of the k-nearest-neighbour balls of precision, recall, density and coverage.
        kid_subset_size, kid_num_subsets: KID's subsets (None: min(1000, num_samples // 2) images each).
        train_dataset: the images the model was trained on (all of them are read, `batch_size` at a time),
            for "memorisation"; None skips the check. It must not be `dataset`.
        memorisation_quantile: the quantile of the real images' nearest-training-image distances that a
            sample must fall below to count as close to the training set.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    length = None if isinstance(dataset, IterableDataset) else len(dataset)
    if length is not None and num_samples > length:
        raise ValueError(f"`num_samples` ({num_samples}) exceeds the {length} images of `dataset`")
    objective = getattr(pipeline, "objective_class", None)  # a diffusion pipeline's (hfgen.objectives)
    no_bound = objective is not None and not objective.has_likelihood_bound
    if no_bound and likelihood and vlb_num_timesteps is not None:
        raise ValueError(f"`vlb_num_timesteps` ({vlb_num_timesteps}) sets the DDPM variational bound, which does not "
                         f"apply to this {objective.title}: leave it out")
    num_classes = pipeline.num_classes
    if num_classes and dataset.num_classes != num_classes:
        raise ValueError(f"the pipeline generates {num_classes} classes but `dataset` has {dataset.num_classes}: "
                         "a conditional pipeline is evaluated on a dataset labelled with its classes")
    if sample_metrics:
        _check_sample_metric_args(num_samples, nearest_k, kid_subset_size, kid_num_subsets, memorisation_quantile)
        if not fd:
            raise ValueError("`sample_metrics` compares samples with real images, so it needs `fd`=True")
    if train_dataset is not None:
        _check_train_dataset(train_dataset, dataset, sample_metrics)
    generator = torch.Generator().manual_seed(seed)
    if length is not None:
        torch.randperm(length, generator=generator)  # the real images' draw (hfgen.data.image_batches repeats it)
    sample_seeds = torch.randint(2**62, (num_samples,), generator=generator).tolist()
    metrics = {}
    if fd:
        feature_extractor = feature_space(feature_extractor or DEFAULT_FEATURE_EXTRACTOR, dataset.image_shape)
        if feature_extractor is None:
            raise ValueError('`feature_extractor` "none" computes no FD: pass fd=False for the likelihood bounds alone')
        real, labels, real_features = _real_features(dataset, num_samples, feature_extractor, batch_size, seed,
                                                     cache_statistics, num_workers, keep_features=sample_metrics)
        samples = _samples(pipeline, sample_seeds, labels if num_classes else None, batch_size, pipeline_kwargs or {},
                           getattr(dataset, "image_shape", None))
        classifier = _class_classifier(feature_extractor, pipeline) if sample_metrics else None
        fake, fake_features, logits = _features(samples, feature_extractor, "the pipeline's samples", sample_metrics,
                                                classifier)
        metrics["fd"] = frechet_distance_from_statistics(real, fake)
        if sample_metrics:
            metrics.update(sample_quality_metrics(real_features, fake_features, nearest_k, kid_subset_size,
                                                  kid_num_subsets, seed))
            if logits is not None:
                metrics["class_accuracy"] = class_accuracy(logits, labels)
            if train_dataset is not None:
                train_images = (images for images, _ in image_batches(train_dataset, batch_size=batch_size,
                                                                      num_workers=num_workers, shuffle=False))
                train_features = (features for _, features in
                                  batch_features(train_images, feature_extractor, "the images of `train_dataset`"))
                metrics["memorisation"] = memorisation_share(fake_features, real_features, train_features,
                                                             memorisation_quantile)
    model = pipeline.generative_model
    if likelihood and isinstance(model, VAEModel):
        batches = image_batches(dataset, batch_size=LIKELIHOOD_BATCH_SIZE, num_workers=num_workers, shuffle=False)
        metrics.update(evaluate_vae(model.eval(), batches, num_importance_samples, seed))
    if likelihood and vlb_num_images and pipeline.denoises_pixels and no_bound:
        logger.warning(f"test_bits_per_dim: not applicable to {objective.a_title} (the DDPM variational bound assumes "
                       "the DDPM forward process; docs/maths.md §6.9): not reported")
    elif likelihood and vlb_num_images and pipeline.denoises_pixels:
        batches = _image_batches(dataset, min(vlb_num_images, num_samples), seed, LIKELIHOOD_BATCH_SIZE, num_workers,
                                 argument="vlb_num_images")
        images, labels = map(torch.cat, zip(*batches))
        metrics["test_bits_per_dim"] = diffusion_bits_per_dim(pipeline, images, labels, seed, vlb_num_timesteps)
    return metrics


def _check_sample_metric_args(num_samples: int, nearest_k: int, kid_subset_size: int | None, kid_num_subsets: int,
                              memorisation_quantile: float) -> None:
    check_positive_int("nearest_k", nearest_k)
    check_positive_int("kid_num_subsets", kid_num_subsets)
    check_fraction("memorisation_quantile", memorisation_quantile)
    if num_samples <= nearest_k:
        raise ValueError(f"`num_samples` ({num_samples}) must exceed `nearest_k` ({nearest_k}) for the "
                         "nearest-neighbour metrics of `sample_metrics`")
    if kid_subset_size is not None:
        check_positive_int("kid_subset_size", kid_subset_size)
        if not 2 <= kid_subset_size <= num_samples:
            raise ValueError(f"`kid_subset_size` must be in [2, num_samples={num_samples}], got {kid_subset_size}")


def _check_train_dataset(train_dataset, dataset, sample_metrics: bool) -> None:
    if not sample_metrics:
        raise ValueError("`train_dataset` is for the memorisation check of `sample_metrics`: pass "
                         "sample_metrics=True, or no `train_dataset`")
    shapes = getattr(train_dataset, "image_shape", None), getattr(dataset, "image_shape", None)
    if None not in shapes and tuple(shapes[0]) != tuple(shapes[1]):
        raise ValueError(f"`train_dataset` holds images of shape {tuple(shapes[0])}, but `dataset` images of shape "
                         f"{tuple(shapes[1])}: load both at one size")
    fingerprint = getattr(train_dataset, "fingerprint", None)
    if train_dataset is dataset or (fingerprint and fingerprint == getattr(dataset, "fingerprint", None)):
        raise ValueError("`train_dataset` holds the same images as `dataset`: the memorisation check compares "
                         "samples with the training images through held-out real images (e.g. the test split)")





# ----- the one evaluation path: the shared metrics, then the extras the pipeline's family has ----------------------


@dataclasses.dataclass
class EvaluationConfig:
    """What `evaluate` measures. `full=False` is the cheap evaluation a trainer logs every --eval_fd_steps: FD alone.

    Args:
        num_samples: samples drawn, and real images of the dataset compared with.
        feature_extractor: the FD's features: a module, or a name or folder for `load_feature_extractor` ("auto":
            chosen for the dataset's image shape, once, here; "none": no FD).
        pipeline_kwargs: more arguments of the pipeline's calls, e.g. {"num_inference_steps": 50}.
        sample_metrics: with `full`, KID, precision/recall, density/coverage and class accuracy in the FD's features.
        memorisation: with `sample_metrics`, the share of samples close to the training images (needs them).
        num_importance_samples: K of a VAE's IWAE bound.
        vlb_num_images, vlb_num_timesteps: a pixel DDPM's variational bound in bits/dim (0 images: none).
        digit_prompts: the dataset holds hfgen's captioned digits: a text-to-image pipeline's prompt following is
            measured with a digit classifier, `prompts_per_digit` images per digit of each prompt set.
        guidance_scale: of the prompt-following samples (None: 3 for a model trained with prompt dropout, else 1).
        clip_model, num_clip_images: a text-to-image pipeline's CLIP score on the dataset's captions.
    """

    num_samples: int = 1000
    feature_extractor: "str | nn.Module" = AUTO
    seed: int = 0
    batch_size: int = 250
    num_workers: int = 0
    pipeline_kwargs: dict = dataclasses.field(default_factory=dict)
    full: bool = True
    sample_metrics: bool = True
    nearest_k: int = 3
    memorisation: bool = False
    num_importance_samples: int = 100
    vlb_num_images: int = 100
    vlb_num_timesteps: int | None = None
    digit_prompts: bool = False
    prompts_per_digit: int = 20
    guidance_scale: float | None = None
    clip_model: str | None = None
    num_clip_images: int = 100

    def reads_train_dataset(self, feature_extractor) -> bool:
        """Whether `evaluate` needs the training images with these features: for the memorisation check, or for a
        digit classifier of prompt following when the features are not one."""
        return self.full and ((self.memorisation and feature_extractor is not None) or (
            self.digit_prompts and not isinstance(feature_extractor, ClassifierFeatures)))


def feature_space(feature_extractor, image_shape) -> nn.Module | None:
    """A module passes through; a name or folder is loaded for images of `image_shape` ("none": None)."""
    if isinstance(feature_extractor, nn.Module):
        return feature_extractor
    return load_feature_space(feature_extractor, image_shape)


def evaluate(pipeline, dataset, config: EvaluationConfig | None = None, train_dataset=None) -> dict[str, float]:
    """A pipeline's metrics against `dataset`, as trainers (final and periodic) and `hfgen evaluate` report them:
    `evaluate_pipeline`'s shared metrics, then, with `config.full`, the extras its family has:

    - a VAE pipeline with a fitted latent sampler: "fd_prior", the FD of samples of the prior N(0, I);
    - latent diffusion: "first_stage_reconstruction_mse" (`reconstruction_mse` over `dataset`);
    - text-to-image: prompt following (hfgen.prompt_following) with `digit_prompts` or a `clip_model`.

    `train_dataset`: the training images, for the memorisation check and for training a digit classifier of small
    digits (prompt following)."""
    config = config or EvaluationConfig()
    feature_extractor = feature_space(config.feature_extractor, dataset.image_shape)
    if getattr(pipeline, "family", None) == "autoencoder":  # reconstructions, not samples
        return evaluate_autoencoder(pipeline.vae, dataset, feature_extractor, config.num_samples, config.batch_size,
                                    config.seed, config.num_workers)
    fd = feature_extractor is not None
    sample_metrics = config.full and config.sample_metrics and fd and config.num_samples > config.nearest_k
    if sample_metrics and config.memorisation and train_dataset is None:
        raise ValueError("`memorisation` compares samples with the training images: pass `train_dataset`")
    shared = dict(num_samples=config.num_samples, feature_extractor=feature_extractor, seed=config.seed,
                  batch_size=config.batch_size, pipeline_kwargs=config.pipeline_kwargs, fd=fd,
                  num_workers=config.num_workers)
    metrics = evaluate_pipeline(
        pipeline, dataset, likelihood=config.full, num_importance_samples=config.num_importance_samples,
        vlb_num_images=config.vlb_num_images, vlb_num_timesteps=config.vlb_num_timesteps,
        sample_metrics=sample_metrics, nearest_k=config.nearest_k,
        train_dataset=train_dataset if sample_metrics and config.memorisation else None, **shared)
    if not config.full:
        return metrics
    if fd and getattr(pipeline, "latent_sampler", None) is not None:
        prior = evaluate_pipeline(pipeline, dataset, likelihood=False, **{
            **shared, "pipeline_kwargs": {**config.pipeline_kwargs, "latent_sampler": "prior"}})
        metrics = _after(metrics, "fd", {"fd_prior": prior["fd"]})
    if hasattr(pipeline, "vae") and hasattr(pipeline, "unet"):  # a first stage's latents denoised
        metrics["first_stage_reconstruction_mse"] = reconstruction_mse(pipeline.vae, dataset, config.batch_size)
    if hasattr(pipeline, "encode_prompt") and (config.digit_prompts or config.clip_model):
        metrics.update(_prompt_following(pipeline, dataset, config, feature_extractor, train_dataset))
    return metrics


def _after(metrics: dict, key: str, more: dict) -> dict:
    """`metrics` with `more` right after `key`."""
    ordered = {}
    for name, value in metrics.items():
        ordered[name] = value
        if name == key:
            ordered.update(more)
    return ordered


def _prompt_following(pipeline, dataset, config: EvaluationConfig, feature_extractor, train_dataset) -> dict:
    from .prompt_following import digit_classifier_for, evaluate_prompt_following, resolve_guidance_scale

    classifier = None
    if config.digit_prompts:
        if isinstance(feature_extractor, ClassifierFeatures):
            classifier = feature_extractor.classifier
        elif train_dataset is not None:
            classifier = digit_classifier_for(train_dataset, dataset)
        else:
            raise ValueError("digit prompt following needs a digit classifier: pass `train_dataset` or the digit "
                             "classifier's features")
        classifier = classifier.to(pipeline.device)
    guidance_scale = resolve_guidance_scale(config.guidance_scale, pipeline.config.get("prompt_dropout"))
    return evaluate_prompt_following(pipeline, dataset, classifier, config.clip_model, config.prompts_per_digit,
                                     config.num_clip_images, config.seed, config.batch_size,
                                     {**config.pipeline_kwargs, "guidance_scale": guidance_scale})


@torch.no_grad()
def evaluate_autoencoder(vae, dataset, feature_extractor: nn.Module | None = None, num_images: int | None = None,
                         batch_size: int = 500, seed: int = 0, num_workers: int = 0) -> dict[str, float]:
    """A first stage's reconstructions x' = decode(E[q(z|x)]) (quantised by a VQModel's decode) of `num_images`
    images of `dataset` (None: all; else the first of a permutation drawn with `seed`): "fd" between the images
    and their reconstructions (with a `feature_extractor`), "reconstruction_mse" per pixel, and for a VQModel
    "codebook_perplexity" (exp of the entropy of the codes the images use, docs/maths.md §7.4) and
    "codebook_usage" (the share of codebook entries they use)."""
    codebook = vae.quantize.embedding.weight if hasattr(vae, "quantize") else None
    counts = None if codebook is None else torch.zeros(len(codebook))
    real = fake = None
    if feature_extractor is not None:
        real = FeatureStatistics.empty(feature_extractor.num_features, statistics_device(feature_extractor))
        fake = FeatureStatistics.empty(feature_extractor.num_features, statistics_device(feature_extractor))
    total, count = 0.0, 0
    for images, _ in image_batches(dataset, num_images, seed, batch_size, num_workers):
        latents = autoencoders.encode(vae, images).mean
        decoded = autoencoders.decode(vae, latents).float().cpu()
        total += torch.sum((decoded - images) ** 2).item()
        count += images.numel()
        if codebook is not None:
            counts += code_usage(nearest_codes(flatten_latents(latents.float()), codebook.float()), len(codebook)).cpu()
        if feature_extractor is not None:
            for statistics, batch in ((real, images), (fake, decoded.clamp(0, 1))):
                _, features = next(batch_features([batch], feature_extractor, "the reconstructions"))
                statistics.update(features)
    metrics = {} if real is None else {"fd": frechet_distance_from_statistics(real, fake)}
    metrics["reconstruction_mse"] = total / count
    if counts is not None:
        metrics.update(codebook_perplexity=perplexity(counts), codebook_usage=float((counts > 0).float().mean()))
    return metrics


def reconstruction_mse(vae, dataset, batch_size: int = 500) -> float:
    """Mean squared error per pixel of x against decode(E[q(z|x)]) over the images of `dataset` (in [0, 1]), under
    any first stage (`hfgen.autoencoders`): `evaluate_autoencoder`'s, over every image."""
    return evaluate_autoencoder(vae, dataset, batch_size=batch_size)["reconstruction_mse"]
