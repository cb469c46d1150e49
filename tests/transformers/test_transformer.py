"""Tests for ``dlabc.transformers.transformer``.

The decoder layer and the whole encoder-decoder are compared weight for weight with
PyTorch's ``nn.TransformerDecoderLayer`` and ``nn.Transformer`` (outputs and gradients,
with causal, source-padding and target-padding masks, post-LN and pre-LN); the cached
decoding with the full recomputation, step by step and greedily; the learning rate with
eq. 3 of the paper; the losses with cross-entropies computed by hand; the parameter
count with ``sum(p.numel())`` and with ``nn.Transformer``'s own parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.rnn.seq2seq import BOS, EOS, PAD
from dlabc.train import train_steps
from dlabc.transformers.attention_with_pytorch import to_torch as mha_to_torch
from dlabc.transformers.transformer import (
    DecoderLayer,
    KVCache,
    LayerCache,
    Transformer,
    TransformerDecoder,
    average_weights,
    greedy_decode,
    noam_lr,
    shift_right,
    target_mask,
    teacher_forcing_loss,
    to_torch,
    transformer_parameter_count,
)

F64 = dict(atol=1e-10, rtol=1e-10)


def randomize_vectors(module: nn.Module) -> None:
    """Random biases and norm parameters (they start at 0 and 1: a weak check)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.normal_()


def make_model(norm_first=False, src_vocab=11, tgt_vocab=13, **kw) -> Transformer:
    options = dict(d_model=16, n_heads=4, n_layers=2, d_ff=24, max_len=40, dropout=0.0)
    options |= kw
    model = Transformer(src_vocab, tgt_vocab, norm_first=norm_first, **options)
    model = model.double().eval()
    randomize_vectors(model)
    return model


def random_batch(batch, src_len, tgt_len, src_vocab=11, tgt_vocab=13, seed=0):
    """Token ids padded at the end: random lengths, the first row full length."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, src_vocab, (batch, src_len), generator=g)
    tgt = torch.randint(3, tgt_vocab, (batch, tgt_len), generator=g)
    tgt[:, 0] = BOS
    src_lengths = torch.randint(1, src_len + 1, (batch,), generator=g)
    tgt_lengths = torch.randint(1, tgt_len + 1, (batch,), generator=g)
    src_lengths[0], tgt_lengths[0] = src_len, tgt_len
    src[torch.arange(src_len) >= src_lengths[:, None]] = PAD
    tgt[torch.arange(tgt_len) >= tgt_lengths[:, None]] = PAD
    return src, tgt


def torch_logits(model, ref, src, tgt_in):
    """``nn.Transformer`` on our embeddings, with its masks (True = hidden)."""
    length = tgt_in.shape[1]
    out = ref(
        model.embed_source(src),
        model.embed_target(tgt_in),
        tgt_mask=~torch.ones(length, length, dtype=torch.bool).tril(),
        src_key_padding_mask=src == PAD,
        memory_key_padding_mask=src == PAD,
        tgt_key_padding_mask=tgt_in == PAD,
    )
    return model.generator(out)


# --------------------------------------------------------------------------------------
# the decoder layer


def copy_to_torch_layer(layer: DecoderLayer) -> nn.TransformerDecoderLayer:
    """Written out here by hand, apart from the module's own ``to_torch``."""
    ref = nn.TransformerDecoderLayer(
        layer.d_model,
        layer.self_attn.n_heads,
        dim_feedforward=layer.ff.linear1.out_features,
        dropout=0.0,
        batch_first=True,
        norm_first=layer.norm_first,
        dtype=torch.float64,
    )
    with torch.no_grad():
        ref.self_attn.load_state_dict(mha_to_torch(layer.self_attn).state_dict())
        ref.multihead_attn.load_state_dict(mha_to_torch(layer.cross_attn).state_dict())
        for name in ("linear1", "linear2"):
            getattr(ref, name).load_state_dict(getattr(layer.ff, name).state_dict())
        for name in ("norm1", "norm2", "norm3"):
            getattr(ref, name).weight.copy_(getattr(layer, name).weight)
            getattr(ref, name).bias.copy_(getattr(layer, name).bias)
    return ref


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize(
    ("batch", "tgt_len", "src_len"), [(3, 5, 7), (2, 8, 1), (1, 1, 4)]
)
def test_decoder_layer_matches_torch(norm_first, batch, tgt_len, src_len):
    layer = DecoderLayer(16, 4, 24, norm_first=norm_first).double().eval()
    randomize_vectors(layer)
    ref = copy_to_torch_layer(layer)
    x = torch.randn(batch, tgt_len, 16, dtype=torch.float64)
    memory = torch.randn(batch, src_len, 16, dtype=torch.float64)
    src_lengths = torch.randint(1, src_len + 1, (batch,))
    keep = torch.arange(src_len) < src_lengths[:, None]  # (B, S), True on real
    causal = torch.ones(tgt_len, tgt_len, dtype=torch.bool).tril()
    out, self_w, cross_w = layer(x, memory, causal, keep[:, None, :])
    expected = ref(
        x, memory, tgt_mask=~causal, memory_key_padding_mask=~keep
    )  # PyTorch: True = hidden
    torch.testing.assert_close(out, expected, **F64)
    assert self_w.shape == (batch, 4, tgt_len, tgt_len)
    assert cross_w.shape == (batch, 4, tgt_len, src_len)
    assert (self_w[..., ~causal] == 0).all()
    hidden = ~keep[:, None, None, :].expand_as(cross_w)  # (B, h, T, S)
    assert (cross_w[hidden] == 0).all()


