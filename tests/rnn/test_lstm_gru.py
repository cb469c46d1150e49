"""Tests for ``dlabc.rnn.lstm_gru``.

The cells and layers are compared weight for weight with PyTorch's ``nn.LSTMCell``,
``nn.GRUCell``, ``nn.LSTM`` and ``nn.GRU`` in float64: the ``state_dict`` of ours is
loaded into PyTorch's unchanged (the names, shapes and gate order are the same), and
the outputs, the final states and the gradients of the input, the initial states and
every parameter must agree, for many sizes, 1 to 3 layers, one or two directions,
``batch_first``, no biases, unbatched input, given initial states, and variable lengths
against ``pack_padded_sequence(..., enforce_sorted=False)``. float32 agrees at float32
tolerances. The gates the layers report are recomputed by hand from the gate equations
and PyTorch's hidden states. The two initialisations are checked on our modules and on
PyTorch's (the forget gate of a zero input is ``sigmoid(bias)``), the recall task
against its definition, and the classifier against ``nn.LSTM`` + ``nn.Linear``. Bad
input must fail early, with a clear message.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dlabc.rnn.lstm_gru import (
    GRU,
    LSTM,
    GRUCell,
    LSTMCell,
    SequenceClassifier,
    chrono_init,
    init_forget_bias,
    recall_task,
)

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-5)
PAIRS = {"lstm": (LSTM, nn.LSTM), "gru": (GRU, nn.GRU)}
CELLS = {"lstm": (LSTMCell, nn.LSTMCell), "gru": (GRUCell, nn.GRUCell)}


def rand(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def twins(ours: nn.Module, ref: nn.Module, dtype=torch.float64):
    """``ref`` loaded with ``ours``'s state_dict (strict: the names must match)."""
    ours, ref = ours.to(dtype), ref.to(dtype)
    with torch.no_grad():  # non-zero, varied biases and weights
        for p in ours.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def as_tuple(state) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad for _, p in sorted(module.named_parameters())]


