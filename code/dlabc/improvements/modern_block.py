r"""The modern decoder block: pre-norm, RMSNorm, grouped-query attention with RoPE and
a SwiGLU feed-forward network, the block of LLaMA and of most open language models.

Chapter: ``book/improvements/modern_block.md``.

References:
- Xiong et al. (2020), *On Layer Normalization in the Transformer Architecture*, ICML
  (post-LN against pre-LN: gradients at initialization, the warm-up).
- Zhang & Sennrich (2019), *Root Mean Square Layer Normalization*, NeurIPS (RMSNorm).
- Hendrycks & Gimpel (2016), *Gaussian Error Linear Units (GELUs)*.
- Shazeer (2020), *GLU Variants Improve Transformer* (SwiGLU, and the hidden size
  reduced by a third to keep the parameter count).
- Touvron et al. (2023), *LLaMA: Open and Efficient Foundation Language Models*
  (the block assembled here; the hidden size $\frac23 \cdot 4d$ rounded up to a
  multiple of 256 in its reference code).

Nothing here is new machinery: the norms are the foundations part's
:class:`~dlabc.foundations.normalization.RMSNorm` and
:class:`~dlabc.foundations.normalization.LayerNorm`, the SwiGLU network is the
activations chapter's :class:`~dlabc.foundations.activations.GatedFeedForward`, and
the attention is the previous chapter's
:class:`~dlabc.improvements.gqa_kv_cache.GroupedQueryAttention`. :class:`LlamaBlock`
puts them together under the attribute names of Hugging Face's ``LlamaDecoderLayer``
(``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``), so that
its ``state_dict`` loads into that layer unchanged; its switches (``norm_first``,
``norm``, ``ffn``) give the older variants the chapter compares it with.
:class:`BlockLM` stacks blocks into a character language model with the names of
``LlamaForCausalLM``. Shapes: ``B`` batch, ``T`` positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.foundations.activations import GatedFeedForward
from dlabc.foundations.normalization import LayerNorm, RMSNorm
from dlabc.improvements.gqa_kv_cache import GroupedQueryAttention, LayerKVCache

__all__ = [
    "NORMS",
    "FFNS",
    "swiglu_hidden_size",
    "ffn_parameter_count",
    "GeluFeedForward",
    "LlamaBlock",
    "BlockLM",
]

NORMS = ("rms", "layer")
FFNS = ("swiglu", "gelu")


def swiglu_hidden_size(
    d_model: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None
) -> int:
    r"""The hidden size of LLaMA's SwiGLU network for a model width ``d_model``.

    $h = \mathrm{multiple\_of} \cdot \big\lceil \lfloor m \lfloor \tfrac23 \cdot 4d
    \rfloor \rfloor / \mathrm{multiple\_of} \big\rceil$: two thirds of the $4d$ of
    the 2017 network (Shazeer's rule, which keeps the parameter count), times an
    optional multiplier $m$ (added by Llama 2's code; 1.3 in Llama 2 70B and in
    Llama 3 8B and 70B), rounded *up* to a multiple of ``multiple_of``, as in
    LLaMA's reference code. For $d = 4096$:
    $\lfloor 16384 \cdot 2/3 \rfloor = 10922 \to 11008$.
    """
    check_positive_int(d_model, "d_model")
    check_positive_int(multiple_of, "multiple_of")
    # two thirds of the 2017 network's 4d, in integers
    hidden = 2 * (4 * d_model) // 3
    if ffn_dim_multiplier is not None:
        check_number(ffn_dim_multiplier, "ffn_dim_multiplier", low=0, low_open=True)
        hidden = int(ffn_dim_multiplier * hidden)
    # round up to the next multiple of multiple_of
    return multiple_of * -(-hidden // multiple_of)


def ffn_parameter_count(d_model: int, d_ff: int, gated: bool) -> int:
    r"""The weights of a bias-free feed-forward network, in closed form.

    $2\,d\,d_{ff}$ for $W_{down}\,\phi(W_{up} x)$ (two matrices), $3\,d\,d_{ff}$ for
    the gated $W_{down}\big(\phi(W_{gate} x) \odot W_{up} x\big)$ (three). The two
    are equal when the gated network's $d_{ff}$ is two thirds of the other's:
    $3\,d \cdot \tfrac23 \cdot 4d = 2\,d \cdot 4d = 8d^2$.
    """
    check_positive_int(d_model, "d_model")
    check_positive_int(d_ff, "d_ff")
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {type(gated).__name__}")
    return (3 if gated else 2) * d_model * d_ff


class GeluFeedForward(nn.Module):
    r"""The feed-forward network of GPT-2 and BERT, without biases:
    $\mathrm{FFN}_{\mathrm{GELU}}(x) = W_{down}\,\mathrm{GELU}(W_{up}\,x)$.

    $\mathrm{GELU}(u) = u\,\Phi(u)$ (Hendrycks & Gimpel), the exact form with the
    Gaussian CDF, computed by PyTorch's ``F.gelu`` (equal to the activations chapter's
    ``gelu``, and faster; :class:`LlamaBlock` hands ``F.silu`` to the SwiGLU network
    for the same reason). The names ``up_proj`` and ``down_proj`` are those of
    :class:`~dlabc.foundations.activations.GatedFeedForward`, which has a ``gate_proj``
    besides. ``x`` ``(..., d_model)`` -> ``(..., d_model)``.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(d_ff, "d_ff")
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)  # W_up
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)  # W_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", floating=True)
        if x.dim() == 0 or x.shape[-1] != self.up_proj.in_features:
            raise ValueError(
                f"x must end with d_model={self.up_proj.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        # W_down GELU(W_up x)
        return self.down_proj(F.gelu(self.up_proj(x)))  # (..., d_model)


def _make_norm(norm: str, d_model: int, eps: float) -> nn.Module:
    if norm == "rms":
        return RMSNorm(d_model, eps=eps)
    return LayerNorm(d_model, eps=eps)


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class LlamaBlock(nn.Module):
    r"""The LLaMA decoder block, and the older blocks it replaced.

    With the defaults (``norm_first=True, norm="rms", ffn="swiglu"``), LLaMA's block:

    $h = x + \mathrm{Attn}\big(\mathrm{RMSNorm}_1(x)\big), \qquad
    y = h + \mathrm{SwiGLU}\big(\mathrm{RMSNorm}_2(h)\big),$

    with $\mathrm{RMSNorm}(x) = \gamma \odot x / \sqrt{\overline{x^2} + \epsilon}$,
    grouped-query causal self-attention with RoPE, and
    $\mathrm{SwiGLU}(x) = W_{down}\big(\mathrm{SiLU}(W_{gate} x) \odot W_{up} x\big)$.

    ``norm_first=False`` is the post-LN block of 2017, the same two norms moved after
    each residual addition: $h = \mathrm{N}_1(x + \mathrm{Attn}(x))$,
    $y = \mathrm{N}_2(h + \mathrm{FFN}(h))$. ``norm="layer"`` uses LayerNorm instead
    of RMSNorm, ``ffn="gelu"`` the network of :class:`GeluFeedForward`. No biases
    anywhere except LayerNorm's shift. The attribute names are Hugging Face's
    ``LlamaDecoderLayer``'s: ``input_layernorm`` is $\mathrm{N}_1$,
    ``post_attention_layernorm`` $\mathrm{N}_2$, ``mlp`` the feed-forward network.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        d_ff: int,
        norm_first: bool = True,
        norm: str = "rms",
        ffn: str = "swiglu",
        eps: float = 1e-6,
        base: float = 10000.0,
    ) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(d_ff, "d_ff")
        self.norm_first = _check_flag(norm_first, "norm_first")
        self.norm = _check_choice(norm, "norm", NORMS)
        self.ffn = _check_choice(ffn, "ffn", FFNS)
        check_number(eps, "eps", low=0, low_open=True)
        self.d_model = d_model
        self.input_layernorm = _make_norm(norm, d_model, eps)
        self.self_attn = GroupedQueryAttention(d_model, n_heads, n_kv_heads, base=base)
        self.post_attention_layernorm = _make_norm(norm, d_model, eps)
        self.mlp = (
            GatedFeedForward(d_model, d_ff, F.silu)  # SiLU gate: SwiGLU
            if ffn == "swiglu"
            else GeluFeedForward(d_model, d_ff)
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """``x`` ``(B, T, d_model)`` -> ``(B, T, d_model)``; ``positions`` and
        ``cache`` go to the attention unchanged."""
        check_tensor(x, "x", ndim=3, floating=True)
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, T, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )
        if self.norm_first:
            # h = x + Attn(N_1(x)), then y = h + FFN(N_2(h))
            h = x + self.self_attn(self.input_layernorm(x), positions, cache)
            return h + self.mlp(self.post_attention_layernorm(h))  # (B, T, d_model)
        # post-LN: h = N_1(x + Attn(x)), then y = N_2(h + FFN(h))
        h = self.input_layernorm(x + self.self_attn(x, positions, cache))
        return self.post_attention_layernorm(h + self.mlp(h))  # (B, T, d_model)


class BlockLM(nn.Module):
    r"""A decoder-only language model of :class:`LlamaBlock` layers.

    $h^{(0)} = E[x]$, $h^{(\ell)} = \mathrm{Block}_\ell(h^{(\ell-1)})$, logits
    $= \mathrm{N}(h^{(L)})\,W_{head}$. Positions enter only through RoPE inside the
    attention. A pre-norm stack ends in an un-normalized residual stream and gets a
    final norm ``norm``; a post-norm stack already ends in one and gets none. The
    names are those of Hugging Face's ``LlamaForCausalLM`` without its ``model.``
    prefix: ``embed_tokens``, ``layers``, ``norm``, ``lm_head``. ``forward`` takes
    ids ``(B, T)`` and returns logits ``(B, T, V)``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int,
        n_kv_heads: int | None = None,
        norm_first: bool = True,
        norm: str = "rms",
        ffn: str = "swiglu",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        check_positive_int(d_model, "d_model")
        check_positive_int(n_layers, "n_layers")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            LlamaBlock(d_model, n_heads, n_kv_heads, d_ff, norm_first, norm, ffn, eps)
            for _ in range(n_layers)
        )
        self.norm = _make_norm(norm, d_model, eps) if norm_first else None
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_tensor(ids, "ids", ndim=2, dtype=torch.long)
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab_size:
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}), "
                f"got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        h = self.embed_tokens(ids)  # (B, T, d_model)
        for layer in self.layers:
            h = layer(h)  # (B, T, d_model)
        if self.norm is not None:
            h = self.norm(h)  # (B, T, d_model)
        return self.lm_head(h)  # (B, T, V)
