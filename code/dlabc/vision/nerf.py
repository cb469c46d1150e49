r"""Neural radiance fields: pinhole rays from camera poses, the positional encoding,
stratified samples along a ray, the volume-rendering quadrature, a small NeRF and its
training on views of a scene rendered here, analytically.

Chapter: ``book/vision/nerf.md``.

References:
- Mildenhall, Srinivasan, Tancik, Barron, Ramamoorthi & Ng (2020), *NeRF: Representing
  Scenes as Neural Radiance Fields for View Synthesis*, ECCV (the field, the quadrature,
  stratified sampling, the MLP with a skip connection and a view-direction branch).
- Max (1995), *Optical Models for Direct Volume Rendering*, IEEE TVCG (the
  emission-absorption integral that the quadrature approximates).
- Tancik et al. (2020), *Fourier Features Let Networks Learn High Frequency Functions in
  Low Dimensional Domains*, NeurIPS (why the encoding makes fine detail learnable).

Conventions: world coordinates with $z$ up; a pose is the camera-to-world matrix
``(4, 4)`` whose columns are the camera's right, up and backward axes and its centre
(the camera looks along its $-z$, as in NeRF's code); ray directions are unit vectors,
so $t$ is a distance. Shapes: ``R`` rays, ``N`` samples per ray, ``H``, ``W`` image
size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dlabc import train
from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "look_at",
    "pose_on_sphere",
    "get_rays",
    "Scene",
    "demo_scene",
    "render_scene",
    "make_views",
    "positional_encoding",
    "stratified_samples",
    "volume_render",
    "NeRF",
    "render_rays",
    "render_image",
    "psnr",
    "train_nerf",
]


# ---------------------------------------------------------------- cameras and rays


def look_at(
    eye: torch.Tensor,
    target: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
) -> torch.Tensor:
    """The camera-to-world pose ``(4, 4)`` of a camera at ``eye`` looking at
    ``target`` (the origin by default), with the world's ``up`` (``+z``) pointing up in
    the image."""
    eye = check_tensor(eye, "eye", ndim=1, floating=True)
    if eye.shape[0] != 3:
        raise ValueError(f"eye must have shape (3,), got {tuple(eye.shape)}")
    target = torch.zeros_like(eye) if target is None else target.to(eye)
    up = eye.new_tensor([0.0, 0.0, 1.0]) if up is None else up.to(eye)
    forward = F.normalize(target - eye, dim=0)
    right = torch.linalg.cross(forward, up)
    if right.norm() < 1e-9:
        raise ValueError("up must not be parallel to the viewing direction")
    right = F.normalize(right, dim=0)
    true_up = torch.linalg.cross(right, forward)
    pose = torch.eye(4, dtype=eye.dtype)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, true_up, -forward, eye
    return pose


def pose_on_sphere(
    azimuth: float, elevation: float, radius: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The pose of a camera at ``radius`` from the origin, at ``azimuth`` and
    ``elevation`` (radians), looking at the origin."""
    eye = radius * torch.tensor(
        [
            math.cos(elevation) * math.cos(azimuth),
            math.cos(elevation) * math.sin(azimuth),
            math.sin(elevation),
        ],
        dtype=dtype,
    )
    return look_at(eye)


