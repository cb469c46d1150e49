"""Tests for ``dlabc.decoder``, the one skeleton of the book's decoder-only models.

The block is compared with its two equations written out (pre-norm and post-norm), the
model with embedding, blocks, norm and read-out written out, the cache with
concatenation and slicing by hand (a rolling buffer included), and cached decoding with
recomputation over the whole sequence. Every cache of the book has the same method set.
Bad input must fail clearly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dlabc.decoder import Cache, DecoderBlock, DecoderLM
from dlabc.improvements.gqa_kv_cache import GroupedQueryAttention, LayerKVCache
from dlabc.improvements.mla import LatentCache
from dlabc.transformers.transformer import KVCache, LayerCache

D = torch.float64


class _Attn(nn.Module):
    """A position-wise stand-in for attention that accepts a cache."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, cache=None):
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_is_its_two_equations(norm_first):
    torch.manual_seed(0)
    block = DecoderBlock(_Attn(8), nn.Linear(8, 8), lambda: nn.LayerNorm(8), norm_first)
    block = block.to(D)
    with torch.no_grad():  # norms that are not the identity
        for n in (block.norm1, block.norm2):
            n.weight.uniform_(0.5, 1.5)
            n.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 8, dtype=D)
    a, f, n1, n2 = block.attn, block.ff, block.norm1, block.norm2
    if norm_first:
        h = x + a(n1(x))
        expected = h + f(n2(h))
    else:
        h = n1(x + a(x))
        expected = n2(h + f(h))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale_embedding", [True, False])
def test_model_is_embedding_blocks_norm_head(scale_embedding):
    torch.manual_seed(0)

    def make_block(i):
        return DecoderBlock(_Attn(16), nn.Linear(16, 16), lambda: nn.LayerNorm(16))

    model = DecoderLM(
        11, 16, 3, make_block, lambda: nn.LayerNorm(16), scale_embedding=scale_embedding
    ).to(D)
    ids = torch.randint(0, 11, (2, 7))
    h = model.embed(ids) * (math.sqrt(16) if scale_embedding else 1.0)
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(
        model(ids), model.head(model.norm(h)), rtol=0, atol=1e-12
    )
    std = model.embed.weight.std().item()
    assert abs(std - (16**-0.5 if scale_embedding else 1.0)) < 0.2 * std
    assert len(model.blocks) == 3 and model.head.bias is not None


@pytest.mark.parametrize("keep", [None, 0, 2, 5])
def test_cache_appends_and_keeps_the_last_positions(keep):
    cache, chunks = Cache(keep), [torch.randn(2, n, 3) for n in (3, 1, 4)]
    for i, new in enumerate(chunks):
        got = cache.update(new, 2 * new)
        everything = torch.cat(chunks[: i + 1], 1)
        seen = everything.shape[1]
        stored = seen if keep is None else min(keep, seen)
        assert cache.seen == seen and len(cache) == stored
        assert cache.start == seen - stored
        kept = everything[:, seen - stored :]
        assert torch.equal(cache.tensors[0], kept)
        assert torch.equal(cache.tensors[1], 2 * kept)
        assert cache.nbytes() == 2 * kept.numel() * 4
        # what update returns: what was stored before, then the new positions
        assert torch.equal(got[0][:, -new.shape[1] :], new)


@pytest.mark.parametrize("window", [None, 3])
def test_cached_decoding_equals_recomputation(window):
    torch.manual_seed(0)

    def make_block(i):
        attn = GroupedQueryAttention(16, 4, 2, window=window)
        return DecoderBlock(attn, nn.Linear(16, 16), lambda: nn.LayerNorm(16))

    keep = None if window is None else window - 1
    model = DecoderLM(
        13,
        16,
        2,
        make_block,
        lambda: nn.LayerNorm(16),
        make_cache=lambda: LayerKVCache(keep),
    )
    ids = torch.randint(0, 13, (2, 9))
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :4], cache)] + [
        model(ids[:, t : t + 1], cache) for t in range(4, 9)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    assert all(c.seen == 9 for c in cache)


def test_every_cache_has_the_same_method_set():
    k = torch.randn(1, 2, 3, 4)
    layer_cache = LayerCache(k[:, :, :0], k[:, :, :0], k, k)
    caches = [
        (LayerKVCache(), (k, k)),
        (LatentCache(), (torch.randn(1, 3, 4), torch.randn(1, 3, 2))),
        (layer_cache, (k, k)),
    ]
    for cache, new in caches:
        got = cache.update(*new)
        assert len(got) == 2 and len(cache) == cache.seen == 3 and cache.start == 0
        assert cache.nbytes() > 0
    for name in ("__len__", "seen", "nbytes"):
        assert hasattr(KVCache, name)


def _block(i):
    return DecoderBlock(_Attn(8), nn.Linear(8, 8), lambda: nn.LayerNorm(8))


lm = DecoderLM(5, 8, 2, _block, None)

BAD_INPUT = [
    pytest.param(
        lambda: DecoderBlock("attention", nn.Linear(2, 2), nn.Identity),
        TypeError,
        "attn must be an nn.Module",
        id="attn",
    ),
    pytest.param(
        lambda: DecoderBlock(nn.Identity(), None, nn.Identity),
        TypeError,
        "ff must be an nn.Module",
        id="ff",
    ),
    pytest.param(
        lambda: DecoderBlock(nn.Identity(), nn.Identity(), "layer"),
        TypeError,
        "norm must make",
        id="norm",
    ),
    pytest.param(
        lambda: DecoderBlock(nn.Identity(), nn.Identity(), nn.Identity, 1),
        TypeError,
        "norm_first must be a bool",
        id="norm_first",
    ),
    pytest.param(
        lambda: DecoderLM(0, 8, 2, _block, None),
        ValueError,
        "vocab_size must be positive",
        id="vocab_size",
    ),
    pytest.param(
        lambda: DecoderLM(5, 8, 2, "block", None),
        TypeError,
        "make_block must be callable",
        id="make_block",
    ),
    pytest.param(
        lambda: lm(torch.zeros(2, 3)), TypeError, "ids must have dtype", id="ids-dtype"
    ),
    pytest.param(
        lambda: lm(torch.zeros(3, dtype=torch.long)),
        ValueError,
        "ids must have 2 dimensions",
        id="ids-1d",
    ),
    pytest.param(
        lambda: lm(torch.tensor([[0, 5]])),
        ValueError,
        r"ids must lie in \[0, 5\)",
        id="ids-range",
    ),
    pytest.param(
        lambda: lm(torch.tensor([[0]]), cache=[Cache()]),
        ValueError,
        "cache must be a list of 2",
        id="cache",
    ),
    pytest.param(
        lambda: lm.new_cache(), TypeError, "without make_cache", id="new_cache"
    ),
    pytest.param(lambda: Cache(keep=-1), ValueError, "keep", id="keep"),
    pytest.param(
        lambda: Cache().update(torch.zeros(2, 3, dtype=torch.long)),
        TypeError,
        "floating-point",
        id="update-dtype",
    ),
    pytest.param(
        lambda: Cache().update(torch.zeros(2, 3), torch.zeros(2, 4)),
        ValueError,
        "same positions",
        id="update-positions",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
