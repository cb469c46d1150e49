"""Tests for ``dlabc.improvements.mla``.

The attention is compared with Hugging Face's ``DeepseekV3Attention`` (both
``rope_interleave`` settings, with and without a query latent) and
``DeepseekV2Attention`` (adjacent rotary pairs, computed with complex numbers), built
from tiny configs with our weights copied in: outputs, the latent cache HF's
``DynamicCache`` stores, and its size. With HF's RMSNorm kept in float64 the outputs
agree to float64 rounding. The rotary part is compared with HF DeepSeek-V3's and
Llama's rotary embeddings. The absorbed computation is compared with the naive one,
and incremental decoding through :class:`LatentCache` with one full pass. The model
built by :func:`mla_lm` is checked for causality; :func:`mla_cache_bytes` against the
paper's closed form and DeepSeek-V2's published sizes. Bad input must fail clearly.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2RotaryEmbedding,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from dlabc.improvements.gqa_kv_cache import kv_cache_bytes
from dlabc.improvements.mla import (
    LatentCache,
    MultiHeadLatentAttention,
    mla_cache_bytes,
    mla_lm,
)
from dlabc.improvements.rope_alibi import (
    PositionLM,
    apply_rope,
    interleaved_to_half,
    rope_cos_sin,
)
from transformers import DeepseekV2Config, DeepseekV3Config, DynamicCache, LlamaConfig

SIZES = [  # d_model, heads, d_c, d_nope, d_rope, d_v, q_lora_rank
    (32, 4, 16, 8, 6, 10, None),
    (24, 2, 8, 4, 4, 4, 12),
    (40, 5, 20, 16, 8, 16, 16),
]


def _config(version, d, h, dc, dn, dr, dv, qr, interleave=True):
    kw = dict(
        hidden_size=d,
        num_attention_heads=h,
        num_key_value_heads=h,
        kv_lora_rank=dc,
        q_lora_rank=qr,
        qk_nope_head_dim=dn,
        qk_rope_head_dim=dr,
        v_head_dim=dv,
        num_hidden_layers=1,
        vocab_size=11,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if version == 3:
        config = DeepseekV3Config(rope_interleave=interleave, **kw)
    else:
        config = DeepseekV2Config(**kw)
    config._attn_implementation = "eager"
    return config


def _copy(ours, reference, interleaved):
    """HF's weights into ours; adjacent rotary pairs move to the half layout."""
    h, dn, dr, dc = (
        ours.n_heads,
        ours.qk_nope_head_dim,
        ours.qk_rope_head_dim,
        ours.kv_lora_rank,
    )
    perm = interleaved_to_half(dr) if interleaved else torch.arange(dr)
    state = {name: w.clone() for name, w in reference.state_dict().items()}
    q_name = "q_proj.weight" if "q_proj.weight" in state else "q_b_proj.weight"
    q = state[q_name].view(h, dn + dr, -1)  # head by head: [nope, rope]
    q[:, dn:] = q[:, dn:][:, perm]
    state[q_name] = q.reshape(h * (dn + dr), -1)
    kv_a = state["kv_a_proj_with_mqa.weight"]  # [W^DKV; W^KR]
    kv_a[dc:] = kv_a[dc:][perm]
    ours.load_state_dict(state)
    return perm


def _reference(version, sizes, interleave=True):
    config = _config(version, *sizes, interleave=interleave)
    attention = (DeepseekV3Attention if version == 3 else DeepseekV2Attention)(
        config, 0
    )
    attention = attention.double()
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0, 0.3)
    rotary = (DeepseekV3RotaryEmbedding if version == 3 else DeepseekV2RotaryEmbedding)(
        config
    )
    return config, attention, rotary


def _run_reference(version, attention, rotary, x, cache=None):
    batch, length, _ = x.shape
    positions = torch.arange(length).expand(batch, length)
    embeddings = rotary(x, positions)
    mask = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)
    mask = mask.expand(batch, 1, length, length)
    if version == 3:
        return attention(x, embeddings, mask, past_key_values=cache)[0]
    return attention(
        x, attention_mask=mask, position_embeddings=embeddings, past_key_values=cache
    )[0]


