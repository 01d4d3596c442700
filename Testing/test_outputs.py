"""Writing a result (outputs.py): compact displacement images that stay within 0.0005 mm of the field."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from SpineRigidRegLib.outputs import FIELD_STEPS_PER_MM, compact_field


def test_a_compact_field_keeps_geometry_and_every_value_within_half_a_step(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.normal(0.0, 5.0, (6, 7, 8, 3))
    field = sitk.GetImageFromArray(array, isVector=True)
    field.SetSpacing((0.8, 0.9, 3.5))
    field.SetOrigin((10.0, -4.0, 2.5))
    field.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    compact = compact_field(field)
    assert compact.GetPixelID() == sitk.sitkVectorFloat32
    assert (compact.GetSpacing(), compact.GetOrigin(), compact.GetDirection()) == (
        field.GetSpacing(),
        field.GetOrigin(),
        field.GetDirection(),
    )
    sitk.WriteImage(compact, str(tmp_path / "d.nii.gz"), True)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "d.nii.gz")))
    assert np.abs(back - array).max() <= 0.5 / FIELD_STEPS_PER_MM + 1e-6
