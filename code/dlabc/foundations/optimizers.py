"""Optimizers from scratch: SGD to AdamW, RAdam, Lion, Lookahead and SAM; LR schedules.

Chapter: ``book/foundations/optimizers.md``.

References:
- Polyak (1964), momentum; Nesterov (1983) and Sutskever et al. (2013), ICML, *On the
  importance of initialization and momentum in deep learning*.
- Duchi, Hazan & Singer (2011), JMLR, *Adaptive Subgradient Methods* (AdaGrad).
- Tieleman & Hinton (2012), Coursera lecture 6.5 (RMSprop).
- Kingma & Ba (2015), ICLR, *Adam*; Loshchilov & Hutter (2019), ICLR, *Decoupled Weight
  Decay Regularization* (AdamW); Liu et al. (2020), ICLR, *On the Variance of the
  Adaptive Learning Rate and Beyond* (RAdam).
- Chen et al. (2023), NeurIPS, *Symbolic Discovery of Optimization Algorithms* (Lion).
- Zhang et al. (2019), NeurIPS, *Lookahead Optimizer: k steps forward, 1 step back*.
- Foret et al. (2021), ICLR, *Sharpness-Aware Minimization* (SAM).
- Loshchilov & Hutter (2017), ICLR, *SGDR* (cosine schedule); Goyal et al. (2017),
  *Accurate, Large Minibatch SGD* (linear warm-up).

Every optimizer keeps the parameters it updates and, per parameter, a ``state`` dict
(the moments). ``step(closure)`` reads ``p.grad`` and changes ``p`` in place, like
``torch.optim``. Names follow the papers: ``m`` (first moment), ``v`` (second moment),
``t`` (step count, from 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from dlabc.checks import check_number, check_positive_int

__all__ = [
    "Optimizer",
    "SGD",
    "AdaGrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "RAdam",
    "Lion",
    "Lookahead",
    "SAM",
    "step_decay",
    "cosine",
    "warmup_cosine",
    "rosenbrock",
    "run_on_surface",
]

Closure = Callable[[], torch.Tensor]


def _check_betas(betas: tuple[float, float]) -> tuple[float, float]:
    if not (isinstance(betas, tuple) and len(betas) == 2):
        raise TypeError(f"betas must be a tuple of two numbers, got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(beta, f"betas[{i}]", low=0, high=1, high_open=True)
    return betas


def _check_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters as a list: floating-point leaf tensors that need gradients."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of tensors (e.g. model.parameters() or "
            "[w]), got a single tensor"
        )
    params = list(params)
    if not params:
        raise ValueError("params is empty: an optimizer needs parameters to update")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a floating-point torch.Tensor")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require gradients")
        if not p.is_leaf:
            raise ValueError(f"params[{i}] is not a leaf tensor: it never gets a .grad")
    return params


def _check_momentum(momentum: float, nesterov: bool) -> float:
    check_number(momentum, "momentum", low=0, high=1, high_open=True)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs a momentum > 0")
    return momentum


def _check_closure(closure: Closure | None) -> Closure:
    if closure is None:
        raise ValueError("SAM.step needs a closure that recomputes loss and grads")
    return closure


class Optimizer:
    """What every optimizer here shares: parameters, state, ``zero_grad``, ``step``.

    A subclass writes one method, :meth:`update`, the rule for one parameter tensor.
    """

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0
    ) -> None:
        self.params = _check_params(params)
        self.lr = check_number(lr, "lr", low=0)
        self.weight_decay = check_number(weight_decay, "weight_decay", low=0)
        self.state: list[dict[str, torch.Tensor | int]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        """Forget the gradients of the last step (``p.grad = None``, as torch does)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:
        """Update each parameter that has a gradient; return the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, state in zip(self.params, self.state, strict=True):
            if p.grad is not None:
                state["t"] = state.get("t", 0) + 1
                self.update(p, p.grad, state)
        return loss

    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    r"""Stochastic gradient descent, with (Nesterov) momentum and L2 weight decay.

    $g \leftarrow g + \lambda\theta$;
    $b \leftarrow \mu b + g$;
    $\theta \leftarrow \theta - \eta\,(g + \mu b)$ with Nesterov, else
    $\theta \leftarrow \theta - \eta\, b$.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr, weight_decay)
        self.momentum = _check_momentum(momentum, nesterov)
        self.nesterov = nesterov

    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        g = g + self.weight_decay * p  # L2 penalty: its gradient is lambda * theta
        if self.momentum:
            if "b" not in state:
                state["b"] = g.clone()  # the first step starts the velocity at g
            else:
                state["b"].mul_(self.momentum).add_(g)  # b = mu b + g
            g = g + self.momentum * state["b"] if self.nesterov else state["b"]
        p.sub_(self.lr * g)


