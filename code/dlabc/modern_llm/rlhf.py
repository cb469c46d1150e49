r"""Reward models and reinforcement learning from human feedback (RLHF) with PPO.

Chapter: ``book/modern_llm/rlhf.md``. The part's small RLHF world lives here too (the
chapters on DPO and GRPO import it): film-review snippets as word sequences
(:func:`review_task`), a small policy language model pretrained on them
(:func:`pretrain_policy`), a programmatic reward, the logit of a bag-of-words sentiment
classifier (:func:`sentiment_reward`), the log-probabilities of a completion under a
policy (:func:`sequence_logprobs`) and fixed-length sampling (:func:`sample`).

References:
- Bradley & Terry (1952), *Rank Analysis of Incomplete Block Designs: I. The Method of
  Paired Comparisons*, Biometrika (the preference model, :func:`bradley_terry_loss`).
- Christiano, Leike, Brown, Martic, Legg & Amodei (2017), *Deep Reinforcement Learning
  from Human Preferences*, NeurIPS (a reward model fitted to preferences, then RL).
- Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano & Irving (2019),
  *Fine-Tuning Language Models from Human Preferences* (PPO on a language model with a
  KL penalty to the pretrained model; the sentiment-steering task).
- Stiennon et al. (2020), *Learning to Summarize with Human Feedback*, NeurIPS, and
  Ouyang et al. (2022), *Training Language Models to Follow Instructions with Human
  Feedback*, NeurIPS (reward models fitted to comparisons; the per-token KL penalty).
- Gao, Schulman & Hilton (2023), *Scaling Laws for Reward Model Overoptimization*,
  ICML (reward hacking as the KL from the reference grows).
- Schulman, Wolski, Dhariwal, Radford & Klimov (2017), *Proximal Policy Optimization
  Algorithms*, and Schulman et al. (2016), *High-Dimensional Continuous Control Using
  Generalized Advantage Estimation* (reused from ``dlabc.rl.policy_gradients``).

Shapes: ``B`` batch, ``T`` positions, ``P`` prompt length, ``n`` generated tokens,
``V`` vocabulary.
"""

from __future__ import annotations

import copy
import functools
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc import data
from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import DecoderLM
from dlabc.improvements.modern_block import BlockLM
from dlabc.language_models.fine_tuning import (
    LogisticRegression,
    fit_logistic_regression,
    split_by_group,
)
from dlabc.language_models.gpt2 import generate
from dlabc.rl.policy_gradients import gae, ppo_loss

__all__ = [
    "ReviewTask",
    "review_task",
    "pretrain_policy",
    "SentimentReward",
    "sentiment_reward",
    "sequence_logprobs",
    "sample",
    "prompts",
    "hidden_states",
    "RewardModel",
    "bradley_terry_loss",
    "preference_pairs",
    "train_reward_model",
    "PolicyWithValue",
    "kl_penalised_rewards",
    "lm_advantages",
    "RLHFConfig",
    "rollout",
    "ppo_update",
    "train_rlhf",
]


# ---------------------------------------------------------------------------------
# 1. The world: reviews as words, a policy pretrained on them, a programmatic reward
# ---------------------------------------------------------------------------------

#: A word: a run of letters or digits, with an apostrophe ending ("it's", "don't").
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass
class ReviewTask:
    """Short film-review snippets as sequences of words, split by film.

    ``vocab[0]`` is ``"<s>"``, which starts and ends every review; the other ids are
    lower-cased words. ``texts``, ``labels`` (1 fresh, 0 rotten) and ``films`` are the
    snippets kept; ``train`` and ``test`` index them, each film's snippets on one
    side.
    """

    vocab: list[str]
    texts: list[str]
    labels: np.ndarray
    films: np.ndarray
    train: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def words(text: str) -> list[str]:
        """The lower-cased words of ``text`` (punctuation dropped)."""
        return WORD.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        """``[0, w1, ..., wn, 0]``: the ids of the words of ``text`` between two
        ``<s>``. Raises ``KeyError`` for a word outside the vocabulary."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        unknown = [w for w in self.words(text) if w not in self.ids]
        if unknown:
            raise KeyError(f"words outside the vocabulary: {unknown}")
        return [0, *(self.ids[w] for w in self.words(text)), 0]

    def decode(self, ids: object) -> str:
        """The words of ``ids`` (a list or a 1-D tensor) joined by spaces, ``<s>``
        dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(not 0 <= i < len(self.vocab) for i in ids):
            raise ValueError(f"ids must lie in [0, {len(self.vocab)})")
        return " ".join(self.vocab[i] for i in ids if i != 0)


