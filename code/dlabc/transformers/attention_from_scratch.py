"""Scaled dot-product and multi-head attention from scratch, with raw tensor operations.

Chapter: ``book/transformers/attention_from_scratch.md``.

References:
- Vaswani et al. (2017), *Attention Is All You Need*, section 3.2 (eq. 1 and multi-head
  attention).
- Goodfellow, Bengio & Courville (2016), *Deep Learning*, section 4.1 (the stable
  softmax).

There is no ``nn.Module`` here: every step is a tensor operation, so that each line can
be matched to an equation. Weight matrices are used as in the paper, ``Q = X W^Q`` with
``W^Q`` of shape ``(d_model, d_model)``.

Mask convention, the same as the boolean ``attn_mask`` of
``torch.nn.functional.scaled_dot_product_attention``: ``True`` means "this query may
look at this key", ``False`` hides the key.
"""

from __future__ import annotations

import math

import torch

from dlabc.checks import check_positive_int, check_tensor

__all__ = [
    "softmax_naive",
    "softmax",
    "scaled_dot_product_attention",
    "causal_mask",
    "padding_mask",
    "check_mask",
    "split_heads",
    "merge_heads",
    "expand_mask_for_heads",
    "multi_head_attention_loop",
    "multi_head_attention",
    "dot_product_statistics",
]


