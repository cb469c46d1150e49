"""Tests for ``dlabc.improvements.efficient_attention``.

The masks equal brute-force loops over (i, j). Block-sparse attention equals
``F.scaled_dot_product_attention`` with the equivalent dense mask (windows, dilation,
BigBird layouts, key padding, global rows) in float64, and its log-sum-exp equals
``torch.logsumexp`` of the masked scores; merging two disjoint halves with
``combine_attention`` equals attention over the union. ``LongformerSelfAttention``
equals Hugging Face's ``LongformerSelfAttention`` with copied weights, with padding and
global tokens. The random features are unbiased (their mean over 2^18 directions is
``exp(x.y)`` within a few standard errors), the orthogonal rows are orthogonal with
Gaussian lengths, and Performer attention equals the explicit kernel formula and
converges to softmax attention. LSH attention equals dense attention with its mask,
and the buckets are invariant to scaling. Bad input fails with a clear message.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.longformer.modeling_longformer import (
    LongformerSelfAttention as HFLongformerSelfAttention,
)

from dlabc.improvements.efficient_attention import (
    SELF_SCORE,
    LongformerSelfAttention,
    bigbird_layout,
    block_sparse_attention,
    combine_attention,
    expand_layout,
    gaussian_orthogonal_random_matrix,
    global_mask,
    lsh_attention,
    lsh_buckets,
    lsh_mask,
    performer_attention,
    positive_random_features,
    window_mask,
)
from transformers import LongformerConfig

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def qkv(batch, t, d, d_v, seed=0, dtype=F64):
    g = gen(seed)
    return (
        torch.randn(*batch, t, d, generator=g, dtype=dtype),
        torch.randn(*batch, t, d, generator=g, dtype=dtype),
        torch.randn(*batch, t, d_v, generator=g, dtype=dtype),
    )


def band(n_blocks, width=1):
    n = torch.arange(n_blocks)
    return (n[:, None] - n[None, :]).abs() <= width


# --- masks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, w, dilation", [(1, 0, 1), (10, 2, 1), (17, 3, 2), (9, 9, 3)]
)
def test_window_mask_by_brute_force(t, w, dilation):
    expected = torch.tensor(
        [
            [abs(i - j) <= w * dilation and (i - j) % dilation == 0 for j in range(t)]
            for i in range(t)
        ]
    )
    assert torch.equal(window_mask(t, w, dilation), expected)


@pytest.mark.parametrize("t, w", [(12, 3), (30, 1)])
def test_window_mask_is_the_bidirectional_sliding_window_of_gqa(t, w):
    from dlabc.improvements.gqa_kv_cache import sliding_window_mask

    assert torch.equal(window_mask(t, w), sliding_window_mask(t, w + 1, causal=False))


def test_global_mask_by_brute_force():
    t, index = 11, torch.tensor([0, 7])
    expected = torch.tensor(
        [[i in (0, 7) or j in (0, 7) for j in range(t)] for i in range(t)]
    )
    assert torch.equal(global_mask(t, index), expected)
    assert not global_mask(t, torch.tensor([], dtype=torch.long)).any()


@pytest.mark.parametrize(
    "n_blocks, n_global, n_window, n_random",
    [(8, 1, 3, 2), (16, 2, 3, 3), (5, 0, 1, 1), (4, 1, 3, 10)],
)
def test_bigbird_layout_has_window_global_and_random_blocks(
    n_blocks, n_global, n_window, n_random
):
    layout = bigbird_layout(n_blocks, n_global, n_window, n_random, gen(3))
    window = band(n_blocks, n_window // 2)
    assert (layout | ~window).all()  # the window is always there
    assert layout[:n_global].all() and layout[:, :n_global].all()
    for row in range(n_global, n_blocks):
        base = window[row] | (torch.arange(n_blocks) < n_global)
        extra = layout[row] & ~base
        assert extra.sum() == min(n_random, int((~base).sum()))
    # the same generator seed gives the same layout, another seed another one
    assert torch.equal(
        layout, bigbird_layout(n_blocks, n_global, n_window, n_random, gen(3))
    )


def test_expand_layout_by_brute_force():
    layout = torch.tensor([[True, False], [False, True]])
    mask = expand_layout(layout, 3)
    for i in range(6):
        for j in range(6):
            assert mask[i, j] == layout[i // 3, j // 3]


# --- block-sparse attention ---------------------------------------------------------


def dense_lse(q, k, mask):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize(
    "batch, t, d, d_v, b",
    [((2, 3), 64, 8, 8, 8), ((1,), 96, 16, 5, 16), ((), 40, 4, 4, 4)],
)
def test_bigbird_block_sparse_equals_dense_with_its_mask(batch, t, d, d_v, b):
    q, k, v = qkv(batch, t, d, d_v)
    layout = bigbird_layout(t // b, 1, 3, 2, gen(1))
    mask = expand_layout(layout, b)
    out, lse = block_sparse_attention(q, k, v, layout, b)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, dense_lse(q, k, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "t, w, dilation", [(64, 4, 1), (96, 4, 2), (60, 5, 3), (32, 16, 1)]
)
def test_dilated_window_block_sparse_equals_dense(t, w, dilation):
    q, k, v = qkv((2, 2), t, 8, 6)
    block = w * dilation
    allowed = lambda i, j: ((i - j).abs() <= block) & ((i - j) % dilation == 0)  # noqa: E731
    out, lse = block_sparse_attention(q, k, v, band(t // block), block, allowed)
    mask = window_mask(t, w, dilation)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, dense_lse(q, k, mask), rtol=1e-12, atol=1e-12)


def test_key_mask_and_global_rows_and_empty_rows():
    t, b = 48, 8
    q, k, v = qkv((2, 3), t, 8, 8)
    layout = band(t // b)
    layout[0, :] = True  # a global (dense) query block
    layout[3, :] = False  # a block of queries that sees nothing
    key_mask = torch.rand(2, 1, t, generator=gen(5)) > 0.3  # per example padding
    key_mask[..., :8] = True
    out, lse = block_sparse_attention(q, k, v, layout, b, key_mask=key_mask)
    mask = expand_layout(layout, b) & key_mask[..., None, :]
    keep = mask.any(-1).expand(2, 3, t)  # rows with at least one key
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-12, atol=1e-12)
    assert (out[~keep] == 0).all() and torch.isinf(lse[~keep]).all()
    torch.testing.assert_close(lse[keep], dense_lse(q, k, mask)[keep])


def test_block_sparse_gradients_equal_dense():
    t, b = 32, 8
    q, k, v = (x.requires_grad_() for x in qkv((1, 2), t, 4, 4))
    layout = bigbird_layout(t // b, 1, 3, 1, gen(2))
    out, _ = block_sparse_attention(q, k, v, layout, b)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=expand_layout(layout, b))
    g_out = torch.randn_like(out)
    for a, r in zip(
        torch.autograd.grad(out, (q, k, v), g_out),
        torch.autograd.grad(ref, (q, k, v), g_out),
        strict=True,
    ):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_combine_attention_is_attention_over_the_union():
    t = 20
    q, k, v = qkv((2,), t, 8, 3)
    half = torch.rand(t, t, generator=gen(7)) > 0.5
    half[:, 0] = True  # every row has a key in the first half
    half[3] = True  # row 3 has none in the second half
    full = torch.ones(t, t, dtype=torch.bool)
    whole = torch.ones(1, 1, dtype=torch.bool)
    a = block_sparse_attention(q, k, v, whole, t, allowed=lambda i, j: half[i, j])
    b = block_sparse_attention(q, k, v, whole, t, allowed=lambda i, j: ~half[i, j])
    out, lse = combine_attention(*a, *b)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, dense_lse(q, k, full), rtol=1e-12, atol=1e-12)


# --- Longformer against Hugging Face -------------------------------------------------


def hf_longformer(d_model, n_heads, window, dtype):
    config = LongformerConfig(
        hidden_size=d_model,
        num_attention_heads=n_heads,
        attention_window=[window],
        num_hidden_layers=1,
        intermediate_size=4 * d_model,
        attention_probs_dropout_prob=0.0,
    )
    return HFLongformerSelfAttention(config, layer_id=0).eval().to(dtype)


def hf_forward(hf, x, real, is_global, window):
    """Pad to a multiple of the window and build HF's float mask, as LongformerModel."""
    t = x.shape[1]
    pad = -t % window
    x = F.pad(x, (0, 0, 0, pad))
    real = F.pad(real, (0, pad), value=False)
    is_global = F.pad(is_global, (0, pad), value=False) & real
    mask = torch.zeros(real.shape, dtype=x.dtype)
    mask[~real] = -10000.0
    mask[is_global] = 10000.0
    with torch.no_grad():
        out = hf(
            x,
            attention_mask=mask,
            is_index_masked=mask < 0,
            is_index_global_attn=mask > 0,
            is_global_attn=bool((mask > 0).any()),
        )[0]
    return out[:, :t]