@functools.cache
def _corpus() -> tuple[list[str], np.ndarray, np.ndarray, list[list[str]], np.ndarray]:
    """The corpus, its words, and the training snippets' indices (read once)."""
    texts, labels, films = data.load_rotten_tomatoes()
    train, _ = split_by_group(films, 0.2, seed=0)
    return texts, labels, films, [ReviewTask.words(t) for t in texts], train


def review_task(min_count: int = 5, max_words: int = 20) -> ReviewTask:
    """The Rotten Tomatoes snippets (``dlabc.data``) made into a small RLHF world.

    Films go to a train and a test side (a fifth of the films to test, drawn with a
    fixed seed). The snippets kept have at most ``max_words`` words, each of which
    occurs in at least ``min_count`` training snippets and in one of the training
    snippets kept; the vocabulary is those words.
    """
    check_positive_int(min_count, "min_count")
    check_positive_int(max_words, "max_words")
    texts, labels, films, words, train = _corpus()
    df = Counter(w for i in train for w in set(words[i]))
    known = {w for w, n in df.items() if n >= min_count}
    short = [i for i, w in enumerate(words) if 0 < len(w) <= max_words]
    kept_train = [i for i in np.intersect1d(short, train) if known.issuperset(words[i])]
    if not kept_train:
        raise ValueError(f"min_count={min_count}, max_words={max_words} keep nothing")
    vocab = ["<s>", *sorted({w for i in kept_train for w in words[i]})]
    known = set(vocab)
    keep = [i for i in short if known.issuperset(words[i])]
    is_train = np.isin(keep, train)
    return ReviewTask(
        vocab=vocab,
        texts=[texts[i] for i in keep],
        labels=labels[keep],
        films=films[keep],
        train=np.flatnonzero(is_train),
        test=np.flatnonzero(~is_train),
    )


def pretrain_policy(
    task: ReviewTask,
    steps: int = 300,
    seed: int = 0,
    *,
    batch_size: int = 16,
    block: int = 24,
    lr: float = 1e-2,
    **sizes: int,
) -> BlockLM:
    r"""A small :class:`~dlabc.improvements.modern_block.BlockLM` trained by next-word
    prediction on the training snippets, read as one stream
    ``<s> review <s> review <s> ...`` in random windows of ``block`` ids; returned in
    evaluation mode.

    ``sizes`` overrides the defaults ``d_model=64, n_heads=4, n_layers=2, d_ff=176``
    (read-out tied to the embeddings: a few hundred thousand parameters). AdamW,
    cosine-decayed learning rate from ``lr``. After ``<s>`` the model writes a new
    review, so a fixed-length sample may hold the end of one review and the start of
    the next.
    """
    if not isinstance(task, ReviewTask):
        raise TypeError(f"task must be a ReviewTask, got {type(task).__name__}")
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(block, "block")
    check_number(lr, "lr", low=0, low_open=True)
    config = dict(d_model=64, n_heads=4, n_layers=2, d_ff=176)
    unknown = set(sizes) - set(config) - {"n_kv_heads"}
    if unknown:
        raise TypeError(f"unknown sizes: {sorted(unknown)}")
    config.update(sizes)
    stream = torch.tensor(
        [0] + [i for k in task.train for i in task.encode(task.texts[k])[1:]]
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BlockLM(len(task.vocab), **config, tie_embeddings=True)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        start = torch.randint(len(stream) - block, (batch_size, 1), generator=generator)
        window = stream[start + torch.arange(block + 1)]  # (B, block + 1)
        logits = model(window[:, :-1])  # (B, block, V)
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


class SentimentReward:
    r"""The programmatic reward: the logit of "fresh" of a bag-of-words logistic
    regression, for the words of a sequence,

    $r(x) = b + \sum_{t:\ x_t \neq \texttt{<s>}} w_{x_t} ,$

    one weight per word occurrence (``<s>`` counts for nothing). Calling it on ids
    ``(B, T)`` returns ``(B,)``. ``weight`` ``(V,)`` (0 for ``<s>``) and ``bias``.
    """

    def __init__(self, weight: torch.Tensor, bias: float) -> None:
        check_tensor(weight, "weight", ndim=1, floating=True)
        self.weight = weight
        self.bias = float(bias)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        check_tensor(ids, "ids", ndim=2, dtype=torch.long)
        if ids.device.type == "cpu" and ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= len(self.weight):
                raise ValueError(f"ids must lie in [0, {len(self.weight)})")
        w = self.weight.to(ids.device)
        return w[ids].sum(-1) + self.bias  # (B,)


def sentiment_reward(task: ReviewTask, seed: int = 0) -> SentimentReward:
    """Fit the logistic regression of ``dlabc.language_models.fine_tuning`` (L2 weight
    ``1e-3``, L-BFGS) to the training snippets' words and labels; return it as a
    :class:`SentimentReward`.

    The problem is strictly convex, so the optimum does not depend on ``seed``, which
    only draws the starting weights.
    """
    if not isinstance(task, ReviewTask):
        raise TypeError(f"task must be a ReviewTask, got {type(task).__name__}")
    encoded = [task.encode(task.texts[k])[1:-1] for k in task.train]
    model = LogisticRegression(len(task.vocab))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.nn.init.normal_(model.w.weight, std=0.01)
    y = torch.as_tensor(task.labels[task.train])
    model = fit_logistic_regression(model, encoded, y, l2=1e-3)
    weight = model.w.weight.detach()[:, 0].clone()
    weight[0] = 0.0  # <s> carries no sentiment
    return SentimentReward(weight, model.b.item())


# ---------------------------------------------------------------------------------
# 2. A policy's log-probabilities, and sampling from it
# ---------------------------------------------------------------------------------


def sequence_logprobs(
    model: DecoderLM, ids: torch.Tensor, n_prompt: int
) -> torch.Tensor:
    r"""$\log \pi(x_t \mid x_{<t})$ for the positions $t \ge$ ``n_prompt`` of ``ids``
    ``(B, T)``: ``(B, T - n_prompt)``, with gradients when the model has them."""
    check_tensor(ids, "ids", ndim=2, dtype=torch.long)
    check_positive_int(n_prompt, "n_prompt")
    if n_prompt >= ids.shape[1]:
        raise ValueError(
            f"n_prompt must be smaller than the length {ids.shape[1]} of ids, "
            f"got {n_prompt}"
        )
    return _sequence_logprobs(model(ids[:, :-1]), ids, n_prompt)


def _sequence_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, n_prompt: int
) -> torch.Tensor:
    """The log-probabilities of ``ids[:, n_prompt:]`` from the logits ``(B, T - 1, V)``
    that predicted ``ids[:, 1:]``."""
    logp = logits[:, n_prompt - 1 :].log_softmax(-1)  # (B, n, V)
    return logp.gather(-1, ids[:, n_prompt:, None]).squeeze(-1)  # (B, n)


