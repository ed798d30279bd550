"""GAN generator and discriminator, unconditional or class-conditional (docs/maths.md §4, §5.2, §5.3).

Images are in [-1, 1]. The convolutional ("dcgan") nets double the resolution per layer from a 4x4 or 7x7
start, so they produce sizes 4 * 2^k or 7 * 2^k: 28, 32, 56, 64, ... The "mlp" nets take images or, with
`data_dim`, plain vectors (toy 1-D/2-D data).
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..image_processing import SYMMETRIC
from ..utils import check_choice, check_class_labels, check_non_negative_int, check_positive_int

GAN_ARCHITECTURES = ("dcgan", "mlp")


@dataclass
class GeneratorOutput(BaseOutput):
    """sample: (B, C, H, W) images in [-1, 1], or (B, data_dim) vectors for toy data."""

    sample: torch.Tensor


@dataclass
class DiscriminatorOutput(BaseOutput):
    """logits: (B,) scores; D(x) = sigmoid(logits) is the probability that x is real."""

    logits: torch.Tensor


def dcgan_upsamplings(sample_size: int) -> tuple[int, int]:
    """(start size 4 or 7, number of x2 layers) for a DCGAN image size, or a ValueError naming the sizes."""
    for start in (4, 7):
        size, layers = sample_size, 0
        while size > start and size % 2 == 0:
            size, layers = size // 2, layers + 1
        if size == start and layers >= 1:
            return start, layers
    raise ValueError(
        f"`sample_size` {sample_size} cannot be produced by the dcgan architecture: it makes 4 * 2^k or 7 * 2^k "
        f"pixels (8, 14, 16, 28, 32, 56, 64, ...)"
    )


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. 2016): conv, linear and embedding weights ~ N(0, 0.02), batch-norm
    scales ~ N(1, 0.02), biases 0. For `module.apply`.

    The generator's class embedding is included on purpose: at nn.Embedding's N(0, 1) the class code is as large as
    z ~ N(0, I), and the conditional generator collapses to one image per class within a few hundred steps (docs/maths.md
    §5.2); at N(0, 0.02) the class enters like a one-hot label beside z, as in the conditional DCGAN."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _check_common(architecture, sample_size, channels, latent_dim, num_classes, id2label, data_dim):
    check_choice("architecture", architecture, GAN_ARCHITECTURES)
    check_positive_int("sample_size", sample_size)
    check_positive_int("channels", channels)
    if latent_dim is not None:
        check_positive_int("latent_dim", latent_dim)
    check_non_negative_int("num_classes", num_classes)
    if id2label is not None and len(id2label) != num_classes:
        raise ValueError(f"`id2label` must name all {num_classes} classes, got {len(id2label)} names")
    if data_dim is not None:
        check_positive_int("data_dim", data_dim)
        if architecture != "mlp":
            raise ValueError("`data_dim` (vector data) needs architecture='mlp'")
    if architecture == "dcgan":
        dcgan_upsamplings(sample_size)


class Generator(ModelMixin, ConfigMixin):
    r"""G(z[, y]): a latent z ~ N(0, I) (and a class y) to an image in [-1, 1].

    Args:
        sample_size, channels: image size and channels.
        latent_dim: dimension of z.
        architecture: "dcgan" (transposed convolutions with batch norm) or "mlp".
        base_channels: channels of the last dcgan layer (doubled per layer towards the input), or the mlp width.
        num_classes: > 0 makes G conditional: a learned class embedding is concatenated to z.
        id2label: optional class names.
        data_dim: mlp only: generate (B, data_dim) vectors instead of images (toy data).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        channels: int = 1,
        latent_dim: int = 64,
        architecture: str = "dcgan",
        base_channels: int = 64,
        num_classes: int = 0,
        id2label: dict | None = None,
        data_dim: int | None = None,
    ):
        super().__init__()
        _check_common(architecture, sample_size, channels, latent_dim, num_classes, id2label, data_dim)
        check_positive_int("base_channels", base_channels)
        embed_dim = latent_dim if num_classes else 0
        self.class_embedding = nn.Embedding(num_classes, embed_dim) if num_classes else None
        inputs = latent_dim + embed_dim
        if architecture == "mlp":
            outputs = data_dim or channels * sample_size * sample_size
            width = base_channels * 4
            layers = [nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs)]
            self.net = nn.Sequential(*layers) if data_dim else nn.Sequential(*layers, nn.Tanh())
            return
        start, num_layers = dcgan_upsamplings(sample_size)
        # channels from the projected start to the image, halving per x2 layer: e.g. [256, 128, 64, channels]
        widths = [base_channels * 2 ** (num_layers - i) for i in range(num_layers)] + [channels]
        self.project = nn.Sequential(
            nn.Linear(inputs, widths[0] * start * start, bias=False),
            nn.Unflatten(1, (widths[0], start, start)),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == num_layers - 1
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=last))
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    data_range = SYMMETRIC  # images in [-1, 1]

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.config.latent_dim,)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        config = self.config
        return (config.data_dim,) if config.data_dim else (config.channels, config.sample_size, config.sample_size)

    def decode(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True):
        """latents: (B, latent_dim); class_labels: (B,) for a conditional G -> samples (B, *sample_shape)."""
        if latents.dim() != 2 or latents.shape[1] != self.config.latent_dim:
            raise ValueError(f"`latents` must have shape (B, {self.config.latent_dim}), got {tuple(latents.shape)}")
        labels = check_class_labels(class_labels, self.config.num_classes, latents.shape[0], latents.device)
        inputs = latents if labels is None else torch.cat([latents, self.class_embedding(labels)], dim=1)
        if self.config.architecture == "mlp":
            sample = self.net(inputs).view(-1, *self.sample_shape)
        else:
            sample = self.net(self.project(inputs))
        return GeneratorOutput(sample=sample) if return_dict else (sample,)

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True):
        return self.decode(latents, class_labels, return_dict)


