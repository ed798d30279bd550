"""Trains latent diffusion (docs/maths.md §7): a first stage (an autoencoder), then a DDPM, a flow-matching model
(§6.9, `--objective flow_matching`) or an EDM model (§6.10, `--objective edm`) on its normalized latents.

    hfgen train ldm --output_dir hfgen-ldm-mnist                          # both stages, one command
    hfgen train ldm --output_dir ldm --vae_path hfgen-ldm-mnist/first_stage  # reuse a trained VAE
    hfgen train ldm --output_dir ldm --train_data_dir photos --resolution 256 \
        --vae_path stabilityai/sd-vae-ft-mse                                 # a pretrained AutoencoderKL
    accelerate launch -m hfgen.training.train_ldm --output_dir hfgen-ldm-mnist

--vae_path takes hfgen's VAE or diffusers' AutoencoderKL, AutoencoderTiny or VQModel (`hfgen.autoencoders`), by
folder or Hub id (--vae_subfolder; a pipeline's `vae` component by default), and the saved pipeline holds it as its
`vae` component. Images are brought to the range the autoencoder takes; grey images become RGB for an RGB one. The
latents are normalized as --latent_scaling says: by default as the autoencoder's config gives (scaling_factor,
shift_factor, latents_mean / latents_std), or, for hfgen's VAE, by the training latents' measured mean and std.

Without --vae_path the first stage is trained first: with --first_stage_type vq or kl a VQ-VAE or KL autoencoder by
`train_autoencoder.py` (its --ae_* flags), by default a conv VAE with a spatial latent (--vae_latent_channels x S x S,
S = resolution / 2 ** len(--vae_hidden_dims); 4x8x8 for the default 32 px digits), trained with the ELBO by
`train_vae.py` into OUTPUT_DIR/first_stage, a VAE pipeline folder with its own card. The second stage is
`train_ddpm.py`'s trainer on latents: the training images are encoded once, their posteriors q(z|x) cached,
and every batch draws z ~ q(z|x), normalized (stored in the pipeline's config). Every DDPM flag (`train_ddpm.py`, --objective included) applies to the second stage.

The posteriors are encoded once, in chunks, into a memory-mapped cache on disk (`hfgen.latent_cache`, under
--latent_cache_dir), which later runs with the same first stage and data reuse. Images are center-cropped, since
a random crop cannot be cached; with --random_flip the mirror images' posteriors are cached too.
"""

import dataclasses
import logging
import os

from hfgen import autoencoders
from hfgen.latent_cache import LatentDataset, encode_to_cache
from hfgen.pipelines import LatentDiffusionPipeline, LatentTextToImagePipeline

from hfgen.utils import hfgen_cache_dir

from . import train_vae
from .config import FINISHED_MARK, TrainingConfig, flag, nested, redefault
from .train_autoencoder import AutoencoderTrainer, AutoencoderTrainingConfig
from .train_ddpm import DDPMTrainer, DDPMTrainingConfig

logger = logging.getLogger(__name__)

FIRST_STAGE = "first_stage"
# Shared flags that configure the second stage only; every other shared flag (data, seed, precision, logging,
# evaluation, checkpointing, ...) reaches the first stage too, so that a new shared flag cannot be lost on the way.
SECOND_STAGE_ONLY = frozenset({
    "output_dir", "num_epochs", "max_train_steps", "learning_rate", "conditional", "caption_column", "train_batch_size",
    "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "max_grad_norm", "use_ema", "ema_max_decay", "ema_inv_gamma", "ema_power", "resume_from_checkpoint",
    "eval_fd_steps", "eval_fd_num_samples", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo",
})


FIRST_STAGE_FLAGS = ("hidden_dims", "latent_channels", "num_epochs", "learning_rate", "train_batch_size", "likelihood",
                     "beta", "eval_importance_samples")  # the first stage's own flags, as --vae_<name>


AUTOENCODER_STAGE_FLAGS = ("block_out_channels", "latent_channels", "num_vq_embeddings", "commitment_cost",
                           "kl_weight", "adversarial_weight", "adversarial_start_step", "num_epochs", "learning_rate",
                           "train_batch_size")  # as --ae_<name>
FIRST_STAGE_TYPES = ("vae", "vq", "kl")


def default_autoencoder_stage() -> AutoencoderTrainingConfig:
    """The first stage trained under --first_stage_type vq or kl (`train_autoencoder.py`)."""
    return AutoencoderTrainingConfig(output_dir=FIRST_STAGE, block_out_channels=[32, 64, 64], num_epochs=20,
                                     learning_rate=2e-3)


def default_first_stage() -> train_vae.VAETrainingConfig:
    """The first stage trained without --vae_path: a conv VAE with a spatial latent. Its output folder, data and
    other shared flags are the latent diffusion run's (`LDMTrainingConfig.first_stage_config`)."""
    return train_vae.VAETrainingConfig(output_dir=FIRST_STAGE, architecture="conv", hidden_dims=[32, 64],
                                       latent_channels=4, num_epochs=20, learning_rate=2e-3)


