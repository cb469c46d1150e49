"""Tests for ``dlabc.vision.nerf``.

Rays against an independently written pinhole projection (points along each ray land
back on its pixel's centre); poses against the properties of a rotation; the analytic
renderer against brute-force ray marching and the closed-form distance to a sphere; the
encoding against its formula written as loops; the quadrature against a brute-force
loop and against closed forms of the emission-absorption integral (a constant-density
slab, exact whenever its ends are sample points; a homogeneous ball, whose opacity is
$1 - e^{-\\sigma \\cdot \\mathrm{chord}}$, reached at rate $1/N$); PSNR against
scikit-image's. Everything in float64 where equality is asserted.
"""

from __future__ import annotations

import math

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from dlabc.vision.nerf import (
    NeRF,
    Scene,
    demo_scene,
    get_rays,
    look_at,
    make_views,
    pose_on_sphere,
    positional_encoding,
    psnr,
    render_image,
    render_rays,
    render_scene,
    stratified_samples,
    train_nerf,
    volume_render,
)

F64 = dict(atol=1e-12, rtol=1e-12)


def _ball_field(center, radius, sigma0, colour):
    """A homogeneous ball of density ``sigma0`` and one colour: a field with a closed
    form."""

    def field(points, directions):
        inside = (points - center).norm(dim=-1) < radius
        sigma = torch.where(inside, sigma0, 0.0).to(points)
        return sigma, colour.to(points).expand(*points.shape[:-1], 3)

    return field


def _chord(origins, directions, center, radius):
    oc = origins - center
    b = (oc * directions).sum(-1)
    disc = b**2 - ((oc * oc).sum(-1) - radius**2)
    return 2 * disc.clamp(min=0).sqrt()


# ---------------------------------------------------------------- cameras


def test_look_at_is_a_rotation_that_faces_the_target():
    eye = torch.tensor([1.0, -2.0, 0.7], dtype=torch.float64)
    target = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    pose = look_at(eye, target)
    R = pose[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=torch.float64), **F64)
    # right-handed: right x up = backward
    torch.testing.assert_close(torch.linalg.cross(R[:, 0], R[:, 1]), R[:, 2], **F64)
    forward = (target - eye) / (target - eye).norm()
    torch.testing.assert_close(-R[:, 2], forward, **F64)  # looks along its -z
    assert R[2, 0].abs().item() < 1e-12  # the image's x axis is horizontal
    assert R[2, 1].item() > 0  # the image's up points up
    torch.testing.assert_close(pose[3], torch.tensor([0, 0, 0, 1.0]).double())


def test_look_at_rejects_bad_input():
    with pytest.raises(ValueError, match="eye must have shape"):
        look_at(torch.zeros(4))
    with pytest.raises(ValueError, match="up must not be parallel"):
        look_at(torch.tensor([0.0, 0.0, 3.0]))


