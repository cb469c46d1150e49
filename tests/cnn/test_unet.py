"""Tests for ``dlabc.cnn.unet``.

The metrics are compared with scikit-learn: Dice is the F1 score and IoU the Jaccard
index of each class over the flattened pixels (``average=None`` and ``"macro"``, the
same class set, ``zero_division=1`` for a class that is nowhere), plus the closed
forms (a perfect prediction scores 1, a disjoint one 0). The soft Dice loss is
checked against its formula written with explicit loops, and its gradient with
``torch.autograd.gradcheck`` in float64. The U-Net must keep the spatial size for
several sizes and depths, have exactly the number of parameters of the closed form
(counted independently here from the layer shapes), and lose exactly
$3b^2(4^D - 1)$ of them without skip connections. Without skips the output must not
depend on encoder features that max-pooling discards; with skips it must. Bad input
must fail early, with a clear message. ``boundary_band`` is compared with
scikit-image's ``find_boundaries`` (mode "thick") grown by SciPy's binary dilation.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import skimage.segmentation
import sklearn.metrics
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.cnn.unet import (
    DoubleConv,
    UNet,
    boundary_band,
    dice_loss,
    dice_score,
    iou_score,
    unet_parameter_count,
)

# --------------------------------------------------------------------- metrics


def random_labels(shape, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_classes, shape, generator=g)


def sklearn_scores(pred, target, n_classes, average):
    kwargs = dict(labels=list(range(n_classes)), average=average, zero_division=1.0)
    y_true, y_pred = target.reshape(-1).numpy(), pred.reshape(-1).numpy()
    return (
        sklearn.metrics.f1_score(y_true, y_pred, **kwargs),
        sklearn.metrics.jaccard_score(y_true, y_pred, **kwargs),
    )


@pytest.mark.parametrize(
    "shape, n_classes",
    [((50,), 2), ((3, 8, 8), 4), ((2, 5, 7), 3), ((4, 6, 6), 6), ((1, 16, 16), 10)],
    ids=str,
)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("average", [None, "macro"])
def test_dice_and_iou_equal_sklearn_f1_and_jaccard(shape, n_classes, seed, average):
    target = random_labels(shape, n_classes, seed)
    # a prediction that is right about 60 % of the time
    pred = torch.where(
        torch.rand(shape) < 0.6, target, random_labels(shape, n_classes, seed + 10)
    )
    f1, jaccard = sklearn_scores(pred, target, n_classes, average)
    dice = dice_score(pred, target, n_classes, average=average)
    iou = iou_score(pred, target, n_classes, average=average)
    assert dice.dtype == iou.dtype == torch.float64
    assert dice.shape == ((n_classes,) if average is None else ())
    np.testing.assert_allclose(dice.numpy(), f1, rtol=1e-12)
    np.testing.assert_allclose(iou.numpy(), jaccard, rtol=1e-12)


@pytest.mark.parametrize("average", [None, "macro"])
def test_a_class_absent_from_both_scores_one_like_sklearn_zero_division_1(average):
    target = torch.tensor([[0, 0, 1], [1, 3, 3]])  # class 2 is nowhere
    pred = torch.tensor([[0, 1, 1], [1, 3, 0]])
    f1, jaccard = sklearn_scores(pred, target, 4, average)
    np.testing.assert_allclose(dice_score(pred, target, 4, average).numpy(), f1)
    np.testing.assert_allclose(iou_score(pred, target, 4, average).numpy(), jaccard)
    assert dice_score(pred, target, 4)[2] == 1 and iou_score(pred, target, 4)[2] == 1


def test_a_class_predicted_but_absent_scores_zero():
    target = torch.zeros(4, 4, dtype=torch.long)
    pred = target.clone()
    pred[0, 0] = 2
    assert dice_score(pred, target, 3)[2] == 0 and iou_score(pred, target, 3)[2] == 0


@pytest.mark.parametrize("n_classes", [2, 4, 7])
def test_closed_forms_perfect_and_disjoint(n_classes):
    target = random_labels((3, 9, 9), n_classes, 0)
    for fn in (dice_score, iou_score):
        torch.testing.assert_close(
            fn(target, target, n_classes), torch.ones(n_classes, dtype=torch.float64)
        )
        assert fn(target, target, n_classes, average="macro") == 1
        # every pixel assigned to another class: no overlap anywhere
        shifted = (target + 1) % n_classes
        torch.testing.assert_close(
            fn(shifted, target, n_classes), torch.zeros(n_classes, dtype=torch.float64)
        )


def test_dice_and_iou_of_a_known_pair_of_squares():
    """Two 4x4 squares overlapping in 2x4 pixels: Dice 8/16, IoU 8/24."""
    target = torch.zeros(8, 8, dtype=torch.long)
    pred = torch.zeros(8, 8, dtype=torch.long)
    target[0:4, 0:4] = 1
    pred[2:6, 0:4] = 1
    assert dice_score(pred, target, 2)[1].item() == pytest.approx(0.5)
    assert iou_score(pred, target, 2)[1].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_dice_and_iou_are_related_by_d_equals_2j_over_1_plus_j(n):
    target = random_labels((n, 6, 6), 3, n)
    pred = random_labels((n, 6, 6), 3, n + 1)
    d, j = dice_score(pred, target, 3), iou_score(pred, target, 3)
    torch.testing.assert_close(d, 2 * j / (1 + j))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_metrics_accept_any_integer_dtype(dtype):
    target = random_labels((2, 5, 5), 3, 0)
    pred = random_labels((2, 5, 5), 3, 1)
    torch.testing.assert_close(
        dice_score(pred.to(dtype), target.to(dtype), 3), dice_score(pred, target, 3)
    )


# --------------------------------------------------------------------- Dice loss


def dice_loss_by_loops(logits, target, smooth):
    """The V-Net formula, one class and one sum at a time."""
    probs = logits.softmax(1)
    n_classes = logits.shape[1]
    ratios = []
    for k in range(n_classes):
        p = probs[:, k]
        t = (target == k).to(logits.dtype)
        ratios.append((2 * (p * t).sum() + smooth) / ((p**2).sum() + t.sum() + smooth))
    return 1 - sum(ratios) / n_classes


@pytest.mark.parametrize(
    "shape", [(2, 3, 4, 4), (1, 2, 5), (3, 4, 2, 3, 2), (5, 3)], ids=str
)
@pytest.mark.parametrize("smooth", [1e-6, 1.0, 10.0])
def test_dice_loss_matches_its_formula(shape, smooth):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    loss = dice_loss(logits, target, smooth=smooth)
    assert loss.shape == ()
    torch.testing.assert_close(loss, dice_loss_by_loops(logits, target, smooth))


@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (1, 4, 2, 5), (3, 2, 4)], ids=str)
@pytest.mark.parametrize("smooth", [1e-3, 1.0])
def test_dice_loss_gradcheck(shape, smooth):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    assert torch.autograd.gradcheck(lambda x: dice_loss(x, target, smooth), (logits,))


def test_dice_loss_closed_forms():
    target = random_labels((2, 6, 6), 3, 0)
    one_hot = F.one_hot(target, 3).permute(0, 3, 1, 2).double()
    # confident and right: probabilities are the one-hot target, loss -> 0
    assert dice_loss(one_hot * 100, target, smooth=1e-9).item() == pytest.approx(
        0, abs=1e-9
    )
    # confident and always wrong: no overlap, loss -> 1 (up to the smoothing)
    wrong = F.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).double()
    assert dice_loss(wrong * 100, target, smooth=1e-9).item() == pytest.approx(1)
    # uniform probabilities 1/K: class k has ratio 2 n_k / K / (M / K^2 + n_k)
    uniform = torch.zeros(2, 3, 6, 6, dtype=torch.float64)
    m = target.numel()
    n = torch.bincount(target.reshape(-1), minlength=3).double()
    expected = 1 - (2 * n / 3 / (m / 9 + n)).mean()
    torch.testing.assert_close(dice_loss(uniform, target, smooth=1e-12), expected)


# --------------------------------------------------------------------- the network


def parameters_from_layer_shapes(model: nn.Module) -> int:
    """Count parameters from the layers' declared shapes, not from the tensors."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            kh, kw = m.kernel_size
            total += m.in_channels * m.out_channels * kh * kw
            total += m.out_channels if m.bias is not None else 0
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * m.num_features
    return total


