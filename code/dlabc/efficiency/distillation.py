r"""Knowledge distillation: a small student trained on a large teacher's soft targets.

Chapter: ``book/efficiency/distillation.md``.

References:
- Hinton, Vinyals & Dean (2015), *Distilling the Knowledge in a Neural Network*
  (soft targets at a temperature $T$, the $T^2$ factor, matching logits as the
  high-temperature limit).
- Buciluǎ, Caruana & Niculescu-Mizil (2006), *Model Compression* (a small model trained
  on a large model's outputs on unlabelled data).

Shapes: ``B`` examples, ``C`` classes; logits are ``(B, C)``. The KL divergence is
averaged over the batch ("batchmean"), as ``F.kl_div(..., reduction="batchmean")``.
``train_classifier`` is also the training loop of ``book/efficiency/pruning.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.train import History, endless_minibatches, train_steps

__all__ = [
    "soft_target_loss",
    "distillation_loss",
    "soft_target_gradient",
    "student_mlp",
    "train_classifier",
]


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float
) -> torch.Tensor:
    r"""$T^2 \cdot \mathrm{KL}(p_t^T \,\|\, p_s^T)$, averaged over the batch, where
    $p^T = \operatorname{softmax}(z / T)$: the soft term of Hinton et al.'s loss."""
    _check_logits(student_logits, teacher_logits)
    check_number(T, "T", low=0, low_open=True)
    return _soft_target_loss(student_logits, teacher_logits, T)


def _soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float
) -> torch.Tensor:
    r"""$T^2 \frac1B \sum_b \sum_c p^T_{t,bc}\,(\log p^T_{t,bc} - \log p^T_{s,bc})$,
    ``(B, C), (B, C) -> ()``."""
    log_p_s = F.log_softmax(student_logits / T, dim=-1)  # log softmax(z_s / T)
    log_p_t = F.log_softmax(teacher_logits / T, dim=-1)  # log softmax(z_t / T)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # KL(p_t ‖ p_s), (B,)
    return T**2 * kl.mean()  # T² keeps the gradient's size as T grows


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    alpha: float,
) -> torch.Tensor:
    r"""Hinton et al.'s loss on one batch:
    $\alpha\, T^2\, \mathrm{KL}(p_t^T \,\|\, p_s^T) + (1 - \alpha)\,
    \mathrm{CE}(z_s, y)$."""
    _check_logits(student_logits, teacher_logits)
    check_tensor(labels, "labels", ndim=1, dtype=torch.long)
    if len(labels) != len(student_logits):
        raise ValueError(
            f"labels must have one entry per example: {len(labels)} labels for "
            f"{len(student_logits)} examples"
        )
    check_number(T, "T", low=0, low_open=True)
    check_number(alpha, "alpha", low=0, high=1)
    return _distillation_loss(student_logits, teacher_logits, labels, T, alpha)


def _distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    alpha: float,
) -> torch.Tensor:
    r"""$\alpha\, T^2\, \mathrm{KL}(p_t^T \,\|\, p_s^T) + (1 - \alpha)\,
    \mathrm{CE}(z_s, y)$; the cross-entropy is at temperature 1."""
    soft = _soft_target_loss(student_logits, teacher_logits, T)  # the teacher's term
    hard = F.cross_entropy(student_logits, labels)  # the labels' term
    return alpha * soft + (1 - alpha) * hard


def soft_target_gradient(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float
) -> torch.Tensor:
    r"""The closed-form gradient ``(B, C)`` of the batch-summed
    $\mathrm{KL}(p_t^T \,\|\, p_s^T)$ (no $T^2$) with respect to the student's logits:
    $(p_s^T - p_t^T) / T$."""
    _check_logits(student_logits, teacher_logits)
    check_number(T, "T", low=0, low_open=True)
    return _soft_target_gradient(student_logits, teacher_logits, T)


