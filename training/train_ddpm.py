"""Trains a DDPM (docs/maths.md §6) with a U-Net or ViT denoiser, unconditional or class-conditional.

    accelerate launch -m hfgen.training.train_ddpm --output_dir hfgen-ddpm-mnist
    hfgen train ddpm --output_dir hfgen-ddpm-mnist --conditional --label_dropout 0.1

The denoiser regresses onto --prediction_type (noise eps, the clean image x0 = "sample", or v); the saved
scheduler carries the same prediction_type, so training and sampling cannot disagree.
"""

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import compute_snr

from hfgen.diffusion import PREDICTION_TYPES, class_embeddings_for, null_class_labels, training_target
from hfgen.image_processing import SYMMETRIC, from_unit_range
from hfgen.models import ViTDenoiser
from hfgen.pipelines import DDPMPipeline

from hfgen.utils import check_non_negative_int, check_positive_int, check_positive_number, check_probability

from .trainer import Trainer, optional, training_parser


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
    add("--num_train_timesteps", type=int, default=1000)
    add("--beta_schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    add("--prediction_type", default="epsilon", choices=PREDICTION_TYPES,
        help="epsilon (noise), sample (x0, docs/maths.md §6.3) or v_prediction.")
    add("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting with this gamma (5 is common).")
    add("--label_dropout", type=float, default=0.1,
        help="With --conditional: share of labels replaced by the null class, for classifier-free guidance.")
    add("--num_inference_steps", type=int, default=50, help="Denoising steps for sample grids and FD.")
    add("--eval_vlb_num_images", type=int, default=100, help="Test images of the variational bound (bits/dim).")
    add("--eval_vlb_num_timesteps", type=int, default=None,
        help="Sampled KL terms of the bound (default: all T, exact but T denoiser calls per image).")
    parser.set_defaults(learning_rate=1e-3, train_batch_size=64, num_epochs=5)
    return parser


def parse_args(argv=None):
    return diffusion_parser("Train a DDPM on images in [-1, 1].").parse_args(argv)


class DDPMTrainer(Trainer):
    family = "ddpm"
    ema_model_names = ("unet",)
    flag_checks = {
        **dict.fromkeys(("layers_per_block", "patch_size", "vit_hidden_size", "vit_layers", "vit_heads",
                         "num_train_timesteps", "num_inference_steps"), check_positive_int),
        "label_dropout": check_probability, "snr_gamma": optional(check_positive_number),
        "eval_vlb_num_images": check_non_negative_int, "eval_vlb_num_timesteps": optional(check_positive_int),
    }

    def build_models(self):
        args = self.args
        channels, size, _ = self.sample_shape()
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps,
                                             beta_schedule=args.beta_schedule, prediction_type=args.prediction_type)
        num_class_embeds = class_embeddings_for(self.num_classes)  # the null class K included
        if args.denoiser == "vit":
            unet = ViTDenoiser(sample_size=size, in_channels=channels, out_channels=channels,
                               patch_size=args.patch_size, hidden_size=args.vit_hidden_size,
                               num_layers=args.vit_layers, num_heads=args.vit_heads, num_class_embeds=num_class_embeds)
            return {"unet": unet}
        downsample = 2 ** (len(args.block_out_channels) - 1)
        if size % downsample:
            raise ValueError(f"{self.size_name} {size} must be divisible by {downsample} for "
                             f"{len(args.block_out_channels)} U-Net blocks (`--block_out_channels`)")
        unet = UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
            down_block_types=("DownBlock2D",) * len(args.block_out_channels),
            up_block_types=("UpBlock2D",) * len(args.block_out_channels),
            norm_num_groups=min(8, args.block_out_channels[0]),
            num_class_embeds=num_class_embeds,
        )
        return {"unet": unet}

    size_name = "`--resolution`"  # what sets the denoiser's input size, for error messages

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser denoises: the images."""
        return self.train_dataset.image_shape

    def clean_sample(self, batch: torch.Tensor) -> torch.Tensor:
        """A training batch -> x0 for the forward process: images in [0, 1] mapped to [-1, 1]."""
        return from_unit_range(batch, SYMMETRIC)

    def training_step(self, images, labels):
        args, scheduler = self.args, self.noise_scheduler
        x0 = self.clean_sample(images)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, args.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = scheduler.add_noise(x0, noise, timesteps)  # q(x_t | x0) in closed form
        if labels is not None and args.label_dropout:
            dropped = torch.rand(labels.shape, device=labels.device) < args.label_dropout
            labels = torch.where(dropped, null_class_labels(labels, self.num_classes), labels)
        prediction = self.models["unet"](x_t, timesteps, class_labels=labels).sample
        target = training_target(x0, noise, timesteps, args.prediction_type, scheduler.alphas_cumprod.to(x0.device))
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

    def pipeline_kwargs(self):
        return {"num_inference_steps": self.args.num_inference_steps}

    def evaluation_options(self):
        return {"vlb_num_images": self.args.eval_vlb_num_images, "vlb_num_timesteps": self.args.eval_vlb_num_timesteps}

    def build_pipeline(self):
        return DDPMPipeline(self.sampling_model("unet"), DDPMScheduler.from_config(self.noise_scheduler.config),
                            label_dropout=self.args.label_dropout if self.num_classes else None)

    def model_card_description(self):
        kind = "class-conditional DDPM" if self.num_classes else "DDPM"
        denoiser = "hfgen ViTDenoiser" if self.args.denoiser == "vit" else "diffusers UNet2DModel"
        return (f"A {kind} ({denoiser}, {self.args.prediction_type} prediction) trained with hfgen on "
                f"`{self.args.dataset_name}`; FD with {self.args.num_inference_steps} denoising steps.")


def main(argv=None) -> str:
    return DDPMTrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
