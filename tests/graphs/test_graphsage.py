"""Tests for ``dlabc.graphs.graphsage``.

The aggregators equal a loop over the targets; the layer equals PyG's ``SAGEConv`` with
copied weights (mean and max, with and without the pooling projection and the output
normalisation, on whole graphs and on bipartite blocks), values and gradients, in
float64; the model equals PyG's ``GraphSAGE``, and one full-batch training step gives
its weights. The sampler's full neighbourhoods are PyG's ``k_hop_subgraph``, and the
mini-batch outputs computed from them equal the full-batch ones; sampled blocks hold
``min(degree, fanout)`` distinct true neighbours of every target, drawn uniformly. The
parts of :func:`split_graph` are PyG's ``subgraph`` of a node partition. Bad input
fails with a clear message.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import SAGEConv as PygSAGEConv
from torch_geometric.nn.models import GraphSAGE as PygGraphSAGE
from torch_geometric.utils import k_hop_subgraph, subgraph

from dlabc.data import Graph, make_csbm
from dlabc.graphs.graphsage import (
    Block,
    GraphSAGE,
    NeighborSampler,
    SAGEConv,
    aggregate,
    full_batch_cost,
    minibatch_cost,
    node_accuracy,
    split_graph,
    train_epoch,
)


@pytest.fixture(scope="module")
def graph() -> Graph:
    return make_csbm(120, n_features=6, degree=5.0, seed=3)


def pyg_layer(ours: SAGEConv, aggr: str, project: bool, normalize: bool):
    in_channels, out_channels = ours.lin_r.in_features, ours.lin_r.out_features
    reference = PygSAGEConv(
        in_channels, out_channels, aggr=aggr, project=project, normalize=normalize
    ).double()
    reference.load_state_dict(ours.state_dict())  # lin_l, lin_r (and lin): one to one
    return reference


# --- the aggregators and the layer ---------------------------------------------------


@pytest.mark.parametrize("aggr", ["mean", "max"])
def test_aggregate_equals_a_loop_over_the_targets(aggr):
    torch.manual_seed(0)
    messages = torch.randn(9, 3, dtype=torch.float64)
    target = torch.tensor([0, 2, 2, 0, 3, 2, 0, 3, 3])  # target 1 receives nothing
    out = aggregate(messages, target, 5, aggr)
    for t in range(5):
        rows = messages[target == t]
        if len(rows) == 0:
            expected = torch.zeros(3, dtype=torch.float64)
        else:
            expected = rows.mean(0) if aggr == "mean" else rows.max(0).values
        torch.testing.assert_close(out[t], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("aggr", ["mean", "max"])
@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_layer_equals_pyg_sageconv(graph, aggr, project, normalize):
    torch.manual_seed(1)
    ours = SAGEConv(6, 4, aggr, project=project, normalize=normalize).double()
    reference = pyg_layer(ours, aggr, project, normalize)
    x = graph.x.double().requires_grad_()
    out = ours(x, graph.edge_index)
    x_ref = graph.x.double().requires_grad_()
    expected = reference(x_ref, graph.edge_index)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # and the gradients, of the input and of every weight
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    for (name, p), q in zip(
        ours.named_parameters(),
        reference.state_dict(keep_vars=True).values(),
        strict=True,
    ):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("aggr", ["mean", "max"])
def test_layer_on_a_bipartite_block_equals_pyg(aggr):
    torch.manual_seed(2)
    x = torch.randn(7, 3, dtype=torch.float64)  # 7 inputs, the first 3 are targets
    edge_index = torch.tensor(
        [[3, 4, 5, 6, 0, 4], [0, 0, 1, 1, 1, 0]]
    )  # target 2: none
    ours = SAGEConv(3, 2, aggr).double()
    reference = pyg_layer(ours, aggr, False, False)
    out = ours(x, edge_index, num_targets=3)
    expected = reference((x, x[:3]), edge_index, size=(7, 3))
    assert out.shape == (3, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    # a target without neighbours keeps only its own term, W_r h_v + b
    own = ours.lin_r(x[2]) + ours.lin_l.bias
    torch.testing.assert_close(out[2], own, rtol=0, atol=1e-14)


@pytest.mark.parametrize("aggr", ["mean", "max"])
def test_model_equals_pyg_graphsage(graph, aggr):
    torch.manual_seed(3)
    ours = GraphSAGE(6, 8, 3, num_layers=3, aggr=aggr, dropout=0.5).double().eval()
    reference = PygGraphSAGE(6, 8, 3, out_channels=3, aggr=aggr, dropout=0.5)
    reference.double().eval().load_state_dict(ours.state_dict(), strict=True)
    x = graph.x.double()
    torch.testing.assert_close(
        ours(x, graph.edge_index), reference(x, graph.edge_index), rtol=0, atol=1e-12
    )


def test_one_full_batch_step_equals_the_same_step_on_pyg(graph):
    torch.manual_seed(4)
    graph = dataclasses.replace(graph, x=graph.x.double())
    ours = GraphSAGE(6, 8, 2).double()
    reference = PygGraphSAGE(6, 8, 2, out_channels=2).double()
    reference.load_state_dict(ours.state_dict())
    optimizer = torch.optim.Adam(ours.parameters(), lr=0.1)
    messages = train_epoch(ours, graph, optimizer)
    assert messages == 2 * graph.edge_index.shape[1]  # two layers, every edge
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.1)
    logits = reference(graph.x, graph.edge_index)
    F.cross_entropy(logits[graph.train_mask], graph.y[graph.train_mask]).backward()
    optimizer.step()
    for (name, p), q in zip(
        ours.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)


# --- sampled mini-batches ------------------------------------------------------------


def test_full_neighbourhoods_are_pygs_k_hop_subgraph_and_give_the_full_outputs(graph):
    batch = torch.tensor([7, 0, 55])
    blocks = NeighborSampler(graph.edge_index, graph.num_nodes, [None, None])(batch)
    subset, *_ = k_hop_subgraph(batch, 2, graph.edge_index, num_nodes=graph.num_nodes)
    assert sorted(blocks[0].nodes.tolist()) == subset.tolist()
    one_hop, *_ = k_hop_subgraph(batch, 1, graph.edge_index, num_nodes=graph.num_nodes)
    assert sorted(blocks[1].nodes.tolist()) == one_hop.tolist()
    assert blocks[1].targets.tolist() == [7, 0, 55]
    torch.manual_seed(5)
    model = GraphSAGE(6, 8, 2, aggr="max").double()
    x = graph.x.double()
    full = model(x, graph.edge_index)[batch]
    mini = model.forward_blocks(x[blocks[0].nodes], blocks)
    torch.testing.assert_close(mini, full, rtol=0, atol=1e-13)


def test_sampled_blocks_hold_min_degree_fanout_distinct_true_neighbours(graph):
    edges = set(map(tuple, graph.edge_index.T.tolist()))
    deg = torch.bincount(graph.edge_index[1], minlength=graph.num_nodes)
    sampler = NeighborSampler(graph.edge_index, graph.num_nodes, [4, 2], seed=1)
    blocks = sampler(torch.tensor([3, 9, 40, 41]))
    for block, fanout in zip(blocks, [4, 2], strict=True):
        # the targets come first among the inputs, and the inputs are distinct
        assert len(set(block.nodes.tolist())) == len(block.nodes)
        u, v = block.nodes[block.edge_index]
        for target in block.targets.tolist():
            neighbours = u[v == target].tolist()
            assert len(neighbours) == len(set(neighbours))  # without replacement
            assert len(neighbours) == min(int(deg[target]), fanout)
            assert all((n, target) in edges for n in neighbours)
    assert torch.equal(blocks[0].targets, blocks[1].nodes)
    cost = minibatch_cost(blocks)
    assert cost == {
        "nodes": len(blocks[0].nodes),
        "edges": int(
            sum(min(int(deg[t]), 4) for t in blocks[0].targets)
            + sum(min(int(deg[t]), 2) for t in blocks[1].targets)
        ),
        "rows": len(blocks[0].targets) + 4,
    }
    assert full_batch_cost(120, 600, 2) == {"nodes": 120, "edges": 1200, "rows": 240}


def test_sampling_is_uniform_and_seeded():
    # 600 stars: centre c has the 5 leaves 600 + 5c + k, k = 0..4; a fanout of 2
    # draws each leaf with probability 2/5
    stars, arms = 600, 5
    centre = torch.arange(stars).repeat_interleave(arms)
    leaf = stars + torch.arange(stars * arms)
    edge_index = torch.stack([torch.cat([leaf, centre]), torch.cat([centre, leaf])])
    sampler = NeighborSampler(edge_index, stars * (arms + 1), [2], seed=0)
    counts = torch.zeros(arms)
    for _ in range(5):  # 3,000 draws of each arm k
        (block,) = sampler(torch.arange(stars))
        drawn = block.nodes[block.edge_index[0]]
        counts += torch.bincount((drawn - stars) % arms, minlength=arms)
    share = counts / (5 * stars)
    assert (share - 0.4).abs().max() < 0.036  # 4 standard deviations of a binomial
    assert len(block.edge_index[0]) == 2 * stars
    again = [
        NeighborSampler(edge_index, 3600, [2], seed=7)(torch.arange(9)) for _ in "ab"
    ]
    assert torch.equal(again[0][0].nodes, again[1][0].nodes)


# --- graphs the model never saw, and training ----------------------------------------


def test_split_graph_gives_pygs_subgraphs_of_a_partition(graph):
    parts = split_graph(graph, 3, seed=3)  # the seed make_csbm used
    assert sum(p.num_nodes for p in parts) == graph.num_nodes
    assert {p.num_nodes for p in parts} == {40}
    seen = []
    for part in parts:
        # find the part's nodes in the whole graph by their (unique) features
        nodes = torch.tensor([int((graph.x == row).all(1).nonzero()) for row in part.x])
        seen += nodes.tolist()
        edge_index, _ = subgraph(nodes, graph.edge_index, relabel_nodes=True)
        assert sorted(map(tuple, edge_index.T.tolist())) == sorted(
            map(tuple, part.edge_index.T.tolist())
        )
        assert torch.equal(part.y, graph.y[nodes])
        assert torch.equal(part.train_mask, graph.train_mask[nodes])
        assert len(part.y.unique()) == 2  # the parts do not follow the classes
    assert sorted(seen) == list(range(graph.num_nodes))


def test_node_accuracy_and_a_sampled_epoch(graph):
    torch.manual_seed(6)
    model = GraphSAGE(6, 8, 2, dropout=0.5)
    model.train()
    predicted = model.eval()(graph.x, graph.edge_index).argmax(1)
    model.train()
    expected = (predicted == graph.y)[graph.test_mask].float().mean().item()
    assert node_accuracy(model, graph, graph.test_mask) == pytest.approx(expected)
    assert model.training  # the mode is restored
    sampler = NeighborSampler(graph.edge_index, graph.num_nodes, [3, 3], seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    messages = train_epoch(
        model, graph, optimizer, sampler, 5, torch.Generator().manual_seed(0)
    )
    # the same batches again, with a fresh sampler and generator: the same messages
    replay = NeighborSampler(graph.edge_index, graph.num_nodes, [3, 3], seed=0)
    train_nodes = graph.train_mask.nonzero().squeeze(1)
    order = torch.randperm(len(train_nodes), generator=torch.Generator().manual_seed(0))
    expected = sum(
        minibatch_cost(replay(train_nodes[b]))["edges"] for b in order.split(5)
    )
    assert messages == expected
    assert all(
        not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)
    )


# --- bad input -----------------------------------------------------------------------


def test_bad_input_fails_clearly(graph):
    with pytest.raises(ValueError, match="aggr must be one of"):
        SAGEConv(4, 2, aggr="sum")
    with pytest.raises(TypeError, match="in_channels must be an int"):
        SAGEConv(4.0, 2)
    layer = SAGEConv(6, 2)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        layer(graph.x[0], graph.edge_index)
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        layer(graph.x, graph.edge_index.T)
    with pytest.raises(TypeError, match="edge_index must have dtype"):
        layer(graph.x, graph.edge_index.int())
    with pytest.raises(ValueError, match="edge_index must hold node ids"):
        layer(graph.x[:10], graph.edge_index)
    with pytest.raises(ValueError, match="num_targets .* must not exceed"):
        layer(graph.x, graph.edge_index, num_targets=500)
    with pytest.raises(ValueError, match=r"edge_index\[1\] \(the targets\)"):
        layer(graph.x, graph.edge_index, num_targets=3)
    with pytest.raises(ValueError, match="aggr must be one of"):
        aggregate(graph.x, torch.zeros(len(graph.x), dtype=torch.long), 1, "min")
    with pytest.raises(ValueError, match="dropout must be in"):
        GraphSAGE(6, 8, 2, dropout=1.0)
    with pytest.raises(
        ValueError, match="blocks must be a list of one Block per layer"
    ):
        GraphSAGE(6, 8, 2).forward_blocks(
            graph.x, [Block(torch.arange(3), torch.zeros(2, 0, dtype=torch.long), 3)]
        )
    with pytest.raises(ValueError, match="every fanout .* must be positive"):
        NeighborSampler(graph.edge_index, graph.num_nodes, [3, 0])
    with pytest.raises(TypeError, match="fanouts must be a non-empty list"):
        NeighborSampler(graph.edge_index, graph.num_nodes, [])
    with pytest.raises(ValueError, match="edge_index must hold node ids"):
        NeighborSampler(graph.edge_index, 50, [3])
    sampler = NeighborSampler(graph.edge_index, graph.num_nodes, [3])
    with pytest.raises(ValueError, match="batch must not repeat"):
        sampler(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="batch must hold node ids in 0..119"):
        sampler(torch.tensor([120]))
    with pytest.raises(ValueError, match=r"parts \(200\) exceeds"):
        split_graph(graph, 200)
