"""Trains latent diffusion (docs/maths.md §7): a VAE first stage, then a DDPM, a flow-matching model (§6.9,
`--objective flow_matching`) or an EDM model (§6.10, `--objective edm`) on its scaled latents.

    hfgen train ldm --output_dir hfgen-ldm-mnist                          # both stages, one command
    hfgen train ldm --output_dir ldm --vae_path hfgen-ldm-mnist/first_stage  # reuse a trained VAE
    accelerate launch -m hfgen.training.train_ldm --output_dir hfgen-ldm-mnist

Without --vae_path the first stage is a conv VAE with a spatial latent (--vae_latent_channels x S x S,
S = resolution / 2 ** len(--vae_hidden_dims); 4x8x8 for the default 32 px digits), trained with the ELBO by
`train_vae.py` into OUTPUT_DIR/first_stage, a VAE pipeline folder with its own card. The second stage is
`train_ddpm.py`'s trainer on latents: the training images are encoded once, their posteriors q(z|x) cached,
and every batch draws z ~ q(z|x), scaled by the factor that gives the training latents unit variance (stored in
the pipeline's config). Every DDPM flag (`train_ddpm.py`, --objective included) applies to the second stage.

The posteriors are encoded once, in chunks, into a memory-mapped cache on disk (`hfgen.latent_cache`, under
--latent_cache_dir), which later runs with the same first stage and data reuse. Images are center-cropped, since
a random crop cannot be cached; with --random_flip the mirror images' posteriors are cached too.
"""

import argparse
import os

import torch

from hfgen.data import image_batches
from hfgen.latent_cache import LatentDataset, encode_to_cache
from hfgen.models import VAEModel
from hfgen.models.vae import LIKELIHOODS
from hfgen.pipelines import AutoPipeline, LatentDiffusionPipeline, LatentTextToImagePipeline

from . import train_vae
from .train_ddpm import DDPMTrainer, diffusion_parser
from hfgen.utils import check_non_negative_number, check_positive_int, check_positive_number, hfgen_cache_dir

from .trainer import training_parser

FIRST_STAGE = "first_stage"
# Shared flags that configure the second stage only; every other shared flag (data, seed, precision, logging,
# evaluation, checkpointing, ...) reaches the first stage too, so that a new shared flag cannot be lost on the way.
SECOND_STAGE_ONLY = frozenset({
    "output_dir", "num_epochs", "max_train_steps", "learning_rate", "conditional", "caption_column", "train_batch_size",
    "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "max_grad_norm", "use_ema", "ema_max_decay", "ema_inv_gamma", "ema_power", "resume_from_checkpoint",
    "eval_fd_steps", "eval_fd_num_samples", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo",
})


def parse_args(argv=None):
    parser = diffusion_parser("Train latent diffusion: a VAE first stage, then a DDPM or flow-matching model on "
                              "its latents.")
    add = parser.add_argument
    add("--vae_path", default=None,
        help="A trained first stage: a VAE pipeline folder or Hub repo id, or a saved VAEModel folder. "
             "Without it, a conv VAE is trained first into OUTPUT_DIR/first_stage.")
    add("--vae_hidden_dims", type=int, nargs="+", default=[32, 64], help="First stage: conv channels.")
    add("--vae_latent_channels", type=int, default=4, help="First stage: channels of the spatial latent.")
    add("--vae_num_epochs", type=int, default=20, help="First stage: epochs.")
    add("--vae_learning_rate", type=float, default=2e-3, help="First stage: learning rate.")
    add("--vae_train_batch_size", type=int, default=100, help="First stage: batch size per process.")
    add("--vae_likelihood", default="bernoulli", choices=LIKELIHOODS, help="First stage: decoder.")
    add("--vae_beta", type=float, default=1.0,
        help="First stage: weight of its KL term (1: the ELBO). Below 1 the codes carry more of the image and "
             "reconstruct better, and q(z) strays further from N(0, I); Stable Diffusion's VAE uses a tiny one.")
    add("--vae_eval_importance_samples", type=int, default=100,
        help="First stage: K of its IWAE bound on the test split, reported on its card (1: the ELBO alone, cheapest).")
    add("--latent_cache_dir", default=None,
        help="Where the training latents are cached on disk (default: $HFGEN_CACHE/latents), reused by later runs.")
    # Latents are encoded once per image: a random crop cannot be cached, so images are always center-cropped.
    # Flips are cached both ways (--random_flip).
    parser.set_defaults(resolution=32, block_out_channels=[64, 128], center_crop=True)
    return parser.parse_args(argv)


def first_stage_args(args) -> argparse.Namespace:
    """`train_vae.py`'s arguments for the first stage: every shared flag of this run except SECOND_STAGE_ONLY,
    and the --vae_* flags."""
    vae_args = train_vae.parse_args(["--output_dir", os.path.join(args.output_dir, FIRST_STAGE)])
    shared = {action.dest for action in training_parser("")._actions if action.dest != "help"}
    for name in shared - SECOND_STAGE_ONLY:
        setattr(vae_args, name, getattr(args, name))
    vae_args.architecture, vae_args.hidden_dims = "conv", args.vae_hidden_dims
    vae_args.latent_channels, vae_args.likelihood = args.vae_latent_channels, args.vae_likelihood
    vae_args.num_epochs, vae_args.learning_rate = args.vae_num_epochs, args.vae_learning_rate
    vae_args.train_batch_size, vae_args.beta = args.vae_train_batch_size, args.vae_beta
    vae_args.eval_importance_samples = args.vae_eval_importance_samples
    vae_args.resume_from_checkpoint = "latest" if args.resume_from_checkpoint else None  # an interrupted first stage continues
    return vae_args


