r"""Uniform (int8 and lower) quantization of a network, simulated in floating point:
the affine and symmetric integer grids, their scale and zero point, post-training
calibration (min-max, percentile, MSE-optimal clipping), and quantization-aware training
with fake quantization and the straight-through estimator.

Chapter: ``book/efficiency/quantization.md``.

References:
- Jacob et al. (2018), *Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference*, CVPR (the affine scheme
  $x \approx s\,(x_q - z)$ with an integer zero point, and fake quantization in
  training).
- Krishnamoorthi (2018), *Quantizing deep convolutional networks for efficient
  inference: A whitepaper*, arXiv:1806.08342 (per-channel weights, per-tensor
  activations, post-training calibration and quantization-aware training compared).
- Bengio, Léonard & Courville (2013), *Estimating or Propagating Gradients Through
  Stochastic Neurons*, arXiv:1308.3432 (the straight-through estimator).
- Nagel et al. (2021), *A White Paper on Neural Network Quantization*, arXiv:2106.08295
  (MSE-based range setting, the noise model $s^2/12$).

The integer grid of ``bits`` bits is ``qmin..qmax``: ``0..2**bits - 1`` for the affine
(asymmetric) scheme, ``-2**(bits-1)..2**(bits-1) - 1`` for the symmetric one, as
PyTorch's ``quint8`` and ``qint8``. Rounding is PyTorch's ``torch.round``, half to
even. Everything here is *simulated*: integers are held in float or int32 tensors and
no integer kernel runs.

The public functions are meant to be reused: ``qparams`` chooses the grid, ``quantize``
and ``dequantize`` move between floats and integers, ``fake_quantize`` does both with
the straight-through gradient. ``axis`` names the channel dimension for per-channel
scales (``scale`` and ``zero_point`` then have one entry per channel).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.train import History, endless_minibatches, train_steps

__all__ = [
    "QParams",
    "qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "clipping_range",
    "QuantizedLayer",
    "quantize_model",
    "calibrate",
    "model_size_bytes",
    "train_classifier",
]

_EPS = torch.finfo(torch.float32).eps  # the smallest scale, as PyTorch's observers
_LAYERS = (nn.Linear, nn.Conv2d)  # the layers quantize_model wraps


class QParams(NamedTuple):
    """The integer grid: ``scale`` and ``zero_point`` (tensors, one entry per channel or
    a 0-d tensor) and the integer range ``qmin..qmax``."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


# ------------------------------------------------------------ the grid and its maps


def qparams(
    x_min: torch.Tensor | float,
    x_max: torch.Tensor | float,
    bits: int = 8,
    symmetric: bool = False,
) -> QParams:
    r"""The scale and zero point that map the float range ``[x_min, x_max]`` (widened to
    contain 0) onto the integer grid of ``bits`` bits, with PyTorch's observers'
    formulas (``MinMaxObserver.calculate_qparams``).

    Affine, grid $0 \dots 2^b - 1$: $s = (\max - \min)/(q_{\max} - q_{\min})$,
    $z = q_{\min} - \operatorname{round}(\min / s)$. Symmetric, grid
    $-2^{b-1} \dots 2^{b-1} - 1$:
    $s = \max(|\min|, |\max|) / ((q_{\max} - q_{\min})/2)$, $z = 0$. ``x_min``,
    ``x_max``: numbers or tensors of one shape (per channel)."""
    check_positive_int(bits, "bits")
    if bits > 16:
        raise ValueError(f"bits must be at most 16, got {bits}")
    x_min, x_max = (torch.as_tensor(v, dtype=torch.float32) for v in (x_min, x_max))
    if x_min.shape != x_max.shape:
        raise ValueError(
            f"x_min and x_max must have the same shape, got {tuple(x_min.shape)} "
            f"and {tuple(x_max.shape)}"
        )
    if x_min.device.type == "cpu" and bool((x_min > x_max).any()):
        raise ValueError("x_min must not exceed x_max")
    return _qparams(x_min, x_max.to(x_min.device), bits, bool(symmetric))


