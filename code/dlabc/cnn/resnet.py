"""Deeper networks: LeNet-5, AlexNet, VGG, Inception and ResNet, and what they cost.

Chapter: ``book/cnn/resnet.md``.

References:
- LeCun, Bottou, Bengio & Haffner (1998), Proc. IEEE, *Gradient-based learning applied
  to document recognition* (LeNet-5).
- Krizhevsky, Sutskever & Hinton (2012), NeurIPS, *ImageNet classification with deep
  convolutional neural networks* (AlexNet).
- Simonyan & Zisserman (2015), ICLR, *Very deep convolutional networks for large-scale
  image recognition* (VGG).
- Szegedy et al. (2015), CVPR, *Going deeper with convolutions* (GoogLeNet, Inception).
- He, Zhang, Ren & Sun (2016), CVPR, *Deep residual learning for image recognition*
  (ResNet).

The models are built from ``torch.nn`` layers (the convolution chapters built those
by hand). Their cost is measured by :func:`count_parameters` and :func:`count_macs`; the
latter runs the forward pass on the ``meta`` device, where tensors have shapes but no
data, so that even VGG-16 at 224 x 224 costs nothing. The ResNet's parameter names are
chosen so that a Hugging Face ``ResNetForImageClassification`` loads into it through the
short renaming table :data:`HF_RENAMES`. Shapes: ``N`` batch, ``C`` channels, ``H x W``
positions.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_positive_int, check_tensor

__all__ = [
    "count_parameters",
    "macs_by_layer",
    "count_macs",
    "LeNet5",
    "AlexNet",
    "VGG_CONFIGS",
    "VGG",
    "vgg",
    "InceptionBlock",
    "ConvBN",
    "ResidualBlock",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "HF_RENAMES",
    "from_hf_state_dict",
    "conv_gradient_norms",
]


# --------------------------------------------------------------------- counting


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model`` (each shared parameter counted once).

    Buffers such as BatchNorm's running statistics are not parameters and are not
    counted, as in the papers.
    """
    return sum(p.numel() for p in _check_module(model).parameters())


