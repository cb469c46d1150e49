r"""Tokenizers: byte-level byte-pair encoding (training and encoding), WordPiece and the
unigram language model.

Chapter: ``book/language_models/tokenization.md``.

References:
- Gage (1994), *A New Algorithm for Data Compression*, C Users Journal (byte-pair
  encoding as compression: replace the most frequent pair of bytes by a new symbol).
- Sennrich, Haddow & Birch (2016), *Neural Machine Translation of Rare Words with
  Subword Units*, ACL (BPE over the words of a corpus: learn merges, apply them in
  order).
- Radford et al. (2019), *Language Models are Unsupervised Multitask Learners*
  (GPT-2: BPE over the UTF-8 *bytes*, so no text is unknown, with a regular expression
  that cuts text into words before merging).
- Schuster & Nakajima (2012), *Japanese and Korean Voice Search*, ICASSP, and Wu et
  al. (2016), *Google's Neural Machine Translation System* (WordPiece: a vocabulary
  grown by the pair that most raises a language model's likelihood); Devlin et al.
  (2019), BERT, whose tokenizer applies it greedily, longest match first.
- Kudo (2018), *Subword Regularization*, ACL (the unigram language model: the most
  likely segmentation by Viterbi) and Kudo & Richardson (2018), *SentencePiece*.

:func:`train_bpe` learns merges from the word-frequency table of a text, updating the
pair counts incrementally after each merge; its ties between equally frequent pairs
are broken like Hugging Face ``tokenizers``' ``BpeTrainer`` (smallest pair of ids
first), so both learn the same merges. :class:`BPE` encodes with a merge list: its own,
GPT-2's (:meth:`BPE.from_gpt2`, equal to ``tiktoken``'s ids) or one read from a GGUF
file (:meth:`BPE.from_gguf`, SmolLM2's). Tokens are ``bytes``; ids index
``BPE.vocab``.
"""

from __future__ import annotations

import heapq
import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import regex

from dlabc.checks import check_positive_int

__all__ = [
    "GPT2_PATTERN",
    "SMOLLM_PATTERN",
    "bytes_to_unicode",
    "pre_tokenize",
    "train_bpe",
    "BPE",
    "WordPiece",
    "Unigram",
]

# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols (each optionally
# after one space), and runs of white space (the last space of a run joins the word).
GPT2_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# SmolLM2's (llama.cpp's "smollm", the Digits + ByteLevel pre-tokenizer of its
# tokenizer.json): every digit alone first, then GPT-2's expression on the rest.
SMOLLM_PATTERN = (r"\p{N}", GPT2_PATTERN)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of the 256 bytes as printable characters.

    The 188 bytes that are printable Latin-1 characters stand for themselves; the other
    68 (control characters, space, ...) become the characters 256, 257, ... in byte
    order, so that the space is ``Ġ`` and the newline ``Ċ``. Vocabularies stored as
    text (``merges.txt``, ``tokenizer.json``, GGUF) spell tokens this way.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


_SPELLING = bytes_to_unicode()
_UNSPELLING = {c: b for b, c in _SPELLING.items()}


def _spell(token: bytes) -> str:
    return "".join(_SPELLING[b] for b in token)


def _unspell(token: str) -> bytes:
    return bytes(_UNSPELLING[c] for c in token)


def _patterns(pattern: str | Sequence[str]) -> list[regex.Pattern]:
    if isinstance(pattern, (str, regex.Pattern)):
        pattern = [pattern]
    if not pattern or not all(isinstance(p, (str, regex.Pattern)) for p in pattern):
        raise TypeError(f"pattern must be a str or a sequence of str, got {pattern!r}")
    try:
        return [regex.compile(p) for p in pattern]
    except regex.error as err:
        raise ValueError(f"pattern is not a valid regular expression: {err}") from err


def pre_tokenize(text: str, pattern: str | Sequence[str] = GPT2_PATTERN) -> list[str]:
    """Cut ``text`` into the words BPE merges within. Each expression of ``pattern`` in
    turn splits every piece into its matches (the text between matches stays a piece
    too), so ``SMOLLM_PATTERN`` isolates digits first, then applies GPT-2's."""
    pieces = [text]
    for expression in _patterns(pattern):
        split = []
        for piece in pieces:
            start = 0
            for match in expression.finditer(piece):
                if match.start() > start:  # text no alternative matched
                    split.append(piece[start : match.start()])
                split.append(match.group())
                start = match.end()
            if start < len(piece):
                split.append(piece[start:])
        pieces = split
    return pieces


