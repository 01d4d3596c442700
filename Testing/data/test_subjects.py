"""Subject folders: every image format and landmark format, optional files, and broken folders rejected with a
message naming the folder and the file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series
from SpineRigidRegLib import io
from SpineRigidRegLib.data.phantom import make_phantom
from SpineRigidRegLib.data.subjects import Subject, classify, find_subjects, load_subject
from SpineRigidRegLib.errors import InputError


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(num_vertebrae=3, shape=(20, 16, 16), seed=1, spacing=(1.5, 1.5, 2.0), origin=(5.0, -3.0, 7.0))


def _mr_like(phantom) -> sitk.Image:
    return sitk.Cast(sitk.Cast(phantom.tissues, sitk.sitkInt16) * 100, sitk.sitkInt16)


def make_subject(folder: Path, phantom, formats: dict[str, str] | None = None, optional: bool = False) -> Path:
    """Write a subject: ``formats`` maps role -> file name (``mr/`` for a DICOM folder)."""
    names = {"ct": "ct.nii.gz", "ct_labels": "ct_vertebrae.nii.gz", "mr": "mr.nii.gz", **(formats or {})}
    folder.mkdir(parents=True, exist_ok=True)
    images = {"ct": sitk.Cast(phantom.ct, sitk.sitkInt16), "ct_labels": phantom.labels, "mr": _mr_like(phantom)}
    if optional:
        names.setdefault("mr_labels", "mr_seg.nrrd")
        images["mr_labels"] = phantom.labels
    for role, image in images.items():
        name = names[role]
        if name.endswith("/"):
            write_dicom_series(image, folder / name.rstrip("/"), f"1.2.826.0.1.3680043.2.1125.7.{len(role)}")
        else:
            io.write_image(image, folder / name)
    if optional:
        io.write_landmarks(phantom.landmarks, folder / names.get("ct_landmarks", "ct_landmarks.mrk.json"))
        io.write_landmarks(phantom.landmarks, folder / names.get("mr_landmarks", "mr_landmarks.fcsv"), "RAS")
    return folder


def assert_same_grid_and_values(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.mark.parametrize(
    "formats",
    [
        {},  # NIfTI
        {"ct": "CT.nrrd", "ct_labels": "ct_seg.nrrd", "mr": "T1w.nrrd"},
        {"ct": "ct.mha", "ct_labels": "CT-labels.mha", "mr": "mri.mha"},
        {"mr": "mr/"},  # a DICOM series folder
        {"ct": "ct/", "ct_labels": "ct_vertebrae.nrrd", "mr": "t2.mha"},
    ],
    ids=["nifti", "nrrd", "mha", "dicom-mr", "dicom-ct"],
)
def test_reads_every_format(tmp_path: Path, phantom, formats) -> None:
    folder = make_subject(tmp_path / "case01", phantom, formats)
    subject = load_subject(folder, check=True)
    assert subject.name == "case01" and subject.folder == folder
    assert subject.mr_labels is None and subject.ct_landmarks is None and subject.mr_landmarks is None
    data = subject.read()
    assert set(data) == {"ct", "ct_labels", "mr"}
    assert_same_grid_and_values(data["ct"], sitk.Cast(phantom.ct, sitk.sitkInt16))
    assert_same_grid_and_values(sitk.Cast(data["ct_labels"], sitk.sitkUInt16), phantom.labels)
    assert_same_grid_and_values(data["mr"], _mr_like(phantom))


@pytest.mark.parametrize("ct_points", ["ct_landmarks.mrk.json", "ct_landmarks.fcsv", "CT_points.csv"])
def test_optional_mr_labels_and_landmarks(tmp_path: Path, phantom, ct_points) -> None:
    folder = make_subject(tmp_path / "s", phantom, {"ct_landmarks": ct_points}, optional=True)
    subject = load_subject(folder)
    assert subject.mr_labels == folder / "mr_seg.nrrd"
    assert subject.ct_landmarks == folder / ct_points
    assert subject.mr_landmarks == folder / "mr_landmarks.fcsv"
    data = subject.read()
    assert_same_grid_and_values(data["mr_labels"], phantom.labels)
    for role in ("ct_landmarks", "mr_landmarks"):  # stored as LPS and as RAS; read back as LPS
        assert list(data[role]) == list(phantom.landmarks)
        for name, point in phantom.landmarks.items():
            np.testing.assert_allclose(data[role][name], point, atol=1e-3)


def test_float_labels_with_whole_values_become_integer(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "s", phantom)
    io.write_image(sitk.Cast(phantom.labels, sitk.sitkFloat32), folder / "ct_vertebrae.nii.gz")
    labels = load_subject(folder).read()["ct_labels"]
    assert labels.GetPixelID() == sitk.sitkInt32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(phantom.labels))


def test_classify() -> None:
    assert classify(Path("ct.nii.gz")) == "ct"
    assert classify(Path("CT_Vertebrae.nii")) == "ct_labels"
    assert classify(Path("ct_seg.nrrd")) == "ct_labels"
    assert classify(Path("segmentation-ct.mha")) == "ct_labels"
    assert classify(Path("T2w.nii.gz")) == "mr"
    assert classify(Path("mr_labels.nii.gz")) == "mr_labels"
    assert classify(Path("mr_landmarks.mrk.json")) == "mr_landmarks"
    assert classify(Path("ct.fcsv")) == "ct_landmarks"
    assert classify(Path("ct_mr_overlay.nii.gz")) is None  # both modalities
    assert classify(Path("notes.txt")) is None
    assert classify(Path("picture.png")) is None


# -------------------------------------------------------------------------------------------- broken folders


def _error(folder: Path, check: bool = True) -> str:
    with pytest.raises(InputError) as info:
        load_subject(folder, check=check)
    return str(info.value)


def test_missing_ct_names_the_folder_and_the_file(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "s", phantom)
    (folder / "ct.nii.gz").unlink()
    message = _error(folder, check=False)
    assert str(folder) in message and "CT image" in message and "ct.nii.gz" in message


def test_missing_mr_and_labels(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "s", phantom)
    (folder / "mr.nii.gz").unlink()
    (folder / "ct_vertebrae.nii.gz").unlink()
    message = _error(folder, check=False)
    assert "MR image" in message and "label map" in message and str(folder) in message


def test_two_candidate_cts(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "s", phantom)
    io.write_image(phantom.ct, folder / "ct_2.nrrd")
    message = _error(folder, check=False)
    assert str(folder) in message and "ct.nii.gz" in message and "ct_2.nrrd" in message


def test_truncated_file(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "s", phantom)
    path = folder / "mr.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert load_subject(folder).mr == path  # the names alone look fine
    message = _error(folder)
    assert str(folder) in message and "mr.nii.gz" in message and "MR image" in message
    assert "truncated" in message or "damaged" in message


def test_unreadable_file(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "s", phantom)
    (folder / "ct_vertebrae.nii.gz").unlink()
    (folder / "ct_vertebrae.nrrd").write_text("this is not an image\n", encoding="utf-8")
    message = _error(folder)
    assert str(folder) in message and "ct_vertebrae.nrrd" in message and "CT label map" in message


def test_unreadable_landmarks(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "s", phantom)
    (folder / "mr_landmarks.mrk.json").write_text("{not json", encoding="utf-8")
    message = _error(folder)
    assert str(folder) in message and "mr_landmarks.mrk.json" in message


def test_non_integer_labels(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "s", phantom)
    labels = sitk.Cast(phantom.labels, sitk.sitkFloat32) * 0.5  # 10.0, 10.5, 11.0 ...: not a label map
    io.write_image(labels, folder / "ct_vertebrae.nii.gz")
    message = _error(folder)
    assert str(folder) in message and "ct_vertebrae.nii.gz" in message and "non-integer" in message


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_subject(tmp_path / "nowhere")
    with pytest.raises(InputError, match="not found"):
        find_subjects(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- find_subjects


def test_find_subjects(tmp_path: Path, phantom) -> None:
    root = tmp_path / "data"
    make_subject(root / "b", phantom, optional=True)
    make_subject(root / "a", phantom, {"mr": "mr/"})
    make_subject(root / "spine-ct-03", phantom)  # the folder's own name holds a modality word
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a subject", encoding="utf-8")
    subjects = find_subjects(root, check=True)
    assert [s.name for s in subjects] == ["a", "b", "spine-ct-03"]
    assert all(isinstance(s, Subject) for s in subjects)
    assert subjects[1].mr_landmarks is not None


def test_find_subjects_skip_invalid(tmp_path: Path, phantom, caplog) -> None:
    root = tmp_path / "data"
    make_subject(root / "good", phantom)
    broken = make_subject(root / "no_ct", phantom)
    (broken / "ct.nii.gz").unlink()
    truncated = make_subject(root / "truncated", phantom)
    path = truncated / "ct.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="no_ct"):
        find_subjects(root)
    with caplog.at_level(logging.WARNING):
        subjects = find_subjects(root, skip_invalid=True, check=True)
    assert [s.name for s in subjects] == ["good"]
    assert "no_ct" in caplog.text and "truncated" in caplog.text
    # Without check the damaged file goes unnoticed until it is read.
    assert [s.name for s in find_subjects(root, skip_invalid=True)] == ["good", "truncated"]


def test_root_is_a_single_subject(tmp_path: Path, phantom) -> None:
    folder = make_subject(tmp_path / "one", phantom, {"mr": "mr/"})
    subjects = find_subjects(folder)
    assert len(subjects) == 1 and subjects[0].name == "one"
    with pytest.raises(InputError, match="no subject"):
        find_subjects(tmp_path / "one" / "mr")  # a DICOM folder is not a subject
