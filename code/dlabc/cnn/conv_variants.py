"""Convolution variants: dilated, depthwise-separable, transposed and deformable.

Chapter: ``book/cnn/conv_variants.md``.

References:
- Yu & Koltun (2016), ICLR, *Multi-Scale Context Aggregation by Dilated Convolutions*.
- Chollet (2017), CVPR, *Xception: Deep Learning with Depthwise Separable
  Convolutions*; Howard et al. (2017), *MobileNets: Efficient Convolutional Neural
  Networks for Mobile Vision Applications* (the cost ratio $1/C_{out} + 1/k^2$).
- Dumoulin & Visin (2016), *A guide to convolution arithmetic for deep learning*
  (output sizes, transposed convolution as zero insertion).
- Odena, Dumoulin & Olah (2016), Distill, *Deconvolution and Checkerboard Artifacts*.
- Dai et al. (2017), ICCV, *Deformable Convolutional Networks* (version 1: offsets, no
  modulation mask).

Everything is written with tensor operations, and autograd provides the backward
passes. The one building block is :func:`conv2d`, an ordinary convolution computed as
im2col (``F.unfold``: every receptive field becomes a column) followed by one matrix
product. The variants are then a different kernel layout (dilation, groups), a
different input (zeros inserted: the transposed convolution) or different sampling
positions (deformable). Shapes: ``N`` batch, ``C`` channels, ``H x W`` positions,
``k_h x k_w`` kernel, ``K = k_h k_w`` kernel points, ``L`` output positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_positive_int, check_tensor

__all__ = [
    "conv2d",
    "Conv2d",
    "receptive_field",
    "gradient_footprint",
    "conv2d_params",
    "conv2d_macs",
    "DepthwiseSeparableConv2d",
    "conv_transpose2d",
    "bilinear_sample",
    "sampling_positions",
    "deform_conv2d",
    "DeformableConv2d",
]

IntPair = int | tuple[int, int]


# --------------------------------------------------------------------- arguments


def _pair(value: object, name: str, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints ``(height, width)``, each at least ``minimum``."""
    items = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(items, (tuple, list))
        or len(items) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in items)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(items[0]), int(items[1])


def _conv_output_size(
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """$\\lfloor (n + 2p - d(k-1) - 1) / s \\rfloor + 1$ along each axis."""
    out = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True)
    )
    if min(out) < 1:
        raise ValueError(
            f"the input of spatial size {tuple(size)} is too small for a kernel of "
            f"size {tuple(kernel)} with padding {tuple(padding)} and dilation "
            f"{tuple(dilation)}"
        )
    return out  # type: ignore[return-value]


def _check_weight_and_bias(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_out: int | None = None,
) -> None:
    """``weight`` 4-D with the dtype of ``x``; ``bias`` ``None`` or ``(n_out,)``.

    ``n_out`` (the output channels) defaults to ``weight.shape[0]``.
    """
    check_tensor(weight, "weight", ndim=4, floating=True)
    n_out = weight.shape[0] if n_out is None else n_out
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}"
        )
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtype=x.dtype)
        if bias.shape[0] != n_out:
            raise ValueError(
                f"bias must have shape ({n_out},), got {tuple(bias.shape)}"
            )


def _check_groups(groups: int, c_in: int, c_out: int) -> int:
    check_positive_int(groups, "groups")
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"groups ({groups}) must divide the input channels ({c_in}) and the "
            f"output channels ({c_out})"
        )
    return groups


def _check_conv2d_args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
) -> None:
    """``x`` ``(N, C_in, H, W)``, ``weight`` ``(C_out, C_in / groups, k_h, k_w)``."""
    check_tensor(x, "x", ndim=4, floating=True)
    _check_weight_and_bias(x, weight, bias)
    c_in, (c_out, c_group) = x.shape[1], weight.shape[:2]
    _check_groups(groups, c_in, c_out)
    if c_group * groups != c_in:
        raise ValueError(
            f"weight must have shape (C_out, {c_in // groups}, k_h, k_w) for x with "
            f"{c_in} channels and groups={groups}, got {tuple(weight.shape)}"
        )


