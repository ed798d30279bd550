"""Typed training configurations: one dataclass per family on the shared `TrainingConfig`.

Each field is a flag of `hfgen train <family>` (and `accelerate launch -m hfgen.training.train_<family>`) with the same
name, and carries its default, type, check and help in one place, `flag(...)`. Rules across fields live in
`validate()`, which every trainer calls before any work. From Python:

    from hfgen.training import VAETrainer, VAETrainingConfig
    folder = VAETrainer(VAETrainingConfig(output_dir="hfgen-vae-mnist", num_epochs=2)).train()

A family that changes a shared default says so with `redefault` (the GAN's learning rate of 2e-4, say). A nested
config (the latent diffusion's first stage) is a field made by `nested`, whose chosen fields are flags with a prefix
(`--vae_hidden_dims` sets `first_stage.hidden_dims`).
"""

import dataclasses
import importlib.util
import os
import re
import types
import typing

import torch
from diffusers.optimization import SchedulerType
from huggingface_hub import get_token

from hfgen.data import BUILTIN_DATASETS, check_color
from hfgen.data.pixel_cache import DEFAULT_MEMORY_GB
from hfgen.hub_utils import check_license, check_repo_id
from hfgen.utils import (
    CommandParser, check_choice, check_fraction, check_non_negative_int, check_non_negative_number,
    check_positive_int, check_positive_number, check_probability)

LOGGERS = ("auto", "tensorboard", "wandb", "none")
FINISHED_MARK = "model_index.json"  # a folder holding it is a finished pipeline
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(checkpoint_dir: str) -> list[str]:
    """Complete checkpoints, oldest first. A checkpoint is complete once renamed to checkpoint-<step>."""
    if not os.path.isdir(checkpoint_dir):
        return []
    names = [name for name in os.listdir(checkpoint_dir) if CHECKPOINT_PATTERN.match(name)]
    names.sort(key=lambda name: int(CHECKPOINT_PATTERN.match(name).group(1)))
    return [os.path.join(checkpoint_dir, name) for name in names]


def optional(check):
    """A check that also accepts None (the flag left unset)."""
    def check_if_given(name, value):
        if value is not None:
            check(name, value)
    return check_if_given


def check_channels(name: str, value) -> None:
    if value not in (1, 3):
        raise ValueError(f"`{name}` must be 1 or 3, got {value!r}")


