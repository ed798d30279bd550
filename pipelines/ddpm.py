"""Ancestral and fast sampling from a diffusion model (docs/maths.md §6.6) or a flow-matching model (§6.9), with
classifier-free guidance (§6.7)."""

import inspect

import torch
from diffusers import SchedulerMixin, UNet2DModel

from hfgen.diffusion import classes_of, forward_process, guided, null_class_labels
from hfgen.objectives import DiffusionObjective, objective_class, objective_of
from hfgen.image_processing import SYMMETRIC, preprocess
from hfgen.models import ViTDenoiser
from hfgen.utils import check_positive_int, check_unit_interval

DEFAULT_STRENGTH = 0.8  # image-to-image: the share of the reverse process run from the noised image

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
                 objective: str | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if label_dropout is not None:  # unknown for folders saved elsewhere (diffusers, older hfgen)
            self.register_to_config(label_dropout=float(label_dropout))
        if objective is not None:  # unknown for folders saved elsewhere: the scheduler's kind is all there is
            self.register_to_config(objective=objective_class(objective).name)
            self.check_scheduler()

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

    def from_images(self, images, name: str = "image") -> torch.Tensor:
        """Images (PIL, numpy or tensor in [0, 1]) -> the samples x_0 (B, *latent_shape) the reverse process ends
        at: here the pixels in [-1, 1]."""
        return preprocess(images, self.latent_shape[0], self.sample_size, SYMMETRIC, name).to(self.device,
                                                                                               self.unet.dtype)

    def prepare_image(self, image, strength: float | None, batch_size: int | None):
        """`image` and `strength` of a call -> (x_0 of the images (B, *latent_shape) or None, strength, batch size).

        One image serves a whole batch; several set the batch size, or must match it."""
        if image is None:
            if strength is not None:
                raise ValueError(f"`strength` {strength} is how much of the reverse process is run from `image`: pass "
                                 "`image` too")
            return None, 1.0, batch_size
        strength = DEFAULT_STRENGTH if strength is None else strength
        check_unit_interval("strength", strength)
        start = self.from_images(image)
        if batch_size is None:
            batch_size = start.shape[0]
        elif start.shape[0] == 1:
            start = start.expand(batch_size, *start.shape[1:])
        elif start.shape[0] != batch_size:
            raise ValueError(f"`image` holds {start.shape[0]} images but `batch_size` is {batch_size}: pass one image, "
                             "or one per image generated")
        return start, strength, batch_size

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
        """The number of sampling steps: by default (and at most) the scheduler's training steps."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        num_inference_steps = num_train_timesteps if num_inference_steps is None else num_inference_steps
        check_positive_int("num_inference_steps", num_inference_steps)
        if num_inference_steps > num_train_timesteps:
            raise ValueError(f"`num_inference_steps` must be at most the {num_train_timesteps} training steps, "
                             f"got {num_inference_steps}")
        return num_inference_steps

    def reverse_process(self, sample: torch.Tensor, condition, guidance_scale: float, num_inference_steps: int,
                        generator, start: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        """Noise `sample` (B, *latent_shape) -> x_0, each step's prediction from `denoise(sample, t, condition,
        guidance_scale)`. With `start` (clean x_0 of images, same shape) and `strength` < 1, image-to-image (SDEdit,
        docs/maths.md §6.11): only the last `strength` share of the steps runs, from `start` brought to the first
        one's noise level by the scheduler's forward process with `sample` as the noise (strength 0: `start`)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        scheduler = self.scheduler
        timesteps = scheduler.timesteps
        if start is None or strength == 1.0:
            # the k-diffusion schedulers (Euler, Heun, ...) start from noise of scale sigma_max and rescale the
            # denoiser's input; for the others (and the flow schedulers, which have neither) both are the identity
            sample = sample * getattr(scheduler, "init_noise_sigma", 1.0)
        else:
            skipped = (num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)) * \
                scheduler.order
            timesteps = timesteps[skipped:]
            if hasattr(scheduler, "set_begin_index"):  # the schedulers that count their steps start at `skipped`
                scheduler.set_begin_index(skipped)
            sample = forward_process(scheduler, start, sample, timesteps[0]) if len(timesteps) else start
        # the stochastic schedulers draw their noise from `generator`; others (Heun, ...) take none
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        # a flow scheduler's timesteps are floats sigma * T, passed to the denoiser as they are (as in training)
        for timestep in self.progress_bar(timesteps):
            model_input = scheduler.scale_model_input(sample, timestep) if hasattr(scheduler, "scale_model_input") \
                else sample
            prediction = self.denoise(model_input, timestep, condition, guidance_scale)
            sample = self.scheduler.step(prediction, timestep, sample, **step_kwargs).prev_sample
        return sample

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
    ):
        r"""Runs the reverse process, from noise or (image-to-image) from a noised `image`.

        Args:
            batch_size: number of images; None means one per class label, or 1.
            class_labels: for a class-conditional denoiser: an int or one per image.
            guidance_scale: classifier-free guidance weight w (1: the conditional model alone).
            num_inference_steps: denoising steps, at most (and by default) the scheduler's training steps (a
                flow scheduler's are integration steps: Heun evaluates the denoiser about twice per step).
            generator: the same generator state gives the same images.
            latents: x_T of shape (B, C, H, W) instead of fresh noise.
            output_type: "pil", "np" (B, H, W, C) or "pt" (B, C, H, W), values in [0, 1].
            prompt: refused: text prompts need a text-to-image pipeline (`TextToImagePipeline`).
            image: image-to-image (SDEdit): the image(s) to start from, PIL, numpy or a tensor in [0, 1] of the
                pipeline's size; one image serves the whole batch.
            strength: with `image`, the share of the reverse process run from it, in [0, 1] (default 0.8): the image
                is noised to that level first. 0 returns the image (after the pipeline's own encoding and decoding),
                1 samples as without an image; below 1 the output keeps more of the image as strength falls.
        """
        if prompt is not None:
            raise ValueError(f"`prompt` {prompt!r}: this {type(self).__name__} has no text encoder; prompts need a "
                             "text-to-image pipeline (TextToImagePipeline, LatentTextToImagePipeline, trained with "
                             "--caption_column). Condition this one with `class_labels`")
        start, strength, batch_size = self.prepare_image(image, strength, batch_size)
        labels, batch_size = self.prepare_class_labels(class_labels, batch_size)
        if guidance_scale != 1.0 and labels is None:
            raise ValueError(f"`guidance_scale` {guidance_scale} needs `class_labels` and a class-conditional denoiser "
                             "trained with a null class")
        self.check_guidance_trained(guidance_scale, "label_dropout", "its null class")
        self.check_scheduler()
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        if start is not None and start.shape[0] != batch_size:
            start = start.expand(batch_size, *start.shape[1:])  # one image, for every class label
        sample = self.prepare_latents(batch_size, generator, latents)
        sample = self.reverse_process(sample, labels, guidance_scale, num_inference_steps, generator, start, strength)
        return self.output(self.to_images(sample), output_type, return_dict)
