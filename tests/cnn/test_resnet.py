"""Tests for ``dlabc.cnn.resnet``.

The references are code no one here wrote. Hugging Face ``transformers`` builds
random-initialised ResNet-18 and ResNet-50 (both stride placements); their weights, with
random BatchNorm statistics, are copied into ours through ``from_hf_state_dict``, and
the logits must agree in evaluation mode; in training mode the logits, the parameter
gradients and the updated running statistics must agree too. The single residual blocks
are compared with HF's blocks for many shapes and strides. Parameter counts are checked
against the exact figures of HF's models and of the VGG paper's table 2 (VGG-16:
138,357,544), and against closed forms for LeNet-5, AlexNet and the Inception block.
``count_macs`` is checked against the closed form of a single convolution (many shapes,
strides, paddings, groups) and of a linear layer, against a per-layer closed form of
VGG-16, and must give the same on the ``meta`` device as on the CPU without touching the
model. The Inception block is compared with its four branches written with ``F.conv2d``
and ``F.max_pool2d``, AlexNet's response normalization with the paper's formula, and
``conv_gradient_norms`` with ``backward()``. Bad input fails early.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.resnet.modeling_resnet import (
    ResNetBasicLayer,
    ResNetBottleNeckLayer,
)

from dlabc.cnn.resnet import (
    HF_RENAMES,
    VGG,
    VGG_CONFIGS,
    AlexNet,
    BasicBlock,
    Bottleneck,
    ConvBN,
    InceptionBlock,
    LeNet5,
    ResidualBlock,
    ResNet,
    conv_gradient_norms,
    count_macs,
    count_parameters,
    from_hf_state_dict,
    macs_by_layer,
    resnet18,
    resnet34,
    resnet50,
    vgg,
)
from transformers import ResNetConfig, ResNetForImageClassification

TOL = dict(rtol=1e-5, atol=1e-5)


def randomize_batchnorm(model: nn.Module) -> None:
    """Random affine parameters and running statistics: BN is no longer the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


# --------------------------------------------------------------------- HF reference

HF_MODELS = {
    "resnet18": (
        dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
        lambda: resnet18(),
        11_689_512,
    ),
    "resnet50": (
        dict(
            layer_type="bottleneck",
            depths=[3, 4, 6, 3],
            hidden_sizes=[256, 512, 1024, 2048],
        ),
        lambda: resnet50(),
        25_557_032,
    ),
    "resnet50-v1": (
        dict(
            layer_type="bottleneck",
            depths=[3, 4, 6, 3],
            hidden_sizes=[256, 512, 1024, 2048],
            downsample_in_bottleneck=True,  # HF's name for the stride on the 1x1
        ),
        lambda: resnet50(stride_in_3x3=False),
        25_557_032,
    ),
}


@pytest.fixture(scope="module", params=list(HF_MODELS))
def hf_pair(request):
    """(HF model, our model with its weights), both in evaluation mode."""
    config, make, n_params = HF_MODELS[request.param]
    torch.manual_seed(0)
    hf = ResNetForImageClassification(ResNetConfig(num_labels=1000, **config)).eval()
    randomize_batchnorm(hf)
    ours = make().eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    return hf, ours, n_params


def test_parameter_counts_equal_hf_and_the_published_figure(hf_pair):
    hf, ours, n_params = hf_pair
    assert count_parameters(ours) == hf.num_parameters() == n_params


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 72, 96), (3, 3, 33, 47)])
def test_logits_match_hf_in_evaluation_mode(hf_pair, shape):
    hf, ours, _ = hf_pair
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    assert got.shape == (shape[0], 1000)
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, **TOL)


def test_training_mode_matches_hf_forward_backward_and_running_statistics():
    torch.manual_seed(0)
    config = ResNetConfig(
        num_labels=7, layer_type="basic", depths=[1, 2], hidden_sizes=[16, 32]
    )
    config.embedding_size = 8
    hf = ResNetForImageClassification(config).double().train()
    randomize_batchnorm(hf)
    ours = ResNet(BasicBlock, (1, 2), (16, 32), num_classes=7, stem_width=8).double()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)
    upstream = torch.randn(4, 7, dtype=torch.float64)
    (hf(x).logits * upstream).sum().backward()
    (ours(x) * upstream).sum().backward()
    hf_params = dict(hf.named_parameters())
    renamed = from_hf_state_dict(hf_params)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, renamed[name].grad, rtol=1e-9, atol=1e-10)
    ours_state, hf_state = ours.state_dict(), from_hf_state_dict(hf.state_dict())
    for name in ours_state:
        if "running" in name:
            torch.testing.assert_close(ours_state[name], hf_state[name])


