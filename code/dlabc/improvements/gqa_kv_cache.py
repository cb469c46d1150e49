r"""Fewer keys and values: multi-query and grouped-query attention, sliding windows, and
the key-value cache of a decoder-only model.

Chapter: ``book/improvements/gqa_kv_cache.md``.

References:
- Shazeer (2019), *Fast Transformer Decoding: One Write-Head is All You Need*
  (arXiv 1911.02150): multi-query attention (MQA), every query head shares one key
  head and one value head.
- Ainslie et al. (2023), *GQA: Training Generalized Multi-Query Transformer Models
  from Multi-Head Checkpoints*, EMNLP: grouped-query attention, $G$ key-value heads,
  each shared by $h / G$ query heads; $G = h$ is multi-head, $G = 1$ multi-query.
- Beltagy, Peters & Cohan (2020), *Longformer*: attention inside a sliding window.
- Jiang et al. (2023), *Mistral 7B*: causal sliding-window attention of 4096 tokens,
  GQA with 8 key-value heads, and a rolling-buffer cache of the window's size.
- Pope et al. (2023), *Efficiently Scaling Transformer Inference*, MLSys: the memory
  of the cache as the limit of decoding.
- Touvron et al. (2023), *LLaMA* and *Llama 2*: the projections ``q_proj``,
  ``k_proj``, ``v_proj``, ``o_proj`` and RoPE, named and laid out as in Hugging Face
  ``transformers`` (whose ``LlamaAttention`` the tests load our weights into).

The public API that later chapters import: :class:`GroupedQueryAttention` (causal,
RoPE, optional sliding window, optional cache), :func:`repeat_kv`,
:func:`sliding_window_mask`, :func:`kv_cache_bytes` and :class:`LayerKVCache`. The
sliding window follows Hugging Face's Mistral (the paper counts one key more): with
``window`` $= w$ a query at position $i$ sees the keys $j$ with $i - w < j \le i$,
itself and the $w - 1$ before it (``MistralConfig(sliding_window=w)``).
:class:`GQALM` (the book's :class:`~dlabc.decoder.DecoderLM` with this attention),
:func:`generate` and :func:`reachable` serve the chapter's experiments. Shapes:
``B`` batch, ``h`` query heads, ``g`` key-value heads (``n_kv_heads``), ``T`` new
positions, ``S`` cached plus new positions, ``d_head`` features per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import Cache, DecoderBlock, DecoderLM
from dlabc.improvements.rope_alibi import _apply_rope, _rope_cos_sin
from dlabc.transformers.attention_from_scratch import merge_heads, split_heads
from dlabc.transformers.encoder import FeedForward

__all__ = [
    "repeat_kv",
    "sliding_window_mask",
    "kv_cache_bytes",
    "LayerKVCache",
    "GroupedQueryAttention",
    "GQALM",
    "generate",
    "reachable",
]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    r"""Repeat each of the $g$ key (or value) heads for the $h / g$ query heads of its
    group: ``(B, g, T, d) -> (B, g * n_rep, T, d)``.

    Head $k$ of the output is head $\lfloor k / \mathrm{n\_rep} \rfloor$ of ``x``, so
    query heads $0 \dots \mathrm{n\_rep} - 1$ read key head 0, and so on: the order of
    ``torch.repeat_interleave(x, n_rep, dim=1)`` and of Hugging Face's ``repeat_kv``.
    The repetition is a view (``expand``) until the final reshape copies it.
    """
    check_tensor(x, "x", ndim=4)
    check_positive_int(n_rep, "n_rep")
    if n_rep == 1:
        return x
    batch, n_kv, length, d_head = x.shape
    x = x[:, :, None].expand(batch, n_kv, n_rep, length, d_head)  # (B, g, r, T, d)
    return x.reshape(batch, n_kv * n_rep, length, d_head)  # (B, g * r, T, d)


def _allowed(
    q_index: torch.Tensor, k_index: torch.Tensor, window: int | None, causal: bool
) -> torch.Tensor:
    """Which key indices each query index may attend to, ``(T_q, T_k)``, True = may."""
    distance = q_index[:, None] - k_index[None, :]  # (T_q, T_k): i - j
    if not causal:
        return distance.abs() < window  # (T_q, T_k)
    allowed = distance >= 0  # (T_q, T_k): no key after the query
    if window is not None:
        allowed &= distance < window  # and none w or more positions back
    return allowed


def sliding_window_mask(
    seq_len: int,
    window: int,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The sliding-window mask ``(seq_len, seq_len)``, True where query $i$ may attend
    to key $j$.

    Causal (Mistral, Hugging Face ``sliding_window``): $0 \le i - j < w$, the query
    itself and the $w - 1$ keys before it. ``causal=False``: $|i - j| < w$, a band of
    $2w - 1$ keys centred on the query, symmetric. (Longformer's ``attention_window``
    $a$ counts both sides, $a/2$ keys each, so it is ``window`` $= a/2 + 1$ here;
    Hugging Face's bidirectional ``sliding_window`` $s$ allows $|i - j| \le s$, which is
    ``window`` $= s + 1$.) ``window >= seq_len`` (causal) is the plain causal mask.
    """
    check_positive_int(seq_len, "seq_len")
    check_positive_int(window, "window")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    index = torch.arange(seq_len, device=device)  # (T,)
    return _allowed(index, index, window, causal)  # (T, T)