def _soft_target_gradient(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float
) -> torch.Tensor:
    r"""$\partial \sum_b \mathrm{KL}(p_{t,b}^T \,\|\, p_{s,b}^T) / \partial z_s
    = (p_s^T - p_t^T) / T$, ``(B, C), (B, C) -> (B, C)``."""
    p_s = F.softmax(student_logits / T, dim=-1)
    p_t = F.softmax(teacher_logits / T, dim=-1)
    return (p_s - p_t) / T


def student_mlp(
    hidden: int = 32, n_classes: int = 10, n_pixels: int = 784
) -> nn.Module:
    """The chapter's student: flatten, one hidden ReLU layer, the class scores."""
    for name, n in (
        ("hidden", hidden),
        ("n_classes", n_classes),
        ("n_pixels", n_pixels),
    ):
        check_positive_int(n, name)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(n_pixels, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    transfer: tuple[torch.Tensor, torch.Tensor] | None = None,
    T: float = 4.0,
    alpha: float = 0.9,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> History:
    r"""Train ``model`` with Adam for ``steps`` steps on the labelled ``(X, y)``.

    Without ``transfer`` the loss is the cross-entropy on labelled batches. With
    ``transfer = (X_u, z_t)``, images and the teacher's logits on them (the *transfer
    set*, which need not be labelled), each step also draws a batch from it and the loss
    is $\alpha\, T^2\, \mathrm{KL}(p_t^T \,\|\, p_s^T)$ on the transfer batch plus
    $(1 - \alpha)$ times the cross-entropy on the labelled batch.
    """
    check_tensor(X, "X", floating=True)
    check_tensor(y, "y", ndim=1, dtype=torch.long)
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(
            f"X and y must be non-empty, of one length: {len(X)}, {len(y)}"
        )
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    check_number(T, "T", low=0, low_open=True)
    check_number(alpha, "alpha", low=0, high=1)
    if transfer is not None:
        X_u, z_t = transfer
        check_tensor(X_u, "transfer images", floating=True)
        _check_logits(z_t, z_t)
        if len(X_u) != len(z_t):
            raise ValueError(
                f"transfer images and logits differ: {len(X_u)}, {len(z_t)}"
            )
    return _train_classifier(
        model, X, y, steps, transfer, float(T), float(alpha), batch_size, lr, seed
    )


def _train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    transfer: tuple[torch.Tensor, torch.Tensor] | None,
    T: float,
    alpha: float,
    batch_size: int,
    lr: float,
    seed: int,
) -> History:
    r"""Adam on the cross-entropy of labelled batches, or, with a transfer set, on
    $\alpha\, T^2\, \mathrm{KL}(p_t^T \,\|\, p_s^T)$ (transfer batch) $+ (1 -
    \alpha)\, \mathrm{CE}$ (labelled batch)."""
    generator = torch.Generator().manual_seed(seed)
    labelled = endless_minibatches(len(X), batch_size, generator)  # index batches
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if transfer is None:  # plain training on the labels

        def hard_loss(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(X[index]), y[index])

        return train_steps(model, optimizer, labelled, hard_loss, steps=steps)
    X_u, z_t = transfer  # images, and the teacher's logits on them
    unlabelled = endless_minibatches(len(X_u), batch_size, generator)

    def kd_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        index, u = batch  # a labelled batch and a transfer batch
        soft = _soft_target_loss(model(X_u[u]), z_t[u], T)  # T² KL(p_t ‖ p_s)
        hard = F.cross_entropy(model(X[index]), y[index])  # CE(z_s, y)
        return alpha * soft + (1 - alpha) * hard

    batches = zip(labelled, unlabelled, strict=False)
    return train_steps(model, optimizer, batches, kd_loss, steps=steps)


def _check_logits(student_logits: object, teacher_logits: object) -> None:
    check_tensor(student_logits, "student_logits", ndim=2, floating=True)
    check_tensor(teacher_logits, "teacher_logits", ndim=2, floating=True)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
