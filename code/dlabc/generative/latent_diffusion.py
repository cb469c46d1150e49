r"""Latent diffusion with classifier-free guidance: an autoencoder compresses digits
to a small code, a diffusion model learns the codes, and a class label steers the
sampler.

Chapter: ``book/generative/latent_diffusion.md``.

References:
- Rombach, Blattmann, Lorenz, Esser & Ommer (2022), *High-Resolution Image Synthesis
  with Latent Diffusion Models*, CVPR (train an autoencoder, freeze it, diffuse in its
  latent space, rescale the latents to unit variance, decode the samples).
- Ho & Salimans (2022), *Classifier-Free Diffusion Guidance*, arXiv:2207.12598 (one
  network for $\epsilon_\theta(z, c)$ and $\epsilon_\theta(z, \varnothing)$ by dropping
  the label in training; the guided noise $(1 + w)\,\epsilon_\theta(z, c) -
  w\,\epsilon_\theta(z, \varnothing)$).
- Dhariwal & Nichol (2021), *Diffusion Models Beat GANs on Image Synthesis*, NeurIPS
  (classifier guidance, which classifier-free guidance replaces).

The diffusion machinery (schedule, loss, DDIM sampler) is the DDPM chapter's,
``dlabc.generative.ddpm``; this module adds the autoencoder, the label-conditioned
denoiser, label dropout and the guided noise prediction. Shapes: ``B`` images
``(B, 1, 28, 28)`` in $[0, 1]$, latent codes ``(B, d)``, labels ``(B,)`` int64 in
``0..9``, with ``10`` the null label $\varnothing$.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dlabc import train
from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.generative.ddpm import (
    NoiseSchedule,
    _diffusion_loss,
    _timestep_embedding,
    linear_betas,
    sample,
)

__all__ = [
    "Autoencoder",
    "train_autoencoder",
    "latent_scale",
    "LatentDenoiser",
    "drop_labels",
    "guided_eps",
    "train_denoiser",
    "sample_digits",
    "generate_digits",
]


# ---------------------------------------------------------------- the autoencoder


class Autoencoder(nn.Module):
    r"""A small deterministic autoencoder: the encoder $\mathcal E$ maps an image
    ``(B, 1, 28, 28)`` to a code $z$ ``(B, d)``, the decoder $\mathcal D$ maps a code
    back to pixel logits ``(B, 1, 28, 28)``; one hidden layer of ``hidden`` units
    each."""

    def __init__(self, latent_dim: int = 16, hidden: int = 192) -> None:
        super().__init__()
        check_positive_int(latent_dim, "latent_dim")
        check_positive_int(hidden, "hidden")
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Flatten(),  # (B, 784)
            nn.Linear(784, hidden),
            nn.SiLU(),
            nn.Linear(hidden, latent_dim),  # (B, d)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 784),
            nn.Unflatten(1, (1, 28, 28)),  # (B, 1, 28, 28)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code $z = \\mathcal E(x)$ ``(B, d)`` of images ``(B, 1, 28, 28)``."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The image $\\mathcal D(z)$ ``(B, 1, 28, 28)`` in $[0, 1]$ of codes
        ``(B, d)``."""
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction's logits ``(B, 1, 28, 28)``."""
        return self.decoder(self.encoder(x))


def _check_images(images: object, name: str = "images") -> torch.Tensor:
    check_tensor(images, name, ndim=4, floating=True)
    if images.shape[1:] != (1, 28, 28) or len(images) == 0:
        raise ValueError(
            f"{name} must have shape (N, 1, 28, 28) with N > 0, got {tuple(images.shape)}"
        )
    return images


def train_autoencoder(
    autoencoder: Autoencoder,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> train.History:
    r"""Train ``autoencoder`` on ``images`` ``(N, 1, 28, 28)`` in $[0, 1]$ to
    reconstruct them, with the binary cross-entropy of every pixel, Adam and a learning
    rate that falls from ``lr`` to 0 along a half cosine. Returns the
    :class:`dlabc.train.History`."""
    if not isinstance(autoencoder, Autoencoder):
        raise TypeError(
            f"autoencoder must be an Autoencoder, got {type(autoencoder).__name__}"
        )
    _check_images(images)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)

    def loss_fn(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        x = images[index.to(images.device)]
        return F.binary_cross_entropy_with_logits(model(x), x)

    def cosine_decay(step: int) -> float:
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))

    batches = train.endless_minibatches(len(images), batch_size, generator)
    history = train.train_steps(
        autoencoder, optimizer, batches, loss_fn, steps=steps, lr_schedule=cosine_decay
    )
    autoencoder.eval().requires_grad_(False)  # frozen from now on
    return history


