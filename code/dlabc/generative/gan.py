r"""Generative adversarial networks: the minimax game and its non-saturating loss, the
optimal discriminator, an MLP GAN and a DCGAN on the part's digits, and mode collapse
counted on a ring of Gaussians.

Chapter: ``book/generative/gan.md``.

References:
- Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville & Bengio (2014),
  *Generative Adversarial Nets*, NeurIPS (the game, the optimal discriminator
  $D^* = p_\text{data} / (p_\text{data} + p_g)$, the non-saturating generator loss).
- Radford, Metz & Chintala (2016), *Unsupervised Representation Learning with Deep
  Convolutional Generative Adversarial Networks*, ICLR (DCGAN: strided convolutions,
  batch norm, ReLU in the generator and leaky ReLU in the discriminator, Adam with
  $\beta_1 = 0.5$).
- Metz, Poole, Pfau & Sohl-Dickstein (2017), *Unrolled Generative Adversarial
  Networks*, ICLR, and Srivastava, Valkov, Russell, Gutmann & Sutton (2017), *VEEGAN*,
  NeurIPS (the ring of Gaussians, modes covered and high-quality samples).

Conventions: a discriminator returns *logits* $\ell$, one per example, with
$D(x) = \sigma(\ell(x))$, so every loss is written with ``softplus``
($-\log \sigma(\ell) = \operatorname{softplus}(-\ell)$ and
$-\log(1 - \sigma(\ell)) = \operatorname{softplus}(\ell)$), which never takes the log
of a rounded 0. Generated digits live in $[-1, 1]$ (``tanh``), as in DCGAN; the part's
digits are in $[0, 1]$, so :func:`to_pixels` and :func:`from_pixels` convert. Shapes:
``B`` batch, ``Z`` latent size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "discriminator_loss",
    "generator_loss",
    "optimal_discriminator",
    "MLPGenerator",
    "MLPDiscriminator",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "from_pixels",
    "to_pixels",
    "train_gan",
    "ring_centres",
    "sample_ring",
    "mode_coverage",
    "make_digit_gan",
    "generate_digits",
]

LOSSES = ("non_saturating", "minimax")


# ---------------------------------------------------------------- the game's losses


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor
) -> torch.Tensor:
    r"""The discriminator's loss: the negative of the game's value,
    $-\mathbb E_x \log D(x) - \mathbb E_z \log(1 - D(G(z)))$, from logits ``(B,)``.

    It is the binary cross-entropy with label 1 for real and 0 for generated examples.
    """
    check_tensor(real_logits, "real_logits", floating=True)
    check_tensor(fake_logits, "fake_logits", floating=True)
    return _discriminator_loss(real_logits, fake_logits)


def _discriminator_loss(real_logits, fake_logits):
    # -log D(x) = softplus(-l),  -log(1 - D(G(z))) = softplus(l)
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(
    fake_logits: torch.Tensor, kind: str = "non_saturating"
) -> torch.Tensor:
    r"""The generator's loss on the logits ``(B,)`` of its samples.

    ``"minimax"``: $\mathbb E_z \log(1 - D(G(z)))$, the game's own term, to minimise;
    ``"non_saturating"``: $-\mathbb E_z \log D(G(z))$, the one GANs are trained with.
    """
    check_tensor(fake_logits, "fake_logits", floating=True)
    if kind not in LOSSES:
        raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")
    return _generator_loss(fake_logits, kind)


def _generator_loss(fake_logits, kind):
    if kind == "minimax":
        return -F.softplus(fake_logits).mean()  # log(1 - D) = -softplus(l)
    return F.softplus(-fake_logits).mean()  # -log D = softplus(-l)


def optimal_discriminator(p_data: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    r"""The best discriminator against a fixed generator,
    $D^*(x) = p_\text{data}(x) / (p_\text{data}(x) + p_g(x))$, from the two densities
    at the same points (where both are 0 it returns 1/2)."""
    check_tensor(p_data, "p_data", floating=True)
    check_tensor(p_g, "p_g", floating=True)
    if p_data.shape != p_g.shape:
        raise ValueError(
            f"p_data and p_g must have the same shape, got {tuple(p_data.shape)} "
            f"and {tuple(p_g.shape)}"
        )
    total = p_data + p_g
    return torch.where(total > 0, p_data / total.clamp(min=1e-300), 0.5)


# ---------------------------------------------------------------- the networks


class MLPGenerator(nn.Module):
    """The original GAN's generator: noise ``(B, Z)`` through ReLU layers to an example
    ``(B, *shape)``; ``tanh`` at the end for images in [-1, 1], nothing for points."""

    def __init__(
        self,
        z_dim: int = 32,
        hidden: int = 256,
        shape: tuple[int, ...] = (1, 28, 28),
        depth: int = 2,
        tanh: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("z_dim", z_dim), ("hidden", hidden), ("depth", depth)):
            check_positive_int(value, name)
        if not shape or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
        ):
            raise ValueError(f"shape must be a tuple of positive ints, got {shape!r}")
        self.z_dim, self.shape = z_dim, tuple(shape)
        layers, width = [], z_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, math.prod(shape)))
        if tanh:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(len(z), *self.shape)  # (B, Z) -> (B, *shape)


class MLPDiscriminator(nn.Module):
    """An example ``(B, *shape)`` through leaky-ReLU layers to one logit ``(B,)``."""

    def __init__(
        self, shape: tuple[int, ...] = (1, 28, 28), hidden: int = 256, depth: int = 2
    ) -> None:
        super().__init__()
        check_positive_int(hidden, "hidden")
        check_positive_int(depth, "depth")
        if not shape or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
        ):
            raise ValueError(f"shape must be a tuple of positive ints, got {shape!r}")
        layers, width = [nn.Flatten()], math.prod(shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # (B, *shape) -> (B,)


class DCGANGenerator(nn.Module):
    """DCGAN's generator at digit size: a linear layer makes a ``2c × 7 × 7`` map, two
    transposed convolutions (kernel 4, stride 2) double its side twice, to ``1 × 28 ×
    28``; batch norm and ReLU between, ``tanh`` at the end."""

    def __init__(self, z_dim: int = 32, c: int = 16) -> None:
        super().__init__()
        check_positive_int(z_dim, "z_dim")
        check_positive_int(c, "c")
        self.z_dim = z_dim
        self.net = nn.Sequential(
            nn.Linear(z_dim, 2 * c * 7 * 7, bias=False),
            nn.Unflatten(1, (2 * c, 7, 7)),  # (B, 2c, 7, 7)
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c),  # (B, c, 14, 14)
            nn.ReLU(),
            nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1),  # (B, 1, 28, 28)
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class DCGANDiscriminator(nn.Module):
    """DCGAN's discriminator at digit size: two strided convolutions (kernel 4, stride
    2) halve the side twice, ``28 → 14 → 7``, with leaky ReLU (slope 0.2) and batch norm
    on the second; a linear layer reads one logit ``(B,)``. ``batch_norm=False`` leaves
    the norm out (the WGAN-GP critic needs that)."""

    def __init__(self, c: int = 16, batch_norm: bool = True) -> None:
        super().__init__()
        check_positive_int(c, "c")
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 4, stride=2, padding=1),  # (B, c, 14, 14)
            nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1, bias=not batch_norm),
            nn.BatchNorm2d(2 * c) if batch_norm else nn.Identity(),  # (B, 2c, 7, 7)
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * c * 7 * 7, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # (B, 1, 28, 28) -> (B,)


def from_pixels(images: torch.Tensor) -> torch.Tensor:
    """Digits in [0, 1] to the generator's range [-1, 1]."""
    return 2 * images - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """The generator's [-1, 1] back to pixels in [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- training


def gan_step(
    G: nn.Module,
    D: nn.Module,
    opt_G: torch.optim.Optimizer,
    opt_D: torch.optim.Optimizer,
    real: torch.Tensor,
    loss: str = "non_saturating",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of the game: a step of the discriminator on a real batch and a
    generated one, then a step of the generator against the updated discriminator.
    Returns both losses (no ``.item()``: a GPU does not wait)."""
    z = torch.randn(len(real), G.z_dim, device=real.device, dtype=real.dtype)  # (B, Z)
    fake = G(z)
    # the discriminator's step: generated examples are constants for it (detach)
    loss_D = _discriminator_loss(D(real), D(fake.detach()))
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    opt_D.step()
    # the generator's step: its gradient flows through D into G
    loss_G = _generator_loss(D(fake), loss)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    return loss_D.detach(), loss_G.detach()


