"""Small CNN classifiers whose penultimate features serve the Fréchet distance and the other sample metrics
(hfgen.features): `DigitClassifier` (the default feature space of digits) and `DomainClassifier` (the same CNN
trained on any labelled dataset's own classes: that dataset's domain feature space)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..utils import check_images, check_positive_int


@dataclass
class ClassifierOutput(BaseOutput):
    """logits: (B, num_classes); features: (B, feature_dim), the ReLU activations before the linear head."""

    logits: torch.Tensor
    # A default lets BaseOutput be rebuilt from a dict, as accelerate does when it casts mixed-precision outputs.
    features: torch.Tensor = None


class DigitClassifier(ModelMixin, ConfigMixin):
    r"""Conv blocks (3x3 conv, ReLU, 2x2 max-pool), then a linear to `feature_dim`, ReLU and a linear head.

    Images are (B, in_channels, sample_size, sample_size) in [0, 1]; square images of another size are resized
    to sample_size first (bilinear, antialiased), as Inception-based FID resizes every image to 299.

    Args:
        sample_size: image height and width (at least 2 ** len(block_out_channels)).
        in_channels: image channels.
        num_classes: number of classes of the head.
        feature_dim: width of the feature layer that `ClassifierOutput.features` returns.
        block_out_channels: output channels of each conv block; each block halves the image size.
        id2label: optional class names, {"0": "zero", ...}.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        feature_dim: int = 128,
        block_out_channels: tuple[int, ...] = (16, 32),
        id2label: dict | None = None,
    ):
        super().__init__()
        for name, value in (("sample_size", sample_size), ("in_channels", in_channels),
                            ("num_classes", num_classes), ("feature_dim", feature_dim)):
            check_positive_int(name, value)
        if not block_out_channels:
            raise ValueError("`block_out_channels` must list at least one block, got an empty list")
        for channels in block_out_channels:
            check_positive_int("block_out_channels", channels)
        if sample_size < 2 ** len(block_out_channels):
            raise ValueError(f"`sample_size` {sample_size} is too small for {len(block_out_channels)} blocks that "
                             f"each halve it; it must be at least {2 ** len(block_out_channels)}")
        if id2label is not None and len(id2label) != num_classes:
            raise ValueError(f"`id2label` must name all {num_classes} classes, got {len(id2label)} names")

        blocks, size = [], sample_size
        for c_in, c_out in zip([in_channels, *block_out_channels[:-1]], block_out_channels):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            size //= 2
        self.conv_blocks = nn.Sequential(*blocks, nn.Flatten())
        self.feature_layer = nn.Sequential(nn.Linear(block_out_channels[-1] * size * size, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.sample_size, self.config.sample_size)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """sample: (B, C, H, W) in [0, 1], H = W -> logits (B, num_classes) and features (B, feature_dim)."""
        size = sample.shape[-1] if isinstance(sample, torch.Tensor) else self.config.sample_size
        check_images("sample", sample, self.config.in_channels, size)
        if size != self.config.sample_size:
            sample = F.interpolate(sample, size=self.config.sample_size, mode="bilinear", antialias=True)
        features = self.feature_layer(self.conv_blocks(sample))
        logits = self.head(features)
        return ClassifierOutput(logits=logits, features=features) if return_dict else (logits, features)


class DomainClassifier(DigitClassifier):
    r"""A `DigitClassifier`'s network trained on the classes of any labelled image dataset, by
    `hfgen.features.train_domain_classifier`: its penultimate features are the dataset's domain feature space.

    Args:
        sample_size, in_channels, num_classes, feature_dim, block_out_channels, id2label: as `DigitClassifier`.
        trained_on: what it was trained on, as plain JSON values: the dataset's name and `fingerprint`, the image
            shape, the number of images, the training recipe, the epochs trained and the training accuracy. Model
            cards of runs evaluated in its features name it from this record.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 2,
        feature_dim: int = 128,
        block_out_channels: tuple[int, ...] = (16, 32, 64),
        id2label: dict | None = None,
        trained_on: dict | None = None,
    ):
        if trained_on is not None and not isinstance(trained_on, dict):
            raise TypeError(f"`trained_on` must be a dict of plain JSON values or None, got "
                            f"{type(trained_on).__name__}")
        super().__init__(sample_size=sample_size, in_channels=in_channels, num_classes=num_classes,
                         feature_dim=feature_dim, block_out_channels=block_out_channels, id2label=id2label)
