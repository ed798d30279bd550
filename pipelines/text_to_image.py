"""Text-to-image diffusion (docs/maths.md §6.7): a `transformers` text encoder and its tokenizer, a denoiser with
cross-attention to the prompt's token states, and classifier-free guidance against the empty prompt; in pixels
(`TextToImagePipeline`) or in a VAE's latent space (`LatentTextToImagePipeline`)."""

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel

from hfgen.diffusion import guided
from hfgen.models import ViTDenoiser
from hfgen.text import encode_prompt, prompt_length

from .ddpm import DDPMPipeline
from .latent_diffusion import FirstStage, LatentDiffusionPipeline


def check_text_components(unet, text_encoder, tokenizer) -> None:
    """The text encoder's states must have the width the denoiser's cross-attention takes."""
    hidden_size = text_encoder.config.hidden_size
    cross_attention_dim = unet.config.get("cross_attention_dim")
    if cross_attention_dim != hidden_size:
        raise ValueError(f"`text_encoder` ({type(text_encoder).__name__}) has hidden size {hidden_size}, but the "
                         f"denoiser's cross-attention takes states of width {cross_attention_dim} "
                         "(`cross_attention_dim`): they must match")
    prompt_length(tokenizer)


class TextConditioning:
    """What both text-to-image pipelines share: prompts -> token states, guidance, the call.

    Guidance (§6.7): the empty prompt "" is the unconditional input, which `prompt_dropout` trained (the share of
    training captions replaced by ""); `negative_prompt` replaces it: f(x, neg) + w (f(x, prompt) - f(x, neg)).
    """

    def setup_text(self, text_encoder, tokenizer, prompt_dropout: float | None) -> None:
        check_text_components(self.unet, text_encoder, tokenizer)
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)
        if prompt_dropout is not None:  # unknown for folders saved elsewhere
            self.register_to_config(prompt_dropout=float(prompt_dropout))

    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        """Prompts -> the text encoder's states (B, L, D), the `prompt_embeds` a call takes."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        return encode_prompt(self.tokenizer, self.text_encoder, prompts).to(self.unet.dtype)

    def _repeated(self, name: str, prompt, batch_size: int | None) -> list[str]:
        if isinstance(prompt, str):
            return [prompt] * (batch_size or 1)
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f"`{name}` must be a string or a non-empty list of strings, got {prompt!r}")
        if batch_size is not None and len(prompt) != batch_size:
            raise ValueError(f"`{name}` holds {len(prompt)} prompts but `batch_size` is {batch_size}: give one prompt "
                             "per image, or a single prompt for all")
        return list(prompt)

    def _checked_embeds(self, name: str, embeds, batch_size: int | None) -> torch.Tensor:
        width = self.unet.config.cross_attention_dim
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[-1] != width:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"`{name}` must be a (B, L, {width}) tensor of the text encoder's states, got {shape}")
        if batch_size is not None and len(embeds) != batch_size:
            raise ValueError(f"`{name}` holds {len(embeds)} prompts but `batch_size` is {batch_size}")
        return embeds.to(self.device, self.unet.dtype)

    def prepare_prompt_embeds(self, batch_size, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                              guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (the prompts' states (B, L, D), the negative ones (B, L, D) or None without guidance)."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give `prompt` or `prompt_embeds`, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give `negative_prompt` or `negative_prompt_embeds`, not both")
        if guidance_scale == 1.0 and (negative_prompt is not None or negative_prompt_embeds is not None):
            raise ValueError("`negative_prompt` acts through guidance only: set `guidance_scale` != 1")
        if prompt_embeds is not None:
            embeds = self._checked_embeds("prompt_embeds", prompt_embeds, batch_size)
        else:  # no prompt: the empty one, i.e. unconditional samples
            embeds = self.encode_prompt(self._repeated("prompt", "" if prompt is None else prompt, batch_size))
        if guidance_scale == 1.0:
            return embeds, None
        if negative_prompt_embeds is not None:
            negative = self._checked_embeds("negative_prompt_embeds", negative_prompt_embeds, len(embeds))
            if negative.shape != embeds.shape:
                raise ValueError(f"`negative_prompt_embeds` has shape {tuple(negative.shape)}, `prompt_embeds` "
                                 f"{tuple(embeds.shape)}: they must match")
            return embeds, negative
        return embeds, self.encode_prompt(self._repeated("negative_prompt", negative_prompt or "", len(embeds)))

    def denoise(self, sample: torch.Tensor, timestep, condition, guidance_scale: float):
        """The prediction given the prompts' states; with guidance f(x, neg) + w (f(x, prompt) - f(x, neg))."""
        embeds, negative = condition
        if negative is None:
            return self.unet(sample, timestep, encoder_hidden_states=embeds).sample
        both = self.unet(torch.cat([sample, sample]), timestep, encoder_hidden_states=torch.cat([embeds, negative])).sample
        return guided(*both.chunk(2), guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        *,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels=None,
        image=None,
        strength: float | None = None,
        mask_image=None,
        jump_length: int = 1,
        resamples: int = 1,
    ):
        r"""Generates images that follow the prompts, from noise or (image-to-image) from a noised `image`.

        Args:
            batch_size: number of images; None means one per prompt (or one image). With a list of prompts it must be
                None or the list's length.
            prompt: a prompt for all images, or one per image; None: the empty prompt (unconditional samples). A
                prompt longer than the tokenizer's model_max_length is a ValueError (never truncated).
            negative_prompt: with guidance, what the prompt is contrasted with instead of the empty prompt.
            prompt_embeds, negative_prompt_embeds: precomputed `encode_prompt` states (B, L, D) instead of prompts.
            guidance_scale: classifier-free guidance weight w (1: the conditional model alone).
            num_inference_steps, generator, latents, output_type, return_dict: as `DDPMPipeline`.
            class_labels: refused: this pipeline is conditioned on text.
            image, strength, mask_image, jump_length, resamples: image-to-image and inpainting, as `DDPMPipeline`'s.
        """
        if class_labels is not None:
            raise ValueError(f"`class_labels` {class_labels!r}: a {type(self).__name__} is conditioned on `prompt`, "
                             "not on class labels")
        self.check_guidance_trained(guidance_scale, "prompt_dropout", "the empty prompt")
        self.check_scheduler()
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        edit, batch_size = self.prepare_edit(image, strength, mask_image, jump_length, resamples, batch_size)
        condition = self.prepare_prompt_embeds(batch_size, prompt, negative_prompt, prompt_embeds,
                                               negative_prompt_embeds, guidance_scale)
        batch_size = len(condition[0])
        edit = edit.expand(batch_size) if edit is not None else None  # one image, for every prompt
        sample = self.prepare_latents(batch_size, generator, latents)
        sample = self.reverse_process(sample, condition, guidance_scale, num_inference_steps, generator, edit)
        return self.finish(sample, edit, output_type, return_dict)


