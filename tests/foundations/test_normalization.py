"""Tests for ``dlabc.foundations.normalization``.

Every layer must agree with its ``torch.nn`` twin, forward and backward, in float64:
the same random affine parameters (and, for BatchNorm, running statistics) are copied
into both, a random upstream gradient is backpropagated, and the outputs, the input
gradient and the parameter gradients are compared, in training and evaluation mode,
for 2-D to 5-D inputs. BatchNorm's running estimates are followed over several training
steps for several momenta. The hand-written backward passes of ``standardize`` and
``rms_scale`` are checked with ``torch.autograd.gradcheck`` over many axis choices, and
their forward passes against the closed forms. float32 must agree at float32 tolerances
on an input with a large mean offset. The axis cube is drawn for each kind and its
shading is compared with which values really share statistics. Bad input must fail
early, with a clear message.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlabc.foundations.normalization import (
    BatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
    rms_scale,
    standardize,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)  # the same float64 arithmetic, up to rounding
F32 = dict(rtol=1e-4, atol=1e-5)  # float32, summed in a different order

# --------------------------------------------------------------------- helpers


def rand(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial weight, bias and running statistics (the defaults are 1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if name.endswith("weight"):
                t.copy_(1 + 0.5 * noise)
            elif name.endswith("bias") or name.endswith("running_mean"):
                t.copy_(noise)
            elif name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
    return module


def twins(ours: nn.Module, ref: nn.Module, dtype=torch.float64, seed: int = 1):
    """Random state in ``ours``, copied into torch's ``ref``; both in ``dtype``."""
    ours, ref = ours.to(dtype), ref.to(dtype)
    randomize(ours, seed)
    result = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"num_batches_tracked"}
    return ours, ref


