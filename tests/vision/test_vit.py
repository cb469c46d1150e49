"""Tests for ``dlabc.vision.vit``.

``patchify`` is compared with patches cut one by one; the patch embedding with that
brute force followed by a plain matrix product (the "cut, flatten, one linear layer" the
chapter states); the whole model, its token features and its attention weights (to float32's rounding:
HF's eager attention takes its softmax in float32) with
Hugging Face's ``ViTForImageClassification`` and ``ViTModel`` (random weights, every
norm scale and bias moved off its initial value, copied through the renaming table with
a strict load), in float64, and its gradients with HF's; the parameter counts with HF's
models built on the meta device and with the published 86 M of ViT-B/16; the
position-embedding similarity with ``F.cosine_similarity`` pair by pair.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.utils import logging

from dlabc.vision.vit import (
    CONFIGS,
    HF_RENAMES,
    PatchEmbedding,
    ViT,
    ViTConfig,
    from_hf_state_dict,
    patchify,
    position_similarity,
    vit_parameter_count,
)
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification, ViTModel

logging.set_verbosity_error()
F64 = dict(atol=1e-10, rtol=1e-10)
SIZES = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    image_size=12,
    patch_size=4,
    num_channels=2,
)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():  # no norm scale left at 1, no bias at 0
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def _ours(n_classes: int) -> ViT:
    config = ViTConfig(
        image_size=12,
        patch_size=4,
        in_channels=2,
        d_model=16,
        n_layers=2,
        n_heads=4,
        d_mlp=24,
        n_classes=n_classes,
    )
    return ViT(config).double().eval()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = _perturbed(ViTForImageClassification(HFViTConfig(**SIZES, num_labels=5)))
    ours = _ours(5)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    return hf, ours


def test_patchify_cuts_patches_in_reading_order():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    k = 0
    for row in range(2):
        for col in range(3):
            expected = images[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            torch.testing.assert_close(patches[:, k], expected.reshape(2, -1), **F64)
            k += 1


def test_patch_embedding_is_cut_flatten_and_one_linear_map():
    torch.manual_seed(2)
    embed = PatchEmbedding(in_channels=3, d_model=5, patch_size=4).double()
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    E = embed.projection.weight.reshape(5, -1).T  # (C P^2, d)
    expected = patchify(images, 4) @ E + embed.projection.bias
    torch.testing.assert_close(embed(images), expected, **F64)


def test_the_classifier_equals_hf(pair):
    hf, ours = pair
    images = torch.randn(3, 2, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), hf(images).logits, **F64)
        _, attentions = ours.features(images)
        hf.set_attn_implementation("eager")  # the path that returns the weights
        try:
            expected = hf(images, output_attentions=True).attentions
        finally:
            hf.set_attn_implementation("sdpa")
    assert len(attentions) == 2 == len(expected)
    for mine, theirs in zip(attentions, expected, strict=True):
        assert mine.shape == (3, 4, 10, 10)
        # HF's eager softmax is computed in float32, even for a float64 model
        torch.testing.assert_close(mine, theirs, atol=1e-7, rtol=1e-6)


def test_the_features_equal_vit_model_and_the_pooler_is_dropped():
    torch.manual_seed(3)
    hf = _perturbed(ViTModel(HFViTConfig(**SIZES)))  # with its pooler
    state = hf.state_dict()
    assert any(k.startswith("pooler.") for k in state)
    ours = _ours(0)
    ours.load_state_dict(from_hf_state_dict(state), strict=True)
    images = torch.randn(2, 2, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = hf(images).last_hidden_state  # (B, 1 + N, d)
        tokens, _ = ours.features(images)
        torch.testing.assert_close(tokens, expected, **F64)
        torch.testing.assert_close(ours(images), expected[:, 0], **F64)


def test_gradients_equal_hf(pair):
    hf, ours = pair
    images = torch.randn(2, 2, 12, 12, dtype=torch.float64)
    for model in (hf, ours):
        model.zero_grad()
    hf(images).logits.logsumexp(-1).sum().backward()
    ours(images).logsumexp(-1).sum().backward()
    names = dict(from_hf_state_dict({k: k for k, _ in hf.named_parameters()}))
    theirs = dict(hf.named_parameters())
    for ours_name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[names[ours_name]].grad, **F64)
    for model in (hf, ours):
        model.zero_grad()


def test_the_renaming_table_maps_every_name_once(pair):
    hf, ours = pair
    state = hf.state_dict()
    renamed = from_hf_state_dict(state)
    assert len(renamed) == len(state)  # no two HF names collapse into one of ours
    assert set(renamed) == set(ours.state_dict())
    assert all(old != new for old, new in HF_RENAMES)


@pytest.mark.parametrize("n_classes", [0, 7])
def test_the_parameter_count_is_hf_count(n_classes):
    config = ViTConfig(
        image_size=20, patch_size=5, in_channels=3, d_model=12, n_layers=3,
        n_heads=3, d_mlp=20, n_classes=n_classes,
    )  # fmt: skip
    hf_config = HFViTConfig(
        hidden_size=12, num_hidden_layers=3, num_attention_heads=3,
        intermediate_size=20, image_size=20, patch_size=5, num_labels=max(n_classes, 1),
    )  # fmt: skip
    if n_classes:
        hf = ViTForImageClassification(hf_config)
    else:
        hf = ViTModel(hf_config, add_pooling_layer=False)
    expected = sum(p.numel() for p in hf.parameters())
    assert vit_parameter_count(config) == expected
    assert sum(p.numel() for p in ViT(config).parameters()) == expected


def test_vit_b16_has_the_published_86_million_parameters():
    config = CONFIGS["ViT-B/16"]
    with torch.device("meta"):
        ours = sum(p.numel() for p in ViT(config).parameters())
        hf = ViTForImageClassification(HFViTConfig(num_labels=1000))
        theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs == vit_parameter_count(config)
    assert 86e6 < ours < 87e6  # Table 1 of Dosovitskiy et al. (2021): 86 M
    assert config.n_patches == 196
    sizes = [vit_parameter_count(c) for c in CONFIGS.values()]
    assert sizes == sorted(sizes)  # Ti < S < B < L < H
    assert 300e6 < vit_parameter_count(CONFIGS["ViT-L/16"]) < 310e6  # 307 M


def test_position_similarity_is_the_cosine_of_every_pair():
    torch.manual_seed(4)
    pos = torch.randn(1, 1 + 9, 6, dtype=torch.float64)
    grid = position_similarity(pos)
    assert grid.shape == (3, 3, 3, 3)
    for a in range(9):
        for b in range(9):
            expected = F.cosine_similarity(pos[0, 1 + a], pos[0, 1 + b], dim=0)
            torch.testing.assert_close(grid[a // 3, a % 3, b // 3, b % 3], expected)


def test_bad_input_gets_clear_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="patch_size=5 must divide image_size=12"):
        ViTConfig(image_size=12, patch_size=5)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ViTConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="d_mlp must be positive"):
        ViTConfig(d_mlp=0)
    with pytest.raises(ValueError, match="n_classes must be non-negative"):
        ViTConfig(n_classes=-1)
    with pytest.raises(TypeError, match="config must be a ViTConfig"):
        ViT({"d_model": 8})
    with pytest.raises(ValueError, match=r"images must be \(B, 2, 12, 12\)"):
        ours(torch.randn(1, 3, 12, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="images must have 4 dimensions"):
        ours(torch.randn(2, 12, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="must divide the image size"):
        patchify(torch.randn(1, 1, 8, 10), 4)
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        ours(torch.zeros(1, 2, 12, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="1 \\+ a square number"):
        position_similarity(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match=r"pos_embedding must be \(1 \+ N, d\)"):
        position_similarity(torch.randn(2, 10, 4))
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        from_hf_state_dict([])
    with pytest.raises(TypeError, match="config must be a ViTConfig"):
        vit_parameter_count(None)
