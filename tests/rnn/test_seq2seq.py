"""Tests for ``dlabc.rnn.seq2seq``.

References no one here wrote: the encoder against unidirectional ``nn.GRU`` modules
holding the forward and the reverse weights of its bidirectional GRU, run on each
sentence alone (no padding, no packing); additive attention against its formula
computed with Python loops over the batch and the source positions, and against
finite differences (``gradcheck``); the decoder's teacher-forced pass against its own
step function called in a loop; the loss against ``-log softmax`` averaged by hand;
beam search against greedy decoding (beam size 1, and never less probable) and against
brute-force enumeration of every output of a tiny model.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.rnn.seq2seq import (
    BOS,
    EOS,
    PAD,
    AdditiveAttention,
    Decoder,
    Encoder,
    Memory,
    Seq2Seq,
    Vocab,
    exact_match,
    sequence_loss,
    source_mask,
    train_seq2seq,
)

F64 = dict(atol=1e-10, rtol=1e-10)


def random_src(batch, length, vocab_size, generator=None, min_length=1):
    """Random ids (no specials) padded at the end; the first row has the full length."""
    lengths = torch.randint(min_length, length + 1, (batch,), generator=generator)
    lengths[0] = length
    src = torch.randint(3, vocab_size, (batch, length), generator=generator)
    src[torch.arange(length) >= lengths[:, None]] = PAD
    return src, lengths


def make_model(
    src_vocab=9,
    tgt_vocab=8,
    embed=5,
    hidden=6,
    attention=True,
    dtype=torch.float64,
    sharpen=1.0,
):
    encoder = Encoder(src_vocab, embed, hidden)
    decoder = Decoder(tgt_vocab, embed, hidden + 1, 2 * hidden, attention=attention)
    model = Seq2Seq(encoder, decoder).to(dtype).eval()
    with torch.no_grad():  # peaked output distributions make the searches differ
        model.decoder.out.weight.mul_(sharpen)
    return model


# --------------------------------------------------------------------------- Vocab


def test_vocab_specials_first_then_sorted_tokens_and_round_trip():
    vocab = Vocab([["b", "a"], ["c", "a"]])
    assert vocab.tokens == ["<pad>", "<bos>", "<eos>", "a", "b", "c"]
    assert (PAD, BOS, EOS) == (0, 1, 2) and len(vocab) == 6
    assert vocab.encode(["c", "a"]) == [5, 3]
    assert vocab.encode(["c", "a"], eos=True) == [5, 3, EOS]
    batch = vocab.batch([["a"], ["b", "c", "a"]], eos=True)
    assert batch.dtype == torch.long
    assert batch.tolist() == [[3, EOS, PAD, PAD], [4, 5, 3, EOS]]
    assert vocab.decode(batch[1]) == ["b", "c", "a"]
    assert vocab.decode([BOS, 4, PAD, 5, EOS, 3]) == ["b", "c"]  # stops at <eos>


# ------------------------------------------------------------------------ source_mask


def test_source_mask_marks_the_real_tokens():
    src = torch.tensor([[4, 5, 6], [7, 0, 0], [3, 3, 0]])
    expected = [[True, True, True], [True, False, False], [True, True, False]]
    assert source_mask(src).tolist() == expected


# --------------------------------------------------------------------------- Encoder


def unidirectional_copies(encoder):
    """Two nn.GRU holding the forward and the reverse weights of the encoder's GRU."""
    rnn = encoder.rnn
    forward = nn.GRU(rnn.input_size, rnn.hidden_size, batch_first=True).double()
    backward = nn.GRU(rnn.input_size, rnn.hidden_size, batch_first=True).double()
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        getattr(forward, name).data.copy_(getattr(rnn, name))
        getattr(backward, name).data.copy_(getattr(rnn, name + "_reverse"))
    return forward, backward


