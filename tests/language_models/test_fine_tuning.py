"""Tests for ``dlabc.language_models.fine_tuning``.

The three heads are compared with Hugging Face's ``BertForSequenceClassification``,
``BertForTokenClassification`` and ``BertForQuestionAnswering`` built from a tiny random
``BertConfig``, our weights copied in under Hugging Face's names, in float64: logits,
losses (HF's ``labels=`` / ``start_positions=``) and gradients. The split encoder
(``frozen_states`` then ``BertTop``) is compared with the whole ``BertModel``; the mean
pooling head with the BERT chapter's ``mean_pool`` computed by hand. The span scores are
compared with ``seqeval`` on random (also ill-formed) BIO sequences, the bag of words
with scikit-learn's ``CountVectorizer``, the logistic regression with scikit-learn's
``LogisticRegression`` (same objective), the word alignment and the question-answering
encoding with Hugging Face's ``BertTokenizerFast`` on MiniLM's vocabulary, the best span
with brute force. Bad input must fail clearly.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression as SkLogisticRegression

import transformers
from dlabc import data
from dlabc.language_models.bert import BertConfig, BertModel, pad
from dlabc.language_models.fine_tuning import (
    IGNORE,
    BagOfWords,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertTop,
    LogisticRegression,
    QAExample,
    bags,
    best_span,
    bio_spans,
    encode_qa,
    encode_words,
    fit_logistic_regression,
    frozen_states,
    hf_head_names,
    length_batches,
    padded,
    qa_loss,
    shakespeare_qa,
    span_scores,
    split_by_group,
)
from dlabc.language_models.tokenization import WordPiece
from helpers_weights import randomize

transformers.logging.set_verbosity_error()
F64 = dict(atol=1e-10, rtol=1e-10)


def _tiny(layers=2):
    ours = BertConfig(
        vocab_size=41,
        hidden_size=16,
        n_layers=layers,
        n_heads=2,
        intermediate_size=24,
        max_position=20,
        dropout=0.0,
    )
    hf = transformers.BertConfig(
        vocab_size=41,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=20,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return ours, hf


def _randomize(module):
    return randomize(module).double().eval()


def _without_pooler(state_dict):
    """Hugging Face's token and span heads build their encoder without the pooler."""
    return {k: v for k, v in state_dict.items() if ".pooler." not in k}


def _batch():
    ids = torch.randint(41, (3, 9))
    types = torch.randint(2, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, types, mask


# ---------------------------------------------------------------- the heads against HF


def test_sequence_classification_matches_hugging_face():
    torch.manual_seed(0)
    ours_config, hf_config = _tiny()
    hf_config.num_labels = 3
    ours = _randomize(BertForSequenceClassification(BertModel(ours_config), 3))
    ref = transformers.BertForSequenceClassification(hf_config).double().eval()
    ref.load_state_dict(hf_head_names(ours.state_dict()), strict=True)
    ids, types, mask = _batch()
    y = torch.tensor([0, 2, 1])
    logits = ours(ids, types, mask)
    out = ref(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=y)
    torch.testing.assert_close(logits, out.logits, **F64)
    loss = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(loss, out.loss, **F64)
    loss.backward()
    out.loss.backward()
    torch.testing.assert_close(
        ours.classifier.weight.grad, ref.classifier.weight.grad, **F64
    )
    torch.testing.assert_close(
        ours.bert.layers[0].linear1.weight.grad,
        ref.bert.encoder.layer[0].intermediate.dense.weight.grad,
        **F64,
    )


def test_mean_pooling_head_averages_the_real_tokens():
    torch.manual_seed(1)
    config, _ = _tiny()
    bert = _randomize(BertModel(config))
    head = BertForSequenceClassification(bert, 2, pooling="mean").double().eval()
    ids, types, mask = _batch()
    hidden, _ = bert(ids, types, mask)
    by_hand = torch.stack([hidden[b, mask[b].bool()].mean(0) for b in range(len(ids))])
    expected = by_hand @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head(ids, types, mask), expected, **F64)


