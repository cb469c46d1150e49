"""dlabc.plot: the book's style and heatmaps."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dlabc import plot  # noqa: E402


def test_use_style_sets_the_book_style():
    plot.use_style()
    assert matplotlib.rcParams["axes.spines.top"] is False
    assert matplotlib.rcParams["figure.dpi"] == 110


def test_heatmap_draws_the_matrix_with_labels():
    m = torch.rand(2, 3)
    fig, ax = plt.subplots()
    image = plot.heatmap(
        ax, m, x_labels=["a", "b", "c"], y_labels=["p", "q"], title="t"
    )
    np.testing.assert_array_equal(image.get_array(), m.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.get_title() == "t"
    plt.close(fig)


def test_heatmap_rejects_bad_input():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="2-D tensor"):
        plot.heatmap(ax, torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match="2-D tensor"):
        plot.heatmap(ax, [[1, 2]])
    with pytest.raises(ValueError, match="x_labels has 2 entries for 3 columns"):
        plot.heatmap(ax, torch.rand(2, 3), x_labels=["a", "b"])
    plt.close(fig)
