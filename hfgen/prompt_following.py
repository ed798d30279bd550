"""How well a text-to-image pipeline follows its prompts: on the bundled digits, the requested digit's accuracy under
a digit classifier and how the measured attributes (hfgen.text) follow the prompted ones; for any images, CLIP score
with a CLIP model.

Attribute-following, for each attribute (thickness, slant, size): the same digits and seeds are prompted once with the
attribute's low word and once with its high word ("a thin seven" / "a thick seven"); "<attribute>_separation" is the
difference of the measured attribute's means over the two sets in pooled standard deviations (0: the word is ignored),
and "<attribute>_accuracy" the share of images whose measured level (the dataset's tertiles) is the requested one
(chance 1/3). "real_<attribute>_separation" is the same separation between the dataset's own images captioned with
the two words: what following the words perfectly gives.
"""

import numpy as np
import torch

from .text import ATTRIBUTE_WORDS, ATTRIBUTES, attribute_levels, attribute_thresholds, digit_attributes, digit_caption
from .utils import check_positive_int

LOW, HIGH = 0, 2  # the attribute levels whose words are prompted
DEFAULT_GUIDANCE_SCALE = 3.0  # of prompt-following samples and sample grids, for models trained with prompt dropout


def resolve_guidance_scale(guidance_scale: float | None, prompt_dropout: float | None) -> float:
    """`guidance_scale`, or by default DEFAULT_GUIDANCE_SCALE for a model trained with prompt dropout (1 without)."""
    if guidance_scale is not None:
        return guidance_scale
    return DEFAULT_GUIDANCE_SCALE if prompt_dropout else 1.0


def separation(high: np.ndarray, low: np.ndarray) -> float:
    """(mean(high) - mean(low)) / the pooled standard deviation."""
    pooled = np.sqrt((high.var(ddof=1) + low.var(ddof=1)) / 2)
    return float((high.mean() - low.mean()) / max(pooled, 1e-12))


def _generate(pipeline, prompts: list[str], seeds: list[int], batch_size: int, pipeline_kwargs: dict) -> torch.Tensor:
    """Image i from prompts[i] with a generator seeded with seeds[i]: (N, C, H, W) in [0, 1], whatever the batch."""
    images = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator(pipeline.device).manual_seed(seed) for seed in seeds[start:start + batch_size]]
        images.append(pipeline(prompt=prompts[start:start + batch_size], generator=generators, output_type="pt",
                               **pipeline_kwargs).images.cpu())
    return torch.cat(images)


@torch.no_grad()
def digit_prompt_following(pipeline, dataset, classifier, num_images_per_digit: int = 20, seed: int = 0,
                           batch_size: int = 250, pipeline_kwargs: dict | None = None) -> dict[str, float]:
    """Prompt-following of a text-to-image pipeline trained on hfgen's captions of the bundled digits.

    Args:
        dataset: the digits the attribute words refer to (an `hfgen.data` dataset with `captions`, e.g. the test
            split opened with caption_column="text", at the pipeline's resolution): its tertiles set the levels.
        classifier: a `DigitClassifier` (hfgen.models) for "digit_accuracy", the share of images of "a <digit>"
            prompts (every phrasing) classified as that digit (chance 0.1).
        num_images_per_digit: images per digit for each prompt set (10 x this per set).
        pipeline_kwargs: more arguments of the pipeline's call, e.g. {"guidance_scale": 3.0}.
    Returns:
        "digit_accuracy", and per attribute "<attribute>_separation", "<attribute>_accuracy" and
        "real_<attribute>_separation" (see the module's docstring).
    """
    check_positive_int("num_images_per_digit", num_images_per_digit)
    check_positive_int("batch_size", batch_size)
    captions = getattr(dataset, "captions", None)
    if captions is None:
        raise ValueError("`dataset` must hold hfgen's captions of the bundled digits (open it with "
                         "caption_column='text'), whose attribute words the prompts use")
    pipeline_kwargs = dict(pipeline_kwargs or {})
    real_attributes = digit_attributes(dataset.images.numpy())
    thresholds = attribute_thresholds(real_attributes)
    digits = np.arange(10).repeat(num_images_per_digit)
    seeds = torch.randint(2**62, (len(digits),), generator=torch.Generator().manual_seed(seed)).tolist()

    def generate(prompts):
        images = _generate(pipeline, prompts, seeds, batch_size, pipeline_kwargs)
        if tuple(images.shape[1:]) != tuple(dataset.image_shape):
            raise ValueError(f"the pipeline generates images of shape {tuple(images.shape[1:])}, but `dataset` holds "
                             f"{tuple(dataset.image_shape)}: give the digits at the pipeline's resolution")
        return images

    images = generate([digit_caption(d, phrasing=i) for i, d in enumerate(digits)])  # "a seven", "a number 7", ...
    logits = torch.cat([classifier(images[i:i + batch_size].to(classifier.device)).logits.cpu()
                        for i in range(0, len(images), batch_size)])
    metrics = {"digit_accuracy": float((logits.argmax(1).numpy() == digits).mean())}
    for attribute in ATTRIBUTES:
        measured = {}
        for level in (LOW, HIGH):
            prompted = generate([digit_caption(d, {attribute: level}) for d in digits])  # "a thick seven", ...
            measured[level] = digit_attributes(prompted.numpy())[attribute]
        levels = {level: attribute_levels({attribute: values}, thresholds)[attribute]
                  for level, values in measured.items()}
        metrics[f"{attribute}_separation"] = separation(measured[HIGH], measured[LOW])
        metrics[f"{attribute}_accuracy"] = float(np.mean([(levels[level] == level).mean() for level in (LOW, HIGH)]))
        low_word, _, high_word = ATTRIBUTE_WORDS[attribute]
        has = {word: np.array([word in caption for caption in captions]) for word in (low_word, high_word)}
        metrics[f"real_{attribute}_separation"] = separation(real_attributes[attribute][has[high_word]],
                                                             real_attributes[attribute][has[low_word]])
    return metrics


