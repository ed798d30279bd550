"""Trains a VAE or conditional VAE with the (beta-)ELBO (docs/maths.md §2.4, §5.1).

    accelerate launch -m hfgen.training.train_vae --output_dir hfgen-vae-mnist
    hfgen train vae --output_dir hfgen-cvae-mnist --conditional
    hfgen train vae --output_dir hfgen-vae-mnist --latent_sampler gmm   # + a Gaussian mixture fitted to q(z)
    hfgen train vae --output_dir hfgen-cvae-mnist --conditional --latent_sampler gmm   # one per class, q(z|y)
"""

import dataclasses
import logging
import math

import torch

from hfgen.data import dataset_length, image_batches
from hfgen.models import GaussianMixtureSampler, VAEModel
from hfgen.models.latent_sampler import COVARIANCE_TYPES
from hfgen.models.vae import VAE_ARCHITECTURES, KL_ESTIMATORS, LIKELIHOODS
from hfgen.pipelines import ConditionalPipeline, VAEPipeline

from hfgen.utils import (
    check_non_negative_int, check_non_negative_number, check_positive_int, check_positive_ints, check_positive_number)

from .config import TrainingConfig, flag
from .trainer import Trainer

logger = logging.getLogger(__name__)

LATENT_SAMPLERS = ("none", "gmm")
# the latent sampler is fitted to the codes of the first this many training images (all of the bundled digits)
LATENT_SAMPLER_MAX_IMAGES = 20_000


@dataclasses.dataclass(kw_only=True)
class VAETrainingConfig(TrainingConfig):
    """Train a VAE (or a conditional VAE) on images in [0, 1]."""

    architecture: str = flag("mlp", "mlp, or conv (needed for a spatial latent).", choices=VAE_ARCHITECTURES)
    hidden_dims: list[int] = flag([400], "Encoder widths (mlp) or channels (conv).", check=check_positive_ints)
    latent_dim: int = flag(20, "Size of the vector latent z.", check=check_positive_int)
    latent_channels: int = flag(
        0, "conv: a spatial latent of this many channels at 1 / 2 ** len(hidden_dims) of the image size (latent "
        "diffusion's first stage); 0: a vector of --latent_dim.", check=check_non_negative_int)
    likelihood: str = flag("bernoulli", "The decoder p(x|z).", choices=LIKELIHOODS)
    decoder_std: float = flag(0.1, "Gaussian decoder std (fixed, or initial if learned).", check=check_positive_number)
    learn_decoder_std: bool = flag(False, "Learn the Gaussian decoder's std.")
    beta: float = flag(
        1.0, "Weight of the KL term (1: the ELBO). Below 1 the codes carry more of the image and reconstruct better, "
        "and q(z) strays further from N(0, I).", check=check_non_negative_number)
    kl_estimator: str = flag("analytic", "The KL term: in closed form, or estimated from the samples.",
                             choices=KL_ESTIMATORS)
    num_latent_samples: int = flag(1, "Reparameterized samples K per example.", check=check_positive_int)
    eval_importance_samples: int = flag(100, "K of the IWAE bound on the test split.", check=check_positive_int)
    latent_sampler: str = flag(
        "none", '"gmm": after training, fit a Gaussian mixture to the aggregated posterior q(z) (one z ~ q(z|x) per '
        f'training image, at most {LATENT_SAMPLER_MAX_IMAGES:,}; under --conditional one mixture per class, fitted to '
        'q(z|y)) and save it in the pipeline, which then samples from it by default (docs/maths.md §7.2); the card '
        'reports FD for it ("fd") and for the prior ("fd_prior"). "none": sample the prior N(0, I).',
        choices=LATENT_SAMPLERS)
    latent_sampler_components: int = flag(
        10, "Components K of the --latent_sampler mixture (of each class's mixture under --conditional).",
        check=check_positive_int)
    latent_sampler_covariance: str = flag(
        "full", "Covariance of each mixture component: full, or diagonal (for large, e.g. spatial, latents).",
        choices=COVARIANCE_TYPES)


def parse_args(argv=None) -> VAETrainingConfig:
    return VAETrainingConfig.from_command_line(argv)


