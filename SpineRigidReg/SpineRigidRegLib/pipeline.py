"""The registration pipeline: CT + CT vertebra labels + MR in, a rigidity-preserving deformation and its QA out.

The command line, the Slicer module and the benchmark all call :func:`register` (or, for pairs already on one
grid, :func:`register_prealigned`). Stages: validate -> rigid pre-alignment -> processing grid (1 mm, the MR's
direction, cropped to the CT spine + margin, padded to the network's multiple) -> network -> optional test-time
refinement -> outputs in the MR's original geometry + per-vertebra metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import metrics
from .checkpoint import card_sha256, is_sha256, load_bundled_network, load_network, select_device
from .data.vertebrae import label_names
from .errors import CancelledError, InputError
from .geometry import Geometry, displacement_field_image, image_to_tensor, tensor_to_image
from .io import write_rows_csv
from .jacobian import determinant, jacobian_matrix
from .network import RegistrationNet
from .polyrigid import VertebraRigidSettings, refine_vertebrae_rigidly
from .prealign import Prealignment, prealign
from .preprocess import field_of_view, normalize_intensity, resample_to_reference
from .refine import RefineWeights, refine_velocity
from .rigid import fit_rigid
from .segmentation.align import bone_prealignment
from .segmentation.stage import add_mr_bone_agreement, mr_bone_summary, segment_mr
from .system import available_memory_bytes
from .warp import integrate_velocity, resize_displacement, warp_labels

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
CancelCallback = Callable[[], bool]

#: Largest processing grid (voxels); bigger regions are processed at a coarser spacing instead of failing.
MAX_GRID_VOXELS = 160 * 160 * 224

#: A registered vertebra of which the MR shows less than this (%) is named in a warning and in the summary's
#: ``vertebrae_outside_mr``: MR spine scans often cover fewer levels than the CT.
MR_COVERAGE_WARN_PERCENT = 50.0


#: A registered vertebra whose volume changed by more than this (%) stops the run (:func:`check_plausible`). Bone
#: does not change volume, and none of the rigidity settings lets it do so by much: the benchmark's default run
#: changes it by 0.08 % on average, the network alone by 0.07 %, the dense refinement at its default weights by
#: 0.51 %, the "soft" rigidity preset (weights x 0.25) by a few per cent; the worst unshipped training attempt reached
#: 10-14 % (docs/TRAINING.md). A damaged model gave -80 % to +92 %.
MAX_VOLUME_CHANGE_PERCENT = 20.0


@dataclass(frozen=True)
class RegistrationSettings:
    """User-facing settings of :func:`register`.

    Attributes:
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
        vertebra_rigid: One rigid motion per vertebra fitted after the network (:mod:`.polyrigid`;
            ``steps=0`` turns it off).
        refine_steps: Test-time refinement steps of the dense velocity after that (0 = off).
        refine_weights: Loss weights of the refinement.
        vertebra_weights: Label -> multiplier of the rigidity terms during refinement; 0 excludes a vertebra (also
            from the vertebra-wise rigid alignment).
        model_path: A checkpoint to use instead of the bundled model.
        model_sha256: The sha256 ``model_path`` must have; without it the one its model card (``<name>.json``
            beside it) records, when there is such a card.
        margin_mm: Margin around the CT vertebrae included in the processing grid.
        spacing_mm: Processing grid spacing (the paper resamples to 1 mm).
        mr_segmentation: Find the vertebrae in the MR with the bundled segmentation network (an output and the
            per-vertebra ``mr_bone_percent`` check; :mod:`.segmentation.stage`).
        bone_prealign: Without MR points, pre-align the CT's vertebrae onto the MR's predicted bone
            (:mod:`.segmentation.align`) instead of the intensity search; falls back to it when refused. Off by
            default until the segmentation is accurate on every benchmark tier (docs/BENCHMARKS.md).
        deterministic: The same inputs give the same result: the automatic pre-alignment's ITK metric runs on one
            thread (its multi-threaded sums differ from run to run); the torch stages are deterministic on the CPU.
    """

    device: str = "auto"
    vertebra_rigid: VertebraRigidSettings = field(default_factory=VertebraRigidSettings)
    # Off by default: on the benchmark (docs/BENCHMARKS.md) 20 dense steps after the vertebra-wise rigid stage cost
    # a little accuracy and rigidity (DSC 0.966 -> 0.964, rigid DSC 0.997 -> 0.991, |%dvol| 0.08 -> 0.52) and 2.3x
    # the time; the manual correction uses it for point pairs between vertebrae.
    refine_steps: int = 0
    refine_weights: RefineWeights = field(default_factory=RefineWeights)
    vertebra_weights: Mapping[int, float] | None = None
    model_path: str | None = None
    model_sha256: str | None = None
    margin_mm: float = 20.0
    spacing_mm: float = 1.0
    mr_segmentation: bool = True
    bone_prealign: bool = False
    deterministic: bool = True

    def __post_init__(self) -> None:
        if self.refine_steps < 0:
            raise InputError("refine_steps must be >= 0")
        if self.margin_mm < 0 or self.spacing_mm <= 0:
            raise InputError("margin_mm must be >= 0 and spacing_mm > 0")
        if self.model_sha256 is not None and not is_sha256(self.model_sha256):
            raise InputError(f"model sha256 must be 64 hexadecimal digits, got {self.model_sha256!r}")


@dataclass
class RegistrationResult:
    """Everything :func:`register` produces; see ``docs/ARCHITECTURE.md`` for the transform directions.

    All transforms map fixed (MR) physical points to moving (CT) physical points (ITK's resampling direction,
    Slicer's "FromParent" when the CT is placed under the transform), except :meth:`inverse_transform`.
    """

    warped_moving: sitk.Image
    warped_labels: sitk.Image
    jacobian: sitk.Image
    prealign: np.ndarray
    prealign_method: str
    displacement: sitk.Image
    velocity: torch.Tensor
    transform: sitk.Transform
    vertebrae: list[dict]
    vertebra_rigid_transforms: dict[int, np.ndarray]
    summary: dict
    timings: dict[str, float]
    grid: Geometry
    fixed: sitk.Image | None = None
    inverse_displacement: sitk.Image | None = None
    mr_vertebrae: sitk.Image | None = None

    def inverse_transform(self) -> sitk.Transform:
        """The inverse map, moving (CT) point -> fixed (MR) point: the pre-alignment undone, then the deformable
        part's inverse, ``exp(-v)`` of the same stationary velocity (``inverse_displacement``, LPS mm on ``grid``).

        It carries CT points (a screw plan, a bone model) into the MR and resamples the MR onto the CT's grid; its
        composition with :attr:`transform` is the identity up to the integration's error (0.02 mm on average, under
        0.1 mm, for a 4.6 mm deformation in the tests).
        """
        if self.inverse_displacement is None:
            raise InputError("this result holds no inverse field")
        undo_prealign = Prealignment(self.prealign, self.prealign_method).transform().GetInverse()
        # A composite applies its last transform first: the pre-alignment's inverse, then the field.
        return sitk.CompositeTransform(
            [sitk.DisplacementFieldTransform(sitk.Image(self.inverse_displacement)), undo_prealign]
        )

    def total_displacement(self) -> sitk.Image:
        """Pre-alignment folded into the field: fixed point ``x`` -> moving point ``x + D(x)``, LPS mm."""
        d = sitk.GetArrayFromImage(self.displacement).astype(np.float64)  # (D, H, W, 3) LPS
        idx = np.stack(np.meshgrid(*[np.arange(s) for s in self.grid.shape], indexing="ij"), -1).reshape(-1, 3)
        x = self.grid.array_index_to_lps_points(idx.astype(np.float64))
        y = (x + d.reshape(-1, 3)) @ self.prealign[:3, :3].T + self.prealign[:3, 3]
        total = sitk.GetImageFromArray((y - x).reshape(d.shape), isVector=True)
        return self.grid.apply_to(total)


def _report(progress: ProgressCallback | None, start: float, end: float) -> ProgressCallback | None:
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)


def _check_cancel(should_cancel: CancelCallback | None) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("registration cancelled")


def validate_image(image: object, name: str) -> sitk.Image:
    """Raise :class:`InputError` unless ``image`` is a finite 3D scalar SimpleITK image."""
    if not isinstance(image, sitk.Image):
        raise TypeError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"{name} must be a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} must have one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
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
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    values = values[values > 0]
    if len(values) == 0:
        raise InputError(f"{name} is empty (no vertebra labelled)")
    if len(values) == 1:
        raise InputError(
            f"{name} holds a single vertebra (label {int(values[0])}); give one label per vertebra, at least two"
        )
    return labels


def _overlap(a: Geometry, b: Geometry) -> bool:
    lo_a, hi_a = _frame_box(a, b)
    return bool(np.all(hi_a >= -0.5) and np.all(lo_a <= np.asarray(b.shape) - 0.5))


def _frame_box(a: Geometry, b: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Array-index bounding box of grid ``a``'s corners in grid ``b``."""
    idx = b.lps_to_array_index(a.corners_lps())
    return idx.min(axis=0), idx.max(axis=0)


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


