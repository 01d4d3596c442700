"""Synthetic CT/MR pairs with a known deformation that keeps every vertebra rigid.

Everything lives on one grid, the moving CT's ("after rigid pre-alignment": the two images share a grid and differ
by a residual motion). The true field ``u`` is the pull-back from the fixed (MR-like) grid into the moving (CT) grid,
as everywhere in the project (:mod:`..geometry`): ``fixed_labels(x) = moving_labels(x + u(x))``.

Motion (:func:`vertebra_motion`)
    One rigid map per vertebra, chained along the spine like a change of curvature: walking from the caudal end,
    each vertebra takes the transform of the one below it composed with a small relative rotation (flexion /
    extension, lateral bending, axial rotation) about the centre of the disc between them, plus a sub-millimetre
    jitter. The column's best rigid fit is removed (what a rigid pre-alignment on vertebra centres leaves) and a
    small global rigid motion is added. The dense field is *poly-rigid*: a stationary velocity
    ``v = (sum_i w_i v_i + w_bg v_bg) / (sum_i w_i + w_bg)`` with ``v_i`` the matrix logarithm of vertebra ``i``'s
    map (an affine velocity whose exponential is that map exactly), ``w_i`` = 1 on the region the vertebra sweeps
    between its fixed and moving positions (plus a margin) and falling to 0 within a few mm, ``w_bg = 1 - max_i w_i``,
    and ``v_bg`` a smooth blend of the vertebra velocities plus a random soft-tissue velocity. Integrated by scaling and
    squaring (:func:`..warp.integrate_velocity`), the field is a diffeomorphism, exactly rigid inside each vertebra
    (trilinear interpolation reproduces affine fields) and smooth elsewhere.

MR appearance (:func:`mr_contrast`)
    T1-like: a random intensity per tissue class (fat bright, marrow bright-ish, muscle and disc intermediate, CSF and
    cortical bone dark, air black) with a little CT-driven texture, then the acquisition: Gaussian blur, thick slices
    along one axis (block averaging and linear resampling back), a smooth multiplicative bias field, Rician noise,
    and a robust [0, 1] normalisation. In :func:`synthesize_pair` the tissue intensities are computed on the CT grid,
    warped by ``u``, and the acquisition is applied in the fixed frame (where the MR scanner's slices are).

Label-only contrast (:func:`synthesize_label_contrast_pair`)
    SynthMorph-style images from label maps alone, with a different random contrast for each image.

The torch parts run on the labels' device (CPU or CUDA) and draw their random numbers from the given generator (on
its own device, then moved), so a CPU generator gives the same pair on any device up to floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..geometry import Geometry, displacement_field_image, image_to_tensor, tensor_to_image
from ..preprocess import normalize_intensity, resample_to_reference
from ..rigid import fit_rigid, rigid_displacement
from ..validation import check_label_tensor, check_spacing, check_tensor
from ..warp import DEFAULT_INTEGRATION_STEPS, compose, identity_grid, integrate_velocity, warp, warp_labels
from .phantom import Tissue

#: T1-weighted intensity range (of [0, 1]) drawn for each :class:`~.phantom.Tissue` class, in class order.
T1_INTENSITY_RANGES: tuple[tuple[float, float], ...] = (
    (0.0, 0.03),  # background / air
    (0.75, 1.0),  # fat
    (0.22, 0.38),  # muscle
    (0.0, 0.08),  # cortical bone
    (0.45, 0.70),  # marrow
    (0.25, 0.40),  # disc
    (0.38, 0.50),  # cord
    (0.05, 0.15),  # CSF
)

#: T2-weighted (fast spin echo) intensity ranges, in class order: CSF and disc nuclei bright, fat bright, marrow
#: intermediate, muscle and cortical bone dark (the contrast of most clinical sagittal spine MR).
T2_INTENSITY_RANGES: tuple[tuple[float, float], ...] = (
    (0.0, 0.03),  # background / air
    (0.60, 0.80),  # fat
    (0.12, 0.25),  # muscle
    (0.0, 0.06),  # cortical bone
    (0.32, 0.50),  # marrow
    (0.50, 0.85),  # disc
    (0.28, 0.40),  # cord
    (0.85, 1.0),  # CSF
)

#: Named MR contrasts of the synthesiser (``SynthesisSettings.intensity_ranges``).
MR_CONTRASTS: dict[str, tuple[tuple[float, float], ...]] = {"t1": T1_INTENSITY_RANGES, "t2": T2_INTENSITY_RANGES}

# CT number bands (HU) that classify a CT without a tissue map (see _classes_from_ct).
_AIR_HU, _FAT_HU, _BONE_HU, _CORTICAL_HU = -500.0, -30.0, 200.0, 500.0
# Reference HU and scale of the CT-driven texture per class.
_TEXTURE_REF = torch.tensor([-1000.0, -100.0, 50.0, 1200.0, 250.0, 80.0, 35.0, 10.0], dtype=torch.float64)
_TEXTURE_SCALE = torch.tensor([200.0, 60.0, 40.0, 300.0, 150.0, 40.0, 20.0, 20.0], dtype=torch.float64)
# Label ids of the random background blobs of the label-only synthesiser (above every vertebra id).
_BLOB_BASE = 10_000
# Fall-off (mm) of a vertebra's claim on space against its neighbours' weights.
_CLAIM_FALLOFF_MM = 0.75
# Smallest rigid margin (voxels) around a swept vertebra; see SynthesisSettings.rigid_margin_mm.
_MIN_MARGIN_VOXELS = 2
# Sharpness of the split between two touching vertebrae (power of their depths).
_DEPTH_POWER = 4
# Half-size of a vertebra as the common rigid fit sees it (a lumbar body is about 40 mm across).
_BODY_RADIUS_MM = 20.0


@dataclass(frozen=True)
class SynthesisSettings:
    """Parameters of the synthetic motion and MR appearance (all ranges are sampled uniformly).

    Motion (angles in degrees, distances in mm):
        max_flexion_deg: Relative rotation at each joint about the left-right axis (flexion/extension).
        max_lateral_bending_deg: Relative rotation at each joint about the anterior-posterior axis.
        max_axial_rotation_deg: Relative rotation at each joint about the spine's axis.
        max_global_rotation_deg: Rotation of the whole column about each axis (residual after pre-alignment).
        max_translation_mm: Translation of the whole column along each axis.
        max_vertebra_translation_mm: Independent jitter of each vertebra along each axis.
        rigid_margin_mm: Margin around the swept vertebra where the velocity is still exactly that vertebra's (at
            least two voxels are used: scaling and squaring interpolates the field up to a voxel beyond the
            trajectory at every step, so a one-voxel margin leaves errors of a few tenths of a mm on the surface).
        falloff_mm: Width (Gaussian sigma) of the transition from a vertebra's rigid motion to the soft tissue's.
        soft_tissue_amplitude_mm: Standard deviation of the random soft-tissue velocity.
        soft_tissue_spacing_mm: Control-point spacing (smoothness) of the soft-tissue velocity.
        integration_steps: Scaling-and-squaring steps.

    MR appearance:
        intensity_ranges: Intensity range per tissue class (:data:`T1_INTENSITY_RANGES`, or another of
            :data:`MR_CONTRASTS`).
        texture_strength: Largest intensity change driven by the CT number within a class.
        class_noise: Largest within-class standard deviation (before blur).
        blur_mm: Range of the Gaussian blur sigma.
        slice_thickness_mm: Simulated slice thickness (0 = off); averaged over blocks along ``slice_axis``.
        slice_axis: Array axis (0, 1, 2) of the thick slices; ``None`` draws one per case.
        bias_strength: Standard deviation of the log bias field.
        bias_spacing_mm: Control-point spacing of the bias field.
        noise_std: Range of the Rician noise sigma (relative to the [0, 1] contrast).
        normalization_percentiles: Percentiles mapped to 0 and 1.

    Label-only synthesis:
        background_blobs: Number of random background structures added around the labels.
        blob_spacing_mm: Size scale of those structures.

    seed: Seed used when no generator or seed is passed.
    """

    max_flexion_deg: float = 4.0
    max_lateral_bending_deg: float = 3.0
    max_axial_rotation_deg: float = 2.0
    max_global_rotation_deg: float = 2.0
    max_translation_mm: float = 3.0
    max_vertebra_translation_mm: float = 0.5
    rigid_margin_mm: float = 2.0
    falloff_mm: float = 2.0
    soft_tissue_amplitude_mm: float = 1.5
    soft_tissue_spacing_mm: float = 24.0
    integration_steps: int = DEFAULT_INTEGRATION_STEPS
    intensity_ranges: tuple[tuple[float, float], ...] = T1_INTENSITY_RANGES
    texture_strength: float = 0.04
    class_noise: float = 0.03
    blur_mm: tuple[float, float] = (0.3, 0.8)
    slice_thickness_mm: float = 4.0
    slice_axis: int | None = None
    bias_strength: float = 0.2
    bias_spacing_mm: float = 60.0
    noise_std: tuple[float, float] = (0.01, 0.03)
    normalization_percentiles: tuple[float, float] = (0.5, 99.5)
    background_blobs: int = 6
    blob_spacing_mm: float = 16.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_flexion_deg",
            "max_lateral_bending_deg",
            "max_axial_rotation_deg",
            "max_global_rotation_deg",
            "max_translation_mm",
            "max_vertebra_translation_mm",
            "rigid_margin_mm",
            "soft_tissue_amplitude_mm",
            "texture_strength",
            "class_noise",
            "slice_thickness_mm",
            "bias_strength",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InputError(f"synthesis setting {name} must be a finite number >= 0, got {value}")
        for name in ("falloff_mm", "soft_tissue_spacing_mm", "bias_spacing_mm", "blob_spacing_mm"):
            if not getattr(self, name) > 0:
                raise InputError(f"synthesis setting {name} must be > 0, got {getattr(self, name)}")
        if len(self.intensity_ranges) != len(Tissue):
            raise InputError(f"intensity_ranges needs one (low, high) pair per tissue class ({len(Tissue)})")
        if self.slice_axis not in (None, 0, 1, 2):
            raise InputError(f"slice_axis must be None, 0, 1 or 2, got {self.slice_axis}")
        if self.integration_steps < 0:
            raise InputError("integration_steps must be >= 0")

    def without_motion(self) -> SynthesisSettings:
        """The same appearance settings with every motion set to zero (an identity field)."""
        return replace(
            self,
            max_flexion_deg=0.0,
            max_lateral_bending_deg=0.0,
            max_axial_rotation_deg=0.0,
            max_global_rotation_deg=0.0,
            max_translation_mm=0.0,
            max_vertebra_translation_mm=0.0,
            soft_tissue_amplitude_mm=0.0,
        )


# ----------------------------------------------------------------------------------------------- random helpers


def _uniform(
    generator: torch.Generator, shape: Sequence[int], low: float, high: float, device, dtype=torch.float32
) -> torch.Tensor:
    values = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return (low + (high - low) * values).to(device)


def _normal(generator: torch.Generator, shape: Sequence[int], device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(int(seed))
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _smooth_noise(
    generator: torch.Generator, channels: int, shape: Sequence[int], spacing: Sequence[float], control_mm: float, device
) -> torch.Tensor:
    """``(1, channels, D, H, W)`` standard-normal values on a control grid ``control_mm`` apart, interpolated
    trilinearly (a smooth random field)."""
    coarse = [max(int(math.ceil((n - 1) * s / control_mm)) + 1, 2) for n, s in zip(shape, spacing, strict=True)]
    values = _normal(generator, (1, channels, *coarse), device)
    return F.interpolate(values, size=tuple(int(n) for n in shape), mode="trilinear", align_corners=True)


def _gaussian_blur(volume: torch.Tensor, sigma_voxels: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, D, H, W)`` with a sigma per array axis (voxels); edges replicated."""
    out = volume
    for axis, sigma in enumerate(sigma_voxels):
        if sigma < 0.2 or out.shape[axis + 2] < 2:
            continue
        radius = max(int(math.ceil(3.0 * sigma)), 1)
        x = torch.arange(-radius, radius + 1, dtype=out.dtype, device=out.device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[axis + 2] = kernel.numel()
        channels = out.shape[1]
        weight = kernel.view(shape).expand(channels, *shape[1:]).contiguous()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out


# ------------------------------------------------------------------------------------------- rigid algebra


def _skew(w: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` -> ``(..., 3, 3)`` cross-product matrices."""
    zero = torch.zeros_like(w[..., 0])
    return torch.stack(
        [
            torch.stack([zero, -w[..., 2], w[..., 1]], -1),
            torch.stack([w[..., 2], zero, -w[..., 0]], -1),
            torch.stack([-w[..., 1], w[..., 0], zero], -1),
        ],
        -2,
    )


def _rotation_about(rotation_vector: torch.Tensor, pivot: torch.Tensor) -> torch.Tensor:
    """4x4 rigid map rotating by ``rotation_vector`` (radians, axis * angle) about ``pivot`` (mm)."""
    r = torch.linalg.matrix_exp(_skew(rotation_vector))
    m = torch.eye(4, dtype=r.dtype, device=r.device)
    m[:3, :3] = r
    m[:3, 3] = pivot - r @ pivot
    return m


def _translation(t: torch.Tensor) -> torch.Tensor:
    m = torch.eye(4, dtype=t.dtype, device=t.device)
    m[:3, 3] = t
    return m


def rigid_log(matrix: torch.Tensor) -> torch.Tensor:
    """Matrix logarithm of a 4x4 rigid map (rotation angle below pi): the ``4x4`` twist ``L`` with ``exp(L) = M``.

    The stationary velocity ``v(x) = L[:3, :3] x + L[:3, 3]`` integrates over unit time to the map ``M``.
    """
    r, t = matrix[:3, :3], matrix[:3, 3]
    cos = ((torch.diagonal(r).sum() - 1.0) / 2.0).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    skew_part = (r - r.T) / 2.0
    if float(theta) < 1e-6:
        omega = skew_part
        coefficient = torch.tensor(1.0 / 12.0, dtype=r.dtype, device=r.device)
    else:
        omega = skew_part * (theta / torch.sin(theta))
        coefficient = (1.0 - theta * torch.sin(theta) / (2.0 * (1.0 - cos))) / theta**2
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    v_inverse = eye - 0.5 * omega + coefficient * (omega @ omega)
    log = torch.zeros(4, 4, dtype=r.dtype, device=r.device)
    log[:3, :3] = omega
    log[:3, 3] = v_inverse @ t
    return log


# --------------------------------------------------------------------------------------------------- motion


def vertebra_centroids(labels: torch.Tensor, spacing: Sequence[float] | None = None) -> tuple[list[int], torch.Tensor]:
    """Label values and centroids of one label map.

    Args:
        labels: ``(1, 1, D, H, W)`` integer labels.
        spacing: mm per voxel in array order.

    Returns:
        The sorted non-zero values and their centroids ``(K, 3)`` float64 in the array-aligned mm frame
        (``index * spacing``, array order).
    """
    labels = check_label_tensor(labels, "labels")
    step = check_spacing(spacing)
    flat = labels[0, 0].reshape(-1).long()
    counts = torch.bincount(flat).to(torch.float64)
    values = [int(v) for v in torch.nonzero(counts[1:]).flatten().add(1).tolist()]
    if not values:
        return [], torch.zeros(0, 3, dtype=torch.float64, device=labels.device)
    coords = identity_grid(labels.shape[2:], device=labels.device, dtype=torch.float64).reshape(3, -1).T
    sums = torch.zeros(counts.numel(), 3, dtype=torch.float64, device=labels.device).index_add_(0, flat, coords)
    chosen = torch.tensor(values, device=labels.device)
    step_t = torch.tensor(step, dtype=torch.float64, device=labels.device)
    return values, sums[chosen] / counts[chosen, None] * step_t


def sample_vertebra_transforms(
    labels: torch.Tensor,
    spacing: Sequence[float] | None = None,
    settings: SynthesisSettings = SynthesisSettings(),
    generator: torch.Generator | None = None,
) -> dict[int, torch.Tensor]:
    """Draw one rigid map per vertebra, chained along the spine (see the module docstring).

    Axes: the spine axis is the principal direction of the vertebra centroids (the array ``D`` axis with fewer than
    two vertebrae); the left-right axis is the array ``W`` axis made orthogonal to it (images in an axial, LPS- or
    RAS-aligned orientation), and anterior-posterior completes the frame.

    Args:
        labels: ``(1, 1, D, H, W)`` integer vertebra labels.
        spacing: mm per voxel in array order.
        settings: Motion ranges.
        generator: Random source (``None``: seeded with ``settings.seed``).

    Returns:
        ``{label: (4, 4) float64}`` pull-back maps (fixed point -> moving point) in the array-aligned mm frame.
    """
    generator = _generator(generator, settings.seed)
    values, centroids = vertebra_centroids(labels, spacing)
    device = labels.device
    if not values:
        return {}
    f64 = torch.float64
    # Spine axis and the order along it (caudal first, taking increasing D as cranial).
    if len(values) >= 2:
        centred = centroids - centroids.mean(0)
        axis = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        if axis[0] < 0:
            axis = -axis
    else:
        axis = torch.tensor([1.0, 0.0, 0.0], dtype=f64, device=device)
    order = torch.argsort(centroids @ axis).tolist()
    lateral = torch.tensor([0.0, 0.0, 1.0], dtype=f64, device=device)
    lateral = lateral - (lateral @ axis) * axis
    if float(lateral.norm()) < 1e-3:
        lateral = torch.tensor([0.0, 1.0, 0.0], dtype=f64, device=device) - axis[1] * axis
    lateral = lateral / lateral.norm()
    anterior = torch.linalg.cross(axis, lateral)
    frame = torch.stack([lateral, anterior, axis])  # rows: rotation axes of flexion, lateral bending, axial rotation

    relative_limits = torch.tensor(
        [settings.max_flexion_deg, settings.max_lateral_bending_deg, settings.max_axial_rotation_deg], dtype=f64
    )
    n = len(values)
    angles = _uniform(generator, (n, 3), -1.0, 1.0, device, f64) * torch.deg2rad(relative_limits).to(device)
    jitter = _uniform(generator, (n, 3), -1.0, 1.0, device, f64) * settings.max_vertebra_translation_mm
    global_angles = _uniform(generator, (3,), -1.0, 1.0, device, f64) * math.radians(settings.max_global_rotation_deg)
    global_shift = _uniform(generator, (3,), -1.0, 1.0, device, f64) * settings.max_translation_mm

    chain = {}
    previous = torch.eye(4, dtype=f64, device=device)
    for step, index in enumerate(order):
        if step > 0:
            pivot = 0.5 * (centroids[order[step - 1]] + centroids[index])
            previous = previous @ _rotation_about(angles[index] @ frame, pivot)
        chain[index] = previous @ _translation(jitter[index])

    # Remove the column's common rigid motion (what a pre-alignment leaves), then add the global residual motion.
    fit = torch.linalg.inv(_common_rigid([chain[i] for i in range(n)], centroids))
    centre = centroids.mean(0)
    global_map = _translation(global_shift) @ _rotation_about(global_angles @ frame, centre)
    return {values[i]: global_map @ fit @ chain[i] for i in range(n)}


def polyrigid_displacement(
    labels: torch.Tensor,
    transforms: dict[int, torch.Tensor],
    spacing: Sequence[float] | None = None,
    settings: SynthesisSettings = SynthesisSettings(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dense pull-back field that is each vertebra's rigid map on that vertebra and smooth soft tissue elsewhere.

    Args:
        labels: ``(1, 1, D, H, W)`` integer labels (moving image grid).
        transforms: ``{label: (4, 4)}`` pull-back maps in the array-aligned mm frame (see
            :func:`sample_vertebra_transforms`); labels missing from it stay still.
        spacing: mm per voxel in array order.
        settings: Margins, fall-off and soft-tissue settings.
        generator: Random source of the soft-tissue velocity.

    Returns:
        ``(1, 3, D, H, W)`` float32 displacement in voxels on the labels' device.
    """
    labels = check_label_tensor(labels, "labels")
    if labels.shape[0] != 1:
        raise InputError(f"labels must hold one sample (1, 1, D, H, W), got {tuple(labels.shape)}")
    generator = _generator(generator, settings.seed)
    step = check_spacing(spacing)
    device = labels.device
    shape = tuple(int(s) for s in labels.shape[2:])
    step_t = torch.tensor(step, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
    grid_mm = identity_grid(shape, device=device) * step_t
    values, centroids = vertebra_centroids(labels, step)
    maps = [
        transforms.get(v, torch.eye(4, dtype=torch.float64, device=device)).to(device, torch.float64) for v in values
    ]
    common, rigid_logs, moved_centroids = _split_common_motion(maps, centroids)
    background = _blended_velocity(grid_mm, moved_centroids, rigid_logs, _centroid_spread(centroids))
    parts = [
        _VertebraPart(*_vertebra_weight(labels, value, log, step, settings), log=log)
        for value, log in zip(values, rigid_logs, strict=True)
    ]
    numerator, weight_sum, weight_max = _vertebra_velocities(parts, grid_mm)
    if settings.soft_tissue_amplitude_mm > 0:
        background = background + settings.soft_tissue_amplitude_mm * _smooth_noise(
            generator, 3, shape, step, settings.soft_tissue_spacing_mm, device
        )
    w_bg = 1.0 - weight_max.clamp(0.0, 1.0)
    velocity_mm = (numerator + w_bg * background) / (weight_sum + w_bg).clamp_min(1e-6)
    residual_field = integrate_velocity(velocity_mm / step_t, settings.integration_steps)
    common_field = rigid_displacement(common[None, :3, :3], common[None, :3, 3], shape, step).float()
    return compose(residual_field, common_field)


class _VertebraPart(NamedTuple):
    """One vertebra's share of the poly-rigid velocity (:func:`_vertebra_weight`), on ``box``.

    Attributes:
        box: Array-order slices of the box around the vertebra.
        weight, claim, depth: ``(1, 1, *box)`` float32.
        log: ``(4, 4)`` float64 matrix logarithm of the vertebra's residual map (mm frame).
    """

    box: tuple[slice, slice, slice]
    weight: torch.Tensor
    claim: torch.Tensor
    depth: torch.Tensor
    log: torch.Tensor


def _split_common_motion(
    maps: list[torch.Tensor], centroids: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The column's common rigid motion ``G`` and what each vertebra does beyond it.

    ``G`` is applied exactly and analytically; the poly-rigid part only carries each vertebra's residual
    ``T_i G^-1``, so the regions the vertebrae sweep stay small: ``u = G`` then ``psi`` (``phi = psi o G``).

    Args:
        maps: ``(4, 4)`` float64 pull-back maps ``T_i``, one per vertebra.
        centroids: ``(K, 3)`` float64 vertebra centroids (mm, array order).

    Returns:
        ``G`` ``(4, 4)``; the ``(4, 4)`` matrix logarithms of the residuals; the ``(3,)`` centroids moved by ``G``.
    """
    common = _common_rigid(maps, centroids)
    common_inverse = torch.linalg.inv(common)
    rigid_logs = [rigid_log(m @ common_inverse) for m in maps]
    moved_centroids = [(common[:3, :3] @ c + common[:3, 3]) for c in centroids]
    return common, rigid_logs, moved_centroids


def _blended_velocity(
    grid_mm: torch.Tensor, centroids: list[torch.Tensor], rigid_logs: list[torch.Tensor], spread: float
) -> torch.Tensor:
    """The soft tissue's smooth velocity: the vertebrae's rigid velocities blended by Gaussians of width ``spread``
    (mm) about their ``centroids`` (mm), fading to zero (the common motion) three spreads from every vertebra.

    Args:
        grid_mm: ``(1, 3, D, H, W)`` voxel positions (mm, array order).

    Returns:
        ``(1, 3, D, H, W)`` float32 velocity in mm.
    """
    blend = torch.zeros(1, 3, *grid_mm.shape[2:], device=grid_mm.device)
    blend_sum = torch.zeros(1, 1, *grid_mm.shape[2:], device=grid_mm.device)
    for centroid, log in zip(centroids, rigid_logs, strict=True):
        velocity_mm = _affine_field(log.float(), grid_mm)
        g = torch.exp(-((grid_mm - centroid.float().view(1, 3, 1, 1, 1)) ** 2).sum(1, keepdim=True) / (2 * spread**2))
        blend += g * velocity_mm
        blend_sum += g
    null = math.exp(-0.5 * 3.0**2)  # far from every vertebra (3 spreads) the blend fades to the common motion
    return blend / (blend_sum + null)


def _vertebra_velocities(
    parts: list[_VertebraPart], grid_mm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vertebrae's weighted rigid velocities summed, with each weight cut by its neighbours' claims
    (:func:`_claimed_weight`).

    Returns:
        ``sum_i w_i v_i`` ``(1, 3, D, H, W)`` (mm), ``sum_i w_i`` and ``max_i w_i`` ``(1, 1, D, H, W)``, float32.
    """
    shape, device = grid_mm.shape[2:], grid_mm.device
    numerator = torch.zeros(1, 3, *shape, device=device)
    weight_sum = torch.zeros(1, 1, *shape, device=device)
    weight_max = torch.zeros(1, 1, *shape, device=device)
    for i, part in enumerate(parts):
        weight = _claimed_weight(i, parts)
        region = (slice(None), slice(None), *part.box)
        numerator[region] += weight * _affine_field(part.log.float(), grid_mm[region])
        weight_sum[region] += weight
        weight_max[region] = torch.maximum(weight_max[region], weight)
    return numerator, weight_sum, weight_max


def _claimed_weight(i: int, parts: list[_VertebraPart]) -> torch.Tensor:
    """Vertebra ``i``'s weight ``(1, 1, *box)`` with the space the other vertebrae claim cut out.

    Where a vertebra claims the space (its swept region plus a short ramp) the other vertebrae's weights are cut;
    where two claims overlap (touching vertebrae) the deeper one wins, smoothly: inside each vertebra only its own
    velocity counts, up to a thin seam where it touches a neighbour.
    """
    own = parts[i]
    weight = own.weight.clone()
    for j, other in enumerate(parts):
        overlap = _intersect(own.box, other.box)
        if j == i or overlap is None:
            continue
        mine = (slice(None), slice(None), *_relative(overlap, own.box))
        theirs = (slice(None), slice(None), *_relative(overlap, other.box))
        a, b = own.depth[mine] ** _DEPTH_POWER, other.depth[theirs] ** _DEPTH_POWER
        share = a / (a + b + 1e-12)
        weight[mine] = weight[mine] * ((1.0 - other.claim[theirs]) + other.claim[theirs] * own.claim[mine] * share)
    return weight


def _common_rigid(maps: list[torch.Tensor], centroids: torch.Tensor) -> torch.Tensor:
    """The rigid map that best moves the vertebrae as their maps do (least squares); identity if none.

    Each vertebra counts as its centroid and six points :data:`_BODY_RADIUS_MM` from it along the array axes, so the
    fit is well conditioned for any column. A fit to the centroids alone leaves the roll about a nearly straight
    column to the centroids' millimetre-scale scatter: it drew spurious rolls of 20-110 degrees for a third of the
    2-4 vertebra crops of training.
    """
    eye = torch.eye(4, dtype=torch.float64, device=centroids.device)
    if not maps:
        return eye
    offsets = torch.cat([torch.zeros(1, 3), torch.eye(3), -torch.eye(3)]).to(centroids) * _BODY_RADIUS_MM
    points = centroids[:, None, :] + offsets  # (K, 7, 3)
    moved = torch.stack([p @ m[:3, :3].T + m[:3, 3] for m, p in zip(maps, points, strict=True)])
    r, t = fit_rigid(points.reshape(1, -1, 3), moved.reshape(1, -1, 3))
    out = eye.clone()
    out[:3, :3], out[:3, 3] = r[0], t[0]
    return out


def _centroid_spread(centroids: torch.Tensor) -> float:
    """Length scale (mm) of the soft-tissue blend: the typical distance between neighbouring vertebrae."""
    if centroids.shape[0] < 2:
        return 20.0
    distances = (
        torch.cdist(centroids, centroids)
        + torch.eye(centroids.shape[0], dtype=centroids.dtype, device=centroids.device) * 1e9
    )
    return float(distances.min(1).values.median().clamp(5.0, 60.0))


def _affine_field(log: torch.Tensor, grid_mm: torch.Tensor) -> torch.Tensor:
    """``v(x) = A x + b`` on a ``(1, 3, D, H, W)`` mm grid, ``log`` = ``[[A, b], [0, 0]]``."""
    return torch.einsum("ce,bedhw->bcdhw", log[:3, :3], grid_mm) + log[:3, 3].view(1, 3, 1, 1, 1)


def _vertebra_weight(
    labels: torch.Tensor, value: int, log: torch.Tensor, step: tuple[float, float, float], settings: SynthesisSettings
) -> tuple[tuple[slice, slice, slice], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight ``w_i`` of one vertebra on a box around it: 1 on the region it sweeps between its moving
    (``s = 0``) and fixed (``s = 1``) positions grown by ``rigid_margin_mm`` (its core), then a Gaussian fall-off;
    and its claim, the same with a short fall-off, which cuts the neighbours' weights.

    Returns:
        The box (array-order slices), the weight, the claim and the depth (the swept region slightly blurred, which
        decides between touching vertebrae), each ``(1, 1, *box)``.
    """
    mask = labels[0, 0] == value
    shape = mask.shape
    nonzero = [torch.nonzero(_axis_any(mask, a)).flatten() for a in range(3)]
    lo = torch.tensor([int(n.min()) for n in nonzero], dtype=torch.float64, device=log.device)
    hi = torch.tensor([int(n.max()) for n in nonzero], dtype=torch.float64, device=log.device)
    step_t = torch.tensor(step, dtype=torch.float64, device=log.device)
    # Largest motion of the box corners (mm) bounds the sweep; the margin covers the weight's support.
    corners = torch.stack(torch.meshgrid(*[torch.stack([lo[a], hi[a]]) for a in range(3)], indexing="ij"), -1)
    corners = corners.reshape(-1, 3) * step_t
    matrix = torch.linalg.matrix_exp(log)
    travel = float(((corners @ matrix[:3, :3].T + matrix[:3, 3]) - corners).norm(dim=1).max())
    reach = travel + max(settings.rigid_margin_mm, _MIN_MARGIN_VOXELS * max(step)) + 4.0 * settings.falloff_mm + 1.0
    pad = [int(math.ceil(reach / s)) + 1 for s in step]
    start = [max(int(lo[a]) - pad[a], 0) for a in range(3)]
    stop = [min(int(hi[a]) + pad[a] + 1, shape[a]) for a in range(3)]
    box = tuple(slice(start[a], stop[a]) for a in range(3))
    crop = mask[box].float()[None, None]
    # Swept region: the vertebra pulled back by exp(s L) for s = 0, 1/2, 1 (fixed position at s = 1).
    offset = torch.tensor(start, dtype=torch.float64, device=log.device) * step_t
    swept = crop.clone()
    for s in (0.5, 1.0):
        m = torch.linalg.matrix_exp(s * log)
        t_local = m[:3, :3] @ offset + m[:3, 3] - offset  # the map in the box's own mm frame
        field = rigid_displacement(m[None, :3, :3], t_local[None], crop.shape[2:], step).float()
        swept = torch.maximum(swept, warp(crop, field))
    core = (swept >= 0.5).float()
    grow = [max(int(math.ceil(settings.rigid_margin_mm / s - 1e-6)), _MIN_MARGIN_VOXELS) for s in step]
    if any(grow):
        core = F.max_pool3d(core, kernel_size=[2 * g + 1 for g in grow], stride=1, padding=grow)
    # 1 where the blurred core is >= 1/2 (the core itself, thin parts included, since the margin makes them >= 3
    # voxels thick); 0 beyond about 2.3 sigma.
    weight = torch.maximum(_ramp(core, settings.falloff_mm, step), core)
    claim = torch.maximum(_ramp(core, _CLAIM_FALLOFF_MM, step), core)
    depth = _gaussian_blur(swept, [0.75, 0.75, 0.75])
    return box, weight, claim, depth


def _ramp(core: torch.Tensor, sigma_mm: float, step: Sequence[float]) -> torch.Tensor:
    """1 where the core blurred by ``sigma_mm`` is >= 1/2 (the core itself, thin parts included once the margin has
    made them >= 3 voxels thick), falling to 0 about 2.3 sigma outside it."""
    blurred = _gaussian_blur(core, [sigma_mm / s for s in step])
    return ((blurred - 0.01) / (0.5 - 0.01)).clamp(0.0, 1.0)


def _intersect(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...] | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True))
    return None if any(s.start >= s.stop for s in out) else out


def _relative(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True))


def _axis_any(mask: torch.Tensor, axis: int) -> torch.Tensor:
    other = [a for a in range(3) if a != axis]
    return mask.any(dim=other[1]).any(dim=other[0])


def vertebra_motion(
    labels: torch.Tensor,
    spacing: Sequence[float] | None = None,
    settings: SynthesisSettings = SynthesisSettings(),
    generator: torch.Generator | None = None,
    return_transforms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """A random poly-rigid deformation of one label map (see the module docstring).

    Args:
        labels: ``(1, 1, D, H, W)`` integer vertebra labels of the moving image (any device).
        spacing: mm per voxel in array order ``(D, H, W)``; ``None`` is 1 mm.
        settings: Motion settings.
        generator: Random source; ``None`` seeds one with ``settings.seed``.
        return_transforms: Also return the per-vertebra maps.

    Returns:
        ``(1, 3, D, H, W)`` float32 pull-back displacement (voxels) from the fixed grid into the moving grid, and with
        ``return_transforms`` the ``{label: (4, 4) float64}`` maps (array-aligned mm frame, fixed -> moving).
    """
    labels = check_label_tensor(labels, "labels")
    generator = _generator(generator, settings.seed)
    transforms = sample_vertebra_transforms(labels, spacing, settings, generator)
    displacement = polyrigid_displacement(labels, transforms, spacing, settings, generator)
    return (displacement, transforms) if return_transforms else displacement


# ------------------------------------------------------------------------------------------------ appearance


def tissue_classes_from_ct(ct: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`~.phantom.Tissue` classes from CT numbers when no tissue map is known.

    Bands: air below -500 HU, fat -500 to -30, soft tissue (muscle) -30 to 200, bone above 200 HU or inside a
    vertebra label (cortical above 500 HU, marrow below). Disc, cord and CSF cannot be told apart from muscle by CT
    number alone and are given the muscle class.

    Args:
        ct: ``(B, 1, D, H, W)`` HU.
        labels: Optional ``(B, 1, D, H, W)`` vertebra labels (voxels inside are bone whatever their HU).

    Returns:
        ``(B, 1, D, H, W)`` int64 classes.
    """
    classes = torch.full_like(ct, int(Tissue.MUSCLE), dtype=torch.int64)
    classes[ct < _FAT_HU] = int(Tissue.FAT)
    classes[ct < _AIR_HU] = int(Tissue.BACKGROUND)
    bone = ct >= _BONE_HU
    if labels is not None:
        bone = bone | (labels > 0)
    classes[bone] = int(Tissue.MARROW)
    classes[bone & (ct >= _CORTICAL_HU)] = int(Tissue.CORTICAL)
    return classes


def t1_intensities(
    ct: torch.Tensor,
    labels: torch.Tensor | None = None,
    tissues: torch.Tensor | None = None,
    settings: SynthesisSettings = SynthesisSettings(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The noiseless T1-like contrast: a random intensity per tissue class plus CT-driven texture.

    Args:
        ct: ``(1, 1, D, H, W)`` HU.
        labels: ``(1, 1, D, H, W)`` vertebra labels (used to find bone without a tissue map).
        tissues: ``(1, 1, D, H, W)`` :class:`~.phantom.Tissue` classes; ``None`` derives them from ``ct``.
        settings: Intensity ranges and texture.
        generator: Random source.

    Returns:
        ``(1, 1, D, H, W)`` float32, roughly in [0, 1].
    """
    ct = check_tensor(ct, "CT", ndim=5, channels=1, floating=True, finite=True)
    generator = _generator(generator, settings.seed)
    device = ct.device
    classes = tissue_classes_from_ct(ct, labels) if tissues is None else check_label_tensor(tissues, "tissues")
    if int(classes.max()) >= len(Tissue):
        raise InputError(f"tissue classes must be 0..{len(Tissue) - 1}")
    ranges = torch.tensor(settings.intensity_ranges, dtype=torch.float32, device=device)
    means = _uniform(generator, (len(Tissue),), 0.0, 1.0, device) * (ranges[:, 1] - ranges[:, 0]) + ranges[:, 0]
    texture = _uniform(generator, (len(Tissue),), -1.0, 1.0, device) * settings.texture_strength
    noise = _uniform(generator, (len(Tissue),), 0.0, 1.0, device) * settings.class_noise
    reference = _TEXTURE_REF.to(device=device, dtype=torch.float32)[classes]
    scale = _TEXTURE_SCALE.to(device=device, dtype=torch.float32)[classes]
    out = means[classes] + texture[classes] * torch.tanh((ct - reference) / scale)
    out = out + noise[classes] * _normal(generator, ct.shape, device)
    return out.float()


def acquire(
    image: torch.Tensor,
    spacing: Sequence[float] | None = None,
    settings: SynthesisSettings = SynthesisSettings(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Simulate an MR acquisition of a clean contrast: blur, thick slices, bias field, Rician noise, [0, 1].

    Args:
        image: ``(B, 1, D, H, W)`` clean intensities (about [0, 1]).
        spacing: mm per voxel in array order.
        settings: Blur, slice thickness, bias and noise ranges.
        generator: Random source.

    Returns:
        ``(B, 1, D, H, W)`` float32 in [0, 1].
    """
    image = check_tensor(image, "image", ndim=5, channels=1, floating=True, finite=True)
    generator = _generator(generator, settings.seed)
    step = check_spacing(spacing)
    out = []
    for b in range(image.shape[0]):
        x = image[b : b + 1].float()
        sigma_mm = float(_uniform(generator, (1,), *settings.blur_mm, generator.device))
        x = _gaussian_blur(x, [sigma_mm / s for s in step])
        axis = settings.slice_axis
        drawn_axis = int(torch.randint(0, 3, (1,), generator=generator, device=generator.device))
        axis = drawn_axis if axis is None else axis
        x = _thick_slices(x, axis, settings.slice_thickness_mm / step[axis])
        if settings.bias_strength > 0:
            bias = _smooth_noise(generator, 1, x.shape[2:], step, settings.bias_spacing_mm, x.device)
            x = x * torch.exp(settings.bias_strength * bias)
        sigma = float(_uniform(generator, (1,), *settings.noise_std, generator.device))
        real = _normal(generator, x.shape, x.device)
        imaginary = _normal(generator, x.shape, x.device)
        x = torch.sqrt((x + sigma * real) ** 2 + (sigma * imaginary) ** 2)
        out.append(normalize_intensity(x, percentiles=settings.normalization_percentiles))
    return torch.cat(out)


def _thick_slices(x: torch.Tensor, axis: int, width: float) -> torch.Tensor:
    """Average blocks of ``round(width)`` voxels along ``axis`` and interpolate back (partial-volume slices)."""
    n = int(round(width))
    size = x.shape[axis + 2]
    if n < 2 or size < 2 * n:
        return x
    kernel = [1, 1, 1]
    kernel[axis] = n
    blocks = -(-size // n)
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (2 - axis) + 1] = blocks * n - size
    pooled = F.avg_pool3d(F.pad(x, pad, mode="replicate"), kernel_size=kernel, stride=kernel)
    full = list(pooled.shape[2:])
    full[axis] = blocks * n
    back = F.interpolate(pooled, size=tuple(full), mode="trilinear", align_corners=False)
    return back.narrow(axis + 2, 0, size)


def mr_contrast(
    ct: torch.Tensor,
    labels: torch.Tensor | None = None,
    tissues: torch.Tensor | None = None,
    settings: SynthesisSettings = SynthesisSettings(),
    generator: torch.Generator | None = None,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """A T1-like MR image of a CT: :func:`t1_intensities` followed by :func:`acquire`.

    Args:
        ct: ``(1, 1, D, H, W)`` HU.
        labels: ``(1, 1, D, H, W)`` vertebra labels (bone without a tissue map).
        tissues: ``(1, 1, D, H, W)`` :class:`~.phantom.Tissue` classes, or ``None`` to derive them from HU bands.
        settings: Appearance settings.
        generator: Random source.
        spacing: mm per voxel in array order (blur, slice thickness, bias scale); ``None`` is 1 mm.

    Returns:
        ``(1, 1, D, H, W)`` float32 in [0, 1].
    """
    generator = _generator(generator, settings.seed)
    return acquire(t1_intensities(ct, labels, tissues, settings, generator), spacing, settings, generator)


# ---------------------------------------------------------------------------------------------------- pairs


@dataclass
class SyntheticPair:
    """A CT (moving) and a synthetic MR (fixed) on one grid, with the true deformation between them.

    Attributes:
        fixed: MR-like float32 image in [0, 1].
        moving: The CT (HU), as given.
        moving_labels: Vertebra labels on the CT grid.
        fixed_labels: ``moving_labels`` warped by the true field (crisp).
        true_displacement: ``(1, 3, D, H, W)`` float32 voxels, pull-back fixed -> moving.
        geometry: The grid of every image above.
        vertebra_transforms: ``{label: (4, 4)}`` LPS rigid maps, fixed point -> moving point, that the field equals
            inside each vertebra.
        seed: The seed that produced the pair.
    """

    fixed: sitk.Image
    moving: sitk.Image
    moving_labels: sitk.Image
    fixed_labels: sitk.Image
    true_displacement: torch.Tensor
    geometry: Geometry
    vertebra_transforms: dict[int, np.ndarray] = field(default_factory=dict)
    seed: int = 0

    def displacement_image(self) -> sitk.Image:
        """The true field as an ITK displacement image (LPS mm, fixed -> moving)."""
        return displacement_field_image(self.true_displacement, self.geometry)


def _on_grid(image: sitk.Image | None, reference: sitk.Image, name: str) -> sitk.Image | None:
    if image is None:
        return None
    if not isinstance(image, sitk.Image):
        raise TypeError(f"{name} must be a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"{name} must be a 3D image")
    if Geometry.of(image).same_grid(Geometry.of(reference)):
        return image
    return resample_to_reference(image, reference, is_label=True)


def mm_frame_to_lps(matrix: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Convert a 4x4 map from the array-aligned mm frame (``index * spacing``) of ``geometry`` to LPS."""
    to_lps = geometry.array_index_to_lps() @ np.diag([*(1.0 / np.asarray(geometry.spacing_array_order)), 1.0])
    return to_lps @ np.asarray(matrix, dtype=np.float64) @ np.linalg.inv(to_lps)


def synthesize_pair(
    ct: sitk.Image,
    labels: sitk.Image,
    settings: SynthesisSettings = SynthesisSettings(),
    seed: int | None = None,
    tissues: sitk.Image | None = None,
    device: str | torch.device = "cpu",
) -> SyntheticPair:
    """A CT and a synthetic T1-like MR of the same anatomy after a known poly-rigid motion.

    Args:
        ct: The moving CT (HU), any geometry; its grid is the common grid (use about 1 mm voxels).
        labels: Its vertebra labels (resampled onto the CT grid by physical position if on another grid).
        settings: Motion and appearance settings.
        seed: Random seed; ``None`` uses ``settings.seed``. The same seed gives the same pair.
        tissues: Optional :class:`~.phantom.Tissue` map on the CT grid (e.g. :attr:`~.phantom.Phantom.tissues`).
        device: Where the torch work runs.

    Returns:
        The :class:`SyntheticPair`; ``fixed(x) = acquisition(t1(x + u(x)))``.
    """
    if not isinstance(ct, sitk.Image):
        raise TypeError(f"ct must be a SimpleITK.Image, got {type(ct).__name__}")
    if ct.GetDimension() != 3 or ct.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the CT must be a 3D scalar image")
    labels = _on_grid(labels, ct, "labels")
    tissues = _on_grid(tissues, ct, "tissues")
    seed = settings.seed if seed is None else int(seed)
    generator = torch.Generator().manual_seed(seed)
    geometry = Geometry.of(ct)
    spacing = geometry.spacing_array_order
    ct_t = image_to_tensor(ct).to(device)
    labels_t = image_to_tensor(labels, torch.int64).to(device)
    if not bool((labels_t > 0).any()):
        raise InputError("the label map holds no vertebra (all zero on the CT grid)")
    tissues_t = image_to_tensor(tissues, torch.int64).to(device) if tissues is not None else None
    with torch.no_grad():
        displacement, transforms = vertebra_motion(labels_t, spacing, settings, generator, return_transforms=True)
        clean = t1_intensities(ct_t, labels_t, tissues_t, settings, generator)
        fixed = acquire(warp(clean, displacement), spacing, settings, generator)
        fixed_labels = warp_labels(labels_t, displacement)

    def labels_image(tensor: torch.Tensor) -> sitk.Image:
        return sitk.Cast(tensor_to_image(tensor.to(torch.int32), geometry), labels.GetPixelID())

    return SyntheticPair(
        fixed=tensor_to_image(fixed.float(), geometry),
        moving=sitk.Image(ct),
        moving_labels=sitk.Image(labels),
        fixed_labels=labels_image(fixed_labels),
        true_displacement=displacement.cpu(),
        geometry=geometry,
        vertebra_transforms={v: mm_frame_to_lps(m.cpu().numpy(), geometry) for v, m in transforms.items()},
        seed=seed,
    )


def synthesize_label_contrast_pair(
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    settings: SynthesisSettings = SynthesisSettings(),
    spacing: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SynthMorph-style training pair from vertebra labels alone, on the labels' device.

    Random background structures (smooth random partitions of the background) are added to the labels and moved
    with the soft tissue; each image then gets its own random Gaussian-mixture contrast (a mean and spread per
    structure), blur, bias field and noise, so the two images share anatomy but not intensities.

    Args:
        labels: ``(B, 1, D, H, W)`` integer vertebra labels (the moving anatomy).
        generator: Random source (``None``: seeded with ``settings.seed``).
        settings: Motion and appearance settings.
        spacing: mm per voxel in array order; ``None`` is 1 mm.

    Returns:
        ``fixed`` and ``moving`` ``(B, 1, D, H, W)`` float32 in [0, 1], ``moving_labels`` and ``fixed_labels``
        ``(B, 1, D, H, W)`` int64 vertebra labels, and ``true_displacement`` ``(B, 3, D, H, W)`` voxels (pull-back
        fixed -> moving, so that ``fixed_labels = warp_labels(moving_labels, true_displacement)``).
    """
    labels = check_label_tensor(labels, "labels")
    if int(labels.max()) >= _BLOB_BASE:
        raise InputError(f"vertebra label values must be below {_BLOB_BASE}")
    generator = _generator(generator, settings.seed)
    step = check_spacing(spacing)
    fixed, moving, fixed_labels, fields = [], [], [], []
    with torch.no_grad():
        for b in range(labels.shape[0]):
            sample = labels[b : b + 1]
            displacement = vertebra_motion(sample, step, settings, generator)
            extended = _with_background_blobs(sample, step, settings, generator)
            fixed_extended = warp_labels(extended, displacement)
            moving.append(_label_contrast(extended, step, settings, generator))
            fixed.append(_label_contrast(fixed_extended, step, settings, generator))
            # The vertebrae alone are warped for the labels: with the blobs as extra classes the crisp warp would
            # resolve boundary voxels differently from warp_labels(moving_labels, displacement).
            fixed_labels.append(warp_labels(sample.long(), displacement))
            fields.append(displacement)
    return torch.cat(fixed), torch.cat(moving), labels.long(), torch.cat(fixed_labels), torch.cat(fields)


def _with_background_blobs(
    labels: torch.Tensor, step: tuple[float, float, float], settings: SynthesisSettings, generator: torch.Generator
) -> torch.Tensor:
    """Labels plus ``background_blobs`` smooth random regions (ids ``_BLOB_BASE + c``) filling part of the
    background."""
    count = int(settings.background_blobs)
    if count <= 0:
        return labels.long()
    noise = _smooth_noise(generator, count + 1, labels.shape[2:], step, settings.blob_spacing_mm, labels.device)
    winner = noise.argmax(1, keepdim=True)  # channel 0 stays background
    blobs = torch.where(winner > 0, winner + _BLOB_BASE - 1, torch.zeros_like(winner))
    return torch.where(labels > 0, labels.long(), blobs)


def _label_contrast(
    labels: torch.Tensor, step: tuple[float, float, float], settings: SynthesisSettings, generator: torch.Generator
) -> torch.Tensor:
    """One random Gaussian-mixture image of a label map, then :func:`acquire`."""
    values, inverse = torch.unique(labels, return_inverse=True)
    n = values.numel()
    means = _uniform(generator, (n,), 0.0, 1.0, labels.device)
    spreads = _uniform(generator, (n,), 0.0, 0.08, labels.device)
    image = means[inverse] + spreads[inverse] * _normal(generator, labels.shape, labels.device)
    return acquire(image.float(), step, settings, generator)
