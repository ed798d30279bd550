"""Prompt-following metrics (hfgen.prompt_following): on stand-in pipelines that return real digits, one that follows
every prompt exactly and one that ignores them; the CLIP score against its closed form; `hfgen evaluate`."""

import json

import numpy as np
import pytest
import torch
from diffusers.utils import BaseOutput

from hfgen import text
from hfgen.data import load_image_dataset
from hfgen.prompt_following import clip_score, digit_classifier_for, digit_prompt_following, separation

ATTRIBUTE_OF_WORD = {word: (name, level) for name, words in text.ATTRIBUTE_WORDS.items()
                     for level, word in enumerate(words) if word and word != "upright"}


class RealDigitsPipeline:
    """Answers each prompt with a real test digit: with `follow`, one of the named digit and attribute level (by the
    captions' measured levels), else any digit. The same generator seed picks the same image among the candidates."""

    device = torch.device("cpu")

    def __init__(self, dataset, follow: bool):
        self.dataset, self.follow = dataset, follow
        attributes = text.digit_attributes(dataset.images.numpy())
        self.levels = text.attribute_levels(attributes, text.attribute_thresholds(attributes))

    def candidates(self, prompt: str) -> np.ndarray:
        if not self.follow:
            return np.arange(len(self.dataset))
        digit = next(d for d, name in enumerate(text.DIGIT_NAMES) if f" {name}" in f" {prompt}" or f"number {d}" in prompt)
        keep = self.dataset.labels.numpy() == digit
        for word, (name, level) in ATTRIBUTE_OF_WORD.items():
            if word in prompt and (keep & (self.levels[name] == level)).any():  # e.g. no large one: any one
                keep &= self.levels[name] == level
        return np.flatnonzero(keep)

    def __call__(self, prompt, generator, output_type, **kwargs):
        picks = [self.candidates(p)[int(torch.randint(10**6, (1,), generator=g)) % len(self.candidates(p))]
                 for p, g in zip(prompt, generator)]
        return BaseOutput(images=self.dataset.images[picks])


@pytest.fixture(scope="module")
def digits(mnist_train):
    """The captioned test digits and hfgen's default digit classifier (the FD's, cached for the session)."""
    test = load_image_dataset("hfgen:mnist", "test", caption_column="text")
    return test, digit_classifier_for(mnist_train, test)


def test_a_pipeline_that_follows_prompts_scores_high_and_one_that_ignores_them_scores_chance(digits):
    test, classifier = digits
    follows = digit_prompt_following(RealDigitsPipeline(test, follow=True), test, classifier, num_images_per_digit=10)
    ignores = digit_prompt_following(RealDigitsPipeline(test, follow=False), test, classifier, num_images_per_digit=10)
    assert follows["digit_accuracy"] > 0.85 and ignores["digit_accuracy"] < 0.25, (follows, ignores)
    for name in text.ATTRIBUTES:
        # the followed prompts' levels are the dataset's own: the images are at the requested level (where the digit
        # has one there)
        assert follows[f"{name}_accuracy"] > 0.9 and ignores[f"{name}_accuracy"] < 0.55, (name, follows, ignores)
        assert follows[f"{name}_separation"] > 2 and abs(ignores[f"{name}_separation"]) < 0.5, (name, follows, ignores)
        assert follows[f"real_{name}_separation"] == ignores[f"real_{name}_separation"] > 1.5
    with pytest.raises(ValueError, match="`dataset` must hold hfgen's captions"):
        digit_prompt_following(RealDigitsPipeline(test, True), load_image_dataset("hfgen:mnist", "test"), classifier)


def test_separation_is_the_mean_difference_in_pooled_standard_deviations():
    high, low = np.array([3.0, 5.0, 4.0]), np.array([1.0, 2.0, 0.0])
    assert separation(high, low) == pytest.approx(3.0)  # means 4 and 1, both variances 1
    assert separation(low, high) == pytest.approx(-3.0)


def save_tiny_clip(folder):
    """A randomly initialised CLIPModel with a character-level CLIP tokenizer and image processor, saved as a Hub
    CLIP checkpoint is."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    characters = "abcdefghijklmnopqrstuvwxyz0123456789,."
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in characters:
        vocab.setdefault(character, len(vocab))
        vocab.setdefault(character + "</w>", len(vocab))
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=64)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                              tokenizer)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         image_size=16, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_is_100_times_the_clipped_cosine_of_the_embeddings(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_clip(tmp_path / "clip")
    images = torch.rand(4, 1, 8, 8, generator=torch.manual_seed(0))
    prompts = ["a thick seven", "a one", "a thin two, slanted left", "an eight"]
    score = clip_score(images, prompts, str(folder))
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    rgb = images.expand(-1, 3, -1, -1).mul(255).round().to(torch.uint8)
    inputs = processor(text=prompts, images=list(rgb), return_tensors="pt", padding=True)
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text_embeds = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                             attention_mask=inputs["attention_mask"]).pooler_output)
    expected = (100 * torch.cosine_similarity(image_embeds, text_embeds)).clamp(min=0).mean()
    assert score == pytest.approx(float(expected), abs=1e-3)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        clip_score(images, prompts[:3], str(folder))
    with pytest.raises(ValueError, match="`clip_model` .* is not a CLIP model"):
        clip_score(images, prompts, str(tmp_path / "missing"))
