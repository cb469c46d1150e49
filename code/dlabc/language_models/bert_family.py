r"""The BERT family: RoBERTa, ALBERT, DistilBERT and DeBERTa, each one change to BERT.

Chapter: ``book/language_models/bert_family.md``.

References:
- Liu et al. (2019), *RoBERTa: A Robustly Optimized BERT Pretraining Approach* (dynamic
  masking, no next-sentence prediction, more data and larger batches; the model is
  BERT's, with positions counted from ``pad_id + 1``).
- Lan et al. (2020), *ALBERT: A Lite BERT for Self-supervised Learning of Language
  Representations*, ICLR (a factorised embedding $V \times E$, $E \times H$, and one
  layer shared by the whole depth).
- Sanh et al. (2019), *DistilBERT, a distilled version of BERT: smaller, faster,
  cheaper and lighter* (half the layers, initialized from the teacher's, trained with a
  soft-target, a masked-LM and a cosine loss; the loss weights 5, 2, 1 and the
  temperature 2 are not in the paper but in the authors' training code, Hugging Face's
  ``examples/research_projects/distillation``); Hinton, Vinyals & Dean (2015),
  *Distilling the Knowledge in a Neural Network* (the soft targets at temperature $T$).
- He et al. (2021), *DeBERTa: Decoding-enhanced BERT with Disentangled Attention*,
  ICLR (content and relative position in separate vectors; attention scores
  content-to-content, content-to-position and position-to-content).

Everything else is the BERT chapter's: :class:`~dlabc.language_models.bert.BertLayer`,
:class:`~dlabc.language_models.bert.BertEmbeddings`,
:class:`~dlabc.language_models.bert.BertModel` and its masked-LM head. The reference
implementations are Hugging Face's ``RobertaModel``, ``AlbertModel``,
``DistilBertModel`` and ``DebertaModel`` (DeBERTa **v1**); :func:`hf_state_dict`
renames our weights to theirs. Shapes: ``B`` batch, ``T`` positions, ``H`` hidden size,
``E`` embedding size, ``V`` vocabulary, ``k`` the largest relative distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import fields as fields_of

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.foundations.normalization import LayerNorm
from dlabc.language_models.bert import (
    IGNORE,
    BertConfig,
    BertEmbeddings,
    BertLayer,
    BertModel,
    MaskedLMHead,
    hf_bert_names,
    init_bert_weights,
    mask_tokens,
)
from dlabc.transformers.attention_with_pytorch import merge_heads, split_heads

__all__ = [
    "RobertaConfig",
    "AlbertConfig",
    "DistilBertConfig",
    "DebertaConfig",
    "CONFIGS",
    "build",
    "roberta_position_ids",
    "RobertaEmbeddings",
    "RobertaModel",
    "AlbertModel",
    "DistilBertEmbeddings",
    "DistilBertModel",
    "student_from_teacher",
    "distillation_loss",
    "relative_position_index",
    "DisentangledSelfAttention",
    "DebertaLayer",
    "DebertaModel",
    "MaskedLM",
    "hf_state_dict",
    "static_masks",
    "pretrain",
    "masked_lm_loss",
]


# ------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """RoBERTa's sizes (defaults: RoBERTa-base): BERT's fields, GPT-2's byte-level BPE
    vocabulary of 50,265 tokens, one segment type, and ``pad_id``, the padding token,
    whose id also shifts the positions (:func:`roberta_position_ids`): 512 usable
    positions need ``max_position`` = 512 + ``pad_id`` + 1 = 514."""

    vocab_size: int = 50265
    max_position: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_id: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int):
            raise TypeError(f"pad_id must be an int, got {type(self.pad_id).__name__}")
        if not 0 <= self.pad_id < min(self.vocab_size, self.max_position - 1):
            raise ValueError(
                f"pad_id must lie in 0..{min(self.vocab_size, self.max_position - 1) - 1}"
                f", got {self.pad_id}"
            )


@dataclass(frozen=True)
class AlbertConfig(BertConfig):
    """ALBERT's sizes (defaults: ALBERT-base): BERT's fields, a vocabulary of 30,000
    SentencePiece tokens, the embedding size ``embedding_size`` $E$ (128 in every
    published ALBERT), and ``n_groups``, the number of distinct layers the depth is
    split into: 1 (ALBERT) shares one layer across all ``n_layers``; ``n_layers``
    shares nothing."""

    vocab_size: int = 30000
    embedding_size: int = 128
    n_groups: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.embedding_size, "embedding_size")
        check_positive_int(self.n_groups, "n_groups")
        if self.n_layers % self.n_groups:
            raise ValueError(
                f"n_layers={self.n_layers} is not divisible by n_groups={self.n_groups}"
            )


@dataclass(frozen=True)
class DistilBertConfig(BertConfig):
    """DistilBERT's sizes (defaults: DistilBERT-base): BERT-base with 6 layers instead
    of 12, no segment embeddings (``type_vocab_size`` is not used) and no pooler."""

    n_layers: int = 6


@dataclass(frozen=True)
class DebertaConfig(BertConfig):
    """DeBERTa's sizes (defaults: DeBERTa-base, v1): BERT's fields, GPT-2's BPE
    vocabulary of 50,265 tokens, and ``max_relative_positions`` $k$: relative distances
    are clipped to $[-k, k)$, with $2k$ relative-position embeddings. No absolute
    position and no segment embeddings (``max_position`` only bounds the length,
    ``type_vocab_size`` is not used)."""

    vocab_size: int = 50265
    layer_norm_eps: float = 1e-7
    max_relative_positions: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.max_relative_positions, "max_relative_positions")


#: The published configurations the chapter discusses: RoBERTa (Liu et al., 2019),
#: ALBERT (Lan et al., 2020, Table 1; also the released checkpoints' configurations,
#: although the table's 60M and 235M overstate xlarge's and xxlarge's sizes),
#: DistilBERT (Sanh et al., 2019) and DeBERTa v1 (He et al., 2021). :func:`build` makes
#: the model of any of them.
CONFIGS: dict[str, BertConfig] = {
    "roberta-base": RobertaConfig(),
    "roberta-large": RobertaConfig(
        hidden_size=1024, n_layers=24, n_heads=16, intermediate_size=4096
    ),
    "albert-base": AlbertConfig(),
    "albert-large": AlbertConfig(
        hidden_size=1024, n_layers=24, n_heads=16, intermediate_size=4096
    ),
    "albert-xlarge": AlbertConfig(
        hidden_size=2048, n_layers=24, n_heads=16, intermediate_size=8192
    ),
    "albert-xxlarge": AlbertConfig(
        hidden_size=4096, n_layers=12, n_heads=64, intermediate_size=16384
    ),
    "distilbert-base": DistilBertConfig(),
    "deberta-base": DebertaConfig(),
    "deberta-large": DebertaConfig(
        hidden_size=1024, n_layers=24, n_heads=16, intermediate_size=4096
    ),
}


def build(config: BertConfig) -> nn.Module:
    """The model of a configuration of this chapter (or a plain :class:`BertModel` for
    a :class:`BertConfig`): ``count_parameters(lambda: build(CONFIGS[name]))``."""
    models = (
        (RobertaConfig, RobertaModel),
        (AlbertConfig, AlbertModel),
        (DistilBertConfig, DistilBertModel),
        (DebertaConfig, DebertaModel),
        (BertConfig, BertModel),
    )
    for kind, model in models:
        if isinstance(config, kind):
            return model(config)
    raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")


def _check_ids_and_mask(
    config: BertConfig, input_ids: object, attention_mask: object
) -> torch.Tensor:
    """Check a model's ``input_ids`` ``(B, T)`` and ``attention_mask``; return the
    mask (all ones by default)."""
    check_tensor(input_ids, "input_ids", ndim=2, dtype=torch.long)
    if input_ids.shape[1] > config.max_position:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} positions, more than "
            f"max_position={config.max_position}"
        )
    if input_ids.device.type == "cpu" and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"input_ids must lie in 0..{config.vocab_size - 1}, got values from "
                f"{low} to {high}"
            )
    if attention_mask is None:
        return torch.ones_like(input_ids)
    check_tensor(attention_mask, "attention_mask")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids "
            f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    return attention_mask


# ------------------------------------------------------------------ RoBERTa


def roberta_position_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    r"""RoBERTa's position ids (fairseq's convention, kept by Hugging Face): the
    real tokens of a row are numbered ``pad_id + 1, pad_id + 2, ...`` and every padding
    token gets ``pad_id``,

    $p_t = m_t \sum_{s \le t} m_s + \text{pad},\qquad m_t = [x_t \ne \text{pad}].$

    ``input_ids`` ``(B, T)`` -> ``(B, T)``.
    """
    real = (input_ids != pad_id).long()  # (B, T): m_t
    return real.cumsum(dim=1) * real + pad_id  # (B, T)


class RobertaEmbeddings(BertEmbeddings):
    """:class:`~dlabc.language_models.bert.BertEmbeddings` with RoBERTa's positions
    (:func:`roberta_position_ids`) instead of ``0, 1, 2, ...``."""

    def __init__(self, config: RobertaConfig) -> None:
        super().__init__(config)
        self.pad_id = config.pad_id

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        positions = roberta_position_ids(input_ids, self.pad_id)  # (B, T)
        e = (
            self.word_embeddings(input_ids)  # (B, T, H)
            + self.position_embeddings(positions)  # (B, T, H)
            + self.token_type_embeddings(token_type_ids)  # (B, T, H)
        )
        return self.dropout(self.norm(e))


class RobertaModel(BertModel):
    """RoBERTa's encoder: BERT's :class:`~dlabc.language_models.bert.BertModel` with
    :class:`RobertaEmbeddings`. Everything else RoBERTa changed is in the training:
    dynamic masking, no next-sentence prediction, ten times the data, larger batches.
    Inputs and outputs as ``BertModel``'s."""

    def __init__(self, config: RobertaConfig) -> None:
        if not isinstance(config, RobertaConfig):
            raise TypeError(
                f"config must be a RobertaConfig, got {type(config).__name__}"
            )
        super().__init__(config)
        self.embeddings = RobertaEmbeddings(config)
        self.embeddings.apply(init_bert_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor(input_ids, "input_ids", ndim=2, dtype=torch.long)
        limit = self.config.max_position - self.config.pad_id - 1
        if input_ids.shape[1] > limit:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions; RoBERTa's positions "
                f"start at pad_id + 1, so at most max_position - pad_id - 1 = {limit}"
            )
        return super().forward(input_ids, token_type_ids, attention_mask)


