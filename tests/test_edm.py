"""EDM (Karras et al., 2022; docs/maths.md §6.10): the preconditioning against its closed forms and diffusers' EDM
schedulers, the exact Gaussian case sampled by the pipeline, and a short training run that learns and round-trips."""

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from helpers import image_to_image_distances, quick_training_args, trained_and_untrained_pixel_fd

from hfgen import AutoPipeline, DDPMPipeline
from hfgen.data import load_image_dataset
from hfgen.objectives import EDMObjective, dpm_solver, edm_preconditioning, objective_of
from hfgen.training.train_ddpm import main

DIGITS = ["--dataset_name", "hfgen:digits", "--resolution", "8", "--feature_extractor", "none"]
SIGMAS = torch.tensor([0.002, 0.05, 0.3, 1.0, 4.0, 80.0])


# ----- the maths -------------------------------------------------------------------------------------------------


def test_preconditioning_is_diffusers_and_gives_unit_variance_inputs_and_targets():
    sigma_data = 0.5
    c_skip, c_out, c_in, c_noise = edm_preconditioning(SIGMAS, sigma_data)
    scheduler = EDMEulerScheduler(sigma_data=sigma_data)
    sample, output = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(scheduler.precondition_outputs(sample, output, SIGMAS), c_skip * sample + c_out * output)
    torch.testing.assert_close(scheduler.precondition_inputs(sample, SIGMAS), c_in * sample)
    torch.testing.assert_close(scheduler.precondition_noise(SIGMAS), c_noise)
    # for data of std sigma_data: Var[c_in x_sigma] = 1 and Var[(x0 - c_skip x_sigma) / c_out] = 1 (Karras et al. B.6)
    torch.testing.assert_close(c_in ** 2 * (sigma_data ** 2 + SIGMAS ** 2), torch.ones(6))
    torch.testing.assert_close(((1 - c_skip) ** 2 * sigma_data ** 2 + c_skip ** 2 * SIGMAS ** 2) / c_out ** 2,
                               torch.ones(6))


