"""The Language models part: tokenizers, BERT and its family, fine-tuning, GPT-2, GPT-3 and
in-context learning, T5, Transformer-XL and XLNet."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["count_parameters"]


def count_parameters(make: Callable[[], nn.Module]) -> int:
    """The number of parameters of the model that ``make()`` builds, without building it.

    The model is made on PyTorch's ``meta`` device, where tensors have shapes but no
    storage, so even a 175-billion-parameter configuration is counted in milliseconds
    and no memory. A tensor shared by two modules (tied embeddings) counts once.
    """
    if isinstance(make, nn.Module) or not callable(make):
        raise TypeError(f"make must be a callable that returns a module, got {make!r}")
    with torch.device("meta"):
        model = make()
    if not isinstance(model, nn.Module):
        raise TypeError(f"make() must return an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())  # parameters() skips repeats
