"""Sequence to sequence with attention: an encoder-decoder RNN that translates.

Chapter: ``book/rnn/seq2seq.md``.

References:
- Sutskever, Vinyals & Le (2014), NeurIPS, *Sequence to Sequence Learning with Neural
  Networks* (the encoder-decoder; beam search for it).
- Cho et al. (2014), EMNLP, *Learning Phrase Representations using RNN Encoder-Decoder
  for Statistical Machine Translation* (the GRU; a summary vector read at every
  decoder step: our decoder without attention).
- Bahdanau, Cho & Bengio (2015), ICLR, *Neural Machine Translation by Jointly Learning
  to Align and Translate*, appendix A (the bidirectional encoder, additive attention,
  a decoder that attends with its previous state).
- Luong, Pham & Manning (2015), EMNLP, *Effective Approaches to Attention-based Neural
  Machine Translation* (other scores: dot and general).
- Williams & Zipser (1989), Neural Computation, *A Learning Algorithm for Continually
  Running Fully Recurrent Neural Networks* (teacher forcing).
- Graves (2012), *Sequence Transduction with Recurrent Neural Networks* (beam search).

Token ids: every :class:`Vocab` puts ``<pad>`` at 0, ``<bos>`` at 1 and ``<eos>`` at 2,
so the model knows them without being told. Sequences are padded at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.foundations.optimizers import cosine
from dlabc.train import endless_minibatches, train_steps

__all__ = [
    "PAD",
    "BOS",
    "EOS",
    "Vocab",
    "source_mask",
    "Encoder",
    "AdditiveAttention",
    "Memory",
    "Decoder",
    "Seq2Seq",
    "sequence_loss",
    "train_seq2seq",
    "exact_match",
]

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")


def _check_tokens(tokens: object, name: str) -> None:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(
            f"{name} must be a list of str tokens, got {type(tokens).__name__}"
        )


class Vocab:
    """Tokens <-> ids: the three special tokens, then every token seen, sorted.

    ``encode`` refuses a token it has never seen (the generated task has none, and a
    silent ``<unk>`` would hide a bug); ``batch`` pads a list of sequences into one
    tensor; ``decode`` reads ids back up to the first ``<eos>``.
    """

    def __init__(self, sequences: Iterable[Sequence[str]]) -> None:
        seen: set[str] = set()
        for k, sequence in enumerate(sequences):
            _check_tokens(sequence, f"sequences[{k}]")
            seen.update(sequence)
        bad = [t for t in seen if not isinstance(t, str) or t in SPECIALS]
        if bad:
            raise ValueError(f"tokens must be strings other than {SPECIALS}: {bad[:3]}")
        if not seen:
            raise ValueError("sequences must contain at least one token")
        self.tokens = list(SPECIALS) + sorted(seen)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str], eos: bool = False) -> list[int]:
        """The ids of ``tokens``, with ``<eos>`` appended if asked."""
        _check_tokens(tokens, "tokens")
        unknown = [t for t in tokens if t not in self.index or t in SPECIALS]
        if unknown:
            raise ValueError(f"tokens not in the vocabulary: {unknown[:5]}")
        return [self.index[t] for t in tokens] + ([EOS] if eos else [])

    def batch(
        self, sequences: Sequence[Sequence[str]], eos: bool = False
    ) -> torch.Tensor:
        """Encode and pad at the end: ``(B, T)`` int64, ``T`` the longest length."""
        if len(sequences) == 0:
            raise ValueError("sequences must not be empty")
        ids = [self.encode(s, eos) for s in sequences]
        empty = [k for k, i in enumerate(ids) if not i]
        if empty:
            raise ValueError(f"sequences {empty[:5]} are empty: each needs a token")
        out = torch.full((len(ids), max(len(i) for i in ids)), PAD, dtype=torch.long)
        for row, i in zip(out, ids, strict=True):
            row[: len(i)] = torch.tensor(i)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """The tokens before the first ``<eos>``, without ``<pad>`` or ``<bos>``."""
        if isinstance(ids, torch.Tensor):
            check_tensor(ids, "ids", ndim=1)
            ids = ids.tolist()
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"ids must be ints, got {type(i).__name__}")
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"id {i} is outside the vocabulary 0..{len(self) - 1}")
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.tokens[i])
        return out


def source_mask(src: torch.Tensor) -> torch.Tensor:
    """The ``(B, S)`` boolean mask of the real tokens of ``src``, padded at the end.

    Checks what the rest of the module relies on: int64 ids in two dimensions, no
    empty sequence, padding only after the last real token.
    """
    check_tensor(src, "src", ndim=2, dtype=torch.long)
    if src.shape[0] == 0 or src.shape[1] == 0:
        raise ValueError(
            f"src must hold at least one token, got shape {tuple(src.shape)}"
        )
    mask = src != PAD  # (B, S)
    if src.device.type != "cpu":  # the value checks below would sync the GPU
        return mask
    lengths = mask.sum(1)  # (B,)
    if (lengths == 0).any():
        rows = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"src has empty sequences (only padding) in rows {rows[:5]}")
    positions = torch.arange(src.shape[1], device=src.device)  # (S,)
    if not torch.equal(mask, positions < lengths[:, None]):
        raise ValueError("src must be padded at the end: a <pad> sits before a token")
    return mask


def _check_source(src: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """:func:`source_mask`, and on the CPU the ids' range too (no GPU sync)."""
    mask = source_mask(src)
    if src.device.type == "cpu" and src.max() >= vocab_size:
        raise ValueError(
            f"src ids must be below vocab_size={vocab_size}, got {src.max().item()}"
        )
    return mask


