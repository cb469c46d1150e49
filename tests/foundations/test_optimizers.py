"""Tests for ``dlabc.foundations.optimizers``.

Every optimizer that ``torch.optim`` also has (SGD with and without (Nesterov) momentum,
AdaGrad, RMSprop, Adam, AdamW, RAdam) must follow the same parameter trajectory as
``torch.optim``, step for step, in float64, on a small non-quadratic loss (a tanh MLP
with four parameter tensors of different shapes). Lion, Lookahead and SAM have no
``torch.optim`` twin: they are checked against the papers' update rules on cases worked
out by hand. The schedules are compared with ``torch.optim.lr_scheduler`` and with their
closed forms, the Rosenbrock function with its closed-form gradient and autograd.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.optim import lr_scheduler

from dlabc.foundations.optimizers import (
    SAM,
    SGD,
    AdaGrad,
    Adam,
    AdamW,
    Lion,
    Lookahead,
    Optimizer,
    RAdam,
    RMSprop,
    cosine,
    rosenbrock,
    run_on_surface,
    step_decay,
    warmup_cosine,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)  # the same float64 arithmetic, up to rounding
STEPS = 60

# --------------------------------------------------------------------- a small problem


def problem(seed: int = 0):
    """Random data and the initial weights of a 3-5-2 tanh MLP (four tensors)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    shapes = [(3, 5), (5,), (5, 2), (2,)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return X, Y, init


def mlp_loss(params, X, Y):
    W1, b1, W2, b2 = params[:4]
    return ((torch.tanh(X @ W1 + b1) @ W2 + b2 - Y) ** 2).mean()


def leaves(tensors):
    return [t.clone().requires_grad_() for t in tensors]


# (ours, torch's, keyword arguments both take): several settings per optimizer
CASES = [
    (SGD, torch.optim.SGD, dict(lr=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.05, weight_decay=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (SGD, torch.optim.SGD, dict(lr=0.02, momentum=0.5, weight_decay=0.05)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (
        SGD,
        torch.optim.SGD,
        dict(lr=0.02, momentum=0.7, nesterov=True, weight_decay=0.1),
    ),
    (AdaGrad, torch.optim.Adagrad, dict()),
    (AdaGrad, torch.optim.Adagrad, dict(lr=0.1, eps=1e-6)),
    (AdaGrad, torch.optim.Adagrad, dict(lr=0.05, weight_decay=0.1)),
    (RMSprop, torch.optim.RMSprop, dict()),
    (RMSprop, torch.optim.RMSprop, dict(lr=0.005, alpha=0.9, eps=1e-6)),
    (RMSprop, torch.optim.RMSprop, dict(lr=0.01, alpha=0.5, weight_decay=0.1)),
    (Adam, torch.optim.Adam, dict()),
    (Adam, torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6)),
    (Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.0, 0.9), weight_decay=0.1)),
    (AdamW, torch.optim.AdamW, dict()),
    (AdamW, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.0)),
    (AdamW, torch.optim.AdamW, dict(lr=0.05, betas=(0.5, 0.9), weight_decay=0.5)),
    (RAdam, torch.optim.RAdam, dict()),
    (RAdam, torch.optim.RAdam, dict(lr=0.02, betas=(0.9, 0.99), weight_decay=0.1)),
    (RAdam, torch.optim.RAdam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6)),
    # beta2 = 0.5: rho_inf = 3 <= 5, so the rectified step never switches on
    (RAdam, torch.optim.RAdam, dict(lr=0.01, betas=(0.9, 0.5))),
]