def _merge_pair(word: tuple[int, ...], pair: tuple[int, int], new: int):
    """``word`` with every occurrence of ``pair`` replaced by ``new``, left to right."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(new)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def _learn_merges(
    words: list[tuple[int, ...]],
    counts: list[int],
    vocab: list[bytes],
    vocab_size: int,
) -> list[tuple[int, int]]:
    """Merge the most frequent adjacent pair of tokens until there are ``vocab_size``.

    ``words`` are the distinct words as tuples of token ids, ``counts`` how often each
    occurs; ``vocab`` (token bytes by id) grows in place. Pair counts are kept up to
    date after each merge by recounting only the words that contained the merged pair.
    The heap may hold stale counts, never too low ones: a popped pair whose count
    changed goes back in with its current count. Ties go to the smallest pair of ids.
    """
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, count) in enumerate(zip(words, counts, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += count
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    ids = {token: i for i, token in enumerate(vocab)}
    merges = []
    while len(ids) < vocab_size and heap:
        count, pair = heapq.heappop(heap)
        if -count != pair_counts[pair]:  # stale: re-queue with the current count
            heapq.heappush(heap, (-pair_counts[pair], pair))
            continue
        if pair_counts[pair] < 1:
            break
        # the new token (a merge may rebuild a token that exists: keep its id)
        token = vocab[pair[0]] + vocab[pair[1]]
        if token not in ids:
            ids[token] = len(vocab)
            vocab.append(token)
        new = ids[token]
        merges.append(pair)
        grown = set()
        for w in where.pop(pair):
            old = words[w]
            word = _merge_pair(old, pair, new)
            if word == old:
                continue
            # recount this word's pairs: remove its old ones, add its new ones
            for p in pairwise(old):
                pair_counts[p] -= counts[w]
            for p in pairwise(word):
                pair_counts[p] += counts[w]
                where[p].add(w)
                grown.add(p)
            words[w] = word
        for p in grown:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return merges


def train_bpe(
    text: str,
    vocab_size: int,
    pattern: str | Sequence[str] = GPT2_PATTERN,
    special: Sequence[str] = (),
) -> BPE:
    """Learn a byte-level BPE tokenizer of ``vocab_size`` tokens from ``text``.

    Ids are laid out like Hugging Face ``tokenizers``' ``BpeTrainer`` with the
    ``ByteLevel`` alphabet: the ``special`` tokens first, then the 256 bytes in the
    order of their printable spelling (:func:`bytes_to_unicode`), then one token per
    merge. ``vocab_size`` counts all of them.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    check_positive_int(vocab_size, "vocab_size")
    special = list(special)
    if not all(isinstance(s, str) and s for s in special):
        raise TypeError(f"special must be non-empty strings, got {special!r}")
    if vocab_size < len(special) + 256:
        raise ValueError(
            f"vocab_size must be at least {len(special) + 256} (the special tokens "
            f"and the 256 bytes), got {vocab_size}"
        )
    patterns = _patterns(pattern)
    alphabet = sorted(range(256), key=lambda b: _SPELLING[b])
    vocab = [s.encode("utf-8") for s in special] + [bytes([b]) for b in alphabet]
    byte_id = {b: len(special) + i for i, b in enumerate(alphabet)}
    frequencies = Counter(pre_tokenize(text, patterns))
    words = [tuple(byte_id[b] for b in w.encode("utf-8")) for w in frequencies]
    merges = _learn_merges(words, list(frequencies.values()), vocab, vocab_size)
    special_ids = {s: i for i, s in enumerate(special)}
    return BPE(vocab, merges, pattern, special_ids)


