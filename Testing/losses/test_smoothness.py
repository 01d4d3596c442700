"""The diffusion regulariser (losses/smoothness.py): 0 for translations, quadratic in the field, finite differences."""

from __future__ import annotations

import itertools

import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.losses import DiffusionLoss, diffusion_loss


def random_field(shape=(1, 3, 5, 6, 7), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_diffusion(field: torch.Tensor) -> float:
    """The definition voxel by voxel: for each axis, the mean over batch, channels and voxels with a forward neighbour
    of the squared forward difference; then the mean of the three axes (an axis of one voxel contributes 0)."""
    values = field.tolist()
    batch, channels, *size = field.shape
    total = 0.0
    for axis in range(3):
        if size[axis] < 2:
            continue
        squares = []
        for b, c in itertools.product(range(batch), range(channels)):
            for index in itertools.product(*(range(n - 1 if a == axis else n) for a, n in enumerate(size))):
                after = [i + 1 if a == axis else i for a, i in enumerate(index)]
                here = values[b][c][index[0]][index[1]][index[2]]
                there = values[b][c][after[0]][after[1]][after[2]]
                squares.append((there - here) ** 2)
        total += sum(squares) / len(squares)
    return total / 3.0


def test_diffusion_loss_values_and_gradcheck():
    constant = torch.full((2, 3, 5, 6, 7), 3.5, dtype=torch.float64)
    assert float(diffusion_loss(constant)) == 0.0
    ramp = torch.zeros(1, 3, 5, 6, 7, dtype=torch.float64)
    ramp[:, 1] = 0.5 * torch.arange(7, dtype=torch.float64)  # forward difference 0.5 along W only
    assert float(diffusion_loss(ramp)) == pytest.approx((0.25 / 3) / 3)  # (1/3) * mean over channels of (0, .25, 0)
    field = torch.randn(1, 3, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(diffusion_loss, (field,))
    assert float(DiffusionLoss()(ramp)) == float(diffusion_loss(ramp))


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 3, 1, 4, 4), (1, 3, 4, 1, 1)], ids=str)
def test_diffusion_loss_is_zero_with_a_zero_gradient_for_any_translation(shape):
    translation = torch.tensor([3.0, -7.5, 100.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    field = (torch.zeros(shape, dtype=torch.float64) + translation).requires_grad_(True)
    loss = diffusion_loss(field)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert field.grad is not None and float(field.grad.abs().max()) == 0.0


def test_diffusion_loss_is_positive_and_does_not_change_when_a_translation_is_added():
    field = random_field()
    loss = float(diffusion_loss(field))
    assert loss > 0.0
    translation = torch.tensor([3.0, -7.5, 100.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    assert float(diffusion_loss(field + translation)) == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("amplitude", [0.5, 2.0, -3.0, 10.0])
def test_diffusion_loss_scales_with_the_square_of_the_amplitude(amplitude):
    field = random_field()
    assert float(diffusion_loss(amplitude * field)) == pytest.approx(amplitude**2 * float(diffusion_loss(field)))


def test_diffusion_loss_matches_finite_differences_computed_by_hand():
    # D = H = 2, W = 1; channel 0 holds [[0, 1], [2, 4]] (rows along D), channels 1 and 2 are 0.
    # Along D: differences 2 and 3 over 6 values (3 channels x 2 voxels): 13 / 6. Along H: 1 and 2: 5 / 6.
    # Along W: no neighbour, 0. Mean of the three axes: (13 / 6 + 5 / 6 + 0) / 3 = 1.
    field = torch.zeros((1, 3, 2, 2, 1), dtype=torch.float64)
    field[0, 0, :, :, 0] = torch.tensor([[0.0, 1.0], [2.0, 4.0]], dtype=torch.float64)
    assert float(diffusion_loss(field)) == pytest.approx(1.0, rel=1e-12)
    # And voxel by voxel on random fields, a batch of two and an axis of one voxel among them.
    for shape in ((1, 3, 3, 4, 5), (2, 3, 4, 3, 2), (1, 3, 3, 1, 4)):
        field = random_field(shape, seed=sum(shape))
        assert float(diffusion_loss(field)) == pytest.approx(reference_diffusion(field), rel=1e-12), shape


def test_diffusion_loss_of_a_batch_is_the_mean_of_its_fields():
    a, b = random_field(seed=1), random_field(seed=2)
    both = float(diffusion_loss(torch.cat([a, b])))
    assert both == pytest.approx((float(diffusion_loss(a)) + float(diffusion_loss(b))) / 2, rel=1e-12)


@pytest.mark.parametrize(
    "field, error, message",
    [
        (torch.zeros(1, 2, 4, 4, 4), InputError, r"field must have 3 channel\(s\)"),
        (torch.zeros(3, 4, 4, 4), InputError, "field must be 5-D"),
        (torch.zeros(1, 3, 4, 4, 4, dtype=torch.int64), TypeError, "field must be a floating-point tensor"),
        (torch.full((1, 3, 4, 4, 4), float("nan")), InputError, "field contains NaN or infinite values"),
    ],
    ids=["two channels", "4-D", "integer", "nan"],
)
def test_diffusion_loss_refuses_a_field_it_cannot_regularise(field, error, message):
    with pytest.raises(error, match=message):
        diffusion_loss(field)
