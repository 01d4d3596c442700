"""What the registration accepts (`inputs.py`): the CT cut to its labelled spine keeps every vertebra and its
physical place."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.inputs import COMPUTE_MARGIN_MM, crop_to_spine, labelled_box, validate_labels


def _oblique_ct_with_spine(size=(120, 110, 100), spacing=(0.8, 0.7, 1.5)):
    """A CT-like volume on a rotated, anisotropic LPS grid with two labelled blocks off its centre."""
    ct = sitk.Image(list(size), sitk.sitkInt16) - 1000
    labels = sitk.Image(list(size), sitk.sitkUInt16)
    for image in (ct, labels):
        image.SetSpacing(spacing)
        image.SetOrigin((-30.0, 12.0, 400.0))
        image.SetDirection(sitk.VersorTransform((0.3, -0.2, 1.0), 0.4).GetMatrix())
    array = sitk.GetArrayFromImage(labels)
    array[10:20, 30:38, 25:35] = 20
    array[22:30, 31:39, 26:36] = 21
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return ct, out


def test_the_labelled_box_is_the_smallest_holding_every_label():
    array = np.zeros((5, 6, 7), dtype=np.uint8)
    array[1, 2, 3] = 1
    array[3, 4, 5] = 2
    assert labelled_box(array) == (slice(1, 4), slice(2, 5), slice(3, 6))
    assert labelled_box(np.zeros((3, 3, 3))) is None


def test_the_cut_keeps_every_vertebra_voxel_where_it_was_in_patient_space():
    ct, labels = _oblique_ct_with_spine()
    cut_ct, cut_labels = crop_to_spine(ct, labels, margin_mm=5.0)
    assert np.prod(cut_labels.GetSize()) < 0.2 * np.prod(labels.GetSize())
    assert cut_ct.GetSize() == cut_labels.GetSize()
    assert cut_labels.GetDirection() == labels.GetDirection() and cut_labels.GetSpacing() == labels.GetSpacing()
    for value in (20, 21):
        before = np.argwhere(sitk.GetArrayViewFromImage(labels) == value)[:, ::-1]
        after = np.argwhere(sitk.GetArrayViewFromImage(cut_labels) == value)[:, ::-1]
        assert len(before) == len(after)
        points = [labels.TransformIndexToPhysicalPoint([int(i) for i in index]) for index in before]
        moved = [cut_labels.TransformIndexToPhysicalPoint([int(i) for i in index]) for index in after]
        assert np.allclose(points, moved)


def test_the_cut_leaves_the_margin_on_every_side_unless_the_image_ends():
    ct, labels = _oblique_ct_with_spine()
    _, cut = crop_to_spine(ct, labels, margin_mm=5.0)
    array = sitk.GetArrayViewFromImage(cut)
    box = labelled_box(array)
    spacing = cut.GetSpacing()[::-1]  # array order
    for axis, along in enumerate(box):
        pad = int(np.ceil(5.0 / spacing[axis]))
        assert along.start >= pad or along.start == 10  # z starts at slice 10 of the source: cut at the image edge
        assert array.shape[axis] - along.stop >= pad


def test_nothing_is_cut_from_a_ct_that_is_mostly_spine():
    ct, labels = _oblique_ct_with_spine(size=(40, 40, 40), spacing=(1.0, 1.0, 1.0))
    assert crop_to_spine(ct, labels, COMPUTE_MARGIN_MM) == (ct, labels)


def test_an_empty_label_map_is_refused_before_anything_is_cut():
    ct, labels = _oblique_ct_with_spine()
    with pytest.raises(InputError, match="empty"):
        validate_labels(labels * 0, ct)
