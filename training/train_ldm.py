"""Trains latent diffusion (seed notes §5.7; MATHS.md): a VAE first stage, then a DDPM on its scaled latents.

    hfgen train ldm --output_dir hfgen-ldm-mnist                          # both stages, one command
    hfgen train ldm --output_dir ldm --vae_path hfgen-ldm-mnist/first_stage  # reuse a trained VAE
    accelerate launch -m hfgen.training.train_ldm --output_dir hfgen-ldm-mnist

Without --vae_path the first stage is a conv VAE with a spatial latent (--vae_latent_channels x S x S,
S = resolution / 2 ** len(--vae_hidden_dims); 4x8x8 for the default 32 px digits), trained with the ELBO by
`train_vae.py` into OUTPUT_DIR/first_stage, a VAE pipeline folder with its own card. The second stage is
`train_ddpm.py`'s trainer on latents: the training images are encoded once, their posteriors q(z|x) cached,
and every batch draws z ~ q(z|x), scaled by the factor that gives the training latents unit variance (stored in
the pipeline's config). Every DDPM flag applies to the second stage.
"""

import os

import torch
from diffusers import DDPMScheduler

from hfgen.data import ImageDataset
from hfgen.latent_tools import encode_images, latent_scaling_factor
from hfgen.models import VAEModel
from hfgen.models.vae import LIKELIHOODS
from hfgen.pipelines import AutoPipeline, LatentDiffusionPipeline

from . import train_vae
from .train_ddpm import DDPMTrainer, diffusion_parser

FIRST_STAGE = "first_stage"


def parse_args(argv=None):
    parser = diffusion_parser("Train latent diffusion: a VAE first stage, then a DDPM on its latents.")
    add = parser.add_argument
    add("--vae_path", default=None,
        help="A trained first stage: a VAE pipeline folder or Hub repo id, or a saved VAEModel folder. "
             "Without it, a conv VAE is trained first into OUTPUT_DIR/first_stage.")
    add("--vae_hidden_dims", type=int, nargs="+", default=[32, 64], help="First stage: conv channels.")
    add("--vae_latent_channels", type=int, default=4, help="First stage: channels of the spatial latent.")
    add("--vae_num_epochs", type=int, default=20, help="First stage: epochs.")
    add("--vae_learning_rate", type=float, default=2e-3, help="First stage: learning rate.")
    add("--vae_likelihood", default="bernoulli", choices=LIKELIHOODS, help="First stage: decoder.")
    parser.set_defaults(resolution=32, block_out_channels=[64, 128])
    return parser.parse_args(argv)


def first_stage_args(args) -> list[str]:
    """`train_vae.py` flags for the first stage: the data, seed, precision and evaluation of this run."""
    argv = ["--output_dir", os.path.join(args.output_dir, FIRST_STAGE), "--architecture", "conv",
            "--hidden_dims", *map(str, args.vae_hidden_dims), "--latent_channels", str(args.vae_latent_channels),
            "--likelihood", args.vae_likelihood, "--num_epochs", str(args.vae_num_epochs),
            "--learning_rate", str(args.vae_learning_rate), "--dataset_name", str(args.dataset_name),
            "--resolution", str(args.resolution), "--seed", str(args.seed), "--mixed_precision", args.mixed_precision,
            "--logger", args.logger, "--feature_extractor", args.feature_extractor,
            "--eval_num_samples", str(args.eval_num_samples), "--num_validation_images", str(args.num_validation_images),
            "--save_images_epochs", str(args.save_images_epochs), "--checkpointing_steps", str(args.checkpointing_steps)]
    if args.train_data_dir:
        argv += ["--train_data_dir", args.train_data_dir]
    if args.num_channels:
        argv += ["--num_channels", str(args.num_channels)]
    if args.resume_from_checkpoint:  # an interrupted first stage continues too
        argv += ["--resume_from_checkpoint", "latest"]
    return argv