# --------------------------------------------------------- against Hugging Face


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize(("version", "interleave"), [(3, True), (3, False), (2, None)])
def test_matches_hf_deepseek_attention_and_its_latent_cache(sizes, version, interleave):
    config, reference, rotary = _reference(version, sizes, interleave)
    ours = MultiHeadLatentAttention(*sizes).double()
    interleaved = version == 2 or interleave
    perm = _copy(ours, reference, interleaved)
    x = torch.randn(2, 9, sizes[0], dtype=torch.float64)
    hf_cache = DynamicCache(config=config)
    expected = _run_reference(version, reference, rotary, x, hf_cache)
    cache = LatentCache()
    # HF's RMSNorm computes in float32: agreement to float32 rounding
    torch.testing.assert_close(ours(x, cache=cache), expected, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ours(x, absorb=True), expected, rtol=1e-5, atol=2e-6)
    # HF caches the same latent c^KV and the same rotated shared key
    layer = hf_cache.layers[0]
    assert layer.keys.shape == (2, 1, 9, sizes[2])
    torch.testing.assert_close(cache.c_kv, layer.keys[:, 0], rtol=1e-5, atol=1e-6)
    # V3 with interleave de-interleaves its output; V2 keeps adjacent pairs
    hf_rope = layer.values[:, 0] if version == 3 else layer.values[:, 0][..., perm]
    torch.testing.assert_close(cache.k_rope, hf_rope, rtol=1e-5, atol=1e-6)
    hf_bytes = layer.keys.nbytes + layer.values.nbytes
    assert cache.nbytes() == hf_bytes
    assert hf_bytes == mla_cache_bytes(1, sizes[2], sizes[4], 9, 2, 8)  # float64


def test_matches_hf_to_float64_rounding_without_its_float32_steps(monkeypatch):
    """HF computes RMSNorm, the rotary tables and the eager softmax in float32; with
    float64 in all three the outputs agree to float64 rounding."""

    def rmsnorm64(self, x):  # HF's formula, without its cast to float32
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x * scale

    monkeypatch.setattr(DeepseekV3RMSNorm, "forward", rmsnorm64)
    sizes = SIZES[1]
    config, reference, _ = _reference(3, sizes, interleave=False)
    config._attn_implementation = "sdpa"  # softmax in the input's precision
    ours = MultiHeadLatentAttention(*sizes).double()
    _copy(ours, reference, interleaved=False)
    x = torch.randn(3, 11, sizes[0], dtype=torch.float64)
    cos, sin = rope_cos_sin(11, sizes[4], dtype=torch.float64)  # (T, d_rope)
    mask = torch.full((11, 11), float("-inf"), dtype=torch.float64).triu(1)
    expected = reference(x, (cos.expand(3, -1, -1), sin.expand(3, -1, -1)), mask)[0]
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("d_rope", "offset"), [(4, 0), (8, 7), (64, 100)])
def test_decoupled_rope_is_the_standard_rotary_embedding(d_rope, offset):
    config = _config(3, 16, 2, 8, 4, d_rope, 4, None, interleave=False)
    q, k = torch.randn(2, 2, 3, 10, d_rope)
    positions = torch.arange(offset, offset + 10).expand(2, 10)
    cos_hf, sin_hf = DeepseekV3RotaryEmbedding(config)(q, positions)  # (B, T, d)
    llama = LlamaRotaryEmbedding(
        LlamaConfig(
            hidden_size=2 * d_rope,
            num_attention_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    )
    cos_llama, sin_llama = llama(q, positions)
    cos, sin = rope_cos_sin(10, d_rope, offset=offset)  # (T, d)
    tol = dict(rtol=1e-5, atol=2e-5 * (1 + offset) / 10)
    for hf in (cos_hf, cos_llama):
        torch.testing.assert_close(cos.expand(2, -1, -1), hf, **tol)
    torch.testing.assert_close(sin.expand(2, -1, -1), sin_hf, **tol)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_hf, **tol)
    # and the module's own rotary query is exactly this rotation
    mla = MultiHeadLatentAttention(16, 2, 8, 4, d_rope)
    x = torch.randn(2, 10, 16)
    q_nope, q_rope = mla.queries(x, offset)
    raw = mla.q_proj(x).view(2, 10, 2, 4 + d_rope).transpose(1, 2)[..., 4:]
    torch.testing.assert_close(q_rope, apply_rope(raw, cos, sin))
    assert q_nope.shape == (2, 2, 10, 4)


