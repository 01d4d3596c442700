"""Vertebra-wise rigid refinement: rigid by construction, weights, recovery of a known shift, settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.jacobian import determinant, jacobian_matrix, orthonormality_residual
from SpineRigidRegLib.polyrigid import (
    ROTATION_RADIUS_MM,
    SampledProblem,
    VertebraFit,
    VertebraFrames,
    VertebraRigidSettings,
    apply_blended,
    blended_motion,
    refine_vertebrae_rigidly,
    rigid_maps,
    rigid_motions,
    rigid_velocity,
    step_size,
    vertebra_frames,
)
from SpineRigidRegLib.processing import ProcessingPair
from SpineRigidRegLib.warp import identity_grid, integrate_velocity, resize_displacement, warp


def two_vertebrae(shape=(32, 24, 24)):
    labels = torch.zeros(1, 1, *shape, dtype=torch.int64)
    labels[:, :, 4:13, 6:18, 6:18] = 20
    labels[:, :, 19:28, 6:18, 6:18] = 21
    return labels


def test_a_single_rigid_velocity_integrates_to_that_rigid_motion():
    shape, spacing = (24, 20, 16), (2.0, 1.0, 1.5)
    step = torch.tensor(spacing).view(1, 3, 1, 1, 1)
    points = identity_grid(shape) * step
    frames = VertebraFrames([7], torch.ones(1, 1, *shape), torch.tensor([[20.0, 10.0, 12.0]]), points, spacing)
    angle = math.radians(6.0)
    parameters = torch.tensor([[1.0, -2.0, 0.5, 0.0, angle * ROTATION_RADIUS_MM, 0.0]], dtype=torch.float32)
    displacement = integrate_velocity(rigid_velocity(parameters, frames).double(), 7)
    jac = jacobian_matrix(displacement, spacing)[..., 4:-4, 4:-4, 4:-4]  # away from the border extension
    assert float(orthonormality_residual(jac).max()) < 1e-4  # J^T J = I: a rotation
    assert float((determinant(jac) - 1).abs().max()) < 1e-4
    # the rotation angle of J is the one asked for (in the plane of array axes 0 and 2)
    rotation = jac[0, :, :, 3, 3, 3]
    assert math.degrees(math.acos((float(torch.trace(rotation)) - 1) / 2)) == pytest.approx(6.0, abs=0.05)


@pytest.mark.parametrize("angle_deg", [0.0, 0.3, 6.0, 14.0])
def test_the_closed_form_rigid_map_is_where_the_rigid_velocity_carries_each_point(angle_deg):
    shape, spacing = (24, 20, 16), (2.0, 1.0, 1.5)
    step = torch.tensor(spacing)
    frames = VertebraFrames(
        [7],
        torch.ones(1, 1, *shape),
        torch.tensor([[20.0, 10.0, 12.0]]),
        identity_grid(shape) * step.view(1, 3, 1, 1, 1),
        spacing,
    )
    axis = torch.tensor([0.3, -0.5, 0.8]) / torch.tensor([0.3, -0.5, 0.8]).norm()
    rotation = axis * math.radians(angle_deg) * ROTATION_RADIUS_MM
    parameters = torch.cat([torch.tensor([1.5, -2.0, 0.7]), rotation])[None].double()
    points_mm = torch.tensor([[20.0, 10.0, 12.0], [26.0, 8.0, 9.0], [14.0, 13.0, 15.0]], dtype=torch.float64)
    closed = rigid_maps(parameters, frames.centres_mm.double(), points_mm)[0]
    # reference: the velocity's ODE integrated with many small midpoint steps
    centre, w = frames.centres_mm[0].double(), parameters[0, 3:] / ROTATION_RADIUS_MM
    x = points_mm.clone()
    for _ in range(2000):
        half = x + 0.5 / 2000 * (parameters[0, :3] + torch.linalg.cross(w.expand_as(x), x - centre, dim=1))
        x = x + 1 / 2000 * (parameters[0, :3] + torch.linalg.cross(w.expand_as(half), half - centre, dim=1))
    torch.testing.assert_close(closed, x, atol=1e-5, rtol=0)
    # finite gradients at zero rotation (the Taylor branch)
    zero = torch.zeros(1, 6, requires_grad=True)
    rigid_maps(zero, frames.centres_mm, points_mm.float()).sum().backward()
    assert bool(torch.isfinite(zero.grad).all())


def test_the_blended_motion_moves_each_point_by_the_weighted_sum_of_the_vertebrae_motions():
    """``x + sum_k w_k (M_k x - x)``, with weights that need not sum to 1 (the envelope fades them), in one product."""
    generator = torch.Generator().manual_seed(1)
    bounded = torch.randn(3, 6, generator=generator, dtype=torch.float64) * 4.0
    centres = torch.rand(3, 3, generator=generator, dtype=torch.float64) * 80.0
    points = torch.rand(50, 3, generator=generator, dtype=torch.float64) * 100.0
    weights = torch.rand(3, 50, generator=generator, dtype=torch.float64) * 0.5
    maps = rigid_maps(bounded, centres, points)
    expected = points + (weights[..., None] * (maps - points)).sum(0)
    moved = apply_blended(blended_motion(weights, *rigid_motions(bounded, centres)), points)
    torch.testing.assert_close(moved, expected, atol=1e-9, rtol=0)


def test_the_sampled_nmi_ignores_the_ct_where_the_ct_has_no_data():
    """With the CT's data mask, samples whose trilinear stencil leaves it drop out of the NMI: what the CT holds
    beyond its field of view cannot change the loss. Without the mask it does (the check that the case tests it)."""
    labels, moving, fixed, _ = shifted_pair([-1.0, 0.5, 0.5], (16, 12, 12), seed=0)
    has_data = torch.ones_like(fixed, dtype=torch.bool)
    has_data[:, :, 24:] = False  # vertebra 21 spans slices 19-27: its samples cross the edge
    other = moving.clone()
    other[~has_data] = torch.rand(int((~has_data).sum()), generator=torch.Generator().manual_seed(3))
    settings = VertebraRigidSettings(steps=1, samples=4000, slice_model=False)

    def loss(ct, mask):
        frames = vertebra_frames(labels, (1.0, 1.0, 1.0), settings.sigma_mm, None, settings.margin_mm)
        fit = VertebraFit(settings, frames, torch.zeros(1, 3, 32, 24, 24), labels, 7, None, None)
        pair = ProcessingPair(fixed, ct, labels, (1.0, 1.0, 1.0), moving_mask=mask)
        bounded = torch.tensor([[0.3, -0.2, 0.1, 0.5, 0.0, 0.0], [0.2, 0.4, -0.3, 0.0, -0.6, 0.0]])
        return float(SampledProblem(fit, pair).loss(bounded, 0))

    assert loss(moving, has_data) == loss(other, has_data)
    assert loss(moving, None) != loss(other, None)


def test_after_recentring_the_sampled_loss_sees_each_point_where_the_integrated_velocity_puts_it():
    labels = two_vertebrae()
    fixed = F.avg_pool3d((labels > 0).float(), 3, stride=1, padding=1)
    moving = torch.roll(fixed, 1, dims=2)
    settings = VertebraRigidSettings(steps=6, samples=4000, margin_mm=4.0)
    frames = vertebra_frames(
        torch.roll(labels, 1, dims=2),
        (1.0, 1.0, 1.0),
        settings.sigma_mm,
        None,
        settings.margin_mm,
        settings.partition_mm,
    )
    fit = VertebraFit(settings, frames, torch.zeros(1, 3, 32, 24, 24), torch.roll(labels, 1, dims=2), 7, None, None)
    problem = SampledProblem(fit, ProcessingPair(fixed, moving, torch.roll(labels, 1, dims=2), (1.0, 1.0, 1.0)))
    fit.parameters = torch.tensor([[0.0, 1.5, 0.0, 2.0, 0.0, 0.0], [0.0, -1.0, 0.5, 0.0, 0.0, -3.0]])
    fit.recentre()
    problem.loss(fit.bounded(), 0)  # a refresh step: owners and the correction
    moved = problem.closed_form_mm(fit.bounded()) + problem.correction
    torch.testing.assert_close(moved, problem.integrated_mm(fit.bounded()), atol=1e-4, rtol=0)
    # inside a vertebra's rigid zone the closed form alone is already the integrated path
    pure = problem.weights.max(0).values > 0.999
    assert float(problem.correction[pure].norm(dim=1).median()) < 0.05


def test_the_stages_adam_takes_torchs_adam_steps():
    from SpineRigidRegLib.polyrigid import _Adam

    ours, theirs = torch.zeros(3, 6, requires_grad=True), torch.zeros(3, 6, requires_grad=True)
    optimizer, reference = _Adam(ours), torch.optim.Adam([theirs], lr=0.3)
    target = torch.linspace(-2.0, 2.0, 18).view(3, 6)
    for rate in (0.3, 0.2, 0.1, 0.05):
        for parameters in (ours, theirs):
            parameters.grad = None
            ((parameters - target) ** 4).sum().backward()
        optimizer.step(rate)
        for group in reference.param_groups:
            group["lr"] = rate
        reference.step()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_weights_are_one_inside_each_vertebra_and_vanish_far_from_the_spine():
    labels = two_vertebrae()
    frames = vertebra_frames(labels, (1.0, 1.0, 1.0), sigma_mm=2.0, margin_mm=1.0)
    assert frames.labels == [20, 21] and frames.weights.shape == (1, 2, 32, 24, 24)
    inside = labels[0, 0] == 20
    assert float(frames.weights[0, 0][inside].min()) > 0.99
    assert float(frames.weights[0, 1][inside].max()) < 0.01
    assert float(frames.weights.sum(1).max()) <= 1.0 + 1e-6
    assert float(frames.weights[0, :, :, 0, 0].max()) < 1e-3  # a corner, far from both
    torch.testing.assert_close(frames.centres_mm[0], torch.tensor([8.0, 11.5, 11.5]))
    with pytest.raises(InputError, match="at least one vertebra"):
        vertebra_frames(torch.zeros_like(labels), (1.0, 1.0, 1.0))


def test_vertebrae_3mm_apart_each_keep_their_whole_weight_and_switch_over_in_the_gap():
    labels = torch.zeros(1, 1, 30, 16, 16, dtype=torch.int64)
    labels[:, :, 4:13, 4:12, 4:12] = 20
    labels[:, :, 16:25, 4:12, 4:12] = 21  # a 3-voxel gap, like a facet joint
    frames = vertebra_frames(labels, (1.0, 1.0, 1.0), sigma_mm=3.0, margin_mm=8.0)
    for k, value in enumerate((20, 21)):
        assert float(frames.weights[0, k][labels[0, 0] == value].min()) > 0.99
    middle = frames.weights[0, :, 14, 8, 8]  # the gap's middle slice: half each, still whole
    torch.testing.assert_close(middle, torch.tensor([0.5, 0.5]), atol=1e-3, rtol=0)


def shifted_pair(shift, texture_shape, seed, shape=(32, 24, 24)):
    """Two vertebrae over a smooth random texture (moving) and the same shifted by ``shift`` voxels (fixed)."""
    labels = two_vertebrae(shape)
    generator = torch.Generator().manual_seed(seed)
    texture = F.interpolate(torch.rand(1, 1, *texture_shape, generator=generator), size=shape, mode="trilinear")
    moving = (0.3 * texture + 0.6 * (labels > 0)).clamp(0, 1)
    truth = torch.tensor(shift).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()
    return labels, moving, warp(moving, truth, padding_mode="border"), truth


@pytest.mark.parametrize("similarity", ["nmi", "mind"])
def test_a_known_shift_of_the_vertebrae_is_recovered_and_each_stays_rigid(similarity):
    shape = (32, 24, 24)
    labels, moving, fixed, truth = shifted_pair([1.5, -1.0, 0.8], (8, 6, 6), seed=0, shape=shape)
    settings = VertebraRigidSettings(steps=40, similarity=similarity)
    velocity, motions = refine_vertebrae_rigidly(
        torch.zeros(1, 3, *shape), ProcessingPair(fixed, moving, labels, (1.0, 1.0, 1.0)), settings
    )
    displacement = integrate_velocity(velocity, 7)
    for value in (20, 21):
        region = labels[0, 0] == value
        error = (displacement[0][:, region] - truth[0][:, region]).norm(dim=0)
        assert float(error.mean()) < 0.2, (value, float(error.mean()))  # voxels, of a 2-voxel shift
        assert motions[value][3] < 2.0  # degrees: no spurious rotation
    jac = jacobian_matrix(displacement)
    assert float(orthonormality_residual(jac)[0, 0][labels[0, 0] > 0].mean()) < 0.02


def test_zero_steps_or_excluded_vertebrae_leave_the_velocity_alone_and_bad_settings_are_named():
    labels = two_vertebrae()
    velocity = torch.randn(1, 3, 32, 24, 24)
    image = torch.rand(1, 1, 32, 24, 24)
    pair = ProcessingPair(image, image, labels, (1.0, 1.0, 1.0))
    out, motions = refine_vertebrae_rigidly(velocity, pair, VertebraRigidSettings(steps=0))
    assert torch.equal(out, velocity) and motions == {}
    out, motions = refine_vertebrae_rigidly(
        velocity, pair, VertebraRigidSettings(steps=2), vertebra_weights={20: 0, 21: 0}
    )
    assert torch.equal(out, velocity) and motions == {}
    with pytest.raises(InputError, match="similarity"):
        VertebraRigidSettings(similarity="ssd")
    with pytest.raises(InputError, match="sigma_mm"):
        VertebraRigidSettings(sigma_mm=0)
    with pytest.raises(InputError, match="learning_rate"):
        VertebraRigidSettings(learning_rate=-1)
    with pytest.raises(InputError, match="slice_model must be true or false"):
        VertebraRigidSettings(slice_model=1)


def test_a_sub_voxel_shift_is_recovered_with_a_velocity_on_a_grid_half_as_fine():
    """The bundled network's velocity lives on a 2 mm grid over 1 mm images: the similarity must still be taken on
    the images' own grid: a 0.9-voxel shift is then found to 0.02 voxels, to 0.24 voxels with the similarity on the
    velocity's grid."""
    shape = (32, 24, 24)
    labels, moving, fixed, truth = shifted_pair([0.6, -0.4, 0.5], (16, 12, 12), seed=1, shape=shape)
    coarse = tuple(s // 2 for s in shape)
    pair = ProcessingPair(fixed, moving, labels, (1.0, 1.0, 1.0))
    velocity, _ = refine_vertebrae_rigidly(torch.zeros(1, 3, *coarse), pair, VertebraRigidSettings(steps=40))
    displacement = resize_displacement(integrate_velocity(velocity, 7), shape)
    for value in (20, 21):
        region = labels[0, 0] == value
        error = (displacement[0][:, region] - truth[0][:, region]).norm(dim=0)
        assert float(error.mean()) < 0.1, (value, float(error.mean()))  # voxels of the 1 mm grid


def test_nmi_samples_stay_within_the_band_around_the_refined_vertebrae_in_mm():
    """The similarity's samples reach ``sample_band_mm`` from the chosen vertebrae along each axis, in mm (anisotropic
    voxels), and not around a vertebra left out."""
    from SpineRigidRegLib.polyrigid import _bone_band

    labels = two_vertebrae()
    band = _bone_band(labels, [20], (1.0, 2.0, 0.5), 3.0)[0, 0]
    assert bool(band[labels[0, 0] == 20].all()) and not bool(band[labels[0, 0] == 21].any())
    assert bool(band[1, 10, 10]) and not bool(band[0, 10, 10])  # 3 voxels of 1 mm
    assert bool(band[8, 4, 10]) and not bool(band[8, 3, 10])  # 1.5 voxels of 2 mm round to 2
    assert bool(band[8, 10, 0]) and bool(band[8, 10, 23])  # 6 voxels of 0.5 mm reach the grid's edges


@pytest.mark.parametrize("values", [[20], [21], [20, 21], [5]])
def test_the_band_dilated_on_the_bones_box_equals_the_whole_grids_dilation(values):
    """The band is dilated only on the bone's bounding box plus its reach (speed); the result must be the whole
    grid's dilation voxel for voxel, also where the box meets the grid's edges (a vertebra in a corner)."""
    from SpineRigidRegLib.polyrigid import _bone_band

    labels = two_vertebrae((40, 24, 30))
    labels[:, :, 0:2, 0:3, 27:30] = 5
    spacing, band_mm = (1.0, 2.0, 0.5), 4.0
    bone = torch.isin(labels, torch.tensor(values)).float()
    radii = [round(band_mm / s) for s in spacing]
    whole = F.max_pool3d(bone, [2 * r + 1 for r in radii], stride=1, padding=radii) > 0
    assert torch.equal(_bone_band(labels, values, spacing, band_mm), whole)
    assert not bool(_bone_band(labels, [99], spacing, band_mm).any())


@pytest.mark.parametrize("similarity", ["nmi", "mind"])
def test_a_vertebra_cut_by_the_fields_of_view_follows_the_anatomy_not_their_edges(similarity):
    """The processing grid reaches past both images, which read 0 there: without the masks the edges of the two
    fields of view (here at the same place) form a strong artificial match that holds the cut vertebra at a 2-voxel
    error; with them it is found like the whole one."""
    shape = (32, 24, 24)
    labels, moving, fixed, truth = shifted_pair([-2.0, 0.5, 0.5], (16, 12, 12), seed=0, shape=shape)
    inside = torch.ones_like(fixed, dtype=torch.bool)
    inside[:, :, 25:] = False  # vertebra 21 spans slices 19-27
    fixed, moving = fixed * inside, moving * inside
    errors = {}
    for masked in (False, True):
        masks = {"fixed_mask": inside, "moving_mask": inside} if masked else {}
        velocity, _ = refine_vertebrae_rigidly(
            torch.zeros(1, 3, *shape),
            ProcessingPair(fixed, moving, labels, (1.0, 1.0, 1.0), **masks),
            # a 3 mm band: with the default 6 mm one the samples beyond the edge outweigh it on this small image
            VertebraRigidSettings(steps=40, similarity=similarity, sample_band_mm=3.0),
        )
        displacement = integrate_velocity(velocity, 7)
        errors[masked] = [
            float((displacement[0][:, labels[0, 0] == v] - truth[0][:, labels[0, 0] == v]).norm(dim=0).mean())
            for v in (20, 21)
        ]
    assert max(errors[True]) < 0.2, errors  # voxels
    if similarity == "mind":
        # The sampled NMI starts with its samples on whole voxels, where grid_sample's gradient took the forward
        # or the backward difference by rounding and the edge held the vertebra; point_sampling.points_at always
        # takes the forward one and finds it here even without the masks, so only the dense MIND shows the edge.
        assert errors[False][1] > 1.0, errors


def test_the_overlap_mask_is_where_the_fixed_image_and_the_warped_moving_image_both_have_data():
    from SpineRigidRegLib.warp import overlap_mask

    fixed_mask = torch.zeros(1, 1, 8, 6, 6, dtype=torch.bool)
    fixed_mask[:, :, :6] = True
    moving_mask = torch.zeros_like(fixed_mask)
    moving_mask[:, :, 3:] = True
    shift = torch.zeros(1, 3, 8, 6, 6)
    shift[:, 0] = 2.0  # fixed voxel z reads moving voxel z + 2: moving data from z >= 1
    mask = overlap_mask(fixed_mask, moving_mask, shift)[0, 0, :, 3, 3]
    assert mask.tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    assert overlap_mask(None, None, shift) is None
    half = torch.full_like(shift, 0.0)
    half[:, 0] = -2.6  # fixed voxel 5 reads moving 2.4, whose stencil touches voxel 2, outside the CT
    assert overlap_mask(None, moving_mask, half)[0, 0, :, 3, 3].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert torch.equal(overlap_mask(fixed_mask, None, shift), fixed_mask.float())


def test_a_held_vertebra_keeps_its_start_and_its_zone_while_its_neighbour_moves():
    """Weight 0 (and a correction's vertebrae without points) hold a vertebra at the start's motion. Its frame stays in
    the blend, so its neighbour's motion stops at the partition between them instead of reaching into it (a held
    vertebra left out of the frames was bent by its neighbour: the free one's zone then ran over it)."""
    shape = (32, 24, 24)
    labels, moving, fixed, truth = shifted_pair([1.5, -1.0, 0.8], (8, 6, 6), seed=0, shape=shape)
    pair = ProcessingPair(fixed, moving, labels, (1.0, 1.0, 1.0))
    settings = VertebraRigidSettings(steps=40, margin_mm=6.0)
    velocity, motions = refine_vertebrae_rigidly(torch.zeros(1, 3, *shape), pair, settings, vertebra_weights={20: 0})
    displacement = integrate_velocity(velocity, 7)
    assert set(motions) == {21}
    held, free = labels[0, 0] == 20, labels[0, 0] == 21
    assert float(displacement[0][:, held].norm(dim=0).max()) < 0.05  # voxels: vertebra 20 did not move at all
    assert float((displacement[0][:, free] - truth[0][:, free]).norm(dim=0).mean()) < 0.2  # vertebra 21 was found


def test_the_ct_across_the_slices_is_the_mean_of_its_shifted_copies():
    """The CT a thick MR slice sees (the slice model): for whole-voxel taps the mean of the shifted copies (edges
    repeated); for fractional ones, on a linear ramp along the slices' axis, the ramp shifted by the taps' mean."""
    from SpineRigidRegLib.polyrigid import _across_slices

    gen = torch.Generator().manual_seed(3)
    volume = torch.rand(1, 1, 7, 8, 9, generator=gen)
    padded = torch.cat([volume[:, :, :, :1], volume, volume[:, :, :, -1:].expand(-1, -1, -1, 2, -1)], dim=3)
    expected = (padded[:, :, :, 0:8] + padded[:, :, :, 1:9] + padded[:, :, :, 3:11]) / 3  # taps -1, 0, 2 on axis 1
    assert torch.allclose(_across_slices(volume, 1, (-1.0, 0.0, 2.0)), expected)
    ramp = torch.arange(20.0).view(1, 1, 1, 1, 20).expand(1, 1, 3, 4, 20).contiguous()
    averaged = _across_slices(ramp, 2, (-1.25, -0.5, 0.25, 1.0))
    assert torch.allclose(averaged[..., 2:18], ramp[..., 2:18] - 0.125)


def test_the_step_size_falls_from_the_rate_to_its_final_share():
    """The cosine starts at the rate and decreases monotonically to the final share (the default's last steps are
    a twentieth of the first: session 14's probe of how far rounding moves a result)."""
    share = VertebraRigidSettings().final_step_share
    assert share == 0.05
    sizes = [step_size(step, 60, 0.4, share) for step in range(61)]
    assert sizes[0] == 0.4 and abs(sizes[-1] - 0.02) < 1e-12
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    for step in range(60):
        assert step_size(step, 60, 0.4, 0.1) == 0.4 * (0.1 + 0.45 * (1.0 + math.cos(math.pi * step / 60)))
    with pytest.raises(InputError, match="final_step_share"):
        VertebraRigidSettings(final_step_share=1.5)


def test_sample_indices_unravel_like_torch_on_a_grid_with_three_different_sizes():
    """The samples' grid positions (:func:`polyrigid._unravel`, torch's own imports sympy on its first call)."""
    from SpineRigidRegLib.polyrigid import _unravel

    shape = (5, 7, 11)
    index = torch.randperm(5 * 7 * 11, generator=torch.Generator().manual_seed(0))[:200]
    assert torch.equal(_unravel(index, shape), torch.stack(torch.unravel_index(index, shape), dim=1).float())