# --------------------------------------------------------------------- cells


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize(
    "input_size, hidden_size, batch", [(1, 1, 1), (3, 5, 4), (7, 2, 6), (4, 9, 2)]
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zeros"])
def test_cells_match_torch(kind, input_size, hidden_size, batch, bias, with_state):
    ours_cls, ref_cls = CELLS[kind]
    ours, ref = twins(
        ours_cls(input_size, hidden_size, bias=bias),
        ref_cls(input_size, hidden_size, bias=bias),
    )
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    x1 = rand(batch, input_size, seed=1).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    n_states = 2 if kind == "lstm" else 1
    states1 = [
        rand(batch, hidden_size, seed=2 + k).requires_grad_() for k in range(n_states)
    ]
    states2 = [s.detach().clone().requires_grad_() for s in states1]
    if kind == "lstm":
        args1 = (tuple(states1),) if with_state else ()
        args2 = (tuple(states2),) if with_state else ()
    else:
        args1 = (states1[0],) if with_state else ()
        args2 = (states2[0],) if with_state else ()
    out1, out2 = as_tuple(ours(x1, *args1)), as_tuple(ref(x2, *args2))
    assert len(out1) == len(out2)
    loss1 = sum((o * rand(*o.shape, seed=9 + k)).sum() for k, o in enumerate(out1))
    loss2 = sum((o * rand(*o.shape, seed=9 + k)).sum() for k, o in enumerate(out2))
    loss1.backward()
    loss2.backward()
    for a, b in zip(out1, out2, strict=True):
        torch.testing.assert_close(a, b, **F64)
    torch.testing.assert_close(x1.grad, x2.grad, **F64)
    for a, b in zip(grads(ours), grads(ref), strict=True):
        torch.testing.assert_close(a, b, **F64)
    if with_state:
        for a, b in zip(states1, states2, strict=True):
            torch.testing.assert_close(a.grad, b.grad, **F64)


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_accept_unbatched_input_like_torch(kind):
    ours_cls, ref_cls = CELLS[kind]
    ours, ref = twins(ours_cls(3, 4), ref_cls(3, 4))
    x = rand(3)
    state = (rand(4, seed=1), rand(4, seed=2)) if kind == "lstm" else rand(4, seed=1)
    for a, b in zip(as_tuple(ours(x, state)), as_tuple(ref(x, state)), strict=True):
        assert a.shape == (4,)
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_initialise_like_torch(kind):
    """Every parameter from U(-1/sqrt(H), 1/sqrt(H)), as PyTorch does."""
    ours_cls, _ = CELLS[kind]
    cell = ours_cls(5, 100)
    for p in cell.parameters():
        assert p.abs().max() <= 1 / math.sqrt(100)
        assert p.std() > 0.5 / math.sqrt(3 * 100)  # spread like a uniform, not zeros


# --------------------------------------------------------------------- layers

LAYER_CASES = [
    # input_size, hidden_size, num_layers, bidirectional, batch_first, T, B
    (3, 4, 1, False, False, 5, 2),
    (3, 4, 1, True, False, 6, 3),
    (2, 5, 2, False, True, 4, 2),
    (4, 3, 2, True, True, 7, 4),
    (1, 2, 3, True, False, 3, 1),
    (5, 1, 3, False, True, 1, 5),
    (6, 7, 2, True, False, 9, 3),
]


def run_pair(ours, ref, x, state, lengths=None):
    """Outputs, final states and all gradients of ours and of PyTorch's."""
    results = []
    for module in (ours, ref):
        module.zero_grad()
        xx = x.detach().clone().requires_grad_()
        ss = None
        if state is not None:
            ss = tuple(s.detach().clone().requires_grad_() for s in state)
        call_state = ss if ss is None or len(ss) == 2 else ss[0]
        if module is ours:
            out, final = module(xx, call_state, lengths)
        elif lengths is None:
            out, final = module(xx, call_state)
        else:
            packed = pack_padded_sequence(
                xx, lengths, batch_first=module.batch_first, enforce_sorted=False
            )
            out, final = module(packed, call_state)
            steps = x.shape[1] if module.batch_first else x.shape[0]
            out, _ = pad_packed_sequence(
                out, batch_first=module.batch_first, total_length=steps
            )
        final = as_tuple(final)
        loss = (out * rand(*out.shape, seed=11)).sum()
        for k, f in enumerate(final):
            loss = loss + (f * rand(*f.shape, seed=12 + k)).sum()
        loss.backward()
        state_grads = None if ss is None else [s.grad for s in ss]
        results.append((out, final, xx.grad, state_grads, grads(module)))
    return results


def assert_pair_close(results, tol=F64):
    (o1, f1, gx1, gs1, gp1), (o2, f2, gx2, gs2, gp2) = results
    torch.testing.assert_close(o1, o2, **tol)
    for a, b in zip(f1, f2, strict=True):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(gx1, gx2, **tol)
    if gs1 is not None:
        for a, b in zip(gs1, gs2, strict=True):
            torch.testing.assert_close(a, b, **tol)
    for a, b in zip(gp1, gp2, strict=True):
        torch.testing.assert_close(a, b, **tol)


def make_layers(kind, case, bias=True):
    i, h, layers, bidir, bf, t, b = case
    ours_cls, ref_cls = PAIRS[kind]
    kwargs = dict(num_layers=layers, bias=bias, batch_first=bf, bidirectional=bidir)
    ours, ref = twins(ours_cls(i, h, **kwargs), ref_cls(i, h, **kwargs))
    x = rand(b, t, i, seed=3) if bf else rand(t, b, i, seed=3)
    n_states = 2 if kind == "lstm" else 1
    shape = (layers * (2 if bidir else 1), b, h)
    state = tuple(rand(*shape, seed=4 + k) for k in range(n_states))
    return ours, ref, x, state


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zeros"])
def test_layers_match_torch(kind, case, with_state):
    ours, ref, x, state = make_layers(kind, case)
    assert_pair_close(run_pair(ours, ref, x, state if with_state else None))


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("case", LAYER_CASES[1::2], ids=str)
def test_layers_without_bias_match_torch(kind, case):
    ours, ref, x, state = make_layers(kind, case, bias=False)
    assert not any("bias" in name for name in ours.state_dict())
    assert_pair_close(run_pair(ours, ref, x, state))


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_lengths_match_pack_padded_sequence(kind, case, seed):
    ours, ref, x, state = make_layers(kind, case)
    steps, batch = case[5], case[6]
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps  # one full-length sequence, as pad_packed_sequence needs
    if batch > 1:
        lengths[-1] = 1  # and a one-step sequence
    results = run_pair(ours, ref, x, state, lengths)
    assert_pair_close(results)
    out = results[0][0]
    out_tm = out.transpose(0, 1) if case[4] else out  # (T, B, D*H)
    for b, n in enumerate(lengths.tolist()):
        assert (out_tm[n:, b] == 0).all()  # outputs past the end are zero


def test_lengths_leave_the_result_of_full_sequences_unchanged():
    ours = LSTM(3, 4, num_layers=2, bidirectional=True).double()
    x = rand(5, 3, 3)
    full = torch.full((3,), 5)
    out1, (h1, c1) = ours(x)
    out2, (h2, c2) = ours(x, lengths=full)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_padding_values_do_not_matter(kind):
    ours_cls, _ = PAIRS[kind]
    layer = ours_cls(2, 3, num_layers=2, bidirectional=True).double()
    x = rand(6, 2, 2)
    lengths = torch.tensor([6, 3])
    noisy = x.clone()
    noisy[3:, 1] = 1e3  # garbage in the padding of the second sequence
    out1, s1 = layer(x, lengths=lengths)
    out2, s2 = layer(noisy, lengths=lengths)
    torch.testing.assert_close(out1, out2, **F64)
    for a, b in zip(as_tuple(s1), as_tuple(s2), strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_unbatched_input_matches_torch(kind, bidirectional):
    ours_cls, ref_cls = PAIRS[kind]
    ours, ref = twins(
        ours_cls(3, 4, num_layers=2, bidirectional=bidirectional),
        ref_cls(3, 4, num_layers=2, bidirectional=bidirectional),
    )
    x = rand(5, 3)
    shape = (2 * (2 if bidirectional else 1), 4)
    state = (rand(*shape, seed=1), rand(*shape, seed=2))
    state = state if kind == "lstm" else state[0]
    out1, s1 = ours(x, state)
    out2, s2 = ref(x, state)
    torch.testing.assert_close(out1, out2, **F64)
    for a, b in zip(as_tuple(s1), as_tuple(s2), strict=True):
        assert a.shape == shape
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_state_dict_names_and_shapes_are_torchs(kind, bidirectional):
    ours_cls, ref_cls = PAIRS[kind]
    ours = ours_cls(3, 5, num_layers=3, bidirectional=bidirectional)
    ref = ref_cls(3, 5, num_layers=3, bidirectional=bidirectional)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ("weight_ih_l2_reverse" in shapes) == bidirectional
    ours.load_state_dict(ref.state_dict())  # and back, strictly
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in ref.parameters()
    )


@pytest.mark.parametrize("kind", list(PAIRS))
def test_float32_agrees_with_torch(kind):
    case = (4, 8, 2, True, True, 12, 5)
    ours, ref, x, state = make_layers(kind, case)
    ours, ref = ours.float(), ref.float()
    x, state = x.float(), tuple(s.float() for s in state)
    results = run_pair(ours, ref, x, state, torch.tensor([12, 3, 7, 1, 12]))
    assert results[0][0].dtype == torch.float32
    assert_pair_close(results, tol=F32)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_gradcheck_through_lengths(kind):
    ours_cls, _ = PAIRS[kind]
    layer = ours_cls(2, 2, num_layers=2, bidirectional=True).double()
    x = rand(3, 2, 2).requires_grad_()
    lengths = torch.tensor([3, 2])

    def f(t):
        out, state = layer(t, lengths=lengths)
        return out, *as_tuple(state)

    assert torch.autograd.gradcheck(f, (x,))


# --------------------------------------------------------------------- the gates


def split(w: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    return w.chunk(n, dim=0)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_lstm_gates_follow_the_equations(batch_first, with_lengths):
    """Recompute i, f, g, o, c of every layer and direction from nn.LSTM's outputs."""
    case = (3, 4, 2, True, batch_first, 6, 3)
    ours, ref, x, (h0, c0) = make_layers("lstm", case)
    lengths = torch.tensor([6, 2, 4]) if with_lengths else None
    out, (h_n, _), gates = ours(x, (h0, c0), lengths, return_gates=True)
    for name in "ifgoc":
        assert gates[name].shape == ((4, 3, 6, 4) if batch_first else (4, 6, 3, 4))
    tm = (lambda t: t.transpose(0, 1)) if batch_first else (lambda t: t)
    gates = {k: v.transpose(1, 2) if batch_first else v for k, v in gates.items()}
    layer_in = tm(x)  # (T, B, I)
    steps = 6
    n = lengths if with_lengths else torch.full((3,), steps)
    ref_out = tm(out)  # equal to PyTorch's (checked elsewhere): (T, B, 2H)
    for layer in range(2):
        with torch.no_grad():
            ref_layer = nn.LSTM(layer_in.shape[-1], 4, bidirectional=True).double()
            for name, p in ref_layer.named_parameters():
                p.copy_(getattr(ref, name.replace("_l0", f"_l{layer}")))
            packed = pack_padded_sequence(layer_in, n, enforce_sorted=False)
            states = (h0[2 * layer : 2 * layer + 2], c0[2 * layer : 2 * layer + 2])
            layer_out, _ = ref_layer(packed, states)
            layer_out, _ = pad_packed_sequence(layer_out, total_length=steps)
        for direction in range(2):
            k = 2 * layer + direction
            w = getattr(ref_layer, "weight_ih_l0" + ("_reverse" if direction else ""))
            u = getattr(ref_layer, "weight_hh_l0" + ("_reverse" if direction else ""))
            b = getattr(ref_layer, "bias_ih_l0" + ("_reverse" if direction else ""))
            b = b + getattr(ref_layer, "bias_hh_l0" + ("_reverse" if direction else ""))
            h_dir = layer_out[..., 4 * direction : 4 * direction + 4]  # (T, B, H)
            for bi in range(3):
                c_prev, h_prev = c0[k, bi], h0[k, bi]
                order = range(n[bi]) if direction == 0 else range(n[bi] - 1, -1, -1)
                for t in order:
                    pre = w @ layer_in[t, bi] + u @ h_prev + b
                    i, f, g, o = pre.chunk(4)
                    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
                    c = f * c_prev + i * g
                    for name, value in zip("ifgoc", (i, f, g, o, c), strict=True):
                        torch.testing.assert_close(gates[name][k, t, bi], value, **F64)
                    torch.testing.assert_close(o * c.tanh(), h_dir[t, bi], **F64)
                    c_prev, h_prev = c, h_dir[t, bi]
                for t in range(n[bi], steps):  # padding: zero gates
                    for name in "ifgoc":
                        assert (gates[name][k, t, bi] == 0).all()
        layer_in = layer_out
    torch.testing.assert_close(layer_in, ref_out, **F64)


def test_gru_gates_follow_the_equations():
    ours, ref, x, (h0,) = make_layers("gru", (3, 4, 1, True, False, 5, 2))
    out, _, gates = ours(x, h0, return_gates=True)
    assert set(gates) == {"r", "z", "n"}
    ref_out, _ = ref(x, h0)
    for direction in range(2):
        end = "_l0" + ("_reverse" if direction else "")
        w_r, w_z, w_n = split(getattr(ref, "weight_ih" + end), 3)
        u_r, u_z, u_n = split(getattr(ref, "weight_hh" + end), 3)
        b_r, b_z, b_n = split(getattr(ref, "bias_ih" + end), 3)
        c_r, c_z, c_n = split(getattr(ref, "bias_hh" + end), 3)
        h_dir = ref_out[..., 4 * direction : 4 * direction + 4].detach()
        order = range(5) if direction == 0 else range(4, -1, -1)
        h_prev = h0[direction]
        for t in order:
            xt = x[t]
            r = torch.sigmoid(xt @ w_r.T + b_r + h_prev @ u_r.T + c_r)
            z = torch.sigmoid(xt @ w_z.T + b_z + h_prev @ u_z.T + c_z)
            n = torch.tanh(xt @ w_n.T + b_n + r * (h_prev @ u_n.T + c_n))
            for name, value in zip("rzn", (r, z, n), strict=True):
                torch.testing.assert_close(gates[name][direction, t], value, **F64)
            torch.testing.assert_close((1 - z) * n + z * h_prev, h_dir[t], **F64)
            h_prev = h_dir[t]


def test_gates_of_unbatched_input_drop_the_batch_axis():
    _, _, gates = GRU(2, 3, num_layers=2)(torch.randn(4, 2), return_gates=True)
    assert gates["z"].shape == (2, 4, 3)


# --------------------------------------------------------------------- initialisation


def forget_gate_at_rest(module: nn.Module) -> torch.Tensor:
    """The forget gate that nn.LSTMCell computes, with ``module``'s forget-gate biases
    (of layer 0), for a zero input and a zero hidden state."""
    h = module.hidden_size
    cell = nn.LSTMCell(module.input_size, h).double()
    end = "_l0" if isinstance(module, (nn.LSTM, LSTM)) else ""
    with torch.no_grad():
        for name, p in cell.named_parameters():
            p.copy_(getattr(module, name + end))
            if name.startswith("bias"):  # keep only the forget gate's bias
                p[:h] = 0
                p[2 * h :] = 0
    x = torch.zeros(1, module.input_size, dtype=torch.float64)
    h0 = torch.zeros(1, h, dtype=torch.float64)
    c0 = torch.ones(1, h, dtype=torch.float64)
    # i = sigmoid(0) and g = tanh(0) = 0, so c' = f * c0 = f
    _, c = cell(x, (h0, c0))
    return c[0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: LSTMCell(3, 5),
        lambda: LSTM(3, 5, num_layers=2, bidirectional=True),
        lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True),
        lambda: nn.LSTMCell(3, 5),
        lambda: nn.Sequential(nn.Linear(3, 3), LSTM(3, 5)),
    ],
    ids=["cell", "ours", "nn.LSTM", "nn.LSTMCell", "nested"],
)
@pytest.mark.parametrize("value", [1.0, -0.5, 3])
def test_init_forget_bias(make, value):
    module = make().double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert init_forget_bias(module, value) is module
    for name, p in module.state_dict().items():
        if "bias" in name and ("ih" in name or "hh" in name):
            f = p[5:10]
            torch.testing.assert_close(
                f, torch.full_like(f, value if "ih" in name else 0)
            )
            torch.testing.assert_close(p[:5], before[name][:5])
            torch.testing.assert_close(p[10:], before[name][10:])
        else:
            torch.testing.assert_close(p, before[name])
    lstm = next(m for m in module.modules() if hasattr(m, "hidden_size"))
    if isinstance(lstm, (LSTMCell, nn.LSTMCell, nn.LSTM, LSTM)):
        expected = torch.full((5,), 1 / (1 + math.exp(-value)), dtype=torch.float64)
        torch.testing.assert_close(forget_gate_at_rest(lstm), expected, **F64)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LSTM(3, 50, num_layers=2),
        lambda: nn.LSTM(3, 50, bidirectional=True),
        lambda: GRU(3, 50, bidirectional=True),
        lambda: nn.GRU(3, 50),
        lambda: GRUCell(3, 50),
        lambda: nn.LSTMCell(3, 50),
    ],
    ids=["lstm", "nn.LSTM", "gru", "nn.GRU", "gru-cell", "nn.LSTMCell"],
)
@pytest.mark.parametrize("max_delay", [3, 20, 150])
def test_chrono_init(make, max_delay):
    module = make().double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    assert chrono_init(module, max_delay, generator=g) is module
    lstm = isinstance(module, (LSTM, nn.LSTM, nn.LSTMCell))
    for name, p in module.state_dict().items():
        if name.startswith("bias_ih"):
            keep = p[50:100]
            assert keep.min() >= 0 and keep.max() <= math.log(max_delay - 1) + 1e-12
            assert keep.std() > 0  # a spread of time scales
            if lstm:
                torch.testing.assert_close(p[:50], -keep)  # input gate = -forget
                torch.testing.assert_close(p[100:], before[name][100:])
            else:
                torch.testing.assert_close(p[:50], before[name][:50])
                torch.testing.assert_close(p[100:], before[name][100:])
        elif name.startswith("bias_hh"):
            assert (p[50:100] == 0).all()
            if lstm:
                assert (p[:50] == 0).all()
        else:
            torch.testing.assert_close(p, before[name])
    if isinstance(module, (LSTM, nn.LSTM, nn.LSTMCell)):
        # the forget gate at rest is u / (1 + u), u in [1, T_max - 1]
        f = forget_gate_at_rest(module)
        assert f.min() >= 0.5 - 1e-12
        assert f.max() <= (max_delay - 1) / max_delay + 1e-12


