"""Tests for ``dlabc.generative.ddpm``.

The schedules, the reverse steps, the time steps of a respaced sampler and a whole DDIM
sampling loop against ``diffusers``' own ``DDPMScheduler`` and ``DDIMScheduler`` (same
model output, same noise); the forward process against its closed form, exactly, through
the Jacobian of the iterated chain (float64); the posterior against Bayes' rule for
Gaussians written out independently; the time embedding against ``diffusers``'
``get_timestep_embedding``; the noise predictor against the CNN chapter's ``UNet`` with
the same weights; the loss and the samplers against an oracle that knows the data.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding

from dlabc.cnn.unet import UNet
from dlabc.generative.ddpm import (
    DiffusionUNet,
    NoiseSchedule,
    cosine_betas,
    ddim_step,
    ddpm_step,
    diffusion_loss,
    generate_digits,
    linear_betas,
    predict_x0,
    q_posterior,
    q_sample,
    q_step,
    sample,
    spaced_timesteps,
    timestep_embedding,
    train_ddpm,
)

T = 1000
SHAPE = (3, 2, 4, 4)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(linear_betas(T))


def _ddpm_scheduler(**options):
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", **options)


def _ddim_scheduler(**options):
    return DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", **options)


# ---------------------------------------------------------------- schedules


def test_schedules_equal_diffusers(schedule):
    reference = _ddpm_scheduler()
    torch.testing.assert_close(schedule.betas, reference.betas, rtol=0, atol=0)
    torch.testing.assert_close(schedule.alpha_bars, reference.alphas_cumprod)
    cosine = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(cosine_betas(T), cosine.betas)
    assert schedule.alpha_bar(-1).item() == 1.0
    t = torch.tensor([-1, 0, 999])
    torch.testing.assert_close(
        schedule.alpha_bar(t),
        torch.stack([torch.tensor(1.0), *schedule.alpha_bars[[0, 999]]]),
    )


def test_schedules_reject_bad_input():
    with pytest.raises(ValueError, match="T must be positive"):
        linear_betas(0)
    with pytest.raises(ValueError, match="beta_end must be in"):
        linear_betas(10, 0.1, 0.05)
    with pytest.raises(ValueError, match="s must be in"):
        cosine_betas(10, s=-1.0)
    with pytest.raises(ValueError, match="values in \\(0, 1\\)"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(TypeError, match="floating-point"):
        NoiseSchedule(torch.tensor([1, 2]))


def test_spaced_timesteps_equal_diffusers_trailing():
    for steps in (1, 7, 10, 50, 1000):
        reference = _ddim_scheduler(timestep_spacing="trailing")
        reference.set_timesteps(steps)
        assert spaced_timesteps(T, steps) == reference.timesteps.tolist()
    with pytest.raises(ValueError, match="at most T"):
        spaced_timesteps(10, 11)


# ---------------------------------------------------------------- the forward process


def test_q_sample_is_the_iterated_chain_exactly():
    """x_t after t+1 steps is linear in x_0 and the t+1 noises: its coefficient on x_0
    must be sqrt(alpha_bar) and the squares of its noise coefficients must add up to
    1 - alpha_bar (the variance), read off the chain's Jacobian in float64."""
    small = NoiseSchedule(linear_betas(20, 0.01, 0.2, dtype=torch.float64))
    x0 = torch.tensor([0.7], dtype=torch.float64)

    def chain(x0, noises):
        x = x0
        for t in range(len(noises)):
            x = q_step(small, x, t, noises[t])
        return x

    noises = torch.zeros(20, 1, dtype=torch.float64)
    d_x0, d_noise = torch.autograd.functional.jacobian(chain, (x0, noises))
    alpha_bar = small.alpha_bars[-1]
    torch.testing.assert_close(d_x0[0, 0], alpha_bar.sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(
        d_noise.square().sum(), 1 - alpha_bar, rtol=1e-14, atol=0
    )
    # and q_sample's own coefficients are those
    t = torch.tensor([19])
    ones = torch.ones(1, 1, dtype=torch.float64)
    torch.testing.assert_close(
        q_sample(small, ones, t, 0 * ones)[0, 0], alpha_bar.sqrt(), rtol=1e-14, atol=0
    )
    torch.testing.assert_close(
        q_sample(small, 0 * ones, t, ones)[0, 0],
        (1 - alpha_bar).sqrt(),
        rtol=1e-14,
        atol=0,
    )


def test_q_sample_equals_diffusers_add_noise(schedule):
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 500, 999])
    reference = _ddpm_scheduler().add_noise(x0, noise, t)
    torch.testing.assert_close(q_sample(schedule, x0, t, noise), reference)