def test_decoder_layer_without_masks_matches_torch():
    layer = DecoderLayer(8, 2, 16).double().eval()
    randomize_vectors(layer)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    memory = torch.randn(2, 3, 8, dtype=torch.float64)
    out, _, _ = layer(x, memory)
    torch.testing.assert_close(out, copy_to_torch_layer(layer)(x, memory), **F64)


@pytest.mark.parametrize("final_norm", [None, True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_stack_matches_torch(norm_first, final_norm):
    decoder = TransformerDecoder(
        3, 8, 2, 12, norm_first=norm_first, final_norm=final_norm
    )
    decoder = decoder.double()
    randomize_vectors(decoder)
    has_norm = norm_first if final_norm is None else final_norm
    assert (decoder.norm is not None) == has_norm
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    memory = torch.randn(2, 6, 8, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out, self_ws, cross_ws = decoder(x, memory, causal)
    expected = x
    for layer in decoder.layers:
        expected = copy_to_torch_layer(layer)(expected, memory, tgt_mask=~causal)
    if has_norm:
        expected = F.layer_norm(
            expected, (8,), decoder.norm.weight, decoder.norm.bias, eps=1e-5
        )
    torch.testing.assert_close(out, expected, **F64)
    assert len(self_ws) == len(cross_ws) == 3


# --------------------------------------------------------------------------------------
# the whole model against nn.Transformer


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize(
    ("batch", "src_len", "tgt_len", "n_layers", "n_dec_layers"),
    [(4, 7, 6, 2, None), (3, 2, 9, 1, 3), (5, 9, 1, 3, 1), (1, 5, 5, 2, 2)],
)
def test_transformer_matches_nn_transformer(
    norm_first, batch, src_len, tgt_len, n_layers, n_dec_layers
):
    model = make_model(norm_first, n_layers=n_layers, n_dec_layers=n_dec_layers)
    ref = to_torch(model)
    assert isinstance(ref, nn.Transformer) and ref.batch_first
    assert (ref.encoder.norm is None) == (ref.decoder.norm is None) == (not norm_first)
    src, tgt_in = random_batch(batch, src_len, tgt_len, seed=batch + src_len)
    logits = model(src, tgt_in)
    assert logits.shape == (batch, tgt_len, 13)
    torch.testing.assert_close(logits, torch_logits(model, ref, src, tgt_in), **F64)


@pytest.mark.parametrize("norm_first", [False, True])
def test_gradients_match_nn_transformer(norm_first):
    model = make_model(norm_first).train()  # dropout 0: training mode is deterministic
    ref = to_torch(model)
    src, tgt_in = random_batch(3, 6, 5)
    upstream = torch.randn(3, 5, 13, dtype=torch.float64)
    (model(src, tgt_in) * upstream).sum().backward()
    ours = {
        "enc_ff": model.encoder.layers[0].ff.linear1.weight.grad.clone(),
        "cross_v": model.decoder.layers[0].cross_attn.W_v.weight.grad.clone(),
        "dec_norm": model.decoder.layers[1].norm2.weight.grad.clone(),
        "embed": model.src_embed.embedding.weight.grad.clone(),
    }
    model.zero_grad()
    (torch_logits(model, ref, src, tgt_in) * upstream).sum().backward()
    d = model.d_model
    theirs = {
        "enc_ff": ref.encoder.layers[0].linear1.weight.grad,
        "cross_v": ref.decoder.layers[0].multihead_attn.in_proj_weight.grad[2 * d :],
        "dec_norm": ref.decoder.layers[1].norm2.weight.grad,
        "embed": model.src_embed.embedding.weight.grad,  # through PyTorch's layers
    }
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], **F64, msg=name)


def test_encode_then_decode_is_forward_and_masks_hold():
    model = make_model()
    src, tgt_in = random_batch(4, 6, 7)
    memory = model.encode(src)
    assert memory.shape == (4, 6, 16)
    torch.testing.assert_close(model.decode(tgt_in, memory, src), model(src, tgt_in))
    maps = model.attention_maps(src, tgt_in)
    assert len(maps.encoder) == len(maps.decoder_self) == len(maps.decoder_cross) == 2
    keep = src != PAD
    for w in maps.decoder_cross:  # (B, h, T, S): padded sources get nothing
        assert w.shape == (4, 4, 7, 6)
        assert (w[~keep[:, None, None, :].expand_as(w)] == 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 4, 7, dtype=torch.float64))
    for w in maps.decoder_self:  # nothing above the diagonal
        assert (w.triu(1) == 0).all()


