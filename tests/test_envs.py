"""dlabc.envs: seeded environments, the return of a policy, frames of an episode."""

import gymnasium as gym
import numpy as np
import pytest

from dlabc import envs


def balance(obs):
    """A hand-made controller that keeps CartPole's pole up: push towards its fall."""
    return int(obs[2] + 0.5 * obs[3] > 0)


def test_make_is_seeded_and_renders():
    a, b = envs.make("CartPole-v1", seed=3), envs.make("CartPole-v1", seed=3)
    assert [a.action_space.sample() for _ in range(20)] == [
        b.action_space.sample() for _ in range(20)
    ]
    reference = gym.make("CartPole-v1")
    expected, _ = reference.reset(seed=3)
    assert np.array_equal(a.reset(seed=3)[0], expected)
    frame = envs.make("CartPole-v1", render=True).render()
    assert frame.shape == (400, 600, 3) and frame.dtype == np.uint8


def test_evaluate_sums_the_rewards_of_each_episode():
    def by_hand(policy, seed):
        env = gym.make("Pendulum-v1")
        obs, _ = env.reset(seed=seed)
        rewards = []
        for _ in range(1000):
            obs, r, terminated, truncated, _ = env.step(policy(obs))
            rewards.append(r)
            if terminated or truncated:
                break
        return sum(rewards), len(rewards)

    def still(obs):
        return np.zeros(1, dtype=np.float32)

    returns = envs.evaluate(still, "Pendulum-v1", episodes=3, seed=7)
    for k, got in enumerate(returns):
        total, length = by_hand(still, 7 + k)
        assert length == 200  # Pendulum-v1 is truncated after 200 steps
        assert got == pytest.approx(total, rel=1e-12)
    # CartPole pays 1 per step and truncates at 500: a good controller scores 500
    assert (envs.evaluate(balance, "CartPole-v1", episodes=3) == 500).all()
    assert (envs.evaluate(lambda obs: 0, "CartPole-v1", episodes=3) < 20).all()


def test_film_keeps_every_kth_frame_and_the_last():
    frames = envs.film(balance, "CartPole-v1", seed=1, steps=50, every=10)
    assert len(frames) == 6  # steps 0, 10, ..., 50
    start = gym.make("CartPole-v1", render_mode="rgb_array")
    start.reset(seed=1)
    assert np.array_equal(frames[0], start.render())
    falls = envs.film(lambda obs: 0, "CartPole-v1", seed=1, steps=200, every=100)
    assert len(falls) == 2  # the start and the step where the pole fell


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: envs.make("NoSuchEnv-v0"), ValueError, "registered Gymnasium"),
        (lambda: envs.make("CartPole-v1", seed=-1), ValueError, "seed must be >= 0"),
        (lambda: envs.make("CartPole-v1", seed=1.5), TypeError, "seed must be an int"),
        (lambda: envs.evaluate(balance, "CartPole-v1", 0), ValueError, "episodes"),
        (lambda: envs.evaluate("left", "CartPole-v1"), TypeError, "policy must be"),
        (lambda: envs.film(balance, "CartPole-v1", every=0), ValueError, "every"),
        (lambda: envs.film(balance, 3), ValueError, "registered Gymnasium"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
