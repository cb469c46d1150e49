"""Attention for long sequences: sparse patterns, random features and hashing.

Chapter: ``book/improvements/efficient_attention.md``.

References:
- Child, Gray, Radford & Sutskever (2019), *Generating Long Sequences with Sparse
  Transformers* (fixed sparse patterns computed block by block).
- Beltagy, Peters & Cohan (2020), *Longformer: The Long-Document Transformer*
  (sliding, dilated and global attention; :class:`LongformerSelfAttention` loads the
  weights of Hugging Face's ``LongformerSelfAttention``).
- Zaheer et al. (2020), *Big Bird: Transformers for Longer Sequences* (window, global
  and random blocks, :func:`bigbird_layout`).
- Choromanski et al. (2021), *Rethinking Attention with Performers* (FAVOR+: positive
  orthogonal random features, :func:`performer_attention`).
- Kitaev, Kaiser & Levskaya (2020), *Reformer: The Efficient Transformer* (angular
  locality-sensitive hashing with shared queries and keys, :func:`lsh_attention`).

Mask convention, as in ``F.scaled_dot_product_attention``: ``True`` means "this query
may look at this key". Shapes: ``q``, ``k`` are ``(..., T, d)``, ``v`` is
``(..., T, d_v)``; every attention function here is self-attention (``T_q = T_k``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dlabc.checks import check_positive_int, check_tensor
from dlabc.transformers.attention_from_scratch import merge_heads, split_heads

__all__ = [
    "SELF_SCORE",
    "window_mask",
    "global_mask",
    "bigbird_layout",
    "expand_layout",
    "block_sparse_attention",
    "combine_attention",
    "LongformerSelfAttention",
    "gaussian_orthogonal_random_matrix",
    "positive_random_features",
    "performer_attention",
    "lsh_buckets",
    "lsh_mask",
    "lsh_attention",
]

#: The score Reformer gives a token for attending to itself (a penalty, not a mask:
#: a token with no other key in its bucket still attends to itself).
SELF_SCORE = -1e5


def _check_device(device: object) -> None:
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {device!r}")


def _check_non_negative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _window_allowed(
    one_sided: int, dilation: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The predicate of a dilated window: ``|i - j| <= w * d`` and ``d`` divides it."""

    def allowed(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        offset = i - j
        return (offset.abs() <= one_sided * dilation) & (offset % dilation == 0)

    return allowed


def window_mask(
    seq_len: int,
    one_sided: int,
    dilation: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The (dilated) sliding window of Longformer as a ``(T, T)`` boolean mask.

    Query $i$ sees key $j$ when $|i - j| \le w\,\delta$ and $\delta$ divides $i - j$:
    $w$ keys on each side (``one_sided``) spaced $\delta$ apart (``dilation``), and
    itself. ``dilation=1`` is the plain sliding window.
    """
    check_positive_int(seq_len, "seq_len")
    _check_non_negative_int(one_sided, "one_sided")
    check_positive_int(dilation, "dilation")
    _check_device(device)
    i = torch.arange(seq_len, device=device)
    return _window_allowed(one_sided, dilation)(i[:, None], i[None, :])  # (T, T)


def global_mask(
    seq_len: int,
    global_index: torch.Tensor,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Global attention: the rows and the columns of the global tokens, ``(T, T)``.

    A global token $g$ attends to every position (row $g$) and every position attends
    to it (column $g$). Combine with a window: ``window_mask(...) | global_mask(...)``.
    """
    check_positive_int(seq_len, "seq_len")
    check_tensor(global_index, "global_index", ndim=1)
    _check_device(device)
    if global_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"global_index must hold integer positions, got dtype {global_index.dtype}"
        )
    if len(global_index) and not (
        0 <= global_index.min() <= global_index.max() < seq_len
    ):
        raise ValueError(
            f"global_index must lie in [0, {seq_len}), got {global_index.tolist()}"
        )
    is_global = torch.zeros(seq_len, dtype=torch.bool, device=device)
    is_global[global_index.to(device)] = True
    return is_global[:, None] | is_global[None, :]  # (T, T)


def _check_bigbird(
    n_blocks: object,
    n_global: object,
    n_window: object,
    n_random: object,
    generator: object,
) -> None:
    check_positive_int(n_blocks, "n_blocks")
    _check_non_negative_int(n_global, "n_global")
    check_positive_int(n_window, "n_window")
    _check_non_negative_int(n_random, "n_random")
    if n_window % 2 == 0:
        raise ValueError(f"n_window must be odd (a centred window), got {n_window}")
    _check_generator(generator)


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {generator!r}")


def bigbird_layout(
    n_blocks: int,
    n_global: int = 1,
    n_window: int = 3,
    n_random: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""BigBird's block pattern, ``(n_blocks, n_blocks)``: True where a block is
    computed.

    * **global**: the first ``n_global`` blocks attend to everything and everything
      attends to them (BigBird-ITC uses existing tokens as global ones);
    * **window**: block $i$ attends to blocks $i - \lfloor n_w/2 \rfloor, \dots,
      i + \lfloor n_w/2 \rfloor$ (``n_window`` odd);
    * **random**: every row that is not global gets ``n_random`` more key blocks,
      drawn uniformly from those it does not have yet.
    """
    _check_bigbird(n_blocks, n_global, n_window, n_random, generator)
    blocks = torch.arange(n_blocks)
    # the window: a band of n_window blocks around the diagonal
    layout = (blocks[:, None] - blocks[None, :]).abs() <= n_window // 2
    # global blocks: whole rows and whole columns
    layout[:n_global, :] = True
    layout[:, :n_global] = True
    # random blocks: for each non-global row, n_random of the blocks it lacks
    for row in range(n_global, n_blocks):
        free = (~layout[row]).nonzero().flatten()
        pick = torch.randperm(len(free), generator=generator)[:n_random]
        layout[row, free[pick]] = True
    return layout


def expand_layout(layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """The token-level ``(n_blocks * b, n_blocks * b)`` mask of a block layout."""
    check_tensor(layout, "layout", ndim=2, dtype=torch.bool)
    check_positive_int(block_size, "block_size")
    # every block entry becomes a b x b square
    return layout.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def _check_self_attention(q: object, k: object, v: object) -> None:
    """q, k: (..., T, d) of one shape; v: (..., T, d_v); all floating point."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, floating=True)
        if t.dim() < 2:
            raise ValueError(f"{name} must be (..., T, features), got {tuple(t.shape)}")
    if q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            "q and k must have one shape (..., T, d) and v (..., T, d_v), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention returning ``(out, lse)``; a row with no key gives 0 and -inf."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # row maximum
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # empty rows: any shift
    e = torch.exp(s - m)  # hidden keys give exactly 0
    ell = e.sum(dim=-1, keepdim=True)  # (..., T_q, 1)
    out = (e @ v) / ell.clamp_min(torch.finfo(ell.dtype).tiny)  # 0 for an empty row
    return out, (m + torch.log(ell)).squeeze(-1)  # lse = -inf for an empty row


def _check_block_sparse(
    q: object,
    k: object,
    v: object,
    layout: object,
    block_size: object,
    allowed: object,
    key_mask: object,
) -> None:
    _check_self_attention(q, k, v)
    check_tensor(layout, "layout", ndim=2, dtype=torch.bool)
    check_positive_int(block_size, "block_size")
    seq_len = q.shape[-2]
    if seq_len % block_size:
        raise ValueError(
            f"the length T={seq_len} must be a multiple of block_size={block_size}"
        )
    n_blocks = seq_len // block_size
    if tuple(layout.shape) != (n_blocks, n_blocks):
        raise ValueError(
            f"layout must have shape ({n_blocks}, {n_blocks}) for T={seq_len} and "
            f"block_size={block_size}, got {tuple(layout.shape)}"
        )
    if allowed is not None and not callable(allowed):
        raise TypeError(f"allowed must be callable, got {type(allowed).__name__}")
    if key_mask is not None:
        check_tensor(key_mask, "key_mask", dtype=torch.bool)
        if key_mask.shape[-1] != seq_len:
            raise ValueError(
                f"key_mask must be (..., T={seq_len}), got {tuple(key_mask.shape)}"
            )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    allowed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Attention computed only on the blocks where ``layout`` is True.

    The sequence is cut into blocks of $b$ positions; query block $i$ attends to the
    key blocks $\{j : \text{layout}_{ij}\}$, inside which ``allowed(i, j)`` (a function
    of query and key positions, e.g. a window) and ``key_mask`` (``(..., T)``, False
    for padding) can hide single keys. The result equals dense attention with the mask
    ``expand_layout(layout) & allowed & key_mask``. Rows whose layout is full (global
    blocks) are computed densely, the others gather their key blocks: with at most $n$
    blocks per row the scores take $T \cdot n b$ numbers, not $T^2$.

    Returns ``out`` ``(..., T, d_v)`` and the log-sum-exp ``lse`` ``(..., T)`` of each
    row, so that results over disjoint key sets can be merged
    (:func:`combine_attention`).
    """
    _check_block_sparse(q, k, v, layout, block_size, allowed, key_mask)
    seq_len = q.shape[-2]
    n_blocks = seq_len // block_size
    b, dev = block_size, q.device
    layout = layout.to(dev)
    batch = q.shape[:-2]
    out = q.new_zeros(*batch, n_blocks, b, v.shape[-1])  # (..., n_blocks, b, d_v)
    lse = q.new_full((*batch, n_blocks, b), float("-inf"))  # (..., n_blocks, b)
    q_blocks = q.unflatten(-2, (n_blocks, b))  # (..., n_blocks, b, d)
    k_blocks = k.unflatten(-2, (n_blocks, b))  # (..., n_blocks, b, d)
    v_blocks = v.unflatten(-2, (n_blocks, b))  # (..., n_blocks, b, d_v)
    offsets = torch.arange(b, device=dev)
    counts = layout.sum(dim=1)  # key blocks per query block
    dense_rows = (counts == n_blocks).nonzero().flatten()
    sparse_rows = ((counts > 0) & (counts < n_blocks)).nonzero().flatten()

    def keep_mask(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(rows.shape, cols.shape)
        keep = torch.ones(shape, dtype=torch.bool, device=dev)
        if allowed is not None:
            keep = keep & allowed(rows, cols)
        if key_mask is not None:  # (..., T) -> (..., rows, cols) by gathering
            keep = keep & key_mask.to(dev)[..., cols]
        return keep

    if len(sparse_rows):
        # the key blocks of each sparse row, padded to the longest row: (n_s, r)
        r = int(counts[sparse_rows].max())
        rows_layout = layout[sparse_rows].to(torch.int8)
        key_blocks = rows_layout.sort(dim=1, descending=True, stable=True).indices
        key_blocks = key_blocks[:, :r]  # (n_s, r): the True blocks come first
        real = torch.arange(r, device=dev) < counts[sparse_rows, None]  # (n_s, r)
        q_i = q_blocks[..., sparse_rows, :, :]  # (..., n_s, b, d)
        k_j = k_blocks[..., key_blocks, :, :].flatten(-3, -2)  # (..., n_s, r*b, d)
        v_j = v_blocks[..., key_blocks, :, :].flatten(-3, -2)  # (..., n_s, r*b, d_v)
        # query and key positions of every score, (n_s, b, 1) and (n_s, 1, r*b)
        rows = (sparse_rows[:, None] * b + offsets)[:, :, None]
        cols = (key_blocks[:, :, None] * b + offsets).flatten(1)[:, None, :]
        keep = keep_mask(rows, cols) & real.repeat_interleave(b, dim=1)[:, None, :]
        # softmax(Q_i K_j^T / sqrt(d)) V_j over the gathered blocks only
        o_s, lse_s = _masked_attention(q_i, k_j, v_j, keep)  # (..., n_s, b, d_v)
        out[..., sparse_rows, :, :] = o_s
        lse[..., sparse_rows, :] = lse_s
    if len(dense_rows):
        # global query blocks: every key, (..., n_g * b, T)
        rows = (dense_rows[:, None] * b + offsets).flatten()[:, None]
        cols = torch.arange(seq_len, device=dev)[None, :]
        q_g = q_blocks[..., dense_rows, :, :].flatten(-3, -2)  # (..., n_g*b, d)
        o_g, lse_g = _masked_attention(q_g, k, v, keep_mask(rows, cols))
        out[..., dense_rows, :, :] = o_g.unflatten(-2, (len(dense_rows), b))
        lse[..., dense_rows, :] = lse_g.unflatten(-1, (len(dense_rows), b))
    return out.flatten(-3, -2), lse.flatten(-2, -1)  # (..., T, d_v), (..., T)


def _check_halves(out_a: object, lse_a: object, out_b: object, lse_b: object) -> None:
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b)):
        check_tensor(t, name, floating=True)
    check_tensor(lse_b, "lse_b", floating=True)
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            "the two halves must have the same shapes, got out "
            f"{tuple(out_a.shape)} and {tuple(out_b.shape)}, lse {tuple(lse_a.shape)} "
            f"and {tuple(lse_b.shape)}"
        )
    if out_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"lse must be out without its last axis, got out {tuple(out_a.shape)} "
            f"and lse {tuple(lse_a.shape)}"
        )


def combine_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Attention over the union of two disjoint key sets, from the two halves.

    With $L = \log(e^{L_a} + e^{L_b})$ the log-sum-exp over both sets,
    $o = e^{L_a - L}\,o_a + e^{L_b - L}\,o_b$: each half is reweighted by its share of
    the softmax normaliser (the rescaling of FlashAttention's online softmax).
    Returns ``(out, lse)``.
    """
    _check_halves(out_a, lse_a, out_b, lse_b)
    lse = torch.logaddexp(lse_a, lse_b)  # the normaliser over both key sets
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    # each half's share of the normaliser; 0 for a half with no key
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    return w_a * out_a + w_b * out_b, lse


def _checked_masks(
    hidden_states: object,
    attention_mask: object,
    global_attention_mask: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check Longformer's inputs (shapes and dtypes only, no sync); return the masks
    ``real`` (default: all True) and ``is_global`` (default: none), each ``(B, T)``."""
    check_tensor(hidden_states, "hidden_states", ndim=3, floating=True)
    batch, seq_len, _ = hidden_states.shape
    masks = []
    for name, mask, default in (
        ("attention_mask", attention_mask, True),
        ("global_attention_mask", global_attention_mask, False),
    ):
        if mask is None:
            mask = torch.full((batch, seq_len), default, device=hidden_states.device)
        check_tensor(mask, name, ndim=2, dtype=torch.bool)
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(
                f"{name} must have shape {(batch, seq_len)}, got {tuple(mask.shape)}"
            )
        masks.append(mask)
    return masks[0], masks[1] & masks[0]


class LongformerSelfAttention(nn.Module):
    r"""Longformer's self-attention: a sliding window plus global tokens.

    An ordinary token $i$ attends, with the projections ``query``, ``key``, ``value``,
    to the keys $|i - j| \le w\delta$ of its (dilated) window and to every global
    token; the window is computed block by block (:func:`block_sparse_attention`, blocks
    of $w\delta$, each query block needs three key blocks) and the global keys
    separately, and the two are merged by :func:`combine_attention`. A global token
    attends to every token with its own projections ``query_global``, ``key_global``,
    ``value_global``. ``attention_window`` is the *whole* window, $2w$, as in
    Hugging Face's ``LongformerConfig``; the parameter names are Hugging Face's, so
    its weights load by name.
    """

    def __init__(
        self, d_model: int, n_heads: int, attention_window: int, dilation: int = 1
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        check_positive_int(attention_window, "attention_window")
        check_positive_int(dilation, "dilation")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if attention_window % 2:
            raise ValueError(
                f"attention_window is the whole window 2w and must be even, got "
                f"{attention_window}"
            )
        self.n_heads, self.dilation = n_heads, dilation
        self.one_sided = attention_window // 2  # w keys on each side
        for name in ("query", "key", "value", "query_global", "key_global"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.value_global = nn.Linear(d_model, d_model)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` ``(B, T, d_model)``; ``attention_mask`` ``(B, T)`` bool,
        False for padding; ``global_attention_mask`` ``(B, T)`` bool, True for the
        global tokens. Returns ``(B, T, d_model)``, zero at padded positions."""
        real, is_global = _checked_masks(
            hidden_states, attention_mask, global_attention_mask
        )  # (B, T) each: real tokens, global tokens among them
        x = hidden_states
        seq_len = x.shape[1]
        q = split_heads(self.query(x), self.n_heads)  # (B, h, T, d_head)
        k = split_heads(self.key(x), self.n_heads)  # (B, h, T, d_head)
        v = split_heads(self.value(x), self.n_heads)  # (B, h, T, d_head)
        # pad to a multiple of the block w * dilation; padded keys are hidden
        block = self.one_sided * self.dilation
        pad = -seq_len % block
        q, k, v = (nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        local_keys = nn.functional.pad(real & ~is_global, (0, pad), value=False)
        n_blocks = (seq_len + pad) // block
        blocks = torch.arange(n_blocks, device=x.device)
        tridiagonal = (blocks[:, None] - blocks[None, :]).abs() <= 1  # (n_b, n_b)
        # 1. the window: |i - j| <= w * dilation, global keys left to step 2
        out, lse = block_sparse_attention(
            q,
            k,
            v,
            tridiagonal,
            block,
            _window_allowed(self.one_sided, self.dilation),
            local_keys[:, None, :],  # (B, 1, T_pad): the same for every head
        )
        out, lse = out[..., :seq_len, :], lse[..., :seq_len]  # (B, h, T, d_head)
        # 2. every token attends to the global tokens (gathered, padded to the max)
        n_global = int(is_global.sum(dim=1).max())
        if n_global:
            order = is_global.to(torch.int8).sort(dim=1, descending=True, stable=True)
            index = order.indices[:, :n_global]  # (B, G): the global positions first
            valid = order.values[:, :n_global].bool()  # (B, G)
            gather = index[:, None, :, None]  # (B, 1, G, 1)
            k_g = k.gather(2, gather.expand(-1, self.n_heads, -1, k.shape[-1]))
            v_g = v.gather(2, gather.expand(-1, self.n_heads, -1, v.shape[-1]))
            keep = valid[:, None, None, :]  # (B, 1, 1, G)
            out_g, lse_g = _masked_attention(q[..., :seq_len, :], k_g, v_g, keep)
            out, lse = combine_attention(out, lse, out_g, lse_g)
            # 3. the global tokens attend to every real token, own projections
            x_g = x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))
            q_G = split_heads(self.query_global(x_g), self.n_heads)  # (B, h, G, d_h)
            k_G = split_heads(self.key_global(x), self.n_heads)  # (B, h, T, d_h)
            v_G = split_heads(self.value_global(x), self.n_heads)  # (B, h, T, d_h)
            out_G, _ = _masked_attention(q_G, k_G, v_G, real[:, None, None, :])
            rows = index[:, None, :, None].expand_as(out_G)  # (B, h, G, d_head)
            updated = out.scatter(2, rows, out_G)  # (B, h, T, d_head)
            # only the real global rows change (padding entries of index are dropped)
            out = torch.where(is_global[:, None, :, None], updated, out)
        out = out * real[:, None, :, None]  # padded positions give 0, as in HF
        return merge_heads(out)  # (B, T, d_model)


def _check_random_matrix(
    n_features: object, d: object, orthogonal: object, generator: object, dtype: object
) -> None:
    check_positive_int(n_features, "n_features")
    check_positive_int(d, "d")
    if not isinstance(orthogonal, bool):
        raise TypeError(f"orthogonal must be a bool, got {type(orthogonal).__name__}")
    _check_generator(generator)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")


def gaussian_orthogonal_random_matrix(
    n_features: int,
    d: int,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""$m$ random directions $\omega_1, \dots, \omega_m \in \mathbb{R}^d$, ``(m, d)``.

    Each row is marginally $\mathcal N(0, I_d)$. With ``orthogonal=True`` the rows come
    in blocks of $d$ that are exactly orthogonal (the Q of a QR decomposition of a
    Gaussian matrix), each rescaled to the length of an independent Gaussian vector
    ($\chi_d$-distributed): the estimator stays unbiased and its variance drops.
    """
    _check_random_matrix(n_features, d, orthogonal, generator, dtype)
    if not orthogonal:  # iid Gaussian rows
        return torch.randn(n_features, d, generator=generator, dtype=torch.float64).to(
            dtype
        )
    n_blocks = math.ceil(n_features / d)
    gaussian = torch.randn(n_blocks, d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # (n_blocks, d, d), orthonormal columns
    # fix the signs so that Q is uniformly (Haar) distributed: Householder QR alone
    # would make, e.g., the first entry of the first column never positive
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    rows = q.transpose(-2, -1).reshape(n_blocks * d, d)[:n_features]  # unit rows
    # lengths of independent Gaussian vectors: each row is marginally N(0, I)
    norms = torch.randn(n_features, d, generator=generator, dtype=torch.float64)
    return (rows * norms.norm(dim=1, keepdim=True)).to(dtype)


def _check_features(x: object, omega: object, stabilize: object) -> None:
    check_tensor(x, "x", floating=True)
    check_tensor(omega, "omega", ndim=2, floating=True)
    if x.dim() < 1 or x.shape[-1] != omega.shape[1]:
        raise ValueError(
            f"x (..., d) and omega (m, d) must share d, got x {tuple(x.shape)} and "
            f"omega {tuple(omega.shape)}"
        )
    if stabilize not in (None, "row", "all"):
        raise ValueError(f"stabilize must be None, 'row' or 'all', got {stabilize!r}")


def positive_random_features(
    x: torch.Tensor, omega: torch.Tensor, stabilize: str | None = None
) -> torch.Tensor:
    r"""FAVOR+'s positive random features of the softmax kernel, ``(..., T, m)``.

    $\phi(x) = \frac{1}{\sqrt m}\,e^{-\|x\|^2/2}
    \big(e^{\omega_1^\top x}, \dots, e^{\omega_m^\top x}\big)$, so that
    $\mathbb E_\omega[\phi(x)^\top \phi(y)] = e^{x^\top y}$ for
    $\omega \sim \mathcal N(0, I)$.

    ``stabilize`` subtracts the largest exponent before ``exp``: ``"row"`` per vector
    (for queries), ``"all"`` over the whole ``(T, m)`` slice (for keys). Either factor
    cancels in the ratio of attention, and neither may be used when the features
    themselves are compared with $e^{x^\top y}$.
    """
    _check_features(x, omega, stabilize)
    # the exponent omega_i^T x - |x|^2 / 2 of every feature
    z = x @ omega.to(x.dtype).T - (x * x).sum(dim=-1, keepdim=True) / 2  # (..., T, m)
    if stabilize == "row":
        z = z - z.amax(dim=-1, keepdim=True).detach()
    elif stabilize == "all":
        z = z - z.amax(dim=(-2, -1), keepdim=True).detach()
    return torch.exp(z) / math.sqrt(omega.shape[0])


def performer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, omega: torch.Tensor
) -> torch.Tensor:
    r"""FAVOR+ attention: softmax attention estimated in $O(T m d)$ time and memory.

    With $\phi$ applied to $q / d^{1/4}$ and $k / d^{1/4}$ (so that
    $\phi(q)^\top \phi(k)$ estimates $e^{q^\top k / \sqrt d}$),

    $\widehat{\mathrm{Att}}(Q, K, V) = \dfrac{\phi(Q)\,\big(\phi(K)^\top V\big)}
    {\phi(Q)\,\big(\phi(K)^\top \mathbf 1\big)}$:

    the $T \times T$ matrix $\phi(Q)\phi(K)^\top$ is never formed, the $m \times d_v$
    matrix $\phi(K)^\top V$ is computed first.
    """
    _check_self_attention(q, k, v)
    scale = q.shape[-1] ** -0.25  # splits the 1/sqrt(d) between queries and keys
    phi_q = positive_random_features(q * scale, omega, "row")  # (..., T, m)
    phi_k = positive_random_features(k * scale, omega, "all")  # (..., T, m)
    # the numerator phi(Q) (phi(K)^T V), keys summed first: (..., m, d_v)
    kv = phi_k.transpose(-2, -1) @ v
    # the denominator phi(Q) (phi(K)^T 1): (..., T)
    normaliser = phi_q @ phi_k.sum(dim=-2)[..., None]  # (..., T, 1)
    return (phi_q @ kv) / normaliser  # (..., T, d_v)


def _check_rotations(x: torch.Tensor, rotations: object) -> None:
    check_tensor(rotations, "rotations", ndim=2, floating=True)
    if x.dim() < 1 or x.shape[-1] != rotations.shape[0]:
        raise ValueError(
            f"x (..., d) and rotations (d, n_buckets/2) must share d, got x "
            f"{tuple(x.shape)} and rotations {tuple(rotations.shape)}"
        )


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    r"""Angular LSH: the bucket of each vector, ``(..., T)`` integers in $[0, n_b)$.

    With a random matrix $R$ of shape $(d, n_b/2)$,
    $h(x) = \arg\max\,[\,xR\,;\,-xR\,]$: vectors at a small angle land in the same
    bucket with high probability (Kitaev et al., after Andoni et al. 2015).
    """
    check_tensor(x, "x", floating=True)
    _check_rotations(x, rotations)
    projected = x @ rotations.to(x.dtype)  # (..., T, n_b/2)
    return torch.cat([projected, -projected], dim=-1).argmax(dim=-1)  # (..., T)


def _check_lsh(
    buckets: torch.Tensor, chunk_size: int
) -> None:  # shared by lsh_mask and lsh_attention
    check_positive_int(chunk_size, "chunk_size")
    if buckets.shape[-1] % chunk_size:
        raise ValueError(
            f"the length T={buckets.shape[-1]} must be a multiple of "
            f"chunk_size={chunk_size}"
        )


def _sort_by_bucket(buckets: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts positions by bucket, then by position."""
    seq_len = buckets.shape[-1]
    position = torch.arange(seq_len, device=buckets.device)
    return (buckets * seq_len + position).argsort(dim=-1)  # (..., T)


def lsh_mask(buckets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    r"""The dense ``(..., T, T)`` mask that :func:`lsh_attention` computes.

    After sorting by (bucket, position) and cutting into chunks of $c$, query $i$ sees
    key $j$ when both share a bucket and $j$'s chunk is $i$'s or the one before.
    """
    check_tensor(buckets, "buckets", dtype=torch.int64)
    _check_lsh(buckets, chunk_size)
    rank = _sort_by_bucket(buckets).argsort(dim=-1)  # (..., T): place in sorted order
    chunk = rank // chunk_size  # (..., T)
    same_bucket = buckets[..., :, None] == buckets[..., None, :]  # (..., T, T)
    behind = chunk[..., :, None] - chunk[..., None, :]  # (..., T, T)
    return same_bucket & ((behind == 0) | (behind == 1))


def _check_lsh_attention(
    qk: object, v: object, rotations: object, chunk_size: object
) -> None:
    check_tensor(qk, "qk", floating=True)
    check_tensor(v, "v", floating=True)
    if qk.dim() < 2 or qk.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"qk (..., T, d) and v (..., T, d_v) must share (..., T), got qk "
            f"{tuple(qk.shape)} and v {tuple(v.shape)}"
        )
    _check_rotations(qk, rotations)
    _check_lsh(qk[..., 0], chunk_size)


def lsh_attention(
    qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Reformer's LSH attention (one hash round) with shared queries and keys.

    Keys are the normalised queries, $k_j = q_j / \|q_j\|$, so a query and its key
    share a bucket. Hash (:func:`lsh_buckets`), sort by bucket, cut into chunks of $c$;
    each chunk attends to itself and the previous chunk, only to keys of its own
    bucket. A token's score for itself is replaced by ``SELF_SCORE`` $= -10^5$, so it
    attends to itself only when nothing else is in reach. Cost $O(T c)$, not $O(T^2)$.

    Returns ``out`` ``(..., T, d_v)`` and the buckets ``(..., T)``.
    """
    _check_lsh_attention(qk, v, rotations, chunk_size)
    buckets = lsh_buckets(qk, rotations)  # (..., T)
    seq_len, c = qk.shape[-2], chunk_size
    n_chunks = seq_len // c
    # sort by bucket: similar vectors become neighbours
    order = _sort_by_bucket(buckets)  # (..., T)
    q_s = qk.gather(-2, order[..., None].expand_as(qk))  # (..., T, d)
    v_s = v.gather(-2, order[..., None].expand(*order.shape, v.shape[-1]))
    b_s = buckets.gather(-1, order)  # (..., T), non-decreasing
    # shared QK: unit keys (a zero query gives a zero key, not 0/0)
    k_s = nn.functional.normalize(q_s, dim=-1)

    def look_back(t: torch.Tensor) -> torch.Tensor:
        """(..., n_c, c, f) -> (..., n_c, 2c, f): the previous chunk, then this one."""
        previous = torch.cat(
            [torch.zeros_like(t[..., :1, :, :]), t[..., :-1, :, :]], -3
        )
        return torch.cat([previous, t], dim=-2)

    q_c = q_s.unflatten(-2, (n_chunks, c))  # (..., n_c, c, d)
    k_c = look_back(k_s.unflatten(-2, (n_chunks, c)))  # (..., n_c, 2c, d)
    v_c = look_back(v_s.unflatten(-2, (n_chunks, c)))  # (..., n_c, 2c, d_v)
    pos = look_back(order.unflatten(-1, (n_chunks, c))[..., None])[..., 0]
    bkt = look_back(b_s.unflatten(-1, (n_chunks, c))[..., None])[..., 0]
    exists = torch.ones(n_chunks, 2 * c, dtype=torch.bool, device=qk.device)
    exists[0, :c] = False  # the first chunk has no previous chunk
    # scores within the chunk and the previous one, same bucket only
    s = q_c @ k_c.transpose(-2, -1) / math.sqrt(qk.shape[-1])  # (..., n_c, c, 2c)
    q_pos = order.unflatten(-1, (n_chunks, c))[..., :, None]  # (..., n_c, c, 1)
    s = torch.where(q_pos == pos[..., None, :], torch.full_like(s, SELF_SCORE), s)
    same = b_s.unflatten(-1, (n_chunks, c))[..., :, None] == bkt[..., None, :]
    s = s.masked_fill(~(same & exists[:, None, :]), float("-inf"))
    out_sorted = torch.softmax(s, dim=-1) @ v_c  # (..., n_c, c, d_v)
    # undo the sort
    out = torch.empty_like(v).scatter_(
        -2, order[..., None].expand_as(v), out_sorted.flatten(-3, -2)
    )
    return out, buckets
