r"""Fine-tuning BERT: a small head on top of a pre-trained encoder for sequence
classification, token classification (named entities, BIO tags) and extractive question
answering; a bag-of-words logistic regression to compare with; the span F1 of named
entity recognition.

Chapter: ``book/language_models/fine_tuning.md``.

References:
- Devlin, Chang, Lee & Toutanova (2019), *BERT: Pre-training of Deep Bidirectional
  Transformers for Language Understanding*, NAACL (the three heads: a classifier on the
  pooled ``[CLS]`` state, a classifier on every token, start and end vectors for a span;
  fine-tuning every weight with a small learning rate).
- Howard & Ruder (2018), *Universal Language Model Fine-tuning for Text Classification*,
  ACL (fine-tuning a pre-trained language model, gradually unfreezing its layers).
- Ramshaw & Marcus (1995), *Text Chunking using Transformation-Based Learning* (the
  inside/outside/begin tags); Tjong Kim Sang & De Meulder (2003), the CoNLL-2003 shared
  task (entities scored as whole spans: precision, recall, F1).
- Strauss et al. (2016), *Results of the WNUT16 Named Entity Recognition Shared Task*
  (the tweets of :func:`dlabc.data.load_twitter_ner`).
- Rajpurkar et al. (2016), *SQuAD: 100,000+ Questions for Machine Comprehension of
  Text*, EMNLP (extractive question answering: the answer is a span of the passage).

The encoder is the BERT chapter's :class:`~dlabc.language_models.bert.BertModel`. The
heads keep Hugging Face's attribute names (``bert``, ``dropout``, ``classifier``,
``qa_outputs``), so :func:`hf_head_names` only renames the encoder's part of a
``state_dict``. :class:`BertTop` runs the upper layers of an encoder from states that
its frozen lower layers computed once (:func:`frozen_states`), which is how the chapter
fine-tunes on one CPU thread. Shapes: ``B`` batch, ``T`` positions, ``H`` hidden size,
``C`` classes, ``V`` vocabulary.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.language_models.bert import BertModel, hf_bert_names, mean_pool, pad

__all__ = [
    "IGNORE",
    "split_by_group",
    "BagOfWords",
    "LogisticRegression",
    "bags",
    "fit_logistic_regression",
    "BertTop",
    "length_batches",
    "frozen_states",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "qa_loss",
    "best_span",
    "hf_head_names",
    "encode_words",
    "bio_spans",
    "span_scores",
    "QAExample",
    "shakespeare_qa",
    "encode_qa",
    "padded",
]

#: The label of a position that a loss ignores (PyTorch's default ``ignore_index``).
IGNORE = -100


# ------------------------------------------------------------------ data and baseline


def split_by_group(
    groups: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train and a test set such that each group (a film) lies wholly on
    one side: ``round(test_fraction * n_groups)`` groups, drawn at random, go to the
    test set. Both index arrays are sorted."""
    if not isinstance(groups, np.ndarray) or groups.ndim != 1 or len(groups) == 0:
        raise ValueError("groups must be a non-empty 1-D NumPy array")
    check_number(
        test_fraction, "test_fraction", low=0, high=1, low_open=True, high_open=True
    )
    names = np.unique(groups)
    n_test = round(test_fraction * len(names))
    if not 0 < n_test < len(names):
        raise ValueError(
            f"test_fraction={test_fraction} leaves no group on one side "
            f"({len(names)} groups)"
        )
    rng = np.random.default_rng(seed)
    test_groups = rng.choice(names, size=n_test, replace=False)
    is_test = np.isin(groups, test_groups)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