# ------------------------------------------------------------------ ALBERT


class AlbertModel(nn.Module):
    r"""ALBERT's encoder: BERT's with two changes that cut the parameters.

    A **factorised embedding**: tokens, positions and segments are embedded in
    $E \ll H$ dimensions and projected to $H$, $V\!E + E\!H$ weights instead of $V\!H$.
    **Cross-layer sharing**: the ``n_layers`` layers reuse ``n_groups`` distinct
    :class:`~dlabc.language_models.bert.BertLayer` (one in ALBERT), layer $\ell$ the
    group $\lfloor \ell\, G / L \rfloor$. The compute is BERT's; the parameters of the
    stack are divided by $L / G$. Inputs and outputs as ``BertModel``'s.
    """

    def __init__(self, config: AlbertConfig) -> None:
        super().__init__()
        if not isinstance(config, AlbertConfig):
            raise TypeError(
                f"config must be an AlbertConfig, got {type(config).__name__}"
            )
        self.config = c = config
        narrow = BertConfig(  # BERT's embeddings, E wide
            c.vocab_size, c.embedding_size, 1, 1, 1, c.max_position,
            c.type_vocab_size, c.layer_norm_eps, c.dropout,
        )  # fmt: skip
        self.embeddings = BertEmbeddings(narrow)  # (B, T, E)
        self.projection = nn.Linear(c.embedding_size, c.hidden_size)  # E -> H
        self.groups = nn.ModuleList(BertLayer(c) for _ in range(c.n_groups))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        self.apply(init_bert_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attention_mask = _check_ids_and_mask(self.config, input_ids, attention_mask)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self._encode(input_ids, token_type_ids, attention_mask)

    def _encode(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embeddings(input_ids, token_type_ids)  # (B, T, E)
        x = self.projection(e)  # (B, T, H)
        keys = mask.bool()[:, None, :]  # (B, 1, T)
        n_layers, n_groups = self.config.n_layers, self.config.n_groups
        for layer in range(n_layers):
            x = self.groups[layer * n_groups // n_layers](x, keys)  # the shared layer
        return x, torch.tanh(self.pooler(x[:, 0]))  # (B, T, H), (B, H)


# ------------------------------------------------------------------ DistilBERT


class DistilBertEmbeddings(nn.Module):
    r"""DistilBERT's input: token and position embeddings, normalized (no segments),
    $e_t = \mathrm{LN}(E_{\text{tok}}[x_t] + E_{\text{pos}}[t])$.
    ``input_ids`` ``(B, T)`` -> ``(B, T, H)``."""

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position, c.hidden_size)
        self.norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        e = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.norm(e))  # (B, T, H)


class DistilBertModel(nn.Module):
    """DistilBERT's encoder: :class:`DistilBertEmbeddings` and ``n_layers`` BERT layers,
    without a pooler. ``input_ids`` and ``attention_mask`` ``(B, T)`` -> the last
    layer's states ``(B, T, H)``."""

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        if not isinstance(config, DistilBertConfig):
            raise TypeError(
                f"config must be a DistilBertConfig, got {type(config).__name__}"
            )
        self.config = config
        self.embeddings = DistilBertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.n_layers))
        self.apply(init_bert_weights)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        attention_mask = _check_ids_and_mask(self.config, input_ids, attention_mask)
        x = self.embeddings(input_ids)  # (B, T, H)
        keys = attention_mask.bool()[:, None, :]  # (B, 1, T)
        for layer in self.layers:
            x = layer(x, keys)
        return x


