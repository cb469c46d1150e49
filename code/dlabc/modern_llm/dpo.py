"""Direct preference optimisation: the KL-constrained optimum of RLHF in closed form,
the DPO loss that follows from it, its IPO, conservative and robust variants, a bandit
where every optimum is known, and preference training of a small language model.

Chapter: ``book/modern_llm/dpo.md``.

References:
- Ouyang et al. (2022), *Training Language Models to Follow Instructions with Human
  Feedback* (RLHF: a reward model, then PPO with a KL penalty).
- Rafailov, Sharma, Mitchell, Ermon, Manning & Finn (2023), *Direct Preference
  Optimization: Your Language Model Is Secretly a Reward Model* (the optimum
  :func:`optimal_policy`, the loss :func:`dpo_loss`, the implicit reward
  :func:`implicit_reward`).
- Azar, Guo, Piot, Munos, Rowland, Valko & Calandriello (2024), *A General Theoretical
  Paradigm to Understand Learning from Human Preferences* (IPO, ``loss_type="ipo"``,
  and its optimum :func:`ipo_optimal_policy`).
- Mitchell (2023), *A Note on DPO with Noisy Preferences and Relationship to IPO*
  (conservative DPO, ``loss_type="conservative"``).
- Chowdhury, Kini & Natarajan (2024), *Provably Robust DPO: Aligning Language Models
  with Noisy Feedback* (``loss_type="robust"``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import DecoderLM
from dlabc.modern_llm.rlhf import preference_pairs, sample, sequence_logprobs
from dlabc.train import endless_minibatches

__all__ = [
    "LOSS_TYPES",
    "optimal_policy",
    "ipo_optimal_policy",
    "implicit_reward",
    "dpo_loss",
    "bradley_terry",
    "bandit_preferences",
    "train_bandit",
    "PreferencePairs",
    "dpo_pairs",
    "DPOHistory",
    "train_dpo",
    "win_rate",
    "sequence_kl",
]

#: The preference losses of :func:`dpo_loss`, under TRL's names where TRL has them.
LOSS_TYPES = ("sigmoid", "ipo", "conservative", "robust")


# ---------------------------------------------------------------------------------
# 1. The optimum of the KL-constrained objective, and the reward it implies
# ---------------------------------------------------------------------------------


def _check_distribution(p: object, name: str) -> torch.Tensor:
    check_tensor(p, name, ndim=1, floating=True)
    if len(p) < 2:
        raise ValueError(f"{name} must have at least two entries, got {len(p)}")
    if p.device.type == "cpu" and (
        bool((p <= 0).any()) or abs(float(p.sum()) - 1) > 1e-5
    ):
        raise ValueError(f"{name} must be positive and sum to 1")
    return p


def optimal_policy(
    pi_ref: torch.Tensor, reward: torch.Tensor, beta: float
) -> torch.Tensor:
    r"""The policy that maximises the expected reward with a KL penalty of weight
    ``beta``: $\pi^*(y) = \pi_\mathrm{ref}(y)\, e^{r(y)/\beta} / Z$. Both ``(K,)``."""
    _check_distribution(pi_ref, "pi_ref")
    check_tensor(reward, "reward", ndim=1, floating=True)
    if reward.shape != pi_ref.shape:
        raise ValueError(
            f"reward must have the shape of pi_ref {tuple(pi_ref.shape)}, "
            f"got {tuple(reward.shape)}"
        )
    check_number(beta, "beta", low=0, low_open=True)
    return _optimal_policy(pi_ref, reward, beta)


def _optimal_policy(
    pi_ref: torch.Tensor, reward: torch.Tensor, beta: float
) -> torch.Tensor:
    r"""$\pi^*(y) = \frac{1}{Z}\, \pi_\mathrm{ref}(y) \exp\big(r(y) / \beta\big)$"""
    # the softmax divides by Z
    return torch.softmax(pi_ref.log() + reward / beta, dim=-1)


def ipo_optimal_policy(
    pi_ref: torch.Tensor, preference: torch.Tensor, tau: float
) -> torch.Tensor:
    r"""IPO's optimum when the pairs are drawn from ``pi_ref`` (Azar et al., 2024):
    $\pi^*(y) \propto \pi_\mathrm{ref}(y) \exp\big(p(y \succ \pi_\mathrm{ref}) /
    \tau\big)$, where ``preference[i, j]`` $= p(i \succ j)$ ``(K, K)``."""
    _check_distribution(pi_ref, "pi_ref")
    K = len(pi_ref)
    check_tensor(preference, "preference", ndim=2, floating=True)
    if preference.shape != (K, K):
        raise ValueError(
            f"preference must have shape ({K}, {K}), got {tuple(preference.shape)}"
        )
    check_number(tau, "tau", low=0, low_open=True)
    return _ipo_optimal_policy(pi_ref, preference, tau)


def _ipo_optimal_policy(
    pi_ref: torch.Tensor, preference: torch.Tensor, tau: float
) -> torch.Tensor:
    r"""$\pi^*(y) = \frac{1}{Z}\, \pi_\mathrm{ref}(y)
    \exp\big(p(y \succ \pi_\mathrm{ref}) / \tau\big)$"""
    # p(y ≻ π_ref): how often y beats an answer drawn from π_ref
    p_beats_ref = preference @ pi_ref  # (K,)
    return torch.softmax(pi_ref.log() + p_beats_ref / tau, dim=-1)


def implicit_reward(
    logps: torch.Tensor, ref_logps: torch.Tensor, beta: float
) -> torch.Tensor:
    r"""The reward a policy implies, up to a constant of the prompt:
    $\hat r(x, y) = \beta \log \pi_\theta(y \mid x) / \pi_\mathrm{ref}(y \mid x)$,
    from the log-probabilities of the same answers (any shape)."""
    check_tensor(logps, "logps", floating=True)
    check_tensor(ref_logps, "ref_logps", floating=True)
    if logps.shape != ref_logps.shape:
        raise ValueError(
            f"ref_logps must have the shape of logps {tuple(logps.shape)}, "
            f"got {tuple(ref_logps.shape)}"
        )
    check_number(beta, "beta", low=0, low_open=True)
    return beta * (logps - ref_logps)


# ---------------------------------------------------------------------------------
# 2. The losses
# ---------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The preference loss of each pair ``(B,)``, from the log-probabilities ``(B,)``
    of the chosen and rejected answers under the policy and the reference.

    ``loss_type`` is one of :data:`LOSS_TYPES`: ``"sigmoid"`` (DPO), ``"ipo"`` (its
    log-ratios divided by the answers' lengths, ``chosen_lengths`` and
    ``rejected_lengths``, as TRL and IPO's authors do; ones when omitted),
    ``"conservative"`` (cDPO) and ``"robust"`` (rDPO), the last two with labels
    flipped with probability ``label_smoothing`` in ``[0, 0.5)``. Take ``.mean()``
    for a batch's loss.
    """
    logps = (
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    names = ("policy_chosen_logps", "policy_rejected_logps")
    names += ("ref_chosen_logps", "ref_rejected_logps")
    for x, name in zip(logps, names, strict=True):
        check_tensor(x, name, ndim=1, floating=True)
        if x.shape != policy_chosen_logps.shape:
            raise ValueError(
                f"{name} must have shape {tuple(policy_chosen_logps.shape)} "
                f"like policy_chosen_logps, got {tuple(x.shape)}"
            )
    check_number(beta, "beta", low=0, low_open=True)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    check_number(label_smoothing, "label_smoothing", low=0, high=0.5, high_open=True)
    ones = torch.ones_like(policy_chosen_logps)
    lengths = []
    for x, name in (
        (chosen_lengths, "chosen_lengths"),
        (rejected_lengths, "rejected_lengths"),
    ):
        if x is None:
            lengths.append(ones)
            continue
        check_tensor(x, name, ndim=1)
        if x.shape != ones.shape:
            raise ValueError(
                f"{name} must have shape {tuple(ones.shape)}, got {tuple(x.shape)}"
            )
        lengths.append(x.to(ones.dtype).clamp(min=1.0))
    return _dpo_loss(*logps, beta, loss_type, float(label_smoothing), *lengths)


def _dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    eps: float = 0.0,
    n_chosen: torch.Tensor | float = 1.0,
    n_rejected: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    r"""The loss of each pair, from $h = \log\frac{\pi_\theta(y_w)}{\pi_\mathrm{ref}
    (y_w)} - \log\frac{\pi_\theta(y_l)}{\pi_\mathrm{ref}(y_l)}$:

    $\begin{aligned}
    \text{DPO: } & -\log\sigma(\beta h) \qquad
    \text{IPO: } \big(h - \tfrac{1}{2\beta}\big)^2 \\
    \text{cDPO: } & -(1-\epsilon)\log\sigma(\beta h) - \epsilon\log\sigma(-\beta h) \\
    \text{rDPO: } & \frac{-(1-\epsilon)\log\sigma(\beta h)
    + \epsilon\log\sigma(-\beta h)}{1 - 2\epsilon}
    \end{aligned}$
    """
    log_ratio_chosen = pi_chosen - ref_chosen  # log π_θ(y_w) / π_ref(y_w)
    log_ratio_rejected = pi_rejected - ref_rejected  # log π_θ(y_l) / π_ref(y_l)
    if loss_type == "ipo":  # IPO: per-token log-ratios, a squared loss
        h = log_ratio_chosen / n_chosen - log_ratio_rejected / n_rejected
        return (h - 1 / (2 * beta)) ** 2
    h = log_ratio_chosen - log_ratio_rejected
    agree, disagree = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
    if loss_type == "sigmoid":  # DPO: Bradley-Terry's likelihood of the label
        return -agree
    if loss_type == "conservative":  # the expected loss if labels flip w.p. ε
        return -(1 - eps) * agree - eps * disagree
    # robust: unbiased, the clean loss in expectation over the flips
    return (-(1 - eps) * agree + eps * disagree) / (1 - 2 * eps)


# ---------------------------------------------------------------------------------
# 3. A bandit: K answers to one prompt, every optimum known
# ---------------------------------------------------------------------------------


def bradley_terry(reward: torch.Tensor) -> torch.Tensor:
    r"""The preference matrix of the Bradley-Terry model, ``(K,)`` -> ``(K, K)``:
    $p(i \succ j) = \sigma\big(r(i) - r(j)\big)$."""
    check_tensor(reward, "reward", ndim=1, floating=True)
    return torch.sigmoid(reward[:, None] - reward[None, :])


def bandit_preferences(
    pi_ref: torch.Tensor,
    reward: torch.Tensor,
    n: int,
    flip: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` labelled pairs: two answers drawn from ``pi_ref``, the first preferred
    with Bradley-Terry's probability, then each label flipped with probability
    ``flip`` (a noisy annotator). Returns the chosen and rejected answers, ``(n,)``
    each."""
    _check_distribution(pi_ref, "pi_ref")
    check_tensor(reward, "reward", ndim=1, floating=True)
    if reward.shape != pi_ref.shape:
        raise ValueError(
            f"reward must have the shape of pi_ref {tuple(pi_ref.shape)}, "
            f"got {tuple(reward.shape)}"
        )
    check_positive_int(n, "n")
    check_number(flip, "flip", low=0, high=0.5, high_open=True)
    return _bandit_preferences(pi_ref, reward, n, flip, generator)


def _bandit_preferences(pi_ref, reward, n, flip, generator):
    y1 = torch.multinomial(pi_ref, n, replacement=True, generator=generator)
    y2 = torch.multinomial(pi_ref, n, replacement=True, generator=generator)
    p_first = torch.sigmoid(reward[y1] - reward[y2])  # Bradley-Terry
    u = torch.rand(n, generator=generator, dtype=pi_ref.dtype)
    first_wins = u < p_first
    flipped = torch.rand(n, generator=generator, dtype=pi_ref.dtype) < flip
    first_wins = first_wins ^ flipped
    return torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)


def train_bandit(
    pi_ref: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    steps: int = 300,
    lr: float = 0.1,
) -> torch.Tensor:
    """A softmax policy over the answers, started at ``pi_ref`` and trained by
    full-batch Adam on the preference loss of the pairs ``(chosen, rejected)``.
    Returns the trained policy ``(K,)``."""
    _check_distribution(pi_ref, "pi_ref")
    for x, name in ((chosen, "chosen"), (rejected, "rejected")):
        check_tensor(x, name, ndim=1, dtype=torch.int64)
        if x.shape != chosen.shape or not len(x):
            raise ValueError(f"{name} must be non-empty and as long as chosen")
        if bool((x < 0).any()) or bool((x >= len(pi_ref)).any()):
            raise ValueError(f"{name} must hold answers in 0..{len(pi_ref) - 1}")
    check_number(beta, "beta", low=0, low_open=True)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    check_number(label_smoothing, "label_smoothing", low=0, high=0.5, high_open=True)
    check_positive_int(steps, "steps")
    check_number(lr, "lr", low=0, low_open=True)
    return _train_bandit(
        pi_ref, chosen, rejected, beta, loss_type, label_smoothing, steps, lr
    )


def _train_bandit(pi_ref, chosen, rejected, beta, loss_type, eps, steps, lr):
    # the loss depends on a pair only through (y_w, y_l): count the distinct ones
    pairs, count = torch.stack([chosen, rejected]).unique(dim=1, return_counts=True)
    y_w, y_l, weight = pairs[0], pairs[1], count / len(chosen)  # (P,) each
    logits = pi_ref.log().clone().requires_grad_()  # π_θ = softmax(θ) starts at π_ref
    optimizer = torch.optim.Adam([logits], lr=lr)
    ref_logps = pi_ref.log()
    for _ in range(steps):
        logps = logits.log_softmax(-1)  # log π_θ(y) of every answer, (K,)
        losses = _dpo_loss(
            logps[y_w], logps[y_l], ref_logps[y_w], ref_logps[y_l], beta, loss_type, eps
        )
        loss = (weight * losses).sum()  # the mean over all pairs
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return logits.detach().softmax(-1)


# ---------------------------------------------------------------------------------
# 4. Preference training of a language model
# ---------------------------------------------------------------------------------


@dataclass
class PreferencePairs:
    """Pairs of completions of the same prompts, labelled: ``chosen`` and ``rejected``
    ``(N, P + n)`` (prompt included, its length ``n_prompt``), their rewards ``(N,)``
    and their log-probabilities under the reference ``(N,)``, computed once."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    n_prompt: int
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)


def _check_model(model: object, name: str) -> None:
    if not isinstance(model, DecoderLM):
        raise TypeError(f"{name} must be a DecoderLM, got {type(model).__name__}")


def _check_prompts(prompts: object) -> None:
    check_tensor(prompts, "prompts", ndim=2, dtype=torch.long)
    if not prompts.numel():
        raise ValueError("prompts must be non-empty")


def dpo_pairs(
    reference: DecoderLM,
    reward: Callable[[torch.Tensor], torch.Tensor],
    prompts: torch.Tensor,
    n_new: int,
    generator: torch.Generator | None = None,
) -> PreferencePairs:
    """Two completions of ``n_new`` ids per prompt ``(B, P)`` by ``reference``,
    labelled by the RLHF chapter's simulated annotator
    (:func:`~dlabc.modern_llm.rlhf.preference_pairs`: the first is chosen with
    Bradley-Terry's probability $\\sigma(r_1 - r_2)$ of ``reward``, ids ``(B, T)`` ->
    ``(B,)``), with their rewards and their log-probabilities under the reference."""
    _check_model(reference, "reference")
    if not callable(reward):
        raise TypeError("reward must be callable: ids (B, T) -> (B,)")
    _check_prompts(prompts)
    check_positive_int(n_new, "n_new")
    return _dpo_pairs(reference, reward, prompts, n_new, generator)


@torch.no_grad()
def _dpo_pairs(reference, reward, prompts, n_new, generator):
    P = prompts.shape[1]
    chosen, rejected = preference_pairs(reference, reward, prompts, n_new, generator)
    return PreferencePairs(
        chosen,
        rejected,
        P,
        reward(chosen),
        reward(rejected),
        sequence_logprobs(reference, chosen, P).sum(-1),  # log π_ref(y_w | x)
        sequence_logprobs(reference, rejected, P).sum(-1),  # log π_ref(y_l | x)
    )


@dataclass
class DPOHistory:
    """What :func:`train_dpo` measured on each step's batch: the loss, the mean
    implicit rewards $\\beta \\log \\pi_\\theta / \\pi_\\mathrm{ref}$ of the chosen
    and rejected completions, their margin, and how often the chosen one's is the
    larger (the reward accuracy)."""

    loss: list[float] = field(default_factory=list)
    chosen_reward: list[float] = field(default_factory=list)
    rejected_reward: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def train_dpo(
    policy: DecoderLM,
    pairs: PreferencePairs,
    beta: float,
    steps: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> DPOHistory:
    """Train ``policy`` (in place; a copy of the reference, usually) on ``pairs`` by
    Adam on the preference loss of random batches of ``batch_size`` pairs; return what
    it measured. The policy is left in evaluation mode."""
    _check_model(policy, "policy")
    if not isinstance(pairs, PreferencePairs):
        raise TypeError(f"pairs must be PreferencePairs, got {type(pairs).__name__}")
    check_number(beta, "beta", low=0, low_open=True)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    check_number(label_smoothing, "label_smoothing", low=0, high=0.5, high_open=True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    history = DPOHistory()
    policy.train()
    for batch in itertools.islice(
        endless_minibatches(len(pairs), batch_size, generator), steps
    ):
        _dpo_step(
            policy, optimizer, pairs, batch, beta, loss_type, label_smoothing, history
        )
    policy.eval()
    return history


def _dpo_step(policy, optimizer, pairs, batch, beta, loss_type, eps, history):
    P = pairs.n_prompt
    n = pairs.chosen.shape[1] - P  # every completion has n ids
    both = torch.cat([pairs.chosen[batch], pairs.rejected[batch]])  # (2b, P + n)
    logps = sequence_logprobs(policy, both, P).sum(-1)  # log π_θ(y | x), (2b,)
    pi_chosen, pi_rejected = logps.chunk(2)
    ref_chosen = pairs.ref_chosen_logps[batch]
    ref_rejected = pairs.ref_rejected_logps[batch]
    losses = _dpo_loss(
        pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, loss_type, eps, n, n
    )
    optimizer.zero_grad()
    losses.mean().backward()
    optimizer.step()
    with torch.no_grad():  # the implicit rewards β log π_θ / π_ref
        r_chosen = beta * (pi_chosen - ref_chosen)
        r_rejected = beta * (pi_rejected - ref_rejected)
        history.loss.append(losses.mean().item())
        history.chosen_reward.append(r_chosen.mean().item())
        history.rejected_reward.append(r_rejected.mean().item())
        history.margin.append((r_chosen - r_rejected).mean().item())
        history.accuracy.append((r_chosen > r_rejected).float().mean().item())


@torch.no_grad()
def win_rate(
    policy: DecoderLM,
    reference: DecoderLM,
    reward: Callable[[torch.Tensor], torch.Tensor],
    prompts: torch.Tensor,
    n_new: int,
    generator: torch.Generator | None = None,
) -> float:
    """How often a completion of ``policy`` has a larger ``reward`` than one of
    ``reference`` for the same prompt (ties count one half), over ``prompts``
    ``(B, P)``, one completion of ``n_new`` ids each."""
    _check_model(policy, "policy")
    _check_model(reference, "reference")
    _check_prompts(prompts)
    check_positive_int(n_new, "n_new")
    r_policy = reward(sample(policy, prompts, n_new, generator=generator))
    r_reference = reward(sample(reference, prompts, n_new, generator=generator))
    wins = (r_policy > r_reference).double() + 0.5 * (r_policy == r_reference).double()
    return wins.mean().item()


@torch.no_grad()
def sequence_kl(
    policy: DecoderLM,
    reference: DecoderLM,
    prompts: torch.Tensor,
    n_new: int,
    generator: torch.Generator | None = None,
) -> float:
    r"""A Monte Carlo estimate of $\mathrm{KL}(\pi_\theta \,\|\, \pi_\mathrm{ref})$
    over completions of ``n_new`` ids: the mean of $\log \pi_\theta(y \mid x) -
    \log \pi_\mathrm{ref}(y \mid x)$ over one completion drawn from ``policy`` per
    prompt ``(B, P)``."""
    _check_model(policy, "policy")
    _check_model(reference, "reference")
    _check_prompts(prompts)
    check_positive_int(n_new, "n_new")
    P = prompts.shape[1]
    y = sample(policy, prompts, n_new, generator=generator)
    log_ratio = sequence_logprobs(policy, y, P) - sequence_logprobs(reference, y, P)
    return log_ratio.sum(-1).mean().item()