def test_corruption_draws_log_normal_levels_and_its_target_gives_back_x0():
    objective = EDMObjective(sigma_data=0.5)
    x0, noise = torch.randn(20000, 1, 2, 2) * 0.5, torch.randn(20000, 1, 2, 2)
    model_input, timesteps, target, weights = objective.corrupt(x0, noise, objective.scheduler(1000))
    log_sigmas = 4 * timesteps  # c_noise = ln(sigma) / 4
    assert weights is None  # lambda(sigma) = 1 / c_out^2 is folded into the target
    assert abs(log_sigmas.mean() - objective.p_mean) < 0.03 and abs(log_sigmas.std() - objective.p_std) < 0.03
    _, _, c_in, _ = edm_preconditioning(log_sigmas.exp(), 0.5)
    x_sigma = model_input / c_in.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_sigma, x0 + log_sigmas.exp().reshape(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(objective.predict_x0(x_sigma, timesteps, target, None), x0, atol=1e-4, rtol=1e-4)


def test_the_regression_target_at_one_level_is_the_optimal_denoiser_for_gaussian_data():
    """x0 ~ N(0, s^2): E[x0 | x_sigma] = s^2 / (s^2 + sigma^2) x_sigma, so the least-squares slope of the target on
    x_sigma is (s^2 / (s^2 + sigma^2) - c_skip) / c_out, with sigma_data = 0.5 != s."""
    s, sigma = 1.0, 0.7
    objective = EDMObjective(sigma_data=0.5, p_mean=math.log(sigma), p_std=1e-9)
    generator = torch.Generator().manual_seed(0)
    x0, noise = s * torch.randn(200000, 1, 1, 1, generator=generator), torch.randn(200000, 1, 1, 1, generator=generator)
    model_input, _, target, _ = objective.corrupt(x0, noise, objective.scheduler(1000))
    x_sigma = x0 + sigma * noise
    slope = (target * x_sigma).sum() / (x_sigma ** 2).sum()
    c_skip, c_out, _, _ = edm_preconditioning(torch.tensor(sigma), 0.5)
    assert abs(slope - (s ** 2 / (s ** 2 + sigma ** 2) - c_skip) / c_out) < 0.01


class GaussianDenoiser(UNet2DModel):
    """The exact EDM network for x0 ~ N(0, s^2) per pixel: F = (D* - c_skip x) / c_out with D* = s^2 / (s^2 + sigma^2) x,
    called as the pipeline calls it (input c_in x, timestep c_noise)."""

    def __init__(self, data_std: float, sigma_data: float):
        super().__init__(sample_size=1, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                         down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8)
        self.data_std, self.sigma_data = data_std, sigma_data

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        sigma = (4 * torch.as_tensor(timestep, dtype=torch.float64)).exp()
        c_skip, c_out, c_in, _ = edm_preconditioning(sigma, self.sigma_data)
        x = sample.double() / c_in
        denoised = self.data_std ** 2 / (self.data_std ** 2 + sigma ** 2) * x
        return UNet2DOutput(sample=((denoised - c_skip * x) / c_out).to(sample.dtype))


@pytest.mark.parametrize("sampler, steps", [("euler", 100), ("dpm_solver", 25)])
def test_the_exact_gaussian_denoiser_sampled_by_the_pipeline_reproduces_the_data_std(sampler, steps):
    data_std, sigma_data = 1.0, 0.5
    scheduler = EDMObjective(sigma_data=sigma_data).scheduler(1000)
    if sampler == "dpm_solver":
        scheduler = dpm_solver(scheduler)
        assert type(scheduler) is EDMDPMSolverMultistepScheduler
    pipe = DDPMPipeline(GaussianDenoiser(data_std, sigma_data), scheduler, objective="edm")
    pipe.set_progress_bar_config(disable=True)
    # the pipeline's own loop from x_T ~ N(0, I) (images would map [-1, 1] to [0, 1] and clamp: the raw x_0 instead)
    final = pipe.reverse_process(torch.randn(20000, 1, 1, 1, generator=torch.manual_seed(1)), None, 1.0, steps, None)
    assert abs(final.std() - data_std) < 0.03 and abs(final.mean()) < 0.03, (final.mean(), final.std())


# ----- a short run that learns on the 8x8 digits -----------------------------------------------------------------


@pytest.fixture(scope="module")
def edm_dir(tmp_path_factory):
    """150 steps on the 8x8 digits (~10 s)."""
    output_dir = tmp_path_factory.mktemp("edm") / "out"
    main(quick_training_args(output_dir, *DIGITS, "--objective", "edm", "--block_out_channels", "16", "32",
                             "--max_train_steps", "150", "--train_batch_size", "128", "--num_inference_steps", "10"))
    return output_dir


def test_short_training_lowers_fd_far_below_the_untrained_denoisers(edm_dir):
    trained_fd, untrained_fd = trained_and_untrained_pixel_fd(edm_dir, "edm")
    assert trained_fd < 0.2 * untrained_fd, (trained_fd, untrained_fd)


def test_the_folder_saves_edm_euler_with_the_measured_sigma_data_and_round_trips(edm_dir, tmp_path):
    pipe = AutoPipeline.from_pretrained(edm_dir)
    assert type(pipe) is DDPMPipeline and type(pipe.scheduler) is EDMEulerScheduler
    assert pipe.objective == "edm" and objective_of(pipe.scheduler) is EDMObjective
    train = load_image_dataset("hfgen:digits", "train", resolution=8)
    # sigma_data: the std of the first 1,024 training images in [-1, 1]
    assert pipe.scheduler.config.sigma_data == pytest.approx(float((train.images[:1024] * 2 - 1).std()), rel=1e-4)
    pipe.save_pretrained(tmp_path / "copy")

    def images(pipeline):
        return pipeline(4, num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt").images

    assert torch.equal(images(DDPMPipeline.from_pretrained(tmp_path / "copy")), images(pipe))
    pipe.scheduler = dpm_solver(pipe.scheduler)  # the fast sampler on the same levels
    assert images(pipe).shape == (4, 1, 8, 8)
    card = (edm_dir / "README.md").read_text()
    assert "tags:\n- hfgen\n- edm" in card and "EDM model" in card and "Likelihood: not reported" in card


def test_a_ddpm_scheduler_is_refused_for_an_edm_denoiser(edm_dir):
    from diffusers import DDPMScheduler

    pipe = DDPMPipeline.from_pretrained(edm_dir)
    pipe.scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match="objective 'edm'.*EDMEulerScheduler"):
        pipe(1, num_inference_steps=2)


@pytest.mark.parametrize("flags, message", [
    (["--objective", "edm", "--snr_gamma", "5"], "`--snr_gamma` is an option of `--objective ddpm`"),
    (["--objective", "edm", "--sigma_data", "0"], "`--sigma_data` must be a finite number > 0"),
    (["--sigma_data", "0.5"], "`--sigma_data` is an option of `--objective edm`"),
])
def test_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(quick_training_args(tmp_path / "out", *DIGITS, *flags, "--max_train_steps", "1"))


def test_image_to_image_keeps_more_of_a_test_digit_as_strength_falls(edm_dir):
    distances = image_to_image_distances(DDPMPipeline.from_pretrained(edm_dir),
                                         load_image_dataset("hfgen:digits", "test", resolution=8))
    assert distances == sorted(distances) and distances[0] < distances[-1] / 2, distances


def test_inpainting_the_right_half_of_test_digits_completes_their_class(edm_dir):
    """The left half of 100 test digits kept, the right half regenerated: the classifier reads the true class far more
    often than chance (0.1), and more often than from the left half alone (right half blank)."""
    from hfgen.prompt_following import digit_classifier_for

    train, test = (load_image_dataset("hfgen:digits", split, resolution=8) for split in ("train", "test"))
    classifier = digit_classifier_for(train, test)
    images = torch.stack([test[index][0] for index in range(100)])
    labels = torch.tensor([int(test[index][1]) for index in range(100)])
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    pipe = DDPMPipeline.from_pretrained(edm_dir)
    pipe.set_progress_bar_config(disable=True)
    completed = pipe(image=images, mask_image=mask, num_inference_steps=10, generator=torch.manual_seed(0),
                     output_type="pt").images
    assert torch.equal(completed[..., :4], images[..., :4])
    with torch.no_grad():
        accuracy = (classifier(completed).logits.argmax(1) == labels).float().mean()
        left_half_only = (classifier(images * (1 - mask)).logits.argmax(1) == labels).float().mean()
    assert accuracy > 0.25 and accuracy > left_half_only, (accuracy, left_half_only)
