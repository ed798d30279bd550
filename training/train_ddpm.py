"""Trains a DDPM (docs/maths.md §6) or a flow-matching model (§6.9) with a U-Net or ViT denoiser, unconditional,
class-conditional or text-conditioned.

    accelerate launch -m hfgen.training.train_ddpm --output_dir hfgen-ddpm-mnist
    hfgen train ddpm --output_dir hfgen-ddpm-mnist --conditional --label_dropout 0.1
    hfgen train ddpm --output_dir hfgen-flow-mnist --objective flow_matching --weighting_scheme logit_normal
    hfgen train ddpm --output_dir hfgen-t2i-digits --caption_column text --prompt_dropout 0.1

--objective ddpm (the default): the denoiser regresses onto --prediction_type (noise eps, the clean image
x0 = "sample", or v) and the saved scheduler is a DDPMScheduler carrying the same prediction_type.
--objective flow_matching: the straight path x_sigma = (1 - sigma) x0 + sigma eps and the velocity eps - x0, at noise
levels drawn by --weighting_scheme and shifted by --flow_shift; the saved scheduler is a
FlowMatchEulerDiscreteScheduler with the same shift and number of timesteps. Either way training and sampling cannot
disagree. The flags of one objective are refused with the other.

Text conditioning (--caption_column: a folder's metadata.jsonl column, a Hub dataset's column, or "text" for hfgen's
captions of the bundled digits): the denoiser (a UNet2DConditionModel, or the ViT with cross-attention) attends to a
text encoder's token states (training/text_conditioning.py); the output is a TextToImagePipeline.
"""

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.training_utils import compute_snr

from hfgen.diffusion import (
    DDPM, FLOW_MATCHING, OBJECTIVES, PREDICTION_TYPES, WEIGHTING_SCHEMES, class_embeddings_for, flow_sample,
    flow_velocity, null_class_labels, sample_flow_sigmas, training_target)
from hfgen.image_processing import SYMMETRIC, from_unit_range
from hfgen.models import ViTDenoiser
from hfgen.pipelines import DDPMPipeline

from hfgen.utils import check_non_negative_int, check_positive_int, check_positive_number, check_probability

from .text_conditioning import TEXT_FLAG_CHECKS, TextConditionedTraining, add_text_arguments
from .trainer import Trainer, optional, training_parser

# The flags of one objective: flag -> (its objective, its value there when not given). Given with the other objective
# they are refused (they would be ignored); left out they take this value under their own objective, None otherwise.
OBJECTIVE_FLAGS = {
    "prediction_type": (DDPM, "epsilon"), "beta_schedule": (DDPM, "linear"), "snr_gamma": (DDPM, None),
    "eval_vlb_num_images": (DDPM, 100), "eval_vlb_num_timesteps": (DDPM, None),
    "weighting_scheme": (FLOW_MATCHING, "uniform"), "logit_mean": (FLOW_MATCHING, None),
    "logit_std": (FLOW_MATCHING, None), "flow_shift": (FLOW_MATCHING, 1.0),
}


def diffusion_parser(description: str):
    """The DDPM flags (also latent diffusion's second stage)."""
    parser = training_parser(description)
    add = parser.add_argument
    add("--denoiser", default="unet", choices=["unet", "vit"], help="diffusers' UNet2DModel or hfgen's ViTDenoiser.")
    add("--block_out_channels", type=int, nargs="+", default=[32, 64, 64],
        help="U-Net widths; the image size must be divisible by 2 ** (number of blocks - 1).")
    add("--layers_per_block", type=int, default=1)
    add("--patch_size", type=int, default=4, help="ViT: pixels per patch side.")
    add("--vit_hidden_size", type=int, default=128)
    add("--vit_layers", type=int, default=4)
    add("--vit_heads", type=int, default=4)
    add("--objective", default=DDPM, choices=OBJECTIVES,
        help="ddpm (docs/maths.md §6) or flow_matching (straight path, velocity target, §6.9).")
    add("--num_train_timesteps", type=int, default=1000, help="T: the schedule's number of noise levels.")
    add("--beta_schedule", default=None, choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        help="DDPM only (default linear).")
    add("--prediction_type", default=None, choices=PREDICTION_TYPES,
        help="DDPM only: epsilon (noise, the default), sample (x0, docs/maths.md §6.3) or v_prediction.")
    add("--snr_gamma", type=float, default=None, help="DDPM only: min-SNR loss weighting with this gamma (5 is common).")
    add("--weighting_scheme", default=None, choices=WEIGHTING_SCHEMES,
        help="Flow matching only: how the training noise levels are drawn, uniform (the default) or logit_normal "
             "(as Stable Diffusion 3).")
    add("--logit_mean", type=float, default=None, help="With --weighting_scheme logit_normal (default 0).")
    add("--logit_std", type=float, default=None, help="With --weighting_scheme logit_normal (default 1).")
    add("--flow_shift", type=float, default=None,
        help="Flow matching only: the noise levels' shift, sigma -> shift sigma / (1 + (shift - 1) sigma) (default 1: "
             "none; Stable Diffusion 3 uses 3 at 1024 px); the saved scheduler has the same one.")
    add("--label_dropout", type=float, default=0.1,
        help="With --conditional: share of labels replaced by the null class, for classifier-free guidance.")
    add("--num_inference_steps", type=int, default=50, help="Denoising steps for sample grids and FD.")
    add("--eval_vlb_num_images", type=int, default=None,
        help="DDPM only: test images of the variational bound in bits/dim (default 100; it does not apply to flow "
             "matching).")
    add("--eval_vlb_num_timesteps", type=int, default=None,
        help="DDPM only: sampled KL terms of the bound (default: all T, exact but T denoiser calls per image).")
    add_text_arguments(parser)
    parser.set_defaults(learning_rate=1e-3, train_batch_size=64, num_epochs=5)
    return parser


