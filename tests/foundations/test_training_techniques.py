"""Tests for ``dlabc.foundations.training_techniques``.

Dropout is checked by its statistics, side by side with ``F.dropout``: for several rates
the fraction of zeros must lie within five binomial standard errors of ``p``, the kept
values must be ``x / (1 - p)`` (exactly, for ours) and the mean must be kept within five
standard errors. Evaluation and ``p = 0`` are the identity, ``p = 1`` gives zeros (and,
like ``F.dropout``, a zero gradient), a ``torch.Generator`` makes a draw reproducible
without touching the global random state, and the gradient is the mask over ``1 - p``.

The L2 penalty's value and gradient are compared with the closed forms; SGD on the
penalised loss must follow ``torch.optim.SGD(weight_decay=...)`` for 50 float64 steps,
and Adam on the penalised loss must follow torch's (coupled) Adam but leave AdamW.
Gradient clipping must agree with ``torch.nn.utils.clip_grad_norm_``, returned norm and
clipped gradients, for bounds below and above the norm. Gradient accumulation must give
one big batch's gradients and loss for any number of micro-batches, also when they do
not divide the batch, and must add to ``.grad``; with BatchNorm in training mode it must
not (the statistics are the micro-batch's), which is the caveat the chapter states.
Early stopping is driven by hand-made histories, restores the best epoch's weights, and
stops ``fit``. Bad input must fail early, with a clear message.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.foundations.training_techniques import (
    Dropout,
    EarlyStopping,
    accumulate_gradients,
    clip_grad_norm,
    dropout,
    l2_penalty,
)
from dlabc.train import History, evaluate, fit

TIGHT = dict(rtol=1e-12, atol=1e-14)  # float64, the same sums in another order

# --------------------------------------------------------------------- helpers


def rand(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def positive(n: int, seed: int = 0) -> torch.Tensor:
    """Values in [0.5, 1.5): a zero in the output can only come from dropout."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) + 0.5


def mlp(d: int = 4, out: int = 3, hidden: int = 8, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, out)
    ).double()


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# --------------------------------------------------------------------- dropout

N_STATS = 200_000


def ours_with_seed(x, p, seed):
    return dropout(x, p, generator=torch.Generator().manual_seed(seed))


def torch_with_seed(x, p, seed):
    torch.manual_seed(seed)
    return F.dropout(x, p, training=True)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.97])
@pytest.mark.parametrize(
    "fn, exact",
    [(ours_with_seed, True), (torch_with_seed, False)],
    ids=["ours", "F.dropout"],
)
def test_dropout_statistics(fn, exact, p):
    x = positive(N_STATS)
    y = fn(x, p, seed=round(100 * p))
    assert y.shape == x.shape and y.dtype == x.dtype
    zero = y == 0
    # fraction of zeros: binomial(n, p) / n, standard error sqrt(p (1 - p) / n)
    frac = zero.double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / N_STATS)
    # the survivors are scaled by 1 / (1 - p)
    kept, expected = y[~zero], x[~zero] / (1 - p)
    if exact:
        assert torch.equal(kept, expected)
    else:  # F.dropout multiplies by 1 / (1 - p): one rounding more
        torch.testing.assert_close(kept, expected, rtol=1e-15, atol=0)
    # the mean is kept: Var(y_i) = x_i^2 p / (1 - p)
    se = math.sqrt(p / (1 - p) * (x**2).mean().item() / N_STATS)
    assert abs(y.mean().item() - x.mean().item()) < 5 * se


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_keeps_shape_and_dtype(dtype):
    x = rand(3, 4, 5, dtype=dtype)
    y = dropout(x, 0.5, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == dtype
    assert (y == 0).any() and (y != 0).any()


@pytest.mark.parametrize("p", [0.0, 0, 0.3, 1.0])
def test_dropout_in_evaluation_is_the_identity(p):
    x = rand(4, 5)
    assert dropout(x, p, training=False) is x


def test_dropout_with_p_zero_is_the_identity():
    x = rand(4, 5)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0) is x
    assert torch.equal(F.dropout(x, 0.0), x)  # torch agrees


def test_dropout_with_p_one_gives_zeros():
    x = rand(4, 5)
    y = dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(x))
    assert torch.equal(F.dropout(x, 1.0), torch.zeros_like(x))  # torch agrees
    assert y.dtype == x.dtype and y.shape == x.shape


