"""Tests of dlabc.modern_llm.rag: BM25 against rank_bm25, dense retrieval against a
Hugging Face BERT by brute force, fusion and recall against their definitions by
hand, the reader against a greedy loop without a cache, and SQuAD's exact match."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rank_bm25 import BM25Okapi

from dlabc import data
from dlabc.improvements.modern_block import BlockLM
from dlabc.language_models.bert import BertConfig, BertModel, from_hf_bert_names
from dlabc.language_models.gpt2 import chat_prompt
from dlabc.modern_llm.rag import (
    BM25,
    QUESTIONS,
    DenseRetriever,
    answer,
    contains_answer,
    exact_match,
    normalize_answer,
    passages,
    rag_messages,
    recall_at_k,
    reciprocal_rank_fusion,
    tokenize,
    top_k,
)
from helpers_weights import randomize
from transformers import BertConfig as HFBertConfig
from transformers import BertModel as HFBertModel

# ------------------------------------------------------------------ the corpus


def test_passages_cut_articles_into_word_windows():
    articles = [("A", " ".join(f"a{i}" for i in range(7))), ("B", "x  y\nz")]
    assert passages(articles, words=3) == [
        ("A", "a0 a1 a2"),
        ("A", "a3 a4 a5"),
        ("A", "a6"),
        ("B", "x y z"),
    ]
    assert passages(articles, words=3, per_article=1) == [
        ("A", "a0 a1 a2"),
        ("B", "x y z"),
    ]


def test_passages_and_tokenize_reject_bad_input():
    with pytest.raises(ValueError, match="words must be positive"):
        passages([("A", "x y")], words=0)
    with pytest.raises(ValueError, match="per_article must be positive"):
        passages([("A", "x y")], per_article=0)
    with pytest.raises(TypeError, match="articles must be a sequence of"):
        passages(["A: x y"])
    with pytest.raises(TypeError, match="text must be a str"):
        tokenize(["x"])


def test_tokenize_lower_cases_words_and_numbers():
    assert tokenize("Apollo 11's crew: Armstrong, ALDRIN.") == [
        "apollo",
        "11",
        "s",
        "crew",
        "armstrong",
        "aldrin",
    ]


# ------------------------------------------------------------------------- BM25


def _random_corpus(rng, n_docs=40, vocab=25):
    words = [f"w{i}" for i in range(vocab)]
    p = np.linspace(3, 0.2, vocab)  # frequent words: in most documents, IDF < 0
    p /= p.sum()
    return [
        list(rng.choice(words, size=rng.integers(1, 30), p=p)) for _ in range(n_docs)
    ]


@pytest.mark.parametrize(
    "k1, b, epsilon",
    [(1.5, 0.75, 0.25), (0.9, 0.4, 0.0), (2.0, 1.0, 0.5), (1.2, 0.0, 1.0)],
)
def test_bm25_equals_rank_bm25(k1, b, epsilon):
    rng = np.random.default_rng(0)
    corpus = _random_corpus(rng)
    ours = BM25(corpus, k1=k1, b=b, epsilon=epsilon)
    reference = BM25Okapi(corpus, k1=k1, b=b, epsilon=epsilon)
    in_docs = Counter(term for doc in corpus for term in set(doc))
    assert max(in_docs.values()) > len(corpus) / 2  # some IDF < 0: the floor acts
    queries = [["w0"], ["w3", "w3", "w20"], ["w24", "unknown", "w1"], [], ["w7"] * 3]
    for query in queries:
        np.testing.assert_allclose(
            ours.scores(query), reference.get_scores(query), rtol=0, atol=1e-9
        )


def test_bm25_closed_form_on_a_two_document_corpus():
    # N = 2, n(x) = 1: IDF = ln(1.5 / 1.5) = 0; n(y) = 1 too; |D| = 2 and 1
    bm25 = BM25([["x", "x"], ["y"]], k1=1.0, b=0.0)
    np.testing.assert_allclose(bm25.scores(["x"]), [0.0, 0.0])
    # three documents: n(x) = 1, IDF = ln(2.5 / 1.5); b = 0 ignores the lengths
    bm25 = BM25([["x", "x"], ["y"], ["y", "z"]], k1=1.0, b=0.0)
    idf = np.log(2.5 / 1.5)
    np.testing.assert_allclose(bm25.scores(["x"]), [idf * 2 * 2 / 3, 0, 0], atol=1e-12)


def test_bm25_rejects_bad_input():
    with pytest.raises(TypeError, match="corpus must be a non-empty list"):
        BM25([])
    with pytest.raises(TypeError, match="corpus must be a non-empty list"):
        BM25(["not tokenized"])
    with pytest.raises(ValueError, match="corpus must hold at least one term"):
        BM25([[], []])
    with pytest.raises(ValueError, match=r"b must be in \[0, 1\]"):
        BM25([["x"]], b=1.5)
    with pytest.raises(ValueError, match="k1 must be in"):
        BM25([["x"]], k1=-1)
    with pytest.raises(TypeError, match="query must be a list of terms"):
        BM25([["x"]]).scores("x y")


# ------------------------------------------------------------------ dense retrieval


class _CharTokenizer:
    """Characters as ids 2..V-1, with [CLS] = 0 and [SEP] = 1 around them."""

    pad_id = 0

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text):
        return [0] + [2 + ord(c) % (self.vocab_size - 2) for c in text] + [1]


def test_dense_retriever_is_the_cosine_of_mean_pooled_hugging_face_states():
    torch.manual_seed(0)
    hf_config = HFBertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    reference = randomize(HFBertModel(hf_config)).double().eval()
    ours = BertModel(
        BertConfig(
            vocab_size=40,
            hidden_size=16,
            n_layers=2,
            n_heads=4,
            intermediate_size=24,
            max_position=32,
            type_vocab_size=2,
            layer_norm_eps=1e-12,
            dropout=0.0,
        )
    )
    ours.load_state_dict(from_hf_bert_names(reference.state_dict()))
    ours = ours.double().eval()
    tokenizer = _CharTokenizer(40)
    texts = ["the moon", "a long passage about rivers", "moon landing", "x"]
    retriever = DenseRetriever(ours, tokenizer, texts, batch_size=3)

    def embed(text):  # one text at a time: no padding at all
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            return reference(input_ids=ids).last_hidden_state[0].mean(0)

    query = "moon"
    expected = [
        F.cosine_similarity(embed(query), embed(t), dim=0).item() for t in texts
    ]
    np.testing.assert_allclose(retriever.scores(query), expected, rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match="query must be a str"):
        retriever.scores(["moon"])


# ---------------------------------------------------------- rankings and fusion


def test_top_k_is_a_stable_descending_sort():
    scores = np.array([0.1, 0.5, 0.5, -1.0, 0.3])
    assert top_k(scores, 3) == [1, 2, 4]
    assert top_k(scores, 10) == [1, 2, 4, 0, 3]
    with pytest.raises(ValueError, match="k must be positive"):
        top_k(scores, 0)
    with pytest.raises(ValueError, match="scores must be one-dimensional"):
        top_k(np.zeros((2, 2)), 1)


def test_reciprocal_rank_fusion_by_hand():
    # a: ranks 1 and 3 -> 1/61 + 1/63; b: 2 and 1 -> 1/62 + 1/61; c: 3, - ; d: -, 2
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "d", "a"]], k=60)
    assert fused == ["b", "a", "d", "c"]
    # k = 1: a 1/2 + 1/4, b 1/3 + 1/2, d 1/3, c 1/4: the same order
    assert reciprocal_rank_fusion([["a", "b", "c"], ["b", "d", "a"]], k=1) == fused


def test_reciprocal_rank_fusion_equals_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        rankings = [list(rng.permutation(12)[: rng.integers(1, 12)]) for _ in range(3)]
        k = int(rng.integers(1, 80))
        docs = sorted({d for r in rankings for d in r})
        score = {
            d: sum(1 / (k + r.index(d) + 1) for r in rankings if d in r) for d in docs
        }
        fused = reciprocal_rank_fusion(rankings, k=k)
        assert sorted(fused) == docs
        values = [score[d] for d in fused]
        assert all(a >= b - 1e-15 for a, b in itertools.pairwise(values))


def test_reciprocal_rank_fusion_rejects_repeated_documents():
    with pytest.raises(ValueError, match="at most once"):
        reciprocal_rank_fusion([[1, 2, 1]])
    with pytest.raises(ValueError, match="k must be positive"):
        reciprocal_rank_fusion([[1, 2]], k=0)


def test_recall_at_k_counts_the_relevant_documents_found():
    ranking = [4, 2, 7, 1, 0]
    assert recall_at_k(ranking, {7}, 2) == 0 and recall_at_k(ranking, {7}, 3) == 1
    assert recall_at_k(ranking, {2, 0, 9}, 5) == pytest.approx(2 / 3)
    assert recall_at_k(ranking, {2, 0, 9}, 100) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="relevant must hold"):
        recall_at_k(ranking, set(), 1)


# ------------------------------------------------------------------- the reader


class _ChatTokenizer:
    """Characters as ids, and SmolLM2's two chat markers as one id each."""

    SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2}

    def encode(self, text):
        ids = []
        for part in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            ids += (
                [self.SPECIAL[part]]
                if part in self.SPECIAL
                else [3 + ord(c) % 60 for c in part]
            )
        return ids

    def decode(self, ids):
        return "".join("\n" if i == 3 + 10 else chr(97 + i % 26) for i in ids)


