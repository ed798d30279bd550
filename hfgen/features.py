"""Feature extractors for the Fréchet distance (hfgen.frechet): (B, C, H, W) images in [0, 1] -> (B, num_features).

Every extractor is an `nn.Module` in eval mode, without gradients, with an int `num_features`, an `in_channels`
(the channels it takes, None for 1 or 3) and a `cache_id` that changes whenever its features would:

- "hfgen:digit-classifier" (the default): a small `DigitClassifier` trained on hfgen:mnist on first use and
  cached under $HFGEN_CACHE (default $HF_HOME/hfgen); a saved DigitClassifier folder works the same way;
- "classifier": a domain feature space for any labelled dataset (class folders, a label column, the bundled
  digits): a small `DomainClassifier` trained once on the dataset's training split and its labels
  (`train_domain_classifier`), cached under $HFGEN_CACHE by the dataset's fingerprint, image shape and recipe;
- "inception": torchmetrics' FID Inception-v3, for FID proper (needs torch-fidelity);
- "dinov2:<Hub id or folder>" and "clip:<Hub id or folder>": transformers image encoders.

`resolve_feature_extractor("auto", image_shape)` picks one for a shape of images. Every extractor also has a
`feature_space`, the sentence a model card names its numbers' space with (`describe_feature_space`).
"""

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .models import DigitClassifier
from .models.classifier import DomainClassifier
from .utils import check_positive_int, hfgen_cache_dir

if TYPE_CHECKING:
    from .data import ImageDataset

logger = logging.getLogger(__name__)

DEFAULT_FEATURE_EXTRACTOR = "hfgen:digit-classifier"
DOMAIN_CLASSIFIER = "classifier"  # a classifier trained on the dataset's own training split and labels
INCEPTION = "inception"
AUTO = "auto"
# "<kind>:<Hub id or folder>", and the transformers model types each kind loads
TRANSFORMERS_KINDS = {"dinov2": ("dinov2", "dinov2_with_registers"), "clip": ("clip", "clip_vision_model")}
FID_EXTRA = 'pip install "hfgen[fid]"'


