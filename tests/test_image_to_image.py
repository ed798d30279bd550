"""Editing with every diffusion pipeline: image-to-image (SDEdit, docs/maths.md §6.11): the ends of `strength`, the
closed form on the exact Gaussian denoiser; inpainting (§6.12): the kept pixels, RePaint's resampling path; bad input.
(Trained digits models: test_flow_matching.py, test_edm.py, test_train_ldm.py.)"""

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       UNet2DConditionModel)
from helpers import RawSamples, tiny_unet
from test_pipelines_ddpm import GaussianEpsilon

from hfgen import DDPMPipeline, LatentDiffusionPipeline, LatentTextToImagePipeline, VAEModel, text
from hfgen.diffusion import resampling_levels


def tiny_latent(objective="ddpm"):
    torch.manual_seed(0)
    vae = VAEModel(sample_size=8, architecture="conv", hidden_dims=(8,), latent_channels=4)
    unet = tiny_unet(sample_size=4)
    unet = type(unet).from_config({**unet.config, "in_channels": 4, "out_channels": 4})
    scheduler = FlowMatchEulerDiscreteScheduler() if objective == "flow_matching" else DDPMScheduler(num_train_timesteps=20)
    return LatentDiffusionPipeline(vae, unet, scheduler, scaling_factor=1.0, objective=objective)


def tiny_latent_text():
    pixel = tiny_latent()
    tokenizer = text.build_word_tokenizer(["a seven", "a one"])
    encoder = text.tiny_text_encoder(tokenizer, hidden_size=8, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 8),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, norm_num_groups=4, attention_head_dim=2,
                                cross_attention_dim=8)
    return LatentTextToImagePipeline(pixel.vae, unet, DDPMScheduler(num_train_timesteps=20), encoder, tokenizer,
                                     scaling_factor=1.0)


PIPELINES = {
    "ddpm": lambda: DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=20)),
    "flow": lambda: DDPMPipeline(tiny_unet(), FlowMatchEulerDiscreteScheduler(), objective="flow_matching"),
    "conditional": lambda: DDPMPipeline(tiny_unet(num_class_embeds=4), DDPMScheduler(num_train_timesteps=20), 0.1),
    "latent": tiny_latent,
    "latent-flow": lambda: tiny_latent("flow_matching"),
    "latent-text": tiny_latent_text,
}


def call(pipe, **kwargs):
    if isinstance(pipe, LatentTextToImagePipeline):
        kwargs["prompt"] = "a seven"
    elif pipe.num_classes:
        kwargs["class_labels"] = 1
    return pipe(num_inference_steps=10, output_type="pt", **kwargs).images


@pytest.mark.parametrize("kind", PIPELINES)
def test_strength_zero_gives_the_image_and_one_samples_as_without_it(kind):
    pipe = PIPELINES[kind]()
    pipe.set_progress_bar_config(disable=True)
    images = torch.rand(2, 1, 8, 8, generator=torch.manual_seed(1))
    as_encoded = pipe.output(pipe.to_images(pipe.from_images(images)), "pt", True).images  # the image, or its reconstruction
    torch.testing.assert_close(call(pipe, image=images, strength=0.0), as_encoded, atol=1e-6, rtol=0)
    if pipe.denoises_pixels:
        torch.testing.assert_close(as_encoded, images, atol=1e-6, rtol=0)
    assert torch.equal(call(pipe, image=images, strength=1.0, generator=torch.manual_seed(3)),
                       call(pipe, batch_size=2, generator=torch.manual_seed(3)))
    distances = [(call(pipe, image=images, strength=strength, generator=torch.manual_seed(3)) - as_encoded).square().mean()
                 for strength in (0.2, 0.6, 1.0)]
    assert distances[0] < distances[1] < distances[2], distances
    one_image = call(pipe, image=images[:1], strength=0.5, batch_size=3, generator=torch.manual_seed(3))
    assert one_image.shape[0] == 3 and not torch.equal(one_image[0], one_image[1])  # one image, three noises