def test_token_classification_matches_hugging_face():
    torch.manual_seed(2)
    ours_config, hf_config = _tiny()
    hf_config.num_labels = 5
    ours = _randomize(BertForTokenClassification(BertModel(ours_config), 5))
    ref = transformers.BertForTokenClassification(hf_config).double().eval()
    ref.load_state_dict(_without_pooler(hf_head_names(ours.state_dict())), strict=True)
    ids, types, mask = _batch()
    labels = torch.randint(5, ids.shape).masked_fill(mask == 0, IGNORE)
    logits = ours(ids, types, mask)
    out = ref(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels)
    torch.testing.assert_close(logits, out.logits, **F64)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, out.loss, **F64)


def test_question_answering_matches_hugging_face():
    torch.manual_seed(3)
    ours_config, hf_config = _tiny()
    ours = _randomize(BertForQuestionAnswering(BertModel(ours_config)))
    ref = transformers.BertForQuestionAnswering(hf_config).double().eval()
    ref.load_state_dict(_without_pooler(hf_head_names(ours.state_dict())), strict=True)
    ids, types, mask = _batch()
    s, e = torch.tensor([1, 2, 0]), torch.tensor([3, 4, 1])
    start, end = ours(ids, types, mask)
    out = ref(
        input_ids=ids,
        token_type_ids=types,
        attention_mask=mask,
        start_positions=s,
        end_positions=e,
    )
    torch.testing.assert_close(start, out.start_logits, **F64)
    torch.testing.assert_close(end, out.end_logits, **F64)
    torch.testing.assert_close(qa_loss(start, end, s, e), out.loss, **F64)


def test_frozen_states_then_top_equal_the_whole_encoder():
    torch.manual_seed(4)
    config, _ = _tiny(layers=3)
    bert = _randomize(BertModel(config))
    ids, types, mask = _batch()
    hidden, pooled = bert(ids, types, mask)
    for start in range(4):
        x = frozen_states(bert, ids, types, mask, n_layers=start, batch_size=2)
        h, p = BertTop(bert, start)(x, None, mask)
        real = mask.bool()
        torch.testing.assert_close(h[real], hidden[real], **F64)
        torch.testing.assert_close(p, pooled, **F64)
    top = BertTop(bert, 2)
    assert top.layers[0] is bert.layers[2] and top.pooler is bert.pooler


