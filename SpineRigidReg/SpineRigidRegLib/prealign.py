"""Rigid pre-alignment of the CT onto the MR, as in the paper: from paired vertebra centre points.

Without landmarks an automatic fallback runs: the CT vertebrae's centroid is brought into the MR's field of view,
then a multi-resolution rigid registration with Mattes mutual information (SimpleITK) refines it, with the metric
restricted to the spine region of the CT. The method used is reported with the result.

All matrices are 4x4 in LPS mm and map a *fixed* (MR) point to the corresponding *moving* (CT) point, the direction
ITK resamples with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .geometry import Geometry
from .rigid import fit_rigid

LANDMARKS = "landmarks"
LANDMARKS_FROM_LABELS = "landmarks (MR) + CT label centroids"
AUTOMATIC = "automatic: label centroid + Mattes MI rigid"
# A CT and an MR of one patient differ by table position and a few degrees of patient rotation; a larger rotation
# from the automatic search means it ran away, and its translation stage is the safer answer.
MAX_AUTOMATIC_ROTATION_DEG = 30.0
# The translation stage places the spine to within a few mm; the rigid stage may only refine that.
MAX_AUTOMATIC_REFINE_SHIFT_MM = 20.0
# The automatic search's Mattes MI draws at most this many samples per resolution level (seeded, so a run is
# repeatable), the way elastix samples: every voxel of a clinical MR at full resolution cost most of its time.
MAX_METRIC_SAMPLES = 50_000
# Radius (mm) of the orientation prior of each centre point (see rigid_from_points).
ROTATION_PRIOR_RADIUS_MM = 5.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prealignment:
    """A rigid fixed -> moving map.

    Attributes:
        matrix: 4x4 LPS matrix, fixed point -> moving point.
        method: How it was found (one of this module's constants).
        residual_mm: RMS distance of the matched landmarks after alignment (None without landmarks).
    """

    matrix: np.ndarray
    method: str
    residual_mm: float | None = None

    def transform(self) -> sitk.AffineTransform:
        """The matrix as a SimpleITK transform (fixed -> moving)."""
        t = sitk.AffineTransform(3)
        t.SetMatrix(tuple(float(v) for v in self.matrix[:3, :3].ravel()))
        t.SetTranslation(tuple(float(v) for v in self.matrix[:3, 3]))
        return t

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` fixed LPS points to moving LPS points."""
        pts = np.asarray(points, dtype=np.float64)
        return pts @ self.matrix[:3, :3].T + self.matrix[:3, 3]


def label_centroids(labels: sitk.Image) -> dict[int, np.ndarray]:
    """LPS centroid (mm) of every non-zero label of a label map."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels, sitk.sitkUInt32))
    return {int(v): np.asarray(stats.GetCentroid(v), dtype=np.float64) for v in stats.GetLabels()}


def _normalized_name(name: str) -> str:
    return str(name).strip().upper()


def match_landmarks(
    fixed: Mapping[str, np.ndarray], moving: Mapping[str, np.ndarray]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pair landmarks by name (case-insensitive); every name must appear on both sides.

    Returns:
        The names and the ``(N, 3)`` fixed and moving LPS points.
    """
    f = {_normalized_name(k): np.asarray(v, dtype=np.float64) for k, v in fixed.items()}
    m = {_normalized_name(k): np.asarray(v, dtype=np.float64) for k, v in moving.items()}
    only_fixed, only_moving = sorted(set(f) - set(m)), sorted(set(m) - set(f))
    if only_fixed or only_moving:
        raise InputError(
            "landmarks do not match by label: "
            + (f"only on the MR: {', '.join(only_fixed)}" if only_fixed else "")
            + ("; " if only_fixed and only_moving else "")
            + (f"only on the CT: {', '.join(only_moving)}" if only_moving else "")
        )
    names = sorted(f)
    if not names:
        raise InputError("no landmarks given")
    for name in names:
        if f[name].shape != (3,) or m[name].shape != (3,) or not np.all(np.isfinite([f[name], m[name]])):
            raise InputError(f"landmark {name} must be three finite coordinates")
    return names, np.stack([f[n] for n in names]), np.stack([m[n] for n in names])


def rigid_from_points(
    fixed_points: np.ndarray, moving_points: np.ndarray, prior_radius_mm: float = ROTATION_PRIOR_RADIUS_MM
) -> np.ndarray:
    """Least-squares rigid 4x4 matrix mapping ``(N, 3)`` fixed points onto moving points, rotation kept near the
    identity where the points do not determine it.

    Each pair also contributes six points ``prior_radius_mm`` from it along the LPS axes, paired unrotated: a prior
    that the vertebra it marks kept its orientation. Vertebra centres lie nearly on a line, so the roll about the
    spine rests on their millimetre-scale scatter; the plain fit (``prior_radius_mm=0``) turned it by tens of
    degrees on the benchmark and left 2.45 mm mean vertebra error where this fit leaves 0.91 mm. The prior weighs
    ``2 N r^2`` against the points' spread (``N (30 mm)^2`` and more along a spine), so a tilt that the points
    show is kept (a few per cent shrinkage at 5 mm) and the translation is unbiased. The price: a true roll of a
    straight column is mostly left to the vertebra-wise rigid stage (the sample case's 6-degree scanner roll ends at
    a mean vertebra error of 1.92 mm, 2.01 mm with the plain fit).

    One or two pairs determine a translation only.
    """
    matrix = np.eye(4)
    if len(fixed_points) < 3:
        matrix[:3, 3] = (moving_points - fixed_points).mean(axis=0)
        return matrix
    offsets = np.concatenate([np.eye(3), -np.eye(3)]) * float(prior_radius_mm)
    fixed_points = np.concatenate([fixed_points, (fixed_points[:, None] + offsets).reshape(-1, 3)])
    moving_points = np.concatenate([moving_points, (moving_points[:, None] + offsets).reshape(-1, 3)])
    rotation, translation = fit_rigid(
        torch.as_tensor(fixed_points, dtype=torch.float64)[None],
        torch.as_tensor(moving_points, dtype=torch.float64)[None],
    )
    matrix[:3, :3] = rotation[0].numpy()
    matrix[:3, 3] = translation[0].numpy()
    return matrix


def prealign(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_landmarks: Mapping[str, np.ndarray] | None = None,
    moving_landmarks: Mapping[str, np.ndarray] | None = None,
    label_names: Mapping[int, str] | None = None,
    progress: Callable[[float, str], None] | None = None,
    deterministic: bool = True,
) -> Prealignment:
    """Rigid fixed -> moving pre-alignment from vertebra centre points, or the automatic fallback.

    Args:
        fixed, moving: MR and CT images.
        moving_labels: CT vertebra labels on the CT grid.
        fixed_landmarks: MR vertebra centres, name -> LPS point (mm).
        moving_landmarks: CT vertebra centres, same names. When only the MR landmarks are given, the CT centres
            are the centroids of the labels whose name (``label_names``) matches.
        label_names: Label value -> vertebra name (``"L1"``), used to pair label centroids with MR landmarks.
        deterministic: Passed to :func:`automatic_prealignment`.
    """
    if moving_landmarks is not None and fixed_landmarks is None:
        raise InputError("CT landmarks were given without MR landmarks")
    if fixed_landmarks is not None:
        method = LANDMARKS
        if moving_landmarks is None:
            if not label_names:
                raise InputError("MR landmarks need CT landmarks or named CT vertebra labels to pair with")
            centroids = label_centroids(moving_labels)
            moving_landmarks = {label_names[v]: c for v, c in centroids.items() if v in label_names}
            wanted = {_normalized_name(k) for k in fixed_landmarks}
            moving_landmarks = {k: v for k, v in moving_landmarks.items() if _normalized_name(k) in wanted}
            method = LANDMARKS_FROM_LABELS
        _, f_pts, m_pts = match_landmarks(fixed_landmarks, moving_landmarks)
        matrix = rigid_from_points(f_pts, m_pts)
        mapped = f_pts @ matrix[:3, :3].T + matrix[:3, 3]
        residual = float(np.sqrt(((mapped - m_pts) ** 2).sum(axis=1).mean()))
        return Prealignment(matrix=matrix, method=method, residual_mm=residual)
    return automatic_prealignment(fixed, moving, moving_labels, progress=progress, deterministic=deterministic)


def automatic_prealignment(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    progress: Callable[[float, str], None] | None = None,
    margin_mm: float = 25.0,
    deterministic: bool = True,
) -> Prealignment:
    """Translation search from two starts, then a rigid Mattes-MI refinement restricted to the spine region.

    The two starts are the scanner frames as they are (a CT and an MR of one session share them up to table
    motion) and the MR's field of view centred on the CT spine (frames that differ); the translation stage runs
    from both and the one with the better MI over the CT spine region wins.

    ``deterministic`` runs ITK's metric on one thread, so that the same inputs give the same matrix (see
    :func:`_itk_threads`).
    """
    spine = sitk.Cast(moving_labels > 0, sitk.sitkUInt8)
    centroid = np.mean(list(label_centroids(spine).values()), axis=0)
    fixed_geometry = Geometry.of(fixed)
    fixed_centre = fixed_geometry.corners_lps().mean(axis=0)

    radius = [max(int(round(margin_mm / s)), 1) for s in moving_labels.GetSpacing()]
    moving_mask = _dilated(spine, radius)
    starts = [centroid - fixed_centre]
    if _inside(fixed_geometry, centroid):
        starts.insert(0, np.zeros(3))
    # Translation first, then rotation: on small or low-contrast images a rigid optimiser started far away
    # trades a wrong rotation for translation.
    # As many threads as both ITK and torch may use (`srr-benchmark --threads 1` keeps the search on one).
    workers = min(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), torch.get_num_threads())
    with _itk_threads(1 if deterministic else None):
        result, level, note = _search(fixed, moving, moving_mask, starts, fixed_centre, centroid, progress, workers)
    if note:
        logger.log(level, note)
    return Prealignment(matrix=_matrix_of(result), method=AUTOMATIC)


