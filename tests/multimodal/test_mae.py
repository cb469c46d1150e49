"""Tests for ``dlabc.multimodal.mae``.

The whole model (loss, predicted pixels, mask, ``ids_restore``), with and without
per-patch normalised targets, and its gradients, against Hugging Face's
``ViTMAEForPreTraining`` (random weights, every parameter moved off its initial value,
copied through the renaming table with a strict load, float64, the same noise); the
position embeddings against HF's own ``initialize_weights`` (the sin-cos table its
pre-trained checkpoints use); the masking against a loop over the samples; the pixel
order and ``unpatchify`` against HF's ``patchify`` / ``unpatchify``; the encoder after
training against the ViT chapter's ``ViT.features``; bad input.
"""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging

from dlabc.multimodal.mae import (
    MAE,
    MAEConfig,
    _pixel_targets,
    mae_from_hf_state_dict,
    random_masking,
    sincos_position_embedding,
    train_mae,
    unpatchify,
)
from transformers import ViTMAEConfig, ViTMAEForPreTraining

logging.set_verbosity_error()
SIZES = dict(image_size=12, patch_size=4, mask_ratio=0.75)
OURS = MAEConfig(
    in_channels=2,
    d_model=16,
    n_layers=2,
    n_heads=4,
    d_mlp=24,
    decoder_d_model=12,
    decoder_n_layers=2,
    decoder_n_heads=3,
    decoder_d_mlp=20,
    **SIZES,
)


def _hf(norm_pix_loss: bool) -> ViTMAEForPreTraining:
    config = ViTMAEConfig(
        num_channels=2,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        decoder_hidden_size=12,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=3,
        decoder_intermediate_size=20,
        norm_pix_loss=norm_pix_loss,
        **SIZES,
    )
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(config)
    with torch.no_grad():
        for p in model.parameters():  # no norm scale left at 1, no bias at 0
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_equals_hf_vitmae_for_pretraining(norm_pix_loss):
    hf = _hf(norm_pix_loss)
    config = MAEConfig(**{**OURS.__dict__, "norm_pix_loss": norm_pix_loss})
    ours = MAE(config).double().eval()
    ours.load_state_dict(mae_from_hf_state_dict(hf.state_dict()), strict=True)
    x = torch.randn(5, 2, 12, 12, dtype=torch.float64, requires_grad=True)
    noise = torch.rand(5, 9, dtype=torch.float64)
    theirs, mine = hf(x, noise=noise), ours(x, noise)
    torch.testing.assert_close(mine.loss, theirs.loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mine.pred, theirs.logits, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mine.mask, theirs.mask.double())
    assert torch.equal(mine.ids_restore, theirs.ids_restore)
    assert mine.mask.sum(1).tolist() == [9 - config.n_keep] * 5
    (g_theirs,) = torch.autograd.grad(theirs.loss, x)
    (g_mine,) = torch.autograd.grad(mine.loss, x)
    torch.testing.assert_close(g_mine, g_theirs, atol=1e-12, rtol=1e-12)


def test_position_embeddings_equal_hf_initialisation():
    hf = _hf(False)
    embeddings = hf.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    embeddings.initialize_weights()  # HF's sin-cos table (zero in a bare model)
    hf.decoder.initialize_weights(9)
    torch.testing.assert_close(
        sincos_position_embedding(3, 16), embeddings.position_embeddings[0].float()
    )
    torch.testing.assert_close(
        sincos_position_embedding(3, 12), hf.decoder.decoder_pos_embed[0].float()
    )
    ours = MAE(OURS)
    assert not ours.encoder.pos_embedding.requires_grad
    assert not ours.decoder_pos_embed.requires_grad


def test_position_embedding_closed_form():
    pe = sincos_position_embedding(5, 8)  # d/4 = 2 frequencies: 1 and 1/100
    row, col = 3, 4  # patch 3 * 5 + 4 = 19, row 3, column 4
    expected = []
    for t in (col, row):
        expected += [torch.sin(torch.tensor(t * w)) for w in (1.0, 0.01)]
        expected += [torch.cos(torch.tensor(t * w)) for w in (1.0, 0.01)]
    torch.testing.assert_close(pe[1 + 19], torch.stack(expected))
    assert torch.equal(pe[0], torch.zeros(8))


