"""Tests for ``dlabc.transformers.attention_with_pytorch``.

The module is compared weight for weight with PyTorch's ``nn.MultiheadAttention`` (outputs,
per-head weights and gradients), the parameter count with ``sum(p.numel())``, and the
reversal task with ``torch.flip`` and a cross-entropy computed by hand.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from torch import nn

from dlabc.transformers.attention_from_scratch import causal_mask, padding_mask
from dlabc.transformers.attention_with_pytorch import (
    MultiHeadAttention,
    ReverseModel,
    evaluate_reverse,
    from_torch,
    mha_parameter_count,
    reverse_task,
    to_torch,
    train_reverse,
)

F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=1e-5, rtol=1e-5)


def pair(d_model, n_heads, bias=True, dtype=torch.float64):
    """Our module and PyTorch's, holding the same random weights (biases made non-zero)."""
    ours = MultiHeadAttention(d_model, n_heads, bias=bias).to(dtype)
    if bias:
        with torch.no_grad():
            for layer in (ours.W_q, ours.W_k, ours.W_v, ours.W_o):
                layer.bias.normal_()  # nn.Linear's biases are small; PyTorch's start at 0
    return ours, to_torch(ours)


def reference(ref, query, key, value, attn_mask=None, key_padding_mask=None):
    """``ref`` called with our mask convention (True = may attend) turned into PyTorch's."""
    return ref(
        query,
        key,
        value,
        attn_mask=None if attn_mask is None else ~attn_mask,  # True = not allowed
        key_padding_mask=None
        if key_padding_mask is None
        else ~key_padding_mask,  # True = ignore
        need_weights=True,
        average_attn_weights=False,
    )


# --------------------------------------------------------------------------------------------
# MultiHeadAttention against nn.MultiheadAttention


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("d_model", "n_heads"), [(8, 2), (12, 3), (6, 1)])
def test_self_attention_matches_torch(d_model, n_heads, bias):
    ours, ref = pair(d_model, n_heads, bias)
    x = torch.randn(3, 5, d_model, dtype=torch.float64)
    out, weights = ours(x)
    ref_out, ref_weights = reference(ref, x, x, x)
    assert out.shape == (3, 5, d_model)
    assert weights.shape == (3, n_heads, 5, 5)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)


@pytest.mark.parametrize("bias", [True, False])
def test_causal_and_padding_matches_torch(bias):
    B, T, d_model, n_heads = 3, 6, 8, 2
    ours, ref = pair(d_model, n_heads, bias)
    x = torch.randn(B, T, d_model, dtype=torch.float64)
    causal = causal_mask(T)
    pad = padding_mask(torch.tensor([6, 4, 1]), T)  # (B, 1, T)
    out, weights = ours(x, mask=causal & pad)
    ref_out, ref_weights = reference(
        ref, x, x, x, attn_mask=causal, key_padding_mask=pad[:, 0]
    )
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)
    assert (weights[..., ~causal] == 0).all()
    assert (weights[1, :, :, 4:] == 0).all()


@pytest.mark.parametrize(("t_q", "t_k"), [(3, 7), (7, 2)])
def test_cross_attention_matches_torch(t_q, t_k):
    B, d_model, n_heads = 2, 8, 4
    ours, ref = pair(d_model, n_heads)
    query = torch.randn(B, t_q, d_model, dtype=torch.float64)
    key = torch.randn(B, t_k, d_model, dtype=torch.float64)
    value = torch.randn(B, t_k, d_model, dtype=torch.float64)
    pad = padding_mask(torch.tensor([t_k, 1]), t_k)
    out, weights = ours(query, key, value, mask=pad)
    ref_out, ref_weights = reference(ref, query, key, value, key_padding_mask=pad[:, 0])
    assert out.shape == (B, t_q, d_model)
    assert weights.shape == (B, n_heads, t_q, t_k)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)


