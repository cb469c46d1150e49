r"""SimCLR: contrastive learning of image features without labels.

Two random views of each image go through a shared encoder $f$ and a projection head
$g$; the NT-Xent loss makes each view pick its partner out of the $2N - 1$ other views
of the batch. The encoder's features $h = f(x)$ are then judged by a linear probe: a
logistic regression trained on frozen features with labels.

Chapter: ``book/multimodal/simclr.md``. This module also holds the pieces the part's
other chapters share (MoCo, MAE): :func:`fashion_subset`, :func:`augment`,
:class:`Encoder` and :func:`linear_probe`.

References:
- Chen, Kornblith, Norouzi & Hinton (2020), *A Simple Framework for Contrastive Learning
  of Visual Representations*, ICML (the augmentations, the projection head, NT-Xent,
  the linear evaluation protocol).
- Oord, Li & Vinyals (2018), *Representation Learning with Contrastive Predictive
  Coding* (the InfoNCE loss that NT-Xent is a symmetric, normalised form of).
- Xiao, Rasul & Vollgraf (2017), *Fashion-MNIST* (the images).

Shapes: ``B`` (or ``N``) images of ``(C, H, W)`` pixels, two views per image, so the
loss sees ``2N`` embeddings of ``d`` numbers.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.data import load_fashion_mnist
from dlabc.train import History, endless_minibatches, train_steps

__all__ = [
    "fashion_subset",
    "augment",
    "Encoder",
    "linear_probe",
    "nt_xent",
    "SimCLR",
    "train_simclr",
    "train_supervised",
    "probe_encoder",
]


# ----------------------------------------------------------------------- the data


@functools.lru_cache(maxsize=2)
def _fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist(split)


def fashion_subset(
    split: str, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Fashion-MNIST images of ``split`` ("train" or "test"): float32 images
    ``(n, 1, 28, 28)`` in [0, 1] and int64 labels ``(n,)``.

    The images are a seeded uniformly random subset without replacement (``seed`` picks
    it), so the classes are only roughly balanced, not exactly.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    X, y = _fashion(split)
    if n > len(X):
        raise ValueError(f"n must be at most {len(X)} for split {split!r}, got {n}")
    index = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:n]
    index = index.numpy()
    images = torch.from_numpy(X[index].copy()).unsqueeze(1)  # (n, 1, 28, 28)
    return images, torch.from_numpy(y[index].copy())


# -------------------------------------------------------------- the augmentations


def _resized_crop(
    images: torch.Tensor,
    width: torch.Tensor,
    height: torch.Tensor,
    center_x: torch.Tensor,
    center_y: torch.Tensor,
    flip: torch.Tensor,
) -> torch.Tensor:
    r"""Crop a box out of each image and resize it back to full size, in one
    ``grid_sample`` for the whole batch.

    Box sides ``width``, ``height`` are fractions of the image's (in (0, 1]), centres in
    the normalised coordinates [-1, 1] of ``affine_grid``; ``flip`` is 1 or 0 per image.
    The affine map from output to input coordinates is
    $\begin{pmatrix} \pm w & 0 & c_x \\ 0 & h & c_y \end{pmatrix}$,
    the sign mirroring the image left to right.
    """
    B = images.shape[0]
    theta = torch.zeros(B, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = width * (1 - 2 * flip)  # horizontal scale, negative = mirrored
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _gaussian_blur(
    images: torch.Tensor, sigma: torch.Tensor, radius: int
) -> torch.Tensor:
    r"""Blur each image with its own Gaussian, $k(u) \propto e^{-u^2 / 2\sigma^2}$ for
    $|u| \le$ ``radius``, separably (rows, then columns), mirroring at the edges."""
    B, C, H, W = images.shape
    u = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(u**2) / (2 * sigma[:, None] ** 2))  # (B, 2r + 1)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(
        C, 0
    )  # (BC, 2r+1)
    x = images.reshape(1, B * C, H, W)  # one group per image and channel
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=B * C)  # along rows
    x = F.conv2d(x, kernel[:, None, :, None], groups=B * C)  # along columns
    return x.reshape(B, C, H, W)


def augment(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
    blur: float = 0.5,
    sigma: tuple[float, float] = (0.1, 1.0),
) -> torch.Tensor:
    r"""One random view of each image ``(B, C, H, W)`` in [0, 1], SimCLR's recipe in
    plain PyTorch; same shape, on the images' device.

    Per image: a random resized crop (area fraction $s$ uniform in ``scale``, aspect
    ratio $r$ log-uniform in ``ratio``, so the box is $\sqrt{s r}$ wide and
    $\sqrt{s / r}$ high, clipped to the image, at a uniform position inside it), a
    horizontal flip with probability ``flip``, brightness jitter (multiply by $b$
    uniform in $1 \pm$ ``brightness``) and contrast jitter (scale the deviations from
    the image's mean by $c$ uniform in $1 \pm$ ``contrast``), then, with probability
    ``blur``, a Gaussian blur of width $\sigma$ uniform in ``sigma`` pixels (5×5
    kernel). Pixels are clipped to [0, 1]. All random numbers come from ``generator``.
    """
    check_tensor(images, "images", ndim=4, floating=True)
    lo, hi = (check_number(v, "scale", low=0, high=1, low_open=True) for v in scale)
    r_lo, r_hi = (check_number(v, "ratio", low=0, low_open=True) for v in ratio)
    if lo > hi or r_lo > r_hi:
        raise ValueError(f"scale and ratio must be (low, high), got {scale}, {ratio}")
    for value, name in ((flip, "flip"), (blur, "blur")):
        check_number(value, name, low=0, high=1)
    for value, name in ((brightness, "brightness"), (contrast, "contrast")):
        check_number(value, name, low=0, high=1)
    check_number(sigma[0], "sigma", low=0, low_open=True)
    check_number(sigma[1], "sigma", low=0, low_open=True)
    return _augment(
        images,
        generator,
        (lo, hi),
        (r_lo, r_hi),
        flip,
        brightness,
        contrast,
        blur,
        sigma,
    )


def _augment(
    images: torch.Tensor,
    generator: torch.Generator | None,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: float,
    brightness: float,
    contrast: float,
    blur: float,
    sigma: tuple[float, float],
) -> torch.Tensor:
    """SimCLR's view of each image of a batch: random resized crop and flip (one
    ``grid_sample``), brightness and contrast jitter, and sometimes a Gaussian blur;
    every random number per image, from ``generator``."""
    B = images.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(low: float, high: float) -> torch.Tensor:  # (B,) on the images' device
        u = torch.rand(B, generator=generator, device=gen_device)
        return (low + (high - low) * u).to(images.device, images.dtype)

    # random resized crop: area s, aspect ratio r = width / height
    s = uniform(*scale)
    r = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    width = torch.sqrt(s * r).clamp(max=1.0)
    height = torch.sqrt(s / r).clamp(max=1.0)
    center_x = (1 - width) * uniform(-1.0, 1.0)  # the box stays inside the image
    center_y = (1 - height) * uniform(-1.0, 1.0)
    mirrored = (uniform(0.0, 1.0) < flip).to(images.dtype)
    x = _resized_crop(images, width, height, center_x, center_y, mirrored)
    # brightness and contrast jitter
    b = uniform(1 - brightness, 1 + brightness)[:, None, None, None]
    c = uniform(1 - contrast, 1 + contrast)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean) * b
    # Gaussian blur for some of the images
    blurred = _gaussian_blur(x, uniform(*sigma), radius=2)
    chosen = (uniform(0.0, 1.0) < blur)[:, None, None, None]
    x = torch.where(chosen, blurred, x)
    return x.clamp(0.0, 1.0)


# ------------------------------------------------------------------- the encoder


class Encoder(nn.Module):
    """A small CNN $f$: ``(B, 1, 28, 28)`` images to ``(B, d_features)`` features $h$.

    Three blocks of 3×3 convolution, batch normalisation and ReLU, each halving the
    image with stride 2 (28 → 14 → 7 → 4), then global average pooling and a linear
    layer. ``width`` is the first block's channels (doubled per block).
    """

    def __init__(self, d_features: int = 128, width: int = 16, in_channels: int = 1):
        super().__init__()
        check_positive_int(d_features, "d_features")
        check_positive_int(width, "width")
        check_positive_int(in_channels, "in_channels")
        channels = [in_channels, width, 2 * width, 4 * width]
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
        self.convs = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels[-1], d_features)
        self.d_features = d_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)  # (B, 4 width, 4, 4)
        x = x.mean(dim=(2, 3))  # global average pool: (B, 4 width)
        return self.fc(x)  # (B, d_features)


# ------------------------------------------------------------------ linear probe


def _check_features(features: object, labels: object, name: str) -> None:
    check_tensor(features, f"{name}_features", ndim=2, floating=True)
    check_tensor(labels, f"{name}_labels", ndim=1, dtype=torch.int64)
    if len(features) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"{name}_features and {name}_labels must be non-empty and of the same "
            f"length, got {len(features)} and {len(labels)}"
        )


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    steps: int = 200,
    lr: float = 1.0,
    *,
    weight_decay: float = 1e-3,
    return_model: bool = False,
) -> float | tuple[float, torch.Tensor, torch.Tensor]:
    r"""Test accuracy of a multinomial logistic regression on frozen features.

    The features are standardised with the training set's mean and standard deviation,
    then $W, b$ minimise the mean cross-entropy plus $\frac{\lambda}{2} \lVert W
    \rVert^2$ (``weight_decay`` $= \lambda$; scikit-learn's ``C`` is $1 / (\lambda n)$)
    by full-batch L-BFGS for at most ``steps`` iterations with step size ``lr``, from
    zero, so the result is deterministic. Returns the accuracy in [0, 1] on the test
    features (with ``return_model``, also ``W`` ``(d, classes)`` and ``b``).
    The features are detached: the encoder stays frozen.
    """
    _check_features(train_features, train_labels, "train")
    _check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            "train_features and test_features must have the same number of columns, "
            f"got {train_features.shape[1]} and {test_features.shape[1]}"
        )
    check_positive_int(steps, "steps")
    check_number(lr, "lr", low=0, low_open=True)
    check_number(weight_decay, "weight_decay", low=0)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    W, b = _fit_probe(
        train_features.detach(), train_labels, n_classes, steps, lr, weight_decay
    )
    mean, std = _standardiser(train_features.detach())
    logits = ((test_features.detach() - mean) / std) @ W + b
    accuracy = (logits.argmax(1) == test_labels).double().mean().item()
    return (accuracy, W, b) if return_model else accuracy


def _standardiser(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = features.mean(0)
    std = features.std(0, unbiased=False).clamp(min=1e-6)  # constant columns stay 0
    return mean, std


def _fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    steps: int,
    lr: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(d, classes)`` and biases of the probe on standardised features."""
    mean, std = _standardiser(features)
    x = ((features - mean) / std).double()  # (n, d)
    W = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device)
    W.requires_grad_(True)
    b.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [W, b],
        lr=lr,
        max_iter=steps,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (
            F.cross_entropy(x @ W + b, labels) + 0.5 * weight_decay * W.square().sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    dtype = features.dtype
    return W.detach().to(dtype), b.detach().to(dtype)


# ---------------------------------------------------------------------- NT-Xent


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    r"""SimCLR's normalised temperature-scaled cross-entropy of two views' embeddings
    ``z1``, ``z2`` ``(N, d)``, where row ``k`` of both comes from image ``k``: the mean
    over all $2N$ views of :func:`_nt_xent`'s $\ell_i$."""
    check_tensor(z1, "z1", ndim=2, floating=True)
    check_tensor(z2, "z2", ndim=2, floating=True)
    if z1.shape != z2.shape or len(z1) < 2:
        raise ValueError(
            "z1 and z2 must have the same shape (N, d) with N >= 2, "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    check_number(temperature, "temperature", low=0, low_open=True)
    return _nt_xent(z1, z2, temperature)


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""NT-Xent (eq. `eq-simclr-nt-xent`): with $s_{ij}$ the cosine similarity of views
    $i$ and $j$ among the $2N$ views and $p(i)$ the other view of $i$'s image,

    $\ell_i = -\log \frac{\exp(s_{i, p(i)} / \tau)}{\sum_{k \ne i} \exp(s_{ik} / \tau)}
    = -\frac{s_{i, p(i)}}{\tau} + \log \sum_{k \ne i} e^{s_{ik} / \tau}$,

    averaged over the $2N$ views $i$.
    """
    N = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # unit vectors: (2N, d)
    s = z @ z.T / temperature  # s_ik / tau: (2N, 2N)
    self_pairs = torch.eye(2 * N, dtype=torch.bool, device=z.device)
    s = s.masked_fill(self_pairs, float("-inf"))  # the sum runs over k != i
    partner = torch.cat([torch.arange(N, 2 * N), torch.arange(N)]).to(z.device)
    positive = s[torch.arange(2 * N, device=z.device), partner]  # s_i,p(i) / tau
    return (torch.logsumexp(s, dim=1) - positive).mean()  # mean of l_i


# ------------------------------------------------------------ the SimCLR model


class SimCLR(nn.Module):
    r"""The encoder $f$ and the projection head $g$: $h = f(x)$ is the representation
    kept for later tasks, $z = g(h) = W_2 \, \mathrm{ReLU}(W_1 h)$ the embedding that
    NT-Xent compares (``d_projection`` numbers)."""

    def __init__(self, encoder: nn.Module, d_projection: int = 64):
        super().__init__()
        if not isinstance(encoder, nn.Module) or not hasattr(encoder, "d_features"):
            raise TypeError("encoder must be an nn.Module with a d_features attribute")
        check_positive_int(d_projection, "d_projection")
        d = encoder.d_features
        self.encoder = encoder  # f
        self.head = nn.Sequential(  # g
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d_projection)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)  # representation: (B, d_features)
        return self.head(h)  # embedding: (B, d_projection)


def _simclr_step(
    model: SimCLR,
    images: torch.Tensor,
    temperature: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One batch of SimCLR: two random views of every image, one encoder and head for
    both, NT-Xent between them."""
    view1 = augment(images, generator)  # t(x): (N, 1, 28, 28)
    view2 = augment(images, generator)  # t'(x), drawn independently
    z = model(torch.cat([view1, view2]))  # both views in one batch: (2N, d_projection)
    z1, z2 = z.chunk(2)
    return _nt_xent(z1, z2, temperature)


def _check_training(
    encoder: object, images: object, steps: int, batch_size: int, lr: float
) -> None:
    if not isinstance(encoder, Encoder):
        raise TypeError(f"encoder must be an Encoder, got {type(encoder).__name__}")
    check_tensor(images, "images", ndim=4, floating=True)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    if batch_size > len(images):
        raise ValueError(
            f"batch_size must be at most the number of images ({len(images)}), "
            f"got {batch_size}"
        )
    check_number(lr, "lr", low=0, low_open=True)


def train_simclr(
    encoder: Encoder,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    temperature: float = 0.5,
    lr: float = 3e-3,
    d_projection: int = 64,
    seed: int = 0,
) -> History:
    """Train ``encoder`` (in place) with SimCLR on unlabelled ``images``
    ``(n, 1, H, W)`` for ``steps`` Adam steps of ``batch_size`` images (``2 batch_size``
    views); returns the loss of every step. ``seed`` picks the batches and the
    augmentations.

    The paper trains with LARS at batch sizes up to 8192; Adam with a small batch is
    the CPU version.
    """
    _check_training(encoder, images, steps, batch_size, lr)
    if batch_size < 2:
        raise ValueError(
            f"batch_size must be at least 2 for negatives, got {batch_size}"
        )
    check_number(temperature, "temperature", low=0, low_open=True)
    generator = torch.Generator().manual_seed(seed)
    model = SimCLR(encoder, d_projection).to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = endless_minibatches(len(images), batch_size, generator)
    history = train_steps(
        model,
        optimizer,
        batches,
        lambda m, index: _simclr_step(m, images[index], temperature, generator),
        steps=steps,
    )
    encoder.eval()
    return history


def train_supervised(
    encoder: Encoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> History:
    """Train ``encoder`` (in place) with a linear classifier on top, by cross-entropy
    on one augmented view of each labelled image: the same images, augmentations,
    optimizer and steps as :func:`train_simclr`, with labels instead of a second
    view."""
    _check_training(encoder, images, steps, batch_size, lr)
    check_tensor(labels, "labels", ndim=1, dtype=torch.int64)
    if len(labels) != len(images):
        raise ValueError(
            f"labels must have one entry per image, got {len(labels)} and {len(images)}"
        )
    generator = torch.Generator().manual_seed(seed)
    classes = int(labels.max()) + 1
    model = nn.Sequential(encoder, nn.Linear(encoder.d_features, classes))
    model = model.to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = endless_minibatches(len(images), batch_size, generator)
    history = train_steps(
        model,
        optimizer,
        batches,
        lambda m, index: F.cross_entropy(
            m(augment(images[index], generator)), labels[index]
        ),
        steps=steps,
    )
    encoder.eval()
    return history


@torch.no_grad()
def probe_encoder(
    encoder: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    **probe_options: object,
) -> float:
    """Linear-probe test accuracy of a frozen ``encoder``: its features $h$ of the
    ``(images, labels)`` pairs ``train`` and ``test``, in evaluation mode, given to
    :func:`linear_probe`."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    was_training = encoder.training
    encoder.eval()
    try:
        h_train, h_test = encoder(train[0]), encoder(test[0])  # (n, d_features)
    finally:
        encoder.train(was_training)
    return linear_probe(h_train, train[1], h_test, test[1], **probe_options)
