"""Weighted Kabsch fits, rigid fits to displacement fields and rigid displacement fields."""

from __future__ import annotations

import math

import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.rigid import fit_rigid, fit_rigid_to_field, fit_rigid_to_regions, rigid_displacement


def rotation(axis, degrees: float) -> torch.Tensor:
    """(3, 3) float64 rotation about ``axis`` (Rodrigues)."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    k = torch.tensor([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]], dtype=torch.float64)
    theta = math.radians(degrees)
    return torch.eye(3, dtype=torch.float64) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)


def linear_field(matrix, centre_mm, translation_mm, shape, spacing) -> torch.Tensor:
    """Voxel field of ``x_mm -> A (x_mm - c) + c + t``, written out directly (independent of the code under test)."""
    step = torch.tensor(spacing, dtype=torch.float64).view(3, 1, 1, 1)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    x = idx * step
    c = torch.tensor(centre_mm, dtype=torch.float64).view(3, 1, 1, 1)
    t = torch.tensor(translation_mm, dtype=torch.float64).view(3, 1, 1, 1)
    mapped = torch.einsum("ce,edhw->cdhw", matrix, x - c) + c + t
    return ((mapped - x) / step)[None]


def test_fit_rigid_recovers_known_transform_exactly():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(2, 30, 3, generator=gen, dtype=torch.float64) * 20
    rots = torch.stack([rotation((1, 2, 3), 37.0), rotation((0, 0, 1), 170.0)])
    trans = torch.tensor([[5.0, -3.0, 12.0], [-40.0, 0.5, 2.0]], dtype=torch.float64)
    tgt = src @ rots.transpose(1, 2) + trans[:, None]
    r, t = fit_rigid(src, tgt)
    assert torch.allclose(r, rots, atol=1e-10)
    assert torch.allclose(t, trans, atol=1e-9)
    assert r.dtype == torch.float64 and r.shape == (2, 3, 3) and t.shape == (2, 3)


def test_fit_rigid_with_noise_is_close():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(1, 400, 3, generator=gen, dtype=torch.float64) * 15
    rot = rotation((0.3, -1, 0.2), 12.0)[None]
    tgt = src @ rot.transpose(1, 2) + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    tgt = tgt + 0.1 * torch.randn(tgt.shape, generator=gen, dtype=torch.float64)
    r, t = fit_rigid(src.float(), tgt.float())
    assert r.dtype == torch.float32
    angle_error = torch.arccos(((torch.einsum("bij,bij->b", r.double(), rot) - 1) / 2).clamp(-1, 1))
    assert math.degrees(float(angle_error)) < 0.1
    assert float((t.double() - torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).norm()) < 0.05


def test_fit_rigid_never_returns_a_reflection():
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(1, 50, 3, generator=gen, dtype=torch.float64)
    tgt = src * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # mirror image: the best orthogonal map has det -1
    r, _ = fit_rigid(src, tgt)
    assert float(torch.det(r[0])) == pytest.approx(1.0, abs=1e-10)
    assert torch.allclose(r[0] @ r[0].T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    # Among proper rotations, the best keeps the two unmirrored axes and flips the mirrored one with another.
    residual = ((src @ r.transpose(1, 2) - tgt) ** 2).sum()
    for candidate in (torch.eye(3, dtype=torch.float64), torch.diag(torch.tensor([-1.0, 1.0, -1.0]).double())):
        assert float(residual) <= float(((src @ candidate.T - tgt) ** 2).sum()) + 1e-9


def test_fit_rigid_respects_weights():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(1, 40, 3, generator=gen, dtype=torch.float64) * 10
    ra, rb = rotation((1, 0, 0), 20.0), rotation((0, 1, 0), -35.0)
    tgt = torch.cat([src[:, :20] @ ra.T + 4.0, src[:, 20:] @ rb.T - 7.0], dim=1)
    weights = torch.cat([torch.full((1, 20), 2.5), torch.zeros(1, 20)], dim=1).double()
    r, t = fit_rigid(src, tgt, weights)
    assert torch.allclose(r[0], ra, atol=1e-10)
    assert torch.allclose(t[0], torch.full((3,), 4.0, dtype=torch.float64), atol=1e-9)
    r_all, _ = fit_rigid(src, tgt)
    assert not torch.allclose(r_all[0], ra, atol=1e-3)  # without the weights the other half matters


def test_fit_rigid_degenerate_inputs_stay_finite():
    src = torch.randn(3, 5, 3, dtype=torch.float64)
    weights = torch.zeros(3, 5, dtype=torch.float64)
    weights[1, 2] = 1.0  # a single point: pure translation
    weights[2] = 1.0
    line = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None] * torch.tensor([1.0, 0.0, 0.0]).double()
    src[2] = line  # collinear points: rotation about the line is undetermined
    tgt = src + 3.0
    src.requires_grad_(True)
    r, t = fit_rigid(src, tgt, weights)
    assert torch.isfinite(r).all() and torch.isfinite(t).all()
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(r[0], eye) and torch.allclose(t[0], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(r[1], eye, atol=1e-9) and torch.allclose(t[1], torch.full((3,), 3.0).double(), atol=1e-9)
    assert torch.allclose(r[2], eye, atol=1e-6) and torch.allclose(t[2], torch.full((3,), 3.0).double(), atol=1e-6)
    (r.sum() + t.sum()).backward()
    assert torch.isfinite(src.grad).all()


def test_fit_rigid_gradient_is_finite_for_symmetric_shapes_and_correct():
    # A cube's covariance has three equal singular values: autograd through torch.linalg.svd gives NaN there.
    cube = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float64)
    src = cube[None].clone().requires_grad_(True)
    tgt = (cube @ rotation((1, 1, 0), 10.0).T)[None]
    r, t = fit_rigid(src, tgt)
    (r * torch.arange(9.0, dtype=torch.float64).view(3, 3)).sum().backward()
    assert torch.isfinite(src.grad).all()
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(1, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(1, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fit_rigid, (a, b, w))
    b_mirror = (a.detach() * torch.tensor([1.0, -1.0, 1.0]).double()).requires_grad_(True)
    b_mirror = (b_mirror.detach() + 0.1 * torch.randn(b_mirror.shape, generator=gen).double()).requires_grad_(True)
    assert torch.autograd.gradcheck(fit_rigid, (a, b_mirror, w))


@pytest.mark.parametrize("spacing", [None, (1.5, 0.8, 1.2)])
def test_fit_rigid_to_field_recovers_rotation(spacing):
    step = spacing or (1.0, 1.0, 1.0)
    shape = (10, 12, 9)
    rot = rotation((0.2, 1.0, -0.5), 8.0)
    field = linear_field(rot, (6.0, 5.0, 4.0), (1.5, -2.0, 0.7), shape, step)
    weights = torch.zeros(1, 1, *shape, dtype=torch.float64)
    weights[..., 2:7, 3:9, 2:6] = 1.0
    r, t = fit_rigid_to_field(weights, field, spacing)
    expected_t = torch.tensor([6.0, 5.0, 4.0]).double() - rot @ torch.tensor([6.0, 5.0, 4.0]).double()
    expected_t = expected_t + torch.tensor([1.5, -2.0, 0.7]).double()
    assert torch.allclose(r[0], rot, atol=1e-9)
    assert torch.allclose(t[0], expected_t, atol=1e-8)
    # float32 fields are fitted in float64 internally and come back float32
    r32, _ = fit_rigid_to_field(weights.float(), field.float(), spacing)
    assert r32.dtype == torch.float32 and torch.allclose(r32[0].double(), rot, atol=1e-5)


def test_fit_rigid_to_field_uses_only_the_weighted_region():
    shape = (8, 8, 8)
    rot = rotation((0, 0, 1), 15.0)
    field = linear_field(rot, (4.0, 4.0, 4.0), (0.0, 1.0, 0.0), shape, (1.0, 1.0, 1.0))
    field[:, :, 4:] = torch.randn(1, 3, 4, 8, 8, dtype=torch.float64)  # garbage outside the region
    weights = torch.zeros(1, 1, *shape, dtype=torch.float64)
    weights[..., :4, :, :] = torch.rand(1, 1, 4, 8, 8, dtype=torch.float64) + 0.1  # soft weights
    r, _ = fit_rigid_to_field(weights, field)
    assert torch.allclose(r[0], rot, atol=1e-9)
    # several regions at once, one of them empty
    both = torch.cat([weights, torch.zeros_like(weights)], dim=1)
    rs, ts = fit_rigid_to_regions(both, field)
    assert rs.shape == (1, 2, 3, 3) and torch.allclose(rs[0, 0], rot, atol=1e-9)
    assert torch.allclose(rs[0, 1], torch.eye(3).double()) and torch.allclose(ts[0, 1], torch.zeros(3).double())


@pytest.mark.parametrize("spacing", [None, (2.0, 0.7, 1.1)])
def test_rigid_displacement_round_trips(spacing):
    step = spacing or (1.0, 1.0, 1.0)
    shape = (7, 9, 8)
    rot = rotation((1, -1, 2), 25.0)[None]
    trans = torch.tensor([[3.0, -1.0, 0.5]], dtype=torch.float64)
    field = rigid_displacement(rot, trans, shape, spacing)
    assert field.shape == (1, 3, *shape)
    # the field is the rigid map itself: check one voxel by hand
    idx = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)
    x = idx * torch.tensor(step).double()
    expected = (rot[0] @ x + trans[0] - x) / torch.tensor(step).double()
    assert torch.allclose(field[0, :, 3, 5, 2], expected, atol=1e-12)
    r, t = fit_rigid_to_field(torch.ones(1, 1, *shape, dtype=torch.float64), field, spacing)
    assert torch.allclose(r, rot, atol=1e-10) and torch.allclose(t, trans, atol=1e-9)


def test_bad_inputs_raise():
    pts = torch.randn(1, 4, 3)
    with pytest.raises(InputError):
        fit_rigid(pts[0], pts[0])  # wrong rank
    with pytest.raises(InputError):
        fit_rigid(pts, torch.randn(1, 5, 3))  # mismatched point counts
    with pytest.raises(InputError):
        fit_rigid(torch.randn(1, 4, 2), torch.randn(1, 4, 2))  # not 3D points
    nan = pts.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(InputError):
        fit_rigid(nan, pts)
    with pytest.raises(InputError):
        fit_rigid(pts, pts, -torch.ones(1, 4))
    with pytest.raises(InputError):
        fit_rigid(pts, pts, torch.ones(1, 3))
    with pytest.raises(TypeError):
        fit_rigid(pts.numpy(), pts)
    with pytest.raises(TypeError):
        fit_rigid(pts.long(), pts.long())
    field = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(InputError):
        fit_rigid_to_field(torch.ones(1, 1, 4, 4, 5), field)
    with pytest.raises(InputError):
        fit_rigid_to_field(torch.ones(1, 2, 4, 4, 4), field)
    with pytest.raises(InputError):
        fit_rigid_to_field(-torch.ones(1, 1, 4, 4, 4), field)
    with pytest.raises(InputError):
        fit_rigid_to_field(torch.ones(1, 1, 4, 4, 4), field, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError):
        fit_rigid_to_field(torch.ones(1, 1, 4, 4, 4), torch.full((1, 3, 4, 4, 4), float("nan")))
    with pytest.raises(InputError):
        rigid_displacement(torch.eye(3)[None], torch.zeros(1, 2), (4, 4, 4))
    with pytest.raises(InputError):
        rigid_displacement(torch.eye(3)[None], torch.zeros(1, 3), (4, 4))
