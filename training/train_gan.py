"""Trains a GAN or conditional GAN with the double loop of docs/maths.md §4.3 (and §5.2).

    accelerate launch -m hfgen.training.train_gan --output_dir hfgen-gan-mnist
    hfgen train gan --output_dir hfgen-cgan-mnist --conditional

Each batch is one discriminator ascent step on a fresh minibatch (the inner loop); after every `--d_steps`
of them the generator takes one descent step (the outer loop). A training step is a discriminator step.
"""

import dataclasses

import torch

from hfgen.augment import DIFF_AUGMENTATIONS, diff_augment, parse_policy
from hfgen.image_processing import SYMMETRIC, from_unit_range
from hfgen.losses import GAN_LOSSES, discriminator_loss, generator_loss, r1_penalty
from hfgen.models import Discriminator, Generator
from hfgen.models.gan import GAN_ARCHITECTURES
from hfgen.pipelines import ConditionalPipeline, GANPipeline

from hfgen.utils import check_non_negative_number, check_positive_int, check_positive_number, check_probability

from .config import TrainingConfig, flag, optional, redefault
from .trainer import Trainer


@dataclasses.dataclass(kw_only=True)
class GANTrainingConfig(TrainingConfig):
    """Train a GAN (or a conditional GAN) on images in [-1, 1]."""

    architecture: str = flag("dcgan", "The generator and discriminator nets.", choices=GAN_ARCHITECTURES)
    latent_dim: int = flag(64, "Size of the generator's noise z.", check=check_positive_int)
    base_channels: int = flag(32, "Width of the nets (channels of the outermost conv layers).",
                              check=check_positive_int)
    loss: str = flag("non_saturating", "minimax (docs/maths.md §4.1), non_saturating generator loss (§4.4) or hinge "
                     "(§4.5).", choices=GAN_LOSSES)
    d_steps: int = flag(1, "Discriminator steps per generator step (k of docs/maths.md §4.3).",
                        check=check_positive_int)
    discriminator_learning_rate: float | None = flag(None, "Defaults to --learning_rate.",
                                                     check=optional(check_positive_number))
    discriminator_adam_beta1: float | None = flag(None, "Defaults to --adam_beta1.", check=optional(check_probability))
    discriminator_adam_beta2: float | None = flag(None, "Defaults to --adam_beta2.", check=optional(check_probability))
    r1_gamma: float = flag(0.0, "Weight of the R1 penalty gamma/2 E||grad D(x)||^2 (0: off).",
                           check=check_non_negative_number)
    spectral_norm: bool = flag(False, "Spectral normalisation in the discriminator.")
    diff_augment: str = flag(
        "none", "Differentiable augmentation of everything D sees (DiffAugment): 'none' or a comma-separated list of "
        f"{', '.join(DIFF_AUGMENTATIONS)}, e.g. color,translation,cutout.", check=parse_policy)
    # DCGAN's settings: Adam(2e-4, betas (0.5, 0.999)), batch 64
    learning_rate: float = redefault(TrainingConfig, "learning_rate", 2e-4)
    adam_beta1: float = redefault(TrainingConfig, "adam_beta1", 0.5)
    train_batch_size: int = redefault(TrainingConfig, "train_batch_size", 64)
    num_epochs: int = redefault(TrainingConfig, "num_epochs", 5)

    def validate(self) -> None:
        super().validate()
        if self.gradient_accumulation_steps != 1:
            raise ValueError("`--gradient_accumulation_steps` must be 1 for GANs: each batch is one update of D")


def parse_args(argv=None) -> GANTrainingConfig:
    return GANTrainingConfig.from_command_line(argv)


class GANTrainer(Trainer):
    family = "gan"
    ema_model_names = ("generator",)
    config_class = GANTrainingConfig

    def build_models(self):
        args, data = self.config, self.train_dataset
        channels, size, _ = data.image_shape
        shared = dict(
            sample_size=size, channels=channels, architecture=args.architecture, base_channels=args.base_channels,
            num_classes=self.num_classes,
            id2label=self.id2label,
        )
        return {
            "generator": Generator(latent_dim=args.latent_dim, **shared),
            "discriminator": Discriminator(spectral_norm=args.spectral_norm, **shared),
        }

    def build_optimizers(self):
        args = self.config
        d_betas = (
            args.adam_beta1 if args.discriminator_adam_beta1 is None else args.discriminator_adam_beta1,
            args.adam_beta2 if args.discriminator_adam_beta2 is None else args.discriminator_adam_beta2,
        )
        d_learning_rate = args.discriminator_learning_rate or args.learning_rate
        return {
            "generator": self.adamw(self.models["generator"], args.learning_rate, (args.adam_beta1, args.adam_beta2)),
            "discriminator": self.adamw(self.models["discriminator"], d_learning_rate, d_betas),
        }

    def training_step(self, images, labels):
        args = self.config
        real = from_unit_range(images, SYMMETRIC)
        generator, discriminator = self.unwrap("generator"), self.unwrap("discriminator")
        latent_shape = (real.shape[0], args.latent_dim)

        # Inner loop (docs/maths.md §4.3): one ascent step of D on a fresh minibatch, G fixed. Real and fake batches go
        # through D separately, as in the G step, so batch-norm statistics never mix them.
        with torch.no_grad():
            fake = generator(torch.randn(latent_shape, device=real.device), labels).sample
        if args.r1_gamma:
            real.requires_grad_(True)
        augment = self.augment
        real_logits = self.models["discriminator"](augment(real), labels).logits
        fake_logits = self.models["discriminator"](augment(fake), labels).logits
        d_loss = discriminator_loss(real_logits, fake_logits, args.loss)
        if args.r1_gamma:
            d_loss = d_loss + args.r1_gamma / 2 * r1_penalty(real_logits, real)
        self.optimize("discriminator", d_loss)
        logs = {"d_loss": d_loss.detach(), "d_real": torch.sigmoid(real_logits).mean().detach()}

        # Outer loop: one descent step of G after every d_steps steps of D, D fixed (frozen, so no D
        # gradients are left behind; the inner module is called, so DDP's reducer is not involved).
        if (self.global_step + 1) % args.d_steps == 0:
            discriminator.requires_grad_(False)
            fake = self.models["generator"](torch.randn(latent_shape, device=real.device), labels).sample
            g_loss = generator_loss(discriminator(augment(fake), labels).logits, args.loss)
            self.optimize("generator", g_loss)
            discriminator.requires_grad_(True)
            logs["g_loss"] = g_loss.detach()
        return logs

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """What D sees of real and generated images: their DiffAugment under --diff_augment, else themselves."""
        return diff_augment(images, parse_policy("--diff_augment", self.config.diff_augment))

    def build_pipeline(self):
        generator, discriminator = self.sampling_model("generator"), self.unwrap("discriminator")
        if self.config.conditional:
            return ConditionalPipeline(generator, discriminator)
        return GANPipeline(generator, discriminator)

    def model_card_description(self):
        kind = "conditional GAN" if self.config.conditional else "GAN"
        return (f"A {kind} ({self.config.architecture}, {self.config.loss} loss) trained with hfgen on "
                f"`{self.config.dataset_name}`. The discriminator is included as an optional pipeline component, "
                f"so adversarial fine-tuning can resume from this folder.")


def main(argv=None) -> str:
    return GANTrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
