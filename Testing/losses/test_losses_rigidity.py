"""Per-vertebra rigidity losses (rigid Dice, rigid field, PC, OC) and the direct volume loss."""

from __future__ import annotations

import math

import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.jacobian import jacobian_determinant
from SpineRigidRegLib.losses import (
    RIGIDITY_LOSSES,
    orthonormality_loss,
    properness_loss,
    rigid_dice_loss,
    rigid_field_loss,
    rigidity_loss,
    vertebra_indicators,
    volume_loss,
)

SHAPE = (16, 16, 14)
SPACING = (1.2, 1.0, 0.9)
ALL = sorted(RIGIDITY_LOSSES)


def two_vertebrae(batch: int = 1) -> torch.Tensor:
    """(B, 1, 16, 16, 14) int64 map: two boxes with labels 7 and 12 separated by a gap."""
    labels = torch.zeros(batch, 1, *SHAPE, dtype=torch.int64)
    labels[..., 2:7, 4:12, 3:10] = 7
    labels[..., 9:14, 4:12, 3:10] = 12
    return labels


def linear_field(matrix: torch.Tensor, spacing=SPACING, translation=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Voxel field of ``x_mm -> A (x_mm - c) + c + t`` about the grid centre, written out analytically."""
    step = torch.tensor(spacing, dtype=torch.float64).view(3, 1, 1, 1)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in SHAPE], indexing="ij"))
    x = idx * step
    c = torch.tensor([(n - 1) / 2 for n in SHAPE], dtype=torch.float64).view(3, 1, 1, 1) * step
    t = torch.tensor(translation, dtype=torch.float64).view(3, 1, 1, 1)
    mapped = torch.einsum("ce,edhw->cdhw", matrix, x - c) + c + t
    return ((mapped - x) / step)[None]


def rotation(degrees: float, axis: int = 0) -> torch.Tensor:
    th = math.radians(degrees)
    a, b = [i for i in range(3) if i != axis]
    r = torch.eye(3, dtype=torch.float64)
    r[a, a], r[a, b], r[b, a], r[b, b] = math.cos(th), -math.sin(th), math.sin(th), math.cos(th)
    return r


def stretch(e: float) -> torch.Tensor:
    return torch.diag(torch.tensor([1.0 + e, 1.0, 1.0], dtype=torch.float64))


def shear(e: float) -> torch.Tensor:
    m = torch.eye(3, dtype=torch.float64)
    m[0, 1] = e
    return m


def smooth_random_field(batch: int = 1, seed: int = 0, amplitude: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 3, 3, 3, generator=gen, dtype=torch.float64) * amplitude
    return torch.nn.functional.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)


def test_vertebra_indicators():
    labels = two_vertebrae(2)
    labels[1][labels[1] == 12] = 0
    ind, present, values = vertebra_indicators(labels)
    assert values == [7, 12] and ind.shape == (2, 2, *SHAPE) and ind.dtype == torch.float32
    assert present.tolist() == [[True, True], [True, False]]
    assert int(ind[0, 0].sum()) == 5 * 8 * 7 and int(ind[1, 1].sum()) == 0
    ind, present, values = vertebra_indicators(labels, [12, 99, 7], dtype=torch.float64)
    assert values == [12, 99, 7] and present.tolist() == [[True, False, True], [False, False, True]]
    assert ind.dtype == torch.float64
    empty, none_present, no_values = vertebra_indicators(torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64))
    assert empty.shape == (1, 0, 4, 4, 4) and none_present.shape == (1, 0) and no_values == []


def test_a_rotation_is_not_penalised():
    labels = two_vertebrae()
    field = linear_field(rotation(6.0, axis=1) @ rotation(4.0, axis=0), translation=(1.0, -0.5, 0.8))
    det = jacobian_determinant(field, SPACING)
    assert torch.allclose(det, torch.ones_like(det), atol=1e-12)
    assert float(rigid_field_loss(labels, field, SPACING)) < 1e-12
    assert float(orthonormality_loss(labels, field, SPACING)) < 1e-12
    assert float(properness_loss(labels, field, SPACING)) < 1e-12
    assert float(rigid_dice_loss(labels, field, SPACING)) < 1e-9
    # trilinear warping keeps the soft volume of a rotated box within a fraction of a percent
    assert float(volume_loss(labels, field, SPACING)) < 1e-4


def test_spacing_matters_for_jacobian_losses():
    labels = two_vertebrae()
    field = linear_field(rotation(6.0, axis=1), spacing=(1.0, 1.0, 1.0))  # rigid on a 1 mm grid only
    assert float(orthonormality_loss(labels, field)) < 1e-12
    assert float(orthonormality_loss(labels, field, SPACING)) > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_stretch_is_penalised_more_the_larger_it_is(name):
    loss = RIGIDITY_LOSSES[name]
    labels = two_vertebrae()
    values = [float(loss(labels, linear_field(stretch(e)), SPACING)) for e in (0.0, 0.05, 0.1, 0.2)]
    assert values[0] < 1e-9
    assert values[0] < values[1] < values[2] < values[3], values


@pytest.mark.parametrize("name", ["rigid_dice", "rigid_field", "oc"])
def test_shear_is_penalised_more_the_larger_it_is(name):
    loss = RIGIDITY_LOSSES[name]
    labels = two_vertebrae()
    values = [float(loss(labels, linear_field(shear(e)), SPACING)) for e in (0.0, 0.05, 0.1, 0.2)]
    assert values[0] < 1e-9 and values[0] < values[1] < values[2] < values[3], values


def test_properness_and_volume_do_not_see_volume_preserving_shear():
    labels = two_vertebrae()
    field = linear_field(shear(0.2))
    assert float(properness_loss(labels, field, SPACING)) < 1e-12
    assert float(volume_loss(labels, field, SPACING)) < 1e-4


def test_volume_loss_of_a_scaling():
    labels = two_vertebrae()
    scale = 1.1  # pull-back x -> x / 1.1 magnifies each vertebra 1.1 times per axis
    field = linear_field(torch.eye(3, dtype=torch.float64) / scale)
    expected = (scale**3 - 1.0) ** 2
    assert float(volume_loss(labels, field, SPACING)) == pytest.approx(expected, rel=0.15)
    det_term = (1 / scale**3 - 1.0) ** 2
    assert float(properness_loss(labels, field, SPACING)) == pytest.approx(det_term, rel=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_losses_average_over_the_vertebrae_present_in_each_sample(name):
    loss = RIGIDITY_LOSSES[name]
    labels = two_vertebrae(2)
    labels[1][labels[1] == 12] = 0  # sample 1 has only vertebra 7
    field = smooth_random_field(batch=2)
    both = float(loss(labels, field, SPACING))
    first = float(loss(labels[:1], field[:1], SPACING))
    second = float(loss(labels[1:], field[1:], SPACING))
    assert both == pytest.approx((first + second) / 2, rel=1e-6, abs=1e-12)
    only_7 = float(loss(labels[1:], field[1:], SPACING, label_values=[7]))
    assert second == pytest.approx(only_7, rel=1e-6, abs=1e-12)
    # a label value absent from every sample changes nothing
    assert float(loss(labels, field, SPACING, label_values=[7, 12, 99])) == pytest.approx(both, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_vertebra_weights_scale_or_exclude_terms(name):
    loss = RIGIDITY_LOSSES[name]
    labels, field = two_vertebrae(), smooth_random_field(seed=1)
    l7 = float(loss(labels, field, SPACING, label_values=[7]))
    l12 = float(loss(labels, field, SPACING, label_values=[12]))
    assert abs(l7 - l12) > 1e-6 * max(l7, l12)  # the field treats the two vertebrae differently
    assert float(loss(labels, field, SPACING)) == pytest.approx((l7 + l12) / 2, rel=1e-6)
    assert float(loss(labels, field, SPACING, vertebra_weights={12: 0.0})) == pytest.approx(l7, rel=1e-6)
    assert float(loss(labels, field, SPACING, vertebra_weights={12: 2.0, 99: 5.0})) == pytest.approx(
        (l7 + 2 * l12) / 2, rel=1e-6
    )


@pytest.mark.parametrize("name", ALL)
def test_no_vertebra_gives_zero_with_grad(name):
    loss = RIGIDITY_LOSSES[name]
    field = smooth_random_field().requires_grad_(True)
    for labels, weights in ((torch.zeros(1, 1, *SHAPE, dtype=torch.int64), None), (two_vertebrae(), {7: 0, 12: 0})):
        value = loss(labels, field, SPACING, vertebra_weights=weights)
        assert float(value.detach()) == 0.0 and value.requires_grad
        (grad,) = torch.autograd.grad(value, field)
        assert float(grad.abs().max()) == 0.0


def test_gradcheck_field_losses():
    # fast_mode checks random projections of the Jacobian (a full check takes ~5 s here)
    torch.manual_seed(0)
    labels = torch.zeros(1, 1, 6, 6, 6, dtype=torch.int64)
    labels[..., 1:4, 2:5, 1:5] = 3
    labels[..., 4:6, 1:4, 2:4] = 5
    gen = torch.Generator().manual_seed(0)
    field = (0.3 * torch.randn(1, 3, 6, 6, 6, generator=gen, dtype=torch.float64)).requires_grad_(True)
    spacing = (1.0, 1.3, 0.8)
    for loss in (properness_loss, orthonormality_loss, volume_loss):
        ok = torch.autograd.gradcheck(lambda u, f=loss: f(labels, u, spacing), (field,), fast_mode=True)
        assert ok, loss.__name__
    # The rigid fit is detached, yet the gradient is exact: the fit minimises the very same weighted residual, so its
    # parameters' own derivative terms vanish (envelope theorem).
    assert torch.autograd.gradcheck(lambda u: rigid_field_loss(labels, u, spacing), (field,), fast_mode=True)


def test_rigid_dice_gradient_step_reduces_the_loss():
    labels = two_vertebrae()
    field = linear_field(stretch(0.15)).requires_grad_(True)
    value = rigid_dice_loss(labels, field, SPACING)
    (grad,) = torch.autograd.grad(value, field)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0
    stepped = field.detach() - 0.5 * grad / grad.abs().max()
    assert float(rigid_dice_loss(labels, stepped, SPACING)) < float(value.detach())


def test_rigid_field_loss_with_sampled_points():
    labels = two_vertebrae()
    rotated = linear_field(rotation(7.0, axis=2), translation=(0.5, 0.0, -1.0))
    assert float(rigid_field_loss(labels, rotated, SPACING, num_points=50)) < 1e-12
    stretched = linear_field(stretch(0.2))
    a = rigid_field_loss(labels, stretched, SPACING, num_points=50, generator=torch.Generator().manual_seed(3))
    b = rigid_field_loss(labels, stretched, SPACING, num_points=50, generator=torch.Generator().manual_seed(3))
    assert float(a) == float(b) > 0.01
    dense = float(rigid_field_loss(labels, stretched, SPACING))
    assert float(a) == pytest.approx(dense, rel=0.5)  # same quantity, estimated from 50 points
    field = stretched.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(rigid_field_loss(labels, field, SPACING, num_points=20), field)
    assert int((grad != 0).any(dim=1).sum()) <= 2 * 20  # only the sampled voxels get a gradient


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise(name):
    loss = RIGIDITY_LOSSES[name]
    labels, field = two_vertebrae(), torch.zeros(1, 3, *SHAPE)
    with pytest.raises(InputError):
        loss(labels[0], field)  # wrong rank
    with pytest.raises(InputError):
        loss(labels.float() + 0.5, field)  # float labels that are not whole numbers
    with pytest.raises(InputError):
        loss(labels, torch.full_like(field, float("nan")))
    with pytest.raises(InputError):
        loss(labels[..., :-1], field)  # grids differ
    with pytest.raises(InputError):
        loss(labels, torch.zeros(1, 2, *SHAPE))
    with pytest.raises(InputError):
        loss(labels, field, vertebra_weights={7: -1.0})
    with pytest.raises(InputError):
        loss(labels, field, label_values=[0, 7])
    with pytest.raises(InputError):
        loss(labels, field, spacing=(1.0, 1.0))
    with pytest.raises(TypeError):
        loss(labels, field, vertebra_weights=[1.0, 2.0])
    with pytest.raises(TypeError):
        loss(labels, field, label_values=[7.5])
    with pytest.raises(TypeError):
        loss(labels.numpy(), field)
    with pytest.raises(TypeError):
        loss(labels, field.long())
    assert float(loss(labels.float(), field)) == pytest.approx(0.0, abs=1e-9)  # whole-number floats are accepted


def test_num_points_must_be_an_int():
    with pytest.raises(TypeError):
        rigid_field_loss(two_vertebrae(), torch.zeros(1, 3, *SHAPE), num_points=10.0)
    with pytest.raises(InputError):
        rigid_field_loss(two_vertebrae(), torch.zeros(1, 3, *SHAPE), num_points=2)


# ------------------------------------------------------------------------- fast path == full-grid definition
def reference_terms(labels, field, spacing, vertebra_weights=None):
    """The losses as first written: every vertebra warped on the whole grid, J on the whole grid, one fit each.

    Returns ``{name: scalar}`` for the five losses (dense rigid field).
    """
    from SpineRigidRegLib.jacobian import determinant, jacobian_matrix, orthonormality_residual
    from SpineRigidRegLib.rigid import fit_rigid_to_regions, rigid_displacement
    from SpineRigidRegLib.warp import warp

    indicators, present, values = vertebra_indicators(labels, dtype=field.dtype)
    weights = torch.tensor([float((vertebra_weights or {}).get(v, 1.0)) for v in values], dtype=field.dtype)
    active = present & (weights > 0)[None]
    region = warp(indicators, field)
    mass = region.flatten(2).sum(-1)
    jac = jacobian_matrix(field, spacing)

    def region_mean(values_):
        return torch.einsum("bnv,bv->bn", region.flatten(2), values_.flatten(1)) / mass.clamp_min(1e-6)

    rot, trans = fit_rigid_to_regions(region.detach().clamp_min(0.0), field.detach(), spacing)
    scale = torch.tensor(spacing, dtype=field.dtype).view(1, 3, 1, 1, 1)
    field_terms, dice_terms = [], []
    for c in range(len(values)):
        rigid_field = rigid_displacement(rot[:, c], trans[:, c], SHAPE, spacing)
        squared = ((rigid_field * scale - field * scale) ** 2).sum(1)
        field_terms.append((region[:, c] * squared).flatten(1).sum(1) / mass[:, c].clamp_min(1e-6))
        rigid = warp(indicators[:, c : c + 1], rigid_field)
        soft = region[:, c : c + 1]
        norm = (rigid**2).flatten(1).sum(1) + (soft**2).flatten(1).sum(1)
        dice_terms.append(1.0 - 2.0 * (rigid * soft).flatten(1).sum(1) / norm.clamp_min(1e-6))
    original = indicators.flatten(2).sum(-1).clamp_min(1.0)
    terms = {
        "pc": region_mean((determinant(jac) - 1.0) ** 2),
        "oc": region_mean(orthonormality_residual(jac)),
        "volume": ((mass - original) / original) ** 2,
        "rigid_field": torch.stack(field_terms, 1),
        "rigid_dice": torch.stack(dice_terms, 1),
    }

    def reduce(t):
        count = active.sum(1)
        per_sample = torch.where(active, t * weights[None], torch.zeros_like(t)).sum(1) / count.clamp_min(1)
        return per_sample[count > 0].mean()

    return {name: reduce(t) for name, t in terms.items()}


def scattered_vertebrae(batch: int = 2) -> torch.Tensor:
    """Three vertebrae (values 3, 9, 40), one absent from the second sample, one in a corner of the grid."""
    labels = torch.zeros(batch, 1, *SHAPE, dtype=torch.int64)
    labels[..., 2:6, 4:11, 3:9] = 3
    labels[..., 8:13, 5:12, 4:10] = 9
    labels[0, :, 0:3, 0:3, 0:4] = 40  # near the border: part of it is mapped off the grid
    return labels


@pytest.mark.parametrize("amplitude", [1.0, 6.0])
def test_fast_losses_equal_the_full_grid_definition(amplitude):
    # The losses evaluate each warped vertebra only on a block around it; the values and gradients must be those of
    # the full-grid definition for small and for large (folding, off-grid) displacements.
    labels = scattered_vertebrae()
    field = smooth_random_field(batch=2, seed=4, amplitude=amplitude).requires_grad_(True)
    weights = {9: 2.5}
    expected = reference_terms(labels, field, SPACING, weights)
    for name in ALL:
        value = RIGIDITY_LOSSES[name](labels, field, SPACING, vertebra_weights=weights)
        (grad,) = torch.autograd.grad(value, field)
        (grad_ref,) = torch.autograd.grad(expected[name], field, retain_graph=True)
        assert float(value.detach()) == pytest.approx(float(expected[name].detach()), rel=1e-10, abs=1e-12), name
        torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-12 * float(grad_ref.abs().max()), msg=name)


def test_warped_regions_vanish_outside_their_blocks():
    from SpineRigidRegLib.losses.rigidity import _setup
    from SpineRigidRegLib.warp import warp

    labels = scattered_vertebrae()
    field = smooth_random_field(batch=2, seed=7, amplitude=5.0)
    setup = _setup(labels, field, SPACING, None, None)
    full = warp(setup.indicators, field)
    assert len(setup.boxes) == 3
    for c, (box, region) in enumerate(zip(setup.boxes, setup.regions, strict=True)):
        outside = full[:, c].clone()
        outside[(slice(None), *box)] = 0
        assert float(outside.abs().max()) == 0.0  # the block holds every voxel the vertebra reaches
        torch.testing.assert_close(region[:, 0], full[(slice(None), c, *box)], rtol=0, atol=0)
        assert all(b.start >= o.start and b.stop <= o.stop for b, o in zip(box, setup.block, strict=True))
    sizes = [math.prod(s.stop - s.start for s in box) for box in setup.boxes]
    assert min(sizes) < math.prod(SHAPE) / 2  # the blocks do save work here


def test_a_vertebra_mapped_off_the_grid_counts_as_lost():
    labels = two_vertebrae()
    field = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    field[:, 0] = 40.0  # every voxel samples far beyond the moving grid: both warped vertebrae are empty
    expected = reference_terms(labels, field, SPACING)
    for name in ALL:
        assert float(RIGIDITY_LOSSES[name](labels, field, SPACING)) == pytest.approx(float(expected[name]), abs=1e-12)
    assert float(volume_loss(labels, field, SPACING)) == pytest.approx(1.0)


def test_rigidity_loss_is_the_weighted_sum_of_the_losses():
    labels = scattered_vertebrae()
    field = smooth_random_field(batch=2, seed=2, amplitude=3.0).requires_grad_(True)
    weights = {"rigid_field": 0.01, "pc": 0.1, "oc": 0.05, "rigid_dice": 0.3, "volume": 0.0}
    combined = rigidity_loss(labels, field, weights, SPACING, vertebra_weights={3: 0.5})
    separate = sum(
        w * RIGIDITY_LOSSES[n](labels, field, SPACING, vertebra_weights={3: 0.5}) for n, w in weights.items()
    )
    (grad,) = torch.autograd.grad(combined, field)
    (grad_ref,) = torch.autograd.grad(separate, field)
    assert float(combined.detach()) == pytest.approx(float(separate.detach()), rel=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-14)
    empty = rigidity_loss(labels, field, {"pc": 0.0})
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_rigidity_loss_rejects_bad_weights():
    labels, field = two_vertebrae(), torch.zeros(1, 3, *SHAPE)
    with pytest.raises(InputError):
        rigidity_loss(labels, field, {"stiffness": 1.0})
    with pytest.raises(InputError):
        rigidity_loss(labels, field, {"pc": -1.0})
    with pytest.raises(TypeError):
        rigidity_loss(labels, field, {"pc": "1"})
    with pytest.raises(TypeError):
        rigidity_loss(labels, field, [("pc", 1.0)])


def test_label_values_found_by_histogram_and_by_sort_agree():
    labels = scattered_vertebrae()
    labels[1, 0, 0, 0, 0] = 70000  # beyond the histogram's range: the sort path
    _, _, values = vertebra_indicators(labels)
    assert values == [3, 9, 40, 70000]
    assert vertebra_indicators(scattered_vertebrae())[2] == [3, 9, 40]
