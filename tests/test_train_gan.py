import json
import os

import pytest
import torch
from helpers import Interrupted, interrupt_after, quick_training_args, same_weights
from huggingface_hub import ModelCard

from hfgen import AutoPipeline, ConditionalPipeline, Discriminator, GANPipeline, Generator
from hfgen.evaluation import evaluate_pipeline
from hfgen.training.train_gan import GANTrainer, main, parse_args

SMALL = ["--base_channels", "8", "--latent_dim", "16"]


@pytest.fixture(scope="session")
def trained_cgan_dir(tmp_path_factory):
    """A small conditional DCGAN, 10 epochs on the real digits (~25 s on one core)."""
    output_dir = tmp_path_factory.mktemp("cgan") / "out"
    main(quick_training_args(output_dir, "--num_epochs", "10", "--conditional", "--base_channels", "16",
                             "--latent_dim", "32"))
    return output_dir


@pytest.mark.slow
def test_cgan_generates_the_requested_classes(trained_cgan_dir, digit_classifier):
    pipe = ConditionalPipeline.from_pretrained(trained_cgan_dir)
    labels = torch.arange(10).repeat_interleave(20)
    images = pipe(class_labels=labels, generator=torch.manual_seed(0), output_type="pt").images
    accuracy = (digit_classifier(images) == labels).float().mean().item()
    assert accuracy > 0.7, accuracy  # chance is 0.1
    # the card's class accuracy, by the FD's digit classifier (stricter than the logistic regression: seen ~0.37)
    recorded = json.loads((trained_cgan_dir / "metrics.json").read_text())["class_accuracy"]
    assert recorded > 0.25, recorded


@pytest.mark.slow
def test_cgan_samples_of_one_class_vary_with_z(trained_cgan_dir, mnist_test):
    """No collapse to one image per class (it did with the class embedding at N(0, 1), docs/maths.md §5.2): the pixel
    standard deviation over z within a class is a good part of the real digits' own."""
    pipe = ConditionalPipeline.from_pretrained(trained_cgan_dir)
    labels = torch.arange(10).repeat_interleave(20)
    images = pipe(class_labels=labels, generator=torch.manual_seed(0), output_type="pt").images
    generated_std = images.view(10, 20, -1).std(1).mean().item()
    real_std = torch.stack([mnist_test.images[mnist_test.labels == digit][:20].flatten(1).std(0).mean()
                            for digit in range(10)]).mean().item()
    assert generated_std > 0.5 * real_std, (generated_std, real_std)