class BPE:
    """A byte-level BPE tokenizer: pre-tokenize, then merge each word's bytes.

    ``vocab[i]`` is the bytes of token ``i``; ``merges`` lists pairs of ids in the order
    they were learned (their rank); ``special`` maps special strings such as
    ``<|endoftext|>`` to their ids: they are cut out of the text before anything else
    and encoded as one id each.
    """

    def __init__(
        self,
        vocab: Sequence[bytes],
        merges: Sequence[tuple[int, int]],
        pattern: str | Sequence[str] = GPT2_PATTERN,
        special: dict[str, int] | None = None,
    ):
        self.vocab = list(vocab)
        if not all(isinstance(t, bytes) for t in self.vocab):
            raise TypeError("vocab must be a sequence of bytes")
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        # a byte missing from vocab is dropped when encoding (as Hugging Face does)
        self.byte_ids = {
            b: self.ids[bytes([b])] for b in range(256) if bytes([b]) in self.ids
        }
        self.merges = {}  # (left id, right id) -> (rank, merged id)
        for rank, (a, b) in enumerate(merges):
            if not (0 <= a < len(self.vocab) and 0 <= b < len(self.vocab)):
                raise ValueError(f"merge {rank} ({a}, {b}) names an id not in vocab")
            merged = self.ids.get(self.vocab[a] + self.vocab[b])
            if merged is None:
                raise ValueError(f"merge {rank} makes a token that is not in vocab")
            self.merges.setdefault((a, b), (rank, merged))
        self.pattern = pattern
        self.patterns = _patterns(pattern)
        self.special = dict(special or {})
        for s, i in self.special.items():
            if not 0 <= i < len(self.vocab) or self.vocab[i] != s.encode("utf-8"):
                raise ValueError(f"special token {s!r} is not token {i} of vocab")
        by_length = sorted(self.special, key=len, reverse=True)
        self._special_re = (
            regex.compile("|".join(regex.escape(s) for s in by_length))
            if by_length
            else None
        )
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_word(self, word: bytes) -> list[int]:
        """Apply the merges to one word: repeatedly merge the adjacent pair that was
        learned first, until no adjacent pair is a merge."""
        ids = [self.byte_ids[b] for b in word if b in self.byte_ids]
        while len(ids) > 1:
            ranked = [
                (self.merges[pair][0], i)
                for i, pair in enumerate(pairwise(ids))
                if pair in self.merges
            ]
            if not ranked:
                break
            _, i = min(ranked)  # the earliest merge, leftmost on a tie
            ids[i : i + 2] = [self.merges[ids[i], ids[i + 1]][1]]
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for word in pre_tokenize(text, self.patterns):
            if word not in self._cache:
                self._cache[word] = self.encode_word(word.encode("utf-8"))
            ids.extend(self._cache[word])
        return ids

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``; special tokens in it become one id each."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._special_re is None:
            return self._encode_ordinary(text)
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            ids += self._encode_ordinary(text[start : match.start()])
            ids.append(self.special[match.group()])
            start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (bytes that are not valid UTF-8 become U+FFFD)."""
        ids = list(ids)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < len(self.vocab))]
        if bad:
            raise ValueError(f"ids must be in [0, {len(self.vocab)}), got {bad[0]!r}")
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def spelled(self, ids: Iterable[int]) -> list[str]:
        """The tokens of ``ids`` in GPT-2's printable spelling (``Ġ`` for a space)."""
        return [_spell(self.vocab[i]) for i in ids]

    @classmethod
    def from_gpt2(cls, ranks: dict[bytes, int] | None = None) -> BPE:
        """GPT-2's tokenizer from its ranks (``data.load_gpt2_ranks()`` by default).

        The file holds tokens and ranks but no merge list. Every token of two or more
        bytes was made by one merge of two tokens of lower rank: encoding its bytes
        with the merges of the lower ranks stops at exactly those two.
        """
        if ranks is None:
            from dlabc import data

            ranks = data.load_gpt2_ranks()
        vocab = sorted(ranks, key=ranks.get)
        if [ranks[t] for t in vocab] != list(range(len(vocab))):
            raise ValueError("ranks must be the ids 0, 1, ..., n - 1")
        vocab.append(b"<|endoftext|>")
        tokenizer = cls(vocab, [], GPT2_PATTERN, {"<|endoftext|>": len(vocab) - 1})
        for rank, token in enumerate(vocab[:-1]):
            if len(token) > 1:
                splits = [
                    (ranks[token[:k]], ranks[token[k:]])
                    for k in range(1, len(token))
                    if ranks.get(token[:k], rank) < rank
                    and ranks.get(token[k:], rank) < rank
                ]  # usually one: then it is the merge, otherwise ask BPE
                parts = splits[0] if len(splits) == 1 else tokenizer.encode_word(token)
                if len(parts) != 2:
                    raise ValueError(f"token {token!r} is not one merge of two tokens")
                tokenizer.merges[tuple(parts)] = (rank, rank)
        return tokenizer

    @classmethod
    def from_gguf(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        pattern: str | Sequence[str] = SMOLLM_PATTERN,
        special: Iterable[str] = (),
    ) -> BPE:
        """A tokenizer from a GGUF file's ``tokenizer.ggml.tokens`` and ``merges``
        (tokens spelled with :func:`bytes_to_unicode`, merges as ``"left right"``).

        ``special`` lists the tokens matched whole in the text (for SmolLM2 its first
        17, ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...).
        """
        tokens = list(tokens)
        special = list(special)
        ids = {t: i for i, t in enumerate(tokens)}
        missing = [s for s in special if s not in ids]
        if missing:
            raise ValueError(f"special tokens {missing} are not in tokens")
        # a token in the printable byte alphabet is bytes spelled out; any other token
        # (a special one written with other characters) is its own UTF-8
        vocab = [
            _unspell(t) if all(c in _UNSPELLING for c in t) else t.encode("utf-8")
            for t in tokens
        ]
        pairs = []
        for m in merges:
            left, _, right = m.partition(" ")
            if left not in ids or right not in ids:
                raise ValueError(f"merge {m!r} names a token that is not in tokens")
            pairs.append((ids[left], ids[right]))
        return cls(vocab, pairs, pattern, {s: ids[s] for s in special})


