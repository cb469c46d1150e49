r"""Variational autoencoders: the two gradient estimators of an expectation
(reparameterisation and score function), the KL divergence of diagonal Gaussians, a VAE
with a Bernoulli decoder trained on the evidence lower bound (ELBO), and the
importance-weighted bound that tightens it.

Chapter: ``book/generative/vae.md``.

References:
- Kingma & Welling (2014), *Auto-Encoding Variational Bayes*, ICLR (the ELBO of an
  encoder and a decoder, the reparameterisation trick, the closed-form KL term).
- Rezende, Mohamed & Wierstra (2014), *Stochastic Backpropagation and Approximate
  Inference in Deep Generative Models*, ICML (the same model and estimator, found at the
  same time).
- Williams (1992), *Simple Statistical Gradient-Following Algorithms for Connectionist
  Reinforcement Learning*, Machine Learning (the score-function estimator, REINFORCE).
- Burda, Grosse & Salakhutdinov (2016), *Importance Weighted Autoencoders*, ICLR (the
  bound with ``k`` samples).

Shapes: ``B`` images of ``(1, 28, 28)`` pixels, ``D = 784`` pixels, a latent code of
``latent_dim`` numbers, ``k`` importance samples. Images are black and white
(``yardstick.binarize``) and the decoder gives each pixel a Bernoulli probability. All
log-likelihoods are in nats unless a name says bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.generative.yardstick import binarize, bits_per_dim, digits
from dlabc.train import History, endless_minibatches, train_steps

__all__ = [
    "reparameterization_gradients",
    "score_function_gradients",
    "kl_diagonal_gaussians",
    "VAE",
    "negative_elbo",
    "iwae_bound",
    "negative_elbo_bits_per_dim",
    "train_vae",
    "sample",
    "generate_digits",
]


# ------------------------------------------------- two estimators of one gradient


def reparameterization_gradients(
    f: Callable[[torch.Tensor], torch.Tensor],
    mu: float,
    sigma: float,
    n: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``n`` independent one-sample estimates ``(n,)`` of
    $\frac{\partial}{\partial \mu} \mathbb E_{z \sim \mathcal N(\mu, \sigma^2)}[f(z)]$
    by the reparameterisation (pathwise) estimator $f'(\mu + \sigma \varepsilon)$,
    $\varepsilon \sim \mathcal N(0, 1)$, for an elementwise differentiable ``f``."""
    _check_estimator(f, sigma, n)
    return _reparameterization_gradients(f, float(mu), float(sigma), n, generator)


