"""Tests for ``dlabc.language_models.transformer_xl``.

Transformer-XL is compared with Hugging Face's ``XLNetLMHeadModel`` with
``attn_type="uni"`` (causal relative attention; transformers 5 no longer ships
``TransfoXL``) read segment after segment with its ``mems``; XLNet with the same model
with ``attn_type="bi"``, ``perm_mask`` and ``target_mapping``, with and without memory.
Weights are copied into the reference (``hf_xlnet_state_dict``), everything in
float64. Hugging Face computes its relative sinusoids in float32 whatever the model's
dtype; the comparisons patch that one function to compute them in float64 (the same
formula), so that the agreement is float64's. The relative shift is checked against a
gather by index, the sinusoids against their closed form, the masks against loops
over the ranks, the memory against a full pass over the whole stream, and the query
stream's blindness to its own token by changing that token. Bad input fails clearly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers.models.xlnet.modeling_xlnet as hf_xlnet

from dlabc.language_models import count_parameters
from dlabc.language_models.transformer_xl import (
    CONFIGS,
    FeedForward,
    Memory,
    RelativeAttention,
    TransformerXL,
    XLConfig,
    XLNet,
    causal_mask,
    hf_xlnet_state_dict,
    loss_by_position,
    permutation_masks,
    relative_shift,
    relative_sinusoids,
    stream_segments,
)
from helpers_weights import randomize
from transformers import XLNetConfig, XLNetLMHeadModel

F64 = dict(atol=1e-10, rtol=1e-10)
V = 37


def _float64_sinusoids(self, qlen, klen, bsz=None, device=None):
    """XLNetModel.relative_positional_encoding without its cast to float32."""
    even = torch.arange(0, self.d_model, 2.0, dtype=torch.float64)
    inv_freq = 1 / torch.pow(10000, even / self.d_model)
    end = -qlen if self.attn_type == "bi" else -1
    distances = torch.arange(klen, end, -1.0, dtype=torch.float64)
    return self.positional_embedding(distances, inv_freq, bsz)


@pytest.fixture
def float64_hf(monkeypatch):
    monkeypatch.setattr(
        hf_xlnet.XLNetModel, "relative_positional_encoding", _float64_sinusoids
    )


_randomize = randomize


def _pair(attn_type, activation, mem_len, d_model=24, n_heads=3, n_layers=2):
    config = XLConfig(V, d_model, n_heads, n_layers, 40, mem_len, activation)
    ours = _randomize((TransformerXL if attn_type == "uni" else XLNet)(config)).double()
    hf_config = XLNetConfig(
        vocab_size=V,
        d_model=d_model,
        n_head=n_heads,
        n_layer=n_layers,
        d_inner=40,
        ff_activation=activation,
        attn_type=attn_type,
        mem_len=mem_len,
        dropout=0.0,
    )
    hf = XLNetLMHeadModel(hf_config).double().eval()
    missing = hf.load_state_dict(hf_xlnet_state_dict(ours), strict=False).missing_keys
    unused = {"r_s_bias", "seg_embed"} | ({"mask_emb"} if attn_type == "uni" else set())
    assert {key.split(".")[-1] for key in missing} == unused  # segment encoding only
    return ours, hf


# ------------------------------------------------------------ the shift, the sinusoids


@pytest.mark.parametrize(("T", "M"), [(1, 0), (4, 0), (5, 3), (3, 7)])
def test_relative_shift_equals_a_gather_by_distance(T, M):
    K = M + T
    L = K + T - 1
    scores = torch.randn(2, 3, T, L, dtype=torch.float64)
    distance = torch.arange(K - 1, -T, -1)  # of each column
    shifted = relative_shift(scores)
    assert shifted.shape == (2, 3, T, K)
    for i in range(T):
        for j in range(K):
            column = int((distance == M + i - j).nonzero())  # the distance of (i, j)
            assert torch.equal(shifted[..., i, j], scores[..., i, column])


@pytest.mark.parametrize("d_model", [2, 8, 30])
def test_relative_sinusoids_closed_form(d_model):
    distances = torch.tensor([5.0, 1.0, 0.0, -3.0], dtype=torch.float64)
    R = relative_sinusoids(distances, d_model)
    for a, k in enumerate(distances.tolist()):
        for i in range(d_model // 2):
            omega = 10000 ** (-2 * i / d_model)
            assert R[a, i].item() == pytest.approx(math.sin(k * omega), abs=1e-12)
            cos = R[a, d_model // 2 + i].item()
            assert cos == pytest.approx(math.cos(k * omega), abs=1e-12)


# ----------------------------------------------------------------------- the masks


@pytest.mark.parametrize(("T", "M"), [(1, 0), (4, 0), (3, 5)])
def test_causal_mask_by_loops(T, M):
    mask = causal_mask(T, M)
    expected = [[j <= M + i for j in range(M + T)] for i in range(T)]
    assert mask.tolist() == expected


@pytest.mark.parametrize("M", [0, 2])
def test_permutation_masks_by_ranks(M):
    torch.manual_seed(0)
    order = torch.stack([torch.randperm(6) for _ in range(3)])
    content, query = permutation_masks(order, M)
    assert content.shape == query.shape == (3, 6, M + 6)
    for b in range(3):
        rank = {int(p): t for t, p in enumerate(order[b])}
        for i in range(6):
            assert content[b, i, :M].all() and query[b, i, :M].all()
            for j in range(6):
                assert bool(content[b, i, M + j]) == (rank[j] <= rank[i])
                assert bool(query[b, i, M + j]) == (rank[j] < rank[i])


def test_left_to_right_order_gives_the_causal_masks():
    order = torch.arange(5).expand(2, 5)
    content, query = permutation_masks(order, 2)
    assert torch.equal(content[0], causal_mask(5, 2))
    assert torch.equal(query[0], causal_mask(5, 2).tril(1))  # without the diagonal


# ------------------------------------------------------ Transformer-XL against HF


@pytest.mark.parametrize(("activation", "mem_len"), [("relu", 6), ("gelu", None)])
def test_transformer_xl_matches_hf_xlnet_uni_with_mems(float64_hf, activation, mem_len):
    torch.manual_seed(1)
    ours, hf = _pair("uni", activation, mem_len)
    ids = torch.randint(V, (2, 16))
    memory, mems = ours.new_memory(), None
    for start in range(0, 16, 4):  # four segments of 4, the memory carried along
        segment = ids[:, start : start + 4]
        out = hf(segment, mems=mems, use_mems=True)
        torch.testing.assert_close(ours(segment, memory), out.logits, **F64)
        mems = out.mems
        for ours_m, hf_m in zip(memory, mems, strict=True):  # the same memory
            torch.testing.assert_close(ours_m.tensors[0], hf_m.transpose(0, 1), **F64)


def test_relative_attention_matches_hf_relative_attention_layer():
    torch.manual_seed(2)
    attn = _randomize(RelativeAttention(24, 4)).double()
    hf_config = XLNetConfig(d_model=24, n_head=4, d_inner=8, dropout=0.0)
    hf = hf_xlnet.XLNetRelativeAttention(hf_config).double().eval()
    with torch.no_grad():  # (d_model, n_head, d_head), as hf_xlnet_state_dict does
        for ours, theirs in ("W_q", "q"), ("W_k", "k"), ("W_v", "v"), ("W_r", "r"):
            getattr(hf, theirs).copy_(getattr(attn, ours).weight.T.unflatten(1, (4, 6)))
        hf.o.copy_(attn.W_o.weight.unflatten(1, (4, 6)))
        hf.r_w_bias.copy_(attn.u)
        hf.r_r_bias.copy_(attn.v)
    B, T, M = 2, 7, 3
    x, m = torch.randn(B, T, 24).double(), torch.randn(B, M, 24).double()
    # HF's inputs are (T, B, d); its sinusoids R_{K}, ..., R_0 for attn_type="uni"
    even = torch.arange(0, 24, 2.0, dtype=torch.float64)
    r = hf_xlnet.XLNetModel.positional_embedding(
        torch.arange(M + T, -1, -1.0, dtype=torch.float64), 10000 ** (-even / 24), B
    )
    masked = (~causal_mask(T, M)).double()[:, :, None, None]  # HF: 1 where masked
    reference = hf(
        x.transpose(0, 1), None, masked, None, r, None, mems=m.transpose(0, 1)
    )[0].transpose(0, 1)
    cache = Memory()
    cache.update(m)  # the memory, then the segment
    ours = hf.layer_norm(x + attn(x, cache))  # HF's layer ends with LayerNorm(x + a)
    torch.testing.assert_close(ours, reference, **F64)


# ----------------------------------------------------------------- the memory


def test_segments_with_unbounded_memory_equal_one_pass_over_the_stream():
    torch.manual_seed(3)
    model = _randomize(TransformerXL(XLConfig(V, 16, 2, 3, 24))).double()
    ids = torch.randint(V, (2, 15))
    memory = model.new_memory(None)
    pieces = [model(ids[:, s : s + 5], memory) for s in range(0, 15, 5)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids), **F64)


def test_memory_of_length_zero_is_no_memory_and_memory_is_detached():
    torch.manual_seed(4)
    model = _randomize(TransformerXL(XLConfig(V, 16, 2, 2, 24, mem_len=4))).double()
    ids = torch.randint(V, (2, 10))
    memory = model.new_memory(0)
    model(ids[:, :5], memory)
    torch.testing.assert_close(model(ids[:, 5:], memory), model(ids[:, 5:]), **F64)
    memory = model.new_memory()
    model(ids[:, :5], memory)
    assert all(len(m) == 4 and not m.tensors[0].requires_grad for m in memory)
    # the stop-gradient: the second segment's loss does not reach the first segment
    embedded = []
    model.embed.register_forward_hook(lambda m, i, out: embedded.append(out))
    memory = model.new_memory()
    model(ids[:, :5], memory)
    loss = model(ids[:, 5:], memory).sum()
    first, second = embedded  # the two segments' embeddings
    first.retain_grad()
    second.retain_grad()
    loss.backward()
    assert first.grad is None  # no path back through the memory
    assert second.grad.abs().max() > 0


def test_stream_segments_reads_contiguous_streams_in_order():
    ids = torch.arange(103)
    segments = list(stream_segments(ids, 4, 6))
    per_stream = 102 // 4
    assert len(segments) == per_stream // 6
    for s, (inputs, targets) in enumerate(segments):
        assert inputs.shape == targets.shape == (4, 6)
        for b in range(4):
            start = b * per_stream + s * 6
            assert inputs[b].tolist() == list(range(start, start + 6))
        assert torch.equal(targets, inputs + 1)


def test_loss_by_position_with_unbounded_memory_is_the_full_pass_loss():
    torch.manual_seed(5)
    model = TransformerXL(XLConfig(V, 16, 2, 2, 24)).double()
    ids = torch.randint(V, (41,))
    losses = loss_by_position(model, ids, 2, 5, None)
    streams = torch.stack([ids[:21], ids[20:41]])  # 2 streams of 20 targets
    logits = model(streams[:, :-1])
    full = F.cross_entropy(logits.transpose(1, 2), streams[:, 1:], reduction="none")
    torch.testing.assert_close(losses, full.view(2, 4, 5).mean((0, 1)).float())


# ------------------------------------------------------------ XLNet against HF


@pytest.mark.parametrize("with_memory", [False, True])
def test_xlnet_matches_hf_with_perm_mask_and_target_mapping(float64_hf, with_memory):
    torch.manual_seed(6)
    ours, hf = _pair("bi", "gelu", None)
    B, T, n_predict = 3, 8, 3
    memory, mems = None, None
    if with_memory:  # a first segment, read by both, fills the memories
        ids0 = torch.randint(V, (B, T))
        order0 = torch.stack([torch.randperm(T) for _ in range(B)])
        memory = ours.new_memory(None)
        ours(ids0, order0, memory)
        mems = hf(ids0, perm_mask=_perm_mask(order0), use_mems=True).mems
    ids = torch.randint(V, (B, T))
    order = torch.stack([torch.randperm(T) for _ in range(B)])
    targets = order[:, -n_predict:]  # partial prediction: the last steps of the order
    target_mapping = F.one_hot(targets, T).double()  # (B, n_predict, T)
    reference = hf(
        ids, mems=mems, perm_mask=_perm_mask(order), target_mapping=target_mapping
    ).logits  # (B, n_predict, V)
    logits = ours(ids, order, memory)  # (B, T, V), every position
    gathered = logits.gather(1, targets[..., None].expand(-1, -1, V))
    torch.testing.assert_close(gathered, reference, **F64)


def _perm_mask(order):
    """Hugging Face's perm_mask: 1 where i may NOT see j in the query stream."""
    return (~permutation_masks(order)[1]).double()


