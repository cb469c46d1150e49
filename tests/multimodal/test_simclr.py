"""Tests for ``dlabc.multimodal.simclr``.

The data subset against the loader's own rows; the augmentations against closed forms
(identity, ``torch.flip``, a corner crop equal to ``F.interpolate`` of that corner, the
contrast jitter's mean and spread) and the blur against ``scipy.ndimage``; the encoder
against the same network recomputed with ``torch.nn.functional``; the linear probe
against scikit-learn's ``LogisticRegression``; NT-Xent against a plain double loop
over pairs, ``F.cross_entropy`` on the masked similarity matrix, a closed form and
finite differences; short training runs for their contract. Bad input for every public entry point.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlabc.data import load_fashion_mnist
from dlabc.multimodal.simclr import (
    Encoder,
    SimCLR,
    _gaussian_blur,
    _resized_crop,
    augment,
    fashion_subset,
    linear_probe,
    nt_xent,
    probe_encoder,
    train_simclr,
    train_supervised,
)

NO_JITTER = dict(
    scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, brightness=0.0, contrast=0.0, blur=0.0
)


# ------------------------------------------------------------------------- data


def test_fashion_subset_is_a_seeded_subset_of_the_loader():
    X, y = load_fashion_mnist("test")
    images, labels = fashion_subset("test", 50, seed=3)
    assert images.shape == (50, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (50,) and labels.dtype == torch.int64
    assert 0 <= images.min() and images.max() <= 1
    rows = {X[i].tobytes(): y[i] for i in range(len(X))}
    for image, label in zip(images[:, 0].numpy(), labels.numpy(), strict=True):
        assert rows[image.tobytes()] == label  # each image is a loader row, same label
    again, _ = fashion_subset("test", 50, seed=3)
    other, _ = fashion_subset("test", 50, seed=4)
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert len({im.numpy().tobytes() for im in images}) == 50  # no repeats


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(split="val", n=5), ValueError, "split must be"),
        (dict(split="test", n=0), ValueError, "n must be positive"),
        (dict(split="test", n=10_001), ValueError, "at most 10000"),
        (dict(split="test", n=5, seed=-1), ValueError, "seed must be"),
    ],
)
def test_fashion_subset_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        fashion_subset(**kwargs)


# ---------------------------------------------------------------- augmentations


def test_augment_without_randomness_is_the_identity_and_flip_is_torch_flip():
    x = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(augment(x, **NO_JITTER), x, atol=1e-5, rtol=0)
    flipped = augment(x, **{**NO_JITTER, "flip": 1.0})
    torch.testing.assert_close(flipped, torch.flip(x, dims=[-1]), atol=1e-5, rtol=0)


def test_resized_crop_of_a_corner_equals_interpolating_that_corner():
    x = torch.rand(2, 3, 28, 20, dtype=torch.float64)
    half = torch.full((2,), 0.5, dtype=torch.float64)
    corner = torch.full((2,), -0.5, dtype=torch.float64)  # the top-left quarter
    out = _resized_crop(x, half, half, corner, corner, torch.zeros(2, dtype=x.dtype))
    expected = F.interpolate(
        x[..., :14, :10], size=(28, 20), mode="bilinear", align_corners=False
    )
    # the last output row and column sit a quarter pixel outside the corner's last
    # pixel centre: the crop blends in its real neighbour, interpolate repeats the edge
    torch.testing.assert_close(out[..., :-1, :-1], expected[..., :-1, :-1])
    mirrored = _resized_crop(
        x, half, half, corner, corner, torch.ones(2, dtype=x.dtype)
    )
    torch.testing.assert_close(mirrored, torch.flip(out, dims=[-1]))


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(3, 2, 12, 9, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.8, 1.5], dtype=torch.float64)
    out = _gaussian_blur(x, sigma, radius=2)
    for i, s in enumerate(sigma.tolist()):
        expected = ndimage.gaussian_filter(
            x[i].numpy(), sigma=(0, s, s), mode="mirror", truncate=2 / s
        )
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-12)


def test_contrast_jitter_keeps_the_mean_and_scales_the_spread():
    x = 0.4 + 0.2 * torch.rand(64, 1, 8, 8, dtype=torch.float64)  # never clipped
    g = torch.Generator().manual_seed(0)
    out = augment(x, g, **{**NO_JITTER, "contrast": 0.4})
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)))
    c = out.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))  # each image's contrast factor
    assert 0.6 <= c.min() and c.max() <= 1.4 and c.std() > 0.1  # U[0.6, 1.4], varied


def test_augment_is_random_per_image_reproducible_and_in_range():
    x = torch.rand(1, 1, 28, 28).repeat(8, 1, 1, 1)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)  # the generator decides every random choice
    assert not torch.allclose(a[0], a[1])  # two images, two different views
    assert 0 <= a.min() and a.max() <= 1


@pytest.mark.parametrize(
    "images, kwargs, error, match",
    [
        (torch.rand(2, 28, 28), {}, ValueError, "images must have 4 dimensions"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.long), {}, TypeError, "floating"),
        (torch.rand(2, 1, 4, 4), dict(scale=(0.0, 1.0)), ValueError, "scale"),
        (torch.rand(2, 1, 4, 4), dict(scale=(0.9, 0.5)), ValueError, "low, high"),
        (torch.rand(2, 1, 4, 4), dict(flip=1.5), ValueError, "flip must be in"),
        (torch.rand(2, 1, 4, 4), dict(sigma=(0.0, 1.0)), ValueError, "sigma"),
    ],
)
def test_augment_rejects_bad_input(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        augment(images, **kwargs)


# ---------------------------------------------------------------------- encoder


def test_encoder_equals_the_same_network_in_functional_form():
    torch.manual_seed(0)
    encoder = Encoder(d_features=10, width=4).double()
    for module in encoder.modules():  # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    encoder.eval()
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    h = x
    convs = [m for m in encoder.convs if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in encoder.convs if isinstance(m, torch.nn.BatchNorm2d)]
    for conv, norm in zip(convs, norms, strict=True):
        h = F.conv2d(h, conv.weight, stride=2, padding=1)
        h = (h - norm.running_mean[:, None, None]) / torch.sqrt(
            norm.running_var[:, None, None] + norm.eps
        ) * norm.weight[:, None, None] + norm.bias[:, None, None]
        h = h.clamp(min=0)
    assert h.shape == (5, 16, 4, 4)  # 28 -> 14 -> 7 -> 4
    expected = h.mean(dim=(2, 3)) @ encoder.fc.weight.T + encoder.fc.bias
    torch.testing.assert_close(encoder(x), expected)
    assert encoder(x).shape == (5, 10)


def test_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="d_features must be positive"):
        Encoder(d_features=0)
    with pytest.raises(TypeError, match="width must be an int"):
        Encoder(width=2.5)


# ----------------------------------------------------------------- linear probe


def test_linear_probe_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (400,), generator=g)
    X = centres[y] + 1.5 * torch.randn(400, 6, generator=g, dtype=torch.float64)
    X = X * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 0.5], dtype=torch.float64) + 7
    train, test = slice(0, 300), slice(300, 400)
    decay = 1e-2
    accuracy, W, b = linear_probe(
        X[train], y[train], X[test], y[test], weight_decay=decay, return_model=True
    )
    mean, std = X[train].mean(0), X[train].std(0, unbiased=False)
    reference = linear_model.LogisticRegression(
        C=1 / (decay * 300), tol=1e-10, max_iter=1000
    )
    reference.fit(((X[train] - mean) / std).numpy(), y[train].numpy())
    np.testing.assert_allclose(W.T.numpy(), reference.coef_, atol=1e-5)
    reference_accuracy = reference.score(
        ((X[test] - mean) / std).numpy(), y[test].numpy()
    )
    assert abs(accuracy - reference_accuracy) < 1e-9
    assert 0.5 < accuracy <= 1  # far above chance (0.25): the classes are separable


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (
            (torch.rand(5, 3), torch.zeros(4, dtype=torch.long)),
            {},
            ValueError,
            "same length",
        ),
        (
            (torch.rand(5, 3), torch.zeros(5)),
            {},
            TypeError,
            "train_labels must have dtype",
        ),
        (
            (torch.rand(5), torch.zeros(5, dtype=torch.long)),
            {},
            ValueError,
            "2 dimensions",
        ),
        (
            (torch.rand(5, 4), torch.zeros(5, dtype=torch.long)),
            {},
            ValueError,
            "columns",
        ),
        (
            (torch.rand(5, 3), torch.zeros(5, dtype=torch.long)),
            dict(steps=0),
            ValueError,
            "steps",
        ),
    ],
)
def test_linear_probe_rejects_bad_input(args, kwargs, error, match):
    test = (torch.rand(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(error, match=match):
        linear_probe(*args, *test, **kwargs)


# ---------------------------------------------------------------------- NT-Xent


def nt_xent_per_pair(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent written plainly: for every view i, -log softmax of its positive."""
    z = torch.cat([z1, z2])
    n = len(z)
    total = 0.0
    for i in range(n):
        positive = (i + n // 2) % n
        sims = [
            torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm()) / tau for k in range(n)
        ]
        denominator = sum(torch.exp(sims[k]) for k in range(n) if k != i)
        total = total - torch.log(torch.exp(sims[positive]) / denominator)
    return total / n


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_nt_xent_equals_the_per_pair_formula_and_cross_entropy(tau):
    g = torch.Generator().manual_seed(1)
    z1, z2 = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    loss = nt_xent(z1, z2, tau)
    torch.testing.assert_close(loss, nt_xent_per_pair(z1, z2, tau))
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / tau).masked_fill(torch.eye(10, dtype=torch.bool), -torch.inf)
    target = torch.cat([torch.arange(5, 10), torch.arange(5)])
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