def test_answer_is_greedy_decoding_of_the_rag_chat():
    torch.manual_seed(0)
    model = BlockLM(64, 16, 2, 2, 32).double().eval()
    tokenizer = _ChatTokenizer()
    context = [("Moon", "The Moon is bright."), ("Sun", "The Sun is hot.")]
    question = "How bright is the Moon?"
    got = answer(model, tokenizer, question, context, max_new_tokens=10)

    ids = tokenizer.encode(chat_prompt(rag_messages(question, context)))
    new = []
    with torch.no_grad():
        for _ in range(10):  # no cache: the whole sequence every step
            token = model(torch.tensor([ids + new]))[0, -1].argmax().item()
            if token == 2:
                break
            new.append(token)
    assert got == tokenizer.decode(new).strip().split("\n")[0].strip()
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        answer(model, tokenizer, question, context, max_new_tokens=0)


def test_rag_messages_put_the_passages_before_the_question():
    *example, closed = rag_messages("Who?")
    assert [m["role"] for m in example] == ["user", "assistant"]
    assert closed["role"] == "user" and closed["content"].startswith("Question: Who?")
    *same, opened = rag_messages("Who?", [("T", "passage one"), ("U", "two")])
    assert same == example
    content = opened["content"]
    assert content.startswith("T: passage one")
    assert content.index("U: two") < content.index("Question: Who?")
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        rag_messages("  ")


