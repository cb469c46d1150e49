r"""Retrieval-augmented generation: find passages that answer a question, then let a
language model read them.

The code of the chapter ``book/modern_llm/rag.md``:

- passages of a few dozen words cut from Wikipedia articles, and the lower-cased words
  that a lexical retriever compares;
- Okapi BM25 (Robertson and Zaragoza, "The probabilistic relevance framework: BM25 and
  beyond", 2009), with the IDF floor of the ``rank_bm25`` package, whose scores it
  equals;
- dense retrieval with a sentence encoder (Reimers and Gurevych, "Sentence-BERT", 2019;
  Karpukhin et al., "Dense passage retrieval for open-domain question answering",
  2020): the all-MiniLM-L6-v2 embeddings of ``dlabc.language_models.bert``, cosine
  similarity as a dot product;
- reciprocal rank fusion (Cormack, Clarke and Büttcher, 2009) and recall@k;
- the reader: SmolLM2 answering a question with the retrieved passages in its prompt,
  as retrieval-augmented generation (Lewis et al., 2020) does, scored by SQuAD's exact
  match (Rajpurkar et al., 2016) and by whether the reply contains the answer.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from dlabc.checks import check_number, check_positive_int
from dlabc.language_models.bert import BertModel, sentence_embeddings
from dlabc.language_models.gpt2 import chat

__all__ = [
    "BM25",
    "DenseRetriever",
    "QUESTIONS",
    "answer",
    "contains_answer",
    "exact_match",
    "normalize_answer",
    "passages",
    "rag_messages",
    "recall_at_k",
    "reciprocal_rank_fusion",
    "tokenize",
    "top_k",
]


# --------------------------------------------------------------------- the corpus


def passages(
    articles: Sequence[tuple[str, str]], words: int = 60, per_article: int | None = None
) -> list[tuple[str, str]]:
    """Cut each ``(title, text)`` article into passages of ``words`` words (the last
    one of an article may be shorter), keeping the first ``per_article`` of each (all
    of them if ``None``). Returns ``(title, passage)`` pairs, article by article."""
    check_positive_int(words, "words")
    if per_article is not None:
        check_positive_int(per_article, "per_article")
    if not all(
        isinstance(a, tuple) and len(a) == 2 and all(isinstance(s, str) for s in a)
        for a in articles
    ):
        raise TypeError("articles must be a sequence of (title, text) string pairs")
    return _passages(articles, words, per_article)


def _passages(articles, words, per_article):
    out = []
    for title, text in articles:
        tokens = text.split()
        chunks = [tokens[i : i + words] for i in range(0, len(tokens), words)]
        out += [(title, " ".join(chunk)) for chunk in chunks[:per_article]]
    return out


def tokenize(text: str) -> list[str]:
    """The terms a lexical retriever compares: lower-cased runs of letters and
    digits (``"Apollo 11's crew"`` → ``["apollo", "11", "s", "crew"]``)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return re.findall(r"\w+", text.lower())


# ------------------------------------------------------------------------- BM25


class BM25:
    r"""Okapi BM25: the score of a document $D$ for a query $Q = q_1, \dots, q_n$ is

    $$
    \begin{aligned}
    \mathrm{BM25}(D, Q) &= \sum_{i=1}^{n} \mathrm{IDF}(q_i)\,
        \frac{f(q_i, D)\,(k_1 + 1)}{f(q_i, D) + k_1 \ell_D} , \\
    \ell_D &= 1 - b + b\, |D| / \overline{|D|} ,
    \end{aligned}
    $$

    with $f(q, D)$ the count of $q$ in $D$, $|D|$ its length in terms and
    $\overline{|D|}$ the mean length: $k_1$ caps what repeating a term can add, $b$
    discounts long documents. A term found in $n(q)$ of the $N$ documents has

    $$
    \mathrm{IDF}(q) = \ln \frac{N - n(q) + 0.5}{n(q) + 0.5},
    $$

    negative for a term in more than half of the documents; as in ``rank_bm25``,
    such a term gets $\varepsilon$ times the mean IDF of the vocabulary instead.
    """

    def __init__(
        self,
        corpus: Sequence[Sequence[str]],
        k1: float = 1.5,
        b: float = 0.75,
        epsilon: float = 0.25,
    ) -> None:
        if not corpus or not all(
            isinstance(doc, (list, tuple)) and all(isinstance(t, str) for t in doc)
            for doc in corpus
        ):
            raise TypeError("corpus must be a non-empty list of lists of terms")
        if sum(len(doc) for doc in corpus) == 0:
            raise ValueError("corpus must hold at least one term")
        self.k1 = check_number(k1, "k1", low=0)
        self.b = check_number(b, "b", low=0, high=1)
        self.epsilon = check_number(epsilon, "epsilon", low=0)
        self._index(corpus)

    def _index(self, corpus: Sequence[Sequence[str]]) -> None:
        self.counts = [Counter(doc) for doc in corpus]  # f(q, D)
        self.lengths = np.array([len(doc) for doc in corpus], dtype=np.float64)  # |D|
        self.mean_length = self.lengths.mean()
        n = Counter(term for c in self.counts for term in c)  # n(q)
        N = len(corpus)
        self.idf = {
            q: math.log(N - n_q + 0.5) - math.log(n_q + 0.5) for q, n_q in n.items()
        }
        floor = self.epsilon * sum(self.idf.values()) / len(self.idf)
        self.idf = {q: floor if v < 0 else v for q, v in self.idf.items()}

    def scores(self, query: Sequence[str]) -> np.ndarray:
        """BM25 of every document for the query's terms: ``(N,)``."""
        if isinstance(query, str) or not all(isinstance(t, str) for t in query):
            raise TypeError("query must be a list of terms (use tokenize(text))")
        return self._scores(query)

    def _scores(self, query: Sequence[str]) -> np.ndarray:
        k1, b = self.k1, self.b
        ell = 1 - b + b * self.lengths / self.mean_length  # (N,)
        score = np.zeros(len(self.counts))
        for q in query:  # a term twice in the query counts twice
            f = np.array([c[q] for c in self.counts], dtype=np.float64)  # (N,)
            score += self.idf.get(q, 0.0) * f * (k1 + 1) / (f + k1 * ell)
        return score


