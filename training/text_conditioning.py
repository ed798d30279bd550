"""Text conditioning for the diffusion trainers (--caption_column): the captions' tokens, the text encoder, prompt
dropout and the text-to-image pipeline.

The text encoder is a `transformers` model with its tokenizer (--text_encoder_name_or_path, frozen unless
--train_text_encoder), or by default a small CLIPTextModel with a word-level tokenizer built from the training
captions, trained with the denoiser (one optimizer over both; EMA averages both). --prompt_dropout replaces that share
of captions by the empty prompt, which guidance contrasts with. The denoiser attends to the encoder's token states:
a UNet2DConditionModel, or the ViTDenoiser with cross-attention.
"""

import dataclasses

import torch

from hfgen.data.sources import BundledSource
from hfgen.pipelines import TextToImagePipeline
from hfgen.prompt_following import DEFAULT_GUIDANCE_SCALE, resolve_guidance_scale
from hfgen.text import build_word_tokenizer, load_text_encoder, load_tokenizer, tiny_text_encoder, tokenize_prompts
from hfgen.utils import check_positive_int, check_positive_number, check_probability

from .config import TrainingConfig, flag, optional


@dataclasses.dataclass(kw_only=True)
class TextConditioningConfig(TrainingConfig):
    """The flags of text conditioning (with --caption_column), shared by the diffusion families' configs."""

    text_encoder_name_or_path: str | None = flag(
        None, "With --caption_column: a transformers text encoder and its tokenizer, by Hub id or folder "
        "(CLIPTextModel, T5EncoderModel, ...), frozen unless --train_text_encoder. Default: a small CLIPTextModel "
        "with a word-level tokenizer built from the training captions, trained with the denoiser.")
    train_text_encoder: bool = flag(False, "Tune the --text_encoder_name_or_path encoder too.")
    text_encoder_hidden_size: int = flag(64, "The default text encoder's width.", check=check_positive_int)
    text_encoder_layers: int = flag(2, "The default text encoder's layers.", check=check_positive_int)
    text_encoder_heads: int = flag(4, "The default text encoder's attention heads.", check=check_positive_int)
    attention_head_dim: int = flag(8, "With --caption_column: the U-Net's attention head width.",
                                   check=check_positive_int)
    prompt_dropout: float = flag(
        0.1, "With --caption_column: share of captions replaced by the empty prompt, for classifier-free guidance.",
        check=check_probability)
    guidance_scale: float | None = flag(
        None, f"With --caption_column: guidance of the sample grids and of the prompt-following metrics (default "
        f"{DEFAULT_GUIDANCE_SCALE:g} with --prompt_dropout, else 1).", check=optional(check_positive_number))
    eval_prompts_per_digit: int = flag(
        20, "With hfgen's captions of the bundled digits: images per digit of each prompt set of the final "
        "prompt-following metrics (hfgen.prompt_following; 7 sets).", check=check_positive_int)

    def validate(self) -> None:
        super().validate()
        if self.caption_column is None:
            given = [name for name in ("text_encoder_name_or_path", "train_text_encoder", "guidance_scale")
                     if getattr(self, name)]
            if given:
                raise ValueError(f"`--{given[0]}` conditions on captions: it needs `--caption_column`")
            return
        if self.conditional:
            raise ValueError("`--conditional` (class labels) and `--caption_column` (text) are two kinds of "
                             "conditioning: pass one of them")
        if self.streaming:
            raise ValueError("`--caption_column` tokenizes every caption once: `--streaming` is not supported with it")
        if self.train_text_encoder and not self.text_encoder_name_or_path:
            raise ValueError("`--train_text_encoder` tunes the `--text_encoder_name_or_path` encoder; the default "
                             "small encoder is always trained")
        if self.prompt_dropout == 0 and self.guidance_scale not in (None, 1.0):
            raise ValueError(f"`--guidance_scale` {self.guidance_scale:g} contrasts with the empty prompt, which "
                             "`--prompt_dropout 0` never trains: pass --prompt_dropout 0.1 or leave the guidance out")


