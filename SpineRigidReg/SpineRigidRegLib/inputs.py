"""The images and label maps a registration accepts: checked, made finite, put on their image's grid.

Each failure raises :class:`..errors.InputError` with one line naming the problem, before any long computation;
the caller's images are never changed (a repaired copy is returned instead).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Geometry
from .preprocess import resample_to_reference
from .validation import check_image

log = logging.getLogger(__name__)


def validate_image(image: object, name: str) -> sitk.Image:
    """Raise :class:`InputError` unless ``image`` is a finite 3D scalar SimpleITK image of at least 2 voxels a side."""
    check_image(image, name)
    if min(image.GetSize()) < 2:
        raise InputError(f"{name} is too small ({image.GetSize()}): a 3D volume is needed")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return image


def finite_copy(image: sitk.Image, name: str) -> sitk.Image:
    """``image`` itself when all its voxels are finite, else a copy with NaN and -inf set to its lowest finite value
    and +inf to its highest (a warning says how many); the caller's image is never changed.

    Raises:
        InputError: no finite voxel at all.
    """
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.floating):
        return image
    finite = np.isfinite(array)
    if finite.all():
        return image
    if not finite.any():
        raise InputError(f"{name} holds no finite value (all NaN or infinite)")
    low, high = float(array[finite].min()), float(array[finite].max())
    nan, pos, neg = int(np.isnan(array).sum()), int(np.isposinf(array).sum()), int(np.isneginf(array).sum())
    fixed = np.nan_to_num(array, nan=low, posinf=high, neginf=low)
    log.warning(
        "%s: %d NaN, %d +inf and %d -inf voxels of %d set to its lowest finite value %g (NaN, -inf) and highest "
        "%g (+inf); the input file is unchanged",
        name,
        nan,
        pos,
        neg,
        array.size,
        low,
        high,
    )
    out = sitk.GetImageFromArray(fixed)
    out.CopyInformation(image)
    return out


def validate_intensity_image(image: object, name: str) -> sitk.Image:
    """A CT or MR for :func:`register`: :func:`validate_image` after :func:`finite_copy`, with contrast, and a
    warning for a left-handed direction matrix.

    Raises:
        InputError: see :func:`validate_image`; also a constant image (nothing to register).
    """
    if isinstance(image, sitk.Image):
        image = finite_copy(image, name)
    image = validate_image(image, name)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    if stats.GetMinimum() == stats.GetMaximum():
        raise InputError(
            f"{name} has no contrast: every voxel is {stats.GetMinimum():g} (a blank or failed export?); "
            "nothing to register"
        )
    if np.linalg.det(np.asarray(image.GetDirection()).reshape(3, 3)) < 0:
        log.warning(
            "%s has a left-handed direction matrix (determinant -1): its voxel axes are a mirror image of a scanner's; "
            "if the image was flipped on export the registration cannot find the match, so check it in a viewer",
            name,
        )
    return image


def validate_labels(labels: object, reference: sitk.Image, name: str = "CT vertebra label map") -> sitk.Image:
    """Return integer vertebra labels on ``reference``'s grid, resampling by physical position when needed.

    Raises:
        InputError: non-integer values, empty map, a single vertebra, or no physical overlap with the image.
    """
    labels = validate_image(labels, name)
    array = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            raise InputError(f"{name} must hold integer labels (one per vertebra), found fractional values")
        labels = sitk.Cast(labels, sitk.sitkInt32)
    if np.min(array) < 0:
        raise InputError(f"{name} has negative values")
    if not Geometry.of(labels).same_grid(Geometry.of(reference)):
        if not _overlap(Geometry.of(labels), Geometry.of(reference)):
            raise InputError(f"{name} does not overlap its image in physical space")
        log.info("%s is on another grid than its image: resampled by physical position", name)
        labels = resample_to_reference(labels, reference, is_label=True)
    array = sitk.GetArrayViewFromImage(labels)
    box = labelled_box(array)
    if box is None:
        raise InputError(f"{name} is empty (no vertebra labelled)")
    values = np.unique(array[box])  # within the labelled box: a 512 x 512 x 400 map's full sort took seconds
    values = values[values > 0]
    if len(values) == 1:
        raise InputError(
            f"{name} holds a single vertebra (label {int(values[0])}); give one label per vertebra, at least two"
        )
    return labels


def labelled_box(array: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Array-index slices of the smallest box holding every non-zero voxel of ``array`` (``None``: all zero)."""
    box = []
    for axis in range(array.ndim):
        others = tuple(a for a in range(array.ndim) if a != axis)
        hits = np.flatnonzero(np.any(array, axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


#: How far around the labelled vertebrae the CT is kept for computing (mm): the processing grid's margin
#: (:attr:`..settings.RegistrationSettings.margin_mm`), the automatic pre-alignment's spine region (25 mm) and the
#: interpolation around them all lie within it.
COMPUTE_MARGIN_MM = 60.0


def crop_to_spine(
    moving: sitk.Image, moving_labels: sitk.Image, margin_mm: float = COMPUTE_MARGIN_MM
) -> tuple[sitk.Image, sitk.Image]:
    """The CT and its labels cut to the labelled vertebrae plus ``margin_mm`` (LPS geometry kept: the cut's
    origin moves, spacing and direction stay); both unchanged when the cut would keep nearly all of them.

    A whole-body 512 x 512 x 400 CT otherwise makes every stage before the processing grid (the pre-alignment's
    spine region, its metric, the resampling) work on four times the voxels it needs (105 M instead of 27 M
    with the phantom of ``srr-benchmark --speed``).
    """
    box = labelled_box(sitk.GetArrayViewFromImage(moving_labels))
    if box is None:
        return moving, moving_labels
    size = moving_labels.GetSize()  # x, y, z
    spacing = moving_labels.GetSpacing()
    start, stop = [], []
    for axis in range(3):
        along = box[2 - axis]  # the array's axes are z, y, x
        pad = int(np.ceil(margin_mm / spacing[axis]))
        start.append(max(along.start - pad, 0))
        stop.append(min(along.stop + pad, size[axis]))
    extent = [b - a for a, b in zip(start, stop, strict=True)]
    if np.prod(extent) > 0.8 * np.prod(size):
        return moving, moving_labels
    return sitk.RegionOfInterest(moving, extent, start), sitk.RegionOfInterest(moving_labels, extent, start)


def _overlap(a: Geometry, b: Geometry) -> bool:
    lo_a, hi_a = _frame_box(a, b)
    return bool(np.all(hi_a >= -0.5) and np.all(lo_a <= np.asarray(b.shape) - 0.5))


def _frame_box(a: Geometry, b: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Array-index bounding box of grid ``a``'s corners in grid ``b``."""
    idx = b.lps_to_array_index(a.corners_lps())
    return idx.min(axis=0), idx.max(axis=0)


def image_digest(image: sitk.Image) -> str:
    """sha1 of an image's voxels, pixel type and geometry: the same digest means the same image (the MR of a
    re-run, whose segmentation and bias correction are kept)."""
    digest = hashlib.sha1(sitk.GetArrayViewFromImage(image).tobytes())
    geometry = (image.GetPixelIDValue(), image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    digest.update(repr(geometry).encode())
    return digest.hexdigest()
