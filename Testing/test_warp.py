"""Warping, scaling and squaring, composition and label warping: analytic properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from SpineRigidRegLib import warp as warp_module
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.warp import (
    SpatialTransformer,
    VelocityIntegrator,
    compose,
    displacement_from_velocity,
    forget_maps,
    identity_grid,
    integrate_velocity,
    map_of_velocity,
    present_labels,
    resize_displacement,
    sample_at,
    warp,
    warp_labels,
)


def smooth_field(shape, amplitude, seed=0, dtype=torch.float64, batch=1):
    gen = torch.Generator().manual_seed(seed)
    coarse = amplitude * torch.randn(batch, 3, 3, 3, 3, generator=gen, dtype=dtype)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def linear_field(shape, matrix, centre=None, dtype=torch.float64):
    """``u(x) = A (x - c)`` in voxels, ``A`` a 3x3 matrix acting on array-order coordinates."""
    grid = identity_grid(shape, dtype=dtype)
    centre = torch.tensor([(s - 1) / 2 for s in shape] if centre is None else centre, dtype=dtype)
    a = torch.as_tensor(matrix, dtype=dtype)
    return torch.einsum("ca,badhw->bcdhw", a, grid - centre.view(1, 3, 1, 1, 1))


def rotation_about(axis, angle):
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return k * angle, np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


@pytest.mark.parametrize("shape", [(5, 7, 9), (8, 8, 8), (1, 6, 5)])
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_warp_returns_the_volume(shape, batch):
    gen = torch.Generator().manual_seed(0)
    volume64 = torch.rand(batch, 2, *shape, generator=gen, dtype=torch.float64)
    zero64 = torch.zeros(batch, 3, *shape, dtype=torch.float64)
    # exact up to the rounding of grid_sample's normalised coordinates
    torch.testing.assert_close(warp(volume64, zero64), volume64, rtol=0, atol=1e-12)
    torch.testing.assert_close(warp(volume64.float(), zero64.float()), volume64.float(), rtol=0, atol=2e-6)
    torch.testing.assert_close(warp(volume64.float(), zero64.float(), mode="nearest"), volume64.float(), rtol=0, atol=0)


def test_constant_velocity_integrates_to_that_translation():
    shape = (6, 7, 8)
    shift = torch.tensor([1.25, -0.5, 2.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    velocity = shift.expand(1, 3, *shape).clone()
    for steps in (0, 1, 7):
        torch.testing.assert_close(integrate_velocity(velocity, steps), velocity, rtol=0, atol=1e-12)
    torch.testing.assert_close(VelocityIntegrator()(velocity.float()), velocity.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 0), (0, 0, 3), (1, -1, 2)])
def test_integer_shift_matches_np_roll_in_the_interior(shift):
    shape = (8, 9, 10)
    volume = np.random.default_rng(1).random(shape)
    field = torch.tensor(shift, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    warped = warp(torch.from_numpy(volume)[None, None], field)[0, 0].numpy()
    # out[x] = volume[x + s]  <=>  np.roll by -s; compare where x + s stays on the grid
    expected = np.roll(volume, [-s for s in shift], axis=(0, 1, 2))
    interior = tuple(slice(max(-s, 0), n - max(s, 0)) for s, n in zip(shift, shape))
    np.testing.assert_allclose(warped[interior], expected[interior], rtol=0, atol=1e-12)
    # outside the grid the default padding is zero
    outside = np.ones(shape, dtype=bool)
    outside[interior] = False
    assert np.all(warped[outside] == 0.0)


def test_compose_matches_sequential_warping_exactly_for_linear_images_and_fields():
    shape = (12, 11, 13)
    outer = linear_field(shape, [[0.05, 0.02, 0.0], [-0.03, 0.04, 0.01], [0.0, 0.02, -0.05]])
    inner = linear_field(shape, [[-0.04, 0.0, 0.03], [0.02, 0.03, 0.0], [0.01, -0.02, 0.04]]) + 0.3
    grid = identity_grid(shape, dtype=torch.float64)
    image = (0.5 * grid[:, 0:1] - 1.5 * grid[:, 1:2] + 2.0 * grid[:, 2:3]) + 3.0  # trilinear interpolates exactly
    sequential = warp(warp(image, outer), inner)
    composed = warp(image, compose(outer, inner))
    # compare where every sample of both routes is exact: phi and x + inner(x) on the grid, and every grid
    # neighbour of x + inner(x) sampled the image on the grid in the first warp (no zero padding)
    upper = torch.tensor(shape, dtype=torch.float64).view(1, 3, 1, 1, 1) - 1

    def on_grid(points):
        return ((points >= 0) & (points <= upper)).all(dim=1, keepdim=True).double()

    phi = grid + compose(outer, inner)
    first_ok = on_grid(grid + outer)
    inside = (on_grid(phi) * on_grid(grid + inner) * (warp(first_ok, inner) > 1 - 1e-9)).bool()
    assert inside.double().mean() > 0.3
    torch.testing.assert_close(sequential[inside], composed[inside], rtol=0, atol=1e-10)
    analytic = image + 0.5 * (phi - grid)[:, 0:1] - 1.5 * (phi - grid)[:, 1:2] + 2.0 * (phi - grid)[:, 2:3]
    torch.testing.assert_close(composed[inside], analytic[inside], rtol=0, atol=1e-10)


def test_compose_matches_sequential_warping_for_smooth_fields():
    shape = (16, 16, 16)
    outer, inner = smooth_field(shape, 1.5, seed=1), smooth_field(shape, 1.5, seed=2)
    grid = identity_grid(shape, dtype=torch.float64)

    def image_at(p):  # a smooth analytic image, so that interpolation errors stay small and known
        return torch.sin(0.3 * p[:, 0:1]) * torch.cos(0.25 * p[:, 1:2]) + 0.5 * torch.sin(0.2 * p[:, 2:3])

    image = image_at(grid)
    sequential = warp(warp(image, outer), inner)
    composed = warp(image, compose(outer, inner))
    analytic = image_at(grid + compose(outer, inner))
    swapped = warp(image, compose(inner, outer))
    core = (slice(None), slice(None), *[slice(3, -3)] * 3)
    # both routes differ from the analytic answer and from each other only by trilinear interpolation error
    # (~0.02 for these frequencies), ten times less than composing in the wrong order
    assert float((composed - analytic)[core].abs().max()) < 0.03
    assert float((sequential - composed)[core].abs().max()) < 0.05
    assert float((swapped - sequential)[core].abs().max()) > 0.15
    zero = torch.zeros_like(outer)
    torch.testing.assert_close(compose(outer, zero), outer, rtol=0, atol=1e-12)
    torch.testing.assert_close(compose(zero, inner), inner, rtol=0, atol=1e-12)


def test_warp_labels_keeps_labels_crisp_and_equals_nearest_for_integer_shifts():
    shape = (10, 12, 9)
    labels = torch.zeros(1, 1, *shape, dtype=torch.int64)
    labels[:, :, 2:5, 3:8, 2:6] = 17
    labels[:, :, 5:9, 2:6, 4:8] = 3
    labels[:, :, 6:8, 8:11, 1:4] = 250
    smooth = smooth_field(shape, 2.5, seed=5, dtype=torch.float32)
    warped = warp_labels(labels, smooth)
    assert warped.dtype == torch.int64 and warped.shape == labels.shape
    assert set(warped.unique().tolist()) <= {0, 3, 17, 250}
    assert set(warped.unique().tolist()) - {0}  # labels survive a smooth warp
    shift = torch.tensor([1.0, -2.0, 1.0]).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()
    nearest = warp(labels.float(), shift, mode="nearest").long()
    torch.testing.assert_close(warp_labels(labels, shift), nearest, rtol=0, atol=0)
    # a float label map with whole numbers is accepted, a restricted label list drops the others
    only = warp_labels(labels.float(), shift, label_values=[17])
    assert set(only.unique().tolist()) == {0, 17}
    torch.testing.assert_close(warp_labels(torch.zeros_like(labels), smooth), torch.zeros_like(labels))


def test_warp_labels_equals_the_argmax_of_every_label_warped_over_the_whole_grid():
    # warp_labels samples each label only near its box; the result must equal the plain whole-grid definition,
    # including labels at the grid's edge, a label present in one sample only, and large displacements.
    shape = (20, 18, 16)
    labels = torch.zeros(2, 1, *shape, dtype=torch.int64)
    labels[0, :, 0:5, 3:9, 0:6] = 4
    labels[:, :, 8:13, 5:12, 4:11] = 9
    labels[1, :, 14:20, 10:18, 9:16] = 31
    field = smooth_field(shape, 4.0, seed=11, dtype=torch.float32, batch=2)
    values = [4, 9, 31]
    best = warp((labels == 0).float(), field, padding_mode="border")
    reference = torch.zeros_like(labels)
    for value in values:
        weight = warp((labels == value).float(), field)
        reference = torch.where(weight > best, torch.full_like(reference, value), reference)
        best = torch.maximum(best, weight)
    assert float(field.abs().max()) > 4.0
    torch.testing.assert_close(warp_labels(labels, field), reference, rtol=0, atol=0)


def test_warp_labels_prefers_the_largest_weight_at_half_voxel_shifts():
    labels = torch.zeros(1, 1, 4, 4, 8, dtype=torch.int64)
    labels[..., 4:] = 5
    field = torch.zeros(1, 3, 4, 4, 8)
    field[:, 2] = 0.4  # voxel 3 samples 3.4 (60 % background), voxel 4 samples 4.4 (all label 5)
    out = warp_labels(labels, field)
    assert out[0, 0, 0, 0].tolist() == [0, 0, 0, 0, 5, 5, 5, 5]
    field[:, 2] = 0.6  # voxel 3 samples 3.6: 60 % label 5
    assert warp_labels(labels, field)[0, 0, 0, 0].tolist()[:5] == [0, 0, 0, 5, 5]


@pytest.mark.parametrize("shape", [(3, 5, 7), (16, 8, 4), (9, 1, 11), (13, 13, 13)])
def test_modules_accept_any_size_and_keep_no_grid_in_their_state(shape):
    transformer, integrator = SpatialTransformer(), VelocityIntegrator()
    for module in (transformer, integrator):
        assert len(module.state_dict()) == 0 and not list(module.buffers()) and not list(module.parameters())
    volume = torch.rand(2, 1, *shape)
    field = 0.3 * torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    assert transformer(volume, field).shape == volume.shape
    assert integrator(field).shape == field.shape
    for module in (transformer, integrator):
        assert len(module.state_dict()) == 0 and not list(module.buffers())


def test_scaling_and_squaring_of_a_rotation_velocity_gives_the_rotation():
    shape = (24, 24, 24)
    angle = math.radians(10.0)
    log_rotation, rotation = rotation_about([0.3, 1.0, 0.5], angle)
    velocity = linear_field(shape, log_rotation)
    displacement = integrate_velocity(velocity, steps=7)
    expected = linear_field(shape, rotation - np.eye(3))
    radius = (identity_grid(shape, dtype=torch.float64) - 11.5).norm(dim=1)[0]
    ball = radius <= 8.0
    error = (displacement - expected).norm(dim=1)[0]
    # (I + W/128)^128 - exp(W) is O(|W|^2 / 256) times the radius: well below 0.01 voxel for 10 degrees at 8 voxels
    assert float(error[ball].max()) < 2e-3  # observed 9.4e-4
    assert float(expected.norm(dim=1)[0][ball].max()) > 1.0  # the test displaces by more than a voxel
    # no folding: one step of a small linear velocity is already near the rotation
    one_step = integrate_velocity(velocity, steps=0)
    assert float((one_step - expected).norm(dim=1)[0][ball].max()) > 10 * float(error[ball].max())


def test_resize_displacement_keeps_a_translation_in_mm():
    # a half-resolution field of 1 coarse voxel along every axis is (N - 1) / (n - 1) fine voxels
    coarse = torch.ones(1, 3, 4, 5, 6)
    fine = resize_displacement(coarse, (7, 9, 11))
    torch.testing.assert_close(fine[0, :, 0, 0, 0], torch.tensor([2.0, 2.0, 2.0]))
    assert resize_displacement(coarse, (4, 5, 6)) is coarse


def _field(shape=(4, 5, 6), batch=1, dtype=torch.float32, nan=False):
    field = torch.zeros(batch, 3, *shape, dtype=dtype)
    if nan:
        field[0, 2, 1, 1, 1] = float("nan")
    return field


VOLUME = torch.zeros(1, 1, 4, 5, 6)
LABELS = torch.zeros(1, 1, 4, 5, 6, dtype=torch.int64)
BAD_INPUTS = [
    ("grid of 2 sizes", lambda: identity_grid((4, 5)), InputError, "three positive"),
    ("grid of size 0", lambda: identity_grid((4, 0, 5)), InputError, "three positive"),
    ("sample 4-D volume", lambda: sample_at(VOLUME[0], _field()), InputError, "5-D"),
    ("sample 2-channel coords", lambda: sample_at(VOLUME, _field()[:, :2]), InputError, "3 channel"),
    ("sample int volume", lambda: sample_at(VOLUME.long(), _field()), TypeError, "floating"),
    ("sample nan coords", lambda: sample_at(VOLUME, _field(nan=True)), InputError, "NaN"),
    ("sample cubic", lambda: sample_at(VOLUME, _field(), mode="cubic"), InputError, "interpolation mode"),
    ("warp 4-D volume", lambda: warp(VOLUME[0], _field()), InputError, "5-D"),
    ("warp list", lambda: warp([1.0], _field()), TypeError, "torch.Tensor"),
    ("warp int volume", lambda: warp(VOLUME.long(), _field()), TypeError, "floating"),
    ("warp int field", lambda: warp(VOLUME, _field().long()), TypeError, "floating"),
    ("warp nan field", lambda: warp(VOLUME, _field(nan=True)), InputError, "NaN"),
    ("warp 2-channel field", lambda: warp(VOLUME, _field()[:, :2]), InputError, "3 channel"),
    ("warp other grid", lambda: warp(VOLUME, _field((4, 5, 7))), InputError, "grid"),
    ("warp batch 2 vs 3", lambda: warp(VOLUME.expand(2, 1, 4, 5, 6), _field(batch=3)), InputError, "batch"),
    ("warp float64 by float32", lambda: warp(VOLUME.double(), _field()), TypeError, "dtype"),
    ("warp bad padding", lambda: warp(VOLUME, _field(), padding_mode="edge"), InputError, "padding mode"),
    ("labels negative", lambda: warp_labels(LABELS - 1, _field()), InputError, "non-negative"),
    ("labels fractional", lambda: warp_labels(VOLUME + 0.5, _field()), InputError, "integer"),
    ("labels 4-D", lambda: warp_labels(LABELS[0], _field()), InputError, "5-D"),
    ("labels nan field", lambda: warp_labels(LABELS, _field(nan=True)), InputError, "NaN"),
    ("empty labels other grid", lambda: warp_labels(LABELS, _field((4, 5, 7))), InputError, "grid"),
    ("integrate nan", lambda: integrate_velocity(_field(nan=True)), InputError, "NaN"),
    ("integrate int", lambda: integrate_velocity(_field().long()), TypeError, "floating"),
    ("integrate 4-D", lambda: integrate_velocity(_field()[0]), InputError, "5-D"),
    ("integrate 2.5 steps", lambda: integrate_velocity(_field(), 2.5), TypeError, "int"),
    ("integrate -1 steps", lambda: integrate_velocity(_field(), -1), InputError, ">= 0"),
    ("compose other grids", lambda: compose(_field(), _field((4, 5, 7))), InputError, "grid"),
    ("compose nan", lambda: compose(_field(), _field(nan=True)), InputError, "inner displacement contains NaN"),
    ("compose dtypes", lambda: compose(_field(dtype=torch.float64), _field()), TypeError, "dtype"),
    ("resize to 2 sizes", lambda: resize_displacement(_field(), (4, 5)), InputError, "target shape"),
    ("resize to size 0", lambda: resize_displacement(_field(), (4, 0, 5)), InputError, "target shape"),
    ("resize nan", lambda: resize_displacement(_field(nan=True), (8, 10, 12)), InputError, "NaN"),
]


def test_finite_check_has_no_false_alarm_when_the_fast_sum_overflows():
    huge = torch.full((1, 3, 4, 5, 6), 3e38)  # finite, but the sum the fast check starts with is infinite
    assert resize_displacement(huge, (4, 5, 6)) is huge
    huge[0, 1, 2, 3, 4] = float("inf")
    with pytest.raises(InputError, match="NaN or infinite"):
        resize_displacement(huge, (4, 5, 6))


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_a_named_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("largest", [0, 1, 20, 2**16 - 1, 2**16, 70_000])
def test_present_labels_are_the_sorted_non_zero_values_as_unique_gives_them(largest):
    """The histogram path (values below 2^16) and the sort path agree with ``torch.unique``, 0 left out."""
    generator = torch.Generator().manual_seed(largest)
    labels = torch.randint(0, 4, (1, 1, 6, 7, 8), generator=generator) * (largest // 3)
    labels.view(-1)[5] = largest
    expected = [int(v) for v in torch.unique(labels).tolist() if v > 0]
    assert present_labels(labels) == expected
    assert present_labels(labels.to(torch.int32)[0, 0]) == expected
    assert present_labels(torch.zeros(0, dtype=torch.int64)) == []


def test_map_of_a_velocity_reuses_a_recent_integration_as_a_copy_and_integrates_any_other(monkeypatch):
    forget_maps()
    torch.manual_seed(0)
    velocity = torch.randn(1, 3, 6, 7, 8) * 0.5
    other = velocity.clone()
    other[0, 0, 3, 3, 3] += 0.1
    expected = integrate_velocity(velocity, 5)
    displacement_from_velocity(velocity, 5, (12, 14, 16))
    displacement_from_velocity(-velocity, 5, (12, 14, 16))  # the inverse map does not push the map out
    integrated = []
    monkeypatch.setattr(warp_module, "integrate_velocity", lambda v, steps: integrated.append(1) or expected + 0)
    kept = map_of_velocity(velocity.clone(), 5)
    assert torch.equal(kept, expected) and not integrated
    kept.add_(1.0)  # a copy: changing it changes nothing kept
    assert torch.equal(map_of_velocity(velocity, 5), expected) and not integrated
    map_of_velocity(other, 5)  # one voxel changed
    map_of_velocity(velocity, 4)  # other steps
    assert len(integrated) == 2
    forget_maps()
    map_of_velocity(velocity, 5)
    assert len(integrated) == 3
