import pytest
import torch

from hfgen import Discriminator, Generator
from hfgen.models.gan import dcgan_upsamplings


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3), (64, 3), (32, 1)])
def test_dcgan_sizes_and_channels(size, channels):
    generator = Generator(sample_size=size, channels=channels, latent_dim=8, base_channels=8).eval()
    discriminator = Discriminator(sample_size=size, channels=channels, base_channels=8).eval()
    images = generator(torch.randn(2, 8)).sample
    assert images.shape == (2, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert discriminator(images).logits.shape == (2,)


def test_mlp_nets_for_toy_vectors_and_for_images():
    generator, discriminator = Generator(architecture="mlp", data_dim=2, latent_dim=3), Discriminator(architecture="mlp", data_dim=2)
    assert generator(torch.randn(5, 3)).sample.shape == (5, 2)
    assert discriminator(torch.randn(5, 2)).logits.shape == (5,)
    image_generator = Generator(architecture="mlp", latent_dim=3, base_channels=8)
    assert image_generator(torch.randn(5, 3)).sample.shape == (5, 1, 28, 28)


def test_conditional_nets_use_the_label():
    torch.manual_seed(0)
    generator = Generator(latent_dim=8, base_channels=8, num_classes=10).eval()
    discriminator = Discriminator(base_channels=8, num_classes=10).eval()
    z = torch.randn(1, 8).repeat(2, 1)
    images = generator(z, torch.tensor([3, 7])).sample
    assert not torch.allclose(images[0], images[1])
    same = images[:1].repeat(2, 1, 1, 1)
    with torch.no_grad():
        discriminator.class_embedding.weight.normal_()
    logits = discriminator(same, torch.tensor([3, 7])).logits
    assert not torch.allclose(logits[0], logits[1])  # projection: <embed(y), phi(x)> depends on y


def test_spectral_norm_bounds_the_layers():
    discriminator = Discriminator(base_channels=8, spectral_norm=True)
    discriminator(torch.randn(4, 1, 28, 28))  # power iteration runs in training mode
    weight = discriminator.score.weight
    assert torch.linalg.matrix_norm(weight, ord=2) < 1.05
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules())


@pytest.mark.parametrize("cls", [Generator, Discriminator])
def test_save_load_round_trip(cls, tmp_path):
    torch.manual_seed(0)
    model = cls(base_channels=8, num_classes=10, spectral_norm=True) if cls is Discriminator else cls(base_channels=8, num_classes=10)
    model.eval().save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    labels = torch.tensor([1, 2])
    if cls is Generator:
        z = torch.randn(2, 64)
        assert torch.equal(model(z, labels).sample, loaded(z, labels).sample)
        assert torch.equal(model(z, labels).sample, model(z, labels, return_dict=False)[0])
    else:
        x = torch.rand(2, 1, 28, 28) * 2 - 1
        assert torch.equal(model(x, labels).logits, loaded(x, labels).logits)


def test_dcgan_upsamplings():
    assert dcgan_upsamplings(28) == (7, 2) and dcgan_upsamplings(32) == (4, 3) and dcgan_upsamplings(64) == (4, 4)


@pytest.mark.parametrize(
    "cls, config, message",
    [
        (Generator, dict(sample_size=30), "`sample_size` 30 cannot be produced by the dcgan architecture"),
        (Discriminator, dict(sample_size=100), "`sample_size` 100 cannot be produced"),
        (Generator, dict(architecture="resnet"), "`architecture` must be one of"),
        (Generator, dict(latent_dim=0), "`latent_dim` must be a positive integer"),
        (Generator, dict(data_dim=2), "`data_dim` \\(vector data\\) needs architecture='mlp'"),
        (Discriminator, dict(num_classes=-2), "`num_classes` must be an integer >= 0"),
        (Generator, dict(num_classes=2, id2label={"0": "a"}), "`id2label` must name all 2 classes"),
    ],
)
def test_invalid_configs_are_refused(cls, config, message):
    with pytest.raises(ValueError, match=message):
        cls(**config)


def test_bad_inputs_are_refused():
    generator = Generator(base_channels=8, latent_dim=8)
    conditional = Generator(base_channels=8, latent_dim=8, num_classes=10)
    discriminator = Discriminator(base_channels=8)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(B, 8\)"):
        generator(torch.randn(2, 9))
    with pytest.raises(ValueError, match="`class_labels`.*unconditional"):
        generator(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 9\]"):
        conditional(torch.randn(2, 8), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="`class_labels` are required"):
        conditional(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"`sample` must have shape \(B, 1, 28, 28\)"):
        discriminator(torch.randn(2, 3, 28, 28))
