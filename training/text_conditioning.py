"""Text conditioning for the diffusion trainers (--caption_column): the captions' tokens, the text encoder, prompt
dropout and the text-to-image pipeline.

The text encoder is a `transformers` model with its tokenizer (--text_encoder_name_or_path, frozen unless
--train_text_encoder), or by default a small CLIPTextModel with a word-level tokenizer built from the training
captions, trained with the denoiser (one optimizer over both; EMA averages both). --prompt_dropout replaces that share
of captions by the empty prompt, which guidance contrasts with. The denoiser attends to the encoder's token states:
a UNet2DConditionModel, or the ViTDenoiser with cross-attention.
"""

import torch

from hfgen.data.sources import BundledSource
from hfgen.features import ClassifierFeatures
from hfgen.pipelines import TextToImagePipeline
from hfgen.prompt_following import DEFAULT_GUIDANCE_SCALE, digit_classifier_for, evaluate_prompt_following, \
    resolve_guidance_scale
from hfgen.text import build_word_tokenizer, load_text_encoder, load_tokenizer, tiny_text_encoder, tokenize_prompts
from hfgen.utils import check_positive_int, check_positive_number, check_probability

from .trainer import optional


def add_text_arguments(parser) -> None:
    add = parser.add_argument
    add("--text_encoder_name_or_path", default=None,
        help="With --caption_column: a transformers text encoder and its tokenizer, by Hub id or folder (CLIPTextModel, "
             "T5EncoderModel, ...), frozen unless --train_text_encoder. Default: a small CLIPTextModel with a "
             "word-level tokenizer built from the training captions, trained with the denoiser.")
    add("--train_text_encoder", action="store_true", help="Tune the --text_encoder_name_or_path encoder too.")
    add("--text_encoder_hidden_size", type=int, default=64, help="The default text encoder's width.")
    add("--text_encoder_layers", type=int, default=2, help="The default text encoder's layers.")
    add("--text_encoder_heads", type=int, default=4, help="The default text encoder's attention heads.")
    add("--attention_head_dim", type=int, default=8, help="With --caption_column: the U-Net's attention head width.")
    add("--prompt_dropout", type=float, default=0.1,
        help="With --caption_column: share of captions replaced by the empty prompt, for classifier-free guidance.")
    add("--guidance_scale", type=float, default=None,
        help=f"With --caption_column: guidance of the sample grids and of the prompt-following metrics (default "
             f"{DEFAULT_GUIDANCE_SCALE:g} with --prompt_dropout, else 1).")
    add("--eval_prompts_per_digit", type=int, default=20,
        help="With hfgen's captions of the bundled digits: images per digit of each prompt set of the final "
             "prompt-following metrics (hfgen.prompt_following; 7 sets).")


TEXT_FLAG_CHECKS = {
    **dict.fromkeys(("text_encoder_hidden_size", "text_encoder_layers", "text_encoder_heads", "attention_head_dim"),
                    check_positive_int),
    "prompt_dropout": check_probability, "eval_prompts_per_digit": check_positive_int,
    "guidance_scale": optional(check_positive_number),
}


