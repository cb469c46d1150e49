"""Tests for ``dlabc.generative.pixelcnn``.

The masks against their definition written as loops; the masked convolution against
``F.conv2d`` with the masked weight; causality of every model as a Jacobian
(``torch.autograd.functional.jacobian``) that is exactly strictly lower-triangular in
raster order; the gate against its formula; the receptive fields against the brute-force
reach of the masks' offsets; the likelihood against ``torch.distributions.Bernoulli``
and, by enumerating every 2x2 binary image, against the fact that the probabilities sum
to one; the baseline against ``scipy.stats.bernoulli``; the cached sampler against a
full forward pass and, on 2x2 images, its frequencies against the exact probabilities.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import bernoulli
from torch.autograd.functional import jacobian

from dlabc.generative.pixelcnn import (
    GatedLayer,
    GatedPixelCNN,
    MaskedConv2d,
    PixelCNN,
    causal_mask,
    gate,
    generate_digits,
    independent_bits_per_dim,
    nll_bits_per_dim,
    receptive_field,
    sample,
    train_pixelcnn,
)


def _pixel_jacobian(net, x, y=None):
    D = x[0].numel()
    return jacobian(
        lambda z: (net(z) if y is None else net(z, y))[0, 0].flatten(), x
    ).reshape(D, D)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_causal_mask_matches_its_definition(kernel, mask_type):
    c = kernel // 2
    expected = torch.zeros(kernel, kernel)
    for a in range(kernel):
        for b in range(kernel):
            left = b < c if mask_type == "A" else b <= c
            expected[a, b] = float(a < c or (a == c and left))
    assert torch.equal(causal_mask(kernel, mask_type), expected)


def test_masked_conv_is_conv2d_with_the_masked_weight():
    torch.manual_seed(0)
    conv = MaskedConv2d(3, 4, 5, "B").double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    reference = F.conv2d(x, conv.weight * causal_mask(5, "B").double(), conv.bias, 1, 2)
    torch.testing.assert_close(conv(x), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_a_masked_conv_sees_only_earlier_pixels(mask_type):
    torch.manual_seed(1)
    x = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    J = _pixel_jacobian(MaskedConv2d(1, 1, 3, mask_type).double(), x)
    offset = 0 if mask_type == "A" else 1
    assert J.triu(offset).abs().max() == 0
    if mask_type == "B":  # the centre is read
        assert (J.diagonal() != 0).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: PixelCNN(channels=4, layers=3),
        lambda: GatedPixelCNN(channels=4, layers=3),
        lambda: GatedPixelCNN(channels=4, layers=2, kernel=5),
        lambda: GatedPixelCNN(channels=4, layers=2, num_classes=3),
    ],
)
def test_every_model_is_causal(make):
    torch.manual_seed(2)
    net = make().double()
    x = torch.rand(1, 1, 5, 6, dtype=torch.float64)
    y = torch.tensor([2]) if getattr(net, "num_classes", 0) else None
    J = _pixel_jacobian(net, x, y)
    assert J.triu().abs().max() == 0  # no output sees its own or a later pixel
    assert (J.tril(-1) != 0).sum() > 0


def test_gate_is_tanh_times_sigmoid():
    a = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(gate(a), torch.tanh(a[:, :3]) * torch.sigmoid(a[:, 3:]))


def _reach(layers, size, center):
    steps = {"A": [(-1, -1), (-1, 0), (-1, 1), (0, -1)]}
    steps["B"] = steps["A"] + [(0, 0)]
    reach = set(steps["A"])
    for _ in range(layers - 1):
        reach = {(a + da, b + db) for a, b in reach for da, db in steps["B"]}
    field = torch.zeros(size, size, dtype=torch.bool)
    for a, b in reach:
        r, c = center[0] + a, center[1] + b
        if 0 <= r < size and 0 <= c < size:
            field[r, c] = True
    return field


def test_receptive_fields_blind_spot_and_its_removal():
    torch.manual_seed(3)
    size, center = 9, (4, 4)
    plain = receptive_field(PixelCNN(6, 4).double(), size, center)
    assert torch.equal(plain != 0, _reach(4, size, center))
    gated = receptive_field(GatedPixelCNN(4, 4).double(), size, center)
    before = torch.zeros(size * size, dtype=torch.bool)
    before[: center[0] * size + center[1]] = True
    assert torch.equal(gated.flatten() != 0, before)  # every earlier pixel, no other
    assert (plain.flatten() != 0).sum() < before.sum()  # the blind spot


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(4)
    return GatedPixelCNN(channels=4, layers=2).double().eval()


def test_nll_matches_bernoulli_log_prob(tiny):
    x = (torch.rand(3, 1, 4, 5) < 0.4).double()
    log_p = torch.distributions.Bernoulli(logits=tiny(x)).log_prob(x).sum()
    expected = -log_p.item() / (3 * 20 * math.log(2))
    assert nll_bits_per_dim(tiny, x) == pytest.approx(expected, rel=1e-10)


def test_the_likelihood_sums_to_one_over_every_image(tiny):
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))
    images = images.double().reshape(16, 1, 2, 2)
    log_p = torch.distributions.Bernoulli(logits=tiny(images)).log_prob(images)
    total = log_p.sum((1, 2, 3)).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12)
    bits = [nll_bits_per_dim(tiny, images[k : k + 1]) for k in range(16)]
    assert sum(2 ** (-4 * b) for b in bits) == pytest.approx(1.0, abs=1e-12)


def test_independent_baseline_against_scipy():
    train = (torch.rand(50, 1, 3, 3) < 0.3).float()
    test = (torch.rand(20, 1, 3, 3) < 0.3).float()
    p = ((train.sum(0) + 1) / 52).flatten().numpy()
    logpmf = bernoulli.logpmf(test.reshape(20, 9).numpy(), p).sum() / 20
    expected = -logpmf / (9 * math.log(2))
    assert independent_bits_per_dim(train, test) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kernel,classes", [(3, 0), (5, 0), (3, 4)])
def test_the_cached_sampler_draws_from_the_forward_pass(kernel, classes):
    torch.manual_seed(5)
    net = GatedPixelCNN(4, 3, kernel=kernel, num_classes=classes).double()
    y = torch.tensor([0, 3, 1]) if classes else None
    x, logits = sample(net, 3, (5, 6), labels=y, seed=1)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    full = net(x) if y is None else net(x, y)
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-12)


def test_sample_frequencies_match_the_exact_probabilities(tiny):
    x, _ = sample(tiny, 4000, (2, 2), seed=2)
    codes = (x.flatten(1) * torch.tensor([8.0, 4, 2, 1]).double()).sum(1).long()
    freq = torch.bincount(codes, minlength=16).double() / 4000
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))
    images = images.double().reshape(16, 1, 2, 2)
    with torch.no_grad():
        log_p = torch.distributions.Bernoulli(logits=tiny(images)).log_prob(images)
    p = log_p.sum((1, 2, 3)).exp()
    assert (freq - p).abs().max() < 4 * (0.25 / 4000) ** 0.5  # four standard errors


def test_training_lowers_the_loss():
    torch.manual_seed(6)
    first_rows = (torch.rand(32, 1, 1, 6) < 0.5).float()
    images = first_rows.expand(32, 1, 6, 6).contiguous()  # every row repeats the first
    model, history = train_pixelcnn(images, 8, batch_size=16, channels=4, layers=2)
    assert not model.training and len(history.step_loss) == 8
    assert sum(history.step_loss[-2:]) < sum(history.step_loss[:2])
    labels = torch.arange(32) % 10
    model, _ = train_pixelcnn(images, 1, labels=labels, channels=4, layers=1)
    assert model.num_classes == 10


def test_generate_digits_contract():
    samples, model = generate_digits(
        1, n=2, seed=0, return_model=True, channels=2, layers=1
    )
    assert samples.shape == (2, 1, 28, 28) and samples.dtype == torch.float32
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(model, GatedPixelCNN)


def test_bad_inputs_are_refused(tiny):
    with pytest.raises(ValueError, match="kernel must be odd"):
        causal_mask(4, "A")
    with pytest.raises(ValueError, match="mask_type must be"):
        causal_mask(3, "C")
    with pytest.raises(ValueError, match="in_channels must be positive"):
        MaskedConv2d(0, 2, 3, "A")
    with pytest.raises(ValueError, match="kernel must be odd"):
        GatedLayer(4, 4, kernel=2)
    with pytest.raises(ValueError, match="in_channels == channels"):
        GatedLayer(3, 4)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        GatedLayer(1, 4, first=True, num_classes=-1)
    with pytest.raises(ValueError, match="layers must be positive"):
        GatedPixelCNN(layers=0)
    with pytest.raises(ValueError, match="layers must be positive"):
        PixelCNN(layers=0)
    with pytest.raises(ValueError, match="pixel must be"):
        receptive_field(tiny, 5, (5, 0))
    with pytest.raises(TypeError, match="model must be a PixelCNN"):
        receptive_field(torch.nn.Linear(2, 2), 5, (1, 1))
    with pytest.raises(ValueError, match="must be binary"):
        nll_bits_per_dim(tiny, torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(N, 1, H, W\)"):
        nll_bits_per_dim(tiny, torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="without classes"):
        nll_bits_per_dim(tiny, torch.zeros(1, 1, 2, 2), labels=torch.tensor([0]))
    conditional = GatedPixelCNN(2, 1, num_classes=3)
    with pytest.raises(ValueError, match="needs labels"):
        sample(conditional, 2, (2, 2))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        sample(conditional, 1, (2, 2), labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="differ in shape"):
        independent_bits_per_dim(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="steps must be positive"):
        train_pixelcnn(torch.zeros(4, 1, 3, 3), 0)
    with pytest.raises(TypeError, match="must be a GatedPixelCNN"):
        sample(PixelCNN(2, 1), 2)
    with pytest.raises(ValueError, match="n must be positive"):
        sample(tiny, 0)
    with pytest.raises(TypeError, match="unknown options"):
        generate_digits(1, n=1, width=3)
