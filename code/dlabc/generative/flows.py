r"""Normalizing flows: invertible layers with a tractable log-determinant, stacked into
a density with an exact likelihood; RealNVP's affine coupling, Glow's actnorm and
invertible $1 \times 1$ convolution, a flow on two moons and one on binarised digits.

Chapter: ``book/generative/flows.md``.

References:
- Dinh, Krueger & Bengio (2015), *NICE: Non-linear Independent Components
  Estimation*, ICLR workshop (coupling layers, the change of variables as a loss).
- Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP*, ICLR (the
  affine coupling layer, the squeeze, the logit preprocessing, dequantisation).
- Kingma & Dhariwal (2018), *Glow: Generative Flow with Invertible 1x1 Convolutions*,
  NeurIPS (actnorm with data-dependent initialisation, the invertible $1 \times 1$
  convolution and its LU parameterisation, zero-initialised last layers, sampling at
  a reduced temperature).
- Papamakarios, Nalisnick, Rezende, Mohamed & Lakshminarayanan (2021), *Normalizing
  Flows for Probabilistic Modeling and Inference*, JMLR (the review).
- Theis, van den Oord & Bethge (2016), *A note on the evaluation of generative models*,
  ICLR (uniform dequantisation bounds the discrete likelihood).

Every layer maps ``x`` to ``(y, logdet)``, with ``logdet`` ``(N,)`` the log of
$|\det \partial y / \partial x|$ of each example, and has an ``inverse``. Shapes: ``N``
examples, ``C`` channels (or coordinates, for vectors), ``H``, ``W`` image size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.generative.yardstick import binarize, bits_per_dim, digits
from dlabc.train import endless_minibatches, train_steps

__all__ = [
    "AffineCoupling",
    "ActNorm",
    "InvConv1x1",
    "Squeeze",
    "Logit",
    "Flow",
    "mlp_conditioner",
    "conv_conditioner",
    "moons_flow",
    "digit_flow",
    "dequantize",
    "nll_bits_per_dim",
    "train_digit_flow",
    "generate_digits",
]


def _pixels(x: torch.Tensor) -> int:
    """How many positions share one channel's parameters: $H W$ (1 for vectors)."""
    return x[0, 0].numel()


# ---------------------------------------------------------------- the layers


