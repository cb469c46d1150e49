"""Tests for ``dlabc.modern_llm.speculative``.

The rule against its closed forms: the exact marginal of accept/reject and residual
equals the target's $p$ to 1e-12 (Leviathan et al.'s and Chen et al.'s proof), the
acceptance rate is $1 - \\mathrm{TV}$, the number of accepted drafts follows the
acceptance rate, and the expected tokens per call and speed-up are Leviathan et al.'s
sums.
Statistically, with a fixed generator and chi-square bounds that fail by chance with
probability 1e-6: tokens emitted by ``verify`` follow $p$, and the first two tokens of
``speculative_generate`` with tiny random models follow the target's exact joint
distribution (and, so that the test can fail, not the draft's). Greedy speculative
decoding equals Hugging Face's greedy ``generate`` of ``LlamaForCausalLM`` holding the
same weights, token for token, with three kinds of drafts and several ``gamma``, and a
model draft (with its rolled-back cache) accepts, call by call, exactly the guesses
that one uncached pass of it over the target's text agrees with;
``skip_layers`` equals a ``LlamaForCausalLM`` built with only those layers, and
shares the target's tensors; ``truncate_cache`` leaves a cache equal to one that never
saw the forgotten positions, and rolling caches, which cannot be rolled back, are
refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2
from transformers.utils import logging

from dlabc.improvements.modern_block import BlockLM, hf_llama_names
from dlabc.language_models.gpt2 import generate
from dlabc.modern_llm.speculative import (
    ModelDraft,
    PromptLookup,
    SpeculativeStats,
    acceptance_rate,
    expected_speedup,
    expected_tokens_per_call,
    probabilities,
    residual,
    rule_marginal,
    skip_layers,
    speculative_generate,
    truncate_cache,
    verify,
)
from transformers import LlamaConfig, LlamaForCausalLM

logging.set_verbosity_error()
F64 = dict(atol=1e-12, rtol=1e-12)
HF_F32 = dict(atol=2e-5, rtol=2e-5)
P_FAIL = 1e-6  # the chance that a statistical test fails although the code is right


def _model(vocab: int, n_layers: int, seed: int, scale: float = 1.0) -> BlockLM:
    """A tiny random BlockLM in float64; ``scale`` sharpens its distributions."""
    torch.manual_seed(seed)
    model = BlockLM(vocab, 16, 2, n_layers, 24, n_kv_heads=1).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.head.weight.mul_(scale)
    return model


def _hf(model: BlockLM) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=model.d_model,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        num_hidden_layers=model.n_layers,
        vocab_size=model.vocab_size,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    hf = LlamaForCausalLM(config).double().eval()
    hf.load_state_dict(hf_llama_names(model.state_dict()))
    return hf


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of ``counts`` against ``probs`` (cells with p > 0) and the
    bound it exceeds with probability ``P_FAIL`` when the counts follow ``probs``."""
    keep = probs > 0
    expected = counts.sum() * probs[keep]
    stat = ((counts[keep] - expected) ** 2 / expected).sum().item()
    # mass where probs is 0 makes any statistic infinite
    if counts[~keep].sum() > 0:
        stat = math.inf
    return stat, chi2.isf(P_FAIL, int(keep.sum()) - 1)


def _random_pq(vocab: int, seed: int, rows: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    p = (2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).softmax(-1)
    q = (2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).softmax(-1)
    return p, q


# ------------------------------------------------------------------ the rule


def test_probabilities_are_the_softmax_and_greedy_is_one_hot():
    logits = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(
        probabilities(logits, 0.7), torch.softmax(logits / 0.7, -1), **F64
    )
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 7).double()
    assert torch.equal(probabilities(logits, 0), one_hot)


def test_acceptance_rate_is_one_minus_total_variation():
    p, q = _random_pq(11, 0, rows=4)
    tv = 0.5 * (p - q).abs().sum(-1)
    torch.testing.assert_close(acceptance_rate(p, q), 1 - tv, **F64)
    torch.testing.assert_close(acceptance_rate(p, p), torch.ones(4).double(), **F64)