def kv_cache_bytes(
    n_layers: int,
    n_kv_heads: int,
    d_head: int,
    seq_len: int = 1,
    batch: int = 1,
    bytes_per_value: int = 2,
) -> int:
    r"""The bytes of a key-value cache,

    $2 \cdot L \cdot g \cdot d_{head} \cdot T \cdot B \cdot b ,$

    with $L$ = ``n_layers``, $g$ = ``n_kv_heads``, $T$ = ``seq_len``, $B$ = ``batch``
    and $b$ = ``bytes_per_value``: one key and one value (the 2) of $g\,d_{head}$
    numbers per layer, per position and per sequence, $b$ bytes each (2 for float16 or
    bfloat16, 4 for float32, 1 for 8-bit). For a sliding window, pass
    ``seq_len = min(T, window)``.
    """
    for name, value in (
        ("n_layers", n_layers),
        ("n_kv_heads", n_kv_heads),
        ("d_head", d_head),
        ("seq_len", seq_len),
        ("batch", batch),
        ("bytes_per_value", bytes_per_value),
    ):
        check_positive_int(value, name)
    return 2 * n_layers * n_kv_heads * d_head * seq_len * batch * bytes_per_value


class LayerKVCache(Cache):
    r"""One attention layer's keys (already rotated) and values, for decoding.

    The book's :class:`~dlabc.decoder.Cache` with two tensors on position axis 2:
    ``update(k, v)`` appends the new positions' keys and values,
    $K \leftarrow [K;\ K_{new}]$, $V \leftarrow [V;\ V_{new}]$, and returns all of
    them; with ``keep`` it then forgets all but the last ``keep`` positions, Mistral's
    rolling buffer (a window of $w$ needs only the last $w - 1$). ``seen`` counts every
    position ever appended, so the stored ones are positions ``start .. seen - 1`` of
    the sequence. ``k`` and ``v`` are ``(B, g, len(cache), d_head)``, ``None`` while
    empty.
    """

    dim = 2  # (B, g, S, d_head): positions on axis 2
    names, ndim = ("k", "v"), 4

    @property
    def k(self) -> torch.Tensor | None:
        return self.tensors[0] if self.tensors else None

    @property
    def v(self) -> torch.Tensor | None:
        return self.tensors[1] if self.tensors else None


