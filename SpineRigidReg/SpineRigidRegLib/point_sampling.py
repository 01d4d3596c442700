"""Trilinear reads of a volume at scattered points, differentiable with respect to the points.

The vertebra-wise stage reads the CT at its 50,000 sample points at every step and needs the gradient with
respect to where they lie. ``F.grid_sample`` does the same read, but its CPU kernel for a list of points took
three times as long, forward and backward (24 vs 8 ms per step on one thread, issue 16's closing note of session
20): here the eight corners of every point are gathered in one indexed read and the gradient is formed from them in
closed form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError

#: A trilinear read of a 0/1 mask above this had its whole stencil inside the mask.
WHOLE_STENCIL = 0.999


def points_at(volume: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """``volume`` ``(1, C, D, H, W)`` read trilinearly at ``voxels`` ``(N, 3)`` (array-order voxel indices of its
    grid), points beyond the grid reading its edge (``grid_sample``'s ``"border"`` padding): ``(C, N)``.
    Differentiable with respect to ``voxels`` only (0 along an axis where a point lies on or beyond the grid's
    edge)."""
    if volume.dim() != 5 or volume.shape[0] != 1 or min(volume.shape[2:]) < 2:
        raise InputError(f"points_at needs a (1, C, D, H, W) volume with D, H, W >= 2, got {tuple(volume.shape)}")
    if voxels.dim() != 2 or voxels.shape[1] != 3:
        raise InputError(f"points_at needs (N, 3) voxel positions, got {tuple(voxels.shape)}")
    return _Trilinear.apply(volume[0].detach(), voxels)


def with_data_mask(moving: torch.Tensor, moving_mask: torch.Tensor) -> torch.Tensor:
    """``(1, 2, D + 2, H + 2, W + 2)``: ``moving`` ``(1, 1, D, H, W)`` padded by its edge values and ``moving_mask``
    (0/1, same grid) padded by zeros, one voxel on each side, for :func:`read_with_data_mask`."""
    pad = (1,) * 6
    return torch.cat([F.pad(moving.float(), pad, mode="replicate"), F.pad(moving_mask.float(), pad)], dim=1)


def read_with_data_mask(stacked: torch.Tensor, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The moving image at ``voxels`` ``(N, 3)`` of its grid as ``sample_at(moving, ..., padding_mode="border")``
    reads it, and :func:`.warp.inside_moving_image` there (float 0/1, no gradient), both ``(N,)``, from one read of
    ``stacked`` (:func:`with_data_mask`): the padding gives the mask's zeros beyond the grid and the image's edge
    values, and the two channels share the read's cost."""
    both = points_at(stacked, voxels + 1.0)
    return both[0], (both[1] > WHOLE_STENCIL).float()


#: Offsets of a cell's 8 corners, as (z, y, x) bits: x varies fastest, then y, then z.
_CORNERS = ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1))


def _lerp_pairs(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(C, 2 m, N)`` -> ``(C, m, N)``: each pair of neighbours along the middle axis mixed by ``weight`` ``(N,)``."""
    low, high = values[:, 0::2], values[:, 1::2]
    return low + (high - low) * weight


class _Trilinear(torch.autograd.Function):
    """:func:`points_at`: forward gathers the ``(C, 8, N)`` corners and mixes them along x, y, then z; backward
    takes the derivative along each axis from the same corners."""

    @staticmethod
    def forward(ctx, volume: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        channels, depth, height, width = volume.shape
        top = torch.tensor([depth - 1, height - 1, width - 1], dtype=voxels.dtype, device=voxels.device)
        inside = (voxels > 0) & (voxels < top)  # as grid_sample: no gradient on the edge itself
        clamped = torch.minimum(voxels.clamp_min(0.0), top)
        low = torch.minimum(clamped.floor(), top - 1)  # a point on the last voxel uses the cell below it, weight 1
        fraction = clamped - low
        strides = torch.tensor([height * width, width, 1], device=voxels.device)
        offsets = torch.tensor([sum(b * s for b, s in zip(bits, strides.tolist())) for bits in _CORNERS])
        index = ((low.long() * strides).sum(1) + offsets.to(voxels.device)[:, None]).flatten()
        corners = volume.reshape(channels, -1).index_select(1, index).view(channels, 8, -1)
        ctx.save_for_backward(corners, fraction, inside)
        along_x = _lerp_pairs(corners, fraction[:, 2])
        along_y = _lerp_pairs(along_x, fraction[:, 1])
        return _lerp_pairs(along_y, fraction[:, 0])[:, 0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        corners, fraction, inside = ctx.saved_tensors
        fz, fy, fx = fraction.unbind(1)
        along_x = _lerp_pairs(corners, fx)
        along_y = _lerp_pairs(along_x, fy)
        d_z = along_y[:, 1] - along_y[:, 0]
        d_y = _lerp_pairs(along_x[:, 1::2] - along_x[:, 0::2], fz)[:, 0]
        d_x = _lerp_pairs(_lerp_pairs(corners[:, 1::2] - corners[:, 0::2], fy), fz)[:, 0]
        used = [c for c in range(grad.shape[0]) if bool(grad[c].any())]  # a thresholded mask passes no gradient
        grad, d_z, d_y, d_x = (t[used] for t in (grad, d_z, d_y, d_x))
        slopes = torch.stack([(grad * d).sum(0) for d in (d_z, d_y, d_x)], dim=1)
        return None, slopes * inside