def test_from_hf_state_dict_renames_as_documented():
    keys = {
        "resnet.embedder.embedder.convolution.weight": "stem.conv.weight",
        "resnet.encoder.stages.1.layers.0.layer.2.normalization.weight": (
            "stages.1.0.residual.2.bn.weight"
        ),
        "resnet.encoder.stages.3.layers.0.shortcut.convolution.weight": (
            "stages.3.0.shortcut.conv.weight"
        ),
        "classifier.1.bias": "fc.bias",
    }
    value = torch.zeros(1)
    assert from_hf_state_dict(dict.fromkeys(keys, value)) == {
        new: value for new in keys.values()
    }
    assert len(HF_RENAMES) <= 8  # the table stays short


def hf_block_to_ours(state_dict):
    """A single HF block's keys (``layer.0.convolution.weight``) in our names."""
    prefix = "resnet.encoder.stages.0.layers.0."
    renamed = from_hf_state_dict({prefix + k: v for k, v in state_dict.items()})
    return {k.removeprefix("stages.0.0."): v for k, v in renamed.items()}


BLOCK_SHAPES = [  # in_channels, out_channels, stride, H, W
    (8, 8, 1, 9, 9),
    (8, 16, 1, 8, 10),
    (8, 16, 2, 8, 8),
    (16, 16, 2, 7, 11),
    (4, 12, 3, 10, 9),
]


@pytest.mark.parametrize("c_in, c_out, stride, h, w", BLOCK_SHAPES)
def test_basic_block_matches_hf_and_has_the_expected_shape(c_in, c_out, stride, h, w):
    torch.manual_seed(0)
    ref = ResNetBasicLayer(c_in, c_out, stride=stride).double().eval()
    randomize_batchnorm(ref)
    ours = BasicBlock(c_in, c_out, stride).double().eval()
    ours.load_state_dict(hf_block_to_ours(ref.state_dict()), strict=True)
    x = torch.randn(2, c_in, h, w, dtype=torch.float64)
    y = ours(x)
    assert y.shape == (2, c_out, math.ceil(h / stride), math.ceil(w / stride))
    torch.testing.assert_close(y, ref(x))
    projects = stride != 1 or c_in != c_out
    assert isinstance(ours.shortcut, ConvBN if projects else nn.Identity)


@pytest.mark.parametrize("c_in, c_out, stride, h, w", BLOCK_SHAPES)
@pytest.mark.parametrize("stride_in_3x3", [True, False])
def test_bottleneck_matches_hf_and_puts_the_stride_where_asked(
    c_in, c_out, stride, h, w, stride_in_3x3
):
    torch.manual_seed(0)
    ref = ResNetBottleNeckLayer(
        c_in, c_out, stride=stride, downsample_in_bottleneck=not stride_in_3x3
    )
    ref = ref.double().eval()
    randomize_batchnorm(ref)
    ours = Bottleneck(c_in, c_out, stride, stride_in_3x3=stride_in_3x3).double().eval()
    ours.load_state_dict(hf_block_to_ours(ref.state_dict()), strict=True)
    x = torch.randn(2, c_in, h, w, dtype=torch.float64)
    y = ours(x)
    assert y.shape == (2, c_out, math.ceil(h / stride), math.ceil(w / stride))
    torch.testing.assert_close(y, ref(x))
    strides = [layer.conv.stride[0] for layer in ours.residual]
    assert strides == ([1, stride, 1] if stride_in_3x3 else [stride, 1, 1])
    assert [layer.conv.out_channels for layer in ours.residual] == [c_out // 4] * 2 + [
        c_out
    ]


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("c_in, c_out, stride, h, w", BLOCK_SHAPES)
def test_plain_blocks_have_no_shortcut(block, c_in, c_out, stride, h, w):
    torch.manual_seed(0)
    ours = block(c_in, c_out, stride, plain=True).double().eval()
    randomize_batchnorm(ours)
    x = torch.randn(2, c_in, h, w, dtype=torch.float64)
    assert ours.shortcut is None
    torch.testing.assert_close(ours(x), F.relu(ours.residual(x)))
    residual = block(c_in, c_out, stride).double().eval()
    residual.load_state_dict(ours.state_dict(), strict=False)
    n_shortcut = sum(p.numel() for p in residual.shortcut.parameters())
    assert count_parameters(residual) - count_parameters(ours) == n_shortcut


