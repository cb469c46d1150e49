"""Policy gradients and PPO: REINFORCE with a baseline, generalised advantage
estimation, and the clipped surrogate objective of proximal policy optimisation.

Chapter: ``book/rl/policy_gradients.md``.

References:
- Williams (1992), *Simple Statistical Gradient-Following Algorithms for Connectionist
  Reinforcement Learning* (REINFORCE, the baseline: :func:`reward_to_go`,
  :func:`reinforce_loss`).
- Sutton, McAllester, Singh & Mansour (2000), *Policy Gradient Methods for
  Reinforcement Learning with Function Approximation* (the policy gradient theorem).
- Schulman, Moritz, Levine, Jordan & Abbeel (2016), *High-Dimensional Continuous
  Control Using Generalized Advantage Estimation* (GAE, :func:`gae`).
- Schulman, Wolski, Dhariwal, Radford & Klimov (2017), *Proximal Policy Optimization
  Algorithms* (the clipped objective and the entropy bonus, :func:`ppo_loss`,
  :func:`train_ppo`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "ActorCritic",
    "reward_to_go",
    "reinforce_loss",
    "gae",
    "ppo_loss",
    "Rollout",
    "Runner",
    "collect",
    "PPOConfig",
    "train_ppo",
    "train_reinforce",
    "greedy",
]


# ---------------------------------------------------------------------------------
# 1. The policy and the critic
# ---------------------------------------------------------------------------------


class ActorCritic(nn.Module):
    r"""A policy $\pi_\theta(a \mid s)$ over ``n_actions`` discrete actions and a value
    function $V_\phi(s)$: two separate MLPs with ``hidden`` tanh units in two layers
    (the actor's output layer gives the logits, the critic's one number)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64) -> None:
        super().__init__()
        check_positive_int(obs_dim, "obs_dim")
        check_positive_int(n_actions, "n_actions")
        check_positive_int(hidden, "hidden")

        def mlp(out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(obs_dim, hidden),
                nn.Tanh(),
                nn.Linear(hidden, hidden),
                nn.Tanh(),
                nn.Linear(hidden, out),
            )

        self.actor, self.critic = mlp(n_actions), mlp(1)
        # the actor's last layer is small, so the first policy is near-uniform
        for last, gain in ((self.actor[-1], 0.01), (self.critic[-1], 1.0)):
            nn.init.orthogonal_(last.weight, gain)
            nn.init.zeros_(last.bias)

    def policy(self, s: torch.Tensor) -> Categorical:
        """$\\pi_\\theta(\\cdot \\mid s)$ for a batch of states ``s`` (B, obs_dim)."""
        return Categorical(logits=self.actor(s), validate_args=False)

    def value(self, s: torch.Tensor) -> torch.Tensor:
        """$V_\\phi(s)$, shape (B,)."""
        return self.critic(s).squeeze(-1)


# ---------------------------------------------------------------------------------
# 2. REINFORCE with a baseline
# ---------------------------------------------------------------------------------


def reward_to_go(
    rewards: torch.Tensor, dones: torch.Tensor, gamma: float
) -> torch.Tensor:
    r"""The discounted return from every step to the end of its episode,
    $G_t = \sum_{k \ge t} \gamma^{k-t} r_k$, for rewards (T,) or (T, N) in time order;
    ``dones[t]`` is true when an episode ends after step $t$ (the sum stops there)."""
    check_tensor(rewards, "rewards", ndim=(1, 2), floating=True)
    check_tensor(dones, "dones", ndim=rewards.dim())
    if dones.shape != rewards.shape:
        raise ValueError(
            f"dones must have the shape of rewards {tuple(rewards.shape)}, "
            f"got {tuple(dones.shape)}"
        )
    check_number(gamma, "gamma", low=0, high=1)
    return _reward_to_go(rewards, dones.to(rewards.dtype), gamma)


def _reward_to_go(
    rewards: torch.Tensor, dones: torch.Tensor, gamma: float
) -> torch.Tensor:
    G = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * (1 - dones[t]) * running  # G_t = r_t + γ G_{t+1}
        G[t] = running
    return G


def reinforce_loss(
    log_prob: torch.Tensor, G: torch.Tensor, baseline: torch.Tensor
) -> torch.Tensor:
    r"""REINFORCE's surrogate loss: its gradient is minus the policy gradient estimate
    $\frac1T \sum_t \nabla_\theta \log \pi_\theta(a_t \mid s_t)\,(G_t - b(s_t))$.

    The return and the baseline are constants here (no gradient flows through them).
    """
    return -(log_prob * (G - baseline).detach()).mean()


