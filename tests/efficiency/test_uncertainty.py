"""Tests for ``dlabc.efficiency.uncertainty``.

The KL term against ``torch.distributions.kl_divergence``; Bayes by backprop's layer
against its reparameterisation written out (same noise) and its ELBO against the
cross-entropy plus the KL; the predictive samples against plain softmax passes (dropout
on, weights drawn); the entropy split against ``torch.distributions.Categorical``; the
ECE against a hand-computed case and a brute-force loop; the AUROC against
SciPy's Mann-Whitney U and the pairwise count (the chapter
also compares it with ``sklearn.metrics.roc_auc_score``); the temperature
against ``scipy.optimize.minimize_scalar``. Bad input for every public entry point.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.stats import mannwhitneyu
from torch.distributions import Categorical, Normal, kl_divergence

from dlabc.efficiency.uncertainty import (
    MLP,
    BayesLinear,
    BayesMLP,
    auroc,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    gaussian_kl,
    negative_elbo,
    predictive_samples,
    train_classifier,
    uncertainty_scores,
)

# ------------------------------------------------------------- Bayes by backprop


@pytest.mark.parametrize("prior_sigma", [0.1, 1.0, 2.5])
def test_gaussian_kl_is_torch_distributions(prior_sigma):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 5, generator=g, dtype=torch.float64)
    sigma = torch.rand(7, 5, generator=g, dtype=torch.float64) + 0.05
    prior = Normal(torch.zeros_like(mu), torch.full_like(mu, prior_sigma))
    expected = kl_divergence(Normal(mu, sigma), prior).sum()
    torch.testing.assert_close(gaussian_kl(mu, sigma, prior_sigma), expected)


def test_gaussian_kl_rejects_bad_input():
    mu = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl(mu, torch.ones(4), 1.0)
    with pytest.raises(ValueError, match=r"prior_sigma must be in \(0, inf\)"):
        gaussian_kl(mu, torch.ones(3), 0.0)
    with pytest.raises(TypeError, match="mu must be a floating-point tensor"):
        gaussian_kl(torch.zeros(3, dtype=torch.long), torch.ones(3), 1.0)


def test_bayes_linear_draws_reparameterised_weights():
    layer = BayesLinear(4, 3, prior_sigma=0.5, rho_init=-1.0).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)  # the same noise, written out by hand
    eps_w = torch.randn(3, 4, dtype=torch.float64)
    eps_b = torch.randn(3, dtype=torch.float64)
    sigma = math.log1p(math.exp(-1.0))  # softplus(rho)
    w = layer.weight_mu + sigma * eps_w
    b = layer.bias_mu + sigma * eps_b
    torch.testing.assert_close(out, x @ w.T + b)
    # gradients reach the means and the widths through the sample
    out.sum().backward()
    assert layer.weight_rho.grad.abs().sum() > 0 and layer.bias_mu.grad is not None
    # the layer's KL is the closed form over its weights and biases
    mus = torch.cat([layer.weight_mu.flatten(), layer.bias_mu])
    expected = kl_divergence(
        Normal(mus, torch.full_like(mus, sigma)),
        Normal(torch.zeros_like(mus), torch.full_like(mus, 0.5)),
    ).sum()
    torch.testing.assert_close(layer.kl(), expected)
    with pytest.raises(ValueError, match="in_features must be positive"):
        BayesLinear(0, 3)
    with pytest.raises(ValueError, match=r"prior_sigma must be in \(0, inf\)"):
        BayesLinear(2, 3, prior_sigma=-1.0)


def test_negative_elbo_is_cross_entropy_plus_kl_per_example():
    model = BayesMLP(in_features=5, hidden=4, classes=3).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(3, (8,))
    torch.manual_seed(1)
    loss = negative_elbo(model, x, y, n_train=100)
    torch.manual_seed(1)
    expected = F.cross_entropy(model(x), y) + model.kl() / 100
    torch.testing.assert_close(loss, expected)
    assert model(x).shape == (8, 3)
    assert not torch.equal(model(x), model(x))  # new weights at every call
    with pytest.raises(TypeError, match="model must be a BayesMLP"):
        negative_elbo(MLP(5, 4, 3), x.float(), y, 100)
    with pytest.raises(ValueError, match="n_train must be positive"):
        negative_elbo(model, x, y, 0)


# ------------------------------------------------------ the predictive distribution


def test_predictive_samples_are_softmax_passes():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    plain = [MLP(6, 8, 3) for _ in range(2)]
    ensemble = predictive_samples(plain, x)
    assert ensemble.shape == (2, 5, 3)
    with torch.no_grad():
        for s, net in zip(ensemble, plain, strict=True):
            torch.testing.assert_close(s, net(x).softmax(-1))
    dropout = MLP(6, 8, 3, p=0.5).eval()
    torch.manual_seed(3)
    mc = predictive_samples(dropout, x, passes=4)
    assert not dropout.training  # the mode is restored
    torch.manual_seed(3)
    dropout.train()  # the same masks: dropout on, the same random stream
    with torch.no_grad():
        expected = torch.stack([dropout(x).softmax(-1) for _ in range(4)])
    torch.testing.assert_close(mc, expected)
    assert dropout.training  # restored to what it was
    with pytest.raises(ValueError, match="passes must be positive"):
        predictive_samples(dropout, x, 0)
    with pytest.raises(TypeError, match="non-empty list"):
        predictive_samples([], x)


def test_uncertainty_scores_split_the_entropy():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(6, 9, 4, generator=g, dtype=torch.float64).softmax(-1)
    u = uncertainty_scores(samples)
    mean = samples.mean(0)
    torch.testing.assert_close(u.probs, mean)
    torch.testing.assert_close(u.confidence, mean.max(-1).values)
    torch.testing.assert_close(u.entropy, Categorical(probs=mean).entropy())
    torch.testing.assert_close(
        u.expected_entropy, Categorical(probs=samples).entropy().mean(0)
    )
    # I(y; w) = mean_s KL(p_s || p̄), another form of the same quantity
    kl = (samples * (samples.log() - mean.log())).sum(-1).mean(0)
    torch.testing.assert_close(u.mutual_information, kl)
    one = uncertainty_scores(samples[:1])  # a single network: no disagreement
    torch.testing.assert_close(one.mutual_information, torch.zeros(9).double())
    with pytest.raises(ValueError, match="samples must have 3 dimensions"):
        uncertainty_scores(samples[0])


# ----------------------------------------------------------------------- calibration


def _brute_force_ece(probs, labels, n_bins):
    total = 0.0
    for m in range(n_bins):
        low, high = m / n_bins, (m + 1) / n_bins
        pairs = [
            (float(p.max()), float(p.argmax() == t))
            for p, t in zip(probs, labels, strict=True)
            if low < float(p.max()) <= high
        ]
        if pairs:
            conf = sum(c for c, _ in pairs) / len(pairs)
            acc = sum(a for _, a in pairs) / len(pairs)
            total += len(pairs) / len(labels) * abs(acc - conf)
    return total


def test_ece_hand_case():
    # confidences 0.4 (wrong), 0.45 (right) | 0.6 (right), 0.9 (wrong), two bins:
    # 2/4 * |0.5 - 0.425| + 2/4 * |0.5 - 0.75| = 0.1625
    conf = torch.tensor([0.4, 0.45, 0.6, 0.9], dtype=torch.float64)
    probs = torch.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1)
    labels = torch.tensor([1, 0, 0, 2])
    assert expected_calibration_error(probs, labels, 2) == pytest.approx(0.1625)
    count, confidence, accuracy = calibration_bins(probs, labels, 2)
    torch.testing.assert_close(count, torch.tensor([2.0, 2.0]).double())
    torch.testing.assert_close(confidence, torch.tensor([0.425, 0.75]).double())
    torch.testing.assert_close(accuracy, torch.tensor([0.5, 0.5]).double())
    # a bin edge belongs to the bin below it: (0, 0.5], (0.5, 1]
    edge = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    assert calibration_bins(edge, torch.tensor([0]), 2)[0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("n_bins", [1, 4, 15])
def test_ece_is_brute_force(n_bins):
    g = torch.Generator().manual_seed(n_bins)
    probs = (2 * torch.randn(300, 5, generator=g, dtype=torch.float64)).softmax(1)
    labels = torch.randint(5, (300,), generator=g)
    ours = expected_calibration_error(probs, labels, n_bins)
    assert ours == pytest.approx(_brute_force_ece(probs, labels, n_bins), abs=1e-12)


def test_calibration_rejects_bad_input():
    probs = torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="rows summing to 1"):
        expected_calibration_error(probs * 2, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="same length"):
        expected_calibration_error(probs, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must have dtype torch.int64"):
        expected_calibration_error(probs, torch.zeros(3))
    with pytest.raises(ValueError, match="n_bins must be positive"):
        calibration_bins(probs, torch.zeros(3, dtype=torch.long), 0)


# ---------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auroc_is_scipys_mann_whitney_u(decimals):
    g = torch.Generator().manual_seed(0)
    s_in = torch.randn(40, generator=g, dtype=torch.float64)
    s_out = torch.randn(25, generator=g, dtype=torch.float64) + 0.5
    if decimals is not None:  # ties
        s_in, s_out = s_in.round(decimals=decimals), s_out.round(decimals=decimals)
    # SciPy's Mann-Whitney U of the outsiders, divided by the number of pairs
    expected = mannwhitneyu(s_out.numpy(), s_in.numpy()).statistic / (25 * 40)
    assert auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)
    wins = (s_out[:, None] > s_in[None]).double() + 0.5 * (s_out[:, None] == s_in)
    assert auroc(s_in, s_out) == pytest.approx(wins.mean().item(), abs=1e-12)


def test_auroc_extremes_and_bad_input():
    assert auroc(torch.zeros(3), torch.ones(2)) == 1.0
    assert auroc(torch.ones(3), torch.zeros(2)) == 0.0
    assert auroc(torch.ones(3), torch.ones(2)) == 0.5
    with pytest.raises(ValueError, match="scores_out must not be empty"):
        auroc(torch.ones(3), torch.ones(0))
    with pytest.raises(ValueError, match="scores_in must have 1 dimensions"):
        auroc(torch.ones(3, 1), torch.ones(2))


# --------------------------------------------------------- temperature and training


def test_fit_temperature_is_scipys_minimum():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(200, 5, generator=g, dtype=torch.float64)
    labels = torch.where(
        torch.rand(200, generator=g) < 0.6,
        logits.argmax(1),
        torch.randint(5, (200,), generator=g),
    )

    def nll(t):
        return F.cross_entropy(logits / t, labels).item()

    best = minimize_scalar(
        nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-8}
    )
    assert fit_temperature(logits, labels) == pytest.approx(best.x, rel=1e-4)
    with pytest.raises(ValueError, match="same length"):
        fit_temperature(logits, labels[:3])
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        fit_temperature(logits[0], labels)


def test_train_classifier_lowers_the_loss_and_checks_input():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, generator=g)
    y = (X[:, 0] > 0).long()
    for model in [MLP(6, 16, 2), BayesMLP(6, 16, 2, prior_sigma=1.0)]:
        history = train_classifier(model, X, y, 30, lr=2e-2, batch_size=32)
        first, last = np.mean(history.step_loss[:3]), np.mean(history.step_loss[-3:])
        assert last < first and not model.training
    with pytest.raises(ValueError, match="same length"):
        train_classifier(MLP(6, 4, 2), X, y[:3], 2)
    with pytest.raises(ValueError, match="steps must be positive"):
        train_classifier(MLP(6, 4, 2), X, y, 0)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        MLP(6, 4, 2, p=1.0)
