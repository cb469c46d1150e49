"""Tests for ``dlabc.cnn.conv_variants``.

The references are PyTorch's own operators, which the implementations never call:
``F.conv2d`` for :func:`conv2d`, :class:`Conv2d`, the depthwise-separable layer and
deformable convolution with zero, integer-shift and dilation-shaped offsets;
``F.conv_transpose2d`` for :func:`conv_transpose2d`; ``F.grid_sample`` (zeros padding,
``align_corners=True``) for :func:`bilinear_sample`. Outputs and the gradients of every
input are compared in float64 over many random shapes, strides, paddings, dilations and
groups. The receptive-field formula is checked against published values and against the
autograd footprint of stacks of ``F.conv2d``; the parameter and multiply-add counts
against ``nn.Conv2d`` and PyTorch's FLOP counter; the transposed convolution against
the adjoint identity and the gradient of ``F.conv2d``; deformable convolution's
gradients against finite differences (``gradcheck``). Bad input must fail
early, with a clear message.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlabc.cnn.conv_variants import (
    Conv2d,
    DeformableConv2d,
    DepthwiseSeparableConv2d,
    bilinear_sample,
    conv2d,
    conv2d_macs,
    conv2d_params,
    conv_transpose2d,
    deform_conv2d,
    gradient_footprint,
    receptive_field,
    sampling_positions,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64, summed in another order
F32 = dict(rtol=1e-4, atol=1e-5)

# --------------------------------------------------------------------- helpers


def rand(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def assert_same_function(ours, reference, inputs, tol=TIGHT, seed: int = 99):
    """Outputs and the gradients of all inputs agree, for a random upstream gradient."""
    a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y_ours, y_ref = ours(*a), reference(*b)
    assert y_ours.shape == y_ref.shape, (y_ours.shape, y_ref.shape)
    torch.testing.assert_close(y_ours, y_ref, **tol, msg=lambda m: f"output: {m}")
    upstream = rand(*y_ref.shape, seed=seed, dtype=y_ref.dtype)
    (y_ours * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    for k, (t1, t2) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(
            t1.grad, t2.grad, **tol, msg=lambda m, k=k: f"grad of input {k}: {m}"
        )


def random_conv_configs(count: int, seed: int) -> list[dict]:
    """Random channels, kernels, strides, paddings, dilations, groups and sizes."""
    rng = random.Random(seed)
    configs = []
    for _ in range(count):
        g = rng.choice([1, 1, 2, 3])
        k = (rng.randint(1, 4), rng.randint(1, 4))
        d = (rng.randint(1, 3), rng.randint(1, 3))
        configs.append(
            dict(
                n=rng.randint(1, 3),
                c_in=g * rng.randint(1, 3),
                c_out=g * rng.randint(1, 3),
                k=k,
                s=(rng.randint(1, 3), rng.randint(1, 3)),
                p=(rng.randint(0, 2), rng.randint(0, 2)),
                d=d,
                g=g,
                h=rng.randint(1, 7) + d[0] * (k[0] - 1),
                w=rng.randint(1, 7) + d[1] * (k[1] - 1),
            )
        )
    return configs


CONV_CONFIGS = random_conv_configs(40, seed=0)


def config_id(c: dict) -> str:
    return "k{k}-s{s}-p{p}-d{d}-g{g}-{h}x{w}".format(**c).replace(" ", "")


# --------------------------------------------------------------------- conv2d


@pytest.mark.parametrize("c", CONV_CONFIGS, ids=config_id)
def test_conv2d_matches_torch_forward_and_backward(c):
    x = rand(c["n"], c["c_in"], c["h"], c["w"], seed=1)
    w = rand(c["c_out"], c["c_in"] // c["g"], *c["k"], seed=2)
    b = rand(c["c_out"], seed=3)
    args = (c["s"], c["p"], c["d"], c["g"])
    assert_same_function(
        lambda x, w, b: conv2d(x, w, b, *args),
        lambda x, w, b: F.conv2d(x, w, b, *args),
        (x, w, b),
    )
    assert_same_function(
        lambda x, w: conv2d(x, w, None, *args),
        lambda x, w: F.conv2d(x, w, None, *args),
        (x, w),
    )


def test_conv2d_accepts_int_and_pair_arguments_and_views():
    x = rand(2, 4, 9, 8).transpose(2, 3)  # a non-contiguous (2, 4, 8, 9) view
    w = rand(6, 2, 3, 3, seed=1)
    torch.testing.assert_close(
        conv2d(x, w, stride=2, padding=1, dilation=2, groups=2),
        F.conv2d(x, w, stride=2, padding=1, dilation=2, groups=2),
        **TIGHT,
    )
    torch.testing.assert_close(
        conv2d(x, w, stride=[2, 1], padding=(0, 2), groups=2),
        F.conv2d(x, w, stride=(2, 1), padding=(0, 2), groups=2),
        **TIGHT,
    )


def test_conv2d_in_float32():
    x, w, b = (
        rand(*s, dtype=torch.float32) for s in [(4, 8, 16, 16), (8, 8, 3, 3), (8,)]
    )
    y = conv2d(x, w, b, padding=1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), **F32)


@pytest.mark.parametrize(
    "args",
    [
        dict(in_channels=3, out_channels=5, kernel_size=3),
        dict(in_channels=4, out_channels=6, kernel_size=(2, 3), stride=2, padding=1),
        dict(in_channels=6, out_channels=4, kernel_size=3, dilation=2, groups=2),
        dict(in_channels=4, out_channels=4, kernel_size=1, groups=4, bias=False),
    ],
    ids=str,
)
def test_conv2d_module_matches_nn_conv2d_with_copied_weights(args):
    ours = Conv2d(**args).double()
    reference = nn.Conv2d(**args).double()
    assert {n: p.shape for n, p in ours.named_parameters()} == {
        n: p.shape for n, p in reference.named_parameters()
    }
    reference.load_state_dict(ours.state_dict())
    x = rand(2, args["in_channels"], 9, 10)
    y_ours, y_ref = ours(x), reference(x)
    torch.testing.assert_close(y_ours, y_ref, **TIGHT)
    upstream = rand(*y_ref.shape, seed=5)
    (y_ours * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    for (name, p1), p2 in zip(
        ours.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(p1.grad, p2.grad, **TIGHT, msg=name)


def test_conv2d_module_initialisation_is_nn_conv2d_default():
    layer = Conv2d(16, 32, 3, groups=2)
    bound = 1 / math.sqrt(8 * 9)  # fan-in: 16 / 2 channels x 3 x 3
    for t in (layer.weight, layer.bias):
        assert t.abs().max() <= bound
        # uniform on [-bound, bound]: standard deviation bound / sqrt(3)
        assert abs(t.std().item() - bound / math.sqrt(3)) < 0.2 * bound
    assert "kernel_size=(3, 3)" in repr(layer) and "groups=2" in repr(layer)
    assert Conv2d(2, 2, 1, bias=False).bias is None


# --------------------------------------------------------------------- receptive field


@pytest.mark.parametrize(
    "kernels, strides, dilations, expected",
    [
        ([3], None, None, 3),
        ([3, 3], None, None, 5),
        ([3, 3, 3], None, None, 7),  # VGG: three 3x3 layers see as far as one 7x7
        ([3] * 4, None, [1, 2, 4, 8], 31),
        ([3] * 4, [2] * 4, None, 31),
        ([7], [2], [3], 19),
        # AlexNet up to pool5 (conv1 11/4, pool 3/2, conv2 5, pool 3/2, 3x conv 3,
        # pool 3/2): the published 195
        ([11, 3, 5, 3, 3, 3, 3, 3], [4, 2, 1, 2, 1, 1, 1, 2], None, 195),
        # VGG-16 up to pool5: the published 212
        (
            [3, 3, 2, 3, 3, 2, 3, 3, 3, 2, 3, 3, 3, 2, 3, 3, 3, 2],
            [1, 1, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2],
            None,
            212,
        ),
    ],
)
def test_receptive_field_closed_form_values(kernels, strides, dilations, expected):
    assert receptive_field(kernels, strides, dilations) == expected


def torch_footprint(kernels, strides, dilations, size):
    """The same gradient map as ``gradient_footprint``, built from ``F.conv2d``."""
    x = torch.zeros(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    h = x
    for k, s, d in zip(kernels, strides, dilations, strict=True):
        h = F.conv2d(
            h, torch.ones(1, 1, k, k, dtype=torch.float64), stride=s, dilation=d
        )
    h[0, 0, h.shape[2] // 2, h.shape[3] // 2].backward()
    return x.grad[0, 0]


def random_stacks(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        depth = rng.randint(1, 4)
        yield (
            [rng.randint(1, 5) for _ in range(depth)],
            [rng.randint(1, 3) for _ in range(depth)],
            [rng.randint(1, 3) for _ in range(depth)],
        )


@pytest.mark.parametrize("kernels, strides, dilations", list(random_stacks(30, 1)))
def test_receptive_field_is_the_width_of_the_autograd_footprint(
    kernels, strides, dilations
):
    r = receptive_field(kernels, strides, dilations)
    reference = torch_footprint(kernels, strides, dilations, r + 3)
    rows = reference.ne(0).any(1).nonzero()
    cols = reference.ne(0).any(0).nonzero()
    assert (rows.max() - rows.min() + 1).item() == r
    assert (cols.max() - cols.min() + 1).item() == r
    # ours: the same map, computed with our conv2d
    torch.testing.assert_close(
        gradient_footprint(kernels, strides, dilations, size=r + 3),
        reference,
        rtol=0,
        atol=0,
    )
    assert gradient_footprint(kernels, strides, dilations).shape == (r, r)


def test_gradient_footprint_counts_paths_and_shows_gridding():
    # one 3x3 layer: every pixel of the 3x3 region once
    assert torch.equal(gradient_footprint([3]), torch.ones(3, 3, dtype=torch.float64))
    # two 3x3 layers: the counts are the 2-D convolution of two boxes, (1 2 3 2 1)^2
    line = torch.tensor([1.0, 2, 3, 2, 1], dtype=torch.float64)
    assert torch.equal(gradient_footprint([3, 3]), torch.outer(line, line))
    # dilation 2 twice: only every other row and column is seen
    grid = gradient_footprint([3, 3], dilations=[2, 2])
    assert grid.shape == (9, 9)
    assert grid[::2, ::2].ne(0).all() and grid[1::2].eq(0).all()
    assert grid[:, 1::2].eq(0).all()
    # dilations 1, 2, 4: no holes
    assert gradient_footprint([3] * 3, dilations=[1, 2, 4]).ne(0).all()


# --------------------------------------------------------------------- separable


def torch_counts(conv: nn.Conv2d, size: tuple[int, int]):
    """Parameters, multiply-adds from PyTorch's FLOP counter (2 FLOPs each), output."""
    with FlopCounterMode(display=False) as counter:
        y = conv(torch.empty(1, conv.in_channels, *size, device="meta"))
    return sum(p.numel() for p in conv.parameters()), counter.get_total_flops() // 2, y


