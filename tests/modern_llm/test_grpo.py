"""Tests for ``dlabc.modern_llm.grpo``.

The loss is compared with TRL's own ``GRPOTrainer._compute_loss`` (called unbound with
a stand-in trainer that hands it our log-probabilities) for its three loss types, with
and without the KL term, with clipped ratios, values and gradients, in float64; the
advantages with TRL's ``nanstd`` and NumPy's sample standard deviation; the k3
estimator's mean under the sampling distribution with PyTorch's exact
``kl_divergence``; the first step's gradient with its closed form (REINFORCE with the
group mean as baseline); ``"bnpo"`` without KL and mask with the PPO chapter's
``ppo_loss``; one step of ``train_grpo`` with the same step recomputed through TRL's
loss, and a step on groups without spread with no step at all; the careless teacher,
the mask, the reward and greedy accuracy with brute force.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence
from trl.trainer.utils import nanstd

from dlabc.improvements.modern_block import BlockLM
from dlabc.modern_llm.grpo import (
    ArithmeticTask,
    GRPOConfig,
    arithmetic_task,
    careless_answers,
    completion_mask,
    greedy_accuracy,
    group_advantages,
    grpo_loss,
    k3_kl,
    pretrain_arithmetic,
    train_grpo,
    trl_grpo_loss,
)
from dlabc.modern_llm.rlhf import sample, sequence_logprobs
from dlabc.rl.policy_gradients import ppo_loss

D = torch.float64


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return arithmetic_task(n_test=50)


@pytest.fixture(scope="module")
def tiny(task) -> BlockLM:
    torch.manual_seed(0)
    return BlockLM(len(task.vocab), 16, 2, 1, 32).eval()


def _batch(B=6, n=5, seed=0):
    """Log-probs of a policy, its sampler and a reference (ratios far enough from 1 to
    be clipped), advantages of groups of 3, a mask with completions of every length."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, n, generator=g, dtype=D) - 0.1
    old = logp + 0.4 * torch.randn(B, n, generator=g, dtype=D)
    ref = logp + 0.4 * torch.randn(B, n, generator=g, dtype=D)
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 0.5, 0, 1][:B], dtype=D)
    mask = torch.ones(B, n, dtype=D)
    for i in range(B):
        mask[i, 1 + i % n :] = 0
    return logp, old, ref, group_advantages(r, 3), mask


# ---------------------------------------------------------------- advantages


def test_group_advantages_match_trl_and_numpy():
    r = torch.tensor([1.0, 0, 0, 1, 0.2, 0.7, 3, 0, 2, 2, 2, 2], dtype=D)
    A = group_advantages(r, 4)
    groups = r.view(-1, 4)
    trl_std = nanstd(groups, dim=1).repeat_interleave(4)
    trl_mean = groups.mean(1).repeat_interleave(4)
    # TRL's Bessel factor count / (count - 1) is computed in float32
    torch.testing.assert_close(A, (r - trl_mean) / (trl_std + 1e-4), rtol=1e-7, atol=0)
    g = groups.numpy()
    expected = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(A.numpy(), expected.ravel(), atol=1e-12)
    assert torch.equal(A[8:], torch.zeros(4, dtype=D))  # equal rewards: no signal
    torch.testing.assert_close(A.view(-1, 4).sum(1), torch.zeros(3, dtype=D))
    unscaled = group_advantages(r, 4, scale=False)  # Dr. GRPO: r - mean only
    torch.testing.assert_close(unscaled, r - trl_mean, rtol=0, atol=1e-12)


def test_the_exercises_closed_form_for_binary_rewards():
    """k right answers out of G: the right ones get (1 - k/G) / sqrt(k(G-k)/(G(G-1))),
    the numbers of the exercise on Dr. GRPO (about 2.47 for k = 1, 0.94 for k = 4)."""
    G = 8
    for k in range(1, G):
        r = torch.tensor([1.0] * k + [0.0] * (G - k), dtype=D)
        A = group_advantages(r, G, eps=0.0)
        right = (1 - k / G) / np.sqrt(k * (G - k) / (G * (G - 1)))
        assert A[0].item() == pytest.approx(right, rel=1e-12)
    ones = group_advantages(torch.tensor([1.0] + [0.0] * 7, dtype=D), G, eps=0.0)
    fours = group_advantages(torch.tensor([1.0] * 4 + [0.0] * 4, dtype=D), G, eps=0.0)
    assert round(ones[0].item(), 2) == 2.47 and round(fours[0].item(), 2) == 0.94