# ------------------------------------------------------------------ dense retrieval


class DenseRetriever:
    r"""Retrieval by meaning: every passage is embedded once by a sentence encoder
    (all-MiniLM-L6-v2), the query at search time, and the score is their cosine
    similarity, a dot product of unit vectors:

    $$
    s(q, p) = \frac{E(q)^\top E(p)}{\lVert E(q) \rVert\, \lVert E(p) \rVert}
            = E(q)^\top E(p) .
    $$
    """

    def __init__(
        self,
        model: BertModel,
        tokenizer: object,
        texts: list[str],
        batch_size: int = 16,  # small batches: little padding
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        with torch.no_grad():
            self.embeddings = sentence_embeddings(  # (N, 384), rows of length 1
                model, tokenizer, texts, batch_size=batch_size
            )

    def scores(self, query: str) -> np.ndarray:
        """Cosine similarity of the query to every passage: ``(N,)``."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        return self._scores(query)

    def _scores(self, query: str) -> np.ndarray:
        with torch.no_grad():
            q = sentence_embeddings(self.model, self.tokenizer, [query])  # (1, 384)
        return (self.embeddings @ q[0]).cpu().double().numpy()  # (N,)


# ---------------------------------------------------------- rankings and fusion


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """The indices of the ``k`` highest scores, best first (ties: lower index first)."""
    check_positive_int(k, "k")
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {scores.shape}")
    return np.argsort(-scores, kind="stable")[:k].tolist()


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60) -> list[int]:
    r"""Merge rankings of the same documents into one. A document's fused score is

    $$
    \mathrm{RRF}(d) = \sum_{r} \frac{1}{k + \mathrm{rank}_r(d)} ,
    $$

    summed over the rankings $r$ that contain it, ranks counted from 1; only the
    ranks matter, not the retrievers' incomparable scores. Returns every document
    of any ranking, best first (ties: the document seen first)."""
    check_positive_int(k, "k")
    for r in rankings:
        if len(set(r)) != len(r):
            raise ValueError("each ranking must list a document at most once")
    return _fuse(rankings, k)


def _fuse(rankings, k):
    fused = {}
    for ranking in rankings:
        for rank, d in enumerate(ranking, start=1):
            fused[d] = fused.get(d, 0.0) + 1 / (k + rank)
    return sorted(fused, key=fused.get, reverse=True)  # stable: first seen first


def recall_at_k(ranking: Sequence[int], relevant: set[int], k: int) -> float:
    r"""The share of the relevant documents found in the first ``k`` of a ranking,
    $|\mathrm{top}_k \cap R| \,/\, |R|$ (with one relevant document: 1 if it is
    among the first ``k``, else 0)."""
    check_positive_int(k, "k")
    if not relevant:
        raise ValueError("relevant must hold at least one document")
    return len(set(ranking[:k]) & set(relevant)) / len(relevant)


# ------------------------------------------------------------------- the reader


def rag_messages(question: str, context: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """The chat that asks the reader for a short answer: one example exchange that
    shows the form of answer wanted, then the question, with the retrieved
    ``(title, passage)`` pairs in front of it when there are any (closed book
    without)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    ask = "Question: {}\nAnswer in a few words."
    example = [
        {"role": "user", "content": ask.format("What is the capital of France?")},
        {"role": "assistant", "content": "Paris"},
    ]
    passages = "".join(f"{title}: {text}\n\n" for title, text in context)
    return example + [{"role": "user", "content": passages + ask.format(question)}]


def answer(
    model,
    tokenizer,
    question: str,
    context: Sequence[tuple[str, str]] = (),
    max_new_tokens: int = 16,
) -> str:
    """The reader's answer: greedy decoding (the same on every run) of the chat
    that :func:`rag_messages` writes, cut at the end of its first line."""
    check_positive_int(max_new_tokens, "max_new_tokens")
    text = chat(model, tokenizer, rag_messages(question, context), max_new_tokens)
    return text.split("\n")[0].strip()


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the),
    single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> bool:
    """Whether the prediction is the true answer once both are normalised."""
    _check_strings(prediction, truth)
    return normalize_answer(prediction) == normalize_answer(truth)


