"""GAN objectives (docs/maths.md §4), written on discriminator logits l, with D = sigmoid(l).

log D = -softplus(-l) and log(1 - D) = -softplus(l), so every loss below is exact and stable.
"""

import torch
import torch.nn.functional as F

GAN_LOSSES = ("minimax", "non_saturating", "hinge")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, loss: str = "non_saturating") -> torch.Tensor:
    """The discriminator's objective, to minimise.

    minimax / non_saturating: -E[log D(x)] - E[log(1 - D(G(z)))] (ascent on V(D, G), §4.1);
    hinge: E[relu(1 - l(x))] + E[relu(1 + l(G(z)))].
    """
    if loss not in GAN_LOSSES:
        raise ValueError(f"`loss` must be one of {GAN_LOSSES}, got {loss!r}")
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, loss: str = "non_saturating") -> torch.Tensor:
    """The generator's objective, to minimise.

    minimax: E[log(1 - D(G(z)))], which saturates (vanishing gradient) when D(G(z)) -> 0;
    non_saturating: -E[log D(G(z))] (§4.4); hinge: -E[l(G(z))].
    """
    if loss not in GAN_LOSSES:
        raise ValueError(f"`loss` must be one of {GAN_LOSSES}, got {loss!r}")
    if loss == "minimax":
        return -F.softplus(fake_logits).mean()
    if loss == "non_saturating":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def r1_penalty(real_logits: torch.Tensor, real_samples: torch.Tensor) -> torch.Tensor:
    """R1 = E ||grad_x l(x)||^2 on real data (Mescheder et al., 2018); real_samples must require grad."""
    (gradients,) = torch.autograd.grad(real_logits.sum(), real_samples, create_graph=True)
    return gradients.pow(2).flatten(1).sum(1).mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_adv|| + 1e-4), clamped to [0, max_weight] and detached (Esser
    et al., 2021, eq. 7; docs/maths.md §7.5): the adversarial term's gradient at the decoder's last layer G_L scaled
    to the reconstruction's, so neither drowns the other whatever their scales."""
    (reconstruction_gradient,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (adversarial_gradient,) = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)
    return (reconstruction_gradient.norm() / (adversarial_gradient.norm() + 1e-4)).clamp(0, max_weight).detach()
