"""Trilinear reads at scattered points (point_sampling.py) against grid_sample's."""

from __future__ import annotations

import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.point_sampling import points_at, read_with_data_mask, with_data_mask
from SpineRigidRegLib.warp import inside_moving_image, sample_at


def _points(count: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, generator=generator, dtype=torch.float64) * (high - low) + low


def test_points_read_what_grid_sample_reads_with_its_gradient_also_beyond_the_grid():
    """Every channel, points inside and beyond the grid (border padding: the edge's value, no gradient outward),
    points on the last voxel (the cell below, weight 1)."""
    generator = torch.Generator().manual_seed(1)
    volume = torch.rand(1, 3, 6, 7, 8, generator=generator, dtype=torch.float64)
    voxels = torch.cat([_points(300, -2.0, 9.0), torch.tensor([[5.0, 6.0, 7.0], [0.0, 0.0, 0.0], [5.0, 3.5, 7.0]])])
    weights = torch.rand(3, len(voxels), generator=generator, dtype=torch.float64)
    ours_at = voxels.clone().requires_grad_(True)
    theirs_at = voxels.T.reshape(1, 3, -1, 1, 1).clone().requires_grad_(True)
    ours = points_at(volume, ours_at)
    theirs = sample_at(volume, theirs_at, padding_mode="border").reshape(3, -1)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours_at.grad, theirs_at.grad.reshape(3, -1).T, atol=1e-10, rtol=0)


def test_a_channel_with_no_gradient_coming_back_adds_nothing():
    volume = torch.rand(1, 2, 5, 5, 5, dtype=torch.float64)
    both_at, first_at = (_points(50, 0.0, 4.0).requires_grad_(True) for _ in range(2))
    points_at(volume, both_at)[0].sum().backward()
    points_at(volume[:, :1], first_at)[0].sum().backward()
    torch.testing.assert_close(both_at.grad, first_at.grad)


def test_one_read_of_image_and_data_mask_gives_what_two_reads_give():
    """Also at points beyond the grid (the mask's zero padding, the image's edge values) and for the gradient."""
    generator = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 1, 9, 10, 11, generator=generator)
    mask = torch.zeros(1, 1, 9, 10, 11)
    mask[..., 1:9, 2:10, 0:8] = 1.0  # touches the grid's edge along the last axis
    voxels = _points(400, -2.0, 12.0).float()
    ours_at = voxels.clone().requires_grad_(True)
    theirs_at = voxels.T.reshape(1, 3, -1, 1, 1).clone().requires_grad_(True)
    values, inside = read_with_data_mask(with_data_mask(moving, mask), ours_at)
    expected = sample_at(moving, theirs_at, padding_mode="border").flatten()
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    assert torch.equal(inside, inside_moving_image(mask, theirs_at.detach()).flatten())
    assert 0 < float(inside.mean()) < 1
    (values * inside).sum().backward()
    (expected * inside).sum().backward()
    torch.testing.assert_close(ours_at.grad, theirs_at.grad.reshape(3, -1).T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1, 1, 5, 5), (2, 1, 5, 5, 5), (1, 1, 5, 5)])
def test_a_volume_it_cannot_read_is_refused_in_one_line(shape):
    with pytest.raises(InputError, match="points_at needs a"):
        points_at(torch.zeros(shape), torch.zeros(4, 3))