class VAETrainer(Trainer):
    family = "vae"
    ema_model_names = ("vae",)
    config_class = VAETrainingConfig
    _latent_sampler = None  # (global_step, the sampler fitted at that step), fitted once at the end

    def load_data(self):
        super().load_data()
        args, num_images = self.config, dataset_length(self.train_dataset)
        # checked now, not when the mixture is fitted at the end of training
        if args.latent_sampler == "none" or num_images is None:
            return
        if args.conditional:
            counts = torch.bincount(self.train_dataset.labels[:LATENT_SAMPLER_MAX_IMAGES], minlength=self.num_classes)
            label, count = int(counts.argmin()), int(counts.min())
            if count < args.latent_sampler_components:
                raise ValueError(f"`--latent_sampler_components` {args.latent_sampler_components} exceeds the {count} "
                                 f"training images of class {label}, whose latents its mixture is fitted to")
        elif num_images < args.latent_sampler_components:
            raise ValueError(f"`--latent_sampler_components` {args.latent_sampler_components} exceeds the "
                             f"{num_images} training images whose latents the mixture is fitted to")

    def build_models(self):
        args, data = self.config, self.train_dataset
        channels, size, _ = data.image_shape
        vae = VAEModel(
            sample_size=size,
            in_channels=channels,
            latent_dim=args.latent_dim,
            architecture=args.architecture,
            hidden_dims=args.hidden_dims,
            likelihood=args.likelihood,
            decoder_std=args.decoder_std,
            learn_decoder_std=args.learn_decoder_std,
            num_classes=self.num_classes,
            id2label=self.id2label,
            latent_channels=args.latent_channels,
        )
        return {"vae": vae}

    def training_step(self, images, labels):
        args = self.config
        output = self.models["vae"](
            images, labels, num_samples=args.num_latent_samples,
            kl_estimator=args.kl_estimator,
        )
        # beta-ELBO: maximise E_q[log p(x|z)] - beta KL(q(z|x) || p(z)), averaged over the batch
        loss = -(output.log_likelihood - args.beta * output.kl).mean()
        self.optimize("vae", loss)
        return {"loss": loss.detach(), "kl": output.kl.mean().detach()}

    def build_pipeline(self):
        vae = self.sampling_model("vae")
        return self.pipeline_of(vae, self.fitted_latent_sampler(vae))

    @staticmethod
    def pipeline_of(vae: VAEModel, latent_sampler: GaussianMixtureSampler | None):
        """The pipeline a run saves: a CVAE's ConditionalPipeline or a VAEPipeline, with `latent_sampler`."""
        if vae.config.num_classes:
            return ConditionalPipeline(vae, latent_sampler=latent_sampler)
        return VAEPipeline(vae, latent_sampler=latent_sampler)

    def fitted_latent_sampler(self, vae: VAEModel) -> GaussianMixtureSampler | None:
        """Under --latent_sampler gmm, once training has ended: the mixture fitted to `vae`'s q(z), fitted once and
        cached (the final grid, FD and saved folder share it). Before the end, and without the flag: None (the
        grids during training sample the prior)."""
        if self.config.latent_sampler == "none" or self.global_step < self.max_train_steps:
            return None
        if self._latent_sampler is None or self._latent_sampler[0] != self.global_step:
            self._latent_sampler = (self.global_step, self.fit_latent_sampler(vae))
        return self._latent_sampler[1]

    @torch.no_grad()
    def fit_latent_sampler(self, vae: VAEModel) -> GaussianMixtureSampler:
        """A Gaussian mixture fitted to one sample z ~ q(z|x) of each training image (the first
        LATENT_SAMPLER_MAX_IMAGES, as stored: without random crops and flips), i.e. to the aggregated posterior
        q(z); for a CVAE, z ~ q(z|x, y) and one mixture per class y, fitted to q(z|y) (docs/maths.md §7.2)."""
        args = self.config
        parameter = next(vae.parameters())
        generator = torch.Generator(parameter.device).manual_seed(args.seed)
        images_as_stored = self.load_split("train")
        num_images = min(dataset_length(images_as_stored) or LATENT_SAMPLER_MAX_IMAGES, LATENT_SAMPLER_MAX_IMAGES)
        was_training = vae.training
        vae.eval()
        conditional, latents, class_labels = bool(vae.config.num_classes), [], []
        for images, labels in image_batches(images_as_stored, num_images, batch_size=args.eval_batch_size,
                                            num_workers=args.dataloader_num_workers, shuffle=False):
            condition = labels.to(parameter.device) if conditional else None
            posterior = vae.encode(images.to(parameter.device, parameter.dtype), condition).latent_dist
            latents.append(posterior.sample(generator).flatten(1).float().cpu())
            class_labels.append(labels)
        vae.train(was_training)
        latents, class_labels = torch.cat(latents), torch.cat(class_labels) if conditional else None
        sampler = GaussianMixtureSampler(latent_dim=math.prod(vae.latent_shape),
                                         num_components=args.latent_sampler_components,
                                         covariance_type=args.latent_sampler_covariance,
                                         num_classes=vae.config.num_classes)
        sampler.fit(latents, class_labels=class_labels, seed=args.seed)
        logger.info("fitted a %d-component Gaussian mixture to the latents of %d training images",
                    args.latent_sampler_components, len(latents))
        return sampler.to(parameter.device)

    def evaluation_options(self):
        return {"num_importance_samples": self.config.eval_importance_samples}

    def model_card_description(self):
        args = self.config
        kind = "conditional VAE" if args.conditional else "VAE"
        text = (f"A {kind} trained with hfgen on `{args.dataset_name}`. The negative ELBO and the "
                f"importance-weighted NLL bound (K = {args.eval_importance_samples}) are in nats per image.")
        if args.latent_sampler == "gmm":
            fitted_to = "each class's aggregated posterior q(z|y)" if args.conditional else "the aggregated posterior q(z)"
            per_class = " per class" if args.conditional else ""
            text += (f" Samples decode latents drawn from a {args.latent_sampler_components}-component Gaussian "
                     f"mixture{per_class} ({args.latent_sampler_covariance} covariances) fitted to {fitted_to} "
                     "of the training images (the pipeline's `latent_sampler`, its default); `fd_prior` is the FD of "
                     'samples from the prior N(0, I), `pipe(..., latent_sampler="prior")`.')
        return text


def main(argv=None) -> str:
    return VAETrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
