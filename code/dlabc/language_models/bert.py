r"""BERT: a Transformer encoder pre-trained to fill in masked words, its two objectives
(masked language modelling and next-sentence prediction), and sentence embeddings from
real weights.

Chapter: ``book/language_models/bert.md``.

References:
- Devlin, Chang, Lee & Toutanova (2019), *BERT: Pre-training of Deep Bidirectional
  Transformers for Language Understanding*, NAACL (the model, its sizes, the masking
  rule 15 % / 80-10-10, next-sentence prediction).
- Vaswani et al. (2017), *Attention Is All You Need* (the post-LN encoder layer).
- Hendrycks & Gimpel (2016), *Gaussian Error Linear Units (GELUs)*.
- Reimers & Gurevych (2019), *Sentence-BERT* (mean pooling into sentence embeddings).
- Wang et al. (2020), *MiniLM: Deep Self-Attention Distillation for Task-Agnostic
  Compression of Pre-Trained Transformers* (the 6-layer, 384-wide BERT whose
  sentence-embedding fine-tune, all-MiniLM-L6-v2, :func:`load_minilm` loads).

The attention is the transformers part's
:class:`~dlabc.transformers.attention_with_pytorch.MultiHeadAttention` and the norm the
foundations part's :class:`~dlabc.foundations.normalization.LayerNorm`. Our attribute
names are short (``attn.W_q``, ``norm1``, ``linear1``); :func:`hf_bert_names` and
:func:`from_hf_bert_names` translate a ``state_dict`` to and from Hugging Face's
``BertModel``/``BertForPreTraining`` names. Dropout acts on the embeddings and on each
sublayer's output (BERT also drops attention weights; this module does not, which
changes nothing in evaluation mode). Shapes: ``B`` batch, ``T`` positions, ``H`` hidden
size, ``V`` vocabulary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc import data
from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.foundations.normalization import LayerNorm
from dlabc.transformers.attention_with_pytorch import MultiHeadAttention

__all__ = [
    "BertConfig",
    "CONFIGS",
    "BertEmbeddings",
    "BertLayer",
    "BertModel",
    "init_bert_weights",
    "MaskedLMHead",
    "BertForPreTraining",
    "hf_bert_names",
    "from_hf_bert_names",
    "IGNORE",
    "mask_tokens",
    "pretraining_loss",
    "next_sentence_pairs",
    "pair_input",
    "pad",
    "mean_pool",
    "sentence_embeddings",
    "load_minilm",
    "masked_lm_loss",
    "masked_lm_predictions",
]

#: The label of a position that the masked-LM loss ignores (PyTorch's default
#: ``ignore_index`` of ``F.cross_entropy``, and Hugging Face's).
IGNORE = -100


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT model; the defaults are BERT-base's (Devlin et al., 2019).

    ``vocab_size`` $V$, ``hidden_size`` $H$, ``n_layers`` $L$, ``n_heads`` $A$,
    ``intermediate_size`` (the feed-forward width, $4H$ in the paper),
    ``max_position`` (learned positions), ``type_vocab_size`` (segments A and B),
    ``layer_norm_eps`` and ``dropout`` (on embeddings and sublayer outputs).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "n_layers",
            "n_heads",
            "intermediate_size",
            "max_position",
            "type_vocab_size",
        ):
            check_positive_int(getattr(self, name), name)
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"n_heads={self.n_heads}"
            )
        check_number(self.layer_norm_eps, "layer_norm_eps", low=0, low_open=True)
        check_number(self.dropout, "dropout", low=0, high=1, high_open=True)

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        """The configuration of a Hugging Face ``config.json`` (a dict)."""
        if not isinstance(hf, dict):
            raise TypeError(f"hf must be a dict, got {type(hf).__name__}")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"only hidden_act='gelu' is supported, got {hf['hidden_act']!r}"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position=hf["max_position_embeddings"],
            type_vocab_size=hf["type_vocab_size"],
            layer_norm_eps=hf["layer_norm_eps"],
            dropout=hf["hidden_dropout_prob"],
        )


#: Published configurations: BERT-base and BERT-large (Devlin et al., 2019, with the
#: 30,522 WordPiece tokens of the uncased English vocabulary), and the MiniLM that
#: :func:`load_minilm` loads (Wang et al., 2020; the same vocabulary).
CONFIGS: dict[str, BertConfig] = {
    "bert-base": BertConfig(),
    "bert-large": BertConfig(
        hidden_size=1024, n_layers=24, n_heads=16, intermediate_size=4096
    ),
    "all-MiniLM-L6-v2": BertConfig(
        hidden_size=384, n_layers=6, n_heads=12, intermediate_size=1536
    ),
}


def _check_config(config: object) -> BertConfig:
    if not isinstance(config, BertConfig):
        raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
    return config


# ------------------------------------------------------------------ the encoder


class BertEmbeddings(nn.Module):
    r"""BERT's input: the sum of a token's, its position's and its segment's embedding,
    normalized,

    $e_t = \mathrm{LN}\big(E_{\text{tok}}[x_t] + E_{\text{pos}}[t] + E_{\text{seg}}[s_t]
    \big).$

    ``input_ids`` and ``token_type_ids`` ``(B, T)`` -> ``(B, T, H)``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = _check_config(config)
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        e = (
            self.word_embeddings(input_ids)  # (B, T, H)
            + self.position_embeddings(positions)  # (T, H), the same for every row
            + self.token_type_embeddings(token_type_ids)  # (B, T, H)
        )
        return self.dropout(self.norm(e))


