"""Tests for ``dlabc.generative.vae``.

The two gradient estimators against their closed-form per-sample values and the
closed-form mean and variance for $f(z) = z^2$; the KL divergence against
``torch.distributions.kl_divergence``; the negative ELBO and the importance-weighted
bound against the same quantities written with ``torch.distributions`` (Bernoulli,
Normal); the bound against the exact log-likelihood of a one-dimensional-code VAE,
computed by brute-force quadrature over the code; the contract ``generate_digits``
(shapes, range, the model it returns). Bad input for every public entry point.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from dlabc.generative.vae import (
    VAE,
    generate_digits,
    iwae_bound,
    kl_diagonal_gaussians,
    negative_elbo,
    negative_elbo_bits_per_dim,
    reparameterization_gradients,
    sample,
    score_function_gradients,
    train_vae,
)

SMALL = (1, 4, 4)  # 16-pixel images keep the model tiny


@pytest.fixture(scope="module")
def tiny():
    """A small random VAE (1-D code) and binary images for it."""
    torch.manual_seed(0)
    model = VAE(latent_dim=1, hidden=8, image_shape=SMALL).double()
    x = (torch.rand(6, *SMALL, dtype=torch.float64) < 0.4).double()
    return model, x


# ------------------------------------------------------------ gradient estimators


@pytest.mark.parametrize("mu, sigma", [(2.0, 1.0), (-0.5, 0.3)])
def test_estimators_match_their_per_sample_formulas(mu, sigma):
    eps = torch.randn(
        50, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    z = mu + sigma * eps
    g = torch.Generator().manual_seed(3)
    path = reparameterization_gradients(torch.square, mu, sigma, 50, g)
    g = torch.Generator().manual_seed(3)
    score = score_function_gradients(torch.square, mu, sigma, 50, g)
    torch.testing.assert_close(path, 2 * z)  # f'(z)
    torch.testing.assert_close(score, z**2 * (z - mu) / sigma**2)  # f(z) d log q/dmu


def test_estimators_are_unbiased_with_the_closed_form_variances():
    mu, sigma, n = 1.0, 0.5, 400_000
    g = torch.Generator().manual_seed(0)
    for estimator, variance in [
        (reparameterization_gradients, 4 * sigma**2),
        (score_function_gradients, mu**4 / sigma**2 + 14 * mu**2 + 15 * sigma**2),
    ]:
        est = estimator(torch.square, mu, sigma, n, g)
        assert abs(est.mean().item() - 2 * mu) < 5 * math.sqrt(variance / n)
        assert est.var().item() == pytest.approx(variance, rel=0.05)


@pytest.mark.parametrize(
    "estimator", [reparameterization_gradients, score_function_gradients]
)
def test_estimators_reject_bad_input(estimator):
    with pytest.raises(ValueError, match="n must be positive"):
        estimator(torch.square, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"sigma must be in \(0, inf\)"):
        estimator(torch.square, 0.0, -1.0, 5)
    with pytest.raises(TypeError, match="f must be callable"):
        estimator(2.0, 0.0, 1.0, 5)


# --------------------------------------------------------------------------- KL


def test_kl_matches_torch_distributions():
    torch.manual_seed(1)
    mu_q, logvar_q, mu_p, logvar_p = torch.randn(4, 7, 5, dtype=torch.float64)
    q = Independent(Normal(mu_q, (0.5 * logvar_q).exp()), 1)
    p = Independent(Normal(mu_p, (0.5 * logvar_p).exp()), 1)
    ours = kl_diagonal_gaussians(mu_q, logvar_q, mu_p, logvar_p)
    torch.testing.assert_close(ours, kl_divergence(q, p), rtol=1e-12, atol=1e-12)
    prior = Independent(Normal(torch.zeros_like(mu_q), torch.ones_like(mu_q)), 1)
    torch.testing.assert_close(
        kl_diagonal_gaussians(mu_q, logvar_q), kl_divergence(q, prior)
    )


def test_kl_rejects_bad_input():
    with pytest.raises(TypeError, match="mu_q must be a floating-point tensor"):
        kl_diagonal_gaussians(torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(TypeError, match="logvar_q must be a torch.Tensor"):
        kl_diagonal_gaussians(torch.zeros(3), [0.0, 0.0, 0.0])


# ------------------------------------------------------------------- the bounds


def test_shapes_and_parameters():
    model = VAE(latent_dim=16, hidden=200)
    x = torch.zeros(3, 1, 28, 28)
    logits, mu, logvar = model(x)
    assert logits.shape == (3, 1, 28, 28) and mu.shape == logvar.shape == (3, 16)
    assert model.decode(torch.zeros(4, 5, 16)).shape == (4, 5, 1, 28, 28)
    assert sum(p.numel() for p in model.parameters()) < 330_000


def test_negative_elbo_matches_torch_distributions(tiny):
    model, x = tiny
    torch.manual_seed(5)
    ours = negative_elbo(model, x)
    torch.manual_seed(5)
    logits, mu, logvar = model(x)  # the same draw of z
    reconstruction = Independent(Bernoulli(logits=logits), 3).log_prob(x)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(ours, -reconstruction + kl_divergence(q, prior))


def _log_weights(model, x, k):
    """log p(x|z) + log p(z) - log q(z|x) for k draws, with torch.distributions."""
    mu, logvar = model.encode(x)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    z = q.sample((k,))  # (k, B, L)
    likelihood = Independent(Bernoulli(logits=model.decode(z)), 3)
    return likelihood.log_prob(x) + prior.log_prob(z) - q.log_prob(z)


@pytest.mark.parametrize("k", [1, 5])
def test_iwae_bound_matches_torch_distributions(tiny, k):
    model, x = tiny
    torch.manual_seed(7)
    ours = iwae_bound(model, x, k)
    torch.manual_seed(7)  # Normal.sample draws the same standard normals
    reference = torch.logsumexp(_log_weights(model, x, k), 0) - math.log(k)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_bounds_approach_the_exact_likelihood(tiny):
    """With a 1-D code, log p(x) = log ∫ p(x|z) p(z) dz by quadrature on a grid."""
    model, x = tiny
    with torch.no_grad():
        z = torch.linspace(-10, 10, 4001, dtype=torch.float64)[:, None, None]  # (G,1,1)
        likelihood = Independent(Bernoulli(logits=model.decode(z)), 3).log_prob(x)
        log_prior = Normal(0.0, 1.0).log_prob(z[:, :, 0])  # (G, 1)
        exact = torch.logsumexp(likelihood + log_prior, 0) + math.log(20 / 4000)
        torch.manual_seed(0)
        many = x.repeat(2000, 1, 1, 1)  # 2,000 draws of z per image
        elbo = -negative_elbo(model, many).reshape(2000, len(x)).mean(0)
        iwae = iwae_bound(model, x, 10_000)
    assert (elbo < exact - 1e-3).all()  # a strict bound for this random model
    torch.testing.assert_close(iwae, exact, rtol=0, atol=0.03)


def test_bits_per_dim_is_the_mean_negative_elbo(tiny):
    model, x = tiny
    model.train()
    bits = negative_elbo_bits_per_dim(model, x, seed=3)
    assert model.training  # the mode is restored
    assert bits == negative_elbo_bits_per_dim(model, x, seed=3)  # reproducible
    torch.manual_seed(3)
    expected = negative_elbo(model, x).mean().item() / (16 * math.log(2))
    assert bits == pytest.approx(expected, rel=1e-12)
    iwae = negative_elbo_bits_per_dim(model, x, k=50)
    assert iwae < negative_elbo_bits_per_dim(model, x, k=1)


def test_bounds_reject_bad_input(tiny):
    model, x = tiny
    with pytest.raises(ValueError, match="black and white"):
        negative_elbo_bits_per_dim(model, x * 0.5)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 4, 4\)"):
        negative_elbo(model, torch.zeros(2, 1, 28, 28, dtype=torch.float64))
    with pytest.raises(TypeError, match="model must be a VAE"):
        negative_elbo_bits_per_dim(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="k must be positive"):
        iwae_bound(model, x, 0)
    with pytest.raises(ValueError, match="latent_dim must be positive"):
        VAE(latent_dim=0)
    with pytest.raises(ValueError, match="image_shape must be positive"):
        VAE(image_shape=(1, 0, 28))


# --------------------------------------------------------- training and sampling


def test_train_and_sample():
    images = (torch.rand(20, *SMALL) < 0.5).float()
    model, history = train_vae(images, 3, latent_dim=2, hidden=8, batch_size=8)
    assert len(history.step_loss) == 3 and all(map(math.isfinite, history.step_loss))
    assert not model.training
    x = sample(model, 5, torch.Generator().manual_seed(0))
    assert x.shape == (5, *SMALL) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="steps must be positive"):
        train_vae(images, 0)
    with pytest.raises(ValueError, match="lr must be in"):
        train_vae(images, 2, lr=-1.0)
    with pytest.raises(ValueError, match="n must be positive"):
        sample(model, 0)
    with pytest.raises(TypeError, match="model must be a VAE"):
        sample(torch.nn.Linear(2, 2), 3)


def test_generate_digits_contract():
    samples, model = generate_digits(2, n=6, seed=1, latent_dim=4, return_model=True)
    assert samples.shape == (6, 1, 28, 28) and samples.dtype == torch.float32
    assert samples.device.type == "cpu" and 0 <= samples.min() and samples.max() <= 1
    assert isinstance(model, VAE) and model.latent_dim == 4
    for bad, match in [
        (dict(steps=0), "steps must be positive"),
        (dict(steps=1, n=0), "n must be positive"),
        (dict(steps=1, seed=-1), "seed must be a non-negative int"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate_digits(**bad)