class Encoder(nn.Module):
    r"""Embedding and a bidirectional GRU: one annotation $h_j$ per source token.

    $h_j = [\overrightarrow{h}_j; \overleftarrow{h}_j]$ (Bahdanau et al., eq. 7): the
    forward GRU has read $x_1, \dots, x_j$, the backward one $x_S, \dots, x_j$, so
    $h_j$ describes token $j$ in its whole context. The batch is packed, so that the
    backward GRU starts at each sequence's own last token, not on the padding.
    """

    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("embed_size", embed_size),
            ("hidden_size", hidden_size),
        ):
            check_positive_int(value, name)
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD)
        self.rnn = nn.GRU(embed_size, hidden_size, batch_first=True, bidirectional=True)

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``src`` ``(B, S)`` -> the annotations ``(B, S, 2H)`` (zero on padding) and
        the summary $m = [\overrightarrow{h}_S; \overleftarrow{h}_1]$ ``(B, 2H)``: the
        last state of each direction."""
        mask = _check_source(src, self.embedding.num_embeddings)  # (B, S)
        lengths = mask.sum(1).cpu()  # (B,)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(src), lengths, batch_first=True, enforce_sorted=False
        )
        out, h_n = self.rnn(packed)  # h_n: (2, B, H), forward and backward
        annotations, _ = nn.utils.rnn.pad_packed_sequence(
            out, batch_first=True, total_length=src.shape[1]
        )  # (B, S, 2H)
        return annotations, torch.cat([h_n[0], h_n[1]], dim=-1)  # (B, 2H)


def _check_attention(
    attention: AdditiveAttention, query: object, keys: object, mask: object
) -> None:
    """Shapes and dtypes of the attention's inputs; on the CPU, the mask too."""
    check_tensor(query, "query", ndim=2, floating=True)
    check_tensor(keys, "keys", ndim=3, floating=True)
    check_tensor(mask, "mask", ndim=2, dtype=torch.bool)
    if query.shape[1] != attention.query_size:
        raise ValueError(
            f"query must have query_size={attention.query_size} features, got shape "
            f"{tuple(query.shape)}"
        )
    if keys.shape[2] != attention.key_size:
        raise ValueError(
            f"keys must have key_size={attention.key_size} features, got shape "
            f"{tuple(keys.shape)}"
        )
    if keys.shape[0] != query.shape[0] or mask.shape != keys.shape[:2]:
        raise ValueError(
            f"query {tuple(query.shape)}, keys {tuple(keys.shape)} and mask "
            f"{tuple(mask.shape)} must agree on the batch (B) and source (S) sizes"
        )
    if mask.device.type == "cpu" and not mask.any(1).all():
        raise ValueError("mask hides every key of a sequence: it has no source token")


