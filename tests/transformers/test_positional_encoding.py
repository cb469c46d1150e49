"""Tests for ``dlabc.transformers.positional_encoding``.

The sinusoidal table is compared with the paper's formula written out with
``math.sin``/``math.cos`` in a loop, with XLM's ``create_sinusoidal_embeddings`` from HF
``transformers`` (the same interleaved layout) and with Marian's
``MarianSinusoidalPositionalEmbedding`` (sines in the first half, cosines in the second:
compared after permuting our columns), including Marian's offset
``past_key_values_length``. The rotation ``M_k`` is checked on every position at once
for random shifts, and as a group (``M_j M_k = M_{j+k}``, ``M_k^T = M_{-k}``); the
similarity ``PE(p) . PE(q)`` against a loop and for depending on ``p - q`` alone.
Permutation equivariance is measured on our ``MultiHeadAttention`` and on
``nn.MultiheadAttention``; the modules against ``x + table[offset:offset + T]`` and
``nn.Embedding``; the order-blind accuracy against an exhaustive Bayes-optimal guess
over every sequence. Bad input must fail early, with a clear message.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import pytest
import torch
from torch import nn
from transformers.models.marian.modeling_marian import (
    MarianSinusoidalPositionalEmbedding,
)
from transformers.models.xlm.modeling_xlm import create_sinusoidal_embeddings

from dlabc.transformers.attention_from_scratch import causal_mask
from dlabc.transformers.attention_with_pytorch import MultiHeadAttention, reverse_task
from dlabc.transformers.positional_encoding import (
    LearnedPositionalEmbedding,
    PositionTaskModel,
    ScaledEmbedding,
    SinusoidalPositionalEncoding,
    angular_frequencies,
    equivariance_error,
    position_blind_accuracy,
    rotation_matrix,
    similarity_by_offset,
    sinusoidal_encoding,
    train_position_task,
    wavelengths,
)

F32 = dict(atol=2e-6, rtol=0)  # float32 values of sines and cosines
F64 = dict(atol=1e-10, rtol=0)

# ------------------------------------------------------------- the sinusoidal table


@pytest.mark.parametrize("d_model, base", [(2, 10000.0), (8, 10000.0), (12, 500.0)])
def test_angular_frequencies_closed_form(d_model, base):
    expected = [1 / base ** (2 * i / d_model) for i in range(d_model // 2)]
    got = angular_frequencies(d_model, base)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("max_len", "d_model", "base"),
    [(1, 2, 10000.0), (7, 4, 10000.0), (30, 10, 10000.0), (64, 16, 100.0), (5, 6, 2.5)],
)
def test_sinusoidal_encoding_matches_the_formula(max_len, d_model, base):
    pe = sinusoidal_encoding(max_len, d_model, base)
    assert pe.shape == (max_len, d_model) and pe.dtype == torch.float32
    expected = torch.empty(max_len, d_model, dtype=torch.float64)
    for p in range(max_len):
        for i in range(d_model // 2):
            angle = p / base ** (2 * i / d_model)
            expected[p, 2 * i] = math.sin(angle)
            expected[p, 2 * i + 1] = math.cos(angle)
    torch.testing.assert_close(pe.double(), expected, **F32)


@pytest.mark.parametrize(("max_len", "d_model"), [(10, 4), (50, 32), (200, 64)])
def test_sinusoidal_encoding_matches_hf_xlm(max_len, d_model):
    """XLM (and DistilBERT, FlauBERT) use the paper's interleaved layout."""
    ref = torch.empty(max_len, d_model)
    create_sinusoidal_embeddings(max_len, d_model, ref)
    torch.testing.assert_close(sinusoidal_encoding(max_len, d_model), ref, **F32)


@pytest.mark.parametrize(("max_len", "d_model"), [(10, 4), (60, 32)])
def test_sinusoidal_encoding_matches_hf_marian_after_permuting_columns(
    max_len, d_model
):
    """Marian puts all sines first, then all cosines: columns 0, 2, 4, ..., 1, 3, 5."""
    ref = MarianSinusoidalPositionalEmbedding(max_len, d_model).create_weight()
    half_split = torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])
    torch.testing.assert_close(
        sinusoidal_encoding(max_len, d_model)[:, half_split], ref, **F32
    )


