"""Tests for ``dlabc.transformers.attention_from_scratch``.

Every function is compared with something written elsewhere: ``torch.softmax``,
``torch.nn.functional.scaled_dot_product_attention``,
``torch.nn.functional.multi_head_attention_forward``, ``torch.tril``, finite differences
(``torch.autograd.gradcheck``) or a closed form (the variance of a dot product).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlabc.transformers.attention_from_scratch import (
    causal_mask,
    check_mask,
    dot_product_statistics,
    expand_mask_for_heads,
    merge_heads,
    multi_head_attention,
    multi_head_attention_loop,
    padding_mask,
    scaled_dot_product_attention,
    softmax,
    softmax_naive,
    split_heads,
)

F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=1e-5, rtol=1e-5)


def random_mask(*shape: int) -> torch.Tensor:
    """A random boolean mask ``(..., T_q, T_k)`` with at least one ``True`` in every row."""
    mask = torch.rand(*shape) < 0.5
    keep = torch.randint(shape[-1], shape[:-1])  # one key each row is sure to see
    return mask | F.one_hot(keep, shape[-1]).bool()


def qkv(batch, t_q, t_k, d_k, d_v, dtype=torch.float64, requires_grad=False):
    q = torch.randn(*batch, t_q, d_k, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(*batch, t_k, d_k, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(*batch, t_k, d_v, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


# --------------------------------------------------------------------------------------------
# softmax


@pytest.mark.parametrize(
    ("shape", "dim"), [((5, 7), -1), ((5, 7), 0), ((3, 4, 6), -1), ((3, 4, 6), 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_matches_torch(shape, dim, dtype):
    x = 3 * torch.randn(shape, dtype=dtype)
    tol = F64 if dtype == torch.float64 else F32
    torch.testing.assert_close(softmax(x, dim=dim), torch.softmax(x, dim=dim), **tol)
    # on small inputs the textbook formula is right too
    torch.testing.assert_close(
        softmax_naive(x, dim=dim), torch.softmax(x, dim=dim), **tol
    )


@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_softmax_is_stable_where_naive_overflows(scale):
    x = scale * (1 + torch.rand(4, 6))  # every entry > 88.7: exp overflows in float32
    naive = softmax_naive(x)
    assert torch.isnan(naive).all()
    stable = softmax(x)
    assert torch.isfinite(stable).all()
    torch.testing.assert_close(stable, torch.softmax(x, dim=-1), **F32)
    torch.testing.assert_close(stable.sum(-1), torch.ones(4), **F32)


def test_softmax_gradient_matches_torch():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad((softmax(x) * upstream).sum(), x)
    (theirs,) = torch.autograd.grad((torch.softmax(x, dim=-1) * upstream).sum(), x)
    torch.testing.assert_close(ours, theirs, **F64)


def test_softmax_gradient_matches_finite_differences():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softmax(t, dim=0), (x,))


def test_softmax_gives_exact_zero_to_minus_inf():
    x = torch.randn(3, 5, dtype=torch.float64)
    hidden = torch.tensor(
        [[1, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.bool
    )  # no row is all hidden
    w = softmax(x.masked_fill(hidden, float("-inf")))
    assert (w[hidden] == 0).all()
    assert (w[~hidden] > 0).all()
    expected = torch.softmax(x.masked_fill(hidden, float("-inf")), dim=-1)
    torch.testing.assert_close(w, expected, **F64)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64), **F64)


# --------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("seq_len", [1, 2, 7])
def test_causal_mask_is_lower_triangle(seq_len):
    mask = causal_mask(seq_len)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.tril(torch.ones(seq_len, seq_len)).bool())


def test_padding_mask_against_loop():
    lengths = torch.tensor([3, 1, 5, 4])
    seq_len = 5
    mask = padding_mask(lengths, seq_len)
    assert mask.shape == (4, 1, seq_len)
    assert mask.dtype == torch.bool
    for b, length in enumerate(lengths.tolist()):
        for t in range(seq_len):
            assert bool(mask[b, 0, t]) == (t < length)


def test_check_mask_accepts_and_returns_broadcastable_masks():
    scores_shape = (2, 3, 4, 5)
    for mask in (causal_mask(5)[:4], random_mask(2, 1, 4, 5), random_mask(1, 5)):
        assert check_mask(mask, scores_shape) is mask


# --------------------------------------------------------------------------------------------
# scaled dot-product attention


SDPA_SHAPES = [  # batch dims, T_q, T_k, d_k, d_v
    ((), 4, 4, 8, 8),
    ((3,), 5, 7, 4, 6),
    ((2, 3), 6, 6, 8, 3),
    ((2, 2), 3, 9, 5, 5),
]


def check_weights(out, weights, v, mask=None):
    """The returned weights are a distribution per query, zero where masked, and give the output."""
    ones = torch.ones(weights.shape[:-1], dtype=weights.dtype)
    torch.testing.assert_close(weights.sum(-1), ones, **F64)
    assert (weights >= 0).all()
    if mask is not None:
        assert (weights[~mask.expand_as(weights)] == 0).all()
    torch.testing.assert_close(weights @ v, out, **F64)


@pytest.mark.parametrize(("batch", "t_q", "t_k", "d_k", "d_v"), SDPA_SHAPES)
def test_sdpa_without_mask_matches_torch(batch, t_q, t_k, d_k, d_v):
    q, k, v = qkv(batch, t_q, t_k, d_k, d_v)
    out, weights = scaled_dot_product_attention(q, k, v)
    assert out.shape == (*batch, t_q, d_v)
    assert weights.shape == (*batch, t_q, t_k)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **F64)
    check_weights(out, weights, v)


@pytest.mark.parametrize(("batch", "t_q", "t_k", "d_k", "d_v"), SDPA_SHAPES)
def test_sdpa_with_random_mask_matches_torch(batch, t_q, t_k, d_k, d_v):
    q, k, v = qkv(batch, t_q, t_k, d_k, d_v)
    mask = random_mask(*batch, t_q, t_k)
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, **F64)
    check_weights(out, weights, v, mask)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_sdpa_with_causal_mask_matches_torch(batch):
    q, k, v = qkv(batch, 6, 6, 4, 5)
    mask = causal_mask(6)
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, is_causal=True), **F64
    )
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **F64
    )
    check_weights(out, weights, v, mask)
    # position i only sees 0..i: the first query copies the first value
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :], **F64)


def test_sdpa_with_padding_mask_matches_torch():
    batch, heads, t = 3, 2, 5
    q, k, v = qkv((batch, heads), t, t, 4, 4)
    lengths = torch.tensor([5, 2, 3])
    mask = padding_mask(lengths, t).unsqueeze(
        1
    )  # (B, 1, 1, T): the same for every head
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **F64
    )
    check_weights(out, weights, v, mask)
    # padded keys change nothing: attending over the first `length` keys alone gives the same
    for b, length in enumerate(lengths.tolist()):
        expected = F.scaled_dot_product_attention(
            q[b], k[b, :, :length], v[b, :, :length]
        )
        torch.testing.assert_close(out[b], expected, **F64)


def test_sdpa_float32_matches_torch():
    q, k, v = qkv((2,), 5, 6, 8, 4, dtype=torch.float32)
    mask = random_mask(2, 5, 6)
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **F32
    )


@pytest.mark.parametrize("use_mask", [False, True])
def test_sdpa_gradients_match_torch(use_mask):
    q, k, v = qkv((2,), 4, 5, 3, 6, requires_grad=True)
    mask = random_mask(2, 4, 5) if use_mask else None
    upstream = torch.randn(2, 4, 6, dtype=torch.float64)
    ours = torch.autograd.grad(
        (scaled_dot_product_attention(q, k, v, mask)[0] * upstream).sum(), (q, k, v)
    )
    theirs = torch.autograd.grad(
        (F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * upstream).sum(),
        (q, k, v),
    )
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_sdpa_gradients_match_finite_differences():
    q, k, v = qkv((), 3, 4, 2, 3, requires_grad=True)
    mask = random_mask(3, 4)
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, mask)[0], (q, k, v)
    )


# --------------------------------------------------------------------------------------------
# heads


@pytest.mark.parametrize(("d_model", "n_heads"), [(8, 1), (8, 2), (12, 3), (12, 12)])
def test_split_and_merge_heads(d_model, n_heads):
    x = torch.randn(2, 5, d_model, dtype=torch.float64)
    heads = split_heads(x, n_heads)
    d_head = d_model // n_heads
    assert heads.shape == (2, n_heads, 5, d_head)
    for i in range(n_heads):
        assert torch.equal(heads[:, i], x[..., i * d_head : (i + 1) * d_head])
    assert torch.equal(merge_heads(heads), x)
    y = torch.randn(2, n_heads, 5, d_head)
    assert torch.equal(split_heads(merge_heads(y), n_heads), y)


@pytest.mark.parametrize(
    ("shape", "expanded"),
    [((5, 6), (1, 5, 6)), ((3, 1, 6), (3, 1, 1, 6)), ((3, 5, 6), (3, 1, 5, 6))],
)
def test_expand_mask_for_heads(shape, expanded):
    mask = random_mask(*shape)
    out = expand_mask_for_heads(mask)
    assert out.shape == expanded
    n_heads = 4
    target = (3, n_heads, 5, 6)
    # every head sees the original mask
    broadcast = out.expand(target)
    for h in range(n_heads):
        assert torch.equal(broadcast[:, h], mask.expand(3, 5, 6))


def test_expand_mask_for_heads_passes_none():
    assert expand_mask_for_heads(None) is None


def test_expand_mask_for_heads_accepts_a_key_mask():
    """A ``(T_k,)`` mask broadcasts to ``(B, T_q, T_k)``, as the docstring allows, so it must work."""
    mask = torch.tensor([True, True, False])
    out = expand_mask_for_heads(mask)
    assert torch.equal(out.expand(2, 4, 5, 3), mask.expand(2, 4, 5, 3))


# --------------------------------------------------------------------------------------------
# multi-head attention against torch.nn.functional.multi_head_attention_forward


def mha_weights(d_model, dtype=torch.float64):
    scale = 1 / math.sqrt(d_model)
    return [scale * torch.randn(d_model, d_model, dtype=dtype) for _ in range(4)]


def torch_mha(
    x_q, x_kv, W_q, W_k, W_v, W_o, n_heads, attn_mask=None, key_padding_mask=None
):
    """PyTorch's functional multi-head attention, with our mask convention (True = may attend)."""
    d_model = x_q.shape[-1]
    out, weights = F.multi_head_attention_forward(
        x_q.transpose(0, 1),  # (T, B, E)
        x_kv.transpose(0, 1),
        x_kv.transpose(0, 1),
        d_model,
        n_heads,
        in_proj_weight=torch.cat([W_q.T, W_k.T, W_v.T]),  # F.linear computes x @ W.T
        in_proj_bias=None,
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=W_o.T,
        out_proj_bias=None,
        training=False,
        key_padding_mask=None
        if key_padding_mask is None
        else ~key_padding_mask,  # True = ignore
        need_weights=True,
        attn_mask=None if attn_mask is None else ~attn_mask,  # True = not allowed
        average_attn_weights=False,
    )
    return out.transpose(0, 1), weights


