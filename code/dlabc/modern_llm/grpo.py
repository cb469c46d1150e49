r"""Group-relative policy optimisation (GRPO) with verifiable rewards.

Chapter: ``book/modern_llm/grpo.md``. GRPO is PPO without a critic: it samples a
group of $G$ completions for every prompt, scores them with a reward, and uses each
completion's reward, standardised within its group, as the advantage of every one of
its tokens (:func:`group_advantages`). The loss is PPO's clipped surrogate per token
plus a KL penalty to a frozen reference model, estimated per token with Schulman's
"k3" estimator (:func:`k3_kl`), averaged over each completion and then over the batch
(:func:`grpo_loss`). The task is arithmetic whose answers a rule can check
(:class:`ArithmeticTask`), the verifiable rewards of DeepSeek-R1; a small policy is
first trained on worked examples (:func:`pretrain_arithmetic`), then with GRPO
(:func:`train_grpo`).

References:
- Shao, Wang, Zhu, Xu, Song, Bi, Zhang, Zhang, Li, Wu & Guo (2024), *DeepSeekMath:
  Pushing the Limits of Mathematical Reasoning in Open Language Models* (GRPO: the
  group-relative advantages, the per-token clipped objective with the k3 KL term).
- DeepSeek-AI (2025), *DeepSeek-R1: Incentivizing Reasoning Capability in LLMs via
  Reinforcement Learning* (GRPO with rule-based accuracy rewards).
- Schulman (2020), *Approximating KL Divergence*, http://joschu.net/blog/kl-approx.html
  (the k3 estimator).
- Schulman, Wolski, Dhariwal, Radford & Klimov (2017), *Proximal Policy Optimization
  Algorithms* (the clipped surrogate objective).
- Liu, Chen, Li, Qi, Pang, Du, Lee & Lin (2025), *Understanding R1-Zero-Like Training: A
  Critical Perspective* (Dr. GRPO: the length and standard-deviation biases,
  ``loss_type="dr_grpo"`` and ``scale=False``).

The loss and the advantages follow TRL's ``GRPOTrainer`` (its ``loss_type`` values
``"grpo"``, ``"bnpo"`` and ``"dr_grpo"``, its $10^{-4}$ in the denominator of the
advantages and its unbiased standard deviation); the tests compare them with TRL's own
code on the same inputs.

Shapes: ``B`` completions (``G`` per prompt), ``P`` prompt length, ``n`` completion
length.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.improvements.modern_block import BlockLM
from dlabc.modern_llm.rlhf import sample, sequence_logprobs
from dlabc.train import train_steps

__all__ = [
    "group_advantages",
    "k3_kl",
    "grpo_loss",
    "completion_mask",
    "ArithmeticTask",
    "arithmetic_task",
    "careless_answers",
    "pretrain_arithmetic",
    "greedy_accuracy",
    "GRPOConfig",
    "train_grpo",
    "trl_grpo_loss",
]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


# ---------------------------------------------------------------------------------
# 1. Group-relative advantages
# ---------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, G: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    r"""The advantage of each of the ``B = (number of prompts) * G`` completions in
    ``rewards`` ``(B,)``, whose consecutive runs of ``G`` answer one prompt:
    $\hat A_i = (r_i - \mathrm{mean}(\mathbf r)) / (\mathrm{std}(\mathbf r) +
    \epsilon)$ within each group (``scale=False``: no division, Dr. GRPO)."""
    check_tensor(rewards, "rewards", ndim=1, floating=True)
    check_positive_int(G, "G")
    if G < 2:
        raise ValueError(f"G must be at least 2 (a group needs a spread), got {G}")
    if len(rewards) % G:
        raise ValueError(
            f"rewards must hold a whole number of groups of G={G}, got {len(rewards)}"
        )
    if not isinstance(scale, bool):
        raise TypeError(f"scale must be a bool, got {scale!r}")
    check_number(eps, "eps", low=0)
    return _group_advantages(rewards, G, scale, eps)


def _group_advantages(
    rewards: torch.Tensor, G: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    r = rewards.view(-1, G)  # (prompts, G): one row per group
    A = r - r.mean(dim=1, keepdim=True)  # r_i - mean(r), the group is the baseline
    if scale:
        A = A / (r.std(dim=1, keepdim=True) + eps)  # std with G - 1, as TRL
    return A.flatten()  # (B,)


# ---------------------------------------------------------------------------------
# 2. The k3 estimator of the KL divergence, and the loss
# ---------------------------------------------------------------------------------


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    r"""Schulman's k3 estimate of $\mathrm{KL}(\pi_\theta \,\|\, \pi_{ref})$ from
    tokens sampled from $\pi_\theta$, one per token:
    $k_3 = \frac{\pi_{ref}}{\pi_\theta} - \log \frac{\pi_{ref}}{\pi_\theta} - 1
    \ \ge 0$, unbiased, and never negative."""
    log_ratio = ref_logp - logp  # log π_ref / π_θ
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    A: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    clip: float = 0.2,
    beta: float = 0.04,
    loss_type: str = "grpo",
) -> torch.Tensor:
    r"""GRPO's loss for ``B`` completions of ``n`` tokens: the log-probabilities of
    their tokens under the policy ``logp`` (with gradients), under the policy that
    sampled them ``old_logp`` and under the reference ``ref_logp`` (all ``(B, n)``;
    ``ref_logp`` may be None when ``beta == 0``), the advantages ``A`` ``(B,)`` or
    ``(B, n)``, and ``mask`` ``(B, n)``, 1 on the tokens that count.

    ``loss_type`` says how the per-token losses are averaged: ``"grpo"`` over each
    completion, then over completions (DeepSeekMath); ``"bnpo"`` over all tokens of the
    batch; ``"dr_grpo"`` summed and divided by ``B * n`` (Dr. GRPO).
    """
    check_tensor(logp, "logp", ndim=2, floating=True)
    shape = tuple(logp.shape)
    named = {"old_logp": old_logp, "mask": mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    for name, x in named.items():
        check_tensor(x, name, ndim=2)
        if tuple(x.shape) != shape:
            raise ValueError(
                f"{name} must have the shape of logp {shape}, got {x.shape}"
            )
    check_tensor(A, "A", ndim=(1, 2), floating=True)
    if A.shape[0] != shape[0] or (A.dim() == 2 and tuple(A.shape) != shape):
        raise ValueError(f"A must have shape ({shape[0]},) or {shape}, got {A.shape}")
    check_number(clip, "clip", low=0, low_open=True)
    check_number(beta, "beta", low=0)
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp is needed when beta > 0 (the KL penalty)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if A.dim() == 1:
        A = A[:, None]  # (B, 1): one advantage for every token of a completion
    return _grpo_loss(
        logp, old_logp, A, mask.to(logp.dtype), ref_logp, clip, beta, loss_type
    )


def _grpo_loss(logp, old_logp, A, mask, ref_logp, clip, beta, loss_type):
    r"""$\begin{gathered}
    \rho_{i,t} = \pi_\theta(o_{i,t} \mid q, o_{i,<t}) /
    \pi_{\theta_{old}}(o_{i,t} \mid q, o_{i,<t}), \\
    \ell_{i,t} = -\min\big(\rho_{i,t} \hat A_i,\
    \mathrm{clip}(\rho_{i,t}, 1 - \epsilon, 1 + \epsilon)\, \hat A_i\big)
    + \beta\, k_3(\pi_\theta, \pi_{ref})_{i,t}, \\
    \mathcal L = \frac1B \sum_{i=1}^B \frac{1}{|o_i|} \sum_{t=1}^{|o_i|} \ell_{i,t}
    \quad (\texttt{"grpo"}).
    \end{gathered}$"""
    rho = torch.exp(logp - old_logp)  # (B, n): the ratio π_θ / π_θold per token
    surrogate = torch.min(rho * A, torch.clamp(rho, 1 - clip, 1 + clip) * A)
    loss = -surrogate  # (B, n): PPO's clipped objective, to minimise
    if beta != 0:
        loss = loss + beta * k3_kl(logp, ref_logp)  # + β KL(π_θ ‖ π_ref)
    if loss_type == "grpo":  # mean over each completion's tokens, then over the batch
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":  # mean over every token of the batch
        return (loss * mask).sum() / mask.sum().clamp(min=1)
    return (loss * mask).sum() / mask.numel()  # "dr_grpo": a constant normaliser


def completion_mask(completions: torch.Tensor, end_id: int) -> torch.Tensor:
    """1.0 on the tokens of each completion ``(B, n)`` up to and including its first
    ``end_id``, 0.0 after it (all 1.0 where there is none): the tokens GRPO trains."""
    check_tensor(completions, "completions", ndim=2, dtype=torch.long)
    if isinstance(end_id, bool) or not isinstance(end_id, int):
        raise TypeError(f"end_id must be an int, got {end_id!r}")
    is_end = (completions == end_id).long()  # (B, n)
    ends_before = is_end.cumsum(-1) - is_end  # how many ends precede each token
    return (ends_before == 0).float()  # (B, n)


# ---------------------------------------------------------------------------------
# 3. The task: arithmetic that a rule can check
# ---------------------------------------------------------------------------------


@dataclass
class ArithmeticTask:
    """Additions of two numbers below 100, written as characters: the prompt
    ``"07+45="`` (both numbers with two digits, so every prompt has 6 tokens), the
    answer ``"52."``, its digits and a full stop that ends it.

    ``train`` and ``test`` hold pairs ``(a, b)`` as int64 arrays ``(N, 2)``: every
    pair is in exactly one of them. A completion has ``n_new`` tokens, enough for
    the longest answer (``"198."``).
    """

    vocab: str
    train: np.ndarray
    test: np.ndarray
    n_prompt: int = 6
    n_new: int = 4

    @property
    def end_id(self) -> int:
        return self.vocab.index(".")

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.vocab))
        if unknown:
            raise ValueError(f"text has characters outside the vocabulary: {unknown}")
        return [self.vocab.index(c) for c in text]

    def decode(self, ids) -> str:
        ids = (
            ids.tolist() if isinstance(ids, torch.Tensor) else np.asarray(ids).tolist()
        )
        return "".join(self.vocab[i] for i in ids)

    def prompts(self, pairs: np.ndarray) -> torch.Tensor:
        """The prompts ``"ab+cd="`` of ``pairs`` ``(N, 2)``: ids ``(N, 6)``."""
        pairs = self._check_pairs(pairs)
        texts = [f"{a:02d}+{b:02d}=" for a, b in pairs.tolist()]
        return torch.tensor([self.encode(t) for t in texts])

    def examples(
        self, pairs: np.ndarray, answers: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Worked examples ``"ab+cd=answer."``, padded with full stops: ids
        ``(N, 6 + n_new)`` and a mask ``(N, n_new)``, 1 on the answer's tokens. The
        answers are the sums unless ``answers`` ``(N,)`` says otherwise."""
        pairs = self._check_pairs(pairs)
        answers = pairs.sum(1) if answers is None else answers
        if np.shape(answers) != (len(pairs),):
            raise ValueError(f"answers must have shape ({len(pairs)},)")
        written = [self.encode(f"{answer}.") for answer in np.asarray(answers).tolist()]
        ids = torch.full((len(pairs), self.n_new), self.end_id)
        mask = torch.zeros(len(pairs), self.n_new)
        for i, answer in enumerate(written):
            ids[i, : len(answer)] = torch.tensor(answer)
            mask[i, : len(answer)] = 1.0
        return torch.cat([self.prompts(pairs), ids], dim=1), mask

    def reward(self, pairs: np.ndarray, completions: torch.Tensor) -> torch.Tensor:
        """The rule-based reward of each completion ``(N, n)`` for ``pairs``: 1.0 if
        the text before its first full stop is the sum in digits, else 0.0 (a
        completion with no full stop has no answer). ``(N,)`` float32, on the device of
        ``completions``."""
        pairs = self._check_pairs(pairs)
        check_tensor(completions, "completions", ndim=2, dtype=torch.long)
        if len(completions) != len(pairs):
            raise ValueError(
                f"completions must have one row per pair ({len(pairs)}), "
                f"got {len(completions)}"
            )
        return torch.tensor(
            [
                _is_correct(self.decode(c), a + b)
                for (a, b), c in zip(pairs.tolist(), completions.cpu(), strict=True)
            ],
            device=completions.device,
        )

    def _check_pairs(self, pairs: object) -> np.ndarray:
        if not isinstance(pairs, np.ndarray) or pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError("pairs must be a NumPy array of shape (N, 2)")
        if not np.issubdtype(pairs.dtype, np.integer):
            raise TypeError(f"pairs must hold integers, got dtype {pairs.dtype}")
        if pairs.size and (pairs.min() < 0 or pairs.max() > 99):
            raise ValueError("pairs must hold numbers from 0 to 99")
        return pairs