@pytest.mark.parametrize(
    "batch, length, embed, hidden",
    [(1, 1, 3, 2), (4, 5, 3, 4), (7, 9, 6, 5), (3, 2, 1, 8)],
)
def test_encoder_equals_two_grus_run_on_each_sentence_alone(
    batch, length, embed, hidden
):
    generator = torch.Generator().manual_seed(batch * length)
    encoder = Encoder(11, embed, hidden).double()
    src, lengths = random_src(batch, length, 11, generator)
    annotations, summary = encoder(src)
    assert annotations.shape == (batch, length, 2 * hidden)
    assert summary.shape == (batch, 2 * hidden)
    forward, backward = unidirectional_copies(encoder)
    for b in range(batch):
        n = int(lengths[b])
        x = encoder.embedding(src[b, :n])[None]  # (1, n, E), no padding
        out_f, h_f = forward(x)
        out_b, h_b = backward(x.flip(1))  # the reverse GRU reads right to left
        expected = torch.cat([out_f[0], out_b[0].flip(0)], -1)  # (n, 2H)
        torch.testing.assert_close(annotations[b, :n], expected, **F64)
        torch.testing.assert_close(summary[b], torch.cat([h_f[0, 0], h_b[0, 0]]), **F64)
        # the summary: forward state at the last token, backward state at the first
        torch.testing.assert_close(summary[b, :hidden], annotations[b, n - 1, :hidden])
        torch.testing.assert_close(summary[b, hidden:], annotations[b, 0, hidden:])
        assert (annotations[b, n:] == 0).all()  # padding: no annotation


# --------------------------------------------------------------------------- attention


def attention_by_loops(attention, query, keys, mask):
    """e_j = v . tanh(W_q q + W_k k_j), a softmax over the real positions, and
    c = sum_j a_j k_j."""
    W_q, W_k = attention.W_q.weight, attention.W_k.weight
    v = attention.v.weight[0]
    batch, length, _ = keys.shape
    weights = torch.zeros(batch, length, dtype=keys.dtype)
    contexts = []
    for b in range(batch):
        real = [j for j in range(length) if mask[b, j]]
        scores = [v @ torch.tanh(W_q @ query[b] + W_k @ keys[b, j]) for j in real]
        top = max(s.item() for s in scores)
        exps = [math.exp(s.item() - top) for s in scores]
        for j, e in zip(real, exps, strict=True):
            weights[b, j] = e / sum(exps)
        contexts.append(sum(weights[b, j] * keys[b, j] for j in real))
    return torch.stack(contexts), weights


@pytest.mark.parametrize(
    "batch, length, d_q, d_k, d_a",
    [(1, 1, 2, 3, 4), (3, 4, 5, 6, 7), (5, 7, 3, 2, 1), (2, 9, 8, 8, 8)],
)
def test_additive_attention_equals_the_formula_by_loops(batch, length, d_q, d_k, d_a):
    attention = AdditiveAttention(d_q, d_k, d_a).double()
    query = torch.randn(batch, d_q, dtype=torch.float64)
    keys = torch.randn(batch, length, d_k, dtype=torch.float64)
    src, _ = random_src(batch, length, 9)
    mask = source_mask(src)
    context, weights = attention(query, keys, mask)
    expected_context, expected_weights = attention_by_loops(
        attention, query, keys, mask
    )
    torch.testing.assert_close(weights, expected_weights, **F64)
    torch.testing.assert_close(context, expected_context, **F64)
    assert (weights[~mask] == 0).all()  # exactly zero on padding
    torch.testing.assert_close(weights.sum(1), torch.ones(batch, dtype=torch.float64))
    # the same with the keys projected beforehand, as the decoder passes them
    again = attention(query, keys, mask, projected_keys=attention.W_k(keys))
    torch.testing.assert_close(again[0], context, rtol=0, atol=0)


def test_additive_attention_ignores_what_is_under_the_padding():
    attention = AdditiveAttention(3, 4, 5).double()
    query = torch.randn(2, 3, dtype=torch.float64)
    keys = torch.randn(2, 6, 4, dtype=torch.float64)
    mask = source_mask(torch.tensor([[3, 3, 3, 0, 0, 0], [3, 3, 3, 3, 3, 0]]))
    changed = keys.clone()
    changed[~mask] = 1e3 * torch.randn_like(changed[~mask])
    first, second = attention(query, keys, mask), attention(query, changed, mask)
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
    torch.testing.assert_close(first[1], second[1], rtol=0, atol=0)


def test_additive_attention_passes_gradcheck():
    attention = AdditiveAttention(3, 4, 5).double()
    query = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = source_mask(torch.tensor([[3, 3, 3, 3, 3], [3, 3, 0, 0, 0]]))
    assert torch.autograd.gradcheck(
        lambda q, k: attention(q, k, mask)[0], (query, keys), eps=1e-6, atol=1e-6
    )


