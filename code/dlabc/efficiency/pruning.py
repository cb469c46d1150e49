r"""Pruning: magnitude masks (layer-wise, global, whole filters), training under a mask,
shrinking a CNN by its filters, and the lottery ticket.

Chapter: ``book/efficiency/pruning.md``.

References:
- Han, Pool, Tran & Dally (2015), *Learning both Weights and Connections for Efficient
  Neural Networks* (prune the smallest weights, retrain).
- Li, Kadav, Durdanovic, Samet & Graf (2017), *Pruning Filters for Efficient ConvNets*
  (remove whole filters with the smallest norm; the layer shrinks).
- Frankle & Carbin (2019), *The Lottery Ticket Hypothesis* (rewind the surviving
  weights to their initial values and retrain); Frankle, Dziugaite, Roy & Carbin (2020),
  *Linear Mode Connectivity and the Lottery Ticket Hypothesis* (rewind to an early
  iteration instead).

A mask has the shape of its weight, 1 where the weight is kept and 0 where it is
pruned. ``amount`` is the fraction pruned; the number of weights (or filters) pruned is
``round(amount * n)``, as in ``torch.nn.utils.prune``. Ties in magnitude are broken by
position (the earlier entry is pruned first); ``torch.nn.utils.prune`` breaks them by
``torch.topk``'s order, so the two can differ only among equal magnitudes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlabc.checks import check_number, check_tensor

__all__ = [
    "prunable_weights",
    "layerwise_magnitude_masks",
    "global_magnitude_masks",
    "filter_mask",
    "apply_masks",
    "shrink_cnn",
]


def prunable_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of the ``nn.Conv2d`` and ``nn.Linear`` layers of ``model``, in order
    (biases are not pruned: they are few)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layerwise_magnitude_masks(
    weights: Sequence[torch.Tensor], amount: float
) -> list[torch.Tensor]:
    """Prune the fraction ``amount`` of smallest-magnitude weights in *each* tensor;
    the masks equal ``torch.nn.utils.prune.l1_unstructured``'s."""
    _check_weights(weights, amount)
    return [_magnitude_mask(w.detach(), amount) for w in weights]


def _magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Zero the ``round(amount * n)`` entries of smallest $|w|$; ones elsewhere."""
    scores = weight.abs().flatten()  # importance = magnitude, (n,)
    k = round(amount * scores.numel())  # how many to prune
    order = scores.argsort(stable=True)  # smallest first; ties: earlier index first
    mask = torch.ones_like(scores)
    mask[order[:k]] = 0
    return mask.view_as(weight)


def global_magnitude_masks(
    weights: Sequence[torch.Tensor], amount: float
) -> list[torch.Tensor]:
    """Prune the fraction ``amount`` of smallest-magnitude weights of *all* tensors
    together (one threshold for the whole network); the masks equal
    ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``."""
    _check_weights(weights, amount)
    return _global_magnitude_masks([w.detach() for w in weights], amount)


def _global_magnitude_masks(
    weights: list[torch.Tensor], amount: float
) -> list[torch.Tensor]:
    """One magnitude ranking over the concatenated weights, split back per tensor."""
    flat = torch.cat([w.flatten() for w in weights])  # every weight, (N,)
    mask = _magnitude_mask(flat, amount)  # one threshold for all
    sizes = [w.numel() for w in weights]
    return [m.view_as(w) for m, w in zip(mask.split(sizes), weights, strict=True)]


def filter_mask(weight: torch.Tensor, amount: float, n: float = 2) -> torch.Tensor:
    r"""Prune the fraction ``amount`` of whole output units (rows of a linear weight,
    filters of a convolution, i.e. slices along dimension 0) with the smallest
    $L_n$ norm; equals the mask of
    ``torch.nn.utils.prune.ln_structured(..., n=n, dim=0)``."""
    _check_weights([weight], amount)
    check_number(n, "n", low=0, low_open=True)
    return _filter_mask(weight.detach(), amount, n)


def _filter_mask(weight: torch.Tensor, amount: float, n: float) -> torch.Tensor:
    r"""$\lVert W_{o,\cdot} \rVert_n$ per output unit $o$; zero the rows of the
    ``round(amount * O)`` smallest."""
    norms = weight.flatten(1).norm(p=n, dim=1)  # one norm per filter, (O,)
    return (
        _magnitude_mask(norms, amount)[:, None]
        .expand(weight.flatten(1).shape)
        .view_as(weight)
    )


def apply_masks(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero the pruned weights and keep them zero during training: each weight's
    gradient is multiplied by its mask. Returns the hooks' handles (``.remove()`` them
    to train densely again). With Adam or SGD without weight decay, a weight whose
    gradient is always zero never moves."""
    if len(weights) != len(masks):
        raise ValueError(f"{len(weights)} weights but {len(masks)} masks")
    for w, m in zip(weights, masks, strict=True):
        check_tensor(w, "weight", floating=True)
        check_tensor(m, "mask")
        if w.shape != m.shape:
            raise ValueError(
                f"mask of shape {tuple(m.shape)} for a weight {tuple(w.shape)}"
            )
    return _apply_masks(list(weights), list(masks))


