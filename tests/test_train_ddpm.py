import json

import pytest
import torch
from helpers import interrupt_then_resume, quick_training_args, same_weights
from diffusers import UNet2DModel

from hfgen import AutoPipeline, DDPMPipeline, ViTDenoiser
from hfgen.diffusion import q_sample, variational_bound
from hfgen.evaluation import evaluate_pipeline
from hfgen.training.train_ddpm import main

TINY = ["--block_out_channels", "8", "16", "--num_inference_steps", "5", "--eval_num_samples", "50",
        "--num_train_timesteps", "100", "--eval_vlb_num_images", "8"]


def denoising_error(unet, images, alphas_cumprod):
    """The simple loss ||eps - eps_theta(x_t, t)||^2 on fixed noise and timesteps."""
    generator = torch.Generator().manual_seed(0)
    x0 = images * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=generator)
    with torch.no_grad():
        prediction = unet(q_sample(x0, timesteps, noise, alphas_cumprod), timesteps).sample
    return torch.mean((prediction - noise) ** 2).item()


@pytest.mark.slow
def test_training_lowers_the_denoising_error_and_writes_a_loadable_folder(tmp_path, mnist_test):
    # a little wider and longer than TINY, and 20 denoising steps, so that samples and FD move too (~40 s)
    main(quick_training_args(tmp_path, *TINY, "--max_train_steps", "150", "--block_out_channels", "16", "32",
                             "--train_batch_size", "32", "--num_inference_steps", "20", "--eval_num_samples", "100"))
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(AutoPipeline.from_pretrained(tmp_path), DDPMPipeline)
    torch.manual_seed(0)
    untrained = UNet2DModel.from_config(pipe.unet.config).eval()
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    trained_error = denoising_error(pipe.unet, mnist_test.images[:200], alphas_cumprod)
    untrained_error = denoising_error(untrained, mnist_test.images[:200], alphas_cumprod)
    assert trained_error < 0.5 * untrained_error, (trained_error, untrained_error)
    # and the variational bound (bits/dim, all 100 terms) decreases with training
    x0 = mnist_test.images[:16] * 2 - 1  # the digits are 8-bit: x0 lies on the decoder's grid

    def bound(unet):
        denoiser = lambda x_t, t, y: unet(x_t, t).sample  # noqa: E731
        return variational_bound(denoiser, x0, pipe.scheduler, generator=torch.Generator().manual_seed(0)).mean()

    assert bound(pipe.unet) < bound(untrained)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"fd", "kid", "kid_std", "precision", "recall", "density", "coverage", "memorisation", "test_bits_per_dim"} and 0 < metrics["test_bits_per_dim"] < 16
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["memorisation"] <= 1
    untrained_fd = evaluate_pipeline(DDPMPipeline(untrained, pipe.scheduler), mnist_test, num_samples=100,
                                     pipeline_kwargs={"num_inference_steps": 20}, likelihood=False)["fd"]
    assert metrics["fd"] < 0.8 * untrained_fd, (metrics["fd"], untrained_fd)


