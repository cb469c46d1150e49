r"""Uncertainty: three ways to give a network a predictive distribution (MC dropout,
deep ensembles, Bayes by backprop), the scores that read uncertainty from it
(confidence, predictive entropy, mutual information), and the two measurements that
judge them: the expected calibration error and the AUROC of out-of-distribution
detection. Temperature scaling is the classic repair of a network's calibration.

Chapter: ``book/efficiency/uncertainty.md``.

References:
- Gal & Ghahramani (2016), *Dropout as a Bayesian Approximation: Representing Model
  Uncertainty in Deep Learning*, ICML (MC dropout: dropout kept on at test time).
- Lakshminarayanan, Pritzel & Blundell (2017), *Simple and Scalable Predictive
  Uncertainty Estimation using Deep Ensembles*, NeurIPS (deep ensembles).
- Blundell, Cornebise, Kavukcuoglu & Wierstra (2015), *Weight Uncertainty in Neural
  Networks*, ICML (Bayes by backprop: a Gaussian posterior per weight, the ELBO).
- Guo, Pleiss, Sun & Weinberger (2017), *On Calibration of Modern Neural Networks*, ICML
  (the expected calibration error with equal-width bins, reliability diagrams,
  temperature scaling).
- Hendrycks & Gimpel (2017), *A Baseline for Detecting Misclassified and
  Out-of-Distribution Examples in Neural Networks*, ICLR (maximum softmax probability,
  AUROC).

Shapes: ``N`` examples of ``D`` features, ``C`` classes, ``S`` stochastic predictions
per example (``T`` dropout passes, ``M`` ensemble members or ``T`` weight samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.train import History, endless_minibatches, train_steps

__all__ = [
    "MLP",
    "BayesLinear",
    "BayesMLP",
    "gaussian_kl",
    "negative_elbo",
    "train_classifier",
    "predictive_samples",
    "Uncertainty",
    "uncertainty_scores",
    "calibration_bins",
    "expected_calibration_error",
    "auroc",
    "fit_temperature",
]


# ------------------------------------------------------------------- the networks


class MLP(nn.Module):
    """A two-hidden-layer perceptron with dropout after each hidden layer's ReLU:
    ``(N, D)`` -> logits ``(N, C)``. With ``p = 0`` it is a plain network (one
    member of a deep ensemble); with ``p > 0`` it is the network MC dropout samples."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: int = 256,
        classes: int = 10,
        p: float = 0.0,
    ) -> None:
        super().__init__()
        for value, name in [(in_features, "in_features"), (hidden, "hidden")]:
            check_positive_int(value, name)
        check_positive_int(classes, "classes")
        check_number(p, "p", low=0, high=1, high_open=True)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BayesLinear(nn.Module):
    r"""A linear layer whose weights and biases are random: each has its own Gaussian
    variational posterior $q(w) = \mathcal N(\mu, \sigma^2)$ with $\sigma =
    \log(1 + e^{\rho})$, and each forward pass draws a new $w = \mu + \sigma \odot
    \varepsilon$, $\varepsilon \sim \mathcal N(0, I)$ (Blundell et al. 2015). The
    prior is $\mathcal N(0, \sigma_p^2)$ for every weight, so the KL term is in closed
    form."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        prior_sigma: float = 0.1,
        rho_init: float = -5.0,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        self.prior_sigma = check_number(
            prior_sigma, "prior_sigma", low=0, low_open=True
        )
        check_number(rho_init, "rho_init")
        bound = 1 / math.sqrt(in_features)  # nn.Linear's initial range for the means
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.bias_mu = nn.Parameter(torch.empty(out_features))
        nn.init.uniform_(self.weight_mu, -bound, bound)
        nn.init.uniform_(self.bias_mu, -bound, bound)
        self.weight_rho = nn.Parameter(
            torch.full((out_features, in_features), rho_init)
        )
        self.bias_rho = nn.Parameter(torch.full((out_features,), rho_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""$x W^\top + b$ with $W$ and $b$ drawn from $q$, one draw per call."""
        # σ = softplus(ρ) > 0 for any real ρ
        weight_sigma = F.softplus(self.weight_rho)
        bias_sigma = F.softplus(self.bias_rho)
        # w = μ + σ ⊙ ε: the reparameterisation, so gradients reach μ and ρ
        weight = self.weight_mu + weight_sigma * torch.randn_like(weight_sigma)
        bias = self.bias_mu + bias_sigma * torch.randn_like(bias_sigma)
        return F.linear(x, weight, bias)  # (N, out_features)

    def kl(self) -> torch.Tensor:
        r"""$\mathrm{KL}(q \,\|\, p)$ summed over the layer's weights and biases."""
        return _gaussian_kl(
            self.weight_mu, F.softplus(self.weight_rho), self.prior_sigma
        ) + _gaussian_kl(self.bias_mu, F.softplus(self.bias_rho), self.prior_sigma)