@pytest.mark.slow
def test_short_run_lowers_fd_far_below_the_untrained_generator(tmp_path, mnist_test):
    flags = ["--num_epochs", "4", "--base_channels", "16", "--latent_dim", "32", "--eval_num_samples", "500"]
    main(quick_training_args(tmp_path, *flags))
    trained = json.loads((tmp_path / "metrics.json").read_text())["fd"]
    torch.manual_seed(0)
    untrained = GANPipeline(Generator(latent_dim=32, base_channels=16).eval())
    untrained_fd = evaluate_pipeline(untrained, mnist_test, num_samples=500)["fd"]
    assert trained < 0.5 * untrained_fd, (trained, untrained_fd)
    card = ModelCard.load(tmp_path / "README.md")
    assert {result.metric_type for result in card.data.eval_results} == {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage", "memorisation"}


@pytest.mark.slow
def test_output_folder_has_both_nets_and_a_card(trained_cgan_dir):
    pipe = AutoPipeline.from_pretrained(trained_cgan_dir)
    assert isinstance(pipe, ConditionalPipeline) and isinstance(pipe.discriminator, Discriminator)
    assert pipe.discriminator.config.num_classes == 10
    card = ModelCard.load(trained_cgan_dir / "README.md")
    assert card.data.library_name == "diffusers" and "gan" in card.data.tags
    assert (trained_cgan_dir / "samples.png").is_file()


def test_d_steps_discriminator_steps_per_generator_step(tmp_path):
    trainer = GANTrainer(parse_args(quick_training_args(tmp_path, *SMALL, "--max_train_steps", "6", "--d_steps", "3")))
    trainer.train()
    steps = lambda name: int(next(iter(trainer.optimizers[name].state.values()))["step"])  # noqa: E731
    assert steps("discriminator") == 6 and steps("generator") == 2


def test_sample_grids_use_a_fixed_noise_batch(tmp_path):
    trainer = GANTrainer(parse_args(quick_training_args(tmp_path, *SMALL, "--max_train_steps", "1")))
    trainer.models["generator"].eval()
    first = trainer.sample_images(trainer.build_pipeline(), 4)
    torch.randn(100)  # other draws in between do not move the grid's noise
    again = trainer.sample_images(trainer.build_pipeline(), 4)
    assert [image.tobytes() for image in first] == [image.tobytes() for image in again]


def test_fixed_noise_grids_and_ema(tmp_path):
    main(quick_training_args(tmp_path, *SMALL, "--max_train_steps", "4", "--use_ema", "--train_batch_size", "1000",
                             "--save_images_epochs", "1"))
    assert sorted(os.listdir(tmp_path / "samples")) == ["step-000004.png"]
    pipe = GANPipeline.from_pretrained(tmp_path)
    assert pipe.generator is not None


def test_resume_continues_the_adversarial_run_bit_identically(tmp_path, monkeypatch):
    flags = [*SMALL, "--max_train_steps", "12", "--checkpointing_steps", "5", "--train_batch_size", "500", "--use_ema",
             "--d_steps", "2"]
    main(quick_training_args(tmp_path / "full", *flags))

    interrupt_after(monkeypatch, GANTrainer, 7)
    with pytest.raises(Interrupted):
        main(quick_training_args(tmp_path / "cut", *flags))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "cut" / "checkpoints") == ["checkpoint-5"]
    main(quick_training_args(tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest"))
    for component in ("generator", "discriminator"):
        assert same_weights(tmp_path / "full", tmp_path / "cut", component), component


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--d_steps", "0"], "`--d_steps` must be a positive integer"),
        (["--resolution", "30"], "`sample_size` 30 cannot be produced by the dcgan architecture"),
        (["--gradient_accumulation_steps", "2"], "`--gradient_accumulation_steps` must be 1 for GANs"),
        (["--r1_gamma", "-1"], "`--r1_gamma` must be a finite number >= 0"),
        (["--diff_augment", "flip"], "`--diff_augment` must be 'none' or a comma-separated list of color, "),
    ],
)
def test_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(quick_training_args(tmp_path, *SMALL, *flags))


def test_unknown_loss_flag_names_the_argument():
    with pytest.raises(ValueError, match="argument --loss: invalid choice: 'wasserstein'"):
        parse_args(["--output_dir", "x", "--loss", "wasserstein"])


@pytest.mark.parametrize("loss, augment", [("minimax", "none"), ("hinge", "color,translation,cutout")])
def test_every_objective_and_r1_and_spectral_norm_train(tmp_path, loss, augment):
    main(quick_training_args(tmp_path, *SMALL, "--max_train_steps", "3", "--loss", loss, "--r1_gamma", "1",
                             "--spectral_norm", "--train_batch_size", "32", "--diff_augment", augment))
    assert GANPipeline.from_pretrained(tmp_path).discriminator.config.spectral_norm


def test_diff_augment_reaches_everything_the_discriminator_sees(tmp_path, monkeypatch):
    from hfgen.training import train_gan

    seen = []

    def spy(images, policy):
        seen.append((tuple(images.shape), policy))
        return images

    monkeypatch.setattr(train_gan, "diff_augment", spy)
    main(quick_training_args(tmp_path, *SMALL, "--max_train_steps", "2", "--train_batch_size", "32",
                             "--diff_augment", "translation,cutout", "--save_images_epochs", "0"))
    # per step: the real and the fake batch of D's step, and the fake batch of G's step
    assert seen == [((32, 1, 28, 28), ("translation", "cutout"))] * 6
