"""Tests for ``dlabc.improvements.modern_block``.

The LLaMA block is compared with Hugging Face's ``LlamaDecoderLayer`` built from tiny
``LlamaConfig``s with fewer key-value heads than query heads, the weights copied with
``load_state_dict`` (under Hugging Face's names, ``hf_llama_names``), in float64, outputs and input gradients;
the language model with ``LlamaForCausalLM``. Hugging Face computes its RMSNorm in
float32 whatever the input's precision, so the tolerance is float32's; with that norm
computed in the input's precision (patched for the test) the agreement is float64's.
The RoPE tables handed to the reference are computed in float64 (Hugging Face's own
are float32; the RoPE chapter's tests compare the two). The hidden-size rule is checked
against the published sizes of LLaMA, Llama 2 70B and Llama 3 8B, the parameter counts
against ``numel``, the GELU network against ``nn.Sequential`` with ``nn.GELU``, the
post-LN and LayerNorm variants by the properties their last norm guarantees, every
variant for causality, and decoding with the previous chapter's key-value cache against
the full sequence. Bad input must fail clearly.
"""

from __future__ import annotations

import pytest
import torch
import transformers.models.llama.modeling_llama as hf_llama
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaRMSNorm,
)

from dlabc.foundations.activations import GatedFeedForward
from dlabc.improvements.gqa_kv_cache import LayerKVCache
from dlabc.improvements.modern_block import (
    FFNS,
    NORMS,
    BlockLM,
    GeluFeedForward,
    LlamaBlock,
    ffn_parameter_count,
    hf_llama_names,
    swiglu_hidden_size,
)
from dlabc.improvements.rope_alibi import rope_cos_sin
from transformers import LlamaConfig

F64 = dict(atol=1e-12, rtol=1e-12)
HF_F32_NORM = dict(atol=2e-5, rtol=2e-5)  # Hugging Face's RMSNorm is float32


