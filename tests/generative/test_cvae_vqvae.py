"""Tests for ``dlabc.generative.cvae_vqvae``.

The negative ELBO against ``torch.distributions`` (Bernoulli log-likelihood and the
Gaussians' KL divergence); quantisation against brute-force nearest neighbours
(``torch.cdist``) and the straight-through gradient against the gradient at the
quantised vectors (exactly equal); the two VQ losses against where their gradients go;
the EMA codebook update against its definition written as per-code loops; the
perplexity against closed forms (uniform usage: K; one code: 1) and the entropy of
``torch.distributions.Categorical``; the independent prior against counting; ``generate_digits`` for shape and
range. Bad input for every public entry point.
"""

from __future__ import annotations

import math

import pytest
import torch

from dlabc.generative import cvae_vqvae as cv
from dlabc.generative.cvae_vqvae import (
    CVAE,
    VQVAE,
    VectorQuantizer,
    codebook_perplexity,
    ema_update,
    fit_independent_prior,
    generate_digits,
    negative_elbo,
    sample_cvae,
    sample_independent_prior,
    train_cvae,
    train_vqvae,
    vector_quantize,
    vq_losses,
)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(16, 1, 28, 28), torch.arange(16) % 10


def test_negative_elbo_matches_torch_distributions():
    torch.manual_seed(1)
    logits = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3).double()
    bernoulli = torch.distributions.Bernoulli(logits=logits, validate_args=False)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = -bernoulli.log_prob(x).flatten(1).sum(1)
    expected += torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(negative_elbo(logits, x, mu, logvar), expected)


def test_cvae_shapes_and_that_the_decoder_reads_the_label(images):
    x, y = images
    torch.manual_seed(0)
    model = CVAE(latent_dim=4, hidden=16)
    logits, mu, logvar = model(x, y)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (16, 4)
    z = torch.zeros(2, 4)
    a, b = sample_cvae(model, torch.tensor([3, 5]), z)
    assert not torch.equal(a, b)  # same z, different label, different image
    assert sample_cvae(model, torch.tensor([1, 2, 3])).shape == (3, 1, 28, 28)


def test_train_cvae_returns_a_trained_model_in_eval_mode(images):
    x, y = images
    model, history = train_cvae(x, y, 3, batch_size=8, latent_dim=2, hidden=8)
    assert isinstance(model, CVAE) and not model.training
    assert len(history.step_loss) == 3 and all(
        math.isfinite(v) for v in history.step_loss
    )


def test_vector_quantize_is_the_nearest_code_with_a_straight_through_gradient():
    torch.manual_seed(2)
    z = torch.randn(30, 5, requires_grad=True)
    codebook = torch.randn(7, 5)
    z_st, z_q, k = vector_quantize(z, codebook)
    assert torch.equal(k, torch.cdist(z.detach(), codebook).argmin(1))
    assert torch.equal(z_q, codebook[k])
    torch.testing.assert_close(z_st, z_q)
    z_st.retain_grad()
    (z_st.sin() * torch.arange(5.0)).sum().backward()
    assert torch.equal(z.grad, z_st.grad)


def test_vq_losses_send_their_gradients_to_one_side_each():
    torch.manual_seed(3)
    z = torch.randn(6, 4, requires_grad=True)
    codes = torch.randn(6, 4, requires_grad=True)
    codebook_loss, commitment = vq_losses(z, codes, beta=0.25)
    torch.testing.assert_close(codebook_loss, (z - codes).square().mean())
    torch.testing.assert_close(commitment, 0.25 * (z - codes).square().mean())
    codebook_loss.backward(retain_graph=True)
    assert z.grad is None and codes.grad is not None
    codes.grad = None
    commitment.backward()
    assert codes.grad is None and z.grad is not None


def test_ema_update_matches_the_per_code_loop():
    torch.manual_seed(4)
    K, D, gamma, eps = 6, 3, 0.8, 1e-3
    N, m = torch.rand(K).double() + 0.1, torch.randn(K, D).double()
    z, idx = torch.randn(40, D).double(), torch.randint(0, 4, (40,))
    new_N, new_m, new_e = ema_update(N, m, z, idx, gamma, eps)
    for i in range(K):
        n_i = int((idx == i).sum())
        s_i = z[idx == i].sum(0)
        assert math.isclose(new_N[i], gamma * N[i] + (1 - gamma) * n_i, rel_tol=1e-12)
        torch.testing.assert_close(new_m[i], gamma * m[i] + (1 - gamma) * s_i)
    total = new_N.sum()
    torch.testing.assert_close(
        new_e, new_m / ((new_N + eps) / (total + K * eps) * total)[:, None]
    )


def test_perplexity_closed_forms_and_scipy():
    assert codebook_perplexity(torch.arange(8).repeat(5), 8) == pytest.approx(8)
    assert codebook_perplexity(torch.full((9,), 2), 8) == pytest.approx(1)
    idx = torch.tensor([0, 0, 0, 1, 2, 2, 5])
    counts = torch.bincount(idx, minlength=6).double()
    expected = math.exp(torch.distributions.Categorical(counts).entropy())
    assert codebook_perplexity(idx.view(1, 7), 6) == pytest.approx(expected)