def test_random_masking_equals_a_loop():
    torch.manual_seed(1)
    x, noise = torch.randn(4, 10, 3), torch.rand(4, 10)
    visible, mask, ids_restore = random_masking(x, 3, noise)
    for b in range(4):
        keep = sorted(range(10), key=lambda i: noise[b, i].item())[:3]
        torch.testing.assert_close(visible[b], x[b, keep])
        hidden = [0.0 if i in keep else 1.0 for i in range(10)]
        assert mask[b].tolist() == hidden
        shuffled = torch.cat([x[b, keep], torch.zeros(7, 3)])  # hidden ones blanked
        order = noise[b].argsort()
        restored = shuffled[ids_restore[b]]
        torch.testing.assert_close(restored[keep], x[b, keep])
        assert torch.equal(order[ids_restore[b]], torch.arange(10))


def test_pixel_order_and_unpatchify_equal_hf():
    hf = _hf(False)
    x = torch.randn(3, 2, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(_pixel_targets(x, 4), hf.patchify(x))
    patches = torch.randn(3, 9, 32)
    torch.testing.assert_close(
        unpatchify(patches, 4, 2), hf.unpatchify(patches, (12, 12))
    )
    torch.testing.assert_close(unpatchify(_pixel_targets(x, 4), 4, 2), x)


def test_training_lowers_the_loss_and_the_encoder_is_a_vit():
    torch.manual_seed(2)
    images = torch.randn(64, 2, 12, 12)
    model, history = train_mae(images, OURS, 10, batch_size=32, lr=1e-2, warmup=1)
    assert len(history.step_loss) == 10
    assert sum(history.step_loss[-3:]) < sum(history.step_loss[:3]) - 0.3
    # with nothing hidden (mask_ratio 0) and the identity order, the MAE's encoder
    # output is ViT.features of the same weights on the whole image
    full = MAE(MAEConfig(**{**OURS.__dict__, "mask_ratio": 0.0}))
    full.load_state_dict(model.state_dict())
    noise = torch.arange(9.0).expand(4, 9)
    latent, mask, _ = full.forward_encoder(images[:4], noise)
    features, _ = model.encoder.features(images[:4])
    torch.testing.assert_close(latent, features)
    assert mask.sum() == 0


def test_bad_input_is_rejected():
    model = MAE(OURS)
    with pytest.raises(ValueError, match=r"images must be \(B, 2, 12, 12\)"):
        model(torch.zeros(2, 1, 12, 12))
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        model(torch.zeros(2, 2, 12, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"noise must be \(B, N\) = \(2, 9\)"):
        model(torch.zeros(2, 2, 12, 12), torch.rand(2, 8))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        MAEConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_d_model=30 must be divisible by 4"):
        MAEConfig(decoder_d_model=30, decoder_n_heads=3)
    with pytest.raises(ValueError, match="patch_size=5 must divide image_size=12"):
        MAEConfig(image_size=12, patch_size=5)
    with pytest.raises(TypeError, match="config must be a MAEConfig"):
        MAE({"d_model": 16})
    with pytest.raises(ValueError, match="n_keep=11 exceeds the 10 tokens"):
        random_masking(torch.zeros(2, 10, 3), 11)
    with pytest.raises(ValueError, match="dim must be divisible by 4"):
        sincos_position_embedding(3, 6)
    with pytest.raises(ValueError, match=r"patches must be \(B, g\^2, 16\)"):
        unpatchify(torch.zeros(1, 8, 16), 4, 1)
    with pytest.raises(ValueError, match="unexpected keys"):
        mae_from_hf_state_dict({"head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"lr must be in \(0, inf\)"):
        train_mae(torch.zeros(4, 2, 12, 12), OURS, 1, lr=0.0)