def _dilated(mask: sitk.Image, radius: Sequence[int]) -> sitk.Image:
    """``sitk.BinaryDilate(mask, radius)`` (voxels per axis), computed on the mask's bounding box grown by ``radius``
    only (nothing beyond it can change), a part of the CT's grid."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.GetNumberOfLabels():
        return sitk.Image(mask)
    box = stats.GetBoundingBox(1)  # (x, y, z, size x, size y, size z)
    size = mask.GetSize()
    low = [max(box[a] - radius[a], 0) for a in range(3)]
    high = [min(box[a] + box[a + 3] + radius[a], size[a]) for a in range(3)]
    extent = [h - lo for lo, h in zip(low, high)]
    grown = _ball_dilate(sitk.RegionOfInterest(mask, extent, low), radius)
    return sitk.Paste(mask * 0, grown, extent, [0, 0, 0], low)


def _ball_dilate(mask: sitk.Image, radius: Sequence[int]) -> sitk.Image:
    """``sitk.BinaryDilate(mask, radius)`` (its ellipsoid of semi-axes ``radius + 0.5`` voxels, the same voxels; a
    test compares them) from a distance map, linear in the voxels: ITK's dilation by a ball of 25 voxels took 0.3 s
    of the clinical case's 1.3 s search."""
    unit = sitk.Image(mask)  # distances in units of the ellipsoid's semi-axes, on an axis-aligned copy
    unit.SetSpacing([1.0 / (r + 0.5) for r in radius])
    unit.SetDirection(np.eye(3).flatten().tolist())
    squared = sitk.SignedMaurerDistanceMap(unit, insideIsPositive=False, squaredDistance=True, useImageSpacing=True)
    grown = sitk.Cast(squared <= 1.0, sitk.sitkUInt8)
    grown.CopyInformation(mask)
    return grown


