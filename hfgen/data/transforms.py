"""Decoding and transforming one image, as the user sees it and as diffusers' example scripts then prepare it.

Every image that enters hfgen (training and evaluation data, the demo's uploads, `VAEPipeline.encode`) goes
through `to_pixels`, which decides what its pixels are:

- EXIF orientation is applied (a phone photo is upright);
- transparency (RGBA, LA, palette or greyscale images with a transparent index) is composited onto a background
  colour, white by default: the colour stored under a transparent pixel is never seen;
- 16- and 32-bit images are scaled by their type's range (I;16: 65535; I: 65535 for values in 0..65535, as PIL
  holds 16-bit files, else the int32 range; F: [0, 1], other values are an error), never clipped;
- then 8-bit grey ("L") or RGB.

`ImageTransform` then resizes the shorter side to the resolution (`prepare`: uint8 (H, W, C), what the pixel
cache keeps) and takes a center or random crop, maybe flipped (`place`). Random choices come from a generator
derived from (seed, epoch, sample), never from a global RNG, so a resumed run, any number of DataLoader workers
and any number of processes see the same augmented images.
"""

import io
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageColor
import PIL.ImageOps
import torch

CHANNEL_MODES = {1: "L", 3: "RGB"}
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
DEFAULT_BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # width and height swap


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
    """1 for grey modes (with or without alpha, any bit depth), 3 for colour ones (palette, RGB(A), CMYK, ...)."""
    return 1 if image.mode in GREY_MODES else 3


class ImageHeader(NamedTuple):
    """What an image's header says, read without decoding its pixels: its channels and its upright size."""

    num_channels: int
    width: int
    height: int


def read_header(image: PIL.Image.Image) -> ImageHeader:
    """The channels and the size after EXIF orientation of a lazily opened image (no pixels decoded: a PNG's
    orientation is read only when its eXIf chunk precedes the pixels, as writers put it)."""
    width, height = image.size
    if image.format != "PNG" or "exif" in image.info:
        if image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSED_ORIENTATIONS:
            width, height = height, width
    return ImageHeader(num_channels_of(image), width, height)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_GREY_COLOUR_TYPES = (0, 4)  # grey, grey + alpha (2 RGB, 3 palette, 6 RGBA are colour)
PNG_HEADER_BYTES = 4096


def png_header(data: bytes) -> ImageHeader | None:
    """The header of a PNG from its first bytes, parsed directly (a quarter of PIL's cost per file, which counts
    for folders of 64k files); None when PIL must read it: not a PNG, an eXIf chunk (orientation), or chunks
    before the pixels longer than `data`."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    channels = 1 if data[25] in PNG_GREY_COLOUR_TYPES else 3
    position = 33  # after the signature and IHDR
    while position + 8 <= len(data):
        length, kind = int.from_bytes(data[position:position + 4], "big"), data[position + 4:position + 8]
        if kind in (b"IDAT", b"IEND"):
            return ImageHeader(channels, width, height)
        if kind == b"eXIf":
            return None
        position += 12 + length
    return None


def _scaled_to_8_bit(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """A 16- or 32-bit grey image -> "L", scaled by its type's range and rounded (never clipped)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        low, high = 0.0, 1.0
        if values.size and (values.min() < 0 or values.max() > 1):
            raise CorruptImageError(f"image {name} is a 32-bit float image with values in [{values.min():.4g}, "
                                    f"{values.max():.4g}]: hfgen reads float images as [0, 1]; rescale it first")
    elif image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        low, high = -2.0**31, 2.0**31 - 1  # a true 32-bit image
    else:
        low, high = 0.0, 65535.0  # I;16 in any byte order, and 16-bit files that PIL holds as "I"
    return PIL.Image.fromarray(np.rint((values - low) / (high - low) * 255).astype(np.uint8), "L")


def to_pixels(image: PIL.Image.Image, num_channels: int, background_color=DEFAULT_BACKGROUND,
              name: str = "image") -> PIL.Image.Image:
    """A decoded image -> an 8-bit "L" (num_channels 1) or "RGB" (3) image of what the user sees: upright,
    transparency composited onto `background_color` (an RGB triple), high bit depths scaled by their range."""
    mode = CHANNEL_MODES[num_channels]
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in HIGH_DEPTH_MODES:
        image = _scaled_to_8_bit(image, name)
    if image.has_transparency_data:
        flat = PIL.Image.new("RGBA", image.size, tuple(background_color) + (255,))
        image = PIL.Image.alpha_composite(flat, image.convert("RGBA"))
    return image if image.mode == mode else image.convert(mode)