def test_query_stream_never_sees_its_own_token():
    torch.manual_seed(7)
    model = _randomize(XLNet(XLConfig(V, 16, 2, 3, 24))).double()
    ids = torch.randint(V, (1, 9))
    order = torch.randperm(9)[None]
    rank = torch.empty(9, dtype=torch.long)
    rank[order[0]] = torch.arange(9)
    before = model(ids, order)
    for position in range(9):
        changed = ids.clone()
        changed[0, position] = (ids[0, position] + 1) % V
        after = model(changed, order)
        later = rank > rank[position]  # steps after this position's in the order
        # unchanged at the position itself and at every earlier step (the first
        # step sees nothing at all and reads a zero)
        torch.testing.assert_close(after[0, ~later], before[0, ~later], **F64)
        if later.any():  # the later steps read it
            assert (after[0, later] - before[0, later]).abs().max() > 1e-6


def test_xlnet_gradients_are_finite_although_the_first_step_sees_nothing():
    torch.manual_seed(9)
    model = XLNet(XLConfig(V, 16, 2, 2, 24)).double()
    ids = torch.randint(V, (2, 6))
    order = torch.stack([torch.randperm(6) for _ in range(2)])
    logits = model(ids, order)  # the step that sees nothing reads zero: finite
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------- sizes and configurations