def _reparameterization_gradients(
    f: Callable[[torch.Tensor], torch.Tensor],
    mu: float,
    sigma: float,
    n: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``n`` one-sample pathwise estimates ``(n,)`` of
    $\frac{\partial}{\partial \mu} \mathbb E_{z \sim \mathcal N(\mu, \sigma^2)}[f(z)]$:
    $f'(\mu + \sigma \varepsilon)$, $\varepsilon \sim \mathcal N(0, 1)$."""
    mu = torch.full((n,), float(mu), dtype=torch.float64, requires_grad=True)
    eps = torch.randn(n, generator=generator, dtype=torch.float64)  # ε ~ N(0, 1)
    z = mu + sigma * eps  # z = μ + σε: a path from μ to z
    (gradients,) = torch.autograd.grad(f(z).sum(), mu)  # ∂f(μ + σε)/∂μ, one per sample
    return gradients


def score_function_gradients(
    f: Callable[[torch.Tensor], torch.Tensor],
    mu: float,
    sigma: float,
    n: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``n`` independent one-sample estimates ``(n,)`` of the same gradient by the
    score-function estimator (REINFORCE)
    $f(z)\, \frac{\partial}{\partial \mu} \log q(z; \mu, \sigma)$, $z \sim
    \mathcal N(\mu, \sigma^2)$, for an elementwise ``f``."""
    _check_estimator(f, sigma, n)
    return _score_function_gradients(f, float(mu), float(sigma), n, generator)


def _score_function_gradients(
    f: Callable[[torch.Tensor], torch.Tensor],
    mu: float,
    sigma: float,
    n: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``n`` one-sample score-function estimates ``(n,)`` of the same gradient:
    $f(z)\, \frac{\partial}{\partial \mu} \log q(z; \mu, \sigma)$, $z \sim
    \mathcal N(\mu, \sigma^2)$. $f$ is only evaluated, never differentiated."""
    mu = torch.full((n,), float(mu), dtype=torch.float64, requires_grad=True)
    eps = torch.randn(n, generator=generator, dtype=torch.float64)
    z = (mu + sigma * eps).detach()  # a sample: no path from μ to z
    log_q = torch.distributions.Normal(mu, sigma).log_prob(z)  # log q(z; μ, σ)
    (gradients,) = torch.autograd.grad((f(z) * log_q).sum(), mu)  # f(z) ∂log q/∂μ
    return gradients


def _check_estimator(f: object, sigma: object, n: object) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    check_number(sigma, "sigma", low=0, low_open=True)
    check_positive_int(n, "n")


# ------------------------------------------------------------------ the KL term


def kl_diagonal_gaussians(
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor | float = 0.0,
    logvar_p: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    r"""$\mathrm{KL}(q \,\|\, p)$ of two Gaussians with diagonal covariances, given by
    their means and log-variances, summed over the last dimension: ``(..., L)`` ->
    ``(...)``. The defaults make $p$ the standard normal prior $\mathcal N(0, I)$."""
    check_tensor(mu_q, "mu_q", floating=True)
    check_tensor(logvar_q, "logvar_q", floating=True)
    return _kl_diagonal_gaussians(mu_q, logvar_q, mu_p, logvar_p)


def _kl_diagonal_gaussians(
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor | float = 0.0,
    logvar_p: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    r"""$\mathrm{KL}(q \,\|\, p)$ of two diagonal Gaussians, ``(..., L)`` -> ``(...)``:

    $\mathrm{KL} = \frac12 \sum_j \Big(\log \sigma_{p,j}^2 - \log \sigma_{q,j}^2
    + \frac{\sigma_{q,j}^2 + (\mu_{q,j} - \mu_{p,j})^2}{\sigma_{p,j}^2} - 1\Big)$
    """
    mu_p = torch.as_tensor(mu_p, dtype=mu_q.dtype, device=mu_q.device)
    logvar_p = torch.as_tensor(logvar_p, dtype=mu_q.dtype, device=mu_q.device)
    ratio = (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp()  # (σ_q² + Δμ²)/σ_p²
    return 0.5 * (logvar_p - logvar_q + ratio - 1).sum(-1)


# ----------------------------------------------------------------------- the VAE


class VAE(nn.Module):
    r"""Kingma & Welling's VAE with one hidden layer in each network.

    The encoder maps an image $x$ to the mean and log-variance of
    $q_\phi(z \mid x) = \mathcal N(\mu_\phi(x), \operatorname{diag} \sigma^2_\phi(x))$;
    the decoder maps a code $z$ to the logits of $p_\theta(x \mid z)$, one Bernoulli
    per pixel; the prior is $p(z) = \mathcal N(0, I)$.
    """

    def __init__(
        self,
        latent_dim: int = 16,
        hidden: int = 200,
        image_shape: tuple[int, ...] = (1, 28, 28),
    ) -> None:
        super().__init__()
        check_positive_int(latent_dim, "latent_dim")
        check_positive_int(hidden, "hidden")
        image_shape = tuple(check_positive_int(s, "image_shape") for s in image_shape)
        self.latent_dim, self.image_shape = latent_dim, tuple(image_shape)
        D = math.prod(image_shape)
        self.encoder = nn.Sequential(
            nn.Flatten(),
            nn.Linear(D, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, D)
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance ``(B, latent_dim)`` each of
        $q_\\phi(z \\mid x)$."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)  # (B, L), (B, L)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The Bernoulli logits ``(..., 1, 28, 28)`` of $p_\\theta(x \\mid z)$ for codes
        ``(..., latent_dim)``."""
        return self.decoder(z).unflatten(-1, self.image_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode, draw one $z = \\mu + \\sigma \\odot \\varepsilon$, decode: the logits
        ``(B, 1, 28, 28)``, ``mu`` and ``logvar`` ``(B, L)``."""
        mu, logvar = self.encode(x)
        eps = torch.randn_like(mu)  # ε ~ N(0, I)
        z = mu + (0.5 * logvar).exp() * eps  # the reparameterisation
        return self.decode(z), mu, logvar


def negative_elbo(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """The negative ELBO of each binarised image ``(B,)``, in nats, with one sample of
    $z$ per image (drawn from the global random generator)."""
    _check_model_and_images(model, x)
    return _negative_elbo(model, x)


def _negative_elbo(model: VAE, x: torch.Tensor) -> torch.Tensor:
    r"""The negative ELBO of each image ``(B,)``, in nats, with one sample of $z$:

    $-\mathcal L(x) = -\log p_\theta(x \mid z) + \mathrm{KL}(q_\phi(z \mid x)
    \,\|\, p(z))$, $z = \mu + \sigma \odot \varepsilon$.
    """
    logits, mu, logvar = model(x)
    # -log p(x | z): the binary cross-entropy of every pixel, summed over the image
    reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    reconstruction = reconstruction.flatten(1).sum(1)  # (B,)
    return reconstruction + _kl_diagonal_gaussians(mu, logvar)  # (B,)


def _log_normal(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(
        -1
    )


def iwae_bound(model: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """The importance-weighted bound ``(B,)`` on the log-likelihood of binarised
    images, in nats, with ``k`` samples of $z$ per image."""
    _check_model_and_images(model, x)
    check_positive_int(k, "k")
    return _iwae_bound(model, x, k)


def _iwae_bound(model: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    r"""The importance-weighted bound ``(B,)`` on $\log p_\theta(x)$, in nats, with
    ``k`` samples $z_i \sim q_\phi(z \mid x)$:

    $\mathcal L_k(x) = \log \frac1k \sum_{i=1}^k
    \frac{p_\theta(x \mid z_i)\, p(z_i)}{q_\phi(z_i \mid x)}$
    """
    mu, logvar = model.encode(x)  # (B, L)
    eps = torch.randn(k, *mu.shape, device=mu.device, dtype=mu.dtype)  # (k, B, L)
    z = mu + (0.5 * logvar).exp() * eps  # (k, B, L)
    logits = model.decode(z)  # (k, B, 1, 28, 28)
    target = x.expand_as(logits)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    log_px_z = log_px_z.flatten(2).sum(-1)  # (k, B)
    log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))  # (k, B)
    log_qz = _log_normal(z, mu, logvar)  # (k, B)
    log_w = log_px_z + log_pz - log_qz  # log importance weights
    return torch.logsumexp(log_w, dim=0) - math.log(k)  # (B,)


def _check_model_and_images(model: object, images: object) -> torch.Tensor:
    if not isinstance(model, VAE):
        raise TypeError(f"model must be a VAE, got {type(model).__name__}")
    check_tensor(images, "images", ndim=4, floating=True)
    if images.shape[1:] != model.image_shape or len(images) == 0:
        raise ValueError(
            f"images must have shape (N, {', '.join(map(str, model.image_shape))}) "
            f"with N > 0, got {tuple(images.shape)}"
        )
    if not ((images == 0) | (images == 1)).all():
        raise ValueError("images must be black and white (0 or 1): use binarize()")
    return images


@torch.no_grad()
def negative_elbo_bits_per_dim(
    model: VAE, images: torch.Tensor, k: int = 1, seed: int = 0, batch_size: int = 500
) -> float:
    """The mean negative bound on the log-likelihood of binarised ``images``
    ``(N, 1, 28, 28)``, in bits per pixel (the part's unit for every likelihood).

    ``k = 1`` is the ELBO with one sample of $z$ per image; ``k > 1`` the tighter
    importance-weighted bound. ``seed`` fixes the samples, so the number is
    reproducible. The model is evaluated in evaluation mode; its mode is restored.
    """
    images = _check_model_and_images(model, images)
    check_positive_int(k, "k")
    check_positive_int(batch_size, "batch_size")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):  # leaves the global generators alone
            torch.manual_seed(seed)
            total = 0.0
            for batch in images.split(batch_size):
                batch = batch.to(device)
                bound = (
                    -_negative_elbo(model, batch)
                    if k == 1
                    else _iwae_bound(model, batch, k)
                )
                total -= bound.sum().item()
    finally:
        model.train(was_training)
    return bits_per_dim(total / len(images), math.prod(model.image_shape))


# ------------------------------------------------------------------------ training


def train_vae(
    images: torch.Tensor,
    steps: int,
    latent_dim: int = 16,
    hidden: int = 200,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[VAE, History]:
    """Train a :class:`VAE` on binarised ``images`` ``(N, 1, 28, 28)`` (on their device)
    for ``steps`` Adam steps of ``batch_size`` images, minimising the mean negative
    ELBO; return the model (in evaluation mode) and the training history."""
    check_tensor(images, "images", ndim=4, floating=True)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    torch.manual_seed(seed)
    model = VAE(latent_dim, hidden, tuple(images.shape[1:])).to(images.device)
    images = _check_model_and_images(model, images)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches = endless_minibatches(len(images), batch_size, generator)

    def loss_fn(model: VAE, index: torch.Tensor) -> torch.Tensor:
        return _negative_elbo(model, images[index.to(images.device)]).mean()

    history = train_steps(model, optimizer, batches, loss_fn, steps=steps)
    return model.eval(), history


@torch.no_grad()
def sample(
    model: VAE, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` new digits ``(n, 1, 28, 28)``: $z \\sim \\mathcal N(0, I)$, decoded to the
    Bernoulli means $p_\\theta(x = 1 \\mid z)$ (grey values, not binary samples)."""
    if not isinstance(model, VAE):
        raise TypeError(f"model must be a VAE, got {type(model).__name__}")
    check_positive_int(n, "n")
    device = next(model.parameters()).device
    z = torch.randn(n, model.latent_dim, generator=generator).to(device)  # z ~ p(z)
    return torch.sigmoid(model.decode(z))


def generate_digits(
    steps: int,
    n: int = 1000,
    seed: int = 0,
    *,
    latent_dim: int = 16,
    hidden: int = 200,
    batch_size: int = 128,
    lr: float = 1e-3,
    return_model: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, VAE]:
    """The part's comparison contract: train the chapter's VAE from scratch on
    ``binarize(digits("train")[0])`` for ``steps`` Adam steps (CPU, one thread), then
    return ``n`` samples ``(n, 1, 28, 28)`` float32 in [0, 1] on the CPU.

    The samples are the decoder's Bernoulli *means* for $z \\sim \\mathcal N(0, I)$,
    grey values, not binary draws. One step (a batch of 128, one hidden layer of 200
    units, ``latent_dim=16``) costs 5 to 7 ms of one CPU core.

    Options: ``latent_dim`` (16), ``hidden`` (200), ``batch_size`` (128), ``lr``
    (1e-3). With ``return_model=True`` it returns ``(samples, model)``, so that the
    bound of :func:`negative_elbo_bits_per_dim` can be measured on the test digits.
    """
    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = binarize(digits("train")[0])
        model, _ = train_vae(images, steps, latent_dim, hidden, batch_size, lr, seed)
        samples = sample(model, n, torch.Generator().manual_seed(seed))
    finally:
        torch.set_num_threads(threads)
    samples = samples.float().clamp(0, 1)
    return (samples, model) if return_model else samples
