"""Tests for ``dlabc.rl.sac``.

The squashed log-probability equals the change of variables with the Jacobian that
``torch.autograd.functional.jacobian`` computes, torch's own ``TransformedDistribution``
(tanh, then an affine map) and stable-baselines3's ``SquashedDiagGaussianDistribution``.
The batched layers equal ``nn.Linear`` run by run; the replay buffer returns what SB3's
``ReplayBuffer`` returns for the same transitions and indices (time limits included);
the Polyak step equals SB3's ``polyak_update``. One whole SAC update (critics, actor,
temperature, targets) equals one step of SB3's ``SAC.train`` from the same weights, on
the same batch, with the same noise; on a [-2, 2] box the temperature's step still
equals SB3's, whose log-probabilities are those of actions rescaled to [-1, 1]. Runs
trained side by side do not interact. The
training loop stores terminal flags, not time limits. Bad input fails with a clear
message.
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import (
    AffineTransform,
    Independent,
    Normal,
    TanhTransform,
    TransformedDistribution,
)

from dlabc.rl import sac as sac_module
from dlabc.rl.sac import (
    SAC,
    Batch,
    Critic,
    Linears,
    ReplayBuffer,
    SACHistory,
    SquashedGaussianActor,
    _Loop,
    polyak_update,
    squashed_log_prob,
    train_sac,
)


def fixed_noise(shape, *args, **kwargs):
    """Deterministic 'standard normal' noise that depends only on the last two
    dimensions, the same for every run."""
    *runs, b, a = shape
    values = torch.linspace(-1.5, 1.5, b * a, dtype=torch.float64).reshape(b, a)
    dtype = kwargs.get("dtype") or torch.float32
    return values.to(dtype).expand(*runs, b, a).clone()


@pytest.fixture
def same_noise(monkeypatch):
    """Our actor draws with ``torch.randn_like``, SB3's with torch's Normal.rsample."""
    monkeypatch.setattr(
        sac_module.torch,
        "randn_like",
        lambda x: fixed_noise(tuple(x.shape), dtype=x.dtype),
    )
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", fixed_noise)


# --- the squashed Gaussian -----------------------------------------------------------


@pytest.mark.parametrize("act_dim", [1, 3])
def test_log_prob_is_the_change_of_variables(act_dim):
    torch.manual_seed(0)
    mean = torch.randn(act_dim, dtype=torch.float64)
    log_std = torch.randn(act_dim, dtype=torch.float64) * 0.5
    scale = torch.rand(act_dim, dtype=torch.float64) * 3 + 0.5
    bias = torch.randn(act_dim, dtype=torch.float64)
    for _ in range(5):
        u = mean + log_std.exp() * torch.randn(act_dim, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(
            lambda v: bias + scale * torch.tanh(v), u
        )
        gaussian = Normal(mean, log_std.exp()).log_prob(u).sum()
        expected = gaussian - torch.linalg.slogdet(J).logabsdet
        ours = squashed_log_prob(u, mean, log_std, scale)
        assert torch.allclose(ours, expected, atol=1e-12, rtol=0)


def test_log_prob_stays_finite_where_tanh_saturates():
    u = torch.tensor([[30.0], [-30.0]], dtype=torch.float64)
    zeros = torch.zeros_like(u)
    out = squashed_log_prob(u, zeros, zeros, torch.ones(1, dtype=torch.float64))
    assert torch.isfinite(out).all()
    # log(1 - tanh^2 u) = log 4 - 2|u| - 2 log(1 + e^{-2|u|}) exactly
    expected = -0.5 * 900 - 0.5 * math.log(2 * math.pi) - (math.log(4) - 60)
    assert torch.allclose(out, torch.full((2,), expected, dtype=torch.float64))


def test_log_prob_equals_torch_transformed_distribution():
    torch.manual_seed(1)
    mean, log_std = torch.randn(4, 2).double(), 0.3 * torch.randn(4, 2).double()
    scale, bias = torch.tensor([2.0, 0.5]).double(), torch.tensor([0.0, 1.0]).double()
    u = mean + log_std.exp() * torch.randn(4, 2).double()
    dist = TransformedDistribution(
        Independent(Normal(mean, log_std.exp()), 1),
        [TanhTransform(), AffineTransform(bias, scale, event_dim=1)],
    )
    action = bias + scale * torch.tanh(u)
    ours = squashed_log_prob(u, mean, log_std, scale)
    assert torch.allclose(ours, dist.log_prob(action), atol=1e-8)


def test_log_prob_equals_stable_baselines3():
    from stable_baselines3.common.distributions import (
        SquashedDiagGaussianDistribution,
    )

    torch.manual_seed(2)
    mean, log_std = torch.randn(64, 2).double(), 0.5 * torch.randn(64, 2).double()
    u = mean + log_std.exp() * torch.randn(64, 2).double()
    dist = SquashedDiagGaussianDistribution(2).proba_distribution(mean, log_std)
    ones = torch.ones(2, dtype=torch.float64)
    ours = squashed_log_prob(u, mean, log_std, ones)
    # SB3 adds epsilon = 1e-6 inside log(1 - a^2): a difference of
    # sum log(1 + epsilon / (1 - a^2)), tiny unless tanh saturates
    theirs = dist.log_prob(torch.tanh(u), gaussian_actions=u)
    gap = torch.log1p(1e-6 / (1 - torch.tanh(u) ** 2)).sum(-1)
    assert torch.allclose(ours - theirs, gap, atol=1e-9)
    moderate = (u.abs() < 2).all(-1)
    assert (ours - theirs)[moderate].abs().max() < 1e-4
    dist.epsilon = 0.0
    exact = dist.log_prob(torch.tanh(u), gaussian_actions=u)
    assert torch.allclose(ours, exact, atol=1e-9)


def test_actor_samples_in_the_box_with_their_log_prob():
    torch.manual_seed(3)
    actor = SquashedGaussianActor(3, 2, 16, low=[-2.0, 0.0], high=[2.0, 1.0], n_runs=2)
    obs = torch.randn(2, 500, 3)
    action, log_prob = actor(obs)
    assert action.shape == (2, 500, 2) and log_prob.shape == (2, 500)
    assert (action[..., 0].abs() <= 2).all()
    assert ((action[..., 1] >= 0) & (action[..., 1] <= 1)).all()
    # the deterministic action is the squashed mean
    mean = actor.trunk(obs)[..., :2]
    greedy, _ = actor(obs, deterministic=True)
    expected = torch.tensor([0.0, 0.5]) + torch.tensor([2.0, 0.5]) * torch.tanh(mean)
    assert torch.allclose(greedy, expected)


def test_actor_sampling_matches_its_density():
    """The empirical histogram of a 1-D policy's actions matches exp(log_prob)."""
    torch.manual_seed(4)
    actor = SquashedGaussianActor(1, 1, 8, low=-2.0, high=2.0)
    obs = torch.zeros(1, 100_000, 1)
    with torch.no_grad():
        action, log_prob = actor(obs)
    hist, edges = np.histogram(action.flatten().numpy(), bins=20, range=(-2, 2))
    hist = hist / action.numel()  # the fraction of samples in each bin
    # the probability of each bin, integrating exp(log pi) over it on a fine grid
    mean, log_std = actor.trunk(obs[:, :1]).detach().chunk(2, -1)
    log_std = log_std.clamp(-20, 2)
    grid = torch.linspace(-2, 2, 20 * 400 + 1, dtype=torch.float64)[1:-1]
    u = torch.atanh(grid / 2).reshape(1, -1, 1)
    scale = torch.tensor([2.0], dtype=torch.float64)
    density = squashed_log_prob(u, mean.double(), log_std.double(), scale).exp()
    mass = np.add.reduceat(density[0].numpy() * 4 / 8000, np.arange(0, 7999, 400))
    assert np.abs(hist - mass).max() < 0.01


