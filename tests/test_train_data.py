"""Training on the user's own images: every family on a small RGB folder of odd sizes and modes, resume with
workers, flips and streaming, and the flags that cannot work together."""

import json

import pytest
import torch
from helpers import interrupt_then_resume, quick_training_args, same_weights
from helpers import write_mixed_folder

from hfgen import AutoPipeline
from hfgen.training import train_ddpm, train_gan, train_ldm, train_vae

FAMILIES = {
    "vae": (train_vae, ["--architecture", "conv", "--hidden_dims", "8", "16", "--latent_dim", "4",
                        "--eval_importance_samples", "2"]),
    "gan": (train_gan, ["--base_channels", "8", "--latent_dim", "8"]),
    "ddpm": (train_ddpm, ["--block_out_channels", "16", "32", "--num_inference_steps", "2", "--eval_vlb_num_images", "0"]),
    "ldm": (train_ldm, ["--vae_hidden_dims", "8", "--vae_num_epochs", "1", "--vae_train_batch_size", "4", "--block_out_channels", "16", "32",
                        "--num_inference_steps", "2", "--eval_vlb_num_images", "0"]),
}


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """24 images of odd sizes and modes (RGB, grey, RGBA, palette), 4 of each kind."""
    root = tmp_path_factory.mktemp("rgb")
    for copy in range(4):
        write_mixed_folder(root / f"part{copy}")
    return root


def folder_args(output_dir, folder, *extra):
    return quick_training_args(output_dir, "--train_data_dir", folder, "--resolution", "16", "--num_channels", "3",
                               "--train_batch_size", "4", "--feature_extractor", "none", "--eval_num_samples", "8",
                               "--num_validation_images", "4", *extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_on_a_folder_of_odd_rgb_images(family, rgb_folder, tmp_path):
    module, flags = FAMILIES[family]
    module.main(folder_args(tmp_path, rgb_folder, *flags, "--max_train_steps", "3", "--random_flip"))
    pipe = AutoPipeline.from_pretrained(tmp_path)
    images = pipe(2, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    card = (tmp_path / "README.md").read_text()
    assert "no test split, so FD compares samples with training images" in card
    if json.loads((tmp_path / "metrics.json").read_text()):  # the VAE's bounds, here where FD is off
        assert "Evaluation on the train split" in card


def test_resume_is_bit_identical_with_two_workers_and_random_flips(rgb_folder, tmp_path, monkeypatch):
    module, flags = FAMILIES["vae"]
    args = [*flags, "--max_train_steps", "8", "--checkpointing_steps", "3", "--dataloader_num_workers", "2",
            "--random_flip", "--eval_num_samples", "4"]
    module.main(folder_args(tmp_path / "full", rgb_folder, *args))
    interrupt_then_resume(monkeypatch, module.main, module.VAETrainer, folder_args(tmp_path / "cut", rgb_folder, *args), 7)
    assert same_weights(tmp_path / "full", tmp_path / "cut", "vae")
    # the flips are part of the run: without them the weights differ
    module.main(folder_args(tmp_path / "unflipped", rgb_folder, *[a for a in args if a != "--random_flip"]))
    assert not same_weights(tmp_path / "full", tmp_path / "unflipped", "vae")


def test_a_streamed_run_resumes_bit_identically(rgb_folder, tmp_path, monkeypatch):
    module, flags = FAMILIES["vae"]
    # 24 images in batches of 4: the 8 steps cross the end of the first pass of the stream
    args = [*flags, "--streaming", "--max_train_steps", "8", "--checkpointing_steps", "4", "--random_flip"]
    module.main(folder_args(tmp_path / "full", rgb_folder, *args))
    interrupt_then_resume(monkeypatch, module.main, module.VAETrainer, folder_args(tmp_path / "cut", rgb_folder, *args), 6)
    assert same_weights(tmp_path / "full", tmp_path / "cut", "vae")
    state = json.loads((tmp_path / "cut" / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["data_positions"] == [[1, 2]]


def test_resuming_a_finished_run_trains_nothing_more(rgb_folder, tmp_path):
    module, flags = FAMILIES["vae"]
    args = folder_args(tmp_path, rgb_folder, *flags, "--max_train_steps", "5", "--checkpointing_steps", "5")
    module.main(args)
    weights = (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    module.main([*args, "--resume_from_checkpoint", "latest"])
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-5"]
    assert "- `global_step`: `5`" in (tmp_path / "README.md").read_text()  # the uninterrupted run's step count


@pytest.mark.parametrize("flags, match", [
    (["--streaming"], "`--streaming` needs `--max_train_steps`"),
    (["--streaming", "--max_train_steps", "2", "--validation_split", "0.2"], "`--validation_split` needs the dataset's length"),
    (["--validation_split", "1"], r"`--validation_split` must be a fraction in \(0, 1\)"),
    (["--image_column", "photo"], "`image_column` 'photo' is not a column"),
    (["--resolution", "200", "--no_resize"], "smaller than `resolution` 200"),
    (["--num_channels", "2"], "`--num_channels` must be 1 or 3"),
])
def test_flags_that_cannot_work_are_refused_before_training(flags, match, rgb_folder, tmp_path):
    with pytest.raises(ValueError, match=match):
        train_vae.main([*folder_args(tmp_path, rgb_folder), *flags])


def test_latent_diffusion_refuses_streaming(rgb_folder, tmp_path):
    module, flags = FAMILIES["ldm"]
    with pytest.raises(ValueError, match="`--streaming` is not supported"):
        module.main(folder_args(tmp_path, rgb_folder, *flags, "--streaming", "--max_train_steps", "2"))
