"""Tests for ``dlabc.generative.wgan_gp``.

The Wasserstein estimate against the closed-form distance of two shifted
distributions; the interpolates against their endpoints; the gradient penalty against
the closed form for a linear critic; its double backward (the penalty's gradient with
respect to the critic's parameters) against ``torch.autograd.gradcheck``'s finite
differences in float64; the critic loss against its terms; the training loop and
``generate_digits``' contract.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dlabc.generative import gan, wgan_gp


def test_wasserstein_estimate_of_a_shift_with_the_identity_critic():
    # W1 between p and p shifted by 0.7 is 0.7, and f(x) = x attains the supremum
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    estimate = wgan_gp.wasserstein_estimate(x + 0.7, x)
    assert torch.allclose(estimate, torch.tensor(0.7, dtype=torch.float64))


def test_interpolates_lie_on_the_segments():
    real, fake = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    eps = torch.tensor([0.0, 1.0, 0.25, 0.5])
    x_hat = wgan_gp.interpolates(real, fake, eps)
    assert torch.equal(x_hat[0], fake[0]) and torch.equal(x_hat[1], real[1])
    assert torch.allclose(x_hat[2], 0.25 * real[2] + 0.75 * fake[2])
    random = wgan_gp.interpolates(real, fake)
    assert random.shape == real.shape


def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    critic = nn.Linear(5, 1).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    w = critic.weight.detach().flatten()
    expected = (w.norm() - 1) ** 2
    penalty = wgan_gp.gradient_penalty(lambda_module(critic), x)
    assert torch.allclose(penalty, expected, atol=1e-12)


def lambda_module(linear):
    class Squeeze(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x).squeeze(1)

    return Squeeze()


def test_double_backward_against_finite_differences():
    torch.manual_seed(0)
    critic = gan.MLPDiscriminator(shape=(3,), hidden=4, depth=1).double()
    x_hat = torch.randn(5, 3, dtype=torch.float64)
    names = [n for n, _ in critic.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in critic.parameters())

    def penalty(*values):
        return torch.func.functional_call(
            critic, dict(zip(names, values, strict=True)), (x_hat,)
        )

    def gp(*values):
        x = x_hat.clone().requires_grad_()
        scores = functional_call(critic, dict(zip(names, values, strict=True)), (x,))
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        return ((grad.norm(dim=1) - 1) ** 2).mean()

    assert penalty(*params).shape == (5,)
    assert torch.autograd.gradcheck(gp, params, eps=1e-6, atol=1e-6)
    # the module's penalty has the same value and the same parameter gradient
    ours = wgan_gp.gradient_penalty(critic, x_hat)
    ours_grads = torch.autograd.grad(
        ours, list(critic.parameters()), materialize_grads=True
    )
    ref = gp(*params)
    ref_grads = torch.autograd.grad(ref, params, materialize_grads=True)
    assert torch.allclose(ours, ref, atol=1e-12)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_critic_loss_is_its_terms():
    torch.manual_seed(1)
    critic = gan.MLPDiscriminator(shape=(2,), hidden=8).double()
    real, fake = torch.randn(6, 2).double(), torch.randn(6, 2).double()
    torch.manual_seed(3)
    loss, w = wgan_gp.critic_loss(critic, real, fake, lam=10.0)
    torch.manual_seed(3)
    x_hat = wgan_gp.interpolates(real, fake)
    w_ref = critic(real).mean() - critic(fake).mean()
    expected = -w_ref + 10.0 * wgan_gp.gradient_penalty(critic, x_hat)
    assert torch.allclose(loss, expected, atol=1e-12)
    assert torch.allclose(w, w_ref.detach(), atol=1e-12)


@pytest.mark.parametrize("game", wgan_gp.GAMES)
def test_train_game_runs(game):
    torch.manual_seed(0)
    G = gan.MLPGenerator(2, 8, shape=(2,), tanh=False)
    critic = gan.MLPDiscriminator(shape=(2,), hidden=8)
    seen = []
    estimates = wgan_gp.train_game(
        G,
        critic,
        lambda b: gan.sample_ring(b),
        3,
        game=game,
        n_critic=2,
        batch_size=8,
        callback=seen.append,
        every=2,
    )
    assert len(estimates) == 3 and seen == [2, 3]


def test_the_digit_critic_has_no_batch_norm():
    G, critic = wgan_gp.make_digit_wgan()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())
    assert critic(G(torch.randn(2, G.z_dim))).shape == (2,)


def test_generate_digits_contract():
    x = wgan_gp.generate_digits(1, n=4, seed=2)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1


def test_bad_inputs():
    x = torch.zeros(3)
    critic = gan.MLPDiscriminator(shape=(2,), hidden=4)
    with pytest.raises(TypeError, match="real_scores"):
        wgan_gp.wasserstein_estimate([1.0], x)
    with pytest.raises(ValueError, match="same shape"):
        wgan_gp.interpolates(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="eps"):
        wgan_gp.interpolates(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(TypeError, match="critic"):
        wgan_gp.gradient_penalty(lambda t: t, torch.zeros(2, 2))
    with pytest.raises(TypeError, match="x_hat"):
        wgan_gp.gradient_penalty(critic, [[0.0, 0.0]])
    with pytest.raises(ValueError, match="lam"):
        wgan_gp.critic_loss(critic, torch.zeros(2, 2), torch.zeros(2, 2), lam=-1.0)
    G = gan.MLPGenerator(2, 4, shape=(2,), tanh=False)
    with pytest.raises(ValueError, match="game"):
        wgan_gp.train_game(G, critic, gan.sample_ring, 1, game="hinge")
    with pytest.raises(ValueError, match="n_critic"):
        wgan_gp.train_game(G, critic, gan.sample_ring, 1, n_critic=0)
    with pytest.raises(ValueError, match="lr_C"):
        wgan_gp.train_game(G, critic, gan.sample_ring, 1, lr_C=0.0)
    with pytest.raises(TypeError, match="z_dim"):
        wgan_gp.train_game(critic, critic, gan.sample_ring, 1)
    with pytest.raises(ValueError, match="seed"):
        wgan_gp.generate_digits(1, seed=-2)
    with pytest.raises(ValueError, match="n must be positive"):
        wgan_gp.generate_digits(1, n=0)
