"""Tests for ``dlabc.rl.dqn``.

Value iteration's fixed point equals NumPy's solve of the Bellman equation of its
greedy policy, and the best of all deterministic policies found by enumeration; each
sweep shrinks the change at least gamma-fold. The Q-network and the DQN loss, target
and gradient step equal stable-baselines3's ``DQN.train`` on the same batch (fed
through SB3's own replay buffer) with copied weights; the double-DQN target equals a
loop over the batch, the dueling head its closed form, the Huber loss PyTorch's. The
replay buffer holds what SB3's holds after the same additions, and sampling is
uniform. Training runs, is reproducible and logs consistent episodes; the value bias
of a constant network is the closed-form discounted return. Bad input fails with a
clear message.
"""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlabc import envs
from dlabc.rl.dqn import (
    RUSSELL_NORVIG,
    DQNConfig,
    DuelingQNetwork,
    ReplayBuffer,
    Transitions,
    bellman_backup,
    dqn_loss,
    greedy_policy,
    gridworld,
    huber,
    policy_evaluation,
    q_network,
    td_target,
    train_dqn,
    value_bias,
    value_iteration,
)

# --- the MDP ---------------------------------------------------------------------------


def test_gridworld_transitions_are_probabilities_with_slip():
    mdp = gridworld(slip=0.2, step_reward=-0.04)
    assert mdp.P.shape == (11, 4, 11) and mdp.R.shape == (11, 4)
    torch.testing.assert_close(mdp.P.sum(-1), torch.ones(11, 4, dtype=torch.float64))
    start = mdp.cells.index((2, 0))
    up, right = mdp.cells.index((1, 0)), mdp.cells.index((2, 1))
    # up from the start: 0.8 up, 0.1 right, 0.1 left into the edge (stay)
    assert mdp.P[start, 0, up] == pytest.approx(0.8)
    assert mdp.P[start, 0, right] == pytest.approx(0.1)
    assert mdp.P[start, 0, start] == pytest.approx(0.1)
    assert mdp.R[start, 0] == pytest.approx(-0.04)
    # next to the goal: moving right enters it with 0.8
    beside = mdp.cells.index((0, 2))
    assert mdp.R[beside, 1] == pytest.approx(-0.04 + 0.8 * 1.0)
    goal = mdp.cells.index((0, 3))
    assert mdp.terminal[goal] and mdp.P[goal, :, goal].eq(1).all()
    assert mdp.R[goal].eq(0).all()


def numpy_policy_values(mdp, policy):
    """The Bellman equation of a policy solved by NumPy, independently of torch."""
    P, R = mdp.P.numpy(), mdp.R.numpy()
    s = np.arange(mdp.n_states)
    return np.linalg.solve(
        np.eye(mdp.n_states) - mdp.gamma * P[s, policy], R[s, policy]
    )


def test_value_iteration_fixed_point_solves_the_bellman_equation_of_its_policy():
    mdp = gridworld(gamma=0.95)
    V, changes = value_iteration(mdp, tol=1e-13)
    pi = greedy_policy(mdp, V)
    exact = numpy_policy_values(mdp, pi.numpy())
    np.testing.assert_allclose(V.numpy(), exact, atol=1e-10)
    np.testing.assert_allclose(policy_evaluation(mdp, pi).numpy(), exact, atol=1e-12)
    # the Bellman optimality equation holds at the fixed point
    torch.testing.assert_close(
        bellman_backup(mdp, V).max(1).values, V, atol=1e-12, rtol=0
    )
    # every sweep is a gamma-contraction of the change
    c = np.array(changes)
    assert np.all(c[1:] <= mdp.gamma * c[:-1] + 1e-15)


def test_value_iteration_finds_the_best_of_all_deterministic_policies():
    mdp = gridworld(("S.+", ".#-"), slip=0.3, gamma=0.9)
    V, _ = value_iteration(mdp)
    values = np.array(
        [
            numpy_policy_values(mdp, np.array(pi))
            for pi in itertools.product(range(4), repeat=mdp.n_states)
        ]
    )
    np.testing.assert_allclose(V.numpy(), values.max(axis=0), atol=1e-9)
    assert np.all(values <= V.numpy() + 1e-9)  # V* dominates every policy


