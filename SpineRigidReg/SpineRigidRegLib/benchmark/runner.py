"""Run every method row on the same ground-truth cases and measure Table 1's columns per vertebra and per case.

Rows (methods):
    ``Initial``: the rigid pre-alignment alone. Every row starts from the same pre-alignment, the paper's: a rigid
    fit of vertebra centre points (the MR's are the centroids of the true fixed labels, standing in for the expert's
    points; the CT's are its label centroids).
    ``Staring``: elastix B-spline + Mattes MI + ``TransformRigidityPenalty`` (:mod:`..baselines.elastix`) on the CT
    and its labels resampled through the pre-alignment onto the MR grid; the total map is pre-alignment o B-spline.
    ``elastix (no penalty)``: the same registration without the penalty.
    Our models: the bundled model (``Resources/Models/default.json``) without and with test-time refinement, and
    any checkpoint of an ablation manifest (``srr-ablation``'s ``manifest.json`` or a JSON list of
    ``{"name": ..., "checkpoint": ...}``, :mod:`..training.manifest`), network only. They run through
    :func:`..pipeline.register` given the same MR centre points.

Every method yields a transform or a field that is sampled on the case grid as a pull-back displacement in voxels;
the metrics are those of :mod:`..metrics` (per vertebra: DSC against the fixed labels, rigid DSC, volume change, PC,
OC, TRE against the true field; per case: folding voxels and SD log|J| over the whole grid), plus the runtime, the
peak memory and the device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from .. import metrics
from ..baselines.elastix import ElastixSettings, is_available, register_elastix
from ..choices import make_settings
from ..data.vertebrae import label_names
from ..errors import InputError
from ..geometry import Geometry, displacement_field_image, displacement_from_field_image
from ..preprocess import resample_to_reference
from ..system import process_status_kb
from ..warp import warp_labels
from .cases import BenchmarkCase

log = logging.getLogger(__name__)

INITIAL = "Initial"
STARING = "Staring (elastix + rigidity penalty)"
ELASTIX = "elastix B-spline (no penalty)"
NETWORK_ONLY = "ours: bundled network only"
BUNDLED = "ours: network + vertebra-wise rigid (default)"
BUNDLED_REFINED = "ours: default + dense refinement"
BUNDLED_AUTOMATIC = "ours: default, automatic pre-alignment (no points)"

KIND_INITIAL = "initial"
KIND_IDENTITY = "identity"
KIND_ELASTIX = "elastix"
KIND_MODEL = "model"

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    Attributes:
        name: Row name in the tables.
        kind: ``"initial"``, ``"elastix"`` or ``"model"``.
        elastix: Settings of an elastix row.
        checkpoint: Checkpoint of a model row (``None``: the bundled model).
        refine_steps: Test-time refinement steps of a model row.
        vertebra_rigid_steps: Steps of the vertebra-wise rigid stage of a model row (``None``: the pipeline's
            default).
        landmarks: Pre-align a model row from the MR's vertebra centre points (as every other row); ``False``
            gives the pipeline none, so it runs its automatic pre-alignment (what a user without points gets).
        bone_prealign: ``RegistrationSettings.bone_prealign`` of a model row (used without points).
    """

    name: str
    kind: str
    elastix: ElastixSettings | None = None
    checkpoint: str | None = None
    refine_steps: int = 0
    vertebra_rigid_steps: int | None = None
    landmarks: bool = True
    bone_prealign: bool = False


def bundled_model_available() -> bool:
    """True when ``Resources/Models/default.json`` exists."""
    from ..checkpoint import DEFAULT_MODEL_CARD, resources_dir

    return (resources_dir() / DEFAULT_MODEL_CARD).is_file()


def read_manifest(path: str | os.PathLike) -> list[Method]:
    """Model rows (network only) from an ablation manifest (:mod:`..training.manifest` reads every form of it).

    A row is named by its label (Table 1's, e.g. ``"PC + rigid field"``), or its name where there is none.
    """
    from ..training.manifest import read_manifest as read_models

    # network alone: the rows compare what each training taught, as the paper's Table 1 does
    return [
        Method(model.label, KIND_MODEL, checkpoint=str(model.checkpoint), vertebra_rigid_steps=0)
        for model in read_models(path)
    ]