@pytest.mark.parametrize(("offset", "length"), [(0, 5), (3, 4), (12, 1)])
def test_offsets_match_hf_marian_past_key_values_length(offset, length):
    d_model, max_len = 8, 16
    marian = MarianSinusoidalPositionalEmbedding(max_len, d_model)
    with torch.no_grad():
        marian.weight.copy_(marian.create_weight())
    ref = marian(torch.Size([2, length]), past_key_values_length=offset)  # (T, d)
    ours = SinusoidalPositionalEncoding(d_model, max_len)
    out = ours(torch.zeros(2, length, d_model), offset=offset)  # (2, T, d)
    half_split = torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])
    torch.testing.assert_close(out[0][:, half_split], ref, **F32)
    torch.testing.assert_close(out[1], out[0])


def test_every_encoding_has_norm_sqrt_half_d():
    pe = sinusoidal_encoding(100, 24)
    torch.testing.assert_close(pe.norm(dim=1), torch.full((100,), math.sqrt(12.0)))


@pytest.mark.parametrize(("d_model", "base"), [(2, 10000.0), (8, 10000.0), (64, 500.0)])
def test_wavelengths_are_geometric_from_2pi(d_model, base):
    lam = wavelengths(d_model, base)
    expected = [2 * math.pi * base ** (2 * i / d_model) for i in range(d_model // 2)]
    torch.testing.assert_close(lam, torch.tensor(expected, dtype=torch.float64))
    assert lam[0] == pytest.approx(2 * math.pi)
    assert lam[-1] < 2 * math.pi * base
    ratios = lam[1:] / lam[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, base ** (2 / d_model)))


def test_each_column_repeats_after_its_wavelength():
    d_model, base = 8, 10.0  # short wavelengths, so whole periods fit in the table
    lam = wavelengths(d_model, base)
    p = torch.arange(200, dtype=torch.float64)
    pe = sinusoidal_encoding(200, d_model, base).double()
    for i, wavelength in enumerate(lam.tolist()):
        shifted = torch.sin((p + wavelength) * 2 * math.pi / wavelength)
        torch.testing.assert_close(pe[:, 2 * i], shifted, **F32)


# ----------------------------------------------------------- rotation and similarity


@pytest.mark.parametrize("seed", range(6))
def test_shift_by_k_is_the_fixed_linear_map_m_k(seed):
    g = torch.Generator().manual_seed(seed)
    d_model = 2 * int(torch.randint(1, 33, (1,), generator=g))
    k = int(torch.randint(-40, 41, (1,), generator=g))
    max_len = 300
    pe = sinusoidal_encoding(max_len, d_model).double()  # (max_len, d)
    M = rotation_matrix(k, d_model)  # (d, d), the same for every p
    p = torch.arange(max(0, -k), min(max_len, max_len - k))  # p and p + k in the table
    torch.testing.assert_close(pe[p] @ M, pe[p + k], atol=1e-5, rtol=0)


def test_rotation_matrices_form_a_group():
    d_model = 12
    for j, k in [(3, 4), (-7, 2), (0, 9), (50, -50)]:
        torch.testing.assert_close(
            rotation_matrix(j, d_model) @ rotation_matrix(k, d_model),
            rotation_matrix(j + k, d_model),
            **F64,
        )
    M = rotation_matrix(5, d_model)
    torch.testing.assert_close(M.T, rotation_matrix(-5, d_model), **F64)
    torch.testing.assert_close(M @ M.T, torch.eye(d_model, dtype=torch.float64), **F64)
    torch.testing.assert_close(
        rotation_matrix(0, d_model), torch.eye(d_model, dtype=torch.float64)
    )


def test_rotation_matrix_is_block_diagonal_2x2():
    M = rotation_matrix(3, 8, base=10.0)
    for a in range(4):
        for b in range(4):
            block = M[2 * a : 2 * a + 2, 2 * b : 2 * b + 2]
            if a != b:
                assert (block == 0).all()
            else:
                w = 3 / 10.0 ** (2 * a / 8)
                expected = [[math.cos(w), -math.sin(w)], [math.sin(w), math.cos(w)]]
                torch.testing.assert_close(
                    block, torch.tensor(expected, dtype=torch.float64)
                )


@pytest.mark.parametrize(("d_model", "base"), [(16, 10000.0), (6, 50.0)])
def test_similarity_depends_only_on_the_offset(d_model, base):
    pe = sinusoidal_encoding(40, d_model, base).double()
    gram = pe @ pe.T  # (40, 40)
    p = torch.arange(40)
    offsets = p[:, None] - p[None, :]
    torch.testing.assert_close(
        gram, similarity_by_offset(offsets, d_model, base), atol=1e-5, rtol=0
    )
    for k in (-7, 0, 3):
        expected = sum(
            math.cos(k / base ** (2 * i / d_model)) for i in range(d_model // 2)
        )
        assert torch.diagonal(gram, offset=-k).sub(expected).abs().max() < 1e-5
    assert similarity_by_offset(torch.tensor(0), d_model, base) == d_model / 2


# ------------------------------------------------------------ permutation equivariance


@pytest.mark.parametrize(
    ("B", "T", "d_model", "n_heads"), [(1, 5, 8, 2), (3, 9, 12, 3)]
)
def test_self_attention_without_positions_is_permutation_equivariant(
    B, T, d_model, n_heads
):
    mha = MultiHeadAttention(d_model, n_heads).double()
    x = torch.randn(B, T, d_model, dtype=torch.float64)
    for _ in range(5):
        perm = torch.randperm(T)
        assert equivariance_error(mha, x, perm) < 1e-12
    ref = nn.MultiheadAttention(d_model, n_heads, batch_first=True).double()
    assert equivariance_error(lambda t: ref(t, t, t), x, torch.randperm(T)) < 1e-12


def test_positions_or_a_causal_mask_break_equivariance():
    T, d_model = 6, 8
    mha = MultiHeadAttention(d_model, 2).double()
    encode = SinusoidalPositionalEncoding(d_model).double()
    x = torch.randn(2, T, d_model, dtype=torch.float64)
    perm = torch.tensor([5, 0, 1, 2, 3, 4])
    assert equivariance_error(lambda t: mha(encode(t)), x, perm) > 1e-2
    assert equivariance_error(lambda t: mha(t, mask=causal_mask(T)), x, perm) > 1e-2
    assert equivariance_error(lambda t: t.cumsum(1), x, perm) > 1e-2
    assert equivariance_error(lambda t: t.cumsum(1), x, torch.arange(T)) == 0


def test_position_task_model_without_positions_is_equivariant():
    tokens = torch.randint(10, (4, 7))
    perm = torch.randperm(7)
    for positions, equivariant in [("none", True), ("sinusoidal", False)]:
        model = PositionTaskModel(10, 7, d_model=16, n_heads=2, positions=positions)
        logits, _ = model(tokens)
        logits_perm, _ = model(tokens[:, perm])
        assert logits.shape == (4, 7, 10)
        same = torch.allclose(logits_perm, logits[:, perm], atol=1e-5)
        assert same == equivariant


# ------------------------------------------------------------------------- modules


@pytest.mark.parametrize(
    ("B", "T", "d_model", "offset"), [(2, 5, 8, 0), (1, 1, 4, 9), (3, 7, 16, 3)]
)
def test_sinusoidal_module_adds_the_table_rows(B, T, d_model, offset):
    module = SinusoidalPositionalEncoding(d_model, max_len=16)
    x = torch.randn(B, T, d_model)
    expected = x + sinusoidal_encoding(16, d_model)[offset : offset + T]
    torch.testing.assert_close(module(x, offset=offset), expected)


def test_sinusoidal_module_in_chunks_equals_all_at_once():
    """Decoding one token at a time with offset = position gives the same encodings."""
    module = SinusoidalPositionalEncoding(8, max_len=10)
    x = torch.randn(2, 10, 8)
    chunks = [module(x[:, t : t + 1], offset=t) for t in range(10)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), module(x))


def test_sinusoidal_module_buffer_dtype_device_and_dropout():
    module = SinusoidalPositionalEncoding(8, max_len=20, dropout=0.5)
    assert list(module.parameters()) == []
    assert "pe" not in module.state_dict()
    x = torch.randn(64, 20, 8, dtype=torch.float64)
    module.eval()
    torch.testing.assert_close(
        module(x), x + sinusoidal_encoding(20, 8).double(), **F32
    )
    module.train()
    out = module(x)
    zeros = (out == 0).double().mean().item()
    assert 0.45 < zeros < 0.55
    kept = out != 0
    expected = 2 * (x + sinusoidal_encoding(20, 8).double())
    torch.testing.assert_close(out[kept], expected[kept], **F32)


@pytest.mark.parametrize(("T", "offset"), [(5, 0), (3, 4), (1, 11)])
def test_learned_embedding_adds_its_rows_and_trains_only_them(T, offset):
    module = LearnedPositionalEmbedding(max_len=12, d_model=6)
    x = torch.randn(2, T, 6)
    out = module(x, offset=offset)
    torch.testing.assert_close(
        out, x + module.embedding.weight[offset : offset + T][None]
    )
    out.sum().backward()
    grad = module.embedding.weight.grad
    used = torch.zeros(12, dtype=torch.bool)
    used[offset : offset + T] = True
    assert (grad[~used] == 0).all()
    torch.testing.assert_close(grad[used], torch.full((T, 6), 2.0))


def test_learned_embedding_starts_small():
    std = LearnedPositionalEmbedding(max_len=2000, d_model=64).embedding.weight.std()
    assert std.item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(("vocab", "d_model"), [(10, 4), (50, 32), (7, 1)])
def test_scaled_embedding_is_nn_embedding_times_sqrt_d(vocab, d_model):
    ours = ScaledEmbedding(vocab, d_model)
    ref = nn.Embedding(vocab, d_model)
    with torch.no_grad():
        ref.weight.copy_(ours.embedding.weight)
    tokens = torch.randint(vocab, (3, 5))
    torch.testing.assert_close(ours(tokens), ref(tokens) * math.sqrt(d_model))
    plain = ScaledEmbedding(vocab, d_model, scale=False)
    torch.testing.assert_close(plain(tokens), plain.embedding(tokens))


def test_scaled_embedding_outputs_have_unit_variance_either_way():
    tokens = torch.arange(4000)
    for scale, weight_std in [(True, 64**-0.5), (False, 1.0)]:
        module = ScaledEmbedding(4000, 64, scale=scale)
        assert module.embedding.weight.std().item() == pytest.approx(weight_std, 0.02)
        assert module(tokens).std().item() == pytest.approx(1.0, rel=0.02)


# ------------------------------------------------------------------- the experiment


def _bayes_blind_accuracy(vocab: int, length: int) -> float:
    """Best accuracy of a guess from (x_i, multiset) over every sequence, counted."""
    targets = defaultdict(Counter)  # (x_i, sorted tokens) -> counts of the target
    for seq in itertools.product(range(vocab), repeat=length):
        for i in range(length):
            targets[(seq[i], tuple(sorted(seq)))][seq[length - 1 - i]] += 1
    best = sum(max(c.values()) for c in targets.values())
    return best / (vocab**length * length)


@pytest.mark.parametrize(("vocab", "length"), [(3, 4), (3, 5), (2, 6), (4, 3)])
def test_position_blind_accuracy_is_the_bayes_optimal_guess(vocab, length):
    every = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    assert position_blind_accuracy(every) == pytest.approx(
        _bayes_blind_accuracy(vocab, length), abs=1e-6
    )


def test_train_position_task_records_accuracy_and_is_reproducible():
    test_tokens, _ = reverse_task(50, 6, 5, torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = PositionTaskModel(5, 6, d_model=8, n_heads=2)
        history = train_position_task(
            model,
            test_tokens,
            steps=12,
            batch_size=8,
            evaluate_every=5,
            generator=torch.Generator().manual_seed(1),
        )
        runs.append(history)
    assert runs[0].eval_steps == [0, 5, 10, 12]
    assert len(runs[0].step_loss) == 12
    assert runs[0].step_loss == runs[1].step_loss
    acc = runs[0].metrics["token_accuracy"]
    assert len(acc) == 4 and all(0 <= a <= 1 for a in acc)


# ------------------------------------------------------------------------ bad input


# --------------------------------------------------------------------------------------------
# bad input: every public entry point names the argument it rejects


def _bad_angular_frequencies():
    return [
        pytest.param(
            lambda: angular_frequencies(7),
            ValueError,
            "d_model must be even",
            id="angular_frequencies-0",
        ),
        pytest.param(
            lambda: angular_frequencies(8, base=1.0),
            ValueError,
            "base",
            id="angular_frequencies-1",
        ),
    ]


def _bad_table_arguments():
    return [
        pytest.param(
            lambda: sinusoidal_encoding(10, 7),
            ValueError,
            "d_model must be even",
            id="table_arguments-0",
        ),
        pytest.param(
            lambda: sinusoidal_encoding(0, 8),
            ValueError,
            "max_len must be positive",
            id="table_arguments-1",
        ),
        pytest.param(
            lambda: sinusoidal_encoding(10.0, 8),
            TypeError,
            "max_len must be an int",
            id="table_arguments-2",
        ),
        pytest.param(
            lambda: sinusoidal_encoding(10, 8, base=1.0),
            ValueError,
            "base must be in \\(1, inf\\)",
            id="table_arguments-3",
        ),
        pytest.param(
            lambda: wavelengths(5),
            ValueError,
            "d_model must be even",
            id="table_arguments-4",
        ),
        pytest.param(
            lambda: rotation_matrix(1.5, 8),
            TypeError,
            "k must be an int",
            id="table_arguments-5",
        ),
        pytest.param(
            lambda: rotation_matrix(1, 3),
            ValueError,
            "d_model must be even",
            id="table_arguments-6",
        ),
        pytest.param(
            lambda: similarity_by_offset(torch.tensor([True]), 8),
            TypeError,
            "offsets must be a real tensor",
            id="table_arguments-7",
        ),
        pytest.param(
            lambda: similarity_by_offset([1, 2], 8),
            TypeError,
            "offsets must be a torch.Tensor",
            id="table_arguments-8",
        ),
    ]


def _bad_embedding_and_model_inputs():
    emb = ScaledEmbedding(10, 4)
    model = PositionTaskModel(10, 8, d_model=8, positions="learned")
    return [
        pytest.param(
            lambda: emb(torch.zeros(2, 3, dtype=torch.int32)),
            TypeError,
            "tokens must have dtype torch.int64",
            id="embedding_and_model_inputs-0",
        ),
        pytest.param(
            lambda: emb(torch.zeros(2, 3)),
            TypeError,
            "tokens must have dtype torch.int64",
            id="embedding_and_model_inputs-1",
        ),
        pytest.param(
            lambda: emb(torch.tensor([[3, 10]])),
            ValueError,
            "tokens must lie in 0..9 \\(vocab_size=10\\)",
            id="embedding_and_model_inputs-2",
        ),
        pytest.param(
            lambda: ScaledEmbedding(10, 4, scale=1),
            TypeError,
            "scale must be a bool",
            id="embedding_and_model_inputs-3",
        ),
        pytest.param(
            lambda: ScaledEmbedding(0, 4),
            ValueError,
            "vocab_size must be positive",
            id="embedding_and_model_inputs-4",
        ),
        pytest.param(
            lambda: PositionTaskModel(10, 8, positions="rotary"),
            ValueError,
            "positions must be one of",
            id="embedding_and_model_inputs-5",
        ),
        pytest.param(
            lambda: model(torch.zeros(1, 12, dtype=torch.long)),
            ValueError,
            "positions 0..11 do not fit max_len=8",
            id="embedding_and_model_inputs-6",
        ),
        pytest.param(
            lambda: model(torch.zeros(8, dtype=torch.long)),
            ValueError,
            "tokens must have 2 dimensions",
            id="embedding_and_model_inputs-7",
        ),
        pytest.param(
            lambda: train_position_task(
                nn.Linear(2, 2), torch.zeros(2, 8, dtype=torch.long), 1
            ),
            TypeError,
            "model must be a PositionTaskModel",
            id="embedding_and_model_inputs-8",
        ),
        pytest.param(
            lambda: train_position_task(
                model, torch.zeros(2, 8, dtype=torch.long), 1, lr=0.0
            ),
            ValueError,
            "lr must be in \\(0, inf\\)",
            id="embedding_and_model_inputs-9",
        ),
    ]


def _bad_equivariance_and_blind_accuracy_inputs():
    mha = MultiHeadAttention(4, 2)
    x = torch.randn(1, 3, 4)
    return [
        pytest.param(
            lambda: equivariance_error(mha, x, torch.tensor([0, 0, 1])),
            ValueError,
            "perm must be a permutation of 0..2",
            id="equivariance_and_blind_accuracy_inputs-0",
        ),
        pytest.param(
            lambda: equivariance_error(mha, x, torch.tensor([0, 1])),
            ValueError,
            "perm must be a permutation of 0..2",
            id="equivariance_and_blind_accuracy_inputs-1",
        ),
        pytest.param(
            lambda: equivariance_error(mha, x, torch.tensor([0.0, 1.0, 2.0])),
            TypeError,
            "perm must have dtype torch.int64",
            id="equivariance_and_blind_accuracy_inputs-2",
        ),
        pytest.param(
            lambda: equivariance_error("mha", x, torch.arange(3)),
            TypeError,
            "layer must be callable",
            id="equivariance_and_blind_accuracy_inputs-3",
        ),
        pytest.param(
            lambda: equivariance_error(mha, x[0], torch.arange(3)),
            ValueError,
            "x must have 3 dimensions",
            id="equivariance_and_blind_accuracy_inputs-4",
        ),
        pytest.param(
            lambda: position_blind_accuracy(torch.zeros(4, 1, dtype=torch.long)),
            ValueError,
            "tokens must have length >= 2",
            id="equivariance_and_blind_accuracy_inputs-5",
        ),
        pytest.param(
            lambda: position_blind_accuracy(torch.tensor([[0, -1]])),
            ValueError,
            "non-empty tensor of token ids >= 0",
            id="equivariance_and_blind_accuracy_inputs-6",
        ),
        pytest.param(
            lambda: position_blind_accuracy(torch.zeros(2, 3)),
            TypeError,
            "tokens must have dtype torch.int64",
            id="equivariance_and_blind_accuracy_inputs-7",
        ),
    ]


def _bad_modules():
    rows = [
        (lambda: SinusoidalPositionalEncoding(7), ValueError, "d_model must be even"),
        (
            lambda: SinusoidalPositionalEncoding(8, max_len=0),
            ValueError,
            "max_len must be positive",
        ),
        (
            lambda: SinusoidalPositionalEncoding(8, dropout=1.0),
            ValueError,
            r"dropout must be in \[0, 1\)",
        ),
        (lambda: LearnedPositionalEmbedding(-1, 8), ValueError, "max_len must be pos"),
    ]
    for module in (
        SinusoidalPositionalEncoding(8, 10),
        LearnedPositionalEmbedding(10, 8),
    ):
        rows += [
            (
                lambda m=module: m(torch.zeros(1, 8, 8), offset=3),
                ValueError,
                r"do not fit max_len=10 \(offset=3",
            ),
            (
                lambda m=module: m(torch.zeros(1, 12, 8)),
                ValueError,
                "positions 0..11 do not fit max_len=10",
            ),
            (
                lambda m=module: m(torch.zeros(1, 2, 8), offset=-1),
                ValueError,
                "offset must be >= 0",
            ),
            (
                lambda m=module: m(torch.zeros(1, 2, 8), offset=1.0),
                TypeError,
                "offset must be an int",
            ),
            (
                lambda m=module: m(torch.zeros(1, 2, 6)),
                ValueError,
                r"x must have shape \(batch, length, d_m",
            ),
            (lambda m=module: m(torch.zeros(2, 8)), ValueError, "x must have 3 dim"),
            (
                lambda m=module: m(torch.zeros(1, 2, 8, dtype=torch.long)),
                TypeError,
                "x must be a floating-point tensor",
            ),
        ]
    return [pytest.param(*row, id=f"modules-{i}") for i, row in enumerate(rows)]


BAD_INPUT = [
    *_bad_modules(),
    *_bad_angular_frequencies(),
    *_bad_table_arguments(),
    *_bad_embedding_and_model_inputs(),
    *_bad_equivariance_and_blind_accuracy_inputs(),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
