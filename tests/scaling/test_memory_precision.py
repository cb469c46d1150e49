"""Tests for ``dlabc.scaling.memory_precision``.

The memory formula equals the bytes the tensors of a real ``torch.optim.Adam`` hold
after a step (float32, and mixed precision with float32 master weights); the
activation formula is checked against its closed form. Checkpointed gradients equal
those without checkpointing and ``torch.utils.checkpoint``'s (float64, with dropout),
``gradcheck`` passes, and autograd saves only the segment inputs. The format table
matches IEEE 754 and NumPy; the underflow share matches hand-made values. Our dynamic
loss scaler gives the same scales, skipped steps and weights as
``torch.amp.GradScaler``. Bad input fails with a clear message.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from dlabc.scaling.memory_precision import (
    DynamicLossScaler,
    activation_memory,
    checkpoint,
    checkpoint_sequential,
    deep_mlp,
    float_formats,
    master_step,
    master_weights,
    state_bytes,
    train_scaled,
    training_memory,
    underflow_fraction,
)


def one_adam_step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()


# --- the memory budget ---------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_sixteen_bytes_per_parameter(precision):
    budget = training_memory(1000, precision)
    assert budget["total"] == 16_000
    assert budget["total"] == sum(v for k, v in budget.items() if k != "total")


def test_fp32_formula_equals_the_bytes_adam_holds():
    model = deep_mlp(3, 16)
    n = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    one_adam_step(model, optimizer, torch.randn(4, 16))
    measured = state_bytes(model, optimizer)
    formula = training_memory(n, "fp32")
    for part in ("weights", "gradients", "adam_moments", "master_weights"):
        assert measured[part] == formula[part], part
    # independently: the tensors of the optimizer's own state_dict
    state = optimizer.state_dict()["state"].values()
    moments = sum(
        s[k].numel() * s[k].element_size()
        for s in state
        for k in ("exp_avg", "exp_avg_sq")
    )
    assert moments == 8 * n
    assert measured["other_state"] == 4 * len(list(model.parameters()))


def test_mixed_formula_equals_the_bytes_of_master_weight_training():
    model = deep_mlp(3, 16).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    master = master_weights(model)
    optimizer = torch.optim.Adam(master, lr=1e-3)
    model(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    master_step(model, master, optimizer)
    measured = state_bytes(model, optimizer)
    formula = training_memory(n, "mixed")
    for part in ("weights", "gradients", "adam_moments", "master_weights"):
        assert measured[part] == formula[part], part
    assert measured["master_gradients"] == 0


def test_master_step_is_adam_on_float32_copies():
    torch.manual_seed(0)
    model = deep_mlp(2, 8).to(torch.bfloat16)
    reference = [
        p.detach().float().clone().requires_grad_() for p in model.parameters()
    ]
    master = master_weights(model)
    optimizer = torch.optim.Adam(master, lr=1e-2)
    reference_optimizer = torch.optim.Adam(reference, lr=1e-2)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(4, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        for p, r in zip(model.parameters(), reference, strict=True):
            r.grad = p.grad.float()
        reference_optimizer.step()
        master_step(model, master, optimizer)
    for p, w, r in zip(model.parameters(), master, reference, strict=True):
        assert torch.equal(w, r.detach())
        assert torch.equal(p, r.detach().to(torch.bfloat16))


def test_activation_memory_closed_form():
    # Korthikanti et al. (2022), eq. 1: s*b*h*(34 + 5*a*s/h) bytes per layer
    s, b, h, a, layers = 2048, 4, 12288, 96, 3
    expected = layers * s * b * h * (34 + 5 * a * s / h)
    assert activation_memory(s, b, h, a, layers) == expected
    assert (
        activation_memory(s, b, h, a, layers, recompute=True) == layers * 2 * s * b * h
    )


# --- activation checkpointing --------------------------------------------------------


def gradients(model, x, forward):
    model.zero_grad()
    x = x.detach().requires_grad_()
    forward(model, x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()] + [x.grad]


@pytest.mark.parametrize("segments", [1, 2, 3, 5])
@pytest.mark.parametrize("keep_last", [False, True])
def test_checkpointed_gradients_equal_plain_and_torch(segments, keep_last):
    torch.manual_seed(0)
    model = deep_mlp(5, 6).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    plain = gradients(model, x, lambda m, x: m(x))
    ours = gradients(
        model, x, lambda m, x: checkpoint_sequential(m, segments, x, keep_last)
    )
    theirs = gradients(
        model, x, lambda m, x: torch_checkpoint(m, x, use_reentrant=False)
    )
    for a, b, c in zip(plain, ours, theirs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14)


def test_checkpoint_replays_dropout_and_works_with_autograd_grad():
    layer = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Tanh()).double()
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    ours = torch.autograd.grad(checkpoint(layer, x).sum(), [x, *layer.parameters()])
    torch.manual_seed(3)
    out = torch_checkpoint(layer, x, use_reentrant=False)
    theirs = torch.autograd.grad(out.sum(), [x, *layer.parameters()])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_checkpoint_leaves_the_random_generator_as_it_was():
    layer = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    x = torch.randn(3, 4)
    out = checkpoint(layer, x)
    state = torch.get_rng_state()
    out.sum().backward()  # replays the forward pass's random numbers
    assert torch.equal(torch.get_rng_state(), state)


def test_gradcheck_through_checkpoint():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y: checkpoint(lambda a, b: torch.sin(a) * b.exp(), x, y), (x, y)
    )


def saved_bytes(model, forward):
    """Bytes of the tensors other than parameters that autograd saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