def test_chrono_init_is_reproducible_with_a_generator():
    a = chrono_init(LSTM(2, 8), 30, torch.Generator().manual_seed(3))
    b = chrono_init(LSTM(2, 8), 30, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.bias_ih_l0[:16], b.bias_ih_l0[:16], rtol=0, atol=0)


# --------------------------------------------------------------------- task and model


@pytest.mark.parametrize("n, delay, n_symbols", [(1, 1, 2), (50, 5, 8), (7, 30, 3)])
def test_recall_task_matches_its_definition(n, delay, n_symbols):
    X, y = recall_task(n, delay, n_symbols, torch.Generator().manual_seed(0))
    assert X.shape == (n, delay + 1, n_symbols + 1) and X.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    symbols = X[..., :n_symbols]
    assert (symbols.sum(-1) == 1).all()  # one symbol per step
    assert torch.equal(symbols[:, 0].argmax(-1), y)  # the label is the first one
    marker = X[..., n_symbols]
    assert (marker[:, 0] == 1).all() and (marker[:, 1:] == 0).all()
    assert set(X.unique().tolist()) <= {0.0, 1.0}


def test_recall_task_is_uniform_and_reproducible():
    X, y = recall_task(8000, 3, 4, torch.Generator().manual_seed(1))
    counts = torch.bincount(y, minlength=4).double() / 8000
    assert (counts - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / 8000)
    distractors = X[:, 1:, :4].sum((0, 1)) / (8000 * 3)
    assert (distractors - 0.25).abs().max() < 0.02
    X2, y2 = recall_task(8000, 3, 4, torch.Generator().manual_seed(1))
    assert torch.equal(X, X2) and torch.equal(y, y2)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_sequence_classifier_reads_the_last_hidden_state(kind):
    torch.manual_seed(0)
    model = SequenceClassifier(kind, 4, 6, 3).double()
    ref_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
    ref = ref_cls(4, 6, batch_first=True).double()
    ref.load_state_dict(model.rnn.state_dict())
    x = rand(5, 7, 4)
    out, _ = ref(x)
    expected = model.head(out[:, -1])  # the last step's output is h_T
    torch.testing.assert_close(model(x), expected, **F64)
    assert model(x).shape == (5, 3)


