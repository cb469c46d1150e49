"""Tests for ``dlabc.multimodal.moco``.

The momentum update against PyTorch's own exponential moving average
(``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``) and against its
closed form over ``n`` steps; the queue against ``collections.deque(maxlen=K)``; the
loss against ``F.cross_entropy`` on ``[positive | queue]`` logits with label 0 and
against the per-sample formula written with ``math``; the model's forward against the
same pieces called by hand (stop-gradient, update, enqueue); ``queue_consistency`` on
keys it must find unchanged. Bad input for every public entry point.
"""

from __future__ import annotations

import copy
import math
from collections import deque

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dlabc.multimodal.moco import (
    KeyQueue,
    MoCo,
    moco_loss,
    momentum_update,
    queue_consistency,
    train_moco,
)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# -------------------------------------------------------------- momentum update


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9, 0.999])
def test_momentum_update_is_torchs_ema(m):
    query = small_net()
    key = copy.deepcopy(query)
    ema = AveragedModel(query, multi_avg_fn=get_ema_multi_avg_fn(m))
    ema.update_parameters(query)  # the first call copies, as MoCo's key encoder starts
    for _ in range(5):
        with torch.no_grad():  # the query encoder moves (a stand-in for training)
            for p in query.parameters():
                p.add_(torch.randn_like(p))
        momentum_update(key, query, m)
        ema.update_parameters(query)
    for ours, theirs in zip(key.parameters(), ema.module.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_momentum_update_closed_form_over_n_steps():
    query, key = small_net(0), small_net(1)
    start = [p.detach().clone() for p in key.parameters()]
    m, n = 0.9, 7
    for _ in range(n):  # a fixed query encoder: θ_k → m^n θ_k0 + (1 − m^n) θ_q
        momentum_update(key, query, m)
    for k, k0, q in zip(key.parameters(), start, query.parameters(), strict=True):
        torch.testing.assert_close(k, m**n * k0 + (1 - m**n) * q)


def test_momentum_zero_copies_and_one_freezes():
    query, key = small_net(0), small_net(1)
    frozen = [p.detach().clone() for p in key.parameters()]
    momentum_update(key, query, 1.0)
    for k, k0 in zip(key.parameters(), frozen, strict=True):
        assert torch.equal(k, k0)
    momentum_update(key, query, 0.0)
    for k, q in zip(key.parameters(), query.parameters(), strict=True):
        assert torch.equal(k, q)


def test_momentum_update_rejects_bad_input():
    with pytest.raises(ValueError, match=r"m must be in \[0, 1\]"):
        momentum_update(small_net(), small_net(), 1.5)
    with pytest.raises(ValueError, match="same parameters"):
        momentum_update(small_net(), nn.Linear(16, 4), 0.9)
    with pytest.raises(TypeError, match="nn.Modules"):
        momentum_update(small_net(), "net", 0.9)


# ---------------------------------------------------------------------- queue


def test_queue_is_first_in_first_out():
    K, d = 7, 3
    queue = KeyQueue(K, d, torch.Generator().manual_seed(0))
    reference = deque(queue.keys.clone(), maxlen=K)  # the random start, oldest first
    torch.testing.assert_close(queue.ordered(), torch.stack(list(reference)))
    g = torch.Generator().manual_seed(1)
    for B in [2, 3, 5, 7, 1, 4]:  # wraps around, with batches that do not divide K
        keys = torch.randn(B, d, generator=g)
        queue.enqueue(keys)
        reference.extend(keys)  # newest in, oldest out
        assert torch.equal(queue.ordered(), torch.stack(list(reference)))


def test_queue_starts_with_unit_keys_and_rejects_bad_input():
    queue = KeyQueue(16, 4)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(16))
    with pytest.raises(ValueError, match=r"keys must have shape \(B, 4\)"):
        queue.enqueue(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="B <= 16"):
        queue.enqueue(torch.zeros(17, 4))
    with pytest.raises(TypeError, match="floating-point"):
        queue.enqueue(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="size must be positive"):
        KeyQueue(0, 4)


# ----------------------------------------------------------------------- loss


def test_loss_is_cross_entropy_with_label_zero():
    q, k, queue = unit(5, 6, seed=0), unit(5, 6, seed=1), unit(11, 6, seed=2)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.07
    expected = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(moco_loss(q, k, queue, 0.07), expected)


def test_loss_is_the_per_sample_formula():
    q, k, queue = unit(4, 3, seed=3), unit(4, 3, seed=4), unit(6, 3, seed=5)
    tau, total = 0.5, 0.0
    for qi, ki in zip(q.tolist(), k.tolist(), strict=True):
        dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
        positive = math.exp(dot(qi, ki) / tau)
        negatives = sum(math.exp(dot(qi, kj) / tau) for kj in queue.tolist())
        total += -math.log(positive / (positive + negatives))
    assert abs(moco_loss(q, k, queue, tau).item() - total / 4) < 1e-12


