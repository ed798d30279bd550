"""Latent diffusion on diffusers' autoencoders (hfgen.autoencoders): AutoencoderKL, AutoencoderTiny and VQModel as
first stages, tiny and randomly initialised, saved to folders as a Hub repo would hold them."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DModel, VQModel
from helpers import quick_training_args

from hfgen import LatentDiffusionPipeline, autoencoders
from hfgen.autoencoders import LatentNormalization, choose_normalization, config_normalization
from hfgen.training.train_ldm import main

BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
AUTOENCODERS = {  # each halves the image size: 16 px digits -> 8x8 latents
    "AutoencoderKL": lambda: AutoencoderKL(**BLOCKS, latent_channels=4, sample_size=16),
    "AutoencoderTiny": lambda: AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                               num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4),
    "VQModel": lambda: VQModel(**BLOCKS, latent_channels=3, num_vq_embeddings=16, sample_size=16),
}
# 16 px digits through a tiny denoiser, a few steps: what is checked is the plumbing, not the samples
FLAGS = ["--resolution", "16", "--block_out_channels", "16", "32", "--max_train_steps", "3", "--train_batch_size", "16",
         "--feature_extractor", "none", "--eval_vlb_num_images", "0", "--max_train_samples", "64",
         "--num_inference_steps", "4"]


def saved(name: str, folder, **config_changes):
    torch.manual_seed(0)
    vae = AUTOENCODERS[name]()
    vae.register_to_config(**config_changes)
    vae.save_pretrained(folder)
    return vae


def test_each_autoencoder_gets_its_own_range_from_the_table():
    images = torch.rand(2, 3, 16, 16)
    for name in AUTOENCODERS:
        torch.manual_seed(0)
        vae = AUTOENCODERS[name]()
        assert autoencoders.kind_of(vae).data_range == "symmetric"  # diffusers' autoencoders take [-1, 1]
        direct = vae.encode(images * 2 - 1)
        latents = direct.latent_dist.mean if name == "AutoencoderKL" else direct.latents
        posterior = autoencoders.encode(vae, images)
        assert torch.allclose(posterior.mean, latents, atol=1e-6)
        assert autoencoders.latent_shape(vae, (3, 16, 16)) == tuple(latents.shape[1:])
        decoded = autoencoders.decode(vae, posterior.mean)
        assert torch.allclose(decoded, (vae.decode(latents).sample + 1) / 2, atol=1e-6)  # back in [0, 1]
    with pytest.raises(TypeError, match="a first stage must be one of VAEModel, AutoencoderKL"):
        autoencoders.encode(UNet2DModel(sample_size=8, block_out_channels=(8,), norm_num_groups=4,
                                        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)), images)


def test_normalization_follows_the_config_or_the_data(caplog):
    vae = AutoencoderKL(**BLOCKS, latent_channels=2, scaling_factor=0.5, shift_factor=0.1)
    assert config_normalization(vae) == LatentNormalization(0.5, 0.1, "config")
    assert choose_normalization(vae, "auto", measured_mean=0.1, measured_std=2.0).source == "config"
    assert choose_normalization(vae, "data", measured_mean=0.3, measured_std=4.0) == LatentNormalization(0.25, 0.3)
    with caplog.at_level("WARNING"):
        choose_normalization(vae, "config", measured_mean=0.0, measured_std=10.0)  # scaled std 5: not fitted here
    assert "--latent_scaling data" in caplog.text
    vae.register_to_config(latents_mean=[1.0, -1.0], latents_std=[2.0, 4.0])  # SDXL-style per-channel statistics
    per_channel = config_normalization(vae)
    latents = torch.tensor([3.0, 3.0]).view(1, 2, 1, 1)
    assert per_channel.normalize(latents).flatten().tolist() == [0.5 * 2 / 2, 0.5 * 4 / 4]  # (z - mean) * sf / std
    assert torch.allclose(per_channel.denormalize(per_channel.normalize(latents)), latents)


@pytest.mark.slow
@pytest.mark.parametrize("name", AUTOENCODERS)
def test_latent_diffusion_on_a_saved_diffusers_autoencoder(name, tmp_path, caplog):
    """Grey digits through an RGB autoencoder loaded from a repo-like folder (`vae/`), into a folder that
    LatentDiffusionPipeline and diffusers' own class both load, normalized as recorded."""
    vae = saved(name, tmp_path / "repo" / "vae", scaling_factor=0.7, shift_factor=0.2)
    with caplog.at_level("INFO"):
        main(quick_training_args(tmp_path / "out", *FLAGS, "--pretrained_vae_model_name_or_path", tmp_path / "repo"))
    assert "grey images of the dataset are converted to RGB" in caplog.text
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", name]
    if name == "VQModel":  # its config keeps no fitted normalization: measured
        assert (index["scaling_factor"], index["shift_factor"]) != (0.7, 0.2)
    else:  # the config's, as --latent_scaling auto says
        assert (index["scaling_factor"], index["shift_factor"]) == (0.7, 0.2)
    component = getattr(__import__("diffusers"), name).from_pretrained(tmp_path / "out", subfolder="vae")
    assert all(torch.equal(a, b) for a, b in zip(component.state_dict().values(), vae.state_dict().values()))
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe.vae).__name__ == name and pipe.sample_size == 16
    images = pipe(3, num_inference_steps=4, output_type="pt", generator=torch.manual_seed(0)).images
    assert images.shape == (3, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    card = (tmp_path / "out" / "README.md").read_text()
    normalized = "measured on the training latents" if name == "VQModel" else "(z - 0.2) * 0.7, from the autoencoder's config"
    assert f"a {name} first stage" in card and normalized in card
    assert "first_stage_reconstruction_mse" in json.loads((tmp_path / "out" / "metrics.json").read_text())


@pytest.mark.slow
def test_measured_normalization_gives_the_training_latents_zero_mean_and_unit_variance(tmp_path):
    saved("AutoencoderKL", tmp_path / "kl")
    main(quick_training_args(tmp_path / "out", *FLAGS, "--vae_path", tmp_path / "kl", "--latent_scaling", "data",
                             "--num_channels", "3"))
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "out")
    from hfgen.data import load_image_dataset
    from hfgen.latent_tools import encode_images

    digits = load_image_dataset("hfgen:mnist", "train", resolution=16, num_channels=3).images[:64]
    latents = pipe.latent_normalization.normalize(encode_images(pipe.vae, digits).sample(torch.manual_seed(0)))
    assert latents.mean().item() == pytest.approx(0, abs=0.02) and latents.std().item() == pytest.approx(1, abs=0.02)
    assert "measured on the training latents" in (tmp_path / "out" / "README.md").read_text()


