r"""Speculative decoding: a cheap draft proposes a few tokens, the large target model
checks them all in one call, and a rejection rule keeps the target's distribution
exactly.

Chapter: ``book/modern_llm/speculative.md``.

References:
- Stern, Shazeer & Uszkoreit (2018), *Blockwise Parallel Decoding for Deep
  Autoregressive Models*, NeurIPS: propose a block of tokens, verify them in parallel,
  keep the longest prefix the model agrees with (greedy decoding).
- Leviathan, Kalman & Matias (2023), *Fast Inference from Transformers via
  Speculative Decoding*, ICML: the rejection rule that makes sampling exact, accept
  $x \sim q$ with probability $\min(1, p(x)/q(x))$, otherwise draw from
  $\mathrm{norm}(\max(0, p - q))$; the acceptance rate $\alpha$, the expected tokens
  per target call $(1 - \alpha^{\gamma+1})/(1 - \alpha)$ and the speed-up with a
  draft of relative cost $c$.
- Chen et al. (2023), *Accelerating Large Language Model Decoding with Speculative
  Sampling* (DeepMind): the same rule, found independently.
- Zhang et al. (2024), *Draft & Verify: Lossless Large Language Model Acceleration
  via Self-Speculative Decoding*, ACL: the draft is the target itself with layers
  skipped.
- Elhoushi et al. (2024), *LayerSkip: Enabling Early Exit Inference and
  Self-Speculative Decoding*, ACL: the same idea with early exit.
- Yang et al. (2023), *Inference with Reference: Lossless Acceleration of Large
  Language Models* (arXiv 2304.04487): drafts copied from text in the context.

The draft is any object with ``propose(seq, gamma, temperature, generator)`` and
``rollback(length)``: :class:`ModelDraft` wraps a language model of the book with its
own key-value cache (for example the target with layers skipped, :func:`skip_layers`,
which shares the target's tensors), :class:`PromptLookup` copies what followed the
last occurrence of the latest n-gram in the text. :func:`speculative_generate` runs
the loop; the target's cache is rolled back after a rejection by
:func:`truncate_cache`. Shapes: ``V`` vocabulary, ``k`` drafted tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import Cache, DecoderLM

__all__ = [
    "probabilities",
    "acceptance_rate",
    "residual",
    "rule_marginal",
    "verify",
    "expected_tokens_per_call",
    "expected_speedup",
    "truncate_cache",
    "skip_layers",
    "ModelDraft",
    "PromptLookup",
    "SpeculativeStats",
    "speculative_generate",
]


# ------------------------------------------------------------ the rejection rule


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""The distribution a decoder samples from: $\mathrm{softmax}(z / \tau)$, and for
    $\tau = 0$ (greedy) the one-hot vector of $\arg\max z$. ``(..., V)`` ->
    ``(..., V)``."""
    check_number(temperature, "temperature", low=0)
    if temperature == 0:  # greedy: all the mass on the most likely token
        one_hot = torch.zeros_like(logits)
        return one_hot.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return (logits / temperature).softmax(-1)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""$\beta = \sum_x \min\big(p(x), q(x)\big) = 1 - \mathrm{TV}(p, q)$: the
    probability that the rule accepts a token drawn from $q$ when the target says
    $p$. ``(..., V)`` -> ``(...)``."""
    return torch.minimum(p, q).sum(-1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""Where a rejected draft's token comes from:
    $p'(x) = \max\big(0, p(x) - q(x)\big) \,/\, \sum_y \max\big(0, p(y) - q(y)\big)$,
    the mass $p$ has and $q$ lacks. ``(..., V)`` -> ``(..., V)``. (Where $p = q$
    nothing is ever rejected; $p$ is returned.)"""
    excess = (p - q).clamp(min=0)  # max(0, p - q)
    total = excess.sum(-1, keepdim=True)
    return torch.where(total > 0, excess / total.clamp(min=1e-30), p)