def parse_color(value) -> tuple[int, int, int]:
    """A colour name ("white"), "#rrggbb", "r,g,b" (0-255 each) or an RGB triple -> (r, g, b)."""
    if isinstance(value, str):
        parts = value.split(",")
        if len(parts) == 3 and all(part.strip().isdigit() for part in parts):
            value = tuple(int(part) for part in parts)
        else:
            try:
                return PIL.ImageColor.getrgb(value)[:3]
            except ValueError:
                raise ValueError(f"unknown colour {value!r}") from None
    if len(value) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in value):
        raise ValueError(f"a colour must be three integers in 0..255, got {value!r}")
    return tuple(value)


def check_color(name: str, value) -> None:
    try:
        parse_color(value)
    except (ValueError, TypeError):
        raise ValueError(f'`{name}` must be a colour name, "#rrggbb" or "r,g,b" with values in 0..255, got '
                         f'{value!r}') from None


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random choices of sample `index` in `epoch`: the same for every worker, process and resumed run."""
    return np.random.default_rng((seed, epoch, index))


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float (..., C, H, W) in [0, 1]."""
    pixels = pixels if pixels.flags.writeable else pixels.copy()  # torch warns about read-only arrays
    # a tensor of torch's allocator (aligned as its kernels expect); float32 x / 255 rounds as numpy's does
    return torch.from_numpy(pixels).movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format).div_(255)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> (C, resolution, resolution) float tensor in [0, 1].

    Args:
        resolution: side of the square output.
        num_channels: 1 (grey) or 3 (RGB); other modes are converted by `to_pixels`.
        resize: resize the shorter side to `resolution` first (bilinear, antialiased); False crops the image as it
            is, which must then be at least `resolution` on both sides.
        center_crop: take the central crop; otherwise a random one when augmenting (the central one when not).
        random_flip: flip horizontally with probability 1/2 when augmenting.
        background_color: the RGB colour transparent pixels are composited onto.
    """

    resolution: int
    num_channels: int
    resize: bool = True
    center_crop: bool = False
    random_flip: bool = False
    background_color: tuple[int, int, int] = DEFAULT_BACKGROUND

    def __post_init__(self):
        if self.num_channels not in CHANNEL_MODES:
            raise ValueError(f"`num_channels` must be 1 or 3, got {self.num_channels!r}")

    @property
    def is_random(self) -> bool:
        """Whether augmenting gives other images than evaluating (a random crop or a flip)."""
        return self.random_flip or not self.center_crop

    @property
    def prepared_key(self) -> str:
        """What decides `prepare`'s output for a given file (the pixel cache's key)."""
        return f"{self.resolution}|{self.num_channels}|{self.resize}|{tuple(self.background_color)}"

    def prepared_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of `prepare`'s output for an upright image of that size."""
        size = self.resolution
        if not self.resize:
            return width, height
        scale = size / min(width, height)
        # as torchvision's Resize(int): the shorter side becomes `size`, the longer keeps the aspect ratio
        return (size, max(size, int(height * scale))) if width <= height else (max(size, int(width * scale)), size)

    def prepare(self, image: PIL.Image.Image, name: str = "image") -> np.ndarray:
        """The deterministic part: a decoded image -> uint8 (H, W, C), the shorter side resized to `resolution`."""
        image = to_pixels(image, self.num_channels, self.background_color, name)
        new_size = self.prepared_size(*image.size)
        if new_size != image.size:
            image = image.resize(new_size, resample=PIL.Image.BILINEAR)
        width, height = image.size
        if width < self.resolution or height < self.resolution:
            raise ValueError(f"image {name} is {width}x{height}, smaller than `resolution` {self.resolution}: crop "
                             "without resizing needs images at least that large (drop `--no_resize`, or lower "
                             "`--resolution`)")
        return np.asarray(image, dtype=np.uint8).reshape(height, width, self.num_channels)

    def place(self, pixels: np.ndarray, generator: np.random.Generator | None = None) -> np.ndarray:
        """The random part: uint8 (H, W, C) -> its (resolution, resolution, C) crop, maybe flipped. `generator`
        None: the deterministic crop (central, no flip), as evaluation uses."""
        size = self.resolution
        height, width = pixels.shape[:2]
        if generator is None or self.center_crop:
            left, top = round((width - size) / 2), round((height - size) / 2)
        else:
            left, top = int(generator.integers(0, width - size + 1)), int(generator.integers(0, height - size + 1))
        pixels = pixels[top:top + size, left:left + size]
        if generator is not None and self.random_flip and generator.random() < 0.5:
            pixels = pixels[:, ::-1]
        return pixels

    def __call__(self, image: PIL.Image.Image, generator: np.random.Generator | None = None,
                 name: str = "image") -> torch.Tensor:
        """`generator` None: the deterministic transform (central crop, no flip), as evaluation uses."""
        return pixels_to_tensor(self.place(self.prepare(image, name), generator))