def _is_correct(text: str, answer: int) -> float:
    """The rule: 1.0 if ``text`` is the digits of ``answer`` then a full stop."""
    written, stop, _ = text.partition(".")
    return float(bool(stop) and written.isdigit() and int(written) == answer)


def arithmetic_task(n_test: int = 500, seed: int = 0) -> ArithmeticTask:
    """All 10,000 additions ``a + b`` with ``0 <= a, b <= 99``; ``n_test`` of them,
    drawn at random with ``seed``, are held out for testing."""
    check_positive_int(n_test, "n_test")
    if n_test >= 10_000:
        raise ValueError(f"n_test must leave pairs to train on, got {n_test}")
    pairs = np.stack(np.divmod(np.arange(10_000), 100), axis=1)  # (10000, 2): a, b
    order = np.random.default_rng(seed).permutation(len(pairs))
    return ArithmeticTask("0123456789+=.", pairs[order[n_test:]], pairs[order[:n_test]])


# ---------------------------------------------------------------------------------
# 4. The policy before reinforcement learning: trained on worked examples
# ---------------------------------------------------------------------------------


def careless_answers(
    pairs: np.ndarray, forget: float, rng: np.random.Generator
) -> np.ndarray:
    """The answers of a careless teacher to ``pairs`` ``(N, 2)``: the sums, except
    that where the units overflow (a carry into the tens), the teacher forgets the
    carry with probability ``forget`` and writes a sum 10 too small. ``(N,)``."""
    carry = (pairs % 10).sum(axis=1) >= 10  # the units digits add up to 10 or more
    forgets = carry & (rng.random(len(pairs)) < forget)
    return pairs.sum(axis=1) - 10 * forgets


