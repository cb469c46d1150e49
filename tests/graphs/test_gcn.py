"""Tests for ``dlabc.graphs.gcn``.

Scatter and message passing equal PyTorch Geometric's ``scatter`` and ``SimpleConv`` and
the dense adjacency matrix that networkx builds; the normalised adjacency equals PyG's
``gcn_norm`` and its closed form $\\tilde D^{-1/2}(A + I)\\tilde D^{-1/2}$; our
``GCNConv`` and two-layer ``GCN`` give PyG's outputs and gradients with copied weights
(float64), and a GCN on a graph without edges is an MLP. Label propagation equals PyG's
``LabelPropagation`` and the closed form $(1-\\alpha)(I - \\alpha S)^{-1} Y$; the
Dirichlet energy equals its trace form and vanishes where the text says. Bad input fails
with a clear message.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score
from torch import nn
from torch_geometric.nn import GCNConv as PygGCNConv
from torch_geometric.nn import LabelPropagation, SimpleConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm as pyg_gcn_norm
from torch_geometric.utils import add_self_loops as pyg_add_self_loops
from torch_geometric.utils import degree as pyg_degree
from torch_geometric.utils import scatter as pyg_scatter

from dlabc.graphs.gcn import (
    GCN,
    GCNConv,
    accuracy,
    add_self_loops,
    adjacency,
    degree,
    dirichlet_energy,
    gcn_norm,
    label_propagation,
    propagate,
    scatter_sum,
    train_node_classifier,
)

KARATE = nx.karate_club_graph()
N = KARATE.number_of_nodes()


def karate_edge_index() -> torch.Tensor:
    edges = torch.tensor(list(KARATE.edges()), dtype=torch.int64).T  # (2, 78)
    return torch.cat([edges, edges.flip(0)], dim=1)  # both directions: (2, 156)


def karate_dense() -> np.ndarray:
    return nx.to_numpy_array(KARATE, weight=None)  # (34, 34) of 0/1


def karate_labels() -> torch.Tensor:
    clubs = [KARATE.nodes[i]["club"] for i in range(N)]
    return torch.tensor([c == "Officer" for c in clubs], dtype=torch.int64)


# --- scatter and message passing ------------------------------------------------------


def test_scatter_sum_equals_pyg_scatter_and_leaves_zeros():
    torch.manual_seed(0)
    src = torch.randn(20, 3, 2, dtype=torch.float64)
    index = torch.randint(0, 6, (20,))
    index[index == 5] = 4  # node 5 gets nothing
    ours = scatter_sum(src, index, 7)
    ref = pyg_scatter(src, index, dim=0, dim_size=7, reduce="sum")
    torch.testing.assert_close(ours, ref)
    assert ours[5:].abs().max() == 0


def test_propagate_equals_the_dense_adjacency_and_pyg():
    edge_index = karate_edge_index()
    x = torch.randn(N, 4, dtype=torch.float64)
    A = torch.from_numpy(karate_dense())  # symmetric, so A[i, j] = A[j, i]
    torch.testing.assert_close(propagate(x, edge_index), A @ x)
    w = torch.rand(edge_index.shape[1], dtype=torch.float64)
    ref = SimpleConv(aggr="sum")(x, edge_index, w)
    torch.testing.assert_close(propagate(x, edge_index, w), ref)
    torch.testing.assert_close(adjacency(edge_index, N, w) @ x, ref)


def test_propagate_flows_from_source_to_target_and_keeps_extra_dimensions():
    edge_index = torch.tensor([[0, 0], [1, 2]])  # 0 -> 1 and 0 -> 2 only
    x = torch.arange(1.0, 7.0).view(3, 2, 1)  # (N, heads, F)
    out = propagate(x, edge_index, torch.tensor([2.0, 3.0]))
    assert out.shape == (3, 2, 1)
    torch.testing.assert_close(out[0], torch.zeros(2, 1))
    torch.testing.assert_close(out[1], 2 * x[0])
    torch.testing.assert_close(out[2], 3 * x[0])


def test_adjacency_is_networkx_adjacency():
    dense = adjacency(karate_edge_index(), N).to_dense().double()
    torch.testing.assert_close(dense, torch.from_numpy(karate_dense()))


def test_self_loops_and_degree_equal_pyg():
    edge_index = karate_edge_index()
    ref, _ = pyg_add_self_loops(edge_index, num_nodes=N)
    torch.testing.assert_close(add_self_loops(edge_index, N), ref)
    torch.testing.assert_close(
        degree(edge_index[1], N), pyg_degree(edge_index[1], N, dtype=torch.float32)
    )
    torch.testing.assert_close(
        degree(edge_index[1], N, torch.float64),
        torch.from_numpy(karate_dense().sum(1)),
    )


# --- the normalised adjacency -----------------------------------------------------------


@pytest.mark.parametrize("self_loops", [True, False])
def test_gcn_norm_equals_pyg_and_the_closed_form(self_loops):
    edge_index = karate_edge_index()
    ours = gcn_norm(edge_index, N, self_loops=self_loops, dtype=torch.float64)
    ref = pyg_gcn_norm(
        edge_index, num_nodes=N, add_self_loops=self_loops, dtype=torch.float64
    )
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])
    A = karate_dense() + (np.eye(N) if self_loops else 0)
    d = A.sum(1)
    A_hat = A / np.sqrt(np.outer(d, d))
    dense = adjacency(ours[0], N, ours[1]).to_dense()
    torch.testing.assert_close(dense, torch.from_numpy(A_hat))
    # the largest eigenvalue of the renormalised adjacency is 1, with eigenvector sqrt(d)
    eigenvalues = np.linalg.eigvalsh(A_hat)
    assert abs(eigenvalues.max() - 1) < 1e-12 and eigenvalues.min() > -1


def test_a_node_without_edges_keeps_only_its_self_loop():
    edge_index, weight = gcn_norm(torch.tensor([[0, 1], [1, 0]]), 3)
    dense = adjacency(edge_index, 3, weight).to_dense()
    assert dense[2, 2] == 1 and dense[2, :2].abs().sum() == 0
    _, weight = gcn_norm(torch.tensor([[0, 1], [1, 0]]), 3, self_loops=False)
    assert torch.isfinite(weight).all()


# --- the GCN layer and the GCN ------------------------------------------------------------


def test_gcnconv_equals_pyg_with_copied_weights_outputs_and_gradients():
    torch.manual_seed(0)
    edge_index = karate_edge_index()
    ref = PygGCNConv(5, 3).double()
    ours = GCNConv(5, 3).double()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref.bias.normal_()
        ours.bias.copy_(ref.bias)
    x = torch.randn(N, 5, dtype=torch.float64, requires_grad=True)
    out_ours, out_ref = ours(x, edge_index), ref(x, edge_index)
    torch.testing.assert_close(out_ours, out_ref)
    g = torch.randn_like(out_ref)
    grads_ours = torch.autograd.grad(out_ours, [x, ours.lin.weight, ours.bias], g)
    grads_ref = torch.autograd.grad(out_ref, [x, ref.lin.weight, ref.bias], g)
    for a, b in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_two_layer_gcn_equals_a_pyg_stack():
    torch.manual_seed(0)
    edge_index = karate_edge_index()
    ours = GCN(N, 8, 2, n_layers=2).double().eval()
    refs = [PygGCNConv(N, 8).double(), PygGCNConv(8, 2).double()]
    for conv, ref in zip(ours.convs, refs, strict=True):
        ref.load_state_dict(conv.state_dict())
    x = torch.eye(N, dtype=torch.float64)
    expected = refs[1](torch.relu(refs[0](x, edge_index)), edge_index)
    torch.testing.assert_close(ours(x, edge_index), expected)


def test_gcn_on_a_graph_without_edges_is_an_mlp():
    torch.manual_seed(0)
    gcn = GCN(6, 10, 3, n_layers=3).double().eval()
    mlp = nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)
    ).double()
    with torch.no_grad():
        for conv, lin in zip(gcn.convs, mlp[::2], strict=True):
            conv.bias.normal_()
            lin.weight.copy_(conv.lin.weight)
            lin.bias.copy_(conv.bias)
    x = torch.randn(9, 6, dtype=torch.float64)
    no_edges = torch.empty(2, 0, dtype=torch.int64)
    torch.testing.assert_close(gcn(x, no_edges), mlp(x))


def test_dropout_acts_only_in_training_mode():
    torch.manual_seed(0)
    gcn = GCN(4, 8, 2, dropout=0.5)
    x, edge_index = torch.randn(N, 4), karate_edge_index()
    gcn.eval()
    torch.testing.assert_close(gcn(x, edge_index), gcn(x, edge_index))
    gcn.train()
    assert not torch.equal(gcn(x, edge_index), gcn(x, edge_index))


# --- label propagation --------------------------------------------------------------------


def test_label_propagation_equals_pyg_and_the_closed_form():
    edge_index, y = karate_edge_index(), karate_labels()
    train_mask = torch.zeros(N, dtype=torch.bool)
    train_mask[[0, 33]] = True
    ours = label_propagation(edge_index, y, train_mask, n_iter=10, alpha=0.8)
    ref = LabelPropagation(num_layers=10, alpha=0.8)(
        y, edge_index, mask=train_mask, post_step=lambda out: out
    )
    torch.testing.assert_close(ours, ref)
    # many iterations: the fixed point (1 - alpha) (I - alpha S)^{-1} Y
    A = karate_dense()
    d = A.sum(1)
    S = A / np.sqrt(np.outer(d, d))
    Y = np.zeros((N, 2))
    Y[[0, 33], y[[0, 33]].numpy()] = 1
    fixed = 0.2 * np.linalg.solve(np.eye(N) - 0.8 * S, Y)
    ours = label_propagation(edge_index, y, train_mask, n_iter=300, alpha=0.8)
    np.testing.assert_allclose(ours.numpy(), fixed, atol=1e-5)


# --- training and accuracy -----------------------------------------------------------------


def test_train_node_classifier_fits_the_karate_leaders():
    torch.manual_seed(0)
    y = karate_labels()
    train_mask = torch.zeros(N, dtype=torch.bool)
    train_mask[[0, 33]] = True
    graph = SimpleNamespace(
        x=torch.eye(N), edge_index=karate_edge_index(), y=y, train_mask=train_mask
    )
    model = GCN(N, 4, 2, dropout=0.0)
    logits = model(graph.x, graph.edge_index)
    first = nn.functional.cross_entropy(logits[train_mask], y[train_mask]).item()
    losses = train_node_classifier(model, graph, epochs=30, lr=0.05, weight_decay=0.0)
    assert len(losses) == 30 and losses[0] == pytest.approx(first, rel=1e-6)
    assert losses[-1] < 0.1 * losses[0]
    assert not model.training
    scores = model(graph.x, graph.edge_index)
    assert accuracy(scores, y, train_mask) == 1.0


def test_accuracy_equals_sklearn():
    torch.manual_seed(0)
    scores, y = torch.randn(50, 3), torch.randint(0, 3, (50,))
    mask = torch.rand(50) < 0.6
    expected = accuracy_score(y[mask].numpy(), scores[mask].argmax(1).numpy())
    assert accuracy(scores, y, mask) == pytest.approx(expected)


# --- over-smoothing ------------------------------------------------------------------------


def test_dirichlet_energy_equals_the_trace_form():
    torch.manual_seed(0)
    edge_index = karate_edge_index()
    x = torch.randn(N, 3, dtype=torch.float64)
    A = karate_dense() + np.eye(N)
    d = A.sum(1)
    laplacian = np.eye(N) - A / np.sqrt(np.outer(d, d))
    expected = np.trace(x.numpy().T @ laplacian @ x.numpy())
    assert dirichlet_energy(x, edge_index).item() == pytest.approx(expected, rel=1e-10)


def test_dirichlet_energy_vanishes_on_the_fixed_point_and_falls_with_propagation():
    edge_index = karate_edge_index()
    d = degree(edge_index[1], N, torch.float64) + 1
    stationary = d.sqrt()[:, None] * torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    assert dirichlet_energy(stationary, edge_index).item() == pytest.approx(
        0, abs=1e-12
    )
    x = torch.randn(N, 2, dtype=torch.float64)
    norm = gcn_norm(edge_index, N, dtype=torch.float64)
    energies = []
    for _ in range(6):
        energies.append(dirichlet_energy(x, edge_index).item())
        x = propagate(x, *norm)
    assert all(b <= a for a, b in itertools.pairwise(energies))


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_fails_with_a_clear_message():
    x = torch.randn(4, 3)
    good = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        propagate(x, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="edge_index must have dtype torch.int64"):
        propagate(x, good.int())
    with pytest.raises(ValueError, match=r"edge_index must hold node ids in 0\.\.3"):
        propagate(x, torch.tensor([[0, 4], [1, 0]]))
    with pytest.raises(ValueError, match="edge_weight must have one entry per edge"):
        propagate(x, good, torch.ones(3))
    with pytest.raises(ValueError, match="index must have one entry per row of src"):
        scatter_sum(torch.ones(3), torch.zeros(2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"index must lie in 0\.\.1"):
        scatter_sum(torch.ones(2), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="num_nodes must be a non-negative int"):
        scatter_sum(torch.ones(2), torch.tensor([0, 1]), -1)
    with pytest.raises(ValueError, match="hidden must be positive"):
        GCN(3, 0, 2)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        GCN(3, 4, 2, dropout=1.0)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        GCNConv(3.0, 2)
    y, mask = torch.tensor([0, 1, 0, 1]), torch.tensor([True, False, False, True])
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        label_propagation(good, y, mask, alpha=1.0)
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        label_propagation(good, y, mask.long())
    with pytest.raises(ValueError, match="scores must have one row per node"):
        accuracy(torch.randn(3, 2), y, mask)