class AffineCoupling(nn.Module):
    r"""RealNVP's affine coupling layer: split $x$ into halves $(x_a, x_b)$ along the
    channels, keep $x_a$ and transform $x_b$ elementwise with a scale and a shift that
    any network computes from $x_a$:

    $y_a = x_a, \quad y_b = x_b \odot \exp(s(x_a)) + t(x_a), \quad
    \log|\det J| = \textstyle\sum_j s(x_a)_j .$

    The Jacobian is triangular, so its determinant is the product of its diagonal,
    whatever the network ``net`` (it maps ``(N, C/2, ...)`` to ``(N, C, ...)``: the
    log-scales, then the shifts). ``swap=True`` transforms the first half instead, so
    that alternating layers change every coordinate. The log-scale is squashed by
    $\tanh$, which keeps each layer's scaling within $[e^{-1}, e]$ at all times.
    """

    def __init__(self, net: nn.Module, swap: bool = False) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        self.net, self.swap = net, bool(swap)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.chunk(2, dim=1)
        return (b, a) if self.swap else (a, b)

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat((b, a) if self.swap else (a, b), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = self._split(x)  # (N, C/2, ...) each
        s, t = self.net(x_a).chunk(2, dim=1)
        s = torch.tanh(s)
        y_b = x_b * torch.exp(s) + t
        return self._join(x_a, y_b), s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = self._split(y)
        s, t = self.net(y_a).chunk(2, dim=1)  # the same s, t: y_a is x_a
        x_b = (y_b - t) * torch.exp(-torch.tanh(s))
        return self._join(y_a, x_b)


class ActNorm(nn.Module):
    r"""Glow's activation normalisation: a per-channel affine map
    $y = (x + b) \odot e^{\log s}$, with $\log|\det J| = H W \sum_c \log s_c$.

    Its parameters are initialised from the data: the first batch it sees sets $b$ to
    minus the per-channel mean and $s$ to one over the per-channel standard deviation,
    so that this batch leaves the layer with zero mean and unit variance per channel.
    After that they are ordinary parameters. Unlike batch normalisation, the map does
    not depend on the batch, so it stays invertible.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.initialized = False  # a Python flag: reading it never waits for a GPU

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))  # (1, C, 1, 1) for images

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set $b$ and $s$ so that ``x`` comes out with zero mean and unit variance
        per channel."""
        dims = [d for d in range(x.dim()) if d != 1]
        self.loc.copy_(-x.mean(dims))
        self.log_scale.copy_(-torch.log(x.std(dims, correction=0) + 1e-6))
        self.initialized = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized:
            self.initialize(x)
        y = (x + self._view(self.loc, x)) * self._view(self.log_scale.exp(), x)
        logdet = _pixels(x) * self.log_scale.sum()
        return y, logdet.expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._view((-self.log_scale).exp(), y) - self._view(self.loc, y)


class InvConv1x1(nn.Module):
    r"""Glow's invertible $1 \times 1$ convolution: the same $C \times C$ matrix $W$
    applied to the channels of every pixel, a learned permutation of the channels.

    $\log|\det J| = H W \log|\det W|$ costs $O(C^3)$ in general; the LU
    parameterisation $W = P L (U + \operatorname{diag}(\sigma \odot e^{\log|s|}))$, with
    $P$ a fixed permutation, $L$ unit lower triangular, $U$ strictly upper triangular
    and the signs $\sigma$ fixed, makes it $H W \sum_c \log|s_c|$. $W$ starts as a
    random rotation (drawn with ``generator``), so $\log|\det W| = 0$ at first.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        rotation, _ = torch.linalg.qr(
            torch.randn(channels, channels, generator=generator)
        )
        P, L, U = torch.linalg.lu(rotation)
        diagonal = U.diagonal()
        self.register_buffer("P", P)
        self.register_buffer("sign_s", diagonal.sign())
        self.register_buffer("lower", torch.tril(torch.ones(channels, channels), -1))
        self.L = nn.Parameter(L)
        self.U = nn.Parameter(torch.triu(U, 1))
        self.log_s = nn.Parameter(diagonal.abs().log())

    def weight(self) -> torch.Tensor:
        """$W = P L (U + \\operatorname{diag}(s))$, ``(C, C)``."""
        eye = torch.eye(len(self.log_s), dtype=self.L.dtype, device=self.L.device)
        L = self.L * self.lower + eye
        U = self.U * self.lower.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.P @ L @ U

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.einsum("ij,nj...->ni...", self.weight(), x)  # every pixel: W x
        logdet = _pixels(x) * self.log_s.sum()
        return y, logdet.expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,nj...->ni...", torch.linalg.inv(self.weight()), y)


class Squeeze(nn.Module):
    """RealNVP's squeeze: each $2 \\times 2$ block of pixels becomes 4 channels of one
    pixel, ``(N, C, H, W)`` to ``(N, 4C, H/2, W/2)``. A permutation of the
    coordinates, so $\\log|\\det J| = 0$; it gives the channel-wise layers something to
    mix."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"Squeeze needs an even height and width, got {H}x{W}")
        y = x.view(N, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(N, 4 * C, H // 2, W // 2), x.new_zeros(N)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        N, C4, H2, W2 = y.shape
        x = y.view(N, C4 // 4, 2, 2, H2, W2).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(N, C4 // 4, 2 * H2, 2 * W2)


class Logit(nn.Module):
    r"""RealNVP's preprocessing of images in $[0, 1]$: $p = \alpha + (1 - 2\alpha) x$,
    $y = \log p - \log(1 - p)$, so that the flow models an unbounded variable. Its
    log-determinant is $\sum_j \log(1 - 2\alpha) - \log p_j - \log(1 - p_j)$; $\alpha$
    keeps $p$ away from 0 and 1, where the logit is infinite."""

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        self.alpha = check_number(alpha, "alpha", low=0, high=0.5, high_open=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        logdet = math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)
        return y, logdet.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


# ---------------------------------------------------------------- the flow


class Flow(nn.Module):
    r"""A normalizing flow: invertible ``layers`` $f = f_K \circ \dots \circ f_1$ from
    the data $x$ to $z = f(x)$, and a standard normal base density for $z$ of shape
    ``z_shape``. By the change of variables,

    $\log p(x) = \log \mathcal N(f(x); 0, I) + \sum_k \log|\det J_{f_k}| ,$

    exact, and a sample is $x = f^{-1}(z)$ with $z \sim \mathcal N(0, T^2 I)$ ($T$, the
    temperature, is 1 for the model's own distribution).
    """

    def __init__(self, layers: list[nn.Module], z_shape: tuple[int, ...]) -> None:
        super().__init__()
        if not layers or not all(hasattr(layer, "inverse") for layer in layers):
            raise TypeError("layers must be a non-empty list of invertible layers")
        self.layers = nn.ModuleList(layers)
        self.z_shape = tuple(check_positive_int(d, "z_shape") for d in z_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(len(x))
        for layer in self.layers:
            x, layer_logdet = layer(x)
            logdet = logdet + layer_logdet
        return x, logdet  # z, log|det dz/dx|

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """$\\log p(x)$ of each example, ``(N,)``, in nats."""
        z, logdet = self(x)
        log_pz = -0.5 * (z**2 + math.log(2 * math.pi)).flatten(1).sum(1)
        return log_pz + logdet

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` samples $f^{-1}(z)$, $z \\sim \\mathcal N(0, T^2 I)$."""
        check_positive_int(n, "n")
        check_number(temperature, "temperature", low=0, low_open=True)
        device = next(self.parameters(), torch.empty(0)).device
        z = torch.randn((n, *self.z_shape), generator=generator).to(device)
        return self.inverse(temperature * z)


# ---------------------------------------------------------------- two models


def mlp_conditioner(half: int, hidden: int) -> nn.Module:
    """The network of a coupling layer on vectors: ``half`` coordinates in, a log-scale
    and a shift for each of the other ``half`` out; the last layer starts at zero, so
    the coupling starts as the identity (Glow's trick)."""
    net = nn.Sequential(
        nn.Linear(half, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 2 * half),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def conv_conditioner(half: int, hidden: int) -> nn.Module:
    """The network of a coupling layer on images (Glow's): a $3 \\times 3$, a
    $1 \\times 1$ and a zero-initialised $3 \\times 3$ convolution."""
    net = nn.Sequential(
        nn.Conv2d(half, hidden, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        nn.Conv2d(hidden, 2 * half, 3, padding=1),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def moons_flow(n_couplings: int = 8, hidden: int = 64) -> Flow:
    """A RealNVP on the plane: ``n_couplings`` affine couplings, alternately
    transforming $x_2$ from $x_1$ and $x_1$ from $x_2$."""
    check_positive_int(n_couplings, "n_couplings")
    check_positive_int(hidden, "hidden")
    layers = [
        AffineCoupling(mlp_conditioner(1, hidden), swap=k % 2 == 1)
        for k in range(n_couplings)
    ]
    return Flow(layers, z_shape=(2,))


def digit_flow(
    n_steps: int = 6,
    hidden: int = 32,
    size: int = 28,
    squeezes: int = 1,
    alpha: float = 0.05,
    generator: torch.Generator | None = None,
) -> Flow:
    """A single-scale Glow for ``(N, 1, size, size)`` images in $[0, 1]$: the logit,
    ``squeezes`` squeezes to ``(N, 4^squeezes, size / 2^squeezes, ...)`` (28 x 28 to
    4 x 14 x 14 by default), then ``n_steps`` steps of flow, each actnorm, invertible
    $1 \\times 1$ convolution and affine coupling."""
    check_positive_int(n_steps, "n_steps")
    check_positive_int(hidden, "hidden")
    check_positive_int(size, "size")
    check_positive_int(squeezes, "squeezes")
    if size % 2**squeezes:
        raise ValueError(f"size must be divisible by 2**squeezes, got {size}")
    C, side = 4**squeezes, size // 2**squeezes
    layers: list[nn.Module] = [Logit(alpha)] + [Squeeze() for _ in range(squeezes)]
    for _ in range(n_steps):
        layers += [
            ActNorm(C),
            InvConv1x1(C, generator),
            AffineCoupling(conv_conditioner(C // 2, hidden)),
        ]
    return Flow(layers, z_shape=(C, side, side))


# ---------------------------------------------------------------- binary digits


def dequantize(
    b: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Uniform dequantisation of binary pixels: $x = (b + u) / 2$, $u \sim
    \mathcal U[0, 1)^D$, so that a black pixel becomes a value in $[0, \frac12)$ and a
    white one a value in $[\frac12, 1)$."""
    u = torch.rand(b.shape, generator=generator).to(b)
    return (b + u) / 2


def _binary_images(images: object, name: str = "images") -> torch.Tensor:
    check_tensor(images, name, ndim=4, floating=True)
    if images.device.type == "cpu" and not ((images == 0) | (images == 1)).all():
        raise ValueError(f"{name} must be binary (0 or 1); binarize them first")
    return images


def nll_bits_per_dim(
    model: Flow, images: torch.Tensor, samples: int = 1, seed: int = 0
) -> float:
    r"""An upper bound on the negative log-likelihood of binary ``images``
    ``(N, C, H, W)`` under ``model``, in bits per pixel, averaged over the images.

    With $x = (b + u)/2$ and the flow's density $p$ on $[0, 1]^D$, the probability of
    the binary image $b$ is $P(b) = 2^{-D}\, \mathbb E_u\, p(x)$ (the mass of $b$'s cube
    of side $\frac12$), so by Jensen's inequality
    $-\log_2 P(b) \le \mathbb E_u[-\log_2 p(x)] + D$: the flow's bits per dimension,
    plus one bit (the $\log_2$ of the 2 levels). ``samples`` noise draws estimate the
    expectation.
    """
    if not isinstance(model, Flow):
        raise TypeError(f"model must be a Flow, got {type(model).__name__}")
    _binary_images(images)
    check_positive_int(samples, "samples")
    return _nll_bits_per_dim(model, images, samples, seed)


def _nll_bits_per_dim(model: Flow, images: torch.Tensor, samples: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    D = images[0].numel()
    device = next(model.parameters(), images).device  # a flow may have no parameters
    total = 0.0
    for _ in range(samples):
        x = dequantize(images, generator).to(device)  # eq-flows-dequantize
        with torch.no_grad():
            nll_nats = -model.log_prob(x).mean()  # -log p(x), p a density on [0, 1]^D
        total += bits_per_dim(nll_nats, D) + 1  # + log2(2 levels) per pixel
    return total / samples


def train_digit_flow(
    model: Flow,
    images: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` by maximum likelihood on binary ``images``, dequantised afresh
    at every step, with Adam; return the loss of each step in bits per pixel (the
    bound of :func:`nll_bits_per_dim` on that batch). Actnorm is initialised on the
    first batch."""
    if not isinstance(model, Flow):
        raise TypeError(f"model must be a Flow, got {type(model).__name__}")
    _binary_images(images)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    return _train_digit_flow(model, images, steps, batch_size, lr, seed)


def _train_digit_flow(model, images, steps, batch_size, lr, seed) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    D = images[0].numel()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_fn(model: Flow, index: torch.Tensor) -> torch.Tensor:
        x = dequantize(images[index], generator)  # fresh noise every step
        return -model.log_prob(x).mean() / (D * math.log(2)) + 1  # bits per pixel

    batches = endless_minibatches(len(images), batch_size, generator)
    history = train_steps(model, optimizer, batches, loss_fn, steps=steps)
    return history.step_loss


def generate_digits(steps: int, n: int = 1000, seed: int = 0, **options):
    """The comparison contract of the part: train :func:`digit_flow` from scratch on the
    binarised ``digits("train")`` for ``steps`` Adam steps, then return ``n`` samples
    ``(n, 1, 28, 28)`` float32 in $[0, 1]$ on the CPU.

    One step (a batch of 64, the default 6 steps of flow with 32 hidden channels,
    about 17 k parameters) costs about 70 ms on one CPU thread. ``options``:
    ``temperature`` (1.0: the model's own distribution; Glow samples at 0.7),
    ``binary`` (True: the sampled pixels rounded to black or white, the data the flow
    models; False: the flow's continuous values, clamped to $[0, 1]$), ``n_steps``,
    ``hidden``, ``squeezes`` (1: the digit becomes ``(4, 14, 14)``), ``batch_size``,
    ``lr``, ``device`` (``"cpu"``) and ``return_model`` (True: return
    ``(samples, model)``).
    """
    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    known = {"temperature", "binary", "n_steps", "hidden", "squeezes", "batch_size"}
    known |= {"lr", "device", "return_model"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(known)}")
    device = torch.device(options.get("device", "cpu"))
    temperature = options.get("temperature", 1.0)
    check_number(temperature, "temperature", low=0, low_open=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = digit_flow(
        options.get("n_steps", 6),
        options.get("hidden", 32),
        squeezes=options.get("squeezes", 1),
        generator=generator,
    ).to(device)
    train_images = binarize(digits("train")[0]).to(device)
    train_digit_flow(
        model,
        train_images,
        steps,
        batch_size=options.get("batch_size", 64),
        lr=options.get("lr", 2e-3),
        seed=seed,
    )
    model.eval()
    x = model.sample(n, temperature, generator).clamp(0, 1)
    if options.get("binary", True):
        x = (x >= 0.5).float()
    samples = x.float().cpu()
    return (samples, model) if options.get("return_model", False) else samples
