r"""Pretrained networks and transfer learning: EfficientNet-lite0 written here, its
real ImageNet weights loaded by name, photographs classified, and the network's
features reused on a small labelled set (a linear probe, fine-tuning the last blocks)
against the same network trained from scratch.

Chapter: ``book/vision/transfer.md``.

References:
- Tan & Le (2019), *EfficientNet: Rethinking Model Scaling for Convolutional Neural
  Networks*, ICML (the B0 block table; compound scaling). EfficientNet-lite (Google,
  2020) is B0 without squeeze-and-excitation, with ReLU6 instead of swish, and with
  the stem and head kept at 32 and 1,280 channels for every size.
- Sandler et al. (2018), *MobileNetV2: Inverted Residuals and Linear Bottlenecks*,
  CVPR (the inverted residual block, MBConv; ReLU6; the linear projection).
- Yosinski et al. (2014), *How transferable are features in deep neural networks?*,
  NeurIPS; Kornblith, Shlens & Le (2019), *Do Better ImageNet Models Transfer
  Better?*, CVPR (linear probes against fine-tuning).
- Zhou et al. (2016), *Learning Deep Features for Discriminative Localization*, CVPR
  (class activation maps).

The parameter names are those of the converted weights (``EfficientNet-PyTorch``'s
layout: ``_conv_stem``, ``_blocks.{i}._expand_conv``, ``_bn0``, ``_depthwise_conv``,
``_bn1``, ``_project_conv``, ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), so the state
dict loads with ``strict=True`` and no renaming table. Shapes: ``B`` batch, ``C``
channels, ``H``, ``W`` height and width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "BlockArgs",
    "B0_BLOCKS",
    "PADDINGS",
    "same_padding",
    "Conv2dSame",
    "MBConvBlock",
    "EfficientNetLite",
    "efficientnet_lite0",
    "preprocess",
    "top_k",
    "class_activation_map",
    "few_shot_subset",
    "to_rgb",
    "pooled_features",
    "linear_probe",
    "fine_tune",
    "recompute_batch_norm",
    "accuracy",
]

#: The input convention of the lite weights: each RGB channel scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
#: The convention of most PyTorch ImageNet models, for comparison.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PADDINGS = ("same", "symmetric")


@dataclass(frozen=True)
class BlockArgs:
    """One stage of the B0 table: ``repeats`` MBConv blocks; the first of them has
    ``stride`` and changes the width to ``channels``, the others keep both."""

    expand_ratio: int  # t: the block's inner width is t times its input width
    kernel: int  # the depthwise convolution's k x k
    stride: int  # the first block's stride
    channels: int  # output channels of the stage
    repeats: int


#: EfficientNet-B0's seven stages (Tan & Le 2019, Table 1), the same in lite0.
B0_BLOCKS = (
    BlockArgs(expand_ratio=1, kernel=3, stride=1, channels=16, repeats=1),
    BlockArgs(expand_ratio=6, kernel=3, stride=2, channels=24, repeats=2),
    BlockArgs(expand_ratio=6, kernel=5, stride=2, channels=40, repeats=2),
    BlockArgs(expand_ratio=6, kernel=3, stride=2, channels=80, repeats=3),
    BlockArgs(expand_ratio=6, kernel=5, stride=1, channels=112, repeats=3),
    BlockArgs(expand_ratio=6, kernel=5, stride=2, channels=192, repeats=4),
    BlockArgs(expand_ratio=6, kernel=3, stride=1, channels=320, repeats=1),
)


# ---------------------------------------------------------------- TensorFlow's "same"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    r"""TensorFlow's ``padding="SAME"`` along one axis: (before, after).

    The output has $\lceil n / s \rceil$ positions; the padding is what that needs,
    and an odd total puts the extra row or column after (bottom, right):

    $p = \max\big((\lceil n/s \rceil - 1)\, s + k - n,\ 0\big), \qquad
    (p_\text{before}, p_\text{after}) =
    (\lfloor p/2 \rfloor,\ p - \lfloor p/2 \rfloor).$
    """
    out = -(-size // stride)  # ceil(n / s)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A convolution without bias that pads like TensorFlow's "SAME" (``padding=
    "same"``) or by ``k // 2`` on every side (``"symmetric"``, PyTorch's habit)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        padding: str = "same",
    ) -> None:
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, groups=groups, bias=False
        )
        self.mode = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if self.mode == "symmetric":
            top = left = bottom = right = k // 2
        else:
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
        x = F.pad(x, (left, right, top, bottom))  # (B, C, H + p_H, W + p_W)
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's EfficientNet: epsilon 1e-3 (its moving averages' decay 0.99 is
    # PyTorch's momentum 0.01; we keep PyTorch's 0.1, for short training runs)
    return nn.BatchNorm2d(channels, eps=1e-3)


# ---------------------------------------------------------------- the MBConv block


class MBConvBlock(nn.Module):
    r"""MobileNetV2's inverted residual (MBConv), as EfficientNet-lite has it.

    Widen the $C_\text{in}$ channels $t$ times with a $1 \times 1$ convolution,
    filter each channel alone with a $k \times k$ depthwise convolution (stride $s$),
    and project back down with a $1 \times 1$ convolution that has *no* nonlinearity
    after it (the linear bottleneck). With $\sigma = \operatorname{ReLU6}$:

    $y = \mathrm{BN}\big(W_\text{proj}\, \sigma(\mathrm{BN}(\mathrm{DW}_{k,s}\,
    \sigma(\mathrm{BN}(W_\text{exp}\, x))))\big) \; [+\, x] ,$

    the skip $+\,x$ only where the shape is kept ($s = 1$, $C_\text{out} =
    C_\text{in}$). With $t = 1$ there is no expansion.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        padding: str = "same",
    ) -> None:
        super().__init__()
        inner = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = Conv2dSame(in_channels, inner, 1, padding=padding)
            self._bn0 = _bn(inner)
        self._depthwise_conv = Conv2dSame(
            inner, inner, kernel, stride, groups=inner, padding=padding
        )
        self._bn1 = _bn(inner)
        self._project_conv = Conv2dSame(inner, out_channels, 1, padding=padding)
        self._bn2 = _bn(out_channels)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))  # (B, t C_in, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # (B, t C_in, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, C_out, H/s, W/s), linear
        return h + x if self.skip else h