def rule_marginal(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""The exact distribution of the token the rule emits for one drafted position,

    $P(x) = q(x) \min\Big(1, \frac{p(x)}{q(x)}\Big) + (1 - \beta)\, p'(x)$:

    the draft proposes $x$ and it is accepted, or some proposal is rejected (with
    probability $1 - \beta$) and $x$ comes from the residual $p'$. It equals $p$
    (Leviathan et al.; Chen et al.); the tests check it. ``(..., V)`` ->
    ``(..., V)``."""
    accepted = torch.minimum(p, q)  # q(x) min(1, p(x) / q(x))
    rejected = 1 - acceptance_rate(p, q)  # 1 - beta
    return accepted + rejected[..., None] * residual(p, q)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator)  # (1,)


def verify(
    p: torch.Tensor,
    q: torch.Tensor,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, torch.Tensor]:
    r"""Leviathan et al.'s rule for one block of $k$ drafted tokens.

    ``x`` ``(k,)`` are the draft's tokens, ``q`` ``(k, V)`` the distributions it drew
    them from, ``p`` ``(k + 1, V)`` the target's distributions at the same positions
    and one more. Token $x_i$ is accepted with probability
    $\min\big(1, p_i(x_i) / q_i(x_i)\big)$; at the first rejection the token comes
    from the residual $\mathrm{norm}(\max(0, p_i - q_i))$ instead, and if all $k$
    are accepted, a bonus token comes from $p_{k+1}$. Returns the number accepted,
    $n$, and the one token ``(1,)`` that follows them.
    """
    for i in range(len(x)):
        r = torch.rand((), generator=generator, device=p.device)  # r ~ U[0, 1)
        if r * q[i, x[i]] >= p[i, x[i]]:  # rejected: r >= p(x) / q(x)
            return i, _sample(residual(p[i], q[i]), generator)
    return len(x), _sample(p[len(x)], generator)  # all accepted: a bonus token


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    r"""Tokens per target call when each of $\gamma$ drafts is accepted with
    probability $\alpha$, independently (Leviathan et al., eq. 1):

    $E[\text{tokens}] = \sum_{i=0}^{\gamma} \alpha^i
    = \frac{1 - \alpha^{\gamma+1}}{1 - \alpha} .$
    """
    check_number(alpha, "alpha", low=0, high=1)
    check_positive_int(gamma, "gamma")
    return sum(alpha**i for i in range(gamma + 1))


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    r"""The expected speed-up over plain decoding (Leviathan et al., Theorem 3.8),
    when a draft step costs $c$ target steps and the target checks $\gamma + 1$
    tokens in the time of one:

    $\frac{1 - \alpha^{\gamma+1}}{(1 - \alpha)(\gamma c + 1)} .$
    """
    check_number(c, "c", low=0)
    return expected_tokens_per_call(alpha, gamma) / (gamma * c + 1)


# ---------------------------------------------------------------- the drafts


def truncate_cache(cache: list[Cache], length: int) -> None:
    """Forget every position from ``length`` on, in each layer's cache: after a
    rejection, the keys and values of the rejected drafts must go. Positions are kept
    as they are if ``length`` is not below ``seen``. A rolling cache (``keep``) has
    forgotten old positions that the next token would need again after the cut: it
    can be rolled back only where it still holds the last ``keep`` positions before
    ``length``."""
    if not isinstance(cache, list) or not all(isinstance(c, Cache) for c in cache):
        raise TypeError("cache must be a list of Cache objects (model.new_cache())")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    for c in cache:
        needed = 0 if c.keep is None else max(0, length - c.keep)
        if length < c.seen and c.start > needed:  # it lost what it needs
            raise ValueError(
                f"cannot roll back to {length}: the cache starts at position "
                f"{c.start}, and the next token needs the positions from {needed}"
            )
    _truncate(cache, length)


def _check_not_rolling(model: DecoderLM, name: str) -> None:
    if model.make_cache is None or any(c.keep is not None for c in model.new_cache()):
        raise ValueError(
            f"{name} must keep a full key-value cache (make_cache without keep): "
            "a rolling cache cannot be rolled back after a rejection"
        )


def _truncate(cache: list[Cache], length: int) -> None:
    for c in cache:
        if length < c.seen:  # positions start .. length - 1 stay
            c.tensors = tuple(t.narrow(c.dim, 0, length - c.start) for t in c.tensors)
            c.seen = length


def skip_layers(model: DecoderLM, layers: Sequence[int]) -> DecoderLM:
    """A draft made of ``model`` itself: the same embedding, norm and read-out, and
    only the blocks ``layers`` (in that order). Nothing is copied: the draft's
    parameters *are* the target's tensors. Evaluation mode."""
    if not isinstance(model, DecoderLM):
        raise TypeError(f"model must be a DecoderLM, got {type(model).__name__}")
    layers = list(layers)
    if not layers or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < model.n_layers
        for i in layers
    ):
        raise ValueError(
            f"layers must be a non-empty list of block indices in "
            f"[0, {model.n_layers}), got {layers!r}"
        )
    with torch.device("meta"):  # a shell that allocates nothing ...
        draft = DecoderLM(
            model.vocab_size,
            model.d_model,
            len(layers),
            lambda i: model.blocks[layers[i]],  # ... holding the target's blocks
            lambda: model.norm,
            positions=model.positions,
            make_cache=model.make_cache,
        )
    draft.embed, draft.head, draft.scale = model.embed, model.head, model.scale
    return draft.eval()


