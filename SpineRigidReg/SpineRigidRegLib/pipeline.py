"""The registration pipeline: CT + CT vertebra labels + MR in, a rigidity-preserving deformation and its QA out.

The command line, the Slicer module and the benchmark all call :func:`register` (or, for a pair already on one
grid, :func:`register_prealigned`). :func:`register` reads top to bottom as its stages:

1. :func:`.inputs.validate_intensity_image` / :func:`.inputs.validate_labels`: one-line errors before any compute;
   :func:`.inputs.crop_to_spine`: the stages see the CT around its labelled vertebrae only;
2. :func:`find_mr_bone`: the MR segmentation network's bone probability (an output, a QA check, and the input of
   a label-guided network);
3. :func:`prealign_stage`: rigid pre-alignment (MR points, the predicted MR bone, or the automatic search);
4. :func:`.processing.to_processing_grid`: the pair on its processing grid (1 mm, the MR's direction, the CT spine
   plus a margin), resampled once into a :class:`.processing.ProcessingPair`;
5. :func:`register_prealigned`: network -> vertebra-wise rigid stage -> optional dense refinement;
6. :func:`assemble_result`: outputs in the MR's geometry, per-vertebra figures, the plausibility check.

Settings live in :mod:`.settings`, the result type in :mod:`.result`, file writing in :mod:`.outputs`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from . import metrics
from .bias_field import correct_bias_field, forget_corrections
from .checkpoint import card_sha256, load_bundled_network, load_network, select_device
from .data.vertebrae import label_names
from .errors import CancelledError
from .geometry import Geometry, displacement_field_image, image_to_tensor, tensor_to_image
from .inference import network_arithmetic, network_arithmetic_name, with_fast_layout
from .inputs import crop_to_spine, finite_copy, validate_image, validate_intensity_image, validate_labels
from .jacobian import determinant, jacobian_matrix
from .network import RegistrationNet
from .outputs import write_outputs
from .polyrigid import refine_vertebrae_rigidly
from .prealign import Prealignment, prealign
from .preprocess import resample_to_reference
from .processing import (
    MAX_GRID_VOXELS,
    ProcessingPair,
    check_memory,
    forget_kept_pair,
    processing_grid,
    to_processing_grid,
    vertebrae_at_points,
)
from .refine import RefineWeights, refine_velocity
from .result import MAX_VOLUME_CHANGE_PERCENT, RegistrationResult, check_plausible
from .segmentation.align import bone_prealignment
from .segmentation.predict import BONE_THRESHOLD
from .segmentation.stage import add_mr_bone_agreement, forget_predictions, mr_bone_summary, predict_mr_bone
from .settings import RegistrationSettings
from .vertebra_report import (
    MR_COVERAGE_WARN_PERCENT,
    add_landmark_errors,
    add_mr_coverage,
    label_interpolator,
    vertebra_rigid_transforms,
)
from .warp import displacement_from_velocity, forget_maps, present_labels, warp_labels

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
CancelCallback = Callable[[], bool]


def _report(progress: ProgressCallback | None, start: float, end: float) -> ProgressCallback | None:
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)


def forget_kept_work() -> None:
    """Drop what runs keep for the next run on the same images: the MR's segmentation and bias correction, the last
    processing pair, and the maps of the last results' velocities (a manual correction starts from one). A benchmark
    calls it before timing a first registration."""
    forget_predictions()
    forget_corrections()
    forget_kept_pair()
    forget_maps()


def _check_cancel(should_cancel: CancelCallback | None) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("registration cancelled")


def register_prealigned(
    pair: ProcessingPair,
    network: RegistrationNet,
    settings: RegistrationSettings = RegistrationSettings(),
    initial_velocity: torch.Tensor | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Network -> vertebra-wise rigid stage -> dense refinement, on a pair already on one grid.

    Args:
        pair: The pair on its processing grid; sizes a multiple of the network's ``required_multiple``.
        network: The registration network (its device is used).
        settings: Stage settings (``vertebra_rigid``, ``refine_steps``, ``refine_weights``, ``vertebra_weights``).
        initial_velocity: Start from this velocity (a previous result) instead of running the network.

    Returns:
        ``(displacement (1, 3, D, H, W) voxels, velocity (1, 3, d, h, w), timings in s)``.
    """
    device = next(network.parameters()).device
    pair = pair.to(device)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if initial_velocity is None:
        velocity = network_velocity(pair, network, settings.network_precision)
    else:
        velocity = initial_velocity.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["network"] = time.perf_counter() - start
    _check_cancel(should_cancel)
    start = time.perf_counter()
    # A re-run from a previous result keeps that result's vertebra motions, unless point pairs correct them: the
    # vertebrae with points on them then follow their points rigidly, the others stay as they were (the dense
    # refinement after it bends what lies between).
    rigid_weights, rigid_settings = settings.vertebra_weights, settings.vertebra_rigid
    if initial_velocity is not None:
        rigid_weights = _pointed_only(pair, settings.vertebra_weights)
        rigid_settings = replace(rigid_settings, steps=min(rigid_settings.steps, rigid_settings.correction_steps))
    rigid = rigid_settings.steps > 0 and (initial_velocity is None or bool(rigid_weights))
    rigid_share = (1.0 if settings.refine_steps == 0 else 0.5) if rigid else 0.0
    common = dict(integration_steps=network.config.integration_steps, should_cancel=should_cancel)
    if rigid:
        velocity, _ = refine_vertebrae_rigidly(
            velocity,
            pair,
            rigid_settings,
            vertebra_weights=rigid_weights,
            progress=None if progress is None else lambda f, m: progress(rigid_share * f, m),
            **common,
        )
    timings["vertebra_rigid"] = time.perf_counter() - start
    _check_cancel(should_cancel)
    start = time.perf_counter()
    velocity = refine_velocity(
        velocity,
        pair,
        settings.refine_steps,
        settings.refine_weights,
        vertebra_weights=settings.vertebra_weights,
        progress=None if progress is None else lambda f, m: progress(rigid_share + (1.0 - rigid_share) * f, m),
        **common,
    )
    timings["refinement"] = time.perf_counter() - start
    start = time.perf_counter()
    displacement = displacement_from_velocity(velocity, network.config.integration_steps, pair.fixed.shape[2:])
    timings["integration"] = time.perf_counter() - start
    return displacement, velocity, timings