def default_methods(
    elastix_iterations: int | Sequence[int] = 250,
    manifest: str | os.PathLike | None = None,
    threads: int | None = None,
    refine_steps: int = 20,
    include_bundled: bool = True,
) -> tuple[list[Method], list[str]]:
    """The benchmark's rows and notes about rows left out.

    Returns:
        ``(methods, notes)``.
    """
    staring = ElastixSettings(rigidity_penalty=True, iterations=elastix_iterations, threads=threads)
    plain = ElastixSettings(rigidity_penalty=False, iterations=elastix_iterations, threads=threads)
    methods = [
        Method(INITIAL, KIND_INITIAL),
        Method(STARING, KIND_ELASTIX, elastix=staring),
        Method(ELASTIX, KIND_ELASTIX, elastix=plain),
    ]
    notes: list[str] = []
    if include_bundled and bundled_model_available():
        methods.append(Method(NETWORK_ONLY, KIND_MODEL, vertebra_rigid_steps=0))
        methods.append(Method(BUNDLED, KIND_MODEL))
        methods.append(Method(BUNDLED_AUTOMATIC, KIND_MODEL, landmarks=False))
        if refine_steps > 0:
            methods.append(Method(BUNDLED_REFINED, KIND_MODEL, refine_steps=refine_steps))
    elif include_bundled:
        notes.append("bundled model rows skipped: Resources/Models/default.json does not exist yet")
    if manifest is not None:
        methods += read_manifest(manifest)
    return methods, notes


# ---------------------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of the code inside a ``with`` block, in MB.

    On CUDA devices the peak of ``torch.cuda.max_memory_allocated``. On the CPU the peak increase of this process's
    resident set size over its value at entry, which sees elastix's and torch's native allocations (``tracemalloc``
    does not): on Linux the kernel's high-water mark is reset at entry (``/proc/self/clear_refs``) and read at exit
    (``VmHWM``); where that is not allowed, the resident size is sampled every few milliseconds instead. Without
    ``/proc`` the value is ``nan``. Freed heap memory is handed back to the system at entry (glibc), so that reuse
    of resident free memory does not hide allocations.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_kb = 0
        self._peak_kb = 0
        self._high_water = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        start = _status_kb("VmRSS")
        if start is None:
            return self
        self._start_kb = self._peak_kb = start
        self._high_water = _reset_high_water_mark()
        if not self._high_water:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            value = _status_kb("VmRSS")
            if value is not None and value > self._peak_kb:
                self._peak_kb = value
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._cuda_start) / 2**20
            return
        if self._high_water:
            self._peak_kb = max(self._peak_kb, _status_kb("VmHWM") or 0)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak_kb = max(self._peak_kb, _status_kb("VmRSS") or 0)
        else:
            return
        self.peak_mb = (self._peak_kb - self._start_kb) / 1024.0


def _status_kb(field_name: str) -> int | None:
    return process_status_kb(field_name)


def _release_free_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``), so that the next allocations need fresh
    pages and show up in the resident size instead of silently reusing resident free memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as stream:
            stream.write("5")
    except OSError:
        return False
    return True


def max_rss_mb() -> float:
    """The process's peak resident set size so far (MB), from ``getrusage``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------------- methods


@dataclass
class MethodOutput:
    """One method on one case: the field on the case grid and how long / how much memory it took."""

    displacement: torch.Tensor
    runtime_s: float
    peak_memory_mb: float
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""


def displacement_on_grid(transform: sitk.Transform, geometry: Geometry) -> torch.Tensor:
    """Sample a fixed -> moving ITK transform on ``geometry`` as a ``(1, 3, D, H, W)`` voxel pull-back field."""
    image = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        (geometry.shape[2], geometry.shape[1], geometry.shape[0]),
        geometry.origin,
        geometry.spacing,
        geometry.direction,
    )
    displacement, _ = displacement_from_field_image(image)
    return displacement


def case_prealignment(case: BenchmarkCase):
    """The paper's rigid pre-alignment of a case from vertebra centre points (the MR's: centroids of the true fixed
    labels; the CT's: label centroids), the same for every row (:func:`..prealign.prealign`)."""
    from ..prealign import prealign

    key = (case.name, case.seed)
    if key not in _PREALIGNMENTS:
        names = {int(v): n for n, v in _named_values(case.moving_labels).items()}
        _PREALIGNMENTS.clear()  # one case at a time
        _PREALIGNMENTS[key] = prealign(
            case.fixed,
            case.moving,
            case.moving_labels,
            fixed_landmarks=case_points(case),
            label_names=names,
        )
    return _PREALIGNMENTS[key]


_PREALIGNMENTS: dict = {}


def case_points(case: BenchmarkCase) -> dict[str, np.ndarray]:
    """The MR vertebra centre points the point-started rows get: the case's own (e.g. placed with an error) or the
    centroids of its true fixed labels."""
    return case.fixed_points if case.fixed_points is not None else named_centroids(case.fixed_labels)