MHA_FUNCTIONS = [multi_head_attention, multi_head_attention_loop]


@pytest.mark.parametrize("mha", MHA_FUNCTIONS)
@pytest.mark.parametrize(("d_model", "n_heads"), [(8, 1), (8, 2), (12, 4)])
def test_mha_self_attention_causal_matches_torch(mha, d_model, n_heads):
    B, T = 2, 5
    x = torch.randn(B, T, d_model, dtype=torch.float64)
    W = mha_weights(d_model)
    mask = causal_mask(T)
    out, weights = mha(x, x, *W, n_heads, mask)
    ref_out, ref_weights = torch_mha(x, x, *W, n_heads, attn_mask=mask)
    assert out.shape == (B, T, d_model)
    assert weights.shape == (B, n_heads, T, T)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)
    assert (weights[..., ~mask] == 0).all()


@pytest.mark.parametrize("mha", MHA_FUNCTIONS)
def test_mha_without_mask_matches_torch(mha):
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    W = mha_weights(6)
    out, weights = mha(x, x, *W, 3)
    ref_out, ref_weights = torch_mha(x, x, *W, 3)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)


@pytest.mark.parametrize("mha", MHA_FUNCTIONS)
@pytest.mark.parametrize(("t_q", "t_k"), [(3, 7), (6, 2)])
def test_mha_cross_attention_matches_torch(mha, t_q, t_k):
    B, d_model, n_heads = 2, 8, 2
    x_q = torch.randn(B, t_q, d_model, dtype=torch.float64)
    x_kv = torch.randn(B, t_k, d_model, dtype=torch.float64)
    W = mha_weights(d_model)
    out, weights = mha(x_q, x_kv, *W, n_heads)
    ref_out, ref_weights = torch_mha(x_q, x_kv, *W, n_heads)
    assert out.shape == (B, t_q, d_model)
    assert weights.shape == (B, n_heads, t_q, t_k)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)