def _sha256_of_tensors(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----- the digit classifier -------------------------------------------------------------------------------


def _random_affine(images: torch.Tensor, generator: torch.Generator, max_shift: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> the same images rotated by up to 10 degrees, scaled by up to 10% and shifted by up to
    `max_shift` pixels."""
    batch, _, height, width = images.shape
    uniform = torch.rand(batch, 4, generator=generator) * 2 - 1  # one draw in [-1, 1] per transform parameter
    angle, scale = uniform[:, 0] * math.radians(10), 1 + 0.1 * uniform[:, 1]
    # max_shift pixels in affine_grid's [-1, 1] units
    shift = uniform[:, 2:] * torch.tensor([2 * max_shift / width, 2 * max_shift / height])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return F.grid_sample(images, F.affine_grid(theta, images.shape, align_corners=False), align_corners=False)


@torch.no_grad()
def classifier_accuracy(classifier: DigitClassifier, dataset: "ImageDataset", batch_size: int = 500) -> float:
    """Share of `dataset`'s images whose most likely class is their label."""
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images, labels = dataset[start:start + batch_size]
        logits = classifier(images.to(classifier.device, classifier.dtype)).logits
        correct += (logits.argmax(1).cpu() == labels).sum().item()
    return correct / len(dataset)


def _random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> the same images, each flipped left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _fit_classifier(classifier: DigitClassifier, images, num_epochs: int, batch_size: int, learning_rate: float,
                    generator: torch.Generator, random_flip: bool = False, max_shift: float = 2.0) -> None:
    """Cross-entropy training of `classifier` on `images[indices]` -> (images (B, C, H, W), labels (B,)); Adam with a
    one-cycle learning rate, on images randomly rotated, scaled, shifted by up to `max_shift` pixels (and flipped
    left-right: `random_flip`). Every random draw comes from `generator`; leaves the classifier in eval mode."""
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=num_epochs * steps_per_epoch)
    classifier.train()
    for _ in range(num_epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch, labels = images[order[start:start + batch_size]]
            if random_flip:
                batch = _random_flip(batch, generator)
            loss = F.cross_entropy(classifier(_random_affine(batch, generator, max_shift)).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier.eval()


def train_digit_classifier(
    train_dataset: "ImageDataset",
    test_dataset: "ImageDataset",
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
    _fit_classifier(classifier, train_dataset, num_epochs, batch_size, learning_rate, generator)
    return classifier, classifier_accuracy(classifier, test_dataset)


class ClassifierFeatures(nn.Module):
    """A `DigitClassifier`'s (or `DomainClassifier`'s) penultimate features: (B, C, S, S) in [0, 1] -> (B, feature_dim).

    Square images of any size are resized to the classifier's. `cache_id` is "digit-classifier-" or
    "domain-classifier-" and a hash of its config and weights. `feature_space` names the space for model cards:
    `description` says what the classifier is (default: from a DomainClassifier's `trained_on` record, else its class).
    """

    def __init__(self, classifier: DigitClassifier, description: str | None = None):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.config.feature_dim
        self.in_channels = classifier.config.in_channels
        weights = _sha256_of_tensors(classifier.state_dict())
        settings = {key: value for key, value in classifier.config.items() if not key.startswith("_")}  # not its path
        config = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        kind = "domain-classifier" if isinstance(classifier, DomainClassifier) else "digit-classifier"
        self.cache_id = f"{kind}-{hashlib.sha256((config + weights).encode()).hexdigest()[:16]}"
        description = description or _classifier_description(classifier)
        self.feature_space = (f"the {self.num_features}-d penultimate features of {description}, "
                              f"cache_id {self.cache_id}")
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images).features


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

A `DigitClassifier` trained by `hfgen.features.train_digit_classifier` (seed 0) on the {num_train:,} training
digits of `hfgen:mnist`. **Test accuracy: {accuracy:.2%}** on its {num_test:,} test digits.

Its {classifier.config.feature_dim}-dimensional penultimate features are the default feature space of
hfgen's Fréchet distance (`hfgen.frechet`, `hfgen evaluate`).
""")


def _save_atomically(classifier: DigitClassifier, card: ModelCard, folder: str) -> None:
    """Saves `classifier` and its card to `folder` through a staging folder renamed into place: a crash never
    leaves half a folder, and when another process cached one first, theirs is kept."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    try:
        classifier.save_pretrained(staging)
        card.save(os.path.join(staging, "README.md"))
        try:
            os.replace(staging, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise  # otherwise another process cached it first: keep theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _train_default_classifier(folder: str) -> None:
    """Trains the default classifier and saves it to `folder` atomically."""
    from .data import load_image_dataset

    # a warning: shown by commands that configure no logging, such as `hfgen evaluate`, on stderr
    logger.warning("training the default feature extractor %s (once; it is cached in %s)", DEFAULT_FEATURE_EXTRACTOR,
                   folder)
    train, test = load_image_dataset("hfgen:mnist", "train"), load_image_dataset("hfgen:mnist", "test")
    with torch.enable_grad():  # callers may be evaluating under torch.no_grad
        classifier, accuracy = train_digit_classifier(train, test)
    _save_atomically(classifier, _classifier_card(classifier, accuracy, len(train), len(test)), folder)
    logger.info("trained the default feature extractor (test accuracy %.2f%%), cached in %s", 100 * accuracy, folder)


# ----- a domain classifier: any labelled dataset's own feature space --------------------------------------

DOMAIN_CLASSIFIERS_DIR = "domain-classifiers"  # under the cache, one folder per (dataset, image shape, recipe)
DOMAIN_RECIPE_VERSION = 1  # part of every cache key: bump it when the training code changes what a recipe trains
DOMAIN_SHIFT = 1 / 14  # random shifts of up to this share of the image side: the digit classifier's 2 px at 28 px


def domain_block_channels(sample_size: int) -> tuple[int, ...]:
    """The conv blocks of a domain classifier of `sample_size` px images: widths 16, 32, 64, 128, one more block
    while the map it leaves is at least 4 px, at least one and at most four blocks (8 px -> (16,), 28 -> (16, 32),
    32 -> (16, 32, 64), 64 and more -> (16, 32, 64, 128))."""
    check_positive_int("sample_size", sample_size)
    widths, size = [16], sample_size // 2
    while len(widths) < 4 and size // 2 >= 4:
        widths.append(2 * widths[-1])
        size //= 2
    return tuple(widths)


def _check_labelled_dataset(dataset) -> None:
    """`dataset` as train_domain_classifier takes it: an hfgen dataset of square images, with a fingerprint."""
    for attribute in ("image_shape", "fingerprint", "id2label"):
        if not hasattr(dataset, attribute):
            raise TypeError(f"`dataset` must be an hfgen dataset (e.g. from hfgen.data.load_image_dataset or a "
                            f"source's `dataset(...)`) with `{attribute}`, got {type(dataset).__name__}")
    channels, height, width = dataset.image_shape
    if height != width:
        raise ValueError(f"`dataset` must hold square images, got {channels}x{height}x{width}")
    if not dataset.fingerprint:
        raise ValueError("`dataset` has an empty `fingerprint`: the classifier is cached by it")


def _labelled_images(dataset) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All of `dataset`'s images (N, C, H, W) in [0, 1] as stored (no augmentation), their labels (N,) long and the
    number of classes; refuses a dataset with fewer than 2 classes among its labels."""
    from .data import ImageDataset, image_batches

    if isinstance(dataset, ImageDataset):  # in memory: the labels, not what `with_labels` may condition on
        images, labels = dataset.images, dataset.labels
    else:  # the same rows (and pixel cache), read without augmentation, with the label column
        dataset = copy.copy(dataset)
        dataset.augment, dataset.conditions = False, None
        batches = list(image_batches(dataset, shuffle=False))
        images = torch.cat([images for images, _ in batches]) if batches else torch.empty(0)
        labels = torch.cat([labels for _, labels in batches]) if batches else torch.empty(0, dtype=torch.long)
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"`dataset` must hold one integer class label per image, got labels of dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    num_classes = dataset.num_classes or (int(labels.max()) + 1 if len(labels) else 0)
    if labels.unique().numel() < 2 or num_classes < 2:
        raise ValueError(
            f"`dataset` must be labelled with at least 2 classes to train a domain classifier, got "
            f"{labels.unique().numel()} distinct label(s) among {len(labels)} images: an image folder is labelled by "
            "at least 2 class sub-folders or an integer `label` column")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"`dataset` labels must lie in [0, {num_classes}), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return images, labels, num_classes


def domain_classifier_dir(dataset, cache_dir: str | None = None, **recipe) -> str:
    """The cache folder of `dataset`'s domain classifier for a recipe (`train_domain_classifier`'s keyword arguments
    but `dataset_name`): keyed by the dataset's fingerprint and class names, its image shape and the recipe."""
    _check_labelled_dataset(dataset)
    recipe = _domain_recipe(dataset.image_shape[-1], **recipe)
    key = {"version": DOMAIN_RECIPE_VERSION, "dataset": str(dataset.fingerprint), "classes": dataset.id2label,
           "image_shape": list(dataset.image_shape), "recipe": recipe}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir or hfgen_cache_dir(), DOMAIN_CLASSIFIERS_DIR, digest)


def _domain_recipe(sample_size: int, num_epochs: int = 8, min_steps: int = 400, batch_size: int = 64,
                   learning_rate: float = 2e-3, feature_dim: int = 128, random_flip: bool = True,
                   seed: int = 0) -> dict:
    """The recipe as recorded and keyed: the arguments checked, and what follows from the image size."""
    for name, value in (("num_epochs", num_epochs), ("min_steps", min_steps), ("batch_size", batch_size),
                        ("feature_dim", feature_dim)):
        check_positive_int(name, value)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be a positive number, got {learning_rate!r}")
    if not isinstance(random_flip, bool):
        raise TypeError(f"`random_flip` must be True or False, got {random_flip!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    return {"num_epochs": num_epochs, "min_steps": min_steps, "batch_size": batch_size,
            "learning_rate": float(learning_rate), "feature_dim": feature_dim,
            "block_out_channels": list(domain_block_channels(sample_size)),
            "max_shift": round(DOMAIN_SHIFT * sample_size, 4), "random_flip": random_flip, "seed": seed}


def _class_list(id2label: dict | None, num_classes: int, limit: int = 10) -> str:
    names = [str(id2label[key]) for key in sorted(id2label, key=int)] if id2label else []
    if not names:
        return f"{num_classes} classes"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"{num_classes} classes: {shown}"


def _classifier_description(classifier: DigitClassifier) -> str:
    """What the classifier is, for `ClassifierFeatures.feature_space`: from a DomainClassifier's `trained_on` record,
    else its class and number of classes."""
    record = classifier.config.get("trained_on") if isinstance(classifier, DomainClassifier) else None
    if not record:
        return f"a {type(classifier).__name__} of {classifier.config.num_classes} classes"
    name = f"`{record['dataset_name']}`" if record.get("dataset_name") else \
        f"the dataset with fingerprint {str(record.get('fingerprint'))[:12]}"
    recipe = record.get("recipe", {})
    return (f"a classifier trained by hfgen on {name}'s train split labels "
            f"({_class_list(classifier.config.id2label, classifier.config.num_classes)}; "
            f"{record.get('num_images', 0):,} images of {'x'.join(map(str, record.get('image_shape', [])))}; "
            f"{record.get('num_epochs')} epochs, seed {recipe.get('seed')}; "
            f"training accuracy {record.get('train_accuracy', float('nan')):.1%})")


def _domain_card(classifier: DomainClassifier, seconds: float) -> ModelCard:
    record = classifier.config.trained_on
    data = ModelCardData(library_name="hfgen", tags=["hfgen", "feature-extractor"], pipeline_tag="image-classification",
                         model_name="hfgen domain classifier")
    return ModelCard(f"""---
{data.to_yaml()}
---

# hfgen domain classifier

A `DomainClassifier` trained by `hfgen.features.train_domain_classifier` in {seconds:.0f} s on
{record['num_images']:,} training images ({'x'.join(map(str, record['image_shape']))}) of
`{record.get('dataset_name') or 'a dataset'}` (fingerprint `{record['fingerprint']}`), with their labels
({_class_list(classifier.config.id2label, classifier.config.num_classes)}).
**Training accuracy: {record['train_accuracy']:.2%}** (on the training images, not augmented).

Recipe: `{json.dumps(record['recipe'], sort_keys=True)}`; {record['num_epochs']} epochs.

Its {classifier.config.feature_dim}-dimensional penultimate features are that dataset's domain feature space for
hfgen's Fréchet distance and sample metrics (`--feature_extractor classifier`; `hfgen.features.load_feature_extractor`
with this folder).
""")


def train_domain_classifier(
    dataset,
    *,
    dataset_name: str | None = None,
    num_epochs: int = 8,
    min_steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    feature_dim: int = 128,
    random_flip: bool = True,
    seed: int = 0,
    cache_dir: str | None = None,
) -> DomainClassifier:
    """A `DomainClassifier` of a labelled dataset's classes, trained on first use and then loaded from the cache.

    The dataset's training split, with its labels (class folders, a label column, the bundled digits' digits),
    trains the same CNN as the digit classifier (`domain_block_channels` of the image size, `feature_dim`-d
    penultimate features) with cross-entropy for `num_epochs` epochs, or as many more as make `min_steps` steps
    on a small dataset: Adam with a one-cycle learning rate, on images randomly rotated (10 degrees), scaled (10%),
    shifted (1/14 of the side: 2 px at 28 px) and (`random_flip`) flipped left-right. The same seed gives the same
    weights. It is saved
    atomically under `cache_dir`/domain-classifiers/ (default $HFGEN_CACHE, else $HF_HOME/hfgen), keyed by the
    dataset's `fingerprint` and class names, its image shape and the recipe (`domain_classifier_dir`), so that it
    is trained once. It trains in one thread, so that the weights do not depend on the number of cores: on the emoji
    folder's 3,403 training images at 32 px (9 category classes) in about 15 s.

    Args:
        dataset: the training split, any hfgen dataset of square images with labels of at least 2 classes
            (`hfgen.data.load_image_dataset(..., "train")`, a source's `dataset("train", ...)`; augmentation is
            ignored: every image is read as stored, once). A streamed split is read whole.
        dataset_name: how model cards name it (e.g. the folder or Hub id); recorded, not part of the cache key.
        num_epochs, min_steps, batch_size, learning_rate, feature_dim, random_flip, seed: the recipe.
        cache_dir: the cache's root.
    """
    _check_labelled_dataset(dataset)
    if dataset_name is not None and not isinstance(dataset_name, str):
        raise TypeError(f"`dataset_name` must be a str or None, got {type(dataset_name).__name__}")
    recipe = dict(num_epochs=num_epochs, min_steps=min_steps, batch_size=batch_size, learning_rate=learning_rate,
                  feature_dim=feature_dim, random_flip=random_flip, seed=seed)
    folder = domain_classifier_dir(dataset, cache_dir, **recipe)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        _train_domain_classifier(dataset, dataset_name, _domain_recipe(dataset.image_shape[-1], **recipe), folder)
    return DomainClassifier.from_pretrained(folder).eval()


def _train_domain_classifier(dataset, dataset_name: str | None, recipe: dict, folder: str) -> None:
    """Trains `dataset`'s domain classifier with `recipe` and saves it to `folder` atomically."""
    from .data import ImageDataset

    start = time.perf_counter()
    images, labels, num_classes = _labelled_images(dataset)
    channels, size, _ = dataset.image_shape
    with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the global RNG as it was
        torch.manual_seed(recipe["seed"])
        classifier = DomainClassifier(sample_size=size, in_channels=channels, num_classes=num_classes,
                                      feature_dim=recipe["feature_dim"],
                                      block_out_channels=recipe["block_out_channels"], id2label=dataset.id2label)
    training_set = ImageDataset(images, labels)
    # num_epochs, or more for a small dataset: at least min_steps optimizer steps
    steps_per_epoch = math.ceil(len(images) / recipe["batch_size"])
    num_epochs = max(recipe["num_epochs"], math.ceil(recipe["min_steps"] / steps_per_epoch))
    # One thread: the same weights whatever the number of cores (torch's CPU reductions depend on it), and no slower
    # for so small a network (2 threads were slower on 2 cores, several times so when the other core was busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # callers may be evaluating under torch.no_grad
            _fit_classifier(classifier, training_set, num_epochs, recipe["batch_size"], recipe["learning_rate"],
                            torch.Generator().manual_seed(recipe["seed"]), recipe["random_flip"], recipe["max_shift"])
        accuracy = classifier_accuracy(classifier, training_set)
    finally:
        torch.set_num_threads(threads)
    classifier.register_to_config(trained_on={
        "dataset_name": dataset_name, "fingerprint": str(dataset.fingerprint), "num_images": len(images),
        "image_shape": [channels, size, size], "recipe": recipe, "num_epochs": num_epochs,
        "train_accuracy": round(accuracy, 4)})
    seconds = time.perf_counter() - start
    _save_atomically(classifier, _domain_card(classifier, seconds), folder)
    logger.info("trained the domain classifier of %s in %.0f s (%d images, %d classes, training accuracy %.1f%%), "
                "cached in %s", dataset_name or "the dataset", seconds, len(images), num_classes, 100 * accuracy,
                folder)


# ----- Inception ------------------------------------------------------------------------------------------


def inception_available() -> bool:
    """Whether torch-fidelity, which "inception" needs, is installed (as torchmetrics sees it)."""
    from torchmetrics.utilities import imports

    return bool(imports._TORCH_FIDELITY_AVAILABLE)


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 pool features: (B, 1 or 3, H, W) in [0, 1] -> (B, 2048); grey is repeated to RGB."""

    num_features = 2048
    in_channels = None  # 1 or 3, any size: the network resizes to 299 x 299 itself
    cache_id = "inception-v3-compat"
    feature_space = f"the 2048-d pool features of torchmetrics' FID Inception-v3 (FD is FID), cache_id {cache_id}"

    def __init__(self):
        super().__init__()
        if not inception_available():
            raise ImportError(
                'the "inception" feature extractor (FID proper) needs torch-fidelity, which is not installed, and '
                f"its Inception-v3 weights, which torch-fidelity downloads on first use: {FID_EXTRA}. It pulls "
                "torchvision, which must match your torch build (install the torchvision that fits your torch "
                f"first). Without it, use {DEFAULT_FEATURE_EXTRACTOR!r} for digits, a transformers encoder such as "
                "'dinov2:facebook/dinov2-small', or a saved DigitClassifier folder."
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)])
        except Exception as error:  # most often: no network to download the weights
            raise RuntimeError(
                f'could not load the Inception-v3 weights of the "inception" feature extractor: {error}'
            ) from error
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"the Inception feature extractor takes 1 or 3 channels, got {images.shape[1]}")
        rgb = images.expand(-1, 3, -1, -1)  # no-op for 3 channels
        return self.inception((rgb * 255).byte())  # the uint8 input of FID's Inception, as torchmetrics converts it


# ----- transformers image encoders ------------------------------------------------------------------------


class TransformersFeatures(nn.Module):
    """A transformers vision model's image embedding: (B, 1 or 3, H, W) in [0, 1] -> (B, num_features).

    The model's input is prepared in torch, batched, on the model's device: grey repeated to RGB, resized to
    `image_size` (bicubic, antialiased; no crop, so the whole image is seen), normalised by `image_mean`/`image_std`.
    Build one with `load_feature_extractor("dinov2:...")` or `load_feature_extractor("clip:...")`.

    Args:
        model: a transformers model taking `pixel_values` (B, 3, h, w).
        output: the output field that holds one vector per image, e.g. "pooler_output" or "image_embeds".
        num_features: its width.
        image_size: (h, w) of the model's input.
        image_mean, image_std: per-channel normalisation of the model's input (3 values each).
        cache_id: a string that identifies the model and its weights.
    """

    in_channels = None  # 1 or 3, any size

    def __init__(self, model: nn.Module, output: str, num_features: int, image_size: tuple[int, int],
                 image_mean, image_std, cache_id: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.output, self.num_features, self.cache_id = output, num_features, cache_id
        self.feature_space = f"the {num_features}-d `{output}` of the transformers image encoder, cache_id {cache_id}"
        self.image_size = tuple(image_size)
        self.register_buffer("image_mean", torch.tensor(image_mean).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).float().view(1, 3, 1, 1), persistent=False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"`images` must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        pixels = images.to(self.image_mean.device, torch.float32).expand(-1, 3, -1, -1)
        if tuple(pixels.shape[-2:]) != self.image_size:
            # bicubic overshoots; clamping keeps [0, 1] as an image processor's 8-bit resize does
            pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", antialias=True).clamp(0, 1)
        pixels = (pixels - self.image_mean) / self.image_std
        return getattr(self.model(pixel_values=pixels.to(self.model.dtype)), self.output).float()


def _files_hash(folder: str) -> str:
    """A short hash of a model folder's config and weight files (their bytes), as found after loading."""
    digest = hashlib.sha256()
    names = sorted(name for name in os.listdir(folder) if name.endswith((".json", ".safetensors", ".bin")))
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as file:
            for block in iter(lambda: file.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _input_preprocessing(path: str, config, default_mean, default_std) -> tuple[tuple[int, int], list, list]:
    """(image_size, image_mean, image_std) from the image processor saved with the model, else from its config."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path).to_dict()
    except (OSError, ValueError):  # no preprocessor_config.json
        processor = {}
    # The size the model sees: the crop when the processor crops, else its resize target.
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(size, dict) and size.get("height") and size.get("width"):
        image_size = (size["height"], size["width"])
    elif isinstance(size, dict) and size.get("shortest_edge"):
        image_size = (size["shortest_edge"],) * 2
    elif isinstance(size, int):
        image_size = (size, size)
    else:
        image_size = (config.image_size,) * 2 if isinstance(config.image_size, int) else tuple(config.image_size)
    return image_size, processor.get("image_mean") or default_mean, processor.get("image_std") or default_std


def load_transformers_features(kind: str, name_or_path: str) -> TransformersFeatures:
    """A transformers image encoder as a feature extractor; `kind` is "dinov2" or "clip", `name_or_path` a Hub id
    or a folder saved with `save_pretrained` (with its image processor's preprocessor_config.json, if any).

    - "dinov2": `AutoModel` (e.g. facebook/dinov2-small, -base, -large); features: the CLS token of the last
      layer after its layer norm (`pooler_output`). Stein et al. (2023), "Exposing flaws of generative model
      evaluation metrics", recommend FD in DINOv2 (ViT-L/14) features over Inception's: "dinov2:facebook/dinov2-large".
    - "clip": `CLIPVisionModelWithProjection` (e.g. openai/clip-vit-base-patch32); features: `image_embeds`, or
      the `pooler_output` of a folder saved from a `CLIPVisionModel`, which has no projection.
    """
    if kind not in TRANSFORMERS_KINDS:
        raise ValueError(f"`kind` must be one of {sorted(TRANSFORMERS_KINDS)}, got {kind!r}")
    try:
        from transformers import AutoConfig, AutoModel, CLIPVisionModel, CLIPVisionModelWithProjection
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        from transformers.utils import cached_file
    except ImportError as error:
        raise ImportError(f'the "{kind}:" feature extractors need transformers: pip install transformers') from error
    spec = f"{kind}:{name_or_path}"
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        if config.model_type not in TRANSFORMERS_KINDS[kind]:
            raise ValueError(f"it holds a {config.model_type!r} model, not one of {TRANSFORMERS_KINDS[kind]}")
        if kind == "dinov2":
            model = AutoModel.from_pretrained(name_or_path)
            output, num_features = "pooler_output", model.config.hidden_size
            mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        else:
            projection = "CLIPVisionModel" not in (config.architectures or [])  # a folder saved without one
            model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel).from_pretrained(name_or_path)
            output = "image_embeds" if projection else "pooler_output"
            num_features = model.config.projection_dim if projection else model.config.hidden_size
            mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        image_size, mean, std = _input_preprocessing(name_or_path, model.config, list(mean), list(std))
        folder = os.path.dirname(cached_file(name_or_path, "config.json"))  # the Hub cache's snapshot for an id
    except Exception as error:  # a missing folder, an unknown or unreachable Hub id, a checkpoint of another kind
        raise ValueError(f"`name_or_path` {spec!r}: could not load {name_or_path!r} as a {kind} image encoder "
                         f"(a Hub model id or a folder saved with save_pretrained): {error}") from error
    return TransformersFeatures(model, output, num_features, image_size, mean, std,
                                cache_id=f"{spec}@{_files_hash(folder)}")


# ----- choosing one ---------------------------------------------------------------------------------------


def describe_feature_space(feature_extractor: nn.Module) -> str:
    """The phrase a model card names `feature_extractor`'s feature space with, e.g. "the 128-d penultimate features
    of a classifier trained by hfgen on `emoji`'s train split labels (...), cache_id domain-classifier-...": its
    `feature_space`, else its class, width and `cache_id`."""
    described = getattr(feature_extractor, "feature_space", None)
    if described:
        return described
    cache_id = getattr(feature_extractor, "cache_id", None)
    return (f"the {getattr(feature_extractor, 'num_features', '?')}-d features of a {type(feature_extractor).__name__}"
            + (f", cache_id {cache_id}" if cache_id else ""))


CLASSIFIER_CLASSES = {cls.__name__: cls for cls in (DigitClassifier, DomainClassifier)}
DEFAULT_DESCRIPTION = (f'hfgen\'s digit classifier ("{DEFAULT_FEATURE_EXTRACTOR}": a DigitClassifier trained on '
                       "hfgen:mnist's training digits)")


def load_feature_extractor(name_or_path: str = DEFAULT_FEATURE_EXTRACTOR, cache_dir: str | None = None, *,
                           dataset=None, dataset_name: str | None = None) -> nn.Module:
    """A feature extractor for the Fréchet distance: (B, C, H, W) images in [0, 1] -> (B, num_features).

    Args:
        name_or_path: "hfgen:digit-classifier" (default: a `DigitClassifier` trained on hfgen:mnist's training
            split, 128-d features of 1 x 28 x 28 images; trained in ~15 s on first use and cached),
            "classifier" (a domain feature space: a `DomainClassifier` trained once on `dataset`'s labels and
            cached, see `train_domain_classifier`), a folder holding a saved `DigitClassifier` or `DomainClassifier`,
            "inception" (torchmetrics' FID Inception-v3, 2048-d; needs torch-fidelity and its weights), or
            "dinov2:<Hub id or folder>" / "clip:<Hub id or folder>" (a transformers image encoder, see
            `load_transformers_features`). "auto" must first be resolved for a shape of images with
            `resolve_feature_extractor`.
        cache_dir: where the trained classifiers are cached; defaults to $HFGEN_CACHE, else $HF_HOME/hfgen.
        dataset: the labelled training split that "classifier" trains on (other names ignore it).
        dataset_name: how model cards name that dataset, e.g. its folder or Hub id ("classifier" only).

    Example: `load_feature_extractor("classifier", dataset=load_image_dataset(None, "train", 32,
    train_data_dir="emoji"), dataset_name="emoji")`.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a name or a folder (str), got {type(name_or_path).__name__}")
    name_or_path = str(name_or_path)
    kind, _, path = name_or_path.partition(":")
    if name_or_path == INCEPTION:
        return InceptionFeatures()
    if name_or_path == DOMAIN_CLASSIFIER:
        if dataset is None:
            raise ValueError(f"`name_or_path` {DOMAIN_CLASSIFIER!r} trains a classifier on a labelled dataset's "
                             "training split: pass that split as `dataset` (load_feature_extractor('classifier', "
                             "dataset=load_image_dataset(..., split='train')), and use the module it returns), or "
                             "give the folder of a saved DomainClassifier")
        return ClassifierFeatures(train_domain_classifier(dataset, dataset_name=dataset_name, cache_dir=cache_dir))
    if kind in TRANSFORMERS_KINDS and path:
        return load_transformers_features(kind, path)
    if name_or_path == AUTO:
        raise ValueError('`name_or_path` "auto" depends on the images: resolve it first with '
                         "resolve_feature_extractor('auto', image_shape)")
    if name_or_path == DEFAULT_FEATURE_EXTRACTOR:
        folder = default_classifier_dir(cache_dir)
        if not os.path.isdir(folder):
            _train_default_classifier(folder)
        return ClassifierFeatures(DigitClassifier.from_pretrained(folder), DEFAULT_DESCRIPTION)
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise ValueError(f"`name_or_path` must be {DEFAULT_FEATURE_EXTRACTOR!r}, {DOMAIN_CLASSIFIER!r}, "
                         f"{INCEPTION!r}, 'dinov2:<Hub id or folder>', 'clip:<Hub id or folder>' or a folder with a "
                         f"saved DigitClassifier or DomainClassifier, got {name_or_path!r}")
    class_name = DigitClassifier.load_config(name_or_path).get("_class_name")
    if class_name not in CLASSIFIER_CLASSES:
        raise ValueError(f"`name_or_path` {name_or_path!r} does not hold a saved DigitClassifier or DomainClassifier "
                         f"(its config names {class_name!r})")
    classifier = CLASSIFIER_CLASSES[class_name].from_pretrained(name_or_path)
    described = isinstance(classifier, DomainClassifier) and classifier.config.get("trained_on")
    return ClassifierFeatures(classifier, None if described else f"the {class_name} saved in {name_or_path}")


def resolve_feature_extractor(name_or_path: str, image_shape: tuple[int, int, int]) -> str | None:
    """The feature extractor that "auto" means for images of `image_shape` (C, H, W); other names pass through.

    "auto": the digit classifier for 1-channel square images of at least 28 px, Inception for 3-channel images
    when torch-fidelity is installed; otherwise None, with a warning that says what to pass instead.
    """
    if name_or_path != AUTO:
        return name_or_path
    if len(image_shape) != 3:
        raise ValueError(f"`image_shape` must be (C, H, W), got {tuple(image_shape)}")
    channels, height, width = image_shape
    if channels == 1 and height == width and height >= 28:
        return DEFAULT_FEATURE_EXTRACTOR
    if channels == 3 and inception_available():
        return INCEPTION
    logger.warning("no default feature extractor fits %s images, so there is no FD: pass --feature_extractor "
                   "(`feature_extractor` in Python), e.g. %s (a classifier trained on the training split's labels), "
                   "dinov2:facebook/dinov2-small, or inception after %s",
                   "x".join(map(str, image_shape)), DOMAIN_CLASSIFIER, FID_EXTRA)
    return None


def load_feature_space(name_or_path: str, image_shape: tuple[int, int, int], required: bool = True,
                       **load_kwargs) -> nn.Module | None:
    """The FD's features for images of `image_shape` (C, H, W), the one place "auto" is resolved: None for "none",
    and for an "auto" that fits no images of this shape (an error when `required`, else the warning of
    `resolve_feature_extractor`); otherwise `load_feature_extractor(name, **load_kwargs)` with the name it was loaded
    by as its `name_or_path`."""
    choice = None if name_or_path == "none" else resolve_feature_extractor(name_or_path, tuple(image_shape))
    if choice is None and required and name_or_path != "none":
        shape = "x".join(map(str, image_shape))
        raise ValueError(f"no default feature extractor fits {shape} images; pass --feature_extractor "
                         f"(`feature_extractor` in Python), e.g. {DOMAIN_CLASSIFIER} for labelled images, "
                         f"dinov2:facebook/dinov2-small, or inception after {FID_EXTRA}, or none for the likelihood "
                         "bounds alone")
    if choice is None:
        return None
    extractor = load_feature_extractor(choice, **load_kwargs)
    extractor.name_or_path = choice
    return extractor
