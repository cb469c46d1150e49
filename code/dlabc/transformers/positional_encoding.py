r"""Positional encoding: sinusoidal and learned positions, and scaled token embeddings.

Chapter: ``book/transformers/positional_encoding.md``.

References:
- Vaswani et al. (2017), *Attention Is All You Need*, section 3.4 (embeddings scaled by
  $\sqrt{d_{model}}$) and section 3.5 (sinusoidal positional encoding).
- Gehring et al. (2017), *Convolutional Sequence to Sequence Learning* (learned
  position embeddings).
- Devlin et al. (2019), *BERT*; Radford et al. (2018, 2019), GPT and GPT-2 (learned
  position embeddings, a table of ``max_len`` vectors).

Self-attention sees a set, not a sequence: :func:`equivariance_error` measures that
permuting its input permutes its output. The encodings here add a vector that depends
on the position to each token's vector. Every encoding module takes ``x`` of shape
``(B, T, d_model)`` and an ``offset`` (the position of ``x[:, 0]``, for decoding one
token at a time) and returns ``x`` plus the encodings of positions
``offset .. offset + T - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_ids, check_number, check_positive_int, check_tensor
from dlabc.train import History, train_steps
from dlabc.transformers.attention_with_pytorch import (
    MultiHeadAttention,
    evaluate_reverse,
    reverse_task,
)

__all__ = [
    "angular_frequencies",
    "sinusoidal_encoding",
    "wavelengths",
    "rotation_matrix",
    "similarity_by_offset",
    "equivariance_error",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEmbedding",
    "ScaledEmbedding",
    "PositionTaskModel",
    "train_position_task",
    "position_blind_accuracy",
]


def _check_d_model(d_model: object) -> int:
    check_positive_int(d_model, "d_model")
    if d_model % 2:
        raise ValueError(
            f"d_model must be even (sin and cos come in pairs), got {d_model}"
        )
    return d_model


def _check_base(base: object) -> float:
    return check_number(base, "base", low=1, low_open=True)


def _check_table(max_len: object, d_model: object, base: object) -> float:
    check_positive_int(max_len, "max_len")
    _check_d_model(d_model)
    return _check_base(base)


def angular_frequencies(d_model: int, base: float = 10000.0) -> torch.Tensor:
    r"""$\omega_i = \mathrm{base}^{-2i/d}$ for $i = 0 \dots d/2 - 1$, float64.

    The frequencies of the sinusoidal encoding, and of rotary embeddings (RoPE).
    """
    _check_d_model(d_model)
    _check_base(base)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (d/2,): 0, 2, 4, ...
    return base ** (-two_i / d_model)  # (d/2,)


def _check_equivariance_args(layer: object, x: object, perm: object) -> None:
    if not callable(layer):
        raise TypeError(f"layer must be callable, got {type(layer).__name__}")
    check_tensor(x, "x", ndim=3, floating=True)
    check_tensor(perm, "perm", ndim=1, dtype=torch.long)
    length = x.shape[1]
    # a check on the CPU copy: this is a measurement helper, not a forward pass
    if not torch.equal(perm.sort().values.cpu(), torch.arange(length)):
        raise ValueError(
            f"perm must be a permutation of 0..{length - 1} (x has length {length}), "
            f"got {perm.tolist()}"
        )


def sinusoidal_encoding(
    max_len: int, d_model: int, base: float = 10000.0
) -> torch.Tensor:
    r"""The sinusoidal encodings of positions ``0 .. max_len-1`` (Vaswani et al., 3.5).

    $PE_{p, 2i} = \sin(p\,\omega_i)$, $PE_{p, 2i+1} = \cos(p\,\omega_i)$, with
    $\omega_i = 1/\mathrm{base}^{2i/d}$: sine and cosine of the same frequency sit side
    by side (the interleaved layout). Computed in float64, returned as float32.
    """
    base = _check_table(max_len, d_model, base)
    positions = torch.arange(max_len, dtype=torch.float64)  # (max_len,)
    angles = positions[:, None] * angular_frequencies(d_model, base)  # (max_len, d/2)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (max_len, d/2, 2)
    return pe.flatten(1).float()  # (max_len, d): sin, cos, sin, cos, ...


def wavelengths(d_model: int, base: float = 10000.0) -> torch.Tensor:
    r"""The wavelength of each sin/cos pair, $\lambda_i = 2\pi\,\mathrm{base}^{2i/d}$.

    A geometric progression from $2\pi$ (``i = 0``) towards $2\pi \cdot \mathrm{base}$,
    with ratio $\mathrm{base}^{2/d}$; shape ``(d_model // 2,)``, float64.
    """
    _check_d_model(d_model)
    base = _check_base(base)
    return 2 * math.pi / angular_frequencies(d_model, base)  # (d/2,)


def _check_rotation_args(k: object, d_model: object, base: object) -> float:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    _check_d_model(d_model)
    return _check_base(base)


def rotation_matrix(k: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    r"""The matrix $M_k$ with $PE(p + k) = PE(p)\,M_k$ for every position $p$.

    Block-diagonal, one $2 \times 2$ rotation per frequency $\omega_i$:
    $\begin{pmatrix} \cos k\omega_i & -\sin k\omega_i \\
    \sin k\omega_i & \cos k\omega_i \end{pmatrix}$, from the angle-sum formulas
    $\sin(a + b) = \sin a \cos b + \cos a \sin b$ and
    $\cos(a + b) = \cos a \cos b - \sin a \sin b$. It does not depend on $p$. ``k`` may
    be negative. Shape ``(d_model, d_model)``, float64.
    """
    base = _check_rotation_args(k, d_model, base)
    angle = k * angular_frequencies(d_model, base)  # (d/2,)
    cos, sin = angle.cos(), angle.sin()
    # (d/2, 2, 2): [[cos, -sin], [sin, cos]] for each frequency
    blocks = torch.stack(
        [torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2
    )
    return torch.block_diag(*blocks)  # (d, d)


def similarity_by_offset(
    offsets: torch.Tensor, d_model: int, base: float = 10000.0
) -> torch.Tensor:
    r"""$PE(p) \cdot PE(q)$ as a function of the offset $k = p - q$ alone.

    $\sum_i \sin(p\omega_i)\sin(q\omega_i) + \cos(p\omega_i)\cos(q\omega_i)
    = \sum_i \cos(k\,\omega_i)$. ``offsets`` is any integer or float tensor; the
    result has its shape, in float64. At $k = 0$ it is $d/2$, the squared norm of
    every $PE(p)$.
    """
    check_tensor(offsets, "offsets")
    if offsets.dtype == torch.bool or offsets.is_complex():
        raise TypeError(f"offsets must be a real tensor, got dtype {offsets.dtype}")
    _check_d_model(d_model)
    base = _check_base(base)
    omega = angular_frequencies(d_model, base).to(offsets.device)  # (d/2,)
    # (..., d/2) -> (...)
    return torch.cos(offsets.double()[..., None] * omega).sum(-1)


def equivariance_error(
    layer: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    x: torch.Tensor,
    perm: torch.Tensor,
) -> float:
    r"""How far ``layer`` is from permutation-equivariant: $\max |f(x_\pi) - f(x)_\pi|$.

    ``x`` is ``(B, T, d)`` and ``perm`` a permutation of ``0 .. T-1``; ``layer`` maps
    ``(B, T, d)`` to ``(B, T, d')`` (or to a tuple whose first element is that, as
    :class:`~dlabc.transformers.attention_with_pytorch.MultiHeadAttention` returns).
    Permuting the tokens and then applying the layer is compared with applying the layer
    and then permuting its outputs. Zero (up to rounding) for self-attention without
    positions.
    """
    _check_equivariance_args(layer, x, perm)

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = layer(t)
        return out[0] if isinstance(out, tuple) else out  # (B, T, d')

    perm = perm.to(x.device)
    with torch.no_grad():
        permute_then_apply = apply(x[:, perm])  # f(x_pi)
        apply_then_permute = apply(x)[:, perm]  # f(x)_pi
    return (permute_then_apply - apply_then_permute).abs().max().item()


def _check_positions_input(
    x: torch.Tensor, offset: int, d_model: int, max_len: int
) -> None:
    check_tensor(x, "x", ndim=3, floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(
            f"x must have shape (batch, length, d_model={d_model}), "
            f"got {tuple(x.shape)}"
        )
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + x.shape[1] > max_len:
        raise ValueError(
            f"positions {offset}..{offset + x.shape[1] - 1} do not fit max_len="
            f"{max_len} (offset={offset}, length={x.shape[1]}); "
            "build the encoding with a larger max_len"
        )


def _check_sinusoidal_args(d_model: object, max_len: object, dropout: object) -> None:
    _check_d_model(d_model)
    check_positive_int(max_len, "max_len")
    check_number(dropout, "dropout", low=0, high=1, high_open=True)


class SinusoidalPositionalEncoding(nn.Module):
    r"""Add the sinusoidal encoding (Vaswani et al., section 3.5), then dropout.

    $\mathrm{out}_{b,t} = \mathrm{dropout}(x_{b,t} + PE_{\mathrm{offset} + t})$, with
    $PE$ from :func:`sinusoidal_encoding`. The table has no parameters: it is a buffer
    (moves with ``.to(device)``, not saved in the ``state_dict``). ``max_len`` only sets
    how far the table is precomputed; the formula itself has no last position.
    """

    def __init__(self, d_model: int, max_len: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        _check_sinusoidal_args(d_model, max_len, dropout)
        self.d_model, self.max_len = d_model, max_len
        self.dropout = nn.Dropout(dropout)
        # (max_len, d_model)
        self.register_buffer(
            "pe", sinusoidal_encoding(max_len, d_model), persistent=False
        )

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x`` ``(B, T, d_model)`` -> ``(B, T, d_model)``."""
        _check_positions_input(x, offset, self.d_model, self.max_len)
        pe = self.pe[offset : offset + x.shape[1]].to(x.dtype)  # (T, d_model)
        return self.dropout(x + pe)  # (B, T, d_model): pe broadcasts over the batch


class LearnedPositionalEmbedding(nn.Module):
    r"""Add a learned vector per position: $\mathrm{out}_{b,t} = x_{b,t} + P_{o+t}$.

    $o$ is ``offset``; $P$ is ``.embedding.weight``, a ``(max_len, d_model)`` table
    trained with the rest of the model (Gehring et al. 2017; BERT, GPT), initialised
    like BERT's and Hugging Face's GPT-2, $\mathcal N(0, 0.02^2)$. A position at or
    beyond ``max_len`` has no row: it cannot be represented at all.
    """

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        _check_sizes(max_len=max_len, d_model=d_model)
        self.max_len, self.d_model = max_len, d_model
        self.embedding = nn.Embedding(max_len, d_model)  # (max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x`` ``(B, T, d_model)`` -> ``(B, T, d_model)``."""
        _check_positions_input(x, offset, self.d_model, self.max_len)
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)  # (T,)
        return x + self.embedding(positions).to(x.dtype)  # (B, T, d_model)


