"""Small shared helpers: argument checks that every model and pipeline uses."""

import torch


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_images(name: str, images, channels: int, size: int) -> None:
    """Images must be a float tensor of shape (B, channels, size, size)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (B, {channels}, {size}, {size}), got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"`{name}` must have shape (B, {channels}, {size}, {size}) (batch, channels, height, width), "
            f"got {tuple(images.shape)}"
        )


def check_class_labels(class_labels, num_classes: int, batch_size: int, device=None) -> torch.Tensor | None:
    """Checks labels against a model's `num_classes` (0: unconditional) and returns them as a long tensor."""
    if num_classes == 0:
        if class_labels is not None:
            raise ValueError("`class_labels` were given, but this model is unconditional (num_classes=0)")
        return None
    if class_labels is None:
        raise ValueError(f"`class_labels` are required: this model is conditional on {num_classes} classes")
    labels = torch.as_tensor(class_labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"`class_labels` must be integers, got dtype {labels.dtype}")
    labels = labels.long().reshape(-1)
    if labels.numel() != batch_size:
        raise ValueError(f"`class_labels` must hold one label per example ({batch_size}), got {labels.numel()}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"`class_labels` must lie in [0, {num_classes - 1}], got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.to(device) if device is not None else labels
