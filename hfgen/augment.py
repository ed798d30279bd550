"""Differentiable augmentation of a GAN discriminator's inputs (DiffAugment, Zhao et al. 2020; docs/maths.md §4.7).

On a small dataset the discriminator memorises the real images and its gradients stop guiding the generator.
DiffAugment applies the same random, differentiable transformations to real and generated images wherever the
discriminator sees them (its step and the generator's), so D never sees an unaugmented image and the generator
is not pushed to produce augmented ones. Images are (B, C, H, W) in [-1, 1]; each image gets its own draw.
"""

import torch
import torch.nn.functional as F

DIFF_AUGMENTATIONS = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # shifts of up to 1/8 of the side, as in the paper
CUTOUT_RATIO = 0.5  # a square of half the side is zeroed


def parse_policy(name: str, policy: str) -> tuple[str, ...]:
    """"color,translation" -> ("color", "translation"); "none" or "" -> (); unknown names raise."""
    if policy in ("", "none"):
        return ()
    parts = tuple(part.strip() for part in policy.split(","))
    unknown = [part for part in parts if part not in DIFF_AUGMENTATIONS]
    if unknown:
        raise ValueError(f"`{name}` must be 'none' or a comma-separated list of {', '.join(DIFF_AUGMENTATIONS)}; "
                         f"got {policy!r} ({', '.join(map(repr, unknown))} unknown)")
    return parts


def diff_augment(images: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """The augmentations of `policy`, in that order, each drawn per image from torch's global generator."""
    for name in policy:
        images = AUGMENTATIONS[name](images)
    return images


def _uniform(images: torch.Tensor, *shape) -> torch.Tensor:
    return torch.rand(images.shape[0], *shape, device=images.device, dtype=images.dtype)


def color(images: torch.Tensor) -> torch.Tensor:
    """Brightness (+U(-0.5, 0.5)), saturation (x U(0, 2) around the pixel's channel mean; nothing for one
    channel) and contrast (x U(0.5, 1.5) around the image mean)."""
    images = images + (_uniform(images, 1, 1, 1) - 0.5)
    if images.shape[1] > 1:
        mean = images.mean(dim=1, keepdim=True)
        images = (images - mean) * (_uniform(images, 1, 1, 1) * 2) + mean
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (_uniform(images, 1, 1, 1) + 0.5) + mean


def translation(images: torch.Tensor) -> torch.Tensor:
    """A shift by whole pixels, up to TRANSLATION_RATIO of each side, with zeros filling in."""
    batch, _, height, width = images.shape
    max_shift = torch.tensor([width, height], device=images.device) * TRANSLATION_RATIO
    shift = torch.round((_uniform(images, 2) * 2 - 1) * max_shift.round())  # (B, 2) pixels, x then y
    # a grid_sample with nearest pixels: integer shifts of the pixel centres are exact
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * shift[:, 0] / width
    theta[:, 1, 2] = -2 * shift[:, 1] / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def cutout(images: torch.Tensor) -> torch.Tensor:
    """Zeroes a square of CUTOUT_RATIO of the side, centred anywhere in the image (clipped at the border)."""
    _, _, height, width = images.shape
    size_y, size_x = int(height * CUTOUT_RATIO + 0.5), int(width * CUTOUT_RATIO + 0.5)
    centre_y = (_uniform(images) * height).floor().view(-1, 1, 1)
    centre_x = (_uniform(images) * width).floor().view(-1, 1, 1)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    columns = torch.arange(width, device=images.device).view(1, 1, -1)
    inside = ((rows >= centre_y - size_y // 2) & (rows < centre_y + size_y - size_y // 2)
              & (columns >= centre_x - size_x // 2) & (columns < centre_x + size_x - size_x // 2))
    return images * (~inside).unsqueeze(1).to(images.dtype)


AUGMENTATIONS = {"color": color, "translation": translation, "cutout": cutout}
