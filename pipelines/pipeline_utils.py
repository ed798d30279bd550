"""The base of every hfgen pipeline: loading, class labels, prior noise and output conversion."""

import inspect
import json
import math
import numbers
import os
import tempfile

import numpy as np
import psutil
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import file_exists, snapshot_download

from hfgen.hub_utils import check_repo_id, push_folder, push_token, write_model_card
from hfgen.image_processing import postprocess
from hfgen.remote_code import as_hfgen_index, write_remote_code
from hfgen.utils import check_class_labels, check_positive_int

HUB_DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only")


def resolve_pretrained_path(pretrained_model_name_or_path, **hub_kwargs) -> str:
    """A local pipeline folder, or a Hub repo id downloaded with `snapshot_download`: -> a local folder.

    diffusers 0.42 cannot load components defined outside diffusers from a repo id by itself, so hfgen
    always downloads first and loads the local copy.
    """
    given = str(pretrained_model_name_or_path)
    path = os.path.expanduser(given)
    if not os.path.isdir(path):
        looks_like_path = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1
        if looks_like_path:
            raise ValueError(f"`pretrained_model_name_or_path` {given!r} is not a folder, and not a Hub repo id "
                             "(user/name) either")
        try:
            path = snapshot_download(path, **hub_kwargs)
        except Exception as error:  # not on the Hub, private without a token, or offline without a cached copy
            raise ValueError(f"`pretrained_model_name_or_path` {given!r} is not a local folder, and downloading it "
                             f"from the Hub failed: {type(error).__name__}: {error}") from error
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ValueError(f"`pretrained_model_name_or_path` {given!r} holds no model_index.json: it is not a saved pipeline")
    read_model_index(index_file)
    return path


TEXT_COMPONENTS = ("text_encoder", "tokenizer")  # the only components a transformers class may fill


def call_arguments(pipeline) -> set[str]:
    """The keyword arguments that `pipeline(...)` takes: those of its `__call__`, and, where that passes
    `**kwargs` on to its base class's `__call__`, those too."""
    names = set()
    for cls in type(pipeline).__mro__:
        if "__call__" not in vars(cls):
            continue
        parameters = inspect.signature(vars(cls)["__call__"]).parameters.values()
        names |= {parameter.name for parameter in parameters if parameter.name != "self"
                  and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)}
        if all(parameter.kind is not parameter.VAR_KEYWORD for parameter in parameters):
            break
    return names


def read_model_index(index_file: str) -> dict:
    """A pipeline folder's model_index.json as hfgen reads it (`as_hfgen_index`), checked: valid JSON whose
    components are hfgen's or diffusers' classes, or, for the text components, transformers' ones."""
    try:
        with open(index_file, encoding="utf-8") as file:
            index = json.load(file)
    except ValueError as error:
        raise ValueError(f"{index_file} is not valid JSON ({error}): the folder was not saved completely") from error
    if not isinstance(index, dict):
        raise ValueError(f"{index_file} must hold a JSON object, got {type(index).__name__}")
    index = as_hfgen_index(index)
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        library = str(entry[0]).split(".")[0]
        allowed = ("hfgen", "diffusers", "transformers") if name in TEXT_COMPONENTS else ("hfgen", "diffusers")
        if library not in allowed:
            raise ValueError(f"{index_file} names {entry[1]!r} from {entry[0]!r} for the component {name!r}; hfgen "
                             "pipelines hold hfgen models and diffusers models and schedulers (and transformers "
                             f"classes only as {' and '.join(TEXT_COMPONENTS)})")
    return index


