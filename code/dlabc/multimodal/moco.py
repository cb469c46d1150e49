r"""MoCo: momentum contrast. A query encoder trained by InfoNCE against a queue of
negative keys, and a key encoder that follows it as an exponential moving average.

Chapter: ``book/multimodal/moco.md``.

References:
- He, Fan, Wu, Xie & Girshick (2020), *Momentum Contrast for Unsupervised Visual
  Representation Learning*, CVPR (the queue of keys, the momentum key encoder, the
  InfoNCE loss with the queue as negatives).
- Chen, Fan, Girshick & He (2020), *Improved Baselines with Momentum Contrastive
  Learning*, arXiv:2003.04297 (MoCo v2: an MLP projection head, stronger augmentation,
  temperature 0.2).

Shapes: a batch of ``B`` images, embeddings of ``d`` numbers (unit length), a queue of
``K`` keys. The views, the encoder and the linear probe are the SimCLR chapter's
(``dlabc.multimodal.simclr``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.multimodal.simclr import augment
from dlabc.train import endless_minibatches, train_steps

__all__ = [
    "momentum_update",
    "KeyQueue",
    "moco_loss",
    "MoCo",
    "train_moco",
    "queue_consistency",
]


# ------------------------------------------------------------- the momentum update


def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, m: float) -> None:
    r"""Move ``key_encoder``'s parameters towards ``query_encoder``'s, in place:
    $\theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q$, with ``m`` in [0, 1].

    ``m = 0`` copies the query encoder; ``m = 1`` freezes the key encoder. The two
    encoders must have the same parameters (names and shapes)."""
    if not isinstance(key_encoder, nn.Module) or not isinstance(
        query_encoder, nn.Module
    ):
        raise TypeError("key_encoder and query_encoder must be nn.Modules")
    m = check_number(m, "m", low=0.0, high=1.0)
    keys = [(n, p.shape) for n, p in key_encoder.named_parameters()]
    queries = [(n, p.shape) for n, p in query_encoder.named_parameters()]
    if keys != queries:
        raise ValueError(
            "key_encoder and query_encoder must have the same parameters "
            "(names and shapes)"
        )
    _momentum_update(key_encoder, query_encoder, m)


def _momentum_update(
    key_encoder: nn.Module, query_encoder: nn.Module, m: float
) -> None:
    r"""$\theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q$, parameter by parameter;
    no gradient flows into $\theta_k$ (it is never trained by backpropagation)."""
    pairs = zip(key_encoder.parameters(), query_encoder.parameters(), strict=True)
    with torch.no_grad():
        for theta_k, theta_q in pairs:
            theta_k.mul_(m).add_(theta_q, alpha=1 - m)  # m θ_k + (1 − m) θ_q


# ---------------------------------------------------------------------- the queue


class KeyQueue(nn.Module):
    r"""A first-in, first-out queue of the ``size`` most recent keys, ``(size, dim)``.

    Stored as a ring buffer: ``enqueue`` writes the newest keys over the oldest ones,
    at the pointer, and moves the pointer on; no key is ever copied twice. It starts
    full of random unit vectors, as in MoCo. ``ordered()`` returns the keys oldest
    first."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.size = check_positive_int(size, "size")
        self.dim = check_positive_int(dim, "dim")
        start = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("keys", start)  # (K, d)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # oldest slot

    def enqueue(self, keys: torch.Tensor) -> None:
        """Append ``keys`` ``(B, dim)`` (``B`` at most ``size``); the ``B`` oldest keys
        leave the queue."""
        check_tensor(keys, "keys", ndim=2, floating=True)
        if keys.shape[1] != self.dim or keys.shape[0] > self.size:
            raise ValueError(
                f"keys must have shape (B, {self.dim}) with B <= {self.size}, "
                f"got {tuple(keys.shape)}"
            )
        self._enqueue(keys.detach())

    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write the ``B`` new keys over the ``B`` oldest, at the pointer and after it
        (wrapping around the ring), and move the pointer to the next oldest key."""
        slots = (self.ptr + torch.arange(len(keys), device=keys.device)) % self.size
        with torch.no_grad():  # the queue is data, not part of the graph
            self.keys.index_copy_(0, slots, keys.to(self.keys.dtype))  # out and in
            self.ptr.copy_((self.ptr + len(keys)) % self.size)  # the next oldest slot

    def ordered(self) -> torch.Tensor:
        """The keys ``(size, dim)``, oldest first, newest last."""
        order = (
            self.ptr + torch.arange(self.size, device=self.keys.device)
        ) % self.size
        return self.keys[order]


# ------------------------------------------------------------------ the loss


def moco_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    r"""InfoNCE with a queue, averaged over the batch:
    $-\log \frac{\exp(q \cdot k_+ / \tau)}{\exp(q \cdot k_+ / \tau) + \sum_{i=1}^{K}
    \exp(q \cdot k_i / \tau)}$.

    ``q`` ``(B, d)``: the queries; ``k`` ``(B, d)``: their positive keys (row by row);
    ``queue`` ``(K, d)``: the negative keys. All are expected to be unit vectors (the
    loss does not normalise them). ``temperature`` > 0."""
    check_tensor(q, "q", ndim=2, floating=True)
    check_tensor(k, "k", ndim=2, floating=True)
    check_tensor(queue, "queue", ndim=2, floating=True)
    if k.shape != q.shape or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"q and k must have the same shape (B, d) and queue (K, d), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}"
        )
    temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
    return _moco_loss(q, k, queue, temperature)


def _moco_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""InfoNCE with the queue (eq. `eq-moco-loss`), the mean over the batch of

    $\mathcal L_q = -\frac{q \cdot k_+}{\tau} + \log\Big(\exp\frac{q \cdot
    k_+}{\tau} + \sum_{i=1}^{K} \exp\frac{q \cdot k_i}{\tau}\Big)$:

    the cross-entropy of a $(1 + K)$-way classification whose right answer is
    class 0, the positive key."""
    l_pos = (q * k).sum(dim=1, keepdim=True)  # q · k₊, (B, 1)
    l_neg = q @ queue.T  # q · kᵢ for every key of the queue, (B, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (B, 1 + K)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()  # −log softmax₀


