"""Tests for ``dlabc.language_models.t5``.

The buckets are compared with Hugging Face's ``T5Attention._relative_position_bucket``
over every relative position from -300 to 300, the bias table with its
``compute_bias`` (with and without an offset, as in cached decoding); the whole model
with ``T5ForConditionalGeneration`` built from tiny ``T5Config``s, the weights copied
under Hugging Face's names (``hf_t5_names``), in float64, for v1.0 (ReLU, tied and
rescaled output) and v1.1 (gated GELU, no rescale), with padded sources, and the
gradients. Hugging Face computes the mean square of its T5LayerNorm in float32 whatever
the input's precision; the float64 comparisons patch it to the input's precision, and
one test compares the unpatched model to float32's precision. Greedy decoding is
compared with ``generate`` and with itself without the cache, the loss with the one
Hugging Face computes from ``labels``, the parameter counts of the published
configurations with Hugging Face's model built on the meta device and with the paper's
sizes. Span corruption is checked on the paper's own example and, on random masks,
against the counts its definition fixes and by rebuilding the text from input and
target. Bad input must fail clearly.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers.models.t5.modeling_t5 as hf_t5

import transformers
from dlabc.language_models import count_parameters
from dlabc.language_models.t5 import (
    CONFIGS,
    EOS,
    LETTERS,
    NUMBER_WORDS,
    PAD,
    PUBLISHED_SIZES,
    T5,
    TASKS,
    CharTokenizer,
    RelativePositionBias,
    T5Config,
    greedy_decode,
    hf_t5_names,
    make_batch,
    make_task_example,
    random_spans_noise_mask,
    relative_position_bucket,
    replace_spans,
    seq2seq_loss,
    span_corruption,
)
from transformers import T5ForConditionalGeneration

transformers.logging.set_verbosity_error()
F64 = dict(atol=1e-10, rtol=1e-10)


def _float64_norm(self, hidden_states):
    """T5LayerNorm's formula in the input's precision (no float32 mean square)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def float64_norm(monkeypatch):
    monkeypatch.setattr(hf_t5.T5LayerNorm, "forward", _float64_norm)


