"""Clinical MR acquisitions of a synthetic contrast, and the posture change of clinical CT/MR pairs.

A clinical spine MR is not the CT's isotropic grid: it is a 2D multi-slice series (sagittal T2, axial T1) with 3-4 mm
slices and 0.6-0.8 mm pixels, an oblique direction matrix, a bias field, Rician noise, and a field of view that
covers fewer levels than the CT. :func:`clinical_grid` draws such a grid around the MR-frame vertebrae and
:func:`acquire_clinical` samples a clean contrast (on a fine grid) onto it: each slice averages the contrast over
its thickness (a box slice profile), then the bias field and the noise are applied on the MR grid.

:func:`textured_contrast` is :func:`.synthesis.t1_intensities` with texture within tissues (two smooth random fields,
3 and 10 mm, with a tissue-dependent amplitude), so that tissues are not flat classes.

:data:`CLINICAL_MOTION` is the posture change between a supine CT and an MR of the clinic, larger than the training
motion: the whole column up to 10 deg and 20 mm (norm), each joint up to 4 deg about each axis and each vertebra up
to 4 mm (norm) of jitter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import Geometry
from .phantom import Tissue
from .synthesis import SynthesisSettings, _smooth_noise, t1_intensities

_ROOT3 = math.sqrt(3.0)

#: Posture change of the clinical tier (per-axis limits chosen so that the norms stay within the stated bounds).
CLINICAL_MOTION = SynthesisSettings(
    max_flexion_deg=4.0,
    max_lateral_bending_deg=4.0,
    max_axial_rotation_deg=4.0,
    max_global_rotation_deg=10.0 / _ROOT3,
    max_translation_mm=20.0 / _ROOT3,
    max_vertebra_translation_mm=4.0 / _ROOT3,
    soft_tissue_amplitude_mm=3.0,
)

#: Amplitude (relative intensity) of the within-tissue texture, per :class:`~.phantom.Tissue` class.
TEXTURE_AMPLITUDE = {
    Tissue.BACKGROUND: 0.0,
    Tissue.FAT: 0.08,
    Tissue.MUSCLE: 0.12,
    Tissue.CORTICAL: 0.05,
    Tissue.MARROW: 0.15,
    Tissue.DISC: 0.12,
    Tissue.CORD: 0.05,
    Tissue.CSF: 0.05,
}


def scaled_motion(settings: SynthesisSettings, scale: float, vertebra_jitter: bool = True) -> SynthesisSettings:
    """``settings`` with every motion range (global, per joint, soft tissue, and with ``vertebra_jitter`` each
    vertebra's own jitter) multiplied by ``scale``. The Table 1 cases keep their jitter at every scale
    (``vertebra_jitter=False``), as their committed figures were made."""
    jitter = scale if vertebra_jitter else 1.0
    return replace(
        settings,
        max_flexion_deg=settings.max_flexion_deg * scale,
        max_lateral_bending_deg=settings.max_lateral_bending_deg * scale,
        max_axial_rotation_deg=settings.max_axial_rotation_deg * scale,
        max_global_rotation_deg=settings.max_global_rotation_deg * scale,
        max_translation_mm=settings.max_translation_mm * scale,
        max_vertebra_translation_mm=settings.max_vertebra_translation_mm * jitter,
        soft_tissue_amplitude_mm=settings.soft_tissue_amplitude_mm * scale,
    )


@dataclass(frozen=True)
class ClinicalAcquisition:
    """A clinical 2D multi-slice MR series (all ranges sampled uniformly).

    Attributes:
        orientation: ``"sagittal"`` (slices along left-right) or ``"axial"`` (slices along the spine).
        slice_thickness_mm: Slice thickness range (the slice spacing adds ``slice_gap``).
        slice_gap: Gap between slices, as a fraction of the thickness.
        in_plane_mm: Pixel size range.
        max_obliquity_deg: Largest rotation of the slice stack about each patient axis.
        across_mm: Coverage across the slices for a sagittal series (left-right, mm).
        in_plane_extent_mm: In-plane field of view (mm), cropped to the source grid.
        end_cut: Range of the fraction of the cranial end vertebra left outside the field of view.
        bias_strength: Standard deviation of the log bias field.
        bias_spacing_mm: Control-point spacing of the bias field.
        noise: Range of the Rician noise sigma, relative to the 99th intensity percentile.
        profile_samples: Samples across a slice's thickness (box slice profile).
    """

    orientation: str = "sagittal"
    slice_thickness_mm: tuple[float, float] = (3.0, 4.0)
    slice_gap: float = 0.1
    in_plane_mm: tuple[float, float] = (0.6, 0.8)
    max_obliquity_deg: float = 8.0
    across_mm: float = 64.0
    in_plane_extent_mm: float = 150.0
    end_cut: tuple[float, float] = (0.3, 0.5)
    bias_strength: float = 0.3
    bias_spacing_mm: float = 80.0
    noise: tuple[float, float] = (0.02, 0.04)
    profile_samples: int = 5


def textured_contrast(
    ct: torch.Tensor,
    labels: torch.Tensor,
    tissues: torch.Tensor,
    settings: SynthesisSettings,
    generator: torch.Generator,
    spacing: Sequence[float],
) -> torch.Tensor:
    """A clean MR contrast of a CT with texture within tissues.

    Args:
        ct: ``(1, 1, D, H, W)`` HU.
        labels: ``(1, 1, D, H, W)`` vertebra labels.
        tissues: ``(1, 1, D, H, W)`` :class:`~.phantom.Tissue` classes.
        settings: Intensity ranges (:data:`.synthesis.MR_CONTRASTS`).
        generator: Random source.
        spacing: mm per voxel in array order.

    Returns:
        ``(1, 1, D, H, W)`` float32, about [0, 1].
    """
    clean = t1_intensities(ct, labels, tissues, settings, generator)
    fine = _smooth_noise(generator, 1, ct.shape[2:], spacing, 3.0, ct.device)
    coarse = _smooth_noise(generator, 1, ct.shape[2:], spacing, 10.0, ct.device)
    amplitude = torch.tensor([TEXTURE_AMPLITUDE[t] for t in Tissue], dtype=torch.float32)[tissues.long()]
    return (clean * (1.0 + amplitude * (0.8 * fine + 0.6 * coarse))).clamp_min(0.0)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    rx, ry, rz = np.deg2rad(angles_deg)
    x = np.array([[1, 0, 0], [0, math.cos(rx), -math.sin(rx)], [0, math.sin(rx), math.cos(rx)]])
    y = np.array([[math.cos(ry), 0, math.sin(ry)], [0, 1, 0], [-math.sin(ry), 0, math.cos(ry)]])
    z = np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x


def clinical_grid(
    fixed_labels: sitk.Image, acquisition: ClinicalAcquisition, rng: np.random.Generator
) -> tuple[Geometry, dict]:
    """An oblique 2D multi-slice MR grid around the vertebrae of ``fixed_labels`` (LPS, on any grid).

    The stack covers every vertebra along the spine (LPS S) but the cranial end one, of which a fraction drawn from
    ``acquisition.end_cut`` is left out; it is centred on the vertebrae left-right and anterior-posterior and
    rotated by up to ``max_obliquity_deg`` about each axis.

    Returns:
        ``(geometry, description)``; the description gives orientation, pixel size, thickness and obliquity.
    """
    array = sitk.GetArrayViewFromImage(fixed_labels)
    grid = Geometry.of(fixed_labels)
    values = [int(v) for v in np.unique(array) if v > 0]
    points = {v: grid.array_index_to_lps_points(np.argwhere(array == v).astype(float)) for v in values}
    top = max(values, key=lambda v: points[v][:, 2].mean())
    low = min(p[:, 2].min() for p in points.values()) - 12.0
    cut = rng.uniform(*acquisition.end_cut)
    t_lo, t_hi = points[top][:, 2].min(), points[top][:, 2].max()
    high = t_hi - cut * (t_hi - t_lo)
    centre_xy = np.concatenate(list(points.values()))[:, :2].mean(0)
    centre = np.array([centre_xy[0], centre_xy[1] + 15.0, 0.5 * (low + high)])  # a little anterior of the bodies
    thickness = rng.uniform(*acquisition.slice_thickness_mm)
    pixel = rng.uniform(*acquisition.in_plane_mm)
    spacing_k = thickness * (1.0 + acquisition.slice_gap)
    lo, hi = grid.corners_lps().min(0), grid.corners_lps().max(0)
    extent_in = min(acquisition.in_plane_extent_mm, float((hi - lo)[1]))
    if acquisition.orientation == "sagittal":
        base = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]).T  # i: posterior, j: inferior
        extents = (extent_in, high - low, acquisition.across_mm)
    elif acquisition.orientation == "axial":
        base = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).T  # i: left, j: posterior
        extents = (min(acquisition.in_plane_extent_mm, float((hi - lo)[0])), extent_in, high - low)
    else:
        raise ValueError(f"orientation must be 'sagittal' or 'axial', got {acquisition.orientation!r}")
    base = np.column_stack([base, np.cross(base[:, 0], base[:, 1])])
    angles = rng.uniform(-1.0, 1.0, 3) * acquisition.max_obliquity_deg
    direction = _rotation(angles) @ base
    spacing = np.array([pixel, pixel, spacing_k])
    size = np.maximum(np.ceil(np.asarray(extents) / spacing).astype(int), 2)
    origin = centre - direction @ ((size - 1) * spacing / 2.0)
    geometry = Geometry(
        shape=(int(size[2]), int(size[1]), int(size[0])),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction.ravel()),
    )
    description = {
        "orientation": acquisition.orientation,
        "pixel_mm": round(float(pixel), 2),
        "slice_thickness_mm": round(float(thickness), 2),
        "slice_spacing_mm": round(float(spacing_k), 2),
        "obliquity_deg": [round(float(a), 1) for a in angles],
        "end_vertebra_cut_fraction": round(float(cut), 2),
        "mr_size": [int(s) for s in size],
    }
    return geometry, description


def acquire_clinical(
    clean: sitk.Image,
    geometry: Geometry,
    acquisition: ClinicalAcquisition,
    rng: np.random.Generator,
    thickness_mm: float,
) -> sitk.Image:
    """Sample a clean contrast onto a clinical MR grid: box slice profile, bias field, Rician noise.

    Args:
        clean: The contrast on a fine grid (about 1 mm) in the MR's patient frame.
        geometry: The MR grid (:func:`clinical_grid`).
        acquisition: Bias and noise ranges.
        rng: Random source.
        thickness_mm: Slice thickness (the box profile's width along the slice normal).

    Returns:
        float32 MR on ``geometry``, scaled so that its 99th percentile is 1000 (0 outside ``clean``'s view).
    """
    normal = np.asarray(geometry.direction_matrix)[:, 2]
    n = max(int(acquisition.profile_samples), 1)
    offsets = np.linspace(-0.5, 0.5, n) * thickness_mm if n > 1 else np.zeros(1)
    total = None
    for offset in offsets:
        shifted = replace(geometry, origin=tuple(float(o) for o in np.asarray(geometry.origin) + offset * normal))
        sample = sitk.GetArrayFromImage(
            sitk.Resample(clean, shifted.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        )
        total = sample if total is None else total + sample
    image = total / len(offsets)
    shape = image.shape
    spacing = geometry.spacing_array_order
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    bias = _smooth_noise(generator, 1, shape, spacing, acquisition.bias_spacing_mm, "cpu")[0, 0].numpy()
    image = image * np.exp(acquisition.bias_strength * bias)
    scale = max(float(np.percentile(image, 99)), 1e-6)
    sigma = rng.uniform(*acquisition.noise) * scale
    image = np.sqrt((image + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2)
    image = image * (1000.0 / max(float(np.percentile(image, 99)), 1e-6))
    out = sitk.GetImageFromArray(image.astype(np.float32))
    return geometry.apply_to(out)


__all__ = [
    "CLINICAL_MOTION",
    "TEXTURE_AMPLITUDE",
    "ClinicalAcquisition",
    "acquire_clinical",
    "clinical_grid",
    "scaled_motion",
    "textured_contrast",
]