def test_policy_evaluation_equals_iterative_evaluation():
    mdp = gridworld(gamma=0.9)
    pi = torch.tensor([1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    V = np.zeros(mdp.n_states)
    P, R, s = mdp.P.numpy(), mdp.R.numpy(), np.arange(mdp.n_states)
    for _ in range(2000):
        V = R[s, pi] + mdp.gamma * P[s, pi] @ V
    np.testing.assert_allclose(policy_evaluation(mdp, pi).numpy(), V, atol=1e-10)


# --- Q-networks, the target and the loss against stable-baselines3 ----------------------


def random_batch(n=32, n_obs=4, n_actions=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Transitions(
        obs=torch.randn(n, n_obs, generator=g),
        actions=torch.randint(0, n_actions, (n,), generator=g),
        rewards=torch.randn(n, generator=g),
        next_obs=torch.randn(n, n_obs, generator=g),
        terminated=(torch.rand(n, generator=g) < 0.3).float(),
    )


def sb3_dqn_on(batch, ours, target, lr, gamma):
    """SB3's DQN with our weights, its replay buffer holding exactly ``batch``."""
    from stable_baselines3 import DQN
    from stable_baselines3.common.logger import Logger

    n = len(batch.rewards)
    model = DQN(
        "MlpPolicy",
        envs.make("CartPole-v1"),
        learning_rate=lr,
        gamma=gamma,
        batch_size=n,
        buffer_size=n,
        policy_kwargs={"net_arch": [64, 64]},
        device="cpu",
    )
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.q_net.q_net.load_state_dict(ours.state_dict())
    model.q_net_target.q_net.load_state_dict(target.state_dict())
    for i in range(n):
        model.replay_buffer.add(
            batch.obs[i].numpy()[None],
            batch.next_obs[i].numpy()[None],
            batch.actions[i].numpy()[None],
            batch.rewards[i].numpy()[None],
            batch.terminated[i].numpy()[None],
            [{}],
        )
    buffer = model.replay_buffer  # the whole buffer, in order, as its one batch
    buffer.sample = lambda size, env=None: buffer._get_samples(np.arange(size))
    return model


def test_q_network_matches_sb3_q_network_with_copied_weights():
    torch.manual_seed(0)
    ours, target = q_network(4, 2), q_network(4, 2)
    batch = random_batch()
    model = sb3_dqn_on(batch, ours, target, 1e-3, 0.99)
    torch.testing.assert_close(ours(batch.obs), model.q_net(batch.obs), rtol=0, atol=0)


def test_loss_and_gradient_step_equal_sb3_dqn_train_on_the_same_batch():
    torch.manual_seed(1)
    ours, target = q_network(4, 2), q_network(4, 2)
    batch = random_batch(48)
    lr, gamma = 3e-3, 0.97
    model = sb3_dqn_on(batch, ours, target, lr, gamma)
    model.train(gradient_steps=1, batch_size=48)
    loss = dqn_loss(ours, target, batch, gamma)
    assert loss.item() == pytest.approx(
        model.logger.name_to_value["train/loss"], rel=1e-6
    )
    optimizer = torch.optim.Adam(ours.parameters(), lr=lr)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ours.parameters(), 10.0)
    optimizer.step()
    for name, p in model.q_net.q_net.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], p, rtol=0, atol=1e-6)


def test_dqn_target_is_the_max_of_the_target_network():
    torch.manual_seed(2)
    net = q_network(4, 3).double()
    batch = Transitions(
        *(t.double() if t.is_floating_point() else t for t in random_batch(n_actions=3))
    )
    y = td_target(batch, net, 0.9)
    by_hand = [
        batch.rewards[i]
        + 0.9 * (1 - batch.terminated[i]) * net(batch.next_obs[i]).max()
        for i in range(len(y))
    ]
    torch.testing.assert_close(y, torch.stack(by_hand).detach())


