"""Tests for ``dlabc.transformers.encoder``.

The layer and the stack are compared weight for weight with PyTorch's
``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` (outputs and gradients,
both ``norm_first`` settings, with padding and causal masks), the feed-forward network
with an ``nn.Sequential``, the layer without residuals with ``F.layer_norm`` and
``nn.MultiheadAttention``, the parameter count with PyTorch's modules, the gradient
norms with ``clip_grad_norm_``, and the task and its measurements with loops written
out by hand.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.rnn.seq2seq import PAD, SPECIALS, sequence_loss
from dlabc.train import train_steps
from dlabc.transformers.attention_from_scratch import causal_mask, padding_mask
from dlabc.transformers.attention_with_pytorch import to_torch as mha_to_torch
from dlabc.transformers.encoder import (
    CountingEncoder,
    EncoderLayer,
    FeedForward,
    TransformerEncoder,
    count_accuracy,
    count_task,
    encoder_parameter_count,
    hidden_states,
    layer_gradient_norms,
    match_attention,
    mean_token_cosine,
    position_only_accuracy,
    to_torch,
)

F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=1e-5, rtol=1e-5)


def randomize(module: nn.Module) -> nn.Module:
    """Random weights everywhere, norms and biases included (they start at 1 and 0,
    which would hide a swapped scale or a missing shift)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def masks(kind: str, lengths: torch.Tensor, length: int):
    """Our mask (True = may attend) and PyTorch's two (True = hidden)."""
    pad = padding_mask(lengths, length)  # (B, 1, T)
    causal = causal_mask(length)  # (T, T)
    if kind == "none":
        return None, None, None
    if kind == "padding":
        return pad, None, ~pad[:, 0]
    if kind == "causal":
        return causal, ~causal, None
    return pad & causal, ~causal, ~pad[:, 0]  # padding and causal


SHAPES = [  # (d_model, n_heads, d_ff, batch, length)
    (8, 1, 16, 2, 5),
    (12, 3, 20, 3, 7),
    (16, 4, 8, 1, 9),
    (32, 8, 64, 2, 4),
]


# --------------------------------------------------------------------------------------
# the feed-forward network


@pytest.mark.parametrize("leading", [(5,), (2, 3), (2, 3, 4)])
@pytest.mark.parametrize(("d_model", "d_ff"), [(4, 16), (8, 8), (6, 3)])
def test_feed_forward_matches_sequential(leading, d_model, d_ff):
    ff = randomize(FeedForward(d_model, d_ff).double())
    ref = nn.Sequential(
        nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model)
    ).double()
    ref.load_state_dict(
        {
            "0.weight": ff.linear1.weight,
            "0.bias": ff.linear1.bias,
            "2.weight": ff.linear2.weight,
            "2.bias": ff.linear2.bias,
        }
    )
    x = torch.randn(*leading, d_model, dtype=torch.float64)
    torch.testing.assert_close(ff(x), ref(x), **F64)


def test_feed_forward_drops_the_hidden_units_in_training():
    ff = FeedForward(6, 12, dropout=0.4).double()
    ref = nn.Sequential(ff.linear1, nn.ReLU(), nn.Dropout(0.4), ff.linear2)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    torch.manual_seed(1)
    out = ff(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, ref(x), **F64)
    ff.eval()
    ref.eval()
    torch.testing.assert_close(ff(x), ref(x), **F64)


# --------------------------------------------------------------------------------------
# the layer, against nn.TransformerEncoderLayer