def run(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    """Output, input gradient and parameter gradients for ``sum(upstream * module(x))``."""
    module.zero_grad()
    x = x.clone().requires_grad_()
    y = module(x)
    (y * upstream).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return y.detach(), x.grad, grads


def assert_same(ours, ref, x, tol=TIGHT, seed: int = 7):
    """Forward and backward of ``ours`` and ``ref`` on ``x`` agree."""
    upstream = rand(*x.shape, seed=seed, dtype=x.dtype)
    y, gx, gp = run(ours, x, upstream)
    y_ref, gx_ref, gp_ref = run(ref, x, upstream)
    torch.testing.assert_close(y, y_ref, **tol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(gx, gx_ref, **tol, msg=lambda m: f"grad x: {m}")
    assert gp.keys() == gp_ref.keys()
    for name in gp:
        torch.testing.assert_close(
            gp[name], gp_ref[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}"
        )
    return y


# --------------------------------------------------------------------- BatchNorm

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
BN_SHAPES = [(8, 3), (6, 3, 5), (4, 3, 5, 4), (2, 3, 2, 3, 2)]


@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize(
    "affine, momentum",
    [(True, 0.1), (True, 0.0), (True, 1.0), (True, 0.37), (False, 0.1), (False, 0.6)],
)
def test_batchnorm_matches_torch_in_training_and_evaluation(shape, affine, momentum):
    c = shape[1]
    ours, ref = twins(
        BatchNorm(c, momentum=momentum, affine=affine),
        TORCH_BN[len(shape)](c, momentum=momentum, affine=affine),
    )
    start = ours.running_mean.clone(), ours.running_var.clone()
    for step in range(4):  # a new batch every step; the running estimates follow
        ours.train(), ref.train()
        x = 3 * rand(*shape, seed=step) + 2
        y = assert_same(ours, ref, x, seed=10 + step)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **TIGHT)
        torch.testing.assert_close(ours.running_var, ref.running_var, **TIGHT)
        # batch statistics: each channel of the output has mean beta and biased
        # variance gamma^2 var / (var + eps)
        dims = (0, *range(2, len(shape)))
        beta = ours.bias.detach() if affine else torch.zeros(c, dtype=x.dtype)
        gamma = ours.weight.detach() if affine else torch.ones(c, dtype=x.dtype)
        var = x.var(dims, unbiased=False)
        torch.testing.assert_close(y.mean(dims), beta, **TIGHT)
        torch.testing.assert_close(
            y.var(dims, unbiased=False), gamma**2 * var / (var + ours.eps), **TIGHT
        )
    if momentum == 0:
        assert torch.equal(ours.running_mean, start[0])
        assert torch.equal(ours.running_var, start[1])
    else:
        assert not torch.allclose(ours.running_mean, start[0])
    if momentum == 1:  # the estimates are the last batch's statistics (unbiased var)
        dims = (0, *range(2, len(shape)))
        torch.testing.assert_close(ours.running_mean, x.mean(dims), **TIGHT)
        torch.testing.assert_close(ours.running_var, x.var(dims), **TIGHT)
    ours.eval(), ref.eval()
    x = rand(*shape, seed=20)
    before = ours.running_mean.clone(), ours.running_var.clone()
    assert_same(ours, ref, x)
    assert torch.equal(ours.running_mean, before[0])  # evaluation leaves them alone
    assert torch.equal(ours.running_var, before[1])


def test_batchnorm_evaluation_uses_the_running_statistics_closed_form():
    bn = randomize(BatchNorm(3).double()).eval()
    x = rand(5, 3, 4)
    shape = (1, 3, 1)
    expected = (x - bn.running_mean.view(shape)) / torch.sqrt(
        bn.running_var.view(shape) + bn.eps
    ) * bn.weight.detach().view(shape) + bn.bias.detach().view(shape)
    torch.testing.assert_close(bn(x), expected, **TIGHT)


def test_batchnorm_output_depends_on_the_batch_in_training_only():
    bn = randomize(BatchNorm(4).double())
    x = rand(8, 4, 3)
    bn.train()
    alone, together = bn(x[:3]), bn(x)[:3]
    assert not torch.allclose(alone, together, rtol=1e-3, atol=1e-3)
    bn.eval()
    torch.testing.assert_close(bn(x[:3]), bn(x)[:3], **TIGHT)
    torch.testing.assert_close(bn(x[:1]), bn(x)[:1], **TIGHT)


def test_batchnorm_state_is_weight_bias_and_running_statistics():
    bn = BatchNorm(3)
    assert {n for n, _ in bn.named_parameters()} == {"weight", "bias"}
    assert {n for n, _ in bn.named_buffers()} == {"running_mean", "running_var"}
    assert list(BatchNorm(3, affine=False).parameters()) == []
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_batchnorm_needs_more_than_one_value_per_channel_in_training(shape):
    bn = BatchNorm(3).double()
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(rand(*shape))
    with pytest.raises(ValueError):  # torch agrees
        TORCH_BN[len(shape)](3).double()(rand(*shape))
    # evaluation needs no batch statistics: one example is fine
    ours, ref = twins(BatchNorm(3), TORCH_BN[len(shape)](3))
    ours.eval(), ref.eval()
    assert_same(ours, ref, rand(*shape))


# --------------------------------------------------------------------- LayerNorm

LN_CASES = [
    ((5, 6), 6),
    ((5, 6), (6,)),
    ((5, 6), (5, 6)),
    ((4, 3, 5), [3, 5]),
    ((2, 3, 4, 5), 5),
    ((2, 3, 4, 5), (4, 5)),
    ((2, 3, 4, 5), (3, 4, 5)),
]


@pytest.mark.parametrize("shape, normalized", LN_CASES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_layernorm_matches_torch(shape, normalized, affine, eps):
    ours, ref = twins(
        LayerNorm(normalized, eps=eps, elementwise_affine=affine),
        nn.LayerNorm(normalized, eps=eps, elementwise_affine=affine),
    )
    x = 2 * rand(*shape) - 1
    for mode in (True, False):  # no running statistics: the same in both modes
        ours.train(mode), ref.train(mode)
        assert_same(ours, ref, x)
    k = 1 if isinstance(normalized, int) else len(normalized)
    assert ours.normalized_shape == tuple(shape[-k:])
    if affine:
        assert ours.weight.shape == ours.bias.shape == tuple(shape[-k:])


# --------------------------------------------------------------------- InstanceNorm


@pytest.mark.parametrize(
    "shape, torch_cls",
    [((4, 3, 6), nn.InstanceNorm1d), ((2, 3, 4, 5), nn.InstanceNorm2d)],
    ids=["3d", "4d"],
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_instancenorm_matches_torch_in_both_modes(shape, torch_cls, affine):
    ours, ref = twins(InstanceNorm(3, affine=affine), torch_cls(3, affine=affine))
    x = 2 * rand(*shape) + 1
    ours.train(), ref.train()
    y_train = assert_same(ours, ref, x)
    ours.eval(), ref.eval()
    y_eval = assert_same(ours, ref, x)
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
    assert len(list(ours.parameters())) == (2 if affine else 0)
    assert list(ours.buffers()) == []


def test_instancenorm_output_of_one_example_ignores_the_others():
    norm = InstanceNorm(3)
    x = rand(4, 3, 5)
    torch.testing.assert_close(norm(x[:1]), norm(x)[:1], **TIGHT)


# --------------------------------------------------------------------- GroupNorm


@pytest.mark.parametrize("shape", [(6, 8), (3, 8, 5), (2, 8, 3, 4)], ids=str)
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_groupnorm_matches_torch(shape, groups, affine):
    ours, ref = twins(
        GroupNorm(groups, 8, affine=affine), nn.GroupNorm(groups, 8, affine=affine)
    )
    x = 3 * rand(*shape) - 2
    for mode in (True, False):
        ours.train(mode), ref.train(mode)
        assert_same(ours, ref, x)


def test_groupnorm_with_one_group_is_layernorm_over_channels_and_space():
    x = rand(3, 4, 5, 2)
    group = GroupNorm(1, 4, affine=False)
    assert_same(group, LayerNorm((4, 5, 2), elementwise_affine=False), x)
    assert_same(group, nn.LayerNorm((4, 5, 2), elementwise_affine=False), x)


def test_groupnorm_with_one_channel_per_group_is_instancenorm():
    x = rand(3, 4, 5, 2)
    group = GroupNorm(4, 4, affine=False)
    assert_same(group, InstanceNorm(4), x)
    assert_same(group, nn.InstanceNorm2d(4), x)
    # with affine parameters: the same per-channel scale and shift
    group, inst = randomize(GroupNorm(4, 4).double()), InstanceNorm(4, affine=True)
    inst.double().load_state_dict(group.state_dict())
    assert_same(group, inst, x)


# --------------------------------------------------------------------- RMSNorm

RMS_CASES = [
    ((5, 6), 6),
    ((2, 3, 6), 6),
    ((2, 3, 6), (3, 6)),
    ((2, 3, 4, 5), 5),
    ((2, 3, 4, 5), (4, 5)),
]


@pytest.mark.parametrize("shape, normalized", RMS_CASES, ids=str)
@pytest.mark.parametrize("eps", [None, 1e-3, 0.5])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_rmsnorm_matches_torch(shape, normalized, eps, affine):
    ours, ref = twins(
        RMSNorm(normalized, eps=eps, elementwise_affine=affine),
        nn.RMSNorm(normalized, eps=eps, elementwise_affine=affine),
    )
    x = rand(*shape) + 0.5  # a mean: RMSNorm must not remove it
    for mode in (True, False):
        ours.train(mode), ref.train(mode)
        assert_same(ours, ref, x)
    assert not hasattr(ours, "bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_default_eps_is_the_machine_epsilon_of_the_input(dtype):
    eps = torch.finfo(dtype).eps
    x = rand(4, 6, dtype=dtype) * eps**0.5  # mean(x^2) ~ eps: eps matters
    default = RMSNorm(6, elementwise_affine=False)
    explicit = RMSNorm(6, eps=eps, elementwise_affine=False)
    other = RMSNorm(6, eps=1e-6, elementwise_affine=False)
    torch.testing.assert_close(default(x), explicit(x), rtol=0, atol=0)
    assert not torch.allclose(default(x), other(x))
    torch.testing.assert_close(default(x), nn.RMSNorm(6, elementwise_affine=False)(x))


# --------------------------------------------------------------------- the two functions

DIMS = [(0,), (1,), (2,), (-1,), (0, 2), (-1, -3), (2, 0), (1, 2), (0, 1, 2), [-2]]


def shaped(contiguous: bool) -> torch.Tensor:
    """A (3, 4, 5) float64 tensor, contiguous or a transposed view."""
    x = rand(3, 4, 5) if contiguous else rand(5, 4, 3).transpose(0, 2)
    assert x.is_contiguous() == contiguous
    return x


@pytest.mark.parametrize("fn", [standardize, rms_scale])
@pytest.mark.parametrize("dims", DIMS, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "transposed"])
def test_hand_written_backward_passes_gradcheck(fn, dims, contiguous):
    x = (2 * shaped(contiguous) + 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, dims, eps=1e-3), (x,))


@pytest.mark.parametrize("dims", DIMS, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "transposed"])
def test_standardize_forward_closed_form(dims, contiguous):
    x = 3 * shaped(contiguous) + 5
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    # eps = 0: exactly mean 0 and biased variance 1
    y = standardize(x, dims, eps=0)
    assert y.shape == x.shape
    torch.testing.assert_close(y.mean(dims), torch.zeros_like(y.mean(dims)), **TIGHT)
    var_y = y.var(dims, unbiased=False)
    torch.testing.assert_close(var_y, torch.ones_like(var_y), **TIGHT)
    # eps > 0 shrinks the variance to var / (var + eps)
    eps = 0.5
    y = standardize(x, dims, eps=eps)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + eps), **TIGHT)
    var_y = y.var(dims, unbiased=False, keepdim=True)
    torch.testing.assert_close(var_y, var / (var + eps), **TIGHT)


