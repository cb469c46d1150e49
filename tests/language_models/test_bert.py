"""Tests for ``dlabc.language_models.bert``.

The encoder and the pre-training model are compared with Hugging Face's ``BertModel``
and ``BertForPreTraining`` built from tiny random configurations, the weights copied in
both directions through the renaming tables, in float64 (outputs, the pre-training loss
and its gradients). The real all-MiniLM-L6-v2 weights are loaded once: our model with
our WordPiece tokenizer against ``BertModel.from_pretrained`` with
``BertTokenizerFast``. The parameter counts of the published configurations are
compared with Hugging Face's models built on the meta device. The masking rule is
checked statistically (rates within five standard deviations of 15 % and 80/10/10),
segments against the tokenizer's ``token_type_ids``, padding against
``pad_sequence``, pooling against a loop. Bad input must fail clearly.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dlabc import data
from dlabc.language_models import count_parameters
from dlabc.language_models.bert import (
    CONFIGS,
    IGNORE,
    BertConfig,
    BertForPreTraining,
    BertModel,
    from_hf_bert_names,
    hf_bert_names,
    init_bert_weights,
    load_minilm,
    mask_tokens,
    masked_lm_loss,
    masked_lm_predictions,
    mean_pool,
    next_sentence_pairs,
    pad,
    pair_input,
    pretraining_loss,
    sentence_embeddings,
)
from helpers_weights import randomize
from transformers import BertConfig as HFBertConfig
from transformers import BertForPreTraining as HFBertForPreTraining
from transformers import BertModel as HFBertModel
from transformers import BertTokenizerFast

F64 = dict(atol=1e-10, rtol=1e-10)


def _configs(vocab=37, hidden=16, layers=2, heads=4, inter=24, positions=12, types=2):
    ours = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        n_layers=layers,
        n_heads=heads,
        intermediate_size=inter,
        max_position=positions,
        type_vocab_size=types,
        layer_norm_eps=1e-12,
        dropout=0.0,
    )
    hf = HFBertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=positions,
        type_vocab_size=types,
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return ours, hf


_randomize = randomize


def _batch(config, batch=3, length=9):
    ids = torch.randint(config.vocab_size, (batch, length))
    types = torch.randint(config.type_vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0  # padding on the right
    mask[2, 2:] = 0
    return ids, types, mask


CASES = [  # vocab, hidden, layers, heads, inter
    (37, 16, 1, 2, 24),
    (50, 24, 2, 4, 40),
    (64, 32, 3, 8, 64),
]


# ---------------------------------------------------------------- against HF


@pytest.mark.parametrize("sizes", CASES)
def test_bert_model_matches_hugging_face(sizes):
    torch.manual_seed(0)
    ours_config, hf_config = _configs(*sizes)
    ref = _randomize(HFBertModel(hf_config)).double().eval()
    ours = BertModel(ours_config).double().eval()
    ours.load_state_dict(from_hf_bert_names(ref.state_dict()))
    ids, types, mask = _batch(ours_config)
    hidden, pooled = ours(ids, types, mask)
    out = ref(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(hidden, out.last_hidden_state, **F64)
    torch.testing.assert_close(pooled, out.pooler_output, **F64)
    # the defaults: segment A everywhere, no padding
    hidden, pooled = ours(ids)
    torch.testing.assert_close(hidden, ref(input_ids=ids).last_hidden_state, **F64)


@pytest.mark.parametrize("sizes", CASES[:2])
def test_pretraining_model_matches_hugging_face_both_ways(sizes):
    torch.manual_seed(1)
    ours_config, hf_config = _configs(*sizes)
    ours = _randomize(BertForPreTraining(ours_config)).double().eval()
    ref = HFBertForPreTraining(hf_config).double().eval()
    ref.load_state_dict(hf_bert_names(ours.state_dict()))  # strict
    ids, types, mask = _batch(ours_config)
    mlm, nsp = ours(ids, types, mask)
    out = ref(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(mlm, out.prediction_logits, **F64)
    torch.testing.assert_close(nsp, out.seq_relationship_logits, **F64)
    # and back: Hugging Face's weights into a fresh model of ours
    back = BertForPreTraining(ours_config).double().eval()
    back.load_state_dict(from_hf_bert_names(ref.state_dict()))
    torch.testing.assert_close(back(ids, types, mask)[0], mlm, **F64)


def test_the_read_out_is_tied_to_the_token_embedding():
    model = BertForPreTraining(_configs()[0])
    assert model.mlm.decoder.weight is model.bert.embeddings.word_embeddings.weight
    hf = HFBertForPreTraining(_configs()[1])
    assert count_parameters(lambda: BertForPreTraining(_configs()[0])) == sum(
        p.numel() for p in hf.parameters()
    )


def test_pretraining_loss_and_gradients_match_hugging_face():
    torch.manual_seed(2)
    ours_config, hf_config = _configs(*CASES[1])
    ours = _randomize(BertForPreTraining(ours_config)).double()
    ref = HFBertForPreTraining(hf_config).double()
    ref.load_state_dict(hf_bert_names(ours.state_dict()))
    ids, types, mask = _batch(ours_config)
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, IGNORE)
    labels[0, 0] = ids[0, 0]  # at least one masked position
    is_next = torch.tensor([0, 1, 1])
    loss = pretraining_loss(*ours(ids, types, mask), labels, is_next)
    ref_loss = ref(
        input_ids=ids,
        token_type_ids=types,
        attention_mask=mask,
        labels=labels,
        next_sentence_label=is_next,
    ).loss
    torch.testing.assert_close(loss, ref_loss, **F64)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(
        ours.bert.embeddings.word_embeddings.weight.grad,
        ref.bert.embeddings.word_embeddings.weight.grad,
        **F64,
    )
    torch.testing.assert_close(
        ours.bert.layers[0].attn.W_q.weight.grad,
        ref.bert.encoder.layer[0].attention.self.query.weight.grad,
        **F64,
    )


def test_masked_lm_loss_equals_the_loss_over_all_positions():
    torch.manual_seed(3)
    config = _configs(vocab=40, hidden=16, layers=1, heads=2, inter=16)[0]
    model = _randomize(BertForPreTraining(config)).double()
    ids = torch.randint(5, 40, (32, 12))  # about 58 chosen positions
    loss = masked_lm_loss(model, ids, 4, (0,), torch.Generator().manual_seed(7))
    inputs, labels = mask_tokens(
        ids, 4, 40, (0,), generator=torch.Generator().manual_seed(7)
    )
    logits, _ = model(inputs)
    full = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, full, **F64)
    # predictions: the same positions chosen, every one of them shown as [MASK]
    true, predicted = masked_lm_predictions(
        model, ids, 4, (0,), torch.Generator().manual_seed(7)
    )
    chosen = labels != IGNORE
    assert (inputs[chosen] != 4).any()  # the loss's input kept some tokens visible
    hidden_logits, _ = model(torch.where(chosen, 4, ids))
    assert torch.equal(true, ids[chosen])
    assert torch.equal(predicted, hidden_logits[chosen].argmax(-1))
    with pytest.raises(TypeError, match="model must be a BertForPreTraining"):
        masked_lm_loss(model.bert, ids, 4)
    with pytest.raises(TypeError, match="model must be a BertForPreTraining"):
        masked_lm_predictions(model.bert, ids, 4)


def test_init_bert_weights_is_bert_s():
    torch.manual_seed(4)
    config = _configs(vocab=500, hidden=64, layers=1, heads=4, inter=256)[0]
    model = _randomize(BertForPreTraining(config))
    model.apply(init_bert_weights)
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.dim() == 1:
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # N(0, 0.02^2): mean and deviation within five standard errors
            n = p.numel()
            assert abs(p.std().item() / 0.02 - 1) < 5 / math.sqrt(2 * n), name
            assert abs(p.mean().item()) < 5 * 0.02 / math.sqrt(n), name


# ---------------------------------------------------------------- configurations


def _closed_form_count(c: BertConfig) -> int:
    """Embeddings and their norm; per layer attention, two norms, the feed-forward
    network; the pooler."""
    h, i = c.hidden_size, c.intermediate_size
    embeddings = (c.vocab_size + c.max_position + c.type_vocab_size) * h + 2 * h
    layer = (4 * h * h + 4 * h) + 4 * h + (2 * h * i + i + h)
    return embeddings + c.n_layers * layer + (h * h + h)


@pytest.mark.parametrize(
    ("name", "published"),
    [("bert-base", 110e6), ("bert-large", 340e6), ("all-MiniLM-L6-v2", 22.7e6)],
)
def test_published_sizes(name, published):
    ours = count_parameters(lambda: BertModel(CONFIGS[name]))
    assert ours == _closed_form_count(CONFIGS[name])
    assert abs(ours - published) / published < 0.02  # the papers round


def test_parameter_count_matches_hugging_face():
    ours_config, hf_config = _configs(*CASES[2])
    assert _closed_form_count(ours_config) == sum(
        p.numel() for p in HFBertModel(hf_config).parameters()
    )


def test_minilm_config_is_the_checkpoints():
    config = json.loads((data.load_minilm() / "config.json").read_text())
    assert BertConfig.from_hf(config) == CONFIGS["all-MiniLM-L6-v2"]


# ---------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def minilm():
    ours, tokenizer = load_minilm()
    folder = str(data.load_minilm())
    ref = HFBertModel.from_pretrained(folder).eval()
    return ours, tokenizer, ref, BertTokenizerFast.from_pretrained(folder)


def test_minilm_embeddings_match_hugging_face(minilm):
    ours, tokenizer, ref, ref_tokenizer = minilm
    sentences = [
        "A man is eating food.",
        "Someone is eating a piece of bread!",
        "The girl carries a baby; it's raining.",
        "Unbelievably, the monkey played drums.",
    ]
    embeddings = sentence_embeddings(ours, tokenizer, sentences)
    batch = ref_tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    expected = mean_pool(hidden, batch["attention_mask"])
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert embeddings.shape == (4, 384)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(4))
    # a long text is cut to max_length tokens, [SEP] kept, as the tokenizer cuts it
    long = " ".join(["word"] * 40)
    cut = sentence_embeddings(ours, tokenizer, [long], max_length=16)
    batch = ref_tokenizer([long], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    expected = F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    torch.testing.assert_close(cut, expected, atol=1e-5, rtol=0)


def test_pair_input_segments_match_the_tokenizer(minilm):
    _, tokenizer, _, ref_tokenizer = minilm
    a, b = "The cat sat.", "It was on the mat, asleep."
    ref = ref_tokenizer(a, b)
    cls_id, sep_id = ref["input_ids"][0], ref["input_ids"][-1]
    body_a = ref_tokenizer(a, add_special_tokens=False)["input_ids"]
    body_b = ref_tokenizer(b, add_special_tokens=False)["input_ids"]
    ids, types = pair_input(body_a, body_b, cls_id, sep_id)
    assert ids == ref["input_ids"] and types == ref["token_type_ids"]
    ids, types = pair_input(body_a, None, cls_id, sep_id)
    assert ids == ref_tokenizer(a)["input_ids"] and types == [0] * len(ids)


# ---------------------------------------------------------------- masking


def test_mask_tokens_rates_are_bert_s():
    vocab, mask_id, specials = 50, 4, (0, 2, 3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (400, 250), generator=gen)  # 100,000 tokens
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    ids[:5, -20:] = 0  # some padding
    inputs, labels = mask_tokens(ids, mask_id, vocab, specials, generator=gen)
    special = torch.isin(ids, torch.tensor(specials))
    chosen = labels != IGNORE
    assert not chosen[special].any() and torch.equal(inputs[special], ids[special])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    assert torch.equal(labels[chosen], ids[chosen])

    def within(count, n, p):  # five standard deviations of a binomial
        return abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p))

    n = int((~special).sum())
    m = int(chosen.sum())
    assert within(m, n, 0.15)
    masked = int((inputs[chosen] == mask_id).sum())
    kept = int((inputs[chosen] == ids[chosen]).sum())
    # a random token equals the original (or [MASK]) with probability 1/V each
    assert within(masked, m, 0.8 + 0.1 / vocab)
    assert within(kept, m, 0.1 + 0.1 / vocab)
    assert within(m - masked - kept, m, 0.1 - 0.2 / vocab)
    # the random replacements are uniform over the vocabulary: chi-square, V - 1 dof
    replaced = inputs[chosen & (inputs != mask_id) & (inputs != ids)]
    counts = torch.bincount(replaced, minlength=vocab).double()
    expected = torch.full((vocab,), len(replaced) / vocab, dtype=torch.float64)
    # any token but the original; [MASK] drawn at random is counted as masked
    chi2 = ((counts - expected) ** 2 / expected)[torch.arange(vocab) != mask_id].sum()
    assert chi2 < vocab + 5 * math.sqrt(2 * vocab)


def test_mask_tokens_errors():
    ids = torch.randint(10, (2, 5))
    with pytest.raises(TypeError, match="ids must have dtype"):
        mask_tokens(ids.float(), 1, 10)
    with pytest.raises(ValueError, match="mask_id must lie in 0..9"):
        mask_tokens(ids, 10, 10)
    with pytest.raises(ValueError, match="ids must lie in 0..4"):
        mask_tokens(ids, 1, 5)
    with pytest.raises(ValueError, match="p must be in"):
        mask_tokens(ids, 1, 10, p=0.0)


def test_next_sentence_pairs():
    sentences = [[i] for i in range(2001)]  # sentence i is [i]
    pairs = next_sentence_pairs(sentences, generator=torch.Generator().manual_seed(0))
    assert len(pairs) == 2000
    is_next = [a[0] + 1 == b[0] for a, b, _ in pairs]
    assert all(
        nxt == (label == 0) for nxt, (_, _, label) in zip(is_next, pairs, strict=True)
    )
    assert all(a != b for a, b, _ in pairs)
    n_next = sum(is_next)
    assert abs(n_next - 1000) < 5 * math.sqrt(2000 * 0.25)
    # the random partners cover the whole list
    partners = Counter(b[0] for _, b, label in pairs if label == 1)
    assert len(partners) > 600
    with pytest.raises(ValueError, match="at least 3"):
        next_sentence_pairs([[1], [2]])
    with pytest.raises(ValueError, match="p_next must be in"):
        next_sentence_pairs(sentences, p_next=1.5)


# ---------------------------------------------------------------- pooling, padding


def test_pad_matches_pad_sequence_and_mean_pool_a_loop():
    sequences = [[3, 1, 4], [1], [5, 9, 2, 6]]
    ids, mask = pad(sequences, pad_id=7)
    expected = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(s) for s in sequences], batch_first=True, padding_value=7
    )
    assert torch.equal(ids, expected)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    hidden = torch.randn(3, 4, 5, dtype=torch.float64)
    pooled = mean_pool(hidden, mask)
    for row, s in enumerate(sequences):
        torch.testing.assert_close(pooled[row], hidden[row, : len(s)].mean(0), **F64)
    with pytest.raises(ValueError, match="non-empty"):
        pad([[1], []])
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pool(hidden, mask[:, :3])


# ---------------------------------------------------------------- bad input


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        BertConfig(hidden_size=10, n_heads=3)
    with pytest.raises(ValueError, match="n_layers must be positive"):
        BertConfig(n_layers=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        BertConfig(dropout=1.0)
    with pytest.raises(TypeError, match="config must be a BertConfig"):
        BertModel({"hidden_size": 8})
    with pytest.raises(TypeError, match="hf must be a dict"):
        BertConfig.from_hf("config.json")
    with pytest.raises(ValueError, match="only hidden_act='gelu'"):
        BertConfig.from_hf({"hidden_act": "relu"})


def test_forward_errors():
    config = _configs()[0]
    model = BertModel(config)
    ids = torch.randint(config.vocab_size, (2, 5))
    with pytest.raises(TypeError, match="input_ids must have dtype torch.int64"):
        model(ids.int())
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        model(ids[0])
    with pytest.raises(ValueError, match="more than max_position=12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must lie in 0..36"):
        model(ids + config.vocab_size)
    with pytest.raises(ValueError, match="token_type_ids must lie in 0..1"):
        model(ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(ids, attention_mask=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="hides every token"):
        model(ids, attention_mask=torch.zeros_like(ids))


def test_renaming_errors():
    with pytest.raises(KeyError, match="no Hugging Face name for 'extra.weight'"):
        hf_bert_names({"extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="no name of ours"):
        from_hf_bert_names({"encoder.layer.0.crossattention.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        hf_bert_names([])


def test_loss_and_embedding_errors():
    logits, nsp = torch.randn(2, 3, 5), torch.randn(2, 2)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        pretraining_loss(logits, nsp, labels[:, :2], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="nsp_logits must be"):
        pretraining_loss(logits, nsp[:1], labels, torch.zeros(2, dtype=torch.long))
    model = BertModel(_configs()[0])
    with pytest.raises(TypeError, match="sentences must be a list of strings"):
        sentence_embeddings(model, None, "one sentence")
    with pytest.raises(TypeError, match="model must be a BertModel"):
        sentence_embeddings(None, None, ["a"])