def _config(d_model, n_heads, n_kv_heads, d_ff, n_layers=1, vocab=23, eps=1e-6):
    return LlamaConfig(
        hidden_size=d_model,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        vocab_size=vocab,
        rms_norm_eps=eps,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _randomize(module: nn.Module) -> nn.Module:
    """Random weights everywhere, the norms' scales too (they start at 1)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return module


def _hf_layer_output(hf, x, positions=None):
    """``LlamaDecoderLayer`` on ``x`` with a causal mask and float64 RoPE tables."""
    length, d_head = x.shape[1], hf.self_attn.head_dim
    if positions is None:
        positions = torch.arange(length)
    cos, sin = rope_cos_sin(positions, d_head, dtype=x.dtype)  # (T, d) or (B, T, d)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, d_head)
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    return hf(x, attention_mask=mask, position_embeddings=(cos, sin))


def _float64_rmsnorm(self, hidden_states):
    """LlamaRMSNorm's formula in the input's precision (no cast to float32)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


CASES = [  # d_model, n_heads, n_kv_heads, d_ff
    (16, 2, 1, 24),
    (32, 4, 2, 64),
    (48, 6, 2, 128),
    (64, 8, 4, 172),
]


# ---------------------------------------------------------------- sizes, counts


@pytest.mark.parametrize(
    ("d_model", "multiplier", "multiple_of", "published"),
    [
        (4096, None, 256, 11008),  # LLaMA 7B
        (5120, None, 256, 13824),  # LLaMA 13B
        (6656, None, 256, 17920),  # LLaMA 33B
        (8192, None, 256, 22016),  # LLaMA 65B
        (8192, 1.3, 4096, 28672),  # Llama 2 70B
        (4096, 1.3, 1024, 14336),  # Llama 3 8B
    ],
)
def test_swiglu_hidden_size_gives_the_published_sizes(
    d_model, multiplier, multiple_of, published
):
    assert swiglu_hidden_size(d_model, multiple_of, multiplier) == published


@pytest.mark.parametrize("d_model", [1, 3, 7, 48, 100])
def test_swiglu_hidden_size_without_rounding_is_two_thirds_of_4d(d_model):
    assert swiglu_hidden_size(d_model, multiple_of=1) == (8 * d_model) // 3
    rounded = swiglu_hidden_size(d_model, multiple_of=64)
    assert rounded % 64 == 0 and 0 <= rounded - (8 * d_model) // 3 < 64


@pytest.mark.parametrize(("d_model", "d_ff"), [(3, 5), (16, 40), (48, 128)])
def test_ffn_parameter_count_matches_the_modules(d_model, d_ff):
    gated = GatedFeedForward(d_model, d_ff)
    plain = GeluFeedForward(d_model, d_ff)
    assert ffn_parameter_count(d_model, d_ff, True) == sum(
        p.numel() for p in gated.parameters()
    )
    assert ffn_parameter_count(d_model, d_ff, False) == sum(
        p.numel() for p in plain.parameters()
    )


@pytest.mark.parametrize("d_model", [3, 48, 96, 4095])
def test_two_thirds_rule_equalizes_the_counts(d_model):
    swiglu = ffn_parameter_count(d_model, 8 * d_model // 3, gated=True)
    assert swiglu == ffn_parameter_count(d_model, 4 * d_model, gated=False)


# ------------------------------------------------------------------ GELU network


@pytest.mark.parametrize(("d_model", "d_ff", "shape"), [(4, 7, (3,)), (8, 16, (2, 5))])
def test_gelu_feed_forward_matches_torch_sequential(d_model, d_ff, shape):
    ours = GeluFeedForward(d_model, d_ff).double()
    reference = nn.Sequential(
        nn.Linear(d_model, d_ff, bias=False),
        nn.GELU(),
        nn.Linear(d_ff, d_model, bias=False),
    ).double()
    with torch.no_grad():
        reference[0].weight.copy_(ours.up_proj.weight)
        reference[2].weight.copy_(ours.down_proj.weight)
    x = torch.randn(*shape, d_model, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ours(x), reference(x), **F64)
    (g_ours,) = torch.autograd.grad(ours(x).sum(), x)
    (g_ref,) = torch.autograd.grad(reference(x).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, **F64)


# ----------------------------------------------------- the block against Llama


@pytest.mark.parametrize(("d_model", "n_heads", "n_kv_heads", "d_ff"), CASES)
def test_llama_block_matches_hf_decoder_layer(d_model, n_heads, n_kv_heads, d_ff):
    torch.manual_seed(0)
    ours = _randomize(LlamaBlock(d_model, n_heads, n_kv_heads, d_ff).double())
    hf = LlamaDecoderLayer(_config(d_model, n_heads, n_kv_heads, d_ff), 0)
    hf = hf.double().eval()
    hf.load_state_dict(hf_llama_names(ours.state_dict()))  # LlamaDecoderLayer's names
    x = torch.randn(3, 11, d_model, dtype=torch.float64, requires_grad=True)
    y, y_hf = ours(x), _hf_layer_output(hf, x)
    torch.testing.assert_close(y, y_hf, **HF_F32_NORM)
    weights = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * weights).sum(), x)
    (g_hf,) = torch.autograd.grad((y_hf * weights).sum(), x)
    torch.testing.assert_close(g, g_hf, **HF_F32_NORM)


@pytest.mark.parametrize(("d_model", "n_heads", "n_kv_heads", "d_ff"), CASES[:3])
def test_llama_block_matches_hf_to_float64_with_hfs_norm_in_float64(
    monkeypatch, d_model, n_heads, n_kv_heads, d_ff
):
    monkeypatch.setattr(hf_llama.LlamaRMSNorm, "forward", _float64_rmsnorm)
    torch.manual_seed(1)
    ours = _randomize(LlamaBlock(d_model, n_heads, n_kv_heads, d_ff).double())
    hf = LlamaDecoderLayer(_config(d_model, n_heads, n_kv_heads, d_ff), 0)
    hf = hf.double().eval()
    hf.load_state_dict(hf_llama_names(ours.state_dict()))
    x = torch.randn(2, 9, d_model, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ours(x), _hf_layer_output(hf, x), **F64)
    # positions given per example: RoPE at other offsets, the same in both
    positions = torch.stack([torch.arange(9) + 5, torch.arange(9) + 40])  # (B, T)
    h = x + ours.attn(ours.norm1(x), positions)  # the block, positions to Attn
    torch.testing.assert_close(
        h + ours.ff(ours.norm2(h)), _hf_layer_output(hf, x, positions), **F64
    )
    y, y_hf = ours(x), _hf_layer_output(hf, x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_hf,) = torch.autograd.grad(y_hf.square().sum(), x)
    torch.testing.assert_close(g, g_hf, **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_the_blocks_rmsnorm_matches_llama_rmsnorm_and_torch(dtype, eps):
    block = _randomize(LlamaBlock(24, 2, 1, 32, eps=eps)).to(dtype)
    ours = block.norm1
    hf = LlamaRMSNorm(24, eps=eps).to(dtype)
    reference = nn.RMSNorm(24, eps=eps).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(ours.weight)
        reference.weight.copy_(ours.weight)
    x = 3 * torch.randn(4, 7, 24, dtype=dtype)
    tolerance = F64 if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), reference(x), **tolerance)
    torch.testing.assert_close(ours(x), hf(x), **HF_F32_NORM)


