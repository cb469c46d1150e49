"""Tests for ``dlabc.vision.pointnet``.

The shared MLP is compared with PyTorch's own ``nn.Conv1d`` (kernel size 1) and
``nn.BatchNorm1d`` on the ``(B, C, N)`` layout of the paper's implementation; the
surface sampler with ``trimesh.sample.sample_surface`` (two-sample Kolmogorov-Smirnov
tests) and with a cone's closed forms (the base's share of the area, the law of the
height on the side; ``scipy.stats``); the
rotations with their defining properties and the Haar measure's moments; the
regulariser with its formula written as sums and with finite differences
(``gradcheck``); permutation invariance, the identity start of the T-Nets, the critical
points and the upper-bound shape with brute force (the network run again on the subset
or on the enlarged cloud). Everything runs in float64 with tiny widths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh
from scipy import stats
from torch import nn

from dlabc.vision.pointnet import (
    SHAPES,
    PointNet,
    SharedMLP,
    TNet,
    critical_points,
    make_point_clouds,
    orthogonality_loss,
    pointnet_loss,
    primitive_mesh,
    random_rotations,
    sample_surface,
    upper_bound_shape,
)

TINY = dict(mlp1=(8, 8), mlp2=(8, 12, 16), head=(10, 6), tnet_mlp=(8, 16), tnet_fc=(8,))


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every BatchNorm's statistics and affine parameters away from their start."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


def _model(seed: int = 0, trained_tnets: bool = True, **kw) -> PointNet:
    torch.manual_seed(seed)
    model = PointNet(len(SHAPES), **{**TINY, **kw}).double()
    if trained_tnets:  # a T-Net away from the identity, as after training
        for tnet in (model.input_tnet, model.feature_tnet):
            if tnet is not None:
                nn.init.normal_(tnet.out.weight, std=0.3)
    return _randomise_norms(model, seed).eval()


# ------------------------------------------------------------------------- the data


def test_primitive_meshes_are_trimesh_primitives():
    for name in SHAPES:
        vertices, faces = primitive_mesh(name)
        assert vertices.dtype == torch.float64 and faces.dtype == torch.int64
        mesh = trimesh.Trimesh(vertices.numpy(), faces.numpy())
        assert mesh.is_watertight, name
        assert 0.5 < np.ptp(vertices.numpy(), axis=0).max() <= 1.2
    with pytest.raises(ValueError, match="name must be one of"):
        primitive_mesh("teapot")


def test_sample_surface_lies_on_the_surface_and_follows_the_areas():
    vertices, faces = primitive_mesh("box")
    points = sample_surface(vertices, faces, 2000, torch.Generator().manual_seed(0))
    assert points.shape == (2000, 3)
    # on a unit box, every point has one coordinate at +-0.5 and none beyond
    assert torch.allclose(points.abs().max(1).values, torch.full((2000,), 0.5).double())
    # a cone (base at z = 0, apex at z = 1): the base gets its share of the area, and
    # on the side the height follows the closed form P(z <= t) = 1 - (1 - t)^2
    vertices, faces = primitive_mesh("cone")
    mesh = trimesh.Trimesh(vertices.numpy(), faces.numpy(), process=False)
    base_area = mesh.area_faces[mesh.face_normals[:, 2] < -0.99].sum()
    n = 20000
    z = sample_surface(vertices, faces, n, torch.Generator().manual_seed(1))[:, 2]
    on_base = int((z.abs() < 1e-12).sum())
    assert stats.binomtest(on_base, n, base_area / mesh.area).pvalue > 1e-3
    side = z[z.abs() >= 1e-12].numpy()
    assert stats.kstest(side, lambda t: 1 - (1 - t) ** 2).pvalue > 1e-3


@pytest.mark.parametrize("name", ["torus", "pyramid"])
def test_sample_surface_matches_trimesh_in_distribution(name):
    # the torus: many small faces of unequal areas (tests the choice of the face); the
    # pyramid: a few large ones (tests the law of the point inside a face)
    vertices, faces = primitive_mesh(name)
    vertices = vertices * torch.tensor([1.0, 0.6, 1.4], dtype=torch.float64)
    mesh = trimesh.Trimesh(vertices.numpy(), faces.numpy(), process=False)
    n = 20000
    ours = sample_surface(vertices, faces, n, torch.Generator().manual_seed(2)).numpy()
    theirs, _ = trimesh.sample.sample_surface(mesh, n, seed=3)
    # every coordinate: the same distribution (Kolmogorov-Smirnov), the same mean
    for axis in range(3):
        assert stats.ks_2samp(ours[:, axis], theirs[:, axis]).pvalue > 1e-3
    se = np.sqrt(ours.var(0) / n + theirs.var(0) / n)
    assert (np.abs(ours.mean(0) - theirs.mean(0)) < 5 * se).all()


def test_sample_surface_rejects_bad_input():
    vertices, faces = primitive_mesh("box")
    with pytest.raises(ValueError, match="3 columns"):
        sample_surface(vertices[:, :2], faces, 10)
    with pytest.raises(TypeError, match="faces must have dtype torch.int64"):
        sample_surface(vertices, faces.int(), 10)
    with pytest.raises(ValueError, match="n must be positive"):
        sample_surface(vertices, faces, 0)


def test_random_rotations_are_uniform_rotations():
    g = torch.Generator().manual_seed(0)
    R = random_rotations(20000, g)
    eye = torch.eye(3, dtype=torch.float64).expand(20000, 3, 3)
    assert torch.allclose(R @ R.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(20000, dtype=torch.float64))
    # Haar measure on SO(3): E[R] = 0 and E[R_ij^2] = 1/3 for every entry
    assert R.mean(0).abs().max() < 0.02
    assert (R.square().mean(0) - 1 / 3).abs().max() < 0.01
    # the closed forms: each column is a uniform unit vector, so each entry is uniform
    # on [-1, 1] (Archimedes); the angle t of the rotation, from trace = 1 + 2 cos t,
    # has the density (1 - cos t) / pi on [0, pi], so P(angle <= t) = (t - sin t) / pi
    for i in range(3):
        for j in range(3):
            assert (
                stats.kstest(R[:, i, j].numpy(), stats.uniform(-1, 2).cdf).pvalue > 1e-3
            )
    trace = torch.diagonal(R, dim1=-2, dim2=-1).sum(-1)
    angle = torch.arccos(((trace - 1) / 2).clamp(-1, 1)).numpy()
    assert stats.kstest(angle, lambda t: (t - np.sin(t)) / np.pi).pvalue > 1e-3
    up = random_rotations(500, g, upright=True)
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(up @ z, z.expand(500, 3))
    assert torch.allclose(torch.linalg.det(up), torch.ones(500, dtype=torch.float64))
    with pytest.raises(ValueError, match="n must be positive"):
        random_rotations(0)


def test_make_point_clouds():
    X, y = make_point_clouds(3, 64, seed=5, jitter=0.0)
    assert (
        X.shape == (18, 64, 3) and X.dtype == torch.float32 and y.dtype == torch.int64
    )
    assert torch.equal(torch.bincount(y), torch.full((len(SHAPES),), 3))
    # centred on the centroid and scaled into the unit ball, before the jitter
    assert X.mean(1).abs().max() < 1e-6
    assert torch.allclose(X.norm(dim=-1).max(1).values, torch.ones(18))
    X2, _ = make_point_clouds(3, 64, seed=5, jitter=0.0)
    assert torch.equal(X, X2)
    Xu, _ = make_point_clouds(3, 64, seed=5, upright=True)
    assert not torch.allclose(Xu, X, atol=0.05)
    with pytest.raises(ValueError, match="stretch must be in"):
        make_point_clouds(3, stretch=1.0)
    with pytest.raises(ValueError, match="seed must be"):
        make_point_clouds(3, seed=-1)
    with pytest.raises(ValueError, match="n_points must be positive"):
        make_point_clouds(3, n_points=0)
    with pytest.raises(ValueError, match="jitter must be in"):
        make_point_clouds(3, jitter=-0.1)


# ------------------------------------------------------------------------ the model


def test_shared_mlp_is_a_1x1_convolution():
    torch.manual_seed(0)
    ours = _randomise_norms(SharedMLP((3, 5, 7)).double())
    reference = nn.Sequential(
        nn.Conv1d(3, 5, 1, bias=False),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Conv1d(5, 7, 1, bias=False),
        nn.BatchNorm1d(7),
        nn.ReLU(),
    ).double()
    for p, q in zip(
        ours.state_dict().values(), reference.state_dict().values(), strict=True
    ):
        q.copy_(p.reshape(q.shape))
    x = torch.randn(4, 50, 3, dtype=torch.float64)
    for train in (False, True):  # running statistics, then the batch's
        ours.train(train), reference.train(train)
        expected = reference(x.transpose(1, 2)).transpose(1, 2)  # (B, N, C)
        assert torch.allclose(ours(x), expected, atol=1e-12)
    with pytest.raises(ValueError, match="at least two widths"):
        SharedMLP((3,))


def test_paper_sizes_have_the_published_parameter_counts():
    # Qi et al. (2017), Table 6: PointNet 3.5M parameters, the vanilla version 0.8M
    full = PointNet(40)
    vanilla = PointNet(40, input_transform=False, feature_transform=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 3.4e6 < count(full) < 3.6e6
    assert 0.75e6 < count(vanilla) < 0.85e6
    assert full.feature_tnet.k == 64 and full.input_tnet.k == 3


def test_output_is_invariant_to_the_order_of_the_points():
    model = _model()
    x = torch.randn(3, 40, 3, dtype=torch.float64)
    perm = torch.randperm(40)
    assert torch.allclose(model(x[:, perm]), model(x), atol=1e-12, rtol=0)
    g, _, _ = model.encode(x)
    assert torch.allclose(model.encode(x[:, perm])[0], g, atol=1e-12, rtol=0)
    # in training mode too: BatchNorm's batch statistics are sums over the points
    model.train()
    torch.manual_seed(1)
    a = model(x[:, perm])
    torch.manual_seed(1)
    b = model(x)
    assert torch.allclose(a, b, atol=1e-10)


def test_the_global_feature_is_the_max_of_the_point_features():
    model = _model(trained_tnets=False, input_transform=False, feature_transform=False)
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    h = model.mlp2(model.mlp1(x))  # (B, N, C)
    brute = torch.stack(
        [torch.stack([h[b, :, c].max() for c in range(16)]) for b in (0, 1)]
    )
    assert torch.equal(model.encode(x)[0], brute)


def test_tnets_start_as_the_identity():
    torch.manual_seed(0)
    tnet = TNet(5, (8, 16), (8,)).double().eval()
    A, winners = tnet(torch.randn(2, 20, 5, dtype=torch.float64))
    assert torch.equal(A, torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    assert winners.shape == (2, 16)
    # so a fresh PointNet equals the same network without T-Nets
    full = _model(trained_tnets=False)
    plain = PointNet(
        len(SHAPES), **TINY, input_transform=False, feature_transform=False
    )
    plain = plain.double().eval()
    plain.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(3, 25, 3, dtype=torch.float64)
    assert torch.allclose(full(x), plain(x), atol=1e-13, rtol=0)


def test_orthogonality_loss_against_its_formula():
    A = torch.randn(4, 5, 5, dtype=torch.float64, requires_grad=True)
    a = A.tolist()  # plain Python numbers: the formula written as sums
    brute = (
        sum(
            sum(
                (float(i == j) - sum(a[b][i][k] * a[b][j][k] for k in range(5))) ** 2
                for i in range(5)
                for j in range(5)
            )
            for b in range(4)
        )
        / 4
    )
    assert abs(orthogonality_loss(A).item() - brute) < 1e-12
    assert torch.autograd.gradcheck(orthogonality_loss, (A,))
    R = random_rotations(4, torch.Generator().manual_seed(0))
    assert orthogonality_loss(R) < 1e-28
    with pytest.raises(ValueError, match="square"):
        orthogonality_loss(torch.randn(2, 3, 4))


def test_pointnet_loss_is_cross_entropy_plus_the_regulariser():
    model = _model()
    x = torch.randn(4, 20, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 5])
    _, transforms, _ = model.encode(x)
    A = transforms[-1]
    eye = torch.eye(8, dtype=torch.float64)
    reg = torch.stack([torch.linalg.matrix_norm(eye - a @ a.T) ** 2 for a in A]).mean()
    expected = F.cross_entropy(model(x), y) + 0.01 * reg
    assert torch.allclose(pointnet_loss(model, x, y, reg_weight=0.01), expected)
    # without a feature T-Net there is nothing to regularise: plain cross-entropy
    plain = _model(feature_transform=False)
    assert torch.allclose(pointnet_loss(plain, x, y), F.cross_entropy(plain(x), y))


def test_pointnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="x must have shape"):
        _model()(torch.randn(2, 10, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        _model()(torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dropout must be in"):
        PointNet(3, dropout=1.0)
    with pytest.raises(TypeError, match="input_transform must be a bool"):
        PointNet(3, input_transform=1)
    with pytest.raises(ValueError, match="n_classes must be positive"):
        PointNet(0)
    with pytest.raises(ValueError, match="mlp1 must list at least one width"):
        PointNet(3, mlp1=())
    with pytest.raises(ValueError, match="k must be positive"):
        TNet(0)
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="y must have dtype torch.int64"):
        pointnet_loss(_model(), x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="reg_weight must be in"):
        pointnet_loss(_model(), x, torch.tensor([0, 1]), reg_weight=-1.0)


# ------------------------------------------------------- what the max pooling keeps


def test_critical_points_alone_give_the_same_output():
    model = _model()
    x = torch.randn(60, 3, dtype=torch.float64)
    critical = critical_points(model, x)
    assert 0 < len(critical) < 60
    assert torch.allclose(model(x[critical][None]), model(x[None]), atol=1e-12)
    assert torch.allclose(
        model.encode(x[critical][None])[0], model.encode(x[None])[0], atol=1e-12
    )
    # brute force, without T-Nets: every critical point attains some channel's max,
    # and every channel's max is attained by a critical point
    plain = _model(input_transform=False, feature_transform=False)
    critical = critical_points(plain, x)
    with torch.no_grad():
        h = plain.mlp2(plain.mlp1(x))  # (N, C)
    attains = h == h.max(0).values  # (N, C)
    assert attains[critical].any(1).all()
    assert attains[critical].any(0).all()


def test_upper_bound_shape_against_brute_force():
    model = _model()
    x = torch.randn(30, 3, dtype=torch.float64)
    candidates = 2 * torch.rand(80, 3, dtype=torch.float64) - 1
    inside = upper_bound_shape(model, x, candidates)
    assert inside.any() and not inside.all()
    with torch.no_grad():
        g, ref = model.encode(x[None])[0], model(x[None])
        for c, flag in zip(candidates, inside, strict=True):
            bigger = torch.cat([x, c[None]])[None]  # the cloud with this point added
            unchanged = torch.allclose(model.encode(bigger)[0], g, atol=1e-12, rtol=0)
            assert bool(flag) == unchanged
        # all the inside points at once leave the output as it was
        everything = torch.cat([x, candidates[inside]])[None]
        assert torch.allclose(model(everything), ref, atol=1e-12)


def test_critical_points_need_evaluation_mode():
    model = _model().train()
    with pytest.raises(ValueError, match="evaluation mode"):
        critical_points(model, torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="model must be a PointNet"):
        upper_bound_shape(nn.Linear(3, 3), torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="candidates must have shape"):
        upper_bound_shape(_model(), torch.randn(5, 3), torch.randn(5, 2))