@pytest.mark.parametrize("kind", ["none", "padding", "causal", "padding+causal"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize(("d_model", "n_heads", "d_ff", "batch", "length"), SHAPES)
def test_layer_matches_torch(d_model, n_heads, d_ff, batch, length, norm_first, kind):
    ours = randomize(EncoderLayer(d_model, n_heads, d_ff, norm_first=norm_first))
    ours = ours.double()
    ref = to_torch(ours)
    assert isinstance(ref, nn.TransformerEncoderLayer)
    assert ref.norm_first == norm_first and ref.self_attn.batch_first
    lengths = torch.randint(1, length + 1, (batch,))
    mask, src_mask, key_padding = masks(kind, lengths, length)
    x = torch.randn(batch, length, d_model, dtype=torch.float64)
    out, weights = ours(x, mask)
    # in training mode (dropout is 0) PyTorch never takes its fused fast path
    expected = ref(x, src_mask=src_mask, src_key_padding_mask=key_padding)
    torch.testing.assert_close(out, expected, **F64)
    assert weights.shape == (batch, n_heads, length, length)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_gradients_match_torch(norm_first):
    ours = randomize(EncoderLayer(8, 2, 12, norm_first=norm_first)).double()
    ref = to_torch(ours)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 8, dtype=torch.float64)
    pad = padding_mask(torch.tensor([5, 3]), 5)
    (ours(x, pad)[0] * upstream).sum().backward()
    grad_ours = x.grad.clone()
    x.grad = None
    (ref(x, src_key_padding_mask=~pad[:, 0]) * upstream).sum().backward()
    torch.testing.assert_close(grad_ours, x.grad, **F64)
    pairs = [
        (ours.ff.linear1, ref.linear1),
        (ours.ff.linear2, ref.linear2),
        (ours.norm1, ref.norm1),
        (ours.norm2, ref.norm2),
        (ours.self_attn.W_o, ref.self_attn.out_proj),
    ]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, **F64)
        torch.testing.assert_close(mine.bias.grad, theirs.bias.grad, **F64)
    packed = torch.cat(
        [ours.self_attn.W_q.weight.grad, ours.self_attn.W_k.weight.grad]
        + [ours.self_attn.W_v.weight.grad]
    )
    torch.testing.assert_close(packed, ref.self_attn.in_proj_weight.grad, **F64)


def test_layer_matches_torch_fast_path_in_evaluation():
    """In evaluation mode without gradients PyTorch runs one fused kernel for the
    whole layer; in float32 it still agrees with ours, padded positions included."""
    ours = EncoderLayer(16, 4, 32).eval()
    ref = to_torch(ours).eval()
    x = torch.randn(3, 7, 16)
    pad = padding_mask(torch.tensor([7, 4, 1]), 7)
    with torch.no_grad():
        out, _ = ours(x, pad)
        expected = ref(x, src_key_padding_mask=~pad[:, 0])
    torch.testing.assert_close(out, expected, **F32)


def test_dropout_is_active_in_training_only():
    layer = EncoderLayer(8, 2, 16, dropout=0.5).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    train_out, _ = layer(x)
    layer.eval()
    eval_out, _ = layer(x)
    assert not torch.allclose(train_out, eval_out)
    # and in evaluation mode it equals PyTorch's layer built with the same dropout
    ref = to_torch(layer).eval()
    assert ref.dropout1.p == ref.dropout.p == 0.5
    torch.testing.assert_close(eval_out, ref(x), **F64)
    no_dropout = EncoderLayer(8, 2, 16, dropout=0.0).double()
    torch.testing.assert_close(no_dropout(x)[0], no_dropout.eval()(x)[0], **F64)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_without_residuals_is_the_plain_composition(norm_first):
    """``residual=False`` leaves out the ``x +`` and changes nothing else."""
    d_model, n_heads = 8, 2
    ours = randomize(
        EncoderLayer(d_model, n_heads, 16, norm_first=norm_first, residual=False)
    ).double()
    attention = mha_to_torch(ours.self_attn)  # nn.MultiheadAttention

    def norm(x, layer):
        return F.layer_norm(x, (d_model,), layer.weight, layer.bias, eps=1e-5)

    def ff(x):
        hidden = F.relu(F.linear(x, ours.ff.linear1.weight, ours.ff.linear1.bias))
        return F.linear(hidden, ours.ff.linear2.weight, ours.ff.linear2.bias)

    def attend(x, key_padding):
        return attention(x, x, x, key_padding_mask=key_padding)[0]

    x = torch.randn(3, 6, d_model, dtype=torch.float64)
    pad = padding_mask(torch.tensor([6, 2, 4]), 6)
    if norm_first:  # x <- F(LN(x))
        h = attend(norm(x, ours.norm1), ~pad[:, 0])
        expected = ff(norm(h, ours.norm2))
    else:  # x <- LN(F(x))
        h = norm(attend(x, ~pad[:, 0]), ours.norm1)
        expected = norm(ff(h), ours.norm2)
    torch.testing.assert_close(ours(x, pad)[0], expected, **F64)
    with_residuals = EncoderLayer(d_model, n_heads, 16, norm_first=norm_first).double()
    with_residuals.load_state_dict(ours.state_dict())
    assert not torch.allclose(with_residuals(x, pad)[0], expected)


