"""MDPs and DQN: Bellman equations and value iteration on a gridworld, then deep
Q-networks with experience replay and a target network, and their double and dueling
variants.

Chapter: ``book/rl/dqn.md``.

References:
- Bellman (1957), *Dynamic Programming*, and Sutton & Barto (2018), *Reinforcement
  Learning: An Introduction*, chapters 3-4 (MDPs, the Bellman equations, value
  iteration: :func:`value_iteration`, :func:`policy_evaluation`).
- Russell & Norvig (2020), *Artificial Intelligence: A Modern Approach*, chapter 17
  (the 4 x 3 world with slippery moves; :func:`gridworld` builds a variant with a
  discount and a step cost on every move).
- Watkins & Dayan (1992), *Q-learning* (the sampled Bellman optimality backup).
- Lin (1992), *Self-improving reactive agents based on reinforcement learning, planning
  and teaching* (experience replay: :class:`ReplayBuffer`).
- Mnih et al. (2015), *Human-level control through deep reinforcement learning* (DQN:
  replay, a target network, the clipped error: :func:`td_target`, :func:`dqn_loss`,
  :func:`train_dqn`).
- van Hasselt, Guez & Silver (2016), *Deep Reinforcement Learning with Double
  Q-learning* (``double=True`` in :func:`td_target`; the overestimation that
  :func:`value_bias` measures).
- Wang et al. (2016), *Dueling Network Architectures for Deep Reinforcement Learning*
  (:class:`DuelingQNetwork`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "RUSSELL_NORVIG",
    "MDP",
    "gridworld",
    "bellman_backup",
    "value_iteration",
    "greedy_policy",
    "policy_evaluation",
    "q_network",
    "DuelingQNetwork",
    "Transitions",
    "ReplayBuffer",
    "td_target",
    "huber",
    "dqn_loss",
    "DQNConfig",
    "DQNRun",
    "train_dqn",
    "value_bias",
]

# ---------------------------------------------------------------------------------
# 1. A Markov decision process small enough to solve exactly
# ---------------------------------------------------------------------------------

#: Russell & Norvig's 4 x 3 world, top row first: ``+`` the goal (+1), ``-`` the pit
#: (-1), ``#`` a wall, ``S`` the start.
RUSSELL_NORVIG = ("...+", ".#.-", "S...")
#: The four moves as (row, column) steps: up, right, down, left.
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))
ARROWS = "↑→↓←"


@dataclass
class MDP:
    """A finite MDP as tensors: ``P[s, a, s']`` the probability of moving from ``s`` to
    ``s'`` under action ``a``, ``R[s, a]`` the expected reward, ``gamma`` the discount.

    ``cells[s]`` is the grid position of state ``s`` and ``terminal[s]`` says whether
    the episode ends there (a terminal state loops on itself with reward 0).
    """

    P: Tensor  # (S, A, S)
    R: Tensor  # (S, A)
    gamma: float
    terminal: Tensor  # (S,) bool
    cells: list[tuple[int, int]] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]


def gridworld(
    layout: tuple[str, ...] = RUSSELL_NORVIG,
    slip: float = 0.2,
    step_reward: float = -0.04,
    gamma: float = 0.99,
) -> MDP:
    """The gridworld drawn by ``layout`` (rows of ``.``, ``S``, ``#``, ``+``, ``-``).

    A move goes the intended way with probability ``1 - slip`` and to either side with
    ``slip / 2`` each; a move into a wall or off the grid stays put. Every move costs
    ``step_reward``, the last one into a terminal cell included; entering ``+`` adds 1,
    entering ``-`` adds -1, and both end the episode. Unlike Russell & Norvig's
    original, which is undiscounted, values are discounted by ``gamma``. Returned in
    float64, so that the checks can compare to 1e-12.
    """
    check_number(slip, "slip", low=0, high=1)
    check_number(step_reward, "step_reward")
    check_number(gamma, "gamma", low=0, high=1, high_open=True)
    if not layout or any(len(row) != len(layout[0]) for row in layout):
        raise ValueError("layout must be a non-empty tuple of equally long rows")
    if set("".join(layout)) - set(".S#+-"):
        raise ValueError("layout may contain only '.', 'S', '#', '+' and '-'")
    cells = [
        (i, j) for i, row in enumerate(layout) for j, c in enumerate(row) if c != "#"
    ]
    index = {cell: s for s, cell in enumerate(cells)}
    bonus = {"+": 1.0, "-": -1.0}
    terminal = torch.tensor([layout[i][j] in bonus for i, j in cells])
    S, A = len(cells), len(MOVES)
    P = torch.zeros(S, A, S, dtype=torch.float64)
    R = torch.zeros(S, A, dtype=torch.float64)
    for s, (i, j) in enumerate(cells):
        for a in range(A):
            if terminal[s]:  # absorbing, no reward
                P[s, a, s] = 1.0
                continue
            sides = ((a + 1) % A, (a + 3) % A)
            for move, p in ((a, 1 - slip), (sides[0], slip / 2), (sides[1], slip / 2)):
                di, dj = MOVES[move]
                s2 = index.get((i + di, j + dj), s)  # a wall or the edge: stay
                P[s, a, s2] += p
                R[s, a] += p * (
                    step_reward + bonus.get(layout[cells[s2][0]][cells[s2][1]], 0.0)
                )
    return MDP(P, R, gamma, terminal, cells, (len(layout), len(layout[0])))


def bellman_backup(mdp: MDP, V: Tensor) -> Tensor:
    r"""The action values of acting once and then following the values ``V``:

    $Q(s, a) = R(s, a) + \gamma \sum_{s'} P(s' \mid s, a)\, V(s')$
    """
    return mdp.R + mdp.gamma * mdp.P @ V  # (S, A)


def value_iteration(
    mdp: MDP, tol: float = 1e-12, max_iter: int = 100_000
) -> tuple[Tensor, list[float]]:
    """Iterate the Bellman optimality backup from ``V = 0`` until no value moves by
    more than ``tol``; return ``V`` and the largest change of every sweep."""
    check_number(tol, "tol", low=0, low_open=True)
    check_positive_int(max_iter, "max_iter")
    return _value_iteration(mdp, tol, max_iter)


def _value_iteration(mdp: MDP, tol: float, max_iter: int) -> tuple[Tensor, list[float]]:
    r"""$V_{k+1}(s) = \max_a \big[R(s, a) + \gamma \sum_{s'} P(s' \mid s, a)\,
    V_k(s')\big]$, a $\gamma$-contraction: the error shrinks at least $\gamma$-fold
    per sweep."""
    V = torch.zeros(mdp.n_states, dtype=mdp.R.dtype)
    changes = []
    for _ in range(max_iter):
        V_next = bellman_backup(mdp, V).max(dim=1).values  # (S,)
        changes.append((V_next - V).abs().max().item())
        V = V_next
        if changes[-1] < tol:
            break
    return V, changes


def greedy_policy(mdp: MDP, V: Tensor) -> Tensor:
    """The action that is best one step ahead of ``V`` in every state, ``(S,)``."""
    return bellman_backup(mdp, V).argmax(dim=1)


def policy_evaluation(mdp: MDP, policy: Tensor) -> Tensor:
    r"""The exact values of a deterministic policy, from the Bellman equation as a
    linear system: $(I - \gamma P_\pi)\, V_\pi = R_\pi$."""
    check_tensor(policy, "policy", ndim=1)
    if policy.shape[0] != mdp.n_states or policy.is_floating_point():
        raise ValueError(
            f"policy must hold one integer action per state ({mdp.n_states}), got "
            f"shape {tuple(policy.shape)} and dtype {policy.dtype}"
        )
    if policy.min() < 0 or policy.max() >= mdp.n_actions:
        raise ValueError(f"policy's actions must lie in 0..{mdp.n_actions - 1}")
    return _policy_evaluation(mdp, policy)


def _policy_evaluation(mdp: MDP, policy: Tensor) -> Tensor:
    states = torch.arange(mdp.n_states)
    P_pi = mdp.P[states, policy]  # (S, S): where the policy's action leads
    R_pi = mdp.R[states, policy]  # (S,)
    I = torch.eye(mdp.n_states, dtype=P_pi.dtype)
    return torch.linalg.solve(I - mdp.gamma * P_pi, R_pi)


# ---------------------------------------------------------------------------------
# 2. Q-networks
# ---------------------------------------------------------------------------------


def q_network(n_obs: int, n_actions: int, hidden: int = 64) -> nn.Sequential:
    """An MLP from an observation to one value per action: two hidden ReLU layers,
    laid out as stable-baselines3's ``MlpPolicy`` so that weights copy over by name."""
    check_positive_int(n_obs, "n_obs")
    check_positive_int(n_actions, "n_actions")
    check_positive_int(hidden, "hidden")
    return nn.Sequential(
        nn.Linear(n_obs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_actions),
    )


class DuelingQNetwork(nn.Module):
    r"""Two heads on a shared trunk: a state value $V(s)$ and advantages $A(s, a)$,

    $Q(s, a) = V(s) + A(s, a) - \frac{1}{|\mathcal A|} \sum_{a'} A(s, a')$

    where subtracting the mean advantage makes the split unique (Wang et al., 2016).
    """

    def __init__(self, n_obs: int, n_actions: int, hidden: int = 64) -> None:
        super().__init__()
        for value, name in (
            (n_obs, "n_obs"),
            (n_actions, "n_actions"),
            (hidden, "hidden"),
        ):
            check_positive_int(value, name)
        self.trunk = nn.Sequential(
            nn.Linear(n_obs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.value = nn.Linear(hidden, 1)
        self.advantage = nn.Linear(hidden, n_actions)

    def forward(self, s: Tensor) -> Tensor:
        h = self.trunk(s)  # (B, hidden)
        V, A = self.value(h), self.advantage(h)  # (B, 1), (B, n_actions)
        return V + A - A.mean(dim=-1, keepdim=True)  # (B, n_actions)


# ---------------------------------------------------------------------------------
# 3. Experience replay
# ---------------------------------------------------------------------------------


class Transitions(NamedTuple):
    """A batch of transitions $(s, a, r, s', \\text{terminated})$."""

    obs: Tensor  # (B, n_obs)
    actions: Tensor  # (B,) int64
    rewards: Tensor  # (B,)
    next_obs: Tensor  # (B, n_obs)
    terminated: Tensor  # (B,) 1.0 where the episode ended in s'


class ReplayBuffer:
    """The last ``capacity`` transitions, overwritten oldest first; a batch is drawn
    uniformly with replacement (Lin, 1992). NumPy arrays, so that adding one
    transition per environment step is cheap."""

    def __init__(self, capacity: int, n_obs: int) -> None:
        check_positive_int(capacity, "capacity")
        check_positive_int(n_obs, "n_obs")
        self.capacity = capacity
        self.obs = np.zeros((capacity, n_obs), dtype=np.float32)
        self.next_obs = np.zeros((capacity, n_obs), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.pos, self.size = 0, 0

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: np.ndarray,
        action: int,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
    ) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, terminated
        self.pos = (i + 1) % self.capacity  # a ring: the oldest is overwritten next
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Transitions:
        return self[rng.integers(0, self.size, size=batch_size)]

    def __getitem__(self, index: np.ndarray) -> Transitions:
        return Transitions(
            *(
                torch.from_numpy(a[index])
                for a in (
                    self.obs,
                    self.actions,
                    self.rewards,
                    self.next_obs,
                    self.terminated,
                )
            )
        )


# ---------------------------------------------------------------------------------
# 4. The TD target and the loss
# ---------------------------------------------------------------------------------


def td_target(
    batch: Transitions,
    q_target: nn.Module,
    gamma: float,
    q_online: nn.Module | None = None,
) -> Tensor:
    r"""The target $y = r + \gamma\,(1 - \text{terminated})\,
    Q_{\bar\theta}(s', a^\star)$ of every transition, shape ``(B,)``.

    DQN lets the target network both choose and evaluate,
    $a^\star = \arg\max_a Q_{\bar\theta}(s', a)$; double DQN (pass ``q_online``) lets
    the online network choose, $a^\star = \arg\max_a Q_\theta(s', a)$, and the target
    network evaluate.
    """
    with torch.no_grad():  # y is a constant for the loss
        next_q = q_target(batch.next_obs)  # (B, A)
        chooser = next_q if q_online is None else q_online(batch.next_obs)  # (B, A)
        a_star = chooser.argmax(dim=1, keepdim=True)  # (B, 1)
        next_value = next_q.gather(1, a_star).squeeze(1)  # (B,)
        return batch.rewards + gamma * (1 - batch.terminated) * next_value


def huber(error: Tensor) -> Tensor:
    r"""$\tfrac12 \delta^2$ for $|\delta| \le 1$, $|\delta| - \tfrac12$ beyond: its
    gradient is the TD error clipped to $[-1, 1]$ (Mnih et al., 2015)."""
    small = error.abs() <= 1
    return torch.where(small, 0.5 * error**2, error.abs() - 0.5)


def dqn_loss(
    q_online: nn.Module,
    q_target: nn.Module,
    batch: Transitions,
    gamma: float,
    double: bool = False,
) -> Tensor:
    r"""The mean Huber loss between $Q_\theta(s, a)$ and the TD target $y$, which is
    held fixed: the gradient flows through $Q_\theta(s, a)$ only."""
    y = td_target(batch, q_target, gamma, q_online if double else None)  # (B,)
    q = q_online(batch.obs).gather(1, batch.actions[:, None]).squeeze(1)  # (B,)
    return huber(q - y).mean()


# ---------------------------------------------------------------------------------
# 5. Training
# ---------------------------------------------------------------------------------


@dataclass
class DQNConfig:
    """The hyperparameters of :func:`train_dqn`; ``steps`` counts environment steps.

    Exploration is epsilon-greedy, with epsilon falling linearly from ``eps_start``
    to ``eps_end`` over the first ``eps_fraction`` of the steps. The online network
    takes one gradient step every ``train_every`` environment steps once
    ``learning_starts`` transitions are stored; the target network copies it every
    ``target_every`` environment steps (as stable-baselines3 counts; Mnih et al. count
    gradient steps).
    """

    steps: int = 20_000
    gamma: float = 0.99
    lr: float = 1e-3
    batch_size: int = 64
    buffer_size: int = 50_000
    learning_starts: int = 1_000
    train_every: int = 1
    target_every: int = 500
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_fraction: float = 0.25
    hidden: int = 64
    max_grad_norm: float = 10.0
    double: bool = False
    dueling: bool = False

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "buffer_size",
            "learning_starts",
            "train_every",
            "target_every",
            "hidden",
        ):
            check_positive_int(getattr(self, name), name)
        check_number(self.gamma, "gamma", low=0, high=1, high_open=True)
        check_number(self.lr, "lr", low=0, low_open=True)
        check_number(self.eps_start, "eps_start", low=0, high=1)
        check_number(self.eps_end, "eps_end", low=0, high=1)
        check_number(self.eps_fraction, "eps_fraction", low=0, high=1, low_open=True)
        check_number(self.max_grad_norm, "max_grad_norm", low=0, low_open=True)
        for name in ("double", "dueling"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def epsilon(self, t: int) -> float:
        """The exploration rate at environment step ``t``."""
        progress = min(1.0, t / (self.eps_fraction * self.steps))
        return self.eps_start + progress * (self.eps_end - self.eps_start)


@dataclass
class DQNRun:
    """What :func:`train_dqn` returns: the trained online network, and the return of
    every training episode with the environment step at which it ended."""

    q_net: nn.Module
    episode_returns: list[float] = field(default_factory=list)
    episode_ends: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def policy(self, obs: np.ndarray) -> int:
        """The greedy action, for ``dlabc.envs.evaluate`` and ``film``."""
        with torch.no_grad():
            return int(self.q_net(torch.as_tensor(obs, dtype=torch.float32)).argmax())


def train_dqn(env: gym.Env, config: DQNConfig | None = None, seed: int = 0) -> DQNRun:
    """Train DQN (or double DQN, a dueling network: see ``config``) on ``env``, an
    environment with a vector observation and discrete actions."""
    config = DQNConfig() if config is None else config
    if not isinstance(config, DQNConfig):
        raise TypeError(f"config must be a DQNConfig, got {type(config).__name__}")
    if not isinstance(env, gym.Env):
        raise TypeError(f"env must be a gymnasium.Env, got {type(env).__name__}")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ValueError(f"env must have discrete actions, got {env.action_space}")
    if len(env.observation_space.shape or ()) != 1:
        raise ValueError(
            f"env must have vector observations, got {env.observation_space}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    torch.manual_seed(seed)
    n_obs, n_actions = env.observation_space.shape[0], int(env.action_space.n)
    make = DuelingQNetwork if config.dueling else q_network
    q_online = make(n_obs, n_actions, config.hidden)
    q_target = make(n_obs, n_actions, config.hidden)
    q_target.load_state_dict(q_online.state_dict())
    optimizer = torch.optim.Adam(q_online.parameters(), lr=config.lr, fused=True)
    buffer = ReplayBuffer(config.buffer_size, n_obs)
    rng = np.random.default_rng(seed)
    return _train(env, config, q_online, q_target, optimizer, buffer, rng, seed)


def _train(
    env: gym.Env,
    config: DQNConfig,
    q_online: nn.Module,
    q_target: nn.Module,
    optimizer: torch.optim.Optimizer,
    buffer: ReplayBuffer,
    rng: np.random.Generator,
    seed: int,
) -> DQNRun:
    run = DQNRun(q_online)
    obs, _ = env.reset(seed=seed)
    episode_return = 0.0
    for t in range(config.steps):
        # act epsilon-greedily with the online network
        if rng.random() < config.epsilon(t):
            action = int(rng.integers(env.action_space.n))
        else:
            action = run.policy(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        # a time limit is not a terminal state: its target still bootstraps
        buffer.add(obs, action, reward, next_obs, terminated)
        obs, episode_return = next_obs, episode_return + reward
        if terminated or truncated:
            run.episode_returns.append(episode_return)
            run.episode_ends.append(t + 1)
            obs, episode_return = env.reset()[0], 0.0
        # one gradient step on a batch of remembered transitions
        if t >= config.learning_starts and t % config.train_every == 0:
            batch = buffer.sample(config.batch_size, rng)
            loss = dqn_loss(q_online, q_target, batch, config.gamma, config.double)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(q_online.parameters(), config.max_grad_norm)
            optimizer.step()
            run.losses.append(loss.item())
        # the target network follows the online network, with a delay
        if t % config.target_every == 0:
            q_target.load_state_dict(q_online.state_dict())
    return run


# ---------------------------------------------------------------------------------
# 6. Overestimation: predicted values against the returns actually obtained
# ---------------------------------------------------------------------------------


def value_bias(
    q_net: nn.Module, env: gym.Env, gamma: float, episodes: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""Run ``episodes`` greedy episodes; return, for every state visited, the
    predicted value $Q(s_t, a_t)$ of the action taken and the discounted return
    $G_t = \sum_{k \ge 0} \gamma^k r_{t+k}$ that followed it.

    Only states whose return is fully observed count: in an episode cut by a time
    limit, the states whose remaining horizon is too short for $\gamma^k$ to vanish
    (below ``1e-3`` relative) are dropped.
    """
    check_number(gamma, "gamma", low=0, high=1, high_open=True)
    check_positive_int(episodes, "episodes")
    cut = int(np.ceil(np.log(1e-3) / np.log(gamma))) if gamma > 0 else 1
    predicted, returns = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        q_taken, rewards, done, truncated = [], [], False, False
        while not done:
            with torch.no_grad():
                q = q_net(torch.as_tensor(obs, dtype=torch.float32))
            action = int(q.argmax())
            q_taken.append(q[action].item())
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(float(reward))
            done = terminated or truncated
        G, g = np.zeros(len(rewards)), 0.0
        for t in reversed(range(len(rewards))):  # G_t = r_t + gamma G_{t+1}
            g = rewards[t] + gamma * g
            G[t] = g
        keep = len(rewards) - cut if truncated else len(rewards)
        predicted += q_taken[: max(keep, 0)]
        returns += list(G[: max(keep, 0)])
    return np.array(predicted), np.array(returns)
