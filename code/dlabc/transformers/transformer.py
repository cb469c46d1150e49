"""The full Transformer: decoder, encoder-decoder, warm-up schedule, cached decoding.

Chapter: ``book/transformers/transformer.md``.

References:
- Vaswani et al. (2017), *Attention Is All You Need*: section 3.1 (the decoder's
  masked self-attention and encoder-decoder attention), 3.4 (scaled and shared
  embeddings), 5.3 (eq. 3, the warm-up learning rate), 5.4 (label smoothing), 6.1
  (checkpoint averaging) and table 3 (the base model).
- Williams & Zipser (1989), *A Learning Algorithm for Continually Running Fully
  Recurrent Neural Networks* (teacher forcing).
- Szegedy et al. (2016), *Rethinking the Inception Architecture for Computer Vision*
  (label smoothing).
- Pope et al. (2023), *Efficiently Scaling Transformer Inference* (the key-value cache
  of incremental decoding and its memory).

The pieces come from the chapters before: ``MultiHeadAttention`` (attention with
PyTorch), ``split_heads``/``merge_heads`` and ``scaled_dot_product_attention``
(attention from scratch), ``ScaledEmbedding`` and ``SinusoidalPositionalEncoding``
(positional encoding), ``FeedForward`` and ``TransformerEncoder`` (the encoder), and
``Vocab``'s ids ``PAD``, ``BOS``, ``EOS`` and ``sequence_loss`` (sequence to sequence).
Masks are boolean, ``True`` = may attend; ``nn.Transformer`` uses the opposite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_ids, check_number, check_positive_int, check_tensor
from dlabc.foundations.normalization import LayerNorm
from dlabc.rnn.seq2seq import BOS, EOS, PAD, sequence_loss, source_mask
from dlabc.transformers.attention_from_scratch import (
    causal_mask,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
)
from dlabc.transformers.attention_with_pytorch import (
    MultiHeadAttention,
    mha_parameter_count,
)
from dlabc.transformers.attention_with_pytorch import to_torch as mha_to_torch
from dlabc.transformers.encoder import (
    FeedForward,
    TransformerEncoder,
    encoder_parameter_count,
)
from dlabc.transformers.encoder import to_torch as encoder_to_torch
from dlabc.transformers.positional_encoding import (
    ScaledEmbedding,
    SinusoidalPositionalEncoding,
)

__all__ = [
    "DecoderLayer",
    "TransformerDecoder",
    "Transformer",
    "AttentionMaps",
    "KVCache",
    "LayerCache",
    "target_mask",
    "shift_right",
    "teacher_forcing_loss",
    "noam_lr",
    "average_weights",
    "greedy_decode",
    "to_torch",
    "transformer_parameter_count",
]

# what a sub-layer returns: its output (B, T, d_model) and attention weights (or None)
Sublayer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_features(x: object, name: str, d_model: int) -> torch.Tensor:
    check_tensor(x, name, ndim=3, floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(
            f"{name} must be (B, T, d_model={d_model}), got shape {tuple(x.shape)}"
        )
    return x


def _check_layer_args(
    d_model: object, d_ff: object, dropout: object, norm_first: object
) -> bool:
    check_positive_int(d_model, "d_model")
    check_positive_int(d_ff, "d_ff")
    check_number(dropout, "dropout", low=0, high=1, high_open=True)
    return _check_flag(norm_first, "norm_first")


def _check_layer_input(x: object, memory: object, d_model: int) -> None:
    _check_features(x, "x", d_model)
    _check_features(memory, "memory", d_model)
    if memory.shape[0] != x.shape[0]:
        raise ValueError(
            f"x {tuple(x.shape)} and memory {tuple(memory.shape)} must have the "
            "same batch size"
        )


class DecoderLayer(nn.Module):
    r"""One decoder layer (Vaswani et al., section 3.1): three sub-layers,

    $\begin{aligned}
    h &= \mathrm{LN}\big(y + \mathrm{MultiHead}(y, y, y;\ M^{causal})\big), \\
    h' &= \mathrm{LN}\big(h + \mathrm{MultiHead}(h, m, m;\ M^{src})\big), \\
    y' &= \mathrm{LN}\big(h' + \mathrm{FFN}(h')\big)
    \end{aligned}$

    in the paper's arrangement (post-LN); pre-LN (``norm_first``) computes each as
    $x + \mathrm{Sublayer}(\mathrm{LN}(x))$ instead. The cross-attention's queries
    come from the decoder, its keys and values from the encoder's output $m$ (the
    memory). Dropout acts on each sub-layer's output before the sum.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.norm_first = _check_layer_args(d_model, d_ff, dropout, norm_first)
        self.d_model = d_model
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.cross_attn = MultiHeadAttention(d_model, n_heads)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1 = LayerNorm(d_model, eps=1e-5)  # around the self-attention
        self.norm2 = LayerNorm(d_model, eps=1e-5)  # around the cross-attention
        self.norm3 = LayerNorm(d_model, eps=1e-5)  # around the feed-forward network
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``(B, T, d_model)``, ``memory`` ``(B, S, d_model)``; ``tgt_mask``
        broadcasts to ``(B, T, T)``, ``memory_mask`` to ``(B, T, S)``. Returns ``x``
        ``(B, T, d_model)`` and the self- and cross-attention weights ``(B, h, T, T)``
        and ``(B, h, T, S)``."""
        _check_layer_input(x, memory, self.d_model)
        return self.sublayers(
            x,
            lambda h: self.self_attn(h, mask=tgt_mask),  # queries, keys, values: h
            lambda h: self.cross_attn(h, memory, memory, mask=memory_mask),
        )

    def sublayers(
        self, x: torch.Tensor, self_attend: Sublayer, cross_attend: Sublayer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual connections and norms around the three sub-layers.

        The attentions are passed in, so that :class:`KVCache` can run the same layer
        with attention over cached keys and values.
        """
        x, self_weights = self._residual(x, self_attend, self.norm1, self.dropout1)
        x, cross_weights = self._residual(x, cross_attend, self.norm2, self.dropout2)
        x, _ = self._residual(
            x, lambda h: (self.ff(h), None), self.norm3, self.dropout3
        )
        return x, self_weights, cross_weights

    def _residual(
        self, x: torch.Tensor, sublayer: Sublayer, norm: nn.Module, dropout: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.norm_first:  # x + Sublayer(LayerNorm(x))
            out, weights = sublayer(norm(x))
            return x + dropout(out), weights
        out, weights = sublayer(x)  # LayerNorm(x + Sublayer(x))
        return norm(x + dropout(out)), weights


class TransformerDecoder(nn.Module):
    """A stack of ``n_layers`` :class:`DecoderLayer`, and a final LayerNorm.

    ``final_norm=None`` puts the final norm iff ``norm_first``: a pre-LN stack ends
    with an un-normalized residual stream, a post-LN one with a norm already.
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = False,
        final_norm: bool | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(n_layers, "n_layers")
        if final_norm is None:
            final_norm = _check_flag(norm_first, "norm_first")
        _check_flag(final_norm, "final_norm")
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, d_ff, dropout, norm_first)
            for _ in range(n_layers)
        )
        self.norm = LayerNorm(d_model, eps=1e-5) if final_norm else None

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``x`` ``(B, T, d_model)`` -> ``(B, T, d_model)``, and the self- and
        cross-attention weights of every layer."""
        self_weights, cross_weights = [], []
        for layer in self.layers:
            x, w_self, w_cross = layer(x, memory, tgt_mask, memory_mask)
            self_weights.append(w_self)  # (B, h, T, T)
            cross_weights.append(w_cross)  # (B, h, T, S)
        if self.norm is not None:
            x = self.norm(x)
        return x, self_weights, cross_weights


def target_mask(tgt_in: torch.Tensor) -> torch.Tensor:
    """The decoder's self-attention mask ``(B, T, T)``: causal, and no padded key.

    Position ``t`` may read positions ``0..t`` that are not ``<pad>``.
    """
    check_tensor(tgt_in, "tgt_in", ndim=2, dtype=torch.long)
    if tgt_in.shape[0] == 0 or tgt_in.shape[1] == 0:
        raise ValueError(f"tgt_in must hold tokens, got shape {tuple(tgt_in.shape)}")
    if (tgt_in[:, 0] == PAD).any():
        raise ValueError("tgt_in must start with a token (<bos>), not <pad>")
    causal = causal_mask(tgt_in.shape[1], device=tgt_in.device)  # (T, T)
    return causal & (tgt_in != PAD)[:, None, :]  # (B, T, T)


@dataclass
class AttentionMaps:
    """The attention weights of every layer, for one batch."""

    encoder: list[torch.Tensor]  # per encoder layer: (B, h, S, S)
    decoder_self: list[torch.Tensor]  # per decoder layer: (B, h, T, T)
    decoder_cross: list[torch.Tensor]  # per decoder layer: (B, h, T, S)


class Transformer(nn.Module):
    r"""The encoder-decoder Transformer (Vaswani et al., figure 1).

    $p(y_t \mid y_{<t}, x) = \mathrm{softmax}\big(W_g\,
    \mathrm{Decoder}(E_y y_{<t} \sqrt{d} + P,\ \mathrm{Encoder}(E_x x \sqrt{d} + P))
    + b_g\big)$

    with scaled embeddings $E \sqrt{d}$, sinusoidal positions $P$ and a linear
    ``generator`` $W_g$. The defaults are the paper's base model. With
    ``share_embeddings`` (one vocabulary for both sides) the source and target
    embeddings and the generator's weight are one matrix, as in the paper.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_layers: int = 6,
        d_ff: int = 2048,
        max_len: int = 512,
        dropout: float = 0.1,
        norm_first: bool = False,
        n_dec_layers: int | None = None,
        share_embeddings: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int(src_vocab_size, "src_vocab_size")
        check_positive_int(tgt_vocab_size, "tgt_vocab_size")
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        check_positive_int(max_len, "max_len")
        n_dec_layers = n_layers if n_dec_layers is None else n_dec_layers
        check_positive_int(n_dec_layers, "n_dec_layers")
        _check_flag(share_embeddings, "share_embeddings")
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                "share_embeddings needs one vocabulary, got src_vocab_size="
                f"{src_vocab_size} and tgt_vocab_size={tgt_vocab_size}"
            )
        self.d_model, self.max_len = d_model, max_len
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.tgt_embed = ScaledEmbedding(tgt_vocab_size, d_model)
        self.src_embed = (
            self.tgt_embed
            if share_embeddings
            else ScaledEmbedding(src_vocab_size, d_model)
        )
        self.positions = SinusoidalPositionalEncoding(d_model, max_len, dropout)
        self.encoder = TransformerEncoder(
            n_layers, d_model, n_heads, d_ff, dropout, norm_first
        )
        self.decoder = TransformerDecoder(
            n_dec_layers, d_model, n_heads, d_ff, dropout, norm_first
        )
        self.generator = nn.Linear(d_model, tgt_vocab_size)
        self._reset_parameters()
        if share_embeddings:  # after the initialisation: one matrix, three uses
            self.generator.weight = self.tgt_embed.embedding.weight

    def _reset_parameters(self) -> None:
        """Xavier-uniform matrices in the stacks and the generator, as
        ``nn.Transformer`` does; the embeddings keep ``ScaledEmbedding``'s
        N(0, 1/d_model), so that the scaled vectors have unit variance."""
        for stack in (self.encoder, self.decoder, self.generator):
            for p in stack.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def _check_tokens(self, tokens: object, name: str, vocab_size: int) -> None:
        check_tensor(tokens, name, ndim=2, dtype=torch.long)
        check_ids(tokens, f"{name} ids", vocab_size)

    def _check_length(self, length: int, name: str) -> None:
        if length > self.max_len:
            raise ValueError(
                f"{name} has {length} positions, more than the position table's "
                f"max_len={self.max_len}"
            )

    def embed_source(self, src: torch.Tensor) -> torch.Tensor:
        """``src`` ``(B, S)`` ids -> ``(B, S, d_model)``: scaled embedding +
        positions."""
        self._check_tokens(src, "src", self.src_vocab_size)
        self._check_length(src.shape[1], "src")
        return self.positions(self.src_embed(src))

    def embed_target(self, tgt_in: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``tgt_in`` ``(B, T)`` ids at positions ``offset..offset+T-1`` ->
        ``(B, T, d_model)``."""
        self._check_tokens(tgt_in, "tgt_in", self.tgt_vocab_size)
        self._check_length(offset + tgt_in.shape[1], "tgt_in")
        return self.positions(self.tgt_embed(tgt_in), offset=offset)

    def _check_pair(
        self, tgt_in: torch.Tensor, memory: torch.Tensor, src: torch.Tensor
    ) -> None:
        _check_features(memory, "memory", self.d_model)
        check_tensor(src, "src", ndim=2, dtype=torch.long)
        check_tensor(tgt_in, "tgt_in", ndim=2, dtype=torch.long)
        same_batch = len(tgt_in) == len(memory) == len(src)
        if not same_batch or memory.shape[1] != src.shape[1]:
            raise ValueError(
                f"tgt_in {tuple(tgt_in.shape)}, memory {tuple(memory.shape)} and src "
                f"{tuple(src.shape)} must share the batch size, memory and src the "
                "length"
            )

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """``src`` ``(B, S)`` (padded at the end) -> the memory ``(B, S, d_model)``."""
        x = self.embed_source(src)  # (B, S, d_model)
        src_mask = source_mask(src)[:, None, :]  # (B, 1, S): no query reads padding
        memory, _ = self.encoder(x, src_mask)
        return memory

    def decode(
        self, tgt_in: torch.Tensor, memory: torch.Tensor, src: torch.Tensor
    ) -> torch.Tensor:
        """The logits ``(B, T, V)`` of the next token after each prefix of ``tgt_in``
        ``(B, T)``, given the memory ``(B, S, d_model)`` of ``src`` ``(B, S)``, whose
        padding the cross-attention hides."""
        self._check_pair(tgt_in, memory, src)
        y = self.embed_target(tgt_in)  # (B, T, d_model)
        tgt_mask = target_mask(tgt_in)  # (B, T, T): causal, no padded key
        memory_mask = source_mask(src)[:, None, :]  # (B, 1, S)
        y, _, _ = self.decoder(y, memory, tgt_mask, memory_mask)
        return self.generator(y)  # (B, T, V)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``src`` ``(B, S)``, ``tgt_in`` ``(B, T)`` (``<bos>`` and
        the target shifted right) -> the logits ``(B, T, V)`` of every position at
        once."""
        return self.decode(tgt_in, self.encode(src), src)

    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> AttentionMaps:
        """Every layer's attention weights for ``src`` ``(B, S)`` and ``tgt_in``
        ``(B, T)``: encoder ``(B, h, S, S)``, decoder self ``(B, h, T, T)`` and
        cross ``(B, h, T, S)``, one tensor per layer."""
        src_mask = source_mask(src)[:, None, :]  # (B, 1, S)
        memory, encoder_weights = self.encoder(self.embed_source(src), src_mask)
        self._check_pair(tgt_in, memory, src)
        y = self.embed_target(tgt_in)
        _, self_w, cross_w = self.decoder(y, memory, target_mask(tgt_in), src_mask)
        return AttentionMaps(encoder_weights, self_w, cross_w)

    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One step of incremental decoding: the newest token ``(B,)`` -> the logits
        ``(B, V)`` of the next, with the earlier positions' keys and values read from
        ``cache`` (which grows by one position)."""
        _check_step_input(token, cache)
        y = self.embed_target(token[:, None], offset=cache.length)  # (B, 1, d_model)
        for layer, layer_cache in zip(self.decoder.layers, cache.layers, strict=True):
            # the layer's own norms and residuals, attention from the cache
            y, _, _ = layer.sublayers(
                y,
                partial(layer_cache.attend_self, layer.self_attn),
                partial(
                    layer_cache.attend_memory,
                    layer.cross_attn,
                    memory_mask=cache.memory_mask,
                ),
            )
        if self.decoder.norm is not None:
            y = self.decoder.norm(y)
        cache.length += 1
        return self.generator(y[:, 0])  # (B, V)