@pytest.mark.parametrize("mha", MHA_FUNCTIONS)
def test_mha_padding_matches_torch(mha):
    B, t_q, t_k, d_model, n_heads = 3, 4, 6, 8, 4
    x_q = torch.randn(B, t_q, d_model, dtype=torch.float64)
    x_kv = torch.randn(B, t_k, d_model, dtype=torch.float64)
    W = mha_weights(d_model)
    pad = padding_mask(torch.tensor([6, 2, 4]), t_k)  # (B, 1, T_k)
    out, weights = mha(x_q, x_kv, *W, n_heads, pad)
    ref_out, ref_weights = torch_mha(x_q, x_kv, *W, n_heads, key_padding_mask=pad[:, 0])
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)
    assert (weights[1, :, :, 2:] == 0).all()


@pytest.mark.parametrize("mha", MHA_FUNCTIONS)
def test_mha_causal_and_padding_matches_torch(mha):
    B, T, d_model, n_heads = 3, 5, 6, 2
    x = torch.randn(B, T, d_model, dtype=torch.float64)
    W = mha_weights(d_model)
    pad = padding_mask(torch.tensor([5, 3, 1]), T)  # (B, 1, T)
    causal = causal_mask(T)
    out, weights = mha(x, x, *W, n_heads, causal & pad)  # (B, T, T)
    ref_out, ref_weights = torch_mha(
        x, x, *W, n_heads, attn_mask=causal, key_padding_mask=pad[:, 0]
    )
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)