def test_padding_more_does_not_change_the_logits():
    model = make_model()
    src, tgt_in = random_batch(3, 5, 4)
    longer_src = F.pad(src, (0, 3), value=PAD)
    longer_tgt = F.pad(tgt_in, (0, 2), value=PAD)
    torch.testing.assert_close(
        model(longer_src, longer_tgt)[:, :4], model(src, tgt_in), **F64
    )


def test_each_sentence_alone_gives_the_batch_result():
    model = make_model(norm_first=True)
    src, tgt_in = random_batch(4, 6, 5, seed=3)
    logits = model(src, tgt_in)
    for b in range(4):
        s = int((src[b] != PAD).sum())
        t = int((tgt_in[b] != PAD).sum())
        alone = model(src[b : b + 1, :s], tgt_in[b : b + 1, :t])
        torch.testing.assert_close(alone[0], logits[b, :t], **F64)


def test_target_positions_do_not_see_the_future():
    """Changing token t changes no logits before t: the causal mask, end to end."""
    model = make_model()
    src, tgt_in = random_batch(2, 5, 6)
    tgt_in[:, :] = torch.randint(3, 13, tgt_in.shape)
    tgt_in[:, 0] = BOS
    changed = tgt_in.clone()
    changed[:, 4] = (changed[:, 4] - 2) % 10 + 3
    before, after = model(src, tgt_in), model(src, changed)
    torch.testing.assert_close(before[:, :4], after[:, :4], **F64)
    assert (before[:, 4:] - after[:, 4:]).abs().max() > 1e-3


def test_shared_embeddings_are_one_matrix():
    model = Transformer(10, 10, 8, 2, 1, 16, share_embeddings=True)
    assert model.src_embed is model.tgt_embed
    assert model.generator.weight is model.tgt_embed.embedding.weight
    unique = {id(p) for p in model.parameters()}
    assert len(unique) == len(list(model.parameters()))


# --------------------------------------------------------------------------------------
# the key-value cache


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_cached_steps_equal_the_full_recomputation(norm_first, seed):
    torch.manual_seed(seed)
    model = make_model(norm_first, n_dec_layers=3)
    src, _ = random_batch(3, 6, 2, seed=seed)
    tokens = torch.randint(3, 13, (3, 9))
    tokens[:, 0] = BOS
    memory = model.encode(src)
    full = model.decode(tokens, memory, src)  # (B, 9, V), every prefix at once
    cache = KVCache(model, memory, src)
    for t in range(9):
        step = model.decode_step(tokens[:, t], cache)
        torch.testing.assert_close(step, full[:, t], **F64)
        assert cache.length == t + 1
        assert cache.layers[0].self_k.shape == (3, 4, t + 1, 4)
        assert cache.layers[2].cross_v.shape == (3, 4, 6, 4)
    per_layer = 2 * 3 * 4 * 4 * (9 + 6)  # K and V, (B, h, t + S, d_head)
    assert cache.numel() == 3 * per_layer