# --- networks, buffer, targets -------------------------------------------------------


def test_linears_are_independent_linear_layers():
    torch.manual_seed(5)
    layer = Linears(3, 4, 5)
    x = torch.randn(3, 7, 4)
    out = layer(x)
    for k in range(3):
        expected = nn.functional.linear(x[k], layer.weight[k].T, layer.bias[k, 0])
        assert torch.allclose(out[k], expected, atol=1e-6)
    bound = 1 / math.sqrt(4)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound


def test_critic_gives_two_different_q_functions():
    torch.manual_seed(6)
    critic = Critic(3, 1, 8, n_runs=2)
    obs, action = torch.randn(2, 5, 3), torch.randn(2, 5, 1)
    q1, q2 = critic(obs, action)
    assert q1.shape == q2.shape == (2, 5)
    assert not torch.allclose(q1, q2)
    sa = torch.cat([obs, action], -1)
    for k, q in ((0, q1), (1, q1), (2, q2), (3, q2)):
        net = [critic.q[i] for i in range(5)]
        h = sa[k % 2]
        for i in (0, 2, 4):
            h = nn.functional.linear(h, net[i].weight[k].T, net[i].bias[k, 0])
            h = torch.relu(h) if i < 4 else h
        assert torch.allclose(q[k % 2], h.squeeze(-1), atol=1e-6)


