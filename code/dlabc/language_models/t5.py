r"""T5: a text-to-text encoder-decoder with bucketed relative position biases, span
corruption, and one model for several tasks.

Chapter: ``book/language_models/t5.md``.

References:
- Raffel et al. (2020), *Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer*, JMLR 21(140) (T5: section 2.1 the model, 3.1.4 and
  3.3 the span-corruption objective with a noise density of 15 % and a mean span
  length of 3, 3.5.2 multi-task training, 3.7 the five sizes).
- Shaw et al. (2018), *Self-Attention with Relative Position Representations*, NAACL
  (relative positions; T5 simplifies them to one learned scalar per bucket and head).
- Shazeer (2020), *GLU Variants Improve Transformer* (the gated-GELU network of T5
  v1.1).

The model is the layout of Hugging Face's ``T5ForConditionalGeneration`` for T5 v1.0:
RMS-style layer norms without bias before every sublayer, a ReLU feed-forward
network, attention logits *not* divided by $\sqrt{d_{kv}}$, one table of relative
position biases in each stack (created in the first layer, added in every layer's
self-attention), embeddings shared by encoder, decoder and output layer, and the
decoder's output multiplied by $d_{model}^{-1/2}$ before the tied output layer.
``T5Config(ffn="gated-gelu", tie_embeddings=False)`` is T5 v1.1's layout. Our names
map to Hugging Face's with :func:`hf_t5_names`. Shapes: ``B`` batch, ``S`` source
positions, ``T`` target positions, ``H`` heads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.foundations.normalization import RMSNorm
from dlabc.improvements.gqa_kv_cache import LayerKVCache

__all__ = [
    "T5Config",
    "CONFIGS",
    "PUBLISHED_SIZES",
    "PAD",
    "EOS",
    "relative_position_bucket",
    "RelativePositionBias",
    "T5Attention",
    "T5FeedForward",
    "T5EncoderLayer",
    "T5DecoderLayer",
    "T5Stack",
    "T5",
    "T5Cache",
    "greedy_decode",
    "hf_t5_names",
    "random_spans_noise_mask",
    "replace_spans",
    "span_corruption",
    "CharTokenizer",
    "TASKS",
    "make_task_example",
    "make_batch",
    "seq2seq_loss",
]

PAD, EOS = 0, 1  # T5's ids: the decoder starts from PAD, every sequence ends with EOS
FFNS = ("relu", "gated-gelu")


@dataclass(frozen=True)
class T5Config:
    """A T5 model's sizes, in the names of the paper and of Hugging Face's ``T5Config``.

    ``d_kv`` is the width of one head (``n_heads * d_kv`` need not be ``d_model``:
    T5-3B and T5-11B have more); ``n_decoder_layers`` defaults to ``n_layers``.
    ``ffn="relu"`` with ``tie_embeddings=True`` is T5 v1.0; ``"gated-gelu"`` with
    untied embeddings is v1.1.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    n_layers: int = 6
    n_heads: int = 8
    n_decoder_layers: int | None = None
    num_buckets: int = 32
    max_distance: int = 128
    dropout: float = 0.1
    eps: float = 1e-6
    ffn: str = "relu"
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "n_layers", "n_heads"):
            check_positive_int(getattr(self, name), name)
        if self.n_decoder_layers is not None:
            check_positive_int(self.n_decoder_layers, "n_decoder_layers")
        check_positive_int(self.num_buckets, "num_buckets")
        check_positive_int(self.max_distance, "max_distance")
        if self.num_buckets < 4:
            raise ValueError(f"num_buckets must be at least 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 2:
            raise ValueError(
                f"max_distance must exceed num_buckets // 2 = {self.num_buckets // 2}, "
                f"got {self.max_distance}"
            )
        check_number(self.dropout, "dropout", low=0, high=1, high_open=True)
        check_number(self.eps, "eps", low=0, low_open=True)
        if self.ffn not in FFNS:
            raise ValueError(f"ffn must be one of {FFNS}, got {self.ffn!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(
                f"tie_embeddings must be a bool, got {self.tie_embeddings!r}"
            )

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers


#: The five published sizes (Raffel et al., section 3.7; Hugging Face's configs).
CONFIGS: dict[str, T5Config] = {
    "t5-small": T5Config(d_model=512, d_kv=64, d_ff=2048, n_layers=6, n_heads=8),
    "t5-base": T5Config(d_model=768, d_kv=64, d_ff=3072, n_layers=12, n_heads=12),
    "t5-large": T5Config(d_model=1024, d_kv=64, d_ff=4096, n_layers=24, n_heads=16),
    "t5-3B": T5Config(d_model=1024, d_kv=128, d_ff=16384, n_layers=24, n_heads=32),
    "t5-11B": T5Config(d_model=1024, d_kv=128, d_ff=65536, n_layers=24, n_heads=128),
}

#: The sizes the paper gives them, in parameters (section 3.7: "60 million", "220
#: million", "770 million", "2.8 billion", "11 billion").
PUBLISHED_SIZES: dict[str, float] = {
    "t5-small": 60e6,
    "t5-base": 220e6,
    "t5-large": 770e6,
    "t5-3B": 2.8e9,
    "t5-11B": 11e9,
}


# ------------------------------------------------------------ relative positions


def relative_position_bucket(
    relative_position: torch.Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    r"""The bucket of each relative position $n = j - i$ (key minus query).

    Bidirectional (the encoder): half the buckets for keys before the query and
    half for keys after it. Causal (the decoder): all buckets for the past, and
    every key after the query shares bucket 0 with $n = 0$ (the mask hides them).
    With $N$ buckets per direction and distance $m = |n|$ (or $\max(-n, 0)$), the
    first $N/2$ buckets are exact and the rest grow logarithmically up to
    ``max_distance``, beyond which everything shares the last bucket:

    $b(m) = m$ if $m < N/2$, else
    $\min\big(N - 1,\ \tfrac N2 + \big\lfloor \tfrac{\log(2m/N)}{\log(2\,m_{max}/N)}
    \cdot \tfrac N2 \big\rfloor\big)$.
    """
    n = relative_position
    bucket = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n > 0).long() * num_buckets  # keys after the query
        distance = n.abs()
    else:
        distance = (-n).clamp(min=0)  # only the past has distinct buckets
    exact = num_buckets // 2  # buckets 0 .. exact-1: one distance each
    # the others: logarithmic in the distance, up to max_distance
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(
        max_distance / exact
    )
    far = exact + (log_ratio * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)  # beyond max_distance: the last bucket
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    r"""One learned scalar per bucket and head, added to the attention logits:
    $\mathrm{bias}_{h,i,j} = w_{b(j - i),\,h}$.

    ``forward(q_len, k_len, offset)`` gives the ``(1, H, q_len, k_len)`` biases for
    queries at positions ``offset .. offset + q_len - 1`` and keys at ``0 ..
    k_len - 1``. ``weight`` is ``(num_buckets, H)``, Hugging Face's
    ``relative_attention_bias.weight``.
    """

    def __init__(
        self, n_heads: int, bidirectional: bool, num_buckets: int, max_distance: int
    ) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.weight = nn.Parameter(torch.randn(num_buckets, n_heads))  # w

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        device = self.weight.device
        i = torch.arange(offset, offset + q_len, device=device)  # query positions
        j = torch.arange(k_len, device=device)  # key positions
        buckets = relative_position_bucket(
            j[None, :] - i[:, None],  # (q_len, k_len): n = j - i
            self.bidirectional,
            self.num_buckets,
            self.max_distance,
        )
        return self.weight[buckets].permute(2, 0, 1)[None]  # (1, H, q_len, k_len)


# -------------------------------------------------------------- the layers


class T5Attention(nn.Module):
    r"""Multi-head attention as T5 computes it: no $1/\sqrt{d_{kv}}$, a position bias.

    $A = \mathrm{softmax}\big(Q K^\top + \mathrm{bias} + \mathrm{mask}\big),\quad
    \mathrm{out} = [A_1 V_1, \dots, A_H V_H]\, W^O$,

    with $Q = x W^Q$ and $K, V$ from ``memory`` (cross-attention) or from ``x``.
    The scale is left out because T5 initializes $W^Q$ with a variance $d_{kv}$ times
    smaller. ``mask`` is boolean, ``True`` = may attend. ``cache``: a
    :class:`~dlabc.improvements.gqa_kv_cache.LayerKVCache` that the new keys and
    values are appended to (self-attention), or a tuple ``(K, V)`` computed once from
    the memory (cross-attention). ``x`` ``(B, T, d_model)`` -> ``(B, T, d_model)``.
    """

    def __init__(self, d_model: int, n_heads: int, d_kv: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.d_kv = n_heads, d_kv
        self.q = nn.Linear(d_model, n_heads * d_kv, bias=False)  # W^Q
        self.k = nn.Linear(d_model, n_heads * d_kv, bias=False)  # W^K
        self.v = nn.Linear(d_model, n_heads * d_kv, bias=False)  # W^V
        self.o = nn.Linear(n_heads * d_kv, d_model, bias=False)  # W^O
        self.dropout = nn.Dropout(dropout)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_kv).transpose(1, 2)  # (B, H, t, d_kv)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: LayerKVCache | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        q = self.heads(self.q(x))  # (B, H, T, d_kv)
        if isinstance(cache, tuple):  # cross-attention: the memory's, computed once
            k, v = cache
        else:
            source = x if memory is None else memory
            k, v = self.heads(self.k(source)), self.heads(self.v(source))
            if cache is not None:  # self-attention: append to the past positions
                k, v = cache.update(k, v)  # (B, H, S, d_kv) each
        logits = q @ k.transpose(-2, -1)  # (B, H, T, S): no 1/sqrt(d_kv)
        if bias is not None:
            logits = logits + bias  # relative positions
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        weights = self.dropout(logits.softmax(-1))  # (B, H, T, S)
        out = (weights @ v).transpose(1, 2).flatten(2)  # (B, T, H * d_kv)
        return self.o(out)  # (B, T, d_model)


class T5FeedForward(nn.Module):
    r"""T5 v1.0's network, $W_o\,\mathrm{ReLU}(W_i\,x)$, or v1.1's gated GELU,
    $W_o\big(\mathrm{GELU}(W_{i,0}\,x) \odot W_{i,1}\,x\big)$ (the tanh form of
    GELU, as in T5's code). No biases. ``(..., d_model)`` -> ``(..., d_model)``."""

    def __init__(self, d_model: int, d_ff: int, ffn: str, dropout: float) -> None:
        super().__init__()
        self.gated = ffn == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(d_model, d_ff, bias=False)  # W_{i,0}: the gate
            self.wi_1 = nn.Linear(d_model, d_ff, bias=False)  # W_{i,1}
        else:
            self.wi = nn.Linear(d_model, d_ff, bias=False)  # W_i
        self.wo = nn.Linear(d_ff, d_model, bias=False)  # W_o
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            h = F.relu(self.wi(x))  # (..., d_ff)
        return self.wo(self.dropout(h))  # (..., d_model)


class T5EncoderLayer(nn.Module):
    r"""Pre-norm self-attention and feed-forward network, each in a residual:
    $h = x + \mathrm{Attn}(\mathrm{N}_1(x))$, $y = h + \mathrm{FFN}(\mathrm{N}_2(h))$.

    The norm is RMSNorm (T5's "layer norm" without mean or bias); ``bias`` is the
    stack's relative position bias, the same in every layer.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        c = config
        self.norm1 = RMSNorm(c.d_model, eps=c.eps)
        self.attn = T5Attention(c.d_model, c.n_heads, c.d_kv, c.dropout)
        self.norm2 = RMSNorm(c.d_model, eps=c.eps)
        self.ff = T5FeedForward(c.d_model, c.d_ff, c.ffn, c.dropout)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = x + self.dropout(self.attn(self.norm1(x), bias=bias, mask=mask))
        return h + self.dropout(self.ff(self.norm2(h)))  # (B, S, d_model)


class T5DecoderLayer(nn.Module):
    r"""Causal self-attention, attention over the encoder's output (the memory) and a
    feed-forward network, each pre-norm in a residual:

    $h = x + \mathrm{Attn}(\mathrm{N}_1(x))$, $g = h + \mathrm{Cross}(\mathrm{N}_2(h),
    m)$, $y = g + \mathrm{FFN}(\mathrm{N}_3(g))$.

    Only the self-attention gets the position bias; cross-attention has none.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        c = config
        self.norm1 = RMSNorm(c.d_model, eps=c.eps)
        self.self_attn = T5Attention(c.d_model, c.n_heads, c.d_kv, c.dropout)
        self.norm2 = RMSNorm(c.d_model, eps=c.eps)
        self.cross_attn = T5Attention(c.d_model, c.n_heads, c.d_kv, c.dropout)
        self.norm3 = RMSNorm(c.d_model, eps=c.eps)
        self.ff = T5FeedForward(c.d_model, c.d_ff, c.ffn, c.dropout)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        bias: torch.Tensor,
        mask: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
        cache: T5LayerCache | None = None,
    ) -> torch.Tensor:
        self_cache = None if cache is None else cache.self_kv
        cross_cache = None if cache is None else cache.cross_kv
        attn = self.self_attn(self.norm1(x), bias=bias, mask=mask, cache=self_cache)
        h = x + self.dropout(attn)
        cross = self.cross_attn(
            self.norm2(h), memory, mask=memory_mask, cache=cross_cache
        )
        g = h + self.dropout(cross)
        return g + self.dropout(self.ff(self.norm3(g)))  # (B, T, d_model)