@pytest.mark.parametrize("norm_first", [False, True])
def test_greedy_decoding_with_and_without_cache_agree(norm_first):
    model = make_model(norm_first)
    src, _ = random_batch(5, 7, 2, seed=4)
    tokens, logits = greedy_decode(model, src, max_len=12, use_cache=True)
    tokens_full, logits_full = greedy_decode(model, src, max_len=12, use_cache=False)
    assert torch.equal(tokens, tokens_full)
    torch.testing.assert_close(logits, logits_full, **F64)
    assert tokens.shape[0] == 5 and tokens.shape[1] <= 12
    assert logits.shape == (*tokens.shape, 13)


def test_greedy_decoding_is_the_argmax_of_its_own_prefix():
    """Reference: the prefix the decoder wrote, read back by teacher forcing."""
    model = make_model()
    src, _ = random_batch(4, 5, 2, seed=7)
    tokens, logits = greedy_decode(model, src, max_len=10)
    prefix = shift_right(tokens)  # <bos> then the tokens written before each step
    full = model(src, prefix)
    for b in range(4):
        ended = (tokens[b] == EOS).nonzero()
        n = int(ended[0]) + 1 if len(ended) else tokens.shape[1]
        assert (tokens[b, n:] == PAD).all()
        torch.testing.assert_close(logits[b, :n], full[b, :n], **F64)
        allowed = full[b, :n].clone()
        allowed[:, [PAD, BOS]] = -math.inf
        assert torch.equal(tokens[b, :n], allowed.argmax(-1))


def test_greedy_decoding_stops_when_every_sentence_ends():
    model = make_model()
    with torch.no_grad():  # a generator that always says <eos>
        model.generator.weight.zero_()
        model.generator.bias.zero_()
        model.generator.bias[EOS] = 1.0
    tokens, logits = greedy_decode(model, random_batch(3, 4, 2)[0], max_len=20)
    assert tokens.shape == (3, 1) and (tokens == EOS).all()
    assert logits.shape == (3, 1, 13)


def test_greedy_decoding_restores_training_mode():
    model = make_model().train()
    greedy_decode(model, random_batch(2, 4, 2)[0], max_len=3)
    assert model.training


# --------------------------------------------------------------------------------------
# training pieces


def test_target_mask_matches_loops():
    tgt_in = torch.tensor([[BOS, 5, 6, PAD], [BOS, 7, PAD, PAD], [BOS, 3, 4, 5]])
    mask = target_mask(tgt_in)
    assert mask.shape == (3, 4, 4) and mask.dtype == torch.bool
    for b in range(3):
        for i in range(4):
            for j in range(4):
                assert mask[b, i, j] == (j <= i and tgt_in[b, j] != PAD)


def test_shift_right():
    tgt = torch.tensor([[5, 6, EOS, PAD], [7, EOS, PAD, PAD]])
    expected = torch.tensor([[BOS, 5, 6, EOS], [BOS, 7, EOS, PAD]])
    assert torch.equal(shift_right(tgt), expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_teacher_forcing_loss_by_hand(smoothing):
    model = make_model()
    src, _ = random_batch(3, 5, 2)
    tgt = torch.tensor([[4, 5, 6, EOS], [7, EOS, PAD, PAD], [8, 9, EOS, PAD]])
    loss = teacher_forcing_loss(model, src, tgt, label_smoothing=smoothing)
    log_p = model(src, shift_right(tgt)).log_softmax(-1)  # (B, T, V)
    terms = []
    for b in range(3):
        for t in range(4):
            if tgt[b, t] != PAD:
                nll = -log_p[b, t, tgt[b, t]]
                uniform = -log_p[b, t].mean()  # cross-entropy with 1/V everywhere
                terms.append((1 - smoothing) * nll + smoothing * uniform)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), **F64)


