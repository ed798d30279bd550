import pytest
import torch

from hfgen import VAEModel


def images(batch=3, channels=1, size=28, seed=0):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


CONFIGS = [
    dict(architecture="mlp", hidden_dims=[32], latent_dim=4),
    dict(architecture="conv", hidden_dims=[8, 16], latent_dim=4),
    dict(architecture="conv", hidden_dims=[8, 16], latent_dim=4, sample_size=32, in_channels=3, likelihood="gaussian",
         learn_decoder_std=True),
    dict(architecture="mlp", hidden_dims=[32], latent_dim=4, num_classes=10),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_shapes_and_elbo_terms(config):
    vae = VAEModel(**config)
    x = images(3, vae.config.in_channels, vae.config.sample_size)
    labels = torch.tensor([0, 5, 9]) if vae.config.num_classes else None
    out = vae(x, labels, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert out.sample.shape == x.shape
    assert out.latents.shape == (2, 3, 4)
    for term in (out.log_likelihood, out.kl, out.elbo):
        assert term.shape == (3,)
    torch.testing.assert_close(out.elbo, out.log_likelihood - out.kl)
    assert torch.all(out.kl >= 0)
    decoded = vae.decode(torch.zeros(3, 4), labels).sample
    assert decoded.shape == x.shape
    if vae.config.likelihood == "bernoulli":
        assert decoded.min() >= 0 and decoded.max() <= 1


@pytest.mark.parametrize("config", CONFIGS)
def test_save_load_round_trip_gives_identical_outputs(config, tmp_path):
    vae = VAEModel(**config)
    vae.save_pretrained(tmp_path)
    loaded = VAEModel.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(vae.config)
    x = images(2, vae.config.in_channels, vae.config.sample_size)
    labels = torch.tensor([1, 2]) if vae.config.num_classes else None
    a = vae(x, labels, generator=torch.Generator().manual_seed(0))
    b = loaded(x, labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.elbo, b.elbo) and torch.equal(a.sample, b.sample)


def test_dict_and_tuple_outputs_agree():
    vae = VAEModel(hidden_dims=[16], latent_dim=3)
    x = images(2)
    as_dict = vae(x, generator=torch.Generator().manual_seed(0))
    as_tuple = vae(x, generator=torch.Generator().manual_seed(0), return_dict=False)
    for a, b in zip(as_dict.to_tuple(), as_tuple):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert torch.equal(vae.decode(torch.ones(2, 3)).sample, vae.decode(torch.ones(2, 3), return_dict=False)[0])
    assert torch.equal(vae.encode(x).latent_dist.mean, vae.encode(x, return_dict=False)[0].mean)


def test_monte_carlo_kl_estimator_agrees_with_analytic_on_average():
    vae = VAEModel(hidden_dims=[16], latent_dim=3)
    x = images(4)
    analytic = vae(x, kl_estimator="analytic").kl
    monte_carlo = vae(x, kl_estimator="monte_carlo", num_samples=20000, generator=torch.Generator().manual_seed(0)).kl
    torch.testing.assert_close(monte_carlo, analytic, rtol=0.05, atol=0.05)


def test_cvae_decoder_uses_the_label():
    cvae = VAEModel(hidden_dims=[16], latent_dim=3, num_classes=10)
    z = torch.zeros(2, 3)
    decoded = cvae.decode(z, torch.tensor([0, 1])).sample
    assert not torch.allclose(decoded[0], decoded[1])


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(latent_dim=0), "latent_dim"),
        (dict(likelihood="poisson"), "likelihood"),
        (dict(architecture="resnet"), "architecture"),
        (dict(architecture="conv", hidden_dims=[8, 8, 8]), "divisible"),
        (dict(hidden_dims=[]), "hidden_dims"),
        (dict(num_classes=-1), "num_classes"),
        (dict(likelihood="gaussian", decoder_std=0.0), "decoder_std"),
        (dict(num_classes=3, id2label={"0": "a"}), "id2label"),
    ],
)
def test_invalid_config_values_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        VAEModel(**config)


def test_bad_images_and_labels_are_refused_with_the_argument_named():
    vae = VAEModel(hidden_dims=[16], latent_dim=3)
    cvae = VAEModel(hidden_dims=[16], latent_dim=3, num_classes=10)
    with pytest.raises(ValueError, match=r"`sample` must have shape \(B, 1, 28, 28\).*\(2, 3, 28, 28\)"):
        vae(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="`sample` must have shape"):
        vae(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match="`sample` must be a torch.Tensor"):
        vae([[0.0]])
    with pytest.raises(ValueError, match="`class_labels`.*unconditional"):
        vae(images(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`class_labels` are required"):
        cvae(images(2))
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 9\]"):
        cvae(images(2), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="one label per example"):
        cvae(images(2), torch.tensor([3]))
    with pytest.raises(ValueError, match="kl_estimator"):
        vae(images(2), kl_estimator="sampled")
    with pytest.raises(ValueError, match="num_samples"):
        vae(images(2), num_samples=0)
    with pytest.raises(ValueError, match="`latents` must have shape"):
        vae.decode(torch.zeros(2, 4))
