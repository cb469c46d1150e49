"""U-Net: an encoder-decoder with skip connections for semantic segmentation.

Chapter: ``book/cnn/unet.md``.

References:
- Ronneberger, Fischer & Brox (2015), MICCAI, *U-Net: Convolutional Networks for
  Biomedical Image Segmentation*.
- Long, Shelhamer & Darrell (2015), CVPR, *Fully Convolutional Networks for Semantic
  Segmentation*.
- Milletari, Navab & Ahmadi (2016), 3DV, *V-Net* (the soft Dice loss).

The building blocks are ``torch.nn`` layers. :class:`DoubleConv` is the unit of every
level; :class:`UNet` stacks ``depth`` levels going down (max-pooling halves the size)
and ``depth`` levels coming back up (a transposed convolution doubles it), and with
``skip=True`` concatenates each encoder level's features to the decoder level of the
same size. The metrics compare predicted labels with true masks; the loss works on
logits. Shapes: ``N`` batch, ``C`` channels, ``K`` classes, ``H, W`` height and width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "DoubleConv",
    "UNet",
    "unet_parameter_count",
    "boundary_band",
    "dice_score",
    "iou_score",
    "dice_loss",
]


def _check_images(x: object, channels: int, divisible_by: int = 1) -> None:
    """``x`` is a float ``(N, channels, H, W)`` batch, ``H`` and ``W`` divisible."""
    check_tensor(x, "x", ndim=4, floating=True)
    if x.shape[1] != channels:
        raise ValueError(
            f"x must have {channels} channels on axis 1, got shape {tuple(x.shape)}"
        )
    if x.shape[2] % divisible_by or x.shape[3] % divisible_by:
        raise ValueError(
            "the height and width of x must be divisible by 2**depth = "
            f"{divisible_by}, got shape {tuple(x.shape)}"
        )


def _check_unet_args(
    in_channels: object,
    n_classes: object,
    base_channels: object,
    depth: object,
    skip: object,
) -> None:
    check_positive_int(in_channels, "in_channels")
    if check_positive_int(n_classes, "n_classes") < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    check_positive_int(base_channels, "base_channels")
    check_positive_int(depth, "depth")
    if not isinstance(skip, bool):
        raise TypeError(f"skip must be a bool, got {type(skip).__name__}")


def _check_label_dtype(labels: torch.Tensor, name: str) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer class labels, got dtype {labels.dtype}"
        )


class DoubleConv(nn.Sequential):
    r"""Two rounds of 3x3 convolution, BatchNorm and ReLU: ``(N, C_in, H, W)`` to
    ``(N, C_out, H, W)``.

    $y = \operatorname{ReLU}(\operatorname{BN}(W_2 * \operatorname{ReLU}(
    \operatorname{BN}(W_1 * x))))$

    Padding 1 keeps the size (the paper used no
    padding, so its output was smaller than its input). The convolutions have no
    bias, since the BatchNorm after them subtracts any constant; each has
    $9\,C_{in}C_{out}$ and $9\,C_{out}^2$ weights, each BatchNorm $2\,C_{out}$.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_channels)
        return super().forward(x)


