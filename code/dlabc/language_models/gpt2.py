r"""GPT-2: a pre-LN decoder with learned positions and a tied read-out; sampling with
temperature, top-k and top-p; decoding with a key-value cache; and real pretrained
weights, OpenAI's GPT-2 from the Hugging Face hub and SmolLM2 from a GGUF file.

Chapter: ``book/language_models/gpt2.md``.

References:
- Radford et al. (2018), *Improving Language Understanding by Generative
  Pre-Training* (GPT: a Transformer decoder pretrained as a language model).
- Radford et al. (2019), *Language Models are Unsupervised Multitask Learners*
  (GPT-2: the norm moved before each sublayer, a final norm, residual weights scaled
  by $1/\sqrt{N}$ at initialization, byte-level BPE, 1,024 positions, four sizes).
- Fan, Lewis & Dauphin (2018), *Hierarchical Neural Story Generation*, ACL (top-k
  sampling).
- Holtzman et al. (2020), *The Curious Case of Neural Text Degeneration*, ICLR
  (nucleus, or top-p, sampling).
- Pope et al. (2023), *Efficiently Scaling Transformer Inference* (the key-value
  cache as the state of decoding).
- Allal et al. (2025), *SmolLM2: When Smol Goes Big* (the 135 M-parameter LLaMA-like
  model whose GGUF file a package ships).

:class:`GPT2` is the book's :class:`~dlabc.decoder.DecoderLM` with GPT-2's parts:
:class:`LearnedPositions`, :class:`GPT2Attention` (fused ``c_attn``), :class:`GPT2MLP`
(GELU), LayerNorms before each sublayer, and a read-out tied to the embedding. Its
parameter names inside a block (``attn.c_attn``, ``attn.c_proj``, ``ff.c_fc``,
``ff.c_proj``) are Hugging Face's; :func:`gpt2_from_hf_state_dict` renames the rest
and transposes the weights of HF's ``Conv1D`` layers, which store ``(in, out)``.
:func:`generate` decodes any decoder of the book that keeps a cache, GPT-2 and the
LLaMA :class:`~dlabc.improvements.modern_block.BlockLM` alike. Shapes: ``B`` batch,
``T`` new positions, ``S`` cached plus new positions, ``V`` vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.decoder import DecoderBlock, DecoderLM
from dlabc.improvements.gqa_kv_cache import LayerKVCache
from dlabc.improvements.modern_block import BlockLM
from dlabc.improvements.rope_alibi import interleaved_to_half
from dlabc.transformers.attention_from_scratch import merge_heads, split_heads

__all__ = [
    "GPT2Config",
    "CONFIGS",
    "LearnedPositions",
    "GPT2Attention",
    "GPT2MLP",
    "GPT2",
    "gpt2_from_hf_state_dict",
    "load_gpt2",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "next_token",
    "generate",
    "unpermute_rope_rows",
    "llama_from_gguf",
    "load_smollm2",
    "chat_prompt",
    "chat",
]


@dataclass(frozen=True)
class GPT2Config:
    """A GPT-2 configuration, with Hugging Face's ``GPT2Config`` names in comments.

    ``d_ff`` defaults to ``4 * d_model``; ``eps`` is the LayerNorms' epsilon;
    ``dropout`` is applied to the embeddings, the attention weights and each
    sublayer's output while training (0.1 in GPT-2).
    """

    vocab_size: int = 50257  # vocab_size: 50,000 merges, 256 bytes, <|endoftext|>
    n_positions: int = 1024  # n_positions
    d_model: int = 768  # n_embd
    n_layers: int = 12  # n_layer
    n_heads: int = 12  # n_head
    d_ff: int | None = None  # n_inner
    eps: float = 1e-5  # layer_norm_epsilon
    dropout: float = 0.1  # embd_pdrop, attn_pdrop, resid_pdrop

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "d_model", "n_layers", "n_heads"):
            check_positive_int(getattr(self, name), name)
        if self.d_ff is not None:
            check_positive_int(self.d_ff, "d_ff")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        check_number(self.eps, "eps", low=0, low_open=True)
        check_number(self.dropout, "dropout", low=0, high=1, high_open=True)

    @property
    def hidden(self) -> int:
        """The width of the feed-forward network: ``d_ff``, or ``4 * d_model``."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff


