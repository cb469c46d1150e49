"""Environments for the Reinforcement learning part: make one, score a policy, film it.

The chapters of ``book/rl/`` (``dlabc.rl.dqn``, ``dlabc.rl.policy_gradients``,
``dlabc.rl.sac``) take their environments from Gymnasium (Towers et al., 2024), the
maintained successor of OpenAI Gym, through the three functions here, so that every
chapter seeds them the same way and scores a policy the same way:

- :func:`make` an environment whose first reset and action sampling follow ``seed``;
- :func:`evaluate` a policy: the undiscounted return of each of ``episodes`` episodes,
  on seeds that training never sees;
- :func:`film` one episode as RGB frames (show them with ``dlabc.plot.image_grid``).

A policy is any function from one observation (a NumPy array) to one action (an int
for a discrete action space, an array for a continuous one).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

# pygame (the renderer of the classic-control environments) greets on import, and SDL
# looks for a screen and a sound card; the book needs neither.
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import gymnasium as gym  # noqa: E402

__all__ = ["evaluate", "film", "make"]

Policy = Callable[[np.ndarray], "int | np.ndarray"]

#: Episodes of evaluation start from these seeds on: training's seeds are small numbers.
EVALUATION_SEED = 10_000


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in gym.registry:
        raise ValueError(
            f"name must be a registered Gymnasium environment such as 'CartPole-v1', "
            f"got {name!r}"
        )


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def make(name: str, seed: int = 0, render: bool = False) -> gym.Env:
    """The environment ``name`` (e.g. ``"CartPole-v1"``), reset once with ``seed``.

    Its action space samples from ``seed`` too, so a random policy is reproducible.
    With ``render``, ``env.render()`` returns the current frame as an RGB array.
    """
    _check_name(name)
    seed = _check_int(seed, "seed", 0)
    env = gym.make(name, render_mode="rgb_array" if render else None)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def _return(env: gym.Env, policy: Policy, seed: int) -> float:
    """The sum of rewards of one episode of ``policy`` from ``reset(seed=seed)``."""
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += float(reward)
        done = terminated or truncated
    return total


def evaluate(
    policy: Policy, name: str, episodes: int = 10, seed: int = EVALUATION_SEED
) -> np.ndarray:
    """The return (sum of rewards) of each of ``episodes`` episodes of ``policy``.

    Episode ``k`` starts from ``reset(seed=seed + k)``; the default seeds are far from
    the small ones training uses, so the score is on starts the agent has not seen.
    Episodes end when the environment terminates or truncates them (CartPole-v1 after
    500 steps, Pendulum-v1 after 200).
    """
    _check_name(name)
    episodes = _check_int(episodes, "episodes", 1)
    seed = _check_int(seed, "seed", 0)
    if not callable(policy):
        raise TypeError(f"policy must be callable, got {type(policy).__name__}")
    env = gym.make(name)
    returns = np.array([_return(env, policy, seed + k) for k in range(episodes)])
    env.close()
    return returns


def film(
    policy: Policy, name: str, seed: int = 0, steps: int = 200, every: int = 20
) -> list[np.ndarray]:
    """RGB frames of one episode of ``policy``: the start, then one every ``every``
    steps, for at most ``steps`` steps (fewer if the episode ends first; its last frame
    is then included)."""
    _check_name(name)
    seed = _check_int(seed, "seed", 0)
    steps = _check_int(steps, "steps", 1)
    every = _check_int(every, "every", 1)
    if not callable(policy):
        raise TypeError(f"policy must be callable, got {type(policy).__name__}")
    env = gym.make(name, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    for t in range(1, steps + 1):
        obs, _, terminated, truncated, _ = env.step(policy(obs))
        if terminated or truncated or t % every == 0:
            frames.append(env.render())
        if terminated or truncated:
            break
    env.close()
    return frames