class GenerativePipeline(DiffusionPipeline):
    """Shared by all hfgen pipelines.

    Subclasses register their components and name the model that maps prior latents to images in
    `generative_model`. By default that model supplies `latent_shape`, `data_range` ("unit" or "symmetric"),
    `config.num_classes`, `config.id2label` and `decode(latents, class_labels)`; a pipeline whose model does
    not (diffusion) overrides those properties and `__call__`, and reuses the helpers.
    """

    # True for diffusion in pixel space, whose variational bound gives bits/dim (hfgen.evaluation.evaluate_pipeline)
    denoises_pixels = False
    family = ""  # "vae", "gan", "ddpm" or "ldm": the model card's tag

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads a local folder or a Hub repo id (`revision`, `token`, `cache_dir` go to the download)."""
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_DOWNLOAD_KWARGS if key in kwargs}
        path = resolve_pretrained_path(pretrained_model_name_or_path, **hub_kwargs)
        saved_class = read_model_index(os.path.join(path, "model_index.json")).get("_class_name")
        if cls is not GenerativePipeline and saved_class != cls.__name__:
            components = sorted(name for name, entry in read_model_index(os.path.join(path, "model_index.json")).items()
                                if not name.startswith("_") and isinstance(entry, list))
            raise ValueError(f"{str(pretrained_model_name_or_path)!r} holds a {saved_class} (components "
                             f"{', '.join(components)}), not a {cls.__name__}: load it with {saved_class}.from_pretrained "
                             "or hfgen.AutoPipeline.from_pretrained")
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`, with the saved code's entries read as hfgen's classes (`as_hfgen_index`)."""
        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return (as_hfgen_index(loaded[0]), *loaded[1:])
        return as_hfgen_index(loaded)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """diffusers' `save_pretrained`, plus the code with which plain diffusers loads the folder
        (`hfgen.remote_code`); `push_to_hub=True` then pushes it (`repo_id`, `token`, `private`, `commit_message`)."""
        push_kwargs = {key: kwargs.pop(key) for key in ("repo_id", "token", "private", "commit_message") if key in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(self, save_directory)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, **push_kwargs)

    @property
    def generative_model(self):
        raise NotImplementedError

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload hfgen pipeline", private: bool | None = None,
                    token: str | None = None, **save_kwargs) -> str:
        """Saves the pipeline and uploads it to `repo_id`; returns the commit URL.

        A repo without a model card gets an hfgen one (library hfgen, the family's tag, usage, config); a card
        already there is kept, as it holds what only training knew (metrics, training config).
        """
        check_repo_id("repo_id", repo_id)
        token = push_token(token)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            if not file_exists(repo_id, "README.md", token=token):
                write_model_card(folder, title=repo_id.split("/")[-1], description=f"An hfgen {self.family} pipeline.",
                                 pipeline_class=type(self).__name__, tags=[self.family],
                                 model_config=dict(self.generative_model.config), num_classes=self.num_classes)
            return push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message)

    # What the sampling skeleton needs to know; by default the generative model's, pipelines may override.
    @property
    def num_classes(self) -> int:
        return self.generative_model.config.num_classes

    @property
    def id2label(self) -> dict | None:
        return self.generative_model.config.get("id2label")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.generative_model.latent_shape

    @property
    def data_range(self) -> str:
        return self.generative_model.data_range

    @property
    def sample_size(self) -> int:
        """Height and width of the images the pipeline generates."""
        return self.generative_model.config.sample_size

    def prepare_class_labels(self, class_labels, batch_size: int | None) -> tuple[torch.Tensor | None, int]:
        """Ints, names from the model's `id2label`, or a tensor -> ((B,) long tensor or None, B).

        A single label is repeated `batch_size` times; a list sets the batch size when it is None.
        """
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if class_labels is None or self.num_classes == 0:
            batch_size = batch_size or 1
            return check_class_labels(class_labels, self.num_classes, batch_size), batch_size
        if isinstance(class_labels, np.ndarray):
            class_labels = torch.from_numpy(class_labels)
        if isinstance(class_labels, (numbers.Number, str)) or (isinstance(class_labels, torch.Tensor) and class_labels.dim() == 0):
            class_labels = [class_labels] * (batch_size or 1)
        if not isinstance(class_labels, torch.Tensor):
            class_labels = [self._label_id(label) for label in class_labels]
        batch_size = batch_size or len(class_labels)
        return check_class_labels(class_labels, self.num_classes, batch_size, self.device), batch_size

    def _label_id(self, label):
        if not isinstance(label, str):
            return label
        id2label = self.id2label or {}
        label2id = {name: int(index) for index, name in id2label.items()}
        if label not in label2id:
            raise ValueError(f"`class_labels` has the name {label!r}, but the model's id2label names {sorted(label2id)}")
        return label2id[label]

    def prepare_latents(self, batch_size: int, generator=None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Prior noise z ~ N(0, I) of shape (B, *latent_shape), or the given `latents` after a shape check."""
        dtype = self.generative_model.dtype
        shape = (batch_size, *self.latent_shape)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)} generators: it must hold one per image "
                             f"({batch_size}), or be a single generator")
        if latents is not None:
            if isinstance(latents, np.ndarray):
                latents = torch.from_numpy(latents)
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"`latents` must be a torch.Tensor or numpy array of shape {shape}, got {type(latents).__name__}")
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(self.device, dtype)
        self.check_fits_in_memory(batch_size)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)

    def check_fits_in_memory(self, batch_size: int) -> None:
        """A clear error, before anything is allocated, for a batch whose images alone exceed the free memory."""
        image_bytes = batch_size * math.prod(self.latent_shape) * 4 * 4  # the sample and a few copies, float32
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        if image_bytes > free:
            raise ValueError(f"`batch_size` {batch_size} does not fit in memory (~{image_bytes / 2**30:.1f} GiB for the "
                             f"images alone, {free / 2**30:.1f} GiB free): sample in smaller batches")

    def output(self, images: torch.Tensor, output_type: str, return_dict: bool):
        """Model tensor -> `ImagePipelineOutput` (or a tuple) of "pil", "np" or "pt" images."""
        images = postprocess(images, output_type, self.data_range)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        *,
        class_labels=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Samples z ~ p(z) and decodes it: prior noise -> model -> image.

        Args:
            batch_size: number of images; None means one per class label, or 1.
            class_labels: for conditional models, an int, a class name, or one per image (list or tensor).
            generator: makes sampling deterministic: the same generator state gives the same images.
            latents: prior samples of shape (B, *latent_shape) to decode instead of fresh noise.
            output_type: "pil", "np" (B, H, W, C) or "pt" (B, C, H, W), values in [0, 1].
        """
        labels, batch_size = self.prepare_class_labels(class_labels, batch_size)
        latents = self.prepare_latents(batch_size, generator, latents)
        images = self.generative_model.decode(latents, labels).sample
        return self.output(images, output_type, return_dict)