def test_float32_matches_torch():
    ours, ref = pair(8, 2, dtype=torch.float32)
    x = torch.randn(2, 5, 8)
    out, weights = ours(x, mask=causal_mask(5))
    ref_out, ref_weights = reference(ref, x, x, x, attn_mask=causal_mask(5))
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(weights, ref_weights, **F32)


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_torch(bias):
    d_model, n_heads, T = 8, 2, 5
    ours, ref = pair(d_model, n_heads, bias)
    x = torch.randn(2, T, d_model, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, T, d_model, dtype=torch.float64)
    mask = causal_mask(T)

    (ours(x, mask=mask)[0] * upstream).sum().backward()
    grad_x_ours = x.grad.clone()
    x.grad = None
    (reference(ref, x, x, x, attn_mask=mask)[0] * upstream).sum().backward()
    torch.testing.assert_close(grad_x_ours, x.grad, **F64)

    d = d_model
    in_grad = ref.in_proj_weight.grad  # rows: W_q, then W_k, then W_v
    for i, layer in enumerate((ours.W_q, ours.W_k, ours.W_v)):
        torch.testing.assert_close(
            layer.weight.grad, in_grad[i * d : (i + 1) * d], **F64
        )
    torch.testing.assert_close(ours.W_o.weight.grad, ref.out_proj.weight.grad, **F64)
    if bias:
        for i, layer in enumerate((ours.W_q, ours.W_k, ours.W_v)):
            torch.testing.assert_close(
                layer.bias.grad, ref.in_proj_bias.grad[i * d : (i + 1) * d], **F64
            )
        torch.testing.assert_close(ours.W_o.bias.grad, ref.out_proj.bias.grad, **F64)


def test_key_and_value_default_to_query():
    ours = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    mask = causal_mask(4)
    out, weights = ours(x, mask=mask)
    out3, weights3 = ours(x, x, x, mask=mask)
    assert torch.equal(out, out3)
    assert torch.equal(weights, weights3)
    # a key given alone is also the value
    key = torch.randn(2, 6, 8, dtype=torch.float64)
    out_k, _ = ours(x, key)
    out_kv, _ = ours(x, key, key)
    assert torch.equal(out_k, out_kv)


def test_key_mask_matches_torch():
    """A ``(T_k,)`` mask broadcasts to ``(B, T_q, T_k)`` as the docstring asks, so it must work."""
    ours, ref = pair(8, 2)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True])
    ref_out, ref_weights = reference(ref, x, x, x, key_padding_mask=keep.expand(2, 4))
    out, weights = ours(x, mask=keep)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)


# --------------------------------------------------------------------------------------------
# to_torch / from_torch


@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_matches_fresh_torch_module(bias):
    ref = nn.MultiheadAttention(8, 2, bias=bias, batch_first=True, dtype=torch.float64)
    if bias:
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = from_torch(ref)
    assert isinstance(ours, MultiHeadAttention)
    assert ours.W_q.weight.dtype == torch.float64
    assert (ours.W_q.bias is not None) == bias
    assert (ours.W_o.bias is not None) == bias
    query = torch.randn(2, 4, 8, dtype=torch.float64)
    kv = torch.randn(2, 6, 8, dtype=torch.float64)
    pad = padding_mask(torch.tensor([6, 3]), 6)
    out, weights = ours(query, kv, kv, mask=pad)
    ref_out, ref_weights = reference(ref, query, kv, kv, key_padding_mask=pad[:, 0])
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(weights, ref_weights, **F64)


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_preserves_parameters_exactly(bias):
    ref = nn.MultiheadAttention(12, 3, bias=bias, batch_first=True, dtype=torch.float64)
    if bias:
        with torch.no_grad():
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    back = to_torch(from_torch(ref))
    assert back.batch_first
    assert back.num_heads == 3
    ref_params = dict(ref.named_parameters())
    back_params = dict(back.named_parameters())
    assert ref_params.keys() == back_params.keys()
    for name, p in ref_params.items():
        assert back_params[name].dtype == torch.float64
        assert torch.equal(back_params[name], p), name
    # and the other way round
    ours = MultiHeadAttention(12, 3, bias=bias).double()
    again = from_torch(to_torch(ours))
    for (name, p), (_, q) in zip(
        ours.named_parameters(), again.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name


def test_to_torch_packs_rows_in_q_k_v_order():
    ours = MultiHeadAttention(4, 2)
    ref = to_torch(ours)
    assert torch.equal(ref.in_proj_weight[:4], ours.W_q.weight)
    assert torch.equal(ref.in_proj_weight[4:8], ours.W_k.weight)
    assert torch.equal(ref.in_proj_weight[8:], ours.W_v.weight)
    assert torch.equal(ref.in_proj_bias[4:8], ours.W_k.bias)
    assert torch.equal(ref.out_proj.weight, ours.W_o.weight)


# --------------------------------------------------------------------------------------------
# parameter count


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("d_model", "n_heads"), [(4, 1), (8, 2), (12, 4), (32, 8)])
def test_parameter_count(d_model, n_heads, bias):
    ours = MultiHeadAttention(d_model, n_heads, bias=bias)
    expected = sum(p.numel() for p in ours.parameters())
    assert mha_parameter_count(d_model, bias=bias) == expected
    ref = nn.MultiheadAttention(d_model, n_heads, bias=bias)
    assert mha_parameter_count(d_model, bias=bias) == sum(
        p.numel() for p in ref.parameters()
    )