@contextmanager
def _itk_threads(count: int | None) -> Iterator[None]:
    """SimpleITK's default thread count set to ``count`` for the block (``None``: unchanged).

    ITK's Mattes MI sums its per-thread histograms and gradients in the order the threads finish, so two runs on
    two threads differed by up to 1e-6 mm in the pre-alignment, which the vertebra-wise stage amplified to 0.3 mm;
    on one thread they are identical (the sample case's search: 8.2 s on 2 threads, 11.5 s on 1).
    """
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if count is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _search(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_mask: sitk.Image,
    starts: list[np.ndarray],
    fixed_centre: np.ndarray,
    centroid: np.ndarray,
    progress: Callable[[float, str], None] | None,
    workers: int = 1,
) -> tuple[sitk.Transform, int, str | None]:
    """The translation search from ``starts`` (on up to ``workers`` threads), then the rigid stage from the best
    (rotations about ``fixed_centre``, LPS mm).

    Returns:
        The transform, and a logging level and note saying why the rigid stage was not kept (``None`` when it was).
    """
    images = (sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32), moving_mask)
    rigid = partial(_rigid_stage, fixed_centre=fixed_centre, spine_centre=centroid)
    try:
        translation, found = _translation_then_rigid(images, starts, progress, workers, rigid)
    except RuntimeError as error:
        raise InputError(
            "automatic pre-alignment failed (the MR and the CT spine region do not overlap enough); "
            "give vertebra centre landmarks"
        ) from error
    if found.rotation_deg > MAX_AUTOMATIC_ROTATION_DEG or found.shift_mm > MAX_AUTOMATIC_REFINE_SHIFT_MM:
        return (
            translation,
            logging.WARNING,
            (
                f"the automatic rigid stage ran away (it turned the CT by {found.rotation_deg:.0f} degrees and moved "
                f"the spine {found.shift_mm:.0f} mm; limits {MAX_AUTOMATIC_ROTATION_DEG:.0f} degrees, "
                f"{MAX_AUTOMATIC_REFINE_SHIFT_MM:.0f} mm): the pre-alignment is its translation stage, without "
                "rotation; the vertebra-wise rigid stage turns each vertebra by at most 15 degrees, so check the "
                "result or give vertebra centre landmarks"
            ),
        )
    if found.rigid_mi > found.translation_mi:
        return (
            translation,
            logging.INFO,
            (
                f"automatic pre-alignment: the rigid stage did not improve on the translation stage (Mattes MI "
                f"{found.rigid_mi:.4f} vs {found.translation_mi:.4f}), so the translation is kept; expected when the "
                "scans are already in register, and the vertebra-wise rigid stage fits each vertebra's rotation"
            ),
        )
    return found.transform, logging.INFO, None


