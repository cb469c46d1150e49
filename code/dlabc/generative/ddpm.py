r"""Denoising diffusion: the forward process in closed form, the DDPM reverse step, the
DDIM step, the noise-prediction loss, a small time-conditioned U-Net, and samplers.

Chapter: ``book/generative/ddpm.md``.

References:
- Sohl-Dickstein, Weiss, Maheswaranathan & Ganguli (2015), *Deep Unsupervised Learning
  using Nonequilibrium Thermodynamics*, ICML (diffusion as a generative model).
- Ho, Jain & Abbeel (2020), *Denoising Diffusion Probabilistic Models*, NeurIPS (the
  linear schedule, the posterior $q(x_{t-1} \mid x_t, x_0)$, the $\epsilon$-prediction
  loss, the ancestral sampler).
- Song, Meng & Ermon (2021), *Denoising Diffusion Implicit Models*, ICLR (the DDIM step
  with its $\eta$, sampling on a subsequence of the time steps).
- Nichol & Dhariwal (2021), *Improved Denoising Diffusion Probabilistic Models*, ICML
  (the cosine schedule; respacing the DDPM sampler to fewer steps).

Conventions, those of Ho et al.'s code and of ``diffusers``: the time index ``t`` runs
over $0, \dots, T-1$ and index ``t`` holds the paper's $\beta_{t+1}$, so
``alpha_bars[t]`` is the paper's $\bar\alpha_{t+1}$; index $-1$ stands for clean
data ($\bar\alpha = 1$). Data lives in $[-1, 1]$. Everything works on tensors of any
shape ``(B, ...)``: images ``(B, C, H, W)``, latents, vectors. A noise predictor is any
callable ``eps_model(x_t, t, **model_kwargs)`` with ``t`` a ``(B,)`` int64 tensor that
returns a tensor of the shape of ``x_t`` (pass class labels through ``model_kwargs``;
:func:`diffusion_loss` and :func:`sample` hand them on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlabc import train
from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.cnn.unet import DoubleConv

__all__ = [
    "linear_betas",
    "cosine_betas",
    "NoiseSchedule",
    "q_sample",
    "q_step",
    "q_posterior",
    "predict_x0",
    "ddpm_step",
    "ddim_step",
    "spaced_timesteps",
    "diffusion_loss",
    "sample",
    "timestep_embedding",
    "DiffusionUNet",
    "train_ddpm",
    "generate_digits",
]

EpsModel = Callable[..., torch.Tensor]


# ---------------------------------------------------------------- the noise schedule


def linear_betas(
    T: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Ho et al.'s schedule: $\beta_1, \dots, \beta_T$ evenly spaced from
    ``beta_start`` to ``beta_end``, a tensor ``(T,)``. The paper's values are for
    $T = 1000$; with fewer steps, scale both by $1000 / T$ to keep $\bar\alpha_T$ near
    zero."""
    check_positive_int(T, "T")
    check_number(beta_start, "beta_start", low=0, high=1, low_open=True, high_open=True)
    check_number(beta_end, "beta_end", low=beta_start, high=1, high_open=True)
    return torch.linspace(beta_start, beta_end, T, dtype=dtype)