def load_first_stage(path: str) -> VAEModel:
    """A pipeline folder or repo id with a `vae` (a VAE or latent diffusion pipeline), or a saved VAEModel folder
    -> the VAEModel."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return VAEModel.from_pretrained(path)
    pipeline = AutoPipeline.from_pretrained(path)
    if not isinstance(getattr(pipeline, "vae", None), VAEModel):
        raise ValueError(f"`--vae_path` {path!r} holds a {type(pipeline).__name__} without a VAE first stage")
    return pipeline.vae


class LDMTrainer(DDPMTrainer):
    family = "ldm"
    size_name = "the VAE's latent size"

    def build_models(self):
        # the first stage may just have been written by the main process
        self.accelerator.wait_for_everyone()
        self.vae = load_first_stage(self.args.vae_path).to(self.accelerator.device).eval().requires_grad_(False)
        if self.vae.config.num_classes:
            raise ValueError("`--vae_path` must hold an unconditional VAE: with --conditional the denoiser takes the labels")
        if len(self.vae.latent_shape) != 3:
            raise ValueError(f"`--vae_path` holds a VAE with a vector latent {tuple(self.vae.latent_shape)}; latent "
                             "diffusion needs a spatial one (a conv VAE trained with --latent_channels)")
        if self.vae.image_shape != self.train_dataset.image_shape:
            raise ValueError(f"the VAE at `--vae_path` takes {self.vae.image_shape} images but the data are "
                             f"{self.train_dataset.image_shape}: set --resolution / --num_channels to match")
        posterior = encode_images(self.vae, self.train_dataset.images)  # cached: encoded once for all epochs
        self.scaling_factor = latent_scaling_factor(posterior)
        # the batches carry each image's posterior (mean and logvar, stacked on the channel axis) and its label
        moments = torch.cat([posterior.mean, posterior.logvar], dim=1).cpu()
        self.latent_dataset = ImageDataset(moments, self.train_dataset.labels, self.train_dataset.id2label)
        models = super().build_models()
        # scaled latents have unit variance, not the [-1, 1] range of images: the sampler must not clip z0 to it
        self.noise_scheduler = DDPMScheduler.from_config(self.noise_scheduler.config, clip_sample=False)
        return models

    def sample_shape(self):
        return tuple(self.vae.latent_shape)

    def training_data(self):
        return self.latent_dataset

    def clean_sample(self, batch):
        """Posterior moments (B, 2C, S, S) -> z0 = scaling_factor * z, z ~ q(z|x) by reparameterization."""
        mean, logvar = batch.chunk(2, dim=1)
        return self.scaling_factor * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))

    def build_pipeline(self):
        pipeline = super().build_pipeline()
        return LatentDiffusionPipeline(self.vae, pipeline.unet, pipeline.scheduler, self.scaling_factor)

    def evaluate(self, pipeline, num_samples, likelihood=True):
        metrics = super().evaluate(pipeline, num_samples, likelihood)
        if likelihood:  # the final evaluation also reports how well the first stage reconstructs
            metrics["first_stage_reconstruction_mse"] = reconstruction_mse(self.vae, self.test_dataset.images)
        return metrics

    def model_card_description(self):
        kind = "class-conditional latent diffusion" if self.num_classes else "latent diffusion"
        return (f"{kind.capitalize()} trained with hfgen on `{self.args.dataset_name}`: a conv VAE first stage with "
                f"{'x'.join(map(str, self.vae.latent_shape))} latents (scaling factor {self.scaling_factor:.4f}), "
                f"and a denoiser in its latent space ({self.args.prediction_type} prediction). FD with "
                f"{self.args.num_inference_steps} denoising steps; first_stage_reconstruction_mse is the mean squared "
                "pixel error of test images decoded from their posterior means.")


@torch.no_grad()
def reconstruction_mse(vae: VAEModel, images: torch.Tensor, batch_size: int = 500) -> float:
    """Mean squared error per pixel of x against decode(E[q(z|x)]) for images (N, C, H, W) in [0, 1]."""
    posterior = encode_images(vae, images, batch_size)
    total = 0.0
    for start in range(0, len(images), batch_size):
        decoded = vae.decode(posterior.mean[start:start + batch_size]).sample
        total += torch.sum((decoded.float().cpu() - images[start:start + batch_size]) ** 2).item()
    return total / images.numel()


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.vae_path is None:
        args.vae_path = os.path.join(args.output_dir, FIRST_STAGE)
        if not os.path.isfile(os.path.join(args.vae_path, "model_index.json")):  # not trained yet (or interrupted)
            train_vae.main(first_stage_args(args))
    return LDMTrainer(args).train()


if __name__ == "__main__":
    main()
