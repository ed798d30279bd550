import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from hfgen import AutoPipeline, LatentDiffusionPipeline, VAEModel
from hfgen.distributions import DiagonalGaussian
from hfgen.latent_tools import encode_images, latent_scaling_factor


def tiny_vae(**overrides) -> VAEModel:
    torch.manual_seed(0)
    config = dict(sample_size=16, architecture="conv", hidden_dims=(8, 8), latent_channels=2)
    return VAEModel(**{**config, **overrides})


def tiny_unet(sample_size=4, in_channels=2, num_class_embeds=None) -> UNet2DModel:
    torch.manual_seed(1)
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_class_embeds)


@pytest.fixture
def pipe():
    pipe = LatentDiffusionPipeline(tiny_vae(), tiny_unet(), DDPMScheduler(num_train_timesteps=20), scaling_factor=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "generator": torch.Generator().manual_seed(seed), "output_type": "pt", **kwargs}
    return pipe(**kwargs).images


def test_samples_are_decoded_images_deterministic_and_survive_a_round_trip(pipe, tmp_path):
    images = sample(pipe, batch_size=3)
    assert images.shape == (3, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, sample(pipe, batch_size=3))
    assert not torch.equal(images, sample(pipe, seed=1, batch_size=3))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scaling_factor"] == 0.5
    for loaded in (LatentDiffusionPipeline.from_pretrained(tmp_path), AutoPipeline.from_pretrained(tmp_path)):
        assert isinstance(loaded, LatentDiffusionPipeline) and loaded.config.scaling_factor == 0.5
        assert torch.equal(sample(loaded, batch_size=3), images)


def test_denoised_latents_are_unscaled_before_decoding(pipe):
    latents = torch.randn(2, 2, 4, 4)
    assert torch.equal(pipe.to_images(latents), pipe.vae.decode(latents / 0.5).sample)


def test_any_scheduler_plugs_in_and_guidance_works_for_a_conditional_denoiser():
    pipe = LatentDiffusionPipeline(tiny_vae(), tiny_unet(num_class_embeds=4), DDPMScheduler(num_train_timesteps=20),
                                   scaling_factor=1.0)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.num_classes == 3  # the last class id is the null class
    guided = sample(pipe, class_labels=[0, 2], guidance_scale=3.0)
    assert guided.shape == (2, 1, 16, 16)
    assert not torch.equal(guided, sample(pipe, class_labels=[0, 2], guidance_scale=1.0))


def test_scaling_factor_gives_unit_variance():
    generator = torch.Generator().manual_seed(0)
    # means with variance 4 and posterior variances 1: Var z = 4 + 1, so the factor is 1 / sqrt(5)
    posterior = DiagonalGaussian(2 * torch.randn(20000, 2, 4, 4, generator=generator), torch.zeros(20000, 2, 4, 4))
    factor = latent_scaling_factor(posterior)
    assert factor == pytest.approx(5**-0.5, rel=0.01)
    assert (factor * posterior.sample(generator)).var().item() == pytest.approx(1.0, abs=0.02)
    images = torch.rand(5, 1, 16, 16)
    encoded = encode_images(tiny_vae(), images, batch_size=2)
    assert encoded.mean.shape == (5, 2, 4, 4)
    assert torch.allclose(encoded.mean, tiny_vae().encode(images).latent_dist.mean, atol=1e-6)


def test_bad_inputs_are_clear_errors(pipe, tmp_path):
    scheduler = DDPMScheduler(num_train_timesteps=20)
    with pytest.raises(ValueError, match=r"the first stage's latents have shape \(2, 4, 4\) but the denoiser takes \(3, 4, 4\)"):
        LatentDiffusionPipeline(tiny_vae(), tiny_unet(in_channels=3), scheduler, scaling_factor=1.0)
    with pytest.raises(ValueError, match="`scaling_factor` is missing"):
        LatentDiffusionPipeline(tiny_vae(), tiny_unet(), scheduler)
    with pytest.raises(ValueError, match="`scaling_factor` must be a positive number or 2 of them"):
        LatentDiffusionPipeline(tiny_vae(), tiny_unet(), scheduler, scaling_factor=0.0)
    with pytest.raises(ValueError, match="the first stage must be an unconditional VAE"):
        LatentDiffusionPipeline(tiny_vae(num_classes=3), tiny_unet(), scheduler, scaling_factor=1.0)
    with pytest.raises(ValueError, match="`class_labels` were given, but this model is unconditional"):
        pipe(class_labels=[1])
    # a folder whose model_index.json lost the factor does not load
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    del index["scaling_factor"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="`scaling_factor` is missing"):
        LatentDiffusionPipeline.from_pretrained(tmp_path)


def test_the_missing_factor_error_suggests_a_call_that_works():
    import re

    import hfgen

    vae, images = tiny_vae(), torch.rand(6, 1, 16, 16)
    with pytest.raises(ValueError, match="`scaling_factor` is missing") as error:
        LatentDiffusionPipeline(vae, tiny_unet(), DDPMScheduler(num_train_timesteps=20))
    (call,) = re.findall(r"of (hfgen\..*\))$", str(error.value))
    normalization = eval(call, {"hfgen": hfgen, "vae": vae, "images": images})
    posterior = encode_images(vae, images)
    assert normalization.scale == latent_scaling_factor(posterior) and normalization.scale > 0
    assert normalization.shift == pytest.approx(posterior.mean.double().mean().item())
    LatentDiffusionPipeline(vae, tiny_unet(), DDPMScheduler(num_train_timesteps=20), normalization.scale,
                            shift_factor=normalization.shift)
