"""Evaluation: likelihood bounds in nats and bits per dimension (MATHS.md), and the Fréchet distance (FD)
between samples and real images in the features of a pluggable extractor (torchmetrics computes it).

FD's default features are those of a small digit classifier trained on hfgen:mnist and cached on first use
under $HFGEN_CACHE (default $HF_HOME/hfgen); "inception" gives FID proper when torch-fidelity is installed.
"""

import logging
import math
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from torch import nn

from .data import ImageDataset, load_image_dataset
from .distributions import standard_normal_log_prob
from .models import DigitClassifier, VAEModel
from .utils import check_class_labels, check_positive_int

logger = logging.getLogger(__name__)

DEFAULT_FEATURE_EXTRACTOR = "hfgen:digit-classifier"
INCEPTION = "inception"
CACHE_ENV = "HFGEN_CACHE"  # overrides where hfgen caches what it trains on first use
LIKELIHOOD_BATCH_SIZE = 100  # fixed, so that the Monte Carlo draws of the VAE bounds do not depend on `batch_size`


@torch.no_grad()
def iwae_log_likelihood(
    vae,
    sample: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    num_samples: int = 1000,
    generator: torch.Generator | None = None,
    chunk_size: int = 100,
) -> torch.Tensor:
    r"""The importance-weighted bound log p(x) >= log 1/K sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x): (B,).

    It is the ELBO (with the Monte Carlo KL) for K = 1 and tightens as K grows. Samples are drawn
    `chunk_size` at a time to bound memory.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("chunk_size", chunk_size)
    labels = check_class_labels(class_labels, vae.config.num_classes, sample.shape[0], sample.device)
    posterior = vae.encode(sample, labels).latent_dist
    batch = sample.shape[0]
    log_weights = []
    for start in range(0, num_samples, chunk_size):
        k = min(chunk_size, num_samples - start)
        latents = posterior.sample(generator, k)  # (k, B, D)
        decoded = vae.decoder_output(latents.flatten(0, 1), None if labels is None else labels.repeat(k))
        log_px_z = vae.log_likelihood(sample, decoded.unflatten(0, (k, batch)))  # (k, B)
        log_pz = standard_normal_log_prob(latents, num_batch_dims=2)
        log_weights.append(log_px_z + log_pz - posterior.log_prob(latents))
    return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(num_samples)


def bits_per_dim(nll_nats: float, num_dims: int, dequantization_bits: float = 0.0) -> float:
    """bpd = -log p(x) / (D ln 2), plus `dequantization_bits` (8 for 8-bit data under a density on [0, 1])."""
    return nll_nats / (num_dims * math.log(2)) + dequantization_bits


@torch.no_grad()
def evaluate_vae(vae, dataloader, num_importance_samples: int = 100, seed: int = 0) -> dict[str, float]:
    """Negative ELBO and IWAE negative log-likelihood with K = `num_importance_samples` (nats per example),
    and the IWAE bound in bits/dim, over a dataloader of (images, labels)."""
    generator = torch.Generator(vae.device).manual_seed(seed)
    conditional = vae.config.num_classes > 0
    total_elbo = total_iwae = count = 0.0
    for images, labels in dataloader:
        images = images.to(vae.device, vae.dtype)
        labels = labels.to(vae.device) if conditional else None
        total_elbo += vae(images, labels, generator=generator).elbo.sum().item()
        total_iwae += iwae_log_likelihood(vae, images, labels, num_importance_samples, generator).sum().item()
        count += images.shape[0]
    num_dims = math.prod(vae.image_shape)
    # A density on [0, 1] is turned into a probability of 8-bit pixels by the dequantization term.
    dequantization = 8.0 if vae.config.likelihood == "gaussian" else 0.0
    return {
        "test_negative_elbo": -total_elbo / count,
        "test_iwae_nll": -total_iwae / count,
        "test_iwae_bits_per_dim": bits_per_dim(-total_iwae / count, num_dims, dequantization),
    }


# ----- Fréchet distance -----------------------------------------------------------------------------------


def _random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> the same images rotated by up to 10 degrees, scaled by up to 10% and shifted by up to 2 pixels."""
    batch, _, height, width = images.shape
    uniform = torch.rand(batch, 4, generator=generator) * 2 - 1  # one draw in [-1, 1] per transform parameter
    angle, scale = uniform[:, 0] * math.radians(10), 1 + 0.1 * uniform[:, 1]
    shift = uniform[:, 2:] * torch.tensor([4 / width, 4 / height])  # 2 pixels in affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return F.grid_sample(images, F.affine_grid(theta, images.shape, align_corners=False), align_corners=False)


