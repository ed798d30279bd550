import json
import os

import pytest
import torch
from helpers import image_to_image_distances, interrupt_then_resume, quick_training_args, same_weights
from diffusers import UNet2DModel

from hfgen import AutoPipeline, GANPipeline, Generator, LatentDiffusionPipeline, VAEModel, VAEPipeline
from hfgen.data import load_image_dataset
from hfgen.latent_tools import encode_images
from hfgen.evaluation import evaluate_pipeline, reconstruction_mse
from hfgen.training.train_ldm import LDMTrainer, main

pytestmark = pytest.mark.slow  # real runs: a first stage trained once for the module

# a small first stage (4x8x8 latents of 32 px digits) and a small denoiser, 20 denoising steps for FD
TINY = ["--vae_num_epochs", "4", "--vae_eval_importance_samples", "2", "--block_out_channels", "32", "64", "--learning_rate", "2e-3",
        "--num_inference_steps", "20", "--eval_num_samples", "200"]


@pytest.fixture(scope="module")
def trained_ldm_dir(tmp_path_factory):
    """Both stages in one command: 4 VAE epochs, then 200 diffusion steps on the latents (~1 min)."""
    output_dir = tmp_path_factory.mktemp("ldm") / "out"
    main(quick_training_args(output_dir, *TINY, "--max_train_steps", "200"))
    return output_dir


@pytest.fixture(scope="module")
def test_digits_32px():
    return load_image_dataset("hfgen:mnist", "test", resolution=32)


def test_one_command_trains_both_stages_into_loadable_folders(trained_ldm_dir):
    pipe = AutoPipeline.from_pretrained(trained_ldm_dir)
    assert isinstance(pipe, LatentDiffusionPipeline) and pipe.vae.latent_shape == (4, 8, 8)
    assert pipe.scheduler.config.clip_sample is False  # latents are not in [-1, 1]
    first_stage = VAEPipeline.from_pretrained(trained_ldm_dir / "first_stage")
    assert all(torch.equal(a, b) for a, b in zip(first_stage.vae.state_dict().values(), pipe.vae.state_dict().values()))
    card = (trained_ldm_dir / "README.md").read_text()
    assert "first_stage_reconstruction_mse" in card and "LatentDiffusionPipeline" in card


def test_normalized_training_latents_have_zero_mean_and_unit_variance(trained_ldm_dir):
    pipe = LatentDiffusionPipeline.from_pretrained(trained_ldm_dir)
    posterior = encode_images(pipe.vae, load_image_dataset("hfgen:mnist", "train", resolution=32).images)
    normalized = pipe.latent_normalization.normalize(posterior.sample(torch.Generator().manual_seed(0)))
    assert normalized.mean().item() == pytest.approx(0.0, abs=0.02)
    assert normalized.var().item() == pytest.approx(1.0, abs=0.02)
    assert "measured on the training latents" in (trained_ldm_dir / "README.md").read_text()


def test_trained_first_stage_reconstructs_test_digits(trained_ldm_dir, test_digits_32px):
    pipe = LatentDiffusionPipeline.from_pretrained(trained_ldm_dir)
    error = reconstruction_mse(pipe.vae, test_digits_32px)
    torch.manual_seed(0)
    untrained_error = reconstruction_mse(VAEModel.from_config(pipe.vae.config), test_digits_32px)
    assert error < 0.03 and error < 0.3 * untrained_error, (error, untrained_error)  # seen: ~0.012 vs ~0.18
    metrics = json.loads((trained_ldm_dir / "metrics.json").read_text())
    assert metrics["first_stage_reconstruction_mse"] == pytest.approx(error, rel=1e-4)


def test_short_run_lowers_fd_below_the_untrained_denoiser(trained_ldm_dir, test_digits_32px):
    pipe = LatentDiffusionPipeline.from_pretrained(trained_ldm_dir)
    torch.manual_seed(0)
    untrained = LatentDiffusionPipeline(pipe.vae, UNet2DModel.from_config(pipe.unet.config), pipe.scheduler,
                                        pipe.config.scaling_factor, shift_factor=pipe.config.shift_factor)
    untrained_fd = evaluate_pipeline(untrained, test_digits_32px, num_samples=200, likelihood=False,
                                     pipeline_kwargs={"num_inference_steps": 20})["fd"]
    fd = json.loads((trained_ldm_dir / "metrics.json").read_text())["fd"]
    assert fd < 0.8 * untrained_fd, (fd, untrained_fd)  # seen: ~320 vs ~510


def test_vae_path_reuses_a_trained_first_stage(trained_ldm_dir, tmp_path):
    main(quick_training_args(tmp_path, *TINY, "--max_train_steps", "2", "--feature_extractor", "none",
                             "--vae_path", trained_ldm_dir / "first_stage", "--conditional"))
    assert not (tmp_path / "first_stage").exists()
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path)
    reference = LatentDiffusionPipeline.from_pretrained(trained_ldm_dir)
    assert pipe.config.scaling_factor == reference.config.scaling_factor and pipe.num_classes == 10
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), reference.vae.state_dict().values()))


def test_resume_continues_bit_identically(trained_ldm_dir, tmp_path, monkeypatch):
    flags = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "3", "--feature_extractor", "none",
             "--vae_path", trained_ldm_dir / "first_stage", "--train_batch_size", "32"]
    main(quick_training_args(tmp_path / "full", *flags))
    interrupt_then_resume(monkeypatch, main, LDMTrainer, quick_training_args(tmp_path / "cut", *flags), 4)
    assert same_weights(tmp_path / "full", tmp_path / "cut", "unet")