@pytest.mark.parametrize("vocab", [2, 5, 50])
def test_the_rule_marginal_is_exactly_p(vocab):
    p, q = _random_pq(vocab, vocab, rows=3)
    q[0, 0] = 0  # the draft never proposes token 0 ...
    p[1, 1] = 0  # ... the target never emits token 1
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    torch.testing.assert_close(rule_marginal(p, q), p, **F64)
    torch.testing.assert_close(rule_marginal(p, p), p, **F64)
    # the same sum written out by brute force over the drafted token x
    marginal = torch.zeros(vocab, dtype=torch.float64)
    for x in range(vocab):
        accept = min(1.0, (p[2, x] / q[2, x]).item())
        marginal[x] += q[2, x] * accept
        marginal += q[2, x] * (1 - accept) * residual(p[2], q[2])
    torch.testing.assert_close(marginal, p[2], **F64)


def test_residual_is_the_normalised_excess():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(residual(p, q), expected, **F64)
    torch.testing.assert_close(residual(p, p), p, **F64)  # never used: no rejection


def test_verify_emits_tokens_distributed_as_p():
    vocab, n = 4, 3000
    p, q = _random_pq(vocab, 3, rows=2)  # one drafted position, and the bonus one
    g = torch.Generator().manual_seed(0)
    first = torch.zeros(vocab, dtype=torch.float64)
    n_accepted = torch.zeros(2, dtype=torch.float64)
    for _ in range(n):
        x = torch.multinomial(q[0], 1, generator=g)
        accepted, token = verify(p, q, x, g)
        first[x if accepted else token] += 1
        n_accepted[accepted] += 1
    stat, bound = _chi_square(first, p[0])
    assert stat < bound
    assert _chi_square(first, q[0])[0] > bound  # the draft's distribution is rejected
    beta = acceptance_rate(p[0], q[0]).item()
    stat, bound = _chi_square(n_accepted, torch.tensor([1 - beta, beta]).double())
    assert stat < bound


def test_greedy_verify_keeps_the_agreeing_prefix():
    target = torch.tensor([3, 1, 4, 1])  # the target's argmax at 4 positions
    p = torch.nn.functional.one_hot(target, 5).double()
    for drafted, n in (([3, 1, 4], 3), ([3, 2, 4], 1), ([0, 1, 4], 0)):
        x = torch.tensor(drafted)
        q = torch.nn.functional.one_hot(x, 5).double()
        accepted, token = verify(p, q, x)
        assert accepted == n and token.item() == target[n].item()


@pytest.mark.parametrize(("alpha", "gamma"), [(0.0, 3), (0.6, 1), (0.8, 5), (1.0, 4)])
def test_expected_tokens_per_call_is_leviathans_closed_form(alpha, gamma):
    # brute force: the number accepted is min(G, gamma), G geometric, plus one token
    probs = [alpha**i * (1 - alpha) for i in range(gamma)] + [alpha**gamma]
    brute = sum((i + 1) * pr for i, pr in enumerate(probs))
    assert expected_tokens_per_call(alpha, gamma) == pytest.approx(brute, abs=1e-12)
    if alpha < 1:
        closed = (1 - alpha ** (gamma + 1)) / (1 - alpha)
        assert expected_tokens_per_call(alpha, gamma) == pytest.approx(closed)


def test_expected_speedup_is_theorem_3_8():
    closed = (1 - 0.8**6) / ((1 - 0.8) * (5 * 0.05 + 1))
    assert expected_speedup(0.8, 5, 0.05) == pytest.approx(closed, abs=1e-12)
    assert expected_speedup(0.5, 3, 0.0) == pytest.approx(1.875)


# ---------------------------------------------------------------- the drafts