# --------------------------------------------------------------------- bad input


def _cell(kind: str):
    return CELLS[kind][0](3, 4)


def _layer(kind: str, **options):
    return PAIRS[kind][0](3, 4, **options)


def _deep(kind: str):
    """A two-layer bidirectional layer: its states are (4, B, 4)."""
    return _layer(kind, num_layers=2, bidirectional=True)


def _state(kind: str, h: torch.Tensor, c: torch.Tensor) -> object:
    """The state a layer or cell of ``kind`` takes: ``(h, c)`` for an LSTM, ``h``."""
    return (h, c) if kind == "lstm" else h


_X = torch.randn(5, 2, 3)  # (T, B, input_size)
_GOOD = torch.zeros(4, 2, 4)  # (layers * directions, B, H)

# (a call that takes the kind, the error, a regex naming the argument, an id)
_PER_KIND = [
    (
        lambda k: _cell(k)([1.0, 2.0, 3.0]),
        TypeError,
        "x must be a torch.Tensor, got list",
        "cell-x-list",
    ),
    (
        lambda k: _cell(k)(torch.ones(2, 3, dtype=torch.int64)),
        TypeError,
        "x must be a floating-point tensor",
        "cell-x-int",
    ),
    (
        lambda k: _cell(k)(torch.randn(2, 2, 3)),
        ValueError,
        r"x must have 1 or 2 dimensions, got shape",
        "cell-x-3d",
    ),
    (
        lambda k: _cell(k)(torch.randn(2, 5)),
        ValueError,
        r"input_size=3 features on its last axis, got shape \(2, 5\)",
        "cell-x-features",
    ),
    (
        lambda k: _cell(k)(torch.randn(0, 3)),
        ValueError,
        "x .*at least one example",
        "cell-x-empty",
    ),
    (
        lambda k: _cell(k)(
            torch.randn(2, 3), _state(k, torch.randn(2, 5), torch.randn(2, 4))
        ),
        ValueError,
        r"h must have shape \(2, 4\) \(batch, hidden_size\), got \(2, 5\)",
        "cell-h-shape",
    ),
    (
        lambda k: _cell(k)(
            torch.randn(2, 3),
            _state(k, torch.randn(2, 4).double(), torch.randn(2, 4).double()),
        ),
        TypeError,
        "h must have the dtype and device of x",
        "cell-h-dtype",
    ),
    (
        lambda k: _deep(k)([[1.0, 2.0, 3.0]]),
        TypeError,
        "x must be a torch.Tensor, got list",
        "layer-x-list",
    ),
    (
        lambda k: _deep(k)(torch.ones(5, 2, 3, dtype=torch.int32)),
        TypeError,
        "x must be a floating-point tensor",
        "layer-x-int",
    ),
    (
        lambda k: _deep(k)(torch.randn(3)),
        ValueError,
        "x must have 2 or 3 dimensions",
        "layer-x-1d",
    ),
    (
        lambda k: _deep(k)(torch.randn(1, 5, 2, 3)),
        ValueError,
        "x must have 2 or 3 dimensions",
        "layer-x-4d",
    ),
    (
        lambda k: _deep(k)(torch.randn(5, 2, 4)),
        ValueError,
        r"input_size=3 features on its last axis, got shape \(5, 2, 4\)",
        "layer-x-features",
    ),
    (
        lambda k: _deep(k)(torch.randn(0, 2, 3)),
        ValueError,
        "x must hold at least one time step",
        "layer-x-no-step",
    ),
    (
        lambda k: _deep(k)(torch.randn(0, 3)),
        ValueError,
        "x must hold at least one time step",
        "layer-x-no-step-unbatched",
    ),
    (
        lambda k: _deep(k)(torch.randn(5, 0, 3)),
        ValueError,
        "x must hold at least one sequence",
        "layer-x-no-sequence",
    ),
    (
        lambda k: _deep(k)(_X, _state(k, torch.zeros(4, 2, 5), _GOOD)),
        ValueError,
        r"h0 must have shape \(4, 2, 4\) \(num_layers \* num_directions, batch, hidden_size\), got \(4, 2, 5\)",
        "h0-hidden",
    ),
    (
        lambda k: _deep(k)(_X, _state(k, torch.zeros(2, 2, 4), _GOOD)),
        ValueError,
        r"h0 must have shape \(4, 2, 4\)",
        "h0-directions",
    ),
    (
        lambda k: _deep(k)(torch.randn(5, 3), _state(k, _GOOD, _GOOD)),
        ValueError,
        r"h0 must have shape \(4, 4\) \(num_layers",
        "h0-unbatched",
    ),
    (
        lambda k: _deep(k)(_X, _state(k, _GOOD.double(), _GOOD)),
        TypeError,
        "h0 must have the dtype and device of x",
        "h0-dtype",
    ),
    (
        lambda k: _layer(k)(_X, None, [5, 3]),
        TypeError,
        "lengths must be a torch.Tensor, got list",
        "lengths-list",
    ),
    (
        lambda k: _layer(k)(_X, None, torch.tensor([5.0, 3.0])),
        TypeError,
        "lengths must be an integer tensor",
        "lengths-float",
    ),
    (
        lambda k: _layer(k)(_X, None, torch.tensor([True, True])),
        TypeError,
        "lengths must be an integer tensor",
        "lengths-bool",
    ),
    (
        lambda k: _layer(k)(_X, None, torch.tensor([[5, 3]])),
        ValueError,
        r"lengths must have 1 dimensions",
        "lengths-2d",
    ),
    (
        lambda k: _layer(k)(_X, None, torch.tensor([5, 3, 1])),
        ValueError,
        r"lengths must have one entry per sequence \(2\), got shape \(3,\)",
        "lengths-batch",
    ),
    (
        lambda k: _layer(k)(_X, None, torch.tensor([5, 0])),
        ValueError,
        r"lengths must be >= 1.*\[5, 0\]",
        "lengths-empty",
    ),
    (
        lambda k: _layer(k)(_X, None, torch.tensor([6, 3])),
        ValueError,
        r"lengths must be at most the number of time steps \(5\)",
        "lengths-long",
    ),
    (
        lambda k: _layer(k)(torch.randn(5, 3), None, torch.tensor([5])),
        ValueError,
        "lengths needs batched input",
        "lengths-unbatched",
    ),
    (
        lambda k: _layer(k)(_X, return_gates="yes"),
        TypeError,
        "return_gates must be a bool, got str",
        "return_gates",
    ),
]
_PER_CLASS = [
    (
        lambda cls: cls(0, 4),
        ValueError,
        "input_size must be positive, got 0",
        "input_size",
    ),
    (
        lambda cls: cls(3, -1),
        ValueError,
        "hidden_size must be positive, got -1",
        "hidden_size",
    ),
    (
        lambda cls: cls(3, 4.0),
        TypeError,
        "hidden_size must be an int, got float",
        "hidden_size-float",
    ),
    (lambda cls: cls(3, 4, bias=1), TypeError, "bias must be a bool, got int", "bias"),
]
_PER_LAYER_CLASS = [
    (
        lambda cls: cls(3, 4, num_layers=0),
        ValueError,
        "num_layers must be positive, got 0",
        "num_layers",
    ),
    (
        lambda cls: cls(3, 4, batch_first="yes"),
        TypeError,
        "batch_first must be a bool, got str",
        "batch_first",
    ),
    (
        lambda cls: cls(3, 4, bidirectional=None),
        TypeError,
        "bidirectional must be a bool",
        "bidirectional",
    ),
]

