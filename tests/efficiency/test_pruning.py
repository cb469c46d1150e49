"""Tests for ``dlabc.efficiency.pruning``.

Every mask against ``torch.nn.utils.prune`` (``l1_unstructured``,
``global_unstructured``, ``ln_structured``) on random weights, and, on weights with
many equal magnitudes, the same count and agreement away from the threshold; the
masked training (pruned weights stay zero under SGD with momentum); the shrunk CNN
against the original with torch's filter masks applied to weights and biases. Bad input
for every public entry point.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from dlabc.cnn.cnn_classifier import torch_cnn
from dlabc.efficiency.pruning import (
    apply_masks,
    filter_mask,
    global_magnitude_masks,
    layerwise_magnitude_masks,
    prunable_weights,
    shrink_cnn,
)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return torch_cnn(channels=(4, 6), hidden=12, image_size=16)


def layers(model):
    return [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_prunable_weights_are_the_conv_and_linear_weights(net):
    assert [w.shape for w in prunable_weights(net)] == [
        m.weight.shape for m in layers(net)
    ]


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.77, 1.0])
def test_masks_equal_torch_prune(net, amount):
    weights = prunable_weights(net)
    reference = copy.deepcopy(net)
    for m in layers(reference):
        prune.l1_unstructured(m, "weight", amount)
    for ours, m in zip(
        layerwise_magnitude_masks(weights, amount), layers(reference), strict=True
    ):
        assert torch.equal(ours, m.weight_mask)
    reference = copy.deepcopy(net)
    prune.global_unstructured(
        [(m, "weight") for m in layers(reference)], prune.L1Unstructured, amount=amount
    )
    for ours, m in zip(
        global_magnitude_masks(weights, amount), layers(reference), strict=True
    ):
        assert torch.equal(ours, m.weight_mask)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("amount", [0.25, 0.5, 0.9])
def test_filter_mask_equals_ln_structured(net, n, amount):
    reference = copy.deepcopy(net)
    for w, m in zip(prunable_weights(net), layers(reference), strict=True):
        prune.ln_structured(m, "weight", amount, n=n, dim=0)
        assert torch.equal(filter_mask(w, amount, n=n), m.weight_mask)


def test_ties_change_only_which_equal_weights_go():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-3, 4, (20, 10), generator=g).float()  # seven levels: many ties
    for amount in [0.3, 0.5, 0.8]:
        ours = layerwise_magnitude_masks([w], amount)[0]
        module = nn.Linear(10, 20)
        with torch.no_grad():
            module.weight.copy_(w)
        theirs = prune.l1_unstructured(module, "weight", amount).weight_mask
        assert ours.sum() == theirs.sum()  # the same number pruned
        k = round(amount * w.numel())
        threshold = w.abs().flatten().sort().values[k - 1]
        away = w.abs() != threshold
        assert torch.equal(ours[away], theirs[away])  # differ only at the threshold


def test_masked_weights_stay_zero_under_sgd_with_momentum(net):
    weights = prunable_weights(net)
    masks = global_magnitude_masks(weights, 0.6)
    apply_masks(weights, masks)
    # SGD with momentum written out (torch.optim's first step imports ~1 s of CPU)
    params = list(net.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    x = torch.randn(8, 1, 16, 16)
    for _ in range(3):
        net.zero_grad()
        net(x).square().mean().backward()
        with torch.no_grad():
            for p, v in zip(params, velocity, strict=True):
                v.mul_(0.9).add_(p.grad)  # v <- mu v + g
                p.sub_(0.1 * v)  # w <- w - lr v
    for w, m in zip(weights, masks, strict=True):
        assert torch.all(w[m == 0] == 0)
        assert torch.all(w.grad[m == 0] == 0)
        assert torch.any(w[m == 1] != 0)


@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_shrunk_cnn_is_the_filter_pruned_cnn(net, amount):
    small = shrink_cnn(net, amount)
    reference = copy.deepcopy(net)
    for m in layers(reference)[:-1]:  # torch's masks, biases of pruned units zeroed
        prune.ln_structured(m, "weight", amount, n=2, dim=0)
        with torch.no_grad():
            m.bias.mul_(m.weight_mask.flatten(1)[:, 0])
    x = torch.randn(5, 1, 16, 16)
    torch.testing.assert_close(small(x), reference(x))
    kept = [m.weight.shape[0] for m in layers(small)]
    full = [m.weight.shape[0] for m in layers(net)]
    assert kept[:-1] == [o - round(amount * o) for o in full[:-1]]
    assert kept[-1] == full[-1]


def test_bad_input_is_rejected(net):
    weights = prunable_weights(net)
    with pytest.raises(ValueError, match=r"amount must be in \[0, 1\]"):
        layerwise_magnitude_masks(weights, 1.5)
    with pytest.raises(ValueError, match="must not be empty"):
        global_magnitude_masks([], 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        filter_mask(torch.ones(3, 4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match=r"n must be in \(0, inf\)"):
        filter_mask(weights[0], 0.5, n=0)
    with pytest.raises(ValueError, match="mask of shape"):
        apply_masks(weights[:1], [torch.ones(2, 2)])
    with pytest.raises(ValueError, match="2 weights but 1 masks"):
        apply_masks(weights[:2], [torch.ones_like(weights[0])])
    with pytest.raises(ValueError, match="without batch_norm"):
        shrink_cnn(torch_cnn(channels=(2, 2), hidden=4, batch_norm=True), 0.5)
    with pytest.raises(ValueError, match=r"amount must be in \[0, 1\)"):
        shrink_cnn(net, 1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        prunable_weights("model")
