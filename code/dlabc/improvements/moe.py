"""Mixture of experts: a router sends each token to k of n feed-forward experts.

Chapter: ``book/improvements/moe.md``.

References:
- Shazeer et al. (2017), *Outrageously Large Neural Networks: The Sparsely-Gated
  Mixture-of-Experts Layer* (top-k gating, the balancing problem).
- Lepikhin et al. (2021), *GShard: Scaling Giant Models with Conditional Computation
  and Automatic Sharding* (expert capacity, top-2 routing, the auxiliary loss).
- Fedus, Zoph & Shazeer (2022), *Switch Transformers: Scaling to Trillion Parameter
  Models with Simple and Efficient Sparsity*, eq. 4-6 (top-1 routing, capacity
  factor, token dropping, the load-balancing loss $N \\sum_i f_i P_i$).
- Zoph et al. (2022), *ST-MoE: Designing Stable and Transferable Sparse Expert
  Models*, eq. 5 (the router z-loss).
- Jiang et al. (2024), *Mixtral of Experts* (top-2 of 8 SwiGLU experts, the two
  chosen probabilities renormalised to sum to one).

The experts are the activations chapter's SwiGLU :class:`GatedFeedForward`; the
parameter names (``gate.weight``, ``experts[i].gate_proj`` ...) follow Hugging Face's
Mixtral, so copying weights into ``MixtralSparseMoeBlock`` is a short loop. A
:class:`SparseMoE` takes ``(..., d_model)`` and returns the same shape, so it fits the
feed-forward slot of the book's :class:`~dlabc.decoder.DecoderBlock` (in
:class:`TinyLM`). Shapes: ``N`` tokens, ``E``
experts, ``k`` experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import DecoderBlock, DecoderLM
from dlabc.foundations.activations import GatedFeedForward
from dlabc.foundations.normalization import LayerNorm
from dlabc.improvements.rope_alibi import CausalSelfAttention
from dlabc.transformers.positional_encoding import SinusoidalPositionalEncoding

__all__ = [
    "Routing",
    "route",
    "expert_capacity",
    "apply_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "expert_load",
    "SparseMoE",
    "TinyLM",
    "table_task",
]


@dataclass
class Routing:
    """What the router decided for ``N`` tokens.

    ``logits`` and ``probs`` ``(N, E)``; ``experts`` ``(N, k)``, the chosen experts,
    best first; ``weights`` ``(N, k)``, their gate values (zero where dropped);
    ``kept`` ``(N, k)``, False where an expert was full and dropped the token.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor


def _check_logits(logits: object, name: str = "logits") -> torch.Tensor:
    check_tensor(logits, name, ndim=2, floating=True)
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert, got shape (N, 0)")
    return logits


def _check_top_k(top_k: object, n_experts: int) -> int:
    check_positive_int(top_k, "top_k")
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} must not exceed n_experts={n_experts}")
    return top_k


def _check_capacity_factor(capacity_factor: object) -> float | None:
    if capacity_factor is None:
        return None
    return check_number(capacity_factor, "capacity_factor", low=0, low_open=True)


def route(
    logits: torch.Tensor, top_k: int, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Top-k gating: the ``top_k`` most probable experts of each token and their gates.

    $p = \operatorname{softmax}(x W_r)$; the gates are $p_i$ for the chosen $i$
    (Switch, ``normalize=False``) or $p_i / \sum_{j \in \text{top-}k} p_j$
    (Mixtral, ``normalize=True``). ``logits`` ``(N, E)``; returns ``probs``
    ``(N, E)``, ``experts`` ``(N, k)`` and ``weights`` ``(N, k)``.
    """
    _check_logits(logits)
    _check_top_k(top_k, logits.shape[1])
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return _route(logits, top_k, normalize)


def _route(
    logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`route`, unchecked."""
    probs = F.softmax(logits, dim=-1)  # (N, E): p = softmax(x W_r)
    weights, experts = probs.topk(top_k, dim=-1)  # (N, k) each, best first
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)  # sum to 1 per token
    return probs, experts, weights


def expert_capacity(
    n_tokens: int, n_experts: int, capacity_factor: float, top_k: int = 1
) -> int:
    r"""How many tokens one expert may take: $\lceil c \cdot k N / E \rceil$.

    With $c = 1$ a perfectly balanced router fills every expert exactly; $c > 1$
    leaves slack for imbalance (Switch uses 1.0 to 1.25).
    """
    check_positive_int(n_tokens, "n_tokens")
    check_positive_int(n_experts, "n_experts")
    _check_top_k(top_k, n_experts)
    c = _check_capacity_factor(capacity_factor)
    if c is None:
        raise TypeError("capacity_factor must be a number, got None")
    return math.ceil(c * top_k * n_tokens / n_experts)


