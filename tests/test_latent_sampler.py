"""The Gaussian mixture fitted to a VAE's aggregated posterior, its pipeline component and `--latent_sampler gmm`."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import quick_vae_args
from hub_fixtures import hub_server  # noqa: F401  (the fixture)

from hfgen import AutoPipeline, ConditionalPipeline, Generator, VAEModel, VAEPipeline
from hfgen.models import GaussianMixtureSampler
from hfgen.pipelines.pipeline_utils import read_model_index

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


CLASS_MEANS = torch.tensor([[-6.0, 0.0], [6.0, 0.0], [0.0, 6.0]], dtype=torch.float64)


def labelled_clusters(per_class: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated 2-d classes: class y is N(CLASS_MEANS[y], 0.5^2 I); -> latents (3n, 2), labels (3n,)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    return CLASS_MEANS[labels] + 0.5 * torch.randn(len(labels), 2, generator=generator, dtype=torch.float64), labels


def fitted_class_sampler(latent_dim: int = 2, num_classes: int = 3, **kwargs) -> GaussianMixtureSampler:
    latents, labels = labelled_clusters()
    if latent_dim != 2:
        latents = torch.randn(len(labels), latent_dim, generator=torch.Generator().manual_seed(0))
    return GaussianMixtureSampler(latent_dim=latent_dim, num_components=2, num_classes=num_classes,
                                  **kwargs).fit(latents, class_labels=labels % num_classes)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_a_per_class_mixture_samples_each_class_near_its_own_latents(covariance_type):
    sampler = fitted_class_sampler(covariance_type=covariance_type)
    assert sampler.weights.shape == (3, 2) and sampler.means.shape == (3, 2, 2)
    assert int(sampler.num_fit_samples) == 1200
    latents, fitted_labels = labelled_clusters()
    labels = torch.tensor([2, 0, 1]).repeat(3000)
    samples = sampler.sample(9000, generator=torch.Generator().manual_seed(1), class_labels=labels).double()
    for label in range(3):  # each class's draws have the moments of that class's latents
        of_class, fitted_to = samples[labels == label], latents[fitted_labels == label]
        torch.testing.assert_close(of_class.mean(0), fitted_to.mean(0), atol=0.04, rtol=0)
        torch.testing.assert_close(of_class.std(0), fitted_to.std(0), atol=0.04, rtol=0)
    # log q(z|y) is each class's own density: a latent of class 0 is likely under y = 0 and not under y = 1
    held_out, held_out_labels = labelled_clusters(per_class=1000, seed=2)
    own = sampler.log_prob(held_out, class_labels=held_out_labels)
    true = torch.distributions.Independent(torch.distributions.Normal(CLASS_MEANS[held_out_labels], 0.5), 1)
    assert abs((true.log_prob(held_out) - own).mean().item()) < 0.03  # ~ KL(true || fitted), small
    assert (sampler.log_prob(held_out, class_labels=(held_out_labels + 1) % 3) < own - 50).all()
    # a sample depends on its own generator and label only, not on the batch it is drawn in
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    batch = sampler.sample(4, generator=generators, class_labels=[0, 1, 2, 0])
    one_by_one = torch.cat([sampler.sample(1, generator=[torch.Generator().manual_seed(i)], class_labels=[label])
                            for i, label in enumerate([0, 1, 2, 0])])
    assert torch.equal(batch, one_by_one)


def test_bad_class_labels_for_a_sampler_are_clear_errors():
    latents, labels = labelled_clusters(per_class=5)
    with pytest.raises(ValueError, match="`class_labels` are required: this model is conditional on 3 classes"):
        GaussianMixtureSampler(latent_dim=2, num_components=2, num_classes=3).fit(latents)
    with pytest.raises(ValueError, match="`class_labels` were given, but this model is unconditional"):
        GaussianMixtureSampler(latent_dim=2, num_components=2).fit(latents, class_labels=labels)
    with pytest.raises(ValueError, match="holds 0 latents of class 3, fewer than the 2 components"):
        GaussianMixtureSampler(latent_dim=2, num_components=2, num_classes=4).fit(latents, class_labels=labels)
    with pytest.raises(ValueError, match=r"`class_labels` must hold one label per example \(15\), got 14"):
        GaussianMixtureSampler(latent_dim=2, num_components=2, num_classes=3).fit(latents, class_labels=labels[1:])
    sampler = fitted_class_sampler()
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 2\], got values in \[0, 3\]"):
        sampler.sample(2, class_labels=[0, 3])
    with pytest.raises(ValueError, match="`class_labels` are required"):
        sampler.sample(2)
    with pytest.raises(ValueError, match="`num_classes` must be an integer >= 0, got -1"):
        GaussianMixtureSampler(latent_dim=2, num_classes=-1)


def test_conditional_pipeline_with_a_per_class_sampler_saves_loads_and_samples_each_class(tmp_path):
    cvae = tiny_vae(num_classes=3)
    pipe = ConditionalPipeline(cvae, latent_sampler=fitted_class_sampler(latent_dim=4))
    pipe.save_pretrained(tmp_path)
    loaded = AutoPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, ConditionalPipeline) and loaded.latent_sampler.config.num_classes == 3
    labels = [2, 0, 1, 1]
    fitted = pipe(class_labels=labels, generator=torch.manual_seed(0), output_type="pt").images  # the default
    assert torch.equal(fitted, loaded(class_labels=labels, generator=torch.manual_seed(0), output_type="pt").images)
    # the fitted latents are the class mixtures' draws, decoded with the labels
    latents = pipe.latent_sampler.sample(4, generator=torch.manual_seed(0), class_labels=labels)
    decoded = cvae.decode(latents, torch.tensor(labels)).sample
    torch.testing.assert_close(fitted, decoded, rtol=0, atol=1e-6)
    # "prior" is exactly the pipeline without a sampler
    prior = loaded(class_labels=labels, latent_sampler="prior", generator=torch.manual_seed(0), output_type="pt")
    assert torch.equal(prior.images, ConditionalPipeline(cvae)(class_labels=labels, generator=torch.manual_seed(0),
                                                               output_type="pt").images)
    assert pipe.sample_latents(class_labels=labels).shape == (4, 4)

    with pytest.raises(ValueError, match="`latent_sampler` has num_classes 0, but the VAE has 3"):
        ConditionalPipeline(cvae, latent_sampler=fitted_sampler(4))
    with pytest.raises(ValueError, match="`latent_sampler` has num_classes 3, but the VAE has 0"):
        VAEPipeline(tiny_vae(), latent_sampler=fitted_class_sampler(latent_dim=4))
    generator = Generator(sample_size=8, latent_dim=4, base_channels=4, num_classes=3)
    with pytest.raises(ValueError, match="`latent_sampler` samples a VAE's latents, but the model is a Generator"):
        ConditionalPipeline(generator, latent_sampler=fitted_class_sampler(latent_dim=4))
    with pytest.raises(ValueError, match='`latent_sampler="fitted"` needs a fitted latent sampler'):
        ConditionalPipeline(generator)(class_labels=[0], latent_sampler="fitted")


def test_pipeline_with_a_sampler_saves_loads_and_gives_the_same_samples(tmp_path):
    vae = tiny_vae()
    pipe = VAEPipeline(vae, latent_sampler=fitted_sampler(4))
    pipe.save_pretrained(tmp_path)
    index = read_model_index(str(tmp_path / "model_index.json"))  # as hfgen reads the saved code's entries
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
    with pytest.raises(ValueError, match="`latent_sampler` has num_classes 0, but the VAE has 3"):
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
        (["--latent_sampler", "gmm", "--conditional", "--latent_sampler_components", "500"],
         r"`--latent_sampler_components` 500 exceeds the \d+ training images of class \d"),
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


def test_conditional_training_fits_one_mixture_per_class_and_reports_both_fds(tmp_path):
    from hfgen.training.train_vae import main

    folder = tmp_path / "out"
    main(quick_vae_args(folder, "--num_epochs", "3", "--conditional", "--latent_sampler", "gmm",
                        "--latent_sampler_components", "3"))
    metrics = json.loads((folder / "metrics.json").read_text())
    print(f"FD of 200 samples, 3-epoch CVAE: fitted {metrics['fd']:.1f}, prior {metrics['fd_prior']:.1f}")
    assert metrics["fd"] < metrics["fd_prior"]
    assert "3-component Gaussian mixture per class" in (folder / "README.md").read_text()
    sampler = ConditionalPipeline.from_pretrained(folder).latent_sampler
    assert sampler.config.num_classes == 10 and sampler.weights.shape == (10, 3)
    assert int(sampler.num_fit_samples) == 4000  # one latent per training digit, each fitted to its class
