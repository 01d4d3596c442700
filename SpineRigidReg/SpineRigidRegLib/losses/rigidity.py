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

Cost. ``s_i o phi`` is zero wherever ``x + u(x)`` lies a voxel or more away from vertebra ``i`` along some axis, so each
vertebra is warped, fitted and averaged only on the block of the fixed grid outside which its warped indicator
vanishes (found from ``u`` at the start of each call, plus a one-voxel rim for the Jacobian's central differences); the
results equal the full-grid ones up to the order of floating-point sums. :func:`rigidity_loss` adds several of these
losses while warping the indicators, computing the Jacobian and fitting the rigid maps once (the refinement uses it).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from ..jacobian import determinant, jacobian_matrix, orthonormality_residual
from ..rigid import fit_rigid, fit_rigid_to_regions, rigid_displacement
from ..validation import check_label_tensor, check_same_spatial_shape, check_spacing, check_tensor
from ..warp import identity_grid, present_labels, sample_at, warp

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
        values = present_labels(labels)
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


def _weight_vector(values: list[int], vertebra_weights: Mapping[int, float] | None, like: torch.Tensor) -> torch.Tensor:
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


# Fixed-grid blocks: voxel x sees vertebra i only if its sample point x + u(x) lies less than one voxel from the
# vertebra's labelled voxels along every axis (trilinear weights vanish beyond), so a block holding all such x gives the
# full-grid sums exactly. A one-voxel rim keeps the Jacobian's central differences there equal to the full-grid ones;
# the tolerance (voxels) covers grid_sample's rounding when it re-normalises coordinates.
_SUPPORT_TOLERANCE = 1e-2

# A block of the fixed grid: slices along the array axes ``(D, H, W)``.
_Box = tuple[slice, slice, slice]


@dataclass
class _Setup:
    """Validated inputs shared by the losses; only the ``columns`` with an active vertebra are kept.

    Active column ``c`` has a block ``boxes[c]`` of the fixed grid that holds every voxel where its soft warped
    indicator is non-zero (plus a one-voxel rim) and ``regions[c]`` ``(B, 1, *box)``, that indicator there. ``block``
    is the bounding box of all of them, where the Jacobian losses evaluate ``J``.
    """

    displacement: torch.Tensor
    spacing: tuple[float, float, float]
    indicators: torch.Tensor  # (B, n, D, H, W) on the moving grid, n = active columns
    active: torch.Tensor  # (B, n) bool
    weights: torch.Tensor  # (n,)
    boxes: list[_Box] = field(default_factory=list)
    regions: list[torch.Tensor] = field(default_factory=list)
    mass: torch.Tensor | None = None  # (B, n) sums of the regions (voxels)
    block: _Box | None = None


def _setup(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None,
    label_values: Sequence[int] | None,
    vertebra_weights: Mapping[int, float] | None,
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
    if columns.numel():
        _warp_regions(setup)
    return setup


def _warp_regions(setup: _Setup) -> None:
    """Soft warped indicators ``s_i o phi`` of the active columns, each on its own block of the fixed grid."""
    u = setup.displacement
    setup.boxes, setup.block = _support_boxes(setup.indicators, u)
    for c, box in enumerate(setup.boxes):
        coords = _box_grid(box, u) + u[(slice(None), slice(None), *box)]
        setup.regions.append(sample_at(setup.indicators[:, c : c + 1], coords))
    setup.mass = torch.stack([region.flatten(1).sum(1) for region in setup.regions], dim=1)


def _box_grid(box: _Box, like: torch.Tensor) -> torch.Tensor:
    """``(1, 3, *box)`` full-grid voxel coordinates of the voxels of ``box``."""
    shape = [s.stop - s.start for s in box]
    start = torch.tensor([s.start for s in box], dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)
    return identity_grid(shape, like.device, like.dtype) + start


def _support_boxes(indicators: torch.Tensor, displacement: torch.Tensor) -> tuple[list[_Box], _Box]:
    """Per-column blocks of the fixed grid outside which the warped indicators are exactly 0, and their union.

    Args:
        indicators: ``(B, n, D, H, W)`` 0/1 on the moving grid; every column is non-empty in some sample.
        displacement: ``(B, 3, D, H, W)`` voxels.

    Returns:
        One block per column (a one-voxel block inside the union where a vertebra maps wholly off the fixed grid)
        and the union block.
    """
    shape = tuple(displacement.shape[2:])
    n = indicators.shape[1]
    with torch.no_grad():
        low, high = _extents(indicators.amax(dim=0) > 0)  # labelled voxels of each column on the moving grid
        coords = identity_grid(shape, displacement.device, displacement.dtype) + displacement
        inside = None
        for axis in range(3):
            y = coords[:, axis : axis + 1]
            near = (y > (low[:, axis] - 1 - _SUPPORT_TOLERANCE).to(y.dtype).view(1, n, 1, 1, 1)) & (
                y < (high[:, axis] + 1 + _SUPPORT_TOLERANCE).to(y.dtype).view(1, n, 1, 1, 1)
            )
            inside = near if inside is None else inside & near
        first, last = _extents(inside.view(torch.uint8).amax(dim=0).bool())  # fixed-grid voxels reaching a column
        bounds = torch.stack([first, last], dim=2).tolist()  # (n, 3, 2)
    boxes: list[_Box | None] = []
    for c in range(n):
        low_high = bounds[c]
        if any(high < low for low, high in low_high):
            boxes.append(None)
            continue
        spans = zip(low_high, shape, strict=True)
        boxes.append(tuple(slice(max(low - 1, 0), min(high + 2, size)) for (low, high), size in spans))
    found = [box for box in boxes if box is not None]
    if found:
        block = tuple(slice(min(box[a].start for box in found), max(box[a].stop for box in found)) for a in range(3))
    else:
        block = (slice(0, 1),) * 3
    single = tuple(slice(s.start, s.start + 1) for s in block)
    return [single if box is None else box for box in boxes], block


def _extents(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index along each spatial axis where ``mask`` ``(n, D, H, W)`` (bool) holds.

    Returns two ``(n, 3)`` int64 tensors; ``last < first`` where the mask is empty.
    """
    flags = mask.view(torch.uint8)  # max-reductions of uint8 are much faster than any() over several axes on CPU
    rows = flags.amax(dim=3)  # (n, D, H)
    hits = (rows.amax(dim=2), rows.amax(dim=1), flags.amax(dim=(1, 2)))
    first, last = [], []
    for hit in hits:
        index = torch.arange(hit.shape[1], device=mask.device)
        first.append(torch.where(hit > 0, index, hit.shape[1]).amin(dim=1))
        last.append(torch.where(hit > 0, index, -1).amax(dim=1))
    return torch.stack(first, dim=1), torch.stack(last, dim=1)


def _within(box: _Box, block: _Box) -> tuple[slice, slice, slice, slice, slice]:
    """Index of ``box`` inside a ``(B, C, *block)`` tensor."""
    inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, block, strict=True))
    return (slice(None), slice(None), *inner)


def _reduce(terms: torch.Tensor, setup: _Setup) -> torch.Tensor:
    """Per-sample mean over active vertebrae of the weighted terms ``(B, n)``, then mean over non-empty samples."""
    count = setup.active.sum(dim=1)
    has = count > 0
    if terms.numel() == 0 or not bool(has.any()):
        return setup.displacement.sum() * 0.0
    weighted = torch.where(setup.active, terms * setup.weights[None], torch.zeros_like(terms))
    per_sample = weighted.sum(dim=1) / count.clamp_min(1).to(terms.dtype)
    return per_sample[has].mean()


def _region_means(values: torch.Tensor, setup: _Setup) -> torch.Tensor:
    """Mean of ``(B, 1, *block)`` values over each soft warped region -> ``(B, n)``."""
    totals = [
        (region * values[_within(box, setup.block)]).flatten(1).sum(1)
        for region, box in zip(setup.regions, setup.boxes, strict=True)
    ]
    return torch.stack(totals, dim=1) / setup.mass.clamp_min(_EPS)


def _fitted_rigid_maps(setup: _Setup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Detached closest rigid maps (eq. 2) of the active columns, ``R`` ``(B, 3, 3)`` and ``t`` ``(B, 3)`` (mm).

    Each map is expressed in its block's frame (mm from the block's first voxel): displacements, residuals and the
    rotation do not depend on the frame.
    """
    maps = []
    for region, box in zip(setup.regions, setup.boxes, strict=True):
        local = setup.displacement[(slice(None), slice(None), *box)]
        r, t = fit_rigid_to_regions(region.detach().clamp_min(0.0), local.detach(), setup.spacing)
        maps.append((r[:, 0], t[:, 0]))
    return maps


def _loss_terms(
    setup: _Setup, names: Sequence[str], num_points: int | None = None, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Per-vertebra terms ``(B, n)`` of the losses ``names``, sharing the Jacobian and the rigid fits."""
    terms = {}
    if "pc" in names or "oc" in names:
        jacobian = jacobian_matrix(setup.displacement[(slice(None), slice(None), *setup.block)], setup.spacing)
        if "pc" in names:
            terms["pc"] = _region_means((determinant(jacobian) - 1.0) ** 2, setup)
        if "oc" in names:
            terms["oc"] = _region_means(orthonormality_residual(jacobian), setup)
    if "volume" in names:
        original = setup.indicators.flatten(2).sum(-1).clamp_min(1.0)
        terms["volume"] = ((setup.mass - original) / original) ** 2
    needs_fit = "rigid_dice" in names or ("rigid_field" in names and num_points is None)
    maps = _fitted_rigid_maps(setup) if needs_fit else []
    if "rigid_field" in names:
        if num_points is None:
            terms["rigid_field"] = _dense_field_terms(setup, maps)
        else:
            terms["rigid_field"] = _sampled_field_terms(setup, num_points, generator)
    if "rigid_dice" in names:
        terms["rigid_dice"] = _rigid_dice_terms(setup, maps)
    return terms


def _mm_scale(like: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(spacing, dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


def _dense_field_terms(setup: _Setup, maps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Region-weighted mean of ``|phi_rigid - phi|^2`` (mm^2) per vertebra, ``(B, n)``."""
    u = setup.displacement
    scale = _mm_scale(u, setup.spacing)
    terms = []
    for region, box, (rotation, translation) in zip(setup.regions, setup.boxes, maps, strict=True):
        shape = [s.stop - s.start for s in box]
        with torch.no_grad():
            rigid_mm = rigid_displacement(rotation, translation, shape, setup.spacing).to(u.dtype) * scale
        squared = ((rigid_mm - u[(slice(None), slice(None), *box)] * scale) ** 2).sum(dim=1, keepdim=True)
        terms.append((region * squared).flatten(1).sum(1))
    return torch.stack(terms, dim=1) / setup.mass.clamp_min(_EPS)


def _rigid_dice_terms(setup: _Setup, maps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``1 - Dice(s_i o T_i, s_i o phi)`` per vertebra, ``(B, n)``; ``s_i o T_i`` is warped on the full grid (it may
    reach beyond the block of ``s_i o phi``)."""
    u = setup.displacement
    shape = u.shape[2:]
    terms = []
    for c, (region, box, (rotation, translation)) in enumerate(zip(setup.regions, setup.boxes, maps, strict=True)):
        with torch.no_grad():
            start = torch.tensor([s.start for s in box], dtype=rotation.dtype, device=rotation.device)
            start = start * torch.tensor(setup.spacing, dtype=rotation.dtype, device=rotation.device)
            # Back to the full grid's frame: y - o = R (x - o) + t  =>  y = R x + t + o - R o.
            full_translation = translation + start - rotation @ start
            field_ = rigid_displacement(rotation, full_translation, shape, setup.spacing).to(u.dtype)
            rigid = warp(setup.indicators[:, c : c + 1], field_)
            rigid_norm = (rigid**2).flatten(1).sum(1)
            rigid = rigid[(slice(None), slice(None), *box)]
        overlap = 2.0 * (rigid * region).flatten(1).sum(1)
        norm = rigid_norm + (region**2).flatten(1).sum(1)
        terms.append(1.0 - overlap / norm.clamp_min(_EPS))
    return torch.stack(terms, dim=1)


def _loss(
    name: str,
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None,
    label_values: Sequence[int] | None,
    vertebra_weights: Mapping[int, float] | None,
    **options,
) -> torch.Tensor:
    setup = _setup(moving_labels, displacement, spacing, label_values, vertebra_weights)
    if setup.mass is None:
        return _reduce(setup.active.to(setup.displacement.dtype), setup)
    return _reduce(_loss_terms(setup, (name,), **options)[name], setup)


def rigidity_loss(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    weights: Mapping[str, float],
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """Weighted sum ``sum_k weights[k] * loss_k`` of several rigidity losses, sharing their work.

    Equal to adding the individual losses (``rigid_field`` with every voxel), but the indicators are warped, the
    Jacobian is computed and the rigid maps are fitted once for all terms.

    Args:
        moving_labels, displacement, spacing, label_values, vertebra_weights: See the module docstring.
        weights: ``{name: weight >= 0}`` with names from :data:`RIGIDITY_LOSSES`; weight-0 terms are skipped.

    Returns:
        Scalar; a zero attached to the graph of ``displacement`` when no term or no vertebra is active.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"rigidity weights must be a dict {{name: weight}}, got {type(weights).__name__}")
    chosen = {}
    for name, weight in weights.items():
        if name not in RIGIDITY_LOSSES:
            raise InputError(f"unknown rigidity loss {name!r}; choose from {sorted(RIGIDITY_LOSSES)}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"weight of rigidity loss {name} must be a number, got {weight!r}")
        if not (float(weight) >= 0 and float(weight) < float("inf")):
            raise InputError(f"weight of rigidity loss {name} must be finite and >= 0, got {weight}")
        if float(weight) > 0:
            chosen[name] = float(weight)
    setup = _setup(moving_labels, displacement, spacing, label_values, vertebra_weights)
    if setup.mass is None or not chosen:
        return setup.displacement.sum() * 0.0
    terms = _loss_terms(setup, tuple(chosen))
    total = None
    for name, weight in chosen.items():
        value = weight * _reduce(terms[name], setup)
        total = value if total is None else total + value
    return total


def properness_loss(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """Properness condition (eq. 6): mean of ``(det J_phi - 1)^2`` over each warped vertebra, ``J`` in mm/mm."""
    return _loss("pc", moving_labels, displacement, spacing, label_values, vertebra_weights)


def orthonormality_loss(
    moving_labels: torch.Tensor,
    displacement: torch.Tensor,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """Orthonormality condition (eq. 7): mean of ``||J^T J - I||_F^2`` over each warped vertebra, ``J`` in mm/mm."""
    return _loss("oc", moving_labels, displacement, spacing, label_values, vertebra_weights)


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
    return _loss("volume", moving_labels, displacement, spacing, label_values, vertebra_weights)


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
    return _loss("rigid_dice", moving_labels, displacement, spacing, label_values, vertebra_weights)


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
    return _loss(
        "rigid_field",
        moving_labels,
        displacement,
        spacing,
        label_values,
        vertebra_weights,
        num_points=num_points,
        generator=generator,
    )


def _sampled_field_terms(setup: _Setup, num_points: int, generator: torch.Generator | None) -> torch.Tensor:
    """Rigid field terms ``(B, n)`` on ``num_points`` voxels drawn from each crisp warped region (mm^2)."""
    u = setup.displacement
    scale = _mm_scale(u, setup.spacing)
    b, n = setup.active.shape
    points = [(_box_grid(box, u) * scale).flatten(2)[0] for box in setup.boxes]  # (3, V) mm, full-grid frame
    fields = [(u[(slice(None), slice(None), *box)] * scale).flatten(2) for box in setup.boxes]  # (B, 3, V) mm
    terms = torch.zeros((b, n), dtype=u.dtype, device=u.device)
    rows = []
    for s in range(b):  # samples outside, vertebrae inside: the order of the draws from ``generator``
        row = []
        for c in range(n):
            inside = (setup.regions[c][s].detach().flatten() > 0.5).nonzero()[:, 0]
            if not bool(setup.active[s, c]) or inside.numel() < 3:
                row.append(terms[s, c])
                continue
            if inside.numel() > num_points:
                pick = torch.randperm(inside.numel(), generator=generator, device="cpu")[:num_points]
                inside = inside[pick.to(inside.device)]
            z = points[c][:, inside].T  # (P, 3) mm
            target = z + fields[c][s][:, inside].T
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
#: The per-vertebra rigidity terms by name: the weight fields of ``LossConfig`` and ``RefineWeights``, what a preset's
#: ``rigidity_scale`` multiplies (:mod:`..choices`).
RIGIDITY_TERMS = tuple(RIGIDITY_LOSSES)