def train_first_stage(args) -> str:
    """Trains the first stage into OUTPUT_DIR/first_stage; returns that folder."""
    return train_vae.VAETrainer(first_stage_args(args)).train()


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
    pipeline_kind = "latents"
    clip_sample = False  # scaled latents have unit variance, not the [-1, 1] range of images: z0 is not clipped
    size_name = "the VAE's latent size"
    flag_checks = {**DDPMTrainer.flag_checks, "vae_learning_rate": check_positive_number,
                   "vae_beta": check_non_negative_number,
                   **dict.fromkeys(("vae_latent_channels", "vae_num_epochs", "vae_train_batch_size",
                                     "vae_eval_importance_samples"), check_positive_int)}

    @classmethod
    def check_args(cls, args):
        """Checked before either stage trains."""
        super().check_args(args)
        if args.streaming:
            raise ValueError("latent diffusion encodes every training image once into a cache: `--streaming` is not "
                             "supported (use `--max_train_samples` to train on part of a large dataset)")
        if args.vae_path is None:
            train_vae.VAETrainer.check_args(first_stage_args(args))

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
        cache_dir = self.args.latent_cache_dir or os.path.join(hfgen_cache_dir(), "latents")
        unaugmented = self.load_split("train")
        with self.accelerator.main_process_first():  # the main process encodes; the others then find the cache
            folder = encode_to_cache(self.vae, unaugmented, cache_dir, flips=self.args.random_flip,
                                     batch_size=self.args.eval_batch_size, num_workers=self.args.dataloader_num_workers,
                                     show_progress=self.accelerator.is_local_main_process)
        # a batch's second element: the class labels, or with --caption_column the captions' token ids
        conditions = self.caption_ids if self.text_conditioned else unaugmented.labels
        self.latent_dataset = LatentDataset(folder, conditions, unaugmented.id2label, seed=self.args.seed)
        self.scaling_factor = self.latent_dataset.scaling_factor
        return super().build_models()

    def sample_shape(self):
        return tuple(self.vae.latent_shape)

    def training_data(self):
        return self.latent_dataset

    def clean_sample(self, batch):
        """Posterior moments (B, 2C, S, S) -> z0 = scaling_factor * z, z ~ q(z|x)."""
        return self.scaling_factor * self.latent_dataset.posterior(batch).sample()

    def build_pipeline(self):
        pipeline = super().build_pipeline()
        if self.text_conditioned:
            return LatentTextToImagePipeline(self.vae, pipeline.unet, pipeline.scheduler, pipeline.text_encoder,
                                             pipeline.tokenizer, self.scaling_factor, self.args.prompt_dropout,
                                             self.args.objective)
        return LatentDiffusionPipeline(self.vae, pipeline.unet, pipeline.scheduler, self.scaling_factor,
                                       pipeline.config.get("label_dropout"), self.args.objective)

    def evaluate(self, pipeline, num_samples, likelihood=True):
        metrics = super().evaluate(pipeline, num_samples, likelihood)
        if likelihood:  # the final evaluation also reports how well the first stage reconstructs
            metrics["first_stage_reconstruction_mse"] = reconstruction_mse(self.vae, self.test_dataset)
        return metrics

    def model_card_description(self):
        kind = "class-conditional latent diffusion" if self.num_classes else "latent diffusion"
        kind = f"text-to-image latent diffusion ({self.text_description()})" if self.text_conditioned else kind
        return (f"{kind[0].upper() + kind[1:]} trained with hfgen on `{self.args.dataset_name}`: a conv VAE first stage with "
                f"{'x'.join(map(str, self.vae.latent_shape))} latents (scaling factor {self.scaling_factor:.4f}), "
                f"and a denoiser in its latent space ({self.objective.describe()}). FD with "
                f"{self.args.num_inference_steps} sampling steps; first_stage_reconstruction_mse is the mean squared "
                f"pixel error of test images decoded from their posterior means.{self.objective.likelihood_note}")


@torch.no_grad()
def reconstruction_mse(vae: VAEModel, dataset, batch_size: int = 500) -> float:
    """Mean squared error per pixel of x against decode(E[q(z|x)]) over the images of `dataset` (in [0, 1])."""
    parameter = next(vae.parameters())
    total, count = 0.0, 0
    for images, _ in image_batches(dataset, len(dataset), batch_size=batch_size):
        posterior = vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist
        decoded = vae.decode(posterior.mean).sample.float().cpu()
        total += torch.sum((decoded - images) ** 2).item()
        count += images.numel()
    return total / count


def main(argv=None) -> str:
    args = parse_args(argv)
    LDMTrainer.check_args(args)
    if args.vae_path is None:
        args.vae_path = os.path.join(args.output_dir, FIRST_STAGE)
        if not os.path.isfile(os.path.join(args.vae_path, "model_index.json")):  # not trained yet (or interrupted)
            train_first_stage(args)
    return LDMTrainer(args).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
