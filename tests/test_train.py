"""Tests for ``dlabc.train``.

``minibatches`` is checked to be a partition of ``range(n)``; ``evaluate`` against
``F.cross_entropy`` and an accuracy computed by hand; ``fit`` with one full batch
against one gradient step written out with ``torch.autograd.grad``, and for its
bookkeeping (history lengths, the learning-rate schedule, gradient clipping, early
stopping, SAM's two loss evaluations per step; with ``evaluate_train=False`` the same
run without the pass over the training set). With ``autocast_dtype=torch.bfloat16``
the training forward runs in bfloat16 (seen by a forward hook) while the weights, their
gradients and the evaluation stay float32, and the run follows the float32 one closely.
``train_steps`` is checked against ``fit`` (the same batches give the same weights),
against hand-written SGD steps on a stream of batches, and for when it evaluates.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.foundations.optimizers import SAM, SGD, Adam, Lookahead
from dlabc.train import (
    History,
    endless_minibatches,
    evaluate,
    fit,
    minibatches,
    set_lr,
    train_steps,
)


def data(n: int = 24, d: int = 4, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def model(d: int = 4, classes: int = 3, hidden: int = 8) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)
    ).double()


# --------------------------------------------------------------------- minibatches


@pytest.mark.parametrize(
    "n, batch_size, sizes",
    [(10, 3, [3, 3, 3, 1]), (12, 4, [4, 4, 4]), (5, 8, [5]), (1, 1, [1])],
)
def test_minibatches_partition_range_n(n, batch_size, sizes):
    batches = minibatches(n, batch_size, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == sizes
    assert all(b.dtype == torch.long for b in batches)
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))


def test_minibatches_are_shuffled_and_reproducible():
    def run(seed):
        return torch.cat(minibatches(50, 7, torch.Generator().manual_seed(seed)))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    assert not torch.equal(run(3), torch.arange(50))


def test_minibatches_reject_bad_sizes():
    with pytest.raises(ValueError, match="n must be positive, got 0"):
        minibatches(0, 4)
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        minibatches(10, 0)
    with pytest.raises(TypeError, match="batch_size must be an int, got float"):
        minibatches(10, 2.0)


# --------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("batch_size", [1024, 5, 1])
def test_evaluate_matches_hand_computation_in_eval_mode(batch_size):
    X, y = data(23)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    net = net.double().train()
    loss, accuracy = evaluate(net, X, y, batch_size=batch_size)
    assert net.training  # the mode is restored
    net.eval()  # the hand computation: no dropout
    with torch.no_grad():
        logits = net(X)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    assert accuracy == (logits.argmax(1) == y).sum().item() / 23
    assert isinstance(loss, float) and isinstance(accuracy, float)
    evaluate(net, X, y)
    assert not net.training  # eval mode stays eval mode


def test_evaluate_uses_the_given_loss_and_exact_accuracy():
    X = torch.eye(4, dtype=torch.float64)  # identity "model": logits = X
    y = torch.tensor([0, 1, 0, 3])  # three of four right

    def nll(logits, target):
        return F.nll_loss(torch.log_softmax(logits, -1), target)

    loss, accuracy = evaluate(nn.Identity(), X, y, loss_fn=nll, batch_size=3)
    assert accuracy == 0.75
    assert loss == pytest.approx(F.cross_entropy(X, y).item(), rel=1e-12)


def test_evaluate_rejects_bad_input():
    X, y = data(6)
    net = model()
    with pytest.raises(TypeError, match="y must have dtype torch.int64"):
        evaluate(net, X, y.double())
    with pytest.raises(ValueError, match="y must have 1 dimensions"):
        evaluate(net, X, y[:, None])
    with pytest.raises(ValueError, match="same length, got 6 and 5"):
        evaluate(net, X, y[:5])
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(net, X[:0], y[:0])
    with pytest.raises(TypeError, match="X must be a torch.Tensor, got list"):
        evaluate(net, X.tolist(), y)


# --------------------------------------------------------------------- set_lr


def test_set_lr_on_torch_and_dlabc_optimizers():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    torch_sgd = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    set_lr(torch_sgd, 0.01)
    assert [g["lr"] for g in torch_sgd.param_groups] == [0.01, 0.01]

    ours = Adam([a], lr=0.1)
    set_lr(ours, 0.02)
    assert ours.lr == 0.02
    for wrapper in (Lookahead(SGD([a], lr=0.1)), SAM(SGD([a], lr=0.1))):
        set_lr(wrapper, 0.03)
        assert wrapper.lr == 0.03 and wrapper.optimizer.lr == 0.03
    set_lr(ours, 0)  # zero is a learning rate too
    assert ours.lr == 0


def test_set_lr_rejects_bad_input():
    with pytest.raises(TypeError, match="object has no learning rate to set"):
        set_lr(object(), 0.1)
    ours = SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=re.escape("lr must be in [0, inf), got -1")):
        set_lr(ours, -1)
    with pytest.raises(TypeError, match="lr must be a number, got str"):
        set_lr(ours, "0.1")
    assert ours.lr == 0.1


# --------------------------------------------------------------------- fit


def test_one_full_batch_epoch_is_one_gradient_step():
    X, y = data()
    net = model()
    reference = copy.deepcopy(net)
    lr = 0.3
    history = fit(
        net,
        torch.optim.SGD(net.parameters(), lr=lr),
        (X, y),
        epochs=1,
        batch_size=len(X),
    )
    params = list(reference.parameters())
    loss = F.cross_entropy(reference(X), y)
    grads = torch.autograd.grad(loss, params)
    for p, p0, g in zip(net.parameters(), params, grads, strict=True):
        # fit sees the rows in a shuffled order: the mean is the same up to rounding
        torch.testing.assert_close(p, p0 - lr * g, rtol=1e-12, atol=1e-14)
    assert history.step_loss == [pytest.approx(loss.item(), rel=1e-12)]
    assert history.lr == [lr]
    train_loss, train_accuracy = evaluate(net, X, y)
    assert history.train_loss == [pytest.approx(train_loss, rel=1e-12)]
    assert history.train_accuracy == [train_accuracy]


@pytest.mark.parametrize("with_test", [True, False])
def test_history_lengths(with_test):
    X, y = data(10)
    net = model()
    test = data(7, seed=1) if with_test else None
    history = fit(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        (X, y),
        test,
        epochs=3,
        batch_size=3,
    )
    assert isinstance(history, History)
    assert len(history.step_loss) == len(history.lr) == 3 * 4  # 10 = 3 + 3 + 3 + 1
    assert len(history.train_loss) == len(history.train_accuracy) == 3
    assert (
        len(history.test_loss) == len(history.test_accuracy) == (3 if with_test else 0)
    )
    if with_test:
        assert (history.test_loss[-1], history.test_accuracy[-1]) == pytest.approx(
            evaluate(net, *test)
        )
    assert history.lr == [0.1] * 12


def test_fit_is_reproducible_with_a_seed_and_trains():
    X, y = data(40)

    def run(seed):
        net = model()
        history = fit(net, Adam(net.parameters(), lr=0.05), (X, y), epochs=5, seed=seed)
        return history, [p.detach().clone() for p in net.parameters()]

    (h1, p1), (h2, p2), (h3, _) = run(0), run(0), run(1)
    assert h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert h1.step_loss != h3.step_loss
    assert h1.train_loss[-1] < h1.train_loss[0]


@pytest.mark.parametrize("ours", [True, False], ids=["dlabc", "torch"])
def test_lr_schedule_is_applied_every_step(ours):
    X, y = data(10)
    net = model()
    optimizer = (
        SGD(net.parameters(), lr=1.0)
        if ours
        else torch.optim.SGD(net.parameters(), lr=1.0)
    )

    def schedule(step):
        return 0.1 / (1 + step)

    history = fit(net, optimizer, (X, y), epochs=2, batch_size=4, lr_schedule=schedule)
    assert history.lr == [
        schedule(t) for t in range(6)
    ]  # 3 steps per epoch, counted on


def test_lr_schedule_sets_the_rate_before_the_step():
    X, y = data(10)
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    fit(
        net,
        SGD(net.parameters(), lr=1.0),
        (X, y),
        epochs=2,
        batch_size=4,
        lr_schedule=lambda step: 0.0,
    )
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


@pytest.mark.parametrize("clip_norm", [0.01, 0.1])
def test_clip_norm_bounds_the_update(clip_norm):
    X, y = data()
    X = 100 * X  # large gradients
    net = model()
    grads = torch.autograd.grad(F.cross_entropy(net(X), y), list(net.parameters()))
    full_norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    assert full_norm > 10 * clip_norm  # so that the clipping does something
    before = [p.detach().clone() for p in net.parameters()]
    fit(
        net,
        torch.optim.SGD(net.parameters(), lr=1.0),
        (X, y),
        epochs=1,
        batch_size=len(X),
        clip_norm=clip_norm,
    )
    # with lr = 1 the update is the clipped gradient: norm clip_norm, same direction
    update = [b - p.detach() for p, b in zip(net.parameters(), before, strict=True)]
    norm = torch.sqrt(sum((u**2).sum() for u in update)).item()
    assert norm == pytest.approx(clip_norm, rel=1e-5)
    for u, g in zip(update, grads, strict=True):
        torch.testing.assert_close(u, g * clip_norm / full_norm, rtol=1e-5, atol=1e-12)


def test_clip_norm_larger_than_the_gradient_changes_nothing():
    X, y = data()

    def run(**kwargs):
        net = model()
        fit(
            net,
            torch.optim.SGD(net.parameters(), lr=0.5),
            (X, y),
            epochs=2,
            batch_size=8,
            **kwargs,
        )
        return list(net.parameters())

    for a, b in zip(run(), run(clip_norm=1e6), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_callback_sees_every_epoch_and_can_stop_early():
    X, y = data(10)
    net = model()
    seen = []

    def callback(epoch, history):
        seen.append((epoch, len(history.train_loss)))
        return epoch == 1

    history = fit(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        (X, y),
        epochs=10,
        batch_size=5,
        callback=callback,
    )
    assert seen == [(0, 1), (1, 2)]
    assert len(history.train_loss) == 2 and len(history.step_loss) == 4

    history = fit(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        (X, y),
        epochs=3,
        callback=lambda epoch, h: None,  # None: go on
    )
    assert len(history.train_loss) == 3


@pytest.mark.parametrize(
    "make, calls_per_step",
    [
        (lambda ps: SGD(ps, lr=0.1, momentum=0.9), 1),
        (lambda ps: Adam(ps, lr=0.02), 1),
        (lambda ps: Lookahead(Adam(ps, lr=0.02), k=2), 1),
        (lambda ps: SAM(SGD(ps, lr=0.1), rho=0.05), 2),
    ],
    ids=["SGD", "Adam", "Lookahead", "SAM"],
)
def test_fit_with_dlabc_optimizers(make, calls_per_step):
    X, y = data(30)
    test = data(11, seed=1)
    net = model()
    calls = []

    def loss_fn(logits, target):
        calls.append(len(target))
        return F.cross_entropy(logits, target)

    epochs, batch_size = 4, 10
    history = fit(
        net,
        make(list(net.parameters())),
        (X, y),
        test,
        epochs=epochs,
        batch_size=batch_size,
        loss_fn=loss_fn,
    )
    steps = epochs * 3
    # the closure per step (twice for SAM), then one evaluation of train and of test
    assert len(calls) == calls_per_step * steps + 2 * epochs
    assert len(history.step_loss) == steps
    assert history.train_loss[-1] < history.train_loss[0]


def test_fit_with_sam_records_the_loss_before_the_perturbation():
    X, y = data()
    net = model()
    reference = copy.deepcopy(net)
    history = fit(
        net,
        SAM(SGD(net.parameters(), lr=0.1), rho=0.5),
        (X, y),
        epochs=1,
        batch_size=len(X),
    )
    loss = F.cross_entropy(reference(X), y).item()
    assert history.step_loss == [pytest.approx(loss, rel=1e-12)]
    assert history.lr == [0.1]


def test_fit_rejects_bad_input():
    X, y = data(10)
    net = model()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epochs must be positive, got 0"):
        fit(net, sgd, (X, y), epochs=0)
    with pytest.raises(TypeError, match="epochs must be an int"):
        fit(net, sgd, (X, y), epochs=1.0)
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        fit(net, sgd, (X, y), epochs=1, batch_size=0)
    with pytest.raises(
        ValueError,
        match="train X and y must be non-empty and of the same length, got 10 and 9",
    ):
        fit(net, sgd, (X, y[:9]), epochs=1)
    with pytest.raises(TypeError, match="train y must have dtype torch.int64"):
        fit(net, sgd, (X, y.double()), epochs=1)
    with pytest.raises(TypeError, match="train X must be a torch.Tensor"):
        fit(net, sgd, (X.numpy(), y), epochs=1)
    with pytest.raises(
        ValueError, match=re.escape("clip_norm must be in (0, inf), got 0")
    ):
        fit(net, sgd, (X, y), epochs=1, clip_norm=0)
    with pytest.raises(
        ValueError, match=re.escape("clip_norm must be in (0, inf), got -1")
    ):
        fit(net, sgd, (X, y), epochs=1, clip_norm=-1.0)
    with pytest.raises(TypeError, match="optimizer must have step and zero_grad"):
        fit(net, object(), (X, y), epochs=1)


def test_fit_rejects_a_bad_test_set_before_training():
    """Bad input should fail early: not after a whole epoch of training."""
    X, y = data(10)
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="got 10 and 5"):
        fit(net, SGD(net.parameters(), lr=0.1), (X, y), (X, y[:5]), epochs=1)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


def test_evaluate_restores_the_mode_when_the_model_fails():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert model.training


@pytest.mark.parametrize("with_test", [True, False])
def test_fit_without_evaluating_the_training_set(with_test):
    X, y = data(20)
    test = data(9, seed=1) if with_test else None

    def run(evaluate_train):
        torch.manual_seed(3)  # the dropout masks: the skipped pass must not shift them
        net = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
        ).double()
        calls, seen = [], []

        def loss_fn(logits, target):
            calls.append(len(target))
            return F.cross_entropy(logits, target)

        history = fit(
            net,
            torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9),
            (X, y),
            test,
            epochs=3,
            batch_size=6,
            loss_fn=loss_fn,
            callback=lambda epoch, h: seen.append(len(h.test_loss)),
            evaluate_train=evaluate_train,
        )
        return history, [p.detach().clone() for p in net.parameters()], calls, seen

    h_off, p_off, calls_off, seen_off = run(False)
    h_on, p_on, calls_on, seen_on = run(True)
    assert h_off.train_loss == [] and h_off.train_accuracy == []
    assert len(h_on.train_loss) == len(h_on.train_accuracy) == 3
    # training itself is the same: steps, learning rates, test metrics, final weights
    assert len(h_off.step_loss) == len(h_off.lr) == 3 * 4  # 20 = 6 + 6 + 6 + 2
    assert h_off.step_loss == h_on.step_loss and h_off.lr == h_on.lr
    assert h_off.test_loss == h_on.test_loss
    assert h_off.test_accuracy == h_on.test_accuracy
    assert len(h_off.test_loss) == (3 if with_test else 0)
    assert all(torch.equal(a, b) for a, b in zip(p_off, p_on, strict=True))
    # the loss runs once per step, plus once per epoch and evaluated set
    assert len(calls_off) == 12 + 3 * with_test
    assert len(calls_on) == 12 + 3 * (1 + with_test)
    assert seen_off == seen_on == ([1, 2, 3] if with_test else [0, 0, 0])


# --------------------------------------------------------------------- autocast


def learnable(n: int = 48, d: int = 4, classes: int = 3, seed: int = 0):
    """float32 inputs labelled by a random linear teacher: a problem fit can learn."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return X, (X @ torch.randn(d, classes, generator=g)).argmax(1)


