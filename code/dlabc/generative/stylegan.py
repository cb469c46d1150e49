r"""StyleGAN on digits: a mapping network, modulated and demodulated convolutions, noise
inputs, style mixing and the truncation trick, in a small StyleGAN2-like generator.

Chapter: ``book/generative/stylegan.md``.

References:
- Karras, Laine & Aila (2019), *A Style-Based Generator Architecture for Generative
  Adversarial Networks*, CVPR (the mapping network $z \mapsto w$, styles injected into
  every layer, per-pixel noise with learned per-channel scales, style mixing, the
  truncation trick in $\mathcal W$).
- Karras, Laine, Aittala, Hellsten, Lehtinen & Aila (2020), *Analyzing and Improving
  the Image Quality of StyleGAN*, CVPR (weight modulation and demodulation instead of
  AdaIN, the output-skip generator, lazy R1 regularization).
- Karras, Aila, Laine & Lehtinen (2018), *Progressive Growing of GANs for Improved
  Quality, Stability, and Variation*, ICLR (pixel normalization, the equalized learning
  rate).
- Mescheder, Geiger & Nowozin (2018), *Which Training Methods for GANs do actually
  Converge?*, ICML (the R1 gradient penalty).

Shapes: ``B`` batch, ``C`` channels, ``H``, ``W`` image size; ``z_dim`` and ``w_dim``
the sizes of the latent and intermediate latent vectors. Images go in and out of the
networks in $[-1, 1]$; :func:`generate_digits` returns them in $[0, 1]$.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.train import endless_minibatches

__all__ = [
    "pixel_norm",
    "EqualLinear",
    "MappingNetwork",
    "modulated_conv2d",
    "ModulatedConv",
    "NoiseInjection",
    "StyledConv",
    "Generator",
    "Discriminator",
    "truncate",
    "mix_styles",
    "d_loss",
    "g_loss",
    "r1_penalty",
    "train_stylegan",
    "generate_digits",
]


# ---------------------------------------------------------------- the mapping network


def pixel_norm(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Scale each row of ``z`` ``(B, D)`` to unit root mean square:
    $z / \sqrt{\frac1D \sum_i z_i^2 + \epsilon}$."""
    check_tensor(z, "z", ndim=2, floating=True)
    return _pixel_norm(z, eps)