def test_configs_are_the_published_xlnet_sizes_and_count_like_hf():
    base, large = CONFIGS["xlnet-base"], CONFIGS["xlnet-large"]
    assert (base.n_layers, base.d_model, base.n_heads, base.d_inner) == (
        12,
        768,
        12,
        3072,
    )
    assert (large.n_layers, large.d_model, large.n_heads, large.d_inner) == (
        24,
        1024,
        16,
        4096,
    )
    for config in (base, large):
        hf_config = XLNetConfig(
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            n_head=config.n_heads,
            n_layer=config.n_layers,
            d_inner=config.d_inner,
        )
        hf = count_parameters(lambda c=hf_config: XLNetLMHeadModel(c))
        segment_encoding = config.n_layers * 3 * config.d_model  # r_s_bias, seg_embed
        assert count_parameters(lambda c=config: XLNet(c)) + segment_encoding == hf


def test_feed_forward_matches_sequential():
    torch.manual_seed(8)
    ff = FeedForward(6, 10, "relu").double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    reference = F.linear(
        F.relu(F.linear(x, ff.layer_1.weight, ff.layer_1.bias)),
        ff.layer_2.weight,
        ff.layer_2.bias,
    )
    torch.testing.assert_close(ff(x), reference, **F64)


# -------------------------------------------------------------------- bad input