def pretrain_arithmetic(
    task: ArithmeticTask,
    steps: int = 500,
    forget: float = 0.0,
    seed: int = 0,
    batch: int = 128,
    lr: float = 3e-3,
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 2,
    d_ff: int = 128,
    device: torch.device | str = "cpu",
) -> BlockLM:
    """A small :class:`BlockLM` trained for ``steps`` steps of AdamW (batches of
    ``batch`` training pairs) to predict the answers of worked examples (supervised
    fine-tuning: the loss counts the answer's tokens only), written by a teacher who
    forgets a carry with probability ``forget`` (:func:`careless_answers`), on
    ``device``. In eval mode on return."""
    if not isinstance(task, ArithmeticTask):
        raise TypeError(f"task must be an ArithmeticTask, got {type(task).__name__}")
    for name, value in (("steps", steps), ("batch", batch)):
        check_positive_int(value, name)
    check_number(lr, "lr", low=0, low_open=True)
    check_number(forget, "forget", low=0, high=1)
    torch.manual_seed(seed)
    model = BlockLM(len(task.vocab), d_model, n_heads, n_layers, d_ff).to(device)
    rng = np.random.default_rng(seed)

    def batches():
        while True:
            pairs = task.train[rng.integers(len(task.train), size=batch)]
            ids, mask = task.examples(pairs, careless_answers(pairs, forget, rng))
            yield ids.to(device), mask.to(device)

    def answer_loss(model: nn.Module, example: tuple) -> torch.Tensor:
        ids, mask = example
        logp = sequence_logprobs(model, ids, task.n_prompt)  # (N, n_new)
        return -(logp * mask).sum() / mask.sum()

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    train_steps(model, optimizer, batches(), answer_loss, steps=steps)
    return model.eval()


