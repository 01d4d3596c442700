"""Evaluation metrics of the paper (Table 1 and the supplementary "PC as a metric"), without gradients.

Inputs may be torch tensors or numpy arrays:

- label maps: ``(D, H, W)`` or ``(1, 1, D, H, W)`` integers (float arrays must hold whole numbers), 0 = background;
- displacement fields: ``(3, D, H, W)`` or ``(1, 3, D, H, W)`` pull-back fields in voxels (see :mod:`.geometry`);
- masks: ``(D, H, W)`` or ``(1, 1, D, H, W)``, non-zero = inside.

One sample at a time (batch size 1). ``spacing`` is mm per voxel in array order ``(D, H, W)``; ``None`` means 1 mm.
Results are plain Python ``float``/``int``/``dict``; per-vertebra dicts are keyed by label value. A value that cannot
be measured (an empty region) is ``nan``; :func:`summarize` skips those.

The moving and fixed grids are assumed to coincide (same shape and spacing), as after the preprocessing: the
moving label map, the displacement and the fixed labels share one grid. The *crisp warped vertebra* ``s_i o phi`` is
``warp_labels(moving_labels, u) == i`` (every label competing for each voxel, as the user sees the warped map), except
in the rigid Dice, which compares vertebra ``i`` with itself (see :func:`rigid_dice_per_label`).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .jacobian import determinant, jacobian_matrix, orthonormality_residual
from .losses.rigidity import _check_label_values
from .rigid import fit_rigid_to_field, rigid_displacement
from .validation import check_label_tensor, check_spacing
from .warp import _cached_identity, _sample_at, label_boxes, present_labels, warp_labels


# ------------------------------------------------------------------------------------------------------ inputs
def _to_tensor(x: object, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got dtype object")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _as_volume(x: object, name: str) -> torch.Tensor:
    """``(D, H, W)`` or ``(1, 1, D, H, W)`` -> ``(1, 1, D, H, W)``."""
    t = _to_tensor(x, name)
    if t.dim() == 3:
        t = t[None, None]
    if t.dim() != 5 or t.shape[:2] != (1, 1):
        raise InputError(f"{name} must be (D, H, W) or (1, 1, D, H, W) (one sample), got shape {tuple(t.shape)}")
    return t


def _labels(x: object, name: str) -> torch.Tensor:
    t = _as_volume(x, name)
    if not t.is_floating_point():
        t = t.long()  # also widens unsigned and bool maps, which not every torch op supports
    return check_label_tensor(t, name).long()


def _field(x: object, name: str) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.dim() == 4:
        t = t[None]
    if t.dim() != 5 or t.shape[:2] != (1, 3):
        raise InputError(f"{name} must be (3, D, H, W) or (1, 3, D, H, W) voxels, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point field, got {t.dtype}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return t


def _mask(x: object | None, like: torch.Tensor) -> torch.Tensor:
    """Boolean ``(1, 1, D, H, W)`` mask on ``like``'s grid; ``None`` means everywhere."""
    if x is None:
        return torch.ones((1, 1, *like.shape[2:]), dtype=torch.bool, device=like.device)
    t = _as_volume(x, "mask")
    if t.shape[2:] != like.shape[2:]:
        raise InputError(f"mask grid {tuple(t.shape[2:])} differs from the field grid {tuple(like.shape[2:])}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError("mask contains NaN or infinite values")
    return (t != 0).to(like.device)


def _same_grid(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[2:] != b.shape[2:]:
        raise InputError(f"{name_a} grid {tuple(a.shape[2:])} and {name_b} grid {tuple(b.shape[2:])} differ")


def _values(labels: torch.Tensor, label_values: Sequence[int] | None) -> list[int]:
    if label_values is not None:
        return _check_label_values(label_values)
    return present_labels(labels)


def _spacing_tensor(spacing: Sequence[float] | None, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(check_spacing(spacing), dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


# The region's statistics below read the whole grid through ``torch.where`` rather than selecting ``values[region]``:
# on the sample case's 3.3 M voxel grid the selection took 60-80 ms each time, most of the outputs' field summary.
def _region_mean(values: torch.Tensor, region: torch.Tensor) -> float:
    """Mean of ``values`` over the boolean ``region`` (same shape), summed in float64; ``nan`` for an empty one."""
    count = int(region.sum())
    return float("nan") if count == 0 else float(torch.where(region, values, 0.0).sum(dtype=torch.float64) / count)


def _region_max(values: torch.Tensor, region: torch.Tensor) -> float:
    """Largest of ``values`` over the boolean ``region``; ``nan`` for an empty one."""
    return float(torch.where(region, values, float("-inf")).max()) if bool(region.any()) else float("nan")


def _sd_log(det: torch.Tensor, valid: torch.Tensor) -> float:
    """Population SD of ``log det`` (float64) over the boolean ``valid``, where ``det > 0``; ``nan`` for an empty
    one."""
    count = int(valid.sum())
    if count == 0:
        return float("nan")
    logs = torch.where(valid, det, 1.0).double().log_()  # 0 outside ``valid``
    mean = logs.sum() / count
    return float(((logs - mean).square_() * valid).sum().div_(count).sqrt_())


# ------------------------------------------------------------------------------------------------------ overlap
def share_on_mask_percent(labels: torch.Tensor, mask: torch.Tensor) -> dict[int, float]:
    """For every label value ``v > 0`` of ``labels``: the percentage of its voxels where ``mask`` is true.

    Args:
        labels: integer label map, any shape.
        mask: bool, the same shape.
    """
    flat = labels.flatten().cpu()
    size = int(flat.max()) + 1 if flat.numel() else 1
    total = torch.bincount(flat, minlength=size)
    on = torch.bincount(flat[mask.flatten().cpu()], minlength=size)
    return {v: 100.0 * int(on[v]) / int(total[v]) for v in range(1, size) if int(total[v])}


def dice_per_label(a: object, b: object, label_values: Sequence[int] | None = None) -> dict[int, float]:
    """Dice similarity coefficient per label between two label maps on one grid.

    Args:
        a: Label map ``(D, H, W)`` or ``(1, 1, D, H, W)``.
        b: Label map on the same grid.
        label_values: Labels to score; ``None`` means every non-zero value in either map. A label absent from both
            maps scores ``nan``; absent from one, 0.

    Returns:
        ``{label: DSC in [0, 1]}``.
    """
    la, lb = _labels(a, "first label map"), _labels(b, "second label map")
    _same_grid(la, lb, "first label map", "second label map")
    if label_values is None:
        values = sorted(set(_values(la, None)) | set(_values(lb, None)))
    else:
        values = _check_label_values(label_values)
    return {v: _dice(la == v, lb == v) for v in values}


def rigid_dice_per_label(
    moving_labels: object,
    displacement: object,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
) -> dict[int, float]:
    """Rigid DSC per vertebra (Table 1): Dice of ``s_i o phi`` and ``s_i o T_i``.

    ``s_i o phi`` is the crisp warp of vertebra ``i``'s own binary mask (``warp_labels`` on ``1[labels == i]``);
    ``T_i`` is the rigid map fitted by least squares (mm) to ``phi`` over that crisp region
    (:func:`.rigid.fit_rigid_to_field`), and ``s_i o T_i`` the crisp warp of the same mask by ``T_i``'s field.
    Using the vertebra's own mask on both sides measures its shape alone, not its contacts with neighbours. A
    perfectly rigid motion of the vertebra gives 1.

    Returns:
        ``{label: rigid DSC}``, ``nan`` for a vertebra warped entirely out of the grid.
    """
    labels = _labels(moving_labels, "moving labels")
    u = _field(displacement, "displacement")
    _same_grid(labels, u, "moving labels", "displacement")
    labels = labels.to(u.device)
    step = check_spacing(spacing)
    target = _cached_identity(u.shape[2:], u.device, u.dtype) + u
    return {v: _rigid_dice_one(labels, v, u, step, target) for v in _values(labels, label_values)}


def _rigid_dice_one(
    labels: torch.Tensor,
    value: int,
    u: torch.Tensor,
    step: tuple[float, float, float],
    target: torch.Tensor | None = None,
    moving_box: tuple[torch.Tensor, torch.Tensor] | None = None,
    warped_box: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Rigid DSC of vertebra ``value``, computed inside the fixed-grid box that can hold either crisp warped mask.

    The mask's bilinear weight is zero for samples outside its one-voxel-dilated moving box, so both warped masks
    (by ``u`` and by the fitted rigid map) lie in the union of the voxels whose ``u`` lands in that box and the
    rigid map's pre-image of it: working in that box gives the full-grid result at a fraction of the cost.
    Callers scoring many vertebrae pass what is shared or already known: ``target`` (``identity + u``), the
    vertebra's ``moving_box`` and ``warped_box`` (bounding boxes, inclusive voxel indices, of the label in
    ``labels`` and in the multi-label crisp warp; the binary warp, which needs weight > 0.5, lies inside the latter).
    """
    shape = torch.tensor(u.shape[2:], device=u.device)
    if moving_box is None:
        found = (labels[0, 0] == value).nonzero()
        if found.numel() == 0:
            return float("nan")
        moving_box = (found.min(0).values, found.max(0).values)
    lo = (moving_box[0] - 1).clamp(min=0)
    hi = torch.minimum(moving_box[1] + 1, shape - 1)
    crop = (_in_box(labels, (lo, hi))[:1, :1] == value).to(u.dtype)
    if target is None:
        target = _cached_identity(u.shape[2:], u.device, u.dtype) + u
    if warped_box is None:
        lo_f, hi_f = lo.to(u.dtype).view(1, 3, 1, 1, 1), hi.to(u.dtype).view(1, 3, 1, 1, 1)
        reach = ((target > lo_f - 1) & (target < hi_f + 1)).all(dim=1)[0].nonzero()
        if reach.numel() == 0:
            return float("nan")
        warped_box = (reach.min(0).values, reach.max(0).values)
    box_a = warped_box
    warped_a = _crisp_in_box(crop, target, lo, box_a)
    if not bool(warped_a.any()):
        return float("nan")
    rotation, translation = fit_rigid_to_field(warped_a.to(u.dtype), _in_box(u, box_a), step)
    # The rigid map's pre-image of the moving box: its 8 corners mapped back (array-aligned mm frame of box_a).
    mm = torch.tensor(step, dtype=u.dtype, device=u.device)
    corners = torch.stack(torch.meshgrid(*[torch.stack([a - 1, b + 1]) for a, b in zip(lo, hi)], indexing="ij"), -1)
    corners = (corners.reshape(-1, 3).to(u.dtype) - box_a[0].to(u.dtype)) * mm
    back = ((corners - translation) @ rotation[0]) / mm + box_a[0].to(u.dtype)
    low = torch.minimum(box_a[0], back.min(0).values.floor().long().clamp(min=0))
    high = torch.maximum(box_a[1], torch.minimum(back.max(0).values.ceil().long(), shape - 1))
    box = (low, high)
    shift = (box_a[0] - low).to(u.dtype) * mm  # box_a's frame -> box's frame: y' = y + d, x' = x + d
    translation = translation + shift - shift @ rotation[0].T
    warped = _crisp_in_box(crop, target, lo, box)
    rigid_field = rigid_displacement(rotation, translation, tuple(int(x) for x in high - low + 1), step).to(u.dtype)
    rigid_target = _cached_identity(rigid_field.shape[2:], u.device, u.dtype) + rigid_field
    rigid_target = rigid_target + low.to(u.dtype).view(1, 3, 1, 1, 1)
    rigid = _sample_at(crop, rigid_target - lo.to(u.dtype).view(1, 3, 1, 1, 1), "bilinear", "zeros") > 0.5
    return _dice(warped, rigid)


def _in_box(volume: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return volume[(slice(None), slice(None), *(slice(int(a), int(b) + 1) for a, b in zip(*box)))]


def _crisp_in_box(
    crop: torch.Tensor, target: torch.Tensor, crop_start: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Crisp pull-back of a binary ``crop`` (starting at moving voxel ``crop_start``) at ``target`` inside ``box``:
    the vertebra wins where its bilinear weight beats the background's, as :func:`.warp.warp_labels` decides."""
    coords = _in_box(target, box) - crop_start.to(target.dtype).view(1, 3, 1, 1, 1)
    return _sample_at(crop, coords, "bilinear", "zeros") > 0.5


def volume_change_percent(
    moving_labels: object,
    displacement: object,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
) -> dict[int, float]:
    """Signed relative volume change per vertebra (%): the crisp warped vertebra ``R_i = s_i o phi`` against the part
    of ``s_i`` it was mapped from, ``100 (|R_i| / integral_{R_i} det J_phi - 1)``.

    Where the whole vertebra stays inside the grid, ``integral_{R_i} det J_phi = |phi(R_i)| = |s_i|`` and this is the
    paper's ``100 (|s_i o phi| - |s_i|) / |s_i|`` (its ``%Δvol`` is the mean of the absolute values). Where the
    motion carries part of a vertebra out of the grid (a vertebra cut by the field of view that truly moves out),
    the label count alone would report the part that left as a volume loss, even for the true rigid motion; the
    integral counts only the part the grid still shows. A rigid map gives 0 exactly. Volumes in voxels of one grid
    (the moving and fixed grids coincide here), so ``spacing`` only enters ``det J``. ``nan`` for a label absent from
    the moving map, or whose warped region has ``integral det J <= 0`` (folded).
    """
    labels = _labels(moving_labels, "moving labels")
    u = _field(displacement, "displacement")
    _same_grid(labels, u, "moving labels", "displacement")
    labels = labels.to(u.device)
    values = _values(labels, label_values)
    if not values:
        return {}
    warped = warp_labels(labels, u, label_values=values)
    det = determinant(jacobian_matrix(u, check_spacing(spacing)))
    size = max(int(labels.max()), int(warped.max())) + 1
    original = torch.bincount(labels.flatten(), minlength=size)
    region = torch.bincount(warped.flatten(), minlength=size)
    covered = torch.bincount(warped.flatten(), weights=det.flatten().double(), minlength=size)
    return {v: _volume_change(int(original[v]), int(region[v]), float(covered[v])) for v in values}


def _volume_change(original: int, region: int, covered: float) -> float:
    """See :func:`volume_change_percent`: ``region`` warped voxels that cover ``covered`` moving voxels."""
    if original == 0 or covered <= 0:
        return float("nan")
    return 100.0 * (region / covered - 1.0)


# ------------------------------------------------------------------------------------------------------ field
def _jacobian(u: torch.Tensor, spacing: Sequence[float] | None) -> torch.Tensor:
    return jacobian_matrix(u, check_spacing(spacing))


def folding_voxels(displacement: object, spacing: Sequence[float] | None = None, mask: object | None = None) -> int:
    """Number of voxels (inside ``mask``) where ``det J_phi <= 0``: the field folds there."""
    u = _field(displacement, "displacement")
    region = _mask(mask, u)
    det = determinant(_jacobian(u, spacing))
    return int(((det <= 0) & region).sum())


def sd_log_jacobian(displacement: object, spacing: Sequence[float] | None = None, mask: object | None = None) -> float:
    """Population standard deviation of ``log det J_phi``.

    Taken over the voxels inside ``mask`` (all by default) where ``det J > 0``; folded voxels have no logarithm and
    are counted by :func:`folding_voxels` instead. ``nan`` if no voxel qualifies.
    """
    u = _field(displacement, "displacement")
    region = _mask(mask, u)
    det = determinant(_jacobian(u, spacing))
    return _sd_log(det, region & (det > 0))


def _per_vertebra_field_metric(
    moving_labels: object,
    displacement: object,
    spacing: Sequence[float] | None,
    label_values: Sequence[int] | None,
    which: str,
) -> dict[int, float]:
    labels = _labels(moving_labels, "moving labels")
    u = _field(displacement, "displacement")
    _same_grid(labels, u, "moving labels", "displacement")
    labels = labels.to(u.device)
    values = _values(labels, label_values)
    jac = _jacobian(u, spacing)
    per_voxel = (determinant(jac) - 1.0) ** 2 if which == "pc" else orthonormality_residual(jac)
    warped = warp_labels(labels, u, label_values=values) if values else labels
    return {v: _region_mean(per_voxel, warped == v) for v in values}


def properness_metric(
    moving_labels: object,
    displacement: object,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
) -> dict[int, float]:
    """ "PC as a metric": per vertebra, mean of ``(det J_phi - 1)^2`` over the crisp warped vertebra (lower: better)."""
    return _per_vertebra_field_metric(moving_labels, displacement, spacing, label_values, "pc")


def orthonormality_metric(
    moving_labels: object,
    displacement: object,
    spacing: Sequence[float] | None = None,
    label_values: Sequence[int] | None = None,
) -> dict[int, float]:
    """Per vertebra, mean of ``||J^T J - I||_F^2`` over the crisp warped vertebra (lower is better)."""
    return _per_vertebra_field_metric(moving_labels, displacement, spacing, label_values, "oc")


def _norm_mm(u: torch.Tensor, spacing: Sequence[float] | None) -> torch.Tensor:
    # Not Tensor.norm(dim=1): its channel reduction is about 5x slower on the CPU.
    return (u * _spacing_tensor(spacing, u)).square().sum(dim=1, keepdim=True).sqrt()


def target_registration_error(
    displacement: object,
    true_displacement: object,
    spacing: Sequence[float] | None = None,
    mask: object | None = None,
) -> float:
    """Mean Euclidean distance (mm) between the estimated and the true mapping over ``mask`` (all voxels by default).

    Both fields are voxel displacements on the same (fixed) grid, so ``|phi(x) - phi_true(x)| = |u(x) - u_true(x)|``.
    """
    u = _field(displacement, "displacement")
    v = _field(true_displacement, "true displacement")
    _same_grid(u, v, "displacement", "true displacement")
    region = _mask(mask, u)
    return _region_mean(_norm_mm(u - v.to(u), spacing), region)


def mean_displacement_mm(
    displacement: object, spacing: Sequence[float] | None = None, mask: object | None = None
) -> float:
    """Mean displacement length (mm) over ``mask`` (all voxels by default)."""
    u = _field(displacement, "displacement")
    return _region_mean(_norm_mm(u, spacing), _mask(mask, u))


def field_summary(
    displacement: object,
    spacing: Sequence[float] | None = None,
    mask: object | None = None,
    jacobian: torch.Tensor | None = None,
) -> dict[str, float]:
    """Whole-field plausibility numbers over ``mask`` (all voxels by default); ``jacobian`` (``jacobian_matrix`` of
    the displacement with ``spacing``) may be passed when the caller has it already.

    Returns:
        ``folding_voxels`` (int, ``det J <= 0``), ``folding_percent`` (of the masked voxels), ``sd_log_jacobian``
        (see :func:`sd_log_jacobian`), ``mean_displacement_mm`` and ``max_displacement_mm``.
    """
    u = _field(displacement, "displacement")
    region = _mask(mask, u)
    det = determinant(_jacobian(u, spacing) if jacobian is None else jacobian)
    folded = int(((det <= 0) & region).sum())
    norm = _norm_mm(u, spacing)
    count = int(region.sum())
    return {
        "folding_voxels": folded,
        "folding_percent": float("nan") if count == 0 else 100.0 * folded / count,
        "sd_log_jacobian": _sd_log(det, region & (det > 0)),
        "mean_displacement_mm": _region_mean(norm, region),
        "max_displacement_mm": _region_max(norm, region),
    }


# ------------------------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class VertebraColumn:
    """One column of the per-vertebra table (rows of :func:`vertebra_table` and the pipeline's additions).

    Attributes:
        key: The row key.
        title: Column title in tables (the Slicer table).
        short: Column title in the terminal (``srr-register``/``srr-evaluate``); ``None`` leaves it out there.
        kind: ``"string"``, ``"int"`` or ``"double"``.
        fmt: Format of a value in the terminal.
    """

    key: str
    title: str
    short: str | None
    kind: str
    fmt: str


#: The per-vertebra table's columns, in order: the one list the command lines and the Slicer table show.
VERTEBRA_TABLE_COLUMNS: tuple[VertebraColumn, ...] = (
    VertebraColumn("name", "Vertebra", "vertebra", "string", "{}"),
    VertebraColumn("label", "Label", None, "int", "{}"),
    VertebraColumn("rigid_dice", "Rigid DSC", "rigid DSC", "double", "{:.3f}"),
    VertebraColumn("volume_change_percent", "Volume change (%)", "Δvol %", "double", "{:+.2f}"),
    VertebraColumn("pc", "PC", "PC", "double", "{:.4f}"),
    VertebraColumn("oc", "OC", "OC", "double", "{:.4f}"),
    VertebraColumn("folding_voxels", "Folding voxels", "|J|<=0", "int", "{}"),
    VertebraColumn("mean_displacement_mm", "Mean displacement (mm)", "disp mm", "double", "{:.2f}"),
    VertebraColumn("dice", "DSC", "DSC", "double", "{:.3f}"),
    VertebraColumn("tre_mm", "TRE (mm)", "TRE mm", "double", "{:.2f}"),
    VertebraColumn("mr_coverage_percent", "In MR view (%)", "in MR %", "double", "{:.0f}"),
    VertebraColumn("mr_bone_percent", "On MR bone (%)", "on MR bone %", "double", "{:.0f}"),
)


def present_columns(rows: Sequence[Mapping]) -> list[VertebraColumn]:
    """The columns of :data:`VERTEBRA_TABLE_COLUMNS` that hold a value in at least one of ``rows``."""
    return [c for c in VERTEBRA_TABLE_COLUMNS if any(row.get(c.key) is not None for row in rows)]


def vertebra_table(
    moving_labels: object,
    displacement: object,
    spacing: Sequence[float] | None = None,
    fixed_labels: object | None = None,
    true_displacement: object | None = None,
    label_values: Sequence[int] | None = None,
    warped_labels: torch.Tensor | None = None,
    jacobian: torch.Tensor | None = None,
) -> list[dict[str, float | int]]:
    """One row of metrics per vertebra of the moving label map.

    Columns: ``label``; ``voxels`` (moving vertebra size); ``dice`` (crisp warped vertebra vs the fixed labels, only
    with ``fixed_labels``); ``rigid_dice`` (:func:`rigid_dice_per_label`); ``volume_change_percent`` (signed,
    :func:`volume_change_percent`); ``pc`` and ``oc`` (:func:`properness_metric`, :func:`orthonormality_metric`);
    ``folding_voxels`` inside the crisp warped vertebra; ``mean_displacement_mm`` over it; ``tre_mm`` (only with
    ``true_displacement``: mean error over the vertebra's region in the fixed grid under the true field,
    ``warp_labels(labels, u_true) == i``).

    ``warped_labels`` (``warp_labels(moving_labels, displacement)``) and ``jacobian`` (``jacobian_matrix`` of the
    displacement with ``spacing``) may be passed when the caller has them already. Every per-vertebra sum is one
    ``bincount`` over the grid, so the cost hardly grows with the number of vertebrae.
    """
    labels, u, step, fixed, truth = _table_inputs(moving_labels, displacement, spacing, fixed_labels, true_displacement)
    values = _values(labels, label_values)
    if not values:
        return []
    if warped_labels is None:
        warped = warp_labels(labels, u, label_values=values)
    else:
        warped = _labels(warped_labels, "warped labels").to(u.device)
        _same_grid(warped, u, "warped labels", "displacement")
    jac = jacobian_matrix(u, step) if jacobian is None else jacobian
    sums = _vertebra_sums(labels, u, step, warped, jac, fixed, truth, values)
    moving_boxes, warped_boxes = label_boxes(labels), label_boxes(warped)
    target = _cached_identity(u.shape[2:], u.device, u.dtype) + u
    rows: list[dict[str, float | int]] = []
    for v in values:
        rigid_dice = (
            _rigid_dice_one(labels, v, u, step, target, moving_boxes[v], warped_boxes[v])
            if v in warped_boxes
            else float("nan")
        )
        rows.append(_table_row(v, sums, rigid_dice))
    return rows


def _table_inputs(
    moving_labels: object,
    displacement: object,
    spacing: Sequence[float] | None,
    fixed_labels: object | None,
    true_displacement: object | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float], torch.Tensor | None, torch.Tensor | None]:
    """:func:`vertebra_table`'s inputs checked and on the displacement's device: ``(1, 1, D, H, W)`` moving labels,
    ``(1, 3, D, H, W)`` displacement (voxels), spacing (mm, array order), fixed labels and the true displacement
    (in the displacement's dtype), the last two ``None`` when not given."""
    labels = _labels(moving_labels, "moving labels")
    u = _field(displacement, "displacement")
    _same_grid(labels, u, "moving labels", "displacement")
    labels = labels.to(u.device)
    step = check_spacing(spacing)
    fixed = None
    if fixed_labels is not None:
        fixed = _labels(fixed_labels, "fixed labels").to(u.device)
        _same_grid(fixed, u, "fixed labels", "displacement")
    truth = None
    if true_displacement is not None:
        truth = _field(true_displacement, "true displacement").to(u)
        _same_grid(truth, u, "true displacement", "displacement")
    return labels, u, step, fixed, truth


@dataclass(frozen=True)
class _VertebraSums:
    """Per-label sums behind :func:`vertebra_table`, each ``(L,)`` and indexed by label value.

    Attributes:
        original: Moving vertebra voxels.
        region: Crisp warped vertebra voxels; the sums below (to ``folded``) run over them.
        covered: Sum of ``det J`` (the moving volume the warped vertebra covers, in voxels).
        pc, oc: Sums of ``(det J - 1)^2`` and of the orthonormality residual.
        displacement_mm: Sum of the displacement length (mm).
        folded: Voxels with ``det J <= 0``.
        overlap, fixed_count: Warped vertebra voxels on the same fixed label, and fixed label voxels (with fixed
            labels only).
        tre_sum, tre_count: Sum of the error against the true field (mm) over each vertebra's true region, and its
            voxels (with a true field only).
    """

    original: torch.Tensor
    region: torch.Tensor
    covered: torch.Tensor
    pc: torch.Tensor
    oc: torch.Tensor
    displacement_mm: torch.Tensor
    folded: torch.Tensor
    overlap: torch.Tensor | None
    fixed_count: torch.Tensor | None
    tre_sum: torch.Tensor | None
    tre_count: torch.Tensor | None


def _vertebra_sums(
    labels: torch.Tensor,
    u: torch.Tensor,
    step: tuple[float, float, float],
    warped: torch.Tensor,
    jac: torch.Tensor,
    fixed: torch.Tensor | None,
    truth: torch.Tensor | None,
    values: list[int],
) -> _VertebraSums:
    """All of :func:`vertebra_table`'s per-label sums, one ``bincount`` each (``jac``: ``(1, 3, 3, D, H, W)``)."""
    size = max(int(labels.max()), int(warped.max()), int(fixed.max()) if fixed is not None else 0) + 1
    # Every per-vertebra sum runs over the voxels inside a warped vertebra only (a small part of the grid).
    inside = (warped.flatten() > 0).nonzero().flatten()
    owner = warped.flatten()[inside]
    jac_in = jac.flatten(3)[..., inside][..., None, None]  # (1, 3, 3, N, 1, 1)
    det_in = determinant(jac_in).flatten()
    per_label = functools.partial(_per_owner, owner, size)
    tre_sum, tre_count = _tre_sums(labels, u, step, truth, values, size) if truth is not None else (None, None)
    return _VertebraSums(
        original=torch.bincount(labels.flatten(), minlength=size),
        region=per_label(),
        covered=per_label(det_in),
        pc=per_label((det_in - 1.0) ** 2),
        oc=per_label(orthonormality_residual(jac_in)),
        displacement_mm=per_label(_norm_mm(u.flatten(2)[..., inside][..., None, None], step)),
        folded=per_label(where=det_in <= 0),
        overlap=per_label(where=fixed.flatten()[inside] == owner) if fixed is not None else None,
        fixed_count=torch.bincount(fixed.flatten(), minlength=size) if fixed is not None else None,
        tre_sum=tre_sum,
        tre_count=tre_count,
    )


def _per_owner(
    owner: torch.Tensor, size: int, weights: torch.Tensor | None = None, where: torch.Tensor | None = None
) -> torch.Tensor:
    """``(size,)`` per-label count (or float64 sum of ``weights``) over the ``N`` voxels whose labels are ``owner``
    ``(N,)``; ``where`` ``(N,)`` keeps some of them."""
    index = owner if where is None else owner[where]
    if weights is not None:
        weights = weights.flatten().double()
        weights = weights if where is None else weights[where]
    return torch.bincount(index, weights=weights, minlength=size)


def _tre_sums(
    labels: torch.Tensor,
    u: torch.Tensor,
    step: tuple[float, float, float],
    truth: torch.Tensor,
    values: list[int],
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label: the summed error (mm) against the true field over the vertebra's region in the fixed grid under the
    true field, and that region's voxels; each ``(size,)``."""
    true_flat = warp_labels(labels, truth, label_values=values).flatten()
    tre_sum = torch.bincount(true_flat, weights=_norm_mm(u - truth, step).flatten().double(), minlength=size)
    return tre_sum, torch.bincount(true_flat, minlength=size)


def _table_row(v: int, sums: _VertebraSums, rigid_dice: float) -> dict[str, float | int]:
    """Vertebra ``v``'s row of :func:`vertebra_table` (columns in the table's order)."""

    def ratio(total: torch.Tensor, count: torch.Tensor) -> float:
        return float("nan") if int(count[v]) == 0 else float(total[v] / count[v])

    row: dict[str, float | int] = {"label": v, "voxels": int(sums.original[v])}
    if sums.overlap is not None and sums.fixed_count is not None:
        total = int(sums.region[v]) + int(sums.fixed_count[v])
        row["dice"] = float("nan") if total == 0 else 2.0 * int(sums.overlap[v]) / total
    row["rigid_dice"] = rigid_dice
    row["volume_change_percent"] = _volume_change(int(sums.original[v]), int(sums.region[v]), float(sums.covered[v]))
    row["pc"] = ratio(sums.pc, sums.region)
    row["oc"] = ratio(sums.oc, sums.region)
    row["folding_voxels"] = int(sums.folded[v])
    row["mean_displacement_mm"] = ratio(sums.displacement_mm, sums.region)
    if sums.tre_sum is not None and sums.tre_count is not None:
        row["tre_mm"] = ratio(sums.tre_sum, sums.tre_count)
    return row


def summarize(
    rows: Sequence[Mapping[str, float | int]], field: Mapping[str, float | int] | None = None
) -> dict[str, float | int]:
    """Mean and population SD of every numeric column of :func:`vertebra_table` rows (``label`` excluded).

    Keys are ``<column>_mean`` and ``<column>_sd``, computed over the finite values; ``abs_volume_change_percent``
    (the paper's ``%Δvol``) is added when ``volume_change_percent`` is present; ``vertebrae`` is the row count.
    ``field`` (e.g. :func:`field_summary` of the whole field) is copied in unchanged.
    """
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    columns: dict[str, list[float]] = {}
    for row in rows:
        if not isinstance(row, Mapping):
            raise TypeError(f"each row must be a dict, got {type(row).__name__}")
        for key, value in row.items():
            if key == "label" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            columns.setdefault(key, []).append(float(value))
            if key == "volume_change_percent":
                columns.setdefault("abs_volume_change_percent", []).append(abs(float(value)))
    out: dict[str, float | int] = {"vertebrae": len(rows)}
    for key, values in columns.items():
        finite = [x for x in values if math.isfinite(x)]
        out[f"{key}_mean"] = float(np.mean(finite)) if finite else float("nan")
        out[f"{key}_sd"] = float(np.std(finite)) if finite else float("nan")
    if field is not None:
        out.update(field)
    return out