# -- WordPiece (BERT) ---------------------------------------------------------------


def _is_punctuation(c: str) -> bool:
    """BERT's punctuation: every non-letter, non-digit ASCII symbol, and Unicode P*."""
    o = ord(c)
    if 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def _is_cjk(o: int) -> bool:
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x20000 <= o <= 0x2A6DF
        or 0x2A700 <= o <= 0x2B73F
        or 0x2B740 <= o <= 0x2B81F
        or 0x2B820 <= o <= 0x2CEAF
        or 0xF900 <= o <= 0xFAFF
        or 0x2F800 <= o <= 0x2FA1F
    )


def _normalize_bert(text: str, lowercase: bool) -> str:
    out = []
    for c in text:
        o = ord(c)
        if o == 0 or o == 0xFFFD:
            continue
        category = unicodedata.category(c)
        if c in "\t\n\r" or category == "Zs":
            out.append(" ")
        elif category.startswith("C"):
            continue  # control and format characters are dropped
        elif _is_cjk(o):
            out.append(f" {c} ")  # each Chinese character is a word
        else:
            out.append(c)
    text = "".join(out)
    if lowercase:  # lowercase and strip accents, BERT's "uncased"
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return text


_BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPiece:
    """BERT's tokenizer: normalise, split at white space and punctuation, then cut each
    word greedily into the longest pieces of the vocabulary (``##`` marks a piece that
    continues a word); a word with no such cut is ``[UNK]``."""

    def __init__(self, vocab: Sequence[str], lowercase: bool = True):
        self.vocab = list(vocab)
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        for name in _BERT_SPECIAL:
            if name not in self.ids:
                raise ValueError(f"vocab must contain {name}")
        self.lowercase = lowercase
        self.unk_id, self.cls_id, self.sep_id = (
            self.ids[t] for t in ("[UNK]", "[CLS]", "[SEP]")
        )
        self.pad_id, self.mask_id = self.ids["[PAD]"], self.ids["[MASK]"]
        self.max_word_chars = 100
        self.special = [t for t in self.vocab if t in _BERT_SPECIAL]
        self._special_re = regex.compile(
            "(" + "|".join(regex.escape(t) for t in self.special) + ")"
        )

    @classmethod
    def from_vocab(cls, path: str | Path, lowercase: bool = True) -> WordPiece:
        """Read a ``vocab.txt`` (one token a line, the line number is its id)."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.txt"
        if not path.exists():
            raise FileNotFoundError(f"path has no vocab.txt: {path}")
        return cls(path.read_text(encoding="utf-8").splitlines(), lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def words(self, text: str) -> list[str]:
        """Normalise, then split at white space and around each punctuation mark."""
        words = []
        for chunk in _normalize_bert(text, self.lowercase).split():
            start = 0
            for i, c in enumerate(chunk):
                if _is_punctuation(c):
                    words += [chunk[start:i], c] if i > start else [c]
                    start = i + 1
            if start < len(chunk):
                words.append(chunk[start:])
        return words

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first: the longest vocabulary piece at the start,
        then the longest ``##`` piece after it, and so on."""
        if len(word) > self.max_word_chars:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    break
            else:
                return ["[UNK]"]  # some position has no piece at all
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text`` (without [CLS] and [SEP])."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        pieces = []
        for k, chunk in enumerate(self._special_re.split(text)):
            if k % 2:  # a special token written in the text: [MASK], [SEP], ...
                pieces.append(chunk)
            else:
                pieces += [
                    p for word in self.words(chunk) for p in self.wordpiece(word)
                ]
        return pieces

    def encode(self, text: str, pair: str | None = None) -> list[int]:
        """``[CLS] text [SEP]`` (and ``pair [SEP]``) as ids."""
        ids = [self.cls_id] + [self.ids[t] for t in self.tokenize(text)] + [self.sep_id]
        if pair is not None:
            ids += [self.ids[t] for t in self.tokenize(pair)] + [self.sep_id]
        return ids

    def token_type_ids(self, ids: Sequence[int]) -> list[int]:
        """0 up to and including the first [SEP], 1 after it (BERT's segments)."""
        first = list(ids).index(self.sep_id) if self.sep_id in ids else len(ids) - 1
        return [0] * (first + 1) + [1] * (len(ids) - first - 1)

    def decode(self, ids: Iterable[int]) -> str:
        """The pieces joined: ``##`` pieces glued to the one before, others spaced."""
        text = ""
        for i in ids:
            token = self.vocab[i]
            text += token[2:] if token.startswith("##") else " " + token
        return text.strip()