# ------------------------------------------------- absorption and the latent cache


@pytest.mark.parametrize("sizes", SIZES)
def test_absorbed_equals_naive_and_an_explicit_loop(sizes):
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(*sizes).double()
    x = torch.randn(2, 7, sizes[0], dtype=torch.float64)
    naive, absorbed = mla(x), mla(x, absorb=True)
    torch.testing.assert_close(absorbed, naive, rtol=1e-12, atol=1e-12)
    # brute force: one head, one query at a time, the keys written out
    q_nope, q_rope = mla.queries(x)
    c_kv, k_rope = mla.latent(x)
    d, h, dc, dn, dr, dv, _ = sizes
    w = mla.kv_b_proj.weight.view(h, dn + dv, dc)
    out = torch.zeros(2, h, 7, dv, dtype=torch.float64)
    for b in range(2):
        for i in range(h):
            k = torch.cat([c_kv[b] @ w[i, :dn].T, k_rope[b]], dim=-1)  # (S, dn + dr)
            v = c_kv[b] @ w[i, dn:].T  # (S, dv)
            for t in range(7):
                q = torch.cat([q_nope[b, i, t], q_rope[b, i, t]])
                a = torch.softmax(k[: t + 1] @ q / (dn + dr) ** 0.5, dim=0)
                out[b, i, t] = a @ v[: t + 1]
    expected = mla.o_proj(out.transpose(1, 2).reshape(2, 7, h * dv))
    torch.testing.assert_close(naive, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 6, [3, 1, 2], [6]])
def test_decoding_with_the_latent_cache_equals_one_pass(absorb, chunks):
    torch.manual_seed(1)
    sizes = SIZES[2]
    mla = MultiHeadLatentAttention(*sizes).double()
    x = torch.randn(2, sum(chunks), sizes[0], dtype=torch.float64)
    full = mla(x)
    cache, outputs, start = LatentCache(), [], 0
    for n in chunks:
        outputs.append(mla(x[:, start : start + n], cache=cache, absorb=absorb))
        start += n
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-12, atol=1e-12)
    assert len(cache) == sum(chunks)
    assert cache.nbytes() == mla_cache_bytes(1, sizes[2], sizes[4], sum(chunks), 2, 8)


def test_gradients_match_between_absorbed_and_naive():
    torch.manual_seed(2)
    mla = MultiHeadLatentAttention(*SIZES[1]).double()
    x = torch.randn(2, 5, SIZES[1][0], dtype=torch.float64, requires_grad=True)
    grads = []
    for absorb in (False, True):
        mla.zero_grad()
        (g,) = torch.autograd.grad(mla(x, absorb=absorb).square().sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------- sizes and model


def test_cache_bytes_follow_the_papers_table():
    # DeepSeek-V2: 60 layers, 128 heads of 128, d_c = 512, d_h^R = 64
    mla = mla_cache_bytes(60, 512, 64, bytes_per_value=1)
    assert mla == (512 + 64) * 60
    mha = kv_cache_bytes(60, 128, 128, bytes_per_value=1)  # 2 n_h d_h l
    assert mha == 2 * 128 * 128 * 60
    # the paper: MLA's cache equals GQA's with 2.25 groups, (9/2) d_h l
    assert mla == 4.5 * 128 * 60
    assert mla_cache_bytes(2, 3, 4, seq_len=5, batch=6, bytes_per_value=7) == (
        (3 + 4) * 2 * 5 * 6 * 7
    )


def test_mla_lm_is_positionlm_with_latent_attention_and_causal():
    torch.manual_seed(3)
    model = mla_lm(13, d_model=32, n_heads=2, n_layers=2, d_ff=48, kv_lora_rank=8)
    assert isinstance(model, PositionLM)
    assert all(isinstance(b.attn, MultiHeadLatentAttention) for b in model.blocks)
    ids = torch.randint(13, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 13)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 13
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6])
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


