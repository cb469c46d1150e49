"""A character-level language model: vocabulary, batches, an LSTM, sampling, baselines.

Chapter: ``book/rnn/char_lm.md``.

References:
- Shannon (1951), *Prediction and Entropy of Printed English*, Bell System Technical
  Journal: the entropy of a text as the loss of the best predictor of its next letter.
- Graves (2013), *Generating Sequences With Recurrent Neural Networks*: an LSTM trained
  to predict the next character, then sampled one character at a time.
- Karpathy (2015), *The Unreasonable Effectiveness of Recurrent Neural Networks* (blog
  post): char-rnn on Shakespeare, and the temperature of sampling.

A text becomes a sequence of integer ids (:class:`CharVocab`); the model reads
``x_1 .. x_t`` and predicts a distribution over ``x_{t+1}`` at every position
(:class:`CharLSTM`, ``torch.nn.LSTM`` inside); the loss is the cross-entropy in nats
per character. Two count models fitted in closed form, :func:`unigram_loss` and
:func:`bigram_loss`, say what "good" means. Shapes: ``B`` batch, ``T`` time steps,
``V`` vocabulary size, ``H`` hidden units.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.foundations.optimizers import warmup_cosine
from dlabc.train import History, train_steps

__all__ = [
    "CharVocab",
    "batches",
    "CharLSTM",
    "evaluate_loss",
    "train_char_lm",
    "sample",
    "unigram_log_probs",
    "bigram_log_probs",
    "unigram_loss",
    "bigram_loss",
]


class CharVocab:
    """The characters of a text, numbered in sorted order: ``encode`` and ``decode``.

    ``CharVocab(text)`` takes every distinct character of ``text``; ``chars[i]`` is the
    character with id ``i``. Encoding a character that ``text`` did not contain is an
    error, never a silent substitute.
    """

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text must contain at least one character, got ''")
        self.chars: tuple[str, ...] = tuple(sorted(set(text)))
        codes = np.array([ord(c) for c in self.chars])
        # code point -> id, -1 where the vocabulary has no such character (the last
        # entry stands for every code point beyond the largest one)
        self._ids = np.full(codes.max() + 2, -1, dtype=np.int64)
        self._ids[codes] = np.arange(len(codes))

    def __len__(self) -> int:
        return len(self.chars)

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} characters: {''.join(self.chars)!r})"

    def encode(self, text: str) -> torch.Tensor:
        """The ids of the characters of ``text``, a 1-D int64 tensor as long as it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (len,)
        ids = self._ids[np.minimum(codes, len(self._ids) - 1)]  # (len,)
        if (ids < 0).any():
            unknown = sorted({text[i] for i in np.flatnonzero(ids < 0)[:1000]})
            raise ValueError(
                f"text contains characters that are not in the vocabulary: {unknown}"
            )
        return torch.from_numpy(ids)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text whose character ids are ``ids`` (a 1-D tensor or a list of ints)."""
        if isinstance(ids, torch.Tensor):
            check_tensor(ids, "ids", ndim=1)
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
            ids = ids.tolist()
        elif not isinstance(ids, Sequence) or isinstance(ids, str):
            raise TypeError(
                "ids must be a 1-D tensor or a sequence of ints, "
                f"got {type(ids).__name__}"
            )
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError("ids must contain ints only")
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"ids must lie in [0, {len(self)}), got {bad[:5]}")
        return "".join(self.chars[i] for i in ids)


def _check_ids(ids: object, name: str) -> torch.Tensor:
    check_tensor(ids, name, ndim=1, dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"{name} must hold at least 2 ids, got {len(ids)}")
    return ids


def _check_batches(
    ids: object, batch_size: object, seq_len: object, n_batches: object
) -> None:
    _check_ids(ids, "ids")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seq_len, "seq_len")
    check_positive_int(n_batches, "n_batches")
    if seq_len + 1 > len(ids):
        raise ValueError(
            f"seq_len + 1 = {seq_len + 1} must not exceed the length of ids, {len(ids)}"
        )


def batches(
    ids: torch.Tensor,
    batch_size: int,
    seq_len: int,
    n_batches: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random windows of the text ``ids``: ``n_batches`` pairs ``(inputs, targets)``.

    Each row of ``inputs`` (shape ``(batch_size, seq_len)``) is ``seq_len`` consecutive
    ids starting at a uniformly random position; the same row of ``targets`` is the
    same window shifted by one: ``targets[b, t] = inputs[b, t + 1]``, the character to
    predict after reading ``inputs[b, : t + 1]``. Tensors are on ``ids``' device; the
    positions come from the CPU ``generator``.
    """
    _check_batches(ids, batch_size, seq_len, n_batches)

    def draw() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        offsets = torch.arange(seq_len + 1)  # (T + 1,)
        for _ in range(n_batches):
            starts = torch.randint(
                len(ids) - seq_len, (batch_size, 1), generator=generator
            )
            windows = ids[(starts + offsets).to(ids.device)]  # (B, T + 1)
            yield windows[:, :-1], windows[:, 1:]  # inputs, targets: (B, T) each

    return draw()


