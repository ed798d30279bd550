"""A perceptual distance from a feature network that exists offline (docs/maths.md §7.5): hfgen's digit classifier or
a domain classifier (`--feature_extractor classifier`), in the form of LPIPS without its learned layer weights
(Zhang et al., 2018)."""

import torch
import torch.nn.functional as F
from torch import nn

from .models import DigitClassifier


class PerceptualDistance(nn.Module):
    """d(x, y) = sum_l mean_{h,w} || f_l(x) / ||f_l(x)|| - f_l(y) / ||f_l(y)|| ||^2, f_l the output of the l-th conv
    block of a frozen classifier, each normalised to unit length over its channels at every position: (B, C, S, S)
    images in [0, 1] -> (B,) distances. Images are resized to the classifier's size first, as its forward does."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        # the end of each conv block: after its pooling
        self.taps = [i for i, layer in enumerate(classifier.conv_blocks) if isinstance(layer, nn.MaxPool2d)]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = self.classifier.config.sample_size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        features, hidden = [], images
        for i, layer in enumerate(self.classifier.conv_blocks[:self.taps[-1] + 1]):
            hidden = layer(hidden)
            if i in self.taps:
                features.append(F.normalize(hidden, dim=1, eps=1e-8))
        return features

    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        self.classifier.eval()  # frozen: never in training mode, whatever mode the module around it is in
        return sum((a - b).pow(2).sum(1).mean((1, 2))
                   for a, b in zip(self.features(images), self.features(reference)))
