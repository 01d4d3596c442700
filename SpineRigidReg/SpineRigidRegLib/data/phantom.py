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
    geometry = _phantom_geometry(shape, spacing, origin, direction)
    top = (20 if n <= 5 else 25 - n) if top_label is None else int(top_label)
    if top < 1 or top + n - 1 > 24:
        raise InputError(f"labels {top}..{top + n - 1} leave the VerSe range C1..L5 (1..24)")
    # One generator, drawn in a fixed order (torso, then each vertebra, then the CT): the benchmark cases are seeds.
    rng = np.random.default_rng(seed)
    axes = _Axes.of(geometry)
    tissues = np.zeros(geometry.shape, np.uint8)
    labels = np.zeros(geometry.shape, np.uint16)
    _paint_torso(tissues, axes.zs, axes.ys, axes.xs, axes.size, rng)
    landmarks = _paint_spine(tissues, labels, geometry, axes, range(top, top + n), curvature_deg, rng)
    ct = _phantom_ct(tissues, geometry.spacing_array_order, rng, noise_hu, blur_mm)

    def image(array: np.ndarray) -> sitk.Image:
        return geometry.apply_to(sitk.GetImageFromArray(array))

    return Phantom(ct=image(ct.astype(np.float32)), labels=image(labels), tissues=image(tissues), landmarks=landmarks)


def _phantom_geometry(
    shape: Sequence[int], spacing: float | Sequence[float], origin: Sequence[float], direction: Sequence[float] | None
) -> Geometry:
    """The phantom's grid from :func:`make_phantom`'s arguments (``spacing`` in ITK order, mm; ``origin`` LPS mm)."""
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise InputError(f"shape must be three sizes (D, H, W) of at least 8 voxels, got {tuple(shape)}")
    spacing_itk = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(s) for s in spacing)  # type: ignore[arg-type]
    return Geometry(
        shape=shape_t,  # type: ignore[arg-type]
        spacing=spacing_itk,  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in (direction if direction is not None else np.eye(3).ravel())),
    )


@dataclass(frozen=True)
class _Axes:
    """Voxel-centre positions along the array axes, in mm from voxel ``(0, 0, 0)``.

    Attributes:
        zs: ``(D,)`` along ``k`` (superior).
        ys: ``(H,)`` along ``j`` (posterior).
        xs: ``(W,)`` along ``i`` (left).
    """

    zs: np.ndarray
    ys: np.ndarray
    xs: np.ndarray

    @classmethod
    def of(cls, geometry: Geometry) -> _Axes:
        sz, sy, sx = geometry.spacing_array_order
        d, h, w = geometry.shape
        return cls(zs=np.arange(d) * sz, ys=np.arange(h) * sy, xs=np.arange(w) * sx)

    @property
    def size(self) -> float:
        """The torso's scale (mm): the smaller in-plane extent of the grid; anatomy sizes are fractions of it."""
        return min(self.xs[-1], self.ys[-1])