# ---------------------------------------------------------------- the network


class EfficientNetLite(nn.Module):
    """EfficientNet-lite0: a stem, sixteen MBConv blocks in seven stages
    (:data:`B0_BLOCKS`), a 1x1 head to 1,280 channels, global average pooling,
    dropout and a linear classifier ``_fc``.

    ``padding`` is ``"same"`` (TensorFlow's rule, which the weights were trained with)
    or ``"symmetric"``; ``num_classes`` sets the width of ``_fc``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        blocks: tuple[BlockArgs, ...] = B0_BLOCKS,
        stem: int = 32,
        head: int = 1280,
        dropout: float = 0.2,
        padding: str = "same",
    ) -> None:
        check_positive_int(num_classes, "num_classes")
        check_positive_int(stem, "stem")
        check_positive_int(head, "head")
        check_number(dropout, "dropout", low=0, high=1, high_open=True)
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        super().__init__()
        self._conv_stem = Conv2dSame(3, stem, 3, stride=2, padding=padding)
        self._bn0 = _bn(stem)
        layers, width = [], stem
        for b in blocks:
            for r in range(b.repeats):
                stride = b.stride if r == 0 else 1
                layers.append(
                    MBConvBlock(
                        width, b.channels, b.kernel, stride, b.expand_ratio, padding
                    )
                )
                width = b.channels
        self._blocks = nn.ModuleList(layers)
        self._conv_head = Conv2dSame(width, head, 1, padding=padding)
        self._bn1 = _bn(head)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)

    def features(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """The feature map after block ``upto`` (an index into ``_blocks``), or after
        the head when ``upto`` is None: ``(B, 3, H, W) -> (B, 1280, H/32, W/32)``."""
        _check_images(x)
        return self._features(x, upto)

    def _features(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == upto:
                return x
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)

    def pooled(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The pooled features ``(B, 1280)`` from the input ``h`` of block ``start``:
        blocks ``start`` onwards, the head and global average pooling. With
        ``start = 0``, ``h`` is the image and the stem runs first."""
        if start == 0:
            h = F.relu6(self._bn0(self._conv_stem(h)))  # (B, 32, H/2, W/2)
        for block in self._blocks[start:]:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, h, w)
        return h.mean((2, 3))  # (B, 1280)

    def tail(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits from the input ``h`` of block ``start`` (:meth:`pooled`, dropout,
        ``_fc``); ``tail(x, 0)`` is the whole network."""
        return self._fc(self._dropout(self.pooled(h, start)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, 3, H, W)``, normalised as
        :func:`preprocess` does."""
        h = self._features(x)  # (B, 1280, H/32, W/32)
        pooled = h.mean((2, 3))  # (B, 1280): global average pooling
        return self._fc(self._dropout(pooled))


def _check_images(x: object) -> None:
    check_tensor(x, "x", ndim=4, floating=True)
    if x.shape[1] != 3:
        raise ValueError(f"x must be (B, 3, H, W) RGB images, got {tuple(x.shape)}")


def efficientnet_lite0(
    state_dict: dict[str, torch.Tensor] | None = None, padding: str = "same"
) -> EfficientNetLite:
    """EfficientNet-lite0 with ``state_dict`` (the ImageNet weights of
    ``dlabc.data.load_efficientnet_lite0`` by default) loaded with ``strict=True``,
    in eval mode."""
    if state_dict is None:
        from dlabc.data import load_efficientnet_lite0

        state_dict = load_efficientnet_lite0()
    if not isinstance(state_dict, dict):
        raise TypeError(
            f"state_dict must be a dict of tensors, got {type(state_dict).__name__}"
        )
    model = EfficientNetLite(padding=padding)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ---------------------------------------------------------------- photographs in


def preprocess(
    image: np.ndarray,
    size: int = 224,
    crop_fraction: float = 0.875,
    mean: tuple[float, ...] = LITE_MEAN,
    std: tuple[float, ...] = LITE_STD,
) -> torch.Tensor:
    """An ``(H, W, 3)`` RGB photograph in [0, 1] as a ``(1, 3, size, size)`` input.

    Resize so the shorter side is ``size / crop_fraction`` (antialiased bilinear),
    cut the central ``size x size`` square, and normalise each channel with ``mean``
    and ``std`` (the lite weights expect [-1, 1]: mean and std 0.5).
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            "image must be an (H, W, 3) RGB array, got "
            f"{getattr(image, 'shape', type(image).__name__)}"
        )
    check_positive_int(size, "size")
    check_number(crop_fraction, "crop_fraction", low=0, high=1, low_open=True)
    x = torch.as_tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
    scale = size / crop_fraction / min(x.shape[-2:])
    shape = [max(size, round(n * scale)) for n in x.shape[-2:]]
    x = F.interpolate(x, size=shape, mode="bilinear", antialias=True)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    x = x[..., top : top + size, left : left + size]  # (1, 3, size, size)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def top_k(
    logits: torch.Tensor, names: list[str], k: int = 5
) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one image's ``logits`` ``(num_classes,)``,
    as (name, softmax probability), most probable first."""
    check_tensor(logits, "logits", ndim=1, floating=True)
    check_positive_int(k, "k")
    if len(names) != logits.shape[0]:
        raise ValueError(f"{len(names)} names for {logits.shape[0]} logits")
    p, i = logits.softmax(-1).topk(k)
    return [(names[j], float(q)) for j, q in zip(i.tolist(), p.tolist(), strict=True)]


def class_activation_map(
    features: torch.Tensor, weight: torch.Tensor, c: int
) -> torch.Tensor:
    r"""Zhou et al.'s class activation map: where in the image class $c$'s logit
    comes from.

    The logit is $z_c = \sum_k w_{ck} \frac{1}{hw} \sum_{ij} f_k(i, j) + b_c$, a sum
    over positions; the map keeps the positions apart,

    $M_c(i, j) = \sum_k w_{ck}\, f_k(i, j) ,$

    so $z_c = \operatorname{mean}_{ij} M_c(i, j) + b_c$. ``features`` ``(K, h, w)``,
    ``weight`` ``(classes, K)`` (``_fc.weight``) -> ``(h, w)``.
    """
    return torch.einsum("k,khw->hw", weight[c], features)


# ---------------------------------------------------------------- transfer


def few_shot_subset(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` examples of each label in ``y``, drawn with
    ``seed``, in random order."""
    check_positive_int(per_class, "per_class")
    rng = np.random.default_rng(seed)
    picks = []
    for label in np.unique(y):
        where = np.flatnonzero(y == label)
        if len(where) < per_class:
            raise ValueError(f"label {label} has only {len(where)} examples")
        picks.append(rng.choice(where, per_class, replace=False))
    return rng.permutation(np.concatenate(picks))


def to_rgb(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Grey images ``(N, H, W)`` in [0, 1] as the network's input ``(N, 3, size,
    size)``: upsampled (bilinear), repeated to three channels, scaled to [-1, 1]."""
    x = torch.as_tensor(images, dtype=torch.float32)
    check_tensor(x, "images", ndim=3, floating=True)
    check_positive_int(size, "size")
    x = F.interpolate(x[:, None], size=(size, size), mode="bilinear")  # (N, 1, S, S)
    return (x.expand(-1, 3, -1, -1) - 0.5) / 0.5


@torch.no_grad()
def pooled_features(
    model: EfficientNetLite, x: torch.Tensor, upto: int | None = None, batch: int = 100
) -> torch.Tensor:
    """The frozen network's features of ``x`` in eval mode, in batches: the pooled
    ``(N, 1280)`` vector when ``upto`` is None, else the ``(N, C, h, w)`` map after
    block ``upto``."""
    model.eval()
    out = []
    for start in range(0, len(x), batch):
        h = model.features(x[start : start + batch], upto)
        out.append(h.mean((2, 3)) if upto is None else h)
    return torch.cat(out)


def linear_probe(
    features: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    weight_decay: float = 1e-3,
) -> nn.Linear:
    r"""A softmax classifier on frozen features: minimise the cross-entropy plus
    $\lambda \lVert W \rVert^2$ over the whole (small) set with L-BFGS. The features
    are standardised first (their mean and scale are folded into the layer)."""
    check_tensor(features, "features", ndim=2, floating=True)
    _check_labels(y, len(features))
    mu, sigma = features.mean(0), features.std(0) + 1e-6
    z = (features - mu) / sigma  # (N, K)
    layer = nn.Linear(features.shape[1], num_classes, dtype=features.dtype)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=steps, history_size=20)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(z), y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # fold the standardisation in: W z + b = W' x + b'
        layer.bias -= (layer.weight * mu / sigma).sum(1)
        layer.weight /= sigma
    return layer


def fine_tune(
    model: EfficientNetLite,
    h: torch.Tensor,
    y: torch.Tensor,
    start: int,
    steps: int,
    lr: float = 1e-3,
    batch: int = 32,
    seed: int = 0,
    train_bn: bool = False,
) -> list[float]:
    """Train ``model.tail(h, start)``: blocks ``start`` onwards, the head and
    ``_fc`` (and the stem when ``start = 0``, where ``h`` are the images), with Adam
    on the inputs ``h`` of block ``start``; the blocks before ``start`` are frozen
    and their outputs ``h`` computed once, before. Set ``model._fc`` to a trained
    probe first and keep ``lr`` small to fine-tune the LP-FT way (Kumar et al. 2022).
    Batch
    normalisation keeps its ImageNet statistics unless ``train_bn`` (training from
    scratch needs batch statistics). Returns the loss of every step."""
    check_positive_int(steps, "steps")
    check_positive_int(batch, "batch")
    check_number(lr, "lr", low=0, low_open=True)
    _check_labels(y, len(h))
    params = [p for b in model._blocks[start:] for p in b.parameters()]
    if start == 0:
        params += [*model._conv_stem.parameters(), *model._bn0.parameters()]
    params += [*model._conv_head.parameters(), *model._bn1.parameters()]
    params += [*model._fc.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    if not train_bn:  # frozen statistics: eval-mode batch norm, dropout still on
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    losses = []
    for _ in range(steps):
        i = torch.randint(len(h), (batch,), generator=generator)
        loss = F.cross_entropy(model.tail(h[i], start), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _check_labels(y: object, n: int) -> None:
    check_tensor(y, "y", ndim=1)
    if len(y) != n or y.is_floating_point():
        raise ValueError(
            f"y must be {n} integer labels, got {y.dtype} {tuple(y.shape)}"
        )


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, x: torch.Tensor, batch: int = 200) -> None:
    """Set every batch-norm layer's running mean and variance to their averages over
    the images ``x`` under the model's current weights, then return to eval mode.

    The running averages trail the weights: after a short, fast training run they
    describe layers that no longer exist, and eval mode then normalises with the
    wrong statistics. One pass in train mode with ``momentum=None`` (a plain average
    over the batches) replaces them."""
    check_positive_int(batch, "batch")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the cumulative average of the batches' statistics
    model.train()
    for start in range(0, len(x), batch):
        model(x[start : start + batch])
    for m in norms:
        m.momentum = 0.1
    model.eval()


@torch.no_grad()
def accuracy(predict, x: torch.Tensor, y: torch.Tensor, batch: int = 200) -> float:
    """The fraction of ``x`` whose arg-max of ``predict(x)`` equals ``y``."""
    hits = 0
    for start in range(0, len(x), batch):
        hits += (
            (predict(x[start : start + batch]).argmax(-1) == y[start : start + batch])
            .sum()
            .item()
        )
    return hits / len(x)
