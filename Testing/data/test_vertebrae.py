"""Vertebra naming in the TotalSegmentator and VerSe numberings, scheme detection, ordering, label filtering."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from SpineRigidRegLib.data import vertebrae as vt
from SpineRigidRegLib.errors import InputError


@pytest.mark.parametrize(
    ("label", "name"),
    [
        (25, "sacrum"),
        (26, "S1"),
        (27, "L5"),
        (30, "L2"),
        (31, "L1"),
        (32, "T12"),
        (33, "T11"),
        (43, "T1"),
        (44, "C7"),
        (49, "C2"),
        (50, "C1"),
    ],
)
def test_totalsegmentator_names(label: int, name: str) -> None:
    assert vt.vertebra_name(label, "totalsegmentator") == name
    assert vt.vertebra_label(name.lower(), "totalsegmentator") == label


@pytest.mark.parametrize(
    ("label", "name"),
    [(1, "C1"), (7, "C7"), (8, "T1"), (19, "T12"), (20, "L1"), (24, "L5"), (25, "L6"), (26, "sacrum"), (28, "T13")],
)
def test_verse_names(label: int, name: str) -> None:
    assert vt.vertebra_name(label, "verse") == name
    assert vt.vertebra_label(name, "VerSe") == label


def test_tables_are_complete_and_one_to_one() -> None:
    assert sorted(vt.TOTALSEGMENTATOR_VERTEBRAE) == list(range(25, 51))
    assert sorted(vt.VERSE_VERTEBRAE) == list(range(1, 29))
    for table in (vt.TOTALSEGMENTATOR_VERTEBRAE, vt.VERSE_VERTEBRAE):
        assert len(set(table.values())) == len(table)


def test_unknown_labels_and_schemes_are_input_errors() -> None:
    with pytest.raises(InputError, match="not a vertebra"):
        vt.vertebra_name(79, "totalsegmentator")  # spinal cord
    with pytest.raises(InputError, match="unknown label scheme"):
        vt.vertebra_name(20, "nnunet")
    with pytest.raises(InputError, match="not a vertebra name"):
        vt.vertebra_label("L7", "verse")


@pytest.mark.parametrize(
    ("values", "scheme"),
    [
        ([30, 31, 32, 33], "totalsegmentator"),  # the shared example
        ([0, 1, 2, 5, 30, 31, 79, 90], "totalsegmentator"),  # organs and vertebrae
        ([27, 28], "totalsegmentator"),  # L5, L4: a lumbosacral crop
        ([20, 21, 22, 23], "verse"),
        ([19, 28, 20], "verse"),  # T12, T13, L1
        ([25], "verse"),  # a lone ambiguous value stays VerSe
        ([], "verse"),
    ],
)
def test_detect_scheme(values: list[int], scheme: str) -> None:
    assert vt.detect_scheme(values) == scheme


def test_spine_order_is_cranial_to_caudal() -> None:
    assert vt.spine_order([30, 33, 31, 32], "totalsegmentator") == [33, 32, 31, 30]  # T11, T12, L1, L2
    assert vt.spine_order([26, 20, 28, 19, 1], "verse") == [1, 19, 28, 20, 26]  # C1, T12, T13, L1, sacrum
    assert vt.spine_order([25, 26, 27], "totalsegmentator") == [27, 26, 25]  # L5, S1, sacrum
    with pytest.raises(InputError, match="79"):
        vt.spine_order([30, 79], "totalsegmentator")


def test_vertebra_labels_only_keeps_vertebrae_and_geometry() -> None:
    array = np.array([0, 5, 30, 31, 79, 90, 33, 52], dtype=np.uint8).reshape(2, 2, 2)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    out = vt.vertebra_labels_only(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out).ravel(), [0, 0, 30, 31, 0, 0, 33, 0])
    assert out.GetPixelID() == image.GetPixelID()
    assert out.GetSpacing() == image.GetSpacing() and out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    verse = sitk.GetImageFromArray(np.array([[[0, 20, 21, 28]]], dtype=np.int16))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vt.vertebra_labels_only(verse)).ravel(), [0, 20, 21, 28])