def test_vq_layers_ema_restart_and_gradient_codebook():
    torch.manual_seed(5)
    z_e = torch.randn(2, 4, 3, 3)
    ema = VectorQuantizer(num_codes=8, dim=4, restart=1.0)
    before = ema.codebook.clone()
    out, loss, idx = ema(z_e)
    assert out.shape == z_e.shape and idx.shape == (2, 3, 3) and loss.ndim == 0
    assert not torch.equal(before, ema.codebook)  # averaged, and dead codes restarted
    assert (ema.cluster_size >= 1.0 - 1e-6).all()  # every dead code was restarted
    plain = VectorQuantizer(num_codes=8, dim=4, ema=False)
    _, loss, _ = plain(z_e.requires_grad_())
    loss.backward()
    assert plain.codebook.grad is not None


def test_vqvae_roundtrip_and_training(images):
    x, _ = images
    model, history = train_vqvae(
        x, 2, batch_size=8, num_codes=8, dim=4, channels=4, monitor=x[:4], every=1
    )
    codes = model.encode(x[:3])
    assert codes.shape == (3, 7, 7) and codes.max() < 8
    out = model.decode_indices(codes)
    assert out.shape == (3, 1, 28, 28) and 0 <= out.min() and out.max() <= 1
    assert history.eval_steps == [0, 1, 2]
    assert all(1 <= v <= 8 for v in history.metrics["perplexity"])


def test_independent_prior_counts_and_samples():
    idx = torch.tensor([[[0, 1]], [[0, 2]], [[0, 2]], [[1, 2]]])  # (4, 1, 2)
    probs = fit_independent_prior(idx, 3)
    expected = torch.tensor([[[0.75, 0.25, 0.0], [0.0, 0.25, 0.75]]]).double()
    torch.testing.assert_close(probs, expected)
    draws = sample_independent_prior(probs, 500, torch.Generator().manual_seed(0))
    assert draws.shape == (500, 1, 2)
    assert set(draws[:, 0, 0].tolist()) <= {0, 1} and set(draws[:, 0, 1].tolist()) <= {
        1,
        2,
    }


def test_generate_digits_contract():
    out = generate_digits(2, n=12, seed=0, hidden=8, batch_size=16)
    assert out.shape == (12, 1, 28, 28) and out.dtype == torch.float32
    assert out.device.type == "cpu" and 0 <= out.min() and out.max() <= 1


def test_bad_inputs(images):
    x, y = images
    with pytest.raises(ValueError, match="shapes do not match"):
        negative_elbo(
            torch.zeros(2, 784),
            torch.zeros(2, 784),
            torch.zeros(3, 4),
            torch.zeros(3, 4),
        )
    with pytest.raises(ValueError, match="z_q"):
        vq_losses(torch.zeros(3, 4), torch.zeros(3, 5), 0.25)
    with pytest.raises(ValueError, match="beta must be"):
        vq_losses(torch.zeros(3, 4), torch.zeros(3, 4), -1.0)
    with pytest.raises(ValueError, match="latent_dim must be positive"):
        CVAE(latent_dim=0)
    with pytest.raises(TypeError, match="model must be a CVAE"):
        sample_cvae(torch.nn.Linear(2, 2), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        sample_cvae(CVAE(), torch.tensor([10]))
    with pytest.raises(ValueError, match="z must have shape"):
        sample_cvae(CVAE(latent_dim=3), torch.tensor([1]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="16 images but 3 labels"):
        train_cvae(x, y[:3], 1)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 28, 28\)"):
        train_vqvae(torch.rand(2, 1, 8, 8), 1)
    with pytest.raises(ValueError, match="steps must be positive"):
        generate_digits(0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        generate_digits(1, seed=-1)
    with pytest.raises(ValueError, match="z has vectors of 3 numbers"):
        vector_quantize(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        ema_update(
            torch.ones(4), torch.zeros(4, 2), torch.zeros(1, 2), torch.tensor([4])
        )
    with pytest.raises(ValueError, match="decay must be"):
        ema_update(
            torch.ones(4), torch.zeros(4, 2), torch.zeros(1, 2), torch.tensor([0]), 1.0
        )
    with pytest.raises(ValueError, match="indices is empty"):
        codebook_perplexity(torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="indices must have dtype"):
        codebook_perplexity(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="restart needs ema=True"):
        VectorQuantizer(ema=False, restart=1.0)
    with pytest.raises(ValueError, match="channels must be positive"):
        VQVAE(channels=0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\)"):
        fit_independent_prior(torch.full((1, 2, 2), 2), 2)
    with pytest.raises(ValueError, match="n must be positive"):
        sample_independent_prior(torch.ones(1, 1, 2) / 2, 0)
    assert cv.__all__  # the public names the chapter uses