def test_truncate_cache_equals_a_cache_that_never_saw_the_rest():
    model = _model(13, 2, seed=1)
    ids = torch.randint(13, (1, 9))
    cache = model.new_cache()
    model(ids, cache)
    truncate_cache(cache, 5)
    assert cache[0].seen == 5 and len(cache[1]) == 5
    fresh = model.new_cache()
    model(ids[:, :5], fresh)
    follow = torch.randint(13, (1, 3))
    torch.testing.assert_close(model(follow, cache), model(follow, fresh), **F64)
    truncate_cache(cache, 20)  # beyond what it holds: nothing changes
    assert cache[0].seen == 8


def test_skip_layers_is_a_llama_with_those_layers_and_shares_tensors():
    target = _model(17, 4, seed=2)
    draft = skip_layers(target, [0, 3])
    assert draft.n_layers == 2 and draft.blocks[1] is target.blocks[3]
    assert draft.head.weight.data_ptr() == target.head.weight.data_ptr()
    assert draft.embed.weight.data_ptr() == target.embed.weight.data_ptr()
    reference = _model(17, 2, seed=3)
    state = target.state_dict()
    for ours, theirs in ((0, 0), (1, 3)):  # block 3 becomes block 1
        for key, value in state.items():
            if key.startswith(f"blocks.{theirs}."):
                reference.state_dict()[key.replace(str(theirs), str(ours), 1)].copy_(
                    value
                )
    for name in ("embed.weight", "norm.weight", "head.weight"):
        reference.state_dict()[name].copy_(state[name])
    ids = torch.randint(17, (2, 6))
    torch.testing.assert_close(draft(ids), reference(ids), **F64)
    # Hugging Face's Llama computes its RMSNorm and RoPE tables in float32
    torch.testing.assert_close(draft(ids), _hf(reference)(ids).logits, **HF_F32)


def test_prompt_lookup_copies_what_followed_the_latest_match():
    lookup = PromptLookup(10, max_ngram=2)
    seq = torch.tensor([[1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3]])
    x, q = lookup.propose(seq, 3, 0.0)
    assert x.tolist() == [[7, 8, 2]]  # after the latest earlier "2 3"
    assert torch.equal(q, torch.nn.functional.one_hot(x[0], 10).float())
    x, _ = lookup.propose(torch.tensor([[5, 6, 7]]), 3, 0.0)
    assert x.shape == (1, 0)  # nothing to copy


# ------------------------------------------------------------------ the loop


