r"""Conditional VAEs and VQ-VAE: a VAE told which digit to draw, and an autoencoder
whose latent code is a grid of entries of a learned codebook.

Chapter: ``book/generative/cvae_vqvae.md``.

References:
- Sohn, Lee & Yan (2015), *Learning Structured Output Representation using Deep
  Conditional Generative Models*, NeurIPS (the conditional VAE: encoder and decoder
  both see the condition $y$).
- van den Oord, Vinyals & Kavukcuoglu (2017), *Neural Discrete Representation
  Learning*, NeurIPS (VQ-VAE: nearest-neighbour quantisation, the straight-through
  gradient, the codebook and commitment losses; its appendix gives the EMA updates).
- Bengio, Léonard & Courville (2013), *Estimating or Propagating Gradients Through
  Stochastic Neurons for Conditional Computation* (the straight-through estimator).
- Kaiser et al. (2018), *Fast Decoding in Sequence Models Using Discrete Latent
  Variables*, ICML, and Razavi, van den Oord & Vinyals (2019), *Generating Diverse
  High-Fidelity Images with VQ-VAE-2*, NeurIPS (codebooks learned by exponential
  moving averages).
- Dhariwal et al. (2020), *Jukebox: A Generative Model for Music* (restarting dead
  codes on encoder outputs).

Shapes: ``B`` images ``(B, 1, 28, 28)`` in [0, 1], labels ``(B,)`` int64; the CVAE's
latent ``(B, latent_dim)``; the VQ-VAE's encoder output ``(B, D, 7, 7)``, a grid of
7 × 7 vectors of ``D`` numbers, each replaced by one of the ``K`` codebook rows
``(K, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.train import History, endless_minibatches, train_steps

__all__ = [
    "CVAE",
    "negative_elbo",
    "sample_cvae",
    "train_cvae",
    "generate_digits",
    "vector_quantize",
    "vq_losses",
    "ema_update",
    "codebook_perplexity",
    "VectorQuantizer",
    "VQVAE",
    "train_vqvae",
    "fit_independent_prior",
    "sample_independent_prior",
]


# --- the conditional VAE --------------------------------------------------------------


class CVAE(nn.Module):
    r"""A VAE whose encoder $q_\phi(z \mid x, y)$ and decoder $p_\theta(x \mid z, y)$
    both read the label $y$ as a one-hot vector, concatenated to their input.

    Two hidden layers of ``hidden`` ReLU units each way; the encoder returns the mean
    and log-variance of a diagonal Gaussian over ``latent_dim`` numbers, the decoder the
    logits of 784 Bernoulli pixels. Because the decoder is told the digit, $z$ is free
    to hold only what the label does not say: the style.
    """

    def __init__(
        self, latent_dim: int = 8, hidden: int = 128, n_classes: int = 10
    ) -> None:
        super().__init__()
        check_positive_int(latent_dim, "latent_dim")
        check_positive_int(hidden, "hidden")
        check_positive_int(n_classes, "n_classes")
        self.latent_dim, self.n_classes = latent_dim, n_classes
        h = hidden
        self.encoder = nn.Sequential(  # q(z | x, y)
            nn.Linear(784 + n_classes, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
            nn.Linear(h, 2 * latent_dim),  # mean and log-variance
        )  # fmt: skip
        self.decoder = nn.Sequential(  # p(x | z, y)
            nn.Linear(latent_dim + n_classes, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
            nn.Linear(h, 784),  # logits of the pixels
        )  # fmt: skip

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        onehot = F.one_hot(y, self.n_classes).to(x.dtype)  # (B, 10)
        h = self.encoder(torch.cat([x.flatten(1), onehot], 1))  # (B, 2 * latent_dim)
        mu, logvar = h.chunk(2, dim=1)  # (B, latent_dim) each
        return mu, logvar

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, self.n_classes).to(z.dtype)
        logits = self.decoder(torch.cat([z, onehot], 1))  # (B, 784)
        return logits.view(-1, 1, 28, 28)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mu, logvar = self.encode(x, y)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # reparameterisation
        return self.decode(z, y), mu, logvar


def negative_elbo(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    r"""The negative evidence lower bound of each image, in nats ``(B,)``: the Bernoulli
    reconstruction term plus $\mathrm{KL}(\mathcal N(\mu, \sigma^2) \,\|\, \mathcal N(0,
    I))$ in closed form. ``logits`` and ``x`` ``(B, ...)`` (``x`` in [0, 1]), ``mu``
    and ``logvar`` ``(B, latent_dim)``."""
    check_tensor(logits, "logits", floating=True)
    check_tensor(x, "x", floating=True)
    check_tensor(mu, "mu", ndim=2, floating=True)
    check_tensor(logvar, "logvar", ndim=2, floating=True)
    if x.shape != logits.shape or mu.shape != logvar.shape or len(mu) != len(x):
        raise ValueError(
            f"shapes do not match: logits {tuple(logits.shape)}, x {tuple(x.shape)}, "
            f"mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)}"
        )
    return _negative_elbo(logits, x, mu, logvar)


def _negative_elbo(logits, x, mu, logvar):
    r"""$-\log p_\theta(x \mid z, y) + \mathrm{KL}(q_\phi(z \mid x, y) \,\|\, p(z))$ of
    each image, in nats ``(B,)``, for one sample $z$ decoded to pixel ``logits``."""
    # -log p(x | z, y): minus the Bernoulli log-likelihood of the pixels, summed
    reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    # KL(N(mu, sigma^2) || N(0, 1)) of each latent number, in closed form
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar)  # (B, latent_dim)
    return reconstruction.flatten(1).sum(1) + kl.sum(1)


def sample_cvae(
    model: CVAE, labels: torch.Tensor, z: torch.Tensor | None = None
) -> torch.Tensor:
    """Digits ``(B, 1, 28, 28)`` in [0, 1] (the decoder's means) of the requested
    ``labels`` ``(B,)``, from latents ``z`` ``(B, latent_dim)`` (drawn from the prior
    $\\mathcal N(0, I)$ when not given)."""
    if not isinstance(model, CVAE):
        raise TypeError(f"model must be a CVAE, got {type(model).__name__}")
    check_tensor(labels, "labels", ndim=1, dtype=torch.long)
    if len(labels) and (labels.min() < 0 or labels.max() >= model.n_classes):
        raise ValueError(f"labels must lie in [0, {model.n_classes})")
    if z is None:
        z = torch.randn(len(labels), model.latent_dim, device=labels.device)
    check_tensor(z, "z", ndim=2, floating=True)
    if z.shape != (len(labels), model.latent_dim):
        raise ValueError(
            f"z must have shape {(len(labels), model.latent_dim)}, got {tuple(z.shape)}"
        )
    with torch.no_grad():
        return _sample(model, labels, z)


def _sample(model: CVAE, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(model.decode(z, labels))


def _check_images(images: object, labels: object | None = None) -> None:
    check_tensor(images, "images", ndim=4, floating=True)
    if images.shape[1:] != (1, 28, 28):
        raise ValueError(
            f"images must have shape (N, 1, 28, 28), got {tuple(images.shape)}"
        )
    if labels is not None:
        check_tensor(labels, "labels", ndim=1, dtype=torch.long)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")


def train_cvae(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    **model_options: int,
) -> tuple[CVAE, History]:
    """Train a :class:`CVAE` (``model_options``: ``latent_dim``, ``hidden``) on
    ``images`` with their ``labels`` for ``steps`` Adam steps on the mean negative ELBO;
    the model lives on ``images``' device."""
    _check_images(images, labels)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    torch.manual_seed(seed)
    model = CVAE(**model_options).to(images.device)
    generator = torch.Generator().manual_seed(seed)
    batches = endless_minibatches(len(images), batch_size, generator)

    def loss_fn(model: CVAE, index: torch.Tensor) -> torch.Tensor:
        x, y = images[index.to(images.device)], labels[index.to(labels.device)]
        logits, mu, logvar = model(x, y)
        return _negative_elbo(logits, x, mu, logvar).mean()

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = train_steps(model, optimizer, batches, loss_fn, steps=steps)
    model.eval()
    return model, history


def generate_digits(
    steps: int, n: int = 1000, seed: int = 0, **options: int
) -> torch.Tensor:
    """The chapter's digit generator for the part's comparison: a :class:`CVAE` trained
    from scratch on ``digits("train")`` for ``steps`` Adam steps of 128 digits, on one
    CPU thread, then ``n`` samples ``(n, 1, 28, 28)`` float32 in [0, 1] on the CPU
    (decoder means, not binary samples), for the labels 0, 1, ..., 9, 0, 1, ... in turn.

    One step (forward and backward of a batch of 128 through the encoder and decoder,
    two hidden layers of 128 each, 240 k weights in all) costs about 5 ms of one CPU
    thread. ``options``: ``latent_dim`` (default 8), ``hidden`` (128), ``batch_size``
    (128), ``lr`` (2e-3).
    """
    from dlabc.generative.yardstick import digits

    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    train_options = {k: options.pop(k) for k in ("batch_size", "lr") if k in options}
    images, labels = digits("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = train_cvae(
            images, labels, steps, seed=seed, **train_options, **options
        )
        torch.manual_seed(seed + 1)
        wanted = torch.arange(n) % 10
        return sample_cvae(model, wanted).float().cpu()
    finally:
        torch.set_num_threads(threads)


# --- vector quantisation --------------------------------------------------------------


def vector_quantize(
    z: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each row of ``z`` ``(N, D)`` by its nearest row of ``codebook`` ``(K,
    D)``. Returns the straight-through output ``(N, D)`` (the codebook rows going
    forward, the identity going backward), the codebook rows ``z_q`` ``(N, D)``
    themselves (through which gradients reach the codebook) and the chosen indices
    ``(N,)``."""
    check_tensor(z, "z", ndim=2, floating=True)
    check_tensor(codebook, "codebook", ndim=2, floating=True)
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"z has vectors of {z.shape[1]} numbers, the codebook of {codebook.shape[1]}"
        )
    return _vector_quantize(z, codebook)


def _vector_quantize(z: torch.Tensor, codebook: torch.Tensor):
    # ||z - e_k||² = ||z||² - 2 z·e_k + ||e_k||², for every pair at once   (N, K)
    distances = (
        z.square().sum(1, keepdim=True) - 2 * z @ codebook.T + codebook.square().sum(1)
    )
    indices = distances.argmin(1)  # k(n) = argmin_k ||z_n - e_k||   (N,)
    z_q = codebook[indices]  # (N, D)
    z_st = z + (z_q - z).detach()  # forward: z_q; backward: dL/dz := dL/dz_q
    return z_st, z_q, indices


def vq_losses(
    z: torch.Tensor, z_q: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The codebook loss $\lVert \mathrm{sg}[z] - e \rVert^2$ (moves only the codebook)
    and the commitment loss $\beta \lVert z - \mathrm{sg}[e] \rVert^2$ (moves only the
    encoder), each a mean over all numbers; ``z`` (the encoder's outputs) and ``z_q``
    (their codes) ``(N, D)``."""
    check_tensor(z, "z", ndim=2, floating=True)
    check_tensor(z_q, "z_q", ndim=2, floating=True)
    if z.shape != z_q.shape:
        raise ValueError(f"z {tuple(z.shape)} and z_q {tuple(z_q.shape)} differ")
    check_number(beta, "beta", low=0)
    return _vq_losses(z, z_q, beta)


def _vq_losses(z: torch.Tensor, z_q: torch.Tensor, beta: float):
    r"""The codebook loss $\lVert \mathrm{sg}[z_e] - e_k \rVert^2$ and the commitment
    loss $\beta \lVert z_e - \mathrm{sg}[e_k] \rVert^2$, each a mean over all
    numbers."""
    codebook_loss = F.mse_loss(z_q, z.detach())
    commitment_loss = beta * F.mse_loss(z, z_q.detach())
    return codebook_loss, commitment_loss


def ema_update(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One exponential-moving-average step of the codebook. ``cluster_size`` ``(K,)``
    holds $N_i$, ``embed_sum`` ``(K, D)`` holds $m_i$; ``z`` ``(N, D)`` are this batch's
    encoder outputs and ``indices`` ``(N,)`` their codes. Returns the new $N_i$, $m_i$
    and codebook $e_i = m_i / \tilde N_i$ ($\tilde N$: $N$ with Laplace smoothing
    ``eps``)."""
    check_tensor(cluster_size, "cluster_size", ndim=1, floating=True)
    check_tensor(embed_sum, "embed_sum", ndim=2, floating=True)
    check_tensor(z, "z", ndim=2, floating=True)
    check_tensor(indices, "indices", ndim=1, dtype=torch.long)
    K, D = embed_sum.shape
    if cluster_size.shape != (K,) or z.shape[1] != D or len(indices) != len(z):
        raise ValueError(
            f"shapes do not match: cluster_size {tuple(cluster_size.shape)}, embed_sum "
            f"{(K, D)}, z {tuple(z.shape)}, indices {tuple(indices.shape)}"
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= K):
        raise ValueError(f"indices must lie in [0, {K})")
    check_number(decay, "decay", low=0, high=1, high_open=True)
    check_number(eps, "eps", low=0)
    return _ema_update(cluster_size, embed_sum, z, indices, decay, eps)


def _ema_update(cluster_size, embed_sum, z, indices, decay, eps):
    K = len(cluster_size)
    onehot = F.one_hot(indices, K).to(z.dtype)  # (N, K)
    n = onehot.sum(0)  # n_i: how many vectors chose code i   (K,)
    sums = onehot.T @ z  # sum of the vectors that chose code i   (K, D)
    cluster_size = decay * cluster_size + (1 - decay) * n  # N_i
    embed_sum = decay * embed_sum + (1 - decay) * sums  # m_i
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + K * eps) * total  # never 0
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]  # e_i = m_i / N_i


def codebook_perplexity(indices: torch.Tensor, num_codes: int) -> float:
    r"""$\exp H(p)$, $p$ the frequency of each of the ``num_codes`` codes in
    ``indices`` (any shape): ``num_codes`` when all are used equally, 1 when one code
    is used, in general the number of equally used codes with the same entropy."""
    check_tensor(indices, "indices", dtype=torch.long)
    check_positive_int(num_codes, "num_codes")
    if indices.numel() == 0:
        raise ValueError("indices is empty")
    if indices.min() < 0 or indices.max() >= num_codes:
        raise ValueError(f"indices must lie in [0, {num_codes})")
    return float(_perplexity(indices, num_codes))


def _perplexity(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    p = torch.bincount(indices.flatten(), minlength=num_codes).double()
    p = p / p.sum()  # (K,)
    entropy = -torch.special.xlogy(p, p).sum()  # 0 log 0 = 0
    return entropy.exp()


class VectorQuantizer(nn.Module):
    r"""A codebook of ``num_codes`` vectors of ``dim`` numbers, and the layer that snaps
    each position of an encoder output ``(B, dim, H, W)`` to its nearest code.

    With ``ema=False`` the codebook is a parameter, moved by the codebook loss, and the
    layer's loss is codebook plus commitment loss; with ``ema=True`` the codebook is a
    buffer that follows the exponential moving average of the vectors assigned to each
    code (:func:`ema_update`, in training mode), and the loss is the commitment loss
    only. Both start from codes drawn uniformly in $[-1/K, 1/K]$. With ``restart`` > 0
    (EMA only), a code whose moving count falls below it is moved onto an encoder
    output.
    """

    def __init__(
        self,
        num_codes: int = 64,
        dim: int = 16,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int(num_codes, "num_codes")
        check_positive_int(dim, "dim")
        check_number(beta, "beta", low=0)
        check_number(decay, "decay", low=0, high=1, high_open=True)
        check_number(eps, "eps", low=0)
        check_number(restart, "restart", low=0)
        if restart > 0 and not ema:
            raise ValueError("restart needs ema=True (it resets the moving averages)")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps, self.restart = bool(ema), decay, eps, restart
        codebook = torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes)
        if self.ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(num_codes))  # N_i
            self.register_buffer("embed_sum", codebook.clone())  # m_i = N_i e_i
        else:
            self.codebook = nn.Parameter(codebook)

    @torch.no_grad()
    def _update_codebook(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        self.cluster_size, self.embed_sum, self.codebook = _ema_update(
            self.cluster_size, self.embed_sum, z, indices, self.decay, self.eps
        )
        if self.restart > 0:
            self._restart_dead_codes(z)

    def _restart_dead_codes(self, z: torch.Tensor) -> None:
        """Move each code whose moving count $N_i$ fell below ``restart`` onto a random
        encoder output of this batch, where it will be chosen at least once."""
        dead = self.cluster_size < self.restart  # (K,)
        picks = torch.randint(len(z), (int(dead.sum()),), device=z.device)
        self.codebook[dead] = z[picks]
        self.embed_sum[dead] = z[picks]  # m_i = N_i e_i with N_i = 1
        self.cluster_size[dead] = 1.0

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, D, H, W = z_e.shape
        z = z_e.permute(0, 2, 3, 1).reshape(-1, D)  # one vector per position (BHW, D)
        z_st, z_q, indices = _vector_quantize(z, self.codebook)
        codebook_loss, commitment_loss = _vq_losses(z, z_q, self.beta)
        if self.ema and self.training:
            self._update_codebook(z.detach(), indices)
        # with EMA the codebook does not learn by gradient: only the commitment loss
        loss = commitment_loss if self.ema else codebook_loss + commitment_loss
        z_st = z_st.view(B, H, W, D).permute(0, 3, 1, 2)  # (B, D, H, W)
        return z_st, loss, indices.view(B, H, W)


class VQVAE(nn.Module):
    """Encoder (two stride-2 convolutions: 28 → 14 → 7), a :class:`VectorQuantizer` on
    each of the 7 × 7 positions, and a decoder (two transposed convolutions back to 28
    × 28) that returns pixel logits. ``quantizer_options`` go to the quantizer."""

    def __init__(
        self,
        num_codes: int = 64,
        dim: int = 16,
        channels: int = 16,
        **quantizer_options,
    ) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c // 2, 4, stride=2, padding=1), nn.ReLU(),  # (B, c/2, 14, 14)
            nn.Conv2d(c // 2, c, 4, stride=2, padding=1), nn.ReLU(),  # (B, c, 7, 7)
            nn.Conv2d(c, dim, 1),  # z_e   (B, D, 7, 7)
        )  # fmt: skip
        self.quantizer = VectorQuantizer(num_codes, dim, **quantizer_options)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, c, 3, padding=1), nn.ReLU(),  # (B, c, 7, 7)
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.ReLU(),  # 14 × 14
            nn.ConvTranspose2d(c // 2, 1, 4, stride=2, padding=1),  # logits (B, 1, 28, 28)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z_q, vq_loss, indices = self.quantizer(self.encoder(x))
        return self.decoder(z_q), vq_loss, indices

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code of each position ``(B, 7, 7)``."""
        _check_images(x)
        D = self.quantizer.dim
        z = self.encoder(x).permute(0, 2, 3, 1).reshape(-1, D)
        return _vector_quantize(z, self.quantizer.codebook)[2].view(len(x), 7, 7)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 1, 28, 28)`` in [0, 1] from codes ``(B, 7, 7)``."""
        check_tensor(indices, "indices", ndim=3, dtype=torch.long)
        z_q = self.quantizer.codebook[indices].permute(0, 3, 1, 2)  # (B, D, 7, 7)
        return torch.sigmoid(self.decoder(z_q))


def train_vqvae(
    images: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    monitor: torch.Tensor | None = None,
    every: int = 50,
    **model_options,
) -> tuple[VQVAE, History]:
    """Train a :class:`VQVAE` (``model_options``: ``num_codes``, ``dim``, ``channels``,
    ``beta``, ``ema``, ``decay``) for ``steps`` Adam steps on the pixels' mean binary
    cross-entropy plus the quantizer's loss. With ``monitor`` images, the codebook
    perplexity and the number of codes used on them are recorded every ``every`` steps
    in ``history.metrics``."""
    _check_images(images)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(every, "every")
    check_number(lr, "lr", low=0, low_open=True)
    if monitor is not None:
        _check_images(monitor)
    torch.manual_seed(seed)
    model = VQVAE(**model_options).to(images.device)
    generator = torch.Generator().manual_seed(seed)
    batches = endless_minibatches(len(images), batch_size, generator)

    def loss_fn(model: VQVAE, index: torch.Tensor) -> torch.Tensor:
        x = images[index.to(images.device)]
        logits, vq_loss, _ = model(x)
        return F.binary_cross_entropy_with_logits(logits, x) + vq_loss

    def usage(model: VQVAE) -> dict[str, float]:
        codes = model.encode(monitor)
        K = model.quantizer.num_codes
        return {
            "perplexity": float(_perplexity(codes, K)),
            "codes used": float(len(codes.unique())),
        }

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = train_steps(
        model,
        optimizer,
        batches,
        loss_fn,
        steps=steps,
        evaluate_every=every if monitor is not None else None,
        evaluate_fn=usage if monitor is not None else None,
    )
    model.eval()
    return model, history


# --- the simplest prior over the codes ------------------------------------------------


def fit_independent_prior(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The frequency of each code at each position of ``indices`` ``(N, H, W)``: a prior
    ``(H, W, num_codes)`` that draws every position independently of the others."""
    check_tensor(indices, "indices", ndim=3, dtype=torch.long)
    check_positive_int(num_codes, "num_codes")
    if indices.min() < 0 or indices.max() >= num_codes:
        raise ValueError(f"indices must lie in [0, {num_codes})")
    onehot = F.one_hot(indices, num_codes).double()  # (N, H, W, K)
    return onehot.mean(0)


def sample_independent_prior(
    probs: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` grids of codes ``(n, H, W)``, each position drawn from its own row of
    ``probs`` ``(H, W, K)``, independently."""
    check_tensor(probs, "probs", ndim=3, floating=True)
    check_positive_int(n, "n")
    H, W, K = probs.shape
    flat = probs.reshape(H * W, K)  # (HW, K)
    draws = torch.multinomial(flat, n, replacement=True, generator=generator)  # (HW, n)
    return draws.T.reshape(n, H, W)