def test_pose_on_sphere_places_the_camera():
    pose = pose_on_sphere(0.3, 0.5, 4.0, dtype=torch.float64)
    expected = 4.0 * torch.tensor(
        [math.cos(0.5) * math.cos(0.3), math.cos(0.5) * math.sin(0.3), math.sin(0.5)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(pose[:3, 3], expected, **F64)


def test_points_on_each_ray_project_back_to_their_pixel_centre():
    H, W, f = 5, 7, 6.5
    pose = pose_on_sphere(1.1, 0.4, 3.0, dtype=torch.float64)
    origins, directions = get_rays(H, W, f, pose)
    assert origins.shape == directions.shape == (H, W, 3)
    torch.testing.assert_close(
        directions.norm(dim=-1), torch.ones(H, W, dtype=torch.float64), **F64
    )
    points = origins + 2.7 * directions  # any point on the ray
    # the pinhole projection written the other way round: world -> camera -> pixel
    R, centre = pose[:3, :3], pose[:3, 3]
    camera = (points - centre) @ R  # (H, W, 3) in the camera's axes
    depth = -camera[..., 2]
    u = f * camera[..., 0] / depth + W / 2  # columns, from the left
    v = -f * camera[..., 1] / depth + H / 2  # rows, from the top
    rows, cols = torch.meshgrid(
        torch.arange(H).double(), torch.arange(W).double(), indexing="ij"
    )
    torch.testing.assert_close(u, cols + 0.5, **F64)
    torch.testing.assert_close(v, rows + 0.5, **F64)
    assert (depth > 0).all()


# ---------------------------------------------------------------- the analytic renderer


def _scene64() -> Scene:
    scene = demo_scene()
    for name in ("centers", "radii", "sphere_colors", "box_min", "box_max"):
        setattr(scene, name, getattr(scene, name).double())
    scene.box_color, scene.light = scene.box_color.double(), scene.light.double()
    return scene


def _inside(scene: Scene, p: torch.Tensor) -> torch.Tensor:
    in_sphere = ((p[..., None, :] - scene.centers) ** 2).sum(-1) < scene.radii**2
    in_box = ((p >= scene.box_min) & (p <= scene.box_max)).all(-1)
    return in_sphere.any(-1) | in_box


def test_render_scene_depth_matches_brute_force_marching():
    scene = _scene64()
    pose = pose_on_sphere(0.7, 0.35, 4.0, dtype=torch.float64)
    origins, directions = get_rays(12, 12, 14.0, pose)
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    _, depth = render_scene(scene, origins, directions)
    step = 1e-3
    t = torch.arange(2.0, 6.0, step, dtype=torch.float64)  # (S,)
    inside = _inside(scene, origins[:, None] + t[:, None] * directions[:, None])
    first = torch.where(inside.any(1), t[inside.int().argmax(1)], math.inf)
    hit = torch.isfinite(first)
    assert 10 < hit.sum() < len(hit)  # some rays hit, some miss
    assert torch.equal(torch.isfinite(depth), hit)
    assert (depth[hit] - first[hit]).abs().max() <= step + 1e-9
    assert (first[hit] - depth[hit] >= -1e-9).all()  # marching can only be late


def test_render_scene_colours_a_sphere_and_the_background_exactly():
    scene = _scene64()
    c, r = scene.centers[2], scene.radii[2]  # the ball on top, nothing in front
    eye = c + torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)
    rgb, depth = render_scene(scene, eye[None], d)
    assert depth.item() == pytest.approx(3.0 - r.item(), abs=1e-12)
    normal = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    shade = scene.ambient + (1 - scene.ambient) * max(
        0.0, (normal @ scene.light).item()
    )
    torch.testing.assert_close(rgb[0], scene.sphere_colors[2] * shade, **F64)
    up = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)  # away from everything
    rgb, depth = render_scene(scene, eye[None], up)
    assert math.isinf(depth.item()) and rgb.eq(scene.background).all()


def test_render_scene_shades_box_faces_with_their_normals():
    scene = _scene64()
    # straight down onto the box's top face, between the balls
    eye = torch.tensor([[0.0, -0.05, 3.0]], dtype=torch.float64)
    rgb, depth = render_scene(scene, eye, torch.tensor([[0.0, 0.0, -1.0]]).double())
    assert depth.item() == pytest.approx(3.0 - scene.box_max[2].item(), abs=1e-12)
    lambert = max(0.0, scene.light[2].item())
    expected = scene.box_color * (scene.ambient + (1 - scene.ambient) * lambert)
    torch.testing.assert_close(rgb[0], expected, **F64)


def test_make_views_renders_each_pose():
    scene = demo_scene()
    images, poses = make_views(scene, 3, 6, 5, 7.0, radius=3.5, seed=4)
    assert images.shape == (3, 6, 5, 3) and poses.shape == (3, 4, 4)
    torch.testing.assert_close(poses[:, :3, 3].norm(dim=-1), torch.full((3,), 3.5))
    for image, pose in zip(images, poses, strict=True):
        torch.testing.assert_close(
            image, render_scene(scene, *get_rays(6, 5, 7.0, pose))[0]
        )
    with pytest.raises(ValueError, match="n_views must be positive"):
        make_views(scene, 0, 6, 5, 7.0)
    with pytest.raises(ValueError, match="focal must be in"):
        make_views(scene, 2, 6, 5, -1.0)


