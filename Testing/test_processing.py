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


def _phantom_inputs():
    from SpineRigidRegLib.data.phantom import make_phantom
    from SpineRigidRegLib.prealign import Prealignment

    phantom = make_phantom(num_vertebrae=2, shape=(40, 32, 32), seed=3)
    ct = sitk.Cast(phantom.ct, sitk.sitkFloat32)
    mr = sitk.InvertIntensity(ct, maximum=1500.0)
    pre = Prealignment(matrix=np.eye(4), method="test")
    grid = Geometry.of(ct)
    return mr, ct, phantom.labels, pre, grid


def _pairs_equal(a: ProcessingPair, b: ProcessingPair) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("fixed", "moving", "moving_labels", "fixed_mask"))


def test_a_rerun_on_the_same_images_gets_a_copy_of_the_kept_pair_with_its_own_point_pairs(monkeypatch):
    """A manual correction re-runs on the same images with other point pairs: the pair resampled for the first run
    is kept and copied (nothing resampled), its point pairs are the new ones, changing the copy does not change what
    the next run gets, and another image, pre-alignment or a forgotten pair resamples again."""
    from SpineRigidRegLib import processing
    from SpineRigidRegLib.prealign import Prealignment

    mr, ct, labels, pre, grid = _phantom_inputs()
    processing.forget_kept_pair()
    first = processing.to_processing_grid(mr, ct, labels, pre, grid)
    reference = first.copy()
    resampled = []
    inner = processing.resample_to_reference
    monkeypatch.setattr(processing, "resample_to_reference", lambda *a, **k: resampled.append(1) or inner(*a, **k))
    point = np.asarray(ct.TransformIndexToPhysicalPoint((10, 12, 14)), dtype=float)
    again = processing.to_processing_grid(sitk.Image(mr), ct, labels, pre, grid, point_pairs=[(point, point)])
    assert not resampled and _pairs_equal(first, again) and first.point_pairs is None
    assert np.allclose(again.point_pairs[0].numpy(), [[14, 12, 10]]) and np.allclose(
        again.point_pairs[1].numpy(), [[14, 12, 10]]
    )
    again.fixed.add_(1.0)  # a later stage writing into its pair
    assert _pairs_equal(reference, processing.to_processing_grid(mr, ct, labels, pre, grid)) and not resampled
    changed = sitk.Image(mr)
    changed[5, 5, 5] = 0.0
    processing.to_processing_grid(changed, ct, labels, pre, grid)
    assert len(resampled) == 3  # the MR, the CT and its labels
    shifted = Prealignment(matrix=np.eye(4) + np.pad(np.eye(3)[:, :1] * 0.5, ((0, 1), (3, 0))), method="test")
    resampled.clear()
    assert not _pairs_equal(processing.to_processing_grid(changed, ct, labels, shifted, grid), reference)
    assert len(resampled) == 3
    processing.forget_kept_pair()
    resampled.clear()
    processing.to_processing_grid(changed, ct, labels, shifted, grid)
    assert len(resampled) == 3