def test_forward_process_rejects_bad_input(schedule):
    x0 = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="t must lie in 0..999"):
        q_sample(schedule, x0, torch.tensor([0, 1, 1000]), x0)
    with pytest.raises(ValueError, match="t must be a \\(B,\\) tensor"):
        q_sample(schedule, x0, torch.tensor([0, 1]), x0)
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        q_sample(schedule, x0, torch.tensor([0, 1, 2]), x0[:2])
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        q_step("linear", x0, 3, x0)
    with pytest.raises(TypeError, match="int64"):
        q_sample(schedule, x0, torch.tensor([0.0, 1.0, 2.0]), x0)


# ---------------------------------------------------------------- the posterior


def test_posterior_is_bayes_rule_for_gaussians():
    """q(x_{t-1} | x_0) q(x_t | x_{t-1}), normalised: precisions add, means are
    precision-weighted; in float64 against the module's closed form."""
    small = NoiseSchedule(linear_betas(50, 0.001, 0.2, dtype=torch.float64))
    x0 = torch.randn(4, 3, dtype=torch.float64)
    x_t = torch.randn(4, 3, dtype=torch.float64)
    for t in (1, 17, 49):
        a_prev, alpha, beta = small.alpha_bars[t - 1], small.alphas[t], small.betas[t]
        precision = 1 / (1 - a_prev) + alpha / beta
        mean = (
            a_prev.sqrt() * x0 / (1 - a_prev) + alpha.sqrt() * x_t / beta
        ) / precision
        got_mean, got_variance = q_posterior(small, x0, x_t, t)
        torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_variance, 1 / precision, rtol=1e-12, atol=0)
    # the last step (t = 0, back to the data) is certain: the mean is x_0
    got_mean, got_variance = q_posterior(small, x0, x_t, 0)
    torch.testing.assert_close(got_mean, x0, rtol=1e-12, atol=1e-12)
    assert got_variance.item() == 0.0


def test_posterior_and_predict_x0_reject_bad_input(schedule):
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="t_prev must lie in -1..t-1"):
        q_posterior(schedule, x, x, 5, t_prev=5)
    with pytest.raises(ValueError, match="x_t must have the shape of x0"):
        q_posterior(schedule, x, x[0], 5)
    with pytest.raises(TypeError, match="t must be an int here"):
        q_posterior(schedule, x, x, torch.tensor([5]))
    with pytest.raises(ValueError, match="eps must have the shape of x_t"):
        predict_x0(schedule, x, 5, x[:1])


# ---------------------------------------------------------------- reverse steps


