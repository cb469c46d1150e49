"""GraphSAGE: sampling neighbours, learning inductively.

Chapter: ``book/graphs/graphsage.md``.

A GraphSAGE layer computes a node's new representation from its own and from an
aggregate (mean or max) of its neighbours', with weights that do not depend on which
node or which graph: so a trained model applies to nodes and graphs it never saw. To
train on large graphs it computes a mini-batch of nodes from a *sample* of a fixed
number of neighbours per node and layer, not from the whole neighbourhood.

References:
- Hamilton, Ying & Leskovec (2017), *Inductive Representation Learning on Large Graphs*
  (the layer, Algorithm 1: :class:`SAGEConv`, :class:`GraphSAGE`; the mean and pooling
  aggregators; the sampled mini-batches of Algorithm 2: :class:`NeighborSampler`).
- Fey & Lenssen (2019), *Fast Graph Representation Learning with PyTorch Geometric*
  (``torch_geometric.nn.SAGEConv``, the reference whose parameter names ``lin_l``,
  ``lin_r`` and ``lin`` the layer uses, so that its weights copy over one to one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlabc.checks import (
    check_edge_index,
    check_number,
    check_positive_int,
    check_tensor,
)
from dlabc.data import Graph
from dlabc.graphs.gcn import degree, scatter_sum

__all__ = [
    "AGGREGATORS",
    "aggregate",
    "SAGEConv",
    "GraphSAGE",
    "Block",
    "NeighborSampler",
    "minibatch_cost",
    "full_batch_cost",
    "split_graph",
    "node_accuracy",
    "train_epoch",
]

#: The neighbourhood aggregators the layer offers (PyG's ``aggr`` names).
AGGREGATORS = ("mean", "max")


# ---------------------------------------------------------------------------------
# 1. The layer
# ---------------------------------------------------------------------------------


def aggregate(messages: Tensor, target: Tensor, num_targets: int, aggr: str) -> Tensor:
    """Combine the ``messages`` (E, F) of all edges that enter the same target:
    their mean, or their elementwise maximum, per target -> (num_targets, F). A
    target that no edge enters gets 0."""
    _check_aggregate(messages, target, num_targets, aggr)
    if aggr == "mean":
        total = scatter_sum(messages, target, num_targets)  # (T, F)
        count = degree(target, num_targets, dtype=messages.dtype).clamp(min=1)  # (T,)
        return total / count[:, None]
    index = target[:, None].expand_as(messages)  # (E, F): each row goes to its target
    empty = messages.new_zeros(num_targets, messages.shape[1])  # (T, F)
    return empty.scatter_reduce(0, index, messages, "amax", include_self=False)


class SAGEConv(nn.Module):
    """One GraphSAGE layer, with the parameter names of PyG's ``SAGEConv``.

    For every target node $v$, aggregate its neighbours' features, then add the
    transformed aggregate to the node's own transformed features:

    $h_{\\mathcal N(v)} = \\operatorname{AGG}\\{h_u : u \\in \\mathcal N(v)\\},
    \\qquad h_v' = W_l\\, h_{\\mathcal N(v)} + b + W_r\\, h_v$

    ``aggr`` is ``"mean"`` or ``"max"`` (elementwise over the neighbours; a node without
    neighbours aggregates to 0). ``project=True`` first maps every neighbour through
    $\\sigma(W h_u + b)$, the paper's pooling aggregator when ``aggr="max"``;
    ``normalize=True`` scales each $h_v'$ to unit length (Algorithm 1, line 7).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        aggr: str = "mean",
        project: bool = False,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        _check_layer(in_channels, out_channels, aggr)
        self.aggr, self.project, self.normalize = aggr, project, normalize
        if project:  # W and b of the pooling aggregator
            self.lin = nn.Linear(in_channels, in_channels)
        self.lin_l = nn.Linear(in_channels, out_channels)  # W_l and b: the neighbours
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False)  # W_r: the node

    def forward(
        self, x: Tensor, edge_index: Tensor, num_targets: int | None = None
    ) -> Tensor:
        """``x`` (N_in, F) holds the features of the layer's inputs, its targets first;
        ``edge_index`` (2, E) has rows (neighbour u, target v), local indices; the
        output (num_targets, F_out) holds the targets' new features (all N_in by
        default: the full graph, where every node is a target)."""
        num_targets = _check_input(x, edge_index, num_targets)
        u, v = edge_index
        h_u = self.lin(x).relu() if self.project else x  # (N_in, F)
        h_neighbours = aggregate(h_u[u], v, num_targets, self.aggr)  # (T, F)
        out = self.lin_l(h_neighbours) + self.lin_r(x[:num_targets])  # (T, F_out)
        return F.normalize(out, dim=-1) if self.normalize else out


