r"""GPT-3: the scaling table, alternating dense and banded attention, and in-context
learning.

Chapter: ``book/language_models/gpt3_icl.md``.

References:
- Brown et al. (2020), *Language Models are Few-Shot Learners*, NeurIPS: the eight
  models of their Table 2.1 (:data:`TABLE_2_1`, :data:`CONFIGS`), their training
  compute in Table D.1 (:data:`TABLE_D_1`), GPT-2's architecture "with the exception
  that we use alternating dense and locally banded sparse attention patterns in the
  layers of the transformer, similar to the Sparse Transformer", a context of 2048
  tokens, and in-context (zero-, one- and few-shot) learning.
- Radford et al. (2019), *Language Models are Unsupervised Multitask Learners* (GPT-2:
  pre-LN blocks, learned positions, a GELU network of width $4d$, biases everywhere,
  the read-out tied to the token embedding, residual projections initialised with
  $0.02/\sqrt{2L}$).
- Child, Gray, Radford & Sutskever (2019), *Generating Long Sequences with Sparse
  Transformers* (the banded local pattern).
- Kaplan et al. (2020), *Scaling Laws for Neural Language Models* ($N \approx 12\,L
  d^2$, $C \approx 6ND$).
- Elhage et al. (2021), *A Mathematical Framework for Transformer Circuits*, and
  Olsson et al. (2022), *In-context Learning and Induction Heads*, Transformer
  Circuits Thread (the two-layer mechanism that copies what followed an earlier
  occurrence).

:class:`GPT3` is the GPT-2 chapter's :class:`~dlabc.language_models.gpt2.GPT2` with
every odd block's attention replaced by :class:`BandedAttention`, GPT-2's attention
limited to the band of :func:`banded_causal_mask`, as in Hugging Face's GPT-Neo
(``attention_types`` global, local), whose weights ours copy into
(:func:`gpt_neo_state_dict`). The paper does not publish the band's width; the
default, 256, is GPT-Neo's ``window_size``. :func:`gpt3_parameters` counts the
parameters in closed form. :func:`recall_episodes` and the functions after it are the
associative-recall task on which a small decoder (the book's
:class:`~dlabc.improvements.modern_block.BlockLM`) learns in context, and
:func:`attention_maps` shows its induction head. Shapes: ``B`` batch, ``T`` positions,
``S`` cached plus new positions, ``h`` heads, ``N`` key-value pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_positive_int, check_tensor
from dlabc.improvements.gqa_kv_cache import LayerKVCache, repeat_kv
from dlabc.improvements.modern_block import BlockLM
from dlabc.improvements.rope_alibi import apply_rope, rope_cos_sin
from dlabc.language_models.gpt2 import GPT2, GPT2Attention, GPT2Config
from dlabc.transformers.attention_from_scratch import merge_heads, split_heads

__all__ = [
    "TABLE_2_1",
    "TABLE_D_1",
    "TOKENS",
    "PF_DAY",
    "GPT3Config",
    "CONFIGS",
    "banded_causal_mask",
    "gpt3_parameters",
    "BandedAttention",
    "GPT3",
    "gpt_neo_state_dict",
    "attention_maps",
    "recall_episodes",
    "recall_loss",
    "recall_correct",
    "seen_before",
    "optimal_recall_accuracy",
]

#: Brown et al. (2020), Table 2.1, as printed: name -> (parameters, n_layers,
#: d_model, n_heads, d_head, batch size in tokens, learning rate). Two rows do not
#: add up: XL's 24 heads of 128 make 3072, not its d_model of 2048, and 13B's d_model
#: of 5140 is not its 40 heads of 128 (5120); :data:`CONFIGS` says what it takes.
TABLE_2_1: dict[str, tuple[float, int, int, int, int, float, float]] = {
    "gpt3-small": (125e6, 12, 768, 12, 64, 0.5e6, 6.0e-4),
    "gpt3-medium": (350e6, 24, 1024, 16, 64, 0.5e6, 3.0e-4),
    "gpt3-large": (760e6, 24, 1536, 16, 96, 0.5e6, 2.5e-4),
    "gpt3-xl": (1.3e9, 24, 2048, 24, 128, 1e6, 2.0e-4),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 80, 1e6, 1.6e-4),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 128, 2e6, 1.2e-4),
    "gpt3-13b": (13.0e9, 40, 5140, 40, 128, 2e6, 1.0e-4),
    "gpt3-175b": (175.0e9, 96, 12288, 96, 128, 3.2e6, 0.6e-4),
}

#: Brown et al. (2020), Table D.1: name -> (parameters, total training compute in
#: FLOPs), every model trained on 300 billion tokens.
TABLE_D_1: dict[str, tuple[float, float]] = {
    "gpt3-small": (125e6, 2.25e20),
    "gpt3-medium": (356e6, 6.41e20),
    "gpt3-large": (760e6, 1.37e21),
    "gpt3-xl": (1320e6, 2.38e21),
    "gpt3-2.7b": (2650e6, 4.77e21),
    "gpt3-6.7b": (6660e6, 1.20e22),
    "gpt3-13b": (12850e6, 2.31e22),
    "gpt3-175b": (174600e6, 3.14e23),
}

#: The training tokens of every GPT-3 model (Brown et al., section 2.2).
TOKENS = 300e9

#: A petaflop/s-day, the unit of Table D.1: $10^{15}$ FLOP/s for a day.
PF_DAY = 1e15 * 24 * 3600


@dataclass(frozen=True)
class GPT3Config(GPT2Config):
    """GPT-2's configuration (:class:`~dlabc.language_models.gpt2.GPT2Config`) with a
    context of 2048 positions and ``band``: the odd layers (1, 3, ...) see only the
    ``band`` most recent positions; ``None`` makes every layer dense."""

    n_positions: int = 2048
    band: int | None = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.band is not None:
            check_positive_int(self.band, "band")


def _config(name: str) -> GPT3Config:
    _, n_layers, d_model, n_heads, d_head, _, _ = TABLE_2_1[name]
    if n_heads * d_head != d_model:  # the two rows that do not add up (see TABLE_2_1)
        if name == "gpt3-xl":  # d_model = 2048 is right: 16 heads of 128
            n_heads = d_model // d_head
        else:  # 13B: 40 heads of 128 are right, d_model = 5120
            d_model = n_heads * d_head
    return GPT3Config(d_model=d_model, n_layers=n_layers, n_heads=n_heads)


#: The eight models of Brown et al. (2020), Table 2.1, with the two rows that do not
#: add up made consistent: GPT-3 XL with 16 heads of 128 (the table prints 24) and
#: GPT-3 13B with ``d_model`` 5120 (the table prints 5140). Their parameter counts then
#: match Table D.1's, which the printed rows do not.
CONFIGS: dict[str, GPT3Config] = {name: _config(name) for name in TABLE_2_1}


def gpt3_parameters(
    n_layers: int,
    d_model: int,
    d_attn: int | None = None,
    vocab_size: int = 50257,
    n_positions: int = 2048,
) -> int:
    r"""The parameters of a :class:`GPT3`, in closed form, for any attention width.

    A block has $4\,d\,d_a + 3d_a + d$ in attention (query, key, value and output
    weights, their biases), $8d^2 + 5d$ in the network of width $4d$, $4d$ in two
    LayerNorms; the embedding $Vd$ (tied to the read-out), the positions
    $n_{ctx}\,d$ and the final LayerNorm $2d$ come once. With $d_a = d$ (the
    default) a block has $12d^2 + 13d$: Kaplan et al.'s $12\,L\,d^2$ is its leading
    term, summed over the layers.
    """
    _check_sizes(n_layers, d_model, d_attn or d_model, vocab_size, n_positions)
    d, a = d_model, d_attn or d_model
    block = (4 * d * a + 3 * a + d) + (8 * d * d + 5 * d) + 4 * d
    return n_layers * block + vocab_size * d + n_positions * d + 2 * d


def _check_sizes(*sizes: object) -> None:
    names = ("n_layers", "d_model", "d_attn", "vocab_size", "n_positions")
    for name, value in zip(names, sizes, strict=True):
        check_positive_int(value, name)


def _check_mask(n_queries: object, n_keys: object, band: object) -> None:
    check_positive_int(n_queries, "n_queries")
    check_positive_int(n_keys, "n_keys")
    if band is not None:
        check_positive_int(band, "band")
    if n_queries > n_keys:
        raise ValueError(f"n_queries={n_queries} must be <= n_keys={n_keys}")


def banded_causal_mask(
    n_queries: int,
    n_keys: int,
    band: int | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The locally banded causal pattern, ``(T, S)``, ``True`` = may attend.

    The $T$ queries are the last $T$ of the $S$ positions. Query $i$ sees key $j$ when
    $0 \le i - j < b$: itself and the $b - 1$ positions before it. ``band=None`` (or
    $b \ge S$) is the dense causal mask.
    """
    _check_mask(n_queries, n_keys, band)
    i = torch.arange(n_keys - n_queries, n_keys, device=device)  # query positions
    j = torch.arange(n_keys, device=device)  # key positions
    offset = i[:, None] - j[None, :]  # (T, S): i - j
    return (offset >= 0) & (offset < (band or n_keys))