#: The four GPT-2 models of Radford et al. (2019), Table 2, under the Hugging Face
#: hub's names (the paper counts 117 M, 345 M, 762 M and 1,542 M parameters).
CONFIGS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPT2Config(d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPT2Config(d_model=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPT2Config(d_model=1600, n_layers=48, n_heads=25),
}


class LearnedPositions(nn.Module):
    r"""GPT-2's positions: one learned vector per position, added to the embeddings.

    $h^{(0)}_t = E[x_t] + P_{o + t}$ for the $t$-th new token, where $o$ = ``offset``
    counts the tokens already read (in the cache); then dropout. Called by
    :class:`~dlabc.decoder.DecoderLM` as ``positions(h, offset)``; ``h``
    ``(B, T, d_model)`` -> ``(B, T, d_model)``. Hugging Face's name is ``wpe``.
    """

    def __init__(self, n_positions: int, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_positions, d_model))  # P
        nn.init.normal_(self.weight, std=0.01)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, offset: int = 0) -> torch.Tensor:
        # E[x] + P[o : o + T]
        return self.drop(h + self.weight[offset : offset + h.shape[1]])  # (B, T, d)


class GPT2Attention(nn.Module):
    r"""Causal multi-head self-attention with one fused input projection.

    $[Q\ K\ V] = X W^{QKV} + b^{QKV}$ (``c_attn``, $d \to 3d$), split into $h$ heads,
    $\mathrm{head}_k = \mathrm{softmax}\big(Q_k K_k^\top / \sqrt{d_{head}} + M\big)
    V_k$ with the causal mask $M$, and
    $\mathrm{out} = [\mathrm{head}_1, \dots, \mathrm{head}_h]\, W^O + b^O$
    (``c_proj``). With a :class:`~dlabc.improvements.gqa_kv_cache.LayerKVCache`, the
    new keys and values are appended to those of the earlier positions and the new
    queries attend to all of them. ``x`` ``(B, T, d_model)`` -> ``(B, T, d_model)``.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.c_attn = nn.Linear(d_model, 3 * d_model)  # W^QKV, b^QKV
        self.c_proj = nn.Linear(d_model, d_model)  # W^O, b^O
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # (B, T, d) each
        q = split_heads(q, self.n_heads)  # (B, h, T, d_head)
        k = split_heads(k, self.n_heads)  # (B, h, T, d_head)
        v = split_heads(v, self.n_heads)  # (B, h, T, d_head)
        if cache is not None:  # the earlier positions' keys and values, then ours
            k, v = cache.update(k, v)  # (B, h, S, d_head)
        # M: new query t (at S - T + t) sees the keys up to its own position
        length, total = q.shape[2], k.shape[2]
        mask = torch.ones(length, total, dtype=torch.bool, device=x.device)
        mask = mask.tril(total - length)  # (T, S): key j <= S - T + t
        p = self.dropout if self.training else 0.0  # dropout on the weights
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_drop(self.c_proj(merge_heads(out)))  # (B, T, d)


class GPT2MLP(nn.Module):
    r"""GPT-2's feed-forward network: $W_2\,\mathrm{GELU}(W_1 x + b_1) + b_2$.

    ``c_fc`` ($d \to d_{ff}$) and ``c_proj`` ($d_{ff} \to d$), with GPT-2's GELU, the
    tanh approximation of $u\,\Phi(u)$:
    $\mathrm{GELU}(u) \approx \tfrac12 u \big(1 + \tanh\big(\sqrt{2/\pi}\,
    (u + 0.044715\,u^3)\big)\big)$. ``x`` ``(..., d_model)`` -> ``(..., d_model)``.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)  # W_1, b_1
        self.c_proj = nn.Linear(d_ff, d_model)  # W_2, b_2
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.c_fc(x)  # (..., d_ff)
        return self.drop(self.c_proj(F.gelu(u, approximate="tanh")))  # (..., d)


