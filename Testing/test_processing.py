"""The pair on its processing grid (`processing.py`): where a thick-slice MR's own voxels lie on it, which vertebrae
its point pairs lie on."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from SpineRigidRegLib.geometry import Geometry
from SpineRigidRegLib.processing import ProcessingPair, slice_profile, vertebrae_at_points


def _mr_grid(spacing, direction=None) -> Geometry:
    image = sitk.Image([30, 40, 12], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin((12.3, -40.1, 7.7))
    if direction is not None:
        image.SetDirection(direction)
    return Geometry.of(image)


def _processing_grid(mr: Geometry) -> Geometry:
    return Geometry(shape=(64, 48, 40), spacing=(1.0, 1.0, 1.0), origin=(-3.0, -55.0, -2.0), direction=mr.direction)


def test_an_isotropic_mr_has_no_slice_profile():
    mr = _mr_grid((3.0, 3.0, 3.0))
    assert slice_profile(mr, _processing_grid(mr)) is None


def test_the_profile_finds_the_mr_voxel_centres_and_slice_normal_on_an_oblique_grid():
    direction = sitk.VersorTransform((0.2, 1.0, -0.4), 0.3).GetMatrix()
    mr = _mr_grid((0.7, 0.7, 3.6), direction)  # slices along the MR's k axis: array axis 0
    grid = _processing_grid(mr)
    profile = slice_profile(mr, grid)
    assert profile.axis == 0
    assert np.allclose(profile.step, (3.6, 0.7, 0.7))
    for index in ([0, 0, 0], [5, 17, 3], [29, 39, 11]):  # MR voxels (i, j, k): on the profile's lattice
        lps = mr.array_index_to_lps_points(np.array([index[::-1]], dtype=float))
        on_grid = grid.lps_to_array_index(lps)[0]
        lattice = (on_grid - np.asarray(profile.centre)) / np.asarray(profile.step)
        assert np.allclose(lattice, np.round(lattice), atol=1e-6)
    assert np.isclose(np.mean(profile.taps), 0.0) and max(profile.taps) - min(profile.taps) < 3.6
    assert len(profile.taps) == 4  # about one per processing voxel across the slice


def test_the_profile_travels_with_the_pair():
    mr = _mr_grid((0.8, 0.8, 4.0))
    profile = slice_profile(mr, _processing_grid(mr))
    volume = torch.zeros((1, 1, 4, 4, 4))
    pair = ProcessingPair(volume, volume, volume.long(), (1.0, 1.0, 1.0), fixed_slices=profile)
    assert pair.to("cpu").fixed_slices == profile


def test_point_pairs_name_the_vertebra_their_ct_point_lies_on_or_next_to():
    labels = torch.zeros(1, 1, 40, 20, 20, dtype=torch.int64)
    labels[..., 2:12, 5:15, 5:15] = 20
    labels[..., 16:26, 5:15, 5:15] = 21
    labels[..., 30:38, 5:15, 5:15] = 22
    image = torch.zeros(1, 1, 40, 20, 20)

    def pointed(*ct_points, spacing=(1.0, 1.0, 1.0)):
        targets = torch.tensor(ct_points, dtype=torch.float32)
        return vertebrae_at_points(ProcessingPair(image, image, labels, spacing, point_pairs=(targets * 0, targets)))

    assert pointed([20.0, 10.0, 10.0]) == [21]  # inside
    assert pointed([12.5, 10.0, 10.0]) == [20]  # 1.5 mm beyond its surface (points sit on the bone's edge)
    assert pointed([14.5, 10.0, 10.0]) == [21]  # nearer the next one
    assert pointed([14.0, 10.0, 10.0], spacing=(2.0, 1.0, 1.0)) == []  # 4 and 6 mm away at 2 mm slices
    assert pointed([20.0, 10.0, 10.0], [34.0, 9.0, 9.0], [21.0, 8.0, 8.0]) == [21, 22]
    assert pointed([20.0, 1.0, 1.0]) == []  # soft tissue, 4 mm from any vertebra
    assert pointed([-30.0, 10.0, 10.0]) == []  # outside the grid
    assert vertebrae_at_points(ProcessingPair(image, image, labels, (1.0, 1.0, 1.0))) == []