def test_checkpointing_saves_only_the_segment_inputs():
    layers, width, batch = 8, 16, 32
    model = deep_mlp(layers, width, expansion=2)
    x = torch.randn(batch, width, requires_grad=True)
    plain, _ = saved_bytes(model, lambda: model(x))
    # per layer: the input of up (w), of gelu (2w), of down (2w)
    assert plain == layers * batch * width * 4 * 5
    for k in (1, 2, 4, 8):
        kept, out = saved_bytes(model, lambda k=k: checkpoint_sequential(model, k, x))
        assert kept == k * batch * width * 4  # one input per segment
        out.sum().backward()  # and the backward pass still runs


def test_deep_mlp_parameter_count():
    model = deep_mlp(4, 10, expansion=3)
    n = sum(p.numel() for p in model.parameters())
    assert n == 4 * (2 * 10 * 30 + 30 + 10)
    assert model(torch.randn(2, 10)).shape == (2, 10)


# --- formats, underflow, loss scaling --------------------------------------------------


def test_float_formats_are_ieee():
    rows = {r["dtype"]: r for r in float_formats()}
    assert rows["float16"]["max"] == 65504 == float(np.finfo(np.float16).max)
    assert rows["float16"]["eps"] == 2.0**-10
    assert rows["float16"]["smallest_normal"] == 2.0**-14
    assert rows["float16"]["smallest_subnormal"] == 2.0**-24
    assert rows["float16"]["smallest_subnormal"] == float(
        np.finfo(np.float16).smallest_subnormal
    )
    assert rows["float32"]["smallest_subnormal"] == float(
        np.finfo(np.float32).smallest_subnormal
    )
    assert (rows["bfloat16"]["exponent_bits"], rows["bfloat16"]["mantissa_bits"]) == (
        8,
        7,
    )
    assert (rows["float16"]["exponent_bits"], rows["float16"]["mantissa_bits"]) == (
        5,
        10,
    )
    assert (rows["float32"]["exponent_bits"], rows["float32"]["mantissa_bits"]) == (
        8,
        23,
    )
    for r in rows.values():
        one = torch.ones((), dtype=getattr(torch, r["dtype"]))
        assert one + r["eps"] / 2 == one and one + r["eps"] != one