# ---------------------------------------------------------------- the encoding


def test_positional_encoding_is_the_formula():
    x = torch.randn(4, 3, dtype=torch.float64)
    L = 5
    expected = []
    for row in x:
        features = list(row)
        for k in range(L):
            features += [math.sin(2**k * math.pi * p) for p in row]
            features += [math.cos(2**k * math.pi * p) for p in row]
        expected.append(features)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(positional_encoding(x, L), expected, **F64)
    torch.testing.assert_close(
        positional_encoding(x, L, include_input=False), expected[:, 3:], **F64
    )
    assert positional_encoding(torch.zeros(2, 7, 3), 10).shape == (2, 7, 63)


# ---------------------------------------------------------------- sampling and the quadrature


def test_stratified_samples_put_one_sample_in_each_bin():
    g = torch.Generator().manual_seed(0)
    t = stratified_samples(2.0, 6.0, 50, 8, generator=g)
    assert t.shape == (50, 8)
    lower = 2.0 + 0.5 * torch.arange(8)
    assert ((t >= lower) & (t <= lower + 0.5)).all()
    assert (t.diff(dim=1) >= 0).all()
    assert t.std(0).min() > 0.1  # really random within the bins
    torch.testing.assert_close(
        stratified_samples(2.0, 6.0, 3, 8, perturb=False), lower.expand(3, 8)
    )


def _brute_force_render(sigma, rgb, t, far):
    colours, depths, all_weights = [], [], []
    for s_ray, c_ray, t_ray in zip(
        sigma.tolist(), rgb.tolist(), t.tolist(), strict=True
    ):
        edges = t_ray + [far]
        colour, depth, weights, T = [0.0, 0.0, 0.0], 0.0, [], 1.0
        for i, (s, c) in enumerate(zip(s_ray, c_ray, strict=True)):
            alpha = 1 - math.exp(-s * (edges[i + 1] - edges[i]))
            weights.append(T * alpha)
            colour = [a + T * alpha * b for a, b in zip(colour, c, strict=True)]
            depth += T * alpha * t_ray[i]
            T *= 1 - alpha
        colours.append(colour), depths.append(depth), all_weights.append(weights)
    return (
        torch.tensor(x, dtype=torch.float64) for x in (colours, depths, all_weights)
    )


def test_volume_render_equals_the_brute_force_loop():
    torch.manual_seed(0)
    sigma = torch.rand(5, 9, dtype=torch.float64) * 3
    rgb = torch.rand(5, 9, 3, dtype=torch.float64)
    t = torch.sort(torch.rand(5, 9, dtype=torch.float64) * 4 + 1, dim=1).values
    colour, depth, weights = volume_render(sigma, rgb, t, 5.5)
    for ours, reference in zip(
        (colour, depth, weights), _brute_force_render(sigma, rgb, t, 5.5), strict=True
    ):
        torch.testing.assert_close(ours, reference, **F64)
    # the weights telescope: their sum is the opacity 1 - exp(-sum sigma delta) <= 1
    delta = torch.cat([t[:, 1:], torch.full((5, 1), 5.5).double()], 1) - t
    torch.testing.assert_close(
        weights.sum(1), 1 - torch.exp(-(sigma * delta).sum(1)), **F64
    )
    assert (weights.sum(1) <= 1).all()


def test_a_constant_density_slab_has_opacity_one_minus_exp_minus_sigma_l():
    """Exact for ANY sampling that has the slab's two ends among its points."""
    a, b, s0, far = 1.3, 2.1, 2.5, 4.0
    torch.manual_seed(1)
    random_points = torch.rand(6, 30, dtype=torch.float64) * 4
    ends = torch.tensor([a, b], dtype=torch.float64).expand(6, 2)
    t = torch.sort(torch.cat([random_points, ends], 1), dim=1).values
    sigma = torch.where((t >= a) & (t < b), s0, 0.0)
    c = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    colour, _, weights = volume_render(sigma, c.expand(6, 32, 3), t, far)
    opacity = 1 - math.exp(-s0 * (b - a))
    torch.testing.assert_close(
        weights.sum(1), torch.full((6,), opacity, dtype=torch.float64), **F64
    )
    torch.testing.assert_close(colour, (opacity * c).expand(6, 3), **F64)


