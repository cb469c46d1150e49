"""Tests for ``dlabc.efficiency.distillation``.

The soft term against ``F.kl_div(..., reduction="batchmean", log_target=True)`` times
T²; the full loss against ``F.kl_div`` plus ``F.cross_entropy``; the closed-form
gradient against autograd and finite differences; the high-temperature limit against
the logit squared error; the student against an ``nn.Linear`` stack; the training loop
(with one-hot teacher targets the soft term is the cross-entropy, a trained model beats
chance). Bad input for every public entry point.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlabc.efficiency.distillation import (
    distillation_loss,
    soft_target_gradient,
    soft_target_loss,
    student_mlp,
    train_classifier,
)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 5, generator=g, dtype=torch.float64) * 2


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0, 10.0])
def test_soft_term_is_kl_div_batchmean_times_t_squared(logits, T):
    z_s, z_t = logits
    reference = T**2 * F.kl_div(
        F.log_softmax(z_s / T, -1),
        F.log_softmax(z_t / T, -1),
        reduction="batchmean",
        log_target=True,
    )
    torch.testing.assert_close(soft_target_loss(z_s, z_t, T), reference)


def test_loss_mixes_kl_and_cross_entropy(logits):
    z_s, z_t = logits
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    T, alpha = 2.0, 0.3
    soft = F.kl_div(
        F.log_softmax(z_s / T, -1), F.softmax(z_t / T, -1), reduction="batchmean"
    )
    reference = alpha * T**2 * soft + (1 - alpha) * F.cross_entropy(z_s, y)
    torch.testing.assert_close(distillation_loss(z_s, z_t, y, T, alpha), reference)


@pytest.mark.parametrize("T", [0.7, 4.0])
def test_gradient_closed_form_matches_autograd_and_finite_differences(logits, T):
    z_s, z_t = logits
    z = z_s.clone().requires_grad_()
    (autograd,) = torch.autograd.grad(soft_target_loss(z, z_t, T) * len(z) / T**2, z)
    closed = soft_target_gradient(z_s, z_t, T)
    torch.testing.assert_close(closed, autograd)
    h, (b, i) = 1e-6, (3, 2)
    plus, minus = z_s.clone(), z_s.clone()
    plus[b, i] += h
    minus[b, i] -= h
    f = [soft_target_loss(z, z_t, T) * len(z) / T**2 for z in (plus, minus)]
    assert (f[0] - f[1]).item() / (2 * h) == pytest.approx(
        closed[b, i].item(), abs=1e-7
    )


def test_high_temperature_limit_is_logit_matching(logits):
    z_s, z_t = logits
    d = z_s - z_t
    d = d - d.mean(1, keepdim=True)
    limit = (d**2).sum(1).mean() / (2 * z_s.shape[1])
    assert soft_target_loss(z_s, z_t, 1e3).item() == pytest.approx(
        limit.item(), rel=1e-2
    )


def test_student_is_a_two_layer_mlp():
    torch.manual_seed(0)
    model = student_mlp(hidden=4, n_classes=3, n_pixels=6)
    x = torch.randn(5, 1, 2, 3)
    first, second = model[1], model[3]
    expected = second(torch.relu(first(x.reshape(5, 6))))
    torch.testing.assert_close(model(x), expected)


def test_train_classifier_learns_and_one_hot_soft_term_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 1, 2, 2, generator=g)
    y = (X.flatten(1).sum(1) > 0).long()
    torch.manual_seed(0)
    model = student_mlp(hidden=8, n_classes=2, n_pixels=4)
    history = train_classifier(model, X, y, steps=30, batch_size=16, lr=0.05)
    assert len(history.step_loss) == 30
    assert (model(X).argmax(1) == y).float().mean() > 0.8
    one_hot = 1e4 * F.one_hot(y, 2).double()  # p_t one-hot: KL = cross-entropy
    z = torch.randn(64, 2, dtype=torch.float64)
    torch.testing.assert_close(soft_target_loss(z, one_hot, 1.0), F.cross_entropy(z, y))
    torch.manual_seed(0)
    distilled = student_mlp(hidden=8, n_classes=2, n_pixels=4)
    train_classifier(
        distilled,
        X[:8],
        y[:8],
        steps=60,
        batch_size=8,
        lr=0.02,
        transfer=(X, one_hot.float()),
        T=1.0,
        alpha=1.0,
    )
    assert (distilled(X).argmax(1) == y).float().mean() > 0.8


def test_bad_input_is_rejected(logits):
    z_s, z_t = logits
    y = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="one shape"):
        soft_target_loss(z_s, z_t[:, :3], 1.0)
    with pytest.raises(ValueError, match=r"T must be in \(0, inf\)"):
        soft_target_loss(z_s, z_t, 0.0)
    with pytest.raises(ValueError, match="2 dimensions"):
        soft_target_gradient(z_s[0], z_t[0], 1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        distillation_loss(z_s, z_t, y, 1.0, 1.5)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        distillation_loss(z_s, z_t, y.float(), 1.0, 0.5)
    with pytest.raises(ValueError, match="one entry per example"):
        distillation_loss(z_s, z_t, y[:3], 1.0, 0.5)
    with pytest.raises(ValueError, match="hidden must be positive"):
        student_mlp(hidden=0)
    X = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ValueError, match="same length|one length"):
        train_classifier(student_mlp(4, 2, 4), X, y, steps=1)
    with pytest.raises(ValueError, match="transfer images and logits differ"):
        train_classifier(
            student_mlp(4, 2, 4),
            X,
            y[:4],
            steps=1,
            transfer=(X, torch.zeros(3, 2)),
        )