CONFIGS = [
    # in_channels, n_classes, base_channels, depth
    (1, 2, 4, 1),
    (1, 4, 8, 2),
    (3, 5, 4, 3),
    (2, 3, 6, 2),
    (1, 2, 2, 4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no-skip"])
def test_parameter_count_equals_the_closed_form(config, skip):
    """The closed form against the tensors, and against the declared layer shapes."""
    model = UNet(*config, skip=skip)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == unet_parameter_count(*config, skip=skip)
    assert counted == parameters_from_layer_shapes(model)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_skips_cost_exactly_3_b2_times_4_to_the_d_minus_1_parameters(config):
    _, _, b, depth = config
    with_skips = sum(p.numel() for p in UNet(*config).parameters())
    without = sum(p.numel() for p in UNet(*config, skip=False).parameters())
    assert with_skips - without == 3 * b**2 * (4**depth - 1)


def test_closed_form_for_the_default_unet_by_hand():
    """b = 16, D = 3, one input channel, 2 classes, written out level by level."""

    def dc(a, c):
        return 9 * a * c + 9 * c * c + 4 * c

    encoder = dc(1, 16) + dc(16, 32) + dc(32, 64) + dc(64, 128)
    decoder = sum(4 * 2 * c * c + c + dc(2 * c, c) for c in (16, 32, 64))
    expected = encoder + decoder + 16 * 2 + 2
    assert unet_parameter_count(1, 2) == expected
    assert sum(p.numel() for p in UNet(1, 2).parameters()) == expected


@pytest.mark.parametrize(
    "n, c_in, k, b, depth, h, w",
    [
        (2, 1, 4, 4, 1, 6, 10),
        (1, 3, 2, 4, 2, 8, 12),
        (3, 1, 3, 4, 3, 16, 8),
        (2, 2, 5, 2, 3, 24, 40),
        (1, 1, 2, 2, 4, 32, 16),
    ],
)
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no-skip"])
def test_unet_keeps_the_spatial_size(n, c_in, k, b, depth, h, w, skip):
    model = UNet(c_in, k, base_channels=b, depth=depth, skip=skip)
    x = torch.randn(n, c_in, h, w)
    assert model(x).shape == (n, k, h, w)
    model.eval()
    assert model(x).shape == (n, k, h, w)


def test_unet_levels_have_the_documented_channels_and_sizes():
    model = UNet(1, 3, base_channels=4, depth=3)
    shapes = {}

    def record(name):
        return lambda module, inputs, output: shapes.__setitem__(name, output.shape)

    for level in range(3):
        model.encoder[level].register_forward_hook(record(f"e{level}"))
        model.decoder[level].register_forward_hook(record(f"d{level}"))
    model.bottleneck.register_forward_hook(record("e3"))
    model(torch.randn(2, 1, 16, 24))
    for level in range(3):
        c, s = 4 * 2**level, 2**level
        assert shapes[f"e{level}"] == (2, c, 16 // s, 24 // s)
        assert shapes[f"d{level}"] == (2, c, 16 // s, 24 // s)
    assert shapes["e3"] == (2, 32, 2, 3)


def test_double_conv_equals_the_same_layers_by_hand():
    torch.manual_seed(0)
    block = DoubleConv(3, 5).double().eval()
    with torch.no_grad():
        for m in block.modules():  # non-trivial BatchNorm statistics and affine
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    conv1, bn1, _, conv2, bn2, _ = block
    y = x
    for conv, bn in ((conv1, bn1), (conv2, bn2)):
        y = F.conv2d(y, conv.weight, padding=1)
        y = F.batch_norm(
            y, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps
        )
        y = F.relu(y)
    torch.testing.assert_close(block(x), y)
    assert conv1.bias is None and conv2.bias is None


def discard_non_maxima(module, inputs, output):
    """Lower every value that 2x2 max-pooling does not keep; the maxima stay."""
    pooled, index = F.max_pool2d(output, 2, return_indices=True)
    kept = torch.zeros_like(output).flatten(2)
    kept.scatter_(2, index.flatten(2), 1.0)
    return output - 0.5 * (1 - kept.view_as(output))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_without_skips_the_decoder_sees_only_what_pooling_keeps(depth):
    """Changing encoder features that max-pooling discards changes nothing without
    skip connections, and changes the output with them."""
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    for skip, changes in ((False, False), (True, True)):
        torch.manual_seed(0)
        model = UNet(1, 3, base_channels=4, depth=depth, skip=skip).double().eval()
        before = model(x)
        handles = [
            block.register_forward_hook(discard_non_maxima) for block in model.encoder
        ]
        after = model(x)
        for handle in handles:
            handle.remove()
        difference = (after - before).abs().max().item()
        if changes:
            assert difference > 1e-3
        else:
            assert difference == 0


def test_unet_backward_reaches_every_parameter():
    model = UNet(1, 3, base_channels=4, depth=2)
    x = torch.randn(2, 1, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    (F.cross_entropy(model(x), target) + dice_loss(model(x), target)).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()
    )


# --------------------------------------------------------------------- boundary band


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_boundary_band_equals_skimage_find_boundaries_dilated(width, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, n_classes, (3, 9, 11), generator=g)
    masks[1] = 0  # one image with no boundary at all
    masks[2, :, :5] = 1  # and one with a straight edge
    masks[2, :, 5:] = 0
    expected = []
    for mask in masks.numpy():
        edge = skimage.segmentation.find_boundaries(mask, connectivity=1, mode="thick")
        if width > 1:
            square = np.ones((2 * width - 1, 2 * width - 1), dtype=bool)
            edge = scipy.ndimage.binary_dilation(edge, square)
        expected.append(edge)
    band = boundary_band(masks, width)
    assert band.dtype == torch.bool and band.shape == masks.shape
    np.testing.assert_array_equal(band.numpy(), np.stack(expected))
    assert not band[1].any()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_boundary_band_of_a_square_has_8k_minus_4_pixels(k):
    """A k x k square inside the background: its own rim (4k - 4 pixels, k^2 if
    k <= 2) and the 4k background pixels that touch its sides."""
    masks = torch.zeros(1, 12, 12, dtype=torch.long)
    masks[0, 3 : 3 + k, 4 : 4 + k] = 2
    rim = 4 * k - 4 if k > 2 else k * k
    assert boundary_band(masks).sum().item() == rim + 4 * k


# --------------------------------------------------------------------- bad input


_LONG = torch.zeros(2, 4, 4, dtype=torch.long)
_LOGITS = torch.randn(2, 3, 4, 4)
_UNET_ARGS = dict(in_channels=1, n_classes=2, base_channels=4, depth=2)
_BAD_UNET_ARGS = [
    (dict(in_channels=0), ValueError, "in_channels must be positive, got 0"),
    (dict(in_channels=1.0), TypeError, "in_channels must be an int"),
    (dict(n_classes=1), ValueError, "n_classes must be at least 2, got 1"),
    (dict(n_classes=-3), ValueError, "n_classes must be positive"),
    (dict(base_channels=0), ValueError, "base_channels must be positive"),
    (dict(depth=0), ValueError, "depth must be positive, got 0"),
    (dict(depth=True), TypeError, "depth must be an int"),
    (dict(skip=1), TypeError, "skip must be a bool, got int"),
]


def _metric_rows(fn):
    name = fn.__name__
    return [
        pytest.param(
            lambda: fn(torch.zeros(2, 4, 5, dtype=torch.long), _LONG, 3),
            ValueError,
            r"pred and target must have the same shape, got \(2, 4, 5\) and "
            r"\(2, 4, 4\)",
            id=f"{name}-shapes",
        ),
        pytest.param(
            lambda: fn(torch.arange(32).reshape(2, 4, 4) % 4, _LONG, 3),
            ValueError,
            r"pred labels must lie in \[0, 2\], got values from 0 to 3",
            id=f"{name}-pred-range",
        ),
        pytest.param(
            lambda: fn(_LONG, torch.full((2, 4, 4), -1), 3),
            ValueError,
            r"target labels must lie in \[0, 2\]",
            id=f"{name}-target-range",
        ),
        pytest.param(
            lambda: fn(torch.zeros(2, 4, 4), _LONG, 3),
            TypeError,
            "pred must hold integer class labels",
            id=f"{name}-pred-float",
        ),
        pytest.param(
            lambda: fn(_LONG, _LONG.bool(), 3),
            TypeError,
            "target must hold integer class labels",
            id=f"{name}-target-bool",
        ),
        pytest.param(
            lambda: fn(_LONG.numpy(), _LONG, 3),
            TypeError,
            "pred must be a torch.Tensor",
            id=f"{name}-pred-numpy",
        ),
        pytest.param(
            lambda: fn(_LONG, _LONG, 0),
            ValueError,
            "n_classes must be positive",
            id=f"{name}-n_classes",
        ),
        pytest.param(
            lambda: fn(_LONG, _LONG, 3, average="micro"),
            ValueError,
            "average must be None or 'macro'",
            id=f"{name}-average",
        ),
    ]


BAD_INPUT = [
    # UNet and its parameter count
    *[
        pytest.param(
            lambda kw=kw: UNet(**{**_UNET_ARGS, **kw}),
            error,
            match,
            id=f"UNet-{next(iter(kw))}={next(iter(kw.values()))}",
        )
        for kw, error, match in _BAD_UNET_ARGS
    ],
    *[
        pytest.param(
            lambda kw=kw: unet_parameter_count(**{**_UNET_ARGS, **kw}),
            error,
            match,
            id=f"count-{next(iter(kw))}={next(iter(kw.values()))}",
        )
        for kw, error, match in _BAD_UNET_ARGS
        if kw != dict(n_classes=1)
    ],
    pytest.param(
        lambda: UNet(1, 2, base_channels=2, depth=3)(torch.randn(1, 1, 12, 16)),
        ValueError,
        r"divisible by 2\*\*depth = 8, got shape \(1, 1, 12, 16\)",
        id="UNet-x-height",
    ),
    pytest.param(
        lambda: UNet(1, 2, base_channels=2, depth=3)(torch.randn(1, 1, 16, 20)),
        ValueError,
        r"divisible by 2\*\*depth = 8",
        id="UNet-x-width",
    ),
    pytest.param(
        lambda: UNet(3, 2, base_channels=2, depth=1)(torch.randn(1, 1, 4, 4)),
        ValueError,
        r"x must have 3 channels on axis 1, got shape \(1, 1, 4, 4\)",
        id="UNet-x-channels",
    ),
    pytest.param(
        lambda: UNet(3, 2, base_channels=2, depth=1)(torch.randn(3, 4, 4)),
        ValueError,
        r"x must have 4 dimensions, got shape",
        id="UNet-x-3d",
    ),
    pytest.param(
        lambda: UNet(3, 2, base_channels=2, depth=1)(torch.ones(1, 3, 4, 4).long()),
        TypeError,
        "x must be a floating-point tensor",
        id="UNet-x-long",
    ),
    pytest.param(
        lambda: UNet(3, 2, base_channels=2, depth=1)(np.zeros((1, 3, 4, 4), "f4")),
        TypeError,
        "x must be a torch.Tensor",
        id="UNet-x-numpy",
    ),
    # DoubleConv
    pytest.param(
        lambda: DoubleConv(2, 4)(torch.randn(1, 3, 5, 5)),
        ValueError,
        "x must have 2 channels on axis 1",
        id="DoubleConv-x-channels",
    ),
    pytest.param(
        lambda: DoubleConv(3, 0),
        ValueError,
        "out_channels must be positive",
        id="DoubleConv-out_channels",
    ),
    pytest.param(
        lambda: DoubleConv("3", 4),
        TypeError,
        "in_channels must be an int",
        id="DoubleConv-in_channels",
    ),
    # boundary_band
    pytest.param(
        lambda: boundary_band(torch.zeros(4, 4, dtype=torch.long)),
        ValueError,
        r"masks must have 3 dimensions, got shape",
        id="boundary_band-masks-2d",
    ),
    pytest.param(
        lambda: boundary_band(torch.zeros(1, 4, 4)),
        TypeError,
        "masks must hold integer class labels",
        id="boundary_band-masks-float",
    ),
    pytest.param(
        lambda: boundary_band(torch.zeros(1, 4, 4, dtype=torch.long), width=0),
        ValueError,
        "width must be positive, got 0",
        id="boundary_band-width",
    ),
    # metrics
    *_metric_rows(dice_score),
    *_metric_rows(iou_score),
    # dice_loss
    pytest.param(
        lambda: dice_loss(_LOGITS, torch.zeros(2, 3, 4, dtype=torch.long)),
        ValueError,
        r"target must have the shape of logits without the class axis 1, "
        r"got logits \(2, 3, 4, 4\) and target \(2, 3, 4\)",
        id="dice_loss-target-shape",
    ),
    pytest.param(
        lambda: dice_loss(torch.randn(3), torch.zeros(3, dtype=torch.long)),
        ValueError,
        "target must have the shape of logits",
        id="dice_loss-logits-1d",
    ),
    pytest.param(
        lambda: dice_loss(_LOGITS, torch.full((2, 4, 4), 3)),
        ValueError,
        r"target labels must lie in \[0, 2\]",
        id="dice_loss-target-range",
    ),
    pytest.param(
        lambda: dice_loss(_LOGITS.long(), _LONG),
        TypeError,
        "logits must be a floating-point tensor",
        id="dice_loss-logits-long",
    ),
    pytest.param(
        lambda: dice_loss(_LOGITS, _LONG.int()),
        TypeError,
        "target must have dtype torch.int64",
        id="dice_loss-target-int",
    ),
    pytest.param(
        lambda: dice_loss(_LOGITS, _LONG, smooth=0),
        ValueError,
        r"smooth must be in \(0, inf\)",
        id="dice_loss-smooth",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
