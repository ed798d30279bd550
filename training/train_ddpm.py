"""Trains a DDPM (docs/maths.md §6), a flow-matching model (§6.9) or an EDM model (§6.10) with a U-Net or ViT
denoiser, unconditional, class-conditional or text-conditioned.

    accelerate launch -m hfgen.training.train_ddpm --output_dir hfgen-ddpm-mnist
    hfgen train ddpm --output_dir hfgen-ddpm-mnist --conditional --label_dropout 0.1
    hfgen train ddpm --output_dir hfgen-flow-mnist --objective flow_matching --weighting_scheme logit_normal
    hfgen train ddpm --output_dir hfgen-edm-mnist --objective edm
    hfgen train ddpm --output_dir hfgen-t2i-digits --caption_column text --prompt_dropout 0.1

--objective ddpm (the default): the denoiser regresses onto --prediction_type (noise eps, the clean image
x0 = "sample", or v) and the saved scheduler is a DDPMScheduler carrying the same prediction_type.
--objective flow_matching: the straight path x_sigma = (1 - sigma) x0 + sigma eps and the velocity eps - x0, at noise
levels drawn by --weighting_scheme and shifted by --flow_shift; the saved scheduler is a
FlowMatchEulerDiscreteScheduler with the same shift and number of timesteps.
--objective edm: Karras et al.'s preconditioned denoiser at log-normal noise levels; the saved scheduler is an
EDMEulerScheduler with the same sigma_data. Each way training and sampling cannot disagree. What differs between the
objectives lives in hfgen/objectives.py; the flags of one objective are refused with another.

Text conditioning (--caption_column: a folder's metadata.jsonl column, a Hub dataset's column, or "text" for hfgen's
captions of the bundled digits): the denoiser (a UNet2DConditionModel, or the ViT with cross-attention) attends to a
text encoder's token states (training/text_conditioning.py); the output is a TextToImagePipeline.
"""

import dataclasses

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from hfgen.data import image_batches
from hfgen.diffusion import class_embeddings_for, null_class_labels
from hfgen.image_processing import SYMMETRIC, from_unit_range
from hfgen.models import ViTDenoiser
from hfgen.objectives import OBJECTIVES, DDPMObjective, objective_flags, objective_from_args
from hfgen.pipelines import DDPMPipeline

from hfgen.utils import check_positive_int, check_positive_ints, check_probability

from .config import TrainingConfig, flag, redefault
from .text_conditioning import TextConditionedTraining, TextConditioningConfig
from .trainer import Trainer

# A text-conditioned U-Net's blocks attend (self- and cross-attention) only where their feature map is at most this
# many pixels a side, as DDPM's U-Net attends at 16x16 only: the (HW)^2 attention maps of a 32x32 block made a
# 32 px CPU training step about 11x slower than the unconditional U-Net's. The middle block always attends.
MAX_ATTENTION_SIZE = 16