class T5LayerCache:
    """One decoder layer's cache: its self-attention keys and values, which grow by
    one position per step, and the memory's keys and values, computed once."""

    def __init__(self, layer: T5DecoderLayer, memory: torch.Tensor) -> None:
        attn = layer.cross_attn
        self.self_kv = LayerKVCache()
        self.cross_kv = (attn.heads(attn.k(memory)), attn.heads(attn.v(memory)))


class T5Cache(list):
    """The decoder's cache: one :class:`T5LayerCache` per layer; ``seen`` counts the
    target positions decoded so far (the offset of the next query's position)."""

    @property
    def seen(self) -> int:
        return self[0].self_kv.seen


class T5Stack(nn.Module):
    r"""The encoder (``causal=False``) or the decoder (``causal=True``): layers that
    share one :class:`RelativePositionBias`, then a final RMSNorm.

    The bias table lives in the first layer in T5's code and Hugging Face's
    (``block.0...relative_attention_bias``); here it is the stack's ``relative_bias``.
    """

    def __init__(self, config: T5Config, causal: bool) -> None:
        super().__init__()
        c = config
        self.causal = causal
        self.relative_bias = RelativePositionBias(
            c.n_heads, not causal, c.num_buckets, c.max_distance
        )
        layer = T5DecoderLayer if causal else T5EncoderLayer
        n_layers = c.decoder_layers if causal else c.n_layers
        self.layers = nn.ModuleList(layer(c) for _ in range(n_layers))
        self.norm = RMSNorm(c.d_model, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self,
        h: torch.Tensor,
        mask: torch.Tensor | None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: T5Cache | None = None,
    ) -> torch.Tensor:
        offset = 0 if cache is None else cache.seen  # position of the first query
        length = h.shape[1] + offset  # keys: the cached positions and the new ones
        bias = self.relative_bias(h.shape[1], length, offset)  # (1, H, T, length)
        h = self.dropout(h)
        for i, layer in enumerate(self.layers):
            if self.causal:
                layer_cache = None if cache is None else cache[i]
                h = layer(h, memory, bias, mask, memory_mask, layer_cache)
            else:
                h = layer(h, bias, mask)
        return self.dropout(self.norm(h))  # (B, T, d_model)


