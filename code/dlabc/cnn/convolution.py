"""Convolution and pooling from scratch in NumPy: forward and backward passes.

Chapter: ``book/cnn/convolution.md``.

References:
- LeCun et al. (1998), *Gradient-Based Learning Applied to Document Recognition*.
- Chellapilla, Puri & Simard (2006), *High Performance Convolutional Neural Networks for
  Document Processing* (convolution as one matrix product, "unfolding").
- Dumoulin & Visin (2016), *A guide to convolution arithmetic for deep learning*.

Like PyTorch, "convolution" here is cross-correlation (the kernel is not flipped).
Shapes:
``N`` images, ``C`` input channels, ``H x W`` input size, ``O`` output channels,
``kh x kw`` kernel, ``Ho x Wo`` output size, ``G`` groups. Every function takes
``stride``, ``padding`` and ``dilation`` as an int or an ``(h, w)`` pair.
"""

from __future__ import annotations

import numpy as np

from dlabc.checks import check_array

__all__ = [
    "output_size",
    "conv2d_naive",
    "im2col",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
]

Pair = int | tuple[int, int]


def _pair(value: Pair, name: str, minimum: int) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of ints that are all ``>= minimum``."""
    pair = (value, value) if not isinstance(value, tuple) else value
    if len(pair) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _int(value: int, name: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; a pair is an error (one axis only)."""
    if isinstance(value, tuple):
        raise TypeError(f"{name} must be an int (one axis), got {value!r}")
    return _pair(value, name, minimum)[0]