@torch.no_grad()
def classifier_accuracy(classifier: DigitClassifier, dataset: ImageDataset, batch_size: int = 500) -> float:
    """Share of `dataset`'s images whose most likely class is their label."""
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images, labels = dataset[start:start + batch_size]
        logits = classifier(images.to(classifier.device, classifier.dtype)).logits
        correct += (logits.argmax(1).cpu() == labels).sum().item()
    return correct / len(dataset)


def train_digit_classifier(
    train_dataset: ImageDataset,
    test_dataset: ImageDataset,
    num_epochs: int = 15,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> tuple[DigitClassifier, float]:
    """Trains a `DigitClassifier` with cross-entropy; returns it (in eval mode) and its accuracy on `test_dataset`.

    Adam with a one-cycle learning rate, on training images randomly rotated, scaled and shifted a little.
    On hfgen:mnist (4,000 training digits, seed 0) it reaches 97.7% test accuracy in ~15 s on one CPU core.
    The same seed gives the same weights.
    """
    check_positive_int("num_epochs", num_epochs)
    check_positive_int("batch_size", batch_size)
    if train_dataset.num_classes < 2:
        raise ValueError(f"`train_dataset` must have labels of at least 2 classes, got {train_dataset.num_classes}")
    channels, height, width = train_dataset.image_shape
    if height != width or test_dataset.image_shape != train_dataset.image_shape:
        raise ValueError(f"`train_dataset` and `test_dataset` must hold square images of one shape, got "
                         f"{train_dataset.image_shape} and {test_dataset.image_shape}")
    with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the global RNG as it was
        torch.manual_seed(seed)
        classifier = DigitClassifier(sample_size=height, in_channels=channels, num_classes=train_dataset.num_classes,
                                     id2label=train_dataset.id2label)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    steps_per_epoch = math.ceil(len(train_dataset) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=num_epochs * steps_per_epoch)
    classifier.train()
    for _ in range(num_epochs):
        order = torch.randperm(len(train_dataset), generator=generator)
        for start in range(0, len(train_dataset), batch_size):
            images, labels = train_dataset[order[start:start + batch_size]]
            loss = F.cross_entropy(classifier(_random_affine(images, generator)).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier.eval()
    return classifier, classifier_accuracy(classifier, test_dataset)


class ClassifierFeatures(nn.Module):
    """A `DigitClassifier`'s penultimate features as torchmetrics' custom `feature`: (B, C, H, W) in [0, 1] -> (B, d)."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.config.feature_dim
        self.in_channels = classifier.config.in_channels  # square images of any size (resized to the classifier's)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images).features


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 pool features: (B, 1 or 3, H, W) in [0, 1] -> (B, 2048); grey is repeated to RGB."""

    num_features = 2048
    in_channels = None  # 1 or 3, any size: the network resizes to 299 x 299 itself

    def __init__(self):
        super().__init__()
        from torchmetrics.utilities import imports

        if not imports._TORCH_FIDELITY_AVAILABLE:
            raise ImportError(
                'the "inception" feature extractor (FID proper) needs torch-fidelity, which is not installed, and '
                "its Inception-v3 weights, which torch-fidelity downloads on first use. hfgen does not install it: "
                "it pulls torchvision, which must match your torch build (pip install torch-fidelity with the "
                f"torchvision that fits your torch). Without it, use {DEFAULT_FEATURE_EXTRACTOR!r} or a saved "
                "DigitClassifier folder."
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)])
        except Exception as error:  # most often: no network to download the weights
            raise RuntimeError(
                f'could not load the Inception-v3 weights of the "inception" feature extractor: {error}'
            ) from error

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"the Inception feature extractor takes 1 or 3 channels, got {images.shape[1]}")
        rgb = images.expand(-1, 3, -1, -1)  # no-op for 3 channels
        return self.inception((rgb * 255).byte())  # the uint8 input of FID's Inception, as torchmetrics converts it