@pytest.mark.parametrize("dims", DIMS, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "transposed"])
def test_rms_scale_forward_closed_form(dims, contiguous):
    x = 3 * shaped(contiguous) + 5
    ms = x.pow(2).mean(dims, keepdim=True)
    y = rms_scale(x, dims, eps=0)
    ms_y = y.pow(2).mean(dims)
    torch.testing.assert_close(ms_y, torch.ones_like(ms_y), **TIGHT)  # rms 1
    # no centering: the sign pattern and the ratios within a group survive
    assert torch.equal(torch.sign(y), torch.sign(x))
    eps = 0.5
    y = rms_scale(x, dims, eps=eps)
    torch.testing.assert_close(y, x / torch.sqrt(ms + eps), **TIGHT)
    torch.testing.assert_close(
        y.pow(2).mean(dims, keepdim=True), ms / (ms + eps), **TIGHT
    )


def test_standardize_default_eps_and_rms_scale_default_eps():
    x = rand(4, 7)
    var = x.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(
        standardize(x, (1,)), (x - x.mean(1, keepdim=True)) / torch.sqrt(var + 1e-5)
    )
    ms = x.pow(2).mean(1, keepdim=True)
    torch.testing.assert_close(rms_scale(x, (1,)), x / torch.sqrt(ms + 1e-6))


