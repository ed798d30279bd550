"""A Gradio demo for any hfgen pipeline (`hfgen demo FOLDER_OR_REPO`), and the Space that runs it.

The page offers what the pipeline can do, read from the pipeline itself: the arguments its call takes (class
labels, denoising steps, guidance), its scheduler (DDPM-family or flow-matching samplers), a VAE's or a GAN's
latent-space tools, and a diffusion pipeline's editing (image-to-image, inpainting of a painted region). The
pipeline checks every input; its ValueError is shown in the page as a `gr.Error`.
"""

import functools
import inspect
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable

try:
    import gradio as gr
except ImportError as error:
    raise ImportError('the hfgen demo needs gradio: pip install "hfgen[demo]"') from error
import PIL.Image
import PIL.ImageChops
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import snapshot_download

from hfgen import AutoPipeline
from hfgen.hub_utils import METRICS_FILE, SAMPLE_GRID, push_space
from hfgen.objectives import objective_of, swapped
from hfgen.pipelines.pipeline_utils import call_arguments, resolve_pretrained_path
from hfgen.remote_code import code_requirements, module_text, saved_code_module
from hfgen.utils import check_non_negative_int


DEFAULT_STEPS = 50
SPACE_SUFFIX = "-demo"


def scheduler_choices(scheduler) -> dict[str, tuple[type, Callable]]:
    """The samplers that fit a pipeline's scheduler: its objective's (`samplers` in hfgen.objectives: they share the
    noise levels). A saved scheduler of another class comes first, as it is."""
    choices = objective_of(scheduler).samplers
    if any(type(scheduler) is cls for cls, _ in choices.values()):
        return choices
    return {type(scheduler).__name__: (type(scheduler), swapped(type(scheduler))), **choices}


def saved_scheduler_name(scheduler, choices: dict) -> str:
    return next(name for name, (cls, _) in choices.items() if type(scheduler) is cls)


def shows_errors(function):
    """The pipeline's ValueError or TypeError becomes a `gr.Error`: its message in the page, no traceback."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from error
    return wrapper


def label_names(pipeline) -> list[str]:
    """A conditional pipeline's classes as the names its `class_labels` takes: id2label's, else the ids."""
    if pipeline.id2label:
        return [pipeline.id2label[key] for key in sorted(pipeline.id2label, key=int)]
    return [str(index) for index in range(pipeline.num_classes)]


def class_label(pipeline, choice):
    """A class typed or chosen in the page -> what the pipeline's `class_labels` takes (it checks the value)."""
    if choice is None or str(choice).strip() == "":
        raise ValueError(f"`class_labels`: choose one of the model's {pipeline.num_classes} classes")
    choice = str(choice).strip()
    return int(choice) if not pipeline.id2label and choice.lstrip("-").isdigit() else choice


def load(pretrained, device: str = "cpu") -> tuple[DiffusionPipeline, str | None]:
    """A pipeline, or a folder or Hub id loaded with AutoPipeline -> (pipeline, its local folder or None)."""
    if isinstance(pretrained, DiffusionPipeline):
        return pretrained, None
    folder = resolve_pretrained_path(pretrained)
    return AutoPipeline.from_pretrained(folder).to(device), folder


def card_panel(folder: str | None) -> None:
    """The model card's metrics and sample grid, when the folder has them."""
    if folder is None:
        return
    metrics_file = os.path.join(folder, METRICS_FILE)
    if os.path.isfile(metrics_file):
        with open(metrics_file, encoding="utf-8") as file:
            metrics = json.load(file)
        rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in metrics.items())
        gr.Markdown(f"### Model card metrics\n\n| metric | value |\n| --- | --- |\n{rows}", elem_id="card-metrics")
    grid = os.path.join(folder, SAMPLE_GRID)
    if os.path.isfile(grid):
        gr.Image(grid, label="Samples from training", interactive=False, elem_id="card-grid")