# --------------------------------------------------------------------- convolution


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    r"""2-D convolution (cross-correlation, as in every deep-learning library).

    $y_{n,o,p,q} = b_o + \sum_{c,i,j} w_{o,c,i,j}\,
    x_{n,\,c',\,p s_h + i d_h - \mathrm{pad}_h,\, q s_w + j d_w - \mathrm{pad}_w}$

    with $x = 0$ outside the image, and $c' = c + g\,C_{in}/G$ for the group $g$ that
    output channel $o$ belongs to. ``x`` is ``(N, C_in, H, W)``, ``weight`` is
    ``(C_out, C_in / groups, k_h, k_w)``, the result ``(N, C_out, H_out, W_out)``.
    """
    _check_conv2d_args(x, weight, bias, groups)
    n, c_in, h, w = x.shape
    c_out, c_group, kh, kw = weight.shape
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation")
    h_out, w_out = _conv_output_size((h, w), (kh, kw), stride, padding, dilation)
    # im2col: one column of C_in * k_h * k_w input values per output position
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(n, groups, c_group * kh * kw, h_out * w_out)  # (N, G, C/G*K, L)
    kernels = weight.reshape(groups, c_out // groups, -1)  # (G, C_out/G, C_in/G*K)
    # one matrix product per group: sum over the channels and kernel points
    out = torch.einsum("gok,ngkl->ngol", kernels, cols)  # (N, G, O/G, L)
    out = out.reshape(n, c_out, h_out, w_out)  # (N, C_out, H_out, W_out)
    return out if bias is None else out + bias.view(1, c_out, 1, 1)


class Conv2d(nn.Module):
    """:func:`conv2d` as a layer, with ``nn.Conv2d``'s parameters and initialisation.

    ``weight`` is ``(C_out, C_in / groups, k_h, k_w)`` and ``bias`` ``(C_out,)``, both
    drawn from $U(-1/\\sqrt{\\text{fan-in}}, 1/\\sqrt{\\text{fan-in}})$, so a state dict
    loads into ``nn.Conv2d`` unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = (
            _pair(stride, "stride"),
            _pair(padding, "padding", 0),
        )
        self.dilation = _pair(dilation, "dilation")
        self.groups = _check_groups(groups, in_channels, out_channels)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s default: uniform within $\\pm 1/\\sqrt{\\text{fan-in}}$."""
        bound = 1 / math.sqrt(self.weight[0].numel())  # fan-in = C_in/G * k_h * k_w
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}"
        )


# --------------------------------------------------------------------- dilation


def _layer_values(
    values: Sequence[int] | None, name: str, depth: int
) -> tuple[int, ...]:
    """One positive int per layer; ``None`` means 1 for every layer."""
    if values is None:
        return (1,) * depth
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    if len(values) != depth:
        raise ValueError(
            f"{name} must have one entry per layer ({depth}), got {len(values)}"
        )
    return tuple(check_positive_int(v, f"{name}[{i}]") for i, v in enumerate(values))


def _check_kernel_sizes(kernel_sizes: object) -> None:
    if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, Sequence):
        raise TypeError(
            f"kernel_sizes must be a sequence of ints, got {kernel_sizes!r}"
        )
    if not kernel_sizes:
        raise ValueError("kernel_sizes must name at least one layer")


def receptive_field(
    kernel_sizes: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
) -> int:
    r"""Width of the input region that one output value of a stack of convolutions sees.

    $r_L = 1 + \sum_{l=1}^{L} d_l (k_l - 1) \prod_{m<l} s_m$

    Layer $l$ widens the region by its dilated kernel's extra width $d_l (k_l - 1)$,
    measured in units of the input pixels one step of layer $l$'s input spans (the
    product of the earlier strides). ``strides`` and ``dilations`` default to 1 for
    every layer.
    """
    _check_kernel_sizes(kernel_sizes)
    ks = _layer_values(kernel_sizes, "kernel_sizes", len(kernel_sizes))
    ss = _layer_values(strides, "strides", len(ks))
    ds = _layer_values(dilations, "dilations", len(ks))
    r, jump = 1, 1  # jump: input pixels between two neighbouring values of a layer
    for k, s, d in zip(ks, ss, ds, strict=True):
        r += d * (k - 1) * jump
        jump *= s
    return r


