"""The pair on its processing grid: the MR's direction, 1 mm voxels, the CT spine plus a margin.

:func:`processing_grid` chooses the grid; :func:`to_processing_grid` resamples everything the network and the
optimisation stages need onto it, once, into a :class:`ProcessingPair`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .geometry import Geometry, image_to_tensor
from .inputs import image_digest
from .prealign import Prealignment
from .preprocess import field_of_view, normalize_intensity, resample_to_reference
from .settings import RegistrationSettings
from .system import available_memory_bytes

log = logging.getLogger(__name__)

#: Largest processing grid (voxels); bigger regions are processed at a coarser spacing instead of failing.
MAX_GRID_VOXELS = 160 * 160 * 224


def processing_grid(
    fixed: Geometry,
    moving_labels: sitk.Image,
    prealignment: Prealignment,
    settings: RegistrationSettings,
    multiple: int,
) -> Geometry:
    """The grid the network sees: the MR's direction, ``settings.spacing_mm`` voxels, covering the CT vertebrae
    (mapped into MR space by the pre-alignment) plus a margin, sized to a multiple of ``multiple``."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(moving_labels > 0, sitk.sitkUInt8))
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    g = Geometry.of(moving_labels)
    corners = np.array(
        [[k, j, i] for k in (z0, z0 + sz - 1) for j in (y0, y0 + sy - 1) for i in (x0, x0 + sx - 1)], dtype=float
    )
    moving_pts = g.array_index_to_lps_points(corners)
    inverse = np.linalg.inv(prealignment.matrix)
    fixed_pts = moving_pts @ inverse[:3, :3].T + inverse[:3, 3]
    direction = fixed.direction_matrix
    frame = (fixed_pts - np.asarray(fixed.origin)) @ direction  # coordinates along the MR's i, j, k axes (mm)
    lo = frame.min(axis=0) - settings.margin_mm
    hi = frame.max(axis=0) + settings.margin_mm
    spacing = settings.spacing_mm
    for _ in range(20):
        size = np.ceil((hi - lo) / spacing / multiple).astype(int) * multiple
        if np.prod(size) <= MAX_GRID_VOXELS:
            break
        spacing *= 1.1
    centre = (lo + hi) / 2.0
    start = centre - (size - 1) * spacing / 2.0
    origin = np.asarray(fixed.origin) + direction @ start
    if spacing != settings.spacing_mm:
        log.warning("spine region is large: processed at %.2f mm instead of %.2f mm", spacing, settings.spacing_mm)
    return Geometry(
        shape=(int(size[2]), int(size[1]), int(size[0])),
        spacing=(spacing, spacing, spacing),
        origin=tuple(float(o) for o in origin),
        direction=fixed.direction,
    )


#: An MR whose coarsest spacing is at least this many times its finest is a stack of thick slices: it gets a
#: :class:`SliceProfile`, which the vertebra-wise stage uses when its ``slice_model`` is on.
THICK_SLICE_RATIO = 1.5


class SliceProfile(NamedTuple):
    """Where a thick-slice MR's voxels lie on the processing grid, and how thick its slices are.

    On the processing grid the MR is interpolated between slice centres. The edge of a bone that falls between two
    slices is placed there by that interpolation up to a tenth of the slice spacing off (it depends on where the edge
    falls), and the vertebra-wise stage followed it: vertebrae of a pair in register moved 0.25-0.45 mm along the
    slices' normal. Comparing the MR at its own voxel centres with the CT averaged across the slice thickness
    removes that bias (docs/BENCHMARKS_TIERS.md).

    Attributes:
        axis: The processing grid's array axis along the slices' normal.
        centre: Continuous array index, on the processing grid, of one MR voxel centre ``(3,)``.
        step: The MR's spacing in processing-grid voxels, array order ``(3,)``.
        taps: Offsets (processing-grid voxels along ``axis``) at which the CT is averaged across one slice.
    """

    axis: int
    centre: tuple[float, float, float]
    step: tuple[float, float, float]
    taps: tuple[float, ...]


def slice_profile(fixed: Geometry, grid: Geometry) -> SliceProfile | None:
    """The :class:`SliceProfile` of MR grid ``fixed`` on processing ``grid`` (same direction); ``None`` for an MR
    whose voxels are not thick slices (:data:`THICK_SLICE_RATIO`) or whose axes are not the grid's."""
    spacing = np.asarray(fixed.spacing_array_order, dtype=float)
    if spacing.max() < THICK_SLICE_RATIO * spacing.min() or not np.allclose(fixed.direction, grid.direction):
        return None
    step = spacing / np.asarray(grid.spacing_array_order, dtype=float)
    axis = int(np.argmax(step))
    count = max(int(np.ceil(step[axis])), 2)  # about one tap per processing voxel across the slice
    taps = ((np.arange(count) + 0.5) / count - 0.5) * step[axis]
    centre = grid.lps_to_array_index(np.asarray(fixed.origin, dtype=float)[None])[0]
    return SliceProfile(axis, tuple(float(c) for c in centre), tuple(float(s) for s in step), tuple(taps.tolist()))


