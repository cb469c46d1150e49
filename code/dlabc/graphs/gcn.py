"""Message passing and graph convolutional networks (GCN).

Chapter: ``book/graphs/gcn.md``.

A graph is a node-feature matrix ``x`` of shape ``(N, F)`` and an ``edge_index`` of
shape ``(2, E)``: column ``e`` is the edge ``edge_index[0, e] -> edge_index[1, e]``,
from a *source* node ``j`` to a *target* node ``i``, and an undirected graph lists both
directions. :func:`propagate` is the message-passing primitive that this chapter and the
later ones (GraphSAGE, GAT) build on: gather a message from every edge's source,
scatter-add it into the edge's target.

References:
- Gilmer, Schoenholz, Riley, Vinyals & Dahl (2017), *Neural Message Passing for Quantum
  Chemistry* (the message-passing framework, :func:`propagate`).
- Kipf & Welling (2017), *Semi-Supervised Classification with Graph Convolutional
  Networks* (the renormalised adjacency, :func:`gcn_norm`; :class:`GCNConv`,
  :class:`GCN`).
- Zhou, Bousquet, Lal, Weston & Schölkopf (2004), *Learning with Local and Global
  Consistency* (label propagation, :func:`label_propagation`).
- Li, Han & Wu (2018), *Deeper Insights into Graph Convolutional Networks for
  Semi-Supervised Learning*, and Cai & Wang (2020), *A Note on Over-Smoothing for Graph
  Neural Networks* (over-smoothing, :func:`dirichlet_energy`).
- Deshpande, Sen, Montanari & Mossel (2018), *Contextual Stochastic Block Models* (the
  generated graphs of the chapter's experiments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import (
    check_edge_index,
    check_number,
    check_positive_int,
    check_tensor,
)

__all__ = [
    "scatter_sum",
    "propagate",
    "add_self_loops",
    "degree",
    "gcn_norm",
    "adjacency",
    "GCNConv",
    "GCN",
    "label_propagation",
    "train_node_classifier",
    "accuracy",
    "dirichlet_energy",
]

# ---------------------------------------------------------------------------------
# 1. Message passing: gather along the edges, scatter-add into the targets
# ---------------------------------------------------------------------------------


def scatter_sum(src: torch.Tensor, index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    r"""Sum the rows of ``src`` that share an ``index``:
    $\text{out}_i = \sum_{e:\ \text{index}_e = i} \text{src}_e$.

    ``src`` is ``(E, ...)``, ``index`` is ``(E,)`` int64 with values in
    ``0..num_nodes - 1``; the result is ``(num_nodes, ...)``, zero for an index that
    never occurs.
    """
    _check_scatter(src, index, num_nodes)
    out = src.new_zeros((num_nodes, *src.shape[1:]))  # (N, ...)
    return out.index_add_(0, index, src)


def propagate(
    x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None
) -> torch.Tensor:
    r"""One round of message passing: every node sums the (weighted) features of the
    nodes that have an edge into it,

    $\mathbf{x}'_i = \sum_{j \to i} w_{ji}\, \mathbf{x}_j ,$

    which is the sparse matrix product $A\mathbf{X}$ with $A_{ij} = w_{ji}$
    (:func:`adjacency`). ``x`` is ``(N, ...)``, ``edge_index`` ``(2, E)`` with rows
    (source $j$, target $i$), ``edge_weight`` ``(E,)`` or ``None`` for all ones.
    """
    _check_graph(x, edge_index, edge_weight)
    source, target = edge_index  # edge e goes from node source[e] to node target[e]
    messages = x.index_select(0, source)  # (E, ...): each edge carries its source's x
    if edge_weight is not None:
        messages = edge_weight.view(-1, *[1] * (x.dim() - 1)) * messages
    return scatter_sum(messages, target, x.shape[0])  # (N, ...): summed at the targets


def add_self_loops(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Append the edge ``i -> i`` for every node:
    ``(2, E)`` -> ``(2, E + num_nodes)``."""
    check_edge_index(edge_index, num_nodes)
    loops = torch.arange(num_nodes, device=edge_index.device).expand(2, num_nodes)
    return torch.cat([edge_index, loops], dim=1)