# -- The unigram language model --------------------------------------------------


class Unigram:
    """The unigram language model tokenizer: each piece has a log-probability and the
    segmentation of a word is the one whose pieces' log-probabilities sum highest,
    found by Viterbi. A character no piece covers becomes the unknown piece, scored
    10 below the lowest score; consecutive unknowns are fused, as SentencePiece does."""

    def __init__(self, pieces: Sequence[tuple[str, float]], unk_id: int = 0):
        self.pieces = [(str(p), float(s)) for p, s in pieces]
        if not 0 <= unk_id < len(self.pieces):
            raise ValueError(f"unk_id must be in [0, {len(self.pieces)}), got {unk_id}")
        self.unk_id = unk_id
        self.ids = {p: i for i, (p, _) in enumerate(self.pieces) if i != unk_id}
        self.scores = {p: s for p, s in self.pieces}
        self.unk_score = min(s for _, s in self.pieces) - 10.0
        self.max_len = max(len(p) for p in self.ids) if self.ids else 1

    def viterbi(self, text: str) -> list[tuple[int, int]]:
        r"""The best segmentation as (start, end) spans.

        ``best[e]`` is the highest total log-probability of a segmentation of
        ``text[:e]``: ``best[e] = max over s of best[s] + log p(text[s:e])``.
        """
        n = len(text)
        best = [0.0] + [-math.inf] * n
        back = [0] * (n + 1)
        for e in range(1, n + 1):
            for s in range(max(0, e - self.max_len), e):
                piece = text[s:e]
                if piece in self.ids:
                    score = self.scores[piece]
                elif e - s == 1:
                    score = self.unk_score  # a character no piece starts with
                else:
                    continue
                if best[s] + score > best[e]:
                    best[e], back[e] = best[s] + score, s
        spans, e = [], n
        while e > 0:  # follow the back-pointers from the end
            spans.append((back[e], e))
            e = back[e]
        return spans[::-1]

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = []
        for s, e in self.viterbi(text):
            i = self.ids.get(text[s:e], self.unk_id)
            if not (i == self.unk_id and ids and ids[-1] == self.unk_id):
                ids.append(i)  # runs of unknown characters become one [UNK]
        return ids

    def tokenize(self, text: str) -> list[str]:
        return [self.pieces[i][0] for i in self.encode(text)]