class TextConditionedTraining:
    """Mixed into a diffusion trainer before `Trainer`: with --caption_column the batches' second element is the
    captions' token ids (B, L) and the denoiser gets `encoder_hidden_states`; without it every hook defers to the
    trainer's own."""

    @classmethod
    def check_text_args(cls, args) -> None:
        if args.caption_column is None:
            given = [flag for flag in ("text_encoder_name_or_path", "train_text_encoder", "guidance_scale")
                     if getattr(args, flag)]
            if given:
                raise ValueError(f"`--{given[0]}` conditions on captions: it needs `--caption_column`")
            return
        if args.conditional:
            raise ValueError("`--conditional` (class labels) and `--caption_column` (text) are two kinds of "
                             "conditioning: pass one of them")
        if args.streaming:
            raise ValueError("`--caption_column` tokenizes every caption once: `--streaming` is not supported with it")
        if args.train_text_encoder and not args.text_encoder_name_or_path:
            raise ValueError("`--train_text_encoder` tunes the `--text_encoder_name_or_path` encoder; the default "
                             "small encoder is always trained")
        if args.prompt_dropout == 0 and args.guidance_scale not in (None, 1.0):
            raise ValueError(f"`--guidance_scale` {args.guidance_scale:g} contrasts with the empty prompt, which "
                             "`--prompt_dropout 0` never trains: pass --prompt_dropout 0.1 or leave the guidance out")

    @property
    def text_conditioned(self) -> bool:
        return self.args.caption_column is not None

    @property
    def trains_text_encoder(self) -> bool:
        """The default small encoder trains with the denoiser; a given one only with --train_text_encoder."""
        return self.text_conditioned and (self.args.train_text_encoder or not self.args.text_encoder_name_or_path)

    @property
    def conditions_on_batches(self) -> bool:
        return self.text_conditioned or super().conditions_on_batches

    @property
    def ema_model_names(self) -> tuple[str, ...]:
        return ("unet", "text_encoder") if self.trains_text_encoder else ("unet",)

    @property
    def pipeline_task(self) -> str:
        return "text-to-image" if self.text_conditioned else super().pipeline_task

    def load_data(self):
        """The data, and with --caption_column the tokenizer and the training captions' token ids (N, L)."""
        super().load_data()
        if not self.text_conditioned:
            return
        captions = self.train_dataset.captions
        path = self.args.text_encoder_name_or_path
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
        args = self.args
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
        args = self.args
        # one optimizer over both: the text encoder learns from the denoising loss, with the same schedule
        both = torch.nn.ModuleList([self.models["unet"], self.models["text_encoder"]])
        return {"unet": self.adamw(both, args.learning_rate, (args.adam_beta1, args.adam_beta2))}

    def text_conditioning(self, caption_ids: torch.Tensor) -> dict:
        """The denoiser's keywords for a batch's captions' token ids (B, L), with prompt dropout:
        {"encoder_hidden_states": (B, L, D)}."""
        ids = caption_ids
        if self.args.prompt_dropout:
            dropped = torch.rand(ids.shape[:1], device=ids.device) < self.args.prompt_dropout
            ids = torch.where(dropped[:, None], self.empty_prompt_ids.to(ids.device), ids)
        with torch.set_grad_enabled(self.trains_text_encoder):
            return {"encoder_hidden_states": self.text_encoder()(ids)[0]}

    def text_pipeline(self, unet, scheduler) -> TextToImagePipeline:
        text_encoder = self.sampling_model("text_encoder") if self.trains_text_encoder else self.frozen_text_encoder
        return TextToImagePipeline(unet, scheduler, text_encoder, self.tokenizer,
                                   prompt_dropout=self.args.prompt_dropout, objective=self.args.objective)

    @property
    def guidance_scale(self) -> float:
        return resolve_guidance_scale(self.args.guidance_scale, self.args.prompt_dropout)

    def sample_images(self, pipeline, num_images: int):
        """Samples of the test captions, with guidance."""
        if not self.text_conditioned:
            return super().sample_images(pipeline, num_images)
        generator = torch.Generator(pipeline.device).manual_seed(self.args.seed)
        prompts = [self.sample_prompts[i % len(self.sample_prompts)] for i in range(num_images)]
        return pipeline(prompt=prompts, generator=generator, guidance_scale=self.guidance_scale,
                        **self.pipeline_kwargs()).images

    @property
    def follows_digit_prompts(self) -> bool:
        """Whether the captions are hfgen's of the bundled digits, whose prompt-following is measured."""
        return self.text_conditioned and isinstance(self.source, BundledSource)

    def evaluate(self, pipeline, num_samples: int, likelihood: bool = True, **call_kwargs) -> dict[str, float]:
        """The family's metrics (FD of empty-prompt samples), and in the final evaluation on hfgen's captioned digits
        the prompt-following metrics (hfgen.prompt_following) at `guidance_scale`."""
        metrics = super().evaluate(pipeline, num_samples, likelihood, **call_kwargs)
        if likelihood and self.follows_digit_prompts and self.accelerator.is_main_process:
            if isinstance(self.feature_extractor, ClassifierFeatures):
                classifier = self.feature_extractor.classifier
            else:
                classifier = digit_classifier_for(self.load_split("train"), self.test_dataset)
            kwargs = {**self.pipeline_kwargs(), **call_kwargs, "guidance_scale": self.guidance_scale}
            metrics.update(evaluate_prompt_following(pipeline, self.test_dataset, classifier.to(pipeline.device),
                                                     num_images_per_digit=self.args.eval_prompts_per_digit,
                                                     seed=self.args.seed, batch_size=self.args.eval_batch_size,
                                                     pipeline_kwargs=kwargs))
        return metrics

    def text_description(self) -> str:
        """The text encoder, for the card."""
        args = self.args
        if args.text_encoder_name_or_path:
            return (f"text encoder `{args.text_encoder_name_or_path}`, "
                    f"{'tuned' if args.train_text_encoder else 'frozen'}; {self.guidance_description()}")
        return (f"a {args.text_encoder_layers}-layer CLIPTextModel of width {args.text_encoder_hidden_size} with a "
                f"{len(self.tokenizer)}-word tokenizer built from the captions, trained with the denoiser; "
                f"{self.guidance_description()}")

    def guidance_description(self) -> str:
        following = (f"; prompt-following metrics (digit accuracy, attribute separation) at guidance scale "
                     f"{self.guidance_scale:g}" if self.follows_digit_prompts else "")
        return f"prompt dropout {self.args.prompt_dropout:g}{following}"