#: The fixed image, the moving image and the moving spine region, as the search's registrations read them.
_Images = tuple[sitk.Image, sitk.Image, sitk.Image]


class _Rigid(NamedTuple):
    """The rigid stage from one translation: its transform, how far it went from the translation (rotation in
    degrees; shift in mm of the MR point it maps onto the CT spine centre) and the Mattes MI of both (lower is
    better) over the spine region the translation places in the MR."""

    transform: sitk.Transform
    rotation_deg: float
    shift_mm: float
    rigid_mi: float
    translation_mi: float


def _rigid_stage(
    images: _Images,
    translation: sitk.Transform,
    progress: Callable[[float, str], None] | None,
    stop: threading.Event | None = None,
    *,
    fixed_centre: np.ndarray,
    spine_centre: np.ndarray,
) -> _Rigid | None:
    """The rigid Mattes-MI registration from ``translation``, rotating about ``fixed_centre``; ``None`` when
    ``stop`` was set before it ended.

    It samples the MR inside the spine region placed by the translation (a fixed mask): with only a moving mask,
    rotating the CT out of the sampled region can raise the MI and the optimiser runs away."""
    fixed, moving, moving_mask = images
    start = sitk.Euler3DTransform()
    start.SetCenter(tuple(float(c) for c in fixed_centre))
    start.SetTranslation(tuple(float(c) for c in _matrix_of(translation)[:3, 3]))
    fixed_mask = sitk.Resample(moving_mask, fixed, translation, sitk.sitkNearestNeighbor, 0)
    result = _mattes_mi(fixed, moving, start, progress, fixed_mask=fixed_mask, learning_rate=0.5, stop=stop)
    if stop is not None and stop.is_set():
        return None
    return _Rigid(
        result,
        *_refinement_change(result, translation, spine_centre),
        _mutual_information(fixed, moving, result, fixed_mask=fixed_mask),
        _mutual_information(fixed, moving, translation, fixed_mask=fixed_mask),
    )


