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


def test_the_part_introductions_table_of_sizes_is_the_computed_one(monkeypatch):
    import sys
    from pathlib import Path

    import dlabc.language_models

    sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
    import sizes

    rows = dlabc.language_models.published_sizes()
    monkeypatch.setattr(dlabc.language_models, "published_sizes", lambda: rows)
    assert sizes.current() == sizes.table(), "run: python tools/sizes.py"

    # the counts are the chapters' own models, within 7 % of the papers' sizes
    from dlabc.language_models import bert

    named = {r["name"]: r for r in rows}
    assert named["all-MiniLM-L6-v2"]["parameters"] == sum(
        p.numel() for p in bert.BertModel(bert.CONFIGS["all-MiniLM-L6-v2"]).parameters()
    )
    for r in rows:
        if r["stated"] is not None:
            assert abs(r["parameters"] / r["stated"] - 1) < 0.07, r["name"]