@torch.no_grad()
def greedy_accuracy(model: nn.Module, task: ArithmeticTask, pairs: np.ndarray) -> float:
    """The share of ``pairs`` whose greedy completion by ``model`` earns reward 1."""
    prompts = task.prompts(pairs).to(next(model.parameters()).device)
    ids = sample(model, prompts, task.n_new, temperature=0)
    return task.reward(pairs, ids[:, task.n_prompt :]).mean().item()


# ---------------------------------------------------------------------------------
# 5. Training with GRPO
# ---------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """GRPO's settings. DeepSeekMath used $G = 64$, $\\beta = 0.04$ and one policy
    update per sampled batch ($\\mu = 1$); $\\epsilon = 0.2$ is PPO's and TRL's
    default. Our other defaults are sized for a small model on a CPU."""

    steps: int = 100  # sampled batches
    prompts: int = 16  # prompts per batch
    G: int = 8  # completions per prompt
    mu: int = 2  # policy updates on each batch (GRPO iterations, μ)
    lr: float = 1e-4  # Adam's step size
    clip: float = 0.2  # ε
    beta: float = 0.04  # weight of the KL penalty
    temperature: float = 1.0  # of the sampling
    loss_type: str = "grpo"
    scale: bool = True  # divide the advantages by the group's std
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "prompts", "G", "mu"):
            check_positive_int(getattr(self, name), name)
        if self.G < 2:
            raise ValueError(f"G must be at least 2, got {self.G}")
        check_number(self.lr, "lr", low=0, low_open=True)
        check_number(self.clip, "clip", low=0, low_open=True)
        check_number(self.beta, "beta", low=0)
        check_number(self.temperature, "temperature", low=0, low_open=True)
        check_number(self.max_grad_norm, "max_grad_norm", low=0, low_open=True)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}"
            )
        if not isinstance(self.scale, bool):
            raise TypeError(f"scale must be a bool, got {self.scale!r}")


def train_grpo(
    model: nn.Module,
    task: ArithmeticTask,
    config: GRPOConfig | None = None,
    seed: int = 0,
    evaluate_every: int | None = None,
) -> tuple[nn.Module, dict[str, list[float]]]:
    """Train a copy of ``model`` with GRPO on ``task``'s training pairs; ``model``
    itself stays as it is and serves as the reference $\\pi_{ref}$ of the KL penalty.

    Returns the trained policy (in eval mode) and its history, one entry per step:
    ``"reward"`` (the mean reward of the sampled completions), ``"no_signal"`` (the
    share of groups whose rewards are all equal, so that every advantage is 0),
    ``"kl"`` (the mean k3 estimate over the completions' tokens) and ``"clipped"``
    (the share of tokens whose ratio left $[1 - \\epsilon, 1 + \\epsilon]$ in the last
    update) and ``"loss"`` (the loss of the last update). With ``evaluate_every``,
    also ``"accuracy"``, the greedy accuracy on ``task.test`` at the steps in
    ``"eval_steps"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(task, ArithmeticTask):
        raise TypeError(f"task must be an ArithmeticTask, got {type(task).__name__}")
    config = GRPOConfig() if config is None else config
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
    if evaluate_every is not None:
        check_positive_int(evaluate_every, "evaluate_every")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    policy = copy.deepcopy(model).eval().requires_grad_(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device  # the policy samples where it lives
    generator = torch.Generator(device).manual_seed(seed)
    history: dict[str, list[float]] = {"eval_steps": [], "accuracy": []}

    def evaluate(step: int) -> None:
        history["eval_steps"].append(step)
        history["accuracy"].append(greedy_accuracy(policy, task, task.test))

    if evaluate_every is not None:
        evaluate(0)
    for step in range(config.steps):
        pairs = task.train[rng.integers(len(task.train), size=config.prompts)]
        stats = _grpo_step(policy, reference, optimizer, task, pairs, config, generator)
        for name, value in stats.items():
            history.setdefault(name, []).append(value)
        if evaluate_every is not None and (
            (step + 1) % evaluate_every == 0 or step + 1 == config.steps
        ):
            evaluate(step + 1)
    return policy.eval(), history


def _grpo_step(policy, reference, optimizer, task, pairs, c, generator):
    """One GRPO iteration: sample G completions per prompt, reward them, and update
    the policy ``c.mu`` times on them; returns numbers for the history."""
    P, pairs = task.n_prompt, pairs.repeat(c.G, axis=0)  # (B, 2): G copies of a prompt
    prompts = task.prompts(pairs).to(next(policy.parameters()).device)  # (B, P)
    ids = sample(policy, prompts, task.n_new, c.temperature, generator)
    completions = ids[:, P:]  # (B, n): the sampled completions o_i
    r = task.reward(pairs, completions)  # (B,): 1 for a right answer, else 0
    A = _group_advantages(r, c.G, c.scale)[:, None]  # (B, 1): Â_i for all its tokens
    mask = completion_mask(completions, task.end_id)  # (B, n): up to the full stop
    with torch.no_grad():
        old_logp = sequence_logprobs(policy, ids, P)  # π_θold, the sampler
        ref_logp = sequence_logprobs(reference, ids, P)  # π_ref
    policy.train()
    for _ in range(c.mu):  # μ updates on the same samples: the ratio leaves 1
        logp = sequence_logprobs(policy, ids, P)  # (B, n), with gradients
        loss = _grpo_loss(
            logp, old_logp, A, mask, ref_logp, c.clip, c.beta, c.loss_type
        )
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), c.max_grad_norm)
        optimizer.step()
    policy.eval()
    with torch.no_grad():
        rho = torch.exp(logp - old_logp)
        clipped = ((rho - 1).abs() > c.clip).float()
        kl = k3_kl(old_logp, ref_logp)  # of the policy that sampled
        return {
            "reward": r.mean().item(),
            "no_signal": (r.view(-1, c.G).std(dim=1) == 0).float().mean().item(),
            "kl": ((kl * mask).sum() / mask.sum()).item(),
            "clipped": ((clipped * mask).sum() / mask.sum()).item(),
            "loss": loss.item(),
        }