_RigidStage = Callable[..., "_Rigid | None"]


def _translation_then_rigid(
    images: _Images,
    starts: list[np.ndarray],
    progress: Callable[[float, str], None] | None,
    workers: int,
    rigid: _RigidStage,
) -> tuple[sitk.Transform, _Rigid]:
    """The best translation of the searches from ``starts`` (:func:`_search_from`) and ``rigid`` from it.

    With ``workers`` > 1 and two starts, the second start searches on a thread beside the first, on its own copies
    of the images, and whichever search ends first starts the rigid stage from its best translation on the core it
    frees (:class:`_HeadStart`): that is the rigid stage wanted when that start wins, as it often does (the sample
    case, the pairs in register), and it is stopped when it loses. Every registration uses one ITK thread either
    way, so the result does not depend on ``workers`` or on which search ends first. Progress is reported from the
    calling thread only: a GUI's callbacks must not run on a worker thread.
    """
    rigid_report = _report_stage(progress, 0.4, 1.0)
    if workers < 2 or len(starts) < 2:
        scored = []
        for number, start in enumerate(starts):
            share = _report_stage(progress, 0.4 * number / len(starts), 0.4 * (number + 1) / len(starts))
            scored += _search_from(images, start, share)
        translation = _best(scored)
        return translation, rigid(images, translation, rigid_report)
    head = _HeadStart(rigid, _own_copies(images))

    def head_start_from(job: Future) -> None:  # runs when the second search ends, on its thread
        if job.exception() is None:
            head.begin(pool, job.result())

    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            later = pool.submit(_search_from, _own_copies(images), starts[1], None)
            later.add_done_callback(head_start_from)
            first = _search_from(images, starts[0], _report_stage(progress, 0.0, 0.4))
            head.begin(pool, first)
            translation = _best(first + later.result())
            if rigid_report is not None:
                rigid_report(0.0, "automatic rigid pre-alignment")
            if head.translation is translation:
                return translation, head.result()
            head.stop()
            return translation, rigid(images, translation, rigid_report)
        finally:
            head.stop()  # a failed search does not wait for a whole rigid stage it will not use


def _search_from(
    images: _Images, start: np.ndarray, progress: Callable[[float, str], None] | None
) -> list[tuple[float, sitk.Transform]]:
    """The translation search from ``start`` (LPS mm) and the start itself, each with its Mattes MI over the spine
    region: ``[(MI, found), (MI, start)]``. The start competes too: on a pair already in register the optimiser can
    end up worse than where it began (a tiny clinical-like pair: 0.5 mm off with MI 7 % worse than the scanner
    frames')."""
    fixed, moving, moving_mask = images
    begin = sitk.TranslationTransform(3, tuple(float(c) for c in start))
    found = _mattes_mi(fixed, moving, begin, progress, moving_mask=moving_mask)
    return [(_mutual_information(fixed, moving, t, moving_mask=moving_mask), t) for t in (found, begin)]