def test_hf_head_names_rejects_unknown_keys():
    with pytest.raises(KeyError, match="no Hugging Face name"):
        hf_head_names({"scorer.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        hf_head_names([1])


# ---------------------------------------------------------------- spans and F1


TYPES = ["PER", "LOC", "ORG"]


def _random_tags(rng, n):
    choices = ["O"] * 4 + [f"{k}-{t}" for k in "BI" for t in TYPES]
    return [rng.choice(choices) for _ in range(n)]


def test_span_scores_equal_seqeval_on_random_and_ill_formed_tags():
    rng = random.Random(0)
    for _ in range(30):
        true = [_random_tags(rng, rng.randint(1, 12)) for _ in range(rng.randint(1, 6))]
        pred = [
            [
                t if rng.random() < 0.6 else rng.choice(["O", "B-PER", "I-LOC"])
                for t in s
            ]
            for s in true
        ]
        p, r, f = span_scores(true, pred)
        assert p == pytest.approx(
            precision_score(true, pred, zero_division=0), abs=1e-12
        )
        assert r == pytest.approx(recall_score(true, pred, zero_division=0), abs=1e-12)
        assert f == pytest.approx(f1_score(true, pred, zero_division=0), abs=1e-12)


def test_bio_spans_by_hand():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "B-PER"]
    assert bio_spans(tags) == {
        ("PER", 0, 1),
        ("LOC", 3, 4),
        ("LOC", 5, 5),
        ("ORG", 6, 6),
        ("PER", 7, 7),
    }
    assert bio_spans(["O", "O"]) == set()
    assert span_scores([["O"]], [["O"]]) == (0.0, 0.0, 0.0)


def test_span_scores_rejects_mismatched_input():
    with pytest.raises(ValueError, match="as many sentences"):
        span_scores([["O"]], [])
    with pytest.raises(ValueError, match="sentence 0 has 1 true tags, 2 predicted"):
        span_scores([["O"]], [["O", "O"]])


# ---------------------------------------------------------------- data and baseline


def test_split_by_group_keeps_each_group_on_one_side():
    groups = np.repeat(np.arange(40), np.arange(1, 41))
    train, test = split_by_group(groups, 0.25, seed=3)
    assert np.array_equal(
        np.sort(np.concatenate([train, test])), np.arange(len(groups))
    )
    assert not set(groups[train]) & set(groups[test])
    assert len(set(groups[test])) == 10
    again = split_by_group(groups, 0.25, seed=3)
    assert np.array_equal(again[1], test)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        split_by_group(groups, 1.5)
    with pytest.raises(ValueError, match="leaves no group"):
        split_by_group(np.zeros(5, dtype=int), 0.5)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        split_by_group(np.zeros((2, 2)), 0.5)


TEXTS = [
    "A fine, fine film.",
    "Dull and long; a dull film!",
    "Fine acting, dull plot 42 times",
    "An actor's best",
]


def test_bag_of_words_equals_count_vectorizer():
    for min_count in (1, 2):
        bow = BagOfWords(TEXTS, min_count=min_count)
        sk = CountVectorizer(min_df=min_count)
        counts = sk.fit_transform(TEXTS).toarray()
        assert bow.vocab == list(sk.get_feature_names_out())
        assert torch.equal(bow.counts(TEXTS), torch.tensor(counts, dtype=torch.float32))
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        BagOfWords("a text")
    with pytest.raises(ValueError, match="min_count must be positive"):
        BagOfWords(TEXTS, min_count=0)


def test_logistic_regression_equals_scikit_learn():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 8))) for _ in range(60)]
    bow = BagOfWords(texts)
    X = bow.counts(texts).double()
    y = torch.tensor((X[:, :10].sum(1) > X[:, 10:20].sum(1)).long().numpy())
    l2 = 0.05
    model = fit_logistic_regression(
        LogisticRegression(len(bow)), [bow.encode(t) for t in texts], y, l2=l2
    )
    sk = SkLogisticRegression(C=1 / (l2 * len(texts)), tol=1e-10, max_iter=10_000)
    sk.fit(X.numpy(), y.numpy())
    with torch.no_grad():
        ours = torch.sigmoid(model.double()(*bags([bow.encode(t) for t in texts])))
    np.testing.assert_allclose(
        ours.numpy(), sk.predict_proba(X.numpy())[:, 1], atol=1e-6
    )
    np.testing.assert_allclose(
        model.w.weight[:, 0].detach().numpy(), sk.coef_[0], atol=1e-5
    )
    with pytest.raises(ValueError, match="same length"):
        fit_logistic_regression(LogisticRegression(3), [[0]], y, l2=0.1)
    with pytest.raises(TypeError, match="model must be a LogisticRegression"):
        fit_logistic_regression(torch.nn.Linear(2, 1), [[0]], y[:1], l2=0.1)


def test_length_batches_cover_every_index_each_epoch_with_similar_lengths():
    lengths = torch.tensor([5, 1, 9, 3, 3, 7, 2, 8, 6, 4])
    stream = length_batches(lengths, 3, torch.Generator().manual_seed(0))
    epoch = [next(stream) for _ in range(4)]  # 3 + 3 + 3 + 1
    assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    spans = sorted(int(lengths[b].max() - lengths[b].min()) for b in epoch)
    assert spans[-1] <= 2  # sorted by length, then cut


# ---------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizers():
    folder = data.load_minilm()
    return (
        WordPiece.from_vocab(folder / "vocab.txt"),
        transformers.BertTokenizerFast.from_pretrained(str(folder)),
    )


def test_encode_words_labels_first_pieces_like_hugging_face(tokenizers):
    ours, hf = tokenizers
    tweets = data.load_twitter_ner()[:40]
    for words, _ in tweets:
        labels = list(range(len(words)))
        ids, token_labels, first = encode_words(ours, words, labels, max_length=512)
        enc = hf(words, is_split_into_words=True)
        assert ids == enc["input_ids"]
        word_ids = enc.word_ids()
        expected = [
            w if w is not None and (k == 0 or word_ids[k - 1] != w) else IGNORE
            for k, w in enumerate(word_ids)
        ]
        assert token_labels == expected
        for w, position in enumerate(first):
            if position >= 0:
                assert token_labels[position] == w
    ids, token_labels, first = encode_words(ours, ["a"] * 20, [1] * 20, max_length=8)
    assert len(ids) == 8 and first[6:] == [-1] * 14 and ids[-1] == ours.sep_id
    with pytest.raises(ValueError, match="same length"):
        encode_words(ours, ["a"], [])


