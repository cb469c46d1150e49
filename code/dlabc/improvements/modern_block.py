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
from dlabc.decoder import DecoderBlock, DecoderLM
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
    "hf_llama_names",
]

NORMS = ("rms", "layer")
FFNS = ("swiglu", "gelu")


def swiglu_hidden_size(
    d_model: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None
) -> int:
    r"""The hidden size of LLaMA's SwiGLU network for a model width ``d_model``,

    $d_{ff} = k \big\lceil \lfloor m \lfloor \tfrac23 \cdot 4d \rfloor \rfloor / k
    \big\rceil ,$

    with $k$ = ``multiple_of``: two thirds of the $4d$ of the 2017 network (Shazeer's
    rule, which keeps the parameter count), times an optional multiplier $m$ =
    ``ffn_dim_multiplier`` (added by Llama 2's code; 1.3 in Llama 2 70B and in Llama 3
    8B and 70B), rounded *up* to a multiple of $k$, as in LLaMA's reference code. For
    $d = 4096$: $\lfloor 16384 \cdot 2/3 \rfloor = 10922 \to 11008$.
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
        _check_width(x, self.up_proj.in_features)
        # W_down GELU(W_up x)
        return self.down_proj(F.gelu(self.up_proj(x)))  # (..., d_model)


def _check_width(x: object, d_model: int) -> None:
    check_tensor(x, "x", floating=True)
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(
            f"x must end with d_model={d_model}, got shape {tuple(x.shape)}"
        )


def _make_norm(norm: str, d_model: int, eps: float) -> nn.Module:
    _check_choice(norm, "norm", NORMS)
    check_number(eps, "eps", low=0, low_open=True)
    return RMSNorm(d_model, eps=eps) if norm == "rms" else LayerNorm(d_model, eps=eps)


def _make_ffn(ffn: str, d_model: int, d_ff: int) -> nn.Module:
    _check_choice(ffn, "ffn", FFNS)
    check_positive_int(d_model, "d_model")
    check_positive_int(d_ff, "d_ff")
    if ffn == "swiglu":
        return GatedFeedForward(d_model, d_ff, F.silu)  # SiLU gate: SwiGLU
    return GeluFeedForward(d_model, d_ff)


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


class LlamaBlock(DecoderBlock):
    r"""The LLaMA decoder block, and the older blocks it replaced.

    The book's :class:`~dlabc.decoder.DecoderBlock` with, by default
    (``norm_first=True, norm="rms", ffn="swiglu"``), LLaMA's parts:

    $h = x + \mathrm{Attn}\big(\mathrm{RMSNorm}_1(x)\big), \qquad
    y = h + \mathrm{SwiGLU}\big(\mathrm{RMSNorm}_2(h)\big),$

    with $\mathrm{RMSNorm}(x) = \gamma \odot x / \sqrt{\overline{x^2} + \epsilon}$,
    grouped-query causal self-attention with RoPE, and
    $\mathrm{SwiGLU}(x) = W_{down}\big(\mathrm{SiLU}(W_{gate} x) \odot W_{up} x\big)$.

    ``norm_first=False`` is the post-LN block of 2017, the same two norms moved after
    each residual addition: $h = \mathrm{N}_1(x + \mathrm{Attn}(x))$,
    $y = \mathrm{N}_2(h + \mathrm{FFN}(h))$. ``norm="layer"`` uses LayerNorm instead
    of RMSNorm, ``ffn="gelu"`` the network of :class:`GeluFeedForward`. No biases
    anywhere except LayerNorm's shift. Hugging Face's ``LlamaDecoderLayer`` calls
    ``norm1`` ``input_layernorm``, ``attn`` ``self_attn``, ``norm2``
    ``post_attention_layernorm`` and ``ff`` ``mlp`` (:func:`hf_llama_names`).
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
        attn = GroupedQueryAttention(d_model, n_heads, n_kv_heads, base=base)
        ff = _make_ffn(ffn, d_model, d_ff)  # SwiGLU, or the GELU network
        super().__init__(attn, ff, lambda: _make_norm(norm, d_model, eps), norm_first)


class BlockLM(DecoderLM):
    r"""A decoder-only language model of :class:`LlamaBlock` layers.

    The book's :class:`~dlabc.decoder.DecoderLM` as LLaMA builds it: unscaled
    embeddings, positions only through RoPE inside the attention, a read-out without
    bias. A pre-norm stack ends in an un-normalized residual stream and gets a final
    norm ``norm``; a post-norm stack already ends in one and gets none. Its cache is
    one :class:`LayerKVCache` per layer. ``base`` is RoPE's base (LLaMA's 10,000;
    larger in models trained on longer contexts); ``tie_embeddings`` makes the read-out
    share the embedding matrix (``head.weight is embed.weight``), as in GPT-2 and the
    small LLaMA-like models. Ids ``(B, T)`` -> logits ``(B, T, V)``.
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
        base: float = 10000.0,
        tie_embeddings: bool = False,
    ) -> None:
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if not isinstance(tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be a bool, got {tie_embeddings!r}")

        def make_block(i: int) -> LlamaBlock:
            return LlamaBlock(
                d_model, n_heads, n_kv_heads, d_ff, norm_first, norm, ffn, eps, base
            )

        super().__init__(
            vocab_size,
            d_model,
            n_layers,
            make_block,
            (lambda: _make_norm(norm, d_model, eps)) if norm_first else None,
            scale_embedding=False,
            head_bias=False,
            make_cache=LayerKVCache,
        )
        if tie_embeddings:
            self.head.weight = self.embed.weight  # one matrix, read in and read out


# our names -> Hugging Face's LlamaForCausalLM names (LlamaDecoderLayer's in a layer)
_HF_LLAMA = {
    "embed": "model.embed_tokens",
    "blocks": "model.layers",
    "norm": "model.norm",  # the final norm
    "head": "lm_head",
    "norm1": "input_layernorm",
    "attn": "self_attn",
    "norm2": "post_attention_layernorm",
    "ff": "mlp",
}


def hf_llama_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` of a :class:`BlockLM` or :class:`LlamaBlock` under Hugging
    Face's names, for ``LlamaForCausalLM`` or ``LlamaDecoderLayer.load_state_dict``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    return {
        ".".join(_HF_LLAMA.get(part, part) for part in key.split(".")): value
        for key, value in state_dict.items()
    }
