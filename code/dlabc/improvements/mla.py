r"""Multi-head latent attention (MLA): DeepSeek's compressed key-value cache.

Chapter: ``book/improvements/mla.md``.

References:
- DeepSeek-AI (2024), *DeepSeek-V2: A Strong, Economical, and Efficient
  Mixture-of-Experts Language Model* (arXiv 2405.04434), section 2.1: low-rank joint
  compression of keys and values into a latent $c^{KV}$, low-rank queries, the
  decoupled rotary query per head and rotary key shared by all heads, the
  absorption of $W^{UK}$ into the queries and of $W^{UV}$ into the output, and
  Table 1 (KV cache per token: MHA $2 n_h d_h l$, GQA $2 n_g d_h l$, MQA $2 d_h l$,
  MLA $(d_c + d_h^R)\,l$).
- DeepSeek-AI (2024), *DeepSeek-V3 Technical Report* (arXiv 2412.19437): the same
  attention at $l = 61$ layers.
- Su et al. (2024), *RoFormer*: the rotation, here :func:`apply_rope` of the RoPE
  chapter.

Parameter names follow Hugging Face's ``DeepseekV3Attention`` (``q_proj`` or
``q_a_proj``/``q_a_layernorm``/``q_b_proj``, ``kv_a_proj_with_mqa``,
``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), so copying its weights is a renaming.
The rotary features use the half layout of :func:`apply_rope`; Hugging Face's
DeepSeek-V3 (``rope_interleave=True``) and DeepSeek-V2 pair adjacent features, which is
the same model after permuting the rotary rows of ``q`` and of ``kv_a_proj_with_mqa``
by :func:`~dlabc.improvements.rope_alibi.interleaved_to_half`. Shapes: ``B`` batch,
``h`` heads, ``T`` new positions, ``S`` all positions (cached and new), ``d_c`` the
latent size ``kv_lora_rank``, ``d_nope``/``d_rope``/``d_v`` the per-head sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import Cache
from dlabc.foundations.normalization import RMSNorm
from dlabc.improvements.rope_alibi import PositionLM, _apply_rope, _rope_cos_sin
from dlabc.transformers.attention_from_scratch import merge_heads

__all__ = [
    "LatentCache",
    "MultiHeadLatentAttention",
    "mla_cache_bytes",
    "mla_lm",
]


class LatentCache(Cache):
    r"""The latent KV cache of one MLA layer: per token, $c^{KV}_t$ and $k^R_t$.

    The book's :class:`~dlabc.decoder.Cache` with two tensors on position axis 1:
    ``c_kv`` ``(B, S, d_c)`` and ``k_rope`` ``(B, S, d_rope)`` (already rotated),
    $d_c + d_h^R$ numbers per token instead of the $2 n_h d_h$ of multi-head attention.
    ``update(c_kv, k_rope)`` appends the new positions and returns everything.
    """

    dim = 1  # (B, S, d): positions on axis 1
    names, ndim = ("c_kv", "k_rope"), 3

    @property
    def c_kv(self) -> torch.Tensor | None:
        return self.tensors[0] if self.tensors else None

    @property
    def k_rope(self) -> torch.Tensor | None:
        return self.tensors[1] if self.tensors else None


class MultiHeadLatentAttention(nn.Module):
    r"""Causal multi-head latent attention (DeepSeek-V2, section 2.1).

    Keys and values of every head are up-projected from one small latent per token,

    $c^{KV}_t = \mathrm{RMSNorm}(h_t W^{DKV}), \quad
    k^C_{t,i} = c^{KV}_t W^{UK}_i, \quad v_{t,i} = c^{KV}_t W^{UV}_i,$

    and position enters through a separate rotary part: one key $k^R_t =
    \mathrm{RoPE}(h_t W^{KR})$ shared by all heads and a rotary query per head,

    $q_{t,i} = [q^C_{t,i};\ \mathrm{RoPE}(q^R_{t,i})], \quad
    k_{t,i} = [k^C_{t,i};\ k^R_t], \quad
    o_{t,i} = \sum_{j \le t} \mathrm{softmax}_j\Big(
    \frac{q_{t,i}^\top k_{j,i}}{\sqrt{d_h + d_h^R}}\Big) v_{j,i},$

    $u_t = [o_{t,1}; \dots; o_{t,n_h}]\,W^O$. The queries come from ``q_proj``, or,
    with ``q_lora_rank`` $= d_c'$, from their own latent
    $c^Q_t = \mathrm{RMSNorm}(h_t W^{DQ})$. Only $c^{KV}_t$ and $k^R_t$ are cached.

    Hugging Face's names: ``kv_a_proj_with_mqa`` $= [W^{DKV}, W^{KR}]$ (one matrix,
    output ``d_c + d_rope``), ``kv_b_proj`` $= [W^{UK}_i, W^{UV}_i]_i$ (output
    ``h * (d_nope + d_v)``, head by head), ``q_proj`` (or ``q_a_proj``, ``q_b_proj``)
    with output ``h * (d_nope + d_rope)``, head by head, and ``o_proj`` $= W^O$.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int | None = None,
        q_lora_rank: int | None = None,
        base: float = 10000.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        self.n_heads = check_positive_int(n_heads, "n_heads")
        self.kv_lora_rank = check_positive_int(kv_lora_rank, "kv_lora_rank")
        self.qk_nope_head_dim = check_positive_int(qk_nope_head_dim, "qk_nope_head_dim")
        self.qk_rope_head_dim = check_positive_int(qk_rope_head_dim, "qk_rope_head_dim")
        if qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim must be even (RoPE turns pairs), got {qk_rope_head_dim}"
            )
        v_head_dim = qk_nope_head_dim if v_head_dim is None else v_head_dim
        self.v_head_dim = check_positive_int(v_head_dim, "v_head_dim")
        if q_lora_rank is not None:
            check_positive_int(q_lora_rank, "q_lora_rank")
        self.q_lora_rank = q_lora_rank
        self.base = check_number(base, "base", low=1, low_open=True)
        check_number(eps, "eps", low=0)
        h, d_q = n_heads, qk_nope_head_dim + qk_rope_head_dim
        self.scale = d_q**-0.5  # 1 / sqrt(d_h + d_h^R)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, h * d_q, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=False)  # W^DQ
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=eps)
            self.q_b_proj = nn.Linear(q_lora_rank, h * d_q, bias=False)  # W^UQ, W^QR
        self.kv_a_proj_with_mqa = nn.Linear(
            d_model, kv_lora_rank + qk_rope_head_dim, bias=False
        )  # [W^DKV, W^KR]
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=eps)
        self.kv_b_proj = nn.Linear(
            kv_lora_rank, h * (qk_nope_head_dim + v_head_dim), bias=False
        )  # [W^UK_i, W^UV_i] for each head i
        self.o_proj = nn.Linear(h * v_head_dim, d_model, bias=False)  # W^O

    def queries(
        self, x: torch.Tensor, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$q^C_{t,i}$ ``(B, h, T, d_nope)`` and $\mathrm{RoPE}(q^R_{t,i})$
        ``(B, h, T, d_rope)`` for ``x`` ``(B, T, d_model)`` at positions
        ``offset ...``."""
        batch, length, _ = x.shape
        # q = h W^Q, or c^Q W^UQ with c^Q = RMSNorm(h W^DQ)
        if self.q_lora_rank is None:
            q = self.q_proj(x)  # (B, T, h * d_q)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (B, T, h * d_q)
        q = q.view(batch, length, self.n_heads, -1).transpose(1, 2)  # (B, h, T, d_q)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        # the rotary part of every head's query turns with its position (eq-mla-rope)
        cos, sin = self._cos_sin(length, offset, x)  # (T, d_rope) each
        return q_nope, _apply_rope(q_rope, cos, sin)

    def latent(
        self, x: torch.Tensor, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""What the cache stores: $c^{KV}_t$ ``(B, T, d_c)`` and the rotated shared
        key $k^R_t$ ``(B, T, d_rope)``."""
        # one down-projection gives both: [c^KV, k^R] = h [W^DKV, W^KR]
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], -1
        )  # (B, T, d_c), (B, T, d_rope)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, d_c)
        # the shared key is rotated once, as a single "head" (eq-mla-rope)
        cos, sin = self._cos_sin(x.shape[1], offset, x)  # (T, d_rope) each
        k_rope = _apply_rope(k_rope[:, None], cos, sin)[:, 0]  # (B, T, d_rope)
        return c_kv, k_rope

    def attend_naive(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        c_kv: torch.Tensor,
        k_rope: torch.Tensor,
    ) -> torch.Tensor:
        r"""Expand the latents to full keys and values, then ordinary attention.

        $k_{j,i} = [c^{KV}_j W^{UK}_i;\ k^R_j]$, $v_{j,i} = c^{KV}_j W^{UV}_i$. Returns
        the heads' outputs $o_{t,i}$, ``(B, h, T, d_v)``.
        """
        batch, length = c_kv.shape[:2]
        # up-project every cached latent: k^C = c W^UK, v = c W^UV (eq-mla-compress)
        kv = self.kv_b_proj(c_kv).view(batch, length, self.n_heads, -1)  # (B,S,h,.)
        k_nope, v = kv.transpose(1, 2).split(
            [self.qk_nope_head_dim, self.v_head_dim], -1
        )  # (B, h, S, d_nope), (B, h, S, d_v)
        # k = [k^C; k^R], the rotary key repeated for every head (eq-mla-rope)
        k_rope = k_rope[:, None].expand(-1, self.n_heads, -1, -1)  # (B, h, S, d_rope)
        k = torch.cat([k_nope, k_rope], dim=-1)  # (B, h, S, d_q)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, h, T, d_q)
        mask = _causal(q.shape[2], length, q.device)  # (T, S)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale
        )  # (B, h, T, d_v)

    def attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        c_kv: torch.Tensor,
        k_rope: torch.Tensor,
    ) -> torch.Tensor:
        r"""The same heads' outputs, computed on the latents without expanding them.

        $q^{C\top}_{t,i} k^C_{j,i} = (q^C_{t,i} W^{UK\top}_i)\, c^{KV\top}_j$ and
        $\sum_j a_{t,j,i} v_{j,i} = \big(\sum_j a_{t,j,i}\, c^{KV}_j\big) W^{UV}_i$:
        $W^{UK}$ moves to the query, $W^{UV}$ after the weighted sum, and attention runs
        over the cache as stored, one latent "key" $[c^{KV}_j; k^R_j]$ and one latent
        "value" $c^{KV}_j$ shared by all heads. Returns ``(B, h, T, d_v)``.
        """
        h, d_nope, d_c = self.n_heads, self.qk_nope_head_dim, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(h, d_nope + self.v_head_dim, d_c)  # (h, ., d_c)
        w_uk, w_uv = w.split([d_nope, self.v_head_dim], dim=1)  # (h, d_nope | d_v, d_c)
        # absorb W^UK into the query: q^C_i W^UK_i^T lives in the latent space
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # (B, h, T, d_c)
        # scores: latent part plus rotary part, against the cache as it is stored
        scores = torch.einsum("bhtc,bsc->bhts", q_latent, c_kv)  # (B, h, T, S)
        scores = scores + torch.einsum("bhtr,bsr->bhts", q_rope, k_rope)
        mask = _causal(q_nope.shape[2], c_kv.shape[1], c_kv.device)  # (T, S)
        weights = torch.softmax(
            (scores * self.scale).masked_fill(~mask, float("-inf")), dim=-1
        )  # (B, h, T, S)
        # the weighted sum of latents, then W^UV (absorbed into the output)
        o_latent = torch.einsum("bhts,bsc->bhtc", weights, c_kv)  # (B, h, T, d_c)
        return torch.einsum("bhtc,hvc->bhtv", o_latent, w_uv)  # (B, h, T, d_v)

    def forward(
        self,
        x: torch.Tensor,
        cache: LatentCache | None = None,
        absorb: bool = False,
    ) -> torch.Tensor:
        """``x`` ``(B, T, d_model)`` -> ``(B, T, d_model)``, causal.

        With ``cache`` (a :class:`LatentCache`), ``x`` holds the positions after those
        cached; their latents are appended and attention reads all of them.
        ``absorb=True`` computes with :meth:`attend_absorbed` instead of
        :meth:`attend_naive` (the same numbers, up to rounding).
        """
        check_tensor(x, "x", ndim=3, floating=True)
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, T, d_model={self.d_model}), got "
                f"{tuple(x.shape)}"
            )
        if cache is not None and not isinstance(cache, LatentCache):
            raise TypeError(f"cache must be a LatentCache, got {type(cache).__name__}")
        if not isinstance(absorb, bool):
            raise TypeError(f"absorb must be a bool, got {type(absorb).__name__}")
        offset = 0 if cache is None else cache.seen
        q_nope, q_rope = self.queries(x, offset)  # (B, h, T, d_nope | d_rope)
        c_kv, k_rope = self.latent(x, offset)  # (B, T, d_c), (B, T, d_rope)
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope)  # (B, S, d_c), (B, S, d_rope)
        attend = self.attend_absorbed if absorb else self.attend_naive
        out = attend(q_nope, q_rope, c_kv, k_rope)  # (B, h, T, d_v)
        return self.o_proj(merge_heads(out))  # (B, T, d_model)

    def _cos_sin(
        self, length: int, offset: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.arange(offset, offset + length, device=x.device).double()  # (T,)
        return _rope_cos_sin(p, self.qk_rope_head_dim, self.base, x.dtype)


def _causal(length: int, total: int, device: torch.device) -> torch.Tensor:
    """``(T, S)`` boolean mask: the ``T`` new queries sit at positions
    ``S - T ... S - 1`` and may read every key up to their own position."""
    queries = torch.arange(total - length, total, device=device)  # (T,)
    return torch.arange(total, device=device) <= queries[:, None]  # (T, S)


def mla_cache_bytes(
    n_layers: int,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    seq_len: int = 1,
    batch: int = 1,
    bytes_per_value: int = 2,
) -> int:
    r"""Bytes of MLA's cache: $(d_c + d_h^R)\,l$ values per token (DeepSeek-V2,
    Table 1), times ``seq_len * batch`` tokens and ``bytes_per_value`` (2 for
    bfloat16)."""
    for value, name in (
        (n_layers, "n_layers"),
        (kv_lora_rank, "kv_lora_rank"),
        (qk_rope_head_dim, "qk_rope_head_dim"),
        (seq_len, "seq_len"),
        (batch, "batch"),
        (bytes_per_value, "bytes_per_value"),
    ):
        check_positive_int(value, name)
    return (
        (kv_lora_rank + qk_rope_head_dim) * n_layers * seq_len * batch * bytes_per_value
    )


def mla_lm(
    vocab_size: int,
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 2,
    d_ff: int = 128,
    kv_lora_rank: int = 32,
    qk_nope_head_dim: int = 16,
    qk_rope_head_dim: int = 8,
    v_head_dim: int | None = None,
) -> PositionLM:
    """The RoPE chapter's :class:`PositionLM` (``positions="rope"``) with every block's
    attention replaced by :class:`MultiHeadLatentAttention`.

    Everything else, embeddings, layer norms, feed-forward networks and read-out, is
    the same, so the model differs from ``PositionLM(..., positions="rope")`` in its
    attention only. Ids ``(B, T)`` -> logits ``(B, T, V)``.
    """
    model = PositionLM(vocab_size, d_model, n_heads, n_layers, d_ff, "rope")
    for block in model.blocks:
        block.attn = MultiHeadLatentAttention(
            d_model,
            n_heads,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
        )
    return model