def parse_args(argv=None):
    return diffusion_parser("Train a DDPM or a flow-matching model on images in [-1, 1].").parse_args(argv)


def resolve_objective_flags(args) -> None:
    """Refuses the flags of the other objective, naming both; fills in the defaults of this one's (OBJECTIVE_FLAGS)."""
    given = [name for name, (objective, _) in OBJECTIVE_FLAGS.items()
             if objective != args.objective and getattr(args, name) is not None]
    if given:
        flags = ", ".join(f"`--{name}`" for name in given)
        raise ValueError(f"{flags} {'is an option' if len(given) == 1 else 'are options'} of "
                         f"`--objective {OBJECTIVE_FLAGS[given[0]][0]}`, but this run trains with "
                         f"`--objective {args.objective}`: leave {'it' if len(given) == 1 else 'them'} out")
    if args.objective == FLOW_MATCHING and args.weighting_scheme != "logit_normal" and (
            args.logit_mean is not None or args.logit_std is not None):
        raise ValueError(f"`--logit_mean` and `--logit_std` shape `--weighting_scheme logit_normal`, but it is "
                         f"{args.weighting_scheme or 'uniform'!r}")
    if args.objective == FLOW_MATCHING and args.weighting_scheme == "logit_normal":
        args.logit_mean = 0.0 if args.logit_mean is None else args.logit_mean
        args.logit_std = 1.0 if args.logit_std is None else args.logit_std
    for name, (objective, default) in OBJECTIVE_FLAGS.items():
        if objective == args.objective and getattr(args, name) is None:
            setattr(args, name, default)


