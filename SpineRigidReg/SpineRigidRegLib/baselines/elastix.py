"""The *Staring* baseline: elastix B-spline registration with mutual information and ``TransformRigidityPenalty``.

Staring, Klein and Pluim (Med. Phys. 2007) penalise, inside a rigidity coefficient image ``c(x)`` defined on the
moving image, the deviation of the B-spline transform from a rigid one: a linearity (affinity) condition on second
derivatives, an orthonormality condition (OC, ``J^T J = I``) and a properness condition (PC, ``det J = 1``). The
elastix model-zoo entry ``Par0004`` holds their settings. :func:`parameter_map` writes an equivalent map for the
current elastix (multi-metric form: ``AdvancedMattesMutualInformation`` + ``TransformRigidityPenalty``), with the
same condition weights (linearity 100, orthonormality 1, properness 2), 32 histogram bins, 5000 random samples drawn
anew every iteration, first-order B-spline interpolation during the optimisation and a final control-point spacing
of 8 mm. Deviations from Par0004, chosen for a spine CT/MR pair and documented in ``docs/BENCHMARKS.md``:

- three resolutions instead of four and a configurable iteration count (the benchmark and CI run few iterations);
- elastix's adaptive stochastic gradient descent with automatic step-size estimation instead of the hand-set
  ``StandardGradientDescent`` gains, which were tuned to CT numbers of the lung and do not transfer to a [0, 1] MR;
- a constant rigidity weight (Par0004 uses 0.1 then 4.0 at the last level; with the adaptive optimiser 4.0 stopped
  the vertebrae from moving at all on our pairs) and no dilation of the rigidity image (dilating by twice the grid
  spacing would merge neighbouring vertebrae across the discs into one rigid body).

The rigidity image is 1 inside every vertebra of the CT label map and 0 elsewhere, on the CT (moving) grid.

The result is a displacement field on the fixed grid in the core's convention (``(1, 3, D, H, W)`` voxels,
pull-back: fixed voxel ``x`` -> moving position ``x + u(x)`` measured in fixed-grid voxels), obtained from
transformix's deformation field (LPS mm, fixed point -> moving point) with :func:`..geometry.displacement_from_lps`.

``itk-elastix`` is an optional dependency (``pip install spinerigidreg[baseline]``); it is imported on first use.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import CancelledError, InputError
from ..geometry import Geometry, displacement_from_lps
from ..preprocess import resample_to_reference

log = logging.getLogger(__name__)

MATTES_MI = "AdvancedMattesMutualInformation"
NMI = "NormalizedMutualInformation"
RIGIDITY_PENALTY = "TransformRigidityPenalty"


@dataclass(frozen=True)
class ElastixSettings:
    """Settings of :func:`register_elastix` (defaults: the benchmark's Staring configuration).

    Attributes:
        rigidity_penalty: Add ``TransformRigidityPenalty`` on the CT vertebrae (False: plain B-spline + MI).
        iterations: Optimiser iterations per resolution (one number for all resolutions, or one per resolution).
        resolutions: Number of pyramid levels (and B-spline grid refinements).
        grid_spacing_mm: Final B-spline control-point spacing (mm).
        metric: ``"AdvancedMattesMutualInformation"`` or ``"NormalizedMutualInformation"``.
        histogram_bins: Joint histogram bins of the metric.
        spatial_samples: Random samples per iteration.
        rigidity_weight: Weight of the penalty relative to the similarity metric (one value or one per resolution).
        linearity_weight, orthonormality_weight, properness_weight: The penalty's three condition weights.
        dilate_rigidity: Dilate the rigidity image (by ``dilation_radius_multiplier`` times the grid spacing).
        dilation_radius_multiplier: See above.
        threads: Worker threads (``None``: ITK's default, the number of cores).
        seed: Random seed of the sampler (results are reproducible for one thread count).
    """

    rigidity_penalty: bool = True
    iterations: int | Sequence[int] = 250
    resolutions: int = 3
    grid_spacing_mm: float = 8.0
    metric: str = MATTES_MI
    histogram_bins: int = 32
    spatial_samples: int = 5000
    rigidity_weight: float | Sequence[float] = 0.1
    linearity_weight: float = 100.0
    orthonormality_weight: float = 1.0
    properness_weight: float = 2.0
    dilate_rigidity: bool = False
    dilation_radius_multiplier: float = 2.0
    threads: int | None = None
    seed: int = 121212

    def __post_init__(self) -> None:
        if self.resolutions < 1:
            raise InputError(f"elastix resolutions must be >= 1, got {self.resolutions}")
        if min(_per_level(self.iterations, self.resolutions, "iterations")) < 1:
            raise InputError("elastix iterations must be >= 1")
        if min(_per_level(self.rigidity_weight, self.resolutions, "rigidity_weight")) < 0:
            raise InputError("the rigidity weight must be >= 0")
        if self.grid_spacing_mm <= 0 or self.spatial_samples < 100 or self.histogram_bins < 4:
            raise InputError("grid_spacing_mm must be > 0, spatial_samples >= 100 and histogram_bins >= 4")
        if self.metric not in (MATTES_MI, NMI):
            raise InputError(f"elastix metric must be {MATTES_MI!r} or {NMI!r}, got {self.metric!r}")
        if self.threads is not None and self.threads < 1:
            raise InputError("threads must be >= 1")


@dataclass
class ElastixResult:
    """What :func:`register_elastix` returns.

    Attributes:
        displacement: ``(1, 3, D, H, W)`` float32 voxels on the fixed grid (pull-back, array-order channels).
        geometry: The fixed grid.
        runtime_s: Wall-clock time of the registration plus the deformation-field computation.
        parameter_map: The parameter map used (without the temporary rigidity-image path).
        timings: ``registration`` and ``field`` seconds.
    """

    displacement: torch.Tensor
    geometry: Geometry
    runtime_s: float
    parameter_map: dict[str, list[str]]
    timings: dict[str, float] = field(default_factory=dict)


def _per_level(value: float | int | Sequence, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(values) == 1:
        values = values * levels
    if len(values) != levels:
        raise InputError(f"{name} needs one value or one per resolution ({levels}), got {len(values)}")
    return values


def is_available() -> bool:
    """True when the ``itk-elastix`` package can be imported."""
    try:
        _itk()
    except ImportError:
        return False
    return True


def _itk():
    import itk

    if not hasattr(itk, "ElastixRegistrationMethod"):
        raise ImportError("the itk package has no elastix; install itk-elastix (pip install spinerigidreg[baseline])")
    return itk


def parameter_map(settings: ElastixSettings, rigidity_image_path: str | None = None) -> dict[str, list[str]]:
    """The elastix parameter map (name -> list of string values) for ``settings``.

    Args:
        settings: See :class:`ElastixSettings`.
        rigidity_image_path: File of the moving rigidity image; required when the penalty is on.
    """
    levels = settings.resolutions
    metrics = [settings.metric] + ([RIGIDITY_PENALTY] if settings.rigidity_penalty else [])
    schedule = [str(2 ** (levels - 1 - level)) for level in range(levels) for _ in range(3)]
    pm: dict[str, list[str]] = {
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "Registration": ["MultiMetricMultiResolutionRegistration"],
        "FixedImagePyramid": ["FixedRecursiveImagePyramid"],
        "MovingImagePyramid": ["MovingRecursiveImagePyramid"],
        "Interpolator": ["BSplineInterpolator"],
        "BSplineInterpolationOrder": ["1"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "FinalBSplineInterpolationOrder": ["3"],
        "Resampler": ["DefaultResampler"],
        "Transform": ["BSplineTransform"],
        "FinalGridSpacingInPhysicalUnits": [str(float(settings.grid_spacing_mm))],
        "GridSpacingSchedule": [str(float(s)) for s in (2 ** (levels - 1 - level) for level in range(levels))],
        "HowToCombineTransforms": ["Compose"],
        "NumberOfResolutions": [str(levels)],
        "ImagePyramidSchedule": schedule,
        "Metric": metrics,
        "Metric0Weight": ["1.0"],
        "NumberOfHistogramBins": [str(settings.histogram_bins)],
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "AutomaticParameterEstimation": ["true"],
        "MaximumNumberOfIterations": [str(int(i)) for i in _per_level(settings.iterations, levels, "iterations")],
        "ImageSampler": ["RandomCoordinate"],
        "NumberOfSpatialSamples": [str(settings.spatial_samples)],
        "NewSamplesEveryIteration": ["true"],
        "CheckNumberOfSamples": ["false"],
        "RandomSeed": [str(int(settings.seed))],
        "DefaultPixelValue": ["0"],
        "WriteResultImage": ["false"],
        "WriteIterationInfo": ["false"],
        "ResultImageFormat": ["mha"],
    }
    if settings.threads is not None:
        pm["MaximumNumberOfThreads"] = [str(settings.threads)]
    if settings.rigidity_penalty:
        if rigidity_image_path is None:
            raise InputError("the rigidity penalty needs a moving rigidity image")
        weights = _per_level(settings.rigidity_weight, levels, "rigidity_weight")
        pm.update(
            {
                "Metric1Weight": [str(float(w)) for w in weights],
                "LinearityConditionWeight": [str(float(settings.linearity_weight))],
                "OrthonormalityConditionWeight": [str(float(settings.orthonormality_weight))],
                "PropernessConditionWeight": [str(float(settings.properness_weight))],
                "UseLinearityCondition": ["true"],
                "UseOrthonormalityCondition": ["true"],
                "UsePropernessCondition": ["true"],
                "CalculateLinearityCondition": ["true"],
                "CalculateOrthonormalityCondition": ["true"],
                "CalculatePropernessCondition": ["true"],
                "DilateRigidityImages": ["true" if settings.dilate_rigidity else "false"],
                "DilationRadiusMultiplier": [str(float(settings.dilation_radius_multiplier))],
                "UseFixedRigidityImage": ["false"],
                "UseMovingRigidityImage": ["true"],
                "MovingRigidityImageName": [rigidity_image_path],
            }
        )
    return pm


def rigidity_image(moving_labels: sitk.Image, moving: sitk.Image | None = None) -> sitk.Image:
    """The rigidity coefficient image: float32, 1 inside any vertebra label, 0 elsewhere, on ``moving``'s grid.

    Args:
        moving_labels: CT vertebra label map (any grid; placed on ``moving``'s grid by physical position).
        moving: The CT; ``None`` keeps the label map's grid.
    """
    if not isinstance(moving_labels, sitk.Image):
        raise TypeError(f"moving_labels must be a SimpleITK image, got {type(moving_labels).__name__}")
    labels = moving_labels
    if moving is not None and not Geometry.of(labels).same_grid(Geometry.of(moving)):
        labels = resample_to_reference(labels, moving, is_label=True)
    mask = sitk.Cast(sitk.Cast(labels, sitk.sitkUInt32) > 0, sitk.sitkFloat32)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise InputError("the CT vertebra label map is empty: the rigidity penalty needs vertebra labels")
    return mask


def sitk_to_itk(image: sitk.Image, dtype: type = np.float32):
    """A 3D scalar SimpleITK image as an ``itk.Image`` of ``dtype`` (float32; uint8 for masks) with the same
    geometry (LPS)."""
    itk = _itk()
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).astype(dtype))
    out = itk.GetImageFromArray(array)
    out.SetSpacing([float(s) for s in image.GetSpacing()])
    out.SetOrigin([float(o) for o in image.GetOrigin()])
    out.SetDirection(itk.GetMatrixFromArray(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return out


def register_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image | None,
    settings: ElastixSettings = ElastixSettings(),
    moving_mask: sitk.Image | None = None,
    progress: Callable[[float, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> ElastixResult:
    """Register ``moving`` (CT) onto ``fixed`` (MR) with elastix's B-spline (+ rigidity penalty).

    The images are taken as they are (already rigidly pre-aligned); elastix's optimisation itself cannot be
    interrupted, so ``should_cancel`` is polled before and after it.

    Args:
        fixed: MR image (any geometry); the output field lives on its grid.
        moving: CT image.
        moving_labels: CT vertebra labels (required with the penalty; unused without).
        settings: See :class:`ElastixSettings`.
        moving_mask: Optional mask (non-zero = data) on ``moving``'s grid: elastix drops the samples that map
            outside it, e.g. outside the field of view of a CT resampled onto the MR's grid.
        progress: Called with ``(fraction, message)`` at the start and the end.
        should_cancel: True raises :class:`..errors.CancelledError`.

    Returns:
        :class:`ElastixResult` with the displacement in fixed-grid voxels.

    Raises:
        ImportError: ``itk-elastix`` is not installed.
        RuntimeError: elastix failed (its last log lines are in the message).
    """
    _check_inputs(fixed, moving, moving_labels, settings)
    itk = _itk()
    _raise_if_cancelled(should_cancel)
    if progress:
        progress(0.0, "elastix" + (" + rigidity penalty" if settings.rigidity_penalty else ""))
    if settings.threads is not None:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(settings.threads))
    work = tempfile.mkdtemp(prefix="srr-elastix-")
    try:
        pm, lps, runtime_s, timings = _run_elastix(itk, work, fixed, moving, moving_labels, settings, moving_mask)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    geometry = Geometry.of(fixed)
    if lps.shape != (*geometry.shape, 3):
        raise RuntimeError(f"transformix returned a field of shape {lps.shape}, expected {(*geometry.shape, 3)}")
    displacement = displacement_from_lps(torch.from_numpy(lps).permute(3, 0, 1, 2)[None], geometry).float()
    _raise_if_cancelled(should_cancel)
    if progress:
        progress(1.0, "elastix done")
    shown = {k: v for k, v in pm.items() if k != "MovingRigidityImageName"}
    return ElastixResult(
        displacement=displacement,
        geometry=geometry,
        runtime_s=runtime_s,
        parameter_map=shown,
        timings=timings,
    )


def _check_inputs(
    fixed: sitk.Image, moving: sitk.Image, moving_labels: sitk.Image | None, settings: ElastixSettings
) -> None:
    """Both images 3D scalar SimpleITK images; the vertebra labels present when the penalty needs them."""
    for name, image in (("fixed", fixed), ("moving", moving)):
        if not isinstance(image, sitk.Image):
            raise TypeError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"the {name} image must be a 3D scalar image")
    if settings.rigidity_penalty and moving_labels is None:
        raise InputError("the elastix rigidity penalty needs the CT vertebra label map")


def _raise_if_cancelled(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("elastix registration cancelled")


def _run_elastix(
    itk: ModuleType,
    work: str,
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image | None,
    settings: ElastixSettings,
    moving_mask: sitk.Image | None,
) -> tuple[dict[str, list[str]], np.ndarray, float, dict[str, float]]:
    """Run elastix, then transformix, in the folder ``work`` (the rigidity image and the logs go there).

    Returns:
        The parameter map; transformix's deformation field ``(D, H, W, 3)`` float64 on the fixed grid (LPS mm,
        fixed point -> moving point); the time (s) of both, and of each (``registration``, ``field``).
    """
    rigidity_path = None
    if settings.rigidity_penalty:
        rigidity_path = os.path.join(work, "moving_rigidity.mha")
        sitk.WriteImage(rigidity_image(moving_labels, moving), rigidity_path)
    pm = parameter_map(settings, rigidity_path)
    fixed_itk, moving_itk = sitk_to_itk(fixed), sitk_to_itk(moving)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(pm)
    start = time.perf_counter()
    method = _registration(itk, work, fixed_itk, moving_itk, parameters, moving_mask)
    registered = time.perf_counter()
    lps = _deformation_field(itk, work, moving_itk, method)
    end = time.perf_counter()
    return pm, lps, end - start, {"registration": registered - start, "field": end - registered}


def _registration(itk: ModuleType, work: str, fixed_itk, moving_itk, parameters, moving_mask: sitk.Image | None):
    """elastix's registration method for the ``itk`` images, run (its log in ``work/elastix.log``)."""
    method = itk.ElastixRegistrationMethod.New(fixed_itk, moving_itk)
    if moving_mask is not None:
        method.SetMovingMask(sitk_to_itk(sitk.Cast(moving_mask != 0, sitk.sitkUInt8), np.uint8))
    method.SetParameterObject(parameters)
    method.SetLogToConsole(False)
    method.SetLogToFile(True)
    method.SetOutputDirectory(work)
    try:
        method.UpdateLargestPossibleRegion()
    except RuntimeError as error:
        raise RuntimeError(f"elastix failed: {_log_tail(work) or error}") from None
    return method


def _deformation_field(itk: ModuleType, work: str, moving_itk, method) -> np.ndarray:
    """transformix's deformation field of ``method``'s result: ``(D, H, W, 3)`` float64, LPS mm, fixed grid."""
    # transformix writes its field file into the working folder (the convenience function would use the cwd).
    transformix = itk.TransformixFilter.New(moving_itk)
    transformix.SetTransformParameterObject(method.GetTransformParameterObject())
    transformix.SetComputeDeformationField(True)
    transformix.SetOutputDirectory(work)
    transformix.SetLogToConsole(False)
    transformix.UpdateLargestPossibleRegion()
    field_itk = transformix.GetOutputDeformationField()
    return np.asarray(itk.GetArrayFromImage(field_itk), dtype=np.float64)


def _log_tail(folder: str, lines: int = 4) -> str:
    path = os.path.join(folder, "elastix.log")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as stream:
        text = [line.strip() for line in stream if line.strip()]
    errors = [line for line in text if "ERROR" in line.upper()]
    return " | ".join((errors or text)[-lines:])[:500]


def describe(settings: ElastixSettings) -> Mapping[str, object]:
    """A short, JSON-friendly description of the settings for reports."""
    return {
        "penalty": settings.rigidity_penalty,
        "metric": settings.metric,
        "iterations": list(_per_level(settings.iterations, settings.resolutions, "iterations")),
        "resolutions": settings.resolutions,
        "grid_spacing_mm": settings.grid_spacing_mm,
        "samples": settings.spatial_samples,
        "rigidity_weight": list(_per_level(settings.rigidity_weight, settings.resolutions, "rigidity_weight"))
        if settings.rigidity_penalty
        else None,
        "condition_weights (linearity, OC, PC)": [
            settings.linearity_weight,
            settings.orthonormality_weight,
            settings.properness_weight,
        ]
        if settings.rigidity_penalty
        else None,
        "threads": settings.threads,
    }


__all__ = [
    "ElastixResult",
    "ElastixSettings",
    "describe",
    "is_available",
    "parameter_map",
    "register_elastix",
    "rigidity_image",
]
