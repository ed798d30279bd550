import numpy as np
import pytest
import torch

from hfgen import AutoPipeline, ConditionalPipeline, Discriminator, GANPipeline, Generator
from hfgen.pipelines.pipeline_utils import read_model_index


@pytest.fixture
def gan_pipeline():
    torch.manual_seed(0)
    return GANPipeline(Generator(latent_dim=8, base_channels=8).eval(), Discriminator(base_channels=8).eval())


@pytest.fixture
def cgan_pipeline():
    torch.manual_seed(0)
    id2label = {str(i): str(i) for i in range(10)}
    return ConditionalPipeline(Generator(latent_dim=8, base_channels=8, num_classes=10, id2label=id2label).eval(),
                               Discriminator(base_channels=8, num_classes=10).eval())


def test_round_trip_keeps_images_and_the_optional_discriminator(gan_pipeline, tmp_path):
    gan_pipeline.save_pretrained(tmp_path)
    index = read_model_index(str(tmp_path / "model_index.json"))  # as hfgen reads the saved code's entries
    assert index["generator"] == ["hfgen.models", "Generator"] and index["discriminator"] == ["hfgen.models", "Discriminator"]
    loaded = GANPipeline.from_pretrained(tmp_path)
    a = gan_pipeline(4, generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(a, loaded(4, generator=torch.manual_seed(0), output_type="pt").images)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(gan_pipeline.discriminator(x).logits, loaded.discriminator(x).logits, rtol=1e-6, atol=1e-6)
    assert isinstance(AutoPipeline.from_pretrained(tmp_path), GANPipeline)


def test_pipeline_without_discriminator(tmp_path):
    pipe = GANPipeline(Generator(latent_dim=8, base_channels=8).eval())
    pipe.save_pretrained(tmp_path)
    assert GANPipeline.from_pretrained(tmp_path).discriminator is None


def test_determinism_and_output_types(gan_pipeline):
    a = gan_pipeline(3, generator=torch.manual_seed(5), output_type="np").images
    b = gan_pipeline(3, generator=torch.manual_seed(5), output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 28, 28, 1) and 0 <= a.min() and a.max() <= 1
    pil = gan_pipeline(3, generator=torch.manual_seed(5)).images
    assert pil[0].size == (28, 28)
    (pt,) = gan_pipeline(3, generator=torch.manual_seed(5), output_type="pt", return_dict=False)
    # the generator's [-1, 1] is mapped to [0, 1] in the one shared conversion
    z = torch.randn(3, 8, generator=torch.manual_seed(5))
    torch.testing.assert_close(pt, (gan_pipeline.generator(z).sample + 1) / 2)


def test_latent_interpolation(gan_pipeline):
    z = torch.randn(2, 8, generator=torch.manual_seed(0))
    path = gan_pipeline.interpolate(5, latents=z, output_type="pt").images
    assert path.shape == (5, 1, 28, 28)
    ends = gan_pipeline(2, latents=z, output_type="pt").images
    torch.testing.assert_close(path[[0, -1]], ends)
    drawn = gan_pipeline.interpolate(3, generator=torch.manual_seed(1), output_type="pt").images
    assert torch.equal(drawn, gan_pipeline.interpolate(3, generator=torch.manual_seed(1), output_type="pt").images)


def test_conditional_gan_pipeline(cgan_pipeline, tmp_path):
    images = cgan_pipeline(class_labels=[0, "3", 9], generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (3, 1, 28, 28)
    cgan_pipeline.save_pretrained(tmp_path)
    loaded = AutoPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, ConditionalPipeline) and isinstance(loaded.model, Generator)
    assert torch.equal(images, loaded(class_labels=[0, 3, 9], generator=torch.manual_seed(0), output_type="pt").images)
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 9\]"):
        cgan_pipeline(class_labels=[10])


def test_wrong_pipeline_for_the_generator():
    with pytest.raises(ValueError, match="conditional.*use ConditionalPipeline"):
        GANPipeline(Generator(latent_dim=8, base_channels=8, num_classes=10))
    with pytest.raises(ValueError, match="`class_labels`.*unconditional"):
        GANPipeline(Generator(latent_dim=8, base_channels=8))(2, class_labels=[1, 2])