# --------------------------------------------------------------------------------------------
# the reversal task


def test_reverse_task_targets_are_flipped_tokens():
    tokens, targets = reverse_task(50, 7, 5, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (50, 7)
    assert tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() <= 4
    assert len(tokens.unique()) == 5  # 350 draws cover a vocabulary of 5
    for i in range(7):
        assert torch.equal(targets[:, i], tokens[:, 6 - i])


def test_reverse_task_is_reproducible():
    a = reverse_task(10, 6, 9, generator=torch.Generator().manual_seed(5))
    b = reverse_task(10, 6, 9, generator=torch.Generator().manual_seed(5))
    c = reverse_task(10, 6, 9, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_reverse_model_shapes():
    model = ReverseModel(vocab_size=7, seq_len=5, d_model=8, n_heads=2)
    tokens, _ = reverse_task(3, 5, 7)
    logits, weights = model(tokens)
    assert logits.shape == (3, 5, 7)
    assert weights.shape == (3, 2, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 5), **F32)


def test_reverse_model_matches_its_parts():
    """The forward pass is embedding + position, attention, read-out, nothing else."""
    model = ReverseModel(vocab_size=6, seq_len=4, d_model=8, n_heads=2).double()
    tokens, _ = reverse_task(3, 4, 6)
    x = model.token_embedding.weight[tokens] + model.position_embedding.weight[:4]
    ref = to_torch(model.attention)
    h, ref_weights = reference(ref, x, x, x)
    logits, weights = model(tokens)
    torch.testing.assert_close(
        logits, h @ model.readout.weight.T + model.readout.bias, **F64
    )
    torch.testing.assert_close(weights, ref_weights, **F64)


def test_train_reverse_lowers_the_loss():
    model = ReverseModel(vocab_size=6, seq_len=5, d_model=16, n_heads=2)
    losses = train_reverse(
        model, 150, batch_size=32, lr=1e-2, generator=torch.Generator().manual_seed(0)
    )
    assert len(losses) == 150
    assert all(isinstance(loss, float) for loss in losses)
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    # chance level is log(6) ~ 1.79; learning the reversal must bring it well below
    assert first > 1.2
    assert last < 0.3 * first
    tokens, _ = reverse_task(200, 5, 6, generator=torch.Generator().manual_seed(1))
    assert evaluate_reverse(model, tokens)["token_accuracy"] > 0.9


def test_train_reverse_first_loss_is_cross_entropy_of_the_first_batch():
    model = ReverseModel(vocab_size=5, seq_len=4, d_model=8, n_heads=2)
    untrained = copy.deepcopy(model)
    losses = train_reverse(
        model, 1, batch_size=8, generator=torch.Generator().manual_seed(3)
    )
    tokens, targets = reverse_task(8, 4, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, _ = untrained(tokens)
    log_probs = logits.log_softmax(-1).gather(-1, targets[..., None])  # (8, 4, 1)
    assert losses[0] == pytest.approx(-log_probs.mean().item(), rel=1e-5)
    # one Adam step moved every parameter that got a gradient
    assert not torch.equal(model.readout.weight, untrained.readout.weight)


def test_evaluate_reverse_matches_manual_computation():
    model = ReverseModel(vocab_size=3, seq_len=4, d_model=8, n_heads=2)
    train_reverse(
        model, 20, batch_size=16, lr=1e-2
    )  # part-trained: accuracies strictly between
    tokens, targets = reverse_task(64, 4, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(tokens)
    predictions = logits.argmax(-1)
    n_correct = sum(
        int(predictions[i, t] == targets[i, t]) for i in range(64) for t in range(4)
    )
    n_whole = sum(bool((predictions[i] == targets[i]).all()) for i in range(64))
    result = evaluate_reverse(model, tokens)
    assert result["token_accuracy"] == pytest.approx(n_correct / (64 * 4))
    assert result["sequence_accuracy"] == pytest.approx(n_whole / 64)
    assert (
        0 < n_whole < 64
    )  # a case where the two accuracies differ and neither is trivial
    assert n_whole < n_correct / 4
    assert not model.training


# --------------------------------------------------------------------------------------------
# bad input: every public entry point names the argument it rejects


def _bad_multi_head_attention():
    mha = MultiHeadAttention(8, 2)
    x = torch.randn(2, 5, 8)
    return [
        pytest.param(
            lambda: MultiHeadAttention(10, 4),
            ValueError,
            "d_model=10 is not divisible by n_heads=4",
            id="mha-0",
        ),
        pytest.param(
            lambda: MultiHeadAttention(8, 0),
            ValueError,
            "n_heads must be positive",
            id="mha-1",
        ),
        pytest.param(
            lambda: MultiHeadAttention(8.0, 2),
            TypeError,
            "d_model must be an int",
            id="mha-2",
        ),
        pytest.param(
            lambda: mha(x[0]),
            ValueError,
            "query must have 3 dimensions",
            id="mha-3",
        ),
        pytest.param(
            lambda: mha(x.tolist()),
            TypeError,
            "query must be a torch.Tensor",
            id="mha-4",
        ),
        pytest.param(
            lambda: mha(x, x.long()),
            TypeError,
            "key must be a floating-point tensor",
            id="mha-5",
        ),
        pytest.param(
            lambda: mha(torch.randn(2, 5, 6)),
            ValueError,
            "query must end in d_model=8",
            id="mha-6",
        ),
        pytest.param(
            lambda: mha(x, x, torch.randn(2, 5, 4)),
            ValueError,
            "value must end in d_model=8",
            id="mha-7",
        ),
        pytest.param(
            lambda: mha(x, torch.randn(3, 5, 8)),
            ValueError,
            "must share the batch size",
            id="mha-8",
        ),
        pytest.param(
            lambda: mha(x, torch.randn(2, 4, 8), torch.randn(2, 5, 8)),
            ValueError,
            "must share the batch size",
            id="mha-9",
        ),
        pytest.param(
            lambda: mha(x, torch.randn(2, 5, 8), torch.randn(1, 5, 8)),
            ValueError,
            "must share the batch size",
            id="mha-10",
        ),
        pytest.param(
            lambda: mha(x, mask=torch.ones(5, 5)),
            TypeError,
            "mask must have dtype torch.bool",
            id="mha-11",
        ),
        pytest.param(
            lambda: mha(x, mask=torch.ones(4, 5, dtype=torch.bool)),
            ValueError,
            "does not broadcast",
            id="mha-12",
        ),
        pytest.param(
            lambda: mha(x, mask=torch.ones(2, 2, 5, 5, dtype=torch.bool)),
            ValueError,
            "mask must broadcast to \\(batch, T_q, T_k\\)",
            id="mha-13",
        ),
        pytest.param(
            lambda: mha(x, mask=torch.zeros(5, 5, dtype=torch.bool)),
            ValueError,
            "hides every key",
            id="mha-14",
        ),
    ]


def _bad_from_torch():
    return [
        pytest.param(
            lambda: from_torch(
                nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
            ),
            ValueError,
            "without kdim/vdim",
            id="from_torch-0",
        ),
        pytest.param(
            lambda: from_torch(
                nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            ),
            ValueError,
            "add_bias_kv",
            id="from_torch-1",
        ),
        pytest.param(
            lambda: from_torch(
                nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
            ),
            ValueError,
            "dropout",
            id="from_torch-2",
        ),
        pytest.param(
            lambda: from_torch(MultiHeadAttention(8, 2)),
            TypeError,
            "from_torch expects an nn.MultiheadAttention",
            id="from_torch-3",
        ),
        pytest.param(
            lambda: to_torch(nn.MultiheadAttention(8, 2)),
            TypeError,
            "to_torch expects a MultiHeadAttention",
            id="from_torch-4",
        ),
    ]


def _bad_parameter_count():
    return [
        pytest.param(
            lambda: mha_parameter_count(0),
            ValueError,
            "d_model must be positive",
            id="parameter_count-0",
        ),
        pytest.param(
            lambda: mha_parameter_count(8.0),
            TypeError,
            "d_model must be an int",
            id="parameter_count-1",
        ),
    ]


def _bad_reverse_task():
    return [
        pytest.param(
            lambda: reverse_task(0, 5, 4),
            ValueError,
            "n must be positive",
            id="reverse_task-0",
        ),
        pytest.param(
            lambda: reverse_task(3, 0, 4),
            ValueError,
            "seq_len must be positive",
            id="reverse_task-1",
        ),
        pytest.param(
            lambda: reverse_task(3, 5, 4.0),
            TypeError,
            "vocab_size must be an int",
            id="reverse_task-2",
        ),
        pytest.param(
            lambda: reverse_task(True, 5, 4),
            TypeError,
            "n must be an int",
            id="reverse_task-3",
        ),
    ]


def _bad_reverse_model():
    model = ReverseModel(vocab_size=4, seq_len=5, d_model=8, n_heads=2)
    return [
        pytest.param(
            lambda: ReverseModel(0, 5),
            ValueError,
            "vocab_size must be positive",
            id="reverse_model-0",
        ),
        pytest.param(
            lambda: ReverseModel(4, 5.0),
            TypeError,
            "seq_len must be an int",
            id="reverse_model-1",
        ),
        pytest.param(
            lambda: ReverseModel(4, 5, d_model=10, n_heads=4),
            ValueError,
            "not divisible",
            id="reverse_model-2",
        ),
        pytest.param(
            lambda: model(torch.zeros(2, 5)),
            TypeError,
            "tokens must have dtype torch.int64",
            id="reverse_model-3",
        ),
        pytest.param(
            lambda: model(torch.zeros(2, 6, dtype=torch.long)),
            ValueError,
            "tokens must have length seq_len=5",
            id="reverse_model-4",
        ),
        pytest.param(
            lambda: model(torch.zeros(5, dtype=torch.long)),
            ValueError,
            "tokens must have 2 dimensions",
            id="reverse_model-5",
        ),
    ]


def _bad_train_reverse():
    model = ReverseModel(vocab_size=4, seq_len=3, d_model=8, n_heads=2)
    return [
        pytest.param(
            lambda: train_reverse(MultiHeadAttention(8, 2), 5),
            TypeError,
            "train_reverse expects a ReverseModel",
            id="train_reverse-0",
        ),
        pytest.param(
            lambda: train_reverse(model, 0),
            ValueError,
            "steps must be positive",
            id="train_reverse-1",
        ),
        pytest.param(
            lambda: train_reverse(model, 2, batch_size=0),
            ValueError,
            "batch_size must be positive",
            id="train_reverse-2",
        ),
        pytest.param(
            lambda: train_reverse(model, 2, lr=0.0),
            ValueError,
            "lr must be positive",
            id="train_reverse-3",
        ),
        pytest.param(
            lambda: train_reverse(model, 2, lr=-0.001),
            ValueError,
            "lr must be positive",
            id="train_reverse-4",
        ),
    ]


def _bad_evaluate_reverse():
    model = ReverseModel(vocab_size=3, seq_len=4, d_model=8, n_heads=2)
    return [
        pytest.param(
            lambda: evaluate_reverse(model, torch.zeros(2, 4)),
            TypeError,
            "tokens must have dtype torch.int64",
            id="evaluate_reverse-0",
        ),
        pytest.param(
            lambda: evaluate_reverse(model, torch.zeros(2, 5, dtype=torch.long)),
            ValueError,
            "tokens must have length seq_len=4",
            id="evaluate_reverse-1",
        ),
    ]


BAD_INPUT = [
    *_bad_multi_head_attention(),
    *_bad_from_torch(),
    *_bad_parameter_count(),
    *_bad_reverse_task(),
    *_bad_reverse_model(),
    *_bad_train_reverse(),
    *_bad_evaluate_reverse(),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