@pytest.mark.parametrize("c", CONV_CONFIGS[:20], ids=config_id)
@pytest.mark.parametrize("bias", [True, False])
def test_counts_match_nn_conv2d_and_the_flop_counter(c, bias):
    conv = nn.Conv2d(
        c["c_in"],
        c["c_out"],
        c["k"],
        c["s"],
        c["p"],
        c["d"],
        c["g"],
        bias,
        device="meta",
    )
    params, macs, y = torch_counts(conv, (c["h"], c["w"]))
    assert conv2d_params(c["c_in"], c["c_out"], c["k"], c["g"], bias) == params
    output_size = tuple(y.shape[-2:])
    assert conv2d_macs(c["c_in"], c["c_out"], c["k"], output_size, c["g"]) == macs


@pytest.mark.parametrize("c_in, c_out, k", [(32, 64, 3), (512, 512, 3), (8, 3, 5)])
def test_separable_cost_ratio_is_the_mobilenet_formula(c_in, c_out, k):
    standard = conv2d_params(c_in, c_out, k, bias=False)
    separable = conv2d_params(c_in, c_in, k, groups=c_in, bias=False)
    separable += conv2d_params(c_in, c_out, 1, bias=False)
    assert math.isclose(separable / standard, 1 / c_out + 1 / k**2)
    macs = conv2d_macs(c_in, c_in, k, 7, groups=c_in) + conv2d_macs(c_in, c_out, 1, 7)
    assert math.isclose(macs / conv2d_macs(c_in, c_out, k, 7), 1 / c_out + 1 / k**2)
    layer = DepthwiseSeparableConv2d(c_in, c_out, k, bias=False)
    assert sum(p.numel() for p in layer.parameters()) == separable


