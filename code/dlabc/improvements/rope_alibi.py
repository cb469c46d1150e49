r"""Positions inside attention: rotary embeddings (RoPE) and linear biases (ALiBi).

Chapter: ``book/improvements/rope_alibi.md``.

References:
- Su et al. (2024), *RoFormer: Enhanced Transformer with Rotary Position Embedding*,
  Neurocomputing 568 (arXiv 2104.09864, 2021): the rotation of pairs of query and
  key features by an angle proportional to the position, and its efficient form
  (section 3.4).
- Press, Smith & Lewis (2022), *Train Short, Test Long: Attention with Linear Biases
  Enables Input Length Extrapolation*, ICLR: ALiBi, a bias $-m\,(i - j)$ on the
  attention scores, with per-head slopes $m$ in a geometric sequence.
- Touvron et al. (2023), *LLaMA*: RoPE in the layout of its reference code, which
  Hugging Face ``transformers`` keeps (``rotate_half``: feature $i$ is paired with
  feature $i + d/2$).
- Vaswani et al. (2017), *Attention Is All You Need*: the sinusoidal encoding that the
  experiment compares with.

The public API that later chapters import: :func:`rope_frequencies`,
:func:`rope_cos_sin`, :func:`rotate_half`, :func:`apply_rope` (the "half" layout of
LLaMA and Hugging Face), :func:`alibi_slopes` and :func:`alibi_bias`. The paper's own
layout, adjacent pairs $(2i, 2i+1)$, is :func:`apply_rope_interleaved`;
:func:`interleaved_to_half` is the permutation between the two. :class:`PositionLM`
is a small pre-LN decoder-only character model, the book's
:class:`~dlabc.decoder.DecoderLM`, whose ``positions`` switch selects "none",
"sinusoidal", "rope" or "alibi". Shapes: ``B`` batch, ``h`` heads, ``T``
positions, ``d_head`` features per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import DecoderBlock, DecoderLM
from dlabc.transformers.attention_from_scratch import (
    causal_mask,
    merge_heads,
    split_heads,
)
from dlabc.transformers.encoder import FeedForward
from dlabc.transformers.positional_encoding import (
    SinusoidalPositionalEncoding,
    angular_frequencies,
)

__all__ = [
    "rope_frequencies",
    "rope_cos_sin",
    "rotate_half",
    "apply_rope",
    "interleaved_to_half",
    "apply_rope_interleaved",
    "alibi_slopes",
    "alibi_bias",
    "POSITIONS",
    "CausalSelfAttention",
    "PositionLM",
    "lm_loss",
    "loss_by_position",
]

POSITIONS = ("none", "sinusoidal", "rope", "alibi")


def _check_d_head(d_head: object) -> int:
    check_positive_int(d_head, "d_head")
    if d_head % 2:
        raise ValueError(
            f"d_head must be even (features rotate in pairs), got {d_head}"
        )
    return d_head


def rope_frequencies(d_head: int, base: float = 10000.0) -> torch.Tensor:
    r"""The rotation frequencies $\theta_i = \mathrm{base}^{-2i/d}$, $i < d/2$.

    Returns a ``(d_head // 2,)`` float64 tensor, from $\theta_0 = 1$ radian per
    position down to nearly $1/\mathrm{base}$: the frequencies of the sinusoidal
    encoding.
    """
    _check_d_head(d_head)
    check_number(base, "base", low=1, low_open=True)
    return angular_frequencies(d_head, base)  # (d/2,), the sinusoidal encoding's


def rope_cos_sin(
    positions: int | torch.Tensor,
    d_head: int,
    base: float = 10000.0,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$\cos(p\,\theta_i)$ and $\sin(p\,\theta_i)$ for every position $p$, in the half
    layout.

    ``positions`` is a sequence length ``T`` (positions ``offset .. offset + T - 1``)
    or an integer tensor of positions of any shape ``(...)``. Returns ``cos`` and
    ``sin`` of shape ``(..., d_head)`` (``(T, d_head)`` for a length), each
    $[\,p\theta_0, \dots, p\theta_{d/2-1},\ p\theta_0, \dots, p\theta_{d/2-1}\,]$ so
    that feature $i$ and feature $i + d/2$ share one angle. The angles are computed in
    float64 and the result cast to ``dtype``; the tensors are on ``positions``' device.
    """
    _check_d_head(d_head)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if isinstance(positions, torch.Tensor):
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise TypeError(
                f"positions must be an integer tensor, got dtype {positions.dtype}"
            )
        if positions.device.type == "cpu" and positions.numel():  # no GPU sync
            if positions.min() < 0:
                raise ValueError("positions must be non-negative")
        p = positions.to(torch.float64) + offset  # (...)
    else:
        length = check_positive_int(positions, "positions")
        p = torch.arange(offset, offset + length, dtype=torch.float64)  # (T,)
    check_number(base, "base", low=1, low_open=True)
    return _rope_cos_sin(p, d_head, base, dtype)


def _rope_cos_sin(
    p: torch.Tensor, d_head: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_cos_sin` for float64 positions ``p`` ``(...)``, unchecked."""
    theta = angular_frequencies(d_head, base).to(p.device)  # (d/2,): theta_i
    angles = p[..., None] * theta  # (..., d/2): p * theta_i
    angles = torch.cat((angles, angles), dim=-1)  # (..., d): the half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    r"""$(x_1, x_2) \mapsto (-x_2, x_1)$, $x_1, x_2$ the two halves of the last axis.

    Feature $i$ and feature $i + d/2$ form a pair; this turns each pair by 90 degrees,
    the second term of the rotation in :func:`apply_rope`. ``x`` is ``(..., d)``.
    """
    check_tensor(x, "x", floating=True)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must end in an even size, got shape {tuple(x.shape)}")
    return _rotate_half(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_half`, unchecked."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., d/2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r"""Rotate each pair of features of ``x`` by the angle of its position (RoPE).

    $\mathrm{RoPE}(x)_p = x_p \odot \cos_p + \mathrm{rotate\_half}(x_p) \odot \sin_p$:
    for every $i < d/2$, the pair $(x_i, x_{i+d/2})$ becomes
    $(x_i \cos p\theta_i - x_{i+d/2} \sin p\theta_i,\
    x_i \sin p\theta_i + x_{i+d/2} \cos p\theta_i)$.

    ``x`` is ``(B, h, T, d_head)`` (queries or keys); ``cos`` and ``sin`` come from
    :func:`rope_cos_sin`, ``(T, d_head)`` for positions shared by the batch or
    ``(B, T, d_head)`` for positions per example.
    """
    check_tensor(x, "x", ndim=4, floating=True)
    batch, _, length, d_head = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(t, name, ndim=(2, 3), floating=True)
        expected = (length, d_head) if t.dim() == 2 else (batch, length, d_head)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (T, d_head) = {(length, d_head)} or "
                f"(B, T, d_head) = {(batch, length, d_head)} for x of shape "
                f"{tuple(x.shape)}, got {tuple(t.shape)}"
            )
    return _apply_rope(x, cos, sin)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope`, unchecked: what the attention layers call."""
    if cos.dim() == 3:  # (B, T, d) -> (B, 1, T, d): the same angles for every head
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # RoPE(x) = x * cos + rotate_half(x) * sin
    return x * cos + _rotate_half(x) * sin  # (B, h, T, d_head)


def interleaved_to_half(d_head: int) -> torch.Tensor:
    r"""The permutation that takes the paper's layout to the half layout.

    ``x[..., interleaved_to_half(d)]`` moves the even features $0, 2, 4, \dots$ to the
    first half and the odd ones to the second, so that the paper's pair $(2i, 2i+1)$
    becomes the pair $(i, i + d/2)$ of :func:`apply_rope`.
    """
    _check_d_head(d_head)
    return torch.cat((torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)))  # (d,)


def apply_rope_interleaved(
    x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0
) -> torch.Tensor:
    r"""RoPE as the paper writes it (Su et al., 3.4): adjacent pairs $(2i, 2i+1)$.

    $(x_{2i}, x_{2i+1}) \mapsto (x_{2i}\cos p\theta_i - x_{2i+1}\sin p\theta_i,\
    x_{2i}\sin p\theta_i + x_{2i+1}\cos p\theta_i)$.

    ``x`` is ``(..., T, d_head)``, ``positions`` an integer tensor ``(T,)``.
    """
    check_tensor(x, "x", floating=True)
    check_tensor(positions, "positions", ndim=1)
    if x.dim() < 2 or x.shape[-2] != len(positions):
        raise ValueError(
            f"x must have shape (..., T, d_head) with T = len(positions) = "
            f"{len(positions)}, got {tuple(x.shape)}"
        )
    d_head = _check_d_head(x.shape[-1])
    cos, sin = rope_cos_sin(positions, d_head, base, dtype=x.dtype)  # (T, d) each
    cos, sin = (
        cos[..., : d_head // 2],
        sin[..., : d_head // 2],
    )  # (T, d/2): one per pair
    even, odd = x[..., 0::2], x[..., 1::2]  # (..., T, d/2): x_{2i}, x_{2i+1}
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)  # (..., T, d_head): pairs side by side again


def alibi_slopes(n_heads: int) -> torch.Tensor:
    r"""ALiBi's slope per head (Press et al., section 3).

    For $n$ heads, $n$ a power of two: $m_h = 2^{-8h/n}$, $h = 1 \dots n$ (for 8 heads,
    $1/2, 1/4, \dots, 1/256$). Otherwise, with $2^a$ the largest power of two below
    $n$: the $2^a$ slopes for $2^a$ heads, then every other slope of the sequence for
    $2^{a+1}$ heads ($h = 1, 3, 5, \dots$) until there are $n$, the rule of the
    paper's reference code. Returns a ``(n_heads,)`` float32 tensor.
    """
    check_positive_int(n_heads, "n_heads")

    def geometric(n: int) -> list[float]:  # n a power of two
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    power = 2 ** math.floor(math.log2(n_heads))  # the largest power of two <= n
    slopes = geometric(power) + geometric(2 * power)[0::2][: n_heads - power]
    return torch.tensor(slopes, dtype=torch.float32)  # (n_heads,)


def alibi_bias(
    n_heads: int, seq_len: int, device: torch.device | str | None = None
) -> torch.Tensor:
    r"""The causal ALiBi bias to add to the attention scores, ``(n_heads, T, T)``.

    $\mathrm{bias}_{h, i, j} = -m_h\,(i - j)$ for $j \le i$, and $-\infty$ for $j > i$:
    a query at position $i$ pays $m_h$ per position of distance to the key, and never
    sees a later key. Adding it to the scores is the causal mask and ALiBi in one.
    """
    check_positive_int(n_heads, "n_heads")
    check_positive_int(seq_len, "seq_len")
    positions = torch.arange(seq_len, device=device)  # (T,)
    distance = (positions[:, None] - positions[None, :]).float()  # (T, T): i - j
    slopes = alibi_slopes(n_heads).to(device)  # (h,)
    bias = -slopes[:, None, None] * distance  # (h, T, T)
    return bias.masked_fill(~causal_mask(seq_len, device), float("-inf"))


class CausalSelfAttention(nn.Module):
    r"""Causal multi-head self-attention with a choice of relative position.

    $\mathrm{head}_k = \mathrm{softmax}\big(\tilde Q_k \tilde K_k^\top / \sqrt{d_{head}}
    + B_k\big) V_k$, with $Q = XW^Q$, $K = XW^K$, $V = XW^V$ and

    - ``positions="rope"``: $\tilde Q, \tilde K$ rotated by :func:`apply_rope`, $B$ the
      causal mask ($0$ or $-\infty$);
    - ``positions="alibi"``: $\tilde Q = Q$, $\tilde K = K$, $B$ = :func:`alibi_bias`;
    - anything else: $\tilde Q = Q$, $\tilde K = K$, $B$ the causal mask (positions, if
      any, were added to the input).

    The output is $\mathrm{Concat}(\mathrm{head}_1, \dots, \mathrm{head}_h)\,W^O$.
    ``x`` is ``(B, T, d_model)``.
    """

    def __init__(
        self, d_model: int, n_heads: int, positions: str = "rope", base: float = 1e4
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.positions = _check_positions(positions)
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        if positions == "rope":
            _check_d_head(self.d_head)
        self.base = check_number(base, "base", low=1, low_open=True)
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.W_o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: None = None) -> torch.Tensor:
        _check_features(x, self.d_model)
        if cache is not None:
            raise ValueError("cache must be None: CausalSelfAttention keeps no cache")
        return self._attend(x)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        q = split_heads(self.W_q(x), self.n_heads)  # (B, h, T, d_head)
        k = split_heads(self.W_k(x), self.n_heads)  # (B, h, T, d_head)
        v = split_heads(self.W_v(x), self.n_heads)  # (B, h, T, d_head)
        if self.positions == "rope":  # rotate queries and keys by their positions
            p = torch.arange(length, device=x.device, dtype=torch.float64)  # (T,)
            cos, sin = _rope_cos_sin(p, self.d_head, self.base, x.dtype)  # (T, d_head)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if self.positions == "alibi":  # B = -m (i - j), and the causal mask
            bias = alibi_bias(self.n_heads, length, x.device).to(x.dtype)  # (h, T, T)
        else:  # B = the causal mask
            bias = causal_mask(length, x.device)  # (T, T), True = may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, T, dh)
        return self.W_o(merge_heads(out))  # (B, T, d_model)


class PositionLM(DecoderLM):
    r"""A decoder-only character language model with a choice of positional scheme.

    The book's :class:`~dlabc.decoder.DecoderLM`: scaled embeddings, ``n_layers``
    pre-LN :class:`~dlabc.decoder.DecoderBlock` of :class:`CausalSelfAttention` and the
    encoder chapter's :class:`FeedForward`, a final LayerNorm and a linear read-out.
    ``positions`` is one of :data:`POSITIONS`: "none" (only the causal mask tells
    positions apart), "sinusoidal" (Vaswani et al., added to the input, at most
    ``max_len`` positions), "rope" or "alibi" (inside every attention layer, any
    length). Ids ``(B, T)`` -> logits ``(B, T, V)``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 128,
        positions: str = "rope",
        max_len: int = 4096,
    ) -> None:
        _check_positions(positions)

        def make_block(i: int) -> DecoderBlock:
            attn = CausalSelfAttention(d_model, n_heads, positions)
            ff = FeedForward(d_model, d_ff)
            return DecoderBlock(attn, ff, lambda: nn.LayerNorm(d_model))

        super().__init__(
            vocab_size,
            d_model,
            n_layers,
            make_block,
            lambda: nn.LayerNorm(d_model),
            positions=SinusoidalPositionalEncoding(d_model, max_len)
            if positions == "sinusoidal"
            else None,
        )
        self.max_len = check_positive_int(max_len, "max_len")


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of next-character predictions on ``batch = (x, y)``.

    ``x`` and ``y`` are ``(B, T)`` ids, ``y`` the window shifted by one (as
    ``dlabc.rnn.char_lm.batches`` makes them); the loss to give ``train_steps``.
    """
    if not (isinstance(batch, tuple) and len(batch) == 2):
        raise TypeError("batch must be a tuple (x, y)")
    x, y = batch
    check_tensor(x, "x", ndim=2, dtype=torch.long)
    check_tensor(y, "y", ndim=2, dtype=torch.long)
    if x.shape != y.shape:
        raise ValueError(
            "x and y must have the same shape, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    device = next(model.parameters()).device
    logits = model(x.to(device))  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())


@torch.no_grad()
def loss_by_position(
    model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 16
) -> torch.Tensor:
    """The loss at each position of non-overlapping windows of ``seq_len`` ids.

    ``ids`` (1-D) is cut into ``n = (len(ids) - 1) // seq_len`` consecutive windows;
    the model reads each from its start, and the cross-entropy of its prediction of
    the next id is averaged over the windows at each position. Returns ``(seq_len,)``
    in nats: its mean is the loss on windows of ``seq_len`` (Press et al.'s
    non-overlapping evaluation). Evaluation mode; the model's mode is restored.
    """
    check_tensor(ids, "ids", ndim=1, dtype=torch.long)
    check_positive_int(seq_len, "seq_len")
    check_positive_int(batch_size, "batch_size")
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"ids ({len(ids)}) must hold at least seq_len + 1 = {seq_len + 1} ids"
        )
    device = next(model.parameters()).device
    starts = torch.arange(n) * seq_len  # (n,)
    windows = ids[starts[:, None] + torch.arange(seq_len + 1)].to(device)  # (n, T + 1)
    was_training = model.training
    model.eval()
    total = torch.zeros(seq_len, dtype=torch.float64, device=device)
    try:
        for chunk in windows.split(batch_size):
            logits = model(chunk[:, :-1])  # (b, T, V)
            losses = F.cross_entropy(
                logits.transpose(1, 2), chunk[:, 1:], reduction="none"
            )  # (b, T)
            total += losses.sum(0).double()
    finally:
        model.train(was_training)
    return (total / n).float().cpu()  # (T,)


def _check_positions(positions: object) -> str:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return positions  # type: ignore[return-value]


def _check_features(x: object, d_model: int) -> torch.Tensor:
    check_tensor(x, "x", ndim=3, floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(
            f"x must have shape (B, T, d_model={d_model}), got {tuple(x.shape)}"
        )
    return x