# --------------------------------------------------------------------------- Decoder


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "summary"])
@pytest.mark.parametrize("batch, src_len, tgt_len", [(1, 1, 1), (3, 4, 5), (6, 7, 3)])
def test_teacher_forcing_equals_the_step_function_in_a_loop(
    attention, batch, src_len, tgt_len
):
    model = make_model(attention=attention)
    src, _ = random_src(batch, src_len, 9)
    tgt = torch.randint(2, 8, (batch, tgt_len))
    logits, weights = model(src, tgt)
    assert logits.shape == (batch, tgt_len, 8)
    memory = model.encode(src)
    state = model.decoder.initial_state(memory)
    prev = torch.full((batch,), BOS)
    for t in range(tgt_len):
        step_logits, state, step_weights = model.decoder.step(prev, state, memory)
        torch.testing.assert_close(logits[:, t], step_logits, **F64)
        if attention:
            torch.testing.assert_close(weights[:, t], step_weights, **F64)
            assert (step_weights[~memory.mask] == 0).all()
        else:
            assert weights is None and step_weights is None
        prev = tgt[:, t]  # teacher forcing: the true token, not the prediction


def test_decoder_without_attention_reads_only_the_summary():
    """Changing the annotations but not the summary changes nothing without attention,
    and changes the output with it."""
    for attention, should_change in ((False, False), (True, True)):
        model = make_model(attention=attention)
        src, _ = random_src(3, 4, 9)
        memory = model.encode(src)
        other = Memory(
            memory.annotations + 1.0,
            memory.mask,
            memory.summary,
            None if memory.projected is None else memory.projected + 1.0,
        )
        inputs = torch.randint(2, 8, (3, 5))
        first, _ = model.decoder(inputs, memory)
        second, _ = model.decoder(inputs, other)
        assert (not torch.allclose(first, second)) == should_change


# --------------------------------------------------------------------------- Seq2Seq


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "summary"])
def test_padding_and_batch_mates_change_nothing(attention):
    model = make_model(attention=attention)
    src, lengths = random_src(5, 6, 9)
    tgt = torch.randint(3, 8, (5, 4))
    tgt[1, 2:] = PAD
    logits, _ = model(src, tgt)
    log_p = model.sequence_log_prob(src, tgt)
    wider = F.pad(src, (0, 3), value=PAD)  # three more columns of padding
    torch.testing.assert_close(model(wider, tgt)[0], logits, **F64)
    for b in range(5):
        alone = src[b : b + 1, : int(lengths[b])]  # no padding, no batch-mates
        torch.testing.assert_close(model(alone, tgt[b : b + 1])[0][0], logits[b], **F64)
        torch.testing.assert_close(
            model.sequence_log_prob(alone, tgt[b : b + 1])[0], log_p[b], **F64
        )


def test_sequence_log_prob_sums_the_log_softmax_of_the_real_tokens():
    model = make_model()
    src, _ = random_src(3, 4, 9)
    tgt = torch.tensor([[3, 4, EOS, PAD], [5, EOS, PAD, PAD], [6, 6, 7, EOS]])
    logits, _ = model(src, tgt)
    expected = [
        sum(
            torch.log_softmax(logits[b, t], -1)[tgt[b, t]]
            for t in range(4)
            if tgt[b, t] != PAD
        )
        for b in range(3)
    ]
    torch.testing.assert_close(model.sequence_log_prob(src, tgt), torch.stack(expected))


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "summary"])
def test_greedy_decode_takes_the_argmax_and_scores_its_output(attention):
    model = make_model(attention=attention, sharpen=3.0)
    src, lengths = random_src(6, 5, 9)
    tokens, score, weights = model.greedy_decode(src, max_len=7)
    assert tokens.shape[0] == 6 and tokens.shape[1] <= 7
    assert not ((tokens == BOS).any() or (tokens == PAD).all(1).any())
    # padding only after <eos>; a row without <eos> is cut at max_len
    for row in tokens:
        ends = (row == EOS).nonzero().flatten()
        if len(ends):
            assert (row[ends[0] + 1 :] == PAD).all() and (row[: ends[0]] > EOS).all()
        else:
            assert len(row) == 7 and (row > EOS).all()
    # the score is the log-probability of the output, by teacher forcing
    torch.testing.assert_close(score, model.sequence_log_prob(src, tokens), **F64)
    # each token is the argmax (<pad>, <bos> excluded) given the tokens before it
    logits, _ = model(src, tokens)
    allowed = logits.clone()
    allowed[..., [PAD, BOS]] = -math.inf
    real = tokens != PAD
    assert (allowed.argmax(-1)[real] == tokens[real]).all()
    # batched decoding equals decoding each sentence alone
    for b in range(6):
        alone, alone_score, _ = model.greedy_decode(src[b : b + 1, : lengths[b]], 7)
        n = alone.shape[1]
        assert torch.equal(alone[0], tokens[b, :n]) and (tokens[b, n:] == PAD).all()
        torch.testing.assert_close(alone_score[0], score[b], **F64)
    if attention:
        assert weights.shape == (6, tokens.shape[1], 5)
        assert (weights[~source_mask(src)[:, None, :].expand_as(weights)] == 0).all()
    else:
        assert weights is None