def _apply_masks(
    weights: list[torch.Tensor], masks: list[torch.Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """$w \\leftarrow m \\odot w$ now, and $\\nabla w \\leftarrow m \\odot \\nabla w$ at
    every backward pass."""
    handles = []
    with torch.no_grad():
        for w, m in zip(weights, masks, strict=True):
            w.mul_(m.to(w))  # pruned weights are zero...
            handles.append(w.register_hook(lambda g, m=m: g * m.to(g)))  # ...and stay
    return handles


def shrink_cnn(model: nn.Sequential, amount: float) -> nn.Sequential:
    """Structured pruning of a ``dlabc.cnn.cnn_classifier.torch_cnn`` (without batch
    normalization): remove the fraction ``amount`` of filters of every convolution and
    of units of every hidden linear layer, smallest $L_2$ norm first, and return a
    smaller network of the same kind with the surviving weights copied.

    It computes what the original computes when the pruned units' weights *and biases*
    are zeroed: a pruned unit outputs ReLU(0) = 0, so the next layer's weights that read
    it can go too."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if any(isinstance(m, nn.BatchNorm2d) for m in model):
        raise ValueError("shrink_cnn handles torch_cnn without batch_norm only")
    check_number(amount, "amount", low=0, high=1, high_open=True)
    return _shrink_cnn(model, amount)


def _shrink_cnn(model: nn.Sequential, amount: float) -> nn.Sequential:
    """Keep the largest-norm units of each layer but the last; slice the next layer's
    inputs to match (for the first linear layer, the inputs of every kept channel)."""
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    n_inputs = layers[0].weight.shape[1]  # the image's channels
    kept_in = torch.arange(n_inputs)
    new = []
    for i, layer in enumerate(layers):
        W, b = layer.weight.detach(), layer.bias.detach()
        if i < len(layers) - 1:  # rank units by the L2 norm of their whole weights
            keep = _filter_mask(W, amount, 2).flatten(1)[:, 0].bool()  # (O,)
            kept_out = keep.nonzero().flatten()
        else:  # the class scores are never pruned
            kept_out = torch.arange(W.shape[0])
        if isinstance(layer, nn.Linear) and W.shape[1] != n_inputs:  # after Flatten
            per_channel = W.shape[1] // n_inputs  # H·W positions per channel
            kept_in = (
                kept_in[:, None] * per_channel + torch.arange(per_channel)
            ).flatten()
        W = W[:, kept_in.to(W.device)]  # drop the inputs that read pruned units
        kept_out = kept_out.to(W.device)
        if isinstance(layer, nn.Conv2d):
            small = nn.Conv2d(len(kept_in), len(kept_out), layer.kernel_size)
        else:
            small = nn.Linear(len(kept_in), len(kept_out))
        with torch.no_grad():
            small.weight.copy_(W[kept_out])
            small.bias.copy_(b[kept_out])
        new.append(small)
        kept_in, n_inputs = kept_out.cpu(), W.shape[0]  # what the next layer reads
    it = iter(new)  # the same layers in the same order, activations and pools too
    return nn.Sequential(
        *(next(it) if isinstance(m, (nn.Conv2d, nn.Linear)) else m for m in model)
    ).to(layers[0].weight.device)


def _check_weights(weights: object, amount: object) -> None:
    if not isinstance(weights, (list, tuple)) and not isinstance(weights, torch.Tensor):
        raise TypeError(
            f"weights must be a list of tensors, got {type(weights).__name__}"
        )
    items = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not items:
        raise ValueError("weights must not be empty")
    for w in items:
        check_tensor(w, "weight", floating=True)
    check_number(amount, "amount", low=0, high=1)