class T5(nn.Module):
    r"""T5's encoder-decoder, Hugging Face's ``T5ForConditionalGeneration``.

    $m = \mathrm{Enc}(E[x])$, $\mathrm{logits} = s\,\mathrm{Dec}(E[y_{<t}], m)\,W^\top$,

    with one embedding $E$ for encoder, decoder and, tied (v1.0), the output layer
    $W = E$ and $s = d_{model}^{-1/2}$ (the embeddings are initialized with unit
    variance, so the output is scaled instead). Untied (v1.1): a separate ``head``
    and $s = 1$. ``input_ids`` ``(B, S)``, ``decoder_input_ids`` ``(B, T)`` (the
    targets shifted right, starting with ``PAD``) -> logits ``(B, T, vocab_size)``.
    ``attention_mask`` ``(B, S)`` marks the real source tokens (default: those that
    are not ``PAD``).
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        if not isinstance(config, T5Config):
            raise TypeError(f"config must be a T5Config, got {type(config).__name__}")
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)  # E, N(0, 1)
        self.encoder = T5Stack(c, causal=False)
        self.decoder = T5Stack(c, causal=True)
        self.head = None
        if not c.tie_embeddings:
            self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        r"""T5's initialization (Mesh TensorFlow's): unit-variance embeddings,
        $W^Q \sim \mathcal N(0, 1/(d\,d_{kv}))$, other matrices $\mathcal N(0,
        1/\text{fan\_in})$, biases $\mathcal N(0, 1/d)$."""
        if self.embed.weight.is_meta:  # shapes only (count_parameters): no values
            return
        d, d_kv = self.config.d_model, self.config.d_kv
        for module in self.modules():
            if isinstance(module, T5Attention):
                nn.init.normal_(module.q.weight, std=(d * d_kv) ** -0.5)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.weight, std=d**-0.5)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=1.0)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder's output, the memory ``(B, S, d_model)``."""
        _check_ids(input_ids, "input_ids", self.config.vocab_size)
        mask = _source_mask(input_ids, attention_mask)
        return self.encoder(self.embed(input_ids), mask[:, None, None, :])

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: T5Cache | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, V)`` of the decoder given the memory; with ``cache``,
        ``decoder_input_ids`` are the new positions only."""
        _check_ids(decoder_input_ids, "decoder_input_ids", self.config.vocab_size)
        return self._decode(decoder_input_ids, memory, attention_mask, cache)

    def _decode(
        self,
        y: torch.Tensor,
        memory: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: T5Cache | None,
    ) -> torch.Tensor:
        t, offset = y.shape[1], 0 if cache is None else cache.seen
        # causal: the query at position offset + i sees keys 0 .. offset + i
        causal = torch.ones(t, t + offset, dtype=torch.bool, device=y.device)
        causal = causal.tril(offset)  # (T, offset + T)
        memory_mask = attention_mask[:, None, None, :]  # (B, 1, 1, S)
        h = self.decoder(self.embed(y), causal, memory, memory_mask, cache)
        if self.head is None:
            return (h * self.config.d_model**-0.5) @ self.embed.weight.T  # (B, T, V)
        return self.head(h)  # (B, T, V)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_ids(input_ids, "input_ids", self.config.vocab_size)
        mask = _source_mask(input_ids, attention_mask)
        memory = self.encode(input_ids, mask)  # (B, S, d_model)
        return self.decode(decoder_input_ids, memory, mask)  # (B, T, V)

    def new_cache(self, memory: torch.Tensor) -> T5Cache:
        """An empty decoder cache for ``memory``: one layer cache per decoder layer."""
        check_tensor(memory, "memory", ndim=3, floating=True)
        return T5Cache(T5LayerCache(layer, memory) for layer in self.decoder.layers)


def _check_ids(ids: object, name: str, vocab_size: int) -> None:
    check_tensor(ids, name, ndim=2, dtype=torch.long)
    if ids.device.type == "cpu" and ids.numel():  # no host sync on a GPU
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} must lie in [0, {vocab_size}), got [{low}, {high}]"
            )


def _source_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    if attention_mask is None:
        return input_ids != PAD
    check_tensor(attention_mask, "attention_mask", ndim=2)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of "
            f"input_ids {tuple(input_ids.shape)}"
        )
    return attention_mask.bool()


@torch.no_grad()
def greedy_decode(
    model: T5,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
) -> torch.Tensor:
    """The most probable next token at every step, from ``PAD`` until every sequence
    has written ``EOS`` (or ``max_new_tokens``). With ``use_cache`` the encoder runs
    once and each step feeds the decoder only the newest token; without, each step
    runs the decoder over the whole prefix. Returns ``(B, L)``: the tokens written,
    ``EOS`` included, ``PAD`` after it. Evaluation mode; the model's mode is restored.
    """
    if not isinstance(model, T5):
        raise TypeError(f"model must be a T5, got {type(model).__name__}")
    _check_ids(input_ids, "input_ids", model.config.vocab_size)
    check_positive_int(max_new_tokens, "max_new_tokens")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    was_training = model.training
    model.eval()
    try:
        return _greedy(model, input_ids, max_new_tokens, use_cache)
    finally:
        model.train(was_training)


def _greedy(
    model: T5, input_ids: torch.Tensor, max_new_tokens: int, use_cache: bool
) -> torch.Tensor:
    mask = input_ids != PAD  # (B, S)
    memory = model.encode(input_ids, mask)  # (B, S, d_model), once
    cache = model.new_cache(memory) if use_cache else None
    y = torch.full((len(input_ids), 1), PAD, device=input_ids.device)  # start: PAD
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        feed = y[:, -1:] if use_cache else y  # the newest token, or the whole prefix
        logits = model._decode(feed, memory, mask, cache)[:, -1]  # (B, V)
        token = logits.argmax(-1).masked_fill(done, PAD)  # (B,): greedy
        y = torch.cat([y, token[:, None]], dim=1)
        done = done | (token == EOS)
        if bool(done.all()):
            break
    return y[:, 1:]  # without the start token


# our names -> Hugging Face's T5ForConditionalGeneration names
def _hf_name(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "embed":
        return "shared.weight"
    if parts[0] == "head":
        return "lm_head.weight"
    stack, rest = parts[0], parts[1:]
    if rest[0] == "norm":
        return f"{stack}.final_layer_norm.weight"
    if rest[0] == "relative_bias":
        attn = "SelfAttention"
        return f"{stack}.block.0.layer.0.{attn}.relative_attention_bias.weight"
    i, module, *tail = rest[1:]
    slots = (
        {"norm1": 0, "self_attn": 0, "norm2": 1, "cross_attn": 1, "norm3": 2, "ff": 2}
        if stack == "decoder"
        else {"norm1": 0, "attn": 0, "norm2": 1, "ff": 1}
    )
    inner = {
        "attn": "SelfAttention",
        "self_attn": "SelfAttention",
        "cross_attn": "EncDecAttention",
        "ff": "DenseReluDense",
    }
    name = inner.get(module, "layer_norm")
    return ".".join([stack, "block", i, "layer", str(slots[module]), name, *tail])


def hf_t5_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`T5`'s ``state_dict`` under the names of Hugging Face's
    ``T5ForConditionalGeneration`` (the tied ``encoder.embed_tokens``,
    ``decoder.embed_tokens`` and ``lm_head`` added as copies of ``shared``)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    renamed = {_hf_name(key): value for key, value in state_dict.items()}
    if "shared.weight" in renamed:  # a whole model: the tied copies too
        shared = renamed["shared.weight"]
        renamed["encoder.embed_tokens.weight"] = shared
        renamed["decoder.embed_tokens.weight"] = shared
        renamed.setdefault("lm_head.weight", shared)
    return renamed


# ------------------------------------------------------------ span corruption


def random_spans_noise_mask(
    length: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    rng: random.Random | None = None,
) -> list[bool]:
    r"""Which of ``length`` tokens to corrupt, in spans (Raffel et al., section 3.3).

    $n_{noise} = \mathrm{round}(L \cdot \text{density})$ tokens (at least 1, at
    most $L - 1$) in $k = \mathrm{round}(n_{noise} / \bar\ell)$ spans (at least 1);
    the noise tokens are split into $k$ non-empty spans at random, the others
    too, and the spans alternate, kept first. Every such mask is equally likely.
    """
    check_positive_int(length, "length")
    if length < 2:
        raise ValueError(f"length must be at least 2, got {length}")
    check_number(noise_density, "noise_density", low=0, high=1, low_open=True)
    check_number(mean_span_length, "mean_span_length", low=1)
    rng = rng or random.Random()
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    n_spans = min(n_spans, n_noise, length - n_noise)
    noise = _random_lengths(n_noise, n_spans, rng)
    kept = _random_lengths(length - n_noise, n_spans, rng)
    mask = []
    for keep, corrupt in zip(kept, noise, strict=True):  # kept span, then noise span
        mask += [False] * keep + [True] * corrupt
    return mask


def _random_lengths(total: int, parts: int, rng: random.Random) -> list[int]:
    """``parts`` positive integers that sum to ``total``, uniformly among all such
    compositions: cut the line ``1 .. total - 1`` at ``parts - 1`` random places."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]