@pytest.mark.parametrize("fn", [standardize, rms_scale])
def test_second_derivatives_are_correct_or_refused(fn):
    """The hand-written backward is not differentiable by hand: ``create_graph=True``
    must either give the true second derivative or fail loudly (``@once_differentiable``),
    never return a wrong number silently."""

    def reference(t):  # the same function from differentiable torch operations
        if fn is standardize:
            var = t.var(1, unbiased=False, keepdim=True)
            return (t - t.mean(1, keepdim=True)) / torch.sqrt(var + 1e-3)
        return t / torch.sqrt(t.pow(2).mean(1, keepdim=True) + 1e-3)

    def second(f):
        x = rand(3, 5).requires_grad_()
        (g,) = torch.autograd.grad(f(x).pow(3).sum(), x, create_graph=True)
        g.pow(2).sum().backward()  # (autograd.grad would stop short of the error)
        return x.grad

    try:
        got = second(lambda t: fn(t, (1,), eps=1e-3))
    except RuntimeError as err:  # refused loudly: acceptable
        assert "differentiate twice" in str(err) or "once_differentiable" in str(err)
    else:
        torch.testing.assert_close(got, second(reference), rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------- float32


def f32_cases():
    return {
        "batch-train": (BatchNorm(8), nn.BatchNorm2d(8), True),
        "batch-eval": (BatchNorm(8), nn.BatchNorm2d(8), False),
        "layer": (LayerNorm((8, 8, 8)), nn.LayerNorm((8, 8, 8)), True),
        "instance": (
            InstanceNorm(8, affine=True),
            nn.InstanceNorm2d(8, affine=True),
            True,
        ),
        "group": (GroupNorm(4, 8), nn.GroupNorm(4, 8), True),
        "rms": (RMSNorm((8, 8)), nn.RMSNorm((8, 8)), True),
    }


@pytest.mark.parametrize("kind", list(f32_cases()))
def test_float32_agrees_with_torch_on_a_large_offset(kind):
    ours, ref, training = f32_cases()[kind]
    ours, ref = twins(ours, ref, dtype=torch.float32)
    ours.train(training), ref.train(training)
    if not training:  # running statistics that fit the offset input
        with torch.no_grad():
            for m in (ours, ref):
                m.running_mean.add_(100)
                m.running_var.mul_(100)
    x = rand(16, 8, 8, 8, dtype=torch.float32) * 10 + 100
    y = assert_same(ours, ref, x, tol=F32)
    assert y.dtype == torch.float32
    if training and kind == "batch-train":
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **F32)
        torch.testing.assert_close(ours.running_var, ref.running_var, **F32)