def check_memory(grid: Geometry, device: torch.device) -> None:
    """Refuse a run that cannot fit, with a plain message, before torch fails deep inside."""
    voxels = int(np.prod(grid.shape))
    needed = voxels * 4 * 48  # ~48 float32 volumes at peak (network activations + refinement), measured margin
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_memory_bytes()
    if free is not None and needed > free:
        raise InputError(
            f"not enough memory: the {grid.shape} processing grid needs about {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB is free (use a larger --spacing or a smaller margin)"
        )


def point_pairs_to_voxels(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], pre: Prealignment, grid: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CT point, MR point) pairs -> processing-grid voxels: (MR point, pre-aligned CT point)."""
    ct = np.asarray([p[0] for p in pairs], dtype=np.float64).reshape(-1, 3)
    mr = np.asarray([p[1] for p in pairs], dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(ct)) or not np.all(np.isfinite(mr)):
        raise InputError("point pairs must be finite coordinates")
    inverse = np.linalg.inv(pre.matrix)
    ct_in_fixed = ct @ inverse[:3, :3].T + inverse[:3, 3]
    return (
        torch.as_tensor(grid.lps_to_array_index(mr), dtype=torch.float32),
        torch.as_tensor(grid.lps_to_array_index(ct_in_fixed), dtype=torch.float32),
    )


#: How far from a point pair's CT point a vertebra may lie for the pair to be on it (mm): points are placed on the
#: bone's surface, where the label map may end a voxel short.
POINT_ON_VERTEBRA_MM = 3.0


def vertebrae_at_points(pair: ProcessingPair) -> list[int]:
    """The vertebra labels that the pair's point pairs lie on: for each CT point (pre-aligned, on the grid) the label
    of the nearest vertebra voxel within :data:`POINT_ON_VERTEBRA_MM`, if any; sorted, no repeats."""
    if pair.point_pairs is None:
        return []
    labels = pair.moving_labels[0, 0]
    spacing = torch.tensor(pair.spacing, dtype=torch.float32, device=labels.device)
    shape = torch.tensor(labels.shape, device=labels.device)
    reach = torch.ceil(POINT_ON_VERTEBRA_MM / spacing).long()
    found = set()
    for point in pair.point_pairs[1].float().to(labels.device):
        low = (point.floor().long() - reach).clamp_min(0)
        high = torch.minimum(point.ceil().long() + reach + 1, shape)
        if bool((high <= low).any()):
            continue  # the point lies beyond the grid
        window = labels[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
        voxels = window.nonzero()
        if len(voxels) == 0:
            continue
        distances = (((voxels + low - point) * spacing) ** 2).sum(dim=1).sqrt()
        nearest = int(distances.argmin())
        if float(distances[nearest]) <= POINT_ON_VERTEBRA_MM:
            found.add(int(window[tuple(voxels[nearest].tolist())]))
    return sorted(found)


@dataclass
class ProcessingPair:
    """The pair as the network and the optimisation stages see it; every volume ``(1, 1, D, H, W)`` on one grid.

    Attributes:
        fixed: MR intensities mapped to [0, 1] (:func:`..preprocess.normalize_intensity` inside its view).
        moving: pre-aligned CT, [0, 1] the same way.
        moving_labels: pre-aligned CT vertebra labels, int64.
        spacing: mm per voxel, array order ``(D, H, W)``.
        fixed_mask, moving_mask: bool, where the MR / the pre-aligned CT have data (``None``: everywhere).
        fixed_bone: float MR vertebral-bone probability in [0, 1] (label-guided networks), or ``None``.
        point_pairs: voxel coordinates ``(MR points (N, 3), pre-aligned CT points (N, 3))``, or ``None``.
        grid: the grid's geometry (``None`` for tensors given without one, e.g. a benchmark's synthetic pair).
        prealignment: the rigid map the CT was resampled through (``None`` likewise).
        fixed_slices: where a thick-slice MR's own voxels lie on the grid (:func:`slice_profile`), or ``None``.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    moving_labels: torch.Tensor
    spacing: tuple[float, float, float]
    fixed_mask: torch.Tensor | None = None
    moving_mask: torch.Tensor | None = None
    fixed_bone: torch.Tensor | None = None
    point_pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    grid: Geometry | None = None
    prealignment: Prealignment | None = None
    fixed_slices: SliceProfile | None = None

    def copy(self) -> ProcessingPair:
        """A copy whose tensors share no memory with this pair's."""
        return self.to(self.fixed.device, copy=True)

    def to(self, device: torch.device | str, copy: bool = False) -> ProcessingPair:
        """A copy with every tensor on ``device`` (``copy``: new memory even where a tensor is there already)."""

        def move(x):
            return None if x is None else x.to(device, copy=copy)

        return ProcessingPair(
            move(self.fixed),
            move(self.moving),
            move(self.moving_labels),
            self.spacing,
            move(self.fixed_mask),
            move(self.moving_mask),
            move(self.fixed_bone),
            None if self.point_pairs is None else tuple(move(p) for p in self.point_pairs),
            self.grid,
            self.prealignment,
            self.fixed_slices,
        )