def test_first_stages_that_cannot_serve_are_clear_errors(trained_vae_dir, trained_ldm_dir, tmp_path):
    with pytest.raises(ValueError, match="a VAE with a vector latent"):  # the MLP VAE of conftest
        main(quick_training_args(tmp_path, *TINY, "--vae_path", trained_vae_dir, "--resolution", "28"))
    with pytest.raises(ValueError, match=r"takes \(1, 32, 32\) images but the data are \(1, 28, 28\)"):
        main(quick_training_args(tmp_path, *TINY, "--vae_path", trained_ldm_dir / "first_stage", "--resolution", "28"))
    GANPipeline(Generator(latent_dim=4, base_channels=8)).save_pretrained(tmp_path / "gan")
    with pytest.raises(ValueError, match="holds no first stage: no config.json in it or its vae subfolder"):
        main(quick_training_args(tmp_path, *TINY, "--vae_path", tmp_path / "gan"))
    with pytest.raises(ValueError, match=r"`--vae_beta` must be a finite number >= 0, got -0.5"):
        main(quick_training_args(tmp_path, *TINY, "--vae_beta", "-0.5"))


def test_every_shared_flag_reaches_the_first_stage_unless_it_configures_the_second():
    import dataclasses

    from hfgen.training import TrainingConfig
    from hfgen.training.train_ldm import SECOND_STAGE_ONLY, parse_args

    config = parse_args(["--output_dir", "out", "--random_flip", "--max_train_samples", "50", "--seed", "7",
                         "--dataloader_num_workers", "2", "--learning_rate", "5e-4", "--vae_learning_rate", "1e-3",
                         "--vae_beta", "0.01"])
    vae_config = config.first_stage_config()
    shared = {field.name for field in dataclasses.fields(TrainingConfig)}
    assert SECOND_STAGE_ONLY < shared  # no stale names
    for name in shared - SECOND_STAGE_ONLY - {"resume_from_checkpoint"}:
        assert getattr(vae_config, name) == getattr(config, name), name
    assert vae_config.random_flip and vae_config.max_train_samples == 50 and vae_config.dataloader_num_workers == 2
    assert vae_config.learning_rate == 1e-3 and vae_config.output_dir == os.path.join("out", "first_stage")
    assert vae_config.architecture == "conv" and vae_config.latent_channels == 4 and vae_config.beta == 0.01
    assert config.first_stage.learning_rate == 1e-3 and config.to_flags()["vae_beta"] == 0.01


def test_the_latent_cache_is_on_disk_reused_and_keyed_by_first_stage_and_data(trained_ldm_dir, tmp_path, monkeypatch):
    import numpy as np

    cache = tmp_path / "cache"
    flags = [*TINY, "--max_train_steps", "1", "--feature_extractor", "none", "--max_train_samples", "300",
             "--vae_path", trained_ldm_dir / "first_stage", "--latent_cache_dir", cache, "--eval_vlb_num_images", "0"]
    encoded = []  # the number of images each VAE.encode call sees
    original_encode = VAEModel.encode
    monkeypatch.setattr(VAEModel, "encode", lambda self, x, *a, **k: encoded.append(len(x)) or original_encode(self, x, *a, **k))
    main(quick_training_args(tmp_path / "a", *flags))
    assert sum(encoded) == 300 + 1000  # the training images into the cache, the test digits for the reconstruction
    (folder,) = cache.iterdir()
    moments = np.load(folder / "moments.npy", mmap_mode="r")
    assert isinstance(moments, np.memmap) and moments.shape == (300, 1, 8, 8, 8)  # (N, views, 2C, S, S)
    encoded.clear()
    main(quick_training_args(tmp_path / "b", *flags))
    assert sum(encoded) == 1000 and list(cache.iterdir()) == [folder]  # the training latents came from the cache
    encoded.clear()
    main(quick_training_args(tmp_path / "c", *flags, "--random_flip"))  # mirror images too: another key
    assert sum(encoded) == 2 * 300 + 1000
    flipped = next(f for f in cache.iterdir() if f != folder)
    assert np.load(flipped / "moments.npy", mmap_mode="r").shape == (300, 2, 8, 8, 8)
    factors = [LatentDiffusionPipeline.from_pretrained(tmp_path / run).config.scaling_factor for run in "ab"]
    assert factors[0] == factors[1]


def test_image_to_image_keeps_more_of_a_test_digit_as_strength_falls(trained_ldm_dir, test_digits_32px):
    distances = image_to_image_distances(LatentDiffusionPipeline.from_pretrained(trained_ldm_dir), test_digits_32px)
    assert distances == sorted(distances) and distances[0] < distances[-1] / 2, distances


def test_inpainting_keeps_the_known_pixels_of_a_test_digit(trained_ldm_dir, test_digits_32px):
    pipe = LatentDiffusionPipeline.from_pretrained(trained_ldm_dir)
    pipe.set_progress_bar_config(disable=True)
    images = torch.stack([test_digits_32px[index][0] for index in range(4)])
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1  # the right half regenerated; the latent keeps the left half's cells (a 4x8x8 grid)
    first, second = (pipe(image=images, mask_image=mask, num_inference_steps=10, generator=torch.manual_seed(seed),
                          output_type="pt").images for seed in (0, 1))
    torch.testing.assert_close(first[..., :16], images[..., :16], atol=1e-6, rtol=0)  # pasted back exactly
    assert not torch.allclose(first[..., 16:], second[..., 16:], atol=1e-2)
