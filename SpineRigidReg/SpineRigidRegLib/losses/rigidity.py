"""Per-vertebra rigidity penalties (eq. 2-7 of the paper) and the direct volume loss.

Every loss takes the moving label map and the displacement and returns a scalar to minimise::

    loss(moving_labels, displacement, spacing=None, label_values=None, vertebra_weights=None)

- ``moving_labels``: ``(B, 1, D, H, W)`` integer map on the moving grid, one value per vertebra (any values, gaps
  allowed), 0 = background.
- ``displacement``: ``(B, 3, D, H, W)`` pull-back field in voxels (see :mod:`..geometry`); the moving and fixed grids
  coincide (same shape and spacing), as after the preprocessing.
- ``spacing``: mm per voxel in array order ``(D, H, W)``; ``None`` means 1 mm.
- ``label_values``: the vertebra values to consider; ``None`` means every non-zero value in the batch. A value absent
  from a sample does not count for that sample.
- ``vertebra_weights``: ``{label value: weight >= 0}``; each vertebra's term is multiplied by its weight (default 1)
  and a weight of 0 removes the vertebra as if it were absent.

The region of vertebra ``i`` in the fixed grid is its soft warped indicator ``s_i o phi = warp(1[labels == i], u)``
(trilinear, differentiable). Per-vertebra terms are means over that region weighted by ``s_i o phi``; the loss of a
sample is ``sum_i w_i L_i / n`` over its ``n`` present vertebrae with ``w_i > 0`` (the ``1/N sum_i`` of eq. 6-7), and
the batch loss is the mean over the samples that have at least one such vertebra. With none at all the loss is a zero
that is still attached to the graph of ``displacement``.

Closest rigid transforms (eq. 2 and the rigid field loss) are fitted by weighted least squares on the warped region
(:func:`..rigid.fit_rigid_to_regions`) and detached: at the optimum the derivative of the residual with respect to the
fit parameters vanishes (envelope theorem), so the gradient is the same, and skipping the SVD backward is more stable.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..jacobian import determinant, jacobian_matrix, orthonormality_residual
from ..rigid import fit_rigid, fit_rigid_to_regions, rigid_displacement
from ..validation import check_label_tensor, check_same_spatial_shape, check_spacing, check_tensor
from ..warp import identity_grid, warp

_EPS = 1e-6


def _check_label_values(label_values: Sequence[int]) -> list[int]:
    """Validate user label values (ints, numpy ints, a 1-D tensor or array of them): positive and unique."""
    if isinstance(label_values, torch.Tensor | np.ndarray):
        label_values = label_values.tolist()
    if isinstance(label_values, str | bytes) or not isinstance(label_values, Sequence):
        raise TypeError(f"label_values must be a sequence of ints, got {type(label_values).__name__}")
    values = []
    for v in label_values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"label values must be ints, got {v!r}")
        if v <= 0:
            raise InputError(f"label values must be positive (0 is background), got {v}")
        values.append(int(v))
    if len(set(values)) != len(values):
        raise InputError(f"label values must be unique, got {values}")
    return values


def vertebra_indicators(
    labels: torch.Tensor, label_values: Sequence[int] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One binary indicator channel per vertebra.

    Args:
        labels: ``(B, 1, D, H, W)`` integer label map (float tensors must hold whole numbers).
        label_values: Values to extract, in this order; ``None`` means every non-zero value in the batch, sorted.
        dtype: Floating dtype of the indicators.

    Returns:
        ``indicators`` ``(B, N, D, H, W)`` of 0/1, ``present`` ``(B, N)`` bool (the value occurs in that sample) and
        ``values`` (the ``N`` label values).
    """
    labels = check_label_tensor(labels, "moving labels")
    if label_values is None:
        values = sorted({int(v) for v in labels.unique().tolist()} - {0})
    else:
        values = _check_label_values(label_values)
    b = labels.shape[0]
    if not values:
        empty = torch.zeros((b, 0, *labels.shape[2:]), dtype=dtype, device=labels.device)
        return empty, torch.zeros((b, 0), dtype=torch.bool, device=labels.device), []
    codes = torch.tensor(values, dtype=labels.dtype, device=labels.device).view(1, -1, 1, 1, 1)
    hits = labels == codes
    present = hits.flatten(2).any(dim=2)
    return hits.to(dtype), present, values


