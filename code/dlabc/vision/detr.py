r"""DETR: object detection as set prediction. Boxes and their overlaps (IoU, the
generalised IoU), the Hungarian method for bipartite matching, the set loss, average
precision, and a small DETR equal to Hugging Face's ``DetrForObjectDetection`` with the
same weights, trained on MNIST digits placed on a canvas.

Chapter: ``book/vision/detr.md``. The box operations, :func:`hungarian`,
:func:`average_precision`, :func:`mean_average_precision`, :func:`train_detr` and
:func:`detect` are also the detection interface of the YOLO chapter.

References:
- Carion, Massa, Synnaeve, Usunier, Kirillov & Zagoruyko (2020), *End-to-End Object
  Detection with Transformers*, ECCV (DETR: object queries, the set loss with the
  Hungarian matching, the sine position encoding in two dimensions).
- Kuhn (1955), *The Hungarian Method for the Assignment Problem*; Munkres (1957),
  *Algorithms for the Assignment and Transportation Problems*; Jonker & Volgenant
  (1987), *A Shortest Augmenting Path Algorithm for Dense and Sparse Linear Assignment
  Problems* (the shortest-augmenting-path form written here).
- Rezatofighi, Tsoi, Gwak, Sadeghian, Reid & Savarese (2019), *Generalized Intersection
  over Union*, CVPR.
- Everingham, Van Gool, Williams, Winn & Zisserman (2010), *The PASCAL Visual Object
  Classes (VOC) Challenge*, IJCV; Lin et al. (2014), *Microsoft COCO: Common Objects in
  Context*, ECCV (average precision, and its mean over IoU thresholds 0.50:0.05:0.95).

Boxes are ``(x0, y0, x1, y1)`` ("xyxy", corners) or ``(cx, cy, w, h)`` ("cxcywh",
centre and size); shapes: ``B`` batch, ``Q`` object queries, ``M`` targets, ``C``
classes, ``d`` the transformer's width.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc import train
from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.cnn.resnet import BasicBlock, ConvBN
from dlabc.transformers.attention_with_pytorch import MultiHeadAttention
from dlabc.transformers.encoder import FeedForward

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "hungarian",
    "average_precision",
    "mean_average_precision",
    "sine_position_encoding",
    "Backbone",
    "DetrEncoderLayer",
    "DetrDecoderLayer",
    "BoxHead",
    "DETRConfig",
    "DETR",
    "HF_RENAMES",
    "detr_from_hf_state_dict",
    "LossWeights",
    "matching_cost",
    "match",
    "set_loss",
    "pretrain_backbone",
    "train_detr",
    "detect",
]


# ---------------------------------------------------------------- boxes


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` centre and size -> ``(..., 4)`` corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` corners -> ``(..., 4)`` centre and size."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` corners -> ``(N,)`` areas."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The IoU of every box of ``a`` ``(N, 4)`` with every box of ``b`` ``(M, 4)``,
    and the union, both ``(N, M)``:

    $\mathrm{IoU}(A, B) = \dfrac{|A \cap B|}{|A \cup B|}.$
    """
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    width_height = (bottom_right - top_left).clamp(min=0)  # (N, M, 2)
    intersection = width_height[..., 0] * width_height[..., 1]  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - intersection
    return intersection / union, union