def _pixel_norm(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return z * torch.rsqrt(z.square().mean(1, keepdim=True) + eps)


class EqualLinear(nn.Module):
    r"""A linear layer with the equalized learning rate: weights drawn from
    $\mathcal N(0, 1)$ and multiplied by $1/\sqrt{\text{fan-in}}$ at every call, so
    that Adam's steps change every layer at the same relative rate."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0):
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = 1 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class MappingNetwork(nn.Module):
    r"""$f: \mathcal Z \to \mathcal W$, an MLP of ``n_layers`` layers with leaky ReLUs
    on the pixel-normalized latent $z$."""

    def __init__(self, z_dim: int = 32, w_dim: int = 32, n_layers: int = 4):
        super().__init__()
        check_positive_int(n_layers, "n_layers")
        sizes = [z_dim] + [w_dim] * n_layers
        self.layers = nn.ModuleList(
            EqualLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = _pixel_norm(z)  # (B, z_dim), on the sphere of radius sqrt(z_dim)
        for layer in self.layers:
            w = F.leaky_relu(layer(w), 0.2)  # (B, w_dim)
        return w


# ---------------------------------------------------------- the modulated convolution


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    s: torch.Tensor,
    demodulate: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """A convolution whose weights each sample scales by its own style: ``x``
    ``(B, C_in, H, W)``, ``weight`` ``(C_out, C_in, k, k)`` (``k`` odd, same padding),
    ``s`` ``(B, C_in)``; returns ``(B, C_out, H, W)``."""
    check_tensor(x, "x", ndim=4, floating=True)
    check_tensor(weight, "weight", ndim=4, floating=True)
    check_tensor(s, "s", ndim=2, floating=True)
    if weight.shape[1] != x.shape[1] or s.shape != (x.shape[0], x.shape[1]):
        raise ValueError(
            f"weight must have shape (C_out, {x.shape[1]}, k, k) and s shape "
            f"{(x.shape[0], x.shape[1])}, got {tuple(weight.shape)} and {tuple(s.shape)}"
        )
    if weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must be square and odd, got {tuple(weight.shape)}")
    return _modulated_conv2d(x, weight, s, demodulate, eps)


def _modulated_conv2d(x, weight, s, demodulate=True, eps=1e-8):
    B, C_in, H, W = x.shape
    C_out, _, k, _ = weight.shape
    # modulate: w'_ijk = s_i * w_ijk, one weight tensor per sample
    w = weight[None] * s[:, None, :, None, None]  # (B, C_out, C_in, k, k)
    if demodulate:
        # demodulate: w''_ijk = w'_ijk / sqrt(sum_ik w'_ijk^2 + eps)
        sigma_inv = torch.rsqrt(w.square().sum(dim=(2, 3, 4), keepdim=True) + eps)
        w = w * sigma_inv  # (B, C_out, C_in, k, k)
    # the batch becomes groups of one convolution: group b sees sample b's channels
    x = x.reshape(1, B * C_in, H, W)
    w = w.reshape(B * C_out, C_in, k, k)
    y = F.conv2d(x, w, padding=k // 2, groups=B)  # (1, B * C_out, H, W)
    return y.reshape(B, C_out, H, W)


def _modulated_conv2d_unfused(x, weight, s, demodulate=True, eps=1e-8):
    # the same, computed on the activations: conv(s * x) equals conv with s * weight,
    # and sigma_j^2 = sum_i s_i^2 sum_k w_ijk^2 needs no per-sample weights
    y = F.conv2d(x * s[:, :, None, None], weight, padding=weight.shape[-1] // 2)
    if demodulate:
        sigma_sq = s.square() @ weight.square().sum(dim=(2, 3)).T  # (B, C_out)
        y = y * torch.rsqrt(sigma_sq + eps)[:, :, None, None]
    return y  # (B, C_out, H, W)


class ModulatedConv(nn.Module):
    r"""The affine map $A$ from $w$ to the style $s$ (its bias starts at 1, so that
    $s \approx 1$ at first), and a convolution modulated by $s$."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        kernel_size: int = 3,
        demodulate: bool = True,
        fused: bool = True,
    ):
        super().__init__()
        for value, name in ((in_channels, "in_channels"), (kernel_size, "kernel_size")):
            check_positive_int(value, name)
        check_positive_int(out_channels, "out_channels")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.randn(shape))
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)  # equalized lr
        self.demodulate, self.fused = demodulate, fused

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.affine(w)  # (B, C_in): the style
        conv = _modulated_conv2d if self.fused else _modulated_conv2d_unfused
        return conv(x, self.weight * self.scale, s, self.demodulate)


class NoiseInjection(nn.Module):
    """Adds one Gaussian noise image ``(B, 1, H, W)`` to every channel, scaled by a
    learned factor per channel (zero at first)."""

    def __init__(self, channels: int):
        super().__init__()
        check_positive_int(channels, "channels")
        self.strength = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        if noise is None:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device)
        return x + self.strength[None, :, None, None] * noise  # (B, C, H, W)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)


