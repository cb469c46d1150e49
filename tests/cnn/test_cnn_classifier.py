"""Tests for ``dlabc.cnn.cnn_classifier``.

The reference is PyTorch in float64 with the same weights: each NumPy layer's forward
and backward against ``nn.Conv2d`` (with padding), ``nn.MaxPool2d`` and ``nn.Flatten``
under autograd; a whole ``numpy_cnn`` against the ``torch_cnn`` that ``copy_to_torch``
fills (the same logits and the same gradient for every parameter, for several channel,
kernel and image sizes), and against central finite differences on a tiny network. The
parameter count is ``torch_cnn``'s and, for the default network, the hand count of the
chapter's exercise. ``random_shift`` is checked by brute force: every output image is
its input moved by one ``(dy, dx)`` in ``[-m, m]^2`` with zero fill, found by trying all
of them on images whose pixels are all different. Bad architectures and inputs fail
early with a clear message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.cnn.cnn_classifier import (
    Conv2d,
    Flatten,
    MaxPool2d,
    copy_to_torch,
    numpy_cnn,
    random_shift,
    torch_cnn,
)
from dlabc.foundations.numpy_network import (
    Dense,
    numerical_gradient,
    softmax_cross_entropy,
    train,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)  # the same float64 sums, up to rounding
FD_TOL = dict(rtol=1e-5, atol=1e-8)  # finite differences: O(eps^2) + O(1e-16 / eps)


def t64(a: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------- the layers


@pytest.mark.parametrize(
    "N, C, O, k, H, W, padding",
    [
        (2, 1, 3, 3, 6, 7, 0),
        (3, 2, 4, 5, 9, 8, 0),
        (2, 3, 2, 3, 5, 5, 1),
        (1, 2, 3, 5, 6, 4, 2),
        (2, 4, 1, 1, 3, 4, 0),
    ],
)
def test_conv2d_layer_matches_torch_conv2d(N, C, O, k, H, W, padding):
    r = rng(N * 100 + C * 10 + k)
    layer = Conv2d(C, O, k, r, padding=padding, dtype=np.float64)
    layer.b[...] = r.normal(size=O)  # non-zero bias, so a wrong bias term shows
    x = r.normal(size=(N, C, H, W))
    out = layer.forward(x)
    G = r.normal(size=out.shape)  # loss = sum(out * G), so dL/dout = G
    dx = layer.backward(G)

    conv = nn.Conv2d(C, O, k, padding=padding).double()
    with torch.no_grad():
        conv.weight.copy_(t64(layer.W))
        conv.bias.copy_(t64(layer.b))
    xt = t64(x, True)
    out_t = conv(xt)
    (out_t * t64(G)).sum().backward()
    np.testing.assert_allclose(out, out_t.detach().numpy(), **TIGHT)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TIGHT)
    np.testing.assert_allclose(layer.dW, conv.weight.grad.numpy(), **TIGHT)
    np.testing.assert_allclose(layer.db, conv.bias.grad.numpy(), **TIGHT)
    assert out.dtype == dx.dtype == np.float64
    # parameters() hands out the arrays the optimizer updates and the current gradients
    (Wp, dW), (bp, db) = layer.parameters()
    assert Wp is layer.W and dW is layer.dW and bp is layer.b and db is layer.db


def test_conv2d_layer_he_initialisation_and_dtype():
    C, O, k = 6, 50, 5  # 7,500 weights: the sample variance is within ~3% of 2/150
    layer = Conv2d(C, O, k, rng(1))
    assert layer.W.shape == (O, C, k, k) and layer.b.shape == (O,)
    assert layer.W.dtype == layer.b.dtype == layer.dW.dtype == np.float32
    assert layer.W.var() == pytest.approx(2.0 / (C * k * k), rel=0.1)
    np.testing.assert_array_equal(layer.b, 0.0)
    x = rng(2).normal(size=(2, C, 7, 7)).astype(np.float32)
    out = layer.forward(x)
    assert out.shape == (2, O, 3, 3) and out.dtype == np.float32
    assert layer.backward(np.ones_like(out)).dtype == np.float32


@pytest.mark.parametrize("k, H, W", [(2, 6, 8), (2, 7, 5), (3, 9, 10), (1, 3, 3)])
def test_max_pool_layer_matches_torch(k, H, W):
    r = rng(k * 10 + H)
    x = r.normal(size=(2, 3, H, W))  # continuous values: no ties
    layer = MaxPool2d(k)
    out = layer.forward(x)
    G = r.normal(size=out.shape)
    dx = layer.backward(G)

    xt = t64(x, True)
    out_t = nn.MaxPool2d(k)(xt)  # stride k, floor: odd sizes drop the last row
    (out_t * t64(G)).sum().backward()
    assert out.shape == (2, 3, H // k, W // k)
    np.testing.assert_array_equal(out, out_t.detach().numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())
    assert layer.parameters() == []


def test_flatten_layer_matches_torch():
    r = rng(3)
    x = r.normal(size=(4, 3, 2, 5))
    layer = Flatten()
    out = layer.forward(x)
    G = r.normal(size=out.shape)
    dx = layer.backward(G)
    xt = t64(x, True)
    out_t = nn.Flatten()(xt)
    (out_t * t64(G)).sum().backward()
    assert out.shape == (4, 30)
    np.testing.assert_array_equal(out, out_t.detach().numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())
    assert layer.parameters() == []


# --------------------------------------------------------------------- whole network


CONFIGS = [  # channels, hidden, n_classes, kernel_size, image_size, in_channels
    ((2,), 5, 3, 3, 8, 1),
    ((3, 4), 6, 4, 3, 14, 1),
    ((2, 3), 7, 10, 5, 28, 1),
    ((2, 3, 2), 4, 5, 3, 22, 3),
    ((4,), 3, 2, 1, 5, 2),
]


def arch(config) -> dict:
    channels, hidden, n_classes, kernel_size, image_size, in_channels = config
    return dict(
        channels=channels,
        hidden=hidden,
        n_classes=n_classes,
        kernel_size=kernel_size,
        image_size=image_size,
        in_channels=in_channels,
    )


def randomise_biases(network, seed: int) -> None:
    """Biases start at zero; random ones show whether they are used (and copied)."""
    r = rng(seed)
    for layer in network.layers:
        if isinstance(layer, (Conv2d, Dense)):
            layer.b[...] = r.normal(scale=0.1, size=layer.b.shape)


@pytest.mark.parametrize("config", CONFIGS)
def test_numpy_cnn_matches_torch_cnn_logits_and_every_gradient(config):
    kwargs = arch(config)
    network = numpy_cnn(**kwargs, seed=1, dtype=np.float64)
    randomise_biases(network, seed=2)
    model = copy_to_torch(network, torch_cnn(**kwargs).double())
    r = rng(3)
    size, c_in = kwargs["image_size"], kwargs["in_channels"]
    X = r.normal(size=(3, c_in, size, size))
    y = r.integers(0, kwargs["n_classes"], size=3)

    logits = network.forward(X)
    loss, grad = softmax_cross_entropy(logits, y)
    network.backward(grad)

    logits_t = model(t64(X))
    loss_t = F.cross_entropy(logits_t, torch.tensor(y))
    loss_t.backward()
    np.testing.assert_allclose(logits, logits_t.detach().numpy(), **TIGHT)
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    ours, theirs = network.parameters(), list(model.parameters())
    assert len(ours) == len(theirs) == 2 * (len(kwargs["channels"]) + 2)
    for (param, grad_param), p in zip(ours, theirs, strict=True):
        # torch's Linear stores W as (out, in), our Dense as (in, out)
        expected, expected_grad = p.detach().numpy(), p.grad.numpy()
        if param.ndim == 2:
            expected, expected_grad = expected.T, expected_grad.T
        np.testing.assert_array_equal(param, expected)  # copied exactly
        np.testing.assert_allclose(grad_param, expected_grad, **TIGHT)


def test_numpy_cnn_float32_agrees_with_the_float32_torch_cnn():
    network = numpy_cnn(channels=(4, 6), hidden=20, seed=4)
    model = copy_to_torch(network, torch_cnn(channels=(4, 6), hidden=20))
    assert all(p.dtype == np.float32 for p, _ in network.parameters())
    X = rng(5).random((4, 1, 28, 28), dtype=np.float32)
    logits = network.forward(X)
    assert logits.dtype == np.float32 and logits.shape == (4, 10)
    with torch.no_grad():
        expected = model(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_numpy_cnn_gradients_match_finite_differences():
    kwargs = dict(channels=(2,), hidden=4, n_classes=3, kernel_size=3, image_size=6)
    network = numpy_cnn(**kwargs, seed=6, dtype=np.float64)
    randomise_biases(network, seed=7)
    r = rng(8)
    X = r.normal(size=(2, 1, 6, 6))
    y = np.array([0, 2])
    _, grad = softmax_cross_entropy(network.forward(X), y)
    network.backward(grad)
    analytic = [g.copy() for _, g in network.parameters()]
    params = [p for p, _ in network.parameters()]
    assert [p.shape for p in params] == [(2, 1, 3, 3), (2,), (8, 4), (4,), (4, 3), (3,)]

    def f() -> float:
        return softmax_cross_entropy(network.forward(X), y)[0]

    for p, g in zip(params, analytic, strict=True):
        np.testing.assert_allclose(g, numerical_gradient(f, p), **FD_TOL)


@pytest.mark.parametrize("config", CONFIGS)
def test_numpy_cnn_has_as_many_parameters_as_torch_cnn(config):
    kwargs = arch(config)
    n_ours = sum(p.size for p, _ in numpy_cnn(**kwargs).parameters())
    n_theirs = sum(p.numel() for p in torch_cnn(**kwargs).parameters())
    assert n_ours == n_theirs


def test_default_network_parameter_count_by_hand():
    # 28 -> 24 -> 12 -> 8 -> 4: conv 8x1x5x5 + 8, conv 16x8x5x5 + 16,
    # dense 16*4*4 -> 100, dense 100 -> 10
    by_hand = (8 * 25 + 8) + (16 * 8 * 25 + 16) + (256 * 100 + 100) + (100 * 10 + 10)
    assert sum(p.size for p, _ in numpy_cnn().parameters()) == by_hand == 30134
    assert sum(p.numel() for p in torch_cnn().parameters()) == by_hand


def test_numpy_cnn_is_reproducible_and_depends_on_seed():
    a, b, c = numpy_cnn(seed=3), numpy_cnn(seed=3), numpy_cnn(seed=4)
    for (p, _), (q, _) in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_array_equal(p, q)
    assert not np.array_equal(a.parameters()[0][0], c.parameters()[0][0])


def test_numpy_cnn_trains_with_momentum_and_shifts_and_stays_float32():
    r = rng(9)
    X = r.random((16, 1, 10, 10), dtype=np.float32)
    y = r.integers(0, 3, size=16)
    network = numpy_cnn(
        channels=(2,), hidden=8, n_classes=3, kernel_size=3, image_size=10
    )
    history = train(
        network,
        X,
        y,
        X,
        y,
        epochs=2,
        batch_size=8,
        lr=0.05,
        momentum=0.9,
        augment=lambda images, g: random_shift(images, 1, g),
    )
    assert all(np.isfinite(v).all() for v in history.values())
    assert all(p.dtype == np.float32 for p, _ in network.parameters())


def test_torch_cnn_layers_and_output_shape():
    model = torch_cnn(
        channels=(3, 5), hidden=7, n_classes=4, kernel_size=3, image_size=16
    )
    kinds = [type(m) for m in model]
    assert kinds == [
        nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d,
        nn.Flatten, nn.Linear, nn.ReLU, nn.Linear,
    ]  # fmt: skip
    assert all(m.bias is not None for m in model if isinstance(m, nn.Conv2d))
    assert model[7].in_features == 5 * 2 * 2  # 16 -> 14 -> 7 -> 5 -> 2
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)


def test_torch_cnn_with_batch_norm():
    model = torch_cnn(
        channels=(3, 5, 6), hidden=7, kernel_size=3, image_size=30, batch_norm=True
    )
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 3
    assert all(conv.bias is None for conv in convs)  # the normalization cancels it
    assert [n.num_features for n in norms] == [3, 5, 6]
    for i, m in enumerate(model):  # conv, max-pool, its normalization, ReLU
        if isinstance(m, nn.Conv2d):
            assert isinstance(model[i + 1], nn.MaxPool2d)
            assert isinstance(model[i + 2], nn.BatchNorm2d)
            assert isinstance(model[i + 3], nn.ReLU)
            assert model[i + 2].num_features == m.out_channels
    assert model(torch.zeros(2, 1, 30, 30)).shape == (2, 10)
    with pytest.raises(ValueError, match="BatchNorm layers, which the NumPy network"):
        copy_to_torch(
            numpy_cnn(channels=(3, 5, 6), hidden=7, kernel_size=3, image_size=30), model
        )


@pytest.mark.parametrize(
    "other, match",
    [
        (dict(channels=(3,)), "the NumPy network has 4 weight layers, the model 3"),
        (
            dict(channels=(3, 5, 4)),
            "the NumPy network has 4 weight layers, the model 5",
        ),
        (dict(channels=(3, 6)), "weight shapes differ"),
        (dict(channels=(3, 5), hidden=9), "weight shapes differ"),
        (dict(channels=(3, 5), n_classes=4), "weight shapes differ"),
        (dict(channels=(3, 5), kernel_size=5), "weight shapes differ"),
        (dict(channels=(3, 5), in_channels=2), "weight shapes differ"),
    ],
)
def test_copy_to_torch_rejects_mismatched_architectures(other, match):
    network = numpy_cnn(channels=(3, 5), hidden=7, kernel_size=3, image_size=30)
    model = torch_cnn(**{"hidden": 7, "kernel_size": 3, "image_size": 30, **other})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        copy_to_torch(network, model)
    # nothing was copied: a failed copy leaves the model as it was
    assert all(
        torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)
    )


@pytest.mark.parametrize(
    "image_size, channels", [(6, (2,)), (16, (2, 2)), (36, (2, 2, 2))]
)
def test_the_smallest_images_that_fit_are_accepted(image_size, channels):
    # 5x5 kernels: a block needs 6 pixels (conv leaves 2, pooling 1)
    network = numpy_cnn(channels=channels, hidden=3, image_size=image_size)
    model = torch_cnn(channels=channels, hidden=3, image_size=image_size)
    x = np.zeros((1, 1, image_size, image_size), dtype=np.float32)
    assert network.forward(x).shape == (1, 10)
    assert model(torch.from_numpy(x)).shape == (1, 10)
    if image_size > 6:  # one pixel fewer no longer fits
        with pytest.raises(ValueError, match="too small"):
            numpy_cnn(channels=channels, hidden=3, image_size=image_size - 1)


# --------------------------------------------------------------------- random_shift


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` (C, H, W) moved down by ``dy`` and right by ``dx``, zeros coming in."""
    out = np.zeros_like(image)
    H, W = image.shape[1:]
    out[:, max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = image[
        :, max(-dy, 0) : H + min(-dy, 0), max(-dx, 0) : W + min(-dx, 0)
    ]
    return out


def distinct_images(N: int, C: int, H: int, W: int, seed: int) -> np.ndarray:
    """Images whose pixels are all different and non-zero, so that a shift is unique."""
    r = rng(seed)
    values = np.stack([r.permutation(C * H * W) + 1.0 for _ in range(N)])
    return values.reshape(N, C, H, W).astype(np.float32)


@pytest.mark.parametrize("m, C, H, W", [(1, 1, 5, 5), (2, 2, 6, 7), (3, 1, 4, 9)])
def test_random_shift_moves_each_image_by_one_offset_with_zero_fill(m, C, H, W):
    images = distinct_images(300, C, H, W, seed=m)
    out = random_shift(images, m, rng(10))
    assert out.shape == images.shape and out.dtype == images.dtype
    offsets = [(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)]
    seen = []
    for image, result in zip(images, out, strict=True):
        # every channel moved together; exactly one offset explains the result
        found = [o for o in offsets if np.array_equal(result, shifted(image, *o))]
        assert len(found) == 1
        seen.append(found[0])
    # 300 draws of (2m+1)^2 equally likely offsets: all of them occur
    assert set(seen) == set(offsets)
    np.testing.assert_array_equal(images, distinct_images(300, C, H, W, seed=m))


def test_shifted_helper_moves_as_documented():
    image = np.arange(1.0, 10.0).reshape(1, 3, 3)
    np.testing.assert_array_equal(
        shifted(image, 1, -1)[0], [[0, 0, 0], [2, 3, 0], [5, 6, 0]]
    )


def test_random_shift_by_zero_is_the_identity():
    images = rng(11).normal(size=(5, 3, 4, 6))
    out = random_shift(images, 0, rng(12))
    np.testing.assert_array_equal(out, images)
    assert out.dtype == np.float64


def test_random_shift_larger_than_the_image_gives_zeros_or_shifts():
    images = distinct_images(50, 1, 2, 2, seed=13)
    out = random_shift(images, 3, rng(14))
    assert out.shape == images.shape
    assert (out == 0).all(axis=(1, 2, 3)).any()  # moved out of the frame entirely


def test_random_shift_is_deterministic_given_the_generator():
    images = distinct_images(20, 2, 8, 8, seed=15)
    a = random_shift(images, 2, rng(16))
    b = random_shift(images, 2, rng(16))
    c = random_shift(images, 2, rng(17))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pooling_before_batch_norm_and_relu_is_the_usual_block_in_evaluation():
    """ReLU and an affine map with positive scale commute with max-pooling, so the cheap
    order (pool, BN, ReLU) equals the usual one (BN, ReLU, pool) once BN uses fixed
    statistics; with a negative scale it does not."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 8, 8)
    cheap = nn.Sequential(nn.MaxPool2d(2), norm, nn.ReLU())
    usual = nn.Sequential(norm, nn.ReLU(), nn.MaxPool2d(2))
    torch.testing.assert_close(cheap(x), usual(x))
    with torch.no_grad():
        norm.weight[0] = -1.0
    assert not torch.allclose(cheap(x)[:, 0], usual(x)[:, 0])


# --------------------------------------------------------------------- bad input

_CONV2D_BAD_SIZES = [
    (0, ValueError, "must be positive, got 0"),
    (-2, ValueError, "must be positive, got -2"),
    (2.0, TypeError, "must be an int, got float"),
    (True, TypeError, "must be an int, got bool"),
]
_MAX_POOL_BAD_KERNELS = [(0, ValueError), (-1, ValueError), (2.0, TypeError)]
_BUILDER_BAD_ARGUMENTS = [
    (dict(channels=()), ValueError, "channels must list at least one"),
    (dict(channels=[]), ValueError, "channels must list at least one"),
    (dict(channels=8), TypeError, "channels must be a tuple of ints"),
    (dict(channels=(8, 0)), ValueError, "every entry of channels must be positive"),
    (dict(channels=(-1,)), ValueError, "every entry of channels must be positive"),
    (dict(channels=(8.0,)), TypeError, "every entry of channels must be an int"),
    (dict(hidden=0), ValueError, "hidden must be positive, got 0"),
    (dict(hidden=-5), ValueError, "hidden must be positive, got -5"),
    (dict(hidden=10.0), TypeError, "hidden must be an int"),
    (dict(n_classes=0), ValueError, "n_classes must be positive, got 0"),
    (dict(n_classes=True), TypeError, "n_classes must be an int, got bool"),
    (dict(kernel_size=0), ValueError, "kernel_size must be positive, got 0"),
    (dict(kernel_size=-3), ValueError, "kernel_size must be positive, got -3"),
    (dict(kernel_size=5.0), TypeError, "kernel_size must be an int"),
    (dict(image_size=0), ValueError, "image_size must be positive, got 0"),
    (dict(in_channels=0), ValueError, "in_channels must be positive, got 0"),
    # 28 -> 24 -> 12 -> 8 -> 4: a third 5x5 block does not fit
    (
        dict(channels=(2, 2, 2)),
        ValueError,
        "block 3 gets 4 pixels, it needs at least 6",
    ),
    (dict(image_size=12), ValueError, "a 12-pixel image is too small for 2 blocks"),
    (dict(image_size=4), ValueError, "block 1 gets 4 pixels"),
    # 13 -> 9 -> 4: too few for the second 5x5 convolution
    (dict(image_size=13), ValueError, "block 2 gets 4 pixels"),
    (dict(image_size=5, channels=(2,)), ValueError, "block 1 gets 5 pixels"),
]
_BAD_MAX_SHIFTS = [-1, 1.5, 2.0, True, None, "2", np.float64(1.0)]
_BAD_IMAGES = [
    (np.zeros((1, 4, 4)), ValueError, "images must have 4 dimensions"),
    (np.zeros((4, 4)), ValueError, "images must have 4 dimensions"),
    (np.zeros((1, 1, 1, 4, 4)), ValueError, "images must have 4 dimensions"),
    ([[[[0.0]]]], TypeError, "images must be a NumPy array"),
    (np.zeros((1, 1, 4, 4), dtype=np.uint8), TypeError, "floating-point"),
]


def _conv_layer():
    return Conv2d(2, 3, 3, rng(), dtype=np.float64)


def _small_network():
    return numpy_cnn(channels=(2,), hidden=3, kernel_size=3, image_size=8)


BAD_INPUT = [
    *[
        pytest.param(
            lambda which=which, bad=bad: Conv2d(
                **{"in_channels": 2, "out_channels": 3, "kernel_size": 3, which: bad},
                rng=rng(),
            ),
            error,
            f"{which} {match}",
            id=f"Conv2d-{which}={bad!r}",
        )
        for which in ("in_channels", "out_channels", "kernel_size")
        for bad, error, match in _CONV2D_BAD_SIZES
    ],
    pytest.param(
        lambda: _conv_layer().forward(np.zeros((2, 5, 5))),
        ValueError,
        "x must have 4 dimensions",
        id="Conv2d-x-3d",
    ),
    pytest.param(
        lambda: _conv_layer().forward(np.zeros((1, 1, 5, 5))),
        ValueError,
        "for x with 1 channels",
        id="Conv2d-x-channels",
    ),
    pytest.param(
        lambda: _conv_layer().forward(np.zeros((1, 2, 2, 5))),
        ValueError,
        "does not fit in an input of 2",
        id="Conv2d-x-too-small",
    ),
    pytest.param(
        lambda: _conv_layer().forward(np.zeros((1, 2, 5, 5), dtype=np.uint8)),
        TypeError,
        "x must be a floating-point array",
        id="Conv2d-x-uint8",
    ),
    pytest.param(
        lambda: Conv2d(2, 3, 3, rng(), padding=-1).forward(np.zeros((1, 2, 5, 5))),
        ValueError,
        "padding must be >= 0",
        id="Conv2d-padding",
    ),
    *[
        pytest.param(
            lambda bad=bad: MaxPool2d(bad),
            error,
            "kernel_size must be",
            id=f"MaxPool2d-kernel_size={bad!r}",
        )
        for bad, error in _MAX_POOL_BAD_KERNELS
    ],
    *[
        pytest.param(
            lambda build=build, kwargs=kwargs: build(**kwargs),
            error,
            match,
            id=f"{build.__name__}-{kwargs}",
        )
        for build in (numpy_cnn, torch_cnn)
        for kwargs, error, match in _BUILDER_BAD_ARGUMENTS
    ],
    pytest.param(
        lambda: _small_network().forward(np.zeros((2, 8, 8), dtype=np.float32)),
        ValueError,
        "x must have 4 dimensions",
        id="numpy_cnn-x-3d",
    ),
    pytest.param(  # 2 * 3 * 3 features after the block
        lambda: _small_network().forward(np.zeros((2, 1, 10, 10), dtype=np.float32)),
        ValueError,
        "x must have 18 features",
        id="numpy_cnn-x-size",
    ),
    *[
        pytest.param(
            lambda bad=bad: random_shift(np.zeros((2, 1, 4, 4)), bad, rng()),
            ValueError,
            "max_shift must be a non-negative int",
            id=f"random_shift-max_shift={bad!r}",
        )
        for bad in _BAD_MAX_SHIFTS
    ],
    *[
        pytest.param(
            lambda images=images: random_shift(images, 1, rng()),
            error,
            match,
            id=f"random_shift-images-{i}",
        )
        for i, (images, error, match) in enumerate(_BAD_IMAGES)
    ],
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
