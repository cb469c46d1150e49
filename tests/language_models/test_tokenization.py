"""Tests for ``dlabc.language_models.tokenization``.

BPE training is compared with Hugging Face ``tokenizers``' ``BpeTrainer`` (ByteLevel
alphabet, same text, same size): the same vocabulary, the same merges in the same
order, the same ids on held-out text. GPT-2's tokenizer, built from its published
ranks, is compared with ``tiktoken``. A GGUF tokenizer (a small vocabulary trained here,
with special tokens) is compared with the tokenizer ``transformers`` builds from a
GGUF file's fields (``convert_gguf_tokenizer``, what its GGUF loader calls; reading
SmolLM2's real file takes seconds, so its 49,152 tokens are checked in the chapter
scripts, not here) and, with SmolLM2's digit-splitting pattern, with ``tokenizers``'
``Digits`` + ``ByteLevel`` pipeline, the pre-tokenizer of SmolLM2's ``tokenizer.json``.
WordPiece is compared with ``BertTokenizerFast`` on MiniLM's real vocabulary, the
unigram tokenizer with ``tokenizers.models.Unigram`` on the same pieces and scores.
Bad input must fail clearly.
"""

from __future__ import annotations

import json
import random

import pytest
import tiktoken
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers.convert_slow_tokenizer import (
    bytes_to_unicode as hf_bytes_to_unicode,
)
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    convert_gguf_tokenizer,
)

from dlabc import data
from dlabc.language_models.tokenization import (
    BPE,
    GPT2_PATTERN,
    SMOLLM_PATTERN,
    Unigram,
    WordPiece,
    bytes_to_unicode,
    train_bpe,
)
from transformers import BertTokenizerFast
from transformers import logging as hf_logging

hf_logging.set_verbosity_error()

ODD = (
    "Héllo, Wörld!  naïve café 日本語 \t tabs\n\n\n  spaces   end 12345 + 6.7e8 "
    "don't WE'LL I'm you're \u200b zero-width 🙂 emoji ok<|endoftext|>after "
)


@pytest.fixture(scope="module")
def shakespeare() -> tuple[str, str]:
    text = data.load_shakespeare()
    split = data.shakespeare_split(text)
    return text[:25_000], text[split : split + 15_000]