def test_replay_buffer_equals_stable_baselines3():
    from stable_baselines3.common.buffers import ReplayBuffer as SB3Buffer

    obs_space = gym.spaces.Box(-10, 10, (3,), np.float32)
    act_space = gym.spaces.Box(-2, 2, (1,), np.float32)
    runs, capacity = 2, 8
    ours = ReplayBuffer(3, 1, capacity, n_runs=runs)
    theirs = [
        SB3Buffer(
            capacity, obs_space, act_space, "cpu", handle_timeout_termination=True
        )
        for _ in range(runs)
    ]
    rng = np.random.default_rng(0)
    for _ in range(13):  # wraps around
        o, o2 = rng.normal(size=(runs, 3)), rng.normal(size=(runs, 3))
        a, r = rng.uniform(-2, 2, (runs, 1)), rng.normal(size=runs)
        terminated, truncated = rng.random(runs) < 0.2, rng.random(runs) < 0.3
        ours.add(o, a, r, o2, terminated)
        for k in range(runs):
            info = {"TimeLimit.truncated": bool(truncated[k] and not terminated[k])}
            done = np.array([terminated[k] or truncated[k]])
            theirs[k].add(o[k], o2[k], a[k], r[k : k + 1], done, [info])
    assert len(ours) == capacity
    index = torch.randint(0, capacity, (runs, 6))
    batch = ours.get(index)
    for k in range(runs):
        ref = theirs[k]._get_samples(index[k].numpy())
        assert torch.equal(batch.obs[k], ref.observations)
        assert torch.equal(batch.action[k], ref.actions)
        assert torch.equal(batch.next_obs[k], ref.next_observations)
        assert torch.equal(batch.reward[k], ref.rewards.squeeze(1))
        assert torch.equal(batch.done[k], ref.dones.squeeze(1))  # time limits: not done
    sample = ours.sample(4, torch.Generator().manual_seed(0))
    assert sample.obs.shape == (runs, 4, 3) and sample.done.shape == (runs, 4)