def softmax_naive(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Textbook formula $\mathrm{softmax}(x)_i = e^{x_i} / \sum_j e^{x_j}$, as written.

    It overflows: in float32, $e^{x}$ is ``inf`` for $x > 88.7$, and ``inf / inf`` is
    ``nan``.
    """
    check_tensor(x, "x", floating=True)
    e = x.exp()
    return e / e.sum(dim=dim, keepdim=True)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Max-subtraction trick: $\mathrm{softmax}(x) = \mathrm{softmax}(x - \max_j x_j)$.

    Shifting every entry by the same constant leaves the ratios $e^{x_i}/e^{x_j}$
    unchanged, and after the shift the largest exponent is $e^0 = 1$, so nothing
    overflows. ``-inf`` entries (masked scores) become exact zeros.
    """
    check_tensor(x, "x", floating=True)
    shifted = x - x.amax(dim=dim, keepdim=True)  # largest entry of each row is now 0
    e = shifted.exp()  # every entry in (0, 1]
    return e / e.sum(dim=dim, keepdim=True)  # the sum is >= 1: no division by zero


def causal_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A ``(seq_len, seq_len)`` boolean mask: position ``i`` sees only ``0..i``."""
    check_positive_int(seq_len, "seq_len")
    # (T, T)
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A ``(B, 1, seq_len)`` boolean mask hiding padding after each sequence's length.

    The middle axis has size 1 so that the mask broadcasts over the queries: a padded
    key is hidden from every query.
    """
    _check_lengths(lengths, seq_len)
    positions = torch.arange(seq_len, device=lengths.device)  # (T,)
    return (positions < lengths[:, None]).unsqueeze(1)  # (B, 1, T)


def _check_lengths(lengths: object, seq_len: object) -> None:
    check_tensor(lengths, "lengths", ndim=1)
    check_positive_int(seq_len, "seq_len")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    # a value check reads the tensor: only where that costs no GPU sync
    if lengths.device.type == "cpu" and len(lengths):
        if lengths.min() < 1 or lengths.max() > seq_len:
            raise ValueError(
                f"lengths must lie in 1..{seq_len}, got {lengths.tolist()}"
            )


def check_mask(
    mask: torch.Tensor, scores_shape: torch.Size | tuple[int, ...]
) -> torch.Tensor:
    """Check a boolean ``mask`` against the attention scores' shape.

    It must broadcast to ``scores_shape`` and leave every query a key. That last check
    reads the mask's values, so it runs only for a mask on the CPU: on a GPU it would
    make the host wait for the device on every call.
    """
    check_tensor(mask, "mask", dtype=torch.bool)
    scores_shape = tuple(scores_shape)
    if mask.dim() > len(scores_shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} has more dimensions than the scores "
            f"{scores_shape}"
        )
    try:
        broadcast = torch.broadcast_shapes(mask.shape, scores_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(scores_shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the attention "
            f"scores' shape {scores_shape} (..., queries, keys)"
        )
    if mask.device.type == "cpu" and not mask.any(dim=-1).all():
        raise ValueError(
            "mask hides every key from at least one query; "
            "each query needs one key to attend to"
        )
    return mask


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention (Vaswani et al., eq. 1), with its arguments checked.

    Shapes: ``q`` is ``(..., T_q, d_k)``, ``k`` is ``(..., T_k, d_k)``, ``v`` is
    ``(..., T_k, d_v)``, ``mask`` (optional, boolean) broadcasts to ``(..., T_q, T_k)``.
    Returns the output ``(..., T_q, d_v)`` and the attention weights
    ``(..., T_q, T_k)``. The computation is :func:`_attention`.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, floating=True)
        if t.dim() < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., length, features), "
                f"got {tuple(t.shape)}"
            )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same feature size d_k, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length T_k, got k {tuple(k.shape)} "
            f"and v {tuple(v.shape)}"
        )
    if mask is not None:
        scores_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        check_mask(mask, (*scores_shape, q.shape[-2], k.shape[-2]))
    return _attention(q, k, v, mask)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}(QK^\top / \sqrt{d_k})\,V$."""
    d_k = q.shape[-1]
    # every query-key similarity, scaled so its variance does not grow with d_k
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (..., T_q, T_k)
    if mask is not None:
        # a hidden key gets weight e^-inf = 0
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = softmax(scores, dim=-1)  # (..., T_q, T_k), each row sums to 1
    return weights @ v, weights  # (..., T_q, d_v): a weighted average of the values


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(B, T, d_model) -> (B, n_heads, T, d_head)``: a slice of features per head."""
    check_tensor(x, "x", ndim=3)
    check_positive_int(n_heads, "n_heads")
    batch, length, d_model = x.shape
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    # (B, h, T, d_head)
    return x.view(batch, length, n_heads, d_model // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, n_heads, T, d_head) -> (B, T, d_model)``: undoes :func:`split_heads`."""
    check_tensor(x, "x", ndim=4)
    batch, n_heads, length, d_head = x.shape
    return x.transpose(1, 2).reshape(batch, length, n_heads * d_head)  # (B, T, d_model)


def expand_mask_for_heads(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Turn a mask broadcasting to ``(B, T_q, T_k)`` into one for ``(B, h, T_q, T_k)``.

    Every head sees the same mask, so a head axis of size 1 is inserted before the
    queries.
    """
    if mask is None:
        return None
    check_tensor(mask, "mask", dtype=torch.bool)
    if mask.dim() > 3:
        raise ValueError(
            f"mask must broadcast to (batch, T_q, T_k), got shape {tuple(mask.shape)}"
        )
    # a mask over the keys alone, (T_k,), already broadcasts over heads
    if mask.dim() < 2:
        return mask
    return mask.unsqueeze(-3)  # (..., 1, T_q, T_k)


def _check_mha_inputs(x_q, x_kv, W_q, W_k, W_v, W_o, n_heads, mask):
    check_tensor(x_q, "x_q", ndim=3, floating=True)
    check_tensor(x_kv, "x_kv", ndim=3, floating=True)
    d_model = x_q.shape[-1]
    if x_kv.shape[-1] != d_model or x_kv.shape[0] != x_q.shape[0]:
        raise ValueError(
            f"x_q {tuple(x_q.shape)} and x_kv {tuple(x_kv.shape)} "
            "must share batch size and d_model"
        )
    for name, w in {"W_q": W_q, "W_k": W_k, "W_v": W_v, "W_o": W_o}.items():
        check_tensor(w, name, ndim=2, floating=True)
        if w.shape != (d_model, d_model):
            raise ValueError(
                f"{name} must have shape (d_model, d_model) = {(d_model, d_model)}, "
                f"got {tuple(w.shape)}"
            )
    check_positive_int(n_heads, "n_heads")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    if mask is not None:
        check_mask(mask, (x_q.shape[0], x_q.shape[1], x_kv.shape[1]))


def multi_head_attention_loop(
    x_q: torch.Tensor,
    x_kv: torch.Tensor,
    W_q: torch.Tensor,
    W_k: torch.Tensor,
    W_v: torch.Tensor,
    W_o: torch.Tensor,
    n_heads: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Multi-head attention, one head at a time, exactly as the paper writes it.

    $\mathrm{head}_i = \mathrm{Attention}(X_q W^Q_i, X_{kv} W^K_i, X_{kv} W^V_i)$ where
    $W^Q_i$ is the $i$-th block of ``d_head`` columns of ``W_q``; the output is
    $\mathrm{Concat}(\mathrm{head}_1, \dots, \mathrm{head}_h)\,W^O$.

    ``x_q`` is ``(B, T_q, d_model)``, ``x_kv`` is ``(B, T_k, d_model)``, each ``W`` is
    ``(d_model, d_model)``, ``mask`` broadcasts to ``(B, T_q, T_k)``. Returns the output
    ``(B, T_q, d_model)`` and the weights ``(B, n_heads, T_q, T_k)``.
    """
    _check_mha_inputs(x_q, x_kv, W_q, W_k, W_v, W_o, n_heads, mask)
    d_head = x_q.shape[-1] // n_heads
    heads, weights = [], []
    for i in range(n_heads):
        cols = slice(i * d_head, (i + 1) * d_head)  # this head's block of columns
        q = x_q @ W_q[:, cols]  # (B, T_q, d_head)
        k = x_kv @ W_k[:, cols]  # (B, T_k, d_head)
        v = x_kv @ W_v[:, cols]  # (B, T_k, d_head)
        # (B, T_q, d_head), (B, T_q, T_k)
        head, w = _attention(q, k, v, mask)
        heads.append(head)
        weights.append(w)
    concat = torch.cat(heads, dim=-1)  # (B, T_q, d_model)
    # (B, T_q, d_model), (B, h, T_q, T_k)
    return concat @ W_o, torch.stack(weights, dim=1)


def multi_head_attention(
    x_q: torch.Tensor,
    x_kv: torch.Tensor,
    W_q: torch.Tensor,
    W_k: torch.Tensor,
    W_v: torch.Tensor,
    W_o: torch.Tensor,
    n_heads: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention in one go: three big products, a reshape, one attention.

    Same arguments and results as :func:`multi_head_attention_loop`; the heads become a
    batch axis.
    """
    _check_mha_inputs(x_q, x_kv, W_q, W_k, W_v, W_o, n_heads, mask)
    q = split_heads(x_q @ W_q, n_heads)  # (B, h, T_q, d_head)
    k = split_heads(x_kv @ W_k, n_heads)  # (B, h, T_k, d_head)
    v = split_heads(x_kv @ W_v, n_heads)  # (B, h, T_k, d_head)
    # (B, h, T_q, d_head)
    out, weights = _attention(q, k, v, expand_mask_for_heads(mask))
    return merge_heads(out) @ W_o, weights  # (B, T_q, d_model), (B, h, T_q, T_k)


def dot_product_statistics(
    d_k: int,
    n_keys: int = 16,
    n_samples: int = 2000,
    scaled: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    r"""Measure what the $1/\sqrt{d_k}$ factor does for i.i.d. N(0, 1) queries and keys.

    Draws ``n_samples`` queries, each with ``n_keys`` keys, and returns averages over
    them of

    - ``score_variance``: the variance of the (optionally scaled) scores $q \cdot k$
      (theory: $d_k$ unscaled, $1$ scaled);
    - ``max_weight``: the largest softmax weight (close to 1: the softmax is saturated);
    - ``gradient_norm``: the size of the softmax's Jacobian
      $\partial p_i / \partial x_j = p_i(\delta_{ij} - p_j)$ (Frobenius norm), which
      shrinks to 0 as the weights approach one-hot: a saturated softmax passes almost no
      gradient back.
    """
    check_positive_int(d_k, "d_k")
    check_positive_int(n_keys, "n_keys")
    check_positive_int(n_samples, "n_samples")
    q = torch.randn(n_samples, 1, d_k, generator=generator)  # (S, 1, d_k)
    k = torch.randn(n_samples, n_keys, d_k, generator=generator)  # (S, n_keys, d_k)
    scores = (q @ k.transpose(-2, -1)).squeeze(1)  # (S, n_keys)
    if scaled:
        scores = scores / math.sqrt(d_k)
    p = softmax(scores, dim=-1)  # (S, n_keys)
    # (S, n_keys, n_keys)
    jacobian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return {
        "score_variance": scores.var().item(),
        "max_weight": p.amax(dim=-1).mean().item(),
        "gradient_norm": jacobian.flatten(1).norm(dim=1).mean().item(),
    }
