"""Tests for ``dlabc.graphs.gat``.

The segment softmax equals PyTorch Geometric's ``softmax`` (values and gradients) and
``torch.softmax`` on one group, and stays finite for huge scores. Our ``GATConv`` gives
PyG's ``GATConv`` outputs, attention coefficients and gradients with copied weights
(float64), for one and several heads, concatenated or averaged, with and without bias
and self-loops, and the same dropout masks in training; the two-layer ``GAT`` equals a
stack of PyG layers. The coefficients equal a brute-force loop over each node's
neighbours, and are ordered as the sender scores are (Brody et al.'s static attention).
The neighbour homophily equals PyG's node homophily and a loop. Bad input fails with a
clear message.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import GATConv as PygGATConv
from torch_geometric.utils import homophily as pyg_homophily
from torch_geometric.utils import softmax as pyg_softmax

from dlabc.data import load_karate_club
from dlabc.graphs.gat import (
    GAT,
    GATConv,
    neighbour_homophily,
    segment_softmax,
    source_scores,
)
from dlabc.graphs.gcn import accuracy, train_node_classifier

KARATE = load_karate_club()


def small_graph() -> tuple[torch.Tensor, int]:
    """Karate's edges plus an isolated node (34) and an existing self-loop (5 -> 5)."""
    loop = torch.tensor([[5], [5]])
    return torch.cat([KARATE.edge_index, loop], dim=1), KARATE.num_nodes + 1


def copied(ours: GATConv, theirs: PygGATConv) -> GATConv:
    with torch.no_grad():  # a non-zero bias, so that it is tested too
        if theirs.bias is not None:
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())  # the same names: lin, att_src, ...
    return ours


# --- the segment softmax ---------------------------------------------------------------


def test_segment_softmax_equals_pyg_values_and_gradients():
    torch.manual_seed(0)
    index = torch.randint(0, 7, (40,))  # 10 groups, some of them empty
    scores = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    ours = segment_softmax(scores, index, 10)
    theirs = pyg_softmax(scores, index, num_nodes=10)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    upstream = torch.randn(40, 3, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, scores, upstream)
    (g_theirs,) = torch.autograd.grad(theirs, scores, upstream)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    sums = torch.zeros(10, 3, dtype=torch.float64).index_add_(0, index, ours.detach())
    present = torch.bincount(index, minlength=10) > 0
    torch.testing.assert_close(
        sums[present], torch.ones(int(present.sum()), 3).double()
    )


def test_segment_softmax_of_one_group_is_softmax_and_stays_finite():
    scores = torch.tensor([1000.0, 1001.0, 999.0, -1000.0], dtype=torch.float64)
    out = segment_softmax(scores, torch.zeros(4, dtype=torch.int64), 1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.softmax(scores, 0), rtol=1e-14, atol=0)


# --- the layer against PyG ---------------------------------------------------------------


@pytest.mark.parametrize(
    "heads,concat,bias,self_loops",
    [(1, True, True, True), (3, True, True, True), (3, False, True, True)]
    + [(2, True, False, True), (2, False, True, False)],
)
def test_gatconv_equals_pyg_outputs_attention_and_gradients(
    heads, concat, bias, self_loops
):
    torch.manual_seed(heads)
    edge_index, n = small_graph()
    x = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    kwargs = {"heads": heads, "concat": concat, "bias": bias}
    theirs = PygGATConv(5, 4, add_self_loops=self_loops, **kwargs).double()
    ours = copied(GATConv(5, 4, add_self_loops=self_loops, **kwargs).double(), theirs)
    out, (edges, alpha) = ours(x, edge_index, return_attention=True)
    ref, (ref_edges, ref_alpha) = theirs(x, edge_index, return_attention_weights=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(edges, ref_edges)  # the same edges, loops in the same places
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-12, atol=1e-14)
    upstream = torch.randn_like(out)
    params = [ours.lin.weight, ours.att_src, ours.att_dst]
    ref_params = [theirs.lin.weight, theirs.att_src, theirs.att_dst]
    grads = torch.autograd.grad(out, [x, *params], upstream)
    ref_grads = torch.autograd.grad(ref, [x, *ref_params], upstream)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gatconv_with_another_slope_and_dropout_draws_pygs_masks():
    torch.manual_seed(0)
    x = torch.randn(34, 6, dtype=torch.float64)
    kwargs = {"heads": 2, "negative_slope": 0.05, "dropout": 0.5}
    theirs = PygGATConv(6, 3, **kwargs).double().train()
    ours = copied(GATConv(6, 3, **kwargs).double().train(), theirs)
    outputs = []
    for layer in (ours, theirs):
        torch.manual_seed(7)  # the layers draw one dropout mask, on the same tensor
        outputs.append(layer(x, KARATE.edge_index))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    ours.eval()
    assert not torch.allclose(ours(x, KARATE.edge_index), outputs[0])


