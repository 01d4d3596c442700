"""The grid the segmentation network works on: axis-aligned with the patient (LPS), cubic voxels.

A convolutional network is not rotation invariant, so every image is resampled onto a grid whose array axes are the
patient's ``(S, P, L)`` (array order ``(k, j, i)``, identity direction in LPS) before it reaches the network, whatever
the scanner's slice orientation (axial, sagittal, oblique). Training label maps are put on the same kind of grid.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import Geometry
from ..preprocess import resample_to_reference

#: Voxel size (mm) the network sees: fine enough for a vertebral body (about 15 voxels across), coarse enough for a
#: whole lumbar MR on a CPU in about a second.
WORKING_SPACING_MM = 2.0


def canonical_geometry(geometry: Geometry, spacing_mm: float = WORKING_SPACING_MM) -> Geometry:
    """The identity-direction (LPS) grid of ``spacing_mm`` cubic voxels that covers ``geometry``'s field of view.

    Args:
        geometry: Any grid (oblique, sagittal, left-handed).
        spacing_mm: Voxel size of the new grid.

    Returns:
        A :class:`Geometry` with direction = identity whose voxel centres span the bounding box of the input's
        corner voxel centres.
    """
    if not np.isfinite(spacing_mm) or spacing_mm <= 0:
        raise InputError(f"spacing must be a positive number of mm, got {spacing_mm}")
    d, h, w = geometry.shape
    corners = np.array([[i, j, k] for i in (0, w - 1) for j in (0, h - 1) for k in (0, d - 1)], dtype=np.float64)
    lps = geometry.array_index_to_lps_points(corners[:, ::-1])  # array order (k, j, i)
    low, high = lps.min(axis=0), lps.max(axis=0)
    size_itk = [int(np.ceil((hi - lo) / spacing_mm - 1e-6)) + 1 for lo, hi in zip(low, high, strict=True)]
    return Geometry(
        shape=(size_itk[2], size_itk[1], size_itk[0]),
        spacing=(spacing_mm,) * 3,
        origin=tuple(float(v) for v in low),
        direction=tuple(float(v) for v in np.eye(3).ravel()),
    )


def to_canonical(image: sitk.Image, spacing_mm: float = WORKING_SPACING_MM, is_label: bool = False) -> sitk.Image:
    """``image`` resampled onto :func:`canonical_geometry` (linear, or nearest for labels; 0 outside)."""
    return resample_to_reference(image, canonical_geometry(Geometry.of(image), spacing_mm), is_label=is_label)
