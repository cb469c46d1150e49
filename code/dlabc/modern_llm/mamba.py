r"""State-space models and Mamba: a linear recurrence read three ways (a loop, a
convolution, a parallel scan), the selective state-space model whose step size and
projections depend on the input, and the Mamba block and language model, equal to
Hugging Face's ``MambaForCausalLM`` with the same weights.

Chapter: ``book/modern_llm/mamba.md``.

References:
- Gu, Goel & Ré (2022), *Efficiently Modeling Long Sequences with Structured State
  Spaces*, ICLR (S4: a discretised linear state-space model trained as a long
  convolution).
- Gu & Dao (2023), *Mamba: Linear-Time Sequence Modeling with Selective State Spaces*
  (input-dependent $\Delta$, $B$, $C$; the simplified discretisation of $B$; the
  Mamba block; the published sizes, 130M to 2.8B).
- Blelloch (1990), *Prefix Sums and Their Applications* (scans of any associative
  operator); Hillis & Steele (1986), *Data Parallel Algorithms* (the log-depth scan
  written here).
- Arora et al. (2024), *Zoology: Measuring and Improving Recall in Efficient Language
  Models*, ICLR (associative recall as the test of what a fixed-size state can hold).

Shapes: ``B`` batch, ``T`` time, ``D`` channels of the scan (Mamba's inner width,
``expand * d_model``), ``N`` state size per channel, ``R`` the rank of $\Delta$'s
projection. The parameter names of :class:`MambaMixer` and :class:`MambaLM` are Hugging
Face's; :func:`mamba_from_hf_state_dict` is the short renaming table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dlabc.checks import check_ids, check_positive_int, check_tensor

__all__ = [
    "discretize",
    "zoh",
    "recurrent_scan",
    "parallel_scan",
    "scan",
    "ssm_kernel",
    "convolution_form",
    "selective_scan",
    "MambaConfig",
    "CONFIGS",
    "MambaMixer",
    "MambaBlock",
    "MambaLM",
    "mamba_from_hf_state_dict",
    "associative_recall",
    "largest_tensor_bytes",
]

Scan = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- discretisation


def discretize(
    delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mamba's discretisation of $h'(t) = A h(t) + B x(t)$ with step $\Delta$.

    $A$ is diagonal (one row of $N$ values per channel), so the zero-order hold's
    matrix exponential is an elementwise one; $B$ takes Mamba's simplification of the
    zero-order hold, the Euler step $\Delta B$:

    $\bar A = \exp(\Delta A), \qquad \bar B = \Delta B .$

    ``delta`` ``(..., D)``, ``A`` ``(D, N)``, ``B`` ``(..., N)`` -> two ``(..., D, N)``.
    """
    A_bar = torch.exp(delta[..., None] * A)  # (..., D, N)
    B_bar = delta[..., None] * B[..., None, :]  # (..., D, N)
    return A_bar, B_bar


