"""Feature extractors beyond the digit classifier: transformers encoders (tiny random DINOv2 and CLIP models saved
to a folder stand in for Hub checkpoints), "auto", and the messages for what is missing."""

import json
import logging

import pytest
import torch
import torchmetrics.utilities.imports
from hub_fixtures import hub_server  # noqa: F401
from huggingface_hub import ModelCard, create_repo, upload_folder
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from hfgen import VAEModel, VAEPipeline
from helpers import TINY_VIT, save_dinov2
from hfgen.cli import main
from hfgen.features import DEFAULT_FEATURE_EXTRACTOR, load_feature_extractor, resolve_feature_extractor
from hfgen.frechet import frechet_distance



@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return save_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VIT, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def digits(mnist_test):
    return mnist_test.images[:200]


def test_dinov2_features_follow_the_saved_model_and_its_image_processor(dinov2_dir, digits):
    extractor = load_feature_extractor("dinov2:" + dinov2_dir)
    assert extractor.num_features == 32 and extractor.in_channels is None
    assert extractor.image_size == (24, 24)  # the processor's crop: what the model sees
    torch.testing.assert_close(extractor.image_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    features = extractor(digits[:8])
    assert features.shape == (8, 32) and features.dtype == torch.float32
    torch.testing.assert_close(extractor(digits[:8]), features, rtol=0, atol=0)  # deterministic
    # grey is repeated to RGB, and the CLS token after the final layer norm is the feature
    rgb = digits[:8].expand(-1, 3, -1, -1)
    torch.testing.assert_close(extractor(rgb), features, rtol=0, atol=0)
    pixels = torch.nn.functional.interpolate(rgb, size=(24, 24), mode="bicubic", antialias=True).clamp(0, 1)
    pixels = (pixels - extractor.image_mean) / extractor.image_std
    torch.testing.assert_close(features, extractor.model(pixel_values=pixels).last_hidden_state[:, 0])
    assert extractor(torch.rand(3, 3, 40, 40)).shape == (3, 32)  # any size is resized
    with pytest.raises(ValueError, match=r"`images` must have shape \(B, 1 or 3, H, W\)"):
        extractor(torch.rand(2, 2, 28, 28))


def test_fd_in_dinov2_features_separates_colour_images(dinov2_dir):
    """(With the digit classifier, FD growing with noise: test_frechet.py, for both extractors.)"""
    extractor = load_feature_extractor("dinov2:" + dinov2_dir)
    generator = torch.Generator().manual_seed(0)
    rgb = torch.rand(100, 3, 28, 28, generator=generator)
    assert frechet_distance(rgb, rgb, extractor) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(rgb, rgb * 0.5, extractor) > 10 * frechet_distance(rgb[:50], rgb[50:], extractor)


def test_clip_features_are_the_projected_image_embeddings(clip_dir, digits, tmp_path):
    extractor = load_feature_extractor("clip:" + clip_dir)
    assert extractor.num_features == 16 and extractor.output == "image_embeds" and extractor.image_size == (28, 28)
    features = extractor(digits[:8])
    assert features.shape == (8, 16)
    with torch.no_grad():
        expected = extractor.model(pixel_values=(digits[:8].expand(-1, 3, -1, -1) - extractor.image_mean)
                                   / extractor.image_std).image_embeds
    torch.testing.assert_close(features, expected)
    assert abs(frechet_distance(digits, digits, extractor)) < 1e-6
    assert frechet_distance(digits, (digits + 0.3 * torch.randn(digits.shape)).clamp(0, 1), extractor) > 1e-4
    # a folder saved from a CLIPVisionModel has no projection: its pooled output is the feature
    CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)).save_pretrained(tmp_path)
    plain = load_feature_extractor(f"clip:{tmp_path}")
    assert plain.output == "pooler_output" and plain(digits[:4]).shape == (4, 32)


def test_without_an_image_processor_the_model_config_and_default_statistics_apply(tmp_path, digits):
    extractor = load_feature_extractor("dinov2:" + save_dinov2(tmp_path, processor=False))
    assert extractor.image_size == (28, 28)  # the config's image_size
    torch.testing.assert_close(extractor.image_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))  # ImageNet's
    assert extractor(digits[:2]).shape == (2, 32)


def test_cache_ids_identify_the_weights(dinov2_dir, tmp_path):
    first, again = load_feature_extractor("dinov2:" + dinov2_dir), load_feature_extractor("dinov2:" + dinov2_dir)
    assert first.cache_id == again.cache_id and first.cache_id.startswith("dinov2:" + dinov2_dir)
    other = load_feature_extractor("dinov2:" + save_dinov2(tmp_path / "other", seed=1))
    assert other.cache_id != first.cache_id


