r"""PixelCNN: an image as a product of conditionals, one pixel at a time. Masked
convolutions, the blind spot of their stack, the gated PixelCNN's vertical and
horizontal stacks that remove it, the likelihood in bits per dimension, and sampling
pixel by pixel with cached rows and columns.

Chapter: ``book/generative/pixelcnn.md``.

References:
- van den Oord, Kalchbrenner & Kavukcuoglu (2016), *Pixel Recurrent Neural Networks*,
  ICML (the autoregressive factorisation, masked convolutions of type A and B).
- van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu (2016),
  *Conditional Image Generation with PixelCNN Decoders*, NeurIPS (the gated activation,
  the vertical and horizontal stacks, conditioning on a class).
- Ramachandran et al. (2017), *Fast Generation for Convolutional Autoregressive
  Models*, ICLR workshop (caching what earlier pixels computed, used by :func:`sample`).

The digits are black and white: every pixel $x_k \in \{0, 1\}$ is a Bernoulli variable,
and the network returns one logit per pixel. Shapes: ``B`` images, ``C`` channels,
``H``, ``W`` image size, pixels in raster order (row by row, left to right).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.generative.yardstick import binarize, bits_per_dim, digits
from dlabc.train import endless_minibatches, train_steps

__all__ = [
    "causal_mask",
    "MaskedConv2d",
    "PixelCNN",
    "gate",
    "GatedLayer",
    "GatedPixelCNN",
    "receptive_field",
    "nll_bits_per_dim",
    "independent_bits_per_dim",
    "train_pixelcnn",
    "sample",
    "generate_digits",
]


def causal_mask(kernel: int, mask_type: str) -> torch.Tensor:
    """The ``(kernel, kernel)`` mask of a masked convolution: 1 on the taps that see
    pixels before the centre in raster order (the rows above, the pixels to the left),
    and on the centre itself for type ``"B"``; 0 elsewhere."""
    check_positive_int(kernel, "kernel")
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd, got {kernel}")
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    return _causal_mask(kernel, mask_type)


def _causal_mask(kernel: int, mask_type: str) -> torch.Tensor:
    c = kernel // 2
    mask = torch.ones(kernel, kernel)
    mask[c, c + (mask_type == "B") :] = (
        0  # the centre row: from the centre (A) or after it (B)
    )
    mask[c + 1 :] = 0  # every row below the centre
    return mask


class MaskedConv2d(nn.Conv2d):
    r"""A convolution whose kernel is multiplied by :func:`causal_mask`, so that the
    output at pixel $k$ reads only pixels $< k$ (type A) or $\le k$ (type B).

    Type A is for the first layer, whose input is the image: the prediction of $x_k$
    must not see $x_k$. Every later layer reads features that at position $k$ already
    depend only on pixels $< k$, so they may include the centre: type B.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, mask_type: str
    ):
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        mask = causal_mask(kernel, mask_type)
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        self.mask_type = mask_type
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class PixelCNN(nn.Module):
    """The PixelCNN of 2016a, small: a masked convolution of type A on the image, then
    ``layers - 1`` of type B with ReLUs between, and a 1x1 convolution to one logit per
    pixel. Its receptive field has a blind spot (the chapter measures it)."""

    def __init__(self, channels: int = 16, layers: int = 5, kernel: int = 3):
        super().__init__()
        check_positive_int(channels, "channels")
        check_positive_int(layers, "layers")
        convs = [MaskedConv2d(1, channels, kernel, "A")]
        convs += [
            MaskedConv2d(channels, channels, kernel, "B") for _ in range(layers - 1)
        ]
        self.convs = nn.ModuleList(convs)
        self.head = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:  # (B, 1, H, W) -> (B, C, H, W)
            x = F.relu(conv(x))
        return self.head(x)  # (B, 1, H, W): the logit of p(x_k = 1 | x_<k)


def gate(a: torch.Tensor) -> torch.Tensor:
    r"""The gated activation $\tanh(a_f) \odot \sigma(a_g)$ of ``a`` ``(B, 2C, H, W)``,
    whose first ``C`` channels are $a_f$ and last ``C`` are $a_g$; returns ``(B, C, H,
    W)``."""
    a_f, a_g = a.chunk(2, dim=1)
    return torch.tanh(a_f) * torch.sigmoid(a_g)


def _down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (a row of zeros on top): row ``i`` gets row ``i - 1``."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def _right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every column one right (zeros on the left): column ``j`` gets ``j - 1``."""
    return F.pad(x, (1, 0))[..., :-1]


def _check_layer(in_channels, channels, kernel, first, num_classes) -> None:
    check_positive_int(in_channels, "in_channels")
    check_positive_int(channels, "channels")
    check_positive_int(kernel, "kernel")
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd, got {kernel}")
    if not first and in_channels != channels:
        raise ValueError("a layer after the first needs in_channels == channels")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")