def train_gan(
    G: nn.Module,
    D: nn.Module,
    sample_real: Callable[[int], torch.Tensor],
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 2e-4,
    lr_D: float | None = None,
    betas: tuple[float, float] = (0.5, 0.999),
    loss: str = "non_saturating",
    callback: Callable[[int], None] | None = None,
    every: int = 100,
) -> dict[str, list[float]]:
    """Train ``G`` and ``D`` for ``steps`` rounds of :func:`gan_step`, each with Adam
    (DCGAN's ``lr`` and ``betas`` by default; ``lr_D``, if given, is the
    discriminator's own learning rate). ``sample_real(batch_size)`` returns a
    real batch on the models' device. ``callback(step)`` runs after every ``every``
    steps (and after the last). Returns the losses of every step."""
    for model, name in ((G, "G"), (D, "D")):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    if not hasattr(G, "z_dim"):
        raise TypeError("G must have a z_dim attribute (its latent size)")
    if not callable(sample_real):
        raise TypeError("sample_real must be callable: batch_size -> real batch")
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(every, "every")
    check_number(lr, "lr", low=0, low_open=True)
    lr_D = lr if lr_D is None else check_number(lr_D, "lr_D", low=0, low_open=True)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    opt_G = torch.optim.Adam(G.parameters(), lr=lr, betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=lr_D, betas=betas)
    G.train()
    D.train()
    losses_D, losses_G = [], []
    for step in range(1, steps + 1):
        loss_D, loss_G = gan_step(G, D, opt_G, opt_D, sample_real(batch_size), loss)
        losses_D.append(loss_D)
        losses_G.append(loss_G)
        if callback is not None and (step % every == 0 or step == steps):
            callback(step)
    return {
        "D": torch.stack(losses_D).tolist(),
        "G": torch.stack(losses_G).tolist(),
    }