def _named_values(labels: sitk.Image) -> dict[str, int]:
    return {name: value for value, name in label_names(labels).items()}


def named_centroids(labels: sitk.Image) -> dict[str, np.ndarray]:
    """Vertebra name -> LPS centroid (mm) of every label of ``labels`` (the benchmark's MR centre points)."""
    from ..prealign import label_centroids

    centroids = label_centroids(labels)
    names = label_names(list(centroids))
    return {names[v]: c for v, c in centroids.items()}


class ModelCache:
    """Loads each network once (the bundled model or a checkpoint) on the requested device."""

    def __init__(self, device: str = "auto") -> None:
        from ..pipeline import NetworkCache

        self.device = device
        self._networks = NetworkCache()

    def get(self, checkpoint: str | None):
        return self._networks.get(make_settings(device=self.device, model_path=checkpoint))


def run_method(method: Method, case: BenchmarkCase, models: ModelCache | None = None) -> MethodOutput:
    """Run one method on one case.

    Returns:
        The :class:`MethodOutput` with the displacement on the case grid.
    """
    geometry = case.geometry
    if method.kind == KIND_IDENTITY:
        return MethodOutput(torch.zeros((1, 3, *geometry.shape)), 0.0, 0.0, "-")
    if method.kind == KIND_INITIAL:
        return MethodOutput(displacement_on_grid(case_prealignment(case).transform(), geometry), 0.0, 0.0, "-")
    if method.kind == KIND_ELASTIX:
        settings = method.elastix or ElastixSettings()
        if not is_available():
            raise InputError("the elastix rows need itk-elastix (pip install spinerigidreg[baseline])")
        with PeakMemory("cpu") as memory:
            start = time.perf_counter()
            pre = case_prealignment(case).transform()
            ct_min = float(sitk.GetArrayViewFromImage(case.moving).min())
            # On the case's 1 mm grid, as in Table 1: on a clinical MR's own anisotropic grid (3-4 mm slices)
            # elastix's B-spline registration diverged (displacements of 150 mm on the real-MR tier).
            fixed = case.fixed_on_grid()
            moving = resample_to_reference(case.moving, fixed, pre, default_value=ct_min)
            labels = resample_to_reference(case.moving_labels, fixed, pre, is_label=True)
            resampled = time.perf_counter() - start
            # No moving mask (register_elastix takes one): with the CT's field of view as the mask Staring did worse
            # on this benchmark (DSC 0.940 vs 0.942, TRE 0.63 vs 0.60 mm, 843 vs 107 folding voxels).
            result = register_elastix(fixed, moving, labels, settings)
        field = sitk.DisplacementFieldTransform(displacement_field_image(result.displacement.double(), geometry))
        displacement = displacement_on_grid(sitk.CompositeTransform([pre, field]), geometry)
        threads = settings.threads or os.cpu_count()
        timings = {"prealign_resample": resampled, **result.timings}
        return MethodOutput(
            displacement, result.runtime_s + resampled, memory.peak_mb, f"cpu ({threads} threads)", timings
        )
    if method.kind == KIND_MODEL:
        from ..pipeline import forget_kept_work, register

        models = models or ModelCache()
        network = models.get(method.checkpoint)
        device = next(network.parameters()).device
        settings = make_settings(
            device=str(device),
            refine_steps=method.refine_steps,
            vertebra_steps=method.vertebra_rigid_steps,
            bone_prealign=True if method.bone_prealign else None,
        )
        forget_kept_work()  # each row times a first registration of its case, whatever ran before it
        with PeakMemory(device) as memory:
            result = register(
                case.fixed,
                case.moving,
                case.moving_labels,
                fixed_landmarks=case_points(case) if method.landmarks else None,
                settings=settings,
                network=network,
            )
        timings = dict(result.timings)
        runtime = timings["total"] - timings.get("outputs", 0.0)
        displacement = displacement_on_grid(result.transform, geometry)
        label = f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
        return MethodOutput(displacement, runtime, memory.peak_mb, label, timings)
    raise InputError(f"unknown method kind {method.kind!r}")


# ---------------------------------------------------------------------------------------------------- metrics

#: Per-vertebra columns copied from :func:`..metrics.vertebra_table`.
VERTEBRA_COLUMNS = (
    "dice",
    "rigid_dice",
    "volume_change_percent",
    "pc",
    "oc",
    "folding_voxels",
    "tre_mm",
    "mean_displacement_mm",
    "voxels",
)