@pytest.mark.parametrize("mha", MHA_FUNCTIONS)
def test_mha_per_example_mask_matches_torch(mha):
    B, T, d_model, n_heads = 2, 4, 8, 2
    x = torch.randn(B, T, d_model, dtype=torch.float64)
    W = mha_weights(d_model)
    mask = random_mask(B, T, T)
    out, weights = mha(x, x, *W, n_heads, mask)
    # PyTorch wants a 3-D attn_mask as (B * n_heads, T_q, T_k)
    ref_out, ref_weights = torch_mha(
        x, x, *W, n_heads, attn_mask=mask.repeat_interleave(n_heads, dim=0)
    )
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)


def test_mha_float32_matches_torch_and_loop():
    x = torch.randn(2, 5, 8)
    W = mha_weights(8, torch.float32)
    mask = causal_mask(5)
    out, weights = multi_head_attention(x, x, *W, 2, mask)
    loop_out, loop_weights = multi_head_attention_loop(x, x, *W, 2, mask)
    ref_out, ref_weights = torch_mha(x, x, *W, 2, attn_mask=mask)
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(weights, ref_weights, **F32)
    torch.testing.assert_close(loop_out, out, **F32)
    torch.testing.assert_close(loop_weights, weights, **F32)


def test_mha_gradients_match_torch():
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    W = [w.requires_grad_() for w in mha_weights(6)]
    mask = causal_mask(4)
    upstream = torch.randn(2, 4, 6, dtype=torch.float64)
    ours = torch.autograd.grad(
        (multi_head_attention(x, x, *W, 3, mask)[0] * upstream).sum(), (x, *W)
    )
    theirs = torch.autograd.grad(
        (torch_mha(x, x, *W, 3, attn_mask=mask)[0] * upstream).sum(), (x, *W)
    )
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_mha_key_mask_loop_and_vectorised_agree():
    """A ``(T_k,)`` mask broadcasts to ``(B, T_q, T_k)``; both versions must accept it alike."""
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    W = mha_weights(8)
    mask = torch.tensor([True, False, True, True])
    loop_out, loop_weights = multi_head_attention_loop(x, x, *W, 2, mask)
    ref_out, _ = torch_mha(x, x, *W, 2, key_padding_mask=mask.expand(2, 4))
    torch.testing.assert_close(loop_out, ref_out, **F64)
    out, weights = multi_head_attention(x, x, *W, 2, mask)
    torch.testing.assert_close(out, loop_out, **F64)
    torch.testing.assert_close(weights, loop_weights, **F64)


# --------------------------------------------------------------------------------------------
# why the scores are divided by sqrt(d_k)