@pytest.mark.parametrize(("d_model", "n_heads", "n_kv_heads", "d_ff"), CASES[:2])
def test_block_lm_matches_hf_llama_for_causal_lm(d_model, n_heads, n_kv_heads, d_ff):
    torch.manual_seed(2)
    ours = BlockLM(23, d_model, n_heads, 3, d_ff, n_kv_heads=n_kv_heads)
    ours = _randomize(ours.double())
    config = _config(d_model, n_heads, n_kv_heads, d_ff, n_layers=3)
    hf = LlamaForCausalLM(config).double().eval()
    hf.load_state_dict(hf_llama_names(ours.state_dict()))  # LlamaForCausalLM's names
    ids = torch.randint(23, (2, 10))
    # the reference makes its RoPE tables and its RMSNorm in float32
    torch.testing.assert_close(ours(ids), hf(ids).logits, **HF_F32_NORM)


# -------------------------------------------------------- variants, properties


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("norm_first", [True, False])
def test_every_variant_is_causal_and_keeps_the_shape(norm_first, norm, ffn):
    torch.manual_seed(3)
    block = LlamaBlock(16, 4, 2, 24, norm_first, norm, ffn).double()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 3, 16, dtype=torch.float64)  # the future
    y, y_changed = block(x), block(changed)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :5], y_changed[:, :5], **F64)
    assert not torch.allclose(y[:, 5:], y_changed[:, 5:])


@pytest.mark.parametrize("norm", NORMS)
def test_post_ln_output_is_normalized(norm):
    block = LlamaBlock(32, 4, 4, 48, norm_first=False, norm=norm, eps=1e-12).double()
    y = block(5 * torch.randn(3, 6, 32, dtype=torch.float64))
    # the last step is the norm, with its scale at 1 (and shift at 0)
    rms = y.square().mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), **F64)
    if norm == "layer":
        torch.testing.assert_close(y.mean(-1), torch.zeros_like(rms), **F64)


@pytest.mark.parametrize("norm", NORMS)
def test_pre_ln_block_is_the_identity_when_its_sublayers_output_zero(norm):
    block = LlamaBlock(16, 2, 1, 24, norm=norm).double()
    with torch.no_grad():
        block.attn.o_proj.weight.zero_()
        block.ff.down_proj.weight.zero_()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_layernorm_variant_uses_layernorm_and_gelu_variant_uses_gelu():
    block = LlamaBlock(16, 2, 1, 24, norm="layer", ffn="gelu").double()
    reference = nn.LayerNorm(16, eps=1e-6).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(block.norm1(x), reference(x), **F64)
    assert isinstance(block.ff, GeluFeedForward)
    assert isinstance(LlamaBlock(16, 2, 1, 24).ff, GatedFeedForward)


