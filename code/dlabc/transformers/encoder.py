"""The Transformer encoder: residual connections, layer normalization, the position-wise
feed-forward network, the encoder layer and a stack of them, post-LN and pre-LN.

Chapter: ``book/transformers/encoder.md``.

References:
- Vaswani et al. (2017), *Attention Is All You Need*, section 3.1 (the encoder stack,
  ``LayerNorm(x + Sublayer(x))``) and section 3.3 (eq. 2, the feed-forward network).
- He et al. (2016), *Deep Residual Learning for Image Recognition* (residual
  connections).
- Ba, Kiros & Hinton (2016), *Layer Normalization*.
- Wang et al. (2019), *Learning Deep Transformer Models for Machine Translation*, and
  Xiong et al. (2020), *On Layer Normalization in the Transformer Architecture*
  (pre-LN: the norm moves inside the residual branch).
- Dong, Cordonnier & Loukas (2021), *Attention Is Not All You Need: Pure Attention
  Loses Rank Doubly Exponentially with Depth* (why the residual connections matter).
- Weiss, Goldberg & Yahav (2021), *Thinking Like Transformers* (counting tasks that
  attention solves by selecting equal tokens, as in :func:`count_task`).

The attention is the attention chapter's :class:`MultiHeadAttention`, the norm is the
foundations part's :class:`LayerNorm`; masks are boolean, ``True`` = may attend. The
layers keep the attribute names of ``nn.TransformerEncoderLayer`` (``self_attn``,
``norm1``, ``norm2``, ``dropout1``, ``dropout2``; ``ff.linear1``, ``ff.linear2``), so
that :func:`to_torch` is a short copy. Shapes: ``B`` batch, ``T`` positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.foundations.normalization import LayerNorm
from dlabc.rnn.seq2seq import PAD, SPECIALS
from dlabc.transformers.attention_from_scratch import padding_mask
from dlabc.transformers.attention_with_pytorch import (
    MultiHeadAttention,
    mha_parameter_count,
)
from dlabc.transformers.attention_with_pytorch import to_torch as mha_to_torch
from dlabc.transformers.positional_encoding import (
    ScaledEmbedding,
    SinusoidalPositionalEncoding,
)

__all__ = [
    "FeedForward",
    "EncoderLayer",
    "TransformerEncoder",
    "encoder_parameter_count",
    "to_torch",
    "hidden_states",
    "layer_gradient_norms",
    "mean_token_cosine",
    "count_task",
    "CountingEncoder",
    "count_accuracy",
    "position_only_accuracy",
    "match_attention",
]


def _check_dropout(dropout: float) -> float:
    return check_number(dropout, "dropout", low=0, high=1, high_open=True)


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_sizes(**sizes: object) -> None:
    for name, value in sizes.items():
        check_positive_int(value, name)


def _check_features(x: object, d_model: int) -> None:
    """``x`` must be a float ``(..., d_model)`` tensor."""
    check_tensor(x, "x", floating=True)
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(f"x must end in d_model={d_model}, got shape {tuple(x.shape)}")


def _check_input_and_mask(x: object, d_model: int, mask: object) -> None:
    _check_input(x, d_model)
    _check_encoder_mask(mask, x)


def _check_stack(n_layers: object, norm_first: object, final_norm: object) -> bool:
    """Check the arguments; return ``final_norm``, by default ``norm_first``."""
    check_positive_int(n_layers, "n_layers")
    _check_flag(norm_first, "norm_first")
    return _check_flag(norm_first if final_norm is None else final_norm, "final_norm")


def _check_counting_input(tokens: object, lengths: object, max_len: int) -> None:
    check_tensor(tokens, "tokens", ndim=2, dtype=torch.long)
    if tokens.shape[1] > max_len:
        raise ValueError(
            f"tokens may have at most max_len={max_len} positions, "
            f"got shape {tuple(tokens.shape)}"
        )
    check_tensor(lengths, "lengths", ndim=1)
    if len(lengths) != len(tokens):
        raise ValueError(
            f"lengths {tuple(lengths.shape)} must have one entry per sequence "
            f"of tokens {tuple(tokens.shape)}"
        )


def _check_input(x: torch.Tensor, d_model: int) -> None:
    """``x`` must be a float ``(B, T, d_model)`` tensor."""
    check_tensor(x, "x", ndim=3, floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(
            f"x must have shape (batch, length, d_model={d_model}), "
            f"got {tuple(x.shape)}"
        )


def _check_encoder_mask(mask: torch.Tensor | None, x: torch.Tensor) -> None:
    """A self-attention mask must be boolean and broadcast to ``(B, T, T)``."""
    if mask is None:
        return
    check_tensor(mask, "mask", dtype=torch.bool)
    batch, length, _ = x.shape
    expected = (batch, length, length)
    try:
        fits = torch.broadcast_shapes(mask.shape, expected) == expected
    except RuntimeError:
        fits = False
    if not fits or mask.dim() > 3:
        raise ValueError(
            f"mask must broadcast to (batch, T, T) = {expected}, e.g. a padding mask "
            f"(batch, 1, T), got shape {tuple(mask.shape)}"
        )


class FeedForward(nn.Module):
    r"""The position-wise feed-forward network (Vaswani et al., eq. 2).

    $\mathrm{FFN}(x) = \max(0,\, x W_1 + b_1)\, W_2 + b_2$, applied to every position
    on its own: two ``nn.Linear`` layers, ``d_model -> d_ff -> d_model``, with a ReLU
    (and dropout, as in PyTorch) between them. ``x`` is ``(..., d_model)``.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        _check_sizes(d_model=d_model, d_ff=d_ff)
        self.d_model, self.d_ff = d_model, d_ff
        self.linear1 = nn.Linear(d_model, d_ff)  # W_1, b_1
        self.linear2 = nn.Linear(d_ff, d_model)  # W_2, b_2
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.d_model)
        hidden = F.relu(self.linear1(x))  # (..., d_ff): max(0, x W_1 + b_1)
        return self.linear2(self.dropout(hidden))  # (..., d_model)


