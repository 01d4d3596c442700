"""Writing a :class:`..result.RegistrationResult` to a folder: every file or none."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import write_rows_csv
from .prealign import Prealignment
from .result import RegistrationResult

ProgressCallback = Callable[[float, str], None]


def write_outputs(
    result: RegistrationResult,
    out_dir: str | os.PathLike,
    progress: ProgressCallback | None = None,
    qa_picture: bool = True,
) -> dict[str, Path]:
    """Write every output into ``out_dir``; files appear only once all are written (a failure leaves none).

    Args:
        qa_picture: Also draw ``qa.png``. Without it a command on 2 cores ends about 0.2 s sooner (the picture's 0.7 s
            of CPU overlap the image files' compression).

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
    }
    if qa_picture:
        names["qa"] = "qa.png"
    try:
        with ThreadPoolExecutor(max_workers=WRITERS) as pool:
            # ITK compresses and writes without holding the GIL: the images go out while the QA figure is drawn.
            if result.mr_vertebrae is not None:
                names["mr_vertebrae"] = "mr_vertebrae_predicted.nii.gz"
            jobs = [pool.submit(_write_image, result, key, staging / names[key]) for key in _IMAGES if key in names]
            _write_tables(result, staging, names)
            if qa_picture:
                save_qa_figure(result, staging / names["qa"], fixed=result.fixed)
            for job in jobs:
                job.result()
        paths = {}
        for key, name in names.items():
            os.replace(staging / name, out_dir / name)
            paths[key] = out_dir / name
        return paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)


#: Threads writing the image files (compression is most of their time).
WRITERS = 2


def _write_tables(result: RegistrationResult, staging: Path, names: dict[str, str]) -> None:
    """The transforms, the per-vertebra table (CSV and JSON) and the summary."""
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


#: Steps per mm of the displacement images as written (the transform files keep the exact float64 field).
FIELD_STEPS_PER_MM = 256

#: Steps per unit of the det J image as written.
JACOBIAN_STEPS = 4096


def compact_field(field: sitk.Image) -> sitk.Image:
    """``field`` (a vector image, mm) as float32 rounded to 1 / :data:`FIELD_STEPS_PER_MM` mm (at most 0.002 mm off,
    a hundredth of the registration's accuracy): its low mantissa bits then compress. Float64 noise does not
    compress (the sample case's field: 75 MB in 3 s); the coarser the step, the smaller the file and the shorter
    the compression, which is most of the command's writing time (issue 16's closing notes). Geometry is kept."""
    array = sitk.GetArrayViewFromImage(field)
    rounded = (np.round(array * FIELD_STEPS_PER_MM) / FIELD_STEPS_PER_MM).astype(np.float32)
    out = sitk.GetImageFromArray(rounded, isVector=True)
    out.CopyInformation(field)
    return out


def compact_jacobian(det: sitk.Image) -> sitk.Image:
    """The det J image rounded to 1 / :data:`JACOBIAN_STEPS` like :func:`compact_field`, its sign kept: a positive
    value never becomes 0, so the image counts the folding voxels (det J <= 0) the summary reports."""
    array = sitk.GetArrayViewFromImage(det)
    step = 1.0 / JACOBIAN_STEPS
    rounded = np.round(array / step) * step
    rounded = np.where(array > 0, np.maximum(rounded, step), np.minimum(rounded, 0.0)).astype(np.float32)
    out = sitk.GetImageFromArray(rounded)
    out.CopyInformation(det)
    return out


#: The image outputs: name -> how to get the image from the result (each written on a worker thread).
_IMAGES = {
    "warped_ct": lambda result: result.warped_moving,
    "warped_labels": lambda result: result.warped_labels,
    "jacobian": lambda result: compact_jacobian(result.jacobian),
    "displacement": lambda result: compact_field(result.displacement),
    "total_displacement": lambda result: compact_field(result.total_displacement()),
    "mr_vertebrae": lambda result: result.mr_vertebrae,
}


def _write_image(result: RegistrationResult, key: str, path: Path) -> None:
    sitk.WriteImage(_IMAGES[key](result), str(path), True)


def _json_default(value: object) -> object:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