# --------------------------------------------------------------------------------------
# the stack, against nn.TransformerEncoder


@pytest.mark.parametrize("final_norm", [None, True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize(("n_layers", "shape"), [(1, SHAPES[0]), (2, SHAPES[1])])
def test_encoder_matches_torch(n_layers, shape, norm_first, final_norm):
    d_model, n_heads, d_ff, batch, length = shape
    ours = TransformerEncoder(
        n_layers, d_model, n_heads, d_ff, norm_first=norm_first, final_norm=final_norm
    )
    ours = randomize(ours).double()
    ref = to_torch(ours)
    assert isinstance(ref, nn.TransformerEncoder) and len(ref.layers) == n_layers
    assert (ref.norm is not None) == (norm_first if final_norm is None else final_norm)
    lengths = torch.randint(1, length + 1, (batch,))
    pad = padding_mask(lengths, length)
    x = torch.randn(batch, length, d_model, dtype=torch.float64)
    out, weights = ours(x, pad)
    torch.testing.assert_close(out, ref(x, src_key_padding_mask=~pad[:, 0]), **F64)
    assert len(weights) == n_layers


@pytest.mark.parametrize("norm_first", [False, True])
def test_deeper_encoder_matches_torch_with_causal_mask(norm_first):
    ours = randomize(TransformerEncoder(4, 12, 2, 24, norm_first=norm_first)).double()
    ref = to_torch(ours)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    mask, src_mask, key_padding = masks("padding+causal", torch.tensor([6, 3]), 6)
    out, _ = ours(x, mask)
    expected = ref(x, mask=src_mask, src_key_padding_mask=key_padding)
    torch.testing.assert_close(out, expected, **F64)


def test_torch_nested_tensor_path_zeroes_padding_but_agrees_elsewhere():
    """With ``enable_nested_tensor=True`` (its default), an ``nn.TransformerEncoder``
    in evaluation mode without gradients packs the real positions into a nested tensor
    and returns zeros at the padded ones; ours computes them like any position. So the
    two agree on the real positions only. (``to_torch`` switches the packing off.)"""
    ours = randomize(TransformerEncoder(2, 16, 4, 32)).eval()
    ref = to_torch(ours).eval()
    ref.use_nested_tensor = True  # what enable_nested_tensor=True would have set
    lengths = torch.tensor([7, 4, 2])
    pad = padding_mask(lengths, 7)
    x = torch.randn(3, 7, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are prototype"
        out, _ = ours(x, pad)
        expected = ref(x, src_key_padding_mask=~pad[:, 0])
    real = pad[:, 0]  # (B, T)
    torch.testing.assert_close(out[real], expected[real], **F32)
    assert (expected[~real] == 0).all()
    assert (out[~real] != 0).any()


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_weights_are_distributions_that_ignore_padding(norm_first):
    n_layers, n_heads, batch, length = 3, 2, 3, 6
    encoder = randomize(
        TransformerEncoder(n_layers, 8, n_heads, 16, norm_first=norm_first)
    )
    lengths = torch.tensor([6, 1, 4])
    pad = padding_mask(lengths, length)
    _, weights = encoder(torch.randn(batch, length, 8), pad)
    assert len(weights) == n_layers
    for w in weights:
        assert w.shape == (batch, n_heads, length, length)
        torch.testing.assert_close(w.sum(-1), torch.ones(batch, n_heads, length))
        hidden = ~pad[:, None].expand_as(w)  # (B, h, T, T): padded keys
        assert (w[hidden] == 0).all()
        assert (w[~hidden] > 0).all()


def test_encoder_is_the_layers_in_order_then_the_norm():
    encoder = randomize(TransformerEncoder(3, 8, 2, 16, norm_first=True)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    h = x
    for layer in encoder.layers:
        h, _ = layer(h)
    expected = F.layer_norm(h, (8,), encoder.norm.weight, encoder.norm.bias, 1e-5)
    torch.testing.assert_close(encoder(x)[0], expected, **F64)
    # the layers are independent copies, not one layer applied three times
    a, b = encoder.layers[0], encoder.layers[1]
    assert a.ff.linear1.weight.data_ptr() != b.ff.linear1.weight.data_ptr()


def test_final_norm_defaults_to_norm_first():
    assert TransformerEncoder(2, 8, 2, 16).norm is None
    assert TransformerEncoder(2, 8, 2, 16, norm_first=True).norm is not None
    assert TransformerEncoder(2, 8, 2, 16, final_norm=True).norm is not None
    assert (
        TransformerEncoder(2, 8, 2, 16, norm_first=True, final_norm=False).norm is None
    )


# --------------------------------------------------------------------------------------
# parameter count


@pytest.mark.parametrize("final_norm", [False, True])
@pytest.mark.parametrize(
    ("n_layers", "d_model", "n_heads", "d_ff"),
    [(1, 4, 1, 8), (2, 8, 2, 16), (3, 12, 4, 10), (6, 32, 8, 128)],
)
def test_parameter_count(n_layers, d_model, n_heads, d_ff, final_norm):
    formula = encoder_parameter_count(n_layers, d_model, d_ff, final_norm)
    ours = TransformerEncoder(n_layers, d_model, n_heads, d_ff, final_norm=final_norm)
    assert formula == sum(p.numel() for p in ours.parameters())
    layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, batch_first=True)
    norm = nn.LayerNorm(d_model) if final_norm else None
    ref = nn.TransformerEncoder(layer, n_layers, norm=norm, enable_nested_tensor=False)
    assert formula == sum(p.numel() for p in ref.parameters())


# --------------------------------------------------------------------------------------
# bad input


def test_layer_and_encoder_reject_bad_arguments():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        EncoderLayer(10, 4, 16)
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        TransformerEncoder(2, 10, 4, 16)
    with pytest.raises(ValueError, match="n_layers must be positive"):
        TransformerEncoder(0, 8, 2, 16)
    with pytest.raises(ValueError, match="n_layers must be positive"):
        TransformerEncoder(-2, 8, 2, 16)
    with pytest.raises(TypeError, match="n_layers must be an int"):
        TransformerEncoder(2.0, 8, 2, 16)
    with pytest.raises(ValueError, match="d_ff must be positive"):
        EncoderLayer(8, 2, 0)
    with pytest.raises(ValueError, match="d_ff must be positive"):
        TransformerEncoder(2, 8, 2, 0)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            EncoderLayer(8, 2, 16, dropout=bad)
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            TransformerEncoder(2, 8, 2, 16, dropout=bad)
    with pytest.raises(TypeError, match="dropout must be a number"):
        EncoderLayer(8, 2, 16, dropout="0.1")
    with pytest.raises(TypeError, match="norm_first must be a bool"):
        EncoderLayer(8, 2, 16, norm_first=1)
    with pytest.raises(TypeError, match="residual must be a bool"):
        TransformerEncoder(2, 8, 2, 16, residual="no")
    with pytest.raises(TypeError, match="final_norm must be a bool"):
        TransformerEncoder(2, 8, 2, 16, final_norm=0)


@pytest.mark.parametrize(
    "module",
    [EncoderLayer(8, 2, 16), TransformerEncoder(2, 8, 2, 16)],
    ids=["layer", "encoder"],
)
def test_layer_and_encoder_reject_bad_input(module):
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        module(x[0])
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        module(x[None])
    with pytest.raises(
        ValueError, match=r"x must have shape \(batch, length, d_model=8"
    ):
        module(torch.randn(2, 5, 6))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        module(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        module(x.tolist())
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        module(x, torch.ones(2, 1, 5))
    for shape in [(2, 1, 4), (3, 5, 5), (5, 4), (2, 2, 5, 5)]:
        with pytest.raises(ValueError, match=r"mask must broadcast to \(batch, T, T\)"):
            module(x, torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="hides every key"):
        module(x, torch.zeros(5, 5, dtype=torch.bool))
    # the shapes that do broadcast are accepted
    for shape in [(5,), (5, 5), (2, 1, 5), (2, 5, 5), (1, 5, 5)]:
        out, _ = module(x, torch.ones(shape, dtype=torch.bool))
        assert out.shape == x.shape


# --------------------------------------------------------------------------------------
# what the experiments measure


def test_hidden_states_are_the_stream_between_layers():
    encoder = randomize(TransformerEncoder(3, 8, 2, 16, norm_first=True)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    pad = padding_mask(torch.tensor([5, 2]), 5)
    states = hidden_states(encoder, x, pad)
    assert len(states) == 4 and states[0] is x
    torch.testing.assert_close(states[1], encoder.layers[0](x, pad)[0], **F64)
    final = F.layer_norm(states[-1], (8,), encoder.norm.weight, encoder.norm.bias)
    torch.testing.assert_close(final, encoder(x, pad)[0], **F64)
    with pytest.raises(TypeError, match="encoder must be a TransformerEncoder"):
        hidden_states(encoder.layers[0], x)
    with pytest.raises(ValueError, match="x must have shape"):
        hidden_states(encoder, torch.randn(2, 5, 4))


def test_layer_gradient_norms_match_clip_grad_norm():
    encoder = TransformerEncoder(3, 8, 2, 16)
    with pytest.raises(ValueError, match="call backward"):
        layer_gradient_norms(encoder)
    out, _ = encoder(torch.randn(2, 5, 8))
    out.square().sum().backward()
    norms = layer_gradient_norms(encoder)
    assert norms.shape == (3,)
    for norm, layer in zip(norms, encoder.layers, strict=True):
        expected = nn.utils.clip_grad_norm_(layer.parameters(), float("inf"))
        torch.testing.assert_close(norm, expected.float())
    with pytest.raises(TypeError, match="encoder must be a TransformerEncoder"):
        layer_gradient_norms(nn.Linear(2, 2))


@pytest.mark.parametrize(("batch", "length", "d"), [(1, 2, 3), (3, 5, 8), (2, 7, 4)])
def test_mean_token_cosine_matches_pairwise_loop(batch, length, d):
    h = torch.randn(batch, length, d, dtype=torch.float64)
    pairs = [
        F.cosine_similarity(h[b, i], h[b, j], dim=0)
        for b in range(batch)
        for i in range(length)
        for j in range(length)
        if i != j
    ]
    torch.testing.assert_close(mean_token_cosine(h), torch.stack(pairs).mean(), **F64)


# --------------------------------------------------------------------------------------
# the counting task


def test_count_task_counts_earlier_equal_symbols():
    tokens, targets, lengths = count_task(
        40, 9, 3, min_len=2, generator=torch.Generator().manual_seed(0)
    )
    assert tokens.shape == targets.shape == (40, 9) and lengths.shape == (40,)
    assert lengths.min() >= 2 and lengths.max() <= 9
    for b in range(40):
        n = lengths[b].item()
        seq = tokens[b].tolist()
        assert seq[n:] == [PAD] * (9 - n) and targets[b, n:].tolist() == [PAD] * (9 - n)
        assert all(len(SPECIALS) <= s < len(SPECIALS) + 3 for s in seq[:n])
        for i in range(n):
            assert targets[b, i].item() == 1 + seq[:i].count(seq[i])


def test_count_task_is_reproducible_and_rejects_bad_arguments():
    a = count_task(5, 6, 4, generator=torch.Generator().manual_seed(3))
    b = count_task(5, 6, 4, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="min_len=7 must not exceed max_len=6"):
        count_task(5, 6, 4, min_len=7)
    with pytest.raises(ValueError, match="n_symbols must be positive"):
        count_task(5, 6, 0)
    with pytest.raises(TypeError, match="max_len must be an int"):
        count_task(5, 6.0, 4)


def test_counting_encoder_ignores_padding():
    torch.manual_seed(0)
    model = CountingEncoder(4, max_len=8, d_model=16, n_heads=2, d_ff=32).eval()
    tokens, _, lengths = count_task(3, 6, 4, generator=torch.Generator().manual_seed(1))
    logits, weights = model(tokens, lengths)
    assert logits.shape == (3, 6, 9)
    assert len(weights) == 2 and weights[0].shape == (3, 2, 6, 6)
    # two more padded positions change nothing at the real ones
    longer = torch.cat([tokens, torch.full((3, 2), PAD)], dim=1)
    logits_longer, _ = model(longer, lengths)
    real = padding_mask(lengths, 6)[:, 0]
    torch.testing.assert_close(logits_longer[:, :6][real], logits[real], **F32)


def test_count_accuracy_and_baseline_match_counting_by_hand():
    torch.manual_seed(0)
    model = CountingEncoder(3, max_len=7, d_model=8, n_heads=2, d_ff=16)
    tokens, targets, lengths = count_task(
        50, 7, 3, min_len=3, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        predictions = model(tokens, lengths)[0].argmax(-1)
    real = [(b, t) for b in range(50) for t in range(lengths[b].item())]
    right = sum(predictions[b, t].item() == targets[b, t].item() for b, t in real)
    assert count_accuracy(model, tokens, targets, lengths) == pytest.approx(
        right / len(real)
    )
    assert model.training  # its mode is restored
    # the position-only baseline: the most common target of each position
    guess = {
        t: collections.Counter(
            targets[b, t].item() for b, s in real if s == t
        ).most_common(1)[0][0]
        for t in range(7)
    }
    hits = sum(targets[b, t].item() == guess[t] for b, t in real)
    assert position_only_accuracy(targets) == pytest.approx(hits / len(real))
    with pytest.raises(ValueError, match="no real"):
        position_only_accuracy(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="must have the shape of tokens"):
        count_accuracy(model, tokens, targets[:, :5], lengths)
    with pytest.raises(TypeError, match="model must be a CountingEncoder"):
        count_accuracy(TransformerEncoder(1, 8, 2, 16), tokens, targets, lengths)


def test_match_attention_matches_loops_and_closed_form():
    tokens, _, lengths = count_task(6, 5, 2, generator=torch.Generator().manual_seed(4))
    weights = torch.rand(6, 3, 5, 5).softmax(-1)
    total, n_queries = torch.zeros(3), 0
    for b in range(6):
        for i in range(lengths[b].item()):
            n_queries += 1
            for j in range(i + 1):
                if tokens[b, j] == tokens[b, i]:
                    total += weights[b, :, i, j]
    torch.testing.assert_close(match_attention(weights, tokens), total / n_queries)
    # a head that attends only to the query itself puts all its weight on a match
    eye = torch.eye(5).expand(6, 2, 5, 5)
    torch.testing.assert_close(match_attention(eye, tokens), torch.ones(2))
    with pytest.raises(ValueError, match="must agree"):
        match_attention(weights, tokens[:, :4])
    with pytest.raises(ValueError, match="weights must have 4 dimensions"):
        match_attention(weights[0], tokens)


def test_counting_encoder_learns_with_train_steps():
    torch.manual_seed(0)
    model = CountingEncoder(3, max_len=6, d_model=16, n_heads=2, d_ff=32)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield count_task(32, 6, 3, min_len=3, generator=generator)

    def loss_fn(model, batch):
        tokens, targets, lengths = batch
        return sequence_loss(model(tokens, lengths)[0], targets)

    history = train_steps(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        batches(),
        loss_fn,
        steps=60,
    )
    first = sum(history.step_loss[:5]) / 5
    last = sum(history.step_loss[-5:]) / 5
    assert last < 0.6 * first


# --------------------------------------------------------------------------------------------
# bad input: every public entry point names the argument it rejects


def _bad_feed_forward():
    ff = FeedForward(8, 16)
    return [
        pytest.param(
            lambda: FeedForward(8, 0),
            ValueError,
            "d_ff must be positive",
            id="feed_forward-0",
        ),
        pytest.param(
            lambda: FeedForward(8.0, 16),
            TypeError,
            "d_model must be an int",
            id="feed_forward-1",
        ),
        pytest.param(
            lambda: FeedForward(8, 16, dropout=1.0),
            ValueError,
            "dropout must be in \\[0, 1\\)",
            id="feed_forward-2",
        ),
        pytest.param(
            lambda: ff(torch.randn(2, 3, 6)),
            ValueError,
            "x must end in d_model=8",
            id="feed_forward-3",
        ),
        pytest.param(
            lambda: ff(torch.ones(2, 8, dtype=torch.long)),
            TypeError,
            "x must be a floating-point tensor",
            id="feed_forward-4",
        ),
    ]


def _bad_parameter_count():
    return [
        pytest.param(
            lambda: encoder_parameter_count(0, 8, 16),
            ValueError,
            "n_layers must be positive",
            id="parameter_count-0",
        ),
        pytest.param(
            lambda: encoder_parameter_count(2, 8, -1),
            ValueError,
            "d_ff must be positive",
            id="parameter_count-1",
        ),
        pytest.param(
            lambda: encoder_parameter_count(2, 8.0, 16),
            TypeError,
            "d_model must be an int",
            id="parameter_count-2",
        ),
        pytest.param(
            lambda: encoder_parameter_count(2, 8, 16, final_norm=1),
            TypeError,
            "final_norm must be a bool",
            id="parameter_count-3",
        ),
    ]


def _bad_to_torch():
    return [
        pytest.param(
            lambda: to_torch(EncoderLayer(8, 2, 16, residual=False)),
            ValueError,
            "always has residual connections",
            id="to_torch-0",
        ),
        pytest.param(
            lambda: to_torch(TransformerEncoder(2, 8, 2, 16, residual=False)),
            ValueError,
            "always has residual connections",
            id="to_torch-1",
        ),
        pytest.param(
            lambda: to_torch(nn.TransformerEncoderLayer(8, 2)),
            TypeError,
            "to_torch expects an EncoderLayer or a",
            id="to_torch-2",
        ),
    ]


def _bad_mean_token_cosine_closed_forms():
    same = torch.randn(2, 1, 6).expand(2, 4, 6)
    torch.testing.assert_close(mean_token_cosine(same), torch.tensor(1.0))
    orthogonal = torch.eye(4)[None]
    torch.testing.assert_close(mean_token_cosine(orthogonal), torch.tensor(0.0))
    return [
        pytest.param(
            lambda: mean_token_cosine(torch.randn(2, 1, 4)),
            ValueError,
            "at least 2 positions",
            id="mean_token_cosine_closed_forms-0",
        ),
        pytest.param(
            lambda: mean_token_cosine(torch.randn(4, 4)),
            ValueError,
            "h must have 3 dimensions",
            id="mean_token_cosine_closed_forms-1",
        ),
    ]


def _bad_counting_encoder():
    model = CountingEncoder(4, max_len=6, d_model=8, n_heads=2, d_ff=16)
    tokens = torch.full((2, 5), len(SPECIALS))
    lengths = torch.tensor([5, 3])
    return [
        pytest.param(
            lambda: model(tokens.float(), lengths),
            TypeError,
            "tokens must have dtype torch.int64",
            id="counting_encoder-0",
        ),
        pytest.param(
            lambda: model(torch.full((2, 7), 3), lengths),
            ValueError,
            "at most max_len=6 positions",
            id="counting_encoder-1",
        ),
        pytest.param(
            lambda: model(tokens, torch.tensor([5])),
            ValueError,
            "one entry per sequence",
            id="counting_encoder-2",
        ),
        pytest.param(
            lambda: model(tokens, torch.tensor([5, 0])),
            ValueError,
            "lengths must lie in 1..5",
            id="counting_encoder-3",
        ),
        pytest.param(
            lambda: CountingEncoder(0, 6),
            ValueError,
            "n_symbols must be positive",
            id="counting_encoder-4",
        ),
    ]


BAD_INPUT = [
    *_bad_feed_forward(),
    *_bad_parameter_count(),
    *_bad_to_torch(),
    *_bad_mean_token_cosine_closed_forms(),
    *_bad_counting_encoder(),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