def gradient_footprint(
    kernel_sizes: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """How strongly one output value of a stack of convolutions depends on each input.

    The stack has one channel, all-ones ``k x k`` kernels and no padding; the input is
    ``size x size`` (default: the receptive field). Autograd gives the gradient of the
    central output value with respect to the input: a ``(size, size)`` float64 map
    that counts the paths from each input pixel to that output. With positive weights
    nothing cancels, so it is nonzero exactly on the pixels the output sees.
    """
    r = receptive_field(kernel_sizes, strides, dilations)
    size = r if size is None else check_positive_int(size, "size")
    if size < r:
        raise ValueError(f"size must be at least the receptive field {r}, got {size}")
    depth = len(kernel_sizes)
    strides = _layer_values(strides, "strides", depth)
    dilations = _layer_values(dilations, "dilations", depth)
    x = torch.zeros(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    h = x
    for k, s, d in zip(kernel_sizes, strides, dilations, strict=True):
        ones = torch.ones(1, 1, k, k, dtype=torch.float64)
        h = conv2d(h, ones, stride=s, dilation=d)  # (1, 1, H_l, W_l)
    h[0, 0, h.shape[2] // 2, h.shape[3] // 2].backward()
    return x.grad[0, 0]  # (size, size)


# --------------------------------------------------------------------- separable


def conv2d_params(
    in_channels: int,
    out_channels: int,
    kernel_size: IntPair,
    groups: int = 1,
    bias: bool = True,
) -> int:
    r"""Parameters of a convolution: $C_{out} \frac{C_{in}}{G} k_h k_w$, plus $C_{out}$
    biases if ``bias``."""
    check_positive_int(in_channels, "in_channels")
    check_positive_int(out_channels, "out_channels")
    kh, kw = _pair(kernel_size, "kernel_size")
    groups = _check_groups(groups, in_channels, out_channels)
    return out_channels * (in_channels // groups) * kh * kw + (
        out_channels if bias else 0
    )


def conv2d_macs(
    in_channels: int,
    out_channels: int,
    kernel_size: IntPair,
    output_size: IntPair,
    groups: int = 1,
) -> int:
    r"""Multiply-adds of a convolution for one example: each of the $C_{out} H_{out}
    W_{out}$ outputs sums $\frac{C_{in}}{G} k_h k_w$ products (the bias adds are not
    counted)."""
    h_out, w_out = _pair(output_size, "output_size")
    weights = conv2d_params(in_channels, out_channels, kernel_size, groups, bias=False)
    return weights * h_out * w_out


class DepthwiseSeparableConv2d(nn.Module):
    r"""A depthwise ``k x k`` convolution, one filter per channel, then a pointwise 1x1.

    $z_{c} = w^{dw}_{c} \star x_{c}$ (``groups = C_in``: spatial filtering, no mixing
    of channels), then $y_{o} = b_o + \sum_c w^{pw}_{o,c}\, z_{c}$ (mixing channels,
    no spatial extent). Parameters: $C_{in} k^2 + C_{in} C_{out}$ (+ $C_{out}$) instead
    of $C_{in} C_{out} k^2$. As in Xception there is nothing between the two steps, and
    the depthwise step has no bias (it would fold into the pointwise bias);
    MobileNet puts BatchNorm and a ReLU after each step.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        self.depthwise = Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups=in_channels,
            bias=False,
        )
        self.pointwise = Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.depthwise(x)  # (N, C_in, H_out, W_out): each channel filtered alone
        return self.pointwise(z)  # (N, C_out, H_out, W_out): channels mixed


# --------------------------------------------------------------------- transposed


def _check_transpose_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: IntPair,
    padding: IntPair,
    output_padding: IntPair,
    dilation: IntPair,
    groups: int,
) -> None:
    """The arguments of :func:`conv_transpose2d`, and a non-empty output."""
    check_tensor(x, "x", ndim=4, floating=True)
    n, c_in, h, w = x.shape
    check_tensor(weight, "weight", ndim=4, floating=True)
    c_in_w, c_out_group, kh, kw = weight.shape
    groups = check_positive_int(groups, "groups")
    if c_in_w != c_in:
        raise ValueError(
            f"weight must have shape ({c_in}, C_out / groups, k_h, k_w) for x with "
            f"{c_in} channels, got {tuple(weight.shape)}"
        )
    _check_weight_and_bias(x, weight, bias, c_out_group * groups)
    _check_groups(groups, c_in, c_out_group * groups)
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding", 0)
    oph, opw = _pair(output_padding, "output_padding", 0)
    dh, dw = _pair(dilation, "dilation")
    if oph >= max(sh, dh) or opw >= max(sw, dw):
        raise ValueError(
            f"output_padding must be smaller than stride or dilation, got "
            f"output_padding={output_padding!r}, stride={stride!r}, "
            f"dilation={dilation!r}"
        )
    h_out = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    w_out = (w - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    if min(h_out, w_out) < 1:
        raise ValueError(
            f"padding {padding!r} is too large: the output of spatial size "
            f"({h_out}, {w_out}) would be empty"
        )


def conv_transpose2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    r"""Transposed convolution: the adjoint of :func:`conv2d` with the same arguments.

    Every input value stamps a weighted copy of the kernel onto the output,
    $y_{o,\, p s + i d - \mathrm{pad}} \mathrel{+}= w_{c,o,i}\, x_{c,p}$ (per axis).
    Computed here as the equivalent ordinary convolution: insert $s - 1$ zeros between
    the input values, pad by $d(k-1) - \mathrm{pad}$ (crop if negative, plus
    ``output_padding`` at the end), and correlate with the kernel flipped in space and
    with its input and output channels swapped. ``x`` is ``(N, C_in, H, W)``,
    ``weight`` ``(C_in, C_out / groups, k_h, k_w)`` (PyTorch's layout), the result
    ``(N, C_out, H_out, W_out)`` with, along each axis,

    $H_{out} = (H-1)s - 2\,\mathrm{pad} + d(k-1) + \mathrm{output\_padding} + 1$
    """
    _check_transpose_args(
        x, weight, bias, stride, padding, output_padding, dilation, groups
    )
    n, c_in, h, w = x.shape
    c_out_group, kh, kw = weight.shape[1:]
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding", 0)
    oph, opw = _pair(output_padding, "output_padding", 0)
    dh, dw = _pair(dilation, "dilation")
    # 1. s - 1 zeros between neighbouring input values
    z = x.new_zeros(n, c_in, (h - 1) * sh + 1, (w - 1) * sw + 1)
    z[:, :, ::sh, ::sw] = x  # (N, C_in, (H-1)s+1, (W-1)s+1)
    # 2. "full" padding d(k-1) minus the padding (negative pads crop), output_padding
    qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    z = F.pad(z, (qw, qw + opw, qh, qh + oph))  # (N, C_in, H_out + d(k-1), ...)
    # 3. the kernel flipped in space, input and output channels swapped per group
    flipped = (
        weight.view(groups, c_in // groups, c_out_group, kh, kw)
        .transpose(1, 2)  # (G, C_out/G, C_in/G, k_h, k_w)
        .reshape(groups * c_out_group, c_in // groups, kh, kw)
        .flip(-2, -1)
    )
    return conv2d(z, flipped, bias, dilation=(dh, dw), groups=groups)


# --------------------------------------------------------------------- deformable


def _check_sample_args(image: object, rows: object, cols: object) -> None:
    check_tensor(image, "image", ndim=4, floating=True)
    check_tensor(rows, "rows", dtype=image.dtype)
    check_tensor(cols, "cols", dtype=image.dtype)
    n = image.shape[0]
    if rows.shape != cols.shape or rows.dim() < 1 or rows.shape[0] != n:
        raise ValueError(
            f"rows and cols must have the same shape (N={n}, ...), got "
            f"{tuple(rows.shape)} and {tuple(cols.shape)}"
        )


def bilinear_sample(
    image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    r"""Values of ``image`` at real-valued positions, by bilinear interpolation.

    $v(y, x) = \sum_{i,j} \max(0, 1 - |y - i|)\, \max(0, 1 - |x - j|)\; I_{i,j}$

    That is, the four pixels around $(y, x)$ weighted by their closeness, with $I = 0$
    outside the image (so values fade to zero within one pixel of the border). Pixel
    $(i, j)$ sits at position $(i, j)$. ``image`` is ``(N, C, H, W)``; ``rows`` and
    ``cols`` are ``(N, *)`` positions of the same shape; the result is ``(N, C, *)``.
    """
    _check_sample_args(image, rows, cols)
    n, c, h, w = image.shape
    y, x = rows.reshape(n, -1), cols.reshape(n, -1)  # (N, P)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0  # distance to the upper-left corner, in [0, 1)
    pixels = image.reshape(n, c, h * w)  # (N, C, H*W)
    out = image.new_zeros(n, c, y.shape[1])
    corners = ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx))
    corners += ((1, 0, ly * (1 - lx)), (1, 1, ly * lx))
    for dy, dx, weight in corners:
        yc, xc = y0 + dy, x0 + dx
        inside = (yc >= 0) & (yc <= h - 1) & (xc >= 0) & (xc <= w - 1)
        index = (yc.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long()  # (N, P)
        values = pixels.gather(2, index.unsqueeze(1).expand(n, c, -1))  # (N, C, P)
        out = out + values * (weight * inside).unsqueeze(1)  # zero outside
    return out.view(n, c, *rows.shape[1:])


def _check_offset(offset: object, kh: int, kw: int) -> None:
    check_tensor(offset, "offset", ndim=4, floating=True)
    if offset.shape[1] != 2 * kh * kw:
        raise ValueError(
            f"offset must have 2 * {kh} * {kw} = {2 * kh * kw} channels, got shape "
            f"{tuple(offset.shape)}"
        )


def sampling_positions(
    offset: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Where a deformable convolution samples: the regular grid plus the offsets.

    For output $(p, q)$ and kernel point $k = i\,k_w + j$ the position is

    $(p s_h - \mathrm{pad}_h + i d_h + \Delta y_k,\; q s_w - \mathrm{pad}_w + j d_w +
    \Delta x_k)$

    ``offset`` is ``(N, 2K, H_out, W_out)`` with channel $2k$ holding
    $\Delta y_k$ and $2k+1$ holding $\Delta x_k$, the layout of
    ``torchvision.ops.deform_conv2d``. Returns ``rows, cols``, each
    ``(N, K, H_out, W_out)``.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    _check_offset(offset, kh, kw)
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation")
    n, _, h_out, w_out = offset.shape
    k = kh * kw  # kernel points
    arange = dict(dtype=offset.dtype, device=offset.device)
    i = torch.arange(kh, **arange).repeat_interleave(kw)  # (K,): row of point k
    j = torch.arange(kw, **arange).repeat(kh)  # (K,): column of point k
    p = torch.arange(h_out, **arange)
    q = torch.arange(w_out, **arange)
    base_rows = (p * sh - ph).view(1, 1, -1, 1) + (i * dh).view(1, k, 1, 1)
    base_cols = (q * sw - pw).view(1, 1, 1, -1) + (j * dw).view(1, k, 1, 1)
    offset = offset.view(n, k, 2, h_out, w_out)  # (dy, dx) interleaved
    return base_rows + offset[:, :, 0], base_cols + offset[:, :, 1]


def _check_deform_args(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> None:
    check_tensor(x, "x", ndim=4, floating=True)
    n, c_in, h, w = x.shape
    _check_weight_and_bias(x, weight, bias)
    c_w, kh, kw = weight.shape[1:]
    if c_w != c_in:
        raise ValueError(
            f"weight must have shape (C_out, {c_in}, k_h, k_w) for x with {c_in} "
            f"channels, got {tuple(weight.shape)}"
        )
    h_out, w_out = _conv_output_size((h, w), (kh, kw), stride, padding, dilation)
    check_tensor(offset, "offset", ndim=4, dtype=x.dtype)
    expected = (n, 2 * kh * kw, h_out, w_out)
    if tuple(offset.shape) != expected:
        raise ValueError(
            f"offset must have shape {expected} (N, 2 k_h k_w, H_out, W_out), got "
            f"{tuple(offset.shape)}"
        )


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    r"""Deformable convolution (v1): each kernel point samples at a learned offset.

    $y_{o}(p_0) = b_o + \sum_{c} \sum_{k=1}^{K} w_{o,c,k}\;
    x_c(p_0 + p_k + \Delta p_k)$

    with $p_0 + p_k$ the position of kernel point $k$
    in an ordinary convolution (see :func:`sampling_positions`), $\Delta p_k$ the
    offset of that point at that output position, and $x_c(\cdot)$ read with
    :func:`bilinear_sample` (zero outside the image). ``x`` is ``(N, C_in, H, W)``,
    ``offset`` ``(N, 2 k_h k_w, H_out, W_out)`` in torchvision's ``(dy, dx)`` layout,
    ``weight`` ``(C_out, C_in, k_h, k_w)``; zero offsets give :func:`conv2d`.
    """
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation")
    _check_deform_args(x, offset, weight, bias, stride, padding, dilation)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = _conv_output_size((h, w), (kh, kw), stride, padding, dilation)
    rows, cols = sampling_positions(offset, (kh, kw), stride, padding, dilation)
    # deformable im2col: the input read at the K shifted points of every output
    sampled = bilinear_sample(x, rows, cols)  # (N, C_in, K, H_out, W_out)
    columns = sampled.reshape(n, c_in * kh * kw, h_out * w_out)  # (N, C_in*K, L)
    out = weight.reshape(c_out, -1) @ columns  # (N, C_out, L)
    out = out.view(n, c_out, h_out, w_out)
    return out if bias is None else out + bias.view(1, c_out, 1, 1)


class DeformableConv2d(Conv2d):
    """A deformable convolution whose offsets an ordinary convolution predicts.

    ``conv_offset`` has the same kernel size, stride, padding and dilation, so it gives
    one ``(dy, dx)`` per kernel point and output position; its weights and bias start
    at zero, so the layer starts as an ordinary convolution and learns to deform.
    ``weight`` and ``bias`` are those of ``nn.Conv2d`` (no groups).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias
        )
        kh, kw = self.kernel_size
        self.conv_offset = Conv2d(
            in_channels, 2 * kh * kw, kernel_size, stride, padding, dilation
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)  # (N, 2K, H_out, W_out)
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation
        )