def cosine_betas(
    T: int,
    s: float = 0.008,
    max_beta: float = 0.999,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Nichol & Dhariwal's schedule: $\bar\alpha(t) = f(t)/f(0)$ with
    $f(t) = \cos^2\big(\frac{t/T + s}{1 + s}\frac{\pi}{2}\big)$, and
    $\beta_t = \min(1 - \bar\alpha(t)/\bar\alpha(t-1), \beta_{\max})$, ``(T,)``."""
    check_positive_int(T, "T")
    check_number(s, "s", low=0)
    check_number(max_beta, "max_beta", low=0, high=1, low_open=True, high_open=True)

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(t + 1) / f(t), max_beta) for t in range(T)]
    return torch.tensor(betas, dtype=dtype)


class NoiseSchedule:
    r"""$\beta_t$ and what follows from it: $\alpha_t = 1 - \beta_t$ and
    $\bar\alpha_t = \prod_{s \le t} \alpha_s$, all ``(T,)`` in the dtype of ``betas``.

    ``alpha_bar(t)`` reads $\bar\alpha$ at a time index, a Python int or a ``(B,)``
    tensor, with $\bar\alpha = 1$ at index $-1$ (the clean data).
    """

    def __init__(self, betas: torch.Tensor) -> None:
        check_tensor(betas, "betas", ndim=1, floating=True)
        if len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty tensor of values in (0, 1)")
        self.betas = betas
        self.alphas = 1 - betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)

    @property
    def T(self) -> int:
        """The number of diffusion steps."""
        return len(self.betas)

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        r"""$\bar\alpha$ at index ``t`` (1 at ``t = -1``): 0-dim, or ``(B,)``."""
        if isinstance(t, int):
            return self.alpha_bars[t] if t >= 0 else self.alpha_bars.new_tensor(1.0)
        padded = torch.cat([self.alpha_bars.new_ones(1), self.alpha_bars])
        return padded[t + 1]

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule on ``device``."""
        return NoiseSchedule(self.betas.to(device))


def _check_schedule(schedule: object) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            f"schedule must be a NoiseSchedule, got {type(schedule).__name__}"
        )


def _check_time(t: object, schedule: NoiseSchedule, name: str = "t", low: int = 0):
    """``t`` is an int or an int64 tensor of indices in ``low..T-1`` (values: CPU)."""
    if isinstance(t, torch.Tensor):
        check_tensor(t, name, dtype=torch.int64)
        if t.device.type == "cpu" and t.numel():
            values = (int(t.min()), int(t.max()))
        else:
            return
    elif isinstance(t, int) and not isinstance(t, bool):
        values = (t, t)
    else:
        raise TypeError(f"{name} must be an int or an int64 tensor, got {t!r}")
    if values[0] < low or values[1] >= schedule.T:
        raise ValueError(
            f"{name} must lie in {low}..{schedule.T - 1} (T={schedule.T}), got {t}"
        )


def _check_like(x: object, name: str, like: torch.Tensor, like_name: str) -> None:
    check_tensor(x, name, floating=True)
    if x.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, "
            f"got {tuple(x.shape)}"
        )


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``(B,)`` (or 0-dim) coefficient shaped to broadcast over ``x`` ``(B, ...)``."""
    return values.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# ---------------------------------------------------------------- the forward process


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    r"""A draw of $x_t \sim q(x_t \mid x_0)$: $\sqrt{\bar\alpha_t}\,x_0 +
    \sqrt{1 - \bar\alpha_t}\,\epsilon$, for ``x0`` ``(B, ...)``, ``t`` ``(B,)`` and
    standard normal ``noise`` of the shape of ``x0``."""
    _check_schedule(schedule)
    check_tensor(x0, "x0", floating=True)
    _check_time(t, schedule)
    if not isinstance(t, torch.Tensor) or t.shape != x0.shape[:1]:
        raise ValueError(f"t must be a (B,) tensor with B = {len(x0)}, got {t!r}")
    _check_like(noise, "noise", x0, "x0")
    return _q_sample(schedule, x0, t, noise)


def _q_sample(schedule, x0, t, noise):
    """The closed form of the forward process (eq-ddpm-marginal)."""
    alpha_bar = _per_sample(schedule.alpha_bar(t), x0)  # (B, 1, ...)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def q_step(
    schedule: NoiseSchedule, x_prev: torch.Tensor, t: int, noise: torch.Tensor
) -> torch.Tensor:
    r"""One step of the forward chain, $x_t = \sqrt{1 - \beta_t}\,x_{t-1} +
    \sqrt{\beta_t}\,\epsilon$: what :func:`q_sample` jumps over in one go."""
    _check_schedule(schedule)
    check_tensor(x_prev, "x_prev", floating=True)
    _check_time(t, schedule)
    _check_like(noise, "noise", x_prev, "x_prev")
    beta = schedule.betas[t]
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise


def q_posterior(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean ``(B, ...)`` and variance (0-dim) of $q(x_{t'} \mid x_t, x_0)$, the
    step back from ``t`` to ``t_prev`` ($t' = t - 1$ by default; any earlier index,
    down to $-1$, for a respaced sampler)."""
    _check_schedule(schedule)
    check_tensor(x0, "x0", floating=True)
    _check_like(x_t, "x_t", x0, "x0")
    t_prev = _check_pair(t, t_prev, schedule)
    return _q_posterior(schedule, x0, x_t, t, t_prev)


