"""A convolutional classifier: NumPy layers trained by our own backprop, then PyTorch.

Chapter: ``book/cnn/cnn_classifier.md``.

References:
- LeCun et al. (1998), *Gradient-Based Learning Applied to Document Recognition*
  (LeNet-5: convolution, subsampling, convolution, subsampling, dense layers).
- Simard, Steinkraus & Platt (2003), *Best Practices for Convolutional Neural Networks
  Applied to Visual Document Analysis* (training on shifted and distorted digits).
- Xiao, Rasul & Vollgraf (2017), *Fashion-MNIST*.

The NumPy layers follow the protocol of ``dlabc.foundations.numpy_network``:
``forward(x)`` remembers what ``backward(grad_out)`` needs, ``backward`` returns the
gradient for the input and stores its parameters' gradients, ``parameters()`` lists
``(parameter, gradient)`` pairs. Images are ``(N, C, H, W)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dlabc.checks import check_array, check_positive_int
from dlabc.cnn.convolution import (
    conv2d,
    conv2d_backward,
    max_pool2d,
    max_pool2d_backward,
    output_size,
)
from dlabc.foundations.numpy_network import Dense, Network, ReLU

__all__ = [
    "Conv2d",
    "MaxPool2d",
    "Flatten",
    "random_shift",
    "numpy_cnn",
    "torch_cnn",
    "copy_to_torch",
]


class Conv2d:
    r"""A convolutional layer, ``(N, C, H, W) -> (N, O, Ho, Wo)``, on ``conv2d``.

    Weights are He-initialised, $\mathcal N(0, 2 / (C k^2))$: each output sums
    $C k^2$ products, as a dense layer with $C k^2$ inputs would.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        rng: np.random.Generator,
        padding: int = 0,
        dtype: type = np.float32,
    ) -> None:
        for name, n in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
        ):
            check_positive_int(n, name)
        fan_in = in_channels * kernel_size**2
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.W = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(dtype)
        self.b = np.zeros(out_channels, dtype=dtype)
        self.dW, self.db = np.zeros_like(self.W), np.zeros_like(self.b)
        self.padding = padding

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x  # (N, C, H, W), needed for dW and dx
        return conv2d(x, self.W, self.b, padding=self.padding)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        dx, self.dW[...], self.db[...] = conv2d_backward(
            grad_out, self.x, self.W, padding=self.padding
        )
        return dx

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.W, self.dW), (self.b, self.db)]


class MaxPool2d:
    """Max-pooling over ``k x k`` windows with stride ``k``: halves the size for k=2."""

    def __init__(self, kernel_size: int = 2) -> None:
        self.k = check_positive_int(kernel_size, "kernel_size")

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return max_pool2d(x, self.k)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return max_pool2d_backward(grad_out, self.x, self.k)

    def parameters(self) -> list:
        return []


