"""Flow matching (docs/maths.md §6.9): the maths against closed forms, an exact flow integrated by the pipeline, and
short training runs (pixels and latents, U-Net and ViT) that learn, guide, resume and round-trip."""

import json
import logging

import pytest
import torch
from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       ModelMixin)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from helpers import (
    RawSamples, image_to_image_distances, interrupt_then_resume, quick_training_args, same_weights, tiny_unet,
    trained_and_untrained_pixel_fd)
from hub_fixtures import hub_server  # noqa: F401  (the fixture)

from hfgen import AutoPipeline, DDPMPipeline, LatentDiffusionPipeline, VAEModel, VAEPipeline, ViTDenoiser
from hfgen import diffusion, objectives
from hfgen.cli import evaluate
from hfgen.data import load_image_dataset
from hfgen.evaluation import evaluate_pipeline
from hfgen.hub_utils import push_folder
from hfgen.training.train_ddpm import DDPMTrainer, main

DIGITS = ["--dataset_name", "hfgen:digits", "--resolution", "8", "--feature_extractor", "none"]
FLOW = ["--objective", "flow_matching"]


# ----- the maths -------------------------------------------------------------------------------------------------


def test_path_velocity_and_conversions_match_their_closed_forms():
    # one coordinate by hand: x0 = 1, eps = -1 at sigma = 1/4: x = 3/4 - 1/4 = 1/2, v = -2
    x0, eps, sigma = torch.ones(1, 1, 1, 1), -torch.ones(1, 1, 1, 1), torch.tensor([0.25])
    x_t, v = diffusion.flow_sample(x0, eps, sigma), diffusion.flow_velocity(x0, eps)
    assert x_t.item() == 0.5 and v.item() == -2.0
    assert diffusion.flow_predict_x0(x_t, sigma, v).item() == 1.0  # 1/2 - 1/4 (-2)
    assert diffusion.flow_predict_epsilon(x_t, sigma, v).item() == -1.0  # 1/2 + 3/4 (-2)

    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 3, 3, generator=generator), torch.randn(4, 1, 3, 3, generator=generator)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0)
    sigmas = scheduler.sigmas[torch.tensor([0, 10, 50, 99])]  # 1 down to the smallest level
    x_t, v = diffusion.flow_sample(x0, eps, sigmas), diffusion.flow_velocity(x0, eps)
    # the path is diffusers' scale_noise at the timestep sigma * T
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, sigmas * 100, eps))
    torch.testing.assert_close(diffusion.flow_predict_x0(x_t, sigmas, v), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(diffusion.flow_predict_epsilon(x_t, sigmas, v), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(diffusion.flow_velocity_from_x0(x_t, sigmas, x0), v, atol=1e-4, rtol=0)
    inner = slice(1, None)  # at sigma = 1, x carries no eps-free information: v from eps needs sigma < 1
    torch.testing.assert_close(diffusion.flow_velocity_from_epsilon(x_t[inner], sigmas[inner], eps[inner]), v[inner],
                               atol=1e-4, rtol=0)
    # the path is straight: one Euler step of the scheduler with the true velocity lands on the path
    scheduler.set_timesteps(4)
    step = scheduler.step(v[:1], scheduler.timesteps[0], diffusion.flow_sample(x0[:1], eps[:1], scheduler.sigmas[:1]))
    torch.testing.assert_close(step.prev_sample, diffusion.flow_sample(x0[:1], eps[:1], scheduler.sigmas[1:2]))


def test_training_levels_are_the_saved_schedulers_and_unknown_schemes_are_refused():
    grid = FlowMatchEulerDiscreteScheduler(num_train_timesteps=10, shift=3.0).sigmas
    torch.manual_seed(0)
    uniform = diffusion.sample_flow_sigmas(grid, 20000)
    counts = torch.stack([(uniform == level).sum() for level in grid])
    assert counts.sum() == 20000 and counts.min() > 1800 and counts.max() < 2200  # each level ~1/10
    noisier = diffusion.sample_flow_sigmas(grid, 5000, "logit_normal", logit_mean=1.5, logit_std=1.0)
    cleaner = diffusion.sample_flow_sigmas(grid, 5000, "logit_normal", logit_mean=-1.5, logit_std=1.0)
    assert set(noisier.tolist()) <= set(grid.tolist()) and noisier.mean() > uniform.mean() > cleaner.mean()
    # diffusers' compute_density_for_timestep_sampling draws uniformly for any name it does not know
    with pytest.raises(ValueError, match="`weighting_scheme` must be one of \\('uniform', 'logit_normal'\\), got 'cosmap'"):
        diffusion.sample_flow_sigmas(grid, 4, "cosmap")
    with pytest.raises(ValueError, match="does not apply to a flow-matching model"):
        diffusion.variational_bound(lambda x, t, y: x, torch.zeros(1, 1, 2, 2), FlowMatchEulerDiscreteScheduler())


class GaussianVelocity(ModelMixin, ConfigMixin):
    """The exact marginal velocity of §6.9 for data N(mean, cov) in R^2, as a denoiser of (B, 2, 1, 1) samples."""

    @register_to_config
    def __init__(self, mean=(0.5, -1.0), cov=((1.0, 0.6), (0.6, 0.5)), num_train_timesteps=1000, sample_size=1,
                 in_channels=2):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype

    def forward(self, sample, timestep, class_labels=None):
        mean, cov = torch.tensor(self.config.mean, dtype=torch.float64), torch.tensor(self.config.cov, dtype=torch.float64)
        sigma = float(timestep) / self.config.num_train_timesteps  # the flow schedulers' timestep is sigma * T
        x = sample.flatten(1).double()
        c = (1 - sigma) ** 2 * cov + sigma**2 * torch.eye(2, dtype=torch.float64)
        u = (x - (1 - sigma) * mean) @ torch.linalg.solve(c, sigma * torch.eye(2, dtype=torch.float64) - (1 - sigma) * cov).T - mean
        return UNet2DOutput(sample=u.float().reshape(sample.shape))


# the flow samplers, from the trained flow scheduler (shift -> scheduler)
SAMPLERS = {"euler": lambda shift: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
            "heun": lambda shift: FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift),
            "dpm_solver": lambda shift: objectives.dpm_solver(SAMPLERS["euler"](shift))}


def exact_gaussian_flow_samples(sampler: str, steps: int, shift: float, num_samples: int = 20000) -> torch.Tensor:
    """(num_samples, 2) samples of GaussianVelocity's flow, integrated by the pipeline with `sampler`."""
    pipe = RawSamples(GaussianVelocity(), SAMPLERS[sampler](shift), objective="flow_matching")
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_samples, num_inference_steps=steps, generator=torch.manual_seed(0)).flatten(1).double()