class EncoderLayer(nn.Module):
    r"""One encoder layer: self-attention, then the feed-forward network, each wrapped
    in a residual connection and a layer norm.

    Post-LN, as in the paper (``norm_first=False``): every sublayer $F$ becomes
    $x \leftarrow \mathrm{LayerNorm}(x + F(x))$.
    Pre-LN (``norm_first=True``, Wang et al. 2019; Xiong et al. 2020):
    $x \leftarrow x + F(\mathrm{LayerNorm}(x))$, so the path $x \to x$ is the identity.
    With ``residual=False`` the ``x +`` is left out (an ablation, not a model to use):
    $x \leftarrow \mathrm{LayerNorm}(F(x))$ or $x \leftarrow F(\mathrm{LayerNorm}(x))$.

    Dropout is applied to each sublayer's output before the addition, and inside the
    feed-forward network; the attention weights themselves are not dropped.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = False,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.norm_first = _check_flag(norm_first, "norm_first")
        self.residual = _check_flag(residual, "residual")
        self.self_attn = MultiHeadAttention(d_model, n_heads)  # checks d_model, heads
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1 = LayerNorm(d_model, eps=1e-5)
        self.norm2 = LayerNorm(d_model, eps=1e-5)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.d_model, self.n_heads, self.d_ff = d_model, n_heads, d_ff

    def _add(self, x: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        """The residual connection, ``x + F(x)``; just ``F(x)`` without residuals."""
        return x + sublayer_out if self.residual else sublayer_out

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, T, d_model)``, ``mask`` boolean broadcasting to ``(B, T, T)``.

        Returns the new ``x`` ``(B, T, d_model)`` and the attention weights
        ``(B, n_heads, T, T)``.
        """
        _check_input_and_mask(x, self.d_model, mask)
        if self.norm_first:
            # x + Dropout(MultiHead(LN(x))), then x + Dropout(FFN(LN(x)))
            attended, weights = self.self_attn(self.norm1(x), mask=mask)
            x = self._add(x, self.dropout1(attended))
            x = self._add(x, self.dropout2(self.ff(self.norm2(x))))
        else:
            # LN(x + Dropout(MultiHead(x))), then LN(x + Dropout(FFN(x)))
            attended, weights = self.self_attn(x, mask=mask)
            x = self.norm1(self._add(x, self.dropout1(attended)))
            x = self.norm2(self._add(x, self.dropout2(self.ff(x))))
        return x, weights  # (B, T, d_model), (B, h, T, T)


