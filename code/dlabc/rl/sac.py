"""Soft actor-critic: a squashed Gaussian policy, twin critics with target networks, and
an automatically tuned temperature.

Chapter: ``book/rl/sac.md``.

References:
- Haarnoja, Zhou, Abbeel & Levine (2018), *Soft Actor-Critic: Off-Policy Maximum Entropy
  Deep Reinforcement Learning with a Stochastic Actor* (the maximum-entropy objective,
  the soft Bellman target, the reparameterised policy loss, the tanh squashing and its
  log-probability correction, :func:`squashed_log_prob`, :class:`SquashedGaussianActor`,
  :meth:`SAC.update`).
- Haarnoja, Zhou, Hartikainen, Tucker, Ha, Tan, Kumar, Zhu, Gupta, Abbeel & Levine
  (2018), *Soft Actor-Critic Algorithms and Applications* (the temperature tuned to a
  target entropy, the twin critics without a separate value network).
- Fujimoto, van Hoof & Meger (2018), *Addressing Function Approximation Error in
  Actor-Critic Methods* (TD3: the minimum of two critics, :class:`Critic`).
- Lillicrap et al. (2016), *Continuous control with deep reinforcement learning* (DDPG:
  a replay buffer and slowly moving target networks, :func:`polyak_update`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "LOG_STD_MIN",
    "LOG_STD_MAX",
    "Linears",
    "mlp",
    "squashed_log_prob",
    "SquashedGaussianActor",
    "Critic",
    "Batch",
    "ReplayBuffer",
    "polyak_update",
    "SAC",
    "SACHistory",
    "train_sac",
]

#: The range the actor's log standard deviation is clipped to (that of the authors'
#: code): a Gaussian far narrower or wider than this is never useful, and the clip keeps
#: the log-probability finite.
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


# ---------------------------------------------------------------------------------
# 0. Several independent runs side by side
# ---------------------------------------------------------------------------------


class Linears(nn.Module):
    r"""``n_runs`` independent linear layers, one per run, applied in one batched
    product: ``(R, B, n_in)`` in, ``(R, B, n_out)`` out. Each is initialised like
    ``nn.Linear`` (uniform in $\pm 1/\sqrt{n_{in}}$)."""

    def __init__(self, n_runs: int, n_in: int, n_out: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(n_in)
        self.weight = nn.Parameter(
            torch.empty(n_runs, n_in, n_out).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(n_runs, 1, n_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)  # (R, B, n_out)


def mlp(n_runs: int, n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    """``n_runs`` independent MLPs with two hidden layers of ``hidden`` ReLU units."""
    return nn.Sequential(
        Linears(n_runs, n_in, hidden),
        nn.ReLU(),
        Linears(n_runs, hidden, hidden),
        nn.ReLU(),
        Linears(n_runs, hidden, n_out),
    )


# ---------------------------------------------------------------------------------
# 1. The squashed Gaussian policy
# ---------------------------------------------------------------------------------


def squashed_log_prob(
    u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    r"""The log-density of the action $a = b + c \tanh(u)$, $u \sim \mathcal N(\mu,
    \sigma^2)$, by the change of variables, with
    $\log(1 - \tanh^2 u) = 2\,(\log 2 - u - \operatorname{softplus}(-2u))$ so that it
    stays finite where $\tanh u$ rounds to $\pm 1$. Shapes: ``(..., A)`` in, ``(...)``
    out."""
    # log N(u; mu, sigma^2), one term per action dimension
    z = (u - mean) / log_std.exp()
    gaussian = -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)
    # log |da/du| = log c + log(1 - tanh^2 u): the Jacobian of the squashing is diagonal
    log_det = scale.log() + 2 * (math.log(2) - u - F.softplus(-2 * u))
    return (gaussian - log_det).sum(-1)


class SquashedGaussianActor(nn.Module):
    r"""The policy $\pi_\phi(a \mid s)$: a network gives the mean $\mu$ and the log
    standard deviation $\log\sigma$ of a Gaussian; a sample $u = \mu + \sigma
    \epsilon$ is squashed by $\tanh$ into $(-1, 1)$ and stretched to the action box
    $[b - c, b + c]$ (centre $b$, half-width $c$).

    Drawing $\epsilon \sim \mathcal N(0, I)$ outside the network (the
    reparameterisation trick) lets the actor's loss backpropagate through the action.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: int = 64,
        low: float | np.ndarray = -1.0,
        high: float | np.ndarray = 1.0,
        n_runs: int = 1,
    ) -> None:
        super().__init__()
        for value, name in ((obs_dim, "obs_dim"), (act_dim, "act_dim")):
            check_positive_int(value, name)
        check_positive_int(hidden, "hidden")
        check_positive_int(n_runs, "n_runs")
        low_t = torch.as_tensor(low, dtype=torch.float32).expand(act_dim).clone()
        high_t = torch.as_tensor(high, dtype=torch.float32).expand(act_dim).clone()
        if not (torch.isfinite(low_t).all() and torch.isfinite(high_t).all()):
            raise ValueError("low and high must be finite: SAC squashes into a box")
        if not (high_t > low_t).all():
            raise ValueError(f"high must exceed low, got low={low}, high={high}")
        self.obs_dim, self.act_dim, self.n_runs = obs_dim, act_dim, n_runs
        self.trunk = mlp(n_runs, obs_dim, 2 * act_dim, hidden)  # mean and log_std
        self.register_buffer("scale", (high_t - low_t) / 2)  # c, (A,)
        self.register_buffer("bias", (high_t + low_t) / 2)  # b, (A,)

    def forward(
        self, obs: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions ``(R, B, act_dim)`` and their log-probabilities ``(R, B)`` for the
        observations ``obs`` ``(R, B, obs_dim)``; ``deterministic``: the squashed mean
        (the policy that is evaluated), with the log-density at that point."""
        check_tensor(obs, "obs", ndim=3, floating=True)
        if obs.shape[0] != self.n_runs or obs.shape[2] != self.obs_dim:
            raise ValueError(
                f"obs must have shape (n_runs={self.n_runs}, B, obs_dim={self.obs_dim}), "
                f"got {tuple(obs.shape)}"
            )
        return self._sample(obs, deterministic)

    def _sample(
        self, obs: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.trunk(obs).chunk(2, dim=-1)  # (R, B, A) each
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        # u = mu + sigma * eps: the reparameterisation trick
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        action = self.bias + self.scale * torch.tanh(u)  # (R, B, A), inside the box
        return action, squashed_log_prob(u, mean, log_std, self.scale)


# ---------------------------------------------------------------------------------
# 2. Critics, replay, target networks
# ---------------------------------------------------------------------------------


class Critic(nn.Module):
    r"""Two soft Q-functions $Q_{\theta_1}, Q_{\theta_2}$ of the same state and action,
    trained on the same targets from different initial weights; the minimum of the two
    counters the overestimation that maximising over a learned $Q$ causes.

    The two are stored as one stack of ``2 * n_runs`` independent networks (first all
    runs' $Q_1$, then all runs' $Q_2$), so that both are computed in one pass."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 64, n_runs: int = 1):
        super().__init__()
        for value, name in ((obs_dim, "obs_dim"), (act_dim, "act_dim")):
            check_positive_int(value, name)
        check_positive_int(hidden, "hidden")
        self.n_runs = check_positive_int(n_runs, "n_runs")
        self.q = mlp(2 * n_runs, obs_dim + act_dim, 1, hidden)

    def forward(
        self, obs: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """$Q_1(s, a)$ and $Q_2(s, a)$, each ``(R, B)``."""
        sa = torch.cat([obs, action], dim=-1)  # (R, B, obs_dim + act_dim)
        q = self.q(sa.repeat(2, 1, 1)).squeeze(-1)  # (2R, B)
        return q[: self.n_runs], q[self.n_runs :]


@dataclass
class Batch:
    """Transitions $(s, a, r, s', d)$, one mini-batch per run; ``done`` is 1 only
    where the episode *ended* in a terminal state, not where a time limit cut it."""

    obs: torch.Tensor  # (R, B, obs_dim)
    action: torch.Tensor  # (R, B, act_dim)
    reward: torch.Tensor  # (R, B)
    next_obs: torch.Tensor  # (R, B, obs_dim)
    done: torch.Tensor  # (R, B), 1.0 at a terminal state


class ReplayBuffer:
    """The last ``capacity`` transitions of each of ``n_runs`` runs, the oldest
    overwritten first; :meth:`sample` draws a uniform mini-batch for every run."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, n_runs: int = 1):
        for value, name in ((obs_dim, "obs_dim"), (act_dim, "act_dim")):
            check_positive_int(value, name)
        self.capacity = check_positive_int(capacity, "capacity")
        self.n_runs = check_positive_int(n_runs, "n_runs")
        self.obs = torch.zeros(n_runs, capacity, obs_dim)
        self.action = torch.zeros(n_runs, capacity, act_dim)
        self.reward = torch.zeros(n_runs, capacity)
        self.next_obs = torch.zeros(n_runs, capacity, obs_dim)
        self.done = torch.zeros(n_runs, capacity)
        self.position, self.size = 0, 0

    def add(self, obs, action, reward, next_obs, done) -> None:
        """Store one transition of every run: arrays or tensors with ``n_runs`` rows
        (``obs`` ``(R, obs_dim)``, ``action`` ``(R, act_dim)``, ``reward`` and ``done``
        ``(R,)``)."""
        i = self.position
        for store, value in (
            (self.obs, obs),
            (self.action, action),
            (self.reward, reward),
            (self.next_obs, next_obs),
            (self.done, done),
        ):
            value = torch.as_tensor(np.asarray(value), dtype=torch.float32)
            if value.shape != store[:, i].shape:
                raise ValueError(
                    f"expected a transition part of shape {tuple(store[:, i].shape)}, "
                    f"got {tuple(value.shape)}"
                )
            store[:, i] = value
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def __len__(self) -> int:
        return self.size

    def get(self, index: torch.Tensor) -> Batch:
        """The transitions at ``index`` ``(R, B)`` (int64), run by run."""
        runs = torch.arange(self.n_runs).unsqueeze(1)  # (R, 1)
        return Batch(
            self.obs[runs, index],
            self.action[runs, index],
            self.reward[runs, index],
            self.next_obs[runs, index],
            self.done[runs, index],
        )

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Batch:
        """``batch_size`` transitions per run, drawn uniformly with replacement."""
        check_positive_int(batch_size, "batch_size")
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        shape = (self.n_runs, batch_size)
        return self.get(torch.randint(0, self.size, shape, generator=generator))


def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    r"""Move every target weight a step ``tau`` towards the source's:
    $\bar\theta \leftarrow (1 - \tau)\,\bar\theta + \tau\,\theta$."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.lerp_(s, tau)


# ---------------------------------------------------------------------------------
# 3. The agent
# ---------------------------------------------------------------------------------


class SAC:
    r"""Soft actor-critic: the actor, the twin critics and their targets, the
    temperature $\alpha = e^{\log\alpha}$, and an Adam optimizer for each.

    ``n_runs`` independent agents are trained side by side (each tensor has a leading
    dimension ``R``; each loss is the sum over runs of the run's own mean, so every run
    gets exactly its own gradient and Adam step). ``target_entropy`` defaults to
    $-\dim\mathcal A + \sum_i \log c_i$ ($c$: the box's half-widths): the heuristic
    $-\dim\mathcal A$ of Haarnoja et al. for the entropy of the actions rescaled to
    $[-1, 1]$, which is what their code and stable-baselines3 measure; our
    $\log\pi$ is the density of the actions themselves, larger by $\sum_i \log c_i$.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        low: float | np.ndarray = -1.0,
        high: float | np.ndarray = 1.0,
        *,
        n_runs: int = 1,
        hidden: int = 64,
        lr: float = 1e-3,
        gamma: float = 0.99,
        tau: float = 0.005,
        init_alpha: float = 1.0,
        target_entropy: float | None = None,
    ) -> None:
        check_number(lr, "lr", low=0, low_open=True)
        self.gamma = check_number(gamma, "gamma", low=0, high=1)
        self.tau = check_number(tau, "tau", low=0, high=1, low_open=True)
        check_number(init_alpha, "init_alpha", low=0, low_open=True)
        self.actor = SquashedGaussianActor(obs_dim, act_dim, hidden, low, high, n_runs)
        self.critic = Critic(obs_dim, act_dim, hidden, n_runs)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.full((n_runs,), math.log(init_alpha), requires_grad=True)
        self.target_entropy = (
            -act_dim + self.actor.scale.log().sum().item()
            if target_entropy is None
            else check_number(target_entropy, "target_entropy")
        )
        self.n_runs = n_runs
        self.actor_optimizer = torch.optim.Adam(
            self.actor.parameters(), lr=lr, fused=True
        )
        self.critic_optimizer = torch.optim.Adam(
            self.critic.parameters(), lr=lr, fused=True
        )
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=lr, fused=True)

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        """$J_Q$: both critics regress on the soft Bellman target $y$."""
        alpha = self.log_alpha.exp().detach().unsqueeze(1)  # (R, 1)
        with torch.no_grad():  # y comes from the target critics and a' ~ pi(s')
            next_action, next_log_prob = self.actor._sample(batch.next_obs)
            q1_next, q2_next = self.critic_target(batch.next_obs, next_action)
            soft_value = torch.min(q1_next, q2_next) - alpha * next_log_prob
            y = batch.reward + self.gamma * (1 - batch.done) * soft_value  # (R, B)
        q1, q2 = self.critic(batch.obs, batch.action)
        return 0.5 * ((q1 - y) ** 2 + (q2 - y) ** 2).mean(1).sum()

    def actor_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$J_\pi$, through reparameterised actions $a \sim \pi(\cdot \mid s)$; also
        returns their $\log\pi(a \mid s)$ ``(R, B)`` for the temperature."""
        alpha = self.log_alpha.exp().detach().unsqueeze(1)  # (R, 1)
        action, log_prob = self.actor._sample(batch.obs)
        q_pi = torch.min(*self.critic(batch.obs, action))
        return (alpha * log_prob - q_pi).mean(1).sum(), log_prob.detach()

    def alpha_loss(self, log_prob: torch.Tensor) -> torch.Tensor:
        r"""$J(\alpha)$: its gradient raises $\alpha$ while the entropy $-\log\pi$ is
        below the target $\bar{\mathcal H}$, and lowers it while above."""
        log_alpha = self.log_alpha.unsqueeze(1)  # (R, 1)
        return -(log_alpha * (log_prob + self.target_entropy)).mean(1).sum()

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One gradient step on the critics, then the actor, then the temperature, then
        the target critics' Polyak step; returns the mean log-probability per run."""
        critic_loss = self.critic_loss(batch)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()

        actor_loss, log_prob = self.actor_loss(batch)
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()

        alpha_loss = self.alpha_loss(log_prob)
        self.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        self.alpha_optimizer.step()

        polyak_update(self.critic_target, self.critic, self.tau)
        return {"log_prob": log_prob.mean(1)}

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """One action per run for one observation per run: ``(R, obs_dim)`` in,
        ``(R, act_dim)`` out (NumPy)."""
        obs_t = torch.as_tensor(np.array(obs, dtype=np.float32))
        action, _ = self.actor(obs_t.reshape(self.n_runs, 1, -1), deterministic)
        return action[:, 0].numpy()

    def policy(self, run: int = 0) -> Callable[[np.ndarray], np.ndarray]:
        r"""Run ``run``'s deterministic policy $a = b + c \tanh(\mu(s))$, as a function
        of one observation (what :func:`dlabc.envs.evaluate` expects)."""
        if not 0 <= run < self.n_runs:
            raise ValueError(f"run must be in 0..{self.n_runs - 1}, got {run}")

        def act(obs: np.ndarray) -> np.ndarray:
            many = np.broadcast_to(
                np.asarray(obs, dtype=np.float32), (self.n_runs, obs.size)
            )
            return self.act(many, deterministic=True)[run]

        return act


# ---------------------------------------------------------------------------------
# 4. Training
# ---------------------------------------------------------------------------------


@dataclass
class SACHistory:
    r"""What :func:`train_sac` recorded: per run, the return of every finished episode
    and the environment step it ended at; per update, the temperature and the entropy
    estimate $-\overline{\log\pi}$ of every run."""

    episode_returns: list[list[float]]
    episode_ends: list[list[int]]
    update_steps: list[int] = field(default_factory=list)
    alpha: list[np.ndarray] = field(default_factory=list)
    entropy: list[np.ndarray] = field(default_factory=list)


def train_sac(
    make_env: Callable[[int], object],
    steps: int,
    *,
    seeds: tuple[int, ...] = (0,),
    learning_starts: int = 500,
    update_every: int = 1,
    batch_size: int = 128,
    buffer_size: int = 100_000,
    **agent_options: object,
) -> tuple[SAC, SACHistory]:
    """Train one SAC agent per seed, side by side, for ``steps`` environment steps each,
    on the environments ``make_env(seed)`` builds. Uniform random actions for the
    first ``learning_starts`` steps, then the policy's; from then on one update every
    ``update_every`` steps. ``agent_options`` go to :class:`SAC`."""
    check_positive_int(steps, "steps")
    check_positive_int(learning_starts, "learning_starts")
    check_positive_int(update_every, "update_every")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    torch.manual_seed(seeds[0])
    envs = [make_env(seed) for seed in seeds]
    obs_dim = int(np.prod(envs[0].observation_space.shape))
    act_dim = int(np.prod(envs[0].action_space.shape))
    low, high = envs[0].action_space.low, envs[0].action_space.high
    agent = SAC(obs_dim, act_dim, low, high, n_runs=len(seeds), **agent_options)
    buffer = ReplayBuffer(obs_dim, act_dim, min(buffer_size, steps), len(seeds))
    generator = torch.Generator().manual_seed(seeds[0])
    history = SACHistory([[] for _ in seeds], [[] for _ in seeds])
    loop = _Loop(envs, agent, buffer, history, generator)
    loop.run(steps, learning_starts, update_every, batch_size)
    return agent, history


class _Loop:
    """The interaction loop of :func:`train_sac`, over several environments."""

    def __init__(self, envs, agent, buffer, history, generator):
        self.envs, self.agent, self.buffer = envs, agent, buffer
        self.history, self.generator = history, generator

    def run(self, steps, learning_starts, update_every, batch_size):
        envs, history = self.envs, self.history
        obs = np.stack([env.reset()[0] for env in envs])  # (R, obs_dim)
        returns = np.zeros(len(envs))
        for t in range(1, steps + 1):
            if t <= learning_starts:  # explore uniformly at first
                action = np.stack([env.action_space.sample() for env in envs])
            else:
                action = self.agent.act(obs)  # (R, act_dim)
            next_obs, reward, terminated = np.empty_like(obs), np.empty(len(envs)), []
            for k, env in enumerate(envs):
                next_obs[k], reward[k], term, trunc, _ = env.step(action[k])
                terminated.append(term)
                returns[k] += reward[k]
                if term or trunc:
                    history.episode_returns[k].append(float(returns[k]))
                    history.episode_ends[k].append(t)
                    returns[k] = 0.0
            # a time limit is not a terminal state: the target bootstraps through it
            self.buffer.add(obs, action, reward, next_obs, terminated)
            obs = next_obs.copy()
            for k, env in enumerate(envs):
                if history.episode_ends[k] and history.episode_ends[k][-1] == t:
                    obs[k] = env.reset()[0]
            if t >= learning_starts and t % update_every == 0:
                info = self.agent.update(self.buffer.sample(batch_size, self.generator))
                history.update_steps.append(t)
                history.alpha.append(self.agent.log_alpha.exp().detach().numpy())
                history.entropy.append(-info["log_prob"].numpy())