def output_size(
    size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> int:
    r"""Output length along one axis, $\lfloor (n + 2p - d(k-1) - 1)/s \rfloor + 1$.

    A dilated kernel spans $d(k-1)+1$ input positions; the first window starts at the
    padded position 0 and each next one ``stride`` further, as long as it fits.
    """
    n, k = _int(size, "size", 1), _int(kernel_size, "kernel_size", 1)
    s, p = _int(stride, "stride", 1), _int(padding, "padding", 0)
    d = _int(dilation, "dilation", 1)
    span = d * (k - 1) + 1  # input positions one window covers
    if n + 2 * p < span:
        raise ValueError(
            f"a kernel spanning {span} positions does not fit in an input of {n} "
            f"with padding {p}"
        )
    return (n + 2 * p - span) // s + 1


def _geometry(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> tuple[tuple[int, int], ...]:
    """Check the arguments; return (kh, kw), stride, padding, dilation, (Ho, Wo)."""
    check_array(x, "x", ndim=4)
    k = _pair(kernel_size, "kernel_size", 1)
    s, p = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    d = _pair(dilation, "dilation", 1)
    out = tuple(
        output_size(n, *args)
        for n, args in zip(x.shape[2:], zip(k, s, p, d, strict=True), strict=True)
    )
    return k, s, p, d, out


def im2col(
    x: np.ndarray,
    kernel_size: Pair,
    stride: Pair = 1,
    padding: Pair = 0,
    dilation: Pair = 1,
    pad_value: float = 0.0,
) -> np.ndarray:
    """Every window of ``x`` as a column: ``(N, C, H, W) -> (N, C, kh, kw, Ho, Wo)``.

    ``cols[n, c, i, j]`` is the ``Ho x Wo`` grid of the pixels that kernel entry
    ``(i, j)`` touches as the window slides: one strided slice of the padded input per
    kernel entry, so the loop runs ``kh * kw`` times, not once per output pixel.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (Ho, Wo) = _geometry(
        x, kernel_size, stride, padding, dilation
    )
    x_pad = (
        np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
        if ph or pw
        else x
    )  # (N, C, H + 2ph, W + 2pw)
    cols = np.empty(x.shape[:2] + (kh, kw, Ho, Wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw  # where kernel entry (i, j) sits in window 0
            cols[:, :, i, j] = x_pad[
                :,
                :,
                top : top + sh * (Ho - 1) + 1 : sh,
                left : left + sw * (Wo - 1) + 1 : sw,
            ]
    return cols


def _check_col2im_args(
    cols: np.ndarray,
    input_shape: tuple[int, int, int, int],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> None:
    """``cols`` must be what :func:`im2col` makes of an input of ``input_shape``."""
    check_array(cols, "cols", ndim=6)
    if len(input_shape) != 4 or any(
        isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0
        for n in input_shape
    ):
        raise ValueError(
            f"input_shape must be 4 ints (N, C, H, W), got {input_shape!r}"
        )
    N, C, H, W = input_shape
    kh, kw = cols.shape[2:4]
    Ho, Wo = _geometry(np.empty((0, 0, H, W)), (kh, kw), stride, padding, dilation)[4]
    if cols.shape != (N, C, kh, kw, Ho, Wo):
        raise ValueError(
            f"cols must have shape {(N, C, kh, kw, Ho, Wo)} for input {input_shape}, "
            f"got {cols.shape}"
        )


def _check_grad_out(grad_out: np.ndarray, shape: tuple[int, ...]) -> None:
    """``grad_out`` must be an array of the forward output's ``shape``."""
    check_array(grad_out, "grad_out", ndim=4)
    if grad_out.shape != shape:
        raise ValueError(
            f"grad_out must have the output's shape {shape}, got {grad_out.shape}"
        )


def col2im(
    cols: np.ndarray,
    input_shape: tuple[int, int, int, int],
    stride: Pair = 1,
    padding: Pair = 0,
    dilation: Pair = 1,
) -> np.ndarray:
    """The adjoint of :func:`im2col`: add every column back where it came from.

    A pixel that lies in several windows receives the sum of their entries; this is
    exactly the backward pass of ``im2col`` (and of any layer built on it).
    """
    _check_col2im_args(cols, input_shape, stride, padding, dilation)
    N, C, H, W = input_shape
    kh, kw = cols.shape[2:4]
    (sh, sw), (ph, pw), (dh, dw), (Ho, Wo) = _geometry(
        np.empty((0, 0, H, W)), (kh, kw), stride, padding, dilation
    )[1:]
    x_pad = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            # no two windows of one kernel entry overlap, so += cannot lose updates
            x_pad[
                :,
                :,
                top : top + sh * (Ho - 1) + 1 : sh,
                left : left + sw * (Wo - 1) + 1 : sw,
            ] += cols[:, :, i, j]
    return x_pad[:, :, ph : ph + H, pw : pw + W]


def _check_conv(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, groups: int
) -> None:
    check_array(x, "x", ndim=4)
    check_array(weight, "weight", ndim=4)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    O, C_g = weight.shape[:2]
    if x.shape[1] % groups or O % groups:
        raise ValueError(
            f"groups={groups} must divide the input channels ({x.shape[1]}) and the "
            f"output channels ({O})"
        )
    if C_g * groups != x.shape[1]:
        raise ValueError(
            f"weight must have shape (O, C / groups, kh, kw) = (O, "
            f"{x.shape[1] // groups}, kh, kw) for x with {x.shape[1]} channels, "
            f"got {weight.shape}"
        )
    if bias is not None:
        check_array(bias, "bias", ndim=1)
        if bias.shape != (O,):
            raise ValueError(f"bias must have shape ({O},), got {bias.shape}")


def conv2d_naive(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: Pair = 1,
    padding: Pair = 0,
    dilation: Pair = 1,
    groups: int = 1,
) -> np.ndarray:
    r"""The definition of the convolution, loop by loop, for every output pixel:

    $y[n,o,u,v] = b_o + \sum_{c,i,j}
    w[o,c,i,j]\, x_\text{pad}[n,\, c,\, s u + d i,\, s v + d j]$

    ``x`` is ``(N, C, H, W)``, ``weight`` is ``(O, C / groups, kh, kw)``; output channel
    ``o`` sees only the input channels of its group.
    """
    _check_conv(x, weight, bias, groups)
    O, C_g, kh, kw = weight.shape
    _, (sh, sw), (ph, pw), (dh, dw), (Ho, Wo) = _geometry(
        x, (kh, kw), stride, padding, dilation
    )
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dtype = np.result_type(x, weight, *([] if bias is None else [bias]))
    y = np.zeros((x.shape[0], O, Ho, Wo), dtype=dtype)
    for n in range(x.shape[0]):
        for o in range(O):
            g = o // (O // groups)  # the group of output channel o
            channels = slice(g * C_g, (g + 1) * C_g)
            for u in range(Ho):
                for v in range(Wo):
                    window = x_pad[
                        n,
                        channels,
                        u * sh : u * sh + dh * (kh - 1) + 1 : dh,
                        v * sw : v * sw + dw * (kw - 1) + 1 : dw,
                    ]  # (C_g, kh, kw)
                    y[n, o, u, v] = np.sum(window * weight[o])
            if bias is not None:
                y[n, o] += bias[o]
    return y


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: Pair = 1,
    padding: Pair = 0,
    dilation: Pair = 1,
    groups: int = 1,
) -> np.ndarray:
    """Convolution as one matrix product per group: ``W (O, C kh kw) @ cols``.

    Same arguments and result as :func:`conv2d_naive`; ``(N, C, H, W) -> (N, O, Ho,
    Wo)``.
    """
    _check_conv(x, weight, bias, groups)
    N, O, G = x.shape[0], weight.shape[0], groups
    K = int(np.prod(weight.shape[1:]))  # C/G kh kw inputs per output pixel
    cols = im2col(
        x, weight.shape[2:], stride, padding, dilation
    )  # (N, C, kh, kw, Ho, Wo)
    Ho, Wo = cols.shape[4:]
    cols = cols.reshape(N, G, K, Ho * Wo)  # (N, G, C/G kh kw, Ho Wo)
    w = weight.reshape(G, O // G, K)  # (G, O/G, C/G kh kw)
    y = (w @ cols).reshape(N, O, Ho, Wo)  # (G, O/G, K) @ (N, G, K, L) -> (N, G, O/G, L)
    return y if bias is None else y + bias[:, None, None]


def conv2d_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    stride: Pair = 1,
    padding: Pair = 0,
    dilation: Pair = 1,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of :func:`conv2d` with respect to ``x``, ``weight`` and ``bias``.

    With $Y = W\,\mathrm{cols}(X) + b$ per group and $\Delta$ = ``grad_out``:

    $\partial L/\partial W = \sum_n \Delta_n\,\mathrm{cols}(X)_n^\top, \quad
    \partial L/\partial b = \sum_{n,u,v} \Delta, \quad
    \partial L/\partial X = \mathrm{col2im}(W^\top \Delta)$
    """
    _check_conv(x, weight, None, groups)
    N, O, G = x.shape[0], weight.shape[0], groups
    K = int(np.prod(weight.shape[1:]))  # C/G kh kw
    cols = im2col(x, weight.shape[2:], stride, padding, dilation)
    cols_shape = cols.shape  # (N, C, kh, kw, Ho, Wo)
    _check_grad_out(grad_out, (N, O) + cols_shape[4:])
    L = cols_shape[4] * cols_shape[5]
    cols = cols.reshape(N, G, K, L)  # (N, G, K, L)
    g = grad_out.reshape(N, G, O // G, L)  # (N, G, O/G, L)
    w = weight.reshape(G, O // G, K)  # (G, O/G, K)
    grad_b = grad_out.sum(axis=(0, 2, 3))  # b is added at every (n, u, v)
    grad_w = (g @ cols.transpose(0, 1, 3, 2)).sum(axis=0)  # (G, O/G, K)
    grad_cols = w.transpose(0, 2, 1) @ g  # (G, K, O/G) @ (N, G, O/G, L) -> (N, G, K, L)
    grad_x = col2im(grad_cols.reshape(cols_shape), x.shape, stride, padding, dilation)
    return grad_x, grad_w.reshape(weight.shape), grad_b


def _pool_geometry(
    kernel_size: Pair, stride: Pair | None, padding: Pair
) -> tuple[tuple[int, int], Pair, tuple[int, int]]:
    """Kernel, stride (the kernel by default) and padding, at most half the kernel."""
    k, p = _pair(kernel_size, "kernel_size", 1), _pair(padding, "padding", 0)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding {padding} must be at most half the kernel {k}")
    return k, k if stride is None else stride, p


def max_pool2d(
    x: np.ndarray,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    dilation: Pair = 1,
) -> np.ndarray:
    """The largest value of each window, per channel; ``stride`` defaults to the kernel.

    Padding counts as $-\\infty$ (it never wins) and, as in PyTorch, may be at most
    half the kernel, so that every undilated window holds at least one real pixel (a
    dilated one can hold only padding: its maximum is $-\\infty$, with no gradient).
    """
    k, stride, p = _pool_geometry(kernel_size, stride, padding)
    cols = im2col(
        x, k, stride, p, dilation, pad_value=-np.inf
    )  # (N, C, kh, kw, Ho, Wo)
    return cols.max(axis=(2, 3))


def max_pool2d_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    dilation: Pair = 1,
) -> np.ndarray:
    """Route each output's gradient to the input pixel that was the maximum.

    On a tie the first maximum in reading order wins, as in PyTorch; a pixel that is
    the maximum of several overlapping windows collects all their gradients.
    """
    k, stride, p = _pool_geometry(kernel_size, stride, padding)
    cols = im2col(x, k, stride, p, dilation, pad_value=-np.inf)
    N, C, kh, kw, Ho, Wo = cols.shape
    _check_grad_out(grad_out, (N, C, Ho, Wo))
    flat = cols.reshape(N, C, kh * kw, Ho, Wo)
    winner = flat.argmax(axis=2)  # (N, C, Ho, Wo): first maximum of each window
    one_hot = (
        np.arange(kh * kw)[:, None, None] == winner[:, :, None]
    )  # (N, C, K, Ho, Wo)
    grad_cols = (one_hot * grad_out[:, :, None]).reshape(cols.shape)
    return col2im(grad_cols, x.shape, stride, p, dilation)


def avg_pool2d(
    x: np.ndarray, kernel_size: Pair, stride: Pair | None = None, padding: Pair = 0
) -> np.ndarray:
    """The mean of each window; zero padding counts in the mean (PyTorch's default)."""
    k, stride, p = _pool_geometry(kernel_size, stride, padding)
    return im2col(x, k, stride, p).mean(axis=(2, 3))


def avg_pool2d_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
) -> np.ndarray:
    """Each output's gradient, divided by ``kh * kw``, goes to every pixel of its
    window."""
    k, stride, p = _pool_geometry(kernel_size, stride, padding)
    check_array(grad_out, "grad_out", ndim=4)
    (kh, kw), _, _, _, (Ho, Wo) = _geometry(x, k, stride, p, 1)
    if grad_out.shape != x.shape[:2] + (Ho, Wo):
        raise ValueError(
            f"grad_out must have the output's shape {x.shape[:2] + (Ho, Wo)}, "
            f"got {grad_out.shape}"
        )
    share = grad_out[:, :, None, None] / (kh * kw)  # (N, C, 1, 1, Ho, Wo)
    grad_cols = np.broadcast_to(share, x.shape[:2] + (kh, kw, Ho, Wo))
    return col2im(np.ascontiguousarray(grad_cols), x.shape, stride, p)