@pytest.mark.parametrize("c_in, c_out, stride", [(4, 4, 1), (4, 8, 1), (4, 4, 2)])
def test_residual_block_adds_the_shortcut_to_any_branch(c_in, c_out, stride):
    torch.manual_seed(0)
    branch = nn.Conv2d(c_in, c_out, 3, stride, padding=1).double()
    block = ResidualBlock(branch, c_in, c_out, stride).double().eval()
    randomize_batchnorm(block)
    x = torch.randn(2, c_in, 6, 7, dtype=torch.float64)
    if stride == 1 and c_in == c_out:
        shortcut = x
    else:
        projection = block.shortcut
        shortcut = F.batch_norm(
            F.conv2d(x, projection.conv.weight, stride=stride),
            projection.bn.running_mean,
            projection.bn.running_var,
            projection.bn.weight,
            projection.bn.bias,
        )
    torch.testing.assert_close(block(x), F.relu(branch(x) + shortcut))
    plain = ResidualBlock(branch, c_in, c_out, stride, plain=True)
    torch.testing.assert_close(plain(x), F.relu(branch(x)))


def test_plain_resnet_removes_every_shortcut_and_keeps_the_rest():
    plain, residual = resnet18(plain=True), resnet18()
    blocks = [m for m in plain.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(b.shortcut is None for b in blocks)
    projections = 64 * 128 + 128 * 256 + 256 * 512 + 2 * (128 + 256 + 512)
    assert count_parameters(residual) - count_parameters(plain) == projections


# --------------------------------------------------------------------- counting


def conv_macs_closed_form(c_in, c_out, k, stride, padding, groups, h, w):
    h_out = (h + 2 * padding - k) // stride + 1
    w_out = (w + 2 * padding - k) // stride + 1
    return c_out * h_out * w_out * (c_in // groups) * k * k


CONV_CASES = [  # c_in, c_out, k, stride, padding, groups, h, w
    (3, 8, 3, 1, 1, 1, 16, 16),
    (3, 64, 7, 2, 3, 1, 224, 224),
    (4, 6, 5, 1, 0, 2, 13, 17),
    (6, 6, 3, 2, 1, 6, 9, 8),
    (2, 5, 1, 1, 0, 1, 1, 1),
    (8, 4, 4, 3, 2, 4, 20, 11),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_count_macs_of_a_convolution_is_the_closed_form(case):
    c_in, c_out, k, stride, padding, groups, h, w = case
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups)
    expected = conv_macs_closed_form(*case)
    assert count_macs(conv, (c_in, h, w)) == expected
    assert macs_by_layer(conv, (c_in, h, w)) == {"Conv2d": expected}
    assert count_parameters(conv) == c_out * (c_in // groups * k * k + 1)


@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7)])
def test_count_macs_of_a_linear_layer_is_the_closed_form(shape):
    layer = nn.Linear(7, 11)
    assert count_macs(layer, shape) == math.prod(shape[:-1]) * 7 * 11
    assert count_parameters(layer) == 7 * 11 + 11


def test_count_macs_sums_the_layers_and_ignores_the_rest():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )
    by_layer = macs_by_layer(model, (3, 8, 8))
    assert by_layer == {"0": 4 * 64 * 27, "5": 64 * 5}
    assert count_macs(model, (3, 8, 8)) == sum(by_layer.values())


def test_a_module_called_twice_counts_twice():
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    assert count_macs(model, (4,)) == 2 * 16
    assert count_parameters(model) == 20  # the shared weights once


def test_count_macs_on_meta_equals_the_cpu_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = macs_by_layer(model, (3, 64, 64))
    assert model.training  # the mode is restored
    model.stages[0].eval()  # a mixed mode is restored module by module
    macs_by_layer(model, (3, 32, 32))
    assert model.training and not model.stages[0][1].residual[0].bn.training
    model.train()
    for k, v in model.state_dict().items():  # no weight or running statistic moved
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    with torch.device("meta"):
        meta_model = resnet18(num_classes=10)
    assert macs_by_layer(meta_model, (3, 64, 64)) == cpu
    assert count_parameters(meta_model) == count_parameters(model)