def test_noam_lr_is_eq_3_and_peaks_at_warmup():
    d_model, warmup = 512, 4000
    for step in (1, 10, 3999, 4000, 4001, 100_000):
        expected = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
        assert noam_lr(step, d_model, warmup) == pytest.approx(expected, rel=1e-12)
    lrs = [noam_lr(s, 64, 300, factor=2.0) for s in range(1, 3000)]
    assert max(range(len(lrs)), key=lrs.__getitem__) + 1 == 300
    assert max(lrs) == pytest.approx(2.0 / math.sqrt(64 * 300), rel=1e-12)
    assert noam_lr(50, 64, 300, factor=2.0) == pytest.approx(2 * 50 * 300**-1.5 / 8)
    assert noam_lr(1200, 64, 300) == pytest.approx(noam_lr(300, 64, 300) / 2)


def test_training_with_train_steps_lowers_the_loss():
    torch.manual_seed(0)
    model = Transformer(8, 8, 16, 2, 1, 32, max_len=8, dropout=0.0)
    src = torch.randint(3, 8, (16, 4))
    tgt = torch.cat([src.flip(1), torch.full((16, 1), EOS)], 1)  # reverse, then <eos>
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9
    )
    history = train_steps(
        model,
        optimizer,
        iter(lambda: torch.arange(16), None),
        lambda m, index: teacher_forcing_loss(m, src[index], tgt[index]),
        steps=60,
        lr_schedule=lambda step: noam_lr(step + 1, 16, 10, factor=0.5),
    )
    assert history.lr[9] == pytest.approx(0.5 / math.sqrt(160))
    assert history.step_loss[-1] < 0.3 * history.step_loss[0]


def test_average_weights_is_the_mean_of_each_tensor():
    states = [make_model().state_dict() for _ in range(3)]  # random vectors differ
    average = average_weights(states)
    assert average.keys() == states[0].keys()
    for name, tensor in average.items():
        expected = (states[0][name] + states[1][name] + states[2][name]) / 3
        torch.testing.assert_close(tensor, expected, **F64)
    model = make_model()
    model.load_state_dict(average)  # a state_dict of the same model
    counters = [{"w": torch.ones(2), "n": torch.tensor(k)} for k in (4, 4)]
    assert average_weights(counters)["n"] == 4


# --------------------------------------------------------------------------------------
# the parameter count


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize(
    ("vocab", "d_model", "n_layers", "d_ff", "n_dec_layers"),
    [((11, 13), 16, 2, 24, None), ((7, 7), 8, 1, 32, 3), ((20, 5), 12, 3, 6, 1)],
)
def test_parameter_count(
    vocab, d_model, n_layers, d_ff, n_dec_layers, norm_first, share
):
    if share and vocab[0] != vocab[1]:
        vocab = (vocab[1], vocab[1])
    model = Transformer(
        *vocab,
        d_model=d_model,
        n_heads=4,
        n_layers=n_layers,
        d_ff=d_ff,
        norm_first=norm_first,
        n_dec_layers=n_dec_layers,
        share_embeddings=share,
    )
    count = transformer_parameter_count(
        *vocab, d_model, n_layers, d_ff, norm_first, n_dec_layers, share
    )
    assert count == sum(p.numel() for p in model.parameters())


def test_parameter_count_against_nn_transformer():
    """nn.Transformer always has both final norms: our pre-LN model's stacks."""
    ref = nn.Transformer(32, 4, 2, 3, 48, batch_first=True)
    stacks = sum(p.numel() for p in ref.parameters())
    embeddings_and_generator = 11 * 32 + 13 * 32 + (32 * 13 + 13)
    count = transformer_parameter_count(11, 13, 32, 2, 48, True, 3)
    assert count == stacks + embeddings_and_generator


def test_base_model_has_about_63_million_parameters():
    with torch.device("meta"):  # shapes only, no memory
        base = Transformer(37000, 37000, share_embeddings=True)
    count = sum(p.numel() for p in base.parameters())
    assert count == transformer_parameter_count(37000, 37000, share_embeddings=True)
    assert 60e6 < count < 66e6


# --------------------------------------------------------------------------------------
# bad input