def contains_answer(prediction: str, truth: str) -> bool:
    """Whether the normalised true answer appears in the normalised prediction as
    whole words: a reply that states the answer in a sentence counts."""
    _check_strings(prediction, truth)
    return f" {normalize_answer(truth)} " in f" {normalize_answer(prediction)} "


def _check_strings(prediction: object, truth: object) -> None:
    if not isinstance(prediction, str) or not isinstance(truth, str):
        raise TypeError("prediction and truth must be strings")
    if not normalize_answer(truth):
        raise ValueError(f"truth must hold a word once normalised, got {truth!r}")


# ------------------------------------------------------------------ the questions

# Questions written for the chapter, each with its short answer and the article of
# load_wikipedia() that states it within its first 110 words.
QUESTIONS: list[tuple[str, str, str]] = [
    (
        "In which year was Graeme Base's book Animalia first published?",
        "1986",
        "Animalia (book)",
    ),
    ("Who directed the 1997 Catalan film Actrius?", "Ventura Pons", "Actrius"),
    (
        "In which year did George Gershwin write An American in Paris?",
        "1928",
        "An American in Paris",
    ),
    (
        "Which conductor commissioned An American in Paris from Gershwin?",
        "Walter Damrosch",
        "An American in Paris",
    ),
    (
        "On what date was Animal Farm first published in England?",
        "17 August 1945",
        "Animal Farm",
    ),
    (
        "Who is the editor-in-chief of the journal Algorithms?",
        "Kazuo Iwama",
        "Algorithms (journal)",
    ),
    (
        "In which year was the journal Algorithms established?",
        "2008",
        "Algorithms (journal)",
    ),
    ("In which city was the film director Allan Dwan born?", "Toronto", "Allan Dwan"),
    ("How many provinces does Algeria consist of?", "48", "Algeria"),
    ("Who has been the premier of Alberta since May 2015?", "Rachel Notley", "Alberta"),
    (
        "At which battle was Albert Sidney Johnston killed?",
        "Battle of Shiloh",
        "Albert Sidney Johnston",
    ),
    (
        "In which year did Albert Einstein receive the Nobel Prize in Physics?",
        "1921",
        "Albert Einstein",
    ),
    ("In which city was Aristotle born?", "Stagira", "Aristotle"),
    ("Who was Aristotle's father?", "Nicomachus", "Aristotle"),
    ("Who was the mother of Achilles?", "Thetis", "Achilles"),
    ("In which year did Ayn Rand publish The Fountainhead?", "1943", "Ayn Rand"),
    ("In which year did Ayn Rand move to the United States?", "1926", "Ayn Rand"),
    (
        "On what date was the mathematician Alain Connes born?",
        "1 April 1947",
        "Alain Connes",
    ),
    (
        "At which Oxford college did Aldous Huxley study?",
        "Balliol College",
        "Aldous Huxley",
    ),
    ("What is the capital of Angola?", "Luanda", "Angola"),
    ("Who developed the martial art Aikido?", "Morihei Ueshiba", "Aikido"),
    ("Which philosopher coined the word altruism?", "Auguste Comte", "Altruism"),
    ("On what date did work on the ASCII standard begin?", "October 6, 1960", "ASCII"),
    ("What is the capital of Andorra?", "Andorra la Vella", "Andorra"),
    ("On what date was Andre Agassi born?", "April 29, 1970", "Andre Agassi"),
    ("In which town was Abraham Lincoln born?", "Hodgenville", "Abraham Lincoln"),
    (
        "Which statistician developed the analysis of variance?",
        "Ronald Fisher",
        "Analysis of variance",
    ),
    (
        "How many seconds ahead of UTC is International Atomic Time?",
        "36",
        "International Atomic Time",
    ),
    (
        "How many Austroasiatic languages does Ethnologue identify?",
        "168",
        "Austroasiatic languages",
    ),
    ("Who is the twin sister of the god Apollo?", "Artemis", "Apollo"),
    ("On what date did Aldous Huxley die?", "22 November 1963", "Aldous Huxley"),
    ("What does the name aardwolf mean in Afrikaans?", "earth wolf", "Aardwolf"),
]
