"""Tests for ``dlabc.generative.gan``.

The losses against PyTorch's binary cross-entropy and against the formulas written with
``log`` and ``sigmoid``; their gradients against the closed forms of the saturation
argument; the optimal discriminator against a brute-force maximisation of the value's
integrand; the mode counter against a loop; the networks' shapes; one training round
against the same round written out by hand; and ``generate_digits``' contract.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlabc.generative import gan


@pytest.fixture(scope="module")
def logits():
    torch.manual_seed(0)
    return torch.randn(50, dtype=torch.float64) * 3, torch.randn(
        40, dtype=torch.float64
    ) * 3


def test_discriminator_loss_is_binary_cross_entropy(logits):
    real, fake = logits
    expected = F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    assert torch.allclose(gan.discriminator_loss(real, fake), expected, atol=1e-12)


def test_generator_losses_against_their_formulas(logits):
    _, fake = logits
    D = torch.sigmoid(fake)
    minimax = gan.generator_loss(fake, "minimax")
    assert torch.allclose(minimax, torch.log(1 - D).mean(), atol=1e-12)
    ns = gan.generator_loss(fake, "non_saturating")
    assert torch.allclose(ns, -torch.log(D).mean(), atol=1e-12)
    expected = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    assert torch.allclose(ns, expected, atol=1e-12)


def test_the_gradients_of_the_saturation_argument(logits):
    _, fake = logits
    fake = fake.clone().requires_grad_()
    D = torch.sigmoid(fake.detach())
    (g_minimax,) = torch.autograd.grad(gan.generator_loss(fake, "minimax"), fake)
    (g_ns,) = torch.autograd.grad(gan.generator_loss(fake), fake)
    n = len(fake)
    assert torch.allclose(g_minimax, -D / n, atol=1e-12)
    assert torch.allclose(g_ns, -(1 - D) / n, atol=1e-12)


def test_softplus_losses_stay_finite_where_log_sigmoid_overflows():
    fake = torch.tensor([-200.0, 200.0])
    assert torch.isfinite(gan.generator_loss(fake)).all()
    assert torch.isfinite(gan.discriminator_loss(fake, fake))


def test_optimal_discriminator_maximises_the_integrand():
    torch.manual_seed(1)
    a, b = torch.rand(20, dtype=torch.float64), torch.rand(20, dtype=torch.float64)
    y = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    values = a[:, None] * torch.log(y) + b[:, None] * torch.log(1 - y)  # (20, Y)
    best = y[values.argmax(1)]
    assert torch.allclose(gan.optimal_discriminator(a, b), best, atol=1e-4)
    zero = torch.zeros(3)
    assert torch.equal(gan.optimal_discriminator(zero, zero), torch.full((3,), 0.5))


def test_networks_shapes_and_ranges():
    torch.manual_seed(0)
    z = torch.randn(3, 8)
    for G in (gan.DCGANGenerator(8, c=4), gan.MLPGenerator(8, 16)):
        x = G(z)
        assert x.shape == (3, 1, 28, 28) and x.abs().max() <= 1
    for D in (
        gan.DCGANDiscriminator(c=4),
        gan.DCGANDiscriminator(c=4, batch_norm=False),
        gan.MLPDiscriminator(hidden=16),
    ):
        assert D(x).shape == (3,)
    points = gan.MLPGenerator(2, 8, shape=(2,), tanh=False)(torch.randn(5, 2))
    assert points.shape == (5, 2)
    assert gan.MLPDiscriminator(shape=(2,), hidden=8)(points).shape == (5,)
    no_norm = gan.DCGANDiscriminator(c=4, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in no_norm.modules())


def test_pixels_round_trip():
    images = torch.rand(2, 1, 28, 28)
    assert torch.allclose(gan.to_pixels(gan.from_pixels(images)), images, atol=1e-6)
    assert gan.from_pixels(images).min() >= -1


def test_gan_step_is_the_two_updates_written_out():
    torch.manual_seed(0)
    G = gan.MLPGenerator(4, 8, shape=(2,), tanh=False).double()
    D = gan.MLPDiscriminator(shape=(2,), hidden=8).double()
    G_ref = gan.MLPGenerator(4, 8, shape=(2,), tanh=False).double()
    D_ref = gan.MLPDiscriminator(shape=(2,), hidden=8).double()
    G_ref.load_state_dict(G.state_dict())
    D_ref.load_state_dict(D.state_dict())
    real = torch.randn(6, 2, dtype=torch.float64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (G, D)]
    torch.manual_seed(5)
    loss_D, loss_G = gan.gan_step(G, D, *opts, real)
    # by hand: SGD on the BCE of D, then on -log D(G(z)) with the updated D
    torch.manual_seed(5)
    z = torch.randn(6, 4, dtype=torch.float64)
    fake = G_ref(z)
    ref_D = F.binary_cross_entropy_with_logits(
        D_ref(real), torch.ones(6, dtype=torch.float64)
    ) + F.binary_cross_entropy_with_logits(
        D_ref(fake.detach()), torch.zeros(6, dtype=torch.float64)
    )
    grads = torch.autograd.grad(ref_D, list(D_ref.parameters()))
    with torch.no_grad():
        for p, g in zip(D_ref.parameters(), grads, strict=True):
            p -= 0.1 * g
    ref_G = -torch.log(torch.sigmoid(D_ref(fake))).mean()
    grads = torch.autograd.grad(ref_G, list(G_ref.parameters()))
    with torch.no_grad():
        for p, g in zip(G_ref.parameters(), grads, strict=True):
            p -= 0.1 * g
    assert math.isclose(float(loss_D), float(ref_D.detach()), rel_tol=1e-10)
    assert math.isclose(float(loss_G), float(ref_G.detach()), rel_tol=1e-10)
    for a, b in zip(
        list(G.parameters()) + list(D.parameters()),
        list(G_ref.parameters()) + list(D_ref.parameters()),
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-12)


def test_train_gan_runs_and_calls_back():
    torch.manual_seed(0)
    G = gan.MLPGenerator(2, 8, shape=(2,), tanh=False)
    D = gan.MLPDiscriminator(shape=(2,), hidden=8)
    seen = []
    history = gan.train_gan(
        G,
        D,
        lambda b: gan.sample_ring(b),
        5,
        batch_size=8,
        every=2,
        lr_D=1e-4,
        callback=seen.append,
    )
    assert seen == [2, 4, 5]
    assert len(history["D"]) == len(history["G"]) == 5


def test_ring_centres_and_samples():
    centres = gan.ring_centres(8, 2.0)
    assert torch.allclose(centres.norm(dim=1), torch.full((8,), 2.0), atol=1e-6)
    gaps = (centres - centres.roll(1, 0)).norm(dim=1)
    assert torch.allclose(gaps, torch.full((8,), 4 * math.sin(math.pi / 8)), atol=1e-5)
    x = gan.sample_ring(4000, 8, 2.0, 0.05, torch.Generator().manual_seed(0))
    distance, nearest = torch.cdist(x, centres).min(1)
    assert distance.max() < 0.05 * 6
    assert torch.bincount(nearest, minlength=8).min() > 400


def test_mode_coverage_against_a_loop():
    torch.manual_seed(0)
    centres = gan.ring_centres(8, 2.0)
    samples = torch.cat([centres[:3].repeat_interleave(40, 0), torch.randn(30, 2)])
    samples = samples + 0.02 * torch.randn_like(samples)
    covered, quality = gan.mode_coverage(samples, centres, 0.05)
    counts, good = [0] * 8, 0
    for s in samples:
        d = [float((s - c).norm()) for c in centres]
        k = min(range(8), key=d.__getitem__)
        if d[k] <= 0.15:
            counts[k] += 1
            good += 1
    assert covered == sum(c >= 0.25 * len(samples) / 8 for c in counts) == 3
    assert math.isclose(quality, good / len(samples), rel_tol=1e-6)


def test_generate_digits_contract():
    for model in ("dcgan", "mlp"):
        x = gan.generate_digits(2, n=5, seed=3, model=model)
        assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(
        gan.generate_digits(1, 3, seed=1), gan.generate_digits(1, 3, seed=1)
    )


def test_bad_inputs():
    x = torch.zeros(3)
    with pytest.raises(TypeError, match="real_logits"):
        gan.discriminator_loss([1.0], x)
    with pytest.raises(ValueError, match="kind"):
        gan.generator_loss(x, "wasserstein")
    with pytest.raises(ValueError, match="same shape"):
        gan.optimal_discriminator(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        gan.MLPGenerator(shape=(0,))
    with pytest.raises(ValueError, match="shape"):
        gan.MLPDiscriminator(shape=())
    with pytest.raises(ValueError, match="c must be positive"):
        gan.DCGANGenerator(c=0)
    with pytest.raises(TypeError, match="c must be an int"):
        gan.DCGANDiscriminator(c=1.5)
    G, D = gan.make_digit_gan("mlp")
    with pytest.raises(ValueError, match="loss"):
        gan.train_gan(G, D, lambda b: None, 1, loss="hinge")
    with pytest.raises(ValueError, match="lr_D"):
        gan.train_gan(G, D, lambda b: None, 1, lr_D=-1.0)
    with pytest.raises(TypeError, match="sample_real"):
        gan.train_gan(G, D, None, 1)
    with pytest.raises(TypeError, match="z_dim"):
        gan.train_gan(D, D, lambda b: None, 1)
    with pytest.raises(ValueError, match="radius"):
        gan.ring_centres(8, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        gan.sample_ring(10, sigma=-1.0)
    with pytest.raises(ValueError, match="same dimension"):
        gan.mode_coverage(torch.zeros(4, 3), torch.zeros(8, 2), 0.1)
    with pytest.raises(ValueError, match="model"):
        gan.make_digit_gan("vae")
    with pytest.raises(ValueError, match="model"):
        gan.generate_digits(1, model="vae")
    with pytest.raises(ValueError, match="seed"):
        gan.generate_digits(1, seed=-1)
    with pytest.raises(ValueError, match="steps"):
        gan.generate_digits(0)