def test_dropout_with_p_one_keeps_the_graph_like_f_dropout():
    """Everything is dropped, so the gradient is zero: but it must exist.

    ``F.dropout(x, 1.0)`` is ``x * 0``, part of the graph; a result cut off from the
    graph makes ``backward`` fail when dropout is the only path from ``x`` to the loss.
    """
    x = rand(4, 5).requires_grad_()
    F.dropout(x, 1.0).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))

    x = rand(4, 5).requires_grad_()
    y = dropout(x, 1.0)
    assert y.requires_grad
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_dropout_generator_makes_it_reproducible():
    x = positive(1000)
    a, b = ours_with_seed(x, 0.5, 3), ours_with_seed(x, 0.5, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, ours_with_seed(x, 0.5, 4))
    state = torch.get_rng_state()
    ours_with_seed(x, 0.5, 3)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    # without a generator, the global seed decides
    torch.manual_seed(5)
    c = dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(c, dropout(x, 0.5))
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
def test_dropout_gradient_is_the_mask_over_one_minus_p(p):
    for name in ("ours", "F.dropout"):
        x = positive(500).requires_grad_()
        y = ours_with_seed(x, p, 1) if name == "ours" else torch_with_seed(x, p, 1)
        y.sum().backward()
        mask = (y != 0).double()
        assert torch.equal(x.grad, mask / (1 - p)), name
        assert 0 < mask.mean() < 1
    # an upstream gradient is masked and scaled in the same way
    x = positive(50).requires_grad_()
    upstream = rand(50, seed=2)
    y = ours_with_seed(x, p, 1)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * (y != 0) / (1 - p), **TIGHT)
    # and the same mask every call, so gradcheck can compare with finite differences
    torch.autograd.gradcheck(
        lambda t: ours_with_seed(t, p, 1), (rand(3, 4).requires_grad_(),)
    )


def test_dropout_module_acts_in_training_only():
    layer = Dropout(0.4)
    assert layer.training and layer.p == 0.4
    assert repr(layer) == "Dropout(p=0.4)"
    assert repr(Dropout()) == "Dropout(p=0.5)"
    assert repr(Dropout(0)) == "Dropout(p=0.0)"
    assert list(layer.parameters()) == []
    x = positive(20_000)
    torch.manual_seed(0)
    y = layer(x)
    zero = y == 0
    assert abs(zero.double().mean().item() - 0.4) < 5 * math.sqrt(0.24 / 20_000)
    assert torch.equal(y[~zero], x[~zero] / 0.6)
    torch.manual_seed(0)  # the layer draws from the global stream, like nn.Dropout
    assert torch.equal(layer(x), y)
    layer.eval()
    assert layer(x) is x
    net = nn.Sequential(nn.Identity(), Dropout(0.9)).eval()
    assert net(x) is x  # eval() reaches it inside a model
    net.train()
    assert not torch.equal(net(x), x)


# --------------------------------------------------------------------- l2_penalty


def test_l2_penalty_value_and_gradient():
    params = [rand(3, 4, seed=1), rand(5, seed=2), rand(1, seed=3)]
    params = [p.requires_grad_() for p in params]
    lam = 0.3
    penalty = l2_penalty(params, lam)
    expected = lam / 2 * sum((p.detach() ** 2).sum() for p in params)
    assert penalty.dim() == 0
    torch.testing.assert_close(penalty, expected, **TIGHT)
    for g, p in zip(torch.autograd.grad(penalty, params), params, strict=True):
        torch.testing.assert_close(g, lam * p.detach(), **TIGHT)
    # a generator of parameters (model.parameters()) works too
    net = mlp()
    torch.testing.assert_close(
        l2_penalty(net.parameters(), lam), l2_penalty(list(net.parameters()), lam)
    )
    zero = l2_penalty(params, 0.0)
    assert zero.item() == 0.0
    for g in torch.autograd.grad(zero, params):
        assert torch.equal(g, torch.zeros_like(g))


def train_steps(make_optimizer, penalty: float = 0.0, steps: int = 50):
    net = mlp(5, 1)
    X, y = rand(32, 5, seed=3), rand(32, 1, seed=4)
    optimizer = make_optimizer(net.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(net(X), y)
        if penalty:
            loss = loss + l2_penalty(net.parameters(), penalty)
        loss.backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("lam", [0.01, 0.5])
def test_sgd_weight_decay_is_the_l2_penalty(lam, momentum):
    decayed = train_steps(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=lam)
    )
    penalised = train_steps(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum), penalty=lam
    )
    torch.testing.assert_close(decayed, penalised, rtol=1e-12, atol=1e-13)
    plain = train_steps(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum))
    assert (plain - decayed).abs().max() > 1e-4  # the decay did something
    assert decayed.norm() < plain.norm()