# ------------------------------------------------------------------------ beam search


def brute_force(model, src, max_len):
    """The most probable output among all of them: every word sequence shorter than
    ``max_len`` followed by <eos>, and every one of ``max_len`` words without it."""
    words = range(EOS + 1, model.decoder.vocab_size)
    candidates = [
        list(w) + [EOS]
        for n in range(max_len)
        for w in itertools.product(words, repeat=n)
    ]
    candidates += [list(w) for w in itertools.product(words, repeat=max_len)]
    tgt = torch.tensor([c + [PAD] * (max_len - len(c)) for c in candidates])
    scores = model.sequence_log_prob(src[None].expand(len(tgt), -1), tgt)
    best = scores.argmax()
    return torch.tensor(candidates[best]), scores[best].item(), scores


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("attention", [True, False], ids=["attention", "summary"])
def test_a_wide_beam_equals_brute_force_enumeration(seed, attention):
    torch.manual_seed(seed)
    model = make_model(tgt_vocab=5, attention=attention, sharpen=4.0)  # words: 3, 4
    with torch.no_grad():
        model.decoder.out.bias[EOS] -= 1.0  # longer outputs compete
    src = torch.randint(3, 9, (1 + seed % 4,))
    max_len = 4
    expected, expected_score, scores = brute_force(model, src, max_len)
    assert len(scores) == 1 + 2 + 4 + 8 + 16
    tokens, score = model.beam_search(src, beam_size=64, max_len=max_len)
    assert torch.equal(tokens, expected)
    assert score == pytest.approx(expected_score, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_beam_size_one_is_greedy_and_wider_beams_are_never_worse(seed):
    torch.manual_seed(seed)
    model = make_model(tgt_vocab=7, sharpen=3.0)
    src = torch.randint(3, 9, (5,))
    greedy, greedy_score, _ = model.greedy_decode(src[None], max_len=6)
    greedy = greedy[0][greedy[0] != PAD]
    tokens, score = model.beam_search(src, beam_size=1, max_len=6)
    assert torch.equal(tokens, greedy) and score == greedy_score.item()
    for beam_size in (2, 3, 5, 10):
        tokens, score = model.beam_search(src, beam_size, max_len=6)
        assert score >= greedy_score.item()
        # the score is the sequence's log-probability, by teacher forcing
        padded = F.pad(tokens, (0, 6 - len(tokens)), value=PAD)[None]
        assert score == pytest.approx(model.sequence_log_prob(src[None], padded).item())


def test_beam_search_finds_more_probable_outputs_than_greedy_on_some_models():
    """The search matters: on random peaked models, a beam of 4 often beats greedy."""
    better = 0
    for seed in range(30):
        torch.manual_seed(seed)
        model = make_model(tgt_vocab=6, sharpen=3.0)
        src = torch.randint(3, 9, (4,))
        _, greedy_score, _ = model.greedy_decode(src[None], max_len=5)
        _, score = model.beam_search(src, 4, max_len=5)
        better += score > greedy_score.item() + 1e-9
    assert better >= 3


# --------------------------------------------------------------------------- training


def test_sequence_loss_is_the_mean_over_real_tokens():
    logits = torch.randn(3, 4, 6, dtype=torch.float64)
    tgt = torch.tensor([[3, 4, EOS, PAD], [5, EOS, PAD, PAD], [3, 3, 3, EOS]])
    terms = [
        -torch.log_softmax(logits[b, t], -1)[tgt[b, t]]
        for b in range(3)
        for t in range(4)
        if tgt[b, t] != PAD
    ]
    torch.testing.assert_close(sequence_loss(logits, tgt), sum(terms) / len(terms))
    with pytest.raises(ValueError, match=r"must agree, got \(3, 4, 6\) and \(3, 3\)"):
        sequence_loss(logits, tgt[:, :3])
    with pytest.raises(TypeError, match="tgt must have dtype torch.int64"):
        sequence_loss(logits, tgt.double())


def copy_task(n=64, seed=0):
    """Source ids 3..6 copied to the target: a task a few steps of training start on."""
    generator = torch.Generator().manual_seed(seed)
    src, lengths = random_src(n, 4, 7, generator, min_length=2)
    tgt = F.pad(src, (0, 1), value=PAD)
    tgt[torch.arange(n), lengths] = EOS
    return src, tgt


def test_train_seq2seq_lowers_the_loss_and_is_reproducible():
    src, tgt = copy_task()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = make_model(src_vocab=7, tgt_vocab=7, dtype=torch.float32)
        runs.append(train_seq2seq(model, src, tgt, steps=30, batch_size=16, lr=1e-2))
    assert len(runs[0]) == 30 and runs[0] == runs[1]
    assert sum(runs[0][-5:]) < 0.8 * sum(runs[0][:5])
    assert model.training


def test_exact_match_compares_greedy_outputs_with_targets():
    model = make_model(sharpen=3.0)
    model.train()
    src, _ = random_src(7, 4, 9)
    tokens, _, _ = model.greedy_decode(src, max_len=6)
    tgt = F.pad(tokens, (0, 6 - tokens.shape[1]), value=PAD)  # its own outputs
    assert exact_match(model, src, tgt, batch_size=3).all()
    wrong = tgt.clone()
    ended = int((tgt == EOS).any(1).nonzero()[0])  # a row with an <eos>
    wrong[ended][wrong[ended] == EOS] = PAD  # the right words, but no end
    other = (ended + 1) % 7
    wrong[other, 0] = 3 if wrong[other, 0] != 3 else 4  # a wrong first word
    expected = torch.ones(7, dtype=torch.bool)
    expected[[ended, other]] = False
    assert torch.equal(exact_match(model, src, wrong), expected)
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="batch_size must be positive"):
        exact_match(model, src, tgt, batch_size=0)


