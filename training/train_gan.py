"""Trains a GAN or conditional GAN with the double loop of docs/maths.md §4.3 (and §5.2).

    accelerate launch -m hfgen.training.train_gan --output_dir hfgen-gan-mnist
    hfgen train gan --output_dir hfgen-cgan-mnist --conditional

Each batch is one discriminator ascent step on a fresh minibatch (the inner loop); after every `--d_steps`
of them the generator takes one descent step (the outer loop). A training step is a discriminator step.
"""

import torch

from hfgen.augment import DIFF_AUGMENTATIONS, diff_augment, parse_policy
from hfgen.image_processing import SYMMETRIC, from_unit_range
from hfgen.losses import GAN_LOSSES, discriminator_loss, generator_loss, r1_penalty
from hfgen.models import Discriminator, Generator
from hfgen.models.gan import ARCHITECTURES
from hfgen.pipelines import ConditionalPipeline, GANPipeline

from hfgen.utils import check_non_negative_number, check_positive_int, check_positive_number, check_probability

from .trainer import Trainer, optional, training_parser


def parse_args(argv=None):
    parser = training_parser("Train a GAN (or a conditional GAN) on images in [-1, 1].")
    add = parser.add_argument
    add("--architecture", default="dcgan", choices=ARCHITECTURES)
    add("--latent_dim", type=int, default=64)
    add("--base_channels", type=int, default=32, help="Width of the nets (channels of the outermost conv layers).")
    add("--loss", default="non_saturating", choices=GAN_LOSSES,
        help="minimax (docs/maths.md §4.1), non_saturating generator loss (§4.4) or hinge (§4.5).")
    add("--d_steps", type=int, default=1, help="Discriminator steps per generator step (k of docs/maths.md §4.3).")
    add("--discriminator_learning_rate", type=float, default=None, help="Defaults to --learning_rate.")
    add("--discriminator_adam_beta1", type=float, default=None, help="Defaults to --adam_beta1.")
    add("--discriminator_adam_beta2", type=float, default=None, help="Defaults to --adam_beta2.")
    add("--r1_gamma", type=float, default=0.0, help="Weight of the R1 penalty gamma/2 E||grad D(x)||^2 (0: off).")
    add("--spectral_norm", action="store_true", help="Spectral normalisation in the discriminator.")
    add("--diff_augment", default="none",
        help=f"Differentiable augmentation of everything D sees (DiffAugment): 'none' or a comma-separated list of "
             f"{', '.join(DIFF_AUGMENTATIONS)}, e.g. color,translation,cutout.")
    # DCGAN's settings: Adam(2e-4, betas (0.5, 0.999)), batch 64
    parser.set_defaults(learning_rate=2e-4, adam_beta1=0.5, train_batch_size=64, num_epochs=5)
    return parser.parse_args(argv)


class GANTrainer(Trainer):
    family = "gan"
    ema_model_names = ("generator",)
    flag_checks = {**dict.fromkeys(("latent_dim", "base_channels", "d_steps"), check_positive_int),
                   "r1_gamma": check_non_negative_number, "diff_augment": parse_policy,
                   "discriminator_learning_rate": optional(check_positive_number),
                   **dict.fromkeys(("discriminator_adam_beta1", "discriminator_adam_beta2"), optional(check_probability))}

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        if args.gradient_accumulation_steps != 1:
            raise ValueError("`--gradient_accumulation_steps` must be 1 for GANs: each batch is one update of D")

    def build_models(self):
        args, data = self.args, self.train_dataset
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
        args = self.args
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
        args = self.args
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
        return diff_augment(images, parse_policy("--diff_augment", self.args.diff_augment))

    def build_pipeline(self):
        generator, discriminator = self.sampling_model("generator"), self.unwrap("discriminator")
        if self.args.conditional:
            return ConditionalPipeline(generator, discriminator)
        return GANPipeline(generator, discriminator)

    def model_card_description(self):
        kind = "conditional GAN" if self.args.conditional else "GAN"
        return (f"A {kind} ({self.args.architecture}, {self.args.loss} loss) trained with hfgen on "
                f"`{self.args.dataset_name}`. The discriminator is included as an optional pipeline component, "
                f"so adversarial fine-tuning can resume from this folder.")


def main(argv=None) -> str:
    return GANTrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
