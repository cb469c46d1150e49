"""Multi-head attention as an ``nn.Module``, checked against ``nn.MultiheadAttention``.

Chapter: ``book/transformers/attention_with_pytorch.md``.

References:
- Vaswani et al. (2017), *Attention Is All You Need*, section 3.2.2 (multi-head
  attention).
- Paszke et al. (2019),
  *PyTorch: An Imperative Style, High-Performance Deep Learning Library*.

The module keeps the paper's names: ``W_q``, ``W_k``, ``W_v`` and ``W_o`` are
``nn.Linear`` layers. ``nn.Linear`` computes ``x @ weight.T + bias``, so ``W_q.weight``
is the transpose of the paper's $W^Q$. Masks follow the previous chapter: boolean,
``True`` = may attend.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_positive_int, check_tensor
from dlabc.train import train_steps
from dlabc.transformers.attention_from_scratch import (
    check_mask,
    expand_mask_for_heads,
    merge_heads,
    split_heads,
)

__all__ = [
    "MultiHeadAttention",
    "mha_parameter_count",
    "to_torch",
    "from_torch",
    "reverse_task",
    "ReverseModel",
    "train_reverse",
    "evaluate_reverse",
]


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention (Vaswani et al., section 3.2.2).

    The output is $\mathrm{Concat}(\mathrm{head}_1, \dots, \mathrm{head}_h)\,W^O$. Each
    $\mathrm{head}_i = \mathrm{softmax}\big(Q_i K_i^\top / \sqrt{d_{head}}\big) V_i$
    works on its own ``d_head = d_model / n_heads`` features of the projections
    $Q = X_q W^Q$, $K = X_k W^K$, $V = X_v W^V$.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool = True) -> None:
        super().__init__()
        _check_heads(d_model, n_heads)
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.W_q = nn.Linear(d_model, d_model, bias=bias)
        self.W_k = nn.Linear(d_model, d_model, bias=bias)
        self.W_v = nn.Linear(d_model, d_model, bias=bias)
        self.W_o = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` ``(B, T_q, d_model)``; ``key``/``value`` ``(B, T_k, d_model)``,
        defaulting to ``query`` (self-attention); ``mask`` boolean, broadcasting to
        ``(B, T_q, T_k)``. Returns the output ``(B, T_q, d_model)`` and the weights
        ``(B, n_heads, T_q, T_k)``."""
        key = query if key is None else key
        value = key if value is None else value
        _check_qkv(query, key, value, mask, self.d_model)
        q = split_heads(self.W_q(query), self.n_heads)  # (B, h, T_q, d_head)
        k = split_heads(self.W_k(key), self.n_heads)  # (B, h, T_k, d_head)
        v = split_heads(self.W_v(value), self.n_heads)  # (B, h, T_k, d_head)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (B, h, T_q, T_k)
        if mask is not None:
            # a hidden key gets weight e^-inf = 0; the mask is (B, 1, T_q, T_k)
            scores = scores.masked_fill(~expand_mask_for_heads(mask), float("-inf"))
        weights = F.softmax(scores, dim=-1)  # (B, h, T_q, T_k)
        # (B, T_q, d_model), (B, h, T_q, T_k)
        return self.W_o(merge_heads(weights @ v)), weights


def _check_heads(d_model: object, n_heads: object) -> None:
    check_positive_int(d_model, "d_model")
    check_positive_int(n_heads, "n_heads")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")


def _check_qkv(query, key, value, mask, d_model: int) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name, ndim=3, floating=True)
        if t.shape[-1] != d_model:
            raise ValueError(
                f"{name} must end in d_model={d_model}, got shape {tuple(t.shape)}"
            )
    if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} must share the batch size, "
            "and key and value the length"
        )
    if mask is not None:
        shape = (query.shape[0], 1, query.shape[1], key.shape[1])  # (B, 1, T_q, T_k)
        check_mask(expand_mask_for_heads(mask), shape)


def mha_parameter_count(d_model: int, bias: bool = True) -> int:
    r"""Parameters of multi-head attention: four $d \times d$ matrices plus four biases.

    $4d^2 + 4d$ with biases, $4d^2$ without; the number of heads does not appear.
    """
    check_positive_int(d_model, "d_model")
    return 4 * d_model * d_model + (4 * d_model if bias else 0)


def to_torch(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    """A ``batch_first`` ``nn.MultiheadAttention`` with exactly the weights of ``mha``.

    PyTorch packs the three input projections into one ``in_proj_weight`` of shape
    ``(3 d_model, d_model)``: the rows of ``W_q``, then ``W_k``, then ``W_v``.
    """
    if not isinstance(mha, MultiHeadAttention):
        raise TypeError(
            f"to_torch expects a MultiHeadAttention, got {type(mha).__name__}"
        )
    bias = mha.W_q.bias is not None
    p = mha.W_q.weight
    ref = nn.MultiheadAttention(
        mha.d_model,
        mha.n_heads,
        bias=bias,
        batch_first=True,
        device=p.device,
        dtype=p.dtype,
    )
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([mha.W_q.weight, mha.W_k.weight, mha.W_v.weight])  # (3d, d)
        )
        ref.out_proj.weight.copy_(mha.W_o.weight)
        if bias:
            ref.in_proj_bias.copy_(
                torch.cat([mha.W_q.bias, mha.W_k.bias, mha.W_v.bias])  # (3d,)
            )
            ref.out_proj.bias.copy_(mha.W_o.bias)
    return ref


