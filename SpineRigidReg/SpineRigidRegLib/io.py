"""Reading and writing images and vertebra landmarks, with errors that name the file and the problem.

Images
    NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series
    (a folder; its first series is read). Images must be 3D; SimpleITK returns them with LPS geometry whatever the
    file's convention (NIfTI headers are RAS and converted on reading).

Landmarks
    A dict ``{name: (3,) float64 LPS mm}``, one point per vertebra, keyed by the vertebra name (e.g. ``"L1"``) or any
    label the user gave. Three file formats:

    - Slicer markups JSON (``.mrk.json``): every control point of every markup in the file; its ``label`` is the
      key; the markup's ``coordinateSystem`` (``"LPS"`` or ``"RAS"``, Slicer's default ``"LPS"`` when absent)
      says how to read ``position``. Points whose ``positionStatus`` is ``"undefined"`` are skipped.
    - Slicer legacy fiducial list (``.fcsv``): the ``# CoordinateSystem = RAS|LPS|0|1`` header line (0 = RAS,
      1 = LPS; RAS when absent, as Slicer assumes for old files), the ``# columns =`` line if present (otherwise
      Slicer's default ``id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID``).
    - Plain CSV (``.csv``, ``.txt``): a header row naming the columns ``label`` (or ``name``), ``x``, ``y``, ``z``
      (any order, case-insensitive, other columns ignored). Coordinates are **LPS mm** unless a comment line before
      the header says otherwise (``# RAS``, ``# coordinate_system = RAS``) or an optional ``coordinate_system``
      column gives ``LPS``/``RAS`` per row (the column wins over the comment).
"""

from __future__ import annotations

import csv
import gzip
import io as _io
import json
import logging
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import lps_points_to_ras, ras_points_to_lps

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: File name endings :func:`read_image` and :func:`write_image` accept (DICOM is read from a folder).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: File name endings :func:`read_landmarks` accepts.
LANDMARK_SUFFIXES = (".mrk.json", ".json", ".fcsv", ".csv", ".txt")

_MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_FCSV_DEFAULT_COLUMNS = [
    "id",
    "x",
    "y",
    "z",
    "ow",
    "ox",
    "oy",
    "oz",
    "vis",
    "sel",
    "lock",
    "label",
    "desc",
    "associatedNodeID",
]


