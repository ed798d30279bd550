"""Trains a first stage for latent diffusion (docs/maths.md §7.4): a VQ-VAE, diffusers' `VQModel` trained with hfgen's
vector quantisation (straight-through gradient, commitment loss, EMA codebook, dead-code restarts), or a KL
autoencoder, diffusers' `AutoencoderKL`. The output folder is an `AutoencoderPipeline` whose `vae/` is an ordinary
diffusers model: `hfgen train ldm --vae_path OUTPUT_DIR` and diffusers' own `VQModel.from_pretrained(OUTPUT_DIR,
subfolder="vae")` load it.

    hfgen train autoencoder --output_dir vq-mnist                       # a VQ-VAE of the digits
    hfgen train autoencoder --output_dir kl-mnist --architecture kl     # a KL autoencoder
    hfgen train ldm --output_dir vq-ldm-mnist --vae_path vq-mnist       # latent diffusion on it

The card gives the reconstructions' error and FD against the test images, and for a VQ-VAE the codebook's
perplexity and usage on them.
"""

import copy
import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast, reduce
from diffusers import AutoencoderKL, VQModel
from torch import nn

from hfgen import quantization
from hfgen.data import dataset_length, image_batches
from hfgen.image_processing import SYMMETRIC, from_unit_range
from hfgen.features import ClassifierFeatures
from hfgen.latent_tools import measure_normalization
from hfgen.losses import adaptive_weight, discriminator_loss
from hfgen.models import PatchDiscriminator
from hfgen.perceptual import PerceptualDistance
from hfgen.pipelines import AutoencoderPipeline
from hfgen.utils import (
    check_non_negative_int, check_non_negative_number, check_positive_int, check_positive_ints, check_probability)

from .config import TrainingConfig, flag, redefault
from .trainer import Trainer

logger = logging.getLogger(__name__)

ARCHITECTURES = {"vq": VQModel, "kl": AutoencoderKL}
NORMALIZATION_MAX_IMAGES = 20_000
RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


@dataclasses.dataclass(kw_only=True)
class AutoencoderTrainingConfig(TrainingConfig):
    """Train a first stage for latent diffusion: a VQ-VAE (VQModel) or a KL autoencoder (AutoencoderKL)."""

    architecture: str = flag("vq", "vq: diffusers' VQModel with hfgen's vector quantisation; kl: AutoencoderKL.",
                             choices=ARCHITECTURES)
    block_out_channels: list[int] = flag(
        [32, 64, 64], "Channels of the encoder's blocks (the decoder's, reversed); each block after the first halves "
        "the size: 32 px images give 8x8 latents by default.", check=check_positive_ints)
    layers_per_block: int = flag(1, "Residual layers per block.", check=check_positive_int)
    latent_channels: int = flag(4, "Channels of the latent (the codebook vectors' size for vq).",
                                check=check_positive_int)
    num_vq_embeddings: int = flag(256, "vq: entries K of the codebook.", check=check_positive_int)
    commitment_cost: float = flag(0.25, "vq: weight beta of the commitment loss ||z - sg(e)||^2.",
                                  check=check_non_negative_number)
    codebook_decay: float = flag(0.99, "vq: decay of the codebook's moving averages.", check=check_probability)
    dead_code_threshold: float = flag(
        0.01, "vq: an entry whose moving-average count of assigned vectors per batch falls below this is restarted on "
        "an encoder output of the batch (0: never).", check=check_non_negative_number)
    kl_weight: float = flag(1e-3, "kl: weight of KL(q(z|x) || N(0, I)) per latent coordinate against the reconstruction "
                            "loss per pixel.", check=check_non_negative_number)
    reconstruction_loss: str = flag("l1", "The reconstruction loss per pixel, in [-1, 1].",
                                    choices=RECONSTRUCTION_LOSSES)
    perceptual_weight: float = flag(
        0.0, "Weight of a perceptual distance between images and reconstructions in the features of the FD classifier "
        "(--feature_extractor: the digit classifier, or `classifier` for a domain one; docs/maths.md §7.5). Then the "
        "card's FD is in the features the loss saw: judge it with a sharpness measure too.",
        check=check_non_negative_number)
    adversarial_weight: float = flag(
        0.0, "Weight of a patch discriminator's hinge loss (times the adaptive weight of Esser et al., docs/maths.md "
        "§7.5); 0: no discriminator.", check=check_non_negative_number)
    adversarial_start_step: int = flag(
        500, "The step from which the discriminator trains and its loss counts (a warm-up on reconstruction alone).",
        check=check_non_negative_int)
    discriminator_layers: int = flag(2, "Stride-2 layers of the patch discriminator (its patches grow with them).",
                                     check=check_positive_int)
    discriminator_channels: int = flag(64, "Width of the patch discriminator's first layer.", check=check_positive_int)
    resolution: int = redefault(TrainingConfig, "resolution", 32)

    def validate(self) -> None:
        super().validate()
        if self.conditional:
            raise ValueError("`--conditional`: an autoencoder is not class-conditional (latent diffusion conditions "
                             "its denoiser instead)")
        if self.use_ema:
            raise ValueError("`--use_ema` averages a sampler's weights; an autoencoder keeps its own (a VQ-VAE's "
                             "codebook is a moving average already)")
        if self.adversarial_weight and self.resolution < PatchDiscriminator.min_size(self.discriminator_layers):
            raise ValueError(f"`--discriminator_layers` {self.discriminator_layers} leave no patch of "
                             f"{self.resolution} px images: they need at least "
                             f"{PatchDiscriminator.min_size(self.discriminator_layers)} px (fewer layers)")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % factor:
            raise ValueError(f"`--resolution` {self.resolution} must be a multiple of {factor}: each of the "
                             f"{len(self.block_out_channels) - 1} blocks after the first of `--block_out_channels` halves it")