class AdaGrad(Optimizer):
    r"""Per-coordinate step sizes that shrink with the sum of squared gradients.

    $s \leftarrow s + g^2$;
    $\theta \leftarrow \theta - \eta\, g / (\sqrt{s} + \epsilon)$.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr, weight_decay)
        self.eps = check_number(eps, "eps", low=0)

    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        g = g + self.weight_decay * p
        s = state.setdefault("s", torch.zeros_like(p))
        s.add_(g * g)  # s = s + g^2
        p.sub_(self.lr * g / (s.sqrt() + self.eps))


class RMSprop(Optimizer):
    r"""AdaGrad with a forgetting average of squared gradients instead of a sum.

    $v \leftarrow \alpha v + (1-\alpha) g^2$;
    $\theta \leftarrow \theta - \eta\, g / (\sqrt{v} + \epsilon)$.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr, weight_decay)
        self.alpha = check_number(alpha, "alpha", low=0, high=1, high_open=True)
        self.eps = check_number(eps, "eps", low=0)

    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        g = g + self.weight_decay * p
        v = state.setdefault("v", torch.zeros_like(p))
        v.mul_(self.alpha).add_((1 - self.alpha) * g * g)
        p.sub_(self.lr * g / (v.sqrt() + self.eps))


class Adam(Optimizer):
    r"""Momentum and RMSprop together, with the bias of the zero start corrected.

    $m \leftarrow \beta_1 m + (1-\beta_1) g$,
    $v \leftarrow \beta_2 v + (1-\beta_2) g^2$,
    $\hat m = m / (1-\beta_1^t)$, $\hat v = v / (1-\beta_2^t)$,
    $\theta \leftarrow \theta - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)$.
    ``weight_decay`` here is the L2 penalty, added to the gradient (as torch does).
    """

    decoupled = False

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr, weight_decay)
        self.betas = _check_betas(betas)
        self.eps = check_number(eps, "eps", low=0)

    def moments(
        self, g: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update and return the bias-corrected moments $\\hat m$ and $\\hat v$."""
        beta1, beta2, t = *self.betas, state["t"]
        m = state.setdefault("m", torch.zeros_like(g))
        v = state.setdefault("v", torch.zeros_like(g))
        m.mul_(beta1).add_((1 - beta1) * g)  # first moment: mean of g
        v.mul_(beta2).add_((1 - beta2) * g * g)  # second moment: mean of g^2
        return m / (1 - beta1**t), v / (1 - beta2**t)

    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        if self.decoupled:
            p.mul_(1 - self.lr * self.weight_decay)  # AdamW: shrink theta directly
        else:
            g = g + self.weight_decay * p  # Adam: L2 through the gradient
        m_hat, v_hat = self.moments(g, state)
        p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


class AdamW(Adam):
    r"""Adam with *decoupled* weight decay: $\theta \leftarrow (1-\eta\lambda)\theta$.

    The decay no longer passes through $\hat v$, so every weight shrinks at the same
    rate, whatever its gradient history.
    """

    decoupled = True

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


class RAdam(Adam):
    r"""Adam whose adaptive step is switched on gradually, as the variance allows.

    $\rho_\infty = 2/(1-\beta_2) - 1$ and
    $\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)$ estimate how many
    gradients $v$ holds. While $\rho_t \le 5$ the step is momentum alone,
    $\eta\hat m$; after, it is Adam's step times the rectification
    $r_t = \sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty /
    ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}$.
    """

    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        g = g + self.weight_decay * p
        m_hat, _ = self.moments(g, state)
        beta2, t = self.betas[1], state["t"]
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho_t <= 5:  # too few steps to trust v: momentum SGD
            p.sub_(self.lr * m_hat)
            return
        r_t = math.sqrt(
            (rho_t - 4)
            * (rho_t - 2)
            * rho_inf
            / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        )
        # sqrt(1 - beta2^t) / (sqrt(v) + eps): bias correction outside eps, as torch
        adaptive = math.sqrt(1 - beta2**t) / (state["v"].sqrt() + self.eps)
        p.sub_(self.lr * r_t * m_hat * adaptive)


class Lion(Optimizer):
    r"""EvoLved Sign Momentum: the step is the *sign* of an interpolated momentum.

    $c = \beta_1 m + (1-\beta_1) g$;
    $\theta \leftarrow \theta - \eta\,(\operatorname{sign}(c) + \lambda\theta)$;
    $m \leftarrow \beta_2 m + (1-\beta_2) g$.
    Every coordinate moves by exactly $\eta$ (plus decay), so $\eta$ is 3-10x smaller
    than AdamW's.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr, weight_decay)
        self.betas = _check_betas(betas)

    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict) -> None:
        beta1, beta2 = self.betas
        m = state.setdefault("m", torch.zeros_like(p))
        c = beta1 * m + (1 - beta1) * g  # the direction of this step
        p.sub_(self.lr * (c.sign() + self.weight_decay * p))
        m.mul_(beta2).add_((1 - beta2) * g)  # the momentum, with a longer memory


class _Wrapper:
    """Wraps a dlabc ``optimizer``, sharing its learning rate and gradients."""

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps a dlabc optimizer, "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = value

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


