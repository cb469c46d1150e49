"""Tests for ``dlabc.vision.transfer``.

The real weights load with ``strict=True`` into the architecture written here, have
EfficientNet-lite0's published 4,652,008 parameters, and call the cat photograph a cat.
TensorFlow's "SAME" padding is compared with the rule TensorFlow's documentation
states (another formula) and, at stride 1, with PyTorch's own ``padding="same"``; the
depthwise convolution with one ``F.conv2d`` per channel; the MBConv block with the
same layers run by ``torch.nn`` (and with batch normalisation folded into the
convolutions); the class activation map with the logits it must average to; the
linear probe with scikit-learn's ``LogisticRegression`` on the same objective.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from dlabc.data import load_efficientnet_lite0, load_image, load_imagenet_classes
from dlabc.vision.transfer import (
    B0_BLOCKS,
    BlockArgs,
    Conv2dSame,
    EfficientNetLite,
    accuracy,
    class_activation_map,
    efficientnet_lite0,
    few_shot_subset,
    fine_tune,
    linear_probe,
    pooled_features,
    preprocess,
    recompute_batch_norm,
    same_padding,
    to_rgb,
    top_k,
)

F64 = dict(atol=1e-10, rtol=1e-10)
TINY = (BlockArgs(1, 3, 1, 8, 1), BlockArgs(2, 5, 2, 12, 2))
CAT_CLASSES = range(281, 286)  # tabby, tiger, Persian, Siamese, Egyptian cat


def _tiny(seed: int = 0, padding: str = "same") -> EfficientNetLite:
    torch.manual_seed(seed)
    model = EfficientNetLite(5, TINY, stem=8, head=16, padding=padding).double()
    with torch.no_grad():  # batch norm away from its initial identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite:
    return efficientnet_lite0(load_efficientnet_lite0())


# ---------------------------------------------------------------- the real weights


def test_the_weights_load_strictly_with_the_published_size(lite0):
    state = load_efficientnet_lite0()
    assert set(lite0.state_dict()) == set(state)  # load_state_dict(strict=True) too
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    assert len(lite0._blocks) == sum(b.repeats for b in B0_BLOCKS) == 16


def test_the_cat_photograph_is_a_cat(lite0):
    names = load_imagenet_classes()
    assert names[281] == "tabby cat" and names[285] == "Egyptian Mau"
    with torch.no_grad():
        logits = lite0(preprocess(load_image("chelsea", color=True)))[0]
    best = top_k(logits, names, 1)[0]
    assert names.index(best[0]) in CAT_CLASSES and best[1] > 0.2
    assert logits.softmax(-1)[CAT_CLASSES].sum() > 0.5


# ---------------------------------------------------------------- "SAME" padding


def _tf_documented_padding(n: int, k: int, s: int) -> int:
    # TensorFlow's documentation of SAME: the total, by the remainder of n / s
    return max(k - s, 0) if n % s == 0 else max(k - n % s, 0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_same_padding_is_tensorflows_rule(k, s):
    for n in range(1, 40):
        before, after = same_padding(n, k, s)
        assert before + after == _tf_documented_padding(n, k, s)
        assert after - before in (0, 1)  # the odd one at the bottom / right
        assert (n + before + after - k) // s + 1 == -(-n // s)  # ceil(n / s) out


def test_conv2d_same_equals_hand_padding_and_torch_same():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    conv = Conv2dSame(3, 4, 3, stride=2).double()  # 11 rows: pad (1, 1); 8 cols: (0, 1)
    expected = F.conv2d(F.pad(x, (0, 1, 1, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected, **F64)
    assert conv(x).shape[-2:] == (6, 4)
    even = Conv2dSame(3, 4, 4).double()  # stride 1, even kernel: PyTorch's "same"
    with warnings.catch_warnings():  # PyTorch notes that it pads a copy: it may
        warnings.filterwarnings("ignore", message="Using padding='same'")
        reference = F.conv2d(x, even.weight, padding="same")
    torch.testing.assert_close(even(x), reference, **F64)
    sym = Conv2dSame(3, 4, 5, stride=2, padding="symmetric").double()
    torch.testing.assert_close(
        sym(x), F.conv2d(x, sym.weight, stride=2, padding=2), **F64
    )


def test_depthwise_convolution_is_one_convolution_per_channel():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    dw = Conv2dSame(6, 6, 5, stride=2, groups=6).double()
    padded = F.pad(x, same_padding(9, 5, 2) * 2)
    per_channel = torch.cat(
        [
            F.conv2d(padded[:, c : c + 1], dw.weight[c : c + 1], stride=2)
            for c in range(6)
        ],
        1,
    )
    torch.testing.assert_close(dw(x), per_channel, **F64)


# ---------------------------------------------------------------- the block


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


def test_mbconv_equals_the_same_layers_with_batch_norm_folded():
    model = _tiny(2)
    block = model._blocks[2]  # expansion 2, kernel 5, stride 1, a skip
    assert block.skip and not model._blocks[1].skip
    x = torch.randn(3, 8, 7, 7, dtype=torch.float64)
    x = model._blocks[1](x)  # (3, 12, 4, 4)
    w0, b0 = _fold(block._expand_conv, block._bn0)
    w1, b1 = _fold(block._depthwise_conv, block._bn1)
    w2, b2 = _fold(block._project_conv, block._bn2)
    h = F.relu6(F.conv2d(x, w0, b0))
    h = F.relu6(F.conv2d(h, w1, b1, padding=2, groups=h.shape[1]))
    expected = F.conv2d(h, w2, b2) + x
    torch.testing.assert_close(block(x), expected, **F64)


def test_the_network_in_pieces_equals_the_whole():
    model = _tiny(3)
    x = torch.randn(2, 3, 17, 13, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.tail(x, 0), logits, **F64)
        for k in range(1, len(model._blocks)):
            h = model.features(x, upto=k - 1)
            torch.testing.assert_close(model.tail(h, k), logits, **F64)
        pooled = pooled_features(model, x, batch=1)
        torch.testing.assert_close(model._fc(pooled), logits, **F64)
        assert pooled_features(model, x, upto=0).shape == (2, 8, 9, 7)


def test_class_activation_map_averages_to_the_logit():
    model = _tiny(4)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        f, logits = model.features(x)[0], model(x)[0]
        for c in range(5):
            cam = class_activation_map(f, model._fc.weight, c)
            assert cam.shape == f.shape[1:]
            torch.testing.assert_close(cam.mean() + model._fc.bias[c], logits[c], **F64)


# ---------------------------------------------------------------- inputs and outputs


def test_preprocess_crops_the_centre_and_scales_to_minus_one_one():
    rng = np.random.default_rng(0)
    image = rng.random((256, 300, 3)).astype(np.float32)  # shorter side 224 / 0.875
    x = preprocess(image)
    assert x.shape == (1, 3, 224, 224)
    crop = image[16:240, 38:262].transpose(2, 0, 1)[None]
    torch.testing.assert_close(x, torch.as_tensor(crop) * 2 - 1, atol=1e-6, rtol=0)
    small = preprocess(image, size=32, mean=(0, 0, 0), std=(1, 1, 1))
    assert small.shape == (1, 3, 32, 32) and 0 <= small.min() and small.max() <= 1


def test_top_k_is_the_sorted_softmax():
    logits = torch.randn(20, dtype=torch.float64)
    names = [f"c{i}" for i in range(20)]
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum()
    order = np.argsort(-p)[:5]
    got = top_k(logits, names, 5)
    assert [n for n, _ in got] == [names[i] for i in order]
    np.testing.assert_allclose([q for _, q in got], p[order], rtol=1e-12)


def test_few_shot_subset_and_to_rgb():
    y = np.repeat(np.arange(4), 10)
    picks = few_shot_subset(y, 3, seed=1)
    assert len(set(picks)) == 12 and np.bincount(y[picks]).tolist() == [3] * 4
    images = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
    x = to_rgb(images, 48)
    assert x.shape == (5, 3, 48, 48) and -1 <= x.min() and x.max() <= 1
    torch.testing.assert_close(x[:, 0], x[:, 2])
    torch.testing.assert_close(
        to_rgb(images, 28)[:, 1], torch.as_tensor(images) * 2 - 1
    )


def test_linear_probe_matches_scikit_learn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)) * rng.uniform(0.5, 3, size=5) + rng.normal(size=5)
    y = rng.integers(0, 3, size=60)
    X[np.arange(60), y] += 1.5  # some signal
    lam = 1e-2
    layer = linear_probe(
        torch.tensor(X), torch.tensor(y), 3, steps=500, weight_decay=lam
    )
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    # sklearn minimises 0.5 |W|^2 + C sum CE; ours is mean CE + lam |W|^2
    ref = LogisticRegression(C=1 / (2 * lam * 60), tol=1e-10, max_iter=10_000).fit(Z, y)
    with torch.no_grad():
        p = layer(torch.tensor(X)).softmax(-1).numpy()
    np.testing.assert_allclose(p, ref.predict_proba(Z), atol=1e-5)


def test_fine_tune_trains_only_the_tail_and_keeps_the_statistics():
    model = _tiny(5).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    h = pooled_features(model, x, upto=1)
    losses = fine_tune(model, h, y, start=2, steps=3, batch=4)
    assert len(losses) == 3 and not model.training
    after = model.state_dict()
    for name, value in after.items():
        frozen = not name.startswith(("_blocks.2.", "_conv_head", "_bn1.", "_fc"))
        statistic = "running" in name or "num_batches" in name
        same = torch.equal(value, before[name])
        assert same == (frozen or statistic), name
    fine_tune(model, x, y, start=0, steps=1, batch=4, train_bn=True)
    assert not torch.equal(model._bn0.running_mean, before["_bn0.running_mean"])


def test_recompute_batch_norm_measures_the_statistics_of_the_images():
    model = _tiny(6)
    x = torch.randn(6, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        stem = model._conv_stem(x)  # what _bn0 normalises
    recompute_batch_norm(model, x, batch=3)  # two batches of three, averaged
    assert not model.training and model._bn0.momentum == 0.1
    torch.testing.assert_close(model._bn0.running_mean, stem.mean((0, 2, 3)), **F64)
    batch_vars = [stem[k : k + 3].var((0, 2, 3)) for k in (0, 3)]
    torch.testing.assert_close(model._bn0.running_var, sum(batch_vars) / 2, **F64)


def test_accuracy_counts_hits():
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert accuracy(lambda a: a, x, torch.tensor([1, 1, 1]), batch=2) == 2 / 3


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="padding must be one of"):
        EfficientNetLite(padding="valid")
    with pytest.raises(ValueError, match="padding must be one of"):
        Conv2dSame(3, 3, 3, padding="valid")
    with pytest.raises(ValueError, match="num_classes must be positive"):
        EfficientNetLite(num_classes=0)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        _tiny().features(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"image must be an \(H, W, 3\)"):
        preprocess(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="crop_fraction must be in"):
        preprocess(np.zeros((8, 8, 3)), crop_fraction=1.5)
    with pytest.raises(ValueError, match="3 names for 4 logits"):
        top_k(torch.zeros(4), ["a", "b", "c"])
    with pytest.raises(ValueError, match="label 1 has only 2 examples"):
        few_shot_subset(np.array([0, 0, 0, 1, 1]), 3)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        efficientnet_lite0(state_dict=[1, 2])
    with pytest.raises(ValueError, match="images must have 3 dimensions"):
        to_rgb(np.zeros((2, 3, 8, 8), dtype=np.float32), 16)
    features = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="features must have 2 dimensions"):
        linear_probe(torch.zeros(4), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"y must be 4 integer labels"):
        linear_probe(features, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"y must be 4 integer labels"):
        linear_probe(features, torch.zeros(4), 2)
    model = _tiny().float()
    h = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match="steps must be positive"):
        fine_tune(model, h, torch.zeros(4, dtype=torch.long), 0, steps=0)
    with pytest.raises(ValueError, match=r"y must be 4 integer labels"):
        fine_tune(model, h, torch.zeros(5, dtype=torch.long), 0, steps=1)