# ------------------------------------------------------------------ the model


class MoCo(nn.Module):
    r"""Momentum contrast around an ``encoder`` that maps images to ``(B, d)``.

    ``encoder_q`` (the query encoder) is ``encoder`` itself and is trained by
    backpropagation; ``encoder_k`` (the key encoder) starts as a copy and follows it by
    $\theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q$ before every batch of keys.
    ``queue`` holds the ``queue_size`` most recent keys, the negatives.
    ``forward(x_q, x_k)`` takes two views of the same ``B`` images and returns the
    loss; it also updates the key encoder and the queue."""

    def __init__(
        self,
        encoder: nn.Module,
        dim: int,
        queue_size: int = 2048,
        m: float = 0.99,
        temperature: float = 0.2,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder must be an nn.Module, got {type(encoder).__name__}"
            )
        self.m = check_number(m, "m", low=0.0, high=1.0)
        self.temperature = check_number(
            temperature, "temperature", low=0.0, low_open=True
        )
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        self.encoder_k.requires_grad_(False)  # trained only by the momentum update
        self.queue = KeyQueue(queue_size, check_positive_int(dim, "dim"), generator)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        r"""The loss of one batch: two views ``x_q``, ``x_k`` ``(B, C, H, W)`` of the
        same images; the momentum update $\theta_k \leftarrow m\,\theta_k + (1 -
        m)\,\theta_q$, then InfoNCE (eq. `eq-moco-loss`) of the queries against their
        keys and the queue, then the keys enter the queue."""
        q = F.normalize(self.encoder_q(x_q), dim=1)  # queries, (B, d)
        with torch.no_grad():  # stop-gradient: keys are constants for the loss
            _momentum_update(self.encoder_k, self.encoder_q, self.m)
            k = F.normalize(self.encoder_k(x_k), dim=1)  # positive keys, (B, d)
        negatives = self.queue.keys.clone()  # a snapshot: the queue changes below
        loss = _moco_loss(q, k, negatives, self.temperature)
        self.queue._enqueue(k)  # newest keys in, oldest out
        return loss