@torch.no_grad()
def latent_scale(codes: torch.Tensor) -> float:
    r"""Rombach et al.'s scale factor: the standard deviation $\sigma$ of all the
    numbers in ``codes`` ``(N, d)``, so that $z / \sigma$ has unit variance."""
    check_tensor(codes, "codes", ndim=2, floating=True)
    if codes.numel() < 2:
        raise ValueError("codes needs at least two numbers")
    return float(codes.std())


# ---------------------------------------------------------------- the denoiser


class LatentDenoiser(nn.Module):
    r"""The noise predictor $\epsilon_\theta(z_t, t, c)$ on codes: ``(B, d)``, ``(B,)``
    time indices and ``(B,)`` labels to ``(B, d)``.

    An MLP with residual blocks. The time step (the sinusoidal embedding of the DDPM
    chapter, through a two-layer MLP) and the label (a learned embedding, one row per
    class plus one for the null label $\varnothing$, index ``num_classes``) are added
    into one conditioning vector, which every block adds to its input.
    """

    def __init__(
        self,
        latent_dim: int = 16,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        time_dim: int = 32,
    ) -> None:
        super().__init__()
        for name, value in dict(
            latent_dim=latent_dim, num_classes=num_classes, width=width, depth=depth
        ).items():
            check_positive_int(value, name)
        if check_positive_int(time_dim, "time_dim") < 4 or time_dim % 2:
            raise ValueError(f"time_dim must be even and at least 4, got {time_dim}")
        self.time_dim, self.null_label = time_dim, num_classes
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.label_embedding = nn.Embedding(num_classes + 1, width)  # last row: ∅
        self.input = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)
            )
            for _ in range(depth)
        )
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(width, latent_dim))

    def forward(
        self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        time = self.time_mlp(_timestep_embedding(t, self.time_dim))  # (B, width)
        condition = time + self.label_embedding(labels)  # (B, width)
        h = self.input(z)  # (B, width)
        for block in self.blocks:
            h = h + block(h + condition)  # a residual block, told t and c
        return self.output(h)  # (B, d): the predicted noise


def drop_labels(
    labels: torch.Tensor,
    p_uncond: float,
    null_label: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``labels`` ``(B,)`` with each one replaced by ``null_label`` with probability
    ``p_uncond``: the label dropout that trains $\epsilon_\theta(z, \varnothing)$ in
    the same network as $\epsilon_\theta(z, c)$."""
    check_tensor(labels, "labels", ndim=1, dtype=torch.int64)
    check_number(p_uncond, "p_uncond", low=0, high=1)
    if isinstance(null_label, bool) or not isinstance(null_label, int):
        raise TypeError(f"null_label must be an int, got {null_label!r}")
    return _drop_labels(labels, p_uncond, null_label, generator)


def _drop_labels(labels, p_uncond, null_label, generator=None):
    drop = torch.rand(labels.shape, generator=generator) < p_uncond  # (B,), CPU
    return torch.where(drop.to(labels.device), null_label, labels)


def guided_eps(
    denoiser: LatentDenoiser,
    z: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    w: float = 1.0,
) -> torch.Tensor:
    r"""Ho & Salimans' guided noise prediction ``(B, d)``,
    $\tilde\epsilon = (1 + w)\,\epsilon_\theta(z_t, c) - w\,\epsilon_\theta(z_t,
    \varnothing)$, for codes ``z`` ``(B, d)``, time indices ``t`` and ``labels``
    ``(B,)``. $w = 0$ is the plain conditional model; in the "guidance scale" of
    ``diffusers`` and Stable Diffusion, $\gamma = 1 + w$."""
    if not isinstance(denoiser, LatentDenoiser):
        raise TypeError(
            f"denoiser must be a LatentDenoiser, got {type(denoiser).__name__}"
        )
    check_tensor(z, "z", ndim=2, floating=True)
    check_tensor(t, "t", ndim=1, dtype=torch.int64)
    check_tensor(labels, "labels", ndim=1, dtype=torch.int64)
    if not len(z) == len(t) == len(labels):
        raise ValueError(
            f"z, t and labels must have the same length, got {len(z)}, {len(t)}, "
            f"{len(labels)}"
        )
    check_number(w, "w", low=0)
    return _guided_eps(denoiser, z, t, labels, w)


def _guided_eps(denoiser, z, t, labels, w):
    """eq-ld-cfg: one batched call for the conditional and the unconditional noise."""
    if w == 0:  # the conditional model alone: one evaluation, not two
        return denoiser(z, t, labels)
    null = torch.full_like(labels, denoiser.null_label)
    eps = denoiser(torch.cat([z, z]), torch.cat([t, t]), torch.cat([labels, null]))
    eps_c, eps_u = eps.chunk(2)  # (B, d) each
    return (1 + w) * eps_c - w * eps_u


def train_denoiser(
    denoiser: LatentDenoiser,
    schedule: NoiseSchedule,
    codes: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    p_uncond: float = 0.2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> train.History:
    r"""Train ``denoiser`` on the scaled ``codes`` ``(N, d)`` of labelled images
    (``labels`` ``(N,)``) with the DDPM loss, each label dropped to $\varnothing$ with
    probability ``p_uncond``; Adam, ``batch_size`` codes per step, the learning rate
    falling from ``lr`` to 0 along a half cosine. Returns the
    :class:`dlabc.train.History`."""
    if not isinstance(denoiser, LatentDenoiser):
        raise TypeError(
            f"denoiser must be a LatentDenoiser, got {type(denoiser).__name__}"
        )
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            f"schedule must be a NoiseSchedule, got {type(schedule).__name__}"
        )
    check_tensor(codes, "codes", ndim=2, floating=True)
    check_tensor(labels, "labels", ndim=1, dtype=torch.int64)
    if len(codes) != len(labels) or len(codes) == 0:
        raise ValueError(
            f"codes and labels must be non-empty and as long, got {len(codes)} and "
            f"{len(labels)}"
        )
    check_positive_int(steps, "steps")
    check_number(p_uncond, "p_uncond", low=0, high=1)
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    return _train_denoiser(
        denoiser, schedule, codes, labels, steps, p_uncond, batch_size, lr, seed
    )


def _train_denoiser(
    denoiser, schedule, codes, labels, steps, p_uncond, batch_size, lr, seed
):
    """The DDPM loss on codes, with the label dropped to ∅ with probability p_uncond."""
    generator = torch.Generator().manual_seed(seed)
    schedule = schedule.to(codes.device)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)

    def loss_fn(model, index):
        index = index.to(codes.device)
        c = _drop_labels(labels[index], p_uncond, model.null_label, generator)
        return _diffusion_loss(model, schedule, codes[index], generator, labels=c)

    def cosine_decay(step):
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))

    batches = train.endless_minibatches(len(codes), batch_size, generator)
    return train.train_steps(
        denoiser, optimizer, batches, loss_fn, steps=steps, lr_schedule=cosine_decay
    )


def sample_digits(
    autoencoder: Autoencoder,
    denoiser: LatentDenoiser,
    schedule: NoiseSchedule,
    scale: float,
    labels: torch.Tensor,
    w: float = 1.0,
    sampling_steps: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""One digit ``(B, 1, 28, 28)`` in $[0, 1]$ per label of ``labels`` ``(B,)``: DDIM
    ($\eta = 0$, ``sampling_steps`` steps) on codes with the guided noise of
    :func:`guided_eps`, then $x = \mathcal D(\sigma z_0)$. The noise comes from
    ``generator`` on the CPU; everything runs on the denoiser's device."""
    if not isinstance(autoencoder, Autoencoder):
        raise TypeError(
            f"autoencoder must be an Autoencoder, got {type(autoencoder).__name__}"
        )
    if not isinstance(denoiser, LatentDenoiser):
        raise TypeError(
            f"denoiser must be a LatentDenoiser, got {type(denoiser).__name__}"
        )
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            f"schedule must be a NoiseSchedule, got {type(schedule).__name__}"
        )
    check_number(scale, "scale", low=0, low_open=True)
    check_tensor(labels, "labels", ndim=1, dtype=torch.int64)
    if len(labels) == 0:
        raise ValueError("labels must not be empty")
    check_number(w, "w", low=0)
    check_positive_int(sampling_steps, "sampling_steps")
    if sampling_steps > schedule.T:
        raise ValueError(
            f"sampling_steps must be at most T = {schedule.T}, got {sampling_steps}"
        )
    return _sample_digits(
        autoencoder, denoiser, schedule, scale, labels, w, sampling_steps, generator
    )


def _sample_digits(
    autoencoder, denoiser, schedule, scale, labels, w, sampling_steps, generator
):
    """Guided DDIM in the latent space, then one pass of the decoder."""
    device = next(denoiser.parameters()).device
    denoiser.eval()
    shape = (len(labels), denoiser.input.in_features)  # (B, d)
    eps_model = functools.partial(_guided_eps, denoiser)
    z0 = sample(  # the DDPM chapter's sampler, with the guided noise (eq-ld-cfg)
        eps_model,
        schedule,
        shape,
        sampling_steps,
        "ddim",
        0.0,
        generator,
        device,
        clip_x0=False,  # codes are not confined to [-1, 1] as pixels are
        batch_size=None,
        labels=labels.to(device),
        w=w,
    )
    with torch.no_grad():
        return autoencoder.decode(scale * z0)  # (B, 1, 28, 28), undoing z / σ


# ---------------------------------------------------------------- the comparison


def generate_digits(
    steps: int,
    n: int = 1000,
    seed: int = 0,
    *,
    guidance: float = 2.0,
    autoencoder_share: float = 0.4,
    latent_dim: int = 16,
    sampling_steps: int = 20,
    p_uncond: float = 0.2,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    r"""The part's comparison contract: train the chapter's latent diffusion model from
    scratch on ``digits("train")`` for ``steps`` optimizer steps in all, then sample
    ``n`` digits ``(n, 1, 28, 28)`` float32 in $[0, 1]$ on the CPU, with the labels
    $0, 1, \dots, 9, 0, 1, \dots$ in turn.

    The steps are split: ``round(autoencoder_share * steps)`` (at least one) train the
    autoencoder (batch 128), the rest train the denoiser (batch 128); ``steps`` must be
    at least 2. On one CPU thread a step costs about 3 to 4 ms on average with the
    default share (an autoencoder step about twice a denoiser step). Sampling costs
    ``2 * sampling_steps`` evaluations of the small denoiser per digit (one when
    ``guidance`` is 0) and one pass of the decoder: about 0.2 s for 1,000 digits.
    Options: ``guidance`` ($w$ = 2; 0 is the unguided conditional model),
    ``autoencoder_share`` (0.4), ``latent_dim`` (16), ``sampling_steps`` (20, DDIM
    with $\eta = 0$), ``p_uncond`` (0.2, the label dropout), ``device``.
    """
    check_positive_int(steps, "steps")
    if steps < 2:
        raise ValueError("steps must be at least 2 (autoencoder and denoiser), got 1")
    check_positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    check_number(guidance, "guidance", low=0)
    check_number(autoencoder_share, "autoencoder_share", low=0, high=1, low_open=True)
    from dlabc.generative.yardstick import digits

    ae_steps = min(max(1, round(autoencoder_share * steps)), steps - 1)
    torch.manual_seed(seed)
    images, labels = digits("train")
    images, labels = images.to(device), labels.to(device)
    autoencoder = Autoencoder(latent_dim).to(device)
    train_autoencoder(autoencoder, images, ae_steps, seed=seed)
    with torch.no_grad():
        codes = autoencoder.encode(images)
    scale = latent_scale(codes)
    schedule = NoiseSchedule(linear_betas(1000))
    denoiser = LatentDenoiser(latent_dim).to(device)
    train_denoiser(
        denoiser,
        schedule,
        codes / scale,
        labels,
        steps - ae_steps,
        p_uncond,
        seed=seed + 1,
    )
    wanted = torch.arange(n) % 10
    generator = torch.Generator().manual_seed(seed + 2)
    x = sample_digits(
        autoencoder,
        denoiser,
        schedule,
        scale,
        wanted,
        guidance,
        sampling_steps,
        generator,
    )
    return x.float().clamp(0, 1).cpu()
