"""Decoding and transforming one image, as diffusers' example scripts do: the shorter side is resized to the
resolution, a center or random crop of resolution x resolution is taken, and the image may be flipped
horizontally. The result is a float tensor (C, H, W) in [0, 1] with 1 or 3 channels.

Random choices come from a generator derived from (seed, epoch, sample), never from a global RNG, so a resumed
run, any number of DataLoader workers and any number of processes see the same augmented images.
"""

import io
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

CHANNEL_MODES = {1: "L", 3: "RGB"}
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class CorruptImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def image_name(image: dict | PIL.Image.Image, fallback: str) -> str:
    """The file a row's image came from, for messages: its path, else `fallback` (e.g. "row 12 of column image")."""
    path = image.get("path") if isinstance(image, dict) else getattr(image, "filename", None)
    return path or fallback


def open_image(image: dict | PIL.Image.Image, name: str) -> PIL.Image.Image:
    """A `datasets` image cell ({"bytes", "path"} with decode=False) -> a lazily opened PIL image (header only)."""
    if isinstance(image, PIL.Image.Image):
        return image
    try:
        data = image.get("bytes")
        return PIL.Image.open(io.BytesIO(data) if data is not None else image["path"])
    except Exception as error:
        raise CorruptImageError(f"cannot read image {name}: {error}") from error


def decode_image(image: dict | PIL.Image.Image, name: str) -> PIL.Image.Image:
    """Opens and fully decodes an image; a file that cannot be decoded raises `CorruptImageError` naming it."""
    opened = open_image(image, name)
    try:
        opened.load()
    except Exception as error:
        raise CorruptImageError(f"cannot decode image {name}: {error}") from error
    return opened


def num_channels_of(image: PIL.Image.Image) -> int:
    """1 for grey modes, 3 otherwise (palette and RGBA images become RGB)."""
    return 1 if image.mode in GREY_MODES else 3


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random choices of sample `index` in `epoch`: the same for every worker, process and resumed run."""
    return np.random.default_rng((seed, epoch, index))


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> (C, resolution, resolution) float tensor in [0, 1].

    Args:
        resolution: side of the square output.
        num_channels: 1 (grey) or 3 (RGB); other modes are converted.
        resize: resize the shorter side to `resolution` first (bilinear, antialiased); False crops the image as it
            is, which must then be at least `resolution` on both sides.
        center_crop: take the central crop; otherwise a random one when augmenting (the central one when not).
        random_flip: flip horizontally with probability 1/2 when augmenting.
    """

    resolution: int
    num_channels: int
    resize: bool = True
    center_crop: bool = False
    random_flip: bool = False

    def __post_init__(self):
        if self.num_channels not in CHANNEL_MODES:
            raise ValueError(f"`num_channels` must be 1 or 3, got {self.num_channels!r}")

    @property
    def is_random(self) -> bool:
        """Whether augmenting gives other images than evaluating (a random crop or a flip)."""
        return self.random_flip or not self.center_crop

    def __call__(self, image: PIL.Image.Image, generator: np.random.Generator | None = None,
                 name: str = "image") -> torch.Tensor:
        """`generator` None: the deterministic transform (central crop, no flip), as evaluation uses."""
        mode = CHANNEL_MODES[self.num_channels]
        if image.mode != mode:
            image = image.convert("RGBA" if image.mode == "P" and mode == "RGB" else mode).convert(mode)
        size = self.resolution
        if self.resize:
            width, height = image.size
            scale = size / min(width, height)
            # as torchvision's Resize(int): the shorter side becomes `size`, the longer keeps the aspect ratio
            new_size = (size, max(size, int(height * scale))) if width <= height else (max(size, int(width * scale)), size)
            if new_size != image.size:
                image = image.resize(new_size, resample=PIL.Image.BILINEAR)
        width, height = image.size
        if width < size or height < size:
            raise ValueError(f"image {name} is {width}x{height}, smaller than `resolution` {size}: crop without "
                             "resizing needs images at least that large (drop `--no_resize`, or lower `--resolution`)")
        if generator is None or self.center_crop:
            left, top = round((width - size) / 2), round((height - size) / 2)
        else:
            left, top = int(generator.integers(0, width - size + 1)), int(generator.integers(0, height - size + 1))
        if (left, top, width, height) != (0, 0, size, size):
            image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32).reshape(size, size, self.num_channels)
        pixels = torch.from_numpy(array / 255.0).permute(2, 0, 1)
        if generator is not None and self.random_flip and generator.random() < 0.5:
            pixels = pixels.flip(-1)
        return pixels.contiguous()