def hfgen_cache_dir() -> str:
    """Where hfgen caches what it trains on first use: $HFGEN_CACHE, else $HF_HOME/hfgen."""
    return os.environ.get(CACHE_ENV) or os.path.join(constants.HF_HOME, "hfgen")


def default_classifier_dir(cache_dir: str | None = None) -> str:
    """The folder of the cached default feature extractor (`cache_dir` defaults to `hfgen_cache_dir()`)."""
    return os.path.join(cache_dir or hfgen_cache_dir(), "digit-classifier")


def _classifier_card(classifier: DigitClassifier, accuracy: float, num_train: int, num_test: int) -> ModelCard:
    result = EvalResult(task_type="image-classification", dataset_type="hfgen:mnist", dataset_name="hfgen:mnist",
                        dataset_split="test", metric_type="accuracy", metric_value=round(accuracy, 4))
    data = ModelCardData(library_name="hfgen", tags=["hfgen", "feature-extractor"], pipeline_tag="image-classification",
                         model_name="hfgen digit classifier", eval_results=[result])
    return ModelCard(f"""---
{data.to_yaml()}
---

# hfgen digit classifier

A `DigitClassifier` trained by `hfgen.metrics.train_digit_classifier` (seed 0) on the {num_train:,} training
digits of `hfgen:mnist`. **Test accuracy: {accuracy:.2%}** on its {num_test:,} test digits.

Its {classifier.config.feature_dim}-dimensional penultimate features are the default feature space of
hfgen's Fréchet distance (`hfgen.metrics.frechet_distance`, `hfgen evaluate`).
""")


