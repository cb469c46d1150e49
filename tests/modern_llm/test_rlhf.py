"""Tests for ``dlabc.modern_llm.rlhf``.

The review task is checked against the corpus it is cut from (every word kept, the
split by film, ``encode``/``decode`` round trips); the sentiment reward against
scikit-learn's ``LogisticRegression`` on the same word counts (the same strictly
convex problem, so the same optimum) and against the count-matrix closed form;
``sequence_logprobs`` against Hugging Face's ``LlamaForCausalLM`` with our weights and
TRL's ``selective_log_softmax``; ``sample`` greedy against HF's ``generate`` and with
temperature against a step-by-step draw without a cache from the same random stream.
The Bradley-Terry loss is PyTorch's binary cross-entropy of the reward difference, its
gradient the closed form; the reward model's fit satisfies the first-order optimality
condition; simulated preferences follow the Bradley-Terry probability at its two
extremes. The per-token KL rewards are checked against their closed form, the sampled
KL estimate against the exact KL by enumerating every completion of a tiny model (and
the chain rule of per-position KLs), the advantages against Stable-Baselines3's
``RolloutBuffer`` (and the Monte Carlo return at lambda = 1); a rollout of a policy
that is its own reference has no KL. Bad input must fail clearly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces
from scipy.sparse import csr_matrix
from sklearn.linear_model import LogisticRegression as SKLogisticRegression
from stable_baselines3.common.buffers import RolloutBuffer
from transformers.utils import logging
from trl.trainer.utils import selective_log_softmax

from dlabc.improvements.modern_block import BlockLM, hf_llama_names
from dlabc.modern_llm.rlhf import (
    PolicyWithValue,
    ReviewTask,
    RewardModel,
    RLHFConfig,
    SentimentReward,
    _corpus,
    bradley_terry_loss,
    kl_penalised_rewards,
    lm_advantages,
    ppo_update,
    preference_pairs,
    pretrain_policy,
    prompts,
    review_task,
    rollout,
    sample,
    sentiment_reward,
    sequence_logprobs,
    train_reward_model,
    train_rlhf,
)
from transformers import LlamaConfig, LlamaForCausalLM

logging.set_verbosity_error()
HF_F32_NORM = dict(atol=2e-5, rtol=2e-5)  # Hugging Face's RMSNorm is float32


@pytest.fixture(scope="module")
def task() -> ReviewTask:
    return review_task()


@pytest.fixture(scope="module")
def reward(task) -> SentimentReward:
    return sentiment_reward(task)


def _tiny_pair(vocab: int = 13, seed: int = 0) -> tuple[BlockLM, LlamaForCausalLM]:
    """A tiny random BlockLM in float64 and HF's Llama with the same weights."""
    torch.manual_seed(seed)
    ours = BlockLM(vocab, 16, 4, 2, 24, n_kv_heads=2, tie_embeddings=False).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms' gains away from 1
    config = LlamaConfig(
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=24,
        num_hidden_layers=2,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = LlamaForCausalLM(config).double().eval()
    hf.load_state_dict(hf_llama_names(ours.state_dict()))
    return ours.eval(), hf


# ------------------------------------------------------------------ the review task


def test_review_task_keeps_whole_snippets_of_known_words_split_by_film(task):
    texts, labels, films = _corpus()[:3]  # data.load_rotten_tomatoes(), read once
    assert task.vocab[0] == "<s>" and len(set(task.vocab)) == len(task.vocab)
    assert task.vocab[1:] == sorted(task.vocab[1:])
    row = {t: i for i, t in enumerate(texts)}
    for k in (0, 7, len(task.texts) - 1):  # labels and films are those of the corpus
        assert task.labels[k] == labels[row[task.texts[k]]]
        assert task.films[k] == films[row[task.texts[k]]]
    assert not set(task.films[task.train]) & set(task.films[task.test])
    assert sorted([*task.train, *task.test]) == list(range(len(task.texts)))
    lengths = [len(task.encode(t)) - 2 for t in task.texts]
    assert 0 < min(lengths) and max(lengths) <= 20
    # every vocabulary word occurs in a training snippet kept
    used = {w for k in task.train for w in task.words(task.texts[k])}
    assert used == set(task.vocab[1:])
    assert 1000 < len(task.texts) < 4000 and 1000 < len(task.vocab) < 5000


def test_encode_decode_round_trip(task):
    text = task.texts[3]
    ids = task.encode(text)
    assert ids[0] == 0 and ids[-1] == 0 and 0 not in ids[1:-1]
    assert task.decode(ids) == " ".join(task.words(text))
    assert task.decode(torch.tensor(ids)) == task.decode(ids)
    assert task.words("It's A-grade, don't!") == ["it's", "a", "grade", "don't"]


def test_review_task_rejects_bad_input(task):
    with pytest.raises(KeyError, match="outside the vocabulary"):
        task.encode("zyzzyva qwxz")
    with pytest.raises(TypeError, match="text must be a str"):
        task.encode(3)
    with pytest.raises(ValueError, match="ids must lie in"):
        task.decode([0, len(task.vocab)])
    with pytest.raises(ValueError, match="min_count must be positive"):
        review_task(min_count=0)
    with pytest.raises(ValueError, match="keep nothing"):
        review_task(min_count=100_000)


# ------------------------------------------------------------------ the reward


def test_sentiment_reward_is_scikit_learns_logistic_regression(task, reward):
    rows, cols = [], []
    for row, k in enumerate(task.train):
        cols += task.encode(task.texts[k])[1:-1]
        rows += [row] * (len(cols) - len(rows))
    X = csr_matrix(
        (np.ones(len(rows)), (rows, cols)), (len(task.train), len(task.vocab))
    )
    y = task.labels[task.train]
    # sklearn minimizes C * sum of losses + |w|^2 / 2; ours the mean loss + l2/2 |w|^2
    sk = SKLogisticRegression(C=1 / (1e-3 * len(y)), solver="newton-cg", tol=1e-8)
    sk.fit(X[:, 1:], y)  # <s> never occurs inside a review
    w = reward.weight.double()
    assert w[0] == 0
    np.testing.assert_allclose(w[1:].numpy(), sk.coef_[0], atol=1e-4)
    assert abs(reward.bias - sk.intercept_[0]) < 1e-4
    # the reward of a batch is b + x^T w, the bag-of-words closed form
    ids = torch.tensor([[0, 5, 9, 5, 0, 17], [3, 3, 3, 3, 3, 3]])
    counts = torch.zeros(2, len(task.vocab), dtype=torch.float64)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    counts[:, 0] = 0
    expected = counts @ w + reward.bias
    torch.testing.assert_close(reward(ids).double(), expected, atol=1e-5, rtol=0)


def test_sentiment_reward_rejects_bad_input(reward):
    with pytest.raises(ValueError, match="ids must have 2 dimensions"):
        reward(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="ids must have dtype torch.int64"):
        reward(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, "):
        reward(torch.tensor([[0, len(reward.weight)]]))
    with pytest.raises(TypeError, match="task must be a ReviewTask"):
        sentiment_reward("reviews")


# ------------------------------------------------------------------ the policy


def test_pretrain_policy_is_a_small_blocklm_deterministic_in_its_seed(task):
    a = pretrain_policy(task, steps=1, seed=3)
    b = pretrain_policy(task, steps=1, seed=3)
    c = pretrain_policy(task, steps=1, seed=4)
    assert isinstance(a, BlockLM) and not a.training
    assert a.vocab_size == len(task.vocab) and a.head.weight is a.embed.weight
    n = sum(p.numel() for p in a.parameters())
    assert 100_000 < n < 1_000_000
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    small = pretrain_policy(task, steps=1, d_model=8, n_heads=2, d_ff=16)
    assert small.d_model == 8


def test_pretrain_policy_rejects_bad_input(task):
    with pytest.raises(ValueError, match="steps must be positive"):
        pretrain_policy(task, steps=0)
    with pytest.raises(TypeError, match="unknown sizes"):
        pretrain_policy(task, steps=1, width=3)
    with pytest.raises(TypeError, match="task must be a ReviewTask"):
        pretrain_policy([], steps=1)


def test_sequence_logprobs_match_hf_llama_and_trl():
    ours, hf = _tiny_pair()
    ids = torch.randint(13, (3, 9))
    for n_prompt in (1, 4, 8):
        got = sequence_logprobs(ours, ids, n_prompt)
        assert got.shape == (3, 9 - n_prompt)
        logits = hf(ids).logits[:, n_prompt - 1 : -1]
        expected = selective_log_softmax(logits, ids[:, n_prompt:])
        torch.testing.assert_close(got, expected, **HF_F32_NORM)
    got = sequence_logprobs(ours, ids, 2)
    got.sum().backward()  # gradients reach the weights
    assert ours.embed.weight.grad is not None and ours.embed.weight.grad.abs().sum() > 0


def test_sequence_logprobs_rejects_bad_input():
    ours, _ = _tiny_pair()
    ids = torch.randint(13, (2, 5))
    with pytest.raises(ValueError, match="n_prompt must be smaller"):
        sequence_logprobs(ours, ids, 5)
    with pytest.raises(ValueError, match="n_prompt must be positive"):
        sequence_logprobs(ours, ids, 0)
    with pytest.raises(TypeError, match="ids must have dtype torch.int64"):
        sequence_logprobs(ours, ids.float(), 1)


def test_sample_greedy_is_hfs_generate_and_sampling_draws_step_by_step():
    ours, hf = _tiny_pair()
    prompts = torch.randint(13, (4, 2))
    greedy = sample(ours, prompts, 7, temperature=0)
    expected = hf.generate(prompts, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    assert torch.equal(greedy, expected)
    drawn = sample(ours, prompts, 6, 0.7, torch.Generator().manual_seed(5))
    assert drawn.shape == (4, 8) and torch.equal(drawn[:, :2], prompts)
    generator = torch.Generator().manual_seed(5)
    sequence = prompts
    with torch.no_grad():
        for _ in range(6):  # the whole sequence every step, no cache
            probs = (hf(sequence).logits[:, -1] / 0.7).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator)
            sequence = torch.cat([sequence, token], 1)
    assert torch.equal(drawn, sequence)


def test_sample_rejects_bad_input():
    ours, _ = _tiny_pair()
    with pytest.raises(ValueError, match="n_new must be positive"):
        sample(ours, torch.zeros(2, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="temperature must be in"):
        sample(ours, torch.zeros(2, 1, dtype=torch.long), 3, temperature=-1.0)


def test_prompts_are_start_and_first_words(task):
    p = prompts(task, "test", n_words=2)
    assert p.shape[1] == 3 and (p[:, 0] == 0).all() and (p[:, 1:] > 0).all()
    first = task.encode(task.texts[task.test[0]])[:3]
    assert p[0].tolist() == first
    with pytest.raises(ValueError, match="side must be"):
        prompts(task, "valid")
    with pytest.raises(ValueError, match="n_words must be positive"):
        prompts(task, "test", n_words=0)


# ------------------------------------------------------------------ Bradley-Terry


def test_bradley_terry_loss_is_bce_and_its_gradient_the_closed_form():
    r_w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    r_l = torch.randn(7, dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(r_w, r_l)
    bce = F.binary_cross_entropy_with_logits(r_w - r_l, torch.ones(7, dtype=r_w.dtype))
    torch.testing.assert_close(loss, bce, atol=1e-14, rtol=0)
    g_w, g_l = torch.autograd.grad(loss, (r_w, r_l))
    # d/dr_w of -log σ(r_w - r_l) / N is -(1 - σ(r_w - r_l)) / N
    expected = -(1 - torch.sigmoid(r_w - r_l)) / 7
    torch.testing.assert_close(g_w, expected.detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(g_l, -expected.detach(), atol=1e-14, rtol=0)


def test_reward_model_sums_word_weights_and_training_reaches_the_optimum():
    model = RewardModel(5).double()
    with torch.no_grad():
        model.phi.weight.copy_(torch.arange(5.0)[:, None])
    ids = torch.tensor([[0, 1, 1, 4], [2, 3, 0, 0]])
    torch.testing.assert_close(
        model(ids), torch.tensor([6.0, 5.0], dtype=torch.float64)
    )
    chosen = torch.randint(5, (40, 4))
    rejected = torch.randint(5, (40, 4))
    model = RewardModel(5).double()
    losses = train_reward_model(model, chosen, rejected, steps=400, weight_decay=0.1)
    assert losses[-1] < losses[0]
    # at the optimum the gradient of the penalised loss vanishes (first-order condition)
    loss = bradley_terry_loss(model(chosen), model(rejected))
    loss = loss + 0.1 / 2 * model.phi.weight.square().sum()
    (grad,) = torch.autograd.grad(loss, model.phi.weight)
    assert grad.abs().max() < 1e-4
    with pytest.raises(ValueError, match="one shape"):
        train_reward_model(model, chosen, rejected[:3])
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        RewardModel(0)


def test_preference_pairs_follow_the_bradley_terry_probability():
    ours, _ = _tiny_pair()
    ours = ours.float()
    p = torch.zeros(400, 1, dtype=torch.long)
    strong = SentimentReward(100.0 * torch.arange(13.0), 0.0)  # σ(Δr) is 0 or 1
    chosen, rejected = preference_pairs(ours, strong, p, 4, torch.Generator())
    differ = strong(chosen) != strong(rejected)
    assert differ.sum() > 300 and (strong(chosen) >= strong(rejected)).all()
    flat = SentimentReward(torch.zeros(13), 0.0)  # σ(0) = 1/2: a fair coin
    chosen, rejected = preference_pairs(ours, flat, p, 4, torch.Generator())
    # which of two different completions won is a coin flip: its id sum is the larger
    # one about half the time (n pairs: standard deviation 0.5 / sqrt(n) < 0.03)
    sums = chosen.sum(1), rejected.sum(1)
    differ = sums[0] != sums[1]
    assert differ.sum() > 300
    first_bigger = (sums[0] > sums[1])[differ].float().mean()
    assert 0.38 < first_bigger < 0.62  # 4 standard deviations


# ------------------------------------------------------------------ RLHF with PPO


def test_kl_penalised_rewards_closed_form():
    logp, ref = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5).double()
    score = torch.randn(3, dtype=torch.float64)
    r = kl_penalised_rewards(logp, ref, score, 0.3)
    expected = -0.3 * (logp - ref)
    expected[:, -1] += score
    torch.testing.assert_close(r, expected, atol=1e-14, rtol=0)
    torch.testing.assert_close(r.sum(1), score - 0.3 * (logp - ref).sum(1))


def test_the_sampled_kl_estimate_is_unbiased_by_enumeration():
    """E_π[Σ_t log π/π_ref] over all V^n completions equals the exact KL of the
    sequence distributions, and the sum over positions of the exact KL of the
    next-token distributions (the chain rule)."""
    torch.manual_seed(1)
    pi = BlockLM(3, 8, 2, 1, 8).double().eval()
    ref = BlockLM(3, 8, 2, 1, 8).double().eval()
    n = 3
    grid = torch.cartesian_prod(*[torch.arange(3)] * n)  # (27, n): every completion
    ids = torch.cat([torch.zeros(27, 1, dtype=torch.long), grid], 1)
    with torch.no_grad():
        logp, logq = sequence_logprobs(pi, ids, 1), sequence_logprobs(ref, ids, 1)
        prob = logp.sum(1).exp()  # π(y)
        assert abs(prob.sum() - 1) < 1e-12
        estimate = (prob * (logp - logq).sum(1)).sum()  # E_π[Σ_t log π/π_ref]
        # PyTorch's KL of the two distributions over the 27 completions
        exact = torch.distributions.kl_divergence(
            torch.distributions.Categorical(probs=prob),
            torch.distributions.Categorical(probs=logq.sum(1).exp()),
        )
        P = torch.distributions.Categorical(logits=pi(ids[:, :-1]))
        Q = torch.distributions.Categorical(logits=ref(ids[:, :-1]))
        per_step = torch.distributions.kl_divergence(P, Q)  # (27, n)
        # position t's KL counts once per prefix y_<t: weight π(y_<t) / (number of
        # completions sharing that prefix) = π(y) summed over the prefix's suffixes
        chain = (prob[:, None] * per_step).sum()
    torch.testing.assert_close(estimate, exact, atol=1e-12, rtol=0)
    torch.testing.assert_close(estimate, chain, atol=1e-12, rtol=0)


def _sb3_gae(rewards, values, gamma, lam):
    """Stable-Baselines3's GAE over B completions of n tokens, each one episode."""
    B, n = rewards.shape
    buffer = RolloutBuffer(
        n, spaces.Box(-1, 1, (1,)), spaces.Discrete(2), "cpu", lam, gamma, n_envs=B
    )
    for t in range(n):
        buffer.add(
            np.zeros((B, 1)),
            np.zeros((B, 1)),
            rewards[:, t].numpy(),
            np.full(B, t == 0),  # an episode starts with the first token
            values[:, t].clone(),
            torch.zeros(B),
        )
    buffer.compute_returns_and_advantage(torch.zeros(B), np.ones(B))  # done at n
    return torch.as_tensor(buffer.advantages.T), torch.as_tensor(buffer.returns.T)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_lm_advantages_match_stable_baselines3(gamma, lam):
    rewards = torch.randn(4, 6, dtype=torch.float64)
    values = torch.randn(4, 6, dtype=torch.float64)
    A, R = lm_advantages(rewards, values, gamma, lam)
    A_sb3, R_sb3 = _sb3_gae(rewards, values, gamma, lam)
    torch.testing.assert_close(A, A_sb3.to(A.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(R, R_sb3.to(R.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(R, A + values)
    if gamma == lam == 1.0:  # Monte Carlo: the reward still to come, minus V
        to_go = rewards.flip(1).cumsum(1).flip(1)
        torch.testing.assert_close(A, to_go - values)


def test_rollout_and_train_rlhf_on_a_tiny_policy():
    ours, _ = _tiny_pair()
    ours = ours.float()
    reward = SentimentReward(torch.linspace(-1, 1, 13), 0.5)
    c = RLHFConfig(beta=0.2, n_new=4, batch_size=8, minibatch=4, lam=1.0)
    agent = PolicyWithValue(ours)
    p = torch.randint(13, (8, 2))
    batch = rollout(agent, ours, reward, p, c, torch.Generator().manual_seed(0))
    assert batch["ids"].shape == (8, 6) and batch["A"].shape == (8, 4)
    # the policy is its own reference: no KL; with V = 0 and λ = 1 the return is R
    assert batch["kl"].abs().max() < 1e-5
    torch.testing.assert_close(batch["A"], batch["returns"])
    torch.testing.assert_close(batch["returns"][:, 0], reward(batch["ids"]))
    before = [p.clone() for p in ours.parameters()]
    policy, history = train_rlhf(ours, reward, p, 3, c)
    assert len(history["score"]) == len(history["kl"]) == 3 and history["kl"][0] == 0
    assert policy is not ours and not policy.training
    for p0, p1 in zip(before, ours.parameters(), strict=True):
        assert torch.equal(p0, p1)  # the reference is left untouched
    with pytest.raises(ValueError, match="values must have the shape of rewards"):
        lm_advantages(torch.zeros(8, 4), torch.zeros(8, 3))
    with pytest.raises(ValueError, match="beta must be in"):
        RLHFConfig(beta=-1.0)
    with pytest.raises(TypeError, match="config must be an RLHFConfig"):
        train_rlhf(ours, reward, p, 1, config={})
    with pytest.raises(ValueError, match="iterations must be positive"):
        train_rlhf(ours, reward, p, 0)


def test_ppo_update_raises_the_probability_of_tokens_with_positive_advantage():
    """At the rollout's policy the clipped surrogate's gradient is the policy
    gradient, so a small step along it raises E[Â log π] (to first order)."""
    ours, _ = _tiny_pair()
    agent = PolicyWithValue(ours).double()
    reward = SentimentReward(torch.linspace(-1, 1, 13, dtype=torch.float64), 0.0)
    c = RLHFConfig(beta=0.1, n_new=4, batch_size=32, minibatch=32, epochs=1, vf_coef=0)
    generator = torch.Generator().manual_seed(0)
    p = torch.randint(13, (32, 2), generator=generator)
    batch = rollout(agent, ours, reward, p, c, generator)
    optimizer = torch.optim.SGD(agent.parameters(), lr=1e-3)
    ppo_update(agent, optimizer, batch, c, generator)
    with torch.no_grad():
        change = sequence_logprobs(agent.lm, batch["ids"], 2) - batch["logprobs"]
    A = batch["A"]
    assert change.abs().max() > 0
    assert (change * (A - A.mean()) / A.std()).mean() > 0