def apply_capacity(
    experts: torch.Tensor, n_experts: int, capacity: int
) -> torch.Tensor:
    """Which assignments fit: each expert keeps its first ``capacity`` tokens.

    ``experts`` ``(N, k)``. The queue of an expert is filled with all first choices
    in token order, then all second choices, and so on (GShard); an assignment beyond
    ``capacity`` is dropped. Returns ``kept`` ``(N, k)``, boolean.
    """
    check_tensor(experts, "experts", ndim=2, dtype=torch.long)
    check_positive_int(n_experts, "n_experts")
    check_positive_int(capacity, "capacity")
    if (
        experts.device.type == "cpu"
        and experts.numel()
        and (experts.min() < 0 or experts.max() >= n_experts)
    ):
        raise ValueError(f"experts must lie in 0..{n_experts - 1}")
    return _apply_capacity(experts, n_experts, capacity)


def _apply_capacity(
    experts: torch.Tensor, n_experts: int, capacity: int
) -> torch.Tensor:
    """:func:`apply_capacity`, unchecked."""
    order = experts.t().reshape(-1)  # (k N,): choice rank first, then token
    one_hot = F.one_hot(order, n_experts)  # (k N, E)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # (k N,): place in queue
    kept = position < capacity  # (k N,)
    return kept.view(experts.shape[1], experts.shape[0]).t()  # (N, k)


def load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The Switch Transformer's auxiliary loss, $E \sum_{i=1}^{E} f_i P_i$.

    $f_i$ is the fraction of tokens that chose expert $i$ among their top $k$ (before
    any dropping), $P_i$ the mean router probability of expert $i$. Its minimum on a
    balanced router is $k$ (1 for top-1). ``probs`` ``(N, E)``, ``experts`` ``(N, k)``;
    ``mask`` ``(N,)`` (True = a real token) leaves padding out.
    """
    _check_logits(probs, "probs")
    check_tensor(experts, "experts", ndim=2, dtype=torch.long)
    if experts.shape[0] != probs.shape[0]:
        raise ValueError(
            f"experts {tuple(experts.shape)} and probs {tuple(probs.shape)} must have "
            "one row per token"
        )
    if mask is None:
        mask = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    check_tensor(mask, "mask", ndim=1, dtype=torch.bool)
    if mask.shape[0] != probs.shape[0]:
        raise ValueError(f"mask must have shape ({probs.shape[0]},)")
    return _load_balancing_loss(probs, experts, mask)


def _load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """:func:`load_balancing_loss`, unchecked; ``mask`` ``(N,)`` True = a real token."""
    n_experts = probs.shape[1]
    real = mask.to(probs.dtype)  # (N,)
    chosen = F.one_hot(experts, n_experts).sum(1).to(probs.dtype)  # (N, E)
    f = (chosen * real[:, None]).sum(0) / real.sum()  # (E,): fraction of tokens
    p = (probs * real[:, None]).sum(0) / real.sum()  # (E,): mean probability
    return n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    r"""ST-MoE's router z-loss: $\frac{1}{N} \sum_n \big(\log \sum_i e^{z_{ni}}\big)^2$.

    It keeps the router's logits $z$ small, where the softmax is well conditioned.
    ``logits`` ``(N, E)``.
    """
    _check_logits(logits)
    return torch.logsumexp(logits, dim=-1).square().mean()


def expert_load(routing: Routing, n_experts: int) -> torch.Tensor:
    """The fraction of all token-to-expert assignments each expert received.

    Counts the router's choices (kept or not); returns ``(E,)``, summing to 1.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    check_positive_int(n_experts, "n_experts")
    counts = torch.bincount(routing.experts.reshape(-1), minlength=n_experts)
    return counts.float() / counts.sum()