def student_from_teacher(
    teacher: BertModel, every: int = 2
) -> tuple[DistilBertModel, list[int]]:
    """DistilBERT's initialization: a student with one of every ``every`` layers of
    ``teacher`` (layers 0, 2, 4, ... for ``every=2``), copied with the token and
    position embeddings and their norm; the segment embeddings and the pooler are left
    out. (The paper says one layer out of two; the authors' extraction script kept
    BERT-base's layers 0, 2, 4, 7, 9, 11.) Returns the student and the teacher layers
    it copied."""
    if not isinstance(teacher, BertModel):
        raise TypeError(f"teacher must be a BertModel, got {type(teacher).__name__}")
    check_positive_int(every, "every")
    kept = list(range(0, teacher.config.n_layers, every))
    fields = {f.name: getattr(teacher.config, f.name) for f in fields_of(BertConfig)}
    student = DistilBertModel(DistilBertConfig(**{**fields, "n_layers": len(kept)}))
    with torch.no_grad():
        for name in ("word_embeddings", "position_embeddings", "norm"):
            source = getattr(teacher.embeddings, name)
            getattr(student.embeddings, name).load_state_dict(source.state_dict())
        for mine, theirs in zip(student.layers, kept, strict=True):
            mine.load_state_dict(teacher.layers[theirs].state_dict())
    return student, kept


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    temperature: float = 2.0,
    weights: tuple[float, float, float] = (5.0, 2.0, 1.0),
) -> torch.Tensor:
    r"""DistilBERT's triple loss, by default with the weights and temperature of the
    example command of Sanh et al.'s training code (the paper gives neither),
    $\mathcal L = 5\,\mathcal L_{ce} + 2\,\mathcal L_{mlm} + 1\,\mathcal L_{cos}$ at
    $T = 2$.

    ``student_logits``, ``teacher_logits`` ``(N, V)`` at the $N$ masked positions,
    ``labels`` ``(N,)``, hidden states ``(M, H)`` at the $M$ real positions. The
    computation is :func:`_distillation_loss`.
    """
    check_tensor(student_logits, "student_logits", ndim=2, floating=True)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits "
            f"{tuple(student_logits.shape)}"
        )
    check_tensor(labels, "labels", ndim=1, dtype=torch.long)
    if len(labels) != len(student_logits):
        raise ValueError(
            f"labels must have {len(student_logits)} entries, got {len(labels)}"
        )
    check_tensor(student_hidden, "student_hidden", ndim=2, floating=True)
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} must match student_hidden "
            f"{tuple(student_hidden.shape)}"
        )
    check_number(temperature, "temperature", low=0, low_open=True)
    if len(weights) != 3:
        raise ValueError(f"weights must be 3 numbers (ce, mlm, cos), got {weights!r}")
    return _distillation_loss(
        student_logits,
        teacher_logits,
        labels,
        student_hidden,
        teacher_hidden,
        temperature,
        weights,
    )