BAD_INPUT = [
    *(
        pytest.param(
            lambda call=call, kind=kind: call(kind), error, match, id=f"{kind}-{name}"
        )
        for kind in PAIRS
        for call, error, match, name in _PER_KIND
    ),
    *(
        pytest.param(
            lambda call=call, cls=cls: call(cls),
            error,
            match,
            id=f"{cls.__name__}-{name}",
        )
        for cls in (LSTM, GRU, LSTMCell, GRUCell)
        for call, error, match, name in _PER_CLASS
    ),
    *(
        pytest.param(
            lambda call=call, cls=cls: call(cls),
            error,
            match,
            id=f"{cls.__name__}-{name}",
        )
        for cls in (LSTM, GRU)
        for call, error, match, name in _PER_LAYER_CLASS
    ),
    pytest.param(
        lambda: LSTMCell(3, 4)(torch.randn(2, 3), torch.randn(2, 4)),
        TypeError,
        r"state must be a tuple \(h, c\) or None",
        id="LSTMCell-state-tensor",
    ),
    pytest.param(
        lambda: LSTMCell(3, 4)(
            torch.randn(2, 3), (torch.randn(2, 4), torch.randn(3, 4))
        ),
        ValueError,
        r"c must have shape \(2, 4\) \(batch, hidden_size\)",
        id="LSTMCell-c-shape",
    ),
    pytest.param(
        lambda: LSTMCell(3, 4)(torch.randn(3), (torch.randn(1, 4), torch.randn(1, 4))),
        ValueError,
        r"h must have shape \(4,\)",
        id="LSTMCell-h-unbatched",
    ),
    pytest.param(
        lambda: GRU(3, 4, batch_first=True)(torch.randn(2, 0, 3)),
        ValueError,
        "x must hold at least one time step",
        id="GRU-batch-first-empty",
    ),
    pytest.param(
        lambda: _deep("lstm")(_X, (_GOOD, torch.zeros(4, 2, 3))),
        ValueError,
        r"c0 must have shape \(4, 2, 4\)",
        id="LSTM-c0-shape",
    ),
    pytest.param(
        lambda: _deep("lstm")(_X, _GOOD),
        TypeError,
        r"state must be a tuple \(h0, c0\)",
        id="LSTM-state-tensor",
    ),
    pytest.param(
        lambda: _deep("lstm")(_X, (_GOOD, None)),
        TypeError,
        "c0 must be a torch.Tensor",
        id="LSTM-c0-none",
    ),
    pytest.param(
        lambda: init_forget_bias("lstm"),
        TypeError,
        "module must be an nn.Module, got str",
        id="init_forget_bias-module",
    ),
    pytest.param(
        lambda: init_forget_bias(GRU(2, 3)),
        ValueError,
        "module contains no LSTM or LSTMCell",
        id="init_forget_bias-gru",
    ),
    pytest.param(
        lambda: init_forget_bias(LSTM(2, 3), "1"),
        TypeError,
        "value must be a number",
        id="init_forget_bias-value",
    ),
    pytest.param(
        lambda: init_forget_bias(LSTM(2, 3), float("inf")),
        ValueError,
        "value must be finite",
        id="init_forget_bias-inf",
    ),
    pytest.param(
        lambda: chrono_init(None, 10),
        TypeError,
        "module must be an nn.Module",
        id="chrono_init-module",
    ),
    pytest.param(
        lambda: chrono_init(nn.Linear(2, 3), 10),
        ValueError,
        "module contains no LSTM or GRU",
        id="chrono_init-linear",
    ),
    pytest.param(
        lambda: chrono_init(LSTM(2, 3), 2),
        ValueError,
        "max_delay must be at least 3, got 2",
        id="chrono_init-max_delay",
    ),
    pytest.param(
        lambda: chrono_init(LSTM(2, 3), 10.0),
        TypeError,
        "max_delay must be an int",
        id="chrono_init-max_delay-float",
    ),
    pytest.param(
        lambda: recall_task(0, 5),
        ValueError,
        "n must be positive, got 0",
        id="recall_task-n",
    ),
    pytest.param(
        lambda: recall_task(4, 0),
        ValueError,
        "delay must be positive, got 0",
        id="recall_task-delay",
    ),
    pytest.param(
        lambda: recall_task(4, 5, 1),
        ValueError,
        "n_symbols must be at least 2, got 1",
        id="recall_task-n_symbols",
    ),
    pytest.param(
        lambda: recall_task(4, 2.5),
        TypeError,
        "delay must be an int",
        id="recall_task-delay-float",
    ),
    pytest.param(
        lambda: SequenceClassifier("transformer", 3, 4, 2),
        ValueError,
        r"kind must be one of \('lstm', 'gru', 'rnn'\)",
        id="SequenceClassifier-kind",
    ),
    pytest.param(
        lambda: SequenceClassifier("gru", 3, 4, 0),
        ValueError,
        "n_classes must be positive",
        id="SequenceClassifier-n_classes",
    ),
    pytest.param(
        lambda: SequenceClassifier("gru", 3, 4, 2)(torch.randn(5, 3)),
        ValueError,
        "x must have 3 dimensions",
        id="SequenceClassifier-x-2d",
    ),
    pytest.param(
        lambda: SequenceClassifier("gru", 3, 4, 2)(
            torch.ones(2, 5, 3, dtype=torch.long)
        ),
        TypeError,
        "x must be a floating-point tensor",
        id="SequenceClassifier-x-long",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_lengths_on_another_device_skip_the_value_checks():
    """Value checks of ``lengths`` would sync a GPU; only the CPU gets them."""
    layer = GRU(3, 4)
    lengths = torch.tensor([5, 3], device="meta")
    assert layer._check_lengths(lengths, 2, 5) is lengths