def _best(scored: list[tuple[float, sitk.Transform]]) -> sitk.Transform:
    """The transform of lowest MI; of equal ones, the first."""
    return min(enumerate(scored), key=lambda item: (item[1][0], item[0]))[1][1]


class _HeadStart:
    """The rigid stage started from the best translation of whichever search ends first, on its own copies of the
    images (:func:`_translation_then_rigid`). :meth:`begin` may be called from any thread; only the first call
    starts it."""

    def __init__(self, rigid: _RigidStage, images: _Images) -> None:
        self.rigid, self.images = rigid, images
        self.translation: sitk.Transform | None = None
        self.job: Future | None = None
        self._lock, self._stop = threading.Lock(), threading.Event()

    def begin(self, pool: ThreadPoolExecutor, scored: list[tuple[float, sitk.Transform]]) -> None:
        with self._lock:
            if self.job is None:
                self.translation = _best(scored)
                self.job = pool.submit(self.rigid, self.images, self.translation, None, self._stop)

    def result(self) -> _Rigid:
        assert self.job is not None
        return self.job.result()

    def stop(self) -> None:
        """Stop the registration at its next iteration (its result is not wanted)."""
        self._stop.set()


def _own_copies(images: _Images) -> _Images:
    """Copies of ``images`` that share no pixel buffer or pipeline state with them (for another thread)."""
    fixed, moving, moving_mask = (_own_copy(image) for image in images)
    return fixed, moving, moving_mask


def _own_copy(image: sitk.Image) -> sitk.Image:
    """A copy of ``image`` that shares no pixel buffer or pipeline state with it (for another thread)."""
    copy = sitk.Image(image)
    copy.MakeUnique()
    return copy


