"""SegFormer against Hugging Face's ``SegformerForSemanticSegmentation`` with the same
weights, the sequence reduction against the paper's reshape-and-linear, the sizes
against the paper's parameter counts, and bad input."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dlabc.vision.segformer import (
    CONFIGS,
    HF_RENAMES,
    EfficientSelfAttention,
    OverlapPatchEmbed,
    SegFormer,
    SegFormerConfig,
    coarse_truth,
    segformer_from_hf_state_dict,
    segmentation_loss,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
# the model's module is imported on first use: import it here, with transformers
SegformerForSemanticSegmentation = transformers.SegformerForSemanticSegmentation

TINY = SegFormerConfig(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 2, 1, 1),
    n_heads=(1, 2, 3, 4),
    decoder_width=16,
    n_classes=4,
    in_channels=1,
)


def hf_config(config: SegFormerConfig, **extra):
    return transformers.SegformerConfig(
        num_channels=config.in_channels,
        hidden_sizes=list(config.hidden_sizes),
        depths=list(config.depths),
        num_attention_heads=list(config.n_heads),
        sr_ratios=list(config.sr_ratios),
        patch_sizes=list(config.patch_sizes),
        strides=list(config.strides),
        mlp_ratios=[config.mlp_ratio] * len(config.hidden_sizes),
        decoder_hidden_size=config.decoder_width,
        num_labels=config.n_classes,
        **extra,
    )


def pair(config: SegFormerConfig = TINY, **extra):
    """HF's model with every weight and BatchNorm statistic moved off its initial
    value, and ours with the renamed weights, both float64."""
    torch.manual_seed(0)
    reference = SegformerForSemanticSegmentation(hf_config(config, **extra))
    reference = reference.double()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, buffer in reference.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    ours = SegFormer(config).double()
    ours.load_state_dict(segformer_from_hf_state_dict(reference.state_dict()))
    return reference.eval(), ours.eval()


@pytest.mark.parametrize("size", [(64, 48), (50, 37)])
def test_logits_equal_huggingface(size):
    reference, ours = pair()
    x = torch.randn(2, 1, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x).logits
        got = ours(x)
    assert got.shape == expected.shape == (2, 4, math.ceil(size[0] / 4), *got.shape[3:])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_a_first_stride_of_two_equals_huggingface():
    """The chapter's experiment: 7 x 7 patches every 2 pixels, logits at 1/2 size."""
    config = dataclasses.replace(TINY, strides=(2, 2, 2, 2), sr_ratios=(2, 2, 1, 1))
    reference, ours = pair(config)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x).logits
        got = ours(x)
    assert got.shape == expected.shape == (2, 4, 16, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_stage_maps_equal_huggingface_hidden_states():
    reference, ours = pair()
    x = torch.randn(1, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = reference.segformer(x, output_hidden_states=True).hidden_states
        got = ours.encoder(x)
    assert [tuple(f.shape[-2:]) for f in got] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_loss_and_gradients_equal_huggingface_in_training_mode():
    reference, ours = pair(classifier_dropout_prob=0.0, drop_path_rate=0.0)
    ours = SegFormer(dataclasses.replace(TINY, dropout=0.0)).double()
    ours.load_state_dict(segformer_from_hf_state_dict(reference.state_dict()))
    reference.train(), ours.train()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    masks = torch.randint(0, 4, (2, 32, 32))
    expected = reference(x, labels=masks).loss
    got = segmentation_loss(ours(x), masks)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    expected.backward(), got.backward()
    grads = dict(ours.named_parameters())
    for name, p in reference.named_parameters():
        renamed = segformer_from_hf_state_dict({name: p})
        torch.testing.assert_close(
            grads[next(iter(renamed))].grad, p.grad, rtol=0, atol=1e-10
        )


def test_the_renaming_table_covers_every_name_once():
    reference, ours = pair()
    renamed = segformer_from_hf_state_dict(reference.state_dict())
    assert sorted(renamed) == sorted(ours.state_dict())
    assert all(isinstance(p, str) and isinstance(r, str) for p, r in HF_RENAMES)


def test_sequence_reduction_is_the_papers_reshape_and_linear():
    """Eq. (2) of the paper: groups of R = r^2 tokens reshaped to one token of C R
    features, then a linear map back to C: the r x r convolution with stride r."""
    torch.manual_seed(1)
    C, r, H, W = 6, 2, 4, 6
    attention = EfficientSelfAttention(C, 2, r, 1e-5).double()
    x = torch.randn(3, H * W, C, dtype=torch.float64)
    grid = x.view(3, H // r, r, W // r, r, C).permute(0, 1, 3, 2, 4, 5)
    reshaped = grid.reshape(3, H * W // r**2, r * r * C)  # (B, N / R, R C)
    weight = attention.sr.weight.permute(0, 2, 3, 1).reshape(C, r * r * C)
    expected = F.layer_norm(
        reshaped @ weight.T + attention.sr.bias,
        (C,),
        attention.sr_norm.weight,
        attention.sr_norm.bias,
        1e-5,
    )
    captured = {}
    attention.W_k.register_forward_hook(
        lambda module, inputs, output: captured.update(kv=inputs[0])
    )
    _, weights = attention(x, H, W)
    assert weights.shape == (3, 2, H * W, H * W // r**2)
    torch.testing.assert_close(captured["kv"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size,k,s", [(32, 7, 4), (33, 7, 4), (17, 3, 2)])
def test_overlapping_patches_give_ceil_of_size_over_stride(size, k, s):
    embed = OverlapPatchEmbed(2, 5, k, s, 1e-5)
    tokens, H, W = embed(torch.randn(1, 2, size, size + 1))
    assert (H, W) == (math.ceil(size / s), math.ceil((size + 1) / s))
    assert tokens.shape == (1, H * W, 5)


def test_configs_have_the_papers_sizes():
    """Xie et al. (2021), table 1: 3.8 M to 84.7 M parameters with the ADE20K head."""
    published = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            model = SegFormer(config)
        total = sum(p.numel() for p in model.parameters())
        assert round(total / 1e6, 1) == published[name], name
    with torch.device("meta"):
        reference = SegformerForSemanticSegmentation(hf_config(CONFIGS["b0"]))
        b0 = SegFormer(CONFIGS["b0"])
    count = sum(p.numel() for p in b0.encoder.parameters())
    assert count == sum(p.numel() for p in reference.segformer.parameters())
    assert 3.3e6 < count < 3.4e6  # MiT-B0, without the decoder


def test_segmentation_loss_is_cross_entropy_of_the_upsampled_logits():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    masks = torch.randint(0, 3, (2, 16, 16))
    A = interpolation_matrix(16, 4)  # the 1-D bilinear weights, 4 -> 16
    up = torch.einsum("ih,bkhw,jw->bkij", A, logits, A)
    log_p = up.log_softmax(1).gather(1, masks[:, None])
    torch.testing.assert_close(
        segmentation_loss(logits, masks), -log_p.mean(), rtol=0, atol=1e-12
    )


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="depths must be a tuple with one entry"):
        SegFormerConfig(depths=(2, 2, 2))
    with pytest.raises(ValueError, match="divisible by n_heads"):
        SegFormerConfig(n_heads=(3, 2, 5, 8))
    with pytest.raises(ValueError, match="n_classes must be at least 2"):
        SegFormerConfig(n_classes=1)
    with pytest.raises(ValueError, match="dropout must be in"):
        SegFormerConfig(dropout=1.0)
    with pytest.raises(TypeError, match="config must be a SegFormerConfig"):
        SegFormer({"hidden_sizes": (8,)})
    model = SegFormer(TINY)
    with pytest.raises(ValueError, match="x must have 1 channels"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        model(torch.randn(1, 32, 32))
    with pytest.raises(TypeError, match="masks must have dtype torch.int64"):
        segmentation_loss(torch.randn(1, 4, 8, 8), torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="same batch size"):
        segmentation_loss(torch.randn(2, 4, 8, 8), torch.zeros(1, 32, 32).long())
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        segformer_from_hf_state_dict([("a", torch.zeros(1))])


def interpolation_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """PyTorch's 1-D bilinear weights (align_corners=False), written out."""
    coords = (torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5
    coords = coords.clamp(0, n_in - 1)
    lo = coords.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    t = coords - lo
    A = torch.zeros(n_out, n_in, dtype=torch.float64)
    A[torch.arange(n_out), lo] += 1 - t
    A[torch.arange(n_out), hi] += t
    return A


def test_coarse_truth_by_hand():
    torch.manual_seed(3)
    masks = torch.randint(0, 3, (2, 8, 12))
    assert torch.equal(coarse_truth(masks, 3, factor=1), masks)
    one_hot = F.one_hot(masks, 3).double()  # (B, H, W, K)
    shares = one_hot.view(2, 2, 4, 3, 4, 3).mean((2, 4))  # (B, H/4, W/4, K)
    up = torch.einsum(
        "ih,bhwk,jw->bkij",
        interpolation_matrix(8, 2),
        shares,
        interpolation_matrix(12, 3),
    )
    assert torch.equal(coarse_truth(masks, 3), up.argmax(1))
    with pytest.raises(ValueError, match="divide by factor=4"):
        coarse_truth(masks[:, :6], 3)