class Lookahead(_Wrapper):
    r"""Wrap any optimizer: after every ``k`` of its steps, pull toward slow weights.

    Fast weights $\theta$ take ``k`` steps of the inner optimizer; then the slow weights
    move part of the way, $\phi \leftarrow \phi + \alpha(\theta - \phi)$, and the fast
    weights restart from them, $\theta \leftarrow \phi$.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        super().__init__(optimizer)
        self.k = check_positive_int(k, "k")
        self.alpha = check_number(alpha, "alpha", low=0, high=1)
        self.slow = [p.detach().clone() for p in optimizer.params]  # phi
        self.steps = 0

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for p, phi in zip(self.optimizer.params, self.slow, strict=True):
                phi.add_(self.alpha * (p - phi))  # slow weights: part of the way
                p.copy_(phi)  # fast weights restart there
        return loss


class SAM(_Wrapper):
    r"""Sharpness-aware minimization: take the gradient at the worst nearby point.

    $\hat\epsilon = \rho\, g / \lVert g\rVert_2$ (the steepest ascent of length $\rho$);
    the gradient $g_{SAM} = \nabla L(\theta + \hat\epsilon)$ is computed there, and the
    inner optimizer steps from $\theta$ with it. Needs a closure that recomputes the
    loss and its gradients, because every step evaluates the loss twice.
    """

    def __init__(self, optimizer: Optimizer, rho: float = 0.05) -> None:
        super().__init__(optimizer)
        self.rho = check_number(rho, "rho", low=0, low_open=True)

    def step(self, closure: Closure | None = None) -> torch.Tensor:
        closure = _check_closure(closure)
        with torch.enable_grad():
            loss = closure()  # gradients at theta
        params = [p for p in self.optimizer.params if p.grad is not None]
        if not params:
            raise RuntimeError("SAM: the closure produced no gradients")
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
            eps = [self.rho * p.grad / (norm + 1e-12) for p in params]
            for p, e in zip(params, eps, strict=True):
                p.add_(e)  # to the worst point within radius rho
        with torch.enable_grad():
            closure()  # gradients at theta + eps
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)  # back to theta, keeping the new gradients
        self.optimizer.step()
        return loss


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return step


def step_decay(step: int, lr: float, step_size: int, gamma: float = 0.1) -> float:
    """Multiply ``lr`` by ``gamma`` every ``step_size`` steps.

    $\\eta_t = \\eta\\,\\gamma^{\\lfloor t/s\\rfloor}$.
    """
    _check_step(step)
    check_number(lr, "lr", low=0)
    check_positive_int(step_size, "step_size")
    check_number(gamma, "gamma", low=0, high=1)
    return lr * gamma ** (step // step_size)


def cosine(step: int, lr: float, total_steps: int, min_lr: float = 0.0) -> float:
    """Half a cosine from ``lr`` at step 0 down to ``min_lr`` at ``total_steps``."""
    _check_step(step)
    check_number(lr, "lr", low=0)
    check_positive_int(total_steps, "total_steps")
    check_number(min_lr, "min_lr", low=0, high=lr)
    progress = min(step, total_steps) / total_steps
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def warmup_cosine(
    step: int, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps`` steps, then :func:`cosine` decay.

    Checks the arguments, then computes :func:`_warmup_cosine`.
    """
    _check_step(step)
    check_number(min_lr, "min_lr", low=0, high=check_number(lr, "lr", low=0))
    check_positive_int(warmup_steps, "warmup_steps")
    check_positive_int(total_steps, "total_steps")
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be less than "
            f"total_steps ({total_steps})"
        )
    return _warmup_cosine(step, lr, warmup_steps, total_steps, min_lr)


def _warmup_cosine(
    step: int, lr: float, warmup_steps: int, total_steps: int, min_lr: float
) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps`` steps, then :func:`cosine` decay.

    Step ``t < warmup_steps`` uses ``lr * (t + 1) / warmup_steps``, so the last warm-up
    step reaches ``lr``; the cosine then runs over the remaining steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, lr, total_steps - warmup_steps, min_lr)


def rosenbrock(xy: torch.Tensor, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    """The Rosenbrock valley $(a-x)^2 + b(y-x^2)^2$, minimum 0 at $(a, a^2)$.

    ``xy`` has shape ``(..., 2)``; the result has shape ``(...)``.
    """
    if not isinstance(xy, torch.Tensor) or xy.shape[-1:] != (2,):
        shape = tuple(xy.shape) if isinstance(xy, torch.Tensor) else type(xy).__name__
        raise ValueError(f"xy must be a tensor of shape (..., 2), got {shape}")
    x, y = xy[..., 0], xy[..., 1]
    return (a - x) ** 2 + b * (y - x**2) ** 2


def run_on_surface(
    make_optimizer: Callable[[list[torch.Tensor]], object],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    start: tuple[float, float],
    steps: int,
) -> torch.Tensor:
    """Minimise ``loss_fn`` from ``start``; return the path ``(steps + 1, 2)``.

    A run that diverges stops at the first point that is not finite (inf or nan, which
    no later step can leave), so its path is shorter and ends at that point.
    """
    check_positive_int(steps, "steps")
    point = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([point])
    path = [point.detach().clone()]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(point)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
        path.append(point.detach().clone())
        if not torch.isfinite(path[-1]).all():
            break  # diverged: every later point would be inf or nan too
    return torch.stack(path)