class TextConditionedTraining:
    """Mixed into a diffusion trainer before `Trainer`: with --caption_column the batches' second element is the
    captions' token ids (B, L) and the denoiser gets `encoder_hidden_states`; without it every hook defers to the
    trainer's own."""

    @property
    def text_conditioned(self) -> bool:
        return self.config.caption_column is not None

    @property
    def trains_text_encoder(self) -> bool:
        """The default small encoder trains with the denoiser; a given one only with --train_text_encoder."""
        return self.text_conditioned and (self.config.train_text_encoder or not self.config.text_encoder_name_or_path)

    @property
    def conditions_on_batches(self) -> bool:
        return self.text_conditioned or super().conditions_on_batches

    @property
    def ema_model_names(self) -> tuple[str, ...]:
        return ("unet", "text_encoder") if self.trains_text_encoder else ("unet",)

    @property
    def pipeline_task(self) -> str:
        return "text-to-image" if self.text_conditioned else super().pipeline_task

    def base_models(self) -> list[str]:
        path = self.config.text_encoder_name_or_path if self.text_conditioned else None
        return [*super().base_models(), *([path] if path else [])]

    def load_data(self):
        """The data, and with --caption_column the tokenizer and the training captions' token ids (N, L)."""
        super().load_data()
        if not self.text_conditioned:
            return
        captions = self.train_dataset.captions
        path = self.config.text_encoder_name_or_path
        self.tokenizer = load_tokenizer(path) if path else build_word_tokenizer(captions)
        self.caption_ids = tokenize_prompts(self.tokenizer, captions)
        self.empty_prompt_ids = tokenize_prompts(self.tokenizer, [""])  # (1, L): the unconditional input
        self.sample_prompts = self.test_dataset.captions

    def training_data(self):
        """With --caption_column, batches of (images, the captions' token ids (B, L))."""
        return self.train_dataset.with_labels(self.caption_ids) if self.text_conditioned else super().training_data()

    def build_text_encoder(self) -> dict:
        """{"text_encoder": the encoder} when it trains (a prepared, checkpointed model), else {} and the frozen
        encoder kept aside. Sets `cross_attention_dim` (the encoder's width) for the denoiser; None without text."""
        args = self.config
        self.cross_attention_dim = None
        if not self.text_conditioned:
            return {}
        if args.text_encoder_name_or_path:
            text_encoder = load_text_encoder(args.text_encoder_name_or_path)
        else:
            text_encoder = tiny_text_encoder(self.tokenizer, args.text_encoder_hidden_size, args.text_encoder_layers,
                                             args.text_encoder_heads, seed=args.seed)
        self.cross_attention_dim = text_encoder.config.hidden_size
        if self.trains_text_encoder:
            return {"text_encoder": text_encoder.train()}
        self.frozen_text_encoder = text_encoder.to(self.accelerator.device).eval().requires_grad_(False)
        return {}

    def text_encoder(self):
        """The encoder of the training steps: the prepared one when trained, else the frozen one."""
        return self.models["text_encoder"] if self.trains_text_encoder else self.frozen_text_encoder

    def build_optimizers(self):
        if not self.trains_text_encoder:
            return super().build_optimizers()
        args = self.config
        # one optimizer over both: the text encoder learns from the denoising loss, with the same schedule
        both = torch.nn.ModuleList([self.models["unet"], self.models["text_encoder"]])
        return {"unet": self.adamw(both, args.learning_rate, (args.adam_beta1, args.adam_beta2))}

    def text_conditioning(self, caption_ids: torch.Tensor) -> dict:
        """The denoiser's keywords for a batch's captions' token ids (B, L), with prompt dropout:
        {"encoder_hidden_states": (B, L, D)}."""
        ids = caption_ids
        if self.config.prompt_dropout:
            dropped = torch.rand(ids.shape[:1], device=ids.device) < self.config.prompt_dropout
            ids = torch.where(dropped[:, None], self.empty_prompt_ids.to(ids.device), ids)
        with torch.set_grad_enabled(self.trains_text_encoder):
            return {"encoder_hidden_states": self.text_encoder()(ids)[0]}

    def text_pipeline(self, unet, scheduler) -> TextToImagePipeline:
        text_encoder = self.sampling_model("text_encoder") if self.trains_text_encoder else self.frozen_text_encoder
        return TextToImagePipeline(unet, scheduler, text_encoder, self.tokenizer,
                                   prompt_dropout=self.config.prompt_dropout, objective=self.config.objective)

    @property
    def guidance_scale(self) -> float:
        return resolve_guidance_scale(self.config.guidance_scale, self.config.prompt_dropout)

    def sample_images(self, pipeline, num_images: int):
        """Samples of the test captions, with guidance."""
        if not self.text_conditioned:
            return super().sample_images(pipeline, num_images)
        generator = torch.Generator(pipeline.device).manual_seed(self.config.seed)
        prompts = [self.sample_prompts[i % len(self.sample_prompts)] for i in range(num_images)]
        return pipeline(prompt=prompts, generator=generator, guidance_scale=self.guidance_scale,
                        **self.pipeline_kwargs()).images

    @property
    def follows_digit_prompts(self) -> bool:
        """Whether the captions are hfgen's of the bundled digits, whose prompt-following is measured."""
        return self.text_conditioned and isinstance(self.source, BundledSource)

    def evaluation_options(self) -> dict:
        """With hfgen's captions of the bundled digits, the final evaluation measures prompt following
        (hfgen.prompt_following) at --guidance_scale."""
        options = super().evaluation_options()
        if self.follows_digit_prompts:
            options.update(digit_prompts=True, prompts_per_digit=self.config.eval_prompts_per_digit,
                           guidance_scale=self.config.guidance_scale)
        return options

    def text_description(self) -> str:
        """The text encoder, for the card."""
        args = self.config
        if args.text_encoder_name_or_path:
            return (f"text encoder `{args.text_encoder_name_or_path}`, "
                    f"{'tuned' if args.train_text_encoder else 'frozen'}; {self.guidance_description()}")
        return (f"a {args.text_encoder_layers}-layer CLIPTextModel of width {args.text_encoder_hidden_size} with a "
                f"{len(self.tokenizer)}-word tokenizer built from the captions, trained with the denoiser; "
                f"{self.guidance_description()}")

    def guidance_description(self) -> str:
        following = (f"; prompt-following metrics (digit accuracy, attribute separation) at guidance scale "
                     f"{self.guidance_scale:g}" if self.follows_digit_prompts else "")
        return f"prompt dropout {self.config.prompt_dropout:g}{following}"