class GatedLayer(nn.Module):
    r"""One layer of the gated PixelCNN (2016b, figure 2): a vertical and a horizontal
    stack.

    The vertical stack convolves the rows above and the current row, ``(k//2 + 1,
    k)``; the horizontal stack convolves the pixels to the left and the current one,
    ``(1, k//2 + 1)``, and adds the vertical stack's features of the row *above*
    through a 1x1 convolution. Both pass through the gate,
    $y = \tanh(W_f * x + V_f h) \odot \sigma(W_g * x + V_g h)$ ($h$: a one-hot class,
    optional). The horizontal stack ends in a 1x1 convolution and, except in the first
    layer, a residual connection. In the first layer the horizontal input is the image
    shifted one pixel right, so that pixel $k$ is not seen by its own prediction (the
    mask of type A).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel: int = 3,
        first: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        _check_layer(in_channels, channels, kernel, first, num_classes)
        self.k2, self.first = kernel // 2, first
        self.v_conv = nn.Conv2d(in_channels, 2 * channels, (self.k2 + 1, kernel))
        self.h_conv = nn.Conv2d(in_channels, 2 * channels, (1, self.k2 + 1))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.embed = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | float:
        """The class's term $V h$ ``(B, 2C, 1, 1)``, the same at every pixel (0 without
        classes)."""
        return 0.0 if self.embed is None else self.embed(y)[:, :, None, None]

    def vertical(
        self, v_padded: torch.Tensor, cond
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From the vertical input, padded with ``k//2`` rows on top and ``k//2``
        columns on each side, the vertical output and what it sends to the horizontal
        stack."""
        v_pre = self.v_conv(v_padded) + cond  # (B, 2C, H, W): rows i-k//2 .. i
        return gate(v_pre), self.v_to_h(v_pre)

    def horizontal(self, h_padded, v_to_h, h, cond) -> torch.Tensor:
        """From the horizontal input padded with ``k//2`` columns on the left, the
        vertical stack's contribution from the row above, and the input ``h`` itself
        (for the residual), the horizontal output."""
        h_pre = self.h_conv(h_padded) + v_to_h + cond  # columns j-k//2 .. j, rows < i
        out = self.h_out(gate(h_pre))  # (B, C, H, W)
        return out if self.first else h + out

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond=0.0):
        k2 = self.k2
        v_out, v_to_h = self.vertical(F.pad(v, (k2, k2, k2, 0)), cond)
        h_in = _right_shift(h) if self.first else h  # type A: not the pixel itself
        h_out = self.horizontal(F.pad(h_in, (k2, 0)), _down_shift(v_to_h), h, cond)
        return v_out, h_out


class GatedPixelCNN(nn.Module):
    """The gated PixelCNN of 2016b, small: ``layers`` :class:`GatedLayer` s with
    ``channels`` channels each, then ReLU, 1x1, ReLU, 1x1 to one logit per pixel. With
    ``num_classes > 0`` every layer adds a learned bias per class (the conditional
    PixelCNN)."""

    def __init__(
        self, channels: int = 16, layers: int = 5, kernel: int = 3, num_classes: int = 0
    ):
        super().__init__()
        check_positive_int(layers, "layers")
        self.kernel, self.num_classes = kernel, num_classes
        self.layers = nn.ModuleList(
            GatedLayer(1 if k == 0 else channels, channels, kernel, k == 0, num_classes)
            for k in range(layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        v = h = x  # (B, 1, H, W): both stacks start from the image
        for layer in self.layers:
            v, h = layer(v, h, layer.condition(y))  # (B, C, H, W) each
        return self.head(h)  # (B, 1, H, W): the logit of p(x_k = 1 | x_<k)


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, (PixelCNN, GatedPixelCNN)):
        raise TypeError(
            f"model must be a PixelCNN or GatedPixelCNN, got {type(model).__name__}"
        )
    return model


def _check_images(images: object, name: str = "images") -> torch.Tensor:
    check_tensor(images, name, ndim=4, floating=True)
    if images.shape[1] != 1:
        raise ValueError(
            f"{name} must have shape (N, 1, H, W), got {tuple(images.shape)}"
        )
    return images


def _check_labels(model: nn.Module, labels: object, n: int) -> torch.Tensor | None:
    classes = getattr(model, "num_classes", 0)
    if labels is None:
        if classes:
            raise ValueError("a conditional model (num_classes > 0) needs labels")
        return None
    if not classes:
        raise ValueError("labels were given to a model without classes")
    check_tensor(labels, "labels", ndim=1, dtype=torch.int64)
    if len(labels) != n:
        raise ValueError(f"labels must have {n} entries, got {len(labels)}")
    if labels.device.type == "cpu" and ((labels < 0) | (labels >= classes)).any():
        raise ValueError(f"labels must lie in 0..{classes - 1}")
    return labels


def receptive_field(
    model: nn.Module, size: int, pixel: tuple[int, int], n: int = 4, seed: int = 0
) -> torch.Tensor:
    r"""$\sum |\partial\, \text{logit}_{\text{pixel}} / \partial x|$ over ``n`` random
    inputs ``(n, 1, size, size)``: a ``(size, size)`` map, nonzero exactly where the
    output at ``pixel`` can see the input (several inputs, so that a ReLU that happens
    to be off does not hide a pixel)."""
    _check_model(model)
    check_positive_int(size, "size")
    check_positive_int(n, "n")
    if len(pixel) != 2 or not all(0 <= p < size for p in pixel):
        raise ValueError(f"pixel must be (row, column) inside a {size}x{size} image")
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=generator, dtype=torch.float64)
    parameter = next(model.parameters())
    x = x.to(parameter.device, parameter.dtype)
    y = None
    if getattr(model, "num_classes", 0):
        y = torch.zeros(n, dtype=torch.int64, device=parameter.device)
    return _receptive_field(model, x, pixel, y).cpu()


