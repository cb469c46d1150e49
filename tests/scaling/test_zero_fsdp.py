"""Tests for ``dlabc.scaling.zero_fsdp``.

Every ZeRO stage, on two processes with a parameter count that two does not divide (so
the flat vector is padded), must train to the same parameters as single-process
``torch.optim.Adam`` on the whole batch, in float64. PyTorch's own FSDP2
(``fully_shard``) is run here in a one-process group (its first use imports
``torch._dynamo``, two seconds per process: the two-process comparison of FSDP with
stage 3 is asserted by the chapter on every build instead). The bytes each rank keeps must equal the
ZeRO paper's formula with Psi rounded up to a multiple of N_d, and the collectives'
volume must be the paper's 2 Psi (stages 0-2) and 3 Psi (stage 3). The formula
reproduces the paper's worked example; ``adam_update`` equals ``torch.optim.Adam``.
One launch; the rest runs in a one-process group inside the test process.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dlabc.distributed import launch
from dlabc.scaling.zero_fsdp import (
    ZeRO,
    adam_update,
    digit_batches,
    fsdp_training,
    make_model,
    padded_size,
    zero_demo,
    zero_memory,
    zero_worker,
)

HIDDEN, MEMORY_HIDDEN = 7, 5  # Psi = h^2 + 76 h + 10: odd, so two ranks need padding
STEPS, B, LR = 4, 8, 0.05


def data(seed=0, steps=STEPS, batch=B):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, batch, 64, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 10, (steps, batch), generator=g)
    return xs, ys


def reference(model, xs, ys, lr=LR):
    """Single-process Adam on the whole batch: what every stage must reproduce."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach(), losses


@pytest.fixture(scope="module")
def two_ranks():
    torch.manual_seed(0)
    model = make_model(HIDDEN)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys = data()
    results = launch(zero_worker, 2, state, xs, ys, LR, MEMORY_HIDDEN, 2, False)
    return results, reference(model, xs, ys)


def test_every_stage_trains_like_unsharded_adam(two_ranks):
    results, (w_ref, losses_ref) = two_ranks
    psi = w_ref.numel()
    assert psi % 2 == 1  # the flat vector was padded
    for result in results:
        for stage in range(4):
            w = result["parameters"][stage]
            assert w.shape == (psi,)
            torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-12)
    # the ranks' losses average to the whole batch's loss
    for stage in range(4):
        rank0, rank1 = (r["losses"][stage] for r in results)
        mean = [(a + b) / 2 for a, b in zip(rank0, rank1, strict=True)]
        assert mean == pytest.approx(losses_ref, abs=1e-12)


def test_kept_bytes_equal_the_formulas(two_ranks):
    results, _ = two_ranks
    psi = results[0]["memory_psi"]
    assert psi == MEMORY_HIDDEN**2 + 76 * MEMORY_HIDDEN + 10 and psi % 2 == 1
    for result in results:
        held = result["held"]
        assert held[0] == {
            "parameters": 4 * psi,
            "gradients": 4 * psi,
            "optimizer": 8 * psi,
        }
        padded = padded_size(psi, 2)
        for stage in (1, 2, 3):
            assert sum(held[stage].values()) == zero_memory(padded, 2, stage, 4, 4, 8)
        assert held[1]["optimizer"] == 8 * padded // 2
        assert held[2]["gradients"] == 4 * padded // 2
        assert held[3]["parameters"] == 4 * padded // 2


def test_communication_volume_is_the_papers(two_ranks):
    results, _ = two_ranks
    psi = results[0]["psi"]
    volume = results[0]["volume"]
    assert volume[0] == 2 * psi  # one all-reduce of the gradient
    assert volume[1] == volume[2] == 2 * padded_size(psi, 2)
    assert volume[3] == 3 * padded_size(psi, 2)  # 1.5 times as much
    assert all(s > 0 for s in results[0]["seconds"].values())


def test_formula_reproduces_the_papers_example():
    # Rajbhandari et al. 2020, figure 1: Psi = 7.5B, N_d = 64, K = 12
    gb = [zero_memory(7.5e9, 64, stage) / 1e9 for stage in range(4)]
    assert gb == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)
    assert zero_memory(100, 4, 3, 4, 4, 8) == 400
    assert zero_memory(100, 1, 2) == zero_memory(100, 1, 0) == 1600
    assert padded_size(10, 4) == 12 and padded_size(12, 4) == 12


