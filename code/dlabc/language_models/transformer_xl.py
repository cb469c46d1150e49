r"""Transformer-XL's segment-level recurrence and relative positional attention, and
XLNet's permutation language model with two-stream attention.

Chapter: ``book/language_models/transformer_xl.md``.

References:
- Dai, Yang, Yang, Carbonell, Le & Salakhutdinov (2019), *Transformer-XL: Attentive
  Language Models Beyond a Fixed-Length Context*, ACL (the memory of the previous
  segment's hidden states, the relative attention score with its biases $u$ and $v$,
  and the shift that computes it for all pairs at once).
- Yang, Dai, Yang, Carbonell, Salakhutdinov & Le (2019), *XLNet: Generalized
  Autoregressive Pretraining for Language Understanding*, NeurIPS (factorization
  orders, two-stream attention, partial prediction).

:class:`RelativeAttention` is the attention of both models. Its keys and values are
read from a *context*, the memory of the layer followed by the current segment, and
its scores add to the content term a term that depends only on the distance $i - j$
between query and key, through sinusoids $R_{i-j}$ that are never added to the
embeddings. :func:`relative_shift` lines those distance scores up with the keys.
:class:`Memory` is the book's decoder :class:`~dlabc.decoder.Cache` with a
stop-gradient, so that :class:`TransformerXL` is the book's
:class:`~dlabc.decoder.DecoderLM` with post-norm blocks whose cache is the memory.
:class:`XLNet` runs a content stream and a query stream through the same weights,
with the masks of :func:`permutation_masks`.
Hugging Face's ``XLNetModel`` (``attn_type="uni"`` for Transformer-XL, ``"bi"`` for
XLNet) and ``XLNetLMHeadModel`` are the references; :func:`hf_xlnet_state_dict`
converts our weights to theirs. Shapes: ``B`` batch, ``T`` positions of the segment,
``M`` positions of the memory, ``K = M + T`` keys, ``L = K + T - 1`` distances.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import Cache, DecoderBlock, DecoderLM

__all__ = [
    "XLConfig",
    "CONFIGS",
    "relative_sinusoids",
    "relative_shift",
    "causal_mask",
    "permutation_masks",
    "RelativeAttention",
    "FeedForward",
    "Memory",
    "TransformerXL",
    "TwoStreamBlock",
    "XLNet",
    "hf_xlnet_state_dict",
    "stream_segments",
    "loss_by_position",
]


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class XLConfig:
    """The sizes of a Transformer-XL or XLNet model (Hugging Face's ``XLNetConfig``
    names in brackets): ``vocab_size``, ``d_model``, ``n_heads`` (``n_head``),
    ``n_layers`` (``n_layer``), ``d_inner``, the memory length ``mem_len``,
    ``activation`` of the feed-forward network (``"relu"`` in Transformer-XL,
    ``"gelu"`` in XLNet) and ``layer_norm_eps``."""

    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    d_inner: int
    mem_len: int | None = None
    activation: str = "gelu"
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_inner"):
            check_positive_int(getattr(self, name), name)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} must be n_heads={self.n_heads} times an "
                "even head width"
            )
        if self.mem_len is not None:
            if isinstance(self.mem_len, bool) or not isinstance(self.mem_len, int):
                raise TypeError(f"mem_len must be None or an int, got {self.mem_len!r}")
            if self.mem_len < 0:
                raise ValueError(f"mem_len must be >= 0, got {self.mem_len}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {tuple(_ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        check_number(self.layer_norm_eps, "layer_norm_eps", low=0, low_open=True)


#: The published XLNet configurations (Yang et al., 2019, appendix A; the SentencePiece
#: vocabulary of 32,000 pieces; memory of 384 tokens in pretraining). The book's
#: :class:`XLNet` leaves out the relative segment encoding (2 x n_heads x d_head + a
#: bias per layer), so its count is a few thousand parameters short of Hugging Face's.
CONFIGS: dict[str, XLConfig] = {
    "xlnet-base": XLConfig(32000, 768, 12, 12, 3072, mem_len=384),
    "xlnet-large": XLConfig(32000, 1024, 16, 24, 4096, mem_len=384),
}


def relative_sinusoids(distances: torch.Tensor, d_model: int) -> torch.Tensor:
    r"""The sinusoids $R_k$ of the distances $k$ = ``distances`` ``(L,)`` ->
    ``(L, d_model)``:

    $R_k = \big[\sin(k\,\omega_0), \ldots, \sin(k\,\omega_{d/2-1}),\
    \cos(k\,\omega_0), \ldots, \cos(k\,\omega_{d/2-1})\big],
    \quad \omega_i = 10000^{-2i/d}$,

    the sinusoids of the 2017 Transformer with the sines first and the cosines after
    (the layout of Transformer-XL's and XLNet's code: a permutation of the features,
    which a learned $W_{k,R}$ does not notice). In the dtype of ``distances``.
    """
    check_tensor(distances, "distances", ndim=1, floating=True)
    check_positive_int(d_model, "d_model")
    if d_model % 2:
        raise ValueError(f"d_model must be even, got {d_model}")
    return _sinusoids(distances, d_model)


def _sinusoids(distances: torch.Tensor, d_model: int) -> torch.Tensor:
    even = torch.arange(0, d_model, 2, dtype=distances.dtype, device=distances.device)
    omega = 10000.0 ** (-even / d_model)  # (d/2,)
    angles = distances[:, None] * omega  # (L, d/2): k omega_i
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (L, d)


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    r"""Line up scores by distance with the keys: ``(..., T, L)`` -> ``(..., T, K)``.

    Column $c$ of ``scores`` holds the score of distance $K - 1 - c$, for
    $L = K + T - 1$ distances from $K - 1$ down to $-(T - 1)$; the query $i$ of the
    segment sits at position $M + i$ of the keys ($M = K - T$). The result holds at
    $[i, j]$ the score of the distance $M + i - j$, that is column $T - 1 - i + j$ of
    row $i$: every row starts one column further left than the row above. Instead of a
    gather, Transformer-XL's trick: put a zero column in front, read the same numbers
    as $L + 1$ rows of $T$, drop the first row, read the rest as $T$ rows of $L$ and
    keep the first $K$ columns.
    """
    *batch, T, L = scores.shape
    padded = F.pad(scores, (1, 0))  # (..., T, L + 1): a zero column in front
    padded = padded.view(*batch, L + 1, T)  # the same numbers as L + 1 rows of T
    shifted = padded[..., 1:, :].reshape(*batch, T, L)  # drop a row: T rows of L
    return shifted[..., : L - T + 1]  # (..., T, K)


def causal_mask(
    T: int, M: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(T, M + T)`` booleans, True where query ``i`` of the segment may see key ``j``
    of memory-and-segment: the whole memory and the segment up to itself,
    ``j <= M + i``."""
    check_positive_int(T, "T")
    if isinstance(M, bool) or not isinstance(M, int) or M < 0:
        raise ValueError(f"M must be an int >= 0, got {M!r}")
    return torch.ones(T, M + T, dtype=torch.bool, device=device).tril(M)