class GroupedQueryAttention(nn.Module):
    r"""Causal grouped-query self-attention with RoPE, an optional sliding window and an
    optional key-value cache.

    $h$ query heads and $g$ key-value heads, $g$ dividing $h$; query head $k$ reads
    key-value head $\lfloor k\,g / h \rfloor$:

    $\mathrm{head}_k = \mathrm{softmax}\Big(\frac{\tilde Q_k \tilde K_{\lfloor kg/h
    \rfloor}^\top}{\sqrt{d_{head}}} + M\Big) V_{\lfloor kg/h \rfloor}$,
    $\mathrm{out} = [\mathrm{head}_0, \dots, \mathrm{head}_{h-1}]\,W^O$,

    with $Q = XW^Q$ (``q_proj``, $d \to h\,d_{head}$), $K = XW^K$, $V = XW^V$
    (``k_proj``, ``v_proj``, $d \to g\,d_{head}$), $\tilde Q, \tilde K$ rotated by RoPE
    at ``positions``, and $M$ the causal mask ($0$ where $j \le i$, with
    ``window`` $= w$ also $i - j < w$; $-\infty$ elsewhere). $g = h$ is multi-head
    attention, $g = 1$ multi-query attention. The names and layout are Hugging Face's
    ``LlamaAttention``'s, so its weights copy over one to one.

    ``forward(x, positions=None, cache=None)``: ``x`` is ``(B, T, d_model)``;
    ``positions`` an integer tensor ``(T,)`` or ``(B, T)`` of the positions RoPE
    rotates by (default ``cache.seen .. cache.seen + T - 1``, or ``0 .. T - 1``);
    ``cache`` a :class:`LayerKVCache` that the new keys and values are appended to
    (``LayerKVCache(keep=window - 1)`` suffices for a window). The mask is by the
    order in which positions arrive (as in Hugging Face), not by ``positions``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        base: float = 10000.0,
        window: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        check_positive_int(n_kv_heads, "n_kv_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}: "
                "every key-value head must serve the same number of query heads"
            )
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.d_head = d_model // n_heads
        if self.d_head % 2:
            raise ValueError(
                f"d_head = d_model / n_heads = {self.d_head} must be even for RoPE"
            )
        self.n_rep = n_heads // n_kv_heads  # query heads per key-value head
        self.base = check_number(base, "base", low=1, low_open=True)
        if window is not None:
            check_positive_int(window, "window")
        self.window = window
        d_kv = n_kv_heads * self.d_head
        self.q_proj = nn.Linear(d_model, n_heads * self.d_head, bias=False)  # W^Q
        self.k_proj = nn.Linear(d_model, d_kv, bias=False)  # W^K
        self.v_proj = nn.Linear(d_model, d_kv, bias=False)  # W^V
        self.o_proj = nn.Linear(n_heads * self.d_head, d_model, bias=False)  # W^O

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        check_tensor(x, "x", ndim=3, floating=True)
        batch, length, d_model = x.shape
        if d_model != self.d_model:
            raise ValueError(
                f"x must have shape (B, T, d_model={self.d_model}), got "
                f"{tuple(x.shape)}"
            )
        if cache is not None and not isinstance(cache, LayerKVCache):
            raise TypeError(f"cache must be a LayerKVCache, got {type(cache).__name__}")
        if cache is not None and len(cache) and cache.k.shape[0] != batch:
            raise ValueError(f"x has batch size {batch}, the cache {cache.k.shape[0]}")
        offset = 0 if cache is None else cache.seen  # index of the first new position
        positions = self._positions(positions, batch, length, offset, x.device)
        return self._attend(x, positions, cache)

    def _attend(
        self, x: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache | None
    ) -> torch.Tensor:
        offset = 0 if cache is None else cache.seen  # index of the first new position
        start = 0 if cache is None else cache.start  # index of the first cached key
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, h, T, d_head)
        k = split_heads(self.k_proj(x), self.n_kv_heads)  # (B, g, T, d_head)
        v = split_heads(self.v_proj(x), self.n_kv_heads)  # (B, g, T, d_head)
        # RoPE on queries and keys, at their positions
        p = positions.to(torch.float64)  # (T,) or (B, T)
        cos, sin = _rope_cos_sin(p, self.d_head, self.base, x.dtype)  # (.., T, d_head)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        # the cache: keys and values of the earlier positions, then the new ones
        if cache is not None:
            k, v = cache.update(k, v)  # (B, g, S, d_head) each
        # M: causal, and inside the window
        length = x.shape[1]
        q_index = torch.arange(offset, offset + length, device=x.device)  # (T,)
        k_index = torch.arange(start, offset + length, device=x.device)  # (S,)
        mask = _allowed(q_index, k_index, self.window, causal=True)  # (T, S)
        # each key-value head serves n_rep query heads
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # (B, h, S, d_head)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, dh)
        return self.o_proj(merge_heads(out))  # (B, T, d_model)

    @staticmethod
    def _positions(
        positions: object, batch: int, length: int, offset: int, device: torch.device
    ) -> torch.Tensor:
        if positions is None:
            return torch.arange(offset, offset + length, device=device)  # (T,)
        check_tensor(positions, "positions", ndim=(1, 2))
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise TypeError(
                f"positions must be an integer tensor, got dtype {positions.dtype}"
            )
        expected = (length,) if positions.dim() == 1 else (batch, length)
        if tuple(positions.shape) != expected:
            raise ValueError(
                f"positions must have shape (T,) = {(length,)} or (B, T) = "
                f"{(batch, length)}, got {tuple(positions.shape)}"
            )
        return positions.to(device)


class GQALM(DecoderLM):
    r"""The RoPE chapter's language model with :class:`GroupedQueryAttention`.

    The book's :class:`~dlabc.decoder.DecoderLM` of pre-LN
    :class:`~dlabc.decoder.DecoderBlock`: scaled embeddings, grouped-query attention
    (RoPE, optional ``window``), the encoder chapter's :class:`FeedForward`,
    LayerNorms and a linear read-out. :meth:`new_cache` makes one
    :class:`LayerKVCache` per layer (with a window, a rolling buffer of the last
    ``window - 1`` positions). ``forward(ids, cache=None)``: ids ``(B, T)`` -> logits
    ``(B, T, V)`` for the new positions.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        n_layers: int = 2,
        d_ff: int = 128,
        window: int | None = None,
    ) -> None:
        def make_block(i: int) -> DecoderBlock:
            attn = GroupedQueryAttention(d_model, n_heads, n_kv_heads, window=window)
            ff = FeedForward(d_model, d_ff)
            return DecoderBlock(attn, ff, lambda: nn.LayerNorm(d_model))

        keep = None if window is None else window - 1
        super().__init__(
            vocab_size,
            d_model,
            n_layers,
            make_block,
            lambda: nn.LayerNorm(d_model),
            make_cache=lambda: LayerKVCache(keep),
        )