def _pair(ffn="relu", tie=True, n_decoder_layers=None, seed=0):
    """Our tiny T5 with random weights (norm scales too), and Hugging Face's with them."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=37,
        d_model=24,
        d_kv=8,
        d_ff=40,
        n_layers=2,
        n_heads=4,
        n_decoder_layers=n_decoder_layers,
        num_buckets=8,
        max_distance=20,
        dropout=0.0,
        ffn=ffn,
        tie_embeddings=tie,
    )
    ours = T5(config).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        if ours.head is not None:  # Hugging Face ties lm_head to shared, always
            ours.head.weight.copy_(ours.embed.weight)
    hf_config = transformers.T5Config(
        vocab_size=37,
        d_model=24,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=n_decoder_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        feed_forward_proj=ffn,
        tie_word_embeddings=tie,  # False: no d_model**-0.5 rescale (v1.1)
        attn_implementation="eager",
        decoder_start_token_id=PAD,
    )
    hf = T5ForConditionalGeneration(hf_config).double().eval()
    hf.load_state_dict(hf_t5_names(ours.state_dict()))
    return ours, hf


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 37, (3, 11), generator=g)
    x[0, 7:] = PAD  # a padded source
    y = torch.randint(2, 37, (3, 6), generator=g)
    y[:, 0] = PAD  # the decoder starts from PAD
    return x, y


# ------------------------------------------------------------------ buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(
    ("num_buckets", "max_distance"), [(32, 128), (8, 20), (16, 64), (6, 7), (64, 40)]
)
def test_buckets_equal_hugging_faces(bidirectional, num_buckets, max_distance):
    n = torch.arange(-300, 301)
    ours = relative_position_bucket(n, bidirectional, num_buckets, max_distance)
    reference = hf_t5.T5Attention._relative_position_bucket(
        n, bidirectional, num_buckets, max_distance
    )
    assert torch.equal(ours, reference)
    assert ours.min() >= 0 and ours.max() < num_buckets


def test_buckets_closed_form_for_t5s_defaults():
    n = torch.arange(-200, 201)
    b = relative_position_bucket(n, True, 32, 128)
    # exact for |n| < 8, the upper half for keys after the query
    assert torch.equal(b[200 - 7 : 200 + 1], torch.arange(7, -1, -1))
    assert torch.equal(b[201:208], 16 + torch.arange(1, 8))
    assert b[200 - 128] == 15 and b[0] == 15 and b[-1] == 31  # beyond max_distance
    causal = relative_position_bucket(n, False, 32, 128)
    assert (causal[200:] == 0).all()  # the future shares bucket 0 with n = 0
    assert torch.equal(causal[200 - 15 : 201], torch.arange(15, -1, -1))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("offset", [0, 5])
def test_bias_table_equals_compute_bias(bidirectional, offset):
    torch.manual_seed(2)
    config = transformers.T5Config(
        d_model=16,
        d_kv=4,
        num_heads=4,
        relative_attention_num_buckets=10,
        relative_attention_max_distance=30,
        is_decoder=not bidirectional,
    )
    hf = hf_t5.T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    ours = RelativePositionBias(4, bidirectional, 10, 30)
    hf.relative_attention_bias.weight.data.copy_(ours.weight.data)
    expected = hf.compute_bias(3, 40, past_seen_tokens=offset)
    assert torch.equal(ours(3, 40, offset), expected)


# ------------------------------------------------------------- the model


@pytest.mark.parametrize(("ffn", "tie"), [("relu", True), ("gated-gelu", False)])
def test_t5_equals_t5_for_conditional_generation(float64_norm, ffn, tie):
    ours, hf = _pair(ffn, tie)
    x, y = _inputs()
    logits = ours(x, y)
    expected = hf(input_ids=x, attention_mask=(x != PAD).long(), decoder_input_ids=y)
    torch.testing.assert_close(logits, expected.logits, **F64)
    # the encoder alone
    memory = hf.encoder(input_ids=x, attention_mask=(x != PAD).long())
    torch.testing.assert_close(ours.encode(x), memory.last_hidden_state, **F64)


def test_t5_gradients_equal_hugging_faces(float64_norm):
    ours, hf = _pair(n_decoder_layers=3, seed=3)
    x, y = _inputs(4)
    weights = torch.randn(3, 6, 37, dtype=torch.float64)
    (ours(x, y) * weights).sum().backward()
    mask = (x != PAD).long()
    logits = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
    (logits * weights).sum().backward()
    hf_params = dict(hf.named_parameters())  # the tied embedding once, as "shared"
    for name, p in ours.named_parameters():
        hf_name = next(iter(hf_t5_names({name: p})))
        torch.testing.assert_close(p.grad, hf_params[hf_name].grad, **F64)


def test_t5_equals_hugging_face_to_float32_with_its_own_norm():
    ours, hf = _pair(seed=5)
    x, y = _inputs(6)
    expected = hf(input_ids=x, attention_mask=(x != PAD).long(), decoder_input_ids=y)
    torch.testing.assert_close(ours(x, y), expected.logits, atol=1e-5, rtol=1e-5)


def test_loss_equals_hugging_faces_loss_from_labels(float64_norm):
    ours, hf = _pair(seed=7)
    x, _ = _inputs(8)
    targets = torch.tensor([[5, 6, 7, EOS], [9, EOS, PAD, PAD], [3, 3, EOS, PAD]])
    labels = targets.masked_fill(targets == PAD, -100)
    expected = hf(input_ids=x, attention_mask=(x != PAD).long(), labels=labels).loss
    torch.testing.assert_close(seq2seq_loss(ours, x, targets), expected, **F64)


def test_greedy_decoding_with_and_without_cache_equals_generate(float64_norm):
    ours, hf = _pair(seed=9)
    with torch.no_grad():  # larger weights, so that the tokens vary
        for p in ours.parameters():
            p.mul_(2.0)
    hf.load_state_dict(hf_t5_names(ours.state_dict()))
    x, _ = _inputs(10)
    cached = greedy_decode(ours, x, 8)
    assert torch.equal(cached, greedy_decode(ours, x, 8, use_cache=False))
    expected = hf.generate(
        input_ids=x,
        attention_mask=(x != PAD).long(),
        max_new_tokens=8,
        do_sample=False,
        num_beams=1,
        decoder_start_token_id=PAD,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )[:, 1:]
    assert torch.equal(cached[:, : expected.shape[1]], expected)
    assert len(set(cached.flatten().tolist())) >= 2  # the rows differ


def test_cached_logits_equal_the_full_decoder():
    ours, _ = _pair(seed=11)
    x, y = _inputs(12)
    mask = x != PAD
    memory = ours.encode(x)
    full = ours.decode(y, memory, mask)
    cache = ours.new_cache(memory)
    steps = [ours.decode(y[:, :2], memory, mask, cache)]  # two positions at once
    steps += [ours.decode(y[:, t : t + 1], memory, mask, cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-12, rtol=1e-12)


def test_dropout_acts_only_in_training():
    config = T5Config(vocab_size=11, d_model=8, d_kv=2, d_ff=8, n_layers=1, n_heads=2)
    model = T5(config)
    x, y = torch.randint(2, 11, (2, 5)), torch.randint(2, 11, (2, 4))
    model.eval()
    assert torch.equal(model(x, y), model(x, y))
    model.train()
    assert not torch.equal(model(x, y), model(x, y))


# -------------------------------------------------------- published sizes


@pytest.mark.parametrize("name", ["t5-small", "t5-base"])
def test_parameter_counts_equal_hugging_faces(name):
    c = CONFIGS[name]
    hf_config = transformers.T5Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_kv=c.d_kv,
        d_ff=c.d_ff,
        num_layers=c.n_layers,
        num_heads=c.n_heads,
    )
    expected = count_parameters(lambda: T5ForConditionalGeneration(hf_config))
    assert count_parameters(lambda: T5(c)) == expected


def test_parameter_counts_are_the_papers_sizes():
    assert list(CONFIGS) == list(PUBLISHED_SIZES)
    for name, config in CONFIGS.items():
        count = count_parameters(lambda config=config: T5(config))
        assert abs(count / PUBLISHED_SIZES[name] - 1) < 0.05, name


# --------------------------------------------------------- span corruption


def test_span_corruption_reproduces_the_papers_example():
    words = "Thank you for inviting me to your party last week .".split()
    mask = [w in ("for", "inviting", "last") for w in words]
    inputs, targets = span_corruption(words, mask, ["<X>", "<Y>", "<Z>"])
    assert " ".join(inputs) == "Thank you <X> me to your party <Y> week ."
    assert " ".join(targets) == "<X> for inviting <Y> last <Z>"


@pytest.mark.parametrize("length", [2, 5, 30, 31, 100, 512])
def test_random_masks_have_the_counts_the_definition_fixes(length):
    rng = random.Random(length)
    for _ in range(20):
        mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
        n_noise = min(max(round(0.15 * length), 1), length - 1)
        starts = [i for i in range(length) if mask[i] and (i == 0 or not mask[i - 1])]
        assert len(mask) == length and sum(mask) == n_noise
        assert len(starts) == max(1, min(round(n_noise / 3), n_noise))
        assert not mask[0]  # a kept span first


def test_random_masks_are_random_and_average_the_mean_span_length():
    rng = random.Random(0)
    masks = [tuple(random_spans_noise_mask(100, 0.15, 3.0, rng)) for _ in range(300)]
    assert len(set(masks)) > 250  # not the same mask each time (unlike short inputs
    # in some reimplementations): all masks with these counts are possible
    lengths = []
    for mask in masks:
        run = 0
        for m in (*mask, False):
            if m:
                run += 1
            elif run:
                lengths.append(run)
                run = 0
    assert sum(lengths) / len(lengths) == pytest.approx(3.0, abs=1e-12)  # 15 / 5
    assert max(lengths) > 6 and min(lengths) == 1


def test_input_and_target_rebuild_the_text():
    rng = random.Random(3)
    tokens = list(range(100, 160))
    sentinels = [-(i + 1) for i in range(60)]
    for _ in range(50):
        mask = random_spans_noise_mask(len(tokens), 0.3, 2.0, rng)
        inputs, targets = span_corruption(tokens, mask, sentinels)
        fill = {}  # sentinel -> the tokens after it in the target
        for t in targets:
            if t < 0:
                current = fill.setdefault(t, [])
            else:
                current.append(t)
        rebuilt = [u for t in inputs for u in (fill[t] if t < 0 else [t])]
        assert rebuilt == tokens
        assert len(inputs) + len(targets) == len(tokens) + 2 * sum(
            1 for s in sentinels if s in inputs
        ) + (1 if not mask[-1] else 0)


def test_replace_spans_numbers_runs_in_order():
    out = replace_spans("abcdefg", [1, 1, 0, 1, 0, 0, 1], ["X", "Y", "Z"])
    assert out == ["X", "c", "Y", "e", "f", "Z"]


# ------------------------------------------------------------- toy tasks


def test_tokenizer_round_trip_and_sentinels():
    tok = CharTokenizer("abc :", n_sentinels=3)
    assert tok.vocab_size == 2 + 5 + 3
    ids = tok.encode("ab c")
    assert ids[-1] == EOS and tok.decode(ids) == "ab c"
    assert [tok.sentinel(i) for i in range(3)] == [9, 8, 7]  # counting down
    assert tok.decode([2, tok.sentinel(1), 3, EOS, 4]) == "a<1>b"


def test_task_examples_are_correct():
    rng = random.Random(0)
    for _ in range(50):
        for task in TASKS:
            source, target = make_task_example(task, rng)
            prefix, _, body = source.partition(": ")
            assert prefix == task
            if task == "add":
                a, b = body.split(" plus ")
                assert NUMBER_WORDS.index(target) == (
                    NUMBER_WORDS.index(a) + NUMBER_WORDS.index(b)
                )
            else:
                assert set(body) <= set(LETTERS) and 3 <= len(body) <= 8
                expected = {"reverse": body[::-1], "sort": "".join(sorted(body))}
                assert target == expected.get(task, body)


def test_make_batch_pads_and_ends_with_eos():
    tok = CharTokenizer("abc")
    x, y = make_batch([("ab", "c"), ("a", "abc")], tok)
    assert x.tolist() == [[2, 3, EOS], [2, EOS, PAD]]
    assert y.tolist() == [[4, EOS, PAD, PAD], [2, 3, 4, EOS]]


# -------------------------------------------------------------- bad input

_model = T5(T5Config(vocab_size=11, d_model=8, d_kv=2, d_ff=8, n_layers=1, n_heads=2))

BAD_INPUT = [
    pytest.param(lambda: T5Config(d_model=0), ValueError, "d_model must be positive"),
    pytest.param(lambda: T5Config(ffn="swiglu"), ValueError, "ffn must be one of"),
    pytest.param(lambda: T5Config(dropout=1.0), ValueError, "dropout must be in"),
    pytest.param(lambda: T5Config(num_buckets=2), ValueError, "num_buckets must be"),
    pytest.param(
        lambda: T5Config(num_buckets=32, max_distance=8), ValueError, "max_distance"
    ),
    pytest.param(lambda: T5Config(tie_embeddings=1), TypeError, "tie_embeddings"),
    pytest.param(lambda: T5({"d_model": 8}), TypeError, "config must be a T5Config"),
    pytest.param(
        lambda: _model(torch.full((1, 3), 11), torch.zeros(1, 2, dtype=torch.long)),
        ValueError,
        r"input_ids must lie in \[0, 11\)",
    ),
    pytest.param(
        lambda: _model(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 2)),
        TypeError,
        "decoder_input_ids must have dtype torch.int64",
    ),
    pytest.param(
        lambda: _model(torch.ones(3, dtype=torch.long), torch.zeros(1, 2).long()),
        ValueError,
        "input_ids must have 2 dimensions",
    ),
    pytest.param(
        lambda: _model(
            torch.ones(1, 3, dtype=torch.long),
            torch.zeros(1, 2, dtype=torch.long),
            torch.ones(1, 4),
        ),
        ValueError,
        "attention_mask",
    ),
    pytest.param(
        lambda: _model.new_cache(torch.zeros(3, 8)),
        ValueError,
        "memory must have 3 dimensions",
    ),
    pytest.param(
        lambda: greedy_decode(_model, torch.ones(1, 3, dtype=torch.long), 0),
        ValueError,
        "max_new_tokens must be positive",
    ),
    pytest.param(
        lambda: greedy_decode(torch.nn.Linear(2, 2), torch.ones(1, 3).long(), 3),
        TypeError,
        "model must be a T5",
    ),
    pytest.param(
        lambda: random_spans_noise_mask(1), ValueError, "length must be at least 2"
    ),
    pytest.param(
        lambda: random_spans_noise_mask(10, noise_density=0.0),
        ValueError,
        "noise_density must be in",
    ),
    pytest.param(
        lambda: random_spans_noise_mask(10, mean_span_length=0.5),
        ValueError,
        "mean_span_length must be in",
    ),
    pytest.param(
        lambda: span_corruption("abc", [True], ["X", "Y"]),
        ValueError,
        "same length",
    ),
    pytest.param(
        lambda: span_corruption("abc", [True, False, True], ["X", "Y"]),
        ValueError,
        "sentinels must hold at least 3",
    ),
    pytest.param(lambda: CharTokenizer("aa"), ValueError, "must not repeat"),
    pytest.param(lambda: CharTokenizer("ab").encode("abc"), ValueError, "outside"),
    pytest.param(
        lambda: CharTokenizer("ab", 2).sentinel(2), ValueError, r"i must lie in"
    ),
    pytest.param(
        lambda: make_task_example("multiply", random.Random(0)),
        ValueError,
        "task must be one of",
    ),
    pytest.param(lambda: hf_t5_names([]), TypeError, "state_dict must be a dict"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