# ---------------------------------------------------------------------------------
# 6. The reference: TRL's GRPO loss on the same inputs
# ---------------------------------------------------------------------------------


def trl_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    A: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    clip: float = 0.2,
    beta: float = 0.04,
    loss_type: str = "grpo",
) -> torch.Tensor:
    """:func:`grpo_loss` as TRL computes it: ``GRPOTrainer._compute_loss`` of TRL
    (1.16), called unbound with a stand-in for the trainer whose
    ``_get_per_token_logps_and_entropies`` returns ``logp`` instead of running a
    model. Same arguments as :func:`grpo_loss`, ``A`` of shape ``(B,)``.

    A bridge to the reference, not part of the algorithm: the chapter's visible check
    and the tests call it, training never does. TRL is imported only here."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    B, n = logp.shape

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == n and input_ids.shape == (B, 1 + n)
        return logp, torch.zeros_like(logp), None  # log-probs, entropies, aux loss

    accelerator = SimpleNamespace(
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, **k: x
    )
    trainer = SimpleNamespace(  # every attribute that _compute_loss reads
        _get_per_token_logps_and_entropies=per_token_logps,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=clip,
        epsilon_high=clip,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=n,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        accelerator=accelerator,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),  # unused by the stand-in
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, n, dtype=torch.long),
        "completion_mask": mask,
        "advantages": A,
        "old_per_token_logps": old_logp,
    }
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    return GRPOTrainer._compute_loss(trainer, None, inputs)