@pytest.mark.parametrize(
    "c_in, c_out, k, stride, padding, dilation, bias",
    [
        (3, 5, 3, 1, 0, 1, True),
        (4, 8, 3, 2, 1, 1, True),
        (6, 4, (3, 5), 1, (1, 2), 1, False),
        (5, 5, 3, (2, 1), 2, 2, True),
        (1, 3, 2, 1, 0, 1, True),
    ],
)
def test_depthwise_separable_equals_grouped_then_pointwise_conv2d(
    c_in, c_out, k, stride, padding, dilation, bias
):
    layer = DepthwiseSeparableConv2d(
        c_in, c_out, k, stride, padding, dilation, bias
    ).double()
    # the same layer as two nn.Conv2d modules, with the weights copied
    depthwise = nn.Conv2d(c_in, c_in, k, stride, padding, dilation, c_in, False)
    pointwise = nn.Conv2d(c_in, c_out, 1, bias=bias)
    reference = nn.Sequential(depthwise, pointwise).double()
    reference.load_state_dict(
        {
            name.replace("depthwise", "0").replace("pointwise", "1"): t
            for name, t in layer.state_dict().items()
        }
    )
    assert sum(p.numel() for p in layer.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    x = rand(2, c_in, 11, 9)
    y_ours, y_ref = layer(x), reference(x)
    torch.testing.assert_close(y_ours, y_ref, **TIGHT)
    # and functionally: F.conv2d(groups=C_in), then a 1x1 F.conv2d
    z = F.conv2d(x, layer.depthwise.weight, None, stride, padding, dilation, c_in)
    b = layer.pointwise.bias
    torch.testing.assert_close(y_ours, F.conv2d(z, layer.pointwise.weight, b), **TIGHT)
    upstream = rand(*y_ref.shape, seed=4)
    (y_ours * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    for p1, p2 in zip(layer.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, **TIGHT)


def test_depthwise_separable_has_no_depthwise_bias():
    layer = DepthwiseSeparableConv2d(4, 6, 3)
    assert set(layer.state_dict()) == {
        "depthwise.weight",
        "pointwise.weight",
        "pointwise.bias",
    }
    assert layer.depthwise.weight.shape == (4, 1, 3, 3)
    assert layer.pointwise.weight.shape == (6, 4, 1, 1)


# --------------------------------------------------------------------- transposed


def random_transpose_configs(count: int, seed: int) -> list[dict]:
    """Configurations that ``F.conv_transpose2d`` accepts (a non-empty output)."""
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        c = random_conv_configs(1, rng.randint(0, 10**6))[0]
        c["h"], c["w"] = rng.randint(1, 6), rng.randint(1, 6)
        c["op"] = tuple(
            rng.randint(0, max(s, d) - 1) for s, d in zip(c["s"], c["d"], strict=True)
        )
        sizes = [
            (n - 1) * s - 2 * p + d * (k - 1) + op + 1
            for n, s, p, d, k, op in zip(
                (c["h"], c["w"]), c["s"], c["p"], c["d"], c["k"], c["op"], strict=True
            )
        ]
        if min(sizes) >= 1:
            configs.append(c)
    return configs


TRANSPOSE_CONFIGS = random_transpose_configs(40, seed=2)


def transpose_id(c: dict) -> str:
    return config_id(c) + "-op{op}".format(**c).replace(" ", "")


@pytest.mark.parametrize("c", TRANSPOSE_CONFIGS, ids=transpose_id)
def test_conv_transpose2d_matches_torch_forward_and_backward(c):
    x = rand(c["n"], c["c_in"], c["h"], c["w"], seed=1)
    w = rand(c["c_in"], c["c_out"] // c["g"], *c["k"], seed=2)
    b = rand(c["c_out"], seed=3)
    s, p, op, d, g = c["s"], c["p"], c["op"], c["d"], c["g"]
    assert_same_function(
        lambda x, w, b: conv_transpose2d(x, w, b, s, p, op, d, g),
        lambda x, w, b: F.conv_transpose2d(x, w, b, s, p, op, g, d),
        (x, w, b),
    )
    assert_same_function(
        lambda x, w: conv_transpose2d(x, w, None, s, p, op, d, g),
        lambda x, w: F.conv_transpose2d(x, w, None, s, p, op, g, d),
        (x, w),
    )


@pytest.mark.parametrize("c", CONV_CONFIGS[:25], ids=config_id)
def test_conv_transpose2d_is_the_adjoint_and_the_gradient_of_conv2d(c):
    x = rand(c["n"], c["c_in"], c["h"], c["w"], seed=1, dtype=torch.float64)
    w = rand(c["c_out"], c["c_in"] // c["g"], *c["k"], seed=2)
    s, p, d, g = c["s"], c["p"], c["d"], c["g"]
    y = rand(*F.conv2d(x, w, None, s, p, d, g).shape, seed=3)
    # the output_padding that gives back the input's size
    op = tuple(
        n - ((m - 1) * s_ - 2 * p_ + d_ * (k - 1) + 1)
        for n, m, s_, p_, d_, k in zip(
            x.shape[2:], y.shape[2:], s, p, d, c["k"], strict=True
        )
    )
    if any(o >= max(s_, d_) for o, s_, d_ in zip(op, s, d, strict=True)):
        pytest.skip("this input size is not reachable by a transposed convolution")
    back = conv_transpose2d(y, w, None, s, p, op, d, g)
    assert back.shape == x.shape
    left = (F.conv2d(x, w, None, s, p, d, g) * y).sum()
    right = (x * back).sum()
    torch.testing.assert_close(left, right, **TIGHT)
    x.requires_grad_()
    (gradient,) = torch.autograd.grad((F.conv2d(x, w, None, s, p, d, g) * y).sum(), x)
    torch.testing.assert_close(back, gradient, **TIGHT)


def test_conv_transpose2d_checkerboard_of_a_constant_input():
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    k3 = conv_transpose2d(ones, torch.ones(1, 1, 3, 3, dtype=torch.float64), stride=2)
    assert k3.shape == (1, 1, 17, 17)
    interior = k3[0, 0, 2:-2, 2:-2]
    assert interior.unique().tolist() == [1.0, 2.0, 4.0]
    k4 = conv_transpose2d(ones, torch.ones(1, 1, 4, 4, dtype=torch.float64), stride=2)
    assert k4[0, 0, 2:-2, 2:-2].unique().tolist() == [4.0]


# --------------------------------------------------------------------- bilinear


def grid_sample_reference(image, rows, cols):
    """``F.grid_sample`` at pixel positions: x first, normalised so that -1 and +1
    are the centres of the first and last pixels (``align_corners=True``)."""
    h, w = image.shape[-2:]
    n = rows.shape[0]
    grid = torch.stack([2 * cols / (w - 1) - 1, 2 * rows / (h - 1) - 1], dim=-1)
    out = F.grid_sample(
        image,
        grid.reshape(n, 1, -1, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )  # (N, C, 1, P)
    return out.reshape(n, image.shape[1], *rows.shape[1:])


@pytest.mark.parametrize(
    "image_shape, position_shape",
    [((2, 3, 6, 7), (2, 40)), ((1, 1, 5, 5), (1, 4, 6)), ((3, 2, 4, 9), (3, 2, 3, 5))],
)
def test_bilinear_sample_matches_grid_sample_forward_and_backward(
    image_shape, position_shape
):
    h, w = image_shape[-2:]
    g = torch.Generator().manual_seed(0)
    # positions inside, on the border, and up to 1.5 pixels outside the image
    rows = torch.rand(position_shape, generator=g, dtype=torch.float64) * (h + 2) - 1.5
    cols = torch.rand(position_shape, generator=g, dtype=torch.float64) * (w + 2) - 1.5
    assert_same_function(
        bilinear_sample, grid_sample_reference, (rand(*image_shape), rows, cols)
    )


def test_bilinear_sample_at_integer_positions_reads_the_pixels():
    image = rand(2, 3, 4, 5)
    rows, cols = torch.meshgrid(
        torch.arange(4.0, dtype=torch.float64),
        torch.arange(5.0, dtype=torch.float64),
        indexing="ij",
    )
    rows, cols = rows.expand(2, 4, 5), cols.expand(2, 4, 5)
    torch.testing.assert_close(bilinear_sample(image, rows, cols), image, **TIGHT)
    # halfway between two pixels: their mean; one pixel or more outside: zero
    half = bilinear_sample(
        image,
        torch.full((2, 1), 1.5, dtype=torch.float64),
        torch.full((2, 1), 2.0, dtype=torch.float64),
    )
    torch.testing.assert_close(
        half[..., 0], (image[:, :, 1, 2] + image[:, :, 2, 2]) / 2
    )
    inside = torch.full((2, 3), 2.0, dtype=torch.float64)
    outside_rows = torch.tensor([[-1.0, 4.0, -3.0]], dtype=torch.float64).expand(2, 3)
    outside_cols = torch.tensor([[-1.0, 5.0, -3.0]], dtype=torch.float64).expand(2, 3)
    assert bilinear_sample(image, outside_rows, inside).eq(0).all()
    assert bilinear_sample(image, inside, outside_cols).eq(0).all()


def test_bilinear_sample_gradcheck():
    image = rand(1, 2, 4, 5).requires_grad_()
    rows = (torch.rand(1, 12, dtype=torch.float64) * 6 - 1).requires_grad_()
    cols = (torch.rand(1, 12, dtype=torch.float64) * 7 - 1).requires_grad_()
    assert torch.autograd.gradcheck(bilinear_sample, (image, rows, cols))


# --------------------------------------------------------------------- deformable


def test_sampling_positions_layout_is_dy_dx_per_kernel_point():
    kh, kw = 2, 3
    offset = torch.zeros(1, 2 * kh * kw, 4, 5, dtype=torch.float64)
    rows, cols = sampling_positions(offset, (kh, kw), stride=2, padding=1, dilation=3)
    assert rows.shape == cols.shape == (1, kh * kw, 4, 5)
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            expected_rows = torch.arange(4.0, dtype=torch.float64) * 2 - 1 + 3 * i
            expected_cols = torch.arange(5.0, dtype=torch.float64) * 2 - 1 + 3 * j
            torch.testing.assert_close(rows[0, k], expected_rows[:, None].expand(4, 5))
            torch.testing.assert_close(cols[0, k], expected_cols[None, :].expand(4, 5))
    # channel 2k moves point k down, channel 2k + 1 moves it right
    moved = offset.clone()
    moved[0, 2 * 4, 1, 2] = 0.5  # point k = 4 is (i, j) = (1, 1)
    moved[0, 2 * 4 + 1, 1, 2] = -0.25
    rows2, cols2 = sampling_positions(moved, (kh, kw), stride=2, padding=1, dilation=3)
    assert (rows2 - rows).nonzero().tolist() == [[0, 4, 1, 2]]
    assert (rows2 - rows)[0, 4, 1, 2] == 0.5 and (cols2 - cols)[0, 4, 1, 2] == -0.25


DEFORM_CONFIGS = [c for c in CONV_CONFIGS if c["g"] == 1][:15]


@pytest.mark.parametrize("c", DEFORM_CONFIGS, ids=config_id)
def test_deform_conv2d_with_zero_offsets_is_conv2d(c):
    x = rand(c["n"], c["c_in"], c["h"], c["w"], seed=1)
    w = rand(c["c_out"], c["c_in"], *c["k"], seed=2)
    b = rand(c["c_out"], seed=3)
    s, p, d = c["s"], c["p"], c["d"]
    h_out, w_out = F.conv2d(x, w, b, s, p, d).shape[2:]
    zero = torch.zeros(c["n"], 2 * c["k"][0] * c["k"][1], h_out, w_out).double()
    assert_same_function(
        lambda x, w, b: deform_conv2d(x, zero, w, b, s, p, d),
        lambda x, w, b: F.conv2d(x, w, b, s, p, d),
        (x, w, b),
    )


@pytest.mark.parametrize("dy, dx", [(2, -1), (0, 3), (-4, -2), (1, 1)])
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (1, 2)])
def test_deform_conv2d_with_one_integer_offset_is_conv2d_of_the_shifted_input(
    dy, dx, stride, padding
):
    x, w, b = rand(2, 3, 8, 9, seed=1), rand(4, 3, 3, 2, seed=2), rand(4, seed=3)
    h_out, w_out = F.conv2d(x, w, b, stride, padding).shape[2:]
    offset = torch.zeros(2, 12, h_out, w_out, dtype=torch.float64)
    offset[:, 0::2], offset[:, 1::2] = dy, dx
    # by hand: shifted[r, c] = x[r + dy, c + dx] on the padded canvas, zero outside
    m = 8  # a border wider than any shift plus padding
    canvas = F.pad(x, (m, m, m, m))
    shifted = canvas[
        :,
        :,
        m + dy - padding : m + dy + 8 + padding,
        m + dx - padding : m + dx + 9 + padding,
    ]
    reference = F.conv2d(shifted, w, b, stride)
    torch.testing.assert_close(
        deform_conv2d(x, offset, w, b, stride, padding), reference, **TIGHT
    )


@pytest.mark.parametrize("dilation", [2, 3])
def test_deform_conv2d_offsets_can_dilate_the_kernel(dilation):
    x, w = rand(1, 2, 10, 11, seed=1), rand(3, 2, 3, 3, seed=2)
    i = torch.arange(3).repeat_interleave(3).double() - 1  # kernel row of point k
    j = torch.arange(3).repeat(3).double() - 1
    offset = torch.zeros(1, 18, 10, 11, dtype=torch.float64)
    offset[:, 0::2] = (dilation - 1) * i.view(9, 1, 1)
    offset[:, 1::2] = (dilation - 1) * j.view(9, 1, 1)
    torch.testing.assert_close(
        deform_conv2d(x, offset, w, padding=1),
        F.conv2d(x, w, padding=dilation, dilation=dilation),
        **TIGHT,
    )


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [((3, 3), 1, 1, 1), ((2, 3), 2, 1, 1), ((3, 2), 1, 0, 2), ((1, 1), 1, 0, 1)],
)
def test_deform_conv2d_gradients_match_finite_differences(
    kernel, stride, padding, dilation
):
    x = rand(2, 2, 5, 6, seed=1)
    w = rand(3, 2, *kernel, seed=2)
    b = rand(3, seed=3)
    h_out, w_out = F.conv2d(x, w, b, stride, padding, dilation).shape[2:]
    # real-valued offsets: no sampling point on the integer grid, where the
    # bilinear weights have kinks
    offset = rand(2, 2 * kernel[0] * kernel[1], h_out, w_out, seed=4) * 1.5
    inputs = [t.requires_grad_() for t in (x, offset, w, b)]

    def f(x, offset, w, b):
        return deform_conv2d(x, offset, w, b, stride, padding, dilation)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_deform_conv2d_gradients_match_finite_differences_in_full():
    inputs = [
        rand(1, 2, 4, 4, seed=1),
        rand(1, 8, 3, 3, seed=2),
        rand(2, 2, 2, 2, seed=3),
        rand(2, seed=4),
    ]
    assert torch.autograd.gradcheck(deform_conv2d, [t.requires_grad_() for t in inputs])


def test_deformable_layer_starts_as_an_ordinary_convolution_and_learns_offsets():
    layer = DeformableConv2d(3, 5, 3, stride=2, padding=1).double()
    assert set(layer.state_dict()) == {
        "weight",
        "bias",
        "conv_offset.weight",
        "conv_offset.bias",
    }
    assert layer.conv_offset.weight.shape == (18, 3, 3, 3)
    assert layer.conv_offset.weight.eq(0).all() and layer.conv_offset.bias.eq(0).all()
    x = rand(2, 3, 9, 8)
    y = layer(x)
    torch.testing.assert_close(
        y, F.conv2d(x, layer.weight, layer.bias, stride=2, padding=1), **TIGHT
    )
    (y * rand(*y.shape, seed=5)).sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0  # the offsets get a signal
    # a constant offset bias of (1, 0): every kernel point reads one row lower
    with torch.no_grad():
        layer.conv_offset.bias[0::2] = 1.0
    shifted = F.pad(x, (1, 0, 0, 2))  # the reads of padding=1, one row lower
    torch.testing.assert_close(
        layer(x), F.conv2d(shifted, layer.weight, layer.bias, stride=2), **TIGHT
    )


# --------------------------------------------------------------------- bad input


# --------------------------------------------------------------------- bad input


def _rows_receptive_field_rejects_bad_input():
    table = []
    table.append(
        pytest.param(
            lambda: receptive_field([]),
            ValueError,
            "at least one layer",
            id="receptive_field_rejects_bad_input-0",
        )
    )
    table.append(
        pytest.param(
            lambda: receptive_field(3),
            TypeError,
            "kernel_sizes must be a sequence of ints",
            id="receptive_field_rejects_bad_input-1",
        )
    )
    table.append(
        pytest.param(
            lambda: receptive_field("33"),
            TypeError,
            "kernel_sizes must be a sequence of ints",
            id="receptive_field_rejects_bad_input-2",
        )
    )
    table.append(
        pytest.param(
            lambda: receptive_field([3, 0]),
            ValueError,
            r"kernel_sizes\[1\] must be positive, got 0",
            id="receptive_field_rejects_bad_input-3",
        )
    )
    table.append(
        pytest.param(
            lambda: receptive_field([3.0]),
            TypeError,
            r"kernel_sizes\[0\] must be an int",
            id="receptive_field_rejects_bad_input-4",
        )
    )
    table.append(
        pytest.param(
            lambda: receptive_field([3, 3], strides=[1]),
            ValueError,
            r"strides must have one entry per layer \(2\)",
            id="receptive_field_rejects_bad_input-5",
        )
    )
    table.append(
        pytest.param(
            lambda: receptive_field([3], dilations=[-1]),
            ValueError,
            r"dilations\[0\] must be positive, got -1",
            id="receptive_field_rejects_bad_input-6",
        )
    )
    table.append(
        pytest.param(
            lambda: receptive_field([3], dilations=2),
            TypeError,
            "dilations must be a sequence of ints",
            id="receptive_field_rejects_bad_input-7",
        )
    )
    return table


def _rows_gradient_footprint_rejects_a_too_small_size():
    table = []
    table.append(
        pytest.param(
            lambda: gradient_footprint([3, 3], size=4),
            ValueError,
            "size must be at least the receptive field 5",
            id="gradient_footprint_rejects_a_too_small_size-0",
        )
    )
    table.append(
        pytest.param(
            lambda: gradient_footprint([3], size=0),
            ValueError,
            "size must be positive",
            id="gradient_footprint_rejects_a_too_small_size-1",
        )
    )
    return table


def _rows_counts_reject_bad_input():
    table = []
    table.append(
        pytest.param(
            lambda: conv2d_params(0, 4, 3),
            ValueError,
            "in_channels must be positive",
            id="counts_reject_bad_input-0",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d_params(4, 4.0, 3),
            TypeError,
            "out_channels must be an int",
            id="counts_reject_bad_input-1",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d_params(4, 6, 3, groups=3),
            ValueError,
            r"groups \(3\) must divide the input channels",
            id="counts_reject_bad_input-2",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d_params(4, 4, (3, 3, 3)),
            TypeError,
            "kernel_size must be an int or a pair of ints",
            id="counts_reject_bad_input-3",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d_macs(4, 4, 3, (0, 5)),
            ValueError,
            "output_size must be positive",
            id="counts_reject_bad_input-4",
        )
    )
    table.append(
        pytest.param(
            lambda: DepthwiseSeparableConv2d(0, 4, 3),
            ValueError,
            "in_channels must be positive",
            id="counts_reject_bad_input-5",
        )
    )
    return table


def _rows_conv_transpose2d_rejects_bad_input():
    x, w = rand(1, 4, 5, 5), rand(4, 3, 3, 3)
    table = []
    table.append(
        pytest.param(
            lambda: conv_transpose2d(x, w, stride=2, output_padding=2),
            ValueError,
            "output_padding must be smaller than stride",
            id="conv_transpose2d_rejects_bad_input-0",
        )
    )
    table.append(
        pytest.param(
            lambda: F.conv_transpose2d(x, w, stride=2, output_padding=2),
            RuntimeError,
            "output padding must be smaller than",
            id="conv_transpose2d_rejects_bad_input-1",
        )
    )
    table.append(
        pytest.param(
            lambda: conv_transpose2d(x, w, padding=7),
            ValueError,
            "padding 7 is too large",
            id="conv_transpose2d_rejects_bad_input-2",
        )
    )
    table.append(
        pytest.param(
            lambda: conv_transpose2d(x, rand(3, 3, 3, 3)),
            ValueError,
            r"weight must have shape \(4, C_out / groups",
            id="conv_transpose2d_rejects_bad_input-3",
        )
    )
    table.append(
        pytest.param(
            lambda: conv_transpose2d(x, w, groups=3),
            ValueError,
            r"groups \(3\) must divide the input channels",
            id="conv_transpose2d_rejects_bad_input-4",
        )
    )
    table.append(
        pytest.param(
            lambda: conv_transpose2d(x, rand(4, 3, 3, 3), rand(3), groups=2),
            ValueError,
            r"bias must have shape \(6,\)",
            id="conv_transpose2d_rejects_bad_input-5",
        )
    )
    table.append(
        pytest.param(
            lambda: conv_transpose2d(x[0], w),
            ValueError,
            "x must have 4 dimensions",
            id="conv_transpose2d_rejects_bad_input-6",
        )
    )
    table.append(
        pytest.param(
            lambda: conv_transpose2d(x, w.float()),
            TypeError,
            "weight must have the dtype of x",
            id="conv_transpose2d_rejects_bad_input-7",
        )
    )
    table.append(
        pytest.param(
            lambda: conv_transpose2d(x, w, output_padding=-1),
            ValueError,
            "output_padding must be non-negative",
            id="conv_transpose2d_rejects_bad_input-8",
        )
    )
    return table


def _rows_bilinear_sample_rejects_bad_input():
    image = rand(2, 3, 4, 5)
    rows = torch.zeros(2, 6, dtype=torch.float64)
    table = []
    table.append(
        pytest.param(
            lambda: bilinear_sample(image[0], rows, rows),
            ValueError,
            "image must have 4 dimensions",
            id="bilinear_sample_rejects_bad_input-0",
        )
    )
    table.append(
        pytest.param(
            lambda: bilinear_sample(image, rows, rows[:, :5]),
            ValueError,
            "rows and cols must have the same shape",
            id="bilinear_sample_rejects_bad_input-1",
        )
    )
    table.append(
        pytest.param(
            lambda: bilinear_sample(image, rows[:1], rows[:1]),
            ValueError,
            r"same shape \(N=2, ...\)",
            id="bilinear_sample_rejects_bad_input-2",
        )
    )
    table.append(
        pytest.param(
            lambda: bilinear_sample(image, rows.float(), rows),
            TypeError,
            "rows must have dtype torch.float64",
            id="bilinear_sample_rejects_bad_input-3",
        )
    )
    table.append(
        pytest.param(
            lambda: bilinear_sample(image.long(), rows, rows),
            TypeError,
            "image must be a floating-point tensor",
            id="bilinear_sample_rejects_bad_input-4",
        )
    )
    table.append(
        pytest.param(
            lambda: bilinear_sample(image, rows, [0.0]),
            TypeError,
            "cols must be a torch.Tensor",
            id="bilinear_sample_rejects_bad_input-5",
        )
    )
    return table


def _rows_deform_conv2d_rejects_bad_input():
    x, w = rand(1, 3, 6, 6), rand(4, 3, 3, 3)
    offset = torch.zeros(1, 18, 4, 4, dtype=torch.float64)
    deform_conv2d(x, offset, w)  # fine
    table = []
    table.append(
        pytest.param(
            lambda: deform_conv2d(x, torch.zeros(1, 18, 6, 6, dtype=torch.float64), w),
            ValueError,
            r"offset must have shape \(1, 18, 4, 4\).*got \(1, 18, 6, 6\)",
            id="deform_conv2d_rejects_bad_input-0",
        )
    )
    table.append(
        pytest.param(
            lambda: deform_conv2d(x, offset[:, :9], w),
            ValueError,
            r"offset must have shape \(1, 18, 4, 4\)",
            id="deform_conv2d_rejects_bad_input-1",
        )
    )
    table.append(
        pytest.param(
            lambda: deform_conv2d(x, offset.float(), w),
            TypeError,
            "offset must have dtype torch.float64",
            id="deform_conv2d_rejects_bad_input-2",
        )
    )
    table.append(
        pytest.param(
            lambda: deform_conv2d(x, offset, rand(4, 2, 3, 3)),
            ValueError,
            r"weight must have shape \(C_out, 3, k_h, k_w\)",
            id="deform_conv2d_rejects_bad_input-3",
        )
    )
    table.append(
        pytest.param(
            lambda: deform_conv2d(rand(1, 3, 2, 2), offset, w),
            ValueError,
            "too small for a kernel",
            id="deform_conv2d_rejects_bad_input-4",
        )
    )
    table.append(
        pytest.param(
            lambda: sampling_positions(offset[:, :10], 3),
            ValueError,
            r"offset must have 2 \* 3 \* 3 = 18 channels",
            id="deform_conv2d_rejects_bad_input-5",
        )
    )
    table.append(
        pytest.param(
            lambda: sampling_positions(offset[0], 3),
            ValueError,
            "offset must have 4 dimensions",
            id="deform_conv2d_rejects_bad_input-6",
        )
    )
    table.append(
        pytest.param(
            lambda: DeformableConv2d(0, 4, 3),
            ValueError,
            "in_channels must be positive",
            id="deform_conv2d_rejects_bad_input-7",
        )
    )
    return table


def _rows_conv2d_rejects_bad_input():
    x, w = rand(2, 4, 6, 6), rand(6, 2, 3, 3)
    table = []
    table.append(
        pytest.param(
            lambda: conv2d(x.tolist(), w),
            TypeError,
            "x must be a torch.Tensor, got list",
            id="conv2d_rejects_bad_input-0",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x[0], w),
            ValueError,
            r"x must have 4 dimensions, got shape \(4, 6, 6\)",
            id="conv2d_rejects_bad_input-1",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x.long(), w),
            TypeError,
            "x must be a floating-point tensor",
            id="conv2d_rejects_bad_input-2",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w[0]),
            ValueError,
            "weight must have 4 dimensions",
            id="conv2d_rejects_bad_input-3",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w.float(), groups=2),
            TypeError,
            "weight must have the dtype of x",
            id="conv2d_rejects_bad_input-4",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w),
            ValueError,
            r"weight must have shape \(C_out, 4, k_h, k_w\) for x with 4",
            id="conv2d_rejects_bad_input-5",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, groups=3),
            ValueError,
            r"groups \(3\) must divide the input channels",
            id="conv2d_rejects_bad_input-6",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, groups=0),
            ValueError,
            "groups must be positive",
            id="conv2d_rejects_bad_input-7",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, rand(5), groups=2),
            ValueError,
            r"bias must have shape \(6,\), got \(5,\)",
            id="conv2d_rejects_bad_input-8",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, rand(6).float(), groups=2),
            TypeError,
            "bias must have dtype torch.float64",
            id="conv2d_rejects_bad_input-9",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, stride=0, groups=2),
            ValueError,
            "stride must be positive, got 0",
            id="conv2d_rejects_bad_input-10",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, padding=(1, -1), groups=2),
            ValueError,
            r"padding must be non-negative, got \(1, -1\)",
            id="conv2d_rejects_bad_input-11",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, dilation=1.5, groups=2),
            TypeError,
            "dilation must be an int or a pair of ints",
            id="conv2d_rejects_bad_input-12",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, stride=True, groups=2),
            TypeError,
            "stride must be an int or a pair of ints",
            id="conv2d_rejects_bad_input-13",
        )
    )
    table.append(
        pytest.param(
            lambda: conv2d(x, w, dilation=3, groups=2),
            ValueError,
            r"spatial size \(6, 6\) is too small",
            id="conv2d_rejects_bad_input-14",
        )
    )
    return table