def _distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    temperature: float,
    weights: tuple[float, float, float],
) -> torch.Tensor:
    r"""The soft-target loss is Hinton et al.'s: the teacher's and the student's
    distributions at temperature $T$, $q_i = \mathrm{softmax}(z / T)_i$, compared by
    their Kullback-Leibler divergence and scaled by $T^2$ (which keeps its gradients
    the size of a hard-label loss's as $T$ changes),

    $\mathcal L_{ce} = T^2\, \mathrm{KL}(q^{\text{teacher}} \,\|\, q^{\text{student}}),$

    averaged over the masked positions. $\mathcal L_{mlm}$ is the masked-LM
    cross-entropy with the true tokens, and $\mathcal L_{cos} = 1 - \cos(h^s, h^t)$
    aligns the last hidden states, averaged over the real positions.
    """
    T = temperature
    log_q_student = F.log_softmax(student_logits / T, dim=-1)  # (N, V)
    log_q_teacher = F.log_softmax(teacher_logits / T, dim=-1)  # (N, V)
    kl = (log_q_teacher.exp() * (log_q_teacher - log_q_student)).sum(-1)  # (N,)
    soft = T**2 * kl.mean()
    hard = F.cross_entropy(student_logits, labels)
    cosine = (1 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)).mean()
    w_ce, w_mlm, w_cos = weights
    return w_ce * soft + w_mlm * hard + w_cos * cosine