class TextToImagePipeline(TextConditioning, DDPMPipeline):
    r"""Text-to-image diffusion in pixels: x_T ~ N(0, I) denoised by a `UNet2DConditionModel` (or a `ViTDenoiser` with
    `cross_attention_dim`) attending to the prompt's states from `text_encoder` (any `transformers` text model, e.g.
    `CLIPTextModel`, `T5EncoderModel`) and `tokenizer`; DDPM or flow matching (`objective`), any diffusers scheduler
    of that kind.

    Example:
        ```py
        >>> import torch
        >>> from hfgen import TextToImagePipeline
        >>> pipe = TextToImagePipeline.from_pretrained("hfgen-t2i-digits")
        >>> images = pipe(prompt=["a thick seven, slanted right"] * 4, guidance_scale=3.0,
        ...               generator=torch.manual_seed(0)).images
        ```
    """

    pipeline_kind = "text"

    def __init__(self, unet: UNet2DConditionModel | ViTDenoiser, scheduler: SchedulerMixin, text_encoder, tokenizer,
                 prompt_dropout: float | None = None, objective: str | None = None):
        super().__init__(unet, scheduler, None, objective)
        self.setup_text(text_encoder, tokenizer, prompt_dropout)


class LatentTextToImagePipeline(TextConditioning, LatentDiffusionPipeline):
    r"""Text-to-image latent diffusion: `TextToImagePipeline` in the latent space of `vae`, decoded as
    `LatentDiffusionPipeline` decodes (x = vae.decode(z_0 / scaling_factor + shift_factor))."""

    pipeline_kind = "latent_text"

    def __init__(self, vae: FirstStage, unet: UNet2DConditionModel | ViTDenoiser, scheduler: SchedulerMixin, text_encoder,
                 tokenizer, scaling_factor: float | list[float] | None = None, prompt_dropout: float | None = None,
                 objective: str | None = None, shift_factor: float | list[float] = 0.0):
        super().__init__(vae, unet, scheduler, scaling_factor, None, objective, shift_factor)
        self.setup_text(text_encoder, tokenizer, prompt_dropout)