def _mattes_mi(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: sitk.Transform,
    progress: Callable[[float, str], None] | None,
    moving_mask: sitk.Image | None = None,
    fixed_mask: sitk.Image | None = None,
    learning_rate: float = 2.0,
    stop: threading.Event | None = None,
) -> sitk.Transform:
    """Multi-resolution Mattes-MI registration of ``moving`` onto ``fixed`` from ``initial`` (fixed -> moving);
    when ``stop`` is set it ends at its next iteration."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    if np.prod(moving.GetSize()) > GRADIENT_FILTER_MAX_VOXELS:
        _gradients_at_samples(method)
    # The coarsest level keeps at least 24 voxels along the shortest axis.
    factors = [f for f in (4, 2) if min(fixed.GetSize()) / f >= 24] + [1]
    voxels = float(np.prod(fixed.GetSize()))
    shares = [min(1.0, MAX_METRIC_SAMPLES / (voxels / f**3)) for f in factors]
    if min(shares) < 1.0:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentagePerLevel(shares, seed=1)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=0.01, numberOfIterations=150, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(factors)
    method.SetSmoothingSigmasPerLevel([float(f - 1) for f in factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    if stop is not None:
        method.AddCommand(sitk.sitkIterationEvent, lambda: stop.is_set() and method.StopRegistration())
    if progress is not None:
        # Within each resolution level the bar moves with the optimiser's iterations (at most ``iterations``), so a
        # long search on a large CT shows that it is working.
        levels, iterations = len(factors), 150
        method.AddCommand(
            sitk.sitkIterationEvent,
            lambda: progress(
                min(
                    (method.GetCurrentLevel() + min(method.GetOptimizerIteration() + 1, iterations) / iterations)
                    / levels,
                    1.0,
                ),
                f"automatic rigid pre-alignment (level {method.GetCurrentLevel() + 1}/{levels})",
            ),
        )
    return method.Execute(fixed, moving)


#: CT voxels beyond which the pre-alignment's registrations take image gradients where they sample (see
#: :func:`_gradients_at_samples`).
GRADIENT_FILTER_MAX_VOXELS = 1_000_000


def _gradients_at_samples(method: sitk.ImageRegistrationMethod) -> None:
    """Image gradients computed where the metric samples instead of filtered over the whole images.

    ITK's default smooths the full-resolution images into 3-vector images at every level, and on a CT of millions
    of voxels that filtering is most of the search's time: a 512 x 512 x 400 CT cut to its spine (27 M voxels) took
    115 s with it and 26 s without; on the clinical tier's 5 M voxel CTs it is 1.0 s of a 1.2 s translation stage.
    The final results moved by about a tenth of a voxel per case either way, 0.02 mm further from the truth on
    average over 23 clinical-like cases (issue 16's closing note of session 16). Small CTs, up to
    :data:`GRADIENT_FILTER_MAX_VOXELS`, keep the filtered gradients: there they cost little and save iterations
    (the bundled sample's 3 mm CT searched in half the time with them).
    """
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)


def _report_stage(
    progress: Callable[[float, str], None] | None, start: float, end: float
) -> Callable[[float, str], None] | None:
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * fraction, message)


def _mutual_information(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
) -> float:
    """Mattes MI metric value (lower is better) of ``transform``, sampled inside the given masks at the fixed image's
    voxels on a grid of about :data:`EVALUATION_SPACING_MM` (:func:`_evaluation_factors`)."""
    steps = tuple(slice(None, None, f) for f in _evaluation_factors(fixed))
    if any(step.step > 1 for step in steps):
        # Slicing keeps each kept voxel at its place (sitk.Shrink moves it by half the factor)
        fixed = fixed[steps]
        fixed_mask = None if fixed_mask is None else fixed_mask[steps]
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    _gradients_at_samples(method)  # the value does not depend on them
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


#: Voxel size (mm) at which :func:`_mutual_information` reads the fixed image: it compares candidates (a search's
#: start and end, the translation and rigid stages) on the same voxels, and every fixed voxel cost 40 % of the
#: automatic search on the sample case (0.38 of 0.96 s, docs/SPEED_PROFILE.md of session 18).
EVALUATION_SPACING_MM = 2.0


def _evaluation_factors(fixed: sitk.Image) -> list[int]:
    """Per image axis (x, y, z), every how many voxels :func:`_mutual_information` reads: the largest integer that
    keeps the step within :data:`EVALUATION_SPACING_MM` (1 along axes already that coarse)."""
    return [max(int(EVALUATION_SPACING_MM / s + 1e-6), 1) for s in fixed.GetSpacing()]


def _refinement_change(
    rigid: sitk.Transform, translation: sitk.Transform, spine_centre: np.ndarray
) -> tuple[float, float]:
    """How far the rigid stage went from the translation stage: its rotation (degrees) and the shift (mm) of the MR
    point that it maps onto the CT spine centre."""
    a, b = _matrix_of(rigid), _matrix_of(translation)
    centre_a = np.linalg.solve(a[:3, :3], spine_centre - a[:3, 3])  # MR point that the rigid map sends to the centre
    centre_b = spine_centre - b[:3, 3]
    return _rotation_degrees(a), float(np.linalg.norm(centre_a - centre_b))


def _rotation_degrees(matrix: np.ndarray) -> float:
    cosine = (np.trace(matrix[:3, :3]) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _inside(geometry: Geometry, point: np.ndarray) -> bool:
    index = geometry.lps_to_array_index(point[None])[0]
    return bool(np.all(index >= -0.5) and np.all(index <= np.asarray(geometry.shape) - 0.5))


def _matrix_of(transform: sitk.Transform) -> np.ndarray:
    """4x4 matrix of a linear SimpleITK transform (possibly wrapped in a composite), found by mapping points."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.asarray(transform.TransformPoint(tuple(unit))) - origin
    matrix[:3, 3] = origin
    return matrix
