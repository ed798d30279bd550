"""The Gaussian mixture fitted to a VAE's aggregated posterior, its pipeline component and `--latent_sampler gmm`."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import quick_vae_args
from hub_fixtures import hub_server  # noqa: F401  (the fixture)

from hfgen import AutoPipeline, VAEModel, VAEPipeline
from hfgen.models import GaussianMixtureSampler

# the mixture the fit must recover: 2-d, weights 0.3 / 0.7, unequal full covariances
TRUE_WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
TRUE_MEANS = torch.tensor([[-3.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
TRUE_COVARIANCES = torch.tensor([[[1.0, 0.6], [0.6, 0.8]], [[0.5, -0.2], [-0.2, 1.5]]], dtype=torch.float64)


def draw_true_mixture(num: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    components = torch.multinomial(TRUE_WEIGHTS, num, replacement=True, generator=generator)
    eps = torch.randn(num, 2, generator=generator, dtype=torch.float64)
    return TRUE_MEANS[components] + (torch.linalg.cholesky(TRUE_COVARIANCES)[components] @ eps[..., None])[..., 0]


def true_mixture_moments() -> tuple[torch.Tensor, torch.Tensor]:
    mean = (TRUE_WEIGHTS[:, None] * TRUE_MEANS).sum(0)
    centred = TRUE_MEANS - mean
    second = TRUE_COVARIANCES + centred[:, :, None] * centred[:, None, :]
    return mean, (TRUE_WEIGHTS[:, None, None] * second).sum(0)


def fitted_sampler(latent_dim: int, num_components: int = 3, seed: int = 0, **kwargs) -> GaussianMixtureSampler:
    latents = torch.randn(300, latent_dim, generator=torch.Generator().manual_seed(seed)) * 2 + 1
    return GaussianMixtureSampler(latent_dim=latent_dim, num_components=num_components, **kwargs).fit(latents)


def tiny_vae(**kwargs) -> VAEModel:
    torch.manual_seed(0)
    return VAEModel(**{"hidden_dims": [16], "latent_dim": 4, **kwargs})


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_fit_recovers_a_known_two_component_mixture_and_samples_match_its_moments(covariance_type):
    sampler = GaussianMixtureSampler(latent_dim=2, num_components=2, covariance_type=covariance_type)
    sampler.fit(draw_true_mixture(4000), seed=0)
    assert int(sampler.num_fit_samples) == 4000
    order = sampler.means[:, 0].argsort()  # components come back in any order
    weights, means = sampler.weights[order].double(), sampler.means[order].double()
    torch.testing.assert_close(weights, TRUE_WEIGHTS, atol=0.03, rtol=0)
    torch.testing.assert_close(means, TRUE_MEANS, atol=0.12, rtol=0)
    scales = sampler.scales[order].double()
    if covariance_type == "full":
        torch.testing.assert_close(scales @ scales.transpose(1, 2), TRUE_COVARIANCES, atol=0.12, rtol=0)
    else:  # the diagonal model recovers the variances
        torch.testing.assert_close(scales**2, torch.diagonal(TRUE_COVARIANCES, dim1=1, dim2=2), atol=0.12, rtol=0)

    samples = sampler.sample(20000, generator=torch.Generator().manual_seed(1)).double()
    assert samples.shape == (20000, 2) and samples.dtype == torch.float64
    mean, covariance = true_mixture_moments()
    torch.testing.assert_close(samples.mean(0), mean, atol=0.06, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), covariance, atol=0.15, rtol=0.03)

    # log q(z) is a normalised density: its mean over held-out draws matches the true mixture's within a bit
    held_out = draw_true_mixture(2000, seed=2)
    true_log_prob = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=TRUE_WEIGHTS),
        torch.distributions.MultivariateNormal(TRUE_MEANS, covariance_matrix=TRUE_COVARIANCES)).log_prob(held_out)
    gap = (true_log_prob - sampler.log_prob(held_out)).mean().item()
    assert 0 <= gap < (0.03 if covariance_type == "full" else 0.3)


def test_samples_are_reproducible_for_a_generator_and_do_not_depend_on_the_batch():
    sampler = fitted_sampler(5)
    a = sampler.sample(6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, sampler.sample(6, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, sampler.sample(6, generator=torch.Generator().manual_seed(1)))
    per_sample = sampler.sample(6, generator=[torch.Generator().manual_seed(i) for i in range(6)])
    one_by_one = torch.cat([sampler.sample(1, generator=[torch.Generator().manual_seed(i)]) for i in range(6)])
    assert torch.equal(per_sample, one_by_one)


def test_pipeline_with_a_sampler_saves_loads_and_gives_the_same_samples(tmp_path):
    vae = tiny_vae()
    pipe = VAEPipeline(vae, latent_sampler=fitted_sampler(4))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["latent_sampler"] == ["hfgen.models", "GaussianMixtureSampler"]
    assert (tmp_path / "latent_sampler" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = VAEPipeline.from_pretrained(tmp_path)
    for name, buffer in pipe.latent_sampler.state_dict().items():
        assert torch.equal(buffer, loaded.latent_sampler.state_dict()[name]), name
    fitted = pipe(5, generator=torch.manual_seed(0), output_type="pt").images  # a saved sampler is the default
    assert torch.equal(fitted, loaded(5, generator=torch.manual_seed(0), output_type="pt").images)
    explicit = loaded(5, latent_sampler="fitted", generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(fitted, explicit)
    assert torch.equal(fitted, AutoPipeline.from_pretrained(tmp_path)(5, generator=torch.manual_seed(0),
                                                                      output_type="pt").images)
    # "prior" is exactly the pipeline without a sampler
    prior = loaded(5, latent_sampler="prior", generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(prior, VAEPipeline(vae)(5, generator=torch.manual_seed(0), output_type="pt").images)
    assert not torch.allclose(prior, fitted)
    # the fitted latents are the sampler's draws, decoded
    latents = loaded.latent_sampler.sample(5, generator=torch.manual_seed(0))
    torch.testing.assert_close(fitted, vae.decode(latents).sample, rtol=0, atol=1e-6)


def test_spatial_latents_are_flattened_for_the_sampler(tmp_path):
    vae = tiny_vae(sample_size=8, architecture="conv", hidden_dims=[4], latent_channels=2)  # latents (2, 4, 4)
    pipe = VAEPipeline(vae, latent_sampler=fitted_sampler(32, covariance_type="diag"))
    images = pipe(3, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (3, 1, 8, 8)
    assert pipe.sample_latents(3, generator=torch.manual_seed(0)).shape == (3, 2, 4, 4)
    with pytest.raises(ValueError, match=r"latent_dim 4, but the VAE's latents \(2, 4, 4\) flatten to 32"):
        VAEPipeline(vae, latent_sampler=fitted_sampler(4))


def test_folder_saved_without_a_sampler_still_loads_with_the_same_prior_samples():
    import pathlib

    folder = pathlib.Path(__file__).parent / "fixtures" / "vae-pipeline-0.1.0"
    pipe = VAEPipeline.from_pretrained(folder)
    assert pipe.latent_sampler is None
    expected = np.load(folder / "expected_samples_seed0.npy")
    for choice in (None, "prior"):
        images = pipe(2, latent_sampler=choice, generator=torch.manual_seed(0), output_type="np").images
        np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)  # float32 rounding differs between CPUs


def test_push_to_hub_then_from_pretrained_keeps_the_sampler(hub_server):  # noqa: F811
    pipe = VAEPipeline(tiny_vae(), latent_sampler=fitted_sampler(4))
    pipe.push_to_hub("user/vae-with-sampler")
    assert "latent_sampler/config.json" in hub_server.files("user/vae-with-sampler")
    loaded = VAEPipeline.from_pretrained("user/vae-with-sampler")
    assert isinstance(loaded.latent_sampler, GaussianMixtureSampler)
    a, b = (p(4, generator=torch.manual_seed(0), output_type="pt").images for p in (pipe, loaded))
    assert torch.equal(a, b)


def test_bad_pipeline_and_sampler_input_is_a_clear_error():
    pipe = VAEPipeline(tiny_vae())
    with pytest.raises(ValueError, match='`latent_sampler="fitted"` needs a fitted latent sampler, but this pipeline '
                                         'has none'):
        pipe(2, latent_sampler="fitted")
    with pytest.raises(ValueError, match=r"`latent_sampler` must be one of \['fitted', 'prior'\], got 'gmm'"):
        pipe(2, latent_sampler="gmm")
    with_sampler = VAEPipeline(tiny_vae(), latent_sampler=fitted_sampler(4))
    with pytest.raises(ValueError, match="`latents` are decoded as they are given"):
        with_sampler(2, latents=torch.zeros(2, 4), latent_sampler="fitted")
    with pytest.raises(ValueError, match="one per image"):
        with_sampler(3, generator=[torch.manual_seed(0)])
    with pytest.raises(ValueError, match="`vae` is conditional"):
        VAEPipeline(tiny_vae(num_classes=3), latent_sampler=fitted_sampler(4))
    with pytest.raises(ValueError, match="`latent_sampler` is not fitted"):
        VAEPipeline(tiny_vae(), latent_sampler=GaussianMixtureSampler(latent_dim=4))
    with pytest.raises(TypeError, match="must be a GaussianMixtureSampler or None"):
        VAEPipeline(tiny_vae(), latent_sampler="fitted")

    unfitted = GaussianMixtureSampler(latent_dim=3, num_components=4)
    with pytest.raises(ValueError, match="not fitted"):
        unfitted.sample(2)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(N, 3\)"):
        unfitted.fit(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="fewer than the 4 components"):
        unfitted.fit(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="finite"):
        unfitted.fit(torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match="`covariance_type` must be one of"):
        GaussianMixtureSampler(latent_dim=3, covariance_type="spherical")
    with pytest.raises(ValueError, match="`num_components` must be a positive integer"):
        GaussianMixtureSampler(latent_dim=3, num_components=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--latent_sampler", "gmm", "--latent_sampler_components", "0"],
         "`--latent_sampler_components` must be a positive integer, got 0"),
        (["--latent_sampler", "gmm", "--latent_sampler_components", "5000"],
         "`--latent_sampler_components` 5000 exceeds the 4000 training images"),
        (["--latent_sampler", "kde"], "invalid choice: 'kde'"),
        (["--latent_sampler", "gmm", "--conditional"], "`--latent_sampler gmm` fits q\\(z\\) of an unconditional VAE"),
    ],
)
def test_bad_latent_sampler_flags_are_clear_errors(tmp_path, flags, message):
    from hfgen.training.train_vae import main

    with pytest.raises(ValueError, match=message):
        main(quick_vae_args(tmp_path, *flags))


@pytest.fixture(scope="module")
def gmm_vae_dir(tmp_path_factory):
    """A VAE trained for 3 epochs with --latent_sampler gmm, grids every epoch; records when the mixture was fitted."""
    from hfgen.training.train_vae import VAETrainer, main

    output_dir = tmp_path_factory.mktemp("gmm-vae") / "out"
    fits = []
    original = VAETrainer.fit_latent_sampler

    def counted(self, vae):
        fits.append((self.global_step, self.max_train_steps))
        return original(self, vae)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VAETrainer, "fit_latent_sampler", counted)
        main(quick_vae_args(output_dir, "--num_epochs", "3", "--save_images_epochs", "1", "--latent_sampler", "gmm",
                            "--latent_sampler_components", "8"))
    return output_dir, fits


def test_training_fits_the_mixture_once_at_the_end_and_reports_both_fds(gmm_vae_dir):
    folder, fits = gmm_vae_dir
    assert len(fits) == 1 and fits[0][0] == fits[0][1]  # grids before the end sampled the prior; fitted once
    assert len(list((folder / "samples").iterdir())) == 3
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"fd", "fd_prior", "test_negative_elbo"} <= set(metrics)
    assert metrics["fd"] < metrics["fd_prior"]
    card = (folder / "README.md").read_text()
    assert "| fd_prior |" in card and "8-component Gaussian mixture" in card
    pipe = VAEPipeline.from_pretrained(folder)
    assert pipe.latent_sampler.config.num_components == 8
    assert int(pipe.latent_sampler.num_fit_samples) == 4000  # one latent per training digit


def test_fitted_sampler_has_a_lower_fd_than_the_prior_on_the_digits(gmm_vae_dir, mnist_test):
    from hfgen.evaluation import evaluate_pipeline

    pipe = VAEPipeline.from_pretrained(gmm_vae_dir[0])
    fd = {choice: evaluate_pipeline(pipe, mnist_test, 300, likelihood=False, seed=1,
                                    pipeline_kwargs={"latent_sampler": choice})["fd"]
          for choice in ("fitted", "prior")}
    print(f"FD of 300 samples, 3-epoch VAE: fitted {fd['fitted']:.1f}, prior {fd['prior']:.1f}")
    assert math.isfinite(fd["fitted"]) and fd["fitted"] < 0.8 * fd["prior"]
