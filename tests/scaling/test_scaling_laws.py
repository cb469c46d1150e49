"""Tests for ``dlabc.scaling.scaling_laws``.

The closed-form count of non-embedding parameters equals the elements of a built
model's parameters (PyTorch's ``numel``) outside its embedding and read-out, and is
Kaplan et al.'s $12\\,n_{layer} d^2$ plus terms linear in $d$; $6ND$ plus the read-out
equals the matrix-product FLOPs that PyTorch's ``FlopCounterMode`` counts in a forward
and backward pass. The Huber loss equals ``F.huber_loss``; the fitting objective equals
a direct computation with ``torch.logsumexp`` and its gradient equals finite
differences (``scipy.optimize.approx_fprime``). The fit recovers the parameters of a
law from synthetic losses, exactly without noise and closely with it; the
compute-optimal allocation equals a brute-force minimization of $L(N, C/6N)$ over $N$
(``scipy.optimize.minimize_scalar``). Training with checkpoints equals a plain Adam
loop on the same batches. Bad input fails with a clear message.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import approx_fprime, minimize_scalar
from torch.utils.flop_counter import FlopCounterMode

from dlabc.improvements.rope_alibi import lm_loss
from dlabc.rnn.char_lm import batches
from dlabc.scaling.scaling_laws import (
    CHINCHILLA,
    ChinchillaLaw,
    chinchilla_objective,
    count_non_embedding,
    fit_chinchilla,
    held_out_loss,
    huber,
    make_lm,
    non_embedding_parameters,
    train_with_checkpoints,
    training_flops,
)

SHAPES = [(1, 16), (2, 32), (3, 48), (2, 96)]  # (n_layers, d_model)
VOCAB = 11


@pytest.mark.parametrize(("n_layers", "d_model"), SHAPES)
def test_parameter_count_matches_numel_and_kaplans_formula(n_layers, d_model):
    model = make_lm(VOCAB, n_layers, d_model)
    total = sum(p.numel() for p in model.parameters())
    vocabulary = VOCAB * d_model + d_model * VOCAB + VOCAB  # embedding, read-out + bias
    closed = non_embedding_parameters(n_layers, d_model, 4 * d_model)
    assert closed == total - vocabulary == count_non_embedding(model)
    # 12 L d^2 for the weight matrices, 9 L d + 2 d for biases and LayerNorms
    assert closed == 12 * n_layers * d_model**2 + 9 * n_layers * d_model + 2 * d_model


@pytest.mark.parametrize(("n_layers", "d_model"), SHAPES[:3])
def test_six_n_d_is_the_matrix_flops_of_pytorchs_counter(n_layers, d_model):
    torch.manual_seed(0)
    model = make_lm(VOCAB, n_layers, d_model)
    x, y = torch.randint(VOCAB, (3, 20)), torch.randint(VOCAB, (3, 20))
    with FlopCounterMode(display=False) as counter:
        lm_loss(model, (x, y)).backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matrix_flops = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    weights = 12 * n_layers * d_model**2  # the matrices of N
    tokens = x.numel()
    expected = training_flops(weights, tokens) + 6 * tokens * d_model * VOCAB
    assert matrix_flops == expected


def test_training_flops_broadcasts():
    C = training_flops(np.array([1e6, 1e9]), 2e10)
    np.testing.assert_allclose(C, [1.2e17, 1.2e20])


def test_huber_equals_torch():
    r = np.linspace(-0.01, 0.01, 101)
    for delta in (1e-3, 5e-3, 1.0):
        reference = F.huber_loss(
            torch.tensor(r),
            torch.zeros(len(r), dtype=torch.float64),
            delta=delta,
            reduction="none",
        )
        np.testing.assert_allclose(huber(r, delta), reference.numpy(), rtol=1e-12)


def _data(law, noise=0.0, seed=0):
    N, D = np.meshgrid(np.logspace(7.5, 10.5, 7), np.logspace(9.5, 12.0, 6))
    N, D = N.ravel(), D.ravel()
    rng = np.random.default_rng(seed)
    return N, D, law.loss(N, D) * np.exp(noise * rng.standard_normal(N.shape))


def test_objective_equals_torch_and_its_gradient_finite_differences():
    N, D, L = _data(CHINCHILLA, noise=0.02)
    log_N, log_D, log_L = np.log(N), np.log(D), np.log(L)
    theta = np.array([5.5, 6.5, 0.4, 0.3, 0.3])
    value, grad = chinchilla_objective(theta, log_N, log_D, log_L, 1e-2)
    a, b, e, alpha, beta = (torch.tensor(v) for v in theta)
    terms = torch.stack(
        [
            a - alpha * torch.tensor(log_N),
            b - beta * torch.tensor(log_D),
            e.expand(len(N)),
        ]
    )
    r = torch.logsumexp(terms, 0) - torch.tensor(log_L)
    reference = F.huber_loss(r, torch.zeros_like(r), delta=1e-2, reduction="sum")
    assert value == pytest.approx(reference.item(), rel=1e-12)

    def f(t):
        return chinchilla_objective(t, log_N, log_D, log_L, 1e-2)[0]

    np.testing.assert_allclose(grad, approx_fprime(theta, f, 1e-7), rtol=1e-4)


def test_fit_recovers_a_law_exactly_without_noise():
    law = ChinchillaLaw(E=1.2, A=50.0, B=300.0, alpha=0.3, beta=0.4)
    fit = fit_chinchilla(*_data(law), n_starts=5)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(law, name), rel=1e-3), name


def test_fit_recovers_chinchillas_law_from_noisy_losses():
    N, D, L = _data(CHINCHILLA, noise=0.003, seed=1)
    fit = fit_chinchilla(N, D, L)
    assert fit.alpha == pytest.approx(CHINCHILLA.alpha, abs=0.04)
    assert fit.beta == pytest.approx(CHINCHILLA.beta, abs=0.04)
    assert fit.E == pytest.approx(CHINCHILLA.E, abs=0.1)
    assert fit.a == pytest.approx(CHINCHILLA.a, abs=0.04)
    residual = np.log(fit.loss(N, D)) - np.log(L)
    assert np.sqrt(np.mean(residual**2)) < 0.005


@pytest.mark.parametrize("law", [CHINCHILLA, ChinchillaLaw(1.4, 2.4, 500.0, 0.16, 0.6)])
@pytest.mark.parametrize("C", [1e12, 1e18, 5.76e23])
def test_compute_optimal_equals_brute_force(law, C):
    N_opt, D_opt = law.compute_optimal(C)

    def loss_at(log_N):  # the loss of a model of N = e^log_N on C / 6N tokens
        N = math.exp(log_N)
        return float(law.loss(N, C / (6 * N)))

    best = minimize_scalar(
        loss_at, bounds=(0.0, 60.0), method="bounded", options={"xatol": 1e-10}
    )
    assert float(N_opt) == pytest.approx(math.exp(best.x), rel=1e-6)
    assert float(D_opt) == pytest.approx(C / (6 * float(N_opt)), rel=1e-12)


def test_training_with_checkpoints_equals_a_plain_adam_loop():
    torch.manual_seed(0)
    ids = torch.randint(VOCAB, (500,))
    valid = (torch.randint(VOCAB, (2, 16)), torch.randint(VOCAB, (2, 16)))
    model = make_lm(VOCAB, 1, 16)
    reference = make_lm(VOCAB, 1, 16)
    reference.load_state_dict(model.state_dict())
    losses = train_with_checkpoints(
        model, ids, valid, [2, 5], lr=1e-2, warmup=3, batch_size=4, seq_len=8, seed=7
    )
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    expected = []
    stream = batches(ids, 4, 8, 5, torch.Generator().manual_seed(7))
    for step, batch in enumerate(stream, start=1):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * min(1.0, step / 3)
        optimizer.zero_grad()
        lm_loss(reference, batch).backward()
        optimizer.step()
        if step in (2, 5):
            with torch.no_grad():
                logits = reference.eval()(valid[0])
                expected.append(
                    F.cross_entropy(logits.flatten(0, 1), valid[1].flatten())
                )
            reference.train()
    np.testing.assert_allclose(losses, [e.item() for e in expected], rtol=1e-5)
    assert model.training
    assert held_out_loss(model, *valid) == pytest.approx(losses[-1], rel=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="n_layers must be positive"):
        non_embedding_parameters(0, 16, 64)
    with pytest.raises(ValueError, match="d_model must be a multiple of 16"):
        make_lm(VOCAB, 1, 20)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        count_non_embedding("model")
    with pytest.raises(ValueError, match="N must be finite and positive"):
        training_flops(-1.0, 10.0)
    with pytest.raises(ValueError, match="delta must be in"):
        huber(np.zeros(3), 0.0)
    with pytest.raises(ValueError, match="same length"):
        fit_chinchilla([1e6] * 6, [1e9] * 5, [3.0] * 6)
    with pytest.raises(ValueError, match="L must be finite and positive"):
        fit_chinchilla([1e6] * 6, [1e9] * 6, [3.0, -1, 3, 3, 3, 3])
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_chinchilla([1e6] * 4, [1e9] * 4, [3.0] * 4)
    with pytest.raises(ValueError, match="alpha, beta, A, B > 0"):
        ChinchillaLaw(1.0, 1.0, 1.0, -0.1, 0.3).compute_optimal(1e20)
    with pytest.raises(ValueError, match="C must be finite and positive"):
        CHINCHILLA.compute_optimal(0.0)
    ids = torch.randint(VOCAB, (100,))
    valid = (torch.zeros(1, 8, dtype=torch.long),) * 2
    model = make_lm(VOCAB, 1, 16)
    with pytest.raises(ValueError, match="checkpoints must increase"):
        train_with_checkpoints(
            model, ids, valid, [4, 2], lr=1e-3, warmup=1, batch_size=2, seq_len=8
        )
    with pytest.raises(ValueError, match="checkpoints must be positive ints"):
        train_with_checkpoints(
            model, ids, valid, [0], lr=1e-3, warmup=1, batch_size=2, seq_len=8
        )
    with pytest.raises(TypeError, match="valid must be a tuple"):
        train_with_checkpoints(
            model, ids, valid[0], [1], lr=1e-3, warmup=1, batch_size=2, seq_len=8
        )