def flag(default=dataclasses.MISSING, help: str = "", *, check=None, choices=None, aliases: tuple[str, ...] = ()):
    """A config field and its flag: the default (a list is copied for each config), the help, the check
    `check("--name", value)` run by `validate()`, the choices (checked too), and other names the command line
    accepts for it (e.g. diffusers' scripts' name)."""
    metadata = {"help": help, "check": check, "choices": tuple(choices) if choices is not None else None,
                "aliases": tuple(aliases)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def redefault(config_class, name: str, default):
    """`config_class`'s field `name` with another default: a family's own value of a shared flag."""
    metadata = dict(config_class.__dataclass_fields__[name].metadata)
    return flag(default, metadata["help"], check=metadata["check"], choices=metadata["choices"],
                aliases=metadata["aliases"])


def nested(default_factory, prefix: str, flags: tuple[str, ...], help_prefix: str):
    """A config inside a config: its `flags` are command-line flags `--{prefix}{name}` whose defaults are
    `default_factory()`'s."""
    return dataclasses.field(default_factory=default_factory, metadata={
        "nested": {"prefix": prefix, "flags": tuple(flags), "help_prefix": help_prefix}})


def _value_type(annotation):
    """The type a flag's strings convert to, and whether it takes a list: int | None -> (int, False),
    list[int] -> (int, True)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def field_default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


@dataclasses.dataclass(kw_only=True)
class TrainingConfig:
    """The flags every family shares, named like diffusers' example scripts."""

    output_dir: str = flag(help="Where the pipeline folder, checkpoints and logs are written.")
    overwrite_output_dir: bool = flag(
        False, "Replace the run already in --output_dir (otherwise it is refused unless resumed).")
    dataset_name: str = flag(
        "hfgen:mnist", f"Built-in ({', '.join(BUILTIN_DATASETS)}: no network), a `datasets` name on the Hub, a folder "
        "saved with save_to_disk, or a folder of parquet files.")
    dataset_config_name: str | None = flag(None, "The dataset's configuration, if it has several.")
    train_data_dir: str | None = flag(None, "A local image folder (class sub-folders or metadata.jsonl).")
    image_column: str | None = flag(None, "Column of the images (default: the first image column).")
    caption_column: str | None = flag(None, "Column of the captions (kept with the data for text conditioning).")
    cache_dir: str | None = flag(None, "Where `datasets` caches downloaded datasets.")
    streaming: bool = flag(
        False, "Stream a dataset too large to download; each process reads its own shard. Needs --max_train_steps.")
    max_train_samples: int | None = flag(
        None, "Train on this many images of the train split at most.", check=optional(check_positive_int))
    validation_split: float | None = flag(
        None, "Hold out this share of a source without a test split as its test split (for FD).",
        check=optional(check_fraction))
    resolution: int = flag(
        28, "The shorter side is resized to this, then a resolution x resolution crop is taken.",
        check=check_positive_int)
    center_crop: bool = flag(False, "Crop the center (default: a random crop, as diffusers' scripts).")
    random_flip: bool = flag(False, "Flip training images horizontally with probability 1/2.")
    no_resize: bool = flag(False, "Crop images as they are, without resizing the shorter side first.")
    num_channels: int | None = flag(None, "1 or 3 for image folders; inferred when omitted.",
                                    check=optional(check_channels))
    skip_corrupt_images: bool = flag(
        False, "Skip image files that cannot be decoded, and metadata rows without an image or images without a row "
        "(counted in the log), instead of stopping with an error.")
    background_color: str = flag(
        "white", 'What transparent pixels are composited onto: a colour name, "#rrggbb" or "r,g,b" (0-255).',
        check=check_color)
    pixel_cache_memory_gb: float = flag(
        DEFAULT_MEMORY_GB, "An image folder's decoded pixels are kept in RAM up to this many GiB per process, else "
        "in a memory-mapped file under $HFGEN_CACHE, so that only the first epoch decodes images.",
        check=check_non_negative_number)
    no_pixel_cache: bool = flag(False, "Decode every image on every epoch (no pixel cache).")
    conditional: bool = flag(False, "Condition the model on the dataset's class labels.")
    train_batch_size: int = flag(100, "Batch size per process.", check=check_positive_int)
    eval_batch_size: int = flag(250, "Batch size of sampling and evaluation.", check=check_positive_int)
    num_epochs: int = flag(10, "Passes over the training images.", check=check_positive_int)
    max_train_steps: int | None = flag(None, "Overrides --num_epochs when set.", check=optional(check_positive_int))
    learning_rate: float = flag(1e-3, "Adam's step size.", check=check_positive_number)
    adam_beta1: float = flag(0.9, check=check_probability)
    adam_beta2: float = flag(0.999, check=check_probability)
    adam_weight_decay: float = flag(0.0, "AdamW's decoupled weight decay.", check=check_non_negative_number)
    max_grad_norm: float | None = flag(
        None, "Clip gradients to this norm (off by default).", check=optional(check_positive_number))
    use_ema: bool = flag(False, "Keep an EMA of the weights and sample with it.")
    ema_max_decay: float = flag(0.9999, check=check_probability)
    ema_inv_gamma: float = flag(
        1.0, "EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power.", check=check_positive_number)
    ema_power: float = flag(0.75, check=check_positive_number)
    lr_scheduler: str = flag("constant", "A diffusers learning-rate schedule.",
                             choices=[kind.value for kind in SchedulerType])
    lr_warmup_steps: int = flag(0, check=check_non_negative_int)
    gradient_accumulation_steps: int = flag(1, check=check_positive_int)
    mixed_precision: str = flag("no", choices=("no", "fp16", "bf16"))
    dataloader_num_workers: int | None = flag(
        None, "Processes decoding images (default: none for data in memory or on 2-3 cores, else half the cores "
        "of each training process, at most 8).", check=optional(check_non_negative_int))
    checkpointing_steps: int = flag(500, "Save a resumable checkpoint every N steps.", check=check_positive_int)
    checkpoints_total_limit: int | None = flag(
        None, "Keep at most this many checkpoints.", check=optional(check_positive_int))
    resume_from_checkpoint: str | None = flag(None, 'A checkpoint folder, or "latest".')
    save_images_epochs: int = flag(1, "Write a sample grid every N epochs (0: never).", check=check_non_negative_int)
    num_validation_images: int = flag(64, "Images of each sample grid.", check=check_positive_int)
    logging_steps: int = flag(10, check=check_positive_int)
    feature_extractor: str = flag(
        "auto", 'Features of the Fréchet distance (FD): "auto" (hfgen\'s digit classifier for 1-channel images of at '
        'least 28 px; Inception for RGB when torch-fidelity is installed; else no FD, with a warning), "none", '
        '"classifier" (a domain feature space for any labelled dataset, e.g. colour images in class folders: a small '
        "CNN trained once on this run's training split and its labels, cached under $HFGEN_CACHE), "
        '"hfgen:digit-classifier", a saved DigitClassifier or DomainClassifier folder, "inception" '
        '(pip install "hfgen[fid]"), "dinov2:<Hub id or folder>" or "clip:<Hub id or folder>". FD, KID, '
        'precision/recall, density/coverage and memorisation are all computed in these features.')
    eval_num_samples: int = flag(
        1000, "Samples for the final FD, against as many images of the test split (else of the training images).",
        check=check_positive_int)
    eval_fd_steps: int = flag(0, "Also log a cheap FD every N steps (0: only at the end).", check=check_non_negative_int)
    eval_fd_num_samples: int = flag(200, "Samples for the periodic FD.", check=check_positive_int)
    seed: int = flag(0, check=check_non_negative_int)
    logger: str = flag("auto", '"auto": TensorBoard when it is installed.', choices=LOGGERS)
    push_to_hub: bool = flag(False, "Push the output folder to the Hub as --hub_model_id.")
    hub_model_id: str | None = flag(None, "Repository on the Hub, e.g. user/hfgen-vae-mnist.")
    hub_token: str | None = flag(None, "A Hub token (default: HF_TOKEN or the one `hf auth login` saved).")
    hub_private_repo: bool = flag(False, "Create the Hub repository as private.")
    push_demo: bool = flag(
        False, 'With --push_to_hub: also push a Gradio demo of the model as the Space <hub_model_id>-demo (pip install '
        '"hfgen[demo]").')
    license: str | None = flag(
        None, "The model's license, as the Hub names licenses (apache-2.0, mit, cc-by-4.0, other, ...): the card's "
        "`license`. Without it the card says that none was given.", check=check_license)

    # ----- checks ------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Clear errors for values that cannot work, before any work starts: every field's own check, then the
        rules across fields (families extend this)."""
        self.check_fields()
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError(f"`--output_dir` must name a folder, got {self.output_dir!r}")
        if self.streaming and self.max_train_steps is None:
            raise ValueError("`--streaming` needs `--max_train_steps`: a streamed dataset has no length to count "
                             "epochs (`--num_epochs`) from")
        if self.streaming and self.validation_split is not None:
            raise ValueError("`--validation_split` needs the dataset's length, which `--streaming` does not have")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("`--mixed_precision fp16` needs a GPU (its loss scaling is CUDA's); on this machine use "
                             "`--mixed_precision bf16` or `no`")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`--push_to_hub` needs `--hub_model_id` (e.g. user/my-model)")
        if self.hub_model_id is not None:
            check_repo_id("--hub_model_id", self.hub_model_id)
        if self.push_to_hub and not (self.hub_token or get_token()):
            raise ValueError("`--push_to_hub` needs a Hub token: pass `--hub_token`, set HF_TOKEN or run `hf auth "
                             "login`")
        if self.push_demo:
            self.check_push_demo()
        if self.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError('`--logger tensorboard` needs tensorboard: pip install "hfgen[tensorboard]"')
        self.check_output_dir()

    def check_fields(self, prefix: str = "--") -> None:
        """Each field's own check and choices, naming it as the flag `{prefix}{name}`. A nested config is checked
        by its family, as it is used."""
        for field in dataclasses.fields(self):
            value, name = getattr(self, field.name), f"{prefix}{field.name}"
            if "nested" in field.metadata:
                continue
            if field.metadata["choices"] is not None and not (value is None and field.default is None):
                check_choice(name, value, field.metadata["choices"])  # an unset optional flag is no choice
            if field.metadata["check"] is not None:
                field.metadata["check"](name, value)

    def check_push_demo(self) -> None:
        """--push_demo pushes a Space beside the pushed model, which its app loads by the model's full id."""
        if not self.push_to_hub:
            raise ValueError("`--push_demo` pushes a demo Space beside the model pushed to the Hub: it needs "
                             "`--push_to_hub`")
        if self.hub_model_id.count("/") != 1:
            raise ValueError(f"`--push_demo`: the demo loads the model by its full Hub id, so `--hub_model_id` must be "
                             f"user/name, got {self.hub_model_id!r}")
        if importlib.util.find_spec("gradio") is None:
            raise ValueError('`--push_demo` writes a Gradio app, which needs gradio: pip install "hfgen[demo]"')

    def check_output_dir(self) -> None:
        """--output_dir must be writable, and must not hold another run unless it is resumed or overwritten."""
        folder = self.output_dir
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"`--output_dir` {folder!r} is a file, not a folder")
        parent = os.path.abspath(folder)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"`--output_dir` {folder!r} cannot be written: {parent!r} is not writable")
        checkpoints = list_checkpoints(os.path.join(folder, "checkpoints"))
        holds_run = checkpoints or os.path.isfile(os.path.join(folder, FINISHED_MARK))
        resumable = self.resume_from_checkpoint not in (None, "latest") or checkpoints
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError("`--overwrite_output_dir` replaces the run that `--resume_from_checkpoint` would "
                             "continue: pass one of them")
        if holds_run and not self.overwrite_output_dir and not (self.resume_from_checkpoint and resumable):
            what = f"{len(checkpoints)} checkpoints" if checkpoints else "a finished pipeline"
            raise ValueError(f"`--output_dir` {folder!r} already holds a run ({what}): resume it with "
                             "`--resume_from_checkpoint latest`, pass `--overwrite_output_dir` to replace it, or "
                             "choose another folder")

    # ----- the command line --------------------------------------------------------------------------------

    @classmethod
    def command_parser(cls, description: str = "") -> CommandParser:
        """argparse flags for every field: `--name VALUE`, `--name V1 V2 ...` for lists, a bare `--name` for a
        boolean; a nested config's chosen fields as `--{prefix}{name}`."""
        parser = CommandParser(description=description or (cls.__doc__ or "").strip().splitlines()[0])
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if "nested" in field.metadata:
                nested_spec, inner = field.metadata["nested"], field_default(field)
                inner_hints, inner_fields = typing.get_type_hints(type(inner)), dataclasses.fields(inner)
                for name in nested_spec["flags"]:
                    inner_field = next(candidate for candidate in inner_fields if candidate.name == name)
                    _add_flag(parser, nested_spec["prefix"] + name, inner_hints[name], getattr(inner, name),
                              nested_spec["help_prefix"] + inner_field.metadata["help"], inner_field.metadata)
                continue
            default = field_default(field)
            _add_flag(parser, field.name, hints[field.name], default, field.metadata["help"], field.metadata,
                      required=default is dataclasses.MISSING)
        return parser

    @classmethod
    def from_command_line(cls, argv=None, description: str = ""):
        """The config the command line `argv` (default: sys.argv[1:]) describes."""
        parsed = vars(cls.command_parser(description).parse_args(argv))
        values = {}
        for field in dataclasses.fields(cls):
            if "nested" in field.metadata:
                spec = field.metadata["nested"]
                given = {name: parsed.pop(spec["prefix"] + name) for name in spec["flags"]}
                values[field.name] = dataclasses.replace(field_default(field), **given)
            else:
                values[field.name] = parsed.pop(field.name)
        return cls(**values)

    def to_flags(self) -> dict:
        """{flag name: value}, as the command line names them (a nested config's flags with their prefix): what a
        run records in its card and its trackers."""
        flags = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if "nested" in field.metadata:
                spec = field.metadata["nested"]
                flags.update({spec["prefix"] + name: getattr(value, name) for name in spec["flags"]})
            else:
                flags[field.name] = value
        return flags


def _add_flag(parser, name: str, annotation, default, help: str, metadata, required: bool = False) -> None:
    value_type, is_list = _value_type(annotation)
    names = [f"--{name}", *(f"--{alias}" for alias in metadata.get("aliases", ()))]
    if value_type is bool:  # a bare --name sets it
        parser.add_argument(*names, action="store_true", default=default, help=help)
        return
    kwargs = {"type": value_type, "help": help}
    if is_list:
        kwargs["nargs"] = "+"
    if metadata.get("choices") is not None:
        kwargs["choices"] = [choice for choice in metadata["choices"] if choice is not None]
    if required:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    parser.add_argument(*names, dest=name, **kwargs)
