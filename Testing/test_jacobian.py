"""Jacobians of displacement fields in millimetres: analytic maps and an independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.jacobian import (
    determinant,
    jacobian_determinant,
    jacobian_matrix,
    orthonormality_residual,
    spatial_gradient,
)
from SpineRigidRegLib.warp import identity_grid

SHAPE = (7, 9, 8)
SPACING = (2.5, 0.8, 1.2)  # mm, array order (D, H, W)


def mm_linear_field(matrix, shape=SHAPE, spacing=SPACING, translation_mm=(0.0, 0.0, 0.0)):
    """Voxel displacement of the map ``p -> A p + t`` written in mm coordinates ``p = x * spacing``."""
    s = torch.tensor(spacing, dtype=torch.float64).view(1, 3, 1, 1, 1)
    p = identity_grid(shape, dtype=torch.float64) * s
    a = torch.as_tensor(np.asarray(matrix), dtype=torch.float64)
    t = torch.tensor(translation_mm, dtype=torch.float64).view(1, 3, 1, 1, 1)
    mapped = torch.einsum("ca,badhw->bcdhw", a, p) + t
    return (mapped - p) / s


def rotation(axis, degrees):
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def test_identity_and_translation_have_unit_jacobian():
    zero = torch.zeros(2, 3, *SHAPE)
    torch.testing.assert_close(jacobian_determinant(zero, SPACING), torch.ones(2, 1, *SHAPE), rtol=0, atol=0)
    shifted = mm_linear_field(np.eye(3), translation_mm=(3.0, -1.0, 7.5))
    eye = torch.eye(3, dtype=torch.float64).view(1, 3, 3, 1, 1, 1).expand(1, 3, 3, *SHAPE)
    torch.testing.assert_close(jacobian_matrix(shifted, SPACING), eye, rtol=0, atol=1e-12)


def test_affine_field_has_jacobian_a_and_determinant_det_a_with_anisotropic_spacing():
    a = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [-0.2, 0.1, 1.3]])
    field = mm_linear_field(a, translation_mm=(1.0, 2.0, -3.0))
    jac = jacobian_matrix(field, SPACING)
    assert jac.shape == (1, 3, 3, *SHAPE)
    expected = torch.as_tensor(a).view(1, 3, 3, 1, 1, 1).expand_as(jac)
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-12)  # faces included: one-sided is exact too
    det = jacobian_determinant(field, SPACING)
    torch.testing.assert_close(det, torch.full_like(det, float(np.linalg.det(a))), rtol=0, atol=1e-12)
    # the same voxel field read with the wrong spacing is a different map: spacing must matter
    assert not torch.allclose(jacobian_matrix(field), expected, atol=1e-3)


def test_rotation_is_orthonormal_with_unit_determinant_and_a_stretch_is_not():
    r = rotation([1.0, -0.4, 0.7], 23.0)
    jac = jacobian_matrix(mm_linear_field(r), SPACING)
    assert float(orthonormality_residual(jac).abs().max()) < 1e-24
    torch.testing.assert_close(determinant(jac), torch.ones(1, 1, *SHAPE, dtype=torch.float64), rtol=0, atol=1e-12)
    stretch = np.diag([1.2, 1.0, 1.0])
    residual = orthonormality_residual(jacobian_matrix(mm_linear_field(stretch), SPACING))
    torch.testing.assert_close(residual, torch.full_like(residual, (1.2**2 - 1) ** 2), rtol=1e-12, atol=0)


def test_folded_field_has_non_positive_determinant_exactly_where_it_folds():
    shape = (20, 6, 6)
    k = torch.arange(shape[0], dtype=torch.float64)
    bump = -4.0 * torch.exp(-((k - 9.5) ** 2) / (2 * 2.0**2))  # slope up to 1.2 voxel/voxel: folds its flank
    field = torch.zeros(1, 3, *shape, dtype=torch.float64)
    field[:, 0] = bump.view(-1, 1, 1)
    det = jacobian_determinant(field, (1.7, 1.0, 1.0))[0, 0]
    folded = det <= 0
    assert 0 < int(folded.sum()) < folded.numel()
    # for a field along k only, det J = 1 + du_k/dk, independent of the spacing
    slope = np.gradient(bump.numpy())
    np.testing.assert_array_equal(folded[:, 0, 0].numpy(), 1.0 + slope <= 0)
    np.testing.assert_allclose(det[:, 2, 3].numpy(), 1.0 + slope, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), SPACING])
def test_jacobian_matches_a_numpy_gradient_reference_in_mm(spacing):
    gen = torch.Generator().manual_seed(7)
    field = F.interpolate(
        2.0 * torch.randn(1, 3, 3, 4, 3, generator=gen, dtype=torch.float64),
        size=SHAPE,
        mode="trilinear",
        align_corners=True,
    )
    field_mm = field[0].numpy() * np.asarray(spacing).reshape(3, 1, 1, 1)
    expected = np.empty((3, 3, *SHAPE))
    for c in range(3):
        for a in range(3):
            expected[c, a] = np.gradient(field_mm[c], spacing[a], axis=a, edge_order=1) + (c == a)
    jac = jacobian_matrix(field, spacing)[0].numpy()
    np.testing.assert_allclose(jac, expected, rtol=0, atol=1e-12)
    det = jacobian_determinant(field, spacing)[0, 0].numpy()
    np.testing.assert_allclose(det, np.linalg.det(np.moveaxis(expected, (0, 1), (-2, -1))), rtol=0, atol=1e-10)
    # spatial_gradient of any multi-channel volume also matches numpy's
    volume = torch.randn(2, 2, *SHAPE, generator=gen, dtype=torch.float64)
    grad = spatial_gradient(volume, spacing).numpy()
    for a in range(3):
        np.testing.assert_allclose(grad[:, :, a], np.gradient(volume.numpy(), spacing[a], axis=2 + a), atol=1e-12)


def test_a_single_slice_axis_has_zero_derivative():
    field = torch.randn(1, 3, 1, 5, 6, dtype=torch.float64)
    grad = spatial_gradient(field)
    assert torch.all(grad[:, :, 0] == 0)
    assert torch.isfinite(jacobian_determinant(field)).all()


def _nan_field():
    field = torch.zeros(1, 3, 4, 5, 6)
    field[0, 0, 1, 2, 3] = float("nan")
    return field


BAD_INPUTS = [
    ("gradient 4-D", lambda: spatial_gradient(torch.zeros(3, 4, 5, 6)), InputError, "5-D"),
    ("gradient int", lambda: spatial_gradient(torch.zeros(1, 1, 4, 5, 6, dtype=torch.long)), TypeError, "floating"),
    ("gradient nan", lambda: spatial_gradient(_nan_field()), InputError, "NaN"),
    ("gradient numpy", lambda: spatial_gradient(np.zeros((1, 1, 4, 5, 6))), TypeError, "torch.Tensor"),
    ("gradient 2 spacings", lambda: spatial_gradient(torch.zeros(1, 1, 4, 5, 6), (1.0, 1.0)), InputError, "spacing"),
    ("jacobian 2 channels", lambda: jacobian_matrix(torch.zeros(1, 2, 4, 5, 6)), InputError, "3 channel"),
    ("jacobian nan", lambda: jacobian_matrix(_nan_field()), InputError, "NaN"),
    (
        "jacobian negative spacing",
        lambda: jacobian_matrix(torch.zeros(1, 3, 4, 5, 6), (1, -1, 1)),
        InputError,
        "spacing",
    ),
    (
        "jacobian nan spacing",
        lambda: jacobian_matrix(torch.zeros(1, 3, 4, 5, 6), (1, float("nan"), 1)),
        InputError,
        "spacing",
    ),
    ("determinant of a field", lambda: jacobian_determinant(_nan_field()), InputError, "NaN"),
    (
        "determinant int",
        lambda: jacobian_determinant(torch.zeros(1, 3, 4, 5, 6, dtype=torch.int32)),
        TypeError,
        "floating",
    ),
    ("determinant of 5-D", lambda: determinant(torch.zeros(1, 3, 4, 5, 6)), InputError, r"\(B, 3, 3, D, H, W\)"),
    ("determinant of 2x3", lambda: determinant(torch.zeros(1, 2, 3, 4, 5, 6)), InputError, r"\(B, 3, 3, D, H, W\)"),
    ("residual of 5-D", lambda: orthonormality_residual(torch.zeros(1, 3, 4, 5, 6)), InputError, "6-D"),
    (
        "residual int",
        lambda: orthonormality_residual(torch.zeros(1, 3, 3, 4, 5, 6, dtype=torch.long)),
        TypeError,
        "floating",
    ),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_a_named_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 3, 4, 1, 2)])
def test_the_jacobian_without_autograd_is_the_differentiable_one_exactly(shape):
    """A result's Jacobian is written in place (no autograd), the training losses' is built for autograd: the same
    numbers, also along axes of one or two voxels."""
    field = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    fast = jacobian_matrix(field, (0.8, 1.0, 2.5))
    tracked = field.clone().requires_grad_(True)
    differentiable = jacobian_matrix(tracked, (0.8, 1.0, 2.5))
    assert differentiable.requires_grad and not fast.requires_grad
    assert torch.equal(fast, differentiable.detach())
