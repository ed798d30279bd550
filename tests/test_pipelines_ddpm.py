import diffusers
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, ModelMixin)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from hfgen import AutoPipeline, DDPMPipeline
from helpers import RawSamples, tiny_unet


@pytest.fixture
def pipe():
    return DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=20))


@pytest.fixture
def conditional_pipe():
    unet = tiny_unet(num_class_embeds=4)  # 3 classes + the null class 3
    with torch.no_grad():
        unet.class_embedding.weight.normal_()
    return DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=20))


def sample(pipeline, **kwargs):
    if "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(0)
    return pipeline(output_type="np", **kwargs).images


def test_determinism_shapes_and_round_trip(pipe, tmp_path):
    images = sample(pipe, batch_size=2)
    assert images.shape == (2, 8, 8, 1) and 0 <= images.min() and images.max() <= 1
    np.testing.assert_array_equal(images, sample(pipe, batch_size=2))
    assert not np.array_equal(images, sample(pipe, batch_size=2, generator=torch.manual_seed(1)))
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    np.testing.assert_allclose(sample(loaded, batch_size=2), images, atol=1e-6)
    assert isinstance(AutoPipeline.from_pretrained(tmp_path), DDPMPipeline)


def test_interoperates_with_diffusers_ddpm_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "hfgen")  # its pipeline class is hfgen's (saved code): the components are diffusers'
    theirs = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel.from_pretrained(tmp_path / "hfgen", subfolder="unet"),
                                    scheduler=diffusers.DDPMScheduler.from_pretrained(tmp_path / "hfgen", subfolder="scheduler"))
    np.testing.assert_allclose(theirs(batch_size=2, generator=torch.manual_seed(0), num_inference_steps=20,
                                      output_type="np").images, sample(pipe, batch_size=2, num_inference_steps=20),
                               atol=1e-5)
    diffusers.DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler).save_pretrained(tmp_path / "diffusers")
    ours = DDPMPipeline.from_pretrained(tmp_path / "diffusers")
    np.testing.assert_allclose(sample(ours, batch_size=2), sample(pipe, batch_size=2), atol=1e-6)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_any_diffusers_scheduler_plugs_in(pipe, scheduler_class):
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    images = sample(pipe, batch_size=2, num_inference_steps=5)
    assert images.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(images, sample(pipe, batch_size=2, num_inference_steps=5))


class GaussianEpsilon(ModelMixin, ConfigMixin):
    """The exact noise prediction E[eps | x_t] for data N(mean, cov) in R^2 under DDPMScheduler(1000)'s linear betas,
    as a denoiser of (B, 2, 1, 1) samples: sqrt(1 - abar) Sigma_t^-1 (x_t - sqrt(abar) mean), Sigma_t = abar cov +
    (1 - abar) I. A float timestep (the k-diffusion schedulers') is interpolated in log sigma, as they do."""

    @register_to_config
    def __init__(self, mean=(0.5, -1.0), cov=((1.0, 0.6), (0.6, 0.5)), sample_size=1, in_channels=2):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype
        alphas_cumprod = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
        self.log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().numpy()

    def forward(self, sample, timestep, class_labels=None):
        sigma = float(np.exp(np.interp(float(timestep), np.arange(1000), self.log_sigmas)))
        abar = 1 / (1 + sigma**2)
        mean, cov = torch.tensor(self.config.mean, dtype=torch.float64), torch.tensor(self.config.cov, dtype=torch.float64)
        covariance_t = abar * cov + (1 - abar) * torch.eye(2, dtype=torch.float64)
        x = sample.flatten(1).double()
        eps = (1 - abar) ** 0.5 * torch.linalg.solve(covariance_t, (x - abar**0.5 * mean).T).T
        return UNet2DOutput(sample=eps.float().reshape(sample.shape))


# Euler and Heun (k-diffusion) start from noise of scale sigma_max and rescale the denoiser's input: the pipeline must
# apply init_noise_sigma and scale_model_input for them, as diffusers' pipelines do
# (seen: DDIM and Euler at 100 steps shrink the covariance by ~3.5%, DPM-Solver++ at 20 is within 1%)
@pytest.mark.parametrize("scheduler_class, steps", [(DDIMScheduler, 100), (DPMSolverMultistepScheduler, 20),
                                                    (EulerDiscreteScheduler, 100), (HeunDiscreteScheduler, 30)])
