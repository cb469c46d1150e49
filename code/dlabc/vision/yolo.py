r"""YOLO: a single-stage detector that reads every object off a grid in one pass, its
box coding and loss, and non-maximum suppression (NMS), written here and equal to the
greedy algorithm read literally.

Chapter: ``book/vision/yolo.md``. The boxes' IoU, average precision, and the DETR that
the chapter compares with come from :mod:`dlabc.vision.detr`.

References:
- Redmon, Divvala, Girshick & Farhadi (2016), *You Only Look Once: Unified, Real-Time
  Object Detection*, CVPR (the grid, the cell that holds an object's centre is
  responsible for it, offsets within the cell, the square roots of width and height,
  the sum-squared box loss with $\lambda_\text{coord} = 5$, $\lambda_\text{noobj} =
  0.5$, class-specific confidence = objectness times class probability).
- Redmon & Farhadi (2018), *YOLOv3: An Incremental Improvement* (objectness trained
  with a logistic loss instead of a squared error).
- Tian, Shen, Chen & He (2019), *FCOS: Fully Convolutional One-Stage Object
  Detection*, ICCV; Ge, Liu, Wang, Li & Sun (2021), *YOLOX: Exceeding YOLO Series in
  2021* (anchor-free: one prediction per location, no anchor boxes; an ambiguous
  location goes to the smallest object).
- Lin, Goyal, Girshick, He & Dollár (2017), *Focal Loss for Dense Object Detection*,
  ICCV (the objectness bias starts at the prior probability of an object).
- Neubeck & Van Gool (2006), *Efficient Non-Maximum Suppression*, ICPR.

Shapes: ``N`` images, ``S`` grid cells per side, ``K`` classes; the grid has stride
``s`` pixels, so an image is ``S s`` pixels wide. Boxes are ``(x0, y0, x1, y1)`` in
pixels ("xyxy"), the format of ``dlabc.data.load_digit_boxes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc import train
from dlabc.checks import check_number, check_positive_int, check_tensor
from dlabc.vision.detr import box_area, box_iou

__all__ = [
    "encode_targets",
    "decode",
    "YOLO",
    "yolo_loss",
    "nms",
    "nms_brute_force",
    "batched_nms",
    "grid_detections",
    "detect",
    "train_yolo",
]


# ---------------------------------------------------------------- the grid coding


def _encode(
    boxes: list[torch.Tensor], labels: list[torch.Tensor], S: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The target of every cell: is it responsible for an object, of which class,
    and that object's box coded relative to the cell $(i, j)$ (row, column),

    $t_x = \frac{c_x}{s} - j, \quad t_y = \frac{c_y}{s} - i, \quad
    t_w = \sqrt{\frac{w}{S s}}, \quad t_h = \sqrt{\frac{h}{S s}}.$

    The cell that holds the centre $(c_x, c_y)$ of an object is responsible for it.
    When two centres fall in one cell, the smaller object keeps it: the larger ones
    are written first and overwritten.
    """
    N = len(boxes)
    objectness = torch.zeros(N, S, S)  # 1 where a cell is responsible
    classes = torch.zeros(N, S, S, dtype=torch.int64)
    coded = torch.zeros(N, S, S, 4)  # (t_x, t_y, t_w, t_h)
    for n, (b, c) in enumerate(zip(boxes, labels, strict=True)):
        for k in torch.argsort(box_area(b), descending=True, stable=True).tolist():
            x0, y0, x1, y1 = b[k].tolist()
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
            i, j = min(int(cy // stride), S - 1), min(int(cx // stride), S - 1)
            objectness[n, i, j] = 1.0
            classes[n, i, j] = c[k]
            coded[n, i, j] = torch.tensor(
                [
                    cx / stride - j,
                    cy / stride - i,
                    (w / (S * stride)) ** 0.5,
                    (h / (S * stride)) ** 0.5,
                ]
            )
    return objectness, classes, coded


def _as_boxes(
    boxes: Sequence, labels: Sequence
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Lists of ``(k, 4)`` boxes and ``(k,)`` labels (arrays or tensors) as float32 and
    int64 tensors, checked."""
    if not isinstance(boxes, Sequence) or not isinstance(labels, Sequence):
        raise TypeError("boxes and labels must be lists, one entry per image")
    if len(boxes) != len(labels):
        raise ValueError(
            "boxes and labels must have one entry per image, "
            f"got {len(boxes)} and {len(labels)}"
        )
    out_boxes, out_labels = [], []
    for n, (b, c) in enumerate(zip(boxes, labels, strict=True)):
        b, c = torch.as_tensor(b), torch.as_tensor(c)
        b = b.reshape(0, 4) if b.numel() == 0 else b
        if b.dim() != 2 or b.shape[1] != 4 or len(c) != len(b) or c.dim() != 1:
            raise ValueError(
                f"boxes[{n}] must have shape (k, 4) and labels[{n}] shape (k,), got "
                f"{tuple(b.shape)} and {tuple(c.shape)}"
            )
        if not b.is_floating_point() or c.is_floating_point():
            raise TypeError(
                f"boxes[{n}] must be floating point and labels[{n}] integer, "
                f"got {b.dtype} and {c.dtype}"
            )
        b = b.detach().cpu().float()
        if len(b) and bool((b[:, 2:] <= b[:, :2]).any()):
            raise ValueError(f"boxes[{n}] must have x1 > x0 and y1 > y0")
        out_boxes.append(b)
        out_labels.append(c.detach().cpu().long())
    return out_boxes, out_labels


def encode_targets(
    boxes: Sequence,
    labels: Sequence,
    grid_size: int = 8,
    stride: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The training targets of a YOLO grid from one list of boxes per image.

    ``boxes[n]``: ``(k, 4)`` xyxy in pixels; ``labels[n]``: ``(k,)`` classes (arrays or
    tensors). Returns ``objectness`` ``(N, S, S)`` (1 in a cell responsible for an
    object, else 0), ``classes`` ``(N, S, S)`` int64 and the coded boxes ``(N, S, S,
    4)`` $(t_x, t_y, t_w, t_h)$: the centre's offset inside its cell, in cells, and
    the square roots of width and height as fractions of the image (YOLO v1).
    """
    check_positive_int(grid_size, "grid_size")
    check_positive_int(stride, "stride")
    return _encode(*_as_boxes(boxes, labels), grid_size, stride)


def decode(coded: torch.Tensor, stride: int = 8) -> torch.Tensor:
    """Coded boxes ``(..., S, S, 4)`` of a square grid back to pixel boxes ``(..., S,
    S, 4)`` (xyxy): the inverse of the coding of :func:`encode_targets`."""
    check_tensor(coded, "coded", floating=True)
    if coded.dim() < 3 or coded.shape[-1] != 4 or coded.shape[-3] != coded.shape[-2]:
        raise ValueError(
            f"coded must have shape (..., S, S, 4), got {tuple(coded.shape)}"
        )
    check_positive_int(stride, "stride")
    return _decode(coded, stride)


def _decode(coded: torch.Tensor, stride: int) -> torch.Tensor:
    r"""The inverse of the coding of :func:`_encode`, cell by cell:

    $c_x = (j + t_x)\, s, \quad c_y = (i + t_y)\, s, \quad
    w = t_w^2\, S s, \quad h = t_h^2\, S s.$
    """
    S = coded.shape[-2]
    rows, cols = torch.meshgrid(
        torch.arange(S, device=coded.device),
        torch.arange(S, device=coded.device),
        indexing="ij",
    )  # (S, S) each: i and j of every cell
    t_x, t_y, t_w, t_h = coded.unbind(-1)  # (..., S, S) each
    cx, cy = (cols + t_x) * stride, (rows + t_y) * stride
    w, h = t_w**2 * S * stride, t_h**2 * S * stride
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


# ---------------------------------------------------------------- the network


class YOLO(nn.Module):
    r"""A small anchor-free YOLO: a CNN backbone down to stride 8, and a head that
    predicts, in every cell of the grid, one objectness, $K$ class scores and one box.
    Images are square, their side a multiple of 8: the grid is $S \times S$.

    The backbone is four 3x3 convolutions with BatchNorm and ReLU, the first three
    with stride 2: ``(N, C, H, W)`` to ``(N, 4w, H/8, W/8)``. The head is decoupled,
    as in YOLOX: one branch (3x3 convolution, ReLU, 1x1 convolution) for the
    objectness and the box, another for the $K$ class scores. The offsets $t_x, t_y$
    go through a sigmoid, so that they stay inside the cell; $t_w, t_h$ are linear,
    as in YOLO v1.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 16):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(n_classes, "n_classes")
        check_positive_int(width, "width")
        self.stride, self.n_classes, self.in_channels = 8, n_classes, in_channels

        def conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.backbone = nn.Sequential(
            *conv(in_channels, width, stride=2),  # (N, w, H/2, W/2)
            *conv(width, 2 * width, stride=2),  # (N, 2w, H/4, W/4)
            *conv(2 * width, 4 * width, stride=2),  # (N, 4w, H/8, W/8)
            *conv(4 * width, 4 * width, stride=1),  # (N, 4w, H/8, W/8)
        )

        def head(c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(4 * width, 4 * width, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(4 * width, c_out, 1),
            )

        self.box_head = head(1 + 4)  # objectness and the box
        self.class_head = head(n_classes)  # the class scores
        # start every cell at the prior probability of holding an object (~1 in 32)
        nn.init.constant_(self.box_head[-1].bias[0], -math.log(31.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Square images ``(N, C, H, H)``, ``H`` a multiple of 8 -> objectness logits
        ``(N, S, S)``, class logits ``(N, S, S, K)``, coded boxes ``(N, S, S, 4)``."""
        _check_images(x, self.in_channels)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(x)  # (N, 4w, S, S)
        out = self.box_head(features).permute(0, 2, 3, 1)  # (N, S, S, 5)
        objectness = out[..., 0]  # (N, S, S), a logit
        offsets = out[..., 1:3].sigmoid()  # (N, S, S, 2): t_x, t_y inside the cell
        coded = torch.cat([offsets, out[..., 3:5]], dim=-1)  # (N, S, S, 4)
        class_logits = self.class_head(features).permute(0, 2, 3, 1)  # (N, S, S, K)
        return objectness, class_logits, coded


def _check_images(x: object, channels: int) -> None:
    check_tensor(x, "images", ndim=4, floating=True)
    if x.shape[1] != channels or x.shape[2] % 8 or x.shape[3] != x.shape[2]:
        raise ValueError(
            f"images must be square, of shape (N, {channels}, H, H) with H a multiple "
            f"of 8, got {tuple(x.shape)}"
        )


def yolo_loss(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
) -> torch.Tensor:
    r"""The YOLO loss of a batch, summed over the cells and averaged over the images.

    With $\mathbb 1_{ij}$ = 1 in the cells responsible for an object and $o_{ij}$ the
    predicted objectness logit,

    $\begin{aligned}
    L &= \lambda_\text{coord} \textstyle\sum_{ij} \mathbb 1_{ij}
    \lVert t_{ij} - \hat t_{ij} \rVert^2
    + \sum_{ij} \mathbb 1_{ij} \operatorname{CE}(p_{ij}, c_{ij}) \\
    &\quad + \textstyle\sum_{ij} \big[\mathbb 1_{ij} \operatorname{BCE}(o_{ij}, 1)
    + \lambda_\text{noobj} (1 - \mathbb 1_{ij}) \operatorname{BCE}(o_{ij}, 0)\big].
    \end{aligned}$

    The box and class terms count only where there is an object to describe.
    """
    objectness, class_logits, coded = outputs
    responsible, classes, target_coded = targets
    box = ((coded - target_coded) ** 2).sum(-1)  # (N, S, S)
    cls = F.cross_entropy(
        class_logits.flatten(0, 2), classes.flatten(), reduction="none"
    )
    bce = F.binary_cross_entropy_with_logits(objectness, responsible, reduction="none")
    weight = responsible + lambda_noobj * (1 - responsible)  # (N, S, S)
    per_cell = responsible * (lambda_coord * box + cls.view_as(box)) + weight * bce
    return per_cell.sum() / len(objectness)


# ---------------------------------------------------------- non-maximum suppression


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5):
    r"""Greedy non-maximum suppression, vectorised: the indices of the boxes kept, in
    order of decreasing score (ties: the lower index first).

    Sorted by score, box $k$ is kept when no box kept before it overlaps it by more
    than the threshold:

    $\text{keep}_k = \neg \exists\, l < k:\ \text{keep}_l \wedge
    \mathrm{IoU}(b_l, b_k) > \tau.$

    This is a triangular system: ``keep[k]`` depends only on the boxes before it.
    Start from "keep everything" and apply the rule to all boxes at once: after round
    $r$ the first $r$ are right, and a round that changes nothing has reached the one
    solution. Each round is one matrix-vector product; the rounds needed are the
    length of the longest chain of suppressions, not the number of boxes.
    """
    _check_nms_args(boxes, scores, iou_threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    overlap = box_iou(boxes[order], boxes[order]) > iou_threshold  # (n, n)
    earlier = overlap.tril(diagonal=-1)  # earlier[k, l]: l < k and they overlap
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    while True:
        suppressed = (earlier & keep).any(dim=1)  # by a box kept before it
        if torch.equal(~suppressed, keep):
            return order[keep]
        keep = ~suppressed


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """The IoU of two boxes, in plain Python."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return intersection / (area_a + area_b - intersection)


def nms_brute_force(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5
) -> list[int]:
    """Greedy NMS read literally, one box at a time in plain Python: the reference
    that :func:`nms` must equal. Go through the boxes by decreasing score (ties: the
    lower index first) and keep a box when it overlaps no kept box by more than the
    threshold."""
    b, s = boxes.tolist(), scores.tolist()
    kept: list[int] = []
    for k in sorted(range(len(s)), key=lambda k: -s[k]):  # a stable sort
        if all(_iou(b[k], b[l]) <= iou_threshold for l in kept):
            kept.append(k)
    return kept


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """NMS within each class: a box suppresses only boxes of its own label. Shifting
    every class's boxes by a distance larger than all the boxes together puts the
    classes far apart, so that one call of :func:`nms` does all the classes at once."""
    _check_nms_args(boxes, scores, iou_threshold, labels)
    span = boxes.max() - boxes.min() + 1 if len(boxes) else 0  # wider than all boxes
    shifted = boxes + (labels * span)[:, None]  # (n, 4): class c moved by c * span
    return nms(shifted, scores, iou_threshold)


def _check_nms_args(
    boxes: object, scores: object, iou_threshold: object, labels: object = None
) -> None:
    check_tensor(boxes, "boxes", ndim=2, floating=True)
    check_tensor(scores, "scores", ndim=1, floating=True)
    check_number(iou_threshold, "iou_threshold", low=0, high=1)
    if boxes.shape[1] != 4 or len(scores) != len(boxes):
        raise ValueError(
            "boxes must have shape (n, 4) and scores shape (n,), got "
            f"{tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    if labels is not None:
        check_tensor(labels, "labels", ndim=1, dtype=torch.int64)
        if len(labels) != len(boxes):
            raise ValueError(
                f"labels must have shape (n,) = ({len(boxes)},), "
                f"got {tuple(labels.shape)}"
            )


# ---------------------------------------------------------------- detection


def grid_detections(
    model: YOLO, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""What the grid says, before any suppression: for every cell of every image,
    its box in pixels ``(N, S*S, 4)``, its class-specific confidence ``(N, S*S)`` and
    its class ``(N, S*S)``. The confidence of class $c$ is
    $\sigma(o) \cdot \operatorname{softmax}(p)_c$, the probability that the cell holds
    an object times the probability that it is a $c$; each cell proposes its most
    likely class."""
    objectness, class_logits, coded = model(images)
    boxes = _decode(coded, model.stride).flatten(1, 2)  # (N, S*S, 4)
    class_prob, labels = class_logits.softmax(-1).max(-1)  # (N, S, S) each
    scores = objectness.sigmoid() * class_prob  # (N, S, S)
    return boxes, scores.flatten(1), labels.flatten(1)


@torch.no_grad()
def detect(
    model: YOLO,
    images: torch.Tensor,
    score_threshold: float = 0.01,
    iou_threshold: float = 0.5,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Detections of each image, ``(boxes (k, 4) xyxy pixels, scores (k,), labels
    (k,))`` on the CPU, in the format of ``dlabc.vision.detr.average_precision``: the
    cells whose confidence exceeds ``score_threshold``, then NMS within each class
    (``iou_threshold=None`` skips it: the raw grid)."""
    if not isinstance(model, YOLO):
        raise TypeError(f"model must be a YOLO, got {type(model).__name__}")
    check_number(score_threshold, "score_threshold", low=0, high=1)
    if iou_threshold is not None:
        check_number(iou_threshold, "iou_threshold", low=0, high=1)
    was_training = model.training
    model.eval()
    try:
        boxes, scores, labels = (t.cpu() for t in grid_detections(model, images))
    finally:
        model.train(was_training)
    results = []
    for b, s, c in zip(boxes, scores, labels, strict=True):
        above = s > score_threshold
        b, s, c = b[above], s[above], c[above]
        if iou_threshold is not None and len(s):
            keep = batched_nms(b, s, c, iou_threshold)
            b, s, c = b[keep], s[keep], c[keep]
        results.append((b, s, c))
    return results


# ---------------------------------------------------------------- training


def train_yolo(
    images: np.ndarray | torch.Tensor,
    boxes: Sequence,
    labels: Sequence,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 2e-3,
    width: int = 16,
) -> YOLO:
    """Train a :class:`YOLO` on ``(images (N, 1, H, H), boxes, labels)`` in the format
    of ``dlabc.data.load_digit_boxes`` for ``steps`` steps of AdamW with mini-batches
    of ``batch_size``, the learning rate decaying linearly to zero. Returns the model
    in evaluation mode, on the device of ``images``."""
    images = torch.as_tensor(images)
    _check_images(images, images.shape[1] if images.dim() == 4 else 1)
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    if len(boxes) != len(images):
        raise ValueError(
            f"boxes must have one entry per image, got {len(boxes)} for "
            f"{len(images)} images"
        )
    S = images.shape[-1] // 8
    targets = [t.to(images.device) for t in encode_targets(boxes, labels, S, 8)]
    torch.manual_seed(seed)
    model = YOLO(images.shape[1], width=width).to(images.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    stream = train.endless_minibatches(
        len(images), batch_size, torch.Generator().manual_seed(seed)
    )

    def loss_fn(model: YOLO, index: torch.Tensor) -> torch.Tensor:
        index = index.to(images.device)
        return yolo_loss(model._forward(images[index]), [t[index] for t in targets])

    train.train_steps(
        model,
        optimizer,
        stream,
        loss_fn,
        steps=steps,
        lr_schedule=lambda step: lr * (1 - step / steps),
    )
    return model.eval()