def parse_args(argv=None) -> AutoencoderTrainingConfig:
    return AutoencoderTrainingConfig.from_command_line(argv)


def build_autoencoder(config: AutoencoderTrainingConfig, channels: int, size: int) -> VQModel | AutoencoderKL:
    """The diffusers autoencoder `config` describes, for (channels, size, size) images."""
    blocks = len(config.block_out_channels)
    shared = dict(in_channels=channels, out_channels=channels, block_out_channels=tuple(config.block_out_channels),
                  down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                  layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
                  norm_num_groups=math.gcd(32, *config.block_out_channels), sample_size=size)
    if config.architecture == "vq":
        return VQModel(**shared, num_vq_embeddings=config.num_vq_embeddings)
    return AutoencoderKL(**shared)


class AutoencoderLoss(nn.Module):
    """The autoencoder with its training loss in one module (so that DDP sees one forward): images in [0, 1] ->
    the loss and what to log. For a VQModel it also holds the codebook's moving averages N_k and m_k
    (`hfgen.quantization.ema_codebook_update`), checkpointed with the weights, and updates the codebook in each
    training forward."""

    def __init__(self, autoencoder: VQModel | AutoencoderKL, config: AutoencoderTrainingConfig,
                 perceptual: PerceptualDistance | None = None):
        super().__init__()
        self.autoencoder, self.reconstruction = autoencoder, RECONSTRUCTION_LOSSES[config.reconstruction_loss]
        self.perceptual, self.perceptual_weight = perceptual, config.perceptual_weight
        self.adversarial_weight = config.adversarial_weight
        self.commitment_cost, self.kl_weight = config.commitment_cost, config.kl_weight
        self.decay, self.dead_code_threshold = config.codebook_decay, config.dead_code_threshold
        if isinstance(autoencoder, VQModel):
            codebook = autoencoder.quantize.embedding.weight
            codebook.requires_grad_(False)  # moved by the moving averages, not by the optimizer
            # an empty history: every entry is restarted on encoder outputs in the first step (a data-driven init)
            self.register_buffer("cluster_size", torch.zeros(len(codebook)))
            self.register_buffer("embed_sum", torch.zeros_like(codebook))

    @property
    def config(self):
        return self.autoencoder.config

    def forward(self, images: torch.Tensor, discriminator: PatchDiscriminator | None = None) -> dict[str, torch.Tensor]:
        """Images (B, C, H, W) in [0, 1] -> "loss", its terms, and "decoded" (the reconstructions in [-1, 1]); with a
        `discriminator` (its weights frozen by the caller) the adversarial term too."""
        pixels = from_unit_range(images, SYMMETRIC)
        if isinstance(self.autoencoder, VQModel):
            decoded, terms, logs = self.vq_forward(pixels)
        else:
            posterior = self.autoencoder.encode(pixels).latent_dist
            decoded = self.autoencoder.decode(posterior.sample()).sample
            kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent coordinate
            terms, logs = {"kl": (self.kl_weight, kl)}, {}
        # the reconstruction terms: the negative log-likelihood part that the adaptive weight balances against
        reconstruction = self.reconstruction(decoded, pixels)
        nll, losses = reconstruction, {"reconstruction": reconstruction}
        if self.perceptual is not None:
            perceptual = self.perceptual((decoded + 1) / 2, images).mean()
            nll, losses["perceptual"] = nll + self.perceptual_weight * perceptual, perceptual
        loss = nll + sum(weight * value for weight, value in terms.values())
        if discriminator is not None:  # the generator's hinge term: -E[D(x')]
            adversarial = -discriminator(decoded).logits.mean()
            weight = self.adversarial_weight * adaptive_weight(nll, adversarial, self.autoencoder.decoder.conv_out.weight)
            loss, losses["adversarial"], losses["adaptive_weight"] = loss + weight * adversarial, adversarial, weight
        losses.update({name: value for name, (_, value) in terms.items()}, **logs)
        return {"loss": loss, **losses, "decoded": decoded}

    def vq_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """The decoded quantised latents, the commitment term {name: (weight, value)} and the codes' perplexity."""
        latents = self.autoencoder.encode(pixels).latents  # z, (B, D, S, S)
        codebook = self.autoencoder.quantize.embedding.weight
        quantized, indices = quantization.quantize(latents, codebook)  # e
        counts = quantization.code_usage(indices, len(codebook))
        if self.training:
            self.update_codebook(latents.detach(), indices, counts)
        decoded = self.autoencoder.decode(quantization.straight_through(latents, quantized),
                                          force_not_quantize=True).sample
        commitment = quantization.commitment_loss(latents, quantized)
        perplexity = torch.tensor(quantization.perplexity(counts))
        return decoded, {"commitment": (self.commitment_cost, commitment)}, {"perplexity": perplexity}

    @torch.no_grad()
    def update_codebook(self, latents: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """One EMA step on every process's vectors together, then the restart of dead entries (the same vectors on
        every process: the main process's choice, broadcast)."""
        vectors = quantization.flatten_latents(latents).float()
        num_codes = len(counts)
        sums = quantization.assignment_sums(vectors, indices, num_codes)
        counts, sums = reduce(counts, "sum"), reduce(sums, "sum")
        codebook = self.autoencoder.quantize.embedding.weight
        codebook.copy_(quantization.ema_codebook_update(self.cluster_size, self.embed_sum, counts, sums, self.decay))
        dead = self.cluster_size < self.dead_code_threshold
        if self.dead_code_threshold and dead.any():
            replacements = broadcast(vectors[torch.randint(len(vectors), (int(dead.sum()),), device=vectors.device)])
            codebook[dead] = replacements
            self.cluster_size[dead] = 1.0  # as if each had been chosen by one vector
            self.embed_sum[dead] = replacements


class AutoencoderTrainer(Trainer):
    family = "autoencoder"
    config_class = AutoencoderTrainingConfig
    pipeline_task = "image-to-image"
    _normalized_at = None  # the step whose latents the config's normalization was measured on

    def build_models(self):
        args, (channels, size, _) = self.config, self.train_dataset.image_shape
        perceptual = None
        if args.perceptual_weight:
            if not isinstance(self.feature_extractor, ClassifierFeatures):
                raise ValueError("`--perceptual_weight` needs a classifier's features: pass `--feature_extractor "
                                 "classifier` (or the digit classifier)")
            perceptual = PerceptualDistance(copy.deepcopy(self.feature_extractor.classifier))
        torch.manual_seed(args.seed)
        models = {"autoencoder": AutoencoderLoss(build_autoencoder(args, channels, size), args, perceptual)}
        if args.adversarial_weight:
            models["discriminator"] = PatchDiscriminator(channels, args.discriminator_channels, args.discriminator_layers)
        return models

    def training_step(self, images, labels):
        args = self.config
        adversarial = args.adversarial_weight and self.global_step >= args.adversarial_start_step
        discriminator = self.unwrap("discriminator").requires_grad_(False) if adversarial else None
        losses = self.models["autoencoder"](images, discriminator)
        self.optimize("autoencoder", losses["loss"])
        decoded = losses.pop("decoded").detach()
        if adversarial:  # the discriminator's hinge loss on real images and the reconstructions (docs/maths.md §4.5)
            self.unwrap("discriminator").requires_grad_(True)
            pixels = from_unit_range(images, SYMMETRIC)
            real, fake = (self.models["discriminator"](batch).logits for batch in (pixels, decoded))
            losses["discriminator"] = discriminator_loss(real, fake, "hinge")
            self.optimize("discriminator", losses["discriminator"])
        return {name: value.detach() for name, value in losses.items()}

    def build_pipeline(self):
        vae = self.unwrap("autoencoder").autoencoder  # the discriminator and the perceptual network are not saved
        if self.global_step >= self.max_train_steps and self._normalized_at != self.global_step:
            self.record_normalization(vae)
            self._normalized_at = self.global_step
        return AutoencoderPipeline(vae)

    @torch.no_grad()
    def record_normalization(self, vae) -> None:
        """Once trained: the training latents' normalization (docs/maths.md §7.1) written into the autoencoder's
        config as diffusers' pipelines read it: `scaling_factor` = 1 / std, and for AutoencoderKL `shift_factor` =
        the mean (VQModel's config has no shift: `hfgen train ldm` measures a VQModel's latents itself). Measured on
        the first NORMALIZATION_MAX_IMAGES training images, as stored."""
        was_training = vae.training
        images = self.load_split("train")
        num_images = min(dataset_length(images) or NORMALIZATION_MAX_IMAGES, NORMALIZATION_MAX_IMAGES)
        normalization = measure_normalization(vae.eval(), images, num_images, self.config.eval_batch_size)
        vae.train(was_training)
        vae.register_to_config(scaling_factor=normalization.scale)
        if isinstance(vae, AutoencoderKL):
            vae.register_to_config(shift_factor=normalization.shift)
        logger.info("latent normalization written into the config: %s", normalization.describe())

    def sample_images(self, pipeline, num_images: int):
        """Test images and their reconstructions, alternating: the first num_images // 2 of the test split."""
        count = max(num_images // 2, 1)
        originals, _ = next(image_batches(self.test_dataset, count, batch_size=count, shuffle=False))
        reconstructions = pipeline(originals, output_type="pt").images
        pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
        return pipeline.output(pairs, "pil", True).images

    def model_card_description(self):
        args, vae = self.config, self.unwrap("autoencoder").autoencoder
        factor = 2 ** (len(args.block_out_channels) - 1)
        size = args.resolution // factor
        kind = (f"A VQ-VAE (diffusers' `VQModel`, {args.num_vq_embeddings} codebook entries of {args.latent_channels} "
                f"dims, trained with hfgen's EMA codebook, commitment weight {args.commitment_cost:g} and dead-code "
                f"restarts)" if isinstance(vae, VQModel) else
                f"A KL autoencoder (diffusers' `AutoencoderKL`, KL weight {args.kl_weight:g})")
        losses = f"{args.reconstruction_loss} reconstruction loss"
        if args.perceptual_weight:
            losses += (f", a perceptual distance (weight {args.perceptual_weight:g}) in the features of the FD classifier "
                       "(so FD here is in features the loss saw)")
        if args.adversarial_weight:
            losses += (f", a patch discriminator's hinge loss (weight {args.adversarial_weight:g} times the adaptive "
                       f"weight) from step {args.adversarial_start_step}")
        return (f"{kind} trained with hfgen on `{args.dataset_name}`, {args.latent_channels}x{size}x{size} latents of "
                f"{args.resolution} px images, {losses}. The sample grid pairs "
                "test images with their reconstructions; `fd` is the FD of the reconstructions against the test "
                "images, `reconstruction_mse` their mean squared pixel error"
                + (", `codebook_perplexity` exp(entropy) of the codes the test images use and `codebook_usage` the "
                   "share of entries they use." if isinstance(vae, VQModel) else ".")
                + f" Its config's scaling_factor ({vae.config.scaling_factor:.4g}) gives its training latents unit "
                "variance. Use it as latent diffusion's first stage: `hfgen train ldm --vae_path <this folder>`.")


def main(argv=None) -> str:
    return AutoencoderTrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