def test_polyak_update_equals_stable_baselines3():
    from stable_baselines3.common.utils import polyak_update as sb3_polyak

    torch.manual_seed(7)
    source, target = Critic(3, 1, 8), Critic(3, 1, 8)
    reference = copy.deepcopy(target)
    polyak_update(target, source, 0.05)
    sb3_polyak(source.parameters(), reference.parameters(), 0.05)
    for a, b in zip(target.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    polyak_update(target, source, 1.0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(target.parameters(), source.parameters(), strict=True)
    )


# --- the losses and one update -------------------------------------------------------


def batch_for(runs, B=32, obs_dim=2, act_dim=1, seed=8, done=None):
    g = torch.Generator().manual_seed(seed)
    one = Batch(
        torch.randn(1, B, obs_dim, generator=g),
        torch.rand(1, B, act_dim, generator=g) * 2 - 1,
        torch.randn(1, B, generator=g),
        torch.randn(1, B, obs_dim, generator=g),
        (torch.rand(1, B, generator=g) < 0.2).float() if done is None else done,
    )
    return Batch(*(x.expand(runs, *x.shape[1:]).clone() for x in vars(one).values()))


def test_a_terminal_transition_regresses_on_the_reward(same_noise):
    torch.manual_seed(9)
    agent = SAC(2, 1, hidden=8)
    batch = batch_for(1, done=torch.ones(1, 32))
    q1, q2 = agent.critic(batch.obs, batch.action)
    expected = 0.5 * ((q1 - batch.reward) ** 2 + (q2 - batch.reward) ** 2).mean()
    assert torch.allclose(agent.critic_loss(batch), expected)


def test_the_temperature_gradient_follows_the_entropy():
    agent = SAC(2, 3, init_alpha=0.5)
    assert agent.target_entropy == -3.0  # -dim A
    for log_prob in (torch.full((1, 10), -5.0), torch.full((1, 10), 5.0)):
        agent.log_alpha.grad = None
        agent.alpha_loss(log_prob).backward()
        # d J / d log(alpha) = -(E[log pi] + target entropy) = entropy - target
        assert agent.log_alpha.grad.item() == pytest.approx(-(log_prob[0, 0] - 3))
    # log pi = 5, entropy -5, below the target -3: descent raises alpha
    assert agent.log_alpha.grad.item() < 0
    # a box of half-widths c: -dim A + sum log c, the entropy of the actions themselves
    wide = SAC(2, 2, low=[-2.0, 0.0], high=[2.0, 6.0])
    assert wide.target_entropy == pytest.approx(-2 + math.log(2) + math.log(3))


def copy_into_sb3(agent, model, act_dim):
    """Copy run 0 of our actor and critics into SB3's SAC."""
    trunk = agent.actor.trunk
    with torch.no_grad():
        for ours, theirs in (
            (trunk[0], model.actor.latent_pi[0]),
            (trunk[2], model.actor.latent_pi[2]),
        ):
            theirs.weight.copy_(ours.weight[0].T)
            theirs.bias.copy_(ours.bias[0, 0])
        model.actor.mu.weight.copy_(trunk[4].weight[0, :, :act_dim].T)
        model.actor.mu.bias.copy_(trunk[4].bias[0, 0, :act_dim])
        model.actor.log_std.weight.copy_(trunk[4].weight[0, :, act_dim:].T)
        model.actor.log_std.bias.copy_(trunk[4].bias[0, 0, act_dim:])
        for q, net in enumerate(model.critic.q_networks):
            for i in (0, 2, 4):
                net[i].weight.copy_(agent.critic.q[i].weight[q].T)
                net[i].bias.copy_(agent.critic.q[i].bias[q, 0])
        model.critic_target.load_state_dict(model.critic.state_dict())


def test_one_update_equals_stable_baselines3_sac(same_noise):
    from stable_baselines3 import SAC as SB3SAC
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.type_aliases import ReplayBufferSamples

    env = gym.make("MountainCarContinuous-v0")  # actions in [-1, 1], 2-D observations
    lr, hidden = 0.05, 16
    model = SB3SAC(
        "MlpPolicy",
        env,
        learning_rate=lr,
        tau=0.1,
        gamma=0.9,
        policy_kwargs={
            "net_arch": [hidden, hidden],
            "optimizer_class": torch.optim.SGD,
        },
        device="cpu",
        verbose=0,
        seed=0,
    )
    model.set_logger(Logger(None, []))
    torch.manual_seed(10)
    agent = SAC(2, 1, hidden=hidden, lr=lr, tau=0.1, gamma=0.9)
    agent.actor_optimizer = torch.optim.SGD(agent.actor.parameters(), lr=lr)
    agent.critic_optimizer = torch.optim.SGD(agent.critic.parameters(), lr=lr)
    copy_into_sb3(agent, model, 1)
    batch = batch_for(1)
    samples = ReplayBufferSamples(
        batch.obs[0],
        batch.action[0],
        batch.next_obs[0],
        batch.done[0, :, None],
        batch.reward[0, :, None],
        None,
    )
    model.replay_buffer.sample = lambda *args, **kwargs: samples
    initial = copy.deepcopy(agent.critic)
    model.train(gradient_steps=1, batch_size=32)
    agent.update(batch)

    trunk = agent.actor.trunk
    diffs = [
        (trunk[0].weight[0].T - model.actor.latent_pi[0].weight).abs().max(),
        (trunk[2].weight[0].T - model.actor.latent_pi[2].weight).abs().max(),
        (trunk[4].weight[0, :, :1].T - model.actor.mu.weight).abs().max(),
        (trunk[4].bias[0, 0, 1:] - model.actor.log_std.bias).abs().max(),
        (agent.log_alpha - model.log_ent_coef).abs().max(),
    ]
    for q, (net, target) in enumerate(
        zip(model.critic.q_networks, model.critic_target.q_networks, strict=True)
    ):
        for i in (0, 2, 4):
            diffs.append((agent.critic.q[i].weight[q].T - net[i].weight).abs().max())
            diffs.append((agent.critic.q[i].bias[q, 0] - net[i].bias).abs().max())
            ours_target = agent.critic_target.q[i].weight[q].T
            diffs.append((ours_target - target[i].weight).abs().max())
    assert max(d.item() for d in diffs) < 1e-6
    # and the update moved the weights far more than that
    assert agent.log_alpha.item() == pytest.approx(-lr)  # Adam's first step: -lr
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(agent.critic.parameters(), initial.parameters(), strict=True)
    )
    assert moved > 1e-3