def test_double_dqn_target_lets_the_online_network_choose():
    torch.manual_seed(3)
    online, target = q_network(4, 3).double(), q_network(4, 3).double()
    batch = Transitions(
        *(t.double() if t.is_floating_point() else t for t in random_batch(n_actions=3))
    )
    y = td_target(batch, target, 0.9, q_online=online)
    for i in range(len(y)):
        with torch.no_grad():
            a = int(np.argmax(online(batch.next_obs[i]).numpy()))
            value = target(batch.next_obs[i])[a].item()
        expected = (
            batch.rewards[i].item() + 0.9 * (1 - batch.terminated[i].item()) * value
        )
        assert y[i].item() == pytest.approx(expected, abs=1e-12)
    # the online network choosing differently from the target must change some target
    assert not torch.allclose(y, td_target(batch, target, 0.9))
    # and the loss uses it, with no gradient through the target
    loss = dqn_loss(online, target, batch, 0.9, double=True)
    q = online(batch.obs).gather(1, batch.actions[:, None]).squeeze(1)
    torch.testing.assert_close(loss, F.huber_loss(q, y, delta=1.0))


def test_huber_equals_torch_and_its_gradient_is_the_clipped_error():
    error = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        huber(error),
        F.huber_loss(error, torch.zeros_like(error), reduction="none", delta=1.0),
    )
    huber(error).sum().backward()
    torch.testing.assert_close(error.grad, error.detach().clamp(-1, 1))


