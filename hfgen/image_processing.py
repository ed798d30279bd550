"""The one place where images cross the boundary between model tensors and user formats.

Model tensors are NCHW floats in a family's data range: [0, 1] for VAEs (Bernoulli pixels), [-1, 1]
for GANs and diffusion. Users get "pt" (NCHW in [0, 1]), "np" (NHWC in [0, 1]) or "pil" images.
"""

import math

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import numpy_to_pil
from diffusers.utils import make_image_grid

from .data.transforms import to_pixels

UNIT, SYMMETRIC = "unit", "symmetric"  # the two data ranges: [0, 1] (Bernoulli VAEs) and [-1, 1] (GANs, diffusion)
DATA_RANGES = {UNIT: (0.0, 1.0), SYMMETRIC: (-1.0, 1.0)}
OUTPUT_TYPES = ("pil", "np", "pt")


def to_unit_range(images: torch.Tensor, data_range: str) -> torch.Tensor:
    """Maps model tensors to [0, 1]; values outside the data range are clipped as pixels must be."""
    if data_range == SYMMETRIC:
        images = (images + 1) / 2
    return images.clamp(0, 1)


def from_unit_range(images: torch.Tensor, data_range: str) -> torch.Tensor:
    """Maps [0, 1] data to the model's range."""
    return images * 2 - 1 if data_range == SYMMETRIC else images


def postprocess(images: torch.Tensor, output_type: str = "pil", data_range: str = UNIT):
    """(B, C, H, W) model tensor -> list of PIL images, (B, H, W, C) numpy array or (B, C, H, W) tensor."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
    images = to_unit_range(images.detach().float(), data_range)
    if output_type == "pt":
        return images.cpu()
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else numpy_to_pil(array)


def preprocess(images, channels: int, size: int, data_range: str = UNIT, name: str = "images") -> torch.Tensor:
    """User images -> (B, C, H, W) float tensor in the model's range, checked against the model's shape.

    Accepts a PIL image or list of them, a numpy array (H, W[, C]) or (B, H, W, C) in [0, 1], or a tensor
    (C, H, W) or (B, C, H, W) in [0, 1]. PIL images are read as training images are (`hfgen.data.to_pixels`:
    EXIF orientation, transparency composited onto white, high bit depths scaled). Nothing is resized: a wrong
    size is an error.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
        images = np.stack([np.asarray(to_pixels(image, channels, name=name), dtype=np.float32) / 255.0
                           for image in images])
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32)
        if array.ndim == 2:
            array = array[None, :, :, None]
        elif array.ndim == 3:  # one (H, W, C) image, or a batch (B, H, W) of one-channel images
            array = array[None] if array.shape[-1] == channels else array[..., None]
        images = torch.from_numpy(array).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`{name}` must be PIL images, a numpy array or a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(f"`{name}` must be images of {channels} channel(s) and {size}x{size} pixels, got shape {tuple(images.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"`{name}` must hold values in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]")
    return from_unit_range(images.float(), data_range)


def image_grid(images: list[PIL.Image.Image], columns: int | None = None) -> PIL.Image.Image:
    """Tiles PIL images in a grid (square by default); empty cells stay black."""
    if not images:
        raise ValueError("`images` is empty: nothing to tile")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blanks = [PIL.Image.new(images[0].mode, images[0].size)] * (rows * columns - len(images))
    return make_image_grid(list(images) + blanks, rows=rows, cols=columns)
