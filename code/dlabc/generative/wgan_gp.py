r"""Wasserstein GANs with a gradient penalty: the critic and its Wasserstein estimate,
the penalty on random interpolates (a double backward), and the same training loop
for the original GAN's losses, so that the two games can be compared step for step.

Chapter: ``book/generative/wgan_gp.md``.

References:
- Arjovsky, Chintala & Bottou (2017), *Wasserstein Generative Adversarial Networks*,
  ICML (the Kantorovich–Rubinstein dual, a critic without a sigmoid, weight clipping).
- Gulrajani, Ahmed, Arjovsky, Dumoulin & Courville (2017), *Improved Training of
  Wasserstein GANs*, NeurIPS (the gradient penalty on interpolates, $\lambda = 10$,
  $n_\text{critic} = 5$, Adam with $\beta = (0, 0.9)$ and no batch norm in the critic).

Conventions: a critic returns one real score per example, ``(B,)``, with no sigmoid;
the networks are those of :mod:`dlabc.generative.gan` (the DCGAN discriminator without
batch norm is the digit critic). ``B`` batch, ``Z`` latent size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.generative import gan

__all__ = [
    "wasserstein_estimate",
    "critic_loss",
    "interpolates",
    "gradient_penalty",
    "train_game",
    "make_digit_wgan",
    "generate_digits",
]

GAMES = ("wgan_gp", "gan")


def wasserstein_estimate(
    real_scores: torch.Tensor, fake_scores: torch.Tensor
) -> torch.Tensor:
    r"""The critic's estimate of the Wasserstein-1 distance,
    $\mathbb E_{x \sim p_\text{data}} f(x) - \mathbb E_{z} f(G(z))$, from scores
    ``(B,)``; a lower bound of the distance for a 1-Lipschitz critic $f$."""
    check_tensor(real_scores, "real_scores", floating=True)
    check_tensor(fake_scores, "fake_scores", floating=True)
    return real_scores.mean() - fake_scores.mean()


def interpolates(
    real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Points $\hat x = \epsilon x + (1 - \epsilon) \tilde x$ on the segments between
    real and generated examples ``(B, ...)``, one $\epsilon \sim \mathcal U[0, 1]$ per
    pair (or the given ``eps`` ``(B,)``)."""
    check_tensor(real, "real", floating=True)
    check_tensor(fake, "fake", floating=True)
    if real.shape != fake.shape:
        raise ValueError(
            f"real and fake must have the same shape, got {tuple(real.shape)} and "
            f"{tuple(fake.shape)}"
        )
    if eps is None:
        eps = torch.rand(len(real), device=real.device, dtype=real.dtype)
    check_tensor(eps, "eps", ndim=1, floating=True)
    if len(eps) != len(real):
        raise ValueError(f"eps must have shape ({len(real)},), got {tuple(eps.shape)}")
    return _interpolates(real, fake, eps)


def _interpolates(real, fake, eps):
    eps = eps.view(-1, *[1] * (real.dim() - 1))  # (B, 1, ..., 1)
    return eps * real + (1 - eps) * fake


def gradient_penalty(critic: nn.Module, x_hat: torch.Tensor) -> torch.Tensor:
    r"""$\mathbb E_{\hat x} (\lVert \nabla_{\hat x} f(\hat x) \rVert_2 - 1)^2$ at the
    points ``x_hat`` ``(B, ...)``; differentiable with respect to the critic's
    parameters (a double backward)."""
    if not isinstance(critic, nn.Module):
        raise TypeError(f"critic must be an nn.Module, got {type(critic).__name__}")
    check_tensor(x_hat, "x_hat", floating=True)
    return _gradient_penalty(critic, x_hat)


def _gradient_penalty(critic, x_hat):
    x_hat = x_hat.detach().requires_grad_(True)
    scores = critic(x_hat)  # (B,)
    # ∇_x̂ f(x̂), kept in the graph (create_graph) so that the penalty can be
    # differentiated again, with respect to the critic's weights
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norm = grad.flatten(1).norm(dim=1)  # (B,)
    return ((norm - 1) ** 2).mean()