class BagOfWords:
    """A vocabulary of lower-cased words (runs of two or more letters, digits or
    underscores, as scikit-learn's ``CountVectorizer`` cuts them) that occur in at least
    ``min_count`` training texts; :meth:`encode` turns a text into the ids of its known
    words, one id per occurrence, in order. Ids follow the alphabetical order of the
    words."""

    PATTERN = re.compile(r"(?u)\b\w\w+\b")

    def __init__(self, texts: list[str], min_count: int = 1) -> None:
        _check_texts(texts)
        check_positive_int(min_count, "min_count")
        df = Counter(w for t in texts for w in set(self.words(t)))
        self.vocab = sorted(w for w, n in df.items() if n >= min_count)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def words(cls, text: str) -> list[str]:
        return cls.PATTERN.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in self.words(text) if w in self.ids]

    def counts(self, texts: list[str]) -> torch.Tensor:
        """The ``(N, V)`` matrix of word counts (a dense tensor: for small sets)."""
        _check_texts(texts)
        X = torch.zeros(len(texts), len(self))
        for row, text in enumerate(texts):
            for i in self.encode(text):
                X[row, i] += 1
        return X


def _check_texts(texts: object) -> None:
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    if not texts:
        raise ValueError("texts must not be empty")


class LogisticRegression(nn.Module):
    r"""Logistic regression on word counts: the probability that a text is positive is

    $p(y = 1 \mid x) = \sigma(w^\top x + b), \qquad x_v = \text{count of word } v .$

    The text arrives as the ids of its words (``ids`` flat, ``offsets`` where each text
    starts, as ``nn.EmbeddingBag`` takes them), so $w^\top x$ is a sum of one weight per
    word occurrence and the count matrix is never built. Returns the logits ``(N,)``.
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        check_positive_int(vocab_size, "vocab_size")
        self.w = nn.EmbeddingBag(vocab_size, 1, mode="sum")  # w, one weight a word
        self.b = nn.Parameter(torch.zeros(()))
        nn.init.zeros_(self.w.weight)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.w(ids, offsets).squeeze(-1) + self.b  # (N,): w^T x + b


def bags(encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of word ids as the flat ``ids`` and the ``offsets`` that
    :class:`LogisticRegression` reads."""
    lengths = torch.tensor([0] + [len(e) for e in encoded[:-1]])
    ids = torch.tensor([i for e in encoded for i in e], dtype=torch.long)
    return ids, lengths.cumsum(0)


def fit_logistic_regression(
    model: LogisticRegression,
    encoded: list[list[int]],
    y: torch.Tensor,
    l2: float,
    max_iter: int = 200,
) -> LogisticRegression:
    r"""Fit ``model`` to texts (lists of word ids) and labels 0/1 by minimizing the mean
    cross-entropy plus an L2 penalty on the weights (not the bias),

    $\frac1N \sum_i \ell\big(y_i, \sigma(w^\top x_i + b)\big)
    + \frac{\lambda}{2}\lVert w \rVert^2 ,$

    a smooth convex problem, solved with full-batch L-BFGS. This is scikit-learn's
    ``LogisticRegression(C=1 / (lambda * N))``.
    """
    if not isinstance(model, LogisticRegression):
        raise TypeError(
            f"model must be a LogisticRegression, got {type(model).__name__}"
        )
    check_tensor(y, "y", ndim=1, dtype=torch.long)
    if len(encoded) != len(y) or not encoded:
        raise ValueError(
            f"encoded and y must be non-empty and of the same length, got {len(encoded)}"
            f" and {len(y)}"
        )
    check_number(l2, "l2", low=0)
    check_positive_int(max_iter, "max_iter")
    return _fit_logistic_regression(model, *bags(encoded), y.double(), l2, max_iter)


def _fit_logistic_regression(model, ids, offsets, y, l2, max_iter):
    model.double()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = model(ids, offsets)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        loss = loss + l2 / 2 * model.w.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model.float()


# ------------------------------------------------------------------ the encoder, split


