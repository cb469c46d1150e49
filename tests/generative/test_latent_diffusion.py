"""Tests for ``dlabc.generative.latent_diffusion``.

The guided noise against the "guidance scale" form that ``diffusers``' pipelines use,
$\\epsilon_u + \\gamma (\\epsilon_c - \\epsilon_u)$ with $\\gamma = 1 + w$, from separate
calls; a whole guided DDIM sampling loop in the latent space against ``diffusers``'
``DDIMScheduler`` fed the same guided noise; the scale factor against NumPy's standard
deviation; label dropout against the binomial distribution (``scipy``); the
autoencoder's loss against ``F.binary_cross_entropy``; the comparison contract's shape
and range; bad input everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from scipy import stats

from dlabc.generative.ddpm import NoiseSchedule, linear_betas
from dlabc.generative.latent_diffusion import (
    Autoencoder,
    LatentDenoiser,
    drop_labels,
    generate_digits,
    guided_eps,
    latent_scale,
    sample_digits,
    train_autoencoder,
    train_denoiser,
)

D = 4


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return Autoencoder(D, hidden=8).eval(), LatentDenoiser(D, width=16, depth=2).eval()


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(linear_betas(1000))


# ---------------------------------------------------------------- the autoencoder


def test_autoencoder_shapes_and_range(models):
    autoencoder, _ = models
    x = torch.rand(3, 1, 28, 28)
    z = autoencoder.encode(x)
    assert z.shape == (3, D)
    image = autoencoder.decode(z)
    assert image.shape == (3, 1, 28, 28)
    assert torch.allclose(image, torch.sigmoid(autoencoder(x)))
    assert bool(((image > 0) & (image < 1)).all())


def test_train_autoencoder_minimises_pixel_cross_entropy():
    torch.manual_seed(1)
    images = torch.rand(32, 1, 28, 28)
    autoencoder = Autoencoder(D, hidden=16)

    def loss():  # the loss written with the probabilities, not the logits
        with torch.no_grad():
            return F.binary_cross_entropy(
                autoencoder.decode(autoencoder.encode(images)), images
            )

    before = loss()
    history = train_autoencoder(autoencoder, images, 3, batch_size=32, lr=1e-2)
    assert abs(history.step_loss[0] - before.item()) < 1e-5
    assert loss() < before
    assert not any(p.requires_grad for p in autoencoder.parameters())  # frozen


def test_autoencoder_bad_input():
    with pytest.raises(ValueError, match="latent_dim must be positive"):
        Autoencoder(0)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\)"):
        train_autoencoder(Autoencoder(D), torch.rand(4, 1, 14, 14), 1)
    with pytest.raises(TypeError, match="must be an Autoencoder"):
        train_autoencoder(torch.nn.Linear(2, 2), torch.rand(4, 1, 28, 28), 1)


def test_latent_scale_is_the_standard_deviation():
    codes = torch.randn(50, 6) * 3 + 1
    scale = latent_scale(codes)
    assert scale == pytest.approx(np.std(codes.numpy(), ddof=1), rel=1e-5)
    assert (codes / scale).std().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="2 dimensions"):
        latent_scale(torch.randn(5))


# ---------------------------------------------------------------- the denoiser


def test_denoiser_shapes_and_null_label(models):
    _, denoiser = models
    z, t = torch.randn(5, D), torch.tensor([0, 1, 10, 500, 999])
    labels = torch.tensor([0, 3, 9, 10, 10])  # 10: the null label
    assert denoiser.null_label == 10
    assert denoiser(z, t, labels).shape == (5, D)
    with pytest.raises(ValueError, match="time_dim must be even"):
        LatentDenoiser(D, time_dim=7)


def test_drop_labels_follows_the_binomial():
    labels = torch.randint(10, (20_000,))
    generator = torch.Generator().manual_seed(0)
    dropped = drop_labels(labels, 0.2, 10, generator)
    is_null = dropped == 10
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert stats.binomtest(int(is_null.sum()), len(labels), 0.2).pvalue > 1e-3
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    assert bool((drop_labels(labels, 1.0, 10) == 10).all())
    with pytest.raises(TypeError, match="dtype torch.int64"):
        drop_labels(labels.float(), 0.2, 10)
    with pytest.raises(ValueError, match="p_uncond must be in"):
        drop_labels(labels, 1.5, 10)


def test_guided_eps_equals_the_guidance_scale_form(models):
    _, denoiser = models
    z, t, labels = torch.randn(6, D), torch.randint(1000, (6,)), torch.arange(6)
    with torch.no_grad():
        eps_c = denoiser(z, t, labels)
        eps_u = denoiser(z, t, torch.full_like(labels, 10))
        for w in (0.0, 0.5, 3.0):
            gamma = 1 + w  # diffusers' guidance_scale
            expected = eps_u + gamma * (eps_c - eps_u)
            ours = guided_eps(denoiser, z, t, labels, w)
            assert (ours - expected).abs().max() < 1e-5
        assert torch.equal(guided_eps(denoiser, z, t, labels, 0.0), eps_c)


def test_guided_eps_bad_input(models):
    _, denoiser = models
    z, t, labels = (
        torch.randn(3, D),
        torch.zeros(3, dtype=torch.int64),
        torch.zeros(3, dtype=torch.int64),
    )
    with pytest.raises(ValueError, match="w must be in"):
        guided_eps(denoiser, z, t, labels, -1.0)
    with pytest.raises(ValueError, match="same length"):
        guided_eps(denoiser, z, t[:2], labels, 1.0)
    with pytest.raises(TypeError, match="must be a LatentDenoiser"):
        guided_eps(torch.nn.Linear(D, D), z, t, labels, 1.0)


def test_guided_sampling_equals_a_diffusers_ddim_loop(models, schedule):
    autoencoder, denoiser = models
    labels, scale, w, steps = torch.tensor([1, 7, 3]), 2.5, 2.0, 10
    ours = sample_digits(
        autoencoder,
        denoiser,
        schedule,
        scale,
        labels,
        w,
        steps,
        torch.Generator().manual_seed(3),
    )
    reference = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    reference.set_timesteps(steps)
    z = torch.randn((3, D), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in reference.timesteps:
            t_batch = torch.full((3,), int(t), dtype=torch.int64)
            z_c, z_u = (
                denoiser(z, t_batch, labels),
                denoiser(z, t_batch, torch.full_like(labels, 10)),
            )
            eps = z_u + (1 + w) * (z_c - z_u)
            z = reference.step(eps, t, z, eta=0.0).prev_sample
        expected = autoencoder.decode(scale * z)
    assert (ours - expected).abs().max() < 1e-5


def test_train_denoiser_and_sample_bad_input(models, schedule):
    autoencoder, denoiser = models
    codes, labels = torch.randn(16, D), torch.randint(10, (16,))
    history = train_denoiser(
        LatentDenoiser(D, width=16, depth=1), schedule, codes, labels, 2, batch_size=8
    )
    assert len(history.step_loss) == 2
    with pytest.raises(ValueError, match="as long"):
        train_denoiser(denoiser, schedule, codes, labels[:5], 2)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        train_denoiser(denoiser, "linear", codes, labels, 2)
    with pytest.raises(ValueError, match="sampling_steps must be at most"):
        sample_digits(autoencoder, denoiser, schedule, 1.0, labels, 1.0, 2000)
    with pytest.raises(ValueError, match="scale must be in"):
        sample_digits(autoencoder, denoiser, schedule, 0.0, labels)


# ---------------------------------------------------------------- the comparison contract


def test_generate_digits_contract():
    x = generate_digits(4, n=12, seed=0, sampling_steps=3)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert x.device.type == "cpu"
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    with pytest.raises(ValueError, match="at least 2"):
        generate_digits(1)
    with pytest.raises(ValueError, match="guidance must be in"):
        generate_digits(4, guidance=-1.0)