def macs_by_layer(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    r"""Multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` for one example.

    A convolution with $C_\text{in}$ input channels in ``groups`` groups and a
    $k_h \times k_w$ kernel computes each of its outputs with
    $\frac{C_\text{in}}{\text{groups}} k_h k_w$ multiply-adds; a linear layer with
    $d_\text{in}$ inputs with $d_\text{in}$. So a layer costs (outputs) x (that number).
    Forward hooks read the output shapes while the forward pass runs on the ``meta``
    device, on stand-ins for the parameters and buffers
    (``torch.func.functional_call``), so the model's own weights are neither used nor
    changed, and the pass is free.
    ``input_shape`` is the shape of one example, without the batch axis, e.g.
    ``(3, 224, 224)``. Biases, normalization, activations and pooling are not counted.
    """
    _check_model_and_shape(model, input_shape)
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups
                per_output *= math.prod(module.kernel_size)
            else:  # nn.Linear
                per_output = module.in_features
            macs[name] = macs.get(name, 0) + output.numel() * per_output

        return record

    handles = [
        module.register_forward_hook(hook(name or type(module).__name__))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    tensors = dict(model.named_parameters())  # a shared parameter once (it stays tied)
    tensors.update(model.named_buffers())
    stand_ins = {k: torch.empty_like(t, device="meta") for k, t in tensors.items()}
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    x = torch.empty(1, *input_shape, device="meta", dtype=(floating or [None])[0])
    modes = {module: module.training for module in model.modules()}
    model.eval()  # BatchNorm would refuse a batch of one value per channel in training
    try:
        with torch.no_grad():
            torch.func.functional_call(model, stand_ins, (x,))
    finally:
        for module, training in modes.items():  # each module's own mode, restored
            module.training = training
        for handle in handles:
            handle.remove()
    return macs


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Total multiply-accumulates of one forward pass for one example.

    The sum of :func:`macs_by_layer`; one MAC is one multiplication and one addition,
    what He et al. (2016) call a FLOP ("multiply-adds").
    """
    return sum(macs_by_layer(model, input_shape).values())


def _check_model_and_shape(model: object, input_shape: object) -> None:
    """``model`` is a module; ``input_shape`` a non-empty sequence of positive ints."""
    _check_module(model)
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(
            f"input_shape must be a sequence of ints, got {type(input_shape).__name__}"
        )
    if len(input_shape) == 0:
        raise ValueError("input_shape must have at least one axis")
    for i, n in enumerate(input_shape):
        check_positive_int(n, f"input_shape[{i}]")


def _check_images(
    x: torch.Tensor,
    channels: int,
    minimum: int = 1,
    model: str = "",
    exact: tuple[int, int] | None = None,
) -> None:
    """``x`` must be a floating-point batch of images ``(N, channels, H, W)``.

    With ``minimum``, both sides must be at least that many pixels (``model`` names the
    network in the message); with ``exact``, ``(H, W)`` must be exactly that. Shapes
    only: no value of ``x`` is read, so the check costs no device synchronisation.
    """
    check_tensor(x, "x", ndim=4, floating=True)
    if x.shape[1] != channels:
        raise ValueError(
            f"x must have {channels} channels on axis 1, got shape {tuple(x.shape)}"
        )
    if exact is not None and tuple(x.shape[-2:]) != exact:
        raise ValueError(
            f"{model} needs {exact[0]}x{exact[1]} images, got shape {tuple(x.shape)}"
        )
    if min(x.shape[-2:]) < minimum:
        raise ValueError(
            f"{model} needs images of at least {minimum}x{minimum} pixels, "
            f"got shape {tuple(x.shape)}"
        )


def _check_sizes(**sizes: object) -> None:
    """Every keyword argument must be a positive int (its name goes in the message)."""
    for name, value in sizes.items():
        check_positive_int(value, name)


# --------------------------------------------------------------------- the classics


class LeNet5(nn.Module):
    r"""LeNet-5 (LeCun et al., 1998, figure 2) on ``(N, 1, 32, 32)`` images.

    C1: 6 maps of $5 \times 5$ convolutions (28 x 28); S2: $2 \times 2$ average
    pooling (14 x 14); C3: 16 maps, $5 \times 5$ (10 x 10); S4: pooling (5 x 5); C5:
    120 maps, $5 \times 5$ (1 x 1, a convolution that acts as a full layer); F6: 84
    units; output: ``num_classes`` units. Squashing function $1.7159 \tanh(2a/3)$, as
    in the paper. Today's simplifications: C3 sees all six S2 maps (the paper's table
    I connects each C3 map to 3, 4 or 6 of them), S2 and S4 are plain averages (the
    paper gave each map a trainable coefficient and bias), and the output layer is
    linear (the paper used Euclidean radial basis functions).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        self.c1 = nn.Conv2d(1, 6, 5)
        self.s2 = nn.AvgPool2d(2)
        self.c3 = nn.Conv2d(6, 16, 5)
        self.s4 = nn.AvgPool2d(2)
        self.c5 = nn.Conv2d(16, 120, 5)
        self.f6 = nn.Linear(120, 84)
        self.output = nn.Linear(84, num_classes)

    @staticmethod
    def squash(a: torch.Tensor) -> torch.Tensor:
        r"""The paper's scaled tanh, $f(a) = 1.7159 \tanh(2a/3)$: $f(\pm 1) = \pm 1$."""
        return 1.7159 * torch.tanh(2 * a / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, 1, model="LeNet5", exact=(32, 32))
        x = self.s2(self.squash(self.c1(x)))  # (N, 6, 14, 14)
        x = self.s4(self.squash(self.c3(x)))  # (N, 16, 5, 5)
        x = self.squash(self.c5(x)).flatten(1)  # (N, 120)
        return self.output(self.squash(self.f6(x)))  # (N, num_classes)


def _check_alexnet_args(num_classes: object, groups: object) -> None:
    _check_sizes(num_classes=num_classes, groups=groups)
    if groups not in (1, 2):
        raise ValueError(f"groups must be 1 or 2 (GPUs), got {groups}")


class AlexNet(nn.Module):
    r"""AlexNet (Krizhevsky et al., 2012, figure 2) on ``(N, 3, 227, 227)`` images.

    Five convolutions (96 $11 \times 11$ stride 4, 256 $5 \times 5$, 384, 384, 256
    $3 \times 3$), ReLU, local response normalization after the first two, overlapping
    $3 \times 3$ stride-2 max-pooling after the first, second and fifth, then three
    full layers (4096, 4096, ``num_classes``), dropout 0.5 on the first two's outputs.
    The network was split over two GPUs: convolutions 2, 4 and 5 only see the half of
    the maps on their own GPU, which ``groups=2`` reproduces exactly; ``groups=1`` is
    the single-GPU version. (The paper says 224 x 224 inputs, but its layer sizes need
    227 x 227.) An adaptive average pool makes other input sizes usable; at 227 x 227
    it does nothing.
    """

    def __init__(self, num_classes: int = 1000, groups: int = 2) -> None:
        super().__init__()
        _check_alexnet_args(num_classes, groups)

        def lrn() -> nn.LocalResponseNorm:
            # the paper's k=2, n=5, alpha=1e-4, beta=0.75; torch divides alpha by n
            return nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)

        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, 96, 11, stride=4),  # (N, 96, 55, 55)
                relu1=nn.ReLU(),
                norm1=lrn(),
                pool1=nn.MaxPool2d(3, stride=2),  # (N, 96, 27, 27)
                conv2=nn.Conv2d(96, 256, 5, padding=2, groups=groups),
                relu2=nn.ReLU(),
                norm2=lrn(),
                pool2=nn.MaxPool2d(3, stride=2),  # (N, 256, 13, 13)
                conv3=nn.Conv2d(256, 384, 3, padding=1),  # sees both GPUs' maps
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(384, 384, 3, padding=1, groups=groups),
                relu4=nn.ReLU(),
                conv5=nn.Conv2d(384, 256, 3, padding=1, groups=groups),
                relu5=nn.ReLU(),
                pool5=nn.MaxPool2d(3, stride=2),  # (N, 256, 6, 6)
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(256 * 6 * 6, 4096),
                relu6=nn.ReLU(),
                drop6=nn.Dropout(0.5),
                fc7=nn.Linear(4096, 4096),
                relu7=nn.ReLU(),
                drop7=nn.Dropout(0.5),
                fc8=nn.Linear(4096, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, 3, minimum=67, model="AlexNet")  # what the 3 pools allow
        x = self.pool(self.features(x)).flatten(1)  # (N, 9216)
        return self.classifier(x)  # (N, num_classes)