class GPT2(DecoderLM):
    r"""GPT-2 on the book's decoder skeleton.

    $h^{(0)} = E[x] + P$, then $L$ pre-LN blocks
    $h = x + \mathrm{Attn}(\mathrm{LN}_1(x))$, $y = h + \mathrm{MLP}(\mathrm{LN}_2(h))$,
    a final LayerNorm, and logits $\mathrm{LN}_f(h^{(L)})\,E^\top$: the read-out is the
    embedding matrix itself (tied, no bias). Initialization as in GPT-2: every weight
    $\mathcal N(0, 0.02^2)$, the two output projections of each block divided by
    $\sqrt{2L}$ (one per residual addition), biases zero. ``forward(ids, cache=None)``:
    ids ``(B, T)`` -> logits ``(B, T, V)``; at most ``n_positions`` positions in all.
    """

    def __init__(self, config: GPT2Config) -> None:
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config must be a GPT2Config, got {config!r}")
        c = self.config = config

        def make_block(i: int) -> DecoderBlock:
            attn = GPT2Attention(c.d_model, c.n_heads, c.dropout)
            ff = GPT2MLP(c.d_model, c.hidden, c.dropout)
            return DecoderBlock(attn, ff, lambda: nn.LayerNorm(c.d_model, eps=c.eps))

        super().__init__(
            c.vocab_size,
            c.d_model,
            c.n_layers,
            make_block,
            lambda: nn.LayerNorm(c.d_model, eps=c.eps),  # LN_f
            positions=LearnedPositions(c.n_positions, c.d_model, c.dropout),
            scale_embedding=False,
            head_bias=False,
            make_cache=LayerKVCache,
        )
        self.head.weight = self.embed.weight  # tied: logits = h E^T
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 1:  # biases 0 (LayerNorm scales stay 1)
                if name.endswith("bias"):
                    nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):  # one per residual addition
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(
        self, ids: torch.Tensor, cache: list[LayerKVCache] | None = None
    ) -> torch.Tensor:
        check_tensor(ids, "ids", ndim=2, dtype=torch.long)
        seen = 0 if not cache else cache[0].seen
        if seen + ids.shape[1] > self.config.n_positions:
            raise ValueError(
                f"GPT-2 reads at most n_positions={self.config.n_positions} positions, "
                f"got {seen} cached and {ids.shape[1]} new"
            )
        return super().forward(ids, cache)


# ------------------------------------------------------------- real GPT-2 weights

# Hugging Face's GPT2LMHeadModel names (without "transformer.") -> ours
_HF_GPT2 = {"wte": "embed", "wpe": "positions", "h": "blocks", "ln_f": "norm"}
_HF_GPT2_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "mlp": "ff"}
_CONV1D = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


