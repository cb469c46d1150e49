"""Tests for ``dlabc.improvements.rope_alibi``.

RoPE is compared with Hugging Face Llama's ``LlamaRotaryEmbedding`` and
``apply_rotary_pos_emb`` built from a tiny ``LlamaConfig`` (same layout, same
frequencies), and the paper's interleaved layout with the block-diagonal rotation matrix
$R_{\\Theta, p}$ of Su et al. written out entry by entry; the two layouts agree
after permuting the features. The relative property is checked directly: the score of a
rotated query and key depends only on the difference of their positions. ALiBi's slopes
are compared with the paper's closed form for 8 and 16 heads and with BLOOM's
``build_alibi_tensor`` for every head count from 1 to 40; the bias with the same softmax
as BLOOM's (which adds $m\\,j$ and relies on the softmax's shift invariance). The
attention layer is compared with a loop over heads and with ``nn.MultiheadAttention``
(no positions), the model for causality and shapes. Bad input must fail clearly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from dlabc.decoder import DecoderBlock
from dlabc.improvements.gqa_kv_cache import LayerKVCache
from dlabc.improvements.rope_alibi import (
    CausalSelfAttention,
    PositionLM,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_interleaved,
    interleaved_to_half,
    lm_loss,
    loss_by_position,
    rope_cos_sin,
    rope_frequencies,
    rotate_half,
)
from transformers import LlamaConfig


def _hf_rope(d_head: int, n_heads: int, base: float) -> LlamaRotaryEmbedding:
    config = LlamaConfig(
        hidden_size=d_head * n_heads,
        num_attention_heads=n_heads,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=11,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )
    return LlamaRotaryEmbedding(config)


def _rotation_matrix(p: int, d: int, base: float) -> torch.Tensor:
    """Su et al.: 2 x 2 rotation blocks on the diagonal, adjacent pairs."""
    R = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d // 2):
        angle = p * base ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        R[2 * i, 2 * i], R[2 * i, 2 * i + 1] = c, -s
        R[2 * i + 1, 2 * i], R[2 * i + 1, 2 * i + 1] = s, c
    return R


# ------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize(("d_head", "base"), [(2, 10000.0), (8, 10000.0), (32, 500.0)])
def test_rope_frequencies_match_the_formula_and_llama(d_head, base):
    theta = rope_frequencies(d_head, base)
    expected = [base ** (-2 * i / d_head) for i in range(d_head // 2)]
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(theta, expected, rtol=1e-12, atol=0)
    hf = _hf_rope(d_head, 2, base).inv_freq
    torch.testing.assert_close(theta.float(), hf, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("batch", "n_heads", "length", "d_head", "base", "offset"),
    [
        (1, 1, 1, 2, 10000.0, 0),
        (2, 4, 7, 16, 10000.0, 0),
        (3, 2, 20, 8, 500.0, 5),
        (2, 3, 33, 64, 10000.0, 100),
    ],
)
def test_apply_rope_matches_hf_llama(batch, n_heads, length, d_head, base, offset):
    q = torch.randn(batch, n_heads, length, d_head)
    k = torch.randn(batch, n_heads, length, d_head)
    position_ids = torch.arange(offset, offset + length).expand(batch, length)
    cos_hf, sin_hf = _hf_rope(d_head, n_heads, base)(q, position_ids)  # (B, T, d)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = rope_cos_sin(length, d_head, base, offset=offset)  # (T, d)
    tol = dict(atol=2e-5 * (1 + offset + length) / 10, rtol=1e-5)  # float32 angles
    torch.testing.assert_close(cos.expand(batch, -1, -1), cos_hf, **tol)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_hf, **tol)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_hf, **tol)
    # positions given per example: the (B, T) form
    cos_b, sin_b = rope_cos_sin(position_ids, d_head, base)  # (B, T, d)
    torch.testing.assert_close(apply_rope(q, cos_b, sin_b), q_hf, **tol)


def test_rope_cos_sin_with_a_length_equals_explicit_positions():
    cos, sin = rope_cos_sin(9, 6, offset=3, dtype=torch.float64)
    cos2, sin2 = rope_cos_sin(torch.arange(3, 12), 6, dtype=torch.float64)
    torch.testing.assert_close(cos, cos2, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin2, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("length", "d_head", "base"), [(5, 4, 10000.0), (12, 10, 50.0)]
)
def test_interleaved_rope_is_the_papers_rotation_matrix(length, d_head, base):
    x = torch.randn(2, length, d_head, dtype=torch.float64)
    out = apply_rope_interleaved(x, torch.arange(length), base)
    for p in range(length):
        R = _rotation_matrix(p, d_head, base)
        torch.testing.assert_close(out[:, p], x[:, p] @ R.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d_head", [2, 8, 24])
def test_the_two_layouts_differ_by_a_permutation(d_head):
    perm = interleaved_to_half(d_head)
    assert sorted(perm.tolist()) == list(range(d_head))
    x = torch.randn(1, 3, 11, d_head, dtype=torch.float64)
    paper = apply_rope_interleaved(x, torch.arange(11))
    cos, sin = rope_cos_sin(11, d_head, dtype=torch.float64)
    half = apply_rope(x[..., perm], cos, sin)
    torch.testing.assert_close(paper[..., perm], half, rtol=0, atol=1e-12)


def test_rotate_half_is_a_quarter_turn_of_each_pair():
    x = torch.randn(3, 10, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.tensor([0]), 10, dtype=torch.float64)
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x, rtol=0, atol=0)
    assert torch.all(cos == 1) and torch.all(sin == 0)  # position 0: no rotation
    torch.testing.assert_close((x * rotate_half(x)).sum(-1), torch.zeros(3).double())


@pytest.mark.parametrize(("d_head", "base"), [(8, 10000.0), (16, 100.0)])
def test_rope_scores_depend_only_on_the_offset(d_head, base):
    q, k = torch.randn(2, d_head, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(torch.tensor([m, n]), d_head, base, dtype=torch.float64)
        q_m = apply_rope(q.expand(1, 1, 1, -1), cos[None, :1], sin[None, :1])
        k_n = apply_rope(k.expand(1, 1, 1, -1), cos[None, 1:], sin[None, 1:])
        return (q_m * k_n).sum()

    for m, n in [(0, 0), (3, 1), (10, 7), (40, 2)]:
        for shift in (1, 17, 250):
            torch.testing.assert_close(
                score(m, n), score(m + shift, n + shift), rtol=0, atol=1e-10
            )
    # and it does depend on the offset, and rotations keep norms
    assert not torch.isclose(score(3, 1), score(1, 3))


def test_rope_keeps_the_norm():
    x = torch.randn(2, 3, 50, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(50, 16, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


# ------------------------------------------------------------------------ ALiBi


@pytest.mark.parametrize("n_heads", [8, 16])
def test_alibi_slopes_closed_form(n_heads):
    start = 2 ** (-8 / n_heads)  # the first slope, also the ratio
    expected = torch.tensor([start**k for k in range(1, n_heads + 1)])
    torch.testing.assert_close(alibi_slopes(n_heads), expected, rtol=1e-6, atol=0)
    if n_heads == 8:
        assert alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]


@pytest.mark.parametrize("n_heads", range(1, 41))
def test_alibi_slopes_match_bloom(n_heads):
    # BLOOM's (B * h, 1, T) tensor holds slope * key position; position 1 is the slope
    bloom = build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(n_heads), bloom, rtol=1e-6, atol=0)


def test_alibi_slopes_for_twelve_heads_follow_the_papers_rule():
    eight = [2.0 ** (-k) for k in range(1, 9)]
    sixteen_odd = [2.0 ** (-k / 2) for k in (1, 3, 5, 7)]
    torch.testing.assert_close(
        alibi_slopes(12), torch.tensor(eight + sixteen_odd), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize(("n_heads", "length"), [(1, 1), (4, 6), (6, 9), (12, 17)])
def test_alibi_bias_is_causal_and_linear(n_heads, length):
    bias = alibi_bias(n_heads, length)
    assert bias.shape == (n_heads, length, length)
    slopes = alibi_slopes(n_heads)
    for i in range(length):
        for j in range(length):
            if j > i:
                assert torch.all(bias[:, i, j] == float("-inf"))
            else:
                torch.testing.assert_close(bias[:, i, j], -slopes * (i - j))


@pytest.mark.parametrize(("n_heads", "length"), [(4, 6), (5, 13), (16, 8)])
def test_alibi_bias_gives_bloom_attention(n_heads, length):
    scores = torch.randn(1, n_heads, length, length)
    ours = torch.softmax(scores + alibi_bias(n_heads, length), dim=-1)
    bloom = build_alibi_tensor(torch.ones(1, length), n_heads, torch.float32)
    bloom = bloom.view(1, n_heads, 1, length)  # (B, h, 1, T): slope * j
    hidden = ~torch.ones(length, length, dtype=torch.bool).tril()
    reference = torch.softmax((scores + bloom).masked_fill(hidden, -math.inf), dim=-1)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- attention, model


def _copy_to_torch(attn: CausalSelfAttention) -> nn.MultiheadAttention:
    d = attn.d_model
    ref = nn.MultiheadAttention(d, attn.n_heads, bias=False, batch_first=True)
    ref = ref.to(attn.W_q.weight.dtype)
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([attn.W_q.weight, attn.W_k.weight, attn.W_v.weight])
        )
        ref.out_proj.weight.copy_(attn.W_o.weight)
    return ref


@pytest.mark.parametrize(("d_model", "n_heads", "length"), [(8, 2, 5), (24, 3, 11)])
def test_attention_without_positions_matches_torch(d_model, n_heads, length):
    attn = CausalSelfAttention(d_model, n_heads, positions="none").double()
    x = torch.randn(2, length, d_model, dtype=torch.float64)
    hidden = ~torch.ones(length, length, dtype=torch.bool).tril()
    expected, _ = _copy_to_torch(attn)(x, x, x, attn_mask=hidden, need_weights=False)
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_attention_with_positions_matches_a_loop(positions):
    d_model, n_heads, length = 16, 4, 7
    attn = CausalSelfAttention(d_model, n_heads, positions=positions).double()
    x = torch.randn(3, length, d_model, dtype=torch.float64)
    d_head = d_model // n_heads
    out = torch.zeros(3, length, d_model, dtype=torch.float64)
    slopes = alibi_slopes(n_heads).double()
    for h in range(n_heads):
        cols = slice(h * d_head, (h + 1) * d_head)
        q = x @ attn.W_q.weight[cols].T  # (B, T, d_head)
        k = x @ attn.W_k.weight[cols].T
        v = x @ attn.W_v.weight[cols].T
        if positions == "rope":  # the paper's layout on permuted features
            perm = interleaved_to_half(d_head)
            inverse = torch.argsort(perm)
            q = apply_rope_interleaved(q[..., inverse], torch.arange(length))[..., perm]
            k = apply_rope_interleaved(k[..., inverse], torch.arange(length))[..., perm]
        for i in range(length):
            s = (k[:, : i + 1] @ q[:, i, :, None]).squeeze(-1) / math.sqrt(d_head)
            if positions == "alibi":
                s = s - slopes[h] * (i - torch.arange(i + 1))
            out[:, i, cols] = (torch.softmax(s, -1)[..., None] * v[:, : i + 1]).sum(1)
    expected = out @ attn.W_o.weight.T
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("positions", ["none", "sinusoidal", "rope", "alibi"])
def test_position_lm_is_causal_and_works_beyond_the_training_length(positions):
    model = PositionLM(
        13, d_model=16, n_heads=2, n_layers=2, d_ff=32, positions=positions
    )
    x = torch.randint(0, 13, (2, 40))
    logits = model(x)
    assert logits.shape == (2, 40, 13)
    x2 = x.clone()
    x2[:, 25] = (x2[:, 25] + 1) % 13  # change token 25: nothing before it may change
    logits2 = model(x2)
    torch.testing.assert_close(logits[:, :25], logits2[:, :25], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 25:], logits2[:, 25:])
    block = model.blocks[0]
    assert isinstance(block, DecoderBlock) and isinstance(
        block.attn, CausalSelfAttention
    )
    assert block(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_lm_loss_and_loss_by_position():
    model = PositionLM(7, d_model=8, n_heads=2, n_layers=1, d_ff=16)
    ids = torch.randint(0, 7, (101,))
    per_position = loss_by_position(model, ids, 10, batch_size=3)
    assert per_position.shape == (10,)
    x = ids[:100].view(10, 10)
    y = ids[1:].view(10, 10)
    torch.testing.assert_close(
        per_position.mean(), lm_loss(model, (x, y)).detach(), rtol=1e-5, atol=1e-6
    )
    assert model.training  # the mode is restored


# -------------------------------------------------------------------- bad input

cos, sin = rope_cos_sin(5, 8)
attn = CausalSelfAttention(8, 2)
model = PositionLM(10, d_model=8, n_heads=2, positions="sinusoidal", max_len=16)

BAD_INPUT = [
    pytest.param(
        lambda: rope_frequencies(7),
        ValueError,
        "d_head must be even",
        id="d_head",
    ),
    pytest.param(
        lambda: rope_frequencies(8, base=1.0),
        ValueError,
        "base must be in \\(1, inf\\)",
        id="base",
    ),
    pytest.param(
        lambda: rope_cos_sin(torch.tensor([0.5]), 8),
        TypeError,
        "positions must be an integer tensor",
        id="positions",
    ),
    pytest.param(
        lambda: rope_cos_sin(torch.tensor([-1]), 8),
        ValueError,
        "positions must be non-negative",
        id="positions-2",
    ),
    pytest.param(
        lambda: rope_cos_sin(0, 8),
        ValueError,
        "positions must be positive",
        id="positions-3",
    ),
    pytest.param(
        lambda: rope_cos_sin(4, 8, offset=-2),
        ValueError,
        "offset must be a non-negative int",
        id="offset",
    ),
    pytest.param(
        lambda: rotate_half(torch.randn(3, 5)),
        ValueError,
        "x must end in an even size",
        id="x",
    ),
    pytest.param(
        lambda: rotate_half(torch.ones(3, 4, dtype=torch.long)),
        TypeError,
        "x must be a floating-point tensor",
        id="x-2",
    ),
    pytest.param(
        lambda: apply_rope(torch.randn(5, 8), cos, sin),
        ValueError,
        "x must have 4 dimensions",
        id="x-3",
    ),
    pytest.param(
        lambda: apply_rope(torch.randn(1, 2, 6, 8), cos, sin),
        ValueError,
        "cos must have shape \\(T, d_head\\)",
        id="cos",
    ),
    pytest.param(
        lambda: apply_rope_interleaved(torch.randn(4, 8), torch.arange(5)),
        ValueError,
        "T = len\\(positions\\)",
        id="t",
    ),
    pytest.param(
        lambda: alibi_slopes(0),
        ValueError,
        "n_heads must be positive",
        id="n_heads",
    ),
    pytest.param(
        lambda: alibi_slopes(4.0),
        TypeError,
        "n_heads must be an int",
        id="n_heads-2",
    ),
    pytest.param(
        lambda: alibi_bias(4, 0),
        ValueError,
        "seq_len must be positive",
        id="seq_len",
    ),
    pytest.param(
        lambda: PositionLM(10, positions="learned"),
        ValueError,
        "positions must be one of",
        id="positions-4",
    ),
    pytest.param(
        lambda: CausalSelfAttention(10, 3),
        ValueError,
        "not divisible by n_heads",
        id="not",
    ),
    pytest.param(
        lambda: CausalSelfAttention(12, 4, positions="rope"),
        ValueError,
        "d_head must be even",
        id="d_head-2",
    ),
    pytest.param(
        lambda: attn(torch.randn(2, 3, 6)),
        ValueError,
        "x must have shape \\(B, T, d_model=8\\)",
        id="x-4",
    ),
    pytest.param(
        lambda: model(torch.zeros(1, 17, dtype=torch.long)),
        ValueError,
        "do not fit max_len=16",
        id="x-longer-than-max_len",
    ),
    pytest.param(
        lambda: model(torch.full((1, 3), 10)),
        ValueError,
        "ids must lie in \\[0, 10\\)",
        id="x-5",
    ),
    pytest.param(
        lambda: attn(torch.randn(2, 3, 8), cache=LayerKVCache()),
        ValueError,
        "cache must be None",
        id="cache-not-kept",
    ),
    pytest.param(
        lambda: model(torch.zeros(1, 3, dtype=torch.long), cache=[]),
        ValueError,
        "cache must be a list of 2",
        id="cache-list",
    ),
    pytest.param(
        lambda: lm_loss(model, torch.zeros(2, 3, dtype=torch.long)),
        TypeError,
        "batch must be a tuple",
        id="batch",
    ),
    pytest.param(
        lambda: lm_loss(model, (torch.zeros(2, 3).long(), torch.zeros(2, 4).long())),
        ValueError,
        "x and y must have the same shape",
        id="x-6",
    ),
    pytest.param(
        lambda: loss_by_position(model, torch.zeros(5, dtype=torch.long), 5),
        ValueError,
        "must hold at least seq_len \\+ 1",
        id="must",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