@pytest.mark.parametrize(
    "autocast_dtype, forward_dtype",
    [(None, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["float32", "bfloat16"],
)
def test_autocast_runs_the_training_forward_in_low_precision(
    autocast_dtype, forward_dtype
):
    X, y = learnable()
    net = model().float()
    seen = []  # (training?, dtype of the first layer's output)
    net[0].register_forward_hook(
        lambda module, inputs, output: seen.append((module.training, output.dtype))
    )
    history = fit(
        net,
        torch.optim.SGD(net.parameters(), lr=0.5),
        (X, y),
        epochs=15,
        batch_size=16,
        autocast_dtype=autocast_dtype,
    )
    steps = 15 * 3
    in_training = [dtype for training, dtype in seen if training]
    in_evaluation = [dtype for training, dtype in seen if not training]
    assert in_training == [forward_dtype] * steps
    assert in_evaluation == [torch.float32] * 15  # evaluate runs outside autocast
    for p in net.parameters():  # the weights and their gradients stay float32
        assert p.dtype == torch.float32
        assert p.grad.dtype == torch.float32
    assert all(isinstance(loss, float) for loss in history.step_loss)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]  # it still trains


def test_autocast_bfloat16_follows_the_float32_run_closely():
    X, y = learnable()

    def run(autocast_dtype):
        net = model().float()
        history = fit(
            net,
            torch.optim.SGD(net.parameters(), lr=0.5),
            (X, y),
            epochs=5,
            batch_size=16,
            autocast_dtype=autocast_dtype,
        )
        return history.step_loss

    full, half = run(None), run(torch.bfloat16)
    assert full != half  # bfloat16 rounds differently ...
    # ... but only at bfloat16's precision (8 bits of mantissa)
    assert half == pytest.approx(full, rel=3e-2)


@pytest.mark.parametrize("bad", ["bf16", "torch.bfloat16", 16, float])
def test_autocast_dtype_must_be_a_torch_dtype(bad):
    X, y = data(10)
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(
        TypeError, match=re.escape(f"autocast_dtype must be a torch.dtype, got {bad!r}")
    ):
        fit(
            net,
            torch.optim.SGD(net.parameters(), lr=0.1),
            (X, y),
            epochs=1,
            autocast_dtype=bad,
        )
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


# --------------------------------------------------------------------- train_steps


def test_endless_minibatches_are_epochs_of_minibatches():
    stream = endless_minibatches(10, 4, torch.Generator().manual_seed(3))
    batches = [next(stream) for _ in range(9)]  # three epochs of sizes 4, 4, 2
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    for epoch in range(3):
        rows = torch.cat(batches[3 * epoch : 3 * epoch + 3])
        assert sorted(rows.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        endless_minibatches(10, 0)


def test_train_steps_equals_fit_on_the_same_batches():
    X, y = data()
    net_fit, net_steps = model(), model()
    schedule = [0.3, 0.2, 0.1, 0.05, 0.3, 0.2]
    fit_history = fit(
        net_fit,
        torch.optim.SGD(net_fit.parameters(), lr=1.0, momentum=0.9),
        (X, y),
        epochs=2,
        batch_size=8,
        lr_schedule=schedule.__getitem__,
        clip_norm=0.5,
        seed=4,
    )
    history = train_steps(
        net_steps,
        torch.optim.SGD(net_steps.parameters(), lr=1.0, momentum=0.9),
        endless_minibatches(len(X), 8, torch.Generator().manual_seed(4)),
        lambda net, index: F.cross_entropy(net(X[index]), y[index]),
        steps=6,
        lr_schedule=schedule.__getitem__,
        clip_norm=0.5,
    )
    for p, q in zip(net_fit.parameters(), net_steps.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert history.step_loss == fit_history.step_loss
    assert history.lr == schedule
    assert history.eval_steps == [] and history.metrics == {}


def test_train_steps_takes_one_sgd_step_per_batch_of_a_stream():
    X, y = data()
    net = model()
    reference = copy.deepcopy(net)
    lr = 0.1
    batches = [(X[:5], y[:5]), (X[5:12], y[5:12]), (X[12:], y[12:])]
    train_steps(
        net,
        torch.optim.SGD(net.parameters(), lr=lr),
        iter(batches),
        lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]),
        steps=3,
    )
    params = list(reference.parameters())
    for xb, yb in batches:
        grads = torch.autograd.grad(F.cross_entropy(reference(xb), yb), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
    for p, q in zip(net.parameters(), params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_train_steps_evaluates_before_every_k_steps_and_at_the_end():
    X, y = data()
    net = model()
    modes = []

    def evaluate_fn(m: nn.Module) -> dict[str, float]:
        modes.append((m.training, torch.is_grad_enabled()))
        loss, accuracy = evaluate(m, X, y)
        return {"loss": loss, "accuracy": accuracy}

    history = train_steps(
        net,
        torch.optim.SGD(net.parameters(), lr=0.5),
        endless_minibatches(len(X), 6),
        lambda m, index: F.cross_entropy(m(X[index]), y[index]),
        steps=7,
        evaluate_every=3,
        evaluate_fn=evaluate_fn,
    )
    assert history.eval_steps == [0, 3, 6, 7]
    assert set(history.metrics) == {"loss", "accuracy"}
    assert len(history.metrics["loss"]) == 4 and len(history.step_loss) == 7
    assert modes == [(False, False)] * 4
    assert net.training  # the training mode is restored after each evaluation
    assert history.metrics["loss"][-1] == pytest.approx(evaluate(net, X, y)[0])
    assert history.metrics["loss"][-1] < history.metrics["loss"][0]


def test_train_steps_rejects_bad_input():
    X, y = data()
    net = model()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)

    def loss(m, index):
        return F.cross_entropy(m(X[index]), y[index])

    stream = endless_minibatches(len(X), 4)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        train_steps(lambda x: x, sgd, stream, loss, steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_steps(net, sgd, stream, loss, steps=0)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        train_steps(net, sgd, stream, None, steps=1)
    with pytest.raises(ValueError, match="clip_norm"):
        train_steps(net, sgd, stream, loss, steps=1, clip_norm=-1.0)
    with pytest.raises(TypeError, match="optimizer must have step"):
        train_steps(net, object(), stream, loss, steps=1)
    with pytest.raises(ValueError, match="given together"):
        train_steps(net, sgd, stream, loss, steps=1, evaluate_every=2)
    with pytest.raises(ValueError, match="evaluate_every"):
        train_steps(net, sgd, stream, loss, steps=1, evaluate_every=0, evaluate_fn=dict)
    with pytest.raises(ValueError, match="ran out after 2 batches"):
        train_steps(net, sgd, iter(minibatches(len(X), 12)), loss, steps=3)
    with pytest.raises(TypeError, match="must return a dict"):
        train_steps(
            net, sgd, stream, loss, steps=1, evaluate_every=1, evaluate_fn=lambda m: 1.0
        )
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_steps(nn.ReLU(), sgd, stream, loss, steps=1)