def test_the_temperature_step_equals_stable_baselines3_in_a_wider_box(same_noise):
    """On Pendulum's [-2, 2] box SB3 measures log pi on actions rescaled to [-1, 1]
    with the target -dim A; our log pi is lower by log 2, and so is our target."""
    from stable_baselines3 import SAC as SB3SAC
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.type_aliases import ReplayBufferSamples

    env = gym.make("Pendulum-v1")  # torque in [-2, 2], 3-D observations
    lr, hidden = 0.5, 16
    model = SB3SAC(
        "MlpPolicy",
        env,
        learning_rate=lr,
        policy_kwargs={"net_arch": [hidden, hidden]},
        device="cpu",
        verbose=0,
        seed=0,
    )
    model.set_logger(Logger(None, []))
    model.ent_coef_optimizer = torch.optim.SGD([model.log_ent_coef], lr=lr)
    torch.manual_seed(12)
    agent = SAC(3, 1, low=-2.0, high=2.0, hidden=hidden, lr=lr)
    agent.alpha_optimizer = torch.optim.SGD([agent.log_alpha], lr=lr)
    copy_into_sb3(agent, model, 1)
    batch = batch_for(1, obs_dim=3)
    samples = ReplayBufferSamples(
        batch.obs[0],
        batch.action[0] / 2,  # SB3 stores actions rescaled to [-1, 1]
        batch.next_obs[0],
        batch.done[0, :, None],
        batch.reward[0, :, None],
        None,
    )
    model.replay_buffer.sample = lambda *args, **kwargs: samples
    model.train(gradient_steps=1, batch_size=32)
    agent.update(batch)
    assert agent.log_alpha.item() == pytest.approx(model.log_ent_coef.item(), abs=1e-5)
    assert (
        abs(agent.log_alpha.item()) > 0.1
    )  # SGD moved it: with -dim A, off by lr log 2


def test_runs_side_by_side_do_not_interact(same_noise):
    torch.manual_seed(11)
    single = SAC(2, 1, hidden=8)
    double = SAC(2, 1, hidden=8, n_runs=2)
    with torch.no_grad():  # run 1 of `double` starts from the single agent's weights
        for net_d, net_s in (
            (double.actor, single.actor),
            (double.critic, single.critic),
        ):
            for p_d, p_s in zip(net_d.parameters(), net_s.parameters(), strict=True):
                if p_d.shape[0] == 2:  # the actor: runs 0, 1
                    p_d[1] = p_s[0]
                else:  # the critics: q1 of runs 0, 1, then q2 of runs 0, 1
                    p_d[1], p_d[3] = p_s[0], p_s[1]
        double.critic_target.load_state_dict(double.critic.state_dict())
    for _ in range(3):
        single.update(batch_for(1))
        double.update(batch_for(2))
    for net_d, net_s in ((double.actor, single.actor), (double.critic, single.critic)):
        for p_d, p_s in zip(net_d.parameters(), net_s.parameters(), strict=True):
            if p_d.shape[0] == 2:
                assert torch.allclose(p_d[1], p_s[0], atol=1e-6)
            else:
                assert torch.allclose(p_d[1], p_s[0], atol=1e-6)
                assert torch.allclose(p_d[3], p_s[1], atol=1e-6)
    assert torch.allclose(double.log_alpha[1], single.log_alpha[0])


