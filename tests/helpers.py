"""What several test modules share: short training flags, interruption and comparison of runs, small image
folders, tiny models. (conftest.py holds the session's set-up and fixtures.)"""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from hfgen import DDPMPipeline


def quick_training_args(output_dir, *extra) -> list[str]:
    """Flags for short, quiet training runs in tests (any family)."""
    return ["--output_dir", str(output_dir), "--logger", "none", "--save_images_epochs", "0",
            "--num_validation_images", "16", "--eval_num_samples", "200", *map(str, extra)]


class Interrupted(Exception):
    """Stands for a training process killed mid-run."""


def interrupt_after(monkeypatch, trainer_class, num_batches: int) -> None:
    """Makes `trainer_class` raise `Interrupted` at its (num_batches + 1)-th training step; monkeypatch.undo() ends it."""
    original, calls = trainer_class.training_step, {"count": 0}

    def step(self, images, labels):
        calls["count"] += 1
        if calls["count"] > num_batches:
            raise Interrupted
        return original(self, images, labels)

    monkeypatch.setattr(trainer_class, "training_step", step)


def interrupt_then_resume(monkeypatch, main, trainer_class, args: list[str], num_batches: int) -> None:
    """Runs `main(args)` until it dies at its (num_batches + 1)-th step, then again with --resume_from_checkpoint."""
    interrupt_after(monkeypatch, trainer_class, num_batches)
    with pytest.raises(Interrupted):
        main(args)
    monkeypatch.undo()
    main([*args, "--resume_from_checkpoint", "latest"])


def same_weights(folder_a, folder_b, component: str) -> bool:
    """Whether two pipeline folders hold bit-identical weights for `component`."""
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(folder, component, "diffusion_pytorch_model.safetensors")) for folder in (folder_a, folder_b))
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def quick_vae_args(output_dir, *extra) -> list[str]:
    return quick_training_args(output_dir, "--eval_importance_samples", "10", *extra)


def write_image_folder(root, classes=("cat", "dog"), per_class=3, size=12, mode="RGB"):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            PIL.Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


def write_mixed_folder(root):
    """Images of odd sizes and modes: RGB, grey, RGBA, palette; portrait, landscape, tiny and large."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for i, (mode, size) in enumerate([("RGB", (40, 24)), ("L", (17, 33)), ("RGBA", (20, 20)), ("P", (64, 48)),
                                      ("RGB", (9, 9)), ("L", (100, 31))]):
        shape = (size[1], size[0], {"RGB": 3, "RGBA": 4}.get(mode, 0)) if mode in ("RGB", "RGBA") else (size[1], size[0])
        image = PIL.Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode if mode != "P" else "L")
        (image.convert("P") if mode == "P" else image).save(root / f"{i}.png")


TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
                patch_size=7)


def save_dinov2(folder, seed=0, processor=True):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**TINY_VIT)).save_pretrained(folder)
    if processor:  # as facebook/dinov2-*: resize, then a center crop, ImageNet statistics
        BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 24, "width": 24},
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return str(folder)


def tiny_unet(num_class_embeds=None, sample_size=8):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds).eval()


class Identity(torch.nn.Module):
    """A feature extractor whose features are the pixels: (B, C, H, W) -> (B, C * H * W)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, images):
        return images.flatten(1)


class RawSamples(DDPMPipeline):
    """A DDPMPipeline that returns the integrated x_0 itself, not clipped to an image range."""

    def output(self, images, output_type, return_dict):
        return images


def cli_error(capsys, argv) -> str:
    """Runs the `hfgen` command in this process; returns its one-line error (exit status 2, no traceback)."""
    from hfgen.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("hfgen: error: "), err
    return err[-1]


def trained_and_untrained_pixel_fd(folder, objective: str) -> tuple[float, float]:
    """FD in pixel space (no feature extractor is trained for the 8x8 digits) of 200 samples, 10 steps, of the
    diffusion folder's denoiser and of the same U-Net freshly initialised, against the 8x8 test digits."""
    from diffusers import UNet2DModel

    from hfgen.data import load_image_dataset
    from hfgen.evaluation import evaluate_pipeline

    digits_test = load_image_dataset("hfgen:digits", "test", resolution=8)
    pipe = DDPMPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    untrained = DDPMPipeline(UNet2DModel.from_config(pipe.unet.config).eval(), pipe.scheduler, objective=objective)

    def fd(pipeline):
        return evaluate_pipeline(pipeline, digits_test, num_samples=200, feature_extractor=Identity(64),
                                 pipeline_kwargs={"num_inference_steps": 10}, likelihood=False)["fd"]

    return fd(pipe), fd(untrained)


PLAIN_DIFFUSERS = """
import json, sys
sys.modules["hfgen"] = None  # `import hfgen` fails in this Python
import numpy as np, torch
from diffusers import DiffusionPipeline
call, output, sources = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
images = []
for source in sources:
    pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
    images.append(pipe(**call, generator=torch.manual_seed(0), output_type="np").images)
assert not [name for name, module in sys.modules.items() if name.split(".")[0] == "hfgen" and module is not None]
np.save(output, np.stack(images))
"""


def plain_diffusers_images(tmp_path, sources, **call) -> np.ndarray:
    """(len(sources), B, H, W, C): the images of `pipe(**call, generator=torch.manual_seed(0))` for each folder or Hub
    repo id in `sources`, loaded with `DiffusionPipeline.from_pretrained(source, trust_remote_code=True)` in a new
    Python where `import hfgen` fails (the Hub settings of the environment are inherited)."""
    output = os.path.join(tmp_path, "plain-diffusers.npy")
    env = {**os.environ, "HF_MODULES_CACHE": os.path.join(tmp_path, "hf-modules")}
    run = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, json.dumps(call), output, *map(str, sources)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(output)


def image_to_image_distances(pipe, dataset, strengths=(0.25, 0.5, 0.75, 1.0), num_images: int = 16) -> list[float]:
    """Mean squared distance between test images and the pipeline's image-to-image outputs from them, per strength
    (the images' own labels for a class-conditional model; 10 sampling steps)."""
    pipe.set_progress_bar_config(disable=True)
    images = torch.stack([dataset[index][0] for index in range(num_images)])
    labels = [int(dataset[index][1]) for index in range(num_images)] if pipe.num_classes else None
    reference = pipe(image=images, strength=0.0, class_labels=labels, output_type="pt").images
    return [float((pipe(image=images, strength=strength, class_labels=labels, num_inference_steps=10,
                        generator=torch.manual_seed(0), output_type="pt").images - reference).square().mean())
            for strength in strengths]