@dataclasses.dataclass(kw_only=True)
class LDMTrainingConfig(DDPMTrainingConfig):
    """Train latent diffusion: a VAE first stage, then a DDPM, flow-matching or EDM model on its latents."""

    vae_path: str | None = flag(
        None, "A trained first stage, by folder or Hub repo id: hfgen's VAE, or diffusers' AutoencoderKL, "
        "AutoencoderTiny or VQModel (a pipeline's `vae` component unless --vae_subfolder says). Without it, a conv "
        "VAE (--vae_* flags, or `first_stage` from Python) is trained first into OUTPUT_DIR/first_stage.",
        aliases=("pretrained_vae_model_name_or_path",))
    vae_subfolder: str | None = flag(None, "The first stage's subfolder within --vae_path (e.g. vae).")
    latent_scaling: str = flag(
        "auto", "How the latents are normalized for the denoiser: config (the autoencoder's scaling_factor, "
        "shift_factor, latents_mean/latents_std), data (the training latents' measured mean and std), auto (config "
        "for AutoencoderKL and AutoencoderTiny, data for hfgen's VAE and VQModel, whose configs keep no fitted "
        "normalization).", choices=autoencoders.LATENT_SCALINGS)
    first_stage_type: str = flag(
        "vae", "The first stage trained without --vae_path: vae (hfgen's conv VAE, --vae_* flags), vq (a VQ-VAE, "
        "diffusers' VQModel) or kl (diffusers' AutoencoderKL), both by train_autoencoder.py with the --ae_* flags.",
        choices=FIRST_STAGE_TYPES)
    first_stage: train_vae.VAETrainingConfig = nested(default_first_stage, "vae_", FIRST_STAGE_FLAGS, "First stage: ")
    autoencoder_stage: AutoencoderTrainingConfig = nested(
        default_autoencoder_stage, "ae_", AUTOENCODER_STAGE_FLAGS, "First stage (--first_stage_type vq or kl): ")
    latent_cache_dir: str | None = flag(
        None, "Where the training latents are cached on disk (default: $HFGEN_CACHE/latents), reused by later runs.")
    resolution: int = redefault(TrainingConfig, "resolution", 32)
    block_out_channels: list[int] = redefault(DDPMTrainingConfig, "block_out_channels", [64, 128])
    # Latents are encoded once per image: a random crop cannot be cached, so images are always center-cropped.
    # Flips are cached both ways (--random_flip).
    center_crop: bool = redefault(TrainingConfig, "center_crop", True)

    def validate(self) -> None:
        """Checked before either stage trains."""
        super().validate()
        if self.streaming:
            raise ValueError("latent diffusion encodes every training image once into a cache: `--streaming` is not "
                             "supported (use `--max_train_samples` to train on part of a large dataset)")
        if self.vae_subfolder is not None and self.vae_path is None:
            raise ValueError("`--vae_subfolder` names a subfolder of `--vae_path`: pass `--vae_path` too")
        if self.vae_path is None and self.first_stage_type != "vae":
            self.autoencoder_stage.check_fields(prefix="--ae_")  # named as the command line sets them
            self.first_stage_config().validate()
        elif self.vae_path is None:
            self.first_stage.check_fields(prefix="--vae_")
            if self.first_stage.architecture != "conv" or not self.first_stage.latent_channels:
                raise ValueError("`first_stage` must be a conv VAE with a spatial latent (architecture='conv', "
                                 f"latent_channels > 0), got {self.first_stage.architecture!r} with latent_channels="
                                 f"{self.first_stage.latent_channels}")
            self.first_stage_config().validate()

    def first_stage_config(self) -> train_vae.VAETrainingConfig | AutoencoderTrainingConfig:
        """`first_stage` (or `autoencoder_stage`, as --first_stage_type says) as it trains: in OUTPUT_DIR/first_stage,
        with every shared field of this run except SECOND_STAGE_ONLY, so that a new shared flag cannot be lost on the
        way; an interrupted first stage resumes."""
        shared = {field.name for field in dataclasses.fields(TrainingConfig)} - SECOND_STAGE_ONLY
        stage = (self.first_stage if self.first_stage_type == "vae" else
                 dataclasses.replace(self.autoencoder_stage, architecture=self.first_stage_type))
        return dataclasses.replace(
            stage, **{name: getattr(self, name) for name in shared},
            output_dir=os.path.join(self.output_dir, FIRST_STAGE),
            resume_from_checkpoint="latest" if self.resume_from_checkpoint else None)


def parse_args(argv=None) -> LDMTrainingConfig:
    return LDMTrainingConfig.from_command_line(argv)