def test_block_lm_has_a_final_norm_only_when_pre_ln():
    assert BlockLM(11, 16, 2, 2, 24).norm is not None
    assert BlockLM(11, 16, 2, 2, 24, norm_first=False).norm is None
    logits = BlockLM(11, 16, 2, 2, 24, n_kv_heads=1)(torch.randint(11, (3, 7)))
    assert logits.shape == (3, 7, 11)


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_with_a_kv_cache_equals_the_full_sequence(norm_first):
    torch.manual_seed(4)
    block = _randomize(LlamaBlock(16, 4, 2, 24, norm_first)).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    cache = LayerKVCache()
    prefill = block(x[:, :3], cache=cache)  # the first three positions at once
    steps = [
        block(x[:, t : t + 1], cache=cache) for t in range(3, 7)
    ]  # then one by one
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), block(x), **F64)


# -------------------------------------------------------------------- bad input

block = LlamaBlock(16, 2, 1, 24)
model = BlockLM(11, 16, 2, 1, 24)

BAD_INPUT = [
    pytest.param(
        lambda: LlamaBlock(16, 2, 1, 24, norm="batch"),
        ValueError,
        "norm must be one of",
        id="norm",
    ),
    pytest.param(
        lambda: LlamaBlock(16, 2, 1, 24, ffn="relu"),
        ValueError,
        "ffn must be one of",
        id="ffn",
    ),
    pytest.param(
        lambda: LlamaBlock(16, 2, 1, 24, norm_first="yes"),
        TypeError,
        "norm_first must be a bool",
        id="norm_first",
    ),
    pytest.param(
        lambda: LlamaBlock(16, 2, 1, 0),
        ValueError,
        "d_ff must be positive",
        id="d_ff",
    ),
    pytest.param(
        lambda: LlamaBlock(16, 2, 1, 24, eps=0.0),
        ValueError,
        "eps must be in",
        id="eps",
    ),
    pytest.param(
        lambda: LlamaBlock(16, 4, 3, 24),
        ValueError,
        "n_kv_heads",
        id="n_kv_heads",
    ),
    pytest.param(
        lambda: swiglu_hidden_size(0),
        ValueError,
        "d_model must be positive",
        id="d_model",
    ),
    pytest.param(
        lambda: swiglu_hidden_size(64, multiple_of=0),
        ValueError,
        "multiple_of must be positive",
        id="multiple_of",
    ),
    pytest.param(
        lambda: swiglu_hidden_size(64, ffn_dim_multiplier=-1.0),
        ValueError,
        "ffn_dim_multiplier must be in",
        id="ffn_dim_multiplier",
    ),
    pytest.param(
        lambda: ffn_parameter_count(4, 8, gated=1),
        TypeError,
        "gated must be a bool",
        id="gated",
    ),
    pytest.param(
        lambda: GeluFeedForward(4, 0),
        ValueError,
        "d_ff must be positive",
        id="d_ff-2",
    ),
    pytest.param(
        lambda: BlockLM(11, 16, 2, 0, 24),
        ValueError,
        "n_layers must be positive",
        id="n_layers",
    ),
    pytest.param(
        lambda: BlockLM(11, -16, 2, 1, 24),
        ValueError,
        "d_model must be positive",
        id="d_model-2",
    ),
    pytest.param(
        lambda: block(torch.randn(2, 5, 8)),
        ValueError,
        "x must end with",
        id="x-width",
    ),
    pytest.param(
        lambda: hf_llama_names([("embed.weight", torch.zeros(1))]),
        TypeError,
        "state_dict must be a dict",
        id="state_dict",
    ),
    pytest.param(
        lambda: block(torch.randn(5, 16)),
        ValueError,
        "3 dimensions",
        id="dimensions",
    ),
    pytest.param(
        lambda: block(torch.ones(2, 5, 16, dtype=torch.long)),
        TypeError,
        "floating-point",
        id="floating",
    ),
    pytest.param(
        lambda: GeluFeedForward(4, 8)(torch.randn(3, 5)),
        ValueError,
        "d_model=4",
        id="d_model-4",
    ),
    pytest.param(
        lambda: model(torch.full((1, 4), 11)),
        ValueError,
        "ids must lie in \\[0, 11\\)",
        id="ids",
    ),
    pytest.param(
        lambda: model(torch.zeros(1, 4)),
        TypeError,
        "torch.int64",
        id="torch",
    ),
    pytest.param(
        lambda: model(torch.zeros(4, dtype=torch.long)),
        ValueError,
        "2 dimensions",
        id="dimensions-2",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