@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_equals_diffusers(schedule, clip):
    reference = _ddpm_scheduler(clip_sample=clip)
    x_t, eps = 2 * torch.randn(SHAPE), torch.randn(SHAPE)
    for t in (999, 500, 3, 0):
        expected = reference.step(
            eps, t, x_t, generator=torch.Generator().manual_seed(t)
        ).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        got = ddpm_step(schedule, eps, x_t, t, noise, clip_x0=clip)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_respaced_ddpm_step_equals_diffusers(schedule):
    reference = _ddpm_scheduler(timestep_spacing="trailing")
    reference.set_timesteps(10)
    timesteps = spaced_timesteps(T, 10)
    x_t, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
        expected = reference.step(
            eps, t, x_t, generator=torch.Generator().manual_seed(t)
        ).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        got = ddpm_step(schedule, eps, x_t, t, noise, t_prev=t_prev)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_step_equals_diffusers(schedule, eta):
    reference = _ddim_scheduler()
    reference.set_timesteps(20)  # leading spacing: t, t - 50
    x_t, eps, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    for t in (950, 400, 0):
        expected = reference.step(
            eps, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None
        ).prev_sample
        got = ddim_step(schedule, eps, x_t, t, max(t - 50, -1), eta, noise)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ddim_with_eta_one_is_ddpm(schedule):
    """Song et al.: with eta = 1 and no clipping, the DDIM step is DDPM's posterior."""
    x_t, eps, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    for t, t_prev in ((999, 998), (600, 550), (10, -1)):
        ddim = ddim_step(schedule, eps, x_t, t, t_prev, 1.0, noise, clip_x0=False)
        ddpm = ddpm_step(schedule, eps, x_t, t, noise, t_prev, clip_x0=False)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-5)


def test_steps_reject_bad_input(schedule):
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="noise is needed when eta > 0"):
        ddim_step(schedule, x, x, 10, 5, eta=0.5)
    with pytest.raises(ValueError, match="eta must be in"):
        ddim_step(schedule, x, x, 10, 5, eta=-1.0)
    with pytest.raises(ValueError, match="noise must have the shape of x_t"):
        ddpm_step(schedule, x, x, 10, x[:1])
    with pytest.raises(ValueError, match="t must lie in 0..999"):
        ddpm_step(schedule, x, x, 1000, x)


# ---------------------------------------------------------------- loss and samplers