# ---------------------------------------------------------------------------------
# 3. Generalised advantage estimation
# ---------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimates and the critic's targets for a rollout of T
    steps of N environments.

    ``rewards``, ``values`` (the critic's $V(s_t)$) and ``dones`` (true when the
    episode ended after step $t$: nothing is bootstrapped past it) have shape (T, N);
    ``last_value`` (N,) is $V(s_T)$ of the state after the rollout. Where a time limit
    cut an episode, :class:`Runner` marks the step done too, after adding
    $\gamma V(s')$ of the state it stopped in to its reward. Returns the advantages
    $\hat A_t$ and the returns $\hat A_t + V(s_t)$, both (T, N).
    """
    check_tensor(rewards, "rewards", ndim=2, floating=True)
    for name, x in (("values", values), ("dones", dones)):
        check_tensor(x, name, ndim=2)
        if x.shape != rewards.shape:
            raise ValueError(
                f"{name} must have the shape of rewards {tuple(rewards.shape)}, "
                f"got {tuple(x.shape)}"
            )
    check_tensor(last_value, "last_value", ndim=1)
    if last_value.shape[0] != rewards.shape[1]:
        raise ValueError(
            f"last_value must have shape ({rewards.shape[1]},), "
            f"got {tuple(last_value.shape)}"
        )
    check_number(gamma, "gamma", low=0, high=1)
    check_number(lam, "lam", low=0, high=1)
    return _gae(rewards, values, dones.to(rewards.dtype), last_value, gamma, lam)


def _gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    T = len(rewards)
    next_values = torch.cat([values[1:], last_value[None]])  # V(s_{t+1}), (T, N)
    alive = 1 - dones  # no bootstrap past the end of an episode
    delta = rewards + gamma * alive * next_values - values  # TD errors δ_t
    A = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        running = delta[t] + gamma * lam * alive[t] * running  # Â_t = δ_t + γλ Â_{t+1}
        A[t] = running
    return A, A + values


# ---------------------------------------------------------------------------------
# 4. The clipped surrogate objective
# ---------------------------------------------------------------------------------


def ppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    A: torch.Tensor,
    value: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor,
    clip: float = 0.2,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""PPO's loss on a minibatch: minus the clipped surrogate objective, plus
    ``vf_coef`` times the critic's squared error, minus ``ent_coef`` times the mean
    entropy of the policy. Returns the loss and its parts (as numbers, for logging).

    $\begin{aligned}
    L = &-\mathbb E_t\big[\min(\rho_t \hat A_t,\ \operatorname{clip}(\rho_t, 1-\epsilon,
    1+\epsilon)\,\hat A_t)\big] \\
    &+ c_v\,\mathbb E_t\big[(V(s_t) - \hat R_t)^2\big]
    - c_e\,\mathbb E_t\big[H(\pi(\cdot \mid s_t))\big]
    \end{aligned}$
    """
    rho = torch.exp(log_prob - old_log_prob)  # π_θ(a|s) / π_θold(a|s)
    surrogate = torch.min(rho * A, torch.clamp(rho, 1 - clip, 1 + clip) * A)
    policy_loss = -surrogate.mean()
    value_loss = (value - returns).pow(2).mean()
    entropy_bonus = entropy.mean()
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy_bonus
    with torch.no_grad():
        parts = {
            "policy": policy_loss.item(),
            "value": value_loss.item(),
            "entropy": entropy_bonus.item(),
            "clip_fraction": ((rho - 1).abs() > clip).float().mean().item(),
        }
    return loss, parts


# ---------------------------------------------------------------------------------
# 5. Collecting experience, and the training loops
# ---------------------------------------------------------------------------------


@dataclass
class Rollout:
    """T steps of N environments, in time order; every tensor is (T, N) or (T, N, ·)."""

    s: torch.Tensor  # states s_t, (T, N, obs_dim)
    a: torch.Tensor  # actions a_t, (T, N)
    log_prob: torch.Tensor  # log π_θold(a_t | s_t), (T, N)
    r: torch.Tensor  # rewards r_t (+ γ V(s_T) where a time limit cut the episode)
    done: torch.Tensor  # the episode ended (terminated, or was cut) after step t
    v: torch.Tensor  # V(s_t), (T, N)
    last_v: torch.Tensor  # V(s_T) of the state after the rollout, (N,)
    episode_returns: list[float] = field(default_factory=list)


class Runner:
    """N environments that are reset by hand when an episode ends, their current
    states ``s`` (N, obs_dim), and the returns of the episodes that ended."""

    def __init__(self, make_env: Callable[[int], gym.Env], n_envs: int, seed: int):
        self.envs = [make_env(seed + i) for i in range(n_envs)]
        self.s = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(self.envs)])
        self.running = np.zeros(n_envs)  # the return of each episode so far
        self.finished: list[float] = []

    def step(
        self, actions: list[int], agent: ActorCritic, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of every environment; returns the rewards and episode ends (N,).

        Where a time limit cuts an episode (a truncation, not a true end), the reward
        gets $\\gamma V(s')$ of the state it stopped in, the value the episode would
        have gone on to collect; the step then counts as the episode's end.
        """
        r = np.zeros(len(self.envs), dtype=np.float32)
        done = np.zeros(len(self.envs), dtype=bool)
        for i, (env, action) in enumerate(zip(self.envs, actions, strict=True)):
            s_next, r[i], terminated, truncated, _ = env.step(action)
            self.running[i] += r[i]
            if truncated and not terminated:  # bootstrap the future the limit cut off
                s_cut = torch.as_tensor(s_next, dtype=torch.float32)[None]
                r[i] += gamma * agent.value(s_cut).item()
            if terminated or truncated:
                self.finished.append(float(self.running[i]))
                self.running[i] = 0.0
                s_next, _ = env.reset()
            done[i] = terminated or truncated
            self.s[i] = s_next
        return torch.as_tensor(r), torch.as_tensor(done)

    def take_finished(self) -> list[float]:
        """The returns of the episodes that ended since the last call."""
        finished, self.finished = self.finished, []
        return finished


def collect(agent: ActorCritic, runner: Runner, T: int, gamma: float) -> Rollout:
    """Run the policy for T steps in every environment of ``runner``."""
    steps = []
    with torch.no_grad():  # acting needs no gradients
        for _ in range(T):
            s_t = torch.tensor(runner.s, dtype=torch.float32)  # a copy, (N, obs_dim)
            pi = agent.policy(s_t)
            a_t = pi.sample()  # (N,)
            r_t, done_t = runner.step(a_t.tolist(), agent, gamma)  # (N,), (N,)
            steps.append((s_t, a_t, pi.log_prob(a_t), r_t, done_t, agent.value(s_t)))
        last_v = agent.value(torch.as_tensor(runner.s, dtype=torch.float32))  # V(s_T)
    s, a, log_prob, r, done, v = (torch.stack(x) for x in zip(*steps, strict=True))
    return Rollout(s, a, log_prob, r, done, v, last_v, runner.take_finished())


@dataclass
class PPOConfig:
    """PPO's settings; the defaults train CartPole in tens of thousands of steps."""

    n_envs: int = 8  # N environments stepped together
    T: int = 32  # steps per environment in each rollout
    epochs: int = 8  # passes over each rollout
    minibatch: int = 256  # transitions per gradient step
    lr: float = 2e-3  # Adam's learning rate, annealed linearly to 0
    gamma: float = 0.98
    lam: float = 0.8  # GAE's λ
    clip: float = 0.2  # ε of the clipped objective
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5
    hidden: int = 64

    def __post_init__(self) -> None:
        for name in ("n_envs", "T", "epochs", "minibatch", "hidden"):
            check_positive_int(getattr(self, name), name)
        check_number(self.lr, "lr", low=0, low_open=True)
        for name in ("gamma", "lam"):
            check_number(getattr(self, name), name, low=0, high=1)
        check_number(self.clip, "clip", low=0, low_open=True)
        for name in ("vf_coef", "ent_coef"):
            check_number(getattr(self, name), name, low=0)
        check_number(self.max_grad_norm, "max_grad_norm", low=0, low_open=True)


def _check_training(make_env: object, total_steps: object, config: object) -> PPOConfig:
    if not callable(make_env):
        raise TypeError("make_env must be a callable seed -> gymnasium.Env")
    check_positive_int(total_steps, "total_steps")
    config = PPOConfig() if config is None else config
    if not isinstance(config, PPOConfig):
        raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
    return config


def _setup(make_env, config, seed):
    torch.manual_seed(seed)
    runner = Runner(make_env, config.n_envs, seed)
    env = runner.envs[0]
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ValueError("make_env must build environments with discrete actions")
    agent = ActorCritic(
        env.observation_space.shape[0], int(env.action_space.n), config.hidden
    )
    optimizer = torch.optim.Adam(
        agent.parameters(), lr=config.lr, eps=1e-5, foreach=True
    )
    return runner, agent, optimizer


def train_ppo(
    make_env: Callable[[int], gym.Env],
    total_steps: int,
    config: PPOConfig | None = None,
    seed: int = 0,
    target: float | None = None,
    window: int = 10,
) -> tuple[ActorCritic, dict[str, list[float]]]:
    """Train an :class:`ActorCritic` with PPO for ``total_steps`` environment steps
    (``make_env(seed)`` builds one environment); stop early once the last ``window``
    finished episodes average at least ``target``. Returns the agent and its history:
    per rollout, the environment steps collected so far, the mean return of the
    episodes that ended in it, and the parts of the loss of the update on it."""
    config = _check_training(make_env, total_steps, config)
    check_positive_int(window, "window")
    runner, agent, optimizer = _setup(make_env, config, seed)
    generator = torch.Generator().manual_seed(seed)
    history = _ppo_loop(
        agent, optimizer, runner, total_steps, config, generator, target, window
    )
    return agent, history


def _ppo_loop(agent, optimizer, runner, total_steps, c, generator, target, window):
    """PPO's outer loop: collect a rollout, update on it, until the budget is spent
    or the last ``window`` episodes reach ``target``; the agent ends with the weights
    it had when the mean return of the last ``window`` episodes was at its best."""
    history: dict[str, list[float]] = {"steps": [], "return": [], "episodes": []}
    updates = max(1, total_steps // (c.n_envs * c.T))
    best, best_weights = -np.inf, copy.deepcopy(agent.state_dict())
    for k in range(updates):
        for group in optimizer.param_groups:  # linear annealing of the step size
            group["lr"] = c.lr * (1 - k / updates)
        rollout = collect(agent, runner, c.T, c.gamma)  # by the current policy
        history["episodes"] += rollout.episode_returns
        recent = history["episodes"][-window:]
        if len(recent) == window and np.mean(recent) > best:  # keep the best weights
            best, best_weights = np.mean(recent), copy.deepcopy(agent.state_dict())
        parts = _ppo_update(agent, optimizer, rollout, c, generator)
        history["steps"].append((k + 1) * c.n_envs * c.T)  # collected so far
        returns = rollout.episode_returns  # of the episodes that ended in this rollout
        history["return"].append(np.mean(returns) if returns else np.nan)
        for name, value in parts.items():
            history.setdefault(name, []).append(value)
        if target is not None and best >= target:
            break  # the weights kept above, before this update, are loaded below
    agent.load_state_dict(best_weights)
    return history


def _ppo_update(agent, optimizer, rollout, c, generator):
    """One PPO update: advantages, then ``epochs`` passes of minibatch steps."""
    A, R = _gae(
        rollout.r, rollout.v, rollout.done.float(), rollout.last_v, c.gamma, c.lam
    )
    s, a = rollout.s.flatten(0, 1), rollout.a.flatten()  # (T·N, obs_dim), (T·N,)
    old_lp, A, R = rollout.log_prob.flatten(), A.flatten(), R.flatten()
    for _ in range(c.epochs):
        for idx in torch.randperm(len(a), generator=generator).split(c.minibatch):
            A_mb = (A[idx] - A[idx].mean()) / (A[idx].std() + 1e-8)  # normalised
            pi = agent.policy(s[idx])
            loss, parts = ppo_loss(
                pi.log_prob(a[idx]),
                old_lp[idx],
                A_mb,
                agent.value(s[idx]),
                R[idx],
                pi.entropy(),
                c.clip,
                c.vf_coef,
                c.ent_coef,
            )
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), c.max_grad_norm)
            optimizer.step()
    return parts


def train_reinforce(
    make_env: Callable[[int], gym.Env],
    total_steps: int,
    config: PPOConfig | None = None,
    seed: int = 0,
) -> tuple[ActorCritic, dict[str, list[float]]]:
    """Train with REINFORCE and a learned baseline $V_\\phi$, on the same rollouts as
    :func:`train_ppo`: one gradient step per rollout, weighted by the discounted reward
    to go inside the rollout, completed by $\\gamma V_\\phi(s_T)$ where the rollout
    cuts an episode (GAE with $\\lambda = 1$)."""
    config = _check_training(make_env, total_steps, config)
    runner, agent, optimizer = _setup(make_env, config, seed)
    c = config
    history: dict[str, list[float]] = {"steps": [], "return": [], "episodes": []}
    for k in range(max(1, total_steps // (c.n_envs * c.T))):
        rollout = collect(agent, runner, c.T, c.gamma)
        r = rollout.r.clone()
        r[-1] += c.gamma * (1 - rollout.done[-1].float()) * rollout.last_v
        G = _reward_to_go(r, rollout.done.float(), c.gamma)  # (T, N)
        pi = agent.policy(rollout.s)
        loss = reinforce_loss(pi.log_prob(rollout.a), G, rollout.v)
        loss = loss + c.vf_coef * (agent.value(rollout.s) - G).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), c.max_grad_norm)
        optimizer.step()
        history["steps"].append((k + 1) * c.n_envs * c.T)
        history["episodes"] += rollout.episode_returns
        history["return"].append(
            np.mean(rollout.episode_returns) if rollout.episode_returns else np.nan
        )
    return agent, history


def greedy(agent: ActorCritic) -> Callable[[np.ndarray], int]:
    """The policy that takes the most probable action: ``policy(obs) -> int``."""

    @torch.no_grad()
    def policy(obs: np.ndarray) -> int:
        s = torch.as_tensor(np.asarray(obs), dtype=torch.float32)[None]
        return int(agent.actor(s).argmax(-1))

    return policy