def replace_spans(tokens: Sequence, mask: Sequence[bool], sentinels: Sequence) -> list:
    """``tokens`` with each maximal run of masked tokens replaced by one sentinel, the
    runs numbered in order: ``sentinels[0]`` for the first, and so on."""
    out, k = [], 0
    for i, (token, masked) in enumerate(zip(tokens, mask, strict=True)):
        if not masked:
            out.append(token)
        elif i == 0 or not mask[i - 1]:  # a run starts: its sentinel
            out.append(sentinels[k])
            k += 1
    return out


def span_corruption(
    tokens: Sequence, mask: Sequence[bool], sentinels: Sequence
) -> tuple[list, list]:
    """T5's pre-training pair: the input has every corrupted span replaced by a
    sentinel, the target every *kept* span, so that the target lists the dropped
    spans, each after the sentinel that marks its place in the input."""
    if len(tokens) != len(mask):
        raise ValueError(
            f"tokens and mask must have the same length, got {len(tokens)} and "
            f"{len(mask)}"
        )
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    if runs + 1 > len(sentinels):
        raise ValueError(
            f"sentinels must hold at least {runs + 1} ids for {runs} spans, "
            f"got {len(sentinels)}"
        )
    inputs = replace_spans(tokens, mask, sentinels)
    targets = replace_spans(tokens, [not m for m in mask], sentinels)
    return inputs, targets