def test_adam_with_l2_penalty_is_not_adamw():
    lam = 0.1
    penalised = train_steps(lambda ps: torch.optim.Adam(ps, lr=0.01), penalty=lam)
    coupled = train_steps(lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=lam))
    decoupled = train_steps(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=lam))
    # the penalty is what torch's Adam calls weight decay ...
    torch.testing.assert_close(penalised, coupled, rtol=1e-10, atol=1e-12)
    # ... and not AdamW's decoupled decay
    assert (penalised - decoupled).abs().max() > 1e-3


# --------------------------------------------------------------------- clip_grad_norm


def make_params(seed: int, dtype=torch.float64):
    """Four parameters with gradients (scaled differently) and one without."""
    shapes = [(3, 4), (5,), (2, 2), (1,)]
    params = []
    for i, shape in enumerate(shapes):
        p = rand(*shape, seed=seed + i, dtype=dtype).requires_grad_()
        p.grad = (i + 1) * rand(*shape, seed=seed + 10 + i, dtype=dtype)
        params.append(p)
    params.insert(2, rand(6, seed=seed + 20, dtype=dtype).requires_grad_())  # no grad
    return params


def global_norm(params) -> float:
    return math.sqrt(
        sum((p.grad**2).sum().item() for p in params if p.grad is not None)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio", [1e-3, 0.1, 0.5, 0.999, 1.001, 2.0, 1e3])
def test_clip_grad_norm_matches_torch(ratio, dtype):
    ours, ref = make_params(0, dtype), make_params(0, dtype)
    norm = global_norm(ours)
    max_norm = ratio * norm
    returned = clip_grad_norm(ours, max_norm)
    returned_ref = nn.utils.clip_grad_norm_(ref, max_norm)
    assert isinstance(returned, float)
    tol = TIGHT if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    assert returned == pytest.approx(returned_ref.item(), rel=tol["rtol"])
    assert returned == pytest.approx(norm, rel=tol["rtol"])  # the norm before clipping
    for a, b in zip(ours, ref, strict=True):
        if b.grad is None:
            assert a.grad is None
        else:
            assert a.grad.dtype == dtype
            torch.testing.assert_close(a.grad, b.grad, **tol)
    clipped = global_norm(ours)
    if ratio < 1:
        assert clipped == pytest.approx(max_norm, rel=1e-5)
    else:  # below the bound: untouched, bit for bit
        for a, b in zip(ours, make_params(0, dtype), strict=True):
            assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_clip_grad_norm_keeps_the_direction():
    params, before = make_params(1), make_params(1)
    norm = clip_grad_norm(params, 0.25)
    flat = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    flat0 = torch.cat([p.grad.flatten() for p in before if p.grad is not None])
    torch.testing.assert_close(flat, flat0 * 0.25 / (norm + 1e-6), **TIGHT)
    assert F.cosine_similarity(flat, flat0, dim=0).item() == pytest.approx(1, abs=1e-12)
    assert flat.norm().item() == pytest.approx(0.25, rel=1e-5)
    # the parameters themselves are untouched
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p, q)


def test_clip_grad_norm_without_gradients_returns_zero():
    params = [rand(3, seed=i).requires_grad_() for i in range(3)]
    assert clip_grad_norm(params, 1.0) == 0.0
    assert nn.utils.clip_grad_norm_(params, 1.0).item() == 0.0  # torch agrees
    assert all(p.grad is None for p in params)
    assert clip_grad_norm([], 1.0) == 0.0


def test_clip_grad_norm_of_a_lone_tensor_like_torch():
    """torch accepts one tensor as well as an iterable of them.

    Iterating over a lone tensor would yield its rows, non-leaf views without a
    ``.grad``: the clipping would silently do nothing.
    """
    ours = rand(3, 4, seed=1).requires_grad_()
    ours.grad = 10 * rand(3, 4, seed=2)
    ref = ours.detach().clone().requires_grad_()
    ref.grad = ours.grad.clone()
    norm_ref = nn.utils.clip_grad_norm_(ref, 1.0).item()
    assert clip_grad_norm(ours, 1.0) == pytest.approx(norm_ref, rel=1e-12)
    torch.testing.assert_close(ours.grad, ref.grad, **TIGHT)