def _greedy_accepted(draft_model, text: torch.Tensor, start: int, n_new: int, gamma):
    """The drafts each target call of greedy speculative decoding accepts, from one
    uncached pass of the draft over the target's greedy ``text``: from position t it
    keeps its guesses up to the first one that is not the target's token."""
    with torch.no_grad():
        guess = draft_model(text)[0, :-1].argmax(-1)  # guess[j]: its choice for j + 1
    match = (guess == text[0, 1:]).tolist()
    t, accepted = start, []
    while t < start + n_new:
        n = 0
        while n < gamma and match[t + n - 1]:
            n += 1
        accepted.append(n)
        t += n + 1
    return accepted


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_speculative_decoding_equals_hf_greedy_generate(gamma):
    target = _model(23, 3, seed=4, scale=3.0)
    prompt = torch.tensor([[1, 5, 7, 5, 7, 2]])
    longer = _hf(target).generate(  # gamma more tokens: what the last drafts meet
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=14 + gamma,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    reference = longer[:, : 6 + 14]
    models = {
        "layers skipped": skip_layers(target, [0, 2]),
        "another model": _model(23, 1, seed=5, scale=3.0),
    }
    drafts = {name: ModelDraft(m) for name, m in models.items()}
    drafts["prompt lookup"] = PromptLookup(23)
    for name, draft in drafts.items():
        out, stats = speculative_generate(target, draft, prompt, 14, gamma)
        assert torch.equal(out, reference), name
        if name in models:  # the draft's cache, rolled back, guesses as if fresh
            expected = _greedy_accepted(models[name], longer, 6, 14, gamma)
            assert stats.accepted == expected, name
        assert all(
            0 <= n <= k <= gamma
            for n, k in zip(stats.accepted, stats.drafted, strict=True)
        )
        made = sum(stats.accepted) + stats.target_calls
        assert 14 <= made <= 14 + gamma  # the last call may overshoot
    assert stats.target_calls < 14 or gamma == 1  # some drafts were accepted


def test_decoding_stops_after_eos_as_plain_generate_does():
    target = _model(23, 2, seed=9, scale=3.0)
    prompt = torch.tensor([[4, 8, 15, 16]])
    plain = generate(target, prompt, 14, temperature=0)
    eos = plain[0, 4 + 7].item()  # a token the greedy text makes
    expected = generate(target, prompt, 14, temperature=0, eos_id=eos)
    assert expected.shape[1] < plain.shape[1]
    for draft in (ModelDraft(skip_layers(target, [1])), PromptLookup(23)):
        out, _ = speculative_generate(target, draft, prompt, 14, 3, eos_id=eos)
        assert torch.equal(out, expected)


def test_stats_count_tokens_per_call_and_acceptance():
    stats = SpeculativeStats(drafted=[4, 4, 2], accepted=[4, 1, 0])
    assert stats.target_calls == 3
    assert stats.tokens_per_call == pytest.approx((5 + 2 + 1) / 3)
    assert stats.acceptance == pytest.approx(5 / 10)


class _FixedDraft:
    """A draft that ignores the context: every token from the same ``q``."""

    def __init__(self, q: torch.Tensor) -> None:
        self.q = q

    def propose(self, seq, gamma, temperature, generator=None):
        x = torch.multinomial(self.q, gamma, replacement=True, generator=generator)
        return x[None], self.q.expand(gamma, -1)

    def rollback(self, length):
        pass


def test_sampled_tokens_follow_the_target_not_the_draft():
    vocab, n_runs, prompt = 3, 300, torch.tensor([[1, 2, 0]])
    target = _model(vocab, 1, seed=6, scale=4.0)
    with torch.no_grad():  # the exact joint of the first two tokens, p(a) p(b | a)
        first = target(prompt)[0, -1].softmax(-1)  # (V,)
        pairs = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        second = target(pairs)[:, -1].softmax(-1)  # (V, V)
    joint = (first[:, None] * second).flatten()
    q = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    draft = _FixedDraft(q)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    drafted = accepted = 0
    for _ in range(n_runs):
        out, stats = speculative_generate(target, draft, prompt, 2, 2, 1.0, g)
        counts[out[0, 3] * vocab + out[0, 4]] += 1
        drafted, accepted = drafted + sum(stats.drafted), accepted + sum(stats.accepted)
    stat, bound = _chi_square(counts, joint)
    assert stat < bound
    # so that the test can fail: the draft's own joint is told apart
    assert _chi_square(counts, torch.outer(q, q).flatten())[0] > bound
    assert 0.1 < accepted / drafted < 0.9  # both accepts and rejections happened


def test_model_draft_proposes_from_its_softmax_and_keeps_its_cache():
    model = _model(11, 2, seed=8)
    draft, seq = ModelDraft(model), torch.tensor([[3, 1, 4, 1, 5]])
    g = torch.Generator().manual_seed(1)
    x, q = draft.propose(seq, 3, 0.8, g)
    full = torch.cat([seq, x], 1)
    expected = (model(full)[0, 4:7] / 0.8).softmax(-1)  # the q_i x_i was drawn from
    torch.testing.assert_close(q, expected, **F64)
    assert draft.cache[0].seen == 7  # it has read all but the last draft
    draft.rollback(6)
    assert draft.cache[0].seen == 6


# ------------------------------------------------------------------ bad input


def _rolling(model: BlockLM) -> BlockLM:
    """``model`` with a rolling cache of 4 positions (a sliding window's)."""
    from dlabc.improvements.gqa_kv_cache import LayerKVCache

    model.make_cache = lambda: LayerKVCache(keep=4)
    return model


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda m: speculative_generate(
                m, PromptLookup(9), torch.zeros(2, 3).long(), 4
            ),
            ValueError,
            "one non-empty sequence",
        ),
        (
            lambda m: speculative_generate(m, PromptLookup(9), torch.zeros(1, 3), 4),
            TypeError,
            "ids must have dtype",
        ),
        (
            lambda m: speculative_generate(
                m, PromptLookup(9), torch.zeros(1, 3).long(), 0
            ),
            ValueError,
            "max_new_tokens must be positive",
        ),
        (
            lambda m: speculative_generate(
                m, PromptLookup(9), torch.zeros(1, 3).long(), 4, gamma=0
            ),
            ValueError,
            "gamma must be positive",
        ),
        (
            lambda m: speculative_generate(
                m, PromptLookup(9), torch.zeros(1, 3).long(), 4, temperature=-1.0
            ),
            ValueError,
            "temperature must be in",
        ),
        (
            lambda m: speculative_generate(m, "draft", torch.zeros(1, 3).long(), 4),
            TypeError,
            "draft must have propose and rollback",
        ),
        (
            lambda m: speculative_generate(
                "m", PromptLookup(9), torch.zeros(1, 3).long(), 4
            ),
            TypeError,
            "target must be a DecoderLM",
        ),
        (
            lambda m: speculative_generate(
                m, PromptLookup(9), torch.zeros(1, 3).long(), 4, eos_id=9
            ),
            ValueError,
            "eos_id must be a token id",
        ),
        (lambda m: skip_layers(m, [0, 5]), ValueError, "block indices in"),
        (lambda m: skip_layers(m, []), ValueError, "non-empty list"),
        (lambda m: skip_layers("m", [0]), TypeError, "model must be a DecoderLM"),
        (lambda m: ModelDraft(None), TypeError, "model must be a DecoderLM"),
        (lambda m: ModelDraft(_rolling(m)), ValueError, "rolling cache cannot"),
        (
            lambda m: speculative_generate(
                _rolling(m), PromptLookup(9), torch.zeros(1, 3).long(), 4
            ),
            ValueError,
            "target must keep a full key-value cache",
        ),
        (lambda m: probabilities(torch.zeros(3), -0.5), ValueError, "temperature"),
        (lambda m: truncate_cache(m.new_cache(), -1), ValueError, "length must be"),
        (lambda m: truncate_cache([1], 0), TypeError, "list of Cache"),
        (lambda m: expected_tokens_per_call(1.5, 3), ValueError, "alpha must be in"),
        (lambda m: expected_tokens_per_call(0.5, 0), ValueError, "gamma must be"),
        (lambda m: expected_speedup(0.5, 3, -0.1), ValueError, "c must be in"),
        (lambda m: PromptLookup(0), ValueError, "vocab_size must be positive"),
    ],
)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call(_model(9, 2, seed=0))


def test_a_rolling_cache_that_lost_the_position_cannot_be_rolled_back():
    from dlabc.improvements.gqa_kv_cache import LayerKVCache

    cache = [LayerKVCache(keep=3)]
    cache[0].update(torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4))
    with pytest.raises(ValueError, match="cache starts at position 3"):
        truncate_cache(cache, 2)
    # position 2 is gone, and after a cut to 5 the next token would need it again
    with pytest.raises(ValueError, match="needs the positions from 2"):
        truncate_cache(cache, 5)
    truncate_cache(cache, 6)  # nothing to cut
    roomy = [LayerKVCache(keep=8)]  # it still holds every position: no problem
    roomy[0].update(torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4))
    truncate_cache(roomy, 4)
    assert roomy[0].seen == 4 and len(roomy[0]) == 4