def test_the_slab_depth_converges_to_the_closed_form():
    a, b, s0 = 1.0, 2.0, 1.7
    # int_a^b t sigma e^{-sigma (t - a)} dt
    L = b - a
    exact = a * (1 - math.exp(-s0 * L)) + 1 / s0 - math.exp(-s0 * L) * (L + 1 / s0)
    for N in (100, 1000):
        t = torch.linspace(0.0, 3.0, N + 1, dtype=torch.float64)[:-1][None]
        sigma = torch.where((t >= a) & (t < b), s0, 0.0)
        _, depth, _ = volume_render(sigma, torch.zeros(1, N, 3).double(), t, 3.0)
        assert abs(depth.item() - exact) < 3.0 / N  # left end points: error O(delta)


def test_a_homogeneous_ball_converges_to_one_minus_exp_minus_sigma_chord():
    centre, radius, s0 = torch.tensor([0.1, -0.2, 0.0]).double(), 0.8, 3.0
    pose = pose_on_sphere(0.4, 0.3, 3.0, dtype=torch.float64)
    origins, directions = get_rays(11, 11, 14.0, pose)
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    chord = _chord(origins, directions, centre, radius)
    assert (chord > 0).sum() > 20 and (chord == 0).sum() > 5
    field = _ball_field(centre, radius, s0, torch.tensor([1.0, 0.0, 0.0]))
    errors = []
    for N in (250, 1000):
        _, _, opacity = render_rays(
            field, origins, directions, 1.5, 4.5, N, perturb=False
        )
        errors.append((opacity - (1 - torch.exp(-s0 * chord))).abs().max().item())
    # each end of the chord is off by at most one interval: |error| <= 2 sigma delta
    assert errors[0] < 2 * s0 * 3.0 / 250
    assert errors[1] < 2 * s0 * 3.0 / 1000
    assert errors[1] < errors[0] / 2  # first order in 1 / N


def test_render_rays_composites_empty_space_onto_the_background():
    field = _ball_field(torch.zeros(3), 0.5, 0.0, torch.zeros(3))  # density 0
    o, d = torch.zeros(4, 3).double(), torch.eye(3).double()[[0, 1, 2, 2]]
    colour, depth, opacity = render_rays(field, o, d, 1.0, 3.0, 8, background=0.25)
    torch.testing.assert_close(colour, torch.full((4, 3), 0.25).double(), **F64)
    torch.testing.assert_close(depth, torch.full((4,), 3.0).double(), **F64)
    assert opacity.eq(0).all()


# ---------------------------------------------------------------- the field