def case_id(case) -> str:
    ours, _, kwargs = case
    return ours.__name__ + "-" + ",".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_trajectory_matches_torch_optim(case):
    ours_cls, torch_cls, kwargs = case
    X, Y, init = problem()
    ours_params, ref_params = leaves(init), leaves(init)
    ours, ref = ours_cls(ours_params, **kwargs), torch_cls(ref_params, **kwargs)
    first_loss = mlp_loss(init, X, Y).item()
    for step in range(STEPS):
        for optimizer, params in ((ours, ours_params), (ref, ref_params)):
            optimizer.zero_grad()
            mlp_loss(params, X, Y).backward()
            optimizer.step()
        for i, (a, b) in enumerate(zip(ours_params, ref_params, strict=True)):
            torch.testing.assert_close(
                a, b, **TIGHT, msg=lambda m, i=i, step=step: f"step {step}, p{i}: {m}"
            )
    # the run went somewhere: the weights moved and the loss changed
    assert not torch.allclose(ours_params[0], init[0], rtol=1e-3, atol=1e-3)
    assert mlp_loss(ours_params, X, Y).item() != pytest.approx(first_loss, rel=1e-3)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c[2].get("weight_decay", 0) > 0 or c[0] is AdamW],
    ids=case_id,
)
def test_parameters_without_gradient_are_left_alone_like_torch(case):
    """A parameter that never gets a gradient stays put (no weight decay either); one
    that gets one every other step counts its own steps (bias correction) like torch."""
    ours_cls, torch_cls, kwargs = case
    X, Y, init = problem(1)
    g = torch.Generator().manual_seed(2)
    extra = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2)]
    ours_params, ref_params = leaves(init + extra), leaves(init + extra)
    ours, ref = ours_cls(ours_params, **kwargs), torch_cls(ref_params, **kwargs)
    for step in range(20):
        for optimizer, params in ((ours, ours_params), (ref, ref_params)):
            optimizer.zero_grad()
            loss = mlp_loss(params, X, Y)
            if step % 2 == 0:  # params[4] has a gradient on even steps only
                loss = loss + (params[4] ** 4).sum()
            loss.backward()  # params[5] never has one
            optimizer.step()
        assert ours_params[5].grad is None
        for a, b in zip(ours_params, ref_params, strict=True):
            torch.testing.assert_close(a, b, **TIGHT)
    assert torch.equal(ours_params[5], extra[1])
    assert not torch.equal(ours_params[4], extra[0])
    assert ours.state[4]["t"] == 10
    assert ours.state[5] == {}


def test_adam_l2_differs_from_adamw_decoupled_decay_and_agrees_without_it():
    X, Y, init = problem()

    def run(cls, **kwargs):
        params = leaves(init)
        optimizer = cls(params, lr=0.01, **kwargs)
        for _ in range(10):
            optimizer.zero_grad()
            mlp_loss(params, X, Y).backward()
            optimizer.step()
        return params

    for a, b in zip(
        run(Adam, weight_decay=0.0), run(AdamW, weight_decay=0.0), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    l2, decoupled = run(Adam, weight_decay=0.5), run(AdamW, weight_decay=0.5)
    assert not torch.allclose(l2[0], decoupled[0], rtol=1e-6, atol=1e-6)


def test_adamw_first_step_closed_form():
    # step 1: m_hat = g, v_hat = g^2, so theta = (1 - lr wd) theta - lr g / (|g| + eps)
    theta0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g = torch.tensor([0.3, 4.0, -1e-3], dtype=torch.float64)
    p = theta0.clone().requires_grad_()
    lr, wd, eps = 0.1, 0.2, 1e-8
    AdamW([p], lr=lr, weight_decay=wd, eps=eps).step(lambda: (p * g).sum().backward())
    expected = (1 - lr * wd) * theta0 - lr * g / (g.abs() + eps)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-15)


def test_step_returns_the_closure_loss_and_computes_gradients_under_no_grad():
    X, Y, init = problem()
    params = leaves(init)
    optimizer = Adam(params, lr=0.01)

    def closure():
        optimizer.zero_grad()
        loss = mlp_loss(params, X, Y)
        loss.backward()
        return loss

    with torch.no_grad():  # step enables gradients for the closure itself
        loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(mlp_loss(init, X, Y).item(), rel=1e-14)
    assert optimizer.step() is None
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


def test_base_optimizer_update_is_abstract():
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    with pytest.raises(NotImplementedError):
        Optimizer([p], lr=0.1).step()


# --------------------------------------------------------------------- Lion


def lion_run(theta0, grads, **kwargs):
    p = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    optimizer = Lion([p], **kwargs)
    path, momenta = [], []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        path.append(p.detach().clone())
        momenta.append(optimizer.state[0]["m"].clone())
    return path, momenta


