"""Spatial derivatives of displacement fields in physical units.

The Jacobian of ``phi(x) = x + u(x)`` is computed in a millimetre frame aligned with the array axes. The image
direction is a rotation of that frame, which leaves ``det J`` and ``||J^T J - I||`` unchanged, so these functions
need only the spacing. Derivatives are central differences inside the grid and one-sided on its faces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError
from .validation import check_spacing, check_tensor


def spatial_gradient(field: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Finite-difference gradient of every channel.

    Args:
        field: ``(B, C, D, H, W)``.
        spacing: Grid step in mm per array axis ``(D, H, W)``; ``None`` means 1.

    Returns:
        ``(B, C, 3, D, H, W)``; ``[:, c, a]`` is ``d field_c / d x_a`` per mm along array axis ``a``.
    """
    check_tensor(field, "field", ndim=5, floating=True, finite=True)
    step = check_spacing(spacing)
    return _spatial_gradient(field, step)


def _spatial_gradient(field: torch.Tensor, step: tuple[float, float, float]) -> torch.Tensor:
    """Central differences inside, one-sided at the two ends of each axis. Without autograd each axis's differences
    are written straight into their place in the output (concatenating and stacking copied the whole gradient twice:
    half of a result's Jacobian time); with it the pieces are concatenated, whose backward is the cheaper one (the
    training losses')."""
    differentiable = field.requires_grad and torch.is_grad_enabled()
    out = None if differentiable else field.new_empty(field.shape[0], field.shape[1], 3, *field.shape[2:])
    grads = []
    for axis, h in enumerate(step):
        x = field.movedim(axis + 2, -1)
        if x.shape[-1] < 2:
            pieces = [torch.zeros_like(x)]
        else:
            inner = (x[..., 2:] - x[..., :-2]) / (2.0 * h)
            pieces = [(x[..., 1:2] - x[..., 0:1]) / h, inner, (x[..., -1:] - x[..., -2:-1]) / h]
        if out is None:
            grads.append(torch.cat(pieces, dim=-1).movedim(-1, axis + 2))
            continue
        target, start = out[:, :, axis].movedim(axis + 2, -1), 0
        for piece in pieces:
            target[..., start : start + piece.shape[-1]] = piece
            start += piece.shape[-1]
    return torch.stack(grads, dim=2) if out is None else out


def jacobian_matrix(displacement: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Jacobian of ``x -> x + u(x)`` in mm/mm.

    Args:
        displacement: ``(B, 3, D, H, W)`` in voxels (array order ``k, j, i``).
        spacing: mm per voxel in array order ``(D, H, W)``; ``None`` means 1 mm isotropic.

    Returns:
        ``(B, 3, 3, D, H, W)``; ``J[:, c, a] = delta_ca + d u_c / d x_a`` with ``u`` in mm.
    """
    check_tensor(displacement, "displacement", ndim=5, channels=3, floating=True, finite=True)
    step = check_spacing(spacing)
    scale = torch.tensor(step, dtype=displacement.dtype, device=displacement.device).view(1, 3, 1, 1, 1)
    matrix = _spatial_gradient(displacement * scale, step)
    if matrix.requires_grad:
        return matrix + torch.eye(3, dtype=matrix.dtype, device=matrix.device).view(1, 3, 3, 1, 1, 1)
    for axis in range(3):
        matrix[:, axis, axis] += 1.0  # in place: adding the identity matrix copied the whole field once more
    return matrix


def determinant(matrix: torch.Tensor) -> torch.Tensor:
    """Determinant of per-voxel 3x3 matrices ``(B, 3, 3, D, H, W)`` -> ``(B, 1, D, H, W)``."""
    _check_matrix_field(matrix)
    # unbind, not a[:, i, j]: each indexed element would cost a zero-filled 3x3 field in the backward pass.
    (a00, a01, a02), (a10, a11, a12), (a20, a21, a22) = (row.unbind(1) for row in matrix.unbind(1))
    det = a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20) + a02 * (a10 * a21 - a11 * a20)
    return det[:, None]


def jacobian_determinant(displacement: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """``det J`` of ``x -> x + u(x)``: ``(B, 3, D, H, W)`` voxels -> ``(B, 1, D, H, W)``; < 1 shrinks, <= 0 folds."""
    return determinant(jacobian_matrix(displacement, spacing))


def orthonormality_residual(jacobian: torch.Tensor) -> torch.Tensor:
    """``||J^T J - I||_F^2`` per voxel: ``(B, 3, 3, D, H, W)`` -> ``(B, 1, D, H, W)``; 0 for a rotation."""
    _check_matrix_field(jacobian)
    jtj = torch.einsum("bcadhw,bcedhw->baedhw", jacobian, jacobian)
    eye = torch.eye(3, dtype=jacobian.dtype, device=jacobian.device).view(1, 3, 3, 1, 1, 1)
    return ((jtj - eye) ** 2).sum(dim=(1, 2))[:, None]


def _check_matrix_field(matrix: torch.Tensor) -> None:
    check_tensor(matrix, "Jacobian matrix field", ndim=6, floating=True)
    if matrix.shape[1:3] != (3, 3):
        raise InputError(f"Jacobian matrix field must be (B, 3, 3, D, H, W), got shape {tuple(matrix.shape)}")