def hf_bpe(text: str, vocab_size: int, special: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=special,
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def hf_merges(tokenizer: Tokenizer) -> list[str]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [" ".join(m) if isinstance(m, list) else m for m in merges]


def our_merges(bpe: BPE) -> list[str]:
    ordered = sorted(bpe.merges, key=lambda pair: bpe.merges[pair][0])
    return [" ".join(bpe.spelled(pair)) for pair in ordered]


def test_bytes_to_unicode_is_gpt2s():
    assert bytes_to_unicode() == hf_bytes_to_unicode()


@pytest.mark.parametrize("special", [[], ["<|endoftext|>", "<pad>"]])
def test_train_bpe_learns_hf_merges_and_ids(shakespeare, special):
    train, held_out = shakespeare
    vocab_size = 500
    ours = train_bpe(train, vocab_size, special=special)
    theirs = hf_bpe(train, vocab_size, special)
    assert ours.vocab_size == vocab_size == theirs.get_vocab_size()
    spelled = {
        (t.decode() if i < len(special) else ours.spelled([i])[0]): i
        for i, t in enumerate(ours.vocab)
    }
    assert spelled == theirs.get_vocab()
    assert our_merges(ours) == hf_merges(theirs)
    text = held_out + ODD
    assert ours.encode(text) == theirs.encode(text).ids
    assert ours.decode(ours.encode(text)) == text


def test_train_bpe_breaks_ties_like_hf():
    # every pair occurs equally often: the order is decided by ties alone
    text = "abcd dcba bdca cadb " * 3 + "xyxy yxyx"
    ours = train_bpe(text, 300)
    theirs = hf_bpe(text, 300, [])
    assert our_merges(ours) == hf_merges(theirs)
    assert len(our_merges(ours)) == len(hf_merges(theirs)) > 10


def test_train_bpe_stops_when_no_pair_is_left():
    ours = train_bpe("ab ab", 1000)
    theirs = hf_bpe("ab ab", 1000, [])
    assert ours.vocab_size == theirs.get_vocab_size() == 256 + 2  # "ab", "Ġab"
    assert ours.encode("ab ab") == theirs.encode("ab ab").ids


def test_vocabulary_is_a_prefix_of_a_larger_one(shakespeare):
    small, large = train_bpe(shakespeare[0], 300), train_bpe(shakespeare[0], 450)
    assert small.vocab == large.vocab[:300]


@pytest.fixture(scope="module")
def gpt2() -> BPE:
    return BPE.from_gpt2()


def test_from_gpt2_equals_tiktoken(gpt2, shakespeare):
    ranks = data.load_gpt2_ranks()
    reference = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    assert gpt2.vocab_size == 50257
    for text in [shakespeare[1], ODD, "", " ", "\n\n", "<|endoftext|><|endoftext|>"]:
        ids = gpt2.encode(text)
        assert ids == reference.encode(text, allowed_special="all")
        assert gpt2.decode(ids) == text
    assert gpt2.encode("<|endoftext|>") == [50256]


def test_decode_replaces_broken_utf8(gpt2):
    ids = gpt2.encode("日")
    assert len(ids) > 1  # a multi-byte character split across tokens
    assert gpt2.decode(ids[:1]) == "\ufffd"


@pytest.fixture(scope="module")
def small_vocabulary(shakespeare) -> tuple[list[str], list[str], list[str]]:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    hf = hf_bpe(shakespeare[0] + "   in verse" * 50, 600, special)
    vocab = hf.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    return tokens, hf_merges(hf), special


def test_from_gguf_equals_transformers_gguf_converter(tmp_path, small_vocabulary):
    tokens, merges, special = small_vocabulary
    # the tokenizer Hugging Face builds from a GGUF file (the file's fields as its
    # GGUF loader reads them: 3 marks a control token)
    fields = {
        "tokenizer_type": "gpt2",
        "pre_tokenizer_type": "smollm",
        "tokens": tokens,
        "merges": merges,
        "token_type": [3 if t in special else 1 for t in tokens],
    }
    reference, _ = convert_gguf_tokenizer("llama", fields)
    ours = BPE.from_gguf(tokens, merges, GPT2_PATTERN, special)
    text = "<|im_start|>user\nWhat  is 12  + 7?<|im_end|>\n" + ODD
    assert ours.encode(text) == reference.encode(text).ids
    assert ours.encode("<|im_start|>") == [tokens.index("<|im_start|>")]


def test_from_gguf_smollm_pattern_splits_digits_like_hf(small_vocabulary):
    tokens, merges, special = small_vocabulary
    reference = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges]
        )
    )
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    ours = BPE.from_gguf(tokens, merges, SMOLLM_PATTERN)
    for text in [ODD, "a  1", "year 2024, 31  12"]:
        assert ours.encode(text) == reference.encode(text).ids
    # the two patterns differ only where white space meets a digit
    gpt2_pattern = BPE.from_gguf(tokens, merges, GPT2_PATTERN)
    assert ours.spelled(ours.encode("a  1")) == ["a", "ĠĠ", "1"]
    assert gpt2_pattern.spelled(gpt2_pattern.encode("a  1")) == ["a", "Ġ", "Ġ", "1"]


@pytest.fixture(scope="module")
def minilm() -> tuple[WordPiece, BertTokenizerFast]:
    path = data.load_minilm()
    return WordPiece.from_vocab(path / "vocab.txt"), BertTokenizerFast.from_pretrained(
        str(path)
    )


def test_wordpiece_equals_bert_tokenizer(minilm, shakespeare):
    ours, reference = minilm
    texts = [
        shakespeare[1][:5000],
        ODD + "[MASK] x[SEP]y \x00\ufffd ctrl\x07 " + "a" * 120 + " unaffable 3.14",
    ]
    for text in texts:
        assert ours.tokenize(text) == reference.tokenize(text)
        assert ours.encode(text) == reference(text)["input_ids"]
    pair = reference("Is it raining?", "No, it is not.")
    ids = ours.encode("Is it raining?", "No, it is not.")
    assert ids == pair["input_ids"]
    assert ours.token_type_ids(ids) == pair["token_type_ids"]
    assert ours.decode(ours.encode("unaffable tokens")[1:-1]) == "unaffable tokens"