def _train_default_classifier(folder: str) -> None:
    """Trains the default classifier and saves it to `folder` atomically: a crash never leaves half a folder."""
    train, test = load_image_dataset("hfgen:mnist", "train"), load_image_dataset("hfgen:mnist", "test")
    classifier, accuracy = train_digit_classifier(train, test)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".digit-classifier-", dir=parent)
    try:
        classifier.save_pretrained(staging)
        _classifier_card(classifier, accuracy, len(train), len(test)).save(os.path.join(staging, "README.md"))
        try:
            os.replace(staging, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise  # otherwise another process cached it first: keep theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("trained the default feature extractor (test accuracy %.2f%%), cached in %s", 100 * accuracy, folder)


def load_feature_extractor(name_or_path: str = DEFAULT_FEATURE_EXTRACTOR, cache_dir: str | None = None) -> nn.Module:
    """A feature extractor for `frechet_distance`: (B, C, H, W) images in [0, 1] -> (B, num_features).

    Args:
        name_or_path: "hfgen:digit-classifier" (default: a `DigitClassifier` trained on hfgen:mnist's training
            split, 128-d features of 1 x 28 x 28 images; trained in ~15 s on first use and cached),
            a folder holding a saved `DigitClassifier`, or "inception" (torchmetrics' FID Inception-v3,
            2048-d; needs torch-fidelity and its weights).
        cache_dir: where the default classifier is cached; defaults to $HFGEN_CACHE, else $HF_HOME/hfgen.
    """
    if name_or_path == INCEPTION:
        return InceptionFeatures()
    if name_or_path == DEFAULT_FEATURE_EXTRACTOR:
        folder = default_classifier_dir(cache_dir)
        if not os.path.isdir(folder):
            _train_default_classifier(folder)
    elif os.path.isfile(os.path.join(str(name_or_path), "config.json")):
        folder = str(name_or_path)
        if DigitClassifier.load_config(folder).get("_class_name") != DigitClassifier.__name__:
            raise ValueError(f"`name_or_path` {folder!r} does not hold a saved DigitClassifier")
    else:
        raise ValueError(f"`name_or_path` must be {DEFAULT_FEATURE_EXTRACTOR!r}, {INCEPTION!r} or a folder with a saved "
                         f"DigitClassifier, got {name_or_path!r}")
    return ClassifierFeatures(DigitClassifier.from_pretrained(folder))


def _check_unit_images(name: str, images, feature_extractor: nn.Module) -> None:
    channels = getattr(feature_extractor, "in_channels", None)
    shape = f"(N, {channels}, S, S)" if channels else "(N, C, H, W)"
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"`{name}` must be a float tensor {shape} in [0, 1], got {got}")
    if images.dim() != 4 or (channels is not None and (images.shape[1] != channels or images.shape[2] != images.shape[3])):
        raise ValueError(f"`{name}` must have shape {shape} for this feature extractor, got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"`{name}` must hold at least 2 images (FD compares covariances), got {images.shape[0]}")
    low, high = images.min().item(), images.max().item()
    if not (0 <= low and high <= 1):  # also refuses NaN
        raise ValueError(f"`{name}` must hold values in [0, 1], got values in [{low:.3g}, {high:.3g}]")


@torch.no_grad()
def frechet_distance(
    real_images: torch.Tensor, fake_images: torch.Tensor, feature_extractor: nn.Module, batch_size: int = 250
) -> float:
    r"""FD between Gaussians fitted to the features of two image sets: (N, C, H, W) and (M, C, H, W) in [0, 1].

    FD = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}) (Heusel et al., 2017), computed by torchmetrics'
    `FrechetInceptionDistance` with `feature_extractor` (a module with an integer `num_features`, in eval mode)
    in place of Inception. Features are extracted `batch_size` images at a time on the extractor's device.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    num_features = getattr(feature_extractor, "num_features", None)
    if not isinstance(feature_extractor, nn.Module) or not isinstance(num_features, int):
        raise TypeError(f"`feature_extractor` must be an nn.Module with an integer `num_features`, got "
                        f"{type(feature_extractor).__name__} with num_features={num_features!r}")
    check_positive_int("batch_size", batch_size)
    _check_unit_images("real_images", real_images, feature_extractor)
    _check_unit_images("fake_images", fake_images, feature_extractor)
    if real_images.shape[1:] != fake_images.shape[1:]:
        raise ValueError(f"`real_images` and `fake_images` must have the same image shape, got "
                         f"{tuple(real_images.shape[1:])} and {tuple(fake_images.shape[1:])}")
    parameter = next(feature_extractor.parameters(), None)
    device, dtype = (real_images.device, real_images.dtype) if parameter is None else (parameter.device, parameter.dtype)
    # normalize=True: a custom module gets the float images in [0, 1] unchanged. sync_on_compute=False: all the
    # images are here; under several processes only the main one evaluates, so there is nobody to sync with.
    metric = FrechetInceptionDistance(feature=feature_extractor, normalize=True, sync_on_compute=False).to(device)
    for images, real in ((real_images, True), (fake_images, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start:start + batch_size].to(device, dtype), real=real)
    return metric.compute().item()


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    dataset: ImageDataset,
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
) -> dict[str, float]:
    """Sample quality, and likelihood bounds where the family has them, of an hfgen pipeline against `dataset`.

    "fd": FD between `num_samples` samples and `num_samples` images of `dataset` drawn at random with `seed`.
    A conditional pipeline is given the labels of those real images, so its classes follow the dataset's.
    Sample i is drawn with its own generator, so the samples do not depend on `batch_size`.
    For a VAE (a pipeline whose generative model is a `VAEModel`): `evaluate_vae`'s bounds over the whole dataset,
    unless `likelihood` is False.

    Args:
        feature_extractor: a module for `frechet_distance`, or a name or folder for `load_feature_extractor`
            (None: the default digit classifier).
        pipeline_kwargs: more arguments for the pipeline's call, e.g. {"num_inference_steps": 50}.
        vlb_num_images, vlb_num_timesteps: for a diffusion pipeline, the variational bound in bits/dim
            ("test_bits_per_dim") on that many of the real images (0: none), with all T terms or a sampled estimate.
        fd: False skips sampling and the FD: likelihood bounds only.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    if num_samples > len(dataset):
        raise ValueError(f"`num_samples` ({num_samples}) exceeds the {len(dataset)} images of `dataset`")
    if fd and not isinstance(feature_extractor, nn.Module):
        feature_extractor = load_feature_extractor(feature_extractor or DEFAULT_FEATURE_EXTRACTOR)
    model = pipeline.generative_model
    num_classes = pipeline.num_classes
    if num_classes and dataset.num_classes != num_classes:
        raise ValueError(f"the pipeline generates {num_classes} classes but `dataset` has {dataset.num_classes}: "
                         "a conditional pipeline is evaluated on a dataset labelled with its classes")
    generator = torch.Generator().manual_seed(seed)
    real_images, labels = dataset[torch.randperm(len(dataset), generator=generator)[:num_samples]]
    sample_seeds = torch.randint(2**62, (num_samples,), generator=generator).tolist()
    metrics = {}
    if fd:
        fake_images = []
        for start in range(0, num_samples, batch_size):
            seeds = sample_seeds[start:start + batch_size]
            generators = [torch.Generator(pipeline.device).manual_seed(s) for s in seeds]
            class_labels = labels[start:start + batch_size] if num_classes else None
            fake_images.append(pipeline(len(seeds), class_labels=class_labels, generator=generators, output_type="pt",
                                        **(pipeline_kwargs or {})).images)
        metrics["fd"] = frechet_distance(real_images, torch.cat(fake_images), feature_extractor, batch_size)
    if likelihood and isinstance(model, VAEModel):
        loader = torch.utils.data.DataLoader(dataset, batch_size=LIKELIHOOD_BATCH_SIZE)
        metrics.update(evaluate_vae(model.eval(), loader, num_importance_samples, seed))
    if likelihood and vlb_num_images and pipeline.denoises_pixels:
        metrics["test_bits_per_dim"] = diffusion_bits_per_dim(pipeline, real_images[:vlb_num_images], labels[:vlb_num_images], seed,
                                                              vlb_num_timesteps)
    return metrics


@torch.no_grad()
def diffusion_bits_per_dim(pipeline, images: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0,
                           num_timesteps: int | None = None, batch_size: int = LIKELIHOOD_BATCH_SIZE) -> float:
    """The variational bound of a diffusion pipeline (`hfgen.diffusion.variational_bound`) on 8-bit images in
    [0, 1], (N, C, H, W), averaged: bits per dimension. `num_timesteps` None sums all T terms."""
    from .diffusion import variational_bound

    denoiser = pipeline.generative_model.eval()
    conditional = pipeline.num_classes > 0

    def predict(x_t, timesteps, class_labels):
        return denoiser(x_t, timesteps, class_labels=class_labels).sample

    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(images), batch_size):
        x0 = images[start:start + batch_size].to(pipeline.device, denoiser.dtype) * 2 - 1
        batch_labels = labels[start:start + batch_size].to(pipeline.device) if conditional else None
        total += variational_bound(predict, x0, pipeline.scheduler, batch_labels, num_timesteps, generator).sum().item()
    return total / len(images)
