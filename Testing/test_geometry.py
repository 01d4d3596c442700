"""Geometry conventions against SimpleITK: LPS/RAS, index to physical, image <-> tensor, displacement units."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import (
    Geometry,
    apply_matrix,
    displacement_field_image,
    displacement_from_field_image,
    displacement_from_lps,
    displacement_to_lps,
    image_to_tensor,
    lps_points_to_ras,
    lps_to_ras_matrix,
    ras_points_to_lps,
    tensor_to_image,
    voxel_to_normalized,
)
from SpineRigidRegLib.warp import identity_grid, warp


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation matrix (proper, det +1)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def oblique_image(size_itk=(9, 7, 5), spacing=(0.7, 1.3, 2.1), pixel=sitk.sitkFloat32) -> sitk.Image:
    """A small image with an oblique direction, anisotropic spacing and a non-zero origin, filled with ramps."""
    image = sitk.Image(size_itk, pixel)
    image.SetSpacing(spacing)
    image.SetOrigin((-12.5, 40.25, 7.0))
    image.SetDirection(tuple(rotation([1.0, 2.0, -0.5], 0.6).ravel()))
    k, j, i = np.meshgrid(*[np.arange(n) for n in size_itk[::-1]], indexing="ij")
    array = (1.0 * i + 10.0 * j + 100.0 * k).astype(sitk.GetArrayViewFromImage(image).dtype)
    filled = sitk.GetImageFromArray(array)
    filled.CopyInformation(image)
    return filled


def test_lps_ras_conversion_flips_the_first_two_axes_and_is_an_involution():
    points = np.array([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0], [-4.5, 6.25, -7.0]])
    ras = lps_points_to_ras(points)
    np.testing.assert_array_equal(ras, points * np.array([-1.0, -1.0, 1.0]))
    np.testing.assert_array_equal(ras_points_to_lps(ras), points)
    np.testing.assert_array_equal(lps_to_ras_matrix() @ lps_to_ras_matrix(), np.eye(4))
    np.testing.assert_array_equal(apply_matrix(lps_to_ras_matrix(), points), ras)


def test_index_to_lps_matches_simpleitk_on_an_oblique_grid():
    image = oblique_image()
    geometry = Geometry.of(image)
    assert geometry.shape == (5, 7, 9)
    indices_itk = np.array([[0, 0, 0], [8, 6, 4], [3, 1, 2], [5, 0, 4]])
    expected = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in idx]) for idx in indices_itk])
    np.testing.assert_allclose(apply_matrix(geometry.index_to_lps(), indices_itk), expected, atol=1e-9)
    # array order (k, j, i) gives the same points
    np.testing.assert_allclose(geometry.array_index_to_lps_points(indices_itk[:, ::-1]), expected, atol=1e-9)
    # continuous indices too, and the inverse
    continuous = np.array([[0.25, 3.5, 1.75], [7.9, 0.1, 3.3]])
    expected_c = np.array([image.TransformContinuousIndexToPhysicalPoint(list(c)) for c in continuous])
    np.testing.assert_allclose(geometry.array_index_to_lps_points(continuous[:, ::-1]), expected_c, atol=1e-9)
    np.testing.assert_allclose(geometry.lps_to_array_index(expected_c), continuous[:, ::-1], atol=1e-9)


def test_ijk_to_ras_is_the_lps_matrix_with_flipped_rows_and_round_trips():
    geometry = Geometry.of(oblique_image())
    ijk_to_ras = geometry.ijk_to_ras()
    np.testing.assert_allclose(ijk_to_ras, np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.index_to_lps(), atol=0)
    rebuilt = Geometry.from_ijk_to_ras(geometry.shape, ijk_to_ras)
    assert rebuilt.same_grid(geometry, tol_mm=1e-9)
    np.testing.assert_allclose(rebuilt.spacing, geometry.spacing, atol=1e-12)
    np.testing.assert_allclose(rebuilt.direction, geometry.direction, atol=1e-12)
    np.testing.assert_allclose(rebuilt.origin, geometry.origin, atol=1e-12)


def test_image_tensor_round_trip_keeps_values_axis_order_and_geometry():
    image = oblique_image()
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 1, 5, 7, 9) and tensor.dtype == torch.float32
    # tensor[..., k, j, i] is the pixel at ITK index (i, j, k)
    assert float(tensor[0, 0, 4, 2, 7]) == image.GetPixel(7, 2, 4) == 7 + 20 + 400
    back = tensor_to_image(tensor, Geometry.of(image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetDirection() == image.GetDirection()
    label_image = oblique_image(pixel=sitk.sitkUInt16)
    labels = image_to_tensor(label_image, dtype=torch.int64)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(labels[0, 0].numpy(), sitk.GetArrayFromImage(label_image))


def test_a_voxel_step_along_each_array_axis_is_that_axis_direction_times_its_spacing():
    geometry = Geometry.of(oblique_image())
    direction = geometry.direction_matrix
    for channel, itk_axis in enumerate((2, 1, 0)):
        field = torch.zeros(1, 3, *geometry.shape, dtype=torch.float64)
        field[:, channel] = 1.0
        lps = displacement_to_lps(field, geometry)[0, :, 0, 0, 0].numpy()
        np.testing.assert_allclose(lps, direction[:, itk_axis] * geometry.spacing[itk_axis], atol=1e-12)


def test_displacement_voxel_lps_conversions_are_inverse():
    geometry = Geometry.of(oblique_image())
    field = torch.randn(2, 3, *geometry.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(displacement_from_lps(displacement_to_lps(field, geometry), geometry), field)
    torch.testing.assert_close(displacement_to_lps(displacement_from_lps(field, geometry), geometry), field)
    image = displacement_field_image(field[:1], geometry)
    assert image.GetPixelID() == sitk.sitkVectorFloat64 and image.GetNumberOfComponentsPerPixel() == 3
    back, back_geometry = displacement_from_field_image(image)
    assert back_geometry == geometry
    torch.testing.assert_close(back, field[:1].float(), rtol=0, atol=1e-6)


def test_displacement_field_transform_resampling_matches_warp_on_an_oblique_anisotropic_grid():
    image = oblique_image(size_itk=(11, 9, 8), spacing=(0.6, 1.1, 1.9))
    geometry = Geometry.of(image)
    gen = torch.Generator().manual_seed(3)
    moving = torch.nn.functional.interpolate(
        torch.rand(1, 1, 4, 4, 4, generator=gen, dtype=torch.float64), size=geometry.shape, mode="trilinear"
    )
    field = 1.5 * (2 * torch.rand(1, 3, *geometry.shape, generator=gen, dtype=torch.float64) - 1)
    moving_image = tensor_to_image(moving, geometry)
    transform = sitk.DisplacementFieldTransform(displacement_field_image(field, geometry))
    resampled = sitk.Resample(moving_image, moving_image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    expected = torch.from_numpy(sitk.GetArrayFromImage(resampled))
    warped = warp(moving, field)[0, 0]
    # compare where the sampled point lies inside the grid, where both interpolate linearly without padding
    target = identity_grid(geometry.shape, dtype=torch.float64) + field
    upper = torch.tensor(geometry.shape, dtype=torch.float64).view(1, 3, 1, 1, 1) - 1
    inside = ((target >= 0) & (target <= upper)).all(dim=1)[0]
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(warped[inside], expected[inside], rtol=0, atol=1e-9)


def test_voxel_to_normalized_puts_corner_voxel_centres_at_minus_and_plus_one_in_xyz_order():
    shape = (3, 5, 9)
    normalized = voxel_to_normalized(identity_grid(shape, dtype=torch.float64))
    assert normalized.shape == (1, *shape, 3)
    torch.testing.assert_close(normalized[0, 0, 0, 0], torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(normalized[0, 2, 4, 8], torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    # last axis is grid_sample's (x, y, z) = (i, j, k): moving one voxel along i changes x by 2 / (9 - 1)
    torch.testing.assert_close(normalized[0, 0, 0, 1], torch.tensor([-0.75, -1.0, -1.0], dtype=torch.float64))
    # coordinates on a coarser grid may index a larger volume
    big = voxel_to_normalized(identity_grid((2, 2, 2), dtype=torch.float64), sizes=(5, 5, 5))
    torch.testing.assert_close(big[0, 1, 1, 1], torch.tensor([-0.5, -0.5, -0.5], dtype=torch.float64))


def test_geometry_rejects_unusable_grids():
    with pytest.raises(InputError, match="spacing"):
        Geometry(shape=(2, 2, 2), spacing=(1.0, 0.0, 1.0), origin=(0, 0, 0), direction=tuple(np.eye(3).ravel()))
    with pytest.raises(InputError, match="direction"):
        Geometry(shape=(2, 2, 2), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), direction=(1.0,) * 9)
    with pytest.raises(InputError, match="three positive sizes"):
        Geometry(shape=(2, 0, 2), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), direction=tuple(np.eye(3).ravel()))
    with pytest.raises(InputError, match="does not match the grid"):
        tensor_to_image(torch.zeros(1, 1, 2, 3, 4), Geometry.of(oblique_image()))


GRID = Geometry(shape=(4, 5, 6), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
NAN = float("nan")
EYE9 = tuple(np.eye(3).ravel())


def _nan_field() -> torch.Tensor:
    field = torch.zeros(1, 3, 4, 5, 6)
    field[0, 1, 2, 3, 4] = NAN
    return field


BAD_INPUTS = [
    ("nan origin", lambda: Geometry((4, 5, 6), (1.0,) * 3, (NAN, 0.0, 0.0), EYE9), InputError, "origin"),
    ("2 origin values", lambda: Geometry((4, 5, 6), (1.0,) * 3, (0.0, 0.0), EYE9), InputError, "origin"),
    ("nan direction", lambda: Geometry((4, 5, 6), (1.0,) * 3, (0.0,) * 3, (NAN,) * 9), InputError, "direction"),
    ("fractional size", lambda: Geometry((4.5, 5, 6), (1.0,) * 3, (0.0,) * 3, EYE9), InputError, "sizes"),
    ("of an array", lambda: Geometry.of(np.zeros((3, 3, 3))), TypeError, "SimpleITK.Image"),
    ("of a 2D image", lambda: Geometry.of(sitk.Image(3, 3, sitk.sitkFloat32)), InputError, "3D image"),
    ("3x3 index matrix", lambda: Geometry.from_index_to_lps((4, 5, 6), np.eye(3)), InputError, "4x4"),
    ("nan index matrix", lambda: Geometry.from_index_to_lps((4, 5, 6), np.full((4, 4), NAN)), InputError, "NaN"),
    ("3x3 ijk-to-ras", lambda: Geometry.from_ijk_to_ras((4, 5, 6), np.eye(3)), InputError, "4x4"),
    ("(N, 2) points", lambda: GRID.lps_to_array_index(np.zeros((3, 2))), InputError, r"\(N, 3\)"),
    ("nan points", lambda: GRID.array_index_to_lps_points(np.full((2, 3), NAN)), InputError, "NaN"),
    ("text points", lambda: apply_matrix(np.eye(4), "abc"), TypeError, "points must be numbers"),
    ("3x3 matrix", lambda: apply_matrix(np.eye(3), np.zeros((2, 3))), InputError, "4x4"),
    ("(N, 2) ras points", lambda: lps_points_to_ras(np.zeros((3, 2))), InputError, r"\(N, 3\)"),
    ("nan ras points", lambda: ras_points_to_lps(np.full((1, 3), NAN)), InputError, "NaN"),
    ("tensor from array", lambda: image_to_tensor(np.zeros((3, 3, 3))), TypeError, "SimpleITK.Image"),
    (
        "tensor from vector image",
        lambda: image_to_tensor(sitk.Image([3, 3, 3], sitk.sitkVectorFloat32, 3)),
        InputError,
        "component",
    ),
    ("image of a batch", lambda: tensor_to_image(torch.zeros(2, 1, 4, 5, 6), GRID), InputError, r"\(1, 1, D, H, W\)"),
    ("image of 2D", lambda: tensor_to_image(torch.zeros(5, 6), GRID), InputError, r"\(D, H, W\)"),
    ("image on a non-geometry", lambda: tensor_to_image(torch.zeros(4, 5, 6), "grid"), TypeError, "Geometry"),
    ("normalise 4-D coords", lambda: voxel_to_normalized(torch.zeros(3, 4, 5, 6)), InputError, "5-D"),
    ("normalise 2 channels", lambda: voxel_to_normalized(torch.zeros(1, 2, 4, 5, 6)), InputError, "3 channel"),
    (
        "normalise int coords",
        lambda: voxel_to_normalized(torch.zeros(1, 3, 4, 5, 6, dtype=torch.long)),
        TypeError,
        "floating",
    ),
    ("to lps 4-D", lambda: displacement_to_lps(torch.zeros(3, 4, 5, 6), GRID), InputError, "5-D"),
    (
        "to lps int",
        lambda: displacement_to_lps(torch.zeros(1, 3, 4, 5, 6, dtype=torch.int32), GRID),
        TypeError,
        "floating",
    ),
    ("to lps nan", lambda: displacement_to_lps(_nan_field(), GRID), InputError, "NaN"),
    ("to lps other grid", lambda: displacement_to_lps(torch.zeros(1, 3, 4, 5, 7), GRID), InputError, "grid"),
    ("from lps 2 channels", lambda: displacement_from_lps(torch.zeros(1, 2, 4, 5, 6), GRID), InputError, "3 channel"),
    (
        "field image of numpy",
        lambda: displacement_field_image(np.zeros((1, 3, 4, 5, 6)), GRID),
        TypeError,
        "torch.Tensor",
    ),
    ("field image nan", lambda: displacement_field_image(_nan_field(), GRID), InputError, "NaN"),
    (
        "field image batch 2",
        lambda: displacement_field_image(torch.zeros(2, 3, 4, 5, 6), GRID),
        InputError,
        r"\(1, 3, D, H, W\)",
    ),
    (
        "field from scalar image",
        lambda: displacement_from_field_image(GRID.reference_image()),
        InputError,
        "3 component",
    ),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_a_named_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
