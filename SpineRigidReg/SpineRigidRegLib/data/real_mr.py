"""The real MR example as a fixed image: its vertebrae split into named levels, and a CT synthesised from its labels.

The TotalSegmentator MR example (``example_mr_sm.nii.gz``, 3 mm, LPS, 20 axial slices) comes with a ``total_mr`` label
map in which every vertebra has one label (19), the intervertebral discs another (20) and the spinal cord 21. For a
benchmark whose fixed image is this real MR, the vertebrae are split into levels (connected components of label 19,
which the discs separate, ordered along the spine) and named, and a CT of the same anatomy is synthesised from the
labels (:func:`ct_from_mr_labels`): a cortical shell and cancellous bone from the distance to each vertebra's
surface, discs, cord and CSF, organs, muscle, fat and air (fat told from other soft tissue by the MR's own intensity,
air outside the body), a slight blur and CT noise.

Level names cannot be read off a 60 mm slab; the example's organs (adrenal glands, pancreas, upper kidney poles) put
its two vertebrae at the thoracolumbar junction, so they are named T12 and L1 by default (``lowest_level``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import Geometry
from ..io import read_image
from .vertebrae import TOTALSEGMENTATOR, vertebra_label, vertebra_name

#: TotalSegmentator ``total_mr`` ids of the MR example.
MR_VERTEBRAE, MR_DISCS, MR_CORD = 19, 20, 21
#: ``total_mr`` ids of solid organs/vessels/muscles and their CT numbers (HU, non-contrast).
MR_ORGAN_HU: dict[int, float] = {
    1: 45.0,  # spleen
    2: 32.0,  # right kidney
    3: 32.0,  # left kidney
    4: 10.0,  # gallbladder
    5: 58.0,  # liver
    6: 25.0,  # stomach
    7: 40.0,  # pancreas
    8: 30.0,  # adrenal glands
    9: 30.0,
    10: -850.0,  # lungs
    11: -850.0,
    12: 35.0,  # oesophagus
    13: 25.0,  # small bowel
    14: 25.0,  # duodenum
    15: 15.0,  # colon
    22: 40.0,  # heart
    23: 42.0,  # aorta and large vessels
    24: 42.0,
    25: 42.0,
    26: 42.0,
    27: 42.0,
}
MUSCLE_HU, FAT_HU, SOFT_HU, AIR_HU = 52.0, -100.0, 35.0, -1000.0
DISC_HU, CORD_HU, CSF_HU = 85.0, 35.0, 8.0
CORTICAL_HU, CANCELLOUS_HU = (800.0, 1100.0), (160.0, 260.0)
#: Thickness (mm) of the cortical shell the CT numbers fall off over.
CORTEX_MM = 1.2
_EXAMPLE = "totalsegmentator-examples"


@dataclass
class RealMR:
    """The real MR example ready for the benchmark.

    Attributes:
        mr: The MR (float32, its own 3 mm LPS grid).
        labels: ``total_mr`` labels on the MR grid (as read).
        levels: Vertebra levels on the MR grid, one TotalSegmentator CT id per level (e.g. 32 T12, 31 L1).
        names: Level id -> name, caudal first.
    """

    mr: sitk.Image
    labels: sitk.Image
    levels: sitk.Image
    names: dict[int, str]


def _folder(shared_data: str | Path) -> Path:
    folder = Path(shared_data)
    return folder / _EXAMPLE if (folder / _EXAMPLE).is_dir() else folder


def real_mr_available(shared_data: str | Path | None) -> bool:
    """True when ``shared_data`` holds the MR example and its labels."""
    if shared_data is None:
        return False
    folder = _folder(shared_data)
    return (folder / "example_mr_sm.nii.gz").is_file() and (folder / "example_seg_mr.nii.gz").is_file()


def split_vertebra_levels(
    labels: sitk.Image, lowest_level: str = "L1", vertebra_id: int = MR_VERTEBRAE, min_fraction: float = 0.2
) -> tuple[sitk.Image, dict[int, str]]:
    """Split one all-vertebrae label into levels, named from the caudal end.

    The discs separate the vertebrae, so the connected components (6-connected) of ``vertebra_id`` are the levels;
    fragments smaller than ``min_fraction`` of the largest component are dropped. Components are ordered along the
    spine by their LPS S coordinate (the MR is axial), the most caudal taking ``lowest_level``.

    Args:
        labels: A label map with all vertebrae in ``vertebra_id``, any geometry.
        lowest_level: Name of the most caudal level (``"L1"``; TotalSegmentator naming).
        vertebra_id: The vertebra label.
        min_fraction: Smallest kept component, relative to the largest.

    Returns:
        ``(levels, names)``: uint16 level map on ``labels``' grid holding TotalSegmentator CT ids, and id -> name.
    """
    mask = sitk.Cast(labels == vertebra_id, sitk.sitkUInt8)
    components = sitk.ConnectedComponent(mask, False)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    found = [(c, stats.GetNumberOfPixels(c), stats.GetCentroid(c)) for c in stats.GetLabels()]
    if not found:
        raise InputError(f"the MR label map holds no vertebra (label {vertebra_id})")
    largest = max(n for _, n, _ in found)
    kept = sorted((c for c in found if c[1] >= min_fraction * largest), key=lambda c: c[2][2])  # LPS z: superior
    first = vertebra_label(lowest_level, TOTALSEGMENTATOR)  # TotalSegmentator ids grow cranially (L5 27 ... T1 43)
    array = sitk.GetArrayFromImage(components)
    out = np.zeros(array.shape, np.uint16)
    names = {}
    for rank, (component, _, _) in enumerate(kept):
        level = first + rank
        out[array == component] = level
        names[level] = vertebra_name(level, TOTALSEGMENTATOR)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(labels)
    return image, names


def load_real_mr(shared_data: str | Path, lowest_level: str = "L1") -> RealMR:
    """Read the MR example and split its vertebrae into named levels (:func:`split_vertebra_levels`)."""
    folder = _folder(shared_data)
    mr_path, seg_path = folder / "example_mr_sm.nii.gz", folder / "example_seg_mr.nii.gz"
    for path in (mr_path, seg_path):
        if not path.is_file():
            raise InputError(f"TotalSegmentator MR example file not found: {path}")
    mr = sitk.Cast(read_image(mr_path), sitk.sitkFloat32)
    labels = read_image(seg_path)
    if not Geometry.of(labels).same_grid(Geometry.of(mr)):
        labels = sitk.Resample(labels, mr, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    levels, names = split_vertebra_levels(labels, lowest_level)
    return RealMR(mr=mr, labels=sitk.Cast(labels, sitk.sitkUInt16), levels=levels, names=names)


def smooth_labels_on(labels: sitk.Image, reference: sitk.Image | Geometry, sigma_mm: float = 1.5) -> sitk.Image:
    """Resample a coarse label map onto a finer grid with smooth boundaries (not nearest-neighbour steps).

    Each label's mask is blurred (``sigma_mm``), resampled linearly and the label with the largest value above 0.5
    wins; everything else is 0. Points outside ``labels``' field of view take the nearest slice's value (the map is
    extended by replication), so a grid larger than the MR slab holds continued anatomy.

    Returns:
        uint16 labels on ``reference``.
    """
    if isinstance(reference, Geometry):
        reference = reference.reference_image()
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v > 0]
    best = sitk.GetArrayFromImage(reference) * 0.0
    best_value = np.full(best.shape, 0.5, np.float32)
    out = np.zeros(best.shape, np.uint16)
    for value in values:
        mask = sitk.SmoothingRecursiveGaussian(sitk.Cast(labels == value, sitk.sitkFloat32), sigma_mm)
        fine = sitk.GetArrayFromImage(_resample_extended(mask, reference))
        win = fine > best_value
        out[win] = value
        best_value[win] = fine[win]
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image


def _resample_extended(image: sitk.Image, reference: sitk.Image, linear: bool = True) -> sitk.Image:
    """Resample with the image extended by replicating its border (an ITK ``ZeroFluxNeumann``-like boundary)."""
    pad = [4, 4, 4]
    padded = sitk.ZeroFluxNeumannPad(image, pad, pad)
    grown = sitk.ZeroFluxNeumannPad(padded, [60] * 3, [60] * 3)
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(grown, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID())


def ct_from_mr_labels(
    real: RealMR, reference: sitk.Image | Geometry, rng: np.random.Generator, noise_hu: float = 12.0
) -> tuple[sitk.Image, sitk.Image]:
    """A CT (HU) of the real MR's anatomy on ``reference`` (about 1 mm), and its vertebra levels there.

    Vertebrae: cancellous bone (one CT number per level drawn from :data:`CANCELLOUS_HU`, with a smooth trabecular
    variation) rising to a cortical shell (:data:`CORTICAL_HU`) over :data:`CORTEX_MM` from the surface (the signed
    distance to the level's smooth surface). Discs, cord and CSF (2.5 mm around the cord), organs
    (:data:`MR_ORGAN_HU`) and muscles (every other named structure) take fixed numbers; unnamed voxels are air
    outside the body, fat where the MR is bright (Otsu threshold of the unnamed body voxels) and soft tissue
    elsewhere. The result is blurred by a 0.6 mm Gaussian (the CT's point spread) and Gaussian noise of ``noise_hu``
    is added. Beyond the MR slab the anatomy continues by replication, without bone.

    Args:
        real: The MR example (:func:`load_real_mr`).
        reference: The CT grid.
        rng: Random source.
        noise_hu: CT noise standard deviation.

    Returns:
        ``(ct, levels)``: float32 HU and uint16 vertebra levels on ``reference``.
    """
    if isinstance(reference, Geometry):
        reference = reference.reference_image()
    labels, mr, level = _mr_on_reference(real, reference)
    spacing = float(min(reference.GetSpacing()))
    hu = _soft_tissue_hu(labels, mr, spacing)
    # rng draws, in this order: the trabecular field, two CT numbers per level, the CT noise.
    _paint_vertebrae(hu, labels, level, rng, spacing)
    ct = _acquire_ct(hu, reference, rng, noise_hu)
    levels = sitk.GetImageFromArray(level.astype(np.uint16))
    levels.CopyInformation(reference)
    return ct, levels


def _mr_on_reference(real: RealMR, reference: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MR example on the CT grid, each ``(D, H, W)``: its ``total_mr`` labels (int32), its intensities and the
    smooth vertebra levels (0 beyond the MR slab: replicated vertebra slices would make a column)."""
    levels = smooth_labels_on(real.levels, reference)
    labels = sitk.GetArrayFromImage(_resample_extended(real.labels, reference, linear=False)).astype(np.int32)
    mr = sitk.GetArrayFromImage(_resample_extended(real.mr, reference))
    inside_slab = sitk.GetArrayFromImage(
        sitk.Resample(real.mr * 0 + 1, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    )
    level = sitk.GetArrayFromImage(levels)
    level[inside_slab == 0] = 0
    return labels, mr, level


def _soft_tissue_hu(labels: np.ndarray, mr: np.ndarray, spacing: float) -> np.ndarray:
    """float32 HU ``(D, H, W)`` of everything but bone: named structures from ``labels``; unnamed voxels from the MR's
    intensity (air outside the body, fat where bright, soft tissue elsewhere). ``spacing``: the grid's finest (mm)."""
    unnamed = labels == 0
    threshold_air = 0.08 * float(np.percentile(mr, 99))
    body = _body_mask(mr, threshold_air)
    body_values = mr[unnamed & body]
    fat_threshold = _otsu(body_values) if body_values.size > 100 else threshold_air
    hu = np.full(mr.shape, SOFT_HU, np.float32)
    hu[unnamed & (mr > fat_threshold)] = FAT_HU
    hu[~body & unnamed] = AIR_HU
    named = labels > 0
    hu[named] = MUSCLE_HU
    for organ, value in MR_ORGAN_HU.items():
        hu[labels == organ] = value
    hu[labels == MR_DISCS] = DISC_HU
    cord = labels == MR_CORD
    csf = sitk.GetArrayFromImage(
        sitk.BinaryDilate(sitk.GetImageFromArray(cord.astype(np.uint8)), [max(int(round(2.5 / spacing)), 1)] * 3)
    ).astype(bool)
    hu[csf & ~cord] = CSF_HU
    hu[cord] = CORD_HU
    return hu


def _body_mask(mr: np.ndarray, threshold: float) -> np.ndarray:
    """bool ``(D, H, W)``: inside the body, slice by slice along ``D``: above ``threshold`` with the holes filled."""
    body = np.zeros(mr.shape, bool)
    for k in range(mr.shape[0]):
        body[k] = sitk.GetArrayFromImage(
            sitk.BinaryFillhole(sitk.GetImageFromArray((mr[k] > threshold).astype(np.uint8)))
        ).astype(bool)
    return body


def _paint_vertebrae(
    hu: np.ndarray, labels: np.ndarray, level: np.ndarray, rng: np.random.Generator, spacing: float
) -> None:
    """Write the vertebrae into ``hu`` (``(D, H, W)``, in place): per level, a cancellous core rising to a cortical
    shell over :data:`CORTEX_MM` from its surface; ``spacing`` (mm) is the grid's finest."""
    hu[(labels == MR_VERTEBRAE) & (level == 0)] = SOFT_HU  # slab vertebra voxels the smooth levels leave out
    trabecular = _smooth_field(rng, level.shape, 4.0 / spacing)
    for value in [int(v) for v in np.unique(level) if v > 0]:
        mask = level == value
        depth = -sitk.GetArrayFromImage(
            sitk.SignedMaurerDistanceMap(
                sitk.GetImageFromArray(mask.astype(np.uint8)), insideIsPositive=False, useImageSpacing=False
            )
        )
        depth = depth * spacing  # mm inside (> 0)
        cancellous = rng.uniform(*CANCELLOUS_HU)
        cortical = rng.uniform(*CORTICAL_HU)
        shell = np.clip(1.0 - (depth[mask] - 0.5 * spacing) / CORTEX_MM, 0.0, 1.0)
        core = cancellous * (1.0 + 0.15 * trabecular[mask])
        hu[mask] = core + (cortical - core) * shell


def _acquire_ct(hu: np.ndarray, reference: sitk.Image, rng: np.random.Generator, noise_hu: float) -> sitk.Image:
    """float32 CT on ``reference``: ``hu`` blurred by a 0.6 mm Gaussian (the CT's point spread), plus Gaussian noise
    of standard deviation ``noise_hu``."""
    image = sitk.GetImageFromArray(hu)
    image.CopyInformation(reference)
    image = sitk.SmoothingRecursiveGaussian(image, 0.6)
    array = sitk.GetArrayFromImage(image) + rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
    ct = sitk.GetImageFromArray(array.astype(np.float32))
    ct.CopyInformation(reference)
    return ct


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1D sample."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    weight = np.cumsum(hist)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    between = (mean[-1] * weight / total - mean) ** 2 / np.maximum(weight * (total - weight), 1)
    return float(centres[int(np.argmax(between[:-1]))])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: float) -> np.ndarray:
    """A zero-mean, unit-SD smooth random field (Gaussian-filtered white noise)."""
    noise = sitk.GetImageFromArray(rng.standard_normal(shape).astype(np.float32))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, float(sigma_voxels)))
    return (smooth - smooth.mean()) / max(float(smooth.std()), 1e-6)


__all__ = [
    "MR_CORD",
    "MR_DISCS",
    "MR_VERTEBRAE",
    "RealMR",
    "ct_from_mr_labels",
    "load_real_mr",
    "real_mr_available",
    "smooth_labels_on",
    "split_vertebra_levels",
]