class UNet(nn.Module):
    r"""U-Net with ``depth`` down-sampling steps: ``(N, C_in, H, W)`` to logits
    ``(N, K, H, W)``.

    Level $\ell = 0, \dots, D$ works with $c_\ell = b\,2^\ell$ channels at size
    $H/2^\ell \times W/2^\ell$ ($b$ = ``base_channels``, $D$ = ``depth``; level $D$ is
    the bottleneck). Encoder: $e_0 = \operatorname{DC}(x)$,
    $e_\ell = \operatorname{DC}(\operatorname{maxpool}(e_{\ell-1}))$. Decoder, from
    $d_D = e_D$ down: $u_\ell = \operatorname{up}(d_{\ell+1})$ (a 2x2 transposed
    convolution with stride 2), $d_\ell = \operatorname{DC}([u_\ell, e_\ell])$ with the
    skip connection (a concatenation on the channel axis), or
    $d_\ell = \operatorname{DC}(u_\ell)$ without it. A 1x1 convolution turns $d_0$
    into $K$ logits per pixel. ``H`` and ``W`` must be divisible by $2^D$.
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        base_channels: int = 16,
        depth: int = 3,
        skip: bool = True,
    ) -> None:
        super().__init__()
        _check_unet_args(in_channels, n_classes, base_channels, depth, skip)
        self.in_channels, self.n_classes = in_channels, n_classes
        self.depth, self.skip = depth, skip
        c = [base_channels * 2**level for level in range(depth + 1)]  # c_0 ... c_D
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if level == 0 else c[level - 1], c[level])
            for level in range(depth)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c[depth - 1], c[depth])
        # up[level] and decoder[level] produce d_level; index 0 is the top level
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(c[level + 1], c[level], kernel_size=2, stride=2)
            for level in range(depth)
        )
        width = 2 if skip else 1  # [u, e] has twice the channels of u alone
        self.decoder = nn.ModuleList(
            DoubleConv(width * c[level], c[level]) for level in range(depth)
        )
        self.head = nn.Conv2d(c[0], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_channels, divisible_by=2**self.depth)
        features = []  # e_0 ... e_{D-1}, kept for the skip connections
        for block in self.encoder:
            x = block(x)  # (N, c_l, H / 2^l, W / 2^l)
            features.append(x)
            x = self.pool(x)  # (N, c_l, H / 2^(l+1), W / 2^(l+1))
        x = self.bottleneck(x)  # (N, c_D, H / 2^D, W / 2^D)
        for level in reversed(range(self.depth)):
            x = self.up[level](x)  # (N, c_l, H / 2^l, W / 2^l)
            if self.skip:
                x = torch.cat([x, features[level]], dim=1)  # (N, 2 c_l, ...)
            x = self.decoder[level](x)  # (N, c_l, H / 2^l, W / 2^l)
        return self.head(x)  # (N, K, H, W)


def unet_parameter_count(
    in_channels: int,
    n_classes: int,
    base_channels: int = 16,
    depth: int = 3,
    skip: bool = True,
) -> int:
    r"""The number of parameters of ``UNet(...)``, from the closed form.

    With $b$ = ``base_channels``, $D$ = ``depth``, $s = 1$ with skips (else 0):
    $P = 9bC_{in} + 9b^2 + 4b + \frac{80 + 9s}{3}(4^D - 1)\,b^2 + 13(2^D - 1)\,b
    + (b + 1)K$. A :class:`DoubleConv` from $a$ to $c$ channels has $9ac + 9c^2 + 4c$
    parameters; level $\ell \ge 1$ of the encoder ($a = c/2$) adds $13.5c^2 + 4c$,
    level $\ell$ of the decoder $8c^2 + c$ (up) and $(18 + 9s)c^2 + 4c$, with
    $c = b\,2^\ell$; the sums over $\ell$ are geometric series.
    """
    for name, value in dict(
        in_channels=in_channels, n_classes=n_classes, base_channels=base_channels
    ).items():
        check_positive_int(value, name)
    _check_unet_args(in_channels, 2, base_channels, depth, skip)
    b, s = base_channels, int(skip)
    first = 9 * b * in_channels + 9 * b * b + 4 * b  # DoubleConv(C_in, b)
    squares = (
        (80 + 9 * s) * (4**depth - 1) // 3 * b * b
    )  # c^2 terms of the other levels
    linear = 13 * (2**depth - 1) * b  # the BatchNorms and the biases of up
    return first + squares + linear + (b + 1) * n_classes  # + the 1x1 head


def _check_masks(masks: object, width: object) -> None:
    _check_label_dtype(check_tensor(masks, "masks", ndim=3), "masks")
    check_positive_int(width, "width")


def boundary_band(masks: torch.Tensor, width: int = 1) -> torch.Tensor:
    """The pixels of ``(N, H, W)`` label masks within ``width`` of a class boundary.

    A pixel is on a boundary when one of its four neighbours has another label; the
    band is that set grown by ``width - 1`` pixels in every direction (a square
    neighbourhood). Returns a bool tensor of the shape of ``masks``.
    """
    _check_masks(masks, width)
    edge = torch.zeros_like(masks, dtype=torch.bool)
    vertical = masks[:, 1:, :] != masks[:, :-1, :]  # (N, H-1, W)
    horizontal = masks[:, :, 1:] != masks[:, :, :-1]  # (N, H, W-1)
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    if width == 1:
        return edge
    grown = F.max_pool2d(edge[:, None].float(), 2 * width - 1, 1, padding=width - 1)
    return grown[:, 0] > 0


def _check_labels(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_positive_int(n_classes, "n_classes")
    for name, labels in (("pred", pred), ("target", target)):
        _check_label_dtype(check_tensor(labels, name), name)
    if pred.shape != target.shape:
        raise ValueError(
            "pred and target must have the same shape, "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    for name, labels in (("pred", pred), ("target", target)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {n_classes - 1}], got values from "
                f"{labels.min().item()} to {labels.max().item()}"
            )
    return pred.reshape(-1).long(), target.reshape(-1).long()


def _confusion_counts(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: true positives, false positives, false negatives (as float64)."""
    pred, target = _check_labels(pred, target, n_classes)
    tp = torch.bincount(target[pred == target], minlength=n_classes)
    predicted = torch.bincount(pred, minlength=n_classes)  # TP + FP
    actual = torch.bincount(target, minlength=n_classes)  # TP + FN
    tp, predicted, actual = (t.double() for t in (tp, predicted, actual))
    return tp, predicted - tp, actual - tp


