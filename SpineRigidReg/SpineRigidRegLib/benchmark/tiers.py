"""Benchmark tiers that look like the clinic (issue 15): a real MR, clinical acquisitions, and the capture range.

Tiers (one ``srr-benchmark --tiers`` run; every row runs on the same pairs):
    ``real-mr``: the fixed image is the REAL MR example (3 mm, LPS, 20 axial slices); the CT is synthesised from that
    MR's labels (:func:`..data.real_mr.ct_from_mr_labels`) on a 1 mm grid and moved by a known poly-rigid motion
    (the clinical motion x :data:`REAL_MR_SCALE`: the 60 mm slab holds two vertebrae, and a larger shift along the
    spine would move most of one out of it). The true fixed -> moving map is the inverse of that motion
    (:func:`invert_displacement`).
    ``clinical``: the real CT (TotalSegmentator example, L2-T12) and an MR synthesised from it with texture within
    tissues (:func:`..data.clinical.textured_contrast`) after the clinical posture change
    (:data:`..data.clinical.CLINICAL_MOTION`), acquired as a clinical 2D series (sagittal T2 or axial T1, 3-4 mm
    slices, 0.6-0.8 mm pixels, oblique, bias, Rician noise) whose field of view cuts the cranial end vertebra.
    ``capture``: the clinical cases with the motion scaled x0.5, 1, 2, 3; success = mean vertebra TRE < 2 mm and
    worst < 3 mm.

Evaluation is :func:`.runner.evaluate` on a 1 mm grid holding both the fixed-position and the moving labels
(``BenchmarkCase.grid``), over the vertebrae at least half inside the MR (``BenchmarkCase.evaluated``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..data.clinical import (
    CLINICAL_MOTION,
    ClinicalAcquisition,
    acquire_clinical,
    clinical_grid,
    scaled_motion,
    textured_contrast,
)
from ..data.synthesis import MR_CONTRASTS, vertebra_motion
from ..geometry import Geometry, image_to_tensor, tensor_to_image
from ..preprocess import field_of_view, resample_to_reference
from ..warp import warp, warp_labels
from .cases import BenchmarkCase
from .runner import (
    KIND_ELASTIX,
    KIND_IDENTITY,
    KIND_INITIAL,
    KIND_MODEL,
    BenchmarkRun,
    Method,
    bundled_model_available,
    named_centroids,
    run_benchmark,
)

log = logging.getLogger(__name__)

REAL_MR, CLINICAL, CAPTURE = "real-mr", "clinical", "capture"
TIERS = (REAL_MR, CLINICAL, CAPTURE)
#: Motion scale of the real-MR tier (of :data:`..data.clinical.CLINICAL_MOTION`).
REAL_MR_SCALE = 0.5
CAPTURE_SCALES = (0.5, 1.0, 2.0, 3.0)
#: Success of a case: mean vertebra TRE below the first, worst vertebra below the second (mm).
SUCCESS_MEAN_MM, SUCCESS_WORST_MM = 2.0, 3.0
#: Error of the MR points of the point-started rows (mm, uniform in this range, random direction).
POINT_ERROR_MM = (2.0, 3.0)
#: Least fraction of a vertebra (at its MR position) inside the MR for it to be evaluated.
MIN_VISIBLE = 0.5

NO_REGISTRATION = "Initial (no registration)"
INITIAL_POINTS = "Initial: MR points (2-3 mm error)"
STARING_POINTS = "Staring (elastix + rigidity penalty), MR points"
NETWORK_POINTS = "ours: network alone, MR points"
DEFAULT_POINTS = "ours: default, MR points"
DEFAULT = "ours: default (no points)"
NETWORK = "ours: network path (no points)"
BONE = "ours: bone-guided pre-alignment (no points)"
CANDIDATE = "candidate model"


def tier_methods(
    elastix_iterations: int = 250, threads: int | None = None, models: bool = True, candidate: str | None = None
) -> list[Method]:
    """The rows of every tier (model rows only with the bundled model).

    The *network path* is everything but the vertebra-wise rigid stage and the dense refinement, without points:
    the automatic pre-alignment and the network (issue 19 measures a network by it). ``candidate``, an exported
    model (``srr-train --export``), adds its network path and default rows beside the bundled model's.
    """
    from ..baselines.elastix import ElastixSettings

    staring = ElastixSettings(rigidity_penalty=True, iterations=elastix_iterations, threads=threads)
    methods = [
        Method(NO_REGISTRATION, KIND_IDENTITY),
        Method(INITIAL_POINTS, KIND_INITIAL),
        Method(STARING_POINTS, KIND_ELASTIX, elastix=staring),
    ]
    if models and bundled_model_available():
        methods += [
            Method(NETWORK_POINTS, KIND_MODEL, vertebra_rigid_steps=0),
            Method(DEFAULT_POINTS, KIND_MODEL),
            Method(DEFAULT, KIND_MODEL, landmarks=False),
            Method(NETWORK, KIND_MODEL, landmarks=False, vertebra_rigid_steps=0),
            Method(BONE, KIND_MODEL, landmarks=False, bone_prealign=True),
        ]
    if models and candidate:
        methods += [
            Method(
                f"{CANDIDATE}: {NETWORK.removeprefix('ours: ')}",
                KIND_MODEL,
                checkpoint=candidate,
                landmarks=False,
                vertebra_rigid_steps=0,
            ),
            Method(f"{CANDIDATE}: {DEFAULT.removeprefix('ours: ')}", KIND_MODEL, checkpoint=candidate, landmarks=False),
        ]
    return methods


# ---------------------------------------------------------------------------------------------------- helpers


def invert_displacement(displacement: torch.Tensor, iterations: int = 40) -> torch.Tensor:
    """The inverse of a pull-back field by fixed-point iteration: ``w(x) = -u(x + w(x))``.

    Converges where ``|grad u| < 1`` (a rigid rotation below 60 deg and smooth soft tissue); exact up to rounding
    where ``u`` is affine (inside a vertebra), since trilinear interpolation reproduces affine fields.

    Args:
        displacement: ``(1, 3, D, H, W)`` voxels.
        iterations: Fixed-point steps.

    Returns:
        ``(1, 3, D, H, W)`` voxels, with ``x + w(x) + u(x + w(x)) = x``.
    """
    inverse = -displacement
    for _ in range(iterations):
        inverse = -warp(displacement, inverse, padding_mode="border")
    return inverse


def noisy_points(
    labels: sitk.Image,
    rng: np.random.Generator,
    error_mm: tuple[float, float] = POINT_ERROR_MM,
    keep: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Vertebra centre points as a user places them: each true centroid moved ``error_mm`` in a random direction.

    Args:
        labels: True MR-position vertebra labels.
        rng: Random source.
        error_mm: Range of the error's length.
        keep: Label values to place points on (``None``: all).

    Returns:
        Name -> LPS (3,) mm.
    """
    from ..data.vertebrae import detect_scheme, vertebra_label

    points = named_centroids(labels)
    scheme = detect_scheme([int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v > 0])
    out = {}
    for name, point in points.items():
        if keep is not None and vertebra_label(name, scheme) not in keep:
            continue
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        out[name] = np.asarray(point, dtype=np.float64) + rng.uniform(*error_mm) * direction
    return out


