"""Tests for ``dlabc.improvements.gqa_kv_cache``.

Grouped-query attention is compared with Hugging Face's ``LlamaAttention`` (weights
copied, its own RoPE tables and causal mask) for several head and key-value head
counts, with absolute positions, and step by step with its ``DynamicCache``; with a
window, with ``MistralAttention`` and Hugging Face's sliding-window mask. GQA with any
$g$ (including $g = h$, multi-head, and $g = 1$, multi-query) is compared with attention
written out head by head, query head $k$ reading key-value head $k g / h$
rounded down, and with the multi-head layer whose key-value weights repeat each group's.
``repeat_kv`` is compared with
``torch.repeat_interleave`` and Hugging Face's ``repeat_kv``, the mask with a brute
force double loop and Hugging Face's mask functions, ``kv_cache_bytes`` with the bytes
of Hugging Face's cache after a forward pass. Cached decoding must equal recomputation.
Bad input must fail clearly.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRotaryEmbedding,
)
from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralRotaryEmbedding,
)

from dlabc.improvements.gqa_kv_cache import (
    GQALM,
    GroupedQueryAttention,
    LayerKVCache,
    generate,
    kv_cache_bytes,
    reachable,
    repeat_kv,
    sliding_window_mask,
)
from transformers import LlamaConfig, LlamaModel, MistralConfig

torch.set_num_threads(1)
D = torch.float64


def _config(cls, h, g, d_head, base=10000.0, **extra):
    config = cls(
        hidden_size=h * d_head,
        num_attention_heads=h,
        num_key_value_heads=g,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=11,
        rope_parameters={"rope_type": "default", "rope_theta": base},
        **extra,
    )
    config._attn_implementation = "eager"
    return config


def _copy(ours: GroupedQueryAttention, hf: torch.nn.Module) -> None:
    hf.load_state_dict(ours.state_dict())  # the same names: a copy, no renaming


# -- repeat_kv ---------------------------------------------------------------------


@pytest.mark.parametrize("g,r", [(1, 1), (1, 4), (2, 3), (4, 2)])
def test_repeat_kv_matches_repeat_interleave_and_hf(g, r):
    x = torch.randn(2, g, 5, 6, dtype=D)
    out = repeat_kv(x, r)
    assert out.shape == (2, g * r, 5, 6)
    assert torch.equal(out, torch.repeat_interleave(x, r, dim=1))
    assert torch.equal(out, hf_repeat_kv(x, r))


# -- the mask ----------------------------------------------------------------------


@pytest.mark.parametrize("T,w", [(1, 1), (5, 1), (7, 3), (6, 6), (4, 10)])
def test_sliding_window_mask_brute_force(T, w):
    causal = torch.tensor([[0 <= i - j < w for j in range(T)] for i in range(T)])
    band = torch.tensor([[abs(i - j) < w for j in range(T)] for i in range(T)])
    assert torch.equal(sliding_window_mask(T, w), causal)
    assert torch.equal(sliding_window_mask(T, w, causal=False), band)
    assert torch.equal(sliding_window_mask(T, w, causal=False).T, band)
    # every row sees itself and min(i + 1, w) keys
    assert sliding_window_mask(T, w).sum(1).tolist() == [
        min(i + 1, w) for i in range(T)
    ]


@pytest.mark.parametrize("T,w", [(6, 1), (8, 3), (5, 5), (4, 9)])
def test_sliding_window_mask_matches_hf_mask_functions(T, w):
    from transformers.masking_utils import (
        sliding_window_bidirectional_mask_function,
        sliding_window_causal_mask_function,
    )

    def table(f):  # HF's mask functions, evaluated index by index
        zero = torch.tensor(0)
        return torch.tensor(
            [
                [
                    bool(f(zero, zero, torch.tensor(i), torch.tensor(j)))
                    for j in range(T)
                ]
                for i in range(T)
            ]
        )

    assert torch.equal(
        sliding_window_mask(T, w), table(sliding_window_causal_mask_function(w))
    )
    # HF's bidirectional window s allows |i - j| <= s: ours with window s + 1
    hfb = table(sliding_window_bidirectional_mask_function(w))
    assert torch.equal(sliding_window_mask(T, w + 1, causal=False), hfb)


@pytest.mark.parametrize("T,w", [(7, 3), (9, 2)])
def test_sliding_window_mask_matches_hf_mistral_mask(T, w):
    config = _config(MistralConfig, 2, 2, 4, sliding_window=w)
    x = torch.randn(1, T, config.hidden_size)
    hf = create_sliding_window_causal_mask(
        config=config,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=None,
        position_ids=torch.arange(T)[None],
    )  # (1, 1, T, T), 0 or the dtype's minimum
    assert torch.equal(sliding_window_mask(T, w), hf[0, 0] == 0)


# -- kv_cache_bytes ----------------------------------------------------------------


@pytest.mark.parametrize("h,g,layers,T,B", [(4, 4, 1, 5, 1), (4, 2, 3, 7, 2)])
def test_kv_cache_bytes_matches_hf_cache(h, g, layers, T, B):
    config = _config(LlamaConfig, h, g, 8)
    config.num_hidden_layers = layers
    model = LlamaModel(config).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 11, (B, T)), use_cache=True)
    cache = out.past_key_values
    hf_bytes = sum(
        t.numel() * t.element_size() for c in cache.layers for t in (c.keys, c.values)
    )
    assert kv_cache_bytes(layers, g, 8, T, B, bytes_per_value=4) == hf_bytes


def test_kv_cache_bytes_closed_form():
    # Llama 2 7B: 32 layers, 32 heads of 128, float16: 512 KiB per token
    assert kv_cache_bytes(32, 32, 128) == 512 * 1024
    assert kv_cache_bytes(32, 8, 128, 4096, 2, 1) == 2 * 32 * 8 * 128 * 4096 * 2


# -- GroupedQueryAttention against Hugging Face ------------------------------------


@pytest.mark.parametrize(
    "h,g,d_head,T,base", [(4, 2, 8, 9, 1e4), (6, 3, 4, 5, 500.0), (4, 1, 6, 7, 1e4)]
)
@pytest.mark.parametrize("offset", [0, 37])
def test_gqa_matches_hf_llama_attention(h, g, d_head, T, base, offset):
    config = _config(LlamaConfig, h, g, d_head, base)
    ours = GroupedQueryAttention(h * d_head, h, g, base=base).to(D)
    hf = LlamaAttention(config, layer_idx=0).to(D)
    _copy(ours, hf)
    x = torch.randn(2, T, h * d_head, dtype=D)
    position_ids = torch.arange(offset, offset + T).expand(2, T)
    mask = create_causal_mask(
        config=config,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids,
    )
    cos, sin = LlamaRotaryEmbedding(config)(x, position_ids)
    expected, _ = hf(x, position_embeddings=(cos, sin), attention_mask=mask)
    got = ours(x, positions=position_ids)
    assert (got - expected).abs().max() < 1e-5  # HF's float32 angles
    got_1d = ours(x, positions=torch.arange(offset, offset + T))
    assert (got_1d - got).abs().max() < 1e-12


@pytest.mark.parametrize("h,g,w,T", [(4, 2, 3, 10), (4, 1, 1, 5), (2, 2, 4, 9)])
def test_gqa_window_matches_hf_mistral_attention(h, g, w, T):
    d_head = 8
    config = _config(MistralConfig, h, g, d_head, sliding_window=w)
    ours = GroupedQueryAttention(h * d_head, h, g, window=w).to(D)
    hf = MistralAttention(config, layer_idx=0).to(D)
    _copy(ours, hf)
    x = torch.randn(2, T, h * d_head, dtype=D)
    position_ids = torch.arange(T).expand(2, T)
    mask = create_sliding_window_causal_mask(
        config=config,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids,
    )
    cos, sin = MistralRotaryEmbedding(config)(x, position_ids)
    expected, _ = hf(x, position_embeddings=(cos, sin), attention_mask=mask)
    assert (ours(x) - expected).abs().max() < 1e-5


def test_gqa_cache_matches_hf_dynamic_cache():
    h, g, d_head, T0, steps = 4, 2, 8, 5, 4
    config = _config(LlamaConfig, h, g, d_head)
    ours = GroupedQueryAttention(h * d_head, h, g).to(D)
    hf = LlamaAttention(config, layer_idx=0).to(D)
    _copy(ours, hf)
    rope = LlamaRotaryEmbedding(config)
    x = torch.randn(2, T0 + steps, h * d_head, dtype=D)
    hf_cache, cache = DynamicCache(config=config), LayerKVCache()
    for lo, hi in [(0, T0)] + [(t, t + 1) for t in range(T0, T0 + steps)]:
        chunk, pos = x[:, lo:hi], torch.arange(lo, hi).expand(2, hi - lo)
        mask = create_causal_mask(
            config=config,
            inputs_embeds=chunk,
            attention_mask=None,
            past_key_values=hf_cache,
            position_ids=pos,
        )
        expected, _ = hf(
            chunk,
            position_embeddings=rope(chunk, pos),
            attention_mask=mask,
            past_key_values=hf_cache,
        )
        assert (ours(chunk, cache=cache) - expected).abs().max() < 1e-5
        assert (cache.k - hf_cache.layers[0].keys).abs().max() < 1e-5
        assert torch.equal(cache.v, hf_cache.layers[0].values)


# -- GQA with g = h is MHA, with g = 1 MQA -----------------------------------------


def _reference_attention(x, Wq, Wks, Wvs, Wo, group, T, d_head, window=None):
    """Head by head, softmax written out; head k uses key-value head group[k]."""
    from dlabc.improvements.rope_alibi import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(T, d_head, dtype=D)
    heads = []
    mask = sliding_window_mask(T, window or T)
    for k, gk in enumerate(group):
        q = x @ Wq[k * d_head : (k + 1) * d_head].T  # (B, T, d_head)
        kk = x @ Wks[gk].T
        v = x @ Wvs[gk].T
        q, kk = (
            apply_rope(q[:, None], cos, sin)[:, 0],
            apply_rope(kk[:, None], cos, sin)[:, 0],
        )
        s = q @ kk.transpose(1, 2) / d_head**0.5
        s = s.masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(s, -1) @ v)
    return torch.cat(heads, -1) @ Wo.T


@pytest.mark.parametrize("h,g", [(4, 4), (4, 1), (6, 2), (3, 3)])
@pytest.mark.parametrize("window", [None, 2])
def test_gqa_special_cases_head_by_head(h, g, window):
    d_head, T = 4, 6
    attn = GroupedQueryAttention(h * d_head, h, g, window=window).to(D)
    x = torch.randn(2, T, h * d_head, dtype=D)
    Wks = attn.k_proj.weight.view(g, d_head, -1)
    Wvs = attn.v_proj.weight.view(g, d_head, -1)
    group = [k // (h // g) for k in range(h)]  # g = h: k; g = 1: 0 (MQA)
    expected = _reference_attention(
        x, attn.q_proj.weight, Wks, Wvs, attn.o_proj.weight, group, T, d_head, window
    )
    assert (attn(x) - expected).abs().max() < 1e-12


def test_gqa_with_repeated_kv_weights_is_mha():
    """A GQA layer equals the MHA layer whose key-value weights repeat its groups."""
    h, g, d_head = 6, 2, 4
    gqa = GroupedQueryAttention(h * d_head, h, g).to(D)
    mha = GroupedQueryAttention(h * d_head, h, h).to(D)
    mha.q_proj.weight.data.copy_(gqa.q_proj.weight)
    mha.o_proj.weight.data.copy_(gqa.o_proj.weight)
    for name in ("k_proj", "v_proj"):
        w = getattr(gqa, name).weight.view(g, 1, d_head, -1)
        getattr(mha, name).weight.data.copy_(
            w.expand(g, h // g, d_head, w.shape[-1]).reshape(h * d_head, -1)
        )
    x = torch.randn(3, 7, h * d_head, dtype=D)
    assert (gqa(x) - mha(x)).abs().max() < 1e-12


# -- the cache -----------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 1, 3, 8])
@pytest.mark.parametrize("chunks", [[10], [4, 1, 1, 1, 1, 1, 1], [1] * 10, [3, 5, 2]])
def test_gqa_cache_equals_recomputation(window, chunks):
    attn = GroupedQueryAttention(16, 4, 2, window=window).to(D)
    x = torch.randn(2, sum(chunks), 16, dtype=D)
    keep = None if window is None else window - 1  # Mistral's rolling buffer
    cache, outs, lo = LayerKVCache(keep), [], 0
    for n in chunks:
        outs.append(attn(x[:, lo : lo + n], cache=cache))
        lo += n
        # a window keeps only the last window - 1 positions
        assert len(cache) == (lo if window is None else min(lo, window - 1))
        assert cache.seen == lo
    assert (torch.cat(outs, 1) - attn(x)).abs().max() < 1e-12
    if window is not None and window > 1:  # window 1 keeps nothing
        assert cache.nbytes() == kv_cache_bytes(1, 2, 4, window - 1, 2, 8)


def test_gqa_cache_with_explicit_positions():
    attn = GroupedQueryAttention(16, 4, 1).to(D)
    x = torch.randn(2, 6, 16, dtype=D)
    pos = torch.arange(50, 56).expand(2, 6)
    cache = LayerKVCache()
    first = attn(x[:, :4], positions=pos[:, :4], cache=cache)
    second = attn(x[:, 4:], positions=pos[:, 4:], cache=cache)
    assert (torch.cat([first, second], 1) - attn(x, positions=pos)).abs().max() < 1e-12


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_generate_cache_equals_recomputation(window, g):
    torch.manual_seed(0)
    model = GQALM(13, d_model=32, n_heads=4, n_kv_heads=g, n_layers=2, window=window)
    prompt = torch.randint(0, 13, (3, 5))
    tokens_c, logits_c = generate(model, prompt, 9, use_cache=True)
    tokens_f, logits_f = generate(model, prompt, 9, use_cache=False)
    assert tokens_c.shape == (3, 9) and logits_c.shape == (3, 9, 13)
    assert torch.equal(tokens_c, tokens_f)
    assert (logits_c - logits_f).abs().max() < 1e-4
    # and the logits of the model's own forward on the whole sequence
    full = model(torch.cat([prompt, tokens_c], 1))[:, 4:-1]
    assert (full - logits_f).abs().max() < 1e-4
    assert model.training  # mode restored


def test_model_is_causal():
    model = GQALM(11, d_model=16, n_heads=2, n_kv_heads=1, window=3).eval()
    ids = torch.randint(0, 11, (1, 8))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 11
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5], b[:, 5])


# -- receptive field -------------------------------------------------------------------


@pytest.mark.parametrize("T,w,L", [(12, 3, 3), (10, 2, 4), (6, 6, 2)])
def test_reachable_closed_form_and_autograd(T, w, L):
    r = reachable(sliding_window_mask(T, w), L)
    assert r.shape == (L, T, T)
    for layer in range(L):
        closed = torch.tensor(
            [[0 <= i - j <= (layer + 1) * (w - 1) for j in range(T)] for i in range(T)]
        )
        assert torch.equal(r[layer], closed)
    # the gradient of a real stack of windowed layers: which inputs reach the last
    torch.manual_seed(0)
    layers = [GroupedQueryAttention(8, 2, 1, window=w).to(D) for _ in range(L)]
    x = torch.randn(1, T, 8, dtype=D, requires_grad=True)
    h = x
    for a in layers:
        h = h + a(h)
    h[0, -1].sum().backward()
    depends = x.grad[0].abs().sum(-1) > 0  # (T,)
    assert torch.equal(depends, r[-1, -1])


# -- bad input ---------------------------------------------------------------------

attn = GroupedQueryAttention(16, 4, 2)
full_cache = LayerKVCache()  # holds 3 positions of a batch of 2
attn(torch.randn(2, 3, 16), cache=full_cache)
other = GroupedQueryAttention(16, 4, 1)
cache = LayerKVCache()
model = GQALM(11, d_model=16, n_heads=2, n_kv_heads=1)

BAD_INPUT = [
    pytest.param(
        lambda: repeat_kv(torch.randn(2, 3, 4), 2),
        ValueError,
        "4 dimensions",
        id="dimensions",
    ),
    pytest.param(
        lambda: repeat_kv(torch.randn(1, 2, 3, 4), 0),
        ValueError,
        "n_rep must be positive",
        id="n_rep",
    ),
    pytest.param(
        lambda: repeat_kv(torch.randn(1, 2, 3, 4), 2.0),
        TypeError,
        "n_rep must be an int",
        id="n_rep-2",
    ),
    pytest.param(
        lambda: sliding_window_mask(4, 0),
        ValueError,
        "window must be positive",
        id="window",
    ),
    pytest.param(
        lambda: sliding_window_mask(4, 2.5),
        TypeError,
        "window must be an int",
        id="window-2",
    ),
    pytest.param(
        lambda: sliding_window_mask(0, 2),
        ValueError,
        "seq_len must be positive",
        id="seq_len",
    ),
    pytest.param(
        lambda: sliding_window_mask(4, 2, causal="yes"),
        TypeError,
        "causal must be a bool",
        id="causal",
    ),
    pytest.param(
        lambda: kv_cache_bytes(2, 0, 8),
        ValueError,
        "n_kv_heads must be positive",
        id="n_kv_heads",
    ),
    pytest.param(
        lambda: kv_cache_bytes(2, 1, 8, bytes_per_value=0.5),
        TypeError,
        "bytes_per_value must be an int",
        id="bytes_per_value",
    ),
    pytest.param(
        lambda: kv_cache_bytes(2, 1, 8, seq_len=-1),
        ValueError,
        "seq_len must be positive",
        id="seq_len-2",
    ),
    pytest.param(
        lambda: reachable(torch.ones(3, 3), 2),
        TypeError,
        "dtype torch.bool",
        id="dtype",
    ),
    pytest.param(
        lambda: reachable(torch.ones(3, 4, dtype=torch.bool), 2),
        ValueError,
        "square",
        id="square",
    ),
    pytest.param(
        lambda: reachable(torch.ones(3, 3, dtype=torch.bool), 0),
        ValueError,
        "n_layers must be positive",
        id="n_layers",
    ),
    pytest.param(
        lambda: GroupedQueryAttention(32, 4, 3),
        ValueError,
        "n_heads=4 is not divisible by n_kv_heads=3",
        id="n_heads",
    ),
    pytest.param(
        lambda: GroupedQueryAttention(32, 4, 0),
        ValueError,
        "n_kv_heads must be positive",
        id="n_kv_heads-2",
    ),
    pytest.param(
        lambda: GroupedQueryAttention(30, 4, 2),
        ValueError,
        "not divisible by n_heads",
        id="not",
    ),
    pytest.param(
        lambda: GroupedQueryAttention(12, 4, 2),
        ValueError,
        "must be even for RoPE",
        id="must",
    ),
    pytest.param(
        lambda: GroupedQueryAttention(16, 2, 1, window=0),
        ValueError,
        "window must be positive",
        id="window-3",
    ),
    pytest.param(
        lambda: GroupedQueryAttention(16, 2, 1, window=2.0),
        TypeError,
        "window must be an int",
        id="window-4",
    ),
    pytest.param(
        lambda: GroupedQueryAttention(16, 2, 1, base=1.0),
        ValueError,
        "base",
        id="base",
    ),
    pytest.param(
        lambda: attn(torch.randn(2, 3, 8)),
        ValueError,
        "d_model=16",
        id="d_model",
    ),
    pytest.param(
        lambda: attn(torch.ones(2, 3, 16, dtype=torch.long)),
        TypeError,
        "floating-point",
        id="floating",
    ),
    pytest.param(
        lambda: attn(torch.randn(2, 3, 16), positions=torch.arange(4)),
        ValueError,
        "positions must have shape",
        id="positions",
    ),
    pytest.param(
        lambda: attn(torch.randn(2, 3, 16), positions=torch.arange(3.0)),
        TypeError,
        "integer tensor",
        id="integer",
    ),
    pytest.param(
        lambda: attn(torch.randn(2, 3, 16), cache=[]),
        TypeError,
        "cache must be a LayerKVCache",
        id="cache",
    ),
    pytest.param(
        lambda: attn(torch.randn(3, 1, 16), cache=full_cache),
        ValueError,
        "batch size 3",
        id="batch",
    ),
    pytest.param(
        lambda: other(torch.randn(2, 1, 16), cache=full_cache),
        ValueError,
        "does not fit the cached",
        id="like",
    ),
    pytest.param(
        lambda: cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 2, 4)),
        ValueError,
        "same positions",
        id="same",
    ),
    pytest.param(
        lambda: LayerKVCache(keep=-1),
        ValueError,
        "keep",
        id="keep",
    ),
    pytest.param(
        lambda: model(torch.tensor([[3, 11]])),
        ValueError,
        "ids must lie in \\[0, 11\\)",
        id="ids",
    ),
    pytest.param(
        lambda: model(torch.tensor([[3]]), cache=[LayerKVCache()]),
        ValueError,
        "list of 2 caches",
        id="list",
    ),
    pytest.param(
        lambda: generate(torch.nn.Linear(2, 2), torch.tensor([[1]]), 2),
        TypeError,
        "model must be a GQALM",
        id="model",
    ),
    pytest.param(
        lambda: generate(model, torch.tensor([[1]]), 0),
        ValueError,
        "n_new must be positive",
        id="n_new",
    ),
    pytest.param(
        lambda: generate(model, torch.zeros(1, 0, dtype=torch.long), 2),
        ValueError,
        "at least one token",
        id="at",
    ),
    pytest.param(
        lambda: GQALM(11, d_model=16, n_heads=2, n_kv_heads=4),
        ValueError,
        "n_heads=2 is not divisible",
        id="n_heads-2",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
    assert len(cache) == 0 and cache.nbytes() == 0  # a failed update changes nothing
