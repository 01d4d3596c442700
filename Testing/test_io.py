"""Image and landmark I/O: exact geometry round trips, RAS/LPS handling, and clear errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series
from SpineRigidRegLib import io
from SpineRigidRegLib.errors import InputError


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, y, z."""
    cx, cy, cz = (np.cos(np.radians(a)) for a in (ax, ay, az))
    sx, sy, sz = (np.sin(np.radians(a)) for a in (ax, ay, az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_image(pixel=np.int16) -> sitk.Image:
    """A small oblique, anisotropic image with a non-symmetric pattern (so flips would show)."""
    array = (np.arange(5 * 6 * 7).reshape(5, 6, 7) % 97).astype(pixel)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((10.25, -20.5, 30.75))
    image.SetDirection(tuple(rotation(10, -5, 20).ravel()))
    return image


def assert_same_image(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_image_round_trip_keeps_oblique_geometry(tmp_path: Path, suffix: str) -> None:
    image = oblique_image()
    path = io.write_image(image, tmp_path / "sub" / f"image{suffix}")  # the sub-folder is created
    assert_same_image(io.read_image(path), image)


def test_dicom_series_folder_round_trip(tmp_path: Path) -> None:
    image = oblique_image()
    write_dicom_series(image, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.4242")
    assert_same_image(io.read_image(tmp_path / "dicom"), image, tol=1e-4)


def test_dicom_writer_rounds_float_voxels_and_refuses_a_used_folder(tmp_path: Path) -> None:
    image = sitk.Cast(oblique_image(), sitk.sitkFloat32) + 0.4
    files = io.write_dicom_series(image, tmp_path / "out", modality="CT")
    back = io.read_image(tmp_path / "out")
    assert len(files) == image.GetDepth()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), np.round(sitk.GetArrayFromImage(image)))
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    with pytest.raises(InputError, match="already holds"):
        io.write_dicom_series(image, tmp_path / "out")


def test_dicom_folder_with_two_series_reads_the_first(tmp_path: Path) -> None:
    image = oblique_image()
    write_dicom_series(image, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.1")
    other = sitk.GetImageFromArray(np.zeros((3, 6, 7), np.int16))
    write_dicom_series(other, tmp_path / "dicom_b", "1.2.826.0.1.3680043.2.1125.1.2")
    for path in (tmp_path / "dicom_b").iterdir():
        path.rename(tmp_path / "dicom" / ("b_" + path.name))
    assert io.read_image(tmp_path / "dicom").GetSize()[2] in (3, 5)


def test_folder_without_dicom_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM series") as info:
        io.read_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent_ct.nii.gz"
    with pytest.raises(InputError, match="not found") as info:
        io.read_image(path)
    assert "absent_ct.nii.gz" in str(info.value)


def test_truncated_nifti_is_rejected(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random((20, 24, 28)).astype(np.float32))  # incompressible data
    path = io.write_image(image, tmp_path / "full.nii.gz")
    data = path.read_bytes()
    for name, cut in (("half.nii.gz", len(data) // 2), ("header.nii.gz", 200)):
        truncated = tmp_path / name
        truncated.write_bytes(data[:cut])
        with pytest.raises(InputError) as info:
            io.read_image(truncated)
        assert name in str(info.value)


def test_truncated_uncompressed_nifti_is_rejected(tmp_path: Path) -> None:
    path = io.write_image(oblique_image(), tmp_path / "full.nii", compress=False)
    data = path.read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:-50])
    with pytest.raises(InputError, match="truncated") as info:
        io.read_image(tmp_path / "cut.nii")
    assert "cut.nii" in str(info.value)


def test_garbage_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ct.nrrd"
    path.write_text("this is not an image")
    with pytest.raises(InputError, match="ct.nrrd"):
        io.read_image(path)


def test_2d_and_4d_images_are_rejected(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([8, 9], sitk.sitkInt16), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="2D") as info:
        io.read_image(tmp_path / "flat.nii.gz")
    assert "flat.nii.gz" in str(info.value)
    sitk.WriteImage(sitk.Image([4, 5, 6, 3], sitk.sitkInt16), str(tmp_path / "series.nii.gz"))
    with pytest.raises(InputError, match="4D with 3 volumes") as info:
        io.read_image(tmp_path / "series.nii.gz")
    assert "series.nii.gz" in str(info.value)


def test_4d_image_with_one_volume_is_read_as_3d(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([4, 5, 6, 1], sitk.sitkInt16), str(tmp_path / "one.nii.gz"))
    assert io.read_image(tmp_path / "one.nii.gz").GetSize() == (4, 5, 6)


def test_write_image_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="image.xyz"):
        io.write_image(oblique_image(), tmp_path / "image.xyz")


# ------------------------------------------------------------------------------------------------- landmarks

POINTS = {"L1": np.array([1.5, -2.25, 30.0]), "L2": np.array([-4.0, 12.5, 5.125]), "T12": np.array([0.0, 3.0, 55.5])}


@pytest.mark.parametrize("name", ["points.mrk.json", "points.fcsv", "points.csv"])
@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_landmark_round_trip(tmp_path: Path, name: str, system: str) -> None:
    path = io.write_landmarks(POINTS, tmp_path / "deep" / name, coordinate_system=system)
    read = io.read_landmarks(path)
    assert list(read) == list(POINTS)
    for key, value in POINTS.items():
        np.testing.assert_allclose(read[key], value, atol=1e-9)


def test_mrk_json_stores_the_requested_frame(tmp_path: Path) -> None:
    io.write_landmarks({"L1": [1.0, 2.0, 3.0]}, tmp_path / "ras.mrk.json", coordinate_system="RAS")
    markup = json.loads((tmp_path / "ras.mrk.json").read_text(encoding="utf-8"))["markups"][0]
    assert markup["coordinateSystem"] == "RAS"
    assert markup["controlPoints"][0]["position"] == [-1.0, -2.0, 3.0]  # LPS (1, 2, 3) is RAS (-1, -2, 3)


def test_slicer_ras_mrk_json_is_converted_to_lps(tmp_path: Path) -> None:
    content = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
        "Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "RAS",
                "controlPoints": [
                    {"id": "1", "label": "L3", "position": [10.0, -20.0, 30.0], "positionStatus": "defined"},
                    {"id": "2", "label": "L4", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
                ],
            }
        ],
    }
    (tmp_path / "a.mrk.json").write_text(json.dumps(content))
    read = io.read_landmarks(tmp_path / "a.mrk.json")
    assert list(read) == ["L3"]  # the undefined point is skipped
    np.testing.assert_allclose(read["L3"], [-10.0, 20.0, 30.0])


