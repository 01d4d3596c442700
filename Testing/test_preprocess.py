"""Preprocessing: resampling keeps physical placement, robust [0, 1] normalisation, crop/pad with an exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import Geometry, image_to_tensor, tensor_to_image
from SpineRigidRegLib.preprocess import (
    CropPad,
    crop_around,
    isotropic_geometry,
    normalize_intensity,
    pad_to_multiple,
    quantiles,
    resample_isotropic,
    resample_to_reference,
)

DIRECTION = (0.0, -1.0, 0.0, 0.6, 0.0, -0.8, 0.8, 0.0, 0.6)  # a rotation


def ramp_image(size_itk=(19, 14, 8), spacing=(0.5, 0.8, 2.0), origin=(-10.0, 22.5, 3.0)) -> sitk.Image:
    """An oblique anisotropic image whose value is a linear function of the LPS position."""
    geometry = Geometry(shape=tuple(size_itk[::-1]), spacing=spacing, origin=origin, direction=DIRECTION)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in geometry.shape], indexing="ij")
    lps = geometry.array_index_to_lps_points(np.stack([k.ravel(), j.ravel(), i.ravel()], axis=1))
    values = (lps @ np.array([0.3, -0.2, 0.5]) + 7.0).reshape(geometry.shape)
    return tensor_to_image(values, geometry)


def test_resampling_to_1mm_keeps_origin_direction_and_extent():
    image = ramp_image()
    out = resample_isotropic(image)
    assert out.GetSpacing() == (1.0, 1.0, 1.0)
    assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
    # extent (n - 1) * spacing = (9, 10.4, 14) mm -> the largest 1 mm grid inside it: 10, 11, 15 voxels
    assert out.GetSize() == (10, 11, 15)
    source, target = Geometry.of(image), Geometry.of(out)
    source_far, target_far = source.corners_lps()[-1], target.corners_lps()[-1]
    gap = np.abs(np.linalg.solve(source.direction_matrix, source_far - target_far))
    assert np.all(gap < 1.0 + 1e-9)  # within one new voxel of the original far corner, never beyond it
    assert out.GetPixelID() == sitk.sitkFloat32
    # linear interpolation of a linear function of position is exact: the values follow the points
    lps = target.array_index_to_lps_points(np.argwhere(np.ones(target.shape, dtype=bool)).astype(np.float64))
    expected = (lps @ np.array([0.3, -0.2, 0.5]) + 7.0).reshape(target.shape)
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), expected, rtol=0, atol=1e-4)


def test_resampling_labels_is_nearest_and_keeps_the_pixel_type():
    image = ramp_image()
    labels = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 7).astype(np.uint16) * 305)
    labels.CopyInformation(image)
    out = resample_isotropic(labels, spacing=1.5, is_label=True)
    assert out.GetPixelID() == sitk.sitkUInt16 and out.GetSpacing() == (1.5, 1.5, 1.5)
    assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) == {0, 305}
    # a geometry reference works as well as an image reference, and the identity grid is a no-op
    same = resample_to_reference(image, Geometry.of(image))
    np.testing.assert_allclose(sitk.GetArrayFromImage(same), sitk.GetArrayFromImage(image), rtol=0, atol=1e-4)


def test_isotropic_geometry_rejects_bad_spacing():
    with pytest.raises(InputError, match="spacing must be a positive finite number"):
        isotropic_geometry(Geometry.of(ramp_image()), 0.0)


def test_normalisation_maps_the_robust_range_to_0_1_and_ignores_outliers():
    gen = torch.Generator().manual_seed(0)
    volume = 200.0 * torch.rand(2, 1, 12, 12, 12, generator=gen, dtype=torch.float64) - 1000.0
    volume[1] = volume[1] * 3 + 500
    volume[0, 0, 0, 0, 0] = 1e6  # a single wild voxel must not squash the rest
    volume[0, 0, 0, 0, 1] = -1e6
    out = normalize_intensity(volume)
    assert out.dtype == torch.float32 and out.shape == volume.shape
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    for b in range(2):
        assert 0.45 < float(out[b].median()) < 0.55  # uniform data keeps its middle in the middle
        assert float((out[b] == 0).float().mean()) < 0.01 and float((out[b] == 1).float().mean()) < 0.01
    flat_v, flat_o = volume[1].flatten(), out[1].flatten().double()
    order = torch.argsort(flat_v)
    assert bool((flat_o[order].diff() >= 0).all())  # monotone
    # an affine intensity change gives the same result (per-sample percentiles)
    torch.testing.assert_close(normalize_intensity(volume * 0.1 - 3), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [2, 3, 7, 200, 4_099, 250_001])
def test_quantiles_by_selection_equal_torch_quantile_bit_for_bit(size):
    """The selection must pick the same order statistics and interpolate as ``torch.quantile`` does: an off-by-one
    rank or a different interpolation weight changes every normalised image a little."""
    gen = torch.Generator().manual_seed(size)
    for values in (torch.randn(size, generator=gen), torch.randint(-3, 4, (size,), generator=gen).float()):
        for q in ([0.005, 0.995], [0.0, 1.0], [0.37, 0.5], [0.999, 0.001]):
            q = torch.tensor(q)
            assert torch.equal(quantiles(values, q), torch.quantile(values, q))
    with_nan = torch.tensor([1.0, float("nan"), 3.0])
    assert torch.equal(quantiles(with_nan, torch.tensor([0.5])).isnan(), torch.tensor([True]))


def test_normalisation_of_flat_integer_and_masked_images():
    flat = torch.full((1, 1, 4, 4, 4), 37.0)
    assert torch.equal(normalize_intensity(flat), torch.zeros_like(flat))
    ints = torch.arange(64, dtype=torch.int16).view(1, 1, 4, 4, 4)
    out = normalize_intensity(ints, percentiles=(0.0, 100.0))
    torch.testing.assert_close(out, ints.float() / 63)
    mask = torch.zeros_like(ints, dtype=torch.bool)
    mask[..., :2, :, :] = True  # values 0..31 decide the range: everything above clips to 1
    masked = normalize_intensity(ints, mask=mask, percentiles=(0.0, 100.0))
    torch.testing.assert_close(masked[mask], ints[mask].float() / 31)
    assert torch.all(masked[~mask] == 1.0)
    with pytest.raises(InputError, match="empty"):
        normalize_intensity(ints, mask=torch.zeros_like(mask))
    with pytest.raises(InputError, match="NaN"):
        normalize_intensity(torch.tensor([float("nan")]).view(1, 1, 1, 1, 1).expand(1, 1, 2, 2, 2))


@pytest.mark.parametrize("shape", [(5, 16, 17), (16, 16, 16), (1, 30, 33)])
def test_pad_to_multiple_and_its_exact_inverse(shape):
    volume = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(1))
    padded, crop = pad_to_multiple(volume, 16, value=-5.0)
    assert all(s % 16 == 0 and s >= n for s, n in zip(padded.shape[2:], shape))
    assert all(s - n < 16 for s, n in zip(padded.shape[2:], shape))
    assert torch.equal(crop.invert(padded), volume)
    # padding is symmetric (to within a voxel) and filled with the value
    assert float((padded == -5.0).float().sum()) == padded[0, 0].numel() * 6 - volume.numel()
    for axis, (s, n) in enumerate(zip(padded.shape[2:], shape)):
        assert crop.start[axis] == -((s - n) // 2)


def test_crop_box_partly_outside_round_trips_inside_and_places_the_box_physically():
    source_shape = (10, 12, 9)
    volume = torch.arange(float(np.prod(source_shape))).view(1, 1, *source_shape)
    crop = crop_around(source_shape, (-3, 4, 2), (6, 14, 5), multiple=4)
    assert crop.shape == (12, 12, 4) and crop.start == (-4, 3, 2)
    box = crop.apply(volume, value=-1.0)
    assert box.shape == (1, 1, 12, 12, 4)
    assert float(box[0, 0, 0, 0, 0]) == -1.0  # before the grid's first slice: padding
    assert float(box[0, 0, 4, 0, 0]) == float(volume[0, 0, 0, 3, 2])  # box voxel (4, 0, 0) = source voxel start + it
    back = crop.invert(box, value=-2.0)
    covered = torch.zeros(source_shape, dtype=torch.bool)
    covered[0:8, 3:12, 2:6] = True
    assert torch.equal(back[0, 0][covered], volume[0, 0][covered])
    assert torch.all(back[0, 0][~covered] == -2.0)
    # the box's geometry puts each of its voxels where that voxel was in the source
    source = Geometry(shape=source_shape, spacing=(0.7, 1.1, 2.0), origin=(5.0, -3.0, 12.0), direction=DIRECTION)
    image = tensor_to_image(volume, source)
    box_image = tensor_to_image(box, crop.geometry(source))
    for box_index in [(4, 0, 0), (7, 8, 3), (5, 6, 1)]:  # array order
        source_index = [b + s for b, s in zip(box_index, crop.start)]
        point = box_image.TransformIndexToPhysicalPoint(box_index[::-1])
        assert np.allclose(point, image.TransformIndexToPhysicalPoint(source_index[::-1]), atol=1e-9)
        assert box_image.GetPixel(box_index[::-1]) == image.GetPixel(source_index[::-1])
    assert image_to_tensor(box_image).shape == (1, 1, 12, 12, 4)


def test_crop_pad_rejects_volumes_of_the_wrong_grid():
    crop = CropPad((4, 4, 4), (0, 0, 0), (8, 8, 8))
    with pytest.raises(InputError, match="not on the crop's grid"):
        crop.apply(torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(InputError, match="not the crop's shape"):
        crop.invert(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(InputError, match="empty"):
        crop_around((4, 4, 4), (2, 2, 2), (2, 3, 3), multiple=4)


IMAGE = sitk.Image([6, 5, 4], sitk.sitkFloat32)
GRID = Geometry.of(IMAGE)
VOLUME = torch.rand(1, 1, 4, 5, 6)
BAD_INPUTS = [
    ("resample an array", lambda: resample_to_reference(np.zeros((4, 5, 6)), GRID), TypeError, "SimpleITK.Image"),
    (
        "resample a 2D image",
        lambda: resample_to_reference(sitk.Image([3, 3], sitk.sitkFloat32), GRID),
        InputError,
        "3D",
    ),
    (
        "resample a vector image",
        lambda: resample_to_reference(sitk.Image([3, 3, 3], sitk.sitkVectorFloat32, 3), GRID),
        InputError,
        "component",
    ),
    ("resample onto text", lambda: resample_to_reference(IMAGE, "grid"), TypeError, "reference image"),
    ("resample with a matrix", lambda: resample_to_reference(IMAGE, GRID, transform=np.eye(4)), TypeError, "transform"),
    ("isotropic nan", lambda: isotropic_geometry(GRID, float("nan")), InputError, "spacing"),
    ("isotropic text", lambda: isotropic_geometry(GRID, "1"), TypeError, "spacing"),
    ("isotropic of an image", lambda: isotropic_geometry(IMAGE, 1.0), TypeError, "Geometry"),
    ("isotropic resample array", lambda: resample_isotropic(np.zeros((4, 5, 6))), TypeError, "SimpleITK.Image"),
    ("isotropic resample 0 mm", lambda: resample_isotropic(IMAGE, 0.0), InputError, "spacing"),
    ("normalise 3-D", lambda: normalize_intensity(VOLUME[0, 0]), InputError, "5-D"),
    ("normalise numpy", lambda: normalize_intensity(np.zeros((1, 1, 3, 3, 3))), TypeError, "torch.Tensor"),
    ("normalise bool", lambda: normalize_intensity(VOLUME > 0.5), TypeError, "real numbers"),
    ("normalise inf", lambda: normalize_intensity(VOLUME / 0), InputError, "NaN or infinite"),
    ("normalise float mask", lambda: normalize_intensity(VOLUME, mask=torch.ones_like(VOLUME)), TypeError, "boolean"),
    (
        "normalise mask shape",
        lambda: normalize_intensity(VOLUME, mask=torch.ones(1, 1, 4, 5, 7, dtype=torch.bool)),
        InputError,
        "differ in shape",
    ),
    (
        "normalise reversed percentiles",
        lambda: normalize_intensity(VOLUME, percentiles=(99.0, 1.0)),
        InputError,
        "percentiles",
    ),
    (
        "normalise percentile > 100",
        lambda: normalize_intensity(VOLUME, percentiles=(0.0, 101.0)),
        InputError,
        "percentiles",
    ),
    ("crop of 2 sizes", lambda: CropPad((4, 5), (0, 0), (4, 5)), InputError, "crop source shape"),
    ("crop of size 0", lambda: CropPad((4, 5, 6), (0, 0, 0), (4, 0, 6)), InputError, "crop shape"),
    ("crop fractional start", lambda: CropPad((4, 5, 6), (0.5, 0, 0), (4, 5, 6)), InputError, "start"),
    ("crop beside the grid", lambda: CropPad((4, 5, 6), (4, 0, 0), (4, 5, 6)), InputError, "misses the grid"),
    ("crop before the grid", lambda: CropPad((4, 5, 6), (0, -5, 0), (4, 5, 6)), InputError, "misses the grid"),
    ("crop a 3-D volume", lambda: CropPad((4, 5, 6), (0, 0, 0), (4, 5, 6)).apply(VOLUME[0, 0]), InputError, "5-D"),
    ("crop numpy", lambda: CropPad((4, 5, 6), (0, 0, 0), (4, 5, 6)).apply(VOLUME.numpy()), TypeError, "torch.Tensor"),
    ("uncrop a 4-D volume", lambda: CropPad((4, 5, 6), (0, 0, 0), (4, 5, 6)).invert(VOLUME[0]), InputError, "5-D"),
    (
        "crop geometry of an image",
        lambda: CropPad((4, 5, 6), (0, 0, 0), (4, 5, 6)).geometry(IMAGE),
        TypeError,
        "Geometry",
    ),
    ("crop around multiple 0", lambda: crop_around((4, 5, 6), (0, 0, 0), (4, 5, 6), 0), InputError, "multiple"),
    ("crop around 2 axes", lambda: crop_around((4, 5), (0, 0), (4, 5), 4), InputError, "source shape"),
    ("crop around 2-value box", lambda: crop_around((4, 5, 6), (0, 0), (4, 5), 4), InputError, "three values"),
    ("pad 4-D", lambda: pad_to_multiple(VOLUME[0], 4), InputError, "5-D"),
    ("pad multiple 0", lambda: pad_to_multiple(VOLUME, 0), InputError, "multiple"),
    ("pad multiple 2.5", lambda: pad_to_multiple(VOLUME, 2.5), TypeError, "multiple"),
    ("pad numpy", lambda: pad_to_multiple(VOLUME.numpy(), 4), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_a_named_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
