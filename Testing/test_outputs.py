"""Writing a result (outputs.py): compact displacement and det J images within half a step of the exact values."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from SpineRigidRegLib.outputs import FIELD_STEPS_PER_MM, JACOBIAN_STEPS, compact_field, compact_jacobian


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


def test_a_compact_jacobian_keeps_every_sign_and_every_value_within_half_a_step(tmp_path):
    """Tiny positive values stay positive and tiny negative ones stay <= 0: the written map counts the same folding
    voxels as the exact one (the summary's count, issue 18 item 7)."""
    rng = np.random.default_rng(1)
    array = rng.normal(1.0, 0.3, (5, 6, 7)).astype(np.float32)
    array.flat[:4] = [1e-6, -1e-6, 0.0, 1.0 / JACOBIAN_STEPS / 3]
    det = sitk.GetImageFromArray(array)
    det.SetSpacing((0.7, 0.7, 4.0))
    det.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    sitk.WriteImage(compact_jacobian(det), str(tmp_path / "j.nii.gz"), True)
    written = sitk.ReadImage(str(tmp_path / "j.nii.gz"))
    back = sitk.GetArrayFromImage(written)
    assert np.allclose(written.GetDirection(), det.GetDirection()) and np.allclose(written.GetSpacing(), (0.7, 0.7, 4))
    assert ((back <= 0) == (array <= 0)).all()
    assert np.abs(back - array).max() <= 1.0 / JACOBIAN_STEPS + 1e-7  # a tiny positive value rises to one step
    assert np.abs(back - array)[array > 1.0 / JACOBIAN_STEPS].max() <= 0.5 / JACOBIAN_STEPS + 1e-7