# --------------------------------------------------------------- training


def train_moco(
    model: MoCo,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    augment: Callable[..., torch.Tensor] = augment,
    watch: int = 0,
) -> dict[str, object]:
    r"""Train ``model`` on unlabelled ``images`` ``(n, C, H, W)`` for ``steps`` Adam
    steps of ``batch_size`` images, two ``augment``-ed views each (query and key): the
    data, views, optimizer and batches of the SimCLR chapter's ``train_simclr``.
    ``seed`` picks the batches and the views.

    Returns ``loss`` (per step), ``drift`` (per step, the relative change of the key
    encoder's parameters $\lVert \Delta\theta_k \rVert / \lVert \theta_k \rVert$)
    and, with ``watch > 0``, ``views`` ``(watch, batch_size, C, H, W)``: the key views
    of the last ``watch`` steps, oldest first, for :func:`queue_consistency`.
    ``batch_size`` must divide ``n`` (every batch is full)."""
    if not isinstance(model, MoCo):
        raise TypeError(f"model must be a MoCo, got {type(model).__name__}")
    check_tensor(images, "images", ndim=4, floating=True)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    if not callable(augment):
        raise TypeError("augment must be callable")
    if len(images) % batch_size or batch_size > model.queue.size:
        raise ValueError(
            f"batch_size must divide the number of images ({len(images)}) and be at "
            f"most the queue's size ({model.queue.size}), got {batch_size}"
        )
    if isinstance(watch, bool) or not isinstance(watch, int) or watch < 0:
        raise ValueError(f"watch must be a non-negative int, got {watch!r}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.encoder_q.parameters(), lr=lr)
    batches = endless_minibatches(len(images), batch_size, generator)
    drift, views = [], []

    def loss_fn(model: MoCo, index: torch.Tensor) -> torch.Tensor:
        before = parameters_to_vector(model.encoder_k.parameters())
        x_q = augment(images[index], generator)  # the query view of each image
        x_k = augment(images[index], generator)  # the key view, drawn independently
        loss = model(x_q, x_k)  # also updates θ_k and the queue
        after = parameters_to_vector(model.encoder_k.parameters())
        drift.append((after - before).norm() / after.norm())
        if watch:
            views[:] = (views + [x_k])[-watch:]
        return loss

    history = train_steps(model, optimizer, batches, loss_fn, steps=steps)
    result: dict[str, object] = {
        "loss": history.step_loss,
        "drift": torch.stack(drift).tolist(),
    }
    if watch:
        result["views"] = torch.stack(views)  # (watch, B, C, H, W)
    return result


@torch.no_grad()
def queue_consistency(model: MoCo, views: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(S, B)`` between the newest ``S * B`` keys of the queue and
    the keys the key encoder gives the same views now.

    ``views`` ``(S, B, C, H, W)``: the key views of the last ``S`` training batches,
    oldest first (``train_moco(..., watch=S)`` keeps them). Each batch is encoded again
    as the batch it was (batch normalisation sees the same images), by a copy of the
    key encoder, so the model's running statistics stay as they are. 1 where a
    queued key is still what the key encoder would say; row ``s`` is ``S - 1 - s``
    steps old."""
    if not isinstance(model, MoCo):
        raise TypeError(f"model must be a MoCo, got {type(model).__name__}")
    check_tensor(views, "views", ndim=5, floating=True)
    S, B = views.shape[:2]
    if S * B > model.queue.size:
        raise ValueError(f"{S * B} views exceed the queue's {model.queue.size} keys")
    encoder = copy.deepcopy(model.encoder_k).train()
    fresh = torch.stack([F.normalize(encoder(v), dim=1) for v in views])  # (S, B, d)
    stored = model.queue.ordered()[-S * B :].reshape(S, B, -1)  # oldest first
    return (fresh * stored).sum(dim=2)
