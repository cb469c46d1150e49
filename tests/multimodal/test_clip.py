"""Tests for ``dlabc.multimodal.clip``.

The whole model against Hugging Face's ``CLIPModel`` with copied weights (logits both
ways and the loss, in double and single precision, with padded captions and an
attention mask on Hugging Face's side); each tower and one layer against Hugging Face's
``CLIPVisionModel``, ``CLIPTextModel`` and ``CLIPEncoderLayer``; ``quick_gelu`` against
``transformers``' activation; the loss against Hugging Face's loss function and a loop
over rows and columns; recall@k against a brute-force count; the tokenizer and the
caption generator against hand-made examples; the training loop's temperature clip.
Bad input for every public entry point.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.clip import modeling_clip

import transformers
from dlabc.multimodal.clip import (
    CLIP,
    CLIPConfig,
    EncoderLayer,
    WordTokenizer,
    caption_pairs,
    clip_loss,
    from_hf_state_dict,
    quick_gelu,
    recall_at_k,
    to_hf_config,
    train_clip,
)

TINY = CLIPConfig(
    image_size=8,
    patch_size=4,
    vision_width=16,
    vision_heads=2,
    vocab_size=20,
    context_length=7,
    text_width=16,
    text_heads=2,
    eos_id=19,
    embed_dim=8,
    vision_layers=1,
    text_layers=2,
)


@pytest.fixture(scope="module")
def pair():
    """A random Hugging Face CLIPModel and our CLIP with its weights."""
    torch.manual_seed(0)
    hf = transformers.CLIPModel(to_hf_config(TINY)).eval()
    ours = CLIP(TINY).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    return hf, ours


def batch(n=5, dtype=torch.float32):
    """Images, and captions padded with 0 after their end-of-text token."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    tokens = torch.randint(2, 19, (n, 7), generator=g)
    lengths = torch.tensor([2, 7, 4, 3, 6][:n])
    tokens[torch.arange(7) >= lengths[:, None]] = 0  # padding
    tokens[torch.arange(n), lengths - 1] = TINY.eos_id
    mask = (torch.arange(7) < lengths[:, None]).long()
    return images, tokens, mask


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_model_equals_hugging_face(pair, dtype, tol):
    hf, ours = pair
    hf, ours = hf.to(dtype), ours.to(dtype)
    images, tokens, mask = batch(dtype=dtype)
    with torch.no_grad():
        out = hf(
            input_ids=tokens, attention_mask=mask, pixel_values=images, return_loss=True
        )
        per_image, per_text = ours(images, tokens)
        loss = clip_loss(per_image)
    torch.testing.assert_close(per_image, out.logits_per_image, atol=tol, rtol=0)
    torch.testing.assert_close(per_text, out.logits_per_text, atol=tol, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=tol, rtol=0)
    hf.float(), ours.float()


def test_towers_and_layer_equal_hugging_face(pair):
    hf, ours = pair
    images, tokens, mask = batch()
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=images).pooler_output
        text = hf.text_model(input_ids=tokens, attention_mask=mask).pooler_output
        torch.testing.assert_close(ours.vision(images), vision)
        torch.testing.assert_close(ours.text(tokens), text)
        hf_layer = hf.vision_model.encoder.layers[0]
        z = torch.randn(3, 5, 16)
        torch.testing.assert_close(
            ours.vision.layers[0](z), hf_layer(z, attention_mask=None)
        )
    assert isinstance(ours.vision.layers[0], EncoderLayer)


def test_initial_scale_is_one_over_0_07(pair):
    _, ours = pair
    assert ours.logit_scale.exp().item() == pytest.approx(1 / 0.07)


def test_quick_gelu_is_transformers():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(quick_gelu(x), ACT2FN["quick_gelu"](x))


def test_loss_equals_hugging_face_and_a_loop():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    # Hugging Face's loss takes logits_per_text, the transpose
    reference = modeling_clip.image_text_contrastive_loss(logits.T)
    torch.testing.assert_close(clip_loss(logits), reference)
    rows = [logits[k, k] - torch.logsumexp(logits[k], 0) for k in range(6)]
    cols = [logits[k, k] - torch.logsumexp(logits[:, k], 0) for k in range(6)]
    loop = -(sum(rows) + sum(cols)) / 12
    torch.testing.assert_close(clip_loss(logits), loop)
    assert clip_loss(torch.zeros(4, 4)).item() == pytest.approx(math.log(4))