def test_decoding_rejects_bad_input():
    model = make_model(max_len=6)
    src, _ = random_batch(2, 5, 2)
    with pytest.raises(ValueError, match="max_len must be positive"):
        greedy_decode(model, src, max_len=0)
    with pytest.raises(TypeError, match="max_len must be an int"):
        greedy_decode(model, src, max_len=2.5)
    with pytest.raises(ValueError, match="max_len=7 is more than the model's"):
        greedy_decode(model, src, max_len=7)
    with pytest.raises(TypeError, match="use_cache must be a bool"):
        greedy_decode(model, src, max_len=3, use_cache=None)
    with pytest.raises(TypeError, match="model must be a Transformer"):
        greedy_decode(nn.Linear(2, 2), src, max_len=3)
    memory = model.encode(src)
    with pytest.raises(ValueError, match="must be .B, S, d_model. for src"):
        KVCache(model, memory[:, :4], src)
    with pytest.raises(TypeError, match="model must be a Transformer"):
        KVCache(nn.Linear(2, 2), memory, src)
    cache = KVCache(model, memory, src)
    with pytest.raises(ValueError, match="token has batch size 3, the cache 2"):
        model.decode_step(torch.full((3,), BOS), cache)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model.decode_step(torch.full((2,), BOS), None)
    with pytest.raises(ValueError, match="token must have 1 dimensions"):
        model.decode_step(torch.full((2, 1), BOS), cache)
    for _ in range(6):
        model.decode_step(torch.full((2,), BOS), cache)
    with pytest.raises(ValueError, match="tgt_in has 7 positions"):
        model.decode_step(torch.full((2,), BOS), cache)


def test_layer_cache_attention_matches_the_module():
    """One new position over cached keys and values = MultiHeadAttention on it all."""
    model = make_model()
    mha = model.decoder.layers[0].self_attn
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    empty = torch.zeros(2, 4, 0, 4, dtype=torch.float64)
    cache = LayerCache(empty, empty, empty, empty)
    for t in range(5):
        out, weights = cache.attend_self(mha, x[:, t : t + 1])
        expected, expected_weights = mha(x[:, : t + 1], mask=None)
        torch.testing.assert_close(out[:, 0], expected[:, -1], **F64)
        torch.testing.assert_close(weights[:, :, 0], expected_weights[:, :, -1], **F64)


# --------------------------------------------------------------------------------------------
# bad input: every public entry point names the argument it rejects


def _bad_average_weights():
    return [
        pytest.param(
            lambda: average_weights([]),
            ValueError,
            "non-empty list of state_dicts",
            id="average_weights-0",
        ),
        pytest.param(
            lambda: average_weights({"w": torch.ones(2)}),
            ValueError,
            "non-empty list of state_dicts",
            id="average_weights-1",
        ),
        pytest.param(
            lambda: average_weights([{"w": torch.ones(2)}, torch.ones(2)]),
            TypeError,
            "states\\[1\\] must be a dict",
            id="average_weights-2",
        ),
        pytest.param(
            lambda: average_weights([{"w": torch.ones(2)}, {"v": torch.ones(2)}]),
            ValueError,
            "states\\[1\\] has other keys",
            id="average_weights-3",
        ),
        pytest.param(
            lambda: average_weights([{"w": torch.ones(2)}, {"w": torch.ones(3)}]),
            ValueError,
            "'w' has different shapes",
            id="average_weights-4",
        ),
        pytest.param(
            lambda: average_weights([{"n": torch.tensor(1)}, {"n": torch.tensor(2)}]),
            ValueError,
            "'n' is not floating-point and differs",
            id="average_weights-5",
        ),
    ]


def _bad_constructors():
    return [
        pytest.param(
            lambda: Transformer(5, 5, d_model=10, n_heads=4),
            ValueError,
            "d_model=10 is not divisible by n_heads=4",
            id="constructors-0",
        ),
        pytest.param(
            lambda: DecoderLayer(10, 3, 8),
            ValueError,
            "not divisible",
            id="constructors-1",
        ),
        pytest.param(
            lambda: Transformer(5, 5, 8, 2, 1, 8, max_len=0),
            ValueError,
            "max_len must be positive",
            id="constructors-2",
        ),
        pytest.param(
            lambda: Transformer(5.0, 5, 8, 2, 1, 8),
            TypeError,
            "src_vocab_size must be an int",
            id="constructors-3",
        ),
        pytest.param(
            lambda: Transformer(5, 5, 8, 2, 1, 8, n_dec_layers=0),
            ValueError,
            "n_dec_layers must be positive",
            id="constructors-4",
        ),
        pytest.param(
            lambda: Transformer(5, 6, 8, 2, 1, 8, share_embeddings=True),
            ValueError,
            "share_embeddings needs one vocabulary",
            id="constructors-5",
        ),
        pytest.param(
            lambda: DecoderLayer(8, 2, 8, norm_first=1),
            TypeError,
            "norm_first must be a bool",
            id="constructors-6",
        ),
        pytest.param(
            lambda: DecoderLayer(8, 2, 8, dropout=1.0),
            ValueError,
            "dropout must be in",
            id="constructors-7",
        ),
        pytest.param(
            lambda: TransformerDecoder(0, 8, 2, 8),
            ValueError,
            "n_layers must be positive",
            id="constructors-8",
        ),
        pytest.param(
            lambda: TransformerDecoder(1, 8, 2, 8, final_norm="yes"),
            TypeError,
            "final_norm must be a bool",
            id="constructors-9",
        ),
    ]