def test_clip_grad_norm_on_a_model_after_backward():
    net, ref = mlp(), mlp()
    X, y = 50 * rand(16, 4), torch.arange(16) % 3
    F.cross_entropy(net(X), y).backward()
    F.cross_entropy(ref(X), y).backward()
    norm = clip_grad_norm(net.parameters(), 0.1)  # a generator of parameters
    norm_ref = nn.utils.clip_grad_norm_(ref.parameters(), 0.1).item()
    assert norm == pytest.approx(norm_ref, rel=1e-12)
    assert norm > 0.1
    for a, b in zip(grads(net), grads(ref), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


# --------------------------------------------------------------------- accumulate


def big_batch(model, loss_fn, X, y):
    model.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    return loss.item(), grads(model)


@pytest.mark.parametrize("micro_batches", [1, 2, 3, 5, 7, 8, 21])
@pytest.mark.parametrize("task", ["classify", "regress"])
def test_accumulated_gradients_equal_one_big_batch(micro_batches, task):
    n = 21  # 2, 5, 8 do not divide it: pieces of unequal size
    X = rand(n, 4, seed=3)
    if task == "classify":
        net, y, loss_fn = mlp(), torch.arange(n) % 3, F.cross_entropy
    else:
        net, y, loss_fn = mlp(out=2), rand(n, 2, seed=4), F.mse_loss
    loss_ref, grads_ref = big_batch(net, loss_fn, X, y)
    net.zero_grad()
    loss = accumulate_gradients(net, loss_fn, X, y, micro_batches)
    assert isinstance(loss, float)
    assert loss == pytest.approx(loss_ref, rel=1e-14)
    for a, b in zip(grads(net), grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_accumulate_gradients_calls_the_model_once_per_piece():
    sizes = []

    class Spy(nn.Module):
        def forward(self, x):
            sizes.append(len(x))
            return x

    net = nn.Sequential(nn.Linear(4, 3).double(), Spy())
    accumulate_gradients(net, F.cross_entropy, rand(10, 4), torch.arange(10) % 3, 4)
    assert sizes == [
        3,
        3,
        2,
        2,
    ]  # one piece in memory at a time, sizes as even as can be


def test_accumulate_gradients_adds_to_existing_grad():
    net = mlp()
    X, y = rand(12, 4, seed=5), torch.arange(12) % 3
    _, grads_ref = big_batch(net, F.cross_entropy, X, y)
    previous = [rand(*p.shape, seed=7 + i) for i, p in enumerate(net.parameters())]
    for p, g in zip(net.parameters(), previous, strict=True):
        p.grad = g.clone()
    accumulate_gradients(net, F.cross_entropy, X, y, 3)
    for a, b, g in zip(grads(net), grads_ref, previous, strict=True):
        torch.testing.assert_close(a, g + b, **TIGHT)


def test_accumulate_gradients_is_not_a_big_batch_with_batchnorm():
    """The caveat: BatchNorm in training mode normalizes with each piece's statistics."""

    def net():
        torch.manual_seed(2)
        return nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
        ).double()

    X, y = rand(24, 4, seed=6), torch.arange(24) % 3
    big = net()
    loss_ref, grads_ref = big_batch(big, F.cross_entropy, X, y)
    one = net()
    loss_one = accumulate_gradients(one, F.cross_entropy, X, y, 1)
    assert loss_one == pytest.approx(loss_ref, rel=1e-14)  # one piece: the same
    for a, b in zip(grads(one), grads_ref, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    pieces = net()
    loss = accumulate_gradients(pieces, F.cross_entropy, X, y, 4)
    assert loss != pytest.approx(loss_ref, rel=1e-6)
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(grads(pieces), grads_ref, strict=True)
    )
    assert gap > 1e-3
    # the running statistics were updated four times instead of once
    assert not torch.allclose(pieces[1].running_mean, big[1].running_mean)
    assert pieces[1].num_batches_tracked.item() == 4
    # in evaluation mode BatchNorm is a fixed affine map, and the equality is back
    big.eval(), pieces.eval()
    loss_ref, grads_ref = big_batch(big, F.cross_entropy, X, y)
    pieces.load_state_dict(big.state_dict())
    pieces.zero_grad()
    loss = accumulate_gradients(pieces, F.cross_entropy, X, y, 4)
    assert loss == pytest.approx(loss_ref, rel=1e-14)
    for a, b in zip(grads(pieces), grads_ref, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


# --------------------------------------------------------------------- EarlyStopping


def stop_epoch(losses, patience, min_delta=0.0):
    """The epoch at which EarlyStopping says stop (None: never), and the stopper."""
    stopper = EarlyStopping(nn.Linear(2, 2), patience, min_delta)
    history = History()
    for epoch, loss in enumerate(losses):
        history.test_loss.append(loss)
        if stopper(epoch, history):
            return epoch, stopper
    return None, stopper


@pytest.mark.parametrize(
    "losses, patience, min_delta, stop, best",
    [
        ([1.0, 0.9, 0.95, 0.96, 0.97, 0.98], 1, 0.0, 2, 1),
        ([1.0, 0.9, 0.95, 0.96, 0.97, 0.98], 2, 0.0, 3, 1),
        ([1.0, 0.9, 0.95, 0.96, 0.97, 0.98], 4, 0.0, 5, 1),
        ([1.0, 0.9, 0.95, 0.96, 0.97, 0.98], 5, 0.0, None, 1),
        ([1.0, 0.8, 0.6, 0.4, 0.2], 1, 0.0, None, 4),  # always improving
        ([1.0, 1.0, 1.0, 1.0], 2, 0.0, 2, 0),  # equal is no improvement
        ([2.0, 3.0, 4.0], 1, 0.0, 1, 0),  # worse from the start
        ([1.0, 1.1, 1.2, 0.9, 1.0, 1.1, 1.2, 0.5], 3, 0.0, 6, 3),  # counter resets
        ([1.0, 0.95, 0.92, 0.5, 0.49], 2, 0.1, 2, 0),  # small gains do not count
        ([1.0, 0.95, 0.92, 0.5, 0.49], 2, 0.04, None, 3),
        ([1.0, 0.5, 0.25], 1, 0.5, 1, 0),  # the gain must exceed min_delta strictly
        ([1.0, 0.5, 0.25], 1, 0.2, None, 2),
    ],
)
def test_early_stopping_stops_at_the_right_epoch(
    losses, patience, min_delta, stop, best
):
    epoch, stopper = stop_epoch(losses, patience, min_delta)
    assert epoch == stop
    assert stopper.best_epoch == best
    assert stopper.best_loss == losses[best]
    if stop is not None:
        assert stop - best == patience


def test_early_stopping_restores_the_best_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    stopper = EarlyStopping(net, patience=5)
    history = History()

    def epoch(i, loss, value):
        with torch.no_grad():
            for t in net.state_dict().values():
                if t.is_floating_point():
                    t.fill_(value)
        history.test_loss.append(loss)
        return stopper(i, history)

    assert not epoch(0, 1.0, 1.0)
    assert not epoch(1, 0.5, 2.0)  # the best: every float is 2
    assert not epoch(2, 0.7, 3.0)  # worse: not kept
    with torch.no_grad():
        net[0].weight.fill_(4.0)  # changed after the best epoch was recorded
    stopper.restore()
    for name, t in net.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t, torch.full_like(t, 2.0)), name
    assert not epoch(3, 0.2, 5.0)  # a new best
    with torch.no_grad():
        net[0].bias.fill_(6.0)
    stopper.restore()
    assert torch.equal(net[0].bias, torch.full_like(net[0].bias, 5.0))
    stopper.restore()  # restoring twice is harmless
    assert torch.equal(net[0].weight, torch.full_like(net[0].weight, 5.0))


def test_early_stopping_restore_before_any_epoch_raises():
    stopper = EarlyStopping(nn.Linear(2, 2), patience=3)
    with pytest.raises(RuntimeError, match="no epoch has been recorded yet"):
        stopper.restore()
    history = History(test_loss=[float("nan")])  # a nan is no improvement either
    assert not stopper(0, history)
    with pytest.raises(RuntimeError, match="no epoch has been recorded yet"):
        stopper.restore()


def test_early_stopping_needs_a_test_loss():
    stopper = EarlyStopping(nn.Linear(2, 2), patience=3)
    with pytest.raises(ValueError, match="EarlyStopping needs a test set"):
        stopper(0, History(train_loss=[1.0]))
    X, y = rand(10, 2), torch.arange(10) % 2
    net = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match=r"pass test=\(X, y\) to fit"):
        fit(
            net,
            torch.optim.SGD(net.parameters(), lr=0.1),
            (X, y),
            epochs=3,
            callback=EarlyStopping(net, patience=1),
        )


