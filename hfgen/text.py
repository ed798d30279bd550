"""Text conditioning: captions of the bundled digits, a word-level tokenizer built from captions, a tiny CLIP text
encoder, loading any `transformers` text encoder, and `encode_prompt`.

Captions of the bundled digits name the digit (in several phrasings) and three attributes measured on each image:
thickness (mean ink), slant (second moments) and size (bounding box). Each attribute's words split the data at its
tertiles: the lowest third is "thin" / "slanted left" / "small", the highest "thick" / "slanted right" / "large", the
middle third gets no word ("upright" for slant). A prompt can then say more than the label: "a thick seven, slanted
right".

Prompts longer than the tokenizer's `model_max_length` are refused with a ValueError (never truncated): a truncated
prompt would silently drop what it asks for.
"""

import os

import numpy as np
import torch

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# how a caption names the digit; caption i uses phrasing i mod 4
PHRASINGS = ("{name}", "digit {name}", "handwritten {name}", "number {digit}")
ATTRIBUTES = ("thickness", "slant", "size")
# attribute -> (word of the lowest tertile, word of the middle one, word of the highest); "" for no word
ATTRIBUTE_WORDS = {"thickness": ("thin", "", "thick"), "slant": ("slanted left", "upright", "slanted right"),
                   "size": ("small", "", "large")}
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}
INK_THRESHOLD = 0.25  # a pixel at least this dark is ink, for the bounding box


# ----- attributes and captions of digit images -----------------------------------------------------------------


def digit_attributes(images) -> dict[str, np.ndarray]:
    """(N, H, W) or (N, C, H, W) ink in [0, 1] (grey, or its mean over C: the digits loaded as RGB) -> {"thickness",
    "slant", "size"}, each (N,) float.

    thickness: the mean ink. slant: -mu11 / mu02 of the ink's central second moments, x to the right and y down, so
    that a digit leaning right (its top to the right of its bottom) is positive. size: the ink's bounding-box area
    as a share of the image.
    """
    ink = np.asarray(images, dtype=np.float64)
    ink = (ink.mean(1) if ink.ndim == 4 else ink).reshape(len(ink), *ink.shape[-2:])
    height, width = ink.shape[1:]
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    mass = ink.sum((1, 2)) + 1e-8
    mean_x, mean_y = (ink * x).sum((1, 2)) / mass, (ink * y).sum((1, 2)) / mass
    dx, dy = x - mean_x[:, None, None], y - mean_y[:, None, None]
    mu11, mu02 = (ink * dx * dy).sum((1, 2)) / mass, (ink * dy * dy).sum((1, 2)) / mass
    inked = ink >= INK_THRESHOLD
    rows, columns = inked.any(2), inked.any(1)

    def extent(mask):  # first to last inked row (or column), 0 if none
        first, last = mask.argmax(1), mask.shape[1] - 1 - mask[:, ::-1].argmax(1)
        return np.where(mask.any(1), last - first + 1, 0)

    return {"thickness": ink.mean((1, 2)), "slant": -mu11 / (mu02 + 1e-8),
            "size": extent(rows) * extent(columns) / (height * width)}


def attribute_thresholds(attributes: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Each attribute's tertiles (1/3 and 2/3 quantiles): the words split the data in thirds."""
    return {name: tuple(float(q) for q in np.quantile(values, [1 / 3, 2 / 3])) for name, values in attributes.items()}


def attribute_levels(attributes: dict[str, np.ndarray], thresholds) -> dict[str, np.ndarray]:
    """Each attribute's level per image: 0 (lowest third), 1 (middle) or 2 (highest)."""
    # right=True: a value on a threshold goes below it (ties are common for small images' bounding boxes)
    return {name: np.digitize(values, thresholds[name], right=True) for name, values in attributes.items()}


def digit_caption(digit: int, levels: dict[str, int] | None = None, phrasing: int = 0) -> str:
    """A caption: e.g. digit_caption(7, {"thickness": 2, "slant": 2, "size": 1}) == "a thick seven, slanted right"."""
    levels = levels or {}
    noun = PHRASINGS[phrasing % len(PHRASINGS)].format(name=DIGIT_NAMES[digit], digit=digit)
    words = [ATTRIBUTE_WORDS[name][levels[name]] for name in ("size", "thickness") if name in levels]
    words = " ".join(word for word in [*words, noun] if word)
    slant = ATTRIBUTE_WORDS["slant"][levels["slant"]] if "slant" in levels else ""
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}" + (f", {slant}" if slant else "")


