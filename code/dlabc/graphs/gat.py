"""Graph attention networks (GAT): a softmax over every node's neighbours decides how
much of each neighbour's message the node takes.

Chapter: ``book/graphs/gat.md``.

A GCN layer averages a node's neighbourhood with weights fixed by the degrees. A graph
attention layer computes the weights from the features: every edge $j \\to i$ gets a
score from the two nodes' transformed features, and a softmax over the edges that enter
$i$ turns the scores into coefficients $\\alpha_{ij}$ that sum to one. Several heads do
this side by side. The message passing itself (gather from the sources, sum at the
targets) is :func:`dlabc.graphs.gcn.scatter_sum`, from the GCN chapter.

References:
- Veličković, Cucurull, Casanova, Romero, Liò & Bengio (2018), *Graph Attention
  Networks* (the layer, eqs. 1-6: :class:`GATConv`; the two-layer model of its
  transductive experiments: :class:`GAT`).
- Brody, Alon & Yahav (2022), *How Attentive are Graph Attention Networks?* (GAT's
  attention is *static*: every receiver ranks the nodes in the same order;
  :func:`source_scores`).
- Fey & Lenssen (2019), *Fast Graph Representation Learning with PyTorch Geometric*
  (``torch_geometric.nn.GATConv``, whose parameter names ``lin``, ``att_src``,
  ``att_dst`` and ``bias`` the layer uses, so that its weights copy over one to one).
- Zhu, Yan, Zhao, Heimann, Akoglu & Koutra (2020), *Beyond Homophily in Graph Neural
  Networks*, and Pei, Wei, Chang, Lei & Yang (2020), *Geom-GCN* (heterophily, and the
  node homophily that :func:`neighbour_homophily` generalises to attention weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlabc.checks import (
    check_edge_index,
    check_number,
    check_positive_int,
    check_tensor,
)
from dlabc.graphs.gcn import add_self_loops, scatter_sum

__all__ = [
    "segment_softmax",
    "GATConv",
    "GAT",
    "source_scores",
    "neighbour_homophily",
]

# ---------------------------------------------------------------------------------
# 1. A softmax over the edges that enter each node
# ---------------------------------------------------------------------------------


def segment_softmax(scores: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    r"""The softmax of ``scores`` (E, ...) within each group of edges that share a
    target in ``index`` (E,):

    $\alpha_e = \dfrac{\exp(s_e)}{\sum_{e':\ \text{index}_{e'} = \text{index}_e}
    \exp(s_{e'})} .$

    Each group's largest score is subtracted first, which changes nothing in exact
    arithmetic and keeps ``exp`` from overflowing. Every group's entries sum to one
    (in every trailing position, e.g. every head).
    """
    _check_softmax(scores, index, num_nodes)
    return _segment_softmax(scores, index, num_nodes)


def _segment_softmax(scores: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    spread = index.view(-1, *[1] * (scores.dim() - 1)).expand_as(scores)  # (E, ...)
    start = scores.new_full((num_nodes, *scores.shape[1:]), float("-inf"))  # (N, ...)
    largest = start.scatter_reduce(0, spread, scores.detach(), "amax")  # per group
    z = (scores - largest[index]).exp()  # (E, ...), each at most 1
    return z / scatter_sum(z, index, num_nodes)[index]  # divided by its group's sum


# ---------------------------------------------------------------------------------
# 2. The graph attention layer and the two-layer GAT
# ---------------------------------------------------------------------------------


class GATConv(nn.Module):
    r"""One multi-head graph attention layer (Veličković et al., 2018, eqs. 1-6), with
    the parameter names of PyG's ``GATConv``.

    Every head $k$ maps the features with its own $W^k$ and scores the edge $j \to i$
    with two vectors, $\mathbf a^k_{\text{src}}$ for the sender and
    $\mathbf a^k_{\text{dst}}$ for the receiver:

    $\begin{gathered}
    e^k_{ij} = \operatorname{LeakyReLU}\big(\mathbf a^{k\top}_{\text{src}} W^k h_j
    + \mathbf a^{k\top}_{\text{dst}} W^k h_i\big), \\
    \alpha^k_{ij} = \operatorname{softmax}_{j \in \mathcal N(i) \cup \{i\}}(e^k_{ij}),
    \quad h'^k_i = \sum_j \alpha^k_{ij}\, W^k h_j .
    \end{gathered}$

    The heads' outputs are concatenated (``concat=True``, hidden layers) or averaged
    (the output layer); a bias is added. Self-loops let a node attend to itself;
    ``dropout`` drops attention coefficients in training, as the paper does.
    ``forward(..., return_attention=True)`` also returns the edges, self-loops
    included, and their coefficients (E, heads) before dropout.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_layer(in_channels, out_channels, heads, negative_slope, dropout)
        self.heads, self.out_channels, self.concat = heads, out_channels, concat
        self.negative_slope, self.dropout = negative_slope, dropout
        self.add_self_loops = add_self_loops
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)  # all W^k
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))  # a_src^k
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))  # a_dst^k
        width = heads * out_channels if concat else out_channels
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None
        for weight in (self.lin.weight, self.att_src, self.att_dst):
            nn.init.xavier_uniform_(weight)  # Glorot, as in the paper

    def forward(
        self, x: Tensor, edge_index: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        _check_input(x, edge_index)
        n, heads, c = x.shape[0], self.heads, self.out_channels
        if self.add_self_loops:  # any existing loop once, then one per node at the end
            edge_index = edge_index[:, edge_index[0] != edge_index[1]]
            edge_index = add_self_loops(edge_index, n)  # (2, E + N)
        source, target = edge_index  # the edge j -> i: j = source, i = target
        h = self.lin(x).view(n, heads, c)  # W^k h for every node and head: (N, H, C)
        s = (h * self.att_src).sum(-1)  # a_src^k . W^k h_j: (N, H)
        t = (h * self.att_dst).sum(-1)  # a_dst^k . W^k h_i: (N, H)
        e = F.leaky_relu(s[source] + t[target], self.negative_slope)  # e_ij: (E, H)
        alpha = _segment_softmax(e, target, n)  # over the edges into i: (E, H)
        weight = F.dropout(alpha, self.dropout, self.training)
        out = scatter_sum(weight[..., None] * h[source], target, n)  # (N, H, C)
        out = out.reshape(n, heads * c) if self.concat else out.mean(dim=1)
        if self.bias is not None:
            out = out + self.bias
        return (out, (edge_index, alpha)) if return_attention else out


class GAT(nn.Module):
    r"""The two-layer GAT of the paper's transductive experiments (section 3.3):
    dropout, ``heads`` attention heads of ``hidden`` features concatenated, ELU,
    dropout, and an output layer of ``out_heads`` heads averaged, one logit per class:

    $Z = \operatorname{GAT}_{\text{mean}}\Big(\operatorname{ELU}\big(
    \operatorname{GAT}_{\text{concat}}(X)\big)\Big).$

    ``dropout`` applies to both layers' inputs and to their attention coefficients.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        heads: int = 8,
        out_heads: int = 1,
        dropout: float = 0.6,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.conv1 = GATConv(in_channels, hidden, heads, dropout=dropout)
        self.conv2 = GATConv(
            hidden * heads, out_channels, out_heads, concat=False, dropout=dropout
        )

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        x = F.elu(self.conv1(x, edge_index))  # (N, heads * hidden)
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)  # (N, out_channels)


# ---------------------------------------------------------------------------------
# 3. What the attention can and cannot express
# ---------------------------------------------------------------------------------


def source_scores(conv: GATConv, x: Tensor) -> Tensor:
    r"""Every node's score as a *sender*, $s^k_j = \mathbf a^{k\top}_{\text{src}} W^k
    h_j$, shape (N, heads).

    LeakyReLU is increasing, so within any receiver's neighbourhood the coefficients
    $\alpha^k_{ij}$ are ordered as the $s^k_j$ are: every node ranks its neighbours by
    the same global score, whoever it is (Brody et al., 2022). The attention is
    *static*; what the receiver adds only sharpens or flattens it.
    """
    if not isinstance(conv, GATConv):
        raise TypeError(f"conv must be a GATConv, got {type(conv).__name__}")
    check_tensor(x, "x", ndim=2, floating=True)
    with torch.no_grad():
        h = conv.lin(x).view(x.shape[0], conv.heads, conv.out_channels)
        return (h * conv.att_src).sum(-1)


def neighbour_homophily(
    edge_index: Tensor, y: Tensor, weight: Tensor | None = None
) -> float:
    r"""The share of a node's neighbourhood that has its own label, averaged over the
    nodes that have a neighbour:

    $\bar h = \operatorname{mean}_i \dfrac{\sum_{j \to i,\ j \ne i} w_{ij}\,
    [y_j = y_i]}{\sum_{j \to i,\ j \ne i} w_{ij}} .$

    With ``weight=None`` (all ones) it is the node homophily of Pei et al. (2020); with
    a head's attention coefficients (E,) it is the share of the attention that goes to
    same-label neighbours. Self-loops are left out.
    """
    check_tensor(y, "y", ndim=1, dtype=torch.int64)
    check_edge_index(edge_index, y.shape[0])
    if weight is None:
        weight = torch.ones(edge_index.shape[1], device=edge_index.device)
    check_tensor(weight, "weight", ndim=1, floating=True)
    if weight.shape[0] != edge_index.shape[1]:
        raise ValueError(
            f"weight must have one entry per edge ({edge_index.shape[1]}), "
            f"got shape {tuple(weight.shape)}"
        )
    source, target = edge_index
    keep = source != target
    source, target, weight = source[keep], target[keep], weight[keep]
    n = y.shape[0]
    same = weight * (y[source] == y[target])
    total = scatter_sum(weight, target, n)
    has = total > 0
    return (scatter_sum(same, target, n)[has] / total[has]).mean().item()


# ---------------------------------------------------------------------------------
# Argument checks (the page shows the algorithm, not these)
# ---------------------------------------------------------------------------------


def _check_softmax(scores: object, index: object, num_nodes: object) -> None:
    check_tensor(scores, "scores", floating=True)
    check_tensor(index, "index", ndim=1, dtype=torch.int64)
    check_positive_int(num_nodes, "num_nodes")
    if scores.dim() == 0 or index.shape[0] != scores.shape[0]:
        raise ValueError(
            f"index must have one entry per row of scores, got index shape "
            f"{tuple(index.shape)} and scores shape {tuple(scores.shape)}"
        )
    if index.device.type == "cpu" and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_nodes:
            raise ValueError(
                f"index must lie in 0..{num_nodes - 1}, got values from {low} to {high}"
            )


def _check_layer(
    in_channels: object,
    out_channels: object,
    heads: object,
    negative_slope: object,
    dropout: object,
) -> None:
    check_positive_int(in_channels, "in_channels")
    check_positive_int(out_channels, "out_channels")
    check_positive_int(heads, "heads")
    check_number(negative_slope, "negative_slope", low=0)
    check_number(dropout, "dropout", low=0, high=1, high_open=True)


def _check_input(x: object, edge_index: object) -> None:
    check_tensor(x, "x", ndim=2, floating=True)
    check_edge_index(edge_index, x.shape[0])
