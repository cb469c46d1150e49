"""Tests for ``dlabc.rnn.char_lm``.

``CharVocab`` must round-trip any text (Unicode included) and agree with a plain
dictionary of sorted characters; unknown characters are rejected. ``batches`` must cut
windows that are contiguous slices of the text, with targets shifted by one, at
uniformly spread positions, reproducibly for a seeded generator. ``CharLSTM`` is
compared with the LSTM equations written out here from its own weights (PyTorch's gate
order i, f, g, o), one and two layers, and carrying its state must equal reading the
whole sequence at once. ``evaluate_loss`` must equal ``F.cross_entropy`` of one call per
stream, whatever the chunking. The count baselines are compared with a direct count in
pure Python (``collections.Counter``) and with closed forms (the empirical entropy, the
uniform limit ``ln V``). ``sample`` must be deterministic for a seeded generator,
greedy (argmax, computed here) at temperature 0 and in the limit of a small
temperature, follow ``softmax(z / T)`` in distribution, and approach uniform for a
large temperature. ``train_char_lm`` must learn a periodic text within a few steps.
Every bad argument fails with a clear message.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dlabc.foundations.optimizers import warmup_cosine
from dlabc.rnn.char_lm import (
    CharLSTM,
    CharVocab,
    batches,
    bigram_log_probs,
    bigram_loss,
    evaluate_loss,
    sample,
    train_char_lm,
    unigram_log_probs,
    unigram_loss,
)

TEXT = "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind"


def random_text(n: int, alphabet: str, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join(alphabet[i] for i in torch.randint(len(alphabet), (n,), generator=g))


def random_ids(n: int, vocab_size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (n,), generator=g)


def model_for(vocab_size: int, seed: int = 0, **kwargs) -> CharLSTM:
    torch.manual_seed(seed)
    return CharLSTM(vocab_size, **kwargs).double()


# --------------------------------------------------------------------- CharVocab


@pytest.mark.parametrize(
    "text",
    [TEXT, "a", "ééé—ab\n", "Hamlet\t🙂 prince 王子", random_text(500, "abcxyz \n", 3)],
)
def test_vocab_round_trip_and_ids_of_sorted_characters(text):
    vocab = CharVocab(text)
    chars = sorted(set(text))
    assert vocab.chars == tuple(chars) and len(vocab) == len(chars)
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    reference = {c: i for i, c in enumerate(chars)}
    assert ids.tolist() == [reference[c] for c in text]
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text
    assert vocab.encode("").shape == (0,) and vocab.decode([]) == ""
    assert str(len(vocab)) in repr(vocab)


# --------------------------------------------------------------------- batches


@pytest.mark.parametrize(
    "n, batch_size, seq_len", [(50, 4, 7), (200, 16, 64), (9, 3, 8), (2, 5, 1)]
)
def test_batches_are_windows_with_targets_shifted_by_one(n, batch_size, seq_len):
    ids = torch.arange(n)  # the id is the position, so a window shows where it starts
    pairs = list(
        batches(ids, batch_size, seq_len, 30, torch.Generator().manual_seed(0))
    )
    assert len(pairs) == 30
    starts = []
    for x, y in pairs:
        assert x.shape == y.shape == (batch_size, seq_len)
        assert x.dtype == y.dtype == torch.long
        torch.testing.assert_close(x, x[:, :1] + torch.arange(seq_len))  # contiguous
        torch.testing.assert_close(y, x + 1)  # the next character
        starts += x[:, 0].tolist()
    assert min(starts) >= 0 and max(starts) + seq_len <= n - 1
    if batch_size * 30 > 20 * (n - seq_len):  # enough draws to see every start
        assert set(starts) == set(range(n - seq_len))


def test_batches_are_reproducible_and_follow_the_text():
    ids = random_ids(300, 11, seed=1)
    first = list(batches(ids, 5, 10, 4, torch.Generator().manual_seed(7)))
    again = list(batches(ids, 5, 10, 4, torch.Generator().manual_seed(7)))
    other = list(batches(ids, 5, 10, 4, torch.Generator().manual_seed(8)))
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    text = ids.tolist()
    for x, y in first:
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            window = row_x + row_y[-1:]
            assert any(text[s : s + 11] == window for s in range(len(text) - 10)), (
                "a window that is not in the text"
            )


# --------------------------------------------------------------------- CharLSTM


def lstm_by_hand(model: CharLSTM, x: torch.Tensor, state=None):
    """The LSTM equations, one step at a time, with the weights of ``model``."""
    lstm = model.lstm
    layers, hidden = lstm.num_layers, lstm.hidden_size
    batch, steps = x.shape
    if state is None:
        zeros = torch.zeros(layers, batch, hidden, dtype=torch.float64)
        state = (zeros, zeros.clone())
    h, c = [list(s.unbind(0)) for s in state]
    inputs = model.embed.weight[x]  # (B, T, E)
    for layer in range(layers):
        W_ih = getattr(lstm, f"weight_ih_l{layer}")
        W_hh = getattr(lstm, f"weight_hh_l{layer}")
        b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        outputs = []
        for t in range(steps):
            gates = inputs[:, t] @ W_ih.T + h[layer] @ W_hh.T + b
            i, f, g, o = gates.chunk(4, dim=1)
            c[layer] = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
            h[layer] = torch.sigmoid(o) * torch.tanh(c[layer])
            outputs.append(h[layer])
        inputs = torch.stack(outputs, dim=1)  # (B, T, H)
    logits = inputs @ model.head.weight.T + model.head.bias
    return logits, (torch.stack(h), torch.stack(c))


@pytest.mark.parametrize(
    "vocab_size, d_embed, d_hidden, n_layers, batch, steps",
    [(5, 3, 4, 1, 2, 6), (11, 8, 16, 2, 3, 5), (7, 4, 3, 1, 1, 1), (3, 2, 5, 3, 4, 3)],
)
def test_char_lstm_computes_the_lstm_equations(
    vocab_size, d_embed, d_hidden, n_layers, batch, steps
):
    model = model_for(vocab_size, d_embed=d_embed, d_hidden=d_hidden, n_layers=n_layers)
    x = random_ids(batch * steps, vocab_size, seed=2).view(batch, steps)
    with torch.no_grad():
        logits, (h, c) = model(x)
        reference, (h_ref, c_ref) = lstm_by_hand(model, x)
    assert logits.shape == (batch, steps, vocab_size)
    assert h.shape == c.shape == (n_layers, batch, d_hidden)
    torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)
    # from a given state, too
    state = (torch.randn_like(h), torch.randn_like(c))
    with torch.no_grad():
        logits, _ = model(x, state)
        reference, _ = lstm_by_hand(model, x, state)
    torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", [1, 4, 9])
def test_char_lstm_state_carries_the_sequence_on(split):
    model = model_for(9, d_embed=4, d_hidden=6, n_layers=2)
    x = random_ids(30, 9, seed=3).view(3, 10)
    with torch.no_grad():
        whole, (h, c) = model(x)
        first, state = model(x[:, :split])
        second, (h2, c2) = model(x[:, split:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(h2, h)
    torch.testing.assert_close(c2, c)


def test_char_lstm_gradient_matches_finite_differences():
    model = model_for(4, d_embed=2, d_hidden=3)
    x = random_ids(8, 4, seed=5).view(2, 4)
    weight = model.head.weight.detach().clone().requires_grad_()

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        h, _ = model.lstm(model.embed(x))
        return F.cross_entropy((h @ w.T + model.head.bias).flatten(0, 1), x.flatten())

    assert torch.autograd.gradcheck(loss_of, (weight,))


# --------------------------------------------------------------------- evaluate_loss


@pytest.mark.parametrize(
    "n, streams, chunk_len", [(50, 1, 7), (50, 1, 100), (103, 4, 5), (64, 8, 1)]
)
def test_evaluate_loss_equals_cross_entropy_of_each_stream_read_at_once(
    n, streams, chunk_len
):
    model = model_for(6, d_embed=3, d_hidden=5)
    ids = random_ids(n, 6, seed=4)
    length = n // streams
    with torch.no_grad():
        pieces = ids[: streams * length].view(streams, length)
        logits, _ = model(pieces)  # (S, L, V): each piece in one call
        reference = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), pieces[:, 1:].flatten()
        )
    model.train()
    assert math.isclose(evaluate_loss(model, ids, streams, chunk_len), reference.item())
    assert model.training  # mode restored


# --------------------------------------------------------------------- baselines


def direct_unigram(train: list[int], valid: list[int], V: int, alpha: float) -> float:
    counts = Counter(train)
    return -sum(
        math.log((counts[v] + alpha) / (len(train) + alpha * V)) for v in valid
    ) / len(valid)


def direct_bigram(train: list[int], valid: list[int], V: int, alpha: float) -> float:
    pairs = Counter(zip(train[:-1], train[1:], strict=True))
    before = Counter(train[:-1])
    total = 0.0
    for b, c in zip(valid[:-1], valid[1:], strict=True):
        total -= math.log((pairs[b, c] + alpha) / (before[b] + alpha * V))
    return total / (len(valid) - 1)


@pytest.mark.parametrize("V", [2, 5, 30])
@pytest.mark.parametrize("alpha", [1.0, 0.01, 3.5])
def test_baselines_equal_a_direct_count(V, alpha):
    train, valid = random_ids(400, V, seed=V), random_ids(150, V, seed=V + 1)
    if V > 2:  # some characters never seen in training, some never in validation
        train = train % (V - 1)
    t, v = train.tolist(), valid.tolist()
    assert math.isclose(
        unigram_loss(train, valid, V, alpha),
        direct_unigram(t, v, V, alpha),
        rel_tol=1e-12,
    )
    assert math.isclose(
        bigram_loss(train, valid, V, alpha),
        direct_bigram(t, v, V, alpha),
        rel_tol=1e-12,
    )


def test_baselines_are_distributions_with_their_closed_form_limits():
    V = 7
    train = random_ids(1000, V, seed=0)
    assert torch.allclose(
        unigram_log_probs(train, V).exp().sum(), torch.tensor(1.0).double()
    )
    rows = bigram_log_probs(train, V, alpha=0.5).exp().sum(1)
    torch.testing.assert_close(rows, torch.ones(V, dtype=torch.float64))
    # huge smoothing: every character equally likely, the loss is ln V
    assert math.isclose(unigram_loss(train, train, V, alpha=1e12), math.log(V))
    assert math.isclose(bigram_loss(train, train, V, alpha=1e12), math.log(V))
    # tiny smoothing, measured on the training text itself: the empirical entropy
    p = torch.bincount(train, minlength=V).double() / len(train)
    entropy = -(p * p.log()).sum().item()
    assert math.isclose(
        unigram_loss(train, train, V, alpha=1e-12), entropy, rel_tol=1e-9
    )
    # a text that always repeats "0 1 2": the bigram knows the next character
    cycle = torch.arange(3).repeat(100)
    assert bigram_loss(cycle, cycle, 3, alpha=1e-9) < 1e-6
    assert math.isclose(unigram_loss(cycle, cycle, 3, alpha=1e-9), math.log(3))


# --------------------------------------------------------------------- sample


def greedy_by_hand(model: CharLSTM, vocab: CharVocab, prompt: str, n: int) -> str:
    ids = vocab.encode(prompt).tolist()
    with torch.no_grad():
        for _ in range(n):  # the whole text again at every step: no state to get wrong
            logits, _ = model(torch.tensor([ids]))
            top2 = logits[0, -1].topk(2).values
            assert top2[0] - top2[1] > 1e-3  # so that T = 1e-6 leaves no doubt
            ids.append(int(logits[0, -1].argmax()))
    return vocab.decode(ids[len(prompt) :])


def test_sample_is_reproducible_and_greedy_at_temperature_zero():
    vocab = CharVocab(TEXT)
    model = model_for(len(vocab), d_embed=4, d_hidden=8)
    with torch.no_grad():  # sharper logits, so that the argmax is clear at every step
        model.head.weight.mul_(20)
    model.train()
    a = sample(model, vocab, "To be", 40, 1.0, torch.Generator().manual_seed(1))
    b = sample(model, vocab, "To be", 40, 1.0, torch.Generator().manual_seed(1))
    c = sample(model, vocab, "To be", 40, 1.0, torch.Generator().manual_seed(2))
    assert a == b and a != c
    assert len(a) == 40 and set(a) <= set(vocab.chars)
    assert model.training  # mode restored
    greedy = greedy_by_hand(model, vocab, "To be", 40)
    assert sample(model, vocab, "To be", 40, temperature=0) == greedy
    # the limit T -> 0 of sampling is the argmax
    cold = sample(model, vocab, "To be", 40, 1e-6, torch.Generator().manual_seed(3))
    assert cold == greedy


def first_draws(model, vocab, temperature, n_draws, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draws = [
        sample(model, vocab, "ab", 1, temperature, generator) for _ in range(n_draws)
    ]
    counts = Counter(vocab.encode("".join(draws)).tolist())
    return torch.tensor([counts[i] for i in range(len(vocab))]).double() / n_draws


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_follows_the_softmax_of_the_scaled_logits(temperature):
    vocab = CharVocab("abcd")
    model = model_for(4, d_embed=2, d_hidden=3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5]))
        logits, _ = model(vocab.encode("ab")[None])
    expected = torch.softmax(logits[0, -1] / temperature, dim=0)
    frequencies = first_draws(model, vocab, temperature, 1000)
    # 1000 draws: the standard error of a frequency is at most 0.016
    assert (frequencies - expected).abs().max() < 0.06


def test_sample_at_a_huge_temperature_is_uniform():
    vocab = CharVocab("abcd")
    model = model_for(4, d_embed=2, d_hidden=3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([5.0, 0.0, -5.0, 2.0]))
    frequencies = first_draws(model, vocab, 1e6, 1000)
    assert (frequencies - 0.25).abs().max() < 0.06


# --------------------------------------------------------------------- train_char_lm


def test_train_char_lm_learns_a_periodic_text():
    vocab = CharVocab("abcdefg")
    ids = vocab.encode("abcdefg" * 60)
    torch.manual_seed(0)
    model = CharLSTM(len(vocab), d_embed=8, d_hidden=16)
    history = train_char_lm(
        model,
        ids[:300],
        ids[300:],
        steps=60,
        batch_size=8,
        seq_len=16,
        lr=2e-2,
        warmup_steps=5,
        eval_every=20,
    )
    assert history.eval_steps == [0, 20, 40, 60]
    assert len(history.step_loss) == len(history.lr) == 60
    assert (
        abs(history.metrics["valid_loss"][0] - math.log(7)) < 0.3
    )  # untrained: about uniform
    assert (
        history.metrics["valid_loss"][-1] < 0.1
    )  # the next letter of the cycle is certain
    expected = [warmup_cosine(s, 2e-2, 5, 60) for s in range(60)]
    assert history.lr == pytest.approx(expected)
    assert sample(model, vocab, "abc", 11, temperature=0) == "defgabcdefg"


# --------------------------------------------------------------------- bad input

_VOCAB = CharVocab("abc")
_IDS = torch.tensor([0, 1, 2, 1])  # for the count baselines
_X = torch.zeros(2, 3, dtype=torch.long)  # ids for CharLSTM(5, ...)
_H = torch.zeros(2, 2, 4)  # a state of CharLSTM(5, d_hidden=4, n_layers=2)


def _lstm() -> CharLSTM:
    return CharLSTM(5, d_embed=3, d_hidden=4, n_layers=2)


def _sampling(*args):
    """``sample`` with a model and vocabulary of four characters, then ``args``."""
    return lambda: sample(CharLSTM(4, d_embed=2, d_hidden=3), CharVocab("abcd"), *args)


_CYCLE = torch.tensor([0, 1, 2] * 20)  # a text for train_char_lm

BAD_INPUT = [
    pytest.param(
        lambda: _VOCAB.encode("abd"),
        ValueError,
        r"text contains characters that are not in the vocabulary: \['d'\]",
        id="encode-unknown",
    ),
    pytest.param(
        lambda: _VOCAB.encode("zé🙂a"),
        ValueError,
        r"not in the vocabulary: \['z', 'é', '🙂'\]",
        id="encode-unicode",
    ),
    pytest.param(
        lambda: _VOCAB.encode("\x00"),
        ValueError,
        r"not in the vocabulary: \['\\x00'\]",
        id="encode-nul",
    ),
    pytest.param(
        lambda: _VOCAB.encode(b"abc"),
        TypeError,
        "text must be a str, got bytes",
        id="encode-bytes",
    ),
    pytest.param(
        lambda: CharVocab(["a", "b"]),
        TypeError,
        "text must be a str, got list",
        id="CharVocab-list",
    ),
    pytest.param(
        lambda: CharVocab(""),
        ValueError,
        "text must contain at least one character",
        id="CharVocab-empty",
    ),
    pytest.param(
        lambda: _VOCAB.decode([0, 3, -1]),
        ValueError,
        r"ids must lie in \[0, 3\), got \[3, -1\]",
        id="decode-range",
    ),
    pytest.param(
        lambda: _VOCAB.decode(torch.tensor([0.0, 1.0])),
        TypeError,
        "ids must be an integer tensor",
        id="decode-float",
    ),
    pytest.param(
        lambda: _VOCAB.decode(torch.zeros(2, 2, dtype=torch.long)),
        ValueError,
        "ids must have 1 dimensions",
        id="decode-2d",
    ),
    pytest.param(
        lambda: _VOCAB.decode([0, 1.0]),
        TypeError,
        "ids must contain ints only",
        id="decode-float-item",
    ),
    pytest.param(
        lambda: _VOCAB.decode("ab"),
        TypeError,
        "ids must be a 1-D tensor or a sequence",
        id="decode-str",
    ),
    pytest.param(
        lambda: batches(torch.arange(10.0), 2, 3, 1),
        TypeError,
        "ids must have dtype torch.int64",
        id="batches-float",
    ),
    pytest.param(
        lambda: batches(torch.zeros(2, 5, dtype=torch.long), 2, 3, 1),
        ValueError,
        "ids must have 1 dimensions",
        id="batches-2d",
    ),
    pytest.param(
        lambda: batches([1, 2, 3], 2, 3, 1),
        TypeError,
        "ids must be a torch.Tensor",
        id="batches-list",
    ),
    pytest.param(
        lambda: batches(torch.arange(1), 2, 3, 1),
        ValueError,
        "ids must hold at least 2 ids, got 1",
        id="batches-short",
    ),
    pytest.param(
        lambda: batches(torch.arange(10), 0, 3, 1),
        ValueError,
        "batch_size must be positive",
        id="batches-batch_size",
    ),
    pytest.param(
        lambda: batches(torch.arange(10), 2, 2.0, 1),
        TypeError,
        "seq_len must be an int",
        id="batches-seq_len",
    ),
    pytest.param(
        lambda: batches(torch.arange(10), 2, 3, 0),
        ValueError,
        "n_batches must be positive",
        id="batches-n_batches",
    ),
    pytest.param(
        lambda: batches(torch.arange(10), 2, 10, 1),
        ValueError,
        r"seq_len \+ 1 = 11 must not exceed",
        id="batches-too-long",
    ),
    pytest.param(
        lambda: _lstm()(torch.zeros(2, 3)),
        TypeError,
        "x must have dtype torch.int64",
        id="CharLSTM-x-float",
    ),
    pytest.param(
        lambda: _lstm()(torch.zeros(6, dtype=torch.long)),
        ValueError,
        "x must have 2 dimensions",
        id="CharLSTM-x-1d",
    ),
    pytest.param(
        lambda: _lstm()(_X + 5),
        ValueError,
        r"x must hold ids in \[0, 5\), got values in \[5, 5\]",
        id="CharLSTM-x-high",
    ),
    pytest.param(
        lambda: _lstm()(_X - 1),
        ValueError,
        r"x must hold ids in \[0, 5\)",
        id="CharLSTM-x-negative",
    ),
    pytest.param(
        lambda: _lstm()(_X, _H),
        TypeError,
        r"state must be a tuple \(h, c\)",
        id="CharLSTM-state-tensor",
    ),
    pytest.param(
        lambda: _lstm()(_X, (_H, torch.zeros(1, 2, 4))),
        ValueError,
        r"state c must have shape \(2, 2, 4\)",
        id="CharLSTM-state-c",
    ),
    pytest.param(
        lambda: _lstm()(_X, (_H.long(), _H)),
        TypeError,
        "state h must be a floating-point tensor",
        id="CharLSTM-state-h",
    ),
    pytest.param(
        lambda: CharLSTM(0),
        ValueError,
        "vocab_size must be positive",
        id="CharLSTM-vocab_size",
    ),
    pytest.param(
        lambda: CharLSTM(5, d_hidden=12.0),
        TypeError,
        "d_hidden must be an int",
        id="CharLSTM-d_hidden",
    ),
    pytest.param(
        lambda: CharLSTM(5, dropout=1.0),
        ValueError,
        r"dropout must be in \[0, 1\)",
        id="CharLSTM-dropout",
    ),
    pytest.param(
        lambda: evaluate_loss(torch.nn.Linear(2, 2), random_ids(20, 6, seed=4)),
        TypeError,
        "model must be a CharLSTM, got Linear",
        id="evaluate_loss-model",
    ),
    pytest.param(
        lambda: evaluate_loss(
            model_for(6, d_embed=3, d_hidden=5), random_ids(20, 6, seed=4), streams=0
        ),
        ValueError,
        "streams must be positive",
        id="evaluate_loss-streams",
    ),
    pytest.param(
        lambda: evaluate_loss(
            model_for(6, d_embed=3, d_hidden=5), random_ids(20, 6, seed=4), streams=11
        ),
        ValueError,
        r"ids \(20\) is too short for 11 streams",
        id="evaluate_loss-short",
    ),
    pytest.param(
        lambda: evaluate_loss(
            model_for(6, d_embed=3, d_hidden=5), random_ids(20, 6, seed=4).int()
        ),
        TypeError,
        "ids must have dtype torch.int64",
        id="evaluate_loss-int32",
    ),
    pytest.param(
        lambda: evaluate_loss(
            model_for(6, d_embed=3, d_hidden=5),
            random_ids(20, 6, seed=4) + 6,
            streams=2,
        ),
        ValueError,
        r"x must hold ids in \[0, 6\)",
        id="evaluate_loss-range",
    ),
    *(
        pytest.param(
            lambda loss=loss, args=args: loss(*args),
            error,
            match,
            id=f"{loss.__name__}-{name}",
        )
        for loss in (unigram_loss, bigram_loss)
        for args, error, match, name in [
            (
                (_IDS.float(), _IDS, 3),
                TypeError,
                "train_ids must have dtype torch.int64",
                "train-float",
            ),
            (
                (_IDS, _IDS[:1], 3),
                ValueError,
                "valid_ids must hold at least 2 ids",
                "valid-short",
            ),
            (
                (_IDS, _IDS, 2),
                ValueError,
                r"train_ids must hold ids in \[0, 2\)",
                "train-range",
            ),
            (
                (_IDS, _IDS + 1, 3),
                ValueError,
                r"valid_ids must hold ids in \[0, 3\)",
                "valid-range",
            ),
            ((_IDS, _IDS, 0), ValueError, "vocab_size must be positive", "vocab_size"),
            ((_IDS, _IDS, 3, 0.0), ValueError, r"alpha must be in \(0, inf\)", "alpha"),
        ]
    ),
    pytest.param(
        _sampling("ab", 5, -0.1),
        ValueError,
        r"temperature must be in \[0, inf\)",
        id="sample-temperature-negative",
    ),
    pytest.param(
        _sampling("ab", 5, float("nan")),
        ValueError,
        "temperature must be finite",
        id="sample-temperature-nan",
    ),
    pytest.param(
        _sampling("ab", 5, "hot"),
        TypeError,
        "temperature must be a number",
        id="sample-temperature-str",
    ),
    pytest.param(_sampling("ab", 0), ValueError, "n must be positive", id="sample-n"),
    pytest.param(
        _sampling("", 5),
        ValueError,
        "prompt must be a non-empty str",
        id="sample-prompt-empty",
    ),
    pytest.param(
        _sampling("abz", 5),
        ValueError,
        r"text contains characters that are not in the vocabulary: \['z'\]",
        id="sample-prompt-unknown",
    ),
    pytest.param(
        lambda: sample(CharLSTM(4, d_embed=2, d_hidden=3), "abcd", "ab", 5),
        TypeError,
        "vocab must be a CharVocab, got str",
        id="sample-vocab-str",
    ),
    pytest.param(
        lambda: sample(torch.nn.LSTM(2, 2), CharVocab("abcd"), "ab", 5),
        TypeError,
        "model must be a CharLSTM",
        id="sample-model",
    ),
    pytest.param(
        lambda: sample(CharLSTM(4, d_embed=2, d_hidden=3), CharVocab("abc"), "ab", 5),
        ValueError,
        "vocab has 3 characters but",
        id="sample-vocab-size",
    ),
    pytest.param(
        _sampling("ab", 5, 1.0, 0),
        TypeError,
        "generator must be a torch.Generator",
        id="sample-generator",
    ),
    pytest.param(
        lambda: train_char_lm(torch.nn.Linear(2, 2), _CYCLE, _CYCLE, steps=2),
        TypeError,
        "model must be a CharLSTM",
        id="train-model",
    ),
    pytest.param(
        lambda: train_char_lm(
            CharLSTM(3, d_embed=2, d_hidden=2), _CYCLE, _CYCLE, steps=0
        ),
        ValueError,
        "steps must be positive",
        id="train-steps",
    ),
    pytest.param(
        lambda: train_char_lm(
            CharLSTM(3, d_embed=2, d_hidden=2),
            _CYCLE,
            _CYCLE,
            steps=20,
            warmup_steps=20,
        ),
        ValueError,
        r"warmup_steps \(20\) must be less than steps",
        id="train-warmup",
    ),
    pytest.param(
        lambda: train_char_lm(
            CharLSTM(3, d_embed=2, d_hidden=2),
            _CYCLE,
            _CYCLE,
            steps=2,
            warmup_steps=1,
            lr=0.0,
        ),
        ValueError,
        r"lr must be in \(0, inf\)",
        id="train-lr",
    ),
    pytest.param(
        lambda: train_char_lm(
            CharLSTM(3, d_embed=2, d_hidden=2),
            _CYCLE,
            _CYCLE.float(),
            steps=2,
            warmup_steps=1,
        ),
        TypeError,
        "valid_ids must have dtype torch.int64",
        id="train-valid-float",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_ids_on_another_device_skip_the_range_check():
    """The range of ``x`` is checked on the CPU only: elsewhere it would sync."""
    from dlabc.rnn.char_lm import _check_input

    _check_input(_lstm(), (_X + 5).to("meta"), None)  # no error, no sync