# A few speeches in the layout of ``data.load_shakespeare`` (loading all of it takes
# seconds); names of one and of two words, lines of 2 to 9 words.
PLAY = """HAMLET:
To be, or not to be: that is the question:
Whether 'tis nobler in the mind to suffer

OPHELIA:
Good my lord,
How does your honour for this many a day?

FIRST WITCH:
When shall we three meet again

MACBETH:
So foul and fair a day I have not seen.

LADY MACBETH:
Out, damned spot! out, I say!

KING:
Welcome.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?

SECOND WITCH:
When the hurlyburly's done,
"""


def test_shakespeare_qa_and_its_encoding_match_hugging_face(tokenizers):
    ours, hf = tokenizers
    examples = shakespeare_qa(PLAY, 20, speeches=3, max_words=8, seed=1)
    assert len(examples) == 20
    for ex in examples:
        names = [w for w in ex.context if w.isupper()]  # speaker names are upper case
        assert ex.answer in " ".join(names)
        quoted = ex.question.split('"')[1]
        line_start = ex.end + 2  # after the name and the colon
        assert " ".join(ex.context[line_start:]).startswith(quoted)
        ids, types, start, end = encode_qa(ours, ex)
        enc = hf(ex.question, ex.passage, return_offsets_mapping=True)
        assert ids == enc["input_ids"] and types == enc["token_type_ids"]
        char = ex.passage.index(ex.answer + ":")
        while (
            " ".join(ex.context[: ex.start]).replace(" :", ":")
            not in ex.passage[: char + 1]
        ):
            char = ex.passage.index(ex.answer + ":", char + 1)
        assert start == enc.char_to_token(0, char, sequence_index=1)
        last = char + len(ex.answer) - 1
        assert end == enc.char_to_token(0, last, sequence_index=1)
    with pytest.raises(ValueError, match="fewer than speeches=3 speakers"):
        shakespeare_qa("A:\nline one here\n\nB:\nline two here\n", 1)
    with pytest.raises(TypeError, match="example must be a QAExample"):
        encode_qa(ours, "question")
    assert QAExample("q", ["X", ":", "y"], 0, 0).passage == "X: y"


def test_best_span_equals_brute_force():
    torch.manual_seed(5)
    start, end = torch.randn(4, 7), torch.randn(4, 7)
    allowed = torch.rand(4, 7) < 0.7
    allowed[:, 3] = True
    s, e = best_span(start, end, allowed, max_length=3)
    for b in range(4):
        best = max(
            (float(start[b, i] + end[b, j]), i, j)
            for i in range(7)
            for j in range(i, min(i + 3, 7))
            if allowed[b, i] and allowed[b, j]
        )
        assert (int(s[b]), int(e[b])) == best[1:]
    with pytest.raises(ValueError, match="start_logits must have the shape of allowed"):
        best_span(start[:, :3], end, allowed)


def test_padded_and_bad_heads():
    assert padded([[1, 2], [3]], IGNORE).tolist() == [[1, 2], [3, IGNORE]]
    assert torch.equal(padded([[1], [2, 3]]), pad([[1], [2, 3]])[0])
    with pytest.raises(TypeError, match="bert must be a BertModel or a BertTop"):
        BertForSequenceClassification(torch.nn.Linear(2, 2), 2)
    config, _ = _tiny()
    with pytest.raises(ValueError, match="pooling must be"):
        BertForSequenceClassification(BertModel(config), 2, pooling="max")
    with pytest.raises(ValueError, match="num_labels must be positive"):
        BertForTokenClassification(BertModel(config), 0)
    with pytest.raises(ValueError, match="start must be in 0..2"):
        BertTop(BertModel(config), 3)
    with pytest.raises(ValueError, match="n_layers must be in 0..2"):
        frozen_states(
            BertModel(config), torch.zeros(1, 3, dtype=torch.long), n_layers=5
        )