@dataclass
class LayerCache:
    """One decoder layer's keys and values, already split into heads."""

    self_k: torch.Tensor  # (B, h, t, d_head): one row per token decoded so far
    self_v: torch.Tensor  # (B, h, t, d_head)
    cross_k: torch.Tensor  # (B, h, S, d_head): the memory's, computed once
    cross_v: torch.Tensor  # (B, h, S, d_head)

    def attend_self(
        self, mha: MultiHeadAttention, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new position's key and value, then attend over all of them."""
        self._check(mha, h)
        k = split_heads(mha.W_k(h), mha.n_heads)  # (B, h, 1, d_head)
        v = split_heads(mha.W_v(h), mha.n_heads)  # (B, h, 1, d_head)
        k, v = self.update(k, v)  # (B, h, t + 1, d_head) each
        # no mask: the newest position may read every position before it
        return self.attend(mha, h, k, v)

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' self-attention keys and values
        ``(B, h, T, d_head)``; return all of them. The method set of every cache in
        the book (:class:`dlabc.decoder.Cache`): ``update``, ``len``, ``seen``,
        ``start``, ``nbytes``."""
        self.self_k = torch.cat([self.self_k, k], dim=2)  # (B, h, t + T, d_head)
        self.self_v = torch.cat([self.self_v, v], dim=2)
        return self.self_k, self.self_v

    def __len__(self) -> int:
        return self.self_k.shape[2]  # positions stored

    @property
    def seen(self) -> int:
        """Positions ever appended (all are kept)."""
        return len(self)

    @property
    def start(self) -> int:
        """The index of the oldest stored position: 0, nothing is dropped."""
        return 0

    def nbytes(self) -> int:
        """The bytes of the self- and cross-attention keys and values."""
        tensors = (self.self_k, self.self_v, self.cross_k, self.cross_v)
        return sum(t.numel() * t.element_size() for t in tensors)

    def attend_memory(
        self, mha: MultiHeadAttention, h: torch.Tensor, memory_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention over the memory's cached keys and values."""
        self._check(mha, h)
        # (B, 1, S) -> (B, 1, 1, S): the same mask for every head
        return self.attend(mha, h, self.cross_k, self.cross_v, memory_mask[:, None])

    @staticmethod
    def attend(
        mha: MultiHeadAttention,
        h: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mha``'s attention for the new position ``h`` ``(B, 1, d_model)`` over keys
        and values already projected and split into heads, ``(B, h, T_k, d_head)``."""
        q = split_heads(mha.W_q(h), mha.n_heads)  # (B, h, 1, d_head)
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # (B, h, 1, d_head)
        return mha.W_o(merge_heads(out)), weights  # (B, 1, d_model), (B, h, 1, T_k)

    def _check(self, mha: MultiHeadAttention, h: torch.Tensor) -> None:
        if not isinstance(mha, MultiHeadAttention):
            raise TypeError(
                f"mha must be a MultiHeadAttention, got {type(mha).__name__}"
            )
        check_tensor(h, "h", ndim=3, floating=True)
        expected = (len(self.self_k), 1, mha.d_model)
        if tuple(h.shape) != expected:
            raise ValueError(
                f"h must be one new position (B, 1, d_model) = {expected}, "
                f"got {tuple(h.shape)}"
            )


class KVCache:
    r"""The keys and values a decoder has computed so far, for incremental decoding.

    At step $t$ the new token's query needs the keys and values of positions
    $0..t$; those of $0..t-1$ do not change (the mask keeps every position from
    reading later ones), so each layer keeps them and computes only the new row:

    $K_{\le t} = [K_{<t};\ x_t W^K], \qquad V_{\le t} = [V_{<t};\ x_t W^V]$

    The cross-attention's keys and values, $m W^K$ and $m W^V$ of the memory $m$,
    are computed once, when the cache is made.
    """

    def __init__(
        self, model: Transformer, memory: torch.Tensor, src: torch.Tensor
    ) -> None:
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a Transformer, got {type(model).__name__}")
        _check_features(memory, "memory", model.d_model)
        check_tensor(src, "src", ndim=2, dtype=torch.long)
        if memory.shape[:2] != src.shape:
            raise ValueError(
                f"memory {tuple(memory.shape)} must be (B, S, d_model) for src "
                f"{tuple(src.shape)}"
            )
        self.memory_mask = source_mask(src)[:, None, :]  # (B, 1, S)
        self.batch_size, self.length = len(src), 0
        self.layers = []
        for layer in model.decoder.layers:
            n_heads, d_head = layer.self_attn.n_heads, layer.self_attn.d_head
            empty = memory.new_zeros(len(src), n_heads, 0, d_head)  # (B, h, 0, d_head)
            self.layers.append(
                LayerCache(
                    self_k=empty,
                    self_v=empty,
                    cross_k=split_heads(layer.cross_attn.W_k(memory), n_heads),
                    cross_v=split_heads(layer.cross_attn.W_v(memory), n_heads),
                )
            )

    def __len__(self) -> int:
        return self.length  # positions decoded so far

    @property
    def seen(self) -> int:
        """Positions ever decoded (all are kept)."""
        return self.length

    def nbytes(self) -> int:
        """The bytes every layer's cache holds."""
        return sum(c.nbytes() for c in self.layers)

    def numel(self) -> int:
        """How many numbers the cache holds now."""
        return sum(
            t.numel()
            for c in self.layers
            for t in (c.self_k, c.self_v, c.cross_k, c.cross_v)
        )


def shift_right(tgt: torch.Tensor) -> torch.Tensor:
    """``<bos>, y_1, ..., y_{T-1}``: the decoder's input for the target ``(B, T)``."""
    check_tensor(tgt, "tgt", ndim=2, dtype=torch.long)
    bos = torch.full_like(tgt[:, :1], BOS)  # (B, 1)
    return torch.cat([bos, tgt[:, :-1]], dim=1)  # (B, T)


def _check_loss_args(model: object, tgt: object, label_smoothing: object) -> None:
    _check_model(model)
    check_number(label_smoothing, "label_smoothing", low=0, high=1, high_open=True)
    check_tensor(tgt, "tgt", ndim=2, dtype=torch.long)


def _check_model(model: object) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a Transformer, got {type(model).__name__}")


def teacher_forcing_loss(
    model: Transformer,
    src: torch.Tensor,
    tgt: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""The mean cross-entropy of ``tgt`` ``(B, T)`` (ending in ``<eos>``, then
    ``<pad>``) when the model reads the true previous tokens, ``shift_right(tgt)``.

    With ``label_smoothing`` $\varepsilon$ the target distribution puts
    $1 - \varepsilon + \varepsilon / V$ on the true token and $\varepsilon / V$ on
    every other (Szegedy et al., 2016); padding never counts.
    """
    _check_loss_args(model, tgt, label_smoothing)
    logits = model(src, shift_right(tgt))  # (B, T, V): every position at once
    if label_smoothing == 0:
        return sequence_loss(logits, tgt)
    return F.cross_entropy(
        logits.flatten(0, 1),
        tgt.flatten(),
        ignore_index=PAD,
        label_smoothing=label_smoothing,
    )


def _check_noam_args(step: object, d_model: object, warmup: object, factor: object):
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the paper counts from 1), got {step}")
    check_positive_int(d_model, "d_model")
    check_positive_int(warmup, "warmup")
    check_number(factor, "factor", low=0, low_open=True)


def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    r"""The paper's learning rate (Vaswani et al., eq. 3):

    $\mathrm{lr} = \mathrm{factor} \cdot d_{\text{model}}^{-0.5} \cdot
    \min(\mathrm{step}^{-0.5},\ \mathrm{step} \cdot \mathrm{warmup}^{-1.5})$

    A linear rise for ``warmup`` steps, then a decay as $1/\sqrt{\mathrm{step}}$; the
    peak, $\mathrm{factor} / \sqrt{d_{\text{model}} \cdot \mathrm{warmup}}$, is at
    ``step = warmup``. Steps count from 1.
    """
    _check_noam_args(step, d_model, warmup, factor)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def average_weights(
    states: Sequence[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    r"""The mean of several state dicts of one model: checkpoint averaging.

    $\bar\theta = \frac{1}{K} \sum_{k=1}^{K} \theta_k$ for every floating-point
    tensor; the paper's base model averages the last 5 checkpoints of its training
    (Vaswani et al., section 6.1). Other tensors (counters) must be equal and are kept.
    """
    if isinstance(states, dict) or not isinstance(states, Sequence) or not states:
        raise ValueError("states must be a non-empty list of state_dicts")
    for k, state in enumerate(states):
        if not isinstance(state, dict):
            raise TypeError(f"states[{k}] must be a dict, got {type(state).__name__}")
        if state.keys() != states[0].keys():
            raise ValueError(f"states[{k}] has other keys than states[0]")
    average = {}
    for name, first in states[0].items():
        tensors = [state[name] for state in states]
        if any(t.shape != first.shape for t in tensors):
            raise ValueError(f"{name!r} has different shapes in the states")
        if first.is_floating_point():
            average[name] = torch.stack(tensors).mean(0)  # (K, ...) -> (...)
        elif all(torch.equal(t, first) for t in tensors):
            average[name] = first.clone()
        else:
            raise ValueError(
                f"{name!r} is not floating-point and differs between states"
            )
    return average


def _check_step_input(token: object, cache: object) -> None:
    check_tensor(token, "token", ndim=1, dtype=torch.long)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if len(token) != cache.batch_size:
        raise ValueError(
            f"token has batch size {len(token)}, the cache {cache.batch_size}"
        )


def _check_decode_args(model: object, max_len: object, use_cache: object) -> None:
    _check_model(model)
    check_positive_int(max_len, "max_len")
    _check_flag(use_cache, "use_cache")
    if max_len > model.max_len:
        raise ValueError(
            f"max_len={max_len} is more than the model's position table, "
            f"max_len={model.max_len}"
        )


def greedy_decode(
    model: Transformer, src: torch.Tensor, max_len: int, use_cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the most probable token at each step and feed it back, up to ``<eos>``.

    With ``use_cache`` each step runs the decoder on the newest token only
    (:meth:`Transformer.decode_step`); without it, each step recomputes the whole
    prefix and keeps the last position's logits. ``<pad>`` and ``<bos>`` are never
    chosen. Returns the tokens ``(B, L)`` (``<eos>`` included, ``<pad>`` after it;
    decoding stops once every sentence has ended, so ``L <= max_len``) and the logits
    of every step ``(B, L, V)``.
    """
    _check_decode_args(model, max_len, use_cache)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            memory = model.encode(src)  # (B, S, d_model)
            cache = KVCache(model, memory, src) if use_cache else None
            prefix = torch.full((len(src), 1), BOS, device=src.device)  # (B, 1)
            done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
            tokens, step_logits = [], []
            for _ in range(max_len):
                if cache is not None:  # the newest token only
                    logits = model.decode_step(prefix[:, -1], cache)  # (B, V)
                else:  # the whole prefix again, keep the last position
                    logits = model.decode(prefix, memory, src)[:, -1]  # (B, V)
                allowed = logits.clone()
                allowed[:, [PAD, BOS]] = -math.inf
                token = allowed.argmax(-1)  # (B,)
                prefix = torch.cat([prefix, token[:, None]], dim=1)  # (B, t + 2)
                tokens.append(token.masked_fill(done, PAD))
                step_logits.append(logits)
                done = done | (token == EOS)
                if done.all():
                    break
    finally:
        model.train(was_training)
    return torch.stack(tokens, 1), torch.stack(step_logits, 1)  # (B, L), (B, L, V)


def _decoder_layer_to_torch(layer: DecoderLayer) -> nn.TransformerDecoderLayer:
    p = layer.ff.linear1.weight
    ref = nn.TransformerDecoderLayer(
        layer.d_model,
        layer.self_attn.n_heads,
        dim_feedforward=layer.ff.linear1.out_features,
        dropout=layer.dropout1.p,
        activation="relu",
        layer_norm_eps=layer.norm1.eps,
        batch_first=True,
        norm_first=layer.norm_first,
        device=p.device,
        dtype=p.dtype,
    )
    ref.self_attn = mha_to_torch(layer.self_attn)
    ref.multihead_attn = mha_to_torch(layer.cross_attn)  # PyTorch's cross-attention
    with torch.no_grad():
        for mine, theirs in (
            (layer.ff.linear1, ref.linear1),
            (layer.ff.linear2, ref.linear2),
            (layer.norm1, ref.norm1),
            (layer.norm2, ref.norm2),
            (layer.norm3, ref.norm3),
        ):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    return ref


def to_torch(model: Transformer) -> nn.Transformer:
    """A ``batch_first`` ``nn.Transformer`` holding the weights of ``model``'s encoder
    and decoder (``nn.Transformer`` has no embeddings and no generator).

    The encoder comes from the encoder chapter's ``to_torch``; each decoder layer is
    copied the same way, its two attentions through ``MultiHeadAttention``'s
    ``to_torch``. The final norms are ``None`` where ``model`` has none
    (``nn.Transformer`` makes both unless it is given its encoder and decoder).
    PyTorch's masks say ``True`` = hidden.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"to_torch expects a Transformer, got {type(model).__name__}")
    layers = [_decoder_layer_to_torch(layer) for layer in model.decoder.layers]
    norm = None
    if model.decoder.norm is not None:
        ours = model.decoder.norm
        norm = nn.LayerNorm(
            model.d_model,
            eps=ours.eps,
            device=ours.weight.device,
            dtype=ours.weight.dtype,
        )
        with torch.no_grad():
            norm.weight.copy_(ours.weight)
            norm.bias.copy_(ours.bias)
    decoder = nn.TransformerDecoder(layers[0], len(layers), norm=norm)
    decoder.layers = nn.ModuleList(layers)  # our weights, layer by layer
    first = model.decoder.layers[0]
    # nn.Transformer re-initialises every parameter it holds when it is built, so it
    # is built empty and given the copies afterwards
    ref = nn.Transformer(
        model.d_model,
        first.self_attn.n_heads,
        custom_encoder=nn.Identity(),
        custom_decoder=nn.Identity(),
        batch_first=True,
        norm_first=first.norm_first,
    )
    ref.encoder = encoder_to_torch(model.encoder)
    ref.decoder = decoder
    return ref


def transformer_parameter_count(
    src_vocab_size: int,
    tgt_vocab_size: int,
    d_model: int = 512,
    n_layers: int = 6,
    d_ff: int = 2048,
    norm_first: bool = False,
    n_dec_layers: int | None = None,
    share_embeddings: bool = False,
) -> int:
    r"""The parameters of :class:`Transformer`, in closed form.

    The encoder is the encoder chapter's count. Per decoder layer: two attentions
    ($2(4d^2 + 4d)$), the feed-forward network ($2 d\, d_{ff} + d_{ff} + d$) and three
    norms ($6d$), plus a final norm ($2d$) for pre-LN. Add the embeddings
    ($V_x d + V_y d$) and the generator ($d V_y + V_y$); with ``share_embeddings``
    one $V d$ matrix serves all three, and only the generator's bias $V_y$ is extra.
    The heads do not count.
    """
    for name, value in (
        ("src_vocab_size", src_vocab_size),
        ("tgt_vocab_size", tgt_vocab_size),
        ("d_model", d_model),
        ("n_layers", n_layers),
        ("d_ff", d_ff),
    ):
        check_positive_int(value, name)
    n_dec_layers = n_layers if n_dec_layers is None else n_dec_layers
    check_positive_int(n_dec_layers, "n_dec_layers")
    _check_flag(norm_first, "norm_first")
    _check_flag(share_embeddings, "share_embeddings")
    if share_embeddings and src_vocab_size != tgt_vocab_size:
        raise ValueError("share_embeddings needs src_vocab_size == tgt_vocab_size")
    d = d_model
    encoder = encoder_parameter_count(n_layers, d, d_ff, final_norm=norm_first)
    feed_forward = 2 * d * d_ff + d_ff + d
    decoder_layer = 2 * mha_parameter_count(d) + feed_forward + 3 * (2 * d)
    decoder = n_dec_layers * decoder_layer + (2 * d if norm_first else 0)
    if share_embeddings:  # one V x d matrix: both embeddings and the generator
        embeddings = tgt_vocab_size * d
    else:  # source and target embeddings, generator weight
        embeddings = src_vocab_size * d + 2 * tgt_vocab_size * d
    return encoder + decoder + embeddings + tgt_vocab_size  # + the generator's bias
