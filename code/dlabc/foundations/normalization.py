"""Normalization from scratch: BatchNorm, LayerNorm, InstanceNorm, GroupNorm, RMSNorm.

Chapter: ``book/foundations/normalization.md``.

References:
- Ioffe & Szegedy (2015), ICML, *Batch Normalization*.
- Ba, Kiros & Hinton (2016), *Layer Normalization*.
- Ulyanov, Vedaldi & Lempitsky (2016), *Instance Normalization*.
- Wu & He (2018), ECCV, *Group Normalization*.
- Zhang & Sennrich (2019), NeurIPS, *Root Mean Square Layer Normalization*.

All five layers standardise the same way and differ only in *which axes* the mean and
variance are taken over. So the core is two autograd functions with hand-written
backward passes, :class:`Standardize` and :class:`RMSScale`, that take the axes as an
argument; each layer picks its axes and adds its learnable scale ``weight`` (gamma) and
shift ``bias`` (beta). Shapes: ``N`` batch, ``C`` channels or features, ``*`` positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "Standardize",
    "RMSScale",
    "standardize",
    "rms_scale",
    "BatchNorm",
    "LayerNorm",
    "InstanceNorm",
    "GroupNorm",
    "RMSNorm",
]


def _check_dims(x: torch.Tensor, dims: Sequence[int]) -> tuple[int, ...]:
    if not dims:
        raise ValueError("dims must name at least one axis to normalize over")
    if x.dim() == 0:
        raise ValueError(f"dims {tuple(dims)} are not distinct axes of a 0-D input")
    normalized = tuple(sorted({d % x.dim() for d in dims}))
    if any(not -x.dim() <= d < x.dim() for d in dims) or len(normalized) != len(dims):
        raise ValueError(
            f"dims {tuple(dims)} are not distinct axes of a {x.dim()}-D input"
        )
    return normalized


class Standardize(torch.autograd.Function):
    r"""Standardize over ``dims``: $\hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}$.

    With $M$ the number of elements in each group and $g = \partial L/\partial \hat x$,
    $\partial L/\partial x = \frac{1}{\sqrt{\sigma^2+\epsilon}}
    \big(g - \operatorname{mean}(g) - \hat x \operatorname{mean}(g \hat x)\big)$,
    the means taken over the same ``dims``. The variance is the biased one (over $M$).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...], eps: float):
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        inv_std = torch.rsqrt(var + eps)  # 1 / sqrt(var + eps)
        x_hat = (x - mean) * inv_std
        ctx.save_for_backward(x_hat, inv_std)
        ctx.dims = dims
        return x_hat

    @staticmethod
    @once_differentiable  # the backward itself is not differentiable again
    def backward(ctx, g: torch.Tensor):
        x_hat, inv_std = ctx.saved_tensors
        dims = ctx.dims
        # the mean removes the part of g along the constant direction, the variance
        # the part along x_hat: both moves would not change the normalized output
        grad = (
            g
            - g.mean(dims, keepdim=True)
            - x_hat * (g * x_hat).mean(dims, keepdim=True)
        )
        return inv_std * grad, None, None