class BertLayer(nn.Module):
    r"""One BERT layer: the post-LN encoder layer of 2017 with a GELU network,

    $\begin{aligned} h &= \mathrm{LN}_1\big(x + \mathrm{MultiHead}(x)\big),\\
    y &= \mathrm{LN}_2\big(h + W_2\,\mathrm{GELU}(W_1 h + b_1) + b_2\big).
    \end{aligned}$

    ``x`` ``(B, T, H)`` and a boolean key mask ``(B, 1, T)`` (``True`` = a real token)
    -> ``(B, T, H)``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = _check_config(config)
        self.attn = MultiHeadAttention(c.hidden_size, c.n_heads)
        self.norm1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.linear1 = nn.Linear(c.hidden_size, c.intermediate_size)  # W_1, b_1
        self.linear2 = nn.Linear(c.intermediate_size, c.hidden_size)  # W_2, b_2
        self.norm2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(x, mask=mask)  # (B, T, H); the weights unused
        h = self.norm1(x + self.dropout(attended))
        ff = self.linear2(F.gelu(self.linear1(h)))  # (B, T, 4H) -> (B, T, H)
        return self.norm2(h + self.dropout(ff))


class BertModel(nn.Module):
    r"""BERT's encoder: embeddings, ``n_layers`` :class:`BertLayer`, and the pooler,

    $\mathrm{pooled} = \tanh(W_p\, h_{\texttt{[CLS]}} + b_p),$

    a summary of the sequence read from the first position, where the ``[CLS]`` token
    sits. ``input_ids`` ``(B, T)``; ``token_type_ids`` ``(B, T)`` (default all 0,
    segment A); ``attention_mask`` ``(B, T)``, 1 for a real token and 0 for padding
    (default all 1). Returns the last layer's states ``(B, T, H)`` and the pooled
    ``(B, H)``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = _check_config(config)
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.n_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)  # W_p, b_p
        self.apply(init_bert_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token_type_ids, attention_mask = _check_inputs(
            self.config, input_ids, token_type_ids, attention_mask
        )
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        keys = attention_mask.bool()[:, None, :]  # (B, 1, T): padding is never a key
        for layer in self.layers:
            x = layer(x, keys)  # (B, T, H)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, H), from [CLS]
        return x, pooled


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialization: weights from $\\mathcal N(0, 0.02^2)$, biases 0, norms 1
    and 0 (``model.apply(init_bert_weights)``)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_inputs(
    config: BertConfig,
    input_ids: object,
    token_type_ids: object,
    attention_mask: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs of :class:`BertModel`; return the token types and mask, with
    their defaults filled in."""
    check_tensor(input_ids, "input_ids", ndim=2, dtype=torch.long)
    batch, length = input_ids.shape
    if length > config.max_position:
        raise ValueError(
            f"input_ids has {length} positions, more than max_position="
            f"{config.max_position}"
        )
    _check_id_range(input_ids, "input_ids", config.vocab_size)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    check_tensor(token_type_ids, "token_type_ids", dtype=torch.long)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_tensor(attention_mask, "attention_mask")
    for name, t in (
        ("token_type_ids", token_type_ids),
        ("attention_mask", attention_mask),
    ):
        if t.shape != input_ids.shape:
            raise ValueError(
                f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(t.shape)}"
            )
    _check_id_range(token_type_ids, "token_type_ids", config.type_vocab_size)
    if attention_mask.device.type == "cpu" and attention_mask.numel():
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        if not attention_mask.bool().any(dim=1).all():
            raise ValueError("attention_mask hides every token of a sequence")
    return token_type_ids, attention_mask


def _check_id_range(ids: torch.Tensor, name: str, size: int) -> None:
    if ids.device.type == "cpu" and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            raise ValueError(
                f"{name} must lie in 0..{size - 1}, got values from {low} to {high}"
            )


# ------------------------------------------------------------------ pre-training


class MaskedLMHead(nn.Module):
    r"""The masked-LM head: a dense layer with GELU and a norm, then a read-out whose
    matrix is the token embedding (``decoder.weight``, tied by
    :class:`BertForPreTraining`),

    $p(\cdot \mid h_t) = \mathrm{softmax}\big(E_{\text{tok}}\,
    \mathrm{LN}(\mathrm{GELU}(W h_t + b)) + c\big).$

    ``h`` ``(..., H)`` -> logits ``(..., V)``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = _check_config(config)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)  # W, b
        self.norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size)  # E_tok, c

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))  # (..., V)