class SparseMoE(nn.Module):
    r"""A sparse mixture of ``n_experts`` SwiGLU feed-forward experts.

    For each token $x$: router probabilities $p = \operatorname{softmax}(x W_r)$, the
    set $\mathcal T$ of the ``top_k`` most probable experts, and

    $y = \sum_{i \in \mathcal T} g_i\, \mathrm{FFN}_i(x), \qquad
    g_i = p_i \;\text{(Switch)} \;\text{or}\; p_i / \textstyle\sum_{j \in \mathcal T}
    p_j \;\text{(Mixtral)}.$

    With ``capacity_factor`` $c$, expert $i$ processes at most
    $\lceil c\, k N / E \rceil$ of the $N$ tokens of a call; a dropped assignment
    contributes 0 (in a residual block, the token passes through unchanged).
    ``x`` ``(..., d_model)`` -> ``(..., d_model)``. The last call's decisions are kept
    in ``self.routing`` (:class:`Routing`), for the auxiliary losses.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_experts, "n_experts")
        self.top_k = _check_top_k(top_k, n_experts)
        self.capacity_factor = _check_capacity_factor(capacity_factor)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.d_model, self.n_experts = d_model, n_experts
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_r: the router
        self.experts = nn.ModuleList(
            GatedFeedForward(d_model, d_hidden) for _ in range(n_experts)
        )
        self.routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", floating=True)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must end in d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.d_model)  # (N, d)
        logits = self.gate(tokens)  # (N, E): x W_r
        probs, experts, weights = _route(logits, self.top_k, self.normalize)
        if self.capacity_factor is None or tokens.shape[0] == 0:
            kept = torch.ones_like(experts, dtype=torch.bool)
        else:
            capacity = expert_capacity(
                tokens.shape[0], self.n_experts, self.capacity_factor, self.top_k
            )
            kept = _apply_capacity(experts, self.n_experts, capacity)  # (N, k)
        weights = weights * kept  # a dropped assignment has gate 0
        out = torch.zeros_like(tokens)  # (N, d)
        for i, expert in enumerate(self.experts):
            token, slot = torch.where((experts == i) & kept)  # who goes to expert i
            if token.numel():
                y = expert(tokens[token]) * weights[token, slot, None]  # (n_i, d)
                out = out.index_add(0, token, y)  # y_n += g_i FFN_i(x_n)
        self.routing = Routing(logits, probs, experts, weights, kept)
        return out.view(x.shape)

    def aux_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The load-balancing loss and the router z-loss of the last call."""
        if self.routing is None:
            raise RuntimeError("call the module first: there is no routing yet")
        r = self.routing
        balance = load_balancing_loss(r.probs, r.experts)
        return balance, router_z_loss(r.logits)


class TinyLM(DecoderLM):
    """A decoder-only language model whose feed-forward slots hold ``make_ffn()``.

    The book's :class:`~dlabc.decoder.DecoderLM`: scaled embeddings plus sinusoidal
    positions, ``n_layers`` pre-LN :class:`~dlabc.decoder.DecoderBlock` of the RoPE
    chapter's causal :class:`CausalSelfAttention` (without positions of its own) and
    ``make_ffn()``, a final norm and a linear read-out. ``make_ffn`` builds a dense
    :class:`GatedFeedForward` or a :class:`SparseMoE`. Ids ``(B, T)`` -> logits
    ``(B, T, vocab_size)``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        make_ffn,
        max_len: int = 512,
    ) -> None:
        if not callable(make_ffn):
            raise TypeError(f"make_ffn must be callable, got {make_ffn!r}")

        def make_block(i: int) -> DecoderBlock:
            attn = CausalSelfAttention(d_model, n_heads, positions="none")
            return DecoderBlock(attn, make_ffn(), lambda: LayerNorm(d_model, eps=1e-5))

        super().__init__(
            vocab_size,
            d_model,
            n_layers,
            make_block,
            lambda: LayerNorm(d_model, eps=1e-5),
            positions=SinusoidalPositionalEncoding(d_model, max_len=max_len),
        )

    def moe_layers(self) -> list[SparseMoE]:
        """The :class:`SparseMoE` feed-forward layers, first block first."""
        return [b.ff for b in self.blocks if isinstance(b.ff, SparseMoE)]


def table_task(
    n: int,
    seq_len: int,
    table: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of random symbols whose targets are facts from a lookup table.

    ``table`` ``(V, V)`` of ints in ``0..V-1``: the target at position $t \\ge 1$ is
    ``table[x[t-1], x[t]]`` ($V^2$ unrelated facts to memorise), at position 0 it is
    ``x[0]``. Returns ``tokens`` and ``targets``, both ``(n, seq_len)``.
    """
    check_positive_int(n, "n")
    check_positive_int(seq_len, "seq_len")
    check_tensor(table, "table", ndim=2, dtype=torch.long)
    vocab = table.shape[0]
    if table.shape != (vocab, vocab) or table.min() < 0 or table.max() >= vocab:
        raise ValueError(
            f"table must be square (V, V) with entries in 0..V-1, got shape "
            f"{tuple(table.shape)}"
        )
    tokens = torch.randint(vocab, (n, seq_len), generator=generator)  # (n, T)
    targets = tokens.clone()
    targets[:, 1:] = table[tokens[:, :-1], tokens[:, 1:]]  # (n, T - 1)
    return tokens, targets
