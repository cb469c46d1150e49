r"""Scaling laws: how the loss of a language model falls with its size and its data.

Chapter: ``book/scaling/scaling_laws.md``.

References:
- Kaplan, McCandlish, Henighan, Brown, Chess, Child, Gray, Radford, Wu & Amodei (2020),
  *Scaling Laws for Neural Language Models*, arXiv:2001.08361: power laws in the
  non-embedding parameter count $N$ and the tokens $D$; $N \approx 12\,n_{layer}
  d_{model}^2$; training compute $C \approx 6ND$ (their Table 1).
- Hoffmann, Borgeaud, Mensch, et al. (2022), *Training Compute-Optimal Large Language
  Models*, NeurIPS (Chinchilla): the parametric loss $L(N, D) = E + A/N^\alpha +
  B/D^\beta$, fitted with a Huber loss on $\log L$ by L-BFGS from a grid of starting
  points (their Approach 3), and the compute-optimal allocation it implies.
- Besiroglu, Erdil, Barnett & You (2024), *Chinchilla Scaling: A replication
  attempt*, arXiv:2404.10102 (the published fit, refitted from the paper's own data).

The models are the book's decoder skeleton, :class:`~dlabc.decoder.DecoderLM`, as the
RoPE chapter builds it (:class:`~dlabc.improvements.rope_alibi.PositionLM`: pre-LN
blocks of causal self-attention with rotary positions and a ReLU feed-forward network
of width $4d$), at the shapes :func:`make_lm` gives. :func:`non_embedding_parameters`
counts their $N$ in closed form, :func:`train_with_checkpoints` trains one and reads its
held-out loss at several token counts $D$, :func:`fit_chinchilla` fits the law,
:class:`ChinchillaLaw` predicts losses and the compute-optimal $N$ and $D$.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.improvements.rope_alibi import PositionLM, lm_loss
from dlabc.rnn.char_lm import batches

__all__ = [
    "KAPLAN",
    "CHINCHILLA",
    "ChinchillaLaw",
    "non_embedding_parameters",
    "count_non_embedding",
    "training_flops",
    "make_lm",
    "held_out_loss",
    "train_with_checkpoints",
    "huber",
    "chinchilla_objective",
    "fit_chinchilla",
]

#: Kaplan et al. (2020), eqs. (1.1)-(1.2): $L(N) = (N_c/N)^{\alpha_N}$ for models
#: trained to convergence, $L(D) = (D_c/D)^{\alpha_D}$ for large models stopped early
#: ($N$ non-embedding parameters, $D$ tokens of WebText2, loss in nats per token).
KAPLAN = {"alpha_N": 0.076, "N_c": 8.8e13, "alpha_D": 0.095, "D_c": 5.4e13}

#: The name of the parameters that hold the vocabulary (embedding and read-out), which
#: Kaplan et al.'s $N$ leaves out.
_EMBEDDING = ("embed", "head", "positions")


@dataclass(frozen=True)
class ChinchillaLaw:
    r"""The parametric loss of Hoffmann et al. (2022), eq. (2):

    $L(N, D) = E + \frac{A}{N^\alpha} + \frac{B}{D^\beta}$

    $E$ is the loss of an ideal model on infinite data (the entropy of the text), the
    second term the shortfall of a model of $N$ parameters trained to convergence, the
    third that of training on $D$ tokens only. Under a budget of $C = 6ND$ FLOPs the
    loss is smallest at $N_{opt}(C) = G\,(C/6)^{a}$, $D_{opt}(C) = G^{-1}(C/6)^{b}$
    with $a = \beta/(\alpha+\beta)$, $b = \alpha/(\alpha+\beta)$ and
    $G = (\alpha A / \beta B)^{1/(\alpha+\beta)}$ (their eq. 4).
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        """$L(N, D)$ for parameters ``N`` and tokens ``D`` (broadcast together)."""
        N, D = _positive_array(N, "N"), _positive_array(D, "D")
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def a(self) -> float:
        r"""The exponent of $N_{opt} \propto C^a$: $\beta / (\alpha + \beta)$."""
        return self.beta / (self.alpha + self.beta)

    def compute_optimal(self, C: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """$N_{opt}(C)$ and $D_{opt}(C)$, the allocation of ``C`` FLOPs that minimizes
        the loss along $C = 6ND$."""
        C = _positive_array(C, "C")
        if not (self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0):
            raise ValueError(
                "compute_optimal needs alpha, beta, A, B > 0 (a loss that falls with "
                f"N and D), got {self}"
            )
        return self._compute_optimal(C)

    def _compute_optimal(self, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alpha, beta = self.alpha, self.beta
        G = (alpha * self.A / (beta * self.B)) ** (1 / (alpha + beta))
        N_opt = G * (C / 6) ** (beta / (alpha + beta))  # G (C/6)^a
        D_opt = (C / 6) ** (alpha / (alpha + beta)) / G  # G^-1 (C/6)^b
        return N_opt, D_opt


#: Hoffmann et al. (2022), eq. (10): their fit of :class:`ChinchillaLaw` (Approach 3).
CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _positive_array(x: object, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be finite and positive, got {x!r}")
    return array


def non_embedding_parameters(n_layers: int, d_model: int, d_ff: int) -> int:
    r"""The parameters of :func:`make_lm`'s model outside its embedding and read-out.

    Per layer, attention $4d^2$ ($W^Q, W^K, W^V, W^O$, no biases), the feed-forward
    network $2\,d\,d_{ff} + d_{ff} + d$ (two matrices and their biases) and two
    LayerNorms $2 \cdot 2d$; then one final LayerNorm, $2d$. With $d_{ff} = 4d$ this is
    $n_{layer}(12d^2 + 9d) + 2d$, Kaplan et al.'s $12\,n_{layer} d^2$ plus terms
    linear in $d$. RoPE has no parameters, so there is no position table to leave out.
    """
    check_positive_int(n_layers, "n_layers")
    check_positive_int(d_model, "d_model")
    check_positive_int(d_ff, "d_ff")
    d = d_model
    attention = 4 * d * d
    feed_forward = 2 * d * d_ff + d_ff + d
    norms = 2 * 2 * d
    return n_layers * (attention + feed_forward + norms) + 2 * d


def count_non_embedding(model: nn.Module) -> int:
    """$N$ of a :class:`~dlabc.decoder.DecoderLM` by counting: the elements of every
    parameter except those of ``embed``, ``head`` and ``positions``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.split(".")[0] not in _EMBEDDING
    )


def training_flops(N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
    r"""$C \approx 6ND$: two FLOPs (a multiply and an add) per parameter and token in
    the forward pass, twice that in the backward pass (Kaplan et al., section 2.1)."""
    return 6 * _positive_array(N, "N") * _positive_array(D, "D")


def make_lm(vocab_size: int, n_layers: int, d_model: int) -> PositionLM:
    """A GPT-shaped character model: ``n_layers`` pre-LN blocks of width ``d_model``,
    heads of 16 features with RoPE, a feed-forward network of width ``4 * d_model``."""
    check_positive_int(d_model, "d_model")
    if d_model % 16:
        raise ValueError(f"d_model must be a multiple of 16, got {d_model}")
    return PositionLM(vocab_size, d_model, d_model // 16, n_layers, 4 * d_model, "rope")


@torch.no_grad()
def held_out_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy (nats per character) of ``model`` on the fixed batch
    ``(x, y)`` of ``(B, T)`` ids, in evaluation mode; the mode is restored."""
    check_tensor(x, "x", ndim=2, dtype=torch.long)
    check_tensor(y, "y", ndim=2, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(x.to(device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
    finally:
        model.train(was_training)
    return loss.item()


def train_with_checkpoints(
    model: nn.Module,
    train_ids: torch.Tensor,
    valid: tuple[torch.Tensor, torch.Tensor],
    checkpoints: Sequence[int],
    *,
    lr: float,
    warmup: int,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` with Adam for ``max(checkpoints)`` steps of ``batch_size``
    random windows of ``seq_len + 1`` ids from ``train_ids``; return its
    :func:`held_out_loss` on ``valid = (x, y)`` after each step count in
    ``checkpoints``. The learning rate rises linearly over ``warmup`` steps to ``lr``
    and stays there. The windows come from a generator seeded with ``seed``, so every
    model of a sweep reads the same text in the same order.
    """
    check_tensor(train_ids, "train_ids", ndim=1, dtype=torch.long)
    if not (isinstance(valid, tuple) and len(valid) == 2):
        raise TypeError("valid must be a tuple (x, y) of (B, T) id tensors")
    if not checkpoints or any(
        isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in checkpoints
    ):
        raise ValueError(f"checkpoints must be positive ints, got {checkpoints!r}")
    if list(checkpoints) != sorted(set(checkpoints)):
        raise ValueError(f"checkpoints must increase, got {checkpoints!r}")
    check_number(lr, "lr", low=0)
    check_positive_int(warmup, "warmup")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seq_len, "seq_len")
    stream = batches(
        train_ids,
        batch_size,
        seq_len,
        max(checkpoints),
        torch.Generator().manual_seed(seed),
    )
    return _train(model, stream, valid, list(checkpoints), lr, warmup)


def _train(model, stream, valid, checkpoints, lr, warmup) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # linear warm-up over `warmup` steps, then a constant learning rate
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    losses = []
    for step, batch in enumerate(stream, start=1):
        loss = lm_loss(model, batch)  # next-character cross-entropy, (B, T) windows
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in checkpoints:  # D = step * batch_size * seq_len tokens seen
            losses.append(held_out_loss(model, *valid))
    return losses


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    r"""The Huber loss: $r^2/2$ for $|r| \le \delta$, $\delta(|r| - \delta/2)$ beyond;
    quadratic near zero, linear (robust to outliers) far from it."""
    r = np.asarray(r, dtype=np.float64)
    check_number(delta, "delta", low=0, low_open=True)
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def chinchilla_objective(
    theta: np.ndarray,
    log_N: np.ndarray,
    log_D: np.ndarray,
    log_L: np.ndarray,
    delta: float,
) -> tuple[float, np.ndarray]:
    r"""Hoffmann et al.'s objective (their eq. 3) and its gradient in
    $\theta = (a, b, e, \alpha, \beta)$, with $A = e^a$, $B = e^b$, $E = e^e$:

    $\sum_i \mathrm{Huber}_\delta\big(\mathrm{LSE}(a - \alpha \log N_i,\,
    b - \beta \log D_i,\, e) - \log L_i\big)$

    where $\mathrm{LSE}$ (log-sum-exp) of the three terms is $\log \hat L(N_i, D_i)$.
    """
    a, b, e, alpha, beta = theta
    terms = np.stack(  # (3, n): the logs of A/N^alpha, B/D^beta and E
        [a - alpha * log_N, b - beta * log_D, np.full_like(log_N, e)]
    )
    top = terms.max(axis=0)
    log_pred = top + np.log(np.exp(terms - top).sum(axis=0))  # (n,): log L-hat
    r = log_pred - log_L  # residuals in log loss
    dr = np.clip(r, -delta, delta)  # Huber'(r)
    w = np.exp(terms - log_pred)  # (3, n): each term's share of L-hat
    grad = np.array(
        [
            (dr * w[0]).sum(),  # d/da
            (dr * w[1]).sum(),  # d/db
            (dr * w[2]).sum(),  # d/de
            -(dr * w[0] * log_N).sum(),  # d/dalpha
            -(dr * w[1] * log_D).sum(),  # d/dbeta
        ]
    )
    return float(huber(r, delta).sum()), grad


#: Hoffmann et al.'s grid of starting points (section D.2): alpha, beta, e, a, b.
_GRID = (
    np.arange(0.0, 2.01, 0.5),  # alpha
    np.arange(0.0, 2.01, 0.5),  # beta
    np.arange(-1.0, 1.01, 0.5),  # e
    np.arange(0.0, 25.1, 5.0),  # a
    np.arange(0.0, 25.1, 5.0),  # b
)


def fit_chinchilla(
    N: Sequence[float] | np.ndarray,
    D: Sequence[float] | np.ndarray,
    L: Sequence[float] | np.ndarray,
    delta: float = 1e-3,
    n_starts: int = 20,
) -> ChinchillaLaw:
    """Fit :class:`ChinchillaLaw` to losses ``L`` measured at ``N`` parameters and
    ``D`` tokens (1-D, same length, at least 5 points), as Hoffmann et al. did:
    :func:`chinchilla_objective` minimized by L-BFGS, here from the ``n_starts``
    best points of their grid of starting points (the grid's objective is computed
    first, all at once), keeping the best minimum."""
    arrays = [_positive_array(v, name) for v, name in ((N, "N"), (D, "D"), (L, "L"))]
    if any(a.ndim != 1 for a in arrays) or len({len(a) for a in arrays}) != 1:
        shapes = [a.shape for a in arrays]
        raise ValueError(f"N, D and L must be 1-D of the same length, got {shapes}")
    if len(arrays[0]) < 5:
        raise ValueError(f"need at least 5 points for 5 parameters, got {len(N)}")
    check_number(delta, "delta", low=0, low_open=True)
    check_positive_int(n_starts, "n_starts")
    return _fit(*(np.log(a) for a in arrays), delta, n_starts)


def _fit(log_N, log_D, log_L, delta, n_starts) -> ChinchillaLaw:
    # every start of the grid as theta = (a, b, e, alpha, beta)
    starts = np.array(
        [(a, b, e, al, be) for al, be, e, a, b in itertools.product(*_GRID)]
    )
    objective = [chinchilla_objective(t, log_N, log_D, log_L, delta)[0] for t in starts]
    best = None
    for theta0 in starts[np.argsort(objective)[:n_starts]]:
        result = minimize(
            chinchilla_objective,
            theta0,
            args=(log_N, log_D, log_L, delta),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return ChinchillaLaw(
        E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta
    )