def _weight_vector(
    values: list[int], vertebra_weights: Mapping[int, float] | None, like: torch.Tensor
) -> torch.Tensor:
    weights = torch.ones(len(values), dtype=like.dtype, device=like.device)
    if vertebra_weights is None:
        return weights
    if not isinstance(vertebra_weights, Mapping):
        raise TypeError(f"vertebra_weights must be a dict {{label: weight}}, got {type(vertebra_weights).__name__}")
    for key, weight in vertebra_weights.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise TypeError(f"vertebra_weights keys must be int label values, got {key!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"vertebra weight of label {key} must be a number, got {weight!r}")
        if not (float(weight) >= 0 and float(weight) < float("inf")):
            raise InputError(f"vertebra weight of label {key} must be finite and >= 0, got {weight}")
        if int(key) in values:
            weights[values.index(int(key))] = float(weight)
    return weights


@dataclass
class _Setup:
    """Validated inputs shared by the losses; only the ``columns`` with an active vertebra are kept."""

    displacement: torch.Tensor
    spacing: tuple[float, float, float]
    indicators: torch.Tensor  # (B, n, D, H, W), n = active columns
    active: torch.Tensor  # (B, n) bool
    weights: torch.Tensor  # (n,)
    region: torch.Tensor | None = None  # (B, n, D, H, W) soft warped indicators
    mass: torch.Tensor | None = None  # (B, n) their sums (voxels)


def _setup(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None,
    label_values: Sequence[int] | None,
    vertebra_weights: Mapping[int, float] | None,
    warp_regions: bool = True,
) -> _Setup:
    displacement = check_tensor(displacement, "displacement", ndim=5, channels=3, floating=True, finite=True)
    labels = check_label_tensor(moving_labels, "moving labels")
    check_same_spatial_shape(labels, displacement, "moving labels", "displacement")
    step = check_spacing(spacing)
    indicators, present, values = vertebra_indicators(labels, label_values, dtype=displacement.dtype)
    weights = _weight_vector(values, vertebra_weights, displacement)
    active = present & (weights > 0)[None]
    columns = active.any(dim=0).nonzero()[:, 0]
    setup = _Setup(displacement, step, indicators[:, columns], active[:, columns], weights[columns])
    if warp_regions and columns.numel():
        setup.region = warp(setup.indicators, displacement)
        setup.mass = setup.region.flatten(2).sum(-1)
    return setup


def _reduce(terms: torch.Tensor, setup: _Setup) -> torch.Tensor:
    """Per-sample mean over active vertebrae of the weighted terms ``(B, n)``, then mean over non-empty samples."""
    count = setup.active.sum(dim=1)
    has = count > 0
    if terms.numel() == 0 or not bool(has.any()):
        return setup.displacement.sum() * 0.0
    weighted = torch.where(setup.active, terms * setup.weights[None], torch.zeros_like(terms))
    per_sample = weighted.sum(dim=1) / count.clamp_min(1).to(terms.dtype)
    return per_sample[has].mean()


def _region_mean(values: torch.Tensor, setup: _Setup) -> torch.Tensor:
    """Mean of ``(B, 1, D, H, W)`` values over each soft warped region -> ``(B, n)``."""
    total = torch.einsum("bnv,bv->bn", setup.region.flatten(2), values.flatten(1))
    return total / setup.mass.clamp_min(_EPS)


def properness_loss(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """Properness condition (eq. 6): mean of ``(det J_phi - 1)^2`` over each warped vertebra, ``J`` in mm/mm."""
    setup = _setup(moving_labels, displacement, spacing, label_values, vertebra_weights)
    if setup.region is None:
        return _reduce(setup.active.to(setup.displacement.dtype), setup)
    det = determinant(jacobian_matrix(setup.displacement, setup.spacing))
    return _reduce(_region_mean((det - 1.0) ** 2, setup), setup)


def orthonormality_loss(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """Orthonormality condition (eq. 7): mean of ``||J^T J - I||_F^2`` over each warped vertebra, ``J`` in mm/mm."""
    setup = _setup(moving_labels, displacement, spacing, label_values, vertebra_weights)
    if setup.region is None:
        return _reduce(setup.active.to(setup.displacement.dtype), setup)
    residual = orthonormality_residual(jacobian_matrix(setup.displacement, setup.spacing))
    return _reduce(_region_mean(residual, setup), setup)


def volume_loss(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """Direct volume loss: ``((|s_i o phi| - |s_i|) / |s_i|)^2`` per vertebra.

    ``|s_i o phi|`` is the sum of the soft warped indicator and ``|s_i|`` the voxel count of the vertebra; both are on
    grids of the same spacing, so the voxel ratio equals the mm^3 ratio (``spacing`` is accepted for a uniform
    signature and does not change the result).
    """
    setup = _setup(moving_labels, displacement, spacing, label_values, vertebra_weights)
    if setup.region is None:
        return _reduce(setup.active.to(setup.displacement.dtype), setup)
    original = setup.indicators.flatten(2).sum(-1).clamp_min(1.0)
    return _reduce(((setup.mass - original) / original) ** 2, setup)


def _fitted_rigid_fields(setup: _Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached closest rigid maps (eq. 2) of every active vertebra: ``R`` ``(B, n, 3, 3)``, ``t`` ``(B, n, 3)``."""
    return fit_rigid_to_regions(setup.region.detach().clamp_min(0.0), setup.displacement.detach(), setup.spacing)


def rigid_dice_loss(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """Rigid Dice loss (eq. 2-3): ``1 - Dice(s_i o T_i, s_i o phi)`` per vertebra.

    ``T_i`` is the rigid map closest to ``phi`` over the soft warped region (detached). The soft Dice is
    ``2 sum(a b) / (sum a^2 + sum b^2)``, with squared sums in the denominator (Milletari et al. 2016) so that the loss
    is exactly 0 whenever ``s_i o phi`` equals its rigid counterpart, also at partial-volume boundary voxels; the
    ``sum a + sum b`` form would stay above 0 for any soft map and pull the field toward whole-voxel shifts.
    """
    setup = _setup(moving_labels, displacement, spacing, label_values, vertebra_weights)
    if setup.region is None:
        return _reduce(setup.active.to(setup.displacement.dtype), setup)
    rotation, translation = _fitted_rigid_fields(setup)
    shape = setup.displacement.shape[2:]
    terms = []
    for c in range(setup.region.shape[1]):
        with torch.no_grad():
            field = rigid_displacement(rotation[:, c], translation[:, c], shape, setup.spacing)
            rigid = warp(setup.indicators[:, c : c + 1], field.to(setup.displacement.dtype))
        soft = setup.region[:, c : c + 1]
        overlap = 2.0 * (rigid * soft).flatten(1).sum(1)
        norm = (rigid**2).flatten(1).sum(1) + (soft**2).flatten(1).sum(1)
        terms.append(1.0 - overlap / norm.clamp_min(_EPS))
    return _reduce(torch.stack(terms, dim=1), setup)


def rigid_field_loss(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
    num_points: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rigid field loss (eq. 4): mean over each warped vertebra of ``|phi_rigid(z) - phi(z)|^2`` in mm^2.

    Args:
        moving_labels, displacement, spacing, label_values, vertebra_weights: See the module docstring.
        num_points: ``None`` uses every voxel, weighted by the soft warped indicator. An int draws that many voxels
            (without replacement, all if fewer) per vertebra from the crisp warped region ``s_i o phi > 0.5``, fits
            ``phi_rigid`` to those points and averages over them, as in the paper.
        generator: Random generator for the draws (reproducibility).

    Returns:
        Scalar (mm^2).
    """
    if num_points is not None and (isinstance(num_points, bool) or not isinstance(num_points, int)):
        raise TypeError(f"num_points must be an int or None, got {type(num_points).__name__}")
    if num_points is not None and num_points < 3:
        raise InputError(f"num_points must be >= 3 to fit a rigid map, got {num_points}")
    setup = _setup(moving_labels, displacement, spacing, label_values, vertebra_weights)
    if setup.region is None:
        return _reduce(setup.active.to(setup.displacement.dtype), setup)
    u = setup.displacement
    scale = torch.tensor(setup.spacing, dtype=u.dtype, device=u.device).view(1, 3, 1, 1, 1)
    u_mm = u * scale
    if num_points is not None:
        return _reduce(_sampled_field_terms(setup, u_mm, scale, num_points, generator), setup)
    rotation, translation = _fitted_rigid_fields(setup)
    shape = u.shape[2:]
    terms = []
    for c in range(setup.region.shape[1]):
        with torch.no_grad():
            rigid_mm = rigid_displacement(rotation[:, c], translation[:, c], shape, setup.spacing).to(u.dtype) * scale
        squared = ((rigid_mm - u_mm) ** 2).sum(dim=1, keepdim=True)
        terms.append(torch.einsum("bv,bv->b", setup.region[:, c].flatten(1), squared.flatten(1)))
    return _reduce(torch.stack(terms, dim=1) / setup.mass.clamp_min(_EPS), setup)


def _sampled_field_terms(
    setup: _Setup, u_mm: torch.Tensor, scale: torch.Tensor, num_points: int, generator: torch.Generator | None
) -> torch.Tensor:
    b, n = setup.active.shape
    grid_mm = (identity_grid(u_mm.shape[2:], u_mm.device, u_mm.dtype) * scale).flatten(2)[0]  # (3, V)
    flat_u = u_mm.flatten(2)
    terms = torch.zeros((b, n), dtype=u_mm.dtype, device=u_mm.device)
    rows = []
    for s in range(b):
        row = []
        for c in range(n):
            inside = (setup.region[s, c].detach().flatten() > 0.5).nonzero()[:, 0]
            if not bool(setup.active[s, c]) or inside.numel() < 3:
                row.append(terms[s, c])
                continue
            if inside.numel() > num_points:
                pick = torch.randperm(inside.numel(), generator=generator, device="cpu")[:num_points]
                inside = inside[pick.to(inside.device)]
            z = grid_mm[:, inside].T  # (P, 3) mm
            target = z + flat_u[s][:, inside].T
            rotation, translation = fit_rigid(z[None].detach(), target[None].detach())
            rigid = z @ rotation[0].T + translation[0]
            row.append(((rigid - target) ** 2).sum(-1).mean())
        rows.append(torch.stack(row))
    return torch.stack(rows)


#: Rigidity losses by name; each is ``f(moving_labels, displacement, spacing=None, label_values=None,
#: vertebra_weights=None) -> scalar``.
RIGIDITY_LOSSES = {
    "rigid_dice": rigid_dice_loss,
    "rigid_field": rigid_field_loss,
    "pc": properness_loss,
    "oc": orthonormality_loss,
    "volume": volume_loss,
}