def test_wordpiece_from_folder_and_cased(minilm, tmp_path):
    ours, _ = minilm
    folder = WordPiece.from_vocab(data.load_minilm())
    assert folder.vocab == ours.vocab and folder.vocab_size == 30522
    cased = WordPiece.from_vocab(data.load_minilm(), lowercase=False)
    assert cased.tokenize("Héllo") != ours.tokenize("Héllo")


def test_wordpiece_greedy_longest_match_strands_like_hf():
    # "abc" is taken first and "##d" does not exist: the whole word is [UNK],
    # although "ab ##cd" would cut it; Hugging Face's WordPiece model agrees
    vocab = [*("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), "abc", "ab", "##cd"]
    ours = WordPiece(vocab)
    reference = Tokenizer(
        models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    )
    reference.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    for text in ["abcd", "ab abc abcd", "abcdcd"]:
        assert ours.tokenize(text) == reference.encode(text).tokens
    assert ours.tokenize("abcd") == ["[UNK]"]


def test_unigram_viterbi_equals_hf():
    rng = random.Random(0)
    letters = "abcde"
    pieces = {"".join(rng.choices(letters, k=rng.randint(1, 4))) for _ in range(40)}
    pieces = [("<unk>", 0.0)] + [(p, -rng.uniform(1, 12)) for p in sorted(pieces)]
    ours, reference = Unigram(pieces), Tokenizer(models.Unigram(pieces, unk_id=0))
    for _ in range(200):
        text = "".join(rng.choices(letters + "xy", k=rng.randint(1, 30)))
        assert ours.encode(text) == reference.encode(text).ids


def test_unigram_viterbi_is_the_best_segmentation():
    pieces = [("<unk>", 0.0), ("a", -1.0), ("b", -1.0), ("ab", -3.0), ("abb", -1.5)]
    ours = Unigram(pieces)
    assert ours.tokenize("ab") == ["a", "b"]  # -2 beats -3
    assert ours.tokenize("abb") == ["abb"]  # -1.5 beats -3
    assert ours.tokenize("xxab") == ["<unk>", "a", "b"]  # unknowns fused


_BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def test_bad_input_fails_clearly(gpt2):
    with pytest.raises(TypeError, match="text must be a str"):
        train_bpe(b"bytes", 300)
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_bpe("abc", 100, special=["<s>"])
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        train_bpe("abc", 300.0)
    with pytest.raises(ValueError, match="pattern is not a valid"):
        train_bpe("abc", 300, pattern="(")
    with pytest.raises(TypeError, match="special must be non-empty strings"):
        train_bpe("abc", 300, special=[""])
    with pytest.raises(ValueError, match="names an id not in vocab"):
        BPE([b"a", b"b", b"ab"], [(0, 5)])
    with pytest.raises(ValueError, match="makes a token that is not in vocab"):
        BPE([b"a", b"b"], [(0, 1)])
    with pytest.raises(TypeError, match="text must be a str"):
        gpt2.encode(None)
    with pytest.raises(ValueError, match="ids must be in"):
        gpt2.decode([50257])
    with pytest.raises(ValueError, match="not in tokens"):
        BPE.from_gguf(["a", "b"], ["a c"], GPT2_PATTERN)
    with pytest.raises(ValueError, match="special tokens"):
        BPE.from_gguf(["a", "b"], [], GPT2_PATTERN, ["<s>"])
    with pytest.raises(ValueError, match="vocab must contain"):
        WordPiece(["a", "b"])
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        WordPiece.from_vocab("/nonexistent/folder")
    with pytest.raises(TypeError, match="text must be a str"):
        WordPiece(list(_BERT_SPECIAL)).tokenize(None)
    with pytest.raises(TypeError, match="text must be a str"):
        Unigram([("<unk>", 0.0), ("a", -1.0)]).encode(None)
    with pytest.raises(ValueError, match="unk_id must be"):
        Unigram([("a", -1.0)], unk_id=3)