def load_clip(name_or_path: str):
    """A `transformers` CLIPModel and its CLIPProcessor, by Hub id or folder (e.g. openai/clip-vit-base-patch32)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(name_or_path).eval(), CLIPProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"`clip_model` {name_or_path!r} is not a CLIP model with its processor (a Hub id or a "
                         f"folder): {error}") from error


def _embedding(output) -> torch.Tensor:
    """CLIPModel.get_*_features: a tensor (transformers 4) or an output whose pooler_output is it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], clip_model: str, batch_size: int = 64) -> float:
    """CLIP score (Hessel et al., 2021), 100 max(cos(E_image, E_prompt), 0) averaged, of images (N, C, H, W) in [0, 1]
    (one channel is repeated to RGB, then quantised to 8 bits as the processor expects) and their prompts, with the
    CLIP model `clip_model` (Hub id or folder). torchmetrics' CLIPScore computes the same, but it cannot read
    transformers 5's feature outputs. A prompt longer than the text model's positions is an error, not truncated."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
    model, processor = load_clip(clip_model)
    max_length = model.config.text_config.max_position_embeddings
    rgb = (images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images).clamp(0, 1).mul(255).round().to(torch.uint8)
    scores = []
    for start in range(0, len(images), batch_size):
        batch_prompts = list(prompts[start:start + batch_size])
        inputs = processor(text=batch_prompts, images=list(rgb[start:start + batch_size]), return_tensors="pt",
                           padding=True)
        if inputs["input_ids"].shape[1] > max_length:
            raise ValueError(f"a prompt of {batch_prompts} has more than the CLIP model's {max_length} tokens")
        image_embeds = _embedding(model.get_image_features(pixel_values=inputs["pixel_values"].to(model.device)))
        text_embeds = _embedding(model.get_text_features(input_ids=inputs["input_ids"].to(model.device),
                                                         attention_mask=inputs["attention_mask"].to(model.device)))
        scores.append((100 * torch.cosine_similarity(image_embeds, text_embeds)).clamp(min=0).cpu())
    return float(torch.cat(scores).mean())


def digit_classifier_for(train_dataset, test_dataset):
    """The classifier of "digit_accuracy" for digits of this shape: hfgen's default digit classifier (the FD's, cached)
    for 1-channel images of at least its 28 px, else a `DigitClassifier` trained here on `train_dataset` (seeded;
    seconds for the 8x8 digits)."""
    from .features import DEFAULT_FEATURE_EXTRACTOR, load_feature_extractor, train_digit_classifier

    channels, size, _ = train_dataset.image_shape
    if channels == 1 and size >= 28:
        return load_feature_extractor(DEFAULT_FEATURE_EXTRACTOR).classifier
    return train_digit_classifier(train_dataset, test_dataset)[0]


@torch.no_grad()
def evaluate_prompt_following(pipeline, dataset, classifier=None, clip_model: str | None = None,
                              num_images_per_digit: int = 20, num_clip_images: int = 100, seed: int = 0,
                              batch_size: int = 250, pipeline_kwargs: dict | None = None) -> dict[str, float]:
    """`digit_prompt_following` when a digit `classifier` is given (`dataset`: hfgen's captioned digits), and
    "clip_score" when `clip_model` is: `clip_score` of images generated from the first `num_clip_images` captions of
    `dataset` (a dataset with `captions`)."""
    metrics = {}
    if classifier is not None:
        metrics.update(digit_prompt_following(pipeline, dataset, classifier, num_images_per_digit, seed, batch_size,
                                              pipeline_kwargs))
    if clip_model:
        check_positive_int("num_clip_images", num_clip_images)
        captions = getattr(dataset, "captions", None)
        if not captions:
            raise ValueError("CLIP score prompts with the captions of `dataset`: open it with a caption column")
        prompts = [captions[i % len(captions)] for i in range(num_clip_images)]
        seeds = torch.randint(2**62, (num_clip_images,), generator=torch.Generator().manual_seed(seed)).tolist()
        images = _generate(pipeline, prompts, seeds, batch_size, dict(pipeline_kwargs or {}))
        metrics["clip_score"] = clip_score(images, prompts, clip_model)
    return metrics
