"""Tests for ``dlabc.modern_llm.dpo``.

The losses (DPO, IPO with TRL's division by the completion length, the robust variant)
are compared in float64 with TRL 1.16's own ``DPOTrainer._compute_loss``, called
unbound on a stand-in trainer and model that hand it chosen per-token log-probabilities;
conservative DPO, which TRL 1.16 no longer has, is TRL's sigmoid loss averaged over the
labels as given and flipped. The gradient is DPO's published formula. The optimum of the
KL-constrained objective is checked by its closed-form value and by SciPy's optimiser,
IPO's optimum by NumPy's least squares on the population loss, the bandit's trained
policy by scikit-learn's (unregularised) logistic regression on the same pairs. On a
tiny random ``BlockLM``: one step of ``train_dpo`` equals Adam on TRL's loss, and its
logged implicit rewards, margins and accuracies equal TRL's metrics; the Monte Carlo KL
is checked against the exact KL by enumeration.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from trl.trainer.dpo_trainer import DPOTrainer

from dlabc.improvements.modern_block import BlockLM
from dlabc.modern_llm.dpo import (
    PreferencePairs,
    bandit_preferences,
    bradley_terry,
    dpo_loss,
    dpo_pairs,
    implicit_reward,
    ipo_optimal_policy,
    optimal_policy,
    sequence_kl,
    train_bandit,
    train_dpo,
    win_rate,
)
from dlabc.modern_llm.rlhf import sequence_logprobs

F64 = dict(atol=1e-10, rtol=1e-10)
PI_REF = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
REWARD = torch.tensor([-1.0, 0.5, 0.0, 2.0], dtype=torch.float64)


# ---------------------------------------------------------------------------------
# TRL's loss, on log-probabilities we choose
# ---------------------------------------------------------------------------------


def trl_compute_loss(token_logps, completion_mask, ref_chosen, ref_rejected, **args):
    """TRL's ``DPOTrainer._compute_loss`` on per-token log-probs ``(2B, T - 1)``
    (chosen rows first), with the trainer's state it reads as a stand-in; returns the
    loss and TRL's logged metrics."""

    def model(*, labels, fused_lm_head, **kwargs):
        """As TRL's fused LM head: the log-prob of each next label, 0 where TRL's own
        ``labels`` (built from the completion mask) are -100."""
        assert fused_lm_head
        log_probs = token_logps.masked_fill(labels[:, 1:] == -100, 0.0)
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"),
            gather_for_metrics=lambda x: x,
            gather=lambda x: x,
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[args["loss_type"]],
        loss_weights=[1.0],
        beta=args["beta"],
        label_smoothing=args.get("label_smoothing", 0.0),
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _batch(B=6, T=9, seed=0):
    """Per-token log-probs of B chosen and B rejected completions after a 2-token
    prompt, of different lengths (padding at the end), and reference sums."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T - 2, (2 * B,), generator=g)
    positions = torch.arange(T)
    mask = ((positions >= 2) & (positions < 2 + lengths[:, None])).long()  # (2B, T)
    token_logps = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 3 * lengths
    return token_logps, mask, ref[:B], ref[B:]


def _ours(token_logps, mask, ref_chosen, ref_rejected, **kwargs):
    logps = (token_logps * mask[:, 1:]).sum(1)
    lengths = mask.sum(1)
    B = len(ref_chosen)
    return dpo_loss(
        logps[:B],
        logps[B:],
        ref_chosen,
        ref_rejected,
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
        **kwargs,
    )


@pytest.mark.parametrize(
    "args",
    [
        dict(loss_type="sigmoid", beta=0.1),
        dict(loss_type="sigmoid", beta=2.0),
        dict(loss_type="ipo", beta=0.1),
        dict(loss_type="ipo", beta=1.5),
        dict(loss_type="robust", beta=0.3, label_smoothing=0.2),
        dict(loss_type="robust", beta=0.3, label_smoothing=0.0),
    ],
)
def test_the_losses_equal_trls(args):
    batch = _batch()
    theirs, _ = trl_compute_loss(*batch, **args)
    ours = _ours(*batch, **args)
    assert ours.shape == (6,)
    torch.testing.assert_close(ours.mean(), theirs, **F64)


def test_conservative_dpo_is_trls_sigmoid_over_flipped_labels():
    token_logps, mask, ref_chosen, ref_rejected = _batch(seed=1)
    eps, beta = 0.15, 0.5
    as_given, _ = trl_compute_loss(
        token_logps, mask, ref_chosen, ref_rejected, loss_type="sigmoid", beta=beta
    )
    swap = torch.cat([torch.arange(6, 12), torch.arange(6)])
    flipped, _ = trl_compute_loss(
        token_logps[swap],
        mask[swap],
        ref_rejected,
        ref_chosen,
        loss_type="sigmoid",
        beta=beta,
    )
    ours = _ours(
        token_logps,
        mask,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type="conservative",
        label_smoothing=eps,
    )
    torch.testing.assert_close(ours.mean(), (1 - eps) * as_given + eps * flipped, **F64)


def test_ipo_without_lengths_is_the_papers_squared_loss():
    g = torch.Generator().manual_seed(2)
    a, b, c, d = torch.randn(4, 5, generator=g, dtype=torch.float64)
    h = (a - c) - (b - d)
    torch.testing.assert_close(
        dpo_loss(a, b, c, d, 0.25, "ipo"), (h - 1 / (2 * 0.25)) ** 2, **F64
    )


def test_the_gradient_is_dpos_published_formula():
    """Rafailov et al., section 4: the gradient of the DPO loss is
    -β σ(r̂_l - r̂_w) (∇ log π(y_w) - ∇ log π(y_l)), r̂ the implicit rewards."""
    g = torch.Generator().manual_seed(3)
    pi_w = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    pi_l = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    ref_w, ref_l = torch.randn(2, 7, generator=g, dtype=torch.float64)
    beta = 0.7
    dpo_loss(pi_w, pi_l, ref_w, ref_l, beta).sum().backward()
    r_w = implicit_reward(pi_w.detach(), ref_w, beta)
    r_l = implicit_reward(pi_l.detach(), ref_l, beta)
    weight = beta * torch.sigmoid(r_l - r_w)
    torch.testing.assert_close(pi_w.grad, -weight, **F64)
    torch.testing.assert_close(pi_l.grad, weight, **F64)


# ---------------------------------------------------------------------------------
# The optima, and the bandit
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.2, 1.0, 5.0])
def test_the_optimal_policy_maximises_the_kl_constrained_objective(beta):
    def objective(pi):  # E_π[r] - β KL(π || π_ref)
        return (pi * REWARD).sum() - beta * (pi * (pi / PI_REF).log()).sum()

    star = optimal_policy(PI_REF, REWARD, beta)
    log_Z = torch.logsumexp(PI_REF.log() + REWARD / beta, 0)
    torch.testing.assert_close(objective(star), beta * log_Z, **F64)  # β log Z

    def negative(z):  # SciPy over the logits of a softmax policy
        return -objective(torch.softmax(torch.tensor(z), 0)).item()

    found = minimize(negative, np.zeros(4), method="BFGS", options=dict(gtol=1e-10))
    best = torch.softmax(torch.tensor(found.x), 0)
    torch.testing.assert_close(best, star, atol=1e-5, rtol=0)


def test_ipo_optimum_minimises_the_population_ipo_loss():
    """Least squares over g = log π / π_ref: pairs (i, j) ~ π_ref², target
    h(i, j) = g_i - g_j = (p(i ≻ j) - 1/2) / τ (Azar et al., 2024)."""
    tau, K = 0.3, 4
    P = bradley_terry(REWARD)
    rows, targets, weights = [], [], []
    for i, j in itertools.product(range(K), repeat=2):
        row = np.zeros(K)
        row[i] += 1
        row[j] -= 1
        rows.append(row)
        targets.append((P[i, j].item() - 0.5) / tau)
        weights.append(np.sqrt((PI_REF[i] * PI_REF[j]).item()))
    w = np.array(weights)
    g, *_ = np.linalg.lstsq(np.array(rows) * w[:, None], np.array(targets) * w)
    expected = torch.softmax(PI_REF.log() + torch.tensor(g), 0)
    torch.testing.assert_close(ipo_optimal_policy(PI_REF, P, tau), expected, **F64)


def test_bradley_terry():
    P = bradley_terry(REWARD).numpy()
    r = REWARD.numpy()
    np.testing.assert_allclose(P, 1 / (1 + np.exp(r[None, :] - r[:, None])), rtol=1e-12)
    np.testing.assert_allclose(P + P.T, np.ones((4, 4)), rtol=1e-12)


@pytest.mark.parametrize("flip", [0.0, 0.3])
def test_bandit_preferences_follow_bradley_terry(flip):
    g = torch.Generator().manual_seed(4)
    n = 200_000
    chosen, rejected = bandit_preferences(PI_REF, REWARD, n, flip, generator=g)
    counts = torch.zeros(4, 4, dtype=torch.float64)
    counts.index_put_((chosen, rejected), torch.ones(n, dtype=torch.float64), True)
    drawn = counts + counts.T  # how often each pair was drawn, in either order
    off = ~torch.eye(4, dtype=torch.bool)
    wins = (counts / drawn)[off]
    P = bradley_terry(REWARD)
    expected = ((1 - flip) * P + flip * (1 - P))[off]
    std = (expected * (1 - expected) / drawn[off]).sqrt()
    assert ((wins - expected).abs() < 5 * std).all()
    pair_share = drawn / n  # each unordered pair {i, j}, i ≠ j, drawn w.p. 2 π_i π_j
    torch.testing.assert_close(
        pair_share[off], (2 * PI_REF[:, None] * PI_REF)[off], atol=5e-3, rtol=0
    )


def test_train_bandit_is_the_bradley_terry_maximum_likelihood():
    """DPO on the bandit is logistic regression of the labels on e_w - e_l: its
    weights are β(θ - log π_ref) up to a constant."""
    g = torch.Generator().manual_seed(5)
    chosen, rejected = bandit_preferences(PI_REF, REWARD, 3000, generator=g)
    beta = 0.5
    ours = train_bandit(PI_REF, chosen, rejected, beta, steps=600, lr=0.1)
    X = F.one_hot(chosen, 4).double() - F.one_hot(rejected, 4).double()
    X, y = torch.cat([X, -X]).numpy(), np.r_[np.ones(3000), np.zeros(3000)]
    fit = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-12, max_iter=10_000)
    w = torch.tensor(fit.fit(X, y).coef_[0])
    expected = torch.softmax(PI_REF.log() + w / beta, 0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_train_bandit_with_ipo_reaches_ipos_optimum():
    g = torch.Generator().manual_seed(6)
    chosen, rejected = bandit_preferences(PI_REF, REWARD, 100_000, generator=g)
    pi = train_bandit(PI_REF, chosen, rejected, 0.5, "ipo", steps=300, lr=0.1)
    star = ipo_optimal_policy(PI_REF, bradley_terry(REWARD), 0.5)
    assert 0.5 * (pi - star).abs().sum() < 0.01 < 0.5 * (PI_REF - star).abs().sum()


# ---------------------------------------------------------------------------------
# A tiny language model
# ---------------------------------------------------------------------------------

V = 7


def _tiny_lm(seed):
    torch.manual_seed(seed)
    model = BlockLM(V, d_model=16, n_heads=2, n_layers=1, d_ff=24).double()
    with torch.no_grad():
        model.head.weight.mul_(8)  # a less uniform policy
    return model.eval()


def _reward(ids):
    weight = torch.linspace(-1, 1, V, dtype=torch.float64)
    return weight[ids].sum(-1)


@pytest.fixture(scope="module")
def world():
    reference = _tiny_lm(0)
    prompts = torch.randint(1, V, (12, 2), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    return reference, prompts, dpo_pairs(reference, _reward, prompts, 4, g)


def test_preference_pairs(world):
    reference, prompts, pairs = world
    assert len(pairs) == 12 and pairs.chosen.shape == (12, 6) and pairs.n_prompt == 2
    assert torch.equal(pairs.chosen[:, :2], prompts)
    assert torch.equal(pairs.rejected[:, :2], prompts)
    torch.testing.assert_close(pairs.chosen_reward, _reward(pairs.chosen), **F64)
    with torch.no_grad():  # log π_ref(y | x) from the full softmax
        logp = reference(pairs.chosen).log_softmax(-1)[:, 1:-1]
    expected = logp.gather(-1, pairs.chosen[:, 2:, None]).sum((1, 2))
    torch.testing.assert_close(pairs.ref_chosen_logps, expected, **F64)


def test_preference_labels_follow_bradley_terry():
    """Completions of one token and a reward that separates them by ±3: the chosen
    one is the better with probability σ(3)."""
    reference = _tiny_lm(1)
    prompts = torch.ones(4000, 1, dtype=torch.long)
    pairs = dpo_pairs(
        reference,
        lambda ids: 3.0 * (ids[:, -1] % 2).double(),
        prompts,
        1,
        torch.Generator().manual_seed(9),
    )
    differ = pairs.chosen_reward != pairs.rejected_reward
    better = (pairs.chosen_reward > pairs.rejected_reward)[differ].double()
    p = torch.sigmoid(torch.tensor(3.0)).item()
    assert abs(better.mean().item() - p) < 4 * (p * (1 - p) / len(better)) ** 0.5


def test_one_step_of_train_dpo_is_adam_on_trls_loss_with_trls_metrics(world):
    _, _, pairs = world
    policy = _tiny_lm(6)  # not the reference, so the implicit rewards differ from 0
    ours, theirs = copy.deepcopy(policy), copy.deepcopy(policy)
    args = dict(loss_type="sigmoid", beta=0.4)
    history = train_dpo(ours, pairs, 0.4, steps=1, batch_size=len(pairs), lr=0.01)

    both = torch.cat([pairs.chosen, pairs.rejected])
    theirs.train()
    token_logps = torch.zeros(24, 5, dtype=torch.float64)
    token_logps[:, 1:] = sequence_logprobs(theirs, both, 2)  # positions 2..5
    mask = torch.tensor([0, 0, 1, 1, 1, 1]).repeat(24, 1)
    loss, metrics = trl_compute_loss(
        token_logps, mask, pairs.ref_chosen_logps, pairs.ref_rejected_logps, **args
    )
    optimizer = torch.optim.Adam(theirs.parameters(), lr=0.01)
    loss.backward()
    optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, **F64)
    assert not ours.training
    assert history.loss[0] == pytest.approx(loss.item(), rel=1e-12)
    for name, trl_name in [
        ("chosen_reward", "rewards/chosen"),
        ("rejected_reward", "rewards/rejected"),
        ("margin", "rewards/margins"),
        ("accuracy", "rewards/accuracies"),
    ]:
        assert getattr(history, name)[0] == pytest.approx(
            metrics[trl_name][0], rel=1e-12
        )


def test_sequence_kl_estimates_the_exact_kl():
    policy, reference = _tiny_lm(2), _tiny_lm(3)
    prompt = torch.tensor([[3]])
    every = torch.tensor(list(itertools.product(range(V), repeat=2)))  # (V², 2)
    ids = torch.cat([prompt.expand(len(every), 1), every], 1)
    with torch.no_grad():
        log_p = sequence_logprobs(policy, ids, 1).sum(-1)
        log_q = sequence_logprobs(reference, ids, 1).sum(-1)
    exact = (log_p.exp() * (log_p - log_q)).sum().item()
    terms = (log_p - log_q).numpy()
    std = np.sqrt((log_p.exp().numpy() * (terms - exact) ** 2).sum() / 4000)
    estimate = sequence_kl(
        policy, reference, prompt.expand(4000, 1), 2, torch.Generator().manual_seed(10)
    )
    assert abs(estimate - exact) < 4 * std
    assert sequence_kl(policy, policy, prompt.expand(50, 1), 2) == 0.0


def test_win_rate_against_enumeration():
    """One-token completions of one prompt: the exact win rate is
    sum over a, b of p(a) q(b) ([r(a) > r(b)] + [r(a) = r(b)] / 2)."""
    policy, reference = _tiny_lm(4), _tiny_lm(5)
    prompts = torch.ones(4000, 1, dtype=torch.long)
    with torch.no_grad():
        p = policy(prompts[:1])[0, -1].softmax(-1)  # (V,)
        q = reference(prompts[:1])[0, -1].softmax(-1)
    r = _reward(torch.arange(V)[:, None])  # (V,)
    beats = (r[:, None] > r[None, :]).double() + 0.5 * (r[:, None] == r[None, :])
    exact = (p[:, None] * q[None, :] * beats).sum().item()
    g = torch.Generator().manual_seed(11)
    estimate = win_rate(policy, reference, _reward, prompts, 1, g)
    assert abs(estimate - exact) < 4 * 0.5 / 4000**0.5
    constant = lambda ids: torch.zeros(len(ids))  # noqa: E731
    assert win_rate(policy, reference, constant, prompts, 3, g) == 0.5  # all ties


# ---------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------


def test_bad_input_gets_a_clear_error(world):
    reference, prompts, pairs = world
    x = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="ref_rejected_logps must have shape"):
        dpo_loss(x, x, x, torch.zeros(4, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(x, x, x, x, 0.1, "hinge")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(x, x, x, x, 0.1, "robust", 0.5)
    with pytest.raises(ValueError, match="beta must be in"):
        dpo_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="chosen_lengths must have shape"):
        dpo_loss(x, x, x, x, 0.1, "ipo", chosen_lengths=torch.ones(2))
    with pytest.raises(ValueError, match="pi_ref must be positive and sum to 1"):
        optimal_policy(torch.tensor([0.5, 0.6]), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="reward must have the shape of pi_ref"):
        optimal_policy(PI_REF, torch.zeros(3, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="preference must have shape"):
        ipo_optimal_policy(PI_REF, torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="flip must be in"):
        bandit_preferences(PI_REF, REWARD, 10, flip=0.5)
    with pytest.raises(ValueError, match="chosen must hold answers in 0..3"):
        train_bandit(PI_REF, torch.tensor([4]), torch.tensor([0]), 1.0)
    with pytest.raises(TypeError, match="reference must be a DecoderLM"):
        dpo_pairs(lambda ids: ids, _reward, prompts, 3)
    with pytest.raises(TypeError, match="prompts must have dtype torch.int64"):
        dpo_pairs(reference, _reward, prompts.double(), 3)
    with pytest.raises(TypeError, match="pairs must be PreferencePairs"):
        train_dpo(reference, (pairs.chosen, pairs.rejected), 0.1)
    with pytest.raises(ValueError, match="n_new must be positive"):
        win_rate(reference, reference, _reward, prompts, 0)
    with pytest.raises(TypeError, match="policy must be a DecoderLM"):
        sequence_kl(None, reference, prompts, 3)
    with pytest.raises(ValueError, match="ref_logps must have the shape of logps"):
        implicit_reward(x, torch.zeros(2, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="reward must have 1 dimensions"):
        bradley_terry(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="beta must be in"):
        train_dpo(copy.deepcopy(reference), pairs, -1.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        train_bandit(PI_REF, torch.tensor([1]), torch.tensor([0]), 1.0, "hinge")
    assert isinstance(pairs, PreferencePairs)