class CharLSTM(nn.Module):
    r"""Embedding, LSTM, linear read-out: a distribution over the next character.

    $\begin{aligned}
    e_t &= E\,[x_t], \qquad (h_t, c_t) = \operatorname{LSTM}(e_t, h_{t-1}, c_{t-1}),\\
    p(x_{t+1} \mid x_{\le t}) &= \operatorname{softmax}(W h_t + b).
    \end{aligned}$

    The recurrence is ``torch.nn.LSTM`` (the previous chapter checks our own LSTM cell
    against it). ``forward(x, state)`` takes ids ``x`` of shape ``(B, T)`` and returns
    the logits, ``(B, T, V)``, and the final state ``(h, c)``, each
    ``(n_layers, B, H)``, which a later call can continue from.
    """

    def __init__(
        self,
        vocab_size: int,
        d_embed: int = 32,
        d_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        check_positive_int(d_embed, "d_embed")
        check_positive_int(d_hidden, "d_hidden")
        check_positive_int(n_layers, "n_layers")
        check_number(dropout, "dropout", low=0, high=1, high_open=True)
        self.embed = nn.Embedding(vocab_size, d_embed)  # E
        self.lstm = nn.LSTM(
            d_embed,
            d_hidden,
            n_layers,
            batch_first=True,
            dropout=dropout if n_layers > 1 else 0.0,  # between layers only
        )
        self.head = nn.Linear(d_hidden, vocab_size)  # W, b

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        _check_input(self, x, state)
        h, state = self.lstm(self.embed(x), state)  # (B, T, H), ((L, B, H), (L, B, H))
        return self.head(h), state  # (B, T, V)


def _check_input(model: CharLSTM, x: object, state: object) -> None:
    """Shapes and dtypes; the ids' range only on the CPU (no GPU sync)."""
    check_tensor(x, "x", ndim=2, dtype=torch.long)
    on_cpu = x.device.type == "cpu"
    if on_cpu and x.numel() and not 0 <= x.min() <= x.max() < model.vocab_size:
        raise ValueError(
            f"x must hold ids in [0, {model.vocab_size}), "
            f"got values in [{int(x.min())}, {int(x.max())}]"
        )
    if state is not None:
        if not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError("state must be a tuple (h, c)")
        expected = (model.lstm.num_layers, len(x), model.lstm.hidden_size)
        for name, s in zip("hc", state, strict=True):
            check_tensor(s, f"state {name}", ndim=3, floating=True)
            if tuple(s.shape) != expected:
                raise ValueError(
                    f"state {name} must have shape {expected}, got {tuple(s.shape)}"
                )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate_loss(
    model: CharLSTM, ids: torch.Tensor, streams: int = 16, chunk_len: int = 256
) -> float:
    """Cross-entropy of ``model`` on the text ``ids``, in nats per character.

    The text is cut into ``streams`` equal consecutive pieces (the last
    ``len(ids) % streams`` ids are left out), read side by side as one batch. Each
    piece is read in chunks of ``chunk_len`` steps, the LSTM's state carried from
    one chunk to the next, so every character after a piece's first is predicted from
    everything before it in its piece: the result equals reading each piece in one
    call. The model is evaluated in evaluation mode; its mode is restored.
    """
    _check_ids(ids, "ids")
    if not isinstance(model, CharLSTM):
        raise TypeError(f"model must be a CharLSTM, got {type(model).__name__}")
    check_positive_int(streams, "streams")
    check_positive_int(chunk_len, "chunk_len")
    length = len(ids) // streams
    if length < 2:
        raise ValueError(
            f"ids ({len(ids)}) is too short for {streams} streams of at least 2 ids"
        )
    text = ids[: streams * length].view(streams, length).to(_model_device(model))
    was_training = model.training
    model.eval()
    total, state = 0.0, None
    try:
        with torch.no_grad():
            for start in range(0, length - 1, chunk_len):
                x = text[:, start : start + chunk_len]  # (S, chunk)
                y = text[:, start + 1 : start + chunk_len + 1]  # (S, chunk) or less
                logits, state = model(x, state)  # (S, chunk, V)
                logits = logits[:, : y.shape[1]]  # the last id has no successor
                total += F.cross_entropy(
                    logits.flatten(0, 1), y.flatten(), reduction="sum"
                )
    finally:
        model.train(was_training)
    return float(total) / (streams * (length - 1))


def _check_training(
    model: object,
    train_ids: object,
    valid_ids: object,
    steps: object,
    warmup_steps: object,
    lr: object,
) -> None:
    if not isinstance(model, CharLSTM):
        raise TypeError(f"model must be a CharLSTM, got {type(model).__name__}")
    _check_ids(train_ids, "train_ids")
    _check_ids(valid_ids, "valid_ids")
    check_positive_int(steps, "steps")
    check_positive_int(warmup_steps, "warmup_steps")
    if warmup_steps >= steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be less than steps ({steps})"
        )
    check_number(lr, "lr", low=0, low_open=True)


