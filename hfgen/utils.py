"""Small shared helpers: argument checks that every model, pipeline and trainer uses.

Each check raises a ValueError (or a TypeError for a wrong type) that names the argument, the value it got and
what it accepts. Trainers name flags with their dashes: `check_positive_number("--learning_rate", value)`.
"""

import argparse
import math
import numbers
import os

import torch

CACHE_ENV = "HFGEN_CACHE"  # overrides where hfgen caches what it trains or computes on first use


class CommandParser(argparse.ArgumentParser):
    """argparse, with a bad flag raised as a ValueError: `hfgen.cli.run_command` prints it on one line (argparse
    itself prints the whole usage first). The CLI's commands and the trainers' parsers are CommandParsers."""

    def error(self, message):
        raise ValueError(f"{message} (`{self.prog} -h` lists the flags)")


def hfgen_cache_dir() -> str:
    """Where hfgen caches what it trains or computes on first use (the digit classifier, FD statistics, latents):
    $HFGEN_CACHE, else $HF_HOME/hfgen."""
    from huggingface_hub import constants

    return os.environ.get(CACHE_ENV) or os.path.join(constants.HF_HOME, "hfgen")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_positive_ints(name: str, value) -> None:
    """A non-empty list of positive integers (e.g. a network's widths)."""
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(item) and item > 0 for item in value):
        raise ValueError(f"`{name}` must be a non-empty list of positive integers, got {value!r}")


def check_non_negative_int(name: str, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")


def _check_real(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be {what}, got {value!r}")


def check_positive_number(name: str, value) -> None:
    """A finite number > 0 (inf and nan are refused)."""
    _check_real(name, value, "a finite number > 0")
    if value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")


def check_non_negative_number(name: str, value) -> None:
    _check_real(name, value, "a finite number >= 0")
    if value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")


def check_fraction(name: str, value) -> None:
    """A share strictly between 0 and 1."""
    _check_real(name, value, "a fraction in (0, 1)")
    if not 0 < value < 1:
        raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}")


def check_probability(name: str, value) -> None:
    """A probability in [0, 1)."""
    _check_real(name, value, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}")


def check_unit_interval(name: str, value) -> None:
    """A number in [0, 1], both ends included."""
    _check_real(name, value, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")


def available_devices() -> list[str]:
    """The torch devices this machine has: cpu, then each CUDA GPU (cuda:0, ...), mps and XPUs where present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        devices += [f"xpu:{index}" for index in range(torch.xpu.device_count())]
    return devices


def check_device(name: str, value) -> None:
    """A torch device that exists on this machine ("cuda" means cuda:0)."""
    available = available_devices()
    try:
        device = torch.device(value)
        present = (device.type if device.type in ("cpu", "mps") else f"{device.type}:{device.index or 0}") in available
    except (RuntimeError, TypeError):  # not a device name at all
        present = False
    if not present:
        raise ValueError(f"`{name}` must be a device this machine has, got {value!r}; available here: "
                         f"{', '.join(available)}")


def check_images(name: str, images, channels: int, size: int) -> None:
    """Images must be a finite float tensor of shape (B, channels, size, size)."""
    check_image_shape(name, images, channels, size)
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise ValueError(f"`{name}` holds non-finite values (nan or inf)")


def check_image_shape(name: str, images, channels: int, size: int) -> None:
    """Images must be a tensor of shape (B, channels, size, size)."""
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