class RMSScale(torch.autograd.Function):
    r"""$\hat x = x / \sqrt{\operatorname{mean}(x^2) + \epsilon}$ over ``dims``.

    Backward: $\partial L/\partial x = \frac{1}{r}\big(g - \hat x
    \operatorname{mean}(g \hat x)\big)$,
    with $r = \sqrt{\operatorname{mean}(x^2)+\epsilon}$.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...], eps: float):
        inv_rms = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        x_hat = x * inv_rms
        ctx.save_for_backward(x_hat, inv_rms)
        ctx.dims = dims
        return x_hat

    @staticmethod
    @once_differentiable  # the backward itself is not differentiable again
    def backward(ctx, g: torch.Tensor):
        x_hat, inv_rms = ctx.saved_tensors
        grad = g - x_hat * (g * x_hat).mean(ctx.dims, keepdim=True)
        return inv_rms * grad, None, None


def standardize(
    x: torch.Tensor, dims: Sequence[int], eps: float = 1e-5
) -> torch.Tensor:
    """Zero mean and unit (biased) variance over ``dims``; see :class:`Standardize`."""
    check_tensor(x, "x", floating=True)
    check_number(eps, "eps", low=0)
    return Standardize.apply(x, _check_dims(x, dims), float(eps))


def rms_scale(x: torch.Tensor, dims: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """Unit root-mean-square over ``dims``; see :class:`RMSScale`."""
    check_tensor(x, "x", floating=True)
    check_number(eps, "eps", low=0)
    return RMSScale.apply(x, _check_dims(x, dims), float(eps))


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``(1, C, 1, ...)``: broadcasts a per-channel vector over ``(N, C, *)``."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


class _ChannelNorm(nn.Module):
    """Shared by the layers whose scale and shift are per channel (axis 1)."""

    def __init__(self, num_features: int, eps: float, affine: bool) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = check_number(eps, "eps", low=0)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))  # gamma
            self.bias = nn.Parameter(torch.zeros(num_features))  # beta

    def _check_input(
        self, x: torch.Tensor, ndim: Sequence[int], batch_statistics: bool = False
    ) -> None:
        """Check ``x``'s dtype and shape (metadata only: no sync with a GPU).

        ``batch_statistics``: the layer estimates a variance from the values of each
        channel, so it needs at least two of them.
        """
        check_tensor(x, "x", ndim=ndim, floating=True)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"x must have {self.num_features} channels on axis 1, "
                f"got shape {tuple(x.shape)}"
            )
        if batch_statistics and x.numel() // x.shape[1] < 2:
            raise ValueError(
                "BatchNorm needs more than one value per channel in training, "
                f"got x of shape {tuple(x.shape)}"
            )

    def _affine(self, x_hat: torch.Tensor) -> torch.Tensor:
        if not self.affine:
            return x_hat
        shape = _channel_shape(x_hat)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


class BatchNorm(_ChannelNorm):
    r"""Normalize each channel over the batch and positions of ``(N, C, *)``.

    Training: statistics of the current batch; the running estimates are updated as
    $\hat\mu \leftarrow (1-m)\hat\mu + m\mu_B$ and
    $\hat\sigma^2 \leftarrow (1-m)\hat\sigma^2 + m\frac{M}{M-1}\sigma_B^2$
    (the unbiased variance, $M$ values per channel). Evaluation: the running estimates,
    so each example's output no longer depends on the rest of its batch.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, eps, affine)
        self.momentum = check_number(momentum, "momentum", low=0, high=1)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, ndim=(2, 3, 4, 5), batch_statistics=self.training)
        dims = (0, *range(2, x.dim()))  # everything except the channel axis
        shape = _channel_shape(x)
        if self.training:
            x_hat = standardize(x, dims, self.eps)
            with torch.no_grad():
                m = self.momentum
                var = x.var(dims, unbiased=True)  # unbiased, for the running estimate
                self.running_mean.mul_(1 - m).add_(m * x.mean(dims))
                self.running_var.mul_(1 - m).add_(m * var)
        else:
            mean = self.running_mean.view(shape)
            x_hat = (x - mean) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        return self._affine(x_hat)


def _normalized_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """``normalized_shape`` of LayerNorm and RMSNorm as a tuple of positive ints."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    for i, n in enumerate(shape):
        check_positive_int(n, f"normalized_shape[{i}]")
    return shape


def _trailing_axes(x: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Check that ``x`` ends with the axes ``shape``; return their indices."""
    check_tensor(x, "x", floating=True)
    k = len(shape)
    if x.dim() < k or tuple(x.shape[-k:]) != shape:
        raise ValueError(
            f"x must end with the axes {shape}, got shape {tuple(x.shape)}"
        )
    return tuple(range(x.dim() - k, x.dim()))


class LayerNorm(nn.Module):
    """Normalize each example over its last ``len(normalized_shape)`` axes.

    The scale and shift have the shape ``normalized_shape``: one per feature.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
    ) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = check_number(eps, "eps", low=0)
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_axes = _trailing_axes(x, self.normalized_shape)
        x_hat = standardize(x, last_axes, self.eps)
        if self.elementwise_affine:
            x_hat = x_hat * self.weight + self.bias
        return x_hat


class InstanceNorm(_ChannelNorm):
    """Normalize each channel of each example over its spatial axes: ``(N, C, *)``.

    Like ``nn.InstanceNorm1d/2d`` with their defaults (no running statistics, so the
    same in training and evaluation), and no affine parameters unless asked for.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False):
        super().__init__(num_features, eps, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, ndim=(3, 4, 5))
        return self._affine(standardize(x, tuple(range(2, x.dim())), self.eps))


def _check_groups(num_groups: int, num_channels: int) -> int:
    check_positive_int(num_groups, "num_groups")
    if num_channels % num_groups:
        raise ValueError(
            f"num_channels ({num_channels}) must be divisible by "
            f"num_groups ({num_groups})"
        )
    return num_groups


class GroupNorm(_ChannelNorm):
    """Split the ``C`` channels into ``num_groups`` groups; normalize each per example.

    ``num_groups = 1`` is LayerNorm over ``(C, *)`` (with per-channel affine weights),
    ``num_groups = C`` is InstanceNorm.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True
    ) -> None:
        super().__init__(num_channels, eps, affine)
        self.num_groups = _check_groups(num_groups, num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, ndim=(2, 3, 4, 5))
        n, c = x.shape[:2]
        grouped = x.reshape(
            n, self.num_groups, c // self.num_groups, -1
        )  # (N, G, C/G, *)
        x_hat = standardize(grouped, (2, 3), self.eps).reshape(x.shape)
        return self._affine(x_hat)


class RMSNorm(nn.Module):
    """Scale each example to unit root mean square over its last axes: no mean or shift.

    ``eps=None`` uses the machine epsilon of the input's dtype, as ``nn.RMSNorm`` does.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
    ) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = None if eps is None else check_number(eps, "eps", low=0)
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_axes = _trailing_axes(x, self.normalized_shape)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        x_hat = rms_scale(x, last_axes, eps)
        return x_hat * self.weight if self.elementwise_affine else x_hat