def gpt2_from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face GPT-2 ``state_dict`` (``GPT2Model``'s or ``GPT2LMHeadModel``'s)
    under :class:`GPT2`'s names.

    Hugging Face's ``Conv1D`` stores a weight as ``(in, out)``, ``nn.Linear`` as
    ``(out, in)``: those four weights per block are transposed. The tied read-out
    (``lm_head.weight``) and the causal-mask buffers of old checkpoints are dropped;
    ``head.weight`` is the embedding.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    ours = {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        parts = key.split(".")
        if parts[0] == "lm_head" or parts[-2:] in (
            ["attn", "bias"],
            ["attn", "masked_bias"],
        ):
            continue  # the tied read-out; old checkpoints' mask buffers
        if key.endswith(_CONV1D):
            value = value.t()  # Conv1D (in, out) -> Linear (out, in)
        parts[0] = _HF_GPT2.get(parts[0], parts[0])
        if parts[0] == "blocks":
            parts[2] = _HF_GPT2_BLOCK.get(parts[2], parts[2])
        ours[".".join(parts)] = value.contiguous()
    if "embed.weight" in ours:
        ours["head.weight"] = ours["embed.weight"]  # tied
    return ours


def _config_from_hf(hf: dict) -> GPT2Config:
    activation = hf.get("activation_function", "gelu_new")
    if activation != "gelu_new":
        raise ValueError(f"GPT2 implements GPT-2's gelu_new, not {activation!r}")
    return GPT2Config(
        vocab_size=hf["vocab_size"],
        n_positions=hf["n_positions"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner"),
        eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=0.0,  # inference
    )


def load_gpt2(name: str | Path = "gpt2") -> GPT2:
    """OpenAI's GPT-2 with its real weights: a :class:`GPT2` in evaluation mode.

    ``name`` is a Hugging Face hub model (``"gpt2"``, ``"gpt2-medium"``,
    ``"gpt2-large"``, ``"gpt2-xl"``: OpenAI's models, downloaded once into the hub's
    cache; a network is needed the first time), or a local folder with
    ``config.json`` and ``model.safetensors`` (what ``save_pretrained`` writes). The
    configuration is read from ``config.json``, the weights with ``safetensors`` and
    renamed by :func:`gpt2_from_hf_state_dict`. GPT-2's tokenizer is
    ``dlabc.language_models.tokenization.BPE.from_gpt2()``.
    """
    from safetensors.torch import load_file

    if not isinstance(name, (str, Path)):
        raise TypeError(f"name must be a hub name or a folder, got {name!r}")
    folder = Path(name)
    if folder.is_dir():
        config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    else:
        from huggingface_hub import hf_hub_download

        repo = f"openai-community/{name}" if name in CONFIGS else str(name)
        config_file = Path(hf_hub_download(repo, "config.json"))
        weights_file = Path(hf_hub_download(repo, "model.safetensors"))
    for path in (config_file, weights_file):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: not a GPT-2 folder")
    config = _config_from_hf(json.loads(config_file.read_text()))
    model = GPT2(config)
    model.load_state_dict(gpt2_from_hf_state_dict(load_file(str(weights_file))))
    return model.eval()


# --------------------------------------------------------------------- sampling


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Logits divided by the temperature $\tau$: $p_i \propto \exp(z_i / \tau)$.

    $\tau < 1$ sharpens the distribution (towards the most likely token as
    $\tau \to 0$), $\tau > 1$ flattens it (towards uniform as $\tau \to \infty$).
    """
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    r"""Keep the $k$ largest logits of each row, set the others to $-\infty$
    (Fan et al.'s top-$k$ sampling); ties with the $k$-th largest are kept."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    r"""Keep the nucleus: the most likely tokens, down to the first whose cumulative
    probability reaches $p$ (Holtzman et al.); set the others to $-\infty$.

    With the probabilities sorted in decreasing order, $p_{(1)} \ge p_{(2)} \ge
    \dots$, token $(i)$ is kept when the tokens before it hold less than $p$:
    $\sum_{j < i} p_{(j)} < p$. The most likely token is always kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(dim=-1)  # p_(1) >= p_(2) >= ...
    before = probs.cumsum(dim=-1) - probs  # sum_{j < i} p_(j)
    remove = (before >= p).scatter(-1, order, before >= p)  # back to vocabulary order
    return logits.masked_fill(remove, -math.inf)


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Choose the next token from the last position's logits ``(B, V)`` -> ``(B, 1)``.

    ``temperature=0``: greedy, the most likely token. Otherwise the logits are divided
    by the temperature, filtered by top-$k$ and then top-$p$ (the order of Hugging
    Face's ``generate``), and one token is drawn from their softmax.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1): greedy
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


def generate(
    model: DecoderLM,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    *,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    r"""Extend ``ids`` ``(B, T_0)`` by up to ``max_new_tokens`` tokens; return the whole
    sequence ``(B, T_0 + n)``, as Hugging Face's ``generate`` does.

    Each token comes from :func:`next_token` (``temperature=0`` is greedy). With
    ``use_cache`` (the default) the prompt is read once and each later step feeds only
    the newest token, whose keys and values join the model's cache; without, every
    step re-reads the whole sequence. Once every row has produced ``eos_id`` the loop
    stops; a row that has finished gets ``eos_id`` from then on. Evaluation mode
    during the call, without gradients.
    """
    if not isinstance(model, DecoderLM):
        raise TypeError(
            f"model must be a decoder of the book, got {type(model).__name__}"
        )
    check_tensor(ids, "ids", ndim=2, dtype=torch.long)
    if ids.shape[1] == 0:
        raise ValueError("ids must hold at least one token (the prompt)")
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_number(temperature, "temperature", low=0)
    if top_k is not None:
        check_positive_int(top_k, "top_k")
    if top_p is not None:
        check_number(top_p, "top_p", low=0, high=1, low_open=True)
    if eos_id is not None and not 0 <= eos_id < model.vocab_size:
        raise ValueError(f"eos_id must be a token id in [0, {model.vocab_size})")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _generate(
                model,
                ids,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                generator,
                eos_id,
                use_cache,
            )
    finally:
        model.train(was_training)


def _generate(
    model: DecoderLM,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    eos_id: int | None,
    use_cache: bool,
) -> torch.Tensor:
    cache = model.new_cache() if use_cache else None
    sequence, feed = ids, ids  # with the cache, only the new tokens go in
    done = torch.zeros(len(ids), 1, dtype=torch.bool, device=ids.device)  # (B, 1)
    for _ in range(max_new_tokens):
        logits = model(feed if use_cache else sequence, cache)[:, -1]  # (B, V)
        token = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)  # finished rows: eos from now on
            done = done | (token == eos_id)
        sequence = torch.cat([sequence, token], dim=1)  # (B, t + 1)
        feed = token
        if eos_id is not None and bool(done.all()):
            break
    return sequence


# ------------------------------------------------- SmolLM2, from a GGUF file


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    r"""Undo llama.cpp's permutation of a query or key weight ``(n_heads * d, in)``.

    LLaMA's own code rotates the feature pairs $(2i, 2i+1)$ of each head; Hugging
    Face's checkpoints rotate the pairs $(i, i + d/2)$ and llama.cpp's converter
    re-orders each head's rows back to the pairs side by side. Within each head, the
    rows $0, 2, 4, \dots$ of a GGUF file are Hugging Face's first half, the rows
    $1, 3, \dots$ its second: ``interleaved_to_half`` gives that order.
    """
    rows, columns = weight.shape
    d_head = rows // n_heads
    heads = weight.view(n_heads, d_head, columns)  # (h, d_head, in)
    return heads[:, interleaved_to_half(d_head)].reshape(rows, columns)


# GGUF's tensor names (in "blk.{i}.") -> BlockLM's (in "blocks.{i}.")
_GGUF_LLAMA = {
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_gate": "ff.gate_proj",
    "ffn_up": "ff.up_proj",
    "ffn_down": "ff.down_proj",
    "attn_norm": "norm1",
    "ffn_norm": "norm2",
}


def llama_from_gguf(gguf: object) -> BlockLM:
    """The book's LLaMA (:class:`~dlabc.improvements.modern_block.BlockLM`) with the
    weights of a LLaMA-architecture GGUF file (``dlabc.data.read_gguf``'s result).

    The sizes come from the file's ``llama.*`` metadata; the query and key weights get
    :func:`unpermute_rope_rows`; without an ``output.weight`` the read-out is tied to
    the embedding. Evaluation mode, float32.
    """
    meta = getattr(gguf, "metadata", None)
    if not isinstance(meta, dict) or meta.get("general.architecture") != "llama":
        raise ValueError("gguf must be a GGUF of the llama architecture (read_gguf)")
    tensors = gguf.tensors
    n_heads = meta["llama.attention.head_count"]
    n_kv_heads = meta.get("llama.attention.head_count_kv", n_heads)
    tied = "output.weight" not in tensors
    with torch.device("meta"):  # shapes only: the file's tensors are assigned below
        model = BlockLM(
            vocab_size=tensors["token_embd.weight"].shape[0],
            d_model=meta["llama.embedding_length"],
            n_heads=n_heads,
            n_layers=meta["llama.block_count"],
            d_ff=meta["llama.feed_forward_length"],
            n_kv_heads=n_kv_heads,
            eps=meta["llama.attention.layer_norm_rms_epsilon"],
            base=meta.get("llama.rope.freq_base", 10000.0),
            tie_embeddings=tied,
        )
    state = {"embed.weight": tensors["token_embd.weight"]}
    state["norm.weight"] = tensors["output_norm.weight"]
    state["head.weight"] = tensors["token_embd.weight" if tied else "output.weight"]
    for i in range(model.n_layers):
        for ggml, ours in _GGUF_LLAMA.items():
            weight = tensors[f"blk.{i}.{ggml}.weight"]
            if ggml in ("attn_q", "attn_k"):  # back to Hugging Face's RoPE layout
                weight = unpermute_rope_rows(
                    weight, n_heads if ggml == "attn_q" else n_kv_heads
                )
            state[f"blocks.{i}.{ours}.weight"] = weight
    model.load_state_dict(state, assign=True)  # the tensors themselves, no copy
    if tied:
        model.head.weight = model.embed.weight  # one parameter again
    return model.eval()


def load_smollm2() -> tuple[BlockLM, object]:
    """SmolLM2-135M-Instruct in the book's LLaMA, and its tokenizer.

    The weights of the GGUF file that ``dlabc.data.load_smollm2`` reads (4-bit,
    de-quantised to float32) in a :class:`~dlabc.improvements.modern_block.BlockLM`
    (:func:`llama_from_gguf`); the tokenizer is the book's byte-level
    ``BPE.from_gguf`` built from the same file, with SmolLM2's 17 special tokens
    (ids 0 to 16) matched whole. Returns ``(model, tokenizer)``.
    """
    from dlabc import data
    from dlabc.language_models.tokenization import BPE

    gguf = data.load_smollm2()
    model = llama_from_gguf(gguf)
    # ids 0-16: SmolLM2's special tokens, <|endoftext|>, <|im_start|>, <|im_end|>, ...
    tokenizer = BPE.from_gguf(gguf.tokens, gguf.merges, special=gguf.tokens[:17])
    return model, tokenizer


def chat_prompt(messages: list[dict]) -> str:
    r"""SmolLM2's chat template: each message as
    ``<|im_start|>role\ncontent<|im_end|>\n``, a default system message first if
    there is none, and ``<|im_start|>assistant\n`` at the end, the start of the answer.
    """
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOLLM2_SYSTEM}, *messages]
    turns = "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages
    )
    return turns + "<|im_start|>assistant\n"


#: The system message SmolLM2's template adds when a conversation has none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(
    model: DecoderLM,
    tokenizer: object,
    messages: list[dict],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """The assistant's answer to ``messages`` (``[{"role": "user", "content": ...}]``).

    The conversation is written with :func:`chat_prompt`, encoded by ``tokenizer``
    (whose ``encode`` turns ``<|im_start|>`` and ``<|im_end|>`` into their ids),
    extended by :func:`generate` until ``<|im_end|>`` or ``max_new_tokens``, and the
    new tokens are decoded. Greedy by default (``temperature=0``), so the answer is
    the same on every run.
    """
    _check_messages(messages)
    for name in ("encode", "decode"):
        if not callable(getattr(tokenizer, name, None)):
            raise TypeError(f"tokenizer must have encode and decode, got {tokenizer!r}")
    (end,) = tokenizer.encode("<|im_end|>")
    prompt = tokenizer.encode(chat_prompt(messages))
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)  # (1, T_0)
    out = generate(
        model, ids, max_new_tokens, temperature, top_k, top_p, generator, eos_id=end
    )
    new = out[0, len(prompt) :].tolist()
    if end in new:
        new = new[: new.index(end)]
    return tokenizer.decode(new).strip()


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise TypeError(
            "messages must be a non-empty list of {'role', 'content'} dicts"
        )
    for m in messages:
        if not (
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
        ):
            raise ValueError(
                "each message must be a dict with role system, user or assistant "
                f"and a string content, got {m!r}"
            )