# ------------------------------------------------------------------ DeBERTa


def relative_position_index(length: int, k: int, device=None) -> torch.Tensor:
    r"""DeBERTa's $\delta(i, j)$: the row of the relative-position table that query $i$
    and key $j$ use, the distance $i - j$ clipped to $[-k, k)$ and shifted to
    $[0, 2k)$,

    $\delta(i, j) = \min\big(\max(i - j + k,\ 0),\ 2k - 1\big).$

    Returns ``(length, length)`` int64.
    """
    check_positive_int(length, "length")
    check_positive_int(k, "k")
    i = torch.arange(length, device=device)
    return (i[:, None] - i[None, :] + k).clamp(0, 2 * k - 1)  # (T, T)


class DisentangledSelfAttention(nn.Module):
    r"""DeBERTa's disentangled self-attention (He et al., 2021, v1).

    Each token has a content vector $h_i$; each relative distance a position vector
    $P_{\delta}$, one table shared by all layers. Content and position get their own
    projections, $Q^c = H W_q$, $K^c = H W_k$, $V = H W_v$, $Q^r = P W_{q,r}$,
    $K^r = P W_{k,r}$, and the score of query $i$ and key $j$ adds three terms,

    $\tilde A_{ij} = \frac{Q^c_i \cdot K^c_j + Q^c_i \cdot K^r_{\delta(i,j)}
    + K^c_j \cdot Q^r_{\delta(i,j)}}{\sqrt{3d}},$

    content-to-content, content-to-position and position-to-content, with $\delta$ of
    :func:`relative_position_index` and $d$ the head size. The positions enter only
    through $\delta$: the relative distance, never the absolute position. (The paper
    writes $\delta(j, i)$ in the third term; its released code, and Hugging Face's,
    use $\delta(i, j)$, as here.)
    """

    def __init__(self, d_model: int, n_heads: int, k: int) -> None:
        super().__init__()
        _check_attention_sizes(d_model, n_heads, k)
        self.n_heads, self.d_head, self.k = n_heads, d_model // n_heads, k
        self.W_q = nn.Linear(d_model, d_model)  # content query (with a bias)
        self.W_k = nn.Linear(d_model, d_model, bias=False)  # content key
        self.W_v = nn.Linear(d_model, d_model)
        self.W_q_r = nn.Linear(d_model, d_model)  # position query (with a bias)
        self.W_k_r = nn.Linear(d_model, d_model, bias=False)  # position key
        self.W_o = nn.Linear(d_model, d_model)

    def forward(
        self, h: torch.Tensor, P: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``h`` ``(B, T, H)``, the relative-position table ``P`` ``(2k, H)``, a boolean
        key mask ``(B, 1, T)`` -> ``(B, T, H)``."""
        B, T, _ = h.shape
        Q, K, V = (
            split_heads(W(h), self.n_heads) for W in (self.W_q, self.W_k, self.W_v)
        )
        Q_r = split_heads(self.W_q_r(P)[None], self.n_heads)  # (1, nh, 2k, d)
        K_r = split_heads(self.W_k_r(P)[None], self.n_heads)  # (1, nh, 2k, d)
        delta = relative_position_index(T, self.k, h.device)  # (T, T)
        delta = delta.expand(B, self.n_heads, T, T)  # (B, nh, T, T)
        # content-to-content: Q^c_i . K^c_j
        c2c = Q @ K.transpose(-1, -2)  # (B, nh, T, T)
        # content-to-position: Q^c_i . K^r_delta(i,j), picked from (B, nh, T, 2k)
        c2p = torch.gather(Q @ K_r.transpose(-1, -2), -1, delta)
        # position-to-content: K^c_j . Q^r_delta(i,j), picked (j, i) then transposed
        p2c = torch.gather(K @ Q_r.transpose(-1, -2), -1, delta.mT).mT
        scores = (c2c + c2p + p2c) / math.sqrt(3 * self.d_head)  # (B, nh, T, T)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))  # padding keys
        return self.W_o(merge_heads(scores.softmax(-1) @ V))  # (B, T, H)


def _check_attention_sizes(d_model: object, n_heads: object, k: object) -> None:
    check_positive_int(d_model, "d_model")
    check_positive_int(n_heads, "n_heads")
    check_positive_int(k, "k")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")


class DebertaLayer(BertLayer):
    """A BERT layer whose attention is :class:`DisentangledSelfAttention`; ``x``
    ``(B, T, H)``, the table ``P`` ``(2k, H)``, the key mask ``(B, 1, T)``."""

    def __init__(self, config: DebertaConfig) -> None:
        super().__init__(config)
        c = config
        self.attn = DisentangledSelfAttention(
            c.hidden_size, c.n_heads, c.max_relative_positions
        )

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor, P: torch.Tensor
    ) -> torch.Tensor:
        h = self.norm1(x + self.dropout(self.attn(x, P, mask)))
        ff = self.linear2(F.gelu(self.linear1(h)))  # (B, T, 4H) -> (B, T, H)
        return self.norm2(h + self.dropout(ff))


class DebertaModel(nn.Module):
    r"""DeBERTa's encoder (v1, as Hugging Face's ``DebertaModel``): token embeddings,
    normalized, *no* absolute positions, ``n_layers`` :class:`DebertaLayer` that share
    one table of $2k$ relative-position embeddings. ``input_ids`` and
    ``attention_mask`` ``(B, T)`` -> ``(B, T, H)``. (The paper's enhanced mask decoder,
    which adds absolute positions just before the masked-LM head, is part of the
    pre-training head, not of this encoder.)"""

    def __init__(self, config: DebertaConfig) -> None:
        super().__init__()
        if not isinstance(config, DebertaConfig):
            raise TypeError(
                f"config must be a DebertaConfig, got {type(config).__name__}"
            )
        self.config = c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(DebertaLayer(c) for _ in range(c.n_layers))
        self.relative_embeddings = nn.Embedding(
            2 * c.max_relative_positions, c.hidden_size
        )
        self.apply(init_bert_weights)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        attention_mask = _check_ids_and_mask(self.config, input_ids, attention_mask)
        x = self.dropout(self.norm(self.word_embeddings(input_ids)))  # (B, T, H)
        keys = attention_mask.bool()[:, None, :]  # (B, 1, T)
        P = self.relative_embeddings.weight  # (2k, H)
        for layer in self.layers:
            x = layer(x, keys, P)
        return x


# ------------------------------------------------------------------ masked LM


class MaskedLM(nn.Module):
    """Any encoder of this chapter (or a ``BertModel``) with BERT's masked-LM head,
    its read-out tied to the token embedding when their sizes agree (ALBERT's differ
    when $E \\ne H$). ``input_ids`` ``(B, T)`` -> logits ``(B, T, V)``;
    ``return_hidden=True`` also returns the last hidden states."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not hasattr(encoder, "config") or not isinstance(encoder.config, BertConfig):
            raise TypeError("encoder must be a model of this chapter or a BertModel")
        self.encoder = encoder
        self.mlm = MaskedLMHead(encoder.config)
        self.mlm.apply(init_bert_weights)
        word = _word_embeddings(encoder)
        if word.weight.shape == self.mlm.decoder.weight.shape:
            self.mlm.decoder.weight = word.weight  # tied

    def forward(
        self, input_ids: torch.Tensor, return_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, H)
        logits = self.mlm(h)  # (B, T, V)
        return (logits, h) if return_hidden else logits