def test_group_advantages_reject_bad_input():
    r = torch.zeros(6)
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="G must be at least 2"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="rewards must have 1 dimensions"):
        group_advantages(r.view(2, 3), 3)
    with pytest.raises(TypeError, match="rewards must be a floating-point"):
        group_advantages(torch.zeros(6, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="scale must be a bool"):
        group_advantages(r, 3, scale=1)


# ---------------------------------------------------------------- k3 and the loss


def test_k3_is_an_unbiased_nonnegative_estimate_of_the_kl():
    g = torch.Generator().manual_seed(1)
    pi = Categorical(logits=torch.randn(4, 7, generator=g, dtype=D))
    ref = Categorical(logits=torch.randn(4, 7, generator=g, dtype=D))
    # the mean of k3 over tokens x ~ π, computed exactly by summing over the vocabulary
    k3 = k3_kl(pi.logits, ref.logits)  # (4, 7): k3 of every possible token
    assert (k3 >= 0).all()
    mean_k3 = (pi.probs * k3).sum(-1)
    torch.testing.assert_close(mean_k3, kl_divergence(pi, ref), rtol=1e-12, atol=1e-12)
    assert torch.equal(k3_kl(pi.logits, pi.logits), torch.zeros(4, 7, dtype=D))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(loss_type, beta):
    logp, old, ref, A, mask = _batch()
    assert ((logp - old).exp() - 1).abs().gt(0.2).any()  # some ratios are clipped
    ours_logp, trl_logp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours = grpo_loss(ours_logp, old, A, mask, ref, beta=beta, loss_type=loss_type)
    theirs = trl_grpo_loss(trl_logp, old, A, mask, ref, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, rtol=0, atol=1e-14)
    assert ours_logp.grad.abs().sum() > 0


def test_without_kl_and_mask_bnpo_is_the_ppo_chapters_clipped_loss():
    logp, old, _, A, _ = _batch()
    A_tokens = A[:, None].expand_as(logp)  # the same advantage on every token
    ones = torch.ones_like(logp)
    ours = grpo_loss(logp, old, A, ones, None, beta=0.0, loss_type="bnpo")
    zeros = torch.zeros_like(logp)
    ppo, _ = ppo_loss(logp, old, A_tokens, zeros, zeros, zeros, 0.2, 0.0, 0.0)
    torch.testing.assert_close(ours, ppo, rtol=0, atol=1e-15)


def test_grpo_loss_without_reference_when_beta_is_zero():
    logp, old, ref, A, mask = _batch()
    with_ref = grpo_loss(logp, old, A, mask, ref, beta=0.0)
    torch.testing.assert_close(grpo_loss(logp, old, A, mask, None, beta=0.0), with_ref)
    torch.testing.assert_close(
        trl_grpo_loss(logp, old, A, mask, None, beta=0.0), with_ref
    )


def test_the_loss_is_zero_at_the_first_step_but_its_gradient_is_not():
    """With old = current = reference log-probs, the ratio is 1 and the KL 0: the loss
    is -mean(A) = 0, but its gradient is -A_i / (B |o_i|) on every counted token."""
    logp, _, _, A, mask = _batch()
    logp.requires_grad_()
    frozen = logp.detach()
    loss = grpo_loss(logp, frozen, A, mask, frozen, beta=0.04)
    assert abs(loss.item()) < 1e-15
    loss.backward()
    B = len(A)
    expected = -A[:, None] * mask / (B * mask.sum(-1, keepdim=True))
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-15)
    assert logp.grad.abs().max() > 0.05