class TransformerEncoder(nn.Module):
    r"""A stack of ``n_layers`` :class:`EncoderLayer`, and an optional final norm.

    $x^{(l)} = \mathrm{Layer}_l(x^{(l-1)})$ for $l = 1, \dots, N$. A pre-LN stack
    ends in an un-normalized residual stream, so it needs a last
    $\mathrm{LayerNorm}(x^{(N)})$; a post-LN stack already ends in a norm.
    ``final_norm=None`` therefore means "a final norm iff ``norm_first``".
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = False,
        final_norm: bool | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        final_norm = _check_stack(n_layers, norm_first, final_norm)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout, norm_first, residual)
            for _ in range(n_layers)
        )
        self.norm = LayerNorm(d_model, eps=1e-5) if final_norm else None
        self.d_model = d_model

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x`` ``(B, T, d_model)``, ``mask`` boolean broadcasting to ``(B, T, T)``.

        Returns the output ``(B, T, d_model)`` and the attention weights of every
        layer, a list of ``n_layers`` tensors ``(B, n_heads, T, T)``.
        """
        _check_input_and_mask(x, self.d_model, mask)
        all_weights = []
        for layer in self.layers:
            x, weights = layer(x, mask)  # (B, T, d_model), (B, h, T, T)
            all_weights.append(weights)
        if self.norm is not None:
            x = self.norm(x)
        return x, all_weights


def encoder_parameter_count(
    n_layers: int, d_model: int, d_ff: int, final_norm: bool = False
) -> int:
    r"""Parameters of a :class:`TransformerEncoder`, in closed form.

    Per layer: attention $4d^2 + 4d$, feed-forward $2\,d\,d_{ff} + d_{ff} + d$, two
    norms $4d$; times $N$ layers, plus $2d$ for a final norm. The number of heads does
    not appear.
    """
    check_positive_int(n_layers, "n_layers")
    check_positive_int(d_model, "d_model")
    check_positive_int(d_ff, "d_ff")
    _check_flag(final_norm, "final_norm")
    attention = mha_parameter_count(d_model)
    feed_forward = (d_model * d_ff + d_ff) + (d_ff * d_model + d_model)
    norms = 2 * (2 * d_model)  # a scale and a shift per feature, twice
    return n_layers * (attention + feed_forward + norms) + (
        2 * d_model if final_norm else 0
    )


def _layer_to_torch(layer: EncoderLayer) -> nn.TransformerEncoderLayer:
    if not layer.residual:
        raise ValueError(
            "nn.TransformerEncoderLayer always has residual connections; "
            "a layer built with residual=False has no PyTorch equivalent"
        )
    p = layer.ff.linear1.weight
    ref = nn.TransformerEncoderLayer(
        layer.d_model,
        layer.n_heads,
        dim_feedforward=layer.d_ff,
        dropout=layer.dropout1.p,
        activation="relu",
        layer_norm_eps=layer.norm1.eps,
        batch_first=True,
        norm_first=layer.norm_first,
        device=p.device,
        dtype=p.dtype,
    )
    # ours has no dropout on the attention weights, and neither has this copy
    ref.self_attn = mha_to_torch(layer.self_attn)
    with torch.no_grad():
        for mine, theirs in (
            (layer.ff.linear1, ref.linear1),
            (layer.ff.linear2, ref.linear2),
            (layer.norm1, ref.norm1),
            (layer.norm2, ref.norm2),
        ):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    return ref


def to_torch(
    module: EncoderLayer | TransformerEncoder,
) -> nn.TransformerEncoderLayer | nn.TransformerEncoder:
    """PyTorch's ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder``
    (``batch_first=True``) holding exactly the weights of ``module``.

    The attention goes through the attention chapter's ``to_torch``; the feed-forward
    layers and the norms are copied one to one. PyTorch's masks say ``True`` =
    *hidden*: pass ``src_key_padding_mask=~pad[:, 0]`` for our padding mask ``pad``.
    The nested-tensor fast path is switched off (``enable_nested_tensor=False``).
    """
    if isinstance(module, EncoderLayer):
        return _layer_to_torch(module)
    if not isinstance(module, TransformerEncoder):
        raise TypeError(
            "to_torch expects an EncoderLayer or a TransformerEncoder, "
            f"got {type(module).__name__}"
        )
    layers = [_layer_to_torch(layer) for layer in module.layers]
    norm = None
    if module.norm is not None:
        p = module.norm.weight
        norm = nn.LayerNorm(
            module.d_model, eps=module.norm.eps, device=p.device, dtype=p.dtype
        )
        with torch.no_grad():
            norm.weight.copy_(module.norm.weight)
            norm.bias.copy_(module.norm.bias)
    ref = nn.TransformerEncoder(
        layers[0], len(layers), norm=norm, enable_nested_tensor=False
    )
    ref.layers = nn.ModuleList(layers)  # our weights, layer by layer
    return ref