class Discriminator(ModelMixin, ConfigMixin):
    r"""D(x[, y]): a logit for "x is real".

    A conditional D uses the projection discriminator (Miyato & Koyama, 2018): with features phi(x),
    logit = w^T phi(x) + embed(y)^T phi(x), so the class enters as an inner product rather than an extra input.

    Args:
        sample_size, channels, architecture, base_channels, num_classes, id2label, data_dim: as for `Generator`.
        spectral_norm: spectral normalisation of every layer (then no batch norm).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        channels: int = 1,
        architecture: str = "dcgan",
        base_channels: int = 64,
        num_classes: int = 0,
        id2label: dict | None = None,
        data_dim: int | None = None,
        spectral_norm: bool = False,
    ):
        super().__init__()
        _check_common(architecture, sample_size, channels, None, num_classes, id2label, data_dim)
        check_positive_int("base_channels", base_channels)
        norm = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda layer: layer)
        if architecture == "mlp":
            inputs, width = data_dim or channels * sample_size * sample_size, base_channels * 4
            self.features = nn.Sequential(
                nn.Flatten(), norm(nn.Linear(inputs, width)), nn.LeakyReLU(0.2), norm(nn.Linear(width, width)),
                nn.LeakyReLU(0.2),
            )
            num_features = width
        else:
            start, num_layers = dcgan_upsamplings(sample_size)
            # channels from the image to the features, doubling per /2 layer: e.g. [channels, 64, 128]
            widths = [channels] + [base_channels * 2 ** i for i in range(num_layers)]
            layers = []
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
                layers.append(norm(nn.Conv2d(c_in, c_out, 4, 2, 1)))
                if i > 0 and not spectral_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(nn.LeakyReLU(0.2))
            self.features = nn.Sequential(*layers, nn.Flatten())
            num_features = widths[-1] * start * start
        self.score = norm(nn.Linear(num_features, 1))
        if architecture == "dcgan" and not spectral_norm:  # spectral norm rescales every weight itself
            self.apply(dcgan_init)
        self.class_embedding = None
        if num_classes:
            # Glorot-uniform, as the projection discriminator's reference code: nn.Embedding's N(0, 1) would make
            # <embed(y), phi(x)> ~sqrt(num_features) times the unconditional score, so D starts on labels alone
            embedding = nn.Embedding(num_classes, num_features)
            nn.init.xavier_uniform_(embedding.weight)
            self.class_embedding = norm(embedding)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        config = self.config
        return (config.data_dim,) if config.data_dim else (config.channels, config.sample_size, config.sample_size)

    def forward(self, sample: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True):
        """sample: (B, *sample_shape) in [-1, 1]; class_labels: (B,) for a conditional D -> logits (B,)."""
        if not isinstance(sample, torch.Tensor) or tuple(sample.shape[1:]) != self.sample_shape:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"`sample` must have shape (B, {', '.join(map(str, self.sample_shape))}), got {got}")
        if not torch.isfinite(sample).all():
            raise ValueError("`sample` holds non-finite values (nan or inf)")
        labels = check_class_labels(class_labels, self.config.num_classes, sample.shape[0], sample.device)
        features = self.features(sample)
        logits = self.score(features).squeeze(1)
        if labels is not None:  # projection: + <embed(y), phi(x)>
            logits = logits + (self.class_embedding(labels) * features).sum(1)
        return DiscriminatorOutput(logits=logits) if return_dict else (logits,)


class PatchDiscriminator(ModelMixin, ConfigMixin):
    r"""D(x): one logit per overlapping patch of x, for a first stage's adversarial loss (pix2pix's PatchGAN, as
    taming-transformers' NLayerDiscriminator; docs/maths.md §7.5).

    `num_layers` stride-2 4x4 convolutions double the width from `base_channels` (batch norm after the first), then
    a stride-1 one and a 1-channel output: (B, C, S, S) in [-1, 1] -> logits (B, 1, S / 2^L - 2, S / 2^L - 2).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels),
                            ("num_layers", num_layers)):
            check_positive_int(name, value)
        widths = [base_channels * 2 ** min(i, 3) for i in range(num_layers + 1)]  # at most 8x, as taming's
        layers = [nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1, bias=False), nn.BatchNorm2d(widths[i]),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.apply(dcgan_init)

    @staticmethod
    def min_size(num_layers: int) -> int:
        """The smallest image side that leaves at least one patch."""
        return 3 * 2 ** num_layers

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        logits = self.layers(sample)
        return DiscriminatorOutput(logits=logits) if return_dict else (logits,)