def _word_embeddings(model: nn.Module) -> nn.Embedding:
    if isinstance(model, DebertaModel):
        return model.word_embeddings
    return model.embeddings.word_embeddings


# ------------------------------------------------------------------ Hugging Face names

_BERT_LAYER_NAMES = {  # BertLayer: ours -> Hugging Face's BertLayer
    "attn.W_q": "attention.self.query",
    "attn.W_k": "attention.self.key",
    "attn.W_v": "attention.self.value",
    "attn.W_o": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "linear1": "intermediate.dense",
    "linear2": "output.dense",
    "norm2": "output.LayerNorm",
}
_ALBERT_LAYER_NAMES = {
    "attn.W_q": "attention.query",
    "attn.W_k": "attention.key",
    "attn.W_v": "attention.value",
    "attn.W_o": "attention.dense",
    "norm1": "attention.LayerNorm",
    "linear1": "ffn",
    "linear2": "ffn_output",
    "norm2": "full_layer_layer_norm",
}
_DISTILBERT_LAYER_NAMES = {
    "attn.W_q": "attention.q_lin",
    "attn.W_k": "attention.k_lin",
    "attn.W_v": "attention.v_lin",
    "attn.W_o": "attention.out_lin",
    "norm1": "sa_layer_norm",
    "linear1": "ffn.lin1",
    "linear2": "ffn.lin2",
    "norm2": "output_layer_norm",
}
_DEBERTA_LAYER_NAMES = {
    "attn.W_k_r": "attention.self.pos_proj",
    "attn.W_q_r": "attention.self.pos_q_proj",
    **{
        k: v
        for k, v in _BERT_LAYER_NAMES.items()
        if k.startswith(("attn.W_o", "n", "l"))
    },
}