def test_lion_by_hand():
    # lr 0.1, b1 0.9, b2 0.5, theta0 = [1, 1]; the gradients are given:
    # 1: c = 0.1 g1 = [0.2, -0.4]         -> sign [+, -]; theta [0.9, 1.1]; m = [1, -2]
    # 2: c = 0.9 [1, -2] + 0.1 [-1, 1] = [0.8, -1.7] -> [+, -]; the momentum outvotes
    #    the flipped gradient of coordinate 0;   theta [0.8, 1.2]; m = [0, -0.5]
    # 3: c = 0.9 [0, -0.5] + 0.1 [-1, 1] = [-0.1, -0.35] -> [-, -]; theta [0.9, 1.3];
    #    m = [-0.5, 0.25]
    grads = [[2.0, -4.0], [-1.0, 1.0], [-1.0, 1.0]]
    path, momenta = lion_run([1.0, 1.0], grads, lr=0.1, betas=(0.9, 0.5))
    expected_path = [[0.9, 1.1], [0.8, 1.2], [0.9, 1.3]]
    expected_m = [[1.0, -2.0], [0.0, -0.5], [-0.5, 0.25]]
    for got, want in zip(path, expected_path, strict=True):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    for got, want in zip(momenta, expected_m, strict=True):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_lion_with_decoupled_weight_decay_by_hand():
    # theta <- theta - lr (sign(c) + wd theta) = 0.95 theta - 0.1 sign(c), signs as above
    # 1: [0.95 - 0.1, 0.95 + 0.1] = [0.85, 1.05]
    # 2: [0.85 * 0.95 - 0.1, 1.05 * 0.95 + 0.1] = [0.7075, 1.0975]
    # 3: [0.7075 * 0.95 + 0.1, 1.0975 * 0.95 + 0.1] = [0.772125, 1.142625]
    grads = [[2.0, -4.0], [-1.0, 1.0], [-1.0, 1.0]]
    path, _ = lion_run([1.0, 1.0], grads, lr=0.1, betas=(0.9, 0.5), weight_decay=0.5)
    expected = [[0.85, 1.05], [0.7075, 1.0975], [0.772125, 1.142625]]
    for got, want in zip(path, expected, strict=True):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_lion_on_a_quadratic_moves_by_lr_and_overshoots_with_momentum():
    # f = (theta - 3)^2 / 2 from 0 with lr 0.5: the gradient theta - 3 is negative, so
    # theta = 0.5 k for k = 1..6; at theta = 3 the gradient is 0, but c = b1 m < 0 and
    # Lion steps on to 3.5
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = Lion([p], lr=0.5)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * ((p - 3) ** 2).sum()
        loss.backward()
        return loss

    for k in range(1, 8):
        optimizer.step(closure)
        assert p.item() == pytest.approx(0.5 * k if k <= 6 else 3.5, abs=1e-14)


def test_lion_moves_every_coordinate_by_exactly_lr():
    X, Y, init = problem()
    params = leaves(init)
    lr = 1e-3
    optimizer = Lion(params, lr=lr, betas=(0.95, 0.98))
    for _ in range(20):
        before = [p.detach().clone() for p in params]
        optimizer.zero_grad()
        mlp_loss(params, X, Y).backward()
        optimizer.step()
        for p, b in zip(params, before, strict=True):
            step = (p.detach() - b).abs()
            torch.testing.assert_close(step, torch.full_like(step, lr), **TIGHT)


# --------------------------------------------------------------------- Lookahead


def quadratic_closure(optimizer, params, a):
    """f = sum(a * theta^2) / 2 over the tensors in ``params``; gradient a * theta."""

    def closure():
        optimizer.zero_grad()
        loss = sum(0.5 * (a * p**2).sum() for p in params)
        loss.backward()
        return loss

    return closure


def test_lookahead_with_inner_sgd_by_hand():
    # inner SGD on f = sum(a theta^2) / 2: one step multiplies theta by r = 1 - lr a.
    # After k steps the slow weights are phi + alpha (phi r^k - phi) = phi (1 - alpha +
    # alpha r^k), and the fast weights restart there; in between they are phi r^j.
    a = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    theta0 = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    lr, k, alpha = 0.1, 3, 0.5
    r = 1 - lr * a
    p = theta0.clone().requires_grad_()
    optimizer = Lookahead(SGD([p], lr=lr), k=k, alpha=alpha)
    closure = quadratic_closure(optimizer, [p], a)
    # a plain SGD, put back on the slow weights after every sync
    q = theta0.clone().requires_grad_()
    plain = SGD([q], lr=lr)
    plain_closure = quadratic_closure(plain, [q], a)
    for step in range(1, 3 * k + 2):
        loss = optimizer.step(closure)
        plain.step(plain_closure)
        cycles, j = divmod(step, k)
        expected = theta0 * (1 - alpha + alpha * r**k) ** cycles * r**j
        torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-15)
        if j == 0:  # sync: fast = slow
            torch.testing.assert_close(optimizer.slow[0], expected, rtol=1e-14, atol=0)
            with torch.no_grad():
                q.copy_(p)
        else:  # between syncs: the inner optimizer alone
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert loss is not None
    assert optimizer.steps == 3 * k + 1