def _qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> QParams:
    r"""$s$ and $z$ of the grid that covers $[\min(x_{\min}, 0), \max(x_{\max}, 0)]$."""
    lo = torch.clamp(x_min, max=0.0)  # the range always holds 0, so that 0 is exact
    hi = torch.clamp(x_max, min=0.0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)  # s = max|x| / (2^b - 1)/2
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)  # z = 0
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=_EPS)  # s = range / steps
        zero_point = qmin - torch.round(lo / scale).long()  # z: the integer of x = 0
        zero_point = torch.clamp(zero_point, qmin, qmax)
    return QParams(scale, zero_point, qmin, qmax)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    r"""The integers $x_q = \operatorname{clamp}(\operatorname{round}(x/s) + z,
    q_{\min}, q_{\max})$ (int32, same shape as ``x``); round half to even.

    Per tensor, ``scale`` and ``zero_point`` are numbers or 0-d tensors; per channel
    (``axis`` given) they have one entry per index of ``x``'s dimension ``axis``.

    Bit for bit the integers of ``torch.fake_quantize_per_tensor_affine``.
    ``torch.quantize_per_tensor`` adds $z$ before rounding (one fused multiply-add) and
    so can differ by one step where $x/s$ is within a float32 rounding error of
    $k + 1/2$; no single formula equals all of PyTorch's kernels there.
    """
    scale, zero_point = _check_grid(x, scale, zero_point, qmin, qmax, axis)
    return _quantize(x, scale, zero_point, qmin, qmax).to(torch.int32)


def _quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    r"""$x_q = \operatorname{clamp}(\operatorname{round}(x \cdot (1/s)) + z,
    q_{\min}, q_{\max})$, integer values in ``x``'s float dtype; ``scale`` and
    ``zero_point`` already broadcast against ``x``."""
    steps = torch.round(x * (1.0 / scale))  # round(x/s), half to even, as PyTorch
    return torch.clamp(steps + zero_point, qmin, qmax)  # + z, then onto the grid


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    axis: int | None = None,
) -> torch.Tensor:
    r"""The floats $\hat x = s\,(x_q - z)$ (float32) that the integers ``q`` stand for;
    ``axis`` as in :func:`quantize`."""
    check_tensor(q, "q")
    if q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor, got dtype {q.dtype}")
    scale, zero_point = _broadcast(q, scale, zero_point, axis)
    return (q.float() - zero_point) * scale  # x̂ = s (x_q - z)


