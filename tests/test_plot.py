"""dlabc.plot: the book's style, heatmaps and image grids.

Each figure is checked through what matplotlib drew: arrays, colour limits, titles.
"""

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


# --------------------------------------------------------------------- image_grid


def drawn(fig) -> list:
    """The image of each axes that shows one, in reading order."""
    return [ax.images[0] for ax in fig.axes if ax.images]


@pytest.mark.parametrize(
    "n, ncols, shape",
    [
        (10, None, (2, 8)),
        (3, None, (1, 3)),
        (7, 3, (3, 3)),
        (4, 4, (1, 4)),
        (2, 5, (1, 2)),
    ],
)
def test_image_grid_lays_out_the_images(n, ncols, shape):
    images = [np.full((3, 4), float(k)) for k in range(n)]
    fig = plot.image_grid(images, ncols=ncols, size=1.0)
    assert len(fig.axes) == shape[0] * shape[1]
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == shape
    assert all(not ax.axison for ax in fig.axes)  # no axes, ticks or frames
    shown = drawn(fig)
    assert len(shown) == n  # the cells after the last image stay empty
    for k, image in enumerate(shown):
        np.testing.assert_array_equal(image.get_array(), images[k])
    size = min(1.0, plot.COLUMN_INCHES / shape[1])  # never wider than the column
    assert tuple(fig.get_size_inches()) == pytest.approx(
        (shape[1] * size, shape[0] * size)
    )
    plt.close(fig)


def test_image_grid_titles_and_colour_map():
    fig = plot.image_grid(
        [np.eye(3), np.ones((2, 2))], titles=["identity", "ones"], cmap="viridis"
    )
    assert [ax.get_title() for ax in fig.axes] == ["identity", "ones"]
    assert all(image.get_cmap().name == "viridis" for image in drawn(fig))
    plt.close(fig)
    fig = plot.image_grid([np.eye(3)])
    assert fig.axes[0].get_title() == "" and drawn(fig)[0].get_cmap().name == "gray"
    plt.close(fig)


def test_image_grid_symmetric_colour_limits_are_centred_on_zero():
    images = [
        np.array([[-0.5, 2.0], [1.0, 0.0]]),
        np.array([[-3.0, 1.0], [0.5, 0.25]]),
        np.zeros((2, 2)),  # nothing to scale by: the limits fall back to +-1
    ]
    fig = plot.image_grid(images, symmetric=True, cmap="RdBu_r")
    assert [image.get_clim() for image in drawn(fig)] == [
        (-2.0, 2.0),
        (-3.0, 3.0),
        (-1.0, 1.0),
    ]
    plt.close(fig)
    fig = plot.image_grid(images[:2])  # otherwise each image spans its own range
    assert [image.get_clim() for image in drawn(fig)] == [(-0.5, 2.0), (-3.0, 1.0)]
    plt.close(fig)


def test_image_grid_accepts_tensors():
    weight = torch.randn(2, 3, 3, requires_grad=True, dtype=torch.float64)
    kernel = torch.randn(4, 5, dtype=torch.bfloat16)
    fig = plot.image_grid([weight[0], weight[1] * 2, kernel], symmetric=True)
    shown = drawn(fig)
    np.testing.assert_allclose(
        shown[0].get_array(), weight[0].detach().numpy(), rtol=1e-6
    )
    np.testing.assert_array_equal(shown[2].get_array(), kernel.float().numpy())
    limit = float(kernel.float().abs().max())
    assert shown[2].get_clim() == pytest.approx((-limit, limit))
    plt.close(fig)


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        ([], {}, "needs at least one image"),
        (np.zeros((0, 3, 3)), {}, "needs at least one image"),
        (
            [np.zeros((2, 2)), np.zeros((1, 2, 2))],
            {},
            r"images, got shapes \[\(1, 2, 2\)\]",
        ),
        ([np.zeros(4)], {}, r"images, got shapes \[\(4,\)\]"),
        ([torch.zeros(3, 2, 2)], {}, "2-D or \\(H, W, 3\\) images"),
        ([np.zeros((2, 2))] * 2, {"titles": ["a"]}, "1 titles for 2 images"),
        ([np.zeros((2, 2))], {"titles": ["a", "b"]}, "2 titles for 1 images"),
        ([np.zeros((2, 2))] * 3, {"ncols": 0}, "ncols must be a positive int, got 0"),
        ([np.zeros((2, 2))] * 3, {"ncols": -2}, "ncols must be a positive int, got -2"),
        ([np.zeros((2, 2))] * 3, {"ncols": 2.0}, "ncols must be a positive int"),
        ([np.zeros((2, 2))] * 3, {"ncols": True}, "ncols must be a positive int"),
        ([np.zeros((2, 2))] * 3, {"ncols": "2"}, "ncols must be a positive int"),
    ],
)
def test_image_grid_rejects_bad_input(images, kwargs, match):
    before = plt.get_fignums()
    with pytest.raises(ValueError, match=match):
        plot.image_grid(images, **kwargs)
    assert plt.get_fignums() == before  # no half-drawn figure left behind


def test_confusion_matrix_writes_every_nonzero_count_in_its_cell():
    matrix = np.array([[5, 0, 1], [0, 7, 0], [2, 0, 9]])
    fig, ax = plt.subplots()
    try:
        plot.confusion_matrix(ax, matrix, labels=["a", "b", "c"])
        texts = {(t.get_position(), t.get_text()) for t in ax.texts}
        expected = {
            ((j, i), str(matrix[i, j]))
            for i in range(3)
            for j in range(3)
            if matrix[i, j]
        }
        assert texts == expected
        assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
        assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
        # white on the darker half of the scale, black elsewhere
        colours = {t.get_text(): t.get_color() for t in ax.texts}
        assert colours["9"] == "white" and colours["1"] == "black"
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    "matrix, labels, match",
    [
        (np.zeros((2, 3)), None, "square"),
        (np.zeros(4), None, "square"),
        (np.zeros((2, 2)), ["a"], "1 labels for 2 classes"),
    ],
)
def test_confusion_matrix_rejects_bad_input(matrix, labels, match):
    fig, ax = plt.subplots()
    try:
        with pytest.raises(ValueError, match=match):
            plot.confusion_matrix(ax, matrix, labels)
    finally:
        plt.close(fig)


def test_image_grid_shows_colour_frames_in_their_own_colours():
    frame = np.zeros((6, 9, 3), dtype=np.uint8)
    frame[..., 0] = 255  # red
    fig = plot.image_grid([frame, frame], titles=["a", "b"])
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (6, 9, 3) and (np.asarray(shown) == frame).all()
    plt.close(fig)