@pytest.mark.parametrize("d_k", [4, 64, 256])
def test_dot_product_variance_matches_closed_form(d_k):
    g = torch.Generator().manual_seed(1)
    unscaled = dot_product_statistics(d_k, n_samples=4000, scaled=False, generator=g)
    scaled = dot_product_statistics(d_k, n_samples=4000, scaled=True, generator=g)
    # q . k with i.i.d. N(0, 1) entries has variance d_k; dividing by sqrt(d_k) makes it 1
    assert unscaled["score_variance"] == pytest.approx(d_k, rel=0.1)
    assert scaled["score_variance"] == pytest.approx(1.0, rel=0.1)
    for stats in (unscaled, scaled):
        assert 1 / 16 <= stats["max_weight"] <= 1


def test_dot_product_max_weight_grows_with_d_k_when_unscaled():
    g = torch.Generator().manual_seed(2)
    max_weights = [
        dot_product_statistics(d_k, n_samples=2000, scaled=False, generator=g)[
            "max_weight"
        ]
        for d_k in (1, 16, 256)
    ]
    assert max_weights[0] < max_weights[1] < max_weights[2]
    assert max_weights[2] > 0.9  # saturated: one key takes nearly everything
    scaled = dot_product_statistics(256, n_samples=2000, generator=g)["max_weight"]
    assert scaled < 0.6


def test_dot_product_statistics_reproducible_and_keys():
    a = dot_product_statistics(
        8, n_keys=5, n_samples=300, generator=torch.Generator().manual_seed(3)
    )
    b = dot_product_statistics(
        8, n_keys=5, n_samples=300, generator=torch.Generator().manual_seed(3)
    )
    c = dot_product_statistics(
        8, n_keys=5, n_samples=300, generator=torch.Generator().manual_seed(4)
    )
    assert a == b
    assert a != c
    assert set(a) == {"score_variance", "max_weight", "gradient_norm"}
    assert 1 / 5 <= a["max_weight"] <= 1
    # one key: it always takes all the weight
    assert dot_product_statistics(8, n_keys=1, n_samples=50)[
        "max_weight"
    ] == pytest.approx(1.0)


def test_dot_product_statistics_gradient_norm_is_the_softmax_jacobian():
    """The reported gradient size equals the norm of autograd's Jacobian of torch.softmax."""
    d_k, n_keys, n = 16, 6, 40
    stats = dot_product_statistics(
        d_k, n_keys, n, scaled=True, generator=torch.Generator().manual_seed(7)
    )
    g = torch.Generator().manual_seed(7)  # the same draws as inside the function
    q = torch.randn(n, 1, d_k, generator=g)
    k = torch.randn(n, n_keys, d_k, generator=g)
    scores = (q @ k.transpose(-2, -1)).squeeze(1) / d_k**0.5
    norms = [
        torch.autograd.functional.jacobian(lambda x: torch.softmax(x, -1), row).norm()
        for row in scores
    ]
    assert stats["gradient_norm"] == pytest.approx(
        torch.stack(norms).mean().item(), rel=1e-5
    )
    # saturated (one key takes everything) passes no gradient; unscaled wide scores come close
    wide = dot_product_statistics(
        1024, 16, 500, scaled=False, generator=torch.Generator().manual_seed(1)
    )
    assert wide["gradient_norm"] < 0.5 * stats["gradient_norm"]


# --------------------------------------------------------------------------------------------
# bad input: every public entry point names the argument it rejects

_Q, _K, _V = qkv((2,), 3, 4, 5, 6)
_X = torch.randn(2, 5, 8)
_W = mha_weights(8, torch.float32)
_BOOL = dict(dtype=torch.bool)


def _one_query_sees_nothing() -> torch.Tensor:
    mask = causal_mask(4).clone()
    mask[2] = False
    return mask