# --------------------------------------------------------------------------- bad input

_VOCAB = Vocab([["a", "b"]])
_SRC = torch.tensor(
    [[3, 4, 5], [6, 7, 0]]
)  # two sentences of ids < 9, padded at the end


def _attention_call(query, keys, mask):
    """``AdditiveAttention(3, 4, 5)`` on random tensors of the given shapes."""
    attention = AdditiveAttention(3, 4, 5)
    return lambda: attention(
        torch.randn(query), torch.randn(keys), torch.ones(mask, dtype=torch.bool)
    )


_QUERY, _KEYS = torch.randn(2, 3), torch.randn(2, 5, 4)
_MASK = torch.ones(2, 5, dtype=torch.bool)
_NO_SOURCE = torch.tensor([[True] * 5, [False] * 5])  # the second row hides every key


def _decoder() -> Decoder:
    return Decoder(8, 5, 6, context_size=10)


def _memory(encoder_hidden: int = 5) -> Memory:
    """A memory from an encoder of ``encoder_hidden`` units (5 fits ``_decoder``)."""
    return Seq2Seq(
        Encoder(9, 5, encoder_hidden), Decoder(8, 5, 6, 2 * encoder_hidden)
    ).encode(_SRC)


def _step(prev, state=None, memory=None):
    """``_decoder().step`` with a fitting state and memory unless given."""
    memory = _memory() if memory is None else memory
    decoder = _decoder()
    state = decoder.initial_state(memory) if state is None else state
    return lambda: decoder.step(prev, state, memory)


