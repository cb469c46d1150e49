"""Tests for ``dlabc.rl.policy_gradients``.

GAE equals stable-baselines3's ``RolloutBuffer.compute_returns_and_advantage`` on the
same rollout, and reduces to the TD error (λ = 0) and to the discounted return minus
the value (λ = 1). The reward-to-go matches its closed form; REINFORCE's gradient
matches $\\nabla \\log\\pi \\cdot (G - b)$ in closed form, and a baseline adds nothing
to the exact expected gradient. The clipped objective matches hand-computed values
and gradients in its four cases, and one PPO step of ours equals one step of SB3's
``PPO.train`` with the same weights and batch. Truncated episodes are bootstrapped
with the critic. Bad input fails with a clear message.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from dlabc.rl import policy_gradients as pg
from dlabc.rl.policy_gradients import (
    ActorCritic,
    PPOConfig,
    collect,
    gae,
    greedy,
    ppo_loss,
    reinforce_loss,
    reward_to_go,
    train_ppo,
    train_reinforce,
)


def random_rollout(T=9, N=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g, dtype=dtype)
    values = torch.randn(T, N, generator=g, dtype=dtype)
    dones = torch.rand(T, N, generator=g) < 0.3
    last_value = torch.randn(N, generator=g, dtype=dtype)
    return rewards, values, dones, last_value


@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (0.9, 0.0), (0.8, 1.0)])
def test_gae_equals_stable_baselines3(gamma, lam):
    from stable_baselines3.common.buffers import RolloutBuffer

    T, N = 9, 3
    rewards, values, dones, last_value = random_rollout(T, N, dtype=torch.float32)
    dones[-1, 0] = True  # an episode that ends on the last step
    A, R = gae(rewards, values, dones, last_value, gamma, lam)

    buffer = RolloutBuffer(
        T,
        gym.spaces.Box(-1, 1, (4,)),
        gym.spaces.Discrete(2),
        device="cpu",
        gae_lambda=lam,
        gamma=gamma,
        n_envs=N,
    )
    # SB3 marks the *first* step of an episode: episode_start[t] = done[t - 1]
    episode_start = torch.cat([torch.ones(1, N, dtype=torch.bool), dones[:-1]])
    for t in range(T):
        buffer.add(
            np.zeros((N, 4), np.float32),
            np.zeros((N, 1)),
            rewards[t].numpy(),
            episode_start[t].numpy(),
            values[t],
            torch.zeros(N),
        )
    buffer.compute_returns_and_advantage(last_value, dones[-1].numpy())
    assert np.abs(A.numpy() - buffer.advantages).max() < 1e-6
    assert np.abs(R.numpy() - buffer.returns).max() < 1e-6


def test_gae_special_cases():
    rewards, values, dones, last_value = random_rollout()
    gamma = 0.9
    next_values = torch.cat([values[1:], last_value[None]])
    delta = rewards + gamma * (~dones).double() * next_values - values
    A0, _ = gae(rewards, values, dones, last_value, gamma, 0.0)
    torch.testing.assert_close(A0, delta, rtol=0, atol=1e-12)  # λ = 0: TD error
    # λ = 1: the discounted return (bootstrapped after the rollout) minus V
    r = rewards.clone()
    r[-1] += gamma * (~dones[-1]).double() * last_value
    A1, R1 = gae(rewards, values, dones, last_value, gamma, 1.0)
    G = reward_to_go(r, dones, gamma)
    torch.testing.assert_close(A1, G - values, rtol=0, atol=1e-12)
    torch.testing.assert_close(R1, G, rtol=0, atol=1e-12)


def test_reward_to_go_closed_form():
    gamma, L = 0.9, 6
    rewards = torch.ones(2 * L, dtype=torch.float64)
    dones = torch.zeros(2 * L, dtype=torch.bool)
    dones[L - 1] = dones[-1] = True  # two episodes of L steps
    G = reward_to_go(rewards, dones, gamma)
    steps_left = torch.arange(L, 0, -1, dtype=torch.float64).repeat(2)
    torch.testing.assert_close(G, (1 - gamma**steps_left) / (1 - gamma))


def test_reinforce_gradient_closed_form():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0, 2, 1, 1, 0])
    G = torch.randn(5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    log_prob = torch.log_softmax(logits, -1)[torch.arange(5), a]
    reinforce_loss(log_prob, G, b).backward()
    # ∂ log π(a) / ∂ logits = onehot(a) - π
    p = torch.softmax(logits.detach(), -1)
    expected = -(nn.functional.one_hot(a, 3) - p) * (G - b)[:, None] / 5
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-12)


def test_a_baseline_adds_nothing_to_the_expected_gradient():
    logits = torch.randn(4, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(logits, -1)
    # E_a[∇ log π(a) · b] = Σ_a π(a) ∇ log π(a) b = b ∇ Σ_a π(a) = 0
    grad = torch.autograd.grad((p.detach() * torch.log(p) * 3.7).sum(), logits)[0]
    assert grad.abs().max() < 1e-12


@pytest.mark.parametrize(
    ("rho", "A", "objective", "moves"),
    [
        (1.5, 2.0, 1.2 * 2.0, False),  # A > 0, ratio above 1 + ε: clipped, no gradient
        (0.5, 2.0, 0.5 * 2.0, True),  # A > 0, ratio below 1 - ε: unclipped
        (0.5, -2.0, 0.8 * -2.0, False),  # A < 0, ratio below 1 - ε: clipped
        (1.5, -2.0, 1.5 * -2.0, True),  # A < 0, ratio above 1 + ε: unclipped
        (1.1, -2.0, 1.1 * -2.0, True),  # inside the clip range
    ],
)
def test_clipped_objective_by_hand(rho, A, objective, moves):
    log_prob = torch.tensor([np.log(rho)], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    A_t = torch.tensor([A], dtype=torch.float64)
    loss, parts = ppo_loss(log_prob, zero, A_t, zero, zero, zero, clip=0.2)
    assert loss.item() == pytest.approx(-objective, abs=1e-12)
    loss.backward()
    # d(-ρA)/d log π = -ρA where the ratio is used unclipped, 0 where clipped
    assert log_prob.grad.item() == pytest.approx(-rho * A if moves else 0.0, abs=1e-12)
    assert parts["clip_fraction"] == (1.0 if abs(rho - 1) > 0.2 else 0.0)


def test_loss_parts_value_and_entropy():
    zero = torch.zeros(3, dtype=torch.float64)
    value = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    returns = torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64)
    entropy = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    loss, parts = ppo_loss(
        zero, zero, zero, value, returns, entropy, vf_coef=0.5, ent_coef=0.1
    )
    assert parts["value"] == pytest.approx(5 / 3) and parts["entropy"] == 0.6
    assert loss.item() == pytest.approx(0.5 * 5 / 3 - 0.1 * 0.6)


def test_one_ppo_step_equals_stable_baselines3():
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import DummyVecEnv

    T, N, lr, seed = 16, 2, 0.05, 3
    config = PPOConfig(n_envs=N, T=T, epochs=1, minibatch=T * N, vf_coef=0.5)
    make = lambda s: gym.make("CartPole-v1")  # noqa: E731
    runner, agent, _ = pg._setup(make, config, seed)
    rollout = collect(agent, runner, T, config.gamma)

    model = PPO(
        "MlpPolicy",
        DummyVecEnv([lambda: make(0)] * N),
        n_steps=T,
        batch_size=T * N,
        n_epochs=1,
        learning_rate=lr,
        gamma=config.gamma,
        gae_lambda=config.lam,
        ent_coef=0.01,
        vf_coef=config.vf_coef,
        max_grad_norm=1e9,
        device="cpu",
        policy_kwargs=dict(
            net_arch=dict(pi=[64, 64], vf=[64, 64]),
            activation_fn=nn.Tanh,
            optimizer_class=torch.optim.SGD,
            optimizer_kwargs={},
        ),
    )
    model.set_logger(configure(None, [""]))
    policy = model.policy
    pairs = [
        (policy.mlp_extractor.policy_net[0], agent.actor[0]),
        (policy.mlp_extractor.policy_net[2], agent.actor[2]),
        (policy.action_net, agent.actor[4]),
        (policy.mlp_extractor.value_net[0], agent.critic[0]),
        (policy.mlp_extractor.value_net[2], agent.critic[2]),
        (policy.value_net, agent.critic[4]),
    ]
    with torch.no_grad():
        for theirs, ours in pairs:
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    buffer = model.rollout_buffer = type(model.rollout_buffer)(
        T,
        model.observation_space,
        model.action_space,
        device="cpu",
        gamma=config.gamma,
        gae_lambda=config.lam,
        n_envs=N,
    )
    start = torch.cat([torch.ones(1, N, dtype=torch.bool), rollout.done[:-1]])
    for t in range(T):
        buffer.add(
            rollout.s[t].numpy(),
            rollout.a[t].numpy()[:, None],
            rollout.r[t].numpy(),
            start[t].numpy(),
            rollout.v[t],
            rollout.log_prob[t],
        )
    buffer.compute_returns_and_advantage(rollout.last_v, rollout.done[-1].numpy())
    model.train()

    # ours: GAE, normalised advantages, the loss, one SGD step of the same size
    A, R = gae(rollout.r, rollout.v, rollout.done, rollout.last_v, 0.98, 0.8)
    s, a = rollout.s.flatten(0, 1), rollout.a.flatten()
    A = A.flatten()
    A = (A - A.mean()) / (A.std() + 1e-8)
    pi = agent.policy(s)
    loss, _ = ppo_loss(
        pi.log_prob(a),
        rollout.log_prob.flatten(),
        A,
        agent.value(s),
        R.flatten(),
        pi.entropy(),
        ent_coef=0.01,
    )
    sgd = torch.optim.SGD(agent.parameters(), lr=lr)
    sgd.zero_grad()
    loss.backward()
    sgd.step()
    largest = max(
        max(
            (t.weight - o.weight).abs().max().item(),
            (t.bias - o.bias).abs().max().item(),
        )
        for t, o in pairs
    )
    assert largest < 1e-6


class Counter(gym.Env):
    """Observation [t], reward 1 each step; a time limit cuts it (never terminates)."""

    observation_space = gym.spaces.Box(-100, 100, (1,))
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, False, False, {}


def test_collect_bootstraps_truncated_episodes():
    make = lambda s: gym.wrappers.TimeLimit(Counter(), max_episode_steps=3)  # noqa: E731
    config = PPOConfig(n_envs=2, T=5)
    runner, agent, _ = pg._setup(make, config, 0)
    rollout = collect(agent, runner, 5, 0.9)
    assert rollout.s.shape == (5, 2, 1) and rollout.a.shape == (5, 2)
    assert rollout.s[:, 0, 0].tolist() == [0, 1, 2, 0, 1]  # reset after 3 steps
    assert rollout.done[:, 0].tolist() == [False, False, True, False, False]
    with torch.no_grad():
        v3 = agent.value(torch.tensor([[3.0]])).item()
    assert rollout.r[2, 0].item() == pytest.approx(1 + 0.9 * v3, abs=1e-6)
    assert rollout.r[0, 0].item() == 1.0 and rollout.episode_returns == [3.0, 3.0]
    with torch.no_grad():
        torch.testing.assert_close(
            rollout.last_v, agent.value(torch.tensor([[2.0]] * 2))
        )
        dist = agent.policy(rollout.s[0])
        torch.testing.assert_close(rollout.log_prob[0], dist.log_prob(rollout.a[0]))


def test_training_runs_and_greedy_takes_the_most_probable_action():
    make = lambda s: gym.make("CartPole-v1")  # noqa: E731
    config = PPOConfig(n_envs=2, T=16, epochs=2, minibatch=16)
    agent, history = train_ppo(make, 64, config, seed=0)
    assert history["steps"] == [32, 64] and {"policy", "value"} <= history.keys()
    agent2, history2 = train_reinforce(make, 64, config, seed=0)
    assert len(history2["return"]) == 2
    s = np.array([0.01, -0.2, 0.03, 0.4], np.float32)
    with torch.no_grad():
        probs = agent.policy(torch.tensor(s)[None]).probs[0]
    assert greedy(agent)(s) == int(probs.argmax())


def test_early_stop_keeps_the_best_weights():
    make = lambda s: gym.make("CartPole-v1")  # noqa: E731
    config = PPOConfig(n_envs=2, T=40, epochs=1, minibatch=40)
    # every episode beats a target of 0: stop after the first rollout and its update,
    # which counts its steps, and come back to the weights from before that update
    agent, history = train_ppo(make, 800, config, seed=5, target=0.0, window=1)
    assert history["steps"] == [80] and len(history["policy"]) == 1
    torch.manual_seed(5)
    fresh = ActorCritic(4, 2)
    for p, q in zip(agent.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_input_fails_clearly():
    r, v, d, last = random_rollout()
    with pytest.raises(ValueError, match="values must have the shape of rewards"):
        gae(r, v[:-1], d, last)
    with pytest.raises(ValueError, match="last_value must have shape"):
        gae(r, v, d, last[:-1])
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        gae(r, v, d, last, lam=1.5)
    with pytest.raises(ValueError, match="dones must have the shape"):
        reward_to_go(r, d[:-1], 0.9)
    with pytest.raises(ValueError, match="obs_dim must be positive"):
        ActorCritic(0, 2)
    with pytest.raises(ValueError, match="lr must be in"):
        PPOConfig(lr=0.0)
    with pytest.raises(TypeError, match="make_env must be a callable"):
        train_ppo("CartPole-v1", 100)
    with pytest.raises(TypeError, match="config must be a PPOConfig"):
        train_ppo(lambda s: gym.make("CartPole-v1"), 100, config={"lr": 1e-3})
    with pytest.raises(ValueError, match="window must be positive"):
        train_ppo(lambda s: gym.make("CartPole-v1"), 100, window=0)
    with pytest.raises(ValueError, match="discrete actions"):
        train_ppo(lambda s: gym.make("Pendulum-v1"), 100)