def zoh(
    delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The exact zero-order hold for a diagonal $A$ (S4's discretisation):

    $\bar A = \exp(\Delta A), \qquad
    \bar B = (\Delta A)^{-1}(\exp(\Delta A) - I)\,\Delta B .$

    Same shapes as :func:`discretize`; ``A`` must have no zero entry.
    """
    check_tensor(A, "A", ndim=2, floating=True)
    if bool((A == 0).any()):
        raise ValueError("A must have no zero entry: the hold divides by Delta A")
    dA = delta[..., None] * A  # (..., D, N)
    return torch.exp(dA), torch.expm1(dA) / dA * delta[..., None] * B[..., None, :]


# ---------------------------------------------------------------- three ways to scan


def recurrent_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""$h_t = a_t h_{t-1} + b_t$ from $h_0 = 0$, one step after the other.

    ``a`` and ``b`` are ``(B, T, ...)`` (``a`` may broadcast); returns every $h_t$,
    ``(B, T, ...)``. $T$ sequential steps: the recurrence as an RNN runs it.
    """
    h = torch.zeros_like(b[:, 0])
    states = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]  # (B, ...)
        states.append(h)
    return torch.stack(states, dim=1)  # (B, T, ...)


def parallel_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""The same $h_t$ in $\lceil \log_2 T \rceil$ parallel steps (Hillis and Steele).

    One step of the recurrence is the affine map $h \mapsto a h + b$; doing $(a_1,
    b_1)$ and then $(a_2, b_2)$ is the affine map

    $(a_1, b_1) \bullet (a_2, b_2) = (a_1 a_2,\; a_2 b_1 + b_2),$

    an associative operation, so the prefixes can be combined in any grouping. After
    the step with offset $k$, position $t$ holds the composition of the (up to) $2k$
    steps ending at $t$; when $k \ge T$ it holds all of them, and its $b$ is $h_t$.
    """
    a = a.expand_as(b)
    offset = 1
    while offset < b.shape[1]:
        # position t >= offset composes (a, b) at t - offset, then its own
        b = torch.cat(
            [b[:, :offset], a[:, offset:] * b[:, :-offset] + b[:, offset:]], 1
        )
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], 1)
        offset *= 2
    return b  # (B, T, ...)


def scan(a: torch.Tensor, b: torch.Tensor, method: str = "parallel") -> torch.Tensor:
    """:func:`parallel_scan` or :func:`recurrent_scan` (``method``), with checks:
    ``a`` and ``b`` floating tensors with a batch and a time axis, ``a`` broadcasting
    to ``b``."""
    check_tensor(a, "a", floating=True)
    check_tensor(b, "b", floating=True)
    if b.dim() < 2:
        raise ValueError(f"b must be (B, T, ...), got shape {tuple(b.shape)}")
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"a {tuple(a.shape)} does not broadcast to b {tuple(b.shape)}"
        ) from None
    if method not in _SCANS:
        raise ValueError(f"method must be one of {sorted(_SCANS)}, got {method!r}")
    return _SCANS[method](a, b)


_SCANS: dict[str, Scan] = {"parallel": parallel_scan, "recurrent": recurrent_scan}


def ssm_kernel(
    A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor, length: int
) -> torch.Tensor:
    r"""The convolution kernel of a time-invariant diagonal SSM,
    $\bar K = (C \bar B,\ C \bar A \bar B,\ \dots,\ C \bar A^{L-1} \bar B)$.

    ``A_bar``, ``B_bar``, ``C`` ``(D, N)`` -> ``K`` ``(D, L)``: channel $d$'s kernel
    $K_{d,k} = \sum_n C_{dn} \bar A_{dn}^{\,k} \bar B_{dn}$.
    """
    check_positive_int(length, "length")
    k = torch.arange(length, device=A_bar.device, dtype=A_bar.dtype)  # (L,)
    powers = A_bar[..., None] ** k  # (D, N, L)
    return torch.einsum("dn,dnl,dn->dl", C, powers, B_bar)  # (D, L)


def convolution_form(x: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    r"""$y_t = \sum_{k=0}^{t} K_k\, x_{t-k}$ for every channel, with FFTs.

    ``x`` ``(B, T, D)``, ``K`` ``(D, T)`` -> ``y`` ``(B, T, D)``. Zero-padding both to
    $2T$ makes the FFT's circular convolution a causal one; the cost is
    $O(T \log T)$ per channel.
    """
    check_tensor(x, "x", ndim=3, floating=True)
    check_tensor(K, "K", ndim=2, floating=True)
    if K.shape != (x.shape[2], x.shape[1]):
        raise ValueError(
            f"K must be (D, T) = {(x.shape[2], x.shape[1])}, got {tuple(K.shape)}"
        )
    T = x.shape[1]
    X = torch.fft.rfft(x, n=2 * T, dim=1)  # (B, T + 1, D)
    Kf = torch.fft.rfft(K.T, n=2 * T, dim=0)  # (T + 1, D)
    return torch.fft.irfft(X * Kf, n=2 * T, dim=1)[:, :T]  # (B, T, D)


# ---------------------------------------------------------------- the selective SSM


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    scan: Scan = parallel_scan,
) -> torch.Tensor:
    r"""The selective SSM: a different $\bar A_t, \bar B_t, C_t$ at every step,

    $h_t = \bar A_t\, h_{t-1} + \bar B_t\, x_t, \qquad y_t = C_t\, h_t + D\, x_t .$

    ``x``, ``delta`` ``(B, T, D)``; ``A`` ``(D, N)``; ``B``, ``C`` ``(B, T, N)`` (shared
    by the channels); ``D`` ``(D,)``. Returns ``y`` ``(B, T, D)``.
    """
    A_bar, B_bar = discretize(delta, A, B)  # (B, T, D, N) each
    h = scan(A_bar, B_bar * x[..., None])  # (B, T, D, N): every state
    y = torch.einsum("btdn,btn->btd", h, C)  # C_t h_t
    return y + D * x  # (B, T, D)


@dataclass(frozen=True)
class MambaConfig:
    """A Mamba language model, with Hugging Face's ``MambaConfig`` names in comments.

    ``dt_rank`` defaults to ``ceil(d_model / 16)``, as in the paper's code.
    """

    vocab_size: int = 50280  # vocab_size (GPT-NeoX's 50,277, padded to a multiple of 8)
    d_model: int = 768  # hidden_size
    n_layers: int = 24  # num_hidden_layers
    d_state: int = 16  # state_size, N
    expand: int = 2  # expand: the inner width is expand * d_model
    d_conv: int = 4  # conv_kernel
    dt_rank: int | None = None  # time_step_rank, R
    eps: float = 1e-5  # layer_norm_epsilon

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "d_state",
            "expand",
            "d_conv",
        ):
            check_positive_int(getattr(self, name), name)
        if self.dt_rank is not None:
            check_positive_int(self.dt_rank, "dt_rank")
        if not (isinstance(self.eps, float) and self.eps > 0):
            raise ValueError(f"eps must be a positive float, got {self.eps!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank


#: The five Mamba language models of Gu & Dao (2023), trained on the Pile, under the
#: Hugging Face hub's names (``state-spaces/mamba-130m-hf`` ...).
CONFIGS: dict[str, MambaConfig] = {
    "mamba-130m": MambaConfig(d_model=768, n_layers=24),
    "mamba-370m": MambaConfig(d_model=1024, n_layers=48),
    "mamba-790m": MambaConfig(d_model=1536, n_layers=48),
    "mamba-1.4b": MambaConfig(d_model=2048, n_layers=48),
    "mamba-2.8b": MambaConfig(d_model=2560, n_layers=64),
}


class MambaMixer(nn.Module):
    r"""The Mamba block's mixer: a gated selective SSM behind a causal convolution.

    With $u$ the (normalised) input, $D$ channels inside:

    $\begin{gathered}
    x, z = \mathrm{in\_proj}(u), \qquad
    x \leftarrow \mathrm{SiLU}(\mathrm{conv1d}(x)), \\
    \Delta, B, C = \mathrm{x\_proj}(x), \qquad
    \Delta \leftarrow \mathrm{softplus}(\mathrm{dt\_proj}(\Delta)), \\
    \mathrm{out} = \mathrm{out\_proj}\big(\mathrm{SSM}_{\Delta, A, B, C}(x) \odot
    \mathrm{SiLU}(z)\big).
    \end{gathered}$

    $A = -\exp(A_{\log})$ keeps every state decaying. :meth:`forward` runs a whole
    sequence (any :data:`Scan`); :meth:`step` runs one token from a state, as
    generation does.
    """

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        D, N, R = config.d_inner, config.d_state, config.rank
        self.d_inner, self.d_state, self.rank = D, N, R
        self.in_proj = nn.Linear(config.d_model, 2 * D, bias=False)
        self.conv1d = nn.Conv1d(
            D, D, config.d_conv, groups=D, padding=config.d_conv - 1
        )  # depthwise: one kernel of d_conv taps per channel
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, D)
        # S4D-real initialisation: A_dn = -(n + 1); Delta from [0.001, 0.1]
        self.A_log = nn.Parameter(torch.log(torch.arange(1.0, N + 1).repeat(D, 1)))
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, config.d_model, bias=False)
        with torch.no_grad():
            dt = torch.exp(torch.empty(D).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1

    def ssm_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r"""$\Delta$, $B$, $C$ from the input: ``x`` ``(..., D)`` -> ``(..., D)``,
        ``(..., N)``, ``(..., N)``."""
        dt, B, C = self.x_proj(x).split([self.rank, self.d_state, self.d_state], -1)
        delta = F.softplus(self.dt_proj(dt))  # (..., D): a step size per channel
        return delta, B, C

    def forward(self, u: torch.Tensor, scan: Scan = parallel_scan) -> torch.Tensor:
        T = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, D) each
        x = self.conv1d(x.transpose(1, 2))[..., :T]  # (B, D, T): causal, cut the tail
        x = F.silu(x.transpose(1, 2))  # (B, T, D)
        delta, B, C = self.ssm_parameters(x)
        A = -torch.exp(self.A_log)  # (D, N)
        y = selective_scan(x, delta, A, B, C, self.D, scan)  # (B, T, D)
        return self.out_proj(y * F.silu(z))  # (B, T, d_model)

    def step(
        self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        r"""One token: ``u`` ``(B, d_model)`` and the state (the last ``d_conv``
        inputs of the convolution, ``(B, D, d_conv)``, and $h$, ``(B, D, N)``) -> the
        output ``(B, d_model)`` and the next state. Memory and work per token do not
        grow with the length read so far."""
        window, h = state
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, D) each
        window = torch.cat([window[..., 1:], x[..., None]], -1)  # (B, D, d_conv)
        x = (window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias
        x = F.silu(x)  # (B, D)
        delta, B, C = self.ssm_parameters(x)
        A_bar, B_bar = discretize(delta, -torch.exp(self.A_log), B)  # (B, D, N)
        h = A_bar * h + B_bar * x[..., None]  # (B, D, N)
        y = torch.einsum("bdn,bn->bd", h, C) + self.D * x  # (B, D)
        return self.out_proj(y * F.silu(z)), (window, h)

    def new_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The state before the first token: zeros."""
        p = self.A_log
        window = p.new_zeros(batch, self.d_inner, self.conv1d.kernel_size[0])
        return window, p.new_zeros(batch, self.d_inner, self.d_state)


class MambaBlock(nn.Module):
    r"""A residual block: $x + \mathrm{Mixer}(\mathrm{RMSNorm}(x))$. There is no
    separate MLP: the mixer's gate and projections are the block's feed-forward
    part."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.eps)
        self.mixer = MambaMixer(config)

    def forward(self, x: torch.Tensor, scan: Scan = parallel_scan) -> torch.Tensor:
        return x + self.mixer(self.norm(x), scan)

    def step(self, x: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        y, state = self.mixer.step(self.norm(x), state)
        return x + y, state


class MambaLM(nn.Module):
    """A Mamba language model: embedding, :class:`MambaBlock` layers, a final
    RMSNorm, and a read-out tied to the embedding. Ids ``(B, T)`` -> logits ``(B, T,
    V)``; :meth:`step` reads one token ``(B,)`` from a state and returns ``(B, V)``.
    """

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(
                f"config must be a MambaConfig, got {type(config).__name__}"
            )
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layers))
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.embedding.weight  # tied

    def forward(self, ids: torch.Tensor, scan: str | Scan = "parallel") -> torch.Tensor:
        check_tensor(ids, "ids", ndim=2, dtype=torch.int64)
        check_ids(ids, "ids", self.config.vocab_size)
        if isinstance(scan, str):
            if scan not in _SCANS:
                raise ValueError(f"scan must be one of {sorted(_SCANS)}, got {scan!r}")
            scan = _SCANS[scan]
        return self._forward(ids, scan)

    def _forward(self, ids: torch.Tensor, scan: Scan) -> torch.Tensor:
        x = self.embedding(ids)  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, scan)
        return self.head(self.norm_f(x))  # (B, T, V)

    def new_state(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One zero state per layer, for a batch of ``batch`` sequences."""
        check_positive_int(batch, "batch")
        return [layer.mixer.new_state(batch) for layer in self.layers]

    def step(
        self, token: torch.Tensor, state: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Read one token per sequence: ``token`` ``(B,)`` -> logits ``(B, V)`` and
        the new state."""
        check_tensor(token, "token", ndim=1, dtype=torch.int64)
        check_ids(token, "token", self.config.vocab_size)
        if not isinstance(state, list) or len(state) != len(self.layers):
            raise ValueError(f"state must be a list of {len(self.layers)} layer states")
        return self._step(token, state)

    def _step(self, token: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        x = self.embedding(token)  # (B, d_model)
        new_state = []
        for layer, s in zip(self.layers, state, strict=True):
            x, s = layer.step(x, s)
            new_state.append(s)
        return self.head(self.norm_f(x)), new_state

    def sequential(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits of :meth:`forward`, computed token by token with :meth:`step`."""
        check_tensor(ids, "ids", ndim=2, dtype=torch.int64)
        state = self.new_state(ids.shape[0])
        logits = []
        for t in range(ids.shape[1]):
            out, state = self.step(ids[:, t], state)
            logits.append(out)
        return torch.stack(logits, dim=1)  # (B, T, V)


def mamba_from_hf_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A ``MambaForCausalLM`` (or ``MambaModel``) state dict under :class:`MambaLM`'s
    names. Inside a layer every name is the same; only the prefix and the embedding's
    name differ, and the tied ``lm_head`` is dropped."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    renamed = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            continue  # the embedding, tied
        key = key.removeprefix("backbone.")
        key = key.replace("embeddings.", "embedding.")
        renamed[key] = value
    renamed["head.weight"] = renamed["embedding.weight"]
    return renamed


# ---------------------------------------------------------------- experiments


def associative_recall(
    n: int,
    n_pairs: int,
    n_keys: int,
    n_values: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` associative-recall examples: ``n_pairs`` (key, value) pairs, then one of
    the keys again; the target is its value.

    Keys are ids ``0 .. n_keys - 1`` (distinct within an example), values ids
    ``n_keys .. n_keys + n_values - 1``. Returns ``ids`` ``(n, 2 n_pairs + 1)`` and
    ``targets`` ``(n,)``.
    """
    for name, value in (("n", n), ("n_pairs", n_pairs), ("n_keys", n_keys)):
        check_positive_int(value, name)
    check_positive_int(n_values, "n_values")
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs={n_pairs} needs at least as many keys, got {n_keys}")
    keys = torch.rand(n, n_keys, generator=generator).argsort(1)[:, :n_pairs]
    values = n_keys + torch.randint(n_values, (n, n_pairs), generator=generator)
    ask = torch.randint(n_pairs, (n,), generator=generator)
    rows = torch.arange(n)
    ids = torch.stack([keys, values], dim=2).reshape(n, 2 * n_pairs)
    ids = torch.cat([ids, keys[rows, ask, None]], dim=1)  # (n, 2 n_pairs + 1)
    return ids, values[rows, ask]


class _LargestStorage(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def largest_tensor_bytes(fn: Callable[[], object]) -> int:
    """The bytes of the largest tensor that any operation inside ``fn()`` allocates.

    Every PyTorch operation is intercepted on its way out (a ``TorchDispatchMode``);
    views count the memory they share, not their shape. Deterministic, unlike a
    timer.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    with _LargestStorage() as mode, torch.no_grad():
        fn()
    return mode.largest