def text_unet_blocks(size: int, num_blocks: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The down and up block types of a text-conditioned U-Net on `size` px inputs: cross-attention blocks where the
    feature map is at most MAX_ATTENTION_SIZE a side, plain resnet blocks above."""
    attends = [size // 2 ** index <= MAX_ATTENTION_SIZE for index in range(num_blocks)]
    return (tuple("CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in attends),
            tuple("CrossAttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(attends)))


def objective_flag(name: str):
    """A config field for an objective's own flag (hfgen.objectives): None until given, so that a flag given to
    another objective can be refused by name; its help, choices and check are the objective's."""
    _, spec = objective_flags()[name]
    return flag(None, spec.help, choices=spec.choices)


@dataclasses.dataclass(kw_only=True)
class DDPMTrainingConfig(TextConditioningConfig):
    """Train a DDPM, a flow-matching or an EDM model on images in [-1, 1]."""

    denoiser: str = flag("unet", "diffusers' UNet2DModel or hfgen's ViTDenoiser.", choices=("unet", "vit"))
    block_out_channels: list[int] = flag(
        [32, 64, 64], "U-Net widths; the image size must be divisible by 2 ** (number of blocks - 1).",
        check=check_positive_ints)
    layers_per_block: int = flag(1, "U-Net: resnet layers per block.", check=check_positive_int)
    patch_size: int = flag(4, "ViT: pixels per patch side.", check=check_positive_int)
    vit_hidden_size: int = flag(128, "ViT: width.", check=check_positive_int)
    vit_layers: int = flag(4, "ViT: transformer blocks.", check=check_positive_int)
    vit_heads: int = flag(4, "ViT: attention heads.", check=check_positive_int)
    objective: str = flag(
        DDPMObjective.name, "ddpm (docs/maths.md §6), flow_matching (straight path, velocity target, §6.9) or edm "
        "(Karras et al. 2022, §6.10).", choices=list(OBJECTIVES))
    num_train_timesteps: int = flag(1000, "T: the schedule's number of noise levels.", check=check_positive_int)
    # each objective's own flags (hfgen.objectives), checked by the objective
    prediction_type: str | None = objective_flag("prediction_type")
    beta_schedule: str | None = objective_flag("beta_schedule")
    snr_gamma: float | None = objective_flag("snr_gamma")
    eval_vlb_num_images: int | None = objective_flag("eval_vlb_num_images")
    eval_vlb_num_timesteps: int | None = objective_flag("eval_vlb_num_timesteps")
    weighting_scheme: str | None = objective_flag("weighting_scheme")
    logit_mean: float | None = objective_flag("logit_mean")
    logit_std: float | None = objective_flag("logit_std")
    flow_shift: float | None = objective_flag("flow_shift")
    p_mean: float | None = objective_flag("p_mean")
    p_std: float | None = objective_flag("p_std")
    sigma_data: float | None = objective_flag("sigma_data")
    label_dropout: float = flag(
        0.1, "With --conditional: share of labels replaced by the null class, for classifier-free guidance.",
        check=check_probability)
    num_inference_steps: int = flag(50, "Denoising steps for sample grids and FD.", check=check_positive_int)
    train_batch_size: int = redefault(TrainingConfig, "train_batch_size", 64)
    num_epochs: int = redefault(TrainingConfig, "num_epochs", 5)

    def validate(self) -> None:
        super().validate()
        objective_from_args(self)  # another objective's flags refused, this one's checked


def parse_args(argv=None) -> DDPMTrainingConfig:
    return DDPMTrainingConfig.from_command_line(argv)


class DDPMTrainer(TextConditionedTraining, Trainer):
    config_class = DDPMTrainingConfig
    pipeline_kind = "pixels"  # which of the objective's card tags names this trainer's runs (PIPELINE_KINDS)
    clip_sample = True  # the DDPM sampler clips x0 to the images' [-1, 1]

    @property
    def family(self) -> str:
        """The card's tag, and what a checkpoint records: a checkpoint of one objective does not resume another."""
        return self.objective.tags[self.pipeline_kind]

    @property
    def objective(self):
        """The run's objective (hfgen.objectives) with its flags' values (EDM's sigma_data filled in by
        `build_noise_scheduler`)."""
        if "_objective" not in self.__dict__:
            self._objective = objective_from_args(self.config)
        return self._objective

    def build_noise_scheduler(self):
        """The objective's diffusers scheduler: the training schedule, and (a fresh copy) the saved sampler. An
        objective that takes statistics from the data (EDM's sigma_data) sees a few training batches first."""
        objective = self.objective
        if objective.needs_data():
            objective.fit(self.clean_samples_for_statistics())
        for name in objective.flags:  # what was used, recorded with the run (and its card)
            setattr(self.config, name, getattr(objective, name))
        return objective.scheduler(self.config.num_train_timesteps, clip_sample=self.clip_sample)

    def clean_samples_for_statistics(self, num_images: int = 1024) -> torch.Tensor:
        """x0 of the first `num_images` training examples (images, or a latent diffusion's latents)."""
        batches, count = [], 0
        for images, _ in image_batches(self.training_data(), batch_size=min(256, num_images), shuffle=False):
            batches.append(self.clean_sample(images.to(self.accelerator.device)))
            count += len(images)
            if count >= num_images:
                break
        samples = torch.cat(batches)[:num_images]
        if self.accelerator.num_processes > 1:  # every process fits on the main process's (streamed shards differ)
            from accelerate.utils import broadcast

            samples = broadcast(samples.contiguous())
        return samples

    def build_models(self):
        args = self.config
        channels, size, _ = self.sample_shape()
        self.noise_scheduler = self.build_noise_scheduler()
        num_class_embeds = class_embeddings_for(self.num_classes)  # the null class K included
        text_models = self.build_text_encoder()  # with --caption_column; sets cross_attention_dim
        if args.denoiser == "vit":
            unet = ViTDenoiser(sample_size=size, in_channels=channels, out_channels=channels,
                               patch_size=args.patch_size, hidden_size=args.vit_hidden_size,
                               num_layers=args.vit_layers, num_heads=args.vit_heads, num_class_embeds=num_class_embeds,
                               cross_attention_dim=self.cross_attention_dim)
            return {"unet": unet, **text_models}
        downsample = 2 ** (len(args.block_out_channels) - 1)
        if size % downsample:
            raise ValueError(f"{self.size_name} {size} must be divisible by {downsample} for "
                             f"{len(args.block_out_channels)} U-Net blocks (`--block_out_channels`)")
        num_blocks = len(args.block_out_channels)
        shared = dict(sample_size=size, in_channels=channels, out_channels=channels,
                      block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
                      norm_num_groups=min(8, args.block_out_channels[0]))
        if self.text_conditioned:  # attention to the text encoder's states in the middle and the small blocks
            down_block_types, up_block_types = text_unet_blocks(size, num_blocks)
            unet = UNet2DConditionModel(
                **shared, down_block_types=down_block_types, up_block_types=up_block_types,
                attention_head_dim=args.attention_head_dim, cross_attention_dim=self.cross_attention_dim)
        else:
            unet = UNet2DModel(**shared, down_block_types=("DownBlock2D",) * num_blocks,
                               up_block_types=("UpBlock2D",) * num_blocks, num_class_embeds=num_class_embeds)
        return {"unet": unet, **text_models}

    size_name = "`--resolution`"  # what sets the denoiser's input size, for error messages

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser denoises: the images."""
        return self.train_dataset.image_shape

    def clean_sample(self, batch: torch.Tensor) -> torch.Tensor:
        """A training batch -> x0 for the forward process: images in [0, 1] mapped to [-1, 1]."""
        return from_unit_range(batch, SYMMETRIC)

    def clean_and_noise(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch -> (x0, the noise it is corrupted with): fresh Gaussian noise (reflow's pairs bring
        their own, training/train_distill.py)."""
        x0 = self.clean_sample(batch)
        return x0, torch.randn_like(x0)

    def training_step(self, images, labels):
        x0, noise = self.clean_and_noise(images)
        model_input, timesteps, target, weights = self.objective.corrupt(x0, noise, self.noise_scheduler)
        prediction = self.models["unet"](model_input, timesteps, **self.conditioning(labels)).sample
        loss = self.objective.loss(prediction, target, weights)
        self.optimize("unet", loss)
        return {"loss": loss.detach()}

    def conditioning(self, labels: torch.Tensor | None) -> dict:
        """The denoiser's conditioning keywords for a batch's labels (B,), or captions' token ids (B, L), with
        label or prompt dropout."""
        if self.text_conditioned:
            return self.text_conditioning(labels)
        if labels is not None and self.config.label_dropout:
            dropped = torch.rand(labels.shape, device=labels.device) < self.config.label_dropout
            labels = torch.where(dropped, null_class_labels(labels, self.num_classes), labels)
        return {"class_labels": labels}

    def pipeline_kwargs(self):
        return {"num_inference_steps": self.config.num_inference_steps}

    def evaluation_options(self):
        # only the DDPM has a variational bound to evaluate (§6.9, §6.10): the card says so for the others
        return {**super().evaluation_options(), "vlb_num_images": self.config.eval_vlb_num_images or 0,
                "vlb_num_timesteps": self.config.eval_vlb_num_timesteps}

    def build_pipeline(self):
        scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)  # fresh: sampling changes it
        if self.text_conditioned:
            return self.text_pipeline(self.sampling_model("unet"), scheduler)
        return DDPMPipeline(self.sampling_model("unet"), scheduler,
                            label_dropout=self.config.label_dropout if self.num_classes else None,
                            objective=self.config.objective)

    def model_card_description(self):
        objective = self.objective
        kind = f"class-conditional {objective.title}" if self.num_classes else objective.title
        kind = f"text-to-image {kind} ({self.text_description()})" if self.text_conditioned else kind
        denoiser = "hfgen ViTDenoiser" if self.config.denoiser == "vit" else (
            "diffusers UNet2DConditionModel" if self.text_conditioned else "diffusers UNet2DModel")
        pipeline = "" if objective.has_likelihood_bound else f" `DDPMPipeline` serves {objective.title}s too."
        return (f"A {kind} ({denoiser}, {objective.describe()}) trained with hfgen on "
                f"`{self.config.dataset_name}`; FD with {self.config.num_inference_steps} "
                f"sampling steps.{pipeline}{objective.likelihood_note}")


def main(argv=None) -> str:
    return DDPMTrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
