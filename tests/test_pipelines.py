import json
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch

import hfgen
from hfgen import AutoPipeline, ConditionalPipeline, VAEModel, VAEPipeline
from hfgen.pipelines.pipeline_utils import read_model_index

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ID2LABEL = {str(i): name for i, name in enumerate(["zero", "one", "two"])}


@pytest.fixture
def vae_pipeline():
    torch.manual_seed(0)
    return VAEPipeline(VAEModel(hidden_dims=[32], latent_dim=4))


@pytest.fixture
def cvae_pipeline():
    torch.manual_seed(0)
    return ConditionalPipeline(VAEModel(hidden_dims=[32], latent_dim=4, num_classes=3, id2label=ID2LABEL))


def test_every_model_class_is_recorded_under_the_stable_module(vae_pipeline, cvae_pipeline, tmp_path):
    vae_pipeline.save_pretrained(tmp_path / "vae")
    cvae_pipeline.save_pretrained(tmp_path / "cvae")
    # the folder names its saved code (hfgen.remote_code); hfgen reads that as the stable module
    for folder, component in (("vae", "vae"), ("cvae", "model")):
        index = read_model_index(str(tmp_path / folder / "model_index.json"))
        assert index[component] == ["hfgen.models", "VAEModel"]
    for name in hfgen.models.__all__:
        assert getattr(hfgen.models, name) is not None
    assert hfgen.models.ModelMixin is not None  # diffusers looks the base class up on the recorded module


def test_folder_saved_by_hfgen_0_1_0_still_loads_with_the_same_samples():
    folder = FIXTURES / "vae-pipeline-0.1.0"
    pipe = VAEPipeline.from_pretrained(folder)
    images = pipe(2, generator=torch.manual_seed(0), output_type="np").images
    # saved on another CPU: float32 rounding differs between CPUs (6e-8 seen between an AMD and an Intel machine)
    np.testing.assert_allclose(images, np.load(folder / "expected_samples_seed0.npy"), rtol=0, atol=1e-6)
    assert isinstance(AutoPipeline.from_pretrained(folder), VAEPipeline)