@pytest.mark.parametrize(
    "prediction, truth, em, contains",
    [
        ("The Battle of Shiloh.", "Battle of Shiloh", True, True),
        ("1 April, 1947", "1 April 1947", True, True),
        ("It was 1928!", "1928", False, True),
        ("19281", "1928", False, False),  # whole words only
        ("an Apple", "apple", True, True),
        ("Theater", "ater", False, False),  # "the" only as a word
        ("4,196,457 people", "4196457", False, True),
    ],
)
def test_exact_match_and_contains_answer(prediction, truth, em, contains):
    assert exact_match(prediction, truth) is em
    assert contains_answer(prediction, truth) is contains


def test_normalize_answer_is_squads():
    assert normalize_answer("  The  Cat's-HAT, a  (big) one ") == "catshat big one"
    with pytest.raises(TypeError, match="prediction and truth must be strings"):
        exact_match(None, "x")
    with pytest.raises(ValueError, match="truth must hold a word"):
        contains_answer("x", "the")


def test_every_question_is_answered_at_the_start_of_its_article():
    articles = dict(data.load_wikipedia())
    for question, truth, title in QUESTIONS:
        start = " ".join(articles[title].split()[:110])
        assert f" {normalize_answer(truth)} " in f" {normalize_answer(start)} ", (
            question
        )
    assert len({q for q, _, _ in QUESTIONS}) == len(QUESTIONS)