# --- the training loop ---------------------------------------------------------------


class Corridor(gym.Env):
    """Walk right by the action's sign; the episode *ends* at x = 3 (terminal) and is
    cut at 5 steps (a time limit)."""

    observation_space = gym.spaces.Box(-10, 10, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = 0, 0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x += 1 if action[0] > 0 else -1
        self.t += 1
        terminated = self.x >= 3
        return np.array([self.x], np.float32), 1.0, terminated, self.t >= 5, {}


def test_the_loop_stores_terminal_states_not_time_limits():
    envs = [Corridor(), Corridor()]
    for k, env in enumerate(envs):
        env.action_space.seed(k)
    agent = SAC(1, 1, hidden=4, n_runs=2)
    buffer = ReplayBuffer(1, 1, 100, n_runs=2)
    history = SACHistory([[], []], [[], []])
    _Loop(envs, agent, buffer, history, torch.Generator()).run(40, 30, 5, 4)
    done, next_x = buffer.done[:, :40], buffer.next_obs[:, :40, 0]
    assert torch.equal(done, (next_x >= 3).float())  # done exactly at x = 3
    for k in range(2):
        ends = np.array(history.episode_ends[k])
        lengths = np.diff(np.concatenate([[0], ends]))
        assert (lengths <= 5).all() and np.array_equal(
            history.episode_returns[k], lengths
        )
    assert history.update_steps == [30, 35, 40]
    assert len(history.alpha) == 3 and history.alpha[0].shape == (2,)


def test_train_sac_runs_on_pendulum():
    def make(seed):
        env = gym.make("Pendulum-v1", max_episode_steps=20)
        env.reset(seed=seed)
        env.action_space.seed(seed)
        return env

    agent, history = train_sac(make, 45, seeds=(0, 1), learning_starts=40, hidden=8)
    assert [len(r) for r in history.episode_returns] == [2, 2]
    assert history.episode_ends[0] == [20, 40]
    assert len(history.update_steps) == 6
    action = agent.policy(1)(np.zeros(3, np.float32))
    assert action.shape == (1,) and abs(action[0]) <= 2
    assert agent.act(np.zeros((2, 3))).shape == (2, 1)


# --- bad input -----------------------------------------------------------------------


def test_bad_input_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="high must exceed low"):
        SquashedGaussianActor(3, 1, low=1.0, high=1.0)
    with pytest.raises(ValueError, match="must be finite"):
        SquashedGaussianActor(3, 1, low=-np.inf, high=1.0)
    with pytest.raises(ValueError, match="obs_dim must be positive"):
        SquashedGaussianActor(0, 1)
    actor = SquashedGaussianActor(3, 1, n_runs=2)
    with pytest.raises(ValueError, match=r"obs must have shape \(n_runs=2"):
        actor(torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="obs must have 3 dimensions"):
        actor(torch.randn(4, 3))
    buffer = ReplayBuffer(3, 1, 10)
    with pytest.raises(ValueError, match="empty replay buffer"):
        buffer.sample(4)
    with pytest.raises(ValueError, match="expected a transition part of shape"):
        buffer.add(np.zeros((1, 2)), np.zeros((1, 1)), [0.0], np.zeros((1, 3)), [0])
    with pytest.raises(ValueError, match="lr must be in"):
        SAC(3, 1, lr=0.0)
    with pytest.raises(ValueError, match="gamma must be in"):
        SAC(3, 1, gamma=1.5)
    with pytest.raises(ValueError, match="run must be in 0..0"):
        SAC(3, 1).policy(1)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        train_sac(lambda s: Corridor(), 10, seeds=(1, 1))
    with pytest.raises(ValueError, match="steps must be positive"):
        train_sac(lambda s: Corridor(), 0)