def _count(width, depth, L_x, L_d, use_viewdirs):
    in_x, in_d = 3 + 6 * L_x, 3 + 6 * L_d
    n = (in_x + 1) * width + (depth - 1) * (width + 1) * width + in_x * width
    n += width + 1  # sigma
    if use_viewdirs:
        n += (
            (width + 1) * width
            + (width + in_d + 1) * (width // 2)
            + (width // 2 + 1) * 3
        )
    else:
        n += (width + 1) * 3
    return n


def test_nerf_has_the_papers_structure():
    paper = NeRF(L_x=10, L_d=4, width=256, depth=8, skip=5, use_viewdirs=True)
    assert sum(p.numel() for p in paper.parameters()) == _count(256, 8, 10, 4, True)
    # the paper's Fig. 7: gamma(x) (63 with x itself) joins the fifth layer's output
    widths = [layer.in_features for layer in paper.layers]
    assert widths == [63, 256, 256, 256, 256, 256 + 63, 256, 256]
    tiny = NeRF(L_x=3, width=16, depth=3, skip=1)
    assert sum(p.numel() for p in tiny.parameters()) == _count(16, 3, 3, 4, False)


def test_density_depends_on_position_only():
    torch.manual_seed(0)
    model = NeRF(L_x=3, L_d=2, width=16, depth=3, skip=1, use_viewdirs=True).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    d1 = torch.nn.functional.normalize(torch.randn(10, 3, dtype=torch.float64), dim=-1)
    d2 = torch.nn.functional.normalize(torch.randn(10, 3, dtype=torch.float64), dim=-1)
    (s1, c1), (s2, c2) = model(x, d1), model(x, d2)
    assert s1.shape == (10,) and c1.shape == (10, 3)
    torch.testing.assert_close(s1, s2, **F64)
    assert (c1 - c2).abs().max() > 1e-4 and ((c1 > 0) & (c1 < 1)).all()
    matte = NeRF(L_x=3, width=16, depth=3, skip=1).double()
    torch.testing.assert_close(matte(x, d1)[1], matte(x, d2)[1], **F64)
    # the skip connection: gamma(x) reaches layer `skip` directly
    assert model.layers[1].in_features == 16 + 3 + 6 * 3
    with pytest.raises(ValueError, match="skip must be in"):
        NeRF(depth=3, skip=3)


def test_render_image_is_render_rays_on_every_pixel_in_any_chunks():
    torch.manual_seed(0)
    model = NeRF(L_x=2, width=8, depth=2, skip=1).double()
    pose = pose_on_sphere(0.2, 0.4, 3.0, dtype=torch.float64)
    image, depth = render_image(model, pose, 4, 3, 5.0, 2.0, 4.0, 6, chunk=5)
    o, d = get_rays(4, 3, 5.0, pose)
    colour, depth_ref, _ = render_rays(
        model, o.reshape(-1, 3), d.reshape(-1, 3), 2.0, 4.0, 6, perturb=False
    )
    torch.testing.assert_close(image, colour.reshape(4, 3, 3), **F64)
    torch.testing.assert_close(depth, depth_ref.reshape(4, 3), **F64)
    with pytest.raises(ValueError, match="pose must have 2 dimensions"):
        render_image(model, pose[None], 4, 3, 5.0, 2.0, 4.0, 6)
    with pytest.raises(ValueError, match="far must be in"):
        render_image(model, pose, 4, 3, 5.0, 2.0, 2.0, 6)
    with pytest.raises(ValueError, match="N must be positive"):
        render_image(model, pose, 4, 3, 5.0, 2.0, 4.0, 0)


def test_psnr_matches_scikit_image():
    torch.manual_seed(0)
    a, b = torch.rand(6, 5, 3), torch.rand(6, 5, 3)
    expected = peak_signal_noise_ratio(
        b.double().numpy(), a.double().numpy(), data_range=1.0
    )
    assert psnr(a, b) == pytest.approx(expected, rel=1e-12)
    assert psnr(a, a) == math.inf  # scikit-image's answer too, with a warning
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:-1])


def test_train_nerf_lowers_the_loss_and_checks_its_input():
    scene = demo_scene()
    images, poses = make_views(scene, 4, 8, 8, 10.0, seed=0)
    model, losses = train_nerf(
        images, poses, 10.0, 3.0, 5.0, steps=40, N=8, batch_size=64,
        L_x=3, width=16, depth=2, skip=1,
    )  # fmt: skip
    assert len(losses) == 40 and not model.training
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first
    with pytest.raises(ValueError, match="images must have 4 dimensions"):
        train_nerf(images[0], poses, 10.0, 3.0, 5.0, steps=1)
    with pytest.raises(ValueError, match="images must be"):
        train_nerf(images, poses[:2], 10.0, 3.0, 5.0, steps=1)
    with pytest.raises(ValueError, match="steps must be positive"):
        train_nerf(images, poses, 10.0, 3.0, 5.0, steps=0)
    with pytest.raises(ValueError, match="far must be in"):
        train_nerf(images, poses, 10.0, 5.0, 3.0, steps=1)
    with pytest.raises(ValueError, match="lr must be in"):
        train_nerf(images, poses, 10.0, 3.0, 5.0, steps=1, lr=0.0)