class ModelDraft:
    """A draft language model with its own key-value cache.

    ``propose`` runs the draft ``gamma`` times, one token after the other, feeding
    only the tokens its cache lacks; ``rollback(length)`` forgets the positions from
    ``length`` on.
    """

    def __init__(self, model: DecoderLM) -> None:
        if not isinstance(model, DecoderLM):
            raise TypeError(f"model must be a DecoderLM, got {type(model).__name__}")
        _check_not_rolling(model, "model")
        self.model = model
        self.cache = model.new_cache()

    def propose(
        self,
        seq: torch.Tensor,
        gamma: int,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``gamma`` tokens after ``seq`` ``(1, T)``: ``(1, gamma)``, and the
        distributions $q_1 \\dots q_\\gamma$ they were drawn from ``(gamma, V)``."""
        tokens, qs = [], []
        for _ in range(gamma):
            text = torch.cat([seq, *tokens], 1)  # (1, T + i)
            new = text[:, self.cache[0].seen :]  # what the cache has not read
            q = probabilities(self.model(new, self.cache)[0, -1], temperature)  # (V,)
            tokens.append(_sample(q, generator)[None])  # (1, 1)
            qs.append(q)
        return torch.cat(tokens, 1), torch.stack(qs)  # (1, gamma), (gamma, V)

    def rollback(self, length: int) -> None:
        _truncate(self.cache, length)


class PromptLookup:
    """A draft that costs nothing: find the latest earlier occurrence of the last
    ``n`` tokens (``n = max_ngram`` down to 1) and propose the tokens that followed
    it, with probability 1 (a one-hot $q$). No match: no proposal, and the target
    makes one token as in plain decoding."""

    def __init__(self, vocab_size: int, max_ngram: int = 3) -> None:
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.max_ngram = check_positive_int(max_ngram, "max_ngram")

    def propose(
        self,
        seq: torch.Tensor,
        gamma: int,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = seq[0].tolist()
        found: list[int] = []
        for n in range(min(self.max_ngram, len(text) - 1), 0, -1):
            tail = text[-n:]
            for start in range(len(text) - n - 1, -1, -1):  # latest match first
                if text[start : start + n] == tail:
                    found = text[start + n : start + n + gamma]
                    break
            if found:
                break
        x = torch.tensor([found], dtype=torch.long, device=seq.device)  # (1, k)
        q = torch.zeros(len(found), self.vocab_size, device=seq.device)  # (k, V)
        q[torch.arange(len(found)), x[0]] = 1.0  # one-hot: the draft is sure
        return x, q

    def rollback(self, length: int) -> None:
        pass  # no state


# ------------------------------------------------------------------ the loop


@dataclass
class SpeculativeStats:
    """What each target call of :func:`speculative_generate` saw: the tokens drafted
    and the tokens accepted."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def target_calls(self) -> int:
        return len(self.drafted)

    @property
    def tokens_per_call(self) -> float:
        """Tokens made per target call: the accepted drafts and one more each."""
        return (sum(self.accepted) + self.target_calls) / max(self.target_calls, 1)

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens that were accepted."""
        return sum(self.accepted) / max(sum(self.drafted), 1)


def speculative_generate(
    target: DecoderLM,
    draft: object,
    ids: torch.Tensor,
    max_new_tokens: int,
    gamma: int = 4,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    eos_id: int | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    r"""Extend ``ids`` ``(1, T_0)`` by ``max_new_tokens`` tokens from ``target``, with
    ``gamma`` tokens drafted per target call; return the sequence
    ``(1, T_0 + max_new_tokens)`` and the :class:`SpeculativeStats`.

    ``draft`` is a :class:`ModelDraft`, a :class:`PromptLookup`, or any object with
    their ``propose`` and ``rollback``. ``temperature=0`` is greedy decoding, and the
    tokens are then those of plain greedy decoding; otherwise every token is
    distributed exactly as the target's ``softmax(logits / temperature)``. One
    sequence at a time (the accepted lengths differ between sequences). With
    ``eos_id``, decoding stops after that token (the sequence is then shorter).
    Evaluation mode, without gradients.
    """
    if not isinstance(target, DecoderLM):
        raise TypeError(f"target must be a DecoderLM, got {type(target).__name__}")
    _check_not_rolling(target, "target")
    for name in ("propose", "rollback"):
        if not callable(getattr(draft, name, None)):
            raise TypeError(f"draft must have propose and rollback, got {draft!r}")
    check_tensor(ids, "ids", ndim=2, dtype=torch.long)
    if ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(
            f"ids must be one non-empty sequence (1, T_0), got {tuple(ids.shape)}"
        )
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(gamma, "gamma")
    check_number(temperature, "temperature", low=0)
    if eos_id is not None and not 0 <= eos_id < target.vocab_size:
        raise ValueError(f"eos_id must be a token id in [0, {target.vocab_size})")
    was_training = target.training
    target.eval()
    try:
        with torch.no_grad():
            stats = SpeculativeStats()
            seq = _speculative(
                target,
                draft,
                ids,
                max_new_tokens,
                gamma,
                temperature,
                generator,
                eos_id,
                stats,
            )
    finally:
        target.train(was_training)
    return seq, stats


def _speculative(
    target: DecoderLM,
    draft: object,
    ids: torch.Tensor,
    n_new: int,
    gamma: int,
    temperature: float,
    generator: torch.Generator | None,
    eos_id: int | None,
    stats: SpeculativeStats,
) -> torch.Tensor:
    cache = target.new_cache()
    seq = ids  # (1, T): the text so far; the caches hold all of it but the last token
    while seq.shape[1] < ids.shape[1] + n_new:
        # 1. the draft proposes x_1..x_k (k <= gamma), drawn from q_1..q_k
        x, q = draft.propose(seq, gamma, temperature, generator)  # (1, k), (k, V)
        k = x.shape[1]
        # 2. the target scores them all in ONE call: p_1..p_{k+1}
        new = torch.cat([seq, x], 1)[:, cache[0].seen :]  # what its cache lacks
        p = probabilities(target(new, cache)[0, -(k + 1) :], temperature)  # (k+1, V)
        # 3. keep the accepted prefix x_1..x_n and one token from the target
        n, token = verify(p, q, x[0], generator)
        made = [*x[0, :n].tolist(), token.item()]  # the n accepted, and one more
        if eos_id in made:  # the end of the text: keep up to it
            made = made[: made.index(eos_id) + 1]
        seq = torch.cat([seq, seq.new_tensor([made])], 1)  # (1, T + n + 1)
        # 4. forget the rejected drafts: both caches end before the last token
        _truncate(cache, seq.shape[1] - 1)
        draft.rollback(seq.shape[1] - 1)
        stats.drafted.append(k)
        stats.accepted.append(n)
        if eos_id in made:
            break
    return seq[:, : ids.shape[1] + n_new]  # the last call may make a few too many