#: Simonyan & Zisserman's table 1: output channels of each 3x3 convolution, "M" for a
#: 2x2 max-pool. Configurations A (VGG-11), B (VGG-13), D (VGG-16) and E (VGG-19).
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M")
    + (512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
    + (512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M")
    + (512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def _check_vgg_args(config: object, num_classes: object, in_channels: object) -> None:
    _check_sizes(num_classes=num_classes, in_channels=in_channels)
    if isinstance(config, str) or not isinstance(config, Sequence) or not config:
        raise ValueError("config must be a non-empty sequence of ints and 'M'")
    for i, item in enumerate(config):
        if item != "M":
            check_positive_int(item, f"config[{i}]")
    if all(item == "M" for item in config):
        raise ValueError("config must contain at least one convolution")


class VGG(nn.Module):
    r"""A VGG network: stacks of $3 \times 3$ convolutions (padding 1) and ReLU, a
    $2 \times 2$ max-pool after each stack, then 4096, 4096 and ``num_classes`` units.

    ``config`` lists the convolutions' output channels and ``"M"`` for the pools
    (:data:`VGG_CONFIGS`). Two stacked $3 \times 3$ convolutions see a $5 \times 5$
    window, three a $7 \times 7$ one, with fewer weights ($3 \cdot 9 C^2$ instead of
    $49 C^2$) and more non-linearities. The final feature map is average-pooled to
    7 x 7 (at 224 x 224 it already is), so other input sizes work too.
    """

    def __init__(
        self,
        config: Sequence[int | str],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        _check_vgg_args(config, num_classes, in_channels)
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))  # halves H and W
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.n_pools = sum(item == "M" for item in config)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_channels, minimum=2**self.n_pools, model="this VGG")
        x = self.pool(self.features(x)).flatten(1)  # (N, channels * 7 * 7)
        return self.classifier(x)  # (N, num_classes)


def vgg(name: str = "vgg16", num_classes: int = 1000) -> VGG:
    """VGG-11, -13, -16 or -19 (configurations A, B, D, E of Simonyan & Zisserman)."""
    if name not in VGG_CONFIGS:
        raise ValueError(f"name must be one of {tuple(VGG_CONFIGS)}, got {name!r}")
    return VGG(VGG_CONFIGS[name], num_classes)


class InceptionBlock(nn.Module):
    r"""GoogLeNet's Inception module (Szegedy et al., 2015, figure 2b).

    Four branches look at the same input at different scales, and their outputs are
    concatenated along the channels:

    $y = \big[\,f_{1\times1}(x);\ f_{3\times3}(g_{3}(x));\ f_{5\times5}(g_{5}(x));\
    p(\operatorname{maxpool}_{3\times3}(x))\,\big]$,

    where $g_3, g_5$ are the $1 \times 1$ "reduce" convolutions that shrink the channels
    before the expensive convolutions, and $p$ is the $1 \times 1$ "pool proj". Every
    convolution is followed by a ReLU; all branches keep ``H x W``. The arguments are
    the columns of the paper's table 1; the output has ``c1 + c3 + c5 + pool_proj``
    channels.
    """

    def __init__(
        self,
        in_channels: int,
        c1: int,
        c3_reduce: int,
        c3: int,
        c5_reduce: int,
        c5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        _check_sizes(in_channels=in_channels, c1=c1, c3=c3, c5=c5, pool_proj=pool_proj)
        _check_sizes(c3_reduce=c3_reduce, c5_reduce=c5_reduce)
        self.in_channels = in_channels
        self.out_channels = c1 + c3 + c5 + pool_proj

        def conv(c_in: int, c_out: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.ReLU())

        self.branch1 = conv(in_channels, c1, 1)
        self.branch3 = nn.Sequential(
            conv(in_channels, c3_reduce, 1), conv(c3_reduce, c3, 3)
        )
        self.branch5 = nn.Sequential(
            conv(in_channels, c5_reduce, 1), conv(c5_reduce, c5, 5)
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), conv(in_channels, pool_proj, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_channels)
        branches = (self.branch1, self.branch3, self.branch5, self.branch_pool)
        return torch.cat([b(x) for b in branches], dim=1)  # (N, out_channels, H, W)


# --------------------------------------------------------------------- ResNet


class ConvBN(nn.Module):
    """A convolution without bias, BatchNorm, and (if ``relu``) a ReLU.

    ``padding = kernel_size // 2``, so with ``stride`` s the output is ``ceil(H / s)``.
    The bias is left out because BatchNorm's shift replaces it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        relu: bool = True,
    ) -> None:
        super().__init__()
        for name, value in dict(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
        ).items():
            check_positive_int(value, name)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.conv.in_channels)
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The identity if the shapes agree, else a 1x1 projection (He's option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ConvBN(in_channels, out_channels, 1, stride, relu=False)


def _check_block_args(
    residual: object,
    in_channels: object,
    out_channels: object,
    stride: object,
    plain: object,
) -> None:
    if not isinstance(residual, nn.Module):
        raise TypeError(
            f"residual must be a torch.nn.Module, got {type(residual).__name__}"
        )
    _check_sizes(in_channels=in_channels, out_channels=out_channels, stride=stride)
    if not isinstance(plain, bool):
        raise TypeError(f"plain must be a bool, got {type(plain).__name__}")


class ResidualBlock(nn.Module):
    r"""$y = \operatorname{ReLU}\big(F(x) + \operatorname{shortcut}(x)\big)$.

    ``residual`` is the branch $F$ (:class:`BasicBlock` and :class:`Bottleneck` build
    it); the shortcut is $x$ itself, or a $1 \times 1$ projection $W_s x$ when
    ``stride > 1`` or the channels change. ``plain=True`` drops the shortcut:
    $y = \operatorname{ReLU}(F(x))$, the "plain" network the paper compares with.
    """

    def __init__(
        self,
        residual: nn.Module,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        plain: bool = False,
    ) -> None:
        super().__init__()
        _check_block_args(residual, in_channels, out_channels, stride, plain)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.residual = residual  # F
        # a plain block is the same block without its shortcut
        self.shortcut = None if plain else _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_channels)
        y = self.residual(x)  # F(x): (N, out_channels, H / stride, W / stride)
        if self.shortcut is not None:
            y = y + self.shortcut(x)  # F(x) + x, or F(x) + W_s x
        return F.relu(y)


class BasicBlock(ResidualBlock):
    r"""The residual block of ResNet-18 and -34: $y = \operatorname{ReLU}(F(x) + x)$.

    $F$ is $3 \times 3$ conv-BN-ReLU then $3 \times 3$ conv-BN; the first convolution
    has the ``stride``. The shortcut, and ``plain``, as in :class:`ResidualBlock`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        plain: bool = False,
    ) -> None:
        residual = nn.Sequential(
            ConvBN(in_channels, out_channels, 3, stride),
            ConvBN(out_channels, out_channels, 3, relu=False),
        )
        super().__init__(residual, in_channels, out_channels, stride, plain)


def _check_bottleneck_width(out_channels: object) -> None:
    if check_positive_int(out_channels, "out_channels") % 4:
        raise ValueError(
            f"out_channels must be divisible by 4 (the bottleneck), got {out_channels}"
        )


class Bottleneck(ResidualBlock):
    r"""The residual block of ResNet-50 and deeper: 1x1, 3x3, 1x1 convolutions.

    $F$ reduces the channels to ``out_channels // 4`` with a $1 \times 1$ convolution,
    applies the $3 \times 3$ convolution there, and expands back with a $1 \times 1$
    one; $y = \operatorname{ReLU}(F(x) + x)$ as in :class:`BasicBlock`. The paper put
    the ``stride`` on the first $1 \times 1$ convolution (``stride_in_3x3=False``,
    "v1"); torchvision and Hugging Face put it on the $3 \times 3$ one (the default,
    "v1.5"), which costs more multiply-adds and is slightly more accurate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        plain: bool = False,
        stride_in_3x3: bool = True,
    ) -> None:
        _check_bottleneck_width(out_channels)
        mid = out_channels // 4
        s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
        residual = nn.Sequential(
            ConvBN(in_channels, mid, 1, s1),  # reduce
            ConvBN(mid, mid, 3, s3),
            ConvBN(mid, out_channels, 1, relu=False),  # expand
        )
        super().__init__(residual, in_channels, out_channels, stride, plain)


def _check_resnet_args(
    block: object,
    depths: Sequence[int],
    widths: Sequence[int],
    num_classes: object,
    in_channels: object,
    stem_width: object,
) -> None:
    if not (
        isinstance(block, type)
        and issubclass(block, ResidualBlock)
        and block is not ResidualBlock
    ):
        raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
    depths, widths = tuple(depths), tuple(widths)
    if not depths or len(depths) != len(widths):
        raise ValueError(
            "depths and widths must be non-empty and of the same length, "
            f"got {len(depths)} and {len(widths)}"
        )
    for i, (d, w) in enumerate(zip(depths, widths, strict=True)):
        check_positive_int(d, f"depths[{i}]")
        check_positive_int(w, f"widths[{i}]")
    _check_sizes(
        num_classes=num_classes, in_channels=in_channels, stem_width=stem_width
    )


class ResNet(nn.Module):
    r"""ResNet: a stem, stages of residual blocks, global average pooling, a full layer.

    The stem is a $7 \times 7$ stride-2 conv-BN-ReLU to ``stem_width`` channels and a
    $3 \times 3$ stride-2 max-pool: it divides ``H`` and ``W`` by 4 (224 -> 56). Stage
    ``i`` has ``depths[i]`` blocks with ``widths[i]`` output channels; the first block
    of every stage but the first halves ``H`` and ``W`` (stride 2). ``plain=True``
    removes every shortcut; ``block_options`` go to every block (``stride_in_3x3``).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_width: int = 64,
        plain: bool = False,
        **block_options: bool,
    ) -> None:
        super().__init__()
        depths, widths = tuple(depths), tuple(widths)
        _check_resnet_args(block, depths, widths, num_classes, in_channels, stem_width)
        self.in_channels = in_channels
        self.stem = ConvBN(in_channels, stem_width, 7, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, channels = [], stem_width
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(channels, width, stride, plain, **block_options))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.in_channels)
        x = self.pool(self.stem(x))  # (N, stem_width, H / 4, W / 4)
        for stage in self.stages:
            x = stage(x)  # the first block of stages 2, 3, ... halves H and W
        x = x.mean(dim=(2, 3))  # global average pooling: (N, widths[-1])
        return self.fc(x)  # (N, num_classes)


