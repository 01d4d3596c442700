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