def test_count_macs_of_vgg16_is_the_per_layer_closed_form():
    expected, channels, size = 0, 3, 224
    for item in VGG_CONFIGS["vgg16"]:
        if item == "M":
            size //= 2
        else:
            expected += item * size * size * channels * 9
            channels = item
    expected += 512 * 7 * 7 * 4096 + 4096 * 4096 + 4096 * 1000
    with torch.device("meta"):
        model = vgg("vgg16")
    assert count_macs(model, (3, 224, 224)) == expected


# --------------------------------------------------------------------- the classics


@pytest.mark.parametrize(
    "name, published_millions",
    [("vgg11", 133), ("vgg13", 133), ("vgg16", 138), ("vgg19", 144)],
)
def test_vgg_parameters_match_table_2_of_the_paper(name, published_millions):
    with torch.device("meta"):
        model = vgg(name)
    assert round(count_parameters(model) / 1e6) == published_millions


def test_vgg16_has_138_357_544_parameters_and_16_weight_layers():
    with torch.device("meta"):
        model = vgg("vgg16")
    assert count_parameters(model) == 138_357_544
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 16


def test_lenet5_parameters_and_macs_closed_form():
    model = LeNet5()
    c1, c3, c5 = 6 * (25 + 1), 16 * (6 * 25 + 1), 120 * (16 * 25 + 1)
    f6, out = 84 * (120 + 1), 10 * (84 + 1)
    assert count_parameters(model) == c1 + c3 + c5 + f6 + out == 61_706
    macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 120 * 400 + 120 * 84 + 84 * 10
    assert count_macs(model, (1, 32, 32)) == macs
    # the paper's count: partial C3 (60 kernels of 5x5, 16 biases), trainable S2 and
    # S4 (a coefficient and a bias per map), F6, and no output layer of weights
    paper = c1 + 12 + (60 * 25 + 16) + 32 + c5 + f6
    assert paper == 60_000