def test_recall_at_k_counts_by_brute_force():
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(9, 12, generator=g)
    relevant = torch.rand(9, 12, generator=g) < 0.2
    for k in (1, 3, 12):
        hits = 0
        for q in range(9):
            order = sorted(range(12), key=lambda j: -sim[q, j].item())[:k]
            hits += any(relevant[q, j].item() for j in order)
        assert recall_at_k(sim, relevant, k).item() == pytest.approx(hits / 9)


def test_tokenizer():
    tok = WordTokenizer(["a dark bag", "a bag , small"], context_length=6)
    assert tok.words == ["<pad>", "<sot>", ",", "a", "bag", "dark", "small", "<eos>"]
    ids = tok(["a bag", "dark bag , small"])
    assert ids.tolist() == [[1, 3, 4, 7, 0, 0], [1, 5, 4, 2, 6, 7]]
    assert tok.vocab_size == 8 and tok.eos_id == 7
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok(["a red bag"])
    with pytest.raises(ValueError, match="context_length"):
        tok(["a a a a a"])
    with pytest.raises(TypeError, match="not one string"):
        tok("a bag")
    with pytest.raises(TypeError, match="sequence of strings"):
        WordTokenizer([1, 2])


def test_caption_pairs_reads_the_pixels():
    images = np.zeros((3, 10, 10), dtype=np.float32)
    images[0, :2, :] = 0.3  # 20 % covered, dim: small, dark
    images[1, :, :] = 0.6  # all covered, mid: large, grey
    images[2, :6, :] = 0.9  # 60 % covered, bright: large, bright
    labels = np.array([1, 0, 1])
    names = [["zero"], ["one"]]
    captions, attributes = caption_pairs(images, labels, names, ["{s} {b} {c}"])
    assert captions == ["small dark one", "large grey zero", "large bright one"]
    assert attributes.tolist() == [[1, 0, 0], [0, 1, 1], [1, 2, 1]]
    with pytest.raises(ValueError, match="images must be"):
        caption_pairs(images[0], labels, names, ["{c}"])
    with pytest.raises(ValueError, match="labels must be"):
        caption_pairs(images, labels[:2], names, ["{c}"])
    with pytest.raises(ValueError, match="names for every label"):
        caption_pairs(images, labels, names[:1], ["{c}"])


def test_training_lowers_the_loss_and_clips_the_temperature():
    torch.manual_seed(4)
    config = CLIPConfig(**{**TINY.__dict__, "logit_scale_init": math.log(150.0)})
    model = CLIP(config)
    images, tokens, _ = batch(4)
    losses, scales = train_clip(model, images, tokens, 12, batch_size=4, lr=3e-3)
    assert len(losses) == 12 and len(scales) == 13
    assert scales[0] == pytest.approx(150.0, rel=1e-5)
    assert max(scales[1:]) <= 100.0 + 1e-3  # clipped after every step
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert not model.training


def test_bad_input(pair):
    _, ours = pair
    images, tokens, _ = batch()
    with pytest.raises(ValueError, match="images must be"):
        ours.encode_image(torch.randn(2, 1, 9, 9))
    with pytest.raises(TypeError, match="floating-point"):
        ours.encode_image(images.long())
    with pytest.raises(TypeError, match="integer ids"):
        ours.encode_text(tokens.float())
    with pytest.raises(ValueError, match="context_length"):
        ours.encode_text(torch.full((2, 8), 19))
    with pytest.raises(ValueError, match="must hold eos_id"):
        ours.encode_text(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie"):
        ours.encode_text(torch.full((2, 5), 25))
    with pytest.raises(ValueError, match="must be square"):
        clip_loss(torch.randn(3, 4))
    with pytest.raises(ValueError, match="shape of similarity"):
        recall_at_k(torch.randn(3, 4), torch.ones(3, 3, dtype=torch.bool), 1)
    with pytest.raises(TypeError, match="dtype torch.bool"):
        recall_at_k(torch.randn(3, 4), torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="must divide"):
        CLIPConfig(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="divisible"):
        CLIPConfig(text_width=10, text_heads=3)
    with pytest.raises(ValueError, match="eos_id"):
        CLIPConfig(vocab_size=10, eos_id=10)
    with pytest.raises(TypeError, match="CLIPConfig"):
        CLIP({"image_size": 8})
    with pytest.raises(TypeError, match="CLIPConfig"):
        to_hf_config(None)
    with pytest.raises(TypeError, match="mapping"):
        from_hf_state_dict([1, 2])
    with pytest.raises(ValueError, match="2 images but 3"):
        train_clip(ours, images[:2], tokens[:3], 1)
    with pytest.raises(ValueError, match="steps must be positive"):
        train_clip(ours, images, tokens, 0)