def gains(abar: torch.Tensor, cov: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much of x0 - mean survives SDEdit from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for data N(mean, cov)
    (§6.11): ancestral sampling draws the posterior, E = mean + abar cov S^-1 (x0 - mean); the probability-flow ODE maps
    linearly, E = mean + sqrt(abar) cov^1/2 S^-1/2 (x0 - mean); S = abar cov + (1 - abar) I."""
    covariance_t = abar * cov + (1 - abar) * torch.eye(2, dtype=torch.float64)

    def power(matrix, exponent):
        values, vectors = torch.linalg.eigh(matrix)
        return vectors @ torch.diag(values ** exponent) @ vectors.T

    return {"ancestral": abar * cov @ torch.linalg.inv(covariance_t),
            "ode": abar ** 0.5 * power(cov, 0.5) @ power(covariance_t, -0.5)}


@pytest.mark.parametrize("scheduler_class, steps, kind", [(DDPMScheduler, 100, "ancestral"), (DDIMScheduler, 250, "ode"),
                                                          (EulerDiscreteScheduler, 250, "ode")])
def test_sdedit_of_the_exact_gaussian_denoiser_keeps_the_closed_form_share_of_the_image(scheduler_class, steps, kind):
    model = GaussianEpsilon()
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False)
    pipe = RawSamples(model, scheduler_class.from_config(ddpm.config))
    pipe.set_progress_bar_config(disable=True)
    mean, cov = (torch.tensor(value, dtype=torch.float64) for value in (model.config.mean, model.config.cov))
    x0 = torch.tensor([-0.8, 0.8], dtype=torch.float64)
    for strength in (0.2, 0.35):
        image = ((x0 + 1) / 2).float().reshape(1, 2, 1, 1)  # in [0, 1]: the pipeline maps it to x0 in [-1, 1]
        samples = pipe(4000, image=image, strength=strength, num_inference_steps=steps,
                       generator=torch.manual_seed(0)).flatten(1).double()
        first = steps - int(steps * strength)  # the first step run
        scheduler = pipe.scheduler
        if scheduler_class is EulerDiscreteScheduler:
            abar = 1 / (1 + scheduler.sigmas[first].double() ** 2)
        else:
            abar = scheduler.alphas_cumprod[int(scheduler.timesteps[first])].double()
        expected = mean + gains(abar, cov)[kind] @ (x0 - mean)
        torch.testing.assert_close(samples.mean(0), expected, atol=0.05, rtol=0)


def right_half_mask(batch: int = 1) -> torch.Tensor:
    mask = torch.zeros(batch, 1, 8, 8)
    mask[..., 4:] = 1
    return mask


@pytest.mark.parametrize("kind", PIPELINES)
def test_inpainting_keeps_the_known_pixels_and_draws_the_rest_from_the_generator(kind):
    pipe = PIPELINES[kind]()
    pipe.set_progress_bar_config(disable=True)
    images, mask = torch.rand(2, 1, 8, 8, generator=torch.manual_seed(1)), right_half_mask()
    first = call(pipe, image=images, mask_image=mask, generator=torch.manual_seed(3))
    torch.testing.assert_close(first[..., :4], images[..., :4], atol=1e-6, rtol=0)  # kept exactly, latents included
    second = call(pipe, image=images, mask_image=mask, generator=torch.manual_seed(4))
    assert not torch.allclose(first[..., 4:], second[..., 4:], atol=1e-3)
    assert torch.equal(first, call(pipe, image=images, mask_image=mask, generator=torch.manual_seed(3)))


def test_repaint_resampling_path_and_its_runs():
    # 6 steps, jumps of 2 sampled twice: down to 2, back to 0, down to 4, back to 2, down to 6 (no jump at the end)
    assert resampling_levels(6, jump_length=2, resamples=2) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert resampling_levels(4) == [0, 1, 2, 3, 4] and resampling_levels(6, 2, 1, first=3) == [3, 4, 5, 6]
    pipe = PIPELINES["ddpm"]()
    pipe.set_progress_bar_config(disable=True)
    images, mask = torch.rand(1, 1, 8, 8, generator=torch.manual_seed(1)), right_half_mask()
    resampled = call(pipe, image=images, mask_image=mask, jump_length=2, resamples=3, generator=torch.manual_seed(3))
    torch.testing.assert_close(resampled[..., :4], images[..., :4], atol=1e-6, rtol=0)
    assert not torch.equal(resampled, call(pipe, image=images, mask_image=mask, generator=torch.manual_seed(3)))
    with pytest.raises(ValueError, match="`resamples` 2: RePaint's resampling undoes steps"):
        call(PIPELINES["flow"](), image=images, mask_image=mask, resamples=2)


def test_bad_image_input():
    pipe = PIPELINES["ddpm"]()
    with pytest.raises(ValueError, match="`strength` edits `image`: pass `image` too"):
        pipe(1, strength=0.5)
    with pytest.raises(ValueError, match=r"`strength` must be a number in \[0, 1\], got 1.5"):
        pipe(image=torch.rand(1, 1, 8, 8), strength=1.5)
    with pytest.raises(ValueError, match=r"`image` must be images of 1 channel\(s\) and 8x8 pixels"):
        pipe(image=torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="`image` holds 2 images but the call generates 3"):
        pipe(3, image=torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="`mask_image` edits `image`: pass `image` too"):
        pipe(1, mask_image=right_half_mask())
    with pytest.raises(ValueError, match="`jump_length` and `resamples` are inpainting's resampling"):
        pipe(image=torch.rand(1, 1, 8, 8), resamples=2)
    with pytest.raises(ValueError, match=r"`mask_image` must be images of 1 channel\(s\) and 8x8 pixels"):
        pipe(image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="`resamples` must be a positive integer"):
        pipe(image=torch.rand(1, 1, 8, 8), mask_image=right_half_mask(), resamples=0)
