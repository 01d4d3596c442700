"""The QA picture: true anatomical planes, outlines where the bone is (not flipped), orientation letters."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import SimpleITK as sitk
from SpineRigidRegLib.qa import anatomical_plane, draw_outlined, spine_centre

matplotlib.use("Agg")


def _oblique_volume_with_bone(bone_lps: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
    """A 2 x 1 x 3 mm volume, rotated 20 degrees about two axes, holding a bright 6 mm ball at ``bone_lps``."""
    image = sitk.Image(60, 70, 24, sitk.sitkFloat32)
    image.SetSpacing((2.0, 1.0, 3.0))
    rotation = sitk.Euler3DTransform((0, 0, 0), np.radians(20), np.radians(-20), 0.0).GetMatrix()
    image.SetDirection(rotation)
    image.SetOrigin((-60.0, -35.0, -36.0))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    origin, spacing = np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing())
    points = origin + (index * spacing) @ np.asarray(rotation).reshape(3, 3).T
    inside = (np.linalg.norm(points - bone_lps, axis=1) < 6.0).reshape(image.GetSize()).T
    bone = sitk.GetImageFromArray(inside.astype(np.float32) * 1000.0)
    bone.CopyInformation(image)
    labels = sitk.Cast(bone > 500, sitk.sitkUInt8)
    return bone, labels


@pytest.mark.parametrize("plane_name", ["axial", "sagittal"])
def test_outline_lies_on_the_bone_and_the_letters_say_where_it_is(plane_name):
    """A ball 15 mm to the patient's right, 12 mm anterior and 10 mm superior of the centre (LPS (-15, -12, 10)):
    the axial panel shows it top left (R, A), the sagittal one top left (A, S), and its outline's centre is the
    bone's centre (a flipped outline lands mirrored, 20-24 px away)."""
    import matplotlib.pyplot as plt

    bone_lps = np.array([-15.0, -12.0, 10.0])
    image, labels = _oblique_volume_with_bone(bone_lps)
    if plane_name == "axial":
        plane = anatomical_plane("axial", np.array([0.0, 0.0, bone_lps[2]]), 80.0)
    else:
        plane = anatomical_plane("sagittal", np.array([bone_lps[0], 0.0, 0.0]), 80.0)
    background = plane.sample(image)
    mask = plane.sample(labels, is_label=True)
    rows, cols = np.nonzero(background > 500)
    assert len(rows) > 20
    bone_rc = np.array([rows.mean(), cols.mean()])
    half = (background.shape[0] - 1) / 2
    letters = plane.letters()
    assert bone_rc[0] < half and bone_rc[1] < half  # top left
    expected = {"axial": ("R", "A"), "sagittal": ("A", "S")}[plane_name]
    assert (letters["left"], letters["top"]) == expected
    fig, ax = plt.subplots()
    draw_outlined(ax, background, mask, plane)
    vertices = np.concatenate([p.vertices for c in ax.collections for p in c.get_paths() if len(p.vertices)])
    outline_rc = vertices.mean(axis=0)[::-1]  # (x, y) = (column, row)
    plt.close(fig)
    assert np.linalg.norm(outline_rc - bone_rc) < 1.5, (outline_rc, bone_rc)


def test_spine_centre_is_the_labels_physical_centroid():
    labels = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    labels.SetOrigin((5.0, 0.0, 0.0))
    labels[2, 3, 4] = 1
    labels[4, 3, 4] = 2
    assert np.allclose(spine_centre(labels), [8.0, 3.0, 4.0])
