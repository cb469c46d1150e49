"""The training loop the chapters share: mini-batches, evaluation, and ``fit``.

Every chapter that trains a small classifier calls :func:`fit` instead of writing its
own loop, so that the only thing that differs between two experiments is the thing the
chapter is about (the optimizer, the normalization, the activation, the regularizer).

``fit`` works with ``torch.optim`` optimizers and with the book's own
(``dlabc.foundations.optimizers``): it calls ``optimizer.step(closure)``, the form that
every optimizer accepts and that SAM needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = ["History", "minibatches", "evaluate", "set_lr", "fit"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class History:
    """What :func:`fit` measured: one entry per epoch, and the loss of every step."""

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def minibatches(
    n: int, batch_size: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Split a random permutation of ``range(n)`` into index batches of ``batch_size``.

    The last batch is smaller when ``batch_size`` does not divide ``n``.
    """
    check_positive_int(n, "n")
    check_positive_int(batch_size, "batch_size")
    return list(torch.randperm(n, generator=generator).split(batch_size))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(X, y)``, in evaluation mode.

    The model's previous mode (training or evaluation) is restored afterwards.
    """
    check_tensor(X, "X")
    check_tensor(y, "y", ndim=1, dtype=torch.long)
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(
            "X and y must be non-empty and of the same length, "
            f"got {len(X)} and {len(y)}"
        )
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, len(X), batch_size):
            logits = model(X[start : start + batch_size])  # (B, C)
            target = y[start : start + batch_size]
            total_loss += loss_fn(logits, target).item() * len(target)
            correct += (logits.argmax(-1) == target).sum().item()
    finally:
        model.train(was_training)
    return total_loss / len(X), correct / len(X)


def set_lr(optimizer: object, lr: float) -> None:
    """Set the learning rate of a ``torch.optim`` optimizer or of one of the book's."""
    check_number(lr, "lr", low=0)
    if hasattr(optimizer, "param_groups"):
        for group in optimizer.param_groups:
            group["lr"] = lr
    elif hasattr(optimizer, "lr"):
        optimizer.lr = lr
    else:
        raise TypeError(f"{type(optimizer).__name__} has no learning rate to set")


def fit(
    model: nn.Module,
    optimizer: object,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    epochs: int,
    batch_size: int = 64,
    loss_fn: LossFn = F.cross_entropy,
    lr_schedule: Callable[[int], float] | None = None,
    clip_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    callback: Callable[[int, History], bool | None] | None = None,
    seed: int = 0,
    evaluate_train: bool = True,
) -> History:
    """Train ``model`` for ``epochs`` passes over ``train = (X, y)`` with mini-batches.

    - ``lr_schedule(step)`` (optional) gives the learning rate of every step, counted
      from 0 over the whole run.
    - ``clip_norm`` (optional) rescales the gradients so that their global norm is at
      most this value, before each step.
    - ``autocast_dtype`` (optional, e.g. ``torch.bfloat16``) runs the forward pass in
      mixed precision with ``torch.autocast``; the weights stay float32.
    - After every epoch the loss and accuracy on the whole training set and on ``test``
      are measured in evaluation mode; then ``callback(epoch, history)`` runs, and
      training stops early when it returns ``True``. With ``evaluate_train=False`` the
      pass over the training set is skipped (it costs a third of an epoch; the
      per-step ``step_loss`` still shows the training loss), and ``train_loss`` and
      ``train_accuracy`` stay empty.
    """
    for name, pair in (("train", train), ("test", test)):
        if pair is None and name == "test":
            continue
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"{name} must be a tuple (X, y)")
        check_tensor(pair[0], f"{name} X")
        check_tensor(pair[1], f"{name} y", ndim=1, dtype=torch.long)
        if len(pair[0]) != len(pair[1]) or len(pair[0]) == 0:
            raise ValueError(
                f"{name} X and y must be non-empty and of the same length, "
                f"got {len(pair[0])} and {len(pair[1])}"
            )
    X, y = train
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if clip_norm is not None:
        check_number(clip_norm, "clip_norm", low=0, low_open=True)
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        raise TypeError(f"autocast_dtype must be a torch.dtype, got {autocast_dtype!r}")
    if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
        raise TypeError(f"optimizer must have step and zero_grad, got {optimizer!r}")
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    history = History()
    step = 0
    for epoch in range(epochs):
        model.train()
        for index in minibatches(len(X), batch_size, generator):
            index = index.to(X.device)
            xb, yb = X[index], y[index]
            if lr_schedule is not None:
                set_lr(optimizer, lr_schedule(step))

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                optimizer.zero_grad()
                with torch.autocast(
                    xb.device.type, autocast_dtype, enabled=autocast_dtype is not None
                ):
                    loss = loss_fn(model(xb), yb)
                loss.backward()
                if clip_norm is not None:
                    nn.utils.clip_grad_norm_(parameters, clip_norm)
                return loss

            loss = optimizer.step(closure)
            history.step_loss.append(float(loss.detach()))
            history.lr.append(_current_lr(optimizer))
            step += 1
        if evaluate_train:
            loss, accuracy = evaluate(model, X, y, loss_fn)
            history.train_loss.append(loss)
            history.train_accuracy.append(accuracy)
        if test is not None:
            loss, accuracy = evaluate(model, *test, loss_fn)
            history.test_loss.append(loss)
            history.test_accuracy.append(accuracy)
        if callback is not None and callback(epoch, history):
            break
    return history


def _current_lr(optimizer: object) -> float:
    if hasattr(optimizer, "param_groups"):
        return float(optimizer.param_groups[0]["lr"])
    return float(getattr(optimizer, "lr", float("nan")))