def generate(
    model: GQALM, prompt: torch.Tensor, n_new: int, use_cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Greedy decoding of ``n_new`` tokens after ``prompt`` ``(B, T_0)``.

    With ``use_cache``, the prompt is read once (the "prefill") and every later step
    feeds only the newest token, whose keys and values are appended to the cache;
    without, every step runs the model over the whole sequence so far and keeps the
    last position. Returns the tokens ``(B, n_new)`` and the logits they were chosen
    from ``(B, n_new, V)``. Evaluation mode; the model's mode is restored.
    """
    if not isinstance(model, GQALM):
        raise TypeError(f"model must be a GQALM, got {type(model).__name__}")
    check_tensor(prompt, "prompt", ndim=2, dtype=torch.long)
    check_positive_int(n_new, "n_new")
    if prompt.shape[1] == 0:
        raise ValueError("prompt must hold at least one token")
    return _generate(model, prompt, n_new, use_cache)


def _generate(
    model: GQALM, prompt: torch.Tensor, n_new: int, use_cache: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`generate`, unchecked."""
    was_training = model.training
    model.eval()
    cache = model.new_cache() if use_cache else None
    sequence, feed, tokens, logits = prompt, prompt, [], []
    try:
        for _ in range(n_new):
            with torch.no_grad():
                last = model(feed if use_cache else sequence, cache)[:, -1]  # (B, V)
            token = last.argmax(-1, keepdim=True)  # (B, 1): greedy
            tokens.append(token)
            logits.append(last)
            sequence = torch.cat([sequence, token], dim=1)  # (B, t + 1)
            feed = token  # with the cache, only the new token goes in
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


def reachable(mask: torch.Tensor, n_layers: int) -> torch.Tensor:
    r"""Which inputs each output can depend on after $1 \dots L$ attention layers.

    ``mask`` ``(T, T)`` is one layer's (True = query $i$ reads key $j$). Through two
    layers, $i$ depends on $j$ when some $k$ has $M_{ik}$ and $M_{kj}$: the Boolean
    matrix power $R_\ell = R_{\ell - 1} M$, $R_1 = M$. Returns ``(n_layers, T, T)``.
    (The residual connections and feed-forward networks add nothing when every
    position sees itself.)
    """
    check_tensor(mask, "mask", ndim=2, dtype=torch.bool)
    if mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be square (T, T), got {tuple(mask.shape)}")
    check_positive_int(n_layers, "n_layers")
    m = mask.double()  # (T, T)
    layers, r = [], m
    for _ in range(n_layers):
        layers.append(r > 0)  # (T, T)
        r = ((r @ m) > 0).double()  # (T, T): one layer more
    return torch.stack(layers)  # (L, T, T)