def critic_loss(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, lam: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""WGAN-GP's critic loss $\mathbb E f(\tilde x) - \mathbb E f(x) + \lambda\,
    \mathrm{GP}$ on a real and a generated batch, and the Wasserstein estimate (which
    the loss's first two terms are minus of)."""
    if not isinstance(critic, nn.Module):
        raise TypeError(f"critic must be an nn.Module, got {type(critic).__name__}")
    check_number(lam, "lam", low=0)
    x_hat = interpolates(real, fake)
    return _critic_loss(critic, real, fake, x_hat, lam)


def _critic_loss(critic, real, fake, x_hat, lam):
    w = critic(real).mean() - critic(fake).mean()  # the Wasserstein estimate
    return -w + lam * _gradient_penalty(critic, x_hat), w.detach()


def game_step(
    G: nn.Module,
    critic: nn.Module,
    opt_G: torch.optim.Optimizer,
    opt_C: torch.optim.Optimizer,
    sample_real: Callable[[int], torch.Tensor],
    batch_size: int,
    n_critic: int = 5,
    lam: float = 10.0,
    game: str = "wgan_gp",
) -> torch.Tensor:
    """One generator step after ``n_critic`` steps of the critic, each on a fresh real
    and generated batch. ``game="gan"`` plays the original GAN in the same loop (the
    discriminator's cross-entropy and the non-saturating generator loss). Returns the
    last critic step's Wasserstein estimate (for the GAN: its discriminator loss)."""
    for _ in range(n_critic):
        real = sample_real(batch_size)
        z = torch.randn(batch_size, G.z_dim, device=real.device, dtype=real.dtype)
        with torch.no_grad():
            fake = G(z)
        if game == "wgan_gp":
            eps = torch.rand(batch_size, device=real.device, dtype=real.dtype)
            x_hat = _interpolates(real, fake, eps)
            loss_C, w = _critic_loss(critic, real, fake, x_hat, lam)
        else:
            loss_C = gan._discriminator_loss(critic(real), critic(fake))
            w = loss_C.detach()
        opt_C.zero_grad(set_to_none=True)
        loss_C.backward()
        opt_C.step()
    z = torch.randn(batch_size, G.z_dim, device=real.device, dtype=real.dtype)
    scores = critic(G(z))
    # WGAN: G maximises E f(G(z)); GAN: the non-saturating -log D(G(z))
    loss_G = (
        -scores.mean()
        if game == "wgan_gp"
        else gan._generator_loss(scores, "non_saturating")
    )
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    return w


def train_game(
    G: nn.Module,
    critic: nn.Module,
    sample_real: Callable[[int], torch.Tensor],
    steps: int,
    *,
    game: str = "wgan_gp",
    n_critic: int = 5,
    lam: float = 10.0,
    batch_size: int = 64,
    lr: float = 1e-4,
    lr_C: float | None = None,
    betas: tuple[float, float] = (0.0, 0.9),
    callback: Callable[[int], None] | None = None,
    every: int = 100,
) -> list[float]:
    """Train for ``steps`` generator steps of :func:`game_step` with Adam (WGAN-GP's
    ``lr``, ``betas``, ``n_critic`` and ``lam`` by default; ``lr_C``, if given, is the
    critic's own learning rate). ``callback(step)`` runs after every ``every`` steps
    and after the last. Returns the estimate of every step (:func:`game_step`)."""
    for model, name in ((G, "G"), (critic, "critic")):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    if not hasattr(G, "z_dim"):
        raise TypeError("G must have a z_dim attribute (its latent size)")
    if not callable(sample_real):
        raise TypeError("sample_real must be callable: batch_size -> real batch")
    if game not in GAMES:
        raise ValueError(f"game must be one of {GAMES}, got {game!r}")
    for value, name in ((steps, "steps"), (n_critic, "n_critic")):
        check_positive_int(value, name)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(every, "every")
    check_number(lam, "lam", low=0)
    check_number(lr, "lr", low=0, low_open=True)
    lr_C = lr if lr_C is None else check_number(lr_C, "lr_C", low=0, low_open=True)
    opt_G = torch.optim.Adam(G.parameters(), lr=lr, betas=betas)
    opt_C = torch.optim.Adam(critic.parameters(), lr=lr_C, betas=betas)
    G.train()
    critic.train()
    estimates = []
    for step in range(1, steps + 1):
        estimates.append(
            game_step(
                G, critic, opt_G, opt_C, sample_real, batch_size, n_critic, lam, game
            )
        )
        if callback is not None and (step % every == 0 or step == steps):
            callback(step)
    return torch.stack(estimates).tolist()


def make_digit_wgan(z_dim: int = 32) -> tuple[nn.Module, nn.Module]:
    """The chapter's digit generator (the DCGAN's) and critic (the DCGAN
    discriminator without batch norm: the penalty is per example, and batch norm would
    make each score depend on the whole batch)."""
    check_positive_int(z_dim, "z_dim")
    return gan.DCGANGenerator(z_dim, c=16), gan.DCGANDiscriminator(
        c=16, batch_norm=False
    )


#: The chapter's training settings for the digits.
DIGIT_SETTINGS = {"lr": 1e-3, "betas": (0.5, 0.9), "n_critic": 2, "batch_size": 64}


def generate_digits(steps: int, n: int = 1000, seed: int = 0) -> torch.Tensor:
    """Train the chapter's digit WGAN-GP from scratch on ``digits("train")`` for
    ``steps`` generator steps (each after 2 critic steps with the gradient penalty,
    batch 64, Adam with ``lr=1e-3``, ``betas=(0.5, 0.9)``, $\\lambda = 10$), on one CPU
    thread, and return ``n`` samples ``(n, 1, 28, 28)`` float32 in [0, 1].

    One step costs 60 to 90 ms on one thread of the book's CPU (the two critic steps
    with their double backward dominate). No ``options``.
    """
    from dlabc.generative.yardstick import digits

    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        G, critic = make_digit_wgan()
        data = gan.from_pixels(digits("train")[0])
        rng = torch.Generator().manual_seed(seed)

        def sample_real(batch_size: int) -> torch.Tensor:
            return data[torch.randint(len(data), (batch_size,), generator=rng)]

        train_game(G, critic, sample_real, steps, **DIGIT_SETTINGS)
        G.eval()
        with torch.no_grad():
            return gan.to_pixels(G(torch.randn(n, G.z_dim))).float()
    finally:
        torch.set_num_threads(threads)