def train_first_stage(config: LDMTrainingConfig) -> str:
    """Trains the first stage into OUTPUT_DIR/first_stage unless it is there already; returns that folder."""
    folder = os.path.join(config.output_dir, FIRST_STAGE)
    if not os.path.isfile(os.path.join(folder, FINISHED_MARK)):  # not trained yet (or interrupted)
        trainer = train_vae.VAETrainer if config.first_stage_type == "vae" else AutoencoderTrainer
        trainer(config.first_stage_config()).train()
    return folder


class LDMTrainer(DDPMTrainer):
    pipeline_kind = "latents"
    clip_sample = False  # scaled latents have unit variance, not the [-1, 1] range of images: z0 is not clipped
    size_name = "the VAE's latent size"
    config_class = LDMTrainingConfig

    def __init__(self, config: LDMTrainingConfig):
        if isinstance(config, LDMTrainingConfig) and config.vae_path is None:
            config.validate()  # both stages' flags, before either trains
            config = dataclasses.replace(config, vae_path=train_first_stage(config))
        super().__init__(config)

    def load_data(self):
        """The first stage, then the data in the channels it takes: grey images become RGB for an RGB autoencoder."""
        args = self.config
        self.vae = autoencoders.load_first_stage(args.vae_path, args.vae_subfolder)
        autoencoders.check_spatial(self.vae)
        super().load_data()
        channels = autoencoders.image_channels(self.vae)
        if args.num_channels is None and self.train_dataset.image_shape[0] == 1 and channels == 3:
            logger.info("the first stage takes RGB images: the grey images of the dataset are converted to RGB")
            args.num_channels = 3  # recorded with the run
            self.train_dataset = self.load_split("train", augment=True)
            self.test_dataset = self.load_split(self.source.test_split)

    def build_models(self):
        # the first stage may just have been written by the main process
        self.accelerator.wait_for_everyone()
        self.vae = self.vae.to(self.accelerator.device).eval().requires_grad_(False)
        self.latent_shape = autoencoders.latent_shape(self.vae, self.train_dataset.image_shape)
        cache_dir = self.config.latent_cache_dir or os.path.join(hfgen_cache_dir(), "latents")
        unaugmented = self.load_split("train")
        with self.accelerator.main_process_first():  # the main process encodes; the others then find the cache
            folder = encode_to_cache(self.vae, unaugmented, cache_dir, flips=self.config.random_flip,
                                     batch_size=self.config.eval_batch_size, num_workers=self.config.dataloader_num_workers,
                                     show_progress=self.accelerator.is_local_main_process)
        # a batch's second element: the class labels, or with --caption_column the captions' token ids
        conditions = self.caption_ids if self.text_conditioned else unaugmented.labels
        self.latent_dataset = LatentDataset(folder, conditions, unaugmented.id2label, seed=self.config.seed)
        self.normalization = autoencoders.choose_normalization(
            self.vae, self.config.latent_scaling, self.latent_dataset.latent_mean, self.latent_dataset.latent_std)
        return super().build_models()

    def sample_shape(self):
        return self.latent_shape

    def training_data(self):
        return self.latent_dataset

    def clean_sample(self, batch):
        """Posterior moments (B, 2C, S, S) -> z0 = (z - shift) * scale, z ~ q(z|x)."""
        return self.normalization.normalize(self.latent_dataset.posterior(batch).sample())

    def build_pipeline(self):
        pipeline = super().build_pipeline()
        scale, shift = self.normalization.scale, self.normalization.shift
        if self.text_conditioned:
            return LatentTextToImagePipeline(self.vae, pipeline.unet, pipeline.scheduler, pipeline.text_encoder,
                                             pipeline.tokenizer, scale, self.config.prompt_dropout,
                                             self.config.objective, shift)
        return LatentDiffusionPipeline(self.vae, pipeline.unet, pipeline.scheduler, scale,
                                       pipeline.config.get("label_dropout"), self.config.objective, shift)

    def base_models(self) -> list[str]:
        return [*([self.config.vae_path] if self.config.vae_path else []), *super().base_models()]

    def model_card_description(self):
        kind = "class-conditional latent diffusion" if self.num_classes else "latent diffusion"
        kind = f"text-to-image latent diffusion ({self.text_description()})" if self.text_conditioned else kind
        first_stage = f"a {type(self.vae).__name__} first stage from `{self.config.vae_path}`"
        return (f"{kind[0].upper() + kind[1:]} trained with hfgen on `{self.config.dataset_name}`: {first_stage} "
                f"with {'x'.join(map(str, self.latent_shape))} latents, normalized as {self.normalization.describe()}, "
                f"and a denoiser in its latent space ({self.objective.describe()}). FD with "
                f"{self.config.num_inference_steps} sampling steps; first_stage_reconstruction_mse is the mean squared "
                f"pixel error of test images decoded from their posterior means.{self.objective.likelihood_note}")


def main(argv=None) -> str:
    return LDMTrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