def _check_memory(grid: Geometry, device: torch.device) -> None:
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


def register_prealigned(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    moving_labels: torch.Tensor,
    spacing: Sequence[float],
    network: RegistrationNet,
    settings: RegistrationSettings = RegistrationSettings(),
    initial_velocity: torch.Tensor | None = None,
    point_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Network (+ refinement) on a pair already on one grid.

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` normalised to [0, 1], sizes a multiple of the network's.
        moving_labels: ``(1, 1, D, H, W)`` integer vertebra labels of ``moving``.
        spacing: mm per voxel, array order ``(D, H, W)``.
        network: The registration network (its device is used).
        initial_velocity: Start refinement from this velocity instead of running the network.
        point_pairs: Full-grid voxel coordinates ``(fixed (N, 3), target (N, 3))`` for the vertebra-wise rigid
            alignment (also on a re-run from ``initial_velocity``) and the dense refinement.
        fixed_mask, moving_mask: ``(1, 1, D, H, W)``: where the MR and the (pre-aligned) CT have data; the
            optimisations compare the images only where both do (``None``: everywhere).

    Returns:
        ``(displacement (1, 3, D, H, W) voxels, velocity (1, 3, d, h, w), timings in s)``.
    """
    device = next(network.parameters()).device
    fixed, moving, moving_labels = fixed.to(device), moving.to(device), moving_labels.to(device)
    fixed_mask, moving_mask = (None if m is None else m.to(device) for m in (fixed_mask, moving_mask))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if initial_velocity is None:
        with torch.inference_mode():
            velocity = network(fixed, moving, moving_labels).velocity.clone()
    else:
        velocity = initial_velocity.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["network"] = time.perf_counter() - start
    _check_cancel(should_cancel)
    start = time.perf_counter()
    # A re-run from a previous result keeps that result's vertebra motions, unless point pairs correct them: each
    # vertebra then follows the points on it rigidly (the dense refinement after it bends what lies between).
    rigid = settings.vertebra_rigid.steps > 0 and (initial_velocity is None or point_pairs is not None)
    rigid_share = (1.0 if settings.refine_steps == 0 else 0.5) if rigid else 0.0
    if rigid:
        velocity, _ = refine_vertebrae_rigidly(
            velocity,
            fixed,
            moving,
            moving_labels,
            spacing,
            settings.vertebra_rigid,
            integration_steps=network.config.integration_steps,
            vertebra_weights=settings.vertebra_weights,
            fixed_mask=fixed_mask,
            moving_mask=moving_mask,
            point_pairs=point_pairs,
            progress=None if progress is None else lambda f, m: progress(rigid_share * f, m),
            should_cancel=should_cancel,
        )
    timings["vertebra_rigid"] = time.perf_counter() - start
    _check_cancel(should_cancel)
    start = time.perf_counter()
    velocity = refine_velocity(
        velocity,
        fixed,
        moving,
        moving_labels,
        spacing,
        settings.refine_steps,
        settings.refine_weights,
        integration_steps=network.config.integration_steps,
        point_pairs=point_pairs,
        vertebra_weights=settings.vertebra_weights,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        progress=None if progress is None else lambda f, m: progress(rigid_share + (1.0 - rigid_share) * f, m),
        should_cancel=should_cancel,
    )
    timings["refinement"] = time.perf_counter() - start
    start = time.perf_counter()
    displacement = displacement_from_velocity(velocity, network.config.integration_steps, fixed.shape[2:])
    timings["integration"] = time.perf_counter() - start
    return displacement, velocity, timings


def displacement_from_velocity(velocity: torch.Tensor, integration_steps: int, shape: Sequence[int]) -> torch.Tensor:
    """``exp(velocity)`` as a ``(1, 3, *shape)`` displacement (voxels of ``shape``): the velocity ``(1, 3, d, h, w)``
    (voxels of its own grid) integrated by scaling and squaring, then resized; ``-velocity`` gives the inverse map."""
    with torch.no_grad():
        return resize_displacement(integrate_velocity(velocity, integration_steps), shape)


def resolve_network(settings: RegistrationSettings, network: RegistrationNet | None) -> RegistrationNet:
    """The network to use: the given one, ``settings.model_path``, or the bundled model, on the chosen device."""
    device = select_device(settings.device)
    if network is not None:
        return network.to(device).eval()
    if settings.model_path:
        expected = settings.model_sha256 or card_sha256(settings.model_path)
        if expected is None:
            log.warning(
                "model %s has no card with its sha256 beside it (%s) and no sha256 was given: a damaged file cannot "
                "be told from a good one, only results that are physically impossible are refused",
                Path(settings.model_path).name,
                Path(settings.model_path).with_suffix(".json").name,
            )
        return load_network(settings.model_path, expected_sha256=expected, device=device)
    return load_bundled_network(device=device)


class NetworkCache:
    """Networks loaded once per model, expected sha256 and device (the Slicer Logic and the benchmark keep one)."""

    def __init__(self) -> None:
        self._networks: dict[tuple, RegistrationNet] = {}

    def get(self, settings: RegistrationSettings) -> RegistrationNet:
        """:func:`resolve_network` of ``settings`` without a given network, loaded on the first call only."""
        key = (settings.model_path, settings.model_sha256, settings.device)
        if key not in self._networks:
            self._networks[key] = resolve_network(settings, None)
        return self._networks[key]


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    *,
    fixed_labels: sitk.Image | None = None,
    fixed_landmarks: Mapping[str, np.ndarray] | None = None,
    moving_landmarks: Mapping[str, np.ndarray] | None = None,
    settings: RegistrationSettings = RegistrationSettings(),
    network: RegistrationNet | None = None,
    initial_velocity: torch.Tensor | None = None,
    point_pairs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCallback | None = None,
) -> RegistrationResult:
    """Register a spine CT (moving) onto an MR (fixed), keeping every vertebra rigid.

    Args:
        fixed: MR image, any geometry (oblique, anisotropic).
        moving: CT image in HU.
        moving_labels: CT vertebra label map (one integer per vertebra); resampled onto the CT grid by physical
            position when its grid differs.
        fixed_labels: MR vertebra labels, for evaluation only (DSC).
        fixed_landmarks, moving_landmarks: Vertebra centre points, name -> LPS (3,) mm, for the pre-alignment.
        settings: See :class:`RegistrationSettings`.
        network: A loaded network; ``None`` loads ``settings.model_path`` or the bundled model.
        initial_velocity: Velocity of a previous result: skip the network and refine from it.
        point_pairs: ``(CT LPS point, MR LPS point)`` pairs the registration must bring together: each vertebra
            follows the pairs on it rigidly (the vertebra-wise stage runs again on a re-run from
            ``initial_velocity``), the dense refinement (``settings.refine_steps``) also those between vertebrae.
        progress: Called with ``(fraction in [0, 1], stage message)``.
        should_cancel: Polled between stages and refinement steps; True raises :class:`CancelledError`.

    Returns:
        A :class:`RegistrationResult` (nothing is written to disk; see :func:`write_outputs`).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if progress:
        progress(0.0, "checking inputs")
    fixed = validate_intensity_image(fixed, "MR (fixed) image")
    moving = validate_intensity_image(moving, "CT (moving) image")
    moving_labels = validate_labels(moving_labels, moving)
    if fixed_labels is not None:
        fixed_labels = validate_labels(fixed_labels, fixed, name="MR vertebra label map")
    net = resolve_network(settings, network)
    device = next(net.parameters()).device
    timings["load"] = time.perf_counter() - t0
    _check_cancel(should_cancel)

    t = time.perf_counter()
    mr_bone = segment_mr(fixed, device) if settings.mr_segmentation else None
    timings["mr_segmentation"] = time.perf_counter() - t
    _check_cancel(should_cancel)

    t = time.perf_counter()
    names = label_names(moving_labels)
    pre = None
    if settings.bone_prealign and fixed_landmarks is None and mr_bone is not None:
        pre = bone_prealignment(fixed, sitk.Cast(mr_bone, sitk.sitkFloat32), moving_labels)
    if pre is None:
        pre = prealign(
            fixed,
            moving,
            moving_labels,
            fixed_landmarks,
            moving_landmarks,
            label_names=names,
            progress=_report(progress, 0.05, 0.2),
            deterministic=settings.deterministic,
        )
    timings["prealign"] = time.perf_counter() - t
    _check_cancel(should_cancel)

    t = time.perf_counter()
    if progress:
        progress(0.2, "resampling to the processing grid")
    fixed_geometry = Geometry.of(fixed)
    grid = processing_grid(fixed_geometry, moving_labels, pre, settings, net.config.required_multiple)
    _check_memory(grid, device)
    pre_t = pre.transform()
    inside = image_to_tensor(field_of_view(fixed, grid))
    if inside.float().mean() < 0.1:
        raise InputError("the MR and the CT spine do not overlap after pre-alignment (check landmarks/orientation)")
    fixed_t = normalize_intensity(image_to_tensor(resample_to_reference(fixed, grid)), mask=inside > 0)
    ct_min = float(sitk.GetArrayViewFromImage(moving).min())
    moving_hu = image_to_tensor(resample_to_reference(moving, grid, pre_t, default_value=ct_min))
    moving_t = normalize_intensity(moving_hu)
    moving_inside = image_to_tensor(field_of_view(moving, grid, pre_t))
    labels_t = image_to_tensor(resample_to_reference(moving_labels, grid, pre_t, is_label=True), torch.int64)
    pairs_vox = _point_pairs_to_voxels(point_pairs, pre, grid) if point_pairs else None
    timings["preprocess"] = time.perf_counter() - t
    _check_cancel(should_cancel)

    if progress:
        progress(0.3, "network inference")
    spacing = grid.spacing_array_order
    displacement, velocity, stage_times = register_prealigned(
        fixed_t,
        moving_t,
        labels_t,
        spacing,
        net,
        settings,
        initial_velocity=initial_velocity,
        point_pairs=pairs_vox,
        fixed_mask=inside > 0,
        moving_mask=moving_inside > 0,
        progress=_report(progress, 0.35, 0.8),
        should_cancel=should_cancel,
    )
    timings.update(stage_times)
    _check_cancel(should_cancel)

    t = time.perf_counter()
    if progress:
        progress(0.85, "building outputs")
    displacement = displacement.detach().cpu()
    field_image = displacement_field_image(displacement, grid)
    inverse = displacement_from_velocity(-velocity, net.config.integration_steps, displacement.shape[2:])
    inverse_image = displacement_field_image(inverse.cpu(), grid)
    composite = sitk.CompositeTransform([pre_t, sitk.DisplacementFieldTransform(sitk.Image(field_image))])
    warped_moving = sitk.Resample(moving, fixed, composite, sitk.sitkLinear, ct_min, sitk.sitkFloat32)
    warped_labels = sitk.Resample(moving_labels, fixed, composite, _label_interpolator(), 0, sitk.sitkUInt16)
    jac_matrix = jacobian_matrix(displacement, spacing)  # shared by the det J map and every metric below
    det = determinant(jac_matrix)
    jacobian_image = tensor_to_image(det.float(), grid)
    warped_labels_t = warp_labels(labels_t, displacement)
    fixed_labels_t = (
        image_to_tensor(resample_to_reference(fixed_labels, grid, is_label=True), torch.int64)
        if fixed_labels is not None
        else None
    )
    rows = metrics.vertebra_table(
        labels_t, displacement, spacing, fixed_labels=fixed_labels_t, warped_labels=warped_labels_t, jacobian=jac_matrix
    )
    rigid_fits = _vertebra_rigid_transforms(warped_labels_t, displacement, grid, pre)
    for row in rows:
        row["name"] = names.get(int(row["label"]), str(row["label"]))
    _add_mr_coverage(rows, warped_labels_t, inside > 0)
    bone_stats: dict = {}
    if mr_bone is not None:
        bone_t = image_to_tensor(resample_to_reference(mr_bone, grid, is_label=True)) > 0
        add_mr_bone_agreement(rows, warped_labels_t, bone_t)
        bone_stats = mr_bone_summary(warped_labels_t, bone_t, inside > 0)
    if fixed_landmarks is not None and moving_landmarks is not None:
        _add_landmark_errors(rows, composite, fixed_landmarks, moving_landmarks)
    field_stats = metrics.field_summary(displacement, spacing, mask=inside > 0, jacobian=jac_matrix)
    # One count of folding, the one the Jacobian map shows: every voxel of the processing grid where det J <= 0
    # (the table's per-vertebra counts are its share inside each vertebra; the MR mask above left out folds in a
    # vertebra beyond the MR's field of view, and the summary disagreed with the table).
    field_stats["folding_voxels"] = int((det <= 0).sum())
    field_stats["folding_percent"] = 100.0 * field_stats["folding_voxels"] / det.numel()
    field_stats["folding_voxels_in_vertebrae"] = sum(int(r["folding_voxels"]) for r in rows)
    timings["outputs"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    check_plausible(rows, field_stats, settings)

    summary = {
        **metrics.summarize(rows),
        **field_stats,
        "prealign_method": pre.method,
        "prealign_residual_mm": pre.residual_mm,
        "device": str(device),
        "model": asdict(net.config) | {"path": settings.model_path or "bundled"},
        "vertebra_rigid_steps": settings.vertebra_rigid.steps if initial_velocity is None else 0,
        "refine_steps": settings.refine_steps,
        "started_from": "network" if initial_velocity is None else "previous result",
        "vertebrae_outside_mr": [r["name"] for r in rows if r["mr_coverage_percent"] < MR_COVERAGE_WARN_PERCENT],
        **bone_stats,
        "grid_shape": list(grid.shape),
        "grid_spacing_mm": list(grid.spacing),
    }
    if progress:
        progress(1.0, "done")
    return RegistrationResult(
        warped_moving=warped_moving,
        warped_labels=warped_labels,
        jacobian=jacobian_image,
        prealign=pre.matrix,
        prealign_method=pre.method,
        displacement=field_image,
        velocity=velocity.detach().cpu(),
        transform=composite,
        vertebrae=rows,
        vertebra_rigid_transforms=rigid_fits,
        summary=summary,
        timings=timings,
        grid=grid,
        fixed=fixed,
        inverse_displacement=inverse_image,
        mr_vertebrae=mr_bone,
    )


def check_plausible(rows: Sequence[Mapping], field_stats: Mapping[str, float], settings: RegistrationSettings) -> None:
    """Refuse a result that no registration of a spine can give, before anything is written.

    Limits, from the settings the result was made with: every vertebra's volume within
    :data:`MAX_VOLUME_CHANGE_PERCENT`; no displacement inside the MR's field of view (after the pre-alignment) larger
    than ``settings.margin_mm + settings.vertebra_rigid.max_translation_mm``: the processing grid reaches
    ``margin_mm`` beyond the pre-aligned CT spine, and the vertebra-wise stage moves a vertebra by at most
    ``max_translation_mm``, so a larger one carries a point beyond everything the network was shown.

    Raises:
        InputError: naming the worst vertebra or the largest displacement, and the likely cause.
    """
    worst = max(
        (r for r in rows if math.isfinite(float(r.get("volume_change_percent", float("nan"))))),
        key=lambda r: abs(float(r["volume_change_percent"])),
        default=None,
    )
    problems = []
    if worst is not None and abs(float(worst["volume_change_percent"])) > MAX_VOLUME_CHANGE_PERCENT:
        change = float(worst["volume_change_percent"])
        name = worst.get("name", worst["label"])
        problems.append(f"vertebra {name} changed volume by {change:+.0f} % (limit {MAX_VOLUME_CHANGE_PERCENT:.0f} %)")
    largest = float(field_stats.get("max_displacement_mm", float("nan")))
    limit = settings.margin_mm + settings.vertebra_rigid.max_translation_mm
    if math.isfinite(largest) and largest > limit:
        problems.append(f"a displacement of {largest:.0f} mm (limit {limit:.0f} mm)")
    if problems:
        raise InputError(
            "the registration result is physically impossible (" + "; ".join(problems) + "): the model file is "
            "probably damaged or not meant for these images; nothing was written"
        )


def _label_interpolator() -> int:
    return getattr(sitk, "sitkLabelLinear", sitk.sitkNearestNeighbor)


def _point_pairs_to_voxels(
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


def _vertebra_rigid_transforms(
    warped_labels: torch.Tensor, displacement: torch.Tensor, grid: Geometry, pre: Prealignment, max_points: int = 4000
) -> dict[int, np.ndarray]:
    """Per vertebra, the 4x4 LPS rigid map (fixed -> moving) closest to the total map over its warped region
    (``warped_labels``: the moving labels warped by ``displacement``, ``(1, 1, D, H, W)``)."""
    warped = warped_labels[0, 0]
    found = warped.nonzero()
    owner = warped[tuple(found.unbind(1))]
    out: dict[int, np.ndarray] = {}
    generator = torch.Generator().manual_seed(0)
    for value in [int(v) for v in torch.unique(owner)]:
        idx = found[owner == value]
        if len(idx) < 4:
            continue
        if len(idx) > max_points:
            idx = idx[torch.randperm(len(idx), generator=generator)[:max_points]]
        u = displacement[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].T.double()  # voxels, array order
        x = grid.array_index_to_lps_points(idx.double().numpy())
        y = pre.map_points(grid.array_index_to_lps_points((idx.double() + u).numpy()))
        rotation, translation = fit_rigid(torch.as_tensor(x)[None], torch.as_tensor(y)[None])
        matrix = np.eye(4)
        matrix[:3, :3] = rotation[0].numpy()
        matrix[:3, 3] = translation[0].numpy()
        out[value] = matrix
    return out


def _add_mr_coverage(rows: list[dict], warped_labels: torch.Tensor, inside_mr: torch.Tensor) -> None:
    """Add ``mr_coverage_percent`` to each row: how much of the registered vertebra the MR's field of view shows;
    warn about the vertebrae below :data:`MR_COVERAGE_WARN_PERCENT`."""
    shown = metrics.share_on_mask_percent(warped_labels, inside_mr)
    for row in rows:
        row["mr_coverage_percent"] = shown.get(int(row["label"]), 0.0)
        if row["mr_coverage_percent"] < MR_COVERAGE_WARN_PERCENT:
            log.warning(
                "vertebra %s: only %.0f %% of it lies inside the MR's field of view, so the MR shows little of "
                "how it aligns; check it, or leave it out (vertebra weight 0)",
                row["name"],
                row["mr_coverage_percent"],
            )


def _add_landmark_errors(
    rows: list[dict], transform: sitk.Transform, fixed: Mapping[str, np.ndarray], moving: Mapping[str, np.ndarray]
) -> None:
    """Landmark residual after registration (mm) per vertebra row whose name has a landmark on both sides."""
    f = {str(k).strip().upper(): np.asarray(v, dtype=float) for k, v in fixed.items()}
    m = {str(k).strip().upper(): np.asarray(v, dtype=float) for k, v in moving.items()}
    for row in rows:
        key = str(row.get("name", "")).upper()
        if key in f and key in m:
            mapped = np.asarray(transform.TransformPoint(tuple(float(c) for c in f[key])))
            row["tre_mm"] = float(np.linalg.norm(mapped - m[key]))


def write_outputs(
    result: RegistrationResult, out_dir: str | os.PathLike, progress: ProgressCallback | None = None
) -> dict[str, Path]:
    """Write every output into ``out_dir``; files appear only once all are written (a failure leaves none).

    Returns:
        Output name -> path.
    """
    from .qa import save_qa_figure

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".srr-", dir=out_dir))
    except OSError as error:
        raise InputError(f"cannot write into {out_dir}: {(error.strerror or type(error).__name__).lower()}") from error
    names = {
        "warped_ct": "warped_ct.nii.gz",
        "warped_labels": "warped_labels.nii.gz",
        "jacobian": "jacobian.nii.gz",
        "displacement": "displacement.nii.gz",
        "total_displacement": "total_displacement.nii.gz",
        "transform": "transform.h5",
        "inverse_transform": "inverse_transform.h5",
        "prealign": "prealign.tfm",
        "vertebrae_csv": "vertebrae.csv",
        "vertebrae_json": "vertebrae.json",
        "summary": "summary.json",
        "qa": "qa.png",
    }
    try:
        sitk.WriteImage(result.warped_moving, str(staging / names["warped_ct"]), True)
        sitk.WriteImage(result.warped_labels, str(staging / names["warped_labels"]), True)
        sitk.WriteImage(result.jacobian, str(staging / names["jacobian"]), True)
        sitk.WriteImage(result.displacement, str(staging / names["displacement"]), True)
        sitk.WriteImage(result.total_displacement(), str(staging / names["total_displacement"]), True)
        sitk.WriteTransform(result.transform, str(staging / names["transform"]))
        sitk.WriteTransform(result.inverse_transform(), str(staging / names["inverse_transform"]))
        sitk.WriteTransform(
            Prealignment(result.prealign, result.prealign_method).transform(), str(staging / names["prealign"])
        )
        write_rows_csv(result.vertebrae, staging / names["vertebrae_csv"])
        with open(staging / names["vertebrae_json"], "w", encoding="utf-8") as stream:
            json.dump(
                {
                    "vertebrae": result.vertebrae,
                    "rigid_transforms_lps": {str(k): v.tolist() for k, v in result.vertebra_rigid_transforms.items()},
                },
                stream,
                indent=2,
                default=_json_default,
            )
        with open(staging / names["summary"], "w", encoding="utf-8") as stream:
            json.dump({**result.summary, "timings_s": result.timings}, stream, indent=2, default=_json_default)
        save_qa_figure(result, staging / names["qa"], fixed=result.fixed)
        if result.mr_vertebrae is not None:
            names["mr_vertebrae"] = "mr_vertebrae_predicted.nii.gz"
            sitk.WriteImage(result.mr_vertebrae, str(staging / names["mr_vertebrae"]), True)
        paths = {}
        for key, name in names.items():
            os.replace(staging / name, out_dir / name)
            paths[key] = out_dir / name
        return paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _json_default(value: object) -> object:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


__all__ = [
    "RegistrationResult",
    "RegistrationSettings",
    "NetworkCache",
    "RefineWeights",
    "register",
    "register_prealigned",
    "displacement_from_velocity",
    "write_outputs",
]