def save_zip(images, folder: str) -> str:
    """The images as PNGs in one zip file, for the download."""
    path = os.path.join(folder, "samples.zip")
    with zipfile.ZipFile(path, "w") as archive:
        for index, image in enumerate(images):
            with archive.open(f"sample-{index:03d}.png", "w") as file:
                image.save(file, format="PNG")
    return path


def generator(seed) -> torch.Generator:
    check_non_negative_int("seed", seed)
    return torch.Generator().manual_seed(seed)


def sample_tab(pipeline) -> None:
    """Number of images and seed for every family; class, sampler, steps and guidance where the call takes them."""
    parameters = call_arguments(pipeline)
    downloads = tempfile.mkdtemp(prefix="hfgen-demo-")
    with gr.Row():
        num_images = gr.Number(16, precision=0, label="Number of images", elem_id="num-images")
        seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
    # call argument -> (component, value in the page -> argument), keyed on the call's parameters
    controls = {}
    text_to_image = "prompt" in parameters and hasattr(pipeline, "encode_prompt")
    if text_to_image:
        controls["prompt"] = (gr.Textbox("", label="Prompt (empty: unconditional)", elem_id="prompt"), str)
        controls["negative_prompt"] = (gr.Textbox("", label="Negative prompt (with guidance)",
                                                  elem_id="negative-prompt"), lambda text: text or None)
    if pipeline.num_classes and "class_labels" in parameters:
        names = label_names(pipeline)
        controls["class_labels"] = (gr.Dropdown(names, value=names[0], allow_custom_value=True, label="Class",
                                                elem_id="class"), functools.partial(class_label, pipeline))
    if "num_inference_steps" in parameters:
        choices = scheduler_choices(pipeline.scheduler)
        saved = pipeline.scheduler

        def scheduler(name):
            _, build = choices[name]
            return build(saved)

        controls["scheduler"] = (gr.Dropdown(list(choices), value=saved_scheduler_name(saved, choices),
                                             label="Scheduler", elem_id="scheduler"), scheduler)
        controls["num_inference_steps"] = (steps_slider(pipeline, "steps"), int)
    guided = (pipeline.config.get("prompt_dropout") or 0) > 0 if text_to_image else (
        pipeline.num_classes and (pipeline.config.get("label_dropout") or 0) > 0)
    if "guidance_scale" in parameters and guided:
        controls["guidance_scale"] = (gr.Slider(1.0, 10.0, 1.0, step=0.5, label="Guidance scale",
                                                elem_id="guidance"), float)
    button = gr.Button("Sample", variant="primary", elem_id="sample-button")
    gallery = gr.Gallery(label="Samples", columns=4, format="png", elem_id="samples")
    download = gr.File(label="Download the images", elem_id="download")

    @shows_errors
    def sample(num_images, seed, *values, progress=gr.Progress(track_tqdm=True)):
        kwargs = {name: convert(value) for (name, (_, convert)), value in zip(controls.items(), values)}
        if "scheduler" in kwargs:
            pipeline.scheduler = kwargs.pop("scheduler")  # events run one at a time (gradio's default)
        images = pipeline(num_images, generator=generator(seed), **kwargs).images
        return images, save_zip(images, downloads)

    # named after the call's arguments, so that the API (gradio_client) reads like the pipeline
    parameter = functools.partial(inspect.Parameter, kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
    sample.__signature__ = inspect.Signature(
        [parameter(name) for name in ("num_images", "seed", *controls)]
        + [inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress(track_tqdm=True))])
    button.click(sample, [num_images, seed, *(component for component, _ in controls.values())], [gallery, download],
                 api_name="sample")


def steps_slider(pipeline, elem_id: str) -> "gr.Slider":
    """Denoising steps, up to the scheduler's training steps; by default a few-step model's own count, else 50."""
    num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
    default = pipeline.config.get("sampling_steps") or min(DEFAULT_STEPS, num_train_timesteps)
    return gr.Slider(1, num_train_timesteps, default, step=1, label="Denoising steps", elem_id=elem_id)