def _average(scores: torch.Tensor, average: str | None) -> torch.Tensor:
    if average is None:
        return scores
    if average == "macro":
        return scores.mean()
    raise ValueError(f"average must be None or 'macro', got {average!r}")


def dice_score(
    pred: torch.Tensor,
    target: torch.Tensor,
    n_classes: int,
    average: str | None = None,
) -> torch.Tensor:
    r"""Dice coefficient of predicted labels against true labels, per class.

    $\operatorname{Dice}_k = \frac{2|P_k \cap T_k|}{|P_k| + |T_k|}
    = \frac{2\,TP_k}{2\,TP_k + FP_k + FN_k}$

    counted over all pixels of all images (the F1 score of class $k$). A class absent
    from both ``pred`` and ``target`` scores 1. Returns ``(K,)`` float64, or its mean
    with ``average="macro"``.
    """
    tp, fp, fn = _confusion_counts(pred, target, n_classes)
    denominator = 2 * tp + fp + fn
    scores = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), 1.0)
    return _average(scores, average)


def iou_score(
    pred: torch.Tensor,
    target: torch.Tensor,
    n_classes: int,
    average: str | None = None,
) -> torch.Tensor:
    r"""Intersection over union (Jaccard index) of predicted and true labels, per class.

    $\operatorname{IoU}_k = \frac{|P_k \cap T_k|}{|P_k \cup T_k|}
    = \frac{TP_k}{TP_k + FP_k + FN_k}$, counted over all pixels of all images. A class
    absent from both scores 1. Returns ``(K,)`` float64, or the mean with
    ``average="macro"`` (the "mIoU" of segmentation benchmarks).
    """
    tp, fp, fn = _confusion_counts(pred, target, n_classes)
    union = tp + fp + fn
    scores = torch.where(union > 0, tp / union.clamp(min=1), 1.0)
    return _average(scores, average)


def _check_dice_args(logits: object, target: object, smooth: object) -> None:
    """Shapes and dtypes; the label range only on the CPU (no GPU synchronisation)."""
    check_tensor(logits, "logits", floating=True)
    check_tensor(target, "target", dtype=torch.long)
    check_number(smooth, "smooth", low=0, low_open=True)
    if logits.dim() < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            "target must have the shape of logits without the class axis 1, "
            f"got logits {tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    n_classes = logits.shape[1]
    on_cpu = target.device.type == "cpu"
    if on_cpu and target.numel() and (target.min() < 0 or target.max() >= n_classes):
        raise ValueError(
            f"target labels must lie in [0, {n_classes - 1}], got values from "
            f"{target.min().item()} to {target.max().item()}"
        )


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    r"""Soft Dice loss of V-Net on softmax probabilities: ``(N, K, *)`` and ``(N, *)``.

    With $p_{ik}$ the softmax probability of class $k$ at pixel $i$ and $t_{ik}$ the
    one-hot target, summed over all pixels of the batch,

    $L = 1 - \frac{1}{K}\sum_k \frac{2\sum_i p_{ik}t_{ik} + s}
    {\sum_i p_{ik}^2 + \sum_i t_{ik}^2 + s}$

    where $s$ = ``smooth`` keeps the ratio defined (and equal to 1) for a class that is
    in neither.
    """
    _check_dice_args(logits, target, smooth)
    n_classes = logits.shape[1]
    probs = logits.softmax(dim=1).movedim(1, -1).reshape(-1, n_classes)  # (N*H*W, K)
    one_hot = F.one_hot(target.reshape(-1), n_classes).to(probs.dtype)  # (N*H*W, K)
    overlap = (probs * one_hot).sum(0)  # (K,)
    total = probs.pow(2).sum(0) + one_hot.sum(0)  # t^2 = t for a one-hot t
    return 1 - ((2 * overlap + smooth) / (total + smooth)).mean()