def _generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""The generalised IoU of every box of ``a`` ``(N, 4)`` with every box of ``b``
    ``(M, 4)``, where $C$ is the smallest box that encloses both:

    $\mathrm{GIoU}(A, B) = \mathrm{IoU}(A, B) - \dfrac{|C| - |A \cup B|}{|C|}.$
    """
    iou, union = _box_iou(a, b)
    top_left = torch.minimum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    bottom_right = torch.maximum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    enclosing = (bottom_right - top_left).prod(-1)  # (N, M), the area of C
    return iou - (enclosing - union) / enclosing


def _check_boxes(boxes: object, name: str) -> torch.Tensor:
    check_tensor(boxes, name, ndim=2, floating=True)
    if boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    return boxes


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The intersection over union of every box of ``a`` ``(N, 4)`` with every box of
    ``b`` ``(M, 4)``, both corners (xyxy) in any units -> ``(N, M)``."""
    return _box_iou(_check_boxes(a, "a"), _check_boxes(b, "b"))[0]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The generalised IoU (Rezatofighi et al. 2019) of every box of ``a`` ``(N, 4)``
    with every box of ``b`` ``(M, 4)``, corners (xyxy) -> ``(N, M)`` in [-1, 1]."""
    return _generalized_box_iou(_check_boxes(a, "a"), _check_boxes(b, "b"))


# ---------------------------------------------------------------- the Hungarian method


def _hungarian(cost: np.ndarray) -> np.ndarray:
    r"""The cheapest assignment of the ``n`` rows of ``cost`` ``(n, m)``, ``n <= m``, to
    distinct columns; returns ``column_of_row`` ``(n,)``.

    Rows enter one at a time. Each entry grows a tree of shortest (reduced-cost) paths
    from the new row, Dijkstra-style, until it reaches a free column, then flips the
    path: every row on it moves to the next column. The potentials $u$ (rows) and $v$
    (columns) keep every reduced cost $c_{ij} - u_i - v_j \ge 0$ and zero on the
    assigned pairs, which proves the assignment optimal; $n$ entries of $O(nm)$ work
    make $O(n^2 m)$.
    """
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # potentials; index 0 is a sentinel
    row_of = np.zeros(m + 1, dtype=np.int64)  # row_of[j]: the row on column j, 0 = free
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0  # the new row i sits on the sentinel column 0
        best = np.full(m + 1, np.inf)  # the shortest path length to each column
        came_from = np.zeros(m + 1, dtype=np.int64)  # the column before it on that path
        used = np.zeros(m + 1, dtype=bool)  # the columns in the tree
        while row_of[j0] != 0:  # until the path reaches a free column
            used[j0] = True
            i0 = row_of[j0]
            # relax the edges from row i0 to every column outside the tree
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            shorter = ~used[1:] & (reduced < best[1:])
            best[1:][shorter] = reduced[shorter]
            came_from[1:][shorter] = j0
            # the nearest column outside the tree joins it
            j1 = 1 + int(np.argmin(np.where(used[1:], np.inf, best[1:])))
            delta = best[j1]
            # shift the potentials so that the tree's edges stay tight
            u[row_of[used]] += delta
            v[used] -= delta
            best[~used] -= delta
            j0 = j1
        while j0 != 0:  # flip the path: every row on it moves one column along
            j1 = came_from[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    column_of_row = np.empty(n, dtype=np.int64)
    assigned = np.flatnonzero(row_of[1:]) + 1
    column_of_row[row_of[assigned] - 1] = assigned - 1
    return column_of_row


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment of least total cost of the rows of ``cost`` ``(N, M)`` to its
    columns (each row and each column used at most once, ``min(N, M)`` pairs).

    Returns ``(rows, cols)``, two int64 tensors with ``rows`` in increasing order, the
    same answer as ``scipy.optimize.linear_sum_assignment`` (up to ties)."""
    check_tensor(cost, "cost", ndim=2)
    if cost.is_complex() or cost.dtype == torch.bool:
        raise TypeError(f"cost must be a real tensor, got dtype {cost.dtype}")
    c = cost.detach().cpu().double().numpy()
    if not np.isfinite(c).all():
        raise ValueError("cost must be finite")
    n, m = c.shape
    if min(n, m) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    if n <= m:
        rows, cols = np.arange(n), _hungarian(c)
    else:  # assign the columns to rows instead, then list the pairs by row
        cols = np.arange(m)
        rows = _hungarian(c.T)
        order = np.argsort(rows)
        rows, cols = rows[order], cols[order]
    return torch.from_numpy(rows.copy()), torch.from_numpy(cols.copy())


# ---------------------------------------------------------------- average precision


def _precision_recall(
    scores: np.ndarray, true_positive: np.ndarray, n_targets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each detection, in order of decreasing score."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(true_positive[order])  # true positives among the top k
    precision = hits / np.arange(1, len(order) + 1)
    recall = hits / n_targets
    return precision, recall


def _interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    r"""The area under the precision-recall curve with every precision replaced by the
    best precision at that recall or beyond (all-point interpolation, as in PASCAL VOC
    2010 and later):

    $\mathrm{AP} = \sum_k (r_k - r_{k-1})\, \max_{k' \ge k} p_{k'}.$
    """
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # max over k' >= k
    steps = np.diff(recall, prepend=0.0)  # r_k - r_{k-1}, zero where k is a miss
    return float((steps * envelope).sum())


def _match_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    target_boxes: torch.Tensor,
    iou_threshold: float,
) -> np.ndarray:
    """Which detections of one image and one class are true positives: in order of
    decreasing score, each takes the still unmatched target it overlaps most, if that
    overlap reaches ``iou_threshold``; the rest are false positives."""
    true_positive = np.zeros(len(boxes))
    if len(boxes) == 0 or len(target_boxes) == 0:
        return true_positive
    iou = _box_iou(boxes.double(), target_boxes.double())[0].numpy()  # (k, m)
    taken = np.zeros(len(target_boxes), dtype=bool)
    for k in np.argsort(-scores.numpy(), kind="stable"):
        overlaps = np.where(taken, -1.0, iou[k])
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold:
            taken[best], true_positive[k] = True, 1.0
    return true_positive