@pytest.mark.slow
def test_vit_denoiser_trains_and_round_trips(tmp_path, mnist_test):
    vit = ["--denoiser", "vit", "--vit_hidden_size", "32", "--vit_layers", "2", "--patch_size", "4"]
    main(quick_training_args(tmp_path, *TINY, *vit, "--max_train_steps", "60", "--train_batch_size", "128",
                             "--feature_extractor", "none"))
    pipe = AutoPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.unet, ViTDenoiser)
    torch.manual_seed(0)
    untrained = ViTDenoiser.from_config(pipe.unet.config).eval()
    trained_error = denoising_error(pipe.unet, mnist_test.images[:200], pipe.scheduler.alphas_cumprod)
    untrained_error = denoising_error(untrained, mnist_test.images[:200], pipe.scheduler.alphas_cumprod)
    assert trained_error < 0.7 * untrained_error, (trained_error, untrained_error)
    images = pipe(2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(images, DDPMPipeline.from_pretrained(tmp_path)(2, num_inference_steps=3,
                                                                       generator=torch.manual_seed(0), output_type="pt").images)


def test_resume_continues_bit_identically_with_ema(tmp_path, monkeypatch):
    from hfgen.training.train_ddpm import DDPMTrainer

    flags = [*TINY, "--max_train_steps", "10", "--checkpointing_steps", "4", "--use_ema", "--feature_extractor", "none",
             "--conditional", "--train_batch_size", "32"]
    main(quick_training_args(tmp_path / "full", *flags))
    interrupt_then_resume(monkeypatch, main, DDPMTrainer, quick_training_args(tmp_path / "cut", *flags), 6)
    assert same_weights(tmp_path / "full", tmp_path / "cut", "unet")


@pytest.mark.slow
def test_larger_guidance_scale_raises_the_accuracy_on_requested_classes(tmp_path):
    """Classifier-free guidance on the 8x8 digits (cheap enough for CI): ~13 s of training, then 200 samples per scale."""
    from sklearn.linear_model import LogisticRegression

    from hfgen.data import load_image_dataset

    main(quick_training_args(tmp_path, "--dataset_name", "hfgen:digits", "--resolution", "8", "--conditional",
                             "--label_dropout", "0.2", "--block_out_channels", "16", "32", "--num_train_timesteps", "100",
                             "--max_train_steps", "150", "--train_batch_size", "128", "--feature_extractor", "none",
                             "--eval_vlb_num_images", "0"))
    train = load_image_dataset("hfgen:digits", "train", resolution=8)
    classifier = LogisticRegression(max_iter=500).fit(train.images.flatten(1).numpy(), train.labels.numpy())
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat(20)

    def accuracy(guidance_scale):
        images = pipe(class_labels=labels.tolist(), guidance_scale=guidance_scale, num_inference_steps=20,
                      generator=torch.manual_seed(0), output_type="pt").images
        return (classifier.predict(images.flatten(1).numpy()) == labels.numpy()).mean()

    unconditional, conditional, guided = accuracy(0.0), accuracy(1.0), accuracy(3.0)  # seen: ~0.1, ~0.7, ~0.99
    assert unconditional < 0.3 < conditional
    assert guided > conditional + 0.1, (unconditional, conditional, guided)


def test_bf16_accumulation_warmup_and_ema_run_together(tmp_path):
    main(quick_training_args(tmp_path, *TINY, "--max_train_steps", "3", "--mixed_precision", "bf16",
                             "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
                             "--use_ema", "--conditional", "--feature_extractor", "none"))
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert pipe.unet.dtype == torch.float32  # saved in full precision
    assert "- `global_step`: `3`" in (tmp_path / "README.md").read_text()  # 3 optimizer steps of 2 batches each
    assert 0 < json.loads((tmp_path / "metrics.json").read_text())["test_bits_per_dim"] < 16


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_saved_scheduler_predicts_what_the_model_was_trained_on(tmp_path, prediction_type):
    main(quick_training_args(tmp_path, *TINY, "--max_train_steps", "2", "--prediction_type", prediction_type,
                             "--snr_gamma", "5", "--feature_extractor", "none"))
    assert DDPMPipeline.from_pretrained(tmp_path).scheduler.config.prediction_type == prediction_type


def test_conditional_ddpm_reserves_a_null_class(tmp_path):
    main(quick_training_args(tmp_path, *TINY, "--max_train_steps", "2", "--conditional", "--feature_extractor", "none"))
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert pipe.unet.config.num_class_embeds == 11 and pipe.num_classes == 10
    images = pipe(class_labels=[1, 7], guidance_scale=2.0, num_inference_steps=3, output_type="pt").images
    assert images.shape == (2, 1, 28, 28)
    # without FD features the bound is still evaluated, with the labels of its own images
    assert set(json.loads((tmp_path / "metrics.json").read_text())) == {"test_bits_per_dim"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--label_dropout", "1.5"], "`--label_dropout` must be a number in \\[0, 1\\)"),
        (["--resolution", "29"], "`--resolution` 29 must be divisible by 2"),
    ],
)
def test_bad_flags(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(quick_training_args(tmp_path, *TINY, *flags))