class BandedAttention(GPT2Attention):
    r"""GPT-2's attention (:class:`~dlabc.language_models.gpt2.GPT2Attention`, same
    weights) limited to a band: $\mathrm{head}_k = \mathrm{softmax}\big(Q_k
    K_k^\top / \sqrt{d_{head}} + M\big) V_k$ with $M = 0$ where
    :func:`banded_causal_mask` allows a key and $-\infty$ elsewhere. A banded layer
    costs $O(T\,b)$ instead of $O(T^2)$ when computed block by block, as the Sparse
    Transformer's kernels did; here it is the dense product with a mask.
    """

    def __init__(
        self, d_model: int, n_heads: int, band: int, dropout: float = 0.0
    ) -> None:
        super().__init__(d_model, n_heads, dropout)
        self.band = check_positive_int(band, "band")

    def forward(
        self, x: torch.Tensor, cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # (B, T, d) each
        q = split_heads(q, self.n_heads)  # (B, h, T, d_head)
        k = split_heads(k, self.n_heads)  # (B, h, T, d_head)
        v = split_heads(v, self.n_heads)  # (B, h, T, d_head)
        if cache is not None:  # the earlier positions' keys and values, then ours
            k, v = cache.update(k, v)  # (B, h, S, d_head)
        # M: 0 <= i - j < band
        mask = banded_causal_mask(q.shape[2], k.shape[2], self.band, x.device)
        p = self.dropout if self.training else 0.0  # dropout on the weights
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_drop(self.c_proj(merge_heads(out)))  # (B, T, d)


class GPT3(GPT2):
    r"""GPT-3: GPT-2 (:class:`~dlabc.language_models.gpt2.GPT2`: learned positions,
    pre-LN blocks, a GELU network of width $4d$, a read-out tied to the embedding)
    with every other layer banded. Blocks $0, 2, 4, \dots$ attend densely, blocks
    $1, 3, 5, \dots$ through :class:`BandedAttention` (when ``config.band`` is set).
    Ids ``(B, T)`` -> logits ``(B, T, vocab_size)``, at most ``n_positions`` positions.
    """

    def __init__(self, config: GPT3Config) -> None:
        _check_config(config)
        super().__init__(config)  # GPT-2, all layers dense
        if config.band is None:
            return
        for block in self.blocks[1::2]:  # dense, banded, dense, banded, ...
            banded = BandedAttention(
                config.d_model, config.n_heads, config.band, config.dropout
            )
            banded.load_state_dict(block.attn.state_dict())  # GPT-2's initialization
            block.attn = banded


def _check_config(config: object) -> None:
    if not isinstance(config, GPT3Config):
        raise TypeError(f"config must be a GPT3Config, got {config!r}")


# our names -> Hugging Face's GPTNeoForCausalLM names
_HF_GPT_NEO = {
    "embed": "transformer.wte",
    "positions": "transformer.wpe",
    "blocks": "transformer.h",
    "norm": "transformer.ln_f",
    "head": "lm_head",
    "norm1": "ln_1",
    "attn": "attn.attention",
    "norm2": "ln_2",
    "ff": "mlp",
}


def gpt_neo_state_dict(model: GPT3) -> dict[str, torch.Tensor]:
    r"""The weights of ``model`` for Hugging Face's ``GPTNeoForCausalLM``.

    GPT-Neo has GPT-3's alternating dense ("global") and banded ("local") layers,
    with separate query, key and value projections (``q_proj``, ``k_proj``,
    ``v_proj``) instead of GPT-2's fused ``c_attn``, no biases on them, and scores
    that are not divided by $\sqrt{d_{head}}$. So ``model``'s query, key and value
    biases must be zero, and its query weights are divided by $\sqrt{d_{head}}$ on
    the way.
    """
    if not isinstance(model, GPT3):
        raise TypeError(f"model must be a GPT3, got {type(model).__name__}")
    d_head = model.config.d_model // model.config.n_heads
    out = {}
    for key, value in model.state_dict().items():
        prefix, _, last = key.rpartition(".")
        if prefix.endswith("attn.c_attn"):
            if last == "bias":
                if value.abs().max() > 0:
                    raise ValueError(f"{key} is not zero: GPT-Neo has no such bias")
                continue
            q, k, v = value.chunk(3, dim=0)  # (d, d) each
            block = prefix.removesuffix(".c_attn")
            for name, w in (
                ("q_proj", q / math.sqrt(d_head)),
                ("k_proj", k),
                ("v_proj", v),
            ):
                out[_neo_name(f"{block}.{name}.weight")] = w
            continue
        out[_neo_name(key)] = value
    return out


def _neo_name(key: str) -> str:
    key = key.replace("attn.c_proj", "attn.out_proj")  # the attention's output
    return ".".join(_HF_GPT_NEO.get(part, part) for part in key.split("."))


def recall_episodes(
    batch: int,
    n_keys: int,
    n_values: int,
    n_pairs: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Episodes of associative recall: ``(batch, 2 * n_pairs)`` token ids.

    Each episode draws its own function $f$ from the ``n_keys`` keys (ids
    ``0 .. n_keys - 1``) to the ``n_values`` values (ids ``n_keys ..``), every key's
    value uniform and independent, then ``n_pairs`` keys $x_1, \dots, x_N$ uniformly
    with replacement, and writes $x_1\,f(x_1)\,x_2\,f(x_2) \dots x_N\,f(x_N)$. A
    model that predicts $f(x_i)$ after $x_i$ has only the pairs before it to go by:
    no two episodes share a function, except by chance.
    """
    _check_counts(batch=batch, n_keys=n_keys, n_values=n_values, n_pairs=n_pairs)
    f = n_keys + torch.randint(n_values, (batch, n_keys), generator=generator)
    x = torch.randint(n_keys, (batch, n_pairs), generator=generator)  # (B, N)
    return torch.stack([x, f.gather(1, x)], dim=2).flatten(1)  # (B, 2N): x f(x) ...


def _check_counts(**counts: object) -> None:
    for name, value in counts.items():
        check_positive_int(value, name)


def _check_episodes(ids: object) -> torch.Tensor:
    check_tensor(ids, "ids", ndim=2, dtype=torch.long)
    if ids.shape[1] < 2 or ids.shape[1] % 2:
        raise ValueError(
            f"ids must hold key-value pairs, an even length >= 2, got {ids.shape[1]}"
        )
    return ids


def recall_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the value predicted after each key of :func:`recall_episodes`
    ``ids`` (the keys themselves are random, so they are not scored)."""
    _check_episodes(ids)
    logits = model(ids[:, :-1])[:, 0::2]  # (B, N, vocab): read after each key
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1::2].flatten())


