"""Tests for ``dlabc.vision.swin``.

The window cut, the relative position index and the shifted-window mask are compared
with brute-force constructions written from their definitions (loops over tokens; the
mask from the shifted partition of the image itself, before any roll); patch merging,
a Swin block (shifted or not, padded or not) and whole models with Hugging Face's
``SwinPatchMerging``, ``SwinLayer``, ``SwinModel`` and ``SwinForImageClassification``
with random weights copied through the renaming table, in float64; the parameter
counts with Hugging Face's and the paper's; the cost formulas of the paper with
PyTorch's FLOP counter.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.swin.modeling_swin import SwinLayer, SwinPatchMerging
from transformers.utils import logging

from dlabc.transformers.attention_with_pytorch import MultiHeadAttention
from dlabc.vision.swin import (
    CONFIGS,
    PatchMerging,
    SwinBlock,
    SwinConfig,
    SwinTransformer,
    WindowAttention,
    attention_cost,
    multiply_adds,
    relative_position_index,
    shifted_window_mask,
    swin_from_hf_state_dict,
    window_partition,
    window_reverse,
)
from transformers import SwinConfig as HFSwinConfig
from transformers import SwinForImageClassification, SwinModel

logging.set_verbosity_error()
F64 = dict(atol=1e-12, rtol=1e-12)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every weight away from its initial value (norm scales off 1, biases and
    the bias tables off 0), so that a wrongly mapped weight shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _hf_config(**kw) -> HFSwinConfig:
    base = dict(
        image_size=32,
        patch_size=2,
        num_channels=1,
        embed_dim=8,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
    )
    return HFSwinConfig(**{**base, **kw})


def _ours(hf_config: HFSwinConfig, n_classes: int = 0) -> SwinTransformer:
    c = hf_config
    return SwinTransformer(
        SwinConfig(
            embed_dim=c.embed_dim,
            depths=tuple(c.depths),
            num_heads=tuple(c.num_heads),
            window_size=c.window_size,
            patch_size=c.patch_size,
            in_channels=c.num_channels,
            n_classes=n_classes,
        )
    ).double()


# ---------------------------------------------------------------- windows


def test_window_partition_cuts_windows_row_by_row_and_reverse_undoes_it():
    B, H, W, C, M = 2, 6, 9, 3, 3
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    windows = window_partition(x, M)
    assert windows.shape == (B * (H // M) * (W // M), M * M, C)
    k = 0
    for b in range(B):
        for i in range(H // M):
            for j in range(W // M):
                for n in range(M * M):
                    expected = x[b, i * M + n // M, j * M + n % M]
                    assert torch.equal(windows[k, n], expected)
                k += 1
    assert torch.equal(window_reverse(windows, M, H, W), x)


def test_relative_position_index_is_the_offset_of_each_pair():
    for M in (1, 2, 3, 7):
        index = relative_position_index(M)
        assert index.shape == (M * M, M * M)
        for q in range(M * M):
            for k in range(M * M):
                d_row = q // M - k // M
                d_col = q % M - k % M
                assert index[q, k] == (d_row + M - 1) * (2 * M - 1) + (d_col + M - 1)
        # every offset occurs, and only those: the table has no unused row
        assert index.unique().tolist() == list(range((2 * M - 1) ** 2))


def _brute_force_mask(H: int, W: int, M: int, s: int) -> torch.Tensor:
    """Roll the grid's coordinates, cut windows, and allow a pair only if the two
    tokens lie in the same window of the image's own shifted partition, whose
    windows start at row and column s + k M (and the partial ones at the edges)."""
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    where = torch.stack([rows, cols], -1)  # (H, W, 2): each token's image position
    rolled = torch.roll(where, shifts=(-s, -s), dims=(0, 1))
    windows = window_partition(rolled[None], M)  # (nW, N, 2)
    nW, N = windows.shape[:2]
    mask = torch.zeros(nW, N, N, dtype=torch.bool)
    for w in range(nW):
        for a in range(N):
            for b in range(N):
                (ra, ca), (rb, cb) = windows[w, a].tolist(), windows[w, b].tolist()
                same_row = (ra - s) // M == (rb - s) // M
                same_col = (ca - s) // M == (cb - s) // M
                mask[w, a, b] = same_row and same_col
    return mask


@pytest.mark.parametrize("H, W, M, s", [(8, 8, 4, 2), (12, 8, 4, 1), (6, 9, 3, 1)])
def test_shifted_window_mask_keeps_the_shifted_partition(H, W, M, s):
    assert torch.equal(shifted_window_mask(H, W, M, s), _brute_force_mask(H, W, M, s))


def test_only_the_windows_that_wrap_are_masked():
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask[0].all()  # the top-left window did not wrap
    assert mask.sum(dim=(1, 2)).tolist() == [256, 128, 128, 64]  # 1, 2, 2, 4 regions


def _padded_shifted_attention(attn: WindowAttention, x: torch.Tensor, s: int):
    """Shifted-window attention the naive way (the chapter's exercise "Why roll?"):
    pad the grid by M - s at the top and left and by s at the bottom and right, so
    that the shifted partition's pieces, cut short at the edges, become full windows;
    padded tokens never serve as keys. No roll, no region ids."""
    B, H, W, C = x.shape
    M = attn.window_size
    padded = torch.nn.functional.pad(x, (0, 0, M - s, s, M - s, s))
    real = torch.nn.functional.pad(torch.ones(1, H, W, 1), (0, 0, M - s, s, M - s, s))
    keys = window_partition(real, M)[..., 0].bool()  # (nW, N): the real tokens
    mask = keys[:, None, :].expand(-1, M * M, -1)  # (nW, N, N): any query, real keys
    out = window_reverse(attn(window_partition(padded, M), mask), M, H + M, W + M)
    return out[:, M - s : M - s + H, M - s : M - s + W]


@pytest.mark.parametrize("H, W, M, s", [(8, 8, 4, 2), (12, 8, 4, 1), (6, 9, 3, 1)])
def test_roll_and_mask_equal_shifted_windows_padded_to_full_size(H, W, M, s):
    torch.manual_seed(H + W)
    block = SwinBlock(6, 2, window_size=M, shift_size=s).double()
    _perturb(block, 9)  # the bias table too: offsets must survive the roll
    x = torch.randn(2, H * W, 6, dtype=torch.float64)
    with torch.no_grad():
        z = block.norm1(x).view(2, H, W, 6)
        z_hat = x + _padded_shifted_attention(block.attn, z, s).reshape(2, H * W, 6)
        expected = z_hat + block.mlp(block.norm2(z_hat))
        torch.testing.assert_close(block(x, H, W), expected, **F64)
    # the naive way computes (H / M + 1) (W / M + 1) windows, the roll H W / M^2
    assert window_partition(torch.zeros(1, H + M, W + M, 1), M).shape[0] == (
        (H // M + 1) * (W // M + 1)
    )


# ---------------------------------------------------------------- parts against HF


def test_patch_merging_equals_hugging_face_on_odd_grids():
    torch.manual_seed(0)
    hf = SwinPatchMerging(dim=6).double()
    _perturb(hf, 1)
    ours = PatchMerging(6).double()
    ours.load_state_dict(hf.state_dict(), strict=True)
    for H, W in ((4, 6), (5, 7)):
        x = torch.randn(2, H * W, 6, dtype=torch.float64)
        torch.testing.assert_close(ours(x, H, W), hf(x, (H, W)), **F64)


@pytest.mark.parametrize("H, W, shift", [(8, 8, 0), (8, 8, 2), (10, 7, 2), (4, 6, 2)])
def test_swin_block_equals_hugging_faces_layer(H, W, shift):
    """Shifted or not, padded (10 x 7 with windows of 4), and a grid one window
    high, where the shift is switched off."""
    torch.manual_seed(2)
    config = _hf_config(embed_dim=8, window_size=4)
    # scaled_dot_product_attention, as in a SwinModel: HF's eager path takes the
    # softmax in float32 even for float64 inputs
    config._attn_implementation = "sdpa"
    hf = SwinLayer(
        config, dim=8, input_resolution=(H, W), num_heads=2, shift_size=shift
    )
    hf = hf.double().eval()
    _perturb(hf, 3)
    ours = SwinBlock(8, 2, window_size=4, shift_size=shift).double()
    # the table's patterns start with the dot of the enclosing module's name
    renamed = swin_from_hf_state_dict({"." + k: v for k, v in hf.state_dict().items()})
    ours.load_state_dict({k[1:]: v for k, v in renamed.items()}, strict=True)
    x = torch.randn(3, H * W, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = hf(x, (H, W))[0]
        torch.testing.assert_close(ours(x, H, W), expected, **F64)


def test_window_attention_with_one_window_and_no_bias_is_multi_head_attention():
    torch.manual_seed(4)
    ours = WindowAttention(12, 3, window_size=3).double()
    with torch.no_grad():
        ours.relative_position_bias_table.zero_()
    plain = MultiHeadAttention(12, 3).double()
    plain.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), plain(x)[0], **F64)


# ---------------------------------------------------------------- whole models


def _pair() -> tuple[SwinModel, SwinTransformer]:
    """A fresh pair for every image size: HF's layers switch their shift off for
    good the first time they see a grid no larger than a window."""
    torch.manual_seed(5)
    config = _hf_config()
    hf = SwinModel(config).double().eval()
    _perturb(hf, 6)
    ours = _ours(config).eval()
    ours.load_state_dict(swin_from_hf_state_dict(hf.state_dict()), strict=True)
    return hf, ours


# 32 px: grids 16 and 8 (two windows of 4); 16 px: the last grid is one window, so
# its blocks do not shift; 28 px: grids 14 and 7, padded to 16 and 8; 22 px: the
# image itself padded to a multiple of the patch
@pytest.mark.parametrize("size", [32, 16, 28, 22])
def test_swin_equals_hugging_faces_swin_model(size):
    hf, ours = _pair()
    torch.manual_seed(size)
    images = torch.randn(2, 1, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected = hf(images)
        tokens, pooled = ours.features(images)
        torch.testing.assert_close(tokens, expected.last_hidden_state, **F64)
        torch.testing.assert_close(pooled, expected.pooler_output, **F64)
        torch.testing.assert_close(ours(images), expected.pooler_output, **F64)


def test_gradients_equal_hugging_faces():
    hf, ours = _pair()
    images = torch.randn(1, 1, 28, 28, dtype=torch.float64)
    hf.zero_grad()
    ours.zero_grad()
    hf(images).pooler_output.square().sum().backward()
    ours(images).square().sum().backward()
    renamed = swin_from_hf_state_dict(
        {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}
    )
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, renamed[name], atol=1e-10, rtol=1e-10)


def test_the_classifier_equals_hugging_faces_image_classification():
    torch.manual_seed(7)
    config = _hf_config(num_labels=5, num_channels=3)
    hf = SwinForImageClassification(config).double().eval()
    _perturb(hf, 8)
    ours = _ours(config, n_classes=5).eval()
    ours.load_state_dict(swin_from_hf_state_dict(hf.state_dict()), strict=True)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), hf(images).logits, **F64)


def test_parameter_counts_equal_hugging_faces_and_the_papers():
    published = {"swin-t": 28, "swin-s": 50, "swin-b": 88, "swin-l": 197}  # Table 1
    with torch.device("meta"):
        for name, c in CONFIGS.items():
            ours = sum(p.numel() for p in SwinTransformer(c).parameters())
            assert round(ours / 1e6) == published[name]
        hf = SwinForImageClassification(HFSwinConfig(num_labels=1000))  # Swin-T
        swin_t = SwinTransformer(CONFIGS["swin-t"])
    assert sum(p.numel() for p in swin_t.parameters()) == sum(
        p.numel() for p in hf.parameters()
    )


# ---------------------------------------------------------------- cost


def test_the_counted_cost_is_the_papers_formula():
    C, h, M = 16, 2, 4
    with torch.device("meta"):
        window, whole = WindowAttention(C, h, M), MultiHeadAttention(C, h)
    for side in (4, 8, 12):
        x = torch.empty(1, side, side, C, device="meta")
        tokens = x.view(1, side * side, C)
        counted_w = multiply_adds(lambda x=x: window(window_partition(x, M)))
        counted_g = multiply_adds(lambda tokens=tokens: whole(tokens))
        assert counted_w == attention_cost(side * side, C, M)
        assert counted_g == attention_cost(side * side, C)
    # a single linear layer: d_in * d_out multiply-adds per row
    layer = torch.nn.Linear(5, 7)
    assert multiply_adds(lambda: layer(torch.randn(3, 5))) == 3 * 5 * 7


def test_swin_t_costs_the_papers_four_and_a_half_billion_multiply_adds():
    with torch.device("meta"):
        model = SwinTransformer(CONFIGS["swin-t"])
        macs = multiply_adds(lambda: model(torch.empty(1, 3, 224, 224)))
    assert abs(macs / 1e9 - 4.5) < 0.05  # Liu et al. (2021), Table 1: 4.5G FLOPs


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="divisible by window_size=4"):
        window_partition(torch.zeros(1, 6, 8, 2), 4)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        window_partition(torch.zeros(6, 8, 2), 2)
    with pytest.raises(ValueError, match="must be divisible by window_size=4"):
        window_reverse(torch.zeros(4, 16, 2), 4, 6, 8)
    with pytest.raises(
        ValueError, match=r"windows \(3, 16, 2\) must be \(B \* 2, 16, C\)"
    ):
        window_reverse(torch.zeros(3, 16, 2), 4, 4, 8)
    model = SwinTransformer(SwinConfig(8, (2, 2), (2, 4), 4, 2, 1, n_classes=3))
    with pytest.raises(ValueError, match="images must have 4 dimensions"):
        model(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match=r"images must be \(B, 1, H, W\)"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(TypeError, match="images must be a floating-point"):
        model.features(torch.zeros(1, 1, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="same length"):
        SwinConfig(8, (2, 2), (2,))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        SwinConfig(8, (2, 2), (3, 4))
    with pytest.raises(ValueError, match="n_classes must be >= 0"):
        SwinConfig(n_classes=-1)
    with pytest.raises(TypeError, match="config must be a SwinConfig"):
        SwinTransformer({"embed_dim": 8})
    with pytest.raises(ValueError, match="shift_size must be in"):
        SwinBlock(8, 2, window_size=4, shift_size=4)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        swin_from_hf_state_dict([("a", torch.zeros(1))])
    with pytest.raises(ValueError, match="tokens must be positive"):
        attention_cost(0, 8)
    with pytest.raises(TypeError, match="fn must be callable"):
        multiply_adds(3)
