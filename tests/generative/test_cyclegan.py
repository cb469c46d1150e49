"""Tests for ``dlabc.generative.cyclegan``.

The thickening against SciPy's grey-scale dilation; the instance normalization against
``nn.InstanceNorm2d``; the least-squares losses against ``F.mse_loss``; the cycle and
identity terms against ``F.l1_loss`` on the same networks; the PatchGAN's receptive
field against the support of an autograd gradient (brute force); the training loop and
the comparison entry point on a few steps only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from scipy import ndimage
from torch import nn

from dlabc.generative.cyclegan import (
    CycleGAN,
    Generator,
    PatchDiscriminator,
    ResidualBlock,
    instance_norm,
    lsgan_d_loss,
    lsgan_g_loss,
    receptive_field,
    thicken,
    train_cyclegan,
    translate,
    translate_digits,
    unpaired_domains,
)


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CycleGAN(channels=4, n_res=1)


def test_thicken_is_scipys_grey_dilation(images):
    sparse = images * (images > 0.8)  # thin strokes on a black background
    expected = ndimage.grey_dilation(
        sparse.numpy(), size=(1, 1, 3, 3), mode="constant", cval=0.0
    )
    torch.testing.assert_close(thicken(sparse), torch.from_numpy(expected))


def test_thicken_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\)"):
        thicken(torch.rand(2, 28, 28, 1))
    with pytest.raises(TypeError, match="floating-point"):
        thicken(torch.zeros(2, 1, 28, 28, dtype=torch.long))


def test_unpaired_domains_are_disjoint_halves(images):
    A, B, order = unpaired_domains(images, seed=3)
    assert sorted(order.tolist()) == list(range(6))
    torch.testing.assert_close(A, images[order[:3]])
    torch.testing.assert_close(B, thicken(images[order[3:]]))
    with pytest.raises(ValueError, match="at least 2"):
        unpaired_domains(images[:1])


def test_instance_norm_is_torchs(images):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 7)
    ours, torchs = instance_norm(5), nn.InstanceNorm2d(5, affine=True)
    for p in ours.weight, ours.bias:  # a learned scale and shift, not 1 and 0
        nn.init.normal_(p)
    torchs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), torchs(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="channels must be positive"):
        instance_norm(0)


def test_networks_keep_the_shapes_and_range(images):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 14, 14)
    assert ResidualBlock(4)(x).shape == x.shape
    out = Generator(4, 1)(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert PatchDiscriminator(4)(images).shape == (6, 1, 7, 7)
    for make in (ResidualBlock, Generator, PatchDiscriminator):
        with pytest.raises(ValueError, match="channels must be positive"):
            make(0)
    with pytest.raises(TypeError, match="n_res must be an int"):
        Generator(4, 1.5)


def test_receptive_field_is_the_gradients_support():
    torch.manual_seed(0)
    D = PatchDiscriminator(4)
    assert receptive_field(D) == 18
    D[3] = nn.Identity()  # the normalization mixes all pixels: leave it out here
    x = torch.rand(1, 1, 64, 64, requires_grad=True)
    D(x)[0, 0, 8, 8].backward()  # an output far from the borders
    rows, cols = x.grad[0, 0].abs().gt(0).nonzero().unbind(1)
    assert rows.max() - rows.min() + 1 == 18 and cols.max() - cols.min() + 1 == 18
    with pytest.raises(TypeError, match="nn.Sequential"):
        receptive_field(nn.Linear(2, 2))


@pytest.mark.parametrize("layers", [((3, 1), (5, 2), (3, 3)), ((7, 2), (2, 2))])
def test_receptive_field_of_other_stacks(layers):
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Conv2d(1, 1, k, stride=s) for k, s in layers])
    x = torch.rand(1, 1, 48, 48, requires_grad=True)
    stack(x)[0, 0, 0, 0].backward()  # the first output: no padding, no border
    rows, cols = x.grad[0, 0].ne(0).nonzero().unbind(1)
    assert rows.max() + 1 == receptive_field(stack) == cols.max() + 1


def test_least_squares_losses_are_mse():
    real, fake = torch.randn(4, 1, 7, 7), torch.randn(4, 1, 7, 7)
    expected = 0.5 * (
        nnf.mse_loss(real, torch.ones_like(real))
        + nnf.mse_loss(fake, torch.zeros_like(fake))
    )
    torch.testing.assert_close(lsgan_d_loss(real, fake), expected)
    torch.testing.assert_close(
        lsgan_g_loss(fake), nnf.mse_loss(fake, torch.ones_like(fake))
    )
    with pytest.raises(TypeError, match="unsupported operand"):
        lsgan_g_loss([0.5])


def test_generator_loss_is_the_papers_objective(model, images):
    a, b = images[:3], thicken(images[3:])
    total, terms = model.generator_loss(a, b)
    G, F = model.G, model.F
    cycle = nnf.l1_loss(F(G(a)), a) + nnf.l1_loss(G(F(b)), b)
    identity = nnf.l1_loss(G(b), b) + nnf.l1_loss(F(a), a)
    adversarial = nnf.mse_loss(model.D_B(G(a)), torch.ones(3, 1, 7, 7)) + nnf.mse_loss(
        model.D_A(F(b)), torch.ones(3, 1, 7, 7)
    )
    torch.testing.assert_close(terms["cycle"], cycle)
    torch.testing.assert_close(terms["identity"], identity)
    torch.testing.assert_close(terms["adversarial"], adversarial)
    torch.testing.assert_close(total, adversarial + 10 * cycle + 5 * identity)
    with pytest.raises(RuntimeError, match="channels"):
        model.generator_loss(torch.rand(2, 3, 28, 28), b)


def test_discriminator_loss_trains_only_the_discriminators(model, images):
    a, b = images[:3], thicken(images[3:])
    model.zero_grad()
    _, terms = model.generator_loss(a, b)
    loss = model.discriminator_loss(a, b, terms["fake_a"], terms["fake_b"])
    loss.backward()
    assert all(p.grad is None for p in model.G.parameters())
    assert all(p.grad is not None for p in model.D_A.parameters())
    expected = lsgan_d_loss(model.D_A(a), model.D_A(terms["fake_a"])) + lsgan_d_loss(
        model.D_B(b), model.D_B(terms["fake_b"])
    )
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="lambda_cyc must be in"):
        CycleGAN(lambda_cyc=-1.0)


def test_train_cyclegan_runs_and_changes_the_weights(images):
    torch.manual_seed(0)
    model = CycleGAN(channels=4, n_res=1)
    before = model.G[0].weight.detach().clone()
    history = train_cyclegan(model, images[:3], thicken(images[3:]), 2, batch_size=4)
    assert len(history.cycle) == len(history.discriminator) == 2
    assert all(torch.isfinite(torch.tensor(history.adversarial)))
    assert not torch.equal(before, model.G[0].weight)
    assert not model.training
    with pytest.raises(TypeError, match="model must be a CycleGAN"):
        train_cyclegan(nn.Linear(2, 2), images, images, 1)
    with pytest.raises(ValueError, match="steps must be positive"):
        train_cyclegan(model, images, images, 0)
    with pytest.raises(ValueError, match="lr must be in"):
        train_cyclegan(model, images, images, 1, lr=0.0)
    with pytest.raises(ValueError, match="B must have shape"):
        train_cyclegan(model, images, images[:, :, :14], 1)


def test_translate_is_the_generator_in_batches(model, images):
    with torch.no_grad():
        model.eval()
        expected = model.F(images)
    torch.testing.assert_close(translate(model.F, images, batch_size=4), expected)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        translate(model.F, images, batch_size=0)


def test_translate_digits_returns_translations_and_labels():
    from dlabc.generative.yardstick import digits

    translated, labels = translate_digits(1, n=8, channels=4, n_res=1, batch_size=8)
    assert translated.shape == (8, 1, 28, 28) and translated.dtype == torch.float32
    assert translated.min() >= 0 and translated.max() <= 1
    torch.testing.assert_close(labels, digits("test")[1][:8])
    with pytest.raises(ValueError, match="at most 1000"):
        translate_digits(1, n=1001)
    with pytest.raises(TypeError, match="unknown options"):
        translate_digits(1, n=8, width=3)