class GraphSAGE(nn.Module):
    """``num_layers`` GraphSAGE layers with ReLU (and dropout) between them, like PyG's
    ``torch_geometric.nn.models.GraphSAGE``.

    :meth:`forward` computes every node of a whole graph (full batch);
    :meth:`forward_blocks` computes only a mini-batch's targets, from the inputs and
    the sampled edges of the :class:`Block` s that a :class:`NeighborSampler` made.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        num_layers: int = 2,
        aggr: str = "mean",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int(num_layers, "num_layers")
        check_positive_int(hidden_channels, "hidden_channels")
        self.dropout = check_number(dropout, "dropout", low=0, high=1, high_open=True)
        sizes = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        self.convs = nn.ModuleList(
            SAGEConv(a, b, aggr) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def _activate(self, h: Tensor, layer: int) -> Tensor:
        if layer == len(self.convs) - 1:  # the last layer gives the logits
            return h
        return F.dropout(h.relu(), self.dropout, self.training)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Full batch: ``x`` (N, F) of all nodes, every edge, every layer -> (N, C)."""
        for layer, conv in enumerate(self.convs):
            x = self._activate(conv(x, edge_index), layer)
        return x

    def forward_blocks(self, x: Tensor, blocks: list[Block]) -> Tensor:
        """Mini-batch: ``x`` (len(blocks[0].nodes), F), the input nodes' features ->
        (batch size, C), the outputs of the last block's targets."""
        _check_blocks(blocks, len(self.convs))
        for layer, (conv, block) in enumerate(zip(self.convs, blocks, strict=True)):
            edge_index = block.edge_index.to(x.device)  # the sampler works on the CPU
            x = self._activate(conv(x, edge_index, block.num_targets), layer)
        return x


# ---------------------------------------------------------------------------------
# 2. Sampled mini-batches
# ---------------------------------------------------------------------------------


@dataclass
class Block:
    """What one layer of a mini-batch computes: the targets' outputs from its inputs.

    ``nodes`` (N_in,) are the global ids of the layer's inputs, the ``num_targets``
    targets first; ``edge_index`` (2, E) holds the sampled edges (neighbour, target) as
    positions in ``nodes``.
    """

    nodes: Tensor
    edge_index: Tensor
    num_targets: int

    @property
    def targets(self) -> Tensor:
        return self.nodes[: self.num_targets]


class NeighborSampler:
    r"""GraphSAGE's mini-batches (Algorithm 2): from a batch of target nodes, sample
    up to $s_k$ neighbours of every node that layer $k$ computes, from the last layer
    back to the first. ``fanouts`` lists $[s_1, \dots, s_K]$, the first layer's first;
    ``None`` takes every neighbour.

    Called with a batch of node ids, it returns one :class:`Block` per layer, first
    layer first, for :meth:`GraphSAGE.forward_blocks`.
    """

    def __init__(
        self,
        edge_index: Tensor,
        num_nodes: int,
        fanouts: list[int | None],
        seed: int = 0,
    ) -> None:
        _check_sampler(edge_index, num_nodes, fanouts)
        self.num_nodes, self.fanouts = num_nodes, list(fanouts)
        self.generator = torch.Generator().manual_seed(seed)
        # the edges sorted by target: v's neighbours are source[ptr[v] : ptr[v + 1]]
        u, v = edge_index.cpu()
        self.source = u[torch.argsort(v, stable=True)]
        self.degree = torch.bincount(v, minlength=num_nodes)  # (N,)
        self.ptr = torch.cumsum(self.degree, 0) - self.degree  # (N,) first edge of v

    def sample(self, targets: Tensor, fanout: int | None) -> tuple[Tensor, Tensor]:
        """Up to ``fanout`` neighbours of every target, uniformly without replacement
        (all of them where a node has fewer): their global ids (E,) and the position
        (E,) of the target each one belongs to."""
        degree = self.degree[targets]  # (T,)
        owner = torch.repeat_interleave(torch.arange(len(targets)), degree)  # (E_all,)
        first = torch.cumsum(degree, 0) - degree
        rank = torch.arange(len(owner)) - first[owner]  # 0, 1, ... within each target
        edge = self.ptr[targets][owner] + rank  # (E_all,) positions in self.source
        if fanout is not None:
            # shuffle each target's edges (sort by owner + a key in [0, 1)) and keep
            # the first `fanout` of each: the owners stay in place, so `rank` still
            # counts within each target
            key = torch.rand(len(edge), generator=self.generator, dtype=torch.float64)
            edge = edge[torch.argsort(owner + key)]
            keep = rank < fanout
            edge, owner = edge[keep], owner[keep]
        return self.source[edge], owner

    def __call__(self, batch: Tensor) -> list[Block]:
        """The blocks that compute the nodes ``batch`` (B,) with len(fanouts) layers."""
        _check_batch(batch, self.num_nodes)
        nodes, blocks = batch.cpu(), []
        for fanout in reversed(self.fanouts):  # the last layer first
            neighbours, v = self.sample(nodes, fanout)
            # the layer's inputs: its targets (first), then the new neighbours
            inputs, u = _first_occurrence_order(torch.cat([nodes, neighbours]))
            edge_index = torch.stack([u[len(nodes) :], v])  # (2, E) local
            blocks.insert(0, Block(inputs, edge_index, len(nodes)))
            nodes = inputs
        return blocks


