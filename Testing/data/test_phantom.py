"""The procedural spine phantom: requested vertebrae, separate rigid bodies, plausible HU, geometry, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from SpineRigidRegLib.data.phantom import TISSUE_HU, Tissue, make_phantom
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.geometry import Geometry


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(num_vertebrae=4, shape=(48, 40, 48), seed=3)


def arrays(p):
    return (sitk.GetArrayFromImage(p.ct), sitk.GetArrayFromImage(p.labels), sitk.GetArrayFromImage(p.tissues))


def test_requested_vertebrae_in_verse_numbering(phantom) -> None:
    _, labels, _ = arrays(phantom)
    assert sorted(int(v) for v in np.unique(labels) if v) == [20, 21, 22, 23]
    assert list(phantom.landmarks) == ["L1", "L2", "L3", "L4"]
    assert phantom.labels.GetPixelID() == sitk.sitkUInt16 and phantom.tissues.GetPixelID() == sitk.sitkUInt8
    assert sorted(int(v) for v in np.unique(sitk.GetArrayFromImage(make_phantom(6, seed=0).labels)) if v) == list(
        range(19, 25)
    )  # six vertebrae end the column at L5: T12..L5


def test_vertebrae_are_separate_connected_bodies(phantom) -> None:
    _, labels, _ = arrays(phantom)
    for value in (20, 21, 22, 23):
        mask = labels == value
        _, components = ndimage.label(mask)
        assert components == 1, f"vertebra {value} is in {components} pieces"
        grown = ndimage.binary_dilation(mask, iterations=1)
        others = (labels > 0) & (labels != value)
        assert not (grown & others).any(), f"vertebra {value} touches a neighbour"


def test_spine_runs_cranially_along_k(phantom) -> None:
    _, labels, _ = arrays(phantom)
    heights = [ndimage.center_of_mass(labels == v)[0] for v in (20, 21, 22, 23)]
    assert heights == sorted(heights, reverse=True)  # L1 highest
    for name, value in zip(("L1", "L2", "L3", "L4"), (20, 21, 22, 23), strict=True):
        index = phantom.labels.TransformPhysicalPointToIndex(phantom.landmarks[name].tolist())
        assert phantom.labels[index] == value  # each landmark lies in its vertebral body


def test_plausible_hu_per_tissue(phantom) -> None:
    ct, labels, tissues = arrays(phantom)
    median = {t: float(np.median(ct[tissues == t])) for t in Tissue}
    assert median[Tissue.BACKGROUND] < -900
    assert -150 < median[Tissue.FAT] < -50
    assert 20 < median[Tissue.MUSCLE] < 80
    assert median[Tissue.CORTICAL] > 600
    assert 150 < median[Tissue.MARROW] < 350
    assert 50 < median[Tissue.DISC] < 110
    assert -10 < median[Tissue.CSF] < 40 and 10 < median[Tissue.CORD] < 60
    assert set(np.unique(tissues[labels > 0]).tolist()) == {int(Tissue.CORTICAL), int(Tissue.MARROW)}
    assert not np.isin(tissues[labels == 0], [Tissue.CORTICAL, Tissue.MARROW]).any()
    assert all(t in TISSUE_HU for t in Tissue)


def test_geometry_and_anisotropic_spacing() -> None:
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    p = make_phantom(
        num_vertebrae=2, shape=(24, 30, 36), spacing=(1.5, 1.25, 2.0), origin=(5.0, -3.0, 7.5), direction=direction
    )
    for image in (p.ct, p.labels, p.tissues):
        assert Geometry.of(image) == Geometry(
            shape=(24, 30, 36), spacing=(1.5, 1.25, 2.0), origin=(5.0, -3.0, 7.5), direction=direction
        )
    for name, value in (("L1", 20), ("L2", 21)):
        assert p.labels[p.labels.TransformPhysicalPointToIndex(p.landmarks[name].tolist())] == value


def test_curvature_moves_the_middle_anteriorly() -> None:
    straight = make_phantom(num_vertebrae=5, shape=(80, 48, 48), curvature_deg=0.0, seed=1)
    curved = make_phantom(num_vertebrae=5, shape=(80, 48, 48), curvature_deg=30.0, seed=1)
    y_straight = np.array([p[1] for p in straight.landmarks.values()])
    y_curved = np.array([p[1] for p in curved.landmarks.values()])
    assert np.ptp(y_straight) < 1e-9
    assert y_curved[2] < y_curved[0] - 0.5 and y_curved[2] < y_curved[4] - 0.5  # lordosis: LPS y is posterior


def test_same_seed_same_phantom_and_seed_matters() -> None:
    a, b, c = (make_phantom(3, shape=(32, 32, 32), seed=s) for s in (5, 5, 6))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(b.ct))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a.labels), sitk.GetArrayFromImage(b.labels))
    assert not np.array_equal(sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(c.ct))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_vertebrae": 0}, "num_vertebrae"),
        ({"shape": (4, 40, 40)}, "shape"),
        ({"num_vertebrae": 4, "top_label": 22}, "VerSe range"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        make_phantom(**kwargs)