def resnet18(num_classes: int = 1000, plain: bool = False) -> ResNet:
    """ResNet-18: basic blocks, (2, 2, 2, 2) per stage, 64 to 512 channels."""
    return ResNet(
        BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), num_classes, plain=plain
    )


def resnet34(num_classes: int = 1000, plain: bool = False) -> ResNet:
    """ResNet-34: basic blocks, (3, 4, 6, 3) per stage, 64 to 512 channels."""
    return ResNet(
        BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), num_classes, plain=plain
    )


def resnet50(num_classes: int = 1000, stride_in_3x3: bool = True) -> ResNet:
    """ResNet-50: bottleneck blocks, (3, 4, 6, 3) per stage, 256 to 2048 channels.

    ``stride_in_3x3=True`` is "v1.5" (torchvision, Hugging Face); ``False`` the paper's.
    """
    return ResNet(
        Bottleneck,
        (3, 4, 6, 3),
        (256, 512, 1024, 2048),
        num_classes,
        stride_in_3x3=stride_in_3x3,
    )


#: Hugging Face ``ResNetForImageClassification`` state-dict names -> ours, in order:
#: ``resnet.encoder.stages.1.layers.0.layer.2.normalization.weight`` becomes
#: ``stages.1.0.residual.2.bn.weight``.
HF_RENAMES: tuple[tuple[str, str], ...] = (
    ("resnet.embedder.embedder.", "stem."),
    ("resnet.encoder.stages.", "stages."),
    (".layers.", "."),
    (".layer.", ".residual."),
    ("convolution", "conv"),
    ("normalization", "bn"),
    ("classifier.1.", "fc."),
)


def _check_mapping(state_dict: object) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping, got {type(state_dict).__name__}"
        )


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A Hugging Face ResNet's ``state_dict`` with our names (:data:`HF_RENAMES`)."""
    _check_mapping(state_dict)
    renamed = {}
    for key, value in state_dict.items():
        for old, new in HF_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


# --------------------------------------------------------------------- experiment


def conv_gradient_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[float]:
    r"""$\lVert \partial L / \partial W_l \rVert_2$ for every ``nn.Conv2d`` weight.

    One forward and backward pass of the mean cross-entropy $L$ on ``(x, y)``, in the
    model's current mode; the layers come in the order ``model.modules()`` lists them
    (for the book's networks, from input to output). The model's existing gradients
    are left as they were.
    """
    _check_module(model)
    check_tensor(x, "x", floating=True)
    check_tensor(y, "y", ndim=1, dtype=torch.long)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            "x and y must be non-empty and of the same length, "
            f"got {len(x)} and {len(y)}"
        )
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not weights:
        raise ValueError("model has no nn.Conv2d layer")
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, weights)
    return [g.norm().item() for g in grads]