def _pointed_only(pair: ProcessingPair, weights: Mapping[int, float] | None) -> dict[int, float]:
    """``weights`` (label -> weight) with every vertebra that no point pair lies on set to 0; empty when no point pair
    lies on a vertebra that may move."""
    pointed, weights = vertebrae_at_points(pair), weights or {}
    present = present_labels(pair.moving_labels)
    chosen = {v: (weights.get(v, 1.0) if v in pointed else 0.0) for v in present}
    return chosen if any(w > 0 for w in chosen.values()) else {}


def network_velocity(pair: ProcessingPair, network: RegistrationNet, precision: str = "float32") -> torch.Tensor:
    """The network's velocity ``(1, 3, d, h, w)`` float32 for ``pair`` (on the network's device), computed in
    ``precision`` (:func:`.inference.network_arithmetic`); a label-guided network without a bone probability gets
    an empty one, the input it was trained to fall back from."""
    fixed_bone = pair.fixed_bone
    if network.config.use_fixed_bone and fixed_bone is None:
        log.warning("the network takes the MR's predicted bone, and there is none: it runs on the images alone")
        fixed_bone = torch.zeros_like(pair.fixed)
    with network_arithmetic(pair.fixed.device, precision):
        velocity = network.velocity(pair.fixed, pair.moving, pair.moving_labels, fixed_bone)
        return velocity.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def resolve_network(settings: RegistrationSettings, network: RegistrationNet | None) -> RegistrationNet:
    """The network to use: the given one, ``settings.model_path``, or the bundled model, on the chosen device (a
    loaded one in the faster layout, :func:`.inference.with_fast_layout`)."""
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
        return with_fast_layout(load_network(settings.model_path, expected_sha256=expected, device=device))
    return with_fast_layout(load_bundled_network(device=device))


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
    clock = _StageClock(should_cancel)
    if progress:
        progress(0.0, "checking inputs")
    with clock.stage("load"):
        images = _checked_inputs(fixed, moving, moving_labels, fixed_labels)
        net = resolve_network(settings, network)
    device = next(net.parameters()).device
    with clock.stage("mr_segmentation"):
        bone_probability = find_mr_bone(images.fixed, settings, net, device)
        mr_bone = None
        if bone_probability is not None and settings.mr_segmentation:
            mr_bone = sitk.Cast(bone_probability > BONE_THRESHOLD, sitk.sitkUInt8)
    with clock.stage("bias_field"):
        if progress and settings.bias_correction:
            progress(0.04, "correcting the MR's bias field")
        mr = correct_bias_field(images.fixed) if settings.bias_correction else images.fixed
    with clock.stage("prealign"):
        stage = _report(progress, 0.05, 0.2)
        pre = prealign_stage(
            mr, images.ct, images.ct_labels, fixed_landmarks, moving_landmarks, settings, mr_bone, stage
        )
    with clock.stage("preprocess"):
        if progress:
            progress(0.2, "resampling to the processing grid")
        grid = processing_grid(Geometry.of(mr), images.ct_labels, pre, settings, net.config.required_multiple)
        check_memory(grid, device)
        network_bone = bone_probability if net.config.use_fixed_bone else None
        pair = to_processing_grid(mr, images.ct, images.ct_labels, pre, grid, network_bone, point_pairs)
    if progress:
        progress(0.3, "network inference")
    displacement, velocity, stage_times = register_prealigned(
        pair, net, settings, initial_velocity, _report(progress, 0.35, 0.8), should_cancel
    )
    clock.timings.update(stage_times)
    _check_cancel(should_cancel)
    with clock.stage("outputs", check=False):
        if progress:
            progress(0.85, "building outputs")
        result = assemble_result(
            pair,
            displacement.detach().cpu(),
            velocity.detach().cpu(),
            images.fixed,
            images.moving,
            images.ct_labels,
            net,
            settings,
            fixed_labels=images.fixed_labels,
            landmarks=(fixed_landmarks, moving_landmarks),
            mr_bone=mr_bone,
            started_from="network" if initial_velocity is None else "previous result",
        )
    result.timings = clock.finish()
    if progress:
        progress(1.0, "done")
    return result


