"""The MR's intensity bias field (receive-coil shading), estimated and divided out before the registration.

A spine MR is brighter near the surface coil than away from it, smoothly over tens of mm. Under such a field one
vertebra's bone is brighter than its neighbour's, and the NMI of the vertebra-wise stage, one joint histogram over
all of them, found its optimum off the truth: on the clinical tier's pairs in register the field alone held the
vertebrae 0.08-0.14 mm off, and dividing it out (N4, Tustison et al. 2010) lowered the clinical cases' mean error
(the figures: docs/BENCHMARKS_TIERS.md, its session-17 paragraph).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import SimpleITK as sitk

from .inputs import image_digest

logger = logging.getLogger(__name__)

#: N4 fits the field on the MR shrunk to about this voxel size (mm): the field is smooth on this scale, and the fit
#: costs a fraction of a second instead of seconds at the MR's own resolution.
FIT_SPACING_MM = 5.0

#: B-spline fitting levels of N4 (each doubles the control points) and iterations at each.
FIT_LEVELS = 3
FIT_ITERATIONS = 10

#: The fit keeps at least this many voxels along each axis (a small MR is shrunk less), and at most this many in all.
MIN_FIT_VOXELS = 8
MAX_FIT_VOXELS = 40_000

#: An image with a larger share of negative voxels is not a magnitude MR (a CT given as the MR): left as it is.
MAX_NEGATIVE_SHARE = 0.05


def fit_factors(size: tuple[int, ...], spacing: tuple[float, ...]) -> list[int]:
    """Shrink factors per axis (x, y, z) for the fit: voxels of about :data:`FIT_SPACING_MM` (rounded down), every
    axis kept at :data:`MIN_FIT_VOXELS` or more, and the finest axes shrunk further while the fit would exceed
    :data:`MAX_FIT_VOXELS` (a 3 mm isotropic MR: 2.1 s at its own grid, 0.3 s at 6 mm)."""
    factors = [max(min(int(FIT_SPACING_MM // s), n // MIN_FIT_VOXELS), 1) for s, n in zip(spacing, size)]

    def voxels() -> int:
        return int(np.prod([-(-n // f) for n, f in zip(size, factors)]))

    while voxels() > MAX_FIT_VOXELS:
        coarser = [f * s for f, s, n in zip(factors, spacing, size) if n // (f + 1) >= MIN_FIT_VOXELS]
        if not coarser:
            break
        finest = min(coarser)
        factors = [
            f + 1 if np.isclose(f * s, finest) and n // (f + 1) >= MIN_FIT_VOXELS else f
            for f, s, n in zip(factors, spacing, size)
        ]
    return factors


def correct_bias_field(mr: sitk.Image) -> sitk.Image:
    """``mr`` divided by its N4 bias field: float32, same grid and geometry (``mr`` itself is not changed).

    The field is fitted on the MR shrunk to about :data:`FIT_SPACING_MM` within its Otsu foreground (tissue, not
    the air around the patient) and evaluated at every voxel of ``mr``. The last :data:`CACHED_MRS` MRs' results are
    kept: a manual-correction re-run reads the same MR (a quarter of a second of the sample case's re-run).
    """
    key = image_digest(mr)
    if key not in _CORRECTED:
        _CORRECTED[key] = _divided_by_field(mr)
        while len(_CORRECTED) > CACHED_MRS:
            _CORRECTED.popitem(last=False)
    return sitk.Image(_CORRECTED[key])  # a copy: the caller may change its own


#: MRs whose correction is kept for re-runs.
CACHED_MRS = 2
_CORRECTED: OrderedDict[str, sitk.Image] = OrderedDict()


def forget_corrections() -> None:
    """Empty :func:`correct_bias_field`'s cache (a benchmark timing a first registration)."""
    _CORRECTED.clear()


def _divided_by_field(mr: sitk.Image) -> sitk.Image:
    image = sitk.Cast(mr, sitk.sitkFloat32)
    if np.mean(sitk.GetArrayViewFromImage(image) < 0) > MAX_NEGATIVE_SHARE:
        # N4 models a multiplicative field on magnitudes; a magnitude MR's background may dip just below 0 (the
        # real MR example: 1.3 % of its voxels, down to -47 of 833), an image mostly below 0 is not one.
        logger.info("the MR has many negative intensities (not a magnitude image): its bias field is left in")
        return image
    foreground = sitk.OtsuThreshold(image, 0, 1, 200)
    factors = fit_factors(image.GetSize(), image.GetSpacing())
    small, small_foreground = sitk.Shrink(image, factors), sitk.Shrink(foreground, factors)
    if np.count_nonzero(sitk.GetArrayViewFromImage(small_foreground)) < MIN_FIT_VOXELS**2:
        return image  # too little tissue to fit a field on (a tiny or nearly empty image): leave it as it is
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([FIT_ITERATIONS] * FIT_LEVELS)
    try:
        n4.Execute(small, small_foreground)
    except RuntimeError as error:
        logger.warning(
            "the MR's bias field could not be estimated (%s); registering its intensities as they are", error
        )
        return image
    field = sitk.Cast(sitk.Exp(n4.GetLogBiasFieldAsImage(image)), sitk.sitkFloat32)
    corrected = sitk.Divide(image, field)  # "/" would give float64
    corrected.CopyInformation(mr)
    return corrected