@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_in_fit_without_progress(patience):
    """With a zero learning rate the test loss never improves after the first epoch."""
    X, y = rand(12, 4), torch.arange(12) % 3
    net = mlp()
    stopper = EarlyStopping(net, patience)
    history = fit(
        net,
        torch.optim.SGD(net.parameters(), lr=0.0),
        (X, y),
        (X, y),
        epochs=20,
        batch_size=4,
        callback=stopper,
    )
    assert len(history.test_loss) == patience + 1
    assert stopper.best_epoch == 0
    assert len(set(history.test_loss)) == 1


def test_early_stopping_in_fit_stops_an_overfitting_run():
    """A quarter of the training labels are wrong: the test loss falls, then rises."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(10, 3, generator=g)
    X = torch.randn(60, 10, generator=g)
    y = (X @ teacher).argmax(1)
    wrong = torch.arange(60) % 4 == 0
    y[wrong] = (y[wrong] + 1) % 3
    X_test = torch.randn(200, 10, generator=g)
    test = X_test, (X_test @ teacher).argmax(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))
    stopper = EarlyStopping(net, patience=5)
    epochs = 300
    history = fit(
        net,
        torch.optim.Adam(net.parameters(), lr=0.003),
        (X, y),
        test,
        epochs=epochs,
        batch_size=10,
        callback=stopper,
    )
    losses = history.test_loss
    assert len(losses) < epochs  # stopped early
    best = min(range(len(losses)), key=losses.__getitem__)  # the first minimum
    assert best > 0 and losses[best] < 0.9 * losses[0]  # it learned, then overfitted
    assert stopper.best_epoch == best
    assert len(losses) == best + 5 + 1
    assert stopper.best_loss == losses[best]
    assert evaluate(net, *test)[0] > losses[best] + 1e-3
    stopper.restore()
    assert evaluate(net, *test)[0] == pytest.approx(losses[best], rel=1e-6)


# --------------------------------------------------------------------- bad input: one table


def _p(call, error, match, id):
    return pytest.param(call, error, match, id=id)


def _accumulate(X=None, y=None, micro_batches=2, net=None):
    X = rand(10, 4) if X is None else X
    y = torch.arange(10) % 3 if y is None else y
    return accumulate_gradients(net or mlp(), F.cross_entropy, X, y, micro_batches)


_e = re.escape
BAD_INPUT = [
    *[
        row
        for p in (-0.1, 1.1)
        for row in [
            _p(
                lambda p=p: dropout(rand(3), p),
                ValueError,
                _e(f"p must be in [0, 1], got {p}"),
                f"dropout-p-{p}",
            ),
            _p(
                lambda p=p: Dropout(p),
                ValueError,
                _e("p must be in [0, 1]"),
                f"Dropout-p-{p}",
            ),
        ]
    ],
    _p(
        lambda: dropout(rand(3), float("nan")),
        ValueError,
        "p must be finite, got nan",
        "dropout-p-nan",
    ),
    _p(
        lambda: dropout(rand(3), "0.5"),
        TypeError,
        "p must be a number, got str",
        "dropout-p-str",
    ),
    _p(
        lambda: Dropout(True),
        TypeError,
        "p must be a number, got bool",
        "Dropout-p-bool",
    ),
    _p(
        lambda: dropout(torch.arange(3), 0.5),
        TypeError,
        "x must be a floating-point tensor, got dtype",
        "dropout-x-int",
    ),
    _p(
        lambda: dropout([1.0, 2.0], 0.5),
        TypeError,
        "x must be a torch.Tensor, got list",
        "dropout-x-list",
    ),
    _p(
        lambda: Dropout(0.5)(torch.ones(3, dtype=torch.long)),
        TypeError,
        "x must be a floating-point tensor",
        "Dropout-x-long",
    ),
    # the checks run in evaluation too: bad input is bad in any mode
    _p(
        lambda: dropout(rand(3), 2.0, training=False),
        ValueError,
        _e("p must be in [0, 1]"),
        "dropout-p-eval",
    ),
    _p(
        lambda: l2_penalty([], 0.1),
        ValueError,
        "parameters is empty",
        "l2-parameters-empty",
    ),
    _p(
        lambda: l2_penalty(nn.ReLU().parameters(), 0.1),
        ValueError,
        "parameters is empty",
        "l2-parameters-none",
    ),
    _p(
        lambda: l2_penalty([rand(3).requires_grad_()], -0.1),
        ValueError,
        _e("weight_decay must be in [0, inf), got -0.1"),
        "l2-weight_decay-negative",
    ),
    _p(
        lambda: l2_penalty([rand(3).requires_grad_()], "0.1"),
        TypeError,
        "weight_decay must be a number, got str",
        "l2-weight_decay-str",
    ),
    _p(
        lambda: l2_penalty([rand(3).requires_grad_()], float("inf")),
        ValueError,
        "weight_decay must be finite",
        "l2-weight_decay-inf",
    ),
    *[
        _p(
            lambda m=m: clip_grad_norm(make_params(0), m),
            ValueError,
            _e("max_norm must be in (0, inf), got"),
            f"clip-max_norm-{m!r}",
        )
        for m in (0, 0.0, -1.0)
    ],
    _p(
        lambda: clip_grad_norm(make_params(0), None),
        TypeError,
        "max_norm must be a number, got NoneType",
        "clip-max_norm-none",
    ),
    _p(
        lambda: clip_grad_norm(make_params(0), float("nan")),
        ValueError,
        "max_norm must be finite, got nan",
        "clip-max_norm-nan",
    ),
    _p(
        lambda: _accumulate(micro_batches=0),
        ValueError,
        "micro_batches must be positive, got 0",
        "accumulate-micro_batches-0",
    ),
    _p(
        lambda: _accumulate(micro_batches=-2),
        ValueError,
        "micro_batches must be positive, got -2",
        "accumulate-micro_batches-negative",
    ),
    _p(
        lambda: _accumulate(micro_batches=11),
        ValueError,
        _e("micro_batches (11) exceeds the batch size (10)"),
        "accumulate-micro_batches-11",
    ),
    _p(
        lambda: _accumulate(micro_batches=2.0),
        TypeError,
        "micro_batches must be an int, got float",
        "accumulate-micro_batches-float",
    ),
    _p(
        lambda: _accumulate(y=torch.arange(9) % 3),
        ValueError,
        "X and y differ in length: 10 and 9",
        "accumulate-y-length",
    ),
    _p(
        lambda: _accumulate(X=rand(10, 4).tolist()),
        TypeError,
        "X must be a torch.Tensor, got list",
        "accumulate-X-list",
    ),
    _p(
        lambda: _accumulate(y=(torch.arange(10) % 3).tolist()),
        TypeError,
        "y must be a torch.Tensor, got list",
        "accumulate-y-list",
    ),
    _p(
        lambda: EarlyStopping(nn.Linear(2, 2), 0),
        ValueError,
        "patience must be positive, got 0",
        "early-patience-0",
    ),
    _p(
        lambda: EarlyStopping(nn.Linear(2, 2), 2.0),
        TypeError,
        "patience must be an int, got float",
        "early-patience-float",
    ),
    _p(
        lambda: EarlyStopping(nn.Linear(2, 2), 2, min_delta=-0.1),
        ValueError,
        _e("min_delta must be in [0, inf), got -0.1"),
        "early-min_delta",
    ),
    _p(
        lambda: EarlyStopping("net", 2),
        TypeError,
        "model must be an nn.Module, got str",
        "early-model-str",
    ),
    _p(
        lambda: EarlyStopping(nn.Linear(2, 2).state_dict(), 2),
        TypeError,
        "model must be an nn.Module, got OrderedDict",
        "early-model-state_dict",
    ),
    _p(
        lambda: EarlyStopping(nn.Linear(2, 2), 3)(0, History(train_loss=[1.0])),
        ValueError,
        "EarlyStopping needs a test set",
        "early-history-no-test",
    ),
    _p(
        lambda: EarlyStopping(nn.Linear(2, 2), 3).restore(),
        RuntimeError,
        "no epoch has been recorded yet",
        "early-restore-first",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_clip_grad_norm_changes_nothing_when_it_rejects_max_norm():
    params = make_params(0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(params, 0.0)
    for a, b in zip(params, make_params(0), strict=True):  # nothing was clipped
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_accumulate_gradients_fails_before_any_backward():
    net = mlp()
    with pytest.raises(ValueError, match="micro_batches"):
        _accumulate(micro_batches=11, net=net)
    assert all(p.grad is None for p in net.parameters())