def _mha_rows(mha, name):
    x, W = _X, _W
    rows = [
        (lambda: mha(x.tolist(), x, *W, 2), TypeError, "x_q must be a torch.Tensor"),
        (lambda: mha(x, x.long(), *W, 2), TypeError, "x_kv must be a floating-point"),
        (lambda: mha(x[0], x, *W, 2), ValueError, "x_q must have 3 dimensions"),
        (lambda: mha(x, x[:1], *W, 2), ValueError, "x_kv .* must share batch size"),
        (lambda: mha(x, torch.randn(2, 5, 6), *W, 2), ValueError, "x_kv .* d_model"),
        (
            lambda: mha(x, x, W[0], W[1][:, :4], W[2], W[3], 2),
            ValueError,
            r"W_k must have shape \(d_model, d_model\)",
        ),
        (lambda: mha(x, x, *W[:3], W[3][None], 2), ValueError, "W_o must have 2 dim"),
        (
            lambda: mha(x, x, W[0], W[1], W[2].long(), W[3], 2),
            TypeError,
            "W_v must be a floating-point tensor",
        ),
        (lambda: mha(x, x, W[0].tolist(), *W[1:], 2), TypeError, "W_q must be a torch"),
        (lambda: mha(x, x, *W, 0), ValueError, "n_heads must be positive"),
        (lambda: mha(x, x, *W, True), TypeError, "n_heads must be an int"),
        (lambda: mha(x, x, *W, 2.0), TypeError, "n_heads must be an int"),
        (lambda: mha(x, x, *W, 3), ValueError, "d_model=8 is not divisible by n_heads"),
        (lambda: mha(x, x, *W, 2, torch.ones(5, 5)), TypeError, "mask must have dtype"),
        (
            lambda: mha(x, x, *W, 2, torch.ones(4, 5, **_BOOL)),
            ValueError,
            "mask .* does not broadcast",
        ),
        (
            lambda: mha(x, x, *W, 2, torch.zeros(5, 5, **_BOOL)),
            ValueError,
            "mask hides every key",
        ),
    ]
    return [
        pytest.param(call, error, match, id=f"{name}-{i}")
        for i, (call, error, match) in enumerate(rows)
    ]


