"""hfgen's VQ-VAE (hfgen.quantization, training/train_autoencoder.py): the quantisation maths against hand values, and
short runs on the digits that save a diffusers VQModel latent diffusion then trains on."""

import importlib.util
import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from helpers import interrupt_then_resume, quick_training_args, same_weights

from hfgen import AutoencoderPipeline, LatentDiffusionPipeline, quantization
from hfgen.training.train_autoencoder import AutoencoderLoss, AutoencoderTrainer, AutoencoderTrainingConfig, main

# 16 px digits -> 4x4x4 latents through a small VQModel
TINY = ["--resolution", "16", "--block_out_channels", "16", "32", "32", "--num_vq_embeddings", "64",
        "--train_batch_size", "64", "--learning_rate", "2e-3", "--eval_num_samples", "500", "--eval_batch_size", "500"]


def test_nearest_codes_and_straight_through_gradient():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    latents = torch.tensor([[0.9, 0.8], [-1.2, 0.1], [0.2, -0.1], [0.6, 0.6]]).T.reshape(1, 2, 2, 2).requires_grad_()
    quantized, indices = quantization.quantize(latents, codebook)
    assert indices.tolist() == [1, 2, 0, 1]  # positions in row-major order, each its nearest entry
    assert torch.equal(quantization.flatten_latents(quantized), codebook[indices])
    passed = quantization.straight_through(latents, quantized)
    assert torch.equal(passed, quantized)  # the value of e ...
    weights = torch.randn_like(passed)
    (passed * weights).sum().backward()
    assert torch.equal(latents.grad, weights)  # ... and the gradient of z, unchanged


def test_commitment_loss_and_perplexity_against_hand_values():
    latents = torch.tensor([1.0, 2.0, 0.0, -1.0]).view(1, 1, 2, 2).requires_grad_()
    quantized = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2).requires_grad_()
    loss = quantization.commitment_loss(latents, quantized)
    assert loss.item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    loss.backward()
    assert latents.grad.flatten().tolist() == pytest.approx([0.5, 1.0, 0.0, -1.0])  # 2 (z - e) / 4
    assert quantized.grad is None  # sg(e): the codebook is not moved by it
    assert quantization.perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])) == pytest.approx(4)
    assert quantization.perplexity(torch.tensor([7.0, 0.0, 0.0])) == pytest.approx(1)
    assert quantization.perplexity(torch.tensor([1.0, 3.0])) == pytest.approx(4 ** 0.25 * (4 / 3) ** 0.75)  # prod p^-p


def test_ema_codebook_update_against_hand_values():
    cluster_size, embed_sum = torch.tensor([1.0, 1.0]), torch.tensor([[1.0], [3.0]])
    # this batch: three vectors chose entry 0 (sum 6), none entry 1
    codebook = quantization.ema_codebook_update(cluster_size, embed_sum, torch.tensor([3.0, 0.0]),
                                                torch.tensor([[6.0], [0.0]]), decay=0.5, epsilon=0.0)
    assert cluster_size.tolist() == [2.0, 0.5] and embed_sum.tolist() == [[3.5], [1.5]]  # 0.5 old + 0.5 new
    assert codebook.flatten().tolist() == pytest.approx([3.5 / 2.0, 1.5 / 0.5])
    # Laplace smoothing: N~_k = (N_k + eps) / (N + K eps) * N
    cluster_size, embed_sum = torch.tensor([0.0, 4.0]), torch.tensor([[0.0], [8.0]])
    codebook = quantization.ema_codebook_update(cluster_size, embed_sum, torch.zeros(2), torch.zeros(2, 1), decay=1.0,
                                                epsilon=0.5)
    assert codebook.flatten().tolist() == pytest.approx([0.0, 8.0 / ((4.5 / 5.0) * 4.0)])


def test_the_first_step_restarts_every_unused_entry_on_encoder_outputs():
    torch.manual_seed(0)
    config = AutoencoderTrainingConfig(output_dir="x", block_out_channels=[8, 16], num_vq_embeddings=32)
    vq = VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=32, norm_num_groups=8)
    loss = AutoencoderLoss(vq, config)
    images = torch.rand(4, 3, 16, 16)
    losses = loss(images)
    vectors = quantization.flatten_latents(vq.encode(images * 2 - 1).latents)
    codebook = vq.quantize.embedding.weight
    distances = (codebook[:, None] - vectors[None]).norm(dim=-1).min(dim=1).values
    used = loss.cluster_size >= config.dead_code_threshold
    # an empty history: each entry either was chosen (its moving average moved) or is now an encoder output
    assert torch.allclose(distances[loss.cluster_size == 1.0], torch.zeros(1), atol=1e-6)
    assert used.all() and (loss.cluster_size == 1.0).sum() > 0
    assert set(losses) == {"loss", "reconstruction", "commitment", "perplexity", "decoded"} and losses["loss"].requires_grad
    assert not vq.quantize.embedding.weight.requires_grad  # the optimizer leaves the codebook to the averages