class BayesMLP(nn.Module):
    """The :class:`MLP`'s architecture with :class:`BayesLinear` layers and no dropout:
    ``(N, D)`` -> logits ``(N, C)``, with new weights drawn at every call."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: int = 256,
        classes: int = 10,
        prior_sigma: float = 0.1,
        rho_init: float = -5.0,
    ) -> None:
        super().__init__()
        sizes = [in_features, hidden, hidden, classes]
        self.layers = nn.ModuleList(
            BayesLinear(a, b, prior_sigma, rho_init)
            for a, b in zip(sizes, sizes[1:], strict=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)  # (N, D)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h  # (N, C)

    def kl(self) -> torch.Tensor:
        """The KL term of all layers."""
        return sum(layer.kl() for layer in self.layers)


# ---------------------------------------------------------------- the KL and the ELBO


def gaussian_kl(
    mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float
) -> torch.Tensor:
    r"""$\sum_i \mathrm{KL}\big(\mathcal N(\mu_i, \sigma_i^2) \,\|\, \mathcal N(0,
    \sigma_p^2)\big)$ over all entries of ``mu`` and ``sigma`` (same shape): a
    scalar."""
    check_tensor(mu, "mu", floating=True)
    check_tensor(sigma, "sigma", floating=True)
    if mu.shape != sigma.shape:
        raise ValueError(
            f"mu and sigma must have the same shape, got {tuple(mu.shape)} and "
            f"{tuple(sigma.shape)}"
        )
    check_number(prior_sigma, "prior_sigma", low=0, low_open=True)
    return _gaussian_kl(mu, sigma, prior_sigma)


def _gaussian_kl(
    mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float
) -> torch.Tensor:
    r"""$\mathrm{KL}(q \,\|\, p) = \sum_i \log\frac{\sigma_p}{\sigma_i} +
    \frac{\sigma_i^2 + \mu_i^2}{2 \sigma_p^2} - \frac12$."""
    log_ratio = math.log(prior_sigma) - sigma.log()  # log σ_p/σ_i
    spread = (sigma.square() + mu.square()) / (2 * prior_sigma**2)  # (σ² + μ²)/2σ_p²
    return (log_ratio + spread - 0.5).sum()


def negative_elbo(
    model: BayesMLP, x: torch.Tensor, y: torch.Tensor, n_train: int
) -> torch.Tensor:
    r"""The negative ELBO of a mini-batch, per training example:
    $\frac{1}{N}\mathrm{KL}(q \,\|\, p) - \frac{1}{B}\sum_{b} \log p(y_b \mid x_b, w)$
    with one draw $w \sim q$ for the batch."""
    if not isinstance(model, BayesMLP):
        raise TypeError(f"model must be a BayesMLP, got {type(model).__name__}")
    check_positive_int(n_train, "n_train")
    return _negative_elbo(model, x, y, n_train)


def _negative_elbo(
    model: BayesMLP, x: torch.Tensor, y: torch.Tensor, n_train: int
) -> torch.Tensor:
    r"""$-\mathcal L / N = \mathrm{KL}(q \,\|\, p) / N - \text{mean}_b \log p(y_b \mid
    x_b, w)$, $w \sim q$."""
    nll = F.cross_entropy(model(x), y)  # −mean log p(y|x, w), one w for the batch
    return model.kl() / n_train + nll  # the KL is spread over the N training examples


def train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    *,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> History:
    """Train ``model`` with Adam for ``steps`` mini-batches: on the negative ELBO for a
    :class:`BayesMLP`, on the cross-entropy otherwise. Returns the history."""
    check_tensor(X, "X", floating=True)
    check_tensor(y, "y", ndim=1, dtype=torch.long)
    if len(X) != len(y):
        raise ValueError(
            f"X and y must have the same length, got {len(X)} and {len(y)}"
        )
    check_positive_int(steps, "steps")
    check_number(lr, "lr", low=0, low_open=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the weight noise of Bayes by backprop and dropout's masks
    n = len(X)

    def loss_fn(net: nn.Module, index: torch.Tensor) -> torch.Tensor:
        xb, yb = X[index], y[index]
        if isinstance(net, BayesMLP):
            return _negative_elbo(net, xb, yb, n)
        return F.cross_entropy(net(xb), yb)

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = train_steps(
        model,
        optimizer,
        endless_minibatches(n, batch_size, generator),
        loss_fn,
        steps=steps,
    )
    model.eval()
    return history


# --------------------------------------------------------- the predictive distribution


@torch.no_grad()
def predictive_samples(
    models: nn.Module | Sequence[nn.Module], x: torch.Tensor, passes: int = 1
) -> torch.Tensor:
    """Class probabilities ``(S, N, C)``: ``passes`` stochastic forward passes of each
    model, with dropout kept on (MC dropout) and weights drawn anew (Bayes by backprop);
    a deep ensemble is a list of deterministic models with ``passes = 1``."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("models must be an nn.Module or a non-empty list of them")
    check_tensor(x, "x", floating=True)
    check_positive_int(passes, "passes")
    modes = [m.training for m in models]
    try:
        return _predictive_samples(models, x, passes)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _predictive_samples(
    models: list[nn.Module], x: torch.Tensor, passes: int
) -> torch.Tensor:
    """``passes`` softmax outputs of every model, dropout on: ``(S, N, C)``."""
    samples = []
    for model in models:
        model.eval()  # no batch-norm statistics updates ...
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.train()  # ... but dropout stays on: MC dropout
        for _ in range(passes):
            samples.append(model(x).softmax(-1))  # (N, C), one sample of p(y|x, w)
    return torch.stack(samples)  # (S, N, C)