class _StageClock:
    """Each stage's wall-clock time (s, from the first stage's start for ``total``) and the cancel check after it."""

    def __init__(self, should_cancel: CancelCallback | None) -> None:
        self.should_cancel, self.start, self.timings = should_cancel, time.perf_counter(), {}

    @contextmanager
    def stage(self, name: str, check: bool = True) -> Iterator[None]:
        started = time.perf_counter()
        yield
        # "load" counts from the start of the run, as the checks before it are part of loading
        self.timings[name] = time.perf_counter() - (self.start if name == "load" else started)
        if check:
            _check_cancel(self.should_cancel)

    def finish(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings


class _Inputs(NamedTuple):
    """The checked inputs; ``ct``, ``ct_labels``: the CT and its labels cut to the spine, what the stages see."""

    fixed: sitk.Image
    moving: sitk.Image
    ct: sitk.Image
    ct_labels: sitk.Image
    fixed_labels: sitk.Image | None


def _checked_inputs(
    fixed: sitk.Image, moving: sitk.Image, moving_labels: sitk.Image, fixed_labels: sitk.Image | None
) -> _Inputs:
    """:func:`.inputs.validate_intensity_image` and :func:`.inputs.validate_labels` (one-line errors before any
    compute), then :func:`.inputs.crop_to_spine` (the output still warps the whole CT)."""
    fixed = validate_intensity_image(fixed, "MR (fixed) image")
    moving = validate_intensity_image(moving, "CT (moving) image")
    moving_labels = validate_labels(moving_labels, moving)
    ct, ct_labels = crop_to_spine(moving, moving_labels)
    if fixed_labels is not None:
        fixed_labels = validate_labels(fixed_labels, fixed, name="MR vertebra label map")
    return _Inputs(fixed, moving, ct, ct_labels, fixed_labels)


def find_mr_bone(
    fixed: sitk.Image, settings: RegistrationSettings, network: RegistrationNet, device: torch.device
) -> sitk.Image | None:
    """The MR's vertebral-bone probability (float32 on the MR's grid) when the settings ask for the MR
    segmentation or the registration network takes it as an input; ``None`` otherwise or without a model."""
    if not (settings.mr_segmentation or network.config.use_fixed_bone):
        return None
    return predict_mr_bone(fixed, device, settings.network_precision)


def prealign_stage(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_landmarks: Mapping[str, np.ndarray] | None,
    moving_landmarks: Mapping[str, np.ndarray] | None,
    settings: RegistrationSettings,
    mr_bone: sitk.Image | None,
    progress: ProgressCallback | None,
) -> Prealignment:
    """The rigid pre-alignment: from MR points when given, else onto the predicted MR bone when
    ``settings.bone_prealign`` (and it is accepted), else the automatic intensity search
    (:func:`.prealign.prealign`)."""
    if settings.bone_prealign and fixed_landmarks is None and mr_bone is not None:
        pre = bone_prealignment(fixed, sitk.Cast(mr_bone, sitk.sitkFloat32), moving_labels)
        if pre is not None:
            return pre
    return prealign(
        fixed,
        moving,
        moving_labels,
        fixed_landmarks,
        moving_landmarks,
        label_names=label_names(moving_labels),
        progress=progress,
        deterministic=settings.deterministic,
    )


def _vertebra_rows(
    pair: ProcessingPair,
    displacement: torch.Tensor,
    jac_matrix: torch.Tensor,
    warped_labels: torch.Tensor,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image | None,
    mr_bone: sitk.Image | None,
) -> tuple[list[dict], dict]:
    """The per-vertebra table on the processing grid (:func:`.metrics.vertebra_table` with names, MR coverage and,
    with a predicted MR bone, the share of each vertebra on it) and the bone summary (``{}`` without one).

    ``displacement`` ``(1, 3, D, H, W)`` voxels, ``jac_matrix`` its Jacobian, ``warped_labels`` ``(1, 1, D, H, W)``
    the CT labels it carries onto the grid."""
    grid, labels = pair.grid, pair.moving_labels.cpu()
    fixed_labels_t = None
    if fixed_labels is not None:
        fixed_labels_t = image_to_tensor(resample_to_reference(fixed_labels, grid, is_label=True), torch.int64)
    rows = metrics.vertebra_table(
        labels,
        displacement,
        pair.spacing,
        fixed_labels=fixed_labels_t,
        warped_labels=warped_labels,
        jacobian=jac_matrix,
    )
    names = label_names(moving_labels)
    for row in rows:
        row["name"] = names.get(int(row["label"]), str(row["label"]))
    inside = pair.fixed_mask.cpu()
    add_mr_coverage(rows, warped_labels, inside)
    if mr_bone is None:
        return rows, {}
    bone = image_to_tensor(resample_to_reference(mr_bone, grid, is_label=True)) > 0
    add_mr_bone_agreement(rows, warped_labels, bone)
    return rows, mr_bone_summary(warped_labels, bone, inside)


def _field_stats(
    displacement: torch.Tensor,
    spacing: Sequence[float],
    inside: torch.Tensor,
    jac_matrix: torch.Tensor,
    det: torch.Tensor,
    rows: list[dict],
) -> dict:
    """:func:`.metrics.field_summary` inside the MR's data, with one count of folding: the one the Jacobian map
    shows, every voxel of the processing grid where det J <= 0 (the table's per-vertebra counts are its share inside
    each vertebra; with the MR mask, folds in a vertebra beyond the MR's field of view were left out, and the summary
    disagreed with the table)."""
    stats = metrics.field_summary(displacement, spacing, mask=inside, jacobian=jac_matrix)
    stats["folding_voxels"] = int((det <= 0).sum())
    stats["folding_percent"] = 100.0 * stats["folding_voxels"] / det.numel()
    stats["folding_voxels_in_vertebrae"] = sum(int(r["folding_voxels"]) for r in rows)
    return stats


def assemble_result(
    pair: ProcessingPair,
    displacement: torch.Tensor,
    velocity: torch.Tensor,
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    network: RegistrationNet,
    settings: RegistrationSettings,
    *,
    fixed_labels: sitk.Image | None,
    landmarks: tuple[Mapping[str, np.ndarray] | None, Mapping[str, np.ndarray] | None],
    mr_bone: sitk.Image | None,
    started_from: str,
) -> RegistrationResult:
    """The result in the MR's geometry: warped CT and labels, transforms both ways, the Jacobian map, the
    per-vertebra table and the summary; refused (:func:`.result.check_plausible`) when physically impossible.

    Args:
        pair: The processing pair (with ``grid`` and ``prealignment``).
        displacement: ``(1, 3, D, H, W)`` voxels on ``pair.grid`` (CPU); velocity: its ``(1, 3, d, h, w)`` velocity.
        fixed, moving, moving_labels: The validated inputs.
        mr_bone: Predicted MR bone mask on the MR's grid, or ``None``.
        started_from: ``"network"`` or ``"previous result"`` (the summary says which).
    """
    grid, pre, spacing = pair.grid, pair.prealignment, pair.spacing
    pre_t = pre.transform()
    inside = pair.fixed_mask.cpu()
    labels_t = pair.moving_labels.cpu()
    field_image = displacement_field_image(displacement, grid)
    composite = sitk.CompositeTransform([pre_t, sitk.DisplacementFieldTransform(sitk.Image(field_image))])
    ct_min = float(sitk.GetArrayViewFromImage(moving).min())
    warped_moving = sitk.Resample(moving, fixed, composite, sitk.sitkLinear, ct_min, sitk.sitkFloat32)
    warped_labels = sitk.Resample(moving_labels, fixed, composite, label_interpolator(), 0, sitk.sitkUInt16)
    jac_matrix = jacobian_matrix(displacement, spacing)  # shared by the det J map and every metric below
    det = determinant(jac_matrix)
    warped_labels_t = warp_labels(labels_t, displacement)
    rows, bone_stats = _vertebra_rows(
        pair, displacement, jac_matrix, warped_labels_t, moving_labels, fixed_labels, mr_bone
    )
    if landmarks[0] is not None and landmarks[1] is not None:
        add_landmark_errors(rows, composite, *landmarks)
    field_stats = _field_stats(displacement, spacing, inside, jac_matrix, det, rows)
    check_plausible(rows, field_stats, settings)
    summary = {
        **metrics.summarize(rows),
        **field_stats,
        "prealign_method": pre.method,
        "prealign_residual_mm": pre.residual_mm,
        "mr_bias_corrected": settings.bias_correction,
        "device": str(next(network.parameters()).device),
        "network_arithmetic": network_arithmetic_name(next(network.parameters()).device, settings.network_precision),
        "model": asdict(network.config) | {"path": settings.model_path or "bundled"},
        "vertebra_rigid_steps": settings.vertebra_rigid.steps if started_from == "network" else 0,
        "refine_steps": settings.refine_steps,
        "started_from": started_from,
        "vertebrae_outside_mr": [r["name"] for r in rows if r["mr_coverage_percent"] < MR_COVERAGE_WARN_PERCENT],
        **bone_stats,
        "grid_shape": list(grid.shape),
        "grid_spacing_mm": list(grid.spacing),
    }
    return RegistrationResult(
        warped_moving=warped_moving,
        warped_labels=warped_labels,
        jacobian=tensor_to_image(det.float(), grid),
        prealign=pre.matrix,
        prealign_method=pre.method,
        displacement=field_image,
        velocity=velocity,
        transform=composite,
        vertebrae=rows,
        vertebra_rigid_transforms=vertebra_rigid_transforms(warped_labels_t, displacement, grid, pre),
        summary=summary,
        timings={},
        grid=grid,
        fixed=fixed,
        integration_steps=network.config.integration_steps,
        mr_vertebrae=mr_bone,
    )


__all__ = [
    "MAX_GRID_VOXELS",
    "MAX_VOLUME_CHANGE_PERCENT",
    "MR_COVERAGE_WARN_PERCENT",
    "NetworkCache",
    "ProcessingPair",
    "RefineWeights",
    "RegistrationResult",
    "RegistrationSettings",
    "check_plausible",
    "displacement_from_velocity",
    "finite_copy",
    "register",
    "register_prealigned",
    "resolve_network",
    "validate_image",
    "write_outputs",
]
