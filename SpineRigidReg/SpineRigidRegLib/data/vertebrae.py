"""Vertebra names for the two label numberings the project accepts: TotalSegmentator v2 (CT "total" task) and VerSe.

TotalSegmentator v2 ids: 25 sacrum, 26 S1, 27 L5, 28 L4, 29 L3, 30 L2, 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1
(descending from head to pelvis, and the map also holds organs: 1-24, 51-117).

VerSe ids: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum, 27 coccyx, 28 T13 (a transitional 13th thoracic
vertebra, which sits between T12 and L1). Every VerSe label is a vertebra.

Names are short and upper-case for vertebrae (``"L1"``, ``"T12"``, ``"C7"``, ``"S1"``) and ``"sacrum"`` /
``"coccyx"`` for the fused bones; landmark files use the same names as control point labels.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

TOTALSEGMENTATOR = "totalsegmentator"
VERSE = "verse"
SCHEMES = (TOTALSEGMENTATOR, VERSE)


def _build_totalsegmentator() -> dict[int, str]:
    names = {25: "sacrum", 26: "S1"}
    names.update({27 + n: f"L{5 - n}" for n in range(5)})  # 27 L5 ... 31 L1
    names.update({32 + n: f"T{12 - n}" for n in range(12)})  # 32 T12 ... 43 T1
    names.update({44 + n: f"C{7 - n}" for n in range(7)})  # 44 C7 ... 50 C1
    return names


def _build_verse() -> dict[int, str]:
    names = {n: f"C{n}" for n in range(1, 8)}
    names.update({7 + n: f"T{n}" for n in range(1, 13)})  # 8 T1 ... 19 T12
    names.update({19 + n: f"L{n}" for n in range(1, 7)})  # 20 L1 ... 25 L6
    names.update({26: "sacrum", 27: "coccyx", 28: "T13"})
    return names


#: Label id -> vertebra name, TotalSegmentator v2 "total" task (CT).
TOTALSEGMENTATOR_VERTEBRAE: dict[int, str] = _build_totalsegmentator()
#: Label id -> vertebra name, VerSe challenge numbering.
VERSE_VERTEBRAE: dict[int, str] = _build_verse()

_TABLES = {TOTALSEGMENTATOR: TOTALSEGMENTATOR_VERTEBRAE, VERSE: VERSE_VERTEBRAE}

# Position along the spine, head to pelvis, of every name (T13 between T12 and L1; S1 before the rest of the sacrum).
_ORDER = (
    [f"C{n}" for n in range(1, 8)]
    + [f"T{n}" for n in range(1, 14)]
    + [f"L{n}" for n in range(1, 7)]
    + ["S1", "sacrum", "coccyx"]
)
_RANK = {name: rank for rank, name in enumerate(_ORDER)}


def _table(scheme: str) -> dict[int, str]:
    key = str(scheme).lower()
    if key not in _TABLES:
        raise InputError(f"unknown label scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    return _TABLES[key]


def is_vertebra(label: int, scheme: str) -> bool:
    """True when ``label`` is a vertebra (or sacrum/coccyx) id of ``scheme``."""
    return int(label) in _table(scheme)


def vertebra_name(label: int, scheme: str) -> str:
    """The name of vertebra ``label`` in ``scheme`` (``"totalsegmentator"`` or ``"verse"``), e.g. ``31 -> "L1"``.

    Raises:
        InputError: ``label`` is not a vertebra of that scheme.
    """
    table = _table(scheme)
    if int(label) not in table:
        raise InputError(f"label {label} is not a vertebra in the {scheme} numbering")
    return table[int(label)]


def vertebra_label(name: str, scheme: str) -> int:
    """Inverse of :func:`vertebra_name` (case-insensitive), e.g. ``("L1", "verse") -> 20``."""
    wanted = str(name).strip().upper()
    for label, known in _table(scheme).items():
        if known.upper() == wanted:
            return label
    raise InputError(f"{name!r} is not a vertebra name of the {scheme} numbering")


def detect_scheme(label_values: Iterable[int]) -> str:
    """Guess the numbering of a label map from the label values it holds (0 is ignored).

    The rule: VerSe never uses a value above 28, so any value above 28 (a TotalSegmentator vertebra from L3 upwards,
    or one of its organ labels) means ``"totalsegmentator"``. When every value lies in 25-28, two or more distinct
    values are read as TotalSegmentator's sacrum/S1/L5/L4 (a lumbosacral crop; in VerSe they would be L6, sacrum,
    coccyx and T13 with no other lumbar vertebra). Anything else is ``"verse"``. Pass the scheme explicitly to the
    other functions when a map is ambiguous.

    Args:
        label_values: The values present in a label map (any iterable of integers).

    Returns:
        ``"totalsegmentator"`` or ``"verse"``.
    """
    values = {int(v) for v in label_values} - {0}
    if not values:
        return VERSE
    if max(values) > 28:
        return TOTALSEGMENTATOR
    if len(values) >= 2 and min(values) >= 25:
        return TOTALSEGMENTATOR
    return VERSE


def label_names(labels: sitk.Image | Iterable[int], scheme: str | None = None) -> dict[int, str]:
    """Label value -> vertebra name of every non-zero label of a label map (or of the given values).

    The numbering is ``scheme`` or, without it, :func:`detect_scheme`'s guess; a value that is not a vertebra of it is
    named by its number. This is the one place where a label map's vertebrae get their names (pipeline tables,
    command lines, benchmark, Slicer Logic).
    """
    if isinstance(labels, sitk.Image):
        values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v > 0]
    else:
        values = sorted({int(v) for v in labels} - {0})
    scheme = scheme or detect_scheme(values)
    return {v: vertebra_name(v, scheme) if is_vertebra(v, scheme) else str(v) for v in values}


def spine_order(values: Iterable[int], scheme: str) -> list[int]:
    """Sort vertebra label ids from cranial (C1) to caudal (coccyx).

    Raises:
        InputError: A value is not a vertebra of ``scheme``.
    """
    return sorted({int(v) for v in values}, key=lambda v: _RANK[vertebra_name(v, scheme)])


def vertebra_labels_only(label_image: sitk.Image, scheme: str | None = None) -> sitk.Image:
    """Keep only the vertebra labels of a label map (organs and other structures become 0).

    Args:
        label_image: Integer label map (any geometry; it is kept).
        scheme: ``"totalsegmentator"`` or ``"verse"``; ``None`` detects it with :func:`detect_scheme`.

    Returns:
        A label map of the same pixel type and geometry with vertebra values unchanged and everything else 0.
    """
    if not isinstance(label_image, sitk.Image):
        raise TypeError(f"label_image must be a SimpleITK.Image, got {type(label_image).__name__}")
    array = sitk.GetArrayFromImage(label_image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError("label map must hold integer values")
    present = [int(v) for v in np.unique(array) if v != 0]
    table = _table(scheme if scheme is not None else detect_scheme(present))
    keep = np.isin(array, [v for v in present if v in table])
    out = sitk.GetImageFromArray(np.where(keep, array, 0).astype(array.dtype))
    out.CopyInformation(label_image)
    return out