@pytest.mark.parametrize(
    "batch, t, d_model, n_heads, window, dtype",
    [
        (2, 37, 32, 4, 8, torch.float32),
        (3, 64, 16, 2, 4, F64),
        (1, 100, 24, 3, 16, torch.float32),
        (2, 8, 8, 1, 4, F64),
    ],
)
@pytest.mark.parametrize("with_global", [False, True])
def test_longformer_equals_hugging_face(
    batch, t, d_model, n_heads, window, dtype, with_global
):
    torch.manual_seed(0)
    hf = hf_longformer(d_model, n_heads, window, dtype)
    ours = LongformerSelfAttention(d_model, n_heads, window).to(dtype)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(batch, t, d_model, dtype=dtype)
    real = torch.ones(batch, t, dtype=torch.bool)
    real[0, t - 3 :] = False  # padding in the first example
    is_global = torch.zeros(batch, t, dtype=torch.bool)
    if with_global:
        is_global[:, 0] = True
        is_global[-1, t // 2] = True  # the examples have different numbers
    with torch.no_grad():
        out = ours(x, real, is_global)
    ref = hf_forward(hf, x, real, is_global, window)
    # HF computes its softmax in float32, whatever the dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_longformer_equals_dense_attention_with_the_longformer_mask():
    t, d_model, n_heads, window, dilation = 40, 16, 2, 6, 2
    attn = LongformerSelfAttention(d_model, n_heads, window, dilation).to(F64)
    x = torch.randn(1, t, d_model, dtype=F64)
    index = torch.tensor([0, 13])
    is_global = torch.zeros(1, t, dtype=torch.bool)
    is_global[0, index] = True
    with torch.no_grad():
        out = attn(x, global_attention_mask=is_global)
        split = lambda lin: lin(x).view(1, t, n_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.query), split(attn.key), split(attn.value)
        mask = window_mask(t, window // 2, dilation) | global_mask(t, index)
        local = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        glob = F.scaled_dot_product_attention(
            split(attn.query_global), split(attn.key_global), split(attn.value_global)
        )
    ref = torch.where(is_global[:, None, :, None], glob, local)
    ref = ref.transpose(1, 2).reshape(1, t, d_model)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# --- Performer ---------------------------------------------------------------------


@pytest.mark.parametrize("m, d", [(8, 8), (20, 8), (64, 16), (5, 32)])
def test_orthogonal_random_matrix(m, d):
    omega = gaussian_orthogonal_random_matrix(m, d, generator=gen(), dtype=F64)
    assert omega.shape == (m, d)
    for start in range(0, m, d):
        rows = omega[start : start + d]
        unit = rows / rows.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(len(rows), dtype=F64))


def test_random_rows_are_standard_gaussian_in_distribution():
    # each coordinate has mean 0 and variance 1, whatever the orthogonality
    for orthogonal in (False, True):
        omega = gaussian_orthogonal_random_matrix(
            40_000, 4, orthogonal, generator=gen(1), dtype=F64
        )
        assert omega.mean(0).abs().max() < 0.03
        assert (omega.var(0) - 1).abs().max() < 0.05


@pytest.mark.parametrize("orthogonal", [False, True])
def test_positive_features_are_unbiased(orthogonal):
    g = gen(2)
    d, m = 6, 2**18
    x, y = torch.randn(2, d, generator=g, dtype=F64) * 0.4
    omega = gaussian_orthogonal_random_matrix(m, d, orthogonal, generator=g, dtype=F64)
    terms = positive_random_features(x, omega) * positive_random_features(y, omega) * m
    estimate, std_error = terms.mean(), terms.std() / math.sqrt(m)
    assert abs(estimate - math.exp(x @ y)) < 4 * std_error
    assert (terms > 0).all()  # positive features: every term is positive


def test_stabilised_features_only_change_a_constant():
    x = torch.randn(3, 10, 8, dtype=F64)
    omega = torch.randn(16, 8, dtype=F64)
    plain = positive_random_features(x, omega)
    rows = positive_random_features(x, omega, "row") / plain
    whole = positive_random_features(x, omega, "all") / plain
    torch.testing.assert_close(rows, rows[..., :1].expand_as(rows))
    torch.testing.assert_close(whole, whole[..., :1, :1].expand_as(whole))


@pytest.mark.parametrize(
    "batch, t, d, d_v, m", [((2, 2), 30, 8, 5, 16), ((1,), 7, 4, 4, 64)]
)
def test_performer_equals_the_explicit_kernel_formula(batch, t, d, d_v, m):
    q, k, v = qkv(batch, t, d, d_v)
    omega = gaussian_orthogonal_random_matrix(m, d, generator=gen(), dtype=F64)
    phi_q = positive_random_features(q / d**0.25, omega)
    phi_k = positive_random_features(k / d**0.25, omega)
    kernel = phi_q @ phi_k.transpose(-2, -1)  # (..., T, T), the estimate of exp(s)
    ref = kernel / kernel.sum(-1, keepdim=True) @ v
    torch.testing.assert_close(
        performer_attention(q, k, v, omega), ref, rtol=1e-10, atol=1e-12
    )


def test_performer_converges_to_softmax_attention():
    q, k, v = qkv((2,), 64, 8, 8)
    q, k = q * 0.5, k * 0.5
    ref = F.scaled_dot_product_attention(q, k, v)
    errors = []
    for m in (16, 256, 4096, 65536):
        omega = gaussian_orthogonal_random_matrix(m, 8, generator=gen(m), dtype=F64)
        errors.append((performer_attention(q, k, v, omega) - ref).abs().mean().item())
    assert errors[-1] < errors[0] / 8 and errors[-1] < 2e-3


# --- Reformer ----------------------------------------------------------------------


def test_lsh_buckets_by_brute_force_and_scale_invariance():
    x = torch.randn(3, 50, 8, dtype=F64)
    rotations = torch.randn(8, 4, dtype=F64)
    buckets = lsh_buckets(x, rotations)
    for idx in [(0, 0), (1, 7), (2, 49)]:
        p = x[idx] @ rotations
        assert buckets[idx] == int(torch.argmax(torch.cat([p, -p])))
    assert torch.equal(buckets, lsh_buckets(3.7 * x, rotations))
    assert buckets.min() >= 0 and buckets.max() < 8


def test_lsh_mask_by_brute_force():
    g = gen(4)
    buckets = torch.randint(0, 3, (20,), generator=g)
    c = 4
    order = sorted(range(20), key=lambda i: (int(buckets[i]), i))
    chunk = {pos: rank // c for rank, pos in enumerate(order)}
    expected = torch.tensor(
        [
            [
                bool(buckets[i] == buckets[j]) and chunk[i] - chunk[j] in (0, 1)
                for j in range(20)
            ]
            for i in range(20)
        ]
    )
    assert torch.equal(lsh_mask(buckets, c), expected)


@pytest.mark.parametrize(
    "batch, t, d, n_buckets, c",
    [((2, 3), 64, 8, 4, 8), ((1,), 96, 16, 8, 16), ((), 12, 4, 2, 3)],
)
def test_lsh_attention_equals_dense_with_its_mask(batch, t, d, n_buckets, c):
    qk, _, v = qkv(batch, t, d, 5)
    rotations = torch.randn(d, n_buckets // 2, generator=gen(9), dtype=F64)
    out, buckets = lsh_attention(qk, v, rotations, c)
    keys = qk / qk.norm(dim=-1, keepdim=True)
    s = qk @ keys.transpose(-2, -1) / math.sqrt(d)
    s = torch.where(torch.eye(t, dtype=torch.bool), torch.full_like(s, SELF_SCORE), s)
    s = s.masked_fill(~lsh_mask(buckets, c), float("-inf"))
    torch.testing.assert_close(out, s.softmax(-1) @ v, rtol=1e-12, atol=1e-12)


def test_lsh_attention_with_one_bucket_and_one_chunk_is_full_attention():
    qk, _, v = qkv((2,), 16, 4, 4)
    rotations = torch.zeros(4, 1, dtype=F64)  # every vector in bucket 0
    out, buckets = lsh_attention(qk, v, rotations, 16)
    keys = qk / qk.norm(dim=-1, keepdim=True)
    s = qk @ keys.transpose(-2, -1) / 2
    s = torch.where(torch.eye(16, dtype=torch.bool), torch.full_like(s, SELF_SCORE), s)
    torch.testing.assert_close(out, s.softmax(-1) @ v, rtol=1e-12, atol=1e-12)
    assert (buckets == 0).all()


def test_lsh_attention_handles_an_all_zero_query():
    # a zero vector has no direction: its shared key is zero (not 0/0), so it scores 0
    # against every key, and every query scores 0 against it
    qk, _, v = qkv((2,), 32, 8, 4, seed=7)
    qk[0, 5] = 0.0
    qk[1, :3] = 0.0
    rotations = torch.randn(8, 2, generator=gen(11), dtype=F64)
    out, buckets = lsh_attention(qk, v, rotations, 8)
    assert torch.isfinite(out).all()
    norms = qk.norm(dim=-1, keepdim=True)
    keys = torch.where(norms > 0, qk / norms.clamp_min(1e-300), torch.zeros_like(qk))
    s = qk @ keys.transpose(-2, -1) / math.sqrt(8)
    s = torch.where(torch.eye(32, dtype=torch.bool), torch.full_like(s, SELF_SCORE), s)
    s = s.masked_fill(~lsh_mask(buckets, 8), float("-inf"))
    torch.testing.assert_close(out, s.softmax(-1) @ v, rtol=1e-12, atol=1e-12)
    # one bucket, one chunk: the zero query averages every other value uniformly
    out, _ = lsh_attention(qk, v, torch.zeros(8, 1, dtype=F64), 32)
    others = torch.ones(32, dtype=torch.bool)
    others[5] = False
    torch.testing.assert_close(out[0, 5], v[0, others].mean(0), rtol=1e-12, atol=1e-12)


# --- bad input ---------------------------------------------------------------------

Q, K, V = qkv((1,), 16, 4, 4)
ATTN = LongformerSelfAttention(8, 2, 4)
BAD_INPUT = [
    pytest.param(
        lambda: window_mask(8, -1),
        ValueError,
        "one_sided must be >= 0",
        id="one_sided-neg",
    ),
    pytest.param(
        lambda: window_mask(8, 2, 0),
        ValueError,
        "dilation must be positive",
        id="dilation-0",
    ),
    pytest.param(
        lambda: window_mask(8.0, 2),
        TypeError,
        "seq_len must be an int",
        id="seq_len-float",
    ),
    pytest.param(
        lambda: window_mask(8, 2, device=3),
        TypeError,
        "device must be a str or torch.device",
        id="device-int",
    ),
    pytest.param(
        lambda: global_mask(8, torch.tensor([8])),
        ValueError,
        r"global_index must lie in \[0, 8\)",
        id="global_index-range",
    ),
    pytest.param(
        lambda: global_mask(8, torch.tensor([1.0])),
        TypeError,
        "global_index must hold integer positions",
        id="global_index-float",
    ),
    pytest.param(
        lambda: bigbird_layout(8, n_window=2),
        ValueError,
        "n_window must be odd",
        id="n_window-even",
    ),
    pytest.param(
        lambda: bigbird_layout(8, n_random=-1),
        ValueError,
        "n_random must be >= 0",
        id="n_random-neg",
    ),
    pytest.param(
        lambda: bigbird_layout(0),
        ValueError,
        "n_blocks must be positive",
        id="n_blocks-0",
    ),
    pytest.param(
        lambda: bigbird_layout(8, generator=0),
        TypeError,
        "generator must be a torch.Generator",
        id="bigbird-generator",
    ),
    pytest.param(
        lambda: expand_layout(torch.ones(2, 2), 2),
        TypeError,
        "layout must have dtype torch.bool",
        id="expand-layout-float",
    ),
    pytest.param(
        lambda: block_sparse_attention(Q, K, V, band(3), 5),
        ValueError,
        "multiple of block_size=5",
        id="block_size-divides",
    ),
    pytest.param(
        lambda: block_sparse_attention(Q, K, V, band(3), 4),
        ValueError,
        r"layout must have shape \(4, 4\)",
        id="layout-shape",
    ),
    pytest.param(
        lambda: block_sparse_attention(Q, K[..., :8, :], V, band(4), 4),
        ValueError,
        "q and k must have one shape",
        id="k-length",
    ),
    pytest.param(
        lambda: block_sparse_attention(Q, K, V, band(4), 4, allowed=3),
        TypeError,
        "allowed must be callable",
        id="allowed-int",
    ),
    pytest.param(
        lambda: block_sparse_attention(
            Q, K, V, band(4), 4, key_mask=torch.ones(8, dtype=torch.bool)
        ),
        ValueError,
        "key_mask must be",
        id="key_mask-length",
    ),
    pytest.param(
        lambda: block_sparse_attention(Q, K, V, band(4), 4, key_mask=torch.ones(16)),
        TypeError,
        "key_mask must have dtype torch.bool",
        id="key_mask-float",
    ),
    pytest.param(
        lambda: block_sparse_attention(Q.long(), K, V, band(4), 4),
        TypeError,
        "q must be a floating-point tensor",
        id="q-long",
    ),
    pytest.param(
        lambda: block_sparse_attention(Q, K, V, band(4), 0),
        ValueError,
        "block_size must be positive",
        id="block_size-0",
    ),
    pytest.param(
        lambda: combine_attention(V, V[..., 0], V[..., :2], V[..., 0]),
        ValueError,
        "the two halves must have the same shapes",
        id="halves-shapes",
    ),
    pytest.param(
        lambda: combine_attention(V, V, V, V),
        ValueError,
        "lse must be out without its last axis",
        id="lse-shape",
    ),
    pytest.param(
        lambda: combine_attention(V, V[..., 0], V, V[..., 0].long()),
        TypeError,
        "lse_b must be a floating-point",
        id="lse_b-long",
    ),
    pytest.param(
        lambda: LongformerSelfAttention(8, 2, 3),
        ValueError,
        "attention_window is the whole window",
        id="window-odd",
    ),
    pytest.param(
        lambda: LongformerSelfAttention(9, 2, 4),
        ValueError,
        "not divisible by n_heads",
        id="heads-divide",
    ),
    pytest.param(
        lambda: ATTN(torch.randn(4, 8)),
        ValueError,
        "hidden_states must have 3 dimensions",
        id="hidden_states-2d",
    ),
    pytest.param(
        lambda: ATTN(torch.randn(1, 5, 8), torch.ones(1, 4, dtype=torch.bool)),
        ValueError,
        r"attention_mask must have shape \(1, 5\)",
        id="attention_mask-shape",
    ),
    pytest.param(
        lambda: ATTN(torch.randn(1, 5, 8), None, torch.ones(1, 5)),
        TypeError,
        "global_attention_mask must have dtype",
        id="global_mask-float",
    ),
    pytest.param(
        lambda: gaussian_orthogonal_random_matrix(4, 4, orthogonal=1),
        TypeError,
        "orthogonal must be a bool",
        id="orthogonal-int",
    ),
    pytest.param(
        lambda: gaussian_orthogonal_random_matrix(0, 4),
        ValueError,
        "n_features must be positive",
        id="n_features-0",
    ),
    pytest.param(
        lambda: gaussian_orthogonal_random_matrix(4, 4, dtype=torch.int64),
        TypeError,
        "dtype must be a floating-point dtype",
        id="dtype-int",
    ),
    pytest.param(
        lambda: gaussian_orthogonal_random_matrix(4, 4, generator=1),
        TypeError,
        "generator must be a torch.Generator",
        id="omega-generator",
    ),
    pytest.param(
        lambda: positive_random_features(Q, torch.randn(8, 5)),
        ValueError,
        "x .* and omega .* must share d",
        id="omega-d",
    ),
    pytest.param(
        lambda: positive_random_features(Q, torch.randn(8, 4), "rows"),
        ValueError,
        "stabilize must be None, 'row' or 'all'",
        id="stabilize-str",
    ),
    pytest.param(
        lambda: performer_attention(Q, K[..., :3], V, torch.randn(8, 4)),
        ValueError,
        "q and k must have one shape",
        id="performer-k",
    ),
    pytest.param(
        lambda: lsh_buckets(Q, torch.randn(5, 2)),
        ValueError,
        "x .* and rotations .* must share d",
        id="rotations-d",
    ),
    pytest.param(
        lambda: lsh_attention(Q, V, torch.randn(4, 2), 5),
        ValueError,
        "multiple of chunk_size=5",
        id="chunk_size-divides",
    ),
    pytest.param(
        lambda: lsh_attention(Q, V, torch.randn(4, 2), 0),
        ValueError,
        "chunk_size must be positive",
        id="chunk_size-0",
    ),
    pytest.param(
        lambda: lsh_attention(Q, V[..., :8, :], torch.randn(4, 2), 4),
        ValueError,
        "qk .* and v .* must share",
        id="v-length",
    ),
    pytest.param(
        lambda: lsh_attention(Q, V, torch.randn(5, 2), 4),
        ValueError,
        "x .* and rotations .* must share d",
        id="lsh-rotations-d",
    ),
    pytest.param(
        lambda: lsh_attention(Q, V, torch.randn(4), 4),
        ValueError,
        "rotations must have 2 dimensions",
        id="rotations-1d",
    ),
    pytest.param(
        lambda: lsh_mask(torch.zeros(8), 4),
        TypeError,
        "buckets must have dtype torch.int64",
        id="buckets-float",
    ),
    pytest.param(
        lambda: lsh_mask(torch.zeros(8, dtype=torch.int64), 3),
        ValueError,
        "multiple of chunk_size=3",
        id="mask-chunk_size",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