class Flatten:
    """``(N, C, H, W) -> (N, C H W)``, the bridge from feature maps to dense layers."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out.reshape(self.shape)

    def parameters(self) -> list:
        return []


def random_shift(
    images: np.ndarray, max_shift: int, rng: np.random.Generator
) -> np.ndarray:
    """Move each image by its own random offset of up to ``max_shift`` pixels in each
    direction, filling with zeros: ``(N, C, H, W) -> (N, C, H, W)``.

    A digit moved by two pixels is still the same digit; training on such copies teaches
    the network the small shift invariance that pooling only approximates.
    """
    check_array(images, "images", ndim=4)
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    N, _, H, W = images.shape
    m = max_shift
    padded = np.pad(images, ((0, 0), (0, 0), (m, m), (m, m)))  # (N, C, H+2m, W+2m)
    dy, dx = rng.integers(0, 2 * m + 1, size=(2, N))  # where each crop starts
    rows = (dy[:, None] + np.arange(H))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + np.arange(W))[:, None, None, :]  # (N, 1, 1, W)
    batch = np.arange(N)[:, None, None, None]
    channels = np.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channels, rows, cols]


def _feature_size(image_size: int, kernel_size: int, n_blocks: int) -> int:
    """Side of the last feature map after ``n_blocks`` times (valid conv, 2×2 pool)."""
    size = image_size
    for block in range(n_blocks):
        if size < kernel_size + 1:  # the convolution would leave no 2x2 window to pool
            raise ValueError(
                f"a {image_size}-pixel image is too small for {n_blocks} blocks of "
                f"{kernel_size}x{kernel_size} convolution and 2x2 pooling: block "
                f"{block + 1} gets {size} pixels, it needs at least {kernel_size + 1}"
            )
        size = output_size(size, kernel_size) // 2
    return size


def _check_architecture(
    channels: tuple[int, ...],
    hidden: int,
    n_classes: int,
    kernel_size: int,
    image_size: int,
    in_channels: int,
) -> int:
    """Check the arguments of :func:`numpy_cnn` and :func:`torch_cnn`; return the side
    of the last feature map."""
    if not isinstance(channels, (tuple, list)):
        raise TypeError(f"channels must be a tuple of ints, got {channels!r}")
    if not channels:
        raise ValueError("channels must list at least one convolutional block")
    for c in channels:
        check_positive_int(c, "every entry of channels")
    for name, n in (
        ("hidden", hidden),
        ("n_classes", n_classes),
        ("kernel_size", kernel_size),
        ("image_size", image_size),
        ("in_channels", in_channels),
    ):
        check_positive_int(n, name)
    return _feature_size(image_size, kernel_size, len(channels))


def numpy_cnn(
    channels: tuple[int, ...] = (8, 16),
    hidden: int = 100,
    n_classes: int = 10,
    kernel_size: int = 5,
    image_size: int = 28,
    in_channels: int = 1,
    seed: int = 0,
    dtype: type = np.float32,
) -> Network:
    """A LeNet-style network: per entry of ``channels``, (conv, ReLU, 2×2 max-pool);
    then flatten, a dense layer of ``hidden`` units with ReLU, and the class scores.
    """
    side = _check_architecture(
        channels, hidden, n_classes, kernel_size, image_size, in_channels
    )
    rng = np.random.default_rng(seed)
    layers, c_in = [], in_channels
    for c_out in channels:
        layers += [
            Conv2d(c_in, c_out, kernel_size, rng, dtype=dtype),
            ReLU(),
            MaxPool2d(2),
        ]
        c_in = c_out
    layers += [Flatten(), Dense(c_in * side**2, hidden, rng), ReLU()]
    layers += [Dense(hidden, n_classes, rng)]
    for layer in layers:  # the dense layers start in float64; keep one dtype
        if isinstance(layer, Dense):
            layer.W, layer.b = layer.W.astype(dtype), layer.b.astype(dtype)
            layer.dW, layer.db = np.zeros_like(layer.W), np.zeros_like(layer.b)
    return Network(layers)


def torch_cnn(
    channels: tuple[int, ...] = (8, 16),
    hidden: int = 100,
    n_classes: int = 10,
    kernel_size: int = 5,
    image_size: int = 28,
    in_channels: int = 1,
    batch_norm: bool = False,
) -> nn.Sequential:
    """The same network as :func:`numpy_cnn`, layer for layer, from ``torch.nn``.

    With ``batch_norm`` a block is conv (no bias, which the normalization would cancel),
    2×2 max-pool, ``nn.BatchNorm2d``, ReLU. ReLU commutes with max-pooling, so pooling
    first computes the same thing on a quarter of the values (BatchNorm nearly: its
    statistics then come from the pooled values).
    """
    side = _check_architecture(
        channels, hidden, n_classes, kernel_size, image_size, in_channels
    )
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in channels:
        layers.append(nn.Conv2d(c_in, c_out, kernel_size, bias=not batch_norm))
        if batch_norm:
            layers += [nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.ReLU()]
        else:
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c_out
    layers += [nn.Flatten(), nn.Linear(c_in * side**2, hidden), nn.ReLU()]
    layers += [nn.Linear(hidden, n_classes)]
    return nn.Sequential(*layers)


def copy_to_torch(network: Network, model: nn.Sequential) -> nn.Sequential:
    """Copy the weights of a :func:`numpy_cnn` into the matching :func:`torch_cnn`.

    ``Conv2d`` weights have the same layout in both; a dense layer stores ``W`` as
    ``(in, out)`` and ``nn.Linear`` as ``(out, in)``, so it is transposed.
    """
    if any(isinstance(m, nn.BatchNorm2d) for m in model):
        raise ValueError(
            "the model has BatchNorm layers, which the NumPy network lacks"
        )
    ours = [layer for layer in network.layers if isinstance(layer, (Conv2d, Dense))]
    theirs = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(ours) != len(theirs):
        raise ValueError(
            f"the NumPy network has {len(ours)} weight layers, the model {len(theirs)}"
        )
    weights = [layer.W if isinstance(layer, Conv2d) else layer.W.T for layer in ours]
    for weight, module in zip(weights, theirs, strict=True):  # all, before copying any
        if tuple(module.weight.shape) != weight.shape:
            raise ValueError(
                f"weight shapes differ: {weight.shape} vs {tuple(module.weight.shape)}"
            )
    with torch.no_grad():
        for layer, weight, module in zip(ours, weights, theirs, strict=True):
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            module.bias.copy_(torch.from_numpy(layer.b))
    return model
