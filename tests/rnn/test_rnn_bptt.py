"""Tests for ``dlabc.rnn.rnn_bptt``.

The NumPy ``RNN`` must agree with ``torch.nn.RNN`` (weights copied by name) in float64:
the forward pass (``output`` and ``h_n``) and, through autograd, the gradients of every
parameter, the input and ``h_0``, for tanh and ReLU, one to three layers, both layouts,
with and without biases, unbatched inputs and many random shapes. BPTT is also checked
against central finite differences. The truncated-BPTT loop is replayed step by step in
PyTorch (``nn.RNN`` + ``nn.Linear``, ``h.detach()`` between chunks,
``nn.utils.clip_grad_norm_``, a hand SGD step) and must follow the same losses and end
with the same weights. ``clip_gradients`` is compared with ``nn.utils.clip_grad_norm_``;
``input_gradient_norms`` with autograd's gradient and, in the linear regime, with the
closed form ``|u^T W^k W_ih|``; ``set_spectral_radius`` with ``torch.linalg.eigvals``;
``delayed_sign_task`` with its definition. Bad input must fail early, with a clear
message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.foundations.numpy_network import Dense, numerical_gradient
from dlabc.rnn.rnn_bptt import (
    RNN,
    clip_gradients,
    delayed_sign_task,
    input_gradient_norms,
    set_spectral_radius,
    train_tbptt,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64 against float64: rounding only
FD_TOL = dict(rtol=1e-6, atol=1e-8)  # central differences: O(eps^2) + O(1e-16 / eps)


def twin(ours: RNN) -> nn.RNN:
    """``nn.RNN`` with our configuration and our weights, in float64."""
    ref = nn.RNN(
        ours.input_size,
        ours.hidden_size,
        num_layers=ours.num_layers,
        nonlinearity=ours.nonlinearity,
        bias=ours.bias,
        batch_first=ours.batch_first,
    ).double()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    return ref


def compare_with_torch(ours: RNN, x, h_0=None, with_grad_h_n=True, seed=0) -> None:
    """Forward and backward of ``ours`` against autograd through ``nn.RNN``."""
    rng = np.random.default_rng(seed)
    ref = twin(ours)
    xt = torch.tensor(x, requires_grad=True)
    h0t = None if h_0 is None else torch.tensor(h_0, requires_grad=True)
    out_t, h_n_t = ref(xt, h0t)
    G = rng.standard_normal(tuple(out_t.shape))
    G_n = rng.standard_normal(tuple(h_n_t.shape)) if with_grad_h_n else None
    loss = (out_t * torch.from_numpy(G)).sum()
    if with_grad_h_n:
        loss = loss + (h_n_t * torch.from_numpy(G_n)).sum()
    loss.backward()

    out, h_n = ours.forward(x, h_0)
    grads = ours.backward(G, G_n)
    np.testing.assert_allclose(out, out_t.detach().numpy(), **TIGHT)
    np.testing.assert_allclose(h_n, h_n_t.detach().numpy(), **TIGHT)
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), **TIGHT)
        np.testing.assert_array_equal(ours.grads[name], grads[name])
    np.testing.assert_allclose(grads["input"], xt.grad.numpy(), **TIGHT)
    if h_0 is not None:
        np.testing.assert_allclose(grads["h_0"], h0t.grad.numpy(), **TIGHT)
    assert set(grads) == set(ours.params) | {"input", "h_0"}


# --------------------------------------------------------------------- against nn.RNN


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize(
    "batch_first", [False, True], ids=["time-major", "batch-first"]
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_forward_and_bptt_match_torch(nonlinearity, num_layers, batch_first, bias):
    ours = RNN(3, 5, num_layers, nonlinearity, bias, batch_first, seed=num_layers)
    rng = np.random.default_rng(7)
    T, N = 6, 4
    x = rng.standard_normal((N, T, 3) if batch_first else (T, N, 3))
    h_0 = rng.standard_normal((num_layers, N, 5))
    compare_with_torch(ours, x, h_0)
    compare_with_torch(ours, x, None, with_grad_h_n=False)  # zero h_0, no dL/dh_n


@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_match_torch(seed):
    rng = np.random.default_rng(100 + seed)
    T, N, D, H, L = (int(v) for v in rng.integers(1, [12, 6, 7, 9, 4]))
    nonlinearity = ["tanh", "relu"][seed % 2]
    batch_first = bool(seed % 3 == 0)
    ours = RNN(D, H, L, nonlinearity, batch_first=batch_first, seed=seed)
    for p in ours.params.values():  # weights beyond nn.RNN's initial range
        p[...] = rng.standard_normal(p.shape)
    x = rng.standard_normal((N, T, D) if batch_first else (T, N, D))
    compare_with_torch(ours, x, rng.standard_normal((L, N, H)), seed=seed)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_matches_torch(nonlinearity, batch_first):
    ours = RNN(4, 3, 2, nonlinearity, batch_first=batch_first, seed=5)
    rng = np.random.default_rng(3)
    x, h_0 = rng.standard_normal((7, 4)), rng.standard_normal((2, 3))  # (T, D), (L, H)
    compare_with_torch(ours, x, h_0)
    out, h_n = ours.forward(x, h_0)
    assert out.shape == (7, 3) and h_n.shape == (2, 3)
    assert ours.backward(np.ones((7, 3)))["h_0"].shape == (2, 3)


def test_float32_input_is_computed_in_float64():
    ours = RNN(2, 3, seed=1)
    x = np.random.default_rng(0).standard_normal((4, 2, 2))
    out64, _ = ours.forward(x)
    out32, _ = ours.forward(x.astype(np.float32))
    assert out32.dtype == np.float64
    np.testing.assert_allclose(out32, out64, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- finite differences


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_bptt_matches_finite_differences(nonlinearity, batch_first):
    rng = np.random.default_rng(11)
    ours = RNN(3, 4, 2, nonlinearity, batch_first=batch_first, seed=2)
    x = rng.standard_normal((2, 5, 3) if batch_first else (5, 2, 3))
    h_0 = rng.standard_normal((2, 2, 4))
    out, _ = ours.forward(x, h_0)
    G, G_n = rng.standard_normal(out.shape), rng.standard_normal(h_0.shape)
    grads = ours.backward(G, G_n)

    def loss() -> float:
        out, h_n = ours.forward(x, h_0)
        return float((out * G).sum() + (h_n * G_n).sum())

    for name, array in dict(ours.params, input=x, h_0=h_0).items():
        np.testing.assert_allclose(
            grads[name], numerical_gradient(loss, array), **FD_TOL
        )


def test_biases_get_the_same_gradient():
    ours = RNN(2, 3, 2, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 3, 2))
    out, _ = ours.forward(x)
    grads = ours.backward(np.ones_like(out))
    for layer in range(2):
        np.testing.assert_array_equal(
            grads[f"bias_ih_l{layer}"], grads[f"bias_hh_l{layer}"]
        )


def test_backward_uses_the_last_forward_and_can_be_repeated():
    ours = RNN(2, 3, seed=0)
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((4, 2, 2)), rng.standard_normal((6, 1, 2))
    ours.forward(x1)
    out2, _ = ours.forward(x2)
    G = rng.standard_normal(out2.shape)
    first = ours.backward(G)
    second = ours.backward(G)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    compare_with_torch(ours, x2)


def test_forward_results_do_not_alias_the_cache():
    ours = RNN(2, 3, seed=0)
    x = np.random.default_rng(1).standard_normal((4, 2, 2))
    out, _ = ours.forward(x)
    G = np.ones_like(out)
    expected = ours.backward(G)
    out[...] = 123.0  # a caller writing into the output must not change backward
    got = ours.backward(G)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


# --------------------------------------------------------------------- parameters


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_shapes_and_initial_range_match_torch(num_layers, bias):
    H = 16
    ours = RNN(5, H, num_layers, bias=bias, seed=0)
    ref = nn.RNN(5, H, num_layers, bias=bias)
    assert list(ours.params) == list(ref.state_dict())
    for name, p in ref.state_dict().items():
        assert ours.params[name].shape == tuple(p.shape)
        assert ours.params[name].dtype == np.float64
        bound = 1 / np.sqrt(H)
        assert np.abs(ours.params[name]).max() <= bound
        assert np.abs(ours.params[name]).max() > 0.8 * bound  # spread over the range
    assert [p for p, _ in ours.parameters()] == list(ours.params.values())
    different_seed = RNN(5, H, num_layers, bias=bias, seed=1)
    assert not np.array_equal(
        ours.params["weight_hh_l0"], different_seed.params["weight_hh_l0"]
    )


def test_state_dict_round_trips_into_torch_and_back():
    ours = RNN(3, 4, 2, seed=3)
    ref = twin(ours)  # our weights loaded into nn.RNN
    back = RNN(3, 4, 2, seed=99)
    back.load_state_dict(ref.state_dict())  # torch tensors
    for name in ours.params:
        np.testing.assert_array_equal(back.params[name], ours.params[name])
    copy = ours.state_dict()
    copy["weight_hh_l0"][...] = 0.0  # a copy, not the parameters themselves
    assert ours.params["weight_hh_l0"].any()


def test_load_state_dict_keeps_the_parameter_arrays():
    ours = RNN(2, 3, seed=0)
    (weight_ih, grad_ih), *_ = ours.parameters()
    ours.load_state_dict(nn.RNN(2, 3).state_dict())
    assert ours.params["weight_ih_l0"] is weight_ih  # copied in place
    x = np.random.default_rng(0).standard_normal((3, 1, 2))
    out, _ = ours.forward(x)
    ours.backward(np.ones_like(out))
    assert ours.grads["weight_ih_l0"] is grad_ih and grad_ih.any()


# --------------------------------------------------------------------- clipping


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 5.0, 1e3])
def test_clip_gradients_matches_torch(max_norm):
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal((3, 4)) * 2, rng.standard_normal(5), np.ones((2, 2))]
    params = [torch.zeros(g.shape, dtype=torch.float64) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.from_numpy(g.copy())
    expected_norm = nn.utils.clip_grad_norm_(params, max_norm).item()
    norm = clip_gradients(grads, max_norm)
    assert norm == pytest.approx(expected_norm, rel=1e-12)
    for p, g in zip(params, grads, strict=True):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-6)


def test_clip_gradients_changes_the_arrays_in_place():
    g = np.full(4, 3.0)  # norm 6
    before = g
    assert clip_gradients([g], 1.5) == pytest.approx(6.0)
    assert g is before
    np.testing.assert_allclose(g, np.full(4, 0.75), rtol=1e-6)  # norm 1.5
    small = np.array([0.3, 0.4])  # norm 0.5, under the threshold: untouched
    clip_gradients([small], 1.0)
    np.testing.assert_array_equal(small, [0.3, 0.4])


# --------------------------------------------------------------------- truncated BPTT


def torch_tbptt(ours, head, x, y, chunk_length, lr, max_norm):
    """The reference: nn.RNN + nn.Linear, h.detach() between chunks, torch clipping."""
    rnn = twin(ours)
    linear = nn.Linear(*head.W.shape).double()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(head.W.T))  # Dense: x W; Linear: x W^T
        linear.bias.copy_(torch.from_numpy(head.b))
    params = list(rnn.parameters()) + list(linear.parameters())
    losses, h = [], None
    for start in range(0, len(x), chunk_length):
        xc = torch.from_numpy(x[start : start + chunk_length])
        yc = torch.from_numpy(y[start : start + chunk_length])
        out, h = rnn(xc, h)
        loss = F.cross_entropy(linear(out).reshape(-1, head.W.shape[1]), yc.reshape(-1))
        for p in params:
            p.grad = None
        loss.backward()
        h = h.detach()  # the truncation
        if max_norm is not None:
            nn.utils.clip_grad_norm_(params, max_norm)
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
        losses.append(loss.item())
    return losses, rnn, linear


@pytest.mark.parametrize("chunk_length", [1, 3, 5, 20])
@pytest.mark.parametrize("max_norm", [None, 0.05])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_train_tbptt_matches_a_torch_loop_with_detach(
    chunk_length, max_norm, num_layers
):
    rng = np.random.default_rng(chunk_length)
    x = rng.standard_normal((13, 4, 2))  # 13 steps: the last chunk may be shorter
    y = rng.integers(0, 3, size=(13, 4))
    ours = RNN(2, 5, num_layers, seed=1)
    head = Dense(5, 3, np.random.default_rng(2))
    head.b = rng.standard_normal(3)
    losses, rnn, linear = torch_tbptt(ours, head, x, y, chunk_length, 0.3, max_norm)
    history = train_tbptt(
        ours, head, x, y, chunk_length=chunk_length, lr=0.3, max_norm=max_norm
    )
    assert len(history["loss"]) == -(-13 // chunk_length)
    np.testing.assert_allclose(history["loss"], losses, rtol=1e-9)
    for name, p in rnn.named_parameters():
        np.testing.assert_allclose(ours.params[name], p.detach().numpy(), **FD_TOL)
    np.testing.assert_allclose(head.W, linear.weight.detach().numpy().T, **FD_TOL)
    np.testing.assert_allclose(head.b, linear.bias.detach().numpy(), **FD_TOL)
    if max_norm is not None:
        assert max(history["grad_norm"]) > max_norm  # clipping was active


def test_train_tbptt_history_measures_before_the_step():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3, 1)), rng.integers(0, 2, size=(6, 3))
    ours, head = RNN(1, 4, seed=0), Dense(4, 2, np.random.default_rng(0))
    out, _ = ours.forward(x[:3])
    logits = head.forward(out.reshape(-1, 4))
    expected_accuracy = (logits.argmax(1) == y[:3].reshape(-1)).mean()
    history = train_tbptt(ours, head, x, y, chunk_length=3, lr=0.1)
    assert history["accuracy"][0] == pytest.approx(expected_accuracy)
    assert set(history) == {"loss", "accuracy", "grad_norm"}
    assert all(len(v) == 2 for v in history.values())


def test_train_tbptt_stops_when_the_loss_is_not_finite():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 2, 1)), rng.integers(0, 2, size=(20, 2))
    ours, head = RNN(1, 3, seed=0), Dense(3, 2, np.random.default_rng(0))
    head.W[...] = np.nan
    history = train_tbptt(ours, head, x, y, chunk_length=4, lr=0.1)
    assert len(history["loss"]) == 1 and not np.isfinite(history["loss"][0])


# --------------------------------------------------------------------- the task


@pytest.mark.parametrize("delay", [0, 1, 5])
def test_delayed_sign_task_labels_the_sign_delay_steps_back(delay):
    x, y = delayed_sign_task(30, 4, delay, seed=3)
    assert x.shape == (30, 4, 1) and y.shape == (30, 4) and y.dtype == np.int64
    np.testing.assert_array_equal(y[delay:], (x[: 30 - delay, :, 0] > 0).astype(int))
    x2, y2 = delayed_sign_task(30, 4, delay, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert 0.3 < y.mean() < 0.7


# --------------------------------------------------------------------- spectral radius


@pytest.mark.parametrize("rho", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("seed", range(3))
def test_set_spectral_radius_matches_torch_eigvals(rho, seed):
    W = np.random.default_rng(seed).standard_normal((6, 6))
    scaled = set_spectral_radius(W, rho)
    radius = torch.linalg.eigvals(torch.from_numpy(scaled)).abs().max().item()
    assert radius == pytest.approx(rho, rel=1e-10)
    ratio = scaled / W  # a multiple of W: the eigenvectors stay, the radius changes
    np.testing.assert_allclose(ratio, np.full_like(W, ratio[0, 0]), rtol=1e-12)


def test_set_spectral_radius_closed_form_on_a_diagonal_matrix():
    W = np.diag([0.5, -2.0, 1.0])
    np.testing.assert_allclose(set_spectral_radius(W, 1.0), np.diag([0.25, -1.0, 0.5]))


# --------------------------------------------------------------------- gradient norms


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_input_gradient_norms_match_autograd(batch_first, num_layers):
    rng = np.random.default_rng(5)
    ours = RNN(3, 6, num_layers, batch_first=batch_first, seed=0)
    T, N = 9, 4
    x = rng.standard_normal((N, T, 3) if batch_first else (T, N, 3))
    norms = input_gradient_norms(ours, x, seed=2)
    u = np.random.default_rng(2).standard_normal(6)
    u /= np.linalg.norm(u)
    xt = torch.tensor(x, requires_grad=True)
    out, _ = twin(ours)(xt)
    last = out[:, -1] if batch_first else out[-1]  # (N, H)
    (last @ torch.from_numpy(u)).sum().backward()
    grad = xt.grad.numpy()
    if batch_first:
        grad = grad.transpose(1, 0, 2)
    expected = np.sqrt((grad**2).sum(-1).mean(1))[::-1]
    np.testing.assert_allclose(norms, expected, **TIGHT)


def test_input_gradient_norms_unbatched_equals_a_batch_of_one():
    ours = RNN(2, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 2))
    np.testing.assert_allclose(
        input_gradient_norms(ours, x), input_gradient_norms(ours, x[:, None]), **TIGHT
    )


def test_input_gradient_norms_closed_form_in_the_linear_regime():
    """Tiny inputs, no bias: tanh is the identity, so dh_T/dx_{T-k} = W_hh^k W_ih."""
    H = 5
    ours = RNN(2, H, bias=False, seed=0)
    W = set_spectral_radius(np.random.default_rng(1).standard_normal((H, H)), 0.9)
    ours.params["weight_hh_l0"][...] = W
    x = 1e-9 * np.random.default_rng(2).standard_normal((8, 1, 2))
    u = np.random.default_rng(0).standard_normal(H)
    u /= np.linalg.norm(u)
    expected = [
        np.linalg.norm(u @ np.linalg.matrix_power(W, k) @ ours.params["weight_ih_l0"])
        for k in range(8)
    ]
    np.testing.assert_allclose(input_gradient_norms(ours, x), expected, rtol=1e-9)


# --------------------------------------------------------------------- bad input


def _forwarded() -> RNN:
    """A two-layer RNN after a forward pass, ready for a backward one."""
    ours = RNN(3, 4, 2)
    ours.forward(np.ones((5, 2, 3)))
    return ours


def _frozen() -> np.ndarray:
    frozen = np.ones(3)
    frozen.flags.writeable = False
    return frozen


_X, _Y = np.ones((6, 2, 1)), np.zeros((6, 2), dtype=int)


def _head(n_in: int = 4) -> Dense:
    return Dense(n_in, 2, np.random.default_rng(0))


BAD_INPUT = [
    pytest.param(
        lambda: RNN(0, 3),
        ValueError,
        "input_size must be positive, got 0",
        id="RNN-0",
    ),
    pytest.param(
        lambda: RNN(2, -1),
        ValueError,
        "hidden_size must be positive, got -1",
        id="RNN-1",
    ),
    pytest.param(
        lambda: RNN(2, 3, 2.0),
        TypeError,
        "num_layers must be an int, got float",
        id="RNN-2",
    ),
    pytest.param(
        lambda: RNN(2, 3, nonlinearity="sigmoid"),
        ValueError,
        "nonlinearity must be one of \\('tanh', ",
        id="RNN-3",
    ),
    pytest.param(
        lambda: RNN(2, 3, batch_first=1),
        TypeError,
        "batch_first must be a bool, got int",
        id="RNN-4",
    ),
    pytest.param(
        lambda: RNN(2, 3, bias="yes"),
        TypeError,
        "bias must be a bool, got str",
        id="RNN-5",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward([[0.0, 0.0, 0.0]]),
        TypeError,
        "x must be a NumPy array, got list",
        id="forward-0",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones((2, 1, 3), dtype=np.int64)),
        TypeError,
        "x must be a floating-point array",
        id="forward-1",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones((5, 2, 4))),
        ValueError,
        "x must have shape \\(T, N, 3\\) or, unbatched, \\(T, 3\\); ",
        id="forward-2",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones(5)),
        ValueError,
        r"x must have shape .*got \(5,\)",
        id="forward-3",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones((1, 5, 2, 3))),
        ValueError,
        "x must have shape .*got \\(1, 5, 2, 3\\)",
        id="forward-4",
    ),
    pytest.param(
        lambda: RNN(3, 4, batch_first=True).forward(np.ones((2, 5, 2))),
        ValueError,
        "x must have shape \\(N, T, 3\\)",
        id="forward-5",
    ),
    pytest.param(
        lambda: RNN(3, 4).forward(np.ones((0, 2, 3))),
        ValueError,
        "x is an empty sequence \\(no time step\\)",
        id="forward-empty-0",
    ),
    pytest.param(
        lambda: RNN(3, 4).forward(np.ones((0, 3))),
        ValueError,
        "x is an empty sequence",
        id="forward-empty-1",
    ),
    pytest.param(
        lambda: RNN(3, 4).forward(np.ones((4, 0, 3))),
        ValueError,
        "x is an empty batch \\(no sequence\\)",
        id="forward-empty-2",
    ),
    pytest.param(
        lambda: RNN(3, 4, batch_first=True).forward(np.ones((2, 0, 3))),
        ValueError,
        "x is an empty sequence",
        id="forward-empty-3",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones((5, 2, 3)), np.zeros((2, 2, 5))),
        ValueError,
        "h_0 must have shape \\(2, 2, 4\\) \\(num_layers, batch, hidden_size\\), got \\(2, 2, 5\\)",
        id="h_0-0",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones((5, 2, 3)), np.zeros((1, 2, 4))),
        ValueError,
        "h_0 must have shape \\(2, 2, 4\\)",
        id="h_0-1",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones((5, 2, 3)), np.zeros((2, 3, 4))),
        ValueError,
        "h_0 must have shape \\(2, 2, 4\\)",
        id="h_0-2",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones((5, 3)), np.zeros((2, 1, 4))),
        ValueError,
        "h_0 must have shape \\(2, 4\\) \\(num_layers, hidden_size\\)",
        id="h_0-3",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).forward(np.ones((5, 2, 3)), torch.zeros(2, 2, 4)),
        TypeError,
        "h_0 must be a NumPy array",
        id="h_0-4",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).backward(np.ones((5, 2, 4))),
        RuntimeError,
        "backward needs a forward pass first",
        id="backward-0",
    ),
    pytest.param(
        lambda: _forwarded().backward(np.ones((5, 2, 3))),
        ValueError,
        "grad_output must have the shape of output, \\(5, 2, 4\\), got \\(5, 2, 3\\)",
        id="backward-1",
    ),
    pytest.param(
        lambda: _forwarded().backward(np.ones((5, 2, 4)), np.ones((1, 2, 4))),
        ValueError,
        "grad_h_n must have shape \\(2, 2, 4\\)",
        id="backward-2",
    ),
    pytest.param(
        lambda: _forwarded().backward(np.ones((5, 2, 4), dtype=int)),
        TypeError,
        "grad_output must be a floating-point array",
        id="backward-3",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).load_state_dict(nn.RNN(3, 4, 1).state_dict()),
        KeyError,
        "missing \\['bias_hh_l1', 'bias_ih_l1', ",
        id="load_state_dict-0",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).load_state_dict(nn.RNN(3, 4, 3).state_dict()),
        KeyError,
        "missing \\[\\], unexpected \\['bias_hh_l2', 'bias_ih_l2', 'weight_hh_l2'",
        id="load_state_dict-1",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).load_state_dict(nn.RNN(3, 5, 2).state_dict()),
        ValueError,
        "state\\['weight_ih_l0'\\] must have shape \\(4, 3\\), got \\(5, 3\\)",
        id="load_state_dict-2",
    ),
    pytest.param(
        lambda: RNN(3, 4, 2).load_state_dict([1, 2]),
        TypeError,
        "state must be a mapping, got list",
        id="load_state_dict-3",
    ),
    pytest.param(
        lambda: RNN(3, 4, bias=False).load_state_dict(nn.RNN(3, 4).state_dict()),
        KeyError,
        "unexpected \\['bias_hh_l0'",
        id="load_state_dict-4",
    ),
    pytest.param(
        lambda: clip_gradients(np.ones(3), 1.0),
        TypeError,
        "grads must be a list of arrays, got ndarray",
        id="clip_gradients-0",
    ),
    pytest.param(
        lambda: clip_gradients([np.ones(3), [1.0]], 1.0),
        TypeError,
        "grads\\[1\\] must be a NumPy array",
        id="clip_gradients-1",
    ),
    pytest.param(
        lambda: clip_gradients([np.ones(3, dtype=int)], 1.0),
        TypeError,
        "grads\\[0\\] must be a floating-point array",
        id="clip_gradients-2",
    ),
    pytest.param(
        lambda: clip_gradients([_frozen()], 1.0),
        ValueError,
        "grads\\[0\\] must be writeable",
        id="clip_gradients-3",
    ),
    pytest.param(
        lambda: clip_gradients([np.ones(3)], 0.0),
        ValueError,
        "max_norm must be in \\(0, inf\\)",
        id="clip_gradients-4",
    ),
    pytest.param(
        lambda: train_tbptt(nn.RNN(1, 4), _head(), _X, _Y, chunk_length=2, lr=0.1),
        TypeError,
        "model must be the NumPy RNN .* got torch\\.nn\\.modules",
        id="train_tbptt-0",
    ),
    pytest.param(
        lambda: train_tbptt(
            RNN(1, 4, batch_first=True), _head(), _X, _Y, chunk_length=2, lr=0.1
        ),
        ValueError,
        "time-major model",
        id="train_tbptt-1",
    ),
    pytest.param(
        lambda: train_tbptt(RNN(1, 4), nn.Linear(4, 2), _X, _Y, chunk_length=2, lr=0.1),
        TypeError,
        "head must be a Dense layer, got Linear",
        id="train_tbptt-2",
    ),
    pytest.param(
        lambda: train_tbptt(
            RNN(1, 4),
            Dense(5, 2, np.random.default_rng(0)),
            _X,
            _Y,
            chunk_length=2,
            lr=0.1,
        ),
        ValueError,
        "head must take the 4 hidden units, takes 5",
        id="train_tbptt-3",
    ),
    pytest.param(
        lambda: train_tbptt(RNN(1, 4), _head(), _X[..., 0], _Y, chunk_length=2, lr=0.1),
        ValueError,
        "x must have 3 dimensions, got shape \\(6, 2\\)",
        id="train_tbptt-4",
    ),
    pytest.param(
        lambda: train_tbptt(RNN(1, 4), _head(), _X[:0], _Y[:0], chunk_length=2, lr=0.1),
        ValueError,
        "x must hold at least one step",
        id="train_tbptt-5",
    ),
    pytest.param(
        lambda: train_tbptt(RNN(1, 4), _head(), _X, _Y[:5], chunk_length=2, lr=0.1),
        ValueError,
        "y must be integers of shape \\(6, 2\\), got",
        id="train_tbptt-6",
    ),
    pytest.param(
        lambda: train_tbptt(
            RNN(1, 4), _head(), _X, _Y.astype(float), chunk_length=2, lr=0.1
        ),
        ValueError,
        "y must be integers",
        id="train_tbptt-7",
    ),
    pytest.param(
        lambda: train_tbptt(RNN(1, 4), _head(), _X, _Y, chunk_length=0, lr=0.1),
        ValueError,
        "chunk_length must be positive, got 0",
        id="train_tbptt-8",
    ),
    pytest.param(
        lambda: train_tbptt(RNN(1, 4), _head(), _X, _Y, chunk_length=2, lr=0.0),
        ValueError,
        "lr must be in \\(0, inf\\)",
        id="train_tbptt-9",
    ),
    pytest.param(
        lambda: train_tbptt(
            RNN(1, 4), _head(), _X, _Y, chunk_length=2, lr=0.1, max_norm=-1.0
        ),
        ValueError,
        "max_norm must be in \\(0, inf\\)",
        id="train_tbptt-10",
    ),
    pytest.param(
        lambda: train_tbptt(RNN(1, 4), _head(), _X, _Y + 2, chunk_length=2, lr=0.1),
        ValueError,
        "labels must lie in 0..1",
        id="train_tbptt-11",
    ),
    pytest.param(
        lambda: delayed_sign_task(0, 2, 1),
        ValueError,
        "n_steps must be positive, got 0",
        id="delayed_sign_task-0",
    ),
    pytest.param(
        lambda: delayed_sign_task(5, 2.0, 1),
        TypeError,
        "batch_size must be an int",
        id="delayed_sign_task-1",
    ),
    pytest.param(
        lambda: delayed_sign_task(5, 2, -1),
        ValueError,
        "delay must be a non-negative int, got -1",
        id="delayed_sign_task-2",
    ),
    pytest.param(
        lambda: delayed_sign_task(5, 2, True),
        ValueError,
        "delay must be a non-negative int, got True",
        id="delayed_sign_task-3",
    ),
    pytest.param(
        lambda: set_spectral_radius(np.ones((2, 3)), 1.0),
        ValueError,
        "W must be square, got shape \\(2, 3\\)",
        id="set_spectral_radius-0",
    ),
    pytest.param(
        lambda: set_spectral_radius(np.ones(3), 1.0),
        ValueError,
        "W must have 2 dimensions",
        id="set_spectral_radius-1",
    ),
    pytest.param(
        lambda: set_spectral_radius(np.array([[0.0, 1.0], [0.0, 0.0]]), 1.0),
        ValueError,
        "W has spectral radius 0",
        id="set_spectral_radius-2",
    ),
    pytest.param(
        lambda: set_spectral_radius(np.eye(2), -0.5),
        ValueError,
        "rho must be in \\[0, inf\\)",
        id="set_spectral_radius-3",
    ),
    pytest.param(
        lambda: set_spectral_radius(np.eye(2), "1"),
        TypeError,
        "rho must be a number",
        id="set_spectral_radius-4",
    ),
    pytest.param(
        lambda: input_gradient_norms(nn.RNN(2, 3), np.ones((4, 1, 2))),
        TypeError,
        "model must be the NumPy RNN",
        id="gradient_norms_draw-0",
    ),
    pytest.param(
        lambda: input_gradient_norms(RNN(2, 3), np.ones((0, 1, 2))),
        ValueError,
        "x is an empty sequence",
        id="gradient_norms_draw-1",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