def hidden_states(
    encoder: TransformerEncoder, x: torch.Tensor, mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The residual stream entering every layer and leaving the last one.

    Returns ``n_layers + 1`` tensors ``(B, T, d_model)``: ``x`` itself, then the
    output of each layer (without the final norm).
    """
    if not isinstance(encoder, TransformerEncoder):
        raise TypeError(
            f"encoder must be a TransformerEncoder, got {type(encoder).__name__}"
        )
    _check_input(x, encoder.d_model)
    _check_encoder_mask(mask, x)
    states = [x]
    for layer in encoder.layers:
        x, _ = layer(x, mask)
        states.append(x)
    return states


def layer_gradient_norms(encoder: TransformerEncoder) -> torch.Tensor:
    r"""The norm of the gradient of each layer's parameters, after ``backward()``.

    $\lVert \nabla_{\theta_l} L \rVert_2$ over all parameters $\theta_l$ of layer $l$;
    returns a tensor ``(n_layers,)``, the first layer first.
    """
    if not isinstance(encoder, TransformerEncoder):
        raise TypeError(
            f"encoder must be a TransformerEncoder, got {type(encoder).__name__}"
        )
    norms = []
    for i, layer in enumerate(encoder.layers):
        grads = [p.grad for p in layer.parameters()]
        if any(g is None for g in grads):
            raise ValueError(
                f"layer {i} has parameters without a gradient; call backward() first"
            )
        squares = torch.stack([g.detach().double().square().sum() for g in grads])
        norms.append(squares.sum().sqrt())
    return torch.stack(norms).float()  # (n_layers,)


def mean_token_cosine(h: torch.Tensor) -> torch.Tensor:
    r"""The mean cosine similarity between the representations of different positions.

    For ``h`` ``(B, T, d)``: the average over the batch and over all pairs $i \ne j$
    of $\cos(h_i, h_j)$. It is 1 when all positions hold the same direction, the
    "rank collapse" of deep attention without residual connections (Dong et al.).
    """
    check_tensor(h, "h", ndim=3, floating=True)
    if h.shape[1] < 2:
        raise ValueError(f"h needs at least 2 positions, got shape {tuple(h.shape)}")
    unit = F.normalize(h, dim=-1)  # (B, T, d), every row of length 1
    cos = unit @ unit.transpose(1, 2)  # (B, T, T)
    length = h.shape[1]
    off_diagonal = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)  # (B,)
    return (off_diagonal / (length * (length - 1))).mean()


def count_task(
    n: int,
    max_len: int,
    n_symbols: int,
    min_len: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` random sequences, right-padded to ``max_len``, and for every position the
    number of *earlier* positions holding the same symbol.

    Symbols are the token ids ``len(SPECIALS), ...`` (after ``<pad>``, ``<bos>``,
    ``<eos>``); ``<pad>`` (0) fills each sequence after its length, drawn uniformly in
    ``min_len..max_len``. The target of a real position is ``1 + count`` and ``<pad>``
    after the end, so :func:`dlabc.rnn.seq2seq.sequence_loss` ignores the padding.
    Returns tokens ``(n, max_len)``, targets ``(n, max_len)``, lengths ``(n,)``.
    """
    for name, value in (("n", n), ("max_len", max_len), ("n_symbols", n_symbols)):
        check_positive_int(value, name)
    check_positive_int(min_len, "min_len")
    if min_len > max_len:
        raise ValueError(f"min_len={min_len} must not exceed max_len={max_len}")
    symbols = torch.randint(n_symbols, (n, max_len), generator=generator)  # (n, T)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)  # (n,)
    real = padding_mask(lengths, max_len)[:, 0]  # (n, T), True before the end
    same = symbols[:, :, None] == symbols[:, None, :]  # (n, T, T): x_i == x_j
    earlier = torch.ones(max_len, max_len, dtype=torch.bool).tril(-1)  # j < i
    counts = (same & earlier).sum(-1)  # (n, T)
    tokens = torch.where(real, symbols + len(SPECIALS), PAD)
    targets = torch.where(real, counts + 1, PAD)
    return tokens.to(device), targets.to(device), lengths.to(device)


class CountingEncoder(nn.Module):
    """Scaled token embeddings plus sinusoidal positions, a :class:`TransformerEncoder`,
    and a linear read-out at every position: a sequence tagger.

    For :func:`count_task`: the read-out has ``max_len + 1`` classes, the count plus
    one and ``<pad>``.
    """

    def __init__(
        self,
        n_symbols: int,
        max_len: int,
        n_layers: int = 2,
        d_model: int = 32,
        n_heads: int = 2,
        d_ff: int = 64,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(n_symbols=n_symbols, max_len=max_len)
        self.max_len = max_len
        self.embedding = ScaledEmbedding(len(SPECIALS) + n_symbols, d_model)
        self.positions = SinusoidalPositionalEncoding(d_model, max_len=max_len)
        self.encoder = TransformerEncoder(
            n_layers, d_model, n_heads, d_ff, norm_first=norm_first
        )
        self.readout = nn.Linear(d_model, max_len + 1)

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``tokens`` ``(B, T)`` right-padded, ``lengths`` ``(B,)`` -> logits
        ``(B, T, max_len + 1)`` and the attention weights of every layer."""
        _check_counting_input(tokens, lengths, self.max_len)
        mask = padding_mask(lengths, tokens.shape[1])  # (B, 1, T): padding hidden
        x = self.positions(self.embedding(tokens))  # (B, T, d_model)
        h, weights = self.encoder(x, mask)  # (B, T, d_model), [(B, h, T, T)] * L
        return self.readout(h), weights  # (B, T, max_len + 1)


@torch.no_grad()
def count_accuracy(
    model: CountingEncoder,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    lengths: torch.Tensor,
) -> float:
    """The fraction of real (non-padded) positions whose count ``model`` gets right."""
    if not isinstance(model, CountingEncoder):
        raise TypeError(f"model must be a CountingEncoder, got {type(model).__name__}")
    check_tensor(targets, "targets", ndim=2, dtype=torch.long)
    if targets.shape != tokens.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have the shape of tokens "
            f"{tuple(tokens.shape)}"
        )
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(tokens, lengths)  # (B, T, C)
    finally:
        model.train(was_training)
    real = targets != PAD
    return (logits.argmax(-1) == targets)[real].float().mean().item()


def position_only_accuracy(targets: torch.Tensor) -> float:
    """The accuracy of the best guess that sees only the position, not the symbols.

    For every position it predicts the most frequent target of that position in
    ``targets`` ``(n, T)`` (``<pad>`` excluded), and scores the guess on the same
    ``targets``: the baseline a model must beat to have used its attention.
    """
    check_tensor(targets, "targets", ndim=2, dtype=torch.long)
    real = targets != PAD  # (n, T)
    if not real.any():
        raise ValueError("targets has no real (non-<pad>) position")
    correct = 0
    for t in range(targets.shape[1]):
        column = targets[real[:, t], t]  # the real targets at position t
        if len(column):
            correct += column.bincount().max().item()  # the mode's frequency
    return correct / real.sum().item()


def match_attention(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """How much of its attention each head puts on keys that hold the query's symbol
    at or before the query's position: the keys :func:`count_task` asks about.

    ``weights`` ``(B, h, T, T)``, ``tokens`` ``(B, T)`` right-padded with ``<pad>``.
    Returns ``(h,)``: the weight on those keys, averaged over all real queries.
    """
    check_tensor(weights, "weights", ndim=4, floating=True)
    check_tensor(tokens, "tokens", ndim=2, dtype=torch.long)
    batch, _, length, _ = weights.shape
    if weights.shape[2:] != (length, length) or tokens.shape != (batch, length):
        raise ValueError(
            f"weights (B, h, T, T) and tokens (B, T) must agree, got "
            f"{tuple(weights.shape)} and {tuple(tokens.shape)}"
        )
    real = tokens != PAD  # (B, T)
    same = tokens[:, :, None] == tokens[:, None, :]  # (B, T, T): x_j == x_i
    not_later = torch.ones(length, length, dtype=torch.bool, device=tokens.device)
    targets = same & not_later.tril() & real[:, None, :]  # (B, T, T): j <= i
    mass = (weights * targets[:, None]).sum(-1)  # (B, h, T)
    return (mass * real[:, None]).sum((0, 2)) / real.sum()  # (h,)