def _bad_decoder_layer():
    layer = DecoderLayer(8, 2, 16)
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    return [
        pytest.param(
            lambda: layer(torch.randn(2, 5, 6), memory),
            ValueError,
            "x must be \\(B, T, d_model=8\\)",
            id="decoder_layer-0",
        ),
        pytest.param(
            lambda: layer(x, memory[0]),
            ValueError,
            "memory must have 3 dimensions",
            id="decoder_layer-1",
        ),
        pytest.param(
            lambda: layer(x.long(), memory),
            TypeError,
            "x must be a floating-point tensor",
            id="decoder_layer-2",
        ),
        pytest.param(
            lambda: layer(x, torch.randn(3, 3, 8)),
            ValueError,
            "same batch size",
            id="decoder_layer-3",
        ),
        pytest.param(
            lambda: layer(x, memory, tgt_mask=torch.ones(4, 4, dtype=torch.bool)),
            ValueError,
            "does not broadcast",
            id="decoder_layer-4",
        ),
        pytest.param(
            lambda: layer(x, memory, memory_mask=torch.ones(2, 1, 4, dtype=torch.bool)),
            ValueError,
            "does not broadcast",
            id="decoder_layer-5",
        ),
        pytest.param(
            lambda: layer(x, memory, tgt_mask=torch.ones(5, 5)),
            TypeError,
            "mask must have dtype torch.bool",
            id="decoder_layer-6",
        ),
        pytest.param(
            lambda: layer(
                x, memory, memory_mask=torch.zeros(2, 1, 3, dtype=torch.bool)
            ),
            ValueError,
            "hides every key",
            id="decoder_layer-7",
        ),
    ]


def _bad_transformer():
    model = make_model(max_len=6)
    src, tgt_in = random_batch(2, 5, 4)
    return [
        pytest.param(
            lambda: model(torch.full((2, 7), 3), tgt_in),
            ValueError,
            "src has 7 positions, more than",
            id="transformer-0",
        ),
        pytest.param(
            lambda: model(src, torch.full((2, 8), 3)),
            ValueError,
            "tgt_in has 8 positions, more than",
            id="transformer-1",
        ),
        pytest.param(
            lambda: model(src, tgt_in[:1]),
            ValueError,
            "must share the batch size",
            id="transformer-2",
        ),
        pytest.param(
            lambda: model.decode(tgt_in, model.encode(src)[:, :3], src),
            ValueError,
            "must share the batch size",
            id="transformer-3",
        ),
        pytest.param(
            lambda: model(src.float(), tgt_in),
            TypeError,
            "src must have dtype torch.int64",
            id="transformer-4",
        ),
        pytest.param(
            lambda: model(src, tgt_in[0]),
            ValueError,
            "tgt_in must have 2 dimensions",
            id="transformer-5",
        ),
        pytest.param(
            lambda: model(torch.full((2, 3), 11), tgt_in),
            ValueError,
            "src ids must lie in 0\\.\\.10",
            id="transformer-6",
        ),
        pytest.param(
            lambda: model(src, torch.full((2, 3), -1)),
            ValueError,
            "tgt_in ids must lie in 0\\.\\.12",
            id="transformer-7",
        ),
        pytest.param(
            lambda: model(torch.zeros(2, 3, dtype=torch.long), tgt_in),
            ValueError,
            "src has empty sequences",
            id="transformer-8",
        ),
        pytest.param(
            lambda: model(torch.tensor([[3, PAD, 4], [3, 4, 5]]), tgt_in),
            ValueError,
            "src must be padded at the end",
            id="transformer-9",
        ),
        pytest.param(
            lambda: model(src, torch.tensor([[PAD, 3], [BOS, 3]])),
            ValueError,
            "tgt_in must start with a token",
            id="transformer-10",
        ),
        pytest.param(
            lambda: model.decode(
                tgt_in, torch.randn(2, 5, 8, dtype=torch.float64), src
            ),
            ValueError,
            "memory must be \\(B, T, d_model=16\\)",
            id="transformer-11",
        ),
    ]


