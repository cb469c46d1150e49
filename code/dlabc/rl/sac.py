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
    "squashed_log_prob",
    "SquashedGaussianActor",
    "Critic",
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


def mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    """Two hidden layers of ``hidden`` ReLU units."""
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_out),
    )


# ---------------------------------------------------------------------------------
# 1. The squashed Gaussian policy
# ---------------------------------------------------------------------------------


def squashed_log_prob(
    u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    r"""The log-density of the action $a = b + s \tanh(u)$, $u \sim \mathcal N(\mu,
    \sigma^2)$, by the change of variables:

    $\log \pi(a) = \sum_i \big[\log \mathcal N(u_i; \mu_i, \sigma_i^2) - \log s_i -
    \log(1 - \tanh^2 u_i)\big]$

    with $\log(1 - \tanh^2 u) = 2\,(\log 2 - u - \operatorname{softplus}(-2u))$, which
    stays finite where $\tanh u$ rounds to $\pm 1$. Shapes: ``(B, A)`` in, ``(B,)`` out.
    """
    # log N(u; mu, sigma^2), one term per action dimension
    gaussian = (
        -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    )
    # log |d a / d u| = log s + log(1 - tanh^2 u), the diagonal Jacobian of the squashing
    log_det = scale.log() + 2 * (math.log(2) - u - F.softplus(-2 * u))
    return (gaussian - log_det).sum(-1)  # (B,)


class SquashedGaussianActor(nn.Module):
    r"""The policy $\pi_\phi(a \mid s)$: a network gives the mean $\mu$ and log standard
    deviation $\log\sigma$ of a Gaussian, a sample $u = \mu + \sigma \epsilon$ is
    squashed by $\tanh$ into $(-1, 1)$ and stretched to the action box $[b - s, b + s]$.

    Sampling with $\epsilon \sim \mathcal N(0, I)$ drawn outside the network (the
    reparameterisation trick) lets the actor's loss backpropagate through the action.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: int = 64,
        low: float | np.ndarray = -1.0,
        high: float | np.ndarray = 1.0,
    ) -> None:
        super().__init__()
        check_positive_int(obs_dim, "obs_dim")
        check_positive_int(act_dim, "act_dim")
        check_positive_int(hidden, "hidden")
        low_t = torch.as_tensor(low, dtype=torch.float32).expand(act_dim).clone()
        high_t = torch.as_tensor(high, dtype=torch.float32).expand(act_dim).clone()
        if not torch.isfinite(low_t).all() or not torch.isfinite(high_t).all():
            raise ValueError("low and high must be finite: SAC squashes into a box")
        if not (high_t > low_t).all():
            raise ValueError(f"high must exceed low, got low={low}, high={high}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.trunk = mlp(obs_dim, 2 * act_dim, hidden)  # mean and log_std
        self.register_buffer("scale", (high_t - low_t) / 2)  # s
        self.register_buffer("bias", (high_t + low_t) / 2)  # b

    def forward(
        self, obs: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The action and its log-probability for each observation in ``obs`` ``(B,
        obs_dim)``; ``deterministic``: the squashed mean, the policy evaluated."""
        check_tensor(obs, "obs", ndim=2, floating=True)
        if obs.shape[1] != self.obs_dim:
            raise ValueError(
                f"obs must have shape (B, {self.obs_dim}), got {tuple(obs.shape)}"
            )
        return self._sample(obs, deterministic)

    def _sample(
        self, obs: torch.Tensor, deterministic: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.trunk(obs).chunk(2, dim=-1)  # (B, A) each
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        # u = mu + sigma * eps: the reparameterisation trick
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        action = self.bias + self.scale * torch.tanh(u)  # (B, A), inside the box
        return action, squashed_log_prob(u, mean, log_std, self.scale)


# ---------------------------------------------------------------------------------
# 2. Critics, replay, target networks
# ---------------------------------------------------------------------------------


class Critic(nn.Module):
    r"""Two soft Q-functions $Q_{\theta_1}, Q_{\theta_2}$ of the same state and action,
    trained on the same targets from different initial weights; their minimum
    counters the overestimation that maximising over a learned $Q$ causes."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 64) -> None:
        super().__init__()
        check_positive_int(obs_dim, "obs_dim")
        check_positive_int(act_dim, "act_dim")
        check_positive_int(hidden, "hidden")
        self.q1 = mlp(obs_dim + act_dim, 1, hidden)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden)

    def forward(
        self, obs: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """$Q_1(s, a)$ and $Q_2(s, a)$, each of shape ``(B,)``."""
        sa = torch.cat([obs, action], dim=-1)  # (B, obs_dim + act_dim)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)


@dataclass
class Batch:
    """Transitions $(s, a, r, s', d)$; ``done`` is 1 only where the episode *ended*
    (a terminal state), not where a time limit cut it."""

    obs: torch.Tensor  # (B, obs_dim)
    action: torch.Tensor  # (B, act_dim)
    reward: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, obs_dim)
    done: torch.Tensor  # (B,) float, 1.0 at a terminal state


class ReplayBuffer:
    """The last ``capacity`` transitions, overwritten oldest first; :meth:`sample`
    draws a uniform mini-batch."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int) -> None:
        check_positive_int(obs_dim, "obs_dim")
        check_positive_int(act_dim, "act_dim")
        self.capacity = check_positive_int(capacity, "capacity")
        self.obs = torch.zeros(capacity, obs_dim)
        self.action = torch.zeros(capacity, act_dim)
        self.reward = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.done = torch.zeros(capacity)
        self.position, self.size = 0, 0

    def add(self, obs, action, reward: float, next_obs, done: bool) -> None:
        """Store one transition (arrays or tensors for ``obs``, ``action``,
        ``next_obs``)."""
        i = self.position
        self.obs[i] = torch.as_tensor(obs, dtype=torch.float32)
        self.action[i] = torch.as_tensor(action, dtype=torch.float32)
        self.reward[i] = float(reward)
        self.next_obs[i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.done[i] = float(done)
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def __len__(self) -> int:
        return self.size

    def get(self, index: torch.Tensor) -> Batch:
        """The transitions at ``index`` (int64)."""
        return Batch(
            self.obs[index],
            self.action[index],
            self.reward[index],
            self.next_obs[index],
            self.done[index],
        )

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Batch:
        """``batch_size`` transitions drawn uniformly, with replacement."""
        check_positive_int(batch_size, "batch_size")
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        index = torch.randint(0, self.size, (batch_size,), generator=generator)
        return self.get(index)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    r"""Move every target weight a step ``tau`` towards the source's:
    $\bar\theta \leftarrow (1 - \tau)\,\bar\theta + \tau\,\theta$."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, tau)


# ---------------------------------------------------------------------------------
# 3. The agent
# ---------------------------------------------------------------------------------


class SAC:
    r"""Soft actor-critic: the actor, the twin critics and their targets, the
    temperature $\alpha = e^{\log\alpha}$, and one Adam optimizer for each.

    ``target_entropy`` defaults to $-\dim\mathcal A$, the heuristic of Haarnoja et al.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        low: float | np.ndarray = -1.0,
        high: float | np.ndarray = 1.0,
        *,
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
        self.actor = SquashedGaussianActor(obs_dim, act_dim, hidden, low, high)
        self.critic = Critic(obs_dim, act_dim, hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(init_alpha), requires_grad=True)
        self.target_entropy = (
            -float(act_dim)
            if target_entropy is None
            else check_number(target_entropy, "target_entropy")
        )
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=lr)

    @property
    def alpha(self) -> float:
        return self.log_alpha.exp().item()

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        """$J_Q$: both critics regress on the soft Bellman target $y$."""
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():  # y comes from the target critics and a' ~ pi(s')
            next_action, next_log_prob = self.actor._sample(batch.next_obs, False)
            q1_next, q2_next = self.critic_target(batch.next_obs, next_action)
            soft_value = torch.min(q1_next, q2_next) - alpha * next_log_prob
            y = batch.reward + self.gamma * (1 - batch.done) * soft_value  # (B,)
        q1, q2 = self.critic(batch.obs, batch.action)
        return 0.5 * (F.mse_loss(q1, y) + F.mse_loss(q2, y))

    def actor_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$J_\pi$, through a reparameterised action $a \sim \pi(s)$; also returns
        $\log\pi(a \mid s)$ ``(B,)`` for the temperature."""
        alpha = self.log_alpha.exp().detach()
        action, log_prob = self.actor._sample(batch.obs, False)
        q_pi = torch.min(*self.critic(batch.obs, action))
        return (alpha * log_prob - q_pi).mean(), log_prob.detach()

    def alpha_loss(self, log_prob: torch.Tensor) -> torch.Tensor:
        r"""$J(\alpha)$: its gradient raises $\alpha$ when the entropy
        $-\log\pi$ is below the target $\bar{\mathcal H}$, and lowers it when above."""
        return -(self.log_alpha * (log_prob + self.target_entropy)).mean()

    def update(self, batch: Batch) -> dict[str, float]:
        """One gradient step on the critics, then the actor, then the temperature, then
        the target critics' Polyak step; returns the losses and the mean
        log-probability."""
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
        return {
            "critic": critic_loss.item(),
            "actor": actor_loss.item(),
            "alpha": alpha_loss.item(),
            "log_prob": log_prob.mean().item(),
        }

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """The action for one observation (NumPy in, NumPy out)."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1)
        action, _ = self.actor(obs_t, deterministic)
        return action[0].numpy()

    def policy(self, obs: np.ndarray) -> np.ndarray:
        r"""The deterministic policy that is evaluated: $a = b + s\tanh(\mu(s))$."""
        return self.act(obs, deterministic=True)


# ---------------------------------------------------------------------------------
# 4. Training
# ---------------------------------------------------------------------------------


@dataclass
class SACHistory:
    """What :func:`train_sac` recorded: the return of every finished episode with the
    environment step it ended at, the temperature and the mean log-probability of
    each update."""

    episode_returns: list[float] = field(default_factory=list)
    episode_ends: list[int] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)


def train_sac(
    make_env: Callable[[int], object],
    steps: int,
    *,
    seed: int = 0,
    learning_starts: int = 500,
    batch_size: int = 128,
    buffer_size: int = 100_000,
    **agent_options: object,
) -> tuple[SAC, SACHistory]:
    """Train SAC for ``steps`` environment steps on the environment ``make_env(seed)``
    builds; uniform random actions for the first ``learning_starts`` steps, then one
    update per step. ``agent_options`` go to :class:`SAC`."""
    check_positive_int(steps, "steps")
    check_positive_int(learning_starts, "learning_starts")
    torch.manual_seed(seed)
    env = make_env(seed)
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    low, high = env.action_space.low, env.action_space.high
    agent = SAC(obs_dim, act_dim, low, high, **agent_options)
    buffer = ReplayBuffer(obs_dim, act_dim, min(buffer_size, steps))
    history = SACHistory()
    return agent, _train(
        env, agent, buffer, history, steps, learning_starts, batch_size
    )


def _train(env, agent, buffer, history, steps, learning_starts, batch_size):
    """The loop: act, store, and from ``learning_starts`` on, update once per step."""
    obs, _ = env.reset()
    episode_return = 0.0
    for t in range(1, steps + 1):
        if t <= learning_starts:
            action = env.action_space.sample()  # explore uniformly at first
        else:
            action = agent.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        # a time limit is not a terminal state: bootstrap through it
        buffer.add(obs, action, reward, next_obs, terminated)
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            history.episode_returns.append(episode_return)
            history.episode_ends.append(t)
            obs, _ = env.reset()
            episode_return = 0.0
        if t >= learning_starts:
            losses = agent.update(buffer.sample(batch_size))
            history.alpha.append(agent.alpha)
            history.entropy.append(-losses["log_prob"])
    return history