def to_processing_grid(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    pre: Prealignment,
    grid: Geometry,
    fixed_bone: sitk.Image | None = None,
    point_pairs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> ProcessingPair:
    """Resample the MR, the pre-aligned CT and its labels (and the MR bone probability) onto ``grid``, once.

    The last pair built is kept (:func:`forget_kept_pair`): a re-run on the same images, pre-alignment and grid (a
    manual correction, whose point pairs change) gets a copy of it instead of resampling again (0.15 s of the sample
    case's correction).

    Args:
        fixed: MR; moving: CT in HU; moving_labels: CT vertebra labels on the CT's grid.
        pre: Rigid pre-alignment (fixed -> moving LPS).
        grid: The processing grid (:func:`processing_grid`).
        fixed_bone: MR vertebral-bone probability on the MR's grid, or ``None``.
        point_pairs: ``(CT LPS point, MR LPS point)`` pairs, or ``None``.

    Raises:
        InputError: the MR and the pre-aligned CT spine barely overlap.
    """
    key = _pair_key(fixed, moving, moving_labels, fixed_bone, pre, grid)
    if not (_KEPT_PAIR and _KEPT_PAIR[0][0] == key):
        _KEPT_PAIR[:] = [(key, _resampled(fixed, moving, moving_labels, pre, grid, fixed_bone))]
    pair = _KEPT_PAIR[0][1]
    return replace(
        pair.copy(),
        prealignment=pre,
        point_pairs=point_pairs_to_voxels(point_pairs, pre, grid) if point_pairs else None,
    )


#: :func:`to_processing_grid`'s last pair (without point pairs) and what it was built from.
_KEPT_PAIR: list[tuple[tuple, ProcessingPair]] = []


def _pair_key(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_bone: sitk.Image | None,
    pre: Prealignment,
    grid: Geometry,
) -> tuple:
    """What a pair is built from: the images' digests (:func:`.inputs.image_digest`), the pre-alignment, the grid."""
    images = (fixed, moving, moving_labels, fixed_bone)
    return (*(None if image is None else image_digest(image) for image in images), pre.matrix.tobytes(), grid)


def forget_kept_pair() -> None:
    """Drop the pair :func:`to_processing_grid` keeps (a benchmark timing a first registration)."""
    _KEPT_PAIR.clear()


def _resampled(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    pre: Prealignment,
    grid: Geometry,
    fixed_bone: sitk.Image | None,
) -> ProcessingPair:
    """:func:`to_processing_grid`'s pair, without point pairs."""
    pre_t = pre.transform()
    inside = image_to_tensor(field_of_view(fixed, grid)) > 0
    if inside.float().mean() < 0.1:
        raise InputError("the MR and the CT spine do not overlap after pre-alignment (check landmarks/orientation)")
    ct_min = float(sitk.GetArrayViewFromImage(moving).min())
    bone = None
    if fixed_bone is not None:
        bone = image_to_tensor(resample_to_reference(sitk.Cast(fixed_bone, sitk.sitkFloat32), grid)).clamp(0, 1)
    return ProcessingPair(
        fixed=normalize_intensity(image_to_tensor(resample_to_reference(fixed, grid)), mask=inside),
        moving=normalize_intensity(image_to_tensor(resample_to_reference(moving, grid, pre_t, default_value=ct_min))),
        moving_labels=image_to_tensor(resample_to_reference(moving_labels, grid, pre_t, is_label=True), torch.int64),
        spacing=grid.spacing_array_order,
        fixed_mask=inside,
        moving_mask=image_to_tensor(field_of_view(moving, grid, pre_t)) > 0,
        fixed_bone=bone,
        grid=grid,
        prealignment=pre,
        fixed_slices=slice_profile(Geometry.of(fixed), grid),
    )