def evaluate(case: BenchmarkCase, displacement: torch.Tensor) -> tuple[list[dict], dict]:
    """Per-vertebra rows and whole-field numbers of one displacement on one case.

    Returns:
        ``(rows, field)``: ``rows`` from :func:`..metrics.vertebra_table` (with the vertebra ``name`` and
        ``abs_volume_change_percent``), ``field`` from :func:`..metrics.field_summary` over the whole grid.
    """
    from ..geometry import image_to_tensor

    spacing = case.geometry.spacing_array_order
    moving = image_to_tensor(case.moving_labels, torch.int64)
    fixed = image_to_tensor(case.fixed_labels, torch.int64)
    rows = metrics.vertebra_table(
        moving, displacement, spacing, fixed_labels=fixed, true_displacement=case.true_displacement
    )
    names = label_names([int(r["label"]) for r in rows])
    for row in rows:
        row["name"] = names[int(row["label"])]
        row["abs_volume_change_percent"] = abs(float(row["volume_change_percent"]))
    if case.evaluated is not None:
        rows = [row for row in rows if int(row["label"]) in case.evaluated]
    return rows, metrics.field_summary(displacement, spacing)


def evaluate_transform(
    transform: sitk.Transform,
    moving_labels: sitk.Image,
    grid: Geometry,
    fixed_labels: sitk.Image | None = None,
    true_transform: sitk.Transform | None = None,
    rigid: sitk.Transform | None = None,
) -> tuple[list[dict], dict]:
    """Metrics of a fixed -> moving transform on an evaluation grid (``srr-evaluate``).

    The metrics need the moving labels and the field on one grid. With ``rigid`` (the pre-alignment ``P`` of an
    ``srr-register`` result, ``transform = P o (id + d)``) the CT labels are resampled through ``P`` onto ``grid``
    and the field is ``P^-1 o transform``, as the pipeline evaluates itself; the true field is expressed the same
    way, so TRE is unchanged (``P`` is an isometry). Without it the CT labels are placed on ``grid`` by physical
    position (the CT and the MR must overlap).

    Args:
        transform: The registration (fixed point -> moving point, LPS).
        moving_labels: CT vertebra labels.
        grid: Evaluation grid (in the MR's space, ideally 1 mm around the spine).
        fixed_labels: MR vertebra labels (DSC), placed on ``grid`` by physical position.
        true_transform: The true fixed -> moving map (TRE).
        rigid: The rigid part of ``transform`` (see above).

    Returns:
        ``(rows, field)`` as :func:`evaluate`.
    """
    from ..geometry import image_to_tensor

    reference = grid.reference_image()
    inverse = rigid.GetInverse() if rigid is not None else None

    def relative(t: sitk.Transform) -> sitk.Transform:
        return t if inverse is None else sitk.CompositeTransform([inverse, t])

    labels = image_to_tensor(resample_to_reference(moving_labels, reference, rigid, is_label=True), torch.int64)
    if not bool((labels > 0).any()):
        raise InputError("no CT vertebra lies inside the evaluation grid (give --reference or the MR labels)")
    displacement = displacement_on_grid(relative(transform), grid)
    fixed = None
    if fixed_labels is not None:
        fixed = image_to_tensor(resample_to_reference(fixed_labels, reference, is_label=True), torch.int64)
    truth = displacement_on_grid(relative(true_transform), grid) if true_transform is not None else None
    spacing = grid.spacing_array_order
    rows = metrics.vertebra_table(labels, displacement, spacing, fixed_labels=fixed, true_displacement=truth)
    names = label_names([int(r["label"]) for r in rows])
    for row in rows:
        row["name"] = names[int(row["label"])]
    return rows, metrics.field_summary(displacement, spacing)