def from_torch(ref: nn.MultiheadAttention) -> MultiHeadAttention:
    """Our :class:`MultiHeadAttention` holding exactly the weights of ``ref``.

    The reverse of :func:`to_torch`.
    """
    if not isinstance(ref, nn.MultiheadAttention):
        raise TypeError(
            f"from_torch expects an nn.MultiheadAttention, got {type(ref).__name__}"
        )
    if not ref._qkv_same_embed_dim or ref.bias_k is not None or ref.dropout:
        raise ValueError(
            "from_torch supports nn.MultiheadAttention "
            "without kdim/vdim, add_bias_kv or dropout"
        )
    bias = ref.in_proj_bias is not None
    p = ref.in_proj_weight
    ours = MultiHeadAttention(ref.embed_dim, ref.num_heads, bias=bias).to(
        device=p.device, dtype=p.dtype
    )
    w_q, w_k, w_v = ref.in_proj_weight.chunk(3)  # each (d, d)
    with torch.no_grad():
        for layer, w in (
            (ours.W_q, w_q),
            (ours.W_k, w_k),
            (ours.W_v, w_v),
            (ours.W_o, ref.out_proj.weight),
        ):
            layer.weight.copy_(w)
        if bias:
            b_q, b_k, b_v = ref.in_proj_bias.chunk(3)
            for layer, b in (
                (ours.W_q, b_q),
                (ours.W_k, b_k),
                (ours.W_v, b_v),
                (ours.W_o, ref.out_proj.bias),
            ):
                layer.bias.copy_(b)
    return ours


def reverse_task(
    n: int,
    seq_len: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random token sequences ``(n, seq_len)`` and their reversals as targets."""
    for name, value in (("n", n), ("seq_len", seq_len), ("vocab_size", vocab_size)):
        check_positive_int(value, name)
    tokens = torch.randint(vocab_size, (n, seq_len), generator=generator).to(device)
    return tokens, tokens.flip(-1)


class ReverseModel(nn.Module):
    """Token and position embeddings, one :class:`MultiHeadAttention`, a linear readout.

    Output position ``i`` can only get the token it must emit from the input position
    ``seq_len - 1 - i``, so attention has to learn to point there; nothing else mixes
    positions.
    """

    def __init__(
        self, vocab_size: int, seq_len: int, d_model: int = 32, n_heads: int = 2
    ) -> None:
        super().__init__()
        check_positive_int(vocab_size, "vocab_size")
        check_positive_int(seq_len, "seq_len")
        self.seq_len = seq_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.attention = MultiHeadAttention(d_model, n_heads)
        self.readout = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and attention weights for ``tokens``.

        ``tokens`` ``(B, seq_len)`` -> logits ``(B, seq_len, vocab_size)`` and weights
        ``(B, h, T, T)``.
        """
        _check_tokens(tokens, self.seq_len)
        positions = torch.arange(self.seq_len, device=tokens.device)  # (T,)
        # (B, T, d_model)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        h, weights = self.attention(x)  # (B, T, d_model), (B, h, T, T)
        return self.readout(h), weights  # (B, T, vocab)


def _check_tokens(tokens: object, seq_len: int) -> None:
    check_tensor(tokens, "tokens", ndim=2, dtype=torch.long)
    if tokens.shape[1] != seq_len:
        raise ValueError(
            f"tokens must have length seq_len={seq_len}, got shape {tuple(tokens.shape)}"
        )


def train_reverse(
    model: ReverseModel,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train ``model`` with Adam on fresh reversal batches; return the loss per step.

    The loop is the book's :func:`dlabc.train.train_steps`, over an endless stream of
    new random sequences.
    """
    if not isinstance(model, ReverseModel):
        raise TypeError(
            f"train_reverse expects a ReverseModel, got {type(model).__name__}"
        )
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    device = model.readout.weight.device
    vocab_size = model.readout.out_features

    def fresh_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield reverse_task(batch_size, model.seq_len, vocab_size, generator, device)

    def loss_fn(model: ReverseModel, batch: tuple[torch.Tensor, torch.Tensor]):
        tokens, targets = batch  # (B, T) each
        logits, _ = model(tokens)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    return train_steps(
        model, optimizer, fresh_batches(), loss_fn, steps=steps
    ).step_loss


@torch.no_grad()
def evaluate_reverse(model: ReverseModel, tokens: torch.Tensor) -> dict[str, float]:
    """Token and whole-sequence accuracy of ``model`` on ``tokens`` ``(n, seq_len)``."""
    model.eval()
    logits, _ = model(tokens)
    correct = logits.argmax(-1) == tokens.flip(-1)  # (n, T)
    return {
        "token_accuracy": correct.float().mean().item(),
        "sequence_accuracy": correct.all(-1).float().mean().item(),
    }
