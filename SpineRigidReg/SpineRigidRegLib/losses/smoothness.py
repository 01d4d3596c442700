"""Smoothness regulariser of the stationary velocity field (the paper's ``L_smooth``)."""

from __future__ import annotations

import torch
from torch import nn

from ..validation import check_tensor


def diffusion_loss(field: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward-difference gradient of a vector field.

    ``(1/3) sum_a mean((f(x + e_a) - f(x))^2)`` over the three array axes ``a``, each mean taken over the batch, the
    channels and the voxels that have a forward neighbour along ``a``. This is the normalisation of VoxelMorph's
    ``l2`` gradient loss, so the paper's ``lambda_smooth = 0.01`` keeps its meaning. Units: squared voxels per voxel
    (no spacing: the network works on 1 mm grids).

    Args:
        field: ``(B, 3, D, H, W)`` velocity (or displacement) in voxels.

    Returns:
        Scalar; 0 exactly for a constant field.
    """
    field = check_tensor(field, "field", ndim=5, channels=3, floating=True, finite=True)
    terms = []
    for dim in (2, 3, 4):
        n = field.shape[dim]
        if n < 2:
            terms.append(field.new_zeros(()) * field.sum())
            continue
        diff = field.narrow(dim, 1, n - 1) - field.narrow(dim, 0, n - 1)
        terms.append((diff**2).mean())
    return sum(terms) / 3.0


class DiffusionLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`diffusion_loss`."""

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(field)