def test_the_exact_gaussian_denoiser_sampled_by_any_scheduler_reproduces_mean_and_covariance(scheduler_class, steps):
    model = GaussianEpsilon()
    # betas given explicitly: from_config gives a scheduler its own defaults for what a config did not set explicitly
    # (Heun's are 0.00085 / 0.012)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False)
    pipe = RawSamples(model, scheduler_class.from_config(ddpm.config))
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(5000, num_inference_steps=steps, generator=torch.manual_seed(0)).flatten(1).double()
    torch.testing.assert_close(samples.mean(0), torch.tensor(model.config.mean, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(samples.T.cov(), torch.tensor(model.config.cov, dtype=torch.float64), atol=0.05, rtol=0)


def test_guidance_scale_one_is_the_conditional_model_and_guidance_changes_samples(conditional_pipe):
    labels = [0, 2]
    conditional = sample(conditional_pipe, class_labels=labels, num_inference_steps=5)
    np.testing.assert_array_equal(sample(conditional_pipe, class_labels=labels, num_inference_steps=5,
                                         guidance_scale=1.0), conditional)
    guided = sample(conditional_pipe, class_labels=labels, num_inference_steps=5, guidance_scale=3.0)
    assert not np.allclose(guided, conditional)
    assert conditional_pipe.num_classes == 3


def test_bad_inputs(pipe, conditional_pipe):
    with pytest.raises(ValueError, match="`class_labels`.*unconditional"):
        pipe(2, class_labels=[0, 1])
    with pytest.raises(ValueError, match="`guidance_scale` 3.0 needs `class_labels`"):
        pipe(2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="`num_inference_steps` must be at most the 20 training steps"):
        pipe(1, num_inference_steps=21)
    with pytest.raises(ValueError, match="`num_inference_steps` must be a positive integer"):
        pipe(1, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 2\]"):
        conditional_pipe(class_labels=[3])  # the null class is not a class to generate
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 1, 8, 8\)"):
        pipe(1, latents=torch.zeros(1, 1, 16, 16))


def test_vit_denoiser_plugs_into_the_pipeline_conditional_or_not(tmp_path):
    from hfgen import ViTDenoiser

    torch.manual_seed(0)
    for num_class_embeds, labels in ((None, None), (4, [0, 2])):
        vit = ViTDenoiser(sample_size=8, patch_size=2, hidden_size=16, num_layers=1, num_heads=2,
                          num_class_embeds=num_class_embeds).eval()
        with torch.no_grad():
            for parameter in vit.parameters():  # leave the zero initialisation so that the output moves
                parameter.add_(0.05 * torch.randn_like(parameter))
        pipe = DDPMPipeline(vit, DDPMScheduler(num_train_timesteps=10))
        images = sample(pipe, batch_size=2, class_labels=labels)
        assert images.shape == (2, 8, 8, 1)
        pipe.save_pretrained(tmp_path / str(num_class_embeds))
        np.testing.assert_allclose(sample(DDPMPipeline.from_pretrained(tmp_path / str(num_class_embeds)), batch_size=2,
                                          class_labels=labels), images, atol=1e-6)
    with pytest.raises(ValueError, match="`sample_size` 8 must be divisible by `patch_size` 3"):
        ViTDenoiser(sample_size=8, patch_size=3)
    with pytest.raises(ValueError, match="`class_labels` must be given exactly when"):
        vit(torch.zeros(1, 1, 8, 8), 0)


def test_vit_patches_come_back_to_their_pixels():
    """With identity patch embedding and read-out (blocks start as the identity), the output is the input."""
    from hfgen import ViTDenoiser

    p, channels = 2, 3
    vit = ViTDenoiser(sample_size=8, in_channels=channels, out_channels=channels, patch_size=p, hidden_size=12,
                      num_layers=1, num_heads=2).eval()
    with torch.no_grad():
        vit.patchify.weight.copy_(torch.eye(12).reshape(12, channels, p, p))  # token d = pixel (c, i, j) of the patch
        vit.patchify.bias.zero_()
        vit.position.zero_()
        # read-out order is (i, j, c): map each token entry (c, i, j) there
        order = torch.arange(12).reshape(channels, p, p).permute(1, 2, 0).reshape(-1)
        vit.unpatchify.weight.copy_(torch.eye(12)[order])
    vit.final_norm = torch.nn.Identity()
    x = torch.randn(2, channels, 8, 8)
    torch.testing.assert_close(vit(x, 0).sample, x)
