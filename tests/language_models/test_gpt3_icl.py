"""Tests for ``dlabc.language_models.gpt3_icl``.

The parameter counts of the eight GPT-3 configurations are checked against Table D.1 of
Brown et al. (2020), and $6ND$ against its compute column; the closed form against
counting. The banded mask is compared with a brute-force loop; a banded layer with a
band that covers everything equals GPT-2's dense attention, and a banded layer's output
does not depend on any input outside its band (the Jacobian is zero there). The whole
model is compared with Hugging Face's ``GPTNeoForCausalLM`` (alternating global and
local layers; it computes scores in float32, hence the tolerance) and, all layers dense,
with ``GPT2LMHeadModel`` in float64. The attention maps of a ``BlockLM`` are compared
with ``LlamaForCausalLM``'s ``output_attentions``. The recall task's helpers are
checked against loops and an exact enumeration. Bad input must fail clearly.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.utils import logging

from dlabc.improvements.gqa_kv_cache import LayerKVCache
from dlabc.improvements.modern_block import BlockLM, hf_llama_names
from dlabc.language_models.gpt2 import GPT2Attention, gpt2_from_hf_state_dict
from dlabc.language_models.gpt3_icl import (
    CONFIGS,
    GPT3,
    PF_DAY,
    TABLE_2_1,
    TABLE_D_1,
    TOKENS,
    BandedAttention,
    GPT3Config,
    attention_maps,
    banded_causal_mask,
    gpt3_parameters,
    gpt_neo_state_dict,
    optimal_recall_accuracy,
    recall_correct,
    recall_episodes,
    recall_loss,
    seen_before,
)
from transformers import (
    GPT2Config as HFGPT2Config,
)
from transformers import (
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

logging.set_verbosity_error()
F64 = dict(atol=1e-10, rtol=1e-10)


def _tiny(**changes) -> GPT3Config:
    base = dict(
        vocab_size=37, n_positions=20, d_model=16, n_layers=4, n_heads=2, band=3
    )
    return GPT3Config(**{**base, "dropout": 0.0, **changes})


def _randomize(model: torch.nn.Module, keep_qkv_bias_zero: bool = False):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if keep_qkv_bias_zero and name.endswith("c_attn.bias"):
                continue
            p.add_(0.2 * torch.randn_like(p))
    return model


def test_configs_match_the_papers_tables():
    assert list(CONFIGS) == list(TABLE_2_1) == list(TABLE_D_1)
    assert len(CONFIGS) == 8
    # (the closed form equals the built model's count: the next test; building these
    # on the meta device costs seconds, so the page does it)
    for name, config in CONFIGS.items():
        n = gpt3_parameters(config.n_layers, config.d_model)
        paper_n, paper_flops = TABLE_D_1[name]
        assert abs(n / paper_n - 1) < 0.005, name
        assert abs(6 * n * TOKENS / paper_flops - 1) < 0.01, name  # D.1: 6 FLOPs/N/D
        printed = TABLE_2_1[name]
        assert config.n_layers == printed[1], name
        if name not in ("gpt3-xl", "gpt3-13b"):  # the rows that add up, as printed
            d_head = config.d_model // config.n_heads
            assert (config.d_model, config.n_heads, d_head) == printed[2:5], name
    assert abs(TABLE_D_1["gpt3-175b"][1] / PF_DAY / 3640 - 1) < 0.005  # 3.64E+03
    # the printed XL row (24 heads of 128 = 3072) misses its size by far
    printed_xl = gpt3_parameters(24, 2048, d_attn=24 * 128)
    assert printed_xl / TABLE_D_1["gpt3-xl"][0] > 1.1
    # the printed 13B row (d_model 5140) rounds to the wrong compute, 2.33E+22
    printed_13b = gpt3_parameters(40, 5140, d_attn=5120)
    assert f"{6 * printed_13b * TOKENS:.2e}" != f"{TABLE_D_1['gpt3-13b'][1]:.2e}"
    assert f"{6 * gpt3_parameters(40, 5120) * TOKENS:.2e}" == "2.31e+22"
    assert (CONFIGS["gpt3-xl"].n_heads, CONFIGS["gpt3-13b"].d_model) == (16, 5120)


def test_closed_form_counts_and_the_attention_width():
    for layers, d in ((1, 8), (3, 24)):
        config = _tiny(n_layers=layers, d_model=d, n_heads=4)
        model = GPT3(config)
        assert sum(p.numel() for p in model.parameters()) == gpt3_parameters(
            layers, d, vocab_size=37, n_positions=20
        )
    # attention is the only part that depends on d_attn: 4 d + 3 per extra feature
    assert gpt3_parameters(2, 10, 14) - gpt3_parameters(2, 10) == 2 * (4 * 10 + 3) * 4


def test_banded_mask_against_a_loop():
    for t, s, band in ((5, 5, 2), (3, 7, 3), (6, 6, 1), (4, 4, 10), (1, 9, 4)):
        mask = banded_causal_mask(t, s, band)
        for a, j in itertools.product(range(t), range(s)):
            i = s - t + a  # the query's position
            assert bool(mask[a, j]) == (j <= i and i - j < band)
    assert torch.equal(
        banded_causal_mask(6, 6, None), torch.ones(6, 6, dtype=torch.bool).tril()
    )
    assert torch.equal(banded_causal_mask(6, 6, 6), banded_causal_mask(6, 6, None))


def test_banded_attention_equals_dense_when_the_band_covers_everything():
    torch.manual_seed(0)
    dense = GPT2Attention(16, 4).double()
    banded = BandedAttention(16, 4, band=9).double()
    banded.load_state_dict(_randomize(dense).state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(banded(x), dense(x), **F64)


def test_a_banded_layer_never_looks_outside_its_band():
    torch.manual_seed(1)
    band, length = 3, 8
    layer = _randomize(BandedAttention(8, 2, band)).double()
    x = torch.randn(1, length, 8, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: layer(x)[0], x)[:, :, 0]
    reach = jac.abs().sum(dim=(1, 3))  # (T, T): how output i depends on input j
    inside = banded_causal_mask(length, length, band)
    assert reach[~inside].abs().max() == 0
    assert reach[inside].min() > 1e-6  # and it does look inside


def test_banded_attention_with_a_cache_equals_the_whole_sequence():
    torch.manual_seed(2)
    layer = _randomize(BandedAttention(8, 2, band=3)).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    cache = LayerKVCache()
    steps = [layer(x[:, :4], cache)] + [
        layer(x[:, t : t + 1], cache) for t in (4, 5, 6)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), layer(x), **F64)


def test_gpt3_against_hugging_face_gpt_neo():
    torch.manual_seed(3)
    config = _tiny()
    ours = _randomize(GPT3(config), keep_qkv_bias_zero=True).double().eval()
    assert [type(b.attn) for b in ours.blocks] == [GPT2Attention, BandedAttention] * 2
    neo = GPTNeoConfig(
        vocab_size=37,
        max_position_embeddings=20,
        hidden_size=16,
        num_layers=4,
        num_heads=2,
        attention_types=[[["global", "local"], 2]],
        window_size=3,
        intermediate_size=64,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
    )
    reference = GPTNeoForCausalLM(neo).double().eval()
    reference.load_state_dict(gpt_neo_state_dict(ours), strict=True)
    ids = torch.randint(37, (2, 20))
    # GPT-Neo computes the scores in float32 whatever the input's precision
    torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_gpt3_without_bands_is_gpt2():
    torch.manual_seed(4)
    hf = HFGPT2Config(
        vocab_size=37, n_positions=20, n_embd=16, n_layer=3, n_head=2,
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
    )  # fmt: skip
    reference = _randomize(GPT2LMHeadModel(hf)).double().eval()
    ours = GPT3(_tiny(n_layers=3, band=None)).double().eval()
    ours.load_state_dict(gpt2_from_hf_state_dict(reference.state_dict()))
    assert all(type(b.attn) is GPT2Attention for b in ours.blocks)
    ids = torch.randint(37, (2, 20))
    torch.testing.assert_close(ours(ids), reference(ids).logits, **F64)
    wide = GPT3(_tiny(n_layers=3, band=20)).double().eval()  # a band over everything
    wide.load_state_dict(ours.state_dict())
    torch.testing.assert_close(wide(ids), ours(ids), **F64)


def test_attention_maps_against_llama_output_attentions():
    torch.manual_seed(5)
    ours = _randomize(BlockLM(20, 16, 4, 2, 24, n_kv_heads=2)).double()
    config = LlamaConfig(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, num_hidden_layers=2, vocab_size=20,
        tie_word_embeddings=False, attn_implementation="eager",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    reference = LlamaForCausalLM(config).double().eval()
    reference.load_state_dict(hf_llama_names(ours.state_dict()))
    ids = torch.randint(20, (2, 9))
    maps = attention_maps(ours, ids)
    expected = reference(ids, output_attentions=True).attentions
    assert len(maps) == 2 and maps[0].shape == (2, 4, 9, 9)
    for a, b in zip(maps, expected, strict=True):  # HF's RMSNorm is float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        maps[1].sum(-1), torch.ones(2, 4, 9, dtype=torch.float64)
    )


def test_recall_episodes_keep_one_function_per_episode():
    g = torch.Generator().manual_seed(0)
    ids = recall_episodes(50, 4, 3, 10, g)
    assert ids.shape == (50, 20) and ids.dtype == torch.long
    keys, values = ids[:, 0::2], ids[:, 1::2]
    assert keys.min() >= 0 and keys.max() < 4
    assert values.min() >= 4 and values.max() < 7
    for b in range(50):
        seen = {}
        for k, v in zip(keys[b].tolist(), values[b].tolist(), strict=True):
            assert seen.setdefault(k, v) == v
    again = recall_episodes(50, 4, 3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


def test_seen_before_against_a_loop():
    ids = recall_episodes(20, 3, 5, 8, torch.Generator().manual_seed(1))
    keys = ids[:, 0::2].tolist()
    expected = [[k[i] in k[:i] for i in range(8)] for k in keys]
    assert seen_before(ids).tolist() == expected


def test_optimal_accuracy_by_exact_enumeration():
    n_keys, n_values, n_pairs = 2, 3, 4
    hits = torch.zeros(n_pairs, dtype=torch.float64)
    cases = 0
    for keys in itertools.product(range(n_keys), repeat=n_pairs):
        for f in itertools.product(range(n_values), repeat=n_keys):
            cases += 1
            for i, k in enumerate(keys):  # the oracle: look it up, or guess value 0
                hits[i] += (f[k] if k in keys[:i] else 0) == f[k]
    expected = hits / cases
    torch.testing.assert_close(
        optimal_recall_accuracy(n_keys, n_values, n_pairs), expected, **F64
    )


class _Oracle(torch.nn.Module):
    """Looks each key up among the earlier pairs; guesses the first value otherwise."""

    def __init__(self, n_keys: int, n_values: int) -> None:
        super().__init__()
        self.n_keys, self.vocab = n_keys, n_keys + n_values

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab, dtype=torch.float64)
        for b, t in itertools.product(range(ids.shape[0]), range(0, ids.shape[1], 2)):
            answer = self.n_keys
            for j in range(0, t, 2):
                if ids[b, j] == ids[b, t]:
                    answer = int(ids[b, j + 1])
            logits[b, t, answer] = 1.0
        return logits


def test_recall_correct_and_loss_with_an_oracle():
    ids = recall_episodes(6, 3, 4, 7, torch.Generator().manual_seed(2))
    oracle = _Oracle(3, 4)
    correct = recall_correct(oracle, ids)
    guessed_right = ids[:, 1::2] == 3
    assert torch.equal(correct, seen_before(ids) | guessed_right)
    logits = oracle(ids[:, :-1])[:, 0::2]
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), ids[:, 1::2].flatten()
    )
    torch.testing.assert_close(recall_loss(oracle, ids), expected, **F64)


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="band must be positive"):
        _tiny(band=0)
    with pytest.raises(TypeError, match="config must be a GPT3Config"):
        GPT3(CONFIGS)
    with pytest.raises(ValueError, match="n_queries=5 must be <= n_keys=3"):
        banded_causal_mask(5, 3, 2)
    with pytest.raises(TypeError, match="band must be an int"):
        BandedAttention(8, 2, band=2.5)
    with pytest.raises(ValueError, match="even length"):
        recall_loss(_Oracle(2, 2), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="ids must have dtype"):
        seen_before(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="n_keys must be positive"):
        recall_episodes(2, 0, 3, 4)
    with pytest.raises(TypeError, match="model must be a BlockLM"):
        attention_maps(GPT3(_tiny()), torch.zeros(1, 4, dtype=torch.long))
    model = GPT3(_tiny())
    with torch.no_grad():
        model.blocks[0].attn.c_attn.bias.fill_(1.0)
    with pytest.raises(ValueError, match="GPT-Neo has no such bias"):
        gpt_neo_state_dict(model)
    with pytest.raises(ValueError, match="reads at most n_positions=20"):
        model(torch.zeros(1, 21, dtype=torch.long))