def permutation_masks(
    order: torch.Tensor, M: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""XLNet's two masks for the factorization orders ``order`` ``(B, T)`` (each row
    a permutation $z$ of ``0..T-1``; ``order[b, t]`` is the position predicted at
    step $t$), each ``(B, T, M + T)``, True where position $i$ may see key $j$.

    With $\mathrm{rank}(z_t) = t$: the content stream of $i$ sees the positions
    that come no later in the order, $\mathrm{rank}(j) \le \mathrm{rank}(i)$, itself
    included; the query stream sees only the earlier ones,
    $\mathrm{rank}(j) < \mathrm{rank}(i)$, never its own token. Both see the whole
    memory of ``M`` positions.
    """
    check_tensor(order, "order", ndim=2, dtype=torch.long)
    B, T = order.shape
    if not torch.equal(order.sort(-1).values, torch.arange(T).expand(B, T)):
        raise ValueError("every row of order must be a permutation of 0..T-1")
    if isinstance(M, bool) or not isinstance(M, int) or M < 0:
        raise ValueError(f"M must be an int >= 0, got {M!r}")
    return _permutation_masks(order, M)


def _permutation_masks(
    order: torch.Tensor, M: int
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = order.shape
    steps = torch.arange(T, device=order.device).expand(B, T)
    rank = torch.empty_like(order).scatter_(1, order, steps)  # rank[z_t] = t
    earlier = rank[:, None, :] < rank[:, :, None]  # (B, T, T): rank(j) < rank(i)
    memory = torch.ones(B, T, M, dtype=torch.bool, device=order.device)
    query = torch.cat([memory, earlier], dim=-1)  # (B, T, M + T)
    itself = torch.eye(T, dtype=torch.bool, device=order.device)
    content = torch.cat([memory, earlier | itself], dim=-1)  # rank(j) <= rank(i)
    return content, query


class RelativeAttention(nn.Module):
    r"""Multi-head attention with Transformer-XL's relative positions.

    Queries come from the segment $h$, keys and values from the context
    $\tilde h = [\mathrm{SG}(m) \circ h]$, the memory followed by the segment. Per
    head, the score of query $i$ and key $j$ is

    $A_{ij} = (q_i + u)^\top k_j + (q_i + v)^\top W_{k,R}\, R_{i-j}$,

    the content term with a bias $u$ shared by all queries, and the position term with
    its own bias $v$; the distance enters only through $R_{i-j}$ (no position is added
    to the embeddings). Scores divided by $\sqrt{d_{head}}$, masked, soft-maxed;
    values averaged; heads merged and projected by $W_o$. No biases in the projections
    (XLNet's names: ``q, k, v, r, o``, ``r_w_bias`` for $u$, ``r_r_bias`` for $v$).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(
                f"d_model={d_model} must be n_heads={n_heads} times an even head width"
            )
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)  # W_{k,E}
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.W_r = nn.Linear(d_model, d_model, bias=False)  # W_{k,R}
        self.W_o = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(0.02 * torch.randn(n_heads, self.d_head))
        self.v = nn.Parameter(0.02 * torch.randn(n_heads, self.d_head))

    def forward(
        self,
        x: torch.Tensor,
        cache: Cache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention of the segment ``x`` ``(B, T, d_model)`` over the layer's
        memory ``cache`` (which it then updates) and itself; ``mask`` defaults to
        :func:`causal_mask`."""
        check_tensor(x, "x", ndim=3, floating=True)
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be (B, T, d_model={self.d_model}), got {tuple(x.shape)}"
            )
        context = x if cache is None else cache.update(x)  # (B, K, d): [SG(m); h]
        if mask is None:
            mask = causal_mask(x.shape[1], context.shape[1] - x.shape[1], x.device)
        return self.attend(x, context, mask)

    def attend(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Queries from ``x`` ``(B, T, d)``, keys and values from ``context``
        ``(B, K, d)``, whose last ``T`` positions are those of ``x``; ``mask``
        (True: may attend) broadcasts to ``(B, n_heads, T, K)``."""
        T, K = x.shape[1], context.shape[1]
        q = self._split(self.W_q(x))  # (B, n, T, d_head)
        k = self._split(self.W_k(context))  # (B, n, K, d_head)
        v = self._split(self.W_v(context))  # (B, n, K, d_head)
        distances = torch.arange(K - 1, -T, -1, dtype=x.dtype, device=x.device)  # (L,)
        R = _sinusoids(distances, self.d_model)  # (L, d): R_{K-1}, ..., R_{-(T-1)}
        r = self._split(self.W_r(R)[None])  # (1, n, L, d_head): W_{k,R} R
        # content terms (a) + (c): (q_i + u) . k_j
        content = (q + self.u[:, None]) @ k.transpose(-1, -2)  # (B, n, T, K)
        # position terms (b) + (d): (q_i + v) . W_{k,R} R_{i-j}
        position = (q + self.v[:, None]) @ r.transpose(-1, -2)  # (B, n, T, L)
        scores = (content + relative_shift(position)) / math.sqrt(self.d_head)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        # a row with nothing to see (the first step of an order, in the query
        # stream) is all NaN: it reads nothing instead
        out = weights.nan_to_num(0.0) @ v  # (B, n, T, d_head)
        return self.W_o(out.transpose(1, 2).flatten(2))  # (B, T, d)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` -> ``(B, n_heads, T, d_head)``."""
        return x.unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2)