def visible_vertebrae(labels: sitk.Image, mr: sitk.Image, min_fraction: float = MIN_VISIBLE) -> tuple[int, ...]:
    """Labels of ``labels`` (any grid) with at least ``min_fraction`` of their voxels inside ``mr``'s view."""
    inside = sitk.GetArrayViewFromImage(field_of_view(mr, labels)) > 0
    array = sitk.GetArrayViewFromImage(labels)
    out = []
    for value in [int(v) for v in np.unique(array) if v > 0]:
        mask = array == value
        if inside[mask].mean() >= min_fraction:
            out.append(value)
    return tuple(out)


def _labels_image(tensor: torch.Tensor, geometry: Geometry) -> sitk.Image:
    return sitk.Cast(tensor_to_image(tensor.to(torch.int32), geometry), sitk.sitkUInt16)


# ---------------------------------------------------------------------------------------------------- cases


def real_mr_grid(levels: sitk.Image, mr: sitk.Image, margin_mm: float = 40.0, beyond_mm: float = 15.0) -> Geometry:
    """The 1 mm evaluation/CT grid of the real-MR tier: LPS-aligned, the vertebrae +- ``margin_mm`` across and the
    MR slab +- ``beyond_mm`` along S-I."""
    geometry = Geometry.of(levels)
    points = geometry.array_index_to_lps_points(np.argwhere(sitk.GetArrayViewFromImage(levels) > 0).astype(float))
    corners = Geometry.of(mr).corners_lps()
    low = np.concatenate([points.min(0)[:2] - margin_mm, [corners[:, 2].min() - beyond_mm]])
    high = np.concatenate([points.max(0)[:2] + margin_mm, [corners[:, 2].max() + beyond_mm]])
    size = np.ceil(high - low).astype(int) + 1
    return Geometry(
        shape=(int(size[2]), int(size[1]), int(size[0])),
        spacing=(1.0, 1.0, 1.0),
        origin=tuple(float(v) for v in low),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


@functools.lru_cache(maxsize=2)
def _real_mr(shared_data: str):
    from ..data.real_mr import load_real_mr

    return load_real_mr(shared_data)


def real_mr_case(index: int, seed: int, shared_data: str | Path, scale: float = REAL_MR_SCALE) -> BenchmarkCase:
    """Real-MR tier case ``index``: the real MR, a CT synthesised from its labels, moved by a known motion."""
    from ..data.real_mr import ct_from_mr_labels

    real = _real_mr(str(shared_data))
    grid = real_mr_grid(real.levels, real.mr)
    rng = np.random.default_rng(seed)
    ct, levels = ct_from_mr_labels(real, grid, rng)
    spacing = grid.spacing_array_order
    generator = torch.Generator().manual_seed(seed)
    labels_t = image_to_tensor(levels, torch.int64)
    with torch.no_grad():
        forward = vertebra_motion(labels_t, spacing, scaled_motion(CLINICAL_MOTION, scale), generator)
        moving_labels = warp_labels(labels_t, forward)
        moving = warp(image_to_tensor(ct), forward, padding_mode="border")
        truth = invert_displacement(forward)
    description = {
        "tier": REAL_MR,
        "vertebrae": len(real.names),
        "levels": ", ".join(real.names[v] for v in sorted(real.names)),
        "motion_scale": scale,
        "mr": "real (TotalSegmentator MR example), 3 mm axial, LPS",
        "grid": list(grid.shape),
    }
    case = BenchmarkCase(
        name=f"real-mr-{index:02d}",
        source=REAL_MR,
        seed=seed,
        fixed=real.mr,
        moving=tensor_to_image(moving.float(), grid),
        moving_labels=_labels_image(moving_labels, grid),
        fixed_labels=levels,
        true_displacement=truth.float(),
        description=description,
        grid=grid,
        mr_truth=sitk.Cast(real.levels > 0, sitk.sitkUInt8),
    )
    case.evaluated = visible_vertebrae(levels, real.mr)
    case.fixed_points = noisy_points(levels, rng, keep=case.evaluated)
    return case


@functools.lru_cache(maxsize=2)
def _real_ct(shared_data: str, margin_mm: float):
    from ..data.subjects import load_real_case

    return load_real_case(shared_data, spacing=1.0, margin_mm=margin_mm)


def _tiny_source():
    from ..data.phantom import make_phantom

    return make_phantom(num_vertebrae=3, shape=(56, 40, 40), curvature_deg=10.0, seed=3)


#: Orientation and contrast of clinical case ``index`` (cycled).
CLINICAL_SERIES = (("sagittal", "t2"), ("axial", "t1"), ("sagittal", "t2"))


def clinical_case(
    index: int,
    seed: int,
    shared_data: str | Path | None,
    scale: float = 1.0,
    tiny: bool = False,
    margin_mm: float = 50.0,
) -> BenchmarkCase:
    """Clinical tier case ``index`` (or a capture-range case at motion ``scale``): the real CT, and an MR of it after
    the clinical posture change, acquired as a clinical 2D series. The same ``(index, seed)`` gives the same anatomy,
    contrast, acquisition and direction of motion at every scale. ``tiny``: a small phantom instead of the real CT
    (tests)."""
    if tiny:
        source = _tiny_source()
        ct, labels, tissues = source.ct, source.labels, source.tissues
    else:
        real = _real_ct(str(shared_data), margin_mm)
        ct, labels, tissues = real.ct, real.labels, real.tissues
    orientation, contrast = CLINICAL_SERIES[index % len(CLINICAL_SERIES)]
    grid = Geometry.of(ct)
    spacing = grid.spacing_array_order
    settings = replace(scaled_motion(CLINICAL_MOTION, scale), intensity_ranges=MR_CONTRASTS[contrast])
    labels_t = image_to_tensor(resample_to_reference(labels, ct, is_label=True), torch.int64)
    tissues_t = image_to_tensor(resample_to_reference(tissues, ct, is_label=True), torch.int64)
    with torch.no_grad():
        motion = vertebra_motion(labels_t, spacing, settings, torch.Generator().manual_seed(seed))
        clean = textured_contrast(
            image_to_tensor(ct), labels_t, tissues_t, settings, torch.Generator().manual_seed(seed + 1), spacing
        )
        fixed_clean = warp(clean, motion, padding_mode="border")
        fixed_labels_t = warp_labels(labels_t, motion)
        fixed_tissues_t = warp_labels(tissues_t, motion)
    fixed_labels = _labels_image(fixed_labels_t, grid)
    acquisition = ClinicalAcquisition(orientation=orientation)
    if tiny:
        acquisition = replace(acquisition, in_plane_mm=(1.2, 1.4), slice_thickness_mm=(2.5, 3.0), across_mm=30.0)
    rng = np.random.default_rng(seed)
    mr_grid, acquired = clinical_grid(fixed_labels, acquisition, rng)
    mr = acquire_clinical(
        tensor_to_image(fixed_clean.float(), grid), mr_grid, acquisition, rng, acquired["slice_thickness_mm"]
    )
    description = {
        "tier": CLINICAL,
        "vertebrae": int(np.count_nonzero(np.unique(sitk.GetArrayViewFromImage(labels)))),
        "motion_scale": scale,
        "mr_contrast": contrast,
        "mr": f"{orientation} {contrast.upper()}, {acquired['pixel_mm']} mm pixels, "
        f"{acquired['slice_thickness_mm']} mm slices, obliquity {acquired['obliquity_deg']} deg, "
        f"cranial vertebra {int(100 * acquired['end_vertebra_cut_fraction'])} % cut",
        "grid": list(grid.shape),
    }
    case = BenchmarkCase(
        name=f"clinical-{index:02d}" + ("" if scale == 1.0 else f"-x{scale:g}"),
        source=CLINICAL,
        seed=seed,
        fixed=mr,
        moving=sitk.Image(ct),
        moving_labels=sitk.Cast(resample_to_reference(labels, ct, is_label=True), sitk.sitkUInt16),
        fixed_labels=fixed_labels,
        true_displacement=motion.float(),
        description=description,
        grid=grid,
        mr_truth=sitk.Cast(resample_to_reference(fixed_labels, mr, is_label=True) > 0, sitk.sitkUInt8),
    )
    case.evaluated = visible_vertebrae(fixed_labels, mr)
    case.fixed_points = noisy_points(fixed_labels, rng, keep=case.evaluated)
    case.description["evaluated_vertebrae"] = len(case.evaluated)
    case.description["fixed_tissues"] = _labels_image(fixed_tissues_t, grid)  # for the realism check; not in JSON
    return case


# ---------------------------------------------------------------------------------------------------- runs


def segmentation_dice(cases: Sequence[BenchmarkCase], device: str = "cpu") -> dict[str, float]:
    """Dice of the bundled MR vertebra segmentation against each case's true MR vertebra mask."""
    from ..segmentation.predict import bundled_card, dice, load_bundled_segmentation, predict_bone

    if bundled_card() is None:
        return {}
    network = load_bundled_segmentation(device if device != "auto" else "cpu")
    out = {}
    for case in cases:
        if case.mr_truth is not None:
            out[case.name] = dice(
                predict_bone(case.fixed, network, device if device != "auto" else "cpu"), case.mr_truth
            )
    return out


def success(row: dict) -> bool:
    """A case row's success: mean vertebra TRE < :data:`SUCCESS_MEAN_MM` and worst < :data:`SUCCESS_WORST_MM`."""
    try:
        mean, worst = float(row.get("tre_mm_mean")), float(row.get("tre_mm_max"))
    except (TypeError, ValueError):
        return False
    return str(row.get("status", "ok")) == "ok" and mean < SUCCESS_MEAN_MM and worst < SUCCESS_WORST_MM


def run_tier(
    cases: Sequence[BenchmarkCase],
    methods: Sequence[Method],
    device: str = "auto",
    progress: Callable[[float, str], None] | None = None,
) -> BenchmarkRun:
    """:func:`.runner.run_benchmark` on one tier's cases, with each case row's motion scale and success."""
    run = run_benchmark(cases, methods, device=device, panel_case=cases[0].name if cases else None, progress=progress)
    scales = {c.name: c.description.get("motion_scale", 1.0) for c in cases}
    for row in run.case_rows:
        row["motion_scale"] = scales.get(row["case"], 1.0)
        row["success"] = success(row)
    return run


# ---------------------------------------------------------------------------------------------------- realism


def _tissue_stats(image: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, tuple[float, float, float]]:
    """Per tissue: median intensity (of the image's 99th percentile), coefficient of variation, and roughness (median
    absolute difference of neighbours along the image's axes, over the tissue's median)."""
    scale = max(float(np.percentile(image[image > 0], 99)), 1e-6) if (image > 0).any() else 1.0
    image = image / scale
    out = {}
    for name, mask in masks.items():
        values = image[mask]
        if values.size < 20:
            continue
        median = float(np.median(values))
        differences = []
        for axis in range(3):
            a = np.moveaxis(image, axis, 0)
            m = np.moveaxis(mask, axis, 0)
            both = m[1:] & m[:-1]
            if both.any():
                differences.append(np.abs(a[1:] - a[:-1])[both])
        rough = float(np.median(np.concatenate(differences))) / max(median, 1e-6) if differences else math.nan
        out[name] = (median, float(values.std() / max(values.mean(), 1e-6)), rough)
    return out


def _on_3mm(image: sitk.Image, is_label: bool = False) -> np.ndarray:
    from ..preprocess import resample_isotropic

    return sitk.GetArrayFromImage(
        resample_isotropic(image, 3.0, is_label=is_label) if image.GetSpacing() != (3.0,) * 3 else image
    )


def realism_check(
    shared_data: str | Path, synthetic: Sequence[tuple[str, sitk.Image, sitk.Image, sitk.Image]]
) -> list[dict]:
    """Per-tissue intensity statistics and a texture measure of synthetic MR images against the real MR example.

    Every image is resampled to 3 mm (the real MR's voxels) and scaled by its 99th percentile; per tissue the median,
    the coefficient of variation (CV) and the roughness (median |difference| of 3 mm neighbours over the median).

    Args:
        shared_data: Folder of the real MR example.
        synthetic: ``(name, mr, vertebra labels, tissue classes)`` of each synthetic MR (labels on any grid, placed
            by position).

    Returns:
        One row per (image, tissue): ``image``, ``tissue``, ``median``, ``cv``, ``roughness``.
    """
    from ..data.phantom import Tissue
    from ..data.real_mr import MR_CORD, MR_DISCS, MR_VERTEBRAE, load_real_mr

    real = load_real_mr(shared_data)
    labels = sitk.GetArrayFromImage(real.labels)
    rows = []
    real_masks = {
        "vertebra": labels == MR_VERTEBRAE,
        "disc": labels == MR_DISCS,
        "cord": labels == MR_CORD,
        "muscle (paraspinal/psoas)": np.isin(labels, (46, 47, 48, 49)),
    }
    for tissue, (median, cv, rough) in _tissue_stats(sitk.GetArrayFromImage(real.mr), real_masks).items():
        rows.append({"image": "real MR example", "tissue": tissue, "median": median, "cv": cv, "roughness": rough})
    for name, mr, vertebrae, tissues in synthetic:
        image = sitk.Cast(mr, sitk.sitkFloat32)
        on_mr_v = resample_to_reference(vertebrae, image, is_label=True)
        on_mr_t = resample_to_reference(tissues, image, is_label=True)
        array, v, t = _on_3mm(image), _on_3mm(on_mr_v, True), _on_3mm(on_mr_t, True)
        inside = _on_3mm(sitk.Cast(field_of_view(mr, image), sitk.sitkUInt8), True) > 0
        masks = {
            "vertebra": (v > 0) & inside,
            "disc": (t == int(Tissue.DISC)) & inside,
            "cord": (t == int(Tissue.CORD)) & inside,
            "muscle (paraspinal/psoas)": (t == int(Tissue.MUSCLE)) & inside,
        }
        for tissue, (median, cv, rough) in _tissue_stats(array, masks).items():
            rows.append({"image": name, "tissue": tissue, "median": median, "cv": cv, "roughness": rough})
    return rows


__all__ = [
    "CAPTURE",
    "CAPTURE_SCALES",
    "CLINICAL",
    "REAL_MR",
    "TIERS",
    "clinical_case",
    "invert_displacement",
    "noisy_points",
    "real_mr_case",
    "realism_check",
    "run_tier",
    "segmentation_dice",
    "success",
    "tier_methods",
    "visible_vertebrae",
]


# ---------------------------------------------------------------------------------------------------- report

TIER_TITLES = {
    REAL_MR: "Tier 1: real MR (CT synthesised from the real MR's labels)",
    CLINICAL: "Tier 2: clinical acquisition (real CT, clinical 2D MR series)",
    CAPTURE: "Tier 3: capture range (the clinical cases, motion x0.5 to x3)",
}
CAPTURE_PNG = "capture_range.png"
CLOSING_NOTE = "closing_note.md"


def success_table(case_rows: Sequence[dict]) -> str:
    """Markdown: per method, success rate, mean and worst vertebra TRE over cases, and time."""
    methods: list[str] = []
    for row in case_rows:
        if row["method"] not in methods:
            methods.append(row["method"])
    lines = [
        "| Method | Success | Mean TRE mm (per case, mean) | Worst vertebra TRE mm (max) | Time s (mean) |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        rows = [r for r in case_rows if r["method"] == method]
        ok = [r for r in rows if str(r.get("status", "ok")) == "ok"]
        wins = sum(success(r) for r in rows)
        means = [float(r["tre_mm_mean"]) for r in ok if r.get("tre_mm_mean") not in (None, "")]
        worst = [float(r["tre_mm_max"]) for r in ok if r.get("tre_mm_max") not in (None, "")]
        times = [float(r["runtime_s"]) for r in ok if r.get("runtime_s") not in (None, "")]
        lines.append(
            f"| {method} | {wins}/{len(rows)} ({100.0 * wins / max(len(rows), 1):.0f} %) | "
            f"{np.mean(means):.2f} | {max(worst, default=math.nan):.2f} | "
            + (f"{np.mean(times):.1f} |" if times and method not in (NO_REGISTRATION,) else "- |")
        )
    return "\n".join(lines)


def capture_rates(case_rows: Sequence[dict]) -> dict[str, dict[float, tuple[int, int]]]:
    """Method -> scale -> (successes, cases)."""
    out: dict[str, dict[float, tuple[int, int]]] = {}
    for row in case_rows:
        scale = float(row.get("motion_scale", 1.0))
        wins, total = out.setdefault(row["method"], {}).get(scale, (0, 0))
        out[row["method"]][scale] = (wins + int(success(row)), total + 1)
    return out


def plot_capture(case_rows: Sequence[dict], path: str | Path) -> Path:
    """Success rate against the motion scale, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = capture_rates(case_rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for index, (method, by_scale) in enumerate(rates.items()):
        scales = sorted(by_scale)
        values = [100.0 * by_scale[s][0] / by_scale[s][1] for s in scales]
        ax.plot(scales, values, marker="o", label=method, color=plt.cm.tab10(index % 10), alpha=0.85)
    ax.set_xlabel("motion scale (x clinical posture change: 10 deg / 20 mm global, 4 deg / 4 mm per vertebra)")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("Capture range: mean vertebra TRE < 2 mm and worst < 3 mm", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def capture_table(case_rows: Sequence[dict]) -> str:
    rates = capture_rates(case_rows)
    scales = sorted({s for by_scale in rates.values() for s in by_scale})
    lines = ["| Method | " + " | ".join(f"x{s:g}" for s in scales) + " |", "|---|" + "---|" * len(scales)]
    for method, by_scale in rates.items():
        cells = [
            f"{100.0 * by_scale[s][0] / by_scale[s][1]:.0f} % ({by_scale[s][0]}/{by_scale[s][1]})"
            if s in by_scale
            else "-"
            for s in scales
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_tier_report(out_dir: str | Path, markdown_path: str | Path) -> Path:
    """Write the tiers' Markdown report from the files of ``out_dir`` (one sub-folder per tier, ``tiers.json``)."""
    import os

    from . import report

    out = Path(out_dir)
    markdown_path = Path(markdown_path)
    meta = report.read_json(out / "tiers.json")
    rel = os.path.relpath(out, markdown_path.parent)
    lines = _report_introduction()
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    if meta.get("notes"):
        lines.append("")
    for tier in meta.get("tiers", []):
        lines += _tier_section(tier, out, meta, rel)
    lines += _realism_section(meta.get("realism", []))
    if (out / CLOSING_NOTE).is_file():
        lines += ["## Closing note", "", (out / CLOSING_NOTE).read_text(encoding="utf-8").strip(), ""]
    lines += _machine_section(meta)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return markdown_path


def _report_introduction() -> list[str]:
    """The report's title and what its rows and success mean."""
    return [
        "# Benchmark tiers that look like the clinic (issue 15)",
        "",
        "Generated by `srr-benchmark --tiers` (do not edit by hand; the closing note is "
        f"`{CLOSING_NOTE}` in the output folder). Tier descriptions: `SpineRigidRegLib/benchmark/tiers.py`. "
        "The synthetic-MR benchmark of the paper's Table 1 is in [BENCHMARKS.md](BENCHMARKS.md).",
        "",
        f"Success of a case: mean vertebra TRE < {SUCCESS_MEAN_MM:g} mm and worst vertebra TRE < "
        f"{SUCCESS_WORST_MM:g} mm. TRE over the vertebrae at least {int(100 * MIN_VISIBLE)} % inside the MR. "
        f"Point-started rows get MR vertebra centre points placed {POINT_ERROR_MM[0]:g}-{POINT_ERROR_MM[1]:g} mm "
        "from the true centroids (random direction), on the vertebrae the MR shows; the CT's points are "
        "its label centroids. "
        "*Initial (no registration)*: the motion itself. *Staring*: elastix B-spline + Mattes MI + rigidity penalty "
        "from the points' pre-alignment. *ours: default (no points)*: `srr-register` as a user without points runs "
        "it (automatic pre-alignment); *bone-guided*: `RegistrationSettings(bone_prealign=True)`, no points; "
        "*network alone*: without the vertebra-wise rigid stage, from the points; *network path (no points)*: the "
        "automatic pre-alignment and the network, without the vertebra-wise rigid stage (`--vertebra-steps 0`), the "
        "path issue 19 measures a network by; *candidate model*: the same rows with a model given by "
        "`--candidate-model`.",
        "",
    ]


def _tier_section(tier: str, out: Path, meta: dict, rel: str) -> list[str]:
    """One tier's section: its tables, pictures, segmentation Dice, default-pipeline failures and cases.

    Args:
        tier: The tier's name (its sub-folder of ``out``).
        out: The output folder of the run.
        meta: ``tiers.json``.
        rel: ``out`` relative to the report's folder (for the picture links).
    """
    from . import report

    folder = out / tier
    run = report.load_results(folder)
    lines = [f"## {TIER_TITLES[tier]}", ""]
    if tier == CAPTURE:
        lines += [capture_table(run.case_rows), "", f"![capture range]({rel}/{CAPTURE_PNG})", ""]
    lines += [success_table(run.case_rows), "", "Table-1 columns (mean (SD) over vertebrae / cases):", ""]
    lines += [report.markdown_table(report.summary_table(run), with_speed=False), ""]
    if (folder / report.PANELS_PNG).is_file():
        lines += [f"![panels {tier}]({rel}/{tier}/{report.PANELS_PNG})", ""]
    dice = meta.get("segmentation_dice", {}).get(tier)
    if dice:
        values = ", ".join(f"{k} {v:.2f}" for k, v in dice.items())
        lines += [f"MR vertebra segmentation (bundled network) Dice against the true MR vertebrae: {values}.", ""]
    lines += _failure_lines(run.case_rows)
    cases = [c for c in meta.get("cases", []) if c.get("tier") == tier]
    if cases:
        lines += ["| case | seed | motion scale | MR | evaluated vertebrae |", "|---|---|---|---|---|"]
        for c in cases:
            lines.append(f"| {c['name']} | {c['seed']} | {c['motion_scale']} | {c['mr']} | {c.get('evaluated', '-')} |")
        lines.append("")
    return lines


def _failure_lines(case_rows: Sequence[dict]) -> list[str]:
    """The cases the default pipeline (with or without points) failed, with their TRE or error; none: no lines."""
    failures = [r for r in case_rows if r["method"] in (DEFAULT, DEFAULT_POINTS) and not success(r)]
    if not failures:
        return []
    lines = ["Default-pipeline failures:", ""]
    for r in failures:
        status = r.get("status", "ok")
        detail = (
            f"mean TRE {float(r['tre_mm_mean']):.2f} mm, worst {float(r['tre_mm_max']):.2f} mm"
            if status == "ok"
            else status
        )
        lines.append(f"- `{r['case']}` ({r['method']}): {detail}")
    lines.append("")
    return lines


def _realism_section(realism: Sequence[dict]) -> list[str]:
    """The per-tissue intensity statistics of the real and synthetic MRs (:func:`realism_check`); none: no lines."""
    if not realism:
        return []
    lines = [
        "## Is the synthetic MR realistic?",
        "",
        "Per tissue, on 3 mm voxels, intensities over the image's 99th percentile: median, coefficient of "
        "variation (CV) and roughness (median |difference| of neighbouring voxels over the median). The real MR "
        "example is T1-like; the clinical tier's axial T1 is the comparable synthetic image; 'Table-1 MR' is "
        "today's flat-class synthesiser (`mr_contrast`) on the same real CT.",
        "",
        "| image | tissue | median | CV | roughness |",
        "|---|---|---|---|---|",
    ]
    for r in realism:
        lines.append(f"| {r['image']} | {r['tissue']} | {r['median']:.2f} | {r['cv']:.2f} | {r['roughness']:.2f} |")
    lines.append("")
    return lines


def _machine_section(meta: dict) -> list[str]:
    """The command, wall-clock time, elastix iterations and the machine the run used."""
    lines = [
        "## Machine and command",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"Total wall-clock time: {meta.get('wall_time_s', math.nan) / 60.0:.1f} min. Elastix iterations: "
        f"{meta.get('elastix_iterations')} per resolution (capture-range tier: {meta.get('capture_iterations')}).",
        "",
        "| item | value |",
        "|---|---|",
    ]
    for key, value in meta.get("machine", {}).items():
        lines.append(f"| {key} | {value} |")
    return lines