class _FakeQuantize(torch.autograd.Function):
    r"""$\hat x = s\,(\operatorname{clamp}(\operatorname{round}(x/s) + z) - z)$ forward;
    the straight-through gradient backward: $\partial \hat x / \partial x = 1$ where
    $q_{\min} \le \operatorname{round}(x/s) + z \le q_{\max}$, else 0."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x * (1.0 / scale)) + zero_point  # round(x/s) + z, unclamped
        inside = (q >= qmin) & (q <= qmax)  # the grid's range: where the STE passes
        ctx.save_for_backward(inside)
        return (torch.clamp(q, qmin, qmax) - zero_point) * scale  # s (x_q - z)

    @staticmethod
    def backward(ctx, grad_output):
        (inside,) = ctx.saved_tensors
        # straight through the rounding, zero where the clamp cut x off
        return grad_output * inside, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    r"""Quantize and dequantize in one step, $\hat x = s\,(x_q - z)$, differentiable
    with the straight-through estimator (the gradient is passed unchanged where $x$ lies
    inside the grid's range and is zero where the clamp cut it off). No gradient flows
    to ``scale`` or ``zero_point``. ``axis`` as in :func:`quantize`."""
    scale, zero_point = _check_grid(x, scale, zero_point, qmin, qmax, axis)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    return _FakeQuantize.apply(x, scale, zero_point.to(x.dtype), qmin, qmax)


def _check_grid(
    x: object,
    scale: object,
    zero_point: object,
    qmin: object,
    qmax: object,
    axis: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor(x, "x", floating=True)
    for value, name in ((qmin, "qmin"), (qmax, "qmax")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if qmin >= qmax:
        raise ValueError(f"qmin must be below qmax, got {qmin} and {qmax}")
    scale, zero_point = _broadcast(x, scale, zero_point, axis)
    if scale.device.type == "cpu" and bool((scale <= 0).any()):
        raise ValueError("scale must be positive")
    return scale, zero_point


def _broadcast(
    x: torch.Tensor, scale: object, zero_point: object, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` (float32) and ``zero_point`` shaped to broadcast against ``x``."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, device=x.device)
    if zero_point.is_floating_point():
        raise TypeError(f"zero_point must be an integer, got dtype {zero_point.dtype}")
    if axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(
                "per-tensor scale and zero_point must be single numbers; "
                "give axis for per-channel ones"
            )
        return scale.reshape(()), zero_point.reshape(()).float()
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
    axis = axis % x.dim()
    channels = x.shape[axis]
    if scale.shape != (channels,) or zero_point.shape != (channels,):
        raise ValueError(
            f"per-channel scale and zero_point must have shape ({channels},), got "
            f"{tuple(scale.shape)} and {tuple(zero_point.shape)}"
        )
    shape = [1] * x.dim()
    shape[axis] = channels
    return scale.reshape(shape), zero_point.reshape(shape).float()


# ------------------------------------------------------------------ calibration


def clipping_range(
    x: torch.Tensor,
    method: str = "minmax",
    bits: int = 8,
    symmetric: bool = False,
    percentile: float = 99.99,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The float range ``(x_min, x_max)`` to quantize ``x`` with, per tensor.

    ``"minmax"``: the smallest and largest value. ``"percentile"``: the
    ``100 - percentile`` and ``percentile`` percentiles (clips the rarest values).
    ``"mse"``: the min-max range shrunk by the factor $\alpha \in [0.05, 1]$ that
    minimises the mean squared error $\lVert \hat x - x \rVert^2$ of
    :func:`fake_quantize` with ``bits`` bits (a grid search of 64 values).
    """
    check_tensor(x, "x", floating=True)
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    if method not in ("minmax", "percentile", "mse"):
        raise ValueError(f"method must be minmax, percentile or mse, got {method!r}")
    check_positive_int(bits, "bits")
    check_number(percentile, "percentile", low=50, high=100)
    return _clipping_range(x.detach().flatten(), method, bits, symmetric, percentile)


def _clipping_range(
    x: torch.Tensor, method: str, bits: int, symmetric: bool, percentile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range of the flattened ``x`` by ``method`` (see :func:`clipping_range`)."""
    if method == "percentile":
        sample = x[:: max(1, x.numel() // 2**24)].float()  # quantile's size limit
        p = torch.tensor([100 - percentile, percentile], device=x.device) / 100
        lo, hi = torch.quantile(sample, p.to(sample.dtype))
        return lo, hi
    lo, hi = x.min(), x.max()
    if method == "minmax":
        return lo, hi
    alphas = torch.linspace(0.05, 1.0, 64, device=x.device)  # shrink the range by α
    errors = torch.stack(
        [_mse(x, _qparams(a * lo, a * hi, bits, symmetric)) for a in alphas]
    )
    best = alphas[errors.argmin()]  # the α of the smallest MSE
    return best * lo, best * hi


def _mse(x: torch.Tensor, grid: QParams) -> torch.Tensor:
    """The mean squared error of fake-quantizing ``x`` on ``grid``."""
    q = _quantize(x, grid.scale, grid.zero_point.float(), grid.qmin, grid.qmax)
    return ((q - grid.zero_point) * grid.scale - x).square().mean()


# --------------------------------------------------------- a quantized network


class QuantizedLayer(nn.Module):
    r"""A ``nn.Linear`` or ``nn.Conv2d`` that computes with fake-quantized numbers:
    its input per tensor (affine, ``act_bits``) and its weight per output channel
    (symmetric, ``weight_bits``), $y = \hat W * \hat x + b$; the bias stays float.

    The input's range is set by :func:`calibrate` and, while training (QAT), follows an
    exponential moving average of each batch's min and max (momentum ``0.01``, as
    PyTorch's ``MovingAverageMinMaxObserver``). ``act_bits=None`` leaves the input in
    float (weight-only quantization); ``weight_bits=None`` leaves the weight in float.
    """

    def __init__(
        self,
        layer: nn.Module,
        weight_bits: int | None = 8,
        act_bits: int | None = 8,
        momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"layer must be nn.Linear or nn.Conv2d, got {layer!r}")
        for bits, name in ((weight_bits, "weight_bits"), (act_bits, "act_bits")):
            if bits is not None:
                check_positive_int(bits, name)
        self.layer, self.weight_bits, self.act_bits = layer, weight_bits, act_bits
        self.momentum = check_number(momentum, "momentum", low=0, high=1)
        self.register_buffer("act_min", torch.tensor(0.0))
        self.register_buffer("act_max", torch.tensor(0.0))
        self.calibrated = False  # forward fake-quantizes the input only once it is
        self.observed: list[torch.Tensor] | None = None  # inputs kept by calibrate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""$y = \operatorname{layer}(\hat x; \hat W)$, with $\hat x$ and $\hat W$
        fake-quantized."""
        if self.observed is not None:  # calibrating: keep the input, compute in float
            self.observed.append(x.detach())
            return self.layer(x)
        if self.act_bits is not None and self.calibrated:
            if self.training:  # QAT: the range follows the batches' min and max
                c = self.momentum
                self.act_min.lerp_(x.detach().min(), c)  # min ← (1 - c) min + c min(x)
                self.act_max.lerp_(x.detach().max(), c)
            grid = _qparams(self.act_min, self.act_max, self.act_bits, False)
            x = _FakeQuantize.apply(x, *grid)  # x̂, per tensor
        weight = self.layer.weight
        if self.weight_bits is not None:
            w = weight.detach().flatten(1)  # (C_out, fan_in)
            grid = _qparams(w.amin(1), w.amax(1), self.weight_bits, True)
            shape = (-1,) + (1,) * (weight.dim() - 1)  # one scale per output channel
            scale, zero = grid.scale.reshape(shape), grid.zero_point.reshape(shape)
            weight = _FakeQuantize.apply(weight, scale, zero, grid.qmin, grid.qmax)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)


def quantize_model(
    model: nn.Module, weight_bits: int | None = 8, act_bits: int | None = 8
) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` and ``nn.Conv2d`` wrapped in a
    :class:`QuantizedLayer`; ``model`` itself is not changed. Call :func:`calibrate`
    on the copy before using it when ``act_bits`` is given."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    copied = copy.deepcopy(model)
    targets = [
        (name, m) for name, m in copied.named_modules() if isinstance(m, _LAYERS)
    ]
    if not targets:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to quantize")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, child, QuantizedLayer(layer, weight_bits, act_bits))
    return copied


@torch.no_grad()
def calibrate(
    model: nn.Module,
    X: torch.Tensor,
    method: str = "minmax",
    batch_size: int = 256,
) -> nn.Module:
    """Post-training calibration: run the calibration images ``X`` through ``model`` (a
    :func:`quantize_model` copy) in float, and set every layer's input range by
    :func:`clipping_range` with ``method``; return ``model``, now fake-quantizing."""
    check_tensor(X, "X", floating=True)
    check_positive_int(batch_size, "batch_size")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    if not layers:
        raise ValueError("model has no QuantizedLayer: quantize_model() it first")
    if method not in ("minmax", "percentile", "mse"):
        raise ValueError(f"method must be minmax, percentile or mse, got {method!r}")
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.observed = []
    try:
        for start in range(0, len(X), batch_size):
            model(X[start : start + batch_size])
    finally:
        model.train(was_training)
        observed = [layer.observed for layer in layers]
        for layer in layers:
            layer.observed = None
    for layer, inputs in zip(layers, observed, strict=True):
        if layer.act_bits is not None:
            x = torch.cat([t.flatten() for t in inputs])
            lo, hi = _clipping_range(x, method, layer.act_bits, False, 99.99)
            layer.act_min.fill_(lo)
            layer.act_max.fill_(hi)
        layer.calibrated = True
    return model


def model_size_bytes(model: nn.Module, weight_bits: int | None = None) -> int:
    """The bytes to store ``model``'s parameters: float32 everywhere
    (``weight_bits=None``), or the weights of its ``nn.Linear`` / ``nn.Conv2d`` layers
    packed in ``weight_bits`` bits with one float32 scale per output channel (the
    symmetric grid needs no zero point) and the biases in float32."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if weight_bits is not None:
        check_positive_int(weight_bits, "weight_bits")
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if (
                weight_bits is not None
                and name == "weight"
                and isinstance(module, _LAYERS)
            ):
                packed = -(-p.numel() * weight_bits // 8)  # ceil(bits / 8) bytes
                total += packed + 4 * p.shape[0]  # + a float32 scale per channel
            else:
                total += 4 * p.numel()
    return total


def train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> History:
    """Train ``model`` (a float model, or a :func:`quantize_model` copy for QAT) with
    Adam on the cross-entropy of ``(X, y)`` for ``steps`` mini-batch steps."""
    check_tensor(X, "X", floating=True)
    check_tensor(y, "y", ndim=1, dtype=torch.long)
    if len(X) != len(y):
        raise ValueError(
            f"X and y must have the same length, got {len(X)} and {len(y)}"
        )
    check_number(lr, "lr", low=0, low_open=True)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = endless_minibatches(len(X), batch_size, generator)

    def loss_fn(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        index = index.to(X.device)
        return F.cross_entropy(model(X[index]), y[index])

    return train_steps(model, optimizer, batches, loss_fn, steps=steps)