model = TransformerXL(XLConfig(11, 8, 2, 1, 16))
xlnet = XLNet(XLConfig(11, 8, 2, 1, 16))

BAD_INPUT = [
    (lambda: XLConfig(11, 10, 3, 1, 16), ValueError, "d_model=10 must be n_heads=3"),
    (lambda: XLConfig(11, 6, 2, 1, 16), ValueError, "even head width"),
    (lambda: XLConfig(11, 8, 2, 0, 16), ValueError, "n_layers must be positive"),
    (lambda: XLConfig(11, 8, 2, 1, 16, mem_len=-1), ValueError, "mem_len must be"),
    (lambda: XLConfig(11, 8, 2, 1, 16, activation="tanh"), ValueError, "activation"),
    (lambda: TransformerXL({"d_model": 8}), TypeError, "config must be an XLConfig"),
    (lambda: relative_sinusoids(torch.arange(3), 4), TypeError, "floating-point"),
    (lambda: relative_sinusoids(torch.ones(3), 5), ValueError, "d_model must be even"),
    (lambda: causal_mask(0), ValueError, "T must be positive"),
    (lambda: causal_mask(3, -1), ValueError, "M must be an int >= 0"),
    (
        lambda: permutation_masks(torch.tensor([[0, 0, 1]])),
        ValueError,
        "permutation of 0..T-1",
    ),
    (lambda: permutation_masks(torch.tensor([0, 1])), ValueError, "2 dimensions"),
    (lambda: model(torch.tensor([[0, 11]])), ValueError, r"ids must lie in \[0, 11\)"),
    (lambda: model.new_memory(-2), ValueError, "mem_len must be None or an int"),
    (
        lambda: model.blocks[0].attn(torch.randn(1, 3, 6)),
        ValueError,
        "d_model=8",
    ),
    (
        lambda: xlnet(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 1]])),
        ValueError,
        "must have the shape of ids",
    ),
    (
        lambda: xlnet(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 1]])),
        ValueError,
        "permutation",
    ),
    (
        lambda: xlnet(torch.tensor([[0, 12]]), torch.tensor([[0, 1]])),
        ValueError,
        "ids must lie",
    ),
    (
        lambda: stream_segments(torch.arange(10), 3, 4),
        ValueError,
        "too short",
    ),
    (
        lambda: loss_by_position(xlnet, torch.arange(10), 1, 2, None),
        TypeError,
        "must be a TransformerXL",
    ),
    (lambda: hf_xlnet_state_dict(torch.nn.Linear(2, 2)), TypeError, "TransformerXL"),
    (lambda: XLNet({"d_model": 8}), TypeError, "config must be an XLConfig"),
    (
        lambda: xlnet(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 1]]), []),
        ValueError,
        "memory must be a list of 1 Memory",
    ),
    (
        lambda: xlnet(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0.0, 1.0]])),
        TypeError,
        "order",
    ),
    (lambda: stream_segments(torch.arange(10.0), 1, 2), TypeError, "ids"),
    (lambda: FeedForward(4, 8, "swish"), ValueError, "activation must be one of"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_fails_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()