def test_two_layer_gat_equals_a_stack_of_pyg_layers():
    torch.manual_seed(1)
    x = torch.randn(34, 7, dtype=torch.float64)
    model = GAT(7, 4, 3, heads=2, out_heads=2, dropout=0.3).double()
    first = PygGATConv(7, 4, heads=2, dropout=0.3).double()
    last = PygGATConv(8, 3, heads=2, concat=False, dropout=0.3).double()
    copied(model.conv1, first)
    copied(model.conv2, last)

    def reference(x):
        x = F.dropout(x, 0.3, model.training)
        x = F.elu(first(x, KARATE.edge_index))
        x = F.dropout(x, 0.3, model.training)
        return last(x, KARATE.edge_index)

    for mode in (False, True):
        model.train(mode), first.train(mode), last.train(mode)
        torch.manual_seed(3)
        ours = model(x, KARATE.edge_index)
        torch.manual_seed(3)
        torch.testing.assert_close(ours, reference(x), rtol=1e-12, atol=1e-12)
    assert ours.shape == (34, 3)


# --- the attention, by brute force --------------------------------------------------------


def test_attention_equals_a_loop_over_each_neighbourhood_and_is_static():
    torch.manual_seed(2)
    layer = GATConv(34, 3, heads=2).double()
    x = KARATE.x.double()
    _, (edges, alpha) = layer(x, KARATE.edge_index, return_attention=True)
    h = (x @ layer.lin.weight.T).view(34, 2, 3).detach().numpy()
    a_src = layer.att_src.detach().numpy()[0]
    a_dst = layer.att_dst.detach().numpy()[0]
    s = source_scores(layer, x).numpy()  # (34, 2)
    graph = nx.karate_club_graph()
    for i in graph.nodes:
        senders = sorted(graph.neighbors(i)) + [i]
        for k in range(2):
            e = np.array([h[j, k] @ a_src[k] + h[i, k] @ a_dst[k] for j in senders])
            e = np.where(e > 0, e, 0.2 * e)
            expected = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
            position = {
                int(j): p for p, j in enumerate(edges[0]) if int(edges[1, p]) == i
            }
            got = alpha[[position[j] for j in senders], k].detach().numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-12)
            np.testing.assert_allclose(
                s[senders, k], [h[j, k] @ a_src[k] for j in senders]
            )
            # static attention: the receiver ranks its senders as s does
            assert list(np.argsort(got)) == list(np.argsort(s[senders, k]))


def test_neighbour_homophily_equals_pyg_and_a_loop():
    edge_index, y = KARATE.edge_index, KARATE.y
    assert neighbour_homophily(edge_index, y) == pytest.approx(
        pyg_homophily(edge_index, y, method="node"), abs=1e-6
    )
    torch.manual_seed(4)
    weight = torch.rand(edge_index.shape[1], dtype=torch.float64)
    graph = nx.karate_club_graph()
    shares = []
    for i in graph.nodes:
        mask = edge_index[1] == i
        same = (y[edge_index[0, mask]] == y[i]).double()
        shares.append(float((weight[mask] * same).sum() / weight[mask].sum()))
    assert neighbour_homophily(edge_index, y, weight) == pytest.approx(
        np.mean(shares), abs=1e-6
    )
    # self-loops are left out, and a graph whose edges all join one class has 1
    looped = torch.cat([edge_index, torch.arange(34).expand(2, 34)], dim=1)
    assert neighbour_homophily(looped, y) == neighbour_homophily(edge_index, y)
    assert (
        neighbour_homophily(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1, 1])) == 1
    )


def test_gat_learns_the_karate_club_from_its_two_leaders():
    torch.manual_seed(0)
    model = GAT(34, 4, 2, heads=4, dropout=0.0)
    losses = train_node_classifier(model, KARATE, epochs=60, lr=0.01)
    assert losses[-1] < 0.1 * losses[0]
    with torch.no_grad():
        scores = model(KARATE.x, KARATE.edge_index)
    assert accuracy(scores, KARATE.y, KARATE.test_mask) > 0.7  # chance is 0.5


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_fails_with_a_clear_message():
    x, edges = torch.randn(34, 5), KARATE.edge_index
    with pytest.raises(ValueError, match="in_channels must be positive"):
        GATConv(0, 4)
    with pytest.raises(ValueError, match="heads must be positive"):
        GATConv(5, 4, heads=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        GAT(5, 4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="negative_slope must be in"):
        GATConv(5, 4, negative_slope=-0.2)
    layer = GATConv(5, 4)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        layer(torch.randn(34), edges)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(34, 5, dtype=torch.int64), edges)
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        layer(x, edges[:1])
    with pytest.raises(ValueError, match="edge_index must hold node ids in 0..9"):
        layer(x[:10], edges)
    with pytest.raises(ValueError, match="index must have one entry per row of scores"):
        segment_softmax(torch.randn(5), torch.zeros(4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="index must lie in 0..1"):
        segment_softmax(torch.randn(3), torch.tensor([0, 1, 2]), 2)
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        segment_softmax(torch.ones(3, dtype=torch.int64), torch.zeros(3).long(), 1)
    with pytest.raises(TypeError, match="conv must be a GATConv"):
        source_scores(torch.nn.Linear(5, 4), x)
    with pytest.raises(ValueError, match="weight must have one entry per edge"):
        neighbour_homophily(edges, KARATE.y, torch.ones(3))
    assert math.isfinite(neighbour_homophily(edges, KARATE.y))