def test_loss_rejects_bad_input():
    q = unit(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        moco_loss(q, unit(5, 3), unit(6, 3))
    with pytest.raises(ValueError, match=r"queue \(K, d\)"):
        moco_loss(q, q, unit(6, 2))
    with pytest.raises(ValueError, match="temperature must be in"):
        moco_loss(q, q, unit(6, 3), 0.0)
    with pytest.raises(ValueError, match="2 dimensions"):
        moco_loss(q[0], q[0], unit(6, 3))


# ---------------------------------------------------------------------- model


def test_forward_is_the_pieces_by_hand():
    torch.manual_seed(0)
    model = MoCo(small_net(), 4, queue_size=8, m=0.9, temperature=0.2)
    with torch.no_grad():  # make the two encoders differ, as after some training
        for p in model.encoder_q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    key_before = copy.deepcopy(model.encoder_k)
    queue_before = model.queue.ordered().clone()
    x_q, x_k = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    loss = model(x_q, x_k)

    momentum_update(key_before, model.encoder_q, 0.9)  # θ_k first, then the keys
    for ours, theirs in zip(
        model.encoder_k.parameters(), key_before.parameters(), strict=True
    ):
        torch.testing.assert_close(ours, theirs)
    q = F.normalize(model.encoder_q(x_q), dim=1)
    k = F.normalize(key_before(x_k), dim=1)
    torch.testing.assert_close(loss, moco_loss(q, k, queue_before, 0.2))
    torch.testing.assert_close(model.queue.ordered()[-3:], k)  # newest keys last
    torch.testing.assert_close(model.queue.ordered()[:5], queue_before[3:])

    loss.backward()  # stop-gradient: only the query encoder gets gradients
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert not any(p.requires_grad for p in model.encoder_k.parameters())


def test_model_rejects_bad_input():
    with pytest.raises(ValueError, match=r"m must be in \[0, 1\]"):
        MoCo(small_net(), 4, m=-0.1)
    with pytest.raises(TypeError, match="encoder must be an nn.Module"):
        MoCo(lambda x: x, 4)
    with pytest.raises(ValueError, match="temperature must be in"):
        MoCo(small_net(), 4, temperature=-1.0)


# -------------------------------------------------------- training, consistency


def jitter(images, generator=None):
    return images + 0.05 * torch.randn(images.shape, generator=generator)


def test_training_and_consistency():
    torch.manual_seed(0)
    images = torch.rand(20, 1, 4, 4)
    frozen = MoCo(small_net(), 4, queue_size=12, m=1.0)
    history = train_moco(
        frozen, images[:18], steps=4, batch_size=3, augment=jitter, watch=4
    )
    assert len(history["loss"]) == 4 and history["views"].shape == (4, 3, 1, 4, 4)
    assert max(history["drift"]) == 0.0  # m = 1: the key encoder never moves
    # keys of a frozen encoder stay exactly what it would say now
    consistency = queue_consistency(frozen, history["views"])
    torch.testing.assert_close(consistency, torch.ones(4, 3))

    moving = MoCo(small_net(), 4, queue_size=12, m=0.0)
    history = train_moco(
        moving, images[:18], steps=4, batch_size=3, lr=0.1, augment=jitter, watch=4
    )
    consistency = queue_consistency(moving, history["views"])
    torch.testing.assert_close(consistency[-1], torch.ones(3))  # the newest batch
    assert consistency[0].mean() < 1 - 1e-4  # older keys came from older encoders


def test_training_rejects_bad_input():
    model = MoCo(small_net(), 4, queue_size=12)
    images = torch.rand(20, 1, 4, 4)
    with pytest.raises(ValueError, match="4 dimensions"):
        train_moco(model, images[:, 0], steps=2, augment=jitter)
    with pytest.raises(ValueError, match="batch_size must divide"):
        train_moco(model, images, steps=2, batch_size=3, augment=jitter)
    with pytest.raises(ValueError, match="lr must be in"):
        train_moco(model, images, steps=2, batch_size=4, lr=0.0, augment=jitter)
    with pytest.raises(TypeError, match="augment must be callable"):
        train_moco(model, images, steps=2, batch_size=4, augment=None)
    with pytest.raises(ValueError, match="views exceed"):
        queue_consistency(model, torch.rand(5, 3, 1, 4, 4))
    with pytest.raises(TypeError, match="must be a MoCo"):
        queue_consistency(small_net(), torch.rand(1, 3, 1, 4, 4))