def test_dinov2_loads_from_a_hub_id(hub_server, dinov2_dir, digits):
    create_repo("someone/tiny-dinov2")
    upload_folder(repo_id="someone/tiny-dinov2", folder_path=dinov2_dir)
    from_hub, local = load_feature_extractor("dinov2:someone/tiny-dinov2"), load_feature_extractor("dinov2:" + dinov2_dir)
    assert from_hub.image_size == (24, 24) and from_hub.cache_id.startswith("dinov2:someone/tiny-dinov2@")
    assert from_hub.cache_id.split("@")[1] == local.cache_id.split("@")[1]  # the same files
    torch.testing.assert_close(from_hub(digits[:4]), local(digits[:4]), rtol=0, atol=0)


def test_bad_transformers_specs_name_the_argument(dinov2_dir):
    with pytest.raises(ValueError, match=r"`name_or_path` 'dinov2:/no/such/folder': could not load"):
        load_feature_extractor("dinov2:/no/such/folder")
    with pytest.raises(ValueError, match=r"`name_or_path` 'dinov2:someone/no-such-model'"):  # offline: not cached
        load_feature_extractor("dinov2:someone/no-such-model")
    with pytest.raises(ValueError, match="holds a 'dinov2' model"):
        load_feature_extractor("clip:" + dinov2_dir)
    with pytest.raises(ValueError, match="`name_or_path` must be"):
        load_feature_extractor("dinov3:" + dinov2_dir)
    with pytest.raises(ValueError, match="resolve_feature_extractor"):
        load_feature_extractor("auto")
    with pytest.raises(TypeError, match="`name_or_path` must be a name or a folder"):
        load_feature_extractor(3)


def test_inception_without_torch_fidelity_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(torchmetrics.utilities.imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ImportError, match=r'needs torch-fidelity.*pip install "hfgen\[fid\]"'):
        load_feature_extractor("inception")


@pytest.mark.parametrize("fidelity", [False, True])
def test_auto_picks_the_digit_classifier_or_inception_or_nothing(monkeypatch, caplog, fidelity):
    monkeypatch.setattr(torchmetrics.utilities.imports, "_TORCH_FIDELITY_AVAILABLE", fidelity)
    assert resolve_feature_extractor("auto", (1, 28, 28)) == DEFAULT_FEATURE_EXTRACTOR
    assert resolve_feature_extractor("auto", (1, 64, 64)) == DEFAULT_FEATURE_EXTRACTOR
    assert resolve_feature_extractor("dinov2:facebook/dinov2-small", (3, 8, 8)) == "dinov2:facebook/dinov2-small"
    with caplog.at_level(logging.WARNING, logger="hfgen.features"):
        assert resolve_feature_extractor("auto", (1, 8, 8)) is None
        assert resolve_feature_extractor("auto", (3, 32, 32)) == ("inception" if fidelity else None)
    assert "--feature_extractor" in caplog.text and "dinov2:facebook/dinov2-small" in caplog.text
    assert caplog.text.count("no default feature extractor") == (1 if fidelity else 2)
    with pytest.raises(ValueError, match="`image_shape` must be"):
        resolve_feature_extractor("auto", (28, 28))


def test_cli_evaluates_in_dinov2_features(dinov2_dir, tmp_path, capsys):
    torch.manual_seed(0)
    folder = tmp_path / "vae"
    VAEPipeline(VAEModel(hidden_dims=[16], latent_dim=2).eval()).save_pretrained(folder)
    main(["evaluate", str(folder), "--num_samples", "50", "--num_importance_samples", "1",
          "--feature_extractor", "dinov2:" + dinov2_dir, "--write_card"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["fd"] > 0 and "test_iwae_nll" in printed
    (result,) = [result for result in ModelCard.load(folder / "README.md").data.eval_results if result.metric_type == "fd"]
    assert result.metric_args["feature_extractor"] == "dinov2:" + dinov2_dir
    main(["evaluate", str(folder), "--num_samples", "50", "--num_importance_samples", "1", "--feature_extractor", "none"])
    assert "fd" not in json.loads(capsys.readouterr().out)


def test_cli_says_which_flag_to_pass_when_auto_finds_no_extractor(tmp_path, monkeypatch, capsys):
    import hfgen.features

    torch.manual_seed(0)
    folder = tmp_path / "vae"
    VAEPipeline(VAEModel(hidden_dims=[16], latent_dim=2).eval()).save_pretrained(folder)
    monkeypatch.setattr(hfgen.features, "resolve_feature_extractor", lambda name, image_shape: None)  # as for RGB
    with pytest.raises(SystemExit):
        main(["evaluate", str(folder), "--num_samples", "10"])
    assert "hfgen: error: no default feature extractor fits 1x28x28 images; pass --feature_extractor" in capsys.readouterr().err