def train_char_lm(
    model: CharLSTM,
    train_ids: torch.Tensor,
    valid_ids: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    seq_len: int = 64,
    lr: float = 3e-3,
    warmup_steps: int = 20,
    clip_norm: float = 1.0,
    eval_every: int = 50,
    seed: int = 0,
) -> History:
    """Train ``model`` with Adam on random windows of ``train_ids`` for ``steps`` steps.

    Every step (run by :func:`dlabc.train.train_steps`): a batch from :func:`batches`,
    the mean cross-entropy of all ``batch_size * seq_len`` predictions,
    back-propagation through the window, gradients clipped to global norm
    ``clip_norm`` (recurrent nets need it), and an Adam step at a learning rate that
    warms up for ``warmup_steps`` and then follows a cosine to zero. Before the first
    step, every ``eval_every`` steps and after the last, :func:`evaluate_loss`
    measures the loss on ``valid_ids``: ``history.metrics["valid_loss"]`` at the step
    counts ``history.eval_steps``.
    """
    _check_training(model, train_ids, valid_ids, steps, warmup_steps, lr)
    device = _model_device(model)

    def loss_fn(model: CharLSTM, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = (t.to(device) for t in batch)  # (B, T) each
        logits, _ = model(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return train_steps(
        model,
        torch.optim.Adam(model.parameters(), lr=lr),
        batches(
            train_ids, batch_size, seq_len, steps, torch.Generator().manual_seed(seed)
        ),
        loss_fn,
        steps=steps,
        lr_schedule=lambda step: warmup_cosine(step, lr, warmup_steps, steps),
        clip_norm=clip_norm,
        evaluate_every=eval_every,
        evaluate_fn=lambda model: {"valid_loss": evaluate_loss(model, valid_ids)},
    )


def _check_sampling(
    model: object,
    vocab: object,
    prompt: object,
    n: object,
    temperature: object,
    generator: object,
) -> None:
    if not isinstance(model, CharLSTM):
        raise TypeError(f"model must be a CharLSTM, got {type(model).__name__}")
    if not isinstance(vocab, CharVocab):
        raise TypeError(f"vocab must be a CharVocab, got {type(vocab).__name__}")
    if len(vocab) != model.vocab_size:
        raise ValueError(
            f"vocab has {len(vocab)} characters but the model predicts "
            f"{model.vocab_size}"
        )
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
    check_positive_int(n, "n")
    check_number(temperature, "temperature", low=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {generator!r}")


def sample(
    model: CharLSTM,
    vocab: CharVocab,
    prompt: str,
    n: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> str:
    r"""``n`` characters that ``model`` writes after ``prompt``, one at a time.

    The model reads the prompt, then repeatedly draws the next character from
    $p_i \propto \exp(z_i / \tau)$, where $z$ are its logits and $\tau$ is the
    ``temperature``, and reads what it drew. $\tau = 1$ samples the model's own
    distribution, $\tau < 1$ sharpens it, $\tau > 1$ flattens it (towards uniform),
    and $\tau = 0$ takes the most likely character every time (greedy decoding).
    The draws use the CPU ``generator``, so a seeded generator gives the same text on
    every device. Returns the new characters only.
    """
    _check_sampling(model, vocab, prompt, n, temperature, generator)
    was_training = model.training
    model.eval()
    device = _model_device(model)
    x = vocab.encode(prompt).to(device)[None]  # (1, len(prompt))
    out: list[int] = []
    state = None
    try:
        with torch.no_grad():
            for _ in range(n):
                logits, state = model(x, state)  # (1, t, V)
                z = logits[0, -1].double().cpu()  # (V,): the next character's logits
                if temperature == 0:
                    nxt = int(z.argmax())  # greedy
                else:
                    probs = torch.softmax(z / temperature, dim=0)  # p_tau
                    nxt = int(torch.multinomial(probs, 1, generator=generator))
                out.append(nxt)
                x = torch.tensor([[nxt]], device=device)  # (1, 1): read what was drawn
    finally:
        model.train(was_training)
    return vocab.decode(out)


def _check_counts(ids: torch.Tensor, name: str, vocab_size: int) -> torch.Tensor:
    _check_ids(ids, name)
    if not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        raise ValueError(f"{name} must hold ids in [0, {vocab_size})")
    return ids.cpu()


def unigram_log_probs(
    train_ids: torch.Tensor, vocab_size: int, alpha: float = 1.0
) -> torch.Tensor:
    r"""$\ln p(c)$ for every character ``c``, a float64 tensor of shape ``(V,)``:

    $p(c) = \frac{n_c + \alpha}{N + \alpha V},$

    with $n_c$ the count of ``c`` among the $N$ ids of ``train_ids``. ``alpha = 1`` is
    Laplace's add-one rule: a character never seen still gets some probability.
    """
    check_positive_int(vocab_size, "vocab_size")
    train_ids = _check_counts(train_ids, "train_ids", vocab_size)
    alpha = check_number(alpha, "alpha", low=0, low_open=True)
    counts = torch.bincount(train_ids, minlength=vocab_size).double()  # (V,)
    return torch.log(counts + alpha) - math.log(len(train_ids) + alpha * vocab_size)


def bigram_log_probs(
    train_ids: torch.Tensor, vocab_size: int, alpha: float = 1.0
) -> torch.Tensor:
    r"""$\ln p(c \mid b)$, row ``b``, column ``c``: float64, shape ``(V, V)``:

    $p(c \mid b) = \frac{n_{bc} + \alpha}{n_b + \alpha V},$

    with $n_{bc}$ the count of ``b`` followed by ``c`` in ``train_ids`` and
    $n_b = \sum_c n_{bc}$. Every row is a distribution over the next character.
    """
    check_positive_int(vocab_size, "vocab_size")
    train_ids = _check_counts(train_ids, "train_ids", vocab_size)
    alpha = check_number(alpha, "alpha", low=0, low_open=True)
    pairs = train_ids[:-1] * vocab_size + train_ids[1:]  # the pair (b, c) as one id
    counts = torch.bincount(pairs, minlength=vocab_size**2).double()  # (V * V,)
    counts = counts.view(vocab_size, vocab_size)  # (V, V)
    return torch.log(counts + alpha) - torch.log(
        counts.sum(1, keepdim=True) + alpha * vocab_size
    )


def unigram_loss(
    train_ids: torch.Tensor,
    valid_ids: torch.Tensor,
    vocab_size: int,
    alpha: float = 1.0,
) -> float:
    r"""Cross-entropy (nats/char) on ``valid_ids`` of :func:`unigram_log_probs`
    fitted on ``train_ids``: $-\frac{1}{M}\sum_{i=1}^{M} \ln p(v_i)$ over the $M$
    validation ids."""
    log_p = unigram_log_probs(train_ids, vocab_size, alpha)
    valid_ids = _check_counts(valid_ids, "valid_ids", vocab_size)
    return float(-log_p[valid_ids].mean())


def bigram_loss(
    train_ids: torch.Tensor,
    valid_ids: torch.Tensor,
    vocab_size: int,
    alpha: float = 1.0,
) -> float:
    r"""Cross-entropy (nats/char) on ``valid_ids`` of :func:`bigram_log_probs`
    fitted on ``train_ids``: $-\frac{1}{M-1}\sum_{i=2}^{M} \ln p(v_i \mid v_{i-1})$.
    The first validation id has no predecessor and is not predicted."""
    log_p = bigram_log_probs(train_ids, vocab_size, alpha)
    valid_ids = _check_counts(valid_ids, "valid_ids", vocab_size)
    return float(-log_p[valid_ids[:-1], valid_ids[1:]].mean())