# ---------------------------------------------------------------- a ring of Gaussians


def ring_centres(modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    """The ``(modes, 2)`` centres of the mixture, evenly spaced on a circle."""
    check_positive_int(modes, "modes")
    check_number(radius, "radius", low=0, low_open=True)
    angle = 2 * math.pi * torch.arange(modes, dtype=torch.float32) / modes
    return radius * torch.stack([angle.cos(), angle.sin()], 1)


def sample_ring(
    n: int,
    modes: int = 8,
    radius: float = 2.0,
    sigma: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` points ``(n, 2)`` of an equal mixture of ``modes`` Gaussians of standard
    deviation ``sigma`` on the ring :func:`ring_centres`."""
    check_positive_int(n, "n")
    check_number(sigma, "sigma", low=0, low_open=True)
    centres = ring_centres(modes, radius)
    which = torch.randint(modes, (n,), generator=generator)
    return centres[which] + sigma * torch.randn(n, 2, generator=generator)


def mode_coverage(
    samples: torch.Tensor,
    centres: torch.Tensor,
    sigma: float,
    n_sigma: float = 3.0,
    min_share: float = 0.25,
) -> tuple[int, float]:
    r"""How many modes the ``samples`` ``(N, 2)`` cover, and the share of high-quality
    samples.

    A sample is *high quality* when it lies within ``n_sigma`` standard deviations of
    its nearest centre; a mode is *covered* when it holds at least ``min_share`` of its
    fair share of the samples, $\text{min\_share} \cdot N / K$ high-quality samples for
    $K$ modes.
    """
    check_tensor(samples, "samples", ndim=2, floating=True)
    check_tensor(centres, "centres", ndim=2, floating=True)
    if samples.shape[1] != centres.shape[1]:
        raise ValueError(
            f"samples and centres must have the same dimension, got "
            f"{samples.shape[1]} and {centres.shape[1]}"
        )
    check_number(sigma, "sigma", low=0, low_open=True)
    check_number(n_sigma, "n_sigma", low=0, low_open=True)
    check_number(min_share, "min_share", low=0, low_open=True)
    return _mode_coverage(samples, centres, sigma, n_sigma, min_share)


def _mode_coverage(samples, centres, sigma, n_sigma=3.0, min_share=0.25):
    distance, nearest = torch.cdist(samples.float(), centres.float()).min(1)  # (N,)
    good = distance <= n_sigma * sigma
    counts = torch.bincount(nearest[good], minlength=len(centres))  # (K,)
    covered = int((counts >= min_share * len(samples) / len(centres)).sum())
    return covered, float(good.float().mean())


# ---------------------------------------------------------------- the digits


def make_digit_gan(
    model: str = "dcgan", z_dim: int = 32
) -> tuple[nn.Module, nn.Module]:
    """The chapter's digit generator and discriminator: ``"dcgan"`` (channels 16 and
    32) or ``"mlp"`` (two hidden layers of 256)."""
    if model == "dcgan":
        return DCGANGenerator(z_dim, c=16), DCGANDiscriminator(c=16)
    if model == "mlp":
        return MLPGenerator(z_dim, 256), MLPDiscriminator(hidden=256)
    raise ValueError(f"model must be 'dcgan' or 'mlp', got {model!r}")


#: The chapter's training settings for the digits (Adam's learning rate, batch size).
DIGIT_SETTINGS = {"lr": 1e-3, "batch_size": 64}


def generate_digits(
    steps: int, n: int = 1000, seed: int = 0, model: str = "dcgan"
) -> torch.Tensor:
    """Train the chapter's digit GAN from scratch on ``digits("train")`` for ``steps``
    rounds (one discriminator and one generator step each, batch 64, Adam with
    ``lr=1e-3``, ``betas=(0.5, 0.999)``, the non-saturating loss), on one CPU thread,
    and return ``n`` samples ``(n, 1, 28, 28)`` float32 in [0, 1].

    ``model`` (the only option): ``"dcgan"`` (20 to 30 ms a step on one thread of the
    book's CPU) or ``"mlp"`` (5 to 8 ms a step). Samples are drawn with the generator
    in evaluation mode (batch norm's running statistics).
    """
    from dlabc.generative.yardstick import digits

    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if model not in ("dcgan", "mlp"):
        raise ValueError(f"model must be 'dcgan' or 'mlp', got {model!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        G, D = make_digit_gan(model)
        data = from_pixels(digits("train")[0])
        rng = torch.Generator().manual_seed(seed)

        def sample_real(batch_size: int) -> torch.Tensor:
            return data[torch.randint(len(data), (batch_size,), generator=rng)]

        train_gan(G, D, sample_real, steps, **DIGIT_SETTINGS)
        G.eval()
        with torch.no_grad():
            return to_pixels(G(torch.randn(n, G.z_dim))).float()
    finally:
        torch.set_num_threads(threads)
