"""The GAN objectives against the claims of docs/maths.md §4 and their closed forms."""

import math

import pytest
import torch

from hfgen import Discriminator, Generator
from hfgen.losses import GAN_LOSSES, discriminator_loss, generator_loss, r1_penalty


def normal_density(x, mean):
    return torch.exp(-0.5 * (x - mean) ** 2) / math.sqrt(2 * math.pi)


def test_trained_discriminator_approximates_the_optimal_discriminator():
    """§4.2: for a fixed G, the best D is D*(x) = p_data(x) / (p_data(x) + p_G(x))."""
    torch.manual_seed(0)
    discriminator = Discriminator(architecture="mlp", data_dim=1, base_channels=8)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=3e-3)
    for _ in range(600):
        real = torch.randn(512, 1)  # p_data = N(0, 1)
        fake = torch.randn(512, 1) + 1.5  # the fixed generator's p_G = N(1.5, 1)
        loss = discriminator_loss(discriminator(real).logits, discriminator(fake).logits, "minimax")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    grid = torch.linspace(-1.5, 3.0, 46).unsqueeze(1)
    with torch.no_grad():
        learned = torch.sigmoid(discriminator(grid).logits)
    p_data, p_g = normal_density(grid[:, 0], 0.0), normal_density(grid[:, 0], 1.5)
    optimal = p_data / (p_data + p_g)
    assert (learned - optimal).abs().max() < 0.08, (learned - optimal).abs().max()
    # and the value of the game at D* is 2 JS(p_data || p_G) - log 4 < 0 (here about -0.35 + ...)
    assert loss.item() < math.log(4)


def saturated_setup():
    """A generator whose samples the discriminator confidently rejects: D(G(z)) ~ 1e-4."""
    torch.manual_seed(0)
    generator = Generator(architecture="mlp", data_dim=2, latent_dim=4, base_channels=8)
    discriminator = Discriminator(architecture="mlp", data_dim=2, base_channels=8)
    with torch.no_grad():
        discriminator.score.bias.fill_(-9.0)
        discriminator.score.weight.mul_(0.01)
    return generator, discriminator


def test_non_saturating_gradient_is_orders_of_magnitude_larger_when_d_wins():
    """§4.4: dloss/dlogit is -sigmoid(l) ~ -1e-4 for minimax (vanishing) but -sigmoid(-l) ~ -1 for non-saturating."""
    norms = {}
    for loss in ("minimax", "non_saturating"):
        generator, discriminator = saturated_setup()
        fake_logits = discriminator(generator(torch.randn(256, 4)).sample).logits
        assert torch.sigmoid(fake_logits).max() < 1e-3
        generator_loss(fake_logits, loss).backward()
        norms[loss] = torch.cat([p.grad.flatten() for p in generator.parameters()]).norm().item()
    assert norms["non_saturating"] > 1000 * norms["minimax"]


def test_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    expected = -(torch.log(d_real).mean() + torch.log(1 - d_fake).mean())
    for loss in ("minimax", "non_saturating"):
        torch.testing.assert_close(discriminator_loss(real, fake, loss), expected)
    torch.testing.assert_close(generator_loss(fake, "minimax"), torch.log(1 - d_fake).mean())
    torch.testing.assert_close(generator_loss(fake, "non_saturating"), -torch.log(d_fake).mean())
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"), torch.tensor((0.0 + 2.0) / 2 + (1.5 + 0.0) / 2))
    torch.testing.assert_close(generator_loss(fake, "hinge"), torch.tensor(1.25))


def test_r1_penalty_of_a_linear_discriminator_is_the_squared_weight_norm():
    weight = torch.tensor([3.0, -4.0])
    x = torch.randn(5, 2, requires_grad=True)
    torch.testing.assert_close(r1_penalty(x @ weight, x), torch.tensor(25.0))


def test_unknown_loss_names_are_refused():
    for function, args in ((discriminator_loss, (torch.zeros(1), torch.zeros(1))), (generator_loss, (torch.zeros(1),))):
        with pytest.raises(ValueError, match="`loss` must be one of"):
            function(*args, loss="wasserstein")
    assert set(GAN_LOSSES) == {"minimax", "non_saturating", "hinge"}