def test_adam_update_equals_torch_adam():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(w.clone())
    optimizer = torch.optim.Adam([p], lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t in range(1, 6):
        grad = torch.randn(50, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        optimizer.step()
        adam_update(w, grad, m, v, t, 0.01, (0.8, 0.99), 1e-6)
    torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-15)


def test_zero_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process group"):
        ZeRO(make_model(4), 1)


@pytest.fixture
def one_rank():
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    yield
    dist.destroy_process_group()


def test_one_rank_every_stage_is_adam(one_rank):
    torch.manual_seed(0)
    model = make_model(6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys = data(1, steps=3)
    w_ref, _ = reference(model, xs, ys)
    for stage in range(4):
        net = make_model(6)
        net.load_state_dict(state)
        zero = ZeRO(net, stage, LR)
        for x, y in zip(xs, ys, strict=True):
            zero.step(x, y)
        torch.testing.assert_close(zero.parameters(), w_ref, rtol=0, atol=1e-12)


def test_fsdp_training_is_adam_and_keeps_one_copy(one_rank):
    torch.manual_seed(0)
    model = make_model(6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys = data(2, steps=3)
    w_ref, losses_ref = reference(model, xs, ys)
    net = make_model(6)
    net.load_state_dict(state)
    fsdp = fsdp_training(net, xs, ys, LR)
    torch.testing.assert_close(fsdp["parameters"], w_ref, rtol=0, atol=1e-12)
    assert fsdp["losses"] == pytest.approx(losses_ref, abs=1e-12)
    w_bytes = 8 * w_ref.numel()  # float64
    assert fsdp["held"] == {
        "parameters": w_bytes,
        "gradients": w_bytes,
        "optimizer": 2 * w_bytes,
    }


def test_digit_batches_and_the_torchrun_demo(one_rank, monkeypatch):
    # dlabc.data.load_digits is tested with dlabc.data; here a small stand-in spares
    # the import of scikit-learn (a second and a half)
    import dlabc.data

    rng = np.random.default_rng(0)
    fake = rng.random((50, 64)).astype(np.float32), np.arange(50) % 10
    monkeypatch.setattr(dlabc.data, "load_digits", lambda: fake)
    xs, ys = digit_batches(3, 40, seed=4)  # 120 draws: wraps into later epochs
    assert xs.shape == (3, 40, 64) and ys.shape == (3, 40)
    assert xs.dtype == torch.float64
    rows = xs.reshape(-1, 64)
    for epoch in (rows[:50], rows[50:100]):  # every example once per epoch
        assert torch.unique(epoch, dim=0).shape[0] == 50
    index = [
        int(np.flatnonzero((fake[0] == r.float().numpy()).all(1))[0]) for r in rows
    ]
    assert ys.reshape(-1).tolist() == [fake[1][i] for i in index]  # labels follow
    summary = zero_demo(0, 1, hidden=4, steps=2, batch=8)
    assert summary["psi"] == 4**2 + 76 * 4 + 10
    assert max(summary["difference to stage 0"].values()) < 1e-12
    assert len(set(summary["last loss"].values())) == 1
    assert summary["bytes kept"][0] == 16 * summary["psi"]  # float32, one rank


def test_bad_input_is_refused(one_rank):
    model = make_model(4)
    with pytest.raises(ValueError, match="stage"):
        ZeRO(model, 4)
    with pytest.raises(ValueError, match="stage"):
        ZeRO(model, True)
    with pytest.raises(ValueError, match="lr"):
        ZeRO(model, 1, lr=0.0)
    with pytest.raises(TypeError, match="model"):
        ZeRO("model", 1)
    with pytest.raises(ValueError, match="parameters"):
        ZeRO(torch.nn.Tanh(), 1)
    with pytest.raises(ValueError, match="stage"):
        zero_memory(1e9, 8, 5)
    with pytest.raises(ValueError, match="n_d"):
        zero_memory(1e9, 0, 1)
    with pytest.raises(TypeError, match="param_bytes"):
        zero_memory(1e9, 8, 1, param_bytes=2.5)
    with pytest.raises(ValueError, match="world_size"):
        padded_size(10, 0)
    with pytest.raises(ValueError, match="hidden"):
        make_model(0)
    state = model.state_dict()
    xs, ys = data(steps=2, batch=6)
    with pytest.raises(ValueError, match="multiple of world_size"):
        zero_worker(0, 4, state, xs, ys, LR)
    with pytest.raises(ValueError, match="xs must be"):
        zero_worker(0, 1, state, xs[:, :, :10], ys, LR)
    with pytest.raises(TypeError, match="state"):
        zero_worker(0, 1, {}, xs, ys, LR)
    with pytest.raises(ValueError, match="steps"):
        digit_batches(0, 8)
    with pytest.raises(ValueError, match="memory_hidden"):
        zero_worker(0, 1, state, xs, ys, LR, memory_hidden=-1)