def _first_occurrence_order(ids: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct values of ``ids`` in the order they first occur, and the position
    of every entry of ``ids`` among them."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((len(distinct),), len(ids)).scatter_reduce(
        0, inverse, torch.arange(len(ids)), reduce="amin"
    )
    order = torch.argsort(first)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return distinct[order], position[inverse]


def minibatch_cost(blocks: list[Block]) -> dict[str, int]:
    """What a mini-batch touches: the input nodes whose features it reads, the
    messages (edges) it aggregates and the rows it computes, over all layers."""
    return {
        "nodes": len(blocks[0].nodes),
        "edges": sum(b.edge_index.shape[1] for b in blocks),
        "rows": sum(b.num_targets for b in blocks),
    }


def full_batch_cost(num_nodes: int, num_edges: int, num_layers: int) -> dict[str, int]:
    """The same counts for one full-batch pass: every node, every edge, every layer."""
    return {
        "nodes": num_nodes,
        "edges": num_layers * num_edges,
        "rows": num_layers * num_nodes,
    }


# ---------------------------------------------------------------------------------
# 3. Graphs the model never saw, and training
# ---------------------------------------------------------------------------------


def split_graph(graph: Graph, parts: int, seed: int = 0) -> list[Graph]:
    """Cut ``graph`` into ``parts`` disjoint graphs: a random partition of its nodes,
    each part with the edges inside it (the edges between parts are dropped), its
    features, labels and masks. Parts of a stochastic block model are themselves
    stochastic block models, with the same classes and features and ``1 / parts`` of
    the degree: fresh graphs from the same distribution."""
    check_positive_int(parts, "parts")
    if parts > graph.num_nodes:
        raise ValueError(f"parts ({parts}) exceeds the number of nodes")
    # NumPy's generator, not torch's: a torch.Generator seeded like make_csbm's would
    # repeat its permutation, and the parts would follow the classes
    rng = np.random.default_rng([seed, 0x5A6E])
    part = torch.from_numpy(rng.permutation(graph.num_nodes) % parts)  # (N,)
    u, v = graph.edge_index
    graphs = []
    for k in range(parts):
        nodes = (part == k).nonzero().squeeze(1)  # (N_k,) in increasing order
        new_id = torch.full((graph.num_nodes,), -1)
        new_id[nodes] = torch.arange(len(nodes))
        inside = (part[u] == k) & (part[v] == k)
        masks = [
            None if m is None else m[nodes]
            for m in (graph.train_mask, graph.val_mask, graph.test_mask)
        ]
        edge_index = torch.stack([new_id[u[inside]], new_id[v[inside]]])
        graphs.append(Graph(graph.x[nodes], edge_index, graph.y[nodes], *masks))
    return graphs


@torch.no_grad()
def node_accuracy(model: nn.Module, graph: Graph, mask: Tensor | None = None) -> float:
    """The share of the nodes in ``mask`` (all nodes by default) that ``model``,
    computing the whole graph in evaluation mode, labels correctly."""
    was_training = model.training
    model.eval()
    predicted = model(graph.x, graph.edge_index).argmax(1)  # (N,)
    model.train(was_training)
    correct = predicted == graph.y
    return (correct if mask is None else correct[mask]).float().mean().item()