def digit_captions(images, labels, thresholds=None) -> list[str]:
    """Captions of digit images (N, [1,] H, W) in [0, 1] with labels (N,); `thresholds` from
    `attribute_thresholds` (default: these images' own tertiles)."""
    attributes = digit_attributes(images)
    levels = attribute_levels(attributes, thresholds or attribute_thresholds(attributes))
    return [digit_caption(int(label), {name: int(levels[name][i]) for name in ATTRIBUTES}, phrasing=i)
            for i, label in enumerate(np.asarray(labels))]


# ----- tokenizer and text encoder --------------------------------------------------------------------------------


def build_word_tokenizer(texts: list[str], max_length: int | None = None):
    """A word-level `PreTrainedTokenizerFast` whose vocabulary is the words of `texts` (lower-cased, punctuation
    split off) and the SPECIAL_TOKENS; it wraps every text in [BOS] ... [EOS]. `max_length` (its model_max_length)
    defaults to the longest text's tokens plus 8."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer, normalizer = pre_tokenizers.Whitespace(), normalizers.Lowercase()
    specials = list(SPECIAL_TOKENS.values())
    words = sorted({word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    vocab = {token: index for index, token in enumerate([*specials, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                             special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    longest = max((len(tokenizer.encode(text).ids) for text in texts), default=2)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length or longest + 8,
                                   **SPECIAL_TOKENS)


def tiny_text_encoder(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """A small `CLIPTextModel` with random weights for `tokenizer`'s vocabulary and length, to train with the
    denoiser."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPTextModel(config)


def _component_path(name_or_path: str, component: str) -> str:
    """A text-to-image pipeline folder's sub-folder `component` (text_encoder/, tokenizer/), else the path itself."""
    folder = os.path.join(name_or_path, component)
    return folder if os.path.isdir(folder) else name_or_path


def load_tokenizer(name_or_path: str):
    """The tokenizer of a `transformers` text encoder, by Hub id or folder (or a text-to-image pipeline folder)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_component_path(name_or_path, "tokenizer"))
    except (OSError, ValueError) as error:
        raise ValueError(f"`text_encoder_name_or_path` {name_or_path!r} has no tokenizer that transformers can load "
                         f"(a Hub id or a folder): {error}") from error


def load_text_encoder(name_or_path: str):
    """A `transformers` text encoder by Hub id or folder (or a text-to-image pipeline folder): CLIP checkpoints give
    a `CLIPTextModel`, T5 ones a `T5EncoderModel`, others `AutoModel`."""
    from transformers import AutoConfig, AutoModel, CLIPTextModel, T5EncoderModel

    path = _component_path(name_or_path, "text_encoder")
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
        model_class = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel,
                       "mt5": T5EncoderModel, "umt5": T5EncoderModel}.get(model_type, AutoModel)
        return model_class.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"`text_encoder_name_or_path` {name_or_path!r} is not a transformers text model (a Hub id "
                         f"or a folder): {error}") from error


def prompt_length(tokenizer) -> int:
    """The tokenizer's model_max_length: every prompt is padded to it."""
    length = tokenizer.model_max_length
    if not isinstance(length, int) or not 0 < length <= 100_000:
        raise ValueError(f"the tokenizer's model_max_length must be the text encoder's length (e.g. 77 for CLIP), got "
                         f"{length}: set it when saving the tokenizer")
    return length


def tokenize_prompts(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> token ids (B, L), padded to L = model_max_length. A prompt longer than L is a ValueError."""
    if isinstance(prompts, str) or not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError(f"`prompt` must be a string or a list of strings, got {prompts!r}")
    length = prompt_length(tokenizer)
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=False).input_ids
    for prompt, tokens in zip(prompts, ids):
        if len(tokens) > length:
            raise ValueError(f"`prompt` {prompt!r} has {len(tokens)} tokens, more than the tokenizer's "
                             f"model_max_length {length}: shorten it (prompts are never truncated)")
    return torch.tensor(ids, dtype=torch.long)


def encode_prompt(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> the text encoder's last hidden states (B, L, D), the denoiser's `encoder_hidden_states`.

    No attention mask, as diffusers' Stable Diffusion pipelines: every prompt is padded to L and the denoiser sees
    the states of the padding too.
    """
    ids = tokenize_prompts(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]
