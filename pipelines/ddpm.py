"""Ancestral and fast sampling from a diffusion model (docs/maths.md §6.6) or a flow-matching model (§6.9), with
classifier-free guidance (§6.7)."""

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from hfgen.diffusion import classes_of, forward_process, guided, null_class_labels, renoise, resampling_levels
from hfgen.objectives import DiffusionObjective, objective_class, objective_of
from hfgen.image_processing import SYMMETRIC, UNIT, preprocess
from hfgen.models import ViTDenoiser
from hfgen.utils import check_positive_int, check_unit_interval

DEFAULT_STRENGTH = 0.8  # image-to-image: the share of the reverse process run from the noised image
STATELESS_SCHEDULERS = (DDPMScheduler, DDIMScheduler)  # their steps can be undone and redone (RePaint's resampling)


@dataclasses.dataclass
class ImageEdit:
    """What a call edits: image-to-image from `start` (x_0 of the images, (B, *latent_shape)) at `strength`, and for
    inpainting the regions to regenerate, `mask` at the sample's resolution (B, 1, h, w) and `pixel_mask` at the
    image's (B, 1, H, W), 1 = regenerate, with the images' `pixels` in the pipeline's data range to paste back."""

    start: torch.Tensor
    strength: float
    mask: torch.Tensor | None = None
    pixel_mask: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    jump_length: int = 1
    resamples: int = 1

    @property
    def size(self) -> int:
        return self.start.shape[0]

    def expand(self, batch_size: int) -> "ImageEdit":
        """One image's edit repeated for a batch (a batch of images must already match it)."""
        if self.size == batch_size:
            return self
        if self.size != 1:
            raise ValueError(f"`image` holds {self.size} images but the call generates {batch_size}: pass one image, "
                             "or one per image generated")
        fields = {name: value.expand(batch_size, *value.shape[1:]) if isinstance(value, torch.Tensor) else value
                  for name, value in dataclasses.asdict(self).items()}
        return ImageEdit(**fields)

from .pipeline_utils import GenerativePipeline


