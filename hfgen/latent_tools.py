"""Walks through a latent space (seed notes §2.5): interpolation and traversal of one dimension."""

import torch

INTERPOLATIONS = ("linear", "spherical")


def interpolate(start: torch.Tensor, end: torch.Tensor, num_steps: int, method: str = "linear") -> torch.Tensor:
    """Points from `start` to `end` (both (D,) or (1, D)), endpoints included: (num_steps, D).

    "spherical" (slerp) keeps the norm typical of Gaussian samples, which linear paths shrink mid-way.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"`method` must be one of {INTERPOLATIONS}, got {method!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"`num_steps` must be an integer >= 2, got {num_steps!r}")
    start, end = start.reshape(1, -1), end.reshape(1, -1)
    if start.shape != end.shape:
        raise ValueError(f"`start` and `end` must have the same size, got {start.shape[1]} and {end.shape[1]}")
    t = torch.linspace(0, 1, num_steps, device=start.device, dtype=start.dtype).unsqueeze(1)
    if method == "linear":
        return (1 - t) * start + t * end
    cos_angle = torch.nn.functional.cosine_similarity(start, end).clamp(-1, 1)
    angle = torch.acos(cos_angle)
    if angle.abs() < 1e-4:  # (nearly) parallel: slerp reduces to lerp
        return (1 - t) * start + t * end
    return (torch.sin((1 - t) * angle) * start + torch.sin(t * angle) * end) / torch.sin(angle)


def traverse(latent: torch.Tensor, dim: int, values: torch.Tensor) -> torch.Tensor:
    """Copies of `latent` ((D,) or (1, D)) with coordinate `dim` set to each of `values`: (len(values), D)."""
    latent = latent.reshape(1, -1)
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < latent.shape[1]:
        raise ValueError(f"`dim` must be an integer in [0, {latent.shape[1] - 1}], got {dim!r}")
    values = torch.as_tensor(values, dtype=latent.dtype, device=latent.device).reshape(-1)
    points = latent.repeat(len(values), 1)
    points[:, dim] = values
    return points