def _rows_layers_reject_bad_arguments():
    table = []
    table.append(
        pytest.param(
            lambda: Conv2d(3, 0, 3),
            ValueError,
            "out_channels must be positive",
            id="layers_reject_bad_arguments-0",
        )
    )
    table.append(
        pytest.param(
            lambda: Conv2d(3, 3, 0),
            ValueError,
            "kernel_size must be positive",
            id="layers_reject_bad_arguments-1",
        )
    )
    table.append(
        pytest.param(
            lambda: Conv2d(3, 4, 3, groups=2),
            ValueError,
            r"groups \(2\) must divide the input channels",
            id="layers_reject_bad_arguments-2",
        )
    )
    table.append(
        pytest.param(
            lambda: DepthwiseSeparableConv2d(3, 4, 3, padding=-1),
            ValueError,
            "padding must be non-negative",
            id="layers_reject_bad_arguments-3",
        )
    )
    table.append(
        pytest.param(
            lambda: DeformableConv2d(3, 4, 3, dilation=0),
            ValueError,
            "dilation must be positive",
            id="layers_reject_bad_arguments-4",
        )
    )
    return table


BAD_INPUT = [
    *_rows_receptive_field_rejects_bad_input(),
    *_rows_gradient_footprint_rejects_a_too_small_size(),
    *_rows_counts_reject_bad_input(),
    *_rows_conv_transpose2d_rejects_bad_input(),
    *_rows_bilinear_sample_rejects_bad_input(),
    *_rows_deform_conv2d_rejects_bad_input(),
    *_rows_conv2d_rejects_bad_input(),
    *_rows_layers_reject_bad_arguments(),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