# -------------------------------------------------------------------- bad input

mla = MultiHeadLatentAttention(16, 2, 8, 4, 4)
cache = LatentCache()
mla(torch.randn(2, 3, 16), cache=cache)

BAD_INPUT = [
    pytest.param(
        lambda: MultiHeadLatentAttention(16, 2, 8, 4, 3),
        ValueError,
        "qk_rope_head_dim must be even",
        id="qk_rope_head_dim",
    ),
    pytest.param(
        lambda: MultiHeadLatentAttention(16, 2, 0, 4, 4),
        ValueError,
        "kv_lora_rank must be positive",
        id="kv_lora_rank",
    ),
    pytest.param(
        lambda: MultiHeadLatentAttention(16, 2.0, 8, 4, 4),
        TypeError,
        "n_heads must be an int",
        id="n_heads",
    ),
    pytest.param(
        lambda: MultiHeadLatentAttention(16, 2, 8, 4, 4, q_lora_rank=-1),
        ValueError,
        "q_lora_rank must be positive",
        id="q_lora_rank",
    ),
    pytest.param(
        lambda: MultiHeadLatentAttention(16, 2, 8, 4, 4, base=1.0),
        ValueError,
        "base must be in \\(1, inf\\)",
        id="base",
    ),
    pytest.param(
        lambda: MultiHeadLatentAttention(16, 2, 8, 4, 4, eps=-1.0),
        ValueError,
        "eps must be in \\[0, inf\\)",
        id="eps",
    ),
    pytest.param(
        lambda: mla(torch.randn(2, 3, 8)),
        ValueError,
        "x must have shape \\(B, T, d_model=16\\)",
        id="x",
    ),
    pytest.param(
        lambda: mla(torch.randn(3, 16)),
        ValueError,
        "x must have 3 dimensions",
        id="x-2",
    ),
    pytest.param(
        lambda: mla(torch.ones(2, 3, 16, dtype=torch.long)),
        TypeError,
        "x must be a floating-point tensor",
        id="x-3",
    ),
    pytest.param(
        lambda: mla(torch.randn(2, 3, 16), cache={}),
        TypeError,
        "cache must be a LatentCache",
        id="cache",
    ),
    pytest.param(
        lambda: mla(torch.randn(2, 3, 16), absorb=1),
        TypeError,
        "absorb must be a bool",
        id="absorb",
    ),
    pytest.param(
        lambda: mla(torch.randn(1, 1, 16), cache=cache),
        ValueError,
        "c_kv .* does not fit the cached",
        id="cache-batch",
    ),
    pytest.param(
        lambda: LatentCache().update(torch.randn(2, 3, 8), torch.randn(2, 4, 4)),
        ValueError,
        "must hold the same positions",
        id="c_kv-k_rope-positions",
    ),
    pytest.param(
        lambda: LatentCache().update(torch.randn(3, 8), torch.randn(2, 3, 4)),
        ValueError,
        "c_kv must have 3 dimensions",
        id="c_kv",
    ),
    pytest.param(
        lambda: mla_cache_bytes(60, 512, 64, seq_len=0),
        ValueError,
        "seq_len must be positive",
        id="seq_len",
    ),
    pytest.param(
        lambda: mla_cache_bytes(60.0, 512, 64),
        TypeError,
        "n_layers must be an int",
        id="n_layers",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