@dataclass
class Uncertainty:
    """What :func:`uncertainty_scores` reads from ``S`` predictions: each ``(N, C)`` or
    ``(N,)``."""

    probs: torch.Tensor  # the predictive distribution p̄(y|x), (N, C)
    confidence: torch.Tensor  # max_c p̄(c|x), (N,)
    entropy: torch.Tensor  # H[p̄], total uncertainty, (N,)
    expected_entropy: torch.Tensor  # mean_s H[p_s], aleatoric part, (N,)
    mutual_information: torch.Tensor  # H[p̄] − mean_s H[p_s], epistemic part, (N,)


def uncertainty_scores(samples: torch.Tensor) -> Uncertainty:
    """The averaged predictive distribution of ``samples`` ``(S, N, C)`` (probabilities)
    and the scores of uncertainty read from it."""
    check_tensor(samples, "samples", ndim=3, floating=True)
    return _uncertainty_scores(samples)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """$H[p] = -\\sum_c p_c \\log p_c$ over the last dimension, with $0 \\log 0 = 0$."""
    return -torch.special.xlogy(p, p).sum(-1)


def _uncertainty_scores(samples: torch.Tensor) -> Uncertainty:
    r"""$\bar p = \frac1S \sum_s p_s$; confidence $\max_c \bar p_c$; entropy
    $H[\bar p]$; mutual information $H[\bar p] - \frac1S \sum_s H[p_s]$."""
    probs = samples.mean(0)  # p̄(y|x) = mean over the S predictions, (N, C)
    entropy = _entropy(probs)  # total: H[p̄], (N,)
    expected_entropy = _entropy(samples).mean(0)  # aleatoric: mean_s H[p_s], (N,)
    return Uncertainty(
        probs=probs,
        confidence=probs.max(-1).values,
        entropy=entropy,
        expected_entropy=expected_entropy,
        mutual_information=entropy - expected_entropy,  # epistemic: their gap
    )


# ------------------------------------------------------------------------ calibration


