"""A procedural lumbar spine phantom: CT (HU), vertebra labels and a tissue map, built from simple shapes.

Each vertebra is an elliptic-cylinder body (cortical shell around marrow) with a posterior arch: two pedicles, a
lamina ring around the spinal canal, a spinous process sloping caudally and two transverse processes. Discs lie
between the bodies; the canal holds CSF around the cord; muscle with a few fat pockets fills an elliptic torso with a
subcutaneous fat layer, and air lies outside. The spine runs along the array ``k`` axis (superior = increasing
``k``), anterior is low ``j`` (``j`` increases posteriorly, as LPS ``+y``), and ``i`` runs left-right. The spine
bends in the sagittal ``(k, j)`` plane by ``curvature_deg`` (a lordosis: the middle of the spine lies anterior), each
vertebra tilted to follow the curve.

Vertebrae do not touch one another (discs and gaps between the arches), so every label is a separate rigid body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..geometry import Geometry
from .vertebrae import VERSE, vertebra_name


class Tissue(IntEnum):
    """Tissue classes of :attr:`Phantom.tissues` (also the classes the MR synthesiser gives intensities to)."""

    BACKGROUND = 0  # air
    FAT = 1
    MUSCLE = 2
    CORTICAL = 3
    MARROW = 4
    DISC = 5
    CORD = 6
    CSF = 7


#: Mean CT number (HU) of each tissue class.
TISSUE_HU: dict[Tissue, float] = {
    Tissue.BACKGROUND: -1000.0,
    Tissue.FAT: -100.0,
    Tissue.MUSCLE: 50.0,
    Tissue.CORTICAL: 1200.0,
    Tissue.MARROW: 250.0,
    Tissue.DISC: 80.0,
    Tissue.CORD: 35.0,
    Tissue.CSF: 10.0,
}


@dataclass
class Phantom:
    """A synthetic spine CT with its labels.

    Attributes:
        ct: float32 CT in HU.
        labels: uint16 vertebra labels in VerSe numbering (e.g. L1..L4 = 20..23), 0 elsewhere.
        tissues: uint8 :class:`Tissue` classes.
        landmarks: Vertebra name -> LPS centre (mm) of its body.
    """

    ct: sitk.Image
    labels: sitk.Image
    tissues: sitk.Image
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.ct)


def make_phantom(
    num_vertebrae: int = 4,
    shape: Sequence[int] = (64, 64, 80),
    spacing: float | Sequence[float] = 1.0,
    curvature_deg: float = 15.0,
    seed: int = 0,
    top_label: int | None = None,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] | None = None,
    noise_hu: float = 15.0,
    blur_mm: float = 0.5,
) -> Phantom:
    """Build a spine phantom.

    Args:
        num_vertebrae: Number of labelled vertebrae (1-24), stacked along ``k``.
        shape: Grid size in array order ``(D, H, W)`` = ``(k: superior, j: posterior, i: left)``.
        spacing: Voxel size in mm, a number or three values in ITK order ``(i, j, k)``.
        curvature_deg: Change of the spine's sagittal angle from the lowest to the highest vertebra (lordosis when
            positive).
        seed: Seeds the small random variations (vertebra sizes and shifts, fat pockets, CT noise).
        top_label: VerSe label of the most cranial vertebra; labels increase caudally. ``None`` gives L1 (20) for up
            to five vertebrae and otherwise ends the column at L5 (24).
        origin: LPS position (mm) of voxel ``(0, 0, 0)``.
        direction: Row-major 3x3 direction (columns = LPS axes of ``i, j, k``); ``None`` is the identity.
        noise_hu: Standard deviation of the CT noise (HU).
        blur_mm: Gaussian blur (mm) applied to the CT, for partial-volume edges.

    Returns:
        The :class:`Phantom`.
    """
    if not 1 <= int(num_vertebrae) <= 24:
        raise InputError(f"num_vertebrae must be between 1 and 24, got {num_vertebrae}")
    n = int(num_vertebrae)
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise InputError(f"shape must be three sizes (D, H, W) of at least 8 voxels, got {tuple(shape)}")
    spacing_itk = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(s) for s in spacing)  # type: ignore[arg-type]
    geometry = Geometry(
        shape=shape_t,  # type: ignore[arg-type]
        spacing=spacing_itk,  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in (direction if direction is not None else np.eye(3).ravel())),
    )
    top = (20 if n <= 5 else 25 - n) if top_label is None else int(top_label)
    if top < 1 or top + n - 1 > 24:
        raise InputError(f"labels {top}..{top + n - 1} leave the VerSe range C1..L5 (1..24)")
    rng = np.random.default_rng(seed)
    sz, sy, sx = geometry.spacing_array_order
    d, h, w = shape_t
    zs, ys, xs = np.arange(d) * sz, np.arange(h) * sy, np.arange(w) * sx
    extent_z, extent_y, extent_x = zs[-1], ys[-1], xs[-1]
    size = min(extent_x, extent_y)

    tissues = np.zeros(shape_t, np.uint8)
    labels = np.zeros(shape_t, np.uint16)
    _paint_torso(tissues, zs, ys, xs, size, rng)

    pitch = extent_z / (n + 0.3)
    body_height = 0.70 * pitch
    z_mid = extent_z / 2.0
    kappa = np.radians(curvature_deg) / max(extent_z, 1e-6)
    y_body = 0.40 * extent_y
    x_mid = extent_x / 2.0

    def centreline_y(z: float) -> float:
        return y_body + 0.5 * kappa * ((z - z_mid) ** 2 - (extent_z / 2.0) ** 2 / 3.0)

    landmarks: dict[str, np.ndarray] = {}
    for index in range(n):
        z_n = z_mid + ((n - 1) / 2.0 - index) * pitch
        centre = np.array([z_n, centreline_y(z_n), x_mid + rng.uniform(-0.04, 0.04) * size])
        tilt = np.arctan(kappa * (z_n - z_mid))
        scale = rng.uniform(0.94, 1.06)
        label = top + index
        _paint_level(tissues, labels, label, zs, ys, xs, centre, tilt, pitch, body_height, size * scale, spacing_itk)
        lps = geometry.array_index_to_lps_points((centre / np.array([sz, sy, sx]))[None])[0]
        landmarks[vertebra_name(label, VERSE)] = lps

    ct = np.zeros(shape_t, np.float32)
    for tissue, hu in TISSUE_HU.items():
        ct[tissues == tissue] = hu
    marrow = tissues == Tissue.MARROW
    texture = ndimage.gaussian_filter(rng.standard_normal(shape_t).astype(np.float32), 1.0)
    ct[marrow] += 120.0 * texture[marrow]  # trabecular texture
    ct += rng.normal(0.0, noise_hu, shape_t).astype(np.float32)
    if blur_mm > 0:
        ct = ndimage.gaussian_filter(ct, [blur_mm / s for s in (sz, sy, sx)], mode="nearest")

    def image(array: np.ndarray) -> sitk.Image:
        return geometry.apply_to(sitk.GetImageFromArray(array))

    return Phantom(ct=image(ct.astype(np.float32)), labels=image(labels), tissues=image(tissues), landmarks=landmarks)


def _paint_torso(tissues: np.ndarray, zs: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: float, rng) -> None:
    """Air outside an elliptic torso, subcutaneous fat, muscle inside with a few fat pockets."""
    yc, xc = ys[-1] / 2.0, xs[-1] / 2.0
    ay, ax = 0.47 * ys[-1] + 1e-6, 0.47 * xs[-1] + 1e-6
    fat = 0.07 * size
    y2, x2 = np.meshgrid(ys, xs, indexing="ij")
    r = np.sqrt(((y2 - yc) / ay) ** 2 + ((x2 - xc) / ax) ** 2)
    inner = np.sqrt(((y2 - yc) / max(ay - fat, 1e-6)) ** 2 + ((x2 - xc) / max(ax - fat, 1e-6)) ** 2)
    plane = np.where(r <= 1.0, Tissue.FAT, Tissue.BACKGROUND).astype(np.uint8)
    plane[inner <= 1.0] = Tissue.MUSCLE
    tissues[:] = plane[None]
    z3, y3, x3 = np.meshgrid(zs, ys, xs, indexing="ij", sparse=True)
    for _ in range(int(rng.integers(3, 7))):
        # Pockets in the anterior half, away from the spine (which sits at y ~ 0.4 .. 0.85 of the extent).
        cy = rng.uniform(0.1, 0.25) * ys[-1]
        cx = rng.uniform(0.15, 0.85) * xs[-1]
        cz = rng.uniform(0.0, 1.0) * zs[-1]
        radius = rng.uniform(0.05, 0.1) * size
        pocket = ((z3 - cz) / (2 * radius)) ** 2 + ((y3 - cy) / radius) ** 2 + ((x3 - cx) / radius) ** 2 <= 1.0
        tissues[pocket & (tissues == Tissue.MUSCLE)] = Tissue.FAT


def _paint_level(
    tissues: np.ndarray,
    labels: np.ndarray,
    label: int,
    zs: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    centre: np.ndarray,
    tilt: float,
    pitch: float,
    body_height: float,
    size: float,
    spacing_itk: tuple[float, ...],
) -> None:
    """Paint one vertebra, the disc below it (and above it for the top one) and its part of the canal.

    Shapes are defined in the vertebra's local frame ``(w: superior, v: posterior, u: left)``, tilted by ``tilt``
    about the left-right axis.
    """
    z0, y0, x0 = centre
    reach = 0.75 * pitch + 0.6 * size * abs(np.sin(tilt))
    k_sel = np.nonzero(np.abs(zs - z0) <= reach)[0]
    if k_sel.size == 0:
        return
    z3 = zs[k_sel][:, None, None] - z0
    y3 = ys[None, :, None] - y0
    u = xs[None, None, :] - x0
    cos, sin = np.cos(tilt), np.sin(tilt)
    w = cos * z3 + sin * y3  # superior
    v = -sin * z3 + cos * y3  # posterior
    region = np.abs(w) <= pitch / 2.0 + 1.0
    t_cortex = max(1.0, 1.01 * max(spacing_itk))

    # Body: elliptic cylinder with a cortical shell.
    a_u, a_v = 0.17 * size, 0.13 * size
    half = body_height / 2.0
    ell = (u / a_u) ** 2 + (v / a_v) ** 2
    body = (ell <= 1.0) & (np.abs(w) <= half)
    body_core = ((u / max(a_u - t_cortex, 0.5)) ** 2 + (v / max(a_v - t_cortex, 0.5)) ** 2 <= 1.0) & (
        np.abs(w) <= half - t_cortex
    )
    disc = (ell <= 0.97) & (np.abs(w) > half) & region

    # Canal behind the body, CSF around the cord.
    r_canal = 0.07 * size
    v_canal = a_v + 1.5 + r_canal
    canal_r = np.sqrt(u**2 + (v - v_canal) ** 2)
    canal = (canal_r <= r_canal) & region
    cord = (canal_r <= 0.55 * r_canal) & region

    # Posterior arch: pedicles, lamina ring, spinous and transverse processes (within the upper part of the level).
    arch_w = w - 0.05 * body_height
    arch_half = 0.30 * body_height
    in_arch = np.abs(arch_w) <= arch_half
    r_ped = 0.04 * size
    u_ped = r_canal + r_ped + 0.5
    pedicles = (
        ((np.abs(np.abs(u) - u_ped) / r_ped) ** 2 + (arch_w / arch_half) ** 2 <= 1.0)
        & (v >= 0.5 * a_v)
        & (v <= v_canal)
    )
    t_lamina = max(0.04 * size, 1.5 * max(spacing_itk))
    lamina = (canal_r > r_canal + 0.3) & (canal_r <= r_canal + 0.3 + t_lamina) & (v >= v_canal - 0.2 * r_canal)
    lamina &= in_arch
    v_root = v_canal + r_canal
    length = 0.22 * size
    slope_w = arch_w + 0.3 * (v - v_root)  # the spinous process points caudally
    spinous = (
        (v >= v_root)
        & (v <= v_root + length)
        & (np.abs(u) <= max(0.03 * size, 0.6 * max(spacing_itk)))
        & (np.abs(slope_w) <= 0.6 * arch_half)
    )
    transverse = (
        (np.abs(u) >= u_ped)
        & (np.abs(u) <= 0.36 * size)
        & (np.abs(v - (v_canal - 0.3 * r_canal)) <= max(0.03 * size, 0.6 * max(spacing_itk)))
        & (np.abs(arch_w) <= 0.45 * arch_half)
    )
    posterior = (pedicles | lamina | spinous | transverse) & ~canal & (np.abs(w) <= pitch / 2.0)
    bone = body | posterior
    marrow = body_core | (pedicles & ((np.abs(np.abs(u) - u_ped) / max(r_ped - t_cortex, 0.3)) ** 2 <= 1.0) & ~canal)

    t = tissues[k_sel]
    lab = labels[k_sel]
    t[disc & ~bone] = Tissue.DISC
    t[canal] = Tissue.CSF
    t[cord] = Tissue.CORD
    t[bone] = Tissue.CORTICAL
    t[bone & marrow] = Tissue.MARROW
    lab[bone] = label
    tissues[k_sel] = t
    labels[k_sel] = lab