class DDPMTrainer(TextConditionedTraining, Trainer):
    flag_checks = {
        **dict.fromkeys(("layers_per_block", "patch_size", "vit_hidden_size", "vit_layers", "vit_heads",
                         "num_train_timesteps", "num_inference_steps"), check_positive_int),
        **TEXT_FLAG_CHECKS,
        "label_dropout": check_probability, "snr_gamma": optional(check_positive_number),
        "eval_vlb_num_images": optional(check_non_negative_int), "eval_vlb_num_timesteps": optional(check_positive_int),
        "logit_std": optional(check_positive_number), "flow_shift": optional(check_positive_number),
    }
    # the card's tag and title, and what a checkpoint records: a checkpoint of one objective does not resume the other
    families = {DDPM: "ddpm", FLOW_MATCHING: "flow-matching"}
    clip_sample = True  # the DDPM sampler clips x0 to the images' [-1, 1]

    @property
    def family(self) -> str:
        return self.families[self.args.objective]

    @classmethod
    def check_args(cls, args):
        resolve_objective_flags(args)
        super().check_args(args)
        cls.check_text_args(args)

    def build_noise_scheduler(self):
        """The objective's diffusers scheduler: the training schedule, and (a fresh copy) the saved sampler."""
        args = self.args
        if args.objective == FLOW_MATCHING:
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=args.num_train_timesteps, shift=args.flow_shift)
        # betas explicit: diffusers' from_config gives another scheduler class its own defaults for values a config
        # left at the default (e.g. HeunDiscreteScheduler's 0.00085 / 0.012), until the config is saved and reloaded
        return DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_start=1e-4, beta_end=0.02,
                             beta_schedule=args.beta_schedule, prediction_type=args.prediction_type,
                             clip_sample=self.clip_sample)

    def build_models(self):
        args = self.args
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
        if self.text_conditioned:  # cross-attention to the text encoder's states in every block
            unet = UNet2DConditionModel(
                **shared, down_block_types=("CrossAttnDownBlock2D",) * num_blocks,
                up_block_types=("CrossAttnUpBlock2D",) * num_blocks, attention_head_dim=args.attention_head_dim,
                cross_attention_dim=self.cross_attention_dim)
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

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor):
        """x0, noise (B, C, H, W) -> (x_t, the denoiser's timesteps (B,), the regression target) for the objective."""
        args, scheduler = self.args, self.noise_scheduler
        if args.objective == FLOW_MATCHING:  # §6.9: the straight path and its velocity
            sigmas = sample_flow_sigmas(scheduler.sigmas, x0.shape[0], args.weighting_scheme, args.logit_mean,
                                        args.logit_std, device=x0.device)
            # the flow schedulers call the denoiser at sigma * T
            return flow_sample(x0, noise, sigmas), sigmas * args.num_train_timesteps, flow_velocity(x0, noise)
        timesteps = torch.randint(0, args.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = scheduler.add_noise(x0, noise, timesteps)  # q(x_t | x0) in closed form
        return x_t, timesteps, training_target(x0, noise, timesteps, args.prediction_type,
                                               scheduler.alphas_cumprod.to(x0.device))

    def training_step(self, images, labels):
        args, scheduler = self.args, self.noise_scheduler
        x0 = self.clean_sample(images)
        noise = torch.randn_like(x0)
        x_t, timesteps, target = self.corrupt(x0, noise)
        prediction = self.models["unet"](x_t, timesteps, **self.conditioning(labels)).sample
        if args.snr_gamma is None:
            loss = F.mse_loss(prediction.float(), target.float())
        else:  # min-SNR-gamma weighting (Hang et al., 2023), per the prediction type
            snr = compute_snr(scheduler, timesteps)
            weights = torch.clamp(snr, max=args.snr_gamma)
            weights = weights / snr if args.prediction_type == "epsilon" else (
                weights / (snr + 1) if args.prediction_type == "v_prediction" else weights)
            per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
            loss = (per_example * weights).mean()
        self.optimize("unet", loss)
        return {"loss": loss.detach()}

    def conditioning(self, labels: torch.Tensor | None) -> dict:
        """The denoiser's conditioning keywords for a batch's labels (B,), or captions' token ids (B, L), with
        label or prompt dropout."""
        if self.text_conditioned:
            return self.text_conditioning(labels)
        if labels is not None and self.args.label_dropout:
            dropped = torch.rand(labels.shape, device=labels.device) < self.args.label_dropout
            labels = torch.where(dropped, null_class_labels(labels, self.num_classes), labels)
        return {"class_labels": labels}

    def pipeline_kwargs(self):
        return {"num_inference_steps": self.args.num_inference_steps}

    def evaluation_options(self):
        # flow matching has no variational bound to evaluate (§6.9): the card says so instead
        return {"vlb_num_images": self.args.eval_vlb_num_images or 0, "vlb_num_timesteps": self.args.eval_vlb_num_timesteps}

    def build_pipeline(self):
        scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)  # fresh: sampling changes it
        if self.text_conditioned:
            return self.text_pipeline(self.sampling_model("unet"), scheduler)
        return DDPMPipeline(self.sampling_model("unet"), scheduler,
                            label_dropout=self.args.label_dropout if self.num_classes else None,
                            objective=self.args.objective)

    def objective_description(self) -> str:
        """What the denoiser learns, for the card."""
        args = self.args
        if args.objective == DDPM:
            return f"{args.prediction_type} prediction"
        levels = args.weighting_scheme.replace("_", "-") + (
            f" (mean {args.logit_mean:g}, std {args.logit_std:g})" if args.weighting_scheme == "logit_normal" else "")
        return (f"flow matching: velocity prediction on the straight path, {levels} noise levels, shift "
                f"{args.flow_shift:g}; sampled with FlowMatchEulerDiscreteScheduler")

    def likelihood_note(self) -> str:
        if self.args.objective == DDPM:
            return ""
        return (" Likelihood: not applicable; the DDPM variational bound (bits/dim) does not apply to flow matching "
                "(docs/maths.md §6.9), so none is reported.")

    def model_card_description(self):
        flow = self.args.objective == FLOW_MATCHING
        kind = "flow-matching model" if flow else "DDPM"
        kind = f"class-conditional {kind}" if self.num_classes else kind
        kind = f"text-to-image {kind} ({self.text_description()})" if self.text_conditioned else kind
        denoiser = "hfgen ViTDenoiser" if self.args.denoiser == "vit" else (
            "diffusers UNet2DConditionModel" if self.text_conditioned else "diffusers UNet2DModel")
        pipeline = " `DDPMPipeline` serves flow-matching models too." if flow else ""
        return (f"A {kind} ({denoiser}, {self.objective_description()}) trained with hfgen on "
                f"`{self.args.dataset_name}`; FD with {self.args.num_inference_steps} "
                f"{'sampling' if flow else 'denoising'} steps.{pipeline}{self.likelihood_note()}")


def main(argv=None) -> str:
    return DDPMTrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