class BertForPreTraining(nn.Module):
    r"""BERT with its two pre-training heads: :class:`MaskedLMHead` on every position
    and next-sentence prediction, a linear layer on the pooled ``[CLS]`` state,

    $p(\text{IsNext} \mid A, B) = \mathrm{softmax}(W_{\text{nsp}}\,\mathrm{pooled}
    + b_{\text{nsp}}).$

    The masked-LM read-out shares its matrix with the token embedding. Same inputs as
    :class:`BertModel`; returns the masked-LM logits ``(B, T, V)`` and the
    next-sentence logits ``(B, 2)`` (class 0: B follows A; class 1: B is random).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.bert = BertModel(config)
        self.mlm = MaskedLMHead(config)
        self.nsp = nn.Linear(config.hidden_size, 2)  # W_nsp, b_nsp
        self.apply(init_bert_weights)
        self.mlm.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        return self.mlm(h), self.nsp(pooled)  # (B, T, V), (B, 2)


# ------------------------------------------------------------------ Hugging Face names

# our module paths -> Hugging Face's, outside the layers
_HF_TOP = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
    "pooler": "pooler.dense",
    "mlm.dense": "cls.predictions.transform.dense",
    "mlm.norm": "cls.predictions.transform.LayerNorm",
    "mlm.decoder": "cls.predictions.decoder",
    "nsp": "cls.seq_relationship",
}
# inside layer i: layers.i.<ours> <-> encoder.layer.i.<Hugging Face's>
_HF_LAYER = {
    "attn.W_q": "attention.self.query",
    "attn.W_k": "attention.self.key",
    "attn.W_v": "attention.self.value",
    "attn.W_o": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "linear1": "intermediate.dense",
    "linear2": "output.dense",
    "norm2": "output.LayerNorm",
}
_FROM_HF_TOP = {hf: ours for ours, hf in _HF_TOP.items()}
_FROM_HF_LAYER = {hf: ours for ours, hf in _HF_LAYER.items()}


def _rename(module: str, top: dict, layer: dict, layers: str, to: str) -> str | None:
    match = re.fullmatch(rf"{re.escape(layers)}\.(\d+)\.(.+)", module)
    if match:
        inner = layer.get(match.group(2))
        return None if inner is None else f"{to}.{match.group(1)}.{inner}"
    return top.get(module)


def hf_bert_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``state_dict`` of :class:`BertModel` or :class:`BertForPreTraining` under
    Hugging Face's names, for ``BertModel`` or ``BertForPreTraining``
    ``.load_state_dict``."""
    _check_state_dict(state_dict)
    renamed = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        prefix = "bert." if module.startswith("bert.") else ""
        module = module.removeprefix(prefix)
        hf = _rename(module, _HF_TOP, _HF_LAYER, "layers", "encoder.layer")
        if hf is None:
            raise KeyError(f"no Hugging Face name for {key!r}")
        if not hf.startswith("cls."):
            hf = prefix + hf
        renamed[f"{hf}.{param}"] = value
        if hf == "cls.predictions.decoder" and param == "bias":
            renamed["cls.predictions.bias"] = value  # Hugging Face keeps it twice
    return renamed