def _rename_layers(
    state: dict[str, torch.Tensor], ours: str, theirs: str, names: dict[str, str]
) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(ours + "."):
            continue
        index, rest = key[len(ours) + 1 :].split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module in names:
            out[f"{theirs}.{index}.{names[module]}.{param}"] = value
    return out


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of one of this chapter's models under the names of its Hugging
    Face reference, ready for its ``load_state_dict`` (strict): ``RobertaModel``,
    ``AlbertModel``, ``DistilBertModel`` or ``DebertaModel`` (v1, whose content
    projections are one matrix ``in_proj`` with the query, key and value of each head
    side by side, and separate query and value biases)."""
    state = model.state_dict()
    if isinstance(model, RobertaModel):
        return hf_bert_names(state)
    if isinstance(model, AlbertModel):
        out = {
            "embeddings.LayerNorm." + k.rsplit(".", 1)[1]: v
            for k, v in state.items()
            if k.startswith("embeddings.norm.")
        }
        out |= {
            k: v
            for k, v in state.items()
            if k.startswith("embeddings.") and ".norm." not in k
        }
        out |= {
            k.replace("projection.", "encoder.embedding_hidden_mapping_in."): v
            for k, v in state.items()
            if k.startswith("projection.")
        }
        out |= {k: v for k, v in state.items() if k.startswith("pooler.")}
        inner = {k: "albert_layers.0." + v for k, v in _ALBERT_LAYER_NAMES.items()}
        out |= _rename_layers(state, "groups", "encoder.albert_layer_groups", inner)
        return out
    if isinstance(model, DistilBertModel):
        out = {
            k.replace("embeddings.norm.", "embeddings.LayerNorm."): v
            for k, v in state.items()
            if k.startswith("embeddings.")
        }
        out |= _rename_layers(
            state, "layers", "transformer.layer", _DISTILBERT_LAYER_NAMES
        )
        return out
    if isinstance(model, DebertaModel):
        out = {
            "embeddings.word_embeddings.weight": state["word_embeddings.weight"],
            "embeddings.LayerNorm.weight": state["norm.weight"],
            "embeddings.LayerNorm.bias": state["norm.bias"],
            "encoder.rel_embeddings.weight": state["relative_embeddings.weight"],
        }
        out |= _rename_layers(state, "layers", "encoder.layer", _DEBERTA_LAYER_NAMES)
        for i, layer in enumerate(model.layers):
            a = layer.attn
            n, d = a.n_heads, a.d_head
            per_head = torch.stack(  # (n, 3, d, H): head by head, q, k, v
                [W.weight.detach().reshape(n, d, -1) for W in (a.W_q, a.W_k, a.W_v)], 1
            )
            prefix = f"encoder.layer.{i}.attention.self."
            out[prefix + "in_proj.weight"] = per_head.reshape(3 * n * d, -1)
            out[prefix + "q_bias"] = a.W_q.bias.detach()
            out[prefix + "v_bias"] = a.W_v.bias.detach()
        return out
    raise TypeError(
        "model must be a RobertaModel, AlbertModel, DistilBertModel or DebertaModel, "
        f"got {type(model).__name__}"
    )


# ------------------------------------------------------------------ the experiment


def static_masks(
    windows: torch.Tensor, mask_id: int, vocab_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's static masking: every window masked once, before training, with
    :func:`~dlabc.language_models.bert.mask_tokens` (15 %, 80-10-10); training then
    sees the same masked positions of a window at every epoch. Returns the inputs and
    labels ``(N, T)``."""
    generator = torch.Generator().manual_seed(seed)
    return mask_tokens(windows, mask_id, vocab_size, generator=generator)