def _paint_spine(
    tissues: np.ndarray,
    labels: np.ndarray,
    geometry: Geometry,
    axes: _Axes,
    level_labels: range,
    curvature_deg: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Paint one vertebra per label of ``level_labels`` (the first the most cranial), spaced evenly along ``k`` on a
    sagittal parabola that bends by ``curvature_deg`` over the column. Returns vertebra name -> LPS body centre (mm).
    """
    n = len(level_labels)
    extent_z, extent_y, extent_x = axes.zs[-1], axes.ys[-1], axes.xs[-1]
    size = axes.size
    pitch = extent_z / (n + 0.3)
    body_height = 0.70 * pitch
    z_mid = extent_z / 2.0
    kappa = np.radians(curvature_deg) / max(extent_z, 1e-6)  # curvature (rad/mm)
    y_body = 0.40 * extent_y
    x_mid = extent_x / 2.0
    spacing_array = np.array(geometry.spacing_array_order)
    landmarks: dict[str, np.ndarray] = {}
    for index, label in enumerate(level_labels):
        z_n = z_mid + ((n - 1) / 2.0 - index) * pitch
        # The centreline's mean j over the column is y_body ((extent_z / 2)^2 / 3 is the mean of (z - z_mid)^2).
        y_n = y_body + 0.5 * kappa * ((z_n - z_mid) ** 2 - (extent_z / 2.0) ** 2 / 3.0)
        centre = np.array([z_n, y_n, x_mid + rng.uniform(-0.04, 0.04) * size])
        tilt = np.arctan(kappa * (z_n - z_mid))
        scale = rng.uniform(0.94, 1.06)
        _paint_level(
            tissues,
            labels,
            label,
            axes.zs,
            axes.ys,
            axes.xs,
            centre,
            tilt,
            pitch,
            body_height,
            size * scale,
            geometry.spacing,
        )
        lps = geometry.array_index_to_lps_points((centre / spacing_array)[None])[0]
        landmarks[vertebra_name(label, VERSE)] = lps
    return landmarks


def _phantom_ct(
    tissues: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, noise_hu: float, blur_mm: float
) -> np.ndarray:
    """float32 CT (HU) of a ``(D, H, W)`` tissue map: each tissue's :data:`TISSUE_HU`, a trabecular texture in the
    marrow, Gaussian noise of ``noise_hu``, then a Gaussian blur of ``blur_mm`` (``spacing``: mm, array order)."""
    ct = np.zeros(tissues.shape, np.float32)
    for tissue, hu in TISSUE_HU.items():
        ct[tissues == tissue] = hu
    marrow = tissues == Tissue.MARROW
    texture = ndimage.gaussian_filter(rng.standard_normal(tissues.shape).astype(np.float32), 1.0)
    ct[marrow] += 120.0 * texture[marrow]  # trabecular texture
    ct += rng.normal(0.0, noise_hu, tissues.shape).astype(np.float32)
    if blur_mm > 0:
        ct = ndimage.gaussian_filter(ct, [blur_mm / s for s in spacing], mode="nearest")
    return ct


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
    about the left-right axis. ``centre`` is the body centre in mm, array order, on the axes ``zs, ys, xs`` (mm);
    ``size`` (mm) scales the vertebra, ``pitch`` (mm) is the distance between neighbouring levels.
    """
    frame = _level_frame(zs, ys, xs, centre, tilt, pitch, size)
    if frame is None:
        return
    k_sel, u, v, w = frame
    dims = _LevelDims(size=size, body_height=body_height, voxel=max(spacing_itk))
    region = np.abs(w) <= pitch / 2.0 + 1.0
    body, body_core, disc = _vertebral_body(u, v, w, region, dims)
    canal_r, canal, cord = _canal(u, v, region, dims)
    pedicles, arch = _posterior_arch(u, v, w, canal_r, dims)
    posterior = arch & ~canal & (np.abs(w) <= pitch / 2.0)
    bone = body | posterior
    pedicle_core = (np.abs(np.abs(u) - dims.u_ped) / max(dims.r_ped - dims.cortex, 0.3)) ** 2 <= 1.0
    marrow = body_core | (pedicles & pedicle_core & ~canal)

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


@dataclass(frozen=True)
class _LevelDims:
    """One vertebra's dimensions (mm), fractions of its ``size`` and ``body_height``; ``voxel`` is the largest voxel
    side (mm), the least thickness of thin parts."""

    size: float
    body_height: float
    voxel: float

    @property
    def cortex(self) -> float:
        """Cortical shell thickness."""
        return max(1.0, 1.01 * self.voxel)

    @property
    def a_u(self) -> float:
        """Body half-width (left-right)."""
        return 0.17 * self.size

    @property
    def a_v(self) -> float:
        """Body half-depth (anterior-posterior)."""
        return 0.13 * self.size

    @property
    def r_canal(self) -> float:
        return 0.07 * self.size

    @property
    def v_canal(self) -> float:
        """Posterior offset of the canal's axis from the body centre."""
        return self.a_v + 1.5 + self.r_canal

    @property
    def r_ped(self) -> float:
        """Pedicle radius."""
        return 0.04 * self.size

    @property
    def u_ped(self) -> float:
        """Left-right offset of each pedicle's axis."""
        return self.r_canal + self.r_ped + 0.5

    @property
    def arch_half(self) -> float:
        """Half-height of the posterior arch."""
        return 0.30 * self.body_height

    @property
    def process_half_width(self) -> float:
        """Half-thickness of the spinous and transverse processes."""
        return max(0.03 * self.size, 0.6 * self.voxel)


def _level_frame(
    zs: np.ndarray, ys: np.ndarray, xs: np.ndarray, centre: np.ndarray, tilt: float, pitch: float, size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The slices a level can reach and its local coordinates there; ``None`` when it reaches no slice.

    Returns:
        ``(k_sel, u, v, w)``: the ``K`` slice indices, and mm offsets from ``centre`` that broadcast to
        ``(K, H, W)``: ``u`` left ``(1, 1, W)``, ``v`` posterior and ``w`` superior ``(K, H, 1)`` (tilted by
        ``tilt`` about the left-right axis).
    """
    z0, y0, x0 = centre
    reach = 0.75 * pitch + 0.6 * size * abs(np.sin(tilt))
    k_sel = np.nonzero(np.abs(zs - z0) <= reach)[0]
    if k_sel.size == 0:
        return None
    z3 = zs[k_sel][:, None, None] - z0
    y3 = ys[None, :, None] - y0
    u = xs[None, None, :] - x0
    cos, sin = np.cos(tilt), np.sin(tilt)
    w = cos * z3 + sin * y3  # superior
    v = -sin * z3 + cos * y3  # posterior
    return k_sel, u, v, w


def _vertebral_body(
    u: np.ndarray, v: np.ndarray, w: np.ndarray, region: np.ndarray, dims: _LevelDims
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elliptic-cylinder body, its marrow core inside a cortical shell, and the disc above and below it (within
    ``region``, the level's slab). Masks of shape ``(K, H, W)``."""
    a_u, a_v, t_cortex = dims.a_u, dims.a_v, dims.cortex
    half = dims.body_height / 2.0
    ell = (u / a_u) ** 2 + (v / a_v) ** 2
    body = (ell <= 1.0) & (np.abs(w) <= half)
    body_core = ((u / max(a_u - t_cortex, 0.5)) ** 2 + (v / max(a_v - t_cortex, 0.5)) ** 2 <= 1.0) & (
        np.abs(w) <= half - t_cortex
    )
    disc = (ell <= 0.97) & (np.abs(w) > half) & region
    return body, body_core, disc


def _canal(
    u: np.ndarray, v: np.ndarray, region: np.ndarray, dims: _LevelDims
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The spinal canal behind the body: distance (mm) from its axis, the canal (CSF) and the cord within it."""
    canal_r = np.sqrt(u**2 + (v - dims.v_canal) ** 2)
    canal = (canal_r <= dims.r_canal) & region
    cord = (canal_r <= 0.55 * dims.r_canal) & region
    return canal_r, canal, cord


def _posterior_arch(
    u: np.ndarray, v: np.ndarray, w: np.ndarray, canal_r: np.ndarray, dims: _LevelDims
) -> tuple[np.ndarray, np.ndarray]:
    """The pedicles, and the whole arch: pedicles, lamina ring around the canal, spinous process sloping caudally
    and the two transverse processes, in the upper part of the level. Masks of shape ``(K, H, W)``."""
    size, a_v, r_canal, v_canal = dims.size, dims.a_v, dims.r_canal, dims.v_canal
    r_ped, u_ped, arch_half = dims.r_ped, dims.u_ped, dims.arch_half
    arch_w = w - 0.05 * dims.body_height
    in_arch = np.abs(arch_w) <= arch_half
    pedicles = (
        ((np.abs(np.abs(u) - u_ped) / r_ped) ** 2 + (arch_w / arch_half) ** 2 <= 1.0)
        & (v >= 0.5 * a_v)
        & (v <= v_canal)
    )
    t_lamina = max(0.04 * size, 1.5 * dims.voxel)
    lamina = (canal_r > r_canal + 0.3) & (canal_r <= r_canal + 0.3 + t_lamina) & (v >= v_canal - 0.2 * r_canal)
    lamina &= in_arch
    v_root = v_canal + r_canal
    slope_w = arch_w + 0.3 * (v - v_root)  # the spinous process points caudally
    spinous = (
        (v >= v_root)
        & (v <= v_root + 0.22 * size)
        & (np.abs(u) <= dims.process_half_width)
        & (np.abs(slope_w) <= 0.6 * arch_half)
    )
    transverse = (
        (np.abs(u) >= u_ped)
        & (np.abs(u) <= 0.36 * size)
        & (np.abs(v - (v_canal - 0.3 * r_canal)) <= dims.process_half_width)
        & (np.abs(arch_w) <= 0.45 * arch_half)
    )
    return pedicles, pedicles | lamina | spinous | transverse