@pytest.mark.parametrize("make", ["vae_pipeline", "cvae_pipeline"])
def test_save_load_round_trip_gives_identical_images(make, request, tmp_path):
    pipe = request.getfixturevalue(make)
    labels = [0, 1, 2] if isinstance(pipe, ConditionalPipeline) else None
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    a = pipe(3, class_labels=labels, generator=torch.manual_seed(0), output_type="pt").images
    b = loaded(3, class_labels=labels, generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(a, b)
    assert torch.equal(a, AutoPipeline.from_pretrained(tmp_path)(3, class_labels=labels, generator=torch.manual_seed(0),
                                                                   output_type="pt").images)


def test_same_generator_same_images_and_other_seed_other_images(vae_pipeline):
    a = vae_pipeline(4, generator=torch.manual_seed(1), output_type="pt").images
    b = vae_pipeline(4, generator=torch.manual_seed(1), output_type="pt").images
    c = vae_pipeline(4, generator=torch.manual_seed(2), output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_output_types_shapes_and_tuple_output(vae_pipeline):
    pt = vae_pipeline(3, generator=torch.manual_seed(0), output_type="pt").images
    np_images = vae_pipeline(3, generator=torch.manual_seed(0), output_type="np").images
    pil = vae_pipeline(3, generator=torch.manual_seed(0), output_type="pil").images
    assert pt.shape == (3, 1, 28, 28) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    assert np_images.shape == (3, 28, 28, 1) and np_images.dtype == np.float32
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 3 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (28, 28) and pil[0].mode == "L"
    np.testing.assert_array_equal(np.asarray(pil[0]), (np_images[0, :, :, 0] * 255).round().astype(np.uint8))
    (as_tuple,) = vae_pipeline(3, generator=torch.manual_seed(0), output_type="pt", return_dict=False)
    assert torch.equal(as_tuple, pt)
    with pytest.raises(ValueError, match="`output_type`"):
        vae_pipeline(1, output_type="tensor")


def test_latents_argument_decodes_the_given_prior_samples(vae_pipeline):
    z = torch.randn(2, 4, generator=torch.manual_seed(0))
    assert torch.equal(vae_pipeline(latents=z, batch_size=2, output_type="pt").images,
                       vae_pipeline(2, generator=torch.manual_seed(0), output_type="pt").images)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(2, 4\)"):
        vae_pipeline(2, latents=torch.zeros(2, 5))


def test_conditional_pipeline_labels_by_id_or_name(cvae_pipeline):
    by_id = cvae_pipeline(class_labels=[0, 2], generator=torch.manual_seed(0), output_type="pt").images
    by_name = cvae_pipeline(class_labels=["zero", "two"], generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(by_id, by_name) and by_id.shape[0] == 2
    repeated = cvae_pipeline(3, class_labels="one", generator=torch.manual_seed(0), output_type="pt").images
    assert repeated.shape[0] == 3
    with pytest.raises(ValueError, match="`class_labels` are required"):
        cvae_pipeline(2)
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 2\]"):
        cvae_pipeline(class_labels=[0, 3])
    with pytest.raises(ValueError, match="'seven'"):
        cvae_pipeline(class_labels=["seven"])
    with pytest.raises(ValueError, match="one label per example"):
        cvae_pipeline(3, class_labels=[0, 1])


def test_unconditional_pipeline_refuses_labels_and_conditional_refuses_unconditional_model(vae_pipeline):
    with pytest.raises(ValueError, match="`class_labels`.*unconditional"):
        vae_pipeline(2, class_labels=[0, 1])
    with pytest.raises(ValueError, match="`model` must be conditional"):
        ConditionalPipeline(VAEModel(hidden_dims=[8], latent_dim=2))
    with pytest.raises(ValueError, match="`batch_size`"):
        vae_pipeline(0)


def test_reconstruct_and_encode_accept_tensors_numpy_and_pil(vae_pipeline, mnist_test):
    x = mnist_test.images[:2]
    from_tensor = vae_pipeline.encode(x)
    from_numpy = vae_pipeline.encode(x.permute(0, 2, 3, 1).numpy())
    from_pil = vae_pipeline.encode([PIL.Image.fromarray((im[0].numpy() * 255).round().astype(np.uint8)) for im in x])
    assert from_tensor.shape == (2, 4)
    torch.testing.assert_close(from_numpy, from_tensor)
    torch.testing.assert_close(from_pil, from_tensor, atol=0.05, rtol=0.05)
    recon = vae_pipeline.reconstruct(x, output_type="pt").images
    assert torch.equal(recon, vae_pipeline.vae.decode(from_tensor).sample)
    with pytest.raises(ValueError, match=r"`images` must be images of 1 channel\(s\) and 28x28"):
        vae_pipeline.encode(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"`images` must hold values in \[0, 1\]"):
        vae_pipeline.encode(x * 255)


def test_interpolation_ends_at_the_two_codes_and_slerp_keeps_the_norm(vae_pipeline, mnist_test):
    a, b = mnist_test.images[0], mnist_test.images[1]
    codes = vae_pipeline.encode(torch.stack([a, b]))
    for method in ("linear", "spherical"):
        path = vae_pipeline.interpolate(a, b, num_steps=5, method=method, output_type="pt").images
        assert path.shape == (5, 1, 28, 28)
        ends = vae_pipeline.vae.decode(codes).sample
        torch.testing.assert_close(path[[0, -1]], ends)
    from hfgen.latent_tools import interpolate

    start, end = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.allclose(interpolate(start, end, 7, "spherical").norm(dim=1), torch.tensor(3.0))
    assert interpolate(start, end, 7, "linear").norm(dim=1)[3] < 2.2
    with pytest.raises(ValueError, match="`method`"):
        vae_pipeline.interpolate(a, b, method="cubic")
    with pytest.raises(ValueError, match="`num_steps`"):
        vae_pipeline.interpolate(a, b, num_steps=1)
    with pytest.raises(ValueError, match="`image_a` must be one image"):
        vae_pipeline.interpolate(mnist_test.images[:2], b)


def test_traversal_changes_only_the_chosen_dimension(vae_pipeline, mnist_test):
    from hfgen.latent_tools import traverse

    points = traverse(torch.tensor([1.0, 2.0, 3.0]), 1, [-1.0, 0.0, 1.0])
    assert torch.equal(points, torch.tensor([[1.0, -1.0, 3.0], [1.0, 0.0, 3.0], [1.0, 1.0, 3.0]]))
    images = vae_pipeline.traverse(2, values=[-2.0, 0.0, 2.0], image=mnist_test.images[0], output_type="np").images
    assert images.shape == (3, 28, 28, 1)
    assert len(vae_pipeline.traverse(0).images) == 7
    with pytest.raises(ValueError, match=r"`dim` must be an integer in \[0, 3\]"):
        vae_pipeline.traverse(4)


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        VAEPipeline.from_pretrained(str(tmp_path / "missing" / "pipeline"))
    with pytest.raises(ValueError, match="no model_index.json"):
        VAEPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="'StableDiffusionPipeline' pipeline; hfgen pipelines are"):
        AutoPipeline.from_pretrained(tmp_path)


def tiny_pipelines():
    """One small pipeline of every family, conditional ones included."""
    from diffusers import DDPMScheduler
    from helpers import tiny_unet

    from hfgen import DDPMPipeline, GANPipeline, Generator, LatentDiffusionPipeline

    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=4)
    vae = VAEModel(sample_size=8, architecture="conv", hidden_dims=(4,), latent_channels=1)
    return {
        "vae": VAEPipeline(VAEModel(hidden_dims=[8], latent_dim=2)),
        "cvae": ConditionalPipeline(VAEModel(hidden_dims=[8], latent_dim=2, num_classes=3)),
        "gan": GANPipeline(Generator(latent_dim=4, base_channels=8)),
        "cgan": ConditionalPipeline(Generator(latent_dim=4, base_channels=8, num_classes=3)),
        "ddpm": DDPMPipeline(tiny_unet(), scheduler),
        "cddpm": DDPMPipeline(tiny_unet(num_class_embeds=4), scheduler, label_dropout=0.1),
        "ldm": LatentDiffusionPipeline(vae, tiny_unet(sample_size=4), scheduler, 1.0),
        "cldm": LatentDiffusionPipeline(vae, tiny_unet(num_class_embeds=4, sample_size=4), scheduler, 1.0, 0.1),
    }


@pytest.mark.parametrize("family", ["vae", "cvae", "gan", "cgan", "ddpm", "cddpm", "ldm", "cldm"])
def test_every_card_usage_snippet_runs_as_written(family, tmp_path):
    import re

    from hfgen.hub_utils import write_model_card

    pipe = tiny_pipelines()[family]
    pipe.save_pretrained(tmp_path)
    card = write_model_card(str(tmp_path), title=family, description="", pipeline_class=type(pipe).__name__,
                            tags=[family], model_config=dict(pipe.generative_model.config), num_classes=pipe.num_classes)
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    namespace = {}
    exec(snippet.replace("path/or/repo-id", str(tmp_path)), namespace)
    assert len(namespace["images"]) == 16