def test_underflow_fraction_by_hand():
    values = torch.tensor([2.0**-26, 2.0**-23, 1.0, 0.0, -(2.0**-30)])
    assert underflow_fraction(values) == 0.5  # 2 of the 4 non-zero entries
    assert underflow_fraction([values[:2], values[2:]], scale=2.0**8) == 0.0
    assert underflow_fraction(values, torch.bfloat16) == 0.0
    # NumPy's own float16 rounding agrees
    x = torch.randn(1000, dtype=torch.float64) * 1e-6
    expected = np.mean(x.numpy().astype(np.float16) == 0)
    assert underflow_fraction(x) == pytest.approx(expected, abs=0)


def scripted_scales(scaler, pattern):
    """Scales and updates for a parameter whose gradient overflows where ``pattern``."""
    w = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([w], lr=0.1)
    scales, weights = [], []
    for overflow in pattern:
        optimizer.zero_grad()
        loss = (w * torch.tensor([1.0, 2.0, float("inf") if overflow else 3.0])).sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(float(scaler.get_scale()))
        weights.append(w.detach().clone())
    return scales, weights


def test_loss_scaler_matches_grad_scaler_on_scripted_overflows():
    pattern = [True, True, False, False, False, True] + [False] * 7 + [True, False]
    kwargs = {"init_scale": 2.0**10, "growth_interval": 3}
    ours = scripted_scales(DynamicLossScaler(**kwargs), pattern)
    theirs = scripted_scales(torch.amp.GradScaler("cpu", **kwargs), pattern)
    assert ours[0] == theirs[0]
    assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1], strict=True))


def test_loss_scaler_matches_grad_scaler_in_float16_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    batches = [(torch.randn(64, 16), torch.randint(0, 4, (64,))) for _ in range(25)]
    runs = []
    for scaler in (
        DynamicLossScaler(2.0**28, growth_interval=4),
        torch.amp.GradScaler("cpu", init_scale=2.0**28, growth_interval=4),
    ):
        m = copy.deepcopy(model)
        history = train_scaled(
            m, torch.optim.Adam(m.parameters(), 1e-2), scaler, batches
        )
        runs.append((history, list(m.parameters())))
    (ours, w_ours), (theirs, w_theirs) = runs
    assert ours["scale"] == theirs["scale"]
    assert ours["scale"][1] < ours["scale"][0]  # the first scale overflowed
    assert max(ours["scale"][5:]) > min(ours["scale"][5:])  # and it grew again
    assert all(torch.equal(a, b) for a, b in zip(w_ours, w_theirs, strict=True))


# --- bad input ---------------------------------------------------------------------------


def test_bad_input():
    model = deep_mlp(2, 4)
    with pytest.raises(ValueError, match="n_params must be positive"):
        training_memory(0)
    with pytest.raises(ValueError, match="precision must be one of"):
        training_memory(10, "fp8")
    with pytest.raises(TypeError, match="recompute must be a bool"):
        activation_memory(8, 1, 8, 2, recompute="yes")
    with pytest.raises(ValueError, match="seq_len must be positive"):
        activation_memory(0, 1, 8, 2)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        state_bytes(model, "adam")
    with pytest.raises(
        ValueError, match="segments must be at most the number of layers"
    ):
        checkpoint_sequential(model, 3, torch.randn(2, 4))
    with pytest.raises(TypeError, match="function must be callable"):
        checkpoint(3, torch.randn(2))
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        DynamicLossScaler(backoff_factor=2.0)
    with pytest.raises(ValueError, match="scale must be in"):
        underflow_fraction(torch.ones(3), scale=0.0)
    with pytest.raises(ValueError, match="no non-zero entry"):
        underflow_fraction(torch.zeros(3))
    with pytest.raises(TypeError, match="dtypes must be floating-point"):
        float_formats([torch.int32])
    with pytest.raises(TypeError, match="scaler must be a DynamicLossScaler"):
        train_scaled(model, torch.optim.SGD(model.parameters(), 0.1), object(), [])