class BertTop(nn.Module):
    """The upper layers of a :class:`BertModel`, from layer ``start`` on, and its
    pooler: the same modules (the same parameters), called on the states that the
    lower layers computed. ``hidden`` ``(B, T, H)``, ``attention_mask`` ``(B, T)``
    -> the last layer's states ``(B, T, H)`` and the pooled ``(B, H)``, as
    :class:`BertModel` returns them. ``token_type_ids`` is accepted and unused (the
    segments entered with the embeddings)."""

    def __init__(self, bert: BertModel, start: int) -> None:
        super().__init__()
        if not isinstance(bert, BertModel):
            raise TypeError(f"bert must be a BertModel, got {type(bert).__name__}")
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"start must be an int, got {type(start).__name__}")
        if not 0 <= start <= len(bert.layers):
            raise ValueError(f"start must be in 0..{len(bert.layers)}, got {start}")
        self.config = bert.config
        self.layers = bert.layers[start:]
        self.pooler = bert.pooler

    def forward(
        self,
        hidden: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor(hidden, "hidden", ndim=3, floating=True)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        return self._forward(hidden, attention_mask)

    def _forward(self, x, attention_mask):
        keys = attention_mask.bool()[:, None, :]  # (B, 1, T)
        for layer in self.layers:
            x = layer(x, keys)  # (B, T, H)
        return x, torch.tanh(self.pooler(x[:, 0]))  # (B, T, H), (B, H)


@torch.no_grad()
def frozen_states(
    bert: BertModel,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    n_layers: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """The states after the embeddings and the first ``n_layers`` layers of ``bert``, in
    evaluation mode and without gradients, in batches: what :class:`BertTop` with
    ``start=n_layers`` reads. ``(B, T)`` ids -> ``(B, T, H)``."""
    if not isinstance(bert, BertModel):
        raise TypeError(f"bert must be a BertModel, got {type(bert).__name__}")
    check_tensor(input_ids, "input_ids", ndim=2, dtype=torch.long)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, t in (
        ("token_type_ids", token_type_ids),
        ("attention_mask", attention_mask),
    ):
        check_tensor(t, name)
        if t.shape != input_ids.shape:
            raise ValueError(
                f"{name} must have the shape of input_ids, got {tuple(t.shape)}"
            )
    if isinstance(n_layers, bool) or not isinstance(n_layers, int):
        raise TypeError(f"n_layers must be an int, got {type(n_layers).__name__}")
    if not 0 <= n_layers <= len(bert.layers):
        raise ValueError(f"n_layers must be in 0..{len(bert.layers)}, got {n_layers}")
    check_positive_int(batch_size, "batch_size")
    was_training = bert.training
    bert.eval()
    lengths = attention_mask.sum(1)
    out = None
    # sequences of similar length together, each batch cut to its longest: less padding
    for index in lengths.argsort().split(batch_size):
        T = int(lengths[index].max())
        ids, types = input_ids[index, :T], token_type_ids[index, :T]
        keys = attention_mask[index, :T].bool()[:, None, :]  # (b, 1, T)
        x = bert.embeddings(ids, types)  # (b, T, H)
        for layer in bert.layers[:n_layers]:
            x = layer(x, keys)
        if out is None:
            out = x.new_zeros(*input_ids.shape, x.shape[-1])
        out[index, :T] = x
    bert.train(was_training)
    return out  # (B, T, H), zeros on the padding


def length_batches(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
):
    """Endless batches of indices of sequences of similar length: the indices sorted by
    length (ties at random) and cut into batches, whose order is shuffled each epoch.
    A batch then needs little padding."""
    check_tensor(lengths, "lengths", ndim=1)
    check_positive_int(batch_size, "batch_size")
    while True:
        shuffled = torch.randperm(len(lengths), generator=generator)
        order = shuffled[lengths[shuffled].argsort(stable=True)]
        batches = order.split(batch_size)
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]


# ------------------------------------------------------------------ the three heads


class BertForSequenceClassification(nn.Module):
    r"""A class for the whole sequence, from the pooled ``[CLS]`` state (Devlin et al.),

    $p(c \mid x) = \mathrm{softmax}\big(W\, \mathrm{pooled}(x) + b\big)_c .$

    ``bert`` is a :class:`BertModel` (or a :class:`BertTop`); the head adds
    $W \in \mathbb{R}^{C \times H}$ and $b$, with dropout before them.
    ``pooling="mean"`` reads the mean of the last states instead (Sentence-BERT's
    $\bar h = \sum_t m_t h_t / \sum_t m_t$, what all-MiniLM-L6-v2 was trained to
    produce). Returns the logits ``(B, C)``.
    """

    def __init__(
        self,
        bert: nn.Module,
        num_labels: int,
        dropout: float = 0.1,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        hidden = _hidden_size(bert)
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling = pooling
        check_positive_int(num_labels, "num_labels")
        check_number(dropout, "dropout", low=0, high=1, high_open=True)
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)  # W, b
        _init_head(self.classifier)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        h, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        if self.pooling == "mean":  # (B, T, H) -> (B, H)
            pooled = mean_pool(h, attention_mask)
        return self.classifier(self.dropout(pooled))  # (B, C)


class BertForTokenClassification(nn.Module):
    r"""A class for every token, from its last state $h_t$:

    $p(c \mid x, t) = \mathrm{softmax}(W h_t + b)_c .$

    For named entities the classes are BIO tags. Returns the logits ``(B, T, C)``.
    """

    def __init__(self, bert: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = _hidden_size(bert)
        check_positive_int(num_labels, "num_labels")
        check_number(dropout, "dropout", low=0, high=1, high_open=True)
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)  # W, b
        _init_head(self.classifier)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        h, _ = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        return self.classifier(self.dropout(h))  # (B, T, C)


class BertForQuestionAnswering(nn.Module):
    r"""The start and the end of an answer span, each a softmax over the positions
    (Devlin et al.): two vectors $S, E \in \mathbb{R}^H$ score every token,

    $p_{\text{start}}(t) = \mathrm{softmax}_t(S^\top h_t), \qquad
    p_{\text{end}}(t) = \mathrm{softmax}_t(E^\top h_t) .$

    ``qa_outputs`` holds $S$ and $E$ as the two rows of one ``(2, H)`` matrix (and a
    bias each). Returns the start and end logits, ``(B, T)`` each.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.qa_outputs = nn.Linear(_hidden_size(bert), 2)  # rows S and E
        _init_head(self.qa_outputs)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        h, _ = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        start, end = self.qa_outputs(h).unbind(-1)  # (B, T) each: S^T h_t, E^T h_t
        return start, end


def qa_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
) -> torch.Tensor:
    r"""The span loss of BERT: the mean of the cross-entropies of the true start and the
    true end, $\tfrac12\big(-\log p_{\text{start}}(s) - \log p_{\text{end}}(e)\big)$,
    averaged over the batch."""
    return (F.cross_entropy(start_logits, start) + F.cross_entropy(end_logits, end)) / 2


def best_span(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    allowed: torch.Tensor,
    max_length: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The span $(s, e)$ with the highest score $S^\top h_s + E^\top h_e$ such that
    $s \le e < s + $ ``max_length`` and both ends lie where ``allowed`` ``(B, T)`` is
    true (the passage's tokens). Returns the starts and ends ``(B,)``."""
    check_tensor(allowed, "allowed", ndim=2, dtype=torch.bool)
    for name, t in (("start_logits", start_logits), ("end_logits", end_logits)):
        check_tensor(t, name, ndim=2, floating=True)
        if t.shape != allowed.shape:
            raise ValueError(
                f"{name} must have the shape of allowed, got {tuple(t.shape)}"
            )
    check_positive_int(max_length, "max_length")
    T = allowed.shape[1]
    score = start_logits[:, :, None] + end_logits[:, None, :]  # (B, T_s, T_e)
    s, e = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = (s <= e) & (e < s + max_length)  # (T, T)
    ok = ok & allowed[:, :, None] & allowed[:, None, :]  # (B, T, T)
    flat = score.masked_fill(~ok, float("-inf")).flatten(1).argmax(1)  # (B,)
    return flat // T, flat % T


def _hidden_size(bert: object) -> int:
    if not isinstance(bert, (BertModel, BertTop)):
        raise TypeError(
            f"bert must be a BertModel or a BertTop, got {type(bert).__name__}"
        )
    return bert.config.hidden_size


def _init_head(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, std=0.02)  # BERT's initialization
    nn.init.zeros_(linear.bias)


def hf_head_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``state_dict`` of one of our heads under Hugging Face's names, for
    ``BertForSequenceClassification``, ``BertForTokenClassification`` or
    ``BertForQuestionAnswering``: the encoder's part renamed by the BERT chapter's
    :func:`~dlabc.language_models.bert.hf_bert_names`, the head's kept."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    encoder = {k: v for k, v in state_dict.items() if k.startswith("bert.")}
    head = {k: v for k, v in state_dict.items() if not k.startswith("bert.")}
    unknown = [k for k in head if k.split(".")[0] not in ("classifier", "qa_outputs")]
    if unknown:
        raise KeyError(f"no Hugging Face name for {unknown}")
    return {**hf_bert_names(encoder), **head}


# ------------------------------------------------------------------ named entities


def encode_words(
    tokenizer: object,
    words: list[str],
    labels: list[int],
    max_length: int = 64,
) -> tuple[list[int], list[int], list[int]]:
    """A sentence given as words, with one label per word, as BERT's input: ``[CLS]``,
    the word pieces of every word, ``[SEP]``, cut to ``max_length`` tokens. Returns the
    ids, the label of each token (the word's label on its first piece, :data:`IGNORE`
    on the others and on ``[CLS]``/``[SEP]``), and for each word the position of its
    first piece (``-1`` for a word that lost its pieces to the cut or has none)."""
    if len(words) != len(labels):
        raise ValueError(
            f"words and labels must have the same length, got {len(words)} and "
            f"{len(labels)}"
        )
    check_positive_int(max_length, "max_length")
    ids, token_labels, first = [tokenizer.cls_id], [IGNORE], []
    for word, label in zip(words, labels, strict=True):
        pieces = tokenizer.encode(word)[1:-1]  # without [CLS] and [SEP]
        if not pieces or len(ids) + len(pieces) > max_length - 1:
            first.append(-1)
            continue
        first.append(len(ids))
        ids += pieces
        token_labels += [label] + [IGNORE] * (len(pieces) - 1)
    return ids + [tokenizer.sep_id], token_labels + [IGNORE], first


def bio_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    r"""The entities of a BIO-tagged sentence as ``(type, first, last)`` spans, read the
    way the CoNLL evaluation script (and ``seqeval``'s default mode) reads them: an
    entity begins at ``B-X``, and also at an ``I-X`` that does not continue an entity of
    type ``X``; it goes on over the ``I-X`` that follow, and ends before anything
    else."""
    spans, current = set(), None  # current: [type, first]
    for t, tag in enumerate([*tags, "O"]):
        kind, _, name = tag.partition("-")
        continues = kind == "I" and current is not None and current[0] == name
        if current is not None and not continues:
            spans.add((current[0], current[1], t - 1))  # the entity ended at t - 1
            current = None
        if kind in ("B", "I") and not continues:
            current = [name, t]  # an entity begins at t
    return spans


def span_scores(
    true_tags: list[list[str]], predicted_tags: list[list[str]]
) -> tuple[float, float, float]:
    r"""Precision, recall and F1 of the predicted entities against the true ones, over
    all sentences, an entity counting as found only if type, start and end all match:

    $P = \frac{|\text{true} \cap \text{predicted}|}{|\text{predicted}|}, \quad
    R = \frac{|\text{true} \cap \text{predicted}|}{|\text{true}|}, \quad
    F_1 = \frac{2PR}{P + R} .$

    (0 where a denominator is 0.)"""
    if len(true_tags) != len(predicted_tags):
        raise ValueError(
            f"true_tags and predicted_tags must hold as many sentences, got "
            f"{len(true_tags)} and {len(predicted_tags)}"
        )
    for i, (a, b) in enumerate(zip(true_tags, predicted_tags, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"sentence {i} has {len(a)} true tags, {len(b)} predicted")
    true = {(i, *s) for i, tags in enumerate(true_tags) for s in bio_spans(tags)}
    found = {(i, *s) for i, tags in enumerate(predicted_tags) for s in bio_spans(tags)}
    hits = len(true & found)
    precision = hits / len(found) if found else 0.0
    recall = hits / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return precision, recall, f1


# ------------------------------------------------------------------ question answering


@dataclass(frozen=True)
class QAExample:
    """A question, a passage given as words, and the answer: the passage's words
    ``start`` to ``end`` (inclusive)."""

    question: str
    context: list[str]
    start: int
    end: int

    @property
    def answer(self) -> str:
        return " ".join(self.context[self.start : self.end + 1])

    @property
    def passage(self) -> str:
        return " ".join(self.context).replace(" :", ":")


def shakespeare_qa(
    text: str,
    n: int,
    speeches: int = 3,
    max_words: int = 10,
    seed: int = 0,
) -> list[QAExample]:
    """``n`` questions "Who says "<line>"?" over passages of Shakespeare.

    ``text`` is in the layout of :func:`dlabc.data.load_shakespeare` (a speaker's name
    and a colon on a line, the speech below, a blank line between speeches). Each
    passage is the first lines (3 to ``max_words`` words) of ``speeches`` speeches of
    different speakers (names in capitals), taken from random places of the text and
    written ``NAME: line``; the question quotes one of the lines, and the answer is
    the name in front of it. The questions are generated: they test whether a model
    finds the quoted line and points at the name before it, nothing more.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    check_positive_int(n, "n")
    check_positive_int(speeches, "speeches")
    check_positive_int(max_words, "max_words")
    pool = [
        (m.group(1), m.group(2).split())
        for m in re.finditer(r"^([A-Z][A-Z' ]*[A-Z]):\n([^\n]+)", text, flags=re.M)
        if 3 <= len(m.group(2).split()) <= max_words
    ]
    if len({name for name, _ in pool}) < speeches:
        raise ValueError(f"text has fewer than speeches={speeches} speakers")
    rng = np.random.default_rng(seed)
    examples = []
    while len(examples) < n:
        chosen = [pool[i] for i in rng.choice(len(pool), size=speeches, replace=False)]
        if len({name for name, _ in chosen}) < speeches:
            continue  # every speaker once: the name alone cannot give the answer
        k = int(rng.integers(speeches))
        context, start = [], 0
        for j, (name, line) in enumerate(chosen):
            if j == k:
                start = len(context)
            context += [*name.split(), ":", *line]
        end = start + len(chosen[k][0].split()) - 1
        question = f'Who says "{" ".join(chosen[k][1])}"?'
        examples.append(QAExample(question, context, start, end))
    return examples


def encode_qa(
    tokenizer: object, example: QAExample
) -> tuple[list[int], list[int], int, int]:
    """``[CLS] question [SEP] passage [SEP]`` as ids, their segments (0, then 1 from the
    passage on), and the positions of the answer's first and last word piece."""
    if not isinstance(example, QAExample):
        raise TypeError(f"example must be a QAExample, got {type(example).__name__}")
    ids = tokenizer.encode(example.question)  # [CLS] question [SEP]
    types = [0] * len(ids)
    start = end = -1
    for w, word in enumerate(example.context):
        if w == example.start:
            start = len(ids)
        ids += tokenizer.encode(word)[1:-1]
        if w == example.end:
            end = len(ids) - 1
    ids.append(tokenizer.sep_id)
    types += [1] * (len(ids) - len(types))
    return ids, types, start, end


def padded(sequences: list[list[int]], value: int = 0) -> torch.Tensor:
    """Lists of different lengths as one ``(B, T)`` tensor padded on the right with
    ``value`` (the BERT chapter's :func:`~dlabc.language_models.bert.pad` gives the
    ids and their mask)."""
    return pad(sequences, pad_id=value)[0]