def test_legacy_fcsv_defaults_to_ras(tmp_path: Path) -> None:
    text = (
        "# Markups fiducial file version = 4.6\n"
        "# CoordinateSystem = 0\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,C7,,\n"
    )
    (tmp_path / "old.fcsv").write_text(text)
    np.testing.assert_allclose(io.read_landmarks(tmp_path / "old.fcsv")["C7"], [-1.0, -2.0, 3.0])
    (tmp_path / "bare.fcsv").write_text("vtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,C6,,\n")
    np.testing.assert_allclose(io.read_landmarks(tmp_path / "bare.fcsv")["C6"], [-1.0, -2.0, 3.0])


def test_csv_is_lps_unless_told_otherwise(tmp_path: Path) -> None:
    (tmp_path / "lps.csv").write_text("label,x,y,z\nL1,1,2,3\n")
    np.testing.assert_allclose(io.read_landmarks(tmp_path / "lps.csv")["L1"], [1.0, 2.0, 3.0])
    (tmp_path / "ras.csv").write_text("# RAS\nName,Z,Y,X\nL1,3,2,1\n")  # any column order, case-insensitive
    np.testing.assert_allclose(io.read_landmarks(tmp_path / "ras.csv")["L1"], [-1.0, -2.0, 3.0])
    (tmp_path / "mixed.csv").write_text("label,x,y,z,coordinate_system\nL1,1,2,3,RAS\nL2,1,2,3,LPS\n")
    read = io.read_landmarks(tmp_path / "mixed.csv")
    np.testing.assert_allclose(read["L1"], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(read["L2"], [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("nohead.csv", "L1,1,2,3\n", "header"),
        ("dup.csv", "label,x,y,z\nL1,1,2,3\nL1,4,5,6\n", "more than once"),
        ("nan.csv", "label,x,y,z\nL1,1,nan,3\n", "finite"),
        ("text.csv", "label,x,y,z\nL1,1,two,3\n", "non-numeric"),
        ("nolabel.csv", "label,x,y,z\n,1,2,3\n", "no label"),
        ("short.csv", "label,x,y,z\nL1,1,2\n", "columns"),
        ("empty.csv", "label,x,y,z\n", "no points"),
        ("bad.mrk.json", "{not json", "not valid JSON"),
        ("nomarkups.mrk.json", '{"a": 1}', "markups"),
        (
            "frame.mrk.json",
            '{"markups": [{"coordinateSystem": "IJK", "controlPoints": [{"label": "L1", "position": [1, 2, 3]}]}]}',
            "coordinate system",
        ),
        ("points.xyz", "L1 1 2 3", "unknown format"),
    ],
)
def test_bad_landmark_files_are_input_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message) as info:
        io.read_landmarks(tmp_path / name)
    assert name in str(info.value)


def test_missing_landmark_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        io.read_landmarks(tmp_path / "none.mrk.json")


def test_write_landmarks_rejects_bad_points(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="three finite"):
        io.write_landmarks({"L1": [1.0, 2.0]}, tmp_path / "a.csv")
    with pytest.raises(InputError, match="use .mrk.json"):
        io.write_landmarks({"L1": [1.0, 2.0, 3.0]}, tmp_path / "a.txt")


def test_rows_csv_takes_every_column_in_order_and_formats_floats(tmp_path: Path) -> None:
    rows = [{"label": 20, "dice": 0.123456789}, {"label": 21, "tre_mm": float("nan"), "dice": 1.0}]
    path = io.write_rows_csv(rows, tmp_path / "t.csv", float_format=".3g")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == ["label,dice,tre_mm", "20,0.123,", "21,1,"]