def edited_inputs(editor_value, size: int):
    """An image editor's value (an uploaded image, and strokes painted over it) -> (the image and the mask of the
    painted region (1: regenerate; None where nothing is painted)), both at the model's size."""
    background = (editor_value or {}).get("background")
    if background is None:
        raise ValueError("`image`: upload an image to edit first")
    image = background.convert("RGBA")
    flat = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, "white"), image).convert("RGB")
    image = flat.resize((size, size), PIL.Image.Resampling.LANCZOS)
    painted = None
    for layer in (editor_value.get("layers") or []):
        alpha = layer.convert("RGBA").getchannel("A")
        painted = alpha if painted is None else PIL.ImageChops.lighter(painted, alpha)
    if painted is None or painted.getbbox() is None:
        return image, None
    mask = painted.resize((size, size), PIL.Image.Resampling.BOX).point(lambda value: 255 if value > 0 else 0)
    return image, mask


def edit_tab(pipeline) -> None:
    """Image-to-image and inpainting for a diffusion pipeline: an uploaded image, strokes painted over what to
    regenerate (none: image-to-image at the strength), seed, steps and the class or prompt where it takes one."""
    parameters = call_arguments(pipeline)
    size = pipeline.sample_size
    with gr.Tab("Edit"):
        with gr.Row():
            editor = gr.ImageEditor(type="pil", image_mode="RGBA", sources=["upload", "clipboard"], format="png",
                                    label=f"Upload an image (resized to {size}x{size}); paint over what to regenerate",
                                    brush=gr.Brush(colors=["#ff0000"], default_color="#ff0000"), elem_id="edit-image")
            edited = gr.Image(label="Edited", format="png", elem_id="edited")
        with gr.Row():
            strength = gr.Slider(0.0, 1.0, 0.6, step=0.05, elem_id="strength",
                                 label="Strength: how much is redrawn (painted strokes: the painted region, fully)")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="edit-seed")
            steps = steps_slider(pipeline, "edit-steps")
        condition = None
        if "prompt" in parameters and hasattr(pipeline, "encode_prompt"):
            condition = ("prompt", gr.Textbox("", label="Prompt", elem_id="edit-prompt"), str)
        elif pipeline.num_classes and "class_labels" in parameters:
            names = label_names(pipeline)
            condition = ("class_labels", gr.Dropdown(names, value=names[0], allow_custom_value=True, label="Class",
                                                     elem_id="edit-class"), functools.partial(class_label, pipeline))
        button = gr.Button("Edit", variant="primary", elem_id="edit-button")

        @shows_errors
        def edit(editor_value, strength, seed, steps, *value):
            image, mask = edited_inputs(editor_value, size)
            kwargs = {condition[0]: condition[2](value[0])} if condition else {}
            if mask is not None:
                kwargs["mask_image"] = mask  # the painted region, regenerated from noise
            else:
                kwargs["strength"] = float(strength)
            return pipeline(image=image, num_inference_steps=int(steps), generator=generator(seed), **kwargs).images[0]

        # named after the call's arguments, as the sample tab's API is
        parameter = functools.partial(inspect.Parameter, kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
        edit.__signature__ = inspect.Signature(
            [parameter(name) for name in ("image", "strength", "seed", "num_inference_steps",
                                          *([condition[0]] if condition else []))])
        button.click(edit, [editor, strength, seed, steps, *([condition[1]] if condition else [])], edited,
                     api_name="edit")


def image_input(label: str, elem_id: str):
    # image_mode=None keeps the uploaded mode: the pipeline converts and checks it
    return gr.Image(type="pil", image_mode=None, sources=["upload", "clipboard"], label=label, elem_id=elem_id)


def drawn_image(sketch, size: int):
    """A sketchpad drawing (white strokes on black) -> a grey image of the model's size; None if nothing is drawn."""
    composite = (sketch or {}).get("composite")
    if composite is None:
        return None
    background = PIL.Image.new("RGBA", composite.size, "black")
    flat = PIL.Image.alpha_composite(background, composite.convert("RGBA")).convert("L")
    return None if flat.getbbox() is None else flat.resize((size, size), PIL.Image.Resampling.LANCZOS)


def vae_tabs(pipeline) -> None:
    """Reconstruction of an uploaded or drawn image, interpolation between two images, traversal of a latent."""
    if pipeline.num_classes:
        return  # a CVAE's tools need a class in every call; its samples are in the sample tab
    size, latent_dim = pipeline.sample_size, math.prod(pipeline.latent_shape)
    with gr.Tab("Reconstruct"):
        with gr.Row():
            upload = image_input(f"Upload an image ({size}x{size})", "vae-image")
            blank = PIL.Image.new("RGBA", (10 * size, 10 * size), "black")
            sketch = gr.Sketchpad({"background": blank, "layers": [], "composite": None}, type="pil",
                                  canvas_size=(10 * size, 10 * size), label="... or draw one",
                                  brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff"), elem_id="sketch")
            reconstruction = gr.Image(label="Reconstruction", format="png", elem_id="reconstruction")
        button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-button")

        @shows_errors
        def reconstruct(image, drawing):
            image = image if image is not None else drawn_image(drawing, size)
            if image is None:
                raise ValueError("`images`: upload or draw an image first")
            return pipeline.reconstruct(image).images[0]

        button.click(reconstruct, [upload, sketch], reconstruction, api_name="reconstruct")
    with gr.Tab("Interpolate"):
        with gr.Row():
            image_a, image_b = image_input("From", "image-a"), image_input("To", "image-b")
        with gr.Row():
            num_steps = gr.Slider(2, 16, 8, step=1, label="Steps")
            method = gr.Radio(["linear", "spherical"], value="linear", label="Path")
        button = gr.Button("Interpolate", variant="primary")
        path = gr.Gallery(label="Interpolation", columns=6, format="png")
        button.click(shows_errors(lambda a, b, steps, how: pipeline.interpolate(a, b, int(steps), how).images),
                     [image_a, image_b, num_steps, method], path, api_name="interpolate")
    with gr.Tab("Traverse"):
        with gr.Row():
            dim = gr.Slider(0, latent_dim - 1, 0, step=1, label="Latent dimension", elem_id="dim")
            extent = gr.Slider(0.5, 5.0, 3.0, step=0.5, label="Range (±)")
            start = image_input("Start from this image (else z = 0)", "traverse-image")
        sweep = gr.Gallery(label="Traversal", columns=7, format="png")

        @shows_errors
        def traverse(dim, extent, image):
            values = torch.linspace(-extent, extent, 7).tolist()
            return pipeline.traverse(int(dim), values, image=image).images

        gr.on([dim.release, extent.release, start.change], traverse, [dim, extent, start], sweep, api_name="traverse")


def gan_tab(pipeline) -> None:
    """Images along the path between two prior samples drawn from the seed."""
    with gr.Tab("Interpolate"):
        with gr.Row():
            seed = gr.Number(0, precision=0, label="Seed")
            num_steps = gr.Slider(2, 16, 8, step=1, label="Steps")
            method = gr.Radio(["linear", "spherical"], value="spherical", label="Path")
        button = gr.Button("Interpolate", variant="primary")
        path = gr.Gallery(label="Interpolation", columns=6, format="png")
        button.click(shows_errors(lambda seed, steps, how: pipeline.interpolate(
            int(steps), how, generator=generator(seed)).images), [seed, num_steps, method], path, api_name="interpolate")


def build_demo(pretrained, device: str = "cpu") -> "gr.Blocks":
    """A Gradio app for a pipeline, or for a pipeline folder or Hub id (loaded with AutoPipeline)."""
    pipeline, folder = load(pretrained, device)
    name = os.path.basename(os.path.normpath(str(pretrained))) if folder else type(pipeline).__name__
    return demo_blocks(pipeline, name, folder)


def demo_blocks(pipeline, name: str, folder: str | None = None) -> "gr.Blocks":
    """The app for a loaded hfgen pipeline (hfgen's classes, or those of the code saved with it); `folder`, where
    it was loaded from, shows the model card's metrics and samples. The tabs follow the pipeline's family."""
    if pipeline.family == "autoencoder":
        raise ValueError(f"{name!r} holds an AutoencoderPipeline, a first stage with no prior to sample "
                         "from: a demo samples images (train latent diffusion on it: hfgen train ldm --vae_path FOLDER)")
    classes = f", {pipeline.num_classes} classes" if pipeline.num_classes else ""
    with gr.Blocks(title=f"hfgen: {name}") as demo:
        gr.Markdown(f"# {name}\nAn hfgen {type(pipeline).__name__} ({pipeline.family}{classes}), "
                    f"{pipeline.sample_size}x{pipeline.sample_size} images.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Sample"):
                    sample_tab(pipeline)
                if pipeline.family == "vae" and hasattr(pipeline, "reconstruct"):  # VAEPipeline's latent tools
                    vae_tabs(pipeline)
                if pipeline.family == "gan" and hasattr(pipeline, "interpolate"):  # GANPipeline's
                    gan_tab(pipeline)
                if "strength" in call_arguments(pipeline):  # the diffusion pipelines' editing
                    edit_tab(pipeline)
            if folder is not None:
                with gr.Column(scale=1):
                    card_panel(folder)
    return demo


def space_demo(model_id: str) -> "gr.Blocks":
    """The Space's app: the model repo loaded by plain diffusers with the code saved in it (no hfgen installed)."""
    folder = snapshot_download(model_id)
    return demo_blocks(DiffusionPipeline.from_pretrained(folder, trust_remote_code=True), model_id.split("/")[-1], folder)


APP_MAIN = """
demo = space_demo({model_id!r})

if __name__ == "__main__":
    demo.launch()
"""


def write_space(pretrained, out_dir: str, model_id: str | None = None) -> str:
    """Writes a Gradio Space that shows the model repo `model_id`, and needs no hfgen: app.py (hfgen's demo code,
    `space_demo`, copied by hfgen.remote_code), requirements.txt (what app.py and the model's saved code import)
    and a README.md whose metadata says `sdk: gradio` and names the model repo. `model_id` defaults to `pretrained`
    when that is a Hub id; a local folder needs the id it is (or will be) pushed to. Returns `out_dir`."""
    from huggingface_hub import SpaceCard, SpaceCardData

    local = os.path.isdir(os.path.expanduser(str(pretrained)))
    if not local and model_id is None:
        model_id = str(pretrained)
    if model_id is None or str(model_id).count("/") != 1:
        raise ValueError(f"`model_id` must be the Hub repo id (user/name) the Space loads the model from, got "
                         f"{model_id!r}: a Space cannot read the local folder {str(pretrained)!r}")
    model_code = saved_code_module(resolve_pretrained_path(pretrained))
    app = module_text("The Gradio demo of " + model_id + ", written by `hfgen demo --write_space`.", [space_demo])
    app += APP_MAIN.format(model_id=model_id)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "app.py"), "w", encoding="utf-8") as file:
        file.write(app)
    requirements = sorted(set(code_requirements(app)) | set(code_requirements(model_code)))
    with open(os.path.join(out_dir, "requirements.txt"), "w", encoding="utf-8") as file:
        file.write("".join(requirement + "\n" for requirement in requirements if not requirement.startswith("gradio")))
    data = SpaceCardData(title=f"{model_id.split('/')[-1]} demo", sdk="gradio", sdk_version=gr.__version__,
                         app_file="app.py", models=[model_id], tags=["hfgen"])
    SpaceCard(f"---\n{data.to_yaml()}\n---\n\n# {model_id} demo\n\nA Gradio demo of the hfgen model "
              f"[{model_id}](https://huggingface.co/{model_id}), written by `hfgen demo --write_space`. It loads the "
              "model with plain diffusers and the code saved in its repo (`trust_remote_code=True`).\n"
              ).save(os.path.join(out_dir, "README.md"))
    return out_dir


def push_demo(pretrained, model_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Writes the demo Space of `model_id` and pushes it as the Space repo `<model_id>-demo`; returns the commit URL."""
    with tempfile.TemporaryDirectory() as folder:
        write_space(pretrained, folder, model_id)
        return push_space(folder, model_id + SPACE_SUFFIX, token=token, private=private)
