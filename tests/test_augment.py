"""DiffAugment (hfgen.augment): each transformation does what it says, per image, and lets gradients through."""

import pytest
import torch
import torch.nn.functional as F

from hfgen.augment import color, cutout, diff_augment, parse_policy, translation


def shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(C, H, W) moved by dx, dy whole pixels, zeros filling in."""
    padded = F.pad(image, (4, 4, 4, 4))
    height, width = image.shape[1:]
    return padded[:, 4 - dy:4 - dy + height, 4 - dx:4 - dx + width]


def test_translation_moves_each_image_by_whole_pixels_up_to_an_eighth():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    moved = translation(images)
    shifts = []
    for image, out in zip(images, moved):
        matches = [(dx, dy) for dx in range(-4, 5) for dy in range(-4, 5) if torch.equal(shifted(image, dx, dy), out)]
        assert len(matches) == 1, "each output is exactly one integer shift of its input"
        shifts.append(matches[0])
    assert len(set(shifts)) > 4, f"images get their own shifts, got {shifts}"


def test_cutout_zeroes_one_square_of_half_the_side():
    torch.manual_seed(0)
    out = cutout(torch.ones(32, 1, 28, 28))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for image in out[:, 0]:
        rows, columns = (image == 0).nonzero(as_tuple=True)
        assert len(rows) > 0
        height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
        assert len(rows) == height * width, "the zeros form one rectangle"
        assert height <= 14 and width <= 14
    assert (out == 0).flatten(1).sum(1).max() == 14 * 14, "away from the border the square is whole"


def test_color_is_an_affine_map_of_each_image():
    torch.manual_seed(0)
    images = torch.rand(8, 1, 28, 28) * 2 - 1
    out = color(images)
    for image, result in zip(images.flatten(1), out.flatten(1)):
        design = torch.stack([image, torch.ones_like(image)], dim=1)
        solution = torch.linalg.lstsq(design, result.unsqueeze(1)).solution
        assert torch.allclose(design @ solution, result.unsqueeze(1), atol=1e-5)
        assert 0.5 - 1e-4 <= solution[0].item() <= 1.5 + 1e-4, "contrast in [0.5, 1.5]"
    assert not torch.allclose(out, images)


def test_gradients_reach_the_images_through_every_augmentation():
    images = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    diff_augment(images, ("color", "translation", "cutout")).square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_policies_parse_and_unknown_names_are_refused():
    assert parse_policy("--diff_augment", "none") == ()
    assert parse_policy("--diff_augment", "color, cutout") == ("color", "cutout")
    with pytest.raises(ValueError, match=r"`--diff_augment`.*'colour' unknown"):
        parse_policy("--diff_augment", "colour,translation")