def get_rays(
    H: int, W: int, focal: float, pose: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ray through the centre of every pixel of a pinhole camera.

    Pixel $(i, j)$ (column, row) looks along $\big((i + \tfrac12 - \tfrac W2)/f,\
    -(j + \tfrac12 - \tfrac H2)/f,\ -1\big)$ in the camera's frame; the pose rotates
    that into the world and gives the origin. Returns origins and unit directions,
    both ``(H, W, 3)``.
    """
    j, i = torch.meshgrid(
        torch.arange(H, dtype=pose.dtype, device=pose.device),
        torch.arange(W, dtype=pose.dtype, device=pose.device),
        indexing="ij",
    )  # (H, W) rows, columns
    x = (i + 0.5 - W / 2) / focal
    y = -(j + 0.5 - H / 2) / focal  # image rows go down, the camera's y goes up
    d_camera = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (H, W, 3)
    directions = F.normalize(d_camera @ pose[:3, :3].T, dim=-1)  # (H, W, 3)
    origins = pose[:3, 3].expand_as(directions)  # (H, W, 3)
    return origins, directions


# ---------------------------------------------------------------- the scene, exactly


@dataclass
class Scene:
    """Opaque spheres and one axis-aligned box with Lambertian (matte) colours, lit by
    a distant light: what the analytic renderer draws and the NeRF must learn."""

    centers: torch.Tensor  # (K, 3)
    radii: torch.Tensor  # (K,)
    sphere_colors: torch.Tensor  # (K, 3)
    box_min: torch.Tensor  # (3,)
    box_max: torch.Tensor  # (3,)
    box_color: torch.Tensor  # (3,)
    light: torch.Tensor = field(
        default_factory=lambda: F.normalize(torch.tensor([0.6, -0.4, 1.0]), dim=0)
    )
    ambient: float = 0.3
    background: float = 1.0  # white


def demo_scene() -> Scene:
    """The chapter's scene: three coloured balls around a yellow block, all inside the
    unit ball."""
    return Scene(
        centers=torch.tensor([[0.45, -0.3, -0.1], [-0.4, -0.35, 0.0], [0.0, 0.5, 0.3]]),
        radii=torch.tensor([0.3, 0.25, 0.35]),
        sphere_colors=torch.tensor(
            [[0.85, 0.15, 0.15], [0.15, 0.6, 0.2], [0.2, 0.35, 0.9]]
        ),
        box_min=torch.tensor([-0.25, -0.2, -0.4]),
        box_max=torch.tensor([0.25, 0.2, 0.2]),
        box_color=torch.tensor([0.95, 0.75, 0.1]),
    )


def _hit_spheres(
    scene: Scene, o: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest sphere hit of each ray: distance (inf if none), normal, colour."""
    oc = o[:, None, :] - scene.centers.to(o)  # (R, K, 3)
    b = (oc * d[:, None, :]).sum(-1)  # (R, K)  with |d| = 1
    c = (oc * oc).sum(-1) - scene.radii.to(o) ** 2
    disc = b * b - c
    t = -b - disc.clamp(min=0).sqrt()  # the entry point
    t = torch.where((disc > 0) & (t > 0), t, torch.full_like(t, math.inf))
    t_min, k = t.min(dim=1)  # (R,)
    points = o + t_min.clamp(max=1e6)[:, None] * d
    normals = F.normalize(points - scene.centers.to(o)[k], dim=-1)
    return t_min, normals, scene.sphere_colors.to(o)[k]


def _hit_box(
    scene: Scene, o: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box hit of each ray by the slab method: distance (inf if none), normal."""
    inv = 1.0 / torch.where(d == 0, torch.full_like(d, 1e-12), d)  # no division by 0
    t0 = (scene.box_min.to(o) - o) * inv  # (R, 3)
    t1 = (scene.box_max.to(o) - o) * inv
    t_enter, axis = torch.minimum(t0, t1).max(dim=-1)  # (R,)
    t_exit = torch.maximum(t0, t1).min(dim=-1).values
    hit = (t_enter <= t_exit) & (t_enter > 0)
    t = torch.where(hit, t_enter, torch.full_like(t_enter, math.inf))
    normals = -torch.sign(d) * F.one_hot(axis, 3).to(o)  # faces the ray
    return t, normals


def render_scene(
    scene: Scene, origins: torch.Tensor, directions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The exact image of ``scene``: the nearest surface along each ray, coloured
    $c \,(a + (1 - a)\max(0, n \cdot l))$ (ambient $a$, light $l$), white where no ray
    hits. ``origins``, ``directions`` ``(..., 3)`` -> colour ``(..., 3)``, depth
    ``(...)`` (inf where nothing is hit)."""
    shape = origins.shape[:-1]
    o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)
    t_sphere, n_sphere, c_sphere = _hit_spheres(scene, o, d)
    t_box, n_box = _hit_box(scene, o, d)
    box_first = (t_box < t_sphere)[:, None]
    t = torch.minimum(t_sphere, t_box)  # (R,)
    normals = torch.where(box_first, n_box, n_sphere)
    albedo = torch.where(box_first, scene.box_color.to(o), c_sphere)
    lambert = (normals @ scene.light.to(o)).clamp(min=0)  # (R,)
    shade = scene.ambient + (1 - scene.ambient) * lambert
    rgb = albedo * shade[:, None]
    rgb = torch.where(
        torch.isinf(t)[:, None], torch.full_like(rgb, scene.background), rgb
    )
    return rgb.reshape(*shape, 3), t.reshape(shape)


def make_views(
    scene: Scene,
    n_views: int,
    H: int,
    W: int,
    focal: float,
    radius: float = 4.0,
    elevations: tuple[float, float] = (0.15, 1.0),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_views`` images ``(n, H, W, 3)`` of ``scene`` from cameras at random
    azimuths and elevations (radians, uniform in ``elevations``) on a sphere of
    ``radius``, and their poses ``(n, 4, 4)``."""
    check_positive_int(n_views, "n_views")
    check_positive_int(H, "H")
    check_positive_int(W, "W")
    check_number(focal, "focal", low=0, low_open=True)
    generator = torch.Generator().manual_seed(seed)
    azimuths = 2 * math.pi * torch.rand(n_views, generator=generator)
    low, high = elevations
    heights = low + (high - low) * torch.rand(n_views, generator=generator)
    poses = torch.stack(
        [
            pose_on_sphere(a.item(), e.item(), radius)
            for a, e in zip(azimuths, heights, strict=True)
        ]
    )
    images = torch.stack(
        [render_scene(scene, *get_rays(H, W, focal, pose))[0] for pose in poses]
    )
    return images, poses


# ---------------------------------------------------------------- the encoding


def positional_encoding(
    x: torch.Tensor, L: int, include_input: bool = True
) -> torch.Tensor:
    r"""NeRF's encoding of each coordinate $p$ of ``x`` ``(..., C)``:

    $\gamma(p) = \big(\sin(2^0 \pi p), \cos(2^0 \pi p), \dots,
    \sin(2^{L-1} \pi p), \cos(2^{L-1} \pi p)\big)$

    returned as ``(..., C + 2 L C)`` (``x`` itself first if ``include_input``), ordered
    $[x, \sin(2^0 \pi x), \cos(2^0 \pi x), \sin(2^1 \pi x), \dots]$.
    """
    frequencies = 2.0 ** torch.arange(L, dtype=x.dtype, device=x.device) * math.pi
    angles = x[..., None, :] * frequencies[:, None]  # (..., L, C)
    features = torch.stack([angles.sin(), angles.cos()], dim=-2)  # (..., L, 2, C)
    features = features.flatten(-3)  # (..., 2 L C)
    return torch.cat([x, features], dim=-1) if include_input else features


# ---------------------------------------------------------------- sampling, rendering


def stratified_samples(
    near: float,
    far: float,
    n_rays: int,
    N: int,
    perturb: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""$N$ distances per ray, one uniformly at random in each of $N$ equal bins of
    $[t_n, t_f]$:

    $t_i \sim \mathcal U\big[t_n + \tfrac{i-1}{N}(t_f - t_n),\ t_n + \tfrac{i}{N}(t_f -
    t_n)\big]$

    (the start of each bin when ``perturb`` is False). Returns ``(n_rays, N)``, sorted.
    """
    edges = torch.linspace(near, far, N + 1, dtype=dtype, device=device)  # (N + 1,)
    lower, width = edges[:-1], edges[1:] - edges[:-1]
    if perturb:
        u = torch.rand(n_rays, N, generator=generator, dtype=dtype).to(device)
    else:
        u = torch.zeros(n_rays, N, dtype=dtype, device=device)
    return lower + width * u  # (n_rays, N)


def volume_render(
    sigma: torch.Tensor, rgb: torch.Tensor, t: torch.Tensor, far: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The quadrature of the volume-rendering integral along each ray.

    Sample $i$ stands for the interval $[t_i, t_{i+1})$ of length $\delta_i$ (the last
    one ends at ``far``), where the density is $\sigma_i$ and the colour $c_i$:

    $\hat C = \sum_i T_i\,\alpha_i\, c_i, \qquad \alpha_i = 1 - e^{-\sigma_i
    \delta_i}, \qquad T_i = e^{-\sum_{j<i} \sigma_j \delta_j}$

    ``sigma`` ``(R, N)``, ``rgb`` ``(R, N, 3)``, ``t`` ``(R, N)`` sorted. Returns the
    colour ``(R, 3)``, the expected depth $\sum_i w_i t_i$ ``(R,)`` and the weights
    $w_i = T_i \alpha_i$ ``(R, N)``; $\sum_i w_i = 1 - T_{N+1} \le 1$ is the opacity.
    """
    far = torch.as_tensor(far).to(t).reshape(-1, 1).expand(len(t), 1)
    delta = torch.cat([t[:, 1:], far], dim=1) - t  # (R, N)
    optical_depth = sigma * delta  # (R, N)
    alpha = 1 - torch.exp(-optical_depth)
    # T_i = exp(-sum_{j<i} sigma_j delta_j): the optical depth before sample i
    before = torch.cumsum(optical_depth, dim=1)[:, :-1]  # (R, N - 1)
    before = torch.cat([torch.zeros_like(optical_depth[:, :1]), before], dim=1)
    weights = torch.exp(-before) * alpha  # (R, N): T_i alpha_i
    colour = (weights[..., None] * rgb).sum(dim=1)  # (R, 3)
    depth = (weights * t).sum(dim=1)  # (R,)
    return colour, depth, weights


# ---------------------------------------------------------------- the field


class NeRF(nn.Module):
    r"""The NeRF multilayer perceptron, with the paper's structure at any size.

    The encoded position $\gamma(x)$ goes through ``depth`` ReLU layers of ``width``
    units, and is concatenated again to the output of the first ``skip`` of them (the
    paper: 8 layers of 256, $\gamma(x)$ joins the fifth layer's activation, ``skip=5``).
    The density $\sigma = \mathrm{ReLU}(\cdot)$
    is read from the last layer, so it depends on the position only. With
    ``use_viewdirs``, the colour comes from a feature vector and the encoded direction
    $\gamma(d)$ through one more layer of ``width // 2``; without, straight from the
    last layer (a matte scene needs no direction).
    """

    def __init__(
        self,
        L_x: int = 6,
        L_d: int = 4,
        width: int = 64,
        depth: int = 4,
        skip: int = 2,
        use_viewdirs: bool = False,
    ) -> None:
        super().__init__()
        for value, name in ((width, "width"), (depth, "depth")):
            check_positive_int(value, name)
        if not 0 < skip < depth:
            raise ValueError(f"skip must be in 1..depth - 1 = {depth - 1}, got {skip}")
        self.L_x, self.L_d, self.skip, self.use_viewdirs = L_x, L_d, skip, use_viewdirs
        in_x, in_d = 3 + 6 * L_x, 3 + 6 * L_d
        self.layers = nn.ModuleList(
            nn.Linear(in_x if k == 0 else width + (in_x if k == skip else 0), width)
            for k in range(depth)
        )
        self.sigma = nn.Linear(width, 1)
        if use_viewdirs:
            self.feature = nn.Linear(width, width)
            self.view = nn.Linear(width + in_d, width // 2)
            self.rgb = nn.Linear(width // 2, 3)
        else:
            self.rgb = nn.Linear(width, 3)

    def forward(
        self, x: torch.Tensor, d: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points ``x`` ``(..., 3)`` (and unit directions ``d``) -> density ``(...)``
        and colour ``(..., 3)`` in $[0, 1]$."""
        gamma_x = positional_encoding(x, self.L_x)  # (..., 3 + 6 L_x)
        h = gamma_x
        for k, layer in enumerate(self.layers):
            if k == self.skip:
                h = torch.cat([h, gamma_x], dim=-1)  # the skip connection
            h = F.relu(layer(h))  # (..., width)
        sigma = F.relu(self.sigma(h)).squeeze(-1)  # (...)
        if self.use_viewdirs:
            gamma_d = positional_encoding(d, self.L_d)  # (..., 3 + 6 L_d)
            h = F.relu(self.view(torch.cat([self.feature(h), gamma_d], dim=-1)))
        return sigma, torch.sigmoid(self.rgb(h))


def render_rays(
    field: nn.Module,
    origins: torch.Tensor,
    directions: torch.Tensor,
    near: float,
    far: float,
    N: int,
    perturb: bool = True,
    background: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Render rays ``(R, 3)`` through a radiance ``field`` (any callable from points
    and directions to density and colour): sample, query, composite on the
    ``background``. Returns colour ``(R, 3)``, depth ``(R,)`` (``far`` where the ray
    hits nothing) and opacity ``(R,)``."""
    t = stratified_samples(
        near, far, len(origins), N, perturb, generator, origins.device, origins.dtype
    )  # (R, N)
    points = origins[:, None, :] + t[..., None] * directions[:, None, :]  # (R, N, 3)
    sigma, rgb = field(points, directions[:, None, :].expand_as(points))
    colour, depth, weights = volume_render(sigma, rgb, t, far)
    opacity = weights.sum(dim=1)  # (R,)
    colour = colour + (1 - opacity[:, None]) * background
    depth = depth + (1 - opacity) * far
    return colour, depth, opacity


@torch.no_grad()
def render_image(
    field: nn.Module,
    pose: torch.Tensor,
    H: int,
    W: int,
    focal: float,
    near: float,
    far: float,
    N: int,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image ``(H, W, 3)`` and depth map ``(H, W)`` that ``field`` renders from
    ``pose``, with evenly spaced samples (no randomness), ``chunk`` rays at a time."""
    check_tensor(pose, "pose", ndim=2, floating=True)
    _check_sampling(near, far, N)
    for value, name in ((H, "H"), (W, "W"), (chunk, "chunk")):
        check_positive_int(value, name)
    origins, directions = get_rays(H, W, focal, pose)
    rays = zip(
        origins.reshape(-1, 3).split(chunk),
        directions.reshape(-1, 3).split(chunk),
        strict=True,
    )
    parts = [render_rays(field, o, d, near, far, N, perturb=False) for o, d in rays]
    colour = torch.cat([p[0] for p in parts]).reshape(H, W, 3)
    depth = torch.cat([p[1] for p in parts]).reshape(H, W)
    return colour, depth


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    r"""Peak signal-to-noise ratio of ``image`` against ``reference``, both in $[0,
    1]$: $-10 \log_{10} \mathrm{MSE}$, in decibels."""
    if image.shape != reference.shape:
        raise ValueError(
            f"image and reference must have the same shape, got {tuple(image.shape)} "
            f"and {tuple(reference.shape)}"
        )
    mse = F.mse_loss(image.double(), reference.double()).item()
    return math.inf if mse == 0 else -10 * math.log10(mse)


def _check_sampling(near: float, far: float, N: int) -> None:
    check_number(near, "near", low=0)
    check_number(far, "far", low=near, low_open=True)
    check_positive_int(N, "N")


# ---------------------------------------------------------------- training


def train_nerf(
    images: torch.Tensor,
    poses: torch.Tensor,
    focal: float,
    near: float,
    far: float,
    steps: int,
    N: int = 48,
    batch_size: int = 1024,
    lr: float = 5e-3,
    seed: int = 0,
    **sizes: int,
) -> tuple[NeRF, list[float]]:
    """Fit a :class:`NeRF` to posed ``images`` ``(n, H, W, 3)``: every step renders
    ``batch_size`` random rays of all the views and descends on their squared error.
    Returns the model (eval mode) and the loss of every step."""
    check_tensor(images, "images", ndim=4, floating=True)
    check_tensor(poses, "poses", ndim=3, floating=True)
    if images.shape[-1] != 3 or poses.shape[1:] != (4, 4) or len(images) != len(poses):
        raise ValueError(
            "images must be (n, H, W, 3) and poses (n, 4, 4) with the same n, got "
            f"{tuple(images.shape)} and {tuple(poses.shape)}"
        )
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    _check_sampling(near, far, N)
    torch.manual_seed(seed)
    device = images.device
    model = NeRF(**sizes).to(device)
    return _fit(model, images, poses, focal, near, far, steps, N, batch_size, lr, seed)


def _fit(model, images, poses, focal, near, far, steps, N, batch_size, lr, seed):
    n, H, W, _ = images.shape
    rays = [get_rays(H, W, focal, pose) for pose in poses]
    origins = torch.stack([o for o, _ in rays]).reshape(-1, 3)  # (n H W, 3)
    directions = torch.stack([d for _, d in rays]).reshape(-1, 3)
    target = images.reshape(-1, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches = (
        torch.randint(len(target), (batch_size,), generator=generator).to(images.device)
        for _ in range(steps)
    )

    def loss_fn(model: NeRF, batch: torch.Tensor) -> torch.Tensor:
        colour, _, _ = render_rays(
            model, origins[batch], directions[batch], near, far, N, generator=generator
        )
        return F.mse_loss(colour, target[batch])

    history = train.train_steps(
        model,
        optimizer,
        batches,
        loss_fn,
        steps=steps,
        lr_schedule=lambda step: lr * 0.1 ** (step / steps),  # NeRF's decay to a tenth
    )
    losses = history.step_loss
    return model.eval(), losses