@dataclass
class BenchmarkRun:
    """Everything one run measured.

    Attributes:
        vertebra_rows: One dict per (case, method, vertebra).
        case_rows: One dict per (case, method): runtime, memory, device, whole-field numbers, per-case means.
        panels: Slices for the Fig. 3-like panel (see :func:`panel_slices`), keyed ``"<method>|<view>"``.
        notes: Remarks for the report (rows skipped, failures).
    """

    vertebra_rows: list[dict] = field(default_factory=list)
    case_rows: list[dict] = field(default_factory=list)
    panels: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def panel_position(case: BenchmarkCase) -> tuple[int, int]:
    """Axial (``k``) and sagittal (``i``) slice indices through the middle vertebra's centroid."""
    labels = sitk.GetArrayViewFromImage(case.fixed_labels)
    values = [int(v) for v in np.unique(labels) if v > 0]
    middle = values[len(values) // 2]
    k, _, i = (int(round(float(c))) for c in np.argwhere(labels == middle).mean(axis=0))
    return k, i


def panel_slices(case: BenchmarkCase, displacement: torch.Tensor | None, name: str) -> dict[str, np.ndarray]:
    """Axial and sagittal slices for the panel figure: of the case images (``displacement=None``) or of the CT labels
    warped by ``displacement``."""
    k, i = panel_position(case)
    if displacement is None:
        arrays = {
            "fixed": sitk.GetArrayFromImage(case.fixed_on_grid()).astype(np.float32),
            "moving": sitk.GetArrayFromImage(case.moving).astype(np.float32),
            "truth": sitk.GetArrayFromImage(case.fixed_labels).astype(np.int16),
        }
    else:
        from ..geometry import image_to_tensor

        warped = warp_labels(image_to_tensor(case.moving_labels, torch.int64), displacement)[0, 0].numpy()
        arrays = {name: warped.astype(np.int16)}
    out = {}
    for key, array in arrays.items():
        out[f"{key}|axial"] = np.ascontiguousarray(array[k])
        out[f"{key}|sagittal"] = np.ascontiguousarray(array[:, :, i])
    return out


def run_benchmark(
    cases: Sequence[BenchmarkCase],
    methods: Sequence[Method],
    device: str = "auto",
    panel_case: str | None = None,
    progress: ProgressCallback | None = None,
) -> BenchmarkRun:
    """Run every method on every case.

    Args:
        cases: The pairs.
        methods: The rows.
        device: Device of the model rows (``auto``, ``cpu``, ``cuda``).
        panel_case: Name of the case shown in the panel figure (default: the first case).
        progress: ``(fraction, message)`` after each (case, method).

    Returns:
        The :class:`BenchmarkRun`. A method that fails on a case is recorded with ``status`` ``"failed: ..."`` and
        no per-vertebra rows; the run goes on.
    """
    run = BenchmarkRun()
    models = ModelCache(device)
    panel_case = panel_case or (cases[0].name if cases else None)
    total = max(len(cases) * len(methods), 1)
    step = 0
    for case in cases:
        if case.name == panel_case:
            run.panels.update(panel_slices(case, None, "case"))
        for method in methods:
            if progress:
                progress(step / total, f"{case.name}: {method.name}")
            step += 1
            base = {"case": case.name, "source": case.source, "method": method.name}
            try:
                output = run_method(method, case, models)
            except (RuntimeError, InputError, MemoryError) as error:
                log.warning("%s failed on %s: %s", method.name, case.name, error)
                run.case_rows.append({**base, "status": f"failed: {str(error)[:200]}"})
                run.notes.append(f"{method.name} failed on {case.name}: {str(error)[:200]}")
                continue
            rows, field_stats = evaluate(case, output.displacement)
            for row in rows:
                run.vertebra_rows.append(
                    {
                        **base,
                        **{k: row.get(k) for k in ("label", "name", *VERTEBRA_COLUMNS, "abs_volume_change_percent")},
                    }
                )
            summary = metrics.summarize(rows)
            run.case_rows.append(
                {
                    **base,
                    "status": "ok",
                    "runtime_s": output.runtime_s,
                    "peak_memory_mb": output.peak_memory_mb,
                    "device": output.device,
                    "folding_voxels": field_stats["folding_voxels"],
                    "folding_percent": field_stats["folding_percent"],
                    "sd_log_jacobian": field_stats["sd_log_jacobian"],
                    "dice_mean": summary.get("dice_mean"),
                    "rigid_dice_mean": summary.get("rigid_dice_mean"),
                    "abs_volume_change_percent_mean": summary.get("abs_volume_change_percent_mean"),
                    "pc_mean": summary.get("pc_mean"),
                    "tre_mm_mean": summary.get("tre_mm_mean"),
                    "tre_mm_max": max((float(r["tre_mm"]) for r in rows), default=math.nan),
                    "timings": json.dumps({k: round(v, 3) for k, v in output.timings.items()}),
                }
            )
            if case.name == panel_case:
                run.panels.update(panel_slices(case, output.displacement, method.name))
    if progress:
        progress(1.0, "done")
    return run


# ---------------------------------------------------------------------------------------------------- speed


__all__ = [
    "BUNDLED",
    "BUNDLED_AUTOMATIC",
    "BUNDLED_REFINED",
    "NETWORK_ONLY",
    "ELASTIX",
    "INITIAL",
    "STARING",
    "BenchmarkRun",
    "Method",
    "MethodOutput",
    "PeakMemory",
    "default_methods",
    "displacement_on_grid",
    "evaluate",
    "evaluate_transform",
    "read_manifest",
    "run_benchmark",
    "run_method",
]