def _as_tensor(x: object, name: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a tensor or a NumPy array, got {type(x).__name__}"
        )
    return x.detach().cpu().to(dtype)


def _check_detections(
    predictions: Sequence, targets: Sequence, n_classes: int
) -> tuple[list, list]:
    """Bring predictions and targets to CPU tensors and check their shapes."""
    check_positive_int(n_classes, "n_classes")
    if not isinstance(predictions, list) or not isinstance(targets, list):
        raise TypeError("predictions and targets must be lists, one entry per image")
    if len(predictions) != len(targets):
        raise ValueError(
            f"predictions and targets must have one entry per image, got "
            f"{len(predictions)} and {len(targets)}"
        )
    preds, targs = [], []
    for i, (pred, target) in enumerate(zip(predictions, targets, strict=True)):
        if len(pred) != 3 or len(target) != 2:
            raise ValueError(
                f"predictions[{i}] must be (boxes, scores, labels) and targets[{i}] "
                "(boxes, labels)"
            )
        boxes = _as_tensor(pred[0], f"predictions[{i}] boxes", torch.float64)
        scores = _as_tensor(pred[1], f"predictions[{i}] scores", torch.float64)
        labels = _as_tensor(pred[2], f"predictions[{i}] labels", torch.int64)
        t_boxes = _as_tensor(target[0], f"targets[{i}] boxes", torch.float64)
        t_labels = _as_tensor(target[1], f"targets[{i}] labels", torch.int64)
        for name, b, lab in (
            (f"predictions[{i}]", boxes, labels),
            (f"targets[{i}]", t_boxes, t_labels),
        ):
            if b.reshape(-1, 4).shape[0] != len(lab) or b.numel() % 4:
                raise ValueError(
                    f"{name} must have boxes (k, 4) and labels (k,), got shapes "
                    f"{tuple(b.shape)} and {tuple(lab.shape)}"
                )
            if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= n_classes):
                raise ValueError(
                    f"{name} labels must lie in 0..{n_classes - 1} "
                    f"(n_classes={n_classes})"
                )
        if scores.shape != labels.shape:
            raise ValueError(
                f"predictions[{i}] must have one score per box, got shapes "
                f"{tuple(scores.shape)} and {tuple(labels.shape)}"
            )
        preds.append((boxes.reshape(-1, 4), scores, labels))
        targs.append((t_boxes.reshape(-1, 4), t_labels))
    if not any(len(t[1]) for t in targs):
        raise ValueError("targets must hold at least one box")
    return preds, targs


def _average_precision(
    predictions: list, targets: list, iou_threshold: float, n_classes: int
) -> float:
    """The mean over classes (those with a target) of each class's average precision:
    match the detections of the class image by image, then sort all of them by score
    into one precision-recall curve."""
    per_class = []
    for c in range(n_classes):
        n_targets = sum(int((labels == c).sum()) for _, labels in targets)
        if n_targets == 0:
            continue  # a class that never occurs has no recall: leave it out, as COCO
        scores, true_positive = [], []
        for (boxes, s, labels), (t_boxes, t_labels) in zip(
            predictions, targets, strict=True
        ):
            mine = labels == c
            scores.append(s[mine].numpy())
            true_positive.append(
                _match_detections(
                    boxes[mine], s[mine], t_boxes[t_labels == c], iou_threshold
                )
            )
        precision, recall = _precision_recall(
            np.concatenate(scores), np.concatenate(true_positive), n_targets
        )
        per_class.append(_interpolated_ap(precision, recall))
    return float(np.mean(per_class))


def average_precision(
    predictions: Sequence,
    targets: Sequence,
    iou_threshold: float = 0.5,
    n_classes: int = 10,
) -> float:
    """The mean over classes of the average precision at one IoU threshold (AP50 at
    0.5), with all-point interpolation (PASCAL VOC 2010+).

    ``predictions``: a list, one entry per image, of ``(boxes (k, 4) xyxy, scores (k,),
    labels (k,))``; ``targets``: a list of ``(boxes (m, 4) xyxy, labels (m,))``, the
    format of ``dlabc.data.load_digit_boxes``. Tensors or NumPy arrays. Classes with no
    target are left out of the mean."""
    check_number(iou_threshold, "iou_threshold", low=0, high=1, low_open=True)
    preds, targs = _check_detections(predictions, targets, n_classes)
    return _average_precision(preds, targs, float(iou_threshold), n_classes)