def from_hf_bert_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_bert_names`: a Hugging Face ``BertModel`` or
    ``BertForPreTraining`` ``state_dict`` (or a checkpoint file's tensors) under our
    names. Buffers that are not weights (``position_ids``) and the duplicate
    ``cls.predictions.bias`` are left out."""
    _check_state_dict(state_dict)
    renamed = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if param == "position_ids" or key == "cls.predictions.bias":
            continue
        prefix = "bert." if module.startswith("bert.") else ""
        module = module.removeprefix(prefix)
        ours = _rename(module, _FROM_HF_TOP, _FROM_HF_LAYER, "encoder.layer", "layers")
        if ours is None:
            raise KeyError(f"no name of ours for Hugging Face's {key!r}")
        renamed[f"{prefix}{ours}.{param}"] = value
    return renamed


def _check_state_dict(state_dict: object) -> None:
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")


# ------------------------------------------------------------------ the objectives


def mask_tokens(
    ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...] = (),
    p: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking for the masked-LM objective: the corrupted input and the labels.

    Each position that does not hold a special token is chosen with probability ``p``
    (15 %); the labels are the original ids at chosen positions and :data:`IGNORE`
    elsewhere. The computation is :func:`_mask_tokens`.
    """
    check_tensor(ids, "ids", dtype=torch.long)
    check_positive_int(vocab_size, "vocab_size")
    _check_id_range(ids, "ids", vocab_size)
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id must be an int, got {type(mask_id).__name__}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id must lie in 0..{vocab_size - 1}, got {mask_id}")
    check_number(p, "p", low=0, high=1, low_open=True)
    return _mask_tokens(ids, mask_id, vocab_size, tuple(special_ids), p, generator)


def _mask_tokens(
    ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...],
    p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose 15 % of the positions; of those, 80 % become ``[MASK]``, 10 % a random
    token and 10 % stay as they are. Only the chosen positions are predicted."""

    def uniform() -> torch.Tensor:
        return torch.rand(ids.shape, generator=generator, device=ids.device)

    special = torch.isin(
        ids, torch.tensor(special_ids, dtype=ids.dtype, device=ids.device)
    )
    chosen = (uniform() < p) & ~special  # the positions to predict
    labels = torch.where(chosen, ids, IGNORE)
    u = uniform()  # one more draw decides what a chosen position shows
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)  # and u >= 0.9: unchanged
    random_ids = torch.randint(
        vocab_size, ids.shape, generator=generator, device=ids.device
    )
    inputs = torch.where(to_mask, mask_id, ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


def pretraining_loss(
    mlm_logits: torch.Tensor,
    nsp_logits: torch.Tensor,
    labels: torch.Tensor,
    next_sentence_labels: torch.Tensor,
) -> torch.Tensor:
    r"""BERT's pre-training loss, the sum of the two cross-entropies,

    $\mathcal L = -\frac{1}{|M|}\sum_{t \in M} \log p(x_t \mid \tilde x)
    - \log p(y_{\text{nsp}} \mid A, B),$

    the first averaged over the masked positions $M$ of the batch (``labels`` not
    :data:`IGNORE`), the second over its pairs. ``mlm_logits`` ``(B, T, V)``,
    ``nsp_logits`` ``(B, 2)``, ``labels`` ``(B, T)``, ``next_sentence_labels``
    ``(B,)``.
    """
    check_tensor(mlm_logits, "mlm_logits", ndim=3, floating=True)
    check_tensor(nsp_logits, "nsp_logits", ndim=2, floating=True)
    check_tensor(labels, "labels", ndim=2, dtype=torch.long)
    check_tensor(next_sentence_labels, "next_sentence_labels", ndim=1, dtype=torch.long)
    if labels.shape != mlm_logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match mlm_logits "
            f"{tuple(mlm_logits.shape)} in (B, T)"
        )
    if nsp_logits.shape != (len(labels), 2) or len(next_sentence_labels) != len(labels):
        raise ValueError(
            f"nsp_logits must be (B, 2) = ({len(labels)}, 2) and next_sentence_labels "
            f"(B,), got {tuple(nsp_logits.shape)} and "
            f"{tuple(next_sentence_labels.shape)}"
        )
    mlm = F.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten())  # skips IGNORE
    return mlm + F.cross_entropy(nsp_logits, next_sentence_labels)


def next_sentence_pairs(
    sentences: list[list[int]],
    p_next: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[tuple[list[int], list[int], int]]:
    """Examples for next-sentence prediction from a list of consecutive sentences.

    For every sentence A but the last, B is the sentence that follows it with
    probability ``p_next`` (label 0, *IsNext*) and otherwise a sentence drawn at random
    among those that neither are A nor follow it (label 1, *NotNext*). Devlin et al.
    draw the random sentence from another document; with one document, any other
    sentence plays that role.
    """
    if not isinstance(sentences, list) or len(sentences) < 3:
        raise ValueError("sentences must be a list of at least 3 sentences")
    check_number(p_next, "p_next", low=0, high=1)
    n = len(sentences)
    follows = torch.rand(n - 1, generator=generator) < p_next  # a coin per pair
    others = torch.randint(n - 2, (n - 1,), generator=generator)
    pairs = []
    for i in range(n - 1):
        if follows[i]:
            pairs.append((sentences[i], sentences[i + 1], 0))
        else:
            k = int(others[i])
            j = k if k < i else k + 2  # any sentence but i and i + 1
            pairs.append((sentences[i], sentences[j], 1))
    return pairs


def pair_input(
    a: list[int], b: list[int] | None, cls_id: int, sep_id: int
) -> tuple[list[int], list[int]]:
    """``[CLS] A [SEP] B [SEP]`` (or ``[CLS] A [SEP]``) and its segment ids: 0 up to
    the first ``[SEP]``, 1 after it."""
    ids = [cls_id, *a, sep_id]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, sep_id]
        types += [1] * (len(b) + 1)
    return ids, types


def pad(
    sequences: list[list[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of different lengths as one batch: the ids ``(B, T)``, padded on the
    right with ``pad_id``, and the attention mask ``(B, T)`` (1 real, 0 padding)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("sequences must be a non-empty list of non-empty sequences")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


# ------------------------------------------------------------------ sentence embeddings


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The average of each sequence's token states, padding left out: ``hidden``
    ``(B, T, H)``, ``attention_mask`` ``(B, T)`` (1 real, 0 padding) -> ``(B, H)``.
    The computation is :func:`_mean_pool`."""
    check_tensor(hidden, "hidden", ndim=3, floating=True)
    check_tensor(attention_mask, "attention_mask", ndim=2)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must be (B, T) of hidden "
            f"{tuple(hidden.shape)}"
        )
    return _mean_pool(hidden, attention_mask)


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    r"""Sentence-BERT's mean pooling,

    $u = \frac{\sum_t m_t\, h_t}{\sum_t m_t},$

    with $m_t = 1$ for a real token and 0 for padding (a row without real tokens would
    divide by zero: the clamp keeps it finite).
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, H)


@torch.no_grad()
def sentence_embeddings(
    model: BertModel,
    tokenizer: object,
    sentences: list[str],
    max_length: int = 256,
    batch_size: int = 64,
) -> torch.Tensor:
    r"""all-MiniLM-L6-v2's sentence embeddings: each sentence tokenized with
    ``[CLS]``/``[SEP]`` (and cut to ``max_length`` tokens, as sentence-transformers
    does for this model), encoded, mean-pooled and scaled to length 1,
    $u / \lVert u \rVert$. Returns ``(N, H)``; cosine similarities are then dot
    products."""
    if not isinstance(model, BertModel):
        raise TypeError(f"model must be a BertModel, got {type(model).__name__}")
    if not isinstance(sentences, list) or not all(
        isinstance(s, str) for s in sentences
    ):
        raise TypeError("sentences must be a list of strings")
    if not sentences:
        raise ValueError("sentences must not be empty")
    check_positive_int(max_length, "max_length")
    check_positive_int(batch_size, "batch_size")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        encoded = []
        for s in sentences[start : start + batch_size]:
            ids = tokenizer.encode(s)
            if len(ids) > max_length:  # keep the final [SEP]
                ids = ids[: max_length - 1] + ids[-1:]
            encoded.append(ids)
        ids, mask = pad(encoded, getattr(tokenizer, "pad_id", 0))
        hidden, _ = model(ids.to(device), attention_mask=mask.to(device))
        out.append(F.normalize(mean_pool(hidden, mask.to(device)), dim=-1))
    model.train(was_training)
    return torch.cat(out)  # (N, H)


def load_minilm():
    """all-MiniLM-L6-v2 in our :class:`BertModel`, and its WordPiece tokenizer.

    Reads the Hugging Face folder that :func:`dlabc.data.load_minilm` finds: the
    configuration from ``config.json``, the weights from ``model.safetensors`` (renamed
    by :func:`from_hf_bert_names`), the vocabulary from ``vocab.txt``. Returns the
    model in evaluation mode and a
    :class:`~dlabc.language_models.tokenization.WordPiece`.
    """
    from safetensors.torch import load_file

    from dlabc.language_models.tokenization import WordPiece

    folder = data.load_minilm()
    config = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):  # shapes only: the file provides every value
        model = BertModel(config)
    weights = from_hf_bert_names(load_file(str(folder / "model.safetensors")))
    # strict: every weight found, none left over; assign: the file's tensors become
    # the parameters
    model.load_state_dict(weights, assign=True)
    tokenizer = WordPiece.from_vocab(folder / "vocab.txt", lowercase=True)
    return model.eval(), tokenizer


# -------------------------------------------------------------- training a small BERT


def masked_lm_loss(
    model: BertForPreTraining,
    ids: torch.Tensor,
    mask_id: int,
    special_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The masked-LM loss of a batch of windows ``ids`` ``(B, T)``: mask them with
    :func:`mask_tokens`, encode, and read out only at the chosen positions (the
    others have no label, so their logits would be wasted work)."""
    vocab_size = _check_pretraining_model(model).bert.config.vocab_size
    inputs, labels = mask_tokens(
        ids, mask_id, vocab_size, special_ids, generator=generator
    )
    h, _ = model.bert(inputs)  # (B, T, H)
    chosen = labels != IGNORE
    return F.cross_entropy(model.mlm(h[chosen]), labels[chosen])  # (M, V) vs (M,)


def _check_pretraining_model(model: object) -> BertForPreTraining:
    if not isinstance(model, BertForPreTraining):
        raise TypeError(
            f"model must be a BertForPreTraining, got {type(model).__name__}"
        )
    return model


@torch.no_grad()
def masked_lm_predictions(
    model: BertForPreTraining,
    ids: torch.Tensor,
    mask_id: int,
    special_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions of ``ids`` ``(B, T)`` as in pre-training (:func:`mask_tokens`),
    show ``[MASK]`` at every chosen one (no random or unchanged tokens, so that no
    answer is visible), and predict them: returns the true ids and the model's most
    probable ids there, both ``(M,)``."""
    vocab_size = _check_pretraining_model(model).bert.config.vocab_size
    _, labels = mask_tokens(ids, mask_id, vocab_size, special_ids, generator=generator)
    chosen = labels != IGNORE
    inputs = torch.where(chosen, mask_id, ids)  # every chosen position hidden
    was_training = model.training
    model.eval()
    h, _ = model.bert(inputs)
    predicted = model.mlm(h[chosen]).argmax(-1)
    model.train(was_training)
    return labels[chosen], predicted