def _receptive_field(model, x, pixel, y=None) -> torch.Tensor:
    r"""$\sum |\partial\, \text{logit}_{\text{pixel}} / \partial x|$ over the images
    ``x`` ``(n, 1, H, W)``: an ``(H, W)`` map."""
    x = x.clone().requires_grad_()
    i, j = pixel
    logits = model(x) if y is None else model(x, y)  # (n, 1, H, W)
    (grad,) = torch.autograd.grad(logits[:, 0, i, j].sum(), x)
    return grad.abs().sum(0)[0]  # (H, W)


@torch.no_grad()
def nll_bits_per_dim(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 500,
) -> float:
    r"""The mean negative log-likelihood of binary ``images`` ``(N, 1, H, W)`` under
    ``model``, in bits per pixel: $-\frac{1}{N D} \sum_n \sum_k \log_2 p(x_k \mid
    x_{<k})$. Exact, one forward pass per batch."""
    _check_model(model)
    _check_images(images)
    if images.device.type == "cpu" and ((images != 0) & (images != 1)).any():
        raise ValueError("images must be binary (0 or 1): use yardstick.binarize")
    labels = _check_labels(model, labels, len(images))
    check_positive_int(batch_size, "batch_size")
    was_training = model.training
    model.eval()
    try:
        return _nll_bits_per_dim(model, images, labels, batch_size)
    finally:
        model.train(was_training)


def _nll_bits_per_dim(model, images, labels, batch_size) -> float:
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = None if labels is None else labels[start : start + batch_size].to(device)
        logits = model(x) if y is None else model(x, y)
        # -log p(x) of each image, in nats: the sum of the pixels' Bernoulli losses
        total += F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()
    return bits_per_dim(total / len(images), images[0].numel())


def independent_bits_per_dim(train: torch.Tensor, test: torch.Tensor) -> float:
    r"""The baseline that ignores every other pixel: each pixel $k$ is an independent
    Bernoulli with the training frequency $\hat p_k = (\#\{x_k = 1\} + 1) / (N + 2)$
    (one extra black and one extra white image, so that no probability is 0).
    Returns the bits per pixel of the binary ``test`` images."""
    _check_images(train, "train")
    _check_images(test, "test")
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(
            f"train and test images differ in shape: {tuple(train.shape[1:])} and "
            f"{tuple(test.shape[1:])}"
        )
    p = (train.sum(0) + 1) / (len(train) + 2)  # (1, H, W)
    nll = -(test * p.log() + (1 - test) * (1 - p).log()).sum() / len(test)
    return bits_per_dim(nll, test[0].numel())