# --------------------------------------------------------- the toy tasks


class CharTokenizer:
    """Characters as tokens: ``PAD`` = 0, ``EOS`` = 1, one id per character of
    ``alphabet``, and ``n_sentinels`` sentinel ids at the top of the vocabulary,
    counting down as T5's ``<extra_id_0>``, ``<extra_id_1>``... do."""

    def __init__(self, alphabet: str, n_sentinels: int = 0) -> None:
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError("alphabet must be a non-empty string")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must not repeat a character")
        self.alphabet = alphabet
        self.ids = {c: i + 2 for i, c in enumerate(alphabet)}
        self.n_sentinels = n_sentinels
        self.vocab_size = 2 + len(alphabet) + n_sentinels

    def sentinel(self, i: int) -> int:
        """The id of ``<extra_id_i>``."""
        if not 0 <= i < self.n_sentinels:
            raise ValueError(f"i must lie in [0, {self.n_sentinels}), got {i}")
        return self.vocab_size - 1 - i

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, then ``EOS``."""
        missing = sorted(set(text) - set(self.ids))
        if missing:
            raise ValueError(f"text has characters outside the alphabet: {missing}")
        return [self.ids[c] for c in text] + [EOS]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` up to the first ``EOS``; sentinels as ``<i>``."""
        chars = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= self.vocab_size - self.n_sentinels:
                chars.append(f"<{self.vocab_size - 1 - i}>")
            elif i >= 2:
                chars.append(self.alphabet[i - 2])
        return "".join(chars)


NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen"
).split()
LETTERS = "abcdefghij"
TASKS = ("reverse", "sort", "copy", "add")


def make_task_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One example of a toy task, as text in, text out, with the task's prefix:
    ``reverse: cab`` -> ``bac``, ``sort: cab`` -> ``abc``, ``copy: cab`` -> ``cab``,
    ``add: two plus five`` -> ``seven``. Strings of 3 to 8 letters from
    ``LETTERS``; numbers 0 to 9."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return f"add: {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}", NUMBER_WORDS[a + b]
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    out = {"reverse": s[::-1], "sort": "".join(sorted(s)), "copy": s}[task]
    return f"{task}: {s}", out


def make_batch(
    pairs: Sequence[tuple[str, str]], tokenizer: CharTokenizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(B, S)`` and targets ``(B, T)``, each ending with ``EOS`` and padded
    with ``PAD``."""
    sources = [torch.tensor(tokenizer.encode(x)) for x, _ in pairs]
    targets = [torch.tensor(tokenizer.encode(y)) for _, y in pairs]
    pad = nn.utils.rnn.pad_sequence
    return (
        pad(sources, batch_first=True, padding_value=PAD),
        pad(targets, batch_first=True, padding_value=PAD),
    )


def seq2seq_loss(
    model: T5, input_ids: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    r"""Teacher forcing: the decoder reads the targets shifted right (starting with
    ``PAD``), and the loss is the mean cross-entropy over the real target tokens,
    $-\frac1N \sum_t \log p(y_t \mid y_{<t}, x)$ (``PAD`` positions ignored)."""
    shifted = F.pad(targets[:, :-1], (1, 0), value=PAD)  # (B, T): PAD, y_1 ..
    logits = model(input_ids, shifted)  # (B, T, V)
    labels = targets.masked_fill(targets == PAD, -100)  # ignore the padding
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