class DDPMPipeline(GenerativePipeline):
    r"""Samples x_T ~ N(0, I) and denoises it step by step with `unet` (a UNet2DModel or a ViTDenoiser) and
    `scheduler`: a DDPM, or a flow-matching model (docs/maths.md §6.9).

    Folders interoperate with `diffusers.DDPMPipeline` (an unconditional hfgen folder loads there, and a folder
    saved by diffusers loads here). Any diffusers scheduler plugs in, as diffusers users swap them:
    `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.

    Flow matching: this class serves flow-matching models too, despite its name. Their denoiser predicts the velocity
    eps - x0 and their scheduler is one of diffusers' flow schedulers, `FlowMatchEulerDiscreteScheduler` (as
    hfgen's trainer saves it) or `FlowMatchHeunDiscreteScheduler`, swapped in the same way; the same loop integrates
    the flow from noise (sigma = 1) to data (sigma = 0), and guidance combines velocities as it combines noise
    predictions. EDM models (Karras et al.) sample here too, with diffusers' EDM schedulers, which precondition the
    denoiser's input and output themselves. `objective` ("ddpm", "flow_matching" or "edm", saved in model_index.json
    by hfgen's trainer; see hfgen.objectives) is what the denoiser was trained for: a scheduler of another kind is
    refused, since it would sample noise.

    Class conditioning: a denoiser with `num_class_embeds = K + 1` generates K classes; hfgen trains the last
    id K as the null class ("no label", label dropout), which classifier-free guidance needs. `label_dropout`
    (saved in model_index.json by hfgen's trainer) is the share of labels dropped in training: with 0 the null
    class was never trained, and guidance is refused.

    Example:
        ```py
        >>> import torch
        >>> from hfgen import DDPMPipeline
        >>> pipe = DDPMPipeline.from_pretrained("hfgen-ddpm-mnist")
        >>> images = pipe(16, num_inference_steps=50, generator=torch.manual_seed(0)).images
        ```
    """

    pipeline_kind = "pixels"  # which of the objective's card tags names this pipeline (hfgen.objectives.PIPELINE_KINDS)

    def __init__(self, unet: UNet2DModel | ViTDenoiser, scheduler: SchedulerMixin, label_dropout: float | None = None,
                 objective: str | None = None, sampling_steps: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if label_dropout is not None:  # unknown for folders saved elsewhere (diffusers, older hfgen)
            self.register_to_config(label_dropout=float(label_dropout))
        if objective is not None:  # unknown for folders saved elsewhere: the scheduler's kind is all there is
            self.register_to_config(objective=objective_class(objective).name)
            self.check_scheduler()
        if sampling_steps is not None:  # a few-step model's (a distilled student's): its calls' default
            check_positive_int("sampling_steps", sampling_steps)
            self.register_to_config(sampling_steps=int(sampling_steps))

    @property
    def objective(self) -> str:
        """"ddpm", "flow_matching" or "edm": what the denoiser was trained for (else what the scheduler samples)."""
        return self.config.get("objective") or objective_of(self.scheduler).name

    @property
    def objective_class(self) -> type[DiffusionObjective]:
        return objective_class(self.objective)

    @property
    def family(self) -> str:
        return self.objective_class.tags[self.pipeline_kind]

    def check_scheduler(self) -> None:
        """A scheduler of the kind the denoiser was trained for (one of its objective's samplers)."""
        objective = self.objective_class
        if not objective.samples_with(self.scheduler):
            raise ValueError(f"`scheduler` is a {type(self.scheduler).__name__}, but the denoiser was trained with "
                             f"objective {self.objective!r}: it samples with {objective.scheduler_kind}")

    @property
    def generative_model(self):
        return self.unet

    @property
    def num_classes(self) -> int:
        return classes_of(self.unet.config.get("num_class_embeds"))

    @property
    def id2label(self) -> dict | None:
        return None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (self.unet.config.in_channels, height, width)

    data_range = SYMMETRIC  # images in [-1, 1]
    denoises_pixels = True  # the reverse process ends at the image itself: its variational bound is a likelihood

    def to_images(self, sample: torch.Tensor) -> torch.Tensor:
        """The reverse process's final sample x_0 -> images (here the sample itself, in [-1, 1])."""
        return sample

    @property
    def image_channels(self) -> int:
        return self.latent_shape[0]

    def from_images(self, images, name: str = "image") -> torch.Tensor:
        """Images (PIL, numpy or tensor in [0, 1]) -> the samples x_0 (B, *latent_shape) the reverse process ends
        at: here the pixels in [-1, 1]."""
        return preprocess(images, self.latent_shape[0], self.sample_size, SYMMETRIC, name).to(self.device,
                                                                                               self.unet.dtype)

    def prepare_edit(self, image, strength: float | None, mask_image, jump_length: int, resamples: int,
                     batch_size: int | None) -> tuple[ImageEdit | None, int | None]:
        """The image arguments of a call -> (the edit, or None without `image`; the batch size it sets).

        One image serves a whole batch; several set the batch size, or must match it. Inpainting's strength is 1
        unless given: the masked region is regenerated from noise."""
        if image is None:
            for name, value, default in (("strength", strength, None), ("mask_image", mask_image, None),
                                         ("jump_length", jump_length, 1), ("resamples", resamples, 1)):
                if value is not default and (default is None or value != default):
                    raise ValueError(f"`{name}` edits `image`: pass `image` too")
            return None, batch_size
        strength = (1.0 if mask_image is not None else DEFAULT_STRENGTH) if strength is None else strength
        check_unit_interval("strength", strength)
        edit = ImageEdit(self.from_images(image), strength)
        if mask_image is not None:
            self.prepare_inpainting(edit, image, mask_image, jump_length, resamples)
        elif (jump_length, resamples) != (1, 1):
            raise ValueError("`jump_length` and `resamples` are inpainting's resampling: pass `mask_image` too")
        if batch_size is None:
            batch_size = edit.size
        return edit.expand(batch_size), batch_size

    def prepare_inpainting(self, edit: ImageEdit, image, mask_image, jump_length: int, resamples: int) -> None:
        """Fills in `edit`'s mask (a PIL, numpy or tensor image of the pipeline's size, values in [0, 1], 1 = regenerate,
        cut at 0.5), the images' pixels and the resampling, checked against the scheduler."""
        check_positive_int("jump_length", jump_length)
        check_positive_int("resamples", resamples)
        if self.scheduler.order != 1:
            raise ValueError(f"`mask_image`: inpainting replaces the known region after every step, which a "
                             f"{type(self.scheduler).__name__} (a solver of order {self.scheduler.order}) cannot take; "
                             "use its objective's first-order sampler")
        if resamples > 1 and not isinstance(self.scheduler, STATELESS_SCHEDULERS):
            raise ValueError(f"`resamples` {resamples}: RePaint's resampling undoes steps, which only a DDPMScheduler or "
                             f"DDIMScheduler can redo; this pipeline samples with a {type(self.scheduler).__name__} "
                             "(pass resamples=1)")
        edit.pixels = preprocess(image, self.image_channels, self.sample_size, self.data_range, "image").to(
            self.device, self.unet.dtype)
        mask = preprocess(mask_image, 1, self.sample_size, UNIT, "mask_image").to(self.device, self.unet.dtype)
        edit.pixel_mask = (mask >= 0.5).to(mask.dtype)
        # a latent cell is regenerated where any of its pixels is
        edit.mask = F.adaptive_max_pool2d(edit.pixel_mask, tuple(self.latent_shape[1:]))
        if edit.mask.shape[0] != edit.size:
            images, masks = edit.size, edit.mask.shape[0]
            if images != 1 and masks != 1:
                raise ValueError(f"`mask_image` holds {masks} masks for {images} images: pass one, or one per image")
            batch = max(images, masks)
            edit.start, edit.pixels = (value.expand(batch, *value.shape[1:]) for value in (edit.start, edit.pixels))
            edit.mask, edit.pixel_mask = (value.expand(batch, *value.shape[1:]) for value in (edit.mask, edit.pixel_mask))
        edit.jump_length, edit.resamples = jump_length, resamples

    def denoise(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None, guidance_scale: float):
        """The model's prediction at one step (eps, x0, v or, for flow matching, the velocity); with guidance:
        f(x, null) + w (f(x, y) - f(x, null)), which is linear in the prediction, so right for every kind (§6.7)."""
        if class_labels is None:
            return self.unet(sample, timestep).sample
        if guidance_scale == 1.0:
            return self.unet(sample, timestep, class_labels=class_labels).sample
        null = null_class_labels(class_labels, self.num_classes)
        both = self.unet(torch.cat([sample, sample]), timestep, class_labels=torch.cat([class_labels, null])).sample
        return guided(*both.chunk(2), guidance_scale)

    def check_num_inference_steps(self, num_inference_steps: int | None) -> int:
        """The number of sampling steps: at most the scheduler's training steps; by default a few-step model's own
        `sampling_steps`, else all of them."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if num_inference_steps is None:
            num_inference_steps = self.config.get("sampling_steps") or num_train_timesteps
        check_positive_int("num_inference_steps", num_inference_steps)
        if num_inference_steps > num_train_timesteps:
            raise ValueError(f"`num_inference_steps` must be at most the {num_train_timesteps} training steps, "
                             f"got {num_inference_steps}")
        return num_inference_steps

    def reverse_process(self, sample: torch.Tensor, condition, guidance_scale: float, num_inference_steps: int,
                        generator, edit: ImageEdit | None = None) -> torch.Tensor:
        """Noise `sample` (B, *latent_shape) -> x_0, each step's prediction from `denoise(sample, t, condition,
        guidance_scale)`. With an `edit` of strength < 1, image-to-image (SDEdit, docs/maths.md §6.11): only the last
        `strength` share of the steps runs, from the image brought to the first one's noise level by the scheduler's
        forward process with `sample` as the noise (strength 0: the image itself). With its mask, inpainting (§6.12)."""
        scheduler = self.scheduler
        objective_of(scheduler).set_timesteps(scheduler, num_inference_steps, self.device)
        timesteps = scheduler.timesteps
        first = 0
        if edit is None or edit.strength == 1.0:
            # the k-diffusion schedulers (Euler, Heun, ...) start from noise of scale sigma_max and rescale the
            # denoiser's input; for the others (and the flow schedulers, which have neither) both are the identity
            sample = sample * getattr(scheduler, "init_noise_sigma", 1.0)
        else:
            first = (num_inference_steps - min(int(num_inference_steps * edit.strength), num_inference_steps)) * \
                scheduler.order
            if hasattr(scheduler, "set_begin_index"):  # the schedulers that count their steps start at `first`
                scheduler.set_begin_index(first)
            sample = forward_process(scheduler, edit.start, sample, timesteps[first]) if first < len(timesteps) \
                else edit.start
        # the stochastic schedulers draw their noise from `generator`; others (Heun, ...) take none
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        if edit is None or edit.mask is None:
            for timestep in self.progress_bar(timesteps[first:]):
                sample = self.denoising_step(sample, timestep, condition, guidance_scale, step_kwargs)
            return sample
        return self.inpaint(sample, edit, first, condition, guidance_scale, generator, step_kwargs)

    def denoising_step(self, sample: torch.Tensor, timestep, condition, guidance_scale: float, step_kwargs: dict):
        """One scheduler step. A flow scheduler's timesteps are floats sigma * T, passed to the denoiser as they are
        (as in training)."""
        scheduler = self.scheduler
        model_input = scheduler.scale_model_input(sample, timestep) if hasattr(scheduler, "scale_model_input") \
            else sample
        prediction = self.denoise(model_input, timestep, condition, guidance_scale)
        return scheduler.step(prediction, timestep, sample, **step_kwargs).prev_sample

    def inpaint(self, sample, edit: ImageEdit, first: int, condition, guidance_scale, generator, step_kwargs):
        """The reverse process with the known region (mask 0) replaced after every step by the image at the next
        noise level, drawn by the scheduler's forward process (the image itself after the last step); with RePaint's
        resampling, some steps are undone by renoising and run again (docs/maths.md §6.12)."""
        timesteps = self.scheduler.timesteps
        num_steps = len(timesteps)

        def abar(level):
            return 1.0 if level == num_steps else float(self.scheduler.alphas_cumprod[int(timesteps[level])])

        def noise():
            return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)

        levels = resampling_levels(num_steps, edit.jump_length, edit.resamples, first)
        for level, next_level in self.progress_bar(list(zip(levels, levels[1:]))):
            if next_level < level:  # undo: back up to a noisier level
                sample = renoise(sample, abar(level), abar(next_level), noise())
                continue
            sample = self.denoising_step(sample, timesteps[level], condition, guidance_scale, step_kwargs)
            known = edit.start if next_level == num_steps else \
                forward_process(self.scheduler, edit.start, noise(), timesteps[next_level])
            sample = edit.mask * sample + (1 - edit.mask) * known
        return sample

    def finish(self, sample: torch.Tensor, edit: ImageEdit | None, output_type: str, return_dict: bool):
        """x_0 -> the call's output; inpainting pastes the known pixels back (a latent model's decoder changes them)."""
        images = self.to_images(sample)
        if edit is not None and edit.mask is not None:
            images = edit.pixel_mask * images + (1 - edit.pixel_mask) * edit.pixels.to(images.dtype)
        return self.output(images, output_type, return_dict)

    def check_guidance_trained(self, guidance_scale: float, dropout: str, unconditional: str) -> None:
        """Guidance contrasts with the unconditional input, which the `dropout` config entry trained (None: unknown)."""
        if guidance_scale != 1.0 and self.config.get(dropout) == 0:
            raise ValueError(f"`guidance_scale` {guidance_scale}: this denoiser was trained with {dropout} 0, so "
                             f"{unconditional} was never trained as the unconditional input; sample with "
                             f"guidance_scale=1, or train with --{dropout} 0.1")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        *,
        class_labels=None,
        guidance_scale: float = 1.0,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt=None,
        image=None,
        strength: float | None = None,
        mask_image=None,
        jump_length: int = 1,
        resamples: int = 1,
    ):
        r"""Runs the reverse process, from noise or (image-to-image) from a noised `image`.

        Args:
            batch_size: number of images; None means one per class label, or 1.
            class_labels: for a class-conditional denoiser: an int or one per image.
            guidance_scale: classifier-free guidance weight w (1: the conditional model alone).
            num_inference_steps: denoising steps, at most the scheduler's training steps; by default those, or a
                distilled model's `sampling_steps` (a flow scheduler's are integration steps: Heun evaluates the
                denoiser about twice per step).
            generator: the same generator state gives the same images.
            latents: x_T of shape (B, C, H, W) instead of fresh noise.
            output_type: "pil", "np" (B, H, W, C) or "pt" (B, C, H, W), values in [0, 1].
            prompt: refused: text prompts need a text-to-image pipeline (`TextToImagePipeline`).
            image: image-to-image (SDEdit): the image(s) to start from, PIL, numpy or a tensor in [0, 1] of the
                pipeline's size; one image serves the whole batch.
            strength: with `image`, the share of the reverse process run from it, in [0, 1] (default 0.8): the image
                is noised to that level first. 0 returns the image (after the pipeline's own encoding and decoding),
                1 samples as without an image; below 1 the output keeps more of the image as strength falls.
            mask_image: inpainting: where to regenerate `image` (1; 0 keeps it), a PIL, numpy or tensor image of the
                pipeline's size with values in [0, 1], cut at 0.5; strength is then 1 unless given. The kept pixels
                are returned exactly (a latent pipeline pastes them back over its decoded image).
            jump_length, resamples: RePaint's resampling (DDPMScheduler and DDIMScheduler): every `jump_length`
                steps, go back `jump_length` noise levels and sample them again, `resamples` times in all (1: none).
        """
        if prompt is not None:
            raise ValueError(f"`prompt` {prompt!r}: this {type(self).__name__} has no text encoder; prompts need a "
                             "text-to-image pipeline (TextToImagePipeline, LatentTextToImagePipeline, trained with "
                             "--caption_column). Condition this one with `class_labels`")
        edit, batch_size = self.prepare_edit(image, strength, mask_image, jump_length, resamples, batch_size)
        labels, batch_size = self.prepare_class_labels(class_labels, batch_size)
        if guidance_scale != 1.0 and labels is None:
            raise ValueError(f"`guidance_scale` {guidance_scale} needs `class_labels` and a class-conditional denoiser "
                             "trained with a null class")
        self.check_guidance_trained(guidance_scale, "label_dropout", "its null class")
        self.check_scheduler()
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        edit = edit.expand(batch_size) if edit is not None else None  # one image, for every class label
        sample = self.prepare_latents(batch_size, generator, latents)
        sample = self.reverse_process(sample, labels, guidance_scale, num_inference_steps, generator, edit)
        return self.finish(sample, edit, output_type, return_dict)
