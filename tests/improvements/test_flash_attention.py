"""Tests for ``dlabc.improvements.flash_attention``.

The tiled forward pass and the recomputing backward pass must equal PyTorch's
``F.scaled_dot_product_attention`` (output and the gradients of q, k, v) in float64,
causal and not, for many shapes, including lengths the block sizes do not divide and
T_q != T_k; ``gradcheck`` compares the backward with finite differences. The returned
log-sum-exp equals ``torch.logsumexp`` of the masked scores. The online softmax equals
``torch.softmax``; the block counts equal a brute-force count over the causal mask.
``peak_memory`` must see a tensor it allocates. Bad input fails with a clear message.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from dlabc.improvements.flash_attention import (
    count_blocks,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    memory_and_seconds,
    online_softmax,
    peak_memory,
)

SHAPES = [  # (batch dims, T_q, T_k, d, d_v, block_q, block_k)
    ((2, 3), 37, 37, 16, 16, 8, 8),
    ((1,), 100, 100, 32, 32, 32, 16),
    ((2, 1), 19, 45, 8, 12, 4, 16),
    ((1, 4), 64, 30, 16, 8, 16, 64),
    ((), 1, 1, 4, 4, 3, 3),
    ((3,), 50, 50, 8, 8, 64, 64),
    ((2,), 33, 17, 5, 7, 1, 5),
]


def qkv(batch, t_q, t_k, d, d_v, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, t_q, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(*batch, t_k, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(*batch, t_k, d_v, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_equal_sdpa(shape, causal):
    batch, t_q, t_k, d, d_v, b_q, b_k = shape
    q, k, v = qkv(batch, t_q, t_k, d, d_v)
    ours = flash_attention(q, k, v, b_q, b_k, causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    grads_ref = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_lse_is_the_logsumexp_of_the_scores(shape, causal):
    batch, t_q, t_k, d, d_v, b_q, b_k = shape
    q, k, v = qkv(batch, t_q, t_k, d, d_v)
    _, lse = flash_attention_forward(q, k, v, b_q, b_k, causal)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if causal:
        hidden = torch.ones(t_q, t_k, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = qkv((1, 2), 9, 11, 4, 3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, 4, 3, causal), (q, k, v)
    )


def test_float32_agrees_with_sdpa():
    q, k, v = qkv((2, 2), 70, 70, 32, 32, dtype=torch.float32)
    for causal in (False, True):
        ours = flash_attention(q, k, v, 16, 32, causal)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 16, 100, 1000])
@pytest.mark.parametrize("shape", [(5,), (4, 37), (2, 3, 100)])
def test_online_softmax_equals_softmax(shape, chunk):
    x = torch.randn(*shape, dtype=torch.float64) * 50
    torch.testing.assert_close(
        online_softmax(x, chunk), torch.softmax(x, -1), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize(
    "t_q, t_k, b_q, b_k", [(100, 100, 16, 16), (1000, 1000, 128, 128), (30, 70, 8, 5)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_count_blocks_by_brute_force(t_q, t_k, b_q, b_k, causal):
    visible = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    skipped = masked = total = 0
    for q0 in range(0, t_q, b_q):
        for k0 in range(0, t_k, b_k):
            tile = visible[q0 : q0 + b_q, k0 : k0 + b_k]
            total += 1
            skipped += not tile.any()
            masked += bool(tile.any() and not tile.all())
    counts = count_blocks(t_q, t_k, b_q, b_k, causal)
    assert counts == {
        "total": total,
        "computed": total - skipped,
        "skipped": skipped,
        "masked": masked,
    }


def test_causal_square_blocks_closed_form():
    n = 8
    counts = count_blocks(64 * n, 64 * n, 64, 64, True)
    assert counts["computed"] == n * (n + 1) // 2 and counts["masked"] == n


def test_peak_memory_sees_an_allocation():
    n_bytes = 40_000_000
    peak = peak_memory(lambda: torch.ones(n_bytes // 4))
    assert n_bytes * 0.9 < peak < n_bytes * 1.5


@pytest.mark.parametrize("method", ["rss", "profiler"])
def test_both_cpu_methods_see_a_peak_that_was_freed(method):
    """A 40 MB tensor freed before a 20 MB one: the peak is the 40 MB, not the end."""

    def allocate_and_free():
        big = torch.ones(10_000_000)
        del big
        return torch.ones(5_000_000)

    peak = peak_memory(allocate_and_free, method=method)
    # at least the 40 MB; the resident size may also keep the freed 40 MB while the
    # 20 MB are made (the C library decides when freed memory goes back)
    assert 40e6 * 0.9 < peak < 60e6 * 1.2


def test_auto_picks_the_profiler_where_linux_rss_is_missing(monkeypatch):
    """macOS and Windows (simulated): no /proc, so the profiler measures the peak."""
    import dlabc.improvements.flash_attention as fa

    used = []
    monkeypatch.setattr(fa, "_profiled_peak", lambda fn: used.append(fn) or 7)
    for platform in ("darwin", "win32"):
        monkeypatch.setattr(fa.sys, "platform", platform)
        assert not fa._can_reset_peak_rss()
        assert peak_memory(lambda: None) == 7
    assert len(used) == 2
    monkeypatch.undo()
    assert fa._can_reset_peak_rss()  # this test runs on Linux


def test_memory_and_seconds_sees_the_allocation_and_the_wait():
    def slow_allocation():
        x = torch.ones(10_000_000)  # 40 MB
        time.sleep(0.05)
        return x

    peak, seconds = memory_and_seconds(slow_allocation)
    assert 40e6 * 0.9 < peak < 40e6 * 1.5
    assert 0.05 <= seconds < 5


Q = torch.randn(2, 5, 4)
OUT, LSE = flash_attention_forward(Q, Q, Q)
BAD_INPUT = [
    pytest.param(
        lambda: peak_memory(lambda: None, method="vmhwm"),
        ValueError,
        "method must be 'auto', 'rss' or 'profiler'",
        id="memory-method",
    ),
    pytest.param(
        lambda: flash_attention(Q, Q, Q, 0, 4),
        ValueError,
        "block_q must be positive",
        id="block_q-0",
    ),
    pytest.param(
        lambda: flash_attention_forward(Q, Q, Q, 4, -1),
        ValueError,
        "block_k must be positive",
        id="block_k-neg",
    ),
    pytest.param(
        lambda: flash_attention(Q, Q, Q, 2.0, 4),
        TypeError,
        "block_q must be an int",
        id="block_q-float",
    ),
    pytest.param(
        lambda: flash_attention(Q, Q, Q, 2, 4, causal=1),
        TypeError,
        "causal must be a bool",
        id="causal-int",
    ),
    pytest.param(
        lambda: flash_attention(Q.long(), Q, Q),
        TypeError,
        "q must be a floating-point",
        id="q-long",
    ),
    pytest.param(
        lambda: flash_attention(Q, Q.double(), Q),
        TypeError,
        "q, k and v must share one dtype",
        id="qkv-dtypes",
    ),
    pytest.param(
        lambda: flash_attention(Q, torch.randn(2, 5, 3), Q),
        ValueError,
        "q and k must have the same feature size",
        id="k-features",
    ),
    pytest.param(
        lambda: flash_attention(Q, Q, torch.randn(2, 6, 4)),
        ValueError,
        "k and v must have the same length T_k",
        id="v-length",
    ),
    pytest.param(
        lambda: flash_attention(Q, torch.randn(3, 5, 4), torch.randn(3, 5, 4)),
        ValueError,
        "q, k and v must have the same leading",
        id="kv-batch",
    ),
    pytest.param(
        lambda: flash_attention(torch.randn(4), Q, Q),
        ValueError,
        "q must have at least 2 dimensions",
        id="q-1d",
    ),
    pytest.param(
        lambda: flash_attention(Q, [1.0], Q),
        TypeError,
        "k must be a torch.Tensor",
        id="k-list",
    ),
    pytest.param(
        lambda: flash_attention(Q[:, :0], Q, Q),
        ValueError,
        "q and k must hold at least one position",
        id="q-empty",
    ),
    pytest.param(
        lambda: flash_attention_backward(Q, Q, Q, OUT, LSE[..., :-1], OUT),
        ValueError,
        "lse must have shape",
        id="lse-shape",
    ),
    pytest.param(
        lambda: flash_attention_backward(Q, Q, Q, OUT, LSE, OUT[:1]),
        ValueError,
        "grad_out must have shape",
        id="grad_out-shape",
    ),
    pytest.param(
        lambda: flash_attention_backward(Q, Q, Q, OUT.long(), LSE, OUT),
        TypeError,
        "out must be a floating-point",
        id="out-long",
    ),
    pytest.param(
        lambda: flash_attention_backward(Q, Q, Q, OUT, LSE, OUT, causal=None),
        TypeError,
        "causal must be a bool",
        id="backward-causal",
    ),
    pytest.param(
        lambda: online_softmax(Q, 0),
        ValueError,
        "chunk_size must be positive",
        id="chunk_size-0",
    ),
    pytest.param(
        lambda: online_softmax(torch.ones(3, dtype=torch.long), 2),
        TypeError,
        "x must be a floating-point",
        id="x-long",
    ),
    pytest.param(
        lambda: online_softmax(torch.ones(3, 0), 2),
        ValueError,
        "x must have a non-empty last axis",
        id="x-empty",
    ),
    pytest.param(
        lambda: count_blocks(0, 4, 2, 2, False),
        ValueError,
        "t_q must be positive",
        id="t_q-0",
    ),
    pytest.param(
        lambda: count_blocks(4, 4, 2, 2, "yes"),
        TypeError,
        "causal must be a bool",
        id="count-causal",
    ),
    pytest.param(lambda: peak_memory(3), TypeError, "fn must be callable", id="fn-int"),
    pytest.param(
        lambda: peak_memory(lambda: None, "meta"),
        ValueError,
        "device must be a CPU or CUDA",
        id="device-meta",
    ),
    pytest.param(
        lambda: memory_and_seconds(None),
        TypeError,
        "fn must be callable",
        id="timed-fn-none",
    ),
    pytest.param(
        lambda: memory_and_seconds(lambda: None, "meta"),
        ValueError,
        "device must be a CPU or CUDA",
        id="timed-device-meta",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cpu_memory_methods_name_what_this_machine_has(monkeypatch):
    import dlabc.improvements.flash_attention as fa

    assert fa.cpu_memory_methods() == ["rss", "profiler"]  # Linux, here
    monkeypatch.setattr(fa.sys, "platform", "darwin")
    assert fa.cpu_memory_methods() == ["profiler"]
