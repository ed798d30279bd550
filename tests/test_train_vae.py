import json
import os

import pytest
import torch
from helpers import Interrupted, interrupt_after, quick_vae_args
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hfgen import ConditionalPipeline, VAEModel, VAEPipeline
from hfgen.likelihood import evaluate_vae
from hfgen.training.train_vae import VAETrainer, main, parse_args


@pytest.mark.slow
def test_training_lowers_the_test_negative_elbo_far_below_the_untrained_model(trained_vae_dir, mnist_test):
    loader = torch.utils.data.DataLoader(mnist_test, batch_size=500)
    torch.manual_seed(0)
    untrained = evaluate_vae(VAEModel().eval(), loader, num_importance_samples=10)
    trained = json.loads((trained_vae_dir / "metrics.json").read_text())
    assert untrained["test_negative_elbo"] > 500  # ~ 784 log 2 for a random Bernoulli decoder
    assert trained["test_negative_elbo"] < 0.4 * untrained["test_negative_elbo"], (trained, untrained)
    assert trained["test_iwae_nll"] < trained["test_negative_elbo"]


def test_output_folder_is_a_loadable_pipeline_with_a_model_card(trained_vae_dir):
    pipe = VAEPipeline.from_pretrained(trained_vae_dir)
    assert pipe(2, generator=torch.manual_seed(0), output_type="pt").images.shape == (2, 1, 28, 28)
    assert (trained_vae_dir / "samples.png").is_file()
    assert sorted(os.listdir(trained_vae_dir / "samples")) == ["step-000200.png"]
    card = ModelCard.load(trained_vae_dir / "README.md")
    assert card.data.library_name == "diffusers" and "vae" in card.data.tags
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert set(metrics) == {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage", "memorisation", "test_negative_elbo", "test_iwae_nll", "test_iwae_bits_per_dim"}
    assert "samples.png" in card.text and '"latent_dim": 20' not in card.text and "`latent_dim`: `20`" in card.text


@pytest.mark.slow
def test_cvae_generates_the_requested_classes(trained_cvae_dir, digit_classifier):
    pipe = ConditionalPipeline.from_pretrained(trained_cvae_dir)
    labels = torch.arange(10).repeat_interleave(20)
    images = pipe(class_labels=labels, generator=torch.manual_seed(0), output_type="pt").images
    accuracy = (digit_classifier(images) == labels).float().mean().item()
    assert accuracy > 0.8, accuracy
    # the same latents with shuffled labels are read as the new labels: the label, not z, sets the class
    shifted = (labels + 1) % 10
    images = pipe(class_labels=shifted, generator=torch.manual_seed(0), output_type="pt").images
    assert (digit_classifier(images) == shifted).float().mean().item() > 0.8


def test_resume_after_an_interruption_continues_from_the_saved_step_bit_identically(tmp_path, monkeypatch):
    flags = ["--max_train_steps", "45", "--checkpointing_steps", "20", "--train_batch_size", "200",
             "--hidden_dims", "64", "--eval_importance_samples", "2"]
    main(quick_vae_args(tmp_path / "full", *flags))

    interrupt_after(monkeypatch, VAETrainer, 30)
    with pytest.raises(Interrupted):
        main(quick_vae_args(tmp_path / "cut", *flags))
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-20"]
    # a checkpoint that was being written when the process died is never resumed from
    (checkpoints / "checkpoint-40.incomplete").mkdir()
    monkeypatch.undo()

    trainer = VAETrainer(parse_args(quick_vae_args(tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest")))
    assert trainer.resume() == (1, 0)  # 20 steps of 200 images = one epoch of 4,000
    assert trainer.global_step == 20
    trainer.global_step = 0
    trainer.train()
    assert trainer.global_step == 45
    full = load_file(tmp_path / "full" / "vae" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(full[name], resumed[name]) for name in full)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path, monkeypatch):
    """2 micro-batches of 50 accumulate to the update of one batch of 100 (the same 100 shuffled images)."""
    # z = mean: without sampling noise, which is drawn differently for 2 x 50 and 100 examples, the two agree
    monkeypatch.setattr("hfgen.distributions.randn_tensor", lambda shape, **kwargs: torch.zeros(shape))
    common = ["--max_train_steps", "6", "--hidden_dims", "64", "--eval_importance_samples", "1"]
    main(quick_vae_args(tmp_path / "big", *common, "--train_batch_size", "100"))
    main(quick_vae_args(tmp_path / "accumulated", *common, "--train_batch_size", "50",
                             "--gradient_accumulation_steps", "2"))
    big = load_file(tmp_path / "big" / "vae" / "diffusion_pytorch_model.safetensors")
    accumulated = load_file(tmp_path / "accumulated" / "vae" / "diffusion_pytorch_model.safetensors")
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-5)
    untrained = VAEModel(hidden_dims=[64])
    assert not torch.allclose(untrained.decoder[0].weight, VAEModel.from_pretrained(tmp_path / "big" / "vae").decoder[0].weight)


def test_tensorboard_logs_and_periodic_grids(tmp_path):
    pytest.importorskip("tensorboard")
    main(quick_vae_args(tmp_path, "--num_epochs", "2", "--hidden_dims", "16", "--logger", "tensorboard",
                             "--save_images_epochs", "1", "--logging_steps", "5"))
    events = [name for _, _, names in os.walk(tmp_path / "logs") for name in names if name.startswith("events.")]
    assert events
    assert sorted(os.listdir(tmp_path / "samples")) == ["step-000040.png", "step-000080.png"]


def test_mixed_precision_training_runs(tmp_path):
    # bf16 autocast works on CPU; accelerate then casts the model outputs back to float32
    main(quick_vae_args(tmp_path, "--max_train_steps", "30", "--mixed_precision", "bf16", "--hidden_dims", "64"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_negative_elbo"] < 400


def test_checkpoints_total_limit_keeps_the_newest(tmp_path):
    main(quick_vae_args(tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "2",
                             "--checkpoints_total_limit", "2", "--hidden_dims", "16", "--eval_importance_samples", "1"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-6", "checkpoint-8"]


def test_missing_or_corrupt_checkpoints_are_clear_errors(tmp_path):
    flags = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--hidden_dims", "16", "--eval_importance_samples", "1"]
    with pytest.raises(ValueError, match="`--resume_from_checkpoint` .*nowhere.* is not a folder"):
        main(quick_vae_args(tmp_path, *flags, "--resume_from_checkpoint", str(tmp_path / "nowhere")))
    main(quick_vae_args(tmp_path, *flags))
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not be loaded \\(corrupt checkpoint\\?\\)"):
        main(quick_vae_args(tmp_path, *flags, "--resume_from_checkpoint", "latest"))
    (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        main(quick_vae_args(tmp_path, *flags, "--resume_from_checkpoint", str(checkpoint)))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset_name", "hfgen:fashion"], "unknown built-in `dataset_name` 'hfgen:fashion'"),
        (["--latent_dim", "0"], "`--latent_dim` must be a positive integer"),
        (["--beta", "-1"], "`--beta` must be a finite number >= 0"),
        (["--train_batch_size", "0"], "`--train_batch_size` must be a positive integer"),
        (["--train_batch_size", "5000"], "exceeds the 4000 training images"),
        (["--push_to_hub"], "`--push_to_hub` needs `--hub_model_id`"),
        (["--architecture", "conv", "--hidden_dims", "8", "8", "8"], "divisible"),
    ],
)
def test_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(quick_vae_args(tmp_path, *flags))


def test_conditional_needs_labels(tmp_path):
    from hfgen.data import ImageDataset

    trainer_cls = type("Unlabelled", (VAETrainer,), {"load_split": lambda self, split, augment=False: ImageDataset(
        torch.rand(10, 1, 28, 28), torch.zeros(10, dtype=torch.long), None)})
    with pytest.raises(ValueError, match="`--conditional` needs a labelled dataset"):
        trainer_cls(parse_args(quick_vae_args(tmp_path, "--conditional", "--train_batch_size", "5")))