def mean_average_precision(
    predictions: Sequence, targets: Sequence, n_classes: int = 10
) -> float:
    """COCO's summary number: the mean of :func:`average_precision` over the IoU
    thresholds 0.50, 0.55, ..., 0.95."""
    preds, targs = _check_detections(predictions, targets, n_classes)
    thresholds = np.linspace(0.5, 0.95, 10)
    return float(
        np.mean([_average_precision(preds, targs, t, n_classes) for t in thresholds])
    )


# ---------------------------------------------------------------- the model


def sine_position_encoding(height: int, width: int, d_model: int) -> torch.Tensor:
    r"""DETR's fixed position encoding of an ``height x width`` feature map ->
    ``(height * width, d_model)``: half of the features encode the row, half the
    column, each as the Transformer's sines and cosines of the position scaled to
    $(0, 2\pi]$, with $d = d_{model} / 2$ and $k = 0, \dots, d/2 - 1$:

    $\begin{aligned}
    PE(y, 2k) &= \sin\big(\tilde y / 10000^{2k/d}\big), &
    PE(y, 2k+1) &= \cos\big(\tilde y / 10000^{2k/d}\big),
    \end{aligned}$

    where $\tilde y = 2\pi\, y / H$ for the rows $y = 1, \dots, H$ (and the same for
    the columns).
    """
    d = d_model // 2
    y = torch.arange(1, height + 1, dtype=torch.float64) / (height + 1e-6) * 2 * math.pi
    x = torch.arange(1, width + 1, dtype=torch.float64) / (width + 1e-6) * 2 * math.pi
    frequencies = 10000 ** (2 * (torch.arange(d) // 2) / d)  # (d,), in pairs
    angles_y = y[:, None] / frequencies  # (H, d)
    angles_x = x[:, None] / frequencies  # (W, d)
    # sin on the even features, cos on the odd ones
    pe_y = torch.where(torch.arange(d) % 2 == 0, angles_y.sin(), angles_y.cos())
    pe_x = torch.where(torch.arange(d) % 2 == 0, angles_x.sin(), angles_x.cos())
    pe = torch.cat(
        [
            pe_y[:, None, :].expand(height, width, d),  # (H, W, d): the row
            pe_x[None, :, :].expand(height, width, d),  # (H, W, d): the column
        ],
        dim=-1,
    )  # (H, W, d_model)
    return pe.reshape(height * width, 2 * d).float()


class Backbone(nn.Module):
    """A small ResNet without its head: the CNN part's stem (7x7 stride-2 conv-BN-ReLU,
    3x3 stride-2 max-pool) and stages of :class:`~dlabc.cnn.resnet.BasicBlock`; the
    first block of every stage but the first halves the map. ``(B, C, H, W)`` ->
    ``(B, widths[-1], H / 2^(1 + len(widths)), W / 2^(1 + len(widths)))``."""

    def __init__(
        self,
        in_channels: int,
        stem_width: int,
        widths: Sequence[int],
        depths: Sequence[int],
    ) -> None:
        super().__init__()
        self.stem = ConvBN(in_channels, stem_width, 7, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, channels = [], stem_width
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(channels, width, 2 if i > 0 and j == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.pool(self.stem(images)))


class DetrEncoderLayer(nn.Module):
    r"""A post-LN encoder layer whose attention sees the positions: the encoding $P$ is
    added to the queries and keys (not to the values) at every layer,

    $\begin{aligned}
    x &\leftarrow \mathrm{LN}\big(x + \mathrm{MHA}(x + P,\; x + P,\; x)\big),\\
    x &\leftarrow \mathrm{LN}\big(x + \mathrm{FFN}(x)\big).
    \end{aligned}$
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        attended, _ = self.self_attn(x + pos, x + pos, x)  # (B, HW, d)
        x = self.self_attn_layer_norm(x + self.dropout(attended))
        return self.final_layer_norm(x + self.dropout(self.ffn(x)))


class DetrDecoderLayer(nn.Module):
    r"""A post-LN decoder layer: self-attention among the $Q$ object slots, then
    cross-attention from the slots to the encoder's memory $m$, then the FFN. The
    learned query embeddings $q$ are added to the slots' queries (and keys) and the
    image positions $P$ to the memory's keys, at every layer:

    $\begin{aligned}
    t &\leftarrow \mathrm{LN}\big(t + \mathrm{MHA}(t + q,\; t + q,\; t)\big),\\
    t &\leftarrow \mathrm{LN}\big(t + \mathrm{MHA}(t + q,\; m + P,\; m)\big),\\
    t &\leftarrow \mathrm{LN}\big(t + \mathrm{FFN}(t)\big).
    \end{aligned}$
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = MultiHeadAttention(d_model, n_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        t: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(t + query_pos, t + query_pos, t)  # (B, Q, d)
        t = self.self_attn_layer_norm(t + self.dropout(attended))
        attended, _ = self.encoder_attn(
            t + query_pos, memory + pos, memory
        )  # (B, Q, d)
        t = self.encoder_attn_layer_norm(t + self.dropout(attended))
        return self.final_layer_norm(t + self.dropout(self.ffn(t)))


class BoxHead(nn.Module):
    """The box head: a 3-layer perceptron with ReLUs, then a sigmoid, so that every
    box ``(cx, cy, w, h)`` lies inside the image, in fractions of its size."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)]
            + [nn.Linear(d_model, 4)]
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.layers[0](h))
        h = F.relu(self.layers[1](h))
        return self.layers[2](h).sigmoid()  # (..., 4)


@dataclass(frozen=True)
class DETRConfig:
    """The sizes of a DETR. The paper's: a ResNet-50, ``d_model=256``, 8 heads, 6
    encoder and 6 decoder layers, ``d_ff=2048``, 100 queries, dropout 0.1; the
    defaults here are a small model for the digit canvases (the chapter asks for 6
    queries)."""

    num_classes: int = 10
    in_channels: int = 1
    stem_width: int = 16
    widths: tuple[int, ...] = (32, 64)
    depths: tuple[int, ...] = (1, 1)
    d_model: int = 64
    n_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 128
    num_queries: int = 10
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "num_classes",
            "in_channels",
            "stem_width",
            "d_model",
            "n_heads",
            "encoder_layers",
            "decoder_layers",
            "d_ff",
            "num_queries",
        ):
            check_positive_int(getattr(self, name), name)
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ValueError(
                "widths and depths must be non-empty and of the same length, got "
                f"{self.widths} and {self.depths}"
            )
        if self.d_model % (2 * self.n_heads) or self.d_model % 4:
            raise ValueError(
                f"d_model must be divisible by 4 and by 2 * n_heads, got "
                f"d_model={self.d_model}, n_heads={self.n_heads}"
            )
        check_number(self.dropout, "dropout", low=0, high=1, high_open=True)


class DETR(nn.Module):
    r"""DETR: a CNN, a transformer encoder-decoder, and $Q$ object queries, each of
    which the decoder turns into one prediction, a class (or "no object") and a box.

    ``images`` ``(B, C, H, W)`` -> ``logits`` ``(B, Q, num_classes + 1)``, the last
    class being "no object", and ``boxes`` ``(B, Q, 4)`` as ``(cx, cy, w, h)`` in
    fractions of the image's width and height.
    """

    def __init__(self, config: DETRConfig | None = None) -> None:
        super().__init__()
        config = DETRConfig() if config is None else config
        if not isinstance(config, DETRConfig):
            raise TypeError(f"config must be a DETRConfig, got {type(config).__name__}")
        self.config = c = config
        self.backbone = Backbone(c.in_channels, c.stem_width, c.widths, c.depths)
        self.input_projection = nn.Conv2d(self.backbone.out_channels, c.d_model, 1)
        self.query_position_embeddings = nn.Embedding(c.num_queries, c.d_model)
        layer = (c.d_model, c.n_heads, c.d_ff, c.dropout)
        self.encoder = nn.ModuleList(
            [DetrEncoderLayer(*layer) for _ in range(c.encoder_layers)]
        )
        self.decoder = nn.ModuleList(
            [DetrDecoderLayer(*layer) for _ in range(c.decoder_layers)]
        )
        self.decoder_layernorm = nn.LayerNorm(c.d_model)
        self.class_labels_classifier = nn.Linear(c.d_model, c.num_classes + 1)
        self.bbox_predictor = BoxHead(c.d_model)

    def _forward(
        self, images: torch.Tensor, every_layer: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._from_features(self.backbone(images), every_layer)

    def _from_features(
        self, features: torch.Tensor, every_layer: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.input_projection(features)  # (B, d, H', W')
        B, d, height, width = features.shape
        memory = features.flatten(2).transpose(1, 2)  # (B, H'W', d): a sequence
        pos = sine_position_encoding(height, width, d).to(memory)  # (H'W', d)
        for layer in self.encoder:
            memory = layer(memory, pos)  # (B, H'W', d)
        query_pos = self.query_position_embeddings.weight  # (Q, d)
        t = torch.zeros(B, *query_pos.shape).to(memory)  # (B, Q, d): empty slots
        outputs = []
        for layer in self.decoder:
            t = layer(t, memory, pos, query_pos)  # (B, Q, d)
            outputs.append(t)
        # the last layer's slots, or every layer's (L, B, Q, d) for the auxiliary losses
        t = self.decoder_layernorm(torch.stack(outputs) if every_layer else t)
        return self.class_labels_classifier(t), self.bbox_predictor(t)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor(images, "images", ndim=4, floating=True)
        if images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images must have {self.config.in_channels} channels, got shape "
                f"{tuple(images.shape)}"
            )
        return self._forward(images)


#: Hugging Face ``DetrForObjectDetection`` names -> ours: regular expressions and their
#: replacements, applied in order.
HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.backbone\.model\.embedder\.embedder\.", "backbone.stem."),
    (
        r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.",
        r"backbone.stages.\1.",
    ),
    (r"\.layer\.", ".residual."),  # a backbone block's residual branch
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
    (r"^model\.encoder\.layers\.", "encoder."),
    (r"^model\.decoder\.layers\.", "decoder."),
    (r"^model\.decoder\.layernorm\.", "decoder_layernorm."),
    (r"^model\.", ""),
    (r"_attn\.([qkvo])_proj\.", r"_attn.W_\1."),
    (r"\.mlp\.fc([12])\.", r".ffn.linear\1."),
)


def detr_from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A Hugging Face ``DetrForObjectDetection`` state dict with our names
    (:data:`HF_RENAMES`); its frozen batch norms have no ``num_batches_tracked``, so
    a zero count is added for each."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping, got {type(state_dict).__name__}"
        )
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
        if key.endswith(".bn.running_var"):
            renamed[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return renamed


# ---------------------------------------------------------------- the set loss


@dataclass(frozen=True)
class LossWeights:
    """The weights of the set loss and of the matching cost (the paper's, and Hugging
    Face's defaults): class 1, L1 5, GIoU 2, and 0.1 on the "no object" class."""

    ce: float = 1.0
    l1: float = 5.0
    giou: float = 2.0
    eos_coef: float = 0.1


def matching_cost(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    target_labels: torch.Tensor,
    target_boxes: torch.Tensor,
    w: LossWeights = LossWeights(),
) -> torch.Tensor:
    r"""The cost of pairing each prediction $i$ with each target $j$ (class $c_j$, box
    $b_j$):

    $\begin{aligned}
    C_{ij} = -\lambda_{ce}\, \hat p_i(c_j) + \lambda_{L1}
    \lVert \hat b_i - b_j \rVert_1 - \lambda_{giou}\, \mathrm{GIoU}(\hat b_i, b_j).
    \end{aligned}$

    ``logits`` ``(B, Q, C + 1)`` and ``boxes`` ``(B, Q, 4)``; the targets of all
    images stacked, ``target_labels`` ``(N,)``, ``target_boxes`` ``(N, 4)``; boxes as
    (cx, cy, w, h) -> ``(B, Q, N)``.
    """
    B, Q, _ = logits.shape
    probability = logits.softmax(-1)[..., target_labels]  # (B, Q, N)
    l1 = (boxes[:, :, None, :] - target_boxes).abs().sum(-1)  # (B, Q, N)
    giou = _generalized_box_iou(
        box_cxcywh_to_xyxy(boxes.reshape(B * Q, 4)), box_cxcywh_to_xyxy(target_boxes)
    ).reshape(B, Q, -1)  # (B, Q, N)
    return -w.ce * probability + w.l1 * l1 - w.giou * giou


def match(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    w: LossWeights = LossWeights(),
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    r"""The Hungarian matching $\hat\sigma$ of each image's predictions to its
    targets: the assignment of least total :func:`matching_cost`. ``targets``: one
    ``(labels (M,), boxes (M, 4))`` per image. Returns one ``(rows, cols)`` per image:
    prediction ``rows[k]`` is target ``cols[k]``."""
    with torch.no_grad():  # the matching is a choice, not something to differentiate
        labels = torch.cat([t[0] for t in targets])  # (N,), all images' targets
        target_boxes = torch.cat([t[1] for t in targets])  # (N, 4)
        cost = matching_cost(logits, boxes, labels, target_boxes, w)  # (B, Q, N)
        sizes = [len(t[0]) for t in targets]
        return [
            hungarian(c[b]) for b, c in enumerate(cost.split(sizes, dim=-1))
        ]  # each image's block of the cost


def set_loss(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    w: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""DETR's loss: match each image's predictions to its targets (:func:`match`),
    then every prediction learns its class, "no object" for the unmatched ones (their
    weight $\lambda_{eos}$), and every matched one learns its target's box, with
    $N_b$ the number of target boxes:

    $\begin{aligned}
    \mathcal{L} &= \lambda_{ce}\, \mathrm{CE} + \frac{1}{N_b} \sum_{j}
    \Big(\lambda_{L1} \lVert \hat b_{\hat\sigma(j)} - b_j \rVert_1 \\
    &\qquad + \lambda_{giou} \big(1 - \mathrm{GIoU}(\hat b_{\hat\sigma(j)},
    b_j)\big)\Big).
    \end{aligned}$

    ``logits`` ``(B, Q, C + 1)``, ``boxes`` ``(B, Q, 4)``; ``targets``: one ``(labels
    (M,), boxes (M, 4))`` per image, boxes as (cx, cy, w, h) in fractions of the
    image. Returns the loss and its three parts.
    """
    B, Q, C1 = logits.shape
    no_object = C1 - 1
    target_classes = torch.full((B, Q), no_object, dtype=torch.long)  # (B, Q)
    predicted, target = [], []
    for b, (rows, cols) in enumerate(match(logits, boxes, targets, w)):
        target_classes[b, rows] = targets[b][0][cols]
        predicted.append(boxes[b, rows])
        target.append(targets[b][1][cols])
    class_weight = torch.ones(C1).to(logits)
    class_weight[no_object] = (
        w.eos_coef
    )  # "no object" is the usual answer: weigh it less
    ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=class_weight)
    predicted, target = torch.cat(predicted), torch.cat(target)  # (N_b, 4)
    n_boxes = max(len(target), 1)
    l1 = (predicted - target).abs().sum() / n_boxes
    giou = _generalized_box_iou(
        box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(target)
    ).diagonal()  # (N_b,): each matched pair
    giou_loss = (1 - giou).sum() / n_boxes
    loss = w.ce * ce + w.l1 * l1 + w.giou * giou_loss
    return loss, {"ce": ce.detach(), "l1": l1.detach(), "giou": giou_loss.detach()}


# ---------------------------------------------------------------- training, detection


def _digit_targets(
    boxes: Sequence, labels: Sequence, height: int, width: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pixel boxes (x0, y0, x1, y1) -> (labels, (cx, cy, w, h) in fractions)."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return [
        (
            torch.as_tensor(lab, dtype=torch.int64),
            box_xyxy_to_cxcywh(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4))
            / scale,
        )
        for b, lab in zip(boxes, labels, strict=True)
    ]


def _paste_at_one_scale(
    digits: torch.Tensor, size: int, generator: torch.Generator
) -> torch.Tensor:
    """Digits ``(B, 1, 28, 28)`` scaled to one random height between ``size // 5``
    and ``size // 2`` (the heights of ``load_digit_boxes(size=size)``) and pasted at
    one random place of a ``size // 2`` square canvas -> ``(B, 1, size // 2, size //
    2)``."""
    side = int(torch.randint(size // 5, size // 2 + 1, (1,), generator=generator))
    scaled = F.interpolate(
        digits, size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    canvas = torch.zeros(len(digits), 1, size // 2, size // 2)
    y0, x0 = torch.randint(size // 2 - side + 1, (2,), generator=generator).tolist()
    canvas[:, :, y0 : y0 + side, x0 : x0 + side] = scaled
    return canvas


def pretrain_backbone(
    digits: torch.Tensor | np.ndarray,
    classes: torch.Tensor | np.ndarray,
    steps: int,
    seed: int = 0,
    *,
    size: int = 64,
    batch_size: int = 64,
    lr: float = 1e-3,
    **sizes: object,
) -> Backbone:
    """Pre-train a :class:`Backbone` (``sizes``: fields of :class:`DETRConfig`) to
    classify single digits ``(N, 28, 28)`` with labels ``classes`` ``(N,)``, the
    stand-in for the paper's ImageNet pre-training: a linear classifier on the
    average of the feature map, ``steps`` Adam steps on minibatches of
    ``batch_size`` digits, each batch scaled and placed as the digits of a ``size``
    canvas are. Returns the backbone (without the classifier) in eval mode, the
    accuracy on each step's batch in ``backbone.accuracies``."""
    digits = torch.as_tensor(digits)
    classes = torch.as_tensor(classes)
    check_tensor(digits, "digits", ndim=3, floating=True)
    check_tensor(classes, "classes", ndim=1)
    if len(digits) != len(classes):
        raise ValueError(
            f"digits and classes must have one entry per digit, got {len(digits)} "
            f"and {len(classes)}"
        )
    for value, name in ((steps, "steps"), (size, "size"), (batch_size, "batch_size")):
        check_positive_int(value, name)
    check_number(lr, "lr", low=0, low_open=True)
    torch.manual_seed(seed)
    c = DETRConfig(**sizes)
    backbone = Backbone(c.in_channels, c.stem_width, c.widths, c.depths)
    classifier = nn.Linear(backbone.out_channels, int(classes.max()) + 1)
    model = nn.ModuleDict({"backbone": backbone, "classifier": classifier})
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def batches():  # digits scaled and placed as on the canvases, and their classes
        while True:
            batch = torch.randint(len(digits), (batch_size,), generator=generator)
            x = _paste_at_one_scale(digits[batch, None].float(), size, generator)
            yield x, classes[batch]

    def loss_fn(model: nn.ModuleDict, batch: tuple) -> torch.Tensor:
        x, y = batch
        logits = model["classifier"](model["backbone"](x).mean((2, 3)))  # (B, classes)
        backbone.accuracies.append((logits.argmax(1) == y).float().mean().item())
        return F.cross_entropy(logits, y)

    backbone.accuracies = []
    train.train_steps(model, optimizer, batches(), loss_fn, steps=steps)
    return backbone.eval()


def train_detr(
    images: torch.Tensor | np.ndarray,
    boxes: Sequence,
    labels: Sequence,
    steps: int,
    seed: int = 0,
    *,
    batch_size: int = 32,
    lr: float = 1e-3,
    backbone: Backbone | None = None,
    schedule: str = "cosine",
    **sizes: object,
) -> DETR:
    """Train a :class:`DETR` (``sizes``: fields of :class:`DETRConfig`) on images
    ``(N, C, H, W)`` and their boxes and labels (the format of
    ``dlabc.data.load_digit_boxes``): ``steps`` AdamW steps on minibatches of
    ``batch_size``, gradients clipped at norm 0.1, and the set loss after every
    decoder layer (the paper's auxiliary losses), as in the paper. The learning rate
    decays to zero on a cosine (``schedule="cosine"``) or stays ``lr``
    (``"constant"``). Given a pre-trained ``backbone`` (:func:`pretrain_backbone`),
    the model starts from its weights and keeps them frozen, so that its features
    are computed once; else the whole model trains from scratch. Returns the model
    in eval mode, its loss per step in ``model.losses``."""
    if backbone is not None and not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a Backbone, got {type(backbone).__name__}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    images = torch.as_tensor(images)
    check_tensor(images, "images", ndim=4, floating=True)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    if not len(images) == len(boxes) == len(labels):
        raise ValueError(
            f"images, boxes and labels must have one entry per image, got "
            f"{len(images)}, {len(boxes)} and {len(labels)}"
        )
    torch.manual_seed(seed)
    config = DETRConfig(in_channels=images.shape[1], **sizes)
    model = DETR(config)
    targets = _digit_targets(boxes, labels, images.shape[2], images.shape[3])
    features = None
    if backbone is not None:  # frozen: its features of every image, computed once
        model.backbone.load_state_dict(backbone.state_dict())
        model.backbone.eval().requires_grad_(False)
        with torch.no_grad():
            features = torch.cat([model.backbone(x) for x in images.split(256)])
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=1e-4)
    decay = schedule == "cosine"
    generator = torch.Generator().manual_seed(seed)
    batches = (
        torch.randint(len(images), (batch_size,), generator=generator)
        for _ in range(steps)
    )

    def loss_fn(model: DETR, batch: torch.Tensor) -> torch.Tensor:
        if features is None:
            logits, predicted = model._forward(images[batch], every_layer=True)
        else:
            logits, predicted = model._from_features(features[batch], every_layer=True)
        batch_targets = [targets[i] for i in batch.tolist()]
        return sum(  # the set loss after every decoder layer (auxiliary losses)
            set_loss(logits[k], predicted[k], batch_targets)[0]
            for k in range(len(logits))
        )

    history = train.train_steps(
        model,
        optimizer,
        batches,
        loss_fn,
        steps=steps,
        lr_schedule=lambda s: (
            lr * 0.5 * (1 + math.cos(math.pi * s / steps)) if decay else lr
        ),
        clip_norm=0.1,
    )
    model.losses = history.step_loss
    return model.eval()


@torch.no_grad()
def detect(
    model: DETR, images: torch.Tensor | np.ndarray, score_threshold: float = 0.0
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every query's detection: its most probable class other than "no object", that
    probability as its score, and its box in pixels (x0, y0, x1, y1); those scoring
    above ``score_threshold`` (none, by default: average precision wants them all).
    One ``(boxes (k, 4), scores (k,), labels (k,))`` per image, the format
    :func:`average_precision` takes."""
    if not isinstance(model, DETR):
        raise TypeError(f"model must be a DETR, got {type(model).__name__}")
    images = torch.as_tensor(images)
    check_number(score_threshold, "score_threshold", low=0, high=1, high_open=True)
    logits, boxes = model(images)  # (N, Q, C + 1), (N, Q, 4)
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (N, Q) each
    height, width = images.shape[2:]
    scale = torch.tensor([width, height, width, height]).to(boxes)
    corners = box_cxcywh_to_xyxy(boxes) * scale  # (N, Q, 4) in pixels
    keep = scores > score_threshold
    return [(corners[i][k], scores[i][k], labels[i][k]) for i, k in enumerate(keep)]