def _check_pair(t: object, t_prev: object, schedule: NoiseSchedule) -> int:
    if isinstance(t, torch.Tensor):
        raise TypeError("t must be an int here (one time step for the whole batch)")
    _check_time(t, schedule)
    t_prev = t - 1 if t_prev is None else t_prev
    if isinstance(t_prev, bool) or not isinstance(t_prev, int):
        raise TypeError(f"t_prev must be an int, got {t_prev!r}")
    if not -1 <= t_prev < t:
        raise ValueError(f"t_prev must lie in -1..t-1 = {t - 1}, got {t_prev}")
    return t_prev


def _q_posterior(schedule, x0, x_t, t, t_prev):
    """The Gaussian of one step back given the clean data (eq-ddpm-posterior)."""
    alpha_bar, alpha_bar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    alpha = alpha_bar / alpha_bar_prev  # α_t of the (respaced) step
    beta = 1 - alpha
    mean = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)) * x0 + (
        alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    ) * x_t
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta  # β̃_t
    return mean, variance


# ---------------------------------------------------------------- the reverse steps


def predict_x0(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: int, eps: torch.Tensor
) -> torch.Tensor:
    r"""The clean data that ``eps`` implies: $\hat x_0 = (x_t - \sqrt{1 -
    \bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}$, eq-ddpm-marginal solved for
    $x_0$."""
    _check_schedule(schedule)
    check_tensor(x_t, "x_t", floating=True)
    _check_like(eps, "eps", x_t, "x_t")
    _check_time(t, schedule)
    return _predict_x0(schedule, x_t, t, eps)