@pytest.fixture(scope="module")
def trained_vq_dir(tmp_path_factory):
    """A VQ-VAE of 16 px digits, 300 steps (~30 s)."""
    output_dir = tmp_path_factory.mktemp("vq") / "out"
    main(quick_training_args(output_dir, *TINY, "--max_train_steps", "300"))
    return output_dir


@pytest.mark.slow
def test_training_uses_more_of_the_codebook_and_reconstructs_better(trained_vq_dir):
    from hfgen.data import load_image_dataset
    from hfgen.evaluation import evaluate_autoencoder
    from hfgen.training.train_autoencoder import build_autoencoder, parse_args

    metrics = json.loads((trained_vq_dir / "metrics.json").read_text())
    torch.manual_seed(0)  # the run's initial model (its --seed)
    untrained = build_autoencoder(parse_args(["--output_dir", "x", *TINY]), 1, 16)
    before = evaluate_autoencoder(untrained, load_image_dataset("hfgen:mnist", "test", resolution=16), num_images=500)
    # seen: perplexity 5.8 -> 36 of 64 entries, usage 30% -> 92%, mse 0.26 -> 0.008
    assert metrics["codebook_perplexity"] > 3 * before["codebook_perplexity"], (metrics, before)
    assert metrics["codebook_usage"] > 0.7 > before["codebook_usage"], (metrics, before)
    assert metrics["reconstruction_mse"] < 0.1 * before["reconstruction_mse"], (metrics, before)
    card = (trained_vq_dir / "README.md").read_text()
    assert "codebook_perplexity" in card and "VQ-VAE (diffusers' `VQModel`, 64 codebook entries" in card


@pytest.mark.slow
def test_the_saved_vq_vae_loads_in_diffusers_and_serves_latent_diffusion(trained_vq_dir, tmp_path):
    from hfgen.training.train_ldm import main as train_ldm

    vq = VQModel.from_pretrained(trained_vq_dir, subfolder="vae")  # diffusers' own loader
    pipe = AutoencoderPipeline.from_pretrained(trained_vq_dir)
    digits = torch.rand(2, 1, 16, 16)
    assert pipe.encode(digits).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="an autoencoder has no prior to sample from"):
        pipe(16)
    if importlib.util.find_spec("gradio"):
        from hfgen.demo import build_demo

        with pytest.raises(ValueError, match="holds an AutoencoderPipeline, a first stage with no prior"):
            build_demo(str(trained_vq_dir))
    assert torch.equal(pipe(digits, output_type="pt").images,
                       ((vq.decode(vq.encode(digits * 2 - 1).latents).sample + 1) / 2).clamp(0, 1))
    train_ldm(quick_training_args(tmp_path, "--vae_path", trained_vq_dir, "--resolution", "16", "--block_out_channels",
                                  "16", "32", "--max_train_steps", "3", "--feature_extractor", "none",
                                  "--eval_vlb_num_images", "0", "--num_inference_steps", "4"))
    ldm = LatentDiffusionPipeline.from_pretrained(tmp_path)
    # measured on the training latents (a VQModel's config keeps no shift), not VQModel's default 0.18215 (SD's)
    assert isinstance(ldm.vae, VQModel) and ldm.config.scaling_factor == pytest.approx(vq.config.scaling_factor, rel=1e-3)
    assert ldm.config.shift_factor != 0.0 and "measured on the training latents" in (tmp_path / "README.md").read_text()
    images = ldm(2, num_inference_steps=4, output_type="pt", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 1, 16, 16)


@pytest.mark.slow
def test_resumed_run_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    flags = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "3", "--feature_extractor", "none",
             "--train_batch_size", "32", "--max_train_samples", "128"]
    main(quick_training_args(tmp_path / "full", *flags))
    interrupt_then_resume(monkeypatch, main, AutoencoderTrainer, quick_training_args(tmp_path / "cut", *flags), 4)
    assert same_weights(tmp_path / "full", tmp_path / "cut", "vae")


def test_kl_autoencoder_and_bad_flags(tmp_path):
    main(quick_training_args(tmp_path / "kl", *TINY, "--architecture", "kl", "--max_train_steps", "2",
                             "--feature_extractor", "none", "--max_train_samples", "128"))
    assert isinstance(AutoencoderPipeline.from_pretrained(tmp_path / "kl").vae, AutoencoderKL)
    with pytest.raises(ValueError, match="`--resolution` 18 must be a multiple of 4"):
        AutoencoderTrainingConfig(output_dir=str(tmp_path / "x"), resolution=18).validate()
    with pytest.raises(ValueError, match="`--conditional`: an autoencoder is not class-conditional"):
        AutoencoderTrainingConfig(output_dir=str(tmp_path / "x"), conditional=True).validate()
    with pytest.raises(ValueError, match="`--codebook_decay` must be a number in \\[0, 1\\)"):
        AutoencoderTrainingConfig(output_dir=str(tmp_path / "x"), codebook_decay=1.0).validate()