def train_epoch(
    model: GraphSAGE,
    graph: Graph,
    optimizer: torch.optim.Optimizer,
    sampler: NeighborSampler | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> int:
    """One pass over the training nodes; returns the messages it aggregated.

    Without a ``sampler``: one full-batch step, every node and edge in every layer.
    With one: a step per random batch of ``batch_size`` training nodes, each from its
    sampled blocks only.
    """
    train_nodes = graph.train_mask.nonzero().squeeze(1)  # (N_train,)
    if sampler is None:  # one step on the whole graph
        batches = [train_nodes]
    else:  # the training nodes in a random order, cut into batches
        order = torch.randperm(len(train_nodes), generator=generator)
        batches = train_nodes[order.to(train_nodes.device)].split(batch_size)
    model.train()
    messages = 0
    for targets in batches:
        if sampler is None:  # every node, every edge, every layer
            logits = model(graph.x, graph.edge_index)[targets]  # (B, C)
            messages += len(model.convs) * graph.edge_index.shape[1]
        else:  # only the targets, from their sampled neighbourhoods
            blocks = sampler(targets)
            inputs = blocks[0].nodes.to(graph.x.device)  # (N_in,) global ids
            logits = model.forward_blocks(graph.x[inputs], blocks)  # (B, C)
            messages += minibatch_cost(blocks)["edges"]
        loss = F.cross_entropy(logits, graph.y[targets])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return messages


# ---------------------------------------------------------------------------------
# Argument checks of the public entry points (not shown on the page)
# ---------------------------------------------------------------------------------


def _check_layer(in_channels: object, out_channels: object, aggr: object) -> None:
    check_positive_int(in_channels, "in_channels")
    check_positive_int(out_channels, "out_channels")
    if aggr not in AGGREGATORS:
        raise ValueError(f"aggr must be one of {AGGREGATORS}, got {aggr!r}")


def _check_aggregate(
    messages: object, target: object, num_targets: object, aggr: object
) -> None:
    check_tensor(messages, "messages", ndim=2, floating=True)
    check_tensor(target, "target", ndim=1, dtype=torch.long)
    if aggr not in AGGREGATORS:
        raise ValueError(f"aggr must be one of {AGGREGATORS}, got {aggr!r}")
    if len(target) != len(messages):
        raise ValueError(
            f"target must hold one entry per message ({len(messages)}), "
            f"got shape {tuple(target.shape)}"
        )
    check_positive_int(num_targets, "num_targets")


def _check_blocks(blocks: object, num_layers: int) -> None:
    if not isinstance(blocks, (list, tuple)) or len(blocks) != num_layers:
        raise ValueError(
            f"blocks must be a list of one Block per layer ({num_layers}), "
            f"got {blocks!r:.80}"
        )


def _check_input(x: object, edge_index: object, num_targets: object) -> int:
    check_tensor(x, "x", ndim=2, floating=True)
    if num_targets is None:
        num_targets = len(x)
    check_positive_int(num_targets, "num_targets")
    if num_targets > len(x):
        raise ValueError(
            f"num_targets ({num_targets}) must not exceed the number of input "
            f"nodes, len(x) = {len(x)}"
        )
    check_edge_index(edge_index, len(x))
    if edge_index.device.type == "cpu" and edge_index.numel():
        if int(edge_index[1].max()) >= num_targets:
            raise ValueError(
                f"edge_index[1] (the targets) must lie in 0..{num_targets - 1}, "
                f"got {int(edge_index[1].max())}"
            )
    return num_targets


def _check_sampler(edge_index: object, num_nodes: object, fanouts: object) -> None:
    check_positive_int(num_nodes, "num_nodes")
    check_edge_index(edge_index, num_nodes)
    if not isinstance(fanouts, (list, tuple)) or not fanouts:
        raise TypeError(f"fanouts must be a non-empty list, got {fanouts!r}")
    for fanout in fanouts:
        if fanout is not None:
            check_positive_int(fanout, "every fanout (or None)")


def _check_batch(batch: object, num_nodes: int) -> None:
    check_tensor(batch, "batch", ndim=1, dtype=torch.long)
    if len(batch) == 0:
        raise ValueError("batch must hold at least one node id")
    low, high = int(batch.min()), int(batch.max())
    if low < 0 or high >= num_nodes:
        raise ValueError(
            f"batch must hold node ids in 0..{num_nodes - 1}, got {low} to {high}"
        )
    if len(torch.unique(batch)) != len(batch):
        raise ValueError("batch must not repeat a node id")