def sample(
    model: DecoderLM,
    prompts: torch.Tensor,
    n_new: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend every prompt of ``prompts`` ``(B, P)`` by exactly ``n_new`` ids drawn
    from ``model`` (``temperature=0``: greedy), without stopping at ``<s>``: ``(B, P +
    n_new)``. The language-models part's ``generate`` with its key-value cache."""
    check_positive_int(n_new, "n_new")
    return generate(model, prompts, n_new, temperature, generator=generator)


def prompts(task: ReviewTask, side: str = "train", n_words: int = 1) -> torch.Tensor:
    """The prompts of the part's RLHF world: ``<s>`` and the first ``n_words`` words
    of every snippet of ``side`` (``"train"`` or ``"test"``) that has more words;
    ``(N, 1 + n_words)``."""
    if side not in ("train", "test"):
        raise ValueError(f"side must be 'train' or 'test', got {side!r}")
    check_positive_int(n_words, "n_words")
    encoded = [task.encode(task.texts[k]) for k in getattr(task, side)]
    return torch.tensor([e[: 1 + n_words] for e in encoded if len(e) > n_words + 2])


# ---------------------------------------------------------------------------------
# 3. A reward model from preferences: Bradley-Terry
# ---------------------------------------------------------------------------------


class RewardModel(nn.Module):
    r"""A bag-of-words reward model, one learned weight per word:
    $r_\phi(x) = \sum_t \phi_{x_t}$. The programmatic reward has this form too, so
    what is left to learn is the estimation itself: weights from comparisons instead
    of labels. Ids ``(B, T)`` -> rewards ``(B,)``."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        check_positive_int(vocab_size, "vocab_size")
        self.phi = nn.Embedding(vocab_size, 1)  # φ, one weight a word
        nn.init.zeros_(self.phi.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.phi(ids).squeeze(-1).sum(-1)  # (B,): Σ_t φ[x_t]


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor
) -> torch.Tensor:
    r"""Minus the mean log-likelihood of the preferences under the Bradley-Terry
    model $P(y_w \succ y_l) = \sigma\big(r(y_w) - r(y_l)\big)$:
    $\mathcal L = -\frac1N \sum_i \log \sigma\big(r(y_w^i) - r(y_l^i)\big)$."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def preference_pairs(
    policy: DecoderLM,
    reward: SentimentReward,
    prompts: torch.Tensor,
    n_new: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Two completions of every prompt by ``policy``, labelled by a simulated
    annotator who prefers $y_1$ with the Bradley-Terry probability
    $\sigma\big(r(y_1) - r(y_2)\big)$ of the programmatic reward. Returns ``(chosen,
    rejected)``, both ``(N, P + n_new)``."""
    y1 = sample(policy, prompts, n_new, generator=generator)  # (N, P + n)
    y2 = sample(policy, prompts, n_new, generator=generator)
    p1 = torch.sigmoid(reward(y1) - reward(y2))  # (N,): P(y1 preferred)
    u = torch.rand(len(p1), generator=generator, device=p1.device)  # (N,)
    first = u < p1  # the annotator's choice
    chosen = torch.where(first[:, None], y1, y2)
    rejected = torch.where(first[:, None], y2, y1)
    return chosen, rejected


def train_reward_model(
    model: RewardModel,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-2,
) -> list[float]:
    """Fit ``model`` to the pairs by minimising :func:`bradley_terry_loss` over all of
    them, with Adam and an L2 penalty ``weight_decay`` on the weights; return the
    loss of every step."""
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected must have one shape, got {tuple(chosen.shape)} "
            f"and {tuple(rejected.shape)}"
        )
    check_positive_int(steps, "steps")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = bradley_terry_loss(model(chosen), model(rejected))
        penalty = weight_decay / 2 * model.phi.weight.square().sum()
        optimizer.zero_grad()
        (loss + penalty).backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------
# 4. RLHF with PPO: the KL-penalised reward, advantages, the update
# ---------------------------------------------------------------------------------


def hidden_states(lm: DecoderLM, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states ``(B, T, d_model)`` of a decoder of the book: its
    forward pass without the read-out."""
    h = lm.embed(ids) * lm.scale  # (B, T, d_model)
    if lm.positions is not None:
        h = lm.positions(h, 0)
    for block in lm.blocks:
        h = block(h)  # (B, T, d_model)
    return h if lm.norm is None else lm.norm(h)


class PolicyWithValue(nn.Module):
    r"""The policy $\pi_\theta$ and a value head $V(x_{\le t}) = u^\top h_t + c$ on the
    same trunk. ``ids`` ``(B, T)`` -> logits ``(B, T, V)`` and values ``(B, T)``; the
    value at position $t$ estimates the return of the tokens after $t$."""

    def __init__(self, lm: DecoderLM) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden_states(self.lm, ids)  # (B, T, d_model)
        return self.lm.head(h), self.value_head(h).squeeze(-1)


def kl_penalised_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    score: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    r"""The reward of every generated token ``(B, n)``: minus $\beta$ times the
    sample's estimate of the KL divergence at that token, plus the sequence's score on
    the last token,

    $r_t = -\beta \big(\log \pi_\theta(y_t \mid x, y_{<t})
    - \log \pi_{\mathrm{ref}}(y_t \mid x, y_{<t})\big) + [t = n]\, R(x, y).$
    """
    rewards = -beta * (logprobs - ref_logprobs)  # (B, n): per-token KL penalty
    rewards[:, -1] += score  # the sequence reward arrives with the last token
    return rewards


def lm_advantages(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the generated tokens of ``B`` completions ``(B, n)``, each completion
    one episode that ends with its last token (nothing is bootstrapped past it): the
    ``gae`` of ``dlabc.rl.policy_gradients``, whose time axis comes first. Returns the
    advantages and the returns, ``(B, n)`` each."""
    dones = torch.zeros_like(rewards)
    dones[:, -1] = 1.0  # the episode ends after the last token
    last_value = torch.zeros(len(rewards), dtype=rewards.dtype)
    A, R = gae(rewards.T, values.T, dones.T, last_value, gamma, lam)  # (n, B)
    return A.T, R.T


@dataclass
class RLHFConfig:
    """The settings of :func:`train_rlhf`."""

    beta: float = 0.1  # β, the weight of the KL penalty
    n_new: int = 10  # generated words per completion
    batch_size: int = 64  # completions per iteration
    epochs: int = 2  # PPO passes over each batch
    minibatch: int = 64
    lr: float = 1e-3
    clip: float = 0.2  # ε of the clipped objective
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        check_number(self.beta, "beta", low=0)
        for name in ("n_new", "batch_size", "epochs", "minibatch"):
            check_positive_int(getattr(self, name), name)
        for name in ("lr", "clip", "max_grad_norm"):
            check_number(getattr(self, name), name, low=0, low_open=True)
        check_number(self.vf_coef, "vf_coef", low=0)
        for name in ("gamma", "lam"):
            check_number(getattr(self, name), name, low=0, high=1)


def rollout(
    agent: PolicyWithValue,
    ref: DecoderLM,
    reward: SentimentReward,
    prompts: torch.Tensor,
    c: RLHFConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Sample completions of ``prompts`` ``(B, P)`` from the policy; score them;
    compute the per-token rewards, the advantages and the returns ``(B, n)``."""
    with torch.no_grad():  # acting and scoring need no gradients
        P = prompts.shape[1]
        ids = sample(agent.lm, prompts, c.n_new, generator=generator)  # (B, P + n)
        logits, values = agent(ids[:, :-1])  # predictions of ids[:, 1:]
        logprobs = _sequence_logprobs(logits, ids, P)  # (B, n): log π_θold
        ref_logprobs = sequence_logprobs(ref, ids, P)  # (B, n): log π_ref
        values = values[:, P - 1 :]  # (B, n): V before each generated token
        score = reward(ids)  # (B,): R(x, y)
        rewards = kl_penalised_rewards(logprobs, ref_logprobs, score, c.beta)
        A, returns = lm_advantages(rewards, values, c.gamma, c.lam)
        kl = (logprobs - ref_logprobs).sum(-1)  # (B,): the sequence's KL estimate
    return dict(ids=ids, logprobs=logprobs, A=A, returns=returns, score=score, kl=kl)


def ppo_update(
    agent: PolicyWithValue,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    c: RLHFConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """``epochs`` passes of PPO's clipped loss (``ppo_loss`` of
    ``dlabc.rl.policy_gradients``) over the generated tokens of a batch, advantages
    normalised over each mini-batch."""
    P = batch["ids"].shape[1] - batch["A"].shape[1]
    for _ in range(c.epochs):
        for idx in torch.randperm(len(batch["ids"]), generator=generator).split(
            c.minibatch
        ):
            ids, A = batch["ids"][idx], batch["A"][idx]
            logits, values = agent(ids[:, :-1])  # (b, T - 1, V), (b, T - 1)
            logprobs = _sequence_logprobs(logits, ids, P)  # (b, n): log π_θ
            # entropy for the log only (its weight is 0): no gradient through it
            entropy = torch.distributions.Categorical(
                logits=logits[:, P - 1 :].detach()
            )
            loss, parts = ppo_loss(
                logprobs,
                batch["logprobs"][idx],
                (A - A.mean()) / (A.std() + 1e-8),
                values[:, P - 1 :],
                batch["returns"][idx],
                entropy.entropy(),
                c.clip,
                c.vf_coef,
            )
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), c.max_grad_norm)
            optimizer.step()
    return parts


def train_rlhf(
    policy: DecoderLM,
    reward: SentimentReward,
    prompts: torch.Tensor,
    iterations: int,
    config: RLHFConfig | None = None,
    seed: int = 0,
) -> tuple[DecoderLM, dict[str, list[float]]]:
    """RLHF with PPO: a copy of ``policy`` trained for ``iterations`` batches of
    completions of prompts drawn from ``prompts`` ``(N, P)``, against ``reward`` minus
    ``config.beta`` times the KL divergence from ``policy`` itself (the reference,
    left untouched). Returns the trained policy (evaluation mode) and, per iteration,
    the mean score and mean KL estimate of the batch it sampled, and the parts of its
    last PPO loss."""
    c = RLHFConfig() if config is None else config
    if not isinstance(c, RLHFConfig):
        raise TypeError(f"config must be an RLHFConfig, got {type(c).__name__}")
    if not isinstance(policy, DecoderLM):
        raise TypeError(f"policy must be a decoder of the book, got {policy!r}")
    check_tensor(prompts, "prompts", ndim=2, dtype=torch.long)
    check_positive_int(iterations, "iterations")
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    agent = PolicyWithValue(copy.deepcopy(policy))
    optimizer = torch.optim.Adam(agent.parameters(), lr=c.lr)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"score": [], "kl": []}
    for _ in range(iterations):
        pick = torch.randint(len(prompts), (c.batch_size,), generator=generator)
        agent.eval()
        batch = rollout(agent, ref, reward, prompts[pick], c, generator)
        agent.train()
        parts = ppo_update(agent, optimizer, batch, c, generator)
        history["score"].append(batch["score"].mean().item())
        history["kl"].append(batch["kl"].mean().item())
        for name, value in parts.items():
            history.setdefault(name, []).append(value)
    return agent.lm.eval(), history