def test_dueling_head_is_value_plus_centred_advantage():
    torch.manual_seed(4)
    net = DuelingQNetwork(4, 3, hidden=16).double()
    s = torch.randn(7, 4, dtype=torch.float64)
    with torch.no_grad():
        h = net.trunk(s).numpy()
        V = h @ net.value.weight.numpy().T + net.value.bias.numpy()
        A = h @ net.advantage.weight.numpy().T + net.advantage.bias.numpy()
        Q = net(s).numpy()
    np.testing.assert_allclose(Q, V + A - A.mean(1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(Q.mean(1), V[:, 0], atol=1e-12)  # mean Q is the value


# --- the replay buffer ----------------------------------------------------------------


def test_replay_buffer_holds_what_sb3_buffer_holds():
    from stable_baselines3.common.buffers import ReplayBuffer as SB3Buffer

    env = envs.make("CartPole-v1")
    theirs = SB3Buffer(5, env.observation_space, env.action_space, device="cpu")
    ours = ReplayBuffer(5, 4)
    rng = np.random.default_rng(0)
    for _ in range(8):  # wraps around: the first three are overwritten
        obs, next_obs = rng.normal(size=(2, 4)).astype(np.float32)
        a, r, done = int(rng.integers(2)), float(rng.normal()), bool(rng.random() < 0.5)
        ours.add(obs, a, r, next_obs, done)
        theirs.add(
            obs[None],
            next_obs[None],
            np.array([a]),
            np.array([r]),
            np.array([done]),
            [{}],
        )
    assert len(ours) == 5 and ours.pos == theirs.pos
    np.testing.assert_array_equal(ours.obs, theirs.observations[:, 0])
    np.testing.assert_array_equal(ours.next_obs, theirs.next_observations[:, 0])
    np.testing.assert_array_equal(ours.actions, theirs.actions[:, 0, 0])
    np.testing.assert_array_equal(ours.rewards, theirs.rewards[:, 0])
    np.testing.assert_array_equal(ours.terminated, theirs.dones[:, 0])


def test_replay_buffer_samples_uniformly_from_what_it_holds():
    buffer = ReplayBuffer(100, 1)
    for i in range(30):
        buffer.add(np.array([i]), 0, float(i), np.array([i + 1]), False)
    batch = buffer.sample(30_000, np.random.default_rng(0))
    counts = np.bincount(batch.rewards.numpy().astype(int), minlength=30)
    assert len(counts) == 30  # nothing beyond what was added
    assert counts.min() > 800 and counts.max() < 1200  # 1000 expected, sd about 31
    torch.testing.assert_close(batch.next_obs[:, 0], batch.obs[:, 0] + 1)


# --- training and the value bias -------------------------------------------------------


def test_train_dqn_runs_logs_episodes_and_is_reproducible():
    config = DQNConfig(steps=200, learning_starts=100, train_every=2, target_every=50)
    runs = [train_dqn(envs.make("CartPole-v1"), config, seed=5) for _ in range(2)]
    run = runs[0]
    ends = np.array(run.episode_ends)
    # CartPole pays 1 per step: an episode's return is its length
    np.testing.assert_array_equal(run.episode_returns, np.diff(ends, prepend=0))
    assert len(run.losses) == len(range(100, 200, 2))
    assert run.episode_returns == runs[1].episode_returns
    obs = np.array([0.1, -0.2, 0.03, 0.4], dtype=np.float32)  # the greedy action
    assert run.policy(obs) == int(run.q_net(torch.from_numpy(obs)).argmax())
    assert run.losses == runs[1].losses
    for p, q in zip(run.q_net.parameters(), runs[1].q_net.parameters(), strict=True):
        assert torch.equal(p, q)
    dueling = train_dqn(
        envs.make("CartPole-v1"),
        DQNConfig(steps=100, learning_starts=60, dueling=True, double=True),
    )
    assert isinstance(dueling.q_net, DuelingQNetwork) and len(dueling.losses) == 40


def test_epsilon_falls_linearly_then_stays():
    config = DQNConfig(steps=1000, eps_start=1.0, eps_end=0.1, eps_fraction=0.2)
    assert config.epsilon(0) == 1.0
    assert config.epsilon(100) == pytest.approx(0.55)
    assert config.epsilon(200) == pytest.approx(0.1) and config.epsilon(
        999
    ) == pytest.approx(0.1)


class Constant(torch.nn.Module):
    def forward(self, s):
        return torch.full((*s.shape[:-1], 2), 7.0)


def test_value_bias_of_a_constant_network_against_the_closed_form_return():
    gamma = 0.9
    predicted, returns = value_bias(
        Constant(), envs.make("CartPole-v1"), gamma, episodes=3
    )
    assert np.all(predicted == 7.0)
    # always action 0: short episodes that terminate; G_t = (1 - gamma^(T - t)) / (1 - gamma)
    lengths, env = [], envs.make("CartPole-v1")
    for k in range(3):
        env.reset(seed=k)
        T, done = 0, False
        while not done:
            _, _, terminated, truncated, _ = env.step(0)
            T, done = T + 1, terminated or truncated
        lengths.append(T)
    expected = np.concatenate(
        [(1 - gamma ** (T - np.arange(T))) / (1 - gamma) for T in lengths]
    )
    np.testing.assert_allclose(returns, expected, rtol=1e-12)


# --- bad input ------------------------------------------------------------------------


def test_bad_input_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="slip must be in"):
        gridworld(slip=1.5)
    with pytest.raises(ValueError, match="layout may contain only"):
        gridworld(("S.x",))
    with pytest.raises(ValueError, match="equally long rows"):
        gridworld(("S..", "."))
    with pytest.raises(ValueError, match="gamma must be in"):
        gridworld(gamma=1.0)
    mdp = gridworld(RUSSELL_NORVIG)
    with pytest.raises(ValueError, match="one integer action per state"):
        policy_evaluation(mdp, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="actions must lie in"):
        policy_evaluation(mdp, torch.full((11,), 4))
    with pytest.raises(ValueError, match="tol must be in"):
        value_iteration(mdp, tol=0.0)
    with pytest.raises(ValueError, match="capacity must be positive"):
        ReplayBuffer(0, 4)
    with pytest.raises(ValueError, match="gamma must be in"):
        DQNConfig(gamma=1.0)
    with pytest.raises(TypeError, match="double must be a bool"):
        DQNConfig(double=1)
    with pytest.raises(ValueError, match="discrete actions"):
        train_dqn(envs.make("Pendulum-v1"), DQNConfig(steps=10))
    with pytest.raises(TypeError, match="env must be a gymnasium.Env"):
        train_dqn("CartPole-v1")
    with pytest.raises(TypeError, match="hidden must be an int"):
        DuelingQNetwork(4, 2, hidden=2.5)
    with pytest.raises(ValueError, match="episodes must be positive"):
        value_bias(Constant(), gym.make("CartPole-v1"), 0.9, episodes=0)