BAD_INPUT = [
    *(
        pytest.param(
            lambda fn=fn: fn([1.0, 2.0]),
            TypeError,
            "x must be a torch",
            id=f"{fn.__name__}-list",
        )
        for fn in (softmax, softmax_naive)
    ),
    *(
        pytest.param(
            lambda fn=fn: fn(torch.arange(5)),
            TypeError,
            "x must be a floating",
            id=f"{fn.__name__}-int",
        )
        for fn in (softmax, softmax_naive)
    ),
    pytest.param(
        lambda: causal_mask(0), ValueError, "seq_len must be positive", id="causal-0"
    ),
    pytest.param(
        lambda: causal_mask(3.0), TypeError, "seq_len must be an int", id="causal-float"
    ),
    pytest.param(
        lambda: causal_mask(True), TypeError, "seq_len must be an int", id="causal-bool"
    ),
    pytest.param(
        lambda: padding_mask([2, 3], 4),
        TypeError,
        "lengths must be a torch",
        id="pad-list",
    ),
    pytest.param(
        lambda: padding_mask(torch.tensor([2.0, 3.0]), 4),
        TypeError,
        "lengths must be an integer",
        id="pad-float",
    ),
    pytest.param(
        lambda: padding_mask(torch.tensor([True, True]), 4),
        TypeError,
        "lengths must be an integer",
        id="pad-bool",
    ),
    pytest.param(
        lambda: padding_mask(torch.tensor([[2, 3]]), 4),
        ValueError,
        "lengths must have 1 dim",
        id="pad-2d",
    ),
    pytest.param(
        lambda: padding_mask(torch.tensor([2, 5]), 4),
        ValueError,
        r"lengths must lie in 1\.\.4",
        id="pad-long",
    ),
    pytest.param(
        lambda: padding_mask(torch.tensor([0, 3]), 4),
        ValueError,
        r"lengths must lie in 1\.\.4",
        id="pad-empty",
    ),
    pytest.param(
        lambda: padding_mask(torch.tensor([1]), 0),
        ValueError,
        "seq_len must be positive",
        id="pad-seq_len",
    ),
    pytest.param(
        lambda: check_mask(torch.ones(3, 3), (3, 3)),
        TypeError,
        "mask must have dtype torch.bool",
        id="mask-float",
    ),
    pytest.param(
        lambda: check_mask([[True]], (1, 1)),
        TypeError,
        "mask must be a torch.Tensor",
        id="mask-list",
    ),
    pytest.param(
        lambda: check_mask(torch.ones(3, 4, **_BOOL), (2, 3, 5)),
        ValueError,
        "mask .* does not broadcast",
        id="mask-shape",
    ),
    pytest.param(  # broadcasts with the scores, but to a larger shape than theirs
        lambda: check_mask(torch.ones(2, 3, 5, **_BOOL), (1, 3, 5)),
        ValueError,
        "mask .* does not broadcast",
        id="mask-larger",
    ),
    pytest.param(
        lambda: check_mask(torch.ones(1, 1, 3, 3, **_BOOL), (2, 3, 3)),
        ValueError,
        "mask .* more dimensions than the scores",
        id="mask-ndim",
    ),
    pytest.param(
        lambda: check_mask(_one_query_sees_nothing(), (4, 4)),
        ValueError,
        "mask hides every key",
        id="mask-empty-row",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q.tolist(), _K, _V),
        TypeError,
        "q must be a torch.Tensor",
        id="sdpa-q-list",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q, _K.long(), _V),
        TypeError,
        "k must be a floating",
        id="sdpa-k-long",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q, _K, _V.int()),
        TypeError,
        "v must be a floating",
        id="sdpa-v-int",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(torch.randn(5), _K, _V),
        ValueError,
        "q must have at least 2",
        id="sdpa-q-1d",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q, _K, torch.randn(6)),
        ValueError,
        "v must have at least 2",
        id="sdpa-v-1d",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q, _K[..., :4], _V),
        ValueError,
        "q and k must have the same feature size d_k",
        id="sdpa-d_k",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q, _K, _V[:, :3]),
        ValueError,
        "k and v must have the same length",
        id="sdpa-T_k",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q, _K, _V, torch.ones(3, 4)),
        TypeError,
        "mask must have dtype",
        id="sdpa-mask-float",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q, _K, _V, torch.ones(4, 3, **_BOOL)),
        ValueError,
        "mask .* does not broadcast",
        id="sdpa-mask-shape",
    ),
    pytest.param(
        lambda: scaled_dot_product_attention(_Q, _K, _V, torch.zeros(3, 4, **_BOOL)),
        ValueError,
        "mask hides every key",
        id="sdpa-mask-empty",
    ),
    pytest.param(
        lambda: split_heads(_X.tolist(), 2),
        TypeError,
        "x must be a torch.Tensor",
        id="split-list",
    ),
    pytest.param(
        lambda: split_heads(_X[0], 2),
        ValueError,
        "x must have 3 dimensions",
        id="split-2d",
    ),
    pytest.param(
        lambda: split_heads(_X, 0), ValueError, "n_heads must be positive", id="split-0"
    ),
    pytest.param(
        lambda: split_heads(_X, True),
        TypeError,
        "n_heads must be an int",
        id="split-bool",
    ),
    pytest.param(
        lambda: split_heads(_X, 3),
        ValueError,
        "d_model=8 is not divisible by n_heads=3",
        id="split-3",
    ),
    pytest.param(
        lambda: merge_heads(None),
        TypeError,
        "x must be a torch.Tensor",
        id="merge-none",
    ),
    pytest.param(
        lambda: merge_heads(_X), ValueError, "x must have 4 dimensions", id="merge-3d"
    ),
    pytest.param(
        lambda: expand_mask_for_heads(torch.ones(2, 1, 3, 3, **_BOOL)),
        ValueError,
        r"mask must broadcast to \(batch, T_q, T_k\)",
        id="expand-4d",
    ),
    pytest.param(
        lambda: expand_mask_for_heads(torch.ones(3, 3)),
        TypeError,
        "mask must have dtype",
        id="expand-float",
    ),
    pytest.param(
        lambda: expand_mask_for_heads([[True]]),
        TypeError,
        "mask must be a torch.Tensor",
        id="expand-list",
    ),
    *_mha_rows(multi_head_attention_loop, "mha-loop"),
    *_mha_rows(multi_head_attention, "mha"),
    pytest.param(
        lambda: dot_product_statistics(0),
        ValueError,
        "d_k must be positive",
        id="stats-d_k-0",
    ),
    pytest.param(
        lambda: dot_product_statistics(4.0),
        TypeError,
        "d_k must be an int",
        id="stats-d_k-float",
    ),
    pytest.param(
        lambda: dot_product_statistics(4, n_keys=True),
        TypeError,
        "n_keys must be an int",
        id="stats-n_keys",
    ),
    pytest.param(
        lambda: dot_product_statistics(4, n_samples=-1),
        ValueError,
        "n_samples must be positive",
        id="stats-n_samples",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