# seen: the covariance is within 0.02 at these steps; Euler at 50 steps still shrinks it by ~5%
@pytest.mark.parametrize("sampler, steps", [("euler", 200), ("heun", 20), ("dpm_solver", 50)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_exact_gaussian_flow_integrated_by_the_pipeline_reproduces_mean_and_covariance(sampler, steps, shift):
    samples = exact_gaussian_flow_samples(sampler, steps, shift)
    config = GaussianVelocity().config
    torch.testing.assert_close(samples.mean(0), torch.tensor(config.mean, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(samples.T.cov(), torch.tensor(config.cov, dtype=torch.float64), atol=0.025, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_solver_integrates_the_flow_more_exactly_than_euler_at_equal_steps(shift):
    """The same noise through the same exact flow: DPM-Solver++ (2nd order) lands nearer the flow map's end,
    mean + cov^(1/2) noise, than Euler at 20 denoiser calls each (seen: 18x nearer at shift 1, 3x at shift 3)."""
    config = GaussianVelocity().config
    mean, cov = torch.tensor(config.mean, dtype=torch.float64), torch.tensor(config.cov, dtype=torch.float64)
    noise = torch.randn(2000, 2, 1, 1, generator=torch.manual_seed(0)).flatten(1).double()  # the pipeline's x_T
    # every marginal covariance (1 - sigma)^2 cov + sigma^2 I commutes with cov: the flow map is cov's symmetric root
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    exact = mean + noise @ (eigenvectors * eigenvalues.sqrt() @ eigenvectors.T)
    errors = {sampler: (exact_gaussian_flow_samples(sampler, 20, shift, 2000) - exact).norm(dim=1).mean()
              for sampler in ("euler", "dpm_solver")}
    assert errors["dpm_solver"] < errors["euler"] / 2, errors


# ----- a short run that learns: class-conditional flow matching on the 8x8 digits ---------------------------------


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    """150 steps on the 8x8 digits with label dropout (~15 s); guidance and FD are measured on it."""
    output_dir = tmp_path_factory.mktemp("flow") / "out"
    main(quick_training_args(output_dir, *DIGITS, *FLOW, "--conditional", "--label_dropout", "0.2",
                             "--block_out_channels", "16", "32", "--max_train_steps", "150", "--train_batch_size", "128",
                             "--num_inference_steps", "10"))
    return output_dir


@pytest.fixture(scope="module")
def digits_test():
    return load_image_dataset("hfgen:digits", "test", resolution=8)


def test_short_training_lowers_fd_far_below_the_untrained_denoisers(flow_dir):
    trained_fd, untrained_fd = trained_and_untrained_pixel_fd(flow_dir, "flow_matching")
    assert trained_fd < 0.2 * untrained_fd, (trained_fd, untrained_fd)


def test_guided_samples_are_the_requested_classes(flow_dir):
    from sklearn.linear_model import LogisticRegression

    train = load_image_dataset("hfgen:digits", "train", resolution=8)
    classifier = LogisticRegression(max_iter=500).fit(train.images.flatten(1).numpy(), train.labels.numpy())
    pipe = DDPMPipeline.from_pretrained(flow_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat(20)

    def accuracy(guidance_scale, scheduler_class=FlowMatchEulerDiscreteScheduler):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        images = pipe(class_labels=labels.tolist(), guidance_scale=guidance_scale, num_inference_steps=10,
                      generator=torch.manual_seed(0), output_type="pt").images
        return (classifier.predict(images.flatten(1).numpy()) == labels.numpy()).mean()

    unconditional, guided = accuracy(0.0), accuracy(3.0)  # seen: ~0.07 and 1.0 (chance: 0.1)
    assert unconditional < 0.3 and guided > 0.8, (unconditional, guided)
    assert accuracy(3.0, FlowMatchHeunDiscreteScheduler) > 0.8


def test_the_folder_round_trips_locally_and_through_the_hub(flow_dir, tmp_path, hub_server):  # noqa: F811
    pipe = AutoPipeline.from_pretrained(flow_dir)
    assert type(pipe) is DDPMPipeline and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    # the saved scheduler is the training one: same T and shift
    assert (pipe.scheduler.config.num_train_timesteps, pipe.scheduler.config.shift) == (1000, 1.0)
    assert pipe.objective == "flow_matching" and pipe.config.label_dropout == 0.2

    def images(pipeline):
        return pipeline(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=4,
                        generator=torch.manual_seed(0), output_type="pt").images

    pipe.save_pretrained(tmp_path / "copy")
    expected = images(pipe)
    assert torch.equal(images(DDPMPipeline.from_pretrained(tmp_path / "copy")), expected)
    push_folder(str(flow_dir), "user/flow")
    from_hub = DDPMPipeline.from_pretrained("user/flow")
    assert torch.equal(images(from_hub), expected) and from_hub.objective == "flow_matching"
    card = (flow_dir / "README.md").read_text()
    assert "tags:\n- hfgen\n- flow-matching" in card and "flow-matching model" in card


def test_no_likelihood_is_reported_and_ddpm_only_options_are_refused(flow_dir, digits_test, caplog):
    card, metrics = (flow_dir / "README.md").read_text(), json.loads((flow_dir / "metrics.json").read_text())
    assert "bits_per_dim" not in json.dumps(metrics) and "Likelihood: not applicable" in card
    pipe = DDPMPipeline.from_pretrained(flow_dir)
    with caplog.at_level(logging.WARNING, logger="hfgen.evaluation"):
        assert evaluate_pipeline(pipe, digits_test, num_samples=8, fd=False, vlb_num_images=8) == {}
    assert "test_bits_per_dim: not applicable to a flow-matching model" in caplog.text
    with pytest.raises(ValueError, match="`vlb_num_timesteps` \\(5\\) sets the DDPM variational bound"):
        evaluate([str(flow_dir), "--dataset_name", "hfgen:digits", "--feature_extractor", "none", "--num_samples", "50",
                  "--vlb_num_timesteps", "5"])
    # a scheduler of the other kind would sample noise
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="`scheduler` is a DDIMScheduler, but the denoiser was trained with objective "
                                         "'flow_matching'"):
        pipe(class_labels=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="trained with objective 'ddpm': it samples with a DDPM-family scheduler"):
        DDPMPipeline(tiny_unet(), FlowMatchEulerDiscreteScheduler(), objective="ddpm")


# ----- resume, EMA and the ViT; latent flow matching; flags -------------------------------------------------------


def test_resume_of_a_vit_run_with_ema_is_bit_identical(tmp_path, monkeypatch):
    flags = [*DIGITS, *FLOW, "--weighting_scheme", "logit_normal", "--flow_shift", "3", "--denoiser", "vit",
             "--patch_size", "2", "--vit_hidden_size", "32", "--vit_layers", "2", "--conditional", "--use_ema",
             "--max_train_steps", "10", "--checkpointing_steps", "4", "--train_batch_size", "32",
             "--num_inference_steps", "3", "--eval_num_samples", "20"]
    main(quick_training_args(tmp_path / "full", *flags))
    interrupt_then_resume(monkeypatch, main, DDPMTrainer, quick_training_args(tmp_path / "cut", *flags), 6)
    assert same_weights(tmp_path / "full", tmp_path / "cut", "unet")
    pipe = AutoPipeline.from_pretrained(tmp_path / "cut")
    assert isinstance(pipe.unet, ViTDenoiser) and pipe.scheduler.config.shift == 3.0
    # a checkpoint of one objective does not continue as the other
    with pytest.raises(ValueError, match="written by a 'flow-matching' trainer, not 'ddpm'"):
        main(quick_training_args(tmp_path / "cut", *DIGITS, "--denoiser", "vit", "--patch_size", "2",
                                 "--vit_hidden_size", "32", "--vit_layers", "2", "--conditional", "--use_ema",
                                 "--max_train_steps", "12", "--train_batch_size", "32",
                                 "--resume_from_checkpoint", str(tmp_path / "cut" / "checkpoints" / "checkpoint-8")))


def test_latent_flow_matching_trains_and_samples(tmp_path):
    from hfgen.training.train_ldm import main as ldm_main

    torch.manual_seed(0)
    VAEPipeline(VAEModel(sample_size=32, architecture="conv", hidden_dims=(8, 16), latent_channels=4)).save_pretrained(
        tmp_path / "first-stage")
    ldm_main(quick_training_args(tmp_path / "out", *FLOW, "--vae_path", tmp_path / "first-stage", "--resolution", "32",
                                 "--max_train_samples", "256", "--block_out_channels", "8", "16", "--max_train_steps",
                                 "3", "--train_batch_size", "32", "--num_inference_steps", "2", "--feature_extractor",
                                 "none", "--latent_cache_dir", tmp_path / "cache"))
    pipe = AutoPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe) is LatentDiffusionPipeline and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipe.family == "latent-flow-matching" and "Likelihood: not applicable" in (tmp_path / "out" / "README.md").read_text()
    images = pipe(2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("flags, message", [
    ([*FLOW, "--prediction_type", "epsilon"],
     "`--prediction_type` is an option of `--objective ddpm`, but this run trains with `--objective flow_matching`"),
    ([*FLOW, "--snr_gamma", "5", "--eval_vlb_num_images", "10"],
     "`--snr_gamma`, `--eval_vlb_num_images` are options of `--objective ddpm`"),
    (["--weighting_scheme", "logit_normal"], "`--weighting_scheme` is an option of `--objective flow_matching`, but "
                                             "this run trains with `--objective ddpm`"),
    ([*FLOW, "--weighting_scheme", "cosmap"], "argument --weighting_scheme: invalid choice: 'cosmap'"),
    ([*FLOW, "--logit_std", "2"], "`--logit_mean` and `--logit_std` shape `--weighting_scheme logit_normal`"),
    ([*FLOW, "--weighting_scheme", "logit_normal", "--logit_std", "0"], "`--logit_std` must be a finite number > 0"),
    ([*FLOW, "--flow_shift", "-1"], "`--flow_shift` must be a finite number > 0"),
])
def test_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(quick_training_args(tmp_path, *DIGITS, *flags))


def test_ldm_refuses_a_ddpm_option_before_its_first_stage_trains(tmp_path):
    from hfgen.training.train_ldm import main as ldm_main

    with pytest.raises(ValueError, match="`--beta_schedule` is an option of `--objective ddpm`"):
        ldm_main(quick_training_args(tmp_path, *FLOW, "--beta_schedule", "linear"))
    assert not (tmp_path / "first_stage").exists()


def test_image_to_image_keeps_more_of_a_test_digit_as_strength_falls(flow_dir, digits_test):
    distances = image_to_image_distances(DDPMPipeline.from_pretrained(flow_dir), digits_test)
    assert distances == sorted(distances) and distances[0] < distances[-1] / 2, distances
