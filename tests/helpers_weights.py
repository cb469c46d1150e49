"""Random weights for comparing a model with its reference, shared by the model tests."""

import torch
from torch import nn


def randomize(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Random weights everywhere, the norms' scales too: a 1-D parameter (a norm's scale,
    a bias) becomes 1 + noise, a matrix noise alone, so that no weight sits at its
    initial value and a wrongly copied one shows. Returns ``module``."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((p.dim() == 1) + scale * torch.randn_like(p))
    return module
