"""Bone-guided rigid pre-alignment: the CT's vertebrae laid onto the vertebral bone the network found in the MR.

A label-to-label problem replaces the intensity match of :func:`..prealign.automatic_prealignment`:

1. **Translation search**, exhaustive: the CT bone mask's cross-correlation with the MR bone probability at every
   shift (one FFT on 4 mm patient-aligned grids). When the CT spine already lies in the MR's field of view in scanner
   coordinates (one session, table motion), a mild prior prefers shifts near the scanner frames': the vertebrae
   look alike, so a shift by one level can score almost as well as the right one.
2. **Rigid refinement**: mean squares between the two (smoothed) bone maps at 4 then 2 mm, from that translation.

The map is refused (``None``: the caller falls back to the intensity path) when the MR shows too little bone or the
aligned CT vertebrae overlap it too little.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import Geometry
from ..prealign import Prealignment, _matrix_of
from ..preprocess import resample_to_reference
from .grid import canonical_geometry

logger = logging.getLogger(__name__)

BONE_GUIDED = "automatic: MR vertebrae (segmentation network) + bone-map rigid"

#: Least predicted bone (mm^3) worth aligning to: about half a lumbar vertebral body.
MIN_BONE_MM3 = 15_000.0
#: Least share of each side the aligned bone maps must explain to accept the map: of the CT vertebrae inside the
#: MR's view, on predicted bone; of the predicted bone, under CT vertebrae. One-sided checks pass wrong maps: a CT
#: column laid one level off still covers a network's single found vertebra.
MIN_AGREEMENT = 0.5
#: Score penalty of a shift ``d`` away from the scanner frames: ``PRIOR_WEIGHT * (d / PRIOR_SCALE_MM) ** 2`` of the
#: best score.
PRIOR_WEIGHT = 0.1
PRIOR_SCALE_MM = 30.0
SEARCH_SPACING_MM = 4.0


def bone_prealignment(
    fixed: sitk.Image, bone_probability: sitk.Image, moving_labels: sitk.Image
) -> Prealignment | None:
    """Rigid fixed (MR) -> moving (CT) map from bone maps, or ``None`` when the MR's predicted bone cannot carry it.

    Args:
        fixed: The MR (its grid is the probability's).
        bone_probability: float32 vertebral-bone probability on ``fixed``'s grid (:func:`.predict.predict_bone`).
        moving_labels: CT vertebra labels (any grid).

    Returns:
        A :class:`~..prealign.Prealignment` (4x4 LPS, MR point -> CT point), or ``None``.
    """
    voxel_mm3 = float(np.prod(bone_probability.GetSpacing()))
    if float((sitk.GetArrayViewFromImage(bone_probability) > 0.5).sum()) * voxel_mm3 < MIN_BONE_MM3:
        logger.info("bone-guided pre-alignment skipped: the MR shows too little vertebral bone")
        return None
    mr_grid = canonical_geometry(Geometry.of(fixed), SEARCH_SPACING_MM)
    mr_bone = _array(resample_to_reference(bone_probability, mr_grid))
    ct_grid, ct_bone = _ct_bone_template(moving_labels)
    offset = _best_offset(mr_bone, ct_bone, _scanner_offset(mr_grid, ct_grid, moving_labels))
    translation = sitk.TranslationTransform(3, tuple(float(v) for v in (ct_grid.origin - _lps(mr_grid, offset))))
    rigid = _refine(bone_probability, moving_labels, translation)
    matrix = _matrix_of(rigid)
    ct_share, mr_share = _agreement(bone_probability, moving_labels, rigid)
    if min(ct_share, mr_share) < MIN_AGREEMENT:
        logger.warning(
            "bone-guided pre-alignment refused: %.0f %% of the CT vertebrae in the MR's view land on bone the network "
            "found, and %.0f %% of that bone under CT vertebrae (each must reach %.0f %%); using the intensity search",
            100 * ct_share,
            100 * mr_share,
            100 * MIN_AGREEMENT,
        )
        return None
    logger.info("bone-guided pre-alignment: %.0f %% / %.0f %% agreement", 100 * ct_share, 100 * mr_share)
    return Prealignment(matrix=matrix, method=BONE_GUIDED)


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float32)


def _ct_bone_template(moving_labels: sitk.Image) -> tuple[Geometry, np.ndarray]:
    """The CT bone mask (fraction of bone per voxel) on a 4 mm patient-aligned grid cropped to the vertebrae."""
    bone = sitk.Cast(moving_labels > 0, sitk.sitkFloat32)
    grid = canonical_geometry(Geometry.of(bone), SEARCH_SPACING_MM)
    array = _array(resample_to_reference(bone, grid))
    occupied = np.argwhere(array > 0.5)
    low, high = occupied.min(axis=0), occupied.max(axis=0) + 1
    cropped = array[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    origin = grid.array_index_to_lps_points(low[None].astype(np.float64))[0]
    geometry = Geometry(
        shape=tuple(int(n) for n in cropped.shape), spacing=grid.spacing, origin=tuple(origin), direction=grid.direction
    )
    return geometry, cropped


def _lps(grid: Geometry, index: np.ndarray) -> np.ndarray:
    return grid.array_index_to_lps_points(np.asarray(index, dtype=np.float64)[None])[0]


def _scanner_offset(mr_grid: Geometry, ct_grid: Geometry, moving_labels: sitk.Image) -> np.ndarray | None:
    """Array offset of the CT template in the MR grid under the identity map, when the CT spine lies in the MR's
    view there (else ``None``: no prior)."""
    offset = mr_grid.lps_to_array_index(np.asarray(ct_grid.origin, dtype=np.float64)[None])[0]
    centre = offset + (np.asarray(ct_grid.shape) - 1) / 2.0
    inside = np.all(centre >= 0) and np.all(centre <= np.asarray(mr_grid.shape) - 1)
    return offset if inside else None


def _best_offset(mr_bone: np.ndarray, ct_bone: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """Array offset ``o`` (voxels, may be negative) maximising ``sum_x ct(x) mr(x + o)``, less the prior's penalty."""
    shape = [a + b for a, b in zip(mr_bone.shape, ct_bone.shape, strict=True)]
    f = torch.fft.rfftn(torch.from_numpy(mr_bone), s=shape)
    g = torch.fft.rfftn(torch.from_numpy(ct_bone), s=shape)
    score = torch.fft.irfftn(f * torch.conj(g), s=shape).numpy()  # score[o mod shape]
    axes = [np.where(np.arange(n) < m, np.arange(n), np.arange(n) - n) for n, m in zip(shape, mr_bone.shape)]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
    if prior is not None:
        distance_mm = np.linalg.norm(offsets - prior.astype(np.float32), axis=-1) * SEARCH_SPACING_MM
        score = score - PRIOR_WEIGHT * float(score.max()) * (distance_mm / PRIOR_SCALE_MM) ** 2
    best = np.unravel_index(int(np.argmax(score)), score.shape)
    return offsets[best]


def _refine(bone_probability: sitk.Image, moving_labels: sitk.Image, initial: sitk.Transform) -> sitk.Transform:
    """Rigid mean-squares match of the CT bone mask (moving) to the MR bone probability (fixed), 4 then 2 mm,
    rotating about the MR's centre."""
    fixed = resample_to_reference(bone_probability, canonical_geometry(Geometry.of(bone_probability), 2.0))
    moving = sitk.Cast(moving_labels > 0, sitk.sitkFloat32)
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()]))
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(float(c) for c in centre))
    euler.SetTranslation(tuple(float(v) for v in np.asarray(initial.TransformPoint(tuple(centre))) - centre))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=0.01, numberOfIterations=100, gradientMagnitudeTolerance=1e-8
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([4.0, 2.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(euler, inPlace=False)
    return method.Execute(fixed, moving)


def _agreement(
    bone_probability: sitk.Image, moving_labels: sitk.Image, transform: sitk.Transform
) -> tuple[float, float]:
    """(share of the mapped CT vertebrae inside the MR's grid on predicted bone, share of predicted bone under CT
    vertebrae)."""
    mapped = (
        sitk.GetArrayViewFromImage(
            sitk.Resample(
                sitk.Cast(moving_labels > 0, sitk.sitkUInt8), bone_probability, transform, sitk.sitkNearestNeighbor, 0
            )
        )
        > 0
    )
    predicted = sitk.GetArrayViewFromImage(bone_probability) > 0.5
    both = float((mapped & predicted).sum())
    return both / max(float(mapped.sum()), 1.0), both / max(float(predicted.sum()), 1.0)