class ScaledEmbedding(nn.Module):
    r"""Token embedding multiplied by $\sqrt{d_{model}}$ (Vaswani et al., section 3.4).

    $\mathrm{out} = E[\mathrm{tokens}]\,\sqrt{d_{model}}$, with $E$ the weight of
    ``.embedding`` (an ``nn.Embedding``). With ``scale=True`` $E$ starts as
    $\mathcal N(0, 1/d_{model})$ (the paper's reference code, tensor2tensor), so the
    scaled vectors have unit-variance entries and norm about $\sqrt{d_{model}}$,
    comparable to the $\sqrt{d_{model}/2}$ of a sinusoidal encoding. With
    ``scale=False`` it is a plain ``nn.Embedding`` with its default
    $\mathcal N(0, 1)$ start, and the same output scale.
    """

    def __init__(self, vocab_size: int, d_model: int, scale: bool = True) -> None:
        super().__init__()
        _check_sizes(vocab_size=vocab_size, d_model=d_model, scale=scale)
        self.d_model, self.scale = d_model, scale
        self.embedding = nn.Embedding(vocab_size, d_model)  # (vocab, d_model)
        if scale:
            nn.init.normal_(self.embedding.weight, std=d_model**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(...)``, int64 -> ``(..., d_model)``."""
        _check_tokens(tokens, self.embedding.num_embeddings)
        e = self.embedding(tokens)  # (..., d_model)
        return e * math.sqrt(self.d_model) if self.scale else e


def _check_sizes(scale: object = False, **sizes: object) -> None:
    for name, value in sizes.items():
        check_positive_int(value, name)
    if not isinstance(scale, bool):
        raise TypeError(f"scale must be a bool, got {type(scale).__name__}")


def _check_tokens(tokens: object, vocab: int) -> None:
    check_tensor(tokens, "tokens", dtype=torch.long)
    check_ids(tokens, "tokens", vocab)


POSITIONS = ("none", "sinusoidal", "learned")


def _check_position_kind(max_len: object, positions: object) -> None:
    check_positive_int(max_len, "max_len")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


class PositionTaskModel(nn.Module):
    """Token embedding, an optional position encoding, one attention, a linear readout.

    ``positions`` picks the encoding added to the :class:`ScaledEmbedding` of the
    tokens: ``"none"``, ``"sinusoidal"`` (:class:`SinusoidalPositionalEncoding`) or
    ``"learned"`` (:class:`LearnedPositionalEmbedding`). Only the attention mixes
    positions, so with ``"none"`` the whole model is permutation-equivariant.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        d_model: int = 32,
        n_heads: int = 2,
        positions: str = "sinusoidal",
    ) -> None:
        super().__init__()
        _check_position_kind(max_len, positions)
        self.positions = positions
        self.token_embedding = ScaledEmbedding(vocab_size, d_model)
        if positions == "sinusoidal":
            self.position_encoding = SinusoidalPositionalEncoding(d_model, max_len)
        elif positions == "learned":
            self.position_encoding = LearnedPositionalEmbedding(max_len, d_model)
        else:
            self.position_encoding = None
        self.attention = MultiHeadAttention(d_model, n_heads)
        self.readout = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` ``(B, T)`` -> logits ``(B, T, vocab)``, weights ``(B, h, T, T)``.

        Positions ``0 .. T-1``, so ``T`` must not exceed ``max_len`` (but see
        :class:`SinusoidalPositionalEncoding`: its table can be rebuilt longer).
        """
        check_tensor(tokens, "tokens", ndim=2, dtype=torch.long)
        x = self.token_embedding(tokens)  # (B, T, d_model)
        if self.position_encoding is not None:
            x = self.position_encoding(x)  # (B, T, d_model)
        h, weights = self.attention(x)  # (B, T, d_model), (B, h, T, T)
        return self.readout(h), weights  # (B, T, vocab)


def train_position_task(
    model: PositionTaskModel,
    test_tokens: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    evaluate_every: int = 25,
    generator: torch.Generator | None = None,
) -> History:
    """Train ``model`` to reverse fresh random sequences of ``test_tokens``' length.

    Adam, one batch of ``batch_size`` new sequences per step (:func:`reverse_task`);
    the token accuracy on ``test_tokens`` ``(n, T)`` is recorded every
    ``evaluate_every`` steps in ``history.metrics["token_accuracy"]``.
    """
    if not isinstance(model, PositionTaskModel):
        raise TypeError(
            f"model must be a PositionTaskModel, got {type(model).__name__}"
        )
    check_tensor(test_tokens, "test_tokens", ndim=2, dtype=torch.long)
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    seq_len, vocab_size = test_tokens.shape[1], model.readout.out_features
    device = model.readout.weight.device

    def batches():
        while True:
            yield reverse_task(batch_size, seq_len, vocab_size, generator, device)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        tokens, targets = batch
        logits, _ = model(tokens)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def evaluate_fn(model: nn.Module) -> dict[str, float]:
        return evaluate_reverse(model, test_tokens)

    return train_steps(
        model,
        torch.optim.Adam(model.parameters(), lr=lr),
        batches(),
        loss_fn,
        steps=steps,
        evaluate_every=evaluate_every,
        evaluate_fn=evaluate_fn,
    )


def position_blind_accuracy(tokens: torch.Tensor) -> float:
    r"""The best token accuracy an order-blind model can reach reversing ``tokens``.

    Without positions, output $i$ is a function of the token $x_i$ and of the multiset
    $M$ of all tokens, nothing else. Given both, the position $i$ is uniformly random,
    so the target $x_{T-1-i}$ is a uniformly random one of the other $T - 1$ tokens
    (for odd $T$, the middle position keeps its own token: a random one of all $T$).
    The best guess is the most frequent of them, right with probability
    $\max_v \mathrm{count}_v / (T-1)$ (or $/T$). Averaged over ``tokens`` ``(n, T)``.
    """
    check_tensor(tokens, "tokens", ndim=2, dtype=torch.long)
    if tokens.numel() == 0 or tokens.min() < 0:
        raise ValueError("tokens must be a non-empty tensor of token ids >= 0")
    n, length = tokens.shape
    if length < 2:
        raise ValueError(
            f"tokens must have length >= 2, got shape {tuple(tokens.shape)}"
        )
    counts = F.one_hot(tokens).sum(1)  # (n, vocab): the multiset M of each row
    if length % 2:
        best = counts.amax(-1, keepdim=True).expand(n, length) / length  # (n, T)
    else:
        own = F.one_hot(tokens, counts.shape[-1])  # (n, T, vocab)
        others = counts[:, None, :] - own  # (n, T, vocab): M without x_i
        best = others.amax(-1) / (length - 1)  # (n, T)
    return best.float().mean().item()