def calibration_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal-width bins of confidence, ``((m-1)/M, m/M]``: each bin's number of
    examples, mean confidence and accuracy, three ``(M,)`` tensors (empty bins: 0)."""
    _check_probs_labels(probs, labels)
    check_positive_int(n_bins, "n_bins")
    return _calibration_bins(probs, labels, n_bins)


def _calibration_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bin ``B_m``: ``|B_m|``, ``conf(B_m)`` and ``acc(B_m)``."""
    confidence, prediction = probs.max(-1)  # (N,), (N,)
    correct = (prediction == labels).to(probs.dtype)  # (N,)
    # bin m holds confidences in ((m-1)/M, m/M]: ceil(c M) - 1, and 0 goes to bin 0
    bin_index = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1  # (N,)
    count = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device)
    count.index_add_(0, bin_index, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, bin_index, confidence)
    correct_sum = torch.zeros_like(count).index_add_(0, bin_index, correct)
    safe = count.clamp(min=1)  # an empty bin has sums 0: its means stay 0
    return count, conf_sum / safe, correct_sum / safe


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> float:
    r"""$\mathrm{ECE} = \sum_m \frac{|B_m|}{N} \big|\mathrm{acc}(B_m) -
    \mathrm{conf}(B_m)\big|$ over ``n_bins`` equal-width bins of confidence."""
    count, confidence, accuracy = calibration_bins(probs, labels, n_bins)
    return _expected_calibration_error(count, confidence, accuracy).item()


def _expected_calibration_error(
    count: torch.Tensor, confidence: torch.Tensor, accuracy: torch.Tensor
) -> torch.Tensor:
    """The bins' gaps between accuracy and confidence, weighted by their share."""
    return (count / count.sum() * (accuracy - confidence).abs()).sum()


def _check_probs_labels(probs: object, labels: object) -> None:
    check_tensor(probs, "probs", ndim=2, floating=True)
    check_tensor(labels, "labels", ndim=1, dtype=torch.long)
    if len(probs) != len(labels) or len(probs) == 0:
        raise ValueError(
            "probs and labels must be non-empty and of the same length, got "
            f"{len(probs)} and {len(labels)}"
        )
    if bool((probs < 0).any()) or bool(((probs.sum(-1) - 1).abs() > 1e-4).any()):
        raise ValueError("probs must be probabilities: non-negative, rows summing to 1")


# --------------------------------------------------------- out-of-distribution: AUROC


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """The area under the ROC curve of telling ``scores_out`` (positives, out of
    distribution) from ``scores_in`` by a higher score: the probability that a random
    outsider scores higher than a random insider, ties counted half."""
    for value, name in [(scores_in, "scores_in"), (scores_out, "scores_out")]:
        check_tensor(value, name, ndim=1, floating=True)
        if len(value) == 0:
            raise ValueError(f"{name} must not be empty")
    return _auroc(scores_in, scores_out).item()


def _auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> torch.Tensor:
    r"""Mann–Whitney: $\mathrm{AUROC} = \big(R_{\text{out}} - \frac{n_{\text{out}}
    (n_{\text{out}} + 1)}{2}\big) / (n_{\text{in}} n_{\text{out}})$, with $R$ the sum
    of the outsiders' ranks among all scores, tied scores sharing their mean rank."""
    n_in, n_out = len(scores_in), len(scores_out)
    scores = torch.cat([scores_in, scores_out]).double()  # (n_in + n_out,)
    values, inverse, counts = scores.unique(return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()  # the highest rank of each distinct value
    mid_rank = last_rank - (counts - 1) / 2  # ties share the mean of their ranks
    rank_sum_out = mid_rank[inverse[n_in:]].sum()  # R_out
    return (rank_sum_out - n_out * (n_out + 1) / 2) / (n_in * n_out)


# ----------------------------------------------------------------- temperature scaling


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    r"""The temperature $T > 0$ that minimises the negative log-likelihood of
    ``softmax(logits / T)`` on held-out ``(logits, labels)`` (Guo et al. 2017)."""
    check_tensor(logits, "logits", ndim=2, floating=True)
    check_tensor(labels, "labels", ndim=1, dtype=torch.long)
    if len(logits) != len(labels) or len(logits) == 0:
        raise ValueError(
            "logits and labels must be non-empty and of the same length, got "
            f"{len(logits)} and {len(labels)}"
        )
    return _fit_temperature(logits.detach().double(), labels)


def _fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Minimise NLL(T) over log T (so T stays positive) with L-BFGS."""
    log_t = torch.zeros((), dtype=logits.dtype, requires_grad=True)  # T = 1 to start
    optimizer = torch.optim.LBFGS(
        [log_t],
        lr=0.5,
        max_iter=100,
        tolerance_grad=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        nll = F.cross_entropy(logits / log_t.exp(), labels)  # NLL of softmax(z / T)
        nll.backward()
        return nll

    optimizer.step(closure)
    return log_t.exp().item()