# --------------------------------------------------------------------- bad input: one table

LAYERS = {
    "batch": lambda: BatchNorm(3),
    "layer": lambda: LayerNorm(3),
    "instance": lambda: InstanceNorm(3),
    "group": lambda: GroupNorm(1, 3),
    "rms": lambda: RMSNorm(3),
}
EPS_LAYERS = {
    "batch": lambda eps: BatchNorm(3, eps=eps),
    "layer": lambda eps: LayerNorm(3, eps=eps),
    "instance": lambda eps: InstanceNorm(3, eps=eps),
    "group": lambda eps: GroupNorm(1, 3, eps=eps),
    "rms": lambda eps: RMSNorm(3, eps=eps),
}
CHANNEL_LAYERS = {
    "batch": BatchNorm,
    "instance": InstanceNorm,
    "group": lambda n: GroupNorm(1, n),
}


def _p(call, error, match, id):
    return pytest.param(call, error, match, id=id)


_x = torch.randn(2, 3)
BAD_INPUT = [
    *[
        _p(
            lambda k=k: LAYERS[k]()([[[1.0, 2.0, 3.0]] * 3] * 2),
            TypeError,
            "x must be a torch.Tensor, got list",
            f"{k}-x-list",
        )
        for k in LAYERS
    ],
    *[
        _p(
            lambda k=k: LAYERS[k]()(torch.ones(2, 3, 3, dtype=torch.int64)),
            TypeError,
            "x must be a floating-point tensor",
            f"{k}-x-int",
        )
        for k in LAYERS
    ],
    *[
        row
        for fn in (standardize, rms_scale)
        for row in [
            _p(
                lambda fn=fn: fn(_x.tolist(), (1,)),
                TypeError,
                "x must be a torch.Tensor",
                f"{fn.__name__}-x-list",
            ),
            _p(
                lambda fn=fn: fn(torch.ones(2, 3, dtype=torch.int32), (1,)),
                TypeError,
                "x must be a floating-point tensor",
                f"{fn.__name__}-x-int",
            ),
            _p(
                lambda fn=fn: fn(_x, (1,), eps=-1e-5),
                ValueError,
                "eps must be in",
                f"{fn.__name__}-eps",
            ),
            _p(
                lambda fn=fn: fn(_x, ()),
                ValueError,
                "dims must name at least one axis",
                f"{fn.__name__}-dims-empty",
            ),
            _p(
                lambda fn=fn: fn(torch.tensor(1.0), (0,)),
                ValueError,
                "dims .* 0-D input",
                f"{fn.__name__}-x-0d",
            ),
            *[
                _p(
                    lambda fn=fn, d=d: fn(_x, d),
                    ValueError,
                    "dims .* not distinct axes of a 2-D input",
                    f"{fn.__name__}-dims-{d}",
                )
                for d in [(1, 1), (1, -1), (0, -2), (2,), (-3,), (0, 5)]
            ],
        ]
    ],
    *[
        _p(
            lambda k=k: LAYERS[k]()(torch.randn(2, 4, 5)),
            ValueError,
            r"x must have 3 channels on axis 1, got shape \(2, 4, 5\)",
            f"{k}-x-channels",
        )
        for k in CHANNEL_LAYERS
    ],
    *[
        _p(
            lambda s=s: BatchNorm(3).double()(torch.randn(*s, dtype=torch.float64)),
            ValueError,
            "more than one value per channel",
            f"batch-x-{s}",
        )
        for s in [(1, 3), (1, 3, 1), (1, 3, 1, 1)]
    ],
    _p(
        lambda: BatchNorm(3)(torch.randn(3)),
        ValueError,
        r"x must have 2 or 3 or 4 or 5 dimensions, got shape \(3,\)",
        "batch-x-1d",
    ),
    _p(
        lambda: InstanceNorm(3)(torch.randn(2, 3)),
        ValueError,
        r"x must have 3 or 4 or 5 dimensions, got shape \(2, 3\)",
        "instance-x-2d",
    ),
    _p(
        lambda: GroupNorm(1, 3)(torch.randn(3)),
        ValueError,
        "x must have 2 or 3 or 4 or 5 dimensions",
        "group-x-1d",
    ),
    _p(
        lambda: BatchNorm(3)(torch.randn(2, 3, 2, 2, 2, 2)),
        ValueError,
        "x must have .* dimensions",
        "batch-x-6d",
    ),
    *[
        row
        for cls in (LayerNorm, RMSNorm)
        for row in [
            _p(
                lambda cls=cls: cls(4)(torch.randn(2, 5)),
                ValueError,
                r"x must end with the axes \(4,\), got shape \(2, 5\)",
                f"{cls.__name__}-x-last",
            ),
            _p(
                lambda cls=cls: cls((3, 4))(torch.randn(2, 4, 3)),
                ValueError,
                r"x must end with the axes \(3, 4\), got shape \(2, 4, 3\)",
                f"{cls.__name__}-x-last-two",
            ),
            _p(
                lambda cls=cls: cls((2, 3, 4))(torch.randn(3, 4)),
                ValueError,
                r"x must end with the axes \(2, 3, 4\), got shape \(3, 4\)",
                f"{cls.__name__}-x-too-few-axes",
            ),
            _p(
                lambda cls=cls: cls(1)(torch.tensor(1.0)),
                ValueError,
                "x must end with the axes",
                f"{cls.__name__}-x-0d",
            ),
            _p(
                lambda cls=cls: cls(0),
                ValueError,
                r"normalized_shape\[0\] must be positive, got 0",
                f"{cls.__name__}-normalized_shape-0",
            ),
            _p(
                lambda cls=cls: cls((3, -1)),
                ValueError,
                r"normalized_shape\[1\] must be positive",
                f"{cls.__name__}-normalized_shape-negative",
            ),
            _p(
                lambda cls=cls: cls((2.0,)),
                TypeError,
                r"normalized_shape\[0\] must be an int",
                f"{cls.__name__}-normalized_shape-float",
            ),
        ]
    ],
    *[
        row
        for k, make in CHANNEL_LAYERS.items()
        for row in [
            _p(
                lambda make=make: make(0),
                ValueError,
                "num_features must be positive, got 0",
                f"{k}-num_features-0",
            ),
            _p(
                lambda make=make: make(-2),
                ValueError,
                "num_features must be positive, got -2",
                f"{k}-num_features-negative",
            ),
            *[
                _p(
                    lambda make=make, bad=bad: make(bad),
                    TypeError,
                    "num_features must be an int",
                    f"{k}-num_features-{bad!r}",
                )
                for bad in (3.0, "3", True)
            ],
        ]
    ],
    _p(
        lambda: GroupNorm(4, 6),
        ValueError,
        r"num_channels \(6\) must be divisible by num_groups \(4\)",
        "group-num_groups-divisor",
    ),
    _p(
        lambda: GroupNorm(0, 6),
        ValueError,
        "num_groups must be positive",
        "group-num_groups-0",
    ),
    _p(
        lambda: GroupNorm(2, 0),
        ValueError,
        "num_features must be positive",
        "group-num_channels-0",
    ),
    *[
        row
        for k, make in EPS_LAYERS.items()
        for row in [
            _p(
                lambda make=make: make(-1e-5),
                ValueError,
                r"eps must be in \[0, inf\), got -1e-05",
                f"{k}-eps-negative",
            ),
            _p(
                lambda make=make: make(float("nan")),
                ValueError,
                "eps must be finite",
                f"{k}-eps-nan",
            ),
            _p(
                lambda make=make: make("1e-5"),
                TypeError,
                "eps must be a number",
                f"{k}-eps-str",
            ),
        ]
    ],
    _p(
        lambda: BatchNorm(3, momentum=-0.1),
        ValueError,
        r"momentum must be in \[0, 1\]",
        "batch-momentum-negative",
    ),
    _p(
        lambda: BatchNorm(3, momentum=1.5),
        ValueError,
        r"momentum must be in \[0, 1\]",
        "batch-momentum-1.5",
    ),
    _p(
        lambda: BatchNorm(3, momentum=None),
        TypeError,
        "momentum must be a number",
        "batch-momentum-none",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kind", list(EPS_LAYERS))
def test_an_eps_of_zero_is_allowed_as_in_torch(kind):
    EPS_LAYERS[kind](0)