class StyledConv(nn.Module):
    """One layer of the synthesis network: (upsample ×2), modulated 3×3 convolution,
    noise, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, up=False):
        super().__init__()
        self.up = up
        self.conv = ModulatedConv(in_channels, out_channels, w_dim)
        self.noise = NoiseInjection(out_channels)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x, w, noise=None):
        if self.up:
            x = _up(x)
        x = self.noise(self.conv(x, w), noise)  # (B, C_out, H, W)
        # the gain sqrt(2) keeps the variance that the leaky ReLU halves
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * math.sqrt(2)


class ToGray(nn.Module):
    """A modulated 1×1 convolution to one channel, not demodulated (its output is the
    image's brightness, whose scale matters)."""

    def __init__(self, in_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv(in_channels, 1, w_dim, 1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x, w):
        return self.conv(x, w) + self.bias  # (B, 1, H, W)


# ------------------------------------------------------------------ the two networks


class Generator(nn.Module):
    r"""A small StyleGAN2 generator for $28 \times 28$ digits: a learned constant
    $7 \times 7$ input, one styled layer at $7 \times 7$, two at $14 \times 14$ and one
    at $28 \times 28$ (the first layer of each new resolution upsamples ×2), and
    StyleGAN2's output skips: each resolution adds its gray image to the upsampled
    sum of the ones before.

    It consumes ``n_ws = 5`` vectors $w$, one per styled layer, an output sharing its
    $w$ with the next resolution's first layer (as in StyleGAN2): indices 0-1 shape
    the $7 \times 7$ stage, 1-3 the $14 \times 14$ one, 3-4 the full resolution.
    ``w_avg`` is $\bar w$, the mean of $f(z)$, set after training.
    """

    n_ws = 5

    def __init__(
        self,
        z_dim: int = 32,
        w_dim: int = 32,
        channels: tuple[int, int, int] = (32, 16, 8),
        mapping_layers: int = 4,
    ):
        super().__init__()
        check_positive_int(z_dim, "z_dim")
        check_positive_int(w_dim, "w_dim")
        if len(channels) != 3 or not all(
            isinstance(c, int) and c > 0 for c in channels
        ):
            raise ValueError(f"channels must be 3 positive ints, got {channels!r}")
        c7, c14, c28 = channels
        self.z_dim, self.w_dim = z_dim, w_dim
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers)
        self.const = nn.Parameter(torch.randn(1, c7, 7, 7))
        self.convs = nn.ModuleList(
            [
                StyledConv(c7, c7, w_dim),  # 7x7
                StyledConv(c7, c14, w_dim, up=True),  # 14x14
                StyledConv(c14, c14, w_dim),  # 14x14
                StyledConv(c14, c28, w_dim, up=True),  # 28x28
            ]
        )
        self.to_gray = nn.ModuleList(
            [ToGray(c7, w_dim), ToGray(c14, w_dim), ToGray(c28, w_dim)]
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def synthesis(
        self, ws: torch.Tensor, noise: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Images ``(B, 1, 28, 28)`` in about [-1, 1] from the styles' inputs ``ws``
        ``(B, n_ws, w_dim)``; ``noise`` (optional) gives the four noise images."""
        conv, gray, n = self.convs, self.to_gray, noise or [None] * 4
        x = self.const.expand(len(ws), -1, -1, -1)  # (B, c7, 7, 7)
        x = conv[0](x, ws[:, 0], n[0])
        image = gray[0](x, ws[:, 1])  # (B, 1, 7, 7)
        x = conv[1](x, ws[:, 1], n[1])  # (B, c14, 14, 14)
        x = conv[2](x, ws[:, 2], n[2])
        image = _up(image) + gray[1](x, ws[:, 3])  # (B, 1, 14, 14)
        x = conv[3](x, ws[:, 3], n[3])  # (B, c28, 28, 28)
        return _up(image) + gray[2](x, ws[:, 4])  # (B, 1, 28, 28)

    def forward(
        self, z: torch.Tensor, psi: float = 1.0, noise: list | None = None
    ) -> torch.Tensor:
        w = truncate(self.mapping(z), self.w_avg, psi)  # (B, w_dim)
        ws = w[:, None].expand(-1, self.n_ws, -1)  # the same w for every layer
        return self.synthesis(ws, noise)

    @torch.no_grad()
    def update_w_avg(self, n: int = 10_000) -> None:
        r"""Set $\bar w$ to the mean of $f(z)$ over ``n`` latents."""
        z = torch.randn(n, self.z_dim, device=self.w_avg.device)
        self.w_avg.copy_(self.mapping(z).mean(0))


def truncate(w: torch.Tensor, w_avg: torch.Tensor, psi: float) -> torch.Tensor:
    r"""The truncation trick: $\bar w + \psi (w - \bar w)$, $0 \le \psi \le 1$."""
    check_number(psi, "psi", low=0, high=1)
    return w_avg + psi * (w - w_avg)


def mix_styles(w1: torch.Tensor, w2: torch.Tensor, crossover: int, n_ws: int = 5):
    """Style mixing: the layers before ``crossover`` take their styles from ``w1``
    ``(B, w_dim)``, the rest from ``w2``; returns ``ws`` ``(B, n_ws, w_dim)``."""
    check_tensor(w1, "w1", ndim=2, floating=True)
    if w2.shape != w1.shape:
        raise ValueError(f"w2 must have shape {tuple(w1.shape)}, got {tuple(w2.shape)}")
    if isinstance(crossover, bool) or not isinstance(crossover, int):
        raise TypeError(f"crossover must be an int, got {type(crossover).__name__}")
    if not 0 <= crossover <= n_ws:
        raise ValueError(f"crossover must be in 0..{n_ws}, got {crossover}")
    layer = torch.arange(n_ws, device=w1.device)[None, :, None]  # (1, n_ws, 1)
    return torch.where(layer < crossover, w1[:, None], w2[:, None])


class Discriminator(nn.Module):
    """A small convolutional critic: 28 → 14 → 7 with strided convolutions, then one
    logit ``(B,)`` that says "real"."""

    def __init__(self, channels: tuple[int, int] = (32, 64)):
        super().__init__()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1),  # (B, c1, 14, 14)
            nn.LeakyReLU(0.2),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # (B, c2, 7, 7)
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(c2 * 49, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # (B,)


# ------------------------------------------------------------------------- training


def train_stylegan(
    images: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 32,
    lr: float = 5e-3,
    d_lr: float = 2e-3,
    noise_lr_mul: float = 0.1,
    r1_gamma: float = 1.0,
    r1_every: int = 4,
    ema: float = 0.0,
    seed: int = 0,
    generator_kwargs: dict | None = None,
) -> tuple[Generator, dict[str, list[float]]]:
    r"""Train a :class:`Generator` on ``images`` ``(N, 1, 28, 28)`` in [0, 1] for
    ``steps`` steps (one discriminator step and one generator step each) with the
    non-saturating loss and a lazy R1 penalty (every ``r1_every`` steps, weighted by
    ``r1_every``; ``r1_gamma=0`` turns it off), Adam with $\beta = (0, 0.99)$ as in
    StyleGAN2 (learning rate ``lr`` for the generator, ``lr * noise_lr_mul`` for its
    noise strengths, ``d_lr`` for the discriminator). Returns the generator, or the
    exponential moving average of its weights with decay ``ema`` (``0``, the default,
    keeps the last weights: a short run changes too fast for an average), with
    $\bar w$ set, and the losses."""
    check_tensor(images, "images", ndim=4, floating=True)
    if images.shape[1:] != (1, 28, 28):
        raise ValueError(f"images must be (N, 1, 28, 28), got {tuple(images.shape)}")
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(r1_every, "r1_every")
    check_number(lr, "lr", low=0, low_open=True)
    check_number(d_lr, "d_lr", low=0, low_open=True)
    check_number(noise_lr_mul, "noise_lr_mul", low=0)
    check_number(r1_gamma, "r1_gamma", low=0)
    check_number(ema, "ema", low=0, high=1, high_open=True)
    return _train(
        images,
        steps,
        batch_size,
        lr,
        d_lr,
        noise_lr_mul,
        r1_gamma,
        r1_every,
        ema,
        seed,
        generator_kwargs,
    )


def _train(
    images,
    steps,
    batch_size,
    lr,
    d_lr,
    noise_lr_mul,
    r1_gamma,
    r1_every,
    ema,
    seed,
    g_kwargs,
):
    torch.manual_seed(seed)
    device = images.device
    G = Generator(**(g_kwargs or {})).to(device)
    D = Discriminator().to(device)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    # the noise strengths learn 10 times slower: early on, noise is the easiest
    # source of variety, and a short run would make the digits from the noise
    noise = [p for name, p in G.named_parameters() if name.endswith("noise.strength")]
    rest = [
        p for name, p in G.named_parameters() if not name.endswith("noise.strength")
    ]
    groups = [{"params": rest}, {"params": noise, "lr": lr * noise_lr_mul}]
    opt_G = torch.optim.Adam(groups, lr=lr, betas=(0.0, 0.99))
    opt_D = torch.optim.Adam(D.parameters(), lr=d_lr, betas=(0.0, 0.99))
    batches = endless_minibatches(
        len(images), batch_size, torch.Generator().manual_seed(seed)
    )
    losses = {"D": [], "G": []}
    for step in range(steps):
        real = images[next(batches).to(device)] * 2 - 1  # (B, 1, 28, 28) in [-1, 1]
        losses["D"].append(_d_step(G, D, opt_D, real, r1_gamma, r1_every, step))
        losses["G"].append(_g_step(G, D, opt_G, len(real)))
        with torch.no_grad():  # G_ema <- ema * G_ema + (1 - ema) * G
            for p_ema, p in zip(G_ema.parameters(), G.parameters(), strict=True):
                p_ema.lerp_(p, 1 - ema)
    G_ema.update_w_avg()
    return G_ema.eval(), losses


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    r"""The discriminator's loss, $-\log \sigma(D(x)) - \log(1 - \sigma(D(G(z))))$,
    averaged; ``softplus(-t)`` is $-\log \sigma(t)$ without overflow."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    r"""The non-saturating generator loss $-\log \sigma(D(G(z)))$, averaged."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(D: nn.Module, real: torch.Tensor) -> torch.Tensor:
    r"""$\mathbb E_x \lVert \nabla_x D(x) \rVert^2$ on real images ``(B, ...)``, with
    a graph, so that its gradient reaches $D$'s weights."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def _d_step(G, D, opt_D, real, r1_gamma, r1_every, step):
    with torch.no_grad():
        fake = G(torch.randn(len(real), G.z_dim, device=real.device))
    loss = d_loss(D(real), D(fake))
    if r1_gamma > 0 and step % r1_every == 0:  # lazy R1, weighted by its interval
        loss = loss + r1_every * r1_gamma / 2 * r1_penalty(D, real)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss.item()


def _g_step(G, D, opt_G, batch_size):
    z = torch.randn(batch_size, G.z_dim, device=G.w_avg.device)
    loss = g_loss(D(G(z)))
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    return loss.item()


def generate_digits(
    steps: int, n: int = 1000, seed: int = 0, psi: float = 1.0, **options
) -> torch.Tensor:
    """The part's comparison contract: train this chapter's generator from scratch on
    the 4,000 training digits for ``steps`` steps (one thread, CPU), then return ``n``
    samples ``(n, 1, 28, 28)`` float32 in [0, 1] on the CPU, truncated with ``psi``.

    One step is one discriminator and one generator update on a batch of 32 (plus the
    R1 penalty every 4th step): about 60-70 ms of CPU time on one thread of a busy
    2-core machine. ``options`` go to :func:`train_stylegan`: ``batch_size``, ``lr``,
    ``d_lr``, ``noise_lr_mul``, ``r1_gamma``, ``r1_every``, ``ema``,
    ``generator_kwargs``.
    """
    from dlabc.generative.yardstick import digits

    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    check_number(psi, "psi", low=0, high=1)
    images, _ = digits("train")
    G, _ = train_stylegan(images, steps, seed=seed, **options)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        samples = G(torch.randn(n, G.z_dim), psi=psi)
    return ((samples + 1) / 2).clamp(0, 1).float().cpu()