class _Oracle(torch.nn.Module):
    """The exact noise predictor for a data set of one point x0: inverts q_sample."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0 = schedule, x0

    def forward(self, x_t, t):
        alpha_bar = self.schedule.alpha_bar(t).reshape(-1, *[1] * (x_t.dim() - 1))
        x0 = self.x0[: len(x_t)]
        return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def test_loss_is_zero_for_the_oracle_and_matches_a_hand_computation(schedule):
    x0 = torch.rand(SHAPE) * 2 - 1
    oracle = _Oracle(schedule, x0)
    assert diffusion_loss(oracle, schedule, x0).item() < 1e-8
    # a zero predictor's loss is the mean square of the very noise that was drawn
    generator = torch.Generator().manual_seed(3)
    loss = diffusion_loss(lambda x, t: torch.zeros_like(x), schedule, x0, generator)
    generator = torch.Generator().manual_seed(3)
    torch.randint(T, (len(x0),), generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    torch.testing.assert_close(loss, noise.square().mean())


@pytest.mark.parametrize(
    "options",
    [
        dict(sampler="ddpm"),
        dict(steps=10),
        dict(steps=7, eta=1.0),
        dict(steps=5, batch_size=1),
    ],
    ids=["ddpm-T", "ddim-10", "ddim-7-eta1", "one-at-a-time"],
)
def test_every_sampler_returns_the_data_of_a_one_point_data_set(options):
    schedule = NoiseSchedule(linear_betas(50, 0.002, 0.4))
    x0 = (torch.rand(1, 1, 3, 3) * 1.6 - 0.8).expand(2, -1, -1, -1)  # one point
    got = sample(_Oracle(schedule, x0), schedule, x0.shape, **options)
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)


def test_sample_splits_model_kwargs_with_the_batch(schedule):
    seen = []

    def eps_model(x, t, labels, scale):
        assert len(labels) == len(x) == len(t) and scale == 2.0
        seen.append(labels.tolist())
        return torch.zeros_like(x)

    labels = torch.arange(5)
    sample(eps_model, schedule, (5, 3), 1, batch_size=2, labels=labels, scale=2.0)
    assert seen == [[0, 1], [2, 3], [4]]


def test_ddim_sampling_loop_equals_diffusers(schedule):
    torch.manual_seed(0)
    model = DiffusionUNet(1, 4, depth=1, time_dim=8).eval()
    got = sample(
        model, schedule, (2, 1, 4, 4), 5, generator=torch.Generator().manual_seed(7)
    )
    reference = _ddim_scheduler(timestep_spacing="trailing")
    reference.set_timesteps(5)
    x = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in reference.timesteps:
            x = reference.step(model(x, t.repeat(2)), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


def test_loss_and_sample_reject_bad_input(schedule):
    x = torch.randn(SHAPE)
    with pytest.raises(TypeError, match="eps_model must be callable"):
        diffusion_loss(None, schedule, x)
    with pytest.raises(ValueError, match="x0 must be a non-empty batch"):
        diffusion_loss(lambda x, t: x, schedule, x[:0])
    with pytest.raises(ValueError, match="sampler must be 'ddpm' or 'ddim'"):
        sample(lambda x, t: x, schedule, SHAPE, 5, sampler="euler")
    with pytest.raises(ValueError, match="shape must be a sequence"):
        sample(lambda x, t: x, schedule, (3,), 5)
    with pytest.raises(ValueError, match="steps must be at most T"):
        sample(lambda x, t: x, schedule, SHAPE, 2000)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        sample(lambda x, t: x, schedule, SHAPE, 5, batch_size=0)


# ---------------------------------------------------------------- the noise predictor


def test_timestep_embedding_equals_diffusers():
    t = torch.tensor([0, 1, 17, 999])
    expected = get_timestep_embedding(t, 32, downscale_freq_shift=1)
    torch.testing.assert_close(timestep_embedding(t, 32), expected)
    with pytest.raises(ValueError, match="dim must be even"):
        timestep_embedding(t, 7)


def test_unet_without_time_is_the_cnn_chapters_unet():
    """With its time projections zeroed, the noise predictor is the U-Net of the CNN
    part: load its weights into ``UNet`` and compare the outputs."""
    torch.manual_seed(0)
    model = DiffusionUNet(2, 4, depth=2, time_dim=8).eval()
    for name, parameter in model.named_parameters():
        if name.startswith("time_") and not name.startswith("time_mlp"):
            torch.nn.init.zeros_(parameter)
    reference = UNet(2, 2, base_channels=4, depth=2).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("time_")}
    reference.load_state_dict(state)
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([0, 5, 9])), reference(x))
    # and the time step does change the output once the projections are not zero
    model = DiffusionUNet(2, 4, depth=2, time_dim=8).eval()
    with torch.no_grad():
        a, b = model(x, torch.tensor([0, 0, 0])), model(x, torch.tensor([900] * 3))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="time_dim must be even"):
        DiffusionUNet(1, 4, time_dim=5)
    with pytest.raises(ValueError, match="base_channels must be positive"):
        DiffusionUNet(1, 0)


# ---------------------------------------------------------------- the recipe


def test_train_ddpm_runs_and_rejects_bad_input(schedule):
    torch.manual_seed(0)
    model = DiffusionUNet(1, 4, depth=1, time_dim=8)
    data = torch.rand(16, 1, 4, 4) * 2 - 1
    history = train_ddpm(model, schedule, data, steps=3, batch_size=8)
    assert len(history.step_loss) == 3
    assert all(0 < loss < 10 for loss in history.step_loss)
    with pytest.raises(ValueError, match="lr must be in"):
        train_ddpm(model, schedule, data, steps=3, lr=0.0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        train_ddpm(lambda x, t: x, schedule, data, steps=3)


def test_generate_digits_contract():
    images = generate_digits(2, n=3, seed=1, sampling_steps=2, base_channels=2)
    assert images.shape == (3, 1, 28, 28) and images.dtype == torch.float32
    assert images.device.type == "cpu"
    assert 0 <= images.min().item() and images.max().item() <= 1
    with pytest.raises(ValueError, match="sampling_steps must be at most T"):
        generate_digits(1, n=2, sampling_steps=20, T=10)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        generate_digits(1, n=2, seed=-1)