def test_nt_xent_closed_forms():
    # identical views, all images orthogonal: each positive has s = 1, others s = 0
    z = torch.eye(4, dtype=torch.float64)
    tau = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 6))  # 2N - 2 = 6 negatives
    torch.testing.assert_close(nt_xent(z, z, tau), torch.tensor(expected).double())
    # gradients match finite differences
    z1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3), (z1, z2))


@pytest.mark.parametrize(
    "z1, z2, tau, error, match",
    [
        (torch.rand(4, 3), torch.rand(4, 2), 0.5, ValueError, "same shape"),
        (torch.rand(1, 3), torch.rand(1, 3), 0.5, ValueError, "N >= 2"),
        (torch.rand(4), torch.rand(4), 0.5, ValueError, "2 dimensions"),
        (torch.rand(4, 3), torch.rand(4, 3), 0.0, ValueError, "temperature"),
        (torch.ones(4, 3, dtype=torch.long), torch.rand(4, 3), 0.5, TypeError, "float"),
    ],
)
def test_nt_xent_rejects_bad_input(z1, z2, tau, error, match):
    with pytest.raises(error, match=match):
        nt_xent(z1, z2, tau)


# ---------------------------------------------------------------------- training


def test_simclr_training_lowers_the_loss_and_probe_reads_the_encoder():
    torch.manual_seed(0)
    images = torch.rand(32, 1, 28, 28)
    encoder = Encoder(d_features=8, width=4)
    history = train_simclr(encoder, images, steps=12, batch_size=16, lr=1e-2)
    assert len(history.step_loss) == 12 and not encoder.training
    # NT-Xent of 2N = 32 views starts near log(2N - 1), the loss of a uniform guess
    assert abs(history.step_loss[0] - math.log(31)) < 0.5
    assert np.mean(history.step_loss[-4:]) < np.mean(history.step_loss[:4])
    labels = torch.arange(32) % 2
    supervised = Encoder(d_features=8, width=4)
    history = train_supervised(supervised, images, labels, steps=3, batch_size=16)
    assert len(history.step_loss) == 3
    with torch.no_grad():
        h = encoder(images)
    accuracy = probe_encoder(encoder, (images, labels), (images, labels))
    assert accuracy == linear_probe(h, labels, h, labels)


def test_simclr_model_and_training_reject_bad_input():
    with pytest.raises(TypeError, match="d_features attribute"):
        SimCLR(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="encoder must be an Encoder"):
        train_simclr(torch.nn.Linear(3, 3), torch.rand(4, 1, 28, 28), steps=1)
    with pytest.raises(ValueError, match="batch_size must be at most"):
        train_simclr(Encoder(), torch.rand(4, 1, 28, 28), steps=1, batch_size=8)
    with pytest.raises(ValueError, match="at least 2"):
        train_simclr(Encoder(), torch.rand(4, 1, 28, 28), steps=1, batch_size=1)
    with pytest.raises(ValueError, match="one entry per image"):
        train_supervised(
            Encoder(),
            torch.rand(4, 1, 28, 28),
            torch.zeros(3, dtype=torch.long),
            steps=1,
            batch_size=2,
        )
    with pytest.raises(TypeError, match="encoder must be an nn.Module"):
        probe_encoder("f", (None, None), (None, None))