def _bad_layer_cache():
    model = make_model()
    mha = model.decoder.layers[0].self_attn
    empty = torch.zeros(2, 4, 0, 4, dtype=torch.float64)
    cache = LayerCache(empty, empty, empty, empty)
    return [
        pytest.param(
            lambda: cache.attend_self(nn.Linear(16, 16), torch.randn(2, 1, 16)),
            TypeError,
            "mha must be a MultiHeadAttention",
            id="layer_cache-0",
        ),
        pytest.param(
            lambda: cache.attend_self(mha, torch.randn(2, 3, 16, dtype=torch.float64)),
            ValueError,
            "h must be one new position",
            id="layer_cache-1",
        ),
        pytest.param(
            lambda: cache.attend_memory(
                mha, torch.randn(3, 1, 16), torch.ones(3, 1, 2).bool()
            ),
            ValueError,
            "h must be one new position",
            id="layer_cache-2",
        ),
        pytest.param(
            lambda: cache.attend_self(mha, torch.ones(2, 1, 16, dtype=torch.long)),
            TypeError,
            "h must be a floating-point tensor",
            id="layer_cache-3",
        ),
    ]


def _bad_training_pieces():
    model = make_model()
    src, _ = random_batch(2, 4, 2)
    tgt = torch.tensor([[4, EOS], [5, EOS]])
    return [
        pytest.param(
            lambda: noam_lr(0, 512, 4000),
            ValueError,
            "step must be >= 1",
            id="training_pieces-0",
        ),
        pytest.param(
            lambda: noam_lr(1.0, 512, 4000),
            TypeError,
            "step must be an int",
            id="training_pieces-1",
        ),
        pytest.param(
            lambda: noam_lr(1, 512, 0),
            ValueError,
            "warmup must be positive",
            id="training_pieces-2",
        ),
        pytest.param(
            lambda: noam_lr(1, -512, 10),
            ValueError,
            "d_model must be positive",
            id="training_pieces-3",
        ),
        pytest.param(
            lambda: noam_lr(1, 512, 10, factor=0.0),
            ValueError,
            "factor must be in \\(0, inf\\)",
            id="training_pieces-4",
        ),
        pytest.param(
            lambda: teacher_forcing_loss(model, src, tgt, label_smoothing=1.0),
            ValueError,
            "label_smoothing must be in \\[0, 1\\)",
            id="training_pieces-5",
        ),
        pytest.param(
            lambda: teacher_forcing_loss(nn.Linear(2, 2), src, tgt),
            TypeError,
            "model must be a Transformer",
            id="training_pieces-6",
        ),
        pytest.param(
            lambda: shift_right(tgt.float()),
            TypeError,
            "tgt must have dtype torch.int64",
            id="training_pieces-7",
        ),
        pytest.param(
            lambda: target_mask(torch.zeros(2, 0, dtype=torch.long)),
            ValueError,
            "tgt_in must hold tokens",
            id="training_pieces-8",
        ),
        pytest.param(
            lambda: to_torch(nn.Linear(8, 2)),
            TypeError,
            "to_torch expects a Transformer",
            id="training_pieces-9",
        ),
        pytest.param(
            lambda: transformer_parameter_count(5, 6, share_embeddings=True),
            ValueError,
            "share_embeddings needs",
            id="training_pieces-10",
        ),
        pytest.param(
            lambda: transformer_parameter_count(5, 6, d_ff=0),
            ValueError,
            "d_ff must be positive",
            id="training_pieces-11",
        ),
    ]


BAD_INPUT = [
    *_bad_average_weights(),
    *_bad_constructors(),
    *_bad_decoder_layer(),
    *_bad_transformer(),
    *_bad_layer_cache(),
    *_bad_training_pieces(),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