class FeedForward(nn.Module):
    r"""The position-wise network with biases, $W_2\,\phi(W_1 x + b_1) + b_2$;
    $\phi$ = ``activation``, ReLU in Transformer-XL, GELU in XLNet (Hugging Face's
    ``layer_1``, ``layer_2``). ``(..., d_model)`` -> ``(..., d_model)``."""

    def __init__(self, d_model: int, d_inner: int, activation: str = "gelu") -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(d_inner, "d_inner")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}"
            )
        self.layer_1 = nn.Linear(d_model, d_inner)
        self.layer_2 = nn.Linear(d_inner, d_model)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_2(self.activation(self.layer_1(x)))


class Memory(Cache):
    r"""One layer's memory: the hidden states that entered the layer in the last
    ``keep`` positions (all of them with ``keep=None``).

    The book's decoder :class:`~dlabc.decoder.Cache` with one change, the
    stop-gradient of Transformer-XL: ``update(h)`` returns the context
    $\tilde h = [\mathrm{SG}(m) \circ h]$ ``(B, M + T, d)`` and keeps its last
    ``keep`` positions, *detached*, as the next segment's memory, so that training
    never back-propagates into an earlier segment.
    """

    names = ("h",)
    ndim = 3

    def _update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (context,) = super()._update(*new)  # [m; h], the last keep positions kept
        self.tensors = tuple(t.detach() for t in self.tensors)  # SG(m) next time
        return context