class AdditiveAttention(nn.Module):
    r"""Bahdanau's additive attention: a small network scores each key for the query.

    $e_j = v^\top \tanh(W_q\, q + W_k\, k_j), \qquad
    \alpha_j = \frac{\exp e_j}{\sum_{j'} \exp e_{j'}}, \qquad c = \sum_j \alpha_j k_j$

    The query $q$ is the decoder's state, the keys $k_j$ are the annotations; the
    context $c$ is their average weighted by $\alpha$. Padded keys get the score
    $-\infty$, so their weight is exactly zero.
    """

    def __init__(self, query_size: int, key_size: int, attention_size: int) -> None:
        super().__init__()
        for name, value in (
            ("query_size", query_size),
            ("key_size", key_size),
            ("attention_size", attention_size),
        ):
            check_positive_int(value, name)
        self.query_size, self.key_size = query_size, key_size
        self.W_q = nn.Linear(query_size, attention_size, bias=False)
        self.W_k = nn.Linear(key_size, attention_size, bias=False)
        self.v = nn.Linear(attention_size, 1, bias=False)

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        projected_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` ``(B, query_size)``, ``keys`` ``(B, S, key_size)``, ``mask``
        ``(B, S)`` (True on real tokens) -> the context ``(B, key_size)`` and the
        weights ``(B, S)``.

        ``projected_keys``, ``W_k(keys)``, may be passed in: it is the same at every
        step of the decoder, which computes it once per sentence.
        """
        _check_attention(self, query, keys, mask)
        if projected_keys is None:
            projected_keys = self.W_k(keys)  # (B, S, A)
        # e_j = v^T tanh(W_q q + W_k k_j), for all j at once
        hidden = torch.tanh(self.W_q(query)[:, None, :] + projected_keys)  # (B, S, A)
        scores = self.v(hidden).squeeze(-1)  # (B, S)
        scores = scores.masked_fill(~mask, -math.inf)  # padding: exp(-inf) = 0
        weights = torch.softmax(scores, dim=-1)  # (B, S), the alpha_j
        context = torch.bmm(weights[:, None, :], keys).squeeze(1)  # (B, key_size)
        return context, weights


@dataclass
class Memory:
    """What the decoder reads from the encoder, for a batch of source sentences."""

    annotations: torch.Tensor  # (B, S, 2H): the keys of attention
    mask: torch.Tensor  # (B, S): True on real tokens
    summary: torch.Tensor  # (B, 2H): the last state of each direction
    projected: torch.Tensor | None = None  # (B, S, A): W_k annotations, if attending

    def select(self, rows: torch.Tensor) -> Memory:
        """The memory of the sentences ``rows`` (repeats allowed, as in beam search)."""
        projected = None if self.projected is None else self.projected[rows]
        return Memory(
            self.annotations[rows], self.mask[rows], self.summary[rows], projected
        )


def _check_memory(decoder: Decoder, memory: object) -> None:
    if not isinstance(memory, Memory):
        raise TypeError(f"memory must be a Memory, got {type(memory).__name__}")
    for name in ("annotations", "summary"):
        features = getattr(memory, name).shape[-1]
        if features != decoder.context_size:
            raise ValueError(
                f"memory.{name} has {features} features, but the decoder's "
                f"context_size is {decoder.context_size} (2 * the encoder's hidden "
                "size)"
            )


def _check_step(decoder: Decoder, prev: object, state: object, memory: object) -> None:
    check_tensor(prev, "prev", ndim=1, dtype=torch.long)
    check_tensor(state, "state", ndim=2, floating=True)
    _check_memory(decoder, memory)
    if not len(prev) == len(state) == len(memory.summary):
        raise ValueError(
            f"prev {tuple(prev.shape)}, state {tuple(state.shape)} and the memory "
            f"of {len(memory.summary)} sentences must have the same batch size"
        )


def _check_inputs(decoder: Decoder, inputs: object, memory: object) -> None:
    check_tensor(inputs, "inputs", ndim=2, dtype=torch.long)
    _check_memory(decoder, memory)
    batch = len(memory.summary)
    if len(inputs) != batch or inputs.shape[1] == 0:
        raise ValueError(
            f"inputs must be (B, T) with T >= 1 for the memory's B={batch} "
            f"sentences, got shape {tuple(inputs.shape)}"
        )
    on_cpu = inputs.device.type == "cpu"  # the ids' range: no GPU sync
    if on_cpu and (inputs.min() < 0 or inputs.max() >= decoder.vocab_size):
        raise ValueError(
            f"inputs must be ids in 0..{decoder.vocab_size - 1}, got "
            f"{inputs.min().item()}..{inputs.max().item()}"
        )


class Decoder(nn.Module):
    r"""A GRU cell that writes the target one token at a time, reading a context.

    With attention (Bahdanau et al., appendix A) step $i$ computes

    $\begin{aligned}
    c_i &= \mathrm{attention}(s_{i-1}, h_{1..S}),\\
    s_i &= \mathrm{GRU}([E y_{i-1}; c_i],\, s_{i-1}),\\
    p(y_i \mid y_{<i}, x) &= \mathrm{softmax}(W_o [s_i; c_i; E y_{i-1}] + b_o)
    \end{aligned}$

    from $s_0 = \tanh(W_s\, m)$, $m$ the encoder's summary. Without attention the
    context is that summary at every step, $c_i = m$ (Cho et al., 2014): the whole
    source must then fit into one vector of ``context_size`` numbers.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_size: int,
        hidden_size: int,
        context_size: int,
        attention: bool = True,
        attention_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("embed_size", embed_size),
            ("hidden_size", hidden_size),
            ("context_size", context_size),
        ):
            check_positive_int(value, name)
        if not isinstance(attention, bool):
            raise TypeError(f"attention must be a bool, got {type(attention).__name__}")
        if attention_size is None:
            attention_size = hidden_size
        check_positive_int(attention_size, "attention_size")
        self.vocab_size, self.context_size = vocab_size, context_size
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD)
        self.init_state = nn.Linear(context_size, hidden_size)  # W_s
        self.attention = (
            AdditiveAttention(hidden_size, context_size, attention_size)
            if attention
            else None
        )
        self.cell = nn.GRUCell(embed_size + context_size, hidden_size)
        self.out = nn.Linear(hidden_size + context_size + embed_size, vocab_size)

    def initial_state(self, memory: Memory) -> torch.Tensor:
        r"""$s_0 = \tanh(W_s\, m)$, ``(B, H)``, from the summary ``(B, 2H)``."""
        _check_memory(self, memory)
        return torch.tanh(self.init_state(memory.summary))

    def _advance(
        self, embedded: torch.Tensor, state: torch.Tensor, memory: Memory
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """$c_i$ and $s_i$ from $E y_{i-1}$ ``(B, E)`` and $s_{i-1}$ ``(B, H)``."""
        if self.attention is None:
            context, weights = memory.summary, None  # (B, 2H), the same every step
        else:  # attend with the previous state s_{i-1}
            context, weights = self.attention(
                state, memory.annotations, memory.mask, memory.projected
            )  # (B, 2H), (B, S)
        state = self.cell(torch.cat([embedded, context], -1), state)  # (B, H)
        return state, context, weights

    def step(
        self, prev: torch.Tensor, state: torch.Tensor, memory: Memory
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One step: the previous tokens ``(B,)`` and state ``(B, H)`` -> the logits
        ``(B, V)``, the new state ``(B, H)``, the attention weights ``(B, S)``."""
        _check_step(self, prev, state, memory)
        embedded = self.embedding(prev)  # (B, E)
        state, context, weights = self._advance(embedded, state, memory)
        logits = self.out(torch.cat([state, context, embedded], -1))  # (B, V)
        return logits, state, weights

    def forward(
        self, inputs: torch.Tensor, memory: Memory
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All steps for known inputs ``(B, T)``, as :meth:`step` would do them one by
        one, but with the embedding and the output layer applied to all steps at once.

        Returns the logits ``(B, T, V)`` and the weights ``(B, T, S)`` (or ``None``).
        """
        _check_inputs(self, inputs, memory)
        state = self.initial_state(memory)  # (B, H)
        embedded = self.embedding(inputs)  # (B, T, E)
        states, contexts, weights = [], [], []
        for t in range(inputs.shape[1]):
            state, context, step_weights = self._advance(embedded[:, t], state, memory)
            states.append(state)
            contexts.append(context)
            weights.append(step_weights)
        features = torch.cat(
            [torch.stack(states, 1), torch.stack(contexts, 1), embedded], -1
        )  # (B, T, H + 2H + E)
        if self.attention is None:
            return self.out(features), None
        return self.out(features), torch.stack(weights, 1)  # (B, T, V), (B, T, S)


class Seq2Seq(nn.Module):
    """An :class:`Encoder` and a :class:`Decoder`: trained by teacher forcing, decoded
    greedily or by beam search."""

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        if not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be an Encoder, got {type(encoder).__name__}")
        if not isinstance(decoder, Decoder):
            raise TypeError(f"decoder must be a Decoder, got {type(decoder).__name__}")
        if decoder.context_size != 2 * encoder.hidden_size:
            raise ValueError(
                f"decoder.context_size ({decoder.context_size}) must be 2 * "
                f"encoder.hidden_size ({2 * encoder.hidden_size}), the size of the "
                "bidirectional encoder's annotations"
            )
        self.encoder, self.decoder = encoder, decoder

    def encode(self, src: torch.Tensor) -> Memory:
        """Encode ``src`` ``(B, S)`` into the :class:`Memory` that the decoder reads."""
        mask = source_mask(src)  # (B, S)
        annotations, summary = self.encoder(src)  # (B, S, 2H), (B, 2H)
        attention = self.decoder.attention
        projected = None if attention is None else attention.W_k(annotations)
        return Memory(annotations, mask, summary, projected)

    def check_target(self, tgt: torch.Tensor, src: torch.Tensor) -> None:
        """Check that ``tgt`` is ``(B, T)`` ids of the target vocabulary for ``src``."""
        check_tensor(tgt, "tgt", ndim=2, dtype=torch.long)
        if tgt.shape[0] != src.shape[0] or tgt.shape[1] == 0:
            raise ValueError(
                f"tgt must be (B, T) with T >= 1 and the B={src.shape[0]} of src, got "
                f"shape {tuple(tgt.shape)}"
            )
        on_cpu = tgt.device.type == "cpu"  # the ids' range: no GPU sync
        if on_cpu and (tgt.min() < 0 or tgt.max() >= self.decoder.vocab_size):
            raise ValueError(
                f"tgt ids must lie in 0..{self.decoder.vocab_size - 1}, got "
                f"{tgt.min().item()}..{tgt.max().item()}"
            )

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: the decoder reads ``<bos>, y_1, ..., y_{T-1}``, the true
        previous tokens rather than its own guesses, and predicts ``y_1, ..., y_T``.

        ``src`` ``(B, S)``, ``tgt`` ``(B, T)`` (ending in ``<eos>``, then padding) ->
        logits ``(B, T, V)``, attention weights ``(B, T, S)`` or ``None``.
        """
        memory = self.encode(src)
        self.check_target(tgt, src)
        bos = torch.full_like(tgt[:, :1], BOS)
        inputs = torch.cat([bos, tgt[:, :-1]], dim=1)  # (B, T), shifted right
        return self.decoder(inputs, memory)

    def sequence_log_prob(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        r"""$\log p(y \mid x) = \sum_t \log p(y_t \mid y_{<t}, x)$ for each row of
        ``tgt``, ``(B,)``; padding does not count."""
        logits, _ = self(src, tgt)
        log_p = logits.log_softmax(-1).gather(2, tgt[..., None]).squeeze(2)  # (B, T)
        return log_p.masked_fill(tgt == PAD, 0.0).sum(1)

    @staticmethod
    def _next_log_probs(logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``(B, V)`` with ``<pad>`` and ``<bos>`` forbidden. They
        keep their share of the softmax, so that scores stay true log-probabilities."""
        log_p = logits.log_softmax(-1)
        log_p[:, [PAD, BOS]] = -math.inf
        return log_p

    def greedy_decode(
        self, src: torch.Tensor, max_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pick the most probable token at every step, and feed it back as the input.

        Returns the tokens ``(B, L)`` (``<eos>`` included, padding after it; ``L <=
        max_len``, as decoding stops once every sentence has ended), their
        log-probabilities ``(B,)`` and the attention weights ``(B, L, S)`` or ``None``.
        """
        check_positive_int(max_len, "max_len")
        with torch.no_grad():
            memory = self.encode(src)
            batch = src.shape[0]
            state = self.decoder.initial_state(memory)  # (B, H)
            prev = torch.full((batch,), BOS, dtype=torch.long, device=src.device)
            done = torch.zeros(batch, dtype=torch.bool, device=src.device)
            score = torch.zeros(batch, dtype=state.dtype, device=src.device)
            tokens, weights = [], []
            for _ in range(max_len):
                logits, state, step_weights = self.decoder.step(prev, state, memory)
                best, prev = self._next_log_probs(logits).max(-1)  # (B,), (B,)
                score += best.masked_fill(done, 0.0)
                tokens.append(prev.masked_fill(done, PAD))
                weights.append(step_weights)
                done = done | (prev == EOS)
                if done.all():
                    break
            attention = None if weights[0] is None else torch.stack(weights, 1)
            return torch.stack(tokens, 1), score, attention

    def beam_search(
        self, src: torch.Tensor, beam_size: int, max_len: int
    ) -> tuple[torch.Tensor, float]:
        """Keep the ``beam_size`` most probable prefixes at every step, not just one.

        ``src`` is one sentence, ``(S,)``. A prefix that emits ``<eos>`` is finished.
        The search stops when no prefix is left, or when the best finished sentence is
        more probable than every prefix still growing: log-probabilities only fall as
        a prefix grows, so none of them can catch up. Prefixes still growing after
        ``max_len`` tokens are candidates as they are. The greedy sentence is a
        candidate too, so the result is never less probable than greedy decoding's.

        Returns the tokens ``(L,)`` (ending in ``<eos>`` unless cut at ``max_len``) and
        their log-probability.
        """
        check_tensor(src, "src", ndim=1, dtype=torch.long)
        check_positive_int(beam_size, "beam_size")
        check_positive_int(max_len, "max_len")
        with torch.no_grad():
            src = src[None]  # (1, S): a batch of one sentence
            greedy, greedy_score, _ = self.greedy_decode(src, max_len)
            finished = [(greedy[0][greedy[0] != PAD], greedy_score.item())]
            memory = self.encode(src)
            state = self.decoder.initial_state(memory)  # (k, H): one row per prefix
            prefixes = src.new_zeros(1, 0)  # (k, t): k prefixes of t tokens
            scores = state.new_zeros(1)  # (k,): their log-probabilities
            vocab = self.decoder.vocab_size
            for t in range(max_len):
                k = len(prefixes)
                prev = prefixes[:, -1] if t else src.new_full((k,), BOS)
                rows = src.new_zeros(k)  # every prefix reads sentence 0
                logits, state, _ = self.decoder.step(prev, state, memory.select(rows))
                total = scores[:, None] + self._next_log_probs(logits)  # (k, V)
                n_best = min(beam_size, k * (vocab - 2))  # never <pad> or <bos>
                scores, flat = total.flatten().topk(n_best)  # (k',), best first
                parent, token = flat // vocab, flat % vocab  # (k',) each
                prefixes = torch.cat([prefixes[parent], token[:, None]], 1)
                state = state[parent]  # (k', H)
                ended = (token == EOS) | (t == max_len - 1)
                finished += zip(prefixes[ended], scores[ended].tolist(), strict=True)
                prefixes, scores, state = (
                    prefixes[~ended],
                    scores[~ended],
                    state[~ended],
                )
                best = max(score for _, score in finished)
                if len(prefixes) == 0 or best >= scores.max().item():
                    break  # no growing prefix can overtake the best finished one
            return max(finished, key=lambda pair: pair[1])


def sequence_loss(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over the real target tokens; ``<pad>`` is ignored."""
    check_tensor(logits, "logits", ndim=3, floating=True)
    check_tensor(tgt, "tgt", ndim=2, dtype=torch.long)
    if logits.shape[:2] != tgt.shape:
        raise ValueError(
            f"logits (B, T, V) and tgt (B, T) must agree, got {tuple(logits.shape)} "
            f"and {tuple(tgt.shape)}"
        )
    return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)


def train_seq2seq(
    model: Seq2Seq,
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 5e-3,
    clip_norm: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Teacher forcing with Adam, a cosine learning-rate schedule and gradient clipping.

    The loop is :func:`dlabc.train.train_steps` over shuffled mini-batches of the
    pairs; the loss of a batch is :func:`sequence_loss` of the logits the model gives
    when it reads the target, shifted, as its input. Returns the loss of every step.
    """
    if not isinstance(model, Seq2Seq):
        raise TypeError(f"model must be a Seq2Seq, got {type(model).__name__}")
    source_mask(src)
    model.check_target(tgt, src)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)

    def loss_fn(model: Seq2Seq, index: torch.Tensor) -> torch.Tensor:
        index = index.to(src.device)
        logits, _ = model(src[index], tgt[index])  # (b, T, V)
        return sequence_loss(logits, tgt[index])

    history = train_steps(
        model,
        torch.optim.Adam(model.parameters(), lr=lr, foreach=True),
        endless_minibatches(len(src), batch_size, torch.Generator().manual_seed(seed)),
        loss_fn,
        steps=steps,
        lr_schedule=lambda step: cosine(step, lr, steps),
        clip_norm=clip_norm,
    )
    return history.step_loss


@torch.no_grad()
def exact_match(
    model: Seq2Seq, src: torch.Tensor, tgt: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """``(B,)`` booleans: is the greedy translation of a source exactly its target?"""
    if not isinstance(model, Seq2Seq):
        raise TypeError(f"model must be a Seq2Seq, got {type(model).__name__}")
    source_mask(src)
    model.check_target(tgt, src)
    check_positive_int(batch_size, "batch_size")
    was_training = model.training
    model.eval()
    correct = []
    try:
        for start in range(0, len(src), batch_size):
            rows = slice(start, start + batch_size)
            tokens, _, _ = model.greedy_decode(src[rows], max_len=tgt.shape[1])
            padded = F.pad(tokens, (0, tgt.shape[1] - tokens.shape[1]), value=PAD)
            correct.append((padded == tgt[rows]).all(1))  # (b,)
    finally:
        model.train(was_training)
    return torch.cat(correct)
