"""The Staring baseline (elastix B-spline + rigidity penalty): parameter map, rigidity image, field convention."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SpineRigidRegLib.baselines import elastix
from SpineRigidRegLib.baselines.elastix import ElastixSettings, parameter_map, rigidity_image
from SpineRigidRegLib.data.phantom import make_phantom
from SpineRigidRegLib.data.synthesis import SynthesisSettings, mr_contrast
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import Geometry, image_to_tensor, tensor_to_image
from SpineRigidRegLib.preprocess import field_of_view
from SpineRigidRegLib.warp import warp

#: Checked without importing itk (slow) at collection time.
HAS_ELASTIX = importlib.util.find_spec("itk") is not None
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def test_parameter_map_with_penalty_follows_par0004_weights():
    pm = parameter_map(ElastixSettings(iterations=(10, 20, 30), rigidity_weight=0.1), "/tmp/rigidity.mha")
    assert pm["Metric"] == ["AdvancedMattesMutualInformation", "TransformRigidityPenalty"]
    assert pm["Registration"] == ["MultiMetricMultiResolutionRegistration"]
    assert pm["MaximumNumberOfIterations"] == ["10", "20", "30"]
    assert pm["Metric1Weight"] == ["0.1"] * 3
    assert [
        pm[k][0] for k in ("LinearityConditionWeight", "OrthonormalityConditionWeight", "PropernessConditionWeight")
    ] == ["100.0", "1.0", "2.0"]
    assert pm["MovingRigidityImageName"] == ["/tmp/rigidity.mha"]
    assert pm["UseMovingRigidityImage"] == ["true"] and pm["UseFixedRigidityImage"] == ["false"]
    assert pm["FinalGridSpacingInPhysicalUnits"] == ["8.0"]
    # Coarse-to-fine: pyramid factors 4, 2, 1 for every axis.
    assert pm["ImagePyramidSchedule"] == ["4"] * 3 + ["2"] * 3 + ["1"] * 3


def test_parameter_map_without_penalty_has_no_rigidity_entries():
    pm = parameter_map(ElastixSettings(rigidity_penalty=False, resolutions=2))
    assert pm["Metric"] == ["AdvancedMattesMutualInformation"]
    assert not any("Rigidity" in key or key == "Metric1Weight" for key in pm)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iterations": 0},
        {"iterations": (5, 5)},
        {"resolutions": 0},
        {"rigidity_weight": -1.0},
        {"metric": "MeanSquares"},
        {"threads": 0},
        {"grid_spacing_mm": 0.0},
    ],
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(InputError):
        ElastixSettings(**kwargs)


def test_penalty_needs_a_rigidity_image():
    with pytest.raises(InputError, match="rigidity image"):
        parameter_map(ElastixSettings(rigidity_penalty=True))


def test_rigidity_image_marks_every_vertebra_on_the_moving_grid():
    phantom = make_phantom(num_vertebrae=3, shape=(40, 32, 32), seed=0)
    # Labels on a coarser grid than the CT: the rigidity image must come back on the CT grid.
    coarse = sitk.Resample(
        phantom.labels,
        [16, 16, 20],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        phantom.labels.GetOrigin(),
        [2.0, 2.0, 2.0],
        phantom.labels.GetDirection(),
        0,
    )
    image = rigidity_image(coarse, phantom.ct)
    assert Geometry.of(image).same_grid(Geometry.of(phantom.ct))
    values = np.unique(sitk.GetArrayViewFromImage(image))
    assert set(values.tolist()) == {0.0, 1.0}
    same = rigidity_image(phantom.labels)
    assert np.array_equal(sitk.GetArrayViewFromImage(same) > 0, sitk.GetArrayViewFromImage(phantom.labels) > 0)


def test_empty_label_map_is_rejected():
    empty = sitk.Image([8, 8, 8], sitk.sitkUInt8)
    with pytest.raises(InputError, match="empty"):
        rigidity_image(empty)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ELASTIX, reason="itk-elastix is not installed (pip install spinerigidreg[baseline])")
def test_known_shift_is_recovered_with_the_right_sign_on_a_ras_grid():
    """Fixed = MR-like contrast of the CT moved by a known constant pull-back shift (2 voxels along i, 1 along k) on a
    RAS-oriented grid: the field must point the same way and shrink the error (with and without the penalty; with the
    penalty through a moving mask)."""
    phantom = make_phantom(num_vertebrae=3, shape=(40, 36, 36), seed=3, direction=RAS, curvature_deg=10.0)
    geometry = Geometry.of(phantom.ct)
    ct = image_to_tensor(phantom.ct)
    tissues = image_to_tensor(phantom.tissues, torch.int64)
    settings = SynthesisSettings(slice_thickness_mm=0.0, bias_strength=0.0, noise_std=(0.005, 0.005))
    clean = mr_contrast(ct, tissues=tissues, settings=settings, generator=torch.Generator().manual_seed(1))
    shift = torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1, 1)
    truth = shift.expand(1, 3, *geometry.shape).contiguous()
    fixed = tensor_to_image(warp(clean, truth), geometry)
    inside = image_to_tensor(phantom.labels, torch.int64) > 0
    for penalty in (False, True):
        result = elastix.register_elastix(
            fixed,
            phantom.ct,
            phantom.labels,
            ElastixSettings(rigidity_penalty=penalty, iterations=60, resolutions=2, threads=1, spatial_samples=2000),
            moving_mask=field_of_view(phantom.ct, phantom.ct) if penalty else None,  # a CT field-of-view mask
        )
        u = result.displacement
        assert u.shape == truth.shape
        assert result.runtime_s > 0
        mean = torch.stack([u[0, c][inside[0, 0]].mean() for c in range(3)])
        assert float(mean[2]) > 1.0, f"penalty={penalty}: i-shift {float(mean[2]):.2f} should be about +2"
        assert float(mean[0]) > 0.3, f"penalty={penalty}: k-shift {float(mean[0]):.2f} should be about +1"
        error = (u - truth).norm(dim=1)[inside[:, 0]].mean()
        assert float(error) < 0.6 * float(shift.norm()), f"penalty={penalty}: error {float(error):.2f} voxels"