def _layer_norm(config: XLConfig):
    return lambda: nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


class TransformerXL(DecoderLM):
    r"""A Transformer-XL language model: the book's :class:`~dlabc.decoder.DecoderLM`
    with post-norm blocks of :class:`RelativeAttention` and :class:`FeedForward`, no
    position embeddings, and a :class:`Memory` as each block's cache.

    ``model(ids, memory)`` reads a segment ``(B, T)`` with the memory of the previous
    ones (a list from :meth:`new_memory`, updated in place) and returns the logits
    ``(B, T, V)``; called segment after segment with the same memory, it reads a
    stream of any length. The read-out is tied to the embedding (as in XLNet's code).
    """

    def __init__(self, config: XLConfig) -> None:
        if not isinstance(config, XLConfig):
            raise TypeError(f"config must be an XLConfig, got {config!r}")
        self.config = config

        def make_block(i: int) -> DecoderBlock:
            attn = RelativeAttention(config.d_model, config.n_heads)
            ff = FeedForward(config.d_model, config.d_inner, config.activation)
            return DecoderBlock(attn, ff, _layer_norm(config), norm_first=False)

        super().__init__(
            config.vocab_size,
            config.d_model,
            config.n_layers,
            make_block,
            None,  # post-norm: the stack ends normalized
            scale_embedding=False,
            make_cache=lambda: Memory(keep=config.mem_len),
        )
        nn.init.normal_(self.embed.weight, std=0.02)  # as XLNet's code
        self.head.weight = self.embed.weight  # tied read-out

    def new_memory(self, mem_len: int | None | str = "config") -> list[Memory]:
        """An empty memory, one :class:`Memory` per layer, keeping ``mem_len``
        positions (the configuration's by default; ``None``: all)."""
        return _new_memory(self, mem_len)


def _new_memory(model: nn.Module, mem_len: int | None | str) -> list[Memory]:
    keep = model.config.mem_len if mem_len == "config" else mem_len
    if keep is not None and (
        isinstance(keep, bool) or not isinstance(keep, int) or keep < 0
    ):
        raise ValueError(f"mem_len must be None or an int >= 0, got {mem_len!r}")
    return [Memory(keep=keep) for _ in model.blocks]