def degree(
    index: torch.Tensor, num_nodes: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """How often each node occurs in ``index`` (``edge_index[1]`` gives the in-degree):
    a ``(num_nodes,)`` float tensor."""
    check_tensor(index, "index", ndim=1, dtype=torch.int64)
    ones = torch.ones(index.shape[0], dtype=dtype, device=index.device)
    return scatter_sum(ones, index, num_nodes)


# ---------------------------------------------------------------------------------
# 2. The normalised adjacency and the GCN layer
# ---------------------------------------------------------------------------------


def gcn_norm(
    edge_index: torch.Tensor,
    num_nodes: int,
    self_loops: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The edges and weights of Kipf and Welling's renormalised adjacency

    $\hat A = \tilde D^{-1/2} \tilde A \tilde D^{-1/2}, \quad \tilde A = A + I, \quad
    \tilde d_i = \sum_j \tilde A_{ij},$

    so that ``propagate(x, *gcn_norm(edge_index, N))`` computes $\hat A X$. Each edge
    $j \to i$ gets the weight $1 / \sqrt{\tilde d_j \tilde d_i}$. With
    ``self_loops=False`` it is $D^{-1/2} A D^{-1/2}$ instead (a node with no edge
    keeps weight zero).
    """
    if self_loops:
        edge_index = add_self_loops(edge_index, num_nodes)  # Ã = A + I: (2, E + N)
    source, target = edge_index
    d = degree(target, num_nodes, dtype)  # d̃_i, the in-degree of every node
    d_inv_sqrt = d.pow(-0.5).masked_fill(d == 0, 0.0)  # D̃^{-1/2}
    return edge_index, d_inv_sqrt[source] * d_inv_sqrt[target]


def adjacency(
    edge_index: torch.Tensor,
    num_nodes: int,
    edge_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The graph as a sparse ``(num_nodes, num_nodes)`` COO tensor with
    $A_{ij} = w_{ji}$ for every edge $j \to i$, so that ``adjacency(...) @ x`` equals
    ``propagate(x, edge_index, edge_weight)``."""
    check_edge_index(edge_index, num_nodes)
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.shape[1], device=edge_index.device)
    check_tensor(edge_weight, "edge_weight", ndim=1, floating=True)
    if edge_weight.shape[0] != edge_index.shape[1]:
        raise ValueError(
            f"edge_weight must have one entry per edge ({edge_index.shape[1]}), "
            f"got shape {tuple(edge_weight.shape)}"
        )
    rows_cols = edge_index.flip(0)  # row = target i, column = source j
    shape = (num_nodes, num_nodes)
    return torch.sparse_coo_tensor(rows_cols, edge_weight, shape, check_invariants=True)


class GCNConv(nn.Module):
    r"""One graph convolution (Kipf & Welling, 2017, eq. 2):

    $H' = \hat A\, H W + \mathbf{b},$

    a linear map of every node's features followed by a degree-normalised sum over the
    node and its neighbours. The parameter names (``lin.weight``, ``bias``) are PyTorch
    Geometric's, so its ``GCNConv`` state dict loads as it is.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        self.lin = nn.Linear(in_channels, out_channels, bias=False)  # W
        self.bias = nn.Parameter(torch.zeros(out_channels))  # b
        nn.init.xavier_uniform_(self.lin.weight)  # Glorot, as in the paper

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        edge_index, weight = gcn_norm(edge_index, x.shape[0], dtype=x.dtype)
        h = self.lin(x)  # H W: (N, out_channels)
        return propagate(h, edge_index, weight) + self.bias  # Â H W + b


class GCN(nn.Module):
    r"""A GCN of ``n_layers`` graph convolutions with ReLU between them and dropout
    before each (Kipf & Welling, 2017, eq. 9, for ``n_layers=2``):

    $Z = \hat A\ \mathrm{ReLU}(\hat A X W^{(0)})\, W^{(1)} .$

    Its output is one logit per class and node. On a graph without edges
    $\hat A = I$, and the same network is a plain MLP of the node features.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        n_layers: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_positive_int(hidden, "hidden")
        check_positive_int(n_layers, "n_layers")
        check_number(dropout, "dropout", low=0, high=1, high_open=True)
        dims = [in_channels] + [hidden] * (n_layers - 1) + [out_channels]
        self.convs = nn.ModuleList(
            GCNConv(d_in, d_out)
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for k, conv in enumerate(self.convs):
            x = F.dropout(x, self.dropout, self.training)
            x = conv(x, edge_index)  # (N, hidden), the last layer (N, out_channels)
            if k < len(self.convs) - 1:
                x = F.relu(x)
        return x


# ---------------------------------------------------------------------------------
# 3. A structure-only baseline: label propagation
# ---------------------------------------------------------------------------------


def label_propagation(
    edge_index: torch.Tensor,
    y: torch.Tensor,
    train_mask: torch.Tensor,
    n_iter: int = 50,
    alpha: float = 0.9,
) -> torch.Tensor:
    r"""Spread the known labels along the edges (Zhou et al., 2004):

    $F^{(t+1)} = \alpha\, S F^{(t)} + (1 - \alpha)\, Y, \quad
    S = D^{-1/2} A D^{-1/2},$

    where $Y$ is one-hot on the training nodes and zero elsewhere, starting from
    $F^{(0)} = Y$. It converges to $(1 - \alpha)(I - \alpha S)^{-1} Y$. It never looks
    at the node features. Returns the ``(N, C)`` scores; their argmax is the prediction.
    """
    n = y.shape[0]
    _check_labels(y, train_mask, "y")
    check_positive_int(n_iter, "n_iter")
    check_number(alpha, "alpha", low=0, high=1, low_open=True, high_open=True)
    edge_index, weight = gcn_norm(edge_index, n, self_loops=False)  # S
    Y = F.one_hot(y, int(y.max()) + 1).float() * train_mask[:, None]  # (N, C)
    scores = Y
    for _ in range(n_iter):
        scores = alpha * propagate(scores, edge_index, weight) + (1 - alpha) * Y
    return scores


# ---------------------------------------------------------------------------------
# 4. Training on the nodes of one graph
# ---------------------------------------------------------------------------------


def train_node_classifier(
    model: nn.Module,
    graph: object,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
) -> list[float]:
    """Full-batch training with Adam and the cross-entropy of the training nodes only,
    as in Kipf & Welling (2017): the forward pass sees the whole graph, but only the
    nodes in ``graph.train_mask`` have labels. ``graph`` has ``x``, ``edge_index``,
    ``y`` and ``train_mask`` (a ``dlabc.data.Graph``). Returns the loss of every epoch.
    """
    check_positive_int(epochs, "epochs")
    _check_labels(graph.y, graph.train_mask, "graph.y")
    _check_graph(graph.x, graph.edge_index, None)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        logits = model(graph.x, graph.edge_index)  # (N, C)
        mask = graph.train_mask
        loss = F.cross_entropy(logits[mask], graph.y[mask])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def accuracy(scores: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    """The fraction of the nodes in ``mask`` whose highest score is their label."""
    check_tensor(scores, "scores", ndim=2)
    _check_labels(y, mask, "y")
    if scores.shape[0] != y.shape[0]:
        raise ValueError(
            f"scores must have one row per node ({y.shape[0]}), "
            f"got shape {tuple(scores.shape)}"
        )
    return (scores[mask].argmax(1) == y[mask]).float().mean().item()


# ---------------------------------------------------------------------------------
# 5. Over-smoothing
# ---------------------------------------------------------------------------------


def dirichlet_energy(x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    r"""How much the node features change across edges, measured in the geometry of
    the GCN's propagation (Cai & Wang, 2020):

    $E(X) = \operatorname{tr}\big(X^\top (I - \hat A) X\big)
    = \tfrac12 \sum_{j \to i} \Big\lVert \frac{\mathbf{x}_i}{\sqrt{\tilde d_i}}
    - \frac{\mathbf{x}_j}{\sqrt{\tilde d_j}} \Big\rVert^2 .$

    It is zero exactly when $X$ is a multiple of $\tilde D^{1/2}\mathbf{1}$ in every
    column on each connected component: the state that repeated propagation with
    $\hat A$ converges to.
    """
    _check_graph(x, edge_index, None)
    source, target = edge_index
    d = degree(target, x.shape[0], x.dtype) + 1  # d̃ = d + 1, the self-loop included
    z = x / d.sqrt().view(-1, *[1] * (x.dim() - 1))  # x_i / sqrt(d̃_i)
    return 0.5 * (z[target] - z[source]).pow(2).sum()


# ---------------------------------------------------------------------------------
# Argument checks (the page shows the algorithm, not these)
# ---------------------------------------------------------------------------------


def _check_scatter(src: object, index: object, num_nodes: object) -> None:
    check_tensor(src, "src", ndim=range(1, 9))
    check_tensor(index, "index", ndim=1, dtype=torch.int64)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
        raise ValueError(f"num_nodes must be a non-negative int, got {num_nodes!r}")
    if index.shape[0] != src.shape[0]:
        raise ValueError(
            f"index must have one entry per row of src ({src.shape[0]}), "
            f"got shape {tuple(index.shape)}"
        )
    if index.device.type == "cpu" and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_nodes:
            raise ValueError(
                f"index must lie in 0..{num_nodes - 1}, got values from {low} to {high}"
            )


def _check_graph(x: object, edge_index: object, edge_weight: object | None) -> None:
    check_tensor(x, "x", ndim=range(1, 9))
    check_edge_index(edge_index, x.shape[0])
    if edge_weight is not None:
        check_tensor(edge_weight, "edge_weight", ndim=1, floating=True)
        if edge_weight.shape[0] != edge_index.shape[1]:
            raise ValueError(
                f"edge_weight must have one entry per edge ({edge_index.shape[1]}), "
                f"got shape {tuple(edge_weight.shape)}"
            )


def _check_labels(y: object, mask: object, name: str) -> None:
    check_tensor(y, name, ndim=1, dtype=torch.int64)
    check_tensor(mask, "mask", ndim=1, dtype=torch.bool)
    if mask.shape != y.shape:
        raise ValueError(
            f"mask must have one entry per node ({y.shape[0]}), "
            f"got shape {tuple(mask.shape)}"
        )
