"""Text-to-image: captions of the bundled digits, the word-level tokenizer and tiny text encoder, a short text-conditioned
run that follows its prompts, guidance, prompt_embeds, round trips (local, Hub, latent), resume with EMA, bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from helpers import interrupt_then_resume, plain_diffusers_images, quick_training_args, same_weights, tiny_unet
from hub_fixtures import hub_server  # noqa: F401  (the fixture)
from transformers import AutoTokenizer, CLIPTextModel

from hfgen import (AutoPipeline, DDPMPipeline, LatentTextToImagePipeline, TextToImagePipeline, VAEModel, text)
from hfgen.data import load_image_dataset, open_image_source
from hfgen.hub_utils import push_folder
from hfgen.prompt_following import digit_classifier_for, digit_prompt_following
from hfgen.training.train_ddpm import DDPMTrainer, main

DIGITS = ["--dataset_name", "hfgen:digits", "--resolution", "8", "--feature_extractor", "none"]
TEXT = ["--caption_column", "text", "--text_encoder_hidden_size", "32", "--text_encoder_layers", "1",
        "--text_encoder_heads", "2", "--attention_head_dim", "4"]


def tiny_text_pipeline(cross_attention_dim=32, hidden_size=32):
    tokenizer = text.build_word_tokenizer(["a thick seven", "a thin one, slanted left"])
    encoder = text.tiny_text_encoder(tokenizer, hidden_size=hidden_size, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, norm_num_groups=4, attention_head_dim=2,
                                cross_attention_dim=cross_attention_dim)
    return TextToImagePipeline(unet, DDPMScheduler(num_train_timesteps=20), encoder, tokenizer, prompt_dropout=0.1,
                               objective="ddpm")


# ----- captions, tokenizer, text encoder ---------------------------------------------------------------------------


def test_captions_name_the_digit_and_the_measured_attributes():
    assert text.digit_caption(7, {"thickness": 2, "slant": 2, "size": 1}) == "a thick seven, slanted right"
    assert text.digit_caption(8, {"thickness": 1, "slant": 1, "size": 1}) == "an eight, upright"
    assert text.digit_caption(2, phrasing=3) == "a number 2"
    bar = np.zeros((3, 8, 8))
    bar[0, :, 3] = 1  # a thin upright bar
    bar[1, :, 2:5] = 1  # a thick one
    bar[2, np.arange(8), np.arange(8)[::-1]] = 1  # a diagonal: top right to bottom left, leaning right
    measured = text.digit_attributes(bar)
    assert measured["thickness"][1] > measured["thickness"][0]
    assert abs(measured["slant"][0]) < 1e-6 and measured["slant"][2] > 0.9
    # on the digits, each attribute's words split the training images about in thirds
    source = open_image_source("hfgen:digits", caption_column="text")
    captions = source.dataset("train", 8).captions
    assert len(captions) == 1438 and captions == source.captions("train")
    for word in ("thick", "thin", "slanted left", "slanted right"):
        assert 0.25 < np.mean([word in caption for caption in captions]) < 0.42, word


def test_tokenizer_and_text_encoder_round_trip(tmp_path):
    tokenizer = text.build_word_tokenizer(["a thick seven, slanted right", "a thin one"])
    ids = text.tokenize_prompts(tokenizer, ["A thick seven", ""])
    assert ids.shape == (2, tokenizer.model_max_length)
    assert tokenizer.convert_ids_to_tokens(ids[0, :5].tolist()) == ["[BOS]", "a", "thick", "seven", "[EOS]"]
    assert ids[1, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert text.tokenize_prompts(tokenizer, ["a purple seven"])[0, 2] == tokenizer.unk_token_id
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert torch.equal(text.tokenize_prompts(loaded, ["A thick seven", ""]), ids)
    encoder = text.tiny_text_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2).eval()
    encoder.save_pretrained(tmp_path / "text_encoder")
    states = text.encode_prompt(tokenizer, encoder, ["a thick seven"])
    assert states.shape == (1, tokenizer.model_max_length, 32)
    reloaded = text.load_text_encoder(str(tmp_path))  # a folder with text_encoder/ and tokenizer/
    assert type(reloaded) is CLIPTextModel
    assert torch.equal(text.encode_prompt(text.load_tokenizer(str(tmp_path)), reloaded, ["a thick seven"]), states)
    with pytest.raises(ValueError, match="has 23 tokens, more than the tokenizer's model_max_length 16"):
        text.tokenize_prompts(tokenizer, [" ".join(["seven"] * 21)])


# ----- a short run that learns: text-conditioned flow matching on the 8x8 digits ----------------------------------


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory):
    """150 steps on the 8x8 digits and hfgen's captions, the tiny text encoder trained with the U-Net; the final
    evaluation measures prompt-following at guidance 3 (~35 s)."""
    output_dir = tmp_path_factory.mktemp("t2i") / "out"
    main(quick_training_args(output_dir, *DIGITS, *TEXT, "--objective", "flow_matching", "--prompt_dropout", "0.2",
                             "--block_out_channels", "16", "32", "--max_train_steps", "150", "--train_batch_size", "64",
                             "--learning_rate", "2e-3", "--num_inference_steps", "10", "--eval_num_samples", "20",
                             "--eval_prompts_per_digit", "6"))
    return output_dir


def test_prompted_digits_and_attributes_are_followed_and_guidance_raises_accuracy(t2i_dir):
    guided = json.loads((t2i_dir / "metrics.json").read_text())  # the trainer's, at its default guidance 3
    pipe = TextToImagePipeline.from_pretrained(t2i_dir)
    pipe.set_progress_bar_config(disable=True)
    test = load_image_dataset("hfgen:digits", "test", resolution=8, caption_column="text")
    classifier = digit_classifier_for(load_image_dataset("hfgen:digits", "train", resolution=8), test)
    plain = digit_prompt_following(pipe, test, classifier, num_images_per_digit=6,
                                   pipeline_kwargs={"num_inference_steps": 10})  # guidance 1
    # seen: digit accuracy 0.6 guided (chance 0.1); thick vs thin 4.8 pooled SD apart (the real digits: 4.7)
    assert plain["digit_accuracy"] > 0.2 and guided["digit_accuracy"] > plain["digit_accuracy"] + 0.1, (plain, guided)
    assert guided["thickness_separation"] > 1.5 and guided["thickness_accuracy"] > 0.5, guided
    assert guided["real_thickness_separation"] > guided["thickness_separation"] / 2
    card = (t2i_dir / "README.md").read_text()
    assert "digit_accuracy" in card and "guidance scale 3" in card


def test_the_folder_round_trips_locally_and_through_the_hub(t2i_dir, tmp_path, hub_server):  # noqa: F811
    pipe = AutoPipeline.from_pretrained(t2i_dir)
    assert type(pipe) is TextToImagePipeline and type(pipe.text_encoder) is CLIPTextModel
    assert pipe.config.prompt_dropout == 0.2 and pipe.objective == "flow_matching"
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and (t2i_dir / "tokenizer").is_dir()

    call = dict(prompt=["a thick seven", "a one"], negative_prompt="a zero", guidance_scale=2.0, num_inference_steps=3)

    def images(pipeline):
        return pipeline(**call, generator=torch.manual_seed(0), output_type="pt").images

    expected = images(pipe)
    pipe.save_pretrained(tmp_path / "copy")
    assert torch.equal(images(TextToImagePipeline.from_pretrained(tmp_path / "copy")), expected)
    push_folder(str(t2i_dir), "user/t2i")
    assert torch.equal(images(AutoPipeline.from_pretrained("user/t2i")), expected)
    for plain in plain_diffusers_images(tmp_path, [t2i_dir, "user/t2i"], **call):  # where hfgen cannot be imported
        np.testing.assert_allclose(plain, expected.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    card = (t2i_dir / "README.md").read_text()
    assert "text-to-image" in card and "CLIPTextModel" in card


def test_prompt_embeds_give_the_same_images_as_prompts(t2i_dir):
    pipe = TextToImagePipeline.from_pretrained(t2i_dir)
    prompts, options = ["a thick seven", "a thin one, slanted left"], dict(num_inference_steps=3, output_type="pt")
    for guidance in (1.0, 2.5):
        from_prompts = pipe(prompt=prompts, guidance_scale=guidance, generator=torch.manual_seed(0), **options).images
        from_embeds = pipe(prompt_embeds=pipe.encode_prompt(prompts), guidance_scale=guidance,
                           generator=torch.manual_seed(0), **options).images
        assert torch.equal(from_prompts, from_embeds)
    negative = pipe(prompt=prompts, negative_prompt=["a zero"] * 2, guidance_scale=2.5, generator=torch.manual_seed(0),
                    **options).images
    negative_embeds = pipe(prompt=prompts, negative_prompt_embeds=pipe.encode_prompt(["a zero"] * 2),
                           guidance_scale=2.5, generator=torch.manual_seed(0), **options).images
    assert torch.equal(negative, negative_embeds) and not torch.equal(negative, from_prompts)


def test_empty_prompt_guidance_equals_the_unconditional_prediction():
    pipe = tiny_text_pipeline()
    empty = pipe.encode_prompt(["", ""])
    sample, timestep = torch.randn(2, 1, 8, 8, generator=torch.manual_seed(0)), torch.tensor(7)
    unconditional = pipe.unet(sample, timestep, encoder_hidden_states=empty).sample
    guided = pipe.denoise(sample, timestep, (empty, empty), 7.5)
    torch.testing.assert_close(guided, unconditional, atol=1e-5, rtol=0)
    # and a real prompt with guidance is not the unconditional prediction
    prompted = pipe.denoise(sample, timestep, (pipe.encode_prompt(["a thick seven"] * 2), empty), 7.5)
    assert not torch.allclose(prompted, unconditional, atol=1e-3)


def test_latent_text_to_image_round_trips(tmp_path):
    pixel = tiny_text_pipeline()
    unet = UNet2DConditionModel.from_config({**pixel.unet.config, "in_channels": 4, "out_channels": 4,
                                             "sample_size": 4})
    torch.manual_seed(0)
    vae = VAEModel(sample_size=8, architecture="conv", hidden_dims=(8,), latent_channels=4)
    pipe = LatentTextToImagePipeline(vae, unet, pixel.scheduler, pixel.text_encoder, pixel.tokenizer, scaling_factor=0.5,
                                     prompt_dropout=0.1)
    images = pipe(prompt="a seven", guidance_scale=2.0, num_inference_steps=2, generator=torch.manual_seed(0),
                  output_type="pt").images
    pipe.save_pretrained(tmp_path / "ldm")
    loaded = AutoPipeline.from_pretrained(tmp_path / "ldm")
    assert type(loaded) is LatentTextToImagePipeline and loaded.family == "text-to-image-ldm"
    assert torch.equal(loaded(prompt="a seven", guidance_scale=2.0, num_inference_steps=2,
                              generator=torch.manual_seed(0), output_type="pt").images, images)


# ----- resume with EMA, bad input ---------------------------------------------------------------------------------


def test_resume_with_ema_and_the_trained_text_encoder_is_bit_identical(tmp_path, monkeypatch):
    flags = [*DIGITS, *TEXT, "--block_out_channels", "8", "8", "--use_ema", "--max_train_steps", "6",
             "--checkpointing_steps", "3", "--train_batch_size", "16", "--num_inference_steps", "2",
             "--eval_num_samples", "8", "--max_train_samples", "200", "--eval_vlb_num_images", "4",
             "--eval_vlb_num_timesteps", "3", "--eval_prompts_per_digit", "1"]
    main(quick_training_args(tmp_path / "full", *flags))
    interrupt_then_resume(monkeypatch, main, DDPMTrainer, quick_training_args(tmp_path / "cut", *flags), 4)
    assert same_weights(tmp_path / "full", tmp_path / "cut", "unet")
    from safetensors.torch import load_file

    full, cut = (load_file(tmp_path / run / "text_encoder" / "model.safetensors") for run in ("full", "cut"))
    assert full.keys() == cut.keys() and all(torch.equal(full[name], cut[name]) for name in full)


def test_the_vit_denoiser_and_latent_diffusion_train_on_captions(tmp_path):
    from hfgen.models import ViTDenoiser
    from hfgen.training import train_ldm

    quick = [*DIGITS, *TEXT, "--max_train_steps", "3", "--train_batch_size", "16", "--num_inference_steps", "2",
             "--eval_num_samples", "8", "--eval_prompts_per_digit", "1", "--max_train_samples", "64"]
    main(quick_training_args(tmp_path / "vit", *quick, "--denoiser", "vit", "--patch_size", "2", "--vit_hidden_size",
                             "32", "--vit_layers", "1", "--vit_heads", "2", "--eval_vlb_num_images", "0"))
    vit = AutoPipeline.from_pretrained(tmp_path / "vit")
    assert type(vit) is TextToImagePipeline and type(vit.unet) is ViTDenoiser
    assert vit.unet.config.cross_attention_dim == 32
    prompts = ["a thick seven", "a thin one"]
    states = vit.encode_prompt(prompts)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.manual_seed(0)), torch.tensor([5, 500])
    torch.nn.init.normal_(vit.unet.blocks[0].cross_attention.out_proj.weight)  # zero at init: make the text matter
    assert not torch.allclose(vit.unet(x, t, encoder_hidden_states=states).sample,
                              vit.unet(x, t, encoder_hidden_states=vit.encode_prompt(["", ""])).sample)
    with pytest.raises(ValueError, match="`encoder_hidden_states` must be given exactly when the denoiser has cross"):
        vit.unet(x, t)
    metrics = json.loads((tmp_path / "vit" / "metrics.json").read_text())
    assert {"digit_accuracy", "slant_separation", "size_accuracy"} <= metrics.keys()

    train_ldm.main(quick_training_args(tmp_path / "ldm", *quick, "--vae_num_epochs", "1", "--vae_hidden_dims", "8",
                                       "--vae_train_batch_size", "16",
                                       "--vae_eval_importance_samples", "2", "--block_out_channels", "8", "8"))
    ldm = AutoPipeline.from_pretrained(tmp_path / "ldm")
    assert type(ldm) is LatentTextToImagePipeline and ldm.vae.latent_shape == (4, 4, 4)
    images = ldm(prompt=prompts, guidance_scale=2.0, num_inference_steps=2, generator=torch.manual_seed(0),
                 output_type="pt").images
    assert images.shape == (2, 1, 8, 8)
    assert "digit_accuracy" in json.loads((tmp_path / "ldm" / "metrics.json").read_text())


@pytest.mark.parametrize("tune", [False, True])
def test_a_given_text_encoder_is_frozen_unless_tuned(tmp_path, tune):
    from safetensors.torch import load_file

    source = load_image_dataset("hfgen:digits", "train", 8, caption_column="text")
    tokenizer = text.build_word_tokenizer(source.captions)
    tokenizer.save_pretrained(tmp_path / "encoder" / "tokenizer")
    text.tiny_text_encoder(tokenizer, 16, 1, 2, seed=3).save_pretrained(tmp_path / "encoder" / "text_encoder")
    main(quick_training_args(tmp_path / "out", *DIGITS, "--caption_column", "text", "--text_encoder_name_or_path",
                             tmp_path / "encoder", *(["--train_text_encoder"] if tune else []), "--block_out_channels",
                             "8", "8", "--attention_head_dim", "4", "--max_train_steps", "2", "--train_batch_size", "16",
                             "--learning_rate", "1e-2", "--num_inference_steps", "2", "--eval_num_samples", "8",
                             "--max_train_samples", "64", "--eval_vlb_num_images", "0", "--eval_prompts_per_digit", "1"))
    given, saved = (load_file(folder / "text_encoder" / "model.safetensors") for folder in (tmp_path / "encoder",
                                                                                          tmp_path / "out"))
    unchanged = all(torch.equal(given[name], saved[name]) for name in given)
    assert unchanged != tune
    assert ("tuned" if tune else "frozen") in (tmp_path / "out" / "README.md").read_text()


def test_a_folder_of_captioned_images_trains_a_text_to_image_pipeline(tmp_path):
    import PIL.Image

    rng, rows = np.random.default_rng(0), []
    (tmp_path / "images").mkdir()
    for i in range(12):
        PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB").save(tmp_path / "images" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["a red square", "a blue circle, small"][i % 2]})
    (tmp_path / "images" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    main(quick_training_args(tmp_path / "out", "--train_data_dir", tmp_path / "images", "--validation_split", "0.25",
                             "--resolution", "8", "--feature_extractor", "none", *TEXT, "--block_out_channels", "8",
                             "8", "--max_train_steps", "2", "--train_batch_size", "4", "--num_inference_steps", "2",
                             "--eval_num_samples", "3", "--eval_vlb_num_images", "0"))
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "out")
    assert pipe.tokenizer.convert_ids_to_tokens(text.tokenize_prompts(pipe.tokenizer, ["a blue circle"])[0, :4].tolist()) \
        == ["[BOS]", "a", "blue", "circle"]  # the vocabulary is the folder's captions'
    images = pipe(prompt="a red square", num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 8, 8)
    # prompt-following is measured on hfgen's captioned digits only
    assert "digit_accuracy" not in json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_hfgen_sample_takes_prompts(t2i_dir, tmp_path):
    from hfgen.cli import sample

    output = sample([str(t2i_dir), "--prompt", "a thick seven", "--num_images", "4", "--guidance_scale", "2",
                     "--num_inference_steps", "3", "--output", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").is_file() and output == str(tmp_path / "grid.png")
    with pytest.raises(ValueError, match="this DDPMPipeline has no text encoder"):
        DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "ddpm")
        sample([str(tmp_path / "ddpm"), "--prompt", "a seven", "--output", str(tmp_path / "x.png")])


def test_hfgen_evaluate_reports_prompt_following_and_clip_score(t2i_dir, tmp_path):
    from test_prompt_following import save_tiny_clip

    from hfgen.cli import evaluate

    clip = save_tiny_clip(tmp_path / "clip")
    metrics = evaluate([str(t2i_dir), "--dataset_name", "hfgen:digits", "--feature_extractor", "none", "--num_samples", "20",
                        "--prompts_per_digit", "2", "--num_inference_steps", "3", "--clip_model", str(clip),
                        "--num_clip_images", "8"])
    assert 0 <= metrics["digit_accuracy"] <= 1 and 0 <= metrics["clip_score"] <= 100
    assert {f"{name}_separation" for name in text.ATTRIBUTES} <= metrics.keys()
    DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="`--clip_model` measures how a text-to-image pipeline follows prompts"):
        evaluate([str(tmp_path / "ddpm"), "--clip_model", str(clip)])


def test_a_text_unet_attends_only_where_its_feature_maps_are_small():
    from hfgen.training.train_ddpm import text_unet_blocks

    assert text_unet_blocks(32, 3) == (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                       ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    assert text_unet_blocks(8, 2) == (("CrossAttnDownBlock2D",) * 2, ("CrossAttnUpBlock2D",) * 2)  # latents, 8x8 digits
    assert text_unet_blocks(64, 2) == (("DownBlock2D",) * 2, ("UpBlock2D",) * 2)  # the middle block still attends


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="`prompt` 'a seven': this DDPMPipeline has no text encoder"):
        DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=10))(prompt="a seven")
    pipe = tiny_text_pipeline()
    with pytest.raises(ValueError, match="more than the tokenizer's model_max_length"):
        pipe(prompt=" ".join(["seven"] * 40), num_inference_steps=1)
    with pytest.raises(ValueError, match="`prompt` holds 2 prompts but `batch_size` is 3"):
        pipe(3, prompt=["a seven", "a one"], num_inference_steps=1)
    with pytest.raises(ValueError, match="`prompt_embeds` holds 1 prompts but `batch_size` is 2"):
        pipe(2, prompt_embeds=pipe.encode_prompt(["a seven"]), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"`prompt_embeds` must be a \(B, L, 32\) tensor"):
        pipe(prompt_embeds=torch.zeros(1, 5, 16), num_inference_steps=1)
    with pytest.raises(ValueError, match="give `prompt` or `prompt_embeds`, not both"):
        pipe(prompt="a seven", prompt_embeds=pipe.encode_prompt(["a seven"]), num_inference_steps=1)
    with pytest.raises(ValueError, match="`negative_prompt` acts through guidance only"):
        pipe(prompt="a seven", negative_prompt="a one", num_inference_steps=1)
    with pytest.raises(ValueError, match="`class_labels` 3: a TextToImagePipeline is conditioned on `prompt`"):
        pipe(class_labels=3, num_inference_steps=1)
    with pytest.raises(ValueError, match="has hidden size 16, but the denoiser's cross-attention takes states of width 32"):
        tiny_text_pipeline(cross_attention_dim=32, hidden_size=16)


@pytest.mark.parametrize("flags, message", [
    (["--caption_column", "text", "--conditional"], "`--conditional` \\(class labels\\) and `--caption_column`"),
    (["--guidance_scale", "2"], "`--guidance_scale` conditions on captions: it needs `--caption_column`"),
    (["--caption_column", "text", "--prompt_dropout", "0", "--guidance_scale", "2"],
     "`--guidance_scale` 2 contrasts with the empty prompt, which `--prompt_dropout 0` never trains"),
    (["--train_text_encoder"], "`--train_text_encoder` conditions on captions: it needs `--caption_column`"),
    (["--caption_column", "label"], "`caption_column` of the bundled hfgen:digits must be 'text'"),
    (["--caption_column", "text", "--prompt_dropout", "1.5"], "--prompt_dropout"),
])
def test_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(quick_training_args(tmp_path, *DIGITS, *flags))