class TwoStreamBlock(nn.Module):
    r"""One XLNet layer: the content stream $h$ and the query stream $g$ through the
    same attention and feed-forward network, each sublayer post-norm:

    $\begin{aligned}
    h &\leftarrow \mathrm{N}_1\big(h + \mathrm{Attn}(Q{=}h,\ KV{=}[m; h],\
    \mathcal{M}_h)\big),\\
    g &\leftarrow \mathrm{N}_1\big(g + \mathrm{Attn}(Q{=}g,\ KV{=}[m; h],\
    \mathcal{M}_g)\big),
    \end{aligned}$

    then $x \leftarrow \mathrm{N}_2(x + \mathrm{FFN}(x))$ for both. Keys and values
    come from the content stream (and the memory $m$) only, so no position's query
    stream is read by another position.
    """

    def __init__(self, config: XLConfig) -> None:
        super().__init__()
        self.norm1 = _layer_norm(config)()
        self.attn = RelativeAttention(config.d_model, config.n_heads)
        self.norm2 = _layer_norm(config)()
        self.ff = FeedForward(config.d_model, config.d_inner, config.activation)

    def forward(
        self,
        h: torch.Tensor,
        g: torch.Tensor,
        content_mask: torch.Tensor,
        query_mask: torch.Tensor,
        memory: Memory | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context = h if memory is None else memory.update(h)  # (B, K, d): [SG(m); h]
        h = self.norm1(h + self.attn.attend(h, context, content_mask))
        g = self.norm1(g + self.attn.attend(g, context, query_mask))
        return self.norm2(h + self.ff(h)), self.norm2(g + self.ff(g))


class XLNet(nn.Module):
    r"""XLNet's permutation language model with two-stream attention.

    The content stream starts from the token embeddings, $h_i^{(0)} = e(x_i)$; the
    query stream from one learned vector $w$ at every position, $g_i^{(0)} = w$: it
    learns *where* it predicts from the relative distances of its attention, never
    *what* is there. After the
    :class:`TwoStreamBlock` layers, the query stream of position $z_t$ reads out
    $p(x_{z_t} \mid x_{z_{<t}})$ through the read-out tied to the embedding.

    ``model(ids, order, memory=None)``: ids ``(B, T)``, factorization orders ``order``
    ``(B, T)`` (:func:`permutation_masks`) -> logits ``(B, T, V)`` at every position.
    XLNet trains on the last positions of each order only (partial prediction); the
    query stream here runs at every position, which costs more and changes nothing at
    the others, since no position's query stream is read by another.
    """

    def __init__(self, config: XLConfig) -> None:
        super().__init__()
        if not isinstance(config, XLConfig):
            raise TypeError(f"config must be an XLConfig, got {config!r}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # as XLNet's code
        self.w = nn.Parameter(0.02 * torch.randn(config.d_model))  # g^(0)
        self.blocks = nn.ModuleList(
            TwoStreamBlock(config) for _ in range(config.n_layers)
        )
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.head.weight = self.embed.weight  # tied read-out

    def new_memory(self, mem_len: int | None | str = "config") -> list[Memory]:
        """An empty memory, one :class:`Memory` per layer (see
        :meth:`TransformerXL.new_memory`)."""
        return _new_memory(self, mem_len)

    def forward(
        self,
        ids: torch.Tensor,
        order: torch.Tensor,
        memory: list[Memory] | None = None,
    ) -> torch.Tensor:
        check_tensor(ids, "ids", ndim=2, dtype=torch.long)
        check_tensor(order, "order", ndim=2, dtype=torch.long)
        if order.shape != ids.shape:
            raise ValueError(
                f"order {tuple(order.shape)} must have the shape of ids "
                f"{tuple(ids.shape)}"
            )
        if ids.device.type == "cpu" and ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
                raise ValueError(f"ids must lie in [0, {self.config.vocab_size})")
        if memory is not None and (
            not isinstance(memory, list) or len(memory) != len(self.blocks)
        ):
            raise ValueError(f"memory must be a list of {len(self.blocks)} Memory")
        M = 0 if memory is None else len(memory[0])
        permutation_masks(order, M)  # checks that each row is a permutation
        return self._forward(ids, order, memory)

    def _forward(
        self, ids: torch.Tensor, order: torch.Tensor, memory: list[Memory] | None
    ) -> torch.Tensor:
        M = 0 if memory is None else len(memory[0])  # positions in memory
        content_mask, query_mask = _permutation_masks(order, M)  # (B, T, M + T)
        h = self.embed(ids)  # (B, T, d): content stream, the tokens
        g = self.w.expand_as(h)  # (B, T, d): query stream, only the positions
        for i, block in enumerate(self.blocks):
            h, g = block(
                h,
                g,
                content_mask[:, None],  # (B, 1, T, K), for every head
                query_mask[:, None],
                None if memory is None else memory[i],
            )
        return self.head(g)  # (B, T, V): p(x_i | the tokens before i in the order)


def hf_xlnet_state_dict(model: TransformerXL | XLNet) -> dict[str, torch.Tensor]:
    """Our weights under the names and shapes of Hugging Face's ``XLNetModel``
    (prefix ``transformer.`` and ``lm_loss`` for ``XLNetLMHeadModel``: load with
    ``strict=False``). Their ``q, k, v, o, r`` are ``(d_model, n_head, d_head)``; their
    relative segment encoding (``r_s_bias``, ``seg_embed``) has no counterpart here."""
    if not isinstance(model, (TransformerXL, XLNet)):
        raise TypeError(f"model must be a TransformerXL or XLNet, got {model!r}")
    n, d_head = model.config.n_heads, model.config.d_model // model.config.n_heads
    out = {"word_embedding.weight": model.embed.weight.detach()}
    if isinstance(model, XLNet):
        out["mask_emb"] = model.w.detach()[None, None]
    for i, block in enumerate(model.blocks):
        attn, prefix = block.attn, f"layer.{i}."
        for ours, theirs in ("W_q", "q"), ("W_k", "k"), ("W_v", "v"), ("W_r", "r"):
            weight = getattr(attn, ours).weight.detach()  # (n d_head, d_model)
            out[prefix + "rel_attn." + theirs] = weight.T.unflatten(1, (n, d_head))
        out[prefix + "rel_attn.o"] = attn.W_o.weight.detach().unflatten(1, (n, d_head))
        out[prefix + "rel_attn.r_w_bias"] = attn.u.detach()
        out[prefix + "rel_attn.r_r_bias"] = attn.v.detach()
        for ours, theirs in (
            ("norm1", "rel_attn.layer_norm"),
            ("norm2", "ff.layer_norm"),
        ):
            for p in ("weight", "bias"):
                out[f"{prefix}{theirs}.{p}"] = getattr(getattr(block, ours), p).detach()
        for layer in ("layer_1", "layer_2"):
            for p in ("weight", "bias"):
                out[f"{prefix}ff.{layer}.{p}"] = getattr(
                    getattr(block.ff, layer), p
                ).detach()
    out = {"transformer." + k: v for k, v in out.items()}
    out["lm_loss.weight"] = model.head.weight.detach()
    out["lm_loss.bias"] = model.head.bias.detach()
    return out


def stream_segments(
    ids: torch.Tensor, batch_size: int, seg_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Transformer-XL's reading order: the text ``ids`` ``(N,)`` cut into
    ``batch_size`` contiguous streams, read ``seg_len`` positions at a time, in order.

    Yields ``(inputs, targets)``, each ``(batch_size, seg_len)``, with
    ``targets[b, t]`` the id after ``inputs[b, t]``; row ``b`` of a segment continues
    row ``b`` of the previous one, so a memory carried from segment to segment holds
    the real past of each row. Stops when a stream is used up (the rest is dropped).
    """
    check_tensor(ids, "ids", ndim=1, dtype=torch.long)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seg_len, "seg_len")
    per_stream = (len(ids) - 1) // batch_size  # targets per stream
    if per_stream < seg_len:
        raise ValueError(
            f"ids ({len(ids)}) too short for {batch_size} streams of seg_len={seg_len}"
        )
    return _segments(ids, batch_size, seg_len, per_stream)


def _segments(
    ids: torch.Tensor, batch_size: int, seg_len: int, per_stream: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n_segments = per_stream // seg_len
    starts = torch.arange(batch_size) * per_stream  # (B,): where each stream starts
    window = starts[:, None] + torch.arange(n_segments * seg_len + 1)
    streams = ids[window.to(ids.device)]  # (B, n_segments * seg_len + 1)
    for s in range(n_segments):
        chunk = streams[:, s * seg_len : (s + 1) * seg_len + 1]  # (B, seg_len + 1)
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def loss_by_position(
    model: TransformerXL,
    ids: torch.Tensor,
    batch_size: int,
    seg_len: int,
    mem_len: int | None,
) -> torch.Tensor:
    """The mean cross-entropy (nats) of ``model`` at each position of a segment
    ``(seg_len,)``, reading ``ids`` as :func:`stream_segments` does with a memory of
    ``mem_len`` positions (``None``: all of the past), in evaluation mode."""
    if not isinstance(model, TransformerXL):
        raise TypeError(f"model must be a TransformerXL, got {type(model).__name__}")
    segments = stream_segments(ids, batch_size, seg_len)  # checks ids and sizes
    memory = model.new_memory(mem_len)  # checks mem_len
    was_training = model.training
    model.eval()
    total, count = torch.zeros(seg_len), 0
    try:
        for inputs, targets in segments:
            logits = model(inputs, memory)  # (B, T, V)
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total += loss.sum(0).float().cpu()  # (T,)
            count += len(inputs)
    finally:
        model.train(was_training)
    return total / count