def pretrain(
    model: MaskedLM,
    windows: torch.Tensor,
    steps: int,
    mask_id: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    static: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher: MaskedLM | None = None,
) -> list[float]:
    """Train ``model`` with the masked-LM loss on random batches of ``windows``
    ``(N, T)`` for ``steps`` AdamW steps (warm-up over the first 10 %, then a
    constant ``lr``); returns the loss of every step.

    The masks are drawn afresh for every batch (RoBERTa's dynamic masking) unless
    ``static`` gives each window's fixed masked input and labels
    (:func:`static_masks`). With a ``teacher``, the loss is DistilBERT's
    :func:`distillation_loss` against the teacher's logits and last hidden states.
    """
    check_tensor(windows, "windows", ndim=2, dtype=torch.long)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    vocab_size = model.encoder.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    losses = []
    model.train()
    for step in range(steps):
        index = torch.randint(len(windows), (batch_size,), generator=generator)
        if static is None:  # dynamic: a new mask every time a window is seen
            inputs, labels = mask_tokens(
                windows[index], mask_id, vocab_size, generator=generator
            )
        else:
            inputs, labels = static[0][index], static[1][index]
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        logits, h = model(inputs, return_hidden=True)  # (B, T, V), (B, T, H)
        chosen = labels != IGNORE
        if teacher is None:
            loss = F.cross_entropy(logits[chosen], labels[chosen])
        else:
            with torch.no_grad():
                teacher_logits, teacher_h = teacher(inputs, return_hidden=True)
            loss = _distillation_loss(
                logits[chosen],
                teacher_logits[chosen],
                labels[chosen],
                h.flatten(0, 1),
                teacher_h.flatten(0, 1),
                2.0,
                (5.0, 2.0, 1.0),
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def masked_lm_loss(
    model: MaskedLM, inputs: torch.Tensor, labels: torch.Tensor
) -> float:
    """The mean cross-entropy (nats) of ``model`` at the masked positions of a fixed
    held-out set, ``inputs`` and ``labels`` ``(N, T)``."""
    was_training = model.training
    model.eval()
    logits = model(inputs)  # (N, T, V)
    model.train(was_training)
    chosen = labels != IGNORE
    return F.cross_entropy(logits[chosen], labels[chosen]).item()