def train_pixelcnn(
    images: torch.Tensor,
    steps: int,
    labels: torch.Tensor | None = None,
    batch_size: int = 64,
    lr: float = 2e-2,
    seed: int = 0,
    **model_options,
):
    """Train a :class:`GatedPixelCNN` (``model_options``: ``channels``, ``layers``,
    ``kernel``; ``num_classes=10`` is set when ``labels`` are given) on binary
    ``images`` with Adam, for ``steps`` steps of ``batch_size`` images, the learning
    rate falling to a tenth along a cosine. Returns ``(model, history)``; the model is
    on ``images``' device, in evaluation mode."""
    _check_images(images)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    if labels is not None:
        model_options.setdefault("num_classes", 10)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GatedPixelCNN(**model_options).to(images.device)
    labels = _check_labels(model, labels, len(images))
    with torch.no_grad():  # start from the mean pixel, not from a coin: log-odds
        mean = images.mean().clamp(1e-3, 1 - 1e-3)
        model.head[-1].bias.fill_(torch.logit(mean).item())

    def loss_fn(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        x = images[index.to(images.device)]
        y = None if labels is None else labels[index.to(labels.device)]
        logits = model(x) if y is None else model(x, y)
        return F.binary_cross_entropy_with_logits(logits, x)  # nats per pixel

    def schedule(step: int) -> float:
        return lr * (0.55 + 0.45 * math.cos(math.pi * step / steps))

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = endless_minibatches(len(images), batch_size, generator)
    history = train_steps(
        model, optimizer, batches, loss_fn, steps=steps, lr_schedule=schedule
    )
    return model.eval(), history


@torch.no_grad()
def sample(
    model: GatedPixelCNN,
    n: int,
    size: tuple[int, int] = (28, 28),
    labels: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` binary images ``(n, 1, H, W)`` from a :class:`GatedPixelCNN`, pixel by
    pixel in raster order; also return the logit each pixel was drawn from. Runs on the
    model's device."""
    if not isinstance(model, GatedPixelCNN):
        raise TypeError(f"model must be a GatedPixelCNN, got {type(model).__name__}")
    check_positive_int(n, "n")
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {size!r}")
    for s in size:
        check_positive_int(s, "size")
    labels = _check_labels(model, labels, n)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        y = None if labels is None else labels.to(device)
        return _sample(model, n, size, y, generator)
    finally:
        model.train(was_training)


def _sample(model, n, size, y, generator):
    (H, W), k2 = size, model.kernel // 2
    p = next(model.parameters())
    x = torch.zeros(n, 1, H, W, device=p.device, dtype=p.dtype)
    logits = torch.zeros_like(x)
    conds = [layer.condition(y) for layer in model.layers]
    # each layer's vertical input: the last k//2 + 1 rows, padded at the sides
    rows = [
        p.new_zeros(n, layer.v_conv.in_channels, k2 + 1, W + 2 * k2)
        for layer in model.layers
    ]
    v_to_h = [
        p.new_zeros(n, 2 * layer.h_out.in_channels, 1, W) for layer in model.layers
    ]
    for i in range(H):
        # each layer's horizontal input: the last k//2 + 1 columns of this row
        cols = [
            p.new_zeros(n, layer.h_conv.in_channels, 1, k2 + 1)
            for layer in model.layers
        ]
        for j in range(W):
            h = x[:, :, i : i + 1, j - 1 : j] if j else p.new_zeros(n, 1, 1, 1)
            for k, layer in enumerate(model.layers):
                cols[k] = torch.cat([cols[k][..., 1:], h], dim=3)  # columns j-k//2 .. j
                h = layer.horizontal(cols[k], v_to_h[k][..., j : j + 1], h, conds[k])
            logits[:, :, i, j] = model.head(h)[
                :, :, 0, 0
            ]  # p(x_ij = 1 | pixels before)
            u = torch.rand(n, 1, device=p.device, generator=generator, dtype=p.dtype)
            x[:, :, i, j] = (u < torch.sigmoid(logits[:, :, i, j])).to(p.dtype)
        # row i is drawn: push it through the vertical stacks, for row i + 1
        v = x[:, :, i : i + 1]  # (n, 1, 1, W)
        for k, layer in enumerate(model.layers):
            rows[k] = torch.cat([rows[k][:, :, 1:], F.pad(v, (k2, k2))], dim=2)
            v, v_to_h[k] = layer.vertical(
                rows[k], conds[k]
            )  # (n, C, 1, W), (n, 2C, 1, W)
    return x, logits


def generate_digits(
    steps: int, n: int = 1000, seed: int = 0, return_model: bool = False, **options
):
    """The part's comparison contract: train a :class:`GatedPixelCNN` from scratch on
    the binarised ``digits("train")`` for ``steps`` Adam steps and return ``n`` samples
    ``(n, 1, 28, 28)`` float32 on the CPU. The samples are **binary** (0 or 1): the
    model is a likelihood of black-and-white digits.

    One step (a batch of 64 digits, the default 5 gated layers of 16 channels, 24 k
    weights) costs about 0.3 s of one CPU thread; drawing 1,000 samples costs about
    5 s (the sampler caches rows and columns, so each of the 784 pixels costs one column
    of every layer, not a forward pass).

    ``options``: ``channels`` (16), ``layers`` (5), ``kernel`` (3), ``batch_size``
    (64), ``lr`` (2e-2), ``device`` (``"cpu"``). With ``return_model=True`` returns
    ``(samples, model)``.
    """
    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    allowed = {"channels", "layers", "kernel", "batch_size", "lr", "device"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(
            f"unknown options {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    device = torch.device(options.pop("device", "cpu"))
    images = binarize(digits("train")[0]).to(device)
    model, _ = train_pixelcnn(images, steps, seed=seed, **options)
    samples, _ = sample(model, n, seed=seed + 1)
    samples = samples.float().cpu()
    return (samples, model) if return_model else samples
