"""Training techniques: dropout, weight decay, clipping, accumulation, early stopping.

Chapter: ``book/foundations/training_techniques.md``.

References:
- Srivastava et al. (2014), JMLR, *Dropout* (here in its "inverted" form, which scales
  at training time so that evaluation is the identity).
- Krogh & Hertz (1991), NeurIPS, *A Simple Weight Decay Can Improve Generalization*;
  Loshchilov & Hutter (2019), ICLR, *Decoupled Weight Decay Regularization*.
- Pascanu, Mikolov & Bengio (2013), ICML, *On the difficulty of training recurrent
  neural networks* (clipping by the global norm).
- Prechelt (1998), *Early Stopping -- But When?*
- Micikevicius et al. (2018), ICLR, *Mixed Precision Training*; Kalamkar et al. (2019),
  *A Study of BFLOAT16 for Deep Learning Training*.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.train import History

__all__ = [
    "dropout",
    "Dropout",
    "l2_penalty",
    "clip_grad_norm",
    "accumulate_gradients",
    "EarlyStopping",
]


def _check_dropout(x: object, p: float) -> float:
    check_tensor(x, "x", floating=True)
    return check_number(p, "p", low=0, high=1)


def dropout(
    x: torch.Tensor,
    p: float,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by $1/(1-p)$.

    The scaling keeps the expected value of every element unchanged, so in evaluation
    (``training=False``) dropout is simply the identity.
    """
    p = _check_dropout(x, p)
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0.0  # zeros that stay in the graph, as F.dropout's do
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p  # 1 - p kept
    return x * keep / (1 - p)


class Dropout(nn.Module):
    """:func:`dropout` as a layer: active in ``train()``, the identity in ``eval()``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_number(p, "p", low=0, high=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def l2_penalty(parameters: Iterable[torch.Tensor], weight_decay: float) -> torch.Tensor:
    r"""$\frac{\lambda}{2}\sum_i \lVert w_i\rVert^2$, whose gradient is $\lambda w$."""
    weight_decay = check_number(weight_decay, "weight_decay", low=0)
    parameters = list(parameters)
    if not parameters:
        raise ValueError("parameters is empty")
    return weight_decay / 2 * sum((w**2).sum() for w in parameters)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    r"""Scale all gradients by $\min(1, c / \lVert g\rVert)$; return $\lVert g\rVert$.

    $\lVert g\rVert$ is the norm of all gradients together, before clipping.

    Rescaling keeps the direction of the step and only limits its length.
    """
    max_norm = check_number(max_norm, "max_norm", low=0, low_open=True)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))  # global L2 norm
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(scale)
    return total.item()


def _check_micro_batches(X: object, y: object, micro_batches: int) -> None:
    check_tensor(X, "X")
    check_tensor(y, "y")
    check_positive_int(micro_batches, "micro_batches")
    if len(X) != len(y):
        raise ValueError(f"X and y differ in length: {len(X)} and {len(y)}")
    if micro_batches > len(X):
        raise ValueError(
            f"micro_batches ({micro_batches}) exceeds the batch size ({len(X)})"
        )


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    micro_batches: int,
) -> float:
    """Back-propagate the mean loss over ``(X, y)`` in ``micro_batches`` pieces.

    Each piece's mean loss is weighted by its share of the examples, so the
    accumulated ``.grad`` equals that of one backward pass over the whole batch, while
    only one piece is in memory at a time. ``loss_fn`` must average over its batch.
    Gradients are added to what ``.grad`` holds (call ``zero_grad`` first).
    Returns the whole batch's loss.
    """
    _check_micro_batches(X, y, micro_batches)
    total = 0.0
    for xb, yb in zip(
        X.tensor_split(micro_batches), y.tensor_split(micro_batches), strict=True
    ):
        weight = len(xb) / len(X)  # this piece's share of the mean
        loss = loss_fn(model(xb), yb) * weight
        loss.backward()  # adds to .grad
        total += loss.item()
    return total


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def _check_test_loss(history: History) -> None:
    if not history.test_loss:
        raise ValueError("EarlyStopping needs a test set: pass test=(X, y) to fit")


def _check_recorded(state: dict | None) -> dict:
    if state is None:
        raise RuntimeError("no epoch has been recorded yet")
    return state


class EarlyStopping:
    """Stop when the test (validation) loss has not improved for ``patience`` epochs.

    Use as ``fit(..., callback=EarlyStopping(model, patience))``; it keeps a copy of the
    best weights, and :meth:`restore` puts them back into the model.
    """

    def __init__(self, model: nn.Module, patience: int, min_delta: float = 0.0):
        self.model = _check_module(model)
        self.patience = check_positive_int(patience, "patience")
        self.min_delta = check_number(min_delta, "min_delta", low=0)
        self.best_loss = float("inf")
        self.best_epoch = -1
        self.best_state: dict | None = None

    def __call__(self, epoch: int, history: History) -> bool:
        _check_test_loss(history)
        loss = history.test_loss[-1]
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch = loss, epoch
            self.best_state = copy.deepcopy(self.model.state_dict())
        return epoch - self.best_epoch >= self.patience  # True: stop training

    def restore(self) -> None:
        """Load the weights of the best epoch back into the model."""
        self.model.load_state_dict(_check_recorded(self.best_state))