def test_lenet5_forward_shape_and_squashing_function():
    model = LeNet5(num_classes=7)
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 7)
    one = torch.tensor([-1.0, 1.0])
    torch.testing.assert_close(LeNet5.squash(one), one, rtol=0, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_alexnet_parameters_closed_form(groups):
    with torch.device("meta"):
        model = AlexNet(groups=groups)
    convs = [  # (c_in, c_out, k, grouped)
        (3, 96, 11, False),
        (96, 256, 5, True),
        (256, 384, 3, False),
        (384, 384, 3, True),
        (384, 256, 3, True),
    ]
    expected = sum(
        c_out * ((c_in // (groups if grouped else 1)) * k * k + 1)
        for c_in, c_out, k, grouped in convs
    )
    expected += 4096 * (9216 + 1) + 4096 * (4096 + 1) + 1000 * (4096 + 1)
    assert count_parameters(model) == expected
    if groups == 2:
        assert expected == 60_965_224  # the paper: "60 million parameters"


@pytest.mark.parametrize(
    "make, shape, out",
    [
        (lambda: AlexNet(num_classes=5), (2, 3, 227, 227), (2, 5)),
        (lambda: AlexNet(), (1, 3, 224, 224), (1, 1000)),
        (lambda: vgg("vgg11", num_classes=3), (2, 3, 224, 224), (2, 3)),
        (lambda: vgg("vgg19"), (1, 3, 64, 64), (1, 1000)),
        (lambda: resnet34(num_classes=4), (2, 3, 224, 224), (2, 4)),
        (lambda: resnet50(), (1, 3, 97, 131), (1, 1000)),
    ],
)
def test_forward_shapes_on_the_meta_device(make, shape, out):
    with torch.device("meta"):
        model = make().eval()
        assert model(torch.empty(shape)).shape == out


def test_alexnet_feature_sizes_at_227():
    with torch.device("meta"):
        model = AlexNet().eval()
        x = torch.empty(1, 3, 227, 227)
        sizes = {}
        for name, layer in model.features.named_children():
            x = layer(x)
            sizes[name] = tuple(x.shape[1:])
    assert sizes["conv1"] == (96, 55, 55)
    assert sizes["pool2"] == (256, 13, 13)
    assert sizes["pool5"] == (256, 6, 6)


def test_alexnet_response_normalization_is_the_papers_formula():
    """b = a / (k + alpha * sum over n=5 neighbouring maps of a^2)^beta."""
    a = torch.randn(2, 9, 4, 4, dtype=torch.float64) * 10
    with torch.device("meta"):  # the layer has no weights: take it from a meta model
        norm = AlexNet().features.norm1
    k, alpha, beta, n = 2.0, 1e-4, 0.75, 5
    squares = F.pad(a.pow(2), (0, 0, 0, 0, n // 2, n // 2))  # pad the channel axis
    sums = torch.stack([squares[:, c : c + n].sum(1) for c in range(9)], dim=1)
    torch.testing.assert_close(norm(a), a / (k + alpha * sums) ** beta)


def test_inception_3a_matches_its_branches_written_with_torch_functions():
    torch.manual_seed(0)
    block = InceptionBlock(192, 64, 96, 128, 16, 32, 32).double()
    x = torch.randn(2, 192, 28, 28, dtype=torch.float64)

    def conv(seq, x, padding):
        layer = seq[0]
        return F.relu(F.conv2d(x, layer.weight, layer.bias, padding=padding))

    expected = torch.cat(
        [
            conv(block.branch1, x, 0),
            conv(block.branch3[1], conv(block.branch3[0], x, 0), 1),
            conv(block.branch5[1], conv(block.branch5[0], x, 0), 2),
            conv(block.branch_pool[1], F.max_pool2d(x, 3, 1, padding=1), 0),
        ],
        dim=1,
    )
    y = block(x)
    assert y.shape == (2, 256, 28, 28) and block.out_channels == 256
    torch.testing.assert_close(y, expected)
    # Szegedy et al., table 1, inception (3a): 128 M operations
    assert round(count_macs(block, (192, 28, 28)) / 1e6) == 128


@pytest.mark.parametrize(
    "sizes", [(8, 1, 1, 1, 1, 1, 1), (5, 3, 2, 4, 3, 6, 7), (16, 8, 4, 8, 2, 4, 3)]
)
@pytest.mark.parametrize("hw", [(1, 1), (6, 9)])
def test_inception_output_channels_are_the_sum_of_the_branches(sizes, hw):
    c_in, c1, c3r, c3, c5r, c5, pp = sizes
    block = InceptionBlock(*sizes)
    y = block(torch.randn(2, c_in, *hw))
    assert y.shape == (2, c1 + c3 + c5 + pp, *hw)
    expected = (
        c1 * (c_in + 1)
        + c3r * (c_in + 1)
        + c3 * (9 * c3r + 1)
        + c5r * (c_in + 1)
        + c5 * (25 * c5r + 1)
        + pp * (c_in + 1)
    )
    assert count_parameters(block) == expected


# --------------------------------------------------------------------- gradient norms


def test_conv_gradient_norms_match_backward_and_keep_existing_gradients():
    torch.manual_seed(0)
    model = ResNet(BasicBlock, (2,), (8,), num_classes=10, in_channels=1, stem_width=8)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    norms = conv_gradient_norms(model, x, y)
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    convs = [model.stem.conv] + [m.conv for b in model.stages[0] for m in b.residual]
    assert len(norms) == len(convs) == 5
    for norm, conv in zip(norms, convs, strict=True):
        assert norm == pytest.approx(conv.weight.grad.norm().item(), rel=1e-6)


# --------------------------------------------------------------------- bad input


def _meta(call):
    """Run ``call`` with every tensor it makes on the meta device (big models, no data)."""

    def run():
        with torch.device("meta"):
            return call()

    return run


def _bad_images(name, make, good):
    """Four bad batches of images for the model ``make()``, whose good batch is ``good``."""
    n, c, h, w = good
    return [
        pytest.param(
            lambda: make()([[0.0]]),
            TypeError,
            "x must be a torch.Tensor, got list",
            id=f"{name}-x-list",
        ),
        pytest.param(
            lambda: make()(torch.zeros(good, dtype=torch.long)),
            TypeError,
            "x must be a floating-point tensor",
            id=f"{name}-x-long",
        ),
        pytest.param(
            lambda: make()(torch.zeros(c, h, w)),
            ValueError,
            r"x must have 4 dimensions, got shape",
            id=f"{name}-x-3d",
        ),
        pytest.param(
            lambda: make()(torch.zeros(n, c + 1, h, w)),
            ValueError,
            rf"x must have {c} channels on axis 1",
            id=f"{name}-x-channels",
        ),
    ]


_LAYER = nn.Linear(3, 2)
_SMALL = ResNet(BasicBlock, (1,), (4,), 3, 1, 4)
_X, _Y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))

BAD_INPUT = [
    # counting
    pytest.param(
        lambda: count_parameters("resnet"),
        TypeError,
        "model must be a torch.nn.Module, got str",
        id="count_parameters-model",
    ),
    pytest.param(
        lambda: count_macs("resnet", (3,)),
        TypeError,
        "model must be a torch.nn.Module, got str",
        id="count_macs-model",
    ),
    pytest.param(
        lambda: count_macs(_LAYER, 3),
        TypeError,
        "input_shape must be a sequence of ints",
        id="input_shape-int",
    ),
    pytest.param(
        lambda: count_macs(_LAYER, "3"),
        TypeError,
        "input_shape must be a sequence of ints",
        id="input_shape-str",
    ),
    pytest.param(
        lambda: count_macs(_LAYER, ()),
        ValueError,
        "input_shape must have at least one axis",
        id="input_shape-empty",
    ),
    pytest.param(
        lambda: macs_by_layer(_LAYER, (2, 0)),
        ValueError,
        r"input_shape\[1\] must be positive, got 0",
        id="input_shape-zero",
    ),
    pytest.param(
        lambda: count_macs(_LAYER, (3.0,)),
        TypeError,
        r"input_shape\[0\] must be an int",
        id="input_shape-float",
    ),
    # images
    *_bad_images("LeNet5", LeNet5, (2, 1, 32, 32)),
    *_bad_images(
        "Inception", lambda: InceptionBlock(4, 1, 1, 1, 1, 1, 1), (2, 4, 5, 5)
    ),
    *_bad_images("BasicBlock", lambda: BasicBlock(4, 4), (2, 4, 5, 5)),
    *_bad_images("ConvBN", lambda: ConvBN(4, 2, 3), (2, 4, 5, 5)),
    *_bad_images("Bottleneck", lambda: Bottleneck(4, 8), (2, 4, 5, 5)),
    *_bad_images(
        "ResNet", lambda: ResNet(BasicBlock, (1,), (4,), 3, 2, 4), (2, 2, 9, 9)
    ),
    *_bad_images("VGG", lambda: VGG((4, "M"), 3, 2), (2, 2, 8, 8)),
    pytest.param(
        lambda: LeNet5()(torch.zeros(1, 1, 28, 28)),
        ValueError,
        r"LeNet5 needs 32x32 images, got shape",
        id="LeNet5-x-size",
    ),
    pytest.param(
        _meta(lambda: AlexNet()(torch.zeros(1, 3, 32, 32))),
        ValueError,
        "AlexNet needs images of at least 67x67",
        id="AlexNet-x-size",
    ),
    pytest.param(
        _meta(lambda: vgg("vgg11")(torch.zeros(1, 3, 16, 64))),
        ValueError,
        "this VGG needs images of at least 32x32",
        id="VGG-x-size",
    ),
    # constructors
    pytest.param(
        lambda: LeNet5(0),
        ValueError,
        "num_classes must be positive, got 0",
        id="LeNet5-num_classes",
    ),
    pytest.param(
        lambda: AlexNet(groups=3),
        ValueError,
        "groups must be 1 or 2",
        id="AlexNet-groups-3",
    ),
    pytest.param(
        lambda: AlexNet(groups=2.0),
        TypeError,
        "groups must be an int",
        id="AlexNet-groups-float",
    ),
    pytest.param(
        lambda: vgg("vgg17"), ValueError, "name must be one of", id="vgg-name"
    ),
    pytest.param(
        lambda: VGG(()),
        ValueError,
        "config must be a non-empty sequence",
        id="VGG-config-empty",
    ),
    pytest.param(
        lambda: VGG("64M"),
        ValueError,
        "config must be a non-empty sequence",
        id="VGG-config-str",
    ),
    pytest.param(
        lambda: VGG((64, "X")),
        TypeError,
        r"config\[1\] must be an int",
        id="VGG-config-item",
    ),
    pytest.param(
        lambda: VGG(("M",)),
        ValueError,
        "config must contain at least one convolution",
        id="VGG-config-no-conv",
    ),
    pytest.param(
        lambda: InceptionBlock(8, 4, 0, 4, 2, 2, 2),
        ValueError,
        "c3_reduce must be positive, got 0",
        id="Inception-c3_reduce",
    ),
    pytest.param(
        lambda: InceptionBlock(8, 4, 2, 4, 2, 2, 2.5),
        TypeError,
        "pool_proj must be an int",
        id="Inception-pool_proj",
    ),
    pytest.param(
        lambda: BasicBlock(4, 4, stride=0),
        ValueError,
        "stride must be positive, got 0",
        id="BasicBlock-stride",
    ),
    pytest.param(
        lambda: BasicBlock(4, 4, plain=1),
        TypeError,
        "plain must be a bool, got int",
        id="BasicBlock-plain",
    ),
    pytest.param(
        lambda: Bottleneck(8, 6),
        ValueError,
        "out_channels must be divisible by 4",
        id="Bottleneck-out_channels",
    ),
    pytest.param(
        lambda: ConvBN(3, 4, 0),
        ValueError,
        "kernel_size must be positive",
        id="ConvBN-kernel_size",
    ),
    pytest.param(
        lambda: ResidualBlock("F", 4, 4),
        TypeError,
        "residual must be a torch.nn.Module, got str",
        id="ResidualBlock-residual",
    ),
    pytest.param(
        lambda: ResidualBlock(nn.Identity(), 4, 0),
        ValueError,
        "out_channels must be positive",
        id="ResidualBlock-out_channels",
    ),
    pytest.param(
        lambda: ResidualBlock(nn.Identity(), 4, 4, stride=-1),
        ValueError,
        "stride must be positive",
        id="ResidualBlock-stride",
    ),
    # ResNet
    *[
        pytest.param(
            lambda block=block: ResNet(block, (1,), (4,)),
            TypeError,
            "block must be BasicBlock or Bottleneck",
            id=f"ResNet-block-{i}",
        )
        for i, block in enumerate((nn.Conv2d, ResidualBlock, "basic"))
    ],
    pytest.param(
        lambda: ResNet(BasicBlock, (1, 1), (4,)),
        ValueError,
        "same length, got 2 and 1",
        id="ResNet-depths-widths",
    ),
    pytest.param(
        lambda: ResNet(BasicBlock, (), ()),
        ValueError,
        "depths and widths must be non-empty",
        id="ResNet-depths-empty",
    ),
    pytest.param(
        lambda: ResNet(BasicBlock, (1, 0), (4, 8)),
        ValueError,
        r"depths\[1\] must be positive, got 0",
        id="ResNet-depths-zero",
    ),
    pytest.param(
        lambda: ResNet(BasicBlock, (1,), (-4,)),
        ValueError,
        r"widths\[0\] must be positive",
        id="ResNet-widths",
    ),
    pytest.param(
        lambda: ResNet(BasicBlock, (1,), (4,), stem_width=0),
        ValueError,
        "stem_width must be positive",
        id="ResNet-stem_width",
    ),
    pytest.param(
        lambda: ResNet(Bottleneck, (1,), (6,)),
        ValueError,
        "out_channels must be divisible by 4",
        id="ResNet-bottleneck-width",
    ),
    # weights and gradients
    pytest.param(
        lambda: from_hf_state_dict([("a", torch.zeros(1))]),
        TypeError,
        "state_dict must be a mapping, got list",
        id="state_dict-list",
    ),
    pytest.param(
        lambda: conv_gradient_norms(_SMALL, _X, _Y.int()),
        TypeError,
        "y must have dtype torch.int64",
        id="gradient_norms-y-dtype",
    ),
    pytest.param(
        lambda: conv_gradient_norms(_SMALL, _X.long(), _Y),
        TypeError,
        "x must be a floating-point tensor",
        id="gradient_norms-x-dtype",
    ),
    pytest.param(
        lambda: conv_gradient_norms(_SMALL, _X, _Y[:3]),
        ValueError,
        "x and y must be .*same length, got 4 and 3",
        id="gradient_norms-length",
    ),
    pytest.param(
        lambda: conv_gradient_norms(nn.Flatten(), _X, _Y),
        ValueError,
        "model has no nn.Conv2d layer",
        id="gradient_norms-model-no-conv",
    ),
    pytest.param(
        lambda: conv_gradient_norms(None, _X, _Y),
        TypeError,
        "model must be a torch.nn.Module",
        id="gradient_norms-model",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_alexnet_accepts_67_pixels_the_smallest_size_its_pools_allow():
    with torch.device("meta"):
        assert AlexNet()(torch.empty(1, 3, 67, 67)).shape == (1, 1000)
        with pytest.raises(RuntimeError):
            AlexNet().features(torch.empty(1, 3, 66, 66))