def test_grpo_loss_rejects_bad_input():
    logp, old, ref, A, mask = _batch()
    with pytest.raises(ValueError, match="old_logp must have the shape of logp"):
        grpo_loss(logp, old[:, :3], A, mask, ref)
    with pytest.raises(ValueError, match="A must have shape"):
        grpo_loss(logp, old, A[:3], mask, ref)
    with pytest.raises(ValueError, match="ref_logp is needed"):
        grpo_loss(logp, old, A, mask, None, beta=0.1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(logp, old, A, mask, ref, loss_type="ppo")
    with pytest.raises(ValueError, match="clip must be in"):
        grpo_loss(logp, old, A, mask, ref, clip=0.0)
    with pytest.raises(TypeError, match="logp must be a torch.Tensor"):
        grpo_loss(logp.numpy(), old, A, mask, ref)


def test_completion_mask_by_brute_force():
    g = torch.Generator().manual_seed(2)
    completions = torch.randint(0, 4, (40, 6), generator=g)
    mask = completion_mask(completions, 3)
    for row, m in zip(completions.tolist(), mask.tolist(), strict=True):
        end = row.index(3) + 1 if 3 in row else len(row)
        assert m == [1.0] * end + [0.0] * (len(row) - end)
    with pytest.raises(TypeError, match="completions must have dtype torch.int64"):
        completion_mask(completions.float(), 3)
    with pytest.raises(TypeError, match="end_id must be an int"):
        completion_mask(completions, 3.0)


# ---------------------------------------------------------------- the task


def test_the_task_splits_all_additions(task):
    both = np.concatenate([task.train, task.test])
    assert len(task.test) == 50 and len(both) == 10_000
    assert len({tuple(p) for p in both.tolist()}) == 10_000
    assert task.decode(task.prompts(np.array([[7, 45]]))[0]) == "07+45="
    ids, mask = task.examples(np.array([[7, 45], [99, 99], [0, 0]]))
    assert [task.decode(x) for x in ids] == ["07+45=52..", "99+99=198.", "00+00=0..."]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert task.encode(task.decode([0, 10, 11, 12])) == [0, 10, 11, 12]


def test_the_careless_teacher_forgets_only_carries(task):
    pairs = task.train[:400]
    rng = np.random.default_rng(0)
    assert np.array_equal(careless_answers(pairs, 0.0, rng), pairs.sum(1))
    always = careless_answers(pairs, 1.0, rng)
    for (a, b), written in zip(pairs.tolist(), always.tolist(), strict=True):
        carry = a % 10 + b % 10 >= 10  # the units overflow into the tens
        assert written == a + b - 10 * carry
    sometimes = careless_answers(pairs, 0.5, np.random.default_rng(1))
    draws = np.random.default_rng(1).random(len(pairs)) < 0.5  # the same draws
    assert np.array_equal(sometimes, np.where(draws, always, pairs.sum(1)))
    ids, mask = task.examples(pairs[:2], np.array([5, 123]))
    assert [task.decode(x)[6:] for x in ids] == ["5...", "123."]
    with pytest.raises(ValueError, match=r"answers must have shape \(2,\)"):
        task.examples(pairs[:2], np.array([5]))


def test_the_reward_is_the_rule(task):
    pairs = np.array([[7, 45]] * 7)
    texts = ["52..", "52.7", "052.", "52+.", "53..", "5252", ".52."]
    completions = torch.tensor([task.encode(t) for t in texts])
    assert task.reward(pairs, completions).tolist() == [1, 1, 1, 0, 0, 0, 0]


def test_the_task_rejects_bad_input(task):
    with pytest.raises(ValueError, match="pairs must hold numbers from 0 to 99"):
        task.prompts(np.array([[100, 1]]))
    with pytest.raises(ValueError, match="pairs must be a NumPy array of shape"):
        task.prompts(np.array([1, 2]))
    with pytest.raises(TypeError, match="pairs must hold integers"):
        task.prompts(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        task.encode("1-2")
    with pytest.raises(ValueError, match="one row per pair"):
        task.reward(np.array([[1, 2]]), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_test must leave pairs"):
        arithmetic_task(n_test=10_000)


def test_greedy_accuracy_by_brute_force(task):
    torch.manual_seed(1)
    model = BlockLM(len(task.vocab), 16, 2, 1, 32).eval()
    pairs = task.test[:20]
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident, so that the argmax is no coin toss
        model.head.weight[task.end_id] += 0.5 * model.head.weight.mean(0)
        correct = 0
        for a, b in pairs.tolist():
            ids = task.encode(f"{a:02d}+{b:02d}=")
            for _ in range(task.n_new):  # argmax without a cache
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            written, stop, _ = task.decode(ids[6:]).partition(".")
            correct += bool(stop) and written == str(a + b)
    assert greedy_accuracy(model, task, pairs) == pytest.approx(correct / len(pairs))


class EvenFirstDigit(ArithmeticTask):
    """A reward that a random policy earns half of the time: the first token of the
    completion is an even digit."""

    def reward(self, pairs, completions):
        return (completions[:, 0] % 2 == 0).float()


class NoReward(ArithmeticTask):
    def reward(self, pairs, completions):
        return torch.zeros(len(completions))


def test_pretraining_and_grpo_run_and_leave_the_start_model_alone(task):
    model = pretrain_arithmetic(
        task, steps=2, d_model=16, n_heads=2, n_layers=1, d_ff=32
    )
    assert isinstance(model, BlockLM) and not model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    even = EvenFirstDigit(task.vocab, task.train, task.test)
    config = GRPOConfig(steps=2, prompts=3, G=4, mu=2, lr=1e-2)
    policy, history = train_grpo(model, even, config, evaluate_every=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in before.items())
    assert not policy.training
    assert history["eval_steps"] == [0, 1, 2] and len(history["accuracy"]) == 3
    for name in ("reward", "no_signal", "kl", "clipped", "loss"):
        assert len(history[name]) == 2
    assert history["kl"][0] == 0.0  # the first batch comes from the reference itself
    assert 0 < history["reward"][0] < 1


def test_groups_without_a_spread_teach_nothing(task, tiny):
    """All rewards equal: every advantage is 0, the KL term's gradient is 0 at the
    reference, and the policy does not move."""
    config = GRPOConfig(steps=2, prompts=3, G=4, mu=2, lr=1e-2)
    nothing = NoReward(task.vocab, task.train, task.test)
    policy, history = train_grpo(tiny, nothing, config)
    assert history["no_signal"] == [1.0, 1.0]
    for name, p in tiny.state_dict().items():
        assert torch.equal(policy.state_dict()[name], p)


def test_one_grpo_step_is_trls_loss_and_an_adam_step(task, tiny):
    """train_grpo's first step, recomputed by hand: the same samples, TRL's loss,
    gradient clipping and Adam."""
    config = GRPOConfig(steps=1, prompts=4, G=4, mu=1, lr=1e-2, beta=0.1)
    task = EvenFirstDigit(task.vocab, task.train, task.test)
    policy, history = train_grpo(tiny, task, config, seed=3)
    rng = np.random.default_rng(3)
    pairs = task.train[rng.integers(len(task.train), size=4)].repeat(4, axis=0)
    generator = torch.Generator().manual_seed(3)
    ids = sample(tiny, task.prompts(pairs), task.n_new, 1.0, generator)
    r = task.reward(pairs, ids[:, 6:])
    assert history["reward"] == [r.mean().item()] and 0 < r.mean() < 1
    manual = BlockLM(len(task.vocab), 16, 2, 1, 32)
    manual.load_state_dict(tiny.state_dict())
    logp = sequence_logprobs(manual, ids, 6)
    frozen = logp.detach()
    mask = completion_mask(ids[:, 6:], task.end_id)
    loss = trl_grpo_loss(logp, frozen, group_advantages(r, 4), mask, frozen, beta=0.1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(manual.parameters(), 1.0)
    torch.optim.Adam(manual.parameters(), lr=1e-2).step()
    for name, p in manual.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[name], p, rtol=0, atol=1e-6)
    assert history["loss"][0] == pytest.approx(loss.item(), abs=1e-6)


def test_training_rejects_bad_input(task, tiny):
    with pytest.raises(ValueError, match="G must be at least 2"):
        GRPOConfig(G=1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOConfig(loss_type="dapo")
    with pytest.raises(ValueError, match="lr must be in"):
        GRPOConfig(lr=0.0)
    with pytest.raises(TypeError, match="config must be a GRPOConfig"):
        train_grpo(tiny, task, {"steps": 1})
    with pytest.raises(TypeError, match="task must be an ArithmeticTask"):
        train_grpo(tiny, "1+1=")
    with pytest.raises(TypeError, match="task must be an ArithmeticTask"):
        pretrain_arithmetic(None)
    with pytest.raises(ValueError, match="steps must be positive"):
        pretrain_arithmetic(task, steps=0)
    with pytest.raises(ValueError, match=r"forget must be in \[0, 1\]"):
        pretrain_arithmetic(task, forget=1.5)
