"""Feature extractors for the Fréchet distance (hfgen.frechet): (B, C, H, W) images in [0, 1] -> (B, num_features).

Every extractor is an `nn.Module` in eval mode, without gradients, with an int `num_features`, an `in_channels`
(the channels it takes, None for 1 or 3) and a `cache_id` that changes whenever its features would:

- "hfgen:digit-classifier" (the default): a small `DigitClassifier` trained on hfgen:mnist on first use and
  cached under $HFGEN_CACHE (default $HF_HOME/hfgen); a saved DigitClassifier folder works the same way;
- "inception": torchmetrics' FID Inception-v3, for FID proper (needs torch-fidelity);
- "dinov2:<Hub id or folder>" and "clip:<Hub id or folder>": transformers image encoders.

`resolve_feature_extractor("auto", image_shape)` picks one for a shape of images.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .models import DigitClassifier
from .utils import check_positive_int, hfgen_cache_dir

if TYPE_CHECKING:
    from .data import ImageDataset

logger = logging.getLogger(__name__)

DEFAULT_FEATURE_EXTRACTOR = "hfgen:digit-classifier"
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
def classifier_accuracy(classifier: DigitClassifier, dataset: "ImageDataset", batch_size: int = 500) -> float:
    """Share of `dataset`'s images whose most likely class is their label."""
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images, labels = dataset[start:start + batch_size]
        logits = classifier(images.to(classifier.device, classifier.dtype)).logits
        correct += (logits.argmax(1).cpu() == labels).sum().item()
    return correct / len(dataset)


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
    """A `DigitClassifier`'s penultimate features: (B, C, S, S) in [0, 1] -> (B, feature_dim).

    Square images of any size are resized to the classifier's. `cache_id` is a hash of its config and weights.
    """

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.config.feature_dim
        self.in_channels = classifier.config.in_channels
        weights = _sha256_of_tensors(classifier.state_dict())
        settings = {key: value for key, value in classifier.config.items() if not key.startswith("_")}  # not its path
        config = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        self.cache_id = f"digit-classifier-{hashlib.sha256((config + weights).encode()).hexdigest()[:16]}"
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


def _train_default_classifier(folder: str) -> None:
    """Trains the default classifier and saves it to `folder` atomically: a crash never leaves half a folder."""
    from .data import load_image_dataset

    train, test = load_image_dataset("hfgen:mnist", "train"), load_image_dataset("hfgen:mnist", "test")
    with torch.enable_grad():  # callers may be evaluating under torch.no_grad
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


def load_feature_extractor(name_or_path: str = DEFAULT_FEATURE_EXTRACTOR, cache_dir: str | None = None) -> nn.Module:
    """A feature extractor for the Fréchet distance: (B, C, H, W) images in [0, 1] -> (B, num_features).

    Args:
        name_or_path: "hfgen:digit-classifier" (default: a `DigitClassifier` trained on hfgen:mnist's training
            split, 128-d features of 1 x 28 x 28 images; trained in ~15 s on first use and cached),
            a folder holding a saved `DigitClassifier`, "inception" (torchmetrics' FID Inception-v3, 2048-d;
            needs torch-fidelity and its weights), or "dinov2:<Hub id or folder>" / "clip:<Hub id or folder>"
            (a transformers image encoder, see `load_transformers_features`). "auto" must first be resolved
            for a shape of images with `resolve_feature_extractor`.
        cache_dir: where the default classifier is cached; defaults to $HFGEN_CACHE, else $HF_HOME/hfgen.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a name or a folder (str), got {type(name_or_path).__name__}")
    name_or_path = str(name_or_path)
    kind, _, path = name_or_path.partition(":")
    if name_or_path == INCEPTION:
        return InceptionFeatures()
    if kind in TRANSFORMERS_KINDS and path:
        return load_transformers_features(kind, path)
    if name_or_path == AUTO:
        raise ValueError('`name_or_path` "auto" depends on the images: resolve it first with '
                         "resolve_feature_extractor('auto', image_shape)")
    if name_or_path == DEFAULT_FEATURE_EXTRACTOR:
        folder = default_classifier_dir(cache_dir)
        if not os.path.isdir(folder):
            _train_default_classifier(folder)
    elif os.path.isfile(os.path.join(name_or_path, "config.json")):
        folder = name_or_path
        if DigitClassifier.load_config(folder).get("_class_name") != DigitClassifier.__name__:
            raise ValueError(f"`name_or_path` {folder!r} does not hold a saved DigitClassifier")
    else:
        raise ValueError(f"`name_or_path` must be {DEFAULT_FEATURE_EXTRACTOR!r}, {INCEPTION!r}, 'dinov2:<Hub id or "
                         "folder>', 'clip:<Hub id or folder>' or a folder with a saved DigitClassifier, got "
                         f"{name_or_path!r}")
    return ClassifierFeatures(DigitClassifier.from_pretrained(folder))


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
                   "(`feature_extractor` in Python), e.g. dinov2:facebook/dinov2-small, or inception after %s",
                   "x".join(map(str, image_shape)), FID_EXTRA)
    return None