@pytest.mark.slow
def test_one_command_trains_a_vq_first_stage_then_latent_diffusion(tmp_path):
    from hfgen.training.train_ldm import main as train_ldm

    train_ldm(quick_training_args(tmp_path, "--first_stage_type", "vq", "--ae_num_epochs", "1", "--ae_num_vq_embeddings",
                                  "32", "--ae_block_out_channels", "16", "32", "32", "--resolution", "16",
                                  "--max_train_samples", "128", "--block_out_channels", "16", "32", "--max_train_steps",
                                  "2", "--feature_extractor", "none", "--eval_vlb_num_images", "0",
                                  "--num_inference_steps", "4"))
    first_stage = AutoencoderPipeline.from_pretrained(tmp_path / "first_stage")
    assert isinstance(first_stage.vae, VQModel) and first_stage.vae.config.num_vq_embeddings == 32
    assert isinstance(LatentDiffusionPipeline.from_pretrained(tmp_path).vae, VQModel)


def test_adaptive_weight_patch_discriminator_and_perceptual_distance():
    from hfgen.losses import adaptive_weight
    from hfgen.models import DigitClassifier, PatchDiscriminator
    from hfgen.perceptual import PerceptualDistance

    last_layer = torch.ones(2, 2, requires_grad=True)
    # gradients 2 and -6 per element at G_L: lambda = ||2|| / (||-6|| + 1e-4)
    weight = adaptive_weight((2 * last_layer).sum(), (-6 * last_layer).sum(), last_layer)
    assert weight.item() == pytest.approx(4 / (12 + 1e-4)) and not weight.requires_grad
    discriminator = PatchDiscriminator(in_channels=3, base_channels=8, num_layers=2)
    assert discriminator(torch.rand(2, 3, 32, 32)).logits.shape == (2, 1, 6, 6)  # 32 / 4 - 2 patches a side
    assert PatchDiscriminator.min_size(2) == 12 and discriminator(torch.rand(1, 3, 12, 12)).logits.shape == (1, 1, 1, 1)
    torch.manual_seed(0)
    classifier = DigitClassifier(sample_size=16, in_channels=1, block_out_channels=(8, 16))
    distance = PerceptualDistance(classifier)
    images, other = torch.rand(3, 1, 16, 16, requires_grad=True), torch.rand(3, 1, 16, 16)
    assert torch.allclose(distance(images, images), torch.zeros(3))
    value = distance(images, other)
    assert value.shape == (3,) and (value > 0).all()
    value.sum().backward()
    assert images.grad.abs().sum() > 0 and all(p.grad is None for p in classifier.parameters())
    assert distance(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)).shape == (1,)  # resized to the classifier's


@pytest.mark.slow
def test_adversarial_and_perceptual_terms_train_after_the_warm_up(tmp_path, digit_classifier):
    flags = ["--resolution", "28", "--block_out_channels", "16", "32", "32", "--num_vq_embeddings", "32",
             "--train_batch_size", "32", "--max_train_samples", "256", "--max_train_steps", "5", "--eval_num_samples",
             "200", "--adversarial_weight", "0.5", "--adversarial_start_step", "3", "--discriminator_channels", "8",
             "--perceptual_weight", "1.0", "--checkpointing_steps", "1", "--checkpoints_total_limit", "10"]
    main(quick_training_args(tmp_path, *flags))
    from safetensors.torch import load_file

    def discriminator_at(step):  # the checkpoint's model whose weights are the patch discriminator's
        weights = [load_file(path) for path in (tmp_path / "checkpoints" / f"checkpoint-{step}").glob("model*.safetensors")]
        return next(w for w in weights if "layers.0.weight" in w)["layers.0.weight"]

    # untouched in the warm-up (steps 1-3), trained from the fourth
    assert torch.equal(discriminator_at(2), discriminator_at(3)) and not torch.equal(discriminator_at(3), discriminator_at(5))
    assert (tmp_path / "vae").is_dir() and not (tmp_path / "discriminator").exists()  # only the autoencoder is saved
    assert "patch discriminator" in (tmp_path / "README.md").read_text()
    assert "fd" in json.loads((tmp_path / "metrics.json").read_text())
    with pytest.raises(ValueError, match="leave no patch of 16 px images: they need at least 24 px"):
        AutoencoderTrainingConfig(output_dir=str(tmp_path / "x"), resolution=16, block_out_channels=[8, 16],
                                  adversarial_weight=0.5, discriminator_layers=3).validate()
