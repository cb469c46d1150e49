r"""PointNet: a network for unordered point sets, from a shared per-point MLP and a
symmetric max pooling, with learnt alignments (T-Nets), and the critical points and
upper-bound shape that explain what it has learnt.

Chapter: ``book/vision/pointnet.md``.

References:
- Qi, Su, Mo & Guibas (2017), *PointNet: Deep Learning on Point Sets for 3D
  Classification and Segmentation*, CVPR (the architecture, its published sizes, the
  T-Nets and their orthogonality regulariser, critical points and upper-bound shapes).
- Zaheer, Kottur, Ravanbakhsh, Póczos, Salakhutdinov & Smola (2017), *Deep Sets*,
  NeurIPS (every permutation-invariant function of a set drawn from a countable
  universe is $\rho(\sum_i \phi(x_i))$).
- Wu et al. (2015), *3D ShapeNets: A Deep Representation for Volumetric Shapes*, CVPR
  (ModelNet, the benchmark of the published accuracies).

No ModelNet exists offline, so :func:`make_point_clouds` generates the chapter's data:
point clouds sampled uniformly (by area) from the surfaces of ``trimesh``'s primitive
meshes, stretched, rotated and jittered at random. Shapes: ``B`` batch, ``N`` points
per cloud, ``C`` feature channels, ``k`` the side of a T-Net's matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "SHAPES",
    "primitive_mesh",
    "sample_surface",
    "random_rotations",
    "make_point_clouds",
    "SharedMLP",
    "TNet",
    "PointNet",
    "orthogonality_loss",
    "pointnet_loss",
    "critical_points",
    "upper_bound_shape",
]

#: The classes of the generated data set, in label order.
SHAPES = ("box", "sphere", "cylinder", "cone", "pyramid", "torus")


# --------------------------------------------------------------------------- the data


def primitive_mesh(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The triangle mesh of one of :data:`SHAPES`, built by ``trimesh``: vertices
    ``(V, 3)`` float64 and faces ``(F, 3)`` int64, of size about one."""
    import trimesh

    if name not in SHAPES:
        raise ValueError(f"name must be one of {SHAPES}, got {name!r}")
    make = {
        "box": lambda: trimesh.creation.box(extents=(1.0, 1.0, 1.0)),
        "sphere": lambda: trimesh.creation.icosphere(subdivisions=3, radius=0.5),
        "cylinder": lambda: trimesh.creation.cylinder(0.5, 1.0, sections=32),
        "cone": lambda: trimesh.creation.cone(0.5, 1.0, sections=32),
        "pyramid": lambda: trimesh.creation.cone(0.6, 1.0, sections=4),
        "torus": lambda: trimesh.creation.torus(0.4, 0.15),
    }[name]
    mesh = make()
    return (
        torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float64),
        torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64),
    )