@torch.no_grad()
def recall_correct(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(B, N)``: whether ``model``'s most likely token after key $i$ is $f(x_i)$."""
    _check_episodes(ids)
    predicted = model(ids[:, :-1])[:, 0::2].argmax(-1)  # (B, N)
    return predicted == ids[:, 1::2]


def seen_before(ids: torch.Tensor) -> torch.Tensor:
    """``(B, N)``: whether key $x_i$ of each episode occurred among $x_1 .. x_{i-1}$."""
    keys = _check_episodes(ids)[:, 0::2]  # (B, N)
    same = keys[:, :, None] == keys[:, None, :]  # (B, N, N): x_i == x_j
    earlier = torch.ones_like(same[0]).tril(-1)  # (N, N): j < i
    return (same & earlier).any(-1)


def optimal_recall_accuracy(n_keys: int, n_values: int, n_pairs: int) -> torch.Tensor:
    r"""The best possible accuracy on the $i$-th pair, $i = 0 .. N - 1$ examples in:

    $a_i = 1 - \big(1 - \tfrac1K\big)^i \big(1 - \tfrac1V\big)$.

    The value is certain when the key was among the $i$ pairs before it, probability
    $1 - (1 - 1/K)^i$, and a guess right with probability $1/V$ otherwise.
    ``(n_pairs,)`` float64.
    """
    for name, value in (("n_keys", n_keys), ("n_values", n_values)):
        check_positive_int(value, name)
    check_positive_int(n_pairs, "n_pairs")
    unseen = (1 - 1 / n_keys) ** torch.arange(n_pairs, dtype=torch.float64)  # (N,)
    return 1 - unseen * (1 - 1 / n_values)


def attention_maps(model: BlockLM, ids: torch.Tensor) -> list[torch.Tensor]:
    r"""The attention weights of every layer of a
    :class:`~dlabc.improvements.modern_block.BlockLM` on ``ids`` ``(B, T)``: a list
    of ``(B, h, T, T)``, one per block, each row summing to 1.

    Each layer's input is caught on its way into the attention, and
    $\mathrm{softmax}\big(\tilde Q \tilde K^\top / \sqrt{d_{head}} + M\big)$ is
    computed again from its query and key projections, RoPE and the causal mask.
    """
    _check_block_lm(model, ids)
    maps: list[torch.Tensor] = []

    def keep(attn: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]  # (B, T, d_model), what the attention reads
        length = x.shape[1]
        q = split_heads(attn.q_proj(x), attn.n_heads)  # (B, h, T, d_head)
        k = split_heads(attn.k_proj(x), attn.n_kv_heads)  # (B, g, T, d_head)
        cos, sin = rope_cos_sin(length, attn.d_head, attn.base, dtype=x.dtype)
        q, k = apply_rope(q, cos, sin), repeat_kv(apply_rope(k, cos, sin), attn.n_rep)
        scores = q @ k.transpose(-2, -1) / math.sqrt(attn.d_head)  # (B, h, T, T)
        allowed = banded_causal_mask(length, length, attn.window, x.device)
        maps.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1))

    hooks = [block.attn.register_forward_hook(keep) for block in model.blocks]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return maps


def _check_block_lm(model: object, ids: object) -> None:
    if not isinstance(model, BlockLM):
        raise TypeError(f"model must be a BlockLM, got {type(model).__name__}")
    check_tensor(ids, "ids", ndim=2, dtype=torch.long)