def test_first_stages_that_cannot_serve_are_clear_errors(tmp_path):
    UNet2DModel(sample_size=8, block_out_channels=(8,), norm_num_groups=4, down_block_types=("DownBlock2D",),
                up_block_types=("UpBlock2D",)).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="holds a UNet2DModel; a first stage must be one of"):
        autoencoders.load_first_stage(tmp_path / "unet")
    with pytest.raises(ValueError, match="holds no first stage: no config.json in its subfolder 'vae'"):
        autoencoders.load_first_stage(tmp_path / "unet", subfolder="vae")
    vae = AUTOENCODERS["AutoencoderKL"]()
    with pytest.raises(ValueError, match="downsamples by 2: the image size 15x15 must be a multiple of it"):
        autoencoders.latent_shape(vae, (3, 15, 15))
    with pytest.raises(ValueError, match="takes 3-channel images but the data have 1"):
        autoencoders.latent_shape(vae, (1, 16, 16))
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,), norm_num_groups=4,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    with pytest.raises(ValueError, match=r"`scaling_factor` must be a positive number or 4 of them"):
        LatentDiffusionPipeline(vae, unet, DDPMScheduler(), scaling_factor=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"latents have shape \(4, 8, 8\) but the denoiser takes \(3, 8, 8\)"):
        LatentDiffusionPipeline(vae, UNet2DModel.from_config(unet.config, in_channels=3), DDPMScheduler(),
                                scaling_factor=1.0)


@pytest.mark.slow
def test_class_and_text_conditioned_latent_diffusion_on_a_diffusers_autoencoder(tmp_path):
    """Labels with flow matching, and captions, on a saved AutoencoderKL: the conditioning paths are the pixel
    ones, the latents the autoencoder's."""
    from hfgen import LatentTextToImagePipeline

    saved("AutoencoderKL", tmp_path / "kl")
    common = ["--vae_path", tmp_path / "kl", "--max_train_steps", "2", "--train_batch_size", "16", "--feature_extractor",
              "none", "--num_inference_steps", "2", "--max_train_samples", "64"]
    main(quick_training_args(tmp_path / "labels", *common, "--resolution", "16", "--block_out_channels", "16", "32",
                             "--conditional", "--objective", "flow_matching"))
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "labels")
    images = pipe(class_labels=[1, 7], guidance_scale=2.0, num_inference_steps=2, output_type="pt",
                  generator=torch.manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16) and pipe.num_classes == 10
    main(quick_training_args(tmp_path / "text", *common, "--dataset_name", "hfgen:digits", "--resolution", "8",
                             "--caption_column", "text", "--text_encoder_hidden_size", "32", "--text_encoder_layers",
                             "1", "--text_encoder_heads", "2", "--attention_head_dim", "4", "--block_out_channels",
                             "8", "8", "--eval_num_samples", "8", "--eval_prompts_per_digit", "1",
                             "--eval_vlb_num_images", "0"))
    text_pipe = LatentTextToImagePipeline.from_pretrained(tmp_path / "text")
    images = text_pipe(prompt=["a thick seven", "a thin one"], guidance_scale=2.0, num_inference_steps=2,
                       output_type="pt", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 3, 8, 8) and isinstance(text_pipe.vae, AutoencoderKL)