def _predict_x0(schedule, x_t, t, eps):
    alpha_bar = schedule.alpha_bar(t)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def ddpm_step(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    noise: torch.Tensor,
    t_prev: int | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    r"""One step of DDPM's ancestral sampler, $x_{t'} \sim \mathcal N(\tilde\mu(\hat
    x_0, x_t), \tilde\beta_t I)$, given the predicted noise ``eps`` and standard normal
    ``noise``, both of the shape of ``x_t``. ``t_prev`` defaults to $t - 1$; an earlier
    index gives the respaced sampler of Nichol & Dhariwal. With ``clip_x0`` the
    predicted $\hat x_0$ is clipped to $[-1, 1]$ first (as in Ho et al.'s code and
    ``diffusers``)."""
    _check_schedule(schedule)
    check_tensor(x_t, "x_t", floating=True)
    _check_like(eps, "eps", x_t, "x_t")
    _check_like(noise, "noise", x_t, "x_t")
    t_prev = _check_pair(t, t_prev, schedule)
    return _ddpm_step(schedule, eps, x_t, t, t_prev, noise, clip_x0)


def _ddpm_step(schedule, eps, x_t, t, t_prev, noise, clip_x0):
    """x_{t'} = μ̃(x̂_0, x_t) + σ_t z with σ_t² = β̃_t (eq-ddpm-step)."""
    x0 = _predict_x0(schedule, x_t, t, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean, variance = _q_posterior(schedule, x0, x_t, t, t_prev)
    return mean + variance.sqrt() * noise  # β̃ = 0 on the last step: no noise


def ddim_step(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    r"""One DDIM step from index ``t`` to ``t_prev`` (any earlier index, $-1$ for the
    clean data). $\eta = 0$ is deterministic; $\eta = 1$ has DDPM's variance, and
    without clipping equals :func:`ddpm_step`. ``noise`` (standard normal, the shape
    of ``x_t``) is needed when $\eta > 0$."""
    _check_schedule(schedule)
    check_tensor(x_t, "x_t", floating=True)
    _check_like(eps, "eps", x_t, "x_t")
    t_prev = _check_pair(t, t_prev, schedule)
    check_number(eta, "eta", low=0)
    if eta > 0 and noise is None:
        raise ValueError("noise is needed when eta > 0")
    if noise is not None:
        _check_like(noise, "noise", x_t, "x_t")
    return _ddim_step(schedule, eps, x_t, t, t_prev, eta, noise, clip_x0)


def _ddim_step(schedule, eps, x_t, t, t_prev, eta, noise, clip_x0):
    """x_{t'} = √ᾱ' x̂_0 + √(1 - ᾱ' - σ²) ε̂ + σ z (eq-ddim-step)."""
    alpha_bar, alpha_bar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    x0 = _predict_x0(schedule, x_t, t, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    # σ² = η² β̃: the variance of DDPM's step, scaled by η²
    sigma = (
        eta
        * (
            (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        ).sqrt()
    )
    x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def spaced_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` time indices from ``T - 1`` down, evenly spaced (``diffusers``'
    "trailing" spacing): the subsequence a sampler visits, e.g. ``[999, 899, ..., 99]``
    for ``T = 1000`` and 10 steps. The step after the last goes to $-1$."""
    check_positive_int(T, "T")
    check_positive_int(steps, "steps")
    if steps > T:
        raise ValueError(f"steps must be at most T = {T}, got {steps}")
    ratio = T / steps
    return [round(T - k * ratio) - 1 for k in range(steps)]


# ---------------------------------------------------------------- training and sampling


def diffusion_loss(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    **model_kwargs: object,
) -> torch.Tensor:
    r"""Ho et al.'s simplified loss on a batch ``x0`` ``(B, ...)``:
    $\lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2$ averaged over the batch and
    the dimensions, with $t$ uniform on $0..T-1$ and $\epsilon \sim \mathcal N(0, I)$
    drawn from ``generator``."""
    if not callable(eps_model):
        raise TypeError(f"eps_model must be callable, got {eps_model!r}")
    _check_schedule(schedule)
    check_tensor(x0, "x0", floating=True)
    if x0.dim() < 2 or len(x0) == 0:
        raise ValueError(
            f"x0 must be a non-empty batch (B, ...), got {tuple(x0.shape)}"
        )
    return _diffusion_loss(eps_model, schedule, x0, generator, **model_kwargs)


def _diffusion_loss(eps_model, schedule, x0, generator, **model_kwargs):
    """Noise the batch at random steps, predict the noise, compare (eq-ddpm-loss)."""
    t = torch.randint(schedule.T, (len(x0),), generator=generator)  # (B,)
    noise = torch.randn(x0.shape, generator=generator).to(x0)  # (B, ...)
    t = t.to(x0.device)
    x_t = _q_sample(schedule, x0, t, noise)
    return F.mse_loss(eps_model(x_t, t, **model_kwargs), noise)


@torch.no_grad()
def sample(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    steps: int | None = None,
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_x0: bool = True,
    batch_size: int | None = 128,
    **model_kwargs: object,
) -> torch.Tensor:
    r"""Draw ``shape[0]`` samples of shape ``shape`` from pure noise.

    ``sampler="ddpm"``: the ancestral sampler, all $T$ steps by default, or ``steps``
    respaced steps; ``sampler="ddim"``: DDIM with ``eta`` over ``steps`` spaced steps
    ($T$ by default). ``eps_model`` is put in evaluation mode if it is a module. The
    noise comes from ``generator`` on the CPU, so a seed gives the same samples on
    every device. The samples are denoised ``batch_size`` at a time (all at once with
    ``None``): on a CPU, small batches stay in the cache and run twice as fast per
    sample. Tensors in ``model_kwargs`` with ``shape[0]`` rows are split the same way.
    """
    if not callable(eps_model):
        raise TypeError(f"eps_model must be callable, got {eps_model!r}")
    _check_schedule(schedule)
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 2:
        raise ValueError(
            f"shape must be a sequence (B, ...) of length >= 2, got {shape!r}"
        )
    for size in shape:
        check_positive_int(size, "every size in shape")
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    steps = schedule.T if steps is None else steps
    timesteps = spaced_timesteps(schedule.T, steps)
    check_number(eta, "eta", low=0)
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if isinstance(eps_model, nn.Module):
        eps_model.eval()
    n, chunk = shape[0], batch_size or shape[0]
    schedule, device = schedule.to(device), torch.device(device)
    parts = []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        kwargs = {
            k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and len(v) == n else v
            for k, v in model_kwargs.items()
        }
        size = (rows.stop - rows.start, *shape[1:])
        parts.append(
            _sample(
                eps_model,
                schedule,
                size,
                timesteps,
                sampler,
                eta,
                generator,
                device,
                clip_x0,
                **kwargs,
            )
        )
    return torch.cat(parts)


def _sample(
    eps_model,
    schedule,
    shape,
    timesteps,
    sampler,
    eta,
    generator,
    device,
    clip_x0,
    **model_kwargs,
):
    """Start from x_T ~ N(0, I) and step back through ``timesteps`` to index -1."""
    x = torch.randn(shape, generator=generator).to(device)  # x_T
    for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
        t_batch = torch.full((shape[0],), t, dtype=torch.int64, device=device)  # (B,)
        eps = eps_model(x, t_batch, **model_kwargs)
        noise = torch.randn(shape, generator=generator).to(device)
        if sampler == "ddpm":
            x = _ddpm_step(schedule, eps, x, t, t_prev, noise, clip_x0)
        else:
            x = _ddim_step(schedule, eps, x, t, t_prev, eta, noise, clip_x0)
    return x


# ---------------------------------------------------------------- the noise predictor


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    r"""Sinusoidal embedding ``(B, dim)`` of time indices ``t`` ``(B,)``, as in Ho et
    al.'s code: $[\sin(t\,\omega_k), \cos(t\,\omega_k)]_{k=0}^{d/2-1}$ with
    $\omega_k = P^{-k/(d/2 - 1)}$ and $P$ = ``max_period``."""
    check_tensor(t, "t", ndim=1)
    check_positive_int(dim, "dim")
    if dim < 4 or dim % 2:
        raise ValueError(f"dim must be even and at least 4, got {dim}")
    check_number(max_period, "max_period", low=1, low_open=True)
    return _timestep_embedding(t, dim, max_period)


def _timestep_embedding(t, dim, max_period=10000.0):
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    omega = torch.exp(-math.log(max_period) * k / (half - 1))  # 1 ... 1/P
    angles = t.float()[:, None] * omega[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)


class DiffusionUNet(nn.Module):
    r"""A small noise predictor $\epsilon_\theta(x_t, t)$: ``(B, C, H, W)`` and ``(B,)``
    to ``(B, C, H, W)``.

    The U-Net of the CNN part (``dlabc.cnn.unet``: :class:`DoubleConv` levels,
    max-pooling down, transposed convolutions up, skip connections) with the time step
    told to every level: the sinusoidal embedding of $t$ goes through a two-layer MLP,
    and each level adds its own linear projection of it, one number per channel, to its
    feature maps. ``H`` and ``W`` must be divisible by ``2**depth``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        depth: int = 2,
        time_dim: int = 32,
    ) -> None:
        super().__init__()
        for name, value in dict(
            in_channels=in_channels, base_channels=base_channels, depth=depth
        ).items():
            check_positive_int(value, name)
        if check_positive_int(time_dim, "time_dim") < 4 or time_dim % 2:
            raise ValueError(f"time_dim must be even and at least 4, got {time_dim}")
        self.time_dim = time_dim
        c = [base_channels * 2**level for level in range(depth + 1)]  # c_0 ... c_D
        width = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if level == 0 else c[level - 1], c[level])
            for level in range(depth)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c[depth - 1], c[depth])
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(c[level + 1], c[level], 2, stride=2)
            for level in range(depth)
        )
        self.decoder = nn.ModuleList(
            DoubleConv(2 * c[level], c[level]) for level in range(depth)
        )
        # one projection of the time embedding per block: encoder, bottleneck, decoder
        self.time_encoder = nn.ModuleList(nn.Linear(width, c[l]) for l in range(depth))
        self.time_bottleneck = nn.Linear(width, c[depth])
        self.time_decoder = nn.ModuleList(nn.Linear(width, c[l]) for l in range(depth))
        self.head = nn.Conv2d(c[0], in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(_timestep_embedding(t, self.time_dim))  # (B, 4 c_0)

        def add_time(h, projection):  # (B, c, H', W') + (B, c, 1, 1)
            return h + projection(emb)[:, :, None, None]

        features = []  # e_0 ... e_{D-1}, for the skip connections
        for block, projection in zip(self.encoder, self.time_encoder, strict=True):
            x = add_time(block(x), projection)  # (B, c_l, H / 2^l, W / 2^l)
            features.append(x)
            x = self.pool(x)
        x = add_time(self.bottleneck(x), self.time_bottleneck)  # (B, c_D, ...)
        for level in reversed(range(len(self.decoder))):
            x = torch.cat(
                [self.up[level](x), features[level]], dim=1
            )  # (B, 2 c_l, ...)
            x = add_time(self.decoder[level](x), self.time_decoder[level])
        return self.head(x)  # (B, C, H, W): the predicted noise


# ---------------------------------------------------------------- the chapter's recipe


def train_ddpm(
    model: nn.Module,
    schedule: NoiseSchedule,
    data: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 5e-3,
    seed: int = 0,
    decay_share: float = 0.3,
) -> train.History:
    r"""Train the noise predictor ``model`` on ``data`` ``(N, ...)`` (already in
    $[-1, 1]$, on the model's device) with :func:`diffusion_loss`, Adam and
    ``batch_size`` examples per step for ``steps`` steps, at the learning rate ``lr``
    and then, over the last ``decay_share`` of the steps, falling linearly to 0. The
    mini-batches, time steps and noises come from ``seed``. Returns the
    :class:`dlabc.train.History` (the loss of every step)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_schedule(schedule)
    check_tensor(data, "data", floating=True)
    if data.dim() < 2 or len(data) == 0:
        raise ValueError(
            f"data must be a non-empty batch (N, ...), got {tuple(data.shape)}"
        )
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    check_number(decay_share, "decay_share", low=0, high=1, low_open=True)
    generator = torch.Generator().manual_seed(seed)
    schedule = schedule.to(data.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_fn(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        return _diffusion_loss(model, schedule, data[index.to(data.device)], generator)

    def lr_schedule(step: int) -> float:  # constant, then linearly down to 0
        return lr * min(1.0, (steps - step) / (decay_share * steps))

    batches = train.endless_minibatches(len(data), batch_size, generator)
    return train.train_steps(
        model, optimizer, batches, loss_fn, steps=steps, lr_schedule=lr_schedule
    )


def generate_digits(
    steps: int,
    n: int = 1000,
    seed: int = 0,
    *,
    sampling_steps: int = 20,
    sampler: str = "ddim",
    eta: float = 0.0,
    T: int = 1000,
    base_channels: int = 8,
    batch_size: int = 64,
    lr: float = 5e-3,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    r"""The part's comparison contract: train the chapter's digit diffusion model
    from scratch on ``digits("train")`` for ``steps`` Adam steps, then sample ``n``
    digits ``(n, 1, 28, 28)`` float32 in $[0, 1]$ on the CPU.

    One training step (batch 64, ``base_channels=8``, one CPU thread) costs about
    0.06 s; sampling costs ``sampling_steps`` network evaluations per digit, about
    0.3 ms each on one CPU thread (so 1,000 digits with 20 DDIM steps take about 6 s).
    Options: ``sampling_steps`` (20), ``sampler`` (``"ddim"`` or ``"ddpm"``), ``eta``
    (0, DDIM's noise), ``T`` (1000, with the linear schedule scaled by $1000/T$),
    ``base_channels`` (8), ``batch_size`` (64), ``lr`` (5e-3), ``device``.
    """
    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    check_positive_int(T, "T")
    check_positive_int(sampling_steps, "sampling_steps")
    if sampling_steps > T:
        raise ValueError(
            f"sampling_steps must be at most T = {T}, got {sampling_steps}"
        )
    from dlabc.generative.yardstick import digits

    torch.manual_seed(seed)
    images, _ = digits("train")
    data = (2 * images - 1).to(device)  # [0, 1] -> [-1, 1]
    schedule = NoiseSchedule(linear_betas(T, 0.1 / T, 20 / T))
    model = DiffusionUNet(1, base_channels).to(device)
    train_ddpm(model, schedule, data, steps, batch_size, lr, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = sample(
        model, schedule, (n, 1, 28, 28), sampling_steps, sampler, eta, generator, device
    )
    return ((x + 1) / 2).clamp(0, 1).float().cpu()
