import pytest
import torch
from torch import nn

from dlabc.language_models import count_parameters


def test_count_parameters_equals_the_built_model_and_counts_tied_weights_once():
    def make():
        embed = nn.Embedding(100, 16)
        head = nn.Linear(16, 100, bias=False)
        head.weight = embed.weight  # tied
        return nn.Sequential(embed, nn.Linear(16, 16), head)

    built = make()
    assert count_parameters(make) == sum(p.numel() for p in built.parameters())
    assert count_parameters(make) == 100 * 16 + 16 * 16 + 16


def test_count_parameters_allocates_nothing_for_a_huge_model():
    assert count_parameters(lambda: nn.Linear(100_000, 100_000)) == 10**10 + 10**5
    assert torch.empty(1).device.type == "cpu"  # the default device is restored


def test_count_parameters_rejects_bad_input():
    with pytest.raises(TypeError, match="make must be a callable"):
        count_parameters(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must return an nn.Module"):
        count_parameters(lambda: 3)