def _itk_message(error: Exception) -> str:
    """The useful last part of a SimpleITK/ITK exception text, on one line."""
    text = str(error)
    for marker in ("sitk::ERROR:", "ITK ERROR:"):
        if marker in text:
            text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[-2:])[:300] if lines else type(error).__name__


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(IMAGE_SUFFIXES + LANDMARK_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


# ----------------------------------------------------------------------------------------------------- images


def read_image(path: PathLike) -> sitk.Image:
    """Read a 3D image file or DICOM series folder.

    Args:
        path: A NIfTI/NRRD/MetaImage file, or a folder holding a DICOM series (the first series found is read; a
            warning names the others).

    Returns:
        The image, with LPS geometry (SimpleITK's convention).

    Raises:
        InputError: The file or folder does not exist, cannot be read (unknown format, damaged or truncated), holds
            no DICOM series, or is not a 3D image (2D, or 4D with more than one volume).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        return _read_dicom_series(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(
            f"cannot read image {path}: not an image format SimpleITK knows, or the file is damaged "
            f"({_itk_message(error)})"
        ) from None
    _check_dimension(path, reader.GetDimension(), reader.GetSize())
    if _suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        message = _itk_message(error)
        raise InputError(f"cannot read image {path}: the file is damaged or truncated ({message})") from None
    if image.GetDimension() == 4:  # a 4D file with a single volume
        image = image[:, :, :, 0]
    return image


def _check_dimension(path: Path, dimension: int, size: tuple[int, ...]) -> None:
    if dimension == 4 and size[3] == 1:
        return
    if dimension != 3:
        extra = f" with {size[3]} volumes" if dimension == 4 else ""
        raise InputError(f"image {path} is {dimension}D{extra} (size {tuple(size)}); a 3D volume is needed")


def _check_nifti_complete(path: Path) -> None:
    """Raise if a NIfTI file holds fewer voxel bytes than its header announces (ITK's reader does not notice)."""
    if path.name.lower().endswith(".gz"):
        total = 0
        header = b""
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    if len(header) < 544:
                        header += chunk[: 544 - len(header)]
                    total += len(chunk)
        except (EOFError, OSError, zlib.error) as error:
            message = f"cannot read image {path}: the compressed file is truncated or damaged ({error})"
            raise InputError(message) from None
    else:
        total = path.stat().st_size
        with open(path, "rb") as stream:
            header = stream.read(544)
    layout = _nifti_layout(header)
    if layout is None:
        return
    offset, expected = layout
    if total < offset + expected:
        raise InputError(
            f"cannot read image {path}: the file is truncated ({max(total - offset, 0)} of {expected} voxel bytes "
            "present)"
        )


def _nifti_layout(header: bytes) -> tuple[int, int] | None:
    """``(data offset, data bytes)`` from a NIfTI-1 or NIfTI-2 header (either byte order); None if not parseable."""
    for endian in ("<", ">"):
        if len(header) < 4:
            return None
        size = int(np.frombuffer(header[:4], dtype=f"{endian}i4")[0])
        if size == 348 and len(header) >= 348:
            dim = np.frombuffer(header[40:56], dtype=f"{endian}i2").astype(np.int64)
            bitpix = int(np.frombuffer(header[72:74], dtype=f"{endian}i2")[0])
            offset = int(np.frombuffer(header[108:112], dtype=f"{endian}f4")[0])
        elif size == 540 and len(header) >= 540:
            dim = np.frombuffer(header[16:80], dtype=f"{endian}i8").astype(np.int64)
            bitpix = int(np.frombuffer(header[14:16], dtype=f"{endian}i2")[0])
            offset = int(np.frombuffer(header[168:176], dtype=f"{endian}i8")[0])
        else:
            continue
        rank = int(dim[0])
        if not 1 <= rank <= 7 or bitpix <= 0 or np.any(dim[1 : rank + 1] < 1):
            return None
        return max(offset, size + 4 if size == 348 else size), int(np.prod(dim[1 : rank + 1])) * bitpix // 8
    return None


def _read_dicom_series(folder: Path) -> sitk.Image:
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM prints "No Series were found" to stderr otherwise
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as error:
        raise InputError(f"cannot scan folder {folder} for DICOM series ({_itk_message(error)})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)
    if not series:
        raise InputError(f"folder {folder} holds no DICOM series (and a folder is read only as a DICOM series)")
    chosen = series[0]
    if len(series) > 1:
        logger.warning(
            "folder %s holds %d DICOM series (%s); reading the first, %s",
            folder,
            len(series),
            ", ".join(series),
            chosen,
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"cannot read DICOM series {chosen} in {folder} ({len(files)} files): {_itk_message(error)}"
        ) from None
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise InputError(
            f"DICOM series {chosen} in {folder} is not a 3D volume (size {image.GetSize()}); a 3D volume is needed"
        )
    return image


def write_image(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write an image (parent folders are created; compressed when the format allows).

    Args:
        image: Any SimpleITK image.
        path: Output file; the format follows its ending (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ...).
        compress: Use the format's compression.

    Returns:
        The path written.
    """
    if not isinstance(image, sitk.Image):
        raise TypeError(f"image must be a SimpleITK.Image, got {type(image).__name__}")
    path = Path(path)
    if _suffix(path) not in IMAGE_SUFFIXES:
        raise InputError(f"cannot write image {path}: use one of {', '.join(IMAGE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(path), compress)
    except RuntimeError as error:
        raise InputError(f"cannot write image {path}: {_itk_message(error)}") from None
    return path


def write_dicom_series(
    image: sitk.Image, folder: PathLike, modality: str = "CT", series_uid: str | None = None
) -> list[Path]:
    """Write a 3D image as a DICOM series, one file per slice, that reads back with its geometry.

    DICOM stores integers: floating-point voxels are rounded to int16 (CT in HU and label maps fit). Each slice
    carries orientation, position, slice thickness and a shared study/series UID (derived from ``series_uid`` or
    a fresh UUID-based ``2.25.`` UID).

    Args:
        image: 3D image, any direction.
        folder: Output folder (created); must not already hold ``.dcm`` files, so that series never mix.
        modality: DICOM modality tag (``CT``, ``MR``, ``SEG``-like label maps use ``OT``).
        series_uid: Series instance UID; study and instance UIDs extend it.

    Returns:
        The slice files written, in slice order.
    """
    if not isinstance(image, sitk.Image):
        raise TypeError(f"image must be a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"a DICOM series needs a 3D scalar image, got size {image.GetSize()}")
    folder = Path(folder)
    if folder.is_dir() and any(folder.glob("*.dcm")):
        raise InputError(f"cannot write a DICOM series into {folder}: it already holds .dcm files")
    folder.mkdir(parents=True, exist_ok=True)
    if series_uid is None:
        import uuid

        series_uid = f"2.25.{uuid.uuid4().int}"[:56]
    if image.GetPixelID() not in (sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkUInt8, sitk.sitkInt8):
        image = sitk.Cast(sitk.Round(sitk.Cast(image, sitk.sitkFloat32)), sitk.sitkInt16)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    written = []
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        tags = {
            "0008|0060": modality,
            "0020|000d": series_uid + ".1",
            "0020|000e": series_uid,
            "0020|0037": "\\".join(repr(float(v)) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(repr(float(v)) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1),
            "0008|0018": f"{series_uid}.2.{k + 1}",
            "0018|0050": repr(float(image.GetSpacing()[2])),
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        path = folder / f"slice{k:04d}.dcm"
        writer.SetFileName(str(path))
        try:
            writer.Execute(plane)
        except RuntimeError as error:
            raise InputError(f"cannot write DICOM slice {path}: {_itk_message(error)}") from None
        written.append(path)
    return written


def write_rows_csv(rows: list[Mapping[str, object]], path: PathLike, float_format: str | None = None) -> Path:
    """Write dict rows as CSV; the columns are every key in first-seen order (a row lacking one leaves it empty).

    ``float_format`` (e.g. ``".6g"``) formats floats, and NaN becomes an empty cell; ``None`` writes them as is.
    """
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(value: object) -> object:
        if float_format is not None and isinstance(value, float):
            return "" if value != value else format(value, float_format)
        return value

    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell(v) for k, v in row.items()})
    return path


# -------------------------------------------------------------------------------------------------- landmarks


def read_landmarks(path: PathLike) -> dict[str, np.ndarray]:
    """Read named points (vertebra centres) as LPS millimetres.

    Args:
        path: ``.mrk.json`` (Slicer markups), ``.fcsv`` (Slicer legacy) or ``.csv`` (see the module docstring for
            the coordinate-system rules of each).

    Returns:
        ``{label: (3,) float64 LPS mm}`` in file order.

    Raises:
        InputError: Missing or malformed file, a point without a label, duplicated labels, non-numeric or
            non-finite coordinates, an unknown coordinate system, or no points at all.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file not found: {path}")
    suffix = _suffix(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read landmark file {path}: {error}") from None
    if suffix in (".mrk.json", ".json"):
        entries = _parse_markups_json(text, path)
    elif suffix == ".fcsv":
        entries = _parse_fcsv(text, path)
    elif suffix in (".csv", ".txt"):
        entries = _parse_csv(text, path)
    else:
        raise InputError(f"landmark file {path} has an unknown format; use .mrk.json, .fcsv or .csv")
    return _collect(entries, path)


def _collect(entries: list[tuple[str, list, str]], path: Path) -> dict[str, np.ndarray]:
    """``(label, xyz, system)`` entries -> ``{label: LPS point}`` with every check."""
    points: dict[str, np.ndarray] = {}
    for number, (label, xyz, system) in enumerate(entries, start=1):
        label = str(label).strip()
        if not label:
            raise InputError(f"landmark file {path}: point {number} has no label (each point must name its vertebra)")
        if label in points:
            raise InputError(f"landmark file {path}: label {label!r} appears more than once")
        try:
            point = np.asarray([float(v) for v in xyz], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"landmark file {path}: point {label!r} has non-numeric coordinates {xyz!r}") from None
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise InputError(f"landmark file {path}: point {label!r} needs three finite coordinates, got {xyz!r}")
        points[label] = _to_lps(point, system, path)
    if not points:
        raise InputError(f"landmark file {path} holds no points")
    return points


def _normalize_system(value: object, path: Path) -> str:
    text = str(value).strip().upper()
    aliases = {"RAS": "RAS", "LPS": "LPS", "0": "RAS", "1": "LPS"}
    if text not in aliases:
        raise InputError(f"landmark file {path}: unknown coordinate system {value!r} (expected LPS or RAS)")
    return aliases[text]


def _to_lps(point: np.ndarray, system: str, path: Path) -> np.ndarray:
    return ras_points_to_lps(point[None])[0] if _normalize_system(system, path) == "RAS" else point


def _parse_markups_json(text: str, path: Path) -> list[tuple[str, list, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"landmark file {path} is not valid JSON: {error}") from None
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list) or not markups:
        raise InputError(f"landmark file {path} is not a Slicer markups file (no 'markups' list)")
    entries = []
    for markup in markups:
        if not isinstance(markup, dict):
            raise InputError(f"landmark file {path}: a markup is not a JSON object")
        system = markup.get("coordinateSystem", "LPS")
        units = str(markup.get("coordinateUnits", "mm")).strip().lower()
        if units != "mm":
            raise InputError(f"landmark file {path}: coordinate units {units!r} are not supported (only mm)")
        for point in markup.get("controlPoints") or []:
            if not isinstance(point, dict):
                raise InputError(f"landmark file {path}: a control point is not a JSON object")
            if str(point.get("positionStatus", "defined")).lower() == "undefined":
                continue
            if "position" not in point:
                raise InputError(f"landmark file {path}: control point {point.get('label', '?')!r} has no position")
            position = point["position"]
            if not isinstance(position, list):
                raise InputError(f"landmark file {path}: control point {point.get('label', '?')!r} has no position")
            entries.append((point.get("label", ""), position, system))
    return entries


def _split_comments(text: str) -> tuple[list[str], list[str]]:
    comments, rows = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        (comments if line.lstrip().startswith("#") else rows).append(line)
    return comments, rows


def _parse_fcsv(text: str, path: Path) -> list[tuple[str, list, str]]:
    comments, rows = _split_comments(text)
    system, columns = "RAS", _FCSV_DEFAULT_COLUMNS
    for line in comments:
        body = line.lstrip("#").strip()
        key, _, value = body.partition("=")
        if key.strip().lower() == "coordinatesystem":
            system = _normalize_system(value, path)
        elif key.strip().lower() == "columns":
            columns = [c.strip() for c in value.split(",")]
    lowered = [c.lower() for c in columns]
    if not {"x", "y", "z", "label"} <= set(lowered):
        raise InputError(f"landmark file {path}: the '# columns' line must include x, y, z and label")
    index = {name: lowered.index(name) for name in ("x", "y", "z", "label")}
    entries = []
    for number, row in enumerate(csv.reader(rows), start=1):
        if len(row) <= max(index.values()):
            raise InputError(f"landmark file {path}: row {number} has {len(row)} columns, expected {len(columns)}")
        entries.append((row[index["label"]], [row[index[a]] for a in "xyz"], system))
    return entries


def _parse_csv(text: str, path: Path) -> list[tuple[str, list, str]]:
    comments, rows = _split_comments(text)
    default = "LPS"
    for line in comments:
        found = re.findall(r"\b(RAS|LPS)\b", line.upper())
        if found:
            default = found[-1]
    if not rows:
        raise InputError(f"landmark file {path} holds no points")
    table = list(csv.reader(rows))
    header = [c.strip().lower() for c in table[0]]
    label_column = "label" if "label" in header else "name" if "name" in header else None
    if label_column is None or not {"x", "y", "z"} <= set(header):
        raise InputError(
            f"landmark file {path}: the first row must be a header naming the columns label,x,y,z "
            f"(coordinates in LPS mm), got {table[0]!r}"
        )
    index = {name: header.index(name) for name in ("x", "y", "z")}
    index["label"] = header.index(label_column)
    system_column = header.index("coordinate_system") if "coordinate_system" in header else None
    entries = []
    for number, row in enumerate(table[1:], start=2):
        if len(row) < len(header):
            raise InputError(f"landmark file {path}: row {number} has {len(row)} columns, expected {len(header)}")
        system = row[system_column] if system_column is not None and row[system_column].strip() else default
        entries.append((row[index["label"]], [row[index[a]] for a in "xyz"], system))
    return entries


def write_landmarks(points: Mapping[str, object], path: PathLike, coordinate_system: str = "LPS") -> Path:
    """Write named points given in LPS millimetres.

    Args:
        points: ``{label: (3,) LPS mm}``.
        path: ``.mrk.json`` (a Slicer fiducial markup), ``.fcsv`` or ``.csv`` (``label,x,y,z``); parent folders are
            created.
        coordinate_system: ``"LPS"`` or ``"RAS"``: how the file stores the coordinates (recorded in the file:
            ``coordinateSystem``, ``# CoordinateSystem =``, or a ``coordinate_system`` column in a CSV).

    Returns:
        The path written.
    """
    path = Path(path)
    system = _normalize_system(coordinate_system, path)
    names, lps = [], []
    for name, value in points.items():
        point = np.asarray(value, dtype=np.float64).reshape(-1)
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise InputError(f"landmark {name!r} needs three finite coordinates, got {value!r}")
        if not str(name).strip():
            raise InputError("every landmark needs a non-empty label")
        names.append(str(name))
        lps.append(point)
    stored = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
    if system == "RAS":
        stored = lps_points_to_ras(stored)
    suffix = _suffix(path)
    if suffix in (".mrk.json", ".json"):
        content = _markups_json(names, stored, system)
    elif suffix == ".fcsv":
        content = _fcsv(names, stored, system)
    elif suffix == ".csv":
        content = _csv(names, stored, system)
    else:
        raise InputError(f"cannot write landmarks to {path}: use .mrk.json, .fcsv or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def _markups_json(names: list[str], stored: np.ndarray, system: str) -> str:
    control_points = [
        {
            "id": str(n + 1),
            "label": name,
            "description": "",
            "position": [float(c) for c in point],
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for n, (name, point) in enumerate(zip(names, stored, strict=True))
    ]
    markup = {
        "type": "Fiducial",
        "coordinateSystem": system,
        "coordinateUnits": "mm",
        "locked": False,
        "labelFormat": "%N-%d",
        "controlPoints": control_points,
    }
    return json.dumps({"@schema": _MARKUPS_SCHEMA, "markups": [markup]}, indent=2) + "\n"


def _fcsv(names: list[str], stored: np.ndarray, system: str) -> str:
    out = _io.StringIO()
    out.write("# Markups fiducial file version = 4.11\n")
    out.write(f"# CoordinateSystem = {system}\n")
    out.write("# columns = " + ",".join(_FCSV_DEFAULT_COLUMNS) + "\n")
    writer = csv.writer(out, lineterminator="\n")
    for n, (name, p) in enumerate(zip(names, stored, strict=True)):
        writer.writerow(
            [f"vtkMRMLMarkupsFiducialNode_{n}", *(repr(float(c)) for c in p), 0, 0, 0, 1, 1, 1, 0, name, "", ""]
        )
    return out.getvalue()


def _csv(names: list[str], stored: np.ndarray, system: str) -> str:
    out = _io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["label", "x", "y", "z"] + (["coordinate_system"] if system == "RAS" else []))
    for name, p in zip(names, stored, strict=True):
        writer.writerow([name, *(repr(float(c)) for c in p)] + ([system] if system == "RAS" else []))
    return out.getvalue()