BAD_INPUT = [
    pytest.param(
        lambda: _VOCAB.encode(["a", "z"]),
        ValueError,
        r"not in the vocabulary: \['z'\]",
        id="Vocab-encode-unknown",
    ),
    pytest.param(
        lambda: _VOCAB.encode(["<eos>"]),
        ValueError,
        "not in the vocabulary",
        id="Vocab-encode-special",
    ),
    pytest.param(
        lambda: _VOCAB.encode("ab"),
        TypeError,
        "tokens must be a list of str tokens",
        id="Vocab-encode-str",
    ),
    pytest.param(
        lambda: _VOCAB.batch([]),
        ValueError,
        "sequences must not be empty",
        id="Vocab-batch-empty",
    ),
    pytest.param(
        lambda: _VOCAB.batch([["a"], []]),
        ValueError,
        r"sequences \[1\] are empty",
        id="Vocab-batch-empty-row",
    ),
    pytest.param(
        lambda: _VOCAB.decode([3, 7]),
        ValueError,
        r"id 7 is outside the vocabulary 0\.\.4",
        id="Vocab-decode-high",
    ),
    pytest.param(
        lambda: _VOCAB.decode([3, -1]),
        ValueError,
        "id -1 is outside the vocabulary",
        id="Vocab-decode-negative",
    ),
    pytest.param(
        lambda: _VOCAB.decode([3.0]),
        TypeError,
        "ids must be ints, got float",
        id="Vocab-decode-float",
    ),
    pytest.param(
        lambda: _VOCAB.decode(torch.zeros(2, 2, dtype=torch.long)),
        ValueError,
        "ids must have 1 dimensions",
        id="Vocab-decode-2d",
    ),
    pytest.param(
        lambda: Vocab([["a"], "bc"]),
        TypeError,
        r"sequences\[1\] must be a list of str tokens",
        id="Vocab-sequences-str",
    ),
    pytest.param(
        lambda: Vocab([["a", "<pad>"]]),
        ValueError,
        "tokens must be strings other than",
        id="Vocab-special-token",
    ),
    pytest.param(
        lambda: Vocab([["a", 3]]),
        ValueError,
        "tokens must be strings other than",
        id="Vocab-int-token",
    ),
    pytest.param(
        lambda: Vocab([[], []]),
        ValueError,
        "sequences .*at least one token",
        id="Vocab-no-token",
    ),
    pytest.param(
        lambda: source_mask(torch.tensor([4, 5])),
        ValueError,
        r"src must have 2 dimensions, got shape \(2,\)",
        id="source_mask-1d",
    ),
    pytest.param(
        lambda: source_mask(torch.ones(2, 3)),
        TypeError,
        "src must have dtype torch.int64",
        id="source_mask-float",
    ),
    pytest.param(
        lambda: source_mask([[4, 5]]),
        TypeError,
        "src must be a torch.Tensor",
        id="source_mask-list",
    ),
    pytest.param(
        lambda: source_mask(torch.zeros(0, 3, dtype=torch.long)),
        ValueError,
        "src must hold at least one token",
        id="source_mask-no-row",
    ),
    pytest.param(
        lambda: source_mask(torch.zeros(2, 0, dtype=torch.long)),
        ValueError,
        "src must hold at least one token",
        id="source_mask-no-column",
    ),
    pytest.param(
        lambda: source_mask(torch.tensor([[4, 5], [0, 0], [6, 0], [0, 0]])),
        ValueError,
        r"src has empty sequences \(only padding\) in rows \[1, 3\]",
        id="source_mask-empty-rows",
    ),
    pytest.param(
        lambda: source_mask(torch.tensor([[4, 0, 5]])),
        ValueError,
        "src must be padded at the end",
        id="source_mask-inner-pad",
    ),
    pytest.param(
        lambda: Encoder(5, 3, 4)(torch.tensor([[3, 5]])),
        ValueError,
        r"src ids must be below vocab_size=5, got 5",
        id="Encoder-src-range",
    ),
    pytest.param(
        lambda: Encoder(5, 3, 4)(torch.tensor([[3, 4], [0, 0]])),
        ValueError,
        "src has empty sequences",
        id="Encoder-src-empty",
    ),
    pytest.param(
        lambda: Encoder(5, 3, 4)(torch.tensor([3, 4])),
        ValueError,
        "src must have 2 dimensions",
        id="Encoder-src-1d",
    ),
    pytest.param(
        lambda: Encoder(5, 3, 0),
        ValueError,
        "hidden_size must be positive, got 0",
        id="Encoder-hidden_size",
    ),
    pytest.param(
        lambda: Encoder(5.0, 3, 4),
        TypeError,
        "vocab_size must be an int",
        id="Encoder-vocab_size",
    ),
    pytest.param(
        _attention_call((2, 4), (2, 5, 4), (2, 5)),
        ValueError,
        r"query must have query_size=3 features, got shape \(2, 4\)",
        id="attention-query-size",
    ),
    pytest.param(
        _attention_call((2, 3), (2, 5, 3), (2, 5)),
        ValueError,
        r"keys must have key_size=4 features, got shape \(2, 5, 3\)",
        id="attention-key-size",
    ),
    pytest.param(
        _attention_call((3, 3), (2, 5, 4), (2, 5)),
        ValueError,
        "query .*keys .*mask .*must agree on the batch",
        id="attention-batch",
    ),
    pytest.param(
        _attention_call((2, 3), (2, 5, 4), (2, 6)),
        ValueError,
        "query .*keys .*mask .*must agree on the batch",
        id="attention-source",
    ),
    pytest.param(
        _attention_call((2, 3), (2, 5, 4), (5,)),
        ValueError,
        "mask must have 2 dimensions",
        id="attention-mask-1d",
    ),
    pytest.param(
        _attention_call((3,), (2, 5, 4), (2, 5)),
        ValueError,
        "query must have 2 dimensions",
        id="attention-query-1d",
    ),
    pytest.param(
        _attention_call((2, 3), (5, 4), (2, 5)),
        ValueError,
        "keys must have 3 dimensions",
        id="attention-keys-2d",
    ),
    pytest.param(
        lambda: AdditiveAttention(3, 4, 5)(_QUERY, _KEYS, _MASK.long()),
        TypeError,
        "mask must have dtype torch.bool",
        id="attention-mask-long",
    ),
    pytest.param(
        lambda: AdditiveAttention(3, 4, 5)(_QUERY.long(), _KEYS, _MASK),
        TypeError,
        "query must be a floating-point tensor",
        id="attention-query-long",
    ),
    pytest.param(
        lambda: AdditiveAttention(3, 4, 5)(_QUERY, _KEYS.tolist(), _MASK),
        TypeError,
        "keys must be a torch.Tensor",
        id="attention-keys-list",
    ),
    pytest.param(
        lambda: AdditiveAttention(3, 4, 5)(_QUERY, _KEYS, _NO_SOURCE),
        ValueError,
        "mask hides every key of a sequence",
        id="attention-mask-empty",
    ),
    pytest.param(
        lambda: AdditiveAttention(3, 4, 0),
        ValueError,
        "attention_size must be positive",
        id="attention-attention_size",
    ),
    pytest.param(
        lambda: _decoder().initial_state(_memory(4)),
        ValueError,
        r"memory.annotations has 8 features, but .* is 10",
        id="Decoder-initial-memory",
    ),
    pytest.param(
        lambda: _decoder()(torch.ones(2, 3, dtype=torch.long), _memory(4)),
        ValueError,
        "memory.annotations has 8 features",
        id="Decoder-forward-memory",
    ),
    pytest.param(
        _step(torch.ones(2)),
        TypeError,
        "prev must have dtype torch.int64",
        id="Decoder-step-prev-float",
    ),
    pytest.param(
        _step(torch.ones(2, 1, dtype=torch.long)),
        ValueError,
        "prev must have 1 dimensions",
        id="Decoder-step-prev-2d",
    ),
    pytest.param(
        _step(torch.ones(2, dtype=torch.long), torch.zeros(2, 7)),
        ValueError,
        r"query must have query_size=6 features, got shape \(2, 7\)",
        id="Decoder-step-state-size",
    ),
    pytest.param(
        _step(torch.ones(3, dtype=torch.long)),
        ValueError,
        "prev .*state .*must have the same batch size",
        id="Decoder-step-batch",
    ),
    pytest.param(
        _step(
            torch.ones(2, dtype=torch.long), torch.zeros(2, 6), (torch.zeros(2, 3, 10),)
        ),
        TypeError,
        "memory must be a Memory, got tuple",
        id="Decoder-step-memory",
    ),
    pytest.param(
        lambda: _decoder()(torch.ones(3, dtype=torch.long), _memory()),
        ValueError,
        "inputs must have 2 dimensions",
        id="Decoder-inputs-1d",
    ),
    pytest.param(
        lambda: _decoder()(torch.ones(3, 4, dtype=torch.long), _memory()),
        ValueError,
        r"inputs must be \(B, T\) with T >= 1 for .*B=2",
        id="Decoder-inputs-batch",
    ),
    pytest.param(
        lambda: _decoder()(torch.tensor([[1, 8], [1, 1]]), _memory()),
        ValueError,
        r"inputs must be ids in 0\.\.7, got 1\.\.8",
        id="Decoder-inputs-range",
    ),
    pytest.param(
        lambda: Decoder(8, 5, 6, 10, attention=1),
        TypeError,
        "attention must be a bool",
        id="Decoder-attention",
    ),
    pytest.param(
        lambda: Decoder(8, 5, 6, 0),
        ValueError,
        "context_size must be positive",
        id="Decoder-context_size",
    ),
    pytest.param(
        lambda: Seq2Seq(Encoder(9, 5, 4), Decoder(8, 5, 6, context_size=10)),
        ValueError,
        r"context_size \(10\) must be 2 \* encoder.hidden_size \(8\)",
        id="Seq2Seq-sizes",
    ),
    pytest.param(
        lambda: Seq2Seq(nn.GRU(3, 4), Decoder(8, 5, 6, 8)),
        TypeError,
        "encoder must be an Encoder, got GRU",
        id="Seq2Seq-encoder",
    ),
    pytest.param(
        lambda: Seq2Seq(Encoder(9, 5, 4), nn.Linear(3, 4)),
        TypeError,
        "decoder must be a Decoder, got Linear",
        id="Seq2Seq-decoder",
    ),
    pytest.param(
        lambda: make_model()(_SRC, torch.ones(3, 4, dtype=torch.long)),
        ValueError,
        r"tgt must be \(B, T\) with T >= 1 and the B=2",
        id="Seq2Seq-tgt-batch",
    ),
    pytest.param(
        lambda: make_model()(_SRC, torch.ones(2, 0, dtype=torch.long)),
        ValueError,
        "tgt must be .*T >= 1",
        id="Seq2Seq-tgt-empty",
    ),
    pytest.param(
        lambda: make_model()(_SRC, torch.tensor([[1, 8]] * 2)),
        ValueError,
        r"tgt ids must lie in 0\.\.7, got 1\.\.8",
        id="Seq2Seq-tgt-range",
    ),
    pytest.param(
        lambda: make_model()(_SRC, torch.ones(2, 4)),
        TypeError,
        "tgt must have dtype torch.int64",
        id="Seq2Seq-tgt-float",
    ),
    pytest.param(
        lambda: make_model()(_SRC, torch.ones(2, dtype=torch.long)),
        ValueError,
        "tgt must have 2 dimensions",
        id="Seq2Seq-tgt-1d",
    ),
    pytest.param(
        lambda: make_model()(
            torch.tensor([[3, 4], [0, 0], [5, 0]]), torch.ones(3, 2, dtype=torch.long)
        ),
        ValueError,
        "src has empty sequences",
        id="Seq2Seq-src-empty",
    ),
    pytest.param(
        lambda: make_model().greedy_decode(torch.tensor([[3]]), 0),
        ValueError,
        "max_len must be positive",
        id="greedy_decode-max_len",
    ),
    pytest.param(
        lambda: make_model().greedy_decode(torch.tensor([3]), 4),
        ValueError,
        "src must have 2 dimensions",
        id="greedy_decode-src-1d",
    ),
    pytest.param(
        lambda: make_model().beam_search(torch.tensor([[3, 4]]), 2, 5),
        ValueError,
        r"src must have 1 dimensions, got shape \(1, 2\)",
        id="beam_search-src-2d",
    ),
    pytest.param(
        lambda: make_model().beam_search(torch.tensor([3, 4]), 0, 5),
        ValueError,
        "beam_size must be positive, got 0",
        id="beam_search-beam_size",
    ),
    pytest.param(
        lambda: make_model().beam_search(torch.tensor([3, 4]), 2, 5.0),
        TypeError,
        "max_len must be an int",
        id="beam_search-max_len",
    ),
    pytest.param(
        lambda: make_model().beam_search(torch.tensor([0, 0]), 2, 5),
        ValueError,
        "src has empty sequences",
        id="beam_search-src-empty",
    ),
    pytest.param(
        lambda: train_seq2seq(
            make_model(7, 7, dtype=torch.float32), *copy_task(8), steps=0
        ),
        ValueError,
        "steps must be positive",
        id="train-steps",
    ),
    pytest.param(
        lambda: train_seq2seq(
            make_model(7, 7, dtype=torch.float32), *copy_task(8), steps=1, lr=0.0
        ),
        ValueError,
        r"lr must be in \(0, inf\)",
        id="train-lr",
    ),
    pytest.param(
        lambda: train_seq2seq(
            make_model(7, 7, dtype=torch.float32),
            copy_task(8)[0],
            copy_task(8)[1][:4],
            steps=1,
        ),
        ValueError,
        "tgt must be .*the B=8 of src",
        id="train-tgt-batch",
    ),
    pytest.param(
        lambda: train_seq2seq(nn.Linear(2, 2), *copy_task(8), steps=1),
        TypeError,
        "model must be a Seq2Seq, got Linear",
        id="train-model",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_value_checks_are_skipped_off_the_cpu():
    """Checks of ids and masks by value would sync a GPU; off the CPU they are skipped."""
    attention = AdditiveAttention(3, 4, 5)
    from dlabc.rnn.seq2seq import _check_attention, _check_source

    _check_attention(
        attention, _QUERY.to("meta"), _KEYS.to("meta"), _NO_SOURCE.to("meta")
    )
    _check_source(torch.tensor([[3, 99]], device="meta"), 5)
