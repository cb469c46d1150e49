"""The training loops the chapters share: mini-batches, evaluation, ``fit`` and
``train_steps``.

Every chapter that trains a small classifier calls :func:`fit` instead of writing its
own loop, so that the only thing that differs between two experiments is the thing the
chapter is about (the optimizer, the normalization, the activation, the regularizer).
Models whose batch is more than one ``(X, y)`` pair (a sequence model that reads its
target shifted, a language model on random windows) call :func:`train_steps`, which
runs the same step for a number of steps over any stream of batches.

``fit`` works with ``torch.optim`` optimizers and with the book's own
(``dlabc.foundations.optimizers``): it calls ``optimizer.step(closure)``, the form that
every optimizer accepts and that SAM needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "History",
    "minibatches",
    "endless_minibatches",
    "evaluate",
    "set_lr",
    "fit",
    "train_steps",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class History:
    """What :func:`fit` and :func:`train_steps` measured.

    ``fit`` fills one entry per epoch in the four ``train_*``/``test_*`` lists;
    ``train_steps`` fills ``eval_steps`` (after how many steps it evaluated) and one
    list per metric in ``metrics``. Both record the loss and learning rate of every
    step.
    """

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)


def minibatches(
    n: int, batch_size: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Split a random permutation of ``range(n)`` into index batches of ``batch_size``.

    The last batch is smaller when ``batch_size`` does not divide ``n``.
    """
    check_positive_int(n, "n")
    check_positive_int(batch_size, "batch_size")
    return list(torch.randperm(n, generator=generator).split(batch_size))


def endless_minibatches(
    n: int, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """:func:`minibatches` of one shuffled epoch after another, without end.

    The stream to give :func:`train_steps` when the data is a fixed set of ``n``
    examples.
    """
    check_positive_int(n, "n")
    check_positive_int(batch_size, "batch_size")
    return itertools.chain.from_iterable(
        minibatches(n, batch_size, generator) for _ in itertools.count()
    )


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
    _check_step_options(optimizer, clip_norm, autocast_dtype)
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
            _step(
                optimizer,
                lambda xb=xb, yb=yb: loss_fn(model(xb), yb),
                parameters,
                xb.device.type,
                clip_norm,
                autocast_dtype,
                history,
            )
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


def train_steps(
    model: nn.Module,
    optimizer: object,
    batches: Iterable[object],
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    steps: int,
    lr_schedule: Callable[[int], float] | None = None,
    clip_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    evaluate_every: int | None = None,
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
) -> History:
    """Train ``model`` for ``steps`` steps, one batch of ``batches`` per step.

    A batch is whatever ``loss_fn(model, batch)`` understands (a tuple of tensors, an
    index tensor into the data...); ``loss_fn`` returns the scalar loss to minimize.
    ``batches`` must yield at least ``steps`` batches (:func:`endless_minibatches` or a
    generator of fresh examples never ends). ``lr_schedule``, ``clip_norm`` and
    ``autocast_dtype`` act as in :func:`fit`.

    With ``evaluate_fn`` (a function of the model returning named numbers), the model
    is evaluated before the first step, after every ``evaluate_every`` steps and after
    the last, in evaluation mode and without gradients; the results go to
    ``history.metrics`` and the step counts to ``history.eval_steps``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_positive_int(steps, "steps")
    _check_step_options(optimizer, clip_norm, autocast_dtype)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    if (evaluate_every is None) != (evaluate_fn is None):
        raise ValueError("evaluate_every and evaluate_fn must be given together")
    if evaluate_every is not None:
        check_positive_int(evaluate_every, "evaluate_every")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model has no trainable parameters")
    device_type = parameters[0].device.type
    history = History()

    def run_evaluation(step: int) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                results = evaluate_fn(model)
        finally:
            model.train(was_training)
        if not isinstance(results, dict):
            raise TypeError(f"evaluate_fn must return a dict, got {results!r}")
        history.eval_steps.append(step)
        for name, value in results.items():
            history.metrics.setdefault(name, []).append(float(value))

    if evaluate_fn is not None:
        run_evaluation(0)
    model.train()
    stream = iter(batches)
    for step in range(steps):
        try:
            batch = next(stream)
        except StopIteration:
            raise ValueError(
                f"batches ran out after {step} batches; steps={steps} were asked"
            ) from None
        if lr_schedule is not None:
            set_lr(optimizer, lr_schedule(step))
        _step(
            optimizer,
            lambda batch=batch: loss_fn(model, batch),
            parameters,
            device_type,
            clip_norm,
            autocast_dtype,
            history,
        )
        done = step + 1
        if evaluate_fn is not None and (done % evaluate_every == 0 or done == steps):
            run_evaluation(done)
    return history


def _check_step_options(
    optimizer: object, clip_norm: float | None, autocast_dtype: torch.dtype | None
) -> None:
    if clip_norm is not None:
        check_number(clip_norm, "clip_norm", low=0, low_open=True)
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        raise TypeError(f"autocast_dtype must be a torch.dtype, got {autocast_dtype!r}")
    if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
        raise TypeError(f"optimizer must have step and zero_grad, got {optimizer!r}")


def _step(
    optimizer: object,
    compute_loss: Callable[[], torch.Tensor],
    parameters: list[torch.Tensor],
    device_type: str,
    clip_norm: float | None,
    autocast_dtype: torch.dtype | None,
    history: History,
) -> None:
    """One optimizer step through a closure (the form every optimizer accepts and SAM
    needs): forward under autocast if asked, backward, clip, step; log loss and lr."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.autocast(
            device_type, autocast_dtype, enabled=autocast_dtype is not None
        ):
            loss = compute_loss()
        loss.backward()
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(parameters, clip_norm)
        return loss

    loss = optimizer.step(closure)
    history.step_loss.append(float(loss.detach()))
    history.lr.append(_current_lr(optimizer))


def _current_lr(optimizer: object) -> float:
    if hasattr(optimizer, "param_groups"):
        return float(optimizer.param_groups[0]["lr"])
    return float(getattr(optimizer, "lr", float("nan")))