def sample_surface(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` points drawn uniformly from the surface of a triangle mesh ``(V, 3)``,
    ``(F, 3)``: ``(n, 3)``. Checks its arguments, then runs :func:`_sample_surface`."""
    check_tensor(vertices, "vertices", ndim=2, floating=True)
    check_tensor(faces, "faces", ndim=2, dtype=torch.int64)
    if vertices.shape[1] != 3 or faces.shape[1] != 3:
        raise ValueError(
            "vertices and faces must have 3 columns, got shapes "
            f"{tuple(vertices.shape)} and {tuple(faces.shape)}"
        )
    check_positive_int(n, "n")
    return _sample_surface(vertices, faces, n, generator)


def _sample_surface(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``n`` points drawn uniformly from the surface of a triangle mesh: ``(n, 3)``.

    A triangle is picked with probability proportional to its area, then a point
    inside it with the barycentric weights of two uniform numbers $u, v$:

    $p = (1 - \sqrt{u})\,a + \sqrt{u}(1 - v)\,b + \sqrt{u}\,v\,c$

    (the square root spreads the points evenly instead of crowding the corner $a$).
    """
    a, b, c = vertices[faces].unbind(1)  # (F, 3) each: the three corners
    area = torch.linalg.cross(b - a, c - a).norm(dim=-1) / 2  # (F,)
    which = torch.multinomial(area, n, replacement=True, generator=generator)  # (n,)
    u, v = torch.rand(2, n, 1, generator=generator, dtype=vertices.dtype)
    s = u.sqrt()
    return (1 - s) * a[which] + s * (1 - v) * b[which] + s * v * c[which]  # (n, 3)


def random_rotations(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    upright: bool = False,
) -> torch.Tensor:
    """``n`` rotation matrices ``(n, 3, 3)`` drawn uniformly (from the Haar measure), or
    with ``upright=True`` uniformly among the rotations about the vertical axis ``z``.

    The QR factors of a Gaussian matrix, with the signs of ``R``'s diagonal moved into
    ``Q``, are Haar-distributed on the orthogonal group; flipping one column where the
    determinant is -1 leaves a uniform rotation (Mezzadri 2007).
    """
    check_positive_int(n, "n")
    if upright:
        angle = 2 * torch.pi * torch.rand(n, generator=generator, dtype=dtype)
        cos, sin, zero, one = angle.cos(), angle.sin(), angle * 0, angle * 0 + 1
        rows = [[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]]
        return torch.stack([torch.stack(row, -1) for row in rows], -2)
    Q, R = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=dtype))
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    flip = torch.ones(n, 3, dtype=dtype)
    flip[:, 0] = torch.sign(torch.linalg.det(Q))
    return Q * flip[:, None, :]


def make_point_clouds(
    n_per_class: int,
    n_points: int = 256,
    seed: int = 0,
    stretch: float = 0.3,
    jitter: float = 0.01,
    upright: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A generated point-cloud data set: ``X`` ``(n, n_points, 3)`` float32 and labels
    ``y`` ``(n,)`` int64 (indices into :data:`SHAPES`), ``n_per_class`` per class.

    Each cloud is sampled from a primitive mesh stretched along its axes by factors
    drawn from $[1 - s, 1 + s]$ ($s$ = ``stretch``), turned by a uniform random
    rotation, centred on its centroid and scaled into the unit ball (as the PointNet
    paper did with ModelNet), then jittered by Gaussian noise of standard deviation
    ``jitter``. Classes are interleaved, so any prefix of the set is balanced.
    """
    check_positive_int(n_per_class, "n_per_class")
    check_positive_int(n_points, "n_points")
    check_number(stretch, "stretch", low=0, high=1, high_open=True)
    check_number(jitter, "jitter", low=0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    meshes = [primitive_mesh(name) for name in SHAPES]
    n = n_per_class * len(SHAPES)
    y = torch.arange(n) % len(SHAPES)
    scales = 1 + stretch * (2 * torch.rand(n, 3, generator=generator) - 1)
    rotations = random_rotations(n, generator, upright=upright)
    X = torch.empty(n, n_points, 3, dtype=torch.float64)
    for i in range(n):
        vertices, faces = meshes[y[i]]
        points = _sample_surface(vertices * scales[i], faces, n_points, generator)
        points = points @ rotations[i].T
        points = points - points.mean(0)
        X[i] = points / points.norm(dim=1).max()
    X = X + jitter * torch.randn(X.shape, generator=generator, dtype=X.dtype)
    return X.float(), y


# -------------------------------------------------------------------------- the model


class SharedMLP(nn.Sequential):
    r"""The same MLP applied to every point: ``(B, N, C_in)`` to ``(B, N, C_out)``.

    Each layer is $x \mapsto \operatorname{ReLU}(\operatorname{BN}(x W))$, with one $W$
    for all points (the paper's 1x1 convolutions). BatchNorm's statistics run over all
    $B N$ points; the linear maps have no bias, since BatchNorm subtracts any constant.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        _check_sizes(sizes)
        layers = []
        for c_in, c_out in pairwise(sizes):
            layers += [nn.Linear(c_in, c_out, bias=False), _PointBatchNorm(c_out)]
            layers.append(nn.ReLU())
        super().__init__(*layers)


def _check_sizes(sizes: object) -> None:
    if not isinstance(sizes, Sequence) or len(sizes) < 2:
        raise ValueError(f"sizes must list at least two widths, got {sizes!r}")
    for size in sizes:
        check_positive_int(size, "sizes")


class _PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of ``(B, N, C)``, statistics over all ``B N``
    points (BatchNorm1d wants the channels on axis 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class TNet(nn.Module):
    r"""A small PointNet that predicts a ``k x k`` matrix $A$ from a point set
    ``(B, N, k)``; returns $A$ ``(B, k, k)`` and, for every channel of its max pooling,
    the index of the point that won it ``(B, C)``.

    Its last linear layer starts at zero weight and the identity as bias, so a fresh
    T-Net returns $A = I$ and changes nothing until training moves it.
    """

    def __init__(
        self,
        k: int,
        mlp: Sequence[int] = (64, 128, 1024),
        fc: Sequence[int] = (512, 256),
    ) -> None:
        super().__init__()
        self.k = check_positive_int(k, "k")
        self.h = SharedMLP((k, *mlp))
        self.fc = _head_layers((mlp[-1], *fc))
        self.out = nn.Linear(([mlp[-1], *fc])[-1], k * k)
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(torch.eye(self.k).flatten())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, winners = self.h(x).max(dim=1)  # (B, C) each: the max over the points
        A = self.out(self.fc(g)).view(-1, self.k, self.k)  # (B, k, k)
        return A, winners


def _head_layers(sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Fully connected layers with BatchNorm and ReLU (and dropout before the last
    one's output, when asked)."""
    layers = []
    for c_in, c_out in pairwise(sizes):
        layers += [nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class PointNet(nn.Module):
    r"""PointNet for classification: point clouds ``(B, N, 3)`` to logits ``(B, K)``.

    $f(x_1, \dots, x_N) = \gamma\big(\max_i h(x_i)\big)$

    with $h$ two shared MLPs (``mlp1``, ``mlp2``), each after an optional T-Net that
    multiplies the points (``input_tnet``, $3 \times 3$) or their features
    (``feature_tnet``, $64 \times 64$ in the paper) by a learnt matrix, and $\gamma$
    the fully connected ``head``. The defaults are the paper's sizes.
    """

    def __init__(
        self,
        n_classes: int,
        mlp1: Sequence[int] = (64, 64),
        mlp2: Sequence[int] = (64, 128, 1024),
        head: Sequence[int] = (512, 256),
        tnet_mlp: Sequence[int] = (64, 128, 1024),
        tnet_fc: Sequence[int] = (512, 256),
        input_transform: bool = True,
        feature_transform: bool = True,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        check_positive_int(n_classes, "n_classes")
        for name, sizes in dict(
            mlp1=mlp1, mlp2=mlp2, head=head, tnet_mlp=tnet_mlp, tnet_fc=tnet_fc
        ).items():
            if len(sizes) < 1:
                raise ValueError(f"{name} must list at least one width")
            for size in sizes:
                check_positive_int(size, name)
        for name, flag in dict(
            input_transform=input_transform, feature_transform=feature_transform
        ).items():
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        check_number(dropout, "dropout", low=0, high=1, high_open=True)
        self.n_classes = n_classes
        self.input_tnet = TNet(3, tnet_mlp, tnet_fc) if input_transform else None
        self.mlp1 = SharedMLP((3, *mlp1))
        self.feature_tnet = (
            TNet(mlp1[-1], tnet_mlp, tnet_fc) if feature_transform else None
        )
        self.mlp2 = SharedMLP((mlp1[-1], *mlp2))
        self.head = nn.Sequential(
            _head_layers((mlp2[-1], *head), dropout), nn.Linear(head[-1], n_classes)
        )

    def encode(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The global feature ``(B, C)``, the T-Nets' matrices, and for each max
        pooling (T-Nets' first) the index of the point that won each channel."""
        transforms, winners = [], []
        if self.input_tnet is not None:
            A, won = self.input_tnet(x)
            x = x @ A  # (B, N, 3): the aligned points
            transforms.append(A)
            winners.append(won)
        x = self.mlp1(x)  # (B, N, 64)
        if self.feature_tnet is not None:
            A, won = self.feature_tnet(x)
            x = x @ A  # (B, N, 64): the aligned features
            transforms.append(A)
            winners.append(won)
        g, won = self.mlp2(x).max(dim=1)  # (B, 1024): the symmetric function
        return g, transforms, winners + [won]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x)
        return self.head(self.encode(x)[0])  # (B, K)


def _check_points(x: object, name: str = "x", batched: bool = True) -> None:
    check_tensor(x, name, ndim=3 if batched else 2, floating=True)
    if x.shape[-1] != 3 or x.shape[-2] == 0:
        shape = "(B, N, 3)" if batched else "(N, 3)"
        raise ValueError(
            f"{name} must have shape {shape} with N >= 1, got {tuple(x.shape)}"
        )


def orthogonality_loss(A: torch.Tensor) -> torch.Tensor:
    r"""The T-Net regulariser $\lVert I - A A^\top \rVert_F^2$, averaged over a batch
    of matrices ``(B, k, k)``: zero exactly when $A$ is orthogonal."""
    _check_square(A)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return (eye - A @ A.transpose(1, 2)).square().sum(dim=(1, 2)).mean()


def _check_square(A: object) -> None:
    check_tensor(A, "A", ndim=3, floating=True)
    if A.shape[1] != A.shape[2]:
        raise ValueError(f"A must hold square matrices (B, k, k), got {tuple(A.shape)}")


def pointnet_loss(
    model: PointNet, X: torch.Tensor, y: torch.Tensor, reg_weight: float = 0.001
) -> torch.Tensor:
    """Cross-entropy plus ``reg_weight`` times the orthogonality loss of the feature
    T-Net's matrix (the paper's 0.001; the input T-Net is not regularised)."""
    _check_points(X, "X")
    check_tensor(y, "y", ndim=1, dtype=torch.int64)
    check_number(reg_weight, "reg_weight", low=0)
    g, transforms, _ = model.encode(X)
    loss = F.cross_entropy(model.head(g), y)
    if model.feature_tnet is not None:
        loss = loss + reg_weight * orthogonality_loss(transforms[-1])
    return loss


# ------------------------------------------------------- what the max pooling keeps


def critical_points(model: PointNet, points: torch.Tensor) -> torch.Tensor:
    r"""The indices of the critical points of one cloud ``(N, 3)``: the points that win
    the max of at least one channel, in any of the model's max poolings (in evaluation
    mode). The model's output on these points alone equals its output on all."""
    _check_eval(model)
    _check_points(points, "points", batched=False)
    with torch.no_grad():
        _, _, winners = model.encode(points[None])
    return torch.cat([won[0] for won in winners]).unique()


def upper_bound_shape(
    model: PointNet, points: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    r"""Which ``candidates`` ``(M, 3)`` lie in the upper-bound shape of the cloud
    ``points`` ``(N, 3)``: a mask ``(M,)`` of the points whose features stay at or
    below the cloud's maximum in every channel of every max pooling, so that adding
    any of them to the cloud changes no output."""
    _check_eval(model)
    _check_points(points, "points", batched=False)
    _check_points(candidates, "candidates", batched=False)
    with torch.no_grad():
        return _upper_bound(model, points, candidates)


def _upper_bound(
    model: PointNet, points: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    x, c = points[None], candidates[None]  # (1, N, 3), (1, M, 3)
    inside = torch.ones(len(candidates), dtype=torch.bool, device=candidates.device)
    if model.input_tnet is not None:
        A, _ = model.input_tnet(x)
        inside &= _below(model.input_tnet.h, x, c)
        x, c = x @ A, c @ A
    x, c = model.mlp1(x), model.mlp1(c)
    if model.feature_tnet is not None:
        A, _ = model.feature_tnet(x)
        inside &= _below(model.feature_tnet.h, x, c)
        x, c = x @ A, c @ A
    return inside & _below(model.mlp2, x, c)


def _below(h: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Whether each candidate's features ``h(c)`` are <= the max of ``h(x)``."""
    return (h(c)[0] <= h(x)[0].max(dim=0).values).all(dim=-1)  # (M,)


def _check_eval(model: object) -> None:
    if not isinstance(model, PointNet):
        raise TypeError(f"model must be a PointNet, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            "model must be in evaluation mode (model.eval()): in training mode "
            "BatchNorm makes a point's features depend on the other points"
        )