def test_lookahead_alpha_one_is_the_inner_optimizer():
    X, Y, init = problem()
    ours, plain = leaves(init), leaves(init)
    lookahead = Lookahead(Adam(ours, lr=0.01), k=3, alpha=1.0)
    adam = Adam(plain, lr=0.01)
    for _ in range(12):
        for optimizer, params in ((lookahead, ours), (adam, plain)):
            optimizer.zero_grad()
            mlp_loss(params, X, Y).backward()
            optimizer.step()
        for a, b in zip(ours, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_lookahead_alpha_zero_returns_to_the_start_every_k_steps():
    X, Y, init = problem()
    params = leaves(init)
    k = 4
    optimizer = Lookahead(SGD(params, lr=0.1, momentum=0.9), k=k, alpha=0.0)
    for step in range(1, 3 * k + 1):
        optimizer.zero_grad()
        mlp_loss(params, X, Y).backward()
        optimizer.step()
        back = all(torch.equal(p, p0) for p, p0 in zip(params, init, strict=True))
        assert back == (step % k == 0)


def test_lookahead_passes_lr_and_zero_grad_through():
    p = torch.zeros(2, requires_grad=True)
    inner = SGD([p], lr=0.1)
    optimizer = Lookahead(inner)
    assert (optimizer.k, optimizer.alpha, optimizer.lr) == (5, 0.5, 0.1)
    optimizer.lr = 0.01
    assert inner.lr == 0.01
    p.grad = torch.ones(2)
    optimizer.zero_grad()
    assert p.grad is None


# --------------------------------------------------------------------- SAM


def test_sam_step_by_hand():
    # f(w) = w^T A w / 2, A = diag(1, 4), w = (3, 1): g = (3, 4), |g| = 5, loss 6.5.
    # rho = 0.5: eps = 0.5 g / 5 = (0.3, 0.4); g_SAM = A (w + eps) = (3.3, 5.6);
    # SGD lr 0.1: w' = (3 - 0.33, 1 - 0.56) = (2.67, 0.44)
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    w = torch.tensor([3.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = SAM(SGD([w], lr=0.1), rho=0.5)
    calls = []
    inner = quadratic_closure(optimizer, [w], a)

    def closure():
        calls.append(w.detach().clone())
        return inner()

    loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(6.5, abs=1e-14)
    assert len(calls) == 2
    torch.testing.assert_close(calls[0], torch.tensor([3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(calls[1], torch.tensor([3.3, 1.4], dtype=torch.float64))
    torch.testing.assert_close(
        w.detach(), torch.tensor([2.67, 0.44], dtype=torch.float64)
    )
    torch.testing.assert_close(w.grad, torch.tensor([3.3, 5.6], dtype=torch.float64))


def test_sam_perturbation_uses_the_global_gradient_norm():
    # the same problem, split into two tensors and a third that gets no gradient
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    w1 = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    w2 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    unused = torch.tensor([7.0, 8.0], dtype=torch.float64, requires_grad=True)
    optimizer = SAM(SGD([w1, unused, w2], lr=0.1), rho=0.5)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * (a[0] * w1**2 + a[1] * w2**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    # (SAM divides by |g| + 1e-12, hence abs=1e-12)
    assert w1.item() == pytest.approx(2.67, abs=1e-12)
    assert w2.item() == pytest.approx(0.44, abs=1e-12)
    assert unused.tolist() == [7.0, 8.0] and unused.grad is None


def test_sam_general_step_matches_its_definition():
    # on the MLP: w - lr * grad f(w + rho g / |g|), with momentum-free inner SGD
    X, Y, init = problem()
    params = leaves(init)
    lr, rho = 0.05, 0.1
    optimizer = SAM(SGD(params, lr=lr), rho=rho)

    def closure():
        optimizer.zero_grad()
        loss = mlp_loss(params, X, Y)
        loss.backward()
        return loss

    optimizer.step(closure)
    w = leaves(init)
    g = torch.autograd.grad(mlp_loss(w, X, Y), w)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    w_adv = [
        (wi + rho * gi / norm).detach().requires_grad_()
        for wi, gi in zip(w, g, strict=True)
    ]
    g_sam = torch.autograd.grad(mlp_loss(w_adv, X, Y), w_adv)
    for p, w0, gs in zip(params, init, g_sam, strict=True):
        torch.testing.assert_close(p.detach(), w0 - lr * gs, rtol=1e-12, atol=1e-14)


def test_sam_passes_lr_and_zero_grad_through():
    p = torch.zeros(2, requires_grad=True)
    optimizer = SAM(SGD([p], lr=0.1))
    assert optimizer.rho == 0.05 and optimizer.lr == 0.1
    optimizer.lr = 0.2
    assert optimizer.optimizer.lr == 0.2
    p.grad = torch.ones(2)
    optimizer.zero_grad()
    assert p.grad is None


# --------------------------------------------------------------------- schedules


def torch_schedule(make_scheduler, lr, steps):
    """The learning rate that ``torch.optim`` uses at each of the steps 0..steps."""
    p = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([p], lr=lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    "lr, step_size, gamma", [(0.1, 7, 0.5), (1.0, 1, 0.9), (0.3, 10, 0.1)]
)
def test_step_decay_matches_step_lr(lr, step_size, gamma):
    T = 30
    ref = torch_schedule(
        lambda o: lr_scheduler.StepLR(o, step_size=step_size, gamma=gamma), lr, T
    )
    ours = [step_decay(t, lr, step_size, gamma) for t in range(T + 1)]
    assert ours == pytest.approx(ref, rel=1e-12, abs=0)
    assert ours == pytest.approx([lr * gamma ** (t // step_size) for t in range(T + 1)])


@pytest.mark.parametrize(
    "lr, T, min_lr", [(0.1, 20, 0.0), (1.0, 7, 0.1), (0.5, 1, 0.2)]
)
def test_cosine_matches_cosine_annealing_lr_and_closed_form(lr, T, min_lr):
    ref = torch_schedule(
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=T, eta_min=min_lr), lr, T
    )
    ours = [cosine(t, lr, T, min_lr) for t in range(T + 1)]
    closed = [
        min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / T)) / 2
        for t in range(T + 1)
    ]
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert ours == pytest.approx(closed, rel=1e-14, abs=1e-15)
    assert ours[0] == lr and ours[-1] == pytest.approx(min_lr, abs=1e-15)
    # past the end it stays at min_lr (torch's would climb again)
    assert cosine(T + 5, lr, T, min_lr) == pytest.approx(min_lr, abs=1e-15)


def warmup_cosine_closed_form(t, lr, W, T, min_lr):
    if t < W:
        return lr * (t + 1) / W
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (t - W) / (T - W))) / 2


@pytest.mark.parametrize(
    "lr, W, T, min_lr", [(0.1, 4, 20, 0.01), (1.0, 2, 5, 0.0), (0.3, 9, 10, 0.1)]
)
def test_warmup_cosine_matches_closed_form_and_sequential_lr(lr, W, T, min_lr):
    ours = [warmup_cosine(t, lr, W, T, min_lr) for t in range(T + 1)]
    closed = [warmup_cosine_closed_form(t, lr, W, T, min_lr) for t in range(T + 1)]
    assert ours == pytest.approx(closed, rel=1e-14, abs=1e-15)
    assert ours[W - 1] == ours[W] == lr and ours[T] == pytest.approx(min_lr, abs=1e-15)
    # torch 2.x agrees (checked): LinearLR from lr/W reaching lr at step W - 1, then
    # CosineAnnealingLR restarted at the milestone W
    ref = torch_schedule(
        lambda o: lr_scheduler.SequentialLR(
            o,
            [
                lr_scheduler.LinearLR(
                    o, start_factor=1 / W, end_factor=1.0, total_iters=W - 1
                ),
                lr_scheduler.CosineAnnealingLR(o, T_max=T - W, eta_min=min_lr),
            ],
            milestones=[W],
        ),
        lr,
        T,
    )
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_warmup_of_one_step_starts_at_lr():
    assert warmup_cosine(0, 0.2, 1, 5) == 0.2
    assert warmup_cosine(1, 0.2, 1, 5) == pytest.approx(cosine(0, 0.2, 4))


# --------------------------------------------------------------------- Rosenbrock


@pytest.mark.parametrize("a, b", [(1.0, 100.0), (2.0, 1.0), (-0.5, 10.0)])
def test_rosenbrock_minimum_and_gradient(a, b):
    assert rosenbrock(torch.tensor([a, a * a], dtype=torch.float64), a, b).item() == 0.0
    g = torch.Generator().manual_seed(3)
    xy = torch.randn(10, 2, generator=g, dtype=torch.float64, requires_grad=True)
    f = rosenbrock(xy, a, b)
    x, y = xy.detach().unbind(-1)
    torch.testing.assert_close(f.detach(), (a - x) ** 2 + b * (y - x**2) ** 2)
    assert (f > 0).all()
    (grad,) = torch.autograd.grad(f.sum(), xy)
    closed = torch.stack(
        [-2 * (a - x) - 4 * b * x * (y - x**2), 2 * b * (y - x**2)], -1
    )
    torch.testing.assert_close(grad, closed, rtol=1e-12, atol=1e-12)


def test_rosenbrock_batch_shapes():
    xy = torch.randn(4, 3, 2, dtype=torch.float64)
    f = rosenbrock(xy)
    assert f.shape == (4, 3)
    assert rosenbrock(xy[1, 2]).shape == ()
    assert f[1, 2] == rosenbrock(xy[1, 2])
    assert rosenbrock(torch.tensor([0.0, 0.0])).item() == 1.0  # (1 - 0)^2


def test_run_on_surface_path():
    start = (-1.5, 2.0)
    path = run_on_surface(lambda ps: SGD(ps, lr=1e-4), rosenbrock, start, 50)
    assert path.shape == (51, 2) and path.dtype == torch.float64
    assert path[0].tolist() == list(start)
    losses = rosenbrock(path)
    assert losses[-1] < losses[0]
    assert (losses[1:] <= losses[:-1]).all()  # small steps: downhill all the way


def test_run_on_surface_stops_where_it_diverges():
    # the same steps by hand, all 200 of them: the point overflows and stays inf/nan
    point = torch.tensor((-1.5, 2.0), dtype=torch.float64, requires_grad=True)
    optimizer, full = SGD([point], lr=0.1), [point.detach().clone()]
    for _ in range(200):
        optimizer.zero_grad()
        rosenbrock(point).backward()
        optimizer.step()
        full.append(point.detach().clone())
    full = torch.stack(full)
    finite = torch.isfinite(full).all(1)
    first_bad = int((~finite).nonzero()[0])
    assert not finite[first_bad:].any()  # no way back from inf or nan
    path = run_on_surface(lambda ps: SGD(ps, lr=0.1), rosenbrock, (-1.5, 2.0), 200)
    assert path.shape == (first_bad + 1, 2)
    torch.testing.assert_close(path[:first_bad], full[:first_bad], rtol=0, atol=0)
    assert not torch.isfinite(path[-1]).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Adam(ps, lr=0.05),
        lambda ps: SAM(SGD(ps, lr=1e-4), rho=0.01),
        lambda ps: Lookahead(SGD(ps, lr=1e-4, momentum=0.9)),
        lambda ps: torch.optim.SGD(ps, lr=1e-4),
    ],
    ids=["Adam", "SAM", "Lookahead", "torch-SGD"],
)
def test_run_on_surface_with_other_optimizers(make):
    path = run_on_surface(make, rosenbrock, (-1.0, 1.5), 30)
    assert path.shape == (31, 2)
    assert rosenbrock(path[-1]) < rosenbrock(path[0])


# --------------------------------------------------------------------- bad input: one table


def param():
    return torch.zeros(3, dtype=torch.float64, requires_grad=True)


ALL = [SGD, AdaGrad, RMSprop, Adam, AdamW, RAdam, Lion]
BETAS = [Adam, AdamW, RAdam, Lion]
EPS = [AdaGrad, RMSprop, Adam, AdamW, RAdam]


def _p(call, error, match, id):
    return pytest.param(call, error, match, id=id)


def _e(text):
    return re.escape(text)


def _inner():
    return SGD([param()], lr=0.1)


def _torch_sgd():
    return torch.optim.SGD([param()], lr=0.1)


def _sam_without_gradients():
    w = torch.zeros(2, requires_grad=True)
    return SAM(SGD([w], lr=0.1)).step(lambda: torch.tensor(0.0))


def _sam_without_closure():
    p = torch.zeros(2, requires_grad=True)
    optimizer = SAM(SGD([p], lr=0.1))
    p.grad = torch.ones(2)
    return optimizer.step()


_PER_OPTIMIZER = [
    (
        lambda c: c([param()], lr=-1),
        ValueError,
        _e("lr must be in [0, inf), got -1"),
        "lr-negative",
    ),
    (
        lambda c: c([param()], lr="0.1"),
        TypeError,
        "lr must be a number, got str",
        "lr-str",
    ),
    (
        lambda c: c([param()], lr=float("nan")),
        ValueError,
        "lr must be finite, got nan",
        "lr-nan",
    ),
    (
        lambda c: c([param()], lr=0.1, weight_decay=-0.1),
        ValueError,
        _e("weight_decay must be in [0, inf)"),
        "weight_decay-negative",
    ),
    (lambda c: c([], lr=0.1), ValueError, "params is empty", "params-empty"),
    (
        lambda c: c([param(), torch.zeros(3, dtype=torch.long)], lr=0.1),
        TypeError,
        r"params\[1\] must be a floating-point",
        "params-long",
    ),
    (
        lambda c: c([[1.0, 2.0]], lr=0.1),
        TypeError,
        r"params\[0\] must be a floating-point",
        "params-list",
    ),
    (
        lambda c: c([torch.zeros(3)], lr=0.1),
        ValueError,
        r"params\[0\] does not require gradients",
        "params-no-grad",
    ),
    # torch.optim raises too: iterating a bare tensor gives non-leaf rows that never get a .grad
    (
        lambda c: c(torch.zeros(3, requires_grad=True), lr=0.1),
        TypeError,
        "params must be an iterable",
        "params-bare-tensor",
    ),
    # torch.optim: "can't optimize a non-leaf Tensor": w * 2 never gets a .grad
    (
        lambda c: c([torch.zeros(3, requires_grad=True) * 2], lr=0.1),
        ValueError,
        r"params\[0\] is not a leaf",
        "params-non-leaf",
    ),
]
_PER_BETAS = [
    (
        lambda c: c([param()], betas=(1.0, 0.999)),
        ValueError,
        _e("betas[0] must be in [0, 1), got 1"),
        "betas0-1",
    ),
    (
        lambda c: c([param()], betas=(0.9, -0.1)),
        ValueError,
        _e("betas[1] must be in [0, 1), got -0.1"),
        "betas1-negative",
    ),
    (
        lambda c: c([param()], betas=(0.9, 1.5)),
        ValueError,
        _e("betas[1] must be in [0, 1), got 1.5"),
        "betas1-1.5",
    ),
    (
        lambda c: c([param()], betas=[0.9, 0.999]),
        TypeError,
        "betas must be a tuple of two numbers",
        "betas-list",
    ),
    (
        lambda c: c([param()], betas=(0.9, 0.99, 0.999)),
        TypeError,
        "betas must be a tuple of two numbers",
        "betas-three",
    ),
    (
        lambda c: c([param()], betas=("0.9", 0.999)),
        TypeError,
        r"betas\[0\] must be a number, got str",
        "betas0-str",
    ),
]
_SCHEDULES = {
    "step_decay": lambda t: step_decay(t, 0.1, 5),
    "cosine": lambda t: cosine(t, 0.1, 10),
    "warmup_cosine": lambda t: warmup_cosine(t, 0.1, 2, 10),
}

BAD_INPUT = [
    *[
        _p(lambda c=cls, f=make: f(c), error, match, f"{cls.__name__}-{id}")
        for cls in ALL
        for make, error, match, id in _PER_OPTIMIZER
    ],
    *[
        _p(lambda c=cls, f=make: f(c), error, match, f"{cls.__name__}-{id}")
        for cls in BETAS
        for make, error, match, id in _PER_BETAS
    ],
    *[
        _p(
            lambda c=cls: c([param()], eps=-1e-8),
            ValueError,
            _e("eps must be in [0, inf), got -1e-08"),
            f"{cls.__name__}-eps",
        )
        for cls in EPS
    ],
    _p(
        lambda: SGD([param()], lr=0.1, momentum=1.0),
        ValueError,
        _e("momentum must be in [0, 1), got 1"),
        "SGD-momentum-1",
    ),
    _p(
        lambda: SGD([param()], lr=0.1, momentum=-0.5),
        ValueError,
        _e("momentum must be in [0, 1), got -0.5"),
        "SGD-momentum-negative",
    ),
    _p(
        lambda: SGD([param()], lr=0.1, nesterov=True),
        ValueError,
        "nesterov=True needs a momentum > 0",
        "SGD-nesterov",
    ),
    _p(
        lambda: RMSprop([param()], alpha=1.0),
        ValueError,
        _e("alpha must be in [0, 1), got 1"),
        "RMSprop-alpha",
    ),
    _p(
        lambda: Lookahead(_torch_sgd()),
        TypeError,
        "Lookahead wraps a dlabc optimizer, got SGD",
        "Lookahead-optimizer-torch",
    ),
    _p(
        lambda: SAM(_torch_sgd()),
        TypeError,
        "SAM wraps a dlabc optimizer, got SGD",
        "SAM-optimizer-torch",
    ),
    _p(
        lambda: SAM(Lookahead(_inner())),
        TypeError,
        "wraps a dlabc optimizer, got Lookahead",
        "SAM-optimizer-lookahead",
    ),
    _p(
        lambda: Lookahead(_inner(), k=0),
        ValueError,
        "k must be positive, got 0",
        "Lookahead-k-0",
    ),
    _p(
        lambda: Lookahead(_inner(), k=2.0),
        TypeError,
        "k must be an int, got float",
        "Lookahead-k-float",
    ),
    _p(
        lambda: Lookahead(_inner(), alpha=1.5),
        ValueError,
        _e("alpha must be in [0, 1], got 1.5"),
        "Lookahead-alpha-1.5",
    ),
    _p(
        lambda: Lookahead(_inner(), alpha=-0.1),
        ValueError,
        _e("alpha must be in [0, 1], got -0.1"),
        "Lookahead-alpha-negative",
    ),
    _p(
        lambda: SAM(_inner(), rho=0),
        ValueError,
        _e("rho must be in (0, inf), got 0"),
        "SAM-rho-0",
    ),
    _p(
        lambda: SAM(_inner(), rho=-0.1),
        ValueError,
        _e("rho must be in (0, inf), got -0.1"),
        "SAM-rho-negative",
    ),
    _p(
        _sam_without_closure, ValueError, "SAM.step needs a closure", "SAM-closure-none"
    ),
    _p(
        _sam_without_gradients,
        RuntimeError,
        "closure produced no gradients",
        "SAM-closure-no-gradients",
    ),
    *[
        _p(lambda f=f, t=t: f(t), error, match, f"{name}-step-{id}")
        for name, f in _SCHEDULES.items()
        for t, error, match, id in (
            (-1, ValueError, "step must be non-negative, got -1", "negative"),
            (True, TypeError, "step must be an int, got bool", "bool"),
            (1.5, TypeError, "step must be an int, got float", "float"),
        )
    ],
    _p(
        lambda: step_decay(0, 0.1, 0),
        ValueError,
        "step_size must be positive, got 0",
        "step_decay-step_size",
    ),
    _p(
        lambda: step_decay(0, 0.1, 5, gamma=2.0),
        ValueError,
        _e("gamma must be in [0, 1], got 2"),
        "step_decay-gamma",
    ),
    _p(
        lambda: step_decay(0, -0.1, 5),
        ValueError,
        _e("lr must be in [0, inf), got -0.1"),
        "step_decay-lr",
    ),
    _p(
        lambda: cosine(0, 0.1, 0),
        ValueError,
        "total_steps must be positive, got 0",
        "cosine-total_steps",
    ),
    _p(
        lambda: cosine(0, 0.1, 10, min_lr=0.2),
        ValueError,
        _e("min_lr must be in [0, 0.1], got 0.2"),
        "cosine-min_lr",
    ),
    _p(
        lambda: cosine(0, -0.1, 10),
        ValueError,
        _e("lr must be in [0, inf), got -0.1"),
        "cosine-lr",
    ),
    _p(
        lambda: warmup_cosine(0, 0.1, 10, 10),
        ValueError,
        r"warmup_steps \(10\) must be less than total_steps \(10\)",
        "warmup_cosine-warmup_steps-10",
    ),
    _p(
        lambda: warmup_cosine(0, 0.1, 11, 10),
        ValueError,
        r"warmup_steps \(11\) must be less than total_steps \(10\)",
        "warmup_cosine-warmup_steps-11",
    ),
    _p(
        lambda: warmup_cosine(0, 0.1, 0, 10),
        ValueError,
        "warmup_steps must be positive, got 0",
        "warmup_cosine-warmup_steps-0",
    ),
    _p(
        lambda: warmup_cosine(0, -0.1, 2, 10),
        ValueError,
        _e("lr must be in [0, inf), got -0.1"),
        "warmup_cosine-lr",
    ),
    # the same arguments must fail whatever the step, warm-up included
    *[
        _p(
            lambda t=t, m=m: warmup_cosine(t, 0.1, 2, 10, min_lr=m),
            ValueError,
            _e(f"min_lr must be in [0, 0.1], got {m:g}"),
            f"warmup_cosine-min_lr-{m}-step-{t}",
        )
        for t in (0, 1, 5)
        for m in (0.2, -1.0)
    ],
    _p(
        lambda: rosenbrock(torch.zeros(3)),
        ValueError,
        _e("xy must be a tensor of shape (..., 2), got (3,)"),
        "xy-3",
    ),
    _p(
        lambda: rosenbrock(torch.zeros(2, 3)),
        ValueError,
        _e("xy must be a tensor of shape (..., 2), got (2, 3)"),
        "xy-2x3",
    ),
    _p(
        lambda: rosenbrock(torch.tensor(1.0)),
        ValueError,
        _e("xy must be a tensor of shape (..., 2), got ()"),
        "xy-scalar",
    ),
    _p(
        lambda: rosenbrock([1.0, 1.0]),
        ValueError,
        _e("xy must be a tensor of shape (..., 2), got list"),
        "xy-list",
    ),
    _p(
        lambda: run_on_surface(lambda ps: SGD(ps, lr=0.1), rosenbrock, (0.0, 0.0), 0),
        ValueError,
        "steps must be positive, got 0",
        "run_on_surface-steps",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
